//! The real `fnlet agent` for one test: its own port, state dir, cgroup root and uid range,
//! driven over HTTP and through the CLI, and checked for leftovers once it has stopped.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::blocking::{Body, Client};
use reqwest::header::{self, HeaderMap};
use serde_json::Value;

use super::{
    HostState, cgroup_root, fnlet, host_state, in_netns, leftover_cgroups, processes_matching,
};

/// Config keys a test may change; everything else is the agent's embedded default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[limits] queue_timeout_ms`: short, so concurrency tests see 429 quickly.
    pub queue_timeout_ms: u64,
    pub shutdown_grace_s: f64,
    /// `[sandbox] prepare_ahead`: off where a test counts sandboxes, since a prepared one waits
    /// per function.
    pub prepare_ahead: bool,
    /// Where the agent's folder (state dir, config, log) is made; None: the system's temp dir.
    /// A Lambda runtime installed under the state dir needs one outside /tmp, which every
    /// sandbox has of its own.
    pub dir_in: Option<PathBuf>,
    /// More `[limits]` lines, as TOML (`"header_timeout_s = 1\n"`).
    pub limits_extra: String,
    /// `[sandbox] cgroup_root`; None: the test's own, `fnlet-test-<pid>-<test>`. A root that
    /// another agent of the test uses is not checked for leftovers at start.
    pub cgroup_root: Option<String>,
    /// `--state-dir`; None: `state/` in the agent's own folder.
    pub state_dir: Option<PathBuf>,
    /// Run the agent in this network namespace (a name under /run/netns). The test process
    /// is outside it, so the agent's API is then called with curl from inside it.
    pub netns: Option<String>,
    /// `--listen`; None: 127.0.0.1 and a free port.
    pub listen: Option<SocketAddr>,
    /// `[cluster] listen`; None: 127.0.0.1 and a free UDP port.
    pub peer_listen: Option<SocketAddr>,
    /// `--node-id`; None: `n-<test>`.
    pub node_id: Option<String>,
    /// More `fnlet agent` arguments (`--join`, `--token`).
    pub args: Vec<String>,
    /// More `[cluster]` lines, as TOML (`"node_cert_validity_s = 24\n"`).
    pub cluster_extra: String,
    /// `[network]` lines, as TOML (`"bridge = \"fnt1\"\n"`).
    pub network_extra: String,
    /// `[capacity]` lines, as TOML (`"memory_mb = 256\n"`).
    pub capacity_extra: String,
    /// More `[sandbox]` lines, as TOML (`"user_namespace = true\n"`).
    pub sandbox_extra: String,
    /// `[lambda]` lines, as TOML (`"runtime_api_socketpair = false\n"`).
    pub lambda_extra: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_timeout_ms: 200,
            shutdown_grace_s: 10.0,
            prepare_ahead: true,
            dir_in: None,
            limits_extra: String::new(),
            cgroup_root: None,
            state_dir: None,
            netns: None,
            listen: None,
            peer_listen: None,
            node_id: None,
            args: Vec::new(),
            cluster_extra: String::new(),
            network_extra: String::new(),
            capacity_extra: String::new(),
            sandbox_extra: String::new(),
            lambda_extra: String::new(),
        }
    }
}

/// Uids the agent gives functions: a range per test and test process, so "no process of ours
/// is left" can be checked while other tests (and other runs of this one) go on.
fn uid_range(test: &str) -> Range<u32> {
    // FNV-1a of the pid and the name into one of ten million slots of 64 uids.
    let key = format!("{}-{test}", std::process::id());
    let h = key.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let base = 100_000_000 + (h % 10_000_000) * 64;
    base..base + 64
}

/// A node id for the test's agent: its name as a DNS label.
fn node_id(test: &str) -> String {
    let label: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    format!("n-{}", label.trim_matches('-'))
}

/// A free UDP port on 127.0.0.1 (bound, then released for the agent).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp 127.0.0.1:0")
        .port()
}

/// A free port on 127.0.0.1 (bound, then released for the agent).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// An HTTP answer, read in full.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Checks the error body is `{"error": {"kind": "...", "message": "..."}}` and nothing
    /// else; returns (kind, message).
    pub fn error(&self) -> (String, String) {
        let v = self.json();
        let obj = v.as_object().expect("error body is an object");
        assert_eq!(obj.len(), 1, "error body has only `error`: {v}");
        let e = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("no `error` object: {v}"));
        let kind = e["kind"].as_str().unwrap_or_else(|| panic!("no kind: {v}"));
        let message = e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {v}"));
        assert!(!message.is_empty(), "empty message: {v}");
        (kind.to_string(), message.to_string())
    }

    /// Asserts the status and the error kind; returns the message.
    pub fn expect_error(&self, status: u16, kind: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "expected {status} {kind}, got {} {}",
            self.status,
            self.text()
        );
        let (k, message) = self.error();
        assert_eq!(k, kind, "{}", self.text());
        message
    }

    pub fn expect_ok(&self, status: u16) -> &Self {
        assert_eq!(
            self.status,
            status,
            "expected {status}, got {} {}",
            self.status,
            self.text()
        );
        self
    }
}

/// How the test reaches an agent's API.
#[derive(Clone)]
enum Api {
    /// Directly: the agent is in the test's network namespace.
    Direct(Client),
    /// With curl run inside the agent's network namespace (named).
    Curl(String),
}

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Api {
    /// One HTTP call; Err: no answer came (the client's words).
    fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        body: Option<Body>,
    ) -> Result<Resp, String> {
        match self {
            Api::Direct(http) => {
                let mut req = http.request(method, url);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                if let Some(b) = body {
                    req = req.body(b);
                }
                let resp = req.send().map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let body = resp.bytes().map_err(|e| e.to_string())?.to_vec();
                Ok(Resp {
                    status,
                    headers,
                    body,
                })
            }
            Api::Curl(ns) => {
                let body = body.map(|b| {
                    b.as_bytes()
                        .expect("curl takes a body held in memory, not a stream")
                        .to_vec()
                });
                curl(ns, method, url, headers, body)
            }
        }
    }
}

/// An HTTP call made by curl in network namespace `ns`: the answer's head and body as curl
/// printed them (`-i`).
fn curl(
    ns: &str,
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Option<Vec<u8>>,
) -> Result<Resp, String> {
    let mut cmd = in_netns(Some(ns), "curl");
    cmd.args(["-sS", "-i", "--noproxy", "*", "--max-time"])
        .arg(CALL_TIMEOUT.as_secs().to_string())
        .args(["-X", method.as_str()])
        // No `Expect: 100-continue` (a second head), and no content type the caller did
        // not give (curl adds one to every body).
        .args(["-H", "Expect:"]);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        cmd.args(["-H", "Content-Type:"]);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(url)
        .stdin(if body.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("running curl: {e}"))?;
    // Written from another thread: curl may answer before it has read everything.
    let writer = match (child.stdin.take(), body) {
        (Some(mut stdin), Some(b)) => Some(std::thread::spawn(move || {
            let _ = stdin.write_all(&b);
        })),
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for curl: {e}"))?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    if !out.status.success() {
        return Err(format!(
            "curl {method} {url}: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    parse_http_answer(&out.stdout)
}

/// An answer as `curl -i` prints it: a head (after any 1xx heads), a blank line, the body.
fn parse_http_answer(mut raw: &[u8]) -> Result<Resp, String> {
    loop {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no HTTP head in {:?}", String::from_utf8_lossy(raw)))?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw = &raw[end + 4..];
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {head:?}"))?;
        if (100..200).contains(&status) {
            continue;
        }
        let mut headers = HeaderMap::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?}"))?;
            let name = header::HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|e| format!("header {k:?}: {e}"))?;
            let value = header::HeaderValue::from_str(v.trim())
                .map_err(|e| format!("header {k:?}: {e}"))?;
            headers.append(name, value);
        }
        return Ok(Resp {
            status,
            headers,
            body: raw.to_vec(),
        });
    }
}

/// An agent that exited during its start-up.
#[derive(Debug)]
pub struct Refused {
    pub status: ExitStatus,
    /// Everything it wrote.
    pub log: String,
}

/// A running agent; dropping it stops it (SIGTERM, then SIGKILL).
pub struct Agent {
    pub test: String,
    /// The cgroup root of its sandboxes, `fnlet-test-<pid>-<test>`.
    pub root: String,
    pub port: u16,
    /// The address it listens on (127.0.0.1 unless [`Settings::listen`] says otherwise).
    pub ip: IpAddr,
    /// The UDP port of its cluster endpoint (`[cluster] listen`: 127.0.0.1, or
    /// [`Settings::peer_listen`]), open once it is in a cluster.
    pub peer_port: u16,
    pub token: String,
    /// The uids its functions run as.
    pub uids: Range<u32>,
    /// Its node id (`--node-id`), which invocation answers name in `x-fnlet-host`.
    pub node_id: String,
    /// The network namespace it runs in ([`Settings::netns`]).
    pub netns: Option<String>,
    /// More `fnlet agent` arguments, used at each start: a test may change them between a
    /// stop and a restart (a join token is needed only at the first start).
    pub args: Vec<String>,
    dir: tempfile::TempDir,
    state: PathBuf,
    child: Option<Child>,
    before: HostState,
    api: Api,
}

impl Agent {
    pub fn start(test: &str) -> Agent {
        Agent::start_with(test, Settings::default())
    }

    pub fn start_with(test: &str, settings: Settings) -> Agent {
        match Agent::try_start_with(test, settings) {
            Ok(agent) => agent,
            Err(refused) => panic!(
                "fnlet agent exited during start-up ({}):\n{}",
                refused.status, refused.log
            ),
        }
    }

    /// Like [`Agent::start_with`], for an agent that may refuse to start: its exit status and
    /// log then.
    pub fn try_start_with(test: &str, settings: Settings) -> Result<Agent, Refused> {
        super::require_root();
        let root = match &settings.cgroup_root {
            Some(r) => r.clone(),
            None => {
                let root = cgroup_root(test);
                assert_eq!(
                    leftover_cgroups(&root),
                    Vec::<PathBuf>::new(),
                    "cgroups of an earlier run of {test}"
                );
                root
            }
        };
        let before = host_state();
        let prefix = format!("fnlet-agent-{test}-");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        let dir = match &settings.dir_in {
            Some(parent) => {
                std::fs::create_dir_all(parent).expect("create the agents' parent dir");
                builder.tempdir_in(parent)
            }
            None => builder.tempdir(),
        }
        .expect("tempdir");
        let uids = uid_range(test);
        let peer_listen = settings
            .peer_listen
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, free_udp_port())));
        // The file is named after the cgroup root, so the agent's command line (and that of
        // any process it forked) mentions the root: processes_matching(root) finds them.
        let config = format!(
            "shutdown_grace_s = {}\n\n[limits]\nqueue_timeout_ms = {}\n{}\n[sandbox]\ncgroup_root = \"{root}\"\nuid_base = {}\nuid_count = {}\nprepare_ahead = {}\n{}\n[cluster]\nlisten = \"{peer_listen}\"\n{}\n[network]\n{}\n[capacity]\n{}\n[lambda]\n{}",
            settings.shutdown_grace_s,
            settings.queue_timeout_ms,
            settings.limits_extra,
            uids.start,
            uids.end - uids.start,
            settings.prepare_ahead,
            settings.sandbox_extra,
            settings.cluster_extra,
            settings.network_extra,
            settings.capacity_extra,
            settings.lambda_extra,
        );
        std::fs::write(dir.path().join(format!("{root}.toml")), config).expect("write config");
        let api = match &settings.netns {
            None => Api::Direct(
                Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("http client"),
            ),
            Some(ns) => Api::Curl(ns.clone()),
        };
        let state = settings
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let listen = settings
            .listen
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())));
        let mut agent = Agent {
            test: test.into(),
            root,
            port: listen.port(),
            ip: listen.ip(),
            peer_port: peer_listen.port(),
            token: String::new(),
            node_id: settings.node_id.clone().unwrap_or_else(|| node_id(test)),
            uids,
            netns: settings.netns.clone(),
            args: settings.args.clone(),
            dir,
            state,
            child: None,
            before,
            api,
        };
        if let Err(status) = agent.try_spawn() {
            return Err(Refused {
                status,
                log: agent.log(),
            });
        }
        agent.read_token();
        Ok(agent)
    }

    /// Reads the admin token the agent keeps in its state dir (made at its first start).
    fn read_token(&mut self) {
        self.token = std::fs::read_to_string(self.state_dir().join("admin.token"))
            .expect("admin.token in the state dir")
            .trim()
            .to_string();
        assert_eq!(self.token.len(), 64, "admin token: {:?}", self.token);
    }

    /// The agent's cgroup root (below each hierarchy).
    pub fn cgroup_root(&self) -> String {
        self.root.clone()
    }

    /// Live processes running as one of the test's function uids.
    pub fn function_processes(&self) -> Vec<String> {
        processes_of_uids(&self.uids)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.toml", self.root))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the agent process is running (started, and not seen to exit).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.ip, self.port))
    }

    /// Starts the agent on this state dir and waits for /readyz.
    fn spawn(&mut self) {
        if let Err(status) = self.try_spawn() {
            panic!(
                "fnlet agent exited during start-up ({status}):\n{}",
                self.log()
            );
        }
    }

    /// Starts the agent and waits for /readyz, or for its exit during start-up.
    fn try_spawn(&mut self) -> Result<(), ExitStatus> {
        assert!(self.child.is_none(), "agent already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        // nsenter execs the agent: the child's pid is the agent's.
        let child = in_netns(self.netns.as_deref(), fnlet())
            .arg("agent")
            .arg("--listen")
            .arg(SocketAddr::new(self.ip, self.port).to_string())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.config_path())
            .arg("--node-id")
            .arg(&self.node_id)
            .args(&self.args)
            .env("FNLET_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start fnlet agent");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(status);
            }
            if let Ok(r) = self.try_request(Method::GET, "/readyz", false, None)
                && r.status == 200
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "fnlet agent not ready after 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One HTTP call to the agent; `auth` adds the admin token. Err: the call got no answer
    /// (what the client said).
    pub fn try_request(
        &self,
        method: Method,
        path: &str,
        auth: bool,
        body: Option<Body>,
    ) -> Result<Resp, String> {
        let mut headers = Vec::new();
        if auth {
            headers.push((
                "authorization".to_string(),
                format!("Bearer {}", self.token),
            ));
        }
        self.api.send(
            method,
            &format!("{}{path}", self.base_url()),
            &headers,
            body,
        )
    }

    pub fn request(&self, method: Method, path: &str, auth: bool, body: Option<Body>) -> Resp {
        self.try_request(method.clone(), path, auth, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nagent log:\n{}", self.log()))
    }

    /// A request with the given bearer token, to send yourself (an agent in the test's own
    /// network namespace only).
    pub fn http_with_token(
        &self,
        method: Method,
        path: &str,
        token: &str,
    ) -> reqwest::blocking::RequestBuilder {
        let Api::Direct(http) = &self.api else {
            panic!("http_with_token: the agent runs in another network namespace");
        };
        http.request(method, format!("{}{path}", self.base_url()))
            .bearer_auth(token)
    }

    /// POST /fn/{name} from another thread; join for the answer (or the transport error).
    pub fn invoke_in_background(
        &self,
        name: &str,
        input: &[u8],
    ) -> std::thread::JoinHandle<Result<Resp, String>> {
        let api = self.api.clone();
        let url = format!("{}/fn/{name}", self.base_url());
        let input = input.to_vec();
        std::thread::spawn(move || api.send(Method::POST, &url, &[], Some(Body::from(input))))
    }

    /// GET without the token.
    pub fn get(&self, path: &str) -> Resp {
        self.request(Method::GET, path, false, None)
    }

    /// An admin call (with the token).
    pub fn admin(&self, method: Method, path: &str, body: Option<&[u8]>) -> Resp {
        self.request(method, path, true, body.map(|b| Body::from(b.to_vec())))
    }

    /// POST /fn/{name} without the token.
    pub fn invoke(&self, name: &str, input: &[u8]) -> Resp {
        self.request(
            Method::POST,
            &format!("/fn/{name}"),
            false,
            Some(Body::from(input.to_vec())),
        )
    }

    /// POST /2015-03-31/functions/{name}/invocations (the Lambda Invoke API), unsigned, with
    /// extra headers.
    pub fn invoke_lambda(&self, name: &str, payload: Vec<u8>, headers: &[(&str, &str)]) -> Resp {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let url = format!(
            "{}/2015-03-31/functions/{name}/invocations",
            self.base_url()
        );
        self.api
            .send(Method::POST, &url, &headers, Some(Body::from(payload)))
            .unwrap_or_else(|e| panic!("invoke {name}: {e}\nagent log:\n{}", self.log()))
    }

    /// Deploys an archive; the answer as it came.
    pub fn deploy_archive(&self, archive: Vec<u8>, content_type: &str) -> Resp {
        let headers = [
            (
                "authorization".to_string(),
                format!("Bearer {}", self.token),
            ),
            (header::CONTENT_TYPE.to_string(), content_type.to_string()),
        ];
        let url = format!("{}/v1/functions", self.base_url());
        self.api
            .send(Method::POST, &url, &headers, Some(Body::from(archive)))
            .unwrap_or_else(|e| panic!("deploy: {e}\nagent log:\n{}", self.log()))
    }

    /// Deploys a folder as a .tar.gz; asserts 201 and returns the new version's record.
    pub fn deploy(&self, dir: &Path) -> Value {
        let r = self.deploy_archive(tar_gz(dir), "application/gzip");
        r.expect_ok(201);
        r.json()
    }

    /// `fnlet ARGS` against this agent (endpoint and token file from the environment), in its
    /// network namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        in_netns(self.netns.as_deref(), fnlet())
            .args(args)
            .env("FNLET_ENDPOINT", self.base_url())
            .env("FNLET_STATE_DIR", self.state_dir())
            .env_remove("FNLET_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run fnlet")
    }

    /// Sends a signal with kill(1) (the tests stay free of unsafe).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// The agent's exit status if it has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let s = child.try_wait().expect("wait for the agent")?;
        self.child = None;
        Some(s)
    }

    /// Waits up to `limit` for the agent to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("agent running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().expect("wait for the agent") {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "fnlet agent still running {limit:?} after it was told to stop:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(0),
            "agent exit: {status}\n{}",
            self.log()
        );
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let status = self.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), None, "killed by a signal: {status}");
    }

    /// Starts the agent again on the same state dir, config, port and [`Agent::args`].
    pub fn restart(&mut self) {
        self.spawn();
        self.read_token();
    }

    /// Like [`Agent::restart`], for an agent that may refuse to start: its exit status then
    /// (its log says why).
    pub fn try_restart(&mut self) -> Result<(), ExitStatus> {
        self.try_spawn()?;
        self.read_token();
        Ok(())
    }

    /// Stops the agent and asserts it left nothing: no cgroup under its root, no process of
    /// its own or running as one of its functions' uids, no mount.
    pub fn finish(mut self) {
        self.stop();
        self.assert_clean();
    }

    pub fn assert_clean(&self) {
        assert_eq!(
            leftover_cgroups(&self.root),
            Vec::<PathBuf>::new(),
            "cgroups left behind by the agent"
        );
        assert_eq!(
            processes_matching(&self.root),
            Vec::<String>::new(),
            "agent processes left behind"
        );
        assert_eq!(
            processes_of_uids(&self.uids),
            Vec::<String>::new(),
            "function processes left behind"
        );
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| l.contains(&dir))
            .map(str::to_string)
            .collect();
        assert_eq!(mounts, Vec::<String>::new(), "mounts of the state dir left");
        assert_eq!(
            host_state(),
            self.before,
            "mounts or network namespaces left behind"
        );
    }

    /// The sandbox cgroups (leaves under the root) that hold processes now.
    /// Sandboxes running a function: processes in the cgroup, other than a sandbox built
    /// ahead of time waiting for its start ([`is_before_exec`]).
    pub fn running_sandboxes(&self) -> Vec<PathBuf> {
        sandbox_cgroups(&self.root)
            .into_iter()
            .filter(|p| {
                let procs = std::fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<&str> = procs.lines().collect();
                !pids.is_empty() && !is_before_exec(&pids)
            })
            .collect()
    }

    /// Waits until `n` sandboxes of `function` hold processes; returns their cgroups.
    pub fn wait_running(&self, function: &str, n: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running: Vec<PathBuf> = self
                .running_sandboxes()
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{function}-")))
                })
                .collect();
            if running.len() >= n {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "{function} never started:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- fnlet agent log ({}) ----\n{}", self.test, self.log());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every cgroup directory one level under `root`, in each hierarchy (v1) or the unified one.
pub fn sandbox_cgroups(root: &str) -> Vec<PathBuf> {
    let mut tops = vec![PathBuf::from("/sys/fs/cgroup").join(root)];
    if let Ok(it) = std::fs::read_dir("/sys/fs/cgroup") {
        tops.extend(it.filter_map(|e| e.ok()).map(|e| e.path().join(root)));
    }
    let mut out = Vec::new();
    for top in tops {
        if let Ok(it) = std::fs::read_dir(&top) {
            out.extend(
                it.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Live processes whose real uid is in `uids`. Zombies are dead already: a sandbox whose agent
/// was killed is reparented to pid 1, which reaps it in its own time.
pub fn processes_of_uids(uids: &Range<u32>) -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
        })
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
            {
                return None;
            }
            let uid: u32 = status
                .lines()
                .find(|l| l.starts_with("Uid:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            uids.contains(&uid).then(|| {
                format!(
                    "{} (uid {uid}): {}",
                    e.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
        })
        .collect()
}

/// A bundle folder for a test: fnlet.toml and files, readable by the function's uid.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// `files` are (path, contents, mode).
    pub fn new(manifest: &str, files: &[(&str, &[u8], u32)]) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("fnlet-test-fixture")
            .tempdir()
            .expect("tempdir");
        super::set_mode(dir.path(), 0o755);
        std::fs::write(dir.path().join("fnlet.toml"), manifest).expect("write fnlet.toml");
        for (path, contents, mode) in files {
            let p = dir.path().join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(&p, contents).expect("write fixture file");
            super::set_mode(&p, *mode);
        }
        Fixture { dir }
    }

    /// A function whose entrypoint `run.sh` is `#!/bin/sh` and `script`; `extra` is more
    /// manifest (timeout_s, memory_mb, ...).
    pub fn sh(name: &str, extra: &str, script: &str) -> Fixture {
        let manifest = format!("name = \"{name}\"\nentrypoint = \"run.sh\"\n{extra}\n");
        let script = format!("#!/bin/sh\n{script}\n");
        Fixture::new(&manifest, &[("run.sh", script.as_bytes(), 0o755)])
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    pub fn tar_gz(&self) -> Vec<u8> {
        tar_gz(self.path())
    }
}

/// A folder as a .tar.gz, paths relative to it, modes kept.
pub fn tar_gz(dir: &Path) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut ar = tar::Builder::new(gz);
    ar.follow_symlinks(false);
    ar.append_dir_all(".", dir).expect("tar the bundle");
    ar.into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish the tar.gz")
}

/// A .zip with the given (name, contents, unix mode) entries, names taken as they are.
pub fn zip_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, contents, mode) in entries {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        w.start_file(*name, opts).expect("zip entry");
        w.write_all(contents).expect("zip write");
    }
    w.finish().expect("finish the zip").into_inner()
}

/// A sandbox whose processes are all still the agent's own binary: one built ahead of time
/// waiting for its start (its init and the function's process before its exec), or one a moment
/// before its exec. Told by the executable, not by name: a process is named `fnlet-init` or
/// `fnlet-start` only a moment after its clone, and a sandbox caught in that moment is not
/// running a function yet. A process gone or a zombie (no executable) counts as running.
pub fn is_before_exec(pids: &[&str]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(agent) = std::fs::metadata(super::fnlet()) else {
        return false;
    };
    !pids.is_empty()
        && pids.iter().all(|pid| {
            std::fs::metadata(format!("/proc/{pid}/exe"))
                .is_ok_and(|m| m.dev() == agent.dev() && m.ino() == agent.ino())
        })
}
