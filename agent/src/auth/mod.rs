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
    /// The key's scope or function patterns do not cover the call.
    #[error(
        "access key {key} ({scope} scope) is not authorized to perform: lambda:{action} on resource: {function}"
    )]
    Denied {
        key: String,
        scope: &'static str,
        action: &'static str,
        function: String,
    },
}

impl AuthError {
    /// The `x-amzn-ErrorType` Lambda answers with.
    pub fn error_type(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationTokenException",
            AuthError::Incomplete(_) => "IncompleteSignatureException",
            AuthError::UnknownKey => "UnrecognizedClientException",
            AuthError::Denied { .. } => "AccessDeniedException",
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

/// The query parameters of a presigned request (SigV4 in the query string).
const PRESIGNED_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Whether `value` is a SigV4 `Authorization` header (as opposed to, say, a caller's own
/// bearer token for a public function).
fn is_sigv4_authorization(value: &HeaderValue) -> bool {
    value.as_bytes().starts_with(b"AWS4-")
}

fn query_key(pair: &str) -> std::borrow::Cow<'_, str> {
    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
    percent_encoding::percent_decode_str(key).decode_utf8_lossy()
}

/// Whether the request carries an AWS signature or session token (header or presigned query):
/// a public function takes unsigned calls, but a signature that is there must be right.
pub fn carries_sigv4(uri: &axum::http::Uri, headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(is_sigv4_authorization)
        || headers.contains_key("x-amz-security-token")
        || uri.query().is_some_and(|q| {
            q.split('&')
                .any(|p| PRESIGNED_PARAMS.contains(&query_key(p).as_ref()))
        })
}

/// Removes the credentials the agent checks from what a function will see: an `Authorization`
/// header that is the admin token (`is_admin`) or a SigV4 signature, `X-Amz-Security-Token`,
/// and a presigned request's query parameters. Anything else (a public function's callers'
/// own tokens) is left as it came. Returns the query string to pass on.
pub fn strip_credentials<'q>(
    headers: &mut axum::http::HeaderMap,
    query: &'q str,
    is_admin: impl Fn(&HeaderValue) -> bool,
) -> std::borrow::Cow<'q, str> {
    let checked = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| is_sigv4_authorization(v) || is_admin(v));
    if checked {
        headers.remove(header::AUTHORIZATION);
    }
    headers.remove("x-amz-security-token");
    let presigned = |p: &str| PRESIGNED_PARAMS.contains(&query_key(p).as_ref());
    if !query.split('&').any(presigned) {
        return std::borrow::Cow::Borrowed(query);
    }
    std::borrow::Cow::Owned(
        query
            .split('&')
            .filter(|p| !p.is_empty() && !presigned(p))
            .collect::<Vec<_>>()
            .join("&"),
    )
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

    #[test]
    fn checked_credentials_are_stripped_and_app_tokens_kept() {
        use axum::http::{HeaderMap, Uri};
        let admin = |v: &HeaderValue| v.as_bytes() == b"Bearer admin-secret";
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer admin-secret"),
        );
        h.insert("x-app", HeaderValue::from_static("1"));
        assert_eq!(strip_credentials(&mut h, "a=1", admin), "a=1");
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert!(h.contains_key("x-app"));

        let mut h = HeaderMap::new();
        let sig = "AWS4-HMAC-SHA256 Credential=FNLTX/20261204/us-east-1/lambda/aws4_request, \
                   SignedHeaders=host, Signature=00";
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(sig));
        h.insert("x-amz-security-token", HeaderValue::from_static("tok"));
        assert!(carries_sigv4(&Uri::from_static("/x"), &h));
        strip_credentials(&mut h, "", admin);
        assert!(h.is_empty(), "{h:?}");

        // A public function's callers' own bearer token passes through.
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app-token"),
        );
        assert!(!carries_sigv4(&Uri::from_static("/x?a=1"), &h));
        strip_credentials(&mut h, "", admin);
        assert_eq!(h[header::AUTHORIZATION], "Bearer app-token");

        // Presigned: the X-Amz-* parameters go (encoded keys too), the rest stays in order.
        let q = "b=2&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=FNLTX%2F20261204&\
                 X%2DAmz%2DSignature=ab&a=1&X-Amz-Date=20261204T000000Z";
        assert!(carries_sigv4(
            &format!("/x?{q}").parse::<Uri>().unwrap(),
            &HeaderMap::new()
        ));
        assert_eq!(
            strip_credentials(&mut HeaderMap::new(), q, admin),
            "b=2&a=1"
        );
    }
}
