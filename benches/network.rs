//! Functions' egress: what it costs, measured with the isolate library and the agent's own
//! network code (`fnlet::network::Network`), side by side and interleaved.
//!
//! 1. Cold start of a prepared sandbox (`start` to the exit of /bin/true) with egress against
//!    the same without (goal: within 10 %). The veth, address and rules are made while the
//!    sandbox is prepared, so the start itself does the same work either way.
//! 2. Preparing: `prepare` alone against `prepare` + `Network::attach` (veth pair, address,
//!    nftables entries): the added cost per instance, paid ahead of time.
//! 3. An HTTP GET loop (curl, one keep-alive connection, FNLET_BENCH_GETS small answers; and
//!    FNLET_BENCH_BIG_GETS answers of 8 MiB) from a function against the same curl on the host,
//!    to the same server in an upstream namespace of the bench's own (goal: >= 0.8x the host's
//!    rate). On 2 cores the server, curl and the kernel share the CPUs on both sides.
//!
//! Run as root: `benches/run.sh network`. FNLET_BENCH_RUNS (default 200) rounds for 1 and 2,
//! FNLET_BENCH_LOOPS (default 10) rounds for 3. Every address is in the bench's own namespaces
//! (100.93.X.0/24 for instances, 198.19.X.0/30 to the upstream); nothing leaves the host.

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fnlet::network::{FunctionNetwork, Network, policy::Egress};
use isolate::{Isolator, IsolatorConfig, Limits, PreparedSandbox, SandboxSpec, StdioSpec};

use common::{Stats, env_count, ms, print_machine, ratio};

const ROLE_ENV: &str = "FNLET_BENCH_NETWORK_ROLE";
const SMALL: usize = 1024;
const BIG: usize = 8 << 20;

/// The upstream's HTTP server (this binary again, inside the upstream namespace): answers
/// GET /small with 1 KiB and anything else with 8 MiB, keep-alive.
fn server_main(ip: &str) -> ! {
    let l = TcpListener::bind((ip, 8080)).unwrap_or_else(|e| {
        eprintln!("upstream server: bind {ip}:8080: {e}");
        std::process::exit(1)
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    let small = answer(SMALL);
    let big = answer(BIG);
    let (small, big) = (Arc::new(small), Arc::new(big));
    for s in l.incoming().flatten() {
        let (small, big) = (small.clone(), big.clone());
        std::thread::spawn(move || serve(s, &small, &big));
    }
    std::process::exit(0)
}

fn answer(len: usize) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ncontent-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    v.resize(v.len() + len, b'x');
    v
}

fn serve(mut s: TcpStream, small: &[u8], big: &[u8]) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let body = if head.starts_with("GET /small") {
                small
            } else {
                big
            };
            if s.write_all(body).is_err() {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status();
    assert!(st.is_ok_and(|s| s.success()), "{cmd}");
}

/// The upstream namespace, its veth, and its server.
struct Upstream {
    ns: String,
    host_if: String,
    ip: Ipv4Addr,
    server: Child,
}

impl Upstream {
    fn start(tag: u32) -> Upstream {
        let ns = format!("fnlet-bench-up-{tag}");
        let host_if = format!("fnb{:05x}h", tag & 0xfffff);
        let peer = format!("fnb{:05x}u", tag & 0xfffff);
        let net = 1 + (tag % 250) as u8;
        let ip = Ipv4Addr::new(198, 19, net, 2);
        let host_ip = Ipv4Addr::new(198, 19, net, 1);
        sh(&format!(
            "ip netns add {ns} && ip link add {host_if} type veth peer name {peer} && \
             ip link set {peer} netns {ns} && ip addr add {host_ip}/30 dev {host_if} && \
             ip link set {host_if} up && ip -n {ns} link set lo up && \
             ip -n {ns} addr add {ip}/30 dev {peer} && ip -n {ns} link set {peer} up && \
             ip -n {ns} route add default via {host_ip}"
        ));
        let exe = std::env::current_exe().expect("the bench executable");
        let mut server = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(exe)
            .arg(ip.to_string())
            .env(ROLE_ENV, "server")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the upstream server");
        let mut line = [0u8; 6];
        let _ = server.stdout.take().map(|mut o| o.read_exact(&mut line));
        assert_eq!(&line, b"ready\n", "the upstream server did not start");
        Upstream {
            ns,
            host_if,
            ip,
            server,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let host_ip = Ipv4Addr::from(u32::from(self.ip) - 1).to_string();
        let _ = Command::new("conntrack")
            .args(["-D", "-s", &host_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn spec(name: &str, program: &str, args: &[String]) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        program: program.into(),
        args: args.to_vec(),
        limits: Limits {
            memory_bytes: Some(256 << 20),
            cpus: Some(2.0),
            pids: Some(64),
            nofile: 1024,
        },
        uid: 200_950,
        gid: 200_950,
        stdio: StdioSpec {
            stdin: isolate::Stdio::Null,
            stdout: isolate::Stdio::Piped,
            stderr: isolate::Stdio::Null,
        },
        ..Default::default()
    }
}

fn prepared(
    iso: &Isolator,
    net: Option<(&Arc<Network>, &FunctionNetwork)>,
    s: &SandboxSpec,
) -> PreparedSandbox {
    let mut p = iso.prepare(s).expect("prepare");
    if let Some((network, f)) = net {
        network.attach(f, &mut p).expect("attach");
    }
    p
}

/// Starts a prepared sandbox and waits for its exit; returns its stdout.
fn run(p: PreparedSandbox) -> String {
    let mut sb = p.start(None).expect("start");
    let out: Option<OwnedFd> = sb.take_stdout();
    let mut text = String::new();
    if let Some(fd) = out {
        let _ = std::fs::File::from(fd).read_to_string(&mut text);
    }
    let o = sb.wait_blocking().expect("wait");
    assert!(o.status.success(), "exit {:?}: {text}", o.status);
    text
}

/// (median, p99) of durations, as ms strings.
fn row(name: &str, what: &str, s: &[Duration], peer: Option<Duration>) {
    let st = Stats::of(s);
    println!(
        "  {name:<28} {:>5} {:>9} {:>9} {:>9} {:>7}   {what}",
        st.n,
        ms(st.median),
        ms(st.p99),
        ms(st.max),
        ratio(st.median, peer)
    );
}

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("server") {
        let ip = std::env::args().nth(1).unwrap_or_default();
        server_main(&ip);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_count("FNLET_BENCH_RUNS", 200);
    let loops = env_count("FNLET_BENCH_LOOPS", 10);
    let gets = env_count("FNLET_BENCH_GETS", 2000);
    let big_gets = env_count("FNLET_BENCH_BIG_GETS", 20);
    print_machine("network (egress)");
    let tag = std::process::id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio");
    let state = tempfile::tempdir().expect("tempdir");
    let net_index = 1 + (tag % 250);
    let config = fnlet::config::NetworkConfig {
        bridge: format!("fnb{:05x}", tag & 0xfffff),
        range: format!("100.93.{net_index}.0/24"),
        ..Default::default()
    };
    let network = {
        let _g = rt.enter();
        Network::new(&config, state.path()).expect("the function network")
    };
    let up = Upstream::start(tag);
    let iso = Isolator::new(IsolatorConfig {
        cgroup_root: format!("fnlet-bench-network-{tag}"),
        best_effort_limits: true,
        ..Default::default()
    })
    .expect("isolator (run as root)");
    let f = FunctionNetwork {
        function: "bench".into(),
        egress: Egress::Rules(vec![
            fnlet::network::policy::parse_rule(&format!("{}:8080", up.ip)).expect("rule"),
        ]),
        rate_mbit: None,
        max_connections: 1024,
    };
    let with = Some((&network, &f));
    let truth = spec("bench", "/bin/true", &[]);

    // 1 and 2, interleaved: prepare (timed), prepare + attach (timed), then the starts.
    let (mut prep, mut prep_net, mut cold, mut cold_net) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs + 10 {
        let t = Instant::now();
        let a = prepared(&iso, None, &truth);
        let d_prep = t.elapsed();
        let t = Instant::now();
        let b = prepared(&iso, with, &truth);
        let d_prep_net = t.elapsed();
        // Alternate who starts first.
        let (d_cold, d_cold_net) = if i % 2 == 0 {
            let t = Instant::now();
            run(a);
            let x = t.elapsed();
            let t = Instant::now();
            run(b);
            (x, t.elapsed())
        } else {
            let t = Instant::now();
            run(b);
            let y = t.elapsed();
            let t = Instant::now();
            run(a);
            (t.elapsed(), y)
        };
        if i >= 10 {
            prep.push(d_prep);
            prep_net.push(d_prep_net);
            cold.push(d_cold);
            cold_net.push(d_cold_net);
        }
    }
    // Wait for the released instances' cleanup before the throughput phase.
    let deadline = Instant::now() + Duration::from_secs(30);
    while network.in_use() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!();
    println!(
        "cold start and preparation ({runs} rounds after 10 of warm-up, interleaved; /bin/true, uid {}, 256 MiB, 2 cpus):",
        truth.uid
    );
    println!(
        "  {:<28} {:>5} {:>9} {:>9} {:>9} {:>7}   what",
        "name", "runs", "median ms", "p99 ms", "max ms", "ratio"
    );
    let cold_m = Stats::of(&cold).median;
    row(
        "cold start, no egress",
        "PreparedSandbox::start to exit (only lo)",
        &cold,
        None,
    );
    row(
        "cold start, egress",
        "the same, the sandbox holding a veth, address, rules",
        &cold_net,
        Some(cold_m),
    );
    let prep_m = Stats::of(&prep).median;
    row("prepare, no egress", "Isolator::prepare", &prep, None);
    row(
        "prepare + network",
        "Isolator::prepare + Network::attach",
        &prep_net,
        Some(prep_m),
    );
    let added = Stats::of(&prep_net).median.saturating_sub(prep_m);
    println!(
        "  network added per instance (median difference): {} ms, paid while preparing",
        ms(added)
    );

    // 3: the GET loops.
    let small_args = |n: usize| -> Vec<String> {
        vec![
            "-sS".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{time_total}\\n".into(),
            format!("http://{}:8080/small?[1-{n}]", up.ip),
        ]
    };
    let big_args = |n: usize| -> Vec<String> {
        vec![
            "-sS".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{time_total}\\n".into(),
            format!("http://{}:8080/big?[1-{n}]", up.ip),
        ]
    };
    // curl's own time for each transfer (process start-up left out on both sides).
    let times = |out: &str| -> Vec<Duration> {
        out.lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64)
            .collect()
    };
    let host = |args: &[String]| -> Vec<Duration> {
        let out = Command::new("curl")
            .args(args)
            .output()
            .expect("curl on the host");
        assert!(out.status.success(), "host curl: {out:?}");
        times(&String::from_utf8_lossy(&out.stdout))
    };
    let in_fn = |args: &[String]| -> Vec<Duration> {
        let p = prepared(&iso, with, &spec("bench", "/usr/bin/curl", args));
        times(&run(p))
    };
    // The same curl run by the host in a function's network namespace (nsenter --net): the
    // function's network path without the rest of the sandbox (seccomp, cgroup, uid, mounts).
    let in_netns = |args: &[String]| -> Vec<Duration> {
        let p = prepared(&iso, with, &spec("bench", "/bin/true", &[]));
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", p.pid()))
            .arg("--")
            .arg("/usr/bin/curl")
            .args(args)
            .output()
            .expect("curl in the function's netns");
        assert!(out.status.success(), "netns curl: {out:?}");
        drop(p);
        times(&String::from_utf8_lossy(&out.stdout))
    };
    let total = |v: &[Duration]| v.iter().sum::<Duration>();
    // Small: every request's time; big: each loop's total.
    let (mut h_small, mut f_small, mut h_big, mut f_big) = (vec![], vec![], vec![], vec![]);
    let mut n_small = vec![];
    let (sa, ba) = (small_args(gets), big_args(big_gets));
    for i in 0..loops + 1 {
        // The order of the three small loops rotates round by round.
        let (hs, fs, ns) = match i % 3 {
            0 => {
                let hs = host(&sa);
                let fs = in_fn(&sa);
                (hs, fs, in_netns(&sa))
            }
            1 => {
                let fs = in_fn(&sa);
                let ns = in_netns(&sa);
                (host(&sa), fs, ns)
            }
            _ => {
                let ns = in_netns(&sa);
                let hs = host(&sa);
                (hs, in_fn(&sa), ns)
            }
        };
        let (hb, fb) = if i % 2 == 0 {
            (host(&ba), in_fn(&ba))
        } else {
            let fb = in_fn(&ba);
            (host(&ba), fb)
        };
        if i >= 1 {
            h_small.extend(hs);
            f_small.extend(fs);
            n_small.extend(ns);
            h_big.push(total(&hb));
            f_big.push(total(&fb));
        }
    }
    let mb = |n: usize, d: Duration| (n * BIG) as f64 / d.as_secs_f64() / 1e6;
    let m = |v: &[Duration]| Stats::of(v).median;
    let (hs, fs, ns) = (
        Stats::of(&h_small),
        Stats::of(&f_small),
        Stats::of(&n_small),
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Requests one after another on one connection: the loop's rate is 1 / time per request.
    let per_s = |d: Duration| 1.0 / d.as_secs_f64();
    let mean_rate = |v: &[Duration]| v.len() as f64 / total(v).as_secs_f64();
    println!();
    println!(
        "HTTP GET loops to the upstream namespace ({loops} rounds after 1 of warm-up, interleaved; curl, one keep-alive connection; the same curl binary on both sides):"
    );
    println!(
        "  {:<34} {:>16} {:>16} {:>7}",
        "loop", "host", "function", "function/host"
    );
    println!(
        "  {:<34} {:>13.1} us {:>13.1} us {:>6.2}x",
        format!("GET 1 KiB, median ({} requests)", hs.n),
        us(hs.median),
        us(fs.median),
        fs.median.as_secs_f64() / hs.median.as_secs_f64()
    );
    println!(
        "  {:<34} {:>13.1} us {:>13.1} us {:>6.2}x",
        "GET 1 KiB, p99",
        us(hs.p99),
        us(fs.p99),
        fs.p99.as_secs_f64() / hs.p99.as_secs_f64()
    );
    println!(
        "  {:<34} {:>12.0} r/s {:>12.0} r/s {:>6.2}x",
        "GET 1 KiB loop rate (1/median)",
        per_s(hs.median),
        per_s(fs.median),
        per_s(fs.median) / per_s(hs.median)
    );
    println!(
        "  {:<34} {:>13.1} us {:>13.1} us {:>6.2}x   (curl run by the host in the function's netns: its network path without the sandbox)",
        "GET 1 KiB, netns only, median",
        us(hs.median),
        us(ns.median),
        ns.median.as_secs_f64() / hs.median.as_secs_f64()
    );
    println!(
        "  {:<34} {:>12.0} r/s {:>12.0} r/s {:>6.2}x",
        "GET 1 KiB loop rate (mean)",
        mean_rate(&h_small),
        mean_rate(&f_small),
        mean_rate(&f_small) / mean_rate(&h_small)
    );
    println!(
        "  {:<34} {:>11.0} MB/s {:>11.0} MB/s {:>6.2}x",
        format!("{big_gets} x GET 8 MiB (median loop)"),
        mb(big_gets, m(&h_big)),
        mb(big_gets, m(&f_big)),
        mb(big_gets, m(&f_big)) / mb(big_gets, m(&h_big))
    );
    println!(
        "  (the function's path: its veth, the bridge, nftables filter and masquerade, forwarding, the upstream's veth; the host's: the upstream's veth)"
    );

    drop(up);
    let deadline = Instant::now() + Duration::from_secs(30);
    while network.in_use() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = network.stop() {
        eprintln!("removing the bench's network: {e}");
    }
    let _ = iso.reap_stale();
    let _ = iso.remove_root();
}
