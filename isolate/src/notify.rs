//! A sandbox whose loopback service is reached over a Unix socket pair: the function's
//! `connect` calls stop for a verdict (seccomp user notification, the filter
//! [`crate::seccomp::connect_program`]), and one to 127.0.0.1:PORT gets one end of a fresh
//! socket pair in place of its TCP socket (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SETFD`), the
//! caller the other. Every other `connect` proceeds as if nothing had looked at it.
//!
//! Why: a loopback TCP round trip costs about 1.6x a Unix socket's here (BENCHMARKS.md, Lambda
//! run 14), and an instance's Runtime API makes two per call. Runtime clients dial
//! `AWS_LAMBDA_RUNTIME_API` over TCP and cannot be told otherwise.
//!
//! What a client sees afterwards: `connect` succeeded (at once, even when non-blocking), the
//! socket works as before, `TCP_NODELAY` and other TCP options set on it succeed (they are
//! answered here: a Unix socket would refuse them with EOPNOTSUPP), and `getpeername` names an
//! unnamed Unix socket. The address is compared only to decide the swap; the function could
//! change it in between, which affects nothing but its own connection.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use nix::errno::Errno;

use crate::error::{IsolateError, Result};
use crate::sys;

/// How many swapped sockets are remembered for their TCP options (a runtime keeps one or two).
const REMEMBERED: usize = 64;

/// The caller's side of a sandbox's connect filter. Poll its fd for readability, then call
/// [`ConnectNotifier::answer`]. Dropping it makes any connect still waiting fail (ENOSYS),
/// and the function's later ones too: keep it as long as the sandbox.
#[derive(Debug)]
pub struct ConnectNotifier {
    fd: OwnedFd,
    port: u16,
    /// Socket inodes of the pair ends handed to the function, newest last.
    swapped: Mutex<VecDeque<u64>>,
}

/// What [`ConnectNotifier::answer`] did.
#[derive(Debug)]
pub enum Answer {
    /// Nothing was pending (a stale wake-up, or the caller gave up and its call went away).
    Idle,
    /// A call that is not ours to change went on unchanged.
    Passed,
    /// A connect to the service: the function has one end, this is the other (non-blocking).
    Swapped(UnixStream),
    /// No task of the sandbox can make a call any more: nothing will be pending again.
    Closed,
}

impl AsFd for ConnectNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for ConnectNotifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

enum Verdict {
    /// Let the call go on unchanged.
    Proceed,
    /// Answered here.
    Answered,
    Swapped(UnixStream),
}

/// One received call: the notification's id and the calling thread (a host tid).
struct Call {
    id: u64,
    tid: libc::pid_t,
    nr: i32,
    args: [u64; 6],
}

impl ConnectNotifier {
    pub(crate) fn new(fd: OwnedFd, port: u16) -> ConnectNotifier {
        ConnectNotifier {
            fd,
            port,
            swapped: Mutex::new(VecDeque::new()),
        }
    }

    /// Answers the call that is pending, if one is: never blocks.
    pub fn answer(&self) -> Result<Answer> {
        match poll_now(&self.fd)? {
            Pending::Nothing => return Ok(Answer::Idle),
            Pending::Closed => return Ok(Answer::Closed),
            Pending::Call => {}
        }
        let Some(call) = self.receive()? else {
            return Ok(Answer::Idle);
        };
        let verdict = match call.nr as libc::c_long {
            libc::SYS_connect => self.connect(&call),
            libc::SYS_setsockopt => self.tcp_option(&call),
            _ => Ok(Verdict::Proceed),
        };
        match verdict {
            Ok(Verdict::Swapped(ours)) => Ok(Answer::Swapped(ours)),
            Ok(Verdict::Answered) => Ok(Answer::Passed),
            Ok(Verdict::Proceed) => self.proceed(&call).map(|()| Answer::Passed),
            // The caller is gone (killed while it waited): nothing to answer.
            Err(Errno::ENOENT) => Ok(Answer::Idle),
            Err(e) => {
                // Whatever went wrong here, the call goes on as it would have without us (a
                // connect reaches the TCP listener still behind the address).
                tracing::debug!(errno = %e, nr = call.nr, "connect notification passed on");
                self.proceed(&call).map(|()| Answer::Passed)
            }
        }
    }

    /// Answers every call until no task of the sandbox can make one (the sandbox has ended);
    /// each swapped connect's other end goes to `on_pair`. Needs a tokio runtime.
    pub async fn answer_all(self, mut on_pair: impl FnMut(UnixStream)) -> Result<()> {
        let afd = crate::register_readable(self.fd.as_fd(), "register seccomp listener")?;
        loop {
            let mut ready = afd
                .readable()
                .await
                .map_err(|e| IsolateError::sys("poll seccomp listener", crate::errno_of(&e)))?;
            match self.answer()? {
                Answer::Swapped(ours) => on_pair(ours),
                Answer::Passed => {}
                Answer::Idle => ready.clear_ready(),
                Answer::Closed => return Ok(()),
            }
        }
    }

    fn receive(&self) -> Result<Option<Call>> {
        // SAFETY: seccomp_notif is plain data; RECV wants it zeroed.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV fills `req`, a live struct of the size the ioctl encodes.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut req as *mut libc::seccomp_notif,
            )
        };
        if r < 0 {
            return match Errno::last() {
                // Gone before we took it (its caller was interrupted or killed).
                Errno::ENOENT | Errno::EINTR => Ok(None),
                e => Err(IsolateError::sys("seccomp notification receive", e)),
            };
        }
        Ok(Some(Call {
            id: req.id,
            tid: req.pid as libc::pid_t,
            nr: req.data.nr,
            args: req.data.args,
        }))
    }

    /// A connect: swapped when it names our port on 127.0.0.1 and the socket is a TCP one.
    fn connect(&self, call: &Call) -> std::result::Result<Verdict, Errno> {
        let (fd, addr, len) = (call.args[0] as RawFd, call.args[1], call.args[2]);
        if len < std::mem::size_of::<libc::sockaddr_in>() as u64 {
            return Ok(Verdict::Proceed);
        }
        let mut raw = [0u8; std::mem::size_of::<libc::sockaddr_in>()];
        read_memory(call.tid, addr, &mut raw)?;
        // sockaddr_in: family (host order), port and address (network order).
        let family = u16::from_ne_bytes([raw[0], raw[1]]);
        let port = u16::from_be_bytes([raw[2], raw[3]]);
        let ip = [raw[4], raw[5], raw[6], raw[7]];
        if family != libc::AF_INET as u16 || port != self.port || ip != [127, 0, 0, 1] {
            return Ok(Verdict::Proceed);
        }
        let flags = fd_flags(call.tid, fd)?;
        // Not a socket: ENOTSOCK here, and the connect goes on to fail as it would.
        let theirs = take_fd(call.tid, fd)?;
        if sys::socket_option(&theirs, libc::SO_DOMAIN)? != libc::AF_INET
            || sys::socket_option(&theirs, libc::SO_TYPE)? != libc::SOCK_STREAM
        {
            return Ok(Verdict::Proceed);
        }
        drop(theirs);
        // Still the call we read (its thread did not die and its tid was not reused).
        self.still_valid(call)?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| crate::errno_of(&e))?;
        ours.set_nonblocking(true)
            .map_err(|e| crate::errno_of(&e))?;
        theirs
            .set_nonblocking(flags & libc::O_NONBLOCK as u32 != 0)
            .map_err(|e| crate::errno_of(&e))?;
        let their_ino = sys::inode(theirs.as_fd())?;
        let addfd = libc::seccomp_notif_addfd {
            id: call.id,
            flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
            srcfd: theirs.as_raw_fd() as u32,
            newfd: fd as u32,
            newfd_flags: if flags & libc::O_CLOEXEC as u32 != 0 {
                libc::O_CLOEXEC as u32
            } else {
                0
            },
        };
        // SAFETY: ADDFD reads `addfd`, a live struct of the size the ioctl encodes; it
        // installs a copy of `theirs` in the caller's table at `fd`, closing what was there.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ADDFD,
                &addfd as *const libc::seccomp_notif_addfd,
            )
        };
        if r < 0 {
            return Err(Errno::last());
        }
        self.remember(their_ino);
        self.respond(call.id, 0, 0)?;
        Ok(Verdict::Swapped(ours))
    }

    /// A TCP-level setsockopt: answered as done on a socket we swapped, else let through.
    fn tcp_option(&self, call: &Call) -> std::result::Result<Verdict, Errno> {
        let ino = socket_inode(call.tid, call.args[0] as RawFd)?;
        if !ino.is_some_and(|ino| self.lock().contains(&ino)) {
            return Ok(Verdict::Proceed);
        }
        self.respond(call.id, 0, 0)?;
        Ok(Verdict::Answered)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.swapped.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, ino: u64) {
        let mut swapped = self.lock();
        if swapped.len() == REMEMBERED {
            swapped.pop_front();
        }
        swapped.push_back(ino);
    }

    fn still_valid(&self, call: &Call) -> std::result::Result<(), Errno> {
        let id = call.id;
        // SAFETY: ID_VALID reads a u64 from a live local.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &id as *const u64,
            )
        };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
    }

    /// The call returns `val` (error 0) or fails with `error`.
    fn respond(&self, id: u64, val: i64, error: i32) -> std::result::Result<(), Errno> {
        self.send(libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags: 0,
        })
    }

    /// The call goes on in the kernel as if it had not stopped here.
    fn proceed(&self, call: &Call) -> Result<()> {
        match self.send(libc::seccomp_notif_resp {
            id: call.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        }) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(IsolateError::sys("seccomp notification answer", e)),
        }
    }

    fn send(&self, mut resp: libc::seccomp_notif_resp) -> std::result::Result<(), Errno> {
        // SAFETY: SEND reads `resp`, a live struct of the size the ioctl encodes.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp as *mut libc::seccomp_notif_resp,
            )
        };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
    }
}

enum Pending {
    Nothing,
    Call,
    Closed,
}

/// Whether a call waits (RECV would block otherwise), without waiting.
fn poll_now(fd: &OwnedFd) -> Result<Pending> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, no timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r < 0 {
        let e = Errno::last();
        if e == Errno::EINTR {
            return Ok(Pending::Nothing);
        }
        return Err(IsolateError::sys("poll seccomp listener", e));
    }
    Ok(if pfd.revents & libc::POLLIN != 0 {
        Pending::Call
    } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        Pending::Closed
    } else {
        Pending::Nothing
    })
}

/// Reads `buf.len()` bytes at `addr` in the memory of thread `tid`.
fn read_memory(tid: libc::pid_t, addr: u64, buf: &mut [u8]) -> std::result::Result<(), Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` covers `buf`, which lives for the call; the remote range is only read
    // by the kernel from the other process (a bad address is EFAULT, not our fault).
    let n = unsafe { libc::process_vm_readv(tid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(Errno::last());
    }
    if n as usize != buf.len() {
        return Err(Errno::EFAULT);
    }
    Ok(())
}

/// A copy of `fd` of the process thread `tid` belongs to.
fn take_fd(tid: libc::pid_t, fd: RawFd) -> std::result::Result<OwnedFd, Errno> {
    let tgid = thread_group(tid)?;
    let pidfd = sys::pidfd_open(tgid)?;
    sys::pidfd_getfd(pidfd.as_fd(), fd)
}

/// The process (thread group) of thread `tid`, from /proc (a tid's pidfd needs kernel 6.9).
fn thread_group(tid: libc::pid_t) -> std::result::Result<libc::pid_t, Errno> {
    let status =
        std::fs::read_to_string(format!("/proc/{tid}/status")).map_err(|e| crate::errno_of(&e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(Errno::ESRCH)
}

/// The open flags of thread `tid`'s `fd` (octal in fdinfo): `O_CLOEXEC` is the fd's own.
fn fd_flags(tid: libc::pid_t, fd: RawFd) -> std::result::Result<u32, Errno> {
    let info = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}"))
        .map_err(|e| crate::errno_of(&e))?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or(Errno::EINVAL)
}

/// The inode of thread `tid`'s `fd` when it is a socket (its /proc link reads `socket:[N]`).
fn socket_inode(tid: libc::pid_t, fd: RawFd) -> std::result::Result<Option<u64>, Errno> {
    let link =
        std::fs::read_link(format!("/proc/{tid}/fd/{fd}")).map_err(|e| crate::errno_of(&e))?;
    Ok(parse_socket_link(&link.to_string_lossy()))
}

fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(parse_socket_link("socket:[12345]"), Some(12345));
        assert_eq!(parse_socket_link("pipe:[12345]"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
    }
}
