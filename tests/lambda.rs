//! Lambda mode against the real agent, with runtime clients nobody here wrote: a function built
//! with the `lambda_runtime` crate and one with `lambda_http` (tests/fixtures/, built by
//! scripts/build-fixtures.sh), through the Invoke API and function URLs; the warm pool's
//! scaling, keep-alive and init failures. Needs root.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::agent::{Agent, Fixture, Resp, Settings};
use reqwest::Method;
use reqwest::blocking::Body;
use serde_json::{Value, json};

/// A Lambda bundle: the fixture's bootstrap and a manifest of our own.
fn lambda_fixture(fixture: &str, name: &str, extra: &str) -> Fixture {
    let bin = std::fs::read(common::fixture_bootstrap(fixture)).expect("read bootstrap");
    let manifest = format!("name = \"{name}\"\nmode = \"lambda\"\npublic = true\n{extra}\n");
    Fixture::new(&manifest, &[("bootstrap", &bin, 0o755)])
}

fn invoke_api(agent: &Agent, name: &str, payload: &Value, headers: &[(&str, &str)]) -> Resp {
    agent.invoke_lambda(name, payload.to_string().into_bytes(), headers)
}

fn describe(agent: &Agent, name: &str) -> Value {
    agent
        .admin(Method::GET, &format!("/v1/functions/{name}"), None)
        .json()
}

fn metric(agent: &Agent, line_start: &str) -> f64 {
    let text = agent.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn lambda_runtime_function_through_the_invoke_api_and_its_url() {
    let agent = Agent::start("lambda-rt");
    let f = lambda_fixture("lambda-rust", "echo", "memory_mb = 96\ntimeout_s = 5");
    agent.deploy(f.path());

    // Cold, then warm: the same instance serves both.
    let r = invoke_api(&agent, "echo", &json!({"hello": "world"}), &[]);
    r.expect_ok(200);
    let body = r.json();
    assert_eq!(body["echo"], json!({"hello": "world"}), "{body}");
    assert_eq!(body["function"], "echo");
    assert_eq!(body["memory"], "96");
    assert_eq!(
        body["request_id"].as_str(),
        r.header("x-amzn-requestid").as_deref()
    );
    assert_eq!(
        body["invoked_function_arn"],
        "arn:aws:lambda:us-east-1:000000000000:function:echo"
    );
    assert!(body["deadline_ms"].as_u64().unwrap_or(0) > 1_700_000_000_000);
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("1"));
    assert_eq!(r.header("x-amz-function-error"), None);
    assert_eq!(
        r.header("x-fnlet-host").as_deref(),
        Some(agent.node_id.as_str())
    );
    let r2 = invoke_api(&agent, "echo", &json!({"n": 2}), &[]);
    r2.expect_ok(200);
    assert_eq!(r2.json()["echo"], json!({"n": 2}));
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"echo\"}"),
        1.0
    );
    assert_eq!(
        metric(&agent, "fnlet_warm_starts_total{function=\"echo\"}"),
        1.0
    );
    assert_eq!(describe(&agent, "echo")["instances"]["alive"], 1);

    // A handler error: 200, X-Amz-Function-Error, the runtime's error as the payload; the
    // instance survives it.
    let r = invoke_api(&agent, "echo", &json!({"fail": true}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    let e = r.json();
    assert_eq!(e["errorType"], "FixtureError", "{e}");
    assert_eq!(e["errorMessage"], "the event asked for a failure");
    assert_eq!(describe(&agent, "echo")["instances"]["peak"], 1);

    // Tail: the invocation's own log, START to REPORT, with what the function wrote.
    let r = invoke_api(
        &agent,
        "echo",
        &json!({"stderr": "a line on stderr", "stdout": "a line on stdout"}),
        &[("X-Amz-Log-Type", "Tail")],
    );
    r.expect_ok(200);
    let id = r.header("x-amzn-requestid").expect("request id");
    let tail = base64::engine::general_purpose::STANDARD
        .decode(r.header("x-amz-log-result").expect("X-Amz-Log-Result"))
        .expect("base64");
    let tail = String::from_utf8(tail).expect("utf-8");
    assert!(
        tail.contains(&format!("START RequestId: {id} Version: 1")),
        "{tail}"
    );
    assert!(
        tail.contains("a line on stderr") && tail.contains("a line on stdout"),
        "{tail}"
    );
    assert!(tail.contains(&format!("END RequestId: {id}")), "{tail}");
    assert!(
        tail.contains(&format!("REPORT RequestId: {id}\tDuration: ")),
        "{tail}"
    );
    assert!(
        tail.contains("Memory Size: 96 MB\tMax Memory Used: "),
        "{tail}"
    );
    // The function's lines are in `fnlet logs` under their request id.
    let logs = agent.cli(&["logs", "echo", "--json"]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(
        logs.lines()
            .any(|l| l.contains("a line on stderr") && l.contains(&id)),
        "{logs}"
    );
    // Only the first call had a cold start: its REPORT says Init Duration.
    assert_eq!(logs.matches("Init Duration: ").count(), 1, "{logs}");

    // The function URL of a plain handler: the event is the HTTP request, the handler's JSON
    // answer (no statusCode) comes back as application/json.
    let r = agent
        .http_with_token(Method::POST, "/fn/echo/some/path?x=1", "")
        .header("content-type", "application/json")
        .body("{\"k\":\"v\"}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let event = &r.json::<Value>().unwrap()["echo"];
    assert_eq!(event["version"], "2.0", "{event}");
    assert_eq!(event["rawPath"], "/some/path");
    assert_eq!(event["rawQueryString"], "x=1");
    assert_eq!(event["requestContext"]["http"]["method"], "POST");
    assert_eq!(
        event["body"], "{\"k\":\"v\"}",
        "text bodies are passed as they are"
    );
    assert_eq!(event["isBase64Encoded"], false);
    // A body of another type goes base64-encoded, as function URLs do.
    let r = agent.request(
        Method::PUT,
        "/fn/echo",
        false,
        Some(Body::from(vec![0u8, 159, 146, 150])),
    );
    r.expect_ok(200);
    let event = &r.json()["echo"];
    assert_eq!(event["isBase64Encoded"], true, "{event}");
    assert_eq!(event["body"], "AJ+Slg==");
    // Qualifiers: $LATEST and the active version run; a version that does not exist is
    // Lambda's 404 (tests/control_plane.rs runs older versions and aliases).
    invoke_api(&agent, "echo:$LATEST", &json!({}), &[]).expect_ok(200);
    let r = invoke_api(
        &agent,
        "arn:aws:lambda:us-east-1:000000000000:function:echo:1",
        &json!({}),
        &[],
    );
    r.expect_ok(200);
    let r = invoke_api(&agent, "echo:7", &json!({}), &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype").as_deref(),
        Some("ResourceNotFoundException")
    );
    assert!(r.text().contains("function:echo:7"), "{}", r.text());
    // DryRun, bad payloads and unknown functions.
    let r = invoke_api(
        &agent,
        "echo",
        &json!({}),
        &[("X-Amz-Invocation-Type", "DryRun")],
    );
    assert_eq!(r.status, 204);
    let r = agent
        .http_with_token(Method::POST, "/2015-03-31/functions/echo/invocations", "")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers()["x-amzn-errortype"],
        "InvalidRequestContentException"
    );
    // A runtime whose directory no sandbox can mount (this test's state dir is under /tmp)
    // is refused at deploy, naming why.
    let py = Fixture::new(
        "name = \"py\"\nmode = \"lambda\"\nruntime = \"python3.11\"\nhandler = \"app.h\"\n",
        &[("app.py", b"def h(e, c):\n    return e\n", 0o644)],
    );
    let msg = agent
        .deploy_archive(py.tar_gz(), "application/gzip")
        .expect_error(400, "bad_manifest");
    assert!(msg.contains("cannot be mounted into a sandbox"), "{msg}");
    let r = invoke_api(&agent, "nope", &json!({}), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype").as_deref(),
        Some("ResourceNotFoundException")
    );
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("function:nope")
    );
    agent.finish();
}

#[test]
fn lambda_http_function_url_and_invoke_api() {
    let agent = Agent::start("lambda-http");
    let f = lambda_fixture("lambda-http", "web", "timeout_s = 5");
    agent.deploy(f.path());

    let r = agent.request(Method::GET, "/fn/web/hello?name=fnlet", false, None);
    r.expect_ok(200);
    assert_eq!(r.text(), "hello fnlet");
    assert_eq!(r.header("x-fixture").as_deref(), Some("1"));
    assert_eq!(
        r.header("x-fnlet-host").as_deref(),
        Some(agent.node_id.as_str())
    );
    assert!(r.header("set-cookie").is_some(), "{:?}", r.headers);

    let r = agent
        .http_with_token(Method::POST, "/fn/web/echo", "")
        .header("content-type", "text/plain")
        .body("echo me")
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().unwrap(), "echo me");

    // The URL's root, with and without its slash.
    for path in ["/fn/web", "/fn/web/"] {
        let r = agent.request(Method::GET, path, false, None);
        assert_eq!(r.status, 404, "{path}: the fixture's own 404: {}", r.text());
        assert!(!r.text().contains("no such route"), "{path}: {}", r.text());
    }
    let r = agent.request(Method::GET, "/fn/web/status/418", false, None);
    assert_eq!(r.status, 418);
    // A handler error through a function URL: 502 naming it.
    agent
        .request(Method::GET, "/fn/web/fail", false, None)
        .expect_error(502, "handler_error");
    // What the handler saw of the request.
    let r = agent.request(Method::DELETE, "/fn/web/inspect?a=1&a=2", false, None);
    r.expect_ok(200);
    let seen = r.json();
    assert_eq!(seen["method"], "DELETE", "{seen}");

    // Credentials the agent checks never reach the function: the admin token, a session
    // token, a presigned request's parameters. The callers' own headers and query do.
    let r = agent
        .http_with_token(
            Method::GET,
            "/fn/web/inspect?a=1&X-Amz-Credential=FNLTX%2F20261204&X-Amz-Signature=00&b=2",
            &agent.token,
        )
        .header("x-amz-security-token", "session")
        .header("x-app-token", "mine")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().unwrap();
    let text = seen.to_string();
    for secret in [agent.token.as_str(), "X-Amz-", "session", "Signature"] {
        assert!(
            !text.contains(secret),
            "{secret:?} reached the function: {seen}"
        );
    }
    assert_eq!(seen["raw_query"], "a=1&b=2", "{seen}");
    assert_eq!(seen["headers"]["x-app-token"], "mine", "{seen}");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    // A public function's callers' own bearer token is theirs: it passes through.
    let r = agent
        .http_with_token(Method::GET, "/fn/web/inspect", "app-token-123")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().unwrap();
    assert_eq!(
        seen["headers"]["authorization"], "Bearer app-token-123",
        "{seen}"
    );
    // A public function takes unsigned calls, not wrongly signed ones.
    let r = agent
        .http_with_token(Method::GET, "/fn/web/inspect", "")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=FNLTAAAAAAAAAAAAAAAA/20261204/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        )
        .header("x-amz-date", "20261204T000000Z")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);

    // The same function through the Invoke API, with a function URL event built by hand.
    let event = json!({
        "version": "2.0", "routeKey": "$default", "rawPath": "/hello", "rawQueryString": "name=sdk",
        "headers": {"host": "localhost"}, "queryStringParameters": {"name": "sdk"},
        "requestContext": {"accountId": "000000000000", "apiId": "web", "domainName": "localhost",
            "domainPrefix": "localhost", "http": {"method": "GET", "path": "/hello", "protocol": "HTTP/1.1",
            "sourceIp": "127.0.0.1", "userAgent": "test"}, "requestId": "r", "routeKey": "$default",
            "stage": "$default", "time": "01/Dec/2026:00:00:00 +0000", "timeEpoch": 0},
        "isBase64Encoded": false
    });
    let r = invoke_api(&agent, "web", &event, &[]);
    r.expect_ok(200);
    let out = r.json();
    assert_eq!(out["statusCode"], 200, "{out}");
    assert_eq!(out["body"], "hello sdk");
    let mut fail = event.clone();
    fail["rawPath"] = json!("/fail");
    fail["requestContext"]["http"]["path"] = json!("/fail");
    let r = invoke_api(&agent, "web", &fail, &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    agent.finish();
}

/// 50 concurrent calls to a function with max concurrency 5: all succeed (queued), instances
/// never exceed 5; after the keep-alive the function is back to zero instances.
#[test]
fn the_warm_pool_scales_to_its_limit_and_back_to_zero() {
    let agent = Agent::start_with(
        "lambda-scale",
        Settings {
            queue_timeout_ms: 20_000,
            ..Settings::default()
        },
    );
    let f = lambda_fixture(
        "lambda-rust",
        "scale",
        "max_concurrency = 5\nkeep_alive_s = 1\ntimeout_s = 10",
    );
    agent.deploy(f.path());
    let url = format!(
        "{}/2015-03-31/functions/scale/invocations",
        agent.base_url()
    );
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                let r = c
                    .post(url)
                    .body(json!({"sleep_ms": 50, "i": i}).to_string())
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.text().unwrap_or_default())
            })
        })
        .collect();
    for c in calls {
        let (status, body) = c.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"echo\""), "{body}");
    }
    let d = describe(&agent, "scale");
    let peak = d["instances"]["peak"].as_u64().unwrap();
    assert!((2..=5).contains(&peak), "peak instances {peak}: {d}");
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"scale\"}") as u64,
        peak,
        "one cold start per instance"
    );
    // Idle past the keep-alive: scaled to zero, sandboxes gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while describe(&agent, "scale")["instances"]["alive"] != 0 {
        assert!(
            Instant::now() < deadline,
            "still {}",
            describe(&agent, "scale")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Their sandboxes are torn down right after (killed, reaped, cgroups removed).
    while !agent.running_sandboxes().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", agent.running_sandboxes());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stopped while waiting for their next event, without being handed a bogus one (the
    // lambda_runtime client panics on an answer to /next that carries no request id).
    let log = agent.log();
    assert!(
        !log.contains("panicked") && !log.contains("lambda-runtime-aws-request-id"),
        "a reaped instance saw an answer to its long poll:\n{log}"
    );
    // And the next call starts one again.
    invoke_api(&agent, "scale", &json!({}), &[]).expect_ok(200);
    agent.finish();
}

#[test]
fn min_instances_stay_warm() {
    let agent = Agent::start("lambda-min");
    let f = lambda_fixture("lambda-rust", "warm", "min_instances = 2\nkeep_alive_s = 0");
    agent.deploy(f.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while describe(&agent, "warm")["instances"]["idle"] != 2 {
        assert!(Instant::now() < deadline, "{}", describe(&agent, "warm"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Served warm, and still two after the keep-alive (0 s) has passed many times over.
    invoke_api(&agent, "warm", &json!({}), &[]).expect_ok(200);
    assert_eq!(
        metric(&agent, "fnlet_warm_starts_total{function=\"warm\"}"),
        1.0
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(describe(&agent, "warm")["instances"]["alive"], 2);
    agent.finish();
}

#[test]
fn init_failures_timeouts_and_crashes_get_a_fresh_instance() {
    let agent = Agent::start("lambda-fail");
    // Never asks for its first event: an init error after init_timeout_s.
    let f = lambda_fixture(
        "lambda-rust",
        "stuck",
        "init_timeout_s = 0.5\n[env]\nFIXTURE_NEVER_READY = \"1\"",
    );
    agent.deploy(f.path());
    let t = Instant::now();
    let r = invoke_api(&agent, "stuck", &json!({}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "Runtime.InitTimeout", "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(describe(&agent, "stuck")["instances"]["alive"], 0);
    // The same through a function URL: a 502 naming the init timeout.
    agent
        .request(Method::GET, "/fn/stuck", false, None)
        .expect_error(502, "init_timeout");

    // Exits before its runtime starts.
    let f = lambda_fixture("lambda-rust", "dies", "[env]\nFIXTURE_INIT_FAIL = \"1\"");
    agent.deploy(f.path());
    let r = invoke_api(&agent, "dies", &json!({}), &[]);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "Runtime.ExitError", "{}", r.text());
    let logs = String::from_utf8_lossy(&agent.cli(&["logs", "dies"]).stdout).into_owned();
    assert!(
        logs.contains("FIXTURE_INIT_FAIL"),
        "init output is logged: {logs}"
    );

    // A timeout kills the instance; the next call gets a fresh one.
    let f = lambda_fixture("lambda-rust", "slow", "timeout_s = 0.5");
    agent.deploy(f.path());
    invoke_api(&agent, "slow", &json!({}), &[]).expect_ok(200);
    let r = invoke_api(&agent, "slow", &json!({"sleep_ms": 5000}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "Sandbox.Timedout", "{}", r.text());
    let r = invoke_api(&agent, "slow", &json!({"n": 1}), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"slow\"}"),
        2.0
    );
    agent.finish();
}

/// A redeploy retires the warm instances of the old version.
/// A runtime that cannot be executed: the caller learns which exec failed, from a prepared
/// sandbox (released without waiting for its exec) as from a full spawn.
#[test]
fn an_entrypoint_that_cannot_run_is_named() {
    for prepare_ahead in [true, false] {
        let agent = Agent::start_with(
            if prepare_ahead {
                "lambda-noexec-prepared"
            } else {
                "lambda-noexec-spawned"
            },
            Settings {
                prepare_ahead,
                ..Settings::default()
            },
        );
        let f = lambda_fixture(
            "lambda-rust",
            "noexec",
            "entrypoint = [\"/var/task/no-such-runtime\"]",
        );
        agent.deploy(f.path());
        if prepare_ahead {
            let t = Instant::now();
            while describe(&agent, "noexec")["prepared"] != true {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no prepared sandbox: {}",
                    describe(&agent, "noexec")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for _ in 0..2 {
            let r = invoke_api(&agent, "noexec", &json!({}), &[]);
            r.expect_ok(200);
            assert_eq!(
                r.header("x-amz-function-error").as_deref(),
                Some("Unhandled"),
                "{}",
                r.text()
            );
            let e = r.json();
            assert_eq!(e["errorType"], "Runtime.InvalidEntrypoint", "{e}");
            let message = e["errorMessage"].as_str().unwrap_or_default();
            assert!(
                message.contains("exec /var/task/no-such-runtime: ENOENT"),
                "prepared: {prepare_ahead}: {message}"
            );
            assert_eq!(describe(&agent, "noexec")["instances"]["alive"], 0);
        }
        agent.finish();
    }
}

#[test]
fn a_new_version_gets_new_instances() {
    let agent = Agent::start("lambda-ver");
    let f = lambda_fixture("lambda-rust", "ver", "[env]\nV = \"1\"");
    agent.deploy(f.path());
    invoke_api(&agent, "ver", &json!({}), &[]).expect_ok(200);
    let f2 = lambda_fixture("lambda-rust", "ver", "memory_mb = 64");
    agent.deploy(f2.path());
    let r = invoke_api(&agent, "ver", &json!({}), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("2"));
    assert_eq!(r.json()["memory"], "64");
    let deadline = Instant::now() + Duration::from_secs(5);
    while describe(&agent, "ver")["instances"]["alive"] != 1 {
        assert!(Instant::now() < deadline, "{}", describe(&agent, "ver"));
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.finish();
}

/// A custom runtime in bash, speaking the Runtime API over /dev/tcp: it reaches the API on its
/// loopback, and nothing else of the host (the agent's own port, the host's loopback). It also
/// counts the TCP connections to the API its network namespace has while it posts (none when
/// the agent answers its connects with a Unix socket pair).
const BASH_RUNTIME: &str = r#"#!/bin/bash
set -u
api=${AWS_LAMBDA_RUNTIME_API%:*}; port=${AWS_LAMBDA_RUNTIME_API#*:}
while true; do
  exec 3<>"/dev/tcp/$api/$port" || exit 3
  printf 'GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: rt\r\nConnection: close\r\n\r\n' >&3
  id=; len=0
  while IFS= read -r line <&3; do
    line=${line%$'\r'}
    [ -z "$line" ] && break
    case "${line,,}" in
      lambda-runtime-aws-request-id:*) id=${line#*: } ;;
      content-length:*) len=${line#*: } ;;
    esac
  done
  event=$(head -c "$len" <&3)
  exec 3<&-
  # The event names a port of the host's loopback to try.
  target=${event//[^0-9]/}
  if (exec 4<>"/dev/tcp/127.0.0.1/$target") 2>/dev/null; then reach=true; else reach=false; fi
  exec 3<>"/dev/tcp/$api/$port"
  # /proc/net/tcp: "sl local rem st": a connection to 127.0.0.1:9001 (0x2329), established (01).
  tcp=$(grep -c " 0100007F:2329 01 " /proc/net/tcp)
  body="{\"reached\": $reach, \"uid\": $(id -u), \"runtime_api\": \"$AWS_LAMBDA_RUNTIME_API\", \"tcp_to_api\": $tcp}"
  printf 'POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: rt\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s' "$id" "${#body}" "$body" >&3
  cat <&3 >/dev/null
  exec 3<&-
done
"#;

#[test]
fn the_runtime_api_is_the_only_thing_an_instance_reaches() {
    let f = Fixture::new(
        "name = \"net\"\nmode = \"lambda\"\npublic = true\ntimeout_s = 5\n",
        &[("bootstrap", BASH_RUNTIME.as_bytes(), 0o755)],
    );
    // With `runtime_api_socketpair = true` the runtime's connects to its API become Unix socket
    // pairs (also when a user namespace holds the instance); by default they stay loopback TCP.
    // Either way the API is all the runtime reaches.
    for (test, socketpair, userns) in [
        ("lambda-net", true, false),
        ("lambda-net-userns", true, true),
        ("lambda-net-tcp", false, false),
    ] {
        let agent = Agent::start_with(
            test,
            Settings {
                lambda_extra: format!("runtime_api_socketpair = {socketpair}\n"),
                sandbox_extra: format!("user_namespace = {userns}\n"),
                ..Settings::default()
            },
        );
        agent.deploy(f.path());
        for port in [agent.port, 9001] {
            let r = invoke_api(&agent, "net", &json!(port), &[]);
            r.expect_ok(200);
            let out = r.json();
            assert_eq!(out["runtime_api"], "127.0.0.1:9001", "{out}");
            assert_eq!(
                out["tcp_to_api"],
                if socketpair { 0 } else { 1 },
                "socketpair {socketpair}, user namespace {userns}: {out}"
            );
            assert!(
                agent.uids.contains(&(out["uid"].as_u64().unwrap() as u32)),
                "{out}"
            );
            if port == 9001 {
                // Its own Runtime API, from a second connection: reachable.
                assert_eq!(out["reached"], true, "{out}");
            } else {
                assert_eq!(
                    out["reached"], false,
                    "the agent's API port is reachable: {out}"
                );
            }
        }
        agent.finish();
    }
}

#[test]
fn memory_limits_and_the_cli() {
    let agent = Agent::start("lambda-mem");
    let f = lambda_fixture("lambda-rust", "hog", "memory_mb = 48");
    agent.deploy(f.path());
    let r = invoke_api(&agent, "hog", &json!({"alloc_mb": 200}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    assert_eq!(r.json()["errorType"], "Runtime.OutOfMemory", "{}", r.text());
    // Killed: the next call is a new instance, and small allocations are fine.
    invoke_api(&agent, "hog", &json!({"alloc_mb": 4}), &[]).expect_ok(200);
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"hog\"}"),
        2.0
    );

    // `fnlet invoke` sends a Lambda function its input as the event (the Invoke API).
    let out = agent.cli(&["invoke", "hog", "-d", "{\"x\": 1}"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["echo"], json!({"x": 1}));
    let out = agent.cli(&["invoke", "hog", "-d", "{\"fail\": true}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FixtureError"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the function failed"));
    let d = agent.cli(&["describe", "hog", "--json"]);
    let d: Value = serde_json::from_slice(&d.stdout).expect("describe --json");
    assert_eq!(d["manifest"]["mode"], "lambda");
    agent.finish();
}

/// Response streaming (lambda_http's run_with_streaming_response): the HTTP integration
/// prelude becomes the status and headers, the rest the body; the Invoke API answers it
/// buffered; the instance serves the next call once the stream is done.
#[test]
fn streamed_responses_reach_the_caller() {
    let agent = Agent::start("lambda-stream");
    let f = lambda_fixture(
        "lambda-http",
        "stream",
        "timeout_s = 5\n[env]\nFIXTURE_STREAMING = \"1\"",
    );
    agent.deploy(f.path());
    for _ in 0..3 {
        let r = agent.request(Method::GET, "/fn/stream/hello?name=stream", false, None);
        r.expect_ok(200);
        assert_eq!(r.text(), "hello stream");
        assert_eq!(r.header("x-fixture").as_deref(), Some("1"));
        assert_eq!(
            r.header("x-fnlet-host").as_deref(),
            Some(agent.node_id.as_str())
        );
        assert!(r.header("set-cookie").is_some(), "{:?}", r.headers);
    }
    let r = agent.request(Method::GET, "/fn/stream/status/418", false, None);
    assert_eq!(r.status, 418);
    agent
        .request(Method::GET, "/fn/stream/fail", false, None)
        .expect_error(502, "handler_error");
    // One instance served them all, one after the other.
    assert_eq!(describe(&agent, "stream")["instances"]["peak"], 1);
    let logs = String::from_utf8_lossy(&agent.cli(&["logs", "stream"]).stdout).into_owned();
    assert_eq!(logs.matches("REPORT RequestId").count(), 5, "{logs}");
    agent.finish();
}

/// Sends a request on a raw connection and hangs up before the answer.
fn call_and_hang_up(agent: &Agent, path: &str, body: &str, after: Duration) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", agent.port)).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    std::thread::sleep(after);
    drop(s);
}

/// A caller who hangs up mid-call costs no warm instance: the invocation runs to its end, the
/// instance goes back to the pool, and the log and a counter say the caller left. An exec-mode
/// sandbox is killed (nobody reads its answer) and counted too.
#[test]
fn a_caller_who_hangs_up_leaves_the_instance_warm() {
    let agent = Agent::start("lambda-hangup");
    let f = lambda_fixture("lambda-rust", "patient", "timeout_s = 10");
    agent.deploy(f.path());
    invoke_api(&agent, "patient", &json!({}), &[]).expect_ok(200);
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"patient\"}"),
        1.0
    );

    call_and_hang_up(
        &agent,
        "/2015-03-31/functions/patient/invocations",
        r#"{"sleep_ms": 1000, "stderr": "still running"}"#,
        Duration::from_millis(300),
    );
    let abandoned = "fnlet_abandoned_invocations_total{function=\"patient\"}";
    let t = Instant::now();
    while metric(&agent, abandoned) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the abandoned call was never counted:\n{}",
            agent.get("/metrics").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same instance serves the next call: a warm start, no new cold one.
    let r = invoke_api(&agent, "patient", &json!({"n": 2}), &[]);
    r.expect_ok(200);
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    assert_eq!(
        metric(&agent, "fnlet_cold_starts_total{function=\"patient\"}"),
        1.0,
        "a hung-up call cost the warm instance"
    );
    assert_eq!(
        metric(&agent, "fnlet_warm_starts_total{function=\"patient\"}"),
        2.0
    );
    let logs = String::from_utf8_lossy(&agent.cli(&["logs", "patient"]).stdout).into_owned();
    assert!(
        logs.contains("still running") && logs.contains("caller disconnected"),
        "{logs}"
    );
    assert_eq!(describe(&agent, "patient")["instances"]["alive"], 1);

    // Exec mode: the sandbox goes with the caller.
    let f = Fixture::sh(
        "sleepy",
        "public = true\ntimeout_s = 60",
        "sleep 30; echo done",
    );
    agent.deploy(f.path());
    call_and_hang_up(&agent, "/fn/sleepy", "", Duration::from_millis(500));
    let abandoned = "fnlet_abandoned_invocations_total{function=\"sleepy\"}";
    let t = Instant::now();
    while metric(&agent, abandoned) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the abandoned exec call was never counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed, not left to sleep its 30 s: only the Lambda instance still runs.
    let t = Instant::now();
    let sleepy = || {
        agent
            .running_sandboxes()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("/sleepy-"))
            .collect::<Vec<_>>()
    };
    while !sleepy().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the abandoned exec sandbox still runs: {:?}",
            sleepy()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.finish();
}
