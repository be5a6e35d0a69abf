//! Lambda's own front doors: the Invoke API (`POST /2015-03-31/functions/{name}/invocations`,
//! what the AWS SDKs and CLI call) and function URLs (`/fn/{name}/{path}` for Lambda-mode
//! functions: an HTTP request in, a payload format 2.0 event to the function, its
//! `{statusCode, headers, cookies, body}` back out as the HTTP response).
//!
//! Errors of the caller or the agent are answered as Lambda does (a status, `x-amzn-ErrorType`
//! and `{"Type", "message"}`); errors of the function are a 200 with `X-Amz-Function-Error`
//! and the error as the payload, as the SDKs expect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use super::{App, AppError, authorized, read_body};
use crate::auth;
use crate::instance::InvokeError;
use crate::instance::runtime_api::StreamFrame;
use crate::manifest::Mode;
use crate::pool::{ActiveFunction, function_arn};
use crate::router::{Failure, InvokeRequest, Payload};

type Shared = State<Arc<App>>;

/// A Lambda API error: status, `x-amzn-ErrorType`, and the body the SDKs parse.
pub(super) struct LambdaError {
    pub(super) status: StatusCode,
    pub(super) error_type: &'static str,
    pub(super) message: String,
    pub(super) retry_after: Option<u32>,
}

impl LambdaError {
    pub(super) fn new(
        status: StatusCode,
        error_type: &'static str,
        message: impl Into<String>,
    ) -> Self {
        LambdaError {
            status,
            error_type,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn not_found(arn: &str) -> Self {
        LambdaError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("Function not found: {arn}"),
        )
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        LambdaError::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            message,
        )
    }

    pub(super) fn response(self, request_id: &str) -> Response {
        let body = serde_json::json!({ "Type": "User", "message": self.message });
        let mut r = (self.status, axum::Json(body)).into_response();
        let h = r.headers_mut();
        h.insert(
            "x-amzn-errortype",
            HeaderValue::from_static(self.error_type),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-amzn-requestid", v);
        }
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// `name`, `name:qualifier`, `ACCOUNT:function:name[:qualifier]` or the full ARN, as the
/// Invoke API accepts them: (name, qualifier).
pub(crate) fn parse_function_name(raw: &str) -> Option<(String, Option<String>)> {
    let parts: Vec<&str> = raw.split(':').collect();
    let (name, qualifier) = match parts.as_slice() {
        [name] => (*name, None),
        [name, q] => (*name, Some(*q)),
        [_account, "function", name] => (*name, None),
        [_account, "function", name, q] => (*name, Some(*q)),
        [
            "arn",
            _partition,
            "lambda",
            _region,
            _account,
            "function",
            name,
        ] => (*name, None),
        [
            "arn",
            _partition,
            "lambda",
            _region,
            _account,
            "function",
            name,
            q,
        ] => (*name, Some(*q)),
        _ => return None,
    };
    Some((name.to_string(), qualifier.map(str::to_string)))
}

/// Whether `qualifier` names what this agent runs for `f`: `$LATEST` or its active version.
fn check_qualifier(
    f: &ActiveFunction,
    arn: &str,
    qualifier: Option<&str>,
) -> Result<(), LambdaError> {
    match qualifier {
        None | Some("$LATEST") => Ok(()),
        Some(q) if q == f.version.to_string() => Ok(()),
        Some(q) if q.parse::<u64>().is_ok() => Err(LambdaError::invalid(format!(
            "an event invoke config is $LATEST's (version {} of {}), not version {q}'s",
            f.version, f.name
        ))),
        Some(q) => Err(LambdaError::not_found(&format!(
            "{arn}:{q} (an event invoke config is $LATEST's: use $LATEST or the active version {})",
            f.version
        ))),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct InvokeQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

/// Who may invoke: a `public` function anyone; others a SigV4 signature by one of the
/// operator's access keys, or the admin bearer token. A signature that is there is checked
/// even on a public function: public welcomes unsigned calls, it does not ignore bad ones.
pub(crate) fn check_caller(
    app: &App,
    f: &ActiveFunction,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<(), auth::AuthError> {
    if super::forwarded(&parts.extensions)
        || authorized(app, &parts.headers)
        || (f.manifest.public && !auth::carries_sigv4(&parts.uri, &parts.headers))
    {
        return Ok(());
    }
    let id = app.keys.verify(
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
        SystemTime::now(),
    )?;
    scoped(
        app,
        &id,
        crate::auth::keys::Scope::Invoke,
        "InvokeFunction",
        &f.name,
    )
}

/// Whether key `id` may do `action` (which needs `need`) to function `name`.
pub(crate) fn scoped(
    app: &App,
    id: &str,
    need: crate::auth::keys::Scope,
    action: &'static str,
    name: &str,
) -> Result<(), auth::AuthError> {
    match app.keys.get(id) {
        Some(k) if k.allows(need, Some(name)) => Ok(()),
        Some(k) => Err(auth::AuthError::Denied {
            key: k.access_key_id,
            scope: k.scope.as_str(),
            action,
            function: function_arn(&app.config, name),
        }),
        None => Err(auth::AuthError::UnknownKey),
    }
}

/// The payload a function error becomes on the Invoke API (with `X-Amz-Function-Error`).
pub(crate) fn function_error_payload(e: &InvokeError, request_id: &str) -> Option<Bytes> {
    let json = |t: &str, m: String| {
        Some(Bytes::from(
            serde_json::json!({ "errorType": t, "errorMessage": m }).to_string(),
        ))
    };
    match e {
        InvokeError::Handler { body, .. } | InvokeError::InitFailed { body, .. } => {
            Some(body.clone())
        }
        InvokeError::Timeout(d) => json(
            "Sandbox.Timedout",
            format!(
                "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                d.as_secs_f64()
            ),
        ),
        InvokeError::InitTimeout(d) => json(
            "Runtime.InitTimeout",
            format!(
                "RequestId: {request_id} Error: the runtime did not ask for its first event within {:.2} seconds",
                d.as_secs_f64()
            ),
        ),
        InvokeError::OutOfMemory { limit_mb } => json(
            "Runtime.OutOfMemory",
            format!(
                "RequestId: {request_id} Error: Runtime exited with error: signal: killed (out of memory, {limit_mb} MB)"
            ),
        ),
        InvokeError::Crashed { name, .. } => json(
            "Runtime.ExitError",
            format!(
                "RequestId: {request_id} Error: Runtime exited with error: signal: {}",
                name.trim_start_matches("SIG").to_lowercase()
            ),
        ),
        InvokeError::FunctionError(code) => json(
            "Runtime.ExitError",
            format!("RequestId: {request_id} Error: Runtime exited with error: exit status {code}"),
        ),
        InvokeError::ResponseTooLarge { limit } => json(
            "Function.ResponseSizeTooLarge",
            format!("Response payload size exceeded maximum allowed payload size ({limit} bytes)."),
        ),
        InvokeError::Spawn(err) => json(
            "Runtime.InvalidEntrypoint",
            format!("RequestId: {request_id} Error: {err}"),
        ),
        _ => None,
    }
}

/// The Lambda API error for what the function did not cause.
pub(super) fn service_error(e: &InvokeError, arn: &str) -> LambdaError {
    match e {
        InvokeError::NotFound(_) => LambdaError::not_found(arn),
        InvokeError::Overloaded { .. } => LambdaError {
            retry_after: Some(1),
            ..LambdaError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                "Rate Exceeded.",
            )
        },
        InvokeError::NoCapacity(short) => LambdaError {
            retry_after: Some(1),
            ..LambdaError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                short.to_string(),
            )
        },
        InvokeError::Draining => LambdaError {
            retry_after: Some(5),
            ..LambdaError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceException",
                "the agent is shutting down",
            )
        },
        other => {
            tracing::error!("invocation: {other}");
            LambdaError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                "internal error (see the agent's log)",
            )
        }
    }
}

/// `POST /2015-03-31/functions/{name}/invocations`.
pub async fn invoke_api(
    State(app): Shared,
    Path(raw_name): Path<String>,
    Query(q): Query<InvokeQuery>,
    req: Request,
) -> Response {
    invoke(&app, &raw_name, q, req).await
}

/// [`invoke_api`] without axum's extractors (the router's fast path, [`super::hot`]).
pub(super) async fn invoke(app: &App, raw_name: &str, q: InvokeQuery, req: Request) -> Response {
    let id = super::invocation_id(req.extensions());
    let mut resp = match invoke_api_inner(app, raw_name, q, req, &id).await {
        Ok(r) => r,
        Err(e) => e.response(&id),
    };
    super::stamp_host(&app.node_id, &mut resp);
    resp
}

/// An invocation through the Invoke API or InvokeWithResponseStream, checked and read: the
/// caller is allowed, the qualifier resolved, the payload read and valid.
pub(super) struct Prepared {
    pub name: String,
    pub arn: String,
    /// The version a qualified call runs (a version number or an alias), None: the active.
    pub pinned: Option<Arc<ActiveFunction>>,
    /// The qualifier as the caller named it.
    pub qualifier: Option<String>,
    /// The version that will run, and the active one.
    pub executed: u64,
    pub active: u64,
    pub invocation_type: String,
    pub want_tail: bool,
    pub body: Bytes,
    pub client_context: Option<String>,
}

/// Reads and checks an invocation of `raw_name` (a name, `name:qualifier` or an ARN) for the
/// Invoke API and InvokeWithResponseStream alike.
pub(super) async fn prepare(
    app: &App,
    raw_name: &str,
    q: InvokeQuery,
    req: Request,
) -> Result<Prepared, LambdaError> {
    let config = &app.router.config;
    let (name, path_qualifier) = parse_function_name(raw_name).ok_or_else(|| {
        LambdaError::invalid(format!(
            "1 validation error detected: Value '{raw_name}' at 'functionName' failed to satisfy constraint: a function name, partial ARN or ARN"
        ))
    })?;
    let arn = function_arn(config, &name);
    let f = app.router.lookup(&name).ok_or_else(|| {
        match app.router.registry.failed(&name) {
            // Lambda's answer for a function whose state forbids the call.
            Some(why) => LambdaError::new(
                StatusCode::CONFLICT,
                "ResourceConflictException",
                format!(
                    "The operation cannot be performed at this time. The function is currently in the following state: Failed ({why})"
                ),
            ),
            None => LambdaError::not_found(&arn),
        }
    })?;
    let qualifier = q.qualifier.or(path_qualifier);
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let invocation_type = header("x-amz-invocation-type")
        .unwrap_or("RequestResponse")
        .to_string();
    let want_tail = match header("x-amz-log-type") {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(LambdaError::invalid(format!(
                "X-Amz-Log-Type must be None or Tail, not {other:?}"
            )));
        }
    };
    let limit = match invocation_type.as_str() {
        // Lambda's limit for asynchronous invocations.
        "Event" => crate::events::MAX_EVENT_BYTES,
        _ => (app.config.limits.max_request_mb << 20) as usize,
    };
    let body = read_body(headers, body, limit)
        .await
        .map_err(|e| match e.status {
            StatusCode::PAYLOAD_TOO_LARGE => LambdaError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                format!(
                    "Request must be smaller than {limit} bytes for the InvokeFunction operation"
                ),
            ),
            // SDKs retry a 408 as a transient failure.
            StatusCode::REQUEST_TIMEOUT => LambdaError::new(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeoutException",
                e.message,
            ),
            _ => LambdaError::invalid(e.message),
        })?;
    check_caller(app, &f, &parts, &body).map_err(|e| LambdaError {
        status: e.status(),
        error_type: e.error_type(),
        message: e.to_string(),
        retry_after: None,
    })?;
    // A version number or an alias: the version it names runs (checked once the caller is).
    let pinned = super::control::invoke_target(app, &f, qualifier.as_deref()).await?;
    let run = pinned.as_deref().unwrap_or(&f);
    let (executed, mode) = (run.version, run.manifest.mode);
    // Lambda takes only JSON payloads; no payload is an empty object. An exec-mode function
    // gets the bytes as they came, on its stdin.
    let body = if mode == Mode::Exec {
        body
    } else if body.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
            return Err(LambdaError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                format!("Could not parse request body into json: {e}"),
            ));
        }
        body
    };
    let client_context = match header("x-amz-client-context") {
        None => None,
        Some(c) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    LambdaError::invalid("X-Amz-Client-Context must be base64-encoded JSON")
                })?,
        ),
    };
    Ok(Prepared {
        name,
        arn,
        executed,
        active: f.version,
        pinned,
        qualifier,
        invocation_type,
        want_tail,
        body,
        client_context,
    })
}

async fn invoke_api_inner(
    app: &App,
    raw_name: &str,
    q: InvokeQuery,
    req: Request,
    id: &str,
) -> Result<Response, LambdaError> {
    let Prepared {
        name,
        arn,
        pinned,
        qualifier,
        executed,
        active,
        invocation_type,
        want_tail,
        body,
        client_context,
    } = prepare(app, raw_name, q, req).await?;
    let invocation_type = invocation_type.as_str();
    match invocation_type {
        "RequestResponse" => {}
        "DryRun" => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            set_header(&mut r, "x-amzn-requestid", id);
            set_header(&mut r, "x-amz-executed-version", &executed.to_string());
            return Ok(r);
        }
        "Event" if pinned.is_some() => {
            return Err(LambdaError::invalid(format!(
                "Qualifier: Event invokes run $LATEST (version {active}) only for now, not version {executed}"
            )));
        }
        // Boxed, as the rare branches below: inline, each would size every call's future
        // (which is moved into a box per request) by its own.
        "Event" => return Box::pin(accept_event(app, &name, id, body)).await,
        other => {
            return Err(LambdaError::invalid(format!(
                "InvocationType must be RequestResponse, Event or DryRun, not {other:?}"
            )));
        }
    }
    let result = app
        .router
        .invoke(InvokeRequest {
            name: &name,
            body,
            request_id: id,
            want_tail,
            client_context,
            env: Vec::new(),
            version: pinned,
            qualifier: qualifier.as_deref(),
            stdout: None,
        })
        .await;
    let limit = app.router.max_response;
    let mut after = crate::router::AfterAnswer::default();
    let result = match result {
        // A streamed answer is read to its end: the Invoke API answers buffered.
        Ok(inv) => {
            after = inv.after;
            match inv.body.collect(limit).await {
                Ok(body) => Ok((body, inv.version, inv.log_tail)),
                Err(error) => Err(Failure {
                    error,
                    version: Some(inv.version),
                    log_tail: inv.log_tail,
                }),
            }
        }
        Err(f) => Err(f),
    };
    let (status_body, version, tail, function_error) = match result {
        Ok((body, version, tail)) => (body, version, tail, None),
        Err(Failure {
            error,
            version,
            log_tail,
        }) => match function_error_payload(&error, id) {
            Some(payload) => (payload, version.unwrap_or(executed), log_tail, Some(())),
            None => return Err(service_error(&error, &arn)),
        },
    };
    let mut r = (StatusCode::OK, status_body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_header(&mut r, "x-amzn-requestid", id);
    r.headers_mut()
        .insert("x-amz-executed-version", HeaderValue::from(version));
    if function_error.is_some() {
        set_header(&mut r, "x-amz-function-error", "Unhandled");
    }
    if let Some(t) = tail {
        set_header(
            &mut r,
            "x-amz-log-result",
            &base64::engine::general_purpose::STANDARD.encode(t),
        );
    }
    Ok(super::after_sent(r, after))
}

/// An Event invoke: 202 with the request id once the event is on disk.
async fn accept_event(
    app: &App,
    name: &str,
    id: &str,
    body: Bytes,
) -> Result<Response, LambdaError> {
    use crate::events::AcceptError;
    if app.router.draining.is_cancelled() {
        return Err(LambdaError {
            retry_after: Some(5),
            ..LambdaError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceException",
                "the agent is shutting down",
            )
        });
    }
    match app.events.accept(name, id, body).await {
        Ok(()) => {
            let mut r = StatusCode::ACCEPTED.into_response();
            set_header(&mut r, "x-amzn-requestid", id);
            Ok(r)
        }
        Err(e @ (AcceptError::Full { .. } | AcceptError::StreamFull { .. })) => Err(LambdaError {
            retry_after: Some(1),
            ..LambdaError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                e.to_string(),
            )
        }),
        Err(e @ AcceptError::TooLarge { .. }) => Err(LambdaError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            e.to_string(),
        )),
        Err(AcceptError::Storage(e)) => {
            tracing::error!(function = name, "accepting an event: {e}");
            let message = match e {
                crate::events::queue::QueueError::DiskFull(_) => {
                    "the event could not be stored: the agent's disk is full"
                }
                crate::events::queue::QueueError::Nats(_) => {
                    "the event could not be stored: NATS JetStream is unreachable or did not \
                     answer (see the agent's log)"
                }
                _ => "the event could not be stored (see the agent's log)",
            };
            Err(LambdaError {
                retry_after: Some(5),
                ..LambdaError::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceException", message)
            })
        }
    }
}

/// The event invoke config API's body (PutFunctionEventInvokeConfig and Update).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventInvokeConfigBody {
    maximum_retry_attempts: Option<i64>,
    maximum_event_age_in_seconds: Option<i64>,
    destination_config: Option<DestinationConfigBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DestinationConfigBody {
    on_success: Option<OnDestination>,
    on_failure: Option<OnDestination>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OnDestination {
    destination: Option<String>,
}

fn config_json(arn: &str, c: &crate::events::InvokeConfig) -> serde_json::Value {
    let dest = |d: &Option<String>| match d {
        Some(d) => serde_json::json!({ "Destination": d }),
        None => serde_json::json!({}),
    };
    let mut v = serde_json::json!({
        "LastModified": c.last_modified,
        "FunctionArn": format!("{arn}:$LATEST"),
        "DestinationConfig": { "OnSuccess": dest(&c.on_success), "OnFailure": dest(&c.on_failure) },
    });
    if let Some(n) = c.max_retry_attempts {
        v["MaximumRetryAttempts"] = n.into();
    }
    if let Some(n) = c.max_event_age_s {
        v["MaximumEventAgeInSeconds"] = n.into();
    }
    v
}

/// `PUT|POST|GET|DELETE /2019-09-25/functions/{name}/event-invoke-config`: Lambda's event
/// invoke config (retries, event age, destinations). PUT replaces (what it leaves out is
/// removed), POST merges, DELETE answers 204.
pub async fn event_invoke_config(
    State(app): Shared,
    Path(raw_name): Path<String>,
    Query(q): Query<InvokeQuery>,
    req: Request,
) -> Response {
    let id = super::request_id();
    match event_invoke_config_inner(&app, &raw_name, q, req).await {
        Ok(r) => {
            let mut r = r;
            set_header(&mut r, "x-amzn-requestid", &id);
            r
        }
        Err(e) => e.response(&id),
    }
}

async fn event_invoke_config_inner(
    app: &App,
    raw_name: &str,
    q: InvokeQuery,
    req: Request,
) -> Result<Response, LambdaError> {
    let (name, path_qualifier) = parse_function_name(raw_name).ok_or_else(|| {
        LambdaError::invalid(format!(
            "1 validation error detected: Value '{raw_name}' at 'functionName' failed to satisfy constraint: a function name, partial ARN or ARN"
        ))
    })?;
    let arn = function_arn(&app.router.config, &name);
    let (parts, body) = req.into_parts();
    let body = read_body(&parts.headers, body, 64 << 10)
        .await
        .map_err(|e| LambdaError::invalid(e.message))?;
    if !super::authorized(app, &parts.headers) {
        app.keys
            .verify(
                &parts.method,
                &parts.uri,
                &parts.headers,
                &body,
                SystemTime::now(),
            )
            .and_then(|id| {
                scoped(
                    app,
                    &id,
                    crate::auth::keys::Scope::Deploy,
                    "PutFunctionEventInvokeConfig",
                    &name,
                )
            })
            .map_err(|e| LambdaError {
                status: e.status(),
                error_type: e.error_type(),
                message: e.to_string(),
                retry_after: None,
            })?;
    }
    let f = app
        .router
        .lookup(&name)
        .ok_or_else(|| LambdaError::not_found(&arn))?;
    check_qualifier(&f, &arn, q.qualifier.or(path_qualifier).as_deref())?;
    let method = parts.method.clone();
    let current = app.events.invoke_config(&name);
    let missing = || {
        LambdaError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("The function {arn} doesn't have an EventInvokeConfig"),
        )
    };
    let stored = |e: crate::events::queue::QueueError| {
        tracing::error!(function = %name, "storing an event invoke config: {e}");
        LambdaError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceException",
            "the config could not be stored (see the agent's log)",
        )
    };
    match method {
        axum::http::Method::GET => {
            let c = current.ok_or_else(missing)?;
            Ok(axum::Json(config_json(&arn, &c)).into_response())
        }
        axum::http::Method::DELETE => {
            current.ok_or_else(missing)?;
            app.events
                .set_invoke_config(&name, None)
                .await
                .map_err(stored)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        m => {
            let given: EventInvokeConfigBody = if body.iter().all(u8::is_ascii_whitespace) {
                EventInvokeConfigBody::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    LambdaError::invalid(format!(
                        "the request body is not a valid EventInvokeConfig: {e}"
                    ))
                })?
            };
            let mut c = if m == axum::http::Method::POST {
                // UpdateFunctionEventInvokeConfig: what is not given stays.
                current.unwrap_or_default()
            } else {
                crate::events::InvokeConfig::default()
            };
            if let Some(n) = given.maximum_retry_attempts {
                if !(0..=2).contains(&n) {
                    return Err(LambdaError::invalid(format!(
                        "1 validation error detected: Value '{n}' at 'maximumRetryAttempts' failed to satisfy constraint: Member must have value between 0 and 2"
                    )));
                }
                c.max_retry_attempts = Some(n as u32);
            }
            if let Some(n) = given.maximum_event_age_in_seconds {
                if !(60..=21600).contains(&n) {
                    return Err(LambdaError::invalid(format!(
                        "1 validation error detected: Value '{n}' at 'maximumEventAgeInSeconds' failed to satisfy constraint: Member must have value between 60 and 21600"
                    )));
                }
                c.max_event_age_s = Some(n as u32);
            }
            if let Some(d) = given.destination_config {
                for (field, on, slot) in [
                    ("OnSuccess", d.on_success, &mut c.on_success),
                    ("OnFailure", d.on_failure, &mut c.on_failure),
                ] {
                    if let Some(on) = on {
                        match on.destination {
                            Some(dest) if !dest.is_empty() => {
                                crate::events::Destination::parse(&dest).map_err(|e| {
                                    LambdaError::invalid(format!(
                                        "DestinationConfig.{field}.Destination: {e}"
                                    ))
                                })?;
                                *slot = Some(dest);
                            }
                            _ => *slot = None,
                        }
                    }
                }
            }
            c.last_modified = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0);
            app.events
                .set_invoke_config(&name, Some(c.clone()))
                .await
                .map_err(stored)?;
            Ok(axum::Json(config_json(&arn, &c)).into_response())
        }
    }
}

/// `name` is a lowercase literal: inserted as it is, without a copy (a `HeaderName` made from
/// bytes copies a name it does not know, on every answer).
pub(super) fn set_header(r: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// `/fn/{name}` and `/fn/{name}/{*path}`: a function URL for a Lambda-mode function, the
/// raw-body invocation for an exec-mode one (POST on `/fn/{name}` only).
pub async fn function_url(State(app): Shared, req: Request) -> Response {
    let id = super::invocation_id(req.extensions());
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/fn/").unwrap_or("");
    let (name, raw_path) = match rest.split_once('/') {
        Some((n, p)) => (n.to_string(), format!("/{p}")),
        None => (rest.to_string(), "/".to_string()),
    };
    let mut resp = match function_url_inner(&app, &name, &raw_path, req, &id).await {
        Ok(r) => r,
        Err((e, version)) => {
            let mut r = e.into_response();
            if let Some(v) = version {
                r.headers_mut()
                    .insert("x-fnlet-version", HeaderValue::from(v));
            }
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-fnlet-request-id", v.clone());
        resp.headers_mut().insert("x-amzn-requestid", v);
    }
    super::stamp_host(&app.node_id, &mut resp);
    resp
}

async fn function_url_inner(
    app: &App,
    name: &str,
    raw_path: &str,
    req: Request,
    id: &str,
) -> Result<Response, (AppError, Option<u64>)> {
    let f = app
        .router
        .lookup(name)
        .ok_or_else(|| (super::not_served(app, name), None))?;
    if f.manifest.mode == Mode::Exec {
        if raw_path != "/" || req.method() != axum::http::Method::POST {
            return Err((
                AppError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{name} is an exec-mode function: invoke it with POST /fn/{name}"),
                ),
                None,
            ));
        }
        return Box::pin(super::invoke_exec(
            app,
            req.headers().clone(),
            name,
            req,
            id,
        ))
        .await;
    }
    let source_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip());
    let (mut parts, body) = req.into_parts();
    let limit = (app.config.limits.max_request_mb << 20) as usize;
    let body = read_body(&parts.headers, body, limit)
        .await
        .map_err(|e| (e, None))?;
    check_caller(app, &f, &parts, &body).map_err(|e| {
        (
            AppError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            None,
        )
    })?;
    // What the agent checked is not the function's to see (or log, or return).
    let raw_query =
        auth::strip_credentials(&mut parts.headers, parts.uri.query().unwrap_or(""), |v| {
            super::is_admin_token(app, v)
        });
    // Runtime clients build URLs from it (lambda_http panics on one it cannot parse): only a
    // well-formed host[:port] is passed on.
    let domain = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .filter(|h| {
            h.parse::<axum::http::uri::Authority>()
                .is_ok_and(|a| a.as_str() == *h && !h.contains('@'))
        })
        .unwrap_or("localhost")
        .to_string();
    let event = super::function_url::event(&super::function_url::UrlRequest {
        method: &parts.method,
        version: parts.version,
        raw_path,
        raw_query: &raw_query,
        headers: &parts.headers,
        body: &body,
        source_ip,
        request_id: id,
        domain_name: &domain,
        function: name,
        account_id: &app.router.config.lambda.account_id,
        now: SystemTime::now(),
    });
    let result = app
        .router
        .invoke(InvokeRequest {
            name,
            body: Bytes::from(event),
            request_id: id,
            want_tail: false,
            client_context: None,
            env: Vec::new(),
            version: None,
            qualifier: None,
            stdout: None,
        })
        .await;
    match result {
        Ok(inv) => {
            let version = inv.version;
            let after = inv.after;
            let bad = |e: super::function_url::UrlError| {
                (
                    AppError::new(
                        StatusCode::BAD_GATEWAY,
                        "bad_function_response",
                        e.to_string(),
                    ),
                    Some(version),
                )
            };
            let mut r = match inv.body {
                Payload::Full(b) => super::function_url::response(&b)
                    .map_err(bad)?
                    .map(axum::body::Body::from),
                Payload::Stream {
                    content_type,
                    frames,
                    released,
                } => streamed_response(content_type, frames, released)
                    .await
                    .map_err(|e| match e {
                        StreamStart::Url(e) => bad(e),
                        StreamStart::Failed(error_type, body) => (
                            InvokeError::Handler { error_type, body }.into(),
                            Some(version),
                        ),
                    })?,
            };
            r.headers_mut()
                .insert("x-fnlet-version", HeaderValue::from(version));
            Ok(super::after_sent(r, after))
        }
        Err(f) => Err((f.error.into(), f.version)),
    }
}

/// A streamed answer the function failed after its status went out: the body ends with this
/// error (hyper cuts the connection, as Lambda does; over QUIC it is the End frame's error).
#[derive(Debug, thiserror::Error)]
#[error("the function's streamed response failed: {error_type}")]
pub struct StreamFailed {
    /// The runtime's error type (`errorType`).
    pub error_type: String,
}

/// Why a streamed answer could not become an HTTP response.
enum StreamStart {
    Url(super::function_url::UrlError),
    /// The stream failed before its first byte reached the caller.
    Failed(String, Bytes),
}

/// A streamed function-URL answer: the HTTP integration prelude (status, headers, cookies,
/// then eight NULs) when the runtime says so, then the body as it comes. An error after the
/// status has gone out cuts the connection, as Lambda does.
async fn streamed_response(
    content_type: Option<String>,
    mut frames: tokio::sync::mpsc::Receiver<StreamFrame>,
    released: Option<tokio::sync::oneshot::Receiver<crate::instance::lambda::Settled>>,
) -> Result<Response, StreamStart> {
    use futures_util::StreamExt;
    let integration = content_type.as_deref() == Some(super::function_url::STREAM_CONTENT_TYPE);
    let mut head = Vec::new();
    let (parts, rest) = if integration {
        loop {
            match frames.recv().await {
                Some(StreamFrame::Data(d)) => head.extend_from_slice(&d),
                Some(StreamFrame::Error { error_type, body }) => {
                    return Err(StreamStart::Failed(error_type, body));
                }
                None => {}
            }
            match super::function_url::split_stream_prelude(&head).map_err(StreamStart::Url)? {
                Some((parts, at)) => break (parts, head.split_off(at)),
                None if frames.is_closed() && frames.is_empty() => {
                    // Ended inside its prelude: what came is the whole answer.
                    let whole = std::mem::take(&mut head);
                    if let Some(r) = released {
                        let _ = r.await;
                    }
                    let r = super::function_url::response(&whole).map_err(StreamStart::Url)?;
                    return Ok(r.map(axum::body::Body::from));
                }
                None => {}
            }
        }
    } else {
        let mut r = Response::new(());
        if let Some(v) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        (r.into_parts().0, Vec::new())
    };
    let first = futures_util::stream::iter((!rest.is_empty()).then(|| Ok(Bytes::from(rest))));
    let more = tokio_stream::wrappers::ReceiverStream::new(frames).map(|f| match f {
        StreamFrame::Data(d) => Ok(d),
        StreamFrame::Error { error_type, .. } => Err(StreamFailed { error_type }),
    });
    // The answer ends once the instance is free again.
    let settle = futures_util::stream::once(async move {
        if let Some(r) = released {
            let _ = r.await;
        }
    })
    .filter_map(|()| async { None::<Result<Bytes, StreamFailed>> });
    let body = axum::body::Body::from_stream(first.chain(more).chain(settle));
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_in_every_form() {
        let n = |s: &str| parse_function_name(s);
        assert_eq!(n("hello"), Some(("hello".into(), None)));
        assert_eq!(n("hello:3"), Some(("hello".into(), Some("3".into()))));
        assert_eq!(
            n("000000000000:function:hello"),
            Some(("hello".into(), None))
        );
        assert_eq!(
            n("arn:aws:lambda:us-east-1:000000000000:function:hello:$LATEST"),
            Some(("hello".into(), Some("$LATEST".into())))
        );
        assert_eq!(n("a:b:c:d:e"), None);
    }
}
