//! Egress policy as written (`[network] egress` in a manifest, `default_egress` in the config)
//! and as parsed: "none", "all", or a list of rules `"CIDR"`, `"CIDR:PORT"`, `"host.name:PORT"`.
//! Pure: no sockets, no resolving (host names are resolved by [`super::Network`]).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Most rules one function may list.
pub const MAX_RULES: usize = 256;

/// `egress` as written: a word or a list of rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EgressSpec {
    Word(String),
    Rules(Vec<String>),
}

impl Default for EgressSpec {
    fn default() -> Self {
        EgressSpec::Word("none".into())
    }
}

/// Where a destination is: a network, or a name the agent resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    Net(Ipv4Net),
    Host(String),
}

/// One allow rule: a destination and, optionally, one port (TCP and UDP).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub dest: Dest,
    pub port: Option<u16>,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// Only `lo`: the namespace every instance had before egress existed.
    None,
    /// Anywhere the host's routes lead, except what is always denied.
    All,
    /// Only these destinations (and never what is always denied).
    Rules(Vec<Rule>),
}

impl Egress {
    pub fn is_none(&self) -> bool {
        *self == Egress::None
    }
}

impl EgressSpec {
    /// Parses and checks the policy; the error says what is wrong with which entry.
    pub fn parse(&self) -> Result<Egress, String> {
        match self {
            EgressSpec::Word(w) if w == "none" => Ok(Egress::None),
            EgressSpec::Word(w) if w == "all" => Ok(Egress::All),
            EgressSpec::Word(w) => Err(format!(
                "{w:?} must be \"none\", \"all\" or a list of rules like [\"10.0.0.0/8:5432\", \"api.example.com:443\"]"
            )),
            EgressSpec::Rules(rules) => {
                if rules.len() > MAX_RULES {
                    return Err(format!("at most {MAX_RULES} rules"));
                }
                let mut out = rules
                    .iter()
                    .map(|r| parse_rule(r))
                    .collect::<Result<Vec<_>, _>>()?;
                out.sort();
                out.dedup();
                // An empty list allows nothing: the function gets no network at all.
                Ok(if out.is_empty() {
                    Egress::None
                } else {
                    Egress::Rules(out)
                })
            }
        }
    }
}

/// `"CIDR"`, `"CIDR:PORT"`, `"ADDR"`, `"ADDR:PORT"` or `"host.name:PORT"`.
pub fn parse_rule(text: &str) -> Result<Rule, String> {
    let bad = |why: &str| Err(format!("rule {text:?}: {why}"));
    if text.is_empty() || text.len() > 260 {
        return bad("must be 1-260 characters");
    }
    if text.contains('[') || text.matches(':').count() > 1 {
        return bad("IPv6 is not supported: egress is IPv4 only");
    }
    let (dest, port) = match text.rsplit_once(':') {
        Some((d, p)) => {
            let port = match p.parse::<u16>() {
                Ok(0) | Err(_) => return bad("the port must be a number from 1 to 65535"),
                Ok(p) => p,
            };
            (d, Some(port))
        }
        None => (text, None),
    };
    let looks_numeric = dest
        .bytes()
        .all(|c| c.is_ascii_digit() || c == b'.' || c == b'/');
    if looks_numeric {
        let net = if dest.contains('/') {
            let net: Ipv4Net = match dest.parse() {
                Ok(n) => n,
                Err(_) => return bad("not an IPv4 network like 10.0.0.0/8"),
            };
            if net.trunc() != net {
                return bad(&format!(
                    "host bits are set: the network is {}",
                    net.trunc()
                ));
            }
            net
        } else {
            match dest.parse::<Ipv4Addr>() {
                Ok(a) => Ipv4Net::from(a),
                Err(_) => return bad("not an IPv4 address"),
            }
        };
        return Ok(Rule {
            dest: Dest::Net(net),
            port,
        });
    }
    if !valid_host_name(dest) {
        return bad("not a CIDR, an address or a host name (a-z, 0-9, '-', '.')");
    }
    if port.is_none() {
        return bad("a host name needs a port: \"host.name:PORT\"");
    }
    Ok(Rule {
        dest: Dest::Host(dest.to_ascii_lowercase()),
        port,
    })
}

fn valid_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
        // A name made of digits and dots only is a malformed address, not a name.
        && !name.bytes().all(|c| c.is_ascii_digit() || c == b'.')
}

/// `[network]` in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkManifest {
    /// "none", "all" or a list of rules; absent: the agent's `default_egress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSpec>,
    /// Bandwidth cap in Mbit/s, each way, per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<u32>,
    /// Open outbound connections at most, over all the function's instances; absent: the
    /// agent's `[network] max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl NetworkManifest {
    /// Checks every key; the error names it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(e) = &self.egress {
            e.parse().map_err(|why| ("network.egress", why))?;
        }
        if let Some(r) = self.rate_mbit
            && !(1..=100_000).contains(&r)
        {
            return Err((
                "network.rate_mbit",
                format!("{r} must be between 1 and 100000"),
            ));
        }
        if let Some(c) = self.max_connections
            && !(1..=1_000_000).contains(&c)
        {
            return Err((
                "network.max_connections",
                format!("{c} must be between 1 and 1000000"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: &[&str]) -> Result<Egress, String> {
        EgressSpec::Rules(v.iter().map(|s| s.to_string()).collect()).parse()
    }

    #[test]
    fn words_and_rules() {
        assert_eq!(EgressSpec::Word("none".into()).parse(), Ok(Egress::None));
        assert_eq!(EgressSpec::Word("all".into()).parse(), Ok(Egress::All));
        assert!(EgressSpec::Word("some".into()).parse().is_err());
        assert_eq!(rules(&[]), Ok(Egress::None));
        let Ok(Egress::Rules(r)) = rules(&[
            "10.0.0.0/8:5432",
            "192.0.2.7",
            "API.example.com:443",
            "192.0.2.7",
        ]) else {
            panic!("rules refused")
        };
        assert_eq!(
            r,
            vec![
                Rule {
                    dest: Dest::Net("10.0.0.0/8".parse().unwrap()),
                    port: Some(5432)
                },
                Rule {
                    dest: Dest::Net("192.0.2.7/32".parse().unwrap()),
                    port: None
                },
                Rule {
                    dest: Dest::Host("api.example.com".into()),
                    port: Some(443)
                },
            ]
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, says) in [
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "IPv4 network"),
            ("300.0.0.1", "IPv4 address"),
            ("10.0.0.0/8:0", "port"),
            ("10.0.0.0/8:70000", "port"),
            ("db.internal", "needs a port"),
            ("2001:db8::/32", "IPv6"),
            ("[::1]:80", "IPv6"),
            ("bad_name:80", "host name"),
            ("-x.example:80", "host name"),
            ("", "1-260"),
        ] {
            let err = rules(&[rule]).unwrap_err();
            assert!(err.contains(says), "{rule:?} -> {err}");
            assert!(err.contains(&format!("{rule:?}")), "{err}");
        }
    }

    #[test]
    fn manifest_keys_are_checked_by_name() {
        let m = NetworkManifest {
            rate_mbit: Some(0),
            ..Default::default()
        };
        assert_eq!(m.validate().unwrap_err().0, "network.rate_mbit");
        let m = NetworkManifest {
            egress: Some(EgressSpec::Rules(vec!["x".into()])),
            ..Default::default()
        };
        assert_eq!(m.validate().unwrap_err().0, "network.egress");
        let m = NetworkManifest {
            max_connections: Some(0),
            ..Default::default()
        };
        assert_eq!(m.validate().unwrap_err().0, "network.max_connections");
    }
}
