//! Benchmark and diagnostic helpers: the steps of a sandboxed spawn, each timed on its own.
//!
//! Nothing on the spawn path uses this module. `benches/spawn.rs` calls it to find out which
//! step dominates the cost of [`crate::Isolator::spawn`]. Each helper forks a child with the same
//! `clone3` the spawn uses; the child performs the one step, times it with the monotonic clock,
//! reports the time on a pipe and `_exit`s. The parent also times the child's whole life, from
//! just before the clone to the child reaped, which includes tearing its namespaces down.
//!
//! Like the real sandbox child, a measuring child only makes system calls on data prepared
//! before the clone, so these helpers are sound in a multi-threaded caller too.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::error::{IsolateError, Result, Step};
use crate::rootfs::Plan;
use crate::spec::SandboxSpec;
use crate::sys;

/// How long one measured step took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The step alone, timed where it happens (in the child, or around `clone3` in the parent).
    /// For [`exec`], which cannot time itself, the same as `total`.
    pub step: Duration,
    /// From just before the clone until the child is reaped: fork, the step, exit, namespace
    /// teardown (the part the kernel does before the parent can reap) and the wait.
    pub total: Duration,
}

/// A set of namespace flags for `clone3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces(u64);

impl Namespaces {
    /// No new namespace: a plain fork through `clone3`.
    pub const NONE: Namespaces = Namespaces(0);
    pub const PID: Namespaces = Namespaces(libc::CLONE_NEWPID as u64);
    pub const MOUNT: Namespaces = Namespaces(libc::CLONE_NEWNS as u64);
    pub const IPC: Namespaces = Namespaces(libc::CLONE_NEWIPC as u64);
    pub const UTS: Namespaces = Namespaces(libc::CLONE_NEWUTS as u64);
    pub const NET: Namespaces = Namespaces(libc::CLONE_NEWNET as u64);
    pub const CGROUP: Namespaces = Namespaces(libc::CLONE_NEWCGROUP as u64);
    /// What [`crate::Isolator::spawn`] passes to `clone3` (the cgroup namespace is unshared
    /// later, once the child has joined its cgroup).
    pub const SANDBOX: Namespaces = Namespaces(
        (libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET) as u64,
    );
    /// Every namespace a sandbox gets, all in the one `clone3`.
    pub const ALL: Namespaces = Namespaces(Self::SANDBOX.0 | Self::CGROUP.0);

    pub const fn union(self, other: Namespaces) -> Namespaces {
        Namespaces(self.0 | other.0)
    }
}

/// Size of a child's report: ok flag, step, plan index, errno, nanoseconds.
const REPORT_LEN: usize = 24;

/// What a measuring child does between clone and `_exit`. Must only make system calls.
type Work<'a> = &'a dyn Fn() -> std::result::Result<(), (Step, u32, Errno)>;

/// Like [`Work`], but returns its own timing of the part that counts (None: all of it).
type TimedWork<'a> = &'a dyn Fn() -> std::result::Result<Option<Duration>, (Step, u32, Errno)>;

/// Forks a child into `ns` that runs `work`; returns the child's own timing of `work` (None
/// when the child exec'd: the close-on-exec pipe closed without a report) and the whole life.
fn measure(ns: Namespaces, work: Work<'_>) -> Result<(Option<Duration>, Duration)> {
    measure_inner(ns, &|| work().map(|()| None))
}

/// [`measure`] for work that times itself.
fn measure_inner(ns: Namespaces, work: TimedWork<'_>) -> Result<(Option<Duration>, Duration)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| IsolateError::sys("pipe2", e))?;
    let start = Instant::now();
    // SAFETY: the child runs only `work`, which makes system calls on data the caller prepared
    // before the clone (no allocation, no locks), writes one record and `_exit`s.
    let forked = unsafe { sys::clone3(ns.0, None) }.map_err(|e| IsolateError::sys("clone3", e))?;
    let pid = match forked {
        sys::Forked::Child => child_side(&w, work),
        sys::Forked::Parent { pid, .. } => pid,
    };
    drop(w);
    let mut rec = Vec::with_capacity(REPORT_LEN);
    let read = std::fs::File::from(r)
        .take(REPORT_LEN as u64)
        .read_to_end(&mut rec);
    let status = reap(pid)?;
    let total = start.elapsed();
    read.map_err(|e| IsolateError::sys("read step report", io_errno(&e)))?;
    if rec.is_empty() {
        return if status == 0 {
            Ok((None, total))
        } else {
            Err(IsolateError::ChildVanished(status))
        };
    }
    if rec.len() != REPORT_LEN {
        return Err(IsolateError::Protocol(
            "short report from a measuring child",
        ));
    }
    let word = |i: usize| u32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
    if word(0) == 0 {
        let mut ns_bytes = [0u8; 8];
        ns_bytes.copy_from_slice(&rec[16..24]);
        return Ok((
            Some(Duration::from_nanos(u64::from_ne_bytes(ns_bytes))),
            total,
        ));
    }
    let step = Step::from_u32(word(4)).ok_or(IsolateError::Protocol("unknown step in report"))?;
    Err(IsolateError::Child {
        step,
        detail: Some(format!("(measuring child, index {})", word(8))),
        errno: Errno::from_raw(word(12) as i32),
    })
}

/// Child side of [`measure`]. Never returns.
fn child_side(w: &OwnedFd, work: TimedWork<'_>) -> ! {
    let t0 = Instant::now();
    let res = work();
    let outer = t0.elapsed();
    let mut rec = [0u8; REPORT_LEN];
    let code = match res {
        Ok(inner) => {
            let ns = inner.unwrap_or(outer).as_nanos() as u64;
            rec[16..24].copy_from_slice(&ns.to_ne_bytes());
            0
        }
        Err((step, index, errno)) => {
            rec[0..4].copy_from_slice(&1u32.to_ne_bytes());
            rec[4..8].copy_from_slice(&(step as u32).to_ne_bytes());
            rec[8..12].copy_from_slice(&index.to_ne_bytes());
            rec[12..16].copy_from_slice(&(errno as i32).to_ne_bytes());
            1
        }
    };
    sys::write_record(w.as_raw_fd(), &rec);
    sys::exit_now(code)
}

/// Waits for `pid`; returns its raw wait status (0 = exited 0).
fn reap(pid: libc::pid_t) -> Result<i32> {
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code << 8),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(IsolateError::sys("waitpid", e)),
        }
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

fn check(step: Step, ret: libc::c_int) -> std::result::Result<(), (Step, u32, Errno)> {
    if ret < 0 {
        Err((step, 0, Errno::last()))
    } else {
        Ok(())
    }
}

/// `clone3` into `ns` of a child that exits at once. `step` is the `clone3` call as the parent
/// sees it (creating the namespaces happens inside it).
pub fn clone(ns: Namespaces) -> Result<Timing> {
    let before = Instant::now();
    // SAFETY: the child only calls `_exit`.
    let forked = unsafe { sys::clone3(ns.0, None) }.map_err(|e| IsolateError::sys("clone3", e))?;
    let pid = match forked {
        sys::Forked::Child => sys::exit_now(0),
        sys::Forked::Parent { pid, .. } => pid,
    };
    let step = before.elapsed();
    let status = reap(pid)?;
    let total = before.elapsed();
    if status != 0 {
        return Err(IsolateError::ChildVanished(status));
    }
    Ok(Timing { step, total })
}

/// `unshare(CLONE_NEWCGROUP)` in a plain child, as the sandbox child does after joining its
/// cgroup.
pub fn unshare_cgroup_ns() -> Result<Timing> {
    let (step, total) = measure(Namespaces::NONE, &|| {
        // SAFETY: unshare only affects the calling (child) process.
        check(Step::UnshareCgroupNs, unsafe {
            libc::unshare(libc::CLONE_NEWCGROUP)
        })
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// Bringing `lo` up in a child in a new network namespace.
pub fn loopback_up() -> Result<Timing> {
    let (step, total) = measure(Namespaces::NET, &|| {
        sys::loopback_up().map_err(|e| (Step::LoopbackUp, 0, e))
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// Joining a cgroup: the child writes "0" into each of `join_files` (a sandbox's child writes
/// the group's: v1 `tasks`, one per controller mount). The group must exist; the caller
/// removes it after this returns.
pub fn join_cgroup(join_files: &[PathBuf]) -> Result<Timing> {
    let files = c_paths(join_files)?;
    let (step, total) = measure(Namespaces::NONE, &|| join(&files))?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// Like [`join_cgroup`], but the child first joins `first` (untimed) and then times joining
/// `then`: a join right after another one, when the kernel's cgroup migration lock is still in
/// its writer-friendly state.
pub fn join_cgroup_warm(first: &[PathBuf], then: &[PathBuf]) -> Result<Timing> {
    let (first, then) = (c_paths(first)?, c_paths(then)?);
    let (step, total) = measure_inner(Namespaces::NONE, &|| {
        join(&first)?;
        let t0 = Instant::now();
        join(&then)?;
        Ok(Some(t0.elapsed()))
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

fn c_paths(paths: &[PathBuf]) -> Result<Vec<CString>> {
    paths
        .iter()
        .map(|p| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| IsolateError::Protocol("cgroup path"))
        })
        .collect()
}

/// Child side of a join: only system calls.
fn join(files: &[CString]) -> std::result::Result<(), (Step, u32, Errno)> {
    for (i, f) in files.iter().enumerate() {
        // SAFETY: f is NUL-terminated; the fd is closed below.
        let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        // SAFETY: writing one byte from a static buffer to our own fd.
        if fd < 0 || unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) } < 0 {
            return Err((Step::JoinCgroup, i as u32, Errno::last()));
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Building the sandbox's root file system (the whole mount plan of `spec`: binds, /proc and its
/// masks, /dev, /tmp, pivot_root, read-only remount) in a child in new mount and pid namespaces.
/// `total` includes unmounting it all when the child's mount namespace dies.
pub fn mount_plan(spec: &SandboxSpec) -> Result<Timing> {
    let plan = Plan::build(spec)?;
    let (step, total) = measure(Namespaces::MOUNT.union(Namespaces::PID), &|| plan.run(None))?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// Dropping privileges as the sandbox child does: no supplementary groups, `gid`/`uid`, every
/// capability out of all five sets, no_new_privs, not dumpable.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<Timing> {
    let last = sys::cap_last_cap();
    let (step, total) = measure(Namespaces::NONE, &|| {
        // Raw syscalls, as in the sandbox child (glibc's wrappers can hang after clone).
        sys::clear_groups().map_err(|e| (Step::SetGroups, 0, e))?;
        sys::setresgid(gid).map_err(|e| (Step::SetGid, 0, e))?;
        // The bounding set needs CAP_SETPCAP, so it goes before the uid change.
        for cap in 0..=last {
            sys::capbset_drop(cap).map_err(|e| (Step::DropCapabilities, cap as u32, e))?;
        }
        let caps_err = |_| (Step::DropCapabilities, 0, Errno::last());
        caps::clear(None, caps::CapSet::Ambient).map_err(caps_err)?;
        caps::clear(None, caps::CapSet::Inheritable).map_err(caps_err)?;
        // Leaving uid 0 empties the permitted and effective sets.
        sys::setresuid(uid).map_err(|e| (Step::SetUid, 0, e))?;
        caps::clear(None, caps::CapSet::Permitted).map_err(caps_err)?;
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| (Step::NoNewPrivs, 0, e))?;
        sys::prctl(libc::PR_SET_DUMPABLE, 0).map_err(|e| (Step::SetDumpable, 0, e))
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// Loading a compiled seccomp program ([`crate::seccomp::program`]) in a plain child.
pub fn seccomp_load(bpf: &[libc::sock_filter]) -> Result<Timing> {
    let (step, total) = measure(Namespaces::NONE, &|| {
        sys::seccomp_load(bpf).map_err(|e| (Step::Seccomp, 0, e))
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

/// A plain child that execs `program` (no arguments, empty environment), which must exit 0:
/// fork + exec + exit + reap, with the same `clone3` as the other steps.
pub fn exec(program: &Path) -> Result<Timing> {
    let path = CString::new(program.as_os_str().as_encoded_bytes())
        .map_err(|_| IsolateError::Protocol("program path"))?;
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let (step, total) = measure(Namespaces::NONE, &|| {
        // SAFETY: path, argv and envp are NUL-terminated and outlive the call; on success the
        // process image is replaced, and the close-on-exec pipe tells the parent so.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err((Step::Exec, 0, Errno::last()))
    })?;
    Ok(Timing {
        step: step.unwrap_or(total),
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_sets_match_the_spawn() {
        assert_eq!(
            Namespaces::NONE
                .union(Namespaces::PID)
                .union(Namespaces::MOUNT)
                .union(Namespaces::IPC)
                .union(Namespaces::UTS)
                .union(Namespaces::NET),
            Namespaces::SANDBOX
        );
        assert_eq!(
            Namespaces::SANDBOX.union(Namespaces::CGROUP),
            Namespaces::ALL
        );
    }
}
