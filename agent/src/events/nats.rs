//! The JetStream backend (`[events] backend = "nats"`): accepted events are published to one
//! stream with work-queue retention (`replicas` copies), a subject per function
//! (`<subject>.fn.<name>`) and one for destination URLs (`<subject>.url`), and answered 202 once
//! the servers acked the publish. Every agent using the stream pulls from one durable
//! explicit-ack consumer per function it has deployed, as many events as the function has room
//! for, so any agent runs them and the loss of one (or of a NATS server, with 3 replicas) loses
//! nothing.
//!
//! Messages are never changed: a retry is a NAK with the wait until its next try, and what the
//! tries so far did (Lambda's counts, the last error, the deliveries accounted for) is kept in
//! a key-value bucket under the request id, written only when a try did not end the event. A
//! delivery beyond those accounted for means an agent took the event and never reported (it
//! died, or lost NATS, mid-try): it is counted as a duplicate. While a try runs its agent tells
//! the servers every third of `ack_wait_s`, so only a silent agent's events go elsewhere.
//!
//! Topics: a publish's copies (one per subscriber) and an ended event's records (one per
//! subscriber of a destination topic) are published with message ids the stream's duplicate
//! window (`events.dedup_window_s`, at least 2 minutes) deduplicates: a topic event's is made
//! of its dedup key and the subscriber, a record's of the ended event's request id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::policy::History;
use super::queue::{Header, QueueError, Target, decode, encode};
use super::{AcceptError, Backend, Events, NewEvent, URL_CONCURRENCY, now_ms};
use crate::config::{EventsConfig, NatsConfig};
use crate::metrics::Metrics;

/// The server's error code for a message a stream's limits refuse (JSStreamStoreFailedErrF).
const STORE_FAILED: u64 = 10077;
/// How long a pull waits for events before it is made again (with the room there is then).
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How often each lane's gauges are read from the servers.
const GAUGES_EVERY: Duration = Duration::from_secs(5);
/// A NAKed event may come back this early (the servers' timer) and still be due.
const EARLY_MS: u64 = 50;
/// Publishes awaiting their acks at once, for a topic's fan-out or an end's records.
pub(super) const PUBLISH_AT_ONCE: usize = 64;
/// The stream's duplicate window at least: an end's records are published again with the
/// same message ids when the end is tried again, within the backoff's first minutes.
const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What the tries of an event so far did: kept under its request id while it is retried.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TryState {
    history: History,
    invokes: u32,
    next_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    /// Deliveries accounted for: the ones whose try (or wait) was recorded here.
    seen: u32,
}

/// The stream and bucket, once made (or found).
struct Ready {
    stream: stream::Stream,
    state: kv::Store,
}

pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    max_per_function: u64,
    /// The stream's duplicate window: `events.dedup_window_s` (a topic event's copies are
    /// deduplicated by message id), at least [`MIN_DUPLICATE_WINDOW`].
    duplicate_window: Duration,
    ready: tokio::sync::OnceCell<Ready>,
    /// Tries running here per lane.
    running: Mutex<HashMap<Target, Arc<Lane>>>,
}

#[derive(Default)]
struct Lane {
    running: AtomicU32,
    room: tokio::sync::Notify,
}

/// One delivery being tried here.
pub struct Taken {
    msg: jetstream::Message,
    delivered: u32,
    /// Tells the servers the try is still running; stopped when the try ends.
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// The message id of an ended event's record: one copy of each, even if the end is tried
/// again. The event's request id, and the subscriber for a destination topic's copies.
fn record_id(ended: &Header, record: &NewEvent) -> String {
    match &record.header.target {
        Target::Function(f) if record.header.cloudevent => {
            format!("{}-record-{f}", ended.request_id)
        }
        _ => format!("{}-record", ended.request_id),
    }
}

fn nats_error(what: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Nats(format!("{what}: {e}"))
}

impl Nats {
    /// Starts connecting (in the background: the agent starts without NATS, and Event invokes
    /// answer 503 until it is reached).
    pub async fn connect(config: &EventsConfig, name: &str) -> Result<Nats, QueueError> {
        let n = &config.nats;
        let addrs = n
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| nats_error("events.nats.servers", e))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("fnlet {name}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|ev| async move {
                match ev {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS: reconnecting")
                    }
                    other => tracing::info!("NATS: {other}"),
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| nats_error("connecting", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs_f64(n.publish_timeout_s));
        Ok(Nats {
            client,
            js,
            config: n.clone(),
            max_per_function: config.max_queued_events,
            duplicate_window: Duration::from_secs_f64(config.dedup_window_s)
                .max(MIN_DUPLICATE_WINDOW),
            ready: tokio::sync::OnceCell::new(),
            running: Mutex::new(HashMap::new()),
        })
    }

    fn subject(&self, target: &Target) -> String {
        match target {
            Target::Function(f) => format!("{}.fn.{f}", self.config.subject),
            Target::Url(_) => format!("{}.url", self.config.subject),
        }
    }

    fn consumer_name(&self, target: &Target) -> String {
        match target {
            Target::Function(f) => format!("{}_fn_{f}", self.config.stream),
            Target::Url(_) => format!("{}_url", self.config.stream),
        }
    }

    /// Makes (or finds, and brings up to date) the stream and the state bucket.
    async fn setup(&self) -> Result<Ready, QueueError> {
        let n = &self.config;
        let config = stream::Config {
            name: n.stream.clone(),
            subjects: vec![format!("{}.>", n.subject)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: n.replicas(),
            // Each function's bound, and the stream's bytes: beyond, a publish is refused.
            max_messages_per_subject: i64::try_from(self.max_per_function).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(n.max_mb << 20).unwrap_or(i64::MAX),
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        };
        let stream = self
            .js
            .create_or_update_stream(config)
            .await
            .map_err(|e| nats_error(&format!("making the stream {}", n.stream), e))?;
        tracing::debug!(stream = %stream.config.name, "events stream ready");
        let stream = self
            .js
            .get_stream(&n.stream)
            .await
            .map_err(|e| nats_error(&format!("opening the stream {}", n.stream), e))?;
        // The bucket's stream made here, as the KV API would (its create asks the account
        // for limits in a form 2.9 servers do not answer).
        let bucket = format!("{}_state", n.stream);
        self.js
            .create_or_update_stream(stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                // Past any event's age (6 h at most): a state left by a crash goes.
                max_age: Duration::from_secs(7 * 3600),
                storage: stream::StorageType::File,
                num_replicas: n.replicas(),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error(&format!("making the bucket {bucket}"), e))?;
        let state = self
            .js
            .get_key_value(&bucket)
            .await
            .map_err(|e| nats_error(&format!("opening the bucket {bucket}"), e))?;
        Ok(Ready { stream, state })
    }

    /// The stream and bucket, made at the first call that reaches the servers.
    async fn ready(&self) -> Result<&Ready, QueueError> {
        self.ready.get_or_try_init(|| self.setup()).await
    }

    /// Publishes a new event and waits for the servers' ack. `msg_id` lets the servers drop a
    /// second publish of the same event (within the stream's duplicate window); true when
    /// they did (the event was stored already).
    pub async fn publish(&self, ev: &NewEvent, msg_id: &str) -> Result<bool, AcceptError> {
        let unavailable = |why: String| AcceptError::Storage(QueueError::Nats(why));
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unavailable("not connected to any NATS server".into()));
        }
        self.ready().await.map_err(AcceptError::Storage)?;
        let body = encode(&ev.header, &ev.payload);
        let max = self.client.server_info().max_payload;
        if body.len() + msg_id.len() + 64 > max {
            return Err(AcceptError::TooLarge {
                size: ev.payload.len(),
                max_payload: max,
            });
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let ack = self
            .js
            .publish_with_headers(self.subject(&ev.header.target), headers, Bytes::from(body))
            .await
            .map_err(|e| unavailable(format!("publishing: {e}")))?;
        match ack.await {
            Ok(a) => Ok(a.duplicate),
            Err(e) => {
                let refused = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<jetstream::Error>())
                    .filter(|j| j.error_code().0 == STORE_FAILED)
                    .map(|j| j.to_string());
                Err(match refused {
                    // "maximum messages per subject exceeded", "maximum bytes exceeded"
                    Some(why) => AcceptError::StreamFull {
                        function: match &ev.header.target {
                            Target::Function(f) => f.clone(),
                            Target::Url(u) => u.clone(),
                        },
                        why,
                    },
                    None => unavailable(format!("publishing: {e}")),
                })
            }
        }
    }

    fn lane(&self, target: &Target) -> Arc<Lane> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(target.clone())
            .or_default()
            .clone()
    }

    /// Runs a puller per deployed function (and one for destination URLs) until `stop`.
    pub async fn run(self: Arc<Self>, events: Arc<Events>, stop: CancellationToken) {
        let mut lanes: HashMap<Target, (CancellationToken, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            if self.ready().await.is_err() {
                continue;
            }
            let mut want: Vec<Target> = events
                .router
                .registry
                .slots()
                .iter()
                .map(|s| Target::Function(s.active().name.clone()))
                .collect();
            want.push(Target::Url(String::new()));
            // A puller ends when its function goes (or with `stop`): made again if it is back.
            lanes.retain(|t, (token, task)| {
                let keep = want.contains(t) && !task.is_finished();
                if !keep {
                    token.cancel();
                }
                keep
            });
            for t in want {
                if let std::collections::hash_map::Entry::Vacant(e) = lanes.entry(t.clone()) {
                    let token = stop.child_token();
                    let task = tokio::spawn(self.clone().pull(events.clone(), t, token.clone()));
                    e.insert((token, task));
                }
            }
        }
        for (token, _) in lanes.values() {
            token.cancel();
        }
    }

    /// One lane's puller: takes as many events as the lane has room for and starts them.
    async fn pull(self: Arc<Self>, events: Arc<Events>, target: Target, stop: CancellationToken) {
        let name = self.consumer_name(&target);
        let lane = self.lane(&target);
        let mut failures = 0u32;
        let consumer = loop {
            let made = match self.ready().await {
                Ok(r) => r
                    .stream
                    .get_or_create_consumer::<pull::Config>(
                        &name,
                        pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: self.subject(&target),
                            ack_policy: jetstream::consumer::AckPolicy::Explicit,
                            ack_wait: Duration::from_secs_f64(self.config.ack_wait_s),
                            max_deliver: -1,
                            // Events waiting for a retry are pending acks too.
                            max_ack_pending: i64::try_from(self.max_per_function)
                                .unwrap_or(i64::MAX),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| nats_error(&format!("making the consumer {name}"), e)),
                Err(e) => Err(e),
            };
            match made {
                Ok(c) => break c,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!("{e} (trying again)");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        let mut gauges_at = tokio::time::Instant::now() - GAUGES_EVERY;
        loop {
            if stop.is_cancelled() || events.router.draining.is_cancelled() {
                return;
            }
            if gauges_at.elapsed() >= GAUGES_EVERY {
                gauges_at = tokio::time::Instant::now();
                if let Target::Function(f) = &target {
                    self.update_gauges(&events, f, &consumer).await;
                }
            }
            let limit = match &target {
                Target::Function(f) => match events.router.lookup(f) {
                    Some(a) => a.resolved.max_concurrency,
                    None => return,
                },
                Target::Url(_) => URL_CONCURRENCY,
            };
            let room = limit.saturating_sub(lane.running.load(Ordering::Acquire));
            if room == 0 {
                tokio::select! {
                    _ = lane.room.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            let batch = consumer
                .batch()
                .max_messages(room as usize)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(consumer = %name, "pulling events: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    m = batch.next() => m,
                    _ = stop.cancelled() => return,
                };
                match next {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(consumer = %name, "pulling events: {e}");
                        break;
                    }
                    Some(Ok(msg)) => {
                        lane.running.fetch_add(1, Ordering::AcqRel);
                        let (nats, events, lane) = (self.clone(), events.clone(), lane.clone());
                        tokio::spawn(async move {
                            nats.take(&events, msg).await;
                            lane.running.fetch_sub(1, Ordering::AcqRel);
                            lane.room.notify_one();
                        });
                    }
                }
            }
        }
    }

    async fn update_gauges(
        &self,
        events: &Events,
        function: &str,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
    ) {
        let Ok(info) = consumer.get_info().await else {
            return;
        };
        let m = &events.router.metrics.events;
        let labels = Metrics::function(function);
        m.depth
            .get_or_create(&labels)
            .set((info.num_pending + info.num_ack_pending as u64) as i64);
        if let Ok(ready) = self.ready().await {
            let age = self
                .oldest_ms(ready, function)
                .await
                .map_or(0.0, |a| now_ms().saturating_sub(a) as f64 / 1000.0);
            m.oldest_age.get_or_create(&labels).set(age);
        }
    }

    /// When the oldest event `function` has in the stream was accepted (acked events are
    /// gone from a work-queue stream, so it is the first message of its subject).
    async fn oldest_ms(&self, ready: &Ready, function: &str) -> Option<u64> {
        let subject = self.subject(&Target::Function(function.to_string()));
        let first = ready
            .stream
            .get_next_raw_message_by_subject(subject)
            .await
            .ok()?;
        decode(first.sequence, &first.payload)
            .ok()
            .map(|(h, _)| h.history.accepted_ms)
    }

    /// For `fnlet events`: the function's events waiting, those taken (being tried, or
    /// waiting for a retry) on any agent, and when the oldest was accepted.
    pub async fn counts(&self, function: &str) -> Option<(u64, u64, Option<u64>)> {
        let ready = self.ready().await.ok()?;
        let name = self.consumer_name(&Target::Function(function.to_string()));
        let info = ready.stream.consumer_info(&name).await.ok()?;
        let oldest = self.oldest_ms(ready, function).await;
        Some((info.num_pending, info.num_ack_pending as u64, oldest))
    }

    /// One delivery: its history restored, then tried like a local event.
    async fn take(self: &Arc<Self>, events: &Arc<Events>, msg: jetstream::Message) {
        let (seq, delivered) = match msg.info() {
            Ok(i) => (
                i.stream_sequence,
                u32::try_from(i.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::error!("an event without JetStream metadata: {e}");
                return;
            }
        };
        let (mut h, payload) = match decode(seq, &msg.payload) {
            Ok((h, p)) => (h, p.to_vec()),
            Err(e) => {
                // Nobody can run it: taken out of the stream, not retried forever.
                tracing::error!("{e}: removed from the stream");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let keepalive = {
            let msg = msg.clone();
            let every = Duration::from_secs_f64(self.config.ack_wait_s / 3.0);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!("telling NATS a try still runs: {e}");
                    }
                }
            })
        };
        let taken = Taken {
            msg,
            delivered,
            keepalive,
        };
        if delivered > 1 {
            let ready = match self.ready().await {
                Ok(r) => r,
                Err(e) => return self.nak_after(&taken, &h, &e.to_string()).await,
            };
            let state = match ready.state.get(h.request_id.clone()).await {
                Ok(s) => s.and_then(|b| serde_json::from_slice::<TryState>(&b).ok()),
                Err(e) => {
                    return self
                        .nak_after(&taken, &h, &format!("reading the retry state: {e}"))
                        .await;
                }
            };
            let seen = state.as_ref().map_or(0, |s| s.seen);
            if let Some(s) = state {
                h.history = s.history;
                h.invokes = s.invokes;
                h.next_ms = s.next_ms;
                h.last_error = s.last_error;
            }
            if delivered > seen + 1
                && let Target::Function(f) = &h.target
            {
                events
                    .router
                    .metrics
                    .events
                    .duplicates
                    .get_or_create(&Metrics::function(f))
                    .inc();
                tracing::info!(function = %f, request_id = %h.request_id, delivered, "an async event's try was taken by an agent that did not report: it runs again");
            }
            let now = now_ms();
            if h.next_ms > now + EARLY_MS {
                // Back before its time (a NAK that did not reach the servers): it waits.
                self.retry(taken, h, &payload).await;
                return;
            }
        }
        match h.target.clone() {
            Target::Function(name) => events.run_function(&**self, taken, h, &name, payload).await,
            Target::Url(url) => events.deliver(&**self, taken, h, &url, payload).await,
        }
    }

    /// A delivery that could not even be looked at: back after the minimum backoff.
    async fn nak_after(&self, t: &Taken, h: &Header, why: &str) {
        tracing::warn!(request_id = %h.request_id, "{why}");
        let _ = t
            .msg
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
    }
}

impl Backend for Nats {
    type Taken = Taken;

    /// Nothing to write: the delivery itself is the mark (see the module's doc).
    async fn starting(&self, _t: &Taken, _h: &Header, _payload: &[u8]) -> Result<(), QueueError> {
        Ok(())
    }

    async fn retry(&self, t: Taken, h: Header, _payload: &[u8]) {
        let state = TryState {
            history: h.history,
            invokes: h.invokes,
            next_ms: h.next_ms,
            last_error: h.last_error.clone(),
            seen: t.delivered,
        };
        let stored = match self.ready().await {
            Ok(r) => r
                .state
                .put(
                    &h.request_id,
                    Bytes::from(serde_json::to_vec(&state).expect("states serialize")),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            // Its next delivery starts from the counts its message carries.
            tracing::error!(request_id = %h.request_id, "storing an async event's retry state: {e}");
        }
        let wait = Duration::from_millis(h.next_ms.saturating_sub(now_ms()));
        if let Err(e) = t.msg.ack_with(AckKind::Nak(Some(wait))).await {
            // Given back after ack_wait instead; it waits then for what is left.
            tracing::warn!(request_id = %h.request_id, "scheduling an async event's retry: {e}");
        }
    }

    async fn end(&self, t: &Taken, h: &Header, records: Vec<NewEvent>) -> Result<(), QueueError> {
        let ids: Vec<String> = records.iter().map(|r| record_id(h, r)).collect();
        let publishes: Vec<_> = records
            .iter()
            .zip(&ids)
            .map(|(r, id)| self.publish(r, id))
            .collect();
        let mut acks = futures_util::stream::iter(publishes).buffered(PUBLISH_AT_ONCE);
        while let Some(ack) = acks.next().await {
            ack.map_err(|e| nats_error("storing a destination record", e))?;
        }
        drop(acks);
        t.msg
            .double_ack()
            .await
            .map_err(|e| nats_error("acking an event", e))?;
        if t.delivered > 1
            && let Ok(r) = self.ready().await
            && let Err(e) = r.state.delete(&h.request_id).await
        {
            tracing::debug!(request_id = %h.request_id, "removing a retry state (it expires): {e}");
        }
        Ok(())
    }

    fn done(&self, _t: Taken) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: Target, cloudevent: bool, request_id: &str) -> NewEvent {
        NewEvent {
            header: Header {
                request_id: request_id.into(),
                target,
                history: History::default(),
                invokes: 0,
                next_ms: 0,
                in_flight: false,
                last_error: None,
                origin: Some("f".into()),
                cloudevent,
            },
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_records_id_is_the_same_when_an_end_is_tried_again_and_differs_per_subscriber() {
        let ended = record(Target::Function("f".into()), false, "ended").header;
        // Each try of the end makes records with new request ids: the message id ignores them.
        let once = record(Target::Url("http://127.0.0.1/x".into()), false, "r1");
        let again = record(Target::Url("http://127.0.0.1/x".into()), false, "r2");
        assert_eq!(record_id(&ended, &once), record_id(&ended, &again));
        assert_eq!(record_id(&ended, &once), "ended-record");
        // A destination topic's copies: one id per subscriber.
        let a = record(Target::Function("a".into()), true, "r3");
        let b = record(Target::Function("b".into()), true, "r4");
        assert_ne!(record_id(&ended, &a), record_id(&ended, &b));
        assert_eq!(
            record_id(&ended, &a),
            record_id(&ended, &record(Target::Function("a".into()), true, "r5"))
        );
        // Another event's records never share them.
        let other = record(Target::Function("g".into()), false, "other").header;
        assert_ne!(record_id(&ended, &a), record_id(&other, &a));
    }
}
