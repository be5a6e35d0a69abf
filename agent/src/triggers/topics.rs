//! Topics: who subscribes (the `[[triggers]] topic` entries of the functions this host serves,
//! which in a cluster is the whole catalog), which events each subscriber takes (its filters),
//! webhook signatures, and the counts `fnlet topics` shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::cloudevent::CloudEvent;
use super::manifest::FilterMatch;
use crate::pool::Registry;

/// One function subscribed to a topic: it takes an event when any of its triggers on the
/// topic matches (a trigger matches when all of its filter's attributes do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subscriber {
    pub function: String,
    pub filters: Vec<BTreeMap<String, FilterMatch>>,
}

impl Subscriber {
    pub fn takes(&self, e: &CloudEvent) -> bool {
        self.filters.iter().any(|filter| {
            filter
                .iter()
                .all(|(attr, m)| e.attribute(attr).is_some_and(|v| m.matches(&v)))
        })
    }
}

/// Every topic with its subscribers, from the active versions' manifests.
pub fn all(registry: &Registry) -> BTreeMap<String, Vec<Subscriber>> {
    let mut out: BTreeMap<String, Vec<Subscriber>> = BTreeMap::new();
    for slot in registry.slots() {
        let f = slot.active();
        let mut by_topic: BTreeMap<&str, Vec<BTreeMap<String, FilterMatch>>> = BTreeMap::new();
        for t in &f.manifest.triggers {
            if let Some(topic) = &t.topic {
                by_topic.entry(topic).or_default().push(t.filter.clone());
            }
        }
        for (topic, filters) in by_topic {
            out.entry(topic.to_string()).or_default().push(Subscriber {
                function: f.name.clone(),
                filters,
            });
        }
    }
    for subs in out.values_mut() {
        subs.sort_by(|a, b| a.function.cmp(&b.function));
    }
    out
}

/// The subscribers of `topic`.
pub fn subscribers(registry: &Registry, topic: &str) -> Vec<Subscriber> {
    let mut out = Vec::new();
    for slot in registry.slots() {
        let f = slot.active();
        let filters: Vec<_> = f
            .manifest
            .triggers
            .iter()
            .filter(|t| t.topic.as_deref() == Some(topic))
            .map(|t| t.filter.clone())
            .collect();
        if !filters.is_empty() {
            out.push(Subscriber {
                function: f.name.clone(),
                filters,
            });
        }
    }
    out.sort_by(|a, b| a.function.cmp(&b.function));
    out
}

/// Whether `header` (`X-Hub-Signature-256: sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`, as GitHub and Gitea sign webhooks. Compared in constant time.
pub fn hub_signature_ok(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// A topic's counts since the agent started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Events accepted (duplicates included).
    pub published: u64,
    /// Async events made (one per subscriber that took an event).
    pub delivered: u64,
    /// Subscribers whose filters an event did not pass.
    pub filtered: u64,
    /// Events dropped as duplicates (same source and id within the window).
    pub duplicates: u64,
}

/// Counts per topic. Topics without subscribers share one entry (`""`), so callers cannot
/// grow the map without bound.
#[derive(Default)]
pub struct Stats(Mutex<HashMap<String, Counts>>);

impl Stats {
    pub fn add(&self, topic: &str, known: bool, f: impl FnOnce(&mut Counts)) {
        let key = if known { topic } else { "" };
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(key.to_string()).or_default());
    }

    pub fn get(&self, topic: &str) -> Counts {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(topic).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triggers::manifest::PrefixMatch;

    fn event(attrs: &[(&str, &str)]) -> CloudEvent {
        CloudEvent {
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                .collect(),
            data: super::super::cloudevent::Data::None,
        }
    }

    #[test]
    fn a_subscriber_takes_an_event_when_one_of_its_filters_matches_whole() {
        let s = Subscriber {
            function: "f".into(),
            filters: vec![
                BTreeMap::from([
                    (
                        "type".to_string(),
                        FilterMatch::Prefix(PrefixMatch {
                            prefix: "order.".into(),
                        }),
                    ),
                    ("source".to_string(), FilterMatch::Exact("shop".into())),
                ]),
                BTreeMap::from([("tenant".to_string(), FilterMatch::Exact("acme".into()))]),
            ],
        };
        assert!(s.takes(&event(&[("type", "order.created"), ("source", "shop")])));
        assert!(!s.takes(&event(&[("type", "order.created"), ("source", "shop2")])));
        assert!(!s.takes(&event(&[("type", "invoice"), ("source", "shop")])));
        // An extension the event lacks does not match; the second filter on it does.
        assert!(s.takes(&event(&[("type", "x"), ("tenant", "acme")])));
        assert!(!s.takes(&event(&[("type", "x")])));
        let all = Subscriber {
            function: "g".into(),
            filters: vec![BTreeMap::new()],
        };
        assert!(all.takes(&event(&[("type", "anything")])));
    }

    #[test]
    fn hub_signatures() {
        // GitHub's documented example: secret "It's a Secret to Everybody", payload
        // "Hello, World!".
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(hub_signature_ok(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(sig)
        ));
        assert!(!hub_signature_ok(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            Some(sig)
        ));
        assert!(!hub_signature_ok(b"x", b"Hello, World!", Some("sha256=zz")));
        assert!(!hub_signature_ok(b"x", b"Hello, World!", None));
        assert!(!hub_signature_ok(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            Some(&sig.replace("sha256=", "sha1="))
        ));
    }
}
