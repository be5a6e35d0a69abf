//! Hardening: what concurrent admin calls and several agents on one host must not break.
//! Deploys racing each other (and their garbage collection) never lose an active version's
//! bundle; a function whose bundle is gone says so instead of failing every call; an agent
//! owns its state dir and its cgroup root, and a second agent on either is refused before it
//! touches the first one's sandboxes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};
use reqwest::Method;
use serde_json::Value;

/// Every function the agent lists, with its active version, answers 200 from that version; and
/// every version it keeps has its bundle on disk.
fn assert_all_runnable(agent: &Agent) {
    let list = agent.admin(Method::GET, "/v1/functions", None);
    let list = list.expect_ok(200).json();
    let functions = list["functions"].as_array().expect("functions");
    assert!(!functions.is_empty(), "{list}");
    for f in functions {
        let name = f["name"].as_str().expect("name");
        let version = f["version"].as_u64().expect("version");
        let r = agent.invoke(name, b"");
        r.expect_ok(200);
        assert_eq!(
            r.header("x-fnlet-version"),
            Some(version.to_string()),
            "{name} runs another version than the store's active one"
        );
        assert!(r.text().starts_with(name), "{name}: {}", r.text());
        let d = agent.admin(Method::GET, &format!("/v1/functions/{name}"), None);
        let d = d.expect_ok(200).json();
        for v in d["versions"].as_array().expect("versions") {
            let sha = v["sha256"].as_str().expect("sha256");
            let bundle = agent.state_dir().join("bundles").join(sha);
            assert!(
                bundle.is_dir(),
                "{name} version {} has no bundle {}",
                v["version"],
                bundle.display()
            );
        }
    }
}

#[test]
fn concurrent_deploys_keep_every_active_version_runnable_across_a_restart() {
    let mut agent = Agent::start("deploys");
    // Four clients deploy one name at once, three more a name each, five rounds; the first
    // round's four are the same content (one bundle for all of them).
    std::thread::scope(|s| {
        for t in 0..7 {
            let agent = &agent;
            s.spawn(move || {
                let name = if t < 4 {
                    "same".to_string()
                } else {
                    format!("own{t}")
                };
                for round in 0..5 {
                    let body = if t < 4 && round == 0 {
                        format!("echo {name} common")
                    } else {
                        format!("echo {name} {t} {round}")
                    };
                    let f = Fixture::sh(&name, "public = true\ntimeout_s = 10", &body);
                    agent.deploy(f.path());
                }
            });
        }
    });
    assert_all_runnable(&agent);
    agent.stop();
    agent.restart();
    assert_all_runnable(&agent);
    agent.finish();
}

#[test]
fn a_function_whose_bundle_is_gone_is_failed_until_redeployed() {
    let mut agent = Agent::start("lostbundle");
    let lost = Fixture::sh("lost", "public = true\ntimeout_s = 10", "echo lost");
    let v = agent.deploy(lost.path());
    let sha = v["sha256"].as_str().expect("sha256").to_string();
    agent.deploy(Fixture::sh("kept", "public = true\ntimeout_s = 10", "echo kept").path());
    agent.stop();
    let bundle = agent.state_dir().join("bundles").join(&sha);
    std::fs::remove_dir_all(&bundle).expect("remove the bundle");
    agent.restart();

    let d = agent.admin(Method::GET, "/v1/functions/lost", None);
    let d = d.expect_ok(200).json();
    assert_eq!(d["status"], "failed", "{d}");
    let reason = d["status_reason"].as_str().expect("status_reason");
    assert!(
        reason.contains(&sha) && reason.contains("redeploy"),
        "{reason}"
    );
    let list = agent.admin(Method::GET, "/v1/functions", None);
    let list = list.expect_ok(200).json();
    let status = |name: &str| -> Value {
        list["functions"]
            .as_array()
            .expect("functions")
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["status"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(status("lost"), "failed", "{list}");
    assert_eq!(status("kept"), "active", "{list}");

    let msg = agent
        .invoke("lost", b"")
        .expect_error(503, "function_failed");
    assert!(msg.contains(&sha) && msg.contains("redeploy"), "{msg}");
    let r = agent.invoke_lambda("lost", b"{}".to_vec(), &[]);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype").as_deref(),
        Some("ResourceConflictException")
    );
    assert!(r.text().contains("Failed"), "{}", r.text());
    assert_eq!(agent.invoke("kept", b"").expect_ok(200).text(), "kept\n");

    // A redeploy of the same content brings the bundle back.
    let again = agent.deploy(lost.path());
    assert_eq!(again["sha256"], sha.as_str());
    assert_eq!(agent.invoke("lost", b"").expect_ok(200).text(), "lost\n");
    let d = agent.admin(Method::GET, "/v1/functions/lost", None);
    assert_eq!(d.expect_ok(200).json()["status"], "active");
    agent.finish();
}

/// A function that runs until it gets SIGUSR1, then answers "released".
fn held(name: &str) -> Fixture {
    Fixture::sh(
        name,
        "public = true\ntimeout_s = 120",
        "trap 'echo released; exit 0' USR1\nwhile :; do sleep 0.1; done",
    )
}

/// The command name of process `pid`.
fn comm(pid: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc").join(pid).join("comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// The parent of process `pid` (/proc/PID/stat: `pid (comm) state ppid ...`).
fn parent(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1).map(str::to_string)
}

/// The function's shell in each of `leaves` (sandbox cgroups), by its command name; not the
/// copies it forks for each `sleep`, which bear its name until they exec.
fn shells(leaves: &[PathBuf]) -> Vec<String> {
    let mut pids: Vec<String> = leaves
        .iter()
        .flat_map(|l| {
            std::fs::read_to_string(l.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            comm(p).as_deref() == Some("run.sh")
                && parent(p).and_then(|pp| comm(&pp)).as_deref() != Some("run.sh")
        })
        .collect();
    pids.sort();
    pids.dedup();
    pids
}

/// Waits (up to 10 s) for the shell of a running `function` on `agent`: its sandbox cgroups
/// and its pids. A sandbox's processes appear before the function's exec names them.
fn wait_shells(agent: &Agent, function: &str) -> (Vec<PathBuf>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaves = agent.wait_running(function, 1);
        let pids = shells(&leaves);
        if !pids.is_empty() {
            return (leaves, pids);
        }
        assert!(Instant::now() < deadline, "{function}'s shell never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets a held call finish.
fn release(pids: &[String]) {
    assert!(!pids.is_empty(), "no shell to release");
    for p in pids {
        let ok = Command::new("kill")
            .args(["-USR1", p])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -USR1 {p}");
    }
}

#[test]
fn a_second_agent_on_the_same_cgroup_root_is_refused_and_the_first_keeps_serving() {
    let first = Agent::start("sharedroot");
    first.deploy(held("hold").path());
    first.deploy(Fixture::sh("quick", "public = true\ntimeout_s = 10", "echo quick").path());
    let call = first.invoke_in_background("hold", b"");
    let (leaves, pids) = wait_shells(&first, "hold");

    let second = Agent::try_start_with(
        "sharedroot2",
        Settings {
            cgroup_root: Some(first.root.clone()),
            ..Settings::default()
        },
    );
    let refused = match second {
        Ok(_) => panic!("a second agent started on the cgroup root {}", first.root),
        Err(r) => r,
    };
    assert!(!refused.status.success(), "{}", refused.log);
    let log = &refused.log;
    assert!(
        log.contains(&first.root)
            && log.contains(&format!("pid {}", first.pid()))
            && log.contains(&first.state_dir().display().to_string()),
        "the refusal names the root, the first agent's pid ({}) and state dir ({}):\n{log}",
        first.pid(),
        first.state_dir().display()
    );
    assert!(!log.contains("previous agent"), "{log}");

    // The first agent's sandbox lived through it, and its call ends as the function says.
    assert!(leaves.iter().all(|l| l.exists()), "{leaves:?}");
    assert_eq!(shells(&leaves), pids);
    release(&pids);
    let r = call.join().expect("call thread").expect("answer");
    assert_eq!(r.expect_ok(200).text(), "released\n");
    assert_eq!(first.invoke("quick", b"").expect_ok(200).text(), "quick\n");
    first.finish();
}

#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() {
    let first = Agent::start("shareddir");
    first.deploy(Fixture::sh("quick", "public = true\ntimeout_s = 10", "echo quick").path());
    let refused = match Agent::try_start_with(
        "shareddir2",
        Settings {
            state_dir: Some(first.state_dir()),
            ..Settings::default()
        },
    ) {
        Ok(_) => panic!("a second agent started on {}", first.state_dir().display()),
        Err(r) => r,
    };
    assert!(!refused.status.success(), "{}", refused.log);
    assert!(
        refused
            .log
            .contains(&first.state_dir().display().to_string())
            && refused.log.contains(&format!("pid {}", first.pid())),
        "the refusal names the state dir and the first agent's pid ({}):\n{}",
        first.pid(),
        refused.log
    );
    assert_eq!(first.invoke("quick", b"").expect_ok(200).text(), "quick\n");
    first.finish();
}

#[test]
fn agents_with_their_own_roots_run_side_by_side() {
    let a = Agent::start("side-a");
    a.deploy(held("hold").path());
    let call_a = a.invoke_in_background("hold", b"");
    let (leaves_a, pids_a) = wait_shells(&a, "hold");

    // B's start (which reaps what a predecessor left under its own root) leaves A's call be.
    let b = Agent::start("side-b");
    assert_ne!(a.root, b.root);
    b.deploy(held("hold").path());
    let call_b = b.invoke_in_background("hold", b"");
    let (leaves_b, pids_b) = wait_shells(&b, "hold");
    assert_eq!(shells(&leaves_a), pids_a);
    release(&pids_a);
    let r = call_a.join().expect("call thread").expect("answer");
    assert_eq!(r.expect_ok(200).text(), "released\n");

    // A's stop (which kills whatever is left under its root) leaves B's call be.
    a.finish();
    assert_eq!(shells(&leaves_b), pids_b);
    release(&pids_b);
    let r = call_b.join().expect("call thread").expect("answer");
    assert_eq!(r.expect_ok(200).text(), "released\n");
    b.finish();
}
