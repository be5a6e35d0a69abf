//! `fnlet agent` end to end: the real binary on a free port with its own state dir, cgroup root
//! and uid range, driven over HTTP and through the CLI. Every failure is provoked for real, and
//! every test ends by stopping the agent and checking that it left no cgroup, process or mount.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::agent::{Agent, Fixture, Resp, Settings, sandbox_cgroups, zip_of};
use reqwest::Method;
use reqwest::blocking::Body;
use serde_json::{Value, json};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_version(v: &Value, name: &str, version: u64) {
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["version"], version, "{v}");
    assert_eq!(v["active"], true, "{v}");
    let sha = v["sha256"].as_str().unwrap_or_default();
    assert!(
        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "sha256: {v}"
    );
    assert!(v["size_bytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(
        v["created_at"].as_str().is_some_and(|t| t.contains('T')),
        "{v}"
    );
}

fn versions_of(v: &Value) -> Vec<(u64, bool)> {
    v["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions: {v}"))
        .iter()
        .map(|x| (x["version"].as_u64().unwrap(), x["active"] == true))
        .collect()
}

fn names(list: &Value) -> Vec<String> {
    list["functions"]
        .as_array()
        .unwrap_or_else(|| panic!("no functions: {list}"))
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deploy_invoke_redeploy_rollback_and_remove() {
    let agent = Agent::start("lifecycle");
    let v1 = Fixture::sh(
        "greet",
        "public = true\ntimeout_s = 2\n[env]\nGREETING = \"hi\"",
        "echo \"v1 $GREETING $(cat)\"\necho \"stderr of v1\" >&2",
    );
    let v2 = Fixture::sh(
        "greet",
        "public = true\ntimeout_s = 2\n[env]\nGREETING = \"hello\"",
        "echo \"v2 $GREETING $(cat)\"",
    );

    assert_version(&agent.deploy(v1.path()), "greet", 1);
    let r = agent.invoke("greet", b"abc");
    assert_eq!(r.expect_ok(200).text(), "v1 hi abc\n");
    assert_eq!(r.header("x-fnlet-version").as_deref(), Some("1"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        r.header("x-fnlet-host").as_deref(),
        Some(agent.node_id.as_str())
    );
    let first_request = r.header("x-fnlet-request-id").expect("request id");
    assert_eq!(first_request.len(), 36, "{first_request}");

    assert_version(&agent.deploy(v2.path()), "greet", 2);
    let r = agent.invoke("greet", b"abc");
    assert_eq!(r.expect_ok(200).text(), "v2 hello abc\n");
    assert_eq!(r.header("x-fnlet-version").as_deref(), Some("2"));
    assert_ne!(r.header("x-fnlet-request-id").unwrap(), first_request);

    let d = agent.admin(Method::GET, "/v1/functions/greet", None);
    let d = d.expect_ok(200).json();
    assert_eq!(d["version"], 2, "{d}");
    assert_eq!(d["manifest"]["env"]["GREETING"], "hello", "{d}");
    assert!(
        d["uid"]
            .as_u64()
            .is_some_and(|u| agent.uids.contains(&(u as u32))),
        "{d}"
    );
    assert_eq!(versions_of(&d), [(2, true), (1, false)]);
    let vs = agent.admin(Method::GET, "/v1/functions/greet/versions", None);
    assert_eq!(
        versions_of(&vs.expect_ok(200).json()),
        [(2, true), (1, false)]
    );
    let list = agent.admin(Method::GET, "/v1/functions", None);
    let list = list.expect_ok(200).json();
    assert_eq!(names(&list), ["greet"]);
    assert_eq!(list["functions"][0]["version"], 2);

    // Rollback with no body: the version before the active one.
    let rb = agent.admin(Method::POST, "/v1/functions/greet/rollback", None);
    assert_version(&rb.expect_ok(200).json(), "greet", 1);
    let r = agent.invoke("greet", b"abc");
    assert_eq!(r.expect_ok(200).text(), "v1 hi abc\n");
    assert_eq!(r.header("x-fnlet-version").as_deref(), Some("1"));
    // There is nothing before version 1.
    agent
        .admin(Method::POST, "/v1/functions/greet/rollback", None)
        .expect_error(400, "bad_request");

    let rb = agent.admin(
        Method::POST,
        "/v1/functions/greet/rollback",
        Some(br#"{"to": 2}"#),
    );
    assert_version(&rb.expect_ok(200).json(), "greet", 2);
    assert_eq!(
        agent.invoke("greet", b"x").expect_ok(200).text(),
        "v2 hello x\n"
    );
    agent
        .admin(
            Method::POST,
            "/v1/functions/greet/rollback",
            Some(br#"{"to": 7}"#),
        )
        .expect_error(404, "not_found");
    agent
        .admin(
            Method::POST,
            "/v1/functions/greet/rollback",
            Some(b"{not json"),
        )
        .expect_error(400, "bad_request");

    // The log holds the agent's notes and what the function wrote to stderr, by request.
    let logs = agent.admin(Method::GET, "/v1/functions/greet/logs?tail=100", None);
    assert_eq!(
        logs.expect_ok(200).header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let lines: Vec<Value> = logs
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let stderr_line = lines
        .iter()
        .find(|l| l["stream"] == "stderr")
        .unwrap_or_else(|| panic!("no stderr line in {lines:?}"));
    assert_eq!(stderr_line["line"], "stderr of v1");
    assert_eq!(stderr_line["request_id"], first_request.as_str());
    assert_eq!(stderr_line["function"], "greet");
    assert_eq!(stderr_line["version"], 1);
    assert!(
        lines
            .iter()
            .any(|l| l["stream"] == "agent" && l["line"] == "rolled back to version 1"),
        "{lines:?}"
    );

    agent
        .admin(Method::DELETE, "/v1/functions/greet", None)
        .expect_ok(204);
    agent.invoke("greet", b"abc").expect_error(404, "not_found");
    agent
        .admin(Method::GET, "/v1/functions/greet", None)
        .expect_error(404, "not_found");
    agent
        .admin(Method::DELETE, "/v1/functions/greet", None)
        .expect_error(404, "not_found");
    let list = agent.admin(Method::GET, "/v1/functions", None);
    assert_eq!(names(&list.expect_ok(200).json()), Vec::<String>::new());
    agent.finish();
}

#[test]
fn cli_deploy_invoke_ls_rollback_rm() {
    let agent = Agent::start("cli");
    // Not public: every call, invoke included, needs the token the CLI reads from the state dir.
    let one = Fixture::sh("clifn", "timeout_s = 2", "echo \"one $(cat)\"");
    let two = Fixture::sh("clifn", "timeout_s = 2", "echo \"two $(cat)\"");
    let broken = Fixture::sh("broken", "timeout_s = 2", "echo 'it broke' >&2; exit 4");

    let o = agent.cli(&["deploy", one.path_str(), "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("deploy --json");
    assert_version(&v, "clifn", 1);
    let o = agent.cli(&["invoke", "clifn", "-d", "x"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "one x\n");

    let o = agent.cli(&["deploy", two.path_str()]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("clifn version 2"), "{}", stdout(&o));
    assert_eq!(
        stdout(&agent.cli(&["invoke", "clifn", "-d", "x"])),
        "two x\n"
    );

    let o = agent.cli(&["ls", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let list: Value = serde_json::from_slice(&o.stdout).expect("ls --json");
    assert_eq!(names(&list), ["clifn"]);
    assert_eq!(list["functions"][0]["version"], 2);
    let o = agent.cli(&["ls"]);
    assert!(
        o.status.success() && stdout(&o).lines().any(|l| l.starts_with("clifn ")),
        "{o:?}"
    );

    let o = agent.cli(&["rollback", "clifn"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&agent.cli(&["invoke", "clifn", "-d", "x"])),
        "one x\n"
    );
    let o = agent.cli(&["rollback", "clifn", "--to", "2", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("rollback --json");
    assert_version(&v, "clifn", 2);
    assert_eq!(
        stdout(&agent.cli(&["invoke", "clifn", "-d", "x"])),
        "two x\n"
    );
    let o = agent.cli(&["rollback", "clifn", "--to", "9"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");

    // A failing function: status 1, the kind on stderr.
    assert!(agent.cli(&["deploy", broken.path_str()]).status.success());
    let o = agent.cli(&["invoke", "broken"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("function_error"), "{}", stderr(&o));

    let o = agent.cli(&["rm", "clifn"]);
    assert!(o.status.success(), "{o:?}");
    let o = agent.cli(&["invoke", "clifn", "-d", "x"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("not_found"), "{}", stderr(&o));
    let list: Value = serde_json::from_slice(&agent.cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(names(&list), ["broken"]);

    // No agent there: status 3.
    let o = std::process::Command::new(common::fnlet())
        .args(["ls"])
        .env(
            "FNLET_ENDPOINT",
            format!("http://127.0.0.1:{}", common::agent::free_port()),
        )
        .env("FNLET_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    agent.finish();
}

#[test]
fn function_failures_have_their_status_and_kind() {
    // No sandboxes built ahead: the test counts what is left after each failure.
    let agent = Agent::start_with(
        "failures",
        Settings {
            prepare_ahead: false,
            ..Settings::default()
        },
    );
    let probe = std::fs::read(common::probe()).expect("read the probe");
    // A 32 MB function whose run.sh runs the probe's 100 MB allocation.
    let hog = |name: &str, script: &str| {
        Fixture::new(
            &format!(
                "name = \"{name}\"\nentrypoint = \"run.sh\"\nmemory_mb = 32\ntimeout_s = 10\npublic = true\n"
            ),
            &[
                ("run.sh", format!("#!/bin/sh\n{script}\n").as_bytes(), 0o755),
                ("probe", &probe, 0o755),
            ],
        )
    };
    // The function itself killed for memory; and a child killed while the function exits 0:
    // still out of memory (the answer's path reads the group's OOM count, not only the exit
    // status).
    let child_hog = hog(
        "child-hog",
        "/var/task/probe alloc 100\necho survived\nexit 0",
    );
    let hog = hog("hog", "exec /var/task/probe alloc 100");
    for f in [
        Fixture::sh(
            "slow",
            "public = true\ntimeout_s = 1",
            "sleep 10 & sleep 10; echo late",
        ),
        hog,
        child_hog,
        Fixture::sh("segv", "public = true\ntimeout_s = 2", "kill -SEGV $$"),
        Fixture::sh(
            "fail",
            "public = true\ntimeout_s = 2",
            "echo oops >&2; exit 3",
        ),
    ] {
        agent.deploy(f.path());
    }

    let started = Instant::now();
    let r = agent.invoke("slow", b"");
    let took = started.elapsed();
    let msg = r.expect_error(504, "timeout");
    assert!(msg.contains("1s"), "{msg}");
    assert_eq!(r.header("x-fnlet-version").as_deref(), Some("1"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "a 1 s timeout answered after {took:?}"
    );

    for name in ["hog", "child-hog"] {
        let r = agent.invoke(name, b"");
        let msg = r.expect_error(502, "out_of_memory");
        assert!(msg.contains("32 MB"), "{name}: {msg}");
    }

    let msg = agent.invoke("segv", b"").expect_error(502, "crashed");
    assert!(msg.contains("SIGSEGV"), "{msg}");

    let msg = agent
        .invoke("fail", b"")
        .expect_error(502, "function_error");
    assert!(msg.contains("exit status 3"), "{msg}");

    // Each failed sandbox is gone already, with everything it started, before its answer.
    assert_eq!(sandbox_cgroups(&agent.root), Vec::<PathBuf>::new());
    assert_eq!(
        common::agent::processes_of_uids(&agent.uids),
        Vec::<String>::new()
    );

    // A success is answered as soon as the function has ended: its sandbox's teardown (the
    // init's exit, the cgroup's removal) and the host capacity it holds follow the answer, and
    // leave nothing.
    let ok = Fixture::sh(
        "fine",
        "public = true\ntimeout_s = 2\nmemory_mb = 48",
        "sleep 30 >/dev/null 2>&1 & echo fine",
    );
    agent.deploy(ok.path());
    for _ in 0..5 {
        let r = agent.invoke("fine", b"");
        r.expect_ok(200);
        assert_eq!(r.text(), "fine\n");
    }
    let committed = || {
        agent.admin(Method::GET, "/v1/status", None).json()["capacity"]["memory_bytes"]["committed"]
            .as_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sandbox_cgroups(&agent.root).is_empty()
        && common::agent::processes_of_uids(&agent.uids).is_empty()
        && committed() == Some(0))
    {
        assert!(
            Instant::now() < deadline,
            "after the answers: cgroups {:?}, processes {:?}, memory committed {:?}",
            sandbox_cgroups(&agent.root),
            common::agent::processes_of_uids(&agent.uids),
            committed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.finish();
}

#[test]
fn requests_are_refused_with_the_right_status() {
    let agent = Agent::start("refusals");
    let public = Fixture::sh("open", "public = true\ntimeout_s = 2", "wc -c");
    let private = Fixture::sh("closed", "timeout_s = 2", "echo secret");
    agent.deploy(public.path());
    agent.deploy(private.path());

    let r = agent.invoke("nope", b"");
    r.expect_error(404, "not_found");
    // A refusal is an invocation answer too: it names the host that gave it.
    assert_eq!(
        r.header("x-fnlet-host").as_deref(),
        Some(agent.node_id.as_str())
    );
    agent
        .invoke("Not-A-Name", b"")
        .expect_error(404, "not_found");
    agent.get("/no/such/route").expect_error(404, "not_found");

    // 100 MiB against the default max_request_mb of 6: refused by its Content-Length...
    let big = vec![b'x'; 100 << 20];
    let msg = agent
        .request(
            Method::POST,
            "/fn/open",
            false,
            Some(Body::from(big.clone())),
        )
        .expect_error(413, "payload_too_large");
    assert!(msg.contains(&(6u64 << 20).to_string()), "{msg}");
    // ...and streamed without one.
    let chunked = Body::new(std::io::Cursor::new(big));
    agent
        .request(Method::POST, "/fn/open", false, Some(chunked))
        .expect_error(413, "payload_too_large");
    // Just under the limit passes.
    let under = vec![b'y'; (6 << 20) - 1];
    let r = agent.invoke("open", &under);
    assert_eq!(r.expect_ok(200).text().trim(), ((6 << 20) - 1).to_string());

    // Non-public functions need the token.
    agent
        .invoke("closed", b"")
        .expect_error(401, "unauthorized");
    let r = agent.request(Method::POST, "/fn/closed", true, None);
    assert_eq!(r.expect_ok(200).text(), "secret\n");

    // Admin calls need the token: none, or a wrong one, is 401 and changes nothing.
    let bundle = Fixture::sh("sneaky", "", "true").tar_gz();
    for (method, path) in [
        (Method::GET, "/v1/status"),
        (Method::GET, "/v1/functions"),
        (Method::POST, "/v1/functions"),
        (Method::GET, "/v1/functions/open"),
        (Method::DELETE, "/v1/functions/open"),
        (Method::GET, "/v1/functions/open/versions"),
        (Method::POST, "/v1/functions/open/rollback"),
        (Method::GET, "/v1/functions/open/logs"),
    ] {
        let body = (method == Method::POST).then(|| Body::from(bundle.clone()));
        agent
            .request(method.clone(), path, false, body)
            .expect_error(401, "unauthorized");
        let wrong = agent
            .http_with_token(method.clone(), path, &"0".repeat(64))
            .send()
            .expect("request");
        assert_eq!(wrong.status().as_u16(), 401, "{method} {path} wrong token");
    }
    let list = agent.admin(Method::GET, "/v1/functions", None);
    assert_eq!(names(&list.expect_ok(200).json()), ["closed", "open"]);
    agent.finish();
}

#[test]
fn bad_bundles_are_refused() {
    let agent = Agent::start("badbundle");
    let manifest: &[u8] = b"name = \"slip\"\nentrypoint = \"run.sh\"\npublic = true\n";
    let run: &[u8] = b"#!/bin/sh\necho zipped\n";

    // Zip slip: an entry that climbs out of the bundle.
    let slip = zip_of(&[
        ("fnlet.toml", manifest, 0o644),
        ("run.sh", run, 0o755),
        ("../escaped.sh", run, 0o755),
    ]);
    let msg = agent
        .deploy_archive(slip, "application/zip")
        .expect_error(400, "bad_bundle");
    assert!(msg.contains("escaped.sh"), "{msg}");
    let abs = zip_of(&[
        ("fnlet.toml", manifest, 0o644),
        ("run.sh", run, 0o755),
        ("/tmp/fnlet-abs-escape", run, 0o755),
    ]);
    agent
        .deploy_archive(abs, "application/zip")
        .expect_error(400, "bad_bundle");
    assert!(!Path::new("/tmp/fnlet-abs-escape").exists());
    let escaped = find_named(agent.state_dir().parent().unwrap(), "escaped.sh");
    assert_eq!(escaped, Vec::<PathBuf>::new(), "zip slip wrote outside");

    // A wrong type in the manifest names the field.
    let wrong = Fixture::new(
        "name = \"lots\"\nentrypoint = \"run.sh\"\nmemory_mb = \"lots\"\n",
        &[("run.sh", run, 0o755)],
    );
    let msg = agent
        .deploy_archive(wrong.tar_gz(), "application/gzip")
        .expect_error(400, "bad_manifest");
    assert!(msg.contains("memory_mb"), "{msg}");
    // An entrypoint that is not in the bundle.
    let missing = Fixture::new("name = \"missing\"\nentrypoint = \"nothere\"\n", &[]);
    agent
        .deploy_archive(missing.tar_gz(), "application/gzip")
        .expect_error(400, "bad_bundle");
    // Not an archive at all.
    agent
        .deploy_archive(b"hello, I am not a bundle".to_vec(), "application/gzip")
        .expect_error(400, "bad_bundle");

    let list = agent.admin(Method::GET, "/v1/functions", None);
    assert_eq!(names(&list.expect_ok(200).json()), Vec::<String>::new());

    // The same bundle without the bad entry deploys fine, as a zip.
    let good = zip_of(&[("fnlet.toml", manifest, 0o644), ("run.sh", run, 0o755)]);
    let r = agent.deploy_archive(good, "application/zip");
    assert_version(&r.expect_ok(201).json(), "slip", 1);
    assert_eq!(agent.invoke("slip", b"").expect_ok(200).text(), "zipped\n");
    agent.finish();
}

fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name() == name {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    found
}

#[test]
fn a_full_function_answers_429_with_retry_after() {
    // queue_timeout_ms = 200 (the test agent's setting), one slot, each call holds it 600 ms.
    let agent = Agent::start("concurrency");
    let f = Fixture::sh(
        "busy",
        "public = true\ntimeout_s = 5\nmax_concurrency = 1",
        "sleep 0.6; echo done",
    );
    agent.deploy(f.path());
    let started = Instant::now();
    let answers: Vec<Resp> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..6)
            .map(|_| s.spawn(|| agent.invoke("busy", b"")))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let (mut ok, mut busy) = (0, 0);
    for r in &answers {
        match r.status {
            200 => {
                assert_eq!(r.text(), "done\n");
                ok += 1;
            }
            429 => {
                let msg = r.expect_error(429, "overloaded");
                assert!(msg.contains("busy"), "{msg}");
                let retry: u32 = r
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers));
                assert!(retry >= 1);
                busy += 1;
            }
            _ => panic!("unexpected answer {} {}", r.status, r.text()),
        }
    }
    assert!(ok >= 1, "no call got the slot");
    assert!(
        busy >= 1,
        "no call was refused: {ok} ran one after the other"
    );
    // Refused calls do not wait for the running one to finish: the whole burst is quick.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    agent.finish();
}

#[test]
fn bursts_of_invocations_all_complete() {
    // Many sandboxes spawned at once from the agent's growing thread pool: each must start and
    // answer (a sandbox child once hung for good in glibc's setresuid after clone).
    let agent = Agent::start("burst");
    let f = Fixture::sh(
        "burst",
        "public = true\ntimeout_s = 5\nmax_concurrency = 64",
        "echo \"got $(cat)\"",
    );
    agent.deploy(f.path());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..8 {
            let agent = &agent;
            s.spawn(move || {
                for i in 0..25 {
                    let input = format!("{t}-{i}");
                    let r = agent.invoke("burst", input.as_bytes());
                    assert_eq!(r.expect_ok(200).text(), format!("got {input}\n"));
                }
            });
        }
    });
    eprintln!("200 invocations in {:?}", started.elapsed());
    agent.finish();
}

#[test]
fn sigterm_lets_the_running_invocation_finish() {
    let mut agent = Agent::start("drain");
    let f = Fixture::sh("slow", "public = true\ntimeout_s = 5", "sleep 1; echo done");
    agent.deploy(f.path());
    let call = agent.invoke_in_background("slow", b"");
    agent.wait_running("slow", 1);
    let signalled = Instant::now();
    agent.signal("TERM");

    // While it drains, /readyz must not say ready: 503, or no longer listening.
    let mut seen: Vec<String> = Vec::new();
    let mut refused_invoke = None;
    let status = loop {
        if let Some(s) = agent.try_exited() {
            break s;
        }
        let r = agent.try_request(Method::GET, "/readyz", false, None);
        let label = match &r {
            Ok(r) if r.status == 503 => {
                let msg = r.expect_error(503, "unavailable");
                assert!(r.header("retry-after").is_some(), "{msg}");
                "503".to_string()
            }
            Ok(r) => r.status.to_string(),
            Err(_) => "closed".to_string(),
        };
        if seen.last() != Some(&label) {
            seen.push(label);
        }
        if refused_invoke.is_none() && seen.last().is_some_and(|l| l != "200") {
            // A new invocation is not taken either.
            refused_invoke = Some(
                agent
                    .try_request(Method::POST, "/fn/slow", false, None)
                    .map(|r| r.status),
            );
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "agent did not stop: {seen:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    // The signal may land a moment after kill(1) returns: 200 first is fine, never after.
    let after: Vec<&String> = seen.iter().skip_while(|l| *l == "200").collect();
    assert!(
        !after.iter().any(|l| *l == "200"),
        "ready again while draining: {seen:?}"
    );
    eprintln!("/readyz while draining: {seen:?}");
    if let Some(Ok(s)) = refused_invoke {
        assert_eq!(s, 503, "an invocation was taken while draining");
    }

    let r = call.join().expect("invocation thread");
    let r = r.unwrap_or_else(|e| panic!("the running invocation was cut off: {e}"));
    assert_eq!(r.expect_ok(200).text(), "done\n");
    assert!(
        signalled.elapsed() >= Duration::from_millis(500),
        "the agent did not wait for the invocation"
    );
    assert!(
        agent.log().contains("fnlet agent stopped"),
        "{}",
        agent.log()
    );
    agent.assert_clean();
}

#[test]
fn after_kill_9_a_restart_keeps_functions_and_reaps_the_sandbox() {
    // No sandboxes built ahead: the test counts the sandboxes and processes left.
    let mut agent = Agent::start_with(
        "crash",
        Settings {
            prepare_ahead: false,
            ..Settings::default()
        },
    );
    let quick = Fixture::sh("quick", "public = true\ntimeout_s = 2", "echo ok");
    let sleepy = Fixture::sh(
        "sleepy",
        "public = true\ntimeout_s = 60",
        "sleep \"$(cat)\"; echo slept",
    );
    agent.deploy(quick.path());
    agent.deploy(sleepy.path());
    agent.deploy(sleepy.path());
    let call = agent.invoke_in_background("sleepy", b"30");
    let leaves = agent.wait_running("sleepy", 1);
    let pids: Vec<String> = leaves
        .iter()
        .flat_map(|l| {
            std::fs::read_to_string(l.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    assert!(!pids.is_empty());

    agent.kill9();
    // The sandbox outlives its agent: that is what the restart has to clean up.
    assert!(leaves.iter().all(|l| l.exists()), "{leaves:?}");
    assert!(
        pids.iter().any(|p| Path::new("/proc").join(p).exists()),
        "the sandbox died with the agent: {pids:?}"
    );
    let cut = call.join().expect("invocation thread");
    assert!(
        cut.is_err(),
        "the call got an answer from a killed agent: {cut:?}"
    );

    agent.restart();
    assert!(
        agent.log().contains("left by a previous agent"),
        "{}",
        agent.log()
    );
    let left: Vec<&PathBuf> = leaves.iter().filter(|l| l.exists()).collect();
    assert!(left.is_empty(), "stale sandbox cgroups: {left:?}");
    let alive: Vec<&String> = pids
        .iter()
        .filter(|p| Path::new("/proc").join(p).exists())
        .collect();
    assert!(
        common::agent::processes_of_uids(&agent.uids).is_empty(),
        "stale sandbox processes: {alive:?}"
    );

    let list = agent.admin(Method::GET, "/v1/functions", None);
    let list = list.expect_ok(200).json();
    assert_eq!(names(&list), ["quick", "sleepy"]);
    let versions: Vec<u64> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(agent.invoke("quick", b"").expect_ok(200).text(), "ok\n");
    let r = agent.invoke("sleepy", b"0");
    assert_eq!(r.expect_ok(200).text(), "slept\n");
    assert_eq!(r.header("x-fnlet-version").as_deref(), Some("2"));
    agent.finish();
}

#[test]
fn health_status_and_metrics() {
    let agent = Agent::start("metrics");
    let r = agent.get("/healthz");
    assert_eq!(r.expect_ok(200).text().trim(), "ok");
    assert_eq!(agent.get("/readyz").expect_ok(200).text().trim(), "ready");
    agent.deploy(Fixture::sh("counted", "public = true\ntimeout_s = 2", "echo ok").path());
    agent.deploy(Fixture::sh("failing", "public = true\ntimeout_s = 2", "exit 1").path());
    for _ in 0..3 {
        agent.invoke("counted", b"").expect_ok(200);
    }
    agent
        .invoke("failing", b"")
        .expect_error(502, "function_error");

    let m = agent.get("/metrics");
    assert!(
        m.expect_ok(200)
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        m.headers
    );
    let text = m.text();
    for line in [
        "fnlet_invocations_total{function=\"counted\"} 3",
        "fnlet_invocations_total{function=\"failing\"} 1",
        "fnlet_invocation_errors_total{function=\"failing\",kind=\"function_error\"} 1",
        // The sandboxes came from the spawn helper (sandbox.spawn_helper, on by default).
        "fnlet_spawn_helper_up 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(
        text.contains("fnlet_invocation_duration_seconds_bucket"),
        "{text}"
    );
    // ... which is a child of the agent's main thread, named for ps.
    let pid = agent.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    assert!(
        children.split_whitespace().any(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n == "fnlet-spawner\n")
        }),
        "no fnlet-spawner among the agent's children {children:?}"
    );

    let s = agent.admin(Method::GET, "/v1/status", None);
    let s = s.expect_ok(200).json();
    assert_eq!(s["functions"], 2, "{s}");
    assert_eq!(s["running_instances"], 0, "{s}");
    assert_eq!(s["draining"], false, "{s}");
    assert_eq!(s["spawn_helper"]["state"], "up", "{s}");
    assert!(
        s["spawn_helper"]["pid"].as_u64().is_some_and(|p| p > 1),
        "{s}"
    );
    assert!(s["cgroup"] == "v1" || s["cgroup"] == "v2", "{s}");
    assert!(
        s["cgroup_root"]
            .as_str()
            .is_some_and(|r| r.contains(&agent.root)),
        "{s}"
    );
    assert_eq!(s["state_dir"], json!(agent.state_dir()), "{s}");
    assert!(s["uptime_s"].as_f64().is_some_and(|u| u >= 0.0), "{s}");
    agent.finish();
}

/// The spawn helper's pid and restarts from `/v1/status`, once it is up.
fn helper_up(agent: &Agent) -> Option<(u64, u64)> {
    let s = agent.admin(Method::GET, "/v1/status", None);
    let s = s.expect_ok(200).json();
    let h = &s["spawn_helper"];
    (h["state"] == "up").then(|| (h["pid"].as_u64().unwrap(), h["restarts"].as_u64().unwrap()))
}

#[test]
fn a_lost_spawn_helper_is_replaced_by_a_fresh_one() {
    // Run by hand, the helper's entry point says what it is and does nothing.
    let by_hand = std::process::Command::new(common::fnlet())
        .arg("__spawn-helper")
        .output()
        .unwrap();
    assert_eq!(by_hand.status.code(), Some(2), "{by_hand:?}");
    assert!(
        String::from_utf8_lossy(&by_hand.stderr).contains("the fnlet agent's spawn helper"),
        "{by_hand:?}"
    );

    let agent = Agent::start("helper-restart");
    agent.deploy(Fixture::sh("counted", "public = true\ntimeout_s = 5", "echo ok").path());
    assert_eq!(agent.invoke("counted", b"").expect_ok(200).text(), "ok\n");
    let (mut pid, restarts) = helper_up(&agent).expect("the spawn helper is up");
    assert_eq!(restarts, 0);
    for round in 1..=2u64 {
        // Killed while idle: once the sandbox built ahead after the last call is ready (a
        // kill during that build is seen as a lost reply, not as the exit this test counts).
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent
            .admin(Method::GET, "/v1/functions/counted", None)
            .json()["prepared"]
            != true
        {
            assert!(
                Instant::now() < deadline,
                "no sandbox built ahead:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The agent's own child (we started the agent); SIGKILL, as an OOM kill would.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        if round == 2 {
            // Calls never fail for it: the agent clones in-process until a new helper is
            // ready. (Round 1 makes no call: the agent sees the exit itself and relaunches.)
            assert_eq!(agent.invoke("counted", b"").expect_ok(200).text(), "ok\n");
        }
        // The second relaunch backs off a second; allow many times that on a loaded host.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (new_pid, restarts) = loop {
            match helper_up(&agent) {
                Some((p, r)) if p != pid => break (p, r),
                _ if Instant::now() > deadline => {
                    panic!("no new spawn helper after round {round}:\n{}", agent.log())
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        assert_eq!(restarts, round);
        // A fresh exec of the agent's binary, the agent's child, named for ps.
        let stat = std::fs::read_to_string(format!("/proc/{new_pid}/stat")).unwrap();
        let ppid = stat.rsplit(") ").next().unwrap().split(' ').nth(1).unwrap();
        assert_eq!(ppid, agent.pid().to_string(), "{stat}");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{new_pid}/comm")).unwrap(),
            "fnlet-spawner\n"
        );
        let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("__spawn-helper"),
            "{cmdline:?}"
        );
        // It serves: calls work and nothing is lost again.
        for _ in 0..3 {
            assert_eq!(agent.invoke("counted", b"").expect_ok(200).text(), "ok\n");
        }
        assert_eq!(helper_up(&agent), Some((new_pid, round)));
        pid = new_pid;
    }
    let text = agent.get("/metrics").text();
    for line in [
        "fnlet_spawn_helper_up 1",
        "fnlet_spawn_helper_restarts_total 2",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    // The agent saw each exit itself (the helper's pidfd), not at a failed spawn.
    assert_eq!(
        agent.log().matches("the spawn helper exited").count(),
        2,
        "{}",
        agent.log()
    );
    let out = agent.cli(&["status"]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("(2 lost and replaced)"), "{out}");
    agent.finish();
}

/// The sum of `field=N` over the agent's "were not logged" lines.
fn skipped_in(log: &str, field: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("were not logged"))
        .map(|l| {
            let at = l
                .find(&format!("{field}="))
                .unwrap_or_else(|| panic!("no {field}= in {l:?}"));
            let digits: String = l[at + field.len() + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u64>().unwrap_or_else(|_| panic!("{l:?}"))
        })
        .sum()
}

/// `limits.log_lines_per_s`: a burst of calls logs at most that many lines a second, and every
/// line it did not log is counted in the next window's summary, exactly; the function's own log
/// keeps every line.
#[test]
fn a_burst_of_calls_stays_within_log_lines_per_s_and_counts_the_rest() {
    let agent = Agent::start_with(
        "logbudget",
        Settings {
            limits_extra: "log_lines_per_s = 5\n".into(),
            ..Settings::default()
        },
    );
    let f = Fixture::sh(
        "chatty",
        "timeout_s = 5\npublic = true",
        "echo chatty-marker >&2; echo ok",
    );
    agent.deploy(f.path());
    // The deploy's own line in a window of its own.
    std::thread::sleep(Duration::from_millis(1100));
    let calls = 31;
    let started = Instant::now();
    for i in 0..calls - 1 {
        let r = agent.invoke("chatty", b"");
        assert_eq!(r.status, 200, "call {i}: {}", r.text());
    }
    let burst = started.elapsed();
    // The next window's first line says what the burst's last window skipped.
    std::thread::sleep(Duration::from_millis(1100));
    agent.invoke("chatty", b"").expect_ok(200);

    let log = agent.log();
    let ours = |l: &&str| l.contains("chatty");
    let invocation_lines = log
        .lines()
        .filter(ours)
        .filter(|l| l.contains("invocation ok"))
        .count() as u64;
    let function_lines = log
        .lines()
        .filter(ours)
        .filter(|l| l.contains("chatty-marker") || l.contains("END ok"))
        .count() as u64;
    let skipped_invocations = skipped_in(&log, "invocation_lines");
    let skipped_function = skipped_in(&log, "function_lines");
    let ctx = format!(
        "burst of {} calls in {burst:?}: logged {invocation_lines} invocation lines and \
         {function_lines} function lines, skipped {skipped_invocations} and \
         {skipped_function}\n{log}",
        calls - 1
    );
    assert!(
        skipped_invocations + skipped_function > 0,
        "nothing skipped: {ctx}"
    );
    // Five a second at most: the burst spans at most ceil(its length) + 1 windows.
    let windows = burst.as_secs() + 2;
    assert!(
        invocation_lines + function_lines <= 5 * (windows + 1),
        "more than 5 lines a second: {ctx}"
    );
    assert_eq!(invocation_lines + skipped_invocations, calls, "{ctx}");
    // Each call: the function's stderr line and the agent's END line.
    assert_eq!(function_lines + skipped_function, 2 * calls, "{ctx}");
    // /metrics counts the same lines.
    let metrics = agent.get("/metrics").text();
    for (kind, n) in [
        ("invocation", skipped_invocations),
        ("function", skipped_function),
    ] {
        let line = format!("fnlet_log_lines_not_logged_total{{kind=\"{kind}\"}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{metrics}"
        );
    }
    // The function's log has every line.
    let out = agent.cli(&["logs", "chatty", "-n", "1000"]);
    let text = stdout(&out);
    assert_eq!(
        text.matches("chatty-marker").count() as u64,
        calls,
        "fnlet logs chatty:\n{text}\n{}",
        stderr(&out)
    );
    // A call right before the stop: the file has its lines once the agent has stopped (they
    // are written behind, and the stop writes what waits).
    agent.invoke("chatty", b"").expect_ok(200);
    let mut agent = agent;
    agent.stop();
    let file = agent.state_dir().join("logs/chatty.log");
    let on_disk = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(
        on_disk.matches("chatty-marker").count() as u64,
        calls + 1,
        "{}:\n{on_disk}",
        file.display()
    );
    agent.assert_clean();
}

/// (METHOD, path, documented status codes, needs the token) for every operation in the API
/// reference.
fn documented_operations() -> Vec<(Method, String, BTreeSet<u16>, bool)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/api/openapi.yaml");
    let text = std::fs::read_to_string(&path).expect("read openapi.yaml");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("openapi.yaml is YAML");
    let paths = doc["paths"].as_mapping().expect("paths");
    let mut ops = Vec::new();
    for (p, item) in paths {
        let p = p.as_str().expect("path is a string");
        for (m, op) in item.as_mapping().expect("path item") {
            let m = m.as_str().expect("key");
            if !["get", "put", "post", "delete", "patch", "head", "options"].contains(&m) {
                continue;
            }
            let statuses = op["responses"]
                .as_mapping()
                .unwrap_or_else(|| panic!("{m} {p} has no responses"))
                .keys()
                .map(|k| {
                    k.as_str()
                        .and_then(|s| s.parse().ok())
                        .or_else(|| k.as_u64().map(|n| n as u16))
                        .unwrap_or_else(|| panic!("{m} {p}: status {k:?}"))
                })
                .collect();
            let secured = op["security"].as_sequence().is_some_and(|s| !s.is_empty());
            ops.push((
                Method::from_bytes(m.to_uppercase().as_bytes()).unwrap(),
                p.to_string(),
                statuses,
                secured,
            ));
        }
    }
    assert!(
        ops.len() >= 10,
        "only {} operations in {}",
        ops.len(),
        path.display()
    );
    ops
}

#[test]
fn openapi_document_matches_the_running_agent() {
    let agent = Agent::start("openapi");
    let ops = documented_operations();
    let f = Fixture::sh("doc", "public = true\ntimeout_s = 2", "echo documented");
    agent.deploy(f.path());
    let key = agent.admin(Method::POST, "/v1/keys", None);
    let key = key.expect_ok(201).json()["access_key_id"]
        .as_str()
        .expect("an access key id")
        .to_string();
    // Function URLs and the Invoke API are a Lambda-mode function's (the no-op fixture).
    let noop = std::fs::read(common::fixture_bootstrap("lambda-noop")).expect("read bootstrap");
    let lf = Fixture::new(
        "name = \"docl\"\nmode = \"lambda\"\npublic = true\n",
        &[("bootstrap", &noop, 0o755)],
    );
    agent.deploy(lf.path());
    let concrete = |p: &str| {
        let name = if p.starts_with("/fn/") || p.starts_with("/20") {
            "docl"
        } else {
            "doc"
        };
        p.replace("{name}", name)
            .replace("{path}", "any/path")
            .replace("{id}", &key)
            .replace(
                "{arn}",
                "arn:aws:lambda:us-east-1:000000000000:function:docl",
            )
            .replace("{alias}", "live")
            .replace("{topic}", "orders")
    };
    let is_fallback = |r: &Resp| r.status == 404 && r.text().contains("no such route");

    // Secured operations refuse a call without the token, as documented.
    for (method, path, statuses, secured) in &ops {
        let r = agent.request(method.clone(), &concrete(path), false, None);
        if *secured {
            assert!(
                statuses.contains(&401),
                "{method} {path}: 401 not documented"
            );
            r.expect_error(401, "unauthorized");
        } else {
            assert_ne!(
                r.status, 401,
                "{method} {path} wants a token it does not document"
            );
        }
    }

    // Every operation is served, with a status the document lists. Removal goes last; an event
    // invoke config is read once it has been set (before, GET is Lambda's 404).
    let mut ordered: Vec<_> = ops.iter().collect();
    ordered.sort_by_key(
        |(m, p, ..)| match (m, p.ends_with("/event-invoke-config")) {
            (&Method::GET, true) => 1,
            (&Method::DELETE, true) => 2,
            (&Method::DELETE, false) if p == "/2015-03-31/functions/{name}" => 4,
            (&Method::DELETE, false) => 3,
            _ => 0,
        },
    );
    // The Lambda control plane's calls that carry a zip: the no-op bootstrap, zipped.
    let b64 = |zip: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(zip);
    let noop_zip = b64(zip_of(&[("bootstrap", &noop, 0o755)]));
    for (method, path, statuses, _) in ordered {
        let body = match (method, path.as_str()) {
            (&Method::POST, "/v1/functions") => Some(f.tar_gz()),
            (&Method::POST, "/2015-03-31/functions") => Some(Vec::from(
                json!({
                    "FunctionName": "docc", "Role": "arn:aws:iam::000000000000:role/doc",
                    "Runtime": "provided.al2023", "Handler": "bootstrap",
                    "Code": { "ZipFile": noop_zip },
                })
                .to_string(),
            )),
            (&Method::PUT, "/2015-03-31/functions/{name}/code") => {
                Some(Vec::from(json!({ "ZipFile": noop_zip }).to_string()))
            }
            (&Method::PUT, "/2015-03-31/functions/{name}/configuration") => {
                Some(Vec::from(r#"{"Description":"documented"}"#))
            }
            (&Method::POST, "/2017-03-31/tags/{arn}") => {
                Some(Vec::from(r#"{"Tags":{"team":"doc"}}"#))
            }
            (&Method::POST, "/2015-03-31/functions/{name}/aliases") => {
                Some(Vec::from(r#"{"Name":"live","FunctionVersion":"1"}"#))
            }
            (&Method::PUT, "/2017-10-31/functions/{name}/concurrency") => {
                Some(Vec::from(r#"{"ReservedConcurrentExecutions":5}"#))
            }
            (&Method::PUT | &Method::POST, p) if p.ends_with("/event-invoke-config") => {
                Some(Vec::from(r#"{"MaximumRetryAttempts":1}"#))
            }
            (&Method::POST, p) if p.starts_with("/fn/") || p.starts_with("/2015-03-31/") => {
                Some(Vec::from("{}"))
            }
            _ => None,
        };
        // Lambda refuses a write while the function's last update is still being stored
        // (LastUpdateStatus InProgress: 409 ResourceConflictException); its clients wait and
        // retry, as Terraform does.
        let send = || {
            agent.request(
                method.clone(),
                &concrete(path),
                true,
                body.clone().map(Body::from),
            )
        };
        let mut r = send();
        let waiting = Instant::now();
        while r.status == 409
            && r.text().contains("An update is in progress")
            && waiting.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(50));
            r = send();
        }
        assert!(
            r.status != 405 && !is_fallback(&r),
            "{method} {path} is documented but not served: {} {}",
            r.status,
            r.text()
        );
        assert!(
            statuses.contains(&r.status),
            "{method} {path} answered {} ({}), documented: {statuses:?}",
            r.status,
            r.text()
        );
        assert!(r.status < 400, "{method} {path}: {} {}", r.status, r.text());
    }

    // Methods the document does not list are refused on every documented path.
    let documented: BTreeSet<(String, String)> = ops
        .iter()
        .map(|(m, p, ..)| (m.to_string(), p.clone()))
        .collect();
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p, ..)| p).collect();
    for path in paths {
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            if documented.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            agent
                .request(method.clone(), &concrete(path), true, None)
                .expect_error(405, "method_not_allowed");
        }
    }
    agent
        .admin(Method::GET, "/v1/undocumented", None)
        .expect_error(404, "not_found");
    agent.finish();
}

#[test]
fn the_examples_deploy_and_answer() {
    let agent = Agent::start("examples");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");

    agent.deploy(&repo.join("examples/hello-sh"));
    let r = agent.invoke("hello-sh", b"Ada");
    assert_eq!(
        r.expect_ok(200).text(),
        "Hello, Ada! (from hello-sh version 1)\n"
    );

    agent.deploy(&repo.join("examples/hello-py"));
    let r = agent
        .invoke("hello-py", br#"{"name": "Ada"}"#)
        .expect_ok(200)
        .json();
    assert_eq!(r["message"], "Hello, Ada!", "{r}");
    assert_eq!(r["function"], "hello-py", "{r}");
    assert_eq!(r["version"], 1, "{r}");
    agent
        .invoke("hello-py", b"not json")
        .expect_error(502, "function_error");

    // The compiled example: its fnlet.toml and the binary `cargo build --workspace --bins`
    // made, as scripts/build-examples.sh puts them together.
    let bundle = tempfile::Builder::new()
        .prefix("fnlet-test-wordcount")
        .tempdir()
        .unwrap();
    common::set_mode(bundle.path(), 0o755);
    std::fs::copy(
        repo.join("examples/wordcount-rust/bundle/fnlet.toml"),
        bundle.path().join("fnlet.toml"),
    )
    .unwrap();
    let bin = common::target_dir().join("example-wordcount");
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    std::fs::copy(&bin, bundle.path().join("bootstrap")).unwrap();
    common::set_mode(&bundle.path().join("bootstrap"), 0o755);
    agent.deploy(bundle.path());
    let text = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let r = agent
        .invoke("wordcount", b"the cat and the hat\n")
        .expect_ok(200)
        .json();
    assert_eq!(r["lines"], 1, "{r}");
    assert_eq!(r["words"], 5, "{r}");
    assert_eq!(r["top"][0], json!({"word": "the", "count": 2}), "{r}");
    let r = agent
        .invoke("wordcount", text.as_bytes())
        .expect_ok(200)
        .json();
    assert_eq!(r["bytes"], text.len(), "{r}");

    // The AWS Lambda example, through the Invoke API.
    let bundle = tempfile::Builder::new()
        .prefix("fnlet-test-hello-lambda")
        .tempdir()
        .unwrap();
    common::set_mode(bundle.path(), 0o755);
    std::fs::copy(
        repo.join("examples/hello-lambda/bundle/fnlet.toml"),
        bundle.path().join("fnlet.toml"),
    )
    .unwrap();
    std::fs::copy(
        common::target_dir().join("example-hello-lambda"),
        bundle.path().join("bootstrap"),
    )
    .expect("example-hello-lambda is built by `cargo build --workspace --bins`");
    common::set_mode(&bundle.path().join("bootstrap"), 0o755);
    agent.deploy(bundle.path());
    let r = agent.request(
        Method::POST,
        "/2015-03-31/functions/hello-lambda/invocations",
        false,
        Some(Body::from(r#"{"name": "Ada"}"#)),
    );
    assert_eq!(r.expect_ok(200).json()["message"], "Hello, Ada!");
    let r = agent.request(
        Method::POST,
        "/2015-03-31/functions/hello-lambda/invocations",
        false,
        Some(Body::from(r#"{"name": ""}"#)),
    );
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "InvalidName");
    agent.finish();
}

/// Sandbox cgroups of `root` whose processes have not exec'd anything: the sandboxes built ahead
/// of time.
fn prepared_sandboxes(root: &str) -> Vec<PathBuf> {
    sandbox_cgroups(root)
        .into_iter()
        .filter(|c| c.starts_with("/sys/fs/cgroup/pids"))
        .filter(|c| {
            let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap_or_default();
            common::agent::is_before_exec(&procs.lines().collect::<Vec<_>>())
        })
        .collect()
}

#[test]
fn a_sandbox_built_ahead_serves_the_next_invocation() {
    let agent = Agent::start("prepared");
    agent.deploy(
        Fixture::sh(
            "warm",
            "public = true\ntimeout_s = 2",
            // Field 41 of /proc/PID/stat: the scheduling policy (3: SCHED_BATCH, the default
            // `sandbox.batch_scheduling`).
            "echo \"req=$FNLET_REQUEST_ID policy=$(cut -d' ' -f41 /proc/self/stat)\"",
        )
        .path(),
    );
    // The deploy builds one sandbox ahead of time; wait for it (its processes wait in their
    // cgroup a moment before the agent holds it ready, which `describe` says).
    let ready = || agent.admin(Method::GET, "/v1/functions/warm", None).json()["prepared"] == true;
    let deadline = Instant::now() + Duration::from_secs(5);
    while prepared_sandboxes(&agent.root).len() != 1 || !ready() {
        assert!(
            Instant::now() < deadline,
            "no sandbox built ahead: {:?}",
            sandbox_cgroups(&agent.root)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = agent.invoke("warm", b"");
    let id = r.header("x-fnlet-request-id").expect("request id");
    // The request id reaches the function although its sandbox was built before the request;
    // it runs under SCHED_BATCH.
    assert_eq!(r.expect_ok(200).text(), format!("req={id} policy=3\n"));
    let m = agent.get("/metrics").text();
    // The function's series start at 0 with its first call.
    assert!(
        m.lines()
            .any(|l| l == "fnlet_cold_starts_total{function=\"warm\"} 0"),
        "the first call after the deploy was a cold start:\n{m}"
    );
    // The next one is built again, and never more than one waits per function.
    let deadline = Instant::now() + Duration::from_secs(5);
    while prepared_sandboxes(&agent.root).len() != 1 {
        assert!(Instant::now() < deadline, "the sandbox was not built again");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..5 {
        agent.invoke("warm", b"").expect_ok(200);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(prepared_sandboxes(&agent.root).len() <= 1);

    // A sandbox built ahead whose exec fails (the script's interpreter is missing): the
    // caller is told the step and the errno, not a function error, whether the call found it
    // built ahead or built its own.
    agent.deploy(
        Fixture::new(
            "name = \"noexec\"\nentrypoint = \"run.sh\"\npublic = true\ntimeout_s = 2\n",
            &[("run.sh", b"#!/var/task/no-such-shell\necho never\n", 0o755)],
        )
        .path(),
    );
    let built = || {
        agent
            .admin(Method::GET, "/v1/functions/noexec", None)
            .json()["prepared"]
            == true
    };
    for _ in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !built() {
            assert!(Instant::now() < deadline, "noexec: no sandbox built ahead");
            std::thread::sleep(Duration::from_millis(20));
        }
        let msg = agent
            .invoke("noexec", b"")
            .expect_error(502, "spawn_failed");
        assert!(msg.contains("exec /var/task/run.sh: ENOENT"), "{msg}");
    }
    // finish() checks that stopping the agent removes the waiting sandbox too.
    agent.finish();
}

/// `reuse_sandbox = true`: an exec function's calls run one after another in a sandbox kept
/// between them, each a new process: /tmp carries over, what a call started does not, a
/// function error keeps the sandbox, a timeout ends it, and an idle one is stopped after its
/// keep-alive.
#[test]
fn an_exec_function_that_reuses_its_sandbox_runs_each_call_in_it() {
    let agent = Agent::start("reuse");
    agent.deploy(
        Fixture::sh(
            "reuse",
            "public = true\ntimeout_s = 2\nreuse_sandbox = true\nkeep_alive_s = 1",
            r#"read -r line
n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > /tmp/count
left=none; [ -e /tmp/leftover ] && { left=dead; kill -0 "$(cat /tmp/leftover)" 2>/dev/null && left=alive; }
echo "call=$n req=$FNLET_REQUEST_ID left=$left"
case "$line" in
  leave) sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > /tmp/leftover ;;
  fail) echo oops >&2; exit 3 ;;
  slow) sleep 10 ;;
  wait) sleep 0.5 ;;
esac"#,
        )
        .path(),
    );
    let call = |input: &str| {
        let r = agent.invoke("reuse", format!("{input}\n").as_bytes());
        let id = r.header("x-fnlet-request-id").expect("request id");
        (r, id)
    };
    let (r, id) = call("leave");
    assert_eq!(
        r.expect_ok(200).text(),
        format!("call=1 req={id} left=none\n")
    );
    // The same sandbox (its /tmp), a new process (its request id), and the sleep the last
    // call left behind was killed when that call ended.
    let (r, id) = call("look");
    assert_eq!(
        r.expect_ok(200).text(),
        format!("call=2 req={id} left=dead\n")
    );
    let msg = call("fail").0.expect_error(502, "function_error");
    assert!(msg.contains("exit status 3"), "{msg}");
    let (r, id) = call("look");
    assert_eq!(
        r.expect_ok(200).text(),
        format!("call=4 req={id} left=dead\n")
    );
    let instances =
        || agent.admin(Method::GET, "/v1/functions/reuse", None).json()["instances"].clone();
    assert_eq!(instances()["alive"], 1, "{}", instances());
    assert_eq!(instances()["idle"], 1, "{}", instances());
    let out = agent.cli(&["describe", "reuse"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept between calls (reuse_sandbox)"),
        "{text}"
    );

    // A timeout kills the sandbox: the next call starts over in another.
    call("slow").0.expect_error(504, "timeout");
    let (r, id) = call("look");
    assert_eq!(
        r.expect_ok(200).text(),
        format!("call=1 req={id} left=none\n")
    );

    // Idle past its keep-alive (1 s), the sandbox is stopped; the next call gets a new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while instances()["alive"] != 0 {
        assert!(Instant::now() < deadline, "still alive: {}", instances());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, id) = call("look");
    assert_eq!(
        r.expect_ok(200).text(),
        format!("call=1 req={id} left=none\n")
    );
    assert_eq!(instances()["peak"], 1, "{}", instances());

    // Calls at the same time get sandboxes of their own (a sandbox refuses a second run while
    // one goes), and each is kept afterwards.
    let answers: Vec<String> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..3)
            .map(|_| s.spawn(|| call("wait").0.expect_ok(200).text()))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let peak = instances()["peak"].as_u64().unwrap_or(0);
    assert!((2..=3).contains(&peak), "{answers:?} {}", instances());
    assert_eq!(instances()["alive"], peak, "{}", instances());
    assert_eq!(instances()["idle"], peak, "{}", instances());

    // Only an exec function reuses its sandbox.
    let bad = Fixture::new(
        "name = \"lam\"\nmode = \"lambda\"\nreuse_sandbox = true\n",
        &[("bootstrap", b"#!/bin/sh\nexit 0\n", 0o755)],
    );
    let msg = agent
        .deploy_archive(bad.tar_gz(), "application/gzip")
        .expect_error(400, "bad_manifest");
    assert!(msg.contains("reuse_sandbox"), "{msg}");
    // finish() checks that stopping the agent leaves no sandbox and no process behind.
    agent.finish();
}

/// `start_ahead = true`: a kept sandbox starts the function's next process when a call ends;
/// it waits on stdin for its call (its start-up is off the caller's path) and has no request
/// id. A timeout ends the sandbox with it, and the next call starts over in a new one. Without
/// `reuse_sandbox`, the sandbox built ahead for the next call has its function started.
#[test]
fn an_exec_function_started_ahead_waits_for_its_call_on_stdin() {
    let agent = Agent::start("ahead");
    let script = r#"start=$(date +%s%N)
echo "starting" >&2
read -r line
waited=$(( ($(date +%s%N) - start) / 1000000 ))
echo "req=${FNLET_REQUEST_ID:-none} line=$line waited_ms=$waited"
[ "$line" = slow ] && sleep 10
exit 0"#;
    agent.deploy(
        Fixture::sh(
            "ahead",
            "public = true\ntimeout_s = 2\nreuse_sandbox = true\nstart_ahead = true",
            script,
        )
        .path(),
    );
    let call = |input: &str| {
        let r = agent.invoke("ahead", format!("{input}\n").as_bytes());
        let id = r.header("x-fnlet-request-id").expect("request id");
        let text = r.expect_ok(200).text();
        (text, id)
    };
    let waited = |text: &str| -> u64 {
        text.trim()
            .rsplit_once("waited_ms=")
            .and_then(|(_, ms)| ms.parse().ok())
            .unwrap_or_else(|| panic!("no waited_ms in {text:?}"))
    };
    // A new sandbox's first call starts its process itself, with the call's request id.
    let (text, id) = call("one");
    assert!(text.starts_with(&format!("req={id} line=one ")), "{text}");
    // The next process was started when that call ended, and has waited since.
    std::thread::sleep(Duration::from_millis(800));
    let (text, id) = call("two");
    assert!(text.starts_with("req=none line=two "), "{text}");
    assert!(waited(&text) >= 600, "started ahead 800 ms before: {text}");
    // What it wrote while it waited is logged under the call that took it.
    let logs = agent.cli(&["logs", "ahead", "--json", "--tail", "100"]);
    let starting: Vec<String> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["line"] == "starting")
        .filter_map(|l| l["request_id"].as_str().map(str::to_string))
        .collect();
    assert!(starting.contains(&id), "{starting:?} lack {id}");
    let out = agent.cli(&["describe", "ahead"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started ahead (start_ahead)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A timeout ends the sandbox and its next process; the next call starts over.
    agent
        .invoke("ahead", b"slow\n")
        .expect_error(504, "timeout");
    let (text, id) = call("three");
    assert!(text.starts_with(&format!("req={id} line=three ")), "{text}");

    // A fresh sandbox per call: the sandbox built ahead has its function started too, from
    // the deploy on, and again after each call.
    agent.deploy(Fixture::sh("fresh", "public = true\nstart_ahead = true", script).path());
    let prepared =
        || agent.admin(Method::GET, "/v1/functions/fresh", None).json()["prepared"].clone();
    for n in ["one", "two"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while prepared() != true {
            assert!(Instant::now() < deadline, "nothing started ahead");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(800));
        let r = agent.invoke("fresh", format!("{n}\n").as_bytes());
        let text = r.expect_ok(200).text();
        assert!(text.starts_with(&format!("req=none line={n} ")), "{text}");
        assert!(waited(&text) >= 600, "started ahead 800 ms before: {text}");
    }
    // Counted: the kept sandbox's second and third calls (the first sandbox's), and both of
    // these.
    let text = agent.get("/metrics").text();
    for (function, n) in [("ahead", 2), ("fresh", 2)] {
        let sample = format!("fnlet_started_ahead_total{{function=\"{function}\"}} {n}");
        assert!(
            text.lines().any(|l| l == sample),
            "no {sample:?} in /metrics"
        );
    }
    let out = agent.cli(&["describe", "fresh"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fresh per call, its process started ahead"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Exec mode only.
    let bad = Fixture::new(
        "name = \"lam\"\nmode = \"lambda\"\nstart_ahead = true\n",
        &[("bootstrap", b"#!/bin/sh\nexit 0\n", 0o755)],
    );
    let msg = agent
        .deploy_archive(bad.tar_gz(), "application/gzip")
        .expect_error(400, "bad_manifest");
    assert!(msg.contains("start_ahead"), "{msg}");
    // finish() checks that stopping the agent leaves no sandbox and no process behind: the
    // idle sandbox's waiting process included.
    agent.finish();
}

/// `min_instances` with `reuse_sandbox`: kept sandboxes are started before any call and stay
/// past their keep-alive; with `start_ahead` they take calls in turn, so a caller calling back
/// to back finds a process that had the other call's time to start.
#[test]
fn provisioned_kept_sandboxes_take_calls_in_turn() {
    let agent = Agent::start("provisioned");
    let script = r#"[ -f /tmp/id ] || cat /proc/sys/kernel/random/uuid > /tmp/id
read -r line
echo "sandbox=$(cat /tmp/id) req=${FNLET_REQUEST_ID:-none} line=$line""#;
    agent.deploy(
        Fixture::sh(
            "prov",
            "public = true\ntimeout_s = 5\nreuse_sandbox = true\nstart_ahead = true\n\
             min_instances = 2\nmax_concurrency = 4\nkeep_alive_s = 1",
            script,
        )
        .path(),
    );
    let instances =
        || agent.admin(Method::GET, "/v1/functions/prov", None).json()["instances"].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while instances()["idle"] != 2 {
        assert!(
            Instant::now() < deadline,
            "not provisioned: {}",
            instances()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = agent.cli(&["describe", "prov"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 kept sandboxes kept warm (min_instances)"),
        "{text}"
    );
    // Past the keep-alive (1 s) the minimum stays.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(instances()["alive"], 2, "{}", instances());
    assert_eq!(instances()["idle"], 2, "{}", instances());
    let sandboxes: Vec<String> = (0..4)
        .map(|n| {
            let text = agent
                .invoke("prov", format!("{n}\n").as_bytes())
                .expect_ok(200)
                .text();
            // Every process was started ahead: none has a request id of its own.
            let rest = format!(" req=none line={n}\n");
            let sandbox = text
                .strip_prefix("sandbox=")
                .and_then(|t| t.strip_suffix(&rest))
                .unwrap_or_else(|| panic!("{text:?}"));
            sandbox.to_string()
        })
        .collect();
    assert_ne!(sandboxes[0], sandboxes[1], "{sandboxes:?}");
    assert_eq!(sandboxes[0], sandboxes[2], "{sandboxes:?}");
    assert_eq!(sandboxes[1], sandboxes[3], "{sandboxes:?}");
    assert_eq!(instances()["peak"], 2, "{}", instances());

    // A new version: the old one's sandboxes go, two of the new one's are started.
    agent.deploy(
        Fixture::sh(
            "prov",
            "public = true\ntimeout_s = 5\nreuse_sandbox = true\nstart_ahead = true\n\
             min_instances = 2\nmax_concurrency = 4\nkeep_alive_s = 1",
            &format!("{script}\necho v2"),
        )
        .path(),
    );
    // The warm pool's clock (every 250 ms) drops the old ones and starts the new ones: six
    // ticks, then the two idle are the new version's.
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + Duration::from_secs(30);
    while instances()["idle"] != 2 || instances()["alive"] != 2 {
        assert!(
            Instant::now() < deadline,
            "not reprovisioned: {}",
            instances()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = agent.invoke("prov", b"x\n").expect_ok(200).text();
    assert!(text.ends_with(" req=none line=x\nv2\n"), "{text:?}");
    assert!(
        !sandboxes.iter().any(|s| text.contains(s.as_str())),
        "{text:?}"
    );

    // Without a kept sandbox there is nothing to keep warm.
    let bad = Fixture::sh("bad", "min_instances = 1", "cat");
    let msg = agent
        .deploy_archive(bad.tar_gz(), "application/gzip")
        .expect_error(400, "bad_manifest");
    assert!(msg.contains("min_instances"), "{msg}");
    // finish() checks that stopping the agent leaves no sandbox and no process behind.
    agent.finish();
}

/// `sandbox.user_namespace = true`: exec and Lambda functions run, although the bundles sit in
/// the agent's 0750 state directory, which the function's own uid (the child's filesystem ids
/// while it builds the root) may not traverse: the bind sources are opened first, as root.
#[test]
fn functions_run_in_a_user_namespace_from_the_agents_private_state_dir() {
    let agent = Agent::start_with(
        "userns",
        Settings {
            sandbox_extra: "user_namespace = true\n".into(),
            ..Settings::default()
        },
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    agent.deploy(&repo.join("examples/hello-sh"));
    let noop = std::fs::read(common::fixture_bootstrap("lambda-noop")).expect("read bootstrap");
    let lf = Fixture::new(
        "name = \"usernoop\"\nmode = \"lambda\"\npublic = true\n",
        &[("bootstrap", &noop, 0o755)],
    );
    agent.deploy(lf.path());
    // An exec function that keeps its sandbox: its init runs each call in the namespace too.
    agent.deploy(
        Fixture::sh(
            "userreuse",
            "public = true\nreuse_sandbox = true",
            "n=$(cat /tmp/n 2>/dev/null || echo 0); echo $((n + 1)) | tee /tmp/n",
        )
        .path(),
    );
    for i in 1..=2 {
        let r = agent.invoke("hello-sh", b"Ada");
        assert_eq!(
            r.expect_ok(200).text(),
            "Hello, Ada! (from hello-sh version 1)\n"
        );
        agent.invoke("usernoop", b"{}").expect_ok(200);
        let r = agent.invoke("userreuse", b"");
        assert_eq!(r.expect_ok(200).text(), format!("{i}\n"));
    }
    // The warm instance and the kept sandbox really are in user namespaces of their own.
    let own = std::fs::read_link("/proc/self/ns/user").unwrap();
    for name in ["usernoop", "userreuse"] {
        let procs: Vec<String> = sandbox_cgroups(&agent.root)
            .into_iter()
            .filter(|g| g.to_string_lossy().contains(name))
            .filter_map(|g| std::fs::read_to_string(g.join("cgroup.procs")).ok())
            .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
            .collect();
        assert!(!procs.is_empty(), "no process of {name} found");
        for pid in &procs {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/user")) {
                assert_ne!(
                    ns, own,
                    "{name}: process {pid} shares the host's user namespace"
                );
            }
        }
    }
    agent.finish();
}
