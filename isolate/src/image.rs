//! The parent's side of a clone: everything the sandbox's child reads from memory between the
//! clone and the exec ([`Prepared`], and the buffers its pointers point into), and the clone.
//!
//! Built where the clone happens: in the calling process, or in the spawn helper
//! ([`crate::spawner`]), which receives the spec, the plan and the child's ends of the pipes.

use std::ffi::CString;
use std::os::fd::{OwnedFd, RawFd};

use crate::child::{self, Prepared};
use crate::error::{IsolateError, Result};
use crate::rootfs::Plan;
use crate::spec::SandboxSpec;
use crate::sys;

/// Room for a prepared sandbox's late variable, `NAME=value` and its NUL.
pub const LATE_ENV_CAP: usize = 256;
/// Room for a reusable sandbox's variables of one run (`NAME=value` and a NUL each), and how
/// many there may be.
pub const RUN_ENV_CAP: usize = 8192;
pub const RUN_ENV_MAX: usize = 64;

/// The child's ends of its pipes and the namespace it joins, as this process numbers them.
#[derive(Debug, Clone, Copy)]
pub struct ChildFds {
    pub stdio: [Option<RawFd>; 3],
    pub report: RawFd,
    pub status: RawFd,
    pub go: Option<RawFd>,
    pub netns: Option<RawFd>,
    pub start: Option<RawFd>,
}

/// The capabilities a child drops from its bounding set: those the `caps` crate knows, sorted,
/// and the running kernel's beyond them.
pub fn bounding_sets() -> (Vec<caps::Capability>, Vec<u8>) {
    let last = sys::cap_last_cap();
    let mut bounding: Vec<caps::Capability> = caps::all()
        .into_iter()
        .filter(|c| c.index() <= last)
        .collect();
    bounding.sort_by_key(|c| c.index());
    let known = bounding.iter().map(|c| c.index()).max().unwrap_or(0);
    (bounding, (known + 1..=last).collect())
}

/// The resource limits a sandbox runs under, in the order failures name them by index.
pub fn rlimits(spec: &SandboxSpec) -> Vec<(libc::__rlimit_resource_t, u64)> {
    vec![
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NOFILE, spec.limits.nofile),
        (libc::RLIMIT_MEMLOCK, 64 << 10),
        (libc::RLIMIT_RTPRIO, 0),
        (libc::RLIMIT_NICE, 0),
        (libc::RLIMIT_MSGQUEUE, 0),
    ]
}

/// [`SandboxSpec::cpus`] as the kernel's set: at least one CPU, each below `CpuSet::count()`.
pub fn cpu_set(cpus: &[usize]) -> Result<nix::sched::CpuSet> {
    let bad = |reason: String| IsolateError::InvalidSpec {
        field: "cpus",
        reason,
    };
    if cpus.is_empty() {
        return Err(bad("no CPU".into()));
    }
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)
            .map_err(|_| bad(format!("CPU {c} is out of range")))?;
    }
    Ok(set)
}

pub fn cstring(s: &str, field: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| IsolateError::InvalidSpec {
        field,
        reason: "NUL byte".into(),
    })
}

/// Where exec looks for the program: itself if it has a slash, else each PATH entry.
pub fn exec_candidates(spec: &SandboxSpec) -> Vec<String> {
    if spec.program.contains('/') {
        return vec![spec.program.clone()];
    }
    let path = spec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{}", d.trim_end_matches('/'), spec.program))
        .collect()
}

pub fn exec_paths(spec: &SandboxSpec) -> Result<Vec<CString>> {
    exec_candidates(spec)
        .iter()
        .map(|p| cstring(p, "args"))
        .collect()
}

/// A child's memory image: `prepared` points into the argv and envp strings and the late
/// buffer, which live (unread here) as long as it does.
pub struct ChildImage {
    pub prepared: Prepared,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    late_env: Option<*mut [u8]>,
    /// A reusable sandbox's per-run buffers: the variables' bytes, and the run's envp.
    run_env: Option<(*mut [u8], *mut [*const libc::c_char])>,
}

impl ChildImage {
    /// `hold`: a prepared sandbox, whose function waits for its start (and whose late variable,
    /// if the spec names one, gets a buffer filled in then).
    pub fn new(
        spec: &SandboxSpec,
        hold: bool,
        plan: Plan,
        join_files: Vec<CString>,
        bounding: &(Vec<caps::Capability>, Vec<u8>),
        fds: ChildFds,
    ) -> Result<ChildImage> {
        let argv: Vec<CString> = std::iter::once(spec.program.as_str())
            .chain(spec.args.iter().map(String::as_str))
            .map(|s| cstring(s, "args"))
            .collect::<Result<_>>()?;
        let envp_owned: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(&format!("{k}={v}"), "args"))
            .collect::<Result<_>>()?;
        // A prepared sandbox's late variable: a buffer "NAME=" the child fills in at start.
        let late_env: Option<(*mut [u8], usize)> = match (&spec.late_env, hold) {
            (Some(name), true) => {
                let mut buf = vec![0u8; LATE_ENV_CAP].into_boxed_slice();
                let prefix = name.len() + 1;
                buf[..name.len()].copy_from_slice(name.as_bytes());
                buf[name.len()] = b'=';
                Some((Box::into_raw(buf), prefix))
            }
            _ => None,
        };
        let envp: Vec<*const libc::c_char> = envp_owned
            .iter()
            .map(|c| c.as_ptr())
            .chain(late_env.map(|(ptr, _)| ptr.cast::<libc::c_char>() as *const libc::c_char))
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        // A reusable sandbox's runs: their own variables, and an envp with room for them.
        let run_env = (hold && spec.reusable).then(|| {
            let buf = vec![0u8; RUN_ENV_CAP].into_boxed_slice();
            let run_envp = vec![std::ptr::null(); envp.len() + RUN_ENV_MAX].into_boxed_slice();
            (Box::into_raw(buf), Box::into_raw(run_envp))
        });
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut signals: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: signals is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut signals);
            libc::sigaddset(&mut signals, libc::SIGCHLD);
            for s in child::FORWARDED {
                libc::sigaddset(&mut signals, s);
            }
            libc::sigaddset(&mut signals, child::cancel_signal());
        }
        let image = ChildImage {
            prepared: Prepared {
                join_files,
                plan,
                hostname: cstring(&spec.name, "name")?,
                rlimits: rlimits(spec),
                uid: spec.uid,
                gid: spec.gid,
                bounding: bounding.0.clone(),
                bounding_extra: bounding.1.clone(),
                bpf: crate::seccomp::program(),
                connect_bpf: (hold && spec.loopback_socketpair.is_some())
                    .then(crate::seccomp::connect_program),
                connect_listener: std::sync::atomic::AtomicI32::new(-1),
                stdio: fds.stdio,
                cwd: cstring(&spec.cwd, "cwd")?,
                argv: ptrs(&argv),
                envp,
                exec_paths: exec_paths(spec)?,
                report_fd: fds.report,
                status_fd: fds.status,
                die_with_parent: spec.die_with_parent,
                signals,
                cancel: child::cancel_signal(),
                go_fd: fds.go,
                netns_fd: fds.netns,
                start_fd: fds.start,
                reusable: hold && spec.reusable,
                batch_scheduling: spec.batch_scheduling,
                cpus: spec.cpus.as_deref().map(cpu_set).transpose()?,
                run_env: run_env.map(|(buf, envp)| child::RunEnv {
                    buf: buf.cast::<u8>(),
                    cap: RUN_ENV_CAP,
                    envp: envp.cast::<*const libc::c_char>(),
                    envp_cap: envp.len(),
                }),
                late_env: late_env.map(|(ptr, prefix)| child::LateEnv {
                    ptr: ptr.cast::<u8>(),
                    prefix,
                    cap: LATE_ENV_CAP,
                }),
            },
            _argv: argv,
            _envp: envp_owned,
            late_env: late_env.map(|(ptr, _)| ptr),
            run_env,
        };
        Ok(image)
    }

    /// Clones the child (`flags`: the namespaces, and `CLONE_PARENT` from the spawn helper),
    /// into the cgroup `cgroup_fd` names when there is one. Returns its pid and pidfd.
    pub fn clone_child(
        &self,
        flags: u64,
        cgroup_fd: Option<RawFd>,
    ) -> Result<(libc::pid_t, Option<OwnedFd>)> {
        // SAFETY: the child runs only `child::run`, which makes system calls on `self.prepared`
        // (whose pointers point into buffers `self` keeps alive) and never returns (it execs
        // or _exits).
        let forked =
            unsafe { sys::clone3(flags, cgroup_fd) }.map_err(|e| IsolateError::sys("clone3", e))?;
        match forked {
            sys::Forked::Child => child::run(&self.prepared),
            sys::Forked::Parent { pid, pidfd } => Ok((pid, pidfd)),
        }
    }

    /// What names a failure the child reports later: the plan, the exec paths, the cgroup files
    /// and the limits.
    pub fn into_parts(mut self) -> (Plan, Vec<CString>, Vec<CString>) {
        let plan = std::mem::replace(&mut self.prepared.plan, Plan { ops: Vec::new() });
        let exec_paths = std::mem::take(&mut self.prepared.exec_paths);
        let join_files = std::mem::take(&mut self.prepared.join_files);
        (plan, exec_paths, join_files)
    }
}

impl Drop for ChildImage {
    fn drop(&mut self) {
        // The argv and envp strings go with their vectors; the late buffer is ours to free.
        if let Some(ptr) = self.late_env.take() {
            // SAFETY: ptr came from Box::into_raw in `new` and is freed once; a child has its
            // own copy of the memory.
            drop(unsafe { Box::from_raw(ptr) });
        }
        if let Some((buf, envp)) = self.run_env.take() {
            // SAFETY: both came from Box::into_raw in `new` and are freed once; a child has
            // its own copy of the memory.
            drop(unsafe { Box::from_raw(buf) });
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(envp) });
        }
    }
}
