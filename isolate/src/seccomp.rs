//! The seccomp filter every function runs under: default allow, a deny list (mounts,
//! namespaces, other processes' memory, the kernel's own interfaces), clone's namespace flags,
//! TIOCSTI, raw sockets, personality changes, and EPERM for the i386 and x32 ABIs.
//!
//! The rules are in `build/seccomp.rs`; libseccomp compiles them when isolate is built and the
//! program is embedded here, so a sandbox's child only loads finished BPF (nothing allocates
//! between clone and exec) and no process compiles it at run time.

include!(concat!(env!("OUT_DIR"), "/seccomp_program.rs"));

/// The classic-BPF program a sandbox's child loads with `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn program() -> &'static [libc::sock_filter] {
    PROGRAM
}

/// The filter stacked on [`program`] when the caller answers the function's `connect` calls
/// (and TCP-level `setsockopt`) through a [`crate::ConnectNotifier`].
pub fn connect_program() -> &'static [libc::sock_filter] {
    CONNECT_PROGRAM
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI32, Ordering};

    use super::*;
    use crate::sys;

    #[test]
    fn the_program_checks_the_architecture_first() {
        let prog = program();
        assert!(prog.len() > 40, "{} instructions", prog.len());
        assert!(
            prog.len() < 4096,
            "BPF programs are capped at 4096 instructions"
        );
        // ld [4]: seccomp_data.arch, compared before any syscall number is looked at.
        assert_eq!((prog[0].code, prog[0].k), (0x20, 4));
    }

    /// What a child saw under the filter: errno of each call (0 when it succeeded).
    #[derive(Default)]
    struct Seen {
        loaded: AtomicI32,
        unshare: AtomicI32,
        clone3: AtomicI32,
        getppid: AtomicI32,
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r < 0 {
            nix::errno::Errno::last_raw()
        } else {
            0
        }
    }

    fn under_the_filter(seen: &Seen) -> ! {
        // As a sandbox does (and what lets a process without CAP_SYS_ADMIN load a filter).
        let _ = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1);
        let loaded = sys::seccomp_load(program()).err().map_or(0, |e| e as i32);
        seen.loaded.store(loaded, Ordering::SeqCst);
        // SAFETY: syscalls with plain integer arguments; unshare(0) changes nothing.
        let unshare = unsafe { libc::syscall(libc::SYS_unshare, 0) };
        seen.unshare.store(errno_of(unshare), Ordering::SeqCst);
        // SAFETY: a NULL clone_args is refused by the filter, or by the kernel with EFAULT.
        let clone3 = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
        seen.clone3.store(errno_of(clone3), Ordering::SeqCst);
        // SAFETY: no arguments.
        let getppid = unsafe { libc::syscall(libc::SYS_getppid) };
        seen.getppid.store(errno_of(getppid), Ordering::SeqCst);
        sys::exit_now(0)
    }

    #[test]
    fn a_child_under_the_filter_is_refused_what_it_names_and_allowed_the_rest() {
        let seen = Seen::default();
        let pid = sys::spawn_sharing_memory(&seen, under_the_filter).unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(seen.loaded.load(Ordering::SeqCst), 0, "loading the filter");
        assert_eq!(seen.unshare.load(Ordering::SeqCst), libc::EPERM, "unshare");
        assert_eq!(seen.clone3.load(Ordering::SeqCst), libc::ENOSYS, "clone3");
        assert_eq!(seen.getppid.load(Ordering::SeqCst), 0, "getppid");
    }
}
