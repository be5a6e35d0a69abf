//! The scheduler: fires every active function's schedule triggers, once per tick across the
//! cluster.
//!
//! **Ownership.** Each schedule is fired by one host: the first live (alive or suspect) host in
//! the schedule's rendezvous ranking (cluster/src/route.rs, by schedule id); an agent outside a
//! cluster owns all of its schedules. A host works ownership out again when a member comes up
//! or goes down, when a function is activated or removed, and at each of its timers.
//!
//! **Firing a tick.** The owner records the tick in the catalog (`schedule:ID`, merged by the
//! later tick, replicated to every host), then stores the tick's event in its async queue with
//! an id derived from (schedule id, tick), which the queue takes once, so a tick fired twice
//! (two hosts that each thought they owned it) is stored once on any one host. The tick is also
//! kept in the queue's database, so an agent outside a cluster never fires a tick twice across
//! restarts. The event then runs like any Event invoke (retries, event age, destinations).
//!
//! **Taking over.** A host that takes a schedule over (its owner went down, or this host just
//! started) fires at most `schedules.catch_up_ticks` of the ticks missed since the last
//! recorded one (the latest), counts the others as missed, and never fires a tick at or before
//! the recorded one. If the last tick was fired by another live host (a restarted owner coming
//! back while the stand-in still fires), it first waits `schedules.handoff_wait_s` after the
//! next tick for that host's record, asks that host for its records (a digest swap), and fires
//! only if none came. In a cluster, schedules wait
//! at start for a catalog sync with a peer (`schedules.startup_sync_s` at most), so a restarted
//! host knows the ticks fired while it was away.
//!
//! **Timers.** One timer for the whole scheduler, set for the earliest due time of the schedules
//! this host owns; none per schedule, no polling.
//!
//! **Spread.** `spread = true` fires each tick at a point within the first tenth of the
//! interval to the next tick (at most 1 minute after it), fixed per (schedule, tick) by a hash,
//! so every host would pick the same point; the event's `time` is still the tick.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::{SignedDuration, Timestamp};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::api::App;
use crate::cluster::replica::{Claimed, TickClaim};
use crate::config::{Config, SchedulesConfig};
use crate::metrics::Metrics;
use crate::triggers::{Schedule, Trigger};

/// Due ticks a continuous owner fires late in one go (a stalled host, a clock step); beyond,
/// it catches up as a host taking over does.
const LATE_LIMIT: usize = 100;
/// Ticks looked through at most to find the ones due (a schedule silent for long).
const MAX_SCAN: u64 = 1_000_000;
/// The most a spread tick is moved.
const MAX_SPREAD: Duration = Duration::from_secs(60);
/// Next fire times `fnlet triggers` shows.
const SHOWN: usize = 5;

/// A schedule's id: stable across deploys of the same trigger. The function, then a hash of the
/// expression, the zone and the trigger's place among the function's triggers with the same
/// expression and zone (two identical triggers stay two schedules).
pub fn schedule_id(function: &str, s: &Schedule, same_before: usize) -> String {
    let h = sha2::Sha256::digest(
        format!("{}\0{}\0{same_before}", s.expression, s.timezone_name).as_bytes(),
    );
    format!("{function}-{}", hex::encode(&h[..4]))
}

/// A function's schedule triggers: (schedule id, place in `[[triggers]]`, schedule). None when
/// its triggers do not validate (refused at deploy; an old record read back).
pub fn schedules_of(
    function: &str,
    manifest: &crate::manifest::Manifest,
) -> Vec<(String, usize, Schedule)> {
    let Ok(triggers) = manifest.validated_triggers() else {
        return Vec::new();
    };
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (index, t) in triggers.into_iter().enumerate() {
        let Trigger::Schedule(schedule) = t else {
            continue;
        };
        let n = seen
            .entry((schedule.expression.clone(), schedule.timezone_name.clone()))
            .or_default();
        let id = schedule_id(function, &schedule, *n);
        *n += 1;
        out.push((id, index, schedule));
    }
    out
}

/// The function a schedule id belongs to (ids are `FUNCTION-xxxxxxxx`).
pub fn function_of(id: &str) -> Option<&str> {
    let (function, hash) = id.rsplit_once('-')?;
    (hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && !function.is_empty())
        .then_some(function)
}

/// The id of a tick's event: a UUID (version 8, RFC 9562) made of SHA-256(schedule id, tick),
/// the same on every host.
pub fn event_id(schedule: &str, tick: Timestamp) -> String {
    let h = sha2::Sha256::digest(format!("{schedule}\0{}", tick.as_millisecond()).as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// The schedule's ARN-like name, the event's `resources`.
pub fn schedule_arn(config: &Config, schedule: &str) -> String {
    format!(
        "arn:aws:scheduler:{}:{}:schedule/fnlet/{schedule}",
        config.lambda.region, config.lambda.account_id
    )
}

/// What the function receives for a tick: EventBridge's "Scheduled Event".
pub fn scheduled_event(
    config: &Config,
    schedule: &str,
    tick: Timestamp,
    payload: Option<&serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "version": "0",
        "id": event_id(schedule, tick),
        "detail-type": "Scheduled Event",
        "source": "aws.scheduler",
        "account": config.lambda.account_id,
        "time": tick.to_string(),
        "region": config.lambda.region,
        "resources": [schedule_arn(config, schedule)],
        "detail": payload.cloned().unwrap_or_else(|| serde_json::json!({})),
    })
}

/// How far `spread` moves `tick`: within the first tenth of the interval to the next tick, at
/// most [`MAX_SPREAD`]; 0 without spread.
pub fn jitter(s: &Schedule, id: &str, tick: Timestamp) -> Duration {
    if !s.spread {
        return Duration::ZERO;
    }
    let Some(next) = s.next_after(tick) else {
        return Duration::ZERO;
    };
    let interval = next.duration_since(tick).unsigned_abs();
    let bound = (interval / 10).min(MAX_SPREAD).as_millis() as u64;
    if bound == 0 {
        return Duration::ZERO;
    }
    let h = sha2::Sha256::digest(format!("{id}\0{}", tick.as_millisecond()).as_bytes());
    let n = u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8]));
    Duration::from_millis(n % bound)
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(t)
}

/// The last recorded tick of a schedule, as its owner sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Last {
    pub tick: Timestamp,
    /// Recorded by another host that is still live (a previous owner that may still fire).
    pub by_other_live: bool,
}

/// What the owner of a schedule does now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing due: the next tick, and when to fire it (jittered).
    Wait { tick: Timestamp, at: Timestamp },
    /// The previous owner fired the tick before `tick`: wait for its record of `tick` until
    /// `at`.
    Defer { tick: Timestamp, at: Timestamp },
    /// Fire these ticks, oldest first, each with whether it is a catch-up (a missed tick fired
    /// late on taking the schedule over); `missed` more were due and are not fired.
    Fire {
        ticks: Vec<(Timestamp, bool)>,
        missed: u64,
    },
    /// The expression has no further tick.
    Done,
}

/// The inputs of [`decide`] besides the schedule and the clock.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// The last recorded tick (catalog or local), if any.
    pub last: Option<Last>,
    /// Ticks after this are due when none was recorded (when this host first saw the
    /// schedule).
    pub base: Timestamp,
    /// The tick this host's timer was set for while it owned the schedule.
    pub scheduled: Option<Timestamp>,
    /// The tick this host already waited for the previous owner's record of.
    pub deferred: Option<Timestamp>,
}

/// The owner's decision for schedule `s` (id `id`) at `now`: pure, so the rules are tested
/// without clocks.
pub fn decide(
    s: &Schedule,
    id: &str,
    known: Known,
    now: Timestamp,
    config: &SchedulesConfig,
) -> Decision {
    let start = known.last.map_or(known.base, |l| l.tick);
    // The due ticks: (start, now]; the latest kept.
    let keep = LATE_LIMIT.max(config.catch_up_ticks as usize) + 1;
    let mut due: VecDeque<Timestamp> = VecDeque::new();
    let mut count: u64 = 0;
    let mut first = None;
    let mut t = start;
    while let Some(next) = s.next_after(t) {
        if next > now || count >= MAX_SCAN {
            break;
        }
        first.get_or_insert(next);
        count += 1;
        if due.len() == keep {
            due.pop_front();
        }
        due.push_back(next);
        t = next;
    }
    let Some(first) = first else {
        let from = if start > now { start } else { now };
        return match s.next_after(from) {
            Some(tick) => Decision::Wait {
                tick,
                at: plus(tick, jitter(s, id, tick)),
            },
            None => Decision::Done,
        };
    };
    // Another live host fired every tick up to this one: it may still think it owns the
    // schedule. Give its record of this tick a moment to arrive.
    if let Some(last) = known.last
        && last.by_other_live
        && count == 1
        && known.deferred != Some(first)
    {
        let at = plus(first, jitter(s, id, first) + secs(config.handoff_wait_s));
        if at > now {
            return Decision::Defer { tick: first, at };
        }
    }
    let on_time = |t: Timestamp| known.scheduled == Some(t) || known.deferred == Some(t);
    // An owner that was firing fires every tick it is late for (a stall), within a limit.
    if known.scheduled == Some(first) && count as usize <= LATE_LIMIT {
        return Decision::Fire {
            ticks: due.into_iter().map(|t| (t, false)).collect(),
            missed: 0,
        };
    }
    // Taking over: the latest catch_up_ticks (and a tick waited for, which is on time).
    let n = config.catch_up_ticks as usize;
    let ticks: Vec<(Timestamp, bool)> = due
        .iter()
        .enumerate()
        .filter(|(i, t)| on_time(**t) || *i + n >= due.len())
        .map(|(_, t)| (*t, !on_time(*t)))
        .collect();
    Decision::Fire {
        missed: count - ticks.len() as u64,
        ticks,
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

/// One schedule trigger of an active function version, and this host's view of it.
struct Entry {
    function: String,
    version: u64,
    /// The trigger's place in the manifest's `[[triggers]]`.
    index: usize,
    schedule: Schedule,
    /// When this host first saw the schedule.
    base: Timestamp,
    /// The owner as this host last worked it out, and whether that is this host.
    owner: Option<String>,
    owned: bool,
    scheduled: Option<Timestamp>,
    deferred: Option<Timestamp>,
    /// When the scheduler's timer should wake for this schedule (owned ones only).
    wake_at: Option<Timestamp>,
    /// Ticks of it are being claimed and stored (not decided again until that ends).
    firing: bool,
}

#[derive(Default)]
struct State {
    /// By schedule id.
    entries: BTreeMap<String, Entry>,
    /// The (function, version) pairs the entries were made from.
    made_from: Vec<(String, u64)>,
}

/// The scheduler; one per agent.
pub struct Scheduler {
    state: Mutex<State>,
    started: Instant,
    /// Told when a batch of ticks has been claimed and stored.
    fired: tokio::sync::Notify,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            state: Mutex::new(State::default()),
            started: Instant::now(),
            fired: tokio::sync::Notify::new(),
        }
    }
}

/// A tick to store: the schedule, its function, the tick, whether it is a catch-up.
struct Firing {
    id: String,
    function: String,
    version: u64,
    tick: Timestamp,
    catch_up: bool,
    event_id: String,
    payload: Bytes,
    due_at: Timestamp,
}

impl Scheduler {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change under this lock is whole before it is released.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires schedules until `stop`.
    pub async fn run(self: Arc<Self>, app: Arc<App>, stop: CancellationToken) {
        let mut watching_members = false;
        let members_changed = Arc::new(tokio::sync::Notify::new());
        loop {
            if !watching_members && let Some(node) = app.cluster.get() {
                // Member changes wake this loop through its own notify.
                watching_members = true;
                let (from, to, stop) = (
                    node.members_changed.clone(),
                    members_changed.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = from.notified() => to.notify_one(),
                            _ = stop.cancelled() => break,
                        }
                    }
                });
            }
            self.refresh(&app);
            let next = self.tick(&app).await;
            let timer = async {
                match next {
                    Some(at) => {
                        let wait = at.duration_since(Timestamp::now());
                        let wait = wait.unsigned_abs().min(Duration::from_secs(3600));
                        let wait = if at > Timestamp::now() {
                            wait + Duration::from_millis(1)
                        } else {
                            Duration::ZERO
                        };
                        tokio::time::sleep(wait).await
                    }
                    None => std::future::pending().await,
                }
            };
            // Until the first catalog sync, ownership is worked out again when it ends.
            let sync_left =
                secs(app.config.schedules.startup_sync_s).saturating_sub(self.started.elapsed());
            let sync_wait = async {
                if !sync_left.is_zero() && app.cluster.get().is_some_and(|n| !n.has_synced()) {
                    tokio::time::sleep(sync_left + Duration::from_millis(1)).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = timer => {}
                _ = sync_wait => {}
                _ = app.router.registry.functions_changed.notified() => {}
                _ = members_changed.notified() => {}
                _ = self.fired.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Makes the entries match the active functions' schedule triggers.
    fn refresh(&self, app: &App) {
        let mut functions: Vec<Arc<crate::pool::ActiveFunction>> = app
            .router
            .registry
            .slots()
            .iter()
            .map(|s| s.active())
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        let made_from: Vec<(String, u64)> = functions
            .iter()
            .map(|f| (f.name.clone(), f.version))
            .collect();
        let mut st = self.lock();
        if st.made_from == made_from {
            return;
        }
        let now = Timestamp::now();
        let mut old = std::mem::take(&mut st.entries);
        for f in &functions {
            for (id, index, schedule) in schedules_of(&f.name, &f.manifest) {
                // The same schedule in a new version keeps what this host knew of it.
                let kept = old.remove(&id);
                let e = Entry {
                    function: f.name.clone(),
                    version: f.version,
                    index,
                    base: kept.as_ref().map_or(now, |k| k.base),
                    owner: kept.as_ref().and_then(|k| k.owner.clone()),
                    owned: kept.as_ref().is_some_and(|k| k.owned),
                    scheduled: kept.as_ref().and_then(|k| k.scheduled),
                    deferred: kept.as_ref().and_then(|k| k.deferred),
                    wake_at: None,
                    firing: kept.as_ref().is_some_and(|k| k.firing),
                    schedule,
                };
                st.entries.insert(id, e);
            }
        }
        st.made_from = made_from;
    }

    /// Whether this host may fire yet: in a cluster, after a catalog sync with a peer or
    /// `startup_sync_s` after start.
    fn ready(&self, app: &App) -> bool {
        match app.cluster.get() {
            None => true,
            Some(node) => {
                node.has_synced()
                    || self.started.elapsed() >= secs(app.config.schedules.startup_sync_s)
            }
        }
    }

    /// Decides for every schedule, fires what is due; returns when to wake next.
    async fn tick(self: &Arc<Self>, app: &Arc<App>) -> Option<Timestamp> {
        let node = app.cluster.get().cloned();
        if let Some(node) = &node {
            // A tick waited for is fired only after asking the host that fired the one before
            // it for its records: its push may not reach this host yet (it may not count this
            // host as live).
            let now = Timestamp::now();
            let ask: std::collections::BTreeSet<String> = self
                .lock()
                .entries
                .iter()
                .filter(|(_, e)| {
                    e.owned && e.deferred.is_some() && e.wake_at.is_some_and(|w| w <= now)
                })
                .filter_map(|(id, _)| node.schedule_record(id).map(|r| r.fired_by))
                .filter(|by| *by != node.id)
                .collect();
            for peer in ask {
                node.sync_from(&peer).await;
            }
        }
        let live = node.as_ref().map(|n| n.live_ids());
        let ready = self.ready(app);
        let me = node
            .as_ref()
            .map_or_else(|| app.node_id.clone(), |n| n.id.clone());
        let now = Timestamp::now();
        let metrics = &app.router.metrics.schedules;
        let mut firings = Vec::new();
        {
            let mut st = self.lock();
            for (id, e) in st.entries.iter_mut() {
                let owner = match &live {
                    None => me.clone(),
                    Some(ids) => fnlet_cluster::route::rank(id, ids.iter().map(String::as_str))
                        .first()
                        .map_or_else(|| me.clone(), |o| o.to_string()),
                };
                let owned = owner == me && ready;
                if owned != e.owned || e.owner.as_deref() != Some(owner.as_str()) {
                    tracing::info!(function = %e.function, schedule = %id, owner = %owner, this_host = owned, "schedule owner");
                }
                e.owner = Some(owner);
                if !owned {
                    e.owned = false;
                    e.scheduled = None;
                    e.deferred = None;
                    e.wake_at = None;
                    continue;
                }
                e.owned = true;
                if e.firing || e.wake_at.is_some_and(|w| w > now) {
                    continue;
                }
                let local = app
                    .events
                    .last_tick(id)
                    .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok());
                let recorded = node.as_ref().and_then(|n| n.schedule_record(id));
                let catalog = recorded
                    .as_ref()
                    .and_then(|r| Timestamp::from_millisecond(r.tick_ms as i64).ok());
                let last = match (catalog, local) {
                    (Some(c), l) if l.is_none_or(|l| c >= l) => {
                        let by = recorded.as_ref().map_or("", |r| r.fired_by.as_str());
                        Some(Last {
                            tick: c,
                            by_other_live: by != me
                                && live.as_ref().is_some_and(|ids| ids.iter().any(|i| i == by)),
                        })
                    }
                    (_, Some(l)) => Some(Last {
                        tick: l,
                        by_other_live: false,
                    }),
                    _ => None,
                };
                let known = Known {
                    last,
                    base: e.base,
                    scheduled: e.scheduled,
                    deferred: e.deferred,
                };
                match decide(&e.schedule, id, known, now, &app.config.schedules) {
                    Decision::Wait { tick, at } => {
                        e.scheduled = Some(tick);
                        e.wake_at = Some(at);
                    }
                    Decision::Defer { tick, at } => {
                        metrics
                            .deferred
                            .get_or_create(&Metrics::function(&e.function))
                            .inc();
                        tracing::info!(function = %e.function, schedule = %id, tick = %tick, "waiting for the previous owner's record of the tick");
                        e.deferred = Some(tick);
                        e.wake_at = Some(at);
                    }
                    Decision::Done => {
                        e.scheduled = None;
                        e.wake_at = None;
                    }
                    Decision::Fire { ticks, missed } => {
                        if missed > 0 {
                            metrics
                                .misses
                                .get_or_create(&Metrics::function(&e.function))
                                .inc_by(missed);
                            tracing::warn!(function = %e.function, schedule = %id, missed, "schedule ticks missed (beyond schedules.catch_up_ticks)");
                        }
                        for (tick, catch_up) in ticks {
                            let event =
                                scheduled_event(&app.config, id, tick, e.schedule.payload.as_ref());
                            firings.push(Firing {
                                id: id.clone(),
                                function: e.function.clone(),
                                version: e.version,
                                tick,
                                catch_up,
                                event_id: event_id(id, tick),
                                payload: Bytes::from(event.to_string()),
                                due_at: plus(tick, jitter(&e.schedule, id, tick)),
                            });
                        }
                        // Worked out again once the ticks are claimed and stored.
                        e.firing = true;
                        e.scheduled = None;
                        e.deferred = None;
                        e.wake_at = None;
                    }
                }
            }
        }
        if !firings.is_empty() {
            // In the background: a claim may wait for an answer (schedules.claim_wait_s), and
            // the other schedules' ticks do not wait for it.
            let (me, app) = (self.clone(), app.clone());
            tokio::spawn(async move {
                let mut last: BTreeMap<String, Timestamp> = BTreeMap::new();
                for f in &firings {
                    let t = last.entry(f.id.clone()).or_insert(f.tick);
                    *t = (*t).max(f.tick);
                }
                me.fire(&app, node.as_ref(), firings).await;
                {
                    let mut st = me.lock();
                    for (id, tick) in last {
                        if let Some(e) = st.entries.get_mut(&id) {
                            e.firing = false;
                            // The next tick is on time: one due already (the claim took long)
                            // is fired as late, not as a catch-up.
                            e.scheduled = e.schedule.next_after(tick);
                        }
                    }
                }
                me.fired.notify_one();
            });
        }
        self.lock().entries.values().filter_map(|e| e.wake_at).min()
    }

    /// Records the fired ticks in the catalog (in a cluster), then stores their events.
    async fn fire(
        &self,
        app: &App,
        node: Option<&Arc<crate::cluster::node::Node>>,
        mut firings: Vec<Firing>,
    ) {
        let metrics = &app.router.metrics.schedules;
        if let Some(node) = node {
            // One claim per schedule: its ticks, first to last.
            let mut claims: BTreeMap<String, TickClaim> = BTreeMap::new();
            for f in &firings {
                let t = f.tick.as_millisecond() as u64;
                let c = claims.entry(f.id.clone()).or_insert_with(|| TickClaim {
                    schedule: f.id.clone(),
                    function: f.function.clone(),
                    version: f.version,
                    from_ms: t,
                    tick_ms: t,
                });
                c.from_ms = c.from_ms.min(t);
                c.tick_ms = c.tick_ms.max(t);
            }
            let claims: Vec<TickClaim> = claims.into_values().collect();
            let wait = secs(app.config.schedules.claim_wait_s);
            let results = node.claim_schedules(&claims, wait).await;
            for (c, r) in claims.iter().zip(results) {
                let labels = Metrics::function(&c.function);
                for peer in &r.unanswered {
                    metrics.claims_unanswered.get_or_create(&labels).inc();
                    tracing::warn!(function = %c.function, schedule = %c.schedule, peer = %peer, "claim of the schedule's ticks not answered in time (schedules.claim_wait_s, 250 ms for a host seen down): fired without it");
                }
                match r.outcome {
                    Claimed::Fire => {}
                    Claimed::Taken {
                        tick_ms,
                        ref fired_by,
                    } => {
                        let n = firings.iter().filter(|f| f.id == c.schedule).count();
                        metrics
                            .claims_refused
                            .get_or_create(&labels)
                            .inc_by(n as u64);
                        tracing::info!(function = %c.function, schedule = %c.schedule, recorded = tick_ms, fired_by = %fired_by, "schedule ticks fired or granted elsewhere: not fired here");
                        firings.retain(|f| f.id != c.schedule);
                    }
                    Claimed::Removed => {
                        tracing::info!(function = %c.function, schedule = %c.schedule, "schedule removed in the cluster's catalog: not fired");
                        firings.retain(|f| f.id != c.schedule);
                    }
                }
            }
        }
        let stored = futures_util::future::join_all(firings.iter().map(|f| {
            app.events.accept_once(
                &f.function,
                &f.event_id,
                f.payload.clone(),
                Some((&f.id, f.tick.as_millisecond() as u64)),
            )
        }))
        .await;
        let now = Timestamp::now();
        for (f, r) in firings.iter().zip(stored) {
            let labels = Metrics::function(&f.function);
            let request_id = &f.event_id;
            match r {
                Ok(true) => {
                    metrics.fires.get_or_create(&labels).inc();
                    if f.catch_up {
                        metrics.catch_ups.get_or_create(&labels).inc();
                    }
                    metrics
                        .delay
                        .observe(now.duration_since(f.due_at).as_secs_f64().max(0.0));
                    tracing::info!(function = %f.function, schedule = %f.id, tick = %f.tick, request_id = %request_id, catch_up = f.catch_up, "schedule fired");
                    app.router.logs.append(
                        &f.function,
                        f.version,
                        request_id,
                        "agent",
                        &format!(
                            "schedule {} fired tick {}{}",
                            f.id,
                            f.tick,
                            if f.catch_up { " (catch-up)" } else { "" }
                        ),
                    );
                }
                Ok(false) => {
                    metrics.duplicates.get_or_create(&labels).inc();
                    tracing::info!(function = %f.function, schedule = %f.id, tick = %f.tick, request_id = %request_id, "schedule tick stored already: not again");
                }
                Err(e) => {
                    metrics.misses.get_or_create(&labels).inc();
                    tracing::error!(function = %f.function, schedule = %f.id, tick = %f.tick, "schedule tick not stored: {e}");
                }
            }
        }
    }

    /// What `fnlet triggers [NAME]` shows: every trigger of every active function (or of
    /// `function`), schedules with their next fire times, last fired tick and owner.
    pub fn view(&self, app: &App, function: Option<&str>) -> serde_json::Value {
        self.refresh(app);
        let node = app.cluster.get().cloned();
        let now = Timestamp::now();
        let st = self.lock();
        let mut functions: Vec<Arc<crate::pool::ActiveFunction>> = app
            .router
            .registry
            .slots()
            .iter()
            .map(|s| s.active())
            .filter(|f| function.is_none_or(|n| f.name == n))
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::new();
        for f in functions {
            let Ok(triggers) = f.manifest.validated_triggers() else {
                continue;
            };
            for (index, t) in triggers.into_iter().enumerate() {
                match t {
                    Trigger::Topic { topic, filter } => out.push(serde_json::json!({
                        "function": f.name,
                        "version": f.version,
                        "index": index,
                        "type": "topic",
                        "topic": topic,
                        "filter": filter,
                    })),
                    Trigger::Schedule(s) => {
                        let Some((id, e)) = st
                            .entries
                            .iter()
                            .find(|(_, e)| e.function == f.name && e.index == index)
                        else {
                            continue;
                        };
                        let next: Vec<Timestamp> = s.upcoming(now, SHOWN);
                        let record = node.as_ref().and_then(|n| n.schedule_record(id));
                        let local = app.events.last_tick(id);
                        let last = match (&record, local) {
                            (Some(r), l) if l.is_none_or(|l| r.tick_ms >= l) => {
                                Some((r.tick_ms, r.fired_by.clone()))
                            }
                            (_, Some(l)) => Some((l, app.node_id.clone())),
                            _ => None,
                        };
                        let ms = |ms: u64| {
                            Timestamp::from_millisecond(ms as i64)
                                .map(|t| t.to_string())
                                .unwrap_or_default()
                        };
                        out.push(serde_json::json!({
                            "function": f.name,
                            "version": f.version,
                            "index": index,
                            "type": "schedule",
                            "id": id,
                            "arn": schedule_arn(&app.config, id),
                            "expression": s.expression,
                            "timezone": s.timezone_name,
                            "spread": s.spread,
                            "payload": s.payload,
                            "next": next.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                            "next_local": next
                                .iter()
                                .map(|t| t.to_zoned(s.timezone.clone()).to_string())
                                .collect::<Vec<_>>(),
                            "last_fired": last.map(|(tick, by)| serde_json::json!({
                                "tick": ms(tick),
                                "fired_by": by,
                            })),
                            "owner": e.owner,
                            "owned_here": e.owned,
                        }));
                    }
                }
            }
        }
        serde_json::json!({ "host": app.node_id, "triggers": out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triggers::TriggerManifest;

    fn schedule(toml_text: &str) -> Schedule {
        let t: TriggerManifest = toml::from_str(toml_text).expect("toml");
        match t.validate() {
            Ok(Trigger::Schedule(s)) => s,
            other => panic!("not a schedule: {other:?}"),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn config(catch_up_ticks: u32) -> SchedulesConfig {
        SchedulesConfig {
            catch_up_ticks,
            handoff_wait_s: 1.0,
            startup_sync_s: 10.0,
            claim_wait_s: 1.0,
        }
    }

    fn known(last: Option<(&str, bool)>, base: &str) -> Known {
        Known {
            last: last.map(|(t, other)| Last {
                tick: ts(t),
                by_other_live: other,
            }),
            base: ts(base),
            scheduled: None,
            deferred: None,
        }
    }

    #[test]
    fn ids_are_stable_and_tell_identical_triggers_apart() {
        let a = schedule(r#"schedule = "rate(1 minute)""#);
        let b = schedule(
            r#"schedule = "rate(1 minute)"
payload = { other = true }"#,
        );
        // The payload is not part of the identity: a redeploy with a new payload keeps it.
        assert_eq!(schedule_id("f", &a, 0), schedule_id("f", &b, 0));
        assert_ne!(schedule_id("f", &a, 0), schedule_id("f", &a, 1));
        assert_ne!(schedule_id("f", &a, 0), schedule_id("g", &a, 0));
        let zoned = schedule(
            r#"schedule = "rate(1 minute)"
timezone = "Europe/Berlin""#,
        );
        assert_ne!(schedule_id("f", &a, 0), schedule_id("f", &zoned, 0));
        let id = event_id("f-1", ts("2026-12-05T01:00:00Z"));
        assert_eq!(id, event_id("f-1", ts("2026-12-05T01:00:00Z")));
        assert_ne!(id, event_id("f-1", ts("2026-12-05T01:00:01Z")));
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "8");
    }

    #[test]
    fn schedule_ids_name_their_function() {
        let a = schedule(r#"schedule = "rate(1 minute)""#);
        for f in ["f", "my-func", "a-1b2c3d4e"] {
            assert_eq!(function_of(&schedule_id(f, &a, 0)), Some(f));
        }
        assert_eq!(function_of("nohash"), None);
        assert_eq!(function_of("f-xyz"), None);
        assert_eq!(function_of("-1a2b3c4d"), None);
    }

    #[test]
    fn the_event_is_eventbridges_scheduled_event() {
        let config = Config::default();
        let e = scheduled_event(
            &config,
            "f-1",
            ts("2026-12-05T01:02:03Z"),
            Some(&serde_json::json!({"job": 1})),
        );
        assert_eq!(e["detail-type"], "Scheduled Event");
        assert_eq!(e["source"], "aws.scheduler");
        assert_eq!(e["time"], "2026-12-05T01:02:03Z");
        assert_eq!(e["detail"], serde_json::json!({"job": 1}));
        assert_eq!(e["id"], event_id("f-1", ts("2026-12-05T01:02:03Z")));
        assert_eq!(
            e["resources"][0],
            format!(
                "arn:aws:scheduler:{}:{}:schedule/fnlet/f-1",
                config.lambda.region, config.lambda.account_id
            )
        );
        let e = scheduled_event(&config, "f-1", ts("2026-12-05T01:02:03Z"), None);
        assert_eq!(e["detail"], serde_json::json!({}));
    }

    #[test]
    fn an_owner_fires_each_tick_and_waits_for_the_next() {
        let s = schedule(r#"schedule = "rate(1 second)""#);
        let c = config(1);
        // Nothing recorded: ticks after the host first saw it.
        let d = decide(
            &s,
            "x",
            known(None, "2026-12-05T01:00:00.5Z"),
            ts("2026-12-05T01:00:00.7Z"),
            &c,
        );
        assert_eq!(
            d,
            Decision::Wait {
                tick: ts("2026-12-05T01:00:01Z"),
                at: ts("2026-12-05T01:00:01Z")
            }
        );
        // The timer was set for 01:00:01 and wakes then: fired, on time.
        let mut k = known(
            Some(("2026-12-05T01:00:00Z", false)),
            "2026-12-05T00:00:00Z",
        );
        k.scheduled = Some(ts("2026-12-05T01:00:01Z"));
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:01.002Z"), &c),
            Decision::Fire {
                ticks: vec![(ts("2026-12-05T01:00:01Z"), false)],
                missed: 0
            }
        );
        // A stalled owner fires every tick it is late for.
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:03.5Z"), &c),
            Decision::Fire {
                ticks: vec![
                    (ts("2026-12-05T01:00:01Z"), false),
                    (ts("2026-12-05T01:00:02Z"), false),
                    (ts("2026-12-05T01:00:03Z"), false)
                ],
                missed: 0
            }
        );
        // Recorded already (by this host's earlier run, or another): never fired again.
        let k = known(
            Some(("2026-12-05T01:00:01Z", false)),
            "2026-12-05T00:00:00Z",
        );
        assert!(matches!(
            decide(&s, "x", k, ts("2026-12-05T01:00:01.5Z"), &c),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn a_host_taking_over_catches_up_within_the_window() {
        let s = schedule(r#"schedule = "rate(1 second)""#);
        // The owner died after 01:00:00; this host takes over at 01:00:06.3.
        let k = known(
            Some(("2026-12-05T01:00:00Z", false)),
            "2026-12-05T00:00:00Z",
        );
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:06.3Z"), &config(1)),
            Decision::Fire {
                ticks: vec![(ts("2026-12-05T01:00:06Z"), true)],
                missed: 5
            }
        );
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:06.3Z"), &config(3)),
            Decision::Fire {
                ticks: vec![
                    (ts("2026-12-05T01:00:04Z"), true),
                    (ts("2026-12-05T01:00:05Z"), true),
                    (ts("2026-12-05T01:00:06Z"), true)
                ],
                missed: 3
            }
        );
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:06.3Z"), &config(0)),
            Decision::Fire {
                ticks: vec![],
                missed: 6
            }
        );
    }

    #[test]
    fn a_previous_owner_still_firing_is_waited_for_once() {
        let s = schedule(r#"schedule = "rate(1 second)""#);
        let c = config(1);
        // Another live host fired 01:00:00; 01:00:01 is due.
        let mut k = known(Some(("2026-12-05T01:00:00Z", true)), "2026-12-05T00:00:00Z");
        let now = ts("2026-12-05T01:00:01.01Z");
        assert_eq!(
            decide(&s, "x", k, now, &c),
            Decision::Defer {
                tick: ts("2026-12-05T01:00:01Z"),
                at: ts("2026-12-05T01:00:02Z")
            }
        );
        // Its record came: nothing due until 01:00:02, which is waited for in turn.
        let mut came = k;
        came.last = Some(Last {
            tick: ts("2026-12-05T01:00:01Z"),
            by_other_live: true,
        });
        came.deferred = Some(ts("2026-12-05T01:00:01Z"));
        assert!(matches!(
            decide(&s, "x", came, ts("2026-12-05T01:00:01.5Z"), &c),
            Decision::Wait { .. }
        ));
        assert!(matches!(
            decide(&s, "x", came, ts("2026-12-05T01:00:02Z"), &c),
            Decision::Defer { .. }
        ));
        k.deferred = Some(ts("2026-12-05T01:00:01Z"));
        // No record came: fired, late but on time.
        k.last = Some(Last {
            tick: ts("2026-12-05T01:00:00Z"),
            by_other_live: true,
        });
        assert_eq!(
            decide(&s, "x", k, ts("2026-12-05T01:00:02.001Z"), &c),
            Decision::Fire {
                ticks: vec![
                    (ts("2026-12-05T01:00:01Z"), false),
                    (ts("2026-12-05T01:00:02Z"), true)
                ],
                missed: 0
            }
        );
        // A previous owner that missed ticks is not waited for.
        let k = known(Some(("2026-12-05T00:59:55Z", true)), "2026-12-05T00:00:00Z");
        assert!(matches!(decide(&s, "x", k, now, &c), Decision::Fire { .. }));
    }

    #[test]
    fn spread_stays_within_the_first_tenth_and_is_the_same_everywhere() {
        let s = schedule(
            r#"schedule = "rate(10 seconds)"
spread = true"#,
        );
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let tick = plus(ts("2026-12-05T01:00:00Z"), Duration::from_secs(10 * i));
            let j = jitter(&s, "x", tick);
            assert!(j < Duration::from_secs(1), "{j:?}");
            assert_eq!(j, jitter(&s, "x", tick));
            seen.insert(j);
        }
        assert!(seen.len() > 100, "{} distinct", seen.len());
        let daily = schedule(
            r#"schedule = "rate(1 day)"
spread = true"#,
        );
        assert!(jitter(&daily, "x", ts("2026-12-05T00:00:00Z")) < MAX_SPREAD);
        let strict = schedule(r#"schedule = "rate(10 seconds)""#);
        assert_eq!(
            jitter(&strict, "x", ts("2026-12-05T01:00:00Z")),
            Duration::ZERO
        );
    }
}
