//! The functions this agent serves: the active version of each, and its concurrency slots.
//!
//! An invocation takes a slot (a semaphore permit) for as long as its instance runs; beyond
//! `max_concurrency` it queues for up to `queue_timeout`, then is refused as overloaded.
//! Every live instance also holds its share of the host ([`capacity`]).

pub mod capacity;
pub mod reused;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use isolate::{Isolator, Limits, PreparedSandbox, SandboxSpec, StdioSpec};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::instance::InvokeError;
use crate::instance::lambda::LambdaInstance;
use crate::manifest::{BOOTSTRAP, Entrypoint, Manifest, Mode, Resolved};
use crate::network::{FunctionNetwork, Network};
use crate::store::{FunctionRecord, VersionRecord};
use capacity::{Capacity, Commitment, Need};
use reused::{IdleSandbox, WarmSandbox};

/// The variable that tells an instance its request id.
pub const REQUEST_ID_ENV: &str = "FNLET_REQUEST_ID";

/// The version of a function that new invocations run.
#[derive(Debug)]
pub struct ActiveFunction {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub manifest: Manifest,
    pub resolved: Resolved,
    /// The sandbox every instance of this version gets.
    pub spec: SandboxSpec,
    /// Lambda mode with a runtime: the host directories its client lives in.
    pub runtime_paths: Vec<PathBuf>,
    /// Its outbound network; None: only `lo`, as with egress "none".
    pub net: Option<FunctionNetwork>,
}

/// Builds a sandbox of a function ahead of its exec, with its network when it has one.
/// Blocking.
pub fn prepare_sandbox(
    isolator: &Isolator,
    network: Option<&Arc<Network>>,
    spec: &SandboxSpec,
    net: Option<&FunctionNetwork>,
) -> Result<PreparedSandbox, InvokeError> {
    let mut sandbox = isolator.prepare(spec).map_err(InvokeError::Spawn)?;
    if let Some(net) = net {
        let network = network
            .ok_or_else(|| InvokeError::Internal("this agent gives functions no network".into()))?;
        // On failure the sandbox is dropped, hence killed, and the partial network undone.
        network
            .attach(net, &mut sandbox)
            .map_err(|e| InvokeError::Internal(format!("function network: {e}")))?;
    }
    Ok(sandbox)
}

/// Why a stored function cannot be served by this agent as configured.
#[derive(Debug, thiserror::Error)]
pub enum FunctionConfigError {
    #[error(
        "runtime {0:?} is not configured on this agent (see [runtimes] in its config; configured: {1})"
    )]
    UnknownRuntime(String, String),
}

impl ActiveFunction {
    /// An exec function whose fresh sandbox, built ahead, also starts its function ahead
    /// (`start_ahead` without `reuse_sandbox`; kept sandboxes start theirs themselves).
    pub fn starts_ahead(&self) -> bool {
        self.manifest.mode == Mode::Exec
            && self.manifest.start_ahead
            && !self.manifest.reuse_sandbox
    }

    pub fn new(
        rec: &FunctionRecord,
        v: &VersionRecord,
        bundle: PathBuf,
        config: &Config,
    ) -> Result<ActiveFunction, FunctionConfigError> {
        let m = &v.manifest;
        let resolved = m.resolve(&config.defaults);
        let in_bundle = |p: &str| format!("{}/{}", isolate::TASK_ROOT, p.trim_start_matches("./"));
        let mut ro_binds = isolate::default_runtime_binds();
        let runtime = match &m.runtime {
            Some(name) => Some(
                config
                    .runtimes
                    .get(name)
                    .map(|r| r.resolved(&config.state_dir))
                    .ok_or_else(|| {
                        FunctionConfigError::UnknownRuntime(
                            name.clone(),
                            config
                                .runtimes
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", "),
                        )
                    })?,
            ),
            None => None,
        };
        let (program, args) = match (&m.entrypoint, &runtime) {
            (Some(Entrypoint::Path(p)), _) => (in_bundle(p), Vec::new()),
            (Some(Entrypoint::Command(argv)), _) => (argv[0].clone(), argv[1..].to_vec()),
            (None, Some(r)) => {
                let mut args = r.command[1..].to_vec();
                args.extend(m.handler.clone());
                (r.command[0].clone(), args)
            }
            (None, None) => (in_bundle(BOOTSTRAP), Vec::new()),
        };
        if let Some(r) = &runtime {
            ro_binds.extend(r.paths.iter().map(|p| isolate::Bind {
                source: p.clone(),
                dest: p.clone(),
                optional: false,
            }));
        }
        let net = FunctionNetwork::of(&rec.name, m.network.as_ref(), &config.network);
        if net.is_some() {
            // The instance's resolvers: the host's own may be a loopback stub it cannot reach.
            for b in ro_binds
                .iter_mut()
                .filter(|b| b.dest.as_os_str() == "/etc/resolv.conf")
            {
                b.source = crate::network::resolv_conf_path(&config.state_dir);
                b.optional = false;
            }
        }
        let lambda = m.mode == Mode::Lambda;
        let mut spec = SandboxSpec {
            name: rec.name.clone(),
            program,
            args,
            bundle: Some(bundle),
            ro_binds,
            tmp_size_bytes: config.sandbox.tmp_mb << 20,
            limits: Limits {
                memory_bytes: Some(resolved.memory_mb << 20),
                cpus: Some(resolved.cpus),
                pids: Some(config.sandbox.pids),
                nofile: 1024,
            },
            uid: rec.uid,
            gid: rec.uid,
            user_namespace: config.sandbox.user_namespace,
            stdio: if lambda {
                StdioSpec {
                    stdin: isolate::Stdio::Null,
                    ..StdioSpec::piped()
                }
            } else {
                StdioSpec::piped()
            },
            // Exec mode: set when the instance starts (a prepared sandbox is built before the
            // request). A Lambda instance learns its request ids from the Runtime API.
            late_env: (!lambda).then(|| REQUEST_ID_ENV.into()),
            loopback_listener: lambda.then_some(config.lambda.runtime_api_port),
            loopback_socketpair: (lambda && config.lambda.runtime_api_socketpair)
                .then_some(config.lambda.runtime_api_port),
            reusable: !lambda && m.reuse_sandbox,
            batch_scheduling: config.sandbox.batch_scheduling,
            // HTTP threads may be pinned to one CPU each: a sandbox cloned by one must not
            // inherit that.
            cpus: crate::placement::all_cpus().map(<[usize]>::to_vec),
            ..Default::default()
        };
        if let Some(r) = &runtime {
            spec.env.extend(r.env.clone());
        }
        spec.env.extend(m.env.clone());
        spec.env
            .insert("FNLET_FUNCTION_NAME".into(), rec.name.clone());
        spec.env
            .insert("FNLET_FUNCTION_VERSION".into(), v.version.to_string());
        spec.env
            .insert("FNLET_MEMORY_MB".into(), resolved.memory_mb.to_string());
        if lambda {
            lambda_env(&mut spec.env, rec, v, &resolved, config);
        }
        Ok(ActiveFunction {
            name: rec.name.clone(),
            version: v.version,
            sha256: v.sha256.clone(),
            manifest: v.manifest.clone(),
            resolved,
            spec,
            runtime_paths: runtime.map(|r| r.paths).unwrap_or_default(),
            net,
        })
    }

    /// A runtime whose client is not installed on this host (its directories are missing),
    /// as the init error the caller gets.
    pub fn missing_runtime(&self) -> Option<InvokeError> {
        let runtime = self.manifest.runtime.as_ref()?;
        let missing = self.runtime_paths.iter().find(|p| !p.exists())?;
        let message = format!(
            "runtime {runtime} is not installed on this host ({} is missing): run `fnlet runtime add {runtime}`",
            missing.display()
        );
        Some(InvokeError::InitFailed {
            error_type: "Runtime.NotInstalled".into(),
            body: bytes::Bytes::from(
                serde_json::json!({ "errorType": "Runtime.NotInstalled", "errorMessage": message })
                    .to_string(),
            ),
        })
    }

    /// What one instance of this version holds of the host while it lives.
    pub fn need(&self) -> Need {
        Need::of(self.resolved.memory_mb, self.resolved.cpus)
    }

    /// `arn:aws:lambda:REGION:ACCOUNT:function:NAME` (with `:VERSION` when qualified).
    pub fn arn(&self, config: &Config, qualified: bool) -> String {
        let base = function_arn(config, &self.name);
        if qualified {
            format!("{base}:{}", self.version)
        } else {
            base
        }
    }
}

pub fn function_arn(config: &Config, name: &str) -> String {
    format!(
        "arn:aws:lambda:{}:{}:function:{name}",
        config.lambda.region, config.lambda.account_id
    )
}

/// The environment Lambda gives an instance (what runtime clients read at start).
fn lambda_env(
    env: &mut std::collections::BTreeMap<String, String>,
    rec: &FunctionRecord,
    v: &VersionRecord,
    resolved: &Resolved,
    config: &Config,
) {
    let m = &v.manifest;
    let today = crate::store::now_rfc3339();
    let date = today.get(..10).unwrap_or("1970-01-01").replace('-', "/");
    let set = [
        (
            "AWS_LAMBDA_RUNTIME_API",
            format!("127.0.0.1:{}", config.lambda.runtime_api_port),
        ),
        (
            "_HANDLER",
            m.handler
                .clone()
                .or_else(|| m.aws.handler.clone())
                .unwrap_or_else(|| BOOTSTRAP.to_string()),
        ),
        ("LAMBDA_TASK_ROOT", isolate::TASK_ROOT.to_string()),
        ("LAMBDA_RUNTIME_DIR", isolate::TASK_ROOT.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", rec.name.clone()),
        ("AWS_LAMBDA_FUNCTION_VERSION", v.version.to_string()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            resolved.memory_mb.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", rec.name),
        ),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            format!("{date}/[{}]fnlet", v.version),
        ),
        (
            "AWS_LAMBDA_INITIALIZATION_TYPE",
            if resolved.min_instances > 0 {
                "provisioned-concurrency"
            } else {
                "on-demand"
            }
            .to_string(),
        ),
        ("AWS_REGION", config.lambda.region.clone()),
        ("AWS_DEFAULT_REGION", config.lambda.region.clone()),
        ("TZ", ":UTC".to_string()),
        ("LANG", "en_US.UTF-8".to_string()),
    ];
    for (k, val) in set {
        env.insert(k.to_string(), val);
    }
    if let Some(r) = &m.runtime {
        env.insert("AWS_EXECUTION_ENV".into(), format!("AWS_Lambda_{r}"));
    }
}

/// A sandbox built ahead of time whose function was started too (`start_ahead`): it waits
/// on stdin for its call. Dropping it kills it.
pub struct StartedAhead {
    pub sandbox: isolate::Sandbox,
    /// Read when the function does not end well: a failed exec says which step.
    pub report: isolate::ExecReport,
}

/// One function's slot in the registry; survives version changes.
pub struct FunctionSlot {
    active: RwLock<Arc<ActiveFunction>>,
    permits: RwLock<Arc<Semaphore>>,
    limit: AtomicU64,
    pub running: AtomicU64,
    waiting: AtomicU64,
    /// A sandbox built ahead of time for the active version: (version, sandbox).
    ready: Mutex<Option<(u64, PreparedSandbox)>>,
    /// Exec mode with `start_ahead` (a fresh sandbox per call): the sandbox built ahead with
    /// its function already started, waiting on stdin: (version, it).
    started: Mutex<Option<(u64, StartedAhead)>>,
    refilling: AtomicBool,
    /// Lambda mode: warm instances waiting for an invocation, most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// Exec mode with `reuse_sandbox`: sandboxes waiting for a call, most recently used last.
    reused: Mutex<Vec<IdleSandbox>>,
    /// Lambda mode: instances alive (starting, busy or idle), and the most there ever were.
    pub instances: Arc<InstanceCounts>,
    /// Told whenever `running` changes (the registry's [`Registry::load_changed`]).
    load_changed: Arc<tokio::sync::Notify>,
    /// The host's capacity: told when an instance turns idle (it may be evicted now).
    capacity: Arc<Capacity>,
    /// The function's per-call metric series, looked up at its first call.
    pub metrics: std::sync::OnceLock<crate::metrics::FunctionMetrics>,
}

/// Where in `idle` ((version, home thread) of each, least recently used first) the instance
/// for a call of `version` on HTTP thread `near` is: the last of that version on that thread,
/// else the last of that version.
fn pick_idle<I>(idle: I, version: u64, near: Option<usize>) -> Option<usize>
where
    I: Clone + DoubleEndedIterator<Item = (u64, Option<usize>)> + ExactSizeIterator,
{
    near.and_then(|t| {
        idle.clone()
            .rposition(|(v, home)| v == version && home == Some(t))
    })
    .or_else(|| idle.clone().rposition(|(v, _)| v == version))
}

/// How many of the idle instances of `idle_versions` eviction may take when `alive`
/// instances of the function live and `active` is its version: every one of another version
/// (kept for qualified calls; they never count towards `min`), and the active version's
/// above `min`.
fn evictable_among(idle_versions: &[u64], alive: u64, active: u64, min: u64) -> u64 {
    let others = idle_versions.iter().filter(|v| **v != active).count() as u64;
    let active_idle = idle_versions.len() as u64 - others;
    let active_alive = alive.saturating_sub(others);
    others + active_idle.min(active_alive.saturating_sub(min))
}

/// A warm instance and since when it waits.
struct Idle {
    instance: Tracked,
    since: Instant,
    /// Last used by a qualified call (a version number or an alias): kept while warm even
    /// when its version is not the active one.
    pinned: bool,
}

impl Idle {
    /// Whether it may stay in the pool while `active` is the active version.
    fn keep(&self, active: u64) -> bool {
        self.instance.is_alive() && (self.instance.version == active || self.pinned)
    }
}

/// Counts of a function's Lambda instances.
#[derive(Debug, Default)]
pub struct InstanceCounts {
    pub alive: AtomicU64,
    pub starting: AtomicU64,
    pub peak: AtomicU64,
}

/// An instance counted in its function's [`InstanceCounts`] for as long as it lives.
pub struct Tracked {
    pub instance: LambdaInstance,
    counts: Arc<InstanceCounts>,
    /// Its share of the host, given back when it goes (declared after the instance: the
    /// sandbox is killed first).
    _commitment: Commitment,
}

impl Tracked {
    /// Counts an instance about to start, holding `commitment`; the returned guard uncounts it
    /// (and gives the commitment back) if the start fails.
    pub fn reserve(counts: &Arc<InstanceCounts>, commitment: Commitment) -> Reservation {
        let alive = counts.alive.fetch_add(1, Ordering::AcqRel) + 1;
        counts.peak.fetch_max(alive, Ordering::AcqRel);
        counts.starting.fetch_add(1, Ordering::AcqRel);
        Reservation {
            counts: Some((counts.clone(), commitment)),
        }
    }
}

impl std::ops::Deref for Tracked {
    type Target = LambdaInstance;
    fn deref(&self) -> &LambdaInstance {
        &self.instance
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.counts.alive.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A kept exec sandbox being built in the background (`min_instances`), counted as starting
/// so the warm pool's clock does not start another meanwhile.
pub struct Starting(Arc<InstanceCounts>);

impl Starting {
    pub fn new(counts: &Arc<InstanceCounts>) -> Starting {
        counts.starting.fetch_add(1, Ordering::AcqRel);
        Starting(counts.clone())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.starting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An instance being started, counted as alive and starting.
pub struct Reservation {
    counts: Option<(Arc<InstanceCounts>, Commitment)>,
}

impl Reservation {
    pub fn started(mut self, instance: LambdaInstance) -> Tracked {
        let (counts, commitment) = self.counts.take().expect("a reservation is used once");
        counts.starting.fetch_sub(1, Ordering::AcqRel);
        Tracked {
            instance,
            counts,
            _commitment: commitment,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((c, _commitment)) = self.counts.take() {
            c.starting.fetch_sub(1, Ordering::AcqRel);
            c.alive.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A running invocation's hold on its slot; released on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    slot: Arc<FunctionSlot>,
    pub function: Arc<ActiveFunction>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slot.running.fetch_sub(1, Ordering::Relaxed);
        self.slot.load_changed.notify_one();
    }
}

impl FunctionSlot {
    fn new(
        f: ActiveFunction,
        load_changed: Arc<tokio::sync::Notify>,
        capacity: Arc<Capacity>,
    ) -> FunctionSlot {
        let limit = f.resolved.max_concurrency;
        FunctionSlot {
            active: RwLock::new(Arc::new(f)),
            permits: RwLock::new(Arc::new(Semaphore::new(limit as usize))),
            limit: AtomicU64::new(limit.into()),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            ready: Mutex::new(None),
            started: Mutex::new(None),
            refilling: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            reused: Mutex::new(Vec::new()),
            instances: Arc::new(InstanceCounts::default()),
            load_changed,
            capacity,
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// A warm instance of `version`, the most recently used (its caches are warmest) of those
    /// whose Runtime API connection is on the HTTP thread `near` if there is one (the call
    /// drives it from there: no move between event loops), else of all. Instances that have
    /// died, or whose version is neither active nor kept for qualified calls, are dropped on
    /// the way; the others stay for their callers.
    pub fn take_idle(&self, version: u64, near: Option<usize>) -> Option<Tracked> {
        let active = self.active().version;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| i.keep(active) || (i.instance.is_alive() && i.instance.version == version));
        let at = pick_idle(
            idle.iter().map(|i| (i.instance.version, i.instance.home())),
            version,
            near,
        )?;
        Some(idle.remove(at).instance)
    }

    /// Returns an instance to the warm pool after an invocation. One of a version that is not
    /// the active one stays only after a qualified call (`pinned`): the next call of that
    /// version takes it; otherwise (a deploy happened during the call) it goes.
    pub fn put_idle(&self, instance: Tracked, pinned: bool) {
        let idle = Idle {
            instance,
            since: Instant::now(),
            pinned,
        };
        if !idle.keep(self.active().version) {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(idle);
        self.capacity.released.notify_waiters();
    }

    /// Where in `idle` the least recently used instance that may be evicted is: one of
    /// another version than the active one, or one above `min_instances` (provisioned
    /// instances stay); never one of `spare` (the version a call of this function wants room
    /// for: it would take that one instead).
    fn evictable(&self, idle: &[Idle], spare: Option<u64>) -> Option<usize> {
        let f = self.active();
        let others = idle
            .iter()
            .filter(|i| i.instance.version != f.version)
            .count() as u64;
        let active_alive = self
            .instances
            .alive
            .load(Ordering::Acquire)
            .saturating_sub(others);
        let above_min = active_alive > u64::from(f.resolved.min_instances);
        idle.iter().position(|i| {
            Some(i.instance.version) != spare && (above_min || i.instance.version != f.version)
        })
    }

    /// When the least recently used idle instance that may be evicted went idle (a reused
    /// exec sandbox, idle, always may, unless it is of `spare`).
    fn evictable_since(&self, spare: Option<u64>) -> Option<Instant> {
        let lambda = self.lambda_evictable_since(spare);
        let reused = self.reused_evictable_since(spare);
        lambda.into_iter().chain(reused).min()
    }

    fn lambda_evictable_since(&self, spare: Option<u64>) -> Option<Instant> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        self.evictable(&idle, spare).map(|at| idle[at].since)
    }

    fn reused_evictable_since(&self, spare: Option<u64>) -> Option<Instant> {
        let reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
        self.reused_evictable(&reused, spare)
            .map(|at| reused[at].since)
    }

    /// Where in `reused` the least recently used kept sandbox that may be evicted is: as
    /// [`Self::evictable`] picks Lambda instances, the active version's `min_instances` stay.
    fn reused_evictable(&self, reused: &[IdleSandbox], spare: Option<u64>) -> Option<usize> {
        let f = self.active();
        let above_min = self.reused_active_alive(reused) > u64::from(f.resolved.min_instances);
        reused.iter().position(|i| {
            Some(i.sandbox.version) != spare && (above_min || i.sandbox.version != f.version)
        })
    }

    /// Kept sandboxes of the active version alive (idle or serving a call): every one alive
    /// but the idle ones of other versions (a busy one of another version is dropped when its
    /// call ends).
    fn reused_active_alive(&self, reused: &[IdleSandbox]) -> u64 {
        let active = self.active().version;
        let others = reused
            .iter()
            .filter(|i| i.sandbox.version != active)
            .count() as u64;
        self.instances
            .alive
            .load(Ordering::Acquire)
            .saturating_sub(others)
    }

    /// Stops the least recently used idle instance, if one may be evicted; its id.
    fn take_evictable(&self, spare: Option<u64>) -> Option<String> {
        let lambda_since = self.lambda_evictable_since(spare);
        let reused_since = self.reused_evictable_since(spare);
        if reused_since.is_some() && (lambda_since.is_none() || reused_since < lambda_since) {
            let mut reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
            let at = self.reused_evictable(&reused, spare)?;
            let victim = reused.remove(at).sandbox;
            drop(reused);
            // Dropped: killed, and its commitment given back once it is gone.
            return Some(victim.id());
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let at = self.evictable(&idle, spare)?;
        let victim = idle.remove(at).instance;
        drop(idle);
        Some(victim.id.clone())
    }

    /// How many of its idle instances eviction could take now: as [`Self::evictable`] picks
    /// them, never the active version's below min_instances.
    fn evictable_count(&self) -> u64 {
        let f = self.active();
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let versions: Vec<u64> = idle.iter().map(|i| i.instance.version).collect();
        let reused = {
            let reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
            let versions: Vec<u64> = reused.iter().map(|i| i.sandbox.version).collect();
            evictable_among(
                &versions,
                self.reused_active_alive(&reused),
                f.version,
                u64::from(f.resolved.min_instances),
            )
        };
        reused
            + evictable_among(
                &versions,
                self.instances.alive.load(Ordering::Acquire),
                f.version,
                u64::from(f.resolved.min_instances),
            )
    }

    /// A reused exec sandbox of `version` waiting for a call: the most recently used, so that
    /// sandboxes a burst left behind age out. With `start_ahead`, while no more than
    /// `min_instances` wait, the one that has waited longest: the provisioned sandboxes take
    /// calls in turn, and each has had the others' calls' time to start its next process.
    pub fn take_reused(&self, version: u64) -> Option<WarmSandbox> {
        let f = self.active();
        let mut reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
        let mut of_version = reused
            .iter()
            .enumerate()
            .filter(|(_, i)| i.sandbox.version == version)
            .map(|(at, _)| at);
        let in_turn = f.manifest.start_ahead
            && version == f.version
            && reused
                .iter()
                .filter(|i| i.sandbox.version == version)
                .count() as u64
                <= u64::from(f.resolved.min_instances);
        let at = match in_turn {
            true => of_version.next()?,
            false => of_version.next_back()?,
        };
        Some(reused.remove(at).sandbox)
    }

    /// Puts a reused exec sandbox whose call ended well back, to wait for the next call of its
    /// version; one of a version no longer active is dropped (killed) instead.
    pub fn put_reused(&self, sandbox: WarmSandbox) {
        if sandbox.version != self.active().version {
            return;
        }
        self.reused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(IdleSandbox {
                sandbox,
                since: Instant::now(),
            });
        self.capacity.released.notify_waiters();
    }

    /// Whether a reused exec sandbox of `version` waits.
    pub fn has_reused_of(&self, version: u64) -> bool {
        self.reused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|i| i.sandbox.version == version)
    }

    /// Whether a warm instance of `version` waits.
    pub fn has_idle_of(&self, version: u64) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|i| i.instance.version == version && i.instance.is_alive())
    }

    /// Idle Lambda instances and reused exec sandboxes.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
            + self.reused.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops reused exec sandboxes idle for `keep_alive_s` or more (the oldest first, keeping
    /// `min_instances` of the active version alive), and those of versions no longer active.
    /// Returns how many should be started to reach `min_instances`.
    pub fn reap_reused(&self, now: Instant) -> u32 {
        let f = self.active();
        let keep_alive = Duration::from_secs_f64(f.resolved.keep_alive_s);
        let min = u64::from(f.resolved.min_instances);
        let gone: Vec<IdleSandbox> = {
            let mut reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
            let mut alive = self.reused_active_alive(&reused);
            // Oldest first: `reused` is in the order the sandboxes went idle.
            let (keep, gone) = std::mem::take(&mut *reused).into_iter().partition(|i| {
                if i.sandbox.version != f.version {
                    return false;
                }
                let expired = now.saturating_duration_since(i.since) >= keep_alive;
                if expired && alive > min {
                    alive -= 1;
                    return false;
                }
                true
            });
            *reused = keep;
            gone
        };
        let alive_after = {
            let reused = self.reused.lock().unwrap_or_else(|p| p.into_inner());
            // Those in `gone` are still counted until they drop below.
            self.reused_active_alive(&reused)
                .saturating_sub(gone.len() as u64)
        };
        drop(gone);
        min.saturating_sub(alive_after) as u32
    }

    /// Stops idle instances that have waited longer than `keep_alive` (the oldest first),
    /// keeping `min` of the active version alive, and every one that died or runs an old
    /// version no qualified call used last. Instances kept for qualified calls have the same
    /// keep-alive and never count towards `min`. Returns how many instances should be started
    /// to reach `min`.
    pub fn reap_idle(&self, now: Instant) -> u32 {
        let f = self.active();
        let keep_alive = Duration::from_secs_f64(f.resolved.keep_alive_s);
        let min = u64::from(f.resolved.min_instances);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| i.keep(f.version));
        let expired = |i: &Idle| now.saturating_duration_since(i.since) >= keep_alive;
        idle.retain(|i| i.instance.version == f.version || !expired(i));
        let others = idle
            .iter()
            .filter(|i| i.instance.version != f.version)
            .count() as u64;
        let active_alive = || (self.instances.alive.load(Ordering::Acquire)).saturating_sub(others);
        // Oldest first; the count of alive instances drops as each is dropped.
        let mut i = 0;
        while i < idle.len() {
            if active_alive() <= min {
                break;
            }
            if idle[i].instance.version == f.version && expired(&idle[i]) {
                drop(idle.remove(i));
            } else {
                i += 1;
            }
        }
        min.saturating_sub(active_alive()) as u32
    }

    /// Drops every idle instance (shutdown, removal): each is killed.
    pub fn drop_idle(&self) {
        let all = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        drop(all);
        let reused = std::mem::take(&mut *self.reused.lock().unwrap_or_else(|p| p.into_inner()));
        drop(reused);
    }

    /// A slot without queueing, for background warm-ups (min_instances): they never take a
    /// slot a caller waits for.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let sem = self
            .permits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let permit = sem.try_acquire_owned().ok()?;
        self.running.fetch_add(1, Ordering::Relaxed);
        self.load_changed.notify_one();
        Some(Slot {
            _permit: permit,
            slot: self.clone(),
            function: self.active(),
        })
    }

    pub fn active(&self) -> Arc<ActiveFunction> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_active(&self, f: ActiveFunction) {
        let limit = f.resolved.max_concurrency;
        if u64::from(limit) != self.limit.swap(limit.into(), Ordering::Relaxed) {
            // In-flight invocations keep their permits of the old semaphore.
            *self.permits.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(Semaphore::new(limit as usize));
        }
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(f);
    }

    /// Whether a sandbox built ahead of time (its function started or not) waits for the
    /// active version.
    pub fn has_ready(&self) -> bool {
        let version = self.active().version;
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(v, _)| *v == version)
            || self
                .started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|(v, _)| *v == version)
    }

    /// The sandbox built ahead of time for `version` with its function started
    /// (`start_ahead`), if one waits.
    pub fn take_started(&self, version: u64) -> Option<StartedAhead> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        match started.take() {
            Some((v, sb)) if v == version => Some(sb),
            // Started for a version no longer active: dropping it kills it.
            _ => None,
        }
    }

    /// The sandbox built ahead of time for `version`, if one is ready.
    pub fn take_ready(&self, version: u64) -> Option<PreparedSandbox> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        match ready.take() {
            Some((v, sb)) if v == version => Some(sb),
            // Built for a version no longer active: dropping it kills it.
            _ => None,
        }
    }

    /// Builds the next sandbox ahead of time, in the background, unless one is ready or being
    /// built.
    pub fn refill(self: &Arc<Self>, isolator: &Arc<Isolator>, network: Option<&Arc<Network>>) {
        let f = self.active();
        if self.has_ready() {
            return;
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = self.clone();
        let iso = isolator.clone();
        let network = network.cloned();
        tokio::task::spawn_blocking(move || {
            let res = prepare_sandbox(&iso, network.as_ref(), &f.spec, f.net.as_ref());
            slot.refilling.store(false, Ordering::Release);
            match res {
                // Its function started now, to wait for its call on stdin.
                Ok(sb) if f.starts_ahead() => match sb.release(None) {
                    Ok((sandbox, report)) if slot.active().version == f.version => {
                        let old = slot
                            .started
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .replace((f.version, StartedAhead { sandbox, report }));
                        drop(old);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(function = %f.name, version = f.version, "starting a function ahead of time failed: {e}")
                    }
                },
                Ok(sb) => {
                    if slot.active().version == f.version {
                        let old = slot
                            .ready
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .replace((f.version, sb));
                        drop(old);
                    }
                }
                Err(e) => {
                    tracing::warn!(function = %f.name, version = f.version, "building a sandbox ahead of time failed: {e}")
                }
            }
        });
    }

    /// Takes a slot, queueing up to `wait`; a queue longer than ten times the limit refuses at once.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Result<Slot, InvokeError> {
        let sem = self
            .permits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let function = self.active();
        let limit = function.resolved.max_concurrency;
        let overloaded = || InvokeError::Overloaded {
            function: function.name.clone(),
            limit,
        };
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.load(Ordering::Relaxed) >= 10 * u64::from(limit) {
                    return Err(overloaded());
                }
                // Counted down however the wait ends: a caller who hangs up while queued
                // drops this future, and must not hold a place in the queue forever.
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _queued = Queued(&self.waiting);
                let r = tokio::time::timeout(wait, sem.acquire_owned()).await;
                match r {
                    Ok(Ok(p)) => p,
                    _ => return Err(overloaded()),
                }
            }
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        self.load_changed.notify_one();
        Ok(Slot {
            _permit: permit,
            slot: self.clone(),
            function: self.active(),
        })
    }
}

pub struct Registry {
    map: RwLock<HashMap<String, Arc<FunctionSlot>>>,
    /// Stored functions this agent cannot run, and why (e.g. the active version's bundle is
    /// gone); a deploy or rollback that activates one clears it.
    failed: RwLock<HashMap<String, String>>,
    /// Told whenever a call starts or ends here: [`Registry::running_total`] may have changed
    /// (the cluster reports it to the peers).
    pub load_changed: Arc<tokio::sync::Notify>,
    /// Told when a function is activated or removed (the scheduler reads the triggers again).
    pub functions_changed: tokio::sync::Notify,
    /// What live instances hold of the host.
    pub capacity: Arc<Capacity>,
    /// Idle instances evicted to make room.
    pub evictions: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(Capacity::unlimited())
    }
}

impl Registry {
    pub fn new(capacity: Capacity) -> Registry {
        Registry {
            map: Default::default(),
            failed: Default::default(),
            load_changed: Default::default(),
            capacity: Arc::new(capacity),
            evictions: AtomicU64::new(0),
            functions_changed: Default::default(),
        }
    }

    /// Commits an instance of `function` needing `need`: when the host is full, evicts idle
    /// instances of other functions (and, for a Lambda call of `version`, the function's
    /// idle instances of its other versions), least recently used first, then waits for
    /// room until `deadline`. `ready`: checked whenever something changed, it ends the wait early with `Ok(None)`
    /// (a warm instance of the caller's own function turned idle, say).
    pub async fn commit(
        &self,
        function: &str,
        version: Option<u64>,
        need: Need,
        deadline: tokio::time::Instant,
        mut ready: impl FnMut() -> bool,
    ) -> Result<Option<Commitment>, capacity::Shortfall> {
        loop {
            // Registered before the try, so a release in between is not missed.
            let released = self.capacity.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let short = match self.capacity.try_commit(need) {
                Ok(c) => return Ok(Some(c)),
                Err(short) => short,
            };
            if let Some(victim) = self.evict_one(function, version) {
                tracing::info!(function = %victim.0, instance = %victim.1, for_function = function, "evicted an idle instance to make room ({})", short.resource());
                continue;
            }
            if ready() {
                return Ok(None);
            }
            if !self.capacity.fits_at_all(need)
                || tokio::time::timeout_at(deadline, released).await.is_err()
            {
                // One last try: the room may have come with the deadline.
                return match self.capacity.try_commit(need) {
                    Ok(c) => Ok(Some(c)),
                    Err(_) => Err(short),
                };
            }
        }
    }

    /// Whether a call to `name` would find room here at once: a warm instance of it waits
    /// (Lambda mode), or one more instance fits the host's capacity, counting what evicting
    /// other functions' idle instances would give back. The cluster's router sends a call
    /// elsewhere when not, rather than queue it behind the capacity here. A function unknown
    /// here has room (its handler answers).
    pub fn room_for(&self, name: &str) -> bool {
        let Some(slot) = self.get(name) else {
            return true;
        };
        let f = slot.active();
        // An idle instance of an older version, kept for qualified calls, cannot take it.
        if f.manifest.mode == crate::manifest::Mode::Lambda && slot.has_idle_of(f.version) {
            return true;
        }
        if f.manifest.reuse_sandbox && slot.has_reused_of(f.version) {
            return true;
        }
        let mut freeable = capacity::Amounts::default();
        for (other, s) in self.map.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if other == name {
                continue;
            }
            let n = s.evictable_count();
            if n == 0 {
                continue;
            }
            let need = s.active().need();
            freeable.memory_bytes = freeable
                .memory_bytes
                .saturating_add(need.memory_bytes.saturating_mul(n));
            freeable.cpu_millis = freeable
                .cpu_millis
                .saturating_add(need.cpu_millis.saturating_mul(n));
            freeable.instances = freeable.instances.saturating_add(n);
        }
        self.capacity.fits_with(f.need(), freeable)
    }

    /// Stops the least recently used idle instance that may be evicted to make room for a
    /// call of `function`'s `version`: of any other function, or one of `function`'s other
    /// versions (an old version's instance, kept for qualified calls, must not keep the
    /// active version out; None: the function has no idle instances, exec mode). Its
    /// function's name and the instance's id.
    pub fn evict_one(&self, function: &str, version: Option<u64>) -> Option<(String, String)> {
        let slots: Vec<(String, Arc<FunctionSlot>, Option<u64>)> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(n, s)| match n.as_str() == function {
                false => Some((n.clone(), s.clone(), None)),
                true => version.map(|v| (n.clone(), s.clone(), Some(v))),
            })
            .collect();
        let mut order: Vec<(Instant, usize)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, (_, s, spare))| s.evictable_since(*spare).map(|t| (t, i)))
            .collect();
        order.sort();
        for (_, i) in order {
            let (name, slot, spare) = &slots[i];
            if let Some(id) = slot.take_evictable(*spare) {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                return Some((name.clone(), id));
            }
        }
        None
    }

    pub fn get(&self, name: &str) -> Option<Arc<FunctionSlot>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Makes `f` the version new invocations of its function run.
    pub fn activate(&self, f: ActiveFunction) {
        self.failed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&f.name);
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&f.name) {
            Some(slot) => slot.set_active(f),
            None => {
                map.insert(
                    f.name.clone(),
                    Arc::new(FunctionSlot::new(
                        f,
                        self.load_changed.clone(),
                        self.capacity.clone(),
                    )),
                );
            }
        }
        drop(map);
        self.functions_changed.notify_one();
    }

    /// Records that the stored function `name`, which has no active version here, cannot run,
    /// and why; until a deploy or rollback activates a version, its calls get that reason.
    pub fn mark_failed(&self, name: &str, reason: String) {
        self.failed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), reason);
    }

    /// Why `name` cannot run, if it was marked failed.
    pub fn failed(&self, name: &str) -> Option<String> {
        self.failed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn remove(&self, name: &str) -> Option<Arc<FunctionSlot>> {
        self.failed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let slot = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(s) = &slot {
            s.drop_idle();
        }
        self.functions_changed.notify_one();
        slot
    }

    /// Every function's slot.
    pub fn slots(&self) -> Vec<Arc<FunctionSlot>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn running_total(&self) -> u64 {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.running.load(Ordering::Relaxed))
            .sum()
    }

    /// At shutdown: waits (up to `limit`) for sandboxes being built ahead to finish, then drops
    /// every one that waits, which kills it and removes its cgroup.
    pub fn drop_prepared(&self, limit: std::time::Duration) {
        let slots: Vec<Arc<FunctionSlot>> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let deadline = std::time::Instant::now() + limit;
        while slots.iter().any(|s| s.refilling.load(Ordering::Acquire))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for s in &slots {
            let ready = s.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(ready);
            let started = s.started.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(started);
            s.drop_idle();
        }
    }

    /// Bundles that running instances may still have mounted.
    pub fn bundles_in_use(&self) -> std::collections::HashSet<String> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.active().sha256.clone())
            .collect()
    }
}

/// One caller's place in a function's queue, given up when dropped.
struct Queued<'a>(&'a AtomicU64);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_instance_on_the_calling_thread_comes_first_then_the_most_recent() {
        // Least recently used first: (version, home thread).
        let idle = [
            (1, Some(0)),
            (1, Some(1)),
            (2, Some(0)),
            (1, Some(0)),
            (1, None),
        ];
        let pick = |version, near| pick_idle(idle.iter().copied(), version, near);
        // The most recent of version 1 on thread 0, though one of thread 1 and one on no
        // thread were used since.
        assert_eq!(pick(1, Some(0)), Some(3));
        assert_eq!(pick(1, Some(1)), Some(1));
        // None on that thread, or no thread asking (the shared runtime): the most recent.
        assert_eq!(pick(1, Some(7)), Some(4));
        assert_eq!(pick(1, None), Some(4));
        assert_eq!(pick(2, Some(1)), Some(2));
        assert_eq!(pick(3, Some(0)), None);
    }

    fn function(limit: u32) -> ActiveFunction {
        let manifest = Manifest::parse(&format!(
            "name = \"f\"\nentrypoint = \"run\"\nmax_concurrency = {limit}\n"
        ))
        .unwrap();
        let rec = FunctionRecord {
            name: "f".into(),
            uid: 200_000,
            active: 1,
            next_version: 2,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let v = VersionRecord {
            name: "f".into(),
            version: 1,
            sha256: "abc".into(),
            size_bytes: 1,
            created_at: String::new(),
            manifest,
            code_sha256: None,
        };
        ActiveFunction::new(&rec, &v, "/b".into(), &Config::default()).unwrap()
    }

    #[test]
    fn eviction_keeps_min_instances_of_the_active_version_only() {
        // Two idle of the active version 3 and min 1: one may go; with a third busy, both.
        assert_eq!(evictable_among(&[3, 3], 2, 3, 1), 1);
        assert_eq!(evictable_among(&[3, 3], 3, 3, 1), 2);
        // Two idle of version 1 (kept for qualified calls) beside them: those go too, and
        // they do not stand in for the active version's minimum.
        assert_eq!(evictable_among(&[1, 3, 1, 3], 4, 3, 1), 3);
        assert_eq!(evictable_among(&[1, 1, 3], 3, 3, 2), 2);
        assert_eq!(evictable_among(&[1, 1], 3, 3, 1), 2);
        // The active version at its minimum: only the others.
        assert_eq!(evictable_among(&[1, 3], 2, 3, 1), 1);
        assert_eq!(evictable_among(&[], 0, 3, 0), 0);
        assert_eq!(evictable_among(&[3, 3], 2, 3, 0), 2);
    }

    #[test]
    fn spec_follows_the_manifest() {
        let f = function(3);
        assert_eq!(f.spec.program, "/var/task/run");
        assert_eq!(f.spec.uid, 200_000);
        assert_eq!(f.spec.limits.memory_bytes, Some(128 << 20));
        assert_eq!(f.spec.env["FNLET_FUNCTION_NAME"], "f");
    }

    #[tokio::test]
    async fn concurrency_is_capped_and_the_queue_times_out() {
        let reg = Registry::default();
        reg.activate(function(2));
        let slot = reg.get("f").unwrap();
        let a = slot.acquire(Duration::from_millis(10)).await.unwrap();
        let _b = slot.acquire(Duration::from_millis(10)).await.unwrap();
        assert!(matches!(
            slot.acquire(Duration::from_millis(20)).await,
            Err(InvokeError::Overloaded { .. })
        ));
        assert_eq!(reg.running_total(), 2);
        drop(a);
        slot.acquire(Duration::from_millis(10)).await.unwrap();
    }

    #[tokio::test]
    async fn a_queued_call_gets_the_freed_slot() {
        let reg = Registry::default();
        reg.activate(function(1));
        let slot = reg.get("f").unwrap();
        let a = slot.acquire(Duration::from_millis(10)).await.unwrap();
        let s2 = slot.clone();
        let waiter = tokio::spawn(async move { s2.acquire(Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert!(waiter.await.unwrap());
    }

    /// Callers who hang up while queued give their places back: past 10 x max_concurrency
    /// waiting, calls are refused at once, so a leaked place would refuse them forever.
    #[tokio::test]
    async fn a_caller_who_leaves_the_queue_frees_its_place() {
        let reg = Registry::default();
        reg.activate(function(1));
        let slot = reg.get("f").unwrap();
        let held = slot.acquire(Duration::from_millis(10)).await.unwrap();
        for _ in 0..20 {
            let s = slot.clone();
            let waiter = tokio::spawn(async move { s.acquire(Duration::from_secs(30)).await });
            tokio::time::sleep(Duration::from_millis(2)).await;
            waiter.abort();
            let _ = waiter.await;
        }
        assert_eq!(slot.waiting.load(Ordering::Relaxed), 0);
        drop(held);
        slot.acquire(Duration::from_millis(10)).await.unwrap();
    }
}
