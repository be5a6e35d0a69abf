//! Lambda's control plane with clients nobody here wrote: boto3, the AWS CLI (from PyPI) and
//! the `aws-sdk-lambda` crate (tests/fixtures/aws-sdk-lambda) create functions from zips, poll them as Terraform's `aws_lambda_function` does, update
//! code and configuration, page through lists, and delete. The zips hold the lambda-rust
//! fixture's `bootstrap` and no fnlet.toml (the agent makes one from the call's fields), or a
//! fnlet.toml the call must agree with. Needs root, and PyPI the first time (the clients are
//! kept under target/).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::agent::{Agent, zip_of};
use common::aws::{clients_dir, python};
use reqwest::Method;
use serde_json::{Value, json};

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Clients {
    dir: PathBuf,
    endpoint: String,
    key: String,
    secret: String,
}

impl Clients {
    fn new(agent: &Agent) -> Clients {
        let key = agent.cli(&["keys", "create", "--description", "control plane", "--json"]);
        assert!(key.status.success(), "fnlet keys create: {}", show(&key));
        let key: Value = serde_json::from_slice(&key.stdout).expect("keys create --json");
        Clients {
            dir: clients_dir(),
            endpoint: agent.base_url(),
            key: key["access_key_id"].as_str().expect("key id").into(),
            secret: key["secret_access_key"].as_str().expect("secret").into(),
        }
    }

    /// Runs `script` with boto3 and `cfg` (plus the endpoint and key) on stdin; its JSON.
    fn boto3(&self, script: &str, mut cfg: Value) -> Value {
        cfg["endpoint"] = self.endpoint.clone().into();
        cfg["key"] = self.key.clone().into();
        cfg["secret"] = self.secret.clone().into();
        let path = tempfile::NamedTempFile::new().expect("a temp file for the config");
        std::fs::write(path.path(), cfg.to_string()).expect("write the config");
        let o = python(&self.dir)
            .arg("-c")
            .arg(format!("{BOTO3_PRELUDE}\n{script}"))
            .arg(path.path())
            .output()
            .expect("run python3");
        assert!(o.status.success(), "the boto3 script failed: {}", show(&o));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("boto3 output is not JSON ({e}): {}", show(&o)))
    }

    /// `aws lambda ARGS` (the AWS CLI v1); its output.
    fn aws(&self, args: &[&str]) -> Output {
        python(&self.dir)
            .args(["-m", "awscli", "lambda", "--endpoint-url", &self.endpoint])
            .args(["--region", "us-east-1", "--output", "json"])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &self.key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .output()
            .expect("run the AWS CLI")
    }

    fn aws_ok(&self, args: &[&str]) -> Value {
        let o = self.aws(args);
        assert!(o.status.success(), "aws lambda {args:?}: {}", show(&o));
        if o.stdout.iter().all(u8::is_ascii_whitespace) {
            return Value::Null;
        }
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("aws lambda {args:?} printed no JSON ({e}): {}", show(&o)))
    }
}

/// What every script starts with: the client, and `call` that turns a ClientError into
/// `{error, message, http}`.
const BOTO3_PRELUDE: &str = r#"
import base64, json, sys, time
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

cfg = json.load(open(sys.argv[1]))
lam = boto3.client("lambda", endpoint_url=cfg["endpoint"], region_name="us-east-1",
                   aws_access_key_id=cfg["key"], aws_secret_access_key=cfg["secret"],
                   config=Config(retries={"total_max_attempts": 1}))

def call(f, **kw):
    try:
        r = f(**kw)
        r.pop("ResponseMetadata", None)
        return r
    except ClientError as e:
        return {"error": e.response["Error"].get("Code"),
                "message": e.response["Error"].get("Message"),
                "http": e.response["ResponseMetadata"]["HTTPStatusCode"]}

def zipfile(path):
    return open(path, "rb").read()

def invoke(name, payload, **kw):
    r = lam.invoke(FunctionName=name, Payload=json.dumps(payload), **kw)
    return {"status": r["StatusCode"], "version": r.get("ExecutedVersion"),
            "error": r.get("FunctionError"), "payload": json.loads(r["Payload"].read())}

def poll(what, get, done, limit=120):
    # Terraform's waiters poll until the state settles; the agent's bound is seconds.
    seen, deadline = [], time.time() + limit
    while True:
        r = get()
        seen.append(r)
        if done(r):
            return seen
        if time.time() > deadline:
            raise SystemExit(f"{what}: not settled within {limit} s: {seen[-3:]}")
        time.sleep(0.2)
"#;

/// Terraform's `aws_lambda_function` lifecycle, call for call (create, poll GetFunction until
/// Active, read, update configuration and code each followed by polling LastUpdateStatus,
/// delete, poll until 404), with the invokes between showing what runs.
const TERRAFORM_SCRIPT: &str = r#"
import hashlib
name, role = cfg["name"], "arn:aws:iam::000000000000:role/terraform"
out = {"zip_sha256": base64.b64encode(hashlib.sha256(zipfile(cfg["zip"])).digest()).decode()}
out["create"] = call(lam.create_function, FunctionName=name, Role=role,
    Runtime="provided.al2023", Handler="bootstrap.handler", Code={"ZipFile": zipfile(cfg["zip"])},
    MemorySize=128, Timeout=3, Description="made by boto3",
    Environment={"Variables": {"GREETING": "hi"}}, Tags={"team": "infra"},
    Architectures=["x86_64"], EphemeralStorage={"Size": 512}, Publish=False)
states = poll("create", lambda: lam.get_function(FunctionName=name),
              lambda r: r["Configuration"]["State"] == "Active")
out["states"] = [s["Configuration"]["State"] for s in states]
got = states[-1]; got.pop("ResponseMetadata", None)
out["get"] = got
# Terraform's read.
out["versions"] = call(lam.list_versions_by_function, FunctionName=name)
out["code_signing"] = call(lam.get_function_code_signing_config, FunctionName=name)
out["tags"] = call(lam.list_tags, Resource=out["create"]["FunctionArn"])
# Tags changed after the create (Terraform's tags on update): TagResource, UntagResource.
arn = out["create"]["FunctionArn"]
out["tag"] = call(lam.tag_resource, Resource=arn, Tags={"cost": "12", "team": "platform"})
out["tags_tagged"] = call(lam.list_tags, Resource=arn)
out["untag"] = call(lam.untag_resource, Resource=arn, TagKeys=["team", "absent"])
out["tags_untagged"] = call(lam.list_tags, Resource=arn)
out["tag_missing"] = call(lam.tag_resource,
    Resource=arn.replace(name, "no-such-function"), Tags={"a": "b"})
out["tag_qualified"] = call(lam.tag_resource, Resource=arn + ":1", Tags={"a": "b"})
lam.get_waiter("function_active_v2").wait(FunctionName=name,
    WaiterConfig={"Delay": 1, "MaxAttempts": 60})
out["invoke1"] = invoke(name, {"n": 1})

out["update_config"] = call(lam.update_function_configuration, FunctionName=name,
    MemorySize=256, Timeout=5, Description="updated", Environment={"Variables": {"GREETING": "hello"}})
poll("update config", lambda: lam.get_function_configuration(FunctionName=name),
     lambda r: r["LastUpdateStatus"] == "Successful")
lam.get_waiter("function_updated_v2").wait(FunctionName=name,
    WaiterConfig={"Delay": 1, "MaxAttempts": 60})
out["after_config"] = call(lam.get_function_configuration, FunctionName=name)
out["invoke2"] = invoke(name, {"n": 2})
out["stale_revision"] = call(lam.update_function_configuration, FunctionName=name,
    Description="x", RevisionId=out["create"]["RevisionId"])

out["update_code"] = call(lam.update_function_code, FunctionName=name,
    ZipFile=zipfile(cfg["zip2"]), Publish=True)
poll("update code", lambda: lam.get_function(FunctionName=name),
     lambda r: r["Configuration"]["LastUpdateStatus"] == "Successful")
out["after_code"] = call(lam.get_function_configuration, FunctionName=name)
out["invoke3"] = invoke(name, {"n": 3})
out["publish"] = call(lam.publish_version, FunctionName=name)
out["first_version"] = call(lam.get_function_configuration, FunctionName=name, Qualifier="1")
out["versions_after"] = call(lam.list_versions_by_function, FunctionName=name)
out["delete_active_version"] = call(lam.delete_function, FunctionName=name,
    Qualifier=out["update_code"].get("Version", "none"))
out["delete_old_version"] = call(lam.delete_function, FunctionName=name, Qualifier="1")
out["old_version_gone"] = call(lam.get_function, FunctionName=name, Qualifier="1")

# Errors, as botocore reads them.
out["again"] = call(lam.create_function, FunctionName=name, Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["zip"])})
out["layers"] = call(lam.create_function, FunctionName="with-layers", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["zip"])},
    Layers=["arn:aws:lambda:us-east-1:000000000000:layer:x:1"])
out["vpc"] = call(lam.create_function, FunctionName="in-vpc", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["zip"])},
    VpcConfig={"SubnetIds": ["subnet-1"], "SecurityGroupIds": ["sg-1"]})
# No layers and no VPC, said explicitly: accepted.
out["no_vpc_no_layers"] = call(lam.create_function, FunctionName="plain", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["zip"])},
    VpcConfig={"SubnetIds": [], "SecurityGroupIds": []}, Layers=[], Architectures=["x86_64"])
out["arm64"] = call(lam.create_function, FunctionName="on-arm", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["zip"])},
    Architectures=["arm64"])
out["unknown_runtime"] = call(lam.create_function, FunctionName="on-node", Role=role,
    Runtime="nodejs20.x", Handler="index.handler", Code={"ZipFile": zipfile(cfg["zip"])})
out["no_runtime"] = call(lam.create_function, FunctionName="no-runtime", Role=role,
    Code={"ZipFile": zipfile(cfg["zip"])})
out["not_a_zip"] = call(lam.create_function, FunctionName="not-a-zip", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": b"not a zip at all"})
out["no_bootstrap"] = call(lam.create_function, FunctionName="no-bootstrap", Role=role,
    Runtime="provided.al2023", Handler="x", Code={"ZipFile": zipfile(cfg["empty_zip"])})
out["reserved_env"] = call(lam.update_function_configuration, FunctionName=name,
    Environment={"Variables": {"AWS_LAMBDA_RUNTIME_API": "elsewhere"}})
out["unknown"] = call(lam.get_function, FunctionName="no-such-function")

out["delete"] = call(lam.delete_function, FunctionName=name)
gone = poll("delete", lambda: call(lam.get_function, FunctionName=name),
            lambda r: r.get("error") == "ResourceNotFoundException")
out["gone"] = gone[-1]
out["invoke_gone"] = call(lam.invoke, FunctionName=name, Payload=b"{}")
print(json.dumps(out, default=str))
"#;

/// The lambda-rust fixture's bootstrap.
fn bootstrap() -> Vec<u8> {
    std::fs::read(common::fixture_bootstrap("lambda-rust")).expect("read bootstrap")
}

/// A bootstrap as two zips: `fn.zip`, and `fn2.zip` with a VERSION file beside it (new code,
/// a new CodeSha256).
fn two_zips(dir: &Path, bin: &[u8]) -> (String, String) {
    let zip = write(dir, "fn.zip", &zip_of(&[("bootstrap", bin, 0o755)]));
    let zip2 = write(
        dir,
        "fn2.zip",
        &zip_of(&[("bootstrap", bin, 0o755), ("VERSION", b"2\n", 0o644)]),
    );
    (zip, zip2)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write a zip");
    p.display().to_string()
}

fn error_of(v: &Value) -> (&str, u64, &str) {
    (
        v["error"].as_str().unwrap_or("-"),
        v["http"].as_u64().unwrap_or(0),
        v["message"].as_str().unwrap_or(""),
    )
}

#[test]
fn terraforms_calls_with_boto3() {
    let agent = Agent::start("cp-terraform");
    let clients = Clients::new(&agent);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = bootstrap();
    let (zip, zip2) = two_zips(dir.path(), &bin);
    let empty = write(
        dir.path(),
        "empty.zip",
        &zip_of(&[("README", b"no bootstrap here\n", 0o644)]),
    );
    let r = clients.boto3(
        TERRAFORM_SCRIPT,
        json!({ "name": "tf-fn", "zip": zip, "zip2": zip2, "empty_zip": empty }),
    );
    let ctx = format!("{r:#}");
    let arn = "arn:aws:lambda:us-east-1:000000000000:function:tf-fn";

    // CreateFunction: the configuration as given, on the fixture's bootstrap.
    let c = &r["create"];
    assert_eq!(c["FunctionName"], "tf-fn", "{ctx}");
    assert_eq!(c["FunctionArn"], arn, "{ctx}");
    assert_eq!(c["Runtime"], "provided.al2023", "{ctx}");
    assert_eq!(c["Handler"], "bootstrap.handler", "{ctx}");
    assert_eq!(c["Role"], "arn:aws:iam::000000000000:role/terraform");
    assert_eq!(c["MemorySize"], 128, "{ctx}");
    assert_eq!(c["Timeout"], 3, "{ctx}");
    assert_eq!(c["Description"], "made by boto3");
    assert_eq!(c["Environment"]["Variables"]["GREETING"], "hi", "{ctx}");
    assert_eq!(c["Version"], "$LATEST", "{ctx}");
    assert_eq!(c["PackageType"], "Zip");
    assert_eq!(c["Architectures"], json!(["x86_64"]));
    // CodeSha256 is the zip's, as Lambda's (what Terraform's source_code_hash compares).
    let sha = r["zip_sha256"].as_str().expect("the zip's sha256");
    assert_eq!(c["CodeSha256"], sha, "{ctx}");
    assert!(
        c["CodeSize"].as_u64().unwrap_or(0) >= bin.len() as u64,
        "{ctx}"
    );
    // One agent: the bundle is stored when the call answers, so the first poll sees Active.
    assert_eq!(c["State"], "Active", "{ctx}");
    assert_eq!(c["LastUpdateStatus"], "Successful", "{ctx}");
    assert_eq!(r["states"], json!(["Active"]), "{ctx}");
    assert_eq!(r["get"]["Configuration"]["CodeSha256"], sha);
    assert_eq!(r["get"]["Tags"], json!({"team": "infra"}), "{ctx}");
    assert_eq!(r["tags"]["Tags"], json!({"team": "infra"}), "{ctx}");
    assert_eq!(r["code_signing"]["CodeSigningConfigArn"], "", "{ctx}");
    assert_eq!(r["code_signing"]["FunctionName"], "tf-fn", "{ctx}");
    // TagResource adds and overwrites, UntagResource removes (an absent key is no error).
    assert!(r["tag"].get("error").is_none(), "{ctx}");
    assert_eq!(
        r["tags_tagged"]["Tags"],
        json!({"team": "platform", "cost": "12"}),
        "{ctx}"
    );
    assert!(r["untag"].get("error").is_none(), "{ctx}");
    assert_eq!(r["tags_untagged"]["Tags"], json!({"cost": "12"}), "{ctx}");
    assert_eq!(
        error_of(&r["tag_missing"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );
    let (t, http, m) = error_of(&r["tag_qualified"]);
    assert_eq!((t, http), ("InvalidParameterValueException", 400), "{ctx}");
    assert!(m.contains("unqualified"), "{m}");
    let versions: Vec<&str> = r["versions"]["Versions"]
        .as_array()
        .expect("Versions")
        .iter()
        .filter_map(|v| v["Version"].as_str())
        .collect();
    assert_eq!(versions, ["$LATEST", "1"], "{ctx}");

    // The function runs with the memory it was given.
    let i = &r["invoke1"];
    assert_eq!(i["status"], 200, "{ctx}");
    assert_eq!(i["version"], "1", "{ctx}");
    assert_eq!(i["payload"]["echo"], json!({"n": 1}), "{ctx}");
    assert_eq!(i["payload"]["memory"], "128", "{ctx}");

    // UpdateFunctionConfiguration: a new version with the same code; the next call runs it.
    let u = &r["update_config"];
    assert_eq!(u["MemorySize"], 256, "{ctx}");
    assert_eq!(u["Timeout"], 5);
    assert_eq!(u["CodeSha256"], sha, "{ctx}");
    assert_ne!(u["RevisionId"], c["RevisionId"], "{ctx}");
    assert_eq!(r["after_config"]["Description"], "updated");
    assert_eq!(
        r["after_config"]["Environment"]["Variables"]["GREETING"],
        "hello"
    );
    assert_eq!(r["invoke2"]["payload"]["memory"], "256", "{ctx}");
    assert_eq!(r["invoke2"]["version"], "2", "{ctx}");
    assert_eq!(
        error_of(&r["stale_revision"]).0,
        "PreconditionFailedException",
        "{ctx}"
    );

    // UpdateFunctionCode with Publish: new code, the configuration kept, its number answered.
    let uc = &r["update_code"];
    assert_eq!(uc["Version"], "3", "{ctx}");
    assert_ne!(uc["CodeSha256"], sha, "{ctx}");
    assert_eq!(uc["MemorySize"], 256, "{ctx}");
    assert_eq!(uc["Role"], "arn:aws:iam::000000000000:role/terraform");
    assert_eq!(r["after_code"]["Version"], "$LATEST");
    assert_eq!(r["invoke3"]["version"], "3", "{ctx}");
    assert_eq!(r["invoke3"]["payload"]["memory"], "256", "{ctx}");
    assert_eq!(r["publish"]["Version"], "3", "{ctx}");
    assert_eq!(
        r["publish"]["FunctionArn"],
        format!("{arn}:3").as_str(),
        "{ctx}"
    );
    // An older version, as it was.
    assert_eq!(r["first_version"]["Version"], "1", "{ctx}");
    assert_eq!(r["first_version"]["MemorySize"], 128, "{ctx}");
    let versions: Vec<&str> = r["versions_after"]["Versions"]
        .as_array()
        .expect("Versions")
        .iter()
        .filter_map(|v| v["Version"].as_str())
        .collect();
    assert_eq!(versions, ["$LATEST", "1", "2", "3"], "{ctx}");
    // DeleteFunction with a qualifier: not the version that runs; an old one goes.
    let (t, http, m) = error_of(&r["delete_active_version"]);
    assert_eq!((t, http), ("ResourceConflictException", 409), "{ctx}");
    assert!(m.contains("version 3"), "{m}");
    assert_eq!(r["delete_old_version"]["StatusCode"], 204, "{ctx}");
    assert_eq!(
        error_of(&r["old_version_gone"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );

    // Errors name what is wrong.
    let (t, http, m) = error_of(&r["again"]);
    assert_eq!((t, http), ("ResourceConflictException", 409), "{ctx}");
    assert!(m.contains("tf-fn"), "{m}");
    for (case, field) in [
        ("layers", "Layers"),
        ("arm64", "Architectures"),
        ("vpc", "VpcConfig"),
        ("unknown_runtime", "Runtime"),
        ("no_runtime", "Runtime"),
        ("not_a_zip", "Code.ZipFile"),
        ("no_bootstrap", "Code.ZipFile"),
        ("reserved_env", "Environment.Variables"),
    ] {
        let (t, http, m) = error_of(&r[case]);
        assert_eq!(
            (t, http),
            ("InvalidParameterValueException", 400),
            "{case}: {ctx}"
        );
        assert!(m.starts_with(field), "{case}: {m:?} should name {field}");
    }
    assert!(
        error_of(&r["no_bootstrap"]).2.contains("bootstrap"),
        "{ctx}"
    );
    assert_eq!(
        error_of(&r["unknown"]),
        (
            "ResourceNotFoundException",
            404,
            "Function not found: arn:aws:lambda:us-east-1:000000000000:function:no-such-function"
        )
    );
    // Empty VpcConfig and Layers, and x86_64, are accepted; none of the refused functions
    // exists.
    let plain = &r["no_vpc_no_layers"];
    assert_eq!(plain["Architectures"], json!(["x86_64"]), "{ctx}");
    assert!(plain.get("Layers").is_none(), "{ctx}");
    let listed = agent.admin(Method::GET, "/v1/functions", None).json();
    let names: Vec<&str> = listed["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["plain"], "{ctx}");

    // DeleteFunction, then GetFunction answers 404 (Terraform's wait), and so does Invoke.
    assert_eq!(r["delete"]["StatusCode"], 204, "{ctx}");
    assert_eq!(error_of(&r["gone"]).1, 404, "{ctx}");
    assert_eq!(
        error_of(&r["invoke_gone"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );
    assert!(agent.is_running());
    agent.finish();
}

/// The AWS CLI's error output names the error type and message; its exit status is not 0.
fn cli_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", show(o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_aws_cli_manages_functions_and_fnlet_describe_agrees() {
    let agent = Agent::start("cp-cli");
    let clients = Clients::new(&agent);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = bootstrap();
    let role = "arn:aws:iam::000000000000:role/cli";
    let toml = |name: &str| {
        format!(
            "name = \"{name}\"\nmode = \"lambda\"\nmemory_mb = 192\ntimeout_s = 4\ndescription = \"from fnlet.toml\"\n"
        )
    };
    let own = write(
        dir.path(),
        "own.zip",
        &zip_of(&[
            ("fnlet.toml", toml("cli-fn").as_bytes(), 0o644),
            ("bootstrap", &bin, 0o755),
        ]),
    );
    let plain = write(
        dir.path(),
        "plain.zip",
        &zip_of(&[("bootstrap", &bin, 0o755)]),
    );
    let plain2 = write(
        dir.path(),
        "plain2.zip",
        &zip_of(&[("bootstrap", &bin, 0o755), ("VERSION", b"2\n", 0o644)]),
    );
    let fileb = |p: &str| format!("fileb://{p}");

    // A zip with its own fnlet.toml: the fields the call gives agree with it.
    let c = clients.aws_ok(&[
        "create-function",
        "--function-name",
        "cli-fn",
        "--runtime",
        "provided.al2023",
        "--handler",
        "bootstrap",
        "--role",
        role,
        "--memory-size",
        "192",
        "--zip-file",
        &fileb(&own),
    ]);
    assert_eq!(c["MemorySize"], 192, "{c:#}");
    assert_eq!(c["Timeout"], 4, "{c:#}");
    assert_eq!(c["Description"], "from fnlet.toml", "{c:#}");
    assert_eq!(c["Role"], role);
    // ... or the call is refused, naming the field.
    let bad = write(
        dir.path(),
        "bad.zip",
        &zip_of(&[
            ("fnlet.toml", toml("cli-bad").as_bytes(), 0o644),
            ("bootstrap", &bin, 0o755),
        ]),
    );
    let e = cli_error(&clients.aws(&[
        "create-function",
        "--function-name",
        "cli-bad",
        "--runtime",
        "provided.al2023",
        "--handler",
        "bootstrap",
        "--role",
        role,
        "--memory-size",
        "256",
        "--zip-file",
        &fileb(&bad),
    ]));
    assert!(
        e.contains("InvalidParameterValueException") && e.contains("MemorySize"),
        "{e}"
    );
    let e = cli_error(&clients.aws(&[
        "create-function",
        "--function-name",
        "other-name",
        "--runtime",
        "provided.al2023",
        "--handler",
        "bootstrap",
        "--role",
        role,
        "--zip-file",
        &fileb(&own),
    ]));
    assert!(
        e.contains("InvalidParameterValueException") && e.contains("FunctionName"),
        "{e}"
    );

    for name in ["cli-a", "cli-b"] {
        clients.aws_ok(&[
            "create-function",
            "--function-name",
            name,
            "--runtime",
            "provided.al2",
            "--handler",
            "whatever.handler",
            "--role",
            role,
            "--zip-file",
            &fileb(&plain),
        ]);
    }
    let o = clients.aws(&["wait", "function-active-v2", "--function-name", "cli-fn"]);
    assert!(o.status.success(), "wait function-active-v2: {}", show(&o));

    // Paging: the CLI follows NextMarker one function a page.
    let l = clients.aws_ok(&["list-functions", "--page-size", "1"]);
    let names: Vec<&str> = l["Functions"]
        .as_array()
        .expect("Functions")
        .iter()
        .filter_map(|f| f["FunctionName"].as_str())
        .collect();
    assert_eq!(names, ["cli-a", "cli-b", "cli-fn"], "{l:#}");
    let l = clients.aws_ok(&["list-functions", "--max-items", "2", "--page-size", "1"]);
    assert_eq!(l["Functions"].as_array().map(Vec::len), Some(2), "{l:#}");
    assert!(l["NextToken"].is_string(), "{l:#}");

    // Invoked through the CLI, it runs with the manifest's memory.
    let out = dir.path().join("out.json");
    let o = clients.aws_ok(&[
        "invoke",
        "--function-name",
        "cli-fn",
        "--payload",
        r#"{"from":"cli"}"#,
        &out.display().to_string(),
    ]);
    assert_eq!(o["StatusCode"], 200, "{o:#}");
    let payload: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("read out.json")).expect("JSON");
    assert_eq!(payload["memory"], "192", "{payload}");
    assert_eq!(payload["echo"], json!({"from": "cli"}));

    // GetFunction and `fnlet describe` show the same function.
    let g = clients.aws_ok(&["get-function", "--function-name", "cli-fn"]);
    let d = agent.cli(&["describe", "cli-fn", "--json"]);
    assert!(d.status.success(), "fnlet describe: {}", show(&d));
    let d: Value = serde_json::from_slice(&d.stdout).expect("describe --json");
    let g = &g["Configuration"];
    assert_eq!(g["MemorySize"], d["limits"]["memory_mb"], "{g:#}\n{d:#}");
    assert_eq!(
        g["Timeout"].as_f64(),
        d["limits"]["timeout_s"].as_f64().map(f64::ceil)
    );
    assert_eq!(g["Description"], d["manifest"]["description"]);
    assert_eq!(g["Role"], d["manifest"]["aws"]["role"]);
    let active = d["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["active"] == true)
        .expect("an active version");
    assert_eq!(g["CodeSize"], active["size_bytes"], "{g:#}\n{d:#}");
    assert_eq!(d["version"], 1);
    let text = agent.cli(&["describe", "cli-fn"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("192"), "{text}");
    assert!(
        text.contains("provided.al2023") && text.contains(role),
        "describe shows the runtime and the role: {text}"
    );

    // update-function-code with --publish: the next version, its number answered.
    let u = clients.aws_ok(&[
        "update-function-code",
        "--function-name",
        "cli-a",
        "--zip-file",
        &fileb(&plain2),
        "--publish",
    ]);
    assert_eq!(u["Version"], "2", "{u:#}");
    assert_eq!(u["Runtime"], "provided.al2", "{u:#}");
    assert_eq!(u["Handler"], "whatever.handler", "{u:#}");
    let o = clients.aws(&["wait", "function-updated-v2", "--function-name", "cli-a"]);
    assert!(o.status.success(), "wait function-updated-v2: {}", show(&o));
    let d = agent.admin(Method::GET, "/v1/functions/cli-a", None).json();
    assert_eq!(d["version"], 2, "{d:#}");

    // delete-function, then get-function is ResourceNotFoundException.
    clients.aws_ok(&["delete-function", "--function-name", "cli-a"]);
    let e = cli_error(&clients.aws(&["get-function", "--function-name", "cli-a"]));
    assert!(e.contains("ResourceNotFoundException"), "{e}");
    agent
        .admin(Method::GET, "/v1/functions/cli-a", None)
        .expect_error(404, "not_found");

    // Without a signature (or the admin token) the control plane answers Lambda's 403.
    let r = agent.request(Method::GET, "/2015-03-31/functions", false, None);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype").as_deref(),
        Some("MissingAuthenticationTokenException")
    );
    let r = agent.request(Method::GET, "/2015-03-31/functions", true, None);
    assert_eq!(r.status, 200, "{}", r.text());
    agent.finish();
}

/// Versions, aliases with weights, qualified calls and reserved concurrency, with boto3.
const ALIAS_SCRIPT: &str = r#"
name, role = "canary", "arn:aws:iam::000000000000:role/canary"
out = {}
out["create"] = call(lam.create_function, FunctionName=name, Role=role, Runtime="provided.al2023",
    Handler="bootstrap", Code={"ZipFile": zipfile(cfg["zip"])})
out["update"] = call(lam.update_function_code, FunctionName=name, ZipFile=zipfile(cfg["zip2"]),
    Publish=True)
lam.get_waiter("function_updated_v2").wait(FunctionName=name,
    WaiterConfig={"Delay": 1, "MaxAttempts": 60})
out["publish"] = call(lam.publish_version, FunctionName=name)
out["live"] = call(lam.create_alias, FunctionName=name, Name="live", FunctionVersion="2",
    Description="90/10", RoutingConfig={"AdditionalVersionWeights": {"1": 0.1}})
out["stable"] = call(lam.create_alias, FunctionName=name, Name="stable", FunctionVersion="1")
out["again"] = call(lam.create_alias, FunctionName=name, Name="stable", FunctionVersion="1")
out["no_version"] = call(lam.create_alias, FunctionName=name, Name="nine", FunctionVersion="9")
out["bad_weight"] = call(lam.create_alias, FunctionName=name, Name="heavy", FunctionVersion="2",
    RoutingConfig={"AdditionalVersionWeights": {"1": 1.5}})
out["get_live"] = call(lam.get_alias, FunctionName=name, Name="live")
out["page1"] = call(lam.list_aliases, FunctionName=name, MaxItems=1)
out["page2"] = call(lam.list_aliases, FunctionName=name, MaxItems=1,
    Marker=out["page1"].get("NextMarker", ""))
out["get_by_alias"] = call(lam.get_function, FunctionName=name, Qualifier="stable")

# The split: 200 calls through the alias, counted by X-Amz-Executed-Version.
counts = {}
for i in range(cfg["calls"]):
    r = invoke(name, {"i": i}, Qualifier="live")
    if r["status"] != 200 or r["error"]:
        raise SystemExit(f"call {i} through live: {r}")
    counts[r["version"]] = counts.get(r["version"], 0) + 1
out["counts"] = counts
out["by_name"] = invoke(name + ":stable", {"via": "name:alias"})
out["by_number"] = invoke(name, {"via": "Qualifier"}, Qualifier="1")
out["no_such_alias"] = call(lam.invoke, FunctionName=name, Qualifier="nope", Payload=b"{}")
out["delete_aliased"] = call(lam.delete_function, FunctionName=name, Qualifier="1")
out["update_live"] = call(lam.update_alias, FunctionName=name, Name="live", FunctionVersion="2",
    RoutingConfig={"AdditionalVersionWeights": {}})
out["delete_stable"] = call(lam.delete_alias, FunctionName=name, Name="stable")
out["stable_gone"] = call(lam.get_alias, FunctionName=name, Name="stable")

# Reserved concurrency: 0 throttles every call; removed, calls run again.
out["put_zero"] = call(lam.put_function_concurrency, FunctionName=name, ReservedConcurrentExecutions=0)
out["get_zero"] = call(lam.get_function_concurrency, FunctionName=name)
out["throttled"] = call(lam.invoke, FunctionName=name, Payload=b"{}")
out["function_zero"] = call(lam.get_function, FunctionName=name)
out["delete_concurrency"] = call(lam.delete_function_concurrency, FunctionName=name)
out["get_none"] = call(lam.get_function_concurrency, FunctionName=name)
out["after"] = invoke(name, {"after": True})
print(json.dumps(out, default=str))
"#;

#[test]
fn aliases_split_calls_and_concurrency_zero_throttles() {
    let agent = Agent::start("cp-alias");
    let clients = Clients::new(&agent);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = bootstrap();
    let (zip, zip2) = two_zips(dir.path(), &bin);
    let calls = 200;
    let r = clients.boto3(
        ALIAS_SCRIPT,
        json!({ "zip": zip, "zip2": zip2, "calls": calls }),
    );
    let ctx = format!("{r:#}");
    let arn = "arn:aws:lambda:us-east-1:000000000000:function:canary";
    assert_eq!(r["update"]["Version"], "2", "{ctx}");
    assert_eq!(r["publish"]["Version"], "2", "{ctx}");
    let live = &r["live"];
    assert_eq!(live["AliasArn"], format!("{arn}:live").as_str(), "{ctx}");
    assert_eq!(live["FunctionVersion"], "2");
    assert_eq!(
        live["RoutingConfig"]["AdditionalVersionWeights"],
        json!({"1": 0.1}),
        "{ctx}"
    );
    assert_eq!(r["get_live"]["Description"], "90/10", "{ctx}");
    assert_eq!(
        error_of(&r["again"]).0,
        "ResourceConflictException",
        "{ctx}"
    );
    assert_eq!(
        error_of(&r["no_version"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );
    let (t, _, m) = error_of(&r["bad_weight"]);
    assert_eq!(t, "InvalidParameterValueException", "{ctx}");
    assert!(m.starts_with("RoutingConfig"), "{m}");
    // Paging by name: live, then stable.
    assert_eq!(r["page1"]["Aliases"][0]["Name"], "live", "{ctx}");
    assert_eq!(r["page1"]["NextMarker"], "live", "{ctx}");
    assert_eq!(r["page2"]["Aliases"][0]["Name"], "stable", "{ctx}");
    assert!(r["page2"]["NextMarker"].is_null(), "{ctx}");
    assert_eq!(r["get_by_alias"]["Configuration"]["Version"], "1", "{ctx}");

    // 90/10: version 1 ran about 20 of 200 times. Binomial(200, 0.1) has a standard deviation
    // of 4.2: outside 5..=40 happens about once in 5,000 runs.
    let counts = r["counts"].as_object().expect("counts");
    let old = counts.get("1").and_then(Value::as_u64).unwrap_or(0);
    let new = counts.get("2").and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(old + new, calls, "{ctx}");
    assert!(
        (5..=40).contains(&old),
        "version 1 ran {old} of {calls} times: {ctx}"
    );

    // name:alias and a version number as Qualifier run that version.
    assert_eq!(r["by_name"]["version"], "1", "{ctx}");
    assert_eq!(
        r["by_name"]["payload"]["echo"],
        json!({"via": "name:alias"})
    );
    assert_eq!(r["by_number"]["version"], "1", "{ctx}");
    assert_eq!(
        error_of(&r["no_such_alias"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );
    // A version an alias names stays until the alias lets go of it.
    let (t, http, m) = error_of(&r["delete_aliased"]);
    assert_eq!((t, http), ("ResourceConflictException", 409), "{ctx}");
    assert!(m.contains("is used by the alias"), "{m}");
    assert!(
        r["update_live"]["RoutingConfig"].is_null(),
        "weights removed: {ctx}"
    );
    assert_eq!(r["delete_stable"], json!({}), "{ctx}");
    assert_eq!(
        error_of(&r["stable_gone"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );

    // Reserved concurrency 0 throttles; the function shows it; removed, calls run again.
    assert_eq!(r["put_zero"]["ReservedConcurrentExecutions"], 0, "{ctx}");
    assert_eq!(r["get_zero"]["ReservedConcurrentExecutions"], 0, "{ctx}");
    let (t, http, _) = error_of(&r["throttled"]);
    assert_eq!((t, http), ("TooManyRequestsException", 429), "{ctx}");
    assert_eq!(
        r["function_zero"]["Concurrency"]["ReservedConcurrentExecutions"], 0,
        "{ctx}"
    );
    assert!(
        r["get_none"].get("ReservedConcurrentExecutions").is_none(),
        "{ctx}"
    );
    assert_eq!(r["after"]["status"], 200, "{ctx}");
    assert_eq!(r["after"]["payload"]["echo"], json!({"after": true}));
    assert!(agent.is_running());
    agent.finish();
}

const SCOPE_SCRIPT: &str = r#"
out = {}
def create(name):
    return call(lam.create_function, FunctionName=name, Role="arn:aws:iam::000000000000:role/x",
        Runtime="provided.al2023", Handler="bootstrap", Code={"ZipFile": zipfile(cfg["zip"])})
for name in cfg["create"]:
    out["create " + name] = create(name)
out["list"] = call(lam.list_functions)
for name in cfg["invoke"]:
    try:
        out["invoke " + name] = invoke(name, {"by": cfg["who"]})
    except ClientError as e:
        out["invoke " + name] = {"error": e.response["Error"].get("Code"),
                                 "message": e.response["Error"].get("Message"),
                                 "http": e.response["ResponseMetadata"]["HTTPStatusCode"]}
print(json.dumps(out, default=str))
"#;

/// A key made with `fnlet keys create ARGS --json`, as a client.
fn key_clients(agent: &Agent, args: &[&str]) -> Clients {
    let mut all = vec!["keys", "create", "--json"];
    all.extend_from_slice(args);
    let key = agent.cli(&all);
    assert!(key.status.success(), "fnlet keys create: {}", show(&key));
    let key: Value = serde_json::from_slice(&key.stdout).expect("keys create --json");
    Clients {
        dir: clients_dir(),
        endpoint: agent.base_url(),
        key: key["access_key_id"].as_str().expect("key id").into(),
        secret: key["secret_access_key"].as_str().expect("secret").into(),
    }
}

#[test]
fn scoped_keys_are_held_to_their_scope() {
    let agent = Agent::start("cp-scopes");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = bootstrap();
    let zip = write(dir.path(), "fn.zip", &zip_of(&[("bootstrap", &bin, 0o755)]));

    // An admin key (the default) makes a function.
    let admin = Clients::new(&agent);
    let r = admin.boto3(
        SCOPE_SCRIPT,
        json!({ "zip": zip, "who": "admin", "create": ["shared"], "invoke": ["shared"] }),
    );
    assert_eq!(r["create shared"]["State"], "Active", "{r:#}");
    assert_eq!(r["invoke shared"]["status"], 200, "{r:#}");

    // An invoke key invokes, and is refused the control plane with AccessDeniedException.
    let invoker = key_clients(&agent, &["--scope", "invoke"]);
    let r = invoker.boto3(
        SCOPE_SCRIPT,
        json!({ "zip": zip, "who": "invoker", "create": ["mine"], "invoke": ["shared"] }),
    );
    let ctx = format!("{r:#}");
    let (t, http, m) = error_of(&r["create mine"]);
    assert_eq!((t, http), ("AccessDeniedException", 403), "{ctx}");
    assert!(
        m.contains("invoke scope")
            && m.contains("lambda:CreateFunction")
            && m.contains(":function:mine"),
        "{m}"
    );
    assert_eq!(error_of(&r["list"]).0, "AccessDeniedException", "{ctx}");
    assert_eq!(r["invoke shared"]["status"], 200, "{ctx}");
    assert_eq!(
        r["invoke shared"]["payload"]["echo"],
        json!({"by": "invoker"})
    );

    // A deploy key limited to team-*: its own functions only, for both.
    let team = key_clients(&agent, &["--scope", "deploy", "--function", "team-*"]);
    let r = team.boto3(
        SCOPE_SCRIPT,
        json!({ "zip": zip, "who": "team", "create": ["team-a", "other"], "invoke": ["team-a", "shared"] }),
    );
    let ctx = format!("{r:#}");
    assert_eq!(r["create team-a"]["State"], "Active", "{ctx}");
    assert_eq!(
        error_of(&r["create other"]).0,
        "AccessDeniedException",
        "{ctx}"
    );
    assert_eq!(r["invoke team-a"]["status"], 200, "{ctx}");
    assert_eq!(
        error_of(&r["invoke shared"]).0,
        "AccessDeniedException",
        "{ctx}"
    );
    // What was refused was not made.
    agent
        .admin(Method::GET, "/v1/functions/other", None)
        .expect_error(404, "not_found");
    agent
        .admin(Method::GET, "/v1/functions/mine", None)
        .expect_error(404, "not_found");
    // The CLI refuses a scope it does not know, naming it.
    let o = agent.cli(&["keys", "create", "--scope", "root"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("root"),
        "{}",
        show(&o)
    );
    agent.finish();
}

/// A `provided.al2023` runtime of its own (Python, standard library only): the Runtime API by
/// hand, answering in response streaming mode (chunked, error trailers) unless the event asks
/// for a buffered answer. Each chunk is `PART|INSTANCE|VERSION|TIME`: the instance is a random
/// token of this process, TIME when the chunk was written.
const STREAMING_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import base64, http.client, json, os, socket, time
API = os.environ["AWS_LAMBDA_RUNTIME_API"]
HOST, PORT = API.split(":")
INSTANCE = os.urandom(8).hex()
VERSION = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION")
while True:
    c = http.client.HTTPConnection(HOST, int(PORT))
    c.request("GET", "/2018-06-01/runtime/invocation/next")
    r = c.getresponse()
    rid = r.getheader("Lambda-Runtime-Aws-Request-Id")
    event = json.loads(r.read() or b"{}")
    c.close()
    path = "/2018-06-01/runtime/invocation/%s/response" % rid
    if event.get("buffered"):
        c = http.client.HTTPConnection(HOST, int(PORT))
        c.request("POST", path, json.dumps({"instance": INSTANCE, "version": VERSION}))
        c.getresponse().read()
        c.close()
        continue
    s = socket.create_connection((HOST, int(PORT)))
    s.sendall(("POST %s HTTP/1.1\r\nHost: %s\r\n"
               "Lambda-Runtime-Function-Response-Mode: streaming\r\n"
               "Transfer-Encoding: chunked\r\n"
               "Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
               "Content-Type: application/octet-stream\r\n\r\n" % (path, API)).encode())
    for i, part in enumerate(event.get("parts", [])):
        if i:
            time.sleep(event.get("sleep", 0))
        b = ("%s|%s|%s|%.6f" % (part, INSTANCE, VERSION, time.time())).encode()
        s.sendall(b"%x\r\n%s\r\n" % (len(b), b))
    time.sleep(event.get("hang", 0))
    if event.get("fail"):
        err = json.dumps({"errorType": "Stream.Fail", "errorMessage": "failed mid-stream"})
        s.sendall(b"0\r\nLambda-Runtime-Function-Error-Type: Stream.Fail\r\n"
                  b"Lambda-Runtime-Function-Error-Body: " + base64.b64encode(err.encode()) + b"\r\n\r\n")
    else:
        s.sendall(b"0\r\n\r\n")
    s.recv(4096)
    s.close()
"#;

/// InvokeWithResponseStream with boto3 (the AWS CLI v1, the one on PyPI, leaves the command
/// out: awscli/customizations/removals.py), and qualified calls reusing warm instances.
const STREAM_SCRIPT: &str = r#"
name, role = cfg["name"], "arn:aws:iam::000000000000:role/stream"
out = {}
out["create"] = call(lam.create_function, FunctionName=name, Role=role, Runtime="provided.al2023",
    Handler="bootstrap", Code={"ZipFile": zipfile(cfg["zip"])}, Timeout=6)
out["update"] = call(lam.update_function_code, FunctionName=name, ZipFile=zipfile(cfg["zip2"]),
    Publish=True)
lam.get_waiter("function_updated_v2").wait(FunctionName=name,
    WaiterConfig={"Delay": 1, "MaxAttempts": 60})

def stream(fn, payload, **kw):
    r = lam.invoke_with_response_stream(FunctionName=fn, Payload=payload, **kw)
    events = []
    for ev in r["EventStream"]:
        at = time.time()
        if "PayloadChunk" in ev:
            events.append({"chunk": ev["PayloadChunk"]["Payload"].decode(), "at": at})
        else:
            events.append({"complete": ev.get("InvokeComplete"), "other": list(ev), "at": at})
    return {"status": r["StatusCode"], "version": r.get("ExecutedVersion"),
            "content_type": r.get("ResponseStreamContentType"), "events": events}

def js(v):
    return json.dumps(v)

out["streamed"] = stream(name, js({"parts": ["one", "two", "three"], "sleep": 1.0}), LogType="Tail")
out["failed"] = stream(name, js({"parts": ["a", "b"], "fail": True}))
out["buffered"] = stream(name, js({"buffered": True}))
# A version that is not the active one, three times: the first call starts its instance.
out["v1_stream"] = stream(name, js({"buffered": True}), Qualifier="1")
out["v1_number"] = invoke(name, {"buffered": True}, Qualifier="1")
out["alias"] = call(lam.create_alias, FunctionName=name, Name="old", FunctionVersion="1")
out["v1_alias"] = invoke(name + ":old", {"buffered": True})
out["active"] = invoke(name, {"buffered": True})
out["dry_run"] = lam.invoke_with_response_stream(FunctionName=name, InvocationType="DryRun",
    Payload=b"{}")["StatusCode"]
out["missing"] = call(lam.invoke_with_response_stream, FunctionName="no-such-function",
    Payload=b"{}")
out["bad_json"] = call(lam.invoke_with_response_stream, FunctionName=name, Payload=b"{not json")
out["exec"] = stream(cfg["exec"], b"go")
out["exec_fail"] = stream(cfg["exec"], b"fail")
out["timeout"] = stream(name, js({"parts": ["late"], "hang": 30}))
print(json.dumps(out, default=str))
"#;

/// One stream's chunks and its InvokeComplete.
fn chunks_of(v: &Value) -> (Vec<String>, Vec<f64>, Value) {
    let events = v["events"].as_array().cloned().unwrap_or_default();
    let (mut chunks, mut at, mut complete) = (Vec::new(), Vec::new(), Value::Null);
    for (i, e) in events.iter().enumerate() {
        if let Some(c) = e["chunk"].as_str() {
            assert!(complete.is_null(), "a chunk after InvokeComplete: {v:#}");
            chunks.push(c.to_string());
            at.push(e["at"].as_f64().unwrap_or(0.0));
        } else {
            assert_eq!(
                i,
                events.len() - 1,
                "InvokeComplete is the last event: {v:#}"
            );
            complete = e["complete"].clone();
        }
    }
    assert!(complete.is_object(), "no InvokeComplete: {v:#}");
    (chunks, at, complete)
}

/// `PART|INSTANCE|VERSION|TIME` of the streaming bootstrap.
fn fields(chunk: &str) -> (String, String, String, f64) {
    let f: Vec<&str> = chunk.split('|').collect();
    assert_eq!(f.len(), 4, "{chunk:?}");
    (
        f[0].into(),
        f[1].into(),
        f[2].into(),
        f[3].parse().expect("a time"),
    )
}

#[test]
fn invoke_with_response_stream_passes_chunks_on_as_they_come() {
    let agent = Agent::start("cp-stream");
    let clients = Clients::new(&agent);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = STREAMING_BOOTSTRAP.as_bytes();
    let (zip, zip2) = two_zips(dir.path(), bin);
    // An exec-mode function: each line a write of its own, a second apart, with its time.
    let exec = common::agent::Fixture::sh(
        "exec-stream",
        "timeout_s = 10",
        r#"input=$(cat)
case "$input" in *fail*) echo partial; exit 3;; esac
echo "one $(date +%s.%N)"; sleep 1; echo "two $(date +%s.%N)"; sleep 1; echo "three $(date +%s.%N)""#,
    );
    agent.deploy(exec.path());
    let r = clients.boto3(
        STREAM_SCRIPT,
        json!({ "name": "streamer", "zip": zip, "zip2": zip2, "exec": "exec-stream" }),
    );
    let ctx = format!("{r:#}\n--- agent log ---\n{}", agent.log());
    assert_eq!(r["update"]["Version"], "2", "{ctx}");

    // Three writes a second apart: three PayloadChunk events, the first read by the caller
    // before the function wrote the last (the agent passes chunks on, it does not buffer).
    let s = &r["streamed"];
    assert_eq!(s["status"], 200, "{ctx}");
    assert_eq!(s["version"], "2", "{ctx}");
    assert_eq!(
        s["content_type"], "application/vnd.amazon.eventstream",
        "{ctx}"
    );
    let (chunks, at, complete) = chunks_of(s);
    let parts: Vec<(String, String, String, f64)> = chunks.iter().map(|c| fields(c)).collect();
    let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["one", "two", "three"], "{ctx}");
    assert!(
        at[0] < parts[2].3,
        "the first chunk arrived at {} but the last was written at {}: {ctx}",
        at[0],
        parts[2].3
    );
    assert!(complete.get("ErrorCode").is_none(), "{ctx}");
    let log = complete["LogResult"].as_str().expect("LogResult with Tail");
    let log = base64_decode(log);
    assert!(log.contains("REPORT RequestId"), "{log}");

    // An error in the trailers after some output ends the stream with its type.
    let (chunks, _, complete) = chunks_of(&r["failed"]);
    let names: Vec<String> = chunks.iter().map(|c| fields(c).0).collect();
    assert_eq!(names, ["a", "b"], "{ctx}");
    assert_eq!(complete["ErrorCode"], "Stream.Fail", "{ctx}");
    assert!(
        complete["ErrorDetails"]
            .as_str()
            .is_some_and(|d| d.contains("failed mid-stream")),
        "{ctx}"
    );
    assert!(complete.get("LogResult").is_none(), "no Tail asked: {ctx}");

    // A buffered answer is one chunk.
    let (chunks, _, complete) = chunks_of(&r["buffered"]);
    assert_eq!(chunks.len(), 1, "{ctx}");
    let b: Value = serde_json::from_str(&chunks[0]).expect("the buffered answer");
    assert_eq!(b["version"], "2", "{ctx}");
    assert_eq!(complete, json!({}), "{ctx}");

    // Version 1 (not the active one) by Qualifier, by number and through an alias: one
    // instance, started by the first call and kept warm for the next ones.
    assert_eq!(r["v1_stream"]["version"], "1", "{ctx}");
    let (chunks, _, _) = chunks_of(&r["v1_stream"]);
    let v1: Value = serde_json::from_str(&chunks[0]).expect("version 1's answer");
    assert_eq!(v1["version"], "1", "{ctx}");
    for call in ["v1_number", "v1_alias"] {
        assert_eq!(r[call]["version"], "1", "{call}: {ctx}");
        assert_eq!(
            r[call]["payload"]["instance"], v1["instance"],
            "{call} started another instance of version 1: {ctx}"
        );
    }
    assert_eq!(r["active"]["version"], "2", "{ctx}");
    assert_eq!(r["active"]["payload"]["instance"], b["instance"], "{ctx}");
    assert_ne!(r["active"]["payload"]["instance"], v1["instance"], "{ctx}");

    // Refused before running: Lambda's errors, not events.
    assert_eq!(r["dry_run"], 204, "{ctx}");
    assert_eq!(
        error_of(&r["missing"]).0,
        "ResourceNotFoundException",
        "{ctx}"
    );
    assert_eq!(
        error_of(&r["bad_json"]).0,
        "InvalidRequestContentException",
        "{ctx}"
    );

    // An exec function's stdout as it writes it.
    let e = &r["exec"];
    assert_eq!(e["status"], 200, "{ctx}");
    let (chunks, at, complete) = chunks_of(e);
    let all = chunks.concat();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 3, "{ctx}");
    let written: Vec<f64> = lines
        .iter()
        .map(|l| {
            l.split(' ')
                .nth(1)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0)
        })
        .collect();
    assert!(chunks.len() >= 2, "one second apart, in one chunk: {ctx}");
    assert!(
        at[0] < written[2],
        "the first output arrived at {} but the last was written at {}: {ctx}",
        at[0],
        written[2]
    );
    assert_eq!(complete, json!({}), "{ctx}");
    let (chunks, _, complete) = chunks_of(&r["exec_fail"]);
    assert_eq!(chunks.concat(), "partial\n", "{ctx}");
    assert_eq!(complete["ErrorCode"], "Runtime.ExitError", "{ctx}");
    assert!(
        complete["ErrorDetails"]
            .as_str()
            .is_some_and(|d| d.contains("exit status 3")),
        "{ctx}"
    );

    // A timeout after some output: the chunk, then Sandbox.Timedout.
    let (chunks, _, complete) = chunks_of(&r["timeout"]);
    let names: Vec<String> = chunks.iter().map(|c| fields(c).0).collect();
    assert_eq!(names, ["late"], "{ctx}");
    assert_eq!(complete["ErrorCode"], "Sandbox.Timedout", "{ctx}");
    assert!(agent.is_running());
    agent.finish();
}

/// The `aws-sdk-lambda` fixture's JSON lines, by their `step`.
fn sdk_steps(o: &Output) -> std::collections::BTreeMap<String, Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}: {}", show(o)));
            let step = v["step"].as_str().expect("a step").to_owned();
            (step, v)
        })
        .collect()
}

/// AWS's Rust SDK (a plain-HTTP hyper client, signed with a key from `fnlet keys create`):
/// create from a zip holding a provided.al2023 `bootstrap`, wait for Active, invoke, update
/// code with Publish, list versions, alias and invoke through it, page through ListFunctions,
/// delete, and read the deleted function (ResourceNotFoundException, 404).
#[test]
fn the_rust_aws_sdk_manages_and_invokes_functions() {
    let agent = Agent::start("cp-sdk");
    let clients = Clients::new(&agent);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = bootstrap();
    let (zip, zip2) = two_zips(dir.path(), &bin);
    let event = json!({"from": "aws-sdk-lambda", "n": [1, 2, 3]});
    let o = std::process::Command::new(common::aws_sdk_lambda())
        .arg(agent.base_url())
        .args(["rusty", &zip, &zip2, &event.to_string()])
        .env("AWS_ACCESS_KEY_ID", &clients.key)
        .env("AWS_SECRET_ACCESS_KEY", &clients.secret)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run fixture-aws-sdk-lambda");
    assert!(
        o.status.success(),
        "the aws-sdk-lambda client failed: {}",
        show(&o)
    );
    let r = sdk_steps(&o);
    let ctx = show(&o);
    let arn = "arn:aws:lambda:us-east-1:000000000000:function:rusty";

    let c = &r["create"];
    assert_eq!(c["FunctionName"], "rusty", "{ctx}");
    assert_eq!(c["FunctionArn"], arn, "{ctx}");
    assert_eq!(c["Runtime"], "provided.al2023", "{ctx}");
    assert_eq!(c["Handler"], "bootstrap", "{ctx}");
    assert_eq!(c["MemorySize"], 128, "{ctx}");
    assert_eq!(c["Description"], "made by aws-sdk-lambda", "{ctx}");
    assert_eq!(c["Version"], "$LATEST", "{ctx}");
    // One agent: stored when the call answers, so the first GetFunction sees Active.
    assert_eq!(c["State"], "Active", "{ctx}");
    assert_eq!(
        r["wait_active"]["states"],
        json!(["Active/Successful"]),
        "{ctx}"
    );

    // The event went through the SDK's Invoke to the function and back.
    let i = &r["invoke"];
    assert_eq!(i["status"], 200, "{ctx}");
    assert!(i["function_error"].is_null(), "{ctx}");
    assert_eq!(i["executed_version"], "1", "{ctx}");
    assert_eq!(i["payload"]["echo"], event, "{ctx}");
    assert_eq!(i["payload"]["function"], "rusty", "{ctx}");
    assert_eq!(i["payload"]["memory"], "128", "{ctx}");
    assert_eq!(i["payload"]["invoked_function_arn"], arn, "{ctx}");

    // UpdateFunctionCode with Publish: new code as version 2, the configuration kept.
    let u = &r["update_code"];
    assert_eq!(u["Version"], "2", "{ctx}");
    assert_eq!(u["MemorySize"], 128, "{ctx}");
    assert_ne!(u["CodeSha256"], c["CodeSha256"], "{ctx}");
    assert_eq!(
        r["wait_updated"]["states"]
            .as_array()
            .and_then(|s| s.last()),
        Some(&json!("Active/Successful")),
        "{ctx}"
    );
    let versions: Vec<&str> = r["versions"]["Versions"]
        .as_array()
        .expect("Versions")
        .iter()
        .filter_map(|v| v["Version"].as_str())
        .collect();
    assert_eq!(versions, ["$LATEST", "1", "2"], "{ctx}");
    assert_eq!(
        r["versions"]["Versions"][2]["CodeSha256"], u["CodeSha256"],
        "{ctx}"
    );

    // The alias runs the published version (X-Amz-Executed-Version).
    let a = &r["create_alias"];
    assert_eq!(a["AliasArn"], format!("{arn}:live").as_str(), "{ctx}");
    assert_eq!(a["FunctionVersion"], "2", "{ctx}");
    let ia = &r["invoke_alias"];
    assert_eq!(ia["status"], 200, "{ctx}");
    assert!(ia["function_error"].is_null(), "{ctx}");
    assert_eq!(ia["executed_version"], "2", "{ctx}");
    assert_eq!(ia["payload"]["echo"], event, "{ctx}");
    // The Lambda context names the function as the caller did: with the alias.
    assert_eq!(
        ia["payload"]["invoked_function_arn"],
        format!("{arn}:live").as_str(),
        "{ctx}"
    );

    // ListFunctions one a page, by name, following NextMarker to the end.
    assert_eq!(r["list"]["pages"], json!([["rusty"], ["rusty-b"]]), "{ctx}");

    // Deleted: the SDK reads GetFunction's 404 as its ResourceNotFoundException.
    assert_eq!(r["delete"]["deleted"], "rusty", "{ctx}");
    assert_eq!(r["delete_other"]["deleted"], "rusty-b", "{ctx}");
    let g = &r["get_deleted"];
    assert_eq!(g["error"], "ResourceNotFoundException", "{ctx}");
    assert_eq!(g["http"], 404, "{ctx}");
    assert_eq!(g["is_resource_not_found"], true, "{ctx}");
    let listed = agent.admin(Method::GET, "/v1/functions", None).json();
    assert_eq!(listed["functions"], json!([]), "{ctx}");
    assert!(agent.is_running());
    agent.finish();
}

fn base64_decode(s: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64");
    String::from_utf8_lossy(&b).into_owned()
}
