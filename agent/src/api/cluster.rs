//! `/v1/cluster`: make a cluster here (`fnlet cluster init`), join tokens, the members table.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{App, AppError, Shared, admin, read_body};
use crate::cluster::node::{ClusterError, Node};
use crate::cluster::pki::{ClusterDir, PkiError};

/// A join token's lifetime when the call does not say (kubeadm's default too).
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

impl From<ClusterError> for AppError {
    fn from(e: ClusterError) -> AppError {
        match e {
            ClusterError::Pki(PkiError::NotCaHolder) => {
                AppError::new(StatusCode::CONFLICT, "not_ca_holder", e.to_string())
            }
            other => AppError::internal("cluster", other),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// Seconds the token is valid.
    #[serde(default)]
    ttl_s: Option<u64>,
}

async fn token_body(headers: &HeaderMap, req: Request) -> Result<Duration, AppError> {
    let raw = read_body(headers, req.into_body(), 4096).await?;
    let body: TokenBody = if raw.iter().all(u8::is_ascii_whitespace) {
        TokenBody::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| AppError::bad_request(format!("token body: {e}")))?
    };
    match body.ttl_s {
        None => Ok(DEFAULT_TTL),
        Some(0) => Err(AppError::bad_request("ttl_s: must be at least 1")),
        Some(s) if s > 10 * 365 * 86400 => Err(AppError::bad_request("ttl_s: at most ten years")),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn token_json(node: &Node, token: &fnlet_cluster::token::JoinToken) -> serde_json::Value {
    json!({
        "token": token.to_string(),
        "expires_at": token.expires_at,
        "ca_sha256": token.ca_sha256.to_string(),
        "node_id": node.id,
        "peer_addr": node.advertise.to_string(),
    })
}

/// `POST /v1/cluster/init`: this agent makes the cluster CA, becomes its first member, and
/// answers with a join token for the others.
pub(super) async fn init(
    State(app): Shared,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let ttl = token_body(&headers, req).await?;
    if app.cluster.get().is_some() {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "already_in_cluster",
            "this agent is in a cluster already: `fnlet cluster token` makes another join token",
        ));
    }
    let node = {
        let app2 = app.clone();
        super::blocking(move || start_new_cluster(&app2)).await?
    };
    let token = node.make_token(ttl)?;
    tracing::info!(node = %node.id, "made a new cluster");
    Ok((StatusCode::CREATED, axum::Json(token_json(&node, &token))).into_response())
}

fn start_new_cluster(app: &Arc<App>) -> Result<Arc<Node>, AppError> {
    let dir = ClusterDir::new(&app.config.state_dir).with_node_cert_validity(
        std::time::Duration::from_secs(app.config.cluster.node_cert_validity_s),
    );
    dir.init(&app.config.node_id())
        .map_err(|e| AppError::internal("making the cluster CA", e))?;
    let node = Node::start(
        dir,
        app.config.cluster.listen,
        app.config.peer_advertise(),
        Vec::new(),
        app.router.metrics.clone(),
        app.router.draining.child_token(),
    )
    .map_err(|e| AppError::internal("starting the cluster endpoint", e))?;
    node.attach(app);
    // Two inits at once: the first one's node serves, the second answers as above.
    let _ = app.cluster.set(node.clone());
    Ok(app.cluster.get().cloned().unwrap_or(node))
}

fn node(app: &App) -> Result<&Arc<Node>, AppError> {
    app.cluster.get().ok_or_else(|| {
        AppError::new(
            StatusCode::CONFLICT,
            "no_cluster",
            "this agent is not in a cluster: `fnlet cluster init` makes one, `fnlet agent --join ADDR --token TOKEN` joins one",
        )
    })
}

/// `POST /v1/cluster/tokens`: another join token (on the host holding the CA key).
pub(super) async fn token(
    State(app): Shared,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let ttl = token_body(&headers, req).await?;
    let node = node(&app)?.clone();
    let token = node.make_token(ttl)?;
    Ok((StatusCode::CREATED, axum::Json(token_json(&node, &token))).into_response())
}

/// `GET /v1/cluster/members`: the membership table as this agent sees it.
pub(super) async fn members(State(app): Shared, headers: HeaderMap) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let node = node(&app)?;
    let own = app.router.registry.running_total() as u32;
    Ok(axum::Json(json!({ "node_id": node.id, "members": node.members(own) })).into_response())
}
