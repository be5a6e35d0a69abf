//! The HTTP listener: accepts connections within the limits, serves each with hyper (HTTP/1.1,
//! and HTTP/2 with prior knowledge) and the API's router, and closes what a client leaves
//! hanging.
//!
//! - Each of `http_threads` threads runs an event loop of its own (a current-thread tokio
//!   runtime) on a listening socket of its own (one `SO_REUSEPORT` group; the kernel spreads
//!   connections over them). A connection, its calls and the instance connections those calls
//!   drive stay on one thread: no hand-off between threads per call (BENCHMARKS.md, Lambda
//!   run 8: ~5 -> ~0.5 context switches per warm call against tokio's multi-threaded runtime).
//! - A connection's first request head must come within `header_timeout` of the connect, each
//!   later head within it of its first byte; a kept-alive connection with no request for
//!   `idle_timeout` is closed ([`clock`]). Nothing times a request in flight.
//! - A request body that sends nothing for `body_timeout` is cut with 408 ([`body`]).
//! - Past `max_connections` open, or `max_connections_per_ip` from one client, new connections
//!   are closed at accept, counted in `fnlet_connections_refused_total{reason}` and logged at
//!   most once per 10 s per reason ([`admission`]).
//! - Accept errors (out of file descriptors) back off instead of spinning.
//! - On shutdown: stop accepting, let requests in flight finish, close idle connections.

mod admission;
mod body;
mod clock;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admission::{Refusal, SelfCheckPass, SelfChecks};
pub use body::{BodyTimeout, body_timeout};
pub use clock::Expiry;

use crate::config::LimitsConfig;
use crate::metrics::Metrics;
use admission::{Admission, Admitted, Throttle};
use body::TimedBody;
use clock::ConnClock;

/// At most one warning per reason (refusals, accept errors) this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest pause after a failed accept (out of file descriptors, say); the first is 10 ms.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// After the shutdown grace, when the remaining invocations have been killed, how long their
/// answers get to be written before the connections still open are dropped.
const WRITE_AFTER_KILL: Duration = Duration::from_secs(5);

/// The listener's limits, as the agent runs them.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u64,
    pub max_connections_per_ip: u64,
}

impl ListenerLimits {
    /// The configured limits, `max_connections` lowered to three quarters of the open-file
    /// limit `nofile`, and below what `instance_fds` (the descriptors live instances may hold
    /// at most) and 512 for logs and the store leave: the rest is for sandboxes.
    pub fn new(limits: &LimitsConfig, nofile: Option<u64>, instance_fds: u64) -> ListenerLimits {
        let mut max = limits.max_connections;
        if let Some(n) = nofile {
            let room = (n / 4 * 3).min(n.saturating_sub(instance_fds + 512)).max(1);
            if room < max {
                tracing::warn!(
                    max_connections = room,
                    configured = max,
                    open_files = n,
                    "serving fewer connections than limits.max_connections: the open-file \
                     limit leaves room for only this many (raise LimitNOFILE)"
                );
                max = room;
            }
        }
        ListenerLimits {
            header_timeout: Duration::from_secs_f64(limits.header_timeout_s),
            body_timeout: Duration::from_secs_f64(limits.body_timeout_s),
            idle_timeout: Duration::from_secs_f64(limits.idle_timeout_s),
            max_connections: max,
            max_connections_per_ip: limits.max_connections_per_ip,
        }
    }
}

/// Raises the soft open-file limit to the hard one (a connection is a descriptor, and so are
/// each sandbox's pipes) and logs what the agent has; returns the soft limit now in force.
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("reading the open-file limit (RLIMIT_NOFILE): {e}");
            return None;
        }
    };
    // Linux caps the limit at fs.nr_open, whatever "unlimited" says.
    let want = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if want <= soft {
        tracing::info!(
            open_files = soft,
            hard,
            "open-file limit (already the hard limit)"
        );
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => {
            tracing::info!(open_files = want, was = soft, "raised the open-file limit");
            Some(want)
        }
        Err(e) => {
            tracing::warn!(
                open_files = soft,
                hard,
                "could not raise the open-file limit: {e}"
            );
            Some(soft)
        }
    }
}

/// The API's listening sockets on `addr`: one per serving thread. With more than one they form
/// an `SO_REUSEPORT` group; a plain bind first, so that an address another process holds is
/// refused as with a single socket (else a second agent on the same port would take half of
/// this one's connections).
pub fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = std::net::TcpListener::bind(addr)?;
    if threads <= 1 {
        first.set_nonblocking(true)?;
        return Ok(vec![first]);
    }
    // Port 0: the port the kernel picked, for every socket of the group.
    let addr = first.local_addr()?;
    drop(first);
    (0..threads)
        .map(|_| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            s.listen(LISTEN_BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .collect()
}

thread_local! {
    static SERVING_THREAD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Which HTTP thread this is (None: not one of them). Each runs one event loop, so this also
/// names the loop that I/O first polled here is registered with.
pub fn serving_thread() -> Option<usize> {
    SERVING_THREAD.with(|t| t.get())
}

/// Pending connections per socket (tokio's default).
const LISTEN_BACKLOG: i32 = 1024;

/// The serving threads, kept running after the listener has stopped: tasks started by calls
/// (instances' owner tasks, answers finishing) live on them until the agent has stopped its
/// instances. Dropping this lets them end.
pub struct Threads {
    exit: CancellationToken,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}

/// Serves `router` on `listeners`, a thread each, until `shutdown` completes and every
/// connection has closed. Connections still open `WRITE_AFTER_KILL` after `kill` (the end of
/// the shutdown grace) are dropped.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    router: impl Into<super::Api>,
    limits: ListenerLimits,
    metrics: &Metrics,
    self_checks: SelfChecks,
    shutdown: impl Future<Output = ()>,
    kill: CancellationToken,
) -> std::io::Result<Threads> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper timer: its header timeout would also run while a kept-alive connection idles.
    // The connection's own clock does both.
    builder.http1().header_read_timeout(None);
    let shared = Arc::new(Shared {
        builder,
        router: router.into(),
        limits: limits.clone(),
        body_timeouts: metrics.connection_timeouts("body"),
        clock_timeouts: [Expiry::Header, Expiry::Idle]
            .map(|e| metrics.connection_timeouts(e.label())),
        admission: Admission::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            self_checks,
            metrics.connections_open.clone(),
        ),
        refused: Refusal::ALL.map(|r| metrics.connections_refused(r.label())),
        logs: Mutex::new(Logs {
            refusals: Refusal::ALL.map(|_| Throttle::new(LOG_EVERY)),
            errors: Throttle::new(LOG_EVERY),
        }),
    });
    tracing::info!(
        threads = listeners.len(),
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        header_timeout_s = limits.header_timeout.as_secs_f64(),
        body_timeout_s = limits.body_timeout.as_secs_f64(),
        idle_timeout_s = limits.idle_timeout.as_secs_f64(),
        "HTTP listener limits"
    );
    let threads = Threads {
        exit: CancellationToken::new(),
    };
    let stop = CancellationToken::new();
    let mut served = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (shared, stop, kill, exit) = (
            shared.clone(),
            stop.clone(),
            kill.clone(),
            threads.exit.clone(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Its blocking threads are started by the serving thread, whose CPU they would
            // inherit: they get every CPU instead.
            .on_thread_start(crate::placement::unpin_current_thread)
            .build()?;
        std::thread::Builder::new()
            .name(format!("fnlet-http-{i}"))
            .spawn(move || {
                SERVING_THREAD.with(|t| t.set(Some(i)));
                crate::placement::pin_serving_thread(i);
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve_socket(l, &shared, stop.cancelled(), kill).await,
                        Err(e) => tracing::error!("serving thread {i}: {e}"),
                    }
                    drop(done);
                    exit.cancelled().await;
                });
            })?;
        served.push(finished);
    }
    shutdown.await;
    stop.cancel();
    for finished in served {
        // An error here is a thread that panicked: it serves nothing either way.
        let _ = finished.await;
    }
    Ok(threads)
}

/// One thread's accept loop and connections, until `shutdown` and every connection closed.
async fn serve_socket(
    listener: TcpListener,
    shared: &Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    kill: CancellationToken,
) {
    let limits = &shared.limits;
    let closing = CancellationToken::new();
    let abandon = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut backoff = Duration::ZERO;
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) => {
                // The client gave up before we took it: nothing wrong here.
                if is_connection_error(&e) {
                    continue;
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                let line = shared.logs().errors.hit(Instant::now());
                if let Some(n) = line {
                    tracing::error!(
                        count = n,
                        retry_in_ms = backoff.as_millis() as u64,
                        open_connections = shared.admission.open(),
                        "accept error: {e}"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let admitted = match shared.admission.admit(peer) {
            Ok(a) => a,
            Err(why) => {
                let i = why as usize;
                shared.refused[i].inc();
                let line = shared.logs().refusals[i].hit(Instant::now());
                if let Some(n) = line {
                    tracing::warn!(
                        count = n,
                        client = %peer.ip(),
                        max_connections = limits.max_connections,
                        max_connections_per_ip = limits.max_connections_per_ip,
                        "refused {n} connection(s) at accept since the last such warning: {} \
                         reached (warned at most every {} s)",
                        why.key(),
                        LOG_EVERY.as_secs()
                    );
                }
                drop(tcp);
                continue;
            }
        };
        tasks.spawn(connection(
            tcp,
            peer,
            admitted,
            shared.clone(),
            closing.clone(),
            abandon.clone(),
        ));
    }
    drop(listener);
    closing.cancel();
    tasks.close();
    tracing::debug!(open = tasks.len(), "waiting for connections to close");
    tokio::select! {
        () = tasks.wait() => {}
        () = async {
            kill.cancelled().await;
            tokio::time::sleep(WRITE_AFTER_KILL).await;
        } => {
            tracing::warn!(
                open = tasks.len(),
                "dropping connections still open after the shutdown grace"
            );
            abandon.cancel();
            tasks.wait().await;
        }
    }
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// What every thread and connection shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    router: super::Api,
    limits: ListenerLimits,
    body_timeouts: Counter,
    /// By [`Expiry`]: header, idle.
    clock_timeouts: [Counter; 2],
    /// Open connections of every thread, within the limits.
    admission: Arc<Admission>,
    /// By [`Refusal`].
    refused: [Counter; 2],
    logs: Mutex<Logs>,
}

/// Warnings of every thread, each at most once per [`LOG_EVERY`].
struct Logs {
    /// By [`Refusal`].
    refusals: [Throttle; 2],
    errors: Throttle,
}

impl Shared {
    fn logs(&self) -> MutexGuard<'_, Logs> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection, from accept to close.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    shared: Arc<Shared>,
    closing: CancellationToken,
    abandon: CancellationToken,
) {
    // Answers are written whole; don't let Nagle hold their last segment back.
    let _ = tcp.set_nodelay(true);
    let limits = &shared.limits;
    let state = Arc::new(ConnState {
        clock: Mutex::new(ConnClock::new(
            Instant::now(),
            limits.header_timeout,
            limits.idle_timeout,
        )),
        changed: Notify::new(),
    });
    let io = TokioIo::new(TrackedIo {
        inner: tcp,
        state: state.clone(),
    });
    let service = ConnService {
        router: shared.router.clone(),
        state: state.clone(),
        peer,
        body_timeout: limits.body_timeout,
        body_timeouts: shared.body_timeouts.clone(),
    };
    let mut conn = pin!(shared.builder.serve_connection(io, service));
    let mut graceful = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                break;
            }
            why = state.expired() => {
                // No request is in flight: nothing is lost by dropping the connection.
                shared.clock_timeouts[why as usize].inc();
                tracing::debug!(%peer, timeout = why.label(), "closing the connection");
                break;
            }
            () = closing.cancelled(), if !graceful => {
                conn.as_mut().graceful_shutdown();
                graceful = true;
            }
            () = abandon.cancelled() => break,
        }
    }
    drop(admitted);
}

/// A connection's clock, and a wake-up for its watcher when the deadline may have moved
/// earlier (a head began, a request finished).
struct ConnState {
    clock: Mutex<ConnClock>,
    changed: Notify,
}

impl ConnState {
    fn clock(&self) -> MutexGuard<'_, ConnClock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes when the connection's deadline has passed with no request in flight.
    async fn expired(&self) -> Expiry {
        loop {
            let next = self.clock().deadline();
            match next {
                None => self.changed.notified().await,
                Some((at, why)) => {
                    if Instant::now() >= at {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }

    fn on_read(&self) {
        if self.clock().on_read(Instant::now()) {
            self.changed.notify_one();
        }
    }

    fn on_request(self: &Arc<Self>) -> InFlight {
        self.clock().on_request();
        InFlight(self.clone())
    }
}

/// A request in flight; dropped when its answer is done (or abandoned).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.clock().on_done(Instant::now()) {
            self.0.changed.notify_one();
        }
    }
}

/// The TCP stream, telling the connection's clock when bytes come in.
struct TrackedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The API's router as hyper calls it for one connection: the client's address as
/// `ConnectInfo`, the body timed, the request in flight until its answer's body is done.
#[derive(Clone)]
struct ConnService {
    router: super::Api,
    state: Arc<ConnState>,
    peer: SocketAddr,
    body_timeout: Duration,
    body_timeouts: Counter,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, mut req: Request<Incoming>) -> ServiceFuture {
        let in_flight = self.state.on_request();
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let (timeout, counter) = (self.body_timeout, self.body_timeouts.clone());
        let req = req.map(|b| Body::new(TimedBody::new(b, timeout, counter)));
        let router = self.router.clone();
        // The answer's future is made in the box: made here, its several KB would be copied
        // into it.
        Box::pin(async move {
            let resp = router.serve(req).await;
            Ok(resp.map(|inner| {
                Body::new(Answer {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// An answer's body, keeping its request in flight until hyper has taken all of it.
struct Answer {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
