//! fnlet-cluster: the cluster's protocol, with no I/O.
//!
//! This crate is to the agent's cluster code what `quinn-proto` is to `quinn`: it owns every
//! decision and byte format, and touches no socket, no file and no clock. Time comes in as
//! values (`now` arguments); outputs come back as values (frames to send, changes to apply,
//! datagrams and timers for foca). The agent drives it over quinn (one QUIC endpoint, ALPNs
//! [`frame::ALPN_PEER`] and [`frame::ALPN_INVOKE`]) and foca.
//!
//! | module | owns |
//! |---|---|
//! | [`frame`] | the wire frames on QUIC streams, their limits, sequences and error codes |
//! | [`hlc`] | the hybrid logical clock stamping catalog writes (uhlc timestamps, `now` passed in) |
//! | [`catalog`] | the replicated catalog: a last-writer-wins map with digests and deltas |
//! | [`route`] | which host runs a function: rendezvous ranking with bounded load |
//! | [`load`] | the hosts' in-flight loads: the LoadReport datagram, when to send it, how to combine it |
//! | [`membership`] | the SWIM identity and a sans-IO driver around foca, with its timing bounds |
//! | [`token`] | join tokens: text form, parsing, verification |
//!
//! # How the agent drives it
//!
//! - **Streams.** For each QUIC stream, a [`frame::Decoder`] takes the bytes read
//!   ([`frame::Decoder::push`]) and hands back frames ([`frame::Decoder::next_frame`]); a
//!   [`frame::Expect`] checks each frame is one that may come next. Any error has a
//!   [`frame::ErrorCode`] to close the connection with. Frames go out with
//!   [`frame::Frame::encode`].
//! - **Catalog.** Deploys, removals and access keys are written with
//!   [`catalog::Catalog::put_function`] and friends, which return the [`catalog::Delta`] to
//!   send to the peers. Received deltas go through [`catalog::Catalog::apply`], which returns
//!   what changed. On join and periodically, peers swap [`catalog::Digest`]s and answer each with
//!   [`catalog::Catalog::diff`].
//! - **Membership.** One task owns a [`membership::Membership`]: SWIM datagrams in
//!   ([`membership::Membership::handle_datagram`]), timers in
//!   ([`membership::Membership::handle_timeout`]); datagrams, the next timeout and member events
//!   out (`poll_transmit`, `poll_timeout`, `poll_event`). A restart can start from the members
//!   it kept ([`membership::Membership::add_members`]) rather than announcing to each.
//! - **Routing.** [`route::pick`] names the host for a call from the live members and their
//!   in-flight loads: this host's own, and each peer's from [`load::PeerLoads`], which holds
//!   the peers' LoadReport datagrams and the calls this host forwarded since. A
//!   [`load::Reporter`] says when this host reports its own load to its peers.
//!
//! # Failure detection bounds (foca's LAN configuration)
//!
//! From [`membership::DetectionBounds`] for [`membership::foca_config`]: a probe every 1 s, a
//! direct ack awaited 500 ms before indirect probes. "Expected" is the SWIM paper's mean (about
//! e/(e-1) probe periods until some member probes the failed host) plus the probe's own
//! period; "worst" is one member's round-robin reaching it `2(N-1) - 1` periods after its last
//! probe.
//!
//! | hosts | suspect → down | updates sent | suspected (expected / worst) | down (expected / worst) |
//! |---|---|---|---|---|
//! | 5 | 4 s | 6 times | 2.5 s / 8 s | 6.5 s / 12 s |
//! | 10 | 4 s | 6 times | 2.5 s / 18 s | 6.5 s / 22 s |
//! | 100 | 8 s | 8 times | 2.6 s / 198 s | 10.6 s / 206 s |
//!
//! The worst cases grow with N because each host probes the others round-robin; with many
//! hosts probing, the expected case is what a failure meets. The prober's verdict then spreads
//! by gossip (every 200 ms to 3 members).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod catalog;
pub mod frame;
pub mod hlc;
pub mod load;
pub mod membership;
pub mod route;
pub mod token;

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A SHA-256 digest (of a bundle, of the CA certificate). Lowercase hex in text and JSON.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Sha256Hash(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({self})")
    }
}

/// A SHA-256 in text was not 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sha256 is 64 lowercase hex digits, not {found:?}")]
pub struct BadSha256 {
    /// What was given (cut to 80 characters).
    pub found: String,
}

impl FromStr for Sha256Hash {
    type Err = BadSha256;

    fn from_str(s: &str) -> Result<Self, BadSha256> {
        let bad = || BadSha256 {
            found: s.chars().take(80).collect(),
        };
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Sha256Hash(out))
    }
}

impl serde::Serialize for Sha256Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Sha256Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_text_round_trips_and_rejects_bad_forms() {
        let h = Sha256Hash::of(b"abc");
        let text = h.to_string();
        assert_eq!(
            text,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(text.parse::<Sha256Hash>().unwrap(), h);
        assert!(text.to_uppercase().parse::<Sha256Hash>().is_err());
        assert!(text[1..].parse::<Sha256Hash>().is_err());
        assert!(format!("{}g", &text[1..]).parse::<Sha256Hash>().is_err());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<Sha256Hash>(&json).unwrap(), h);
    }
}
