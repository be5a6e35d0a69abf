//! The replicated catalog: functions and access keys in a last-writer-wins map ordered by
//! (hybrid logical clock stamp, node id), with digests and deltas for anti-entropy.
//!
//! Every entry carries the [`Version`] of the write that made it: the writer's HLC [`Stamp`]
//! and node id. A received entry replaces the stored one only when its version is greater, so
//! applying the same deltas in any order, any number of times, leaves every replica with the
//! same map, and each key holds the greatest write made to it. A removal is a tombstone: an
//! entry with no value, ordered like any other write, kept so that an older write arriving
//! late cannot bring the key back.
//!
//! Schedule records ([`Key::Schedule`]) merge differently, by ([`ScheduleRecord::epoch`],
//! [`ScheduleRecord::removed`], [`ScheduleRecord::tick_ms`]) first, then the greater version:
//! within an epoch the later fired tick wins, so a fired-tick record never goes back whichever
//! write arrives last, and a removal (a record marked `removed`, the schedule's tombstone) wins
//! over every tick of its epoch; a schedule fired again after its removal (the same trigger
//! deployed again) starts the next epoch. A digest answer sends a schedule entry whenever the
//! peer's version differs, since an older version may hold the later tick.
//!
//! Sync: a replica sends its [`Digest`] (key → version); the peer answers with
//! [`Catalog::diff`], the entries the digest lacks or has older. Both fit in frames by
//! [`Digest::chunks`] and [`Delta::chunks`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Sha256Hash;
use crate::hlc::{Clock, ClockError, NTP64, Stamp, hlc_id};

/// Longest function name, access key id or node id, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Largest entry, as JSON, a local write may make: a quarter of a frame's meta, so that any
/// entry fits a [`Delta`] chunk.
pub const MAX_ENTRY_JSON: usize = 16 * 1024;

/// What a catalog entry is about. Ordered by kind (functions first), then by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// A function, by name.
    Function(String),
    /// An access key for the Invoke API, by access key id.
    AccessKey(String),
    /// The last fired tick of a schedule, by schedule id.
    Schedule(String),
}

impl Key {
    /// `function` or `access_key`.
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Function(_) => "function",
            Key::AccessKey(_) => "access_key",
            Key::Schedule(_) => "schedule",
        }
    }

    /// The function name or access key id.
    pub fn name(&self) -> &str {
        match self {
            Key::Function(n) | Key::AccessKey(n) | Key::Schedule(n) => n,
        }
    }
}

/// Text form: `function:NAME`, `access_key:ID` or `schedule:ID` (what digests and deltas
/// carry).
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind(), self.name())
    }
}

/// A catalog key in text was not `function:NAME` or `access_key:ID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    /// No `function:` or `access_key:` prefix.
    #[error("a catalog key is function:NAME or access_key:ID, not {0:?}")]
    Kind(String),
    /// The name after the prefix is not valid.
    #[error("catalog key {key:?}: {reason}")]
    Name {
        /// The key as given.
        key: String,
        /// What is wrong with its name.
        reason: &'static str,
    },
}

impl FromStr for Key {
    type Err = BadKey;

    fn from_str(s: &str) -> Result<Self, BadKey> {
        let key = if let Some(n) = s.strip_prefix("function:") {
            Key::Function(n.to_owned())
        } else if let Some(n) = s.strip_prefix("access_key:") {
            Key::AccessKey(n.to_owned())
        } else if let Some(n) = s.strip_prefix("schedule:") {
            Key::Schedule(n.to_owned())
        } else {
            return Err(BadKey::Kind(s.chars().take(80).collect()));
        };
        check_name(key.name()).map_err(|reason| BadKey::Name {
            key: s.chars().take(80).collect(),
            reason,
        })?;
        Ok(key)
    }
}

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Names (function names, access key ids, node ids): 1 to [`MAX_NAME_LEN`] bytes, no control
/// characters.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("the name is longer than 256 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("the name contains a control character");
    }
    Ok(())
}

/// Which write made an entry: its stamp and its writer. Writes are ordered by stamp, then by
/// node id (the stamp's id is derived from the node id, so the second only matters for a
/// 128-bit hash collision).
///
/// JSON: `["<ntp64>/<hlc id hex>", "<node id>"]`, the stamp in uhlc's text form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// The writer's HLC stamp.
    pub stamp: Stamp,
    /// The writer's node id.
    pub node: String,
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.stamp.to_string(), &self.node).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (stamp, node) = <(String, String)>::deserialize(d)?;
        let stamp = stamp
            .parse::<Stamp>()
            .map_err(|e| serde::de::Error::custom(format!("bad stamp {stamp:?}: {e}")))?;
        Ok(Version { stamp, node })
    }
}

/// A deployed function: its active version and where its bundle comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    /// The active version number.
    pub version: u64,
    /// The function's manifest, as the agent's manifest type serializes it.
    pub manifest: serde_json::Value,
    /// SHA-256 of the bundle archive: fetched by this hash from a peer, verified before use.
    pub bundle_sha256: Sha256Hash,
    /// The bundle's size in bytes.
    pub size: u64,
    /// The node the deploy was made on.
    pub deployed_by: String,
    /// When it was deployed, Unix milliseconds (for display; ordering uses the stamp).
    pub deployed_at_ms: u64,
}

/// An access key for the Invoke API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyRecord {
    /// The secret, sealed by the agent with the cluster's sealing key (base64 in JSON; the
    /// format is in FRAMES.md). This crate never opens it.
    #[serde(with = "base64_bytes")]
    pub sealed_secret: Vec<u8>,
    /// The operator's description.
    pub description: String,
    /// When it was made, Unix milliseconds.
    pub created_ms: u64,
    /// What it may sign ("invoke", "deploy"; absent: "admin"). A host that does not know the
    /// field refuses the record: the key works nowhere it would be let do more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The function name patterns it is limited to (absent: every function).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A schedule's last fired tick: written by the host that fired it, before the tick's event
/// is enqueued (or by the host that granted it the tick), or the schedule's removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRecord {
    /// The tick, Unix milliseconds.
    pub tick_ms: u64,
    /// The node that fired it.
    pub fired_by: String,
    /// When it was fired, Unix milliseconds (for display).
    pub fired_at_ms: u64,
    /// How many times the schedule was removed before this record (0 until its first
    /// removal; absent in JSON when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The schedule was removed (its function, or its trigger): a tombstone that keeps the
    /// epoch. `tick_ms` and `fired_by` are the last fired tick's (absent in JSON when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ScheduleRecord {
    /// The merge order of schedule records, before the version.
    fn rank(&self) -> (u64, bool, u64) {
        (self.epoch, self.removed, self.tick_ms)
    }
}

/// An entry's value; its variant always matches its key's kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// For a [`Key::Function`].
    Function(FunctionRecord),
    /// For a [`Key::AccessKey`].
    AccessKey(AccessKeyRecord),
    /// For a [`Key::Schedule`].
    Schedule(ScheduleRecord),
}

impl Value {
    /// A schedule record's merge order (epoch, removed, tick) for [`Key::Schedule`] entries.
    fn schedule_rank(&self) -> Option<(u64, bool, u64)> {
        match self {
            Value::Schedule(s) => Some(s.rank()),
            _ => None,
        }
    }
}

/// Whether an entry (`version`, `value`) replaces a stored one: a greater version, except for
/// schedule records, where the later (epoch, removal, tick) wins first.
fn supersedes(
    version: &Version,
    value: Option<&Value>,
    stored_version: &Version,
    stored_value: Option<&Value>,
) -> bool {
    let rank = |v: Option<&Value>| v.and_then(Value::schedule_rank);
    (rank(value), version) > (rank(stored_value), stored_version)
}

/// One catalog entry: a key, the version of the write that made it, and its value (`None`: a
/// tombstone, the key was removed).
///
/// JSON: `{"key":"function:hello","version":[stamp,node],"value":{...}}`, `value` being a
/// [`FunctionRecord`] or an [`AccessKeyRecord`] as the key says, or `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// What it is about.
    pub key: Key,
    /// The write that made it.
    pub version: Version,
    /// The value, or `None` for a removal.
    pub value: Option<Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson<V> {
    key: Key,
    version: Version,
    value: Option<V>,
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum V<'a> {
            F(&'a FunctionRecord),
            K(&'a AccessKeyRecord),
            S(&'a ScheduleRecord),
        }
        EntryJson {
            key: self.key.clone(),
            version: self.version.clone(),
            value: self.value.as_ref().map(|v| match v {
                Value::Function(f) => V::F(f),
                Value::AccessKey(k) => V::K(k),
                Value::Schedule(r) => V::S(r),
            }),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = EntryJson::<serde_json::Value>::deserialize(d)?;
        let value = match (&raw.key, raw.value) {
            (_, None) => None,
            (Key::Function(_), Some(v)) => Some(Value::Function(
                FunctionRecord::deserialize(v).map_err(D::Error::custom)?,
            )),
            (Key::AccessKey(_), Some(v)) => Some(Value::AccessKey(
                AccessKeyRecord::deserialize(v).map_err(D::Error::custom)?,
            )),
            (Key::Schedule(_), Some(v)) => Some(Value::Schedule(
                ScheduleRecord::deserialize(v).map_err(D::Error::custom)?,
            )),
        };
        Ok(Entry {
            key: raw.key,
            version: raw.version,
            value,
        })
    }
}

/// What a replica holds, key by key, within a key range: enough for a peer to work out what
/// to send it.
///
/// JSON: `{"from":null,"to":null,"versions":{"function:hello":[stamp,node],...}}`; `from`
/// (inclusive) and `to` (exclusive) bound the keys it speaks for, `null` meaning no bound.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    /// First key this digest speaks for (inclusive); `None`: from the first key.
    #[serde(default)]
    pub from: Option<Key>,
    /// Key this digest stops before (exclusive); `None`: to the last key.
    #[serde(default)]
    pub to: Option<Key>,
    /// Every key in range the replica holds (tombstones included), with its version.
    pub versions: BTreeMap<Key, Version>,
}

impl Digest {
    /// Whether `key` is in this digest's range.
    pub fn covers(&self, key: &Key) -> bool {
        self.from.as_ref().is_none_or(|f| key >= f) && self.to.as_ref().is_none_or(|t| key < t)
    }

    /// Splits into digests over consecutive key ranges, each at most `max_json` bytes as JSON
    /// (pass [`crate::frame::MAX_META_LEN`] to fit frames). Together they cover this digest's
    /// range and hold the same versions.
    pub fn chunks(&self, max_json: usize) -> Result<Vec<Digest>, CatalogError> {
        // {"from":F,"to":T,"versions":{}} is 29 bytes besides F and T; reserve room for the
        // longest key (or `null`) in both.
        let longest = (self.versions.keys())
            .chain(&self.from)
            .chain(&self.to)
            .map(json_len)
            .fold(4, usize::max);
        let reserve = 29 + 2 * longest;
        let mut out = Vec::new();
        let mut from = self.from.clone();
        let mut versions = BTreeMap::new();
        let mut size = 0;
        for (k, v) in &self.versions {
            // "key":version plus a comma.
            let item = json_len(k) + json_len(v) + 2;
            if reserve + item > max_json {
                return Err(CatalogError::EntryTooLarge {
                    key: k.clone(),
                    size: item,
                    limit: max_json,
                });
            }
            if !versions.is_empty() && reserve + size + item > max_json {
                out.push(Digest {
                    from: from.take(),
                    to: Some(k.clone()),
                    versions: std::mem::take(&mut versions),
                });
                from = Some(k.clone());
                size = 0;
            }
            size += item;
            versions.insert(k.clone(), v.clone());
        }
        out.push(Digest {
            from,
            to: self.to.clone(),
            versions,
        });
        Ok(out)
    }
}

/// Entries to apply: the answer to a digest, or a write to spread.
///
/// JSON: `{"entries":[entry,...]}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// The entries, each as [`Entry`] shows.
    pub entries: Vec<Entry>,
}

impl Delta {
    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Splits into deltas of at most `max_json` bytes as JSON each (pass
    /// [`crate::frame::MAX_META_LEN`] to fit frames). An entry too large on its own is an error.
    pub fn chunks(self, max_json: usize) -> Result<Vec<Delta>, CatalogError> {
        const ENVELOPE: usize = r#"{"entries":[]}"#.len();
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut size = 0;
        for e in self.entries {
            // The entry plus a comma.
            let item = json_len(&e) + 1;
            if ENVELOPE + item > max_json {
                return Err(CatalogError::EntryTooLarge {
                    key: e.key,
                    size: item - 1,
                    limit: max_json,
                });
            }
            if !cur.is_empty() && ENVELOPE + size + item > max_json {
                out.push(Delta {
                    entries: std::mem::take(&mut cur),
                });
                size = 0;
            }
            size += item;
            cur.push(e);
        }
        if !cur.is_empty() || out.is_empty() {
            out.push(Delta { entries: cur });
        }
        Ok(out)
    }
}

/// Length of a value as JSON. Catalog types always serialize (string keys; a manifest's
/// numbers are whatever serde_json::Value holds); a failure counts as too large.
fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 4, |v| v.len())
}

/// A change [`Catalog::apply`] made to what a key holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The key that changed.
    pub key: Key,
    /// What it holds now; `None`: it was removed.
    pub value: Option<Value>,
}

/// A catalog write or a received entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A received entry's stamp is too far ahead of this host's clock. Nothing of the delta
    /// was applied; it applies once this host's clock has caught up (the next sync).
    #[error("{key}: the entry written by {node} is refused")]
    Clock {
        /// The entry's key.
        key: Key,
        /// The entry's writer.
        node: String,
        /// The clock's refusal.
        #[source]
        source: ClockError,
    },
    /// A received entry is malformed. Nothing of the delta was applied.
    #[error("{key}: bad entry: {reason}")]
    BadEntry {
        /// The entry's key.
        key: Key,
        /// What is wrong.
        reason: &'static str,
    },
    /// A name given to a local write is not valid.
    #[error("{kind} name {name:?}: {reason}")]
    BadName {
        /// `function`, `access_key` or `node`.
        kind: &'static str,
        /// The name (cut to 80 characters).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An entry is larger than allowed (a local write over [`MAX_ENTRY_JSON`], or a chunk
    /// limit smaller than one entry).
    #[error("{key}: the entry is {size} bytes as JSON, over the limit of {limit}")]
    EntryTooLarge {
        /// The entry's key.
        key: Key,
        /// Its size as JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    version: Version,
    value: Option<Value>,
    /// This host's clock when the entry last changed here (for [`Catalog::delta_since`]).
    changed: Stamp,
}

/// One replica of the catalog, owned by one node.
#[derive(Debug, Clone)]
pub struct Catalog {
    node: String,
    clock: Clock,
    entries: BTreeMap<Key, Stored>,
}

impl Catalog {
    /// An empty catalog for `node_id`.
    pub fn new(node_id: &str) -> Result<Self, CatalogError> {
        check_name(node_id).map_err(|reason| CatalogError::BadName {
            kind: "node",
            name: node_id.chars().take(80).collect(),
            reason,
        })?;
        Ok(Catalog {
            node: node_id.to_owned(),
            clock: Clock::new(node_id),
            entries: BTreeMap::new(),
        })
    }

    /// A catalog for `node_id` holding `entries` (read back from the agent's store). The clock
    /// moves past every stamp, so later writes here win over all of them. A cursor from
    /// [`Catalog::delta_since`] does not carry over: start again from `None`.
    pub fn from_entries(
        node_id: &str,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Self, CatalogError> {
        let mut c = Catalog::new(node_id)?;
        for e in entries {
            validate(&e)?;
            c.clock.restore(&e.version.stamp);
            let newer = c.entries.get(&e.key).is_none_or(|s| {
                supersedes(&e.version, e.value.as_ref(), &s.version, s.value.as_ref())
            });
            if newer {
                c.entries.insert(
                    e.key,
                    Stored {
                        changed: e.version.stamp,
                        version: e.version,
                        value: e.value,
                    },
                );
            }
        }
        Ok(c)
    }

    /// The node this replica belongs to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This replica's clock (its last stamp, its id).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The active record of a function, if it is deployed.
    pub fn function(&self, name: &str) -> Option<&FunctionRecord> {
        match self.get(&Key::Function(name.to_owned()))? {
            Value::Function(f) => Some(f),
            _ => None,
        }
    }

    /// Deployed functions, by name.
    pub fn functions(&self) -> impl Iterator<Item = (&str, &FunctionRecord)> {
        self.entries
            .iter()
            .filter_map(|(k, s)| match (k, &s.value) {
                (Key::Function(n), Some(Value::Function(f))) => Some((n.as_str(), f)),
                _ => None,
            })
    }

    /// An access key's record, if it exists.
    pub fn access_key(&self, id: &str) -> Option<&AccessKeyRecord> {
        match self.get(&Key::AccessKey(id.to_owned()))? {
            Value::AccessKey(k) => Some(k),
            _ => None,
        }
    }

    /// A schedule's last fired tick, if one was recorded (and the schedule was not removed
    /// since).
    pub fn schedule(&self, id: &str) -> Option<&ScheduleRecord> {
        self.schedule_entry(id).filter(|r| !r.removed)
    }

    /// A schedule's record, its removal included.
    pub fn schedule_entry(&self, id: &str) -> Option<&ScheduleRecord> {
        match self.get(&Key::Schedule(id.to_owned()))? {
            Value::Schedule(s) => Some(s),
            _ => None,
        }
    }

    /// Schedules with a live (not removed) record, by id.
    pub fn schedules(&self) -> impl Iterator<Item = (&str, &ScheduleRecord)> {
        self.entries
            .iter()
            .filter_map(|(k, s)| match (k, &s.value) {
                (Key::Schedule(n), Some(Value::Schedule(r))) if !r.removed => Some((n.as_str(), r)),
                _ => None,
            })
    }

    /// Records that a schedule fired up to `record.tick_ms`, its ticks from `from_ms` on,
    /// unless a tick at or after `from_ms` is recorded already (then `None`: that tick was
    /// fired, here or elsewhere, or granted to another host). The check and the write are one
    /// step: of two calls for the same tick, one writes. After a removal, the record starts
    /// the next epoch. Returns the delta to send to the peers.
    pub fn fire_schedule(
        &mut self,
        id: &str,
        from_ms: u64,
        mut record: ScheduleRecord,
        now: NTP64,
    ) -> Result<Option<Delta>, CatalogError> {
        let stored = self.schedule_entry(id);
        if stored.is_some_and(|r| !r.removed && r.tick_ms >= from_ms) {
            return Ok(None);
        }
        record.removed = false;
        record.epoch = stored.map_or(0, |r| r.epoch + u64::from(r.removed));
        self.write(
            Key::Schedule(id.to_owned()),
            Some(Value::Schedule(record)),
            now,
        )
        .map(Some)
    }

    /// Writes `record` (of the stored epoch) over the stored one if it ranks as high: a host
    /// that reserved a tick and learnt that another host fired it records who did. `None`:
    /// nothing written.
    pub fn note_schedule(
        &mut self,
        id: &str,
        record: ScheduleRecord,
        now: NTP64,
    ) -> Result<Option<Delta>, CatalogError> {
        if self
            .schedule_entry(id)
            .is_some_and(|r| r.rank() > record.rank() || *r == record)
        {
            return Ok(None);
        }
        self.write(
            Key::Schedule(id.to_owned()),
            Some(Value::Schedule(record)),
            now,
        )
        .map(Some)
    }

    /// Removes a schedule (its function or its trigger went): a tombstone that outranks every
    /// tick of the schedule's epoch. `None` when it has no live record (nothing to remove).
    pub fn remove_schedule(&mut self, id: &str, now: NTP64) -> Result<Option<Delta>, CatalogError> {
        let Some(stored) = self.schedule(id) else {
            return Ok(None);
        };
        let tombstone = ScheduleRecord {
            removed: true,
            ..stored.clone()
        };
        self.write(
            Key::Schedule(id.to_owned()),
            Some(Value::Schedule(tombstone)),
            now,
        )
        .map(Some)
    }

    /// Access keys, by id.
    pub fn access_keys(&self) -> impl Iterator<Item = (&str, &AccessKeyRecord)> {
        self.entries
            .iter()
            .filter_map(|(k, s)| match (k, &s.value) {
                (Key::AccessKey(n), Some(Value::AccessKey(a))) => Some((n.as_str(), a)),
                _ => None,
            })
    }

    /// What a key holds (`None`: never written, or removed).
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.entries.get(key)?.value.as_ref()
    }

    /// A key's entry, tombstones included.
    pub fn entry(&self, key: &Key) -> Option<Entry> {
        self.entries.get(key).map(|s| Entry {
            key: key.clone(),
            version: s.version.clone(),
            value: s.value.clone(),
        })
    }

    /// The version of a key's entry, tombstones included.
    pub fn version(&self, key: &Key) -> Option<&Version> {
        self.entries.get(key).map(|s| &s.version)
    }

    /// Every entry, tombstones included, in key order (for the agent's store).
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.entries.iter().map(|(k, s)| Entry {
            key: k.clone(),
            version: s.version.clone(),
            value: s.value.clone(),
        })
    }

    /// Deploys (or re-deploys) a function. Returns the delta to send to the peers.
    pub fn put_function(
        &mut self,
        name: &str,
        record: FunctionRecord,
        now: NTP64,
    ) -> Result<Delta, CatalogError> {
        self.write(
            Key::Function(name.to_owned()),
            Some(Value::Function(record)),
            now,
        )
    }

    /// Removes a function (writes a tombstone). Returns the delta to send to the peers.
    pub fn remove_function(&mut self, name: &str, now: NTP64) -> Result<Delta, CatalogError> {
        self.write(Key::Function(name.to_owned()), None, now)
    }

    /// Adds or replaces an access key. Returns the delta to send to the peers.
    pub fn put_access_key(
        &mut self,
        id: &str,
        record: AccessKeyRecord,
        now: NTP64,
    ) -> Result<Delta, CatalogError> {
        self.write(
            Key::AccessKey(id.to_owned()),
            Some(Value::AccessKey(record)),
            now,
        )
    }

    /// Removes an access key (writes a tombstone). Returns the delta to send to the peers.
    pub fn remove_access_key(&mut self, id: &str, now: NTP64) -> Result<Delta, CatalogError> {
        self.write(Key::AccessKey(id.to_owned()), None, now)
    }

    fn write(&mut self, key: Key, value: Option<Value>, now: NTP64) -> Result<Delta, CatalogError> {
        check_name(key.name()).map_err(|reason| CatalogError::BadName {
            kind: key.kind(),
            name: key.name().chars().take(80).collect(),
            reason,
        })?;
        let stamp = self.clock.tick(now);
        let entry = Entry {
            key,
            version: Version {
                stamp,
                node: self.node.clone(),
            },
            value,
        };
        let size = json_len(&entry);
        if size > MAX_ENTRY_JSON {
            return Err(CatalogError::EntryTooLarge {
                key: entry.key,
                size,
                limit: MAX_ENTRY_JSON,
            });
        }
        // The clock has seen every stored stamp, so this write is the newest.
        self.entries.insert(
            entry.key.clone(),
            Stored {
                version: entry.version.clone(),
                value: entry.value.clone(),
                changed: stamp,
            },
        );
        Ok(Delta {
            entries: vec![entry],
        })
    }

    /// Applies received entries: each replaces the stored one if its version is greater; an
    /// equal or older one changes nothing. Returns the changes to what keys hold, in the
    /// delta's order (a tombstone replacing a tombstone is not one).
    ///
    /// The clock takes in every stamp. All or nothing: if any entry is malformed or stamped
    /// too far ahead of `now`, nothing is applied.
    pub fn apply(&mut self, delta: &Delta, now: NTP64) -> Result<Vec<Change>, CatalogError> {
        for e in &delta.entries {
            validate(e)?;
            self.clock
                .check(&e.version.stamp, now)
                .map_err(|source| CatalogError::Clock {
                    key: e.key.clone(),
                    node: e.version.node.clone(),
                    source,
                })?;
        }
        let mut changes = Vec::new();
        let mut changed_at = None;
        for e in &delta.entries {
            self.clock
                .observe(&e.version.stamp, now)
                .map_err(|source| CatalogError::Clock {
                    key: e.key.clone(),
                    node: e.version.node.clone(),
                    source,
                })?;
            let stored = self.entries.get(&e.key);
            if stored.is_some_and(|s| {
                !supersedes(&e.version, e.value.as_ref(), &s.version, s.value.as_ref())
            }) {
                continue;
            }
            let visible = stored.and_then(|s| s.value.as_ref()) != e.value.as_ref();
            let changed = *changed_at.get_or_insert_with(|| self.clock.tick(now));
            self.entries.insert(
                e.key.clone(),
                Stored {
                    version: e.version.clone(),
                    value: e.value.clone(),
                    changed,
                },
            );
            if visible {
                changes.push(Change {
                    key: e.key.clone(),
                    value: e.value.clone(),
                });
            }
        }
        Ok(changes)
    }

    /// This replica's digest over all keys. Split it with [`Digest::chunks`] to send it.
    pub fn digest(&self) -> Digest {
        Digest {
            from: None,
            to: None,
            versions: self
                .entries
                .iter()
                .map(|(k, s)| (k.clone(), s.version.clone()))
                .collect(),
        }
    }

    /// The entries a peer with `remote`'s digest lacks or holds older, within the digest's
    /// range: the answer to a digest.
    pub fn diff(&self, remote: &Digest) -> Delta {
        let in_range = self.entries.iter().filter(|(k, _)| remote.covers(k));
        Delta {
            entries: in_range
                .filter(|(k, s)| {
                    remote.versions.get(*k).is_none_or(|v| match k {
                        // The peer's version may be newer and still hold an earlier tick.
                        Key::Schedule(_) => *v != s.version,
                        _ => *v < s.version,
                    })
                })
                .map(|(k, s)| Entry {
                    key: k.clone(),
                    version: s.version.clone(),
                    value: s.value.clone(),
                })
                .collect(),
        }
    }

    /// Entries that changed on this replica (written here or applied) after `cursor`, and the
    /// cursor to pass next time (`None` on the first call: everything). For gossip: unlike a
    /// cut by write stamp, this includes entries that arrived late with old stamps (a
    /// partition healing). Cursors are this replica's own and do not survive a restart.
    pub fn delta_since(&self, cursor: Option<Stamp>) -> (Delta, Option<Stamp>) {
        let mut next = cursor;
        let entries = self
            .entries
            .iter()
            .filter(|(_, s)| cursor.is_none_or(|c| s.changed > c))
            .map(|(k, s)| {
                next = next.max(Some(s.changed));
                Entry {
                    key: k.clone(),
                    version: s.version.clone(),
                    value: s.value.clone(),
                }
            })
            .collect();
        (Delta { entries }, next)
    }
}

/// Checks a received (or stored) entry: names, the value matching the key, and the stamp's id
/// being the writer's (a peer cannot pass off a write as another node's with its own stamp).
fn validate(e: &Entry) -> Result<(), CatalogError> {
    let bad = |reason| CatalogError::BadEntry {
        key: e.key.clone(),
        reason,
    };
    check_name(e.key.name()).map_err(bad)?;
    check_name(&e.version.node).map_err(|_| bad("the writer's node id is not valid"))?;
    match (&e.key, &e.value) {
        (Key::Schedule(_), None) => {
            return Err(bad(
                "schedule records are removed with a record marked removed",
            ));
        }
        (Key::Schedule(_), Some(Value::Schedule(r))) => {
            check_name(&r.fired_by).map_err(|_| bad("the firing node id is not valid"))?;
        }
        (_, None) | (Key::Function(_), Some(Value::Function(_))) => {}
        (Key::AccessKey(_), Some(Value::AccessKey(_))) => {}
        _ => return Err(bad("the value does not match the key's kind")),
    }
    if *e.version.stamp.get_id() != hlc_id(&e.version.node) {
        return Err(bad("the stamp's id is not the writer's"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::hlc::ntp64;

    fn ms(n: u64) -> NTP64 {
        ntp64(Duration::from_millis(n))
    }

    fn func(version: u64, by: &str) -> FunctionRecord {
        FunctionRecord {
            version,
            manifest: serde_json::json!({"name": "hello", "mode": "exec", "entrypoint": ["./run"]}),
            bundle_sha256: Sha256Hash::of(format!("bundle {version} {by}").as_bytes()),
            size: 1000 + version,
            deployed_by: by.to_owned(),
            deployed_at_ms: 1_700_000_000_000,
        }
    }

    fn key(n: u8) -> AccessKeyRecord {
        AccessKeyRecord {
            scope: None,
            functions: Vec::new(),
            sealed_secret: vec![n; 40],
            description: format!("key {n}"),
            created_ms: 1_700_000_000_000,
        }
    }

    /// The map a replica shows, for comparing replicas.
    fn state(c: &Catalog) -> Vec<Entry> {
        c.entries().collect()
    }

    /// Access keys: made on one host, removed on another; a late copy of the make (a lost
    /// push retried, a digest answer in flight) never brings a removed key back, and a replica
    /// that was away gets the removal from a digest swap.
    #[test]
    fn a_removed_access_key_stays_removed_everywhere() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let mut c = Catalog::new("c").unwrap();
        let made = a.put_access_key("FNLTAAAA", key(1), ms(1_000)).unwrap();
        assert_eq!(
            b.apply(&made, ms(1_001)).unwrap(),
            vec![Change {
                key: Key::AccessKey("FNLTAAAA".into()),
                value: Some(Value::AccessKey(key(1))),
            }]
        );
        assert_eq!(b.access_key("FNLTAAAA"), Some(&key(1)));
        // b's clock is behind a's: the removal still orders after the make it saw.
        let removed = b.remove_access_key("FNLTAAAA", ms(500)).unwrap();
        assert!(removed.entries[0].version > made.entries[0].version);
        assert_eq!(
            a.apply(&removed, ms(1_002)).unwrap(),
            vec![Change {
                key: Key::AccessKey("FNLTAAAA".into()),
                value: None,
            }]
        );
        // The make arrives again, late: nothing changes.
        assert_eq!(a.apply(&made, ms(1_003)).unwrap(), vec![]);
        assert_eq!(b.apply(&made, ms(1_003)).unwrap(), vec![]);
        assert_eq!(a.access_key("FNLTAAAA"), None);
        assert_eq!(a.access_keys().count(), 0);
        // c was away for both; the make reaches it after the removal did, by a digest swap.
        assert_eq!(c.apply(&b.diff(&c.digest()), ms(1_004)).unwrap(), vec![]);
        assert_eq!(c.apply(&made, ms(1_005)).unwrap(), vec![]);
        assert_eq!(c.access_key("FNLTAAAA"), None);
        assert_eq!(state(&a), state(&b));
        assert_eq!(state(&b), state(&c));
        // Other keys are untouched, and functions and keys of one name do not mix.
        let other = c.put_access_key("FNLTBBBB", key(2), ms(1_006)).unwrap();
        a.apply(&other, ms(1_006)).unwrap();
        a.put_function("FNLTBBBB", func(1, "a"), ms(1_007)).unwrap();
        let keys: Vec<(&str, &AccessKeyRecord)> = a.access_keys().collect();
        assert_eq!(keys, vec![("FNLTBBBB", &key(2))]);
        assert!(a.function("FNLTBBBB").is_some());
    }

    #[test]
    fn a_write_is_seen_by_a_peer_and_a_later_removal_wins() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let d1 = a.put_function("hello", func(1, "a"), ms(1_000)).unwrap();
        let changes = b.apply(&d1, ms(1_010)).unwrap();
        assert_eq!(
            changes,
            vec![Change {
                key: Key::Function("hello".into()),
                value: Some(Value::Function(func(1, "a"))),
            }]
        );
        assert_eq!(b.function("hello"), Some(&func(1, "a")));
        // Applying it again changes nothing.
        assert!(b.apply(&d1, ms(1_020)).unwrap().is_empty());

        let d2 = b.remove_function("hello", ms(1_030)).unwrap();
        assert!(b.function("hello").is_none());
        let changes = a.apply(&d2, ms(1_040)).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].value, None);
        assert!(a.function("hello").is_none());
        // The old deploy arriving late does not bring it back.
        assert!(a.apply(&d1, ms(1_050)).unwrap().is_empty());
        assert!(a.function("hello").is_none());
        assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn concurrent_writes_at_the_same_instant_are_won_by_the_greater_hlc_id() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let da = a.put_function("f", func(1, "a"), ms(5_000)).unwrap();
        let db = b.put_function("f", func(1, "b"), ms(5_000)).unwrap();
        a.apply(&db, ms(5_001)).unwrap();
        b.apply(&da, ms(5_001)).unwrap();
        let winner = if hlc_id("a") > hlc_id("b") { "a" } else { "b" };
        assert_eq!(a.function("f").unwrap().deployed_by, winner);
        assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn a_write_after_seeing_a_peer_write_wins_even_with_a_slower_clock() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        // b's clock runs 400 ms ahead of a's.
        let db = b.put_function("f", func(1, "b"), ms(10_400)).unwrap();
        a.apply(&db, ms(10_000)).unwrap();
        let da = a.put_function("f", func(2, "a"), ms(10_001)).unwrap();
        b.apply(&da, ms(10_402)).unwrap();
        assert_eq!(b.function("f").unwrap().version, 2);
        assert_eq!(state(&a), state(&b));
    }

    #[test]
    fn stamps_too_far_ahead_refuse_the_whole_delta() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let mut delta = b.put_function("ok", func(1, "b"), ms(10_000)).unwrap();
        delta.entries.extend(
            b.put_function("ahead", func(1, "b"), ms(20_000))
                .unwrap()
                .entries,
        );
        let err = a.apply(&delta, ms(10_000)).unwrap_err();
        assert!(
            matches!(&err, CatalogError::Clock { key: Key::Function(n), node, .. } if n == "ahead" && node == "b"),
            "{err}"
        );
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(a.function("ok").is_none(), "nothing applied");
        // Once this host's clock has caught up, it applies.
        assert_eq!(a.apply(&delta, ms(19_600)).unwrap().len(), 2);
    }

    fn fired(tick_ms: u64, by: &str) -> ScheduleRecord {
        ScheduleRecord {
            tick_ms,
            fired_by: by.to_owned(),
            fired_at_ms: tick_ms + 3,
            epoch: 0,
            removed: false,
        }
    }

    /// Two hosts that each think they own a schedule: the later tick wins everywhere, whichever
    /// write is newer and whichever arrives last, through pushes and through digest swaps; a
    /// record is never removed and never goes back.
    #[test]
    fn schedule_records_keep_the_latest_tick() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let mut c = Catalog::new("c").unwrap();
        let ten = a
            .fire_schedule("hello-1", 10_000, fired(10_000, "a"), ms(1_000))
            .unwrap()
            .unwrap();
        // b fires an earlier tick with a later stamp.
        let nine = b
            .fire_schedule("hello-1", 9_000, fired(9_000, "b"), ms(2_000))
            .unwrap()
            .unwrap();
        assert!(nine.entries[0].version > ten.entries[0].version);
        c.apply(&ten, ms(3_000)).unwrap();
        assert!(c.apply(&nine, ms(3_000)).unwrap().is_empty());
        assert_eq!(c.schedule("hello-1"), Some(&fired(10_000, "a")));
        // b has the later version: a digest answer from a must still send tick 10, and b's
        // answer to a sends tick 9, which a keeps out.
        b.apply(&a.diff(&b.digest()), ms(3_000)).unwrap();
        a.apply(&b.diff(&a.digest()), ms(3_000)).unwrap();
        assert_eq!(b.schedule("hello-1"), Some(&fired(10_000, "a")));
        assert_eq!(a.schedule("hello-1"), Some(&fired(10_000, "a")));
        assert!(a.diff(&b.digest()).is_empty() && b.diff(&a.digest()).is_empty());
        // A tick already recorded is not fired again, here or by the host that learnt it.
        assert!(
            b.fire_schedule("hello-1", 10_000, fired(10_000, "b"), ms(4_000))
                .unwrap()
                .is_none()
        );
        assert!(
            b.fire_schedule("hello-1", 11_000, fired(11_000, "b"), ms(4_000))
                .unwrap()
                .is_some()
        );
        // Reloaded from the store in any order, the latest tick is kept.
        let mut entries: Vec<Entry> = b.entries().collect();
        entries.extend(nine.entries.clone());
        entries.reverse();
        let again = Catalog::from_entries("b", entries).unwrap();
        assert_eq!(again.schedule("hello-1").map(|r| r.tick_ms), Some(11_000));
        // Ticks from 10 s on are refused once 10 s is recorded; a batch starting after it is
        // taken.
        assert!(
            b.fire_schedule("hello-1", 11_000, fired(13_000, "b"), ms(4_000))
                .unwrap()
                .is_none()
        );
        assert!(
            b.fire_schedule("hello-1", 12_000, fired(13_000, "b"), ms(4_000))
                .unwrap()
                .is_some()
        );
        // A null value is not a schedule's removal.
        let mut removal = ten.clone();
        removal.entries[0].value = None;
        assert!(matches!(
            c.apply(&removal, ms(5_000)),
            Err(CatalogError::BadEntry { .. })
        ));
        let json = serde_json::to_string(&ten).unwrap();
        assert!(json.contains(r#""key":"schedule:hello-1""#), "{json}");
        assert_eq!(serde_json::from_str::<Delta>(&json).unwrap(), ten);
    }

    /// A schedule's removal wins over every tick of its epoch, whichever arrives last (a host
    /// that fired before it learnt of the removal); firing it again after the removal (the
    /// trigger deployed again) starts the next epoch, which wins over the removal.
    #[test]
    fn schedule_removals_win_within_their_epoch() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let mut c = Catalog::new("c").unwrap();
        let first = a
            .fire_schedule("hello-1", 10_000, fired(10_000, "a"), ms(1_000))
            .unwrap()
            .unwrap();
        b.apply(&first, ms(1_000)).unwrap();
        c.apply(&first, ms(1_000)).unwrap();
        // a removes it; b, not knowing yet, fires a later tick with a later stamp.
        let removal = a.remove_schedule("hello-1", ms(2_000)).unwrap().unwrap();
        let late = b
            .fire_schedule("hello-1", 11_000, fired(11_000, "b"), ms(3_000))
            .unwrap()
            .unwrap();
        assert!(late.entries[0].version > removal.entries[0].version);
        assert_eq!(a.schedule("hello-1"), None);
        assert!(a.remove_schedule("hello-1", ms(2_500)).unwrap().is_none());
        for order in [[&removal, &late], [&late, &removal]] {
            let mut r = Catalog::new("r").unwrap();
            r.apply(&first, ms(4_000)).unwrap();
            for d in order {
                r.apply(d, ms(4_000)).unwrap();
            }
            assert_eq!(r.schedule("hello-1"), None, "the removal wins");
            assert!(r.schedule_entry("hello-1").is_some_and(|e| e.removed));
            assert_eq!(r.schedules().count(), 0);
        }
        c.apply(&late, ms(4_000)).unwrap();
        c.apply(&removal, ms(4_000)).unwrap();
        b.apply(&removal, ms(4_000)).unwrap();
        assert_eq!(b.schedule("hello-1"), None);
        // Deployed again: the next firing starts epoch 1, which wins over the removal.
        let again = b
            .fire_schedule("hello-1", 20_000, fired(20_000, "b"), ms(5_000))
            .unwrap()
            .unwrap();
        assert_eq!(
            b.schedule("hello-1").map(|r| (r.epoch, r.tick_ms)),
            Some((1, 20_000))
        );
        for r in [&mut a, &mut c] {
            r.apply(&again, ms(5_000)).unwrap();
            assert_eq!(r.schedule("hello-1").map(|r| r.epoch), Some(1));
        }
        // A late write of epoch 0 does not bring back the old ticks.
        let stale = Catalog::new("d")
            .unwrap()
            .fire_schedule("hello-1", 30_000, fired(30_000, "d"), ms(6_000))
            .unwrap()
            .unwrap();
        a.apply(&stale, ms(6_000)).unwrap();
        assert_eq!(a.schedule("hello-1").map(|r| r.tick_ms), Some(20_000));
        // Digest swaps agree.
        for (x, y) in [(0, 1), (1, 2), (2, 0), (0, 1)] {
            let v = [&mut a, &mut b, &mut c];
            let d = v[x].diff(&v[y].digest());
            v[y].apply(&d, ms(7_000)).unwrap();
        }
        assert_eq!(state(&a), state(&b));
        assert_eq!(state(&b), state(&c));
        let json = serde_json::to_string(&removal).unwrap();
        assert!(json.contains(r#""removed":true"#), "{json}");
        assert!(!serde_json::to_string(&first).unwrap().contains("epoch"));
        assert_eq!(serde_json::from_str::<Delta>(&json).unwrap(), removal);
    }

    /// A host that reserved a tick and learnt another fired it records who did.
    #[test]
    fn a_noted_record_replaces_an_equal_tick() {
        let mut a = Catalog::new("a").unwrap();
        a.fire_schedule("s", 5_000, fired(5_000, "a"), ms(1_000))
            .unwrap()
            .unwrap();
        assert!(
            a.note_schedule("s", fired(4_000, "b"), ms(1_001))
                .unwrap()
                .is_none()
        );
        assert!(
            a.note_schedule("s", fired(5_000, "b"), ms(1_002))
                .unwrap()
                .is_some()
        );
        assert_eq!(a.schedule("s"), Some(&fired(5_000, "b")));
        assert!(
            a.note_schedule("s", fired(5_000, "b"), ms(1_003))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_entries_are_refused() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let good = b.put_function("f", func(1, "b"), ms(1_000)).unwrap();

        let mut wrong_kind = good.clone();
        wrong_kind.entries[0].value = Some(Value::AccessKey(key(1)));
        let mut forged = good.clone();
        forged.entries[0].version.node = "c".into();
        let mut bad_name = good.clone();
        bad_name.entries[0].key = Key::Function(String::new());
        for (delta, want) in [
            (wrong_kind, "does not match"),
            (forged, "not the writer's"),
            (bad_name, "empty"),
        ] {
            let err = a.apply(&delta, ms(1_000)).unwrap_err();
            assert!(matches!(err, CatalogError::BadEntry { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
        assert_eq!(a.entries().count(), 0);
    }

    #[test]
    fn local_writes_check_names_and_sizes() {
        let mut a = Catalog::new("a").unwrap();
        let err = a.put_function("", func(1, "a"), ms(1)).unwrap_err();
        assert!(
            matches!(
                err,
                CatalogError::BadName {
                    kind: "function",
                    ..
                }
            ),
            "{err}"
        );
        let err = a.remove_access_key(&"k".repeat(257), ms(1)).unwrap_err();
        assert!(err.to_string().contains("longer than 256"), "{err}");
        let mut big = func(1, "a");
        big.manifest = serde_json::json!({ "description": "x".repeat(MAX_ENTRY_JSON) });
        let err = a.put_function("big", big, ms(1)).unwrap_err();
        assert!(matches!(err, CatalogError::EntryTooLarge { .. }), "{err}");
        assert!(a.entries().count() == 0);
        assert!(Catalog::new("").is_err());
    }

    #[test]
    fn entries_round_trip_through_json_and_the_store() {
        let mut a = Catalog::new("a").unwrap();
        a.put_function("f", func(3, "a"), ms(1_000)).unwrap();
        a.put_access_key("AKIDEXAMPLE", key(7), ms(1_001)).unwrap();
        a.remove_function("gone", ms(1_002)).unwrap();
        let entries: Vec<Entry> = a.entries().collect();
        let json = serde_json::to_string(&Delta {
            entries: entries.clone(),
        })
        .unwrap();
        assert!(json.contains(r#""key":"access_key:AKIDEXAMPLE""#), "{json}");
        assert!(json.contains(r#""sealed_secret":"BwcH"#), "{json}");
        assert!(
            json.contains(r#""key":"function:gone","version":["#),
            "{json}"
        );
        let back: Delta = serde_json::from_str(&json).unwrap();
        assert_eq!(back.entries, entries);

        // Reloaded, the clock is past every stamp: a new write wins even with the wall
        // clock behind.
        let mut again = Catalog::from_entries("a", back.entries).unwrap();
        assert_eq!(state(&again), entries);
        let d = again.put_function("f", func(4, "a"), ms(10)).unwrap();
        assert!(d.entries[0].version > entries[1].version);

        // Unknown fields and keys of the wrong kind are refused.
        assert!(serde_json::from_str::<Delta>(r#"{"entries":[],"more":1}"#).is_err());
        let mismatched = json.replace("function:f", "access_key:f");
        assert!(serde_json::from_str::<Delta>(&mismatched).is_err());
    }

    #[test]
    fn delta_since_includes_late_arrivals_with_old_stamps() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let old = b.put_function("old", func(1, "b"), ms(1_000)).unwrap();
        a.put_function("f", func(1, "a"), ms(2_000)).unwrap();
        let (first, cursor) = a.delta_since(None);
        assert_eq!(first.entries.len(), 1);
        let (none, same) = a.delta_since(cursor);
        assert!(none.is_empty());
        assert_eq!(same, cursor);
        // b's write is older than anything a has sent, but it changed a's map since.
        a.apply(&old, ms(3_000)).unwrap();
        let (late, _) = a.delta_since(cursor);
        assert_eq!(late.entries, old.entries);
    }

    #[test]
    fn diff_sends_what_the_peer_lacks_or_holds_older() {
        let mut a = Catalog::new("a").unwrap();
        let mut b = Catalog::new("b").unwrap();
        let shared = a.put_function("shared", func(1, "a"), ms(1_000)).unwrap();
        b.apply(&shared, ms(1_000)).unwrap();
        a.put_function("newer", func(1, "a"), ms(1_001)).unwrap();
        let old = a.put_function("changed", func(1, "a"), ms(1_002)).unwrap();
        b.apply(&old, ms(1_002)).unwrap();
        a.put_function("changed", func(2, "a"), ms(1_003)).unwrap();
        b.put_function("only-b", func(1, "b"), ms(1_004)).unwrap();

        let d = a.diff(&b.digest());
        let keys: Vec<String> = d.entries.iter().map(|e| e.key.to_string()).collect();
        assert_eq!(keys, ["function:changed", "function:newer"]);
        b.apply(&d, ms(1_005)).unwrap();
        a.apply(&b.diff(&a.digest()), ms(1_005)).unwrap();
        assert_eq!(state(&a), state(&b));
        assert!(a.diff(&b.digest()).is_empty());
    }

    fn big_catalog(n: usize) -> Catalog {
        let mut c = Catalog::new("node-with-a-longish-name").unwrap();
        for i in 0..n {
            c.put_function(
                &format!("function-{i:05}"),
                func(i as u64, "x"),
                ms(1_000 + i as u64),
            )
            .unwrap();
            if i % 3 == 0 {
                c.put_access_key(&format!("AK{i:018}"), key(i as u8), ms(1_000 + i as u64))
                    .unwrap();
            }
        }
        c
    }

    #[test]
    fn digests_and_deltas_split_to_fit_frames_and_lose_nothing() {
        let limit = crate::frame::MAX_META_LEN as usize;
        let a = big_catalog(3_000);
        let digest = a.digest();
        let chunks = digest.chunks(limit).unwrap();
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        let mut joined = BTreeMap::new();
        for (i, c) in chunks.iter().enumerate() {
            let len = serde_json::to_vec(c).unwrap().len();
            assert!(len <= limit, "chunk {i}: {len} bytes");
            assert_eq!(
                c.from,
                if i == 0 {
                    None
                } else {
                    chunks[i - 1].to.clone()
                }
            );
            assert!(c.versions.keys().all(|k| c.covers(k)));
            joined.extend(c.versions.clone());
        }
        assert_eq!(chunks.last().unwrap().to, None);
        assert_eq!(joined, digest.versions);

        // An empty replica answered chunk by chunk gets everything, in deltas that fit.
        let mut b = Catalog::new("b").unwrap();
        let empty = b.digest();
        for c in empty.chunks(limit).unwrap() {
            for d in a.diff(&c).chunks(limit).unwrap() {
                assert!(serde_json::to_vec(&d).unwrap().len() <= limit);
                b.apply(&d, ms(1_000_000)).unwrap();
            }
        }
        assert_eq!(state(&a), state(&b));
        // And a's digest chunks, answered by b, ask for nothing.
        for c in &chunks {
            assert!(b.diff(c).is_empty());
        }
        // A limit below one entry is an error, not an endless loop.
        assert!(matches!(
            a.digest().chunks(40),
            Err(CatalogError::EntryTooLarge { .. })
        ));
        assert!(matches!(
            a.diff(&empty).chunks(100),
            Err(CatalogError::EntryTooLarge { .. })
        ));
    }

    /// One step of a random history among replicas.
    #[derive(Debug, Clone)]
    enum Op {
        /// Replica writes (or removes) a key.
        Write {
            replica: usize,
            key: usize,
            remove: bool,
            value: u8,
        },
        /// A sent delta (picked among all sent so far) reaches a replica: any message may be
        /// delivered late, twice, or never.
        Deliver { message: usize, to: usize },
        /// Anti-entropy: `to` sends its digest to `from`, which answers with a diff.
        Sync { from: usize, to: usize },
        /// Time passes.
        Advance { ms: u64 },
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..n, 0..4usize, proptest::bool::weighted(0.2), any::<u8>())
                .prop_map(|(replica, key, remove, value)| Op::Write { replica, key, remove, value }),
            4 => (any::<usize>(), 0..n).prop_map(|(message, to)| Op::Deliver { message, to }),
            1 => (0..n, 0..n).prop_map(|(from, to)| Op::Sync { from, to }),
            2 => (0u64..300).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    fn history() -> impl Strategy<Value = (usize, Vec<i64>, usize, Vec<Op>, Vec<Op>)> {
        (3usize..=5).prop_flat_map(|n| {
            (
                Just(n),
                // Each replica's clock error, within ±200 ms: any two differ by < 500 ms.
                proptest::collection::vec(-200i64..=200, n),
                // The partition: replicas below this index on one side.
                1..n,
                proptest::collection::vec(op(n), 0..80),
                proptest::collection::vec(op(n), 0..80),
            )
        })
    }

    fn run_history(
        n: usize,
        skew: &[i64],
        split: usize,
        partitioned: &[Op],
        healed: &[Op],
    ) -> Result<(), TestCaseError> {
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let mut replicas: Vec<Catalog> = names.iter().map(|n| Catalog::new(n).unwrap()).collect();
        let mut sent: Vec<(usize, Delta)> = Vec::new();
        let mut written: BTreeMap<Key, Vec<Version>> = BTreeMap::new();
        let mut now = 1_000_000u64;
        let clock = |i: usize, now: u64| ms((now as i64 + skew[i]) as u64);
        let keys = [
            Key::Function("alpha".into()),
            Key::Function("beta".into()),
            Key::Function("gamma".into()),
            Key::AccessKey("AKID".into()),
        ];
        for (phase, ops) in [partitioned, healed].into_iter().enumerate() {
            let reachable = |a: usize, b: usize| phase == 1 || (a < split) == (b < split);
            for op in ops {
                match *op {
                    Op::Write {
                        replica,
                        key: k,
                        remove,
                        value,
                    } => {
                        let r = &mut replicas[replica];
                        let t = clock(replica, now);
                        let d = match (&keys[k], remove) {
                            (Key::Function(f), false) => {
                                r.put_function(f, func(u64::from(value), &names[replica]), t)
                            }
                            (Key::Function(f), true) => r.remove_function(f, t),
                            (Key::AccessKey(id), false) => r.put_access_key(id, key(value), t),
                            (Key::AccessKey(id), true) => r.remove_access_key(id, t),
                            (Key::Schedule(_), _) => unreachable!("no schedule among the keys"),
                        }
                        .unwrap();
                        written
                            .entry(keys[k].clone())
                            .or_default()
                            .push(d.entries[0].version.clone());
                        sent.push((replica, d));
                    }
                    Op::Deliver { message, to } => {
                        if sent.is_empty() {
                            continue;
                        }
                        let (from, d) = &sent[message % sent.len()];
                        if reachable(*from, to) {
                            replicas[to].apply(d, clock(to, now)).unwrap();
                        }
                    }
                    Op::Sync { from, to } => {
                        if reachable(from, to) {
                            let d = replicas[from].diff(&replicas[to].digest());
                            replicas[to].apply(&d, clock(to, now)).unwrap();
                        }
                    }
                    Op::Advance { ms } => now += ms,
                }
            }
        }
        // Anti-entropy after the heal: every pair syncs.
        for from in 0..n {
            for to in 0..n {
                let d = replicas[from].diff(&replicas[to].digest());
                replicas[to].apply(&d, clock(to, now)).unwrap();
            }
        }
        let first = state(&replicas[0]);
        for r in &replicas[1..] {
            prop_assert_eq!(&state(r), &first);
        }
        // Each key holds its greatest write.
        prop_assert_eq!(first.len(), written.len());
        for e in &first {
            let max = written[&e.key].iter().max().unwrap();
            prop_assert_eq!(&e.version, max);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any interleaving, duplication, loss (made up by the final sync) and reordering of
        /// deltas among 3 to 5 replicas, with writes on both sides of a partition, ends with
        /// the same map everywhere, each key holding its greatest (stamp, node) write.
        #[test]
        fn replicas_converge((n, skew, split, partitioned, healed) in history()) {
            run_history(n, &skew, split, &partitioned, &healed)?;
        }

        /// Applying deltas is order-insensitive and idempotent.
        #[test]
        fn apply_commutes(writes in proptest::collection::vec((0..3usize, 0..3usize, any::<bool>()), 1..30), seed in any::<u64>()) {
            let names = ["a", "b", "c"];
            let mut writers: Vec<Catalog> = names.iter().map(|n| Catalog::new(n).unwrap()).collect();
            let mut deltas = Vec::new();
            for (i, (w, k, remove)) in writes.iter().enumerate() {
                let name = ["x", "y", "z"][*k];
                let t = ms(1_000 + i as u64 / 2);
                deltas.push(if *remove {
                    writers[*w].remove_function(name, t).unwrap()
                } else {
                    writers[*w].put_function(name, func(i as u64, names[*w]), t).unwrap()
                });
            }
            let mut forward = Catalog::new("r1").unwrap();
            for d in &deltas { forward.apply(d, ms(2_000)).unwrap(); }
            let mut shuffled = deltas.clone();
            // A deterministic shuffle with duplicates.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            shuffled.extend(deltas.iter().step_by(2).cloned());
            let mut backward = Catalog::new("r2").unwrap();
            for d in &shuffled { backward.apply(d, ms(2_000)).unwrap(); }
            prop_assert_eq!(state(&forward), state(&backward));
        }
    }
}
