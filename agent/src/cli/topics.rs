//! `fnlet publish` and `fnlet topics`: events sent to a topic, and the topics with their
//! subscribers and counts.

use std::process::ExitCode;

use clap::Args;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde_json::Value;

use super::client::Client;
use super::functions::{
    CmdResult, ConnArgs, OutputArgs, block_on, print_json, print_text, read_input, run_client,
    table,
};

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The topic (1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-').
    #[arg(value_name = "TOPIC", value_parser = parse_topic)]
    topic: String,
    /// The event's data: DATA as is, @FILE for a file's contents, @- for stdin.
    #[arg(short = 'd', long = "data", value_name = "DATA|@FILE|@-")]
    data: Option<String>,
    /// The CloudEvent's type. With --type, --source, --subject or --id the event is sent in
    /// binary mode (ce-* headers); without, the data is wrapped by the agent (type
    /// fnlet.publish, source /v1/topics/TOPIC, a new id).
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// The CloudEvent's source [default with --type: fnlet-cli].
    #[arg(long, value_name = "URI")]
    source: Option<String>,
    /// The CloudEvent's subject.
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<String>,
    /// The CloudEvent's id [default: a new one]. The same source and id published again within
    /// the agent's dedup window is not delivered again.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// The data's media type.
    #[arg(long, value_name = "TYPE", default_value = "application/json")]
    content_type: String,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

fn parse_topic(s: &str) -> Result<String, String> {
    if crate::triggers::manifest::valid_topic(s) {
        Ok(s.to_string())
    } else {
        Err("a topic is 1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-'".into())
    }
}

/// What a binary-mode header value must escape (the CloudEvents HTTP binding: controls, space,
/// '"', '%' and everything outside ASCII).
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

fn new_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = t.to_le_bytes();
    }
    hex::encode(b)
}

/// The headers of the publish: binary mode's `ce-*` when an attribute was given.
fn headers(a: &PublishArgs) -> Vec<(String, String)> {
    let mut h = vec![("content-type".to_string(), a.content_type.clone())];
    if a.event_type.is_none() && a.source.is_none() && a.subject.is_none() && a.id.is_none() {
        return h;
    }
    let id = a.id.clone().unwrap_or_else(new_id);
    let attrs = [
        ("specversion", Some("1.0".to_string())),
        ("id", Some(id)),
        (
            "type",
            Some(
                a.event_type
                    .clone()
                    .unwrap_or_else(|| "fnlet.publish".into()),
            ),
        ),
        (
            "source",
            Some(a.source.clone().unwrap_or_else(|| "fnlet-cli".into())),
        ),
        ("subject", a.subject.clone()),
    ];
    for (k, v) in attrs {
        if let Some(v) = v {
            h.push((
                format!("ce-{k}"),
                utf8_percent_encode(&v, HEADER_VALUE).to_string(),
            ));
        }
    }
    h
}

pub fn run_publish(a: PublishArgs) -> ExitCode {
    run_client(&a.conn, None, |c| block_on(publish(c, &a)))
}

pub fn run_topics(a: TopicsArgs) -> ExitCode {
    run_client(&a.conn, None, |c| block_on(list(c, a.output.json)))
}

async fn publish(client: &Client, a: &PublishArgs) -> CmdResult {
    let body = read_input(a.data.as_deref())?;
    let v = client.publish(&a.topic, body, &headers(a)).await?;
    if a.output.json {
        return print_json(&v);
    }
    print_text(&publish_text(&a.topic, &v))
}

fn publish_text(topic: &str, v: &Value) -> String {
    let mut out = String::new();
    for e in v["events"].as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or("-");
        let deliveries = e["deliveries"].as_array().map_or(&[][..], Vec::as_slice);
        if e["duplicate"] == true {
            out.push_str(&format!(
                "event {id} on {topic}: a duplicate (published within the dedup window), not delivered again\n"
            ));
            continue;
        }
        out.push_str(&format!(
            "event {id} on {topic}: {} subscriber{}{}\n",
            deliveries.len(),
            if deliveries.len() == 1 { "" } else { "s" },
            match e["filtered"].as_u64() {
                Some(n) if n > 0 => format!(" ({n} filtered out)"),
                _ => String::new(),
            }
        ));
        for d in deliveries {
            out.push_str(&format!(
                "  {}  request {}\n",
                d["function"].as_str().unwrap_or("-"),
                d["request_id"].as_str().unwrap_or("-")
            ));
        }
    }
    out
}

/// One filter as the manifest writes it: `type=order.created`, `type^=order.`.
fn filter_text(filter: &Value) -> String {
    let Some(m) = filter.as_object().filter(|m| !m.is_empty()) else {
        return "*".into();
    };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}^={}", other["prefix"].as_str().unwrap_or("")),
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn list(client: &Client, json: bool) -> CmdResult {
    let v = client.topics().await?;
    if json {
        return print_json(&v);
    }
    let rows: Vec<Vec<String>> = v["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let access = match (t["public"] == true, t["signed"] == true) {
                (true, true) => "public (signed)",
                (true, false) => "public",
                _ => "key or token",
            };
            let subs: Vec<String> = t["subscribers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let filters: Vec<String> = s["filters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(filter_text)
                        .collect();
                    format!(
                        "{}[{}]",
                        s["function"].as_str().unwrap_or("-"),
                        filters.join(" | ")
                    )
                })
                .collect();
            let n = |k: &str| t["counts"][k].as_u64().unwrap_or(0).to_string();
            vec![
                t["topic"].as_str().unwrap_or("-").to_string(),
                access.to_string(),
                if subs.is_empty() {
                    "-".into()
                } else {
                    subs.join(" ")
                },
                n("published"),
                n("delivered"),
                n("filtered"),
                n("duplicates"),
            ]
        })
        .collect();
    if rows.is_empty() {
        return print_text(
            "no topics: a function subscribes with [[triggers]] topic = \"NAME\" in its fnlet.toml\n",
        );
    }
    print_text(&table(
        &[
            "TOPIC",
            "PUBLISH",
            "SUBSCRIBERS [FILTERS]",
            "PUBLISHED",
            "DELIVERED",
            "FILTERED",
            "DUPLICATES",
        ],
        &rows,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_mode_only_when_an_attribute_is_given() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: PublishArgs,
        }
        let a = T::parse_from(["t", "orders", "-d", "{}"]).a;
        assert_eq!(
            headers(&a),
            [("content-type".into(), "application/json".into())]
        );
        let a = T::parse_from([
            "t",
            "orders",
            "--type",
            "order.created",
            "--id",
            "a b%",
            "--subject",
            "é",
        ])
        .a;
        let h = headers(&a);
        assert!(h.contains(&("ce-id".into(), "a%20b%25".into())), "{h:?}");
        assert!(h.contains(&("ce-type".into(), "order.created".into())));
        assert!(h.contains(&("ce-source".into(), "fnlet-cli".into())));
        assert!(h.contains(&("ce-subject".into(), "%C3%A9".into())));
        assert!(h.contains(&("ce-specversion".into(), "1.0".into())));
    }

    #[test]
    fn filters_read_as_written() {
        let f = serde_json::json!({"type": {"prefix": "order."}, "source": "shop"});
        assert_eq!(filter_text(&f), "source=shop,type^=order.");
        assert_eq!(filter_text(&serde_json::json!({})), "*");
    }
}
