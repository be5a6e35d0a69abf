//! Functions' egress end to end, on the real agent: an upstream network namespace of the
//! test's own (an HTTP server, a TCP echo, a DNS resolver), routed from the host, and
//! functions with different policies that try to reach it, the host, another instance and the
//! cloud metadata address. Nothing is sent anywhere but the test's own namespaces: the only
//! function with `egress = "all"` is pointed at the upstream, and 169.254.169.254 is routed
//! to the upstream too for as long as the test runs, so that a leak would land there.
//!
//! One agent serves every case (each case is a function), to keep the wall time short.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{self, Agent, Fixture, Settings};
use common::*;

/// The host's `net.ipv4.ip_forward`, which an agent turns on while its instances need it and
/// puts back when its network goes. Every test here that brings a network up holds this lock
/// (a file lock, so across test processes too): one agent at a time changes the switch, and
/// each test can check that it is put back. Whatever the test did, the value found when the
/// lock was taken is written back when the guard goes.
struct Forwarding {
    _lock: std::fs::File,
    found: String,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Forwarding {
    fn lock() -> Forwarding {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/fnlet-tests-network.lock")
            .expect("open /tmp/fnlet-tests-network.lock");
        lock.lock().expect("lock /tmp/fnlet-tests-network.lock");
        Forwarding {
            _lock: lock,
            found: Forwarding::value(),
        }
    }

    fn value() -> String {
        std::fs::read_to_string(IP_FORWARD)
            .expect("read net.ipv4.ip_forward")
            .trim()
            .to_string()
    }

    fn set(v: &str) {
        std::fs::write(IP_FORWARD, v).expect("write net.ipv4.ip_forward (needs root)");
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let _ = std::fs::write(IP_FORWARD, &self.found);
    }
}

/// The upstream: a network namespace with a veth to the host, its servers, and the trap route.
struct Upstream {
    ns: String,
    host_if: String,
    /// The upstream's address (its servers listen here and on 169.254.169.254).
    ip: Ipv4Addr,
    servers: Vec<Child>,
    metadata_route: bool,
    dir: tempfile::TempDir,
}

const SERVER: &str = r#"
import http.server, socket, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from upstream\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
e = socket.socket()
e.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
e.bind(("0.0.0.0", 7007))
e.listen(128)
def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
print("ready", flush=True)
while True:
    c, _ = e.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

fn run(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "{cmd}: {st}");
}

impl Upstream {
    fn start() -> Upstream {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let pid = std::process::id();
        let ns = format!("fnlet-test-up-{pid}-{n}");
        let host_if = format!("fnu{:04x}{n}h", pid & 0xffff);
        let peer = format!("fnu{:04x}{n}u", pid & 0xffff);
        let net = 1 + ((pid * 7 + n) % 250) as u8;
        let ip = Ipv4Addr::new(198, 19, net, 2);
        let host_ip = Ipv4Addr::new(198, 19, net, 1);
        let dir = tempfile::Builder::new()
            .prefix("fnlet-test-upstream")
            .tempdir()
            .expect("tempdir");
        let mut up = Upstream {
            ns: ns.clone(),
            host_if: host_if.clone(),
            ip,
            servers: Vec::new(),
            metadata_route: false,
            dir,
        };
        run(&format!(
            "ip netns add {ns} && ip link add {host_if} type veth peer name {peer} && \
             ip link set {peer} netns {ns} && ip addr add {host_ip}/30 dev {host_if} && \
             ip link set {host_if} up && ip -n {ns} link set lo up && \
             ip -n {ns} addr add {ip}/30 dev {peer} && ip -n {ns} link set {peer} up && \
             ip -n {ns} addr add 169.254.169.254/32 dev lo && \
             ip -n {ns} route add default via {host_ip}"
        ));
        // A leak to the metadata address would reach the upstream, not the outside world.
        let has_route = Command::new("sh")
            .args(["-c", "ip route show 169.254.169.254 | grep -q ."])
            .status()
            .is_ok_and(|s| s.success());
        if !has_route {
            run(&format!(
                "ip route add 169.254.169.254/32 via {ip} dev {host_if}"
            ));
            up.metadata_route = true;
        }
        let script = up.dir.path().join("server.py");
        std::fs::write(&script, SERVER).expect("write server.py");
        let mut server = in_netns(Some(&ns), "python3")
            .arg(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 in the upstream");
        {
            use std::io::BufRead;
            let mut line = String::new();
            let out = server.stdout.take().expect("server stdout");
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .expect("server ready line");
            assert_eq!(line.trim(), "ready");
        }
        up.servers.push(server);
        let dns = in_netns(Some(&ns), "dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--address=/upstream.test/{ip}"))
            .arg(format!(
                "--pid-file={}",
                up.dir.path().join("dnsmasq.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq in the upstream (scripts/install-deps.sh installs dnsmasq-base)");
        up.servers.push(dns);
        // dnsmasq answers once bound; the host reaches the upstream directly.
        // A query for upstream.test, as bytes.
        let query = format!(
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); \
             s.sendto(bytes.fromhex('12340100000100000000000008757073747265616d04746573740000010001'), ('{ip}', 53)); s.recv(512)"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("python3")
            .args(["-c", &query])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(Instant::now() < deadline, "dnsmasq never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        if self.metadata_route {
            let _ = Command::new("ip")
                .args(["route", "del", "169.254.169.254/32"])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        // The host's own connections to the upstream (its check of the metadata route).
        let host_ip = Ipv4Addr::from(u32::from(self.ip) - 1).to_string();
        let _ = Command::new("conntrack")
            .args(["-D", "-s", &host_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A function that runs its request body as a shell script (and always exits 0: what failed
/// is in its output).
fn shell_function(name: &str, network: &str) -> Fixture {
    Fixture::sh(
        name,
        &format!("timeout_s = 30\npublic = true\n[network]\n{network}"),
        "/bin/sh -s 2>&1; exit 0",
    )
}

fn sh(agent: &Agent, function: &str, script: &str) -> String {
    let r = agent.invoke(function, script.as_bytes());
    assert_eq!(r.status, 200, "{function}: {}\n{}", r.text(), agent.log());
    r.text()
}

/// A script that prints REACHED when a TCP connection to ip:port opens within 3 s, else
/// BLOCKED.
fn reach(ip: &str, port: &str) -> String {
    format!(
        "python3 -c \"import socket; socket.create_connection(('{ip}', {port}), 3)\" 2>/dev/null && echo REACHED || echo BLOCKED"
    )
}

fn links_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn nft_table_exists(family: &str, table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", family, table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Instances' entries in the function map (`ADDR : goto out_F`).
fn map_entries(table: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "map", "inet", table, "out"])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split([',', '{', '}', '\n'])
        .map(str::trim)
        .filter(|e| e.contains(": goto out_"))
        .map(|e| e.trim_start_matches("elements = ").to_string())
        .collect()
}

/// Conntrack entries from the range other than the bridge's own (the host's IGMP reports) and
/// those in TIME_WAIT, which the agent leaves to expire (see release_conntrack in the agent).
fn conntrack_entries(range: &str, gateway: Ipv4Addr) -> Vec<String> {
    let out = Command::new("conntrack")
        .args(["-L", "-s", range])
        .output()
        .expect("conntrack (scripts/install-deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(&format!("src={gateway} ")) && !l.contains(" TIME_WAIT "))
        .map(str::to_string)
        .collect()
}

/// What the host and the upstream saw, for a failure's message: the range's conntrack entries,
/// the bridge's neighbours and fdb, fnlet's table with its counters, the upstream's sockets.
fn network_diagnosis(bridge: &str, range: &str, up: &Upstream) -> String {
    let cmds = [
        format!("conntrack -L -s {range} 2>&1; conntrack -L -d {range} 2>&1"),
        format!("ip neigh show dev {bridge}; bridge fdb show br {bridge} | grep -v permanent"),
        format!("ip -o link show master {bridge}"),
        format!("nft list table inet {bridge}; nft list table bridge {bridge}"),
        format!("ip netns exec {} ss -tani", up.ns),
        "cat /proc/sys/net/ipv4/ip_forward; nstat -az 2>/dev/null | grep -E 'Drop|Retrans|Listen|Overflow' | grep -v ' 0 '".to_string(),
    ];
    cmds.iter()
        .map(|c| {
            let out = Command::new("sh").args(["-c", c]).output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| e.to_string());
            format!("---- {c}\n{text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn metric(agent: &Agent, name: &str, function: &str) -> u64 {
    let text = agent.get("/metrics").text();
    let key = format!("{name}{{function=\"{function}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn functions_reach_only_what_their_egress_allows_and_leave_nothing_behind() {
    require_root();
    // Forwarding off, so that the agent has to turn it on and put it back (the guard puts
    // back the host's own value at the end).
    let forwarding = Forwarding::lock();
    Forwarding::set("0");
    let up = Upstream::start();
    let u = up.ip;
    let pid = std::process::id();
    let bridge = format!("fnt{:05x}", pid & 0xfffff);
    let range_net = 1 + ((pid * 7) % 250);
    let range = format!("100.90.{range_net}.0/24");
    let gateway = Ipv4Addr::new(100, 90, range_net as u8, 1);
    let mut agent = Agent::start_with(
        "network",
        Settings {
            network_extra: format!("bridge = \"{bridge}\"\nrange = \"{range}\"\ndns = [\"{u}\"]\n"),
            ..Default::default()
        },
    );
    // Something of the host's on every address: no instance may reach it.
    let host_listener = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0:0");
    let host_port = host_listener.local_addr().unwrap().port();

    let fixtures = [
        shell_function(
            "allowed",
            &format!("egress = [\"{u}/32:8080\", \"{u}:7007\", \"{u}:53\"]\n"),
        ),
        shell_function("closed", "egress = \"none\"\n"),
        shell_function("wrongport", &format!("egress = [\"{u}:9999\"]\n")),
        shell_function("open", "egress = \"all\"\n"),
        shell_function(
            "capped",
            &format!("egress = [\"{u}:7007\"]\nmax_connections = 2\n"),
        ),
    ];
    for f in &fixtures {
        agent.deploy(f.path());
    }

    // Allowed: HTTP, a TCP round trip, a name through the resolver in resolv.conf.
    let out = sh(
        &agent,
        "allowed",
        &format!("curl -sS -m 10 http://{u}:8080/"),
    );
    assert_eq!(out, "hello from upstream\n");
    assert_eq!(
        Forwarding::value(),
        "1",
        "forwarding is on while instances need it"
    );
    let out = sh(
        &agent,
        "allowed",
        &format!(
            "python3 -c \"import socket; s = socket.create_connection(('{u}', 7007), 10); s.sendall(b'ping 123'); print(s.recv(100).decode())\""
        ),
    );
    assert_eq!(out.trim(), "ping 123");
    let out = sh(
        &agent,
        "allowed",
        "cat /etc/resolv.conf; python3 -c \"import socket; print('resolved', socket.gethostbyname('upstream.test'))\"",
    );
    assert!(out.contains(&format!("nameserver {u}")), "{out}");
    assert!(out.contains(&format!("resolved {u}")), "{out}");

    // "none": only lo, nothing reachable.
    let out = sh(
        &agent,
        "closed",
        &format!("cat /proc/net/dev; curl -sS -m 5 http://{u}:8080/ || echo UNREACHABLE"),
    );
    assert!(
        out.contains("UNREACHABLE") && !out.contains("eth0"),
        "{out}"
    );
    // Rules for another port: refused.
    let out = sh(
        &agent,
        "wrongport",
        &format!("curl -sS -m 5 http://{u}:8080/ || echo UNREACHABLE"),
    );
    assert!(out.contains("UNREACHABLE"), "{out}");

    // What nobody reaches, whatever the rules: the host (127.0.0.1 and the bridge address:
    // the agent's port and a host listener on every address), the metadata address.
    let agent_port = agent.base_url().rsplit(':').next().unwrap().to_string();
    let targets = [
        ("127.0.0.1", agent_port.clone()),
        (&gateway.to_string() as &str, agent_port.clone()),
        ("127.0.0.1", host_port.to_string()),
        (&gateway.to_string(), host_port.to_string()),
        ("169.254.169.254", "8080".to_string()),
    ];
    // The host itself reaches the metadata address: it is routed to the upstream's server.
    if up.metadata_route {
        let out = Command::new("curl")
            .args(["-sS", "-m", "5", "http://169.254.169.254:8080/"])
            .output()
            .expect("curl");
        assert_eq!(text(&out.stdout), "hello from upstream\n");
    }
    for f in ["allowed", "open"] {
        for (ip, port) in &targets {
            let out = sh(&agent, f, &reach(ip, port));
            assert_eq!(out.trim(), "BLOCKED", "{f} reached {ip}:{port}");
        }
    }

    // Another instance: a listener instance (egress "all") the host can reach, the open
    // function cannot.
    let listener_fx = shell_function("listener", "egress = \"all\"\n");
    agent.deploy(listener_fx.path());
    let bg = agent.invoke_in_background(
        "listener",
        b"python3 -c \"import socket, time\ns = socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen(8); s.settimeout(0.5)\nn = 0\nend = time.time() + 8\nwhile time.time() < end:\n    try:\n        c, _ = s.accept(); n += 1; c.close()\n    except OSError:\n        pass\nprint('accepted', n)\"",
    );
    // Its address: the entry of `listener` (running, or prepared next) that the host can
    // connect to on port 8000.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener_ip = 'found: loop {
        for e in map_entries(&bridge) {
            let Some(ip) = e.strip_suffix(" : goto out_listener") else {
                continue;
            };
            let addr = format!("{ip}:8000").parse().expect("an address");
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                break 'found ip.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the listener instance never listened: {:?}",
            map_entries(&bridge)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = sh(&agent, "open", &reach(&listener_ip, "8000"));
    assert_eq!(out.trim(), "BLOCKED", "open reached another instance");
    let r = bg.join().expect("listener thread").expect("listener call");
    assert_eq!(r.text().trim(), "accepted 1", "only the host's connection");

    // The connection cap: 2 open, the third refused.
    let out = sh(
        &agent,
        "capped",
        &format!(
            "python3 -c \"import socket\nkeep = []\nfor i in range(3):\n    try:\n        keep.append(socket.create_connection(('{u}', 7007), 5)); keep[-1].sendall(b'x'); keep[-1].recv(1); print('open', i)\n    except OSError as e:\n        print('refused', i, e)\""
        ),
    );
    assert!(
        out.contains("open 0") && out.contains("open 1") && out.contains("refused 2"),
        "{out}"
    );

    // rate_mbit: a token bucket towards the instance and a policer on what it sends, on the
    // host side of its veth (checked as configured: the tests time nothing).
    let slow = shell_function("slow", &format!("egress = [\"{u}:8080\"]\nrate_mbit = 8\n"));
    agent.deploy(slow.path());
    let out = sh(&agent, "slow", &format!("curl -sS -m 10 http://{u}:8080/"));
    assert_eq!(out, "hello from upstream\n");
    // The prepared instance of `slow` (made after the call; the entry of the one that ran may
    // linger while it is released): its veth is named after its address's offset in the range.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (slow_if, q) = 'found: loop {
        for e in map_entries(&bridge) {
            let Some(ip) = e.strip_suffix(" : goto out_slow") else {
                continue;
            };
            let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
            let dev = format!("{bridge}-{last:x}");
            let qdiscs = Command::new("tc")
                .args(["qdisc", "show", "dev", &dev])
                .output()
                .expect("tc");
            let q = text(&qdiscs.stdout);
            if q.contains("qdisc tbf") {
                break 'found (dev, q);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no instance of slow with a tbf qdisc: {:?}",
            map_entries(&bridge)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(q.contains("rate 8Mbit"), "{slow_if}: {q}");
    // The other way: eth0 inside the prepared instance (its cgroup's waiting init).
    let deadline = Instant::now() + Duration::from_secs(10);
    'inside: loop {
        for c in agent::sandbox_cgroups(&cgroup_root("network")) {
            if !c
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("slow-"))
            {
                continue;
            }
            let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
            let Some(init) = procs.lines().next() else {
                continue;
            };
            let inside = Command::new("nsenter")
                .arg(format!("--net=/proc/{init}/ns/net"))
                .args(["--", "tc", "qdisc", "show", "dev", "eth0"])
                .output()
                .expect("nsenter tc");
            let q = text(&inside.stdout);
            if q.contains("qdisc tbf") {
                assert!(q.contains("rate 8Mbit"), "eth0 of {init}: {q}");
                break 'inside;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no instance of slow with a tbf qdisc on its eth0"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = text(&agent.cli(&["describe", "slow"]).stdout);
    assert!(
        d.contains("bandwidth:    8 Mbit/s each way per instance"),
        "{d}"
    );

    // Counted: connections and bytes of the allowed function, denials of the others.
    assert!(metric(&agent, "fnlet_network_connections_total", "allowed") >= 3);
    assert!(metric(&agent, "fnlet_network_sent_bytes_total", "allowed") > 0);
    assert!(metric(&agent, "fnlet_network_received_bytes_total", "allowed") > 0);
    assert!(metric(&agent, "fnlet_network_denied_total", "wrongport") >= 1);
    assert!(metric(&agent, "fnlet_network_denied_total", "capped") >= 1);
    let describe = agent.cli(&["describe", "capped"]);
    let d = text(&describe.stdout);
    assert!(d.contains(&format!("egress:       {u}:7007")), "{d}");
    assert!(d.contains("connections:  at most 2 open"), "{d}");

    // The escape probe with egress "all": every door still closed.
    let probe = std::fs::read(common::probe()).expect("read the probe");
    let manifest = format!(
        "name = \"escape\"\npublic = true\nentrypoint = [\"/var/task/probe\", \"escape\", \"{}\", \"{host_port}\"]\ntimeout_s = 60\n[env]\nPROBE_EGRESS = \"1\"\n[network]\negress = \"all\"\n",
        agent.pid()
    );
    let escape = Fixture::new(&manifest, &[("probe", &probe, 0o755)]);
    agent.deploy(escape.path());
    let r = agent.invoke("escape", b"");
    let report = r.text();
    assert_eq!(r.status, 200, "{report}");
    let open: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("ATTEMPT ") && !l.contains(": BLOCKED: "))
        .collect();
    assert_eq!(report.matches("ATTEMPT ").count(), 23, "{report}");
    assert!(
        open.is_empty(),
        "doors open with egress all:\n{}",
        open.join("\n")
    );

    // 200 cold starts with egress, each with a connection: nothing left but the prepared one.
    let cold = shell_function("cold", &format!("egress = [\"{u}:8080\"]\n"));
    agent.deploy(cold.path());
    for i in 0..200 {
        // On a failure the instance says what it saw (its sockets, neighbours, TCP counters).
        let out = sh(
            &agent,
            "cold",
            &format!(
                "curl -sS -m 10 -o /dev/null -w '%{{http_code}}' http://{u}:8080/ || \
                 {{ echo; ip -4 addr; ip neigh; cat /proc/net/tcp; grep -A1 '^Tcp:' /proc/net/snmp; }}"
            ),
        );
        if out != "200" {
            panic!(
                "call {i} of 200: {out}\n{}\n{}",
                network_diagnosis(&bridge, &range, &up),
                agent.log()
            );
        }
    }
    let prefix = format!("{bridge}-");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Each function with egress (8) keeps one prepared sandbox, with its veth and entries.
        let prepared = agent
            .get("/metrics")
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("fnlet_network_addresses_in_use "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let links = links_with_prefix(&prefix);
        let entries = map_entries(&bridge);
        let tracked = conntrack_entries(&range, gateway);
        if links.len() <= 8
            && entries.len() == links.len()
            && prepared == links.len()
            && tracked.is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after 200 cold starts: links {links:?}, map {entries:?}, addresses {prepared}, conntrack {tracked:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // kill -9: the bridge, tables and forwarding stay; the next start removes them, puts
    // forwarding back as the first agent found it, and serves again (turning it on again).
    agent.kill9();
    assert!(
        nft_table_exists("inet", &bridge),
        "the tables went with a killed agent?"
    );
    assert_eq!(Forwarding::value(), "1");
    agent.restart();
    let log = agent.log();
    assert!(log.contains("removed the function network"), "{log}");
    assert!(
        log.contains("put net.ipv4.ip_forward back to 0"),
        "the restarted agent did not put forwarding back:\n{log}"
    );
    let out = sh(
        &agent,
        "allowed",
        &format!("curl -sS -m 10 http://{u}:8080/"),
    );
    assert_eq!(out, "hello from upstream\n");

    agent.stop();
    assert_eq!(
        links_with_prefix(&prefix),
        Vec::<String>::new(),
        "veths left"
    );
    assert_eq!(
        links_with_prefix(&bridge),
        Vec::<String>::new(),
        "bridge left"
    );
    assert!(!nft_table_exists("inet", &bridge), "inet table left");
    assert!(!nft_table_exists("bridge", &bridge), "bridge table left");
    let tracked = Command::new("conntrack")
        .args(["-L", "-s", &range])
        .output()
        .expect("conntrack");
    assert_eq!(text(&tracked.stdout), "", "conntrack entries left");
    assert_eq!(
        Forwarding::value(),
        "0",
        "net.ipv4.ip_forward not put back at stop\n{}",
        agent.log()
    );
    agent.assert_clean();
    drop(host_listener);
    drop(up);
    drop(forwarding);
}

#[test]
fn a_range_that_overlaps_a_host_route_is_refused_with_the_key_named() {
    require_root();
    let up = Upstream::start();
    let pid = std::process::id();
    // The upstream's own /30 is a route of the host.
    let net = up.ip.octets()[2];
    let agent = Agent::start_with(
        "network-clash",
        Settings {
            network_extra: format!(
                "bridge = \"fnc{:05x}\"\nrange = \"198.19.{net}.0/24\"\ndefault_egress = \"all\"\n",
                pid & 0xfffff
            ),
            ..Default::default()
        },
    );
    let f = Fixture::sh("clash", "public = true", "echo hi");
    agent.deploy(f.path());
    let r = agent.invoke("clash", b"");
    assert_eq!(r.status, 500, "{}", r.text());
    let log = agent.log();
    assert!(
        log.contains("network.range") && log.contains("overlaps the host's route"),
        "{log}"
    );
    agent.finish();
    drop(up);
}

#[test]
fn a_lambda_function_with_egress_serves_beside_its_runtime_api() {
    require_root();
    let forwarding = Forwarding::lock();
    let pid = std::process::id();
    let bridge = format!("fnl{:05x}", pid & 0xfffff);
    let agent = Agent::start_with(
        "network-lambda",
        Settings {
            network_extra: format!(
                "bridge = \"{bridge}\"\nrange = \"100.91.{}.0/24\"\n",
                1 + (pid * 7) % 250
            ),
            ..Default::default()
        },
    );
    let bin = std::fs::read(fixture_bootstrap("lambda-rust")).expect("read bootstrap");
    let f = Fixture::new(
        "name = \"lam\"\nmode = \"lambda\"\npublic = true\n[network]\negress = \"all\"\n",
        &[("bootstrap", &bin, 0o755)],
    );
    agent.deploy(f.path());
    // The Runtime API on the instance's loopback still serves it, eth0 beside it.
    let r = agent.invoke_lambda("lam", br#"{"hello": "net"}"#.to_vec(), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["echo"]["hello"], "net", "{}", r.text());
    assert!(
        !links_with_prefix(&format!("{bridge}-")).is_empty(),
        "the instance has no veth"
    );
    agent.finish();
    assert_eq!(
        links_with_prefix(&bridge),
        Vec::<String>::new(),
        "bridge or veths left"
    );
    assert!(!nft_table_exists("inet", &bridge), "inet table left");
    assert_eq!(
        Forwarding::value(),
        forwarding.found,
        "ip_forward not put back"
    );
}

fn nft_chain_exists(table: &str, chain: &str) -> bool {
    Command::new("nft")
        .args(["list", "chain", "inet", table, chain])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (up to 30 s: an instance's network is released in the background, within a second
/// or so) until `chain` is there or not, as `want` says.
fn wait_chain(agent: &Agent, table: &str, chain: &str, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while nft_chain_exists(table, chain) != want {
        assert!(
            Instant::now() < deadline,
            "chain {chain}: wanted {}, after 30 s\n{}",
            if want { "there" } else { "gone" },
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A function removed, or deployed again without egress, takes its chains and counters with
/// it once its last instance's network is released; another function's stay. Its rules name
/// 192.0.2.1 (TEST-NET-1), and no instance sends anything.
#[test]
fn a_function_without_egress_any_more_leaves_no_chains() {
    require_root();
    let forwarding = Forwarding::lock();
    let pid = std::process::id();
    let bridge = format!("fnr{:05x}", pid & 0xfffff);
    let mut agent = Agent::start_with(
        "network-retire",
        Settings {
            network_extra: format!(
                "bridge = \"{bridge}\"\nrange = \"100.92.{}.0/24\"\n",
                1 + (pid * 7) % 250
            ),
            ..Default::default()
        },
    );
    let rules = "egress = [\"192.0.2.1:9\"]\n";
    for name in ["stays", "goes", "closes"] {
        agent.deploy(shell_function(name, rules).path());
        assert_eq!(sh(&agent, name, "echo ok"), "ok\n");
        wait_chain(&agent, &bridge, &format!("out_{name}"), true);
    }

    agent
        .admin(reqwest::Method::DELETE, "/v1/functions/goes", None)
        .expect_ok(204);
    agent.deploy(shell_function("closes", "egress = \"none\"\n").path());
    assert_eq!(sh(&agent, "closes", "echo ok"), "ok\n");
    wait_chain(&agent, &bridge, "out_goes", false);
    wait_chain(&agent, &bridge, "out_closes", false);
    let counters = Command::new("nft")
        .args(["list", "counters", "table", "inet", &bridge])
        .output()
        .expect("nft");
    let counters = text(&counters.stdout);
    assert!(counters.contains("counter tx_stays "), "{counters}");
    for gone in ["goes", "closes"] {
        assert!(!counters.contains(&format!("_{gone} ")), "{counters}");
    }
    assert!(nft_chain_exists(&bridge, "out_stays"));
    assert_eq!(sh(&agent, "stays", "echo ok"), "ok\n");

    // Deployed again with egress: its chains are made anew.
    agent.deploy(shell_function("goes", rules).path());
    assert_eq!(sh(&agent, "goes", "echo ok"), "ok\n");
    wait_chain(&agent, &bridge, "out_goes", true);
    agent.stop();
    assert!(!nft_table_exists("inet", &bridge), "inet table left");
    assert_eq!(
        Forwarding::value(),
        forwarding.found,
        "ip_forward not put back"
    );
    agent.assert_clean();
}

/// A `host.name:PORT` rule is resolved with `network.dns` (the upstream's dnsmasq, which alone
/// knows upstream.test; the host's resolver does not): the function reaches that port of the
/// address and no other.
#[test]
fn a_host_name_rule_is_resolved_with_network_dns() {
    require_root();
    let forwarding = Forwarding::lock();
    let up = Upstream::start();
    let u = up.ip;
    let pid = std::process::id();
    let agent = Agent::start_with(
        "network-names",
        Settings {
            network_extra: format!(
                "bridge = \"fnn{:05x}\"\nrange = \"100.93.{}.0/24\"\ndns = [\"{u}\"]\n",
                pid & 0xfffff,
                1 + (pid * 7) % 250
            ),
            ..Default::default()
        },
    );
    let f = shell_function("named", "egress = [\"upstream.test:8080\"]\n");
    agent.deploy(f.path());
    let out = sh(&agent, "named", &format!("curl -sS -m 10 http://{u}:8080/"));
    assert_eq!(out, "hello from upstream\n", "{}", agent.log());
    let out = sh(&agent, "named", &reach(&u.to_string(), "7007"));
    assert_eq!(out.trim(), "BLOCKED", "named reached {u}:7007");
    assert!(!agent.log().contains("resolving failed"), "{}", agent.log());
    agent.finish();
    assert_eq!(
        Forwarding::value(),
        forwarding.found,
        "ip_forward not put back"
    );
    drop(up);
}
