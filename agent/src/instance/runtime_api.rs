//! The AWS Lambda Runtime API (2018-06-01), served to one instance on the listener the sandbox
//! made in the instance's own network namespace.
//!
//! The instance asks for work with a long poll on `/invocation/next`, answers with
//! `/invocation/{id}/response` (buffered, or streamed: chunked with error trailers) or
//! `/invocation/{id}/error`, and reports a failed start with `/init/error`. Bad calls get
//! Lambda's own status codes and `{errorMessage, errorType}` bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// One invocation handed to the instance, and where its answer goes.
#[derive(Debug)]
pub struct Event {
    pub invocation: Invocation,
    pub reply: oneshot::Sender<Reply>,
}

/// An invocation as `/next` hands it to the runtime.
#[derive(Debug)]
pub struct Invocation {
    pub request_id: String,
    /// Milliseconds since the epoch by which the function must answer.
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: String,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
    pub body: Bytes,
}

/// What the runtime answered.
#[derive(Debug)]
pub enum Reply {
    Response(Bytes),
    /// A streamed response (`Lambda-Runtime-Function-Response-Mode: streaming`), passed on as
    /// it comes; `finished` resolves once the runtime's request has ended (the instance is
    /// free again), whether or not anyone still reads `frames`.
    Stream {
        content_type: Option<String>,
        frames: mpsc::Receiver<StreamFrame>,
        finished: oneshot::Receiver<()>,
    },
    /// `/invocation/{id}/error`, or a streamed response that ended with error trailers.
    Error {
        error_type: String,
        body: Bytes,
    },
    /// The response was larger than the agent accepts.
    TooLarge {
        limit: usize,
    },
}

/// A piece of a streamed response.
#[derive(Debug)]
pub enum StreamFrame {
    Data(Bytes),
    /// The stream ended with an error (error trailers, a cut-off body, too much data).
    Error {
        error_type: String,
        body: Bytes,
    },
}

/// Lambda's limit for a streamed response.
pub const MAX_STREAMED_RESPONSE: usize = 20 * 1024 * 1024;

/// How far the instance's start has come.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    Starting,
    /// The runtime asked for its first event.
    Ready,
    /// The runtime reported `/init/error`.
    Failed {
        error_type: String,
        body: Bytes,
    },
}

/// The state one instance's Runtime API works on.
pub struct RuntimeApi {
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    /// The invocation handed out and not yet answered: its id and where the answer goes.
    current: Mutex<Option<(String, oneshot::Sender<Reply>)>>,
    init: watch::Sender<Init>,
    /// Cancelled when the instance ends: pending long polls return.
    ended: CancellationToken,
    pub(super) max_response: usize,
    /// The HTTP thread whose event loop the runtime's connection is registered with
    /// ([`super::roaming::RoamingStream`]), so a call on that thread can prefer this instance.
    home: Arc<super::roaming::Home>,
}

/// The agent's side of an instance's Runtime API.
pub struct RuntimeHandle {
    pub events: mpsc::Sender<Event>,
    pub init: watch::Receiver<Init>,
    api: Arc<RuntimeApi>,
}

impl RuntimeHandle {
    /// The HTTP thread the runtime's connection is registered with, if any.
    pub fn home(&self) -> Option<usize> {
        self.api.home.get()
    }

    /// The request id of the invocation the runtime is working on, if any.
    pub fn current_request(&self) -> Option<String> {
        self.api
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(id, _)| id.clone())
    }

    /// Forgets the current invocation (after a timeout: the instance is being killed).
    pub fn abandon_current(&self) {
        self.api
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// Lambda's limit for a synchronous response.
pub const MAX_RESPONSE: usize = 6 * 1024 * 1024;
/// Error bodies are small; a runtime that sends more is cut off.
const MAX_ERROR_BODY: usize = 1024 * 1024;

/// Every path of the Runtime API starts so.
const PREFIX: &str = "/2018-06-01/runtime/";

/// A Runtime API path, matched by hand: two requests of every invocation come here, and a
/// general router's matching, extractors and boxed layers cost more than the work itself.
#[derive(Debug, PartialEq)]
pub(super) enum Route<'a> {
    /// `invocation/next`
    Next,
    /// `invocation/{id}/response`
    Response(&'a str),
    /// `invocation/{id}/error`
    Error(&'a str),
    /// `init/error`
    InitError,
    NotFound,
}

pub(super) fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Route::NotFound;
    };
    if rest == "invocation/next" {
        return Route::Next;
    }
    if rest == "init/error" {
        return Route::InitError;
    }
    let Some(rest) = rest.strip_prefix("invocation/") else {
        return Route::NotFound;
    };
    match rest.split_once('/') {
        Some((id, "response")) if !id.is_empty() => Route::Response(id),
        Some((id, "error")) if !id.is_empty() => Route::Error(id),
        _ => Route::NotFound,
    }
}

/// A request id from the path, percent-decoded (ids we hand out never need it).
pub(super) fn request_id(raw: &str) -> String {
    if raw.contains('%') {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned()
    } else {
        raw.to_owned()
    }
}

/// A request body of the runtime's: hyper's, or one [`super::runtime_http`] read whole.
pub(super) trait RequestBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> RequestBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request of the runtime's.
pub(super) async fn dispatch<B: RequestBody>(api: &RuntimeApi, req: Request<B>) -> Response {
    let method = req.method().clone();
    match route(req.uri().path()) {
        Route::Next if method == Method::GET => next(api).await,
        Route::Response(id) if method == Method::POST => {
            let id = request_id(id);
            response(api, &id, req).await
        }
        Route::Error(id) if method == Method::POST => {
            let id = request_id(id);
            // Rare, and large: boxed so they do not size every request's future.
            Box::pin(invocation_error(api, &id, req)).await
        }
        Route::InitError if method == Method::POST => Box::pin(init_error(api, req)).await,
        Route::NotFound => lambda_error(
            StatusCode::NOT_FOUND,
            "InvalidRequest",
            "no such Runtime API path (this is the 2018-06-01 Runtime API)",
        ),
        _ => lambda_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "InvalidRequest",
            &format!("{method} is not allowed on this Runtime API path"),
        ),
    }
}

type Request<B> = axum::http::Request<B>;

/// One instance's Runtime API server: its listener and the runtime's connections, with no task
/// of its own. Whoever waits on the instance drives it ([`Server::drive`]): its start until the
/// first `/next`, each invocation until the answer. So the event reaches the parked `/next`,
/// and the runtime's answer reaches the invocation, within one task: no wake-up of another
/// thread per event. Between invocations nothing polls it: the runtime's next `/next` waits in
/// the socket until an invocation comes.
pub struct Server {
    listener: Option<tokio::net::TcpListener>,
    /// Connections the runtime made to the Runtime API's address that the agent answered with
    /// a Unix socket pair ([`super::paired`]).
    paired: Option<mpsc::UnboundedReceiver<std::os::unix::net::UnixStream>>,
    api: Arc<RuntimeApi>,
    conns: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Server {
    /// Accepts what is pending and polls every connection once.
    fn poll_serve(&mut self, cx: &mut Context<'_>) {
        if let Some(listener) = &self.listener {
            loop {
                match listener.poll_accept(cx) {
                    Poll::Ready(Ok((tcp, _))) => {
                        // Small answers on a kept-alive connection: never wait for Nagle.
                        let _ = tcp.set_nodelay(true);
                        self.conns.push(connection(tcp, self.api.clone()));
                    }
                    Poll::Ready(Err(e)) => {
                        // Tried again at the next poll (a full descriptor table, a connection
                        // reset before it was accepted).
                        tracing::debug!("runtime API accept: {e}");
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if let Some(paired) = &mut self.paired {
            loop {
                match paired.poll_recv(cx) {
                    Poll::Ready(Some(unix)) => match tokio::net::UnixStream::from_std(unix) {
                        Ok(unix) => self.conns.push(connection(unix, self.api.clone())),
                        Err(e) => tracing::debug!("runtime API socket pair: {e}"),
                    },
                    Poll::Ready(None) => {
                        self.paired = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        while let Poll::Ready(Some(())) =
            futures_util::StreamExt::poll_next_unpin(&mut self.conns, cx)
        {}
    }

    /// Also serves the connections `paired` brings (a socket pair's agent ends).
    pub fn serve_paired(
        &mut self,
        paired: mpsc::UnboundedReceiver<std::os::unix::net::UnixStream>,
    ) {
        self.paired = Some(paired);
    }

    /// Serves until `until` resolves, and returns its output.
    pub async fn drive<F: Future>(&mut self, until: F) -> F::Output {
        let mut until = std::pin::pin!(until);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = until.as_mut().poll(cx) {
                return Poll::Ready(v);
            }
            self.poll_serve(cx);
            // Serving may have produced what `until` waits for (the runtime's answer).
            until.as_mut().poll(cx)
        })
        .await
    }

    /// Polls once more without a waker: what the connections wait for next (the runtime's
    /// next `/next`) wakes nobody until the next invocation drives them again.
    pub fn park(&mut self) {
        self.poll_serve(&mut Context::from_waker(std::task::Waker::noop()));
    }
}

/// One kept-alive HTTP/1.1 connection of the runtime ([`super::runtime_http`]).
fn connection<S: super::roaming::Roam + Send + 'static>(
    stream: S,
    api: Arc<RuntimeApi>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let stream = super::roaming::RoamingStream::new(stream, api.home.clone());
    Box::pin(super::runtime_http::serve(stream, api))
}

/// The Runtime API on `listener`, for the caller to drive ([`Server::drive`]).
pub fn server(
    listener: std::net::TcpListener,
    ended: CancellationToken,
    max_response: usize,
) -> std::io::Result<(RuntimeHandle, Server)> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (tx, rx) = mpsc::channel(1);
    let (init_tx, init_rx) = watch::channel(Init::Starting);
    let api = Arc::new(RuntimeApi {
        events: tokio::sync::Mutex::new(rx),
        current: Mutex::new(None),
        init: init_tx,
        ended,
        max_response,
        home: Arc::default(),
    });
    let server = Server {
        listener: Some(listener),
        paired: None,
        api: api.clone(),
        conns: FuturesUnordered::new(),
    };
    let handle = RuntimeHandle {
        events: tx,
        init: init_rx,
        api,
    };
    Ok((handle, server))
}

/// Serves the Runtime API on `listener` from a task of its own until `ended` is cancelled.
pub fn serve(
    listener: std::net::TcpListener,
    ended: CancellationToken,
    max_response: usize,
) -> std::io::Result<RuntimeHandle> {
    let (handle, mut server) = self::server(listener, ended.clone(), max_response)?;
    tokio::spawn(async move { server.drive(ended.cancelled()).await });
    Ok(handle)
}

/// `{errorMessage, errorType}` with a status, as the Runtime API answers bad calls.
fn lambda_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "errorMessage": message, "errorType": error_type })),
    )
        .into_response()
}

/// 202 `{"status":"OK"}`, as Lambda answers an accepted response or error.
fn accepted() -> Response {
    (
        StatusCode::ACCEPTED,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Bytes::from_static(br#"{"status":"OK"}"#),
    )
        .into_response()
}

fn state_transition(from: &str, to: &str, why: &str) -> Response {
    lambda_error(
        StatusCode::FORBIDDEN,
        "InvalidStateTransition",
        &format!("State transition from {from} to {to} failed for runtime. Error: {why}"),
    )
}

async fn next(api: &RuntimeApi) -> Response {
    let invocation = match handout(api).await {
        Ok(h) => h,
        Err(refused) => return refused,
    };
    // Straight into the answer's own map, sized once.
    let mut r = Response::new(axum::body::Body::empty());
    let headers = r.headers_mut();
    headers.reserve(8);
    invocation.each_header(|name, value| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    });
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    *r.body_mut() = axum::body::Body::from(invocation.body);
    r
}

impl Invocation {
    /// The `Lambda-Runtime-*` headers of `/next`'s answer, by name and value (values are
    /// not checked here: each writer leaves out what a header cannot carry).
    pub(super) fn each_header(&self, mut put: impl FnMut(&'static str, &str)) {
        put("lambda-runtime-aws-request-id", &self.request_id);
        put(
            "lambda-runtime-deadline-ms",
            itoa::Buffer::new().format(self.deadline_ms),
        );
        put("lambda-runtime-invoked-function-arn", &self.function_arn);
        put("lambda-runtime-trace-id", &self.trace_id);
        if let Some(c) = &self.client_context {
            put("lambda-runtime-client-context", c);
        }
        if let Some(c) = &self.cognito_identity {
            put("lambda-runtime-cognito-identity", c);
        }
    }
}

/// `/next`: waits for an event and makes it the current invocation, or refuses as Lambda does.
pub(super) async fn handout(api: &RuntimeApi) -> Result<Invocation, Response> {
    if api
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some()
    {
        return Err(state_transition(
            "Invoke",
            "Ready",
            "the current invocation has not been answered",
        ));
    }
    if matches!(*api.init.borrow(), Init::Failed { .. }) {
        return Err(state_transition(
            "InitError",
            "Ready",
            "init already failed",
        ));
    }
    // Only one long poll at a time takes events; the first one marks the end of init.
    let mut events = tokio::select! {
        e = api.events.lock() => e,
        _ = api.ended.cancelled() => return Err(shutting_down()),
    };
    api.init.send_if_modified(|s| {
        if *s == Init::Starting {
            *s = Init::Ready;
            true
        } else {
            false
        }
    });
    let event = tokio::select! {
        e = events.recv() => e,
        _ = api.ended.cancelled() => None,
    };
    drop(events);
    let Some(event) = event else {
        // The instance was dropped (reaped, retired, shut down) and its sandbox is being
        // killed. No answer before it is gone: runtime clients read any answer to /next as an
        // event (lambda_runtime panics on the missing request id), and Lambda never answers a
        // runtime it is stopping either.
        api.ended.cancelled().await;
        return Err(shutting_down());
    };
    let Event { invocation, reply } = event;
    *api.current.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((invocation.request_id.clone(), reply));
    Ok(invocation)
}

fn shutting_down() -> Response {
    lambda_error(
        StatusCode::GONE,
        "ShutdownInProgress",
        "the instance is shutting down",
    )
}

/// Takes the current invocation's reply channel if `id` names it.
fn take_current(api: &RuntimeApi, id: &str) -> Option<oneshot::Sender<Reply>> {
    let mut cur = api.current.lock().unwrap_or_else(|p| p.into_inner());
    match cur.as_ref() {
        Some((cur_id, _)) if cur_id == id => cur.take().map(|(_, tx)| tx),
        _ => None,
    }
}

fn invalid_request_id() -> Response {
    lambda_error(
        StatusCode::BAD_REQUEST,
        "InvalidRequestID",
        "Invalid request ID",
    )
}

fn too_large(limit: usize) -> Response {
    lambda_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("Exceeded maximum allowed payload size ({limit} bytes)."),
    )
}

/// The error type a runtime named in its header, or Lambda's default.
fn error_type(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or(UNKNOWN_ERROR)
        .chars()
        .take(256)
        .collect()
}

const UNKNOWN_ERROR: &str = "Runtime.Unknown";

/// `errorType` of an error body, when it is the JSON Lambda's clients send.
fn body_error_type(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let t = v.get("errorType")?.as_str()?;
    (!t.is_empty()).then(|| t.chars().take(256).collect())
}

/// The body the caller gets for an error the runtime reported without one.
fn default_error_body(error_type: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({ "errorMessage": "Unknown application error occurred", "errorType": error_type })
            .to_string(),
    )
}

async fn response<B: RequestBody>(api: &RuntimeApi, id: &str, req: Request<B>) -> Response {
    let mode = req.headers().get("lambda-runtime-function-response-mode");
    if mode.is_some_and(|m| {
        !(m.as_bytes().eq_ignore_ascii_case(b"streaming")
            || m.as_bytes().eq_ignore_ascii_case(b"buffered"))
    }) {
        return lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidFunctionResponseMode",
            "Invalid function response mode",
        );
    }
    let Some(reply) = take_current(api, id) else {
        return invalid_request_id();
    };
    if mode.is_some_and(|m| m.as_bytes().eq_ignore_ascii_case(b"streaming")) {
        // Boxed: inline it would make every buffered answer's future as large as a stream's,
        // and hyper moves that future on every request.
        return Box::pin(stream_response(req, reply)).await;
    }
    let limit = api.max_response;
    // A streamed response is chunked and may end with trailers that turn it into an error.
    let collected = match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(c) => c,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let _ = reply.send(Reply::TooLarge { limit });
            return too_large(limit);
        }
        Err(e) => {
            let _ = reply.send(Reply::Error {
                error_type: "Runtime.TruncatedResponse".into(),
                body: Bytes::from(
                    serde_json::json!({"errorMessage": format!("the runtime's response was cut off: {e}"), "errorType": "Runtime.TruncatedResponse"}).to_string(),
                ),
            });
            return lambda_error(
                StatusCode::BAD_REQUEST,
                "TruncatedHTTPRequest",
                "HTTP request detected as truncated",
            );
        }
    };
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    if let Some((error_type, body)) = trailers.as_ref().and_then(trailer_error) {
        let _ = reply.send(Reply::Error { error_type, body });
        return accepted();
    }
    let _ = reply.send(Reply::Response(body));
    answered().await
}

/// A buffered response already in hand, for the invocation `id` names: passed on, and
/// resolved when the runtime's 202 may go out (after the caller's answer, as [`answered`]).
pub(super) async fn buffered_response(
    api: &RuntimeApi,
    id: &str,
    body: Bytes,
) -> Result<(), Response> {
    let Some(reply) = take_current(api, id) else {
        return Err(invalid_request_id());
    };
    let _ = reply.send(Reply::Response(body));
    after_the_caller().await;
    Ok(())
}

/// The runtime's 202 for an answer it posted, written at the connection's next poll: the
/// invocation that drives this connection returns as soon as it has the answer, and the
/// caller's response goes out before this one (the instance's end of invocation polls the
/// connection again right after it, [`Server::park`]).
async fn answered() -> Response {
    after_the_caller().await;
    accepted()
}

/// Resolves at the connection's next poll ([`answered`]).
async fn after_the_caller() {
    let mut later = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut later, true) {
            Poll::Ready(())
        } else {
            // Marked to be polled again at the connection's next poll.
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// The error a runtime reported (`/invocation/{id}/error`, `/init/error`): its type and body.
async fn reported_error<B: RequestBody>(req: Request<B>) -> (String, Bytes) {
    let header_type = error_type(req.headers(), "lambda-runtime-function-error-type");
    let body = match http_body_util::Limited::new(req.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if body.is_empty() {
        return (header_type.clone(), default_error_body(&header_type));
    }
    // Some clients (awslambdaric) name the type only in the body.
    if header_type == UNKNOWN_ERROR
        && let Some(t) = body_error_type(&body)
    {
        return (t, body);
    }
    (header_type, body)
}

/// A streamed response: each chunk goes to the caller as it arrives; error trailers (or a
/// body cut off, or one over [`MAX_STREAMED_RESPONSE`]) end the stream with an error.
async fn stream_response<B: RequestBody>(
    req: Request<B>,
    reply: oneshot::Sender<Reply>,
) -> Response {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (tx, frames) = mpsc::channel(16);
    let (done, finished) = oneshot::channel();
    let _ = reply.send(Reply::Stream {
        content_type,
        frames,
        finished,
    });
    let mut body = req.into_body();
    let mut sent = 0usize;
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let e: BoxError = e.into();
                failed = Some(stream_error(
                    "Runtime.TruncatedResponse",
                    &format!("the runtime's streamed response was cut off: {e}"),
                ));
                break;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                sent += data.len();
                if sent > MAX_STREAMED_RESPONSE {
                    failed = Some(stream_error(
                        "Function.ResponseSizeTooLarge",
                        &format!(
                            "Response payload size exceeded maximum allowed payload size ({MAX_STREAMED_RESPONSE} bytes)."
                        ),
                    ));
                    break;
                }
                // A caller that went away does not stop the runtime's request: drain it.
                let _ = tx.send(StreamFrame::Data(data)).await;
            }
            Err(frame) => {
                if let Some((error_type, body)) =
                    frame.into_trailers().ok().as_ref().and_then(trailer_error)
                {
                    failed = Some(StreamFrame::Error { error_type, body });
                }
            }
        }
    }
    let truncated = matches!(&failed, Some(StreamFrame::Error { error_type, .. }) if error_type == "Runtime.TruncatedResponse");
    if let Some(f) = failed {
        let _ = tx.send(f).await;
    }
    drop(tx);
    let _ = done.send(());
    if truncated {
        return lambda_error(
            StatusCode::BAD_REQUEST,
            "TruncatedHTTPRequest",
            "HTTP request detected as truncated",
        );
    }
    accepted()
}

/// The error a streamed response's trailers report, if they report one: its type, and its
/// body (base64 in `Lambda-Runtime-Function-Error-Body`).
fn trailer_error(t: &HeaderMap) -> Option<(String, Bytes)> {
    if !t.contains_key("lambda-runtime-function-error-type") {
        return None;
    }
    let error_type = error_type(t, "lambda-runtime-function-error-type");
    let body = t
        .get("lambda-runtime-function-error-body")
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
        })
        .map(Bytes::from)
        .unwrap_or_else(|| default_error_body(&error_type));
    Some((error_type, body))
}

fn stream_error(error_type: &str, message: &str) -> StreamFrame {
    StreamFrame::Error {
        error_type: error_type.into(),
        body: Bytes::from(
            serde_json::json!({ "errorMessage": message, "errorType": error_type }).to_string(),
        ),
    }
}

/// Collects a streamed reply into one answer (the Invoke API answers buffered).
pub async fn collect_stream(
    mut frames: mpsc::Receiver<StreamFrame>,
    limit: usize,
) -> Result<Bytes, (String, Bytes)> {
    let mut out = Vec::new();
    while let Some(f) = frames.recv().await {
        match f {
            StreamFrame::Data(d) => {
                if out.len() + d.len() > limit {
                    return Err((
                        "Function.ResponseSizeTooLarge".into(),
                        Bytes::from(format!(
                            "{{\"errorType\":\"Function.ResponseSizeTooLarge\",\"errorMessage\":\"Response payload size exceeded maximum allowed payload size ({limit} bytes).\"}}"
                        )),
                    ));
                }
                out.extend_from_slice(&d);
            }
            StreamFrame::Error { error_type, body } => return Err((error_type, body)),
        }
    }
    Ok(Bytes::from(out))
}

async fn invocation_error<B: RequestBody>(api: &RuntimeApi, id: &str, req: Request<B>) -> Response {
    let Some(reply) = take_current(api, id) else {
        return invalid_request_id();
    };
    let (error_type, body) = reported_error(req).await;
    let _ = reply.send(Reply::Error { error_type, body });
    accepted()
}

async fn init_error<B: RequestBody>(api: &RuntimeApi, req: Request<B>) -> Response {
    if *api.init.borrow() != Init::Starting {
        return state_transition(
            "Ready",
            "InitError",
            "init errors are reported before the first /next",
        );
    }
    let (error_type, body) = reported_error(req).await;
    api.init.send_replace(Init::Failed { error_type, body });
    accepted()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn paths_route_as_the_runtime_api_names_them() {
        let r = route;
        assert_eq!(r("/2018-06-01/runtime/invocation/next"), Route::Next);
        assert_eq!(
            r("/2018-06-01/runtime/invocation/8476a536-e9f4-11e8-9739-2dfe598c3fcd/response"),
            Route::Response("8476a536-e9f4-11e8-9739-2dfe598c3fcd")
        );
        assert_eq!(
            r("/2018-06-01/runtime/invocation/a/error"),
            Route::Error("a")
        );
        assert_eq!(r("/2018-06-01/runtime/init/error"), Route::InitError);
        for other in [
            "/",
            "/2018-06-01/runtime/",
            "/2018-06-01/runtime/invocation/next/",
            "/2018-06-01/runtime/invocation//response",
            "/2018-06-01/runtime/invocation/a/b/response",
            "/2018-06-01/runtime/invocation/a/answer",
            "/2018-06-01/runtime/invocation/a",
            "/2020-01-01/runtime/invocation/next",
            "/2018-06-01/runtime/init/error/x",
        ] {
            assert_eq!(r(other), Route::NotFound, "{other}");
        }
        assert_eq!(request_id("a%2Fb"), "a/b");
        assert_eq!(request_id("plain"), "plain");
    }

    struct Served {
        base: String,
        handle: RuntimeHandle,
        stop: CancellationToken,
    }

    fn start() -> Served {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let base = format!("http://{}/2018-06-01", l.local_addr().unwrap());
        let stop = CancellationToken::new();
        let handle = serve(l, stop.clone(), 1024).unwrap();
        Served { base, handle, stop }
    }

    /// An event for `id` with `body`, and where its answer arrives.
    pub(in crate::instance) fn event(
        id: &str,
        body: &'static str,
    ) -> (Event, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let invocation = Invocation {
            request_id: id.into(),
            deadline_ms: 1_700_000_000_000,
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            trace_id: "Root=1-0-0".into(),
            client_context: Some("{\"custom\":{}}".into()),
            cognito_identity: None,
            body: Bytes::from_static(body.as_bytes()),
        };
        (Event { invocation, reply }, rx)
    }

    async fn json(r: reqwest::Response) -> (u16, serde_json::Value) {
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }

    #[tokio::test]
    async fn next_response_and_lambdas_errors_for_bad_calls() {
        let s = start();
        let c = reqwest::Client::new();
        assert_eq!(*s.handle.init.borrow(), Init::Starting);
        let (e, rx) = event("req-1", "{\"a\":1}");
        s.handle.events.send(e).await.unwrap();
        let r = c
            .get(format!("{}/runtime/invocation/next", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["lambda-runtime-aws-request-id"], "req-1");
        assert_eq!(h["lambda-runtime-deadline-ms"], "1700000000000");
        assert_eq!(h["lambda-runtime-client-context"], "{\"custom\":{}}");
        assert!(h.contains_key("lambda-runtime-invoked-function-arn"));
        assert!(h.contains_key("lambda-runtime-trace-id"));
        assert!(!h.contains_key("lambda-runtime-cognito-identity"));
        assert_eq!(r.text().await.unwrap(), "{\"a\":1}");
        assert_eq!(*s.handle.init.borrow(), Init::Ready);
        assert_eq!(s.handle.current_request().as_deref(), Some("req-1"));

        // Asking for more work before answering is a state transition Lambda refuses.
        let (st, b) = json(
            c.get(format!("{}/runtime/invocation/next", s.base))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (st, b["errorType"].as_str()),
            (403, Some("InvalidStateTransition"))
        );
        // A response for another request id.
        let (st, b) = json(
            c.post(format!("{}/runtime/invocation/other/response", s.base))
                .body("x")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (st, b["errorType"].as_str()),
            (400, Some("InvalidRequestID"))
        );
        assert_eq!(b["errorMessage"], "Invalid request ID");
        // The right one.
        let (st, b) = json(
            c.post(format!("{}/runtime/invocation/req-1/response", s.base))
                .body("{\"ok\":true}")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((st, b["status"].as_str()), (202, Some("OK")));
        match rx.await.unwrap() {
            Reply::Response(b) => assert_eq!(&b[..], b"{\"ok\":true}"),
            other => panic!("{other:?}"),
        }
        // Answered once: a second answer is for no invocation.
        let r = c
            .post(format!("{}/runtime/invocation/req-1/response", s.base))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // Unknown paths and init errors after init.
        let r = c
            .get(format!("{}/runtime/nope", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let (st, b) = json(
            c.post(format!("{}/runtime/init/error", s.base))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (st, b["errorType"].as_str()),
            (403, Some("InvalidStateTransition"))
        );
        s.stop.cancel();
    }

    #[tokio::test]
    async fn handler_errors_oversized_responses_and_init_errors() {
        let s = start();
        let c = reqwest::Client::new();
        let (e, rx) = event("req-2", "{}");
        s.handle.events.send(e).await.unwrap();
        c.get(format!("{}/runtime/invocation/next", s.base))
            .send()
            .await
            .unwrap();
        let r = c
            .post(format!("{}/runtime/invocation/req-2/error", s.base))
            .header("lambda-runtime-function-error-type", "Handler.Boom")
            .body("{\"errorMessage\":\"boom\",\"errorType\":\"Handler.Boom\",\"stackTrace\":[]}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        match rx.await.unwrap() {
            Reply::Error { error_type, body } => {
                assert_eq!(error_type, "Handler.Boom");
                assert!(String::from_utf8_lossy(&body).contains("boom"));
            }
            other => panic!("{other:?}"),
        }
        // No type header (awslambdaric): the body's errorType.
        let (e, rx) = event("req-2b", "{}");
        s.handle.events.send(e).await.unwrap();
        c.get(format!("{}/runtime/invocation/next", s.base))
            .send()
            .await
            .unwrap();
        c.post(format!("{}/runtime/invocation/req-2b/error", s.base))
            .body("{\"errorMessage\":\"x\",\"errorType\":\"ValueError\"}")
            .send()
            .await
            .unwrap();
        match rx.await.unwrap() {
            Reply::Error { error_type, .. } => assert_eq!(error_type, "ValueError"),
            other => panic!("{other:?}"),
        }
        // Larger than the 1024 bytes this server takes.
        let (e, rx) = event("req-3", "{}");
        s.handle.events.send(e).await.unwrap();
        c.get(format!("{}/runtime/invocation/next", s.base))
            .send()
            .await
            .unwrap();
        let (st, b) = json(
            c.post(format!("{}/runtime/invocation/req-3/response", s.base))
                .body(vec![b'x'; 4096])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (st, b["errorType"].as_str()),
            (413, Some("RequestEntityTooLarge"))
        );
        assert!(matches!(rx.await.unwrap(), Reply::TooLarge { limit: 1024 }));
        s.stop.cancel();

        // A runtime that fails its init says so before its first /next.
        let s = start();
        let r = c
            .post(format!("{}/runtime/init/error", s.base))
            .header(
                "lambda-runtime-function-error-type",
                "Runtime.ImportModuleError",
            )
            .body("{\"errorMessage\":\"no module\",\"errorType\":\"Runtime.ImportModuleError\"}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        match &*s.handle.init.borrow() {
            Init::Failed { error_type, .. } => assert_eq!(error_type, "Runtime.ImportModuleError"),
            other => panic!("{other:?}"),
        }
        s.stop.cancel();
    }

    /// Drives `server` until the runtime's first `/next` (its init is over).
    async fn until_ready(server: &mut Server, handle: &RuntimeHandle, limit: Duration) {
        let mut init = handle.init.clone();
        tokio::time::timeout(
            limit,
            server.drive(async { init.wait_for(|s| *s == Init::Ready).await.is_ok() }),
        )
        .await
        .expect("the first /next is served while the start drives the server");
    }

    /// The runtime's `GET /next`: the event's request id and body.
    async fn runtime_next(c: &reqwest::Client, base: &str) -> (String, String) {
        let r = c
            .get(format!("{base}/runtime/invocation/next"))
            .send()
            .await
            .unwrap();
        let id = r.headers()["lambda-runtime-aws-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        (id, r.text().await.unwrap())
    }

    /// A server with no task of its own: the runtime's requests that come while nobody drives
    /// it (its next `/next`, a late answer) wait in the socket, and are served once an
    /// invocation drives it again, from whichever task and thread that is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_driven_only_while_someone_waits_serves_every_invocation() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let base = format!("http://{}/2018-06-01", l.local_addr().unwrap());
        let (handle, mut server) = server(l, CancellationToken::new(), 1024).unwrap();
        // The runtime: one kept-alive connection; the second event is answered late.
        let runtime = tokio::spawn(async move {
            let c = reqwest::Client::new();
            for n in 0..3 {
                let (id, body) = runtime_next(&c, &base).await;
                if n == 1 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let r = c
                    .post(format!("{base}/runtime/invocation/{id}/response"))
                    .body(format!("{id}:{body}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
        });
        let limit = Duration::from_secs(10);
        until_ready(&mut server, &handle, limit).await;
        server.park();
        for n in 0..3 {
            // Undriven for a while: the runtime's 202 and its next /next are not waited on here.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = format!("req-{n}");
            let (e, rx) = event(&id, "{}");
            handle.events.send(e).await.unwrap();
            let reply = if n == 1 {
                // The caller's task gives up half-way (the caller hung up); another task
                // takes the server over and sees the invocation to its end.
                let mut rx = rx;
                let dropped =
                    tokio::time::timeout(Duration::from_millis(50), server.drive(&mut rx)).await;
                assert!(
                    dropped.is_err(),
                    "the runtime answers the second event late"
                );
                server.park();
                let (back, reply) = tokio::spawn(async move {
                    let reply = tokio::time::timeout(limit, server.drive(rx)).await;
                    server.park();
                    (server, reply)
                })
                .await
                .unwrap();
                server = back;
                reply
            } else {
                let reply = tokio::time::timeout(limit, server.drive(rx)).await;
                server.park();
                reply
            };
            match reply {
                Ok(Ok(Reply::Response(b))) => assert_eq!(&b[..], format!("{id}:{{}}").as_bytes()),
                Ok(other) => panic!("{other:?}"),
                Err(_) => panic!("invocation {n} was not answered within {limit:?}"),
            }
        }
        // Every 202 went out while an invocation drove the server.
        tokio::time::timeout(limit, runtime).await.unwrap().unwrap();
    }

    /// The invocation has the runtime's answer before the runtime has its 202: the 202 waits
    /// for the server's next poll (the invocation's end, after the caller's answer).
    #[tokio::test]
    async fn the_runtime_gets_its_202_after_the_invocation_has_the_answer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let base = format!("http://{}/2018-06-01", l.local_addr().unwrap());
        let (handle, mut server) = server(l, CancellationToken::new(), 1024).unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let c = reqwest::Client::new();
            let (id, _) = runtime_next(&c, &base).await;
            let r = c
                .post(format!("{base}/runtime/invocation/{id}/response"))
                .body("ok")
                .send()
                .await
                .unwrap();
            let _ = accepted_tx.send(r.status());
        });
        let limit = Duration::from_secs(10);
        until_ready(&mut server, &handle, limit).await;
        let (e, rx) = event("req-202", "{}");
        handle.events.send(e).await.unwrap();
        match tokio::time::timeout(limit, server.drive(rx)).await {
            Ok(Ok(Reply::Response(b))) => assert_eq!(&b[..], b"ok"),
            other => panic!("{other:?}"),
        }
        // Not driven: the 202 is held back however long the runtime waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            accepted.try_recv().is_err(),
            "the 202 went out with the answer"
        );
        server.park();
        let status = tokio::time::timeout(limit, accepted)
            .await
            .expect("the 202 after the park");
        assert_eq!(status.unwrap(), 202);
    }

    /// Response streaming: chunked, and an error reported in the trailers after some output.
    #[tokio::test]
    async fn streamed_responses_and_error_trailers() {
        use http_body_util::{BodyExt, StreamBody};
        use hyper::body::Frame;
        let s = start();
        let addr = s
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        for with_error in [false, true] {
            let id = if with_error { "s-err" } else { "s-ok" };
            let (e, rx) = event(id, "{}");
            s.handle.events.send(e).await.unwrap();
            reqwest::get(format!("{}/runtime/invocation/next", s.base))
                .await
                .unwrap();
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"part1,"))),
                Ok(Frame::data(Bytes::from_static(b"part2"))),
            ];
            if with_error {
                let mut t = HeaderMap::new();
                t.insert(
                    "lambda-runtime-function-error-type",
                    HeaderValue::from_static("Stream.Fail"),
                );
                let body = base64::engine::general_purpose::STANDARD
                    .encode("{\"errorMessage\":\"mid-stream\"}");
                t.insert(
                    "lambda-runtime-function-error-body",
                    HeaderValue::from_str(&body).unwrap(),
                );
                frames.push(Ok(Frame::trailers(t)));
            }
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            let req = hyper::Request::post(format!("/2018-06-01/runtime/invocation/{id}/response"))
                .header("host", &addr)
                .header("lambda-runtime-function-response-mode", "streaming")
                .header("transfer-encoding", "chunked")
                .header(
                    "trailer",
                    "Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body",
                )
                .body(body)
                .unwrap();
            let resp = tokio::spawn(sender.send_request(req));
            let Reply::Stream {
                frames, finished, ..
            } = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .unwrap()
                .unwrap()
            else {
                panic!("a streamed reply");
            };
            let collected = collect_stream(frames, 1 << 20).await;
            finished.await.unwrap();
            assert_eq!(resp.await.unwrap().unwrap().status(), 202);
            match (with_error, collected) {
                (false, Ok(b)) => assert_eq!(&b[..], b"part1,part2"),
                (true, Err((error_type, body))) => {
                    assert_eq!(error_type, "Stream.Fail");
                    assert_eq!(&body[..], b"{\"errorMessage\":\"mid-stream\"}");
                }
                (_, other) => panic!("{other:?}"),
            }
        }
        s.stop.cancel();
    }
}
