//! Host capacity and density against the real agent: live instances' memory limits stay within
//! `[capacity]`, idle instances of other functions are evicted least recently used first, a
//! call with nothing left to evict is refused 429 naming the resource, an old version's idle
//! instance (kept for qualified calls) is evicted for the active version's call, `fnlet status` and
//! /metrics show committed vs capacity; and many idle warm instances live and are reaped to
//! nothing. Needs root and tests/fixtures/lambda-noop built (scripts/build-fixtures.sh).

mod common;

use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};
use reqwest::Method;
use serde_json::Value;

/// The Lambda no-op under `name`, with more manifest lines.
fn noop(name: &str, extra: &str) -> Fixture {
    let bin = std::fs::read(common::fixture_bootstrap("lambda-noop")).expect("read bootstrap");
    let manifest = format!(
        "name = \"{name}\"\nmode = \"lambda\"\npublic = true\ninit_timeout_s = 60\n{extra}\n"
    );
    Fixture::new(&manifest, &[("bootstrap", &bin, 0o755)])
}

fn describe(agent: &Agent, name: &str) -> Value {
    agent
        .admin(Method::GET, &format!("/v1/functions/{name}"), None)
        .json()
}

fn alive(agent: &Agent, name: &str) -> u64 {
    describe(agent, name)["instances"]["alive"]
        .as_u64()
        .unwrap_or(0)
}

fn status(agent: &Agent) -> Value {
    agent.admin(Method::GET, "/v1/status", None).json()
}

fn metric(agent: &Agent, line_start: &str) -> Option<f64> {
    let text = agent.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_until(what: &str, limit: Duration, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} not within {limit:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names of the sandboxes holding processes now (a cgroup leaf, in each v1 hierarchy).
fn sandboxes(agent: &Agent) -> std::collections::BTreeSet<String> {
    agent
        .running_sandboxes()
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .collect()
}

/// Sandboxes of `function` holding processes now (their cgroup leaves are `<function>-N`).
fn sandboxes_of(agent: &Agent, function: &str) -> usize {
    sandboxes(agent)
        .iter()
        .filter(|n| n.starts_with(&format!("{function}-")))
        .count()
}

const MIB: u64 = 1 << 20;

#[test]
fn idle_instances_of_other_functions_are_evicted_least_recently_used_first() {
    let agent = Agent::start_with(
        "capacity-evict",
        Settings {
            prepare_ahead: false,
            capacity_extra: "memory_mb = 100\n".into(),
            ..Default::default()
        },
    );
    for (name, mb) in [("a", 32), ("b", 32), ("c", 48)] {
        agent.deploy(noop(name, &format!("memory_mb = {mb}\ncpus = 0.1")).path());
    }
    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["capacity"], 100 * MIB, "{cap}");
    assert_eq!(cap["memory_bytes"]["committed"], 0, "{cap}");

    // a, then b, then a again: b is now the least recently used.
    for name in ["a", "b", "a"] {
        agent
            .invoke_lambda(name, b"{}".to_vec(), &[])
            .expect_ok(200);
    }
    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["committed"], 64 * MIB, "{cap}");
    assert_eq!(cap["instances"]["committed"], 2, "{cap}");
    assert_eq!(cap["cpus"]["committed"], 0.2, "{cap}");

    // c needs 48 MiB: 64 + 48 > 100, so one idle instance goes: b's, not a's.
    agent.invoke_lambda("c", b"{}".to_vec(), &[]).expect_ok(200);
    assert_eq!(alive(&agent, "b"), 0, "{}", describe(&agent, "b"));
    assert_eq!(alive(&agent, "a"), 1, "{}", describe(&agent, "a"));
    assert_eq!(alive(&agent, "c"), 1, "{}", describe(&agent, "c"));
    wait_until("b's sandbox gone", Duration::from_secs(20), &agent, || {
        sandboxes_of(&agent, "b") == 0
    });
    assert_eq!(sandboxes_of(&agent, "a"), 1);
    assert!(
        agent
            .log()
            .contains("evicted an idle instance to make room"),
        "{}",
        agent.log()
    );

    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["committed"], 80 * MIB, "{cap}");
    assert_eq!(cap["instances"]["committed"], 2, "{cap}");
    assert_eq!(cap["evictions"], 1, "{cap}");
    assert_eq!(
        metric(&agent, "fnlet_committed{resource=\"memory\"}"),
        Some((80 * MIB) as f64)
    );
    assert_eq!(
        metric(&agent, "fnlet_capacity{resource=\"memory\"}"),
        Some((100 * MIB) as f64)
    );
    assert_eq!(
        metric(&agent, "fnlet_committed{resource=\"instances\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&agent, "fnlet_capacity_evictions_total"), Some(1.0));
    // The CLI shows the same figures.
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("memory 80 of 100 MiB") && text.contains("instances 2 of 2048; 1 evicted"),
        "{text}"
    );

    // b again: a is now the least recently used idle instance and goes.
    agent.invoke_lambda("b", b"{}".to_vec(), &[]).expect_ok(200);
    assert_eq!(alive(&agent, "a"), 0);
    assert_eq!(alive(&agent, "c"), 1);
    assert_eq!(status(&agent)["capacity"]["evictions"], 2);
    agent.finish();
}

/// An exec function with `reuse_sandbox`: its idle sandbox holds its share of the host until
/// it is evicted for another function's call, least recently used first, like an idle Lambda
/// instance.
#[test]
fn a_reused_exec_sandbox_holds_its_room_and_is_evicted_for_another_function() {
    let agent = Agent::start_with(
        "capacity-reuse",
        Settings {
            prepare_ahead: false,
            capacity_extra: "memory_mb = 100\n".into(),
            ..Default::default()
        },
    );
    agent.deploy(
        Fixture::sh(
            "r",
            "public = true\nreuse_sandbox = true\nmemory_mb = 64\ncpus = 0.1",
            "echo ok",
        )
        .path(),
    );
    agent.deploy(noop("c", "memory_mb = 48\ncpus = 0.1").path());
    agent.invoke("r", b"").expect_ok(200);
    assert_eq!(alive(&agent, "r"), 1, "{}", describe(&agent, "r"));
    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["committed"], 64 * MIB, "{cap}");

    // c needs 48 MiB: r's idle sandbox goes.
    agent.invoke_lambda("c", b"{}".to_vec(), &[]).expect_ok(200);
    assert_eq!(alive(&agent, "r"), 0, "{}", describe(&agent, "r"));
    wait_until("r's sandbox gone", Duration::from_secs(20), &agent, || {
        sandboxes_of(&agent, "r") == 0
    });
    // And r's next call evicts c's idle instance in turn.
    agent.invoke("r", b"").expect_ok(200);
    assert_eq!(alive(&agent, "c"), 0, "{}", describe(&agent, "c"));
    assert_eq!(alive(&agent, "r"), 1, "{}", describe(&agent, "r"));
    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["committed"], 64 * MIB, "{cap}");
    assert_eq!(cap["evictions"], 2, "{cap}");
    agent.finish();
}

/// A kept exec sandbox provisioned by `min_instances` holds its room as a provisioned Lambda
/// instance does: another function's call is refused rather than evicting it.
#[test]
fn a_provisioned_kept_sandbox_is_not_evicted() {
    let agent = Agent::start_with(
        "capacity-reuse-min",
        Settings {
            prepare_ahead: false,
            capacity_extra: "memory_mb = 100\n".into(),
            ..Default::default()
        },
    );
    agent.deploy(
        Fixture::sh(
            "p",
            "public = true\nreuse_sandbox = true\nmin_instances = 1\nmemory_mb = 64\ncpus = 0.1",
            "echo ok",
        )
        .path(),
    );
    wait_until(
        "a provisioned sandbox",
        Duration::from_secs(60),
        &agent,
        || describe(&agent, "p")["instances"]["idle"] == 1,
    );
    agent.deploy(noop("c", "memory_mb = 48\ncpus = 0.1").path());
    let r = agent.invoke_lambda("c", b"{}".to_vec(), &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(alive(&agent, "p"), 1, "{}", describe(&agent, "p"));
    assert_eq!(status(&agent)["capacity"]["evictions"], 0);
    // Its own calls use it.
    agent.invoke("p", b"").expect_ok(200);
    assert_eq!(describe(&agent, "p")["instances"]["peak"], 1);
    agent.finish();
}

#[test]
fn a_call_with_nothing_to_evict_is_refused_naming_the_resource() {
    let agent = Agent::start_with(
        "capacity-refuse",
        Settings {
            prepare_ahead: false,
            capacity_extra: "memory_mb = 100\n".into(),
            ..Default::default()
        },
    );
    // Two provisioned instances hold 96 MiB; they are never evicted.
    agent.deploy(
        noop(
            "held",
            "memory_mb = 48\nmin_instances = 2\nmax_concurrency = 2",
        )
        .path(),
    );
    wait_until(
        "two warm instances",
        Duration::from_secs(60),
        &agent,
        || describe(&agent, "held")["instances"]["idle"] == 2,
    );
    agent.deploy(noop("other", "memory_mb = 32").path());
    agent.deploy(noop("huge", "memory_mb = 128").path());

    // The Invoke API: Lambda's throttle, naming memory.
    let r = agent.invoke_lambda("other", b"{}".to_vec(), &[]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype").as_deref(),
        Some("TooManyRequestsException"),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    let body = r.json();
    let message = body["message"].as_str().or(body["Message"].as_str());
    assert!(
        message.is_some_and(|m| m.contains("memory") && m.contains("96 of 100 MiB")),
        "{body}"
    );
    // The function URL: the JSON error names the resource in its kind and message.
    let m = agent
        .invoke("other", b"{}")
        .expect_error(429, "capacity_memory");
    assert!(m.contains("capacity.memory_mb"), "{m}");
    // Larger than the whole capacity: refused at once, the same way.
    let m = agent
        .invoke("huge", b"{}")
        .expect_error(429, "capacity_memory");
    assert!(m.contains("needs 128 MiB"), "{m}");
    assert_eq!(alive(&agent, "held"), 2, "provisioned instances stay");
    assert_eq!(
        metric(
            &agent,
            "fnlet_invocation_errors_total{function=\"other\",kind=\"capacity_memory\"}"
        ),
        Some(2.0)
    );
    assert_eq!(status(&agent)["capacity"]["evictions"], 0);

    // The provisioned function goes: its room is given back, and the call runs.
    agent
        .admin(Method::DELETE, "/v1/functions/held", None)
        .expect_ok(204);
    wait_until(
        "held's room given back",
        Duration::from_secs(20),
        &agent,
        || status(&agent)["capacity"]["memory_bytes"]["committed"] == 0,
    );
    agent
        .invoke_lambda("other", b"{}".to_vec(), &[])
        .expect_ok(200);
    assert_eq!(
        status(&agent)["capacity"]["memory_bytes"]["committed"],
        32 * MIB
    );
    agent.finish();
}

#[test]
fn an_old_versions_idle_instance_makes_room_for_the_active_one() {
    let agent = Agent::start_with(
        "capacity-versions",
        Settings {
            prepare_ahead: false,
            capacity_extra: "memory_mb = 40\n".into(),
            ..Default::default()
        },
    );
    // Room for one 32 MiB instance. Version 1, then version 2 (the active one).
    agent.deploy(noop("v", "memory_mb = 32\ntimeout_s = 5").path());
    agent.deploy(noop("v", "memory_mb = 32\ntimeout_s = 6").path());
    // A qualified call keeps version 1's instance warm, holding the room.
    let r = agent.invoke_lambda("v:1", b"{}".to_vec(), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("1"));
    assert_eq!(alive(&agent, "v"), 1, "{}", describe(&agent, "v"));
    // The active version's call evicts it rather than wait behind it (before: the call
    // spun on the idle instance it could not use, and never answered).
    let started = Instant::now();
    let r = agent.invoke_lambda("v", b"{}".to_vec(), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("2"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status(&agent)["capacity"]["evictions"], 1);
    assert_eq!(alive(&agent, "v"), 1, "{}", describe(&agent, "v"));
    // And back: version 1's call evicts version 2's idle instance in turn.
    let r = agent.invoke_lambda("v:1", b"{}".to_vec(), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("1"));
    assert_eq!(status(&agent)["capacity"]["evictions"], 2);
    agent.finish();
}

/// The agent's descriptors of the kinds an instance holds: sockets (its Runtime API listener
/// and connection, which would keep its network namespace alive), pipes and pidfds.
fn instance_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| {
                    let l = l.to_string_lossy();
                    l.starts_with("socket:") || l.starts_with("pipe:") || l.contains("pidfd")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Many idle warm instances at once, up to `capacity.max_instances` (past it a call is refused
/// naming the limit), then reaped to nothing: no instance cgroup, process or agent descriptor
/// is left. `FNLET_TEST_INSTANCES` sets how many (default 100: 10 functions x 10; the 1,000 of
/// issue 17 run in `benches/run.sh density`, 1,000 here with the variable: a test's uid range
/// holds 64 functions, so they are spread over 50).
#[test]
fn many_idle_instances_live_and_are_reaped_to_nothing() {
    let total: usize = std::env::var("FNLET_TEST_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let functions = total.div_ceil(10).clamp(1, 50);
    let per = total.div_ceil(functions);
    let total = functions * per;
    let agent = Agent::start_with(
        "capacity-density",
        Settings {
            prepare_ahead: false,
            capacity_extra: format!("max_instances = {total}\n"),
            ..Default::default()
        },
    );
    let fds_before = instance_fds(agent.pid());
    let names: Vec<String> = (0..functions).map(|i| format!("d{i}")).collect();
    for name in &names {
        let m =
            format!("memory_mb = 16\ncpus = 0.01\nmin_instances = {per}\nmax_concurrency = {per}");
        agent.deploy(noop(name, &m).path());
    }
    // Generous: starting them is the machine's whole work for a while.
    let limit = Duration::from_secs(60 + total as u64 / 5);
    // Committed from the moment each starts; idle once its runtime asked for an event.
    wait_until("every instance warm", limit, &agent, || {
        status(&agent)["capacity"]["instances"]["committed"] == total as u64
            && names
                .iter()
                .all(|n| describe(&agent, n)["instances"]["idle"] == per as u64)
    });
    for name in &names {
        assert_eq!(alive(&agent, name), per as u64, "{name}");
    }
    assert_eq!(sandboxes(&agent).len(), total);
    // Full: another function's call is refused, naming the limit (nothing is evictable:
    // every instance is provisioned).
    agent.deploy(noop("extra", "memory_mb = 16").path());
    let m = agent
        .invoke("extra", b"{}")
        .expect_error(429, "capacity_instances");
    assert!(
        m.contains(&format!(
            "{total} instances live of capacity.max_instances {total}"
        )),
        "{m}"
    );
    // A warm one still answers.
    agent
        .invoke_lambda("d0", b"{}".to_vec(), &[])
        .expect_ok(200);

    // A new version without min_instances: every old instance is reaped.
    for name in &names {
        let m = format!("memory_mb = 16\ncpus = 0.01\nkeep_alive_s = 0\nmax_concurrency = {per}");
        agent.deploy(noop(name, &m).path());
    }
    wait_until("every instance reaped", limit, &agent, || {
        status(&agent)["capacity"]["instances"]["committed"] == 0
            && agent.running_sandboxes().is_empty()
    });
    wait_until("no cgroup left", Duration::from_secs(30), &agent, || {
        common::agent::sandbox_cgroups(&agent.cgroup_root()).is_empty()
    });
    wait_until(
        "no instance process left",
        Duration::from_secs(30),
        &agent,
        || agent.function_processes().is_empty(),
    );
    // Each instance held descriptors (its Runtime API socket, pipes, pidfd): all closed, so
    // no network namespace is kept alive by the agent either.
    wait_until(
        "descriptors closed",
        Duration::from_secs(30),
        &agent,
        || instance_fds(agent.pid()) <= fds_before + 4,
    );
    let cap = status(&agent)["capacity"].clone();
    assert_eq!(cap["memory_bytes"]["committed"], 0, "{cap}");
    assert_eq!(cap["cpus"]["committed"], 0.0, "{cap}");
    agent.finish();
}

/// Two hosts on 127.0.0.1, each with room for one 64 MiB instance: a call that finds no room
/// where it lands or where the ranking sends it runs on the other host (capacity spill), and
/// only when neither has room does one wait and get 429 naming the resource.
#[test]
fn a_cluster_spills_calls_to_the_host_with_room() {
    common::require_root();
    let settings = |args: Vec<String>| Settings {
        capacity_extra: "memory_mb = 100\n".into(),
        queue_timeout_ms: 1500,
        args,
        ..Settings::default()
    };
    let a = Agent::start_with("capacity-spill-a", settings(Vec::new()));
    let init = a.cli(&["cluster", "init"]);
    assert!(init.status.success(), "fnlet cluster init: {init:?}");
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let b = Agent::start_with(
        "capacity-spill-b",
        settings(vec![
            "--join".into(),
            format!("127.0.0.1:{}", a.peer_port),
            "--token".into(),
            token,
        ]),
    );
    let slow = Fixture::sh(
        "slow",
        "public = true\nmemory_mb = 64\ncpus = 0.1\ntimeout_s = 60\nmax_concurrency = 4",
        "sleep 6; echo done",
    );
    a.deploy(slow.path());
    let logs = || format!("--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    // Both serve it, and each sees the other alive.
    wait_until("b serving slow", Duration::from_secs(60), &b, || {
        b.admin(Method::GET, "/v1/functions/slow", None).status == 200
    });
    for host in [&a, &b] {
        wait_until("both members alive", Duration::from_secs(60), host, || {
            let v = host.admin(Method::GET, "/v1/cluster/members", None).json();
            v["members"]
                .as_array()
                .is_some_and(|m| m.len() == 2 && m.iter().all(|m| m["state"] == "alive"))
        });
    }
    let committed = |agent: &Agent| status(agent)["capacity"]["instances"]["committed"].as_u64();
    // One call after another reaches a, each once the one before holds its instance.
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(a.invoke_in_background("slow", b""));
        let held = |n: u64| committed(&a).unwrap_or(0) + committed(&b).unwrap_or(0) >= n;
        if i < 2 {
            wait_until(
                "the call to hold an instance",
                Duration::from_secs(30),
                &a,
                || held(i + 1),
            );
        }
    }
    let answers: Vec<_> = calls
        .into_iter()
        .map(|c| c.join().expect("caller thread").expect("the call's answer"))
        .collect();
    let ran: Vec<(u16, Option<String>, String)> = answers
        .iter()
        .map(|r| (r.status, r.header("x-fnlet-host"), r.text()))
        .collect();
    let ok: Vec<_> = ran.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(
        ok.len(),
        2,
        "two calls fit the two hosts: {ran:#?}\n{}",
        logs()
    );
    assert_ne!(ok[0].1, ok[1].1, "one on each host: {ran:#?}\n{}", logs());
    let refused: Vec<_> = ran.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(refused.len(), 1, "{ran:#?}\n{}", logs());
    assert!(refused[0].2.contains("capacity_memory"), "{ran:#?}");
    b.finish();
    a.finish();
}
