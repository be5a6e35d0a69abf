//! In-flight loads between hosts: the LoadReport datagram each host sends its peers about the
//! calls running on it, when it sends one ([`Reporter`]), and how a receiver combines the
//! reports with the calls it forwarded since ([`PeerLoads`]), for [`crate::route::pick`].
//!
//! **Why.** A host placing a call knows the calls it forwarded itself; calls that reached the
//! owner through other hosts it cannot see. Each host therefore tells its peers its own load
//! (calls running there, its own and forwarded-in), so a burst arriving on several hosts spills
//! over as one arriving on a single host does.
//!
//! **Sending.** A report goes out when the load changed, at most once per
//! [`ReportTiming::min_interval`], and again every [`ReportTiming::refresh`] while the load is
//! above zero (a lost datagram is repaired by the next). A drop to zero goes out at once: a
//! stale load on an idle owner would send the next call elsewhere (with 5 hosts one call in
//! flight fills a host's bounded share), so calls arriving one after another on different
//! hosts would leave the owner. It always follows a report above zero, which waited its
//! interval, so a host still sends at most two reports per interval. An idle host sends
//! nothing once it has reported its zero: a receiver whose report has aged past
//! [`ReportTiming::ttl`] falls back on what it forwarded, which for an idle host is the same
//! answer.
//!
//! **Combining.** A receiver takes a peer's load as the reported load, less the calls it had
//! forwarded to that peer before the report arrived that have ended since (the report held
//! them, and they are over), plus the calls it forwarded after the report arrived that are
//! still running (the report cannot hold them); and never less than the calls it forwarded
//! there that are still running (a lower bound it knows for sure). Without a fresh report, the
//! load is what it forwarded. A burst from one host thus counts against the owner at once,
//! before the owner's next report, and one host's calls made one after another each find the
//! owner free.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::frame::ErrorCode;

/// The first byte of every fnlet datagram. A SWIM packet (foca's postcard encoding) starts with
/// the length of its sender's node id, 1 to 63: the first byte tells the two apart.
pub const DATAGRAM_TAG: u8 = 0xff;
/// The version of the datagram layout.
pub const DATAGRAM_VERSION: u8 = 1;
/// The kind byte of a LoadReport.
pub const KIND_LOAD_REPORT: u8 = 0x01;
/// A LoadReport's exact size in bytes.
pub const LOAD_REPORT_LEN: usize = 24;

/// Whether a datagram received on a peer connection is an fnlet datagram (else a SWIM packet).
pub fn is_fnlet_datagram(data: &[u8]) -> bool {
    data.first() == Some(&DATAGRAM_TAG)
}

/// One host's calls in flight, as it tells its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// The sender's run (its SWIM generation): a restarted host's reports start over.
    pub generation: u64,
    /// Counts this run's reports from 1: a receiver keeps the greatest (generation, seq), so a
    /// datagram overtaken by a later one is ignored.
    pub seq: u64,
    /// Calls running on the sender now.
    pub load: u32,
}

/// A datagram that is not a LoadReport this host reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The first byte is not [`DATAGRAM_TAG`].
    #[error("not an fnlet datagram (first byte 0x{found:02x})")]
    NotFnlet {
        /// The first byte (0 for an empty datagram).
        found: u8,
    },
    /// The version byte is not [`DATAGRAM_VERSION`].
    #[error("datagram version {found} is not spoken here (version {DATAGRAM_VERSION} is)")]
    BadVersion {
        /// The version byte received.
        found: u8,
    },
    /// The kind byte is not one this host knows.
    #[error("unknown datagram kind 0x{found:02x}")]
    UnknownKind {
        /// The kind byte received.
        found: u8,
    },
    /// The reserved byte is not zero.
    #[error("the datagram's reserved byte is 0x{found:02x}; it must be zero")]
    Reserved {
        /// Its value.
        found: u8,
    },
    /// The datagram is not exactly [`LOAD_REPORT_LEN`] bytes.
    #[error("a LoadReport is {LOAD_REPORT_LEN} bytes, not {len}")]
    BadLength {
        /// The datagram's length.
        len: usize,
    },
}

impl DatagramError {
    /// The QUIC application error code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DatagramError::BadVersion { .. } => ErrorCode::BAD_VERSION,
            DatagramError::BadLength { len } if *len > LOAD_REPORT_LEN => {
                ErrorCode::FRAME_TOO_LARGE
            }
            _ => ErrorCode::BAD_FRAME,
        }
    }
}

impl LoadReport {
    /// The datagram: tag, version, kind, reserved 0, generation, seq, load (big-endian).
    pub fn encode(&self) -> [u8; LOAD_REPORT_LEN] {
        let mut out = [0u8; LOAD_REPORT_LEN];
        out[0] = DATAGRAM_TAG;
        out[1] = DATAGRAM_VERSION;
        out[2] = KIND_LOAD_REPORT;
        out[3] = 0;
        out[4..12].copy_from_slice(&self.generation.to_be_bytes());
        out[12..20].copy_from_slice(&self.seq.to_be_bytes());
        out[20..24].copy_from_slice(&self.load.to_be_bytes());
        out
    }

    /// Reads a datagram; checks tag, version, kind, reserved byte and length, in that order.
    pub fn decode(data: &[u8]) -> Result<LoadReport, DatagramError> {
        let byte = |i: usize| data.get(i).copied();
        match byte(0) {
            Some(DATAGRAM_TAG) => {}
            other => {
                return Err(DatagramError::NotFnlet {
                    found: other.unwrap_or(0),
                });
            }
        }
        match byte(1) {
            Some(DATAGRAM_VERSION) => {}
            Some(found) => return Err(DatagramError::BadVersion { found }),
            None => return Err(DatagramError::BadLength { len: data.len() }),
        }
        match byte(2) {
            Some(KIND_LOAD_REPORT) => {}
            Some(found) => return Err(DatagramError::UnknownKind { found }),
            None => return Err(DatagramError::BadLength { len: data.len() }),
        }
        match byte(3) {
            Some(0) => {}
            Some(found) => return Err(DatagramError::Reserved { found }),
            None => return Err(DatagramError::BadLength { len: data.len() }),
        }
        let bytes: &[u8; LOAD_REPORT_LEN] = data
            .try_into()
            .map_err(|_| DatagramError::BadLength { len: data.len() })?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Ok(LoadReport {
            generation: u64_at(4),
            seq: u64_at(12),
            load: u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        })
    }
}

/// When reports go out, and how long a received one counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportTiming {
    /// Least time between two reports of one host.
    pub min_interval: Duration,
    /// A load above zero is reported again this often, changed or not.
    pub refresh: Duration,
    /// A received report counts this long after it arrived.
    pub ttl: Duration,
}

impl ReportTiming {
    /// Fastest reporting: 10 reports a second.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
    /// Every report goes to every peer, so beyond 10 hosts the interval grows with the cluster
    /// (10 ms per host): a host sends at most about 100 report datagrams a second in all.
    pub const PER_HOST: Duration = Duration::from_millis(10);

    /// The timing for a cluster of `hosts` hosts: `min_interval` = max(100 ms, 10 ms x hosts),
    /// `refresh` = max(1 s, 4 x min_interval), `ttl` = 3 x refresh. 5 hosts: 100 ms, 1 s, 3 s;
    /// 100 hosts: 1 s, 4 s, 12 s.
    pub fn for_cluster(hosts: usize) -> ReportTiming {
        let per_host = Self::PER_HOST.saturating_mul(u32::try_from(hosts).unwrap_or(u32::MAX));
        let min_interval = per_host.max(Self::MIN_INTERVAL);
        let refresh = min_interval.saturating_mul(4).max(Duration::from_secs(1));
        ReportTiming {
            min_interval,
            refresh,
            ttl: refresh.saturating_mul(3),
        }
    }
}

/// Decides when this host reports its load. Feed it the current load with [`Reporter::poll`]
/// when the load changes and at [`Reporter::poll_timeout`]; send each report it returns to
/// every live peer.
#[derive(Debug, Clone)]
pub struct Reporter {
    generation: u64,
    seq: u64,
    /// When the last report went out, and the load it said.
    last: Option<(Instant, u32)>,
}

impl Reporter {
    /// A reporter for this run of the host (`generation`: its SWIM generation).
    pub fn new(generation: u64) -> Reporter {
        Reporter {
            generation,
            seq: 0,
            last: None,
        }
    }

    /// The report to send now, if any, for a host running `load` calls.
    pub fn poll(&mut self, load: u32, now: Instant, timing: &ReportTiming) -> Option<LoadReport> {
        let due = match self.last {
            // Nothing said yet: a peer without a report assumes no load beyond its own calls.
            None => load > 0,
            Some((at, said)) => {
                let since = now.saturating_duration_since(at);
                if load != said {
                    // A drop to zero at once (see the module documentation).
                    load == 0 || since >= timing.min_interval
                } else {
                    load > 0 && since >= timing.refresh
                }
            }
        };
        if !due {
            return None;
        }
        self.seq += 1;
        self.last = Some((now, load));
        Some(LoadReport {
            generation: self.generation,
            seq: self.seq,
            load,
        })
    }

    /// When to poll next for a host running `load` calls, if no change comes first; `None`:
    /// only when the load changes.
    pub fn poll_timeout(&self, load: u32, timing: &ReportTiming) -> Option<Instant> {
        let (at, said) = self.last?;
        if load != said {
            Some(if load == 0 {
                at
            } else {
                at + timing.min_interval
            })
        } else if load > 0 {
            Some(at + timing.refresh)
        } else {
            None
        }
    }

    /// Whether the last report said `load` (nothing is owed but refreshes); a host that never
    /// reported has said zero.
    pub fn is_settled(&self, load: u32) -> bool {
        self.last.map_or(0, |(_, said)| said) == load
    }
}

/// A forwarded call's place in [`PeerLoads`], handed back when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a forward that is never ended counts against its peer forever"]
pub struct Ticket {
    /// The peer's report count when the call started: the call is unreported while no report
    /// came since.
    epoch: u64,
}

/// A peer's load as this host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerView {
    /// What routing counts: see the module documentation.
    pub load: u32,
    /// The peer's last report, while it counts.
    pub reported: Option<u32>,
    /// Calls this host forwarded to the peer that are still running.
    pub forwarded: u32,
}

#[derive(Debug, Clone, Default)]
struct Peer {
    forwarded: u32,
    /// Of those, the ones started since the last report arrived.
    unreported: u32,
    /// Calls started before the last report arrived that ended since.
    ended_since: u32,
    /// Reports received (the epoch of forwards started now).
    epoch: u64,
    report: Option<Received>,
}

#[derive(Debug, Clone, Copy)]
struct Received {
    generation: u64,
    seq: u64,
    load: u32,
    at: Instant,
}

/// The peers' loads as this host sees them: their reports and this host's forwards.
#[derive(Debug, Clone, Default)]
pub struct PeerLoads {
    peers: BTreeMap<String, Peer>,
}

impl PeerLoads {
    /// An empty table.
    pub fn new() -> PeerLoads {
        PeerLoads::default()
    }

    /// A report from `peer` (the node id its connection's certificate names). False when it is
    /// older than the one held (overtaken on the way) and was ignored.
    pub fn received(&mut self, peer: &str, report: LoadReport, now: Instant) -> bool {
        let p = self.peers.entry(peer.to_string()).or_default();
        if let Some(r) = &p.report
            && (report.generation, report.seq) <= (r.generation, r.seq)
        {
            return false;
        }
        p.report = Some(Received {
            generation: report.generation,
            seq: report.seq,
            load: report.load,
            at: now,
        });
        p.epoch += 1;
        p.unreported = 0;
        p.ended_since = 0;
        true
    }

    /// A call this host forwards to `peer` starts; end it with [`PeerLoads::forward_ended`].
    pub fn forward_started(&mut self, peer: &str) -> Ticket {
        let p = self.peers.entry(peer.to_string()).or_default();
        p.forwarded = p.forwarded.saturating_add(1);
        p.unreported = p.unreported.saturating_add(1);
        Ticket { epoch: p.epoch }
    }

    /// A forwarded call ended (answered, failed or abandoned).
    pub fn forward_ended(&mut self, peer: &str, ticket: Ticket) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.forwarded = p.forwarded.saturating_sub(1);
            if ticket.epoch == p.epoch {
                p.unreported = p.unreported.saturating_sub(1);
            } else {
                p.ended_since = p.ended_since.saturating_add(1);
            }
        }
    }

    /// `peer` left or was declared down: its report no longer counts (a restart reports anew).
    pub fn forget_report(&mut self, peer: &str) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.report = None;
            p.epoch += 1;
            p.unreported = 0;
            p.ended_since = 0;
        }
    }

    /// `peer`'s load as routing counts it now.
    pub fn view(&self, peer: &str, now: Instant, ttl: Duration) -> PeerView {
        let Some(p) = self.peers.get(peer) else {
            return PeerView::default();
        };
        let reported = p
            .report
            .filter(|r| now.saturating_duration_since(r.at) < ttl)
            .map(|r| r.load);
        let load = match reported {
            Some(r) => r
                .saturating_sub(p.ended_since)
                .saturating_add(p.unreported)
                .max(p.forwarded),
            None => p.forwarded,
        };
        PeerView {
            load,
            reported,
            forwarded: p.forwarded,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::route::{self, BalanceFactor, Host};

    /// The example FRAMES.md documents.
    fn example() -> LoadReport {
        LoadReport {
            generation: 1_767_225_600_000,
            seq: 42,
            load: 3,
        }
    }

    /// FRAMES.md's datagram examples: each `### Name` section under `## Datagrams` with its
    /// ```hex block (`#` starts a comment).
    fn documented_datagrams() -> Vec<(String, Vec<u8>)> {
        let doc = include_str!("../FRAMES.md");
        let mut out = Vec::new();
        let mut in_datagrams = false;
        let mut section: Option<String> = None;
        let mut hex_block: Option<String> = None;
        for line in doc.lines() {
            if let Some(text) = &mut hex_block {
                if line.trim() == "```" {
                    let name = section.clone().expect("a hex block outside a section");
                    out.push((name, hex::decode(&*text).expect("hex block")));
                    hex_block = None;
                } else {
                    let code = line.split('#').next().unwrap_or("");
                    text.extend(code.chars().filter(|c| !c.is_whitespace()));
                }
            } else if let Some(h) = line.strip_prefix("## ") {
                in_datagrams = h.trim() == "Datagrams";
                section = None;
            } else if !in_datagrams {
                continue;
            } else if line.trim() == "```hex" {
                hex_block = Some(String::new());
            } else if let Some(h) = line.strip_prefix("### ") {
                section = Some(h.trim().to_owned());
            }
        }
        out
    }

    #[test]
    fn frames_md_documents_the_load_report() {
        let documented = documented_datagrams();
        assert_eq!(documented.len(), 1, "one datagram example: {documented:?}");
        let (name, bytes) = &documented[0];
        assert_eq!(name, "LoadReport");
        assert_eq!(LoadReport::decode(bytes), Ok(example()));
        assert_eq!(example().encode().to_vec(), *bytes);
    }

    #[test]
    fn bad_datagrams_name_their_fault_and_code() {
        let good = example().encode();
        let with = |i: usize, b: u8| {
            let mut d = good.to_vec();
            d[i] = b;
            d
        };
        let cases: Vec<(Vec<u8>, DatagramError, ErrorCode)> = vec![
            (
                Vec::new(),
                DatagramError::NotFnlet { found: 0 },
                ErrorCode::BAD_FRAME,
            ),
            (
                with(0, 0x05),
                DatagramError::NotFnlet { found: 5 },
                ErrorCode::BAD_FRAME,
            ),
            (
                with(1, 2),
                DatagramError::BadVersion { found: 2 },
                ErrorCode::BAD_VERSION,
            ),
            (
                with(2, 7),
                DatagramError::UnknownKind { found: 7 },
                ErrorCode::BAD_FRAME,
            ),
            (
                with(3, 1),
                DatagramError::Reserved { found: 1 },
                ErrorCode::BAD_FRAME,
            ),
            (
                good[..23].to_vec(),
                DatagramError::BadLength { len: 23 },
                ErrorCode::BAD_FRAME,
            ),
            (
                vec![DATAGRAM_TAG],
                DatagramError::BadLength { len: 1 },
                ErrorCode::BAD_FRAME,
            ),
            (
                [&good[..], &[0]].concat(),
                DatagramError::BadLength { len: 25 },
                ErrorCode::FRAME_TOO_LARGE,
            ),
        ];
        for (bytes, err, code) in cases {
            assert_eq!(LoadReport::decode(&bytes), Err(err.clone()), "{bytes:02x?}");
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn swim_packets_never_start_with_the_tag() {
        // The longest node id a certificate may name is 63 bytes: its SWIM packets start with
        // 0x3f, the postcard length of the sender's id.
        use crate::membership::{Membership, NodeIdentity, foca_config};
        use rand::SeedableRng;
        let id = "a".repeat(63);
        let me = NodeIdentity::new(id, "127.0.0.1:1".parse().unwrap(), 1);
        let mut m = Membership::new(
            me,
            foca_config(std::num::NonZeroU32::new(3).unwrap()),
            rand::rngs::StdRng::seed_from_u64(1),
        );
        m.announce(
            NodeIdentity::new("b", "127.0.0.2:1".parse().unwrap(), 0),
            Instant::now(),
        )
        .unwrap();
        let (_, packet) = m.poll_transmit().expect("an announce packet");
        assert_eq!(packet[0], 63);
        assert!(!is_fnlet_datagram(&packet));
        assert!(is_fnlet_datagram(&example().encode()));
    }

    #[test]
    fn timing_follows_the_cluster_size() {
        let t = ReportTiming::for_cluster(5);
        assert_eq!(
            (t.min_interval, t.refresh, t.ttl),
            (
                Duration::from_millis(100),
                Duration::from_secs(1),
                Duration::from_secs(3)
            )
        );
        let t = ReportTiming::for_cluster(100);
        assert_eq!(
            (t.min_interval, t.refresh, t.ttl),
            (
                Duration::from_secs(1),
                Duration::from_secs(4),
                Duration::from_secs(12)
            )
        );
    }

    #[test]
    fn a_report_from_the_owner_spills_a_call_a_local_view_would_send_there() {
        // Five hosts; a call reached "a" and was forwarded to the owner of f. Host "b" asks
        // where its own call to f goes.
        let ids = ["a", "b", "c", "d", "e"];
        let order = route::rank("f", ids);
        let owner = order[0];
        let now = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut at_b = PeerLoads::new();
        let hosts = |loads: &PeerLoads| -> Vec<Host<'static>> {
            ids.iter()
                .map(|&id| Host {
                    id,
                    load: loads.view(id, now, ttl).load,
                })
                .collect()
        };
        // b's local view: it forwarded nothing, so the owner looks idle and takes the call.
        let local = route::pick("f", &hosts(&at_b), BalanceFactor::DEFAULT).unwrap();
        assert_eq!(local.host, owner);
        // The owner reports the call from "a": b sends its call elsewhere.
        at_b.received(
            owner,
            LoadReport {
                generation: 1,
                seq: 1,
                load: 1,
            },
            now,
        );
        let gossiped = route::pick("f", &hosts(&at_b), BalanceFactor::DEFAULT).unwrap();
        assert_eq!((gossiped.host, gossiped.rank), (order[1], 1));
    }

    #[test]
    fn forwards_count_until_a_report_holds_them() {
        let now = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut loads = PeerLoads::new();
        let t1 = loads.forward_started("o");
        let t2 = loads.forward_started("o");
        assert_eq!(
            loads.view("o", now, ttl),
            PeerView {
                load: 2,
                reported: None,
                forwarded: 2
            }
        );
        // The owner reports 5 (these two and 3 from elsewhere): reported counts, the two are
        // in it.
        let r = |seq, load| LoadReport {
            generation: 7,
            seq,
            load,
        };
        assert!(loads.received("o", r(1, 5), now));
        assert_eq!(loads.view("o", now, ttl).load, 5);
        // A third forward is not in the report yet.
        let t3 = loads.forward_started("o");
        assert_eq!(loads.view("o", now, ttl).load, 6);
        // An older report, overtaken on the way, is ignored.
        assert!(!loads.received("o", r(1, 0), now));
        // The two the report held end: they no longer count.
        loads.forward_ended("o", t1);
        loads.forward_ended("o", t2);
        assert_eq!(loads.view("o", now, ttl).load, 4);
        loads.forward_ended("o", t3);
        assert_eq!(loads.view("o", now, ttl).load, 3);
        // The next report says what runs now.
        assert!(loads.received("o", r(2, 3), now));
        assert_eq!(loads.view("o", now, ttl).load, 3);
        // The report ages out: only what this host knows counts.
        let later = now + ttl;
        assert_eq!(
            loads.view("o", later, ttl),
            PeerView {
                load: 0,
                reported: None,
                forwarded: 0
            }
        );
        // A restarted peer (a new generation) starts its count over.
        assert!(loads.received(
            "o",
            LoadReport {
                generation: 8,
                seq: 1,
                load: 1
            },
            later
        ));
        assert_eq!(loads.view("o", later, ttl).reported, Some(1));
        loads.forget_report("o");
        assert_eq!(loads.view("o", later, ttl).reported, None);
    }

    proptest! {
        #[test]
        fn reports_round_trip(generation in any::<u64>(), seq in any::<u64>(), load in any::<u32>()) {
            let r = LoadReport { generation, seq, load };
            prop_assert_eq!(LoadReport::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            match LoadReport::decode(&bytes) {
                Ok(r) => prop_assert_eq!(r.encode().to_vec(), bytes),
                Err(e) => prop_assert!(e.code() != ErrorCode::NO_ERROR),
            }
        }

        /// Whatever the loads and their timing: two reports closer than min_interval only
        /// when the second is a drop to zero, so at most two per interval; seq grows by one
        /// each from 1; and once the load stops changing, the last report says it (0
        /// included).
        #[test]
        fn the_reporter_is_rate_limited_and_catches_up(
            hosts in 1usize..200,
            steps in proptest::collection::vec((0u32..4, 1u64..400), 1..200),
        ) {
            let timing = ReportTiming::for_cluster(hosts);
            let start = Instant::now();
            let mut now = start;
            let mut r = Reporter::new(9);
            let mut sent: Vec<(Instant, LoadReport)> = Vec::new();
            let mut load = 0;
            let drive = |r: &mut Reporter, load: u32, until: Instant, now: &mut Instant, sent: &mut Vec<(Instant, LoadReport)>| {
                // Poll at the change, then at each timeout up to `until`.
                loop {
                    if let Some(rep) = r.poll(load, *now, &timing) {
                        sent.push((*now, rep));
                    }
                    match r.poll_timeout(load, &timing) {
                        Some(t) if t <= until => *now = t.max(*now),
                        _ => break,
                    }
                }
                *now = until;
            };
            for (l, ms) in &steps {
                load = *l;
                let until = now + Duration::from_millis(*ms);
                drive(&mut r, load, until, &mut now, &mut sent);
            }
            // Quiet for a while: the last report says the final load.
            let until = now + timing.refresh * 2;
            drive(&mut r, load, until, &mut now, &mut sent);
            for w in sent.windows(2) {
                prop_assert!(
                    w[1].0 - w[0].0 >= timing.min_interval || (w[1].1.load == 0 && w[0].1.load > 0)
                );
                prop_assert_eq!(w[1].1.seq, w[0].1.seq + 1);
            }
            for w in sent.windows(3) {
                prop_assert!(w[2].0 - w[0].0 >= timing.min_interval);
            }
            if let Some(first) = sent.first() {
                prop_assert_eq!(first.1.seq, 1);
            }
            prop_assert!(r.is_settled(load));
            let said = sent.last().map_or(0, |s| s.1.load);
            prop_assert_eq!(said, load);
            prop_assert!(sent.iter().all(|s| s.1.generation == 9));
        }

        /// Routing never counts fewer calls on a peer than this host has running there, nor,
        /// with a fresh report, fewer than the report says less this host's calls that ended
        /// since, nor more than the report and this host's running calls together.
        #[test]
        fn the_view_is_never_below_what_is_known(
            ops in proptest::collection::vec((0u8..4, 0u32..10), 1..100),
        ) {
            let now = Instant::now();
            let ttl = Duration::from_secs(3);
            let mut loads = PeerLoads::new();
            // Each ticket with the number of reports seen when it started.
            let mut tickets: Vec<(Ticket, u32)> = Vec::new();
            let mut reports = 0;
            // Calls that started before the last report and ended since.
            let mut ended_since = 0;
            let mut seq = 0;
            let mut last_report = None;
            for (op, n) in ops {
                match op {
                    0 => tickets.push((loads.forward_started("p"), reports)),
                    1 => if let Some((t, at)) = tickets.pop() {
                        loads.forward_ended("p", t);
                        if at < reports {
                            ended_since += 1;
                        }
                    },
                    2 => {
                        seq += 1;
                        loads.received("p", LoadReport { generation: 1, seq, load: n }, now);
                        last_report = Some(n);
                        reports += 1;
                        ended_since = 0;
                    }
                    _ => {
                        loads.forget_report("p");
                        last_report = None;
                        reports += 1;
                        ended_since = 0;
                    }
                }
                let v = loads.view("p", now, ttl);
                prop_assert_eq!(v.forwarded as usize, tickets.len());
                prop_assert!(v.load >= v.forwarded);
                prop_assert_eq!(v.reported, last_report);
                if let Some(r) = last_report {
                    prop_assert!(v.load >= r.saturating_sub(ended_since));
                    prop_assert!(v.load <= r + v.forwarded);
                }
            }
        }
    }
}
