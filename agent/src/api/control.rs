//! Lambda's control plane (botocore's `lambda` 2015-03-31 model): CreateFunction,
//! GetFunction(Configuration), ListFunctions, UpdateFunctionCode/Configuration,
//! DeleteFunction, PublishVersion, ListVersionsByFunction, GetFunctionCodeSigningConfig, so
//! that the AWS CLI, the SDKs and IaC tools manage fnlet functions.
//!
//! There is no second registry: every call reads and writes the store (and the manifest in
//! each version), as `fnlet deploy` does. Lambda's model maps onto fnlet's thus: `$LATEST` is
//! the active version; every change (code or configuration) records a new numbered version,
//! immutable as Lambda's published versions are, so PublishVersion names the active one. A
//! zip without `fnlet.toml` gets one made from the call's fields; a zip with one must agree
//! with the fields the call gives.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::lambda::LambdaError;
use super::{App, AppError, blocking, read_body};
use crate::bundle;
use crate::manifest::{MANIFEST_FILE, Manifest, ManifestError, Mode, PROVIDED_RUNTIMES};
use crate::pool::function_arn;
use crate::store::{FunctionRecord, VersionRecord};

type Shared = State<Arc<App>>;

/// What a change through this API is waiting for (replication to `cluster.replicas` hosts):
/// Lambda's `Pending` state after CreateFunction, `InProgress` update status after an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Create,
    Change,
}

/// Functions with a change in progress. Only a change that is still going on is here: on a
/// single agent a change is whole when its call answers.
#[derive(Debug, Default)]
pub struct Updates(Mutex<HashMap<String, Update>>);

impl Updates {
    fn get(&self, name: &str) -> Option<Update> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }

    /// Forgets a removed function.
    pub fn forget(&self, name: &str) {
        self.set(name, None);
    }

    fn set(&self, name: &str, u: Option<Update>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match u {
            Some(u) => m.insert(name.to_string(), u),
            None => m.remove(name),
        };
    }
}

/// The architecture this host runs, as Lambda names it.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "x86_64",
    }
}

/// Lambda's `LastModified`: `2026-12-05T01:16:46.123+0000`.
fn last_modified(rfc3339: &str) -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000"
    );
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&f).ok())
        .unwrap_or_else(|| rfc3339.to_string())
}

/// A revision id that changes with every version: a UUID-shaped digest of it.
fn revision_id(v: &VersionRecord) -> String {
    let h = hex::encode(Sha256::digest(
        format!("{}/{}/{}/{}", v.name, v.version, v.sha256, v.created_at).as_bytes(),
    ));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Lambda's `CodeSha256`: the archive's base64 sha256 when it came through this API, else the
/// bundle's content address in base64.
fn code_sha256(v: &VersionRecord) -> String {
    v.code_sha256.clone().unwrap_or_else(|| {
        hex::decode(&v.sha256)
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .unwrap_or_else(|_| v.sha256.clone())
    })
}

/// The Lambda runtime a manifest means: its configured runtime, the `provided.*` it was
/// created with, `provided.al2023` for a bootstrap; none for an exec-mode function.
fn runtime_of(m: &Manifest) -> Option<String> {
    match m.mode {
        Mode::Exec => None,
        Mode::Lambda => m.runtime.clone().or_else(|| {
            if m.entrypoint.is_some() {
                None
            } else {
                Some(
                    m.aws
                        .runtime
                        .clone()
                        .unwrap_or_else(|| PROVIDED_RUNTIMES[0].to_string()),
                )
            }
        }),
    }
}

fn handler_of(m: &Manifest) -> Option<String> {
    m.handler.clone().or_else(|| m.aws.handler.clone())
}

/// Which version a call means: `$LATEST` (the active one) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qualified {
    Latest,
    Number(u64),
}

impl Qualified {
    fn label(self) -> String {
        match self {
            Qualified::Latest => "$LATEST".into(),
            Qualified::Number(n) => n.to_string(),
        }
    }
}

/// What a qualifier names: a version (or $LATEST), or an alias by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    Version(Qualified),
    Alias(String),
}

/// Lambda's alias names: 1-128 of letters, digits, - and _, not all digits.
fn valid_alias(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 128
        && a.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && !a.bytes().all(|c| c.is_ascii_digit())
}

fn named(raw: Option<&str>) -> Result<Named, LambdaError> {
    match raw {
        Some(a) if valid_alias(a) => Ok(Named::Alias(a.to_string())),
        other => qualified(other).map(Named::Version),
    }
}

/// A function's configuration as Lambda shows it (`FunctionConfiguration`).
fn configuration(app: &App, rec: &FunctionRecord, v: &VersionRecord, q: Qualified) -> Value {
    let m = &v.manifest;
    let r = m.resolve(&app.config.defaults);
    let arn = function_arn(&app.config, &rec.name);
    let failed = app.router.registry.failed(&rec.name);
    let update = app.updates.get(&rec.name);
    let (state, last_update) = match (&failed, update) {
        (Some(_), _) => ("Failed", "Failed"),
        (None, Some(Update::Create)) => ("Pending", "InProgress"),
        (None, Some(Update::Change)) => ("Active", "InProgress"),
        (None, None) => ("Active", "Successful"),
    };
    let mut c = json!({
        "FunctionName": rec.name,
        "FunctionArn": match q {
            Qualified::Latest => arn.clone(),
            Qualified::Number(n) => format!("{arn}:{n}"),
        },
        "CodeSize": v.size_bytes,
        "Description": m.description.clone().unwrap_or_default(),
        "Timeout": r.timeout_s.ceil() as u64,
        "MemorySize": r.memory_mb,
        "LastModified": last_modified(&v.created_at),
        "CodeSha256": code_sha256(v),
        "Version": q.label(),
        "TracingConfig": { "Mode": "PassThrough" },
        "RevisionId": revision_id(v),
        "State": state,
        "LastUpdateStatus": last_update,
        "PackageType": "Zip",
        "Architectures": [host_architecture()],
        "EphemeralStorage": { "Size": 512 },
        "SnapStart": { "ApplyOn": "None", "OptimizationStatus": "Off" },
        "LoggingConfig": { "LogFormat": "Text", "LogGroup": format!("/aws/lambda/{}", rec.name) },
    });
    if let Some(rt) = runtime_of(m) {
        c["Runtime"] = rt.into();
    }
    if let Some(h) = handler_of(m) {
        c["Handler"] = h.into();
    }
    if let Some(role) = &m.aws.role {
        c["Role"] = role.clone().into();
    }
    if !m.env.is_empty() {
        c["Environment"] = json!({ "Variables": m.env });
    }
    if let Some(why) = failed {
        c["StateReason"] = why.clone().into();
        c["StateReasonCode"] = "InternalError".into();
        c["LastUpdateStatusReason"] = why.into();
    }
    c
}

/// An agent error as the Lambda API answers it.
fn lambda_error(e: AppError) -> LambdaError {
    let error_type = match e.status {
        StatusCode::NOT_FOUND => "ResourceNotFoundException",
        StatusCode::CONFLICT => "ResourceConflictException",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestTooLargeException",
        StatusCode::REQUEST_TIMEOUT => "RequestTimeoutException",
        s if s.is_client_error() => "InvalidParameterValueException",
        _ => "ServiceException",
    };
    let status = if e.status.is_server_error() {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        e.status
    };
    LambdaError::new(status, error_type, e.message)
}

fn conflict(message: impl Into<String>) -> LambdaError {
    LambdaError::new(StatusCode::CONFLICT, "ResourceConflictException", message)
}

/// The caller must hold the admin token or sign with an access key; the access key it signed
/// with, if it did.
fn authorize(
    app: &App,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<Option<crate::auth::keys::KeyInfo>, LambdaError> {
    if super::authorized(app, &parts.headers) {
        return Ok(None);
    }
    let id = app
        .keys
        .verify(
            &parts.method,
            &parts.uri,
            &parts.headers,
            body,
            std::time::SystemTime::now(),
        )
        .map_err(|e| LambdaError::new(e.status(), e.error_type(), e.to_string()))?;
    Ok(app.keys.get(&id))
}

/// The control plane needs a `deploy` or `admin` key, for the function the call is about
/// (None: all of them, as ListFunctions).
fn check_scope(
    app: &App,
    key: &Option<crate::auth::keys::KeyInfo>,
    function: Option<&str>,
    operation: &str,
) -> Result<(), LambdaError> {
    match key {
        Some(k) if !k.allows(crate::auth::keys::Scope::Deploy, function) => {
            let resource = match function {
                Some(f) => function_arn(&app.config, f),
                None => format!(
                    "arn:aws:lambda:{}:{}:function:*",
                    app.config.lambda.region, app.config.lambda.account_id
                ),
            };
            Err(LambdaError::new(
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
                format!(
                    "access key {} ({} scope{}) is not authorized to perform: lambda:{operation} on resource: {resource}",
                    k.access_key_id,
                    k.scope.as_str(),
                    if k.functions.is_empty() {
                        String::new()
                    } else {
                        format!(", functions {}", k.functions.join(", "))
                    }
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// A function name as the control plane takes it (a name, partial ARN or ARN, with a
/// qualifier where `qualifier_ok`), checked against fnlet's names.
fn function_name(raw: &str) -> Result<(String, Option<String>), LambdaError> {
    let (name, q) = super::parse_function_name(raw).ok_or_else(|| {
        LambdaError::invalid(format!(
            "1 validation error detected: Value '{raw}' at 'functionName' failed to satisfy constraint: a function name, partial ARN or ARN"
        ))
    })?;
    if !crate::manifest::valid_name(&name) {
        return Err(LambdaError::invalid(format!(
            "FunctionName: {name:?} is not a fnlet function name: 1-64 characters of a-z, 0-9, - and _, starting with a letter or digit"
        )));
    }
    Ok((name, q))
}

fn qualified(raw: Option<&str>) -> Result<Qualified, LambdaError> {
    match raw {
        None | Some("$LATEST") => Ok(Qualified::Latest),
        Some(q) => match q.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Qualified::Number(n)),
            _ => Err(LambdaError::invalid(format!(
                "Qualifier: {q:?} must be $LATEST, a version number or an alias name"
            ))),
        },
    }
}

/// The function's record and the version `q` names, or Lambda's 404.
async fn lookup(
    app: &App,
    name: &str,
    q: Qualified,
) -> Result<(FunctionRecord, VersionRecord), LambdaError> {
    let store = app.store.clone();
    let n = name.to_string();
    let arn = function_arn(&app.config, name);
    let found = blocking(move || {
        let rec = store.function(&n)?;
        let v = match q {
            Qualified::Latest => store.version(&n, rec.active)?,
            Qualified::Number(v) => store.version(&n, v)?,
        };
        Ok((rec, v))
    })
    .await;
    found.map_err(|e| {
        if e.status == StatusCode::NOT_FOUND {
            match q {
                Qualified::Latest => LambdaError::not_found(&arn),
                Qualified::Number(n) => LambdaError::not_found(&format!("{arn}:{n}")),
            }
        } else {
            lambda_error(e)
        }
    })
}

// ---- request shapes ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CodeField {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    s3_key: Option<String>,
    image_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnvField {
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

/// The fields CreateFunction, UpdateFunctionConfiguration and UpdateFunctionCode take. What
/// fnlet does not know is collected in `other` and refused unless empty.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Fields {
    function_name: Option<String>,
    runtime: Option<String>,
    role: Option<String>,
    handler: Option<String>,
    code: Option<CodeField>,
    description: Option<String>,
    timeout: Option<i64>,
    memory_size: Option<i64>,
    publish: Option<bool>,
    package_type: Option<String>,
    environment: Option<EnvField>,
    architectures: Option<Vec<String>>,
    layers: Option<Vec<String>>,
    vpc_config: Option<VpcField>,
    tags: Option<BTreeMap<String, String>>,
    tracing_config: Option<TracingField>,
    ephemeral_storage: Option<StorageField>,
    logging_config: Option<LoggingField>,
    revision_id: Option<String>,
    dry_run: Option<bool>,
    // UpdateFunctionCode's own code fields.
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VpcField {
    #[serde(default)]
    subnet_ids: Vec<String>,
    #[serde(default)]
    security_group_ids: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TracingField {
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StorageField {
    size: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LoggingField {
    log_format: Option<String>,
}

fn parse_fields(body: &[u8]) -> Result<Fields, LambdaError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Fields::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| LambdaError::invalid(format!("the request body is not valid: {e}")))
}

/// Refuses what fnlet cannot honour, naming the field.
fn refuse_unsupported(f: &Fields) -> Result<(), LambdaError> {
    let no = |field: &str, why: &str| {
        Err(LambdaError::invalid(format!(
            "{field}: fnlet cannot honour it ({why})"
        )))
    };
    if let Some(a) = &f.architectures
        && a.iter().any(|a| a != host_architecture())
    {
        return no(
            "Architectures",
            &format!(
                "this host runs {} only, not {}",
                host_architecture(),
                a.join(", ")
            ),
        );
    }
    if f.layers.as_ref().is_some_and(|l| !l.is_empty()) {
        return no(
            "Layers",
            "layers are not supported; put the code in the zip",
        );
    }
    if let Some(v) = &f.vpc_config
        && !(v.subnet_ids.is_empty() && v.security_group_ids.is_empty())
    {
        return no(
            "VpcConfig",
            "functions reach the network as [network] in fnlet.toml says, not through a VPC",
        );
    }
    if let Some(p) = &f.package_type
        && p != "Zip"
    {
        return no("PackageType", "only Zip packages");
    }
    if let Some(m) = f.tracing_config.as_ref().and_then(|t| t.mode.as_deref())
        && m != "PassThrough"
    {
        return no("TracingConfig.Mode", "no X-Ray: PassThrough only");
    }
    if let Some(s) = f.ephemeral_storage.as_ref().and_then(|s| s.size)
        && s != 512
    {
        return no(
            "EphemeralStorage.Size",
            "/tmp is the sandbox's own: 512 only",
        );
    }
    if let Some(l) = f
        .logging_config
        .as_ref()
        .and_then(|l| l.log_format.as_deref())
        && l != "Text"
    {
        return no("LoggingConfig.LogFormat", "logs are text lines: Text only");
    }
    if f.s3_bucket.is_some()
        || f.image_uri.is_some()
        || f.code
            .as_ref()
            .is_some_and(|c| c.s3_bucket.is_some() || c.s3_key.is_some() || c.image_uri.is_some())
    {
        return no("Code", "code comes as ZipFile only (no S3, no images)");
    }
    for (k, v) in &f.other {
        let empty = match v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            return no(k, "fnlet does not support this setting");
        }
    }
    Ok(())
}

/// A manifest error as the Lambda field it concerns.
fn field_error(e: ManifestError) -> LambdaError {
    let ManifestError::Invalid { field, reason } = &e else {
        return LambdaError::invalid(e.to_string());
    };
    let lambda = match *field {
        "memory_mb" => "MemorySize",
        "timeout_s" => "Timeout",
        "env" => "Environment.Variables",
        "description" => "Description",
        "handler" | "aws.handler" => "Handler",
        "runtime" | "aws.runtime" => "Runtime",
        "aws.role" => "Role",
        "name" => "FunctionName",
        other => other,
    };
    LambdaError::invalid(format!("{lambda}: {reason}"))
}

/// Sets the call's fields on `m` (checked when the manifest is validated).
fn apply(app: &App, m: &mut Manifest, f: &Fields) -> Result<(), LambdaError> {
    if let Some(rt) = &f.runtime {
        if m.mode == Mode::Exec {
            return Err(LambdaError::invalid(format!(
                "Runtime: {} is an exec-mode function (fnlet.toml mode = \"exec\"); it has no Lambda runtime",
                m.name
            )));
        }
        if PROVIDED_RUNTIMES.contains(&rt.as_str()) {
            m.runtime = None;
            m.aws.runtime = Some(rt.clone());
        } else if app.config.runtimes.contains_key(rt) {
            m.runtime = Some(rt.clone());
            m.aws.runtime = None;
            m.entrypoint = None;
        } else {
            let mut known: Vec<&str> = app.config.runtimes.keys().map(String::as_str).collect();
            known.extend(PROVIDED_RUNTIMES);
            return Err(LambdaError::invalid(format!(
                "Runtime: {rt:?} is not configured on this agent (it takes: {}; `fnlet runtime add` adds one)",
                known.join(", ")
            )));
        }
    }
    if let Some(h) = &f.handler {
        m.handler = Some(h.clone());
    }
    // A configured runtime loads the handler; a bootstrap only sees it as _HANDLER.
    if m.runtime.is_some() {
        if m.handler.is_none() {
            m.handler = m.aws.handler.take();
        }
        m.aws.handler = None;
    } else if let Some(h) = m.handler.take() {
        m.aws.handler = Some(h);
    }
    if let Some(role) = &f.role {
        m.aws.role = Some(role.clone());
    }
    if let Some(d) = &f.description {
        m.description = (!d.is_empty()).then(|| d.clone());
    }
    if let Some(t) = f.timeout {
        if !(1..=86400).contains(&t) {
            return Err(LambdaError::invalid(format!(
                "Timeout: {t} must be between 1 and 86400 seconds"
            )));
        }
        m.timeout_s = Some(t as f64);
    }
    if let Some(mb) = f.memory_size {
        if !(128..=65536).contains(&mb) {
            return Err(LambdaError::invalid(format!(
                "MemorySize: {mb} must be between 128 and 65536 MB"
            )));
        }
        m.memory_mb = Some(mb as u64);
    }
    if let Some(e) = &f.environment {
        m.env = e.variables.clone();
    }
    m.validate().map_err(field_error)
}

/// What a Lambda caller sees of a manifest, field by field, to check a bundle's own
/// `fnlet.toml` against the call.
fn lambda_view(app: &App, m: &Manifest) -> [(&'static str, Option<String>); 7] {
    let r = m.resolve(&app.config.defaults);
    // A bootstrap bundle takes any provided.* name and any handler label.
    let runtime = if m.mode == Mode::Lambda && m.runtime.is_none() && m.aws.runtime.is_none() {
        None
    } else {
        runtime_of(m)
    };
    [
        ("Runtime", runtime),
        ("Handler", handler_of(m)),
        ("Role", m.aws.role.clone()),
        ("MemorySize", Some(r.memory_mb.to_string())),
        ("Timeout", Some((r.timeout_s.ceil() as u64).to_string())),
        (
            "Description",
            Some(m.description.clone().unwrap_or_default()),
        ),
        ("Environment", Some(format!("{:?}", m.env))),
    ]
}

/// The manifest a bundle's own `fnlet.toml` and the call settle on: the call's fields must
/// agree with what the file says (a field the file leaves to Lambda, such as Role, is taken).
fn agree(app: &App, own: &Manifest, name: &str, f: &Fields) -> Result<Manifest, LambdaError> {
    if own.name != name {
        return Err(LambdaError::invalid(format!(
            "FunctionName: {name:?} disagrees with the zip's {MANIFEST_FILE} (name = {:?})",
            own.name
        )));
    }
    let mut merged = own.clone();
    apply(app, &mut merged, f).map_err(|e| LambdaError {
        message: format!("{} (the zip has its own {MANIFEST_FILE})", e.message),
        ..e
    })?;
    let before = lambda_view(app, own);
    let after = lambda_view(app, &merged);
    for ((field, was), (_, now)) in before.iter().zip(after.iter()) {
        if let Some(was) = was
            && Some(was) != now.as_ref()
        {
            return Err(LambdaError::invalid(format!(
                "{field}: the call says {} but the zip's {MANIFEST_FILE} says {was}; make them agree or leave {field} out",
                now.as_deref().unwrap_or("nothing")
            )));
        }
    }
    Ok(merged)
}

/// The zip a call carries, decoded, with its Lambda `CodeSha256`.
fn zip_of(b64: &str, limit: usize) -> Result<(Vec<u8>, String), LambdaError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| LambdaError::invalid(format!("Code.ZipFile is not base64: {e}")))?;
    if bytes.len() > limit {
        return Err(LambdaError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            format!("the zip is larger than {limit} bytes (limits.max_bundle_mb)"),
        ));
    }
    let sha = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes));
    Ok((bytes, sha))
}

/// A bundle error as Lambda's: a zip it cannot take.
fn bundle_error(e: bundle::BundleError) -> LambdaError {
    match e {
        bundle::BundleError::Manifest(m) => LambdaError {
            message: format!("the zip's {}", field_error(m).message),
            ..LambdaError::invalid("")
        },
        bundle::BundleError::Entrypoint(p) => LambdaError::invalid(format!(
            "Code.ZipFile: {p:?} is not an executable file in the zip (a provided runtime runs the zip's executable bootstrap)"
        )),
        bundle::BundleError::Io(io) => lambda_error(AppError::internal("unpacking a zip", io)),
        other => {
            let e = AppError::from(other);
            LambdaError {
                message: format!("Code.ZipFile: {}", e.message),
                ..lambda_error(e)
            }
        }
    }
}

/// The body limit of a call carrying a zip: the bundle limit, in base64, and the fields.
fn zip_body_limit(app: &App) -> usize {
    ((app.config.limits.max_bundle_mb << 20) as usize) / 3 * 4 + (256 << 10)
}

/// After a change: waits in the background for the replicas (the function shows `Pending` or
/// `InProgress` meanwhile), or, outside a cluster, nothing to wait for.
fn replicate_in_background(app: &Arc<App>, v: VersionRecord, new_content: bool, u: Update) {
    if app.cluster.get().is_none() {
        return;
    }
    app.updates.set(&v.name, Some(u));
    let app = app.clone();
    tokio::spawn(async move {
        super::replicate(&app, &v, new_content).await;
        app.updates.set(&v.name, None);
    });
}

fn refuse_in_progress(app: &App, name: &str) -> Result<(), LambdaError> {
    if app.updates.get(name).is_some() {
        return Err(conflict(format!(
            "The operation cannot be performed at this time. An update is in progress for resource: {}",
            function_arn(&app.config, name)
        )));
    }
    Ok(())
}

/// Unpacks `zip` and settles its manifest: the zip's own `fnlet.toml` agreeing with the
/// fields, or `generated` (Err: why none could be made). Blocking.
fn settle(
    app: &App,
    zip: &[u8],
    name: &str,
    f: &Fields,
    generated: Result<Manifest, LambdaError>,
    staging: &std::path::Path,
) -> Result<(bundle::Unpacked, Manifest), LambdaError> {
    let limits = super::bundle_limits(&app.config);
    let (unpacked, own) = match &generated {
        Ok(m) => bundle::unpack_or_generate(zip, staging, limits, m).map_err(bundle_error)?,
        Err(_) => match bundle::unpack(zip, staging, limits) {
            Ok(u) => (u, true),
            Err(bundle::BundleError::NoManifest) => {
                return Err(generated.err().unwrap_or_else(|| LambdaError::invalid("")));
            }
            Err(e) => return Err(bundle_error(e)),
        },
    };
    let manifest = if own {
        agree(app, &unpacked.manifest, name, f)?
    } else {
        unpacked.manifest.clone()
    };
    Ok((unpacked, manifest))
}

// ---- handlers ----

#[derive(Debug, Default, Deserialize)]
pub struct ControlQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "Marker")]
    marker: Option<String>,
    #[serde(rename = "MaxItems")]
    max_items: Option<String>,
    #[serde(rename = "FunctionVersion")]
    function_version: Option<String>,
}

/// Reads and authorises a call; the parts and the body.
async fn admit(
    app: &App,
    req: Request,
    limit: usize,
    operation: &str,
) -> Result<(axum::http::request::Parts, bytes::Bytes), LambdaError> {
    let (parts, body) = req.into_parts();
    let body = read_body(&parts.headers, body, limit)
        .await
        .map_err(lambda_error)?;
    // The admin token may do everything; a key only what its scope covers.
    if let Some(key) = authorize(app, &parts, &body)? {
        // The function a call is about: its path's, or CreateFunction's FunctionName (the
        // body is parsed for it only here, for a key).
        #[derive(Deserialize)]
        struct Named {
            #[serde(rename = "FunctionName")]
            function_name: Option<String>,
        }
        let function = function_in_path(parts.uri.path()).or_else(|| {
            serde_json::from_slice::<Named>(&body)
                .ok()
                .and_then(|v| v.function_name)
                .and_then(|raw| super::parse_function_name(&raw).map(|(n, _)| n))
        });
        check_scope(app, &Some(key), function.as_deref(), operation)?;
    }
    Ok((parts, body))
}

/// The function name in a control-plane path (`.../functions/{name}/...` or a tag's ARN).
fn function_in_path(path: &str) -> Option<String> {
    let rest = path
        .split_once("/functions/")
        .map(|(_, r)| r)
        .or_else(|| path.split_once("/tags/").map(|(_, r)| r))?;
    let raw = rest.split('/').next()?;
    let raw = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    super::parse_function_name(&raw).map(|(n, _)| n)
}

fn answer(r: Result<Response, LambdaError>) -> Response {
    let id = super::request_id();
    let mut r = match r {
        Ok(r) => r,
        Err(e) => return e.response(&id),
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-amzn-requestid", v);
    }
    r
}

/// `GET|POST /2015-03-31/functions`: ListFunctions, CreateFunction.
pub async fn functions(
    State(app): Shared,
    Query(q): Query<ControlQuery>,
    req: Request,
) -> Response {
    answer(if req.method() == Method::POST {
        create(&app, req).await
    } else {
        list(&app, q, req).await
    })
}

/// `GET|DELETE /2015-03-31/functions/{name}`: GetFunction, DeleteFunction.
pub async fn function(
    State(app): Shared,
    Path(raw): Path<String>,
    Query(q): Query<ControlQuery>,
    req: Request,
) -> Response {
    answer(if req.method() == Method::DELETE {
        delete(&app, &raw, q, req).await
    } else {
        get(&app, &raw, q, req, true).await
    })
}

/// `GET|PUT /2015-03-31/functions/{name}/configuration`.
pub async fn function_configuration(
    State(app): Shared,
    Path(raw): Path<String>,
    Query(q): Query<ControlQuery>,
    req: Request,
) -> Response {
    answer(if req.method() == Method::PUT {
        update_configuration(&app, &raw, req).await
    } else {
        get(&app, &raw, q, req, false).await
    })
}

/// `PUT /2015-03-31/functions/{name}/code`: UpdateFunctionCode.
pub async fn function_code(State(app): Shared, Path(raw): Path<String>, req: Request) -> Response {
    answer(update_code(&app, &raw, req).await)
}

/// `GET|POST /2015-03-31/functions/{name}/versions`: ListVersionsByFunction, PublishVersion.
pub async fn function_versions(
    State(app): Shared,
    Path(raw): Path<String>,
    Query(q): Query<ControlQuery>,
    req: Request,
) -> Response {
    answer(if req.method() == Method::POST {
        publish(&app, &raw, req).await
    } else {
        list_versions(&app, &raw, q, req).await
    })
}

/// `GET /2020-06-30/functions/{name}/code-signing-config`: fnlet signs nothing.
pub async fn code_signing_config(
    State(app): Shared,
    Path(raw): Path<String>,
    req: Request,
) -> Response {
    answer(
        async {
            admit(&app, req, 0, "GetFunctionCodeSigningConfig").await?;
            let (name, _) = function_name(&raw)?;
            lookup(&app, &name, Qualified::Latest).await?;
            Ok(
                axum::Json(json!({ "CodeSigningConfigArn": "", "FunctionName": name }))
                    .into_response(),
            )
        }
        .await,
    )
}

async fn create(app: &Arc<App>, req: Request) -> Result<Response, LambdaError> {
    let (_, body) = admit(app, req, zip_body_limit(app), "CreateFunction").await?;
    let f = parse_fields(&body)?;
    refuse_unsupported(&f)?;
    if let Some(t) = &f.tags {
        check_tags(t)?;
    }
    let raw = f
        .function_name
        .clone()
        .ok_or_else(|| LambdaError::invalid("FunctionName is required"))?;
    let (name, q) = function_name(&raw)?;
    if q.is_some() {
        return Err(LambdaError::invalid(
            "FunctionName: a new function takes no qualifier",
        ));
    }
    if f.role.is_none() {
        return Err(LambdaError::invalid(
            "Role is required (fnlet keeps it and grants nothing by it)",
        ));
    }
    let b64 = f
        .code
        .as_ref()
        .and_then(|c| c.zip_file.clone())
        .ok_or_else(|| LambdaError::invalid("Code.ZipFile is required"))?;
    let (zip, code_sha) = zip_of(&b64, (app.config.limits.max_bundle_mb << 20) as usize)?;
    let generated = if f.runtime.is_none() {
        Err(LambdaError::invalid(format!(
            "Runtime is required for a zip without {MANIFEST_FILE}"
        )))
    } else {
        let mut m: Manifest = toml::from_str(&format!("name = {name:?}\nmode = \"lambda\"\n"))
            .map_err(|e| lambda_error(AppError::internal("a blank manifest", e)))?;
        apply(app, &mut m, &f).map(|()| m)
    };
    let publish = f.publish == Some(true);
    let app2 = app.clone();
    let arn = function_arn(&app.config, &name);
    let (rec, v, new_content) = tokio::task::spawn_blocking(move || {
        let app = app2;
        let staging = app
            .store
            .staging_dir()
            .map_err(|e| lambda_error(e.into()))?;
        let (unpacked, manifest) = settle(&app, &zip, &name, &f, generated, staging.path())?;
        if app.store.function(&name).is_ok() {
            return Err(conflict(format!("Function already exist: {name}")));
        }
        let (v, new_content) =
            super::commit_code(&app, &unpacked, &manifest, Some(code_sha)).map_err(lambda_error)?;
        if let Some(tags) = &f.tags
            && !tags.is_empty()
        {
            app.store
                .changes()
                .set_tags(&v.name, tags, &[])
                .map_err(|e| lambda_error(e.into()))?;
        }
        let rec = app
            .store
            .function(&v.name)
            .map_err(|_| LambdaError::not_found(&arn))?;
        Ok((rec, v, new_content))
    })
    .await
    .map_err(|e| lambda_error(AppError::internal("blocking task", e)))??;
    super::log_deployed(app, &v);
    replicate_in_background(app, v.clone(), new_content, Update::Create);
    let q = if publish {
        Qualified::Number(v.version)
    } else {
        Qualified::Latest
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(configuration(app, &rec, &v, q)),
    )
        .into_response())
}

async fn list(app: &App, q: ControlQuery, req: Request) -> Result<Response, LambdaError> {
    admit(app, req, 0, "ListFunctions").await?;
    let max = match q.max_items.as_deref() {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => {
                return Err(LambdaError::invalid(format!(
                    "MaxItems: {s:?} must be between 1 and 10000"
                )));
            }
        },
    };
    let all_versions = match q.function_version.as_deref() {
        None => false,
        Some("ALL") => true,
        Some(other) => {
            return Err(LambdaError::invalid(format!(
                "FunctionVersion: {other:?} must be ALL"
            )));
        }
    };
    let store = app.store.clone();
    let marker = q.marker.clone();
    let rows = blocking(move || {
        let mut rows = Vec::new();
        // Names sort as the store keeps them; the marker is the last name given.
        for (rec, v) in store.list()? {
            if marker.as_deref().is_some_and(|m| rec.name.as_str() <= m) {
                continue;
            }
            let versions = if all_versions {
                let mut vs = store.versions(&rec.name)?;
                vs.reverse();
                vs
            } else {
                Vec::new()
            };
            rows.push((rec, v, versions));
        }
        Ok(rows)
    })
    .await
    .map_err(lambda_error)?;
    let more = rows.len() > max;
    let page = &rows[..rows.len().min(max)];
    let mut functions = Vec::new();
    for (rec, v, versions) in page {
        functions.push(configuration(app, rec, v, Qualified::Latest));
        for v in versions {
            functions.push(configuration(app, rec, v, Qualified::Number(v.version)));
        }
    }
    let mut out = json!({ "Functions": functions });
    if more && let Some((rec, _, _)) = page.last() {
        out["NextMarker"] = rec.name.clone().into();
    }
    Ok(axum::Json(out).into_response())
}

async fn get(
    app: &App,
    raw: &str,
    q: ControlQuery,
    req: Request,
    whole: bool,
) -> Result<Response, LambdaError> {
    admit(
        app,
        req,
        0,
        if whole {
            "GetFunction"
        } else {
            "GetFunctionConfiguration"
        },
    )
    .await?;
    let (name, path_q) = function_name(raw)?;
    let (rec, v, c) = match named(q.qualifier.as_deref().or(path_q.as_deref()))? {
        Named::Version(qual) => {
            let (rec, v) = lookup(app, &name, qual).await?;
            let c = configuration(app, &rec, &v, qual);
            (rec, v, c)
        }
        Named::Alias(a) => {
            let alias = find_alias(app, &name, &a).await?;
            let (rec, v) = lookup(app, &name, Qualified::Number(alias.version)).await?;
            let mut c = configuration(app, &rec, &v, Qualified::Number(v.version));
            c["FunctionArn"] = format!("{}:{a}", function_arn(&app.config, &name)).into();
            (rec, v, c)
        }
    };
    if !whole {
        return Ok(axum::Json(c).into_response());
    }
    let store = app.store.clone();
    let tags = blocking(move || Ok(store.tags(&rec.name)?))
        .await
        .map_err(lambda_error)?;
    let mut out = json!({
        "Configuration": c,
        // The code is this agent's bundle; there is no URL to fetch it from.
        "Code": { "RepositoryType": "FNLET" },
    });
    if !tags.is_empty() {
        out["Tags"] = json!(tags);
    }
    if let Some(n) = v.manifest.max_concurrency {
        out["Concurrency"] = json!({ "ReservedConcurrentExecutions": n });
    }
    Ok(axum::Json(out).into_response())
}

async fn delete(
    app: &Arc<App>,
    raw: &str,
    q: ControlQuery,
    req: Request,
) -> Result<Response, LambdaError> {
    admit(app, req, 0, "DeleteFunction").await?;
    let (name, path_q) = function_name(raw)?;
    let arn = function_arn(&app.config, &name);
    match q.qualifier.as_deref().or(path_q.as_deref()) {
        None => {
            super::remove_function(app, &name)
                .await
                .map_err(|e| match e.status {
                    StatusCode::NOT_FOUND => LambdaError::not_found(&arn),
                    _ => lambda_error(e),
                })?;
        }
        Some("$LATEST") => {
            return Err(LambdaError::invalid(
                "Qualifier: $LATEST cannot be deleted on its own; delete the function without a qualifier",
            ));
        }
        Some(a) if valid_alias(a) => {
            return Err(LambdaError::invalid(format!(
                "Qualifier: {a:?} is an alias; DeleteAlias removes it"
            )));
        }
        Some(other) => {
            let Qualified::Number(n) = qualified(Some(other))? else {
                return Err(LambdaError::invalid("Qualifier: a version number"));
            };
            let store = app.store.clone();
            let n2 = name.clone();
            blocking(move || Ok(store.changes().remove_version(&n2, n)?))
                .await
                .map_err(|e| match e.status {
                    StatusCode::NOT_FOUND => LambdaError::not_found(&format!("{arn}:{n}")),
                    StatusCode::CONFLICT => conflict(e.message),
                    _ => lambda_error(e),
                })?;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn update_configuration(
    app: &Arc<App>,
    raw: &str,
    req: Request,
) -> Result<Response, LambdaError> {
    let (_, body) = admit(app, req, 256 << 10, "UpdateFunctionConfiguration").await?;
    let (name, q) = function_name(raw)?;
    if q.is_some() {
        return Err(LambdaError::invalid(
            "FunctionName: only $LATEST's configuration can change (no qualifier)",
        ));
    }
    let f = parse_fields(&body)?;
    refuse_unsupported(&f)?;
    if f.code.is_some() || f.zip_file.is_some() {
        return Err(LambdaError::invalid(
            "Code: UpdateFunctionConfiguration takes no code (UpdateFunctionCode does)",
        ));
    }
    refuse_in_progress(app, &name)?;
    let (rec, current) = lookup(app, &name, Qualified::Latest).await?;
    check_revision(&f, &current)?;
    let mut m = current.manifest.clone();
    apply(app, &mut m, &f)?;
    if m == current.manifest {
        return Ok(
            axum::Json(configuration(app, &rec, &current, Qualified::Latest)).into_response(),
        );
    }
    let app2 = app.clone();
    let v = blocking(move || {
        super::check_runnable(&app2, &m)?;
        let store = app2.store.changes();
        let v = store.configure(&name, &m)?;
        super::activate(&app2, &store, &name)?;
        super::collect(&app2, &store);
        Ok(v)
    })
    .await
    .map_err(lambda_error)?;
    tracing::info!(function = %v.name, version = v.version, "configuration updated");
    app.router.logs.append(
        &v.name,
        v.version,
        "-",
        "agent",
        &format!("configuration updated: version {}", v.version),
    );
    replicate_in_background(app, v.clone(), false, Update::Change);
    let rec = FunctionRecord {
        active: v.version,
        ..rec
    };
    Ok(axum::Json(configuration(app, &rec, &v, Qualified::Latest)).into_response())
}

/// RevisionId, when given, must name the version the call changes.
fn check_revision(f: &Fields, current: &VersionRecord) -> Result<(), LambdaError> {
    match &f.revision_id {
        Some(r) if *r != revision_id(current) => Err(LambdaError::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailedException",
            "The RevisionId provided does not match the latest RevisionId for the Lambda function. Call the GetFunction API to retrieve the latest RevisionId",
        )),
        _ => Ok(()),
    }
}

async fn update_code(app: &Arc<App>, raw: &str, req: Request) -> Result<Response, LambdaError> {
    let (_, body) = admit(app, req, zip_body_limit(app), "UpdateFunctionCode").await?;
    let (name, q) = function_name(raw)?;
    if q.is_some() {
        return Err(LambdaError::invalid(
            "FunctionName: only $LATEST's code can change (no qualifier)",
        ));
    }
    let f = parse_fields(&body)?;
    refuse_unsupported(&f)?;
    let b64 = f
        .zip_file
        .clone()
        .ok_or_else(|| LambdaError::invalid("ZipFile is required"))?;
    let (zip, code_sha) = zip_of(&b64, (app.config.limits.max_bundle_mb << 20) as usize)?;
    refuse_in_progress(app, &name)?;
    let (_, current) = lookup(app, &name, Qualified::Latest).await?;
    check_revision(&f, &current)?;
    let publish = f.publish == Some(true);
    let dry_run = f.dry_run == Some(true);
    let app2 = app.clone();
    let name2 = name.clone();
    let done = tokio::task::spawn_blocking(move || {
        let app = app2;
        let name = name2;
        let staging = app
            .store
            .staging_dir()
            .map_err(|e| lambda_error(e.into()))?;
        // The code changes and the configuration stays, unless the zip brings its own
        // fnlet.toml: then that is the configuration (as with `fnlet deploy`), keeping what
        // only the AWS tools set.
        let (unpacked, mut manifest) = settle(
            &app,
            &zip,
            &name,
            &Fields::default(),
            Ok(current.manifest.clone()),
            staging.path(),
        )?;
        if manifest.aws.role.is_none() {
            manifest.aws.role = current.manifest.aws.role.clone();
        }
        if dry_run {
            return Ok(None);
        }
        super::commit_code(&app, &unpacked, &manifest, Some(code_sha))
            .map(Some)
            .map_err(lambda_error)
    })
    .await
    .map_err(|e| lambda_error(AppError::internal("blocking task", e)))??;
    let Some((v, new_content)) = done else {
        let (rec, current) = lookup(app, &name, Qualified::Latest).await?;
        return Ok(
            axum::Json(configuration(app, &rec, &current, Qualified::Latest)).into_response(),
        );
    };
    super::log_deployed(app, &v);
    replicate_in_background(app, v.clone(), new_content, Update::Change);
    let (rec, _) = lookup(app, &v.name, Qualified::Latest).await?;
    let q = if publish {
        Qualified::Number(v.version)
    } else {
        Qualified::Latest
    };
    Ok(axum::Json(configuration(app, &rec, &v, q)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PublishFields {
    code_sha256: Option<String>,
    revision_id: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
}

/// PublishVersion: every fnlet version is immutable already; publishing names the active
/// one (as Lambda answers when $LATEST has not changed since the last publish).
async fn publish(app: &App, raw: &str, req: Request) -> Result<Response, LambdaError> {
    let (_, body) = admit(app, req, 64 << 10, "PublishVersion").await?;
    let (name, _) = function_name(raw)?;
    let p: PublishFields = if body.iter().all(u8::is_ascii_whitespace) {
        PublishFields::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| LambdaError::invalid(format!("the request body is not valid: {e}")))?
    };
    refuse_in_progress(app, &name)?;
    let (rec, v) = lookup(app, &name, Qualified::Latest).await?;
    if let Some(sha) = &p.code_sha256
        && *sha != code_sha256(&v)
    {
        return Err(LambdaError::invalid(format!(
            "CodeSha256: {sha} is not $LATEST's code ({})",
            code_sha256(&v)
        )));
    }
    if let Some(r) = &p.revision_id
        && *r != revision_id(&v)
    {
        return Err(LambdaError::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailedException",
            "The RevisionId provided does not match the latest RevisionId for the Lambda function",
        ));
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(configuration(app, &rec, &v, Qualified::Number(v.version))),
    )
        .into_response())
}

async fn list_versions(
    app: &App,
    raw: &str,
    q: ControlQuery,
    req: Request,
) -> Result<Response, LambdaError> {
    admit(app, req, 0, "ListVersionsByFunction").await?;
    let (name, _) = function_name(raw)?;
    let max = match q.max_items.as_deref() {
        None => 50,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                LambdaError::invalid(format!("MaxItems: {s:?} must be between 1 and 10000"))
            })?,
    };
    let (rec, _) = lookup(app, &name, Qualified::Latest).await?;
    let store = app.store.clone();
    let n = name.clone();
    let mut versions = blocking(move || Ok(store.versions(&n)?))
        .await
        .map_err(lambda_error)?;
    versions.reverse();
    // $LATEST first, then the versions oldest first; the marker is the last label given.
    let mut rows: Vec<(Qualified, &VersionRecord)> = Vec::new();
    if let Some(active) = versions.iter().find(|v| v.version == rec.active) {
        rows.push((Qualified::Latest, active));
    }
    rows.extend(versions.iter().map(|v| (Qualified::Number(v.version), v)));
    let start = match q.marker.as_deref() {
        None => 0,
        Some(m) => rows
            .iter()
            .position(|(q, _)| q.label() == m)
            .map(|i| i + 1)
            .ok_or_else(|| {
                LambdaError::invalid(format!("Marker: {m:?} is not a version of {name}"))
            })?,
    };
    let page = &rows[start.min(rows.len())..(start + max).min(rows.len())];
    let mut out = json!({
        "Versions": page.iter().map(|(q, v)| configuration(app, &rec, v, *q)).collect::<Vec<_>>(),
    });
    if start + max < rows.len()
        && let Some((q, _)) = page.last()
    {
        out["NextMarker"] = q.label().into();
    }
    Ok(axum::Json(out).into_response())
}

/// Lambda's limits on tags: at most 50, keys of 1-128 characters, values up to 256, no
/// `aws:` prefix.
fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), LambdaError> {
    if tags.len() > 50 {
        return Err(LambdaError::invalid("Tags: at most 50 tags"));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 || k.starts_with("aws:") {
            return Err(LambdaError::invalid(format!(
                "Tags: key {k:?} must be 1-128 characters and not start with aws:"
            )));
        }
        if v.chars().count() > 256 {
            return Err(LambdaError::invalid(format!(
                "Tags: the value of {k:?} must be at most 256 characters"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TagBody {
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// `GET|POST|DELETE /2017-03-31/tags/{arn}`: ListTags, TagResource, UntagResource (of a
/// function's ARN).
pub async fn tags(State(app): Shared, Path(arn): Path<String>, req: Request) -> Response {
    answer(tags_inner(&app, &arn, req).await)
}

async fn tags_inner(app: &App, arn: &str, req: Request) -> Result<Response, LambdaError> {
    // tagKeys repeats: axum's Query takes the last only, so the query is read by hand.
    let keys: Vec<String> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "tagKeys")
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default();
    let (parts, body) = admit(app, req, 64 << 10, "TagResource").await?;
    let (name, q) = function_name(arn)?;
    if !arn.starts_with("arn:") || q.is_some() {
        return Err(LambdaError::invalid(format!(
            "Resource: {arn:?} must be a function's unqualified ARN"
        )));
    }
    let store = app.store.clone();
    let not_found = LambdaError::not_found(&function_arn(&app.config, &name));
    let result = match parts.method {
        Method::GET => blocking(move || Ok(store.tags(&name)?)).await,
        Method::POST => {
            let t: TagBody = serde_json::from_slice(&body)
                .map_err(|e| LambdaError::invalid(format!("the request body is not valid: {e}")))?;
            check_tags(&t.tags)?;
            blocking(move || Ok(store.changes().set_tags(&name, &t.tags, &[])?)).await
        }
        _ => blocking(move || Ok(store.changes().set_tags(&name, &BTreeMap::new(), &keys)?)).await,
    };
    let tags = result.map_err(|e| match e.status {
        StatusCode::NOT_FOUND => not_found,
        _ => lambda_error(e),
    })?;
    Ok(match parts.method {
        Method::GET => axum::Json(json!({ "Tags": tags })).into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    })
}

// ---- aliases ----

async fn find_alias(
    app: &App,
    name: &str,
    alias: &str,
) -> Result<crate::store::AliasRecord, LambdaError> {
    let store = app.store.clone();
    let (n, a) = (name.to_string(), alias.to_string());
    let arn = format!("{}:{alias}", function_arn(&app.config, name));
    blocking(move || Ok(store.alias(&n, &a)?))
        .await
        .map_err(|e| match e.status {
            StatusCode::NOT_FOUND => LambdaError::not_found(&arn),
            _ => lambda_error(e),
        })
}

fn alias_json(app: &App, a: &crate::store::AliasRecord) -> Value {
    let mut v = json!({
        "AliasArn": format!("{}:{}", function_arn(&app.config, &a.function), a.name),
        "Name": a.name,
        "FunctionVersion": a.version.to_string(),
        "Description": a.description,
        "RevisionId": a.revision,
    });
    if !a.weights.is_empty() {
        let w: BTreeMap<String, f64> = a.weights.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        v["RoutingConfig"] = json!({ "AdditionalVersionWeights": w });
    }
    v
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliasFields {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    routing_config: Option<RoutingField>,
    revision_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoutingField {
    #[serde(default)]
    additional_version_weights: BTreeMap<String, f64>,
}

fn alias_version(v: &str) -> Result<u64, LambdaError> {
    match qualified(Some(v)) {
        Ok(Qualified::Number(n)) => Ok(n),
        _ => Err(LambdaError::invalid(format!(
            "FunctionVersion: {v:?} must be a version number (fnlet's $LATEST is its active version: name that version's number)"
        ))),
    }
}

fn weights(r: &RoutingField, primary: u64) -> Result<BTreeMap<u64, f64>, LambdaError> {
    if r.additional_version_weights.len() > 1 {
        return Err(LambdaError::invalid(
            "RoutingConfig.AdditionalVersionWeights: at most one additional version",
        ));
    }
    let mut out = BTreeMap::new();
    for (k, w) in &r.additional_version_weights {
        let n = alias_version(k).map_err(|_| {
            LambdaError::invalid(format!(
                "RoutingConfig.AdditionalVersionWeights: {k:?} must be a version number"
            ))
        })?;
        if n == primary {
            return Err(LambdaError::invalid(format!(
                "RoutingConfig.AdditionalVersionWeights: version {n} is the alias's own version"
            )));
        }
        if !(w.is_finite() && (0.0..=1.0).contains(w)) {
            return Err(LambdaError::invalid(format!(
                "RoutingConfig.AdditionalVersionWeights: weight {w} of version {n} must be between 0 and 1"
            )));
        }
        out.insert(n, *w);
    }
    Ok(out)
}

fn new_revision() -> String {
    super::request_id()
}

/// `GET|POST /2015-03-31/functions/{name}/aliases`: ListAliases, CreateAlias.
pub async fn aliases(
    State(app): Shared,
    Path(raw): Path<String>,
    Query(q): Query<ControlQuery>,
    req: Request,
) -> Response {
    answer(aliases_inner(&app, &raw, q, req).await)
}

async fn aliases_inner(
    app: &App,
    raw: &str,
    q: ControlQuery,
    req: Request,
) -> Result<Response, LambdaError> {
    let (parts, body) = admit(app, req, 64 << 10, "CreateAlias").await?;
    let (name, _) = function_name(raw)?;
    let arn = function_arn(&app.config, &name);
    let store_err = |e: AppError| match e.status {
        StatusCode::NOT_FOUND if e.message.starts_with("no function") => {
            LambdaError::not_found(&arn)
        }
        StatusCode::CONFLICT => conflict(e.message),
        _ => lambda_error(e),
    };
    if parts.method == Method::POST {
        let f: AliasFields = serde_json::from_slice(&body)
            .map_err(|e| LambdaError::invalid(format!("the request body is not valid: {e}")))?;
        let alias = f
            .name
            .ok_or_else(|| LambdaError::invalid("Name is required"))?;
        if !valid_alias(&alias) {
            return Err(LambdaError::invalid(format!(
                "Name: {alias:?} must be 1-128 letters, digits, - and _, not all digits"
            )));
        }
        let version = alias_version(
            &f.function_version
                .ok_or_else(|| LambdaError::invalid("FunctionVersion is required"))?,
        )?;
        let a = crate::store::AliasRecord {
            function: name.clone(),
            name: alias,
            version,
            description: f.description.unwrap_or_default(),
            weights: match &f.routing_config {
                Some(r) => weights(r, version)?,
                None => BTreeMap::new(),
            },
            revision: new_revision(),
        };
        let store = app.store.clone();
        let a2 = a.clone();
        blocking(move || Ok(store.changes().put_alias(&a2, true)?))
            .await
            .map_err(store_err)?;
        return Ok((StatusCode::CREATED, axum::Json(alias_json(app, &a))).into_response());
    }
    let max = page_size(q.max_items.as_deref())?;
    let store = app.store.clone();
    let n = name.clone();
    let all = blocking(move || Ok(store.aliases(&n)?))
        .await
        .map_err(store_err)?;
    let filtered: Vec<_> = all
        .iter()
        .filter(|a| {
            q.function_version
                .as_deref()
                .is_none_or(|v| v == a.version.to_string())
        })
        .filter(|a| q.marker.as_deref().is_none_or(|m| a.name.as_str() > m))
        .collect();
    let page = &filtered[..filtered.len().min(max)];
    let mut out = json!({ "Aliases": page.iter().map(|a| alias_json(app, a)).collect::<Vec<_>>() });
    if filtered.len() > max
        && let Some(a) = page.last()
    {
        out["NextMarker"] = a.name.clone().into();
    }
    Ok(axum::Json(out).into_response())
}

fn page_size(raw: Option<&str>) -> Result<usize, LambdaError> {
    match raw {
        None => Ok(50),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                LambdaError::invalid(format!("MaxItems: {s:?} must be between 1 and 10000"))
            }),
    }
}

/// `GET|PUT|DELETE /2015-03-31/functions/{name}/aliases/{alias}`.
pub async fn alias(
    State(app): Shared,
    Path((raw, alias)): Path<(String, String)>,
    req: Request,
) -> Response {
    answer(alias_inner(&app, &raw, &alias, req).await)
}

async fn alias_inner(
    app: &App,
    raw: &str,
    alias: &str,
    req: Request,
) -> Result<Response, LambdaError> {
    let (parts, body) = admit(app, req, 64 << 10, "UpdateAlias").await?;
    let (name, _) = function_name(raw)?;
    let mut a = find_alias(app, &name, alias).await?;
    let store = app.store.clone();
    match parts.method {
        Method::GET => Ok(axum::Json(alias_json(app, &a)).into_response()),
        Method::DELETE => {
            let (n, al) = (name.clone(), alias.to_string());
            blocking(move || Ok(store.changes().remove_alias(&n, &al)?))
                .await
                .map_err(lambda_error)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => {
            let f: AliasFields = if body.iter().all(u8::is_ascii_whitespace) {
                AliasFields::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    LambdaError::invalid(format!("the request body is not valid: {e}"))
                })?
            };
            if let Some(r) = &f.revision_id
                && *r != a.revision
            {
                return Err(LambdaError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "PreconditionFailedException",
                    "The RevisionId provided does not match the latest RevisionId for the alias",
                ));
            }
            if let Some(v) = &f.function_version {
                a.version = alias_version(v)?;
            }
            if let Some(d) = f.description {
                a.description = d;
            }
            if let Some(r) = &f.routing_config {
                a.weights = weights(r, a.version)?;
            }
            a.weights.remove(&a.version);
            a.revision = new_revision();
            let a2 = a.clone();
            blocking(move || Ok(store.changes().put_alias(&a2, false)?))
                .await
                .map_err(|e| match e.status {
                    StatusCode::NOT_FOUND => LambdaError::invalid(e.message),
                    _ => lambda_error(e),
                })?;
            Ok(axum::Json(alias_json(app, &a)).into_response())
        }
    }
}

/// What a qualified invocation runs: None for the active version, else the version the
/// qualifier names (an alias picks one by its weights).
pub(super) async fn invoke_target(
    app: &App,
    f: &crate::pool::ActiveFunction,
    qualifier: Option<&str>,
) -> Result<Option<Arc<crate::pool::ActiveFunction>>, LambdaError> {
    let version = match named(qualifier)? {
        Named::Version(Qualified::Latest) => return Ok(None),
        Named::Version(Qualified::Number(n)) => n,
        Named::Alias(a) => {
            let alias = find_alias(app, &f.name, &a).await?;
            pick(&alias)
        }
    };
    if version == f.version {
        return Ok(None);
    }
    let (rec, v) = lookup(app, &f.name, Qualified::Number(version)).await?;
    let bundle = app.store.bundle_path(&v.sha256);
    if !bundle.is_dir() {
        return Err(conflict(format!(
            "version {version} of {} cannot run: its bundle is missing",
            f.name
        )));
    }
    crate::pool::ActiveFunction::new(&rec, &v, bundle, &app.config)
        .map(|f| Some(Arc::new(f)))
        .map_err(|e| conflict(e.to_string()))
}

/// The version an alias sends this call to: each additional version with its weight's
/// chance, the alias's own otherwise.
fn pick(a: &crate::store::AliasRecord) -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return a.version;
    }
    // 53 random bits: a uniform number in [0, 1).
    let r = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    pick_with(a, r)
}

fn pick_with(a: &crate::store::AliasRecord, r: f64) -> u64 {
    let mut acc = 0.0;
    for (v, w) in &a.weights {
        acc += w;
        if r < acc {
            return *v;
        }
    }
    a.version
}

// ---- reserved concurrency ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConcurrencyField {
    reserved_concurrent_executions: Option<i64>,
}

/// `PUT|DELETE /2017-10-31/functions/{name}/concurrency` and
/// `GET /2019-09-30/functions/{name}/concurrency`: reserved concurrency is the function's
/// `max_concurrency` (0: every call is throttled); a change records a new version, as any
/// configuration change.
pub async fn concurrency(State(app): Shared, Path(raw): Path<String>, req: Request) -> Response {
    answer(concurrency_inner(&app, &raw, req).await)
}

async fn concurrency_inner(
    app: &Arc<App>,
    raw: &str,
    req: Request,
) -> Result<Response, LambdaError> {
    let (parts, body) = admit(app, req, 4096, "PutFunctionConcurrency").await?;
    let (name, _) = function_name(raw)?;
    let (rec, current) = lookup(app, &name, Qualified::Latest).await?;
    let set = match parts.method {
        Method::GET => {
            let out = match current.manifest.max_concurrency {
                Some(n) => json!({ "ReservedConcurrentExecutions": n }),
                None => json!({}),
            };
            return Ok(axum::Json(out).into_response());
        }
        Method::DELETE => None,
        _ => {
            let f: ConcurrencyField = serde_json::from_slice(&body)
                .map_err(|e| LambdaError::invalid(format!("the request body is not valid: {e}")))?;
            let n = f
                .reserved_concurrent_executions
                .ok_or_else(|| LambdaError::invalid("ReservedConcurrentExecutions is required"))?;
            if !(0..=10_000).contains(&n) {
                return Err(LambdaError::invalid(format!(
                    "ReservedConcurrentExecutions: {n} must be between 0 and 10000"
                )));
            }
            Some(n as u32)
        }
    };
    refuse_in_progress(app, &name)?;
    let mut m = current.manifest.clone();
    m.max_concurrency = set;
    if let (Some(max), Some(min)) = (m.max_concurrency, m.min_instances)
        && min > max
    {
        return Err(LambdaError::invalid(format!(
            "ReservedConcurrentExecutions: {max} is below the function's min_instances ({min})"
        )));
    }
    if m != current.manifest {
        m.validate().map_err(field_error)?;
        let app2 = app.clone();
        let n = name.clone();
        let v = blocking(move || {
            let store = app2.store.changes();
            let v = store.configure(&n, &m)?;
            super::activate(&app2, &store, &n)?;
            super::collect(&app2, &store);
            Ok(v)
        })
        .await
        .map_err(lambda_error)?;
        tracing::info!(function = %v.name, version = v.version, concurrency = ?set, "reserved concurrency set");
        replicate_in_background(app, v, false, Update::Change);
    }
    let _ = rec;
    Ok(match (parts.method, set) {
        (Method::DELETE, _) => StatusCode::NO_CONTENT.into_response(),
        (_, n) => axum::Json(json!({ "ReservedConcurrentExecutions": n })).into_response(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_modified_is_lambdas_format() {
        assert_eq!(
            last_modified("2026-12-05T01:16:46.1Z"),
            "2026-12-05T01:16:46.100+0000"
        );
        assert_eq!(
            last_modified("2026-12-05T01:16:46Z"),
            "2026-12-05T01:16:46.000+0000"
        );
    }

    #[test]
    fn aliases_split_by_their_weights() {
        let a = crate::store::AliasRecord {
            function: "f".into(),
            name: "live".into(),
            version: 1,
            description: String::new(),
            weights: [(2, 0.1)].into_iter().collect(),
            revision: String::new(),
        };
        assert_eq!(pick_with(&a, 0.0), 2);
        assert_eq!(pick_with(&a, 0.099), 2);
        assert_eq!(pick_with(&a, 0.1), 1);
        assert_eq!(pick_with(&a, 0.999), 1);
        assert!(valid_alias("live") && valid_alias("v-2_x") && !valid_alias("12"));
        assert_eq!(named(Some("live")).ok(), Some(Named::Alias("live".into())));
        assert_eq!(
            named(Some("3")).ok(),
            Some(Named::Version(Qualified::Number(3)))
        );
    }

    #[test]
    fn qualifiers() {
        assert_eq!(qualified(None).ok(), Some(Qualified::Latest));
        assert_eq!(qualified(Some("$LATEST")).ok(), Some(Qualified::Latest));
        assert_eq!(qualified(Some("7")).ok(), Some(Qualified::Number(7)));
        assert!(qualified(Some("0")).is_err());
        assert!(qualified(Some("live")).is_err());
    }

    #[test]
    fn unsupported_settings_are_named() {
        let f: Fields = serde_json::from_str(
            r#"{"Layers":["arn:aws:lambda:us-east-1:1:layer:x:1"],"FunctionName":"a"}"#,
        )
        .unwrap();
        let e = refuse_unsupported(&f).unwrap_err();
        assert!(e.message.starts_with("Layers:"), "{}", e.message);
        let f: Fields = serde_json::from_str(r#"{"KMSKeyArn":"arn:x"}"#).unwrap();
        let e = refuse_unsupported(&f).unwrap_err();
        assert!(e.message.starts_with("KMSKeyArn:"), "{}", e.message);
        // What the tools send as defaults passes.
        let f: Fields = serde_json::from_str(
            r#"{"EphemeralStorage":{"Size":512},"TracingConfig":{"Mode":"PassThrough"},"VpcConfig":{"SubnetIds":[],"SecurityGroupIds":[]},"Layers":[],"KMSKeyArn":"","Architectures":["x86_64"]}"#,
        )
        .unwrap();
        if host_architecture() == "x86_64" {
            refuse_unsupported(&f).map_err(|e| e.message).unwrap();
        }
        let f: Fields = serde_json::from_str(r#"{"Architectures":["sparc"]}"#).unwrap();
        assert!(
            refuse_unsupported(&f)
                .unwrap_err()
                .message
                .starts_with("Architectures:")
        );
    }

    #[test]
    fn runtimes_map_both_ways() {
        let m: Manifest = toml::from_str("name = \"a\"\nmode = \"lambda\"\n").unwrap();
        assert_eq!(runtime_of(&m).as_deref(), Some("provided.al2023"));
        let mut m2 = m.clone();
        m2.aws.runtime = Some("provided.al2".into());
        assert_eq!(runtime_of(&m2).as_deref(), Some("provided.al2"));
        let m3: Manifest = toml::from_str(
            "name = \"a\"\nmode = \"lambda\"\nruntime = \"python3.11\"\nhandler = \"app.h\"\n",
        )
        .unwrap();
        assert_eq!(runtime_of(&m3).as_deref(), Some("python3.11"));
        assert_eq!(handler_of(&m3).as_deref(), Some("app.h"));
        let m4: Manifest = toml::from_str("name = \"a\"\nentrypoint = \"run\"\n").unwrap();
        assert_eq!(runtime_of(&m4), None);
    }
}
