//! `fnlet keys`: the access keys that sign Lambda Invoke API calls (AWS Signature Version 4),
//! made, listed and removed through the agent's admin API.

use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use serde::Deserialize;

use super::client::Client;
use super::functions::{
    CmdResult, ConnArgs, OutputArgs, age, block_on, print_json, print_text, run_client, table,
    typed,
};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make an access key and print its id and secret (the secret is shown this once).
    ///
    /// Callers sign Lambda Invoke API calls (`aws lambda invoke`, boto3, any AWS SDK pointed
    /// at the agent with an endpoint URL) with the key; functions that are not `public` refuse
    /// unsigned calls. The agent keeps the secret sealed and never shows it again. In a
    /// cluster the key works on every member.
    #[command(after_help = admin_examples!(
        "fnlet keys create --description \"ci deploys\"",
        "fnlet keys create --json | jq -r .secret_access_key"
    ))]
    Create(CreateArgs),

    /// List the access keys: id, description, when made and last used (never the secrets).
    #[command(visible_alias = "list", after_help = admin_examples!(
        "fnlet keys ls",
        "fnlet keys ls --json | jq -r '.keys[].access_key_id'"
    ))]
    Ls(LsArgs),

    /// Remove an access key: calls it signs are refused from then on (in a cluster, on every
    /// member).
    #[command(visible_alias = "remove", after_help = admin_examples!(
        "fnlet keys rm FNLTABCDEFGHIJKLMNOP"
    ))]
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the key is for (shown by `fnlet keys ls`).
    #[arg(short, long, value_name = "TEXT")]
    description: Option<String>,
    /// What the key may sign: invoke (calls only), deploy (calls and Lambda's control plane:
    /// create, update, delete, aliases...) or admin (everything).
    #[arg(long, value_name = "SCOPE", default_value = "admin", value_parser = ["invoke", "deploy", "admin"])]
    scope: String,
    /// Limit the key to functions whose names match PATTERN (`*` matches any run of
    /// characters); repeat for more. Without it: every function.
    #[arg(long = "function", value_name = "PATTERN")]
    functions: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The access key id (FNLT and 16 more characters).
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: String,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

fn parse_id(s: &str) -> Result<String, String> {
    if crate::auth::keys::valid_id(s) {
        Ok(s.to_string())
    } else {
        Err(
            "access key ids are FNLT and 16 characters of A-Z and 2-7 (`fnlet keys ls` lists them)"
                .into(),
        )
    }
}

/// `AccessKey` in the API.
#[derive(Debug, Clone, Deserialize)]
struct KeyInfo {
    access_key_id: String,
    #[serde(default)]
    description: String,
    created_at: String,
    #[serde(default)]
    last_used: Option<String>,
}

/// `NewAccessKey` in the API.
#[derive(Debug, Clone, Deserialize)]
struct NewKey {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    description: String,
}

pub fn run(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::Create(a) => run_client(&a.conn, None, |c| {
            block_on(create(
                c,
                a.description.as_deref(),
                &a.scope,
                &a.functions,
                a.output.json,
            ))
        }),
        KeysCommand::Ls(a) => run_client(&a.conn, None, |c| block_on(list(c, a.output.json))),
        KeysCommand::Rm(a) => run_client(
            &a.conn,
            Some("hint: `fnlet keys ls` lists the access keys".into()),
            |c| {
                block_on(async {
                    c.remove_key(&a.id).await?;
                    if !a.output.json {
                        println!("removed access key {}", a.id);
                    }
                    Ok(())
                })
            },
        ),
    }
}

async fn create(
    client: &Client,
    description: Option<&str>,
    scope: &str,
    functions: &[String],
    json: bool,
) -> CmdResult {
    let v = client.create_key(description, scope, functions).await?;
    if json {
        return print_json(&v);
    }
    let key: NewKey = typed(client, v)?;
    print_text(&create_text(&key, client.endpoint()))
}

/// What `keys create` prints: the key, and how the AWS tools use it.
fn create_text(k: &NewKey, endpoint: &str) -> String {
    let (id, secret) = (&k.access_key_id, &k.secret_access_key);
    let about = if k.description.is_empty() {
        String::new()
    } else {
        format!(" ({:?})", k.description)
    };
    format!(
        "\
Created access key {id}{about}.

  Access key id:      {id}
  Secret access key:  {secret}

The secret is shown this once: the agent keeps it sealed and cannot show it again.

For the AWS CLI and SDKs, in ~/.aws/credentials:

  [fnlet]
  aws_access_key_id = {id}
  aws_secret_access_key = {secret}

and in ~/.aws/config (any region will do: fnlet ignores it, the SDKs want one):

  [profile fnlet]
  region = us-east-1

or in the environment:

  export AWS_ACCESS_KEY_ID={id}
  export AWS_SECRET_ACCESS_KEY={secret}
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1

Then invoke a function (AWS CLI v2; v1 takes --payload as is, without --cli-binary-format):

  aws lambda invoke --profile fnlet --endpoint-url {endpoint} \\
      --function-name NAME --cli-binary-format raw-in-base64-out --payload '{{}}' out.json

  import boto3
  lam = boto3.Session(profile_name=\"fnlet\").client(\"lambda\", endpoint_url=\"{endpoint}\")
  print(lam.invoke(FunctionName=\"NAME\", Payload=b\"{{}}\")[\"Payload\"].read())
"
    )
}

async fn list(client: &Client, json: bool) -> CmdResult {
    let v = client.keys().await?;
    if json {
        return print_json(&v);
    }
    #[derive(Deserialize)]
    struct Keys {
        keys: Vec<KeyInfo>,
    }
    let keys: Keys = typed(client, v)?;
    print_text(&keys_table(&keys.keys, SystemTime::now()))
}

fn keys_table(keys: &[KeyInfo], now: SystemTime) -> String {
    if keys.is_empty() {
        return "no access keys (make one with `fnlet keys create`)\n".into();
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.access_key_id.clone(),
                if k.description.is_empty() {
                    "-".into()
                } else {
                    k.description.clone()
                },
                age(&k.created_at, now),
                k.last_used
                    .as_deref()
                    .map_or_else(|| "never".into(), |t| age(t, now)),
            ]
        })
        .collect();
    table(&["ID", "DESCRIPTION", "CREATED", "LAST USED"], &rows)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[test]
    fn create_prints_the_secret_and_how_to_use_it() {
        let k = NewKey {
            access_key_id: "FNLTABCDEFGHIJKLMNOP".into(),
            secret_access_key: "s3cr3t".into(),
            description: "ci".into(),
        };
        let t = create_text(&k, "http://127.0.0.1:8740");
        assert!(
            t.starts_with("Created access key FNLTABCDEFGHIJKLMNOP (\"ci\").\n"),
            "{t}"
        );
        assert!(t.contains("aws_secret_access_key = s3cr3t\n"), "{t}");
        assert!(
            t.contains("export AWS_ACCESS_KEY_ID=FNLTABCDEFGHIJKLMNOP\n"),
            "{t}"
        );
        assert!(t.contains("export AWS_SECRET_ACCESS_KEY=s3cr3t\n"), "{t}");
        assert!(
            t.contains("--endpoint-url http://127.0.0.1:8740 \\\n"),
            "{t}"
        );
        assert!(t.contains("--payload '{}' out.json"), "{t}");
        assert!(t.contains("endpoint_url=\"http://127.0.0.1:8740\""), "{t}");
    }

    #[test]
    fn the_table() {
        let now = humantime::parse_rfc3339("2026-12-01T12:00:00Z").unwrap();
        assert!(keys_table(&[], now).starts_with("no access keys"));
        let keys = [
            KeyInfo {
                access_key_id: "FNLTAAAAAAAAAAAAAAAA".into(),
                description: "ci".into(),
                created_at: "2026-12-01T11:00:00Z".into(),
                last_used: Some("2026-12-01T11:59:00Z".into()),
            },
            KeyInfo {
                access_key_id: "FNLTBBBBBBBBBBBBBBBB".into(),
                description: String::new(),
                created_at: "2026-11-30T12:00:00Z".into(),
                last_used: None,
            },
        ];
        assert_eq!(
            keys_table(&keys, now + Duration::ZERO),
            "ID                    DESCRIPTION  CREATED  LAST USED\n\
             FNLTAAAAAAAAAAAAAAAA  ci           1h ago   1m ago\n\
             FNLTBBBBBBBBBBBBBBBB  -            1d ago   never\n"
        );
    }

    #[test]
    fn ids_are_checked_before_asking_the_agent() {
        let err = crate::cli::Cli::try_parse_from(["fnlet", "keys", "rm", "AKIA1234"]).unwrap_err();
        assert!(err.to_string().contains("FNLT"), "{err}");
        crate::cli::Cli::try_parse_from(["fnlet", "keys", "rm", "FNLTAAAAAAAAAAAAAAAA"]).unwrap();
        crate::cli::Cli::try_parse_from(["fnlet", "keys", "create", "-d", "x", "--json"]).unwrap();
        crate::cli::Cli::try_parse_from(["fnlet", "keys", "ls"]).unwrap();
    }
}
