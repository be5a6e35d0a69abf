//! Deploy once, call anywhere: the cluster's catalog kept in step with this host's store.
//!
//! A deploy, rollback or removal here is written to the catalog (a last-writer-wins map ordered
//! by a hybrid logical clock) and its delta pushed to every live peer on a unidirectional
//! stream. A peer applies what is newer, fetches a bundle it lacks by hash from the host that
//! sent the delta (verifying the content hash before use), records the version and serves it.
//! Digests are swapped when a peer comes up and every [`SYNC_EVERY`] with one live peer, so
//! what a lost push or a partition missed converges, to the same winner on every host.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fnlet_cluster::Sha256Hash;
use fnlet_cluster::catalog::{
    Catalog, Change, Delta, Digest, Entry, FunctionRecord, Key, ScheduleRecord, Value,
};
use fnlet_cluster::frame::{self, Claim, ErrorCode, Expect, Frame, Limits, ScheduleClaim};
use fnlet_cluster::hlc::ntp64;

use super::node::Node;
use super::wire::{self, FrameReader, WireError};
use crate::api::App;
use crate::bundle::{self, BundleLimits};
use crate::manifest::Manifest;
use crate::store::VersionRecord;

/// Changes to schedule records alone (the ticks fired here, and those peers pushed) are
/// written to `catalog.json` at most this often, not at each change: each host used to
/// rewrite the whole file once per batch of ticks it fired and once per peer's batch (see
/// BENCHMARKS.md, "catalog.json while schedules fire"). What such a write holds is not lost
/// by a crash before it: the ticks this host fired are in its event queue (committed with each
/// tick's event, fsynced), and other hosts' records come back with the catalog sync a host
/// waits for at start (`schedules.startup_sync_s`). A claim granted to a peer, and every
/// other change, is written at once.
pub const SCHEDULE_SAVE_EVERY: Duration = Duration::from_secs(1);

/// The longest a claim waits for a host this host sees down (`schedules.claim_wait_s` is for
/// hosts seen live). A host seen down is asked at every tick for as long as it stays down, and
/// the tick waits for it: waiting a whole second made a stand-in fire each per-second tick more
/// than `handoff_wait_s` late, so the owner coming back, finding the record a tick behind, took
/// over past the tick the stand-in was still claiming, and that tick ran nowhere
/// (tests/schedules.rs, kill and restart). A host that is up after all (restarted, or across a
/// healed partition) answers within a handshake and a round trip.
pub const DOWN_CLAIM_WAIT: Duration = Duration::from_millis(250);

/// How often a host swaps digests with one live peer.
pub const SYNC_EVERY: Duration = Duration::from_secs(10);
/// Largest catalog frame meta: well under the frame limit.
const CHUNK: usize = 48 * 1024;
/// A bundle travels in Data frames of this size.
const BUNDLE_CHUNK: usize = 256 * 1024;

pub(super) fn now() -> fnlet_cluster::hlc::NTP64 {
    ntp64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// The catalog and what this host knows about the bundles it served.
pub struct Replica {
    catalog: Mutex<Catalog>,
    path: PathBuf,
    /// When `catalog.json` was last written, and whether a write is due (schedule records).
    saves: Mutex<Saves>,
    app: Mutex<Weak<App>>,
    /// Per bundle hash: how many peers fetched it from here (a deploy waits on it).
    served: Mutex<HashMap<String, usize>>,
    served_changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Saves {
    last: Option<std::time::Instant>,
    due: bool,
}

impl Replica {
    /// The catalog kept in `<cluster dir>/catalog.json`.
    pub fn open(node_id: &str, dir: &std::path::Path) -> Result<Replica, String> {
        let path = dir.join("catalog.json");
        let entries: Vec<Entry> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let catalog = Catalog::from_entries(node_id, entries).map_err(|e| e.to_string())?;
        Ok(Replica {
            catalog: Mutex::new(catalog),
            path,
            saves: Mutex::new(Saves::default()),
            app: Mutex::new(Weak::new()),
            served: Mutex::new(HashMap::new()),
            served_changed: tokio::sync::Notify::new(),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn app(&self) -> Option<Arc<App>> {
        self.app.lock().unwrap_or_else(|p| p.into_inner()).upgrade()
    }

    fn saves(&self) -> std::sync::MutexGuard<'_, Saves> {
        self.saves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `catalog` (held locked by the caller) to `catalog.json` now.
    pub(super) fn save(&self, catalog: &Catalog) {
        self.saves().last = Some(std::time::Instant::now());
        if let Err(e) = write_catalog(&self.path, catalog) {
            tracing::error!("keeping the catalog in {}: {e}", self.path.display());
        }
    }

    pub fn digest(&self) -> Digest {
        self.lock().digest()
    }
}

/// Writes the catalog to `path` (`catalog.json`): every entry as JSON, into a temporary file
/// renamed over it. (Public for the catalog bench, which times it.)
pub fn write_catalog(path: &std::path::Path, catalog: &Catalog) -> std::io::Result<()> {
    let entries: Vec<Entry> = catalog.entries().collect();
    let tmp = path.with_extension("tmp");
    let b = serde_json::to_vec(&entries).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, b)?;
    std::fs::rename(&tmp, path)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One schedule's ticks this host is about to fire (see [`Node::claim_schedules`]).
#[derive(Debug, Clone)]
pub struct TickClaim {
    pub schedule: String,
    pub function: String,
    /// The function version the scheduler made the schedule from.
    pub version: u64,
    pub from_ms: u64,
    pub tick_ms: u64,
}

/// What became of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Fire the ticks.
    Fire,
    /// A tick from `from_ms` on was fired, or granted, elsewhere (or here): not fired.
    Taken { tick_ms: u64, fired_by: String },
    /// The schedule's function or trigger is removed in the catalog: not fired.
    Removed,
}

/// A claim's outcome, and the hosts asked that did not answer in time.
#[derive(Debug, Clone)]
pub struct ClaimResult {
    pub outcome: Claimed,
    pub unanswered: Vec<String>,
}

/// Whether the catalog still has schedule `id`: its function is not removed, and its active
/// manifest has the trigger. A function the catalog does not know (deployed here before this
/// host was in a cluster, not yet published) counts as there. With `made_from` (the function
/// and the version the scheduler made the schedule from), a catalog at that version needs no
/// look at the manifest.
fn scheduled_in(catalog: &Catalog, id: &str, made_from: Option<(&str, u64)>) -> bool {
    let Some(function) = crate::triggers::schedule::function_of(id) else {
        return false;
    };
    let key = Key::Function(function.to_string());
    if catalog.version(&key).is_none() {
        return true;
    }
    let Some(rec) = catalog.function(function) else {
        return false;
    };
    if made_from.is_some_and(|(f, v)| f == function && v == rec.version) {
        return true;
    }
    match serde_json::from_value::<Manifest>(rec.manifest.clone()) {
        Ok(m) => crate::triggers::schedule::schedules_of(function, &m)
            .iter()
            .any(|(s, _, _)| s == id),
        Err(_) => false,
    }
}

/// The schedules of `function` recorded in the catalog that its manifest `now_has` (none: the
/// function is removed) no longer has.
fn gone_schedules(catalog: &Catalog, function: &str, now_has: Option<&Manifest>) -> Vec<String> {
    let keep: Vec<String> = now_has
        .map(|m| {
            crate::triggers::schedule::schedules_of(function, m)
                .into_iter()
                .map(|(id, _, _)| id)
                .collect()
        })
        .unwrap_or_default();
    catalog
        .schedules()
        .filter(|(id, _)| crate::triggers::schedule::function_of(id) == Some(function))
        .filter(|(id, _)| !keep.iter().any(|k| k == id))
        .map(|(id, _)| id.to_string())
        .collect()
}

fn record_of(node: &str, v: &VersionRecord) -> Result<FunctionRecord, String> {
    Ok(FunctionRecord {
        version: v.version,
        manifest: serde_json::to_value(&v.manifest).map_err(|e| e.to_string())?,
        bundle_sha256: v.sha256.parse::<Sha256Hash>().map_err(|e| e.to_string())?,
        size: v.size_bytes,
        deployed_by: node.to_string(),
        deployed_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    })
}

impl Node {
    /// Writes `catalog` (held locked by the caller), changed in schedule records only, now if
    /// it was not written within [`SCHEDULE_SAVE_EVERY`], else once that much time has passed
    /// since the last write.
    pub(super) fn save_schedules(self: &Arc<Self>, catalog: &Catalog) {
        let at = {
            let mut s = self.replica.saves();
            if s.due {
                // A write is coming: it takes the catalog as it is then.
                return;
            }
            match s.last {
                Some(t) if t.elapsed() < SCHEDULE_SAVE_EVERY => {
                    s.due = true;
                    t + SCHEDULE_SAVE_EVERY
                }
                _ => {
                    drop(s);
                    self.replica.save(catalog);
                    return;
                }
            }
        };
        let node = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            node.flush_catalog();
        });
    }

    /// Writes the catalog now if a write of schedule records is due.
    pub fn flush_catalog(&self) {
        let catalog = self.replica.lock();
        let due = std::mem::take(&mut self.replica.saves().due);
        if due {
            self.replica.save(&catalog);
        }
    }

    /// Connects the catalog to the agent: functions and access keys this host had before it
    /// was in a cluster (or deployed while it was cut off and unknown to the catalog) are
    /// published.
    pub fn attach(self: &Arc<Self>, app: &Arc<App>) {
        *self.replica.app.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(app);
        self.attach_keys(app);
        self.start_load_reports(app.router.registry.clone());
        let Ok(list) = app.store.list() else { return };
        let mut missing = Vec::new();
        {
            let catalog = self.replica.lock();
            for (_, v) in list {
                if catalog.version(&Key::Function(v.name.clone())).is_none() {
                    missing.push(v);
                }
            }
        }
        for v in missing {
            self.published(&v);
        }
    }

    /// A deploy or rollback made here: written to the catalog and pushed to the peers.
    pub fn published(self: &Arc<Self>, v: &VersionRecord) {
        let delta = {
            let mut catalog = self.replica.lock();
            let written = record_of(&self.id, v).and_then(|r| {
                let mut d = catalog
                    .put_function(&v.name, r, now())
                    .map_err(|e| e.to_string())?;
                // The schedules of triggers this version no longer has go with it.
                for id in gone_schedules(&catalog, &v.name, Some(&v.manifest)) {
                    if let Some(t) = catalog.remove_schedule(&id, now()).map_err(|e| e.to_string())? {
                        tracing::info!(function = %v.name, schedule = %id, "schedule removed (its trigger went)");
                        d.entries.extend(t.entries);
                    }
                }
                Ok(d)
            });
            match written {
                Ok(d) => {
                    self.replica.save(&catalog);
                    d
                }
                Err(e) => {
                    tracing::error!(function = %v.name, "not published to the cluster: {e}");
                    return;
                }
            }
        };
        self.push(delta);
    }

    /// A digest swap with live peer `peer` (the previous owner of a schedule, before this host
    /// fires a tick it waited for): whether it completed.
    pub async fn sync_from(self: &Arc<Self>, peer: &str) -> bool {
        let Some(p) = self.live_peers().into_iter().find(|p| p.id == peer) else {
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(2), self.sync_with(&p.id, p.addr)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(peer, "catalog sync before a schedule's tick: {e}");
                false
            }
            Err(_) => false,
        }
    }

    /// A schedule's last fired tick in the catalog.
    pub fn schedule_record(&self, id: &str) -> Option<ScheduleRecord> {
        self.replica.lock().schedule(id).cloned()
    }

    /// Claims schedule ticks before they are fired, so that two hosts that each think they
    /// own a schedule (a restart, a partition healing: their views of who is up differ) do not
    /// both fire a tick. For each schedule, in order:
    ///
    /// 1. the hosts ranked above this one (for the schedule, over every member this host
    ///    knows, down ones included: it would not own the schedule if it saw them up) are
    ///    asked, all at once;
    /// 2. the claim is checked and recorded in this host's catalog in one step (refused when a
    ///    tick from `from_ms` on is recorded: fired here or elsewhere, or granted to another);
    /// 3. the host that fired the last tick, if it is ranked below this one, is asked.
    ///
    /// An asked host checks and records the claim in one step under its catalog lock, as this
    /// host does its own (see [`Node::serve_claim`]). So for two hosts that know each other,
    /// the one ranked higher serializes the lower one's claim with its own: it records one of
    /// the two first, and the other is refused, by it or by the lower one (which records the
    /// higher one's claim only before recording its own). A host that does not answer within
    /// `wait` (seen live) or [`DOWN_CLAIM_WAIT`] (seen down) is passed over (in
    /// [`ClaimResult::unanswered`]): across a partition each side fires.
    pub async fn claim_schedules(
        self: &Arc<Self>,
        claims: &[TickClaim],
        wait: Duration,
    ) -> Vec<ClaimResult> {
        let mut out: Vec<ClaimResult> = claims
            .iter()
            .map(|_| ClaimResult {
                outcome: Claimed::Fire,
                unanswered: Vec::new(),
            })
            .collect();
        let known = self.known_ids();
        let mut above: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut below: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        {
            let catalog = self.replica.lock();
            for (i, c) in claims.iter().enumerate() {
                if !scheduled_in(&catalog, &c.schedule, Some((&c.function, c.version))) {
                    out[i].outcome = Claimed::Removed;
                    continue;
                }
                let stored = catalog.schedule(&c.schedule);
                if let Some(r) = stored.filter(|r| r.tick_ms >= c.from_ms && !self.is_mine(r, c)) {
                    out[i].outcome = Claimed::Taken {
                        tick_ms: r.tick_ms,
                        fired_by: r.fired_by.clone(),
                    };
                    continue;
                }
                if wait.is_zero() {
                    continue;
                }
                let ranked =
                    fnlet_cluster::route::rank(&c.schedule, known.iter().map(String::as_str));
                let me = ranked.iter().position(|h| *h == self.id).unwrap_or(0);
                for h in &ranked[..me] {
                    above.entry(h.to_string()).or_default().push(i);
                }
                if let Some(p) = stored.map(|r| r.fired_by.as_str())
                    && ranked[me..].contains(&p)
                    && p != self.id
                {
                    below.entry(p.to_string()).or_default().push(i);
                }
            }
        }
        self.ask_claims(claims, above, wait, &mut out).await;
        // Recorded here: from now on a claim from a host ranked below is refused.
        let mut delta = Delta::default();
        {
            let mut catalog = self.replica.lock();
            let now_ms = unix_ms();
            for (i, c) in claims.iter().enumerate() {
                if out[i].outcome != Claimed::Fire {
                    continue;
                }
                if catalog
                    .schedule(&c.schedule)
                    .is_some_and(|r| self.is_mine(r, c))
                {
                    // Granted here by a host above (its answer, applied), or recorded before.
                    continue;
                }
                let record = ScheduleRecord {
                    tick_ms: c.tick_ms,
                    fired_by: self.id.clone(),
                    fired_at_ms: now_ms,
                    epoch: 0,
                    removed: false,
                };
                match catalog.fire_schedule(&c.schedule, c.from_ms, record, now()) {
                    Ok(Some(d)) => delta.entries.extend(d.entries),
                    Ok(None) => {
                        let r = catalog.schedule(&c.schedule);
                        out[i].outcome = Claimed::Taken {
                            tick_ms: r.map_or(c.tick_ms, |r| r.tick_ms),
                            fired_by: r.map_or_else(String::new, |r| r.fired_by.clone()),
                        };
                    }
                    // Not recorded: fired all the same (the queue takes its id once).
                    Err(e) => {
                        tracing::error!(schedule = %c.schedule, "recording a claimed tick: {e}")
                    }
                }
            }
            if !delta.is_empty() {
                // The ticks fired are kept in the event queue too: the file can wait.
                self.save_schedules(&catalog);
            }
        }
        if !delta.is_empty() {
            self.push(delta);
        }
        for ids in below.values_mut() {
            ids.retain(|&i| out[i].outcome == Claimed::Fire);
        }
        below.retain(|_, ids| !ids.is_empty());
        self.ask_claims(claims, below, wait, &mut out).await;
        out
    }

    /// Whether `r` records `c`'s last tick fired by this host (granted to it, or recorded by
    /// an earlier try).
    fn is_mine(&self, r: &ScheduleRecord, c: &TickClaim) -> bool {
        !r.removed && r.tick_ms == c.tick_ms && r.fired_by == self.id
    }

    /// Asks each host in `asks` (host -> indexes into `claims`) at once, waiting `wait` at
    /// most for a host seen live, [`DOWN_CLAIM_WAIT`] at most for one seen down; a claim a host
    /// refuses is [`Claimed::Taken`] (or [`Claimed::Removed`]) in `out`.
    async fn ask_claims(
        self: &Arc<Self>,
        claims: &[TickClaim],
        asks: BTreeMap<String, Vec<usize>>,
        wait: Duration,
        out: &mut [ClaimResult],
    ) {
        let live = self.live_ids();
        let asks = asks.into_iter().map(|(peer, which)| {
            let node = self.clone();
            let wait = if live.contains(&peer) {
                wait
            } else {
                wait.min(DOWN_CLAIM_WAIT)
            };
            let request: Vec<Claim> = which
                .iter()
                .map(|&i| Claim {
                    schedule: claims[i].schedule.clone(),
                    from_ms: claims[i].from_ms,
                    tick_ms: claims[i].tick_ms,
                })
                .collect();
            async move {
                let answer = match node.member_addr(&peer) {
                    Some(addr) => {
                        match tokio::time::timeout(wait, node.send_claims(&peer, addr, request))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(format!("no answer within {wait:?}")),
                        }
                    }
                    None => Err("not a member".to_string()),
                };
                (peer, which, answer)
            }
        });
        for (peer, which, answer) in futures_util::future::join_all(asks).await {
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(peer = %peer, "claiming schedule ticks: {e}");
                    for i in which {
                        out[i].unanswered.push(peer.clone());
                    }
                    continue;
                }
            };
            // What the peer holds is applied here too: it may know later ticks, and a grant
            // is recorded here before this host records its own claim.
            self.apply_remote(&answer, &peer);
            for i in which {
                let c = &claims[i];
                let key = Key::Schedule(c.schedule.clone());
                let record =
                    answer
                        .entries
                        .iter()
                        .find(|e| e.key == key)
                        .and_then(|e| match &e.value {
                            Some(Value::Schedule(r)) => Some(r.clone()),
                            _ => None,
                        });
                if record.as_ref().is_some_and(|r| self.is_mine(r, c))
                    || out[i].outcome != Claimed::Fire
                {
                    continue;
                }
                out[i].outcome = match record {
                    Some(r) if r.removed => Claimed::Removed,
                    Some(r) => {
                        if r.tick_ms == c.tick_ms {
                            // Recorded here too (step 3), fired there: the record says who.
                            let noted = {
                                let mut catalog = self.replica.lock();
                                let n = catalog.note_schedule(&c.schedule, r.clone(), now());
                                if matches!(n, Ok(Some(_))) {
                                    self.save_schedules(&catalog);
                                }
                                n
                            };
                            if let Ok(Some(d)) = noted {
                                self.push(d);
                            }
                        }
                        Claimed::Taken {
                            tick_ms: r.tick_ms,
                            fired_by: r.fired_by,
                        }
                    }
                    // The peer does not have the schedule (its function is not there yet).
                    None => Claimed::Taken {
                        tick_ms: c.tick_ms,
                        fired_by: peer.clone(),
                    },
                };
            }
        }
    }

    /// Sends one ScheduleClaim to `peer` and reads its answer: its entries of the schedules.
    async fn send_claims(
        self: &Arc<Self>,
        peer: &str,
        addr: std::net::SocketAddr,
        claims: Vec<Claim>,
    ) -> Result<Delta, String> {
        let conn = self
            .transport
            .connect(peer, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = Frame::ScheduleClaim(ScheduleClaim { claims });
        wire::send(&mut send, &request)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let expect = Expect::answer_to(&request).ok_or("no answer expected")?;
        let mut reader = FrameReader::new(recv, Limits::default(), expect);
        let mut answer = Delta::default();
        loop {
            match reader.next().await {
                Ok(Some(Frame::CatalogDelta(d))) => answer.entries.extend(d.entries),
                Ok(Some(Frame::Error(e))) => return Err(e.message),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(answer),
                Err(e) => {
                    if wire::close_for(&conn, &e, peer) {
                        self.metrics.bad_frame();
                    }
                    return Err(e.to_string());
                }
            }
        }
    }

    /// A peer's claim of schedule ticks (see [`Node::claim_schedules`]): each granted (recorded
    /// as fired by the peer) unless a tick from its `from_ms` on is recorded here, or the
    /// schedule is not in this host's catalog; answered with this host's entries.
    pub(super) async fn serve_claim(
        self: &Arc<Self>,
        peer: &str,
        claim: ScheduleClaim,
        send: &mut quinn::SendStream,
    ) -> Result<(), WireError> {
        let now_ms = unix_ms();
        let mut writes = Delta::default();
        let mut answer = Delta::default();
        {
            let mut catalog = self.replica.lock();
            for c in &claim.claims {
                if scheduled_in(&catalog, &c.schedule, None) {
                    let record = ScheduleRecord {
                        tick_ms: c.tick_ms,
                        fired_by: peer.to_string(),
                        fired_at_ms: now_ms,
                        epoch: 0,
                        removed: false,
                    };
                    match catalog.fire_schedule(&c.schedule, c.from_ms, record, now()) {
                        Ok(Some(d)) => {
                            tracing::info!(peer, schedule = %c.schedule, tick_ms = c.tick_ms, "granted a schedule's ticks to the host that claimed them");
                            writes.entries.extend(d.entries);
                        }
                        Ok(None) => {
                            tracing::info!(peer, schedule = %c.schedule, tick_ms = c.tick_ms, "refused a claim of schedule ticks: fired or granted already");
                        }
                        Err(e) => {
                            tracing::error!(schedule = %c.schedule, "recording a granted tick: {e}")
                        }
                    }
                }
                answer
                    .entries
                    .extend(catalog.entry(&Key::Schedule(c.schedule.clone())));
            }
            if !writes.is_empty() {
                self.replica.save(&catalog);
            }
        }
        if !writes.is_empty() {
            self.push(writes);
        }
        answer_with(send, answer).await
    }

    /// A removal made here.
    pub fn unpublished(self: &Arc<Self>, name: &str) {
        let delta = {
            let mut catalog = self.replica.lock();
            let removed = catalog
                .remove_function(name, now())
                .map_err(|e| e.to_string());
            // Its schedules go with it.
            let removed = removed.and_then(|mut d| {
                for id in gone_schedules(&catalog, name, None) {
                    let t = catalog
                        .remove_schedule(&id, now())
                        .map_err(|e| e.to_string())?;
                    d.entries.extend(t.into_iter().flat_map(|t| t.entries));
                }
                Ok(d)
            });
            match removed {
                Ok(d) => {
                    self.replica.save(&catalog);
                    d
                }
                Err(e) => {
                    tracing::error!(function = name, "removal not published to the cluster: {e}");
                    return;
                }
            }
        };
        self.push(delta);
    }

    /// Sends a delta to every live peer, each on a unidirectional stream.
    pub(super) fn push(self: &Arc<Self>, delta: Delta) {
        let Ok(chunks) = delta.chunks(CHUNK) else {
            tracing::error!("a catalog delta does not fit in frames");
            return;
        };
        for peer in self.live_peers() {
            let (node, chunks) = (self.clone(), chunks.clone());
            tokio::spawn(async move {
                let sent = async {
                    let conn = node
                        .transport
                        .connect(&peer.id, peer.addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
                    for c in chunks {
                        wire::send(&mut send, &Frame::CatalogDelta(c))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    send.finish().map_err(|e| e.to_string())?;
                    Ok::<(), String>(())
                };
                if let Err(e) = sent.await {
                    // The next digest swap makes up for it.
                    tracing::debug!(peer = %peer.id, "pushing a catalog delta: {e}");
                }
            });
        }
    }

    /// Waits until `want` peers fetched bundle `sha` from here, or `limit` passes; returns how
    /// many hosts hold it (this one included).
    pub async fn await_replicas(&self, sha: &str, want: usize, limit: Duration) -> usize {
        let count = || {
            self.replica
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(sha)
                .copied()
                .unwrap_or(0)
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.replica.served_changed.notified();
            let n = count();
            if n >= want {
                return n + 1;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return count() + 1;
            }
        }
    }

    /// Gossip from `peer`: CatalogDelta frames on a unidirectional stream.
    pub(super) async fn serve_gossip(
        self: &Arc<Self>,
        peer: &str,
        conn: &quinn::Connection,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv, Limits::default(), Expect::gossip());
        loop {
            match reader.next().await {
                Ok(Some(Frame::CatalogDelta(d))) => self.apply_remote(&d, peer),
                Ok(Some(_)) | Ok(None) => break,
                Err(e) => {
                    if wire::close_for(conn, &e, peer) {
                        self.metrics.bad_frame();
                    }
                    break;
                }
            }
        }
    }

    /// Answers a peer's digest (the rest of the request is read here) with what it lacks.
    pub(super) async fn serve_digest(
        self: &Arc<Self>,
        first: Digest,
        reader: &mut FrameReader,
        send: &mut quinn::SendStream,
    ) -> Result<(), WireError> {
        let mut digests = vec![first];
        while let Some(f) = reader.next().await? {
            if let Frame::CatalogDigest(d) = f {
                digests.push(d);
            }
        }
        let delta = {
            let catalog = self.replica.lock();
            let mut out = Delta::default();
            for d in &digests {
                out.entries.extend(catalog.diff(d).entries);
            }
            out
        };
        answer_with(send, delta).await
    }

    /// Swaps digests with `peer`: what it has newer is applied here.
    pub async fn sync_with(
        self: &Arc<Self>,
        peer: &str,
        addr: std::net::SocketAddr,
    ) -> Result<usize, String> {
        let conn = self
            .transport
            .connect(peer, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let digest = self.replica.digest();
        let chunks = digest.chunks(CHUNK).map_err(|e| e.to_string())?;
        let Some(first) = chunks.first().cloned() else {
            return Ok(0);
        };
        let request = Frame::CatalogDigest(first);
        for c in chunks {
            wire::send(&mut send, &Frame::CatalogDigest(c))
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())?;
        let expect = Expect::answer_to(&request).ok_or("no answer expected")?;
        let mut reader = FrameReader::new(recv, Limits::default(), expect);
        let mut applied = 0;
        loop {
            match reader.next().await {
                Ok(Some(Frame::CatalogDelta(d))) => {
                    applied += d.entries.len();
                    self.apply_remote(&d, peer);
                }
                Ok(Some(Frame::Error(e))) => return Err(e.message),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    if wire::close_for(&conn, &e, peer) {
                        self.metrics.bad_frame();
                    }
                    return Err(e.to_string());
                }
            }
        }
        Ok(applied)
    }

    /// Applies a peer's delta; what changed is made so in the store, in the background.
    fn apply_remote(self: &Arc<Self>, delta: &Delta, from: &str) {
        let changes = {
            let mut catalog = self.replica.lock();
            match catalog.apply(delta, now()) {
                Ok(c) => {
                    if c.iter().all(|c| matches!(c.key, Key::Schedule(_))) {
                        if !c.is_empty() {
                            self.save_schedules(&catalog);
                        }
                    } else {
                        self.replica.save(&catalog);
                    }
                    c
                }
                Err(e) => {
                    tracing::warn!(peer = from, "catalog delta refused: {e}");
                    return;
                }
            }
        };
        for change in changes {
            let (node, from) = (self.clone(), from.to_string());
            tokio::spawn(async move { node.reconcile(change, &from).await });
        }
    }

    /// Makes the store hold what the catalog now says about one key.
    async fn reconcile(self: Arc<Self>, change: Change, from: &str) {
        let name = match &change.key {
            Key::Function(name) => name,
            Key::AccessKey(id) => return self.reconcile_key(id).await,
            // Read by the scheduler when it fires.
            Key::Schedule(_) => return,
        };
        let Some(app) = self.replica.app() else {
            return;
        };
        match change.value {
            Some(Value::Function(rec)) => {
                if let Err(e) = self.take_version(&app, name, &rec, from).await {
                    tracing::warn!(function = %name, version = rec.version, peer = from, "not serving the cluster's version: {e}");
                }
            }
            None => {
                let app2 = app.clone();
                let name = name.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let store = app2.store.changes();
                    if store.function(&name).is_ok() {
                        if let Err(e) = store.remove(&name) {
                            tracing::warn!(function = %name, "removing as the cluster did: {e}");
                            return;
                        }
                        app2.router.registry.remove(&name);
                        app2.router.network_changed(&name);
                        app2.router.logs.remove(&name);
                        tracing::info!(function = %name, "removed (by the cluster)");
                    }
                })
                .await;
            }
            Some(_) => {}
        }
    }

    async fn take_version(
        &self,
        app: &Arc<App>,
        name: &str,
        rec: &FunctionRecord,
        from: &str,
    ) -> Result<(), String> {
        let sha = rec.bundle_sha256.to_string();
        if let Ok(f) = app.store.function(name)
            && let Ok(v) = app.store.version(name, f.active)
            && v.version == rec.version
            && v.sha256 == sha
        {
            return Ok(());
        }
        let manifest: Manifest = serde_json::from_value(rec.manifest.clone())
            .map_err(|e| format!("its manifest: {e}"))?;
        if manifest.name != name {
            return Err(format!("its manifest names {:?}", manifest.name));
        }
        let staging = app.store.staging_dir().map_err(|e| e.to_string())?;
        let unpacked = if app.store.bundle_path(&sha).is_dir() {
            None
        } else {
            let bytes = self.fetch_bundle(from, &rec.deployed_by, &sha, app).await?;
            let limits = BundleLimits {
                max_unpacked_bytes: app.config.limits.max_unpacked_mb << 20,
                max_files: app.config.limits.max_bundle_files,
            };
            let dest = staging.path().to_path_buf();
            let u = tokio::task::spawn_blocking(move || bundle::unpack(&bytes, &dest, limits))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("the fetched bundle: {e}"))?;
            if u.sha256 != sha {
                return Err(format!(
                    "the fetched bundle's content hash is {}, not {sha}: refused",
                    u.sha256
                ));
            }
            Some(u)
        };
        let (app2, name2, rec2) = (app.clone(), name.to_string(), rec.clone());
        let v = tokio::task::spawn_blocking(move || {
            let store = app2.store.changes();
            let v = store
                .import(&manifest, &sha, rec2.size, rec2.version, unpacked.as_ref())
                .map_err(|e| e.to_string())?;
            crate::api::activate(&app2, &store, &name2).map_err(|e| e.message)?;
            if let Err(e) = store.gc(
                app2.config.retain_versions,
                &app2.router.registry.bundles_in_use(),
            ) {
                tracing::warn!("garbage collection after a cluster deploy: {e}");
            }
            Ok::<VersionRecord, String>(v)
        })
        .await
        .map_err(|e| e.to_string())??;
        drop(staging);
        tracing::info!(function = %name, version = v.version, deployed_by = %rec.deployed_by, "serving the cluster's version");
        app.router.logs.append(
            name,
            v.version,
            "-",
            "agent",
            &format!(
                "version {} from {} ({})",
                v.version,
                rec.deployed_by,
                &v.sha256[..12.min(v.sha256.len())]
            ),
        );
        Ok(())
    }

    /// Fetches a bundle by hash: from the peer that sent the change, else from the deployer,
    /// else from any live peer.
    async fn fetch_bundle(
        &self,
        from: &str,
        deployer: &str,
        sha: &str,
        app: &App,
    ) -> Result<Bytes, String> {
        let mut sources: Vec<(String, std::net::SocketAddr)> = Vec::new();
        let live = self.live_peers();
        for id in [from, deployer] {
            if let Some(p) = live.iter().find(|p| p.id == id)
                && !sources.iter().any(|(s, _)| s == id)
            {
                sources.push((p.id.clone(), p.addr));
            }
        }
        sources.extend(
            live.iter()
                .filter(|p| !sources.iter().any(|(s, _)| *s == p.id))
                .map(|p| (p.id.clone(), p.addr))
                .collect::<Vec<_>>(),
        );
        let hash: Sha256Hash = sha
            .parse()
            .map_err(|e: fnlet_cluster::BadSha256| e.to_string())?;
        let max = app.config.limits.max_bundle_mb << 20;
        let mut last = "no live peer holds it".to_string();
        for (peer, addr) in sources {
            match self.fetch_from(&peer, addr, hash, max).await {
                Ok(b) => return Ok(b),
                Err(e) => last = format!("{peer}: {e}"),
            }
        }
        Err(format!("fetching bundle {sha}: {last}"))
    }

    async fn fetch_from(
        &self,
        peer: &str,
        addr: std::net::SocketAddr,
        sha: Sha256Hash,
        max: u64,
    ) -> Result<Bytes, String> {
        let conn = self
            .transport
            .connect(peer, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = Frame::BundleRequest(frame::BundleRequest { sha256: sha });
        wire::send(&mut send, &request)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let expect = Expect::answer_to(&request).ok_or("no answer expected")?;
        let limits = Limits {
            max_body: BUNDLE_CHUNK as u32 * 2,
        };
        let mut reader = FrameReader::new(recv, limits, expect);
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(Frame::BundleHead(h))) => {
                    if h.size > max {
                        return Err(format!("{} bytes, over limits.max_bundle_mb", h.size));
                    }
                    out.reserve(h.size as usize);
                }
                Ok(Some(Frame::Data(d))) => out.extend_from_slice(&d),
                Ok(Some(Frame::Error(e))) => return Err(e.message),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    if wire::close_for(&conn, &e, peer) {
                        self.metrics.bad_frame();
                    }
                    return Err(e.to_string());
                }
            }
        }
        Ok(Bytes::from(out))
    }

    /// Sends a bundle this host holds, packed as a .tar.gz (the content hash is checked by the
    /// receiver after unpacking).
    pub(super) async fn serve_bundle(
        &self,
        req: frame::BundleRequest,
        send: &mut quinn::SendStream,
    ) -> Result<(), WireError> {
        let sha = req.sha256.to_string();
        let Some(app) = self.replica.app() else {
            wire::refuse(send, ErrorCode::SHUTTING_DOWN, "the agent is stopping").await;
            return Ok(());
        };
        let dir = app.store.bundle_path(&sha);
        if !dir.is_dir() {
            wire::refuse(send, ErrorCode::NOT_FOUND, format!("no bundle {sha} here")).await;
            return Ok(());
        }
        let packed = tokio::task::spawn_blocking(move || {
            crate::cli::pack::pack_dir(&dir, Vec::new()).map(|p| p.out)
        })
        .await;
        let bytes = match packed {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                wire::refuse(
                    send,
                    ErrorCode::INTERNAL,
                    format!("packing bundle {sha}: {e}"),
                )
                .await;
                return Ok(());
            }
            Err(e) => {
                wire::refuse(send, ErrorCode::INTERNAL, e.to_string()).await;
                return Ok(());
            }
        };
        wire::send(
            send,
            &Frame::BundleHead(frame::BundleHead {
                sha256: req.sha256,
                size: bytes.len() as u64,
            }),
        )
        .await?;
        for chunk in bytes.chunks(BUNDLE_CHUNK) {
            wire::send(send, &Frame::Data(Bytes::copy_from_slice(chunk))).await?;
        }
        wire::send(send, &Frame::End(frame::End::default())).await?;
        send.finish()?;
        // Counted once the peer has taken it all.
        let _ = send.stopped().await;
        *self
            .replica
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sha)
            .or_default() += 1;
        self.replica.served_changed.notify_waiters();
        Ok(())
    }

    /// Counts the catalog's functions this host does not serve at their catalog version.
    fn measure_lag(&self) {
        let Some(app) = self.replica.app() else {
            return;
        };
        let behind = self
            .replica
            .lock()
            .functions()
            .filter(|(name, rec)| {
                app.router.lookup(name).is_none_or(|f| {
                    f.version != rec.version || f.sha256 != rec.bundle_sha256.to_string()
                })
            })
            .count();
        self.metrics.catalog_lag.set(behind as i64);
    }

    /// Takes again each catalog function this host does not serve (version and bundle): a
    /// take that failed (its bundle on no live peer yet, e.g. just after a partition healed)
    /// is not left for good, since the digest swaps that follow find the catalogs equal.
    async fn retry_behind(&self) {
        let Some(app) = self.replica.app() else {
            return;
        };
        let behind: Vec<(String, FunctionRecord)> = self
            .replica
            .lock()
            .functions()
            .filter(|(name, rec)| {
                let sha = rec.bundle_sha256.to_string();
                !app.store
                    .function(name)
                    .and_then(|f| app.store.version(name, f.active))
                    .is_ok_and(|v| v.version == rec.version && v.sha256 == sha)
            })
            .map(|(name, rec)| (name.to_string(), rec.clone()))
            .collect();
        for (name, rec) in behind {
            let from = rec.deployed_by.clone();
            if let Err(e) = self.take_version(&app, &name, &rec, &from).await {
                tracing::warn!(function = %name, version = rec.version, "not serving the cluster's version yet: {e}");
            }
        }
    }

    /// Keeps catalogs in step: a digest swap with one live peer every [`SYNC_EVERY`].
    pub(super) async fn sync_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut turn = 0usize;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => break,
            }
            self.measure_lag();
            self.retry_behind().await;
            self.retry_keys().await;
            let peers = self.live_peers();
            if peers.is_empty() {
                continue;
            }
            let p = &peers[turn % peers.len()];
            turn = turn.wrapping_add(1);
            match self.sync_with(&p.id, p.addr).await {
                Ok(_) => self.mark_synced(),
                Err(e) => tracing::debug!(peer = %p.id, "catalog sync: {e}"),
            }
        }
    }
}

/// Ends a request's answer: `delta` (when not empty) in CatalogDelta frames of at most
/// [`CHUNK`] bytes, then End.
async fn answer_with(send: &mut quinn::SendStream, delta: Delta) -> Result<(), WireError> {
    if !delta.is_empty() {
        let chunks = delta
            .chunks(CHUNK)
            .map_err(|e| WireError::Local(e.to_string()))?;
        for c in chunks {
            wire::send(send, &Frame::CatalogDelta(c)).await?;
        }
    }
    wire::send(send, &Frame::End(frame::End::default())).await?;
    send.finish()?;
    Ok(())
}
