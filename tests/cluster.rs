//! The cluster, with real agents: five `fnlet agent`s on 127.0.0.1 to 127.0.0.5 inside a
//! network namespace this test makes and removes (`fnlet-test-<pid>`), driven by the CLI and
//! curl run inside it (the test process stays outside), and by fnlet-peer-client, a stranger
//! on their QUIC endpoints.
//!
//! Agents take seconds to start and to notice each other, so one cluster serves every case, in
//! order, in one test (nextest runs each test in its own process): forming it, joins that must
//! be refused, bad frames, a killed member, a member that leaves, packet loss, a deploy
//! served everywhere, forwarding to a function's owner and spill-over under load (by its
//! reported load too), the hop limit, Lambda calls through a forwarding member, a function's
//! owner killed mid-call, a 2|3 partition healed, and access keys made and removed on different
//! members. Each case is a step: a failing step is reported with every member's
//! view of the cluster and the agents' log tails, the cluster is brought back to five alive
//! members if it can be, and the next step runs; the test then fails naming each failed step. New
//! cases are more steps on the same cluster (partitions and loss: nft rules in the namespace,
//! see [`NftTable`]).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};
use serde_json::Value;

/// Members of the cluster: n1 .. n5 on 127.0.0.1 .. 127.0.0.5.
const NODES: usize = 5;
const API_PORT: u16 = 8740;
const PEER_PORT: u16 = 8741;
/// The agent that makes a cluster of its own (a token from another cluster).
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 8);
/// Where agents that must be refused try to join from.
const JOINER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
/// How often a wait reads the members tables.
const POLL: Duration = Duration::from_millis(200);
/// A generous bound for members to see a change that takes a few round trips (a join, a
/// leave, a restart): seconds at most, here.
const SETTLE: Duration = Duration::from_secs(20);
/// Detection of a killed member. The crate's bound for 5 hosts (cluster/src/lib.rs) is down
/// expected in 6.5 s, 12 s at worst; several times that.
const DETECT: Duration = Duration::from_secs(40);
/// How long the cluster runs under packet loss.
const LOSS_RUN: Duration = Duration::from_secs(30);

fn node_id(i: usize) -> String {
    format!("n{}", i + 1)
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i as u8 + 1)
}

fn peer_addr(ip: Ipv4Addr) -> String {
    SocketAddr::from((ip, PEER_PORT)).to_string()
}

/// Runs a command that must succeed; its output.
fn run(mut cmd: Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        common::text(&out.stdout),
        common::text(&out.stderr)
    );
    out
}

/// The network namespace the cluster lives in; removed when dropped (a panic included).
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        Netns::named(format!("fnlet-test-{}", std::process::id()))
    }

    /// A namespace named `name` (a test of its own may run beside the suite).
    fn named(name: String) -> Netns {
        let mut add = Command::new("ip");
        add.args(["netns", "add", &name]);
        run(add);
        let ns = Netns { name };
        // 127.0.0.0/8 is all on lo: every member's address is there once lo is up.
        let mut up = Command::new("ip");
        up.args(["-n", &ns.name, "link", "set", "lo", "up"]);
        run(up);
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        common::in_netns(Some(&self.name), program)
    }

    /// `nft ARGS` in the namespace (nftables: scripts/install-deps.sh installs it).
    fn nft(&self, args: &[&str]) {
        let mut cmd = self.cmd("nft");
        cmd.args(args);
        run(cmd);
    }

    fn exists(name: &str) -> bool {
        std::path::Path::new("/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// An nftables table in the namespace, deleted when dropped (a failed step included).
struct NftTable<'a> {
    ns: &'a Netns,
    name: &'static str,
}

impl<'a> NftTable<'a> {
    /// A table with one input chain holding `rule`.
    fn input_rule(ns: &'a Netns, name: &'static str, rule: &str) -> NftTable<'a> {
        ns.nft(&["add", "table", "inet", name]);
        let table = NftTable { ns, name };
        ns.nft(&[
            "add",
            "chain",
            "inet",
            name,
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ]);
        let mut args = vec!["add", "rule", "inet", name, "input"];
        args.extend(rule.split_whitespace());
        ns.nft(&args);
        table
    }
}

impl NftTable<'_> {
    /// One more rule in the input chain.
    fn add_rule(&self, rule: &str) {
        let mut args = vec!["add", "rule", "inet", self.name, "input"];
        args.extend(rule.split_whitespace());
        self.ns.nft(&args);
    }

    /// What the table's `counter` counted: packets.
    fn packets(&self) -> u64 {
        let mut cmd = self.ns.cmd("nft");
        cmd.args(["list", "table", "inet", self.name]);
        let text = common::text(&run(cmd).stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet counter in:\n{text}"))
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .cmd("nft")
            .args(["delete", "table", "inet", self.name])
            .status();
    }
}

/// One row of `fnlet members --json`.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    addr: String,
    state: String,
    generation: u64,
    this_host: bool,
}

fn parse_rows(v: &Value) -> Result<Vec<Row>, String> {
    let rows = v.as_array().ok_or_else(|| format!("not an array: {v}"))?;
    rows.iter()
        .map(|r| {
            let s = |k: &str| {
                r[k].as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{k} in {r}"))
            };
            Ok(Row {
                id: s("id")?,
                addr: s("addr")?,
                state: s("state")?,
                generation: r["generation"]
                    .as_u64()
                    .ok_or_else(|| format!("generation in {r}"))?,
                this_host: r["this_host"]
                    .as_bool()
                    .ok_or_else(|| format!("this_host in {r}"))?,
            })
        })
        .collect()
}

/// Every running member's members table, by observer; Err: what `fnlet members` said.
struct Views(BTreeMap<String, Result<Vec<Row>, String>>);

impl Views {
    /// `who` as `observer` sees it.
    fn row(&self, observer: &str, who: &str) -> Option<&Row> {
        self.0
            .get(observer)?
            .as_ref()
            .ok()?
            .iter()
            .find(|r| r.id == who)
    }

    /// Whether every observer in the map sees `who` in `state`.
    fn all_see(&self, who: &str, state: &str) -> bool {
        self.0
            .keys()
            .filter(|o| o.as_str() != who)
            .all(|o| self.row(o, who).is_some_and(|r| r.state == state))
    }

    /// Whether every observer sees exactly the five members, all alive.
    fn all_alive(&self) -> bool {
        self.0.len() == NODES
            && self.0.values().all(|rows| {
                rows.as_ref().is_ok_and(|rows| {
                    rows.len() == NODES
                        && (0..NODES).all(|i| {
                            rows.iter()
                                .any(|r| r.id == node_id(i) && r.state == "alive")
                        })
                })
            })
    }
}

impl std::fmt::Display for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (observer, rows) in &self.0 {
            write!(f, "  {observer} sees:")?;
            match rows {
                Ok(rows) => {
                    for r in rows {
                        write!(f, " {}={}(gen {})", r.id, r.state, r.generation)?;
                    }
                    writeln!(f)?;
                }
                Err(e) => writeln!(f, " ERROR {e}")?,
            }
        }
        Ok(())
    }
}

/// The cluster: its members (dropped first: stopped) and its namespace (removed last).
struct Cluster {
    nodes: Vec<Agent>,
    /// The token the members joined with (`fnlet cluster init`'s).
    token: String,
    /// An access key n1 made before `fnlet cluster init` (id, secret).
    early_key: (String, String),
    ns: Netns,
}

/// Settings for an agent in the namespace listening on `ip` (API and peer ports) with node
/// id `id` and more arguments `args` (see [`join_args`]).
fn settings(ns: &Netns, ip: Ipv4Addr, id: &str, args: Vec<String>) -> Settings {
    Settings {
        netns: Some(ns.name.clone()),
        listen: Some(SocketAddr::from((ip, API_PORT))),
        peer_listen: Some(SocketAddr::from((ip, PEER_PORT))),
        node_id: Some(id.to_string()),
        args,
        prepare_ahead: false,
        shutdown_grace_s: 5.0,
        ..Settings::default()
    }
}

/// `--join ADDR --token TOKEN`, to join through `via`.
fn join_args(via: Ipv4Addr, token: &str) -> Vec<String> {
    vec![
        "--join".to_string(),
        peer_addr(via),
        "--token".to_string(),
        token.to_string(),
    ]
}

/// A join token from `fnlet ARGS` (`cluster init` or `cluster token`): alone on stdout.
fn token_from(agent: &Agent, args: &[&str]) -> String {
    let out = agent.cli(args);
    let stdout = common::text(&out.stdout);
    assert!(
        out.status.success(),
        "fnlet {args:?}: {}\n{stdout}{}",
        out.status,
        common::text(&out.stderr)
    );
    let token = stdout.trim().to_string();
    assert!(
        token.starts_with("fnlet1.") && stdout.lines().count() == 1,
        "fnlet {args:?} printed {stdout:?}, not a token alone"
    );
    token
}

/// `fnlet members --json` on `agent`.
fn members(agent: &Agent) -> Result<Vec<Row>, String> {
    let out = agent.cli(&["members", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "fnlet members: {}: {}",
            out.status,
            common::text(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("not JSON ({e}): {}", common::text(&out.stdout)))?;
    parse_rows(&v)
}

/// A Prometheus sample of `agent` (`name{labels}` as written); 0 when absent.
fn metric(agent: &Agent, sample: &str) -> f64 {
    let text = agent.get("/metrics").expect_ok(200).text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn handshake_failures(agent: &Agent, reason: &str) -> f64 {
    metric(
        agent,
        &format!("fnlet_cluster_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
}

/// The node id of a member (its test name is `cluster-<id>`).
fn label(a: &Agent) -> String {
    a.test.trim_start_matches("cluster-").to_string()
}

/// The last `n` lines of a log.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Every running member's view.
    fn views(&self) -> Views {
        Views(
            self.nodes
                .iter()
                .filter(|a| a.is_running())
                .map(|a| (label(a), members(a)))
                .collect(),
        )
    }

    /// The members' views and log tails, for a failure message.
    fn describe(&self) -> String {
        let mut s = format!("members as each running agent sees them:\n{}", self.views());
        for a in &self.nodes {
            let _ = write!(
                s,
                "\n---- {} log, last lines ({}) ----\n{}\n",
                label(a),
                if a.is_running() { "running" } else { "stopped" },
                tail(&a.log(), 25)
            );
        }
        s
    }

    /// Waits until `done` holds for the views; panics after `limit` with `what`, the views and
    /// the logs. Returns the views that satisfied it.
    fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&Views) -> bool) -> Views {
        let start = Instant::now();
        loop {
            let views = self.views();
            if done(&views) {
                eprintln!("     {what}: after {:.1} s", start.elapsed().as_secs_f64());
                return views;
            }
            if start.elapsed() > limit {
                panic!("{what}: not within {limit:?}\n{}", self.describe());
            }
            std::thread::sleep(POLL);
        }
    }

    fn wait_all_alive(&self, what: &str, limit: Duration) -> Views {
        self.wait_for(what, limit, Views::all_alive)
    }

    /// After a failed step: every member running again and the five alive, if that can be.
    fn recover(&mut self) -> bool {
        for a in &mut self.nodes {
            if !a.is_running() {
                a.args.clear();
                if a.try_restart().is_err() {
                    return false;
                }
            }
        }
        let start = Instant::now();
        while start.elapsed() < DETECT {
            if self.views().all_alive() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }

    /// Stops every member (SIGTERM, all at once), checks each exited cleanly and left nothing
    /// behind, and removes the namespace.
    fn teardown(self) {
        let Cluster { mut nodes, ns, .. } = self;
        for a in nodes.iter().filter(|a| a.is_running()) {
            a.signal("TERM");
        }
        for a in nodes.iter_mut().filter(|a| a.is_running()) {
            let status = a.wait_exit(Duration::from_secs(30));
            assert_eq!(status.code(), Some(0), "agent exit: {status}\n{}", a.log());
        }
        for a in &nodes {
            a.assert_clean();
        }
        drop(nodes);
        let name = ns.name.clone();
        drop(ns);
        assert!(
            !Netns::exists(&name),
            "network namespace {name} left behind"
        );
    }
}

/// One case of the suite, run on the shared cluster.
type Case = fn(&mut Cluster);

/// The steps run so far and which failed.
#[derive(Default)]
struct Steps {
    failed: Vec<String>,
    not_run: Vec<&'static str>,
}

impl Steps {
    /// Runs one step; false if it failed.
    fn run(&mut self, c: &mut Cluster, name: &'static str, f: Case) -> bool {
        eprintln!("==== {name}");
        let start = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(c))) {
            Ok(()) => {
                eprintln!("==== {name}: ok ({:.1} s)", start.elapsed().as_secs_f64());
                true
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("==== {name}: FAILED (the message is above)");
                let first = msg.lines().next().unwrap_or("").to_string();
                self.failed.push(format!("{name}: {first}"));
                false
            }
        }
    }
}

#[test]
fn cluster() {
    common::require_root();
    let started = Instant::now();
    let ns = Netns::create();
    let mut c = Cluster {
        nodes: Vec::new(),
        token: String::new(),
        early_key: (String::new(), String::new()),
        ns,
    };
    let cases: [(&'static str, Case); 12] = [
        ("2 refused joins", refused_joins),
        ("3 bad frames on the QUIC endpoint", bad_frames),
        ("4 kill -9 of a member, and its restart", killed_member),
        ("5 SIGTERM of a member, and its restart", leaving_member),
        ("6 10% packet loss without a false down", packet_loss),
        ("7 deploy once, call anywhere", deploy_once),
        (
            "8 calls go to the owner, and spill over under load",
            forwarding,
        ),
        ("9 a call forwarded too often is refused", hop_limit),
        (
            "10 Lambda calls and function URLs through a forwarding member",
            lambda_forwarded,
        ),
        (
            "11 kill -9 of a function's owner under calls, and its return",
            owner_killed,
        ),
        ("12 a partition 2|3 and its healing", partition),
        (
            "13 access keys made and removed on any member work on every member",
            access_keys,
        ),
    ];
    let mut steps = Steps::default();
    if steps.run(&mut c, "1 five agents form a cluster", form) {
        for (i, (name, case)) in cases.iter().enumerate() {
            if steps.run(&mut c, name, *case) {
                continue;
            }
            if !c.recover() {
                eprintln!(
                    "the cluster did not come back to five alive members:\n{}",
                    c.describe()
                );
                steps.not_run = cases[i + 1..].iter().map(|(n, _)| *n).collect();
                break;
            }
        }
    } else {
        steps.not_run = cases.iter().map(|(n, _)| *n).collect();
    }
    if !steps.failed.is_empty() {
        for a in &c.nodes {
            eprintln!("---- {} log ----\n{}", label(a), a.log());
        }
    }
    c.teardown();
    eprintln!("cluster suite: {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        steps.failed.is_empty(),
        "failed steps:\n  {}\nnot run: {:?}",
        steps.failed.join("\n  "),
        steps.not_run
    );
}

/// The certificates a CA holder issues for 24 s (`cluster.node_cert_validity_s`) are renewed
/// without a restart: in a namespace of their own (beside the suite), c1 makes the cluster and
/// c2 joins; both renew theirs past 2/3 of their lifetime (their `node.pem` changes, the
/// renewal is counted), and once the first certificates have expired the two still see each
/// other and a third host joins through c2: its handshakes with both (the joiner's pinned-CA
/// check of c2, its peer connections to c1 and c2) verify the renewed certificates. That each
/// side shows its renewed certificate on new connections in both directions is transport.rs's
/// unit test.
#[test]
fn node_certificates_renew() {
    common::require_root();
    const VALIDITY: Duration = Duration::from_secs(24);
    let ns = Netns::named(format!("fnlet-test-{}-certs", std::process::id()));
    let start = |ns: &Netns, i: usize, args: Vec<String>| {
        let id = format!("c{}", i + 1);
        Agent::start_with(
            &format!("certs-{id}"),
            Settings {
                cluster_extra: format!("node_cert_validity_s = {}\n", VALIDITY.as_secs()),
                ..settings(ns, node_ip(i), &id, args)
            },
        )
    };
    let cert_of =
        |a: &Agent| std::fs::read(a.state_dir().join("cluster/node.pem")).unwrap_or_default();
    let c1 = start(&ns, 0, Vec::new());
    let token = token_from(&c1, &["cluster", "init"]);
    let c2 = start(&ns, 1, join_args(node_ip(0), &token));
    // Both first certificates were issued by now: they expire within VALIDITY of it.
    let issued = Instant::now();
    let mut c = Cluster {
        nodes: vec![c1, c2],
        token,
        early_key: (String::new(), String::new()),
        ns,
    };
    let first: Vec<Vec<u8>> = c.nodes.iter().map(cert_of).collect();
    let sees_alive = |c: &Cluster, n: usize| {
        c.nodes.iter().all(|a| {
            members(a).is_ok_and(|rows| rows.len() == n && rows.iter().all(|r| r.state == "alive"))
        })
    };
    let renewed = |c: &Cluster| c.nodes.iter().zip(&first).all(|(a, f)| cert_of(a) != *f);
    while !renewed(&c) {
        assert!(
            issued.elapsed() < 3 * VALIDITY,
            "the certificates were not renewed {:?} after they were issued:\n{}",
            3 * VALIDITY,
            c.nodes
                .iter()
                .map(|a| format!("{}: {}", label(a), tail(&a.log(), 10)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(POLL);
    }
    eprintln!(
        "     both renewed after {:.1} s",
        issued.elapsed().as_secs_f64()
    );
    for a in &c.nodes {
        let ok = metric(a, "fnlet_cluster_cert_renewals_total{result=\"ok\"}");
        assert!(ok >= 1.0, "{} counted {ok} renewals", label(a));
    }
    // The first certificates expire: the members go on, on the renewed ones.
    let expired = issued + VALIDITY + Duration::from_secs(2);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    assert!(
        sees_alive(&c, 2),
        "after the first certificates expired:\n{}",
        c.describe()
    );
    let token = token_from(&c.nodes[0], &["cluster", "token"]);
    c.nodes.push(start(&c.ns, 2, join_args(node_ip(1), &token)));
    let joined = Instant::now();
    while !sees_alive(&c, 3) {
        assert!(
            joined.elapsed() < SETTLE,
            "c3 joined through c2 after the first certificates expired, but the three do not \
             all see each other alive within {SETTLE:?}:\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    }
    eprintln!(
        "     c3 joined and all three alive after {:.1} s",
        joined.elapsed().as_secs_f64()
    );
    c.teardown();
}

/// 1. `fnlet cluster init` on n1 (after it made an access key on its own, for case 13); n2
///    joins through n1; then n3 through n1, n4 through n2 and n5 through n3, at once. Every
///    member sees the five alive, at their addresses.
fn form(c: &mut Cluster) {
    let n1 = Agent::start_with("cluster-n1", settings(&c.ns, node_ip(0), "n1", Vec::new()));
    c.early_key = key_create(&n1, "made before the cluster");
    c.token = token_from(&n1, &["cluster", "init"]);
    c.nodes.push(n1);
    // Ok(agent), or why it could not join.
    let start = |c: &Cluster, i: usize, via: usize| {
        let s = settings(
            &c.ns,
            node_ip(i),
            &node_id(i),
            join_args(node_ip(via), &c.token),
        );
        Agent::try_start_with(&format!("cluster-{}", node_id(i)), s).map_err(|r| {
            format!(
                "{} could not join through {}: {}\n{}",
                node_id(i),
                node_id(via),
                r.status,
                tail(&r.log, 20)
            )
        })
    };
    let joined = [start(c, 1, 0)];
    // The rest at once: every one is in before any failure is reported (an agent dropped
    // early would stop, and confuse the others' story).
    let rest: Vec<Result<Agent, String>> = std::thread::scope(|s| {
        let c = &*c;
        let joins: Vec<_> = [(2, 0), (3, 1), (4, 2)]
            .into_iter()
            .map(|(i, via)| s.spawn(move || start(c, i, via)))
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut failed = Vec::new();
    for r in joined.into_iter().chain(rest) {
        match r {
            Ok(a) => c.nodes.push(a),
            Err(why) => failed.push(why),
        }
    }
    assert!(failed.is_empty(), "{}\n{}", failed.join("\n"), c.describe());
    // Restarts take no --join and no --token: the certificate and the members list each
    // member keeps are enough.
    for a in &mut c.nodes {
        a.args.clear();
    }
    let views = c.wait_all_alive("all five see the five alive", SETTLE);
    for i in 0..NODES {
        for j in 0..NODES {
            let r = views
                .row(&node_id(i), &node_id(j))
                .expect("all_alive saw every row");
            assert_eq!(r.addr, peer_addr(node_ip(j)), "{views}");
            assert_eq!(r.this_host, i == j, "{views}");
        }
    }
}

/// Starts an agent that joins through n1 with `token` as `id`, which must refuse to start
/// with a log naming `why`, and leave nothing behind.
fn expect_refused(c: &Cluster, test: &str, id: &str, token: &str, why: &str) {
    let s = settings(&c.ns, JOINER_IP, id, join_args(node_ip(0), token));
    let test = format!("cluster-{test}");
    match Agent::try_start_with(&test, s) {
        Ok(a) => panic!(
            "{test}: an agent joined as {id:?} with a token that should be refused ({why})\n{}",
            tail(&a.log(), 20)
        ),
        Err(r) => {
            assert!(!r.status.success(), "{test}: exit {}\n{}", r.status, r.log);
            assert!(
                r.log.contains(why),
                "{test}: the refusal does not say {why:?}:\n{}",
                tail(&r.log, 10)
            );
            eprintln!(
                "     {test}: refused: {}",
                r.log.lines().last().unwrap_or("")
            );
            let root = common::cgroup_root(&test);
            assert_eq!(
                common::leftover_cgroups(&root),
                Vec::<std::path::PathBuf>::new(),
                "{test}: a refused agent left its cgroup root"
            );
            assert_eq!(
                common::processes_matching(&root),
                Vec::<String>::new(),
                "{test}: a refused agent left processes"
            );
        }
    }
}

/// 2. Joins that must fail: an unknown token (right format), a token from another cluster, a
///    node id alive in the cluster, a used token replayed by the node it admitted (whose state
///    was wiped), an expired token. Each joining agent exits naming why; none appears in any
///    members table; n1 counts the refusals. n5 then rejoins with a new token.
fn refused_joins(c: &mut Cluster) {
    let n1 = &c.nodes[0];
    let expiring = token_from(n1, &["cluster", "token", "--ttl", "1s"]);
    let expiring_made = Instant::now();
    let fresh = token_from(n1, &["cluster", "token", "--ttl", "10m"]);
    let refused_before = handshake_failures(n1, "join_refused");
    let cert_before = handshake_failures(n1, "certificate");

    // Right format and the right CA hash (so the TLS handshake succeeds and n1 itself
    // decides), an id and secret it never made.
    let parts: Vec<&str> = fresh.split('.').collect();
    assert_eq!(parts.len(), 5, "token {fresh}");
    let unknown = format!(
        "fnlet1.0badc0de.00112233445566778899aabbccddeeff.{}.{}",
        parts[3], parts[4]
    );
    expect_refused(c, "j-unknown", "j-unknown", &unknown, "unknown join token");

    // A sixth agent makes a cluster of its own: its token pins another CA.
    let other = Agent::start_with("cluster-other", settings(&c.ns, OTHER_IP, "o1", Vec::new()));
    let foreign = token_from(&other, &["cluster", "init"]);
    expect_refused(
        c,
        "j-foreign",
        "j-foreign",
        &foreign,
        "the server's CA is not the one the join token pins",
    );
    other.finish();

    expect_refused(
        c,
        "j-alive",
        "n3",
        &fresh,
        "node id \"n3\" is alive in the cluster",
    );

    // n5 leaves, loses its state, and comes back with the token that admitted it.
    let n5 = 4;
    c.nodes[n5].stop();
    let views = c.wait_for("the others see n5 left", SETTLE, |v| {
        v.all_see("n5", "left")
    });
    let generation = views
        .row("n1", "n5")
        .map(|r| r.generation)
        .expect("n1 sees n5");
    std::fs::remove_dir_all(c.nodes[n5].state_dir()).expect("wipe n5's state dir");
    c.nodes[n5].args = join_args(node_ip(0), &c.token);
    match c.nodes[n5].try_restart() {
        Ok(()) => panic!(
            "n5 joined again with the token it joined with before\n{}",
            c.describe()
        ),
        Err(status) => {
            let log = c.nodes[n5].log();
            assert!(
                log.contains("this token already admitted \"n5\""),
                "n5's replayed join was refused without saying why (exit {status}):\n{}",
                tail(&log, 10)
            );
        }
    }

    let wait = Duration::from_millis(2100).saturating_sub(expiring_made.elapsed());
    std::thread::sleep(wait);
    expect_refused(
        c,
        "j-expired",
        "j-expired",
        &expiring,
        "the join token expired at",
    );

    let n1 = &c.nodes[0];
    let refused = handshake_failures(n1, "join_refused") - refused_before;
    assert!(
        refused >= 3.0,
        "n1 counted {refused} refused joins (unknown token, alive node id, replay)"
    );
    let cert = handshake_failures(n1, "certificate") - cert_before;
    assert!(
        cert >= 1.0,
        "n1 counted {cert} certificate failures (the foreign token's joiner)"
    );
    let views = c.views();
    for (observer, rows) in &views.0 {
        let rows = rows.as_ref().unwrap_or_else(|e| panic!("{observer}: {e}"));
        let strangers: Vec<&Row> = rows
            .iter()
            .filter(|r| !(0..NODES).any(|i| r.id == node_id(i)))
            .collect();
        assert!(
            strangers.is_empty(),
            "{observer} lists {strangers:?}\n{views}"
        );
        if let Some(n3) = rows.iter().find(|r| r.id == "n3") {
            assert_eq!(
                n3.addr,
                peer_addr(node_ip(2)),
                "{observer}: n3 moved\n{views}"
            );
        }
        if let Some(r) = rows.iter().find(|r| r.id == "n5") {
            assert_eq!(
                (r.state.as_str(), r.generation),
                ("left", generation),
                "{observer}: n5 is not its old, left self after the refused replay\n{views}"
            );
        }
    }

    // Back with a token it has not used.
    let fresh = token_from(n1, &["cluster", "token", "--ttl", "10m"]);
    c.nodes[n5].args = join_args(node_ip(0), &fresh);
    c.nodes[n5].restart();
    c.nodes[n5].args.clear();
    c.wait_for("n5 alive again everywhere, a new run", SETTLE, |v| {
        v.all_alive()
            && v.0
                .keys()
                .all(|o| v.row(o, "n5").is_some_and(|r| r.generation > generation))
    });
}

/// One stream a stranger sends, and the QUIC close code FRAMES.md gives it on each ALPN
/// (None: not sent there).
struct Poke {
    what: &'static str,
    bytes: Vec<u8>,
    peer: Option<u64>,
    invoke: Option<u64>,
}

impl Poke {
    /// A stream refused alike on both ALPNs.
    fn both(what: &'static str, bytes: Vec<u8>, code: u64) -> Poke {
        Poke {
            what,
            bytes,
            peer: Some(code),
            invoke: Some(code),
        }
    }
}

/// A frame header (FRAMES.md, Frame layout).
fn header(version: u8, kind: u8, reserved: u16, meta_len: u32, body_len: u32) -> Vec<u8> {
    let mut h = vec![version, kind];
    h.extend(reserved.to_be_bytes());
    h.extend(meta_len.to_be_bytes());
    h.extend(body_len.to_be_bytes());
    h
}

fn cat(a: Vec<u8>, b: &[u8]) -> Vec<u8> {
    [a.as_slice(), b].concat()
}

const BAD_VERSION: u64 = 0x100;
const FRAME_TOO_LARGE: u64 = 0x101;
const BAD_FRAME: u64 = 0x102;
const UNEXPECTED_FRAME: u64 = 0x103;
const TRUNCATED: u64 = 0x104;
/// QUIC's CRYPTO_ERROR for TLS alert 120, no_application_protocol.
const NO_ALPN: u64 = 0x100 + 120;

fn pokes() -> Vec<Poke> {
    let join = 0x20;
    let data = 0x03;
    // FRAMES.md's JoinRequest example: well-formed, but a join, not a call.
    let join_meta = br#"{"token_id":"0a1b2c3d","token_secret":"00112233445566778899aabbccddeeff","node_id":"node-c","csr_pem":"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"}"#;
    vec![
        Poke::both(
            "an HTTP request",
            b"GET / HTTP/1.1\r\nhost: n2\r\n\r\n".to_vec(),
            BAD_VERSION,
        ),
        Poke::both(
            "version 2",
            cat(header(2, join, 0, 2, 0), b"{}"),
            BAD_VERSION,
        ),
        Poke::both(
            "a meta over 64 KiB",
            header(1, join, 0, 65537, 0),
            FRAME_TOO_LARGE,
        ),
        Poke::both(
            "a body of 4 GiB",
            header(1, data, 0, 0, u32::MAX),
            FRAME_TOO_LARGE,
        ),
        Poke::both(
            "an unknown kind",
            cat(header(1, 0x7f, 0, 2, 0), b"{}"),
            BAD_FRAME,
        ),
        Poke::both(
            "reserved bits set",
            cat(header(1, join, 1, 2, 0), b"{}"),
            BAD_FRAME,
        ),
        Poke::both(
            "a JoinRequest whose meta is not JSON",
            cat(header(1, join, 0, 9, 0), b"{not json"),
            BAD_FRAME,
        ),
        Poke::both(
            "a Data frame where a request must come",
            cat(header(1, data, 0, 0, 5), b"hello"),
            UNEXPECTED_FRAME,
        ),
        Poke {
            what: "a well-formed JoinRequest (calls only on fnlet-invoke/1)",
            bytes: cat(header(1, join, 0, join_meta.len() as u32, 0), join_meta),
            // On fnlet-peer/1 it is a join, refused in an Error frame: case 2's business.
            peer: None,
            invoke: Some(UNEXPECTED_FRAME),
        },
        Poke::both(
            "a stream ending inside a header",
            header(1, join, 0, 2, 0)[..5].to_vec(),
            TRUNCATED,
        ),
        Poke::both("an empty stream", Vec::new(), TRUNCATED),
    ]
}

/// fnlet-peer-client's report of one connection to `addr` offering `alpn`.
fn poke(c: &Cluster, addr: &str, alpn: &str, bytes: &[u8]) -> Value {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut cmd = common::in_netns(Some(&c.ns.name), common::peer_client());
    cmd.args([addr, alpn, &hex]);
    let out = run(cmd);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fnlet-peer-client: {e}: {}", common::text(&out.stdout)))
}

/// 3. A stranger (no certificate) on n2's QUIC endpoint. On `fnlet-peer/1` (where it may only
///    ask to join) and on `fnlet-invoke/1` (calls only), each malformed or misplaced stream
///    closes its connection with the code FRAMES.md names and is counted; an unknown ALPN
///    fails the handshake and is counted. Through all of it n2 keeps serving.
fn bad_frames(c: &mut Cluster) {
    let target = &c.nodes[1];
    let addr = peer_addr(node_ip(1));
    let bad_before = metric(target, "fnlet_cluster_bad_frames_total");
    let other_before = handshake_failures(target, "other");
    let mut wrong = Vec::new();
    let mut sent = 0;
    for p in pokes() {
        for (alpn, code) in [("fnlet-peer/1", p.peer), ("fnlet-invoke/1", p.invoke)] {
            let Some(code) = code else { continue };
            sent += 1;
            let r = poke(c, &addr, alpn, &p.bytes);
            let ok = r["outcome"] == "closed" && r["code"] == code;
            eprintln!("     {alpn}, {}: {r}", p.what);
            if !ok {
                wrong.push(format!(
                    "{alpn}, {}: expected a close with 0x{code:x}, got {r}",
                    p.what
                ));
            }
        }
    }
    let r = poke(c, &addr, "h3", b"");
    eprintln!("     ALPN h3: {r}");
    if !(r["outcome"] == "transport_error" && r["code"] == NO_ALPN) {
        wrong.push(format!(
            "ALPN h3: expected the handshake refused (0x{NO_ALPN:x}), got {r}"
        ));
    }
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), c.describe());

    let bad = metric(target, "fnlet_cluster_bad_frames_total") - bad_before;
    assert!(
        bad >= f64::from(sent),
        "n2 counted {bad} bad frames for {sent} bad streams"
    );
    let other = handshake_failures(target, "other") - other_before;
    assert!(
        other >= 1.0,
        "n2 counted {other} handshake failures for the unknown ALPN"
    );
    assert_eq!(target.get("/healthz").expect_ok(200).text(), "ok\n");
    c.wait_all_alive("all five still alive", SETTLE);
}

/// 4. kill -9 of n4: every other member sees it down within several times the documented
///    bound; restarted without a token, it is alive again everywhere as a new run.
fn killed_member(c: &mut Cluster) {
    let victim = 3;
    let id = node_id(victim);
    let generation = c
        .views()
        .row("n1", &id)
        .map(|r| r.generation)
        .expect("n1 sees n4");
    c.nodes[victim].kill9();
    // Each observer's states for it, in the order seen (suspect is usually among them, but a
    // member may hear the verdict before its own probe fails).
    let seen = std::cell::RefCell::new(BTreeMap::<String, Vec<String>>::new());
    c.wait_for(&format!("the others see {id} down"), DETECT, |v| {
        let mut seen = seen.borrow_mut();
        for o in v.0.keys() {
            if let Some(r) = v.row(o, &id) {
                let states = seen.entry(o.clone()).or_default();
                if states.last() != Some(&r.state) {
                    states.push(r.state.clone());
                }
            }
        }
        v.all_see(&id, "down")
    });
    eprintln!("     states seen: {:?}", seen.borrow());
    let n1 = &c.nodes[0];
    let gauges = |n1: &Agent| {
        ["alive", "suspect", "down"]
            .map(|s| metric(n1, &format!("fnlet_cluster_members{{state=\"{s}\"}}")))
    };
    assert_eq!(
        gauges(n1),
        [3.0, 0.0, 1.0],
        "n1's fnlet_cluster_members{{state}} (alive, suspect, down) with {id} down"
    );
    c.nodes[victim].restart();
    c.wait_for(
        &format!("{id} alive again everywhere, a new run"),
        SETTLE,
        |v| {
            v.all_alive()
                && v.0
                    .keys()
                    .all(|o| v.row(o, &id).is_some_and(|r| r.generation > generation))
        },
    );
    assert_eq!(
        gauges(&c.nodes[0]),
        [4.0, 0.0, 0.0],
        "n1's fnlet_cluster_members{{state}} (alive, suspect, down) with {id} back"
    );
}

/// 5. SIGTERM of n3: the others show it left (not down); restarted, alive again.
fn leaving_member(c: &mut Cluster) {
    let victim = 2;
    let id = node_id(victim);
    c.nodes[victim].stop();
    c.wait_for(&format!("the others see {id} left"), SETTLE, |v| {
        v.all_see(&id, "left")
    });
    c.nodes[victim].restart();
    c.wait_all_alive(&format!("{id} alive again everywhere"), SETTLE);
}

/// 6. 10% of the packets to the peer port dropped (nftables in the namespace) for 30 s:
///    members may be suspected, never declared down. Then all five alive again.
fn packet_loss(c: &mut Cluster) {
    let start = Instant::now();
    let mut downs = Vec::new();
    let mut suspects = 0;
    let mut polls = 0;
    let dropped;
    {
        let loss = NftTable::input_rule(
            &c.ns,
            "fnlet_loss",
            &format!("udp dport {PEER_PORT} numgen random mod 100 < 10 counter drop"),
        );
        while start.elapsed() < LOSS_RUN {
            let views = c.views();
            polls += 1;
            for (observer, rows) in &views.0 {
                let rows = rows.as_ref().unwrap_or_else(|e| panic!("{observer}: {e}"));
                for r in rows {
                    match r.state.as_str() {
                        "alive" => {}
                        "suspect" => suspects += 1,
                        _ => downs.push(format!(
                            "at {:.1} s {observer} saw {} {}",
                            start.elapsed().as_secs_f64(),
                            r.id,
                            r.state
                        )),
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        dropped = loss.packets();
    }
    eprintln!(
        "     {polls} polls under loss, {suspects} suspect rows seen, {dropped} packets dropped"
    );
    // At least a probe and its ack per member per second: 30 s of them lose dozens.
    assert!(
        dropped > 0,
        "the loss rule dropped nothing: the case tested nothing"
    );
    assert!(
        downs.is_empty(),
        "members declared down under 10% loss:\n{}\n{}",
        downs.join("\n"),
        c.describe()
    );
    c.wait_all_alive("all five alive after the loss", SETTLE);
}

/// 7. A function deployed on n2 answers on every member (its catalog entry and bundle reach
///    them all), each answer naming in `x-fnlet-host` the member that ran it.
fn deploy_once(c: &mut Cluster) {
    let hello = Fixture::sh("hello", "public = true", "echo \"hi $(cat)\"");
    let record = c.nodes[1].deploy(hello.path());
    eprintln!("     deployed on n2: {record}");
    let start = Instant::now();
    let mut ran_on = BTreeMap::new();
    for (i, a) in c.nodes.iter().enumerate() {
        loop {
            let r = a.invoke("hello", b"there");
            if r.status == 200 {
                assert_eq!(r.text(), "hi there\n", "{} answered", node_id(i));
                let host = r.header("x-fnlet-host").unwrap_or_default();
                assert!(
                    (0..NODES).any(|j| host == node_id(j)),
                    "{}'s answer names {host:?} as the host that ran it",
                    node_id(i)
                );
                ran_on.insert(node_id(i), host);
                break;
            }
            assert!(
                start.elapsed() < SETTLE,
                "{} does not serve hello {SETTLE:?} after its deploy on n2: {} {}\n{}",
                node_id(i),
                r.status,
                r.text(),
                c.describe()
            );
            std::thread::sleep(POLL);
        }
    }
    eprintln!(
        "     every member answers: after {:.1} s; asked -> ran on: {ran_on:?}",
        start.elapsed().as_secs_f64()
    );
}

/// The members ranked for `function` as every agent ranks them (cluster/src/route.rs), best
/// first: with all five alive, the first is the function's owner.
fn ranking(function: &str) -> Vec<String> {
    let ids: Vec<String> = (0..NODES).map(node_id).collect();
    fnlet_cluster::route::rank(function, ids.iter().map(String::as_str))
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// The index of member `id` (`n3` is 2).
fn index_of(id: &str) -> usize {
    (0..NODES)
        .find(|&i| node_id(i) == id)
        .unwrap_or_else(|| panic!("{id} is not a member"))
}

/// Calls of `function` each member ran (fnlet_invocations_total, every label set), summed.
fn invocations(c: &Cluster, function: &str) -> f64 {
    let prefix = format!("fnlet_invocations_total{{function=\"{function}\"");
    c.nodes
        .iter()
        .map(|a| {
            let text = a.get("/metrics").expect_ok(200).text();
            text.lines()
                .filter(|l| l.starts_with(&prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

/// Deploys `fixture` on `on` and waits until every member serves `function` (a 200 to
/// `input`).
fn deploy_everywhere(c: &Cluster, on: usize, fixture: &Fixture, function: &str, input: &[u8]) {
    let record = c.nodes[on].deploy(fixture.path());
    eprintln!("     deployed {function} on {}: {record}", node_id(on));
    let start = Instant::now();
    for (i, a) in c.nodes.iter().enumerate() {
        loop {
            let r = a.invoke(function, input);
            if r.status == 200 {
                break;
            }
            assert!(
                start.elapsed() < SETTLE,
                "{} does not serve {function} {SETTLE:?} after its deploy on {}: {} {}\n{}",
                node_id(i),
                node_id(on),
                r.status,
                r.text(),
                c.describe()
            );
            std::thread::sleep(POLL);
        }
    }
}

/// The function cases 8 on call: sleeps as long as its input says, then says it ran.
fn sleeper() -> Fixture {
    Fixture::sh(
        "sleeper",
        "public = true\nmax_concurrency = 20",
        "read s; sleep \"$s\"; echo slept",
    )
}

/// 8. A function is run by its owner, the first member of its rendezvous ranking, whichever
///    member is asked. Eight slow calls at once to one other member spill over: the owner
///    gets no more than its bounded share, so the answers name more than one host; each call
///    succeeds and runs exactly once (the members' invocation counters add up), and the
///    member asked counts each call it sent elsewhere in fnlet_cluster_forwards_total. Then
///    calls arriving on two members spill over by the owner's reported load
///    ([`spill_over_by_reported_load`]).
fn forwarding(c: &mut Cluster) {
    let f = sleeper();
    let rank = ranking("sleeper");
    let owner = rank[0].clone();
    eprintln!("     sleeper's ranking: {rank:?}");
    deploy_everywhere(c, 0, &f, "sleeper", b"0");
    let before = invocations(c, "sleeper");
    for (i, a) in c.nodes.iter().enumerate() {
        let r = a.invoke("sleeper", b"0.1");
        assert_eq!(
            (r.status, r.text()),
            (200, "slept\n".to_string()),
            "{} answered",
            node_id(i)
        );
        let host = r.header("x-fnlet-host").unwrap_or_default();
        assert_eq!(
            host,
            owner,
            "{} had sleeper run on {host:?}, not on its owner\n{}",
            node_id(i),
            c.describe()
        );
    }

    const AT_ONCE: usize = 8;
    let entry = index_of(&rank[1]);
    let forwarded = |c: &Cluster| {
        metric(
            &c.nodes[entry],
            "fnlet_cluster_forwards_total{result=\"ok\"}",
        )
    };
    let forwarded_before = forwarded(c);
    let calls: Vec<_> = (0..AT_ONCE)
        .map(|_| c.nodes[entry].invoke_in_background("sleeper", b"2"))
        .collect();
    let mut hosts = BTreeMap::new();
    for (k, call) in calls.into_iter().enumerate() {
        let r = match call.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("call {k} to {}: {e}\n{}", node_id(entry), c.describe()),
            Err(_) => panic!("call {k} to {}: its thread panicked", node_id(entry)),
        };
        assert_eq!(
            (r.status, r.text()),
            (200, "slept\n".to_string()),
            "call {k} to {}\n{}",
            node_id(entry),
            c.describe()
        );
        let host = r.header("x-fnlet-host").unwrap_or_default();
        *hosts.entry(host).or_insert(0) += 1;
    }
    eprintln!(
        "     {AT_ONCE} calls at once to {}: ran on {hosts:?}",
        node_id(entry)
    );
    assert!(
        hosts.len() > 1,
        "{AT_ONCE} slow calls at once to {} all ran on {hosts:?}: no spill-over\n{}",
        node_id(entry),
        c.describe()
    );
    // The entry counted each call it sent to another member as forwarded.
    let elsewhere = AT_ONCE - hosts.get(&node_id(entry)).copied().unwrap_or(0);
    let counted = forwarded(c) - forwarded_before;
    assert_eq!(
        counted,
        elsewhere as f64,
        "{} counted {counted} calls forwarded, {elsewhere} ran elsewhere",
        node_id(entry)
    );
    let ran = invocations(c, "sleeper") - before;
    assert_eq!(
        ran,
        (NODES + AT_ONCE) as f64,
        "the members ran sleeper {ran} times for {} calls",
        NODES + AT_ONCE
    );
    spill_over_by_reported_load(c, &rank);
}

/// One member's load as another sees it: (load, reported_load, forwarded).
type LoadSeen = (u64, Option<u64>, u64);

/// A member's loads as `fnlet members --json` shows them, by member id.
fn loads_seen(agent: &Agent) -> Result<BTreeMap<String, LoadSeen>, String> {
    let out = agent.cli(&["members", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "fnlet members: {}",
            common::text(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let rows = v.as_array().ok_or_else(|| format!("not an array: {v}"))?;
    rows.iter()
        .map(|r| {
            let id = r["id"].as_str().ok_or_else(|| format!("id in {r}"))?;
            let load = r["load"].as_u64().ok_or_else(|| format!("load in {r}"))?;
            let forwarded = r["forwarded"]
                .as_u64()
                .ok_or_else(|| format!("forwarded in {r}"))?;
            Ok((
                id.to_string(),
                (load, r["reported_load"].as_u64(), forwarded),
            ))
        })
        .collect()
}

/// 8, continued. Calls arriving on two different members: a slow call reaches one member and
///    is forwarded to the owner; the owner reports its load (a LoadReport datagram), and a
///    call then reaching another member, which forwarded nothing itself (its own view alone
///    would send the call to the idle-looking owner), goes to the second-ranked member.
fn spill_over_by_reported_load(c: &mut Cluster, rank: &[String]) {
    let owner = &rank[0];
    let (first, second) = (index_of(&rank[2]), index_of(&rank[3]));
    // The burst above is over: wait until the second entry sees every member idle.
    let start = Instant::now();
    loop {
        let seen = loads_seen(&c.nodes[second]);
        if seen.as_ref().is_ok_and(|s| s.values().all(|v| v.0 == 0)) {
            break;
        }
        assert!(
            start.elapsed() < SETTLE,
            "{} still sees loads {SETTLE:?} after the calls ended: {seen:?}",
            node_id(second)
        );
        std::thread::sleep(POLL);
    }
    let slow = c.nodes[first].invoke_in_background("sleeper", b"5");
    // The owner's report reaches the second entry (within 100 ms; a lost one is sent again
    // within 1 s).
    let start = Instant::now();
    let seen = loop {
        let seen = loads_seen(&c.nodes[second]);
        if let Ok(s) = &seen
            && let Some(&(load, Some(reported), forwarded)) = s.get(owner)
            && reported >= 1
        {
            assert_eq!(
                (forwarded, load),
                (0, reported),
                "{} forwarded nothing to {owner}: {s:?}",
                node_id(second)
            );
            break seen;
        }
        assert!(
            start.elapsed() < SETTLE,
            "{} did not hear {owner}'s load within {SETTLE:?}: {seen:?}",
            node_id(second)
        );
        std::thread::sleep(POLL);
    };
    let exported = metric(
        &c.nodes[second],
        &format!("fnlet_cluster_peer_load{{peer=\"{owner}\"}}"),
    );
    assert!(
        exported >= 1.0,
        "{}'s /metrics: fnlet_cluster_peer_load for {owner} is {exported}",
        node_id(second)
    );
    let r = c.nodes[second].invoke("sleeper", b"0");
    let still_running = !slow.is_finished();
    assert_eq!(r.status, 200, "{}: {}", node_id(second), r.text());
    let host = r.header("x-fnlet-host").unwrap_or_default();
    eprintln!(
        "     a slow call on {} ran on the owner; {} then saw {seen:?} and its call ran on {host}",
        node_id(first),
        node_id(second),
    );
    assert!(
        still_running,
        "the slow call on {} ended before the call on {}: the step cannot tell",
        node_id(first),
        node_id(second)
    );
    assert_eq!(
        host,
        rank[1],
        "with {owner} reporting a call in flight, {}'s call went to {host}, not the second-ranked member\n{}",
        node_id(second),
        c.describe()
    );
    let r = match slow.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("the slow call on {}: {e}", node_id(first)),
        Err(_) => panic!("the slow call's thread panicked"),
    };
    assert_eq!(r.status, 200, "the slow call: {}", r.text());
    assert_eq!(
        r.header("x-fnlet-host").unwrap_or_default(),
        *owner,
        "the slow call on {} ran elsewhere than on the idle owner",
        node_id(first)
    );
}

/// The frames in `bytes`, as (kind, meta); panics on a truncated one.
fn frames(bytes: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 12, "a truncated frame header: {rest:02x?}");
        let len = |at: usize| {
            u32::from_be_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]) as usize
        };
        let (meta_len, body_len) = (len(4), len(8));
        assert!(
            rest.len() >= 12 + meta_len + body_len,
            "a truncated frame: {rest:02x?}"
        );
        let meta = if meta_len == 0 {
            Value::Null
        } else {
            serde_json::from_slice(&rest[12..12 + meta_len])
                .unwrap_or_else(|e| panic!("a frame's meta is not JSON: {e}"))
        };
        out.push((rest[1], meta));
        rest = &rest[12 + meta_len + body_len..];
    }
    out
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// 9. A QUIC caller (fnlet-invoke/1) sending an InvokeRequest that says it was already
///    forwarded (hops 2, and 255; at most 1 is allowed) gets one Error frame, HOP_LIMIT, and
///    the function does not run. A call with hops 0 on the same door (a member that is not
///    sleeper's owner) runs on the owner, under the request id the caller gave it.
fn hop_limit(c: &mut Cluster) {
    const INVOKE_REQUEST: u8 = 0x01;
    const ERROR: u8 = 0x05;
    const RESPONSE_HEAD: u8 = 0x02;
    const HOP_LIMIT: u64 = 0x108;
    let rank = ranking("sleeper");
    let addr = peer_addr(node_ip(index_of(&rank[1])));
    let deadline_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 + 30_000)
        .unwrap_or_default();
    let request = |hops: u8| {
        let meta = serde_json::json!({
            "function": "sleeper",
            "request_id": format!("quic-caller-hops-{hops}"),
            "deadline_ms": deadline_ms,
            "hops": hops,
            "entry": {"kind": "exec"},
        })
        .to_string();
        let body = b"0";
        let h = header(1, INVOKE_REQUEST, 0, meta.len() as u32, body.len() as u32);
        cat(cat(h, meta.as_bytes()), body)
    };
    let before = invocations(c, "sleeper");
    for hops in [2u8, 255] {
        let r = poke(c, &addr, "fnlet-invoke/1", &request(hops));
        eprintln!("     hops {hops}: {r}");
        let answer = unhex(
            r["answer"]
                .as_str()
                .unwrap_or_else(|| panic!("hops {hops}: {r}")),
        );
        let got = frames(&answer);
        assert!(
            got.len() == 1 && got[0].0 == ERROR && got[0].1["code"] == HOP_LIMIT,
            "hops {hops}: expected one Error frame with HOP_LIMIT (0x{HOP_LIMIT:x}), got {got:?}"
        );
    }
    let ran = invocations(c, "sleeper") - before;
    assert_eq!(ran, 0.0, "sleeper ran {ran} times for calls refused");
    let r = poke(c, &addr, "fnlet-invoke/1", &request(0));
    let got = frames(&unhex(
        r["answer"]
            .as_str()
            .unwrap_or_else(|| panic!("hops 0: {r}")),
    ));
    assert!(
        got.first()
            .is_some_and(|(kind, meta)| *kind == RESPONSE_HEAD && meta["status"] == 200),
        "hops 0: expected a ResponseHead with status 200, got {got:?}"
    );
    assert_eq!(
        got[0].1["host"], rank[0],
        "hops 0 on {}: ran on {}, not on sleeper's owner",
        rank[1], got[0].1["host"]
    );
    // The owner ran it under the caller's request id (its log line for the call names it).
    let owner_log = c.nodes[index_of(&rank[0])].log();
    assert!(
        owner_log
            .lines()
            .any(|l| l.contains("invocation ok") && l.contains("request_id=\"quic-caller-hops-0\"")),
        "{} has no 'invocation ok' line for request id quic-caller-hops-0:\n{}",
        rank[0],
        tail(&owner_log, 20)
    );
}

/// 10. A Lambda function (the lambda-rust fixture) called on a member that is not its owner:
///     through the Invoke API (with its log tail) and its function URL, the answers are the
///     owner's (same status, same event seen by the handler, `x-fnlet-host` naming the owner,
///     `X-Amz-Log-Result` carried back); an Event invoke is accepted and run by the owner;
///     `fnlet invoke --quic` at that member's cluster endpoint works too.
fn lambda_forwarded(c: &mut Cluster) {
    let bin = std::fs::read(common::fixture_bootstrap("lambda-rust")).expect("read bootstrap");
    let f = Fixture::new(
        "name = \"lecho\"\nmode = \"lambda\"\npublic = true\nmemory_mb = 96\n",
        &[("bootstrap", &bin, 0o755)],
    );
    let rank = ranking("lecho");
    let (owner, other) = (index_of(&rank[0]), index_of(&rank[1]));
    eprintln!("     lecho's ranking: {rank:?}");
    deploy_everywhere(c, other, &f, "lecho", b"{}");

    let payload = br#"{"stderr":"to the tail","k":"v"}"#.to_vec();
    let tail_of = |r: &common::agent::Resp| -> String {
        use base64::Engine;
        let b64 = r.header("x-amz-log-result").unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let mut seen = Vec::new();
    for i in [owner, other] {
        let r = c.nodes[i].invoke_lambda("lecho", payload.clone(), &[("X-Amz-Log-Type", "Tail")]);
        let body = r.json();
        let tail = tail_of(&r);
        let host = r.header("x-fnlet-host").unwrap_or_default();
        eprintln!(
            "     Invoke API on {}: {} from {host}",
            node_id(i),
            r.status
        );
        assert_eq!(
            host,
            rank[0],
            "Invoke API on {}: ran on {host:?}",
            node_id(i)
        );
        assert!(
            tail.contains("to the tail") && tail.contains("REPORT RequestId: "),
            "Invoke API on {}: the log tail is {tail:?}",
            node_id(i)
        );
        seen.push((
            r.status,
            body["echo"].clone(),
            body["function"].clone(),
            r.header("x-amz-executed-version"),
        ));

        let r = c.nodes[i].request(
            reqwest::Method::POST,
            "/fn/lecho/some/path?x=1",
            false,
            Some(reqwest::blocking::Body::from(b"{\"k\":\"v\"}".to_vec())),
        );
        let host = r.header("x-fnlet-host").unwrap_or_default();
        eprintln!(
            "     function URL on {}: {} from {host}",
            node_id(i),
            r.status
        );
        assert_eq!(
            host,
            rank[0],
            "function URL on {}: ran on {host:?}",
            node_id(i)
        );
        let event = r.json()["echo"].clone();
        seen.push((
            r.status,
            event["rawPath"].clone(),
            event["rawQueryString"].clone(),
            event["body"].as_str().map(str::to_string),
        ));
    }
    assert_eq!(
        seen[0], seen[2],
        "the Invoke API, on the owner and through another member"
    );
    assert_eq!(
        seen[1], seen[3],
        "the function URL, on the owner and through another member"
    );
    assert_eq!(seen[0].0, 200, "{seen:?}");
    assert_eq!(seen[1].0, 200, "{seen:?}");

    // An Event invoke through the other member: accepted (202) by the owner, which runs it.
    let r = c.nodes[other].invoke_lambda(
        "lecho",
        br#"{"async":1}"#.to_vec(),
        &[("X-Amz-Invocation-Type", "Event")],
    );
    assert_eq!(
        r.status,
        202,
        "Event invoke through {}: {}",
        node_id(other),
        r.text()
    );
    assert_eq!(r.header("x-fnlet-host").as_deref(), Some(rank[0].as_str()));
    assert!(
        r.header("x-amzn-requestid")
            .is_some_and(|id| !id.is_empty())
    );
    let ran = "fnlet_events_attempts_total{function=\"lecho\",result=\"success\"}";
    let started = std::time::Instant::now();
    while metric(&c.nodes[owner], ran) < 1.0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the owner {} did not run the event",
            node_id(owner)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "     Event invoke on {}: 202 from {}, run there",
        node_id(other),
        rank[0]
    );

    let ca = c.nodes[other].state_dir().join("cluster/ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let quic = peer_addr(node_ip(other));
    let out = c.nodes[other].cli(&[
        "invoke",
        "lecho",
        "--quic",
        &quic,
        "--ca",
        ca,
        "-d",
        r#"{"q":1}"#,
    ]);
    let stdout = common::text(&out.stdout);
    assert!(
        out.status.success(),
        "fnlet invoke lecho --quic {quic}: {}\n{stdout}{}",
        out.status,
        common::text(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("fnlet invoke --quic printed {stdout:?}: {e}"));
    assert_eq!(v["echo"], serde_json::json!({"q": 1}), "{v}");
}

/// What became of one call: `200 HOST`, or `STATUS KIND: MESSAGE`.
fn outcome(r: &common::agent::Resp) -> String {
    if r.status == 200 {
        format!("200 {}", r.header("x-fnlet-host").unwrap_or_default())
    } else {
        let (kind, message) = r.error();
        format!("{} {kind}: {message}", r.status)
    }
}

/// 11. kill -9 of sleeper's owner while a slow call forwarded to it runs: that call answers
///     502 `peer_lost` naming the owner (sleeper is not idempotent). Calls that follow, one
///     after another from the same member, each succeed (run elsewhere), or fail the same way
///     while the owner is not yet found gone; within several times the detection bound five
///     in a row succeed on another member. Restarted, the owner is alive again everywhere and
///     runs sleeper's calls again.
fn owner_killed(c: &mut Cluster) {
    let rank = ranking("sleeper");
    let (owner, entry) = (index_of(&rank[0]), index_of(&rank[1]));
    let owner_id = rank[0].clone();
    let r = c.nodes[entry].invoke("sleeper", b"0");
    assert_eq!(outcome(&r), format!("200 {owner_id}"), "before the kill");

    let in_flight = c.nodes[entry].invoke_in_background("sleeper", b"3");
    std::thread::sleep(Duration::from_secs(1));
    c.nodes[owner].kill9();
    let killed = Instant::now();
    let r = match in_flight.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("the call in flight: {e}"),
        Err(_) => panic!("the call in flight: its thread panicked"),
    };
    eprintln!(
        "     the call in flight: {}, {:.1} s after the kill",
        outcome(&r),
        killed.elapsed().as_secs_f64()
    );
    let message = r.expect_error(502, "peer_lost");
    assert!(message.contains(&owner_id), "peer_lost names {message:?}");

    let mut outcomes = Vec::new();
    let mut in_a_row = 0;
    while in_a_row < 5 {
        assert!(
            killed.elapsed() < DETECT,
            "calls to {} after the kill of {owner_id}: not five in a row served by another \
             member within {DETECT:?}: {outcomes:?}\n{}",
            node_id(entry),
            c.describe()
        );
        let r = c.nodes[entry].invoke("sleeper", b"0.1");
        let o = outcome(&r);
        let lost = r.status == 502 && o.contains("peer_lost") && o.contains(&owner_id);
        assert!(
            r.status == 200 || lost,
            "a call after the kill of {owner_id}: {o}; so far {outcomes:?}"
        );
        if r.status == 200 && !o.ends_with(&owner_id) {
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
        outcomes.push(o);
        std::thread::sleep(POLL);
    }
    eprintln!(
        "     five in a row elsewhere after {:.1} s; {} calls: {outcomes:?}",
        killed.elapsed().as_secs_f64(),
        outcomes.len()
    );

    c.nodes[owner].restart();
    c.wait_all_alive(&format!("{owner_id} alive again everywhere"), SETTLE);
    let back = Instant::now();
    loop {
        let r = c.nodes[entry].invoke("sleeper", b"0");
        let o = outcome(&r);
        assert_eq!(r.status, 200, "a call after {owner_id}'s return: {o}");
        if o.ends_with(&owner_id) {
            eprintln!(
                "     {owner_id} runs sleeper again: after {:.1} s",
                back.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "{owner_id} is back but sleeper still runs on another member: {o}\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    }
}

/// `twin` on `a`: what it answers (200 only), and its version and sha256 in `fnlet ls --json`.
fn twin_on(a: &Agent) -> Result<(String, String, String), String> {
    let r = a.invoke("twin", b"");
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.text()));
    }
    let out = a.cli(&["ls", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("fnlet ls --json: {e}: {}", common::text(&out.stdout)))?;
    let f = v["functions"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "twin"))
        .ok_or_else(|| format!("fnlet ls --json has no twin: {v}"))?;
    Ok((r.text(), f["version"].to_string(), f["sha256"].to_string()))
}

/// 12. UDP between {n1, n2} and {n3, n4, n5} dropped both ways (nftables): each side sees
///     the other down. `twin` deployed on n1 (`one`) and on n4 (`four`): each side serves
///     its own. Healed, all five are alive again everywhere, and within a minute every member
///     serves the same twin (one of the two) and `fnlet ls --json` gives that deploy's version
///     and sha256 everywhere.
fn partition(c: &mut Cluster) {
    let left = [0usize, 1];
    let right = [2usize, 3, 4];
    let set = |side: &[usize]| {
        let ips: Vec<String> = side.iter().map(|&i| node_ip(i).to_string()).collect();
        format!("{{ {} }}", ips.join(", "))
    };
    let side_of = |id: &str| left.contains(&index_of(id));
    // What each deploy made: answer -> (version, sha256).
    let mut records = BTreeMap::new();
    {
        let split = NftTable::input_rule(
            &c.ns,
            "fnlet_split",
            &format!(
                "ip saddr {} ip daddr {} ip protocol udp counter drop",
                set(&left),
                set(&right)
            ),
        );
        split.add_rule(&format!(
            "ip saddr {} ip daddr {} ip protocol udp counter drop",
            set(&right),
            set(&left)
        ));
        c.wait_for("each side sees the other down", DETECT, |v| {
            v.0.iter().all(|(o, rows)| {
                rows.as_ref().is_ok_and(|rows| {
                    rows.iter().all(|r| {
                        let want = if side_of(&r.id) == side_of(o) {
                            "alive"
                        } else {
                            "down"
                        };
                        r.state == want
                    })
                })
            })
        });
        let one = Fixture::sh("twin", "public = true", "echo one");
        let four = Fixture::sh("twin", "public = true", "echo four");
        for (i, f, text) in [(0, &one, "one\n"), (3, &four, "four\n")] {
            let record = c.nodes[i].deploy(f.path());
            records.insert(
                text,
                (record["version"].to_string(), record["sha256"].to_string()),
            );
        }
        let start = Instant::now();
        for (side, text) in [(&left[..], "one\n"), (&right[..], "four\n")] {
            for &i in side {
                loop {
                    let r = c.nodes[i].invoke("twin", b"");
                    if r.status == 200 && r.text() == text {
                        break;
                    }
                    assert!(
                        start.elapsed() < SETTLE,
                        "{} does not serve its side's twin ({text:?}): {} {}\n{}",
                        node_id(i),
                        r.status,
                        r.text(),
                        c.describe()
                    );
                    std::thread::sleep(POLL);
                }
            }
        }
        eprintln!(
            "     each side serves its own twin: after {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    let healed = Instant::now();
    c.wait_all_alive(
        "all five alive again after the healing",
        Duration::from_secs(60),
    );
    let mut last = Vec::new();
    loop {
        let got: Vec<_> = c.nodes.iter().map(twin_on).collect();
        // The same everywhere, and one of the two deploys: its answer, version and sha256.
        let agreed = got.iter().all(|g| g.is_ok() && *g == got[0])
            && got[0].as_ref().is_ok_and(|(text, version, sha)| {
                records.get(text.as_str()) == Some(&(version.clone(), sha.clone()))
            });
        if agreed {
            eprintln!(
                "     every member serves the same twin after {:.1} s: {:?}",
                healed.elapsed().as_secs_f64(),
                got[0]
            );
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(60),
            "a minute after the healing the members do not agree on twin \
             (answer, version, sha256): {last:?}\n{}",
            c.describe()
        );
        last = got;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `fnlet keys create --json` on `agent`: (id, secret).
fn key_create(agent: &Agent, description: &str) -> (String, String) {
    let out = agent.cli(&["keys", "create", "--description", description, "--json"]);
    assert!(
        out.status.success(),
        "fnlet keys create on {}: {}\n{}",
        agent.test,
        out.status,
        common::text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("fnlet keys create --json");
    let s = |k: &str| v[k].as_str().map(str::to_string).expect(k);
    (s("access_key_id"), s("secret_access_key"))
}

/// The access key ids `fnlet keys ls --json` lists on `agent`.
fn key_ids(agent: &Agent) -> Vec<String> {
    let out = agent.cli(&["keys", "ls", "--json"]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("fnlet keys ls --json");
    v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["access_key_id"].as_str().map(str::to_string))
        .collect()
}

/// A Lambda Invoke API call to `function` on `agent`, signed (SigV4, by curl's own signer,
/// inside the namespace) with `key`, or unsigned: (status, x-amzn-ErrorType, x-fnlet-host).
fn signed_invoke(
    c: &Cluster,
    agent: &Agent,
    function: &str,
    key: Option<&(String, String)>,
) -> (u16, String, String) {
    let mut cmd = c.ns.cmd("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "30", "-D", "-"])
        .args(["-o", "/dev/null", "-H", "Content-Type: application/json"])
        .args(["--data-binary", r#"{"signed":true}"#]);
    if let Some((id, secret)) = key {
        cmd.args(["--aws-sigv4", "aws:amz:us-east-1:lambda"])
            .args(["--user", &format!("{id}:{secret}")]);
    }
    cmd.arg(format!(
        "{}/2015-03-31/functions/{function}/invocations",
        agent.base_url()
    ));
    let head = common::text(&run(cmd).stdout);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    (status, header("x-amzn-errortype"), header("x-fnlet-host"))
}

/// 13. Access keys are the cluster's. A function that is not public is deployed on n5. The key
///     n1 made before `fnlet cluster init` (case 1) and a key made on n1 now sign Invoke API
///     calls n3 accepts (unsigned ones it refuses); n2 lists both and removes the second,
///     which n1 then refuses within seconds (the removal is pushed to every member at once;
///     the 10 s digest swaps make up for a lost push). n4, which joined through n2, is
///     restarted: it still lets the first key in and keeps the second out. Every member holds
///     n1's sealing key (0600), and no secret is in clear in a state dir or a log.
fn access_keys(c: &mut Cluster) {
    let bin = std::fs::read(common::fixture_bootstrap("lambda-rust")).expect("read bootstrap");
    let f = Fixture::new(
        "name = \"kecho\"\nmode = \"lambda\"\nmemory_mb = 96\n",
        &[("bootstrap", &bin, 0o755)],
    );
    c.nodes[4].deploy(f.path());
    let made = key_create(&c.nodes[0], "made on n1");
    let early = c.early_key.clone();
    let (n1, n3, n4) = (&c.nodes[0], &c.nodes[2], &c.nodes[3]);

    let start = Instant::now();
    loop {
        let got = signed_invoke(c, n3, "kecho", Some(&made));
        if got.0 == 200 {
            eprintln!(
                "     n1's new key signs a call n3 takes: after {:.1} s (ran on {})",
                start.elapsed().as_secs_f64(),
                got.2
            );
            break;
        }
        assert!(
            start.elapsed() < SETTLE,
            "n3 does not take a call signed by n1's key {SETTLE:?} after it was made: {got:?}\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    }
    let got = signed_invoke(c, n3, "kecho", Some(&early));
    assert_eq!(
        got.0, 200,
        "n3, the key n1 made before the cluster: {got:?}"
    );
    let got = signed_invoke(c, n3, "kecho", None);
    assert_eq!(
        (got.0, got.1.as_str()),
        (403, "MissingAuthenticationTokenException"),
        "n3, unsigned: {got:?}"
    );
    let forged = (made.0.clone(), "x".repeat(40));
    let got = signed_invoke(c, n3, "kecho", Some(&forged));
    assert_eq!(
        (got.0, got.1.as_str()),
        (403, "InvalidSignatureException"),
        "n3, n1's key id with a wrong secret: {got:?}"
    );

    // Removed on n2 (which lists both), refused on n1 soon after.
    let listed = key_ids(&c.nodes[1]);
    assert!(
        listed.contains(&made.0) && listed.contains(&early.0),
        "n2 lists {listed:?}, not both {} and {}",
        made.0,
        early.0
    );
    let rm = c.nodes[1].cli(&["keys", "rm", &made.0]);
    assert!(rm.status.success(), "{}", common::text(&rm.stderr));
    let removed = Instant::now();
    loop {
        let got = signed_invoke(c, n1, "kecho", Some(&made));
        if got.0 == 403 {
            assert_eq!(got.1, "UnrecognizedClientException", "{got:?}");
            eprintln!(
                "     removed on n2, refused on n1: after {:.1} s",
                removed.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            removed.elapsed() < SETTLE,
            "n1 still takes the key n2 removed {SETTLE:?} later: {got:?}\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    }
    let start = Instant::now();
    for (i, a) in c.nodes.iter().enumerate() {
        loop {
            if !key_ids(a).contains(&made.0) {
                break;
            }
            assert!(
                start.elapsed() < SETTLE,
                "{} still lists the removed key",
                node_id(i)
            );
            std::thread::sleep(POLL);
        }
    }
    // kecho reaches n4's catalog by a push, or by the next digest swap when the push was lost
    // (a connection still re-handshaking after case 12's partition): wait for it there first.
    let start = Instant::now();
    let got = loop {
        let got = signed_invoke(c, n4, "kecho", Some(&early));
        if got.1 != "ResourceNotFoundException" {
            break got;
        }
        assert!(
            start.elapsed() < SETTLE,
            "n4 does not know kecho {SETTLE:?} after the checks above: {got:?}\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    };
    assert_eq!(
        got.0, 200,
        "n4, the key n1 made before the cluster: {got:?}"
    );

    // n4 restarted: it checks keys from its own state dir.
    let restart = Instant::now();
    c.nodes[3].stop();
    c.nodes[3].restart();
    eprintln!(
        "     n4 stopped and started again: {:.1} s",
        restart.elapsed().as_secs_f64()
    );
    let n4 = &c.nodes[3];
    let got = signed_invoke(c, n4, "kecho", Some(&made));
    assert_eq!(
        (got.0, got.1.as_str()),
        (403, "UnrecognizedClientException"),
        "n4 restarted, the removed key: {got:?}"
    );
    let start = Instant::now();
    loop {
        // A refusal would be for good; anything else (the cluster still finding n4 again)
        // is waited out.
        let got = signed_invoke(c, n4, "kecho", Some(&early));
        assert_ne!(got.0, 403, "n4 restarted refuses the key: {got:?}");
        if got.0 == 200 {
            break;
        }
        assert!(
            start.elapsed() < SETTLE,
            "n4 restarted does not answer a signed call: {got:?}\n{}",
            c.describe()
        );
        std::thread::sleep(POLL);
    }
    c.wait_all_alive("n4 alive again everywhere", SETTLE);

    // Every member holds the same sealing key, private; no secret is in clear in any state
    // dir (keys.redb, the catalog, the logs) or in what any agent logged.
    use std::os::unix::fs::PermissionsExt;
    let sealing = |a: &Agent| {
        let path = a.state_dir().join("cluster/keys.key");
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", path.display());
        std::fs::read(&path).expect("read the sealing key")
    };
    let first = sealing(&c.nodes[0]);
    assert_eq!(first.len(), 32);
    for a in &c.nodes {
        assert!(
            sealing(a) == first,
            "{}'s sealing key is not n1's",
            label(a)
        );
        let status = a.admin(reqwest::Method::GET, "/v1/status", None).json();
        assert_eq!(
            status["cluster"]["shared_access_keys"],
            Value::Bool(true),
            "{}'s status: {status}",
            label(a)
        );
        let secrets = [made.1.as_bytes(), early.1.as_bytes()];
        let hits = files_containing(&a.state_dir(), &secrets);
        assert!(hits.is_empty(), "a secret in clear in {hits:?}");
        for secret in [&made.1, &early.1] {
            assert!(
                !a.log().contains(secret.as_str()),
                "a secret in {}'s log",
                label(a)
            );
        }
    }
}

/// Every file under `dir` whose bytes contain one of `needles` (all of the same length),
/// but for deployed bundles (`bundles/`: the functions' own files, which the agent never
/// writes to; reading them all makes this slow).
fn files_containing(dir: &std::path::Path, needles: &[&[u8]]) -> Vec<std::path::PathBuf> {
    let len = needles[0].len();
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(t) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if t.is_dir() {
                if p.file_name().is_none_or(|n| n != "bundles") {
                    stack.push(p);
                }
            } else if t.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(len).any(|w| needles.contains(&w)))
            {
                hits.push(p);
            }
        }
    }
    hits
}
