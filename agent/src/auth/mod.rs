//! Who may call the Lambda Invoke API: access keys the operator makes (`keys`), and AWS
//! Signature Version 4 checked against them (`sigv4`), answered in Lambda's own words.
//!
//! The invoke handler calls one function, with the request as received (the original URI,
//! path still percent-encoded, before any router rewrote it) and the body it read:
//!
//! ```ignore
//! match app.keys.verify(&method, &uri, &headers, &body, SystemTime::now()) {
//!     Ok(access_key_id) => { /* signed by this key */ }
//!     Err(e) => return auth::lambda_error_response(&e, &request_id),
//! }
//! ```
//!
//! [`keys::KeyStore::verify`] takes the body's bytes; [`keys::KeyStore::verify_sha256`] takes
//! their SHA-256 for a body that was streamed. Both check, in this order: a signature is there
//! (`Authorization: AWS4-HMAC-SHA256 ...` or a presigned `X-Amz-Signature` query), the
//! credential scope names the `lambda` service and the signing day, the signing time is within
//! [`sigv4::MAX_SKEW`] of `now` (Lambda's 5 minutes; a presigned request until its
//! `X-Amz-Expires`), the access key exists, and the signature matches (compared in constant
//! time). Nothing is logged there: the verify path is hot and its input is the caller's.
//! A `public = true` function skips the call altogether.

pub mod keys;
pub mod sigv4;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use keys::{KeyInfo, KeyStore, KeyStoreError, Secret};

/// Why a request was not let in. Each maps to the `x-amzn-ErrorType` and message Lambda
/// answers with (all 403); `Display` is the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header and no presigned query.
    #[error("Missing Authentication Token")]
    Missing,
    /// A signature is there but cannot be read (a parameter missing, no date, ...).
    #[error("{0}")]
    Incomplete(String),
    /// No such access key (or a session token, which fnlet never issues).
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    #[error(
        "The request signature we calculated does not match the signature you provided. Check \
         your AWS Secret Access Key and signing method. Consult the service documentation for \
         details."
    )]
    SignatureMismatch,
    #[error("Signature expired: {signed} is now earlier than {earliest} ({now} - {window})")]
    Expired {
        signed: String,
        earliest: String,
        now: String,
        /// `5 min.`, or the presigned request's `X-Amz-Expires` (`300 sec.`).
        window: String,
    },
    #[error("Signature not yet current: {signed} is still later than {latest} ({now} + 5 min.)")]
    NotYetCurrent {
        signed: String,
        latest: String,
        now: String,
    },
    #[error("Credential should be scoped to correct service: 'lambda'. ")]
    WrongService { service: String },
    /// The scope or the signed headers are wrong (terminator, day, host not signed).
    #[error("{0}")]
    Invalid(String),
    /// `x-amz-content-sha256` does not match the body, or asks for an unsigned payload.
    #[error("{0}")]
    Payload(String),
}

impl AuthError {
    /// The `x-amzn-ErrorType` Lambda answers with.
    pub fn error_type(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationTokenException",
            AuthError::Incomplete(_) => "IncompleteSignatureException",
            AuthError::UnknownKey => "UnrecognizedClientException",
            AuthError::SignatureMismatch
            | AuthError::Expired { .. }
            | AuthError::NotYetCurrent { .. }
            | AuthError::WrongService { .. }
            | AuthError::Invalid(_)
            | AuthError::Payload(_) => "InvalidSignatureException",
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::FORBIDDEN
    }

    /// The JSON body. Lambda's front end answers a missing or bad signature with `message`
    /// alone; an unknown key also says `"Type": "User"`. The SDKs read the type from the
    /// header and the message from either shape.
    pub fn body(&self) -> serde_json::Value {
        match self {
            AuthError::UnknownKey => {
                serde_json::json!({ "Type": "User", "message": self.to_string() })
            }
            _ => serde_json::json!({ "message": self.to_string() }),
        }
    }
}

/// Lambda's answer to a refused call: 403, `x-amzn-ErrorType`, `x-amzn-RequestId`, the JSON
/// body.
pub fn lambda_error_response(err: &AuthError, request_id: &str) -> Response {
    let mut resp = (err.status(), axum::Json(err.body())).into_response();
    let h = resp.headers_mut();
    h.insert(
        "x-amzn-errortype",
        HeaderValue::from_static(err.error_type()),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn answer(e: &AuthError) -> (StatusCode, String, String, serde_json::Value) {
        let r = lambda_error_response(e, "req-1");
        let status = r.status();
        let h = |n: &str| r.headers()[n].to_str().unwrap().to_string();
        let (ty, id) = (h("x-amzn-ErrorType"), h("x-amzn-RequestId"));
        let body = r.into_body().collect().await.unwrap().to_bytes();
        (status, ty, id, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn lambdas_answers() {
        let (s, ty, id, body) = answer(&AuthError::UnknownKey).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(ty, "UnrecognizedClientException");
        assert_eq!(id, "req-1");
        assert_eq!(
            body,
            serde_json::json!({"Type": "User", "message": "The security token included in the request is invalid."})
        );

        let (s, ty, _, body) = answer(&AuthError::SignatureMismatch).await;
        assert_eq!(
            (s, ty.as_str()),
            (StatusCode::FORBIDDEN, "InvalidSignatureException")
        );
        assert_eq!(
            body["message"],
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service \
             documentation for details."
        );

        let (s, ty, _, body) = answer(&AuthError::Missing).await;
        assert_eq!(
            (s, ty.as_str()),
            (StatusCode::FORBIDDEN, "MissingAuthenticationTokenException")
        );
        assert_eq!(
            body,
            serde_json::json!({"message": "Missing Authentication Token"})
        );

        let e = AuthError::Expired {
            signed: "20261201T120000Z".into(),
            earliest: "20261201T120001Z".into(),
            now: "20261201T120501Z".into(),
            window: "5 min.".into(),
        };
        let (_, ty, _, body) = answer(&e).await;
        assert_eq!(ty, "InvalidSignatureException");
        assert_eq!(
            body["message"],
            "Signature expired: 20261201T120000Z is now earlier than 20261201T120001Z \
             (20261201T120501Z - 5 min.)"
        );
    }
}
