//! A small typed client of the agent's HTTP API (agent/api/openapi.yaml), and where to find it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::Deserialize;
use serde_json::Value;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8740";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fnlet";
pub const TOKEN_FILE: &str = "admin.token";
pub const ENV_ENDPOINT: &str = "FNLET_ENDPOINT";
/// Written by an agent running under systemd (RuntimeDirectory=fnlet, removed when it stops):
/// the URL its API answers on, used when neither --endpoint nor FNLET_ENDPOINT is given.
pub const RUNTIME_ENDPOINT_FILE: &str = "/run/fnlet/endpoint";
pub const ENV_TOKEN: &str = "FNLET_TOKEN";
pub const ENV_STATE_DIR: &str = "FNLET_STATE_DIR";

pub const HEADER_REQUEST_ID: &str = "x-fnlet-request-id";
pub const HEADER_VERSION: &str = "x-fnlet-version";

/// Largest JSON answer read from the agent (a listing of many functions and versions).
const MAX_JSON_BYTES: usize = 32 << 20;
/// Largest error body read; the rest is dropped.
pub const MAX_ERROR_BYTES: usize = 64 << 10;

pub const USER_AGENT_VALUE: &str = concat!("fnlet/", env!("CARGO_PKG_VERSION"));

/// What the WHATWG URL standard percent-encodes in a path (the url crate's sets): a prefix
/// keeps its escapes and reserved characters, and loses its spaces and non-ASCII.
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'#')
    .add(b'?')
    .add(b'{')
    .add(b'}');
/// One path segment of a special scheme's URL: `/`, `\` and `%` are data too.
const PATH_SEGMENT: &AsciiSet = &PATH.add(b'/').add(b'%').add(b'\\');

/// Where the agent's API answers: `http://host[:port][/prefix]`. Plain HTTP only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Lowercase; an IPv6 address in brackets, in its shortest form.
    host: String,
    port: u16,
    /// Starts with `/`; just `/` without a prefix. Percent-encoded.
    path: String,
}

impl Endpoint {
    /// The URL of `segments` under the prefix, each segment percent-encoded, with `query`
    /// (form-encoded) when it is not empty.
    fn join(&self, segments: &[&str], query: &[(&str, &str)]) -> String {
        let mut s = String::new();
        self.write_origin(&mut s);
        // Like url's `pop_if_empty`: "/prefix/" and "/" lose their empty last segment.
        s.push_str(self.path.strip_suffix('/').unwrap_or(&self.path));
        for seg in segments {
            s.push('/');
            match *seg {
                // Sent as they are, these would climb the path: escaped, they are just a name
                // (which the agent refuses).
                "." => s.push_str("%2E"),
                ".." => s.push_str("%2E%2E"),
                _ => s.extend(utf8_percent_encode(seg, PATH_SEGMENT)),
            }
        }
        if !query.is_empty() {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.extend_pairs(query);
            s.push('?');
            s.push_str(&q.finish());
        }
        s
    }

    fn write_origin(&self, s: &mut String) {
        s.push_str("http://");
        s.push_str(&self.host);
        if self.port != 80 {
            s.push(':');
            s.push_str(&self.port.to_string());
        }
    }
}

impl std::fmt::Display for Endpoint {
    /// As a URL is written: `http://gw/`, `http://127.0.0.1:8740/`, `http://gw/fnlet/`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write_origin(&mut s);
        f.write_str(&s)?;
        f.write_str(&self.path)
    }
}

/// Parses an agent address: `http://host:port[/prefix]`, or `host:port` meaning http.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("the endpoint is empty".into());
    }
    let with_scheme = if t.contains("://") {
        t.to_string()
    } else {
        format!("http://{t}")
    };
    let not_url = |why: &dyn std::fmt::Display| format!("{s:?} is not a URL: {why}");
    let uri: Uri = with_scheme.parse().map_err(|e| not_url(&e))?;
    let authority = uri.authority().map_or("", |a| a.as_str());
    let raw_host = uri.host().unwrap_or_default();
    let host = match raw_host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => match v6.parse::<Ipv6Addr>() {
            Ok(ip) => format!("[{ip}]"),
            Err(_) => return Err(not_url(&"invalid IPv6 address")),
        },
        None => raw_host.to_ascii_lowercase(),
    };
    // http::Uri keeps a port it cannot read as written and reports none: read it here.
    let after_user = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match after_user
        .strip_prefix(raw_host)
        .and_then(|r| r.strip_prefix(':'))
    {
        None | Some("") => 80,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| not_url(&"invalid port number"))?,
    };
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: this fnlet speaks plain HTTP only; put the agent behind a TLS proxy \
                 and use an http:// endpoint on the proxy's host, or an SSH tunnel"
            ));
        }
        other => {
            let other = other.unwrap_or_default();
            return Err(format!("{s:?}: unsupported scheme {other:?} (use http://)"));
        }
    }
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "{s:?}: an endpoint has no user name or password (the token goes in --token, \
             FNLET_TOKEN or the token file)"
        ));
    }
    // http::Uri drops a fragment without a word: look for one in the text.
    if uri.query().is_some() || with_scheme.contains('#') {
        return Err(format!("{s:?}: an endpoint has no query or fragment"));
    }
    Ok(Endpoint {
        host,
        port,
        path: utf8_percent_encode(uri.path(), PATH).to_string(),
    })
}

/// Where the admin token came from; decides the hint shown when the agent refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Flag,
    Env,
    File(PathBuf),
    /// No token: the file could not be used.
    Missing {
        file: PathBuf,
        problem: TokenFileProblem,
    },
}

/// Why the token file gave no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFileProblem {
    NotFound,
    PermissionDenied,
    Empty,
    Other(String),
}

impl std::fmt::Display for TokenFileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenFileProblem::NotFound => f.write_str("it does not exist"),
            TokenFileProblem::PermissionDenied => f.write_str("permission denied"),
            TokenFileProblem::Empty => f.write_str("it is empty"),
            TokenFileProblem::Other(e) => f.write_str(e),
        }
    }
}

/// The agent to talk to, resolved from flags, the environment and the token file.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    pub token: Option<String>,
    pub token_source: TokenSource,
}

/// What the user passed on the command line.
#[derive(Debug, Clone, Default)]
pub struct TargetFlags {
    pub endpoint: Option<Endpoint>,
    pub token: Option<String>,
    pub state_dir: Option<PathBuf>,
}

/// The agent's state directory: --state-dir, else FNLET_STATE_DIR, else the default.
pub fn state_dir(flags: &TargetFlags, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    match (
        &flags.state_dir,
        env(ENV_STATE_DIR).filter(|v| !v.trim().is_empty()),
    ) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    }
}

/// Resolves the target: a flag beats its environment variable, which beats the default.
/// The token file `<state dir>/admin.token` is read only when no token was given.
///
/// `env` and `read_file` are parameters so the precedence can be tested without touching the
/// process environment.
pub fn resolve_target(
    flags: &TargetFlags,
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Target, String> {
    let env_set = |key: &str| env(key).filter(|v| !v.trim().is_empty());
    let endpoint = match (&flags.endpoint, env_set(ENV_ENDPOINT)) {
        (Some(url), _) => url.clone(),
        (None, Some(v)) => parse_endpoint(&v).map_err(|e| format!("{ENV_ENDPOINT}: {e}"))?,
        // An agent under systemd says where it listens (its listen may not be the default).
        (None, None) => match read_file(Path::new(RUNTIME_ENDPOINT_FILE)) {
            Ok(s) if !s.trim().is_empty() => {
                parse_endpoint(s.trim()).map_err(|e| format!("{RUNTIME_ENDPOINT_FILE}: {e}"))?
            }
            _ => parse_endpoint(DEFAULT_ENDPOINT)?,
        },
    };
    let (token, token_source) = if let Some(t) = flags.token.as_ref().filter(|t| !t.is_empty()) {
        (Some(t.trim().to_string()), TokenSource::Flag)
    } else if let Some(t) = env_set(ENV_TOKEN) {
        (Some(t.trim().to_string()), TokenSource::Env)
    } else {
        let file = state_dir(flags, env).join(TOKEN_FILE);
        match read_file(&file) {
            Ok(s) if !s.trim().is_empty() => (Some(s.trim().to_string()), TokenSource::File(file)),
            Ok(_) => (
                None,
                TokenSource::Missing {
                    file,
                    problem: TokenFileProblem::Empty,
                },
            ),
            Err(e) => {
                let problem = match e.kind() {
                    std::io::ErrorKind::NotFound => TokenFileProblem::NotFound,
                    std::io::ErrorKind::PermissionDenied => TokenFileProblem::PermissionDenied,
                    _ => TokenFileProblem::Other(e.to_string()),
                };
                (None, TokenSource::Missing { file, problem })
            }
        }
    };
    Ok(Target {
        endpoint,
        token,
        token_source,
    })
}

/// An error the agent answered with: `{"error": {"kind": "...", "message": "..."}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
    /// The error body as sent, when it was JSON (printed by `--json`).
    pub body: Option<Value>,
    pub request_id: Option<String>,
    pub version: Option<String>,
    pub retry_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the fnlet agent at {endpoint}: {reason} — is `fnlet agent` running?")]
    Unreachable { endpoint: String, reason: String },
    #[error("lost the connection to the fnlet agent at {endpoint}: {reason}")]
    Connection { endpoint: String, reason: String },
    #[error("error ({}): {}", .0.kind, .0.message)]
    Api(Box<ApiError>),
    #[error("unexpected answer from the fnlet agent at {endpoint}: {detail}")]
    Protocol { endpoint: String, detail: String },
}

impl ClientError {
    /// The agent could not be reached or went away: exit status 3.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::Connection { .. }
        )
    }
}

pub type ClientResult<T> = std::result::Result<T, ClientError>;

/// A deployed version (`Version` in the API).
#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
    pub created_at: String,
    #[serde(default)]
    pub active: Option<bool>,
}

/// `Manifest` in the API.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestInfo {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Value>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub max_concurrency: Option<u64>,
    #[serde(default)]
    pub min_instances: Option<u64>,
    #[serde(default)]
    pub public: Option<bool>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub handler: Option<String>,
    #[serde(default)]
    pub reuse_sandbox: bool,
    #[serde(default)]
    pub start_ahead: bool,
    /// `[aws]`: what the AWS tools set (role, a bootstrap's provided.* runtime and handler).
    #[serde(default)]
    pub aws: AwsInfo,
}

/// `[aws]` of a manifest in the API.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AwsInfo {
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub handler: Option<String>,
}

/// `Function` in the API.
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionInfo {
    pub name: String,
    pub version: u64,
    pub manifest: ManifestInfo,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub uid: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
    /// "active", or "failed" (stored but not runnable here), with the reason.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub running: Option<u64>,
    #[serde(default)]
    pub versions: Option<Vec<VersionInfo>>,
    /// What the agent runs: the manifest with the agent's defaults filled in.
    #[serde(default)]
    pub limits: Option<LimitsInfo>,
    /// Its outbound network (agents from before egress send none).
    #[serde(default)]
    pub network: Option<NetworkInfo>,
}

/// `Function.network` in the API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NetworkInfo {
    /// "none", "all", or a list of rules.
    pub egress: Value,
    #[serde(default)]
    pub rate_mbit: Option<u64>,
    /// The connection cap; absent without egress.
    #[serde(default)]
    pub max_connections: Option<u64>,
}

/// `Function.limits` in the API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LimitsInfo {
    pub memory_mb: u64,
    pub cpus: f64,
    pub timeout_s: f64,
    pub max_concurrency: u64,
}

impl Default for LimitsInfo {
    /// The API's documented defaults, for an agent that does not send `limits`.
    fn default() -> Self {
        LimitsInfo {
            memory_mb: 128,
            cpus: 1.0,
            timeout_s: 10.0,
            max_concurrency: 10,
        }
    }
}

/// `Status` in the API; every field is optional there.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StatusInfo {
    pub version: Option<String>,
    pub uptime_s: Option<f64>,
    pub functions: Option<u64>,
    pub running_instances: Option<u64>,
    pub cgroup: Option<String>,
    pub cgroup_root: Option<String>,
    pub state_dir: Option<String>,
    pub draining: Option<bool>,
    /// Controllers whose limits the host cannot enforce (absent from older agents).
    pub unenforced_limits: Option<Vec<String>>,
    /// Who clones sandboxes (absent from older agents).
    pub spawn_helper: Option<SpawnHelperStatus>,
    /// The cluster, when the agent is in one.
    pub cluster: Option<ClusterStatus>,
    /// What live instances hold of the host (absent from older agents).
    pub capacity: Option<CapacityStatus>,
}

/// The spawn helper: `up` (with its pid), `off` (`sandbox.spawn_helper = false`) or `lost`
/// (until a new one is ready), and how many lost ones were replaced.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SpawnHelperStatus {
    pub state: String,
    pub pid: Option<u32>,
    pub restarts: Option<u64>,
}

/// Committed and capacity of one resource.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Committed<T> {
    pub committed: T,
    pub capacity: T,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CapacityStatus {
    pub memory_bytes: Committed<u64>,
    pub cpus: Committed<f64>,
    pub instances: Committed<u64>,
    pub evictions: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ClusterStatus {
    pub node_id: String,
    pub peer_addr: String,
    pub members: std::collections::BTreeMap<String, u64>,
    /// Whether access keys made on this host work on every member (absent from older agents).
    pub shared_access_keys: Option<bool>,
}

/// One line of a function's log.
#[derive(Debug, Clone, Deserialize)]
pub struct LogLine {
    #[serde(default)]
    pub ts: String,
    #[serde(default)]
    pub function: String,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub line: String,
}

/// An answer from the agent whose body is still to be read (see [`Client::chunk`]).
pub type Response = http::Response<Incoming>;

/// A request body: bytes in memory, or a stream read as it is sent (a bundle being uploaded).
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A request body read from `stream` as it is sent.
pub fn stream_body<S>(stream: S) -> Body
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    use futures_util::TryStreamExt;
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An answer's body still to be read, over HTTP or QUIC; its errors say which agent.
pub type AnswerBody = UnsyncBoxBody<Bytes, ClientError>;

/// A successful invocation whose body is still to be read ([`Invocation::chunk`]).
#[derive(Debug)]
pub struct Invocation {
    pub status: StatusCode,
    pub request_id: Option<String>,
    pub version: Option<String>,
    /// Lambda mode: the function failed (X-Amz-Function-Error); the payload is its error.
    pub function_error: Option<String>,
    pub body: AnswerBody,
}

impl Invocation {
    /// An invocation's answer, over HTTP or QUIC: the request id and version as either front
    /// door names them (`/fn/{name}` or the Invoke API).
    pub fn from_answer(status: StatusCode, headers: &HeaderMap, body: AnswerBody) -> Invocation {
        Invocation {
            status,
            request_id: header(headers, HEADER_REQUEST_ID)
                .or_else(|| header(headers, "x-amzn-requestid")),
            version: header(headers, HEADER_VERSION)
                .or_else(|| header(headers, "x-amz-executed-version")),
            function_error: header(headers, "x-amz-function-error"),
            body,
        }
    }

    /// The next piece of the answer; `None` at its end.
    pub async fn chunk(&mut self) -> ClientResult<Option<Bytes>> {
        while let Some(frame) = self.body.frame().await {
            if let Ok(data) = frame?.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}

pub struct Client {
    // The legacy client reads no proxy settings from the environment: the agent is talked to
    // directly, as intended.
    http: HttpClient<HttpConnector, Body>,
    base: Endpoint,
    /// The endpoint as people write it, for messages.
    shown: String,
    /// `Bearer <token>`, made once so that a token unfit for a header fails before any request.
    authorization: Option<HeaderValue>,
}

impl Client {
    pub fn new(target: &Target) -> ClientResult<Client> {
        let shown = target
            .endpoint
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let authorization = match &target.token {
            Some(t) => {
                let mut v = HeaderValue::try_from(format!("Bearer {t}")).map_err(|_| {
                    ClientError::Protocol {
                        endpoint: shown.clone(),
                        detail: "setting up the HTTP client: the token is not a valid HTTP \
                                 header value"
                            .into(),
                    }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        // Headers and a small body go out at once, not held back for the agent's delayed ACK.
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Client {
            http,
            base: target.endpoint.clone(),
            shown,
            authorization,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.shown
    }

    /// `base` with `segments` appended, each percent-encoded, and `query` if any.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> ClientResult<Uri> {
        // Only fails if the endpoint were not a valid URL, which parse_endpoint saw to.
        self.base
            .join(segments, query)
            .parse()
            .map_err(|e| self.protocol(format!("building the request URL: {e}")))
    }

    fn request(&self, method: Method, uri: Uri, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(a) = &self.authorization {
            headers.insert(AUTHORIZATION, a.clone());
        }
        req
    }

    /// A request without a body.
    fn empty(&self, method: Method, segments: &[&str]) -> ClientResult<Request<Body>> {
        Ok(self.request(method, self.url(segments, &[])?, full(Bytes::new())))
    }

    /// A request with `body`, sent as `content_type`.
    fn with_body(
        &self,
        method: Method,
        segments: &[&str],
        content_type: &'static str,
        body: Body,
    ) -> ClientResult<Request<Body>> {
        let mut req = self.request(method, self.url(segments, &[])?, body);
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        Ok(req)
    }

    /// A request with a JSON body.
    fn with_json(
        &self,
        method: Method,
        segments: &[&str],
        body: &Value,
    ) -> ClientResult<Request<Body>> {
        // A Value's Display is its compact JSON, and cannot fail.
        let json = full(body.to_string());
        self.with_body(method, segments, "application/json", json)
    }

    /// Sends `req`; answers other than 2xx become `ClientError::Api`.
    async fn send(&self, req: Request<Body>) -> ClientResult<Response> {
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| self.transport(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.api_error(resp).await)
        }
    }

    async fn json(&self, req: Request<Body>) -> ClientResult<Value> {
        let mut resp = self.send(req).await?;
        let body = read_capped(&mut resp, MAX_JSON_BYTES + 1)
            .await
            .map_err(|e| self.transport(&e))?;
        if body.len() > MAX_JSON_BYTES {
            return Err(self.protocol(format!(
                "the answer is larger than {}",
                crate::units::format_size(MAX_JSON_BYTES as u64)
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("the answer is not JSON ({e})")))
    }

    /// GET /v1/status
    pub async fn status(&self) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "status"])?).await
    }

    /// GET /v1/functions
    pub async fn functions(&self) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "functions"])?)
            .await
    }

    /// GET /v1/functions/{name}
    pub async fn function(&self, name: &str) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "functions", name])?)
            .await
    }

    /// GET /v1/functions/{name}/versions
    pub async fn versions(&self, name: &str) -> ClientResult<Value> {
        let req = self.empty(Method::GET, &["v1", "functions", name, "versions"])?;
        self.json(req).await
    }

    /// DELETE /v1/functions/{name}
    pub async fn remove(&self, name: &str) -> ClientResult<()> {
        let req = self.empty(Method::DELETE, &["v1", "functions", name])?;
        self.send(req).await?;
        Ok(())
    }

    /// POST /v1/keys: a new access key, with its secret (shown this once).
    pub async fn create_key(
        &self,
        description: Option<&str>,
        scope: &str,
        functions: &[String],
    ) -> ClientResult<Value> {
        let mut body = serde_json::json!({ "scope": scope, "functions": functions });
        if let Some(d) = description {
            body["description"] = d.into();
        }
        self.json(self.with_json(Method::POST, &["v1", "keys"], &body)?)
            .await
    }

    /// POST /v1/cluster/init
    pub async fn cluster_init(&self, ttl_s: u64) -> ClientResult<Value> {
        let body = serde_json::json!({ "ttl_s": ttl_s });
        self.json(self.with_json(Method::POST, &["v1", "cluster", "init"], &body)?)
            .await
    }

    /// POST /v1/cluster/tokens
    pub async fn cluster_token(&self, ttl_s: u64) -> ClientResult<Value> {
        let body = serde_json::json!({ "ttl_s": ttl_s });
        self.json(self.with_json(Method::POST, &["v1", "cluster", "tokens"], &body)?)
            .await
    }

    /// GET /v1/triggers[?function=NAME]
    pub async fn triggers(&self, function: Option<&str>) -> ClientResult<Value> {
        let query: Vec<(&str, &str)> = function.map(|f| ("function", f)).into_iter().collect();
        let url = self.url(&["v1", "triggers"], &query)?;
        self.json(self.request(Method::GET, url, full(Bytes::new())))
            .await
    }

    /// GET /v1/cluster/members
    pub async fn members(&self) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "cluster", "members"])?)
            .await
    }

    /// GET /v1/keys
    pub async fn keys(&self) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "keys"])?).await
    }

    /// DELETE /v1/keys/{id}
    pub async fn remove_key(&self, id: &str) -> ClientResult<()> {
        self.send(self.empty(Method::DELETE, &["v1", "keys", id])?)
            .await?;
        Ok(())
    }

    /// POST /v1/functions/{name}/rollback, to the version before the active one by default.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> ClientResult<Value> {
        let body = match to {
            Some(v) => serde_json::json!({ "to": v }),
            None => serde_json::json!({}),
        };
        let req = self.with_json(Method::POST, &["v1", "functions", name, "rollback"], &body)?;
        self.json(req).await
    }

    /// POST /v1/functions with a bundle of `len` bytes.
    pub async fn deploy(
        &self,
        body: Body,
        len: u64,
        content_type: &'static str,
    ) -> ClientResult<Value> {
        let mut req = self.with_body(Method::POST, &["v1", "functions"], content_type, body)?;
        // A streamed body has no length of its own: say it, so the agent can refuse an
        // oversized bundle before it arrives.
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
        self.json(req).await
    }

    /// POST /fn/{name}; the caller reads the function's output from the response.
    pub async fn invoke(&self, name: &str, input: Vec<u8>) -> ClientResult<Invocation> {
        let req = self.with_body(
            Method::POST,
            &["fn", name],
            "application/octet-stream",
            full(input),
        )?;
        let response = self.send(req).await?;
        Ok(self.invocation(response))
    }

    /// POST /2015-03-31/functions/{name}/invocations: the Lambda Invoke API, for a Lambda-mode
    /// function (the input is its JSON event).
    pub async fn invoke_lambda(&self, name: &str, input: Vec<u8>) -> ClientResult<Invocation> {
        let req = self.with_body(
            Method::POST,
            &["2015-03-31", "functions", name, "invocations"],
            "application/json",
            full(input),
        )?;
        let response = self.send(req).await?;
        Ok(self.invocation(response))
    }

    /// An Event invoke through the Invoke API (any mode): the request id of the accepted event.
    pub async fn invoke_event(&self, name: &str, input: Vec<u8>) -> ClientResult<String> {
        let mut req = self.with_body(
            Method::POST,
            &["2015-03-31", "functions", name, "invocations"],
            "application/json",
            full(input),
        )?;
        req.headers_mut()
            .insert("x-amz-invocation-type", HeaderValue::from_static("Event"));
        let response = self.send(req).await?;
        Ok(response
            .headers()
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string())
    }

    /// POST /v1/topics/{topic} with `body` and `headers` (binary mode's `ce-*`, the content
    /// type): the agent's answer (the deliveries made).
    pub async fn publish(
        &self,
        topic: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> ClientResult<Value> {
        let mut req = self.request(
            Method::POST,
            self.url(&["v1", "topics", topic], &[])?,
            full(body),
        );
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| self.protocol(format!("header {k}: {e}")))?;
            let value =
                HeaderValue::from_str(v).map_err(|e| self.protocol(format!("header {k}: {e}")))?;
            req.headers_mut().insert(name, value);
        }
        self.json(req).await
    }

    /// GET /v1/topics
    pub async fn topics(&self) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "topics"])?).await
    }

    /// GET /v1/functions/{name}/events
    pub async fn events(&self, name: &str) -> ClientResult<Value> {
        self.json(self.empty(Method::GET, &["v1", "functions", name, "events"])?)
            .await
    }

    fn invocation(&self, response: Response) -> Invocation {
        let (parts, body) = response.into_parts();
        let shown = self.shown.clone();
        let body = body
            .map_err(move |e| transport_error(&shown, &e))
            .boxed_unsync();
        Invocation::from_answer(parts.status, &parts.headers, body)
    }

    /// GET /v1/functions/{name}/logs; the caller reads the NDJSON lines as they come.
    pub async fn logs(
        &self,
        name: &str,
        follow: bool,
        tail: Option<u64>,
    ) -> ClientResult<Response> {
        let tail = tail.map(|n| n.to_string());
        let mut query = vec![("follow", if follow { "true" } else { "false" })];
        if let Some(n) = &tail {
            query.push(("tail", n));
        }
        let url = self.url(&["v1", "functions", name, "logs"], &query)?;
        let req = self.request(Method::GET, url, full(Bytes::new()));
        self.send(req).await
    }

    /// Reads the next piece of a streamed answer; `None` at its end.
    pub async fn chunk(&self, resp: &mut Response) -> ClientResult<Option<Bytes>> {
        next_data(resp).await.map_err(|e| self.transport(&e))
    }

    /// A failed exchange: `Unreachable` if no connection could be made, `Connection` if it
    /// broke. `e` is the client's error, or the body's while an answer is read.
    fn transport(&self, e: &(dyn std::error::Error + 'static)) -> ClientError {
        transport_error(&self.shown, e)
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            endpoint: self.shown.clone(),
            detail,
        }
    }

    async fn api_error(&self, mut resp: Response) -> ClientError {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = match read_capped(&mut resp, MAX_ERROR_BYTES).await {
            Ok(b) => b,
            Err(e) => return self.transport(&e),
        };
        ClientError::Api(Box::new(parse_api_error(status, &headers, &body)))
    }
}

/// A failed exchange with the agent at `endpoint`: `Unreachable` if no connection could be
/// made, `Connection` if it broke.
fn transport_error(endpoint: &str, e: &(dyn std::error::Error + 'static)) -> ClientError {
    let reason = describe_transport(e);
    let connect = e
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(hyper_util::client::legacy::Error::is_connect);
    if connect {
        ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason,
        }
    } else {
        ClientError::Connection {
            endpoint: endpoint.to_string(),
            reason,
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Builds the error from the agent's body, or from the status when the body is not fnlet's
/// (a proxy in between, or not an fnlet agent at all).
pub fn parse_api_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ApiError {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        kind: String,
        message: String,
    }
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let parsed = json
        .clone()
        .and_then(|v| serde_json::from_value::<Envelope>(v).ok());
    let (kind, message) = match parsed {
        Some(e) => (e.error.kind, e.error.message),
        None => {
            let kind = match status.as_u16() {
                400 => "bad_request".to_string(),
                401 => "unauthorized".into(),
                403 => "forbidden".into(),
                404 => "not_found".into(),
                413 => "payload_too_large".into(),
                429 => "overloaded".into(),
                500 => "internal".into(),
                503 => "unavailable".into(),
                504 => "timeout".into(),
                n => format!("http_{n}"),
            };
            let text = String::from_utf8_lossy(body);
            let first = text.lines().map(str::trim).find(|l| !l.is_empty());
            let message = match first {
                Some(l) if l.chars().count() > 200 => {
                    format!("{}…", l.chars().take(200).collect::<String>())
                }
                Some(l) => l.to_string(),
                None => format!(
                    "the server answered {status} without an fnlet error body; is the endpoint \
                     an fnlet agent?"
                ),
            };
            (kind, message)
        }
    };
    ApiError {
        status,
        kind,
        message,
        body: json,
        request_id: header(headers, HEADER_REQUEST_ID),
        version: header(headers, HEADER_VERSION),
        retry_after: header(headers, RETRY_AFTER.as_str()),
    }
}

/// The next data frame of `resp`'s body; trailers are skipped (nothing here reads them).
async fn next_data(resp: &mut Response) -> Result<Option<Bytes>, hyper::Error> {
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Up to `cap` bytes of `resp`'s body; the rest is left unread.
async fn read_capped(resp: &mut Response, cap: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = next_data(resp).await? {
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= cap {
            break;
        }
    }
    Ok(buf)
}

/// The root cause of a transport failure, in words ("connection refused").
fn describe_transport(e: &(dyn std::error::Error + 'static)) -> String {
    let mut source = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            let said = match io.kind() {
                ConnectionRefused => "connection refused",
                ConnectionReset => "connection reset",
                ConnectionAborted => "connection aborted",
                TimedOut => "connection timed out",
                HostUnreachable => "host unreachable",
                NetworkUnreachable => "network unreachable",
                AddrNotAvailable => "address not available",
                UnexpectedEof => "the agent closed the connection",
                _ => "",
            };
            if !said.is_empty() {
                return said.to_string();
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    innermost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn no_file(_: &Path) -> std::io::Result<String> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:8740").unwrap().to_string(),
            "http://127.0.0.1:8740/"
        );
        assert_eq!(
            parse_endpoint("10.0.0.5:9000").unwrap().to_string(),
            "http://10.0.0.5:9000/"
        );
        assert_eq!(
            parse_endpoint("localhost:8740").unwrap().to_string(),
            "http://localhost:8740/"
        );
        assert_eq!(
            parse_endpoint("http://gw/fnlet/").unwrap().to_string(),
            "http://gw/fnlet/"
        );
        assert!(
            parse_endpoint("https://x")
                .unwrap_err()
                .contains("plain HTTP")
        );
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("").is_err());
        assert!(parse_endpoint("http://x/?a=b").is_err());
        assert!(parse_endpoint("http://").is_err());
    }

    #[test]
    fn endpoint_precedence() {
        let flags = TargetFlags {
            endpoint: Some(parse_endpoint("http://flag:1").unwrap()),
            ..Default::default()
        };
        let env = env_of(&[("FNLET_ENDPOINT", "http://env:2")]);
        let t = resolve_target(&flags, &env, &no_file).unwrap();
        assert_eq!(t.endpoint.to_string(), "http://flag:1/");

        let t = resolve_target(&TargetFlags::default(), &env, &no_file).unwrap();
        assert_eq!(t.endpoint.to_string(), "http://env:2/");

        let t = resolve_target(&TargetFlags::default(), &env_of(&[]), &no_file).unwrap();
        assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:8740/");

        // An empty variable counts as unset.
        let t = resolve_target(
            &TargetFlags::default(),
            &env_of(&[("FNLET_ENDPOINT", "")]),
            &no_file,
        )
        .unwrap();
        assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:8740/");

        let err = resolve_target(
            &TargetFlags::default(),
            &env_of(&[("FNLET_ENDPOINT", "https://x")]),
            &no_file,
        )
        .unwrap_err();
        assert!(err.starts_with("FNLET_ENDPOINT: "), "{err}");
    }

    #[test]
    fn token_precedence() {
        let file = |p: &Path| -> std::io::Result<String> {
            if p == Path::new(RUNTIME_ENDPOINT_FILE) {
                return Err(std::io::ErrorKind::NotFound.into());
            }
            assert!(p.ends_with("admin.token"));
            Ok(format!("file-token-from {}\n", p.display()))
        };
        let env = env_of(&[
            ("FNLET_TOKEN", "env-token"),
            ("FNLET_STATE_DIR", "/env/dir"),
        ]);

        let flags = TargetFlags {
            token: Some("flag-token".into()),
            ..Default::default()
        };
        let t = resolve_target(&flags, &env, &file).unwrap();
        assert_eq!(t.token.as_deref(), Some("flag-token"));
        assert_eq!(t.token_source, TokenSource::Flag);

        let t = resolve_target(&TargetFlags::default(), &env, &file).unwrap();
        assert_eq!(t.token.as_deref(), Some("env-token"));
        assert_eq!(t.token_source, TokenSource::Env);

        // No token given: the file in the state dir, flag over env over default; trimmed.
        let env = env_of(&[("FNLET_STATE_DIR", "/env/dir")]);
        let t = resolve_target(&TargetFlags::default(), &env, &file).unwrap();
        assert_eq!(
            t.token.as_deref(),
            Some("file-token-from /env/dir/admin.token")
        );
        assert_eq!(
            t.token_source,
            TokenSource::File("/env/dir/admin.token".into())
        );
        let flags = TargetFlags {
            state_dir: Some("/flag/dir".into()),
            ..Default::default()
        };
        let t = resolve_target(&flags, &env, &file).unwrap();
        assert_eq!(
            t.token.as_deref(),
            Some("file-token-from /flag/dir/admin.token")
        );
        let t = resolve_target(&TargetFlags::default(), &env_of(&[]), &file).unwrap();
        assert_eq!(
            t.token.as_deref(),
            Some("file-token-from /var/lib/fnlet/admin.token")
        );
    }

    #[test]
    fn an_agent_under_systemd_tells_the_cli_where_it_listens() {
        let runtime = |p: &Path| -> std::io::Result<String> {
            match p.to_str() {
                Some(RUNTIME_ENDPOINT_FILE) => Ok("http://127.0.0.1:9000\n".into()),
                _ => Err(std::io::ErrorKind::NotFound.into()),
            }
        };
        let t = resolve_target(&TargetFlags::default(), &env_of(&[]), &runtime).unwrap();
        assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:9000/");
        // The variable still wins.
        let env = env_of(&[("FNLET_ENDPOINT", "http://10.0.0.1:1")]);
        let t = resolve_target(&TargetFlags::default(), &env, &runtime).unwrap();
        assert_eq!(t.endpoint.to_string(), "http://10.0.0.1:1/");
    }

    #[test]
    fn an_unreadable_token_file_means_no_token() {
        let t = resolve_target(&TargetFlags::default(), &env_of(&[]), &no_file).unwrap();
        assert_eq!(t.token, None);
        assert_eq!(
            t.token_source,
            TokenSource::Missing {
                file: "/var/lib/fnlet/admin.token".into(),
                problem: TokenFileProblem::PermissionDenied,
            }
        );
        let empty = |_: &Path| Ok("  \n".to_string());
        let t = resolve_target(&TargetFlags::default(), &env_of(&[]), &empty).unwrap();
        assert_eq!(t.token, None);
    }

    #[test]
    fn api_errors_from_the_agent() {
        let mut headers = HeaderMap::new();
        headers.insert("x-fnlet-request-id", "req-1".parse().unwrap());
        headers.insert("retry-after", "2".parse().unwrap());
        let body = br#"{"error":{"kind":"overloaded","message":"hello is at max_concurrency"}}"#;
        let e = parse_api_error(StatusCode::TOO_MANY_REQUESTS, &headers, body);
        assert_eq!(e.kind, "overloaded");
        assert_eq!(e.message, "hello is at max_concurrency");
        assert_eq!(e.request_id.as_deref(), Some("req-1"));
        assert_eq!(e.retry_after.as_deref(), Some("2"));
        assert!(e.body.is_some());
        assert_eq!(
            ClientError::Api(Box::new(e)).to_string(),
            "error (overloaded): hello is at max_concurrency"
        );
    }

    #[test]
    fn api_errors_without_fnlet_bodies() {
        let e = parse_api_error(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            b"<html>\n<h1>Not Found</h1>",
        );
        assert_eq!(e.kind, "not_found");
        assert_eq!(e.message, "<html>");
        let e = parse_api_error(StatusCode::IM_A_TEAPOT, &HeaderMap::new(), b"");
        assert_eq!(e.kind, "http_418");
        assert!(e.message.contains("418"), "{}", e.message);
    }

    #[test]
    fn urls_are_built_from_segments() {
        let target = Target {
            endpoint: parse_endpoint("http://gw:1/prefix").unwrap(),
            token: None,
            token_source: TokenSource::Flag,
        };
        let c = Client::new(&target).unwrap();
        assert_eq!(
            c.url(&["v1", "functions", "a b/c"], &[])
                .unwrap()
                .to_string(),
            "http://gw:1/prefix/v1/functions/a%20b%2Fc"
        );
        let target = Target {
            endpoint: parse_endpoint("http://gw:1/").unwrap(),
            ..target
        };
        let c = Client::new(&target).unwrap();
        assert_eq!(
            c.url(&["fn", "x"], &[]).unwrap().to_string(),
            "http://gw:1/fn/x"
        );
        assert_eq!(c.endpoint(), "http://gw:1");
    }

    #[test]
    fn endpoint_parts() {
        let e = parse_endpoint("http://[::1]:9000/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("[::1]", 9000, "/")
        );
        assert_eq!(e.to_string(), "http://[::1]:9000/");
        // Without a scheme, and in its shortest form.
        let e = parse_endpoint("[0:0::1]:8740").unwrap();
        assert_eq!(e.to_string(), "http://[::1]:8740/");
        // The default port is not written out; the host is lowercase.
        let e = parse_endpoint("HTTP://GW:80").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("gw", 80, "/"));
        assert_eq!(e.to_string(), "http://gw/");
        assert_eq!(parse_endpoint("http://gw:").unwrap().port, 80);
        // A prefix keeps its form; what a URL cannot hold is percent-encoded.
        let e = parse_endpoint("http://gw/fnlet").unwrap();
        assert_eq!((e.port, e.path.as_str()), (80, "/fnlet"));
        assert_eq!(e.to_string(), "http://gw/fnlet");
        assert_eq!(
            parse_endpoint("http://gw/é%20/").unwrap().path,
            "/%C3%A9%20/"
        );
    }

    #[test]
    fn endpoints_refused() {
        let err = |s: &str| parse_endpoint(s).unwrap_err();
        assert_eq!(err("  "), "the endpoint is empty");
        assert!(err("http://[zz]/").contains("is not a URL: invalid IPv6 address"));
        assert!(err("http://x:99999").contains("is not a URL: invalid port number"));
        assert!(err("http://x:8o").contains("invalid port number"));
        assert!(err("http://x y").contains("is not a URL"));
        assert!(err("HTTPS://x").contains("plain HTTP only"));
        assert_eq!(
            err("ftp://x"),
            "\"ftp://x\": unsupported scheme \"ftp\" (use http://)"
        );
        assert_eq!(err("http://:80"), "\"http://:80\" has no host");
        assert!(err("http://x/?").contains("no query or fragment"));
        assert!(err("http://x/#top").contains("no query or fragment"));
        assert!(err("http://u:p@x/").contains("no user name or password"));
    }

    #[test]
    fn segments_are_encoded_one_by_one() {
        let e = parse_endpoint("http://[::1]:1/p/").unwrap();
        assert_eq!(
            e.join(&["fn", "a b", "c/d", "50%", "x?y#z", "é"], &[]),
            "http://[::1]:1/p/fn/a%20b/c%2Fd/50%25/x%3Fy%23z/%C3%A9"
        );
        // Dot segments would be resolved away by whoever reads the path.
        assert_eq!(
            e.join(&["fn", "..", "."], &[]),
            "http://[::1]:1/p/fn/%2E%2E/%2E"
        );
        assert_eq!(
            e.join(&["logs"], &[("follow", "true"), ("tail", "a b&c")]),
            "http://[::1]:1/p/logs?follow=true&tail=a+b%26c"
        );
        let e = parse_endpoint("gw").unwrap();
        assert_eq!(e.join(&["v1", "status"], &[]), "http://gw/v1/status");
        // What join builds is a valid request URI.
        let target = Target {
            endpoint: parse_endpoint("http://[::1]:1/p").unwrap(),
            token: Some("t".into()),
            token_source: TokenSource::Flag,
        };
        let c = Client::new(&target).unwrap();
        let uri = c.url(&["fn", "a b{}|^\\"], &[("q", "1")]).unwrap();
        assert_eq!(uri.host(), Some("[::1]"));
        assert_eq!(uri.port_u16(), Some(1));
        assert_eq!(uri.path(), "/p/fn/a%20b%7B%7D|^%5C");
        assert_eq!(uri.query(), Some("q=1"));
    }

    #[test]
    fn a_token_unfit_for_a_header_is_refused_before_any_request() {
        let target = Target {
            endpoint: parse_endpoint(DEFAULT_ENDPOINT).unwrap(),
            token: Some("a\nb".into()),
            token_source: TokenSource::Flag,
        };
        assert!(matches!(
            Client::new(&target),
            Err(ClientError::Protocol { .. })
        ));
    }
}
