//! Accepting asynchronous events durably, in one run, beside the disk's floor and a peer:
//!
//! 1. Accept latency with one client, interleaved round by round (a pause after fnlet's turn
//!    lets its worker run that turn's events first): fnlet's Invoke API with
//!    `X-Amz-Invocation-Type: Event` (one keep-alive connection; request to the 202, which the
//!    agent sends after the event's redb commit is fsync'd), the same through a second agent
//!    with `[events] backend = "nats"` (the 202 after the JetStream publish ack, from the same
//!    nats-server as the peer, replicas 1 like the peer's stream), beside the floor (a 256-byte
//!    pwrite plus fdatasync in a preallocated file on the same filesystem as the agent's state
//!    dir) and the peer (a JetStream publish with ack from a plain async-nats client to Debian's
//!    nats-server, stream on the same filesystem, work-queue retention, file storage).
//! 2. Throughput with a fixed number of clients (32; and 1), interleaved rounds of fixed
//!    length: fnlet (one connection per client, each sending its next event once the last was
//!    accepted), JetStream (one task per client, each publishing and awaiting its ack), and the
//!    floor's rate (fdatasyncs per second, one writer). Group commit shows as events per commit,
//!    from the agent's own `fnlet_events_commits_total`.
//! 3. End to end: from the 202 to the start of the run (the `START RequestId` line the agent
//!    logs when it hands the event to a warm instance of the benchmark no-op), one event at a
//!    time on an idle queue, for both backends.
//!
//! Fairness: the same payload (`{"bench":"events","n":1}`) everywhere; JetStream acks once the
//! message is in its file store, which nats-server 2.9 does not fsync per message (its default),
//! while fnlet's 202 waits for the fsync: the peer does less for its ack. On 2 cores the load
//! generator, the agent, its workers (which run the accepted events on the no-op as they come)
//! and nats-server share the CPUs.
//!
//! Run as root through `benches/run.sh events`, which installs nats-server and builds fnlet and
//! the no-op first. Environment: `FNLET_BENCH_RUNS` (latency samples per contender, default 400),
//! `FNLET_BENCH_WARMUP` (40), `FNLET_BENCH_CLIENTS` (32), `FNLET_BENCH_SECONDS` (per round and
//! contender, 3), `FNLET_BENCH_LOAD_ROUNDS` (3), `FNLET_BENCH_E2E` (end-to-end samples, 200),
//! `FNLET_BENCH_DIR` (where the agent's state, the store and the floor's file go; default
//! /var/tmp, a disk), `FNLET_BIN`, `FNLET_NOOP_BIN`, `NATS_SERVER_BIN`.

#![forbid(unsafe_code)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Stats, env_count, fnlet_binary, ms, print_machine, ratio};

const PAYLOAD: &[u8] = br#"{"bench":"events","n":1}"#;
const FUNCTION: &str = "sink";
/// The end-to-end phase's function: the same no-op, a queue of its own.
const E2E: &str = "e2e";

const FLOOR: &str = "floor: pwrite 256 B + fdatasync";
const FNLET: &str = "fnlet: Invoke API Event -> 202";
const FNLET_NATS: &str = "fnlet nats: Invoke API Event -> 202";
const NATS: &str = "JetStream: publish, await ack";
const HEALTHZ: &str = "fnlet GET /healthz (HTTP only)";

fn main() {
    let runs = env_count("FNLET_BENCH_RUNS", 400);
    let warmup = env_count("FNLET_BENCH_WARMUP", 40);
    let clients = env_count("FNLET_BENCH_CLIENTS", 32).max(1);
    let seconds = env_count("FNLET_BENCH_SECONDS", 3).max(1);
    let rounds = env_count("FNLET_BENCH_LOAD_ROUNDS", 3).max(1);
    let e2e = env_count("FNLET_BENCH_E2E", 200);
    assert!(
        nix::unistd::geteuid().is_root(),
        "the agent creates namespaces and cgroups: run as root (benches/run.sh events)"
    );
    print_machine("events");
    let base =
        PathBuf::from(std::env::var("FNLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-events-")
        .tempdir_in(&base)
        .expect("work dir");
    println!(
        "  work dir {} on {} ({})",
        work.path().display(),
        filesystem_of(work.path()),
        block_device_of(work.path())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let agent = Agent::start(&work.path().join("agent"), "fnlet-bench-events", "");
    let nats = NatsServer::start(&work.path().join("nats"));
    let js = rt.block_on(nats.jetstream());
    // The same agent on the JetStream backend, against the peer's server.
    let nagent = Agent::start(
        &work.path().join("agent-nats"),
        "fnlet-bench-events-nats",
        &format!(
            "backend = \"nats\"\n[events.nats]\nservers = [\"{}\"]\nreplicas = 1\nmax_mb = 4096\n",
            nats.url
        ),
    );
    let mut floor = Floor::new(&work.path().join("floor.dat"));
    println!(
        "  agent pid {} at {} (a Lambda no-op `{FUNCTION}`, 1 warm instance, max_concurrency 1, runs each event); nats-server {} pid {} at {}",
        agent.child.id(),
        agent.addr,
        nats.version,
        nats.child.id(),
        nats.url
    );

    // 1. latency, one client, interleaved.
    let mut conn = rt
        .block_on(Conn::open(agent.addr))
        .expect("connecting to the agent");
    let mut nconn = rt
        .block_on(Conn::open(nagent.addr))
        .expect("connecting to the nats agent");
    // Until the agent has made its stream, its Event invokes answer 503.
    let t = Instant::now();
    while let Err(e) = rt.block_on(nconn.event(FUNCTION)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the nats agent does not accept events: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
        nconn = rt
            .block_on(Conn::open(nagent.addr))
            .expect("connecting to the nats agent");
    }
    let mut samples: HashMap<&str, Vec<Duration>> = HashMap::new();
    let chunk = 20;
    let mut done = 0;
    let total = warmup + runs;
    while done < total {
        let n = chunk.min(total - done);
        let mut take = |name: &'static str, i: usize, d: Duration| {
            if done + i >= warmup {
                samples.entry(name).or_default().push(d);
            }
        };
        for i in 0..n {
            take(FLOOR, i, floor.sync_once());
        }
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(conn.event(FUNCTION)).expect("Event invoke");
            take(FNLET, i, t.elapsed());
        }
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(conn.healthz()).expect("GET /healthz");
            take(HEALTHZ, i, t.elapsed());
        }
        // Untimed: the worker runs these events and its bookkeeping reaches the disk (within
        // 100 ms) before the next contender's turn, so that no one's samples share the disk
        // with it.
        std::thread::sleep(Duration::from_millis(250));
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(nconn.event(FUNCTION))
                .expect("Event invoke (nats)");
            take(FNLET_NATS, i, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(publish(&js)).expect("JetStream publish");
            take(NATS, i, t.elapsed());
        }
        done += n;
    }
    let floor_med = Stats::of(&samples[FLOOR]).median;
    println!(
        "\n1. accept latency, one client ({runs} samples each after {warmup} warm-up, interleaved in rounds of {chunk})"
    );
    println!(
        "{:<36} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "contender", "runs", "median ms", "p99 ms", "min ms", "max ms", "vs floor"
    );
    for name in [FLOOR, FNLET, FNLET_NATS, HEALTHZ, NATS] {
        let s = Stats::of(&samples[name]);
        println!(
            "{:<36} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12}",
            name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max),
            ratio(s.median, Some(floor_med))
        );
    }

    // 2. throughput.
    println!(
        "\n2. accepted per second, {rounds} interleaved rounds of {seconds} s per contender and client count"
    );
    println!(
        "{:<36} {:>8} {:>12} {:>12} {:>14} {:>14}",
        "contender", "clients", "events/s", "accept p99", "events/commit", "vs floor rate"
    );
    let floor_rate = 1.0 / floor_med.as_secs_f64();
    // (contender, clients) -> (events, latencies, seconds, commits)
    type Load = (u64, Vec<Duration>, f64, f64);
    let mut results: HashMap<(String, usize), Load> = HashMap::new();
    for _ in 0..rounds {
        for &c in &[1, clients] {
            let commits_before = agent.metric("fnlet_events_commits_total");
            let t = Instant::now();
            let (n, lat) = rt.block_on(load_fnlet(
                agent.addr,
                c,
                Duration::from_secs(seconds as u64),
            ));
            let took = t.elapsed().as_secs_f64();
            let commits = agent.metric("fnlet_events_commits_total") - commits_before;
            let e = results.entry((FNLET.into(), c)).or_default();
            e.0 += n;
            e.1.extend(lat);
            e.2 += took;
            e.3 += commits;
            let t = Instant::now();
            let (n, lat) = rt.block_on(load_fnlet(
                nagent.addr,
                c,
                Duration::from_secs(seconds as u64),
            ));
            let took = t.elapsed().as_secs_f64();
            let e = results.entry((FNLET_NATS.into(), c)).or_default();
            e.0 += n;
            e.1.extend(lat);
            e.2 += took;
            let t = Instant::now();
            let (n, lat) = rt.block_on(load_nats(&js, c, Duration::from_secs(seconds as u64)));
            let took = t.elapsed().as_secs_f64();
            let e = results.entry((NATS.into(), c)).or_default();
            e.0 += n;
            e.1.extend(lat);
            e.2 += took;
        }
    }
    println!(
        "{:<36} {:>8} {:>12.0} {:>12} {:>14} {:>14}",
        FLOOR, 1, floor_rate, "-", "-", "1.00x"
    );
    for &c in &[1, clients] {
        for name in [FNLET, FNLET_NATS, NATS] {
            let (n, lat, secs, commits) = &results[&(name.to_string(), c)];
            let rate = *n as f64 / secs;
            let per_commit = if *commits > 0.0 {
                format!("{:.1}", *n as f64 / commits)
            } else {
                "-".into()
            };
            println!(
                "{:<36} {:>8} {:>12.0} {:>12} {:>14} {:>13.2}x",
                name,
                c,
                rate,
                ms(Stats::of(lat).p99),
                if name == FNLET {
                    per_commit
                } else {
                    "-".into()
                },
                rate / floor_rate
            );
        }
    }
    let fnlet_rate = {
        let (n, _, secs, _) = &results[&(FNLET.to_string(), clients)];
        *n as f64 / secs
    };
    let fnlet_med = Stats::of(&samples[FNLET]).median;
    println!(
        "\ngoals: one client's accept within 2x of the fsync floor: {} ({} ms vs {} ms); at {clients} clients >= 5,000 events/s: {} ({fnlet_rate:.0}/s)",
        if fnlet_med.as_secs_f64() <= 2.0 * floor_med.as_secs_f64() {
            "met"
        } else {
            "NOT met"
        },
        ms(fnlet_med),
        ms(floor_med),
        if fnlet_rate >= 5000.0 {
            "met"
        } else {
            "NOT met"
        }
    );

    // Let the workers drain what the load left (up to a minute) before the end-to-end phase,
    // which uses a function of its own, so its queue is empty either way.
    for (name, a) in [(FNLET, &agent), (FNLET_NATS, &nagent)] {
        let drained = a.wait_drained(Duration::from_secs(60));
        println!(
            "  ({name}: waited {:.1} s for {FUNCTION}'s queue to drain; {} events left in it)",
            drained.as_secs_f64(),
            a.metric(&format!(
                "fnlet_events_queue_depth{{function=\"{FUNCTION}\"}}"
            ))
        );
    }

    // 3. end to end, idle queue.
    println!(
        "\n3. end to end, 202 received -> START logged by the agent (function `{E2E}`: its own idle queue and warm no-op, one event every 20 ms)"
    );
    println!(
        "{:<36} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "", "runs", "median ms", "p99 ms", "min ms", "max ms"
    );
    for (name, a) in [
        ("fnlet 202 -> START", &agent),
        ("fnlet nats 202 -> START", &nagent),
    ] {
        end_to_end(&rt, a, name, e2e);
    }
    println!(
        "\ncommits: {} in all, {} writers per commit on average (fnlet_events_commit_batches)",
        agent.metric("fnlet_events_commits_total"),
        {
            let sum = agent.metric("fnlet_events_commit_batches_sum");
            let count = agent.metric("fnlet_events_commit_batches_count");
            if count > 0.0 {
                format!("{:.1}", sum / count)
            } else {
                "-".into()
            }
        }
    );
    drop(conn);
    drop(nconn);
    drop(agent);
    drop(nagent);
    drop(nats);
}

/// Phase 3 for one agent: `count` events to the idle `E2E`, 20 ms apart; one table row.
fn end_to_end(rt: &tokio::runtime::Runtime, agent: &Agent, name: &str, count: usize) {
    let mut conn = rt
        .block_on(Conn::open(agent.addr))
        .expect("connecting to the agent");
    let mut sent: Vec<(String, SystemTime)> = Vec::new();
    for _ in 0..count {
        let id = rt.block_on(conn.event(E2E)).expect("Event invoke");
        sent.push((id, SystemTime::now()));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
    let starts = agent.start_times(E2E);
    let found: Vec<SystemTime> = sent
        .iter()
        .filter_map(|(id, _)| starts.get(id).copied())
        .collect();
    // A run can start before the client has read its 202: the 202 goes out after the commit,
    // and so does the event to the worker.
    let before_202 = sent
        .iter()
        .filter(|(id, at)| starts.get(id).is_some_and(|s| s < at))
        .count();
    let e2e_lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| starts.get(id)?.duration_since(*at).ok())
        .collect();
    let s = Stats::of(&e2e_lat);
    println!(
        "{:<36} {:>6} {:>10} {:>10} {:>10} {:>10}",
        name,
        s.n,
        ms(s.median),
        ms(s.p99),
        ms(s.min),
        ms(s.max)
    );
    println!(
        "  ({} of {} runs started before the client had read their 202 (not in the table); {} START lines not found)",
        before_202,
        sent.len(),
        sent.len() - found.len()
    );
}

// ---------------------------------------------------------------------------------------------
// the floor

struct Floor {
    file: fs::File,
    at: u64,
}

impl Floor {
    fn new(path: &Path) -> Floor {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .expect("the floor's file");
        // Preallocated and synced once: each sample then writes data only, no size change.
        file.write_all_at(&vec![0u8; 1 << 20], 0)
            .expect("preallocate");
        file.sync_all().expect("sync");
        Floor { file, at: 0 }
    }

    fn sync_once(&mut self) -> Duration {
        let t = Instant::now();
        self.file
            .write_all_at(&[7u8; 256], self.at)
            .expect("pwrite");
        self.file.sync_data().expect("fdatasync");
        self.at = (self.at + 4096) % (1 << 20);
        t.elapsed()
    }
}

fn filesystem_of(p: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best = ("?".to_string(), 0usize);
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && p.starts_with(f[1]) && f[1].len() >= best.1 {
            best = (format!("{} {}", f[2], f[1]), f[1].len());
        }
    }
    best.0
}

fn block_device_of(p: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best = ("?".to_string(), 0usize);
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && p.starts_with(f[1]) && f[1].len() >= best.1 {
            best = (f[0].to_string(), f[1].len());
        }
    }
    best.0
}

// ---------------------------------------------------------------------------------------------
// fnlet

struct Agent {
    child: Child,
    addr: SocketAddr,
    token: String,
}

impl Agent {
    /// An agent in `dir` with its sandboxes under `cgroup_root`; `events` adds `[events]`
    /// lines.
    fn start(dir: &Path, cgroup_root: &str, events: &str) -> Agent {
        let fnlet = fnlet_binary();
        fs::create_dir(dir).expect("agent dir");
        let port = free_port();
        let state = dir.join("state");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "shutdown_grace_s = 5.0\n[sandbox]\ncgroup_root = \"{cgroup_root}\"\n\
                 [cluster]\nlisten = \"127.0.0.1:0\"\n\
                 [events]\nmax_queued_events = 10000000\nmax_queued_mb = 4096\n{events}"
            ),
        )
        .expect("config");
        let log = dir.join("agent.log");
        let out = fs::File::create(&log).expect("agent log");
        let child = Command::new(&fnlet)
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("starting fnlet agent");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = fs::read_to_string(state.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        for name in [FUNCTION, E2E] {
            let bundle = dir.join(format!("bundle-{name}"));
            fs::create_dir(&bundle).expect("bundle dir");
            fs::write(
                bundle.join("fnlet.toml"),
                format!(
                    "name = \"{name}\"\nmode = \"lambda\"\nmemory_mb = 32\ntimeout_s = 5\n\
                     max_concurrency = 1\nmin_instances = 1\nkeep_alive_s = 3600\npublic = true\n"
                ),
            )
            .expect("manifest");
            fs::copy(noop_binary(), bundle.join("bootstrap")).expect("bootstrap");
            for (p, mode) in [
                (bundle.join("bootstrap"), 0o755),
                (bundle.join("fnlet.toml"), 0o644),
                (bundle.clone(), 0o755),
            ] {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            }
            let st = Command::new(&fnlet)
                .arg("deploy")
                .arg(&bundle)
                .args(["--endpoint", &format!("http://{addr}"), "--state-dir"])
                .arg(&state)
                .stdout(Stdio::null())
                .status()
                .expect("fnlet deploy");
            assert!(st.success(), "fnlet deploy failed");
        }
        let agent = Agent { child, addr, token };
        // Warm: the one instance up.
        std::thread::sleep(Duration::from_secs(1));
        agent
    }

    fn get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.addr).expect("connect");
        let _ = write!(
            s,
            "GET {path} HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
            self.token
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn wait_drained(&self, limit: Duration) -> Duration {
        let t = Instant::now();
        let sample = format!("fnlet_events_queue_depth{{function=\"{FUNCTION}\"}}");
        while t.elapsed() < limit {
            // The gauge is refreshed every second (every 5 s with NATS).
            std::thread::sleep(Duration::from_millis(1100));
            if self.metric(&sample) == 0.0 {
                break;
            }
        }
        t.elapsed()
    }

    /// When the agent logged each run's START line of `function`, by request id (its log
    /// store's timestamps: the lines no longer go to the agent's own output).
    fn start_times(&self, function: &str) -> HashMap<String, SystemTime> {
        let text = self.get(&format!("/v1/functions/{function}/logs?tail=100000"));
        let mut out = HashMap::new();
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            let (Some(line), Some(id), Some(ts)) = (
                v["line"].as_str(),
                v["request_id"].as_str(),
                v["ts"].as_str(),
            ) else {
                continue;
            };
            if !line.starts_with("START RequestId: ") {
                continue;
            }
            if let Ok(t) =
                time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            {
                let nanos = t.unix_timestamp_nanos();
                if nanos > 0 {
                    out.insert(
                        id.to_string(),
                        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64),
                    );
                }
            }
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn noop_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FNLET_NOOP_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lambda-noop/bundle/bootstrap");
    assert!(
        p.is_file(),
        "{} is missing: benches/run.sh events builds it",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One keep-alive HTTP/1.1 connection to the agent.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    request: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            request: Vec::new(),
        })
    }

    /// `GET /healthz`: the agent's bare HTTP round trip on this connection.
    async fn healthz(&mut self) -> Result<(), String> {
        self.request.clear();
        self.request
            .extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|e| e.to_string())?;
        self.answer(b"http/1.1 200").await.map(drop)
    }

    /// One Event invoke of `function`; the request id of the 202.
    async fn event(&mut self, function: &str) -> Result<String, String> {
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "POST /2015-03-31/functions/{function}/invocations HTTP/1.1\r\nhost: x\r\n\
                 x-amz-invocation-type: Event\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n",
                PAYLOAD.len()
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(PAYLOAD);
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|e| e.to_string())?;
        self.answer(b"http/1.1 202").await
    }

    /// Reads one answer; its request id when its status line starts with `expect`.
    async fn answer(&mut self, expect: &[u8]) -> Result<String, String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() < end + 4 + len {
                    self.read_more().await?;
                    continue;
                }
                let id = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-amzn-requestid:"))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default();
                let ok = head.as_bytes().starts_with(expect);
                let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                self.buf.drain(..end + 4 + len);
                if !ok {
                    return Err(format!("{}: {body}", head.lines().next().unwrap_or("")));
                }
                return Ok(id);
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the agent closed the connection".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

async fn load_fnlet(addr: SocketAddr, clients: usize, length: Duration) -> (u64, Vec<Duration>) {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (count, stop) = (count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(mut c) = Conn::open(addr).await else {
                return lat;
            };
            // Bounded in time and count.
            while !stop.load(Ordering::Relaxed) && lat.len() < 1_000_000 {
                let t = Instant::now();
                if let Err(e) = c.event(FUNCTION).await {
                    eprintln!("event: {e}");
                    break;
                }
                lat.push(t.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (count.load(Ordering::Relaxed), all)
}

// ---------------------------------------------------------------------------------------------
// JetStream

struct NatsServer {
    child: Child,
    url: String,
    version: String,
}

impl NatsServer {
    fn start(dir: &Path) -> NatsServer {
        let bin =
            std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        fs::create_dir(dir).expect("nats dir");
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| panic!("{bin}: {e} (benches/run.sh events installs nats-server)"));
        let port = free_port();
        let log = fs::File::create(dir.join("nats.log")).expect("nats log");
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            version,
        }
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.url)
            .await
            .expect("connect to nats");
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["events.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("creating the stream");
        js
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn publish(js: &async_nats::jetstream::Context) -> Result<(), String> {
    js.publish("events.sink", bytes::Bytes::from_static(PAYLOAD))
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn load_nats(
    js: &async_nats::jetstream::Context,
    clients: usize,
    length: Duration,
) -> (u64, Vec<Duration>) {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (count, stop, js) = (count.clone(), stop.clone(), js.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) && lat.len() < 1_000_000 {
                let t = Instant::now();
                if let Err(e) = publish(&js).await {
                    eprintln!("publish: {e}");
                    break;
                }
                lat.push(t.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (count.load(Ordering::Relaxed), all)
}
