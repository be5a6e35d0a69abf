//! `fnlet invoke NAME --quic ADDR:PORT` against the real agent: the call goes over QUIC to its
//! cluster endpoint (`fnlet-invoke/1`, the agent checked against the cluster CA) and prints,
//! says and exits exactly as the same call over HTTP. Needs root; the Lambda case needs the
//! fixtures built by scripts/build-fixtures.sh.

mod common;

use common::agent::{Agent, Fixture};
use reqwest::Method;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `s` with each request id (8-4-4-4-12 hex digits) as `<id>`: every call has its own.
fn ids_masked(s: &str) -> String {
    let is_id = |w: &[u8]| {
        w.len() == 36
            && w.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    };
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b.len() - i >= 36 && is_id(&b[i..i + 36]) {
            out.push_str("<id>");
            i += 36;
        } else {
            let c = s[i..].chars().next().expect("a char at a char boundary");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `fnlet invoke ARGS` over HTTP, then over QUIC; both outputs.
fn both(agent: &Agent, args: &[&str]) -> (std::process::Output, std::process::Output) {
    let quic = format!("127.0.0.1:{}", agent.peer_port);
    let mut over_quic = vec!["invoke"];
    over_quic.extend_from_slice(args);
    over_quic.extend(["--quic", quic.as_str()]);
    let mut over_http = vec!["invoke"];
    over_http.extend_from_slice(args);
    (agent.cli(&over_http), agent.cli(&over_quic))
}

#[test]
fn fnlet_invoke_over_quic_says_what_it_says_over_http() {
    let agent = Agent::start("quic-cli");
    let init = agent.cli(&["cluster", "init"]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let public = Fixture::sh("echo", "public = true\ntimeout_s = 2", "printf 'got:'; cat");
    let private = Fixture::sh("private", "timeout_s = 2", "echo secret");
    let failing = Fixture::sh(
        "failing",
        "public = true\ntimeout_s = 2",
        "echo oops >&2; exit 3",
    );
    for f in [&public, &private, &failing] {
        agent.deploy(f.path());
    }
    let bin = std::fs::read(common::fixture_bootstrap("lambda-rust")).expect("read bootstrap");
    let lambda = Fixture::new(
        "name = \"lam\"\nmode = \"lambda\"\ntimeout_s = 5\n",
        &[("bootstrap", &bin, 0o755)],
    );
    agent.deploy(lambda.path());

    // Same stdout, stderr and exit status: output, refusals with their hints, a failing
    // function, a private one with the token from the state dir.
    for args in [
        &["echo", "-d", "abc"][..],
        &["nope"],
        &["private"],
        &["failing", "--json"],
    ] {
        let (over_http, over_quic) = both(&agent, args);
        assert_eq!(over_quic.status.code(), over_http.status.code(), "{args:?}");
        let (o, e) = (&over_quic, &over_http);
        assert_eq!(
            ids_masked(&text(&o.stdout)),
            ids_masked(&text(&e.stdout)),
            "{args:?}"
        );
        assert_eq!(
            ids_masked(&text(&o.stderr)),
            ids_masked(&text(&e.stderr)),
            "{args:?}"
        );
    }
    let (ok, _) = both(&agent, &["echo", "-d", "abc"]);
    assert_eq!(
        (ok.status.code(), text(&ok.stdout).as_str()),
        (Some(0), "got:abc")
    );
    let (refused, _) = both(&agent, &["nope"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("not_found"),
        "{}",
        text(&refused.stderr)
    );

    // A Lambda-mode function goes through the Invoke API either way: its event echoed back.
    let (over_http, over_quic) = both(&agent, &["lam", "-d", "{\"a\":1}"]);
    assert_eq!(
        over_quic.status.code(),
        Some(0),
        "{}",
        text(&over_quic.stderr)
    );
    let echoed = |o: &std::process::Output| -> Value {
        let v: Value = serde_json::from_slice(&o.stdout).expect("JSON");
        v["echo"].clone()
    };
    assert_eq!(echoed(&over_quic), echoed(&over_http));
    assert_eq!(echoed(&over_quic)["a"], 1);

    // -v: the status, the agent's request id and the version, as over HTTP.
    let quic = format!("127.0.0.1:{}", agent.peer_port);
    let v = agent.cli(&["invoke", "echo", "-v", "--quic", &quic]);
    let said = text(&v.stderr);
    assert!(said.contains("200"), "{said}");
    assert!(ids_masked(&said).contains("<id>"), "{said}");

    // Another cluster's CA: the agent is not the one asked for (exit 3, cannot be reached).
    let other = tempfile::tempdir().expect("tempdir");
    let theirs = Agent::start("quic-cli-other");
    let init = theirs.cli(&["cluster", "init"]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let their_ca = theirs.state_dir().join("cluster/ca.pem");
    let wrong = agent.cli(&[
        "invoke",
        "echo",
        "--quic",
        &quic,
        "--ca",
        their_ca.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(wrong.status.code(), Some(3), "{}", text(&wrong.stderr));
    assert!(
        text(&wrong.stderr).contains("certificate"),
        "{}",
        text(&wrong.stderr)
    );
    // No CA at all: a usage error naming the file.
    let missing = other.path().join("ca.pem");
    let none = agent.cli(&[
        "invoke",
        "echo",
        "--quic",
        &quic,
        "--ca",
        missing.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(none.status.code(), Some(2), "{}", text(&none.stderr));
    assert!(
        text(&none.stderr).contains("--ca"),
        "{}",
        text(&none.stderr)
    );

    // The HTTP answers name the host too.
    let r = agent.request(Method::POST, "/fn/echo", false, None);
    assert_eq!(
        r.header("x-fnlet-host").as_deref(),
        Some(agent.node_id.as_str())
    );
    theirs.finish();
    agent.finish();
}
