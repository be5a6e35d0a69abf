//! Publishing to a topic, in one run, beside the async accept it is built on and the events
//! peer (BENCHMARKS.md names no peer for topics; the one for accepting an event durably is a
//! JetStream publish with ack):
//!
//! 1. Publish latency with one client, interleaved round by round: a structured CloudEvent
//!    `POST /v1/topics/one` (1 subscriber) and `/v1/topics/ten` (10 subscribers), request to
//!    the 202 (sent once every subscriber's async event is fsync'd, in one commit), beside the
//!    same data as an Invoke API Event (one async event) and a JetStream publish with ack
//!    (Debian's nats-server, a plain async-nats client, file storage, work-queue retention).
//! 2. Publish to start: from sending the publish to the `START RequestId` line the agent logs
//!    when it hands each subscriber's event to a warm instance of the benchmark no-op (one
//!    publish every 30 ms, idle queues): per delivery, and to the last of the ten.
//! 3. Publishes per second at a fixed number of clients (32), interleaved rounds of fixed
//!    length: topic `one`, topic `ten`, the Invoke API Event, JetStream.
//!
//! Fairness: the same data (`{"bench":"events","n":1}`) everywhere (a topic publish wraps it
//! in a CloudEvent with a fresh id each time, or it would be a duplicate). JetStream acks once
//! the message is in its file store, which nats-server 2.9 does not fsync per message, while
//! fnlet's 202 waits for the fsync. On 2 cores the load generator, the agent, its workers
//! (which run the events on the no-ops as they come) and nats-server share the CPUs.
//!
//! Run as root through `benches/run.sh topics`, which installs nats-server and builds fnlet and
//! the no-op first. Environment: `FNLET_BENCH_RUNS` (latency samples per contender, default
//! 300), `FNLET_BENCH_WARMUP` (30), `FNLET_BENCH_CLIENTS` (32), `FNLET_BENCH_SECONDS` (per
//! round and contender, 3), `FNLET_BENCH_LOAD_ROUNDS` (3), `FNLET_BENCH_E2E` (publishes per
//! topic in phase 2, 200), `FNLET_BENCH_DIR` (default /var/tmp, a disk), `FNLET_BIN`,
//! `FNLET_NOOP_BIN`, `NATS_SERVER_BIN`.

#![forbid(unsafe_code)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Stats, env_count, fnlet_binary, load_average, ms, print_machine, ratio};

const DATA: &str = r#"{"bench":"events","n":1}"#;
/// Subscribers: `s0` takes `one`; `s0`..`s9` take `ten`. A function of its own for the Event
/// invokes.
const SUBSCRIBERS: usize = 10;
const EVENT_FN: &str = "direct";

const ONE: &str = "fnlet: publish, 1 subscriber -> 202";
const TEN: &str = "fnlet: publish, 10 subscribers -> 202";
const EVENT: &str = "fnlet: Invoke API Event -> 202";
const NATS: &str = "JetStream: publish, await ack";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn main() {
    let runs = env_count("FNLET_BENCH_RUNS", 300);
    let warmup = env_count("FNLET_BENCH_WARMUP", 30);
    let clients = env_count("FNLET_BENCH_CLIENTS", 32).max(1);
    let seconds = env_count("FNLET_BENCH_SECONDS", 3).max(1);
    let rounds = env_count("FNLET_BENCH_LOAD_ROUNDS", 3).max(1);
    let e2e = env_count("FNLET_BENCH_E2E", 200);
    assert!(
        nix::unistd::geteuid().is_root(),
        "the agent creates namespaces and cgroups: run as root (benches/run.sh topics)"
    );
    print_machine("topics");
    let base =
        PathBuf::from(std::env::var("FNLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-topics-")
        .tempdir_in(&base)
        .expect("work dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let agent = Agent::start(&work.path().join("agent"));
    let _ = TOKEN.set(agent.token.clone());
    let nats = NatsServer::start(&work.path().join("nats"));
    let js = rt.block_on(nats.jetstream());
    println!(
        "  work dir {}; agent pid {} at {} ({SUBSCRIBERS} Lambda no-ops s0..s9, 1 warm instance each, max_concurrency 1; `one` <- s0, `ten` <- s0..s9); nats-server {} pid {}",
        work.path().display(),
        agent.child.id(),
        agent.addr,
        nats.version,
        nats.child.id(),
    );

    // 1. latency, one client, interleaved.
    let mut conn = rt.block_on(Conn::open(agent.addr)).expect("connect");
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
        for (name, topic) in [(ONE, "one"), (TEN, "ten")] {
            for i in 0..n {
                let t = Instant::now();
                rt.block_on(conn.publish(topic)).expect("publish");
                take(name, i, t.elapsed());
            }
            // Untimed: the workers run what this turn made before the next turn.
            std::thread::sleep(Duration::from_millis(300));
        }
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(conn.event()).expect("Event invoke");
            take(EVENT, i, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..n {
            let t = Instant::now();
            rt.block_on(publish_nats(&js)).expect("JetStream publish");
            take(NATS, i, t.elapsed());
        }
        done += n;
    }
    let event_med = Stats::of(&samples[EVENT]).median;
    let nats_med = Stats::of(&samples[NATS]).median;
    println!(
        "\n1. publish latency, one client ({runs} samples each after {warmup} warm-up, interleaved in rounds of {chunk}; load average {})",
        load_average()
    );
    println!(
        "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "contender", "runs", "median ms", "p99 ms", "min ms", "max ms", "vs Event", "vs NATS"
    );
    for name in [ONE, TEN, EVENT, NATS] {
        let s = Stats::of(&samples[name]);
        println!(
            "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            name,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max),
            ratio(s.median, Some(event_med)),
            ratio(s.median, Some(nats_med)),
        );
    }
    agent.wait_drained(Duration::from_secs(60));

    // 2. publish to start, idle queues.
    let mut sent: Vec<(&str, Vec<String>, SystemTime)> = Vec::new();
    for i in 0..2 * e2e {
        let topic = if i % 2 == 0 { "one" } else { "ten" };
        let at = SystemTime::now();
        let ids = rt.block_on(conn.publish(topic)).expect("publish");
        sent.push((topic, ids, at));
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    let starts = agent.start_times(&rt);
    if let Some((_, ids, _)) = sent
        .iter()
        .find(|(_, ids, _)| ids.iter().any(|id| !starts.contains_key(id)))
    {
        let log = fs::read_to_string(&agent.log).unwrap_or_default();
        let id = ids
            .iter()
            .find(|id| !starts.contains_key(*id))
            .cloned()
            .unwrap_or_default();
        println!(
            "  (no START found for {id}; its log lines: {:?}; {} START lines in all)",
            log.lines()
                .filter(|l| l.contains(&id))
                .take(3)
                .collect::<Vec<_>>(),
            starts.len()
        );
    }
    println!(
        "\n2. publish sent -> START logged by the agent, one publish every 30 ms, idle queues, warm no-ops ({e2e} publishes per topic, alternating; load average {})",
        load_average()
    );
    println!(
        "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "", "runs", "median ms", "p99 ms", "min ms", "max ms", "missing"
    );
    for (label, topic, last) in [
        ("1 subscriber", "one", false),
        ("10 subscribers, each delivery", "ten", false),
        ("10 subscribers, the last to start", "ten", true),
    ] {
        let mut lat = Vec::new();
        let mut missing = 0;
        for (_, ids, at) in sent.iter().filter(|(t, _, _)| *t == topic) {
            let found: Vec<Duration> = ids
                .iter()
                .filter_map(|id| starts.get(id)?.duration_since(*at).ok())
                .collect();
            missing += ids.len() - found.len();
            if last {
                if found.len() == ids.len()
                    && let Some(m) = found.iter().max()
                {
                    lat.push(*m);
                }
            } else {
                lat.extend(found);
            }
        }
        let s = Stats::of(&lat);
        println!(
            "{:<40} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
            label,
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max),
            missing
        );
    }

    // 3. throughput.
    println!(
        "\n3. publishes (or events) accepted per second, {clients} clients, {rounds} interleaved rounds of {seconds} s per contender"
    );
    type Load = (u64, Vec<Duration>, f64);
    let mut results: HashMap<&str, Load> = HashMap::new();
    let length = Duration::from_secs(seconds as u64);
    for _ in 0..rounds {
        for name in [ONE, TEN, EVENT, NATS] {
            let t = Instant::now();
            let (n, lat) = match name {
                ONE => rt.block_on(load_fnlet(agent.addr, clients, length, Some("one"))),
                TEN => rt.block_on(load_fnlet(agent.addr, clients, length, Some("ten"))),
                EVENT => rt.block_on(load_fnlet(agent.addr, clients, length, None)),
                _ => rt.block_on(load_nats(&js, clients, length)),
            };
            let e = results.entry(name).or_default();
            e.0 += n;
            e.1.extend(lat);
            e.2 += t.elapsed().as_secs_f64();
        }
    }
    let rate = |name: &str| results[name].0 as f64 / results[name].2;
    println!(
        "{:<40} {:>12} {:>12} {:>12} {:>10} {:>10}   (load average {})",
        "contender",
        "per second",
        "events/s",
        "202 p99 ms",
        "vs Event",
        "vs NATS",
        load_average()
    );
    for name in [ONE, TEN, EVENT, NATS] {
        let per_publish = if name == TEN { SUBSCRIBERS as f64 } else { 1.0 };
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>12} {:>9.2}x {:>9.2}x",
            name,
            rate(name),
            rate(name) * per_publish,
            ms(Stats::of(&results[name].1).p99),
            rate(name) / rate(EVENT),
            rate(name) / rate(NATS),
        );
    }
    println!(
        "\ncounted by the agent: {} publishes, {} fan-outs",
        agent.metric_sum("fnlet_topic_publishes_total"),
        agent.metric_sum("fnlet_topic_fanouts_total"),
    );
    drop(conn);
    drop(agent);
    drop(nats);
}

// ---------------------------------------------------------------------------------------------
// fnlet

struct Agent {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    token: String,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let fnlet = fnlet_binary();
        fs::create_dir(dir).expect("agent dir");
        let port = free_port();
        let state = dir.join("state");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            "shutdown_grace_s = 5.0\n[sandbox]\ncgroup_root = \"fnlet-bench-topics\"\n\
             [cluster]\nlisten = \"127.0.0.1:0\"\n\
             [events]\nmax_queued_events = 10000000\nmax_queued_mb = 4096\n",
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
        let names: Vec<String> = (0..SUBSCRIBERS)
            .map(|i| format!("s{i}"))
            .chain([EVENT_FN.to_string()])
            .collect();
        for (i, name) in names.iter().enumerate() {
            let triggers = match i {
                0 => "[[triggers]]\ntopic = \"one\"\n[[triggers]]\ntopic = \"ten\"\n",
                i if i < SUBSCRIBERS => "[[triggers]]\ntopic = \"ten\"\n",
                _ => "",
            };
            let bundle = dir.join(format!("bundle-{name}"));
            fs::create_dir(&bundle).expect("bundle dir");
            fs::write(
                bundle.join("fnlet.toml"),
                format!(
                    "name = \"{name}\"\nmode = \"lambda\"\nmemory_mb = 32\ntimeout_s = 5\n\
                     max_concurrency = 1\nmin_instances = 1\nkeep_alive_s = 3600\npublic = true\n\
                     {triggers}"
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
        let agent = Agent {
            child,
            addr,
            log,
            token,
        };
        std::thread::sleep(Duration::from_secs(2));
        agent
    }

    fn get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.addr).expect("connect");
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
            self.token
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The sum of a metric's samples over all labels.
    fn metric_sum(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until no async event is stored (the depth gauges, refreshed every second).
    fn wait_drained(&self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1100));
            if self.metric_sum("fnlet_events_queue_depth") == 0.0 {
                return;
            }
        }
    }

    /// When each run started, by request id: the `START RequestId` lines of the subscribers'
    /// logs (`GET /v1/functions/{name}/logs`; a line's time is when the agent handed the event
    /// to the instance).
    fn start_times(&self, rt: &tokio::runtime::Runtime) -> HashMap<String, SystemTime> {
        let client = reqwest::Client::new();
        let mut out = HashMap::new();
        for i in 0..SUBSCRIBERS {
            let url = format!("http://{}/v1/functions/s{i}/logs?tail=100000", self.addr);
            let text = rt
                .block_on(async {
                    client
                        .get(&url)
                        .bearer_auth(&self.token)
                        .send()
                        .await?
                        .text()
                        .await
                })
                .unwrap_or_default();
            for l in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                    continue;
                };
                let (Some(line), Some(ts), Some(id)) = (
                    v["line"].as_str(),
                    v["ts"].as_str(),
                    v["request_id"].as_str(),
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
        "{} is missing: benches/run.sh topics builds it",
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

/// One keep-alive HTTP/1.1 connection to the agent, with the admin token.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    request: Vec<u8>,
    token: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let token = TOKEN.get().cloned().unwrap_or_default();
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            request: Vec::new(),
            token,
        })
    }

    /// Publishes one structured event (a fresh id) to `topic`; the deliveries' request ids.
    async fn publish(&mut self, topic: &str) -> Result<Vec<String>, String> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"specversion":"1.0","id":"b{id}","source":"/bench","type":"bench.event","data":{DATA}}}"#
        );
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "POST /v1/topics/{topic} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
                 content-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n",
                self.token,
                body.len()
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(body.as_bytes());
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|e| e.to_string())?;
        let (_, body) = self.answer(b"http/1.1 202").await?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok(v["events"][0]["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["request_id"].as_str().map(str::to_string))
            .collect())
    }

    /// One Event invoke of the function of its own; the request id of the 202.
    async fn event(&mut self) -> Result<String, String> {
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "POST /2015-03-31/functions/{EVENT_FN}/invocations HTTP/1.1\r\nhost: x\r\n\
                 x-amz-invocation-type: Event\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n",
                DATA.len()
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(DATA.as_bytes());
        self.stream
            .write_all(&self.request)
            .await
            .map_err(|e| e.to_string())?;
        self.answer(b"http/1.1 202").await.map(|(id, _)| id)
    }

    /// Reads one answer: (request id header, body), when its status line starts with `expect`.
    async fn answer(&mut self, expect: &[u8]) -> Result<(String, String), String> {
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
                return Ok((id, body));
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 8192];
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

/// The admin token, for connections opened by the load tasks.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `clients` connections publishing to `topic` (None: Event invokes), each its next once the
/// last was accepted, for `length`.
async fn load_fnlet(
    addr: SocketAddr,
    clients: usize,
    length: Duration,
    topic: Option<&'static str>,
) -> (u64, Vec<Duration>) {
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
                let r = match topic {
                    Some(topic) => c.publish(topic).await.map(drop),
                    None => c.event().await.map(drop),
                };
                if let Err(e) = r {
                    eprintln!("load: {e}");
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
// JetStream (as benches/events.rs)

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
            .unwrap_or_else(|e| panic!("{bin}: {e} (benches/run.sh topics installs nats-server)"));
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

async fn publish_nats(js: &async_nats::jetstream::Context) -> Result<(), String> {
    js.publish("events.sink", bytes::Bytes::from_static(DATA.as_bytes()))
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
                if let Err(e) = publish_nats(&js).await {
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
