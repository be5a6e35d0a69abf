//! Network namespaces: a listening socket inside a sandbox's own, made from the host side, and
//! a pool of namespaces made ahead of spawns.
//!
//! The function reaches the socket on its loopback while it has no other network, and it
//! cannot reach any other socket of the host: the socket belongs to the sandbox's namespace, the
//! agent only holds its file descriptor (the Lambda Runtime API is served this way).

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// Network namespaces made ahead of spawns, their loopback already up, held as fds.
///
/// A network namespace is by far the dearest namespace to create (0.5-0.6 ms on the bench host,
/// against tens of microseconds for each of the others; bringing its lo up is another 0.1 ms).
/// A spawn takes one from here and its child joins it with setns, which costs microseconds;
/// the pool's thread makes the next one while nothing waits. Each namespace goes to one
/// sandbox only and is never handed out twice. The thread starts at the first [`take`], so an
/// isolator that never spawns (or only once, as the CLI) makes none ahead.
///
/// [`take`]: NetnsPool::take
#[derive(Debug)]
pub(crate) struct NetnsPool {
    shared: Arc<Shared>,
    /// How many to keep ready; 0: none (every spawn creates its own with CLONE_NEWNET).
    target: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<PoolState>,
    wake: Condvar,
    /// The pool thread's tid, once it runs (tests look at its namespace).
    #[cfg(test)]
    tid: std::sync::atomic::AtomicI32,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: Vec<OwnedFd>,
    started: bool,
    stop: bool,
}

/// After a failure to make one (say the host's limit on network namespaces), the thread
/// waits this long before it tries again; spawns meanwhile create their own.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl NetnsPool {
    pub(crate) fn new(target: usize) -> NetnsPool {
        NetnsPool {
            shared: Arc::default(),
            target,
            thread: Mutex::new(None),
        }
    }

    /// A network namespace made ahead, if one is ready; the pool then makes the next. None
    /// when the pool is off, empty or failing: the caller creates its own.
    pub(crate) fn take(&self) -> Option<OwnedFd> {
        if self.target == 0 {
            return None;
        }
        let mut state = self.shared.state.lock().ok()?;
        if !state.started {
            state.started = true;
            let shared = Arc::clone(&self.shared);
            let target = self.target;
            // A thread that cannot start leaves the pool empty: spawns create their own.
            if let Ok(handle) = std::thread::Builder::new()
                .name("fnlet-netns".into())
                .spawn(move || make_ahead(&shared, target))
                && let Ok(mut slot) = self.thread.lock()
            {
                *slot = Some(handle);
            }
        }
        let taken = state.ready.pop();
        self.shared.wake.notify_one();
        taken
    }

    /// How many are ready now.
    pub(crate) fn ready(&self) -> usize {
        self.shared.state.lock().map(|s| s.ready.len()).unwrap_or(0)
    }
}

impl Drop for NetnsPool {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(handle) = self.thread.get_mut().ok().and_then(Option::take) {
            let _ = handle.join();
        }
        // The namespaces still ready go with their fds: nothing else holds them.
    }
}

/// The pool's thread: keeps `target` namespaces ready until the pool is dropped.
fn make_ahead(shared: &Shared, target: usize) {
    // The namespace to come back to after making each one, so this thread is never inside a
    // namespace a sandbox uses.
    let Ok(home) = File::open("/proc/thread-self/ns/net") else {
        return;
    };
    #[cfg(test)]
    shared.tid.store(
        nix::unistd::gettid().as_raw(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut failing = false;
    loop {
        {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            loop {
                if state.stop {
                    return;
                }
                if state.ready.len() < target && !failing {
                    break;
                }
                if failing {
                    state = match shared.wake.wait_timeout(state, RETRY_AFTER) {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    };
                    failing = false;
                } else {
                    state = match shared.wake.wait(state) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                }
            }
        }
        match make_one(&home) {
            Made::Ready(fd) => match shared.state.lock() {
                Ok(mut state) => state.ready.push(fd),
                Err(_) => return,
            },
            Made::Failed => failing = true,
            // Stuck in a namespace of its own: stop rather than make any while inside one.
            Made::Stranded => return,
        }
    }
}

enum Made {
    Ready(OwnedFd),
    Failed,
    Stranded,
}

/// Makes one network namespace on this thread, brings its lo up, keeps an fd to it and
/// returns the thread to `home`.
fn make_one(home: &File) -> Made {
    if nix::sched::unshare(CloneFlags::CLONE_NEWNET).is_err() {
        return Made::Failed;
    }
    let made = File::open("/proc/thread-self/ns/net")
        .ok()
        .filter(|_| crate::sys::loopback_up().is_ok());
    if setns(home, CloneFlags::CLONE_NEWNET).is_err() {
        return Made::Stranded;
    }
    match made {
        Some(ns) => Made::Ready(ns.into()),
        None => Made::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn netns_ino(path: &str) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    fn fd_ino(fd: &OwnedFd) -> u64 {
        File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    fn wait_ready(pool: &NetnsPool, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.ready() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool did not make {n} namespaces in 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Made only after the first take; each namespace is new, distinct, not the host's, handed
    /// out once; the pool's thread is back in the host's namespace between makes.
    #[test]
    fn namespaces_are_made_after_the_first_take_and_each_is_new() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes network namespaces: run it as root"
        );
        let pool = NetnsPool::new(2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.ready(), 0, "nothing is made before the first take");
        assert!(pool.take().is_none(), "the first take finds none ready");
        wait_ready(&pool, 2);
        let host = netns_ino("/proc/self/ns/net");
        let mut seen = std::collections::HashSet::new();
        // Held to the end, so that no namespace's inode number is freed and reused.
        let mut held = Vec::new();
        for _ in 0..5 {
            wait_ready(&pool, 1);
            let ns = pool.take().expect("a ready namespace");
            let ino = fd_ino(&ns);
            assert_ne!(ino, host, "a pooled namespace is not the host's");
            assert!(seen.insert(ino), "namespace {ino} handed out twice");
            held.push(ns);
        }
        wait_ready(&pool, 2);
        let tid = pool.shared.tid.load(std::sync::atomic::Ordering::Relaxed);
        assert!(tid > 0, "the pool's thread runs");
        assert_eq!(
            netns_ino(&format!("/proc/self/task/{tid}/ns/net")),
            host,
            "the pool's thread stays in the host's namespace between makes"
        );
    }

    /// Its lo is up: a listener on 127.0.0.1 in the namespace accepts a connection there.
    #[test]
    fn a_pooled_namespace_has_its_loopback_up() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes network namespaces: run it as root"
        );
        let pool = NetnsPool::new(1);
        assert!(pool.take().is_none());
        wait_ready(&pool, 1);
        let ns = File::from(pool.take().unwrap());
        let connected = std::thread::scope(|s| {
            s.spawn(|| {
                setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
                std::net::TcpStream::connect(l.local_addr().unwrap()).is_ok()
            })
            .join()
            .unwrap()
        });
        assert!(
            connected,
            "connect to 127.0.0.1 inside the pooled namespace"
        );
    }

    #[test]
    fn a_pool_of_none_makes_none() {
        let pool = NetnsPool::new(0);
        assert!(pool.take().is_none());
        assert!(pool.thread.lock().unwrap().is_none());
    }
}
