//! Topics over HTTP: `POST /v1/topics/{topic}` takes CloudEvents (binary, structured, batch or
//! a plain body) and answers 202 once every subscriber's async event is on disk;
//! `GET /v1/topics` lists topics, subscribers and counts.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{App, AppError, authorized, read_body};
use crate::auth;
use crate::events::{AcceptError, MAX_EVENT_BYTES};
use crate::metrics::ReasonLabels;
use crate::triggers::cloudevent::{self, EventError};
use crate::triggers::manifest::valid_topic;
use crate::triggers::topics;

type Shared = State<Arc<App>>;

/// The webhook signature header (GitHub's, Gitea's).
const SIGNATURE_HEADER: &str = "x-hub-signature-256";

fn refused(app: &App, reason: &str) {
    app.router
        .metrics
        .topics
        .refused
        .get_or_create(&ReasonLabels {
            reason: reason.to_string(),
        })
        .inc();
}

/// 400 naming the attribute (and the event's place in a batch).
fn bad_event(e: &EventError) -> Response {
    let mut error = json!({
        "kind": "bad_event",
        "message": e.to_string(),
        "attribute": e.attribute,
    });
    if let Some(i) = e.index {
        error["index"] = i.into();
    }
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error })),
    )
        .into_response()
}

/// A public topic's secret: `secret`, or the file `secret_file` names.
fn topic_secret(t: &crate::config::TopicConfig) -> Result<Option<Vec<u8>>, AppError> {
    if !t.secret.is_empty() {
        return Ok(Some(t.secret.as_bytes().to_vec()));
    }
    if t.secret_file.is_empty() {
        return Ok(None);
    }
    match std::fs::read_to_string(&t.secret_file) {
        Ok(s) => Ok(Some(s.trim_end().as_bytes().to_vec())),
        Err(e) => Err(AppError::internal(
            &format!("reading the topic secret {}", t.secret_file),
            e,
        )),
    }
}

/// Who may publish: the admin token, an access key's SigV4 signature (service `lambda`), or
/// anyone on a public topic (with a good `X-Hub-Signature-256` when it has a secret).
fn authorize(
    app: &App,
    topic: &str,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<(), AppError> {
    if authorized(app, &parts.headers) {
        return Ok(());
    }
    if auth::carries_sigv4(&parts.uri, &parts.headers) {
        return app
            .keys
            .verify(
                &parts.method,
                &parts.uri,
                &parts.headers,
                body,
                SystemTime::now(),
            )
            .map_err(|e| {
                refused(app, "unauthorized");
                AppError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            })
            .and_then(|id| {
                // A publish may run any subscriber: it needs a key that may invoke every
                // function (invoke scope or above, not limited to some functions).
                match app.keys.get(&id) {
                    Some(k) if k.allows(crate::auth::keys::Scope::Invoke, None) => Ok(()),
                    _ => {
                        refused(app, "unauthorized");
                        Err(AppError::new(
                            StatusCode::FORBIDDEN,
                            "forbidden",
                            format!(
                                "access key {id} may not publish to {topic}: publishing runs \
                                 whichever functions subscribe, so it needs a key not limited \
                                 to some functions"
                            ),
                        ))
                    }
                }
            });
    }
    match app.config.topics.get(topic) {
        Some(t) if t.public => match topic_secret(t)? {
            None => Ok(()),
            Some(secret) => {
                let given = parts
                    .headers
                    .get(SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok());
                if topics::hub_signature_ok(&secret, body, given) {
                    Ok(())
                } else {
                    refused(app, "bad_signature");
                    Err(AppError::new(
                        StatusCode::UNAUTHORIZED,
                        "bad_signature",
                        format!(
                            "{topic} takes publishes signed with X-Hub-Signature-256: sha256=<hex \
                             of the HMAC-SHA256 of the body under the topic's secret>; {}",
                            if given.is_some() {
                                "this signature does not match"
                            } else {
                                "the header is missing"
                            }
                        ),
                    ))
                }
            }
        },
        _ => {
            refused(app, "unauthorized");
            Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "publishing to {topic} needs the admin token or an access key's SigV4 \
                     signature (or [topics.{topic}] public = true in the agent's config)"
                ),
            ))
        }
    }
}

/// `POST /v1/topics/{topic}`.
pub async fn publish(State(app): Shared, Path(topic): Path<String>, req: Request) -> Response {
    match publish_inner(&app, &topic, req).await {
        Ok(r) => r,
        Err(e) => e,
    }
}

async fn publish_inner(app: &App, topic: &str, req: Request) -> Result<Response, Response> {
    let err = |e: AppError| e.into_response();
    if !valid_topic(topic) {
        return Err(err(AppError::bad_request(format!(
            "{topic:?} is not a topic name (1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-')"
        ))));
    }
    let (parts, body) = req.into_parts();
    let limit = (app.config.limits.max_request_mb << 20) as usize;
    let body = read_body(&parts.headers, body, limit).await.map_err(err)?;
    authorize(app, topic, &parts, &body).map_err(err)?;
    if app.router.draining.is_cancelled() {
        let mut e = AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the agent is shutting down",
        );
        e.retry_after = Some(5);
        return Err(err(e));
    }
    let plain = cloudevent::Plain {
        topic,
        id: super::request_id(),
        time: crate::events::rfc3339_ms(crate::events::now_ms()),
    };
    let (mode, events) = cloudevent::from_http(&parts.headers, &body, plain).map_err(|e| {
        refused(app, "bad_event");
        bad_event(&e)
    })?;
    for (i, e) in events.iter().enumerate() {
        let len = serde_json::to_vec(&e.to_json()).map_or(0, |v| v.len());
        if len > MAX_EVENT_BYTES {
            refused(app, "too_large");
            return Err(err(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "event {i} ({}) is {len} bytes as structured JSON; an event may have at most {MAX_EVENT_BYTES}",
                    e.id()
                ),
            )));
        }
    }
    match app.events.publish(topic, &events, mode).await {
        Ok(published) => {
            let count: usize = published.iter().map(|p| p.deliveries.len()).sum();
            let body = json!({ "topic": topic, "count": count, "events": published });
            Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
        }
        Err(e @ (AcceptError::Full { .. } | AcceptError::StreamFull { .. })) => {
            refused(app, "full");
            let mut e = AppError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string());
            e.retry_after = Some(1);
            Err(err(e))
        }
        Err(e @ AcceptError::TooLarge { .. }) => {
            refused(app, "too_large");
            Err(err(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            )))
        }
        Err(AcceptError::Storage(e)) => {
            tracing::error!(topic, "publishing: {e}");
            let message = match e {
                crate::events::queue::QueueError::DiskFull(_) => {
                    "the events could not be stored: the agent's disk is full"
                }
                crate::events::queue::QueueError::Nats(_) => {
                    "the events could not be stored: NATS JetStream is unreachable or did not \
                     answer (see the agent's log)"
                }
                _ => "the events could not be stored (see the agent's log)",
            };
            let mut e = AppError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            e.retry_after = Some(5);
            Err(err(e))
        }
    }
}

/// `GET /v1/topics`: every topic a function subscribes to or the config names, with its
/// subscribers (and their filters) and its counts since the agent started.
pub async fn list(State(app): Shared, headers: HeaderMap) -> Result<Response, AppError> {
    super::admin(&app, &headers)?;
    let mut all = topics::all(&app.router.registry);
    for name in app.config.topics.keys() {
        all.entry(name.clone()).or_default();
    }
    let list: Vec<_> = all
        .into_iter()
        .map(|(name, subscribers)| {
            let config = app.config.topics.get(&name).cloned().unwrap_or_default();
            json!({
                "topic": name,
                "public": config.public,
                "signed": config.public
                    && (!config.secret.is_empty() || !config.secret_file.is_empty()),
                "subscribers": subscribers,
                "counts": app.events.topic_stats.get(&name),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "topics": list })).into_response())
}
