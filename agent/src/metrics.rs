//! Prometheus metrics: per function and for the agent itself.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FnLabels {
    pub function: String,
}

/// A function's Lambda instances (or kept exec sandboxes) in one state: starting, idle or busy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub function: String,
    pub state: String,
}

/// A resource of the host's capacity: memory, cpu or instances.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

/// Why the HTTP listener refused or closed a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// What a log line not logged was (`limits.log_lines_per_s`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LineKindLabels {
    pub kind: String,
}

/// A forwarded call's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Cluster members in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// A cluster member, by node id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Load reports sent or received.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub function: String,
    pub kind: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn wait_histogram() -> Histogram {
    // 10 µs .. ~10 s
    Histogram::new(exponential_buckets(0.00001, 2.0, 21))
}

/// An async event outcome or destination delivery, per function.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub function: String,
    pub result: String,
}

/// Async events that ended without success, per function and condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub function: String,
    pub condition: String,
}

/// A topic (topics without subscribers are counted as `(unsubscribed)`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

/// A topic and how its events came (binary, structured, batch, plain, destination).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicModeLabels {
    pub topic: String,
    pub mode: String,
}

/// A topic and one of its subscribers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicFnLabels {
    pub topic: String,
    pub function: String,
}

/// Topics' metrics (triggers: the event bus).
pub struct TopicMetrics {
    pub publishes: Family<TopicModeLabels, Counter>,
    pub fanouts: Family<TopicFnLabels, Counter>,
    pub filtered: Family<TopicFnLabels, Counter>,
    pub duplicates: Family<TopicLabels, Counter>,
    /// Publishes refused, by reason (bad_event, unauthorized, bad_signature, full).
    pub refused: Family<ReasonLabels, Counter>,
}

impl TopicMetrics {
    fn register(registry: &mut Registry) -> TopicMetrics {
        let m = TopicMetrics {
            publishes: Family::default(),
            fanouts: Family::default(),
            filtered: Family::default(),
            duplicates: Family::default(),
            refused: Family::default(),
        };
        registry.register(
            "topic_publishes",
            "Events published to a topic, by how they came (binary, structured, batch, plain, \
             destination)",
            m.publishes.clone(),
        );
        registry.register(
            "topic_fanouts",
            "Async events made from topic events, per subscribed function",
            m.fanouts.clone(),
        );
        registry.register(
            "topic_filtered",
            "Topic events a subscriber's filters did not pass",
            m.filtered.clone(),
        );
        registry.register(
            "topic_duplicates",
            "Topic events dropped as duplicates (same source and id within events.dedup_window_s)",
            m.duplicates.clone(),
        );
        registry.register(
            "topic_refused",
            "Publishes refused, by reason (bad_event, unauthorized, bad_signature, full)",
            m.refused.clone(),
        );
        m
    }
}

/// The event queue's metrics (asynchronous invocation).
pub struct EventMetrics {
    pub depth: Family<FnLabels, Gauge>,
    pub oldest_age: Family<FnLabels, Gauge<f64, AtomicU64>>,
    pub accepted: Family<FnLabels, Counter>,
    pub attempts: Family<EventLabels, Counter>,
    pub deliveries: Family<EventLabels, Counter>,
    pub dropped: Family<ConditionLabels, Counter>,
    pub duplicates: Family<FnLabels, Counter>,
    pub commits: Counter,
    pub commit_batches: Histogram,
    pub commit_duration: Histogram,
}

/// Schedule triggers, per function: ticks fired (on time or caught up), missed, and how late.
pub struct ScheduleMetrics {
    pub fires: Family<FnLabels, Counter>,
    pub catch_ups: Family<FnLabels, Counter>,
    pub misses: Family<FnLabels, Counter>,
    pub deferred: Family<FnLabels, Counter>,
    pub duplicates: Family<FnLabels, Counter>,
    pub claims_refused: Family<FnLabels, Counter>,
    pub claims_unanswered: Family<FnLabels, Counter>,
    pub delay: Histogram,
}

impl ScheduleMetrics {
    fn register(registry: &mut Registry) -> ScheduleMetrics {
        let m = ScheduleMetrics {
            fires: Family::default(),
            catch_ups: Family::default(),
            misses: Family::default(),
            deferred: Family::default(),
            duplicates: Family::default(),
            claims_refused: Family::default(),
            claims_unanswered: Family::default(),
            delay: wait_histogram(),
        };
        registry.register(
            "schedule_fires",
            "Schedule ticks fired by this host (their events stored), catch-ups included",
            m.fires.clone(),
        );
        registry.register(
            "schedule_catch_ups",
            "Missed schedule ticks this host fired late, on taking a schedule over",
            m.catch_ups.clone(),
        );
        registry.register(
            "schedule_misses",
            "Schedule ticks no host fired, found by the host that took the schedule over \
                 (beyond schedules.catch_up_ticks)",
            m.misses.clone(),
        );
        registry.register(
            "schedule_handoff_waits",
            "Ticks this host waited for the previous owner's record before firing",
            m.deferred.clone(),
        );
        registry.register(
            "schedule_duplicates",
            "Schedule ticks whose event id had been stored here already (not stored again)",
            m.duplicates.clone(),
        );
        registry.register(
            "schedule_claims_refused",
            "Schedule ticks this host did not fire: its claim found them fired or granted to \
                 another host (here or on a host ranked above)",
            m.claims_refused.clone(),
        );
        registry.register(
            "schedule_claims_unanswered",
            "Claims of schedule ticks a host did not answer in time (schedules.claim_wait_s, 250 ms \
                 for a host seen down): the ticks were fired without its answer",
            m.claims_unanswered.clone(),
        );
        registry.register(
            "schedule_fire_delay_seconds",
            "Time from a schedule's tick (its jitter included) to its event being stored",
            m.delay.clone(),
        );
        m
    }
}

/// One function's per-call series ([`Metrics::for_function`]).
#[derive(Clone)]
pub struct FunctionMetrics {
    pub invocations: Counter,
    pub running: Gauge,
    pub queue_wait: Histogram,
    pub duration: Histogram,
    pub warm_starts: Counter,
    pub cold_starts: Counter,
    pub started_ahead: Counter,
}

pub struct Metrics {
    registry: Registry,
    pub events: EventMetrics,
    pub topics: TopicMetrics,
    pub schedules: ScheduleMetrics,
    pub invocations: Family<FnLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<FnLabels, Histogram, fn() -> Histogram>,
    pub cold_starts: Family<FnLabels, Counter>,
    pub warm_starts: Family<FnLabels, Counter>,
    pub started_ahead: Family<FnLabels, Counter>,
    pub init_duration: Family<FnLabels, Histogram, fn() -> Histogram>,
    pub queue_wait: Family<FnLabels, Histogram, fn() -> Histogram>,
    pub instances: Family<InstanceLabels, Gauge>,
    pub running: Family<FnLabels, Gauge>,
    /// Invocations whose caller hung up before the answer.
    pub abandoned: Family<FnLabels, Counter>,
    cluster_members: Family<StateLabels, Gauge>,
    handshake_failures: Family<ReasonLabels, Counter>,
    bad_frames: Counter,
    forwards: Family<ResultLabels, Counter>,
    /// Functions whose catalog version this host does not serve yet (a bundle being fetched, a
    /// change being applied, or one that failed).
    pub catalog_lag: Gauge,
    forward_duration: Histogram,
    swim_dropped: Counter,
    peer_load: Family<PeerLabels, Gauge>,
    own_load: Gauge,
    cert_expiry: Gauge,
    cert_renewals: Family<ResultLabels, Counter>,
    load_reports: Family<DirectionLabels, Counter>,
    pub connections_open: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    connection_timeouts: Family<ReasonLabels, Counter>,
    uptime: Gauge<f64, AtomicU64>,
    rss: Gauge,
    /// 1 while the spawn helper clones sandboxes, 0 when it is off or was lost.
    pub spawn_helper_up: Gauge,
    spawn_helper_restarts: Counter,
    spawn_helper_restarts_seen: AtomicU64,
    log_lines_not_logged: Family<LineKindLabels, Counter>,
    /// What the logs had counted at the last scrape: invocation lines, function lines.
    log_lines_not_logged_seen: [AtomicU64; 2],
    /// The host's capacity for instances and what live ones hold of it, by resource (memory
    /// in bytes, cpu in cpus, instances).
    capacity: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    committed: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    evictions: Counter,
    evictions_seen: AtomicU64,
    started: Instant,
    /// Functions' egress, from fnlet's nftables counters: bytes each way, connections opened,
    /// attempts denied.
    net_sent: Family<FnLabels, Counter>,
    net_received: Family<FnLabels, Counter>,
    net_connections: Family<FnLabels, Counter>,
    net_denied: Family<FnLabels, Counter>,
    /// Instances holding an address of the function network.
    pub net_addresses: Gauge,
    /// The nftables counters as last read: a function's counters start again from 0 when
    /// its chains are made again (removed and deployed again, egress off then on).
    net_seen: std::sync::Mutex<std::collections::HashMap<String, [u64; 4]>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fnlet");
        let invocations = Family::<FnLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<FnLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let cold_starts = Family::<FnLabels, Counter>::default();
        let warm_starts = Family::<FnLabels, Counter>::default();
        let started_ahead = Family::<FnLabels, Counter>::default();
        let init_duration = Family::<FnLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let queue_wait =
            Family::<FnLabels, Histogram, fn() -> Histogram>::new_with_constructor(wait_histogram);
        let instances = Family::<InstanceLabels, Gauge>::default();
        let running = Family::<FnLabels, Gauge>::default();
        let abandoned = Family::<FnLabels, Counter>::default();
        let cluster_members = Family::<StateLabels, Gauge>::default();
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        let bad_frames = Counter::default();
        let forwards = Family::<ResultLabels, Counter>::default();
        let catalog_lag = Gauge::default();
        registry.register(
            "cluster_catalog_lag",
            "Functions whose cluster catalog version this host does not serve yet",
            catalog_lag.clone(),
        );
        let forward_duration = duration_histogram();
        registry.register(
            "cluster_forwards",
            "Invocations forwarded to the host their function's ranking picked, by result (ok, \
             unreachable, retried_here, spilled, peer_lost, ...)",
            forwards.clone(),
        );
        registry.register(
            "cluster_forward_duration_seconds",
            "Forwarded invocations, from sending the call to the answer's head",
            forward_duration.clone(),
        );
        let events = EventMetrics {
            depth: Family::default(),
            oldest_age: Family::default(),
            accepted: Family::default(),
            attempts: Family::default(),
            deliveries: Family::default(),
            dropped: Family::default(),
            duplicates: Family::default(),
            commits: Counter::default(),
            commit_batches: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_duration: wait_histogram(),
        };
        registry.register(
            "events_queue_depth",
            "Async events stored per function (waiting, retrying or running)",
            events.depth.clone(),
        );
        registry.register(
            "events_oldest_age_seconds",
            "Age of the oldest stored async event per function",
            events.oldest_age.clone(),
        );
        registry.register(
            "events_accepted",
            "Async events accepted (202) per function",
            events.accepted.clone(),
        );
        registry.register(
            "events_attempts",
            "Tries of async events by result (success, function_error, throttled)",
            events.attempts.clone(),
        );
        registry.register(
            "events_destination_deliveries",
            "Destination records by result (function, url, url_failed)",
            events.deliveries.clone(),
        );
        registry.register(
            "events_dropped",
            "Async events that ended without success, by condition (RetriesExhausted, \
                 EventAgeExceeded, FunctionNotFound, DestinationFailed)",
            events.dropped.clone(),
        );
        registry.register(
            "events_duplicates",
            "Async events run again after an agent crash interrupted a try",
            events.duplicates.clone(),
        );
        registry.register(
            "events_commits",
            "Durable commits of the event queue",
            events.commits.clone(),
        );
        registry.register(
            "events_commit_batches",
            "Writers (accepts, acks) sharing each commit of the event queue",
            events.commit_batches.clone(),
        );
        registry.register(
            "events_commit_duration_seconds",
            "Time of each durable commit of the event queue (fsync included)",
            events.commit_duration.clone(),
        );
        let topics = TopicMetrics::register(&mut registry);
        let swim_dropped = Counter::default();
        registry.register(
            "cluster_members",
            "Other cluster members by state (alive, suspect, down)",
            cluster_members.clone(),
        );
        registry.register(
            "cluster_handshake_failures",
            "QUIC handshakes and joins refused, by reason (certificate, join_refused, timeout, other)",
            handshake_failures.clone(),
        );
        registry.register(
            "cluster_bad_frames",
            "Peer frames or SWIM packets refused as malformed or out of place",
            bad_frames.clone(),
        );
        registry.register(
            "cluster_swim_dropped",
            "SWIM packets dropped because the membership task was behind",
            swim_dropped.clone(),
        );
        let peer_load = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "cluster_peer_load",
            "Calls in flight on each other member, as it last reported them (LoadReport datagrams)",
            peer_load.clone(),
        );
        let own_load = Gauge::default();
        registry.register(
            "cluster_own_load",
            "Calls in flight on this host, as it last reported them to the other members",
            own_load.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "cluster_cert_expiry_unix_seconds",
            "When this node's cluster certificate expires (it is renewed past 2/3 of its lifetime)",
            cert_expiry.clone(),
        );
        let cert_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cluster_cert_renewals",
            "Renewals of this node's cluster certificate, by result (ok, failed)",
            cert_renewals.clone(),
        );
        let load_reports = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "cluster_load_reports",
            "LoadReport datagrams, by direction (sent: one per member it went to; received)",
            load_reports.clone(),
        );
        let connections_open = Gauge::default();
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        let connection_timeouts = Family::<ReasonLabels, Counter>::default();
        let net_sent = Family::<FnLabels, Counter>::default();
        let net_received = Family::<FnLabels, Counter>::default();
        let net_connections = Family::<FnLabels, Counter>::default();
        let net_denied = Family::<FnLabels, Counter>::default();
        let net_addresses = Gauge::default();
        registry.register(
            "network_sent_bytes",
            "Bytes functions' instances sent out through the function network, by function",
            net_sent.clone(),
        );
        registry.register(
            "network_received_bytes",
            "Bytes of replies functions' instances received, by function",
            net_received.clone(),
        );
        registry.register(
            "network_connections",
            "Outbound connections functions opened (allowed by their egress), by function",
            net_connections.clone(),
        );
        registry.register(
            "network_denied",
            "Outbound attempts refused (not in the function's egress, always denied, or over \
             its connection cap), by function",
            net_denied.clone(),
        );
        registry.register(
            "network_addresses_in_use",
            "Instances holding an address of the function network (alive or being released)",
            net_addresses.clone(),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        let rss = Gauge::default();
        let spawn_helper_up = Gauge::default();
        let spawn_helper_restarts = Counter::default();
        let log_lines_not_logged = Family::<LineKindLabels, Counter>::default();
        let capacity = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        let committed = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        let evictions = Counter::default();
        registry.register(
            "capacity",
            "The host's capacity for live instances ([capacity]), by resource: memory (bytes of \
             memory limits), cpu (cpus), instances",
            capacity.clone(),
        );
        registry.register(
            "committed",
            "What live instances hold of the host's capacity, by resource (memory: the sum of \
             their memory limits in bytes; cpu: of their cpus; instances: their count)",
            committed.clone(),
        );
        registry.register(
            "capacity_evictions",
            "Idle instances stopped to make room for an instance of another function",
            evictions.clone(),
        );
        registry.register(
            "invocations",
            "Invocations, by function",
            invocations.clone(),
        );
        registry.register(
            "invocation_errors",
            "Failed invocations, by function and kind",
            errors.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Invocation duration, by function",
            duration.clone(),
        );
        registry.register(
            "cold_starts",
            "Invocations that started a new instance",
            cold_starts.clone(),
        );
        registry.register(
            "warm_starts",
            "Lambda-mode invocations served by a warm instance",
            warm_starts.clone(),
        );
        registry.register(
            "started_ahead",
            "Exec-mode invocations whose process was started ahead and waited for them (start_ahead)",
            started_ahead.clone(),
        );
        registry.register(
            "init_duration_seconds",
            "Lambda-mode instance start until its runtime's first /next, by function",
            init_duration.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time an invocation waited for a concurrency slot, by function",
            queue_wait.clone(),
        );
        registry.register(
            "abandoned_invocations",
            "Invocations whose caller disconnected before the answer (a Lambda instance \
             finishes the invocation and stays warm; an exec sandbox is killed), by function",
            abandoned.clone(),
        );
        registry.register(
            "lambda_instances",
            "Lambda-mode instances (and exec functions' kept sandboxes, reuse_sandbox) by \
             function and state (starting, idle, busy)",
            instances.clone(),
        );
        registry.register(
            "running_instances",
            "Instances running now, by function",
            running.clone(),
        );
        registry.register(
            "connections_open",
            "HTTP connections open now",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "HTTP connections closed at accept, by reason (max_connections, per_ip)",
            connections_refused.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Requests and connections cut by a listener timeout, by reason (header, body, idle)",
            connection_timeouts.clone(),
        );
        registry.register(
            "agent_uptime_seconds",
            "Seconds since the agent started",
            uptime.clone(),
        );
        registry.register(
            "agent_resident_memory_bytes",
            "Resident memory of the agent",
            rss.clone(),
        );
        registry.register(
            "spawn_helper_up",
            "1 while sandboxes are cloned by the spawn helper (sandbox.spawn_helper), 0 when it is \
             off or was lost (the agent then clones them itself)",
            spawn_helper_up.clone(),
        );
        registry.register(
            "spawn_helper_restarts",
            "Lost spawn helpers replaced by a new one (the agent clones sandboxes itself between \
             the loss and the new helper's start)",
            spawn_helper_restarts.clone(),
        );
        registry.register(
            "log_lines_not_logged",
            "Lines that come with calls left out of the agent's log past limits.log_lines_per_s, \
             by kind (invocation: the agent's line per call; function: a function's output); the \
             function logs keep every line",
            log_lines_not_logged.clone(),
        );
        let schedules = ScheduleMetrics::register(&mut registry);
        Metrics {
            registry,
            events,
            topics,
            schedules,
            invocations,
            errors,
            duration,
            cold_starts,
            warm_starts,
            started_ahead,
            init_duration,
            queue_wait,
            instances,
            running,
            abandoned,
            cluster_members,
            handshake_failures,
            bad_frames,
            forwards,
            catalog_lag,
            forward_duration,
            swim_dropped,
            peer_load,
            own_load,
            cert_expiry,
            cert_renewals,
            load_reports,
            connections_open,
            connections_refused,
            connection_timeouts,
            uptime,
            rss,
            spawn_helper_up,
            spawn_helper_restarts,
            spawn_helper_restarts_seen: AtomicU64::new(0),
            log_lines_not_logged,
            log_lines_not_logged_seen: [AtomicU64::new(0), AtomicU64::new(0)],
            capacity,
            committed,
            evictions,
            evictions_seen: AtomicU64::new(0),
            net_sent,
            net_received,
            net_connections,
            net_denied,
            net_addresses,
            net_seen: Default::default(),
            started: Instant::now(),
        }
    }

    pub fn members(&self, state: &str, n: i64) {
        self.cluster_members
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .set(n);
    }

    pub fn handshake_failure(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn forward(&self, result: &str, took: Option<std::time::Duration>) {
        self.forwards
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
        if let Some(d) = took {
            self.forward_duration.observe(d.as_secs_f64());
        }
    }

    pub fn bad_frame(&self) {
        self.bad_frames.inc();
    }

    /// This node's certificate expires at `unix_s`.
    pub fn cert_expiry(&self, unix_s: i64) {
        self.cert_expiry.set(unix_s);
    }

    /// A renewal of this node's certificate ended: `ok` or `failed`.
    pub fn cert_renewal(&self, result: &str) {
        self.cert_renewals
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// A member's load report arrived.
    pub fn peer_load(&self, peer: &str, load: u32) {
        self.peer_load
            .get_or_create(&PeerLabels {
                peer: peer.to_string(),
            })
            .set(i64::from(load));
        self.load_reports
            .get_or_create(&DirectionLabels {
                direction: "received".into(),
            })
            .inc();
    }

    /// This host reported `load` to `peers` members.
    pub fn own_load(&self, load: u32, peers: u64) {
        self.own_load.set(i64::from(load));
        self.load_reports
            .get_or_create(&DirectionLabels {
                direction: "sent".into(),
            })
            .inc_by(peers);
    }

    pub fn swim_dropped(&self) {
        self.swim_dropped.inc();
    }

    /// The series every call of `name` touches, looked up once: a lookup per call builds the
    /// label, hashes it and takes the family's lock, five times a warm call. Families are
    /// never pruned, so handles kept for a function's life stay the ones /metrics shows.
    pub fn for_function(&self, name: &str) -> FunctionMetrics {
        let labels = Metrics::function(name);
        FunctionMetrics {
            invocations: self.invocations.get_or_create(&labels).clone(),
            running: self.running.get_or_create(&labels).clone(),
            queue_wait: self.queue_wait.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            warm_starts: self.warm_starts.get_or_create(&labels).clone(),
            cold_starts: self.cold_starts.get_or_create(&labels).clone(),
            started_ahead: self.started_ahead.get_or_create(&labels).clone(),
        }
    }

    pub fn function(name: &str) -> FnLabels {
        FnLabels {
            function: name.to_string(),
        }
    }

    pub fn error(&self, function: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                function: function.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// The counter of connections refused for `reason` (shown from the start, at 0).
    pub fn connections_refused(&self, reason: &str) -> Counter {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .clone()
    }

    /// The counter of listener timeouts of `reason` (shown from the start, at 0).
    pub fn connection_timeouts(&self, reason: &str) -> Counter {
        self.connection_timeouts
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .clone()
    }

    /// Adds what fnlet's nftables counters gained since they were last read. A counter
    /// below its last reading was made again (the function's chains were removed and made
    /// anew): all of it is new.
    pub fn set_network(&self, counters: &crate::network::nft::Counters) {
        let mut seen = self.net_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (function, values) in counters {
            let labels = Metrics::function(function);
            let last = seen.insert(function.clone(), *values).unwrap_or([0; 4]);
            for (i, family) in [
                &self.net_sent,
                &self.net_received,
                &self.net_connections,
                &self.net_denied,
            ]
            .into_iter()
            .enumerate()
            {
                let gained = values[i].checked_sub(last[i]).unwrap_or(values[i]);
                if gained > 0 {
                    family.get_or_create(&labels).inc_by(gained);
                }
            }
        }
        // Functions whose counters are gone start from 0 when they come back (an empty
        // reading may be a failed one: it forgets nothing).
        if !counters.is_empty() {
            seen.retain(|f, _| counters.contains_key(f));
        }
    }

    /// Sets the capacity gauges from the registry's figures (before a render).
    pub fn set_capacity(
        &self,
        capacity: crate::pool::capacity::Amounts,
        committed: crate::pool::capacity::Amounts,
        evictions: u64,
    ) {
        for (family, a) in [(&self.capacity, capacity), (&self.committed, committed)] {
            for (resource, v) in [
                ("memory", a.memory_bytes as f64),
                ("cpu", a.cpu_millis as f64 / 1000.0),
                ("instances", a.instances as f64),
            ] {
                family
                    .get_or_create(&ResourceLabels {
                        resource: resource.into(),
                    })
                    .set(v);
            }
        }
        let seen = self
            .evictions_seen
            .swap(evictions, std::sync::atomic::Ordering::Relaxed);
        self.evictions.inc_by(evictions.saturating_sub(seen));
    }

    /// The spawn helper: up or not, and how many lost ones were replaced so far.
    pub fn set_spawn_helper(&self, up: bool, restarts: u64) {
        self.spawn_helper_up.set(i64::from(up));
        let seen = self
            .spawn_helper_restarts_seen
            .swap(restarts, std::sync::atomic::Ordering::Relaxed);
        self.spawn_helper_restarts
            .inc_by(restarts.saturating_sub(seen));
    }

    /// The lines the logs' budget left out so far ([`crate::logs::LineBudget::not_logged`]).
    pub fn set_log_lines_not_logged(&self, not_logged: crate::logs::Skipped) {
        let totals = [not_logged.invocations, not_logged.function_lines];
        for ((kind, total), seen) in ["invocation", "function"]
            .into_iter()
            .zip(totals)
            .zip(&self.log_lines_not_logged_seen)
        {
            let before = seen.swap(total, std::sync::atomic::Ordering::Relaxed);
            self.log_lines_not_logged
                .get_or_create(&LineKindLabels { kind: kind.into() })
                .inc_by(total.saturating_sub(before));
        }
    }

    /// The text exposition, with the agent's own gauges refreshed.
    pub fn render(&self) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        self.rss.set(resident_bytes().unwrap_or(0) as i64);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// RSS from /proc/self/statm (pages).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_counters_made_again_count_from_zero() {
        let m = Metrics::new();
        let read = |f: &str, v: [u64; 4]| {
            m.set_network(&[(f.to_string(), v)].into_iter().collect());
        };
        let sent = || m.net_sent.get_or_create(&Metrics::function("f")).get();
        read("f", [100, 0, 1, 0]);
        read("f", [150, 0, 1, 0]);
        assert_eq!(sent(), 150);
        // Removed and made again: the counter starts from 0.
        read("f", [40, 0, 1, 0]);
        assert_eq!(sent(), 190);
        // Gone from a reading, then back.
        read("g", [1, 0, 0, 0]);
        read("f", [30, 0, 0, 0]);
        assert_eq!(sent(), 220);
        // A failed (empty) reading forgets nothing.
        m.set_network(&Default::default());
        read("f", [35, 0, 0, 0]);
        assert_eq!(sent(), 225);
    }

    #[test]
    fn renders_families() {
        let m = Metrics::new();
        m.invocations
            .get_or_create(&Metrics::function("hello"))
            .inc();
        m.error("hello", "timeout");
        m.duration
            .get_or_create(&Metrics::function("hello"))
            .observe(0.01);
        let text = m.render();
        assert!(
            text.contains("fnlet_invocations_total{function=\"hello\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fnlet_invocation_errors_total{function=\"hello\",kind=\"timeout\"} 1")
        );
        assert!(text.contains("fnlet_invocation_duration_seconds_bucket"));
        assert!(text.contains("fnlet_agent_resident_memory_bytes"));
    }

    #[test]
    fn listener_counters_are_shared_with_the_registry() {
        let m = Metrics::new();
        let refused = m.connections_refused("per_ip");
        m.connection_timeouts("header");
        refused.inc();
        refused.inc();
        m.connections_open.set(3);
        let text = m.render();
        assert!(
            text.contains("fnlet_connections_refused_total{reason=\"per_ip\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fnlet_connection_timeouts_total{reason=\"header\"} 0"),
            "{text}"
        );
        assert!(text.contains("fnlet_connections_open 3"), "{text}");
    }
}
