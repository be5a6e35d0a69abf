//! `fnlet cluster` (make a cluster, join tokens) and `fnlet members`, through the agent's
//! admin API.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Deserialize;

use super::client::Client;
use super::functions::{
    CmdResult, ConnArgs, OutputArgs, block_on, print_json, print_text, run_client, table, typed,
};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster with the local agent as its first member; print a join token.
    ///
    /// The agent makes the cluster CA (its key never leaves this host), its own certificate,
    /// and opens its QUIC endpoint ([cluster] listen, default 127.0.0.1:8741: set it to an
    /// address the other hosts reach). The token is printed alone on one line of stdout; other
    /// hosts join with `fnlet agent --join ADDR:PORT --token TOKEN`.
    #[command(after_help = admin_examples!(
        "fnlet cluster init",
        "TOKEN=$(fnlet cluster init --ttl 2h)"
    ))]
    Init(TokenArgs),
    /// Print another join token (on the host that ran `fnlet cluster init`).
    #[command(after_help = admin_examples!(
        "fnlet cluster token",
        "fnlet cluster token --ttl 30m"
    ))]
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// How long the token can be used to join.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (for example 30m, 24h, 7d)"))?;
    if d < Duration::from_secs(1) {
        return Err("at least 1s".into());
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct MembersArgs {
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Deserialize)]
struct Token {
    token: String,
    #[serde(default)]
    peer_addr: String,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    addr: String,
    state: String,
    incarnation: u64,
    #[serde(default)]
    rtt_ms: Option<f64>,
    #[serde(default)]
    load: u64,
    #[serde(default)]
    this_host: bool,
}

#[derive(Deserialize)]
struct Members {
    members: Vec<Member>,
}

pub fn run(cmd: ClusterCommand) -> ExitCode {
    match cmd {
        ClusterCommand::Init(a) => run_client(&a.conn, None, |c| {
            block_on(token(c, a.ttl, a.output.json, true))
        }),
        ClusterCommand::Token(a) => run_client(&a.conn, None, |c| {
            block_on(token(c, a.ttl, a.output.json, false))
        }),
    }
}

pub fn run_members(a: MembersArgs) -> ExitCode {
    run_client(&a.conn, None, |c| block_on(members(c, a.output.json)))
}

/// The token alone on stdout (scripts take it with `$(...)`); how to use it on stderr.
async fn token(client: &Client, ttl: Duration, json: bool, init: bool) -> CmdResult {
    let v = if init {
        client.cluster_init(ttl.as_secs()).await?
    } else {
        client.cluster_token(ttl.as_secs()).await?
    };
    if json {
        return print_json(&v);
    }
    let t: Token = typed(client, v)?;
    eprintln!(
        "Join other hosts with (valid {}):\n  fnlet agent --join {} --token <the token below>",
        humantime::format_duration(ttl),
        if t.peer_addr.is_empty() {
            "ADDR:PORT"
        } else {
            &t.peer_addr
        }
    );
    print_text(&format!("{}\n", t.token))
}

async fn members(client: &Client, json: bool) -> CmdResult {
    let v = client.members().await?;
    if json {
        // The array alone: `fnlet members --json | jq '.[] | select(.state != "alive")'`.
        return print_json(&v["members"]);
    }
    let m: Members = typed(client, v)?;
    let rows: Vec<Vec<String>> = m
        .members
        .iter()
        .map(|m| {
            vec![
                if m.this_host {
                    format!("{} (this host)", m.id)
                } else {
                    m.id.clone()
                },
                m.addr.clone(),
                m.state.clone(),
                m.incarnation.to_string(),
                m.load.to_string(),
                m.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
            ]
        })
        .collect();
    print_text(&table(
        &["ID", "ADDRESS", "STATE", "INCARNATION", "LOAD", "RTT"],
        &rows,
    ))
}
