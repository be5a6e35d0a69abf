//! `fnlet agent`: start-up, serving, and shutdown of the daemon.
//!
//! Start-up: load the config, take the state dir and the cgroup root (refused if another agent
//! holds either), remove what a crashed predecessor left (its sandboxes' cgroups and
//! half-finished uploads), load the functions, bind, serve.
//! SIGTERM/SIGINT: stop accepting, let in-flight invocations finish for up to
//! `shutdown_grace_s`, kill what is left, remove every cgroup, exit 0.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use isolate::{Isolator, IsolatorConfig};
use tokio_util::sync::CancellationToken;

use crate::api::{self, App};
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::ownership;
use crate::pool::{ActiveFunction, Registry};
use crate::router::Router;
use crate::store::Store;
use crate::systemd;

/// Options of `fnlet agent`; each overrides the config file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on [default: 127.0.0.1:8740].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for bundles, metadata, logs and the admin token [default: /var/lib/fnlet].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file [default: /etc/fnlet/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the default configuration (every key, with its embedded default) and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// UDP address of the cluster's QUIC endpoint [default: 127.0.0.1:8741].
    #[arg(long, value_name = "ADDR:PORT")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers dial, when --peer-listen is not it.
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise: Option<std::net::SocketAddr>,
    /// This node's id in the cluster [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// A cluster member to join (repeatable); needs --token (or cluster.token_file) at the
    /// first start.
    #[arg(long, value_name = "ADDR:PORT")]
    pub join: Vec<std::net::SocketAddr>,
    /// The join token from `fnlet cluster init` or `fnlet cluster token`.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FNLET_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.print_default_config {
        print!("{}", Config::default_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = match &args.config {
        Some(p) => Config::load(p, true)?,
        None => Config::load(Path::new(DEFAULT_CONFIG_PATH), false)?,
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = &args.state_dir {
        config.state_dir =
            std::path::absolute(d).with_context(|| format!("--state-dir {}", d.display()))?;
    }
    if let Some(a) = args.peer_listen {
        config.cluster.listen = a;
    }
    if let Some(a) = args.advertise {
        config.cluster.advertise = a.to_string();
    }
    if let Some(id) = &args.node_id {
        config.cluster.node_id = id.clone();
    }
    if !args.join.is_empty() {
        config.cluster.join = args.join.clone();
    }
    config.validate(args.config.as_deref().unwrap_or(Path::new("--state-dir")))?;
    for name in config.runtimes.keys() {
        if let Some(why) = config.unmountable_runtime(name) {
            tracing::warn!("{why}; functions using it are refused");
        }
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("fnlet agent must run as root: it creates namespaces and cgroups for every function");
    }
    if config.lambda.runtime_api_socketpair && ptrace_attach_forbidden() {
        // The socket pair needs the sandbox's seccomp listener (pidfd_getfd) and the caller's
        // memory (process_vm_readv), both ptrace-attach checks that Yama's scope 3 refuses.
        tracing::warn!(
            "kernel.yama.ptrace_scope is 3: the Runtime API stays on loopback TCP \
             (lambda.runtime_api_socketpair needs pidfd_getfd)"
        );
        config.lambda.runtime_api_socketpair = false;
    }
    // The CPUs the agent may use, read before any HTTP thread is pinned to one of them.
    crate::placement::init(config.sandbox.colocate_instances);
    // Forked now, while the agent is small and has one thread, by the thread that lives as
    // long as the agent (the helper dies with it).
    let spawner = if config.sandbox.spawn_helper {
        Some(isolate::spawner::Spawner::start().context("starting the spawn helper")?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let join_token = match (&args.token, config.cluster.token_file.as_str()) {
        (Some(t), _) => Some(t.clone()),
        (None, "") => None,
        (None, file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cluster.token_file {file}"))?
                .trim()
                .to_string(),
        ),
    };
    rt.block_on(serve(config, join_token, spawner))?;
    Ok(ExitCode::SUCCESS)
}

/// Yama's `ptrace_scope` 3: no process may attach to another, root included.
fn ptrace_attach_forbidden() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").is_ok_and(|v| v.trim() == "3")
}

/// Reads the admin token, creating it (mode 0600) at first start.
fn admin_token(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| anyhow::anyhow!("no randomness for the admin token: {e}"))?;
    let token = hex::encode(raw);
    let tmp = state_dir.join("admin.token.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        writeln!(f, "{token}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    tracing::info!(path = %path.display(), "created the admin token");
    Ok(token)
}

async fn serve(
    config: Config,
    join_token: Option<String>,
    spawner: Option<isolate::spawner::Spawner>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let state = &config.state_dir;
    std::fs::create_dir_all(state)
        .with_context(|| format!("creating state dir {}", state.display()))?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o750))
        .with_context(|| format!("chmod {}", state.display()))?;
    // Held until serve() returns: one agent per state dir, and below, per cgroup root.
    let _state_dir = ownership::claim_state_dir(state)?;
    let token = admin_token(state)?;

    let mut isolator = Isolator::new(IsolatorConfig {
        cgroup_root: config.sandbox.cgroup_root.clone(),
        cgroup_mode: config.cgroup_mode(),
        best_effort_limits: !config.sandbox.require_limits,
        // None made ahead: the agent builds sandboxes ahead (prepare_ahead), so creating
        // the namespace is off its request path anyway; with the pool, warm Lambda calls
        // fell into this machine's slow mode more often (BENCHMARKS.md, Lambda run 9).
        netns_pool: 0,
    })
    .context("preparing sandboxes")?;
    if let Some(mut spawner) = spawner {
        // A lost helper is replaced by a fresh exec of this binary (not a fork of the grown
        // agent); the agent clones in-process meanwhile.
        spawner
            .relaunch_with("/proc/self/exe".into())
            .context("starting the spawn helper's relaunch thread")?;
        let pid = spawner.pid();
        isolator
            .use_spawner(spawner)
            .context("placing the spawn helper in the agent's cgroup")?;
        tracing::debug!(pid, "sandboxes are cloned by the spawn helper");
    }
    let isolator = Arc::new(isolator);
    let unenforced = report_placement(&isolator, config.sandbox.require_limits)?;
    let placed = match &isolator.cgroup_placement().mount {
        Some(m) => format!(
            "cgroup v2 {}",
            m.join(&isolator.cgroup_placement().root).display()
        ),
        None => format!(
            "cgroup v1 {}/ per controller",
            isolator.cgroup_placement().root
        ),
    };
    // Only the root's owner reaps under it: another live agent's sandboxes would go too.
    let _cgroup_root =
        ownership::claim_cgroup_root(&isolator.cgroup_placement().root, || isolator.root_dir())?;
    // Ours now: a start-up that fails from here on (a refused join, a port in use) removes it.
    let mut root_guard = RemoveRootOnFailure(Some(isolator.clone()));
    let stale = isolator
        .reap_stale()
        .context("removing sandboxes left by a previous agent")?;
    if stale > 0 {
        tracing::warn!(
            count = stale,
            "killed and removed sandboxes left by a previous agent"
        );
    }

    let store = Store::open(state, config.sandbox.uid_base, config.sandbox.uid_count)
        .with_context(|| format!("opening the store in {}", state.display()))?;
    store
        .clear_staging()
        .context("clearing half-finished uploads")?;
    // Each live instance holds a few of the agent's descriptors: capacity.max_instances is
    // lowered to what the open-file limit holds beside 1,024 connections (the listener gets
    // what the instances leave).
    let nofile = api::listener::raise_nofile();
    let mut capacity = crate::pool::capacity::Amounts::of_this_host(&config.capacity);
    if let Some(n) = nofile {
        let fit = crate::pool::capacity::instances_within(n);
        if fit < capacity.instances {
            tracing::warn!(
                max_instances = fit,
                configured = capacity.instances,
                open_files = n,
                "fewer live instances than capacity.max_instances: each holds {} of the agent's \
                 descriptors and the open-file limit leaves room for only this many (raise \
                 LimitNOFILE)",
                crate::pool::capacity::FDS_PER_INSTANCE
            );
            capacity.instances = fit;
        }
    }
    let instance_fds = capacity
        .instances
        .saturating_mul(crate::pool::capacity::FDS_PER_INSTANCE);
    tracing::info!(
        memory_mb = capacity.memory_bytes >> 20,
        cpus = capacity.cpu_millis as f64 / 1000.0,
        instances = capacity.instances,
        "host capacity for instances ([capacity])"
    );
    let registry = Arc::new(Registry::new(crate::pool::capacity::Capacity::new(
        capacity,
    )));
    let mut names = Vec::new();
    for (rec, v) in store.list().context("loading functions")? {
        let bundle = store.bundle_path(&v.sha256);
        // A bundle lost from disk has no other copy (there is one per content hash): the
        // function is failed, rather than a spawn error on every call.
        let active = if bundle.is_dir() {
            ActiveFunction::new(&rec, &v, bundle, &config).map_err(|e| e.to_string())
        } else {
            Err(crate::store::StoreError::BundleMissing {
                name: rec.name.clone(),
                version: v.version,
                sha256: v.sha256.clone(),
            }
            .to_string())
        };
        match active {
            Ok(f) => {
                names.push(rec.name.clone());
                registry.activate(f);
            }
            // Kept in the store, not served: the operator fixes the config or redeploys.
            Err(why) => {
                tracing::error!(function = %rec.name, version = v.version, "not serving: {why}");
                registry.mark_failed(&rec.name, why);
            }
        }
    }
    let removed = store
        .changes()
        .gc(config.retain_versions, &Default::default())
        .context("collecting unused bundles")?;
    if removed > 0 {
        tracing::info!(count = removed, "removed unreferenced bundles");
    }

    let logs_dir = logs_dir(state);
    let logs = Arc::new(
        Logs::open(&logs_dir, config.limits.log_max_kb << 10)
            .map(|logs| {
                logs.with_line_budget(config.limits.log_lines_per_s)
                    .write_behind(LOG_WRITE_DELAY)
            })
            .with_context(|| format!("opening the log dir {}", logs_dir.display()))?,
    );
    logs.start_flusher();
    // Functions' egress: nothing changes on the host until an instance needs it, but what a
    // crashed predecessor left (bridge, veths, tables) goes now.
    let network = crate::network::Network::new(&config.network, state)
        .context("setting up the function network")?;
    {
        let net = network.clone();
        let stale = tokio::task::spawn_blocking(move || net.reap_stale())
            .await
            .context("removing a previous agent's function network")?
            .context("removing a previous agent's function network")?;
        if stale > 0 {
            tracing::warn!(
                count = stale,
                "removed the function network (bridge, veths, nftables tables) of a previous agent"
            );
        }
        if let Err(e) = network.check_range() {
            tracing::error!("functions with egress cannot start: {e}");
        }
    }
    let draining = CancellationToken::new();
    let kill = CancellationToken::new();
    let router = Router {
        registry: registry.clone(),
        isolator: isolator.clone(),
        logs,
        metrics: Arc::new(Metrics::new()),
        queue_timeout: Duration::from_millis(config.limits.queue_timeout_ms),
        max_response: (config.limits.max_response_mb << 20) as usize,
        draining: draining.clone(),
        kill: kill.clone(),
        prepare_ahead: config.sandbox.prepare_ahead,
        config: Arc::new(config.clone()),
        instances: tokio_util::task::TaskTracker::new(),
        network: Some(network.clone()),
    };
    let isolator = router.isolator.clone();
    let listeners = api::listener::bind(config.listen, config.http_threads())
        .with_context(|| format!("listening on {}", config.listen))?;
    let keys = crate::auth::KeyStore::open(state)
        .with_context(|| format!("opening the access keys in {}", state.display()))?;
    let router = Arc::new(router);
    let nats = match config.events.backend.as_str() {
        "nats" => Some(
            crate::events::nats::Nats::connect(&config.events, &config.node_id())
                .await
                .context("starting the NATS JetStream backend of [events]")?,
        ),
        _ => None,
    };
    let events = crate::events::Events::open(router.clone(), &config.events, nats)
        .with_context(|| format!("opening the event queue in {}", state.display()))?;
    let app = Arc::new(App {
        events: events.clone(),
        keys: Arc::new(keys),
        cgroup_version: isolator.cgroup_version().to_string(),
        cgroup_root: isolator.cgroup_root(),
        unenforced_limits: unenforced.clone(),
        node_id: config.node_id(),
        config: config.clone(),
        store: Arc::new(store),
        router,
        token,
        started,
        cluster: std::sync::OnceLock::new(),
        scheduler: Arc::default(),
        updates: Default::default(),
    });
    start_cluster(&app, join_token.as_deref()).await?;
    for name in &names {
        app.router.prewarm(name);
    }
    // Async invocation: due events start as their functions have room; stops with draining.
    tokio::spawn(events.run(draining.clone()));
    // Schedule triggers: each tick this host owns becomes an async event.
    tokio::spawn(app.scheduler.clone().run(app.clone(), draining.clone()));
    // The warm pool's clock: keep-alive reaping and min_instances.
    {
        let app = app.clone();
        let stop = draining.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::router::REAP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => app.router.reap().await,
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    tracing::info!(
        listen = %config.listen,
        state_dir = %state.display(),
        functions = registry.len(),
        cgroup = %app.cgroup_version,
        startup_ms = started.elapsed().as_secs_f64() * 1000.0,
        "fnlet agent ready"
    );
    // Listeners bound, functions loaded: tell systemd (Type=notify), then keep the watchdog fed
    // from the runtime's own health path.
    systemd::publish_endpoint(config.listen);
    let status = format!("{placed}; {}", limits_summary(&unenforced));
    systemd::ready(&summary(&app, &status));
    let self_checks = api::listener::SelfChecks::default();
    {
        let app = app.clone();
        systemd::spawn_watchdog(
            config.listen,
            self_checks.clone(),
            draining.clone(),
            move || summary(&app, &status),
        );
    }

    let grace = Duration::from_secs_f64(config.shutdown_grace_s);
    let shutdown = {
        let draining = draining.clone();
        let kill = kill.clone();
        async move {
            wait_for_signal().await;
            systemd::stopping("draining in-flight invocations");
            tracing::info!(
                grace_s = grace.as_secs_f64(),
                "shutting down: draining in-flight invocations"
            );
            draining.cancel();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if !kill.is_cancelled() {
                    tracing::warn!("shutdown grace over: killing the instances still running");
                    kill.cancel();
                }
            });
        }
    };
    // Serving: shutdown removes the root below, after the sandboxes.
    root_guard.0 = None;
    // Kept until the end: instances started by calls live on the serving threads.
    let _http = api::listener::serve(
        listeners,
        api::api(app.clone()),
        api::listener::ListenerLimits::new(&config.limits, nofile, instance_fds),
        &app.router.metrics,
        self_checks,
        shutdown,
        kill.clone(),
    )
    .await
    .context("starting the HTTP threads")?;
    kill.cancel();
    // Sandboxes built ahead (and any still being built) go first, so none appears after the
    // sweep below.
    let reg = registry.clone();
    let _ = tokio::task::spawn_blocking(move || reg.drop_prepared(Duration::from_secs(10))).await;
    // Lambda instances: idle ones are stopped, busy ones were killed with their invocation.
    app.router.stop_instances(Duration::from_secs(10)).await;
    // Whatever did not end with its invocation goes now.
    let left = isolator.reap_stale().unwrap_or(0);
    if left > 0 {
        tracing::warn!(count = left, "removed sandboxes still running at shutdown");
    }
    // The workers' bookkeeping of the last 100 ms (see events::queue) reaches the disk.
    if let Err(e) = app.events.flush().await {
        tracing::warn!("flushing the event queue: {e}");
    }
    // Every instance has ended: the bridge and fnlet's tables go.
    let net = network.clone();
    match tokio::task::spawn_blocking(move || net.stop()).await {
        Ok(Err(e)) => tracing::warn!("removing the function network: {e}"),
        Err(e) => tracing::warn!("removing the function network: {e}"),
        Ok(Ok(())) => {}
    }
    if let Some(node) = app.cluster.get() {
        node.close().await;
    }
    if let Err(e) = isolator.remove_root() {
        tracing::warn!("removing the cgroup root: {e}");
    }
    // The function logs' last lines (see LOG_WRITE_DELAY) reach their files.
    app.router.logs.flush();
    systemd::status("stopped");
    tracing::info!("fnlet agent stopped");
    Ok(())
}

/// How long a function's log lines may wait to be written to its file, together with the
/// lines logged meanwhile (one write then, not one per call; see `Logs::write_behind`).
const LOG_WRITE_DELAY: Duration = Duration::from_millis(100);

/// Removes the agent's cgroup root when start-up fails after the agent claimed it (no
/// sandbox runs yet); emptied once the agent serves.
struct RemoveRootOnFailure(Option<Arc<Isolator>>);

impl Drop for RemoveRootOnFailure {
    fn drop(&mut self) {
        if let Some(isolator) = self.0.take()
            && let Err(e) = isolator.remove_root()
        {
            tracing::warn!("removing the cgroup root after a failed start: {e}");
        }
    }
}

/// Joins the cluster named by `cluster.join` at the first start (with the token), and opens the
/// cluster endpoint whenever this agent is a member.
async fn start_cluster(app: &Arc<App>, join_token: Option<&str>) -> anyhow::Result<()> {
    use crate::cluster::{node, pki::ClusterDir};
    let config = &app.config;
    let dir = ClusterDir::new(&config.state_dir).with_node_cert_validity(
        std::time::Duration::from_secs(config.cluster.node_cert_validity_s),
    );
    let mut seeds = Vec::new();
    if !dir.is_member() {
        if config.cluster.join.is_empty() {
            return Ok(());
        }
        let Some(token) = join_token else {
            bail!(
                "--join needs a join token the first time (--token, FNLET_JOIN_TOKEN or \
                 cluster.token_file): `fnlet cluster token` on the cluster's first host makes one"
            );
        };
        seeds = node::join(&dir, &config.node_id(), &config.cluster.join, token)
            .await
            .context("joining the cluster")?;
    }
    let creds = dir
        .node_credentials()
        .context("reading this node's certificate")?;
    if creds.node_id != config.node_id() {
        bail!(
            "this node's certificate names {:?}, but its node id is {:?} (cluster.node_id, \
             --node-id, or the host name): keep the id it joined with",
            creds.node_id,
            config.node_id()
        );
    }
    let node = node::Node::start(
        dir,
        config.cluster.listen,
        config.peer_advertise(),
        seeds,
        app.router.metrics.clone(),
        app.router.draining.child_token(),
    )
    .with_context(|| format!("opening the cluster endpoint on {}", config.cluster.listen))?;
    node.attach(app);
    let _ = app.cluster.set(node);
    Ok(())
}

/// Logs where sandbox cgroups go and why, and which limits cannot be enforced here; with
/// `require_limits` the latter stops the agent. Returns the unenforced limits' controllers.
fn report_placement(isolator: &Isolator, require_limits: bool) -> anyhow::Result<Vec<String>> {
    let p = isolator.cgroup_placement();
    for note in &p.notes {
        tracing::warn!("{note}");
    }
    match &p.delegation {
        Some(d) => tracing::info!(
            unit = %d.unit,
            evidence = ?d.evidence,
            agent_cgroup = ?p.move_self_to,
            sandboxes = %isolator.cgroup_root(),
            "using the cgroup subtree systemd delegated to this unit"
        ),
        None => tracing::info!(sandboxes = %isolator.cgroup_root(), "sandbox cgroups"),
    }
    let missing = isolator.missing_controllers();
    if !missing.is_empty() {
        let list = missing.join("/");
        if require_limits {
            bail!(
                "the cgroup tree at {} has no {list} controller: function limits cannot be \
                 enforced on this host, and sandbox.require_limits is set",
                isolator.cgroup_root()
            );
        }
        tracing::warn!(
            controllers = %list,
            cgroup = %isolator.cgroup_root(),
            "function limits NOT enforced: the agent's cgroup tree has no {list} controller \
             (set sandbox.require_limits = true to refuse to start instead)"
        );
    }
    Ok(missing.into_iter().map(String::from).collect())
}

/// Function logs go to systemd's LogsDirectory= (`$LOGS_DIRECTORY`, /var/log/fnlet) when the
/// agent runs under systemd, else to `<state dir>/logs`.
fn logs_dir(state: &Path) -> PathBuf {
    std::env::var_os("LOGS_DIRECTORY")
        .and_then(|v| {
            // systemd lists one directory per LogsDirectory= entry, ':'-separated.
            let first = v.to_str()?.split(':').next()?.to_string();
            Path::new(&first)
                .is_absolute()
                .then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| state.join("logs"))
}

fn limits_summary(unenforced: &[String]) -> String {
    if unenforced.is_empty() {
        "limits enforced".to_string()
    } else {
        format!("limits NOT enforced ({})", unenforced.join(" "))
    }
}

/// The one-line STATUS= that `systemctl status fnlet` shows.
fn summary(app: &App, placement: &str) -> String {
    format!(
        "serving {} functions ({} running) on {}; {placement}",
        app.router.registry.len(),
        app.router.registry.running_total(),
        app.config.listen,
    )
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
