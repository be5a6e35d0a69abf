//! Hardening: what concurrent admin calls must not break. Deploys racing each other (and their
//! garbage collection) never lose an active version's bundle; a function whose bundle is gone
//! says so instead of failing every call.

mod common;

use common::agent::{Agent, Fixture};
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
