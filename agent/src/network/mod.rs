//! Functions' outbound network ("egress"): the policy types, and the host side that carries
//! it out (a bridge, a veth per instance, fnlet's own nftables tables).

pub mod policy;

use ipnet::Ipv4Net;

/// A bridge name: 1-8 of a-z and 0-9, starting with a letter (instances' veths are
/// `NAME-N`, which must fit the kernel's 15 characters).
pub fn valid_bridge_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=8).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The instances' range: an IPv4 network of /12 to /26 written without host bits.
pub fn parse_range(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 network like 100.72.0.0/16"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: the network is {}",
            net.trunc()
        ));
    }
    if !(12..=26).contains(&net.prefix_len()) {
        return Err(format!("{text:?} must be a /12 to /26"));
    }
    Ok(net)
}
