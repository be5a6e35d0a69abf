//! The agent end to end: a cold invocation of the compiled example (examples/wordcount-rust) in
//! exec mode over HTTP (`POST /fn/wordcount` on real `fnlet agent`s), beside the same binary
//! through `fnlet sandbox run`, through the isolate library (`Isolator::spawn`, and
//! `PreparedSandbox::start` of a sandbox prepared ahead) and through plain fork+exec, interleaved
//! round by round in one run, so the agent's own cost per request shows; then throughput with
//! concurrent clients (beside the library and plain fork+exec from as many threads, in the same
//! rounds); and the agents' RSS, idle and under load.
//!
//! Six agents run side by side: one with `[sandbox] prepare_ahead = true` (the default: one
//! sandbox per function built ahead of time, so an invocation only pays for the exec), one
//! with it off (every invocation builds its sandbox on the request path), one whose copy of
//! the function has `reuse_sandbox = true` (each call a new process in a sandbox kept between
//! calls), one whose copy also has `start_ahead = true` (that process started when the last
//! call ended, waiting on stdin), and one with `start_ahead = true` alone (a fresh sandbox per
//! call, built ahead with its process started in it), and one with `reuse_sandbox`,
//! `start_ahead` and `min_instances = 2` (two kept sandboxes taking calls in turn). They are compared with the library's prepared start, its full spawn, and a run of
//! its `ReusableSandbox`.
//!
//! Run as root through `benches/run.sh agent`, which builds fnlet and the example first.
//! Environment: `FNLET_BENCH_RUNS` (sequential samples per contender, default 300),
//! `FNLET_BENCH_WARMUP` (default 20), `FNLET_BENCH_CLIENTS` (concurrency levels, default
//! `1,4,16,32`), `FNLET_BENCH_SECONDS` (load time per level and contender, default 6, split over
//! `FNLET_BENCH_LOAD_ROUNDS` interleaved rounds, default 3), `FNLET_BENCH_MAX_REQUESTS` (bound
//! per level, contender and round, default 100000), `FNLET_BENCH_MAX_CONCURRENCY` (the agents'
//! `defaults.max_concurrency`, default 10, their own default), `FNLET_BIN` and
//! `FNLET_WORDCOUNT_BIN` (default `<target>/release/{fnlet,example-wordcount}`).

#![forbid(unsafe_code)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use isolate::{
    Isolator, IsolatorConfig, Limits, PreparedSandbox, Sandbox, SandboxSpec, StdioSpec, TASK_ROOT,
};

use common::{
    Contender, Stats, env_count, fnlet_binary, load_average, ms, ratio, release_binary,
    remove_cgroup_dirs, run_quiet,
};

/// The request body of every invocation: 409 bytes of text, 81 words (the bench prints the
/// answer).
const PAYLOAD: &str = "The quick brown fox jumps over the lazy dog. The dog does not mind; \
the fox is quick and the day is long.\nA function is just a program: it reads its input on \
stdin and writes its answer on stdout, and the agent runs it in a fresh sandbox for every call.\n\
Cold starts are the price of that isolation, so this benchmark measures what each call costs \
and where the time goes, from the HTTP request to the answer.\n";

/// The agents' sandbox settings, written into their config files and mirrored by the CLI and
/// the library contenders (the agent's defaults).
const TMP_MB: u64 = 64;
const PIDS: u64 = 256;
/// The first function deployed on a fresh state dir runs as `uid_base`.
const UID_BASE: u32 = 200_000;
/// The variable the agent sets when an instance starts (pool::REQUEST_ID_ENV).
const REQUEST_ID_ENV: &str = "FNLET_REQUEST_ID";

/// Contender names the tables and differences refer to.
const FLOOR: &str = "floor: fork+exec";
const LIBRARY: &str = "fnlet library (Isolator::spawn)";
const PREPARED: &str = "library, prepared ahead (start only)";
const REUSED: &str = "library, reusable sandbox (a run)";
const CLI: &str = "fnlet sandbox run (CLI)";
const AGENT_ON: &str = "agent POST, prepare_ahead on (default)";
const AGENT_OFF: &str = "agent POST, prepare_ahead off";
const AGENT_REUSE: &str = "agent POST, reuse_sandbox = true";
const AGENT_AHEAD: &str = "agent POST, reuse_sandbox + start_ahead";
const AGENT_FRESH_AHEAD: &str = "agent POST, start_ahead (fresh sandbox)";
const AGENT_TURNS: &str = "agent POST, reuse + start_ahead, min_instances = 2";
const HEALTHZ: &str = "agent GET /healthz (no sandbox)";

struct Settings {
    runs: usize,
    warmup: usize,
    seconds: usize,
    load_rounds: usize,
    max_requests: usize,
    max_concurrency: usize,
    levels: Vec<usize>,
}

fn settings() -> Settings {
    Settings {
        runs: env_count("FNLET_BENCH_RUNS", 300),
        warmup: env_count("FNLET_BENCH_WARMUP", 20),
        seconds: env_count("FNLET_BENCH_SECONDS", 6),
        load_rounds: env_count("FNLET_BENCH_LOAD_ROUNDS", 3).max(1),
        max_requests: env_count("FNLET_BENCH_MAX_REQUESTS", 100_000),
        max_concurrency: env_count("FNLET_BENCH_MAX_CONCURRENCY", 10),
        levels: std::env::var("FNLET_BENCH_CLIENTS")
            .unwrap_or_else(|_| "1,4,16,32".into())
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("FNLET_BENCH_CLIENTS: {v:?} is not a number"))
            })
            .collect(),
    }
}

/// The same function, run by each contender.
struct Function {
    manifest: Manifest,
    bundle: PathBuf,
    /// The path of the entrypoint inside the sandbox.
    program: String,
    /// The agent's sandbox for it (pool::ActiveFunction::new), with piped stdio.
    spec: SandboxSpec,
    /// The floor's answer, which every contender must give.
    expected: Vec<u8>,
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the agent benchmark runs `fnlet agent`, which creates namespaces and cgroups: run it \
             as root (benches/run.sh agent)"
        );
        std::process::exit(1);
    }
    let set = settings();
    let pid = std::process::id();
    let fnlet = fnlet_binary();
    let wordcount = release_binary(
        "example-wordcount",
        "FNLET_WORDCOUNT_BIN",
        "cargo build --release -p example-wordcount",
    );
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-agent-")
        .tempdir()
        .expect("creating a temporary directory");
    // uid 200000 must reach the bundle: every directory on the way is 0755.
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let f = function(work.path(), &wordcount);

    let agent_root = format!("fnlet-bench-agent-{pid}");
    let off_root = format!("fnlet-bench-agent-{pid}-off");
    let cli_root = format!("fnlet-bench-agent-{pid}-cli");
    let lib_root = format!("fnlet-bench-agent-{pid}-lib");
    let reuse_root = format!("fnlet-bench-agent-{pid}-reuse");
    let ahead_root = format!("fnlet-bench-agent-{pid}-ahead");
    let fresh_ahead_root = format!("fnlet-bench-agent-{pid}-fresh-ahead");
    let turns_root = format!("fnlet-bench-agent-{pid}-turns");
    let mut cleanup = Cleanup {
        roots: vec![
            reuse_root.clone(),
            ahead_root.clone(),
            fresh_ahead_root.clone(),
            turns_root.clone(),
            agent_root.clone(),
            off_root.clone(),
            cli_root.clone(),
            lib_root.clone(),
        ],
    };

    common::print_machine("agent");
    println!("  fnlet: {}, tree: {}", fnlet_version(&fnlet), git_tree());
    println!(
        "  function: {} ({} bytes, {}), memory {} MB, cpus {}, payload {} bytes",
        f.manifest.name,
        fs::metadata(&wordcount).map_or(0, |m| m.len()),
        wordcount.display(),
        f.manifest.memory_mb,
        f.manifest.cpus,
        PAYLOAD.len()
    );
    println!(
        "  expected answer ({} bytes): {}",
        f.expected.len(),
        String::from_utf8_lossy(&f.expected).trim()
    );

    // ---- the agents ----
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio");
    let mut agents = Vec::new();
    // The third agent's function keeps its sandboxes between calls.
    let reuse_bundle = work.path().join("bundle-reuse");
    copy_bundle(&f.bundle, &reuse_bundle, "reuse_sandbox = true\n");
    // The fourth's also starts each call's process ahead.
    let ahead_bundle = work.path().join("bundle-ahead");
    copy_bundle(
        &f.bundle,
        &ahead_bundle,
        "reuse_sandbox = true\nstart_ahead = true\n",
    );
    // The fifth's starts it in the fresh sandbox built ahead for each call.
    let fresh_ahead_bundle = work.path().join("bundle-fresh-ahead");
    copy_bundle(&f.bundle, &fresh_ahead_bundle, "start_ahead = true\n");
    // The sixth's keeps two sandboxes provisioned, taking calls in turn, each starting its
    // next process ahead while the other serves.
    let turns_bundle = work.path().join("bundle-turns");
    copy_bundle(
        &f.bundle,
        &turns_bundle,
        "reuse_sandbox = true\nstart_ahead = true\nmin_instances = 2\n",
    );
    let mut bundles = Vec::new();
    for (name, short, dir, root, ahead, bundle) in [
        (
            AGENT_ON,
            "ahead on",
            "agent-on",
            &agent_root,
            true,
            &f.bundle,
        ),
        (
            AGENT_OFF,
            "ahead off",
            "agent-off",
            &off_root,
            false,
            &f.bundle,
        ),
        (
            AGENT_REUSE,
            "reuse",
            "agent-reuse",
            &reuse_root,
            true,
            &reuse_bundle,
        ),
        (
            AGENT_AHEAD,
            "ahead",
            "agent-ahead",
            &ahead_root,
            true,
            &ahead_bundle,
        ),
        (
            AGENT_FRESH_AHEAD,
            "fresh ahead",
            "agent-fresh-ahead",
            &fresh_ahead_root,
            true,
            &fresh_ahead_bundle,
        ),
        (
            AGENT_TURNS,
            "turns",
            "agent-turns",
            &turns_root,
            true,
            &turns_bundle,
        ),
    ] {
        let a = Agent::start(
            name,
            short,
            &fnlet,
            &work.path().join(dir),
            root,
            set.max_concurrency,
            ahead,
            &f.manifest.name,
        );
        agents.push(a);
        bundles.push(bundle.clone());
    }
    let mut rss: Vec<(String, Vec<Option<u64>>)> = Vec::new();
    for a in &mut agents {
        a.wait_ready(&rt);
    }
    rss.push((
        "after start, no function deployed".into(),
        agents.iter().map(Agent::rss_kib).collect(),
    ));
    for (a, bundle) in agents.iter_mut().zip(&bundles) {
        let deployed = run_quiet(
            Command::new(&fnlet)
                .arg("deploy")
                .arg(bundle)
                .args(["--endpoint", &a.base, "--state-dir"])
                .arg(&a.state_dir),
        );
        if let Err(e) = deployed {
            a.fail(&format!("fnlet deploy: {e}"));
        }
        println!(
            "  {}: pid {}, {} (config: {})",
            a.name,
            a.pid,
            a.base,
            a.config_text.trim().replace('\n', "; ")
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    rss.push((
        "idle after deploy".into(),
        agents.iter().map(Agent::rss_kib).collect(),
    ));
    let _ = std::io::stdout().flush();

    let isolator = Isolator::new(IsolatorConfig {
        cgroup_root: lib_root.clone(),
        ..Default::default()
    })
    .expect("Isolator::new (the library contenders)");

    // ---- one client, sequential ----
    let hits_before: Vec<_> = agents.iter().map(|a| a.starts(&rt)).collect();
    sequential(&set, &f, &fnlet, &cli_root, &isolator, &mut agents, &rt);
    for (a, before) in agents.iter().zip(&hits_before) {
        print_starts(a, before, &a.starts(&rt));
    }
    std::thread::sleep(Duration::from_millis(500));
    rss.push((
        format!(
            "idle after the {} sequential invocations",
            set.runs + set.warmup + 1
        ),
        agents.iter().map(Agent::rss_kib).collect(),
    ));

    // ---- throughput ----
    let hits_before: Vec<_> = agents.iter().map(|a| a.starts(&rt)).collect();
    let peaks = throughput(&set, &f, &isolator, &agents, &rt);
    for (a, before) in agents.iter().zip(&hits_before) {
        print_starts(a, before, &a.starts(&rt));
    }
    rss.push((
        "peak during the throughput runs (sampled every 10 ms)".into(),
        peaks.into_iter().map(Some).collect(),
    ));
    rss.push((
        "VmHWM (the kernel's peak for the process)".into(),
        agents.iter().map(|a| a.status_kib("VmHWM")).collect(),
    ));
    std::thread::sleep(Duration::from_secs(2));
    rss.push((
        "idle 2 s after the throughput runs".into(),
        agents.iter().map(Agent::rss_kib).collect(),
    ));
    print_rss(&agents, &rss);

    // ---- shutdown ----
    drop(isolator);
    let _ = Isolator::new(IsolatorConfig {
        cgroup_root: lib_root.clone(),
        ..Default::default()
    })
    .map(|iso| iso.remove_root());
    println!();
    for a in &mut agents {
        match a.stop() {
            Ok((took, status)) => println!(
                "{}: stopped by SIGTERM in {:.0} ms ({status})",
                a.name,
                took.as_secs_f64() * 1e3
            ),
            Err(e) => println!("{}: did not stop cleanly: {e}", a.name),
        }
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
    drop(agents);
    cleanup.finish();
    drop(work);
}

/// The bundle, the agent's sandbox spec for it, and the floor's answer.
fn function(work: &Path, wordcount: &Path) -> Function {
    let bundle = work.join("bundle");
    let manifest = make_bundle(&bundle, wordcount);
    fs::set_permissions(&bundle, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let program = format!("{TASK_ROOT}/{}", manifest.entrypoint);
    let mut spec = SandboxSpec {
        name: manifest.name.clone(),
        program: program.clone(),
        bundle: Some(bundle.clone()),
        tmp_size_bytes: TMP_MB << 20,
        limits: Limits {
            memory_bytes: Some(manifest.memory_mb << 20),
            cpus: Some(manifest.cpus),
            pids: Some(PIDS),
            nofile: 1024,
        },
        uid: UID_BASE,
        gid: UID_BASE,
        stdio: StdioSpec::piped(),
        ..Default::default()
    };
    // The environment the agent gives the function (pool::ActiveFunction::new).
    spec.env.extend(manifest.env.clone());
    spec.env
        .insert("FNLET_FUNCTION_NAME".into(), manifest.name.clone());
    spec.env.insert("FNLET_FUNCTION_VERSION".into(), "1".into());
    spec.env
        .insert("FNLET_MEMORY_MB".into(), manifest.memory_mb.to_string());
    let mut f = Function {
        manifest,
        bundle,
        program,
        spec,
        expected: Vec::new(),
    };
    f.expected = invoke_command(&mut floor_command(&f, 0)).expect("the function on the host");
    f
}

/// The function on the host, no isolation, with the same environment.
fn floor_command(f: &Function, i: usize) -> Command {
    let mut c = Command::new(f.bundle.join(&f.manifest.entrypoint));
    c.env_clear()
        .envs(&f.spec.env)
        .env(REQUEST_ID_ENV, format!("bench-{i}"))
        .current_dir(&f.bundle);
    c
}

/// One client, one request at a time: every contender once per round.
fn sequential(
    set: &Settings,
    f: &Function,
    fnlet: &Path,
    cli_root: &str,
    isolator: &Isolator,
    agents: &mut [Agent],
    rt: &tokio::runtime::Runtime,
) {
    let check = |out: Vec<u8>| -> Result<(), String> {
        if out == f.expected {
            Ok(())
        } else {
            Err(format!(
                "unexpected answer: {:?}",
                String::from_utf8_lossy(&out)
            ))
        }
    };
    let mut cli_args: Vec<String> = vec![
        "sandbox".into(),
        "run".into(),
        "--cgroup-root".into(),
        cli_root.into(),
        "--name".into(),
        f.manifest.name.clone(),
        "--memory".into(),
        format!("{}M", f.manifest.memory_mb),
        "--cpus".into(),
        f.manifest.cpus.to_string(),
        "--pids".into(),
        PIDS.to_string(),
        "--tmp-size".into(),
        format!("{TMP_MB}M"),
        "--uid".into(),
        UID_BASE.to_string(),
        "--gid".into(),
        UID_BASE.to_string(),
    ];
    for (k, v) in &f.spec.env {
        cli_args.extend(["-e".into(), format!("{k}={v}")]);
    }
    // What a pool of sandboxes built ahead hands out: the next one is prepared, untimed, right
    // after each run, so it waits about one round; the request id is its late variable.
    let prepared_spec = SandboxSpec {
        late_env: Some(REQUEST_ID_ENV.into()),
        ..f.spec.clone()
    };
    let prepare = || isolator.prepare(&prepared_spec).map_err(|e| e.to_string());
    let prepared: RefCell<Option<PreparedSandbox>> =
        RefCell::new(Some(prepare().expect("Isolator::prepare")));
    // One sandbox kept for every run, as an agent's function with reuse_sandbox keeps it.
    let reused = RefCell::new(
        isolator
            .prepare(&SandboxSpec {
                reusable: true,
                ..prepared_spec.clone()
            })
            .and_then(|p| p.into_reusable())
            .expect("Isolator::prepare (reusable)"),
    );
    let client = http_client();
    let (on, off, reuse, ahead, fresh_ahead, turns) = (
        &agents[0], &agents[1], &agents[2], &agents[3], &agents[4], &agents[5],
    );
    let post = |url: &str| -> Result<(), String> {
        let (status, body) = rt.block_on(post(&client, url))?;
        if status != 200 {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        check(body)
    };
    let healthz = format!("{}/healthz", on.base);

    let mut contenders: Vec<Contender> = vec![
        Contender::new(
            FLOOR,
            "std::process::Command of the binary, no isolation: payload on a stdin pipe, \
             stdout and stderr read, wait",
            Box::new(|i| check(invoke_command(&mut floor_command(f, i))?)),
        ),
        Contender::new(
            LIBRARY,
            "the agent's sandbox from this process: Isolator::spawn with piped stdin, stdout and \
             stderr, write the payload, read both outputs, wait_blocking (one Isolator)",
            Box::new(|i| check(invoke_library(isolator, &f.spec, i)?)),
        ),
        Contender::new(
            PREPARED,
            "PreparedSandbox::start (the request id as its late variable) of a sandbox \
             Isolator::prepare built right after the previous run (untimed), then the same I/O \
             and wait",
            Box::new(|i| {
                let p = prepared.borrow_mut().take().ok_or("no prepared sandbox")?;
                let sb = p
                    .start(Some(&format!("bench-{i}")))
                    .map_err(|e| e.to_string())?;
                check(talk(sb)?)
            }),
        )
        .untimed_after(Box::new(|_| {
            *prepared.borrow_mut() = Some(prepare()?);
            Ok(())
        })),
        Contender::new(
            REUSED,
            "ReusableSandbox::run (the request id as its late variable) in one sandbox kept \
             for every run, then the same I/O and run_ended",
            Box::new(|i| check(talk_reused(rt, &mut reused.borrow_mut(), i)?)),
        ),
        Contender::new(
            CLI,
            "a new fnlet process each run: fnlet sandbox run --bundle B --memory/--cpus/--pids/\
             --tmp-size/--uid/-e as the agent's -- /var/task/bootstrap, payload on its stdin",
            Box::new(|i| {
                let mut c = Command::new(fnlet);
                c.args(&cli_args)
                    .args(["-e", &format!("{REQUEST_ID_ENV}=bench-{i}")])
                    .arg("--bundle")
                    .arg(&f.bundle)
                    .args(["--", &f.program]);
                check(invoke_command(&mut c)?)
            }),
        ),
        Contender::new(
            AGENT_ON,
            "HTTP/1.1 POST of the payload to the agent with prepare_ahead on, one keep-alive \
             connection to 127.0.0.1, reqwest on a current-thread tokio runtime; 200 and the \
             answer checked. The agent builds the next sandbox in the background after each call",
            Box::new(|_| post(&on.url)),
        ),
        Contender::new(
            AGENT_OFF,
            "the same POST to the agent with prepare_ahead off: every call builds its sandbox",
            Box::new(|_| post(&off.url)),
        ),
        Contender::new(
            AGENT_REUSE,
            "the same POST to a third agent (prepare_ahead on) whose function has reuse_sandbox \
             = true: each call a new process in a sandbox kept from the last call",
            Box::new(|_| post(&reuse.url)),
        ),
        Contender::new(
            AGENT_AHEAD,
            "the same POST to a fourth agent (prepare_ahead on) whose function has reuse_sandbox \
             = true and start_ahead = true: each call's process was started when the last call \
             ended and waits on stdin",
            Box::new(|_| post(&ahead.url)),
        ),
        Contender::new(
            AGENT_FRESH_AHEAD,
            "the same POST to a fifth agent (prepare_ahead on) whose function has start_ahead = \
             true: each call in a fresh sandbox, built after the last call with its process \
             started in it, waiting on stdin",
            Box::new(|_| post(&fresh_ahead.url)),
        ),
        Contender::new(
            AGENT_TURNS,
            "the same POST to a sixth agent (prepare_ahead on) whose function has reuse_sandbox \
             = true, start_ahead = true and min_instances = 2: two kept sandboxes take calls in \
             turn, each starting its next process when its call ends",
            Box::new(|_| post(&turns.url)),
        ),
        Contender::new(
            HEALTHZ,
            "the same client, GET /healthz of the first agent: the HTTP round trip alone",
            Box::new(|_| {
                let (status, _) = rt.block_on(get(&client, &healthz))?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }),
        ),
    ];
    let failed = common::trial(&mut contenders);
    if !failed.is_empty() {
        for (name, why) in &failed {
            eprintln!("FAILED its trial run: {name}: {why}");
        }
        drop(contenders);
        agents[0].fail("a contender failed its trial run");
    }

    println!(
        "\n== one client, sequential: {} interleaved runs each after {} warm-up rounds ==\n",
        set.runs, set.warmup
    );
    let started = Instant::now();
    common::interleave(&mut contenders, set.warmup, set.runs);
    let secs = started.elapsed().as_secs_f64();
    let results: Vec<Measured> = contenders
        .iter()
        .map(|c| Measured {
            name: c.name.clone(),
            what: c.what.clone(),
            stats: Stats::of(&c.samples),
            samples: c.samples.clone(),
        })
        .collect();
    drop(contenders);
    drop(prepared.take());
    print_latency_table(&results);
    println!(
        "(measured in {secs:.1} s, load average now {})",
        load_average()
    );
    for r in &results {
        println!("  {}: {}", r.name, r.what);
    }
    print_differences(&results);
}

/// Concurrent clients against each agent, and the library with as many sandboxes at once,
/// level by level, interleaved in rounds. Returns each agent's peak RSS (KiB).
fn throughput(
    set: &Settings,
    f: &Function,
    isolator: &Isolator,
    agents: &[Agent],
    rt: &tokio::runtime::Runtime,
) -> Vec<u64> {
    let slice = Duration::from_secs_f64(set.seconds as f64 / set.load_rounds as f64);
    println!(
        "\n== throughput: {} s per level and contender ({} interleaved rounds of {:.1} s), \
         clients {:?}; agents' max_concurrency {} ==\n",
        set.seconds,
        set.load_rounds,
        slice.as_secs_f64(),
        set.levels,
        set.max_concurrency
    );
    println!(
        "(the load generator, the agents and the sandboxes share this machine's {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let top = set.levels.iter().copied().max().unwrap_or(1);
    let clients: Vec<reqwest::Client> = (0..top).map(|_| http_client()).collect();
    let expected = Arc::new(f.expected.clone());
    // Targets: each agent, then the library (index agents.len()), then the floor.
    let (lib, floor) = (agents.len(), agents.len() + 1);
    let n_targets = agents.len() + 2;
    let mut rows: Vec<Vec<LoadRow>> = (0..n_targets)
        .map(|_| set.levels.iter().map(|&n| LoadRow::new(n)).collect())
        .collect();
    let mut peaks = vec![0; agents.len()];
    for round in 0..set.load_rounds {
        for k in 0..set.levels.len() {
            let li = (round + k) % set.levels.len();
            let n = set.levels[li];
            // Rotate who goes first at each level and round.
            for t in 0..n_targets {
                let ti = (round + k + t) % n_targets;
                if let Some(a) = agents.get(ti) {
                    let before = Usage::now(Some((a.pid, &a.cgroup_root)));
                    let sampler = RssSampler::start(a.pid);
                    let s = agent_load(
                        rt,
                        &clients[..n],
                        &a.url,
                        &expected,
                        slice,
                        set.max_requests,
                    );
                    let peak = sampler.stop();
                    peaks[ti] = peaks[ti].max(peak);
                    rows[ti][li].add(
                        s,
                        Usage::now(Some((a.pid, &a.cgroup_root))).since(&before),
                        peak,
                    );
                } else {
                    let before = Usage::now(None);
                    let threads = n.min(set.max_concurrency);
                    let s = if ti == lib {
                        threaded_load(
                            &|i| invoke_library(isolator, &f.spec, i),
                            &f.expected,
                            threads,
                            slice,
                            set.max_requests,
                        )
                    } else {
                        threaded_load(
                            &|i| invoke_command(&mut floor_command(f, i)),
                            &f.expected,
                            threads,
                            slice,
                            set.max_requests,
                        )
                    };
                    rows[ti][li].add(s, Usage::now(None).since(&before), 0);
                }
            }
        }
    }
    let mut names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    names.push("fnlet library (threads)");
    names.push("floor: fork+exec (threads)");
    debug_assert_eq!(names.len(), floor + 1);
    print_load_table(&names, &rows, set.max_concurrency, lib, floor);
    print_cpu_table(&names, &rows);
    peaks
}

struct Measured {
    name: String,
    what: String,
    stats: Stats,
    /// In round order: sample i of every contender comes from round i.
    samples: Vec<Duration>,
}

// ---------------------------------------------------------------------------------------------
// the bundle

/// What the bench needs of the function's manifest to run it the same way outside the agent.
struct Manifest {
    name: String,
    entrypoint: String,
    memory_mb: u64,
    cpus: f64,
    env: BTreeMap<String, String>,
}

/// A bundle of the example's manifest and the freshly built binary as its entrypoint (the same
/// as `scripts/build-examples.sh` makes in examples/wordcount-rust/bundle).
/// A copy of the bundle in `from` whose fnlet.toml starts with `extra` (top-level keys go
/// before any table).
fn copy_bundle(from: &Path, to: &Path, extra: &str) {
    fs::create_dir(to).expect("creating the bundle copy");
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    for entry in fs::read_dir(from).expect("reading the bundle") {
        let entry = entry.expect("reading the bundle");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copying the bundle");
    }
    let manifest = to.join("fnlet.toml");
    let text = fs::read_to_string(&manifest).expect("reading the bundle's fnlet.toml");
    fs::write(&manifest, format!("{extra}{text}")).expect("writing the bundle's fnlet.toml");
}

fn make_bundle(dir: &Path, binary: &Path) -> Manifest {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordcount-rust/bundle");
    let text =
        fs::read_to_string(src.join("fnlet.toml")).expect("reading the example's fnlet.toml");
    let t: toml::Table = text.parse().expect("parsing the example's fnlet.toml");
    let s = |k: &str| t.get(k).and_then(|v| v.as_str()).map(String::from);
    let m = Manifest {
        name: s("name").expect("fnlet.toml: name"),
        entrypoint: s("entrypoint").expect("fnlet.toml: entrypoint (a path)"),
        memory_mb: t
            .get("memory_mb")
            .and_then(|v| v.as_integer())
            .map_or(128, |v| v as u64),
        cpus: t
            .get("cpus")
            .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
            .unwrap_or(1.0),
        env: t
            .get("env")
            .and_then(|v| v.as_table())
            .map(|e| {
                e.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    assert_eq!(
        s("mode").as_deref().unwrap_or("exec"),
        "exec",
        "the example must be an exec-mode function"
    );
    fs::create_dir(dir).expect("creating the bundle directory");
    fs::write(dir.join("fnlet.toml"), text).expect("writing fnlet.toml");
    let bin = dir.join(&m.entrypoint);
    fs::copy(binary, &bin).expect("copying the function's binary into the bundle");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod 0755 the binary");
    fs::set_permissions(dir.join("fnlet.toml"), fs::Permissions::from_mode(0o644))
        .expect("chmod 0644 fnlet.toml");
    m
}

fn fnlet_version(fnlet: &Path) -> String {
    Command::new(fnlet)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The commit the binaries were built from, "-dirty" when the work tree had changes.
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

// ---------------------------------------------------------------------------------------------
// one invocation through each path

/// Runs a command with the payload on its stdin; its stdout when it exits 0.
fn invoke_command(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input is fine: ignore EPIPE.
        let _ = stdin.write_all(PAYLOAD.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// What the agent's exec mode does with a sandbox (instance::run_exec), synchronously: spawn
/// with piped stdio, write the payload and close stdin, read stdout and stderr to the end, wait.
fn invoke_library(iso: &Isolator, spec: &SandboxSpec, i: usize) -> Result<Vec<u8>, String> {
    let mut spec = spec.clone();
    spec.env
        .insert("FNLET_REQUEST_ID".into(), format!("bench-{i}"));
    let sb = iso.spawn(&spec).map_err(|e| e.to_string())?;
    talk(sb)
}

/// The function's side of an invocation: the payload in, the answer out, wait for the exit.
fn talk(mut sb: Sandbox) -> Result<Vec<u8>, String> {
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (sb.take_stdin(), sb.take_stdout(), sb.take_stderr())
    else {
        return Err("missing stdio pipe".into());
    };
    let _ = fs::File::from(stdin).write_all(PAYLOAD.as_bytes());
    let mut out = Vec::new();
    fs::File::from(stdout)
        .read_to_end(&mut out)
        .map_err(|e| format!("reading stdout: {e}"))?;
    // The example writes one line to stderr, before its answer: no pipe can fill up here.
    let mut err = Vec::new();
    let _ = fs::File::from(stderr).read_to_end(&mut err);
    let outcome = sb.wait_blocking().map_err(|e| e.to_string())?;
    if !outcome.status.success() {
        return Err(format!(
            "exited {:?}: {}",
            outcome.status,
            String::from_utf8_lossy(&err).trim()
        ));
    }
    Ok(out)
}

/// One run of a reusable sandbox: the payload in, the answer out, its end.
fn talk_reused(
    rt: &tokio::runtime::Runtime,
    sb: &mut isolate::ReusableSandbox,
    i: usize,
) -> Result<Vec<u8>, String> {
    let pipes = sb
        .run(Some(&format!("bench-{i}")), &[])
        .map_err(|e| e.to_string())?;
    let _ = fs::File::from(pipes.stdin).write_all(PAYLOAD.as_bytes());
    let mut out = Vec::new();
    fs::File::from(pipes.stdout)
        .read_to_end(&mut out)
        .map_err(|e| format!("reading stdout: {e}"))?;
    let mut err = Vec::new();
    let _ = fs::File::from(pipes.stderr).read_to_end(&mut err);
    let end = rt
        .block_on(sb.run_ended())
        .map_err(|e| e.to_string())?
        .ok_or("the reusable sandbox ended")?;
    if !end.status.success() {
        return Err(format!(
            "exited {:?}: {}",
            end.status,
            String::from_utf8_lossy(&err).trim()
        ));
    }
    Ok(out)
}

/// One client, one connection: HTTP/1.1 keep-alive on loopback, no proxy.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(15))
        .build()
        .expect("building the HTTP client")
}

async fn post(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let r = client
        .post(url)
        .body(PAYLOAD)
        .send()
        .await
        .map_err(transport)?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(transport)?;
    Ok((status, body.to_vec()))
}

async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let r = client.get(url).send().await.map_err(transport)?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(transport)?;
    Ok((status, body.to_vec()))
}

fn transport(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    };
    format!("{kind}: {e}")
}

// ---------------------------------------------------------------------------------------------
// load

/// What one slice of load produced.
#[derive(Default)]
struct Slice {
    /// Latency of each successful request.
    samples: Vec<Duration>,
    /// Failed requests by status ("429") or by transport error kind.
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

/// `clients` concurrent clients, each with its own keep-alive connection, sending one request
/// after another until the slice's time is up (or `cap` requests were sent in all).
fn agent_load(
    rt: &tokio::runtime::Runtime,
    clients: &[reqwest::Client],
    url: &str,
    expected: &Arc<Vec<u8>>,
    time: Duration,
    cap: usize,
) -> Slice {
    rt.block_on(async {
        let start = Instant::now();
        let deadline = start + time;
        let issued = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for c in clients {
            let (c, url, expected, issued) =
                (c.clone(), url.to_string(), expected.clone(), issued.clone());
            set.spawn(async move {
                let mut s = Slice::default();
                while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < cap {
                    let t = Instant::now();
                    let key = match post(&c, &url).await {
                        Ok((200, body)) if body == *expected => {
                            s.samples.push(t.elapsed());
                            continue;
                        }
                        Ok((200, _)) => "200 with a wrong answer".to_string(),
                        Ok((status, _)) => status.to_string(),
                        Err(e) => e.split(':').next().unwrap_or("transport").to_string(),
                    };
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

/// The library path under the same load: `threads` threads (as many sandboxes at once as the
/// agent allows), each invoking one after another until the time is up.
/// `threads` threads calling `run` (the library's sandbox, or the floor's plain process) one
/// request after another for `time`, at most `cap` requests in all.
fn threaded_load(
    run: &(dyn Fn(usize) -> Result<Vec<u8>, String> + Sync),
    expected: &[u8],
    threads: usize,
    time: Duration,
    cap: usize,
) -> Slice {
    let start = Instant::now();
    let deadline = start + time;
    let issued = AtomicUsize::new(0);
    let mut all = Slice::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|th| {
                let issued = &issued;
                scope.spawn(move || {
                    let mut s = Slice::default();
                    let mut i = th << 32;
                    while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < cap
                    {
                        i += 1;
                        let t = Instant::now();
                        match run(i) {
                            Ok(out) if out == expected => s.samples.push(t.elapsed()),
                            Ok(_) => *s.errors.entry("wrong answer".into()).or_default() += 1,
                            Err(e) => *s.errors.entry(e).or_default() += 1,
                        }
                    }
                    s
                })
            })
            .collect();
        for h in handles {
            all.merge(h.join().expect("a load thread panicked"));
        }
    });
    all.wall = start.elapsed();
    all
}

/// CPU time of one process (clock ticks of 10 ms: USER_HZ is 100 on Linux): its own threads
/// and its reaped children; and its own minor page faults. From /proc/<pid>/stat.
#[derive(Default, Clone, Copy)]
struct ProcUsage {
    cpu: u64,
    children: u64,
    faults: u64,
}

impl ProcUsage {
    fn read(path: &str) -> ProcUsage {
        let stat = fs::read_to_string(path).unwrap_or_default();
        // The fields after the command name, which may hold spaces: "(comm) state ppid ...".
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // Fields of stat(5): 10 minflt, 14-17 utime stime cutime cstime; `f` starts at 4.
        let at = |n: usize| f.get(n - 4).copied().unwrap_or(0);
        ProcUsage {
            cpu: at(14) + at(15),
            children: at(16) + at(17),
            faults: at(10),
        }
    }

    fn since(&self, b: &ProcUsage) -> ProcUsage {
        ProcUsage {
            cpu: self.cpu.saturating_sub(b.cpu),
            children: self.children.saturating_sub(b.children),
            faults: self.faults.saturating_sub(b.faults),
        }
    }

    fn add(&mut self, o: &ProcUsage) {
        self.cpu += o.cpu;
        self.children += o.children;
        self.faults += o.faults;
    }
}

/// The CPU time (in 10 ms ticks, as /proc/PID/stat counts) that the cgroup v1 cpuacct group
/// `root` and everything below it were charged, when the host has that hierarchy.
fn cgroup_cpu_ticks(root: &str) -> Option<u64> {
    let ns: u64 = fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/{root}/cpuacct.usage"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(ns / 10_000_000)
}

/// The CPU and faults of `agent`'s spawn helper (`fnlet-spawner`, a child of its main thread),
/// when it has one.
fn spawn_helper_of(agent: u32) -> Option<ProcUsage> {
    let children = fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).ok()?;
    children.split_whitespace().find_map(|c| {
        let comm = fs::read_to_string(format!("/proc/{c}/comm")).ok()?;
        (comm.trim() == "fnlet-spawner").then(|| ProcUsage::read(&format!("/proc/{c}/stat")))
    })
}

/// What a slice of load cost: the process serving it (an agent, or this process for the
/// library), this process as the load generator, and the whole host (busy and total ticks).
#[derive(Default, Clone, Copy)]
struct Usage {
    server: ProcUsage,
    /// None when the server is this process.
    client: Option<ProcUsage>,
    host_busy: u64,
    host_total: u64,
}

impl Usage {
    /// `agent`: the agent's pid and cgroup root, or None for this process.
    fn now(agent: Option<(u32, &str)>) -> Usage {
        let me = ProcUsage::read("/proc/self/stat");
        let (server, client) = match agent {
            Some((pid, root)) => {
                let mut agent = ProcUsage::read(&format!("/proc/{pid}/stat"));
                // The agent's spawn helper clones its sandboxes: its work is the agent's.
                if let Some(helper) = spawn_helper_of(pid) {
                    agent.cpu += helper.cpu;
                    agent.faults += helper.faults;
                }
                // Its sandboxes' CPU as their cgroups counted it: a sandbox kept between calls
                // (reuse_sandbox) is reaped only when it ends, so its runs never reach the
                // agent's children's times while it serves.
                if let Some(ticks) = cgroup_cpu_ticks(root) {
                    agent.children = ticks;
                }
                (agent, Some(me))
            }
            None => (me, None),
        };
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        Usage {
            server,
            client,
            host_busy: total.saturating_sub(idle),
            host_total: total,
        }
    }

    fn since(&self, b: &Usage) -> Usage {
        Usage {
            server: self.server.since(&b.server),
            client: match (self.client, b.client) {
                (Some(a), Some(b)) => Some(a.since(&b)),
                _ => None,
            },
            host_busy: self.host_busy.saturating_sub(b.host_busy),
            host_total: self.host_total.saturating_sub(b.host_total),
        }
    }

    fn add(&mut self, o: &Usage) {
        self.server.add(&o.server);
        if let Some(c) = o.client {
            self.client.get_or_insert_with(ProcUsage::default).add(&c);
        }
        self.host_busy += o.host_busy;
        self.host_total += o.host_total;
    }
}

/// Samples the agent's VmRSS every 10 ms on a thread of its own; `stop` returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(status_kib(pid, "VmRSS").unwrap_or(0))
        });
        RssSampler { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// A `Key:   N kB` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One concurrency level, summed over its rounds.
struct LoadRow {
    clients: usize,
    samples: Vec<Duration>,
    ok: usize,
    errors: BTreeMap<String, usize>,
    wall: Duration,
    usage: Usage,
    peak_rss_kib: u64,
}

impl LoadRow {
    fn new(clients: usize) -> LoadRow {
        LoadRow {
            clients,
            samples: Vec::new(),
            ok: 0,
            errors: BTreeMap::new(),
            wall: Duration::ZERO,
            usage: Usage::default(),
            peak_rss_kib: 0,
        }
    }

    fn add(&mut self, s: Slice, usage: Usage, peak_rss_kib: u64) {
        self.ok += s.samples.len();
        self.samples.extend(s.samples);
        for (k, v) in s.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.wall += s.wall;
        self.usage.add(&usage);
        self.peak_rss_kib = self.peak_rss_kib.max(peak_rss_kib);
    }

    fn rps(&self) -> f64 {
        if self.wall.is_zero() {
            0.0
        } else {
            self.ok as f64 / self.wall.as_secs_f64()
        }
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{v} x {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Milliseconds of CPU per successful request.
    fn per_req(&self, ticks: u64) -> String {
        if self.ok == 0 {
            "-".into()
        } else {
            format!("{:.2}", ticks as f64 * 10.0 / self.ok as f64)
        }
    }

    /// Page faults per successful request.
    fn faults_per_req(&self, faults: u64) -> String {
        if self.ok == 0 {
            "-".into()
        } else {
            format!("{:.0}", faults as f64 / self.ok as f64)
        }
    }

    fn host_busy_pct(&self) -> String {
        if self.usage.host_total == 0 {
            "-".into()
        } else {
            format!(
                "{:.0}",
                100.0 * self.usage.host_busy as f64 / self.usage.host_total as f64
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// output

fn median_of(results: &[Measured], name: &str) -> Option<Duration> {
    results
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.stats.median)
}

fn print_latency_table(results: &[Measured]) {
    let (floor, lib) = (median_of(results, FLOOR), median_of(results, LIBRARY));
    println!(
        "| {:<40} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} | {:>8} | {:>9} |",
        "contender",
        "runs",
        "median (ms)",
        "p99 (ms)",
        "min (ms)",
        "max (ms)",
        "x floor",
        "x library"
    );
    println!(
        "|{:-<42}|{:->6}|{:->13}|{:->11}|{:->11}|{:->11}|{:->10}|{:->11}|",
        "", "", "", "", "", "", "", ""
    );
    for r in results {
        let s = &r.stats;
        println!(
            "| {:<40} | {:>4} | {:>11} | {:>9} | {:>9} | {:>9} | {:>8} | {:>9} |",
            r.name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max),
            ratio(s.median, floor),
            ratio(s.median, lib),
        );
    }
    println!("(ratios are of medians)");
}

/// Where the time goes: each difference as the difference of the two medians and as the median,
/// round by round, of the paired difference (sample i of every contender is from round i).
fn print_differences(results: &[Measured]) {
    let get = |name: &str| results.iter().find(|r| r.name == name);
    println!();
    println!(
        "| {:<62} | {:>15} | {:>18} |",
        "difference", "of medians (ms)", "paired median (ms)"
    );
    println!("|{:-<64}|{:->17}|{:->20}|", "", "", "");
    for (label, a, b) in [
        ("sandbox cost: library - floor", LIBRARY, FLOOR),
        (
            "building it ahead saves: library - library prepared",
            LIBRARY,
            PREPARED,
        ),
        (
            "AGENT OVERHEAD, prepare_ahead off: agent - library",
            AGENT_OFF,
            LIBRARY,
        ),
        (
            "AGENT OVERHEAD, prepare_ahead on: agent - library prepared",
            AGENT_ON,
            PREPARED,
        ),
        ("  of which the HTTP round trip (GET /healthz)", HEALTHZ, ""),
        (
            "prepare_ahead in the agent saves: off - on",
            AGENT_OFF,
            AGENT_ON,
        ),
        ("CLI overhead: sandbox run - library", CLI, LIBRARY),
        (
            "agent (prepare_ahead on) - sandbox run (CLI)",
            AGENT_ON,
            CLI,
        ),
        ("reuse_sandbox: agent reuse - floor", AGENT_REUSE, FLOOR),
        (
            "a reusable sandbox's run: library reused - floor",
            REUSED,
            FLOOR,
        ),
        (
            "AGENT OVERHEAD, reuse_sandbox: agent reuse - library reused",
            AGENT_REUSE,
            REUSED,
        ),
        (
            "reuse_sandbox saves: agent prepare_ahead on - agent reuse",
            AGENT_ON,
            AGENT_REUSE,
        ),
        ("start_ahead: agent ahead - floor", AGENT_AHEAD, FLOOR),
        (
            "start_ahead saves: agent reuse - agent ahead",
            AGENT_REUSE,
            AGENT_AHEAD,
        ),
        (
            "start_ahead, fresh sandbox: agent fresh ahead - floor",
            AGENT_FRESH_AHEAD,
            FLOOR,
        ),
        (
            "start_ahead saves, fresh sandbox: agent prepare_ahead on - agent fresh ahead",
            AGENT_ON,
            AGENT_FRESH_AHEAD,
        ),
        (
            "start_ahead in turns: agent turns - floor",
            AGENT_TURNS,
            FLOOR,
        ),
    ] {
        let Some(ra) = get(a) else {
            continue;
        };
        let (of_medians, paired) = match get(b) {
            Some(rb) => {
                let mut d: Vec<f64> = ra
                    .samples
                    .iter()
                    .zip(&rb.samples)
                    .map(|(x, y)| x.as_secs_f64() - y.as_secs_f64())
                    .collect();
                d.sort_by(f64::total_cmp);
                let m = if d.is_empty() {
                    0.0
                } else if d.len() % 2 == 1 {
                    d[d.len() / 2]
                } else {
                    (d[d.len() / 2 - 1] + d[d.len() / 2]) / 2.0
                };
                (
                    (ra.stats.median.as_secs_f64() - rb.stats.median.as_secs_f64()) * 1e3,
                    m * 1e3,
                )
            }
            None => {
                let m = ra.stats.median.as_secs_f64() * 1e3;
                (m, m)
            }
        };
        println!("| {label:<62} | {of_medians:>15.3} | {paired:>18.3} |");
    }
}

/// How many of an agent's invocations found a sandbox built ahead, from its /metrics.
fn print_starts(a: &Agent, before: &Option<(u64, u64)>, after: &Option<(u64, u64)>) {
    if let (Some((i0, c0)), Some((i1, c1))) = (before, after) {
        let (inv, cold) = (i1 - i0, c1 - c0);
        println!(
            "  {}: {inv} invocations, {cold} built their sandbox on the request path, {} started \
             one built ahead",
            a.name,
            inv - cold.min(inv)
        );
    }
}

fn print_load_table(
    names: &[&str],
    rows: &[Vec<LoadRow>],
    max_concurrency: usize,
    lib: usize,
    floor: usize,
) {
    println!(
        "| {:<38} | {:>7} | {:>7} | {:>5} | {:>6} | {:>7} | {:>11} | {:>9} | {:>9} | {:>6} | {:<16} | {:>9} | {:>7} |",
        "contender",
        "clients",
        "at once",
        "s",
        "ok",
        "req/s",
        "median (ms)",
        "p99 (ms)",
        "max (ms)",
        "host %",
        "errors",
        "x library",
        "x floor"
    );
    println!(
        "|{:-<40}|{:->9}|{:->9}|{:->7}|{:->8}|{:->9}|{:->13}|{:->11}|{:->11}|{:->8}|{:-<18}|{:->11}|{:->9}|",
        "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for (li, _) in rows[0].iter().enumerate() {
        for (ti, name) in names.iter().enumerate() {
            let r = &rows[ti][li];
            let s = Stats::of(&r.samples);
            let ratio = |of: usize| {
                let base = rows[of][li].rps();
                if base > 0.0 {
                    format!("{:.2}x", r.rps() / base)
                } else {
                    "-".into()
                }
            };
            println!(
                "| {:<38} | {:>7} | {:>7} | {:>5.1} | {:>6} | {:>7.1} | {:>11} | {:>9} | {:>9} | {:>6} | {:<16} | {:>9} | {:>7} |",
                name,
                if ti == lib || ti == floor {
                    "-".to_string()
                } else {
                    r.clients.to_string()
                },
                r.clients.min(max_concurrency),
                r.wall.as_secs_f64(),
                r.ok,
                r.rps(),
                ms(s.median),
                ms(s.p99),
                ms(s.max),
                r.host_busy_pct(),
                r.errors_text(),
                ratio(lib),
                ratio(floor)
            );
        }
    }
    println!(
        "(at once: sandboxes running at the same time at most: the agents' max_concurrency \
         {max_concurrency} caps it, further clients queue for up to limits.queue_timeout_ms and \
         then get 429, counted under errors; the library and the floor run that many threads; \
         latency over the successful requests; host %: busy share of all cores)"
    );
}

fn print_cpu_table(names: &[&str], rows: &[Vec<LoadRow>]) {
    println!(
        "\n| {:>7} | {:<38} | {:>11} | {:>10} | {:>15} | {:>14} | {:>12} |",
        "clients",
        "contender",
        "own CPU/req",
        "own faults",
        "sandbox CPU/req",
        "client CPU/req",
        "peak RSS"
    );
    println!(
        "|{:->9}|{:-<40}|{:->13}|{:->12}|{:->17}|{:->16}|{:->14}|",
        "", "", "", "", "", "", ""
    );
    for (li, _) in rows[0].iter().enumerate() {
        for (ti, name) in names.iter().enumerate() {
            let r = &rows[ti][li];
            let u = &r.usage;
            println!(
                "| {:>7} | {:<38} | {:>8} ms | {:>10} | {:>12} ms | {:>14} | {:>12} |",
                r.clients,
                name,
                r.per_req(u.server.cpu),
                r.faults_per_req(u.server.faults),
                r.per_req(u.server.children),
                u.client
                    .map_or("-".into(), |c| format!("{} ms", r.per_req(c.cpu))),
                if r.peak_rss_kib > 0 {
                    format!("{:.1} MiB", r.peak_rss_kib as f64 / 1024.0)
                } else {
                    "-".into()
                }
            );
        }
    }
    println!(
        "(per successful request, from /proc/<pid>/stat; CPU in 10 ms ticks summed over the \
         level. own = the process serving the requests: the agent's own threads (the cgroup work, \
         and the parent's side of each sandbox's clone3 when the agent clones) plus its spawn \
         helper's (which clones when there is one), or, for the library and the floor, this \
         process; own faults = its own minor page faults; sandbox = for an agent, what its \
         sandboxes' cgroups were charged (cpuacct under its cgroup root, v1; else its reaped \
         children), for the library and the floor their reaped children: each sandbox's init \
         and function; client = this process as the load generator)"
    );
}

fn print_rss(agents: &[Agent], rss: &[(String, Vec<Option<u64>>)]) {
    println!("\n== agent RSS (VmRSS of each fnlet agent process only, not its sandboxes) ==\n");
    print!("| {:<56} |", "when");
    for a in agents {
        print!(" {:>22} |", format!("{} (MiB)", a.short));
    }
    println!();
    print!("|{:-<58}|", "");
    for _ in agents {
        print!("{:->24}|", "");
    }
    println!();
    for (when, kib) in rss {
        print!("| {when:<56} |");
        for k in kib {
            let v = k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
            print!(" {v:>22} |");
        }
        println!();
    }
}

// ---------------------------------------------------------------------------------------------
// the agent process

struct Agent {
    name: String,
    /// Its sandboxes' cgroup root (`[sandbox] cgroup_root`).
    cgroup_root: String,
    /// "ahead on" or "ahead off", for narrow columns.
    short: String,
    child: Child,
    pid: u32,
    base: String,
    /// POST here to invoke the function.
    url: String,
    state_dir: PathBuf,
    log: PathBuf,
    config_text: String,
    client: reqwest::Client,
    stopped: bool,
}

impl Agent {
    /// `fnlet agent --listen 127.0.0.1:<free port> --state-dir <dir>/state --config
    /// <dir>/config.toml`, its output into `<dir>/agent.log`.
    #[allow(clippy::too_many_arguments)]
    fn start(
        name: &str,
        short: &str,
        fnlet: &Path,
        dir: &Path,
        cgroup_root: &str,
        max_concurrency: usize,
        prepare_ahead: bool,
        function: &str,
    ) -> Agent {
        fs::create_dir(dir).expect("creating the agent's directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        let state_dir = dir.join("state");
        let config = dir.join("config.toml");
        let config_text = format!(
            "shutdown_grace_s = 5.0\n\
             [sandbox]\ncgroup_root = \"{cgroup_root}\"\ntmp_mb = {TMP_MB}\npids = {PIDS}\n\
             uid_base = {UID_BASE}\nprepare_ahead = {prepare_ahead}\n\
             [defaults]\nmax_concurrency = {max_concurrency}\n"
        );
        fs::write(&config, &config_text).expect("writing the agent's config");
        let log = dir.join("agent.log");
        let out = fs::File::create(&log).expect("creating the agent's log");
        let child = Command::new(fnlet)
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
        let base = format!("http://127.0.0.1:{port}");
        Agent {
            name: name.into(),
            cgroup_root: cgroup_root.into(),
            short: short.into(),
            pid: child.id(),
            child,
            url: format!("{base}/fn/{function}"),
            base,
            state_dir,
            log,
            config_text,
            client: http_client(),
            stopped: false,
        }
    }

    fn wait_ready(&mut self, rt: &tokio::runtime::Runtime) {
        let url = format!("{}/readyz", self.base);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.stopped = true;
                self.fail(&format!("fnlet agent exited at start: {st}"));
            }
            if let Ok((200, _)) = rt.block_on(get(&self.client, &url)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail("fnlet agent not ready after 20 s");
    }

    /// (invocations, cold starts) of the function so far, from /metrics: a cold start is an
    /// invocation that found no sandbox built ahead.
    fn starts(&self, rt: &tokio::runtime::Runtime) -> Option<(u64, u64)> {
        let (status, body) = rt
            .block_on(get(&self.client, &format!("{}/metrics", self.base)))
            .ok()?;
        if status != 200 {
            return None;
        }
        let text = String::from_utf8_lossy(&body);
        let counter = |metric: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(metric))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        Some((
            counter("fnlet_invocations_total{"),
            counter("fnlet_cold_starts_total{"),
        ))
    }

    fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS")
    }

    fn status_kib(&self, key: &str) -> Option<u64> {
        status_kib(self.pid, key)
    }

    /// Prints the end of the agent's log and exits (Drop stops the agent).
    fn fail(&mut self, why: &str) -> ! {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("{why}\n--- the agent's log, last lines ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        panic!("{why}");
    }

    /// SIGTERM, then wait for the exit (up to 20 s): how long it took and the exit status.
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
