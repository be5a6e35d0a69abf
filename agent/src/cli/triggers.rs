//! `fnlet triggers [NAME]`: every trigger of every function, through the agent's admin API.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::client::Client;
use super::functions::{
    CmdResult, ConnArgs, OutputArgs, block_on, print_json, print_text, run_client, table,
};

#[derive(Debug, Args)]
pub struct TriggersArgs {
    /// Only this function's triggers.
    name: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

pub fn run(a: TriggersArgs) -> ExitCode {
    let hint = a
        .name
        .as_ref()
        .map(|_| "hint: `fnlet ls` lists the deployed functions".to_string());
    run_client(&a.conn, hint, |c| {
        block_on(triggers(c, a.name.as_deref(), a.output.json))
    })
}

async fn triggers(client: &Client, name: Option<&str>, json: bool) -> CmdResult {
    let v = client.triggers(name).await?;
    if json {
        return print_json(&v);
    }
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let list = v["triggers"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let schedules: Vec<&Value> = list.iter().filter(|t| t["type"] == "schedule").collect();
    if !schedules.is_empty() {
        let rows: Vec<Vec<String>> = schedules
            .iter()
            .map(|t| {
                let last = match &t["last_fired"] {
                    Value::Null => "-".to_string(),
                    l => format!("{} by {}", s(&l["tick"]), s(&l["fired_by"])),
                };
                let owner = if t["owned_here"] == true {
                    format!("{} (this host)", s(&t["owner"]))
                } else {
                    s(&t["owner"])
                };
                vec![
                    s(&t["function"]),
                    s(&t["expression"]),
                    s(&t["timezone"]),
                    t["next"]
                        .as_array()
                        .and_then(|n| n.first())
                        .map_or("-".into(), s),
                    last,
                    owner,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "FUNCTION",
                "SCHEDULE",
                "ZONE",
                "NEXT",
                "LAST FIRED",
                "OWNER",
            ],
            &rows,
        ));
        for t in &schedules {
            out.push_str(&format!(
                "\n{} {} ({}), next fire times:\n",
                s(&t["function"]),
                s(&t["expression"]),
                s(&t["id"])
            ));
            let utc = t["next"].as_array().cloned().unwrap_or_default();
            let local = t["next_local"].as_array().cloned().unwrap_or_default();
            for (u, l) in utc.iter().zip(local.iter()) {
                out.push_str(&format!("  {}  {}\n", s(u), s(l)));
            }
        }
    }
    let topics: Vec<&Value> = list.iter().filter(|t| t["type"] == "topic").collect();
    if !topics.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let rows: Vec<Vec<String>> = topics
            .iter()
            .map(|t| {
                let filter = t["filter"]
                    .as_object()
                    .filter(|f| !f.is_empty())
                    .map_or("-".to_string(), |f| Value::Object(f.clone()).to_string());
                vec![s(&t["function"]), s(&t["topic"]), filter]
            })
            .collect();
        out.push_str(&table(&["FUNCTION", "TOPIC", "FILTER"], &rows));
    }
    if out.is_empty() {
        out = "no triggers\n".into();
    }
    print_text(&out)
}
