//! fnlet's nftables tables, written as nft scripts and applied with `nft -f -` (one atomic
//! transaction each). Every name and address in a script comes from a checked value (function
//! names are `[a-z0-9_-]`, addresses are parsed), so nothing a user writes reaches nft as text.
//!
//! `inet BRIDGE` filters what instances send (allow lists, what is always denied, the connection
//! cap, counters) and masquerades it; `bridge BRIDGE` stops instances from talking to each other
//! and from using any address but their own. Its chains know the instances' ports by name
//! (`BRIDGE-*`): `meta ibrname` needs a module not every kernel has.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use super::NetworkError;

/// Destinations no instance ever reaches, whatever its rules: "this network", loopback,
/// link-local (cloud metadata at 169.254.169.254), multicast and the reserved 240/4 with the
/// broadcast address. The bridge's own range (other instances) and the host's own addresses
/// are added by the tables themselves.
pub const ALWAYS_DENIED: &str = "0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3";

/// How a function's allowed destinations look to nft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    All,
    /// (networks, port); an empty list of networks allows nothing.
    Rules(Vec<(Vec<Ipv4Net>, Option<u16>)>),
}

/// The tables, created when the first instance with egress is prepared. A connection is
/// checked against the denials and the allow list at its first packet; the rest of it goes
/// straight to its function's chain (counted there). An instance opens
/// nothing to the host; only replies to a connection the host itself opened (an operator's
/// curl to an instance) come back.
pub fn tables(table: &str, bridge: &str, range: Ipv4Net) -> String {
    format!(
        r#"table inet {table} {{
  map out {{ type ipv4_addr : verdict; }}
  map back {{ type ipv4_addr : verdict; }}
  map deny {{ type ipv4_addr : verdict; }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{bridge}" ct state established,related accept
    iifname "{bridge}" meta nfproto ipv4 ip saddr vmap @deny
    iifname "{bridge}" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{bridge}" jump from_instances
    oifname "{bridge}" jump to_instances
  }}
  chain from_instances {{
    meta nfproto != ipv4 drop
    ct state established,related ip saddr vmap @out
    ip daddr {{ {ALWAYS_DENIED}, {range}, 255.255.255.255 }} ip saddr vmap @deny
    ip daddr {{ {ALWAYS_DENIED}, {range}, 255.255.255.255 }} drop
    fib daddr type {{ local, broadcast, multicast }} ip saddr vmap @deny
    ip saddr vmap @out
    drop
  }}
  chain to_instances {{
    ct state established,related ip daddr vmap @back
    drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat + 10; policy accept;
    ip saddr {range} oifname != "{bridge}" masquerade
  }}
}}
table bridge {table} {{
  set ports {{ type ifname . ipv4_addr; }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname != "{bridge}-*" accept
    ether type ip iifname . ip saddr @ports accept
    ether type arp iifname . arp saddr ip @ports accept
    drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{bridge}-*" drop
  }}
}}
"#
    )
}

/// Creates or replaces one function's chains and counters: `out_F` (its allow list),
/// `ok_F` (allowed new connections: the cap and the count), `no_F` (denied: counted, logged at
/// a bounded rate, refused at once), `back_F` (replies: counted).
pub fn function(table: &str, name: &str, allow: &Allow, max_connections: u32) -> String {
    let mut s = String::new();
    let t = format!("inet {table}");
    for c in ["tx", "rx", "conns", "denied"] {
        let _ = writeln!(s, "add counter {t} {c}_{name}");
    }
    for c in ["out_", "ok_", "no_", "back_"] {
        let _ = writeln!(s, "add chain {t} {c}{name}");
        let _ = writeln!(s, "flush chain {t} {c}{name}");
    }
    let _ = writeln!(
        s,
        "add rule {t} back_{name} counter name \"rx_{name}\" accept"
    );
    let _ = writeln!(
        s,
        "add rule {t} no_{name} counter name \"denied_{name}\" limit rate 10/second burst 20 packets log prefix \"fnlet deny {name}: \" level info"
    );
    let _ = writeln!(
        s,
        "add rule {t} no_{name} meta l4proto tcp reject with tcp reset"
    );
    let _ = writeln!(
        s,
        "add rule {t} no_{name} reject with icmpx type admin-prohibited"
    );
    let _ = writeln!(
        s,
        "add rule {t} ok_{name} ct count over {max_connections} goto no_{name}"
    );
    let _ = writeln!(
        s,
        "add rule {t} ok_{name} counter name \"conns_{name}\" accept"
    );
    let _ = writeln!(s, "add rule {t} out_{name} counter name \"tx_{name}\"");
    let _ = writeln!(
        s,
        "add rule {t} out_{name} ct state established,related accept"
    );
    match allow {
        Allow::All => {
            let _ = writeln!(s, "add rule {t} out_{name} ct state new goto ok_{name}");
        }
        Allow::Rules(rules) => {
            for (nets, port) in rules.iter().filter(|(n, _)| !n.is_empty()) {
                let set = nets
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let port = port
                    .map(|p| format!(" meta l4proto {{ tcp, udp }} th dport {p}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "add rule {t} out_{name} ct state new ip daddr {{ {set} }}{port} goto ok_{name}"
                );
            }
        }
    }
    let _ = writeln!(s, "add rule {t} out_{name} goto no_{name}");
    s
}

/// Deletes one function's chains and counters (no instance's entries may refer to them
/// any more): the chains are emptied first, since a chain that a rule jumps to cannot go.
pub fn delete_function(table: &str, name: &str) -> String {
    let mut s = String::new();
    let t = format!("inet {table}");
    for c in ["out_", "ok_", "no_", "back_"] {
        let _ = writeln!(s, "flush chain {t} {c}{name}");
    }
    for c in ["out_", "ok_", "no_", "back_"] {
        let _ = writeln!(s, "delete chain {t} {c}{name}");
    }
    for c in ["tx", "rx", "conns", "denied"] {
        let _ = writeln!(s, "delete counter {t} {c}_{name}");
    }
    s
}

/// The entries that tie one instance (its address and host-side veth) to its function.
pub fn instance(table: &str, op: &str, name: &str, addr: Ipv4Addr, port: &str) -> String {
    let verdicts = op == "add";
    let v = |chain: &str| {
        if verdicts {
            format!(" : goto {chain}_{name}")
        } else {
            String::new()
        }
    };
    format!(
        "{op} element inet {table} out {{ {addr}{} }}\n{op} element inet {table} back {{ {addr}{} }}\n{op} element inet {table} deny {{ {addr}{} }}\n{op} element bridge {table} ports {{ \"{port}\" . {addr} }}\n",
        v("out"),
        v("back"),
        v("no")
    )
}

/// Deleting both tables (what a crashed agent left, or ours at stop); missing ones are fine.
pub fn delete_tables(table: &str) -> String {
    // `destroy` (nft 1.0.6+) would skip missing tables; `add` then `delete` works everywhere.
    format!(
        "add table inet {table}\ndelete table inet {table}\nadd table bridge {table}\ndelete table bridge {table}\n"
    )
}

/// Runs an nft script as one transaction.
pub fn apply(script: &str) -> Result<(), NetworkError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Tool {
            tool: "nft",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| NetworkError::Tool {
                tool: "nft",
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Tool {
            tool: "nft",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Nft {
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Per-function counters: name -> (tx bytes, rx bytes, connections, denied attempts).
pub type Counters = std::collections::BTreeMap<String, [u64; 4]>;

/// Reads the functions' counters (`nft -j list counters table inet TABLE`).
pub fn counters(table: &str) -> Result<Counters, NetworkError> {
    let out = Command::new("nft")
        .args(["-j", "list", "counters", "table", "inet", table])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetworkError::Tool {
            tool: "nft",
            source,
        })?;
    if !out.status.success() {
        return Err(NetworkError::Nft {
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_counters(&out.stdout))
}

fn parse_counters(json: &[u8]) -> Counters {
    let mut out = Counters::new();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return out;
    };
    let items = v.get("nftables").and_then(|n| n.as_array());
    for item in items.into_iter().flatten() {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let Some((function, kind)) = c
            .get("name")
            .and_then(|n| n.as_str())
            .and_then(|n| n.split_once('_'))
            .map(|(kind, function)| (function, kind))
        else {
            continue;
        };
        let field = |k: &str| c.get(k).and_then(|b| b.as_u64()).unwrap_or(0);
        let entry = out.entry(function.to_string()).or_insert([0; 4]);
        match kind {
            "tx" => entry[0] = field("bytes"),
            "rx" => entry[1] = field("bytes"),
            "conns" => entry[2] = field("packets"),
            "denied" => entry[3] = field("packets"),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_with_rules_allows_only_them_after_the_denials() {
        let allow = Allow::Rules(vec![
            (vec!["10.0.0.0/8".parse().unwrap()], Some(5432)),
            (vec!["192.0.2.7/32".parse().unwrap()], None),
            (vec![], Some(443)),
        ]);
        let s = function("fnlet0", "db-fn", &allow, 64);
        assert!(s.contains(
            "add rule inet fnlet0 out_db-fn ct state new ip daddr { 10.0.0.0/8 } meta l4proto { tcp, udp } th dport 5432 goto ok_db-fn"
        ));
        assert!(s.contains("ip daddr { 192.0.2.7/32 } goto ok_db-fn"));
        // An unresolved name allows nothing rather than everything.
        assert!(!s.contains("dport 443"));
        assert!(s.contains("ct count over 64 goto no_db-fn"));
        assert!(
            s.trim_end()
                .ends_with("add rule inet fnlet0 out_db-fn goto no_db-fn")
        );
    }

    #[test]
    fn the_tables_deny_the_host_and_other_instances_before_any_allow_list() {
        let s = tables("fnlet0", "fnlet0", "100.72.0.0/16".parse().unwrap());
        let deny = s.find("@deny\n    ip daddr").unwrap();
        let allow = s.rfind("vmap @out").unwrap();
        assert!(deny < allow);
        assert!(s.contains("169.254.0.0/16"));
        assert!(s.contains("100.72.0.0/16"));
        assert!(s.contains("iifname \"fnlet0\" drop"));
        assert!(s.contains("iifname \"fnlet0-*\" drop"));
    }

    #[test]
    fn instance_entries_go_in_and_out_by_the_same_keys() {
        let a: Ipv4Addr = "100.72.0.9".parse().unwrap();
        let add = instance("t", "add", "f", a, "t-9");
        assert!(add.contains("add element inet t out { 100.72.0.9 : goto out_f }"));
        assert!(add.contains("add element bridge t ports { \"t-9\" . 100.72.0.9 }"));
        let del = instance("t", "delete", "f", a, "t-9");
        assert!(del.contains("delete element inet t out { 100.72.0.9 }"));
    }

    /// Needs root: loads the scripts into a network namespace of the test's own (unshare -n),
    /// where the kernel checks them as it would on the host; nothing outside it changes.
    #[test]
    fn the_scripts_load_into_a_kernel() {
        let range: Ipv4Net = "100.72.0.0/16".parse().unwrap();
        let mut script = tables("fnlet0", "fnlet0", range);
        let allow = Allow::Rules(vec![(vec!["10.0.0.0/8".parse().unwrap()], Some(5432))]);
        script += &function("fnlet0", "0db-fn_x", &allow, 64);
        script += &function("fnlet0", "open", &Allow::All, 1);
        script += &instance(
            "fnlet0",
            "add",
            "0db-fn_x",
            "100.72.0.2".parse().unwrap(),
            "fnlet0-2",
        );
        // Again: a function's chains are replaced in place.
        script += &function("fnlet0", "0db-fn_x", &Allow::All, 8);
        script += &instance(
            "fnlet0",
            "delete",
            "0db-fn_x",
            "100.72.0.2".parse().unwrap(),
            "fnlet0-2",
        );
        // Its last instance gone, the function's chains and counters go; the other's stay.
        script += &delete_function("fnlet0", "0db-fn_x");
        let check = "nft -f - \
            && ! nft list chain inet fnlet0 out_0db-fn_x 2>/dev/null \
            && ! nft list counter inet fnlet0 tx_0db-fn_x 2>/dev/null \
            && nft list chain inet fnlet0 out_open >/dev/null \
            && nft list counter inet fnlet0 tx_open >/dev/null \
            && printf '%s' \"$0\" | nft -f -";
        let mut child = Command::new("unshare")
            .args(["--net", "sh", "-c", check, &delete_tables("fnlet0")])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft refused the scripts, or a removed function's chains stayed (this test needs root):\n{}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn counters_parse_from_nft_json() {
        let json = br#"{"nftables": [{"metainfo": {}}, {"counter": {"family": "inet", "name": "tx_f", "table": "t", "packets": 3, "bytes": 180}}, {"counter": {"name": "denied_f", "packets": 2, "bytes": 120}}, {"counter": {"name": "conns_f", "packets": 1, "bytes": 60}}]}"#;
        assert_eq!(parse_counters(json)["f"], [180, 0, 1, 2]);
    }
}
