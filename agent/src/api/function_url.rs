//! Lambda function URLs: an HTTP request as a payload format 2.0 event, and the function's
//! answer (buffered, or a streamed prelude) as the HTTP response, mapped the way AWS maps them.
//!
//! Pure: no I/O and no clock (the caller passes `now`), so the whole contract is unit-tested
//! here, and checked against the event types of `aws_lambda_events`, which `lambda_http` uses.
//!
//! AWS behaviour followed (Lambda developer guide, "Invoking Lambda function URLs"; API Gateway
//! developer guide, "payload format version 2.0"; answers of real function URLs as recorded by
//! other projects' AWS-validated tests):
//! - The event: `version` "2.0", `routeKey`/`stage` "$default", `rawPath` and `rawQueryString`
//!   as sent, headers with lowercase names and repeated ones joined by ",", the Cookie header
//!   moved to `cookies` (one entry per cookie), `queryStringParameters` decoded with repeated keys
//!   joined by "," and absent without a query, no `pathParameters`/`stageVariables`, no `body`
//!   without a body. The body is text only for `text/*` and `application/json`; anything else
//!   (form posts and a missing content type included) is base64 with `isBase64Encoded: true`.
//! - The answer: a JSON object with `statusCode` is read as {statusCode, headers, cookies, body,
//!   isBase64Encoded}, and each cookie becomes a Set-Cookie header; any other JSON is the body of
//!   a 200 as it is, except that a JSON string answers with the string itself. Both default to
//!   `content-type: application/json`. Format 2.0 has no `multiValueHeaders`: it is ignored.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Response, StatusCode, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// The content type of a streamed answer that starts with a prelude (`split_stream_prelude`).
pub const STREAM_CONTENT_TYPE: &str = "application/vnd.awslambda.http-integration-response";

/// Ends the JSON prelude of a streamed answer; JSON text never holds a NUL byte.
const PRELUDE_END: [u8; 8] = [0; 8];

/// The longest prelude read before giving up: statusCode, headers and cookies are small, and
/// the caller must not buffer an endless stream waiting for a delimiter that never comes.
pub const MAX_PRELUDE: usize = 64 * 1024;

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never the message, so
/// they are dropped both ways. Content-Length is recomputed from the body actually sent.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// What the HTTP layer knows about one request to `/fn/{name}/{path...}`.
pub struct UrlRequest<'a> {
    pub method: &'a Method,
    pub version: Version,
    /// The path after `/fn/{name}`, starting with '/', still percent-encoded as received.
    pub raw_path: &'a str,
    /// The query string without its '?', as received ("" when there is none).
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The peer of the TCP connection.
    pub source_ip: IpAddr,
    pub request_id: &'a str,
    /// The Host the client called (the Host header, or the HTTP/2 authority).
    pub domain_name: &'a str,
    pub function: &'a str,
    pub account_id: &'a str,
    pub now: SystemTime,
}

/// The function's answer could not be made into an HTTP response; the caller answers 502.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("the function's response is not JSON: {source}")]
    NotJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("statusCode {value} in the function's response is not an HTTP status (100-599)")]
    Status { value: String },
    #[error("{field} in the function's response must be {expected}")]
    Field {
        field: &'static str,
        expected: &'static str,
    },
    #[error("header name {name:?} in the function's response is not a valid HTTP header name")]
    HeaderName { name: String },
    #[error("the value of header {name} in the function's response is not a valid header value")]
    HeaderValue { name: String },
    #[error("cookie {index} in the function's response is not a valid Set-Cookie value")]
    Cookie { index: usize },
    #[error("the function's response has isBase64Encoded but its body is not base64: {source}")]
    Base64 {
        #[source]
        source: base64::DecodeError,
    },
    #[error("the prelude of the function's streamed response is not JSON: {source}")]
    Prelude {
        #[source]
        source: serde_json::Error,
    },
    #[error("the function's streamed response has no end of prelude in its first {limit} bytes")]
    PreludeTooLong { limit: usize },
}

/// The payload format 2.0 event for one request, as the JSON the runtime receives.
pub fn event(req: &UrlRequest) -> Vec<u8> {
    let (body, is_base64_encoded) = event_body(req.headers, req.body);
    let raw_path = if req.raw_path.is_empty() {
        "/"
    } else {
        req.raw_path
    };
    let source_ip = req.source_ip.to_canonical().to_string();
    let (time, time_epoch) = timestamps(req.now);
    let event = Event {
        version: "2.0",
        route_key: "$default",
        raw_path,
        raw_query_string: req.raw_query,
        cookies: cookies(req.headers),
        headers: event_headers(req, &source_ip),
        query_string_parameters: query_parameters(req.raw_query),
        request_context: Context {
            account_id: req.account_id,
            api_id: req.function,
            domain_name: req.domain_name,
            domain_prefix: domain_prefix(req.domain_name),
            http: HttpInfo {
                method: req.method.as_str(),
                path: raw_path,
                protocol: protocol(req.version),
                source_ip,
                user_agent: req
                    .headers
                    .get(header::USER_AGENT)
                    .map(lossy)
                    .unwrap_or_default(),
            },
            request_id: req.request_id,
            route_key: "$default",
            stage: "$default",
            time,
            time_epoch,
        },
        body,
        is_base64_encoded,
    };
    serde_json::to_vec(&event).expect("the event holds only strings, numbers and string maps")
}

/// The function's answer (what its runtime POSTed to /response) as the HTTP response.
pub fn response(payload: &[u8]) -> Result<Response<Bytes>, UrlError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|source| UrlError::NotJson { source })?;
    let mut headers = HeaderMap::new();
    let (status, body) = match value {
        Value::Object(mut object) if object.get("statusCode").is_some_and(|v| !v.is_null()) => {
            let status = status(&object["statusCode"])?;
            if let Some(v) = object.get("headers") {
                add_headers(&mut headers, v)?;
            }
            if let Some(v) = object.get("cookies") {
                add_cookies(&mut headers, v)?;
            }
            let base64 = match object.get("isBase64Encoded") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(UrlError::Field {
                        field: "isBase64Encoded",
                        expected: "true or false",
                    });
                }
            };
            let body = match object.remove("body") {
                None | Some(Value::Null) => Bytes::new(),
                Some(Value::String(s)) if base64 => BASE64
                    .decode(s.as_bytes())
                    .map(Bytes::from)
                    .map_err(|source| UrlError::Base64 { source })?,
                Some(Value::String(s)) => Bytes::from(s),
                Some(_) if base64 => {
                    return Err(UrlError::Field {
                        field: "body",
                        expected: "a string when isBase64Encoded is true",
                    });
                }
                // Not a string: answer its JSON text rather than refuse it.
                Some(other) => Bytes::from(other.to_string()),
            };
            (status, body)
        }
        // A JSON string is answered unquoted: "hello" gives the 5 bytes hello.
        Value::String(s) => (StatusCode::OK, Bytes::from(s)),
        // Any other JSON (an object without statusCode, an array, a number, true, null) is the
        // body itself, byte for byte.
        _ => (StatusCode::OK, Bytes::copy_from_slice(payload)),
    };
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Splits a streamed answer of type `STREAM_CONTENT_TYPE` (a JSON prelude {statusCode,
/// headers, cookies}, 8 NUL bytes, then the body) once its prelude is complete: the status and
/// headers to send, and the offset in `buf` where the body starts. `Ok(None)`: the prelude has
/// not fully arrived yet; call again with more bytes.
pub fn split_stream_prelude(
    buf: &[u8],
) -> Result<Option<(axum::http::response::Parts, usize)>, UrlError> {
    let window = &buf[..buf.len().min(MAX_PRELUDE + PRELUDE_END.len())];
    let Some(end) = window
        .windows(PRELUDE_END.len())
        .position(|w| w == PRELUDE_END)
    else {
        // A delimiter starting past MAX_PRELUDE would end past the window.
        if window.len() == MAX_PRELUDE + PRELUDE_END.len() {
            return Err(UrlError::PreludeTooLong { limit: MAX_PRELUDE });
        }
        return Ok(None);
    };
    let prelude: Value =
        serde_json::from_slice(&buf[..end]).map_err(|source| UrlError::Prelude { source })?;
    let Value::Object(prelude) = prelude else {
        return Err(UrlError::Field {
            field: "the prelude",
            expected: "a JSON object",
        });
    };
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = match prelude.get("statusCode") {
        None | Some(Value::Null) => StatusCode::OK,
        Some(v) => status(v)?,
    };
    if let Some(v) = prelude.get("headers") {
        add_headers(&mut parts.headers, v)?;
    }
    if let Some(v) = prelude.get("cookies") {
        add_cookies(&mut parts.headers, v)?;
    }
    Ok(Some((parts, end + PRELUDE_END.len())))
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    version: &'static str,
    route_key: &'static str,
    raw_path: &'a str,
    raw_query_string: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cookies: Vec<Cow<'a, str>>,
    headers: Pairs<'a>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    query_string_parameters: BTreeMap<Cow<'a, str>, String>,
    request_context: Context<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Cow<'a, str>>,
    is_base64_encoded: bool,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Context<'a> {
    account_id: &'a str,
    api_id: &'a str,
    domain_name: &'a str,
    domain_prefix: &'a str,
    http: HttpInfo<'a>,
    request_id: &'a str,
    route_key: &'static str,
    stage: &'static str,
    time: String,
    time_epoch: u64,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpInfo<'a> {
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    source_ip: String,
    user_agent: Cow<'a, str>,
}

/// Headers as a JSON object, in the order the request had them.
struct Pairs<'a>(Vec<(&'a str, Cow<'a, str>)>);

impl Serialize for Pairs<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

fn event_headers<'a>(req: &UrlRequest<'a>, source_ip: &str) -> Pairs<'a> {
    let headers = req.headers;
    // Headers that the Connection header names are hop-by-hop too.
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .collect();
    let mut pairs = Vec::with_capacity(headers.keys_len() + 3);
    let mut forwarded_for = None;
    for name in headers.keys() {
        let name_str = name.as_str();
        if HOP_BY_HOP.contains(&name_str)
            || name == header::COOKIE
            || name == header::CONTENT_LENGTH
            || listed.iter().any(|l| l == name_str)
        {
            continue;
        }
        let joined = join_values(headers, name);
        if name == "x-forwarded-for" {
            forwarded_for = Some(joined);
            continue;
        }
        pairs.push((name_str, joined));
    }
    if !headers.contains_key(header::HOST) && !req.domain_name.is_empty() {
        pairs.push(("host", Cow::Borrowed(req.domain_name)));
    }
    // Like any proxy: the client's chain, then the peer we saw.
    let forwarded_for = match forwarded_for {
        Some(chain) if !chain.trim().is_empty() => format!("{chain}, {source_ip}"),
        _ => source_ip.to_owned(),
    };
    pairs.push(("x-forwarded-for", Cow::Owned(forwarded_for)));
    // Function URLs always tell the length of the body they pass on, "0" included.
    pairs.push(("content-length", Cow::Owned(req.body.len().to_string())));
    Pairs(pairs)
}

fn join_values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Cow<'a, str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().map(lossy).unwrap_or_default();
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return first;
    }
    let mut joined = first.into_owned();
    for value in rest {
        joined.push(',');
        joined.push_str(&lossy(value));
    }
    Cow::Owned(joined)
}

fn lossy(value: &HeaderValue) -> Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

/// Each cookie of every Cookie header ("a=1; b=2" gives "a=1" and "b=2"); HTTP/2 clients may
/// send one Cookie header per cookie.
fn cookies(headers: &HeaderMap) -> Vec<Cow<'_, str>> {
    let mut cookies = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        match lossy(value) {
            Cow::Borrowed(s) => cookies.extend(
                s.split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(Cow::Borrowed),
            ),
            Cow::Owned(s) => cookies.extend(
                s.split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| Cow::Owned(c.to_owned())),
            ),
        }
    }
    cookies
}

/// Decoded as a form (percent escapes, '+' as space); repeated keys joined by ",".
fn query_parameters(raw_query: &str) -> BTreeMap<Cow<'_, str>, String> {
    let mut params: BTreeMap<Cow<str>, String> = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        match params.get_mut(&key) {
            Some(joined) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => {
                params.insert(key, value.into_owned());
            }
        }
    }
    params
}

/// The body as the event carries it, and whether that is base64.
fn event_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> (Option<Cow<'a, str>>, bool) {
    if body.is_empty() {
        return (None, false);
    }
    if is_text(headers.get(header::CONTENT_TYPE)) {
        // Text that is not UTF-8 cannot sit in a JSON string as it is.
        if let Ok(text) = std::str::from_utf8(body) {
            return (Some(Cow::Borrowed(text)), false);
        }
    }
    (Some(Cow::Owned(BASE64.encode(body))), true)
}

/// Function URLs pass `text/*` and `application/json` bodies as text, everything else as base64.
fn is_text(content_type: Option<&HeaderValue>) -> bool {
    let Some(content_type) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/") || essence == "application/json"
}

/// The first label of the host: `abc` for `abc.lambda-url.us-east-1.on.aws`.
fn domain_prefix(domain_name: &str) -> &str {
    let host = domain_name.split(':').next().unwrap_or_default();
    host.split('.').next().unwrap_or_default()
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// `requestContext.time` ("12/Mar/2020:19:03:58 +0000") and `timeEpoch` (milliseconds).
fn timestamps(now: SystemTime) -> (String, u64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
    let t = i64::try_from(since_epoch.as_secs())
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    let time = format!(
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
    (time, millis)
}

/// statusCode as a number (or a string of digits, as some handlers send it).
fn status(value: &Value) -> Result<StatusCode, UrlError> {
    let code = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    code.filter(|c| (100..=599).contains(c))
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| UrlError::Status {
            value: value.to_string(),
        })
}

/// `headers`: an object of name to value. A value may be a string, a number or a boolean, or an
/// array of them for a repeated header (as `http_serde` writes a prelude's headers).
fn add_headers(headers: &mut HeaderMap, value: &Value) -> Result<(), UrlError> {
    let object = match value {
        Value::Null => return Ok(()),
        Value::Object(object) => object,
        _ => {
            return Err(UrlError::Field {
                field: "headers",
                expected: "an object of header names to values",
            });
        }
    };
    for (name, value) in object {
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| UrlError::HeaderName { name: name.clone() })?;
        if HOP_BY_HOP.contains(&header_name.as_str()) || header_name == header::CONTENT_LENGTH {
            continue;
        }
        let values = match value {
            Value::Array(values) => values.as_slice(),
            one => std::slice::from_ref(one),
        };
        for value in values {
            let text = match value {
                Value::Null => continue,
                Value::String(s) => Cow::Borrowed(s.as_str()),
                Value::Number(n) => Cow::Owned(n.to_string()),
                Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
                Value::Array(_) | Value::Object(_) => {
                    return Err(UrlError::HeaderValue { name: name.clone() });
                }
            };
            let header_value = HeaderValue::from_str(&text)
                .map_err(|_| UrlError::HeaderValue { name: name.clone() })?;
            headers.append(header_name.clone(), header_value);
        }
    }
    Ok(())
}

/// `cookies`: each string becomes its own Set-Cookie header.
fn add_cookies(headers: &mut HeaderMap, value: &Value) -> Result<(), UrlError> {
    let cookies = match value {
        Value::Null => return Ok(()),
        Value::Array(cookies) => cookies,
        _ => {
            return Err(UrlError::Field {
                field: "cookies",
                expected: "an array of strings",
            });
        }
    };
    for (index, cookie) in cookies.iter().enumerate() {
        let value = cookie
            .as_str()
            .and_then(|c| HeaderValue::from_str(c).ok())
            .ok_or(UrlError::Cookie { index })?;
        headers.append(header::SET_COOKIE, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
    use aws_lambda_events::encodings::Body;
    use aws_lambda_events::lambda_function_urls::LambdaFunctionUrlRequest;
    use serde_json::json;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    // 2020-03-12T19:03:58.390Z, the time of AWS's documented example event.
    const NOW_MS: u64 = 1_584_039_838_390;

    struct Req {
        method: Method,
        path: &'static str,
        query: &'static str,
        headers: HeaderMap,
        body: Vec<u8>,
        ip: IpAddr,
    }

    impl Req {
        fn new(method: Method, path: &'static str, query: &'static str) -> Req {
            Req {
                method,
                path,
                query,
                headers: HeaderMap::new(),
                body: Vec::new(),
                ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
            }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }

        fn body(mut self, body: &[u8]) -> Req {
            self.body = body.to_vec();
            self
        }

        fn event_bytes(&self) -> Vec<u8> {
            event(&UrlRequest {
                method: &self.method,
                version: Version::HTTP_11,
                raw_path: self.path,
                raw_query: self.query,
                headers: &self.headers,
                body: &self.body,
                source_ip: self.ip,
                request_id: "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
                domain_name: "fnhost.example:8080",
                function: "hello",
                account_id: "123456789012",
                now: UNIX_EPOCH + Duration::from_millis(NOW_MS),
            })
        }

        fn event(&self) -> Value {
            serde_json::from_slice(&self.event_bytes()).unwrap()
        }
    }

    #[test]
    fn event_has_the_documented_fields() {
        let ev = Req::new(
            Method::POST,
            "/my/path",
            "parameter1=value1&parameter1=value2&parameter2=value",
        )
        .header("host", "fnhost.example:8080")
        .header("user-agent", "agent")
        .header("content-type", "text/plain")
        .body(b"Hello from client!")
        .event();
        assert_eq!(ev["version"], "2.0");
        assert_eq!(ev["routeKey"], "$default");
        assert_eq!(ev["rawPath"], "/my/path");
        assert_eq!(
            ev["rawQueryString"],
            "parameter1=value1&parameter1=value2&parameter2=value"
        );
        assert_eq!(
            ev["queryStringParameters"],
            json!({"parameter1": "value1,value2", "parameter2": "value"})
        );
        assert_eq!(ev["body"], "Hello from client!");
        assert_eq!(ev["isBase64Encoded"], false);
        let ctx = &ev["requestContext"];
        assert_eq!(ctx["accountId"], "123456789012");
        assert_eq!(ctx["apiId"], "hello");
        assert_eq!(ctx["domainName"], "fnhost.example:8080");
        assert_eq!(ctx["domainPrefix"], "fnhost");
        assert_eq!(ctx["requestId"], "c6af9ac6-7b61-11e6-9a41-93e8deadbeef");
        assert_eq!(ctx["routeKey"], "$default");
        assert_eq!(ctx["stage"], "$default");
        assert_eq!(ctx["time"], "12/Mar/2020:19:03:58 +0000");
        assert_eq!(ctx["timeEpoch"], NOW_MS);
        assert_eq!(
            ctx["http"],
            json!({"method": "POST", "path": "/my/path", "protocol": "HTTP/1.1",
                   "sourceIp": "203.0.113.7", "userAgent": "agent"})
        );
        // Function URLs send neither; absent rather than null.
        let object = ev.as_object().unwrap();
        for absent in ["pathParameters", "stageVariables", "cookies"] {
            assert!(!object.contains_key(absent), "{absent} present");
        }
    }

    #[test]
    fn path_stays_percent_encoded_and_query_parameters_are_decoded() {
        let ev = Req::new(Method::GET, "/a%20b/c%2Fd", "q=caf%C3%A9+au+lait&flag&e=").event();
        assert_eq!(ev["rawPath"], "/a%20b/c%2Fd");
        assert_eq!(ev["requestContext"]["http"]["path"], "/a%20b/c%2Fd");
        assert_eq!(ev["rawQueryString"], "q=caf%C3%A9+au+lait&flag&e=");
        assert_eq!(
            ev["queryStringParameters"],
            json!({"q": "café au lait", "flag": "", "e": ""})
        );
    }

    #[test]
    fn no_query_no_parameters_and_an_empty_path_is_root() {
        let ev = Req::new(Method::GET, "", "").event();
        assert_eq!(ev["rawPath"], "/");
        assert_eq!(ev["rawQueryString"], "");
        let object = ev.as_object().unwrap();
        assert!(!object.contains_key("queryStringParameters"));
        assert!(
            !object.contains_key("body"),
            "a GET without body has no body"
        );
        assert_eq!(ev["isBase64Encoded"], false);
    }

    #[test]
    fn headers_are_joined_and_cookies_moved_out() {
        let ev = Req::new(Method::GET, "/", "")
            .header("Accept", "text/html")
            .header("accept", "application/json")
            .header("cookie", "a=1; b=2")
            .header("cookie", "c=3")
            .header("x-custom", "v")
            .event();
        let headers = &ev["headers"];
        assert_eq!(headers["accept"], "text/html,application/json");
        assert_eq!(headers["x-custom"], "v");
        assert!(
            headers.get("cookie").is_none(),
            "cookie stays out of headers"
        );
        assert_eq!(ev["cookies"], json!(["a=1", "b=2", "c=3"]));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_proxy_headers_added() {
        let ev = Req::new(Method::POST, "/", "")
            .header("connection", "keep-alive, x-secret-hop")
            .header("keep-alive", "timeout=5")
            .header("transfer-encoding", "chunked")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("x-secret-hop", "1")
            .header("content-length", "999")
            .header("x-forwarded-for", "198.51.100.1")
            .header("content-type", "application/json")
            .body(br#"{"k":"v"}"#)
            .event();
        let headers = ev["headers"].as_object().unwrap();
        for gone in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "te",
            "upgrade",
            "x-secret-hop",
        ] {
            assert!(!headers.contains_key(gone), "{gone} passed on");
        }
        assert_eq!(headers["content-length"], "9", "recomputed from the body");
        assert_eq!(headers["x-forwarded-for"], "198.51.100.1, 203.0.113.7");
        assert_eq!(headers["host"], "fnhost.example:8080", "from the authority");
        assert_eq!(ev["body"], r#"{"k":"v"}"#);
    }

    #[test]
    fn a_bodyless_get_still_says_content_length_zero() {
        let ev = Req::new(Method::GET, "/", "").event();
        assert_eq!(ev["headers"]["content-length"], "0");
        assert_eq!(ev["headers"]["x-forwarded-for"], "203.0.113.7");
    }

    #[test]
    fn ipv4_mapped_peers_are_shown_as_ipv4() {
        let mut req = Req::new(Method::GET, "/", "");
        req.ip = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(
            req.event()["requestContext"]["http"]["sourceIp"],
            "192.0.2.1"
        );
        req.ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(req.event()["requestContext"]["http"]["sourceIp"], "::1");
    }

    #[test]
    fn only_text_and_json_bodies_are_text() {
        let cases: &[(Option<&'static str>, bool)] = &[
            (Some("text/plain"), false),
            (Some("text/html; charset=utf-8"), false),
            (Some("Application/JSON; charset=utf-8"), false),
            (Some("application/x-www-form-urlencoded"), true),
            (Some("application/octet-stream"), true),
            (Some("image/png"), true),
            (None, true),
        ];
        for (content_type, base64) in cases {
            let mut req = Req::new(Method::POST, "/", "").body(b"a=1&b=2");
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let ev = req.event();
            assert_eq!(ev["isBase64Encoded"], *base64, "{content_type:?}");
            let body = ev["body"].as_str().unwrap();
            if *base64 {
                assert_eq!(BASE64.decode(body).unwrap(), b"a=1&b=2");
            } else {
                assert_eq!(body, "a=1&b=2");
            }
        }
    }

    #[test]
    fn binary_bodies_round_trip_through_base64() {
        let bytes: Vec<u8> = (0..=255).collect();
        let ev = Req::new(Method::PUT, "/upload", "")
            .header("content-type", "application/octet-stream")
            .body(&bytes)
            .event();
        assert_eq!(ev["isBase64Encoded"], true);
        assert_eq!(BASE64.decode(ev["body"].as_str().unwrap()).unwrap(), bytes);
        // Text by content type but not UTF-8: base64 too, never mangled.
        let ev = Req::new(Method::POST, "/", "")
            .header("content-type", "text/plain")
            .body(&[0x66, 0xff, 0x00])
            .event();
        assert_eq!(ev["isBase64Encoded"], true);
        assert_eq!(
            BASE64.decode(ev["body"].as_str().unwrap()).unwrap(),
            [0x66, 0xff, 0x00]
        );
    }

    #[test]
    fn times_before_the_epoch_do_not_panic() {
        assert_eq!(
            timestamps(UNIX_EPOCH - Duration::from_secs(5)),
            ("01/Jan/1970:00:00:00 +0000".into(), 0)
        );
        assert_eq!(
            timestamps(UNIX_EPOCH + Duration::from_secs(86_400 * 366)).0,
            "02/Jan/1971:00:00:00 +0000"
        );
    }

    /// The contract checked by third-party types: `lambda_http` reads a function URL event as
    /// `ApiGatewayV2httpRequest`; `LambdaFunctionUrlRequest` is the function URL's own type.
    #[test]
    fn aws_lambda_events_types_read_the_event() {
        let req = Req::new(Method::PATCH, "/items/42%21", "a=1&a=2&b=x%20y")
            .header("host", "fnhost.example:8080")
            .header("user-agent", "curl/8.0")
            .header("cookie", "session=abc; theme=dark")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .header("content-type", "image/png")
            .body(&[0x89, b'P', b'N', b'G', 0]);
        let bytes = req.event_bytes();

        let v2: ApiGatewayV2httpRequest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v2.version.as_deref(), Some("2.0"));
        assert_eq!(v2.route_key.as_deref(), Some("$default"));
        assert_eq!(v2.raw_path.as_deref(), Some("/items/42%21"));
        assert_eq!(v2.raw_query_string.as_deref(), Some("a=1&a=2&b=x%20y"));
        assert_eq!(v2.query_string_parameters.all("a"), Some(vec!["1", "2"]));
        assert_eq!(v2.query_string_parameters.first("b"), Some("x y"));
        assert_eq!(
            v2.cookies,
            Some(vec!["session=abc".to_string(), "theme=dark".to_string()])
        );
        assert_eq!(v2.headers["x-multi"], "1,2");
        assert_eq!(v2.headers["host"], "fnhost.example:8080");
        assert!(v2.path_parameters.is_empty() && v2.stage_variables.is_empty());
        assert!(v2.is_base64_encoded);
        let body = BASE64.decode(v2.body.as_deref().unwrap()).unwrap();
        assert_eq!(body, [0x89, b'P', b'N', b'G', 0]);
        let ctx = &v2.request_context;
        assert_eq!(ctx.http.method, Method::PATCH);
        assert_eq!(ctx.http.path.as_deref(), Some("/items/42%21"));
        assert_eq!(ctx.http.source_ip.as_deref(), Some("203.0.113.7"));
        assert_eq!(ctx.http.user_agent.as_deref(), Some("curl/8.0"));
        assert_eq!(ctx.stage.as_deref(), Some("$default"));
        assert_eq!(ctx.account_id.as_deref(), Some("123456789012"));
        assert_eq!(ctx.time_epoch, i64::try_from(NOW_MS).unwrap());

        let url: LambdaFunctionUrlRequest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(url.raw_path.as_deref(), Some("/items/42%21"));
        assert_eq!(url.query_string_parameters["a"], "1,2");
        assert_eq!(url.request_context.apiid.as_deref(), Some("hello"));
        assert_eq!(url.request_context.domain_prefix.as_deref(), Some("fnhost"));
        assert_eq!(url.request_context.http.method.as_deref(), Some("PATCH"));
        assert_eq!(
            url.request_context.time.as_deref(),
            Some("12/Mar/2020:19:03:58 +0000")
        );
        assert!(url.is_base64_encoded);

        // A plain GET reads too (no body, no cookies, no query).
        let bytes = Req::new(Method::GET, "/", "").event_bytes();
        let v2: ApiGatewayV2httpRequest = serde_json::from_slice(&bytes).unwrap();
        assert!(v2.body.is_none() && v2.cookies.is_none() && !v2.is_base64_encoded);
        let _: LambdaFunctionUrlRequest = serde_json::from_slice(&bytes).unwrap();
    }

    fn answer(payload: Value) -> Response<Bytes> {
        response(payload.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_structured_answer_sets_status_headers_cookies_and_body() {
        let r = answer(json!({
            "statusCode": 201,
            "headers": {"Content-Type": "text/plain", "My-Custom-Header": "Custom Value", "X-Count": 3},
            "cookies": ["Cookie_1=Value1; Expires=21 Oct 2021 07:48 GMT", "Cookie_2=Value2; Max-Age=78000"],
            "body": "created",
            "isBase64Encoded": false
        }));
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(r.headers()["my-custom-header"], "Custom Value");
        assert_eq!(r.headers()["x-count"], "3");
        let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().collect();
        assert_eq!(
            cookies,
            [
                "Cookie_1=Value1; Expires=21 Oct 2021 07:48 GMT",
                "Cookie_2=Value2; Max-Age=78000"
            ]
        );
        assert_eq!(r.body(), "created");
    }

    #[test]
    fn a_structured_answer_defaults_to_json_and_an_empty_body() {
        let r = answer(json!({"statusCode": 204}));
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.body().is_empty());
        let r =
            answer(json!({"statusCode": "404", "body": null, "headers": null, "cookies": null}));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.body().is_empty());
        // AWS-recorded: {"statusCode": 200, "body": "body123"} gives body123 as application/json.
        let r = answer(json!({"statusCode": 200, "body": "body123"}));
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.body(), "body123");
    }

    #[test]
    fn a_base64_body_is_decoded() {
        let bytes: Vec<u8> = (0..=255).rev().collect();
        let r = answer(json!({
            "statusCode": 200,
            "headers": {"content-type": "image/png"},
            "body": BASE64.encode(&bytes),
            "isBase64Encoded": true
        }));
        assert_eq!(r.body().as_ref(), bytes.as_slice());
        assert_eq!(r.headers()["content-type"], "image/png");
    }

    #[test]
    fn a_body_that_is_not_a_string_is_sent_as_its_json() {
        let r = answer(json!({"statusCode": 200, "body": {"message": "hi"}}));
        assert_eq!(r.body(), r#"{"message":"hi"}"#);
        let r = answer(json!({"statusCode": 200, "body": 42}));
        assert_eq!(r.body(), "42");
    }

    #[test]
    fn repeated_and_hop_by_hop_answer_headers() {
        let r = answer(json!({
            "statusCode": 200,
            "headers": {
                "x-many": ["1", "2"],
                "connection": "close",
                "transfer-encoding": "chunked",
                "content-length": "9999",
                "x-null": null
            },
            "body": "ok"
        }));
        let many: Vec<_> = r.headers().get_all("x-many").iter().collect();
        assert_eq!(many, ["1", "2"]);
        for gone in [
            "connection",
            "transfer-encoding",
            "content-length",
            "x-null",
        ] {
            assert!(!r.headers().contains_key(gone), "{gone} passed on");
        }
    }

    #[test]
    fn json_without_status_code_is_the_body_of_a_200() {
        // Outputs and answers as recorded from real function URLs.
        for (payload, body) in [
            (r#"{"hello":"world"}"#, r#"{"hello":"world"}"#),
            (r#"["hello",3,true]"#, r#"["hello",3,true]"#),
            (r#""hello""#, "hello"),
            ("3", "3"),
            ("3.1", "3.1"),
            ("true", "true"),
            ("null", "null"),
            // A body field alone does not make it a structured answer.
            (
                r#"{"body":"x","headers":{"a":"b"}}"#,
                r#"{"body":"x","headers":{"a":"b"}}"#,
            ),
            (
                r#"{"statusCode":null,"body":"x"}"#,
                r#"{"statusCode":null,"body":"x"}"#,
            ),
        ] {
            let r = response(payload.as_bytes()).unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{payload}");
            assert_eq!(r.headers()["content-type"], "application/json", "{payload}");
            assert_eq!(r.body(), body, "{payload}");
            assert_eq!(r.headers().len(), 1, "{payload}");
        }
    }

    #[test]
    fn malformed_answers_are_typed_errors() {
        let err = |payload: &str| response(payload.as_bytes()).unwrap_err();
        assert!(matches!(err("not json"), UrlError::NotJson { .. }));
        assert!(matches!(err(""), UrlError::NotJson { .. }));
        assert!(matches!(
            err("{\"statusCode\": 200"),
            UrlError::NotJson { .. }
        ));
        for bad in [
            "99", "600", "-1", "200.5", "\"abc\"", "true", "[200]", "65736",
        ] {
            let e = err(&format!(r#"{{"statusCode": {bad}}}"#));
            assert!(matches!(e, UrlError::Status { .. }), "{bad}: {e}");
        }
        assert_eq!(
            err(r#"{"statusCode": 700}"#).to_string(),
            "statusCode 700 in the function's response is not an HTTP status (100-599)"
        );
        assert!(matches!(
            err(r#"{"statusCode": 200, "headers": "x"}"#),
            UrlError::Field {
                field: "headers",
                ..
            }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "headers": {"bad name": "v"}}"#),
            UrlError::HeaderName { .. }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "headers": {"x": "line\nbreak"}}"#),
            UrlError::HeaderValue { .. }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "headers": {"x": {"nested": 1}}}"#),
            UrlError::HeaderValue { .. }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "cookies": "a=1"}"#),
            UrlError::Field {
                field: "cookies",
                ..
            }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "cookies": ["a=1", 2]}"#),
            UrlError::Cookie { index: 1 }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "isBase64Encoded": true, "body": "%%%"}"#),
            UrlError::Base64 { .. }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "isBase64Encoded": "yes"}"#),
            UrlError::Field {
                field: "isBase64Encoded",
                ..
            }
        ));
        assert!(matches!(
            err(r#"{"statusCode": 200, "isBase64Encoded": true, "body": 5}"#),
            UrlError::Field { field: "body", .. }
        ));
    }

    /// What `lambda_http` answers: `ApiGatewayV2httpResponse`, with `multiValueHeaders: {}`,
    /// `body: null` for an empty body, and the binary body in base64.
    #[test]
    fn answers_serialized_by_aws_lambda_events_are_read() {
        let mut text = ApiGatewayV2httpResponse::default();
        text.status_code = 418;
        text.headers
            .insert("content-type", HeaderValue::from_static("text/html"));
        text.cookies = vec!["id=1; HttpOnly".into()];
        text.body = Some(Body::Text("<p>teapot</p>".into()));
        let r = response(&serde_json::to_vec(&text).unwrap()).unwrap();
        assert_eq!(r.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(r.headers()["content-type"], "text/html");
        assert_eq!(r.headers()["set-cookie"], "id=1; HttpOnly");
        assert_eq!(r.body(), "<p>teapot</p>");

        let mut binary = ApiGatewayV2httpResponse::default();
        binary.status_code = 200;
        binary.is_base64_encoded = true;
        binary.body = Some(Body::Binary(vec![0, 159, 146, 150]));
        let r = response(&serde_json::to_vec(&binary).unwrap()).unwrap();
        assert_eq!(r.body().as_ref(), [0, 159, 146, 150]);

        let mut empty = ApiGatewayV2httpResponse::default();
        empty.status_code = 304;
        empty.body = Some(Body::Empty);
        let payload = serde_json::to_vec(&empty).unwrap();
        assert!(String::from_utf8_lossy(&payload).contains("\"multiValueHeaders\":{}"));
        let r = response(&payload).unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert!(r.body().is_empty());
    }

    /// A request, through a Python-style handler that echoes what it got, back to HTTP.
    #[test]
    fn round_trip_through_an_echo_handler() {
        let ev = Req::new(Method::POST, "/echo", "x=1")
            .header("content-type", "application/octet-stream")
            .header("cookie", "k=v")
            .body(&[1, 2, 3, 255])
            .event();
        let payload = json!({
            "statusCode": 200,
            "headers": {"content-type": "application/octet-stream",
                        "x-path": ev["rawPath"], "x-query": ev["queryStringParameters"]["x"]},
            "cookies": ev["cookies"],
            "body": ev["body"],
            "isBase64Encoded": ev["isBase64Encoded"],
        });
        let r = answer(payload);
        assert_eq!(r.body().as_ref(), [1, 2, 3, 255]);
        assert_eq!(r.headers()["x-path"], "/echo");
        assert_eq!(r.headers()["x-query"], "1");
        assert_eq!(r.headers()["set-cookie"], "k=v");
    }

    #[test]
    fn a_stream_prelude_is_split_from_its_body() {
        // As lambda_runtime's MetadataPrelude writes it (http_serde: repeated headers as arrays).
        let prelude = br#"{"statusCode":201,"headers":{"content-type":"text/event-stream","x-a":["1","2"]},"cookies":["s=1"]}"#;
        let mut buf = prelude.to_vec();
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(b"data: first\n\n\0binary");
        let (parts, offset) = split_stream_prelude(&buf).unwrap().unwrap();
        assert_eq!(parts.status, StatusCode::CREATED);
        assert_eq!(parts.headers["content-type"], "text/event-stream");
        let xa: Vec<_> = parts.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(parts.headers["set-cookie"], "s=1");
        assert_eq!(&buf[offset..], b"data: first\n\n\0binary");

        // An empty prelude is a 200 with no headers; the body may be empty.
        let (parts, offset) = split_stream_prelude(b"{}\0\0\0\0\0\0\0\0")
            .unwrap()
            .unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert!(parts.headers.is_empty());
        assert_eq!(offset, 10);
    }

    #[test]
    fn an_incomplete_prelude_waits_for_more() {
        assert!(split_stream_prelude(b"").unwrap().is_none());
        assert!(
            split_stream_prelude(br#"{"statusCode":200"#)
                .unwrap()
                .is_none()
        );
        assert!(
            split_stream_prelude(b"{\"statusCode\":200}\0\0\0\0\0\0\0")
                .unwrap()
                .is_none()
        );
        let (_, offset) = split_stream_prelude(b"{\"statusCode\":200}\0\0\0\0\0\0\0\0")
            .unwrap()
            .unwrap();
        assert_eq!(offset, 26);
    }

    #[test]
    fn bad_preludes_are_typed_errors() {
        let long = vec![b' '; MAX_PRELUDE + 8];
        assert!(matches!(
            split_stream_prelude(&long),
            Err(UrlError::PreludeTooLong { .. })
        ));
        let mut late = vec![b' '; MAX_PRELUDE + 1];
        late.extend_from_slice(&[0; 8]);
        assert!(matches!(
            split_stream_prelude(&late),
            Err(UrlError::PreludeTooLong { .. })
        ));
        // Just within the limit.
        let mut ok = vec![b' '; MAX_PRELUDE - 2];
        ok.extend_from_slice(b"{}");
        ok.extend_from_slice(&[0; 8]);
        assert!(split_stream_prelude(&ok).unwrap().is_some());

        assert!(matches!(
            split_stream_prelude(b"nope\0\0\0\0\0\0\0\0"),
            Err(UrlError::Prelude { .. })
        ));
        assert!(matches!(
            split_stream_prelude(b"[1]\0\0\0\0\0\0\0\0"),
            Err(UrlError::Field { .. })
        ));
        assert!(matches!(
            split_stream_prelude(b"{\"statusCode\":42}\0\0\0\0\0\0\0\0"),
            Err(UrlError::Status { .. })
        ));
    }
}
