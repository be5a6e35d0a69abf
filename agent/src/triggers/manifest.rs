//! `[[triggers]]` in `fnlet.toml`: what makes a function run besides a call. A topic
//! subscription (with an optional filter on CloudEvents attributes) or a schedule (EventBridge
//! Scheduler's `cron(...)`/`rate(...)`, or a Unix `cron` line), checked at deploy so a bad
//! expression fails the deploy naming the trigger and the field.

use std::collections::BTreeMap;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// One `[[triggers]]` entry as written. Exactly one of `topic`, `schedule` and `cron`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerManifest {
    /// Subscribe to a topic: every event published to it (that passes `filter`) runs the
    /// function as an async event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Topic triggers: CloudEvents attributes and extensions that must all match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, FilterMatch>,
    /// EventBridge Scheduler's syntax: `cron(min hour dom month dow [year])` or
    /// `rate(N minute|minutes|hour|hours|day|days)` (fnlet also takes `second|seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// A Unix cron line: 5 fields, or 6 with seconds first, or 7 with a year last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Schedules: the IANA time zone the expression is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Schedules: the event's `detail` (any TOML value, sent as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<toml::Value>,
    /// Schedules: fire at a random point within the tick's first tenth instead of on it
    /// (OpenWhisk's non-strict alarms), to spread load.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spread: bool,
}

/// How a filter attribute matches (Knative's dialects): `type = "order.created"` is exact,
/// `type = { prefix = "order." }` a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FilterMatch {
    Exact(String),
    Prefix(PrefixMatch),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixMatch {
    pub prefix: String,
}

impl FilterMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            FilterMatch::Exact(v) => value == v,
            FilterMatch::Prefix(p) => value.starts_with(&p.prefix),
        }
    }
}

/// A trigger that passed validation.
#[derive(Debug, Clone)]
pub enum Trigger {
    Topic {
        topic: String,
        filter: BTreeMap<String, FilterMatch>,
    },
    Schedule(Schedule),
}

/// A schedule: when it fires, in which zone, and what it sends.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression as written (`cron(...)`, `rate(...)` or the cron line): shown back and
    /// part of the schedule's identity.
    pub expression: String,
    pub kind: ScheduleKind,
    /// The zone's name as written ("UTC" when none).
    pub timezone_name: String,
    pub timezone: TimeZone,
    pub payload: Option<serde_json::Value>,
    pub spread: bool,
}

#[derive(Debug, Clone)]
pub enum ScheduleKind {
    Cron(Box<Cron>),
    /// Every `period`, on the multiples of it since the Unix epoch, so every host computes the
    /// same ticks without agreeing on a start.
    Rate(Duration),
}

impl Schedule {
    /// The first tick strictly after `t`, or None when the expression has no further tick
    /// (a cron with a past year).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            ScheduleKind::Rate(period) => {
                let p = i128::try_from(period.as_nanos()).ok()?;
                let now = t.as_nanosecond();
                let next = (now.div_euclid(p) + 1) * p;
                Timestamp::from_nanosecond(next).ok()
            }
            ScheduleKind::Cron(cron) => {
                let zoned = t.to_zoned(self.timezone.clone());
                cron.find_next_occurrence(&zoned, false)
                    .ok()
                    .map(|z| z.timestamp())
            }
        }
    }

    /// The next `n` ticks after `t` (for `fnlet triggers` and tests).
    pub fn upcoming(&self, mut t: Timestamp, n: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// A trigger's validation error: the field (`topic`, `filter`, `schedule`, `cron`, `timezone`,
/// ...) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerError {
    pub field: &'static str,
    pub reason: String,
}

fn err<T>(field: &'static str, reason: impl Into<String>) -> Result<T, TriggerError> {
    Err(TriggerError {
        field,
        reason: reason.into(),
    })
}

/// Topic names: 1-128 characters of `A-Za-z0-9._-`, so they fit a URL path segment and a
/// NATS subject token unescaped.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// The most triggers one function may declare.
pub const MAX_TRIGGERS: usize = 64;

impl TriggerManifest {
    pub fn validate(&self) -> Result<Trigger, TriggerError> {
        let kinds = [
            self.topic.is_some(),
            self.schedule.is_some(),
            self.cron.is_some(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            1 => {}
            0 => return err("topic", "a trigger needs one of topic, schedule or cron"),
            _ => {
                return err(
                    "topic",
                    "a trigger takes only one of topic, schedule or cron (declare another [[triggers]])",
                );
            }
        }
        if let Some(topic) = &self.topic {
            for (field, set) in [
                ("timezone", self.timezone.is_some()),
                ("payload", self.payload.is_some()),
                ("spread", self.spread),
            ] {
                if set {
                    return err(field, "applies to schedules only, not to a topic");
                }
            }
            if !valid_topic(topic) {
                return err(
                    "topic",
                    format!(
                        "{topic:?} must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
                    ),
                );
            }
            for (attribute, m) in &self.filter {
                if !valid_attribute_name(attribute) {
                    return err(
                        "filter",
                        format!(
                            "{attribute:?} is not a CloudEvents attribute name (1-20 characters of a-z and 0-9)"
                        ),
                    );
                }
                if let FilterMatch::Prefix(p) = m
                    && p.prefix.is_empty()
                {
                    return err(
                        "filter",
                        format!(
                            "{attribute}: an empty prefix matches everything; leave the attribute out"
                        ),
                    );
                }
            }
            return Ok(Trigger::Topic {
                topic: topic.clone(),
                filter: self.filter.clone(),
            });
        }
        if !self.filter.is_empty() {
            return err("filter", "applies to topic triggers only");
        }
        let timezone_name = self.timezone.clone().unwrap_or_else(|| "UTC".into());
        let timezone = TimeZone::get(&timezone_name).map_err(|e| TriggerError {
            field: "timezone",
            reason: format!("{timezone_name:?} is not a known IANA time zone ({e})"),
        })?;
        let (field, expression, kind) = match (&self.schedule, &self.cron) {
            (Some(s), _) => ("schedule", s.clone(), parse_schedule(s)?),
            (_, Some(c)) => (
                "cron",
                c.clone(),
                ScheduleKind::Cron(Box::new(parse_cron(c)?)),
            ),
            (None, None) => return err("schedule", "a schedule needs schedule or cron"),
        };
        let payload = match &self.payload {
            None => None,
            Some(v) if !all_finite(v) => {
                return err("payload", "numbers must be finite (JSON has no nan or inf)");
            }
            Some(v) => Some(serde_json::to_value(v).map_err(|e| TriggerError {
                field: "payload",
                reason: format!("cannot be sent as JSON: {e}"),
            })?),
        };
        let schedule = Schedule {
            expression,
            kind,
            timezone_name,
            timezone,
            payload,
            spread: self.spread,
        };
        if schedule.next_after(Timestamp::now()).is_none() {
            return err(field, "never fires again (every tick is in the past)");
        }
        Ok(Trigger::Schedule(schedule))
    }
}

fn all_finite(v: &toml::Value) -> bool {
    match v {
        toml::Value::Float(f) => f.is_finite(),
        toml::Value::Array(a) => a.iter().all(all_finite),
        toml::Value::Table(t) => t.values().all(all_finite),
        _ => true,
    }
}

/// CloudEvents attribute names: lower-case letters and digits, at most 20 (the spec's advice
/// for extensions, and every context attribute fits it).
fn valid_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The shortest period a schedule may have: a tick per second is what the cluster's
/// once-per-tick bookkeeping is built and tested for.
const MIN_RATE: Duration = Duration::from_secs(1);

/// `cron(...)` or `rate(...)`, EventBridge Scheduler's syntax.
fn parse_schedule(s: &str) -> Result<ScheduleKind, TriggerError> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix("rate(").and_then(|r| r.strip_suffix(')')) {
        return parse_rate(inner).map(ScheduleKind::Rate);
    }
    if let Some(inner) = s.strip_prefix("cron(").and_then(|r| r.strip_suffix(')')) {
        return parse_eventbridge_cron(inner).map(|c| ScheduleKind::Cron(Box::new(c)));
    }
    err(
        "schedule",
        format!(
            "{s:?} must be cron(minutes hours day-of-month month day-of-week year) or rate(value unit); for a Unix cron line use cron = \"...\""
        ),
    )
}

fn parse_rate(inner: &str) -> Result<Duration, TriggerError> {
    let mut words = inner.split_whitespace();
    let (Some(value), Some(unit), None) = (words.next(), words.next(), words.next()) else {
        return err(
            "schedule",
            format!("rate({inner}) must be rate(value unit), e.g. rate(5 minutes)"),
        );
    };
    let value: u64 = match value.parse() {
        Ok(v) if v > 0 => v,
        _ => {
            return err(
                "schedule",
                format!("rate({inner}): {value:?} must be a positive whole number"),
            );
        }
    };
    let unit_s = match unit {
        "second" | "seconds" => 1,
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86400,
        _ => {
            return err(
                "schedule",
                format!("rate({inner}): {unit:?} must be minute(s), hour(s), day(s) or second(s)"),
            );
        }
    };
    let period = value
        .checked_mul(unit_s)
        .filter(|s| *s <= 366 * 86400)
        .map(Duration::from_secs);
    match period {
        Some(p) if p >= MIN_RATE => Ok(p),
        _ => err(
            "schedule",
            format!("rate({inner}) must be between 1 second and 366 days"),
        ),
    }
}

/// EventBridge's six fields (minutes hours day-of-month month day-of-week year), day of week
/// 1-7 = SUN-SAT and `?` in one of the day fields: Quartz's reading, with the seconds fixed at 0.
fn parse_eventbridge_cron(inner: &str) -> Result<Cron, TriggerError> {
    let fields: Vec<&str> = inner.split_whitespace().collect();
    if fields.len() != 6 {
        return err(
            "schedule",
            format!(
                "cron({inner}) has {} fields; EventBridge's cron has 6: minutes hours day-of-month month day-of-week year",
                fields.len()
            ),
        );
    }
    if fields[2] != "?" && fields[4] != "?" {
        return err(
            "schedule",
            format!(
                "cron({inner}): one of day-of-month and day-of-week must be '?' (EventBridge cannot take both)"
            ),
        );
    }
    let quartz = format!("0 {}", fields.join(" "));
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Required)
        .alternative_weekdays(true)
        .sloppy_ranges(true)
        .build()
        .parse(&quartz)
        .map_err(|e| TriggerError {
            field: "schedule",
            reason: format!("cron({inner}): {e}"),
        })
}

/// A Unix cron line (croner's reading: seconds optional first, a year optional last).
fn parse_cron(line: &str) -> Result<Cron, TriggerError> {
    let n = line.split_whitespace().count();
    if !(5..=7).contains(&n) {
        return err(
            "cron",
            format!(
                "{line:?} has {n} fields; a cron line has 5 (minute hour day-of-month month day-of-week), 6 with seconds first or 7 with a year last"
            ),
        );
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Optional)
        .build()
        .parse(line)
        .map_err(|e| TriggerError {
            field: "cron",
            reason: format!("{line:?}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Trigger, TriggerError> {
        let t: TriggerManifest = toml::from_str(toml_text).expect("toml");
        t.validate()
    }

    fn schedule(toml_text: &str) -> Schedule {
        match parse(toml_text) {
            Ok(Trigger::Schedule(s)) => s,
            other => panic!("not a schedule: {other:?}"),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn topics_and_filters() {
        let Ok(Trigger::Topic { topic, filter }) = parse(
            r#"topic = "orders"
filter = { type = { prefix = "order." }, source = "shop" }"#,
        ) else {
            panic!("not a topic")
        };
        assert_eq!(topic, "orders");
        assert!(filter["type"].matches("order.created"));
        assert!(!filter["type"].matches("invoice.created"));
        assert!(filter["source"].matches("shop"));
        assert!(!filter["source"].matches("shop2"));
        let bad = |t: &str| parse(t).unwrap_err();
        assert_eq!(bad(r#"topic = "a/b""#).field, "topic");
        assert_eq!(bad(r#"topic = """#).field, "topic");
        assert_eq!(
            bad(r#"topic = "x"
filter = { Type = "a" }"#)
            .field,
            "filter"
        );
        assert_eq!(
            bad(r#"topic = "x"
filter = { type = { prefix = "" } }"#)
            .field,
            "filter"
        );
        assert_eq!(
            bad(r#"topic = "x"
timezone = "UTC""#)
            .field,
            "timezone"
        );
        assert_eq!(
            bad(r#"cron = "* * * * *"
filter = { type = "a" }"#)
            .field,
            "filter"
        );
        assert_eq!(bad("spread = true").field, "topic");
        assert_eq!(
            bad(r#"topic = "x"
cron = "* * * * *""#)
            .field,
            "topic"
        );
        // An unknown key inside a prefix match is refused by serde (a typo is not an exact match).
        assert!(
            toml::from_str::<TriggerManifest>(
                r#"topic = "x"
filter = { type = { prefx = "a" } }"#
            )
            .is_err()
        );
    }

    #[test]
    fn rates_tick_on_multiples_of_their_period() {
        let s = schedule(r#"schedule = "rate(5 minutes)""#);
        assert_eq!(
            s.upcoming(ts("2026-12-05T01:02:03Z"), 2),
            vec![ts("2026-12-05T01:05:00Z"), ts("2026-12-05T01:10:00Z")]
        );
        // A tick is strictly after: at 01:05:00 the next is 01:10:00.
        assert_eq!(
            s.next_after(ts("2026-12-05T01:05:00Z")),
            Some(ts("2026-12-05T01:10:00Z"))
        );
        let s = schedule(r#"schedule = "rate(1 second)""#);
        assert_eq!(
            s.next_after(ts("2026-12-05T01:02:03.5Z")),
            Some(ts("2026-12-05T01:02:04Z"))
        );
        for bad in [
            "rate(0 minutes)",
            "rate(5)",
            "rate(5 weeks)",
            "rate(-1 hours)",
            "rate(400 days)",
            "rate(1 minute",
        ] {
            let e = parse(&format!("schedule = {bad:?}")).unwrap_err();
            assert_eq!(e.field, "schedule", "{bad}");
        }
    }

    #[test]
    fn eventbridge_cron_reads_quartz_weekdays() {
        // 02:00 every day.
        let s = schedule(r#"schedule = "cron(0 2 * * ? *)""#);
        assert_eq!(
            s.next_after(ts("2026-12-05T01:00:00Z")),
            Some(ts("2026-12-05T02:00:00Z"))
        );
        // Day of week 2 is Monday in EventBridge (1 = Sunday): 2026-12-07 is a Monday.
        let s = schedule(r#"schedule = "cron(30 9 ? * 2 *)""#);
        assert_eq!(
            s.next_after(ts("2026-12-05T00:00:00Z")),
            Some(ts("2026-12-07T09:30:00Z"))
        );
        let s = schedule(r#"schedule = "cron(0/15 * * * ? *)""#);
        assert_eq!(
            s.upcoming(ts("2026-12-05T01:01:00Z"), 2),
            vec![ts("2026-12-05T01:15:00Z"), ts("2026-12-05T01:30:00Z")]
        );
        for bad in [
            "cron(0 2 * * *)",
            "cron(0 2 * * 1 *)",
            "cron(61 2 * * ? *)",
            "cron(0 2 * * ? 1999)",
            "every day",
        ] {
            let e = parse(&format!("schedule = {bad:?}")).unwrap_err();
            assert_eq!(e.field, "schedule", "{bad}: {}", e.reason);
        }
    }

    #[test]
    fn unix_cron_lines_with_optional_seconds() {
        let s = schedule(r#"cron = "*/5 * * * *""#);
        assert_eq!(
            s.next_after(ts("2026-12-05T01:02:03Z")),
            Some(ts("2026-12-05T01:05:00Z"))
        );
        let s = schedule(r#"cron = "* * * * * *""#);
        assert_eq!(
            s.next_after(ts("2026-12-05T01:02:03.2Z")),
            Some(ts("2026-12-05T01:02:04Z"))
        );
        for bad in ["* * * *", "60 * * * *", "* * * * * * * *", "not a cron"] {
            let e = parse(&format!("cron = {bad:?}")).unwrap_err();
            assert_eq!(e.field, "cron", "{bad}: {}", e.reason);
        }
    }

    #[test]
    fn time_zones_and_dst() {
        // 02:30 Europe/Berlin every day. On 2027-03-28 clocks go from 02:00 to 03:00 (CET ->
        // CEST): that day has no 02:30.
        let s = schedule(
            r#"cron = "30 2 * * *"
timezone = "Europe/Berlin""#,
        );
        // The day without 02:30 fires once, when the gap ends (03:00 CEST = 01:00 UTC), as
        // Vixie cron does; then 02:30 CEST (UTC+2).
        assert_eq!(
            s.upcoming(ts("2027-03-26T12:00:00Z"), 3),
            vec![
                ts("2027-03-27T01:30:00Z"),
                ts("2027-03-28T01:00:00Z"),
                ts("2027-03-29T00:30:00Z")
            ]
        );
        // On 2026-10-25 02:00-03:00 happens twice (CEST -> CET): 02:30 fires once, the first
        // time (CEST), then 02:30 CET (UTC+1) the next days.
        assert_eq!(
            s.upcoming(ts("2026-10-24T12:00:00Z"), 3),
            vec![
                ts("2026-10-25T00:30:00Z"),
                ts("2026-10-26T01:30:00Z"),
                ts("2026-10-27T01:30:00Z")
            ]
        );
        let e = parse(
            r#"cron = "* * * * *"
timezone = "Mars/Olympus""#,
        )
        .unwrap_err();
        assert_eq!(e.field, "timezone");
    }

    #[test]
    fn payload_becomes_json() {
        let s = schedule(
            r#"schedule = "rate(1 hour)"
payload = { job = "nightly", n = 3, tags = ["a"] }"#,
        );
        assert_eq!(
            s.payload,
            Some(serde_json::json!({"job": "nightly", "n": 3, "tags": ["a"]}))
        );
        let e = parse(
            r#"schedule = "rate(1 hour)"
payload = { x = [nan] }"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "payload");
    }
}
