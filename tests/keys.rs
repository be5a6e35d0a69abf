//! `fnlet keys` end to end: the real CLI against the real agent makes, lists and removes access
//! keys; the secret is shown once, kept across a restart, and appears nowhere in clear: not
//! under the state dir, not in the agent's log, not in a listing.

mod common;

use std::path::{Path, PathBuf};

use common::agent::Agent;
use reqwest::Method;
use serde_json::Value;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "fnlet failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read state dir") {
            let p = e.expect("dir entry").path();
            let t = std::fs::symlink_metadata(&p).expect("stat");
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let data = std::fs::read(&p).expect("read file");
                if data.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

fn ids(list: &Value) -> Vec<String> {
    list["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys: {list}"))
        .iter()
        .map(|k| k["access_key_id"].as_str().expect("an id").to_string())
        .collect()
}

#[test]
fn keys_are_made_listed_and_removed_and_their_secrets_stay_sealed() {
    let mut agent = Agent::start("keys");

    let empty = agent.cli(&["keys", "ls"]);
    assert!(empty.status.success(), "{}", stderr(&empty));
    assert!(
        stdout(&empty).contains("no access keys"),
        "{}",
        stdout(&empty)
    );

    // Made with the CLI: the id and the secret, once.
    let made = json(&agent.cli(&["keys", "create", "--description", "ci deploys", "--json"]));
    let id = made["access_key_id"]
        .as_str()
        .expect("access_key_id")
        .to_string();
    let secret = made["secret_access_key"]
        .as_str()
        .expect("secret_access_key")
        .to_string();
    assert_eq!(made["description"], "ci deploys", "{made}");
    assert!(id.len() == 20 && id.starts_with("FNLT"), "{id}");
    assert!(
        secret.len() == 40 && secret.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret}"
    );

    // The text form shows the secret and how the AWS tools take it.
    let text = agent.cli(&["keys", "create"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let out = stdout(&text);
    assert!(out.contains("aws_secret_access_key = "), "{out}");
    assert!(out.contains("export AWS_ACCESS_KEY_ID=FNLT"), "{out}");
    assert!(
        out.contains(&format!("--endpoint-url {}", agent.base_url())),
        "{out}"
    );
    let second = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Access key id:"))
        .expect("the id line")
        .trim()
        .to_string();

    // Listed, never with a secret.
    let list = agent.cli(&["keys", "ls", "--json"]);
    let listed = json(&list);
    assert_eq!(ids(&listed), [id.clone(), second.clone()]);
    assert!(!stdout(&list).contains(&secret));
    assert!(!stdout(&list).contains("secret"), "{listed}");
    assert_eq!(listed["keys"][0]["last_used"], Value::Null, "{listed}");
    let table = stdout(&agent.cli(&["keys", "ls"]));
    assert!(
        table.contains(&id) && table.contains("ci deploys") && table.contains("never"),
        "{table}"
    );

    // The API needs the admin token.
    agent
        .request(Method::GET, "/v1/keys", false, None)
        .expect_error(401, "unauthorized");
    agent
        .request(Method::POST, "/v1/keys", false, None)
        .expect_error(401, "unauthorized");
    agent
        .admin(
            Method::POST,
            "/v1/keys",
            Some(br#"{"description": "a\nb"}"#),
        )
        .expect_error(400, "bad_request");
    agent
        .admin(Method::POST, "/v1/keys", Some(br#"{"nope": 1}"#))
        .expect_error(400, "bad_request");

    // Kept sealed across a restart: the same keys come back.
    agent.stop();
    agent.restart();
    assert_eq!(
        ids(&json(&agent.cli(&["keys", "ls", "--json"]))),
        [id.clone(), second.clone()]
    );

    // Removed: gone from the listing, and a second removal is a 404 with a hint.
    let rm = agent.cli(&["keys", "rm", &second]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert_eq!(stdout(&rm).trim(), format!("removed access key {second}"));
    assert_eq!(
        ids(&json(&agent.cli(&["keys", "ls", "--json"]))),
        vec![id.clone()]
    );
    let again = agent.cli(&["keys", "rm", &second]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("not_found"), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("fnlet keys ls"),
        "{}",
        stderr(&again)
    );
    agent
        .admin(Method::DELETE, &format!("/v1/keys/{second}"), None)
        .expect_error(404, "not_found");
    agent
        .admin(Method::DELETE, "/v1/keys/not-a-key", None)
        .expect_error(404, "not_found");
    // A malformed id never reaches the agent.
    let bad = agent.cli(&["keys", "rm", "AKIAIOSFODNN7EXAMPLE"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));

    // The master key is the agent's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.state_dir().join("keys.key"))
        .expect("keys.key in the state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "keys.key mode {mode:o}");

    let state = agent.state_dir();
    let log = agent.log_path();
    agent.stop();
    // The secret is nowhere in clear: not in the state dir (database, master key, logs), not
    // in what the agent logged. The id is logged (and stored) as it should be.
    assert_eq!(
        files_containing(&state, secret.as_bytes()),
        Vec::<PathBuf>::new(),
        "the secret in clear under the state dir"
    );
    let logged = std::fs::read_to_string(&log).expect("agent log");
    assert!(!logged.contains(&secret), "the secret in the agent's log");
    assert!(logged.contains(&id), "key creation not logged:\n{logged}");
    assert!(!files_containing(&state, id.as_bytes()).is_empty());
    agent.assert_clean();
}
