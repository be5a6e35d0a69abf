//! Errors as the API answers them: a status, and `{"error": {"kind", "message"}}`. Faults of
//! the agent itself are logged in full and answered with a plain 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::bundle::BundleError;
use crate::instance::InvokeError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<u32>,
}

impl AppError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> AppError {
        AppError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> AppError {
        tracing::error!("{context}: {e}");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the agent's log)",
        )
    }

    pub fn unauthorized() -> AppError {
        AppError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )
    }

    pub fn not_found(what: impl Into<String>) -> AppError {
        AppError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn bad_request(msg: impl Into<String>) -> AppError {
        AppError::new(StatusCode::BAD_REQUEST, "bad_request", msg)
    }

    pub fn request_timeout(t: &super::listener::BodyTimeout) -> AppError {
        AppError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("{t} (limits.body_timeout_s)"),
        )
    }

    pub fn too_large(limit: usize) -> AppError {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "kind": self.kind, "message": self.message } });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> AppError {
        match e {
            StoreError::NotFound(_)
            | StoreError::NoSuchVersion { .. }
            | StoreError::NoSuchAlias { .. } => AppError::not_found(e.to_string()),
            StoreError::NothingToRollBack(_) => AppError::bad_request(e.to_string()),
            StoreError::ActiveVersion { .. }
            | StoreError::AliasExists { .. }
            | StoreError::VersionInUse { .. } => {
                AppError::new(StatusCode::CONFLICT, "active_version", e.to_string())
            }
            StoreError::BundleMissing { .. } => {
                AppError::new(StatusCode::CONFLICT, "bundle_missing", e.to_string())
            }
            StoreError::UidsExhausted => AppError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "uids_exhausted",
                e.to_string(),
            ),
            other => AppError::internal("store", other),
        }
    }
}

impl From<BundleError> for AppError {
    fn from(e: BundleError) -> AppError {
        match e {
            BundleError::Manifest(_) => {
                AppError::new(StatusCode::BAD_REQUEST, "bad_manifest", e.to_string())
            }
            BundleError::TooLarge { .. } | BundleError::TooManyFiles { .. } => AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            ),
            BundleError::Io(_) => AppError::internal("unpacking bundle", e),
            _ => AppError::new(StatusCode::BAD_REQUEST, "bad_bundle", e.to_string()),
        }
    }
}

impl From<InvokeError> for AppError {
    fn from(e: InvokeError) -> AppError {
        let status = match &e {
            InvokeError::NotFound(_) => StatusCode::NOT_FOUND,
            InvokeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::OutOfMemory { .. }
            | InvokeError::Crashed { .. }
            | InvokeError::FunctionError(_)
            | InvokeError::Handler { .. }
            | InvokeError::InitFailed { .. }
            | InvokeError::InitTimeout(_)
            | InvokeError::ResponseTooLarge { .. }
            | InvokeError::Spawn(_) => StatusCode::BAD_GATEWAY,
            InvokeError::Overloaded { .. } | InvokeError::NoCapacity(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            InvokeError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::Internal(_) => return AppError::internal("invocation", e),
        };
        let retry_after = match &e {
            InvokeError::Overloaded { .. } | InvokeError::NoCapacity(_) => Some(1),
            InvokeError::Draining => Some(5),
            _ => None,
        };
        // A runtime's own error says what went wrong: name it.
        let detail = match &e {
            InvokeError::Handler { body, .. } | InvokeError::InitFailed { body, .. } => {
                serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v["errorMessage"].as_str().map(str::to_string))
            }
            _ => None,
        };
        let message = match detail {
            Some(d) => format!("{e}: {d}"),
            None => e.to_string(),
        };
        AppError {
            status,
            kind: e.kind(),
            message,
            retry_after,
        }
    }
}
