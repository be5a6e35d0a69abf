//! `/v1/keys`: the access keys that sign Lambda Invoke API calls, made, listed and removed by
//! the operator (admin token). A key's secret is in the answer to its creation only. In a
//! cluster, a key made or removed here is made or removed on every host (`cluster::access_keys`).

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppError, Shared, admin, blocking, read_body};
use crate::auth::KeyStoreError;
use crate::auth::keys::valid_id;

impl From<KeyStoreError> for AppError {
    fn from(e: KeyStoreError) -> AppError {
        match e {
            KeyStoreError::NotFound(_) => AppError::not_found(e.to_string()),
            KeyStoreError::BadDescription(_) => AppError::bad_request(e.to_string()),
            other => AppError::internal("access keys", other),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    description: Option<String>,
    /// "invoke", "deploy" or "admin" (the default).
    #[serde(default)]
    scope: Option<String>,
    /// Function name patterns the key is limited to (`*` matches any run of characters).
    #[serde(default)]
    functions: Vec<String>,
}

pub(super) async fn create(
    State(app): Shared,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let raw = read_body(&headers, req.into_body(), 4096).await?;
    let body: CreateBody = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| AppError::bad_request(format!("access key body: {e}")))?
    };
    let app2 = app.clone();
    let description = body.description.unwrap_or_default();
    let scope = match body.scope.as_deref() {
        None => crate::auth::keys::Scope::Admin,
        Some(s) => crate::auth::keys::Scope::parse(s).ok_or_else(|| {
            AppError::bad_request(format!("scope: {s:?} must be invoke, deploy or admin"))
        })?,
    };
    let functions = body.functions;
    let (info, secret) = blocking(move || {
        let (info, secret) = app2.keys.create_scoped(&description, scope, &functions)?;
        if let Some(node) = app2.cluster.get() {
            node.key_created(&info, &secret);
        }
        Ok((info, secret))
    })
    .await?;
    tracing::info!(access_key_id = %info.access_key_id, "created an access key");
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(json!({
            "access_key_id": info.access_key_id,
            "secret_access_key": secret.expose(),
            "description": info.description,
            "created_at": info.created_at,
            "scope": info.scope,
            "functions": info.functions,
        })),
    )
        .into_response();
    // The one answer that carries a secret: no cache keeps it.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

pub(super) async fn list(State(app): Shared, headers: HeaderMap) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    let keys = app.keys.clone();
    let all = blocking(move || Ok(keys.list()?)).await?;
    Ok(axum::Json(json!({ "keys": all })).into_response())
}

pub(super) async fn remove(
    State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    admin(&app, &headers)?;
    if !valid_id(&id) {
        return Err(AppError::not_found(format!("no access key {id:?}")));
    }
    let app2 = app.clone();
    let removed = id.clone();
    blocking(move || {
        let here = app2.keys.forget(&removed)?;
        let in_cluster = app2
            .cluster
            .get()
            .is_some_and(|node| node.key_removed(&removed, here));
        if !here && !in_cluster {
            return Err(KeyStoreError::NotFound(removed).into());
        }
        Ok(())
    })
    .await?;
    tracing::info!(access_key_id = %id, "removed an access key");
    Ok(StatusCode::NO_CONTENT.into_response())
}
