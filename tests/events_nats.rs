//! The JetStream backend of async invocation against a real 3-server NATS cluster (Debian's
//! `nats-server`, JetStream on, 127.0.0.1) that this test starts, with two agents using it.
//! Needs root and `nats-server` (scripts/install-deps.sh installs it).
//!
//! One test, so one set of servers: events run on either agent, retries keep Lambda's counts
//! and waits across agents, kill -9 of the agent that accepted 500 events and of one NATS
//! server loses none (every accepted request id runs, duplicates are counted), a full stream
//! answers 429, and no reachable server 503. Topics on the stream: a publish fans out to the
//! subscribers whose filters pass, the same event published through the other agent is a
//! duplicate (the stream's duplicate window), and a destination topic chains two functions.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Settings, free_port};
use common::sink::Sink;
use serde_json::{Value, json};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// One nats-server of the cluster.
struct Server {
    name: String,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("nats-server log");
        let child = Command::new(NATS_SERVER)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run {NATS_SERVER} (apt-get install nats-server): {e}"));
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Three JetStream servers in one cluster, on 127.0.0.1; stopped when dropped.
struct Cluster {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        assert!(
            Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} is missing: apt-get install nats-server (scripts/install-deps.sh)"
        );
        let dir = tempfile::Builder::new()
            .prefix("fnlet-nats-")
            .tempdir()
            .expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cport))| {
                let name = format!("n{i}");
                let store = dir.path().join(&name);
                let config = dir.path().join(format!("{name}.conf"));
                // max_payload: a 1 MiB event and its header (the default is exactly 1 MiB).
                std::fs::write(
                    &config,
                    format!(
                        "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 2MB\n\
                         jetstream {{ store_dir: \"{}\" }}\n\
                         cluster {{ name: fnlet-test\n listen: \"127.0.0.1:{cport}\"\n routes: [{}] }}\n",
                        store.display(),
                        routes.join(", ")
                    ),
                )
                .expect("write the server config");
                Server {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    port: *port,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut c = Cluster { servers, _dir: dir };
        for s in &mut c.servers {
            s.spawn();
        }
        c
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Server::url).collect()
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let l = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = l.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    s.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.kill9();
        }
    }
}

fn settings(servers: &[String]) -> Settings {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    Settings {
        queue_timeout_ms: 300,
        limits_extra: format!(
            "\n[events]\nbackend = \"nats\"\nmax_queued_events = 600\nbackoff_min_s = 0.2\n\
             backoff_max_s = 1.0\n\n[events.nats]\nservers = [{}]\nack_wait_s = 3\n\
             publish_timeout_s = 3\n",
            list.join(", ")
        ),
        ..Settings::default()
    }
}

/// A function that logs `TRY <unix time>`, fails (exit 3) when its input asks, sleeps when it
/// asks, and answers `ok:<input>`. Public: the test's Event invokes are unsigned.
fn worker(name: &str, extra: &str) -> Fixture {
    Fixture::sh(
        name,
        &format!("public = true\n{extra}"),
        r#"in=$(cat)
echo "TRY $(date +%s.%N)" >&2
case "$in" in *'"fail"'*) exit 3;; esac
case "$in" in *'"nap"'*) sleep 0.3;; *'"hold"'*) sleep 60;; esac
printf 'ok:%s' "$in""#,
    )
}

fn event(agent: &Agent, name: &str, payload: &Value) -> (u16, String, Value) {
    let r = agent.invoke_lambda(
        name,
        payload.to_string().into_bytes(),
        &[("x-amz-invocation-type", "Event")],
    );
    let id = r.header("x-amzn-requestid").unwrap_or_default();
    let mut body = serde_json::from_str(&r.text()).unwrap_or(Value::Null);
    if let Some(t) = r.header("x-amzn-errortype") {
        body["errorType"] = t.into();
    }
    (r.status, id, body)
}

/// `count` events to `name` through `agent` from 8 threads; their request ids (all 202).
fn events(agent: &Agent, name: &str, count: usize, tag: &str) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                s.spawn(move || {
                    (t..count)
                        .step_by(8)
                        .map(|i| {
                            let (status, id, body) =
                                event(agent, name, &json!({ "n": i, "tag": tag, "nap": 1 }));
                            assert_eq!(status, 202, "event {i}: {body}");
                            id
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sender thread"))
            .collect()
    })
}

fn metric(agent: &Agent, sample: &str) -> f64 {
    let text = agent.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Tries of `name` with request id `id` in an agent's log: their times.
fn tries(agent: &Agent, name: &str, id: &str) -> Vec<f64> {
    let o = agent.cli(&["logs", name, "--json", "--tail", "10000"]);
    assert!(o.status.success(), "fnlet logs {name}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["request_id"] == id)
        .filter_map(|l| {
            l["line"]
                .as_str()?
                .strip_prefix("TRY ")?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

fn ids_of(records: &[Value]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in records {
        if let Some(id) = r["requestContext"]["requestId"].as_str() {
            *seen.entry(id.to_string()).or_default() += 1;
        }
    }
    seen
}

#[test]
fn nats_backend_across_agents_and_failures() {
    let mut cluster = Cluster::start();
    let urls = cluster.urls();
    let mut a = Agent::start_with("nats-a", settings(&urls));
    let b = Agent::start_with("nats-b", settings(&urls));
    let sink = Sink::start();
    let one = worker(
        "one",
        &format!(
            "max_concurrency = 4\n[async]\non_success = \"{}\"",
            sink.url
        ),
    );
    let failing = worker(
        "failing",
        &format!("[async]\nretry_base_s = 1.0\non_failure = \"{}\"", sink.url),
    );
    let parked = worker("parked", "max_concurrency = 1\ntimeout_s = 120");
    let on_success = format!("[async]\non_success = \"{}\"", sink.url);
    let subscribers = [
        worker(
            "sub-all",
            &format!("[[triggers]]\ntopic = \"orders\"\n{on_success}"),
        ),
        worker(
            "sub-created",
            &format!(
                "[[triggers]]\ntopic = \"orders\"\nfilter = {{ type = \"order.created\" }}\n\
                 {on_success}"
            ),
        ),
        worker(
            "chain-first",
            "[[triggers]]\ntopic = \"chain.in\"\n[async]\non_success = \"topic:chain.out\"",
        ),
        worker(
            "chain-second",
            &format!(
                "[[triggers]]\ntopic = \"chain.out\"\n\
                 filter = {{ type = \"fnlet.invocation.success\" }}\n{on_success}"
            ),
        ),
    ];
    for agent in [&a, &b] {
        agent.deploy(one.path());
        agent.deploy(failing.path());
        for s in &subscribers {
            agent.deploy(s.path());
        }
    }
    a.deploy(parked.path());

    // The servers elect their leaders and the agents make the stream: 202 once they have.
    let started = Instant::now();
    let first = loop {
        let (status, id, body) = event(&a, "one", &json!({"first": 1}));
        if status == 202 {
            break id;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["errorType"], "ServiceException", "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no 202 within 90 s: {body}\n{}\n{}",
            cluster.logs(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    sink.wait(Duration::from_secs(60), "the first event", |r| {
        ids_of(r).contains_key(&first)
    });

    // Events accepted by either agent run on either; a failing one is retried twice, 1 s then
    // 2 s apart, whichever agent takes each try, then its record says 3 tries.
    let mut sent = events(&a, "one", 20, "both");
    sent.extend(events(&b, "one", 20, "both"));
    let (status, failing_id, body) = event(&b, "failing", &json!({"fail": 1}));
    assert_eq!(status, 202, "{body}");
    let recs = sink.wait(Duration::from_secs(60), "40 events", |r| {
        let seen = ids_of(r);
        sent.iter().all(|id| seen.contains_key(id))
    });
    let ran_on: Vec<f64> = [&a, &b]
        .iter()
        .map(|ag| {
            metric(
                ag,
                r#"fnlet_events_attempts_total{function="one",result="success"}"#,
            )
        })
        .collect();
    eprintln!("successful tries of `one` per agent: {ran_on:?}");
    assert!(
        ran_on.iter().sum::<f64>() >= 41.0,
        "tries per agent: {ran_on:?}; {} records",
        recs.len()
    );
    let recs = sink.wait(Duration::from_secs(60), "failing's record", |r| {
        ids_of(r).contains_key(&failing_id)
    });
    let rec = recs
        .iter()
        .find(|r| r["requestContext"]["requestId"] == failing_id.as_str())
        .expect("found above");
    assert_eq!(
        rec["requestContext"]["condition"], "RetriesExhausted",
        "{rec:#}"
    );
    assert_eq!(
        rec["requestContext"]["approximateInvokeCount"], 3,
        "{rec:#}"
    );
    assert_eq!(
        rec["responseContext"]["functionError"], "Unhandled",
        "{rec:#}"
    );
    assert_eq!(rec["requestPayload"], json!({"fail": 1}), "{rec:#}");
    let mut t: Vec<f64> = tries(&a, "failing", &failing_id);
    t.extend(tries(&b, "failing", &failing_id));
    t.sort_by(f64::total_cmp);
    assert_eq!(t.len(), 3, "three tries: {t:?}");
    assert!(
        t[1] - t[0] >= 1.0 && t[2] - t[1] >= 2.0,
        "waits 1 s then 2 s: {t:?}"
    );

    // Topics: a publish through `a` reaches both subscribers; the same event (source and id)
    // through `b` is a duplicate and reaches no one; another type reaches the unfiltered one.
    let publish = |agent: &Agent, args: &[&str]| -> Value {
        let mut all = vec!["publish"];
        all.extend_from_slice(args);
        all.push("--json");
        let o = agent.cli(&all);
        assert!(
            o.status.success(),
            "fnlet {all:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("fnlet publish --json")
    };
    let created = [
        "orders",
        "--type",
        "order.created",
        "--source",
        "/shop",
        "--id",
        "o-1",
        "-d",
        "{\"n\":1}",
    ];
    let first = publish(&a, &created);
    assert_eq!(first["count"], 2, "{first:#}");
    assert_eq!(first["events"][0]["duplicate"], false, "{first:#}");
    let again = publish(&b, &created);
    assert_eq!(again["count"], 0, "{again:#}");
    assert_eq!(again["events"][0]["duplicate"], true, "{again:#}");
    let paid = publish(
        &b,
        &[
            "orders",
            "--type",
            "order.paid",
            "--source",
            "/shop",
            "--id",
            "o-2",
            "-d",
            "{\"n\":2}",
        ],
    );
    assert_eq!(paid["count"], 1, "{paid:#}");
    assert_eq!(paid["events"][0]["filtered"], 1, "{paid:#}");
    let chain = publish(&a, &["chain.in", "--id", "c-1", "-d", "{\"n\":7}"]);
    assert_eq!(chain["count"], 1, "{chain:#}");
    let request_ids = |answer: &Value| -> Vec<(String, String)> {
        answer["events"][0]["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .map(|d| {
                (
                    d["function"].as_str().expect("function").to_string(),
                    d["request_id"].as_str().expect("request id").to_string(),
                )
            })
            .collect()
    };
    let mut wanted = request_ids(&first);
    wanted.extend(request_ids(&paid));
    let first_of_chain = request_ids(&chain)[0].1.clone();
    let arn = |f: &str| format!("arn:aws:lambda:us-east-1:000000000000:function:{f}:$LATEST");
    let recs = sink.wait(Duration::from_secs(60), "the topic deliveries", |r| {
        let seen = ids_of(r);
        wanted.iter().all(|(_, id)| seen.contains_key(id))
            && r.iter()
                .any(|r| r["requestContext"]["functionArn"] == arn("chain-second").as_str())
    });
    // Each delivery ran the function the answer named, with the event it was given.
    for (function, id) in &wanted {
        let rec = recs
            .iter()
            .find(|r| r["requestContext"]["requestId"] == id.as_str())
            .expect("waited for");
        assert_eq!(
            rec["requestContext"]["functionArn"],
            arn(function).as_str(),
            "{rec:#}"
        );
    }
    let sources: Vec<(&str, &str)> = recs
        .iter()
        .filter_map(|r| {
            Some((
                r["requestContext"]["functionArn"].as_str()?,
                r["requestPayload"]["id"].as_str()?,
            ))
        })
        .filter(|(_, id)| id.starts_with("o-"))
        .collect();
    assert!(
        !sources.contains(&(arn("sub-created").as_str(), "o-2")),
        "the filter let order.paid through: {sources:?}"
    );
    // The chain: chain-first's success record, published to chain.out, ran chain-second.
    let rec = recs
        .iter()
        .find(|r| r["requestContext"]["functionArn"] == arn("chain-second").as_str())
        .expect("waited for");
    let data = &rec["requestPayload"]["data"];
    assert_eq!(
        rec["requestPayload"]["type"], "fnlet.invocation.success",
        "{rec:#}"
    );
    assert_eq!(
        data["requestContext"]["requestId"],
        first_of_chain.as_str(),
        "{rec:#}"
    );
    assert_eq!(data["requestPayload"]["data"], json!({"n": 7}), "{rec:#}");

    // kill -9 of the agent that accepted 500 events, and of one NATS server: every one runs.
    let before = sink.records().len();
    let ids = events(&a, "one", 500, "k9");
    a.kill9();
    cluster.servers[0].kill9();
    let records = sink.wait(
        Duration::from_secs(240),
        "500 events after the kills",
        |r| {
            let seen = ids_of(&r[before..]);
            ids.iter().all(|id| seen.contains_key(id))
        },
    );
    let seen = ids_of(&records[before..]);
    assert!(ids.iter().all(|id| seen.contains_key(id)));
    // Records are published once per event (the servers drop a second publish), so ids seen
    // twice are rare; every try an agent took and never reported is counted by the one that
    // took it next, and the killed agent was running some.
    let twice = ids.iter().filter(|id| seen[*id] > 1).count() as f64;
    let counted = metric(&b, r#"fnlet_events_duplicates_total{function="one"}"#);
    eprintln!(
        "after the kills: {} of 500 ids recorded, {twice} twice, {counted} duplicates counted",
        ids.iter().filter(|id| seen.contains_key(*id)).count()
    );
    assert!(
        twice <= counted && counted >= 1.0,
        "{twice} recorded twice, {counted} duplicates counted"
    );

    // The killed agent comes back and takes events again.
    a.restart();
    let ids = events(&a, "one", 10, "back");
    sink.wait(Duration::from_secs(60), "events after the restart", |r| {
        let seen = ids_of(r);
        ids.iter().all(|id| seen.contains_key(id))
    });

    // A full stream: `parked` runs one event at a time for 60 s, so its events stay; the
    // 600 the stream holds per function (events.max_queued_events), then 429.
    let (status, _, body) = event(&a, "parked", &json!({"hold": 1}));
    assert_eq!(status, 202, "{body}");
    let mut accepted = 1;
    let refused = loop {
        let (status, _, body) = event(&a, "parked", &json!({"n": accepted}));
        match status {
            202 => accepted += 1,
            429 => break body,
            other => panic!("event {accepted}: {other} {body}"),
        }
        assert!(
            accepted <= 600,
            "601 events accepted into a stream bounded to 600"
        );
    };
    assert_eq!(accepted, 600, "{refused}");
    let o = a.cli(&["events", "parked", "--json"]);
    assert!(o.status.success(), "fnlet events parked");
    let v: Value = serde_json::from_slice(&o.stdout).expect("fnlet events --json");
    assert_eq!(v["backend"], "nats", "{v}");
    assert_eq!(v["stored"], 600, "{v}");
    assert!(v["oldest_age_s"].as_f64().is_some_and(|a| a > 0.0), "{v}");
    assert_eq!(
        refused["errorType"], "TooManyRequestsException",
        "{refused}"
    );

    // No server: 503, promptly, and the agent keeps serving.
    for s in &mut cluster.servers {
        s.kill9();
    }
    let started = Instant::now();
    let (status, _, body) = event(&b, "one", &json!({"late": 1}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errorType"], "ServiceException", "{body}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(b.invoke("one", b"sync").status, 200);
    a.finish();
    b.finish();
}
