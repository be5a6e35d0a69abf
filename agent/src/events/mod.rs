//! Asynchronous invocation: Event invokes are stored durably before they are answered 202,
//! then run by workers through the router, within each function's concurrency, with Lambda's
//! retries, event age and destinations ([`policy`]). Where events wait is the backend: this
//! host's redb queue ([`queue`], "local") or a NATS JetStream stream that every agent using it
//! runs ([`nats`]); both record a try's outcome through [`Backend`], so the rules and the try
//! itself ([`Events::run_function`]) are the same code.
//!
//! Delivery is at least once. A try is marked in flight in the queue before it starts; an agent
//! that dies mid-try runs that event again at its next start, with the same request id, and
//! counts it in `fnlet_events_duplicates_total` (when the mark had reached the disk: the
//! workers' bookkeeping is committed without an fsync of its own, see [`queue`]). An event ends
//! (success, or failure for good) in one commit that removes it and stores its destination
//! records as new events (one, or one per subscriber of a destination topic), so a record is
//! never lost (a lost ending runs the event again).

pub mod https;
pub mod nats;
pub mod policy;
pub mod queue;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use policy::{Condition, History, Next, Outcome};
pub use policy::{Destination, InvokeConfig, Policy};
use queue::{Header, Op, Queue, QueueError, Target, encode};

use crate::config::EventsConfig;
use crate::manifest::Mode;
use crate::metrics::{ConditionLabels, EventLabels, Metrics, TopicFnLabels, TopicModeLabels};
use crate::pool::ActiveFunction;
use crate::router::{InvokeRequest, Router};
use crate::triggers::cloudevent::{self, CloudEvent};
use crate::triggers::topics;

/// Lambda's payload limit for Event invokes.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Destination URLs: records POSTed at once per URL.
const URL_CONCURRENCY: u32 = 8;
/// How long a destination URL has to answer.
const URL_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures `fnlet events` remembers per function.
const FAILURES_KEPT: usize = 20;
/// How long an id accepted with [`Events::accept_once`] stays a duplicate: a second event with
/// it within this is not stored (two hosts firing one schedule tick meet well within it).
pub const SEEN_WINDOW_MS: u64 = 3600 * 1000;
/// How often expired dedup entries (topic events, ids accepted once) are dropped.
const SEEN_PRUNE_EVERY: Duration = Duration::from_secs(10);
/// The metrics label of topics nobody subscribes to (so callers cannot mint label values).
const UNSUBSCRIBED: &str = "(unsubscribed)";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Why an Event invoke was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(
        "{function}'s event queue is full ({count} events, {bytes} bytes waiting; \
         events.max_queued_events and events.max_queued_mb)"
    )]
    Full {
        function: String,
        count: u64,
        bytes: u64,
    },
    #[error("{function}'s events are refused by the NATS stream: {why}")]
    StreamFull { function: String, why: String },
    #[error(
        "the event ({size} bytes) is larger than the NATS servers take (max_payload {max_payload} \
         bytes, the event's header included)"
    )]
    TooLarge { size: usize, max_payload: usize },
    #[error(transparent)]
    Storage(#[from] QueueError),
}

/// An event to store: an accepted one, or a destination record.
pub struct NewEvent {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Where a backend records what became of a try. The worker logic ([`Events::run_function`],
/// [`Events::deliver`]) takes an event (`Taken`) from its backend and calls these.
pub trait Backend: Send + Sync + 'static {
    /// An event being tried, as the backend knows it.
    type Taken: Send + 'static;
    /// A try starts: marked so that a crash from here on counts it as a duplicate.
    fn starting(
        &self,
        t: &Self::Taken,
        h: &Header,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// The event waits for its next try at `h.next_ms`, with `h`'s counts.
    fn retry(&self, t: Self::Taken, h: Header, payload: &[u8]) -> impl Future<Output = ()> + Send;
    /// The event ended: it goes, and `records` (its destination record, or one per
    /// subscriber of a destination topic) are stored as new events with it. On an error the
    /// event stays, and the caller retries it (so storing the records again must not make
    /// them twice).
    fn end(
        &self,
        t: &Self::Taken,
        h: &Header,
        records: Vec<NewEvent>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// The try's bookkeeping is over (after `end`).
    fn done(&self, t: Self::Taken);
}

/// A failure `fnlet events` shows.
#[derive(Debug, Clone, Serialize)]
pub struct FailureNote {
    pub request_id: String,
    pub condition: String,
    pub error: Option<String>,
    pub at: String,
    pub invokes: u32,
}

struct Entry {
    header: Header,
    bytes: u64,
    running: bool,
}

/// One function's (or one destination URL's) events.
#[derive(Default)]
struct Lane {
    /// (next try ms, seq) of the events not running.
    waiting: BTreeSet<(u64, u64)>,
    /// Events stored (waiting and running) and their payload bytes.
    count: u64,
    bytes: u64,
    running: u32,
    failures: VecDeque<FailureNote>,
}

#[derive(Default)]
struct State {
    lanes: HashMap<Target, Lane>,
    entries: HashMap<u64, Entry>,
    configs: HashMap<String, InvokeConfig>,
    /// Events seen -> until when a copy is a duplicate: topic events (a hash of topic, source
    /// and id, [`seen_key`]) and ids accepted once (a schedule's ticks, [`once_key`]).
    seen: HashMap<[u8; 32], u64>,
    /// Schedules' last ticks stored here.
    ticks: HashMap<String, u64>,
}

/// One async event a topic event became.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub function: String,
    pub request_id: String,
}

/// What became of one published event.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub id: String,
    pub source: String,
    /// Seen within the dedup window already: not delivered again.
    pub duplicate: bool,
    pub deliveries: Vec<Delivery>,
    /// Subscribers whose filters it did not pass.
    pub filtered: usize,
}

/// The dedup key of a topic event.
fn seen_key(topic: &str, source: &str, id: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [topic, source, id] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// The dedup key of an id accepted once ([`Events::accept_once`]): no topic event's, as a
/// topic's name is never empty.
fn once_key(id: &str) -> [u8; 32] {
    seen_key("", "fnlet.once", id)
}

/// The event queue and its workers.
pub struct Events {
    /// Local events, and the event invoke configs (with either backend).
    queue: Queue,
    /// The JetStream backend, when configured: new events go there.
    nats: Option<Arc<nats::Nats>>,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    router: Arc<Router>,
    config: EventsConfig,
    seq: AtomicU64,
    http: https::HttpClient,
    /// Per-topic counts for `fnlet topics`.
    pub topic_stats: topics::Stats,
}

struct Observer(Arc<Metrics>);

impl queue::CommitObserver for Observer {
    fn committed(&self, batches: usize, took: Duration) {
        let m = &self.0.events;
        m.commits.inc();
        m.commit_batches.observe(batches as f64);
        m.commit_duration.observe(took.as_secs_f64());
    }
}

impl Events {
    /// Opens the queue in the state dir and takes up what a previous run left: events in
    /// flight then run again (counted as duplicates), the others keep their schedule.
    /// With `nats`, new events go to JetStream; what the local queue holds still runs here.
    pub fn open(
        router: Arc<Router>,
        config: &EventsConfig,
        nats: Option<nats::Nats>,
    ) -> Result<Arc<Events>, QueueError> {
        let (queue, loaded) =
            Queue::open(&router.config.state_dir, Observer(router.metrics.clone()))?;
        let mut state = State::default();
        let mut duplicates = 0;
        for (seq, mut header, bytes) in loaded.events {
            if header.in_flight {
                duplicates += 1;
                if let Target::Function(f) = &header.target {
                    router
                        .metrics
                        .events
                        .duplicates
                        .get_or_create(&Metrics::function(f))
                        .inc();
                    tracing::info!(function = %f, request_id = %header.request_id, "an async event was running when the agent stopped: it runs again");
                }
                header.in_flight = false;
            }
            let lane = state.lanes.entry(header.target.clone()).or_default();
            lane.count += 1;
            lane.bytes += bytes;
            lane.waiting.insert((header.next_ms, seq));
            state.entries.insert(
                seq,
                Entry {
                    header,
                    bytes,
                    running: false,
                },
            );
        }
        if !state.entries.is_empty() {
            tracing::info!(
                events = state.entries.len(),
                duplicates,
                "async events taken up from the queue"
            );
        }
        state.configs = loaded.configs.into_iter().collect();
        state.seen = loaded.seen.into_iter().collect();
        state.ticks = loaded.ticks.into_iter().collect();
        let http = https::client(config.destination_ca_file.as_deref())?;
        Ok(Arc::new(Events {
            queue,
            nats: nats.map(Arc::new),
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            router,
            config: config.clone(),
            seq: AtomicU64::new(loaded.next_seq),
            http,
            topic_stats: topics::Stats::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is whole before it is released.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an Event invoke of `function` durably; returns once it is on disk.
    pub async fn accept(
        &self,
        function: &str,
        request_id: &str,
        payload: Bytes,
    ) -> Result<(), AcceptError> {
        self.store(function, request_id, payload, Vec::new()).await
    }

    /// Stores an event of `function` whose id is accepted once: false (and nothing stored)
    /// when an event with `id` was accepted within [`SEEN_WINDOW_MS`]. With `tick`, the
    /// schedule's last tick stored here is raised to it in the same commit.
    pub async fn accept_once(
        &self,
        function: &str,
        id: &str,
        payload: Bytes,
        tick: Option<(&str, u64)>,
    ) -> Result<bool, AcceptError> {
        let now = now_ms();
        let key = once_key(id);
        let mut ops = vec![Op::PutSeen(key, now + SEEN_WINDOW_MS)];
        {
            let mut st = self.lock();
            if st.seen.get(&key).is_some_and(|until| *until > now) {
                return Ok(false);
            }
            // Held while it is written: a concurrent accept of the same id sees it. Expired
            // entries are dropped with the topics' ([`Events::run`]).
            st.seen.insert(key, now + SEEN_WINDOW_MS);
        }
        if let Some((schedule, t)) = tick {
            ops.push(Op::PutTick(schedule.to_string(), t));
        }
        match self.store(function, id, payload, ops).await {
            Ok(()) => {
                if let Some((schedule, t)) = tick {
                    let mut st = self.lock();
                    let stored = st.ticks.entry(schedule.to_string()).or_default();
                    *stored = (*stored).max(t);
                }
                Ok(true)
            }
            Err(e) => {
                self.lock().seen.remove(&key);
                Err(e)
            }
        }
    }

    /// The last tick of `schedule` whose event this host stored (ms).
    pub fn last_tick(&self, schedule: &str) -> Option<u64> {
        self.lock().ticks.get(schedule).copied()
    }

    async fn store(
        &self,
        function: &str,
        request_id: &str,
        payload: Bytes,
        mut ops: Vec<Op>,
    ) -> Result<(), AcceptError> {
        let len = payload.len() as u64;
        let target = Target::Function(function.to_string());
        if let Some(n) = &self.nats {
            let ev = NewEvent {
                header: self.new_header(target, request_id.to_string(), None),
                payload: payload.to_vec(),
            };
            n.publish(&ev, request_id).await?;
            self.router
                .metrics
                .events
                .accepted
                .get_or_create(&Metrics::function(function))
                .inc();
            return Ok(());
        }
        {
            let mut st = self.lock();
            let lane = st.lanes.entry(target.clone()).or_default();
            if lane.count >= self.config.max_queued_events
                || lane.bytes + len > self.config.max_queued_mb << 20
            {
                return Err(AcceptError::Full {
                    function: function.to_string(),
                    count: lane.count,
                    bytes: lane.bytes,
                });
            }
            // Held for this event while it is written: concurrent accepts see it.
            lane.count += 1;
            lane.bytes += len;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let header = self.new_header(target.clone(), request_id.to_string(), None);
        ops.insert(0, Op::Put(seq, encode(&header, &payload)));
        let result = self.queue.commit(ops).await;
        let mut st = self.lock();
        let State { lanes, entries, .. } = &mut *st;
        let lane = lanes.entry(target).or_default();
        match result {
            Ok(()) => {
                lane.waiting.insert((header.next_ms, seq));
                entries.insert(
                    seq,
                    Entry {
                        header,
                        bytes: len,
                        running: false,
                    },
                );
                drop(st);
                self.wake.notify_one();
                self.router
                    .metrics
                    .events
                    .accepted
                    .get_or_create(&Metrics::function(function))
                    .inc();
                Ok(())
            }
            Err(e) => {
                lane.count -= 1;
                lane.bytes -= len;
                Err(e.into())
            }
        }
    }

    /// A new event's header.
    fn new_header(&self, target: Target, request_id: String, origin: Option<String>) -> Header {
        let now = now_ms();
        Header {
            request_id,
            target,
            history: History {
                accepted_ms: now,
                ..History::default()
            },
            invokes: 0,
            next_ms: now,
            in_flight: false,
            last_error: None,
            origin,
            cloudevent: false,
        }
    }

    /// Takes in a local event just committed.
    fn admit(&self, seq: u64, header: Header, bytes: u64) {
        let mut st = self.lock();
        let lane = st.lanes.entry(header.target.clone()).or_default();
        lane.count += 1;
        lane.bytes += bytes;
        lane.waiting.insert((header.next_ms, seq));
        st.entries.insert(
            seq,
            Entry {
                header,
                bytes,
                running: false,
            },
        );
        drop(st);
        self.wake.notify_one();
    }

    /// Runs the workers until `stop`: each due event starts as soon as its function has room.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if let Some(n) = &self.nats {
            tokio::spawn(n.clone().run(self.clone(), stop.clone()));
        }
        let mut gauges_at = tokio::time::Instant::now();
        let mut pruned_at = tokio::time::Instant::now();
        loop {
            let next = self.dispatch();
            // With NATS, the gauges are the stream's (see nats::Nats::update_gauges).
            if self.nats.is_none() && gauges_at.elapsed() >= Duration::from_secs(1) {
                self.update_gauges();
                gauges_at = tokio::time::Instant::now();
            }
            if pruned_at.elapsed() >= SEEN_PRUNE_EVERY {
                self.prune_seen().await;
                pruned_at = tokio::time::Instant::now();
            }
            let wait = next.map_or(Duration::from_secs(1), |at| {
                Duration::from_millis(at.saturating_sub(now_ms())).min(Duration::from_secs(1))
            });
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Starts every due event its lane has room for; returns when the next one is due.
    fn dispatch(self: &Arc<Self>) -> Option<u64> {
        if self.router.draining.is_cancelled() {
            return None;
        }
        let now = now_ms();
        let mut earliest: Option<u64> = None;
        let mut st = self.lock();
        let State { lanes, entries, .. } = &mut *st;
        for (target, lane) in lanes.iter_mut() {
            let limit = match target {
                // A function that is gone still takes its events, to end them.
                Target::Function(name) => self
                    .router
                    .lookup(name)
                    .map_or(1, |f| f.resolved.max_concurrency),
                Target::Url(_) => URL_CONCURRENCY,
            };
            while lane.running < limit {
                let Some(&(at, seq)) = lane.waiting.first() else {
                    break;
                };
                if at > now {
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                    break;
                }
                lane.waiting.pop_first();
                let Some(entry) = entries.get_mut(&seq) else {
                    continue;
                };
                entry.running = true;
                lane.running += 1;
                let header = entry.header.clone();
                tokio::spawn(self.clone().attempt(seq, header));
            }
        }
        earliest
    }

    fn update_gauges(&self) {
        let now = now_ms();
        let st = self.lock();
        let mut oldest: HashMap<&str, u64> = HashMap::new();
        for e in st.entries.values() {
            if let Target::Function(f) = &e.header.target {
                let o = oldest.entry(f).or_insert(u64::MAX);
                *o = (*o).min(e.header.history.accepted_ms);
            }
        }
        let m = &self.router.metrics.events;
        for (target, lane) in &st.lanes {
            if let Target::Function(f) = target {
                let labels = Metrics::function(f);
                m.depth.get_or_create(&labels).set(lane.count as i64);
                let age = oldest
                    .get(f.as_str())
                    .map_or(0.0, |a| now.saturating_sub(*a) as f64 / 1000.0);
                m.oldest_age.get_or_create(&labels).set(age);
            }
        }
    }

    async fn attempt(self: Arc<Self>, seq: u64, header: Header) {
        let payload = match self.queue.payload(seq) {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.forget(seq);
                return;
            }
            Err(e) => {
                tracing::error!(request_id = %header.request_id, "{e}");
                let mut h = header;
                h.history.throttles += 1;
                h.next_ms = now_ms() + self.default_policy().backoff_ms(h.history.throttles);
                self.requeue(seq, h);
                return;
            }
        };
        match header.target.clone() {
            Target::Function(name) => self.run_function(&*self, seq, header, &name, payload).await,
            Target::Url(url) => self.deliver(&*self, seq, header, &url, payload).await,
        }
    }

    /// The rules `f`'s events run under now.
    pub fn policy(&self, f: &ActiveFunction) -> Policy {
        let st = self.lock();
        Policy::resolve(
            &f.manifest.async_settings,
            st.configs.get(&f.name),
            &self.config,
        )
    }

    fn default_policy(&self) -> Policy {
        Policy::resolve(&Default::default(), None, &self.config)
    }

    /// One try of a function's event, its outcome recorded through `b`.
    pub(crate) async fn run_function<B: Backend>(
        self: &Arc<Self>,
        b: &B,
        t: B::Taken,
        mut h: Header,
        name: &str,
        payload: Vec<u8>,
    ) {
        let metrics = &self.router.metrics.events;
        let Some(f) = self.router.lookup(name) else {
            // Deleted since: nothing can run it.
            if b.end(&t, &h, Vec::new()).await.is_ok() {
                b.done(t);
            } else {
                h.history.throttles += 1;
                h.next_ms = now_ms() + self.default_policy().backoff_ms(h.history.throttles);
                b.retry(t, h, &payload).await;
            }
            metrics
                .dropped
                .get_or_create(&condition_labels(name, "FunctionNotFound"))
                .inc();
            return;
        };
        let policy = self.policy(&f);
        if let Err(condition) = policy::may_start(&policy, &h.history, now_ms()) {
            return self
                .end(b, t, h, &f, &policy, &payload, condition, None)
                .await;
        }
        if let Err(e) = b.starting(&t, &h, &payload).await {
            // Not marked, so not started: tried again later.
            tracing::error!(function = name, request_id = %h.request_id, "marking an async event's try: {e}");
            h.history.throttles += 1;
            h.next_ms = now_ms() + policy.backoff_ms(h.history.throttles);
            b.retry(t, h, &payload).await;
            return;
        }
        // A topic's event: an exec-mode function takes its data and `CE_*` variables.
        let (body, env) = if h.cloudevent && f.manifest.mode == Mode::Exec {
            let (stdin, env) = cloudevent::stored_for_exec(&payload);
            (Bytes::from(stdin), env)
        } else {
            (Bytes::from(payload.clone()), Vec::new())
        };
        let result = self
            .router
            .invoke(InvokeRequest {
                name,
                body,
                request_id: &h.request_id,
                want_tail: false,
                client_context: None,
                env,
                version: None,
                qualifier: None,
                stdout: None,
            })
            .await;
        let fn_error =
            |e: &crate::instance::InvokeError| crate::api::function_error_payload(e, &h.request_id);
        let (outcome, response, error) = match result {
            Ok(inv) => match inv.body.collect(self.router.max_response).await {
                Ok(body) => (Outcome::Success, Some((false, body)), None),
                Err(e) => (
                    Outcome::FunctionError,
                    fn_error(&e).map(|p| (true, p)),
                    Some(e.to_string()),
                ),
            },
            Err(fail) => match fn_error(&fail.error) {
                Some(p) => (
                    Outcome::FunctionError,
                    Some((true, p)),
                    Some(fail.error.to_string()),
                ),
                // 429, the agent draining or failing: no try of the function happened.
                None => (Outcome::Throttled, None, Some(fail.error.to_string())),
            },
        };
        match outcome {
            Outcome::Success => h.invokes += 1,
            Outcome::FunctionError => {
                h.invokes += 1;
                h.history.errors += 1;
                h.history.throttles = 0;
            }
            Outcome::Throttled => h.history.throttles += 1,
        }
        let result_label = match outcome {
            Outcome::Success => "success",
            Outcome::FunctionError => "function_error",
            Outcome::Throttled => "throttled",
        };
        metrics
            .attempts
            .get_or_create(&labels(name, result_label))
            .inc();
        if error.is_some() {
            h.last_error = error;
        }
        match policy::after(&policy, &h.history, outcome, now_ms()) {
            Next::RetryAt(at) => {
                h.next_ms = at;
                b.retry(t, h, &payload).await;
            }
            Next::Done(condition) => {
                self.end(b, t, h, &f, &policy, &payload, condition, response)
                    .await
            }
        }
    }

    /// Ends an event: it goes, and its destination record is stored with its end.
    #[allow(clippy::too_many_arguments)]
    async fn end<B: Backend>(
        &self,
        b: &B,
        t: B::Taken,
        mut h: Header,
        f: &ActiveFunction,
        policy: &Policy,
        payload: &[u8],
        condition: Condition,
        response: Option<(bool, Bytes)>,
    ) {
        let metrics = &self.router.metrics.events;
        let destination = match condition {
            Condition::Success => &policy.on_success,
            _ => &policy.on_failure,
        };
        let mut records = Vec::new();
        let mut fanned = None;
        if let Some(d) = destination {
            let rec = policy::record(
                condition,
                &h.request_id,
                &f.arn(&self.router.config, false),
                h.invokes,
                payload,
                response.as_ref().map(|(e, p)| policy::Response {
                    function_error: *e,
                    payload: p,
                }),
                time::OffsetDateTime::now_utc(),
            );
            let record = |target, body| NewEvent {
                header: self.new_header(target, crate::api::request_id(), Some(f.name.clone())),
                payload: body,
            };
            match d {
                Destination::Function(n) => records.push(record(
                    Target::Function(n.clone()),
                    serde_json::to_vec(&rec).expect("records serialize"),
                )),
                Destination::Url(u) => records.push(record(
                    Target::Url(u.clone()),
                    serde_json::to_vec(&rec).expect("records serialize"),
                )),
                Destination::Topic(topic) => {
                    let event = self.destination_event(f, condition, rec);
                    let (takers, filtered) = self.takers(topic, &event);
                    let body = serde_json::to_vec(&event.to_json()).expect("events serialize");
                    for function in &takers {
                        let mut r = record(Target::Function(function.clone()), body.clone());
                        r.header.cloudevent = true;
                        records.push(r);
                    }
                    fanned = Some((topic.clone(), takers, filtered));
                }
            }
        }
        // What the records were, for the metrics once they are stored.
        let kinds: Vec<&str> = records
            .iter()
            .filter(|r| !r.header.cloudevent)
            .map(|r| match &r.header.target {
                Target::Function(_) => "function",
                Target::Url(_) => "url_stored",
            })
            .collect();
        if let Err(e) = b.end(&t, &h, records).await {
            tracing::error!(function = %f.name, request_id = %h.request_id, "ending an async event: {e}");
            h.history.throttles += 1;
            h.next_ms = now_ms() + policy.backoff_ms(h.history.throttles);
            b.retry(t, h, payload).await;
            return;
        }
        if let Some((topic, takers, filtered)) = fanned {
            metrics
                .deliveries
                .get_or_create(&labels(&f.name, "topic"))
                .inc();
            self.count_publish(&topic, "destination", &takers, &filtered, false);
            tracing::debug!(function = %f.name, topic, subscribers = takers.len(), "destination record published");
        }
        for kind in kinds {
            metrics
                .deliveries
                .get_or_create(&labels(&f.name, kind))
                .inc();
        }
        if condition != Condition::Success {
            metrics
                .dropped
                .get_or_create(&condition_labels(&f.name, condition.as_str()))
                .inc();
            tracing::info!(function = %f.name, request_id = %h.request_id, condition = condition.as_str(), invokes = h.invokes, "async event failed for good");
            self.router.logs.append(
                &f.name,
                f.version,
                &h.request_id,
                "agent",
                &format!(
                    "async event failed for good: {} after {} tries{}",
                    condition.as_str(),
                    h.invokes,
                    h.last_error
                        .as_deref()
                        .map(|e| format!(" (last: {e})"))
                        .unwrap_or_default()
                ),
            );
            let note = FailureNote {
                request_id: h.request_id.clone(),
                condition: condition.as_str().into(),
                error: h.last_error.clone(),
                at: rfc3339_ms(now_ms()),
                invokes: h.invokes,
            };
            let mut st = self.lock();
            let lane = st.lanes.entry(h.target.clone()).or_default();
            if lane.failures.len() == FAILURES_KEPT {
                lane.failures.pop_front();
            }
            lane.failures.push_back(note);
        }
        b.done(t);
    }

    /// POSTs a destination record to its URL; retried with backoff until it is taken or too
    /// old.
    pub(crate) async fn deliver<B: Backend>(
        &self,
        b: &B,
        t: B::Taken,
        mut h: Header,
        url: &str,
        payload: Vec<u8>,
    ) {
        let origin = h.origin.clone().unwrap_or_default();
        let metrics = &self.router.metrics.events;
        let result = self.post(url, payload.clone()).await;
        let done = match result {
            Ok(()) => {
                metrics
                    .deliveries
                    .get_or_create(&labels(&origin, "url"))
                    .inc();
                true
            }
            Err(e) => {
                let policy = self.default_policy();
                h.history.throttles += 1;
                h.last_error = Some(e.clone());
                let at = now_ms() + policy.backoff_ms(h.history.throttles);
                let max_age = (self.config.destination_max_age_s * 1000.0) as u64;
                if at > h.history.accepted_ms + max_age {
                    tracing::warn!(url, origin = %origin, "destination record dropped after {} tries: {e}", h.history.throttles);
                    metrics
                        .dropped
                        .get_or_create(&condition_labels(&origin, "DestinationFailed"))
                        .inc();
                    true
                } else {
                    tracing::info!(url, origin = %origin, "destination POST failed (tried again later): {e}");
                    metrics
                        .deliveries
                        .get_or_create(&labels(&origin, "url_retry"))
                        .inc();
                    h.next_ms = at;
                    false
                }
            }
        };
        if !done {
            return b.retry(t, h, &payload).await;
        }
        match b.end(&t, &h, Vec::new()).await {
            Ok(()) => b.done(t),
            Err(e) => {
                tracing::error!(url, "destination bookkeeping: {e}");
                h.next_ms = now_ms() + self.default_policy().backoff_ms(h.history.throttles.max(1));
                b.retry(t, h, &payload).await;
            }
        }
    }

    async fn post(&self, url: &str, body: Vec<u8>) -> Result<(), String> {
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("fnlet/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(URL_TIMEOUT, self.http.request(req)).await {
            Err(_) => Err(format!("no answer within {URL_TIMEOUT:?}")),
            // hyper's error says only "client error (Connect)": the sources say why (a
            // refused connection, a certificate that does not verify).
            Ok(Err(e)) => {
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why.push_str(": ");
                    why.push_str(&s.to_string());
                    source = s.source();
                }
                Err(why)
            }
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
        }
    }

    /// A destination record as a topic's CloudEvent.
    fn destination_event(
        &self,
        f: &ActiveFunction,
        condition: Condition,
        record: serde_json::Value,
    ) -> CloudEvent {
        let kind = match condition {
            Condition::Success => "success",
            _ => "failure",
        };
        let attributes = [
            ("specversion", "1.0".to_string()),
            ("id", crate::api::request_id()),
            ("source", f.arn(&self.router.config, false)),
            ("type", format!("fnlet.invocation.{kind}")),
            ("subject", f.name.clone()),
            ("time", rfc3339_ms(now_ms())),
            ("datacontenttype", "application/json".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
        .collect();
        CloudEvent {
            attributes,
            data: cloudevent::Data::Json(record),
        }
    }

    /// The functions subscribed to `topic` that take `event`, and those whose filters it did
    /// not pass.
    fn takers(&self, topic: &str, event: &CloudEvent) -> (Vec<String>, Vec<String>) {
        let mut takers = Vec::new();
        let mut filtered = Vec::new();
        for s in topics::subscribers(&self.router.registry, topic) {
            if s.takes(event) {
                takers.push(s.function);
            } else {
                filtered.push(s.function);
            }
        }
        (takers, filtered)
    }

    /// Counts one event published to `topic` (metrics and `fnlet topics`).
    fn count_publish(
        &self,
        topic: &str,
        mode: &str,
        takers: &[String],
        filtered: &[String],
        duplicate: bool,
    ) {
        let known = !takers.is_empty()
            || !filtered.is_empty()
            || self.router.config.topics.contains_key(topic);
        let label = if known { topic } else { UNSUBSCRIBED };
        let m = &self.router.metrics.topics;
        m.publishes
            .get_or_create(&TopicModeLabels {
                topic: label.to_string(),
                mode: mode.to_string(),
            })
            .inc();
        if duplicate {
            m.duplicates
                .get_or_create(&crate::metrics::TopicLabels {
                    topic: label.to_string(),
                })
                .inc();
        }
        let fl = |function: &String| TopicFnLabels {
            topic: label.to_string(),
            function: function.clone(),
        };
        // A duplicate is dropped whole: neither delivered nor filtered.
        if !duplicate {
            for t in takers {
                m.fanouts.get_or_create(&fl(t)).inc();
            }
            for t in filtered {
                m.filtered.get_or_create(&fl(t)).inc();
            }
        }
        self.topic_stats.add(topic, known, |c| {
            c.published += 1;
            if duplicate {
                c.duplicates += 1;
            } else {
                c.delivered += takers.len() as u64;
                c.filtered += filtered.len() as u64;
            }
        });
    }

    /// Publishes `events` to `topic`: one async event per subscribed function whose filters
    /// an event passes, each with its own retries and destinations; an event whose source and
    /// id were published to the topic within `events.dedup_window_s` is a duplicate and makes
    /// none. Returns once every async event (and the dedup record) is on disk, in one commit;
    /// with NATS, once every async event's publish is acked ([`Events::publish_nats`]).
    pub async fn publish(
        &self,
        topic: &str,
        events: &[CloudEvent],
        mode: cloudevent::Mode,
    ) -> Result<Vec<Published>, AcceptError> {
        if let Some(n) = &self.nats {
            return self.publish_nats(n, topic, events, mode).await;
        }
        let now = now_ms();
        let until = now + (self.config.dedup_window_s * 1000.0) as u64;
        let subscribers = topics::subscribers(&self.router.registry, topic);
        let mut out = Vec::with_capacity(events.len());
        let mut ops = Vec::new();
        // (seq, header, bytes) of the async events made, and the dedup keys reserved.
        let mut staged: Vec<(u64, Header, u64)> = Vec::new();
        let mut reserved: Vec<[u8; 32]> = Vec::new();
        let mut counted: Vec<(Vec<String>, Vec<String>, bool)> = Vec::new();
        let mut full = None;
        {
            let mut st = self.lock();
            for e in events {
                let (takers, filtered): (Vec<_>, Vec<_>) =
                    subscribers.iter().partition(|s| s.takes(e));
                let takers: Vec<String> = takers.into_iter().map(|s| s.function.clone()).collect();
                let filtered: Vec<String> =
                    filtered.into_iter().map(|s| s.function.clone()).collect();
                let mut published = Published {
                    id: e.id(),
                    source: e.source(),
                    duplicate: false,
                    deliveries: Vec::new(),
                    filtered: filtered.len(),
                };
                if !takers.is_empty() {
                    let key = seen_key(topic, &published.source, &published.id);
                    if st.seen.get(&key).is_some_and(|u| *u > now) {
                        published.duplicate = true;
                    } else {
                        st.seen.insert(key, until);
                        reserved.push(key);
                        ops.push(Op::PutSeen(key, until));
                        let body = serde_json::to_vec(&e.to_json()).expect("events serialize");
                        let len = body.len() as u64;
                        for function in &takers {
                            let target = Target::Function(function.clone());
                            let lane = st.lanes.entry(target.clone()).or_default();
                            if lane.count >= self.config.max_queued_events
                                || lane.bytes + len > self.config.max_queued_mb << 20
                            {
                                full.get_or_insert(AcceptError::Full {
                                    function: function.clone(),
                                    count: lane.count,
                                    bytes: lane.bytes,
                                });
                                continue;
                            }
                            // Held while it is written: concurrent accepts see it.
                            lane.count += 1;
                            lane.bytes += len;
                            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                            let mut h = self.new_header(target, crate::api::request_id(), None);
                            h.cloudevent = true;
                            ops.push(Op::Put(seq, encode(&h, &body)));
                            published.deliveries.push(Delivery {
                                function: function.clone(),
                                request_id: h.request_id.clone(),
                            });
                            staged.push((seq, h, len));
                        }
                    }
                }
                counted.push((takers, filtered, published.duplicate));
                out.push(published);
            }
        }
        let result = match full {
            Some(e) => Err(e),
            None if ops.is_empty() => Ok(()),
            None => self.queue.commit(ops).await.map_err(AcceptError::from),
        };
        let mut st = self.lock();
        let State {
            lanes,
            entries,
            seen,
            ..
        } = &mut *st;
        if let Err(e) = result {
            // Nothing was stored: every reservation is let go.
            for (_, h, len) in &staged {
                if let Some(lane) = lanes.get_mut(&h.target) {
                    lane.count = lane.count.saturating_sub(1);
                    lane.bytes = lane.bytes.saturating_sub(*len);
                }
            }
            for key in &reserved {
                seen.remove(key);
            }
            return Err(e);
        }
        for (seq, header, bytes) in staged {
            let lane = lanes.entry(header.target.clone()).or_default();
            lane.waiting.insert((header.next_ms, seq));
            entries.insert(
                seq,
                Entry {
                    header,
                    bytes,
                    running: false,
                },
            );
        }
        drop(st);
        self.wake.notify_one();
        for (takers, filtered, duplicate) in &counted {
            self.count_publish(topic, mode.as_str(), takers, filtered, *duplicate);
            if !duplicate {
                for t in takers {
                    self.router
                        .metrics
                        .events
                        .accepted
                        .get_or_create(&Metrics::function(t))
                        .inc();
                }
            }
        }
        Ok(out)
    }

    /// [`Events::publish`] with the JetStream backend. Each async event is published with a
    /// message id made of the dedup key and its subscriber, and the stream's duplicate window
    /// (`events.dedup_window_s`, at least 2 minutes) keeps the servers from storing a second
    /// copy: that is the dedup record, shared by every agent using the stream. A publish
    /// refused part way (a full stream, NATS unreachable) answers the error with some copies
    /// stored; the same events published again store only the others.
    async fn publish_nats(
        &self,
        n: &nats::Nats,
        topic: &str,
        events: &[CloudEvent],
        mode: cloudevent::Mode,
    ) -> Result<Vec<Published>, AcceptError> {
        use futures_util::StreamExt;
        let subscribers = topics::subscribers(&self.router.registry, topic);
        let mut out = Vec::with_capacity(events.len());
        let mut filtered_of = Vec::with_capacity(events.len());
        // (the event's index, its message id, the async event) for every subscriber.
        let mut sends: Vec<(usize, String, NewEvent)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let (takers, filtered): (Vec<_>, Vec<_>) = subscribers.iter().partition(|s| s.takes(e));
            let published = Published {
                id: e.id(),
                source: e.source(),
                duplicate: false,
                deliveries: Vec::new(),
                filtered: filtered.len(),
            };
            if !takers.is_empty() {
                let key = hex::encode(seen_key(topic, &published.source, &published.id));
                let body = serde_json::to_vec(&e.to_json()).expect("events serialize");
                for s in takers {
                    let target = Target::Function(s.function.clone());
                    let mut header = self.new_header(target, crate::api::request_id(), None);
                    header.cloudevent = true;
                    let id = format!("topic-{key}-{}", s.function);
                    let payload = body.clone();
                    sends.push((i, id, NewEvent { header, payload }));
                }
            }
            filtered_of.push(
                filtered
                    .into_iter()
                    .map(|s| s.function.clone())
                    .collect::<Vec<_>>(),
            );
            out.push(published);
        }
        // The futures made first: a stream's closure borrowing them is not `Send` enough.
        let publishes: Vec<_> = sends.iter().map(|(_, id, ev)| n.publish(ev, id)).collect();
        let acks: Vec<_> = futures_util::stream::iter(publishes)
            .buffered(nats::PUBLISH_AT_ONCE)
            .collect()
            .await;
        // Copies each event already had within the window.
        let mut duplicates = vec![0usize; events.len()];
        for ((i, _, ev), ack) in sends.iter().zip(acks) {
            if ack? {
                duplicates[*i] += 1;
            } else if let Target::Function(function) = &ev.header.target {
                out[*i].deliveries.push(Delivery {
                    function: function.clone(),
                    request_id: ev.header.request_id.clone(),
                });
            }
        }
        for (i, p) in out.iter_mut().enumerate() {
            // A copy for every subscriber was there: the event is a duplicate. (A subscriber
            // added since takes it.)
            p.duplicate = duplicates[i] > 0 && p.deliveries.is_empty();
            let takers: Vec<String> = p.deliveries.iter().map(|d| d.function.clone()).collect();
            self.count_publish(topic, mode.as_str(), &takers, &filtered_of[i], p.duplicate);
            for t in &takers {
                self.router
                    .metrics
                    .events
                    .accepted
                    .get_or_create(&Metrics::function(t))
                    .inc();
            }
        }
        Ok(out)
    }

    /// Drops the dedup entries (topic events, ids accepted once) whose window has passed (here
    /// and on disk).
    async fn prune_seen(&self) {
        let now = now_ms();
        let expired: Vec<[u8; 32]> = {
            let mut st = self.lock();
            let keys: Vec<[u8; 32]> = st
                .seen
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(k, _)| *k)
                .take(10_000)
                .collect();
            for k in &keys {
                st.seen.remove(k);
            }
            keys
        };
        if expired.is_empty() {
            return;
        }
        let ops = expired.into_iter().map(Op::RemoveSeen).collect();
        // Left on disk, an entry is dropped again after the next start.
        if let Err(e) = self.queue.commit_lazy(ops).await {
            tracing::warn!("dropping expired dedup entries: {e}");
        }
    }

    /// Puts a running event back to wait for `h.next_ms`.
    fn requeue(&self, seq: u64, h: Header) {
        let mut st = self.lock();
        let State { lanes, entries, .. } = &mut *st;
        let lane = lanes.entry(h.target.clone()).or_default();
        lane.running = lane.running.saturating_sub(1);
        lane.waiting.insert((h.next_ms, seq));
        if let Some(e) = entries.get_mut(&seq) {
            e.running = false;
            e.header = h;
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Drops a running event that ended.
    fn forget(&self, seq: u64) {
        let mut st = self.lock();
        let State { lanes, entries, .. } = &mut *st;
        if let Some(e) = entries.remove(&seq)
            && let Some(lane) = lanes.get_mut(&e.header.target)
        {
            lane.running = lane.running.saturating_sub(1);
            lane.count = lane.count.saturating_sub(1);
            lane.bytes = lane.bytes.saturating_sub(e.bytes);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// What `fnlet events NAME` shows; with NATS, the stream's counts for the function are
    /// added (its pending events, and those being tried or waiting for a retry on any agent).
    pub async fn view(&self, name: &str) -> serde_json::Value {
        let mut v = self.local_view(name);
        if let Some(n) = &self.nats {
            v["backend"] = "nats".into();
            match n.counts(name).await {
                Some((pending, unacked, oldest)) => {
                    let add = |v: &serde_json::Value, n: u64| v.as_u64().unwrap_or(0) + n;
                    v["stored"] = add(&v["stored"], pending + unacked).into();
                    v["pending"] = add(&v["pending"], pending).into();
                    v["in_flight"] = add(&v["in_flight"], unacked).into();
                    if let Some(o) = oldest {
                        let age = now_ms().saturating_sub(o) as f64 / 1000.0;
                        if age > v["oldest_age_s"].as_f64().unwrap_or(0.0) {
                            v["oldest_age_s"] = age.into();
                        }
                    }
                }
                None => v["nats_unavailable"] = true.into(),
            }
        }
        v
    }

    fn local_view(&self, name: &str) -> serde_json::Value {
        let now = now_ms();
        let st = self.lock();
        let target = Target::Function(name.to_string());
        let Some(lane) = st.lanes.get(&target) else {
            return serde_json::json!({
                "function": name, "stored": 0, "pending": 0, "in_flight": 0, "retrying": [],
                "oldest_age_s": 0.0, "bytes": 0, "last_failures": [],
            });
        };
        let mut pending = 0;
        let mut retrying = Vec::new();
        let mut oldest = None::<u64>;
        for (_, seq) in &lane.waiting {
            let Some(e) = st.entries.get(seq) else {
                continue;
            };
            let h = &e.header;
            oldest = Some(oldest.map_or(h.history.accepted_ms, |o| o.min(h.history.accepted_ms)));
            if h.history.errors == 0 && h.history.throttles == 0 {
                pending += 1;
            } else if retrying.len() < 100 {
                retrying.push(serde_json::json!({
                    "request_id": h.request_id,
                    "next_attempt_at": rfc3339_ms(h.next_ms),
                    "next_attempt_in_s": h.next_ms.saturating_sub(now) as f64 / 1000.0,
                    "function_errors": h.history.errors,
                    "throttles": h.history.throttles,
                    "last_error": h.last_error,
                }));
            }
        }
        for e in st
            .entries
            .values()
            .filter(|e| e.running && e.header.target == target)
        {
            let a = e.header.history.accepted_ms;
            oldest = Some(oldest.map_or(a, |o| o.min(a)));
        }
        serde_json::json!({
            "function": name,
            "stored": lane.count,
            "pending": pending,
            "in_flight": lane.running,
            "retrying": retrying,
            "oldest_age_s": oldest.map_or(0.0, |o| now.saturating_sub(o) as f64 / 1000.0),
            "bytes": lane.bytes,
            "last_failures": lane.failures.iter().rev().collect::<Vec<_>>(),
        })
    }

    /// Makes every commit so far durable (at shutdown: the workers' last bookkeeping).
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.queue.commit(Vec::new()).await
    }

    /// The event invoke config set through the API for `name`.
    pub fn invoke_config(&self, name: &str) -> Option<InvokeConfig> {
        self.lock().configs.get(name).cloned()
    }

    /// Stores (`Some`) or removes (`None`) `name`'s event invoke config.
    pub async fn set_invoke_config(
        &self,
        name: &str,
        config: Option<InvokeConfig>,
    ) -> Result<(), QueueError> {
        let op = match &config {
            Some(c) => Op::PutConfig(name.to_string(), c.clone()),
            None => Op::RemoveConfig(name.to_string()),
        };
        self.queue.commit(vec![op]).await?;
        let mut st = self.lock();
        match config {
            Some(c) => st.configs.insert(name.to_string(), c),
            None => st.configs.remove(name),
        };
        Ok(())
    }
}

/// The local backend: an event is its number in the queue; its bookkeeping is committed
/// without an fsync of its own (see [`queue`]).
impl Backend for Events {
    type Taken = u64;

    async fn starting(&self, seq: &u64, h: &Header, payload: &[u8]) -> Result<(), QueueError> {
        let marked = Header {
            in_flight: true,
            ..h.clone()
        };
        self.queue
            .commit_lazy(vec![Op::Put(*seq, encode(&marked, payload))])
            .await
    }

    async fn retry(&self, seq: u64, h: Header, payload: &[u8]) {
        if let Err(e) = self
            .queue
            .commit_lazy(vec![Op::Put(seq, encode(&h, payload))])
            .await
        {
            // The stored copy still says in flight: after a crash it runs again.
            tracing::error!(request_id = %h.request_id, "rescheduling an async event: {e}");
        }
        self.requeue(seq, h);
    }

    /// The event's removal and its records in one commit: a record is never lost, nor made
    /// twice.
    async fn end(&self, seq: &u64, _h: &Header, records: Vec<NewEvent>) -> Result<(), QueueError> {
        let mut ops = vec![Op::Remove(*seq)];
        let staged: Vec<_> = records
            .into_iter()
            .map(|r| {
                let nseq = self.seq.fetch_add(1, Ordering::Relaxed);
                ops.push(Op::Put(nseq, encode(&r.header, &r.payload)));
                (nseq, r.header, r.payload.len() as u64)
            })
            .collect();
        self.queue.commit_lazy(ops).await?;
        for (nseq, nh, bytes) in staged {
            self.admit(nseq, nh, bytes);
        }
        Ok(())
    }

    fn done(&self, seq: u64) {
        self.forget(seq);
    }
}

fn labels(function: &str, result: &str) -> EventLabels {
    EventLabels {
        function: function.to_string(),
        result: result.to_string(),
    }
}

fn condition_labels(function: &str, condition: &str) -> ConditionLabels {
    ConditionLabels {
        function: function.to_string(),
        condition: condition.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::invoke::app_tests::TestAgent;

    /// Needs root: the test agent prepares a cgroup root.
    #[tokio::test]
    async fn an_id_accepted_once_is_stored_once_until_its_window_is_pruned() {
        let agent = TestAgent::start("accept-once").await;
        let ev = agent.app.events.clone();
        let body = || Bytes::from_static(b"{}");
        assert!(
            ev.accept_once("f", "t2", body(), Some(("s", 2_000)))
                .await
                .unwrap()
        );
        assert!(
            !ev.accept_once("f", "t2", body(), Some(("s", 2_000)))
                .await
                .unwrap()
        );
        // An earlier tick is stored (its own id) but the schedule's last tick only rises.
        assert!(
            ev.accept_once("f", "t1", body(), Some(("s", 1_000)))
                .await
                .unwrap()
        );
        assert_eq!(ev.last_tick("s"), Some(2_000));
        assert_eq!(ev.last_tick("other"), None);
        {
            let st = ev.lock();
            assert_eq!(st.entries.len(), 2);
            let until = st.seen[&once_key("t2")];
            assert!(until > now_ms() + SEEN_WINDOW_MS / 2, "{until}");
            // Kept apart from a topic event with the same id.
            assert!(!st.seen.contains_key(&seen_key("t", "s", "t2")));
        }
        // Past its window an id is taken again, and the pruning drops it with the topics'.
        ev.lock()
            .seen
            .insert(once_key("old"), now_ms().saturating_sub(1));
        ev.lock()
            .seen
            .insert(once_key("gone"), now_ms().saturating_sub(1));
        assert!(ev.accept_once("f", "old", body(), None).await.unwrap());
        ev.prune_seen().await;
        {
            let st = ev.lock();
            assert!(!st.seen.contains_key(&once_key("gone")));
            assert!(st.seen.contains_key(&once_key("old")));
            assert!(st.seen.contains_key(&once_key("t1")));
        }
        agent.finish().await;
    }
}
