//! Asynchronous invocation with real clients: the AWS CLI (`awscli` from PyPI) and boto3 send
//! Event invokes and set event invoke configs; a destination URL served by this test counts the
//! records. Needs root, and PyPI the first time (the packages are kept under target/).
//!
//! `async_events_with_real_clients` runs every case on one agent (short configured waits);
//! `kill_9_with_accepted_events` kills an agent holding 500 accepted events and restarts it;
//! `https_destinations_are_verified` posts records to https:// URLs.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};
use common::aws::{clients_dir, python};
use common::sink::Sink;
use serde_json::{Value, json};

const ACCOUNT: &str = "000000000000";

fn arn(name: &str) -> String {
    format!("arn:aws:lambda:us-east-1:{ACCOUNT}:function:{name}")
}

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Steps for boto3, as JSON; the script prints one result per step.
const BOTO3_SCRIPT: &str = r#"
import json, sys, concurrent.futures
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

cfg = json.loads(sys.stdin.read())
lam = boto3.client("lambda", endpoint_url=cfg["endpoint"], region_name="us-east-1",
                   aws_access_key_id=cfg["key"], aws_secret_access_key=cfg["secret"],
                   config=Config(retries={"total_max_attempts": 1},
                                 max_pool_connections=16))

def call(f, **kw):
    try:
        r = f(**kw)
        r.pop("ResponseMetadata", None) if "StatusCode" not in r else None
        return r
    except ClientError as e:
        return {"error": e.response["Error"].get("Code"),
                "message": e.response["Error"].get("Message"),
                "http": e.response["ResponseMetadata"]["HTTPStatusCode"]}

def event(name, payload):
    r = call(lam.invoke, FunctionName=name, InvocationType="Event", Payload=payload)
    if "error" in r:
        return r
    return {"status": r["StatusCode"], "request_id": r["ResponseMetadata"]["RequestId"],
            "body": r["Payload"].read().decode()}

out = []
for step in cfg["steps"]:
    op = step["op"]
    if op == "events":
        payloads = [json.dumps({"n": i, "tag": step.get("tag", "")})
                    for i in range(step["count"])]
        with concurrent.futures.ThreadPoolExecutor(step.get("threads", 8)) as ex:
            out.append(list(ex.map(lambda p: event(step["name"], p), payloads)))
    elif op == "event":
        out.append(event(step["name"], step["payload"]))
    elif op == "put_config":
        out.append(call(lam.put_function_event_invoke_config, FunctionName=step["name"],
                        **step["args"]))
    elif op == "update_config":
        out.append(call(lam.update_function_event_invoke_config, FunctionName=step["name"],
                        **step["args"]))
    elif op == "get_config":
        out.append(call(lam.get_function_event_invoke_config, FunctionName=step["name"]))
    elif op == "delete_config":
        out.append(call(lam.delete_function_event_invoke_config, FunctionName=step["name"]))
print(json.dumps(out, default=str))
"#;

struct Clients {
    dir: PathBuf,
    endpoint: String,
    key: String,
    secret: String,
}

impl Clients {
    fn new(agent: &Agent) -> Clients {
        let key = agent.cli(&["keys", "create", "--description", "events test", "--json"]);
        assert!(key.status.success(), "fnlet keys create: {}", show(&key));
        let key: Value = serde_json::from_slice(&key.stdout).expect("keys create --json");
        Clients {
            dir: clients_dir(),
            endpoint: agent.base_url(),
            key: key["access_key_id"].as_str().expect("key id").into(),
            secret: key["secret_access_key"].as_str().expect("secret").into(),
        }
    }

    /// Runs `steps` with boto3; one result per step.
    fn boto3(&self, steps: Value) -> Vec<Value> {
        let cfg = json!({
            "endpoint": self.endpoint, "key": self.key, "secret": self.secret, "steps": steps,
        });
        // The steps go on stdin: payloads can be larger than a command line.
        let mut child = python(&self.dir)
            .arg("-c")
            .arg(BOTO3_SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = cfg.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let o = child.wait_with_output().expect("wait for python3");
        writer
            .join()
            .expect("stdin writer")
            .expect("write the steps");
        assert!(o.status.success(), "the boto3 script failed: {}", show(&o));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("boto3 output is not JSON ({e}): {}", show(&o)))
    }

    /// `aws lambda ARGS` (the AWS CLI v1); its output.
    fn aws(&self, args: &[&str]) -> Output {
        python(&self.dir)
            .args(["-m", "awscli", "lambda", "--endpoint-url", &self.endpoint])
            .args(["--region", "us-east-1"])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &self.key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .output()
            .expect("run the AWS CLI")
    }
}

fn request_ids(results: &Value) -> Vec<String> {
    results
        .as_array()
        .expect("a list of results")
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 202, "{r}");
            assert_eq!(r["body"], "", "{r}");
            r["request_id"].as_str().expect("request id").to_string()
        })
        .collect()
}

/// The value of a /metrics sample (`name{labels}`), 0 when absent.
fn metric(agent: &Agent, sample: &str) -> f64 {
    let text = agent.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Lines the function `sink` wrote to its log, as (request id, record).
fn sink_fn_records(agent: &Agent) -> Vec<(String, Value)> {
    let o = agent.cli(&["logs", "sink", "--json", "--tail", "10000"]);
    assert!(o.status.success(), "fnlet logs sink: {}", show(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| {
            let rec = l["line"].as_str()?.strip_prefix("RECORD ")?;
            Some((
                l["request_id"].as_str()?.to_string(),
                serde_json::from_str(rec).ok()?,
            ))
        })
        .collect()
}

/// Every try of function `name` the log shows: (request id, time), in order.
fn tries(agent: &Agent, name: &str) -> Vec<(String, f64)> {
    let o = agent.cli(&["logs", name, "--json", "--tail", "10000"]);
    assert!(o.status.success(), "fnlet logs: {}", show(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| {
            let t = l["line"]
                .as_str()?
                .strip_prefix("TRY ")?
                .trim()
                .parse()
                .ok()?;
            Some((l["request_id"].as_str()?.to_string(), t))
        })
        .collect()
}

fn check_failure_record(r: &Value, function: &str, request_id: &str, condition: &str, count: u64) {
    assert_eq!(r["version"], "1.0", "{r:#}");
    let ts = r["timestamp"].as_str().expect("timestamp");
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{r:#}"
    );
    let ctx = &r["requestContext"];
    assert_eq!(ctx["requestId"], request_id, "{r:#}");
    assert_eq!(
        ctx["functionArn"],
        format!("{}:$LATEST", arn(function)),
        "{r:#}"
    );
    assert_eq!(ctx["condition"], condition, "{r:#}");
    assert_eq!(ctx["approximateInvokeCount"], count, "{r:#}");
    assert_eq!(r["responseContext"]["statusCode"], 200, "{r:#}");
    assert_eq!(r["responseContext"]["executedVersion"], "$LATEST", "{r:#}");
    assert_eq!(r["responseContext"]["functionError"], "Unhandled", "{r:#}");
    assert_eq!(
        r["responsePayload"]["errorType"], "Runtime.ExitError",
        "{r:#}"
    );
    assert!(
        r["responsePayload"]["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("exit status 3") && m.contains(request_id)),
        "{r:#}"
    );
}

fn settings(extra_events: &str) -> Settings {
    Settings {
        queue_timeout_ms: 300,
        limits_extra: format!("\n[events]\n{extra_events}\n"),
        ..Settings::default()
    }
}

/// A function that logs `TRY <unix time>` and its input, and answers `ok:<input>`; it fails
/// (exit 3) when the input asks it to, and sleeps when it asks for that.
fn worker(name: &str, extra: &str) -> Fixture {
    Fixture::sh(
        name,
        extra,
        r#"in=$(cat)
echo "TRY $(date +%s.%N)" >&2
echo "IN $in" >&2
case "$in" in *'"fail"'*) exit 3;; esac
case "$in" in *'"hold"'*) sleep 4;; *'"hold_long"'*) sleep 40;; esac
printf 'ok:%s' "$in""#,
    )
}

#[test]
fn async_events_with_real_clients() {
    let agent = Agent::start_with(
        "events",
        settings("max_queued_mb = 1\nbackoff_min_s = 0.2\nbackoff_max_s = 1.0\nretry_base_s = 60"),
    );
    let sink = Sink::start();
    let clients = Clients::new(&agent);

    // A function that writes each record it gets to its log: the function destination.
    let sink_fn = Fixture::sh(
        "sink",
        "max_concurrency = 2",
        "echo \"RECORD $(cat)\" >&2\necho ok",
    );
    agent.deploy(sink_fn.path());
    let count = worker("count", &format!("[async]\non_success = \"{}\"", sink.url));
    agent.deploy(count.path());
    // Retried twice, 1 s then 2 s apart, then its record goes to the URL.
    let failing = worker(
        "failing",
        &format!("[async]\nretry_base_s = 1.0\non_failure = \"{}\"", sink.url),
    );
    agent.deploy(failing.path());
    // Its config comes from boto3 below: one retry, the record to the function `sink`.
    let failing2 = worker("failing2", "[async]\nretry_base_s = 0.5");
    agent.deploy(failing2.path());
    // A retry would start 61 s after the try, past the 60 s age: not tried.
    let aging = worker(
        "aging",
        &format!(
            "[async]\nmax_event_age_s = 60\nretry_base_s = 61.0\non_failure = \"{}\"",
            sink.url
        ),
    );
    agent.deploy(aging.path());
    // One at a time, no retries: a throttle must not use one. Public: the test's own
    // synchronous call that holds its slot is unsigned.
    let busy = worker(
        "busy",
        &format!(
            "max_concurrency = 1\npublic = true\n[async]\nmax_retry_attempts = 0\non_success = \"{}\"",
            sink.url
        ),
    );
    agent.deploy(busy.path());
    let slow = worker("slow", "max_concurrency = 1");
    agent.deploy(slow.path());

    // The AWS CLI: an exec-mode function through the Invoke API, synchronously ...
    let out_file = tempfile::NamedTempFile::new().expect("temp file");
    let out_path = out_file.path().to_str().expect("utf-8");
    let o = clients.aws(&[
        "invoke",
        "--function-name",
        "count",
        "--payload",
        r#"{"via": "cli"}"#,
        out_path,
    ]);
    assert!(o.status.success(), "aws lambda invoke: {}", show(&o));
    let answer = std::fs::read_to_string(out_file.path()).expect("the CLI's outfile");
    assert_eq!(answer, r#"ok:{"via": "cli"}"#);
    let cli_out: Value = serde_json::from_slice(&o.stdout).expect("CLI JSON");
    assert_eq!(cli_out["StatusCode"], 200, "{cli_out}");
    // ... and as an Event: 202, then run, its success record at the URL.
    let o = clients.aws(&[
        "invoke",
        "--function-name",
        "count",
        "--invocation-type",
        "Event",
        "--payload",
        r#"{"via": "cli-event"}"#,
        out_path,
    ]);
    assert!(o.status.success(), "aws lambda invoke Event: {}", show(&o));
    let cli_out: Value = serde_json::from_slice(&o.stdout).expect("CLI JSON");
    assert_eq!(cli_out["StatusCode"], 202, "{cli_out}");
    let r = sink.wait(Duration::from_secs(30), "the CLI's event", |r| {
        r.iter().any(|r| r["requestPayload"]["via"] == "cli-event")
    });
    let rec = r
        .iter()
        .find(|r| r["requestPayload"]["via"] == "cli-event")
        .expect("found above");
    assert_eq!(rec["requestContext"]["condition"], "Success", "{rec:#}");
    assert_eq!(
        rec["requestContext"]["approximateInvokeCount"], 1,
        "{rec:#}"
    );
    assert_eq!(
        rec["responsePayload"], r#"ok:{"via": "cli-event"}"#,
        "{rec:#}"
    );
    assert_eq!(
        rec["responseContext"]["functionError"],
        Value::Null,
        "{rec:#}"
    );
    // `fnlet invoke --async` prints the request id, which is the run's.
    let o = agent.cli(&["invoke", "count", "--async", "-d", r#"{"via": "fnlet"}"#]);
    assert!(o.status.success(), "fnlet invoke --async: {}", show(&o));
    let fnlet_id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    sink.wait(Duration::from_secs(30), "fnlet invoke --async", |r| {
        r.iter()
            .any(|r| r["requestContext"]["requestId"] == fnlet_id.as_str())
    });
    let before = sink.records().len();

    // boto3: the event invoke config API, and events for each case.
    let res = clients.boto3(json!([
        {"op": "get_config", "name": "failing2"},
        {"op": "put_config", "name": "failing2", "args": {"MaximumRetryAttempts": 3}},
        {"op": "put_config", "name": "failing2", "args": {
            "DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sqs:us-east-1:000000000000:q"}}}},
        {"op": "put_config", "name": "failing2", "args": {
            "MaximumRetryAttempts": 1, "MaximumEventAgeInSeconds": 600,
            "DestinationConfig": {"OnFailure": {"Destination": arn("sink")}}}},
        {"op": "update_config", "name": "failing2", "args": {"MaximumEventAgeInSeconds": 900}},
        {"op": "get_config", "name": "failing2"},
        {"op": "put_config", "name": "count", "args": {"MaximumRetryAttempts": 0}},
        {"op": "delete_config", "name": "count"},
        {"op": "get_config", "name": "count"},
        {"op": "event", "name": "count", "payload": "x".repeat(5 << 20)},
    ]));
    assert_eq!(res[0]["error"], "ResourceNotFoundException", "{res:#?}");
    assert_eq!(
        res[1]["error"], "InvalidParameterValueException",
        "{res:#?}"
    );
    assert_eq!(
        res[2]["error"], "InvalidParameterValueException",
        "{res:#?}"
    );
    assert!(
        res[2]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not built yet")),
        "{res:#?}"
    );
    assert_eq!(res[3]["MaximumRetryAttempts"], 1, "{res:#?}");
    let got = &res[5];
    assert_eq!(got["MaximumRetryAttempts"], 1, "{res:#?}");
    assert_eq!(got["MaximumEventAgeInSeconds"], 900, "{res:#?}");
    assert_eq!(
        got["DestinationConfig"]["OnFailure"]["Destination"],
        arn("sink"),
        "{res:#?}"
    );
    assert_eq!(
        got["FunctionArn"],
        format!("{}:$LATEST", arn("failing2")),
        "{res:#?}"
    );
    assert_eq!(res[7].get("error"), None, "{res:#?}");
    assert_eq!(res[8]["error"], "ResourceNotFoundException", "{res:#?}");
    // 5 MiB: Lambda's error for an async payload over 1 MiB.
    assert_eq!(res[9]["error"], "RequestTooLargeException", "{res:#?}");
    assert_eq!(res[9]["http"], 413, "{res:#?}");

    // Failures: one event each, the waits checked in the function's own log.
    let res = clients.boto3(json!([
        {"op": "event", "name": "failing", "payload": "{\"fail\": 1}"},
        {"op": "event", "name": "failing2", "payload": "{\"fail\": 2}"},
        {"op": "event", "name": "aging", "payload": "{\"fail\": 3}"},
    ]));
    let failing_id = res[0]["request_id"].as_str().expect("202").to_string();
    let failing2_id = res[1]["request_id"].as_str().expect("202").to_string();
    let aging_id = res[2]["request_id"].as_str().expect("202").to_string();
    // While it waits for its retry, `fnlet events` shows it (once its first try has failed,
    // which a loaded machine may take a while to run; or it is already gone).
    let started = Instant::now();
    loop {
        let o = agent.cli(&["events", "failing", "--json"]);
        assert!(o.status.success(), "fnlet events: {}", show(&o));
        let ev: Value = serde_json::from_slice(&o.stdout).expect("events JSON");
        if ev["retrying"][0]["request_id"] == failing_id.as_str() || ev["stored"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the failed event is not shown retrying: {ev:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = agent.cli(&["events", "failing"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("on failure:") && text.contains(&sink.url),
        "{text}"
    );

    // Throttled: the only slot of `busy` is held by a synchronous call while its event comes.
    let hold = agent.invoke_in_background("busy", br#"{"hold": 1}"#);
    std::thread::sleep(Duration::from_millis(300));
    let res = clients.boto3(json!([{"op": "event", "name": "busy", "payload": "{\"b\": 1}"}]));
    let busy_id = res[0]["request_id"].as_str().expect("202").to_string();

    // Queue full: `slow` takes one event at a time, and holds 1 MiB of payload at most.
    let big = format!("{{\"hold\": \"{}\"}}", "x".repeat(400 << 10));
    let res = clients.boto3(json!([
        {"op": "event", "name": "slow", "payload": big},
        {"op": "event", "name": "slow", "payload": big},
        {"op": "event", "name": "slow", "payload": big},
    ]));
    assert_eq!(res[0]["status"], 202, "{res:#?}");
    assert_eq!(res[1]["status"], 202, "{res:#?}");
    assert_eq!(res[2]["error"], "TooManyRequestsException", "{res:#?}");
    assert_eq!(res[2]["http"], 429, "{res:#?}");

    // 1,000 events, all run exactly once: one success record each.
    let res = clients.boto3(
        json!([{"op": "events", "name": "count", "count": 1000, "tag": "bulk", "threads": 8}]),
    );
    let ids = request_ids(&res[0]);
    assert_eq!(ids.len(), 1000);
    let records = sink.wait(Duration::from_secs(240), "1,000 events", |r| {
        r.iter()
            .filter(|r| r["requestPayload"]["tag"] == "bulk")
            .count()
            >= 1000
    });
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r["requestPayload"]["tag"] == "bulk")
    {
        assert_eq!(r["requestContext"]["condition"], "Success", "{r:#}");
        *seen
            .entry(
                r["requestContext"]["requestId"]
                    .as_str()
                    .expect("id")
                    .into(),
            )
            .or_default() += 1;
    }
    let mut sent = ids.clone();
    sent.sort();
    let mut got: Vec<String> = seen.keys().cloned().collect();
    got.sort();
    assert_eq!(got, sent, "the records name exactly the accepted events");
    assert!(seen.values().all(|n| *n == 1), "run twice: {seen:?}");

    // The failing functions' records, all fields.
    let recs = sink.wait(Duration::from_secs(60), "the failure records", |r| {
        [&failing_id, &aging_id].iter().all(|id| {
            r.iter()
                .any(|r| r["requestContext"]["requestId"] == id.as_str())
        })
    });
    let find = |id: &str| {
        recs.iter()
            .find(|r| r["requestContext"]["requestId"] == id)
            .expect("found above")
            .clone()
    };
    let r = find(&failing_id);
    check_failure_record(&r, "failing", &failing_id, "RetriesExhausted", 3);
    assert_eq!(r["requestPayload"], json!({"fail": 1}));
    let t: Vec<f64> = tries(&agent, "failing")
        .into_iter()
        .filter(|(id, _)| *id == failing_id)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(t.len(), 3, "three tries: {t:?}");
    assert!(
        t[1] - t[0] >= 1.0 && t[2] - t[1] >= 2.0,
        "waits 1 s then 2 s: {t:?}"
    );
    let r = find(&aging_id);
    check_failure_record(&r, "aging", &aging_id, "EventAgeExceeded", 1);
    // The function destination: the record is `sink`'s event.
    let started = Instant::now();
    let (sink_id, rec) = loop {
        if let Some(found) = sink_fn_records(&agent)
            .into_iter()
            .find(|(_, r)| r["requestContext"]["requestId"] == failing2_id.as_str())
        {
            break found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "failing2's record never reached sink: {:?}",
            sink_fn_records(&agent)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(
        sink_id, failing2_id,
        "the destination's run has its own request id"
    );
    check_failure_record(&rec, "failing2", &failing2_id, "RetriesExhausted", 2);
    assert_eq!(rec["requestPayload"], json!({"fail": 2}));

    // The throttled event ran once, after the slot was free, without having used a retry.
    let r = hold.join().expect("hold thread").expect("the held call");
    assert_eq!(r.status, 200, "{}", r.text());
    let recs = sink.wait(Duration::from_secs(30), "busy's event", |r| {
        r.iter()
            .any(|r| r["requestContext"]["requestId"] == busy_id.as_str())
    });
    let rec = recs
        .iter()
        .find(|r| r["requestContext"]["requestId"] == busy_id.as_str())
        .expect("found above");
    assert_eq!(rec["requestContext"]["condition"], "Success", "{rec:#}");
    assert_eq!(
        rec["requestContext"]["approximateInvokeCount"], 1,
        "{rec:#}"
    );
    assert!(
        metric(
            &agent,
            r#"fnlet_events_attempts_total{function="busy",result="throttled"}"#
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &agent,
            r#"fnlet_events_dropped_total{function="failing",condition="RetriesExhausted"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &agent,
            r#"fnlet_events_dropped_total{function="aging",condition="EventAgeExceeded"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&agent, r#"fnlet_events_accepted_total{function="count"}"#),
        1002.0
    );
    // Group commit: far fewer commits than the events accepted and ended.
    let commits = metric(&agent, "fnlet_events_commits_total");
    assert!(commits > 0.0 && commits < 3000.0, "{commits} commits");
    let o = agent.cli(&["events", "failing"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains(&failing_id) && text.contains("RetriesExhausted"),
        "{text}"
    );
    assert!(sink.records().len() > before);
    agent.finish();
}

#[test]
fn kill_9_with_accepted_events() {
    let mut agent = Agent::start_with(
        "events-kill9",
        settings("backoff_min_s = 0.2\nbackoff_max_s = 0.5"),
    );
    let sink = Sink::start();
    let clients = Clients::new(&agent);
    let f = worker(
        "one",
        &format!(
            "max_concurrency = 1\ntimeout_s = 60\npublic = true\n[async]\non_success = \"{}\"",
            sink.url
        ),
    );
    agent.deploy(f.path());
    // Its only slot is held: every event waits (throttled, requeued) until the agent dies.
    let hold = agent.invoke_in_background("one", br#"{"hold_long": 1}"#);
    std::thread::sleep(Duration::from_millis(300));
    let res = clients
        .boto3(json!([{"op": "events", "name": "one", "count": 500, "tag": "k9", "threads": 8}]));
    let ids = request_ids(&res[0]);
    assert!(
        sink.records().is_empty(),
        "ran before the kill: {:?}",
        sink.records()
    );
    agent.kill9();
    let _ = hold.join();
    agent.restart();
    let records = sink.wait(
        Duration::from_secs(180),
        "500 events after the restart",
        |r| {
            let mut s: Vec<&str> = r
                .iter()
                .filter_map(|r| r["requestContext"]["requestId"].as_str())
                .collect();
            s.sort();
            s.dedup();
            s.len() >= 500
        },
    );
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *seen
            .entry(r["requestContext"]["requestId"].as_str().expect("id"))
            .or_default() += 1;
    }
    let mut sent: Vec<&str> = ids.iter().map(String::as_str).collect();
    sent.sort();
    let mut got: Vec<&str> = seen.keys().copied().collect();
    got.sort();
    assert_eq!(got, sent, "every accepted event ran");
    // Duplicates only for tries in flight at the kill (one slot: at most one), and counted.
    let twice = seen.values().filter(|n| **n > 1).count() as f64;
    let counted = metric(&agent, r#"fnlet_events_duplicates_total{function="one"}"#);
    assert!(
        twice <= counted && counted <= 1.0,
        "{twice} run twice, {counted} counted"
    );
    agent.finish();
}

#[test]
fn https_destinations_are_verified() {
    // Two https sinks, each with a CA of its own: the agent trusts only the first one's.
    let (trusted, ca_pem) = Sink::start_tls();
    let (untrusted, _) = Sink::start_tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write the CA");
    let agent = Agent::start_with(
        "events-https",
        settings(&format!(
            "backoff_min_s = 0.2\nbackoff_max_s = 0.5\ndestination_ca_file = \"{}\"",
            ca_file.display()
        )),
    );
    let ok = worker(
        "tls-ok",
        &format!("[async]\non_success = \"{}\"", trusted.url),
    );
    agent.deploy(ok.path());
    let bad = worker(
        "tls-bad",
        &format!("[async]\non_success = \"{}\"", untrusted.url),
    );
    agent.deploy(bad.path());

    let o = agent.cli(&["invoke", "tls-ok", "--async", "-d", r#"{"via": "https"}"#]);
    assert!(o.status.success(), "fnlet invoke --async: {}", show(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let records = trusted.wait(Duration::from_secs(30), "the record over https", |r| {
        r.iter()
            .any(|r| r["requestContext"]["requestId"] == id.as_str())
    });
    let rec = records
        .iter()
        .find(|r| r["requestContext"]["requestId"] == id.as_str())
        .expect("the record");
    assert_eq!(rec["requestContext"]["condition"], "Success", "{rec:#}");
    assert_eq!(rec["responsePayload"], r#"ok:{"via": "https"}"#, "{rec:#}");

    // A server whose certificate does not verify gets nothing; the record is retried.
    let o = agent.cli(&["invoke", "tls-bad", "--async", "-d", "{}"]);
    assert!(o.status.success(), "fnlet invoke --async: {}", show(&o));
    let started = Instant::now();
    let retries =
        r#"fnlet_events_destination_deliveries_total{function="tls-bad",result="url_retry"}"#;
    while metric(&agent, retries) < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no retried POST to the untrusted server within 30 s:\n{}",
            agent.get("/metrics").text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(untrusted.records().is_empty(), "{:?}", untrusted.records());
    let log = agent.log();
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "the agent's log says why: {log}"
    );
    agent.finish();
}
