//! Density (issue 17): many idle warm Lambda instances on one host. One release `fnlet agent`
//! with the benchmark no-op (tests/fixtures/lambda-noop) deployed as a probe function (one warm
//! instance) and as FNLET_BENCH_FUNCTIONS (100) filler functions with FNLET_BENCH_PER_FUNCTION
//! (10) warm instances each (`min_instances`), all on the agent's default `[capacity]`.
//!
//! Measured: the agent's RSS, descriptors and threads, its CPU while everything idles
//! (FNLET_BENCH_IDLE_SECONDS, 10), per instance the memory its cgroup is charged (processes and
//! the kernel memory charged to it) and the PSS of its processes, the host's used memory and
//! slab per instance (noisy: the host is shared), how long the instances took to start and to
//! be reaped; and a warm call's latency (POST /fn/probe, one kept-alive client,
//! FNLET_BENCH_WARMUP 200 then FNLET_BENCH_RUNS 2000 calls) with the probe alone, with every
//! instance alive, and alone again after the fillers were reaped (A, B, A'): the ratio is B
//! over the two A's together.
//!
//! Afterwards the agent is stopped (SIGTERM) and the bench checks that no cgroup of its root
//! is left.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Stats, env_count, fnlet_binary, load_average, ms, print_machine, run_quiet};

const PROBE: &str = "probe";
const PROBE_MEMORY_MB: u64 = 32;
const FILLER_MEMORY_MB: u64 = 16;
/// Fillers are never called: a small cpu share keeps their sum within the default capacity.
const FILLER_CPUS: f64 = 0.02;

fn main() {
    let functions = env_count("FNLET_BENCH_FUNCTIONS", 100);
    let per = env_count("FNLET_BENCH_PER_FUNCTION", 10);
    let runs = env_count("FNLET_BENCH_RUNS", 2000);
    let warmup = env_count("FNLET_BENCH_WARMUP", 200);
    let idle_s = env_count("FNLET_BENCH_IDLE_SECONDS", 10) as u64;
    let fnlet = fnlet_binary();
    let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lambda-noop/bundle/bootstrap");
    if !bootstrap.is_file() {
        eprintln!(
            "{} is missing: benches/run.sh density builds it",
            bootstrap.display()
        );
        std::process::exit(1);
    }
    print_machine("density");
    let work = tempfile::Builder::new()
        .prefix("fnlet-bench-density")
        .tempdir()
        .expect("temp dir");
    let root = format!("fnlet-bench-density-{}", std::process::id());
    let mut agent = Agent::start(&fnlet, work.path(), &root);
    agent.wait_ready();
    println!(
        "  agent pid {}, {}; {functions} functions x {per} instances ({FILLER_MEMORY_MB} MiB, {FILLER_CPUS} cpus each) + the probe ({PROBE_MEMORY_MB} MiB, 1 cpu)",
        agent.pid, agent.base
    );

    let probe = bundle(
        work.path(),
        PROBE,
        PROBE_MEMORY_MB,
        1.0,
        1,
        1,
        3600.0,
        &bootstrap,
    );
    agent.deploy(&fnlet, &probe);
    agent.wait_idle(&[PROBE.to_string()], 1, Duration::from_secs(60));
    let host0 = HostMemory::read();
    let base = agent.footprint(idle_s);
    println!("  load average {}", load_average());

    let mut client = Client::new(agent.addr);
    let a1 = client.latency(&agent, warmup, runs);
    println!(
        "  A (probe alone): median {} ms, p99 {} ms, load average {}",
        ms(a1.median),
        ms(a1.p99),
        load_average()
    );

    // The fillers: min_instances each, started by the agent's warm pool.
    let names: Vec<String> = (0..functions).map(|i| format!("f{i:03}")).collect();
    let started = Instant::now();
    for name in &names {
        let b = bundle(
            work.path(),
            name,
            FILLER_MEMORY_MB,
            FILLER_CPUS,
            per as u32,
            per as u32,
            3600.0,
            &bootstrap,
        );
        agent.deploy(&fnlet, &b);
    }
    let deployed = started.elapsed();
    agent.wait_idle(&names, per as u64, Duration::from_secs(600));
    let up = started.elapsed();
    let total = functions * per;
    println!(
        "  {total} instances warm in {:.1} s ({:.1} s of it deploying {functions} functions), load average {}",
        up.as_secs_f64(),
        deployed.as_secs_f64(),
        load_average()
    );
    // Let the starts' transient work settle before measuring idleness.
    std::thread::sleep(Duration::from_secs(2));
    let host1 = HostMemory::read();
    let full = agent.footprint(idle_s);
    let usage = agent.instance_memory(&names);
    let status = agent.get_json("/v1/status");
    println!("  capacity: {}", status["capacity"]);

    let b = client.latency(&agent, warmup, runs);
    println!(
        "  B ({} instances alive): median {} ms, p99 {} ms, load average {}",
        total + 1,
        ms(b.median),
        ms(b.p99),
        load_average()
    );

    // Reaped: a new version of each filler without min_instances.
    let reap = Instant::now();
    for name in &names {
        let b = bundle(
            work.path(),
            name,
            FILLER_MEMORY_MB,
            FILLER_CPUS,
            per as u32,
            0,
            0.0,
            &bootstrap,
        );
        agent.deploy(&fnlet, &b);
    }
    let t = Instant::now();
    loop {
        let s = agent.get_json("/v1/status");
        if s["capacity"]["instances"]["committed"] == 1 {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            agent.fail(&format!("fillers not reaped: {}", s["capacity"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reaped = reap.elapsed();
    let t = Instant::now();
    let leftover = loop {
        let left = cgroup_leaves(&root)
            .into_iter()
            .filter(|l| !l.starts_with(&format!("{PROBE}-")))
            .count();
        if left == 0 || t.elapsed() > Duration::from_secs(60) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "  reaped to the probe alone in {:.1} s; filler cgroups left: {leftover}",
        reaped.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = agent.footprint(idle_s);
    let a2 = client.latency(&agent, warmup, runs);
    println!(
        "  A' (probe alone again): median {} ms, p99 {} ms, load average {}",
        ms(a2.median),
        ms(a2.p99),
        load_average()
    );
    drop(client);
    agent.stop();
    let left = cgroup_leaves(&root);
    common::remove_cgroup_dirs(std::slice::from_ref(&root));

    println!();
    println!(
        "| figure | probe alone | {} instances alive | after reaping | per instance |",
        total + 1
    );
    println!("|---|---|---|---|---|");
    let per_inst = |a: f64, b: f64| (b - a) / total as f64;
    println!(
        "| agent RSS (MiB) | {:.1} | {:.1} | {:.1} | {:.1} KiB |",
        mib(base.rss),
        mib(full.rss),
        mib(after.rss),
        per_inst(base.rss as f64, full.rss as f64) / 1024.0
    );
    println!(
        "| agent descriptors | {} | {} | {} | {:.2} |",
        base.fds,
        full.fds,
        after.fds,
        per_inst(base.fds as f64, full.fds as f64)
    );
    println!(
        "| agent threads | {} | {} | {} | - |",
        base.threads, full.threads, after.threads
    );
    println!(
        "| agent CPU while idle ({idle_s} s) | {:.3} % | {:.3} % | {:.3} % | - |",
        base.cpu_percent, full.cpu_percent, after.cpu_percent
    );
    println!(
        "| instances' CPU while idle (cgroup root) | {:.3} % | {:.3} % | {:.3} % | - |",
        base.instances_cpu_percent, full.instances_cpu_percent, after.instances_cpu_percent
    );
    println!(
        "| cgroup memory charged (instances, MiB) | - | {:.1} | - | {:.1} KiB |",
        mib(usage.cgroup_bytes),
        usage.cgroup_bytes as f64 / usage.instances.max(1) as f64 / 1024.0
    );
    println!(
        "| PSS of instances' processes (MiB) | - | {:.1} | - | {:.1} KiB ({} processes) |",
        mib(usage.rss_bytes),
        usage.rss_bytes as f64 / usage.instances.max(1) as f64 / 1024.0,
        usage.processes
    );
    println!(
        "| host memory used (MemTotal - MemAvailable, MiB; shared host) | {:.0} | {:.0} | - | {:.1} KiB |",
        mib(host0.used),
        mib(host1.used),
        per_inst(host0.used as f64, host1.used as f64) / 1024.0
    );
    println!(
        "| host slab (MiB; shared host) | {:.0} | {:.0} | - | {:.1} KiB |",
        mib(host0.slab),
        mib(host1.slab),
        per_inst(host0.slab as f64, host1.slab as f64) / 1024.0
    );
    println!();
    println!(
        "| warm call, POST /fn/probe, one client | runs | median (ms) | p99 (ms) | min (ms) | max (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, s) in [
        ("A: probe alone", a1),
        ("B: all alive", b),
        ("A': probe alone again", a2),
    ] {
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            s.n,
            ms(s.median),
            ms(s.p99),
            ms(s.min),
            ms(s.max)
        );
    }
    let a = (a1.median + a2.median) / 2;
    println!(
        "\n  B / mean(A, A') medians: {:.2}x (goal: within 1.10x); instances started in {:.1} s, reaped in {:.1} s",
        b.median.as_secs_f64() / a.as_secs_f64(),
        up.as_secs_f64(),
        reaped.as_secs_f64()
    );
    if left.is_empty() {
        println!("  after the agent stopped: no cgroup of {root} left");
    } else {
        println!("  after the agent stopped: cgroups LEFT: {left:?}");
        std::process::exit(1);
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// A bundle of the no-op named `name`.
#[allow(clippy::too_many_arguments)]
fn bundle(
    dir: &Path,
    name: &str,
    memory_mb: u64,
    cpus: f64,
    max_concurrency: u32,
    min_instances: u32,
    keep_alive_s: f64,
    bootstrap: &Path,
) -> PathBuf {
    let d = dir.join(format!("bundle-{name}-{min_instances}"));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("bundle dir");
    fs::copy(bootstrap, d.join("bootstrap")).expect("copy the no-op");
    fs::write(
        d.join("fnlet.toml"),
        format!(
            "name = \"{name}\"\nmode = \"lambda\"\npublic = true\nmemory_mb = {memory_mb}\n\
             cpus = {cpus}\ntimeout_s = 5\ninit_timeout_s = 120\nmax_concurrency = {max_concurrency}\n\
             min_instances = {min_instances}\nkeep_alive_s = {keep_alive_s}\n"
        ),
    )
    .expect("write fnlet.toml");
    d
}

/// The agent's footprint while nothing is called.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss: u64,
    fds: usize,
    threads: usize,
    cpu_percent: f64,
    instances_cpu_percent: f64,
}

struct InstanceMemory {
    instances: usize,
    cgroup_bytes: u64,
    rss_bytes: u64,
    processes: usize,
}

#[derive(Debug, Clone, Copy)]
struct HostMemory {
    used: u64,
    slab: u64,
}

impl HostMemory {
    fn read() -> HostMemory {
        let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb = |key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                * 1024
        };
        HostMemory {
            used: kb("MemTotal:").saturating_sub(kb("MemAvailable:")),
            slab: kb("Slab:"),
        }
    }
}

/// utime + stime of a process in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Nanoseconds of CPU used by the processes under the agent's cgroup root (cpuacct, v1; v2:
/// cpu.stat usage_usec).
fn root_cpu_ns(root: &str) -> u64 {
    if let Ok(v) = fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/{root}/cpuacct.usage")) {
        return v.trim().parse().unwrap_or(0);
    }
    fs::read_to_string(format!("/sys/fs/cgroup/{root}/cpu.stat"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or(0, |us| us * 1000)
}

/// Leaf cgroups (instances) under the root, by name.
fn cgroup_leaves(root: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut tops = vec![PathBuf::from("/sys/fs/cgroup").join(root)];
    if let Ok(it) = fs::read_dir("/sys/fs/cgroup") {
        tops.extend(it.filter_map(|e| e.ok()).map(|e| e.path().join(root)));
    }
    for top in tops {
        if let Ok(it) = fs::read_dir(&top) {
            out.extend(
                it.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string)),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

struct Agent {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    base: String,
    state_dir: PathBuf,
    log: PathBuf,
    root: String,
    token: Option<String>,
    stopped: bool,
}

impl Agent {
    fn start(fnlet: &Path, dir: &Path, root: &str) -> Agent {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let state_dir = dir.join("state");
        let config = dir.join("config.toml");
        // prepare_ahead off: every sandbox is then an instance (a prepared one per function
        // would add 101 sandboxes to the count); everything else is the default, [capacity]
        // included.
        fs::write(
            &config,
            format!(
                "shutdown_grace_s = 5.0\n[sandbox]\ncgroup_root = \"{root}\"\nprepare_ahead = false\n"
            ),
        )
        .expect("write the config");
        let log = dir.join("agent.log");
        let out = fs::File::create(&log).expect("agent log");
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
        Agent {
            pid: child.id(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            base: format!("http://127.0.0.1:{port}"),
            state_dir,
            log,
            root: root.into(),
            token: None,
            stopped: false,
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("{why}\nagent log (last lines):");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        self.stop();
        common::remove_cgroup_dirs(std::slice::from_ref(&self.root));
        std::process::exit(1);
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.stopped = true;
                self.fail(&format!("fnlet agent exited at start: {st}"));
            }
            if http(self.addr, "GET", "/readyz", None, b"").is_ok_and(|(s, _)| s == 200) {
                self.token = fs::read_to_string(self.state_dir.join("admin.token"))
                    .ok()
                    .map(|t| t.trim().to_string());
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.fail("the agent was not ready within 30 s");
    }

    fn deploy(&mut self, fnlet: &Path, bundle: &Path) {
        if let Err(e) = run_quiet(
            Command::new(fnlet)
                .arg("deploy")
                .arg(bundle)
                .args(["--endpoint", &self.base, "--state-dir"])
                .arg(&self.state_dir),
        ) {
            self.fail(&format!("fnlet deploy {}: {e}", bundle.display()));
        }
    }

    fn get_json(&mut self, path: &str) -> serde_json::Value {
        let token = self.token.clone().unwrap_or_default();
        match http(self.addr, "GET", path, Some(&token), b"") {
            Ok((200, body)) => serde_json::from_slice(&body).unwrap_or_default(),
            Ok((s, body)) => self.fail(&format!(
                "GET {path}: {s} {}",
                String::from_utf8_lossy(&body)
            )),
            Err(e) => self.fail(&format!("GET {path}: {e}")),
        }
    }

    /// Waits until each of `names` has `n` idle instances.
    fn wait_idle(&mut self, names: &[String], n: u64, limit: Duration) {
        let t = Instant::now();
        let mut pending: Vec<String> = names.to_vec();
        while !pending.is_empty() {
            let name = pending[0].clone();
            let v = self.get_json(&format!("/v1/functions/{name}"));
            if v["instances"]["idle"] == n {
                pending.remove(0);
                continue;
            }
            if t.elapsed() > limit {
                self.fail(&format!(
                    "{name}: not {n} idle instances within {limit:?}: {}",
                    v["instances"]
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// RSS, descriptors, threads, and CPU over `idle_s` seconds of nothing being called.
    fn footprint(&mut self, idle_s: u64) -> Footprint {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |k: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count());
        let tick = 100.0; // USER_HZ
        let (c0, r0, t0) = (cpu_ticks(self.pid), root_cpu_ns(&self.root), Instant::now());
        std::thread::sleep(Duration::from_secs(idle_s));
        let (c1, r1, wall) = (
            cpu_ticks(self.pid),
            root_cpu_ns(&self.root),
            t0.elapsed().as_secs_f64(),
        );
        Footprint {
            rss: field("VmRSS:") * 1024,
            fds,
            threads: field("Threads:") as usize,
            cpu_percent: (c1 - c0) as f64 / tick / wall * 100.0,
            instances_cpu_percent: r1.saturating_sub(r0) as f64 / 1e9 / wall * 100.0,
        }
    }

    /// What the fillers' instances are charged: their cgroups' memory usage, and the RSS of
    /// their processes.
    fn instance_memory(&self, names: &[String]) -> InstanceMemory {
        let mut m = InstanceMemory {
            instances: 0,
            cgroup_bytes: 0,
            rss_bytes: 0,
            processes: 0,
        };
        let v1 = PathBuf::from("/sys/fs/cgroup/memory").join(&self.root);
        let v2 = PathBuf::from("/sys/fs/cgroup").join(&self.root);
        for leaf in cgroup_leaves(&self.root) {
            if !names.iter().any(|n| leaf.starts_with(&format!("{n}-"))) {
                continue;
            }
            m.instances += 1;
            let usage = fs::read_to_string(v1.join(&leaf).join("memory.usage_in_bytes"))
                .or_else(|_| fs::read_to_string(v2.join(&leaf).join("memory.current")))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            m.cgroup_bytes += usage;
            let procs = fs::read_to_string(v1.join(&leaf).join("cgroup.procs"))
                .or_else(|_| fs::read_to_string(v2.join(&leaf).join("cgroup.procs")))
                .unwrap_or_default();
            for pid in procs.lines() {
                // PSS, not RSS: an instance's processes are forks of the agent, and RSS would
                // count every page they still share with it (and each other) in full.
                let status =
                    fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find(|l| l.starts_with("Pss:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                m.rss_bytes += rss * 1024;
                m.processes += 1;
            }
        }
        m
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request on a fresh connection (admin calls, readiness).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let mut c = Client::new(addr);
    c.call(method, path, token, body)
}

/// A kept-alive HTTP/1.1 connection.
struct Client {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            stream: None,
            buf: Vec::new(),
        }
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(t) = token {
            req.push_str(&format!("authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let s = self.stream.as_mut().expect("connected above");
        if let Err(e) = s.write_all(&bytes) {
            self.stream = None;
            return Err(format!("send: {e}"));
        }
        let mut chunk = [0u8; 16384];
        loop {
            if let Some((status, body, len)) = parse(&self.buf)? {
                self.buf.drain(..len);
                return Ok((status, body));
            }
            let s = self.stream.as_mut().expect("connected above");
            match s.read(&mut chunk) {
                Ok(0) => {
                    self.stream = None;
                    return Err("connection closed".into());
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    self.stream = None;
                    return Err(format!("read: {e}"));
                }
            }
        }
    }

    /// `warmup` then `runs` calls of the probe; the latencies of the timed ones.
    fn latency(&mut self, agent: &Agent, warmup: usize, runs: usize) -> Stats {
        let path = format!("/fn/{PROBE}");
        let payload = br#"{"bench":"density"}"#;
        let mut samples = Vec::with_capacity(runs);
        for i in 0..warmup + runs {
            let t = Instant::now();
            match self.call("POST", &path, None, payload) {
                Ok((200, _)) => {}
                other => {
                    eprintln!(
                        "probe call failed: {other:?} (agent log: {})",
                        agent.log.display()
                    );
                    std::process::exit(1);
                }
            }
            if i >= warmup {
                samples.push(t.elapsed());
            }
        }
        Stats::of(&samples)
    }
}

/// A whole response at the start of `buf` (content-length bodies only): status, body, bytes.
fn parse(buf: &[u8]) -> Result<Option<(u16, Vec<u8>, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let at = end + 4;
    if buf.len() < at + length {
        return Ok(None);
    }
    Ok(Some((status, buf[at..at + length].to_vec(), at + length)))
}
