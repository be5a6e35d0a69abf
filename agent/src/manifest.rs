//! `fnlet.toml`: what a function is and what it may use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::FunctionDefaults;
use crate::network::policy::NetworkManifest;
use crate::triggers::{Trigger, TriggerManifest};

pub const MANIFEST_FILE: &str = "fnlet.toml";

/// How the agent talks to a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One sandboxed process per invocation: request on stdin, response on stdout.
    Exec,
    /// The AWS Lambda Runtime API.
    Lambda,
}

/// What to run: a program in the bundle, or a host interpreter with a script and arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entrypoint {
    Path(String),
    Command(Vec<String>),
}

/// The manifest as written by the user; missing numbers come from the agent's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Exec mode: what to run (required). Lambda mode: optional; without it (and without
    /// `runtime`) the bundle's own `bootstrap` runs, the `provided.al2023` convention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Entrypoint>,
    /// Lambda mode: a runtime the operator mapped to a host interpreter and runtime client in
    /// the agent's `[runtimes]` (e.g. "python3.11"), with `handler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Lambda mode with `runtime`: the handler the runtime client loads, e.g. "app.lambda_handler".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Instances at once; 0 refuses every call (Lambda's reserved concurrency 0).
    pub max_concurrency: Option<u32>,
    /// Lambda mode, and exec mode with `reuse_sandbox`: instances (kept sandboxes) kept warm
    /// even when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    /// Lambda mode: how long an idle instance is kept before it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<f64>,
    /// Lambda mode: how long a new instance may take to ask for its first event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_timeout_s: Option<f64>,
    /// Exec mode: a call runs in a sandbox kept from an earlier call of the same version (a
    /// new process each call; what the last call started is gone, its /tmp is not), as a
    /// Lambda execution environment is reused, instead of a fresh sandbox per call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse_sandbox: bool,
    /// Exec mode: the function's next process is started before its call, and waits for its
    /// request on stdin: its start-up (exec, dynamic loading, an interpreter and its imports)
    /// is off the caller's path. A kept sandbox (`reuse_sandbox`) starts it as soon as a call
    /// ends; a fresh one, in the sandbox built ahead (`sandbox.prepare_ahead`). It starts before
    /// its call is known, so `FNLET_REQUEST_ID` is empty in its environment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_ahead: bool,
    #[serde(default)]
    pub public: bool,
    /// Safe to run twice: a call whose host was lost mid-call may be run again elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Asynchronous invocation (Event invokes): retries, event age, destinations. The event
    /// invoke config API overrides it.
    #[serde(
        default,
        rename = "async",
        skip_serializing_if = "AsyncSettings::is_empty"
    )]
    pub async_settings: AsyncSettings,
    /// Outbound network: egress policy and limits (absent: the agent's `[network]` defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkManifest>,
    /// `[[triggers]]`: topics the function subscribes to and schedules that run it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<TriggerManifest>,
    /// What the AWS tools set (through the Lambda control plane) that fnlet keeps and shows
    /// back without acting on it.
    #[serde(default, skip_serializing_if = "AwsSettings::is_empty")]
    pub aws: AwsSettings,
}

/// `[aws]`: Lambda settings kept for the AWS tools (CreateFunction, UpdateFunctionConfiguration
/// and GetFunction show them) that do not change how fnlet runs the function.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// Lambda's execution role (`Role`): kept and shown; fnlet grants nothing by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The Lambda runtime named for a bundle that runs its own `bootstrap`
    /// (`provided.al2023`, `provided.al2`, `provided`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The handler named for such a bundle: its bootstrap sees it as `_HANDLER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
}

/// The Lambda runtimes that mean "the bundle's own `bootstrap`".
pub const PROVIDED_RUNTIMES: [&str; 3] = ["provided.al2023", "provided.al2", "provided"];

impl AwsSettings {
    pub fn is_empty(&self) -> bool {
        *self == AwsSettings::default()
    }
}

/// `[async]`: what happens to a function's Event invokes (Lambda's event invoke config, and
/// fnlet's waits).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncSettings {
    /// Retries after a function error, 0-2 (Lambda's MaximumRetryAttempts; default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retry_attempts: Option<u32>,
    /// How long an event may wait to run, 60-21600 s (MaximumEventAgeInSeconds; default 21600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_age_s: Option<u32>,
    /// Where a successful run's record goes: a function ARN or an http(s):// URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<String>,
    /// Where the record of an event that failed for good goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// The wait before retry n after a function error is n times this (default
    /// `events.retry_base_s`, 60: Lambda's 1 then 2 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_base_s: Option<f64>,
    /// Throttles and agent failures are requeued after this, doubling each time ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_min_s: Option<f64>,
    /// ... up to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max_s: Option<f64>,
}

impl AsyncSettings {
    pub fn is_empty(&self) -> bool {
        *self == AsyncSettings::default()
    }

    /// Checks the values, naming the field (`async.<field>`) in the error.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(n) = self.max_retry_attempts
            && n > 2
        {
            return Err(("async.max_retry_attempts", format!("{n} must be 0, 1 or 2")));
        }
        if let Some(a) = self.max_event_age_s
            && !(60..=21600).contains(&a)
        {
            return Err((
                "async.max_event_age_s",
                format!("{a} must be between 60 and 21600 seconds"),
            ));
        }
        for (field, v) in [
            ("async.retry_base_s", self.retry_base_s),
            ("async.backoff_min_s", self.backoff_min_s),
            ("async.backoff_max_s", self.backoff_max_s),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (0.001..=21600.0).contains(&v))
            {
                return Err((
                    field,
                    format!("{v} must be between 0.001 and 21600 seconds"),
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.backoff_min_s, self.backoff_max_s)
            && lo > hi
        {
            return Err((
                "async.backoff_min_s",
                format!("{lo} must not exceed backoff_max_s ({hi})"),
            ));
        }
        for (field, d) in [
            ("async.on_success", &self.on_success),
            ("async.on_failure", &self.on_failure),
        ] {
            if let Some(d) = d {
                crate::events::Destination::parse(d).map_err(|e| (field, e))?;
            }
        }
        Ok(())
    }
}

fn default_mode() -> Mode {
    Mode::Exec
}

/// A manifest with every default filled in: what the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub memory_mb: u64,
    pub cpus: f64,
    pub timeout_s: f64,
    pub max_concurrency: u32,
    pub min_instances: u32,
    pub keep_alive_s: f64,
    pub init_timeout_s: f64,
}

/// The file a Lambda bundle without `runtime` or `entrypoint` runs.
pub const BOOTSTRAP: &str = "bootstrap";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("fnlet.toml: {0}")]
    Syntax(String),
    #[error("fnlet.toml: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A `[[triggers]]` entry (0-based, in the file's order) and its field.
    #[error("fnlet.toml: triggers[{index}].{field}: {reason}")]
    Trigger {
        index: usize,
        field: &'static str,
        reason: String,
    },
}

/// Environment variables the agent sets itself.
const RESERVED_ENV_PREFIXES: [&str; 2] = ["FNLET_", "AWS_LAMBDA_"];

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| {
            ManifestError::Syntax(e.message().to_string() + &span_hint(text, e.span()))
        })?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |field, reason: String| Err(ManifestError::Invalid { field, reason });
        if !valid_name(&self.name) {
            return bad(
                "name",
                format!(
                    "{:?} must be 1-64 characters of a-z, 0-9, - and _, starting with a letter or digit",
                    self.name
                ),
            );
        }
        match (&self.entrypoint, self.mode) {
            (None, Mode::Exec) => {
                return bad(
                    "entrypoint",
                    "is required in exec mode (a program in the bundle, or [interpreter, script, ...])".into(),
                );
            }
            (None, Mode::Lambda) => {}
            (Some(Entrypoint::Path(p)), _) => {
                if p.is_empty() || p.contains('\0') {
                    return bad("entrypoint", "must not be empty".into());
                }
                if p.starts_with('/') || p.split('/').any(|c| c == "..") {
                    return bad(
                        "entrypoint",
                        format!("{p:?} must be a path inside the bundle"),
                    );
                }
            }
            (Some(Entrypoint::Command(argv)), _) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return bad("entrypoint", "the command must name a program".into());
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return bad("entrypoint", "arguments must not contain NUL bytes".into());
                }
            }
        }
        if let Some(m) = self.memory_mb
            && !(16..=65536).contains(&m)
        {
            return bad("memory_mb", format!("{m} must be between 16 and 65536"));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && (0.01..=1024.0).contains(&c))
        {
            return bad("cpus", format!("{c} must be between 0.01 and 1024"));
        }
        if let Some(t) = self.timeout_s
            && !(t.is_finite() && (0.001..=86400.0).contains(&t))
        {
            return bad(
                "timeout_s",
                format!("{t} must be between 0.001 and 86400 seconds"),
            );
        }
        if self.max_concurrency.is_some_and(|c| c > 10_000) {
            return bad("max_concurrency", "must be at most 10000".into());
        }
        if self.description.as_ref().is_some_and(|d| d.len() > 1024) {
            return bad("description", "must be at most 1024 bytes".into());
        }
        for (k, v) in &self.env {
            let ok_key = !k.is_empty()
                && k.len() <= 256
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
            if !ok_key {
                return bad("env", format!("{k:?} is not a valid variable name"));
            }
            if RESERVED_ENV_PREFIXES.iter().any(|p| k.starts_with(p)) {
                return bad("env", format!("{k:?} is reserved for the agent"));
            }
            if v.contains('\0') || v.len() > 4096 {
                return bad(
                    "env",
                    format!("value of {k} must be under 4096 bytes without NUL"),
                );
            }
        }
        if self.env.values().map(|v| v.len()).sum::<usize>() > 4096 * 16 {
            return bad("env", "the environment must total under 64 KiB".into());
        }
        self.async_settings
            .validate()
            .map_err(|(field, reason)| ManifestError::Invalid { field, reason })?;
        if let Some(n) = &self.network {
            n.validate()
                .map_err(|(field, reason)| ManifestError::Invalid { field, reason })?;
        }
        self.validated_triggers()?;
        self.validate_aws()?;
        self.validate_lambda()
    }

    /// The `[[triggers]]` checked (cron expressions parsed, zones found), in the file's order.
    pub fn validated_triggers(&self) -> Result<Vec<Trigger>, ManifestError> {
        if self.triggers.len() > crate::triggers::manifest::MAX_TRIGGERS {
            return Err(ManifestError::Invalid {
                field: "triggers",
                reason: format!(
                    "{} triggers; a function may have at most {}",
                    self.triggers.len(),
                    crate::triggers::manifest::MAX_TRIGGERS
                ),
            });
        }
        self.triggers
            .iter()
            .enumerate()
            .map(|(index, t)| {
                t.validate().map_err(|e| ManifestError::Trigger {
                    index,
                    field: e.field,
                    reason: e.reason,
                })
            })
            .collect()
    }

    fn validate_aws(&self) -> Result<(), ManifestError> {
        let bad = |field, reason: String| Err(ManifestError::Invalid { field, reason });
        let a = &self.aws;
        if let Some(r) = &a.role
            && (r.len() > 2048 || r.contains(['\0', '\n']))
        {
            return bad("aws.role", "must be at most 2048 bytes on one line".into());
        }
        if let Some(r) = &a.runtime {
            if !PROVIDED_RUNTIMES.contains(&r.as_str()) {
                return bad(
                    "aws.runtime",
                    format!("{r:?} must be one of {}", PROVIDED_RUNTIMES.join(", ")),
                );
            }
            if self.mode != Mode::Lambda || self.runtime.is_some() {
                return bad(
                    "aws.runtime",
                    "names a bundle's own bootstrap: it needs mode = \"lambda\" without runtime"
                        .into(),
                );
            }
        }
        if let Some(h) = &a.handler
            && (h.is_empty() || h.len() > 128 || h.contains(['\0', '\n']))
        {
            return bad("aws.handler", format!("{h:?} must be 1-128 characters"));
        }
        Ok(())
    }

    fn validate_lambda(&self) -> Result<(), ManifestError> {
        let bad = |field, reason: String| Err(ManifestError::Invalid { field, reason });
        if self.mode == Mode::Exec {
            for (field, set) in [
                ("runtime", self.runtime.is_some()),
                ("handler", self.handler.is_some()),
                (
                    "min_instances",
                    self.min_instances.is_some() && !self.reuse_sandbox,
                ),
                (
                    "keep_alive_s",
                    self.keep_alive_s.is_some() && !self.reuse_sandbox,
                ),
                ("init_timeout_s", self.init_timeout_s.is_some()),
            ] {
                if set {
                    return bad(
                        field,
                        "applies to mode = \"lambda\" only (exec mode starts a process per call)"
                            .into(),
                    );
                }
            }
            self.validate_keep_alive()?;
            return self.validate_min_instances();
        }
        if self.reuse_sandbox || self.start_ahead {
            let field = if self.reuse_sandbox {
                "reuse_sandbox"
            } else {
                "start_ahead"
            };
            return bad(
                field,
                "applies to mode = \"exec\" only (a Lambda instance always serves many calls)"
                    .into(),
            );
        }
        match (&self.runtime, &self.handler) {
            (Some(_), None) => return bad("handler", "is required with runtime".into()),
            (None, Some(_)) => {
                return bad(
                    "runtime",
                    "is required with handler (or leave both out and ship a bootstrap)".into(),
                );
            }
            _ => {}
        }
        if self.runtime.is_some() && self.entrypoint.is_some() {
            return bad(
                "entrypoint",
                "cannot be combined with runtime: the runtime says what runs".into(),
            );
        }
        if let Some(r) = &self.runtime
            && !valid_runtime_name(r)
        {
            return bad(
                "runtime",
                format!("{r:?} must be 1-64 characters of a-z, 0-9, '.', '-' and '_'"),
            );
        }
        if let Some(h) = &self.handler
            && (h.is_empty() || h.len() > 128 || h.contains(['\0', '/', ' ']))
        {
            return bad(
                "handler",
                format!("{h:?} must be 1-128 characters, without '/', spaces or NUL"),
            );
        }
        self.validate_keep_alive()?;
        if let Some(t) = self.init_timeout_s
            && !(t.is_finite() && (0.01..=900.0).contains(&t))
        {
            return bad(
                "init_timeout_s",
                format!("{t} must be between 0.01 and 900 seconds"),
            );
        }
        self.validate_min_instances()
    }

    /// Lambda instances, or kept exec sandboxes (`reuse_sandbox`), provisioned ahead.
    fn validate_min_instances(&self) -> Result<(), ManifestError> {
        let bad = |reason: String| {
            Err(ManifestError::Invalid {
                field: "min_instances",
                reason,
            })
        };
        if let (Some(min), Some(max)) = (self.min_instances, self.max_concurrency)
            && min > max
        {
            return bad(format!("{min} must not exceed max_concurrency ({max})"));
        }
        if self.min_instances.is_some_and(|m| m > 1000) {
            return bad("must be at most 1000".into());
        }
        Ok(())
    }

    fn validate_keep_alive(&self) -> Result<(), ManifestError> {
        if let Some(t) = self.keep_alive_s
            && !(t.is_finite() && (0.0..=86400.0).contains(&t))
        {
            return Err(ManifestError::Invalid {
                field: "keep_alive_s",
                reason: format!("{t} must be between 0 and 86400 seconds"),
            });
        }
        Ok(())
    }

    pub fn resolve(&self, d: &FunctionDefaults) -> Resolved {
        Resolved {
            memory_mb: self.memory_mb.unwrap_or(d.memory_mb),
            cpus: self.cpus.unwrap_or(d.cpus),
            timeout_s: self.timeout_s.unwrap_or(d.timeout_s),
            max_concurrency: self.max_concurrency.unwrap_or(d.max_concurrency),
            min_instances: self.min_instances.unwrap_or(0),
            keep_alive_s: self.keep_alive_s.unwrap_or(d.keep_alive_s),
            init_timeout_s: self.init_timeout_s.unwrap_or(d.init_timeout_s),
        }
    }
}

pub fn valid_runtime_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}

/// The manifest as TOML (what `fnlet describe` shows and fuzzing round-trips).
pub fn to_toml(m: &Manifest) -> Result<String, toml::ser::Error> {
    toml::to_string(m)
}

/// " (field `memory_mb`, line N)" for a toml error span: toml names the expected type, the
/// user wants the field.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(s) = span.filter(|s| s.start <= text.len()) else {
        return String::new();
    };
    let line_no = text[..s.start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !line.trim_start().starts_with('[') => {
            format!(
                " (field `{}`, line {line_no})",
                key.trim().trim_matches('"')
            )
        }
        _ => format!(" (line {line_no})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_manifest() {
        let m = Manifest::parse("name = \"hello\"\nentrypoint = \"hello.sh\"\n").unwrap();
        assert_eq!(m.mode, Mode::Exec);
        assert_eq!(m.entrypoint, Some(Entrypoint::Path("hello.sh".into())));
        let r = m.resolve(&FunctionDefaults::default());
        assert_eq!(r.memory_mb, 128);
    }

    #[test]
    fn interpreter_entrypoint() {
        let m = Manifest::parse("name = \"py\"\nentrypoint = [\"python3\", \"main.py\"]\nmemory_mb = 256\n[env]\nGREETING = \"hi\"\n").unwrap();
        assert_eq!(
            m.entrypoint,
            Some(Entrypoint::Command(vec![
                "python3".into(),
                "main.py".into()
            ]))
        );
        assert_eq!(m.env["GREETING"], "hi");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = Manifest::parse("name = \"x\"\nentrypoint = \"a\"\nmemory_mb = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_mb") || err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Manifest::parse("name = \"x\"\nentrypoint = \"a\"\nmemroy_mb = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("memroy_mb"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field) in [
            ("name = \"Bad Name\"\nentrypoint = \"a\"", "name"),
            ("name = \"x\"\nentrypoint = \"../a\"", "entrypoint"),
            ("name = \"x\"\nentrypoint = \"/bin/sh\"", "entrypoint"),
            ("name = \"x\"\nentrypoint = []", "entrypoint"),
            ("name = \"x\"\nentrypoint = \"a\"\ncpus = 0.0", "cpus"),
            (
                "name = \"x\"\nentrypoint = \"a\"\ntimeout_s = -1",
                "timeout_s",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\nmax_concurrency = 10001",
                "max_concurrency",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[env]\nFNLET_X = \"1\"",
                "env",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[env]\n\"A-B\" = \"1\"",
                "env",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[network]\negress = \"some\"",
                "network.egress",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[network]\negress = [\"10.0.0.1/8\"]",
                "network.egress",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[network]\nrate_mbit = 0",
                "network.rate_mbit",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\n[network]\negres = \"all\"",
                "egres",
            ),
        ] {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} -> {err}");
        }
    }

    #[test]
    fn async_settings_parse_round_trip_and_name_bad_fields() {
        let text = "name = \"a\"\nmode = \"lambda\"\n[async]\nmax_retry_attempts = 0\nmax_event_age_s = 60\non_failure = \"arn:aws:lambda:us-east-1:000000000000:function:sink\"\non_success = \"http://127.0.0.1:9/ok\"\nretry_base_s = 0.5\n";
        let m = Manifest::parse(text).unwrap();
        assert_eq!(m.async_settings.max_retry_attempts, Some(0));
        assert_eq!(Manifest::parse(&to_toml(&m).unwrap()).unwrap(), m);
        let plain = Manifest::parse("name = \"a\"\nentrypoint = \"x\"\n").unwrap();
        assert!(!to_toml(&plain).unwrap().contains("async"));
        for (body, field) in [
            ("max_retry_attempts = 3", "async.max_retry_attempts"),
            ("max_event_age_s = 59", "async.max_event_age_s"),
            ("max_event_age_s = 21601", "async.max_event_age_s"),
            (
                "on_failure = \"arn:aws:sqs:us-east-1:000000000000:q\"",
                "async.on_failure",
            ),
            ("on_success = \"nowhere\"", "async.on_success"),
            ("retry_base_s = -1", "async.retry_base_s"),
            (
                "backoff_min_s = 5\nbackoff_max_s = 1",
                "async.backoff_min_s",
            ),
            ("max_retries = 1", "max_retries"),
        ] {
            let err = Manifest::parse(&format!(
                "name = \"a\"\nentrypoint = \"x\"\n[async]\n{body}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(field), "{body:?} -> {err}");
        }
    }

    #[test]
    fn network_section_round_trips() {
        let m = Manifest::parse(
            "name = \"n\"\nentrypoint = \"a\"\n[network]\negress = [\"10.0.0.0/8:5432\", \"db.example:5432\"]\nrate_mbit = 10\n",
        )
        .unwrap();
        let again = Manifest::parse(&to_toml(&m).unwrap()).unwrap();
        assert_eq!(again, m);
        let m = Manifest::parse("name = \"n\"\nentrypoint = \"a\"\n[network]\negress = \"all\"\n")
            .unwrap();
        assert_eq!(
            m.network.unwrap().egress.unwrap().parse(),
            Ok(crate::network::policy::Egress::All)
        );
    }

    #[test]
    fn lambda_manifests() {
        let m = Manifest::parse("name = \"l\"\nmode = \"lambda\"\n").unwrap();
        assert_eq!(
            (m.mode, &m.entrypoint, &m.runtime),
            (Mode::Lambda, &None, &None)
        );
        let r = m.resolve(&FunctionDefaults::default());
        assert_eq!(r.min_instances, 0);
        assert!(r.keep_alive_s > 0.0);
        let m = Manifest::parse(
            "name = \"py\"\nmode = \"lambda\"\nruntime = \"python3.11\"\nhandler = \"app.lambda_handler\"\nmin_instances = 1\nkeep_alive_s = 2\n",
        )
        .unwrap();
        assert_eq!(m.handler.as_deref(), Some("app.lambda_handler"));
        // An exec function that reuses its sandbox has a keep-alive too.
        let m = Manifest::parse(
            "name = \"sh\"\nentrypoint = \"run.sh\"\nreuse_sandbox = true\nkeep_alive_s = 30\n",
        )
        .unwrap();
        assert!(m.reuse_sandbox);
        assert!(!m.start_ahead);
        assert_eq!(m.resolve(&FunctionDefaults::default()).keep_alive_s, 30.0);
        let m = Manifest::parse(
            "name = \"py\"\nentrypoint = \"run.py\"\nreuse_sandbox = true\nstart_ahead = true\n",
        )
        .unwrap();
        assert!(m.start_ahead);
        // Kept sandboxes can be provisioned ahead, as Lambda instances are.
        let m = Manifest::parse(
            "name = \"py\"\nentrypoint = \"run.py\"\nreuse_sandbox = true\nmin_instances = 2\n",
        )
        .unwrap();
        assert_eq!(m.resolve(&FunctionDefaults::default()).min_instances, 2);
        // A fresh sandbox per call starts its function ahead too.
        let m = Manifest::parse("name = \"sh\"\nentrypoint = \"run.sh\"\nstart_ahead = true\n")
            .unwrap();
        assert!(m.start_ahead && !m.reuse_sandbox);
        for (text, field) in [
            ("name = \"x\"\nmode = \"exec\"", "entrypoint"),
            (
                "name = \"x\"\nmode = \"lambda\"\nruntime = \"python3.11\"",
                "handler",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nhandler = \"a.b\"",
                "runtime",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nruntime = \"Py 3\"\nhandler = \"a.b\"",
                "runtime",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\nmin_instances = 1",
                "min_instances",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nmin_instances = 3\nmax_concurrency = 2",
                "min_instances",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\nreuse_sandbox = true\nmin_instances = 3\nmax_concurrency = 2",
                "min_instances",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nkeep_alive_s = -1",
                "keep_alive_s",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\ninit_timeout_s = 0",
                "init_timeout_s",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nreuse_sandbox = true",
                "reuse_sandbox",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\nkeep_alive_s = 5",
                "keep_alive_s",
            ),
            (
                "name = \"x\"\nmode = \"lambda\"\nstart_ahead = true",
                "start_ahead",
            ),
            (
                "name = \"x\"\nentrypoint = \"a\"\nreuse_sandbox = true\nkeep_alive_s = -1",
                "keep_alive_s",
            ),
        ] {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} -> {err}");
        }
    }

    #[test]
    fn triggers_round_trip_and_name_the_trigger() {
        let text = r#"
name = "f"
entrypoint = "run"

[[triggers]]
topic = "orders"
filter = { type = { prefix = "order." } }

[[triggers]]
schedule = "rate(5 minutes)"
payload = { job = "sweep" }
"#;
        let m = Manifest::parse(text).unwrap();
        assert_eq!(m.triggers.len(), 2);
        assert_eq!(m.validated_triggers().unwrap().len(), 2);
        assert_eq!(Manifest::parse(&to_toml(&m).unwrap()).unwrap(), m);
        let bad = text.replace("rate(5 minutes)", "cron(0 2 * * *)");
        let e = Manifest::parse(&bad).unwrap_err();
        assert!(
            matches!(
                &e,
                ManifestError::Trigger {
                    index: 1,
                    field: "schedule",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("fnlet.toml: triggers[1].schedule: cron(0 2 * * *) has 5 fields"),
            "{e}"
        );
    }
}
