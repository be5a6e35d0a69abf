//! The HTTP API (axum): admin calls under /v1, invocation at /fn/{name}, health and metrics.
//! Handlers parse HTTP into calls on the store and the router; status codes live here only.

mod cluster;
pub mod control;
mod drain;
mod error;
mod forward;
pub mod function_url;
mod hot;
mod keys;
mod lambda;
pub mod listener;
mod stream;
mod topics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router as AxumRouter;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

pub use error::AppError;
pub use hot::{Api, api};
pub use lambda::StreamFailed;
pub(crate) use lambda::{function_error_payload, parse_function_name};

use crate::bundle::{self, BundleLimits};
use crate::config::Config;
use crate::manifest::valid_name;
use crate::pool::ActiveFunction;
use crate::router::Router;
use crate::store::{Changes, FunctionRecord, Store, VersionRecord};

pub struct App {
    pub config: Config,
    pub store: Arc<Store>,
    pub router: Arc<Router>,
    /// Asynchronous invocation: the event queue and its workers.
    pub events: Arc<crate::events::Events>,
    /// Access keys that may sign Invoke API calls (SigV4).
    pub keys: Arc<crate::auth::KeyStore>,
    pub token: String,
    pub started: Instant,
    pub cgroup_version: String,
    pub cgroup_root: String,
    /// Controllers (memory, cpu, pids) whose limits this host cannot enforce.
    pub unenforced_limits: Vec<String>,
    /// This host's node id (`Config::node_id`): every invocation answer names it in
    /// `x-fnlet-host`.
    pub node_id: String,
    /// This agent as a cluster member, once it is one (at start, or after `cluster init`).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::node::Node>>,
    /// Functions whose last change through the Lambda API is still being replicated.
    pub updates: control::Updates,
    /// Fires the functions' schedule triggers.
    pub scheduler: Arc<crate::triggers::Scheduler>,
}

/// The header naming the host that ran an invocation.
pub const HEADER_HOST: &str = "x-fnlet-host";

/// A call handed to the API by the cluster layer rather than read from an HTTP connection: a
/// request extension that only this process can set.
#[derive(Debug, Clone)]
pub struct ClusterCall {
    /// The call's request id, the same on every host it passes.
    pub request_id: String,
    /// The peer that forwarded the call, having authorised its caller already: the call is
    /// not authorised again here (its credentials are still kept from the function).
    pub forwarded_by: Option<String>,
    /// How many times the call was forwarded already (a call is forwarded at most once).
    pub hops: u8,
    /// When its caller stops waiting (Unix milliseconds), for a call passed on.
    pub deadline_ms: Option<u64>,
}

/// A response extension on an answer another host produced (a forwarded call): the node id
/// that ran it, which `x-fnlet-host` keeps.
#[derive(Debug, Clone)]
pub struct RanOn(pub String);

/// The request id of an invocation: the cluster's when it handed the call in, else a new one.
pub(crate) fn invocation_id(extensions: &axum::http::Extensions) -> String {
    match extensions.get::<ClusterCall>() {
        Some(c) => c.request_id.clone(),
        None => request_id(),
    }
}

/// Whether a peer forwarded the call after authorising its caller.
pub(crate) fn forwarded(extensions: &axum::http::Extensions) -> bool {
    extensions
        .get::<ClusterCall>()
        .is_some_and(|c| c.forwarded_by.is_some())
}

/// Names the host that ran the invocation: this one, or for a forwarded answer the one that
/// did. A function cannot set the header itself.
pub(crate) fn stamp_host(node_id: &str, resp: &mut Response) {
    let host = match resp.extensions().get::<RanOn>() {
        Some(RanOn(h)) => h.as_str(),
        None => node_id,
    };
    if let Ok(v) = HeaderValue::from_str(host) {
        resp.headers_mut().insert(HEADER_HOST, v);
    }
}

type Shared = State<Arc<App>>;

/// Every route `app()` serves, as (method, path). The API reference (api/openapi.yaml) lists
/// exactly these: the tests below hold `app()`, this list and the document together.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("GET", "/v1/functions"),
    ("POST", "/v1/functions"),
    ("GET", "/v1/functions/{name}"),
    ("DELETE", "/v1/functions/{name}"),
    ("GET", "/v1/functions/{name}/versions"),
    ("POST", "/v1/functions/{name}/rollback"),
    ("GET", "/v1/functions/{name}/logs"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/{id}"),
    ("POST", "/v1/cluster/init"),
    ("POST", "/v1/cluster/tokens"),
    ("GET", "/v1/cluster/members"),
    ("GET", "/v1/functions/{name}/events"),
    ("GET", "/v1/topics"),
    ("POST", "/v1/topics/{topic}"),
    ("GET", "/v1/triggers"),
    ("POST", "/2015-03-31/functions/{name}/invocations"),
    (
        "POST",
        "/2021-11-15/functions/{name}/response-streaming-invocations",
    ),
    ("GET", "/2015-03-31/functions"),
    ("POST", "/2015-03-31/functions"),
    ("GET", "/2015-03-31/functions/{name}"),
    ("DELETE", "/2015-03-31/functions/{name}"),
    ("GET", "/2015-03-31/functions/{name}/configuration"),
    ("PUT", "/2015-03-31/functions/{name}/configuration"),
    ("PUT", "/2015-03-31/functions/{name}/code"),
    ("GET", "/2015-03-31/functions/{name}/versions"),
    ("POST", "/2015-03-31/functions/{name}/versions"),
    ("GET", "/2020-06-30/functions/{name}/code-signing-config"),
    ("GET", "/2015-03-31/functions/{name}/aliases"),
    ("POST", "/2015-03-31/functions/{name}/aliases"),
    ("GET", "/2015-03-31/functions/{name}/aliases/{alias}"),
    ("PUT", "/2015-03-31/functions/{name}/aliases/{alias}"),
    ("DELETE", "/2015-03-31/functions/{name}/aliases/{alias}"),
    ("PUT", "/2017-10-31/functions/{name}/concurrency"),
    ("DELETE", "/2017-10-31/functions/{name}/concurrency"),
    ("GET", "/2019-09-30/functions/{name}/concurrency"),
    ("GET", "/2017-03-31/tags/{arn}"),
    ("POST", "/2017-03-31/tags/{arn}"),
    ("DELETE", "/2017-03-31/tags/{arn}"),
    ("GET", "/2019-09-25/functions/{name}/event-invoke-config"),
    ("PUT", "/2019-09-25/functions/{name}/event-invoke-config"),
    ("POST", "/2019-09-25/functions/{name}/event-invoke-config"),
    ("DELETE", "/2019-09-25/functions/{name}/event-invoke-config"),
    ("GET", "/fn/{name}"),
    ("PUT", "/fn/{name}"),
    ("POST", "/fn/{name}"),
    ("DELETE", "/fn/{name}"),
    ("PATCH", "/fn/{name}"),
    ("HEAD", "/fn/{name}"),
    ("OPTIONS", "/fn/{name}"),
    ("GET", "/fn/{name}/{path}"),
    ("PUT", "/fn/{name}/{path}"),
    ("POST", "/fn/{name}/{path}"),
    ("DELETE", "/fn/{name}/{path}"),
    ("PATCH", "/fn/{name}/{path}"),
    ("HEAD", "/fn/{name}/{path}"),
    ("OPTIONS", "/fn/{name}/{path}"),
];

pub fn app(state: Arc<App>) -> AxumRouter {
    AxumRouter::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/functions", get(list).post(deploy))
        .route("/v1/functions/{name}", get(describe).delete(remove))
        .route("/v1/functions/{name}/versions", get(versions))
        .route("/v1/functions/{name}/rollback", post(rollback))
        .route("/v1/functions/{name}/logs", get(logs))
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{id}", delete(keys::remove))
        .route("/v1/cluster/init", post(cluster::init))
        .route("/v1/cluster/tokens", post(cluster::token))
        .route("/v1/cluster/members", get(cluster::members))
        .route("/v1/functions/{name}/events", get(events))
        .route("/v1/topics", get(topics::list))
        .route("/v1/topics/{topic}", post(topics::publish))
        .route("/v1/triggers", get(triggers))
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(lambda::invoke_api),
        )
        .route(
            "/2021-11-15/functions/{name}/response-streaming-invocations",
            post(stream::invoke_stream),
        )
        .route(
            "/2015-03-31/functions",
            get(control::functions).post(control::functions),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(control::function).delete(control::function),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(control::function_configuration).put(control::function_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/code",
            put(control::function_code),
        )
        .route(
            "/2015-03-31/functions/{name}/versions",
            get(control::function_versions).post(control::function_versions),
        )
        .route(
            "/2020-06-30/functions/{name}/code-signing-config",
            get(control::code_signing_config),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases",
            get(control::aliases).post(control::aliases),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases/{alias}",
            get(control::alias)
                .put(control::alias)
                .delete(control::alias),
        )
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(control::concurrency).delete(control::concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(control::concurrency),
        )
        .route(
            "/2017-03-31/tags/{arn}",
            get(control::tags).post(control::tags).delete(control::tags),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            get(lambda::event_invoke_config)
                .put(lambda::event_invoke_config)
                .post(lambda::event_invoke_config)
                .delete(lambda::event_invoke_config),
        )
        // Exec-mode functions take POST /fn/{name}; Lambda-mode ones are function URLs, any
        // method and path.
        .route(
            "/fn/{name}",
            get(lambda::function_url)
                .put(lambda::function_url)
                .post(lambda::function_url)
                .delete(lambda::function_url)
                .patch(lambda::function_url)
                .head(lambda::function_url)
                .options(lambda::function_url),
        )
        .route(
            "/fn/{name}/{*path}",
            get(lambda::function_url)
                .put(lambda::function_url)
                .post(lambda::function_url)
                .delete(lambda::function_url)
                .patch(lambda::function_url)
                .head(lambda::function_url)
                .options(lambda::function_url),
        )
        .fallback(fallback)
        .method_not_allowed_fallback(|| async {
            AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::map_request(drain::drain_refused_bodies))
        .layer(forward::ForwardLayer(state.clone()))
        .with_state(state)
}

/// Unrouted paths; `/fn/{name}/` is a function URL's root (the `{*path}` route wants at least
/// one character after the slash).
async fn fallback(state: Shared, req: Request) -> Response {
    let p = req.uri().path();
    if p.len() > "/fn/".len()
        && p.starts_with("/fn/")
        && p.ends_with('/')
        && p["/fn/".len()..].find('/') == Some(p.len() - "/fn/".len() - 1)
    {
        return lambda::function_url(state, req).await;
    }
    AppError::not_found("no such route (see the API reference in the README)").into_response()
}

/// Whether the request carries the admin bearer token.
pub(crate) fn authorized(app: &App, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| is_admin_token(app, v))
}

/// Constant-time comparison of an `Authorization` value with `Bearer <admin token>`.
pub(crate) fn is_admin_token(app: &App, value: &HeaderValue) -> bool {
    let Some(given) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), app.token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn admin(app: &App, headers: &HeaderMap) -> Result<(), AppError> {
    if authorized(app, headers) {
        Ok(())
    } else {
        Err(AppError::unauthorized())
    }
}

fn checked_name(name: &str) -> Result<(), AppError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(AppError::not_found(format!("no function named {name:?}")))
    }
}

/// Reads a body of at most `limit` bytes, answering 413 past it, and 408 when it stalls for
/// `limits.body_timeout_s`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, AppError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(AppError::too_large(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(AppError::too_large(limit))
        }
        Err(e) => Err(match listener::body_timeout(&*e) {
            Some(t) => AppError::request_timeout(t),
            None => AppError::bad_request(format!("reading the request body: {e}")),
        }),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AppError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError::internal("blocking task", e))?
}

async fn readyz(State(app): Shared) -> Response {
    if app.router.draining.is_cancelled() {
        let mut e = AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the agent is shutting down",
        );
        e.retry_after = Some(5);
        return e.into_response();
    }
    "ready\n".into_response()
}

async fn metrics(State(app): Shared) -> Response {
    if let Some(net) = app.router.network.clone() {
        // nft runs as a process: off the runtime's threads.
        if let Ok((counters, in_use)) =
            tokio::task::spawn_blocking(move || (net.counters(), net.in_use())).await
        {
            app.router.metrics.set_network(&counters);
            app.router.metrics.net_addresses.set(in_use as i64);
        }
    }
    app.router
        .metrics
        .set_log_lines_not_logged(app.router.logs.line_budget().not_logged());
    let isolator = &app.router.isolator;
    app.router.metrics.set_spawn_helper(
        isolator.spawner_pid().is_some(),
        isolator.spawner_restarts(),
    );
    let reg = &app.router.registry;
    app.router.metrics.set_capacity(
        reg.capacity.capacity(),
        reg.capacity.committed(),
        reg.evictions.load(std::sync::atomic::Ordering::Relaxed),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.router.metrics.render(),
    )
        .into_response()
}

async fn status(State(app): Shared, headers: HeaderMap) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    Ok(axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "functions": app.router.registry.len(),
        "running_instances": app.router.registry.running_total(),
        "cgroup": app.cgroup_version,
        "cgroup_root": app.cgroup_root,
        "unenforced_limits": app.unenforced_limits,
        // Who clones sandboxes: the spawn helper (its pid), or the agent itself because the
        // helper is off (sandbox.spawn_helper) or was lost.
        "spawn_helper": match (app.config.sandbox.spawn_helper, app.router.isolator.spawner_pid()) {
            (_, Some(pid)) => json!({ "state": "up", "pid": pid, "restarts": app.router.isolator.spawner_restarts() }),
            (false, None) => json!({ "state": "off" }),
            (true, None) => json!({ "state": "lost", "restarts": app.router.isolator.spawner_restarts() }),
        },
        "state_dir": app.config.state_dir,
        "draining": app.router.draining.is_cancelled(),
        "resident_memory_bytes": crate::metrics::resident_bytes(),
        "capacity": capacity_json(&app.router.registry),
        "cluster": app.cluster.get().map(|node| {
            let mut counts = std::collections::BTreeMap::<&str, u64>::new();
            for m in node.members(0).iter().filter(|m| !m.this_host) {
                *counts.entry(m.state).or_default() += 1;
            }
            json!({
                "node_id": node.id,
                "peer_addr": node.advertise.to_string(),
                "members": counts,
                // Whether access keys made here work on every member (false: a host that
                // joined before keys were the cluster's).
                "shared_access_keys": node.shares_keys(),
            })
        }),
    }))
    .into_response())
}

/// What live instances hold of the host ([capacity]): per resource, committed and capacity.
fn capacity_json(reg: &crate::pool::Registry) -> Value {
    let (cap, used) = (reg.capacity.capacity(), reg.capacity.committed());
    json!({
        "memory_bytes": { "committed": used.memory_bytes, "capacity": cap.memory_bytes },
        "cpus": {
            "committed": used.cpu_millis as f64 / 1000.0,
            "capacity": cap.cpu_millis as f64 / 1000.0,
        },
        "instances": { "committed": used.instances, "capacity": cap.instances },
        "evictions": reg.evictions.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn version_json(v: &VersionRecord, active: u64) -> Value {
    json!({
        "name": v.name,
        "version": v.version,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "created_at": v.created_at,
        "active": v.version == active,
    })
}

async fn list(State(app): Shared, headers: HeaderMap) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let store = app.store.clone();
    let all = blocking(move || Ok(store.list()?)).await?;
    let functions: Vec<Value> = all
        .iter()
        .map(|(rec, v)| function_json(&app, rec, Some(v)))
        .collect();
    Ok(axum::Json(json!({ "functions": functions })).into_response())
}

/// A function's network as the agent runs it: its egress (as written, or the default), and
/// its limits when it has egress.
fn network_json(m: &crate::manifest::Manifest, config: &crate::config::NetworkConfig) -> Value {
    let n = m.network.as_ref();
    let egress = n
        .and_then(|n| n.egress.clone())
        .unwrap_or_else(|| config.default_egress.clone());
    let net = crate::network::FunctionNetwork::of("f", n, config);
    json!({
        "egress": egress,
        "rate_mbit": net.as_ref().and_then(|n| n.rate_mbit),
        "max_connections": net.as_ref().map(|n| n.max_connections),
    })
}

/// A function as the API shows it: the record, its active version, and what runs now.
fn function_json(app: &App, rec: &FunctionRecord, active: Option<&VersionRecord>) -> Value {
    let slot = app.router.registry.get(&rec.name);
    let failed = app.router.registry.failed(&rec.name);
    json!({
        "name": rec.name,
        "version": rec.active,
        "status": if failed.is_some() { "failed" } else { "active" },
        "status_reason": failed,
        "manifest": active.map(|v| &v.manifest),
        "sha256": active.map(|v| &v.sha256),
        "limits": active.map(|v| v.manifest.resolve(&app.config.defaults)),
        "network": active.map(|v| network_json(&v.manifest, &app.config.network)),
        "uid": rec.uid,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "running": slot.as_ref().map_or(0, |s| s.running.load(std::sync::atomic::Ordering::Relaxed)),
        "prepared": slot.as_ref().is_some_and(|s| s.has_ready()),
        "instances": slot.as_ref().map(|s| {
            let c = &s.instances;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Acquire);
            json!({
                "alive": load(&c.alive),
                "starting": load(&c.starting),
                "idle": s.idle_count(),
                "peak": load(&c.peak),
            })
        }),
    })
}

async fn describe(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    let store = app.store.clone();
    let n = name.clone();
    let (rec, versions) = blocking(move || Ok((store.function(&n)?, store.versions(&n)?))).await?;
    let active = versions.iter().find(|v| v.version == rec.active);
    let mut f = function_json(&app, &rec, active);
    f["versions"] = versions
        .iter()
        .map(|v| version_json(v, rec.active))
        .collect();
    Ok(axum::Json(f).into_response())
}

/// `GET /v1/triggers`'s query.
#[derive(Debug, Deserialize)]
struct TriggersQuery {
    function: Option<String>,
}

/// Every trigger of every active function (or of `?function=NAME`): what `fnlet triggers`
/// shows.
async fn triggers(
    State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<TriggersQuery>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    if let Some(name) = &q.function {
        checked_name(name)?;
        app.router
            .lookup(name)
            .ok_or_else(|| not_served(&app, name))?;
    }
    Ok(axum::Json(app.scheduler.view(&app, q.function.as_deref())).into_response())
}

/// `GET /v1/functions/{name}/events`: the function's async events (what `fnlet events` shows).
async fn events(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    let f = app
        .router
        .lookup(&name)
        .ok_or_else(|| not_served(&app, &name))?;
    let mut v = app.events.view(&name).await;
    let p = app.events.policy(&f);
    let dest = |d: &Option<crate::events::Destination>| {
        d.as_ref().map(|d| match d {
            crate::events::Destination::Function(n) => format!("function {n}"),
            crate::events::Destination::Url(u) => u.clone(),
            crate::events::Destination::Topic(t) => format!("topic {t}"),
        })
    };
    v["config"] = json!({
        "max_retry_attempts": p.max_retry_attempts,
        "max_event_age_s": p.max_age_ms / 1000,
        "retry_base_s": p.retry_base_ms as f64 / 1000.0,
        "backoff_min_s": p.backoff_min_ms as f64 / 1000.0,
        "backoff_max_s": p.backoff_max_ms as f64 / 1000.0,
        "on_success": dest(&p.on_success),
        "on_failure": dest(&p.on_failure),
        "set_by_api": app.events.invoke_config(&name).is_some(),
    });
    Ok(axum::Json(v).into_response())
}

async fn versions(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    let store = app.store.clone();
    let (rec, versions) =
        blocking(move || Ok((store.function(&name)?, store.versions(&name)?))).await?;
    Ok(axum::Json(json!({ "versions": versions.iter().map(|v| version_json(v, rec.active)).collect::<Vec<_>>() })).into_response())
}

/// Makes the version that the store now says is active the one new invocations run. Called
/// with the store's changes held, so no other change lands between the store's answer and
/// the registry's.
pub(crate) fn activate(app: &App, store: &Changes<'_>, name: &str) -> Result<(), AppError> {
    let rec = store.function(name)?;
    let v = store.version(name, rec.active)?;
    let bundle = store.bundle_path(&v.sha256);
    let f = ActiveFunction::new(&rec, &v, bundle, &app.config)
        .map_err(|e| AppError::new(StatusCode::BAD_REQUEST, "bad_manifest", e.to_string()))?;
    app.router.registry.activate(f);
    app.router.network_changed(name);
    app.router.prewarm(name);
    Ok(())
}

/// Refuses a manifest this agent could not run: a runtime it has not configured, or cannot
/// mount.
pub(crate) fn check_runnable(app: &App, m: &crate::manifest::Manifest) -> Result<(), AppError> {
    if let Some(r) = &m.runtime
        && !app.config.runtimes.contains_key(r)
    {
        let known: Vec<&str> = app.config.runtimes.keys().map(String::as_str).collect();
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "bad_manifest",
            format!(
                "fnlet.toml: runtime: {r:?} is not configured on this agent (configured: {})",
                known.join(", ")
            ),
        ));
    }
    if let Some(why) = m
        .runtime
        .as_deref()
        .and_then(|r| app.config.unmountable_runtime(r))
    {
        return Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "bad_manifest",
            format!("fnlet.toml: runtime: {why}"),
        ));
    }
    Ok(())
}

/// The limits an upload is unpacked within.
pub(crate) fn bundle_limits(config: &Config) -> BundleLimits {
    BundleLimits {
        max_unpacked_bytes: config.limits.max_unpacked_mb << 20,
        max_files: config.limits.max_bundle_files,
    }
}

/// Stores `unpacked` with `manifest` as its function's next version, makes it active and
/// collects old versions: what every deploy does (`fnlet deploy`, CreateFunction,
/// UpdateFunctionCode). Blocking. The version, and whether its content is new here.
pub(crate) fn commit_code(
    app: &App,
    unpacked: &bundle::Unpacked,
    manifest: &crate::manifest::Manifest,
    code_sha256: Option<String>,
) -> Result<(VersionRecord, bool), AppError> {
    check_runnable(app, manifest)?;
    // From the move into bundles/ to the collection after it, no other change.
    let store = app.store.changes();
    let new_content = !store.bundle_path(&unpacked.sha256).exists();
    let v = store.deploy_code(unpacked, manifest, code_sha256)?;
    activate(app, &store, &v.name)?;
    collect(app, &store);
    Ok((v, new_content))
}

/// Garbage collection after a change; its failure is only logged.
pub(crate) fn collect(app: &App, store: &Changes<'_>) {
    if let Err(e) = store.gc(
        app.config.retain_versions,
        &app.router.registry.bundles_in_use(),
    ) {
        tracing::warn!("garbage collection: {e}");
    }
}

/// After a new version is active here: tells the cluster, and waits until `cluster.replicas`
/// hosts hold new content (peers fetch it from here; content a peer has is not fetched
/// again). What the deploy answer says of the replicas; None outside a cluster.
pub(crate) async fn replicate(app: &App, v: &VersionRecord, new_content: bool) -> Option<Value> {
    let node = app.cluster.get()?;
    node.published(v);
    let hosts = node.live_peers().len() + 1;
    let want = (app.config.cluster.replicas as usize).min(hosts);
    let holding = if new_content && want > 1 {
        node.await_replicas(&v.sha256, want - 1, REPLICA_WAIT).await
    } else {
        want
    };
    if holding < want {
        tracing::warn!(function = %v.name, holding, wanted = want, "deployed, but fewer hosts than cluster.replicas hold the bundle yet");
    }
    Some(json!({ "wanted": want, "holding": holding, "hosts": hosts }))
}

/// The deploy's line in the function's log.
pub(crate) fn log_deployed(app: &App, v: &VersionRecord) {
    tracing::info!(function = %v.name, version = v.version, sha256 = %v.sha256, "deployed");
    app.router.logs.append(
        &v.name,
        v.version,
        "-",
        "agent",
        &format!("deployed version {} ({})", v.version, &v.sha256[..12]),
    );
}

async fn deploy(
    State(app): Shared,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let limit = (app.config.limits.max_bundle_mb << 20) as usize;
    let body = read_body(&headers, req.into_body(), limit).await?;
    let app2 = app.clone();
    let (v, new_content) = blocking(move || {
        let app = app2;
        let staging = app.store.staging_dir()?;
        let unpacked = bundle::unpack(&body, staging.path(), bundle_limits(&app.config))?;
        // Refused before it is stored: a function this agent could not run.
        commit_code(&app, &unpacked, &unpacked.manifest, None)
    })
    .await?;
    let mut answer = version_json(&v, v.version);
    if let Some(replicas) = replicate(&app, &v, new_content).await {
        answer["replicas"] = replicas;
    }
    log_deployed(&app, &v);
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// How long a deploy waits for `cluster.replicas` hosts to hold its bundle.
const REPLICA_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

async fn remove(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    remove_function(&app, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Removes a function: its versions, what runs, its logs, and (as Lambda) its event invoke
/// config (its waiting events end as FunctionNotFound when their turn comes).
pub(crate) async fn remove_function(app: &Arc<App>, name: &str) -> Result<(), AppError> {
    let app2 = app.clone();
    let n = name.to_string();
    blocking(move || {
        let name = n;
        let store = app2.store.changes();
        store.remove(&name)?;
        app2.router.registry.remove(&name);
        app2.router.network_changed(&name);
        app2.router.logs.remove(&name);
        tracing::info!(function = %name, "removed");
        if let Some(node) = app2.cluster.get() {
            node.unpublished(&name);
        }
        collect(&app2, &store);
        Ok(())
    })
    .await?;
    app.updates.forget(name);
    if app.events.invoke_config(name).is_some()
        && let Err(e) = app.events.set_invoke_config(name, None).await
    {
        tracing::warn!(function = %name, "removing its event invoke config: {e}");
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: Option<u64>,
}

async fn rollback(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    let raw = read_body(&headers, req.into_body(), 4096).await?;
    let body: RollbackBody = if raw.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| AppError::bad_request(format!("rollback body: {e}")))?
    };
    let app2 = app.clone();
    let v = blocking(move || {
        let store = app2.store.changes();
        let v = store.rollback(&name, body.to)?;
        activate(&app2, &store, &name)?;
        Ok(v)
    })
    .await?;
    tracing::info!(function = %v.name, version = v.version, "rolled back");
    if let Some(node) = app.cluster.get() {
        node.published(&v);
    }
    app.router.logs.append(
        &v.name,
        v.version,
        "-",
        "agent",
        &format!("rolled back to version {}", v.version),
    );
    Ok(axum::Json(version_json(&v, v.version)).into_response())
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    #[serde(default = "default_tail")]
    tail: usize,
}

fn default_tail() -> usize {
    100
}

async fn logs(
    State(app): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    checked_name(&name)?;
    // A failed function's log says what happened to it.
    if app.router.registry.get(&name).is_none() && app.router.registry.failed(&name).is_none() {
        return Err(AppError::not_found(format!("no function named {name:?}")));
    }
    let logs = app.router.logs.clone();
    // Subscribe before reading the tail so no line falls between the two.
    let live = q.follow.then(|| logs.subscribe(&name));
    let tail = logs.tail(&name, q.tail.min(100_000));
    let head = futures_util::stream::iter(
        tail.into_iter()
            .map(|l| Ok::<_, Infallible>(Bytes::from(l))),
    );
    let body = match live {
        None => Body::from_stream(head),
        Some(rx) => {
            let stop = app.router.draining.clone().cancelled_owned();
            let live = tokio_stream::wrappers::BroadcastStream::new(rx)
                .filter_map(|r| async move {
                    r.ok()
                        .map(|l| Ok::<_, Infallible>(Bytes::copy_from_slice(l.as_bytes())))
                })
                .take_until(stop);
            Body::from_stream(head.chain(live))
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

pub(crate) fn request_id() -> String {
    // The thread's generator (seeded from the OS, reseeded as it goes): uniqueness matters,
    // and a getrandom system call per invocation is a measurable share of a warm call.
    let mut b = [0u8; 16];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    // 8-4-4-4-12 hex digits, written in place.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

/// Why `name` has no version to invoke: it was never deployed (404), or it is stored but
/// failed (503, with the reason).
pub(crate) fn not_served(app: &App, name: &str) -> AppError {
    match app.router.registry.failed(name) {
        Some(why) => AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "function_failed",
            format!("{name} is failed: {why}"),
        ),
        None => AppError::not_found(format!("no function named {name:?}")),
    }
}

/// An exec-mode invocation: the request body in, the function's stdout out.
async fn invoke_exec(
    app: &App,
    headers: HeaderMap,
    name: &str,
    req: Request,
    id: &str,
) -> Result<Response, (AppError, Option<u64>)> {
    let headers = &headers;
    let f = app
        .router
        .lookup(name)
        .ok_or_else(|| (not_served(app, name), None))?;
    if !f.manifest.public && !authorized(app, headers) && !forwarded(req.extensions()) {
        return Err((AppError::unauthorized(), None));
    }
    let limit = (app.config.limits.max_request_mb << 20) as usize;
    let body = read_body(headers, req.into_body(), limit)
        .await
        .map_err(|e| (e, None))?;
    let req = crate::router::InvokeRequest {
        name,
        body,
        request_id: id,
        want_tail: false,
        client_context: None,
        env: Vec::new(),
        version: None,
        qualifier: None,
        stdout: None,
    };
    match app.router.invoke(req).await {
        Ok(inv) => {
            let body = match inv.body {
                crate::router::Payload::Full(b) => b,
                // Exec mode never streams.
                crate::router::Payload::Stream { .. } => {
                    return Err((
                        AppError::internal("invocation", "a stream in exec mode"),
                        None,
                    ));
                }
            };
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut()
                .insert("x-fnlet-version", HeaderValue::from(inv.version));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(after_sent(r, inv.after))
        }
        Err(f) => Err((f.error.into(), f.version)),
    }
}

/// `r` with `after` held by its body: hyper drops the body once it has taken the last of it,
/// so what is left (an exec sandbox's teardown, the next prepared sandbox)
/// happens after the answer is written.
fn after_sent(r: Response, after: crate::router::AfterAnswer) -> Response {
    if after.is_empty() {
        return r;
    }
    r.map(|inner| {
        Body::new(Holding {
            inner,
            _after: after,
        })
    })
}

/// A body that keeps `_after` until it is dropped.
struct Holding {
    inner: Body,
    _after: crate::router::AfterAnswer,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::ROUTES;

    const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

    #[test]
    fn request_ids_are_lowercase_uuid_shaped_and_differ() {
        let (a, b) = (super::request_id(), super::request_id());
        assert_ne!(a, b);
        for id in [a, b] {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.chars()
                    .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{id}"
            );
        }
    }

    fn routes() -> BTreeSet<(String, String)> {
        ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    }

    /// (METHOD, path) of every operation under `paths:` in the OpenAPI document. The document
    /// is indented by two spaces: paths at two, their operations at four.
    fn documented(yaml: &str) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in yaml.lines() {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(rest) = line.strip_prefix("  ")
                && !rest.starts_with(' ')
                && let Some(p) = rest.trim_end().strip_suffix(':')
            {
                path = Some(p.trim_matches('"').to_string());
            } else if let Some(rest) = line.strip_prefix("    ")
                && !rest.starts_with(' ')
                && let Some((key, _)) = rest.split_once(':')
                && METHODS.contains(&key)
            {
                let p = path.clone().expect("an operation outside a path");
                out.insert((key.to_uppercase(), p));
            }
        }
        out
    }

    /// (METHOD, path) of every `.route("path", get(..).post(..))` in the source of `app()`.
    fn served(source: &str) -> BTreeSet<(String, String)> {
        let body = source
            .split_once("pub fn app(")
            .and_then(|(_, rest)| rest.split_once(".with_state("))
            .expect("app() in the source")
            .0;
        let mut out = BTreeSet::new();
        for call in body.split(".route(").skip(1) {
            let (path, handlers) = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|c| c.split_once('"'))
                .expect("a route's path is a string literal");
            let handlers = handlers.split(".fallback(").next().unwrap_or(handlers);
            let mut any = false;
            for m in METHODS {
                let at = |h: &str| {
                    h.match_indices(&format!("{m}(")).any(|(i, _)| {
                        i == 0
                            || !h.as_bytes()[i - 1].is_ascii_alphanumeric()
                                && h.as_bytes()[i - 1] != b'_'
                    })
                };
                if at(handlers) {
                    // axum's catch-all `{*path}` is OpenAPI's `{path}`.
                    out.insert((m.to_uppercase(), path.replace("{*", "{")));
                    any = true;
                }
            }
            assert!(any, "no method found for route {path}");
        }
        out
    }

    #[test]
    fn routes_match_the_openapi_document() {
        let doc = documented(include_str!("../../api/openapi.yaml"));
        assert!(doc.len() >= 10, "parsed only {doc:?}");
        let routes = routes();
        assert_eq!(routes.len(), ROUTES.len(), "ROUTES has duplicates");
        let undocumented: Vec<_> = routes.difference(&doc).collect();
        let unserved: Vec<_> = doc.difference(&routes).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not in openapi.yaml: {undocumented:?}; in openapi.yaml but not served: {unserved:?}"
        );
    }

    #[test]
    fn routes_match_app() {
        let served = served(include_str!("mod.rs"));
        assert_eq!(
            served,
            routes(),
            "app() and ROUTES disagree: update ROUTES (and openapi.yaml) with the router"
        );
    }

    #[test]
    fn answers_name_the_host_that_ran_them() {
        use axum::response::IntoResponse;
        // A function cannot claim another host.
        let mut r = ([(super::HEADER_HOST, "elsewhere")], "hi").into_response();
        super::stamp_host("node-a", &mut r);
        assert_eq!(r.headers()[super::HEADER_HOST], "node-a");
        // A forwarded answer keeps the host that ran it.
        let mut r = "hi".into_response();
        r.extensions_mut().insert(super::RanOn("node-b".into()));
        super::stamp_host("node-a", &mut r);
        assert_eq!(r.headers()[super::HEADER_HOST], "node-b");
        assert_eq!(r.headers().get_all(super::HEADER_HOST).iter().count(), 1);
    }

    #[test]
    fn the_parsers_see_what_they_should() {
        let yaml = "info:\n  title: x\npaths:\n  /a/{name}:\n    parameters: []\n    get:\n      summary: a\n    delete:\n      responses: {}\n  /b:\n    post: {}\ncomponents:\n  x:\n    get: {}\n";
        let want: BTreeSet<(String, String)> = [
            ("GET", "/a/{name}"),
            ("DELETE", "/a/{name}"),
            ("POST", "/b"),
        ]
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
        assert_eq!(documented(yaml), want);
        let src = "pub fn app(s: S) -> R {\n R::new()\n .route(\"/a/{name}\", get(target).delete(remove))\n .route(\"/b\", post(|| async { budget() }))\n .fallback(x)\n .with_state(s)\n}";
        assert_eq!(served(src), want);
    }
}
