//! The code that runs between clone and exec.
//!
//! The first child is pid 1 of the new pid namespace. It joins its cgroup, builds the root,
//! drops every privilege, loads seccomp, then forks the function and stays as a tiny init: it
//! reaps zombies, forwards signals, and reports the function's wait status before it exits (its
//! exit tears down the pid namespace, so nothing the function started survives it).
//!
//! The process cloned from may be multi-threaded (the agent, when it clones without its spawn
//! helper): everything here was prepared by the parent, and this code makes only system calls
//! (no allocation, no locks) until exec.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use nix::errno::Errno;

use crate::error::Step;
use crate::rootfs::Plan;
use crate::sys;

/// Size of a failure record on the report pipe: kind, step, index, errno.
pub const RECORD_LEN: usize = 16;
pub const KIND_PLAN: u32 = 1;
pub const KIND_STEP: u32 = 2;
/// Not a failure: a prepared sandbox is ready and waits for its start.
pub const KIND_READY: u32 = 3;

/// The most plan ops whose bind sources a user-namespace child opens ahead (a plan is ~60 ops;
/// a longer one binds the rest by path).
const MAX_PLAN_OPS: usize = 256;

/// Signals the init passes on to the function.
pub const FORWARDED: [libc::c_int; 8] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

/// The signal that ends a reusable sandbox's run going (see [`crate::ReusableSandbox::cancel_run`]):
/// the init kills the run's process, and then, as after any run, whatever it left. The first
/// real-time signal (glibc keeps the two below it for itself).
pub fn cancel_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Everything the child needs, made ready by the parent.
pub struct Prepared {
    pub join_files: Vec<CString>,
    pub plan: Plan,
    pub hostname: CString,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    pub uid: u32,
    pub gid: u32,
    pub bounding: Vec<caps::Capability>,
    /// Capabilities the running kernel has beyond what the `caps` crate knows.
    pub bounding_extra: Vec<u8>,
    pub bpf: &'static [libc::sock_filter],
    /// A second filter whose `connect` calls the caller answers: loaded with a listener, whose
    /// fd a prepared sandbox's ready report carries for the caller to take (`pidfd_getfd`).
    pub connect_bpf: Option<&'static [libc::sock_filter]>,
    /// The listener's fd in this process once loaded (init sets it, the function's process,
    /// sharing init's memory until its exec, reads it); -1 without one.
    pub connect_listener: std::sync::atomic::AtomicI32,
    /// Sources for fds 0, 1, 2 (None: keep the parent's).
    pub stdio: [Option<RawFd>; 3],
    pub cwd: CString,
    pub exec_paths: Vec<CString>,
    pub argv: Vec<*const libc::c_char>,
    pub envp: Vec<*const libc::c_char>,
    pub report_fd: RawFd,
    pub status_fd: RawFd,
    pub die_with_parent: bool,
    pub signals: libc::sigset_t,
    /// [`cancel_signal`], read by the parent (a member of `signals`).
    pub cancel: libc::c_int,
    /// With a user namespace: wait for one byte here (the parent writes the id maps and joins
    /// the cgroup for us first).
    pub go_fd: Option<RawFd>,
    /// A network namespace made ahead (lo up) to join instead of the clone's own.
    pub netns_fd: Option<RawFd>,
    /// A prepared sandbox: the function's process (already forked) reports ready, then waits
    /// for the start message here before its exec.
    pub start_fd: Option<RawFd>,
    /// Where the start message's value goes: an environment entry `NAME=` already in `envp`.
    pub late_env: Option<LateEnv>,
    /// A reusable sandbox: `start_fd` is a `SOCK_SEQPACKET` socket, and init runs the function
    /// once per message on it ([`serve`]) instead of once.
    pub reusable: bool,
    /// A reusable sandbox's buffers for the variables of one run.
    pub run_env: Option<RunEnv>,
    /// `SCHED_BATCH` for init and so for the function ([`crate::SandboxSpec::batch_scheduling`]).
    pub batch_scheduling: bool,
    /// The CPUs init may run on ([`crate::SandboxSpec::cpus`]).
    pub cpus: Option<nix::sched::CpuSet>,
}

/// Buffers the parent allocated for a reusable sandbox's per-run variables: `cap` bytes for
/// the `NAME=value\0` entries, and an envp of `envp_cap` pointers (the spec's variables, the
/// run's, a NULL). In the child they are init's own copy, referenced by nothing else.
pub struct RunEnv {
    pub buf: *mut u8,
    pub cap: usize,
    pub envp: *mut *const libc::c_char,
    pub envp_cap: usize,
}

/// A buffer the parent allocated for one environment entry whose value comes with the start
/// message. In the child it is our own copy of the parent's memory, referenced by nothing else.
pub struct LateEnv {
    pub ptr: *mut u8,
    /// Length of `NAME=`.
    pub prefix: usize,
    pub cap: usize,
}

fn fail(p: &Prepared, kind: u32, step: Step, index: u32, errno: Errno) -> ! {
    record_failure(p, kind, step, index, errno);
    sys::exit_now(1)
}

fn record_failure(p: &Prepared, kind: u32, step: Step, index: u32, errno: Errno) {
    let mut rec = [0u8; RECORD_LEN];
    rec[0..4].copy_from_slice(&kind.to_ne_bytes());
    rec[4..8].copy_from_slice(&(step as u32).to_ne_bytes());
    rec[8..12].copy_from_slice(&index.to_ne_bytes());
    rec[12..16].copy_from_slice(&(errno as i32).to_ne_bytes());
    sys::write_record(p.report_fd, &rec);
}

fn check(p: &Prepared, step: Step, ret: libc::c_int) {
    if ret < 0 {
        fail(p, KIND_STEP, step, 0, Errno::last());
    }
}

fn check_r<T>(p: &Prepared, step: Step, r: Result<T, Errno>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => fail(p, KIND_STEP, step, 0, e),
    }
}

/// Entry of the cloned child. Never returns.
pub fn run(p: &Prepared) -> ! {
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0) };
    // Cosmetic (ps, pgrep): best effort.
    let _ = sys::set_name(c"fnlet-init");
    if let Some(fd) = p.netns_fd {
        // SAFETY: fd is a network namespace the parent opened for us; setns only changes this
        // process's namespace. close_all_but closes it below.
        check(p, Step::JoinNetns, unsafe {
            libc::setns(fd, libc::CLONE_NEWNET)
        });
    }
    // First of all, let go of every fd of the agent's we do not need. Other sandboxes' pipes,
    // copied by our clone, would otherwise stay open here: their EOF would wait for us (for as
    // long as a prepared sandbox waits to be started).
    close_all_but(p);
    // With a user namespace: the bind sources opened before the fs ids change, by op index.
    let mut bind_sources: [RawFd; MAX_PLAN_OPS] = [-1; MAX_PLAN_OPS];
    if let Some(fd) = p.go_fd {
        // No byte: the parent gave up on us (it reports its own error).
        if !read_one_byte(fd) {
            sys::exit_now(1);
        }
        // SAFETY: fd is ours and no longer needed.
        unsafe { libc::close(fd) };
        // The bind sources first, while lookups are still the host root's (see
        // Plan::open_sources); -1: no descriptor, the op uses its path.
        if let Err((step, index, errno)) = p.plan.open_sources(&mut bind_sources) {
            fail(p, KIND_PLAN, step, index, errno);
        }
        // Our own uid (the host's root) has no mapping in the new namespace, and the kernel
        // will not create files for an unmapped owner: build the root as the function's ids.
        // CAP_SYS_ADMIN (for the mounts) survives the fs id change.
        sys::set_fs_ids(p.uid, p.gid);
    }
    if p.die_with_parent {
        check_r(
            p,
            Step::SetDumpable,
            sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong),
        );
    }

    // Join the cgroup first, so the new cgroup namespace is rooted at it.
    for (i, f) in p.join_files.iter().enumerate() {
        // SAFETY: f is NUL-terminated; the fd is closed below.
        let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        // SAFETY: writing two bytes from a static buffer to our own fd.
        if fd < 0 || unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) } < 0 {
            fail(p, KIND_STEP, Step::JoinCgroup, i as u32, Errno::last());
        }
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
    // SAFETY: unshare only affects this process.
    check(p, Step::UnshareCgroupNs, unsafe {
        libc::unshare(libc::CLONE_NEWCGROUP)
    });

    let sources = p.go_fd.map(|_| &bind_sources[..]);
    if let Err((step, index, errno)) = p.plan.run(sources) {
        fail(p, KIND_PLAN, step, index, errno);
    }
    for &fd in bind_sources.iter().filter(|&&fd| fd >= 0) {
        // SAFETY: opened by open_sources above, ours, no longer needed.
        unsafe { libc::close(fd) };
    }

    // SAFETY: the hostname buffer is valid for its length.
    check(p, Step::SetHostname, unsafe {
        libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len())
    });
    if p.netns_fd.is_none() {
        check_r(p, Step::LoopbackUp, sys::loopback_up());
    }

    for (i, &(resource, value)) in p.rlimits.iter().enumerate() {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: lim is a valid rlimit.
        if unsafe { libc::setrlimit(resource, &lim) } < 0 {
            fail(p, KIND_STEP, Step::SetRlimit, i as u32, Errno::last());
        }
    }

    if p.batch_scheduling {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is this process; param is a valid sched_param for SCHED_BATCH.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } < 0 {
            fail(p, KIND_STEP, Step::SetScheduler, 0, Errno::last());
        }
    }

    if let Some(cpus) = &p.cpus
        && let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), cpus)
    {
        fail(p, KIND_STEP, Step::SetAffinity, 0, e);
    }

    drop_privileges(p);

    // Block what init waits for, before the function exists, so no signal is lost.
    // SAFETY: the sigset was built by the parent with sigemptyset/sigaddset.
    check(p, Step::BlockSignals, unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &p.signals, std::ptr::null_mut())
    });
    // SAFETY: restoring the default SIGCHLD disposition (the agent may have changed it).
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };

    check_r(p, Step::Seccomp, sys::seccomp_load(p.bpf));
    if let Some(bpf) = p.connect_bpf {
        let fd = check_r(p, Step::Seccomp, sys::seccomp_load_listener(bpf));
        p.connect_listener.store(fd, Ordering::SeqCst);
    }
    if let (true, Some(control)) = (p.reusable, p.start_fd) {
        serve(p, control)
    }

    // The function's process exists before a prepared sandbox waits for its start, so a start
    // costs only the exec. It shares this process's memory until then (this process waits): a
    // fork would copy the page tables of everything the agent maps, and its exec would then
    // free that copy on the start's path (measured: +0.6 ms from a 20 MB parent).
    match sys::spawn_sharing_memory(p, function_process) {
        Err(e) => fail(p, KIND_STEP, Step::ForkWorker, 0, e),
        Ok(pid) => {
            // The function has exec'd (or exited): the caller took the listener after the
            // ready report, and init keeps no copy of it (with none left, a connect the
            // caller no longer answers fails instead of waiting).
            let fd = p.connect_listener.load(Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: the listener fd is ours; nothing uses it after this point.
                unsafe { libc::close(fd) };
            }
            init(p, pid)
        }
    }
}

/// The function's process, in the memory of init (which waits until it execs): set up its
/// stdio, signals and cwd, wait for a prepared sandbox's start, exec.
fn function_process(p: &Prepared) -> ! {
    worker_setup(p, &p.stdio);
    if let Some(fd) = p.start_fd {
        // Cosmetic (ps, pgrep), until the exec names it.
        let _ = sys::set_name(c"fnlet-start");
        wait_for_start(p, fd);
    }
    worker_exec(p, p.envp.as_ptr())
}

/// A prepared sandbox's function process: report ready, then wait for the start message on
/// `fd` (one length byte, then that many bytes of the late variable's value).
fn wait_for_start(p: &Prepared, fd: RawFd) {
    report_ready(p);
    let mut len = [0u8; 1];
    if !read_exact(fd, &mut len) {
        sys::exit_now(1);
    }
    let mut value = [0u8; 255];
    let value = &mut value[..usize::from(len[0])];
    if !read_exact(fd, value) {
        sys::exit_now(1);
    }
    set_late_value(p, value);
    // SAFETY: fd is ours and no longer needed.
    unsafe { libc::close(fd) };
}

/// Tells the parent the sandbox is ready for its start.
fn report_ready(p: &Prepared) {
    let mut rec = [0u8; RECORD_LEN];
    rec[0..4].copy_from_slice(&KIND_READY.to_ne_bytes());
    // The index field: the connect listener's fd in init (0: none; fds 0-2 are stdio).
    let listener = p.connect_listener.load(Ordering::SeqCst).max(0) as u32;
    rec[8..12].copy_from_slice(&listener.to_ne_bytes());
    sys::write_record(p.report_fd, &rec);
}

/// Writes `value` (cut to the room there is) after `NAME=` in the late variable's buffer.
fn set_late_value(p: &Prepared, value: &[u8]) {
    if let Some(slot) = &p.late_env {
        let want = value.len().min(slot.cap - slot.prefix - 1);
        // SAFETY: ptr..ptr+cap is the buffer the parent allocated for this entry; the range
        // written stays inside it, and no Rust reference to it exists in this process (the
        // function's process reads it through envp only after this write, at its exec).
        let dest = unsafe { std::slice::from_raw_parts_mut(slot.ptr.add(slot.prefix), want + 1) };
        dest[..want].copy_from_slice(&value[..want]);
        dest[want] = 0;
    }
}

/// One run of a reusable sandbox: the function's process with the run's stdio and variables.
struct Run<'a> {
    p: &'a Prepared,
    stdio: [Option<RawFd>; 3],
    envp: *const *const libc::c_char,
}

fn run_process(run: &Run<'_>) -> ! {
    worker_setup(run.p, &run.stdio);
    worker_exec(run.p, run.envp)
}

/// A `NAME=value` entry's name.
fn name_of(entry: &[u8]) -> &[u8] {
    entry.split(|&b| b == b'=').next().unwrap_or(entry)
}

/// The run's envp: the spec's variables but those `extra` names again, then `extra`'s entries
/// (`NAME=value\0` each), copied into the run buffers. None when they do not fit.
fn run_envp(p: &Prepared, extra: &[u8]) -> Option<*const *const libc::c_char> {
    let Some(r) = &p.run_env else {
        return extra.is_empty().then_some(p.envp.as_ptr());
    };
    if extra.len() > r.cap || extra.last().is_some_and(|&b| b != 0) {
        return None;
    }
    // SAFETY: buf..buf+cap and envp..envp+envp_cap are the buffers the parent allocated for
    // this; init alone writes them, before the run's process exists, and no Rust reference
    // to them lives in this process.
    let (buf, envp) = unsafe {
        (
            std::slice::from_raw_parts_mut(r.buf, r.cap),
            std::slice::from_raw_parts_mut(r.envp, r.envp_cap),
        )
    };
    buf[..extra.len()].copy_from_slice(extra);
    let entries = &buf[..extra.len()];
    let overridden = |name: &[u8]| {
        entries
            .split(|&b| b == 0)
            .any(|e| !e.is_empty() && name_of(e) == name)
    };
    let mut n = 0;
    for &base in p.envp.iter().take_while(|e| !e.is_null()) {
        // SAFETY: a NUL-terminated entry of the spec's envp, alive as long as `p`.
        let entry = unsafe { std::ffi::CStr::from_ptr(base) }.to_bytes();
        if !overridden(name_of(entry)) && n + 1 < envp.len() {
            envp[n] = base;
            n += 1;
        }
    }
    let mut start = 0;
    for (i, &b) in entries.iter().enumerate() {
        if b == 0 {
            if i > start {
                if n + 1 >= envp.len() {
                    return None;
                }
                envp[n] = entries[start..].as_ptr().cast();
                n += 1;
            }
            start = i + 1;
        }
    }
    envp[n] = std::ptr::null();
    Some(envp.as_ptr())
}

/// pid 1 of a reusable sandbox. Reports ready, then for each message on `control` (one length
/// byte, the late variable's value, and the run's stdin, stdout and stderr as `SCM_RIGHTS`):
/// runs the function in a new process, waits for it (forwarding signals), kills and reaps
/// whatever the run left behind, and writes the run's wait status on the status pipe. A run
/// whose process could not be made or exec'd leaves a failure record on the report pipe (kept
/// open for that) and exit status 127. EOF on `control`: the owner is done with the sandbox.
fn serve(p: &Prepared, control: RawFd) -> ! {
    report_ready(p);
    // Keep the report and status pipes and the control socket; 0-2 are the agent's.
    for fd in 0..3 {
        if fd != p.report_fd && fd != p.status_fd && fd != control {
            // SAFETY: closing a descriptor of ours that nothing here uses.
            unsafe { libc::close(fd) };
        }
    }
    loop {
        let Some((stdio, envp)) = receive_run(p, control) else {
            sys::exit_now(0)
        };
        // A signal meant for the last run must not reach this one.
        drain_signals(p);
        let run = Run {
            p,
            stdio: stdio.map(Some),
            envp,
        };
        let spawned = sys::spawn_sharing_memory(&run, run_process);
        for fd in stdio {
            // SAFETY: received for this run; the function's process has its own copies now,
            // and ours must go for the parent to see EOF on stdout and stderr.
            unsafe { libc::close(fd) };
        }
        let status = match spawned {
            Ok(pid) => wait_for(p, pid),
            Err(e) => {
                record_failure(p, KIND_STEP, Step::ForkWorker, 0, e);
                127 << 8
            }
        };
        kill_leftovers();
        sys::write_record(p.status_fd, &status.to_ne_bytes());
    }
}

/// Receives a run's message (see [`serve`]) and sets the late variable and the run's own
/// variables; the run's stdio, each above 2, and its envp. None when the owner closed the
/// socket, or sent something else.
fn receive_run(p: &Prepared, control: RawFd) -> Option<([RawFd; 3], *const *const libc::c_char)> {
    let mut data = [0u8; 256 + crate::image::RUN_ENV_CAP];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for a header and three descriptors (CMSG_SPACE(12) is 32 on 64-bit), aligned.
    let mut control_buf = [0u64; 8];
    // SAFETY: msghdr is plain data; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control_buf);
    let n = loop {
        // SAFETY: msg points at live buffers of the sizes it gives.
        let n = unsafe { libc::recvmsg(control, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || Errno::last() != Errno::EINTR {
            break n;
        }
    };
    let mut fds = [-1; 3];
    let mut got = 0;
    // SAFETY: msg was filled by recvmsg; the CMSG_* walk stays inside msg_control.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while n > 0 && !cmsg.is_null() {
        // SAFETY: cmsg points at a header inside msg_control (CMSG_FIRSTHDR/NXTHDR).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: computes a length, touches no memory.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (header.cmsg_len as usize).saturating_sub(head) / 4;
            // SAFETY: the data of an SCM_RIGHTS header is `count` ints.
            let first = unsafe { libc::CMSG_DATA(cmsg) } as *const libc::c_int;
            for i in 0..count {
                // SAFETY: i < count, inside this header's data; may be unaligned.
                let fd = unsafe { first.add(i).read_unaligned() };
                if got < fds.len() {
                    fds[got] = fd;
                    got += 1;
                } else {
                    // SAFETY: a descriptor just received, ours, unused.
                    unsafe { libc::close(fd) };
                }
            }
        }
        // SAFETY: as CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    let len = usize::from(data[0]);
    let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    if n <= 0 || truncated || got != fds.len() || 1 + len > n as usize {
        for &fd in &fds[..got] {
            // SAFETY: received above, ours.
            unsafe { libc::close(fd) };
        }
        return None;
    }
    // The function's process dup2()s them onto 0-2: none may sit there already.
    for fd in fds.iter_mut() {
        if *fd <= 2 {
            // SAFETY: duplicating a descriptor of ours above 2, then closing the original.
            let moved = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3) };
            // SAFETY: ours.
            unsafe { libc::close(*fd) };
            *fd = moved;
        }
    }
    if fds.iter().any(|&fd| fd < 0) {
        return None;
    }
    let Some(envp) = run_envp(p, &data[1 + len..n as usize]) else {
        for fd in fds {
            // SAFETY: received above, ours.
            unsafe { libc::close(fd) };
        }
        return None;
    };
    set_late_value(p, &data[1..1 + len]);
    Some((fds, envp))
}

/// Discards the signals pending for init (those it forwards and SIGCHLD).
fn drain_signals(p: &Prepared) {
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the set is valid and blocked here; a null siginfo is allowed.
    while unsafe { libc::sigtimedwait(&p.signals, std::ptr::null_mut(), &now) } > 0 {}
}

/// Kills every other process of the pid namespace and reaps them (orphans are init's), until
/// none is left: nothing a run started outlives it.
fn kill_leftovers() {
    loop {
        // SAFETY: from pid 1, kill(-1) signals every other process of this pid namespace.
        let r = unsafe { libc::kill(-1, libc::SIGKILL) };
        loop {
            let mut status = 0;
            // SAFETY: status is a valid out-pointer.
            let w = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
            if w > 0 || (w < 0 && Errno::last() == Errno::EINTR) {
                continue;
            }
            break;
        }
        if r < 0 {
            return;
        }
    }
}

/// Closes every fd above 2 except the ones `p` names. No allocation: a fixed, sorted array.
fn close_all_but(p: &Prepared) {
    let mut keep = [-1i32; 8];
    let mut n = 0;
    for fd in [
        Some(p.report_fd),
        Some(p.status_fd),
        p.go_fd,
        p.start_fd,
        p.stdio[0],
        p.stdio[1],
        p.stdio[2],
    ]
    .into_iter()
    .flatten()
    {
        if fd > 2 && n < keep.len() {
            keep[n] = fd;
            n += 1;
        }
    }
    let keep = &mut keep[..n];
    keep.sort_unstable();
    let mut next: u32 = 3;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > next {
            let _ = sys::close_range(next, fd - 1, 0);
        }
        next = next.max(fd + 1);
    }
    let _ = sys::close_range(next, u32::MAX, 0);
}

/// Blocks until one byte arrives on `fd`; false on EOF or error (the parent is gone or gave up).
fn read_one_byte(fd: RawFd) -> bool {
    read_exact(fd, &mut [0u8; 1])
}

/// Fills `buf` from `fd`; false on EOF or error.
fn read_exact(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled tail of a live buffer from our own fd.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || Errno::last() != Errno::EINTR {
            return false;
        }
    }
    true
}

fn drop_privileges(p: &Prepared) {
    // Raw syscalls, not glibc's wrappers: those can hang in a child of a threaded process.
    check_r(p, Step::SetGroups, sys::clear_groups());
    check_r(p, Step::SetGid, sys::setresgid(p.gid));
    // The bounding set needs CAP_SETPCAP, so it goes before the uid change.
    for &cap in &p.bounding {
        check_r(
            p,
            Step::DropCapabilities,
            caps::drop(None, caps::CapSet::Bounding, cap).map_err(|_| Errno::last()),
        );
    }
    for &cap in &p.bounding_extra {
        check_r(p, Step::DropCapabilities, sys::capbset_drop(cap));
    }
    check_r(
        p,
        Step::DropCapabilities,
        caps::clear(None, caps::CapSet::Ambient).map_err(|_| Errno::last()),
    );
    check_r(
        p,
        Step::DropCapabilities,
        caps::clear(None, caps::CapSet::Inheritable).map_err(|_| Errno::last()),
    );
    // Leaving uid 0 without SECBIT_KEEP_CAPS empties permitted and effective.
    check_r(p, Step::SetUid, sys::setresuid(p.uid));
    check_r(
        p,
        Step::DropCapabilities,
        caps::clear(None, caps::CapSet::Permitted).map_err(|_| Errno::last()),
    );
    check_r(
        p,
        Step::NoNewPrivs,
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1),
    );
    // Keeps the function (same uid) out of init's /proc entries and memory.
    check_r(p, Step::SetDumpable, sys::prctl(libc::PR_SET_DUMPABLE, 0));
}

/// The function process, before its exec: stdio, a clean signal state, the working directory.
fn worker_setup(p: &Prepared, stdio: &[Option<RawFd>; 3]) {
    // Ignored signals stay ignored across exec (Rust ignores SIGPIPE): reset them, before
    // unblocking anything, so no handler of the agent's ever runs in this process (it shares
    // init's memory until the exec).
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: setting a default disposition is always valid.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: an empty set unblocks everything; exec keeps the mask, so it must be clean.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    for (target, src) in stdio.iter().enumerate() {
        if let Some(src) = *src {
            // SAFETY: src is an open fd (>= 3) prepared by the parent.
            check(p, Step::Stdio, unsafe {
                libc::dup2(src, target as libc::c_int)
            });
        }
    }
    // Nothing of the agent's may reach the function: every other fd closes at exec.
    check_r(
        p,
        Step::Stdio,
        sys::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC),
    );
    // SAFETY: cwd is NUL-terminated.
    check(p, Step::Chdir, unsafe { libc::chdir(p.cwd.as_ptr()) });
}

/// The function process: exec the program with `envp`.
fn worker_exec(p: &Prepared, envp: *const *const libc::c_char) -> ! {
    let mut first_err: Option<(u32, Errno)> = None;
    for (i, path) in p.exec_paths.iter().enumerate() {
        // SAFETY: argv and envp are NULL-terminated arrays of pointers into CStrings the parent
        // keeps alive in `Prepared` (a run's envp: into the run buffers, see `run_envp`).
        unsafe { libc::execve(path.as_ptr(), p.argv.as_ptr(), envp) };
        let e = Errno::last();
        // Like execvpe: keep searching PATH past "not here", but report the first real error.
        let not_here = |e: Errno| matches!(e, Errno::ENOENT | Errno::ENOTDIR);
        match first_err {
            None => first_err = Some((i as u32, e)),
            Some((_, prev)) if not_here(prev) && !not_here(e) => first_err = Some((i as u32, e)),
            _ => {}
        }
        if !matches!(e, Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES) {
            break;
        }
    }
    let (index, errno) = first_err.unwrap_or((0, Errno::ENOENT));
    fail(p, KIND_STEP, Step::Exec, index, errno)
}

/// pid 1: reap, forward, report.
fn init(p: &Prepared, worker: libc::pid_t) -> ! {
    // Keep only the status pipe. The function's exec makes the report pipe's other copy go away,
    // and this copy must go too so the parent sees EOF.
    let keep = p.status_fd as u32;
    if keep > 0 {
        let _ = sys::close_range(0, keep - 1, 0);
    }
    let _ = sys::close_range(keep + 1, u32::MAX, 0);
    let status = wait_for(p, worker);
    sys::write_record(p.status_fd, &status.to_ne_bytes());
    sys::exit_now(0)
}

/// Waits for `worker` to end, reaping every other child on the way and forwarding the
/// signals init receives to it; its wait status.
fn wait_for(p: &Prepared, worker: libc::pid_t) -> i32 {
    loop {
        // SAFETY: siginfo is plain data filled by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set is valid and blocked in this process.
        let sig = unsafe { libc::sigwaitinfo(&p.signals, &mut info) };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: status is a valid out-pointer.
                let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if r == worker {
                    return status;
                }
                if r <= 0 {
                    break;
                }
            }
        } else if sig == p.cancel {
            // The owner ends the run: its process first; kill_leftovers does the rest.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(worker, libc::SIGKILL) };
        } else if sig > 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(worker, sig) };
        }
    }
}
