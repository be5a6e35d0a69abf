//! The agent's configuration: TOML with an embedded default for every key.
//!
//! `fnlet agent` with no file runs on the defaults. Unknown keys and bad values are refused at
//! start, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/fnlet/config.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8740";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fnlet";
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:8741";
/// `http_threads` at most.
const MAX_HTTP_THREADS: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Threads serving the HTTP API, each with an event loop and a listening socket of its
    /// own: a connection and its calls stay on one thread. 0: one per CPU the agent may use.
    pub http_threads: u32,
    /// Where bundles, metadata, logs and the admin token live.
    pub state_dir: PathBuf,
    pub limits: LimitsConfig,
    pub sandbox: SandboxConfig,
    pub defaults: FunctionDefaults,
    pub lambda: LambdaConfig,
    /// Lambda runtimes by name (`runtime = "python3.11"` in a manifest). `fnlet runtime add`
    /// installs the runtime client the default entries point at.
    pub runtimes: std::collections::BTreeMap<String, RuntimeConfig>,
    /// Versions kept per function (the active one always is).
    pub retain_versions: u32,
    /// On SIGTERM, how long in-flight invocations may finish before they are killed.
    pub shutdown_grace_s: f64,
    pub cluster: ClusterConfig,
    pub events: EventsConfig,
    pub network: NetworkConfig,
    pub capacity: CapacityConfig,
    /// Per-topic settings, `[topics.NAME]`: which topics take unauthenticated publishes
    /// (webhooks), and the secret their signatures are checked with. Topics need no entry to
    /// be used; in a cluster, give every host the same entries.
    pub topics: std::collections::BTreeMap<String, TopicConfig>,
    pub schedules: SchedulesConfig,
}

/// Schedule triggers (`[[triggers]] schedule = ...` / `cron = ...`): how a host that takes a
/// schedule over catches up, and how it waits for the host it takes over from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulesConfig {
    /// A host that takes a schedule over (its owner failed, or this host started) fires at
    /// most this many of the ticks missed, the latest ones; older ones are counted as missed.
    pub catch_up_ticks: u32,
    /// When the last tick was fired by another live host (the owner before this one), this
    /// host waits this long after the next tick for that host's record before firing it.
    pub handoff_wait_s: f64,
    /// In a cluster, schedules wait at start for a catalog sync with a peer (the ticks others
    /// fired meanwhile), at most this long.
    pub startup_sync_s: f64,
    /// In a cluster, before firing a tick this host claims it from the hosts ranked above it
    /// for the schedule (it sees them down, but they may be up: a restart, a partition healing)
    /// and from the host that fired the last tick, and waits this long at most for their
    /// answers; a host that does not answer in time is passed over. 0: no claims (the hand-back
    /// rests on `handoff_wait_s` alone).
    pub claim_wait_s: f64,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        SchedulesConfig {
            catch_up_ticks: 1,
            handoff_wait_s: 1.0,
            startup_sync_s: 10.0,
            claim_wait_s: 1.0,
        }
    }
}

/// One topic's settings (`[topics.NAME]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// Take publishes without an access key or the admin token: a webhook.
    pub public: bool,
    /// With `public`: each publish must carry `X-Hub-Signature-256: sha256=<hex>`, the
    /// HMAC-SHA256 of its body under this secret (GitHub's and Gitea's webhook signature).
    pub secret: String,
    /// The secret read from this file instead (trailing whitespace dropped).
    pub secret_file: String,
}

/// How much of the host live instances may hold: the sum of their memory limits, of their cpus,
/// and their count. A call whose instance would go past it first evicts idle instances of
/// other functions, least recently used first, then waits up to `limits.queue_timeout_ms`,
/// then is refused (429).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// The memory live instances' limits may add up to, in MiB; 0: `memory_percent` of the
    /// host's MemTotal minus `memory_reserve_mb`.
    pub memory_mb: u64,
    /// Share of the host's memory for instances, in percent (above 100 overcommits: limits
    /// are ceilings, most instances use far less).
    pub memory_percent: u32,
    /// Memory kept for the agent and the host, in MiB, before `memory_percent` applies.
    pub memory_reserve_mb: u64,
    /// The cpus of live instances may add up to this percentage of the host's cores. A cpu
    /// limit caps use rather than reserving it (an idle instance uses none), hence the
    /// overcommit; 100: no more than the cores.
    pub cpu_percent: u32,
    /// Live instances at most (Lambda instances and running exec calls), whatever their size:
    /// each holds processes, a cgroup, a network namespace and 8 of the agent's file
    /// descriptors and 5 of its tasks; lowered at start to what the open-file limit holds.
    pub max_instances: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            memory_mb: 0,
            memory_percent: 90,
            memory_reserve_mb: 512,
            cpu_percent: 1600,
            max_instances: 2048,
        }
    }
}

/// Functions' outbound network: the policy a manifest without `[network] egress` gets, and the
/// host bridge, address range and resolvers instances with egress use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// "none" (only `lo`, as before egress existed), "all", or a list of rules.
    pub default_egress: crate::network::policy::EgressSpec,
    /// The host bridge instances with egress hang off; also names fnlet's nftables tables
    /// (`inet NAME`, `bridge NAME`) and prefixes the instances' veths (`NAME-N`).
    pub bridge: String,
    /// IPv4 range of the bridge (its first address) and the instances; must not overlap a
    /// route of the host.
    pub range: String,
    /// Resolvers written to each instance's /etc/resolv.conf, and those egress rules' host
    /// names are resolved with; empty: the host's.
    pub dns: Vec<String>,
    /// Default cap on a function's open outbound connections (all its instances together).
    pub max_connections: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            default_egress: Default::default(),
            bridge: "fnlet0".into(),
            range: "100.72.0.0/16".into(),
            dns: Vec::new(),
            max_connections: 1024,
        }
    }
}

/// Asynchronous invocation (Event invokes): where accepted events wait, how much may wait, and
/// the waits between tries (a function's `[async]` overrides these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// "local": a durable queue in the agent's state dir (events.redb), run by this host;
    /// "nats": a NATS JetStream stream (`[events.nats]`) that every agent using it runs.
    pub backend: String,
    /// Events waiting per function at most; beyond, Event invokes answer 429.
    pub max_queued_events: u64,
    /// Payload bytes waiting per function at most (MiB); beyond, Event invokes answer 429.
    pub max_queued_mb: u64,
    /// The wait before retry n after a function error is n times this (Lambda: 1, then 2 min).
    pub retry_base_s: f64,
    /// Throttled events and agent failures wait this before the next try, doubling ...
    pub backoff_min_s: f64,
    /// ... up to this (Lambda: 1 s to 5 min).
    pub backoff_max_s: f64,
    /// URL destinations: how long a record is retried before it is dropped.
    pub destination_max_age_s: f64,
    /// `https://` destinations: a PEM file of CA certificates trusted beside the system's
    /// (for destinations behind a private CA).
    pub destination_ca_file: Option<std::path::PathBuf>,
    /// Topics: an event with the same source and id as one published to the same topic within
    /// this many seconds is a duplicate, and not delivered again.
    pub dedup_window_s: f64,
    /// The JetStream backend (`backend = "nats"`).
    pub nats: NatsConfig,
}

/// Where the JetStream backend keeps events: one stream (work-queue retention), a subject and
/// an explicit-ack pull consumer per function, a key-value bucket for the retry state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Servers of the NATS cluster (`nats://host:port`, user and password in the URL if the
    /// server asks for them); any one reachable is enough.
    pub servers: Vec<String>,
    /// The stream's name; its subjects are `<subject>.fn.<function>` and `<subject>.url`, the
    /// consumers `<stream>_fn_<function>` and `<stream>_url`, the retry state bucket
    /// `<stream>_state`.
    pub stream: String,
    pub subject: String,
    /// Copies of each event the servers keep (JetStream replicas, 1-5); 0: 3, or fewer when
    /// fewer servers are listed.
    pub replicas: u32,
    /// The stream's bytes at most (MiB), all functions together; beyond, Event invokes answer
    /// 429. (`events.max_queued_events` bounds each function's count, as with "local".)
    pub max_mb: u64,
    /// A try's delivery is taken back and given to another agent when its agent has not
    /// reported within this (the agent reports every third of it while the try runs).
    pub ack_wait_s: f64,
    /// How long an Event invoke waits for the servers' ack before it answers 503.
    pub publish_timeout_s: f64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: Vec::new(),
            stream: "FNLET_EVENTS".into(),
            subject: "fnlet.events".into(),
            replicas: 0,
            max_mb: 1024,
            ack_wait_s: 30.0,
            publish_timeout_s: 5.0,
        }
    }
}

impl NatsConfig {
    /// The replicas asked for, or the default for the servers listed.
    pub fn replicas(&self) -> usize {
        match self.replicas {
            0 => self.servers.len().clamp(1, 3),
            n => n as usize,
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            backend: "local".into(),
            max_queued_events: 100_000,
            max_queued_mb: 512,
            retry_base_s: 60.0,
            backoff_min_s: 1.0,
            backoff_max_s: 300.0,
            destination_max_age_s: 21600.0,
            destination_ca_file: None,
            dedup_window_s: 600.0,
            nats: NatsConfig::default(),
        }
    }
}

/// The cluster: this agent's QUIC endpoint for peers and QUIC callers, its identity, and the
/// peers it joins. Unused until the agent is in a cluster (`fnlet cluster init`, or `join`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// UDP address of the QUIC endpoint (ALPNs fnlet-peer/1 and fnlet-invoke/1).
    pub listen: SocketAddr,
    /// The address peers dial, when `listen` is not it (a wildcard, NAT); "" = `listen`.
    pub advertise: String,
    /// This node's id in the cluster (a DNS label); "" = the host name.
    pub node_id: String,
    /// Peers to join (any members' `listen` addresses); used at the first start, with a token.
    pub join: Vec<SocketAddr>,
    /// A file holding the join token (instead of `--token`).
    pub token_file: String,
    /// Hosts a deploy waits for to hold the bundle before it answers (capped by the cluster's
    /// size).
    pub replicas: u32,
    /// How long the node certificates this host issues are valid, in seconds (on the host
    /// holding the cluster CA; members renew theirs past 2/3 of it). At least 10.
    pub node_cert_validity_s: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: DEFAULT_PEER_LISTEN.parse().expect("constant address"),
            advertise: String::new(),
            node_id: String::new(),
            join: Vec::new(),
            token_file: String::new(),
            replicas: 2,
            node_cert_validity_s: crate::cluster::pki::NODE_CERT_VALIDITY.as_secs(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest bundle archive accepted by a deploy.
    pub max_bundle_mb: u64,
    /// Largest total size of a bundle once unpacked.
    pub max_unpacked_mb: u64,
    /// Most files in one bundle.
    pub max_bundle_files: u64,
    /// Largest invocation request body.
    pub max_request_mb: u64,
    /// Largest invocation response body.
    pub max_response_mb: u64,
    /// How long an invocation may wait for a free slot before 429.
    pub queue_timeout_ms: u64,
    /// Bytes of log kept per function (two files of this size).
    pub log_max_kb: u64,
    /// Lines that come with calls (the agent's one line per invocation, the functions' own
    /// output copied to the agent's log) at most this many a second; the rest are counted in one
    /// line. Keeps a busy agent under journald's rate limit, past which its warnings are dropped
    /// too. 0: none (the function logs and /metrics keep everything either way).
    pub log_lines_per_s: u32,
    /// A connection's first request head must arrive within this of the connect, and every
    /// later one within this of its first byte; else the connection is closed.
    pub header_timeout_s: f64,
    /// A request body that sends no byte for this long while the agent reads it is cut: 408.
    pub body_timeout_s: f64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_s: f64,
    /// Open connections at most; beyond, new ones are closed at accept. Lowered at start to
    /// leave a quarter of the agent's open-file limit to sandboxes, pipes and the store.
    pub max_connections: u64,
    /// Open connections per client address (per /64 for IPv6) at most.
    pub max_connections_per_ip: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// cgroup root below each hierarchy: a relative path, or "auto": under systemd with
    /// Delegate=yes on a cgroup v2 host, the unit's delegated subtree
    /// (`<unit>/instances`, beside the agent's own `<unit>/agent`), else "fnlet".
    pub cgroup_root: String,
    /// "auto", "v1", or a path to a cgroup2 mount.
    pub cgroup: String,
    /// Functions run as uids from uid_base to uid_base + uid_count - 1, one per function.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Size of each instance's /tmp.
    pub tmp_mb: u64,
    /// Processes and threads per instance.
    pub pids: u64,
    /// Run every instance in a user namespace of its own too (its uid maps to itself only).
    pub user_namespace: bool,
    /// Refuse to start when the host cannot enforce the memory, cpu or pids limit (a container
    /// whose cgroup tree has no controllers). Off: the agent starts, runs functions without the
    /// limits it cannot enforce, and says so (log, `systemctl status`, `fnlet status`).
    pub require_limits: bool,
    /// Keep one sandbox per function built ahead of time, so an invocation only pays for the
    /// function's own exec.
    pub prepare_ahead: bool,
    /// Clone sandboxes from a small helper process forked at start, not from the agent itself:
    /// a fork of the large multi-threaded agent costs its page tables and a copy-on-write fault
    /// for every page it writes while a prepared sandbox shares it.
    pub spawn_helper: bool,
    /// Instances run under `SCHED_BATCH`: their wake-ups (an event handed over) do not
    /// preempt the agent's threads, which finish their turn (answers, the next events) first.
    /// Under load that is ~20 % more warm calls per second on 2 cores (BENCHMARKS.md, Lambda
    /// run 21); each instance keeps its fair share of the CPU.
    pub batch_scheduling: bool,
    /// Pin each HTTP thread to one CPU and, after each call's answer, move the Lambda instance
    /// onto the CPU of the thread that served it, so the wake-ups of its next warm call there
    /// stay on one CPU; a call that runs longer than 2 ms gets every CPU back. Off by default:
    /// a pinned thread cannot leave a CPU that other work keeps busy (BENCHMARKS.md, Lambda
    /// runs 23-26: back-to-back calls on a quiet host ~40 % faster, calls between other work
    /// slower).
    pub colocate_instances: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionDefaults {
    pub memory_mb: u64,
    pub cpus: f64,
    pub timeout_s: f64,
    pub max_concurrency: u32,
    /// Lambda mode: how long an idle instance is kept warm.
    pub keep_alive_s: f64,
    /// Lambda mode: how long a new instance may take to ask for its first event.
    pub init_timeout_s: f64,
}

/// Lambda compatibility: what instances and callers are told about "the cloud" they run in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LambdaConfig {
    /// AWS_REGION inside instances, and in function ARNs.
    pub region: String,
    /// The account id in function ARNs (12 digits).
    pub account_id: String,
    /// The Runtime API's port on each instance's own loopback (AWS_LAMBDA_RUNTIME_API).
    pub runtime_api_port: u16,
    /// The runtime's connections to that port become Unix socket pairs (its `connect` calls
    /// stop for the agent's answer). Off by default: lower latency at one client, less
    /// throughput under load (BENCHMARKS.md, Lambda run 16).
    pub runtime_api_socketpair: bool,
}

/// A Lambda runtime: the host interpreter and runtime client that run `handler`s of functions
/// whose manifest names this runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The command, inside the sandbox; the function's handler is appended as the last
    /// argument (`python3 -m awslambdaric app.lambda_handler`).
    pub command: Vec<String>,
    /// Host directories bound read-only at the same path (where the runtime client lives).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address"),
            http_threads: 0,
            state_dir: DEFAULT_STATE_DIR.into(),
            limits: LimitsConfig::default(),
            sandbox: SandboxConfig::default(),
            defaults: FunctionDefaults::default(),
            lambda: LambdaConfig::default(),
            runtimes: default_runtimes(),
            retain_versions: 5,
            shutdown_grace_s: 30.0,
            cluster: ClusterConfig::default(),
            events: EventsConfig::default(),
            schedules: SchedulesConfig::default(),
            network: NetworkConfig::default(),
            capacity: CapacityConfig::default(),
            topics: Default::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bundle_mb: 250,
            max_unpacked_mb: 1024,
            max_bundle_files: 50_000,
            max_request_mb: 6,
            max_response_mb: 6,
            queue_timeout_ms: 1000,
            log_max_kb: 1024,
            log_lines_per_s: 100,
            header_timeout_s: 10.0,
            body_timeout_s: 30.0,
            idle_timeout_s: 60.0,
            max_connections: 16384,
            max_connections_per_ip: 1024,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cgroup_root: "auto".into(),
            cgroup: "auto".into(),
            uid_base: 200_000,
            uid_count: 10_000,
            tmp_mb: 64,
            pids: 256,
            user_namespace: false,
            require_limits: false,
            prepare_ahead: true,
            spawn_helper: true,
            batch_scheduling: true,
            colocate_instances: false,
        }
    }
}

impl Default for FunctionDefaults {
    fn default() -> Self {
        FunctionDefaults {
            memory_mb: 128,
            cpus: 1.0,
            timeout_s: 10.0,
            max_concurrency: 10,
            keep_alive_s: 300.0,
            init_timeout_s: 10.0,
        }
    }
}

impl Default for LambdaConfig {
    fn default() -> Self {
        LambdaConfig {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            runtime_api_port: 9001,
            runtime_api_socketpair: false,
        }
    }
}

impl Config {
    /// Threads serving the HTTP API: `http_threads`, or one per CPU the agent may use (its
    /// affinity and cgroup CPU quota count).
    pub fn http_threads(&self) -> usize {
        match self.http_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    /// This node's id: `cluster.node_id`, else the host name as a DNS label.
    pub fn node_id(&self) -> String {
        if !self.cluster.node_id.is_empty() {
            return self.cluster.node_id.clone();
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        host_to_node_id(&host)
    }

    /// The address peers dial: `cluster.advertise`, else `cluster.listen`.
    pub fn peer_advertise(&self) -> SocketAddr {
        self.cluster
            .advertise
            .parse()
            .unwrap_or(self.cluster.listen)
    }
}

/// A host name as a node id: the first label, lowercased, other characters as '-'.
fn host_to_node_id(host: &str) -> String {
    let label = host
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let id: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let id = id.trim_matches('-').to_string();
    if id.is_empty() { "node".into() } else { id }
}

/// Where `fnlet runtime add NAME` installs a runtime's client, below the state directory.
pub fn runtime_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("runtimes").join(name)
}

/// Stands for the agent's state directory in a runtime's `paths` and `env` values.
pub const STATE_DIR_VAR: &str = "{state_dir}";

impl RuntimeConfig {
    /// `paths` and `env` with `{state_dir}` replaced.
    pub fn resolved(&self, state_dir: &Path) -> RuntimeConfig {
        let sd = state_dir.display().to_string();
        RuntimeConfig {
            command: self.command.clone(),
            paths: self
                .paths
                .iter()
                .map(|p| p.display().to_string().replace(STATE_DIR_VAR, &sd).into())
                .collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.replace(STATE_DIR_VAR, &sd)))
                .collect(),
        }
    }
}

/// The Python runtimes, run by the host's python3 with AWS's runtime client (awslambdaric),
/// which `fnlet runtime add python3.11` installs under the default state directory.
fn default_runtimes() -> std::collections::BTreeMap<String, RuntimeConfig> {
    // Debian 12's python3 is 3.11: map only what the host really has.
    let name = "python3.11";
    let dir = runtime_dir(Path::new(STATE_DIR_VAR), name);
    let python = RuntimeConfig {
        command: vec![
            "/usr/bin/python3".into(),
            "-m".into(),
            "awslambdaric".into(),
        ],
        paths: vec![dir.clone()],
        env: [("PYTHONPATH".to_string(), dir.display().to_string())].into(),
    };
    [(name.to_string(), python)].into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl Config {
    /// Loads `path`; with `explicit` false a missing file means the embedded defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                path: path.into(),
                key,
                reason: reason.into(),
            })
        };
        if !self.state_dir.is_absolute() {
            return bad("state_dir", "must be an absolute path");
        }
        if self.http_threads > MAX_HTTP_THREADS {
            return bad("http_threads", "must be at most 1024 (0: one per CPU)");
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_bundle_mb", l.max_bundle_mb),
            ("limits.max_unpacked_mb", l.max_unpacked_mb),
            ("limits.max_bundle_files", l.max_bundle_files),
            ("limits.max_request_mb", l.max_request_mb),
            ("limits.max_response_mb", l.max_response_mb),
            ("limits.log_max_kb", l.log_max_kb),
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if l.max_request_mb > 1024 || l.max_response_mb > 1024 {
            return bad("limits.max_request_mb", "must be at most 1024");
        }
        for (key, v) in [
            ("limits.header_timeout_s", l.header_timeout_s),
            ("limits.body_timeout_s", l.body_timeout_s),
            ("limits.idle_timeout_s", l.idle_timeout_s),
        ] {
            if !(v.is_finite() && (0.1..=86400.0).contains(&v)) {
                return bad(key, "must be between 0.1 and 86400");
            }
        }
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
        ] {
            if v > 1 << 24 {
                return bad(key, "must be at most 16777216");
            }
        }
        let s = &self.sandbox;
        if s.uid_base < 1000 || s.uid_count == 0 || s.uid_base.checked_add(s.uid_count).is_none() {
            return bad(
                "sandbox.uid_base",
                "uids must be at least 1000 and the range must fit in 32 bits",
            );
        }
        if s.cgroup != "auto" && s.cgroup != "v1" && !s.cgroup.starts_with('/') {
            return bad(
                "sandbox.cgroup",
                "must be \"auto\", \"v1\", or the absolute path of a cgroup2 mount",
            );
        }
        if s.cgroup_root.is_empty()
            || s.cgroup_root.starts_with('/')
            || s.cgroup_root.contains("..")
        {
            return bad(
                "sandbox.cgroup_root",
                "must be \"auto\" or a relative path like \"fnlet\"",
            );
        }
        if s.tmp_mb == 0 || s.pids < 2 {
            return bad("sandbox.pids", "tmp_mb must be > 0 and pids at least 2");
        }
        let c = &self.cluster;
        if !c.node_id.is_empty() && !crate::cluster::pki::valid_node_id(&c.node_id) {
            return bad(
                "cluster.node_id",
                "1-63 of a-z 0-9 -, not starting or ending with - (it names the node's certificate)",
            );
        }
        if !c.advertise.is_empty() && c.advertise.parse::<SocketAddr>().is_err() {
            return bad(
                "cluster.advertise",
                "must be an ADDR:PORT, or \"\" for `listen`",
            );
        }
        if c.replicas == 0 {
            return bad("cluster.replicas", "must be at least 1");
        }
        if !(10..=crate::cluster::pki::CA_VALIDITY.as_secs()).contains(&c.node_cert_validity_s) {
            return bad(
                "cluster.node_cert_validity_s",
                "must be between 10 and 315360000 (the CA's 10 years)",
            );
        }
        let d = &self.defaults;
        if !(16..=65536).contains(&d.memory_mb) {
            return bad("defaults.memory_mb", "must be between 16 and 65536");
        }
        if !(d.cpus.is_finite() && (0.01..=1024.0).contains(&d.cpus)) {
            return bad("defaults.cpus", "must be between 0.01 and 1024");
        }
        if !(d.timeout_s.is_finite() && (0.001..=86400.0).contains(&d.timeout_s)) {
            return bad("defaults.timeout_s", "must be between 0.001 and 86400");
        }
        if d.max_concurrency == 0 {
            return bad("defaults.max_concurrency", "must be at least 1");
        }
        if !(d.keep_alive_s.is_finite() && (0.0..=86400.0).contains(&d.keep_alive_s)) {
            return bad("defaults.keep_alive_s", "must be between 0 and 86400");
        }
        if !(d.init_timeout_s.is_finite() && (0.01..=900.0).contains(&d.init_timeout_s)) {
            return bad("defaults.init_timeout_s", "must be between 0.01 and 900");
        }
        let lc = &self.lambda;
        if lc.account_id.len() != 12 || !lc.account_id.bytes().all(|c| c.is_ascii_digit()) {
            return bad("lambda.account_id", "must be 12 digits");
        }
        if lc.region.is_empty()
            || lc.region.len() > 32
            || !lc
                .region
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return bad("lambda.region", "must be like \"us-east-1\" (a-z, 0-9, -)");
        }
        if lc.runtime_api_port == 0 {
            return bad("lambda.runtime_api_port", "must not be 0");
        }
        for (name, r) in &self.runtimes {
            if !crate::manifest::valid_runtime_name(name) {
                return bad("runtimes", "names must be of a-z, 0-9, '.', '-' and '_'");
            }
            if r.command.first().is_none_or(|c| !c.starts_with('/')) {
                return bad(
                    "runtimes.command",
                    "must start with the absolute path of the interpreter",
                );
            }
            if r.paths.iter().any(|p| {
                !(p.is_absolute() || p.starts_with(STATE_DIR_VAR))
                    || p.components().any(|c| c == std::path::Component::ParentDir)
            }) {
                return bad(
                    "runtimes.paths",
                    "must be absolute paths (or start with {state_dir}), without ..",
                );
            }
        }
        let e = &self.events;
        match e.backend.as_str() {
            "local" => {}
            "nats" => {
                let n = &e.nats;
                if n.servers.is_empty() {
                    return bad(
                        "events.nats.servers",
                        "must list at least one server (nats://host:port) for backend \"nats\"",
                    );
                }
                for s in &n.servers {
                    if let Err(why) = s.parse::<async_nats::ServerAddr>() {
                        return bad("events.nats.servers", &format!("{s:?}: {why}"));
                    }
                }
                let token = |t: &str| {
                    !t.is_empty()
                        && t.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                };
                if !token(&n.stream) {
                    return bad("events.nats.stream", "must be letters, digits, - and _");
                }
                if !n.subject.split('.').all(token) {
                    return bad(
                        "events.nats.subject",
                        "must be dot-separated tokens of letters, digits, - and _",
                    );
                }
                if n.replicas > 5 {
                    return bad("events.nats.replicas", "must be 0 (the default) to 5");
                }
                if n.max_mb == 0 {
                    return bad("events.nats.max_mb", "must be at least 1");
                }
                for (key, v) in [
                    ("events.nats.ack_wait_s", n.ack_wait_s),
                    ("events.nats.publish_timeout_s", n.publish_timeout_s),
                ] {
                    if !(v.is_finite() && (1.0..=3600.0).contains(&v)) {
                        return bad(key, "must be between 1 and 3600 seconds");
                    }
                }
            }
            _ => return bad("events.backend", "must be \"local\" or \"nats\""),
        }
        if let Some(path) = &e.destination_ca_file
            && let Err(crate::events::https::HttpsError::CaFile { path, message }) =
                crate::events::https::read_ca_file(path)
        {
            return bad("events.destination_ca_file", &format!("{path}: {message}"));
        }
        if e.max_queued_events == 0 || e.max_queued_mb == 0 {
            return bad(
                "events.max_queued_events",
                "max_queued_events and max_queued_mb must be at least 1",
            );
        }
        for (key, v) in [
            ("events.retry_base_s", e.retry_base_s),
            ("events.backoff_min_s", e.backoff_min_s),
            ("events.backoff_max_s", e.backoff_max_s),
            ("events.destination_max_age_s", e.destination_max_age_s),
            ("events.dedup_window_s", e.dedup_window_s),
        ] {
            if !(v.is_finite() && (0.001..=86400.0).contains(&v)) {
                return bad(key, "must be between 0.001 and 86400 seconds");
            }
        }
        if e.backoff_min_s > e.backoff_max_s {
            return bad("events.backoff_min_s", "must not exceed backoff_max_s");
        }
        let sc = &self.schedules;
        if sc.catch_up_ticks > 1000 {
            return bad("schedules.catch_up_ticks", "must be between 0 and 1000");
        }
        for (key, v) in [
            ("schedules.handoff_wait_s", sc.handoff_wait_s),
            ("schedules.startup_sync_s", sc.startup_sync_s),
            ("schedules.claim_wait_s", sc.claim_wait_s),
        ] {
            if !(v.is_finite() && (0.0..=3600.0).contains(&v)) {
                return bad(key, "must be between 0 and 3600 seconds");
            }
        }
        for (name, t) in &self.topics {
            if !crate::triggers::manifest::valid_topic(name) {
                return bad(
                    "topics",
                    &format!(
                        "{name:?} is not a topic name (1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-')"
                    ),
                );
            }
            if !t.secret.is_empty() && !t.secret_file.is_empty() {
                return bad("topics.secret", "give secret or secret_file, not both");
            }
            if (!t.secret.is_empty() || !t.secret_file.is_empty()) && !t.public {
                return bad(
                    "topics.secret",
                    "applies to public topics (public = true); others need an access key or the admin token",
                );
            }
        }
        let n = &self.network;
        if let Err(why) = n.default_egress.parse() {
            return bad("network.default_egress", &why);
        }
        if !crate::network::valid_bridge_name(&n.bridge) {
            return bad(
                "network.bridge",
                "must be 1-8 characters of a-z and 0-9, starting with a letter",
            );
        }
        if let Err(why) = crate::network::parse_range(&n.range) {
            return bad("network.range", &why);
        }
        if n.dns.len() > 3
            || n.dns
                .iter()
                .any(|d| d.parse::<std::net::Ipv4Addr>().is_err())
        {
            return bad(
                "network.dns",
                "must be at most 3 IPv4 addresses (resolv.conf reads no more)",
            );
        }
        if !(1..=1_000_000).contains(&n.max_connections) {
            return bad("network.max_connections", "must be between 1 and 1000000");
        }
        let cap = &self.capacity;
        if !(1..=1000).contains(&cap.memory_percent) {
            return bad("capacity.memory_percent", "must be between 1 and 1000");
        }
        if !(1..=100_000).contains(&cap.cpu_percent) {
            return bad("capacity.cpu_percent", "must be between 1 and 100000");
        }
        if cap.memory_mb > 1 << 30 || cap.memory_reserve_mb > 1 << 30 {
            return bad(
                "capacity.memory_mb",
                "memory_mb and memory_reserve_mb must be at most 1073741824",
            );
        }
        if !(1..=1_000_000).contains(&cap.max_instances) {
            return bad("capacity.max_instances", "must be between 1 and 1000000");
        }
        if self.retain_versions == 0 {
            return bad("retain_versions", "must be at least 1");
        }
        if !(self.shutdown_grace_s.is_finite() && self.shutdown_grace_s >= 0.0) {
            return bad("shutdown_grace_s", "must be a non-negative number");
        }
        Ok(())
    }

    /// Why runtime `name` cannot be mounted into sandboxes, if it cannot: its directories are
    /// bound at the same path, and every sandbox makes its own /tmp, /proc and /dev (a
    /// state_dir under /tmp, say). Deploys of functions using it are refused with this.
    pub fn unmountable_runtime(&self, name: &str) -> Option<String> {
        let r = self.runtimes.get(name)?.resolved(&self.state_dir);
        let p = r.paths.iter().find(|p| !isolate::bind_dest_allowed(p))?;
        Some(format!(
            "runtime {name:?}: {} cannot be mounted into a sandbox (each has its own /tmp, /proc and /dev): move state_dir, or point runtimes.{name}.paths elsewhere",
            p.display()
        ))
    }

    pub fn cgroup_mode(&self) -> isolate::CgroupMode {
        match self.sandbox.cgroup.as_str() {
            "auto" => isolate::CgroupMode::Auto,
            "v1" => isolate::CgroupMode::V1,
            path => isolate::CgroupMode::V2At(path.into()),
        }
    }

    /// Every key with its default, as `--print-default-config` prints it. (The package installs
    /// packaging/config.toml: the same keys, commented; a test keeps the two in step.)
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    #[test]
    fn host_names_become_node_ids() {
        assert_eq!(host_to_node_id("Web-01.example.com"), "web-01");
        assert_eq!(host_to_node_id("db_2"), "db-2");
        assert_eq!(host_to_node_id("-"), "node");
        assert!(crate::cluster::pki::valid_node_id(&host_to_node_id(
            &"x".repeat(80)
        )));
        let err = parse("[cluster]\nnode_id = \"Bad_Id\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.node_id"), "{err}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_round_trip() {
        assert_eq!(parse(&Config::default_toml()).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = parse("listen = \"127.0.0.1:1\"\n[limits]\nmax_bundel_mb = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bundel_mb"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse("[defaults]\ncpus = -1\n").unwrap_err().to_string();
        assert!(err.contains("defaults.cpus"), "{err}");
        let err = parse("[cluster]\nnode_cert_validity_s = 9\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster.node_cert_validity_s"), "{err}");
        assert!(parse("[cluster]\nnode_cert_validity_s = 10\n").is_ok());
        let err = parse("[events]\ndestination_ca_file = \"/nonexistent/ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("events.destination_ca_file") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        let err = parse("listen = \"nowhere\"").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let err = parse("state_dir = \"relative\"").unwrap_err().to_string();
        assert!(err.contains("state_dir"), "{err}");
        for bad in [
            "header_timeout_s = 0",
            "body_timeout_s = -1",
            "idle_timeout_s = inf",
            "max_connections = 0",
            "max_connections_per_ip = 0",
            "max_connections_per_ip = 100000000",
        ] {
            let key = bad.split(' ').next().unwrap();
            let err = parse(&format!("[limits]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("limits.{key}")), "{bad}: {err}");
        }
        for (bad, key) in [
            ("default_egress = \"open\"", "network.default_egress"),
            (
                "default_egress = [\"10.0.0.0/8:99999\"]",
                "network.default_egress",
            ),
            ("bridge = \"Br-0\"", "network.bridge"),
            ("bridge = \"waytoolongname\"", "network.bridge"),
            ("range = \"100.72.0.1/16\"", "network.range"),
            ("range = \"100.72.0.0/30\"", "network.range"),
            ("dns = [\"::1\"]", "network.dns"),
            ("max_connections = 0", "network.max_connections"),
        ] {
            let err = parse(&format!("[network]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        // Whole seconds are fine for the timeouts.
        let c = parse("[limits]\nheader_timeout_s = 2\n").unwrap();
        assert_eq!(c.limits.header_timeout_s, 2.0);
    }

    /// The file the packages install as /etc/fnlet/config.toml.
    const PACKAGED: &str = include_str!("../../packaging/config.toml");

    /// Dotted names of every key in a TOML document.
    fn keys(text: &str) -> std::collections::BTreeSet<String> {
        fn walk(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeSet<String>) {
            for (k, v) in t {
                let name = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(t) => walk(&format!("{name}."), t, out),
                    _ => {
                        out.insert(name);
                    }
                }
            }
        }
        let mut out = Default::default();
        walk("", &text.parse::<toml::Table>().unwrap(), &mut out);
        out
    }

    #[test]
    fn the_packaged_config_parses_and_documents_every_default() {
        // As shipped, every setting commented out: the agent runs on its defaults.
        assert_eq!(parse(PACKAGED).unwrap(), Config::default());
        // Uncommenting every setting changes nothing: the file shows the real defaults ...
        let uncommented: Vec<&str> = PACKAGED
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with(|c: char| c.is_ascii_lowercase())
                        && rest.contains(" = ") =>
                {
                    rest
                }
                _ => l,
            })
            .collect();
        let uncommented = uncommented.join("\n");
        assert_eq!(parse(&uncommented).unwrap(), Config::default());
        // ... and every key: a new key needs its line in packaging/config.toml.
        assert_eq!(
            keys(&uncommented),
            keys(&Config::default_toml()),
            "packaging/config.toml must show every key of Config with its default"
        );
    }

    #[test]
    fn the_nats_backend_needs_servers_and_names_bad_keys() {
        let nats = |extra: &str| {
            parse(&format!(
                "[events]\nbackend = \"nats\"\n[events.nats]\n{extra}"
            ))
        };
        let err = nats("").unwrap_err().to_string();
        assert!(err.contains("events.nats.servers"), "{err}");
        let c = nats("servers = [\"nats://127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]").unwrap();
        assert_eq!(c.events.nats.replicas(), 2);
        assert_eq!(c.events.nats.stream, "FNLET_EVENTS");
        for (bad, key) in [
            ("stream = \"a.b\"", "events.nats.stream"),
            ("subject = \"a..b\"", "events.nats.subject"),
            ("subject = \"a.>\"", "events.nats.subject"),
            ("replicas = 6", "events.nats.replicas"),
            ("max_mb = 0", "events.nats.max_mb"),
            ("ack_wait_s = 0.5", "events.nats.ack_wait_s"),
            ("publish_timeout_s = nan", "events.nats.publish_timeout_s"),
        ] {
            let err = nats(&format!("servers = [\"nats://127.0.0.1:4222\"]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let err = parse("[events]\nbackend = \"kafka\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.backend"), "{err}");
    }

    #[test]
    fn topics_are_checked_by_name() {
        let c = parse("[topics.hooks]\npublic = true\nsecret = \"s\"\n").unwrap();
        assert!(c.topics["hooks"].public);
        assert_eq!(c.events.dedup_window_s, 600.0);
        for (text, key) in [
            ("[topics.\"a/b\"]\npublic = true\n", "topics"),
            ("[topics.x]\nsecret = \"s\"\n", "topics.secret"),
            (
                "[topics.x]\npublic = true\nsecret = \"s\"\nsecret_file = \"/f\"\n",
                "topics.secret",
            ),
            ("[topics.x]\npublik = true\n", "publik"),
            ("[events]\ndedup_window_s = 0\n", "events.dedup_window_s"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} -> {err}");
        }
    }

    #[test]
    fn runtimes_must_be_mountable_in_a_sandbox() {
        let c = parse("state_dir = \"/tmp/fnlet-state\"\n").unwrap();
        let why = c.unmountable_runtime("python3.11").expect("under /tmp");
        assert!(
            why.contains("/tmp/fnlet-state/runtimes/python3.11"),
            "{why}"
        );
        let c = parse("state_dir = \"/srv/fnlet\"\n").unwrap();
        assert_eq!(c.unmountable_runtime("python3.11"), None);
        let err = parse("[runtimes.py]\ncommand = [\"python3\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtimes.command"), "{err}");
    }

    #[test]
    fn missing_default_file_is_fine_but_missing_explicit_file_is_not() {
        assert!(Config::load(Path::new("/nonexistent/fnlet.toml"), false).is_ok());
        assert!(Config::load(Path::new("/nonexistent/fnlet.toml"), true).is_err());
    }
}
