//! Calls go to warm hosts: an invocation that reached this host is run by the host the
//! function's rendezvous ranking picks (bounded load), forwarded over QUIC when that is another
//! host. The caller is authorised here first; the host that runs the call trusts that, and the
//! caller sees the same status, headers and body as from a local call, `x-fnlet-host` naming
//! where it ran. A call is forwarded at most once, and sent elsewhere only if it provably never
//! started.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};

use super::{App, authorized, read_body};
use crate::cluster::invoke::{self, CallError, Passing};
use crate::manifest::Mode;
use crate::pool::ActiveFunction;

/// The function an invocation path names: `/fn/NAME[/...]` or the Invoke API's
/// `/2015-03-31/functions/NAME/invocations` (NAME may be an ARN there).
fn function_of(path: &str) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/fn/") {
        let name = rest.split('/').next()?;
        return (!name.is_empty()).then(|| name.to_string());
    }
    let raw = path
        .strip_prefix("/2015-03-31/functions/")?
        .strip_suffix("/invocations")?;
    let raw = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    super::parse_function_name(&raw).map(|(name, _)| name)
}

/// Whether an Invoke API call names a qualifier other than `$LATEST` (in its path or as
/// `Qualifier=`).
fn names_a_version(uri: &axum::http::Uri) -> bool {
    let path = uri.path();
    let in_path = path
        .strip_prefix("/2015-03-31/functions/")
        .and_then(|r| r.strip_suffix("/invocations"))
        .map(|raw| {
            percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .into_owned()
        })
        .and_then(|raw| super::parse_function_name(&raw))
        .and_then(|(_, q)| q);
    let in_query = path.starts_with("/2015-03-31/").then(|| {
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "Qualifier")
            .map(|(_, v)| v.into_owned())
    });
    [in_path, in_query.flatten()]
        .iter()
        .flatten()
        .any(|q| q != "$LATEST")
}

/// Whether the caller may invoke `f` here, as the handler would decide: it must be, before
/// anything is forwarded (the peer that runs it does not ask again).
fn may_invoke(
    app: &App,
    f: &ActiveFunction,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> bool {
    match f.manifest.mode {
        Mode::Exec if parts.uri.path().starts_with("/fn/") => {
            f.manifest.public || authorized(app, &parts.headers)
        }
        _ => super::lambda::check_caller(app, f, parts, body).is_ok(),
    }
}

/// The request id and deadline a forwarded call carries. A QUIC caller's call (handed in by
/// the cluster layer) keeps the id it has here and its caller's deadline; an HTTP call gets a
/// new id, and the wait its caller is given: the function's timeout and its queue, with room
/// for the trip.
fn id_and_deadline(
    extensions: &axum::http::Extensions,
    f: &ActiveFunction,
    app: &App,
) -> (String, u64) {
    let wait = Duration::from_secs_f64(f.resolved.timeout_s)
        + app.router.queue_timeout
        + Duration::from_secs(2);
    passing_of(extensions.get::<super::ClusterCall>(), wait)
}

/// [`id_and_deadline`] for a call handed in as `call` (if it was), an HTTP caller waiting
/// `wait`.
fn passing_of(call: Option<&super::ClusterCall>, wait: Duration) -> (String, u64) {
    let waited = || {
        SystemTime::now()
            .checked_add(wait)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| d.as_millis() as u64)
    };
    match call {
        Some(c) => (c.request_id.clone(), c.deadline_ms.unwrap_or_else(waited)),
        None => (super::request_id(), waited()),
    }
}

/// The forwarding layer in front of the invocation routes ([`route`]). Outside a cluster it
/// passes requests straight to the route below: no boxed future, no clone of the route,
/// nothing per call but one check.
#[derive(Clone)]
pub(super) struct ForwardLayer(pub Arc<App>);

impl<S> tower::Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward {
            app: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub(super) struct Forward<S> {
    app: Arc<App>,
    inner: S,
}

impl<S> tower::Service<Request> for Forward<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        futures_util::future::BoxFuture<'static, Result<Response, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if self.app.cluster.get().is_none() {
            return futures_util::future::Either::Left(self.inner.call(req));
        }
        // The service polled ready is the one to call; its clone stays for the next call.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let app = self.app.clone();
        futures_util::future::Either::Right(Box::pin(async move {
            Ok(route(app, req, Next(ready)).await)
        }))
    }
}

/// The route below the forwarding layer.
struct Next<S>(S);

impl<S> Next<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    async fn run(self, req: Request) -> Response {
        match tower::ServiceExt::oneshot(self.0, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// A call for a function: served here, or forwarded to the host that should serve it.
async fn route<S>(app: Arc<App>, req: Request, next: Next<S>) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let Some(node) = app.cluster.get().cloned() else {
        return next.run(req).await;
    };
    if super::forwarded(req.extensions()) || app.router.draining.is_cancelled() {
        return next.run(req).await;
    }
    let Some(name) = function_of(req.uri().path()) else {
        return next.run(req).await;
    };
    // A call for a version other than $LATEST (a number or an alias) runs where it was made:
    // aliases and old versions live in this host's store.
    if names_a_version(req.uri()) {
        return next.run(req).await;
    }
    // With the JetStream backend an Event invoke is published here: every member takes
    // events from the stream, so a trip to the owner would add nothing.
    if app.config.events.backend == "nats"
        && req
            .headers()
            .get("x-amz-invocation-type")
            .is_some_and(|v| v.as_bytes() == b"Event")
    {
        return next.run(req).await;
    }
    let Some(f) = app.router.lookup(&name) else {
        return next.run(req).await;
    };
    let own_load = app.router.registry.running_total().min(u64::from(u32::MAX)) as u32;
    let room_here = app.router.registry.room_for(&name);
    let Some(mut peer) = node.pick(&name, own_load, room_here) else {
        return next.run(req).await;
    };
    let source = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::Ipv4Addr::LOCALHOST.into(), |c| c.0.ip());
    let (parts, body) = req.into_parts();
    let limit = (app.config.limits.max_request_mb << 20) as usize;
    let payload = match read_body(&parts.headers, body, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let local = |parts, payload: bytes::Bytes| Request::from_parts(parts, Body::from(payload));
    let (request_id, deadline_ms) = id_and_deadline(&parts.extensions, &f, &app);
    if !may_invoke(&app, &f, &parts, &payload) {
        // Refused here, in the handler's own words.
        return next.run(local(parts, payload)).await;
    }
    let passing = Passing {
        request_id: &request_id,
        deadline_ms,
        hops: 0,
        source,
    };
    let call = match invoke::forward_call(
        &parts,
        payload.clone(),
        f.manifest.mode == Mode::Lambda,
        |v| super::is_admin_token(&app, v),
        &passing,
    ) {
        Ok(c) => c,
        // Not something a peer can be handed (a bad log type, say): the handler answers.
        Err(_) => return next.run(local(parts, payload)).await,
    };
    let metrics = &app.router.metrics;
    let max_answer = u32::try_from(app.config.limits.max_response_mb << 20).unwrap_or(u32::MAX);
    // A peer without room refuses at once (BUSY): the call goes to the next host with room,
    // at most twice, then runs here.
    for attempt in 0..2 {
        let conn = match node.transport.connect(&peer.id, peer.addr).await {
            Ok(c) => c,
            Err(e) => {
                // Never started there: run it here.
                metrics.forward("unreachable", None);
                tracing::info!(function = %name, peer = %peer.id, "running here: {e}");
                return next.run(local(parts, payload)).await;
            }
        };
        let started = Instant::now();
        let _in_flight = node.forwarding(&peer.id);
        let e = match invoke::call(
            &conn,
            call.clone(),
            max_answer.max(fnlet_cluster::frame::DEFAULT_MAX_BODY),
        )
        .await
        {
            Ok(resp) => {
                metrics.forward("ok", Some(started.elapsed()));
                return resp;
            }
            Err(e) => e,
        };
        if let CallError::Busy { .. } = e {
            node.mark_full(&peer.id);
            let room_here = app.router.registry.room_for(&name);
            let own_load = app.router.registry.running_total().min(u64::from(u32::MAX)) as u32;
            if attempt == 0
                && !room_here
                && let Some(next_peer) = node.pick(&name, own_load, room_here)
                && next_peer.id != peer.id
            {
                metrics.forward("spilled", None);
                tracing::info!(function = %name, peer = %peer.id, to = %next_peer.id, "no room there: {e}");
                peer = next_peer;
                continue;
            }
        }
        let never_started = matches!(
            e,
            CallError::Busy { .. } | CallError::ShuttingDown { .. } | CallError::HopLimit { .. }
        );
        if never_started || (f.manifest.idempotent && matches!(e, CallError::PeerLost { .. })) {
            metrics.forward("retried_here", None);
            tracing::info!(function = %name, peer = %peer.id, "running here: {e}");
            return next.run(local(parts, payload)).await;
        }
        metrics.forward(e.app_error().kind, None);
        tracing::warn!(function = %name, peer = %peer.id, request_id, "forwarded call failed: {e}");
        return e.app_error().into_response();
    }
    next.run(local(parts, payload)).await
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{function_of, passing_of};
    use crate::api::ClusterCall;

    #[test]
    fn a_quic_callers_call_keeps_its_id_and_deadline_when_forwarded() {
        let call = ClusterCall {
            request_id: "caller-7".into(),
            forwarded_by: None,
            hops: 0,
            deadline_ms: Some(1_767_225_630_000),
        };
        assert_eq!(
            passing_of(Some(&call), Duration::from_secs(60)),
            ("caller-7".to_string(), 1_767_225_630_000)
        );
        // An HTTP caller: a new id each time, and the wait from now.
        let now_ms = |d: Duration| {
            (SystemTime::now() + d)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = now_ms(Duration::from_secs(60));
        let (a, deadline) = passing_of(None, Duration::from_secs(60));
        let after = now_ms(Duration::from_secs(60));
        assert!((before..=after).contains(&deadline), "{deadline}");
        let (b, _) = passing_of(None, Duration::from_secs(60));
        assert_ne!(a, b);
        assert_ne!(a, "caller-7");
    }

    #[test]
    fn invocation_paths_name_their_function() {
        assert_eq!(function_of("/fn/hello").as_deref(), Some("hello"));
        assert_eq!(function_of("/fn/hello/a/b").as_deref(), Some("hello"));
        assert_eq!(function_of("/fn/").as_deref(), None);
        assert_eq!(
            function_of("/2015-03-31/functions/hello/invocations").as_deref(),
            Some("hello")
        );
        assert_eq!(
            function_of(
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Ahello/invocations"
            )
            .as_deref(),
            Some("hello")
        );
        assert_eq!(function_of("/v1/functions/hello").as_deref(), None);
    }
}
