//! Raw system calls the rest of the crate needs and nix does not wrap. Each is wrapped once here.
//!
//! Everything in this file is safe to call in the child between clone and exec: no allocation,
//! no locks, only system calls.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

pub const CLONE_PIDFD: u64 = 0x1000;
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of clone3(2), version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Result of a fork-like clone: which side we are on.
pub enum Forked {
    Parent {
        pid: libc::pid_t,
        pidfd: Option<OwnedFd>,
    },
    Child,
}

/// clone3 with fork semantics (no CLONE_VM, stack 0: the child runs on a copy of our stack).
///
/// # Safety
/// The caller is in a multi-threaded process: the child may only run async-signal-safe code
/// (no allocation, no locks) until it execs or exits.
pub unsafe fn clone3(flags: u64, cgroup_fd: Option<RawFd>) -> Result<Forked, Errno> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: flags
            | CLONE_PIDFD
            | if cgroup_fd.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        // With CLONE_PARENT the child signals our parent as we would (our own exit signal):
        // clone3 refuses one of its own then.
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        cgroup: cgroup_fd.map(|fd| fd as u64).unwrap_or(0),
        ..Default::default()
    };
    // SAFETY: args is a valid clone_args of the size we pass; without CLONE_VM and with stack 0
    // the child gets a private copy of the address space, so returning into Rust is sound.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent {
            pid: pid as libc::pid_t,
            // SAFETY: the kernel stored a new, owned pidfd because we asked for CLONE_PIDFD.
            pidfd: (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) }),
        }),
    }
}

/// Stack of a [`spawn_sharing_memory`] child: it runs a few frames of setup and then execs.
const SHARED_CHILD_STACK: usize = 256 << 10;

/// Starts `body(arg)` in a child process that shares this process's memory until it execs or
/// exits, on a stack of its own, while the calling thread waits: posix_spawn's way (the
/// sandbox's init, single-threaded, is all suspended meanwhile). No page tables are copied
/// and the exec frees none of ours, so the child's exec costs the same however large the
/// process this one was cloned from (the agent). Returns the child's pid once it has exec'd
/// or exited.
///
/// `body` must not return, must not allocate or take locks, and may only write memory that
/// nobody in this process reads afterwards: it runs in our address space.
pub fn spawn_sharing_memory<T>(arg: &T, body: fn(&T) -> !) -> Result<libc::pid_t, Errno> {
    struct Start<T> {
        arg: *const T,
        body: fn(&T) -> !,
    }
    extern "C" fn trampoline<T>(start: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `start` points at the `Start` below, alive in the parent's frame: the parent
        // stays suspended (CLONE_VFORK) until this child has exec'd or exited.
        let start = unsafe { &*(start as *const Start<T>) };
        // SAFETY: as above, `arg` outlives the child's use of it.
        (start.body)(unsafe { &*start.arg })
    }
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHARED_CHILD_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // A guard page at the bottom: an overflow faults instead of writing below the stack.
    // SAFETY: the first page of the mapping made above.
    unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) };
    let start = Start { arg, body };
    // SAFETY: CLONE_VM with a stack of its own for the child; CLONE_VFORK suspends this
    // thread until the child execs or exits, so `start` and `arg` outlive the child's use of
    // them, and `body` touches nothing another thread uses (its contract). The stack top is
    // 16-byte aligned (page-aligned mapping).
    let pid = unsafe {
        libc::clone(
            trampoline::<T>,
            (stack as *mut u8).add(SHARED_CHILD_STACK) as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &start as *const Start<T> as *mut libc::c_void,
        )
    };
    let err = Errno::last();
    // SAFETY: the child no longer runs on it (it exec'd or exited).
    unsafe { libc::munmap(stack, SHARED_CHILD_STACK) };
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

/// pidfd_open(2): a pidfd for a pid we own (used when clone3 did not give one).
pub fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// An int-valued SOL_SOCKET option of a socket (SO_DOMAIN, SO_TYPE).
pub fn socket_option(fd: &OwnedFd, name: libc::c_int) -> Result<libc::c_int, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(value) }
}

/// The inode number of an open file.
pub fn inode(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    nix::sys::stat::fstat(fd).map(|st| st.st_ino)
}

/// pidfd_getfd(2): a copy of the file at `fd` in the process `pidfd` names.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// pidfd_send_signal(2): signals exactly the process the pidfd names, even if its pid was reused.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> Result<(), Errno> {
    // SAFETY: the fd is borrowed and open; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// close_range(2).
pub fn close_range(first: u32, last: u32, flags: u32) -> Result<(), Errno> {
    // SAFETY: close_range only affects this process's fd table; the callers own every fd in range.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Installs a classic-BPF seccomp filter that was compiled in the parent.
pub fn seccomp_load(prog: &[libc::sock_filter]) -> Result<(), Errno> {
    seccomp_filter(prog, 0).map(drop)
}

/// Loads `prog` with a user-notification listener and returns the listener's fd (close-on-exec).
pub fn seccomp_load_listener(prog: &[libc::sock_filter]) -> Result<RawFd, Errno> {
    seccomp_filter(prog, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)
}

fn seccomp_filter(prog: &[libc::sock_filter], flags: libc::c_ulong) -> Result<RawFd, Errno> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at a live slice for the duration of the call; the kernel copies it.
    // With NEW_LISTENER the result is a new fd, the caller's.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as RawFd)
    }
}

/// Sets IFF_UP on the loopback interface of the current network namespace.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket() with constant arguments; the fd is wrapped at once so it is closed.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: raw is a new fd owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq naming "lo"; SIOCGIFFLAGS fills ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: reading and writing the flags member that SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS reads the same struct.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// write(2) of a small record, retried on EINTR. Records are below PIPE_BUF, so a pipe write is atomic.
pub fn write_record(fd: RawFd, buf: &[u8]) {
    loop {
        // SAFETY: buf is a live slice; a failed or short write only loses the report.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if r >= 0 || Errno::last() != Errno::EINTR {
            return;
        }
    }
}

/// _exit(2): leave the child without running atexit handlers or flushing the parent's buffers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// The last capability the running kernel knows.
pub fn cap_last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops one capability from the bounding set by number (for capabilities newer than the `caps`
/// crate knows).
pub fn capbset_drop(cap: u8) -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Raw id syscalls. glibc's setgroups/setresgid/setresuid apply the change to every thread it
/// knows of (its "setxid" broadcast). In a child cloned from the multi-threaded agent, glibc
/// still lists the agent's threads, and waits forever for one that was being created at clone
/// time. The raw syscalls change only the calling, single-threaded, process.
fn id_syscall(
    nr: libc::c_long,
    a: libc::c_ulong,
    b: libc::c_ulong,
    c: libc::c_ulong,
) -> Result<(), Errno> {
    // SAFETY: the id syscalls take integers (setgroups: a count of 0 and a null list).
    let r = unsafe { libc::syscall(nr, a, b, c) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// setgroups(0, NULL): no supplementary groups.
pub fn clear_groups() -> Result<(), Errno> {
    id_syscall(libc::SYS_setgroups, 0, 0, 0)
}

pub fn setresgid(gid: libc::gid_t) -> Result<(), Errno> {
    let g = libc::c_ulong::from(gid);
    id_syscall(libc::SYS_setresgid, g, g, g)
}

pub fn setresuid(uid: libc::uid_t) -> Result<(), Errno> {
    let u = libc::c_ulong::from(uid);
    id_syscall(libc::SYS_setresuid, u, u, u)
}

/// setfsgid then setfsuid (they report no errors; the ids are checked by what follows).
pub fn set_fs_ids(uid: libc::uid_t, gid: libc::gid_t) {
    let _ = id_syscall(libc::SYS_setfsgid, libc::c_ulong::from(gid), 0, 0);
    let _ = id_syscall(libc::SYS_setfsuid, libc::c_ulong::from(uid), 0, 0);
}

/// prctl with integer arguments only.
pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: every option we pass takes integer arguments.
    let r = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Names this process in /proc/<pid>/comm (what `ps` and `pgrep` show): the sandbox init and the
/// spawn helper are forks of the agent and should not look like it. (Their /proc/<pid>/cmdline
/// still reads like the agent's: PR_SET_MM, which could change that, is refused on the hosts we
/// run on.)
pub fn set_name(name: &'static std::ffi::CStr) -> Result<(), Errno> {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a static.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Whether extended attribute `name` of `path` holds exactly `value` (false when it is absent or
/// unreadable). Parent side only: it allocates.
pub fn xattr_is(path: &std::path::Path, name: &std::ffi::CStr, value: &[u8]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and outlive the call; the kernel writes at most
    // buf.len() bytes into buf.
    let n = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    usize::try_from(n).is_ok_and(|n| &buf[..n] == value)
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), Errno> {
    use nix::fcntl::{F_GETFL, F_SETFL, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, F_GETFL)?);
    fcntl(fd, F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn write_and_exit(seen: &AtomicU32) -> ! {
        seen.store(42, Ordering::SeqCst);
        exit_now(7)
    }

    #[test]
    fn a_memory_sharing_child_runs_before_the_parent_goes_on() {
        let seen = AtomicU32::new(0);
        let pid = spawn_sharing_memory(&seen, write_and_exit).unwrap();
        // Shared memory, and this thread waited for the child: its write is here already.
        assert_eq!(seen.load(Ordering::SeqCst), 42);
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
    }

    struct Exec {
        path: std::ffi::CString,
        argv: [*const libc::c_char; 2],
        envp: [*const libc::c_char; 1],
    }

    fn exec(e: &Exec) -> ! {
        // SAFETY: NUL-terminated path, NULL-terminated argv and envp, alive in the parent.
        unsafe { libc::execve(e.path.as_ptr(), e.argv.as_ptr(), e.envp.as_ptr()) };
        exit_now(127)
    }

    #[test]
    fn a_memory_sharing_child_execs() {
        let path = std::ffi::CString::new("/bin/false").unwrap();
        let e = Exec {
            argv: [path.as_ptr(), std::ptr::null()],
            envp: [std::ptr::null()],
            path,
        };
        let pid = spawn_sharing_memory(&e, exec).unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // false's own status (1), not the 127 of a failed exec.
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 1);
    }
}
