//! Lambda's asynchronous-invocation rules as plain functions of an event's history and `now`
//! (no clock, no I/O): whether a try may start, what follows its outcome, where records go and
//! what they look like.

use serde::{Deserialize, Serialize};

use crate::config::EventsConfig;
use crate::manifest::AsyncSettings;

/// Lambda's defaults and bounds (MaximumRetryAttempts, MaximumEventAgeInSeconds).
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_MAX_AGE_S: u32 = 21600;
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<u32> = 60..=21600;

/// Where a record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Another function, invoked asynchronously with the record as its event.
    Function(String),
    /// An http:// URL: the record is POSTed, retried until it is taken (2xx).
    Url(String),
    /// A topic: the record is published to it as a CloudEvent (type
    /// `fnlet.invocation.success` or `fnlet.invocation.failure`), so functions chain.
    Topic(String),
}

impl Destination {
    /// A function ARN (`arn:aws:lambda:REGION:ACCOUNT:function:NAME`), an `http://` URL, or a
    /// topic (`topic:NAME`, an SNS topic ARN `arn:aws:sns:REGION:ACCOUNT:NAME`, or an
    /// EventBridge bus ARN `arn:aws:events:REGION:ACCOUNT:event-bus/NAME`).
    pub fn parse(s: &str) -> Result<Destination, String> {
        let topic = |name: &str| {
            if crate::triggers::manifest::valid_topic(name) {
                Ok(Destination::Topic(name.to_string()))
            } else {
                Err(format!(
                    "{s:?}: the topic must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
                ))
            }
        };
        if let Some(name) = s.strip_prefix("topic:") {
            return topic(name);
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let uri: http::Uri = s
                .parse()
                .map_err(|e| format!("{s:?} is not a valid URL: {e}"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(format!("{s:?} has no host"));
            }
            return Ok(Destination::Url(s.to_string()));
        }
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["arn", _, "lambda", _, _, "function", name]
            | ["arn", _, "lambda", _, _, "function", name, _] => {
                if crate::manifest::valid_name(name) {
                    Ok(Destination::Function((*name).to_string()))
                } else {
                    Err(format!("{s:?} does not name a valid function"))
                }
            }
            ["arn", _, "sns", _, _, name] => topic(name),
            ["arn", _, "events", _, _, bus] if bus.starts_with("event-bus/") => {
                topic(&bus["event-bus/".len()..])
            }
            ["arn", _, "sqs", ..] => Err(format!(
                "{s:?}: queue destinations are not built yet: use a function ARN, a topic or an \
                 http:// URL"
            )),
            _ => Err(format!(
                "{s:?} must be a function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME), a \
                 topic (topic:NAME or arn:aws:sns:REGION:ACCOUNT:NAME) or an http:// URL"
            )),
        }
    }
}

/// What the event invoke config API stored for a function (PutFunctionEventInvokeConfig).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvokeConfig {
    pub max_retry_attempts: Option<u32>,
    pub max_event_age_s: Option<u32>,
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    /// Seconds since the epoch (Lambda's `LastModified`).
    pub last_modified: f64,
}

/// The rules one function's events run under.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_retry_attempts: u32,
    pub max_age_ms: u64,
    pub retry_base_ms: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub on_success: Option<Destination>,
    pub on_failure: Option<Destination>,
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

impl Policy {
    /// The manifest's `[async]` over the agent's `[events]`; a config set through the API
    /// replaces the manifest's Lambda settings (retries, age, destinations) as a whole.
    pub fn resolve(m: &AsyncSettings, api: Option<&InvokeConfig>, d: &EventsConfig) -> Policy {
        let (retries, age, ok, fail) = match api {
            Some(c) => (
                c.max_retry_attempts,
                c.max_event_age_s,
                c.on_success.as_deref(),
                c.on_failure.as_deref(),
            ),
            None => (
                m.max_retry_attempts,
                m.max_event_age_s,
                m.on_success.as_deref(),
                m.on_failure.as_deref(),
            ),
        };
        // Both were checked when set; a bad one here means none.
        let dest = |d: Option<&str>| d.and_then(|d| Destination::parse(d).ok());
        Policy {
            max_retry_attempts: retries.unwrap_or(DEFAULT_RETRIES),
            max_age_ms: u64::from(age.unwrap_or(DEFAULT_MAX_AGE_S)) * 1000,
            retry_base_ms: ms(m.retry_base_s.unwrap_or(d.retry_base_s)),
            backoff_min_ms: ms(m.backoff_min_s.unwrap_or(d.backoff_min_s)),
            backoff_max_ms: ms(m.backoff_max_s.unwrap_or(d.backoff_max_s)),
            on_success: dest(ok),
            on_failure: dest(fail),
        }
    }

    /// The wait after the `n`th throttle or agent failure in a row (n >= 1): doubling from
    /// the minimum, capped at the maximum.
    pub fn backoff_ms(&self, n: u32) -> u64 {
        let doubled = self
            .backoff_min_ms
            .saturating_mul(1u64 << n.saturating_sub(1).min(40));
        doubled.min(self.backoff_max_ms).max(self.backoff_min_ms)
    }
}

/// Why an event ended without success (Lambda's `condition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Success,
    RetriesExhausted,
    EventAgeExceeded,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Success => "Success",
            Condition::RetriesExhausted => "RetriesExhausted",
            Condition::EventAgeExceeded => "EventAgeExceeded",
        }
    }
}

/// How a try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The function failed (an unhandled error, a timeout, out of memory, a crash).
    FunctionError,
    /// No room to run it (429), or the agent failed: requeued without using a retry.
    Throttled,
}

/// What follows a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Done(Condition),
    /// Try again at this time (ms since the epoch).
    RetryAt(u64),
}

/// The counts an event carries from try to try.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When the event was accepted (ms since the epoch).
    pub accepted_ms: u64,
    /// Function errors so far.
    pub errors: u32,
    /// Throttles and agent failures in a row.
    pub throttles: u32,
}

/// Checked before each try: an event older than its maximum age is not run.
pub fn may_start(p: &Policy, h: &History, now_ms: u64) -> Result<(), Condition> {
    if now_ms > h.accepted_ms.saturating_add(p.max_age_ms) {
        Err(Condition::EventAgeExceeded)
    } else {
        Ok(())
    }
}

/// What follows a try with `outcome`; `h` already counts it (errors or throttles + 1). A retry
/// that would start past the event's maximum age is not tried.
pub fn after(p: &Policy, h: &History, outcome: Outcome, now_ms: u64) -> Next {
    let wait = match outcome {
        Outcome::Success => return Next::Done(Condition::Success),
        Outcome::FunctionError if h.errors > p.max_retry_attempts => {
            return Next::Done(Condition::RetriesExhausted);
        }
        Outcome::FunctionError => p.retry_base_ms.saturating_mul(u64::from(h.errors)),
        Outcome::Throttled => p.backoff_ms(h.throttles),
    };
    let at = now_ms.saturating_add(wait);
    if at > h.accepted_ms.saturating_add(p.max_age_ms) {
        Next::Done(Condition::EventAgeExceeded)
    } else {
        Next::RetryAt(at)
    }
}

/// A payload as a record shows it: its JSON when it is JSON, else its text.
fn as_json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into()))
}

/// The last try's answer, for a record.
pub struct Response<'a> {
    pub function_error: bool,
    pub payload: &'a [u8],
}

/// A destination record, exactly as Lambda writes one.
pub fn record(
    condition: Condition,
    request_id: &str,
    function_arn: &str,
    invoke_count: u32,
    request_payload: &[u8],
    response: Option<Response<'_>>,
    now: time::OffsetDateTime,
) -> serde_json::Value {
    let timestamp = now
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default();
    let mut r = serde_json::json!({
        "version": "1.0",
        "timestamp": timestamp,
        "requestContext": {
            "requestId": request_id,
            "functionArn": format!("{function_arn}:$LATEST"),
            "condition": condition.as_str(),
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": as_json(request_payload),
    });
    if let Some(resp) = response {
        let mut ctx = serde_json::json!({ "statusCode": 200, "executedVersion": "$LATEST" });
        if resp.function_error {
            ctx["functionError"] = "Unhandled".into();
        }
        r["responseContext"] = ctx;
        r["responsePayload"] = as_json(resp.payload);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::resolve(&AsyncSettings::default(), None, &EventsConfig::default())
    }

    #[test]
    fn lambdas_defaults() {
        let p = policy();
        assert_eq!(p.max_retry_attempts, 2);
        assert_eq!(p.max_age_ms, 21600 * 1000);
        let h = |errors| History {
            accepted_ms: 0,
            errors,
            throttles: 0,
        };
        // 1 min before the 2nd try, 2 min before the 3rd, then the failure.
        assert_eq!(
            after(&p, &h(1), Outcome::FunctionError, 1000),
            Next::RetryAt(61_000)
        );
        assert_eq!(
            after(&p, &h(2), Outcome::FunctionError, 61_000),
            Next::RetryAt(181_000)
        );
        assert_eq!(
            after(&p, &h(3), Outcome::FunctionError, 181_000),
            Next::Done(Condition::RetriesExhausted)
        );
        assert_eq!(
            after(&p, &h(0), Outcome::Success, 5),
            Next::Done(Condition::Success)
        );
    }

    #[test]
    fn throttles_back_off_from_1s_to_5min_without_using_retries() {
        let p = policy();
        let waits: Vec<u64> = (1..=12).map(|n| p.backoff_ms(n)).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300].map(|s| s * 1000)
        );
        let h = History {
            accepted_ms: 0,
            errors: 2,
            throttles: 3,
        };
        assert_eq!(
            after(&p, &h, Outcome::Throttled, 10_000),
            Next::RetryAt(14_000)
        );
    }

    #[test]
    fn age_is_checked_before_each_try_and_a_retry_that_cannot_fit_is_not_tried() {
        let m = AsyncSettings {
            max_event_age_s: Some(60),
            retry_base_s: Some(40.0),
            ..Default::default()
        };
        let p = Policy::resolve(&m, None, &EventsConfig::default());
        let h = History {
            accepted_ms: 1_000,
            errors: 1,
            throttles: 0,
        };
        assert_eq!(may_start(&p, &h, 61_000), Ok(()));
        assert_eq!(may_start(&p, &h, 61_001), Err(Condition::EventAgeExceeded));
        assert_eq!(
            after(&p, &h, Outcome::FunctionError, 2_000),
            Next::RetryAt(42_000)
        );
        let h2 = History { errors: 2, ..h };
        // The second retry would start at 42 s + 80 s, past the 60 s age: not tried.
        assert_eq!(
            after(&p, &h2, Outcome::FunctionError, 42_000),
            Next::Done(Condition::EventAgeExceeded)
        );
    }

    #[test]
    fn the_api_config_replaces_the_manifests_lambda_settings() {
        let m = AsyncSettings {
            max_retry_attempts: Some(0),
            on_failure: Some("http://127.0.0.1:9/x".into()),
            retry_base_s: Some(1.0),
            ..Default::default()
        };
        let api = InvokeConfig {
            max_event_age_s: Some(120),
            ..Default::default()
        };
        let p = Policy::resolve(&m, Some(&api), &EventsConfig::default());
        assert_eq!(
            (
                p.max_retry_attempts,
                p.max_age_ms,
                p.on_failure,
                p.retry_base_ms
            ),
            (2, 120_000, None, 1000)
        );
    }

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("arn:aws:lambda:us-east-1:000000000000:function:sink"),
            Ok(Destination::Function("sink".into()))
        );
        assert_eq!(
            Destination::parse("http://127.0.0.1:8080/hook"),
            Ok(Destination::Url("http://127.0.0.1:8080/hook".into()))
        );
        assert_eq!(
            Destination::parse("arn:aws:sns:us-east-1:000000000000:orders"),
            Ok(Destination::Topic("orders".into()))
        );
        assert_eq!(
            Destination::parse("topic:orders.done"),
            Ok(Destination::Topic("orders.done".into()))
        );
        assert_eq!(
            Destination::parse("arn:aws:events:us-east-1:000000000000:event-bus/bus1"),
            Ok(Destination::Topic("bus1".into()))
        );
        for bad in [
            "topic:a/b",
            "topic:",
            "arn:aws:events:us-east-1:000000000000:rule/r",
            "sink",
            "http://",
            "arn:aws:lambda:us-east-1:000000000000:function:Bad Name",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
        let e = Destination::parse("arn:aws:sqs:us-east-1:000000000000:q").unwrap_err();
        assert!(e.contains("not built yet"), "{e}");
    }

    #[test]
    fn records_have_lambdas_shape() {
        let now = time::macros::datetime!(2026-12-04 22:00:01.5 UTC);
        let r = record(
            Condition::RetriesExhausted,
            "req-1",
            "arn:aws:lambda:us-east-1:000000000000:function:f",
            3,
            br#"{"a":1}"#,
            Some(Response {
                function_error: true,
                payload: br#"{"errorMessage":"boom","errorType":"Exception"}"#,
            }),
            now,
        );
        assert_eq!(
            r,
            serde_json::json!({
                "version": "1.0",
                "timestamp": "2026-12-04T22:00:01.500Z",
                "requestContext": {
                    "requestId": "req-1",
                    "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f:$LATEST",
                    "condition": "RetriesExhausted",
                    "approximateInvokeCount": 3
                },
                "requestPayload": {"a": 1},
                "responseContext": {
                    "statusCode": 200,
                    "executedVersion": "$LATEST",
                    "functionError": "Unhandled"
                },
                "responsePayload": {"errorMessage": "boom", "errorType": "Exception"}
            })
        );
    }
}
