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

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    sock: Mutex<OwnedFd>,
    pid: libc::pid_t,
    alive: AtomicBool,
}

impl Spawner {
    /// Forks the helper. Call it early, from the main thread, while the process is small and
    /// has no other thread: the helper is a copy of the process as it is now.
    pub fn start() -> Result<Spawner> {
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
                Ok(Spawner {
                    sock: Mutex::new(ours),
                    pid,
                    alive: AtomicBool::new(true),
                })
            }
        }
    }

    /// The helper's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// False once the helper has been lost (it died or stopped answering); clones then happen
    /// in the caller again.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
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
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = send(&sock, &bytes, &attached) {
            // A datagram socket takes all or nothing: nothing went out.
            self.lost(&format!("sending a request failed: {e}"));
            return Err(HelperError::NotSent);
        }
        let mut buf = [0u8; 1024];
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let (len, pidfd) = match receive(&sock, &mut buf, &mut cmsg_space) {
            Ok(Message { len: 0, .. }) => {
                self.lost("it exited");
                return Err(gone("the spawn helper exited during a spawn"));
            }
            Ok(msg) => (msg.len, msg.fds.into_iter().next()),
            Err(e) => {
                self.lost(&format!("no reply ({e})"));
                return Err(gone("the spawn helper did not answer"));
            }
        };
        drop(sock);
        match postcard::from_bytes::<Reply>(&buf[..len]) {
            Ok(Reply::Cloned { pid }) => Ok((pid, pidfd)),
            Ok(Reply::Failed { errno, .. }) if errno != 0 => Err(HelperError::Failed(
                IsolateError::sys("clone3", Errno::from_raw(errno)),
            )),
            Ok(Reply::Failed { message, .. }) => {
                Err(HelperError::Failed(IsolateError::Spawner(message)))
            }
            Err(e) => {
                self.lost(&format!("an unreadable reply ({e})"));
                Err(gone("the spawn helper's reply was unreadable"))
            }
        }
    }

    /// Gives up on the helper: kills it (the drop reaps it); later clones happen in the caller.
    fn lost(&self, why: &str) {
        if self.alive.swap(false, Ordering::AcqRel) {
            tracing::error!(
                pid = self.pid,
                "the spawn helper is lost: {why}; sandboxes are cloned by this process from now on"
            );
            // SAFETY: signalling our own child, not yet reaped (so the pid is still its).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

fn gone(what: &str) -> HelperError {
    HelperError::Failed(IsolateError::Spawner(what.into()))
}

impl Drop for Spawner {
    fn drop(&mut self) {
        let sock = self.sock.get_mut().unwrap_or_else(|e| e.into_inner());
        // EOF on its socket ends the helper.
        let _ = nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
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
