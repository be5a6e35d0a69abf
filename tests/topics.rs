//! Topics with a real client: the official `cloudevents` Python SDK (PyPI) sends events in
//! binary, structured and batch modes to a topic with three subscribers (two exec-mode, one
//! Lambda-mode), and each must get exactly the events its filters pass, checked by request id
//! and event id; a webhook with a good and a bad signature; a duplicate delivered once (also
//! after a restart); bad events refused naming the attribute; a destination that names a topic
//! chains two functions. Needs root, and PyPI the first time (the SDK is kept under target/).
//!
//! One agent runs every case (`topics_with_the_cloudevents_sdk`), to keep CI short; a
//! two-host cluster on 127.0.0.1 checks that a publish on either host reaches the subscribers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings};
use common::sink::Sink;
use reqwest::Method;
use reqwest::blocking::Body;
use serde_json::{Value, json};

const SDK: &str = "cloudevents==2.2.0";
const PYTHON: &str = "/usr/bin/python3";
/// Deliveries are async events run at once; several times what a loaded machine needs.
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The SDK, installed from PyPI once into target/<profile>/python, for `PYTHONPATH`; a lock
/// keeps parallel tests from installing twice.
fn sdk_dir() -> PathBuf {
    let cache = common::target_dir().join("python");
    std::fs::create_dir_all(&cache).expect("create the python cache");
    let path = cache.join(SDK.replace("==", "-"));
    let lock = std::fs::File::create(cache.join(".lock-cloudevents")).expect("cache lock");
    lock.lock().expect("lock the cache");
    if !path.exists() {
        let staging = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let o = Command::new(PYTHON)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--only-binary=:all:", "--target"])
            .arg(&staging)
            .arg(SDK)
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .stdin(Stdio::null())
            .output()
            .expect("run pip");
        assert!(o.status.success(), "pip install: {}", show(&o));
        std::fs::rename(&staging, &path).expect("move the SDK in place");
    }
    path
}

/// Steps as JSON on stdin; one `{status, body}` per step on stdout. Events are built and
/// encoded by the SDK (`to_binary_event`, `to_structured_event`, `JSONFormat().write` for the
/// members of a batch); `raw` steps send a body as given, signed when asked.
const SCRIPT: &str = r#"
import hashlib, hmac, json, sys, urllib.error, urllib.request
from cloudevents.core.v1.event import CloudEvent
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat

cfg = json.loads(sys.stdin.read())

def post(topic, headers, body, auth):
    req = urllib.request.Request(cfg["endpoint"] + "/v1/topics/" + topic, data=body,
                                 method="POST")
    for k, v in headers.items():
        req.add_header(k, v)
    if auth:
        req.add_header("Authorization", "Bearer " + cfg["token"])
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return {"status": r.status, "body": json.loads(r.read() or b"null")}
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return {"status": e.code, "body": body}

def event(spec):
    return CloudEvent(spec["attributes"], spec.get("data"))

out = []
for step in cfg["steps"]:
    mode, topic, auth = step["mode"], step["topic"], step.get("auth", True)
    if mode == "binary":
        m = to_binary_event(event(step["event"]))
        out.append(post(topic, m.headers, m.body, auth))
    elif mode == "structured":
        m = to_structured_event(event(step["event"]))
        out.append(post(topic, m.headers, m.body, auth))
    elif mode == "batch":
        body = b"[" + b",".join(JSONFormat().write(event(e)) for e in step["events"]) + b"]"
        out.append(post(topic, {"Content-Type": "application/cloudevents-batch+json"}, body,
                        auth))
    elif mode == "raw":
        body = step["body"].encode()
        headers = dict(step.get("headers", {}))
        if "sign" in step:
            mac = hmac.new(step["sign"].encode(), body, hashlib.sha256).hexdigest()
            headers["X-Hub-Signature-256"] = "sha256=" + mac
        out.append(post(topic, headers, body, auth))
print(json.dumps(out))
"#;

struct Sdk {
    dir: PathBuf,
}

impl Sdk {
    fn run(&self, agent: &Agent, steps: Value) -> Vec<Value> {
        let cfg = json!({ "endpoint": agent.base_url(), "token": agent.token, "steps": steps });
        let mut child = Command::new(PYTHON)
            .env("PYTHONPATH", &self.dir)
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = cfg.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let o = child.wait_with_output().expect("wait for python3");
        writer.join().expect("stdin writer").expect("write steps");
        assert!(o.status.success(), "the SDK script failed: {}", show(&o));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("the script's output is not JSON ({e}): {}", show(&o)))
    }
}

fn subscriber(name: &str, manifest: &str) -> Fixture {
    Fixture::sh(
        name,
        manifest,
        r#"d=$(cat)
echo "GOT id=$CE_ID|type=$CE_TYPE|source=$CE_SOURCE|spec=$CE_SPECVERSION|time=$CE_TIME|subject=$CE_SUBJECT|tenant=$CE_TENANT|ct=$CE_DATACONTENTTYPE|data=$d" >&2
echo ok"#,
    )
}

/// What an exec subscriber got: (request id, attributes with `data`).
fn got(agent: &Agent, name: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let o = agent.cli(&["logs", name, "--json", "--tail", "10000"]);
    assert!(o.status.success(), "fnlet logs {name}: {}", show(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| {
            let rest = l["line"].as_str()?.strip_prefix("GOT ")?.to_string();
            let (attrs, data) = rest.split_once("|data=")?;
            let mut m: BTreeMap<String, String> = attrs
                .split('|')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            m.insert("data".into(), data.to_string());
            Some((l["request_id"].as_str()?.to_string(), m))
        })
        .collect()
}

/// Waits until `name` got `n` events; fails on more.
fn wait_got(agent: &Agent, name: &str, n: usize) -> Vec<(String, BTreeMap<String, String>)> {
    let started = Instant::now();
    loop {
        let g = got(agent, name);
        assert!(
            g.len() <= n,
            "{name} got {} events, expected {n}: {g:#?}",
            g.len()
        );
        if g.len() == n {
            return g;
        }
        assert!(
            started.elapsed() < DELIVERY_WAIT,
            "{name} got {} of {n} events within {DELIVERY_WAIT:?}: {g:#?}\nagent log:\n{}",
            g.len(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (function, request id, event id) of every delivery a 202 answer names.
fn deliveries(answers: &[&Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for a in answers {
        assert_eq!(a["status"], 202, "{a:#}");
        for e in a["body"]["events"].as_array().expect("events") {
            for d in e["deliveries"].as_array().expect("deliveries") {
                out.insert((
                    d["function"].as_str().expect("function").to_string(),
                    d["request_id"].as_str().expect("request id").to_string(),
                    e["id"].as_str().expect("id").to_string(),
                ));
            }
        }
    }
    out
}

fn of(set: &BTreeSet<(String, String, String)>, f: &str) -> BTreeSet<(String, String)> {
    set.iter()
        .filter(|(func, _, _)| func == f)
        .map(|(_, r, e)| (r.clone(), e.clone()))
        .collect()
}

/// The value of a /metrics sample (`name{labels}`), 0 when absent.
fn metric(agent: &Agent, sample: &str) -> f64 {
    let text = agent.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn ev(id: &str, ty: &str, source: &str, extra: Value, data: Value) -> Value {
    let mut attributes = json!({ "id": id, "type": ty, "source": source });
    if let (Some(a), Some(x)) = (attributes.as_object_mut(), extra.as_object()) {
        a.extend(x.clone());
    }
    json!({ "attributes": attributes, "data": data })
}

#[test]
fn topics_with_the_cloudevents_sdk() {
    let mut agent = Agent::start_with(
        "topics",
        Settings {
            limits_extra: "\n[events]\nbackoff_min_s = 0.2\nbackoff_max_s = 1.0\n\n\
                           [topics.hooks]\npublic = true\nsecret = \"s3cret\"\n"
                .into(),
            ..Settings::default()
        },
    );
    let sdk = Sdk { dir: sdk_dir() };
    let sink = Sink::start();

    // Three subscribers of `orders`: everything (in a sandbox kept between its runs, each
    // run with its own event's variables, although the process started ahead for each run
    // has none: it is ended and the run starts its own); orders from the shop; tenant acme
    // (Lambda mode: its records, sent to the sink, show the CloudEvent it got).
    let all = subscriber(
        "all",
        "reuse_sandbox = true\nstart_ahead = true\n[[triggers]]\ntopic = \"orders\"",
    );
    agent.deploy(all.path());
    let created = subscriber(
        "created",
        "[[triggers]]\ntopic = \"orders\"\nfilter = { type = { prefix = \"order.\" }, source = \"/shop\" }",
    );
    agent.deploy(created.path());
    let bootstrap = std::fs::read(common::fixture_bootstrap("lambda-rust")).expect("bootstrap");
    let lam = Fixture::new(
        &format!(
            "name = \"lam\"\nmode = \"lambda\"\nmemory_mb = 128\ntimeout_s = 10\n\
             [[triggers]]\ntopic = \"orders\"\nfilter = {{ tenant = \"acme\" }}\n\
             [async]\non_success = \"{}\"\n",
            sink.url
        ),
        &[("bootstrap", &bootstrap, 0o755)],
    );
    agent.deploy(lam.path());
    let hook = subscriber("hook", "[[triggers]]\ntopic = \"hooks\"");
    agent.deploy(hook.path());
    // A chain: `first` runs on chain.in; its success record is published to chain.out, where
    // `second` takes records of `first`'s successes.
    let first = Fixture::sh(
        "first",
        "[[triggers]]\ntopic = \"chain.in\"\n[async]\non_success = \"topic:chain.out\"",
        "d=$(cat)\nprintf 'first saw %s' \"$d\"",
    );
    agent.deploy(first.path());
    let second = subscriber(
        "second",
        "[[triggers]]\ntopic = \"chain.out\"\nfilter = { type = \"fnlet.invocation.success\", subject = \"first\" }",
    );
    agent.deploy(second.path());

    let json_ct = json!({ "datacontenttype": "application/json" });
    let res = sdk.run(
        &agent,
        json!([
            {"mode": "binary", "topic": "orders", "event": ev("e1", "order.created", "/shop",
                json!({"datacontenttype": "application/json", "tenant": "acme", "subject": "a b%c"}),
                json!({"n": 1}))},
            {"mode": "binary", "topic": "orders", "event": ev("e2", "order.cancelled", "/other",
                json_ct.clone(), json!({"n": 2}))},
            {"mode": "structured", "topic": "orders", "event": ev("e3", "order.created", "/shop",
                json!({"subject": "s3"}), json!({"n": 3}))},
            {"mode": "structured", "topic": "orders", "event": ev("e4", "invoice.paid", "/shop",
                json!({"tenant": "acme"}), json!({"n": 4}))},
            {"mode": "batch", "topic": "orders", "events": [
                ev("e5", "order.created", "/shop",
                   json!({"tenant": "acme", "datacontenttype": "text/plain"}), json!("hello text")),
                ev("e6", "misc", "/x", json!({}), json!({"n": 6}))]},
            // The same source and id again: a duplicate. The same id from another source is
            // another event.
            {"mode": "structured", "topic": "orders", "event": ev("e3", "order.created", "/shop",
                json!({"subject": "s3"}), json!({"n": 3}))},
            {"mode": "structured", "topic": "orders", "event": ev("e3", "order.created", "/elsewhere",
                json!({}), json!({"n": 33}))},
            // Nobody subscribes: 202, count 0.
            {"mode": "structured", "topic": "nobody", "event": ev("n1", "t", "/s", json!({}), json!(1))},
            // Bad events, each naming the attribute.
            {"mode": "raw", "topic": "orders", "headers": {"Content-Type": "application/cloudevents+json"},
             "body": "{\"specversion\":\"1.0\",\"id\":\"b1\",\"type\":\"t\"}"},
            {"mode": "raw", "topic": "orders", "headers": {"ce-specversion": "1.0", "ce-id": "b2",
             "ce-source": "/s", "Content-Type": "application/json"}, "body": "{}"},
            {"mode": "raw", "topic": "orders", "headers": {"Content-Type": "application/cloudevents-batch+json"},
             "body": "[{\"specversion\":\"1.0\",\"id\":\"b3\",\"source\":\"/s\",\"type\":\"t\"},{\"specversion\":\"1.0\",\"id\":\"\",\"source\":\"/s\",\"type\":\"t\"}]"},
            {"mode": "raw", "topic": "orders", "headers": {"ce-specversion": "0.3", "ce-id": "b4",
             "ce-source": "/s", "ce-type": "t"}, "body": ""},
            // The webhook: signed right, signed wrong, not signed; and a private topic without
            // credentials.
            {"mode": "raw", "topic": "hooks", "auth": false, "sign": "s3cret",
             "headers": {"Content-Type": "application/json"}, "body": "{\"action\":\"opened\"}"},
            {"mode": "raw", "topic": "hooks", "auth": false, "sign": "wrong",
             "headers": {"Content-Type": "application/json"}, "body": "{\"action\":\"forged\"}"},
            {"mode": "raw", "topic": "hooks", "auth": false,
             "headers": {"Content-Type": "application/json"}, "body": "{\"action\":\"unsigned\"}"},
            {"mode": "raw", "topic": "orders", "auth": false,
             "headers": {"Content-Type": "application/json"}, "body": "{}"},
        ]),
    );
    let counts: Vec<u64> = res[..8]
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 202, "{r:#}");
            r["body"]["count"].as_u64().expect("count")
        })
        .collect();
    assert_eq!(counts, [3, 1, 2, 2, 4, 0, 1, 0], "{res:#?}");
    let dup = &res[5]["body"]["events"][0];
    assert_eq!(dup["duplicate"], true, "{dup:#}");
    assert_eq!(res[6]["body"]["events"][0]["duplicate"], false);
    // e2 passes `all` only: two subscribers filtered it out.
    assert_eq!(res[1]["body"]["events"][0]["filtered"], 2, "{:#}", res[1]);
    for (r, attribute, index) in [
        (&res[8], "source", None),
        (&res[9], "type", None),
        (&res[10], "id", Some(1)),
        (&res[11], "specversion", None),
    ] {
        assert_eq!(r["status"], 400, "{r:#}");
        let e = &r["body"]["error"];
        assert_eq!(e["kind"], "bad_event", "{r:#}");
        assert_eq!(e["attribute"], attribute, "{r:#}");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(attribute)),
            "{r:#}"
        );
        assert_eq!(e["index"].as_u64(), index, "{r:#}");
    }
    assert_eq!(res[12]["status"], 202, "{:#}", res[12]);
    assert_eq!(res[12]["body"]["count"], 1, "{:#}", res[12]);
    for r in &res[13..15] {
        assert_eq!(r["status"], 401, "{r:#}");
        assert_eq!(r["body"]["error"]["kind"], "bad_signature", "{r:#}");
    }
    assert_eq!(res[15]["status"], 401, "{:#}", res[15]);
    assert_eq!(res[15]["body"]["error"]["kind"], "unauthorized");

    // Each subscriber got exactly the events its filters pass, under the request ids the
    // answers named, each once.
    let sent = deliveries(&res[..8].iter().collect::<Vec<_>>());
    let want = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    for (f, ids_expected, n) in [
        ("all", &["e1", "e2", "e3", "e4", "e5", "e6"][..], 7),
        ("created", &["e1", "e3", "e5"][..], 3),
    ] {
        let seen = wait_got(&agent, f, n);
        let pairs: BTreeSet<(String, String)> = seen
            .iter()
            .map(|(r, m)| (r.clone(), m["id"].clone()))
            .collect();
        assert_eq!(pairs.len(), n, "{f} ran an event twice: {seen:#?}");
        assert_eq!(pairs, of(&sent, f), "{f}");
        let ids: BTreeSet<String> = pairs.into_iter().map(|(_, e)| e).collect();
        assert_eq!(ids, want(ids_expected), "{f}");
    }
    // What an exec subscriber sees: the data on stdin, the attributes in CE_* variables.
    let seen_all = got(&agent, "all");
    let e1 = &seen_all
        .iter()
        .find(|(_, m)| m["id"] == "e1")
        .expect("e1")
        .1;
    assert_eq!(e1["type"], "order.created");
    assert_eq!(e1["source"], "/shop");
    assert_eq!(e1["spec"], "1.0");
    assert_eq!(e1["subject"], "a b%c", "percent-decoded");
    assert_eq!(e1["tenant"], "acme");
    assert_eq!(e1["ct"], "application/json");
    assert!(
        e1["time"].starts_with("20") && e1["time"].ends_with('Z'),
        "{e1:?}"
    );
    assert_eq!(e1["data"], "{\"n\":1}");
    let e5 = &seen_all
        .iter()
        .find(|(_, m)| m["id"] == "e5")
        .expect("e5")
        .1;
    assert_eq!(e5["data"], "hello text");
    assert_eq!(e5["ct"], "text/plain");
    // An event without a tenant or subject shows none, whatever ran before it in the sandbox.
    let e6 = &seen_all
        .iter()
        .find(|(_, m)| m["id"] == "e6")
        .expect("e6")
        .1;
    assert_eq!(
        (e6["tenant"].as_str(), e6["subject"].as_str()),
        ("", ""),
        "{e6:?}"
    );
    let elsewhere = seen_all
        .iter()
        .filter(|(_, m)| m["id"] == "e3" && m["source"] == "/elsewhere")
        .count();
    assert_eq!(elsewhere, 1);

    // The Lambda-mode subscriber got the structured CloudEvent as its event.
    let started = Instant::now();
    let records = loop {
        let r = sink.records();
        if r.len() >= 3 {
            break r;
        }
        assert!(
            started.elapsed() < DELIVERY_WAIT,
            "lam's records: {r:#?}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let lam_got: BTreeSet<(String, String)> = records
        .iter()
        .map(|r| {
            let event = &r["requestPayload"];
            assert_eq!(event["specversion"], "1.0", "{r:#}");
            assert_eq!(event["tenant"], "acme", "{r:#}");
            assert_eq!(r["responsePayload"]["echo"], *event, "{r:#}");
            (
                r["requestContext"]["requestId"]
                    .as_str()
                    .expect("request id")
                    .to_string(),
                event["id"].as_str().expect("id").to_string(),
            )
        })
        .collect();
    assert_eq!(lam_got, of(&sent, "lam"));
    let lam_ids: BTreeSet<&str> = lam_got.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(lam_ids, BTreeSet::from(["e1", "e4", "e5"]));
    let e4 = records
        .iter()
        .find(|r| r["requestPayload"]["id"] == "e4")
        .expect("e4");
    assert_eq!(e4["requestPayload"]["data"], json!({"n": 4}), "{e4:#}");

    // The webhook's event: the body wrapped (type fnlet.publish, source the topic).
    let h = wait_got(&agent, "hook", 1);
    assert_eq!(h[0].1["type"], "fnlet.publish");
    assert_eq!(h[0].1["source"], "/v1/topics/hooks");
    assert_eq!(h[0].1["data"], "{\"action\":\"opened\"}");

    // The chain, published with the CLI: first's success record reaches second through
    // chain.out.
    let o = agent.cli(&["publish", "chain.in", "-d", "{\"n\":7}", "--json"]);
    assert!(o.status.success(), "fnlet publish: {}", show(&o));
    let answer: Value = serde_json::from_slice(&o.stdout).expect("publish --json");
    let first_id = answer["events"][0]["deliveries"][0]["request_id"]
        .as_str()
        .expect("first's request id")
        .to_string();
    let chained = wait_got(&agent, "second", 1);
    let m = &chained[0].1;
    assert_eq!(m["type"], "fnlet.invocation.success", "{m:?}");
    assert_eq!(
        m["source"], "arn:aws:lambda:us-east-1:000000000000:function:first",
        "{m:?}"
    );
    let record: Value = serde_json::from_str(&m["data"]).expect("a record");
    assert_eq!(record["requestContext"]["requestId"], first_id.as_str());
    assert_eq!(record["requestContext"]["condition"], "Success");
    // The record's request is the event first got (the CloudEvent it was published as).
    assert_eq!(
        record["requestPayload"]["data"],
        json!({"n": 7}),
        "{record:#}"
    );
    assert_eq!(record["requestPayload"]["source"], "/v1/topics/chain.in");
    assert_eq!(
        record["responsePayload"], "first saw {\"n\":7}",
        "{record:#}"
    );

    // Visibility: /metrics and `fnlet topics`.
    assert_eq!(
        metric(
            &agent,
            "fnlet_topic_fanouts_total{topic=\"orders\",function=\"all\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(
            &agent,
            "fnlet_topic_filtered_total{topic=\"orders\",function=\"lam\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(&agent, "fnlet_topic_duplicates_total{topic=\"orders\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &agent,
            "fnlet_topic_refused_total{reason=\"bad_signature\"}"
        ),
        2.0
    );
    let o = agent.cli(&["topics", "--json"]);
    assert!(o.status.success(), "fnlet topics: {}", show(&o));
    let topics: Value = serde_json::from_slice(&o.stdout).expect("topics --json");
    let orders = topics["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["topic"] == "orders")
        .expect("orders listed");
    let subs: Vec<&str> = orders["subscribers"]
        .as_array()
        .expect("subscribers")
        .iter()
        .map(|s| s["function"].as_str().expect("function"))
        .collect();
    assert_eq!(subs, ["all", "created", "lam"]);
    assert_eq!(orders["counts"]["published"], 8, "{orders:#}");
    assert_eq!(orders["counts"]["delivered"], 13, "{orders:#}");
    assert_eq!(orders["counts"]["duplicates"], 1, "{orders:#}");
    let o = agent.cli(&["topics"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("created[source=/shop,type^=order.]") && text.contains("public (signed)"),
        "{text}"
    );

    // The dedup record outlives a restart.
    agent.stop();
    agent.restart();
    let again = sdk.run(
        &agent,
        json!([{"mode": "structured", "topic": "orders", "event": ev("e3", "order.created", "/shop",
            json!({"subject": "s3"}), json!({"n": 3}))}]),
    );
    assert_eq!(again[0]["status"], 202, "{again:#?}");
    assert_eq!(
        again[0]["body"]["events"][0]["duplicate"], true,
        "{again:#?}"
    );
    assert_eq!(again[0]["body"]["count"], 0);
    // A bad request body on the admin listing's neighbour: a topic name that cannot be one.
    agent
        .request(
            Method::POST,
            "/v1/topics/a%20b",
            true,
            Some(Body::from("{}")),
        )
        .expect_error(400, "bad_request");
    agent.finish();
}

/// A cluster of two agents on 127.0.0.1: a subscription deployed on one is known to the other
/// through the catalog, and a publish on either host reaches the subscriber (stored and run by
/// the host that took it).
#[test]
fn a_publish_on_any_host_of_a_cluster_reaches_the_subscribers() {
    let a = Agent::start("topics-c1");
    let init = a.cli(&["cluster", "init"]);
    assert!(init.status.success(), "fnlet cluster init: {}", show(&init));
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    assert!(token.starts_with("fnlet1."), "{token}");
    let b = Agent::start_with(
        "topics-c2",
        Settings {
            args: vec![
                "--join".into(),
                format!("127.0.0.1:{}", a.peer_port),
                "--token".into(),
                token,
            ],
            ..Settings::default()
        },
    );
    let sub = subscriber(
        "sub",
        "[[triggers]]\ntopic = \"clustered\"\nfilter = { type = \"wanted\" }",
    );
    a.deploy(sub.path());
    // The catalog brings the function (and its subscription) to b.
    let started = Instant::now();
    while b.admin(Method::GET, "/v1/functions/sub", None).status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "b never served sub\n--- a ---\n{}\n--- b ---\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (host, id) in [(&b, "on-b"), (&a, "on-a")] {
        for (ty, want) in [("wanted", 1), ("unwanted", 0)] {
            let o = host.cli(&[
                "publish",
                "clustered",
                "--type",
                ty,
                "--id",
                &format!("{id}-{ty}"),
                "-d",
                "{}",
                "--json",
            ]);
            assert!(o.status.success(), "fnlet publish: {}", show(&o));
            let answer: Value = serde_json::from_slice(&o.stdout).expect("publish --json");
            assert_eq!(answer["count"], want, "{answer:#}");
        }
        let seen = wait_got(host, "sub", 1);
        assert_eq!(seen[0].1["id"], format!("{id}-wanted"));
    }
    // Signed publishes (SigV4, curl's own signer): a key that may invoke every function
    // publishes; one limited to some functions may not, since a publish runs whichever
    // functions subscribe.
    for (scope, want) in [
        (vec!["--scope", "invoke"], "202"),
        (vec!["--scope", "invoke", "--function", "team-*"], "403"),
    ] {
        let mut args = vec!["keys", "create", "--json"];
        args.extend(scope.iter().copied());
        let o = a.cli(&args);
        assert!(o.status.success(), "fnlet keys create: {}", show(&o));
        let key: Value = serde_json::from_slice(&o.stdout).expect("keys create --json");
        let user = format!(
            "{}:{}",
            key["access_key_id"].as_str().expect("key id"),
            key["secret_access_key"].as_str().expect("secret")
        );
        let o = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "30",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code}", "-H", "Content-Type: application/json"])
            .args(["--data-binary", r#"{"signed":true}"#])
            .args(["--aws-sigv4", "aws:amz:us-east-1:lambda", "--user", &user])
            .arg(format!("{}/v1/topics/clustered", a.base_url()))
            .output()
            .expect("run curl");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            want,
            "signed publish with {scope:?}: {}\n{}",
            show(&o),
            a.log()
        );
    }
    b.finish();
    a.finish();
}
