//! The spawn helper: a small single-threaded process that clones sandboxes for its parent.
//!
//! A clone without `CLONE_VM` copies the caller's page tables and write-protects its memory:
//! from a large multi-threaded agent that costs the fork itself (`dup_mmap`), TLB shootdowns to
//! every CPU it runs on, and afterwards a copy-on-write fault for each page the agent writes while
//! a prepared sandbox (forked, not yet exec'd) still shares it. The helper is forked once, early,
//! while the caller is small; every sandbox is then a fork of the helper.
//!
//! The helper clones with `CLONE_PARENT`: the sandbox's init is the caller's child, as if the
//! caller had cloned it, so `waitpid`, the pidfd and [`crate::Sandbox`] work unchanged. The
//! caller keeps making the cgroup, the pipes and the plan; the helper receives the spec, the plan
//! and the child's ends of the pipes, builds the child's memory image and clones.
//!
//! Protocol: one `SOCK_SEQPACKET` socket pair. A request is a postcard-encoded `Wire` with
//! the child's descriptors attached (`SCM_RIGHTS`) in `Layout` order; the reply is a
//! `Reply`, with the pidfd attached when the clone worked. One request at a time: the
//! caller's end sits behind a mutex (the helper's part of a spawn is ~0.1 ms; the child's
//! setup, the long part, runs in the child).
//!
//! The helper ends when its socket closes ([`Spawner`]'s drop) or its parent dies
//! (`PR_SET_PDEATHSIG`). `PR_SET_PDEATHSIG` follows the thread that forked it, and a sandbox
//! asking for `die_with_parent` follows that same thread: start the helper from a thread that
//! lives as long as the process (the main thread).
//!
//! A helper that exits or is lost (killed, crashed, hung: a hung one is killed) can be
//! replaced ([`Spawner::relaunch_with`]): a thread of its own, which never ends, waits on the
//! helper's pidfd and then launches the program again (`/proc/self/exe` in the agent: a fresh
//! exec, not a fork of the grown process) with [`LAUNCH_ARG`], the helper's end of a new
//! socket pair as descriptor 3. That program calls [`serve_launched`]. Until the new helper
//! says it is ready, and between failed launches (backing off up to [`MAX_RELAUNCH_BACKOFF`]),
//! the caller clones in-process.

use std::ffi::{CString, OsStr};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

use crate::error::{IsolateError, Result};
use crate::image::{ChildFds, ChildImage};
use crate::rootfs::Plan;
use crate::spec::SandboxSpec;
use crate::sys;

/// The largest request: a socket's default send buffer holds a little more. A larger spec (tens
/// of thousands of environment variables) is cloned by the caller itself.
const MAX_REQUEST: usize = 192 << 10;
/// At most one descriptor per [`Layout`] bit.
const MAX_FDS: usize = 9;
/// The helper's part of a spawn takes well under a millisecond: past this it is taken for hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The first argument that makes a program a launched helper ([`serve_launched`]).
pub const LAUNCH_ARG: &str = "__spawn-helper";
/// A launched helper's end of its socket.
const LAUNCHED_FD: RawFd = 3;
/// Relaunches back off while helpers keep getting lost, up to this.
pub const MAX_RELAUNCH_BACKOFF: Duration = Duration::from_secs(60);
/// A helper that served this long before it was lost resets the back-off.
const STABLE: Duration = Duration::from_secs(60);

/// Which of the child's descriptors a request carries, in this order: stdin, stdout, stderr,
/// report (always), status (always), go, netns, start, cgroup.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Layout(u16);

const STDIN: u16 = 1;
const STDOUT: u16 = 1 << 1;
const STDERR: u16 = 1 << 2;
const REPORT: u16 = 1 << 3;
const STATUS: u16 = 1 << 4;
const GO: u16 = 1 << 5;
const NETNS: u16 = 1 << 6;
const START: u16 = 1 << 7;
const CGROUP: u16 = 1 << 8;
const ORDER: [u16; MAX_FDS] = [
    STDIN, STDOUT, STDERR, REPORT, STATUS, GO, NETNS, START, CGROUP,
];

/// A request as the caller sends it (borrowed) ...
#[derive(Serialize)]
struct Wire<'a> {
    spec: &'a SandboxSpec,
    plan: &'a Plan,
    join_files: &'a [CString],
    hold: bool,
    flags: u64,
    layout: Layout,
}

/// ... and as the helper reads it (owned; the same fields in the same order).
#[derive(Deserialize)]
struct Received {
    spec: SandboxSpec,
    plan: Plan,
    join_files: Vec<CString>,
    hold: bool,
    flags: u64,
    layout: Layout,
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// The pidfd is attached when the kernel gave one.
    Cloned { pid: i32 },
    /// The clone failed: `clone3`'s errno, or (errno 0) what else went wrong.
    Failed { errno: i32, message: String },
    /// A launched helper's first message: it serves from now on.
    Ready,
}

/// What the caller's clone through the helper needs besides the descriptors.
pub(crate) struct CloneRequest<'a> {
    pub spec: &'a SandboxSpec,
    pub plan: &'a Plan,
    pub join_files: &'a [CString],
    pub hold: bool,
    pub flags: u64,
}

/// Why a clone through the helper did not happen.
pub(crate) enum HelperError {
    /// Nothing was sent (no helper, or the request is too large): the caller clones itself.
    NotSent,
    /// The clone failed, or the helper stopped answering after the request went out.
    Failed(IsolateError),
}

/// The caller's handle on a spawn helper. Give it to [`crate::Isolator::use_spawner`].
#[derive(Debug)]
pub struct Spawner {
    state: Arc<State>,
    /// The write end of a pipe the relaunching thread watches ([`Spawner::relaunch_with`]):
    /// closed with the spawner, it ends the thread's watch.
    relaunching: Option<OwnedFd>,
}

/// What the spawner and its relaunching thread share.
#[derive(Debug)]
struct State {
    helper: Mutex<Helper>,
    alive: AtomicBool,
    /// A relaunched helper, ready, until the next spawn (or status query) takes it.
    ready: Mutex<Option<Helper>>,
    restarts: AtomicU64,
}

/// One helper process: the caller's end of its socket, its pid and a pidfd (our child, reaped
/// once, by the drop).
#[derive(Debug)]
struct Helper {
    sock: OwnedFd,
    pid: libc::pid_t,
    /// Readable once it has exited: what the relaunching thread waits on.
    pidfd: OwnedFd,
}

impl Helper {
    /// A helper just started; one whose pidfd cannot be had is killed and reaped.
    fn new(sock: OwnedFd, pid: libc::pid_t) -> Result<Helper> {
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Ok(Helper { sock, pid, pidfd }),
            Err(e) => {
                // SAFETY: signalling and reaping our own child, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
                }
                Err(IsolateError::sys("pidfd_open of the spawn helper", e))
            }
        }
    }
}

impl Spawner {
    /// Forks the helper. Call it early, from the main thread, while the process is small and
    /// has no other thread: the helper is a copy of the process as it is now.
    pub fn start() -> Result<Spawner> {
        let (ours, theirs) = socket_pair()?;
        let parent = nix::unistd::getpid().as_raw();
        // SAFETY: fork: the child runs only `helper_main`, which touches no lock but malloc's
        // (glibc's fork leaves malloc usable in the child of a threaded process) and never
        // returns.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(IsolateError::sys("fork the spawn helper", Errno::last())),
            0 => {
                drop(ours);
                helper_main(theirs, parent)
            }
            pid => {
                drop(theirs);
                Ok(Spawner::serving(Helper::new(ours, pid)?))
            }
        }
    }

    fn serving(helper: Helper) -> Spawner {
        Spawner {
            state: Arc::new(State {
                helper: Mutex::new(helper),
                alive: AtomicBool::new(true),
                ready: Mutex::new(None),
                restarts: AtomicU64::new(0),
            }),
            relaunching: None,
        }
    }

    /// Replaces a helper that exits or is lost with `program` launched anew (`/proc/self/exe`
    /// for a program whose `main` calls [`serve_launched`] on [`LAUNCH_ARG`]). Starts the
    /// thread that waits on the helper's pidfd and launches the next; it never ends, as the
    /// helpers (and sandboxes asking for `die_with_parent`) die with the thread that started
    /// them.
    pub fn relaunch_with(&mut self, program: PathBuf) -> Result<()> {
        if self.relaunching.is_some() {
            return Ok(());
        }
        let (watch, relaunching) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| IsolateError::sys("pipe for the relaunching thread", e))?;
        let state = Arc::downgrade(&self.state);
        std::thread::Builder::new()
            .name("fnlet-respawn".into())
            .spawn(move || relaunch_thread(&program, &state, &watch))
            .map_err(|e| IsolateError::Spawner(format!("starting the relaunch thread: {e}")))?;
        self.relaunching = Some(relaunching);
        Ok(())
    }

    /// How many times a lost helper was replaced.
    pub fn restarts(&self) -> u64 {
        self.state.restarts.load(Ordering::Relaxed)
    }

    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.state.helper().pid as u32
    }

    /// False while the helper is lost (it died or stopped answering) and no new one is ready;
    /// clones then happen in the caller.
    pub fn alive(&self) -> bool {
        self.state.alive.load(Ordering::Acquire) || self.state.take_relaunched()
    }

    /// Clones a sandbox's child through the helper: its pid and pidfd.
    pub(crate) fn clone_sandbox(
        &self,
        request: &CloneRequest<'_>,
        fds: &ChildFds,
        cgroup_fd: Option<RawFd>,
    ) -> std::result::Result<(libc::pid_t, Option<OwnedFd>), HelperError> {
        let mut layout = 0u16;
        let mut attached: Vec<RawFd> = Vec::with_capacity(MAX_FDS);
        let slots = [
            (STDIN, fds.stdio[0]),
            (STDOUT, fds.stdio[1]),
            (STDERR, fds.stdio[2]),
            (REPORT, Some(fds.report)),
            (STATUS, Some(fds.status)),
            (GO, fds.go),
            (NETNS, fds.netns),
            (START, fds.start),
            (CGROUP, cgroup_fd),
        ];
        for (bit, fd) in slots {
            if let Some(fd) = fd {
                layout |= bit;
                attached.push(fd);
            }
        }
        let wire = Wire {
            spec: request.spec,
            plan: request.plan,
            join_files: request.join_files,
            hold: request.hold,
            flags: request.flags,
            layout: Layout(layout),
        };
        let bytes = match postcard::to_stdvec(&wire) {
            Ok(b) if b.len() <= MAX_REQUEST => b,
            _ => return Err(HelperError::NotSent),
        };
        if !self.alive() {
            return Err(HelperError::NotSent);
        }
        let helper = self.state.helper();
        if !self.state.alive.load(Ordering::Acquire) {
            // Lost while this caller waited for the lock.
            return Err(HelperError::NotSent);
        }
        if let Err(e) = send(&helper.sock, &bytes, &attached) {
            // A datagram socket takes all or nothing: nothing went out.
            self.lost(&helper, &format!("sending a request failed: {e}"));
            return Err(HelperError::NotSent);
        }
        let mut buf = [0u8; 1024];
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let (len, pidfd) = match receive(&helper.sock, &mut buf, &mut cmsg_space) {
            Ok(Message { len: 0, .. }) => {
                self.lost(&helper, "it exited");
                return Err(gone("the spawn helper exited during a spawn"));
            }
            Ok(msg) => (msg.len, msg.fds.into_iter().next()),
            Err(e) => {
                self.lost(&helper, &format!("no reply ({e})"));
                return Err(gone("the spawn helper did not answer"));
            }
        };
        match postcard::from_bytes::<Reply>(&buf[..len]) {
            Ok(Reply::Cloned { pid }) => Ok((pid, pidfd)),
            Ok(Reply::Failed { errno, .. }) if errno != 0 => Err(HelperError::Failed(
                IsolateError::sys("clone3", Errno::from_raw(errno)),
            )),
            Ok(Reply::Failed { message, .. }) => {
                Err(HelperError::Failed(IsolateError::Spawner(message)))
            }
            Ok(Reply::Ready) | Err(_) => {
                self.lost(&helper, "an unreadable reply");
                Err(gone("the spawn helper's reply was unreadable"))
            }
        }
    }

    /// Gives up on `helper` (held locked): kills it (it is reaped when replaced or dropped);
    /// clones happen in the caller until a relaunched helper is ready.
    fn lost(&self, helper: &Helper, why: &str) {
        if self.state.alive.swap(false, Ordering::AcqRel) {
            let next = if self.relaunching.is_some() {
                "until a new one is ready"
            } else {
                "from now on"
            };
            tracing::error!(
                pid = helper.pid,
                "the spawn helper is lost: {why}; sandboxes are cloned by this process {next}"
            );
            // SAFETY: signalling our own child, not yet reaped (so the pid is still its). Its
            // pidfd turns readable: the relaunching thread launches the next.
            unsafe { libc::kill(helper.pid, libc::SIGKILL) };
        }
    }
}

impl State {
    fn helper(&self) -> std::sync::MutexGuard<'_, Helper> {
        self.helper.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Option<Helper>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a relaunched helper in the lost one's place, if one is ready.
    fn take_relaunched(&self) -> bool {
        let Some(new) = self.ready().take() else {
            return false;
        };
        let mut helper = self.helper();
        if self.alive.load(Ordering::Acquire) {
            // Another caller installed one first; this one's drop ends and reaps it.
            drop(helper);
            drop(new);
            return true;
        }
        let pid = new.pid;
        // The lost one (killed by `lost`, or exited) is reaped here, by its own pid, once.
        drop(std::mem::replace(&mut *helper, new));
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.alive.store(true, Ordering::Release);
        tracing::info!(pid, "a new spawn helper clones sandboxes again");
        true
    }

    /// The helper to watch (the serving one, else one waiting to serve): its pid and a copy of
    /// its pidfd. None: nothing alive to watch.
    fn watched(&self) -> std::io::Result<Option<(libc::pid_t, OwnedFd)>> {
        let ready = self.ready();
        let helper = self.helper();
        let current = if self.alive.load(Ordering::Acquire) {
            Some(&*helper)
        } else {
            ready.as_ref()
        };
        current
            .map(|h| Ok((h.pid, h.pidfd.try_clone()?)))
            .transpose()
    }

    /// `pid` has exited: if it was the serving helper, clones happen in the caller until a
    /// new one is ready; if it was waiting to serve, it is dropped (and reaped).
    fn exited(&self, pid: libc::pid_t) {
        let mut ready = self.ready();
        if ready.as_ref().is_some_and(|h| h.pid == pid) {
            drop(ready.take());
        }
        drop(ready);
        let helper = self.helper();
        if helper.pid == pid && self.alive.swap(false, Ordering::AcqRel) {
            tracing::error!(
                pid,
                "the spawn helper exited; sandboxes are cloned by this process until a new one is ready"
            );
        }
    }
}

/// The relaunching thread: waits for the helper to exit (its pidfd; a lost helper is killed,
/// so it exits too), then launches the next, backing off while they keep getting lost and
/// retrying until one is ready. Its watch ends with the spawner (`stop` hangs up); the thread
/// never returns: the helpers it launched die with it.
fn relaunch_thread(program: &Path, state: &std::sync::Weak<State>, stop: &OwnedFd) -> ! {
    let mut backoff = Duration::ZERO;
    let mut last_launch: Option<Instant> = None;
    'watch: loop {
        let Some(shared) = state.upgrade() else {
            break;
        };
        let watched = shared.watched();
        drop(shared);
        let watched = match watched {
            Ok(w) => w,
            Err(e) => {
                // No descriptor to watch with (the table is full): look again in a while,
                // rather than launch helpers beside a live one.
                tracing::warn!("watching the spawn helper: {e}");
                if wait_readable(stop, stop, Some(Duration::from_secs(1))) == Woken::Stop {
                    break;
                }
                continue;
            }
        };
        // With nothing alive to watch, the next is launched at once.
        if let Some((pid, pidfd)) = watched {
            if wait_readable(&pidfd, stop, None) == Woken::Stop {
                break;
            }
            match state.upgrade() {
                Some(shared) => shared.exited(pid),
                None => break,
            }
        }
        loop {
            backoff = next_backoff(backoff, last_launch.map(|t| t.elapsed()));
            if !backoff.is_zero() && wait_readable(stop, stop, Some(backoff)) == Woken::Stop {
                break 'watch;
            }
            let started = Instant::now();
            last_launch = Some(started);
            match launch(program) {
                Ok(helper) => {
                    tracing::info!(
                        pid = helper.pid,
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "a new spawn helper is ready"
                    );
                    let Some(s) = state.upgrade() else {
                        // The spawner is gone: the new helper's drop ends and reaps it.
                        break 'watch;
                    };
                    // One still waiting (never taken) is replaced; its drop reaps it.
                    drop(s.ready().replace(helper));
                    break;
                }
                Err(e) => tracing::error!(
                    "relaunching the spawn helper ({}): {e}; trying again",
                    program.display()
                ),
            }
        }
    }
    // The spawner is gone; this thread stays, for what its helpers cloned.
    loop {
        std::thread::park();
    }
}

#[derive(Debug, PartialEq)]
enum Woken {
    Ready,
    Stop,
    TimedOut,
}

/// Waits until `fd` is readable, `stop` hangs up (or is readable), or `timeout` passes.
fn wait_readable(fd: &OwnedFd, stop: &OwnedFd, timeout: Option<Duration>) -> Woken {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    loop {
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => return Woken::TimedOut,
            Ok(_) => {
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return Woken::Stop;
                }
                return Woken::Ready;
            }
            Err(Errno::EINTR) => continue,
            // Nothing sensible to wait on: taken as the end, not as a spin.
            Err(_) => return Woken::Stop,
        }
    }
}

/// The wait before the next launch: none after a helper that served [`STABLE`] or longer (or
/// the first time), else twice the last wait, from one second up to
/// [`MAX_RELAUNCH_BACKOFF`].
fn next_backoff(last: Duration, since_last_launch: Option<Duration>) -> Duration {
    match since_last_launch {
        Some(served) if served < STABLE => {
            (last * 2).clamp(Duration::from_secs(1), MAX_RELAUNCH_BACKOFF)
        }
        _ => Duration::ZERO,
    }
}

/// The caller's and the helper's ends of a new socket pair; replies time out on the caller's.
fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| IsolateError::sys("socketpair for the spawn helper", e))?;
    let timeout = nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| IsolateError::sys("set the spawn helper's reply timeout", e))?;
    Ok((ours, theirs))
}

/// Execs `program LAUNCH_ARG <our pid>` with the helper's end of a new socket as descriptor 3,
/// and waits for its [`Reply::Ready`].
fn launch(program: &Path) -> Result<Helper> {
    let (ours, theirs) = socket_pair()?;
    let parent = nix::unistd::getpid().as_raw();
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(program);
    command
        .arg(LAUNCH_ARG)
        .arg(parent.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: runs in the forked child before exec and only makes system calls that are
    // async-signal-safe (dup2, fcntl, prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let moved = if fd == LAUNCHED_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                // dup2's copy does not close on exec.
                libc::dup2(fd, LAUNCHED_FD)
            };
            if moved < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the caller is gone"));
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| IsolateError::Spawner(format!("launching {}: {e}", program.display())))?;
    drop(theirs);
    // From here the drop ends it (EOF on its socket) and reaps it.
    let helper = Helper::new(ours, child.id() as libc::pid_t)?;
    let mut buf = [0u8; 64];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let failure = match receive(&helper.sock, &mut buf, &mut cmsg_space) {
        Ok(Message { len: 0, .. }) => "it exited before it was ready".to_string(),
        Ok(msg) => match postcard::from_bytes::<Reply>(&buf[..msg.len]) {
            Ok(Reply::Ready) => return Ok(helper),
            _ => "its first message was not Ready".to_string(),
        },
        Err(e) => format!("no word from it ({e})"),
    };
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(helper.pid, libc::SIGKILL) };
    Err(IsolateError::Spawner(format!(
        "{} as a spawn helper: {failure}",
        program.display()
    )))
}

/// A launched helper's `main` (the program [`Spawner::relaunch_with`] names, called with
/// [`LAUNCH_ARG`] first): `parent` is the argument after it. Serves on descriptor 3 until the
/// caller's end closes; never returns. Run any other way, it says so and exits 2.
pub fn serve_launched(parent: Option<&OsStr>) -> ! {
    let parent = parent
        .and_then(OsStr::to_str)
        .and_then(|p| p.parse::<libc::pid_t>().ok());
    let is_socket = nix::sys::socket::getsockopt(
        // SAFETY: borrowed for this call only; a closed descriptor makes getsockopt fail.
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(LAUNCHED_FD) },
        nix::sys::socket::sockopt::SockType,
    )
    .is_ok_and(|t| t == SockType::SeqPacket);
    let (Some(parent), true) = (parent, is_socket) else {
        eprintln!(
            "{LAUNCH_ARG}: this is the fnlet agent's spawn helper; the agent starts it when it needs one"
        );
        sys::exit_now(2)
    };
    // SAFETY: descriptor 3 is the socket the launcher put there, and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(LAUNCHED_FD) };
    let _ = nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let Ok(ready) = postcard::to_stdvec(&Reply::Ready) else {
        sys::exit_now(1)
    };
    if send(&sock, &ready, &[]).is_err() {
        sys::exit_now(1);
    }
    helper_main(sock, parent)
}

fn gone(what: &str) -> HelperError {
    HelperError::Failed(IsolateError::Spawner(what.into()))
}

impl Drop for Helper {
    fn drop(&mut self) {
        // EOF on its socket ends the helper.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let mut status = 0;
        // SAFETY: reaping our own child; status is a valid out-pointer.
        while unsafe { libc::waitpid(self.pid, &mut status, libc::__WALL) } < 0
            && Errno::last() == Errno::EINTR
        {}
    }
}

/// The helper's whole life. Never returns.
fn helper_main(sock: OwnedFd, parent: libc::pid_t) -> ! {
    // Die with the parent; if it died already, do not serve anyone else.
    if sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).is_err()
        || nix::unistd::getppid().as_raw() != parent
    {
        sys::exit_now(1);
    }
    let _ = sys::set_name(c"fnlet-spawner");
    // A terminal's Ctrl-C or a service manager's SIGTERM to the whole group must not end the
    // helper before its parent has finished: it ends when its socket closes. Children clear
    // their mask before they exec (and the init blocks what it waits for anyway).
    // SAFETY: a set built with sigemptyset/sigaddset; blocking only affects this process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // Nothing of the parent's but stdio and the socket: a lock file or a listener copied here
    // would outlive the parent's own close.
    let keep = sock.as_raw_fd() as u32;
    if keep > 3 {
        let _ = sys::close_range(3, keep - 1, 0);
    }
    let _ = sys::close_range(keep + 1, u32::MAX, 0);

    let bounding = crate::image::bounding_sets();
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let Message {
            len,
            fds,
            truncated,
        } = match receive(&sock, &mut buf, &mut cmsg_space) {
            Ok(Message { len: 0, .. }) | Err(_) => sys::exit_now(0),
            Ok(msg) => msg,
        };
        let result = if truncated {
            Err(IsolateError::Protocol("request truncated"))
        } else {
            serve_one(&buf[..len], &fds, &bounding)
        };
        // The child has its copies: ours close, so the caller's pipes see EOF when it closes
        // its own.
        drop(fds);
        let (reply, pidfd) = match result {
            Ok((pid, pidfd)) => (Reply::Cloned { pid }, pidfd),
            Err(IsolateError::Sys { source, .. }) => (
                Reply::Failed {
                    errno: source as i32,
                    message: String::new(),
                },
                None,
            ),
            Err(e) => (
                Reply::Failed {
                    errno: 0,
                    message: e.to_string(),
                },
                None,
            ),
        };
        let Ok(bytes) = postcard::to_stdvec(&reply) else {
            sys::exit_now(1)
        };
        let raw: Vec<RawFd> = pidfd.iter().map(|f| f.as_raw_fd()).collect();
        if send(&sock, &bytes, &raw).is_err() {
            sys::exit_now(1);
        }
    }
}

/// One message, with `fds` attached (none: no control message).
fn send(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> std::result::Result<(), Errno> {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// A message off the socket: its length (0: the peer closed), the descriptors that came with
/// it (ours now), and whether either was cut short.
struct Message {
    len: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

fn receive(
    sock: &OwnedFd,
    buf: &mut [u8],
    cmsg_space: &mut [u8],
) -> std::result::Result<Message, Errno> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(got) = c {
                            // SAFETY: the kernel installed these descriptors for us.
                            fds.extend(
                                got.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                }
                return Ok(Message {
                    len: msg.bytes,
                    fds,
                    truncated: msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
                });
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One request: the child's image built here, then the clone (as the caller's child).
fn serve_one(
    msg: &[u8],
    fds: &[OwnedFd],
    bounding: &(Vec<caps::Capability>, Vec<u8>),
) -> Result<(libc::pid_t, Option<OwnedFd>)> {
    let req: Received =
        postcard::from_bytes(msg).map_err(|_| IsolateError::Protocol("unreadable request"))?;
    // The image's buffers are sized by what validation allows (the late variable's name).
    req.spec.validate()?;
    let layout = req.layout.0;
    let wanted = ORDER.iter().filter(|&&bit| layout & bit != 0).count();
    if wanted != fds.len() || layout & (REPORT | STATUS) != (REPORT | STATUS) {
        return Err(IsolateError::Protocol(
            "request's descriptors do not match its layout",
        ));
    }
    let mut given = fds.iter().map(|f| f.as_raw_fd());
    let mut take = |bit: u16| {
        if layout & bit != 0 {
            given.next()
        } else {
            None
        }
    };
    let stdio = [take(STDIN), take(STDOUT), take(STDERR)];
    let (Some(report), Some(status)) = (take(REPORT), take(STATUS)) else {
        return Err(IsolateError::Protocol("request without its report pipes"));
    };
    let child_fds = ChildFds {
        stdio,
        report,
        status,
        go: take(GO),
        netns: take(NETNS),
        start: take(START),
    };
    let cgroup_fd = take(CGROUP);
    let image = ChildImage::new(
        &req.spec,
        req.hold,
        req.plan,
        req.join_files,
        bounding,
        child_fds,
    )?;
    image.clone_child(req.flags | libc::CLONE_PARENT as u64, cgroup_fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relaunches_back_off_while_helpers_keep_getting_lost() {
        let s = Duration::from_secs;
        // The first relaunch, and one after a helper that served long enough: at once.
        assert_eq!(next_backoff(Duration::ZERO, None), Duration::ZERO);
        assert_eq!(next_backoff(s(8), Some(STABLE)), Duration::ZERO);
        // Lost again soon after a launch: 1, 2, 4 ... seconds, never past the cap.
        let mut wait = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..9 {
            wait = next_backoff(wait, Some(s(3)));
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn a_launch_of_something_that_is_no_helper_fails_and_leaves_no_child() {
        // `true` exits without a word: no Ready, so no helper, and the child is reaped.
        let e = launch(Path::new("/bin/true")).unwrap_err().to_string();
        assert!(e.contains("exited before it was ready"), "{e}");
        let e = launch(Path::new("/nonexistent/fnlet"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("launching /nonexistent/fnlet"), "{e}");
        let children = std::fs::read_to_string(format!(
            "/proc/self/task/{}/children",
            nix::unistd::gettid()
        ))
        .unwrap_or_default();
        assert_eq!(children.trim(), "", "children left: {children}");
    }

    fn spec() -> SandboxSpec {
        let mut spec = SandboxSpec {
            name: "wire".into(),
            program: "/var/task/bootstrap".into(),
            args: vec!["a".into(), "b c".into()],
            late_env: Some("REQ".into()),
            loopback_listener: Some(9001),
            ..Default::default()
        };
        spec.env.insert("K".into(), "v=1".into());
        spec
    }

    #[test]
    fn a_request_reads_back_as_the_helper_sees_it() {
        let spec = spec();
        let plan = Plan::build(&spec).unwrap();
        let join = [CString::new("/sys/fs/cgroup/pids/x/tasks").unwrap()];
        let wire = Wire {
            spec: &spec,
            plan: &plan,
            join_files: &join,
            hold: true,
            flags: 0x2000_0000,
            layout: Layout(REPORT | STATUS | START),
        };
        let bytes = postcard::to_stdvec(&wire).unwrap();
        assert!(bytes.len() < MAX_REQUEST);
        let got: Received = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(got.spec, spec);
        assert_eq!(format!("{:?}", got.plan), format!("{plan:?}"));
        assert_eq!(got.join_files, join);
        assert!(got.hold);
        assert_eq!(got.flags, 0x2000_0000);
        assert_eq!(got.layout.0, REPORT | STATUS | START);
    }

    #[test]
    fn descriptors_that_do_not_match_the_layout_are_refused_before_any_clone() {
        let spec = spec();
        let plan = Plan::build(&spec).unwrap();
        let wire = Wire {
            spec: &spec,
            plan: &plan,
            join_files: &[],
            hold: false,
            flags: 0,
            layout: Layout(REPORT | STATUS | STDOUT),
        };
        let bytes = postcard::to_stdvec(&wire).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let bounding = crate::image::bounding_sets();
        // Two descriptors for a layout of three.
        let err = serve_one(&bytes, &[r, w], &bounding).unwrap_err();
        assert!(matches!(err, IsolateError::Protocol(_)), "{err}");
        // Garbage is refused too.
        let err = serve_one(b"\xff\xff\xff", &[], &bounding).unwrap_err();
        assert!(matches!(err, IsolateError::Protocol(_)), "{err}");
        // And a spec the caller would not have sent (a late variable's name longer than its
        // buffer), before any buffer is filled.
        let bad = SandboxSpec {
            late_env: Some("N".repeat(300)),
            ..spec.clone()
        };
        let wire = Wire {
            spec: &bad,
            plan: &plan,
            join_files: &[],
            hold: true,
            flags: 0,
            layout: Layout(REPORT | STATUS),
        };
        let bytes = postcard::to_stdvec(&wire).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let err = serve_one(&bytes, &[r, w], &bounding).unwrap_err();
        assert!(
            matches!(
                err,
                IsolateError::InvalidSpec {
                    field: "late_env",
                    ..
                }
            ),
            "{err}"
        );
    }
}
