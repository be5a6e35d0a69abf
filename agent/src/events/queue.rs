//! The local backend's storage: accepted events in `events.redb` in the state dir, written by
//! one committer thread. Writers hand it a batch of changes and wait for the commit that holds
//! it; the thread takes every batch that arrived during the previous commit into the next one,
//! so many concurrent accepts share one fsync (group commit).
//!
//! Two kinds of batches: durable ones (an accepted event, a config) wait for an fsync'd commit;
//! the workers' bookkeeping (a try marked in flight, a retry's schedule, an event's end and its
//! destination record) is committed without an fsync, and reaches the disk with the next
//! durable commit, or within [`LAZY_FLUSH`] when none comes. A crash loses at most that much
//! bookkeeping: the events concerned run again (at least once), and a try whose in-flight mark
//! was lost is not counted as a duplicate.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::policy::{History, InvokeConfig};

/// seq -> encoded [`Stored`] header and payload.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// function name -> JSON [`InvokeConfig`].
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("invoke_configs");
/// Events seen lately -> until when (ms since the epoch) a copy is a duplicate: topic events (a
/// hash of topic, source and id) and ids accepted once (a schedule's ticks).
const SEEN: TableDefinition<&[u8], u64> = TableDefinition::new("topic_events_seen");
/// schedule id -> the last tick (ms) whose event this host stored.
const TICKS: TableDefinition<&str, u64> = TableDefinition::new("schedule_ticks");

/// Batches taken into one commit at most.
const MAX_GROUP: usize = 8192;
/// Bookkeeping committed without an fsync is made durable within this.
pub const LAZY_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("opening the event queue {path}: {message}")]
    Open { path: String, message: String },
    #[error("the event queue's disk is full: {0}")]
    DiskFull(String),
    #[error("committing to the event queue: {0}")]
    Commit(String),
    #[error("reading the event queue: {0}")]
    Read(String),
    #[error("a stored event ({seq}) is corrupt: {message}")]
    Corrupt { seq: u64, message: String },
    #[error("the event queue's committer is gone")]
    Closed,
    /// The JetStream backend's servers refused, or could not be reached.
    #[error("NATS JetStream: {0}")]
    Nats(String),
    /// The client for URL destinations could not be made (a bad `destination_ca_file`).
    #[error(transparent)]
    Https(#[from] super::https::HttpsError),
}

/// What an event is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Run this function with the payload.
    Function(String),
    /// POST the payload (a destination record) to this URL.
    Url(String),
}

/// An event's header as stored: everything but its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub request_id: String,
    pub target: Target,
    pub history: History,
    /// Tries that reached the function (Lambda's approximateInvokeCount).
    pub invokes: u32,
    /// When the next try may start (ms since the epoch).
    pub next_ms: u64,
    /// A try had started and not ended when this was written: after a crash it runs again,
    /// and is counted as a duplicate.
    pub in_flight: bool,
    /// The last failure, for `fnlet events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// For a destination record: the function whose event it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The payload is a CloudEvent in structured JSON (a topic's event): an exec-mode function
    /// gets its data on stdin and its attributes in `CE_*` variables.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cloudevent: bool,
}

/// `[u32 LE header length][header JSON][payload]`.
pub fn encode(h: &Header, payload: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(h).expect("headers serialize");
    let mut v = Vec::with_capacity(4 + head.len() + payload.len());
    v.extend_from_slice(&(head.len() as u32).to_le_bytes());
    v.extend_from_slice(&head);
    v.extend_from_slice(payload);
    v
}

pub fn decode(seq: u64, v: &[u8]) -> Result<(Header, &[u8]), QueueError> {
    let corrupt = |message: String| QueueError::Corrupt { seq, message };
    let len: [u8; 4] = v
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("shorter than its length prefix".into()))?;
    let len = u32::from_le_bytes(len) as usize;
    let head = v
        .get(4..4 + len)
        .ok_or_else(|| corrupt("shorter than its header".into()))?;
    let h = serde_json::from_slice(head).map_err(|e| corrupt(e.to_string()))?;
    Ok((h, &v[4 + len..]))
}

/// One change to the queue.
pub enum Op {
    Put(u64, Vec<u8>),
    Remove(u64),
    PutConfig(String, InvokeConfig),
    RemoveConfig(String),
    /// An event seen (topic event or id accepted once), a duplicate until the time given.
    PutSeen([u8; 32], u64),
    RemoveSeen([u8; 32]),
    /// A schedule's last tick stored here (ms); only ever raised.
    PutTick(String, u64),
}

struct Batch {
    ops: Vec<Op>,
    /// Wait for an fsync'd commit.
    durable: bool,
    done: tokio::sync::oneshot::Sender<Result<(), QueueError>>,
}

/// What the committer reports about each commit.
pub trait CommitObserver: Send + 'static {
    fn committed(&self, batches: usize, took: std::time::Duration);
}

pub struct Queue {
    db: Arc<Database>,
    ops: Option<mpsc::Sender<Batch>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Queue {
    /// Closes the channel and waits for the committer to finish what it holds.
    fn drop(&mut self) {
        self.ops = None;
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

/// What a start finds in the queue.
pub struct Loaded {
    pub events: Vec<(u64, Header, u64)>,
    pub configs: Vec<(String, InvokeConfig)>,
    pub next_seq: u64,
    /// Events seen (topic events, ids accepted once) and until when.
    pub seen: Vec<([u8; 32], u64)>,
    /// Schedules' last ticks stored here.
    pub ticks: Vec<(String, u64)>,
}

fn err<E: std::fmt::Display>(e: E) -> QueueError {
    QueueError::Read(e.to_string())
}

fn commit_error(e: redb::Error) -> QueueError {
    let full = match &e {
        redb::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    } || e.to_string().contains("No space left");
    if full {
        QueueError::DiskFull(e.to_string())
    } else {
        QueueError::Commit(e.to_string())
    }
}

impl Queue {
    /// Opens (or creates) `<state_dir>/events.redb` and starts its committer thread.
    pub fn open(
        state_dir: &Path,
        observer: impl CommitObserver,
    ) -> Result<(Queue, Loaded), QueueError> {
        let path = state_dir.join("events.redb");
        let open_err = |e: &dyn std::fmt::Display| QueueError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| open_err(&e))?;
        let txn = db.begin_write().map_err(|e| open_err(&e))?;
        txn.open_table(EVENTS).map_err(|e| open_err(&e))?;
        txn.open_table(CONFIGS).map_err(|e| open_err(&e))?;
        txn.open_table(SEEN).map_err(|e| open_err(&e))?;
        txn.open_table(TICKS).map_err(|e| open_err(&e))?;
        txn.commit().map_err(|e| open_err(&e))?;
        let loaded = load(&db)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel::<Batch>();
        let committer = db.clone();
        let thread = std::thread::Builder::new()
            .name("fnlet-events-commit".into())
            .spawn(move || commit_loop(&committer, &rx, &observer))
            .map_err(|e| open_err(&e))?;
        Ok((
            Queue {
                db,
                ops: Some(tx),
                committer: Some(thread),
            },
            loaded,
        ))
    }

    /// Applies `ops` in one durable commit (shared with whatever else is waiting) and returns
    /// once it is on disk.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        self.send(ops, true).await
    }

    /// Applies `ops` in a commit without an fsync (see the module's doc): returns once they
    /// are in the database, on disk within [`LAZY_FLUSH`].
    pub async fn commit_lazy(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        self.send(ops, false).await
    }

    async fn send(&self, ops: Vec<Op>, durable: bool) -> Result<(), QueueError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.ops
            .as_ref()
            .ok_or(QueueError::Closed)?
            .send(Batch { ops, durable, done })
            .map_err(|_| QueueError::Closed)?;
        committed.await.map_err(|_| QueueError::Closed)?
    }

    /// The payload of event `seq`.
    pub fn payload(&self, seq: u64) -> Result<Option<Vec<u8>>, QueueError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(EVENTS).map_err(err)?;
        let Some(v) = t.get(seq).map_err(err)? else {
            return Ok(None);
        };
        let (_, payload) = decode(seq, v.value())?;
        Ok(Some(payload.to_vec()))
    }
}

fn load(db: &Database) -> Result<Loaded, QueueError> {
    let txn = db.begin_read().map_err(err)?;
    let t = txn.open_table(EVENTS).map_err(err)?;
    let mut events = Vec::new();
    let mut next_seq = 1;
    for row in t.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        let seq = k.value();
        next_seq = next_seq.max(seq + 1);
        match decode(seq, v.value()) {
            Ok((h, payload)) => events.push((seq, h, payload.len() as u64)),
            // One bad record must not stop the others: it is logged and left in place.
            Err(e) => tracing::error!("{e}"),
        }
    }
    let t = txn.open_table(CONFIGS).map_err(err)?;
    let mut configs = Vec::new();
    for row in t.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        match serde_json::from_slice(v.value()) {
            Ok(c) => configs.push((k.value().to_string(), c)),
            Err(e) => tracing::error!(function = k.value(), "corrupt event invoke config: {e}"),
        }
    }
    let t = txn.open_table(SEEN).map_err(err)?;
    let mut seen = Vec::new();
    for row in t.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        if let Ok(key) = <[u8; 32]>::try_from(k.value()) {
            seen.push((key, v.value()));
        }
    }
    let mut ticks = Vec::new();
    for row in txn.open_table(TICKS).map_err(err)?.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        ticks.push((k.value().to_string(), v.value()));
    }
    Ok(Loaded {
        events,
        configs,
        next_seq,
        seen,
        ticks,
    })
}

fn commit_loop(db: &Database, rx: &mpsc::Receiver<Batch>, observer: &impl CommitObserver) {
    // Whether a commit without an fsync is not on disk yet.
    let mut unsynced = false;
    loop {
        let first = match rx.recv_timeout(LAZY_FLUSH) {
            Ok(b) => b,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if unsynced {
                    match flush(db) {
                        Ok(()) => unsynced = false,
                        Err(e) => tracing::error!("event queue flush failed: {e}"),
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let durable = group.iter().any(|b| b.durable);
        let started = std::time::Instant::now();
        let result = apply(db, &group, durable).map_err(commit_error);
        match &result {
            Err(e) => {
                tracing::error!("event queue commit of {} batches failed: {e}", group.len())
            }
            Ok(()) => {
                // A durable commit makes the earlier ones durable too.
                unsynced = !durable;
                observer.committed(group.len(), started.elapsed());
            }
        }
        for b in group {
            let _ = b.done.send(result.clone());
        }
    }
    if unsynced && let Err(e) = flush(db) {
        tracing::error!("event queue flush at close failed: {e}");
    }
}

/// An empty durable commit: what earlier commits without an fsync wrote reaches the disk.
fn flush(db: &Database) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    txn.commit()?;
    Ok(())
}

fn apply(db: &Database, group: &[Batch], durable: bool) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    // Immediate: the commit returns once fsync'd. None: once applied; the next Immediate
    // commit makes it durable.
    txn.set_durability(if durable {
        redb::Durability::Immediate
    } else {
        redb::Durability::None
    })?;
    {
        let mut events = txn.open_table(EVENTS)?;
        let mut configs = txn.open_table(CONFIGS)?;
        let mut seen = txn.open_table(SEEN)?;
        let mut ticks = txn.open_table(TICKS)?;
        for op in group.iter().flat_map(|b| &b.ops) {
            match op {
                Op::Put(seq, v) => {
                    events.insert(seq, v.as_slice())?;
                }
                Op::Remove(seq) => {
                    events.remove(seq)?;
                }
                Op::PutConfig(name, c) => {
                    let v = serde_json::to_vec(c).expect("configs serialize");
                    configs.insert(name.as_str(), v.as_slice())?;
                }
                Op::RemoveConfig(name) => {
                    configs.remove(name.as_str())?;
                }
                Op::PutSeen(key, until) => {
                    seen.insert(key.as_slice(), until)?;
                }
                Op::RemoveSeen(key) => {
                    seen.remove(key.as_slice())?;
                }
                Op::PutTick(id, tick) => {
                    let stored = ticks.get(id.as_str())?.map(|v| v.value());
                    if stored.is_none_or(|s| s < *tick) {
                        ticks.insert(id.as_str(), tick)?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(Arc<std::sync::atomic::AtomicUsize>);
    impl CommitObserver for Counting {
        fn committed(&self, _batches: usize, _took: std::time::Duration) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn header(id: &str) -> Header {
        Header {
            request_id: id.into(),
            target: Target::Function("f".into()),
            history: History::default(),
            invokes: 0,
            next_ms: 0,
            in_flight: false,
            last_error: None,
            origin: None,
            cloudevent: false,
        }
    }

    #[test]
    fn encoding_round_trips_and_refuses_truncation() {
        let v = encode(&header("a"), b"payload");
        let (h, p) = decode(1, &v).unwrap();
        assert_eq!((h, p), (header("a"), &b"payload"[..]));
        assert!(decode(1, &v[..10]).is_err());
        assert!(decode(1, &[1]).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_fsyncs_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (q, loaded) = Queue::open(dir.path(), Counting(commits.clone())).unwrap();
        assert!(loaded.events.is_empty());
        let q = Arc::new(q);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                q.commit(vec![Op::Put(i, encode(&header(&i.to_string()), b"x"))])
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n = commits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n < 200, "200 concurrent puts took {n} commits");
        q.commit(vec![
            Op::Remove(0),
            Op::PutConfig("f".into(), InvokeConfig::default()),
            Op::PutSeen([1; 32], 77),
            Op::PutSeen([2; 32], 78),
        ])
        .await
        .unwrap();
        q.commit(vec![Op::RemoveSeen([2; 32])]).await.unwrap();
        assert_eq!(q.payload(5).unwrap().as_deref(), Some(&b"x"[..]));
        // Dropping the queue joins its committer; reopening sees every commit.
        drop(q);
        let (_q, loaded) = Queue::open(dir.path(), Counting(commits)).unwrap();
        assert_eq!(loaded.events.len(), 199);
        assert_eq!(loaded.next_seq, 200);
        assert_eq!(loaded.configs.len(), 1);
        assert_eq!(loaded.seen, vec![([1; 32], 77)]);
    }

    #[tokio::test]
    async fn schedule_ticks_survive_reopen_beside_seen_events_and_only_rise() {
        let dir = tempfile::tempdir().unwrap();
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (q, _) = Queue::open(dir.path(), Counting(commits.clone())).unwrap();
        q.commit(vec![
            Op::Put(1, encode(&header("tick-a"), b"one")),
            Op::PutSeen([7; 32], 5),
            Op::PutSeen([8; 32], 1),
            Op::PutTick("s".into(), 2_000),
        ])
        .await
        .unwrap();
        q.commit(vec![
            Op::PutTick("s".into(), 1_000),
            Op::RemoveSeen([8; 32]),
        ])
        .await
        .unwrap();
        drop(q);
        let (_q, loaded) = Queue::open(dir.path(), Counting(commits)).unwrap();
        assert_eq!(loaded.seen, vec![([7; 32], 5)]);
        assert_eq!(loaded.ticks, vec![("s".to_string(), 2_000)]);
        assert_eq!(loaded.events.len(), 1);
    }

    #[tokio::test]
    async fn bookkeeping_without_fsync_is_visible_at_once_and_durable_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (q, _) = Queue::open(dir.path(), Counting(commits.clone())).unwrap();
        q.commit(vec![Op::Put(1, encode(&header("a"), b"one"))])
            .await
            .unwrap();
        q.commit_lazy(vec![
            Op::Remove(1),
            Op::Put(2, encode(&header("b"), b"two")),
        ])
        .await
        .unwrap();
        assert_eq!(q.payload(1).unwrap(), None);
        assert_eq!(q.payload(2).unwrap().as_deref(), Some(&b"two"[..]));
        // Closing flushes what was committed without an fsync.
        drop(q);
        let (_q, loaded) = Queue::open(dir.path(), Counting(commits)).unwrap();
        let ids: Vec<String> = loaded
            .events
            .iter()
            .map(|e| e.1.request_id.clone())
            .collect();
        assert_eq!(ids, ["b"]);
    }
}
