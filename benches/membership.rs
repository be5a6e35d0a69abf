//! Cluster membership on simulated time: N real `fnlet_cluster::membership::Membership`
//! instances (foca with the production `foca_config(N)`) exchange their SWIM datagrams in memory
//! through a priority queue of deliveries and timeouts, with a fixed one-way latency and random,
//! seeded loss. Nothing sleeps and nothing touches a socket: a virtual second costs what the
//! protocol computes in it, and a seed gives the same run every time.
//!
//! Each run (one cluster size N, one loss rate, one seed):
//!
//! 1. *Bootstrap*, loss-free: N-1 hosts start from the full members list
//!    (`Membership::add_members`, as a host restarting from its kept list) at random instants
//!    of the first second, so their probe timers fall at random phases, and run until every one
//!    lists the others alive with nothing left to gossip. Then the loss rate is switched on.
//! 2. *Join*: a new host announces to one random member (re-announcing every second until
//!    foca says it is in, as a driver must: a lost announce is not retried by foca). Measured:
//!    the time until 50 %, 99 % and all of the N-1 members list it alive (99.99 % of at most
//!    1,000 hosts is all of them).
//! 3. *Quiet*: all N hosts run for a while (`FNLET_BENCH_QUIET_S`) with no failure.
//!    Measured: datagram bytes and packets sent per host per second (SWIM payload only; a QUIC
//!    datagram adds ~45 bytes and UDP/IPv4 28 more), and false positives: hosts ever suspected,
//!    and hosts ever declared down, while alive.
//! 4. *Failure*: one random host stops (its timers stop and its packets, even those in flight,
//!    are dropped). Measured: the time until the first host suspects it and until every survivor
//!    has declared it down.
//!
//! Suspicions are read from each host's member table right after its timers fire: foca raises a
//! suspicion only there (when a probe's period ends without an ack), so the first one is caught
//! at the instant it is raised. Declarations come from the `MemberEvent::Down` events.
//!
//! Run with `benches/run.sh membership` (no root needed) or
//! `cargo bench -p fnlet-benches --bench membership`. Environment: `FNLET_BENCH_SIZES` (default
//! `5,10,50,100,500,1000`), `FNLET_BENCH_LOSS` (percent, default `0,10`; when neither is set,
//! 1,000 hosts run at 0 % only: at 10 % they take about four minutes alone), `FNLET_BENCH_SEEDS`
//! (seeds per size and loss; default 10 up to 100 hosts, 2 above),
//! `FNLET_BENCH_LATENCY_US` (one-way latency, default 200), `FNLET_BENCH_QUIET_S` (default 60
//! s up to 100 hosts, 30 s above: at least foca's 30 s announce period),
//! `FNLET_BENCH_CONFIG_SIZE` (make every host's `foca_config` for this many hosts instead of
//! the real N: what a host that guessed the size wrong would run), `FNLET_BENCH_PROBE_MS`,
//! `FNLET_BENCH_RTT_MS` and `FNLET_BENCH_SUSPICION` (another SWIM timing than the production
//! `Timing::DEFAULT`: probe period, direct-ack wait, suspicion multiplier).

#![forbid(unsafe_code)]

mod common;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fnlet_cluster::membership::{
    DetectionBounds, MemberEvent, Membership, NodeIdentity, Timing, foca_config_with,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use common::env_count;

/// foca's gossip period in `Config::new_lan` (what `foca_config` keeps): one dissemination
/// round.
const GOSSIP_PERIOD: Duration = Duration::from_millis(200);
/// How long the driver waits for `Joined` before announcing again.
const REANNOUNCE: Duration = Duration::from_secs(1);
/// Give-up bounds, in virtual time, for each phase.
const BOOTSTRAP_LIMIT: Duration = Duration::from_secs(300);
const JOIN_LIMIT: Duration = Duration::from_secs(60);
const DETECT_LIMIT: Duration = Duration::from_secs(180);
/// Between phases: until every host lists every other and nothing is left to gossip, or this
/// long (with loss, suspicions and refutations keep some gossip going all the time).
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// the simulated network

enum Ev {
    /// A datagram arrives.
    Deliver { to: usize, from: usize, data: Bytes },
    /// A host's earliest timer may be due.
    Wake(usize),
}

struct Item {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    /// Reversed: the heap pops the earliest first, and among equals the first queued.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Host {
    m: Membership<StdRng>,
    up: bool,
    /// The earliest `Wake` queued for it and not yet popped.
    armed: Option<Instant>,
}

/// What the tracker listens for, phase by phase.
#[derive(Default)]
struct Tracker {
    /// Join: the new host, and when each member first listed it alive.
    joiner: Option<usize>,
    join_seen: Vec<Option<Instant>>,
    joined_count: usize,
    /// Whether the joiner has had `Joined`.
    joiner_in: bool,
    /// Failure: the stopped host's identity, when each survivor declared it down, and the
    /// first suspicion of it.
    victim: Option<(usize, NodeIdentity)>,
    down_seen: Vec<Option<Instant>>,
    down_count: usize,
    first_suspect: Option<Instant>,
    /// False positives are counted while this is on.
    counting: bool,
    /// Hosts suspected while up, and (host, incarnation) suspicions: one per refutation.
    suspected: HashSet<usize>,
    suspicions: HashSet<(usize, u64, u16)>,
    /// Hosts declared down while up, and the declarations (observer, subject).
    downed: HashSet<usize>,
    down_events: usize,
    /// Hosts told they were declared down (they renewed their identity to come back).
    rejoins: usize,
    /// `Alone` or `Defunct` while counting: a host cut off.
    cut_off: usize,
}

struct Sim {
    t0: Instant,
    now: Instant,
    latency: Duration,
    loss: f64,
    size: NonZeroU32,
    net: StdRng,
    seed: u64,
    queue: BinaryHeap<Item>,
    seq: u64,
    hosts: Vec<Host>,
    ids: Vec<String>,
    index: HashMap<String, usize>,
    bytes: u64,
    packets: u64,
    lost: u64,
    /// foca's refusals, by message (normal ones included: say, a packet for a previous run).
    refusals: HashMap<String, u64>,
    tracker: Tracker,
    /// Events handled (for the wall-clock cost per event).
    steps: u64,
}

/// `FNLET_BENCH_PROBE_MS`, `FNLET_BENCH_RTT_MS`, `FNLET_BENCH_SUSPICION`: another SWIM timing
/// than the production one (`foca_config`'s), to compare.
fn timing() -> Timing {
    let d = Timing::DEFAULT;
    let ms = |name: &str, default: Duration| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(default, Duration::from_millis)
    };
    Timing {
        probe_period: ms("FNLET_BENCH_PROBE_MS", d.probe_period),
        probe_rtt: ms("FNLET_BENCH_RTT_MS", d.probe_rtt),
        suspicion_mult: std::env::var("FNLET_BENCH_SUSPICION")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d.suspicion_mult),
    }
}

/// `FNLET_BENCH_CONFIG_SIZE`: the cluster size every host's `foca_config` is made for, when
/// not the real one.
fn config_size() -> Option<u32> {
    std::env::var("FNLET_BENCH_CONFIG_SIZE")
        .ok()
        .map(|_| env_count("FNLET_BENCH_CONFIG_SIZE", 0) as u32)
        .filter(|&n| n > 0)
}

fn identity(i: usize, generation: u64) -> NodeIdentity {
    // Addresses are only carried, never used: 10.0.0.0/8, port 8741.
    let [a, b] = (i as u16).to_be_bytes();
    NodeIdentity::new(
        format!("h{i}"),
        SocketAddr::from(([10, 0, a, b], 8741)),
        generation,
    )
}

impl Sim {
    fn new(size: u32, seed: u64, latency: Duration) -> Self {
        let size = config_size().unwrap_or(size);
        let now = Instant::now();
        Sim {
            t0: now,
            now,
            latency,
            loss: 0.0,
            size: NonZeroU32::new(size).expect("sizes are at least 2"),
            net: StdRng::seed_from_u64(seed),
            seed,
            queue: BinaryHeap::new(),
            seq: 0,
            hosts: Vec::new(),
            ids: Vec::new(),
            index: HashMap::new(),
            bytes: 0,
            packets: 0,
            lost: 0,
            refusals: HashMap::new(),
            tracker: Tracker::default(),
            steps: 0,
        }
    }

    fn at(&self, after: Duration) -> Instant {
        self.now + after
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.queue.push(Item {
            at,
            seq: self.seq,
            ev,
        });
        self.seq += 1;
    }

    /// A new host (not yet announced).
    fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let id = identity(i, 1);
        let rng = StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        self.ids.push(id.id.clone());
        self.index.insert(id.id.clone(), i);
        self.hosts.push(Host {
            m: Membership::new(id, foca_config_with(self.size, timing()), rng),
            up: true,
            armed: None,
        });
        i
    }

    /// `i` announces to `seed` (known by node id and address only: generation 0).
    fn announce(&mut self, i: usize, seed: usize) {
        let to = identity(seed, 0);
        let now = self.now;
        if let Err(e) = self.hosts[i].m.announce(to, now) {
            *self.refusals.entry(format!("announce: {e}")).or_default() += 1;
        }
        self.drain(i);
    }

    fn stop(&mut self, i: usize) {
        self.hosts[i].up = false;
    }

    /// Sends what host `i` has to send, hands its events to the tracker, re-arms its timer.
    fn drain(&mut self, i: usize) {
        let mut out = Vec::new();
        while let Some(t) = self.hosts[i].m.poll_transmit() {
            out.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = self.hosts[i].m.poll_event() {
            events.push(e);
        }
        for (to, data) in out {
            self.bytes += data.len() as u64;
            self.packets += 1;
            let Some(&j) = self.index.get(&to.id) else {
                continue;
            };
            if self.loss > 0.0 && self.net.random_bool(self.loss) {
                self.lost += 1;
                continue;
            }
            let at = self.at(self.latency);
            self.push(
                at,
                Ev::Deliver {
                    to: j,
                    from: i,
                    data,
                },
            );
        }
        for e in events {
            self.on_event(i, e);
        }
        if let Some(t) = self.hosts[i].m.poll_timeout()
            && self.hosts[i].armed.is_none_or(|a| t < a)
        {
            self.hosts[i].armed = Some(t);
            self.push(t, Ev::Wake(i));
        }
    }

    fn on_event(&mut self, observer: usize, e: MemberEvent) {
        let now = self.now;
        let t = &mut self.tracker;
        match e {
            MemberEvent::Up(id) => {
                if let Some(j) = t.joiner
                    && id.id == self.ids[j]
                    && observer != j
                    && t.join_seen[observer].is_none()
                {
                    t.join_seen[observer] = Some(now);
                    t.joined_count += 1;
                }
            }
            MemberEvent::Down(id) => {
                let subject = self.index.get(&id.id).copied();
                if let Some((v, vid)) = &t.victim
                    && *vid == id
                {
                    if observer != *v && t.down_seen[observer].is_none() {
                        t.down_seen[observer] = Some(now);
                        t.down_count += 1;
                    }
                } else if t.counting
                    && let Some(s) = subject
                    && self.hosts[s].up
                {
                    t.downed.insert(s);
                    t.down_events += 1;
                }
            }
            MemberEvent::Joined => {
                if t.joiner == Some(observer) {
                    t.joiner_in = true;
                }
            }
            MemberEvent::Rejoined(_) => {
                if t.counting {
                    t.rejoins += 1;
                }
            }
            MemberEvent::Alone | MemberEvent::Defunct => {
                if t.counting {
                    t.cut_off += 1;
                }
            }
            MemberEvent::Replaced { .. } => {}
        }
    }

    /// Reads host `i`'s suspicions (right after its timers fired: where foca raises them).
    fn scan_suspicions(&mut self, i: usize) {
        let now = self.now;
        let t = &mut self.tracker;
        for m in self.hosts[i].m.foca().iter_membership_state() {
            if m.state() != foca::State::Suspect {
                continue;
            }
            let Some(&s) = self.index.get(&m.id().id) else {
                continue;
            };
            if let Some((_, vid)) = &t.victim
                && vid == m.id()
            {
                t.first_suspect.get_or_insert(now);
            } else if t.counting && self.hosts[s].up {
                t.suspected.insert(s);
                t.suspicions.insert((s, m.id().generation, m.incarnation()));
            }
        }
    }

    /// Handles events up to `until`, or until `done` says so (checked after each event).
    /// Returns whether `done` held.
    fn run(&mut self, until: Instant, mut done: impl FnMut(&Sim) -> bool) -> bool {
        while let Some(item) = self.queue.peek() {
            if item.at > until {
                break;
            }
            let Item { at, ev, .. } = self.queue.pop().expect("peeked");
            self.now = self.now.max(at);
            self.steps += 1;
            match ev {
                Ev::Deliver { to, from, data } => {
                    if !self.hosts[to].up || !self.hosts[from].up {
                        continue;
                    }
                    let now = self.now;
                    if let Err(e) = self.hosts[to]
                        .m
                        .handle_datagram(&self.ids[from], &data, now)
                    {
                        *self.refusals.entry(e.to_string()).or_default() += 1;
                    }
                    self.drain(to);
                }
                Ev::Wake(i) => {
                    if self.hosts[i].armed == Some(at) {
                        self.hosts[i].armed = None;
                    }
                    if !self.hosts[i].up {
                        continue;
                    }
                    let now = self.now;
                    if self.hosts[i].m.poll_timeout().is_some_and(|t| t <= now) {
                        if let Err(e) = self.hosts[i].m.handle_timeout(now) {
                            *self.refusals.entry(format!("timer: {e}")).or_default() += 1;
                        }
                        self.scan_suspicions(i);
                    }
                    self.drain(i);
                }
            }
            if done(self) {
                return true;
            }
        }
        self.now = self.now.max(until);
        done(self)
    }

    /// Every up host lists every other up host alive.
    fn converged(&self) -> bool {
        let up = self.hosts.iter().filter(|h| h.up).count();
        self.hosts
            .iter()
            .filter(|h| h.up)
            .all(|h| h.m.live().count() == up - 1)
    }

    /// No host has updates left to gossip.
    fn quiet(&self) -> bool {
        self.hosts
            .iter()
            .filter(|h| h.up)
            .all(|h| h.m.foca().updates_backlog() == 0)
    }

    /// Runs in steps of `step` until `cond` holds or `limit` has passed; returns whether it
    /// held.
    fn run_until_cond(&mut self, limit: Duration, step: Duration, cond: fn(&Sim) -> bool) -> bool {
        let end = self.at(limit);
        while self.now < end {
            let next = (self.now + step).min(end);
            self.run(next, |_| false);
            if cond(self) {
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// one run

#[derive(Debug, Clone, Default)]
struct Outcome {
    /// Join: seconds until 50 %, 99 % and all members listed the new host (None: not all
    /// within the limit), announces sent, and when the new host saw everyone.
    join_50: Option<f64>,
    join_99: Option<f64>,
    join_all: Option<f64>,
    announces: u32,
    /// Quiet: per host per second.
    bytes_per_s: f64,
    packets_per_s: f64,
    suspected: usize,
    suspicions: usize,
    downed: usize,
    down_events: usize,
    rejoins: usize,
    cut_off: usize,
    /// Failure: seconds from the stop to the first suspicion, the first declaration and the
    /// last survivor's; how many survivors did within the limit.
    suspect_first: Option<f64>,
    down_first: Option<f64>,
    down_all: Option<f64>,
    down_seen: usize,
    /// Bootstrap (virtual seconds), wall time, events handled, foca refusals.
    bootstrap_s: f64,
    wall: Duration,
    steps: u64,
    refusals: HashMap<String, u64>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The time by which `frac` of `times` had happened (nearest rank), if they all did.
fn quantile(times: &[Option<Instant>], from: Instant, frac: f64) -> Option<f64> {
    let mut got: Vec<Instant> = times.iter().flatten().copied().collect();
    got.sort();
    let need = ((times.len() as f64) * frac).ceil().max(1.0) as usize;
    got.get(need - 1).map(|t| secs(*t - from))
}

fn run_one(n: u32, loss: f64, seed: u64, latency: Duration, quiet: Duration) -> Outcome {
    let wall = Instant::now();
    let mut sim = Sim::new(n, seed, latency);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f0ca);
    let mut out = Outcome::default();

    // 1. Bootstrap: n-1 hosts start from the full members list (as from a kept list), each at
    // a random instant of the first second, so their probe timers fall at random phases.
    let members = n as usize - 1;
    for _ in 0..members {
        sim.add_host();
    }
    let everyone: Vec<NodeIdentity> = (0..members).map(|i| identity(i, 1)).collect();
    let mut starts: Vec<(Duration, usize)> = (0..members)
        .map(|i| (Duration::from_micros(rng.random_range(0..1_000_000)), i))
        .collect();
    starts.sort();
    for (after, i) in starts {
        let at = sim.t0 + after;
        sim.run(at, |_| false);
        let now = sim.now;
        sim.hosts[i]
            .m
            .add_members(everyone.iter().cloned(), now)
            .expect("adding the members list");
        sim.drain(i);
    }
    let ok = sim.run_until_cond(BOOTSTRAP_LIMIT, Duration::from_secs(1), |s| {
        s.converged() && s.quiet()
    });
    assert!(
        ok,
        "{n} hosts, seed {seed}: the bootstrap did not converge in {BOOTSTRAP_LIMIT:?}"
    );
    out.bootstrap_s = secs(sim.now - sim.t0);
    sim.loss = loss;
    let warm = sim.at(Duration::from_secs(2));
    sim.run(warm, |_| false);

    // 2. Join: a new host announces to a random member.
    let offset = Duration::from_micros(rng.random_range(0..1_000_000));
    let at = sim.at(offset);
    sim.run(at, |_| false);
    let joiner = sim.add_host();
    let contact = rng.random_range(0..members);
    sim.tracker.joiner = Some(joiner);
    sim.tracker.join_seen = vec![None; n as usize];
    let started = sim.now;
    let limit = sim.at(JOIN_LIMIT);
    sim.announce(joiner, contact);
    out.announces = 1;
    loop {
        let next = sim.at(REANNOUNCE).min(limit);
        let all = sim.run(next, |s| s.tracker.joined_count == members);
        if all || sim.now >= limit {
            break;
        }
        if !sim.tracker.joiner_in {
            sim.announce(joiner, contact);
            out.announces += 1;
        }
    }
    // The joiner itself is not a member that must list itself.
    let seen: Vec<Option<Instant>> = (0..members).map(|i| sim.tracker.join_seen[i]).collect();
    out.join_50 = quantile(&seen, started, 0.5);
    out.join_99 = quantile(&seen, started, 0.99);
    out.join_all = quantile(&seen, started, 1.0).filter(|_| sim.tracker.joined_count == members);
    sim.tracker.joiner = None;
    sim.run_until_cond(SETTLE_LIMIT, Duration::from_secs(1), |s| {
        s.converged() && s.quiet()
    });

    // 3. Quiet: no failure; traffic and false positives.
    let (bytes0, packets0) = (sim.bytes, sim.packets);
    sim.tracker.counting = true;
    let end = sim.at(quiet);
    sim.run(end, |_| false);
    sim.tracker.counting = false;
    let per = (n as f64) * secs(quiet);
    out.bytes_per_s = (sim.bytes - bytes0) as f64 / per;
    out.packets_per_s = (sim.packets - packets0) as f64 / per;
    let t = &sim.tracker;
    out.suspected = t.suspected.len();
    out.suspicions = t.suspicions.len();
    out.downed = t.downed.len();
    out.down_events = t.down_events;
    out.rejoins = t.rejoins;
    out.cut_off = t.cut_off;
    // Let what the quiet phase raised settle before the failure.
    sim.run_until_cond(SETTLE_LIMIT, Duration::from_secs(1), |s| {
        s.converged() && s.quiet()
    });

    // 4. Failure: a random host stops.
    let offset = Duration::from_micros(rng.random_range(0..1_000_000));
    let at = sim.at(offset);
    sim.run(at, |_| false);
    let victim = rng.random_range(0..sim.hosts.len());
    let vid = sim.hosts[victim].m.identity().clone();
    sim.tracker.victim = Some((victim, vid));
    sim.tracker.down_seen = vec![None; sim.hosts.len()];
    sim.stop(victim);
    let stopped = sim.now;
    let survivors = sim.hosts.len() - 1;
    let limit = sim.at(DETECT_LIMIT);
    sim.run(limit, |s| s.tracker.down_count == survivors);
    let t = &sim.tracker;
    out.suspect_first = t.first_suspect.map(|x| secs(x - stopped));
    let seen: Vec<Option<Instant>> = t
        .down_seen
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| *s)
        .collect();
    out.down_first = quantile(&seen, stopped, 0.0);
    out.down_all = quantile(&seen, stopped, 1.0).filter(|_| t.down_count == survivors);
    out.down_seen = t.down_count;

    out.wall = wall.elapsed();
    out.steps = sim.steps;
    out.refusals = sim.refusals;
    out
}

// ---------------------------------------------------------------------------------------------
// the tables

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `median / max` of a field over seeds; a seed that never got there is printed as `>limit`.
fn med_max(runs: &[Outcome], f: impl Fn(&Outcome) -> Option<f64>, limit: f64) -> (f64, String) {
    let missing = runs.iter().filter(|r| f(r).is_none()).count();
    let mut v: Vec<f64> = runs.iter().map(|r| f(r).unwrap_or(f64::INFINITY)).collect();
    let m = median(&mut v);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let show = |x: f64| {
        if x.is_finite() {
            format!("{x:.2}")
        } else {
            format!(">{limit:.0}")
        }
    };
    let mut s = format!("{} / {}", show(m), show(max));
    if missing > 0 {
        s.push_str(&format!(" ({missing} missed)"));
    }
    (m, s)
}

fn med_max_count(runs: &[Outcome], f: impl Fn(&Outcome) -> f64, digits: usize) -> (f64, String) {
    let mut v: Vec<f64> = runs.iter().map(&f).collect();
    let m = median(&mut v);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (m, format!("{m:.digits$} / {max:.digits$}"))
}

/// Serf's convergence model (serf.io's simulator, LAN gossip): 99.99 % of 100 hosts in 2.0 s,
/// of 1,000 in 2.2 s. Only those two sizes are quoted.
fn serf_anchor(n: u32) -> Option<f64> {
    match n {
        100 => Some(2.0),
        1000 => Some(2.2),
        _ => None,
    }
}

/// memberlist's LAN defaults: one probe period (1 s) plus its suspicion timeout,
/// `4 x max(1, log10 N)` s (Lifeguard's lower bound: its timeout starts at 6x that and falls
/// towards it as other members confirm the suspicion).
fn memberlist_suspicion(n: u32) -> f64 {
    4.0 * f64::max(1.0, f64::from(n).log10())
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn parse_list(name: &str, default: &str) -> Vec<f64> {
    let v = std::env::var(name).unwrap_or_else(|_| default.into());
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?}: {x:?} is not a number"))
        })
        .collect()
}

struct Row {
    n: u32,
    loss: f64,
    quiet: Duration,
    runs: Vec<Outcome>,
}

fn main() {
    let sizes: Vec<u32> = parse_list("FNLET_BENCH_SIZES", "5,10,50,100,500,1000")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert!(
        sizes.iter().all(|&n| n >= 3),
        "FNLET_BENCH_SIZES: at least 3 hosts (one joins, one fails)"
    );
    let losses = parse_list("FNLET_BENCH_LOSS", "0,10");
    // 1,000 hosts at 10 % loss take about four minutes alone (every suspicion and refutation
    // is gossiped to all, and each update costs foca a linear search): left out unless the
    // sizes or the loss rates are given.
    let chosen = std::env::var_os("FNLET_BENCH_SIZES").is_some()
        || std::env::var_os("FNLET_BENCH_LOSS").is_some();
    let skipped = |n: u32, loss: f64| !chosen && n >= 1000 && loss > 0.0;
    let seeds_override = std::env::var("FNLET_BENCH_SEEDS")
        .ok()
        .map(|_| env_count("FNLET_BENCH_SEEDS", 0));
    let latency = Duration::from_micros(env_count("FNLET_BENCH_LATENCY_US", 200) as u64);
    let quiet_override = std::env::var("FNLET_BENCH_QUIET_S")
        .ok()
        .map(|_| env_count("FNLET_BENCH_QUIET_S", 60) as u64);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "fnlet cluster membership benchmark, {date}: {cores} cores, kernel {}, load average {}",
        kernel.trim(),
        common::load_average()
    );
    let config = config_size().map_or("N".to_string(), |n| n.to_string());
    let t = timing();
    println!(
        "  simulated: one-way latency {latency:?}, loss drawn per datagram, quiet phase {}, \
         foca_config({config}) (probe {probe:?}, ack {rtt:?}, suspicion {mult} x max(1, log10 N) \
         probes, gossip 200 ms to 3, packets <= 1100 bytes)",
        quiet_override.map_or(
            "60 s (20 s at 500 hosts, 10 s at 1,000)".into(),
            |q| format!("{q} s")
        ),
        probe = t.probe_period,
        rtt = t.probe_rtt,
        mult = t.suspicion_mult,
    );
    println!();

    let total = Instant::now();
    let mut rows = Vec::new();
    for &n in &sizes {
        // foca finds members by a linear search, so a simulated second costs O(N^2) (more with
        // loss, whose suspicions and refutations are gossiped to everyone): fewer seeds and a
        // shorter quiet phase for the large clusters keep a whole run near five minutes.
        let seeds = seeds_override.unwrap_or(match n {
            0..=100 => 10,
            _ => 2,
        });
        // At least 30 s: each host announces itself to a random member every 30 s (foca's
        // periodic announce), and the Feed it gets back is a share of the steady traffic.
        let quiet = Duration::from_secs(quiet_override.unwrap_or(match n {
            0..=100 => 60,
            _ => 30,
        }));
        for &loss_pct in losses.iter().filter(|&&l| !skipped(n, l)) {
            let loss = loss_pct / 100.0;
            let mut runs = Vec::new();
            let wall = Instant::now();
            for seed in 0..seeds as u64 {
                // The same seeds at each loss rate: the same bootstrap, then the loss differs.
                runs.push(run_one(n, loss, seed + 1, latency, quiet));
            }
            let steps: u64 = runs.iter().map(|r| r.steps).sum();
            println!(
                "N={n:<5} loss={loss_pct:>2}%: {seeds} seeds in {:.1} s wall ({} events, {:.1} us \
                 each; bootstrap {:.0}-{:.0} virtual s)",
                wall.elapsed().as_secs_f64(),
                steps,
                wall.elapsed().as_secs_f64() * 1e6 / steps.max(1) as f64,
                runs.iter()
                    .map(|r| r.bootstrap_s)
                    .fold(f64::INFINITY, f64::min),
                runs.iter().map(|r| r.bootstrap_s).fold(0.0, f64::max),
            );
            rows.push(Row {
                n,
                loss: loss_pct,
                quiet,
                runs,
            });
        }
    }
    println!("all runs: {:.1} s wall", total.elapsed().as_secs_f64());
    if sizes.iter().any(|&n| losses.iter().any(|&l| skipped(n, l))) {
        println!(
            "(1,000 hosts at 10 % loss left out: run them alone with FNLET_BENCH_SIZES=1000 \
             FNLET_BENCH_LOSS=10 FNLET_BENCH_SEEDS=1 FNLET_BENCH_QUIET_S=10, about four minutes)"
        );
    }
    println!();

    // Summary: one line per size and loss.
    println!(
        "Summary (median / max over seeds; times in virtual seconds; ratio = median / anchor)"
    );
    println!(
        "| N | loss | seeds | join, all members (s) | Serf 99.99 % (s) | ratio | detection, all survivors (s) | memberlist 1 s + suspicion (s) | ratio | false downs | forced rejoins | bytes/s/node |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (jm, js) = med_max(&r.runs, |o| o.join_all, JOIN_LIMIT.as_secs_f64());
        let (dm, ds) = med_max(&r.runs, |o| o.down_all, DETECT_LIMIT.as_secs_f64());
        let ml = 1.0 + memberlist_suspicion(r.n);
        let (_, fd) = med_max_count(&r.runs, |o| o.downed as f64, 0);
        let (_, rj) = med_max_count(&r.runs, |o| o.rejoins as f64, 0);
        let (_, bs) = med_max_count(&r.runs, |o| o.bytes_per_s, 0);
        println!(
            "| {} | {}% | {} | {js} | {} | {} | {ds} | {ml:.1} | {} | {fd} | {rj} | {bs} |",
            r.n,
            r.loss,
            r.runs.len(),
            serf_anchor(r.n).map_or("-".into(), |a| format!("{a:.1}")),
            ratio(jm, serf_anchor(r.n)),
            ratio(dm, Some(ml)),
        );
    }
    println!();

    println!(
        "Join: a new host announces to one member; time until the members list it alive \
         (median / max; rounds = median / 200 ms gossip period, and / 1 s probe period)"
    );
    println!(
        "| N | loss | 50 % (s) | 99 % (s) | all = 99.99 % (s) | gossip rounds | probe rounds | announces (max) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (_, h) = med_max(&r.runs, |o| o.join_50, JOIN_LIMIT.as_secs_f64());
        let (_, p) = med_max(&r.runs, |o| o.join_99, JOIN_LIMIT.as_secs_f64());
        let (am, a) = med_max(&r.runs, |o| o.join_all, JOIN_LIMIT.as_secs_f64());
        let ann = r.runs.iter().map(|o| o.announces).max().unwrap_or(0);
        let rounds = |period: f64, digits: usize| {
            if am.is_finite() {
                format!("{:.digits$}", am / period)
            } else {
                "-".into()
            }
        };
        println!(
            "| {} | {}% | {h} | {p} | {a} | {} | {} | {ann} |",
            r.n,
            r.loss,
            rounds(secs(GOSSIP_PERIOD), 1),
            rounds(1.0, 2),
        );
    }
    println!();

    println!(
        "Failure: one host stops; time from the stop (median / max) until the first member \
         suspects it, the first declares it down, and every survivor has"
    );
    println!(
        "| N | loss | first suspect (s) | first down (s) | all down (s) | all down - first suspect (s) | foca suspect->down (s) | bounds: down expected / worst (s) | memberlist suspicion (s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let lim = DETECT_LIMIT.as_secs_f64();
        let (_, s) = med_max(&r.runs, |o| o.suspect_first, lim);
        let (_, f) = med_max(&r.runs, |o| o.down_first, lim);
        let (_, a) = med_max(&r.runs, |o| o.down_all, lim);
        let (_, spread) = med_max(&r.runs, |o| Some(o.down_all? - o.suspect_first?), lim);
        // The bounds of the configuration the hosts ran, for the real cluster size.
        let size = NonZeroU32::new(r.n).expect("n >= 3");
        let made_for = NonZeroU32::new(config_size().unwrap_or(r.n)).expect("n >= 3");
        let b = DetectionBounds::new(&foca_config_with(made_for, timing()), size);
        println!(
            "| {} | {}% | {s} | {f} | {a} | {spread} | {:.1} | {:.1} / {:.0} | {:.1} |",
            r.n,
            r.loss,
            secs(b.suspect_to_down),
            secs(b.down_expected),
            secs(b.down_worst),
            memberlist_suspicion(r.n),
        );
    }
    println!();

    println!(
        "Quiet phase (no failure): false positives and traffic per host (median / max); \
         suspicions = distinct (host, incarnation) suspected, per minute"
    );
    println!(
        "| N | loss | window (s) | hosts suspected | suspicions/min | hosts declared down | down declarations | rejoins | cut off | bytes/s/node | packets/s/node |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let per_min = 60.0 / secs(r.quiet);
        let (_, sus) = med_max_count(&r.runs, |o| o.suspected as f64, 0);
        let (_, susn) = med_max_count(&r.runs, |o| o.suspicions as f64 * per_min, 1);
        let (_, dn) = med_max_count(&r.runs, |o| o.downed as f64, 0);
        let (_, dne) = med_max_count(&r.runs, |o| o.down_events as f64, 0);
        let (_, rj) = med_max_count(&r.runs, |o| o.rejoins as f64, 0);
        let (_, co) = med_max_count(&r.runs, |o| o.cut_off as f64, 0);
        let (_, bs) = med_max_count(&r.runs, |o| o.bytes_per_s, 0);
        let (_, ps) = med_max_count(&r.runs, |o| o.packets_per_s, 2);
        println!(
            "| {} | {}% | {} | {sus} | {susn} | {dn} | {dne} | {rj} | {co} | {bs} | {ps} |",
            r.n,
            r.loss,
            r.quiet.as_secs()
        );
    }
    println!();

    let mut refusals: HashMap<String, u64> = HashMap::new();
    for r in &rows {
        for o in &r.runs {
            for (k, v) in &o.refusals {
                *refusals.entry(k.clone()).or_default() += v;
            }
        }
    }
    let mut refusals: Vec<_> = refusals.into_iter().collect();
    refusals.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!("foca refusals over all runs (datagrams and timers it returned an error for):");
    if refusals.is_empty() {
        println!("  none");
    }
    for (k, v) in refusals {
        println!("  {v:>8}  {k}");
    }
}
