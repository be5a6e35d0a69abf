//! A listening socket inside a sandbox's own network namespace, made from the host side.
//!
//! The function reaches it on its loopback while it has no other network, and it cannot reach
//! any other socket of the host: the socket belongs to the sandbox's namespace, the agent only
//! holds its file descriptor (the Lambda Runtime API is served this way).

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};

use nix::sched::{CloneFlags, setns};

use crate::error::{IsolateError, Result};

/// Binds 127.0.0.1:`port` in the network namespace of `pid` and returns the listener
/// (non-blocking, close-on-exec).
pub(crate) fn loopback_listener(pid: libc::pid_t, port: u16) -> Result<TcpListener> {
    in_netns(pid, || -> Result<TcpListener> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .map_err(|source| IsolateError::Listen { port, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| IsolateError::Listen { port, source })?;
        Ok(listener)
    })?
}

/// Runs `f` on a thread of its own inside the network namespace of `pid`: sockets it opens
/// belong to that namespace, wherever they are used afterwards.
pub(crate) fn in_netns<T: Send>(pid: libc::pid_t, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = File::open(&path).map_err(|source| IsolateError::Read {
        path: path.into(),
        source,
    })?;
    // setns changes the calling thread's namespace for good: do it on a thread of its own that
    // ends right after, never on one of the caller's (a pool thread would stay in the sandbox).
    let made = std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| IsolateError::sys("setns into the sandbox's netns", e))?;
            Ok(f())
        })
        .join()
    });
    made.map_err(|_| IsolateError::Protocol("netns thread panicked"))?
}
