//! isolate: run one program as a sandboxed function instance.
//!
//! ```no_run
//! # async fn demo() -> isolate::Result<()> {
//! use isolate::{Isolator, IsolatorConfig, SandboxSpec};
//! let isolator = Isolator::new(IsolatorConfig::default())?;
//! let spec = SandboxSpec { program: "/var/task/bootstrap".into(), bundle: Some("/srv/fn".into()), ..Default::default() };
//! let mut sandbox = isolator.spawn(&spec)?;
//! let outcome = sandbox.wait().await?;
//! println!("{:?}, peak {:?} bytes", outcome.status, outcome.peak_memory_bytes);
//! # Ok(()) }
//! ```
//!
//! Each sandbox is a process in new pid, mount, ipc, uts, cgroup and network namespaces (only
//! `lo`, up), in its own cgroup (memory with swap off, cpu, pids), with a fresh read-only root
//! (pivot_root) holding the bundle at /var/task, read-only host runtime directories, a masked
//! /proc, a minimal /dev and a size-limited /tmp. It runs as an unprivileged uid with no
//! supplementary groups, every capability dropped from all five sets, no_new_privs and a seccomp
//! filter.
//!
//! **pid 1:** the function does not run as pid 1. A small init (a fork of the spawning process,
//! or of its [`spawner`] helper; no exec) is pid 1: it reaps zombies, forwards SIGTERM/SIGINT/
//! SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2/SIGWINCH/SIGCONT, and reports the function's exit status. When
//! the function exits, the init exits and the kernel kills whatever else is left in the pid
//! namespace.
//!
//! [`Isolator::prepare`] builds a sandbox ahead of time (everything but the function's exec),
//! and [`PreparedSandbox::start`] runs the function in it: a cold start then costs little more
//! than fork and exec. With [`SandboxSpec::reusable`], [`PreparedSandbox::into_reusable`] gives
//! a [`ReusableSandbox`] instead: its init stays and runs the function again for each
//! [`ReusableSandbox::run`], a new process with pipes and variables of its own, and kills
//! whatever a run left before it says the run ended. With [`SandboxSpec::user_namespace`] the
//! sandbox also gets a user namespace in which only the function's uid and gid exist.
//!
//! All `unsafe` code of fnlet lives in this crate.

pub mod cgroup;
mod child;
mod error;
mod image;
mod netns;
mod notify;
mod rootfs;
pub mod seccomp;
pub mod spawner;
mod spec;
pub mod steps;
mod sys;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use cgroup::{CgroupMode, CgroupUsage, CgroupVersion, PeakMemory};
pub use error::{IsolateError, Result, Step};
pub use image::cpu_set;
pub use notify::{Answer as ConnectAnswer, ConnectNotifier};
pub use spec::{
    Bind, Limits, SandboxSpec, Stdio, StdioSpec, TASK_ROOT, bind_dest_allowed,
    default_runtime_binds,
};

use rootfs::Plan;

/// How an [`Isolator`] finds and names its cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IsolatorConfig {
    /// Our root below each hierarchy's mount, e.g. `fnlet`; or `"auto"`: under systemd with
    /// `Delegate=yes`, the unit's delegated subtree (this process then moves itself into
    /// `<unit>/agent` and sandboxes go to `<unit>/instances`), else `fnlet`. See
    /// [`cgroup::host`].
    pub cgroup_root: String,
    pub cgroup_mode: CgroupMode,
    /// When the hierarchy lacks a controller a limit needs (a container's delegated cgroup2 tree
    /// on a hybrid host has none), run sandboxes without that limit instead of refusing them;
    /// [`Isolator::missing_controllers`] says which. Off by default.
    pub best_effort_limits: bool,
    /// How many network namespaces (lo up) to keep made ahead of spawns, by a thread that
    /// starts at the first spawn; 0: every spawn creates its own. A sandbox with a user
    /// namespace always creates its own (it may not join one the host's root owns).
    pub netns_pool: usize,
}

impl Default for IsolatorConfig {
    fn default() -> Self {
        IsolatorConfig {
            cgroup_root: "fnlet".into(),
            cgroup_mode: CgroupMode::Auto,
            best_effort_limits: false,
            netns_pool: 2,
        }
    }
}

/// Creates sandboxes. Holds what is the same for every spawn: the cgroup backend, the compiled
/// seccomp filter and the capability list.
#[derive(Debug)]
pub struct Isolator {
    cgroups: Box<dyn cgroup::CgroupBackend>,
    placement: cgroup::host::Placement,
    /// The capabilities a child drops from its bounding set ([`image::bounding_sets`]).
    bounding: (Vec<caps::Capability>, Vec<u8>),
    seq: AtomicU64,
    netns: netns::NetnsPool,
    /// Clones sandboxes when set ([`Isolator::use_spawner`]).
    spawner: Option<spawner::Spawner>,
}

/// How the function ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    fn from_raw(status: i32) -> ExitStatus {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        }
    }

    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// The shell's convention: the exit code, or 128 + signal.
    pub fn code(&self) -> i32 {
        match *self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }
}

/// How the function's own process ended ([`Sandbox::function_ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionEnd {
    pub status: ExitStatus,
    /// The memory cgroup killed something in the sandbox.
    pub oom_killed: bool,
}

/// What [`Sandbox::wait`] reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The memory cgroup killed something in the sandbox.
    pub oom_killed: bool,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time: Option<Duration>,
    pub wall_time: Duration,
}

impl Isolator {
    pub fn new(config: IsolatorConfig) -> Result<Isolator> {
        if !nix::unistd::geteuid().is_root() {
            return Err(IsolateError::sys(
                "creating sandboxes (needs root)",
                Errno::EPERM,
            ));
        }
        let cgroup::Placed {
            backend: cgroups,
            placement,
        } = cgroup::place(
            &config.cgroup_mode,
            &config.cgroup_root,
            config.best_effort_limits,
        )?;
        Ok(Isolator {
            cgroups,
            placement,
            bounding: image::bounding_sets(),
            seq: AtomicU64::new(0),
            netns: netns::NetnsPool::new(config.netns_pool),
            spawner: None,
        })
    }

    /// Clones every sandbox from now on through `spawner` (see [`spawner`]): the calling
    /// process's fork, its page tables and copy-on-write faults, leave the spawn path. Under a
    /// delegated cgroup the helper joins this process's leaf, as it must.
    pub fn use_spawner(&mut self, spawner: spawner::Spawner) -> Result<()> {
        if let Some(leaf) = &self.placement.move_self_to {
            cgroup::move_pid(leaf, spawner.pid())?;
        }
        self.spawner = Some(spawner);
        Ok(())
    }

    /// The spawn helper's pid, while one clones this isolator's sandboxes.
    pub fn spawner_pid(&self) -> Option<u32> {
        self.spawner.as_ref().filter(|s| s.alive()).map(|s| s.pid())
    }

    /// How many lost spawn helpers were replaced ([`spawner::Spawner::relaunch_with`]).
    pub fn spawner_restarts(&self) -> u64 {
        self.spawner.as_ref().map_or(0, |s| s.restarts())
    }

    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups.version()
    }

    /// Where this isolator's cgroups live.
    pub fn cgroup_root(&self) -> String {
        self.cgroups.root_display()
    }

    /// How the cgroup placement was chosen (delegation, notes for the operator).
    pub fn cgroup_placement(&self) -> &cgroup::host::Placement {
        &self.placement
    }

    /// Controllers the limits need that this host does not give us (only non-empty with
    /// [`IsolatorConfig::best_effort_limits`]: otherwise spawns needing them fail).
    pub fn missing_controllers(&self) -> Vec<&'static str> {
        self.cgroups.missing_controllers()
    }

    /// Kills and removes every sandbox cgroup under our root: what a crashed predecessor left.
    /// Only the root's owner may call it (see [`Isolator::root_dir`]): under a root another
    /// live process uses, its sandboxes are killed too.
    pub fn reap_stale(&self) -> Result<usize> {
        self.cgroups.reap_stale()
    }

    /// The directory that stands for our cgroup root (the root in the first hierarchy),
    /// created if missing. Whoever holds an exclusive lock (flock) on it owns the root, as
    /// the agent does for its whole life; the lock lives with the cgroup tree itself, so no
    /// other file has to outlive anything for it to hold.
    pub fn root_dir(&self) -> Result<std::path::PathBuf> {
        self.cgroups.root_dir()
    }

    /// How many network namespaces are made ahead now ([`IsolatorConfig::netns_pool`]).
    pub fn netns_ready(&self) -> usize {
        self.netns.ready()
    }

    /// Removes our (empty) cgroup root; call at shutdown.
    pub fn remove_root(&self) -> Result<()> {
        self.cgroups.remove_root()
    }

    /// Starts a sandbox. Returns once the function has been exec'd, or with the step that failed.
    pub fn spawn(&self, spec: &SandboxSpec) -> Result<Sandbox> {
        if spec.loopback_listener.is_some() || spec.loopback_socketpair.is_some() {
            // The listener (or the connect filter's listener) must be ours before the function
            // runs: hold the child at the exec while it is made. A plain spawn has no late
            // variable.
            let spec = SandboxSpec {
                late_env: None,
                ..spec.clone()
            };
            return self.prepare(&spec)?.start(None);
        }
        let (sandbox, mut pending) = self.launch(spec, false)?;
        pending.finish(sandbox, Report::Exec)
    }

    /// Builds a sandbox ahead of time: namespaces, cgroup, root, privileges dropped, seccomp
    /// loaded, everything but the function itself, whose exec waits for
    /// [`PreparedSandbox::start`]. Cold starts then pay little more than fork and exec.
    pub fn prepare(&self, spec: &SandboxSpec) -> Result<PreparedSandbox> {
        let (sandbox, mut pending) = self.launch(spec, true)?;
        let mut sandbox = pending.finish(sandbox, Report::Ready)?;
        if let (Some(port), Some(fd)) = (spec.loopback_socketpair, pending.connect_listener) {
            // Init holds the listener until the function's exec; a copy of ours outlives it.
            let taken = sys::pidfd_getfd(sandbox.pidfd.as_fd(), fd)
                .map_err(|e| IsolateError::sys("pidfd_getfd (connect listener)", e))?;
            sandbox.connect_notifier = Some(ConnectNotifier::new(taken, port));
        }
        if let Some(port) = spec.loopback_listener {
            // The child is held before its exec, its loopback already up. On failure the
            // sandbox's drop kills it and removes its cgroup.
            sandbox.listener = Some(netns::loopback_listener(sandbox.pid, port)?);
        }
        Ok(PreparedSandbox {
            sandbox: Some(sandbox),
            pending,
        })
    }

    /// Creates the cgroup and clones the child; the caller waits for its report.
    fn launch(&self, spec: &SandboxSpec, hold: bool) -> Result<(Sandbox, Pending)> {
        spec.validate()?;
        let plan = Plan::build(spec)?;
        let leaf = format!(
            "{}-{}-{}",
            spec.name,
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let mut cgroup = self.cgroups.create(&leaf, &spec.limits)?;
        match self.spawn_in(spec, plan, cgroup.as_ref(), hold) {
            Ok((mut sb, pending)) => {
                sb.cgroup = Some(cgroup);
                Ok((sb, pending))
            }
            Err(e) => {
                let _ = cgroup.kill_all();
                let _ = cgroup.remove();
                Err(e)
            }
        }
    }

    fn spawn_in(
        &self,
        spec: &SandboxSpec,
        plan: Plan,
        cgroup: &dyn cgroup::SandboxCgroup,
        hold: bool,
    ) -> Result<(Sandbox, Pending)> {
        let started = Instant::now();
        // A reusable sandbox's runs bring their own stdio; its init keeps none.
        let reusable = hold && spec.reusable;
        let stdio = match reusable {
            true => StdioSpec {
                stdin: Stdio::Inherit,
                stdout: Stdio::Inherit,
                stderr: Stdio::Inherit,
            },
            false => spec.stdio,
        };
        let (stdin_child, stdin_parent) = stdio_pair(stdio.stdin, true)?;
        let (stdout_child, stdout_parent) = stdio_pair(stdio.stdout, false)?;
        let (stderr_child, stderr_parent) = stdio_pair(stdio.stderr, false)?;
        let (report_r, report_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        // With a user namespace the child cannot join its cgroup itself (cgroupfs belongs to the
        // host's root): the parent joins it and writes the id maps, then says go.
        let userns = spec.user_namespace;
        let (go_r, go_w) = if userns {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        // A network namespace made ahead, joined by the child instead of a CLONE_NEWNET.
        let netns = if userns { None } else { self.netns.take() };
        let (start_r, start_w) = if reusable {
            let (r, w) = seqpacket_pair()?;
            (Some(r), Some(w))
        } else if hold {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let join_files: Vec<CString> = if userns {
            Vec::new()
        } else {
            cgroup.join_files()
        }
        .iter()
        .map(|p| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| IsolateError::Protocol("cgroup path"))
        })
        .collect::<Result<_>>()?;
        let raw = |f: &Option<OwnedFd>| f.as_ref().map(|f| f.as_raw_fd());
        let fds = image::ChildFds {
            stdio: [raw(&stdin_child), raw(&stdout_child), raw(&stderr_child)],
            report: report_w.as_raw_fd(),
            status: status_w.as_raw_fd(),
            go: raw(&go_r),
            netns: raw(&netns),
            start: raw(&start_r),
        };
        let userns_flag = if userns {
            libc::CLONE_NEWUSER as u64
        } else {
            0
        };
        let netns_flag = if netns.is_some() {
            0
        } else {
            libc::CLONE_NEWNET as u64
        };
        let flags = userns_flag
            | netns_flag
            | (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
                as u64;

        // The clone: by the spawn helper when there is one (a small single-threaded process
        // whose fork costs little; the child is still ours), else here.
        let mut cloned = None;
        if let Some(spawner) = &self.spawner {
            let request = spawner::CloneRequest {
                spec,
                plan: &plan,
                join_files: &join_files,
                hold,
                flags,
            };
            match spawner.clone_sandbox(&request, &fds, cgroup.clone_into_fd()) {
                Ok((pid, pidfd)) => cloned = Some((pid, pidfd)),
                Err(spawner::HelperError::Failed(e)) => return Err(e),
                Err(spawner::HelperError::NotSent) => {}
            }
        }
        let (pid, pidfd, decoder) = match cloned {
            Some((pid, pidfd)) => {
                let decoder = Decoder {
                    plan,
                    exec_paths: image::exec_paths(spec)?,
                    join_files,
                    rlimits: image::rlimits(spec),
                    cwd: spec.cwd.clone(),
                    name: spec.name.clone(),
                };
                (pid, pidfd, decoder)
            }
            None => {
                let image =
                    image::ChildImage::new(spec, hold, plan, join_files, &self.bounding, fds)?;
                let (pid, pidfd) = image.clone_child(flags, cgroup.clone_into_fd())?;
                let rlimits = image.prepared.rlimits.clone();
                let (plan, exec_paths, join_files) = image.into_parts();
                let decoder = Decoder {
                    plan,
                    exec_paths,
                    join_files,
                    rlimits,
                    cwd: spec.cwd.clone(),
                    name: spec.name.clone(),
                };
                (pid, pidfd, decoder)
            }
        };
        let pidfd = match pidfd {
            Some(fd) => fd,
            None => sys::pidfd_open(pid).map_err(|e| IsolateError::sys("pidfd_open", e))?,
        };
        // Our copies of the child's ends must close, or the pipes never report EOF.
        drop((
            report_w,
            status_w,
            stdin_child,
            stdout_child,
            stderr_child,
            go_r,
            start_r,
            netns,
        ));

        let mut sandbox = Sandbox {
            pid,
            pidfd,
            status_r,
            function_status: None,
            cgroup: None,
            stdin: stdin_parent,
            stdout: stdout_parent,
            stderr: stderr_parent,
            listener: None,
            connect_notifier: None,
            attached: Vec::new(),
            outcome: None,
            started,
        };
        if let Some(go) = go_w
            && let Err(e) = self.let_child_go(pid, spec, cgroup, go)
        {
            let _ = sandbox.kill();
            let _ = sandbox.reap_blocking();
            sandbox.outcome = Some(sandbox.outcome_placeholder());
            return Err(e);
        }
        let pending = Pending {
            report_r,
            start_w,
            decoder,
            connect_listener: None,
            reusable,
        };
        Ok((sandbox, pending))
    }
}

/// What the child reports on its report pipe.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    /// EOF: the function was exec'd.
    Exec,
    /// A prepared sandbox waits for its start.
    Ready,
}

/// The parent's end of a child still reporting, and what it needs to name a failure.
#[derive(Debug)]
struct Pending {
    report_r: OwnedFd,
    start_w: Option<OwnedFd>,
    decoder: Decoder,
    /// The connect filter's listener fd in the child, from its ready report.
    connect_listener: Option<RawFd>,
    /// `start_w` is a reusable sandbox's control socket ([`PreparedSandbox::into_reusable`]).
    reusable: bool,
}

#[derive(Debug)]
struct Decoder {
    plan: Plan,
    exec_paths: Vec<CString>,
    join_files: Vec<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    cwd: String,
    name: String,
}

impl Pending {
    /// Waits for the child's next report; on a failure (or an unexpected report) the sandbox is
    /// reaped and its cgroup removed (by its drop), and the step is named.
    fn finish(&mut self, mut sandbox: Sandbox, want: Report) -> Result<Sandbox> {
        match self.report(&mut sandbox) {
            Ok(r) if r == want => Ok(sandbox),
            Ok(_) => {
                let _ = sandbox.kill();
                Err(IsolateError::Protocol(
                    "unexpected report from sandbox child",
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn report(&mut self, sandbox: &mut Sandbox) -> Result<Report> {
        // Setup takes milliseconds; a child stuck far longer is killed rather than waited for.
        if !wait_readable(&self.report_r, SETUP_TIMEOUT)
            .map_err(|e| IsolateError::sys("poll sandbox report", e))?
        {
            let _ = sandbox.kill();
            let _ = sandbox.reap_blocking();
            sandbox.outcome = Some(sandbox.outcome_placeholder());
            return Err(IsolateError::SetupTimeout(SETUP_TIMEOUT));
        }
        match self.read_report()? {
            Ok(r) => Ok(r),
            Err(failed) => {
                // The child failed before exec: reap it and say where.
                let _ = sandbox.reap_blocking();
                sandbox.outcome = Some(sandbox.outcome_placeholder());
                Err(failed)
            }
        }
    }

    /// Reads a report that is there (or EOF): the outer error is the read's own, the inner one
    /// the failure the child reported.
    fn read_report(&mut self) -> Result<std::result::Result<Report, IsolateError>> {
        let mut rec = [0u8; child::RECORD_LEN];
        let n = read_full(&self.report_r, &mut rec)
            .map_err(|e| IsolateError::sys("read sandbox report", e))?;
        if n == 0 {
            return Ok(Ok(Report::Exec));
        }
        let word = |i: usize| u32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
        if n == child::RECORD_LEN && word(0) == child::KIND_READY {
            self.connect_listener = Some(word(8) as RawFd).filter(|&fd| fd > 0);
            return Ok(Ok(Report::Ready));
        }
        if n != child::RECORD_LEN {
            return Ok(Err(IsolateError::Protocol(
                "short failure record from sandbox child",
            )));
        }
        let (kind, step, index, errno) = (word(0), word(4), word(8) as usize, word(12) as i32);
        let Some(step) = Step::from_u32(step) else {
            return Ok(Err(IsolateError::Protocol(
                "unknown step in failure record",
            )));
        };
        Ok(Err(IsolateError::Child {
            step,
            detail: self.decoder.detail(kind, step, index),
            errno: Errno::from_raw(errno),
        }))
    }
}

/// The exec report of a sandbox started with [`PreparedSandbox::release`], for when the caller
/// needs it (its function ended early, say). Dropping it unread is fine.
#[derive(Debug)]
pub struct ExecReport {
    pending: Pending,
}

impl ExecReport {
    /// Whether the function was exec'd: `Ok` once it was, else the step that failed. Blocks
    /// until the child has reported (a sandbox that has ended has), at most the setup timeout.
    pub fn result(mut self) -> Result<()> {
        if !wait_readable(&self.pending.report_r, SETUP_TIMEOUT)
            .map_err(|e| IsolateError::sys("poll sandbox report", e))?
        {
            return Err(IsolateError::SetupTimeout(SETUP_TIMEOUT));
        }
        match self.pending.read_report()? {
            Ok(Report::Exec) => Ok(()),
            Ok(Report::Ready) => Err(IsolateError::Protocol(
                "unexpected report from sandbox child",
            )),
            Err(failed) => Err(failed),
        }
    }
}

impl Decoder {
    /// The path or value a failed step was working on.
    fn detail(&self, kind: u32, step: Step, index: usize) -> Option<String> {
        if kind == child::KIND_PLAN {
            return self.plan.describe(index);
        }
        let lossy = |c: &CString| c.to_string_lossy().into_owned();
        match step {
            Step::Exec => self.exec_paths.get(index).map(lossy),
            Step::JoinCgroup => self.join_files.get(index).map(lossy),
            Step::SetRlimit => Some(format!(
                "resource {}",
                self.rlimits.get(index).map_or(-1, |r| r.0 as i64)
            )),
            Step::Chdir => Some(self.cwd.clone()),
            Step::SetHostname => Some(self.name.clone()),
            _ => None,
        }
    }
}

/// A sandbox built ahead of time by [`Isolator::prepare`]; dropping it unused kills it and
/// removes its cgroup.
#[derive(Debug)]
pub struct PreparedSandbox {
    sandbox: Option<Sandbox>,
    pending: Pending,
}

impl PreparedSandbox {
    /// Host pid of the waiting init.
    pub fn pid(&self) -> u32 {
        self.sandbox.as_ref().map_or(0, |s| s.pid())
    }

    /// Runs `f` on a short-lived thread inside the sandbox's network namespace (to open a
    /// socket there, a netlink one say, that the caller then uses from anywhere) and returns
    /// what it returns. The caller's own threads never change namespace.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let pid = self
            .sandbox
            .as_ref()
            .ok_or(IsolateError::Protocol("prepared sandbox already started"))?
            .pid;
        netns::in_netns(pid, f)
    }

    /// The sandbox before it runs: its listener, pipes, pidfd watch and accounting files can
    /// be taken and wired up while nothing runs yet, so that nothing of that lies between the
    /// release and the function's first request.
    pub fn sandbox_mut(&mut self) -> Result<&mut Sandbox> {
        self.sandbox
            .as_mut()
            .ok_or(IsolateError::Protocol("prepared sandbox already started"))
    }

    /// Ties `what` to the sandbox: it is dropped once the sandbox has ended and its cgroup is
    /// gone (or with the sandbox, if it never starts). Host-side resources made for this
    /// sandbox (a veth, firewall entries) are released by its `Drop`.
    pub fn attach(&mut self, what: Box<dyn std::any::Any + Send + Sync>) {
        if let Some(s) = self.sandbox.as_mut() {
            s.attached.push(Attached(what));
        }
    }

    /// Execs the function, with the spec's `late_env` variable set to `late_value` (when the
    /// spec names one); returns once it runs, or with the step that failed.
    pub fn start(mut self, late_value: Option<&str>) -> Result<Sandbox> {
        let msg = self.start_message(late_value)?;
        let mut sandbox = self
            .sandbox
            .take()
            .ok_or(IsolateError::Protocol("prepared sandbox already started"))?;
        sandbox.started = Instant::now();
        let go = self
            .pending
            .start_w
            .take()
            .ok_or(IsolateError::Protocol("prepared sandbox already started"))?;
        if let Err(e) = write_all(&go, &msg) {
            let _ = sandbox.kill();
            return Err(IsolateError::sys("start prepared sandbox", e));
        }
        drop(go);
        self.pending.finish(sandbox, Report::Exec)
    }

    /// Execs the function like [`PreparedSandbox::start`] but returns at once, without waiting
    /// for the exec: for a caller that learns from the function itself that it runs (a Lambda
    /// runtime's first request), and reads the [`ExecReport`] only if the sandbox ends first.
    /// A failed exec ends the sandbox.
    pub fn release(self, late_value: Option<&str>) -> Result<(Sandbox, ExecReport)> {
        let msg = self.start_message(late_value)?;
        let PreparedSandbox {
            sandbox,
            mut pending,
        } = self;
        let mut sandbox =
            sandbox.ok_or(IsolateError::Protocol("prepared sandbox already started"))?;
        let go = pending
            .start_w
            .take()
            .ok_or(IsolateError::Protocol("prepared sandbox already started"))?;
        sandbox.started = Instant::now();
        // At most 201 bytes into an empty pipe: never blocks. On failure the sandbox's drop
        // kills it.
        write_all(&go, &msg).map_err(|e| IsolateError::sys("start prepared sandbox", e))?;
        drop(go);
        Ok((sandbox, ExecReport { pending }))
    }

    /// The start message (see [`start_message`]); a reusable sandbox is not started this way.
    fn start_message(&self, late_value: Option<&str>) -> Result<Vec<u8>> {
        if self.pending.reusable {
            return Err(IsolateError::Protocol(
                "a reusable sandbox runs through ReusableSandbox::run",
            ));
        }
        start_message(late_value)
    }

    /// The sandbox of a spec with [`SandboxSpec::reusable`], ready for its first run.
    pub fn into_reusable(self) -> Result<ReusableSandbox> {
        let PreparedSandbox {
            sandbox,
            mut pending,
        } = self;
        let sandbox = sandbox.ok_or(IsolateError::Protocol("prepared sandbox already started"))?;
        let control = match (pending.reusable, pending.start_w.take()) {
            (true, Some(control)) => control,
            _ => {
                return Err(IsolateError::Protocol(
                    "the sandbox was not prepared as reusable",
                ));
            }
        };
        Ok(ReusableSandbox {
            sandbox,
            control,
            pending,
            oom_kills: 0,
            running: false,
            runs: 0,
        })
    }
}

/// One length byte, then the late variable's value (at most 200 bytes, no NUL).
fn start_message(late_value: Option<&str>) -> Result<Vec<u8>> {
    let value = late_value.unwrap_or("");
    if value.len() > 200 || value.contains('\0') {
        return Err(IsolateError::InvalidSpec {
            field: "late_env",
            reason: "the value must be at most 200 bytes without NUL".into(),
        });
    }
    let mut msg = Vec::with_capacity(value.len() + 1);
    msg.push(value.len() as u8);
    msg.extend_from_slice(value.as_bytes());
    Ok(msg)
}

/// A run's own variables as the init takes them: `NAME=value\0` each, within the run buffers.
fn run_env_entries(env: &[(String, String)]) -> Result<Vec<u8>> {
    let bad = |reason: String| IsolateError::InvalidSpec {
        field: "env",
        reason,
    };
    if env.len() > image::RUN_ENV_MAX {
        return Err(bad(format!(
            "{} variables for one run; at most {}",
            env.len(),
            image::RUN_ENV_MAX
        )));
    }
    let mut out = Vec::new();
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(bad(format!("{k:?} is not a valid variable")));
        }
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    if out.len() > image::RUN_ENV_CAP {
        return Err(bad(format!(
            "{} bytes of variables for one run; at most {}",
            out.len(),
            image::RUN_ENV_CAP
        )));
    }
    Ok(out)
}

/// A sandbox that runs its function once per [`ReusableSandbox::run`] (its spec has
/// [`SandboxSpec::reusable`]): namespaces, cgroup, root and /tmp are built once; each run is a
/// new process of the function with pipes of its own, and nothing a run started outlives it
/// (its init kills and reaps the rest before it says the run ended). One run at a time.
/// Dropping it kills it and removes its cgroup.
#[derive(Debug)]
pub struct ReusableSandbox {
    sandbox: Sandbox,
    /// The init's control socket: one message per run (see `child::serve`).
    control: OwnedFd,
    /// The report pipe, where a run that did not reach its exec leaves its failure.
    pending: Pending,
    /// The cgroup's OOM kills at the end of the last run.
    oom_kills: u64,
    running: bool,
    runs: u64,
}

/// The caller's ends of one run's standard streams.
#[derive(Debug)]
pub struct RunPipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl ReusableSandbox {
    /// The sandbox itself (its pid, cgroup, accounting, a watch).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The sandbox, to end it: [`Sandbox::wait`] after a kill, or its drop.
    pub fn into_sandbox(self) -> Sandbox {
        self.sandbox
    }

    /// Runs started so far.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Kills the sandbox (and so the run, if one is going).
    pub fn kill(&self) -> Result<()> {
        self.sandbox.kill()
    }

    /// Starts a run with the spec's `late_env` variable set to `late_value` and `env` set for
    /// this run only (over the spec's variables of the same names); the caller's ends of its
    /// stdin, stdout and stderr. [`ReusableSandbox::run_ended`] says how it ended. Never
    /// blocks (one small message on an idle socket).
    pub fn run(&mut self, late_value: Option<&str>, env: &[(String, String)]) -> Result<RunPipes> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        if self.running {
            return Err(IsolateError::Protocol(
                "the sandbox's last run has not ended",
            ));
        }
        let mut msg = start_message(late_value)?;
        msg.extend(run_env_entries(env)?);
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let fds = [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ];
        let iov = [std::io::IoSlice::new(&msg)];
        loop {
            match sendmsg::<()>(
                self.control.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(IsolateError::sys("start a run of the sandbox", e)),
            }
        }
        self.running = true;
        self.runs += 1;
        self.sandbox.started = Instant::now();
        Ok(RunPipes {
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        })
    }

    /// Whether a run was started and its end not yet taken ([`ReusableSandbox::run_ended`]).
    pub fn has_run(&self) -> bool {
        self.running
    }

    /// Ends the run going, whatever it is doing: its process is killed, then everything it
    /// started, as after any run; returns how it ended ([`ReusableSandbox::run_ended`]). The
    /// sandbox then serves the next run. A run that had already ended is only reported.
    pub async fn cancel_run(&mut self) -> Result<Option<FunctionEnd>> {
        if !self.running {
            return Err(IsolateError::Protocol("the sandbox has no run going"));
        }
        self.sandbox.send_signal(child::cancel_signal())?;
        self.run_ended().await
    }

    /// Waits until the run's process has ended and everything it started has been killed, and
    /// says how it ended; an error names the step when its process never reached the exec.
    /// None when the sandbox itself ended (it was killed): it cannot run again.
    /// Cancel-safe: dropped before it returns, the run is still going.
    pub async fn run_ended(&mut self) -> Result<Option<FunctionEnd>> {
        if !self.running {
            return Err(IsolateError::Protocol("the sandbox has no run going"));
        }
        let Some(raw) = read_status(&self.sandbox.status_r).await? else {
            return Ok(None);
        };
        self.running = false;
        let oom_kills = self.sandbox.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let oom_killed = oom_kills > self.oom_kills;
        self.oom_kills = oom_kills;
        let status = ExitStatus::from_raw(raw);
        if !status.success()
            && wait_readable(&self.pending.report_r, Duration::ZERO)
                .map_err(|e| IsolateError::sys("poll sandbox report", e))?
            && let Err(failed) = self.pending.read_report()?
        {
            return Err(failed);
        }
        Ok(Some(FunctionEnd { status, oom_killed }))
    }
}

impl Isolator {
    /// User-namespace start: map the function's ids, join the cgroup, and release the child.
    fn let_child_go(
        &self,
        pid: libc::pid_t,
        spec: &SandboxSpec,
        cgroup: &dyn cgroup::SandboxCgroup,
        go: OwnedFd,
    ) -> Result<()> {
        let write = |path: String, text: String| {
            std::fs::write(&path, text).map_err(|source| IsolateError::Write {
                path: path.into(),
                source,
            })
        };
        write(
            format!("/proc/{pid}/uid_map"),
            format!("{0} {0} 1\n", spec.uid),
        )?;
        write(
            format!("/proc/{pid}/gid_map"),
            format!("{0} {0} 1\n", spec.gid),
        )?;
        for f in cgroup.join_files() {
            write(f.display().to_string(), pid.to_string())?;
        }
        nix::unistd::write(&go, b"g").map_err(|e| IsolateError::sys("release sandbox child", e))?;
        Ok(())
    }
}

/// A reusable sandbox's control socket: (child end, parent end), one message per run.
fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| IsolateError::sys("socketpair", e))?;
    Ok((above_stdio(a)?, above_stdio(b)?))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| IsolateError::sys("pipe2", e))?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// The child dup2()s onto 0, 1 and 2: its sources must not sit there already.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // try_clone uses F_DUPFD_CLOEXEC with a minimum of 3.
    fd.try_clone()
        .map_err(|e| IsolateError::sys("dup", Errno::from_raw(e.raw_os_error().unwrap_or(0))))
}

/// (child end, parent end) for one standard stream.
fn stdio_pair(mode: Stdio, is_input: bool) -> Result<(Option<OwnedFd>, Option<OwnedFd>)> {
    match mode {
        Stdio::Inherit => Ok((None, None)),
        Stdio::Null => {
            let f = std::fs::OpenOptions::new()
                .read(is_input)
                .write(!is_input)
                .open("/dev/null")
                .map_err(|e| {
                    IsolateError::sys(
                        "open /dev/null",
                        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    )
                })?;
            Ok((Some(above_stdio(f.into())?), None))
        }
        Stdio::Piped => {
            let (r, w) = pipe()?;
            Ok(if is_input {
                (Some(r), Some(w))
            } else {
                (Some(w), Some(r))
            })
        }
    }
}

/// How long a sandbox child may take from clone to exec.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `fd` is readable (data or EOF); false on timeout.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> std::result::Result<bool, Errno> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> std::result::Result<(), Errno> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> std::result::Result<usize, Errno> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd.as_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A running sandbox. Dropping it kills and removes everything of it.
#[derive(Debug)]
pub struct Sandbox {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    status_r: OwnedFd,
    /// The function's wait status, once [`Sandbox::function_ended`] has read it.
    function_status: Option<i32>,
    cgroup: Option<Box<dyn cgroup::SandboxCgroup>>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    listener: Option<std::net::TcpListener>,
    connect_notifier: Option<ConnectNotifier>,
    outcome: Option<Outcome>,
    started: Instant,
    /// Dropped after the teardown: see [`PreparedSandbox::attach`].
    attached: Vec<Attached>,
}

/// Something tied to a sandbox's life.
struct Attached(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attached")
    }
}

impl Sandbox {
    /// Host pid of the sandbox's init.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The write end of the function's stdin, when it was [`Stdio::Piped`].
    pub fn take_stdin(&mut self) -> Option<OwnedFd> {
        self.stdin.take()
    }
    pub fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.stdout.take()
    }
    pub fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    /// The socket listening inside the sandbox's network namespace, when the spec asked for
    /// one ([`SandboxSpec::loopback_listener`]); non-blocking.
    pub fn take_listener(&mut self) -> Option<std::net::TcpListener> {
        self.listener.take()
    }

    /// The answering end of the function's connect calls, when the spec asked for a socket
    /// pair behind its loopback port ([`SandboxSpec::loopback_socketpair`]).
    pub fn take_connect_notifier(&mut self) -> Option<ConnectNotifier> {
        self.connect_notifier.take()
    }

    /// A handle that can kill the sandbox and learn when it ends from another task, while the
    /// owner of the [`Sandbox`] waits for it.
    pub fn watch(&self) -> Result<SandboxWatch> {
        let pidfd = self
            .pidfd
            .try_clone()
            .map_err(|e| IsolateError::sys("dup pidfd", errno_of(&e)))?;
        let cgroup_path = self.cgroup_path();
        Ok(SandboxWatch {
            pidfd: Arc::new(pidfd),
            cgroup_path,
            pid: self.pid(),
            threads: self.cgroup.as_ref().map(|c| c.threads_file()),
        })
    }

    /// Sends the signal numbered `sig` to the sandbox's init.
    fn send_signal(&self, sig: libc::c_int) -> Result<()> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), sig).or_else(ignore_esrch)
    }

    /// Sends `sig` to the function (through its init).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        if self.outcome.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_fd(), sig as libc::c_int).or_else(ignore_esrch)
    }

    /// Kills the whole sandbox: SIGKILL to its init takes the pid namespace down with it.
    pub fn kill(&self) -> Result<()> {
        if self.outcome.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL).or_else(ignore_esrch)
    }

    /// Live accounting from the cgroup.
    pub fn usage(&self) -> CgroupUsage {
        self.cgroup.as_ref().map(|c| c.usage()).unwrap_or_default()
    }

    /// The group's peak memory through a descriptor kept open ([`PeakMemory::read`]), for a
    /// caller that reads it after every invocation; `None` without a cgroup.
    pub fn peak_memory(&self) -> Result<Option<PeakMemory>> {
        self.cgroup
            .as_ref()
            .map(|c| PeakMemory::open(&c.peak_memory_file()))
            .transpose()
    }

    /// Cgroup directory (for diagnostics).
    pub fn cgroup_path(&self) -> Option<String> {
        self.cgroup.as_ref().map(|c| c.path_display())
    }

    /// Waits for the function to end, then collects accounting and removes the cgroup.
    pub async fn wait(&mut self) -> Result<Outcome> {
        if let Some(o) = &self.outcome {
            return Ok(o.clone());
        }
        let afd = register_readable(self.pidfd.as_fd(), "register pidfd")?;
        // A pidfd turns readable when the process exits.
        let _guard = afd
            .readable()
            .await
            .map_err(|e| IsolateError::sys("poll pidfd", errno_of(&e)))?;
        drop(_guard);
        drop(afd);
        self.finish()
    }

    /// Waits until the function's own process has ended and says how, while the init is still
    /// exiting: its exit tears the namespaces down (the mounts are the dearest part, ~0.4 ms),
    /// which [`Sandbox::wait`] waits for, then reaps the init and removes the cgroup; call it
    /// (or drop the sandbox) afterwards. It returns the same status, and the accounting (peak
    /// memory, CPU), which is not read here: this is the answer's path, and of the group's
    /// files only the OOM count decides it. None when the init ended without saying (it was
    /// killed): `wait` tells what happened.
    pub async fn function_ended(&mut self) -> Result<Option<FunctionEnd>> {
        if let Some(o) = &self.outcome {
            return Ok(Some(FunctionEnd {
                status: o.status,
                oom_killed: o.oom_killed,
            }));
        }
        if self.function_status.is_none() {
            match read_status(&self.status_r).await? {
                Some(raw) => self.function_status = Some(raw),
                None => return Ok(None),
            }
        }
        let raw = self.function_status.unwrap_or_default();
        let oom_kills = self.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        Ok(Some(FunctionEnd {
            status: ExitStatus::from_raw(raw),
            oom_killed: oom_kills > 0,
        }))
    }

    /// [`Sandbox::wait`] for callers without a tokio runtime.
    pub fn wait_blocking(&mut self) -> Result<Outcome> {
        if let Some(o) = &self.outcome {
            return Ok(o.clone());
        }
        self.finish()
    }

    fn reap_blocking(&mut self) -> Result<i32> {
        loop {
            match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code << 8),
                Ok(WaitStatus::Signaled(_, sig, core)) => {
                    return Ok(sig as i32 | if core { 0x80 } else { 0 });
                }
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(IsolateError::sys("waitpid", e)),
            }
        }
    }

    fn outcome_placeholder(&self) -> Outcome {
        Outcome {
            status: ExitStatus::Exited(-1),
            oom_killed: false,
            peak_memory_bytes: None,
            cpu_time: None,
            wall_time: self.started.elapsed(),
        }
    }

    fn finish(&mut self) -> Result<Outcome> {
        let init_status = self.reap_blocking()?;
        let wall_time = self.started.elapsed();
        let mut buf = [0u8; 4];
        // The init writes the function's wait status just before it exits; without it the init
        // itself was killed (by us, or the OOM killer), and its status is the answer.
        let raw = match self.function_status {
            Some(raw) => raw,
            None => match read_full(&self.status_r, &mut buf) {
                Ok(4) => i32::from_ne_bytes(buf),
                _ => init_status,
            },
        };
        let usage = self.usage();
        let outcome = Outcome {
            status: ExitStatus::from_raw(raw),
            oom_killed: usage.oom_kills > 0,
            peak_memory_bytes: usage.peak_memory_bytes,
            cpu_time: usage.cpu_time,
            wall_time,
        };
        self.outcome = Some(outcome.clone());
        self.teardown()?;
        Ok(outcome)
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(mut cg) = self.cgroup.take() {
            // Only ever called once the init is reaped (wait, or drop after a kill).
            cg.remove_after_exit()?;
        }
        // Everything in the sandbox is gone: what was made for it on the host can go too.
        self.attached.clear();
        Ok(())
    }
}

/// Reads the next wait status the init writes on its status pipe; None at EOF (the init
/// ended without one). The pipe is made non-blocking for the event loop; [`Sandbox::finish`]
/// reads it only after the init is reaped, when the write end is closed (a record or EOF,
/// never EAGAIN).
async fn read_status(status_r: &OwnedFd) -> Result<Option<i32>> {
    sys::set_nonblocking(status_r.as_fd())
        .map_err(|e| IsolateError::sys("fcntl status pipe", e))?;
    let afd = register_readable(status_r.as_fd(), "register status pipe")?;
    let mut buf = [0u8; 4];
    let got = loop {
        let mut guard = afd
            .readable()
            .await
            .map_err(|e| IsolateError::sys("poll status pipe", errno_of(&e)))?;
        match read_full(status_r, &mut buf) {
            Err(Errno::EAGAIN) => guard.clear_ready(),
            other => break other,
        }
    };
    drop(afd);
    // The init writes the four bytes at once (below PIPE_BUF): all or nothing.
    Ok(match got {
        Ok(4) => Some(i32::from_ne_bytes(buf)),
        _ => None,
    })
}

/// A second handle on a running sandbox: kill it, or wait until it has ended. Cheap to clone.
/// The [`Sandbox`] itself still reaps the process and removes its cgroup.
#[derive(Debug, Clone)]
pub struct SandboxWatch {
    pidfd: Arc<OwnedFd>,
    cgroup_path: Option<String>,
    /// Host pid of init.
    pid: u32,
    /// The cgroup's list of thread ids (`tasks`, `cgroup.threads`).
    threads: Option<std::path::PathBuf>,
}

/// Most threads [`SandboxWatch::set_cpus`] walks to without a cgroup (the sandbox's pids limit
/// bounds them with one).
const MAX_TREE_THREADS: usize = 4096;

impl SandboxWatch {
    /// Moves every thread of the sandbox onto `cpus`; threads started later inherit them.
    /// The threads are listed from the sandbox's cgroup (without one: init's and its
    /// descendants' from /proc). One that ends meanwhile is skipped. Returns how many moved.
    pub fn set_cpus(&self, cpus: &[usize]) -> Result<usize> {
        let set = image::cpu_set(cpus)?;
        let tids = match &self.threads {
            Some(file) => std::fs::read_to_string(file)
                .map_err(|e| IsolateError::sys("read the cgroup's threads", errno_of(&e)))?
                .split_ascii_whitespace()
                .filter_map(|t| t.parse::<i32>().ok())
                .collect(),
            None => tree_threads(self.pid),
        };
        let mut moved = 0;
        for tid in tids {
            match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
                Ok(()) => moved += 1,
                Err(Errno::ESRCH) => {}
                Err(e) => return Err(IsolateError::sys("sched_setaffinity", e)),
            }
        }
        Ok(moved)
    }

    /// SIGKILL to the sandbox's init; the pid namespace goes down with it. A sandbox that has
    /// already ended (and even been reaped) is not an error.
    pub fn kill(&self) -> Result<()> {
        sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL).or_else(ignore_esrch)
    }

    /// Resolves once the sandbox's init has exited (the pidfd turns readable).
    pub async fn exited(&self) -> Result<()> {
        // Each waiter registers a descriptor of its own: one fd can be registered only once.
        let fd = self
            .pidfd
            .try_clone()
            .map_err(|e| IsolateError::sys("dup pidfd", errno_of(&e)))?;
        let afd = register_readable(fd.as_fd(), "register pidfd")?;
        let ready = afd
            .readable()
            .await
            .map(drop)
            .map_err(|e| IsolateError::sys("poll pidfd", errno_of(&e)));
        drop(afd);
        drop(fd);
        ready
    }

    /// The sandbox's cgroup directory, for diagnostics and naming.
    pub fn cgroup_path(&self) -> Option<&str> {
        self.cgroup_path.as_deref()
    }
}

/// The thread ids of `pid` and its descendants, from /proc (at most [`MAX_TREE_THREADS`]).
fn tree_threads(pid: u32) -> Vec<i32> {
    let mut tids = Vec::new();
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            if tids.len() >= MAX_TREE_THREADS {
                return tids;
            }
            tids.push(tid);
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                pending.extend(
                    children
                        .split_ascii_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    tids
}

pub(crate) fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

/// `fd` registered for readability with the current tokio reactor, for as long as it is
/// borrowed (the registration is dropped, and deregistered, before the fd can close).
pub(crate) fn register_readable<'a>(
    fd: std::os::fd::BorrowedFd<'a>,
    op: &'static str,
) -> Result<tokio::io::unix::AsyncFd<std::os::fd::BorrowedFd<'a>>> {
    // SAFETY: the registration holds the borrow, so the fd stays open while it is registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| IsolateError::sys(op, errno_of(&e.into_parts().1)))
}

fn ignore_esrch(e: Errno) -> Result<()> {
    if e == Errno::ESRCH {
        Ok(())
    } else {
        Err(IsolateError::sys("pidfd_send_signal", e))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.outcome.is_none() {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
            let _ = self.reap_blocking();
        }
        let _ = self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::exec_candidates;

    #[test]
    fn exec_candidates_follow_path() {
        let mut spec = SandboxSpec {
            program: "python3".into(),
            ..Default::default()
        };
        spec.env
            .insert("PATH".into(), "/usr/local/bin:relative:/usr/bin/".into());
        assert_eq!(
            exec_candidates(&spec),
            vec!["/usr/local/bin/python3", "/usr/bin/python3"]
        );
        spec.program = "/var/task/bootstrap".into();
        assert_eq!(exec_candidates(&spec), vec!["/var/task/bootstrap"]);
    }

    #[test]
    fn exit_status_codes() {
        assert_eq!(ExitStatus::from_raw(3 << 8), ExitStatus::Exited(3));
        assert_eq!(ExitStatus::from_raw(9), ExitStatus::Signaled(9));
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
    }
}
