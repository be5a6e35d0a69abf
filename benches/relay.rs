//! The Runtime API's own floor, for the Lambda bench: the least an agent can do per warm call.
//!
//! Relays between HTTP callers and N copies of the no-op runtime, run as plain processes (no
//! sandbox). Per call each makes the Runtime API's exchange and nothing else: read the caller's
//! request, read the runtime's parked `GET /next`, write the event, read its `POST
//! .../response`, write the answer to the caller, then the `202` to the runtime. No routing,
//! logs, metrics or limits. Four modes of the bench binary, each adding one thing:
//! - [`main`]: a thread per caller and blocking I/O, six system calls per call. Against nginx,
//!   what the Runtime API's shape costs on this host;
//! - [`main_evented`]: on tokio, one current-thread runtime per CPU as the agent's HTTP
//!   threads. Against the blocking relay, what the event loop costs;
//! - [`main_hyper`]: with hyper's HTTP/1 server on the callers' side;
//! - [`main_hyper_both`]: with hyper's server on both sides and channels between them, as an
//!   agent is commonly built. Against fnlet, what fnlet's own layers cost.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Request, read_request};

/// The role's environment: how many runtimes, and which bootstrap.
pub const INSTANCES_ENV: &str = "FNLET_BENCH_RELAY_INSTANCES";
pub const BOOTSTRAP_ENV: &str = "FNLET_BENCH_RELAY_BOOTSTRAP";

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"OK\"}";

/// A runtime's kept-alive connection and what was read past the last request.
struct Runtime {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Idle runtimes, most recently used on top (a warm one-client run keeps one runtime busy).
struct Pool {
    idle: Mutex<Vec<Runtime>>,
    freed: Condvar,
}

impl Pool {
    fn take(&self) -> Runtime {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = idle.pop() {
                return r;
            }
            idle = self.freed.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn put(&self, r: Runtime) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(r);
        self.freed.notify_one();
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The relay's main: starts the runtimes with `env(api)`, prints "port pid,pid,..." once all
/// have connected, serves callers until its stdin closes, then kills and reaps the runtimes.
pub fn main(env: impl Fn(&str) -> BTreeMap<String, String>) -> ! {
    let callers = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail("bind", &e));
    let (children, conns) = start_runtimes(env);
    let pool = Arc::new(Pool {
        idle: Mutex::new(Vec::with_capacity(conns.len())),
        freed: Condvar::new(),
    });
    for s in conns {
        pool.put(Runtime {
            stream: s,
            buf: Vec::with_capacity(4096),
        });
    }
    announce(callers.local_addr().map_or(0, |a| a.port()), &children);
    std::thread::spawn(move || serve_until_stdin_closes(children));
    for s in callers.incoming().flatten() {
        let pool = pool.clone();
        std::thread::spawn(move || serve_caller(s, &pool));
    }
    std::process::exit(0)
}

fn fail(what: &str, e: &dyn std::fmt::Display) -> ! {
    eprintln!("relay floor: {what}: {e}");
    std::process::exit(1)
}

/// Starts the role's runtimes (`INSTANCES_ENV` copies of `BOOTSTRAP_ENV`) against a Runtime
/// API listener of ours; returns them and their connections, once every one has connected.
fn start_runtimes(env: impl Fn(&str) -> BTreeMap<String, String>) -> (Vec<Child>, Vec<TcpStream>) {
    let n: usize = std::env::var(INSTANCES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| fail(INSTANCES_ENV, &"not a count above 0"));
    let bootstrap = std::env::var_os(BOOTSTRAP_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| fail(BOOTSTRAP_ENV, &"unset"));
    let api = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail("bind", &e));
    let api_addr = api
        .local_addr()
        .unwrap_or_else(|e| fail("local_addr", &e))
        .to_string();
    let children = (0..n)
        .map(|_| {
            Command::new(&bootstrap)
                .env_clear()
                .envs(env(&api_addr))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| fail(&format!("starting {}", bootstrap.display()), &e))
        })
        .collect();
    let conns = (0..n)
        .map(|_| {
            let (s, _) = api.accept().unwrap_or_else(|e| fail("accept", &e));
            s.set_nodelay(true)
                .unwrap_or_else(|e| fail("TCP_NODELAY", &e));
            s
        })
        .collect();
    (children, conns)
}

/// The ready line the bench waits for: the callers' port and the runtimes' pids.
fn announce(port: u16, children: &[Child]) {
    let pids: Vec<String> = children.iter().map(|c| c.id().to_string()).collect();
    println!("{port} {}", pids.join(","));
    let _ = std::io::stdout().flush();
}

/// Waits for the bench to close our stdin, then kills and reaps the runtimes and exits.
fn serve_until_stdin_closes(mut children: Vec<Child>) -> ! {
    let mut b = [0u8; 64];
    while matches!(std::io::stdin().read(&mut b), Ok(n) if n > 0) {}
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    std::process::exit(0)
}

fn serve_caller(mut caller: TcpStream, pool: &Pool) {
    let _ = caller.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    // A caller that closes its connection ends this thread; a runtime that misbehaves ends
    // the relay, so the bench sees its errors rather than a slower floor.
    while let Ok(req) = read_request(&mut caller, &mut buf) {
        let mut rt = pool.take();
        let answered = match exchange(&mut rt, &req, &mut caller) {
            Ok(answered) => answered,
            Err(e) => {
                eprintln!("relay floor: {e}");
                std::process::exit(1);
            }
        };
        pool.put(rt);
        if req.close || !answered {
            return;
        }
    }
}

/// One invocation: the event to the runtime's parked `GET /next`, its answer to the caller.
/// Errs on the runtime's side only; returns whether the caller took the answer (a load
/// generator may close its connections with calls in flight).
fn exchange(rt: &mut Runtime, req: &Request, caller: &mut TcpStream) -> Result<bool, String> {
    check_next(&read_request(&mut rt.stream, &mut rt.buf)?)?;
    let (id, event) = event_for(&req.body);
    rt.stream
        .write_all(&event)
        .map_err(|e| format!("writing the event: {e}"))?;
    let resp = read_request(&mut rt.stream, &mut rt.buf)?;
    check_response(&resp, &id)?;
    // The caller first, as fnlet does: the 202 is off the caller's path.
    let answered = caller.write_all(&answer_for(&resp.body)).is_ok();
    rt.stream
        .write_all(ACCEPTED)
        .map_err(|e| format!("writing the 202: {e}"))?;
    Ok(answered)
}

/// A request id not used before in this process.
fn next_id() -> String {
    format!(
        "00000000-0000-4000-8000-{:012x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh request id and the `/next` answer carrying `body` as the event.
fn event_for(body: &[u8]) -> (String, Vec<u8>) {
    let id = next_id();
    let deadline_ms = SystemTime::now()
        .checked_add(Duration::from_secs(crate::TIMEOUT_S))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nlambda-runtime-aws-request-id: {id}\r\n\
         lambda-runtime-deadline-ms: {deadline_ms}\r\n\
         lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:000000000000:function:noop-relay\r\n\
         lambda-runtime-trace-id: Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    (id, out)
}

/// The runtime's request must be the `GET /next` it parks between invocations.
fn check_next(next: &Request) -> Result<(), String> {
    if next.method != "GET" || next.path != NEXT {
        return Err(format!(
            "expected GET {NEXT}, got {} {}",
            next.method, next.path
        ));
    }
    Ok(())
}

/// The runtime's request must be its answer to the invocation `id`.
fn check_response(resp: &Request, id: &str) -> Result<(), String> {
    let want = format!("/2018-06-01/runtime/invocation/{id}/response");
    if resp.method != "POST" || resp.path != want {
        return Err(format!(
            "expected POST {want}, got {} {}",
            resp.method, resp.path
        ));
    }
    Ok(())
}

/// The caller's answer: the runtime's response body.
fn answer_for(body: &[u8]) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

/// The same relay on tokio, shaped as the agent's HTTP side: one current-thread runtime per
/// CPU, each with its own caller listener in one `SO_REUSEPORT` group and its own share of the
/// runtimes' connections. Its figure against the blocking relay is what an event loop costs;
/// fnlet's against it, what the layers above one cost.
pub fn main_evented(env: impl Fn(&str) -> BTreeMap<String, String>) -> ! {
    run_evented(env, serve_caller_evented)
}

/// The relay on tokio with hyper's HTTP/1 server on the callers' side (the runtimes' side as
/// in [`main_evented`]): what hyper's server connection costs per call, as the agent's callers
/// pay it.
pub fn main_hyper(env: impl Fn(&str) -> BTreeMap<String, String>) -> ! {
    run_evented(env, serve_caller_hyper)
}

/// The threads of the relays on tokio; `serve` serves one caller's connection.
fn run_evented<F, Fut>(env: impl Fn(&str) -> BTreeMap<String, String>, serve: F) -> !
where
    F: Fn(tokio::net::TcpStream, std::rc::Rc<LocalPool>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    use tokio::net::TcpSocket;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let (children, conns) = start_runtimes(env);
    // Round robin: thread i serves runtimes i, i + threads, ...
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in conns.into_iter().enumerate() {
        s.set_nonblocking(true)
            .unwrap_or_else(|e| fail("O_NONBLOCK", &e));
        shares[i % threads].push(s);
    }
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<u16>();
    let mut port = 0u16;
    for (i, share) in shares.into_iter().enumerate() {
        let bound_tx = bound_tx.clone();
        let want = port;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| fail("tokio", &e));
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = TcpSocket::new_v4()
                    .and_then(|s| {
                        s.set_reuseport(true)?;
                        s.bind(([127, 0, 0, 1], want).into())?;
                        s.listen(1024)
                    })
                    .unwrap_or_else(|e| fail(&format!("listening (thread {i})"), &e));
                let _ = bound_tx.send(listener.local_addr().map_or(0, |a| a.port()));
                let pool = std::rc::Rc::new(LocalPool {
                    idle: std::cell::RefCell::new(
                        share
                            .into_iter()
                            .filter_map(|s| tokio::net::TcpStream::from_std(s).ok())
                            .map(|stream| EventedRuntime {
                                stream,
                                buf: Vec::with_capacity(4096),
                            })
                            .collect(),
                    ),
                    freed: tokio::sync::Notify::new(),
                });
                while let Ok((s, _)) = listener.accept().await {
                    tokio::task::spawn_local(serve(s, pool.clone()));
                }
            });
        });
        port = bound_rx
            .recv()
            .unwrap_or_else(|e| fail("a serving thread", &e));
    }
    announce(port, &children);
    serve_until_stdin_closes(children)
}

struct EventedRuntime {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One thread's idle runtimes; tasks of that thread only.
struct LocalPool {
    idle: std::cell::RefCell<Vec<EventedRuntime>>,
    freed: tokio::sync::Notify,
}

async fn read_request_evented(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Request, String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(r) = crate::parse_request(buf)? {
            buf.drain(..r.len);
            return Ok(r);
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading a request: {e}"))?;
        if n == 0 {
            return Err("the peer closed its connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An idle runtime of this thread, waiting for one if all are busy.
async fn take_runtime(pool: &LocalPool) -> EventedRuntime {
    loop {
        let freed = pool.freed.notified();
        if let Some(r) = pool.idle.borrow_mut().pop() {
            return r;
        }
        freed.await;
    }
}

fn put_runtime(pool: &LocalPool, rt: EventedRuntime) {
    pool.idle.borrow_mut().push(rt);
    pool.freed.notify_one();
}

/// The event to the runtime's parked `GET /next`; returns its answer's body.
async fn exchange_evented(rt: &mut EventedRuntime, event: &[u8]) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    check_next(&read_request_evented(&mut rt.stream, &mut rt.buf).await?)?;
    let (id, event) = event_for(event);
    rt.stream
        .write_all(&event)
        .await
        .map_err(|e| format!("writing the event: {e}"))?;
    let resp = read_request_evented(&mut rt.stream, &mut rt.buf).await?;
    check_response(&resp, &id)?;
    Ok(resp.body)
}

async fn serve_caller_hyper(caller: tokio::net::TcpStream, pool: std::rc::Rc<LocalPool>) {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let _ = caller.set_nodelay(true);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let pool = pool.clone();
        async move {
            let event = req.into_body().collect().await?.to_bytes();
            let mut rt = take_runtime(&pool).await;
            let answer = match exchange_evented(&mut rt, &event).await {
                Ok(answer) => answer,
                Err(e) => {
                    eprintln!("relay floor with hyper: {e}");
                    std::process::exit(1);
                }
            };
            // The 202 after hyper has written the answer, as fnlet orders them.
            tokio::task::spawn_local(async move {
                if let Err(e) = rt.stream.write_all(ACCEPTED).await {
                    eprintln!("relay floor with hyper: writing the 202: {e}");
                    std::process::exit(1);
                }
                put_runtime(&pool, rt);
            });
            Ok::<_, hyper::Error>(json_response(answer.into()))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(caller), service)
        .await;
}

/// A response of JSON `body`, as hyper serves it.
fn json_response(body: bytes::Bytes) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut resp = hyper::Response::new(http_body_util::Full::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn serve_caller_evented(mut caller: tokio::net::TcpStream, pool: std::rc::Rc<LocalPool>) {
    use tokio::io::AsyncWriteExt;
    let _ = caller.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    while let Ok(req) = read_request_evented(&mut caller, &mut buf).await {
        let mut rt = take_runtime(&pool).await;
        let answer = match exchange_evented(&mut rt, &req.body).await {
            Ok(body) => answer_for(&body),
            Err(e) => {
                eprintln!("relay floor on tokio: {e}");
                std::process::exit(1);
            }
        };
        let answered = caller.write_all(&answer).await.is_ok();
        if let Err(e) = rt.stream.write_all(ACCEPTED).await {
            eprintln!("relay floor on tokio: writing the 202: {e}");
            std::process::exit(1);
        }
        put_runtime(&pool, rt);
        if req.close || !answered {
            return;
        }
    }
}

/// The relay on tokio with hyper on both sides, as an agent is commonly built: each runtime's
/// connection served by hyper's HTTP/1 server (its `GET /next` waits on a channel, its answer
/// goes back on a oneshot), each caller's by hyper too. What is left between this and fnlet is
/// fnlet's own layers: routing, limits, logs, metrics.
pub fn main_hyper_both(env: impl Fn(&str) -> BTreeMap<String, String>) -> ! {
    run_evented(env, serve_caller_hyper_both)
}

/// A runtime behind hyper's server: invocations go to it on `events`.
#[derive(Clone)]
struct ServedRuntime {
    events: tokio::sync::mpsc::Sender<(bytes::Bytes, tokio::sync::oneshot::Sender<bytes::Bytes>)>,
}

thread_local! {
    /// This thread's runtimes behind hyper, idle ones on top; made from its [`LocalPool`]'s
    /// connections on first use.
    static SERVED: std::cell::RefCell<Option<std::rc::Rc<ServedPool>>> =
        const { std::cell::RefCell::new(None) };
}

struct ServedPool {
    idle: std::cell::RefCell<Vec<ServedRuntime>>,
    freed: tokio::sync::Notify,
}

/// A runtime taken from its [`ServedPool`], put back when dropped.
struct Lease<'a> {
    rt: Option<ServedRuntime>,
    served: &'a ServedPool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            self.served.idle.borrow_mut().push(rt);
            self.served.freed.notify_one();
        }
    }
}

fn served_pool(pool: &LocalPool) -> std::rc::Rc<ServedPool> {
    SERVED.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| {
                let served = pool
                    .idle
                    .borrow_mut()
                    .drain(..)
                    .map(serve_runtime)
                    .collect();
                std::rc::Rc::new(ServedPool {
                    idle: std::cell::RefCell::new(served),
                    freed: tokio::sync::Notify::new(),
                })
            })
            .clone()
    })
}

type Reply = tokio::sync::oneshot::Sender<bytes::Bytes>;

/// Serves one runtime's connection with hyper: `GET /next` takes the next event, `POST
/// .../response` answers the invocation it was given.
fn serve_runtime(rt: EventedRuntime) -> ServedRuntime {
    use http_body_util::BodyExt;
    let (events, rx) = tokio::sync::mpsc::channel::<(bytes::Bytes, Reply)>(1);
    let rx = std::rc::Rc::new(tokio::sync::Mutex::new(rx));
    let pending: std::rc::Rc<std::cell::RefCell<Option<(String, Reply)>>> = Default::default();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (rx, pending) = (rx.clone(), pending.clone());
        async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await?.to_bytes();
            let resp = if path == NEXT {
                let Some((event, reply)) = rx.lock().await.recv().await else {
                    std::process::exit(0);
                };
                let id = next_id();
                let mut r = json_response(event);
                let h = r.headers_mut();
                for (k, v) in [
                    ("lambda-runtime-aws-request-id", id.as_str()),
                    ("lambda-runtime-deadline-ms", "4102444800000"),
                    (
                        "lambda-runtime-invoked-function-arn",
                        "arn:aws:lambda:us-east-1:000000000000:function:noop-relay",
                    ),
                ] {
                    if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                        h.insert(k, v);
                    }
                }
                *pending.borrow_mut() = Some((id, reply));
                r
            } else {
                let Some((id, reply)) = pending.borrow_mut().take() else {
                    eprintln!("relay floor, hyper on both sides: {path} with no invocation");
                    std::process::exit(1);
                };
                if path != format!("/2018-06-01/runtime/invocation/{id}/response") {
                    eprintln!("relay floor, hyper on both sides: {path} for {id}");
                    std::process::exit(1);
                }
                let _ = reply.send(body);
                // The caller's answer first, as fnlet orders them.
                tokio::task::yield_now().await;
                let mut r = json_response(bytes::Bytes::from_static(b"{\"status\":\"OK\"}"));
                *r.status_mut() = hyper::StatusCode::ACCEPTED;
                r
            };
            Ok::<_, hyper::Error>(resp)
        }
    });
    // The GET /next the runtime sent before this relay took its connection: hyper reads it
    // from the buffer it is handed.
    let io = hyper_util::rt::TokioIo::new(Prefixed {
        head: rt.buf,
        stream: rt.stream,
    });
    tokio::task::spawn_local(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    });
    ServedRuntime { events }
}

/// A stream whose first bytes were already read into `head`.
struct Prefixed {
    head: Vec<u8>,
    stream: tokio::net::TcpStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn serve_caller_hyper_both(caller: tokio::net::TcpStream, pool: std::rc::Rc<LocalPool>) {
    use http_body_util::BodyExt;
    let _ = caller.set_nodelay(true);
    let served = served_pool(&pool);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let served = served.clone();
        async move {
            let event = req.into_body().collect().await?.to_bytes();
            let rt = loop {
                let freed = served.freed.notified();
                if let Some(r) = served.idle.borrow_mut().pop() {
                    break r;
                }
                freed.await;
            };
            // Back in the pool however this ends: a caller that hangs up mid-call leaves the
            // runtime to answer no one, and then serve the next caller.
            let lease = Lease {
                rt: Some(rt),
                served: &served,
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            let sent = match lease.rt.as_ref() {
                Some(rt) => rt.events.send((event, reply)).await.is_ok(),
                None => false,
            };
            if !sent {
                eprintln!("relay floor, hyper on both sides: a runtime's connection ended");
                std::process::exit(1);
            }
            let Ok(answer) = answer.await else {
                eprintln!("relay floor, hyper on both sides: an invocation got no answer");
                std::process::exit(1);
            };
            drop(lease);
            Ok::<_, hyper::Error>(json_response(answer))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(caller), service)
        .await;
}
