//! Python Lambda functions on AWS's own runtime client: `fnlet runtime add python3.11`
//! installs the real awslambdaric from PyPI with the host's python3, the fixture
//! tests/fixtures/lambda-py (a classic `lambda_handler`) is deployed, and it is called over its
//! function URL, the Invoke API, and by the real boto3 from PyPI. Needs root, and PyPI the first
//! time: the wheels are kept under target/ (pip's own cache is not relied on).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, Fixture, Resp, Settings, free_port};
use reqwest::Method;
use serde_json::{Value, json};

/// Pinned, so that a run is repeatable and the cache below stays valid; tests/fixtures/
/// lambda-py/README.md tells how this client was checked.
const AWSLAMBDARIC: &str = "awslambdaric==4.2.2";
const BOTO3: &str = "boto3==1.44.8";
/// The interpreter the default `[runtimes."python3.11"]` entry runs.
const PYTHON: &str = "/usr/bin/python3";
const RUNTIME: &str = "python3.11";

/// target/<profile>/python: the wheels and boto3, made once and found by path afterwards.
fn cache_dir() -> PathBuf {
    common::target_dir().join("python")
}

/// Where these tests' agents live: outside /tmp (and the other paths every sandbox builds for
/// itself), since their state dir holds the runtime, bound into sandboxes at the same path.
/// Under target/, unless the checkout itself is under /tmp: then in /var/tmp (each agent's dir
/// is a temporary dir, removed with it).
fn agents_dir() -> PathBuf {
    let dir = cache_dir().join("agents");
    let sandbox_own = ["/tmp", "/dev", "/proc", "/var/task"];
    if sandbox_own.iter().any(|p| dir.starts_with(p)) {
        PathBuf::from("/var/tmp")
    } else {
        dir
    }
}

fn python_agent(test: &str) -> Agent {
    python_agent_with(test, "")
}

fn python_agent_with(test: &str, sandbox_extra: &str) -> Agent {
    Agent::start_with(
        test,
        Settings {
            dir_in: Some(agents_dir()),
            sandbox_extra: sandbox_extra.into(),
            ..Settings::default()
        },
    )
}

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", show(&o));
    o
}

/// `path`, made by `fill` into a fresh folder beside it unless it is there already; a lock
/// keeps parallel tests from filling it twice.
fn cached(path: &Path, fill: impl FnOnce(&Path)) -> PathBuf {
    let parent = path.parent().expect("cache entries have a parent");
    std::fs::create_dir_all(parent).expect("create the cache dir");
    let lock = std::fs::File::create(parent.join(".lock")).expect("cache lock");
    lock.lock().expect("lock the cache");
    if !path.exists() {
        let staging = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let started = Instant::now();
        fill(&staging);
        std::fs::rename(&staging, path).expect("move the filled cache entry in place");
        eprintln!(
            "filled {} in {:.1} s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    path.to_path_buf()
}

/// Wheels of awslambdaric (for the runtime) and boto3 (for the caller), from PyPI, fetched the
/// way `fnlet runtime add` tells an operator without an index to fetch them.
fn wheels() -> PathBuf {
    let name = format!("wheels-{AWSLAMBDARIC}-{BOTO3}").replace("==", "-");
    cached(&cache_dir().join(name), |dir| {
        let pip = || {
            let mut c = Command::new(PYTHON);
            c.args(["-m", "pip", "download", "--disable-pip-version-check"]);
            c.args(["--only-binary=:all:", "-d"]).arg(dir);
            c
        };
        run(pip()
            .args(["--python-version", "3.11", "--platform"])
            .arg(format!("manylinux2014_{}", std::env::consts::ARCH))
            .arg(AWSLAMBDARIC));
        run(pip().arg(BOTO3));
    })
}

/// boto3 and its dependencies, installed from the wheels for `PYTHONPATH`.
fn boto3_dir() -> PathBuf {
    let wheels = wheels();
    let name = format!("boto3-{BOTO3}").replace("==", "-");
    cached(&cache_dir().join(name), |dir| {
        run(Command::new(PYTHON)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-index",
            ])
            .arg("--find-links")
            .arg(&wheels)
            .arg("--target")
            .arg(dir)
            .arg(BOTO3)
            .env("PIP_ROOT_USER_ACTION", "ignore"));
    })
}

/// `fnlet runtime add python3.11` for this agent, from the cached wheels; asserts success.
fn runtime_add(agent: &Agent) -> String {
    let wheels = wheels();
    let state = agent.state_dir();
    let config = agent.config_path();
    let started = Instant::now();
    let o = agent.cli(&[
        "runtime",
        "add",
        RUNTIME,
        "--state-dir",
        state.to_str().expect("utf-8 state dir"),
        "--config",
        config.to_str().expect("utf-8 config path"),
        "--package",
        AWSLAMBDARIC,
        "--wheels",
        wheels.to_str().expect("utf-8 wheels dir"),
    ]);
    assert!(o.status.success(), "fnlet runtime add: {}", show(&o));
    eprintln!(
        "fnlet runtime add took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lambda-py")
}

/// A copy of the fixture under another name, not public: its Invoke API calls must be signed.
fn private_copy(name: &str) -> Fixture {
    let manifest = std::fs::read_to_string(fixture_dir().join("fnlet.toml")).expect("manifest");
    assert!(manifest.contains("public = true"), "{manifest}");
    let manifest = manifest
        .replace("name = \"lambda-py\"", &format!("name = \"{name}\""))
        .replace("public = true", "public = false");
    let app = std::fs::read(fixture_dir().join("app.py")).expect("app.py");
    Fixture::new(&manifest, &[("app.py", &app, 0o644)])
}

fn invoke_api(agent: &Agent, name: &str, payload: &Value, headers: &[(&str, &str)]) -> Resp {
    agent.invoke_lambda(name, payload.to_string().into_bytes(), headers)
}

/// The CPUs this process may use, as the agent it starts does (`Cpus_allowed_list`).
fn allowed_cpus() -> Vec<u64> {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u64, u64) = (lo.parse().expect("cpu"), hi.parse().expect("cpu"));
        cpus.extend(lo..=hi);
    }
    cpus
}

/// What the fixture's handler put in its answer's body.
fn handler_saw(body: &Value) -> Value {
    serde_json::from_str(
        body["body"]
            .as_str()
            .unwrap_or_else(|| panic!("no body: {body}")),
    )
    .unwrap_or_else(|e| panic!("body is not JSON ({e}): {body}"))
}

#[test]
fn python_handler_through_its_url_and_the_invoke_api() {
    // Colocation is off by default; its checks are below.
    let agent = python_agent_with("python-url", "colocate_instances = true\n");
    agent.deploy(&fixture_dir());

    // Deployed before its runtime is installed: refused, naming what is missing.
    let runtime_dir = agent.state_dir().join("runtimes").join(RUNTIME);
    let r = agent.invoke("lambda-py", b"{}");
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(&runtime_dir.display().to_string())
            && r.text().contains("fnlet runtime add python3.11"),
        "{}",
        r.text()
    );

    let out = runtime_add(&agent);
    assert!(
        out.contains("installed awslambdaric 4.2.2")
            && out.contains(&format!("into {}", runtime_dir.display()))
            && out.contains("the agent needs no restart"),
        "{out}"
    );
    let ls = agent.cli(&[
        "runtime",
        "ls",
        "--config",
        agent.config_path().to_str().expect("utf-8"),
        "--state-dir",
        agent.state_dir().to_str().expect("utf-8"),
    ]);
    let ls_text = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{}", show(&ls));
    assert!(
        ls_text
            .contains("python3.11  ready   awslambdaric 4.2.2  /usr/bin/python3 -m awslambdaric"),
        "{ls_text}"
    );

    // The function URL: an HTTP request in, the handler's statusCode/headers/body out.
    let url_started = Instant::now();
    let r = agent
        .http_with_token(Method::POST, "/fn/lambda-py/some/path?x=1", "")
        .header("content-type", "application/json")
        .header("x-caller", "test")
        .body(r#"{"via": "url"}"#)
        .send()
        .expect("function URL");
    let cold = url_started.elapsed();
    assert_eq!(r.status().as_u16(), 200);
    let headers = r.headers().clone();
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(h("x-fixture").as_deref(), Some("py"));
    let body: Value = r.json().expect("JSON body");
    assert_eq!(
        body["request_id"].as_str(),
        h("x-amzn-requestid").as_deref(),
        "{body}"
    );
    assert_eq!(body["function"], "lambda-py");
    assert_eq!(body["version"], "1");
    assert_eq!(body["memory"], "128");
    assert_eq!(
        body["invoked_function_arn"],
        "arn:aws:lambda:us-east-1:000000000000:function:lambda-py"
    );
    assert_eq!(body["task_root"], "/var/task");
    assert_eq!(body["region"], "us-east-1");
    assert_eq!(body["handler_env"], "app.lambda_handler");
    let remaining = body["remaining_ms"].as_u64().expect("remaining_ms");
    assert!(remaining > 0 && remaining <= 5000, "{body}");
    let event = &body["echo"];
    assert_eq!(event["version"], "2.0", "{event}");
    assert_eq!(event["rawPath"], "/some/path");
    assert_eq!(event["rawQueryString"], "x=1");
    assert_eq!(event["headers"]["x-caller"], "test");
    assert_eq!(event["requestContext"]["http"]["method"], "POST");
    assert_eq!(event["body"], r#"{"via": "url"}"#, "{event}");
    assert_eq!(event["isBase64Encoded"], false);

    // The Invoke API: the handler's return value is the payload, as it returned it.
    let warm_started = Instant::now();
    let r = invoke_api(
        &agent,
        "lambda-py",
        &json!({"hello": "py", "n": [1, 2]}),
        &[],
    );
    let warm = warm_started.elapsed();
    r.expect_ok(200);
    let payload = r.json();
    assert_eq!(payload["statusCode"], 200, "{payload}");
    assert_eq!(payload["headers"]["x-fixture"], "py");
    let saw = handler_saw(&payload);
    assert_eq!(saw["echo"], json!({"hello": "py", "n": [1, 2]}));
    assert_eq!(
        saw["request_id"].as_str(),
        r.header("x-amzn-requestid").as_deref()
    );
    assert_eq!(r.header("x-amz-executed-version").as_deref(), Some("1"));
    assert_eq!(r.header("x-amz-function-error"), None);
    eprintln!("lambda-py: first call {cold:?} (cold), Invoke API call {warm:?} (warm)");

    // A raised exception: awslambdaric's error document, marked Unhandled.
    let r = invoke_api(&agent, "lambda-py", &json!({"fail": true}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    let e = r.json();
    assert_eq!(e["errorType"], "FixtureError", "{e}");
    assert_eq!(e["errorMessage"], "the event asked for a failure");
    assert_eq!(
        e["requestId"].as_str(),
        r.header("x-amzn-requestid").as_deref()
    );
    let trace = e["stackTrace"].as_array().expect("stackTrace is a list");
    assert!(
        trace.iter().any(|l| l.as_str().is_some_and(
            |l| l.contains("File \"/var/task/app.py\"") && l.contains("raise FixtureError")
        )),
        "{e}"
    );
    // The instance survives its handler's exception.
    let r = invoke_api(&agent, "lambda-py", &json!({"after": "error"}), &[]);
    r.expect_ok(200);
    assert_eq!(handler_saw(&r.json())["echo"], json!({"after": "error"}));
    // A large event and answer (1.5 MB each way): the event goes out beside its head, and the
    // answer comes in over many reads.
    let big = "x".repeat(1_500_000);
    let r = invoke_api(&agent, "lambda-py", &json!({ "big": big }), &[]);
    r.expect_ok(200);
    assert_eq!(
        handler_saw(&r.json())["echo"]["big"].as_str(),
        Some(big.as_str())
    );

    // sandbox.colocate_instances (on for this agent): after a call, a warm instance is moved onto
    // the CPU of the HTTP thread that served it; a call past 2 ms gets every CPU back, and the
    // instance keeps them until a call ends sooner.
    let all = allowed_cpus();
    assert!(
        all.len() >= 2,
        "this test needs two CPUs; it may use {all:?}"
    );
    let cpus = |event: Value| {
        let r = invoke_api(&agent, "lambda-py", &event, &[]);
        r.expect_ok(200);
        let saw = handler_saw(&r.json());
        let list = |k: &str| -> Vec<u64> {
            serde_json::from_value(saw[k].clone()).unwrap_or_else(|e| panic!("{k}: {e}: {saw}"))
        };
        (list("cpus"), list("cpus_after"))
    };
    // A short call on a loaded machine may itself pass 2 ms: a few tries.
    let on_one_cpu = |what: &str| {
        let seen: Vec<_> = (0..20).map(|_| cpus(json!({})).0).collect();
        assert!(seen.iter().any(|c| c.len() == 1), "{what}: {seen:?}");
    };
    on_one_cpu("a warm instance runs on one CPU");
    let (_, after) = cpus(json!({"sleep_ms": 100}));
    assert_eq!(after, all, "a call past 2 ms has every CPU");
    let (next, _) = cpus(json!({}));
    assert_eq!(next, all, "and so does the instance's next call");
    on_one_cpu("after a call that ends within 2 ms the instance is pinned again");

    // A handler whose module is missing: awslambdaric's init error, as the Invoke API's
    // payload.
    let broken = Fixture::new(
        "name = \"lambda-py-broken\"\nmode = \"lambda\"\nruntime = \"python3.11\"\n\
         handler = \"missing.lambda_handler\"\npublic = true\n",
        &[("app.py", b"", 0o644)],
    );
    agent.deploy(broken.path());
    let r = invoke_api(&agent, "lambda-py-broken", &json!({}), &[]);
    r.expect_ok(200);
    assert_eq!(
        r.header("x-amz-function-error").as_deref(),
        Some("Unhandled")
    );
    let e = r.json();
    assert_eq!(e["errorType"], "Runtime.ImportModuleError", "{e}");
    assert!(
        e["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("No module named 'missing'")),
        "{e}"
    );

    // Again: nothing changed, so the install is kept and the function goes on.
    let out = runtime_add(&agent);
    assert!(
        out.contains("was installed in") && out.contains("kept it"),
        "{out}"
    );
    let r = invoke_api(&agent, "lambda-py", &json!({"again": 1}), &[]);
    r.expect_ok(200);
    agent.finish();
}

/// Run by the test with the real boto3: every call it makes, and what botocore made of the
/// answer, as one JSON document.
const BOTO3_SCRIPT: &str = r#"
import base64, json, sys
import boto3, botocore
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

cfg = json.loads(sys.argv[1])

def client(secret=cfg["secret"], signed=True):
    extra = {} if signed else {"signature_version": UNSIGNED}
    kw = dict(endpoint_url=cfg["endpoint"], region_name="us-east-1",
              config=Config(retries={"total_max_attempts": 1}, **extra))
    if signed:
        kw.update(aws_access_key_id=cfg["key"], aws_secret_access_key=secret)
    return boto3.client("lambda", **kw)

def invoke(c, name, payload, **kw):
    try:
        r = c.invoke(FunctionName=name, Payload=json.dumps(payload), **kw)
    except ClientError as e:
        return {"error": e.response["Error"].get("Code"),
                "message": e.response["Error"].get("Message"),
                "http": e.response["ResponseMetadata"]["HTTPStatusCode"]}
    out = {"status": r["StatusCode"], "payload": json.loads(r["Payload"].read()),
           "request_id": r["ResponseMetadata"]["RequestId"],
           "function_error": r.get("FunctionError"),
           "executed_version": r.get("ExecutedVersion")}
    if "LogResult" in r:
        out["log"] = base64.b64decode(r["LogResult"]).decode()
    return out

c = client()
sent = {"hello": "boto3", "n": [1, 2.5, None, True], "s": "\u00fcn\u00ef"}
print(json.dumps({
    "boto3": boto3.__version__,
    "boto3_file": boto3.__file__,
    "sent": sent,
    "ok": invoke(c, cfg["private"], sent, LogType="Tail"),
    "fail": invoke(c, cfg["private"], {"fail": True}),
    "public_signed": invoke(c, cfg["public"], {"public": 1}),
    "public_unsigned": invoke(client(signed=False), cfg["public"], {"public": 2}),
    "private_unsigned": invoke(client(signed=False), cfg["private"], {}),
    "wrong_secret": invoke(client(secret="x" * 40), cfg["private"], {}),
    "public_wrong_secret": invoke(client(secret="x" * 40), cfg["public"], {}),
    "unknown": invoke(c, "no-such-function", {}),
}))
"#;

#[test]
fn boto3_invokes_signed_and_reads_errors_and_logs() {
    let agent = python_agent("python-boto3");
    runtime_add(&agent);
    agent.deploy(&fixture_dir());
    let private = private_copy("lambda-py-private");
    agent.deploy(private.path());
    let key = agent.cli(&["keys", "create", "--description", "boto3 test", "--json"]);
    assert!(key.status.success(), "fnlet keys create: {}", show(&key));
    let key: Value = serde_json::from_slice(&key.stdout).expect("keys create --json");
    let boto3 = boto3_dir();

    let cfg = json!({
        "endpoint": agent.base_url(),
        "key": key["access_key_id"],
        "secret": key["secret_access_key"],
        "private": "lambda-py-private",
        "public": "lambda-py",
    });
    let started = Instant::now();
    let o = Command::new(PYTHON)
        .arg("-c")
        .arg(BOTO3_SCRIPT)
        .arg(cfg.to_string())
        .env("PYTHONPATH", &boto3)
        // No credentials or settings of the machine's own: only what the script passes.
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    let shown = show(&o);
    assert!(o.status.success(), "the boto3 script failed: {shown}");
    eprintln!("boto3 script: {:.1} s", started.elapsed().as_secs_f64());
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("the script's output is not JSON ({e}): {shown}"));
    let ctx = format!("{report:#}\n{shown}");
    // The real boto3 from PyPI, not a system copy.
    assert_eq!(
        report["boto3"],
        BOTO3.trim_start_matches("boto3=="),
        "{ctx}"
    );
    assert!(
        report["boto3_file"]
            .as_str()
            .is_some_and(|f| f.starts_with(&boto3.display().to_string())),
        "{ctx}"
    );

    // Signed, with the log tail: the payload round-trips through the handler.
    let ok = &report["ok"];
    assert_eq!(ok["status"], 200, "{ctx}");
    assert_eq!(ok["function_error"], Value::Null, "{ctx}");
    assert_eq!(ok["executed_version"], "1", "{ctx}");
    let saw = handler_saw(&ok["payload"]);
    assert_eq!(saw["echo"], report["sent"], "{ctx}");
    assert_eq!(saw["function"], "lambda-py-private");
    let id = ok["request_id"].as_str().expect("RequestId");
    assert_eq!(saw["request_id"], id, "{ctx}");
    let log = ok["log"]
        .as_str()
        .unwrap_or_else(|| panic!("no LogResult: {ctx}"));
    for want in [
        format!("START RequestId: {id} Version: 1"),
        format!("lambda-py stdout {id}"),
        format!("lambda-py stderr {id}"),
        format!("END RequestId: {id}"),
        format!("REPORT RequestId: {id}\tDuration: "),
    ] {
        assert!(
            log.contains(&want),
            "{want:?} not in the log tail:\n{log}\n{ctx}"
        );
    }

    // A handler error: FunctionError, and awslambdaric's error document as the payload.
    let fail = &report["fail"];
    assert_eq!(fail["status"], 200, "{ctx}");
    assert_eq!(fail["function_error"], "Unhandled", "{ctx}");
    assert_eq!(fail["payload"]["errorType"], "FixtureError", "{ctx}");
    assert_eq!(
        fail["payload"]["errorMessage"],
        "the event asked for a failure"
    );
    assert!(fail["payload"]["stackTrace"].is_array(), "{ctx}");

    // A public function takes signed and unsigned calls; a private one only signed ones.
    assert_eq!(report["public_signed"]["status"], 200, "{ctx}");
    assert_eq!(report["public_unsigned"]["status"], 200, "{ctx}");
    assert_eq!(
        handler_saw(&report["public_unsigned"]["payload"])["echo"],
        json!({"public": 2})
    );
    assert_eq!(report["private_unsigned"]["http"], 403, "{ctx}");
    assert_eq!(
        report["private_unsigned"]["error"], "MissingAuthenticationTokenException",
        "{ctx}"
    );
    // What botocore makes of the agent's Lambda-shaped errors.
    assert_eq!(
        report["wrong_secret"]["error"], "InvalidSignatureException",
        "{ctx}"
    );
    assert_eq!(report["wrong_secret"]["http"], 403, "{ctx}");
    // Public means unsigned calls are welcome, not that a bad signature is ignored.
    assert_eq!(
        report["public_wrong_secret"]["error"], "InvalidSignatureException",
        "{ctx}"
    );
    assert_eq!(report["public_wrong_secret"]["http"], 403, "{ctx}");
    assert_eq!(
        report["unknown"]["error"], "ResourceNotFoundException",
        "{ctx}"
    );
    assert_eq!(report["unknown"]["http"], 404, "{ctx}");
    agent.finish();
}

/// `fnlet runtime add` with a fake interpreter that answers `import sys; print(...)` as another
/// Python would.
fn fake_python(dir: &Path, version: &str) -> PathBuf {
    let p = dir.join("python3");
    std::fs::write(&p, format!("#!/bin/sh\necho {version}\n")).expect("write fake python");
    common::set_mode(&p, 0o755);
    p
}

fn fnlet_runtime_add(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let empty = state.with_extension("toml");
    std::fs::write(&empty, "").expect("write an empty config");
    let mut c = Command::new(common::fnlet());
    c.args(["runtime", "add", RUNTIME, "--state-dir"])
        .arg(state)
        .arg("--config")
        .arg(&empty)
        .args(extra)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run fnlet")
}

#[test]
fn runtime_add_refuses_another_python_and_explains_an_unreachable_index() {
    let dir = tempfile::Builder::new()
        .prefix("fnlet-runtime-add-")
        .tempdir_in({
            let d = agents_dir();
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        })
        .expect("tempdir");
    let state = dir.path().join("state");

    // Python 3.12 cannot install python3.11: refused before anything is written.
    let fake = fake_python(dir.path(), "3.12.1");
    let o = fnlet_runtime_add(&state, &["--python", fake.to_str().expect("utf-8")], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        err.contains("is Python 3.12.1, but python3.11 needs Python 3.11.x"),
        "{}",
        show(&o)
    );
    assert!(!state.exists(), "{}", show(&o));

    // No index to reach (a closed port on loopback): a clear error, the offline recipe, and
    // no half-made install.
    let closed = format!("http://127.0.0.1:{}/simple", free_port());
    let started = Instant::now();
    let o = fnlet_runtime_add(
        &state,
        &[],
        &[
            ("PIP_INDEX_URL", &closed),
            ("PIP_FIND_LINKS", ""),
            ("PIP_RETRIES", "1"),
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        err.contains("pip could not reach the package index")
            && err.contains("pip download --only-binary=:all: --python-version 3.11")
            && err.contains("fnlet runtime add python3.11 --wheels wheels"),
        "{}",
        show(&o)
    );
    let left: Vec<_> = std::fs::read_dir(state.join("runtimes"))
        .expect("runtimes dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{}", show(&o));

    // From the wheels instead, with no index at all: installed.
    let wheels = wheels();
    let o = fnlet_runtime_add(
        &state,
        &["--wheels", wheels.to_str().expect("utf-8")],
        &[("PIP_INDEX_URL", &closed)],
    );
    assert!(o.status.success(), "{}", show(&o));
    let dir_py = state.join("runtimes").join(RUNTIME);
    assert!(dir_py.join("awslambdaric-4.2.2.dist-info").is_dir());
    // Readable by anyone: the functions' uids read it.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode()
    };
    assert_eq!(mode(&dir_py) & 0o555, 0o555);
    assert_eq!(
        mode(&dir_py.join("awslambdaric/__init__.py")) & 0o444,
        0o444
    );
}
