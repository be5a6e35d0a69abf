//! CloudEvents 1.0 as topics take them over HTTP (binary, structured and batch content modes,
//! and plain bodies wrapped in an event) and as functions get them: the structured JSON form
//! for Lambda-mode functions, the data on stdin and `CE_*` variables for exec ones. No I/O:
//! bytes and headers in, events or the attribute that is wrong out.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value};

/// The structured content type, the batch one, and the binary mode's marker header.
pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";
pub const SPECVERSION_HEADER: &str = "ce-specversion";

/// Context attributes the spec defines (besides `data`); anything else is an extension.
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];
const OPTIONAL: [&str; 4] = ["datacontenttype", "dataschema", "subject", "time"];

/// The longest extension name taken (the spec advises 20; producers exceed it).
const MAX_NAME: usize = 64;

/// Why an event was refused: the attribute at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{attribute}: {reason}", .index.map(|i| format!("event {i}: ")).unwrap_or_default())]
pub struct EventError {
    /// Its place in a batch.
    pub index: Option<usize>,
    pub attribute: String,
    pub reason: String,
}

fn bad<T>(attribute: &str, reason: impl Into<String>) -> Result<T, EventError> {
    Err(EventError {
        index: None,
        attribute: attribute.to_string(),
        reason: reason.into(),
    })
}

/// An event's data as it came.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    None,
    Json(Value),
    Text(String),
    Binary(Vec<u8>),
}

/// A checked CloudEvent: attributes (strings, or the integers and booleans structured mode
/// allows for extensions) and data.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    pub attributes: BTreeMap<String, Value>,
    pub data: Data,
}

/// How a publish was sent (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Binary,
    Structured,
    Batch,
    Plain,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Binary => "binary",
            Mode::Structured => "structured",
            Mode::Batch => "batch",
            Mode::Plain => "plain",
        }
    }
}

/// Whether a media type says JSON (`application/json`, `text/json`, `...+json`).
fn is_json(content_type: &str) -> bool {
    let t = media_type(content_type);
    t == "application/json" || t == "text/json" || t.ends_with("+json")
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_text(content_type: &str) -> bool {
    let t = media_type(content_type);
    t.starts_with("text/") || t == "application/xml" || t.ends_with("+xml")
}

/// Control characters the spec forbids in strings (U+0000-U+001F, U+007F-U+009F).
fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c))
}

/// Attribute names: lower-case letters and digits.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

impl CloudEvent {
    /// The attribute's string form (what filters compare and `CE_*` variables hold).
    pub fn attribute(&self, name: &str) -> Option<String> {
        match self.attributes.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    pub fn id(&self) -> String {
        self.attribute("id").unwrap_or_default()
    }

    pub fn source(&self) -> String {
        self.attribute("source").unwrap_or_default()
    }

    /// Checks what every event must hold, whatever mode it came in.
    fn check(&self) -> Result<(), EventError> {
        for name in REQUIRED {
            match self.attributes.get(name) {
                None | Some(Value::Null) => return bad(name, "is required"),
                Some(Value::String(s)) if s.is_empty() => {
                    return bad(name, "must not be empty");
                }
                Some(Value::String(_)) => {}
                Some(_) => return bad(name, "must be a string"),
            }
        }
        if self.attributes["specversion"] != "1.0" {
            return bad(
                "specversion",
                format!(
                    "{} is not supported (only CloudEvents 1.0)",
                    self.attributes["specversion"]
                ),
            );
        }
        for (name, v) in &self.attributes {
            if !valid_name(name) {
                return bad(
                    name,
                    "is not a valid attribute name (lower-case letters and digits, at most 64)",
                );
            }
            let optional = OPTIONAL.contains(&name.as_str());
            match v {
                Value::String(s) if has_control(s) => {
                    return bad(name, "must not contain control characters");
                }
                Value::String(_) => {}
                _ if optional => return bad(name, "must be a string"),
                Value::Bool(_) => {}
                Value::Number(n) if n.is_i64() => {}
                _ => return bad(name, "must be a string, an integer or a boolean"),
            }
        }
        if let Some(t) = self.attribute("time")
            && t.parse::<jiff::Timestamp>().is_err()
        {
            return bad("time", format!("{t:?} is not an RFC 3339 timestamp"));
        }
        Ok(())
    }

    /// The structured JSON form (what a Lambda-mode function receives).
    pub fn to_json(&self) -> Value {
        let mut m: Map<String, Value> = self
            .attributes
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match &self.data {
            Data::None => {}
            Data::Json(v) => {
                m.insert("data".into(), v.clone());
            }
            Data::Text(s) => {
                m.insert("data".into(), Value::String(s.clone()));
            }
            Data::Binary(b) => {
                m.insert(
                    "data_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        }
        Value::Object(m)
    }

    /// An event from its structured JSON form.
    pub fn from_json(v: Value) -> Result<CloudEvent, EventError> {
        let Value::Object(mut m) = v else {
            return bad("event", "must be a JSON object");
        };
        let data = m.remove("data");
        let data_base64 = m.remove("data_base64");
        let attributes: BTreeMap<String, Value> =
            m.into_iter().filter(|(_, v)| !v.is_null()).collect();
        let mut e = CloudEvent {
            attributes,
            data: Data::None,
        };
        e.check()?;
        let json_data = e.attribute("datacontenttype").is_none_or(|t| is_json(&t));
        e.data = match (data, data_base64) {
            (Some(_), Some(_)) => {
                return bad("data_base64", "an event has data or data_base64, not both");
            }
            (Some(Value::Null), None) | (None, None) => Data::None,
            (None, Some(Value::String(b))) => {
                match base64::engine::general_purpose::STANDARD.decode(&b) {
                    Ok(bytes) => Data::Binary(bytes),
                    Err(err) => return bad("data_base64", format!("is not base64: {err}")),
                }
            }
            (None, Some(_)) => return bad("data_base64", "must be a base64 string"),
            (Some(Value::String(s)), None) if !json_data => Data::Text(s),
            (Some(v), None) => Data::Json(v),
        };
        Ok(e)
    }

    /// What an exec-mode function gets: the data's bytes on stdin, and `CE_<ATTRIBUTE>` for
    /// every attribute (extensions upper-cased).
    pub fn for_exec(&self) -> (Vec<u8>, Vec<(String, String)>) {
        let stdin = match &self.data {
            Data::None => Vec::new(),
            Data::Json(v) => serde_json::to_vec(v).unwrap_or_default(),
            Data::Text(s) => s.clone().into_bytes(),
            Data::Binary(b) => b.clone(),
        };
        let env = self
            .attributes
            .keys()
            .filter_map(|k| Some((format!("CE_{}", k.to_ascii_uppercase()), self.attribute(k)?)))
            .collect();
        (stdin, env)
    }
}

/// A stored event (its structured JSON) as an exec-mode function gets it; bytes that are not
/// an event pass as they are.
pub fn stored_for_exec(payload: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    match serde_json::from_slice(payload).map(CloudEvent::from_json) {
        Ok(Ok(e)) => e.for_exec(),
        _ => (payload.to_vec(), Vec::new()),
    }
}

/// Percent-decodes a binary-mode header value.
fn header_value(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Data of a body whose type is `content_type` (None: not said).
fn body_data(content_type: Option<&str>, body: &[u8]) -> Result<Data, EventError> {
    if body.is_empty() {
        return Ok(Data::None);
    }
    match content_type {
        Some(t) if is_json(t) => serde_json::from_slice(body).map(Data::Json).or_else(|e| {
            bad(
                "data",
                format!("the body is not the JSON its content type says: {e}"),
            )
        }),
        Some(t) if is_text(t) => Ok(match std::str::from_utf8(body) {
            Ok(s) => Data::Text(s.to_string()),
            Err(_) => Data::Binary(body.to_vec()),
        }),
        Some(_) => Ok(Data::Binary(body.to_vec())),
        // No type: JSON when it parses, else bytes.
        None => Ok(serde_json::from_slice(body)
            .map(Data::Json)
            .unwrap_or_else(|_| Data::Binary(body.to_vec()))),
    }
}

/// What a plain publish (no CloudEvents framing) becomes: `id` generated, `source` the topic's
/// path, `type` `fnlet.publish`, `time` now.
pub struct Plain<'a> {
    pub topic: &'a str,
    pub id: String,
    pub time: String,
}

/// The events of one HTTP request to a topic, in the mode its headers say.
pub fn from_http(
    headers: &http::HeaderMap,
    body: &[u8],
    plain: Plain<'_>,
) -> Result<(Mode, Vec<CloudEvent>), EventError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let media = content_type.map(media_type);
    if headers.contains_key(SPECVERSION_HEADER) {
        let mut attributes = BTreeMap::new();
        for (name, value) in headers {
            let Some(attr) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let v = header_value(value.as_bytes()).ok_or_else(|| EventError {
                index: None,
                attribute: attr.to_string(),
                reason: "the header is not percent-encoded UTF-8".into(),
            })?;
            attributes.insert(attr.to_string(), Value::String(v));
        }
        if let Some(t) = content_type {
            attributes.insert("datacontenttype".into(), Value::String(t.to_string()));
        }
        let mut e = CloudEvent {
            attributes,
            data: Data::None,
        };
        e.check()?;
        e.data = body_data(content_type, body)?;
        return Ok((Mode::Binary, vec![e]));
    }
    match media.as_deref() {
        Some(STRUCTURED) => {
            let v: Value = serde_json::from_slice(body)
                .or_else(|e| bad("event", format!("the body is not JSON: {e}")))?;
            Ok((Mode::Structured, vec![CloudEvent::from_json(v)?]))
        }
        Some(BATCH) => {
            let v: Value = serde_json::from_slice(body)
                .or_else(|e| bad("batch", format!("the body is not JSON: {e}")))?;
            let Value::Array(items) = v else {
                return bad("batch", "must be a JSON array of events");
            };
            let events = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    CloudEvent::from_json(v).map_err(|e| EventError {
                        index: Some(i),
                        ..e
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((Mode::Batch, events))
        }
        _ => {
            let mut attributes = BTreeMap::new();
            for (k, v) in [
                ("specversion", "1.0".to_string()),
                ("id", plain.id),
                ("source", format!("/v1/topics/{}", plain.topic)),
                ("type", "fnlet.publish".to_string()),
                ("time", plain.time),
            ] {
                attributes.insert(k.to_string(), Value::String(v));
            }
            let content_type = content_type.unwrap_or("application/json");
            attributes.insert(
                "datacontenttype".into(),
                Value::String(content_type.to_string()),
            );
            let e = CloudEvent {
                attributes,
                data: body_data(Some(content_type), body)?,
            };
            Ok((Mode::Plain, vec![e]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn plain() -> Plain<'static> {
        Plain {
            topic: "orders",
            id: "gen-1".into(),
            time: "2026-12-05T01:00:00Z".into(),
        }
    }

    #[test]
    fn binary_mode_reads_ce_headers_and_the_body() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "a%20b"),
            ("ce-source", "/shop"),
            ("ce-type", "order.created"),
            ("ce-tenant", "acme"),
            ("content-type", "application/json"),
        ]);
        let (mode, events) = from_http(&h, br#"{"n":1}"#, plain()).unwrap();
        assert_eq!(mode, Mode::Binary);
        let e = &events[0];
        assert_eq!(e.id(), "a b");
        assert_eq!(e.attribute("tenant").as_deref(), Some("acme"));
        assert_eq!(e.data, Data::Json(serde_json::json!({"n": 1})));
        let (stdin, env) = e.for_exec();
        assert_eq!(stdin, br#"{"n":1}"#);
        assert!(env.contains(&("CE_TENANT".into(), "acme".into())));
        assert!(env.contains(&("CE_SPECVERSION".into(), "1.0".into())));
        // A required attribute missing is named.
        let h = headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]);
        assert_eq!(from_http(&h, b"", plain()).unwrap_err().attribute, "source");
        let h = headers(&[
            ("ce-specversion", "0.3"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
        ]);
        assert_eq!(
            from_http(&h, b"", plain()).unwrap_err().attribute,
            "specversion"
        );
    }

    #[test]
    fn structured_and_batch_modes() {
        let h = headers(&[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )]);
        let body = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","count":3,"data_base64":"aGk="}"#;
        let (mode, events) = from_http(&h, body, plain()).unwrap();
        assert_eq!(mode, Mode::Structured);
        assert_eq!(events[0].data, Data::Binary(b"hi".to_vec()));
        assert_eq!(events[0].attribute("count").as_deref(), Some("3"));
        assert_eq!(events[0].to_json()["data_base64"], "aGk=");
        let e = from_http(
            &h,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#,
            plain(),
        )
        .unwrap_err();
        assert_eq!(e.attribute, "time");
        let e = from_http(
            &h,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad":"x"}"#,
            plain(),
        )
        .unwrap_err();
        assert_eq!(e.attribute, "Bad");
        let h = headers(&[("content-type", BATCH)]);
        let body = br#"[{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1}},
                        {"specversion":"1.0","id":"2","source":"s","type":"t","datacontenttype":"text/plain","data":"x"}]"#;
        let (mode, events) = from_http(&h, body, plain()).unwrap();
        assert_eq!(mode, Mode::Batch);
        assert_eq!(events[1].data, Data::Text("x".into()));
        assert_eq!(events[1].for_exec().0, b"x");
        let e = from_http(
            &h,
            br#"[{"specversion":"1.0","id":"1","source":"s","type":"t"},{"specversion":"1.0","id":"","source":"s","type":"t"}]"#,
            plain(),
        )
        .unwrap_err();
        assert_eq!((e.index, e.attribute.as_str()), (Some(1), "id"));
        assert!(e.to_string().starts_with("event 1: id:"), "{e}");
    }

    #[test]
    fn plain_bodies_are_wrapped_and_stored_events_round_trip() {
        let (mode, events) = from_http(&headers(&[]), br#"{"x":[1,2]}"#, plain()).unwrap();
        assert_eq!(mode, Mode::Plain);
        let e = &events[0];
        assert_eq!(e.id(), "gen-1");
        assert_eq!(e.source(), "/v1/topics/orders");
        let stored = serde_json::to_vec(&e.to_json()).unwrap();
        let (stdin, env) = stored_for_exec(&stored);
        assert_eq!(stdin, br#"{"x":[1,2]}"#);
        assert!(env.contains(&("CE_TYPE".into(), "fnlet.publish".into())));
        assert!(env.contains(&("CE_TIME".into(), "2026-12-05T01:00:00Z".into())));
        // A JSON content type with a body that is not JSON.
        let h = headers(&[("content-type", "application/json")]);
        assert_eq!(from_http(&h, b"{", plain()).unwrap_err().attribute, "data");
        // Control characters are refused.
        let ev = serde_json::json!({"specversion":"1.0","id":"1","source":"s","type":"t","subject":"a\u{1}"});
        assert_eq!(CloudEvent::from_json(ev).unwrap_err().attribute, "subject");
    }
}
