//! Invocations on QUIC streams: from peers (`fnlet-peer/1`) and from QUIC callers
//! (`fnlet-invoke/1`). A served InvokeRequest becomes the HTTP request of the front door it
//! names and runs through the same axum router as the HTTP API, so the caller gets exactly
//! what an HTTP caller gets; the answer goes back as ResponseHead, Data frames as the body
//! yields them, and End. [`call`] is the other side: it sends an InvokeRequest to another
//! agent and hands its answer back as an `http::Response` whose body streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use base64::Engine as _;
use bytes::Bytes;
use fnlet_cluster::frame::{
    self, Alpn, End, EndError, ErrorCode, ErrorFrame, Expect, Frame, FrameError, InvokeEntry,
    InvokeRequest, Kind, Limits, MAX_HOPS, ResponseHead,
};
use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use tower::ServiceExt as _;

use super::transport;
use super::wire::{self, FrameReader, WireError};
use crate::api::{App, AppError, ClusterCall, HEADER_HOST, RanOn, StreamFailed};
use crate::manifest::Mode;

/// Largest body slice in one Data frame (and in a ResponseHead's first bytes): well under
/// every receiver's body limit, and small enough that a streamed answer is not held back.
pub const DATA_CHUNK: usize = 256 * 1024;

/// How long past a call's deadline its caller still waits for the host's own word on it
/// (clocks of two hosts differ a little).
pub const DEADLINE_GRACE: Duration = Duration::from_secs(2);

/// What one path segment may hold unescaped (a function name in a rebuilt path).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Headers that describe one connection, not the request; and the length, which is the
/// payload's own.
const NOT_PASSED_ON: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// Who sent an InvokeRequest, from the connection's ALPN and certificate.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A peer agent (`fnlet-peer/1`) whose certificate proved `node_id`. It authorised the
    /// caller before forwarding: the call is not authorised again here.
    Peer {
        node_id: String,
        conn: quinn::Connection,
    },
    /// A QUIC caller (`fnlet-invoke/1`): authorised here as an HTTP caller is (a public
    /// function, the admin token, or a SigV4 signature, all from the frame's headers).
    Client { conn: quinn::Connection },
}

impl Caller {
    pub fn conn(&self) -> &quinn::Connection {
        match self {
            Caller::Peer { conn, .. } | Caller::Client { conn } => conn,
        }
    }

    fn alpn(&self) -> Alpn {
        match self {
            Caller::Peer { .. } => Alpn::Peer,
            Caller::Client { .. } => Alpn::Invoke,
        }
    }

    /// For logs: the peer's node id, or the caller's address.
    fn name(&self) -> String {
        match self {
            Caller::Peer { node_id, .. } => node_id.clone(),
            Caller::Client { conn } => conn.remote_address().to_string(),
        }
    }
}

/// How serving one stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The answer went out: ResponseHead, Data, End (with an error if the body failed).
    Answered,
    /// The call was refused with an Error frame carrying this code.
    Refused(ErrorCode),
    /// The caller went away (stopped the stream, or its connection was lost) before the
    /// answer was out; the invocation was let go as for an HTTP caller who hangs up.
    CallerGone,
    /// The deadline passed while the answer was being written: the stream was reset.
    Reset,
    /// A bad frame: the connection was closed with its code (the caller of this function
    /// counts it).
    BadFrame,
}

/// What serving needs of the agent besides its HTTP router.
struct Host {
    node_id: String,
    draining: bool,
    /// Whether a function is Lambda-mode here (the door an `auto` entry takes).
    lambda: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Whether a call to a function would find room here at once (host capacity).
    room: Box<dyn Fn(&str) -> bool + Send + Sync>,
    limits: Limits,
}

impl Host {
    fn of(app: &Arc<App>) -> Host {
        let router = app.router.clone();
        let registry = app.router.registry.clone();
        Host {
            node_id: app.node_id.clone(),
            draining: app.router.draining.is_cancelled(),
            lambda: Box::new(move |name| {
                router
                    .lookup(name)
                    .is_some_and(|f| f.manifest.mode == Mode::Lambda)
            }),
            room: Box::new(move |name| registry.room_for(name)),
            limits: request_limits(&app.config),
        }
    }
}

/// What a host reads of an InvokeRequest: its payload may be as large as an HTTP request's
/// body (`limits.max_request_mb`), and never less than the protocol's default.
pub fn request_limits(config: &crate::config::Config) -> Limits {
    let request = u32::try_from(config.limits.max_request_mb << 20).unwrap_or(u32::MAX);
    Limits {
        max_body: request.max(frame::DEFAULT_MAX_BODY),
    }
}

/// The agent's API as calls on QUIC streams reach it: the agent and its HTTP router, built
/// once per connection and shared by its calls (built per call, the router took about a
/// tenth of the serving host's CPU time per warm call in the cluster bench).
#[derive(Clone)]
pub struct Api {
    app: Arc<App>,
    router: axum::Router,
}

impl Api {
    pub fn new(app: Arc<App>) -> Api {
        let router = crate::api::app(app.clone());
        Api { app, router }
    }
}

/// Serves a QUIC caller's connection (`fnlet-invoke/1`): each bidirectional stream is one
/// call. Returns when the connection is gone; `on_bad_frame` is called for each bad frame
/// (the connection is closed for it).
pub async fn serve_connection(
    app: Arc<App>,
    conn: quinn::Connection,
    on_bad_frame: impl Fn() + Clone + Send + Sync + 'static,
) {
    let api = Api::new(app);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (api, conn, on_bad_frame) = (api.clone(), conn.clone(), on_bad_frame.clone());
        tokio::spawn(async move {
            let caller = Caller::Client { conn };
            let host = Host::of(&api.app);
            if serve_stream_with(api.router, &host, send, recv, caller).await == Served::BadFrame {
                on_bad_frame();
            }
        });
    }
}

/// Serves an InvokeRequest already read from its stream (by the peer stream's dispatcher).
pub async fn serve_invoke(
    api: Api,
    send: quinn::SendStream,
    request: InvokeRequest,
    payload: Bytes,
    from: Caller,
) -> Served {
    let host = Host::of(&api.app);
    serve_with(api.router, &host, send, request, payload, from).await
}

async fn serve_stream_with<S>(
    svc: S,
    host: &Host,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    from: Caller,
) -> Served
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send,
{
    let mut reader = FrameReader::new(recv, host.limits, Expect::request(from.alpn()));
    match reader.next().await {
        Ok(Some(Frame::InvokeRequest { meta, payload })) => {
            serve_with(svc, host, send, meta, payload, from).await
        }
        Ok(Some(other)) => {
            let code = ErrorCode::UNEXPECTED_FRAME;
            let why = format!("this stream serves calls, not {} frames", other.kind());
            wire::refuse(&mut send, code, why).await;
            Served::Refused(code)
        }
        Ok(None) => Served::CallerGone,
        Err(e) => bad_or_gone(&from, &e),
    }
}

fn bad_or_gone(from: &Caller, e: &WireError) -> Served {
    if wire::close_for(from.conn(), e, &from.name()) {
        Served::BadFrame
    } else {
        Served::CallerGone
    }
}

async fn refuse(send: &mut quinn::SendStream, code: ErrorCode, message: String) -> Served {
    wire::refuse(send, code, message).await;
    Served::Refused(code)
}

async fn serve_with<S>(
    svc: S,
    host: &Host,
    mut send: quinn::SendStream,
    req: InvokeRequest,
    payload: Bytes,
    from: Caller,
) -> Served
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send,
{
    if req.hops > MAX_HOPS {
        let why = format!(
            "the call was forwarded {} times; a call is forwarded at most {MAX_HOPS} time",
            req.hops
        );
        return refuse(&mut send, ErrorCode::HOP_LIMIT, why).await;
    }
    let Some(deadline) = deadline_at(req.deadline_ms) else {
        let why = "the call's deadline passed before it ran".to_string();
        return refuse(&mut send, ErrorCode::DEADLINE_EXCEEDED, why).await;
    };
    if host.draining {
        let why = "the agent is shutting down".to_string();
        return refuse(&mut send, ErrorCode::SHUTTING_DOWN, why).await;
    }
    // A peer's call that would wait here for host capacity is refused at once: the peer
    // places it on a host with room (or runs it itself). A QUIC caller's call waits as an
    // HTTP caller's does.
    if matches!(from, Caller::Peer { .. }) && !(host.room)(&req.function) {
        let why = format!(
            "no room here for another instance of {} (host capacity)",
            req.function
        );
        return refuse(&mut send, ErrorCode::BUSY, why).await;
    }
    let lambda = req.entry == InvokeEntry::Auto && (host.lambda)(&req.function);
    let mut http_req = match http_request(&req, payload, lambda) {
        Ok(r) => r,
        Err((field, reason)) => {
            let e = WireError::Frame(FrameError::Invalid {
                kind: Kind::InvokeRequest,
                field,
                reason,
            });
            return bad_or_gone(&from, &e);
        }
    };
    let remote = from.conn().remote_address();
    let (source, forwarded_by, request_id) = match &from {
        Caller::Peer { node_id, .. } => {
            let source = match &req.entry {
                InvokeEntry::FunctionUrl {
                    source_ip: Some(ip),
                    ..
                } => SocketAddr::new(*ip, 0),
                _ => remote,
            };
            (source, Some(node_id.clone()), req.request_id.clone())
        }
        // The caller's request id names the call on every host it passes, when it is one a
        // Lambda runtime can carry in a URL path; otherwise the call gets one of this host's.
        Caller::Client { .. } => {
            let id = if usable_request_id(&req.request_id) {
                req.request_id.clone()
            } else {
                crate::api::request_id()
            };
            (remote, None, id)
        }
    };
    http_req.extensions_mut().insert(ConnectInfo(source));
    http_req.extensions_mut().insert(ClusterCall {
        request_id,
        forwarded_by,
        hops: req.hops,
        deadline_ms: Some(req.deadline_ms),
    });
    let stopped = send.stopped();
    let resp = tokio::select! {
        r = svc.oneshot(http_req) => match r {
            Ok(r) => r,
            Err(never) => match never {},
        },
        () = tokio::time::sleep_until(deadline) => {
            let why = "the call's deadline passed before its answer started".to_string();
            return refuse(&mut send, ErrorCode::DEADLINE_EXCEEDED, why).await;
        }
        _ = stopped => return Served::CallerGone,
    };
    answer(send, resp, &host.node_id, deadline).await
}

/// Whether a QUIC caller's request id is kept as the call's: 1 to 128 ASCII letters, digits,
/// `-`, `_`, `.` and `:` (it travels in the Lambda Runtime API's URL paths and in log lines).
pub fn usable_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A Unix-milliseconds deadline as a timer instant; `None` once it has passed.
fn deadline_at(deadline_ms: u64) -> Option<tokio::time::Instant> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let left = deadline_ms.checked_sub(now_ms).filter(|ms| *ms > 0)?;
    // Far deadlines are capped: a timer a century away is no different from none.
    let left = Duration::from_millis(left.min(365 * 24 * 3600 * 1000));
    Some(tokio::time::Instant::now() + left)
}

/// The Unix-milliseconds deadline `after` from now.
pub fn deadline_in(after: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from((now + after).as_millis()).unwrap_or(u64::MAX)
}

/// The HTTP request an InvokeRequest stands for: the front door its entry names (`lambda`:
/// an `auto` entry's function is Lambda-mode here), its headers, and the payload as the body.
/// An error names the field that cannot make a request.
pub fn http_request(
    req: &InvokeRequest,
    payload: Bytes,
    lambda: bool,
) -> Result<Request<Body>, (&'static str, &'static str)> {
    let name = utf8_percent_encode(&req.function, SEGMENT).to_string();
    let invoke_api =
        matches!(req.entry, InvokeEntry::InvokeApi) || (req.entry == InvokeEntry::Auto && lambda);
    let (method, uri) = match &req.entry {
        InvokeEntry::FunctionUrl {
            method,
            path,
            query,
            ..
        } => {
            let method = Method::from_bytes(method.as_bytes())
                .map_err(|_| ("entry.method", "is not an HTTP method"))?;
            let mut uri = format!("/fn/{name}{path}");
            if !query.is_empty() {
                uri.push('?');
                uri.push_str(query);
            }
            (method, uri)
        }
        _ if invoke_api => {
            let mut uri = format!("/2015-03-31/functions/{name}/invocations");
            if let Some(q) = &req.qualifier {
                uri.push_str("?Qualifier=");
                uri.extend(form_urlencoded::byte_serialize(q.as_bytes()));
            }
            (Method::POST, uri)
        }
        _ => (Method::POST, format!("/fn/{name}")),
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 3);
    for (n, v) in &req.headers {
        let n = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| ("headers", "a header name is not an HTTP token"))?;
        if NOT_PASSED_ON.contains(&n.as_str()) {
            continue;
        }
        let v = HeaderValue::from_bytes(v.as_bytes())
            .map_err(|_| ("headers", "a header value is not a valid HTTP value"))?;
        headers.append(n, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(payload.len()));
    if invoke_api {
        if req.log_tail {
            headers.insert("x-amz-log-type", HeaderValue::from_static("Tail"));
        }
        if let Some(c) = &req.client_context {
            let encoded = base64::engine::general_purpose::STANDARD.encode(c);
            let v = HeaderValue::from_str(&encoded)
                .map_err(|_| ("client_context", "cannot be a header"))?;
            headers.insert("x-amz-client-context", v);
        }
    }
    let mut r = Request::new(Body::from(payload));
    *r.method_mut() = method;
    *r.uri_mut() = uri
        .parse()
        .map_err(|_| ("entry.path", "does not make a valid request path"))?;
    *r.headers_mut() = headers;
    Ok(r)
}

/// Why an HTTP request this host took cannot be passed on as an InvokeRequest: what the
/// caller sent is wrong (answer it here, as the door would).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0} is not an invocation route")]
    NotAnInvocation(String),
    #[error("X-Amz-Log-Type must be None or Tail, not {0:?}")]
    LogType(String),
    #[error("X-Amz-Client-Context must be base64-encoded JSON")]
    ClientContext,
    #[error("{0:?} is not a function name, partial ARN or ARN")]
    FunctionName(String),
}

/// What a call passed on to a peer carries besides the request.
#[derive(Debug, Clone)]
pub struct Passing<'a> {
    /// The call's request id (the same on every host).
    pub request_id: &'a str,
    /// When its caller stops waiting, Unix milliseconds.
    pub deadline_ms: u64,
    /// Times it was forwarded before reaching this host (0 from a caller).
    pub hops: u8,
    /// Where the caller is (a function URL event's `sourceIp`).
    pub source: std::net::IpAddr,
}

/// The call a host sends a peer for an HTTP invocation it took and authorised: the front
/// door from the route (`lambda`: the function is Lambda-mode, which makes `POST /fn/NAME` a
/// function URL rather than exec), the caller's headers without the credentials this host
/// checked (`is_admin` knows its admin token; SigV4 and session tokens go too, and a presigned
/// query's parameters), one hop more. The inverse of [`http_request`].
pub fn forward_call(
    parts: &http::request::Parts,
    payload: Bytes,
    lambda: bool,
    is_admin: impl Fn(&HeaderValue) -> bool,
    passing: &Passing<'_>,
) -> Result<InvokeCall, ForwardError> {
    let mut headers = parts.headers.clone();
    let query =
        crate::auth::strip_credentials(&mut headers, parts.uri.query().unwrap_or(""), is_admin)
            .into_owned();
    let path = parts.uri.path();
    let not_ours = || ForwardError::NotAnInvocation(path.to_string());
    let mut request = InvokeRequest {
        function: String::new(),
        qualifier: None,
        request_id: passing.request_id.to_string(),
        deadline_ms: passing.deadline_ms,
        hops: passing.hops.saturating_add(1),
        entry: InvokeEntry::Exec,
        headers: Vec::new(),
        log_tail: false,
        client_context: None,
    };
    if let Some(rest) = path.strip_prefix("/fn/") {
        let (name, raw_path) = match rest.split_once('/') {
            Some((n, p)) => (n, format!("/{p}")),
            None => (rest, "/".to_string()),
        };
        request.function = name.to_string();
        request.entry = if !lambda && parts.method == Method::POST && raw_path == "/" {
            InvokeEntry::Exec
        } else {
            InvokeEntry::FunctionUrl {
                method: parts.method.as_str().to_string(),
                path: raw_path,
                query,
                source_ip: Some(passing.source),
            }
        };
    } else if let Some(raw) = path
        .strip_prefix("/2015-03-31/functions/")
        .and_then(|r| r.strip_suffix("/invocations"))
    {
        let raw = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let (name, in_path) = crate::api::parse_function_name(&raw)
            .ok_or_else(|| ForwardError::FunctionName(raw.to_string()))?;
        let in_query = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "Qualifier")
            .map(|(_, v)| v.into_owned());
        request.function = name;
        request.qualifier = in_query.or(in_path);
        request.entry = InvokeEntry::InvokeApi;
        if let Some(v) = headers.remove("x-amz-log-type") {
            request.log_tail = match v.to_str() {
                Ok("Tail") => true,
                Ok("None") => false,
                _ => {
                    let shown = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    return Err(ForwardError::LogType(shown));
                }
            };
        }
        if let Some(v) = headers.remove("x-amz-client-context") {
            let text = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(ForwardError::ClientContext)?;
            request.client_context = Some(text);
        }
    } else {
        return Err(not_ours());
    }
    request.headers = headers
        .iter()
        .filter(|(n, _)| !NOT_PASSED_ON.contains(&n.as_str()))
        .map(|(n, v)| {
            // As a function URL event reads a value that is not UTF-8.
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_string(), v)
        })
        .collect();
    Ok(InvokeCall { request, payload })
}

/// One step of an answer's body.
enum Next {
    Data(Bytes),
    Done,
    Failed(EndError),
}

async fn next(body: &mut Body) -> Next {
    loop {
        match body.frame().await {
            None => return Next::Done,
            Some(Err(e)) => return Next::Failed(end_error(&e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if !d.is_empty() => return Next::Data(d),
                // Empty chunks and trailers carry nothing for the caller.
                _ => {}
            },
        }
    }
}

/// What a body's failure says in an End frame: a function's own error type when it failed
/// its streamed answer (or a peer's, passed on), else what broke.
fn end_error(e: &(dyn std::error::Error + 'static)) -> EndError {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<StreamFailed>() {
            return EndError {
                kind: f.error_type.clone(),
                message: f.to_string(),
            };
        }
        if let Some(c) = s.downcast_ref::<AnswerCut>() {
            return EndError {
                kind: c.kind.clone(),
                message: c.to_string(),
            };
        }
        source = s.source();
    }
    EndError {
        kind: "Fnlet.BodyFailed".into(),
        message: e.to_string(),
    }
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let v = match v.to_str() {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            };
            (n.as_str().to_owned(), v)
        })
        .collect()
}

/// Why writing an answer stopped.
enum Stop {
    Gone,
    Deadline,
}

/// Writes `frame`, giving up when the caller goes or the deadline passes.
async fn write(
    send: &mut quinn::SendStream,
    frame: &Frame,
    deadline: tokio::time::Instant,
) -> Result<(), Stop> {
    match tokio::time::timeout_at(deadline, wire::send(send, frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!("writing an answer: {e}");
            Err(Stop::Gone)
        }
        Err(_) => Err(Stop::Deadline),
    }
}

/// Writes `bytes` as Data frames of at most [`DATA_CHUNK`].
async fn write_data(
    send: &mut quinn::SendStream,
    mut bytes: Bytes,
    deadline: tokio::time::Instant,
) -> Result<(), Stop> {
    while !bytes.is_empty() {
        let piece = bytes.split_to(bytes.len().min(DATA_CHUNK));
        write(send, &Frame::Data(piece), deadline).await?;
    }
    Ok(())
}

/// Streams `resp` back: ResponseHead (with the first bytes when the body has them at once),
/// Data frames as the body yields them, End. The head names the host that ran the call: this
/// one (`host`), or the peer this host passed it on to (the answer's [`RanOn`]).
async fn answer(
    mut send: quinn::SendStream,
    resp: Response<Body>,
    host: &str,
    deadline: tokio::time::Instant,
) -> Served {
    let (parts, mut body) = resp.into_parts();
    let host = parts
        .extensions
        .get::<RanOn>()
        .map_or(host, |r| r.0.as_str());
    let mut first = Bytes::new();
    let mut end = None;
    match next(&mut body).now_or_never() {
        None => {}
        Some(Next::Data(d)) => first = d,
        Some(Next::Done) => end = Some(End::default()),
        Some(Next::Failed(e)) => end = Some(End { error: Some(e) }),
    }
    let rest = first.split_off(first.len().min(DATA_CHUNK));
    let head = Frame::ResponseHead {
        meta: ResponseHead {
            status: parts.status.as_u16(),
            headers: header_pairs(&parts.headers),
            host: host.to_string(),
        },
        body: first,
    };
    if let Err(e) = head.encode_parts() {
        // Nothing went out yet: the caller hears why, the cause stays in the log.
        tracing::error!("an answer cannot be sent over QUIC: {e}");
        let why = "the answer cannot be sent as a frame (see the host's log)".to_string();
        return refuse(&mut send, ErrorCode::INTERNAL, why).await;
    }
    let mut result = write(&mut send, &head, deadline).await;
    if result.is_ok() {
        result = write_data(&mut send, rest, deadline).await;
    }
    let stopped = send.stopped();
    tokio::pin!(stopped);
    while result.is_ok() && end.is_none() {
        tokio::select! {
            n = next(&mut body) => match n {
                Next::Data(d) => result = write_data(&mut send, d, deadline).await,
                Next::Done => end = Some(End::default()),
                Next::Failed(e) => end = Some(End { error: Some(e) }),
            },
            () = tokio::time::sleep_until(deadline) => {
                end = Some(End {
                    error: Some(EndError {
                        kind: "Fnlet.DeadlineExceeded".into(),
                        message: "the call's deadline passed while its answer was being sent".into(),
                    }),
                });
            }
            _ = &mut stopped => result = Err(Stop::Gone),
        }
    }
    if let Some(end) = end
        && result.is_ok()
    {
        // The End goes out even at the deadline: it is what tells the caller.
        let last = deadline.max(tokio::time::Instant::now()) + DEADLINE_GRACE;
        result = write(&mut send, &Frame::End(end), last).await;
    }
    match result {
        Ok(()) => {
            let _ = send.finish();
            Served::Answered
        }
        Err(Stop::Gone) => Served::CallerGone,
        Err(Stop::Deadline) => {
            let _ = send.reset(
                quinn::VarInt::from_u64(ErrorCode::DEADLINE_EXCEEDED.0)
                    .unwrap_or(quinn::VarInt::MAX),
            );
            Served::Reset
        }
    }
}

/// A call to send to another agent.
#[derive(Debug, Clone)]
pub struct InvokeCall {
    pub request: InvokeRequest,
    /// The payload (the request's body).
    pub payload: Bytes,
}

/// Why a call to another agent got no answer (an answer that starts and then breaks is cut
/// in its body instead, with [`AnswerCut`]).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection to the peer was lost during the call.
    #[error("the connection to {peer} was lost: {reason}")]
    PeerLost { peer: String, reason: String },
    #[error("{peer} is at its concurrency limit: {message}")]
    Busy { peer: String, message: String },
    #[error("{peer}: {message}")]
    NotFound { peer: String, message: String },
    #[error("{peer} refused a call forwarded once already: {message}")]
    HopLimit { peer: String, message: String },
    #[error("the call's deadline passed before {peer} answered")]
    DeadlineExceeded { peer: String },
    #[error("{peer} is shutting down: {message}")]
    ShuttingDown { peer: String, message: String },
    #[error("{peer} refused the caller: {message}")]
    Unauthorized { peer: String, message: String },
    #[error("{peer} failed: {message}")]
    Internal { peer: String, message: String },
    /// Another code in an Error frame.
    #[error("{peer} refused the call: {message} ({code})")]
    Refused {
        peer: String,
        code: ErrorCode,
        message: String,
    },
    /// The peer answered with a bad frame: the connection was closed with its code.
    #[error("{peer} answered with a bad frame: {reason}")]
    BadAnswer { peer: String, reason: String },
    /// The peer reset or stopped the call's stream.
    #[error("{peer} reset the call's stream: {reason}")]
    Reset { peer: String, reason: String },
    /// The call itself cannot be sent (a field the frame refuses).
    #[error("the call cannot be sent: {0}")]
    BadCall(#[source] FrameError),
}

impl CallError {
    /// The peer the call went to (empty for a call that could not be sent).
    pub fn peer(&self) -> &str {
        match self {
            CallError::PeerLost { peer, .. }
            | CallError::Busy { peer, .. }
            | CallError::NotFound { peer, .. }
            | CallError::HopLimit { peer, .. }
            | CallError::DeadlineExceeded { peer }
            | CallError::ShuttingDown { peer, .. }
            | CallError::Unauthorized { peer, .. }
            | CallError::Internal { peer, .. }
            | CallError::Refused { peer, .. }
            | CallError::BadAnswer { peer, .. }
            | CallError::Reset { peer, .. } => peer,
            CallError::BadCall(_) => "",
        }
    }

    /// The API's answer to a caller whose call this was.
    pub fn app_error(&self) -> AppError {
        let (status, kind) = match self {
            CallError::PeerLost { .. } => (StatusCode::BAD_GATEWAY, "peer_lost"),
            CallError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            CallError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            CallError::HopLimit { .. } => (StatusCode::LOOP_DETECTED, "hop_limit"),
            CallError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            CallError::ShuttingDown { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            CallError::Unauthorized { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            CallError::BadCall(e) => return AppError::internal("a call to a peer", e),
            CallError::Internal { .. }
            | CallError::Refused { .. }
            | CallError::BadAnswer { .. }
            | CallError::Reset { .. } => (StatusCode::BAD_GATEWAY, "peer_error"),
        };
        let mut e = AppError::new(status, kind, self.to_string());
        e.retry_after = match self {
            CallError::Busy { .. } => Some(1),
            CallError::ShuttingDown { .. } => Some(5),
            _ => None,
        };
        e
    }
}

/// The body of an answer from another agent ended before its End: the peer's own error
/// (a function failing its streamed answer), the connection lost, the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the answer from {peer} was cut short: {message}")]
pub struct AnswerCut {
    pub peer: String,
    /// The End's error kind, or `Fnlet.PeerLost`, `Fnlet.DeadlineExceeded`, `Fnlet.BadAnswer`.
    pub kind: String,
    pub message: String,
}

/// How a call's peer is named: the node id its certificate proved, else its address. This
/// parses the certificate: name a peer when a message needs it, not on every call.
fn peer_name(conn: &quinn::Connection) -> String {
    transport::peer_node_id(conn).unwrap_or_else(|| conn.remote_address().to_string())
}

/// The call's failure for a stream or frame error; a bad frame closes the connection.
fn call_error(conn: &quinn::Connection, peer: &str, e: WireError) -> CallError {
    let peer = peer.to_string();
    match e {
        WireError::Frame(_) => {
            wire::close_for(conn, &e, &peer);
            CallError::BadAnswer {
                peer,
                reason: e.to_string(),
            }
        }
        WireError::Connection(c)
        | WireError::Read(quinn::ReadError::ConnectionLost(c))
        | WireError::Write(quinn::WriteError::ConnectionLost(c)) => CallError::PeerLost {
            peer,
            reason: c.to_string(),
        },
        other => CallError::Reset {
            peer,
            reason: other.to_string(),
        },
    }
}

fn refused(peer: &str, e: ErrorFrame) -> CallError {
    let (peer, message) = (peer.to_string(), e.message);
    match e.code {
        ErrorCode::BUSY => CallError::Busy { peer, message },
        ErrorCode::NOT_FOUND => CallError::NotFound { peer, message },
        ErrorCode::HOP_LIMIT => CallError::HopLimit { peer, message },
        ErrorCode::DEADLINE_EXCEEDED => CallError::DeadlineExceeded { peer },
        ErrorCode::SHUTTING_DOWN => CallError::ShuttingDown { peer, message },
        ErrorCode::UNAUTHORIZED => CallError::Unauthorized { peer, message },
        ErrorCode::INTERNAL => CallError::Internal { peer, message },
        code => CallError::Refused {
            peer,
            code,
            message,
        },
    }
}

/// Sends `call` to the agent at the other end of `conn` on a new stream and returns its
/// answer once its head is in: status and headers as the host that ran it answered them
/// (`x-fnlet-host` naming that host, also kept as the [`RanOn`] extension), and a body that
/// streams its Data frames. A body cut short (an End with an error, the connection lost, the
/// deadline) ends with an [`AnswerCut`] error, so a server sending it on aborts its
/// connection as it does for a function's own streamed error. `max_body` bounds each frame
/// read.
pub async fn call(
    conn: &quinn::Connection,
    call: InvokeCall,
    max_body: u32,
) -> Result<Response<Body>, CallError> {
    // Named only when an error needs it: the name is parsed from the peer's certificate.
    let peer = || peer_name(conn);
    let Some(deadline) = deadline_at(call.request.deadline_ms) else {
        return Err(CallError::DeadlineExceeded { peer: peer() });
    };
    let deadline = deadline + DEADLINE_GRACE;
    let frame = Frame::InvokeRequest {
        meta: call.request,
        payload: call.payload,
    };
    let (head, body) = frame.encode_parts().map_err(CallError::BadCall)?;
    let expect = Expect::answer_to(&frame).expect("an InvokeRequest has an answer");
    let exchange = async {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| call_error(conn, &peer(), e.into()))?;
        send.write_all_chunks(&mut [head, body])
            .await
            .map_err(|e| call_error(conn, &peer(), e.into()))?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, Limits { max_body }, expect);
        match reader.next().await {
            Ok(Some(Frame::ResponseHead { meta, body })) => Ok((meta, body, reader)),
            Ok(Some(Frame::Error(e))) => Err(refused(&peer(), e)),
            // The reader lets only these through first.
            Ok(_) => Err(CallError::BadAnswer {
                peer: peer(),
                reason: "no answer".into(),
            }),
            Err(e) => Err(call_error(conn, &peer(), e)),
        }
    };
    let (head, first, reader) = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(CallError::DeadlineExceeded { peer: peer() }),
    };
    let body = answer_body(conn.clone(), reader, first, deadline);
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (n, v) in &head.headers {
        // The frame's checks leave only names and values HTTP takes.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&head.host) {
        resp.headers_mut().insert(HEADER_HOST, v);
    }
    resp.extensions_mut().insert(RanOn(head.host));
    Ok(resp)
}

/// The Data frames after a ResponseHead, as a body.
fn answer_body(
    conn: quinn::Connection,
    reader: FrameReader,
    first: Bytes,
    deadline: tokio::time::Instant,
) -> Body {
    struct State {
        conn: quinn::Connection,
        reader: FrameReader,
        first: Bytes,
        deadline: tokio::time::Instant,
    }
    let cut = |s: &State, kind: &str, message: String| AnswerCut {
        peer: peer_name(&s.conn),
        kind: kind.to_string(),
        message,
    };
    let state = State {
        conn,
        reader,
        first,
        deadline,
    };
    let stream = futures_util::stream::unfold(Some(state), move |state| async move {
        let mut s = state?;
        if !s.first.is_empty() {
            let first = std::mem::take(&mut s.first);
            return Some((Ok(first), Some(s)));
        }
        loop {
            let step = match tokio::time::timeout_at(s.deadline, s.reader.next()).await {
                Err(_) => Err(cut(
                    &s,
                    "Fnlet.DeadlineExceeded",
                    "the call's deadline passed".into(),
                )),
                Ok(Ok(Some(Frame::Data(d)))) if d.is_empty() => continue,
                Ok(Ok(Some(Frame::Data(d)))) => Ok(d),
                Ok(Ok(Some(Frame::End(End { error: Some(e) })))) => {
                    Err(cut(&s, &e.kind, e.message))
                }
                // The End (or, which the reader refuses, anything else): the body is whole.
                Ok(Ok(_)) => return None,
                Ok(Err(e)) => {
                    let kind = match &e {
                        WireError::Frame(_) => "Fnlet.BadAnswer",
                        _ => "Fnlet.PeerLost",
                    };
                    let err = call_error(&s.conn, &peer_name(&s.conn), e);
                    Err(cut(&s, kind, err.to_string()))
                }
            };
            return match step {
                Ok(d) => Some((Ok(d), Some(s))),
                Err(e) => Some((Err(e), None)),
            };
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
pub(crate) mod app_tests;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Extension;
    use axum::routing::{any, post};
    use fnlet_cluster::frame::ErrorFrame;
    use serde_json::{Value, json};
    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::cluster::pki::{self, ClusterDir, Credentials, node_key_and_csr, sign_csr};
    use crate::cluster::transport::Transport;

    fn request(entry: InvokeEntry) -> InvokeRequest {
        InvokeRequest {
            function: "hello".into(),
            qualifier: None,
            request_id: "r-1".into(),
            deadline_ms: deadline_in(Duration::from_secs(30)),
            hops: 0,
            entry,
            headers: vec![],
            log_tail: false,
            client_context: None,
        }
    }

    async fn body_text(r: Request<Body>) -> (http::request::Parts, String) {
        let (parts, body) = r.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_entry_becomes_the_request_of_its_front_door() {
        let mut req = request(InvokeEntry::Exec);
        req.headers = vec![
            ("Authorization".into(), "Bearer t".into()),
            ("content-length".into(), "999".into()),
            ("connection".into(), "close".into()),
            ("x-multi".into(), "1".into()),
            ("x-multi".into(), "2".into()),
        ];
        let r = http_request(&req, Bytes::from_static(b"abc"), false).unwrap();
        let (parts, body) = body_text(r).await;
        assert_eq!(
            (parts.method.as_str(), parts.uri.to_string()),
            ("POST", "/fn/hello".into())
        );
        assert_eq!(parts.headers["authorization"], "Bearer t");
        // The length is the payload's; the connection's own headers are not the request's.
        assert_eq!(parts.headers["content-length"], "3");
        assert!(!parts.headers.contains_key("connection"));
        let multi: Vec<_> = parts.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["1", "2"]);
        assert_eq!(body, "abc");

        let mut req = request(InvokeEntry::InvokeApi);
        req.qualifier = Some("$LATEST".into());
        req.log_tail = true;
        req.client_context = Some("{\"a\":1}".into());
        let (parts, _) = body_text(http_request(&req, Bytes::new(), false).unwrap()).await;
        assert_eq!(
            parts.uri.to_string(),
            "/2015-03-31/functions/hello/invocations?Qualifier=%24LATEST"
        );
        assert_eq!(parts.headers["x-amz-log-type"], "Tail");
        assert_eq!(parts.headers["x-amz-client-context"], "eyJhIjoxfQ==");
        assert_eq!(parts.headers["content-length"], "0");

        // auto: the Invoke API for a Lambda-mode function, exec otherwise.
        let req = request(InvokeEntry::Auto);
        let uri = |lambda| {
            http_request(&req, Bytes::new(), lambda)
                .unwrap()
                .uri()
                .to_string()
        };
        assert_eq!(uri(true), "/2015-03-31/functions/hello/invocations");
        assert_eq!(uri(false), "/fn/hello");

        let mut req = request(InvokeEntry::FunctionUrl {
            method: "PATCH".into(),
            path: "/a%20b/c".into(),
            query: "x=1&y".into(),
            source_ip: None,
        });
        req.headers = vec![("host".into(), "fn.example".into())];
        let (parts, _) = body_text(http_request(&req, Bytes::new(), true).unwrap()).await;
        assert_eq!(parts.method, Method::PATCH);
        assert_eq!(parts.uri.to_string(), "/fn/hello/a%20b/c?x=1&y");
        assert_eq!(parts.headers["host"], "fn.example");
        let mut root = req.clone();
        root.entry = InvokeEntry::FunctionUrl {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            source_ip: None,
        };
        let r = http_request(&root, Bytes::new(), true).unwrap();
        assert_eq!(r.uri().to_string(), "/fn/hello/");

        // A name is one path segment, whatever it holds.
        let mut odd = request(InvokeEntry::Exec);
        odd.function = "a/b?c".into();
        let r = http_request(&odd, Bytes::new(), false).unwrap();
        assert_eq!(r.uri().path(), "/fn/a%2Fb%3Fc");
        assert_eq!(r.uri().query(), None);
    }

    fn forwarded(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        lambda: bool,
    ) -> Result<InvokeCall, ForwardError> {
        let mut r = Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            r = r.header(*n, *v);
        }
        let (parts, ()) = r.body(()).unwrap().into_parts();
        let passing = Passing {
            request_id: "r-9",
            deadline_ms: 1_767_225_630_000,
            hops: 0,
            source: "198.51.100.4".parse().unwrap(),
        };
        let call = forward_call(
            &parts,
            Bytes::from_static(b"pay"),
            lambda,
            |v| v == "Bearer admin",
            &passing,
        )?;
        // Whatever it makes, the frame takes.
        let frame = Frame::InvokeRequest {
            meta: call.request.clone(),
            payload: call.payload.clone(),
        };
        frame.encode().unwrap();
        Ok(call)
    }

    fn names(h: &[(String, String)]) -> Vec<&str> {
        h.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[tokio::test]
    async fn an_http_call_passed_on_is_the_same_call_without_the_credentials_checked() {
        // Exec: the admin token checked here does not travel; the rest does, one hop on.
        let c = forwarded(
            "POST",
            "/fn/echo",
            &[
                ("authorization", "Bearer admin"),
                ("content-type", "text/plain"),
            ],
            false,
        )
        .unwrap();
        let r = &c.request;
        assert_eq!(
            (r.entry.clone(), r.function.as_str()),
            (InvokeEntry::Exec, "echo")
        );
        assert_eq!(
            (r.request_id.as_str(), r.hops, r.deadline_ms),
            ("r-9", 1, 1_767_225_630_000)
        );
        assert_eq!(
            r.headers,
            [("content-type".to_string(), "text/plain".to_string())]
        );
        let (parts, body) = body_text(http_request(r, c.payload, false).unwrap()).await;
        assert_eq!(parts.uri, "/fn/echo");
        assert_eq!(body, "pay");

        // A Lambda-mode function's URL root, a presigned query and the caller's own token on a
        // public function: the signature goes, the caller's token stays, the source travels.
        let c = forwarded(
            "POST",
            "/fn/web?x=1&X-Amz-Signature=abc&X-Amz-Credential=k",
            &[("authorization", "Bearer callers-own")],
            true,
        )
        .unwrap();
        assert_eq!(
            c.request.entry,
            InvokeEntry::FunctionUrl {
                method: "POST".into(),
                path: "/".into(),
                query: "x=1".into(),
                source_ip: Some("198.51.100.4".parse().unwrap()),
            }
        );
        assert_eq!(names(&c.request.headers), ["authorization"]);
        let back = http_request(&c.request, c.payload, true).unwrap();
        assert_eq!(back.uri(), "/fn/web/?x=1");
        let c = forwarded("GET", "/fn/web/a%20b/c", &[("cookie", "a=1")], true).unwrap();
        let back = http_request(&c.request, c.payload, true).unwrap();
        assert_eq!(
            (back.method(), back.uri().to_string()),
            (&Method::GET, "/fn/web/a%20b/c".into())
        );
        assert_eq!(back.headers()["cookie"], "a=1");

        // The Invoke API: name and qualifier from an ARN, its own headers as fields, SigV4 gone.
        let c = forwarded(
            "POST",
            "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Ahello%3A3/invocations",
            &[
                ("authorization", "AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00"),
                ("x-amz-security-token", "t"),
                ("x-amz-log-type", "Tail"),
                ("x-amz-client-context", "eyJhIjoxfQ=="),
                ("x-amz-invocation-type", "DryRun"),
            ],
            true,
        )
        .unwrap();
        let r = &c.request;
        assert_eq!(
            (r.function.as_str(), r.qualifier.as_deref()),
            ("hello", Some("3"))
        );
        assert_eq!(
            (r.log_tail, r.client_context.as_deref()),
            (true, Some("{\"a\":1}"))
        );
        assert_eq!(names(&r.headers), ["x-amz-invocation-type"]);
        let (parts, _) = body_text(http_request(r, c.payload, true).unwrap()).await;
        assert_eq!(
            parts.uri,
            "/2015-03-31/functions/hello/invocations?Qualifier=3"
        );
        assert_eq!(parts.headers["x-amz-client-context"], "eyJhIjoxfQ==");
        assert_eq!(parts.headers["x-amz-log-type"], "Tail");
        // The query's Qualifier wins over the name's, as the handler has it.
        let c = forwarded(
            "POST",
            "/2015-03-31/functions/hello:3/invocations?Qualifier=%24LATEST",
            &[],
            true,
        )
        .unwrap();
        assert_eq!(c.request.qualifier.as_deref(), Some("$LATEST"));

        // What the door would refuse is refused before it travels.
        let bad = |uri: &str, headers: &[(&str, &str)]| {
            forwarded("POST", uri, headers, true).unwrap_err()
        };
        let api = "/2015-03-31/functions/hello/invocations";
        assert!(matches!(
            bad(api, &[("x-amz-log-type", "All")]),
            ForwardError::LogType(_)
        ));
        assert!(matches!(
            bad(api, &[("x-amz-client-context", "%%")]),
            ForwardError::ClientContext
        ));
        assert!(matches!(
            bad("/2015-03-31/functions/a:b:c:d:e/invocations", &[]),
            ForwardError::FunctionName(_)
        ));
        assert!(matches!(
            bad("/v1/functions", &[]),
            ForwardError::NotAnInvocation(_)
        ));
    }

    #[test]
    fn error_frames_become_typed_errors_and_api_answers() {
        let e = |code, message: &str| {
            refused(
                "beta",
                ErrorFrame {
                    code,
                    message: message.into(),
                },
            )
        };
        let cases = [
            (ErrorCode::BUSY, 429, "overloaded"),
            (ErrorCode::NOT_FOUND, 404, "not_found"),
            (ErrorCode::HOP_LIMIT, 508, "hop_limit"),
            (ErrorCode::DEADLINE_EXCEEDED, 504, "timeout"),
            (ErrorCode::SHUTTING_DOWN, 503, "unavailable"),
            (ErrorCode::UNAUTHORIZED, 403, "forbidden"),
            (ErrorCode::INTERNAL, 502, "peer_error"),
            (ErrorCode(0x1ff), 502, "peer_error"),
        ];
        for (code, status, kind) in cases {
            let err = e(code, "why");
            assert_eq!(err.peer(), "beta");
            let a = err.app_error();
            assert_eq!((a.status.as_u16(), a.kind), (status, kind), "{code}");
            assert!(a.message.contains("beta"), "{}", a.message);
        }
        assert!(matches!(e(ErrorCode::BUSY, "x"), CallError::Busy { .. }));
        assert_eq!(e(ErrorCode::BUSY, "x").app_error().retry_after, Some(1));
        let lost = CallError::PeerLost {
            peer: "beta".into(),
            reason: "timed out".into(),
        };
        let a = lost.app_error();
        assert_eq!((a.status.as_u16(), a.kind), (502, "peer_lost"));
        assert_eq!(a.message, "the connection to beta was lost: timed out");
    }

    #[test]
    fn only_plain_request_ids_are_kept() {
        assert!(usable_request_id("r-1"));
        assert!(usable_request_id("b341162f-3b25-58df-be94-000e3757cc88"));
        assert!(usable_request_id("trace:1.2_3"));
        assert!(usable_request_id(&"a".repeat(128)));
        assert!(!usable_request_id(&"a".repeat(129)));
        assert!(!usable_request_id(""));
        for bad in ["a/b", "a b", "a?b", "a%2f", "é", "a#b"] {
            assert!(!usable_request_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn deadlines_in_the_past_have_passed() {
        assert!(deadline_at(0).is_none());
        assert!(deadline_at(deadline_in(Duration::ZERO).saturating_sub(1)).is_none());
        let left = deadline_at(deadline_in(Duration::from_secs(60))).unwrap()
            - tokio::time::Instant::now();
        assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60));
        // A deadline centuries away is a year's timer, not an overflow.
        assert!(deadline_at(u64::MAX).is_some());
    }

    /// What the test router's handlers share with the test.
    #[derive(Default)]
    struct Seen {
        /// Lets a streamed body go on past its first chunk.
        release: Notify,
        /// A slow handler started.
        started: Notify,
        /// Slow handlers whose future was dropped (their caller gone or the deadline past).
        dropped: AtomicUsize,
    }

    struct CountDrop(Arc<Seen>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An echo of what a handler received: the parts the conversion and the caller decide.
    async fn echo(
        ConnectInfo(from): ConnectInfo<SocketAddr>,
        Extension(call): Extension<ClusterCall>,
        req: Request<Body>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let seen = json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "authorization": parts.headers.get("authorization").map(|v| v.to_str().unwrap()),
            "body": String::from_utf8_lossy(&body),
            "from": from.ip().to_string(),
            "request_id": call.request_id,
            "forwarded_by": call.forwarded_by,
            "hops": call.hops,
        });
        let mut r = axum::Json(seen).into_response();
        r.headers_mut()
            .insert("x-echo", HeaderValue::from_static("1"));
        r
    }

    use axum::response::IntoResponse as _;

    /// A real axum router with handlers of each shape an answer can have: buffered, large,
    /// streamed and failing mid-way, slow.
    fn test_router(seen: Arc<Seen>) -> axum::Router {
        let streamed = {
            let seen = seen.clone();
            move || {
                let seen = seen.clone();
                async move {
                    let s = futures_util::stream::unfold(0, move |step| {
                        let seen = seen.clone();
                        async move {
                            match step {
                                0 => Some((Ok(Bytes::from_static(b"one")), 1)),
                                1 => {
                                    seen.release.notified().await;
                                    Some((Ok(Bytes::from_static(b"two")), 2))
                                }
                                2 => Some((
                                    Err(StreamFailed {
                                        error_type: "Fixture.Boom".into(),
                                    }),
                                    3,
                                )),
                                _ => None,
                            }
                        }
                    });
                    Body::from_stream(s)
                }
            }
        };
        let slow = {
            let seen = seen.clone();
            move || {
                let seen = seen.clone();
                async move {
                    let _guard = CountDrop(seen.clone());
                    seen.started.notify_one();
                    std::future::pending::<()>().await;
                    "never"
                }
            }
        };
        let big = || async {
            let bytes: Vec<u8> = (0..DATA_CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
            bytes
        };
        // What the forwarding layer hands back for a call a peer ("gamma") ran.
        let elsewhere = || async {
            let mut r = ([(HEADER_HOST, "gamma")], "ran on gamma").into_response();
            r.extensions_mut().insert(RanOn("gamma".into()));
            r
        };
        axum::Router::new()
            .route("/fn/stream/{*path}", any(streamed))
            .route("/fn/elsewhere", post(elsewhere))
            .route("/fn/slow", post(slow))
            .route("/fn/big", post(big))
            .route("/fn/{name}", post(echo))
            .route("/fn/{name}/", any(echo))
            .route("/fn/{name}/{*path}", any(echo))
            .route("/2015-03-31/functions/{name}/invocations", post(echo))
    }

    /// An agent's QUIC endpoint serving calls through the test router, as node "alpha".
    struct Server {
        _dir: tempfile::TempDir,
        cluster: ClusterDir,
        transport: Arc<Transport>,
        addr: SocketAddr,
        seen: Arc<Seen>,
        served: mpsc::UnboundedReceiver<Served>,
    }

    async fn server() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterDir::new(dir.path());
        cluster.init("alpha").unwrap();
        let transport = Arc::new(
            Transport::bind(
                "127.0.0.1:0".parse().unwrap(),
                &cluster.node_credentials().unwrap(),
            )
            .unwrap(),
        );
        let seen = Arc::new(Seen::default());
        let router = test_router(seen.clone());
        let host = Arc::new(Host {
            node_id: "alpha".into(),
            draining: false,
            lambda: Box::new(|name| name == "lam"),
            room: Box::new(|name| name != "full"),
            limits: Limits::default(),
        });
        let (tx, served) = mpsc::unbounded_channel();
        let endpoint = transport.endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (router, host, tx) = (router.clone(), host.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let alpn = transport::alpn(&conn).and_then(|a| Alpn::from_protocol(&a));
                    let caller = match (alpn, transport::peer_node_id(&conn)) {
                        (Some(Alpn::Peer), Some(node_id)) => Caller::Peer {
                            node_id,
                            conn: conn.clone(),
                        },
                        (Some(Alpn::Invoke), _) => Caller::Client { conn: conn.clone() },
                        _ => return,
                    };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        let (router, host, tx, caller) =
                            (router.clone(), host.clone(), tx.clone(), caller.clone());
                        tokio::spawn(async move {
                            let s = serve_stream_with(router, &host, send, recv, caller).await;
                            let _ = tx.send(s);
                        });
                    }
                });
            }
        });
        let addr = transport.local_addr().unwrap();
        Server {
            _dir: dir,
            cluster,
            transport,
            addr,
            seen,
            served,
        }
    }

    impl Server {
        /// A QUIC caller's connection (`fnlet-invoke/1`, the server checked against the CA).
        async fn client(&self) -> (quinn::Endpoint, quinn::Connection) {
            let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let ca = self.cluster.ca_der().unwrap();
            let cfg = transport::client_config(pki::caller_client_config(&ca).unwrap()).unwrap();
            let conn = ep
                .connect_with(cfg, self.addr, "fnlet")
                .unwrap()
                .await
                .unwrap();
            (ep, conn)
        }

        /// A peer's connection: node "beta" of the same cluster.
        async fn peer(&self, dir: &std::path::Path) -> (Transport, quinn::Connection) {
            let creds = member(&self.cluster, dir, "beta");
            let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &creds).unwrap();
            let conn = t.connect("alpha", self.addr).await.unwrap();
            (t, conn)
        }

        async fn next_served(&mut self) -> Served {
            tokio::time::timeout(Duration::from_secs(10), self.served.recv())
                .await
                .expect("a stream served within 10 s")
                .expect("the server runs")
        }
    }

    fn member(ca: &ClusterDir, dir: &std::path::Path, id: &str) -> Credentials {
        let c = ClusterDir::new(dir);
        let (key, csr) = node_key_and_csr(id).unwrap();
        let cert = sign_csr(
            &ca.issuer().unwrap(),
            &csr,
            id,
            crate::cluster::pki::NODE_CERT_VALIDITY,
        )
        .unwrap();
        c.store_ca_cert(&std::fs::read_to_string(ca.ca_cert()).unwrap())
            .unwrap();
        c.store_node(&key.serialize_pem(), &cert).unwrap();
        c.node_credentials().unwrap()
    }

    fn invoke(entry: InvokeEntry, function: &str, payload: &'static [u8]) -> InvokeCall {
        let mut request = request(entry);
        request.function = function.into();
        InvokeCall {
            request,
            payload: Bytes::from_static(payload),
        }
    }

    async fn json_body(r: Response<Body>) -> Value {
        let status = r.status();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{status} {}: {e}", String::from_utf8_lossy(&bytes)))
    }

    /// The [`AnswerCut`] a body's error carries.
    fn cut_of(e: &axum::Error) -> &AnswerCut {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(c) = s.downcast_ref::<AnswerCut>() {
                return c;
            }
            source = s.source();
        }
        panic!("not an AnswerCut: {e:?}")
    }

    #[tokio::test]
    async fn a_callers_call_runs_through_the_router_and_its_answer_comes_back_whole() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let mut c = invoke(InvokeEntry::Exec, "hello", b"input");
        c.request.headers = vec![("authorization".into(), "Bearer tok".into())];
        let r = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-echo"], "1");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()[HEADER_HOST], "alpha");
        assert_eq!(
            r.extensions().get::<RanOn>().map(|h| h.0.as_str()),
            Some("alpha")
        );
        let seen = json_body(r).await;
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["uri"], "/fn/hello");
        assert_eq!(seen["body"], "input");
        assert_eq!(seen["authorization"], "Bearer tok");
        assert_eq!(seen["from"], "127.0.0.1");
        // A caller is not a peer: nobody authorised it yet. Its request id is kept.
        assert_eq!(seen["forwarded_by"], Value::Null);
        assert_eq!(seen["request_id"], "r-1");
        assert_eq!(s.next_served().await, Served::Answered);
        // One that could not travel in a Lambda Runtime API path is replaced by this host's.
        let mut c = invoke(InvokeEntry::Exec, "hello", b"input");
        c.request.headers = vec![("authorization".into(), "Bearer tok".into())];
        c.request.request_id = "not/a path".into();
        let r = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        let seen = json_body(r).await;
        let id = seen["request_id"].as_str().unwrap();
        assert!(id != "not/a path" && id.len() == 36, "{id}");
        assert_eq!(s.next_served().await, Served::Answered);

        // An auto entry takes the function's own door.
        let r = call(
            &conn,
            invoke(InvokeEntry::Auto, "lam", b"{}"),
            frame::DEFAULT_MAX_BODY,
        );
        let seen = json_body(r.await.unwrap()).await;
        assert_eq!(seen["uri"], "/2015-03-31/functions/lam/invocations");
        let r = call(
            &conn,
            invoke(InvokeEntry::Auto, "ex", b""),
            frame::DEFAULT_MAX_BODY,
        );
        assert_eq!(json_body(r.await.unwrap()).await["uri"], "/fn/ex");

        // A body larger than a frame comes in several, in order.
        let r = call(
            &conn,
            invoke(InvokeEntry::Exec, "big", b""),
            frame::DEFAULT_MAX_BODY,
        );
        let bytes = r
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let want: Vec<u8> = (0..DATA_CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        assert!(bytes == want, "{} bytes back", bytes.len());
    }

    #[tokio::test]
    async fn a_call_passed_on_to_a_peer_names_the_peer_that_ran_it() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let c = invoke(InvokeEntry::Exec, "elsewhere", b"");
        let r = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[HEADER_HOST], "gamma");
        assert_eq!(r.headers().get_all(HEADER_HOST).iter().count(), 1);
        assert_eq!(
            r.extensions().get::<RanOn>().map(|h| h.0.as_str()),
            Some("gamma")
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ran on gamma");
        assert_eq!(s.next_served().await, Served::Answered);
    }

    #[tokio::test]
    async fn a_peers_call_keeps_its_request_id_and_its_callers_address() {
        let s = server().await;
        let d = tempfile::tempdir().unwrap();
        let (_beta, conn) = s.peer(d.path()).await;
        let mut c = invoke(
            InvokeEntry::FunctionUrl {
                method: "DELETE".into(),
                path: "/x/y".into(),
                query: "a=1".into(),
                source_ip: Some("203.0.113.9".parse().unwrap()),
            },
            "web",
            b"",
        );
        c.request.hops = 1;
        let r = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        let seen = json_body(r).await;
        assert_eq!(seen["method"], "DELETE");
        assert_eq!(seen["uri"], "/fn/web/x/y?a=1");
        assert_eq!(seen["forwarded_by"], "beta");
        assert_eq!(seen["request_id"], "r-1");
        assert_eq!(seen["from"], "203.0.113.9");
        assert_eq!(seen["hops"], 1);

        // A caller cannot say where it is: its own address counts.
        let (_ep, conn) = s.client().await;
        let c = invoke(
            InvokeEntry::FunctionUrl {
                method: "GET".into(),
                path: "/".into(),
                query: String::new(),
                source_ip: Some("203.0.113.9".parse().unwrap()),
            },
            "web",
            b"",
        );
        let seen = json_body(call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap()).await;
        assert_eq!(seen["from"], "127.0.0.1");
    }

    #[tokio::test]
    async fn a_streamed_answer_streams_and_its_failure_cuts_the_body() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let c = invoke(
            InvokeEntry::FunctionUrl {
                method: "GET".into(),
                path: "/go".into(),
                query: String::new(),
                source_ip: None,
            },
            "stream",
            b"",
        );
        let r = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let mut body = r.into_body();
        // The first chunk arrives while the handler still holds the second back.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "one");
        s.seen.release.notify_one();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "two");
        let err = body.frame().await.unwrap().unwrap_err();
        let cut = cut_of(&err);
        assert_eq!(
            (cut.peer.as_str(), cut.kind.as_str()),
            ("alpha", "Fixture.Boom")
        );
        assert!(cut.message.contains("Fixture.Boom"), "{}", cut.message);
        assert!(body.frame().await.is_none());
        assert_eq!(s.next_served().await, Served::Answered);
        // What a peer passes on keeps the function's own error kind.
        let again = end_error(&err);
        assert_eq!(again.kind, "Fixture.Boom");
    }

    /// A peer's call to a function without room here is refused BUSY at once (the peer places
    /// it elsewhere); a QUIC caller's is served (it waits, as an HTTP caller's does).
    #[tokio::test]
    async fn a_peers_call_without_room_here_is_refused_busy() {
        let mut s = server().await;
        let dir = tempfile::tempdir().unwrap();
        let (_t, conn) = s.peer(dir.path()).await;
        let c = invoke(InvokeEntry::Exec, "full", b"");
        let e = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap_err();
        assert!(matches!(e, CallError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("host capacity"), "{e}");
        assert_eq!(s.next_served().await, Served::Refused(ErrorCode::BUSY));
        let (_ep, conn) = s.client().await;
        let c = invoke(InvokeEntry::Exec, "full", b"");
        call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap();
        assert_eq!(s.next_served().await, Served::Answered);
    }

    #[tokio::test]
    async fn calls_past_the_hop_limit_or_their_deadline_are_refused() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let mut c = invoke(InvokeEntry::Exec, "hello", b"");
        c.request.hops = MAX_HOPS + 1;
        let e = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap_err();
        assert!(matches!(e, CallError::HopLimit { .. }), "{e}");
        assert_eq!(s.next_served().await, Served::Refused(ErrorCode::HOP_LIMIT));

        // A deadline already past: the caller does not even send it...
        let mut c = invoke(InvokeEntry::Exec, "hello", b"");
        c.request.deadline_ms = 1;
        let e = call(&conn, c.clone(), frame::DEFAULT_MAX_BODY)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::DeadlineExceeded { .. }), "{e}");
        // ...and the host refuses it when it comes anyway.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let frame = Frame::InvokeRequest {
            meta: c.request,
            payload: c.payload,
        };
        wire::send(&mut send, &frame).await.unwrap();
        send.finish().unwrap();
        let mut reader =
            FrameReader::new(recv, Limits::default(), Expect::answer_to(&frame).unwrap());
        match reader.next().await.unwrap() {
            Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::DEADLINE_EXCEEDED),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.next_served().await,
            Served::Refused(ErrorCode::DEADLINE_EXCEEDED)
        );

        // A deadline that passes while the function runs: refused, and the run let go.
        let mut c = invoke(InvokeEntry::Exec, "slow", b"");
        c.request.deadline_ms = deadline_in(Duration::from_millis(300));
        let e = call(&conn, c, frame::DEFAULT_MAX_BODY).await.unwrap_err();
        assert!(matches!(e, CallError::DeadlineExceeded { .. }), "{e}");
        assert_eq!(
            s.next_served().await,
            Served::Refused(ErrorCode::DEADLINE_EXCEEDED)
        );
        assert_eq!(s.seen.dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_caller_who_goes_away_lets_the_run_go() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let pending = {
            let conn = conn.clone();
            tokio::spawn(async move {
                call(
                    &conn,
                    invoke(InvokeEntry::Exec, "slow", b""),
                    frame::DEFAULT_MAX_BODY,
                )
                .await
            })
        };
        s.seen.started.notified().await;
        pending.abort();
        assert_eq!(s.next_served().await, Served::CallerGone);
        assert_eq!(s.seen.dropped.load(Ordering::SeqCst), 1);
        // The connection goes on serving.
        let r = call(
            &conn,
            invoke(InvokeEntry::Exec, "hello", b"x"),
            frame::DEFAULT_MAX_BODY,
        );
        assert_eq!(r.await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_lost_peer_fails_the_call_or_cuts_its_answer() {
        // Before the answer starts: PeerLost, naming the peer.
        let s = server().await;
        let d = tempfile::tempdir().unwrap();
        let (_beta, conn) = s.peer(d.path()).await;
        let pending = {
            let conn = conn.clone();
            tokio::spawn(async move {
                call(
                    &conn,
                    invoke(InvokeEntry::Exec, "slow", b""),
                    frame::DEFAULT_MAX_BODY,
                )
                .await
            })
        };
        s.seen.started.notified().await;
        s.transport.endpoint.close(0u32.into(), b"gone");
        match pending.await.unwrap() {
            Err(CallError::PeerLost { peer, .. }) => assert_eq!(peer, "alpha"),
            other => panic!("{other:?}"),
        }

        // After it started: the body is cut.
        let s = server().await;
        let (_ep, conn) = s.client().await;
        let c = invoke(
            InvokeEntry::FunctionUrl {
                method: "GET".into(),
                path: "/go".into(),
                query: String::new(),
                source_ip: None,
            },
            "stream",
            b"",
        );
        let mut body = call(&conn, c, frame::DEFAULT_MAX_BODY)
            .await
            .unwrap()
            .into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "one"
        );
        s.transport.endpoint.close(0u32.into(), b"gone");
        let err = body.frame().await.unwrap().unwrap_err();
        let cut = cut_of(&err);
        assert_eq!(cut.kind, "Fnlet.PeerLost");
        assert!(cut.message.contains("was lost"), "{}", cut.message);
    }

    #[tokio::test]
    async fn a_bad_frame_closes_its_connection_and_the_host_goes_on() {
        let mut s = server().await;
        let (_ep, conn) = s.client().await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        send.finish().unwrap();
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code.into_inner(), ErrorCode::BAD_VERSION.0);
                assert!(
                    String::from_utf8_lossy(&c.reason).contains("version"),
                    "{c:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.next_served().await, Served::BadFrame);

        // A caller may only call: any other request closes its connection too.
        let (_ep, conn) = s.client().await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let digest = Frame::BundleRequest(frame::BundleRequest {
            sha256: fnlet_cluster::Sha256Hash::of(b"x"),
        });
        wire::send(&mut send, &digest).await.unwrap();
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code.into_inner(), ErrorCode::UNEXPECTED_FRAME.0)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.next_served().await, Served::BadFrame);

        // Others are served as before.
        let (_ep, conn) = s.client().await;
        let r = call(
            &conn,
            invoke(InvokeEntry::Exec, "hello", b"x"),
            frame::DEFAULT_MAX_BODY,
        );
        assert_eq!(r.await.unwrap().status(), StatusCode::OK);
    }
}
