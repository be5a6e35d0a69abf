//! Lambda mode end to end, in one run: the benchmark no-op (tests/fixtures/lambda-noop, a
//! std-only, statically linked custom runtime) on a real `fnlet agent`, beside its floors and
//! peers, interleaved round by round.
//!
//! 1. Cold start with the prepared sandbox ready: a function with `keep_alive_s = 0`, whose
//!    instance the agent reaps after each call; each sample waits (untimed) until `describe`
//!    says a prepared sandbox waits and no instance is alive, and the reaped instance's cgroup
//!    is gone, then times one `POST /fn/noop-cold` from the request to the whole answer. Beside
//!    it: the floor, fork+exec of the same bootstrap with `AWS_LAMBDA_RUNTIME_API` pointing at a
//!    minimal Runtime API in this process (spawn until its response arrives), and the isolate
//!    library doing the same in the agent's sandbox (a prepared sandbox started, and a full
//!    `Isolator::spawn`), serving the same minimal Runtime API on the sandbox's loopback
//!    listener.
//! 2. Warm invocation with one client over one keep-alive connection: `POST /fn/noop-warm` (and
//!    the Invoke API, and `GET /healthz` for the bare HTTP round trip), beside the floor (the
//!    same no-op as a plain HTTP server on loopback: a second mode of this binary answering
//!    `{}`) and that server behind nginx (Debian's, keep-alive upstream), and the Runtime API's own
//!    floor: a relay (a third mode of this binary, `relay.rs`) that does the protocol's exchange
//!    and nothing else in front of the same no-op runtime as plain processes, with blocking I/O
//!    and, as a fourth mode, on tokio (a current-thread runtime per CPU, as the agent's HTTP
//!    threads). With `FNLET_BENCH_RELAYS=all`, two more: the tokio relay with hyper's server on
//!    the callers' side, and with hyper on both sides (the runtimes' connections served by
//!    hyper, events on channels), so the layers can be told apart.
//! 3. Throughput with a fixed number of concurrent clients (32) for fnlet with N warm
//!    instances (`max_concurrency = min_instances = N`) through `/fn` (and through the Invoke
//!    API at the largest N), the floor, nginx and both relays (with the largest N runtimes), in
//!    interleaved rounds of fixed length.
//!
//! The same client serves every contender: a small HTTP/1.1 client over a plain TCP socket
//! (blocking for the latency parts, a one-thread tokio runtime with one task per client for
//! throughput), the same request head and body, each answer checked (200 and `{}`).
//!
//! Run as root through `benches/run.sh lambda`, which installs nginx, builds fnlet and the
//! no-op first. Environment: `FNLET_BENCH_COLD_RUNS` (default 200), `FNLET_BENCH_COLD_WARMUP`
//! (10), `FNLET_BENCH_RUNS` (warm rounds, default 2000), `FNLET_BENCH_WARMUP` (200),
//! `FNLET_BENCH_CLIENTS` (32), `FNLET_BENCH_INSTANCES` (`4,8,16`), `FNLET_BENCH_SECONDS`
//! (load time per contender, default 6, over `FNLET_BENCH_LOAD_ROUNDS` = 3 rounds),
//! `FNLET_BENCH_MAX_REQUESTS` (bound per slice, 500000), `FNLET_BENCH_PROFILE` (seconds of
//! `perf record` of the agent under one warm client at the end, default 0: off),
//! `FNLET_BENCH_PERF_OUT` (where the perf report goes, default: printed),
//! `FNLET_BENCH_PROFILE_CLIENTS` (1: one client on noop-warm; more: that many on the largest N),
//! `FNLET_BENCH_AGENT_WORKERS` (an experiment: the agent's TOKIO_WORKER_THREADS),
//! `FNLET_BENCH_LAMBDA_CONFIG` (an experiment: more `[lambda]` lines for the agent),
//! `FNLET_BENCH_RELAYS` (`all`: the four relays; else the first two), `FNLET_BIN`,
//! `FNLET_NOOP_BIN` (default tests/fixtures/lambda-noop/bundle/bootstrap), `NGINX_BIN`.

#![forbid(unsafe_code)]

mod common;
mod relay;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use isolate::{Isolator, IsolatorConfig, Limits, PreparedSandbox, Sandbox, SandboxSpec, StdioSpec};

use common::{
    Stats, env_count, fnlet_binary, instance_pids, load_average, ms, ratio, remove_cgroup_dirs,
    run_quiet, task_stats,
};

/// What every client sends (the function URL turns it into a payload 2.0 event's body).
const PAYLOAD: &[u8] = br#"{"bench":"lambda-noop","n":1}"#;
/// What the no-op answers, and so every contender must.
const ANSWER: &[u8] = b"{}";
/// The fixture's own manifest values, kept for every function of the bench.
const MEMORY_MB: u64 = 32;
const TIMEOUT_S: u64 = 5;
/// The agent's sandbox settings (its defaults, written out because the library mirrors them).
const TMP_MB: u64 = 64;
const PIDS: u64 = 256;
const RUNTIME_API_PORT: u16 = 9001;
/// Function logs rotate past this (the default is 1 MB): a phase's REPORT lines, which
/// [`Agent::print_stages`] reads, stay in one file.
const FN_LOG_MAX_KB: u64 = 64 * 1024;
/// The library contenders' uid (the agent hands out 200000 and up, one per function).
const LIB_UID: u32 = 200_900;

const FN_COLD: &str = "noop-cold";
const FN_WARM: &str = "noop-warm";

/// Set in the environment of this binary's second mode, the floor's HTTP server.
const ROLE_ENV: &str = "FNLET_BENCH_LAMBDA_ROLE";
const ROLE_HTTP_FLOOR: &str = "http-floor";
const ROLE_RELAY_FLOOR: &str = "relay-floor";
const ROLE_RELAY_EVENTED: &str = "relay-evented";
const ROLE_RELAY_HYPER: &str = "relay-hyper";
const ROLE_RELAY_HYPER_BOTH: &str = "relay-hyper-both";

// Contender names.
const COLD_FLOOR: &str = "floor: fork+exec, Runtime API here";
const COLD_LIB_PREPARED: &str = "isolate: prepared sandbox start";
const COLD_LIB_SPAWN: &str = "isolate: Isolator::spawn";
const COLD_FNLET: &str = "fnlet cold start (POST /fn, prepared)";
const WARM_FLOOR: &str = "floor: plain HTTP server, direct";
const WARM_NGINX: &str = "nginx -> floor server";
const WARM_RELAY: &str = "protocol floor: relay -> no-op";
const WARM_EVENTED: &str = "protocol floor on tokio";

/// The relays (`relay.rs`): (role, contender name, what it is). The first two always run; all
/// four with `FNLET_BENCH_RELAYS=all`.
const RELAYS: [(&str, &str, &str); 4] = [
    (
        ROLE_RELAY_FLOOR,
        WARM_RELAY,
        "a thread per caller, blocking I/O, only the Runtime API's exchange",
    ),
    (
        ROLE_RELAY_EVENTED,
        WARM_EVENTED,
        "the same exchange on one current-thread tokio runtime per CPU, each with its own listener \
         (one SO_REUSEPORT group) and its share of the runtimes",
    ),
    (
        ROLE_RELAY_HYPER,
        "relay on tokio, hyper to callers",
        "as on tokio, with hyper's HTTP/1 server on the callers' side",
    ),
    (
        ROLE_RELAY_HYPER_BOTH,
        "relay on tokio, hyper both sides",
        "as on tokio, with hyper's HTTP/1 server on both sides: each runtime's connection served \
         by hyper, its GET /next waiting on a channel, its answer back on a oneshot",
    ),
];

/// A relay of [`RELAYS`], started.
struct Relay {
    name: &'static str,
    server: FloorServer,
}
const WARM_FNLET: &str = "fnlet warm: POST /fn/noop-warm";
const WARM_INVOKE: &str = "fnlet warm: Invoke API";
const WARM_HEALTHZ: &str = "fnlet GET /healthz (no function)";

struct Settings {
    cold_runs: usize,
    cold_warmup: usize,
    runs: usize,
    warmup: usize,
    clients: usize,
    instances: Vec<usize>,
    seconds: usize,
    load_rounds: usize,
    max_requests: usize,
    profile_s: usize,
}

fn settings() -> Settings {
    Settings {
        cold_runs: env_count("FNLET_BENCH_COLD_RUNS", 200),
        cold_warmup: env_count("FNLET_BENCH_COLD_WARMUP", 10),
        runs: env_count("FNLET_BENCH_RUNS", 2000),
        warmup: env_count("FNLET_BENCH_WARMUP", 200),
        clients: env_count("FNLET_BENCH_CLIENTS", 32).max(1),
        instances: std::env::var("FNLET_BENCH_INSTANCES")
            .unwrap_or_else(|_| "4,8,16".into())
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("FNLET_BENCH_INSTANCES: {v:?} is not a number"))
            })
            .collect(),
        seconds: env_count("FNLET_BENCH_SECONDS", 6),
        load_rounds: env_count("FNLET_BENCH_LOAD_ROUNDS", 3).max(1),
        max_requests: env_count("FNLET_BENCH_MAX_REQUESTS", 500_000),
        profile_s: env_count("FNLET_BENCH_PROFILE", 0),
    }
}

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok(ROLE_HTTP_FLOOR) => http_floor_main(),
        Ok(ROLE_RELAY_FLOOR) => relay::main(|api| lambda_env(api, "noop-relay")),
        Ok(ROLE_RELAY_EVENTED) => relay::main_evented(|api| lambda_env(api, "noop-relay")),
        Ok(ROLE_RELAY_HYPER) => relay::main_hyper(|api| lambda_env(api, "noop-relay")),
        Ok(ROLE_RELAY_HYPER_BOTH) => relay::main_hyper_both(|api| lambda_env(api, "noop-relay")),
        _ => {}
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the Lambda benchmark runs `fnlet agent`, which creates namespaces and cgroups: run \
             it as root (benches/run.sh lambda)"
        );
        std::process::exit(1);
    }
    let set = settings();
    let pid = std::process::id();
    let fnlet = fnlet_binary();
    let bootstrap = noop_binary();
    let nginx_bin =
        std::env::var_os("NGINX_BIN").map_or_else(|| PathBuf::from("nginx"), PathBuf::from);
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-lambda-")
        .tempdir()
        .expect("creating a temporary directory");
    // The functions' uids must reach the bundles: every directory on the way is 0755.
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).expect("chmod 0755");

    let agent_root = format!("fnlet-bench-lambda-{pid}");
    let lib_root = format!("fnlet-bench-lambda-{pid}-lib");
    let mut cleanup = Cleanup {
        roots: vec![agent_root.clone(), lib_root.clone()],
    };

    common::print_machine("lambda");
    println!(
        "  fnlet: {}, tree: {}",
        command_line(&fnlet, &["--version"]),
        git_tree()
    );
    println!(
        "  no-op: {} ({} bytes, {})",
        bootstrap.display(),
        fs::metadata(&bootstrap).map_or(0, |m| m.len()),
        elf_linking(&bootstrap)
    );
    println!("  nginx: {}", command_line(&nginx_bin, &["-v"]));
    let busy = busy_compilers();
    println!(
        "  other work at the start: {}",
        if busy.is_empty() {
            "no cargo/rustc running".to_string()
        } else {
            busy
        }
    );

    // ---- the functions, the agent, the floor server and nginx ----
    let bundles_dir = work.path().join("bundles");
    fs::create_dir(&bundles_dir).expect("creating the bundles directory");
    let mut functions = vec![
        FunctionDef {
            name: FN_COLD.into(),
            max_concurrency: 1,
            min_instances: 0,
            keep_alive_s: 0,
        },
        FunctionDef {
            name: FN_WARM.into(),
            max_concurrency: 1,
            min_instances: 1,
            keep_alive_s: 3600,
        },
    ];
    for &n in &set.instances {
        functions.push(FunctionDef {
            name: format!("noop-n{n}"),
            max_concurrency: n,
            min_instances: n,
            keep_alive_s: 3600,
        });
    }
    let mut agent = Agent::start(&fnlet, &work.path().join("agent"), &agent_root);
    agent.wait_ready();
    for f in &functions {
        let b = make_bundle(&bundles_dir, f, &bootstrap);
        if let Err(e) = run_quiet(
            Command::new(&fnlet)
                .arg("deploy")
                .arg(&b)
                .args(["--endpoint", &agent.base, "--state-dir"])
                .arg(&agent.state_dir),
        ) {
            agent.fail(&format!("fnlet deploy {}: {e}", f.name));
        }
    }
    println!(
        "  agent: pid {}, {}, TOKIO_WORKER_THREADS={} (config: {})",
        agent.pid,
        agent.base,
        std::env::var("FNLET_BENCH_AGENT_WORKERS")
            .unwrap_or_else(|_| "unset (one per core)".into()),
        agent.config_text.trim().replace('\n', "; ")
    );
    for f in &functions {
        println!(
            "  function {}: {}",
            f.name,
            f.manifest().trim().replace('\n', "; ")
        );
    }
    let mut ctl = Client::new(agent.addr);
    for f in &functions {
        let want = f.min_instances as u64;
        let r = wait_for(Duration::from_secs(30), || {
            let d = agent.describe(&mut ctl, &f.name)?;
            Ok(d["prepared"].as_bool() == Some(true)
                && d["instances"]["idle"].as_u64() >= Some(want))
        });
        if let Err(e) = r {
            agent.fail(&format!(
                "{}: not ready ({want} warm instances and a prepared sandbox): {e}",
                f.name
            ));
        }
    }

    let floor = FloorServer::start().unwrap_or_else(|e| panic!("the floor's HTTP server: {e}"));
    let nginx =
        Nginx::start(&nginx_bin, &work.path().join("nginx"), floor.port).unwrap_or_else(|e| {
            eprintln!("nginx did not start: {e}");
            panic!("nginx did not start: {e}");
        });
    println!(
        "  floor HTTP server: pid {}, 127.0.0.1:{} (this binary, {ROLE_ENV}={ROLE_HTTP_FLOOR}: a thread per connection, std only, answers {{}})",
        floor.child.id(),
        floor.port
    );
    println!(
        "  nginx: pid {}, 127.0.0.1:{}, workers {:?}; config: {}",
        nginx.child.id(),
        nginx.port,
        nginx.workers(),
        nginx.conf_summary()
    );
    let relay_n = set.instances.iter().copied().max().unwrap_or(1);
    let all_relays = std::env::var("FNLET_BENCH_RELAYS").as_deref() == Ok("all");
    let relays: Vec<Relay> = RELAYS
        .iter()
        .take(if all_relays { RELAYS.len() } else { 2 })
        .map(|&(role, name, what)| {
            let server = FloorServer::start_relay(role, &bootstrap, relay_n)
                .unwrap_or_else(|e| panic!("{name} ({role}): {e}"));
            println!(
                "  {name}: pid {}, 127.0.0.1:{} (this binary, {ROLE_ENV}={role}: {what}) in front of {relay_n} \
                 no-op runtimes as plain processes, pids {:?}",
                server.child.id(),
                server.port,
                server.behind
            );
            Relay { name, server }
        })
        .collect();
    let _ = std::io::stdout().flush();

    let isolator = Isolator::new(IsolatorConfig {
        cgroup_root: lib_root.clone(),
        ..Default::default()
    })
    .expect("Isolator::new (the library contenders)");

    // ---- 1. cold start ----
    let log_at = agent.log_marks(FN_COLD);
    cold_phase(&set, &agent, &bootstrap, &isolator);
    agent.print_stages(log_at, FN_COLD, true);

    // ---- 2. warm, one client ----
    let log_at = agent.log_marks(FN_WARM);
    warm_phase(&set, &agent, &floor, &nginx, &relays);
    agent.print_stages(log_at, FN_WARM, false);
    warm_costs(&agent, &floor, &nginx, &relays, &agent_root, set.runs);

    // ---- 3. throughput ----
    throughput_phase(&set, &agent, &floor, &nginx, &relays, &agent_root);

    if set.profile_s > 0 {
        let clients = env_count("FNLET_BENCH_PROFILE_CLIENTS", 1);
        let instances = set.instances.iter().copied().max().unwrap_or(1);
        profile(&agent, set.profile_s, work.path(), clients, instances);
    }

    // ---- shutdown ----
    println!();
    let errors_in_log = agent.count_log("ERROR") + agent.count_log(" WARN ");
    println!("agent log: {errors_in_log} WARN/ERROR lines");
    for l in agent
        .log_lines(|l| l.contains("ERROR") || l.contains(" WARN "))
        .iter()
        .take(5)
    {
        println!("  {l}");
    }
    drop(isolator);
    let _ = Isolator::new(IsolatorConfig {
        cgroup_root: lib_root.clone(),
        ..Default::default()
    })
    .map(|iso| iso.remove_root());
    match nginx.stop() {
        Ok(s) => println!("nginx: stopped by SIGQUIT ({s})"),
        Err(e) => println!("nginx: {e}"),
    }
    floor.stop();
    for r in relays {
        r.server.stop();
    }
    match agent.stop() {
        Ok((took, status)) => println!(
            "agent: stopped by SIGTERM in {:.0} ms ({status})",
            took.as_secs_f64() * 1e3
        ),
        Err(e) => println!("agent: did not stop cleanly: {e}"),
    }
    let left = common::cgroup_dirs_with_prefix(&agent_root);
    if left.is_empty() {
        println!("cgroups left under /sys/fs/cgroup/*/{agent_root}*: none");
    } else {
        println!("cgroups LEFT (removing them now):");
        for d in &left {
            println!("  {}", d.display());
        }
    }
    println!("load average at the end: {}", load_average());
    drop(agent);
    cleanup.finish();
    drop(work);
}

// ---------------------------------------------------------------------------------------------
// contenders that time themselves, round by round

/// One run: how long the part that counts took (the contender knows where it starts and ends).
type TimedFn<'a> = Box<dyn FnMut(usize) -> Result<Duration, String> + 'a>;
type AfterFn<'a> = Box<dyn FnMut() -> Result<(), String> + 'a>;

struct Timed<'a> {
    name: &'static str,
    what: String,
    run: TimedFn<'a>,
    /// Untimed, right after each run: reap what it left, prepare the next.
    after: Option<AfterFn<'a>>,
    samples: Vec<Duration>,
}

impl<'a> Timed<'a> {
    fn new(name: &'static str, what: impl Into<String>, run: TimedFn<'a>) -> Self {
        Timed {
            name,
            what: what.into(),
            run,
            after: None,
            samples: Vec::new(),
        }
    }

    fn after(mut self, f: AfterFn<'a>) -> Self {
        self.after = Some(f);
        self
    }

    fn once(&mut self, i: usize) -> Result<Duration, String> {
        let d = (self.run)(i)?;
        if let Some(a) = &mut self.after {
            a()?;
        }
        Ok(d)
    }
}

/// `warmup` untimed rounds, then `runs` timed ones; each round runs every contender once, in a
/// new seeded order ([`common::Rounds`]). Panics when a run fails.
fn interleave(cs: &mut [Timed], warmup: usize, runs: usize) {
    let mut rounds = common::Rounds::new(cs.len());
    for i in 0..warmup + runs {
        for &k in rounds.next_order() {
            let c = &mut cs[k];
            let d = c
                .once(i)
                .unwrap_or_else(|e| panic!("{} failed on run {i}: {e}", c.name));
            if i >= warmup {
                c.samples.push(d);
            }
        }
    }
}

fn print_latency_table(cs: &[Timed], refs: &[(&str, &str)]) {
    print!(
        "| {:<38} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} |",
        "contender", "runs", "median (ms)", "p99 (ms)", "min (ms)", "max (ms)"
    );
    for (label, _) in refs {
        print!(" {label:>9} |");
    }
    println!();
    print!(
        "|{:-<40}|{:->6}|{:->13}|{:->11}|{:->11}|{:->11}|",
        "", "", "", "", "", ""
    );
    for _ in refs {
        print!("{:->11}|", "");
    }
    println!();
    let median = |name: &str| {
        cs.iter()
            .find(|c| c.name == name)
            .map(|c| Stats::of(&c.samples).median)
    };
    for c in cs {
        let s = Stats::of(&c.samples);
        print!(
            "| {:<38} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} |",
            c.name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max)
        );
        for (_, r) in refs {
            print!(" {:>9} |", ratio(s.median, median(r)));
        }
        println!();
    }
    println!("(ratios are of medians)");
    for c in cs {
        println!("  {}: {}", c.name, c.what);
    }
}

/// Each difference as the difference of the medians and as the round-by-round median of the
/// paired difference (sample i of every contender comes from round i).
fn print_differences(cs: &[Timed], pairs: &[(&str, &str, &str)]) {
    let get = |n: &str| cs.iter().find(|c| c.name == n);
    println!();
    println!(
        "| {:<58} | {:>15} | {:>18} |",
        "difference", "of medians (ms)", "paired median (ms)"
    );
    println!("|{:-<60}|{:->17}|{:->20}|", "", "", "");
    for (label, a, b) in pairs {
        let (Some(a), Some(b)) = (get(a), get(b)) else {
            continue;
        };
        let mut d: Vec<f64> = a
            .samples
            .iter()
            .zip(&b.samples)
            .map(|(x, y)| x.as_secs_f64() - y.as_secs_f64())
            .collect();
        d.sort_by(f64::total_cmp);
        let paired = if d.is_empty() {
            0.0
        } else if d.len() % 2 == 1 {
            d[d.len() / 2]
        } else {
            (d[d.len() / 2 - 1] + d[d.len() / 2]) / 2.0
        };
        let of_medians =
            Stats::of(&a.samples).median.as_secs_f64() - Stats::of(&b.samples).median.as_secs_f64();
        println!(
            "| {label:<58} | {:>15.3} | {:>18.3} |",
            of_medians * 1e3,
            paired * 1e3
        );
    }
}

fn goal(label: &str, a: Option<Duration>, b: Option<Duration>, max_ratio: f64, strict: bool) {
    if let (Some(a), Some(b)) = (a, b) {
        let r = a.as_secs_f64() / b.as_secs_f64();
        let met = if strict {
            r < max_ratio
        } else {
            r <= max_ratio
        };
        println!(
            "GOAL {label}: {} vs {} ms = {r:.2}x: {}",
            ms(a),
            ms(b),
            if met { "met" } else { "NOT met" }
        );
    }
}

fn median_of(cs: &[Timed], name: &str) -> Option<Duration> {
    cs.iter()
        .find(|c| c.name == name)
        .map(|c| Stats::of(&c.samples).median)
}

// ---------------------------------------------------------------------------------------------
// 1. cold start

fn cold_phase(set: &Settings, agent: &Agent, bootstrap: &Path, isolator: &Isolator) {
    let event = v2_event();
    let bundle = bootstrap
        .parent()
        .expect("the bootstrap lives in its bundle")
        .to_path_buf();
    // The floor's Runtime API: a listener in this process, one invocation per spawn.
    let api = TcpListener::bind("127.0.0.1:0").expect("binding the floor's Runtime API");
    let api_addr = api.local_addr().expect("its address");
    let env = lambda_env(&format!("127.0.0.1:{}", api_addr.port()), "noop-floor");
    let spec = lib_spec(&bundle);
    let prepare = || {
        isolator
            .prepare(&spec)
            .map_err(|e| format!("Isolator::prepare: {e}"))
    };
    let prepared: RefCell<Option<PreparedSandbox>> =
        RefCell::new(Some(prepare().expect("Isolator::prepare")));
    let running: RefCell<Option<Sandbox>> = RefCell::new(None);
    let spawned: RefCell<Option<Sandbox>> = RefCell::new(None);
    let reap = |cell: &RefCell<Option<Sandbox>>| -> Result<(), String> {
        if let Some(mut sb) = cell.borrow_mut().take() {
            let o = sb
                .wait_blocking()
                .map_err(|e| format!("waiting for the sandbox: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "the no-op in the sandbox ended with {:?}",
                    o.status
                ));
            }
        }
        Ok(())
    };
    let mut call = Client::new(agent.addr);
    let mut ctl = Client::new(agent.addr);
    let cold_req = request_bytes(
        "POST",
        &format!("/fn/{FN_COLD}"),
        &agent.host(),
        &[],
        PAYLOAD,
    );
    let ready = |ctl: &mut Client| -> Result<(), String> {
        wait_for(Duration::from_secs(10), || {
            let d = agent.describe(ctl, FN_COLD)?;
            let leaves = cgroup_leaves(&agent.cgroup_root, &format!("{FN_COLD}-"));
            Ok(d["prepared"].as_bool() == Some(true)
                && d["instances"]["alive"].as_u64() == Some(0)
                && d["running"].as_u64() == Some(0)
                && leaves.is_none_or(|n| n == 1))
        })
        .map(drop)
        .map_err(|e| {
            format!("waiting for {FN_COLD} to have no instance and a prepared sandbox: {e}")
        })
    };
    ready(&mut ctl).expect("the cold function's first state");

    let mut cs: Vec<Timed> = vec![
        Timed::new(
            COLD_FLOOR,
            format!(
                "std::process::Command spawn of the same bootstrap (env cleared, the agent's Lambda \
                 variables, AWS_LAMBDA_RUNTIME_API={api_addr}), timed until its response arrives \
                 at a minimal Runtime API in this process (one thread: accept, /next hands out a \
                 {}-byte payload 2.0 event, read the POST .../response); then close, wait (untimed)",
                event.len()
            ),
            Box::new(|_| {
                let t0 = Instant::now();
                let mut child = Command::new(bootstrap)
                    .env_clear()
                    .envs(&env)
                    .current_dir(&bundle)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("spawning {}: {e}", bootstrap.display()))?;
                let r = serve_invocation(&api, &event, Duration::from_secs(5));
                let arrived = match r {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(e);
                    }
                };
                let st = child.wait().map_err(|e| e.to_string())?;
                if !st.success() {
                    return Err(format!("the no-op exited {st}"));
                }
                Ok(arrived - t0)
            }),
        ),
        Timed::new(
            COLD_LIB_PREPARED,
            "PreparedSandbox::start of a sandbox Isolator::prepare built (untimed) after the \
             previous run, the agent's Lambda spec (32 MB, 1 cpu, 256 pids, 64M /tmp, loopback \
             listener on 9001, stdin null, stdout/stderr piped), timed until the response arrives \
             at the same minimal Runtime API served on the sandbox's listener",
            Box::new(|_| {
                let p = prepared.borrow_mut().take().ok_or("no prepared sandbox")?;
                let t0 = Instant::now();
                let mut sb = p.start(None).map_err(|e| format!("start: {e}"))?;
                let l = sb.take_listener().ok_or("the sandbox has no listener")?;
                let arrived = serve_invocation(&l, &event, Duration::from_secs(5));
                *running.borrow_mut() = Some(sb);
                Ok(arrived? - t0)
            }),
        )
        .after(Box::new(|| {
            reap(&running)?;
            *prepared.borrow_mut() = Some(prepare()?);
            Ok(())
        })),
        Timed::new(
            COLD_LIB_SPAWN,
            "Isolator::spawn of the same spec, timed the same way (the whole sandbox setup on \
             the path)",
            Box::new(|_| {
                let t0 = Instant::now();
                let mut sb = isolator.spawn(&spec).map_err(|e| format!("spawn: {e}"))?;
                let l = sb.take_listener().ok_or("the sandbox has no listener")?;
                let arrived = serve_invocation(&l, &event, Duration::from_secs(5));
                *spawned.borrow_mut() = Some(sb);
                Ok(arrived? - t0)
            }),
        )
        .after(Box::new(|| reap(&spawned))),
        Timed::new(
            COLD_FNLET,
            format!(
                "POST /fn/{FN_COLD} on a kept-alive connection, request to whole answer (200, {{}}); \
                 keep_alive_s = 0, so after each call (untimed) the bench waits until describe says \
                 prepared = true, instances.alive = 0, running = 0, and the reaped instance's \
                 cgroup is gone (polling every 5 ms on another connection)"
            ),
            Box::new(|_| {
                let t0 = Instant::now();
                let (st, body) = call.call(&cold_req)?;
                let d = t0.elapsed();
                check_answer(st, &body)?;
                Ok(d)
            }),
        )
        .after(Box::new(|| ready(&mut ctl))),
    ];
    println!(
        "\n== 1. cold start, prepared sandbox ready: {} interleaved rounds after {} warm-up rounds ==\n",
        set.cold_runs, set.cold_warmup
    );
    let started = Instant::now();
    interleave(&mut cs, set.cold_warmup, set.cold_runs);
    let secs = started.elapsed().as_secs_f64();
    print_latency_table(
        &cs,
        &[("x floor", COLD_FLOOR), ("x prepared", COLD_LIB_PREPARED)],
    );
    println!(
        "(measured in {secs:.1} s, load average now {})",
        load_average()
    );
    print_differences(
        &cs,
        &[
            (
                "fnlet's own: fnlet cold - isolate prepared start",
                COLD_FNLET,
                COLD_LIB_PREPARED,
            ),
            (
                "sandbox, prepared: isolate prepared start - floor",
                COLD_LIB_PREPARED,
                COLD_FLOOR,
            ),
            (
                "building it ahead saves: spawn - prepared start",
                COLD_LIB_SPAWN,
                COLD_LIB_PREPARED,
            ),
            ("fnlet cold - floor", COLD_FNLET, COLD_FLOOR),
        ],
    );
    println!();
    goal(
        "cold start within 2x of fork+exec (median)",
        median_of(&cs, COLD_FNLET),
        median_of(&cs, COLD_FLOOR),
        2.0,
        false,
    );
    drop(cs);
    drop(prepared.take());
}

/// One invocation of the minimal Runtime API: accept the runtime's connection, answer its
/// `/next` with `event`, read its `/response`; returns when that arrived. Then answers 202 and
/// closes the connection, which ends the no-op (status 0).
fn serve_invocation(l: &TcpListener, event: &[u8], limit: Duration) -> Result<Instant, String> {
    let mut fds = [nix::poll::PollFd::new(
        l.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut fds, ms) {
        Ok(0) => return Err(format!("no connection to the Runtime API within {limit:?}")),
        Ok(_) => {}
        Err(e) => return Err(format!("poll: {e}")),
    }
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(4096);
    let next = read_request(&mut s, &mut buf)?;
    if next.method != "GET" || next.path != "/2018-06-01/runtime/invocation/next" {
        return Err(format!(
            "expected GET /next, got {} {}",
            next.method, next.path
        ));
    }
    let id = "8f5c2c34-6d3a-4c5e-9a7e-3c1d2b4a5f60";
    let deadline_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        + u128::from(TIMEOUT_S) * 1000;
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nlambda-runtime-aws-request-id: {id}\r\n\
         lambda-runtime-deadline-ms: {deadline_ms}\r\n\
         lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:000000000000:function:noop\r\n\
         lambda-runtime-trace-id: Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0\r\n\
         content-length: {}\r\n\r\n",
        event.len()
    )
    .into_bytes();
    out.extend_from_slice(event);
    s.write_all(&out)
        .map_err(|e| format!("writing the event: {e}"))?;
    let resp = read_request(&mut s, &mut buf)?;
    let arrived = Instant::now();
    if resp.method != "POST" || resp.path != format!("/2018-06-01/runtime/invocation/{id}/response")
    {
        return Err(format!(
            "expected POST .../response, got {} {}",
            resp.method, resp.path
        ));
    }
    if resp.body != ANSWER {
        return Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&resp.body)
        ));
    }
    let _ = s.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"OK\"}");
    Ok(arrived)
}

/// A payload format 2.0 event of the shape the function URL builds from the bench's request.
fn v2_event() -> Vec<u8> {
    serde_json::json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {
            "content-length": PAYLOAD.len().to_string(),
            "content-type": "application/json",
            "host": "127.0.0.1:8740",
            "user-agent": "fnlet-bench",
        },
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "noop",
            "domainName": "127.0.0.1:8740",
            "domainPrefix": "127",
            "http": {
                "method": "POST",
                "path": "/",
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "fnlet-bench",
            },
            "requestId": "8f5c2c34-6d3a-4c5e-9a7e-3c1d2b4a5f60",
            "routeKey": "$default",
            "stage": "$default",
            "time": "01/Jan/2026:00:00:00 +0000",
            "timeEpoch": 1_767_225_600_000u64,
        },
        "body": String::from_utf8_lossy(PAYLOAD),
        "isBase64Encoded": false,
    })
    .to_string()
    .into_bytes()
}

/// The environment the agent gives a Lambda instance (pool::lambda_env), for the floor.
fn lambda_env(api: &str, name: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "/tmp"),
        ("LANG", "en_US.UTF-8"),
        ("TZ", ":UTC"),
        ("_HANDLER", "bootstrap"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("LAMBDA_RUNTIME_DIR", "/var/task"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "32"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("FNLET_FUNCTION_VERSION", "1"),
        ("FNLET_MEMORY_MB", "32"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("AWS_LAMBDA_RUNTIME_API".into(), api.into());
    env.insert("AWS_LAMBDA_FUNCTION_NAME".into(), name.into());
    env.insert("FNLET_FUNCTION_NAME".into(), name.into());
    env.insert(
        "AWS_LAMBDA_LOG_GROUP_NAME".into(),
        format!("/aws/lambda/{name}"),
    );
    env.insert(
        "AWS_LAMBDA_LOG_STREAM_NAME".into(),
        "2026/01/01/[1]fnlet".into(),
    );
    env
}

/// The agent's sandbox for a Lambda-mode function of the fixture (pool::ActiveFunction::new).
fn lib_spec(bundle: &Path) -> SandboxSpec {
    let mut spec = SandboxSpec {
        name: "noop-lib".into(),
        program: format!("{}/bootstrap", isolate::TASK_ROOT),
        bundle: Some(bundle.to_path_buf()),
        tmp_size_bytes: TMP_MB << 20,
        limits: Limits {
            memory_bytes: Some(MEMORY_MB << 20),
            cpus: Some(1.0),
            pids: Some(PIDS),
            nofile: 1024,
        },
        uid: LIB_UID,
        gid: LIB_UID,
        stdio: StdioSpec {
            stdin: isolate::Stdio::Null,
            ..StdioSpec::piped()
        },
        loopback_listener: Some(RUNTIME_API_PORT),
        ..Default::default()
    };
    spec.env = lambda_env(&format!("127.0.0.1:{RUNTIME_API_PORT}"), "noop-lib");
    spec
}

/// How many cgroup leaves named `prefix...` the agent has (in the pids hierarchy on v1, the
/// unified tree on v2); None when neither can be read.
fn cgroup_leaves(root: &str, prefix: &str) -> Option<usize> {
    for base in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let dir = Path::new(base).join(root);
        if let Ok(entries) = fs::read_dir(&dir) {
            return Some(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .count(),
            );
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// 2. warm, one client

fn warm_phase(set: &Settings, agent: &Agent, floor: &FloorServer, nginx: &Nginx, relays: &[Relay]) {
    let floor_addr = SocketAddr::from(([127, 0, 0, 1], floor.port));
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], nginx.port));
    let floor_req = request_bytes("POST", "/", &floor_addr.to_string(), &[], PAYLOAD);
    let nginx_req = request_bytes("POST", "/", &nginx_addr.to_string(), &[], PAYLOAD);
    let url_req = request_bytes(
        "POST",
        &format!("/fn/{FN_WARM}"),
        &agent.host(),
        &[],
        PAYLOAD,
    );
    let invoke_req = request_bytes(
        "POST",
        &format!("/2015-03-31/functions/{FN_WARM}/invocations"),
        &agent.host(),
        &[],
        PAYLOAD,
    );
    let healthz_req = request_bytes("GET", "/healthz", &agent.host(), &[], b"");
    let post = |addr: SocketAddr, req: Vec<u8>| -> TimedFn {
        let mut c = Client::new(addr);
        Box::new(move |_| {
            let t0 = Instant::now();
            let (st, body) = c.call(&req)?;
            let d = t0.elapsed();
            check_answer(st, &body)?;
            Ok(d)
        })
    };
    let mut hc = Client::new(agent.addr);
    let mut cs: Vec<Timed> = vec![
        Timed::new(
            WARM_FLOOR,
            "POST / to the floor server, one kept-alive connection",
            post(floor_addr, floor_req),
        ),
        Timed::new(
            WARM_NGINX,
            "the same POST / to nginx, which proxies it to the floor server (kept-alive upstream)",
            post(nginx_addr, nginx_req),
        ),
        Timed::new(
            WARM_FNLET,
            format!(
                "POST /fn/{FN_WARM} (function URL: payload 2.0 event; the answer {{}} has no statusCode so it is returned as is with 200), one warm instance (min_instances = 1, max_concurrency = 1)"
            ),
            post(agent.addr, url_req),
        ),
        Timed::new(
            WARM_INVOKE,
            format!("POST /2015-03-31/functions/{FN_WARM}/invocations, the same instance"),
            post(agent.addr, invoke_req),
        ),
        Timed::new(
            WARM_HEALTHZ,
            "GET /healthz of the agent: its HTTP round trip with no function",
            Box::new(move |_| {
                let t0 = Instant::now();
                let (st, _) = hc.call(&healthz_req)?;
                let d = t0.elapsed();
                if st != 200 {
                    return Err(format!("HTTP {st}"));
                }
                Ok(d)
            }),
        ),
    ];
    // The relays after nginx, in `RELAYS`' order.
    for (i, r) in relays.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], r.server.port));
        let req = request_bytes("POST", "/", &addr.to_string(), &[], PAYLOAD);
        cs.insert(
            2 + i,
            Timed::new(
                r.name,
                format!(
                    "the same POST / to {}: its body as the event to a no-op runtime (a plain process), the runtime's answer back",
                    r.name
                ),
                post(addr, req),
            ),
        );
    }
    for c in &mut cs {
        if let Err(e) = c.once(usize::MAX) {
            panic!("{}: trial call failed: {e}", c.name);
        }
    }
    println!(
        "\n== 2. warm invocation, one client, keep-alive: {} interleaved rounds after {} warm-up rounds ==\n",
        set.runs, set.warmup
    );
    let started = Instant::now();
    interleave(&mut cs, set.warmup, set.runs);
    let secs = started.elapsed().as_secs_f64();
    print_latency_table(
        &cs,
        &[
            ("x floor", WARM_FLOOR),
            ("x nginx", WARM_NGINX),
            ("x protocol", WARM_RELAY),
        ],
    );
    println!(
        "(measured in {secs:.1} s, load average now {})",
        load_average()
    );
    print_differences(
        &cs,
        &[
            ("nginx's proxy hop: nginx - floor", WARM_NGINX, WARM_FLOOR),
            ("fnlet's own: fnlet /fn - floor", WARM_FNLET, WARM_FLOOR),
            ("fnlet /fn - nginx", WARM_FNLET, WARM_NGINX),
            ("the protocol's own: relay - nginx", WARM_RELAY, WARM_NGINX),
            (
                "fnlet's over the protocol: fnlet /fn - relay",
                WARM_FNLET,
                WARM_RELAY,
            ),
            (
                "an event loop's own: relay on tokio - relay",
                WARM_EVENTED,
                WARM_RELAY,
            ),
            ("fnlet over the relay on tokio", WARM_FNLET, WARM_EVENTED),
            (
                "hyper to callers: its relay - the relay on tokio",
                RELAYS[2].1,
                WARM_EVENTED,
            ),
            (
                "hyper on both sides: its relay - the relay on tokio",
                RELAYS[3].1,
                WARM_EVENTED,
            ),
            ("fnlet over hyper on both sides", WARM_FNLET, RELAYS[3].1),
            ("fnlet /fn - fnlet GET /healthz", WARM_FNLET, WARM_HEALTHZ),
            ("Invoke API - function URL", WARM_INVOKE, WARM_FNLET),
        ],
    );
    println!();
    goal(
        "warm /fn faster than nginx's proxy path (median)",
        median_of(&cs, WARM_FNLET),
        median_of(&cs, WARM_NGINX),
        1.0,
        true,
    );
    goal(
        "the protocol floor (relay) at or below nginx's proxy path (median): can any agent meet the goal?",
        median_of(&cs, WARM_RELAY),
        median_of(&cs, WARM_NGINX),
        1.0,
        false,
    );
    goal(
        "warm /fn within 1.5x of the floor (median)",
        median_of(&cs, WARM_FNLET),
        median_of(&cs, WARM_FLOOR),
        1.5,
        false,
    );
}

fn check_answer(status: u16, body: &[u8]) -> Result<(), String> {
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(body)));
    }
    if body != ANSWER {
        return Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(body)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. throughput

struct Target {
    name: String,
    instances: Option<usize>,
    addr: SocketAddr,
    req: Arc<Vec<u8>>,
    /// The processes serving it, for CPU per request.
    pids: Vec<u32>,
    /// The cgroup tree of its sandboxes (cpuacct.usage, ns), for fnlet.
    cpuacct: Option<PathBuf>,
}

#[derive(Default)]
struct Slice {
    samples: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    wall: Duration,
}

impl Slice {
    fn merge(&mut self, o: Slice) {
        self.samples.extend(o.samples);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

#[derive(Default)]
struct Row {
    samples: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    wall: Duration,
    server_ticks: u64,
    server_cs: u64,
    sandbox_ns: u64,
    client_ticks: u64,
    host_busy: u64,
    host_total: u64,
}

impl Row {
    fn rps(&self) -> f64 {
        if self.wall.is_zero() {
            0.0
        } else {
            self.samples.len() as f64 / self.wall.as_secs_f64()
        }
    }
}

fn throughput_phase(
    set: &Settings,
    agent: &Agent,
    floor: &FloorServer,
    nginx: &Nginx,
    relays: &[Relay],
    agent_root: &str,
) {
    let floor_addr = SocketAddr::from(([127, 0, 0, 1], floor.port));
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], nginx.port));
    let mut nginx_pids = vec![nginx.child.id()];
    nginx_pids.extend(nginx.workers());
    nginx_pids.push(floor.child.id());
    let cpuacct = [
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(|b| Path::new(b).join(agent_root))
    .find(|p| p.join("cpuacct.usage").exists() || p.join("cpu.stat").exists());
    let mut targets = vec![
        Target {
            name: "floor: plain HTTP server".into(),
            instances: None,
            addr: floor_addr,
            req: Arc::new(request_bytes(
                "POST",
                "/",
                &floor_addr.to_string(),
                &[],
                PAYLOAD,
            )),
            pids: vec![floor.child.id()],
            cpuacct: None,
        },
        Target {
            name: "nginx -> floor server".into(),
            instances: None,
            addr: nginx_addr,
            req: Arc::new(request_bytes(
                "POST",
                "/",
                &nginx_addr.to_string(),
                &[],
                PAYLOAD,
            )),
            pids: nginx_pids,
            cpuacct: None,
        },
    ];
    for r in relays {
        let relay = &r.server;
        let addr = SocketAddr::from(([127, 0, 0, 1], relay.port));
        targets.push(Target {
            name: r.name.into(),
            instances: Some(relay.behind.len()),
            addr,
            req: Arc::new(request_bytes("POST", "/", &addr.to_string(), &[], PAYLOAD)),
            pids: std::iter::once(relay.child.id())
                .chain(relay.behind.iter().copied())
                .collect(),
            cpuacct: None,
        });
    }
    // fnlet on `noop-n{n}` through `path`.
    let fnlet = |label: String, n: usize, path: String| Target {
        name: label,
        instances: Some(n),
        addr: agent.addr,
        req: Arc::new(request_bytes("POST", &path, &agent.host(), &[], PAYLOAD)),
        pids: vec![agent.pid],
        cpuacct: cpuacct.clone(),
    };
    for &n in &set.instances {
        targets.push(fnlet(
            format!("fnlet /fn/noop-n{n}"),
            n,
            format!("/fn/noop-n{n}"),
        ));
    }
    // The Invoke API beside the function URL, on the largest instance count: the goal holds
    // for both.
    if let Some(&n) = set.instances.iter().max() {
        targets.push(fnlet(
            format!("fnlet Invoke API noop-n{n}"),
            n,
            format!("/2015-03-31/functions/noop-n{n}/invocations"),
        ));
    }
    let slice = Duration::from_secs_f64(set.seconds as f64 / set.load_rounds as f64);
    println!(
        "\n== 3. throughput: {} concurrent clients, {} s per contender ({} interleaved rounds of {:.1} s) ==\n",
        set.clients,
        set.seconds,
        set.load_rounds,
        slice.as_secs_f64()
    );
    println!(
        "(on this machine's {} cores the load generator, the servers and the instances share the CPU: \
         the client is one thread (a current-thread tokio runtime, one task and one kept-alive \
         connection per client); see its CPU per request below)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio");
    // A short untimed warm-up of each target at full concurrency.
    for t in &targets {
        let _ = run_load(
            &rt,
            t,
            set.clients,
            Duration::from_millis(300),
            set.max_requests,
        );
    }
    let mut rows: Vec<Row> = targets.iter().map(|_| Row::default()).collect();
    for round in 0..set.load_rounds {
        for k in 0..targets.len() {
            let ti = (round + k) % targets.len();
            let t = &targets[ti];
            let before = Snapshot::take(t);
            let s = run_load(&rt, t, set.clients, slice, set.max_requests);
            let after = Snapshot::take(t);
            let r = &mut rows[ti];
            r.samples.extend(s.samples);
            for (k, v) in s.errors {
                *r.errors.entry(k).or_default() += v;
            }
            r.wall += s.wall;
            r.server_ticks += after.server.saturating_sub(before.server);
            r.server_cs += after.server_cs.saturating_sub(before.server_cs);
            r.sandbox_ns += after.sandbox_ns.saturating_sub(before.sandbox_ns);
            r.client_ticks += after.client.saturating_sub(before.client);
            r.host_busy += after.host_busy.saturating_sub(before.host_busy);
            r.host_total += after.host_total.saturating_sub(before.host_total);
        }
    }
    let floor_rps = rows[0].rps();
    let nginx_rps = rows[1].rps();
    println!(
        "| {:<24} | {:>9} | {:>7} | {:>8} | {:>11} | {:>9} | {:>9} | {:>6} | {:>17} | {:>13} | {:>15} | {:>7} | {:>7} | {:<10} |",
        "contender",
        "instances",
        "ok",
        "req/s",
        "median (ms)",
        "p99 (ms)",
        "max (ms)",
        "host %",
        "server CPU/req ms",
        "server cs/req",
        "client CPU/req",
        "x floor",
        "x nginx",
        "errors"
    );
    println!(
        "|{:-<26}|{:->11}|{:->9}|{:->10}|{:->13}|{:->11}|{:->11}|{:->8}|{:->19}|{:->15}|{:->17}|{:->9}|{:->9}|{:-<12}|",
        "", "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for (t, r) in targets.iter().zip(&rows) {
        let s = Stats::of(&r.samples);
        let ok = r.samples.len().max(1) as f64;
        let server_ms = r.server_ticks as f64 * 10.0 / ok;
        let sandbox_ms = r.sandbox_ns as f64 / 1e6 / ok;
        let server = if t.cpuacct.is_some() {
            format!("{server_ms:.3} + {sandbox_ms:.3}")
        } else {
            format!("{server_ms:.3}")
        };
        let errors = if r.errors.is_empty() {
            "0".to_string()
        } else {
            r.errors
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {:<24} | {:>9} | {:>7} | {:>8.0} | {:>11} | {:>9} | {:>9} | {:>6.0} | {:>17} | {:>13.1} | {:>12.3} ms | {:>7} | {:>7} | {:<10} |",
            t.name,
            t.instances.map_or("-".into(), |n| n.to_string()),
            r.samples.len(),
            r.rps(),
            ms(s.median),
            ms(s.p99),
            ms(s.max),
            if r.host_total == 0 {
                0.0
            } else {
                100.0 * r.host_busy as f64 / r.host_total as f64
            },
            server,
            r.server_cs as f64 / ok,
            r.client_ticks as f64 * 10.0 / ok,
            if floor_rps > 0.0 {
                format!("{:.2}x", r.rps() / floor_rps)
            } else {
                "-".into()
            },
            if nginx_rps > 0.0 {
                format!("{:.2}x", r.rps() / nginx_rps)
            } else {
                "-".into()
            },
            errors
        );
    }
    println!(
        "(x floor, x nginx: requests/s over theirs; latency over the successful requests; host %: \
         busy share of all cores; server CPU: the serving processes' own CPU per request from \
         /proc/<pid>/stat in 10 ms ticks (floor: its server; nginx: master, workers and the floor \
         server behind it; protocol floor: the relay and its runtimes; fnlet: the agent + its \
         instances' cgroup tree, cpuacct); server cs: context switches of the serving processes' \
         threads (fnlet: the agent's only) per request; client: this process)"
    );
    // What any agent could reach through the Runtime API here, and fnlet's share of it.
    let relay_rps = rows[2].rps();
    if relay_rps > 0.0 && nginx_rps > 0.0 {
        println!(
            "protocol floor: {:.2}x nginx's requests/s with {} runtimes",
            relay_rps / nginx_rps,
            targets[2].instances.unwrap_or(0)
        );
        for (t, r) in targets.iter().zip(&rows).skip(3).take(relays.len() - 1) {
            println!(
                "{}: {:.2}x the blocking relay's",
                t.name,
                r.rps() / relay_rps
            );
        }
        for (t, r) in targets.iter().zip(&rows).skip(2 + relays.len()) {
            println!(
                "  {}: {:.2}x the protocol floor",
                t.name,
                r.rps() / relay_rps
            );
        }
    }
}

/// CPU counters at one moment, for one target.
struct Snapshot {
    server: u64,
    /// Context switches of the serving processes' threads.
    server_cs: u64,
    sandbox_ns: u64,
    client: u64,
    host_busy: u64,
    host_total: u64,
}

impl Snapshot {
    fn take(t: &Target) -> Snapshot {
        let server = t
            .pids
            .iter()
            .map(|p| proc_ticks(&format!("/proc/{p}/stat")))
            .sum();
        let sandbox_ns = t.cpuacct.as_ref().map_or(0, |p| {
            fs::read_to_string(p.join("cpuacct.usage"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .or_else(|| {
                    // cgroup v2: usage_usec in cpu.stat.
                    let stat = fs::read_to_string(p.join("cpu.stat")).ok()?;
                    stat.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|us| us * 1000)
                })
                .unwrap_or(0)
        });
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        Snapshot {
            server,
            server_cs: t.pids.iter().map(|&p| task_stats(p).1).sum(),
            sandbox_ns,
            client: proc_ticks("/proc/self/stat"),
            host_busy: total.saturating_sub(idle),
            host_total: total,
        }
    }
}

/// What one warm call costs each side, at one client: `calls` back-to-back requests per
/// contender, CPU time and context switches of the serving processes (schedstat, ns), of the
/// instance behind fnlet, and of this process.
fn warm_costs(
    agent: &Agent,
    floor: &FloorServer,
    nginx: &Nginx,
    relays: &[Relay],
    agent_root: &str,
    calls: usize,
) {
    let floor_addr = SocketAddr::from(([127, 0, 0, 1], floor.port));
    let nginx_addr = SocketAddr::from(([127, 0, 0, 1], nginx.port));
    let mut nginx_side = vec![nginx.child.id()];
    nginx_side.extend(nginx.workers());
    let instance = instance_pids(agent_root, FN_WARM);
    // (name, address, request, the serving processes, what serves behind them)
    type CostRow<'a> = (&'a str, SocketAddr, Vec<u8>, Vec<u32>, Vec<u32>);
    let mut rows: Vec<CostRow> = vec![
        (
            WARM_FLOOR,
            floor_addr,
            request_bytes("POST", "/", &floor_addr.to_string(), &[], PAYLOAD),
            vec![floor.child.id()],
            vec![],
        ),
        (
            WARM_NGINX,
            nginx_addr,
            request_bytes("POST", "/", &nginx_addr.to_string(), &[], PAYLOAD),
            nginx_side,
            vec![floor.child.id()],
        ),
        (
            WARM_FNLET,
            agent.addr,
            request_bytes(
                "POST",
                &format!("/fn/{FN_WARM}"),
                &agent.host(),
                &[],
                PAYLOAD,
            ),
            vec![agent.pid],
            instance.clone(),
        ),
    ];
    for (i, r) in relays.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], r.server.port));
        rows.insert(
            2 + i,
            (
                r.name,
                addr,
                request_bytes("POST", "/", &addr.to_string(), &[], PAYLOAD),
                vec![r.server.child.id()],
                r.server.behind.clone(),
            ),
        );
    }
    println!(
        "\nper warm call at one client ({calls} back-to-back calls each; CPU from schedstat, summed over \
         the threads alive; \"behind\": the floor server behind nginx, the no-op runtimes behind the relay, the no-op instance behind fnlet, pids {instance:?}):\n"
    );
    println!(
        "| {:<34} | {:>11} | {:>16} | {:>12} | {:>17} | {:>13} | {:>14} |",
        "contender",
        "median (ms)",
        "front CPU (us)",
        "front cs",
        "behind CPU (us)",
        "behind cs",
        "client CPU (us)"
    );
    println!(
        "|{:-<36}|{:->13}|{:->18}|{:->14}|{:->19}|{:->15}|{:->16}|",
        "", "", "", "", "", "", ""
    );
    for (name, addr, req, front, behind) in rows {
        let mut c = Client::new(addr);
        let sum = |pids: &[u32]| {
            pids.iter()
                .map(|&p| task_stats(p))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let me = std::process::id();
        let (f0, b0, c0) = (sum(&front), sum(&behind), task_stats(me));
        let mut lat = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            match c.call(&req) {
                Ok((st, body)) if check_answer(st, &body).is_ok() => lat.push(t.elapsed()),
                _ => {}
            }
        }
        let (f1, b1, c1) = (sum(&front), sum(&behind), task_stats(me));
        let n = lat.len().max(1) as f64;
        println!(
            "| {:<34} | {:>11} | {:>16.1} | {:>12.2} | {:>17.1} | {:>13.2} | {:>14.1} |",
            name,
            ms(Stats::of(&lat).median),
            (f1.0.saturating_sub(f0.0)) as f64 / 1e3 / n,
            (f1.1.saturating_sub(f0.1)) as f64 / n,
            (b1.0.saturating_sub(b0.0)) as f64 / 1e3 / n,
            (b1.1.saturating_sub(b0.1)) as f64 / n,
            (c1.0.saturating_sub(c0.0)) as f64 / 1e3 / n,
        );
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn proc_ticks(path: &str) -> u64 {
    let stat = fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat(5); `f` starts at field 4.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// `clients` tasks, each with its own kept-alive connection, one request after another until
/// the time is up or `cap` requests were sent in all.
fn run_load(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    clients: usize,
    time: Duration,
    cap: usize,
) -> Slice {
    rt.block_on(async {
        let start = Instant::now();
        let deadline = start + time;
        let issued = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (req, issued, addr) = (t.req.clone(), issued.clone(), t.addr);
            set.spawn(async move {
                let mut s = Slice::default();
                let mut conn = AsyncConn::default();
                while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < cap {
                    let t0 = Instant::now();
                    let r =
                        tokio::time::timeout(Duration::from_secs(15), conn.call(addr, &req)).await;
                    let key = match r {
                        Ok(Ok((200, body))) if body == ANSWER => {
                            s.samples.push(t0.elapsed());
                            continue;
                        }
                        Ok(Ok((200, _))) => "200 with a wrong answer".to_string(),
                        Ok(Ok((st, _))) => st.to_string(),
                        Ok(Err(e)) => e.split(':').next().unwrap_or("transport").to_string(),
                        Err(_) => "timeout".to_string(),
                    };
                    conn.reset();
                    *s.errors.entry(key).or_default() += 1;
                }
                s
            });
        }
        let mut all = Slice::default();
        while let Some(r) = set.join_next().await {
            all.merge(r.expect("a load client panicked"));
        }
        all.wall = start.elapsed();
        all
    })
}

// ---------------------------------------------------------------------------------------------
// the HTTP client: plain HTTP/1.1 over TCP, the same request bytes for every contender

fn request_bytes(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: fnlet-bench\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" {
        r.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    let mut v = r.into_bytes();
    v.extend_from_slice(body);
    v
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Parsed {
    len: usize,
    status: u16,
    body: Vec<u8>,
    close: bool,
}

/// A whole HTTP/1.1 response at the start of `buf`, or None when more bytes are needed.
fn parse_response(buf: &[u8]) -> Result<Option<Parsed>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 << 10 {
            return Err("protocol: response head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "protocol: head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("protocol: bad status line {status_line:?}"))?;
    let mut close = version == "HTTP/1.0";
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("protocol: bad content-length {v:?}"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let mut at = head_end + 4;
    if chunked {
        let mut body = Vec::new();
        loop {
            let Some(e) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            let line = std::str::from_utf8(&buf[at..at + e]).map_err(|_| "protocol: bad chunk")?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("protocol: bad chunk size {line:?}"))?;
            at += e + 2;
            if size == 0 {
                loop {
                    let Some(e) = find(&buf[at..], b"\r\n") else {
                        return Ok(None);
                    };
                    at += e + 2;
                    if e == 0 {
                        return Ok(Some(Parsed {
                            len: at,
                            status,
                            body,
                            close,
                        }));
                    }
                }
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
        }
    }
    let length = match length {
        Some(n) => n,
        None if status == 204 || status == 304 || status < 200 => 0,
        None => {
            return Err(
                "protocol: a response without content-length (read to close is not supported)"
                    .into(),
            );
        }
    };
    if buf.len() < at + length {
        return Ok(None);
    }
    let body = buf[at..at + length].to_vec();
    at += length;
    Ok(Some(Parsed {
        len: at,
        status,
        body,
        close,
    }))
}

/// One kept-alive connection, reopened when the server closes it.
struct Client {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            stream: None,
            buf: Vec::with_capacity(8192),
            chunk: vec![0; 16384],
        }
    }

    /// One request and its response: (status, body).
    fn call(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let r = self.try_call(req);
        if r.is_err() {
            self.stream = None;
            self.buf.clear();
        }
        r
    }

    fn try_call(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let s =
                TcpStream::connect(self.addr).map_err(|e| format!("connect: {} {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(15)))
                .map_err(|e| e.to_string())?;
            self.buf.clear();
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected just above");
        s.write_all(req).map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some(p) = parse_response(&self.buf)? {
                self.buf.drain(..p.len);
                if p.close {
                    self.stream = None;
                }
                return Ok((p.status, p.body));
            }
            let n = s.read(&mut self.chunk).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed: the server closed the connection".into());
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

/// The same client on tokio, for many at once on one thread.
#[derive(Default)]
struct AsyncConn {
    stream: Option<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl AsyncConn {
    fn reset(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    async fn call(&mut self, addr: SocketAddr, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.buf.clear();
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected just above");
        s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
        let mut chunk = [0u8; 4096];
        let p = loop {
            if let Some(p) = parse_response(&self.buf)? {
                break p;
            }
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed: the server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        self.buf.drain(..p.len);
        if p.close {
            self.stream = None;
        }
        Ok((p.status, p.body))
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    len: usize,
    close: bool,
}

/// A whole request (content-length bodies only) at the start of `buf`, or None for more bytes.
fn parse_request(buf: &[u8]) -> Result<Option<Request>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 << 10 {
            return Err("request head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut length = 0;
    let mut close = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse().map_err(|_| format!("bad content-length {v:?}"))?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked requests are not supported here".into());
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let at = head_end + 4;
    if buf.len() < at + length {
        return Ok(None);
    }
    Ok(Some(Request {
        method,
        path,
        body: buf[at..at + length].to_vec(),
        len: at + length,
        close,
    }))
}

/// Reads one request from a blocking stream (what is left in `buf` is the next one's start).
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Request, String> {
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(r) = parse_request(buf)? {
            buf.drain(..r.len);
            return Ok(r);
        }
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("reading a request: {e}"))?;
        if n == 0 {
            return Err("the runtime closed its connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// the floor's HTTP server (this binary's second mode) and nginx in front of it

const FLOOR_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// The no-op as a plain HTTP server: `{}` to every request, a thread per connection. Prints
/// its port; exits when its stdin closes (the bench went away).
fn http_floor_main() -> ! {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| {
        eprintln!("floor server: bind: {e}");
        std::process::exit(1)
    });
    let port = l.local_addr().map_or(0, |a| a.port());
    println!("{port}");
    let _ = std::io::stdout().flush();
    std::thread::spawn(|| {
        let mut b = [0u8; 64];
        while matches!(std::io::stdin().read(&mut b), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    for s in l.incoming().flatten() {
        std::thread::spawn(move || serve_floor_conn(s));
    }
    std::process::exit(0)
}

fn serve_floor_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 16384];
    loop {
        match parse_request(&buf) {
            Ok(Some(r)) => {
                buf.drain(..r.len);
                if s.write_all(FLOOR_RESPONSE).is_err() || r.close {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(_) => {
                let _ = s.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// This binary in one of its server roles: the plain HTTP floor, or the relay in front of
/// no-op runtimes (`behind`: their pids).
struct FloorServer {
    child: Child,
    port: u16,
    behind: Vec<u32>,
    stdin: Option<ChildStdin>,
}

impl FloorServer {
    fn start() -> Result<FloorServer, String> {
        Self::start_role(ROLE_HTTP_FLOOR, &[])
    }

    /// The Runtime API's floor: the relay (`ROLE_RELAY_FLOOR`, or on tokio
    /// `ROLE_RELAY_EVENTED`) with `instances` copies of `bootstrap` behind it.
    fn start_relay(role: &str, bootstrap: &Path, instances: usize) -> Result<FloorServer, String> {
        Self::start_role(
            role,
            &[
                (relay::INSTANCES_ENV, instances.to_string()),
                (relay::BOOTSTRAP_ENV, bootstrap.display().to_string()),
            ],
        )
    }

    /// Starts the role; it prints its port (and the relay its runtimes' pids) when ready.
    fn start_role(role: &str, env: &[(&str, String)]) -> Result<FloorServer, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .env(ROLE_ENV, role)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        let out = child.stdout.take().ok_or("no stdout")?;
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let mut words = line.split_whitespace();
        let port = words
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{role} said {line:?}"))?;
        let behind = words
            .next()
            .map(|pids| pids.split(',').filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default();
        Ok(FloorServer {
            child,
            port,
            behind,
            stdin,
        })
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
    stopped: bool,
}

impl Nginx {
    /// nginx in the foreground (`daemon off`, a master and its workers) on a free loopback
    /// port, proxying to 127.0.0.1:`upstream` with kept-alive upstream connections.
    fn start(bin: &Path, dir: &Path, upstream: u16) -> Result<Nginx, String> {
        fs::create_dir_all(dir.join("tmp")).map_err(|e| e.to_string())?;
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "# fnlet's Lambda benchmark: nginx as a reverse proxy in front of the floor server.\n\
             daemon off;\nmaster_process on;\nworker_processes auto;\nuser nobody nogroup;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n\
             \x20 client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
             \x20 keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
             \x20 upstream floor {{\n    server 127.0.0.1:{upstream};\n    keepalive 64;\n\
             \x20   keepalive_requests 1000000;\n    keepalive_timeout 300s;\n  }}\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
             \x20     proxy_pass http://floor;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, &conf).map_err(|e| e.to_string())?;
        let out = fs::File::create(dir.join("nginx.out")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut n = Nginx {
            child,
            port,
            dir: dir.to_path_buf(),
            stopped: false,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let req = request_bytes("POST", "/", &addr.to_string(), &[], PAYLOAD);
        let r = wait_for(Duration::from_secs(10), || {
            if let Ok(Some(st)) = n.child.try_wait() {
                n.stopped = true;
                return Err(format!(
                    "nginx exited {st}: {}",
                    fs::read_to_string(dir.join("nginx.out")).unwrap_or_default()
                        + &fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                ));
            }
            Ok(Client::new(addr)
                .call(&req)
                .is_ok_and(|(st, b)| st == 200 && b == ANSWER))
        });
        r.map(|_| n)
    }

    fn workers(&self) -> Vec<u32> {
        let pid = self.child.id();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn conf_summary(&self) -> String {
        "worker_processes auto, access_log off, upstream keepalive 64 (keepalive_requests \
         1000000), proxy_http_version 1.1, proxy_set_header Connection \"\", client \
         keepalive_requests 1000000; the rest nginx's defaults"
            .into()
    }

    /// SIGQUIT (graceful stop) to the master, then wait; workers left behind are killed.
    fn stop(mut self) -> Result<String, String> {
        self.stopped = true;
        let workers = self.workers();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT)
            .map_err(|e| format!("SIGQUIT: {e}"))?;
        let t = Instant::now();
        let mut status = None;
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                status = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = match status {
            Some(s) => s.to_string(),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "killed after 10 s".into()
            }
        };
        for w in workers {
            if Path::new(&format!("/proc/{w}")).exists() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = &self.dir;
        Ok(status)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if !self.stopped {
            let workers = self.workers();
            let _ = self.child.kill();
            let _ = self.child.wait();
            for w in workers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(w as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

/// Polls `f` every 5 ms until it says yes (how long that took), errs, or `limit` passes.
fn wait_for(
    limit: Duration,
    mut f: impl FnMut() -> Result<bool, String>,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        if f()? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(format!("not after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// the functions and the agent

struct FunctionDef {
    name: String,
    max_concurrency: usize,
    min_instances: usize,
    keep_alive_s: u64,
}

impl FunctionDef {
    fn manifest(&self) -> String {
        let mut m = format!(
            "name = \"{}\"\ndescription = \"fnlet Lambda benchmark no-op\"\nmode = \"lambda\"\n\
             memory_mb = {MEMORY_MB}\ntimeout_s = {TIMEOUT_S}\nmax_concurrency = {}\nkeep_alive_s = {}\npublic = true\n",
            self.name, self.max_concurrency, self.keep_alive_s
        );
        if self.min_instances > 0 {
            m.push_str(&format!("min_instances = {}\n", self.min_instances));
        }
        m
    }
}

/// A bundle of the no-op as `bootstrap` and the function's manifest.
fn make_bundle(dir: &Path, f: &FunctionDef, bootstrap: &Path) -> PathBuf {
    let b = dir.join(&f.name);
    fs::create_dir(&b).expect("creating a bundle directory");
    fs::write(b.join("fnlet.toml"), f.manifest()).expect("writing fnlet.toml");
    fs::copy(bootstrap, b.join("bootstrap")).expect("copying the bootstrap");
    fs::set_permissions(b.join("bootstrap"), fs::Permissions::from_mode(0o755))
        .expect("chmod the bootstrap");
    fs::set_permissions(b.join("fnlet.toml"), fs::Permissions::from_mode(0o644))
        .expect("chmod fnlet.toml");
    fs::set_permissions(&b, fs::Permissions::from_mode(0o755)).expect("chmod the bundle");
    b
}

fn noop_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FNLET_NOOP_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lambda-noop/bundle/bootstrap");
    if !p.is_file() {
        eprintln!(
            "{} is missing: build it first (benches/run.sh lambda does, as scripts/build-fixtures.sh \
             does), or point FNLET_NOOP_BIN at one",
            p.display()
        );
        std::process::exit(1);
    }
    p.canonicalize().unwrap_or(p)
}

/// "static (no PT_INTERP)" or "dynamic (PT_INTERP)", from the ELF program headers.
fn elf_linking(p: &Path) -> String {
    let Ok(b) = fs::read(p) else {
        return "unreadable".into();
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return "not a 64-bit ELF".into();
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let interp = (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        b.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == 3)
    });
    if interp {
        "dynamically linked (PT_INTERP)".into()
    } else {
        "statically linked (no PT_INTERP)".into()
    }
}

fn command_line(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() {
                String::from_utf8_lossy(&o.stderr).trim().to_string()
            } else {
                s
            }
        })
        .unwrap_or_else(|e| format!("{}: {e}", bin.display()))
}

fn git_tree() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// cargo and rustc processes running now (other engineers' builds share the machine).
fn busy_compilers() -> String {
    let mut n = BTreeMap::<String, usize>::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Ok(comm) = fs::read_to_string(e.path().join("comm")) {
                let c = comm.trim();
                if c == "cargo" || c == "rustc" {
                    *n.entry(c.to_string()).or_default() += 1;
                }
            }
        }
    }
    n.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Agent {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    base: String,
    state_dir: PathBuf,
    log: PathBuf,
    config_text: String,
    cgroup_root: String,
    token: RefCell<Option<String>>,
    stopped: bool,
}

impl Agent {
    fn start(fnlet: &Path, dir: &Path, cgroup_root: &str) -> Agent {
        fs::create_dir(dir).expect("creating the agent's directory");
        let port = free_port();
        let state_dir = dir.join("state");
        let config = dir.join("config.toml");
        let config_text = format!(
            "shutdown_grace_s = 5.0\n[limits]\nlog_max_kb = {FN_LOG_MAX_KB}\n[sandbox]\n\
             cgroup_root = \"{cgroup_root}\"\ntmp_mb = {TMP_MB}\npids = {PIDS}\n\
             prepare_ahead = true\n{}\n[lambda]\nruntime_api_port = {RUNTIME_API_PORT}\n{}",
            // Experiment knobs: more `[sandbox]` lines ("colocate_instances = false") and more
            // `[lambda]` lines ("runtime_api_socketpair = true").
            std::env::var("FNLET_BENCH_SANDBOX_CONFIG").unwrap_or_default(),
            std::env::var("FNLET_BENCH_LAMBDA_CONFIG").unwrap_or_default()
        );
        fs::write(&config, &config_text).expect("writing the agent's config");
        let log = dir.join("agent.log");
        let out = fs::File::create(&log).expect("creating the agent's log");
        let mut cmd = Command::new(fnlet);
        // An experiment knob: the agent's tokio worker threads (its runtime reads
        // TOKIO_WORKER_THREADS; the default is one per core).
        if let Ok(n) = std::env::var("FNLET_BENCH_AGENT_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        let child = cmd
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(&state_dir)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup the log"))
            .stderr(out)
            .spawn()
            .expect("starting fnlet agent");
        Agent {
            pid: child.id(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base: format!("http://127.0.0.1:{port}"),
            state_dir,
            log,
            config_text,
            cgroup_root: cgroup_root.into(),
            token: RefCell::new(None),
            stopped: false,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn wait_ready(&mut self) {
        let req = request_bytes("GET", "/readyz", &self.host(), &[], b"");
        let mut c = Client::new(self.addr);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.stopped = true;
                self.fail(&format!("fnlet agent exited at start: {st}"));
            }
            if let Ok((200, _)) = c.call(&req) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail("fnlet agent not ready after 20 s");
    }

    /// `GET /v1/functions/{name}` with the admin token.
    fn describe(&self, c: &mut Client, name: &str) -> Result<serde_json::Value, String> {
        if self.token.borrow().is_none() {
            let t = fs::read_to_string(self.state_dir.join("admin.token"))
                .map_err(|e| format!("reading the admin token: {e}"))?;
            *self.token.borrow_mut() = Some(t.trim().to_string());
        }
        let auth = format!("Bearer {}", self.token.borrow().as_deref().unwrap_or(""));
        let req = request_bytes(
            "GET",
            &format!("/v1/functions/{name}"),
            &self.host(),
            &[("authorization", &auth)],
            b"",
        );
        let (st, body) = c.call(&req)?;
        if st != 200 {
            return Err(format!(
                "describe {name}: HTTP {st}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("describe {name}: {e}"))
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// A function's own log (JSON lines: its output, START, END, REPORT).
    fn function_log(&self, function: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{function}.log"))
    }

    /// Where the agent's log and `function`'s log end now: a phase's lines follow.
    fn log_marks(&self, function: &str) -> (u64, u64) {
        (
            self.log_len(),
            fs::metadata(self.function_log(function)).map_or(0, |m| m.len()),
        )
    }

    fn log_lines(&self, pick: impl Fn(&str) -> bool) -> Vec<String> {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
            .lines()
            .filter(|l| pick(l))
            .map(str::to_string)
            .collect()
    }

    fn count_log(&self, what: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Where the agent's time goes, from its own log since `from`: the router's duration of
    /// each invocation of `function` (slot to answer), the instance's (event handed out to the
    /// runtime's answer, REPORT Duration), and the init (REPORT Init Duration).
    fn print_stages(&self, (from, fn_from): (u64, u64), function: &str, cold: bool) {
        let read_from = |path: &Path, from: u64| {
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(path) {
                let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from));
                let _ = f.read_to_string(&mut text);
            }
            text
        };
        let text = read_from(&self.log, from);
        // REPORT lines are in the function's log (the agent's own log has them at debug only).
        let fn_text = read_from(&self.function_log(function), fn_from);
        // tracing's formatter colours field names even into a file.
        let text = strip_ansi(&text);
        let num_after = |l: &str, key: &str| -> Option<f64> {
            let rest = &l[l.find(key)? + key.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        let quoted = format!("\"{function}\"");
        let bare = format!("function={function} ");
        let mine = |l: &&str| l.contains(&quoted) || l.contains(&bare);
        let router: Vec<f64> = text
            .lines()
            .filter(mine)
            .filter(|l| l.contains("invocation ok"))
            .filter_map(|l| num_after(l, "duration_ms="))
            .collect();
        let instance: Vec<f64> = fn_text
            .lines()
            .filter(|l| l.contains("REPORT RequestId"))
            .filter_map(|l| num_after(l, "Duration: "))
            .collect();
        let init: Vec<f64> = fn_text
            .lines()
            .filter(|l| l.contains("REPORT RequestId"))
            .filter_map(|l| num_after(l, "Init Duration: "))
            .collect();
        let med = |v: &[f64]| -> String {
            if v.is_empty() {
                return "-".into();
            }
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            format!("{:.3}", s[s.len() / 2])
        };
        println!(
            "\nthe agent's own account of {function} (its log, this phase, warm-up included): router (slot \
             to answer) median {} ms over {}; instance (event to the runtime's answer, REPORT \
             Duration) median {} ms over {}{}",
            med(&router),
            router.len(),
            med(&instance),
            instance.len(),
            if cold {
                format!(
                    "; init (start to the first /next, REPORT Init Duration) median {} ms over {}",
                    med(&init),
                    init.len()
                )
            } else {
                String::new()
            }
        );
    }

    fn fail(&mut self, why: &str) -> ! {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("{why}\n--- the agent's log, last lines ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        panic!("{why}");
    }

    fn stop(&mut self) -> Result<(Duration, std::process::ExitStatus), String> {
        self.stopped = true;
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| format!("SIGTERM: {e}"))?;
        while t.elapsed() < Duration::from_secs(20) {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok((t.elapsed(), st)),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err("still running 20 s after SIGTERM: killed".into())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.stopped
            && let Err(e) = self.stop()
        {
            eprintln!("cleanup: fnlet agent: {e}");
        }
    }
}

/// `text` without ANSI escape sequences (ESC [ ... letter).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Leaves no cgroup behind, even when a run panics (after the agent's Drop has stopped it).
struct Cleanup {
    roots: Vec<String>,
}

impl Cleanup {
    fn finish(&mut self) {
        for root in &self.roots {
            if let Ok(iso) = Isolator::new(IsolatorConfig {
                cgroup_root: root.clone(),
                ..Default::default()
            }) {
                let _ = iso.reap_stale();
                let _ = iso.remove_root();
            }
        }
        for d in remove_cgroup_dirs(&self.roots) {
            eprintln!("cleanup: could not remove {}", d.display());
        }
        self.roots.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// profile

/// `perf record` of the agent while one client invokes the warm function back to back.
/// With `clients` > 1, that many concurrent clients on `noop-n<instances>` instead.
fn profile(agent: &Agent, secs: usize, work: &Path, clients: usize, instances: usize) {
    if !common::which("perf") {
        println!("\nprofile: perf is not installed; skipped");
        return;
    }
    let data = work.join("perf.data");
    println!(
        "\n== profile: perf record -F 999 -g -p {} for {secs} s, {clients} client(s) on POST /fn/{} ==",
        agent.pid,
        if clients <= 1 {
            FN_WARM.to_string()
        } else {
            format!("noop-n{instances}")
        }
    );
    let perf = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args([
            "-p",
            &agent.pid.to_string(),
            "--",
            "sleep",
            &secs.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut perf) = perf else {
        println!("profile: perf did not start");
        return;
    };
    let lat = if clients <= 1 {
        let req = request_bytes(
            "POST",
            &format!("/fn/{FN_WARM}"),
            &agent.host(),
            &[],
            PAYLOAD,
        );
        let mut c = Client::new(agent.addr);
        let t = Instant::now();
        let mut n = 0u64;
        let mut lat = Vec::new();
        while t.elapsed() < Duration::from_secs(secs as u64 + 1) && n < 10_000_000 {
            let t0 = Instant::now();
            if c.call(&req).is_ok() {
                lat.push(t0.elapsed());
            }
            n += 1;
            if let Ok(Some(_)) = perf.try_wait() {
                break;
            }
        }
        lat
    } else {
        let name = format!("noop-n{instances}");
        let target = Target {
            name: name.clone(),
            instances: Some(instances),
            addr: agent.addr,
            req: Arc::new(request_bytes(
                "POST",
                &format!("/fn/{name}"),
                &agent.host(),
                &[],
                PAYLOAD,
            )),
            pids: vec![agent.pid],
            cpuacct: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("starting tokio");
        run_load(
            &rt,
            &target,
            clients,
            Duration::from_secs(secs as u64),
            10_000_000,
        )
        .samples
    };
    let _ = perf.wait();
    let s = Stats::of(&lat);
    println!(
        "({} calls during the profile, median {} ms)",
        s.n,
        ms(s.median)
    );
    let report = Command::new("perf")
        .args(["report", "-i"])
        .arg(&data)
        .args([
            "--stdio",
            "--no-children",
            "--sort",
            "comm,dso,symbol",
            "-g",
            "none",
            "--percent-limit",
            "0.8",
        ])
        .output();
    let text = report
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // Inclusive shares of a few places the warm path goes through (a sample counts in each
    // place on its stack; user-space stacks are partial without frame pointers).
    let inclusive = Command::new("perf")
        .args(["report", "-i"])
        .arg(&data)
        .args(["--stdio", "--children", "--sort", "symbol", "-g", "none"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let markers = [
        (
            "context switches (finish_task_switch)",
            "finish_task_switch",
        ),
        ("epoll_wait (tokio parking)", "[k] do_epoll_wait"),
        ("futex (thread wake-ups)", "[k] __x64_sys_futex"),
        ("TCP send (loopback, both sides)", "[k] tcp_sendmsg"),
        ("TCP receive", "[k] tcp_recvmsg"),
        ("openat (files opened per call)", "[k] do_sys_openat2"),
        (
            "isolate::cgroup::read_u64 (peak memory)",
            "isolate::cgroup::read_u64",
        ),
        ("file writes (ext4: logs)", "[k] ext4_buffered_write_iter"),
        ("malloc/free", "[.] malloc"),
        ("serde_json", "serde_json"),
        ("tracing", "tracing"),
    ];
    println!("\nwhere the agent's samples go (inclusive %, perf report --children):");
    for (label, sym) in markers {
        let pct: f64 = inclusive
            .lines()
            .filter(|l| l.contains(sym))
            .filter_map(|l| {
                l.split_whitespace()
                    .next()?
                    .trim_end_matches('%')
                    .parse::<f64>()
                    .ok()
            })
            .fold(0.0, f64::max);
        println!("  {label:<44} {pct:>5.1} %");
    }
    match std::env::var_os("FNLET_BENCH_PERF_OUT") {
        Some(out) => {
            let out = PathBuf::from(out);
            let _ = fs::create_dir_all(&out);
            let _ = fs::write(out.join("perf-report.txt"), &text);
            let _ = fs::copy(&data, out.join("perf.data"));
            println!(
                "perf report written to {}",
                out.join("perf-report.txt").display()
            );
        }
        None => {
            for l in text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(60)
            {
                println!("{l}");
            }
        }
    }
}
