//! Access keys for the Invoke API: made, listed and removed by the operator, kept sealed in a
//! redb database of their own.
//!
//! Layout under the state dir:
//! - `keys.key`: the master key, 32 random bytes, mode 0600, made at first use;
//! - `keys.redb`: one record per access key id: description, times, and the secret sealed
//!   with ChaCha20-Poly1305 under the master key (a random nonce each; the associated data
//!   binds the sealed secret to its key id, so a sealed secret moved to another id does not
//!   open).
//!
//! In a cluster, keys are the cluster's: each is also an entry of the replicated catalog with
//! its secret sealed under the cluster's sealing key (`cluster/keys.key`, see
//! `cluster::access_keys`), and every host holds every live key here, sealed with its own
//! master key. This store is the same either way: verification reads it alone.
//!
//! SigV4 needs the secret itself (not a hash of it) to recompute signatures, so secrets are
//! sealed rather than hashed. They are opened once, at `open`, and kept in memory, so that
//! verifying a request touches no disk; they are wiped from memory when dropped. A key's last
//! use is kept in memory and written out when the keys are listed, and when the store is
//! dropped.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, Method, Uri};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::AuthError;
use super::sigv4;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("access_keys");
pub const MASTER_KEY_FILE: &str = "keys.key";
pub const DB_FILE: &str = "keys.redb";
/// Access key ids: this prefix and 16 base32 characters, 20 in all like AWS's.
pub const ID_PREFIX: &str = "FNLT";
pub const ID_LEN: usize = 20;
pub const SECRET_LEN: usize = 40;
pub const MAX_DESCRIPTION: usize = 256;
const NONCE_LEN: usize = 12;
/// Associated data: what a sealed secret belongs to (and the format's version).
const AAD_PREFIX: &[u8] = b"fnlet access key v1\0";
/// The same for a secret sealed under the cluster's key (in the catalog): a secret sealed for
/// one use does not open as the other.
const CLUSTER_AAD_PREFIX: &[u8] = b"fnlet cluster access key v1\0";

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("no access key {0:?}")]
    NotFound(String),
    #[error("bad description: {0}")]
    BadDescription(String),
    #[error("access key database: {0}")]
    Db(#[from] redb::Error),
    #[error("key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path}: {len} bytes, expected 32 ({hint})")]
    KeyLength {
        path: PathBuf,
        len: usize,
        /// What to do about it.
        hint: &'static str,
    },
    #[error("no randomness for an access key: {0}")]
    Random(getrandom::Error),
    #[error("corrupt access key record {id:?}: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("sealing the secret of {0}")]
    Seal(String),
}

macro_rules! db_err {
    ($($t:ty),*) => { $(impl From<$t> for KeyStoreError { fn from(e: $t) -> Self { KeyStoreError::Db(e.into()) } })* };
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A secret access key. Not `Display`, and `Debug` hides it, so it cannot end up in a log
/// line by accident; wiped from memory when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What a key may sign, each scope including the ones before it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Invocations only (the Invoke API, function URLs).
    Invoke,
    /// Invocations and Lambda's control plane (create, update, delete, aliases...).
    Deploy,
    /// Everything a key can sign (keys made before scopes existed are admin keys).
    #[default]
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "invoke" => Some(Scope::Invoke),
            "deploy" => Some(Scope::Deploy),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Invoke => "invoke",
            Scope::Deploy => "deploy",
            Scope::Admin => "admin",
        }
    }
}

/// What the API and `fnlet keys ls` show of a key: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub access_key_id: String,
    pub description: String,
    pub created_at: String,
    /// When a request signed with it was last let in (to the second).
    pub last_used: Option<String>,
    /// What it may sign.
    #[serde(default)]
    pub scope: Scope,
    /// The functions it may act on, as name patterns (`*` matches any run of characters);
    /// empty: every function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
}

impl KeyInfo {
    /// Whether the key may do what needs `need` to `function` (None: to no one function, such
    /// as listing them all, which a key limited to some functions may not).
    pub fn allows(&self, need: Scope, function: Option<&str>) -> bool {
        self.scope >= need
            && (self.functions.is_empty()
                || function.is_some_and(|f| self.functions.iter().any(|p| matches_pattern(p, f))))
    }
}

/// `name` against `pattern`, where `*` matches any run of characters (none included).
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A function name pattern a key may be limited to: a function name's characters and `*`.
pub fn valid_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 64
        && p.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_*".contains(&c))
}

/// One key on disk.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    info: KeyInfo,
    /// Hex of nonce || ciphertext || tag.
    sealed: String,
}

struct Entry {
    info: KeyInfo,
    /// `None` when the sealed secret did not open (the master key was replaced): the key is
    /// listed and can be removed, but lets nobody in.
    secret: Option<Secret>,
    /// Unix seconds of the last successful verification; 0: never.
    last_used: AtomicU64,
    /// What the database holds, to know when to write.
    persisted: AtomicU64,
}

pub struct KeyStore {
    db: Database,
    sealer: Sealer,
    /// Read on every verification; written only after the database, for a moment.
    keys: RwLock<HashMap<String, Arc<Entry>>>,
    /// One writer at a time (create, remove), so the map's lock is never held across a commit.
    writer: Mutex<()>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

fn rfc3339(unix: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn parse_rfc3339(s: &str) -> u64 {
    // `time` has no parsing feature here: compare through SystemTime via humantime.
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Unix milliseconds as RFC 3339 (the fraction only as long as it needs to be).
pub fn rfc3339_ms(ms: u64) -> String {
    // Always three digits (`time` drops trailing zeros): the strings then sort as the times do.
    match rfc3339(ms / 1000) {
        Some(secs) => match secs.strip_suffix('Z') {
            Some(s) => format!("{s}.{:03}Z", ms % 1000),
            None => secs,
        },
        None => String::new(),
    }
}

/// A key's creation time in Unix milliseconds (0 if it does not read).
pub fn created_ms(info: &KeyInfo) -> u64 {
    humantime::parse_rfc3339_weak(&info.created_at)
        .ok()
        .map_or(0, unix_ms)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether `id` looks like one of ours (anything else cannot be in the store).
pub fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id.starts_with(ID_PREFIX)
        && id[ID_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

fn random(buf: &mut [u8]) -> Result<(), KeyStoreError> {
    getrandom::fill(buf).map_err(KeyStoreError::Random)
}

/// `FNLT` + 16 characters of RFC 4648 base32 over 10 random bytes (80 bits).
fn new_id() -> Result<String, KeyStoreError> {
    const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut raw = [0u8; 10];
    random(&mut raw)?;
    let mut bits = 0u128;
    for b in raw {
        bits = (bits << 8) | u128::from(b);
    }
    let mut id = String::with_capacity(ID_LEN);
    id.push_str(ID_PREFIX);
    for i in (0..16).rev() {
        id.push(char::from(B32[((bits >> (i * 5)) & 31) as usize]));
    }
    Ok(id)
}

/// 40 characters of [A-Za-z0-9], each uniform (bytes past 247 are dropped: 248 = 4 * 62).
fn new_secret() -> Result<Secret, KeyStoreError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = Zeroizing::new(String::with_capacity(SECRET_LEN));
    let mut raw = Zeroizing::new([0u8; 64]);
    while s.len() < SECRET_LEN {
        random(raw.as_mut())?;
        for &b in raw.iter().filter(|b| **b < 248) {
            if s.len() == SECRET_LEN {
                break;
            }
            s.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(Secret(s))
}

fn check_description(d: &str) -> Result<(), KeyStoreError> {
    if d.chars().count() > MAX_DESCRIPTION {
        return Err(KeyStoreError::BadDescription(format!(
            "at most {MAX_DESCRIPTION} characters"
        )));
    }
    if d.chars().any(char::is_control) {
        return Err(KeyStoreError::BadDescription(
            "no control characters (newlines, tabs, escapes)".into(),
        ));
    }
    Ok(())
}

/// What to do about a master key of the wrong length.
const MASTER_KEY_HINT: &str = "restore it, or remove it and keys.redb and make new keys";

/// Reads a 32-byte key file (`None`: there is none), tightening its mode to 0600 if others
/// could read it.
pub fn read_key_file(
    path: &Path,
    hint: &'static str,
) -> Result<Option<Zeroizing<[u8; 32]>>, KeyStoreError> {
    let io = |source| KeyStoreError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    let raw = match fs::read(path) {
        Ok(raw) => Zeroizing::new(raw),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let key: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| KeyStoreError::KeyLength {
            path: path.to_path_buf(),
            len: raw.len(),
            hint,
        })?;
    let mode = fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "a key file was readable by others: made it 0600");
    }
    Ok(Some(Zeroizing::new(key)))
}

/// Writes a 32-byte key file, mode 0600 from the start, through a temporary file and a rename
/// (synced, so a crash leaves the old file or the new one).
pub fn write_key_file(path: &Path, key: &[u8; 32]) -> Result<(), KeyStoreError> {
    let io = |source| KeyStoreError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("key.tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(key).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Reads a key file, making it (32 random bytes, mode 0600) if there is none.
pub fn read_or_make_key_file(
    path: &Path,
    what: &'static str,
    hint: &'static str,
) -> Result<Zeroizing<[u8; 32]>, KeyStoreError> {
    if let Some(key) = read_key_file(path, hint)? {
        return Ok(key);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    random(key.as_mut())?;
    write_key_file(path, &key)?;
    tracing::info!(path = %path.display(), "created {what}");
    Ok(key)
}

/// Seals and opens access key secrets under one key: a host's master key, or the cluster's
/// sealing key. A sealed secret is nonce || ciphertext || tag, with a random nonce each time;
/// the associated data binds it to its key id and to its use (host or cluster), so a sealed
/// secret moved to another id, or from the catalog to a host's database, does not open.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    aad_prefix: &'static [u8],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// A host's own sealer (its master key, `keys.key`).
    fn host(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            aad_prefix: AAD_PREFIX,
        }
    }

    /// The cluster's sealer (the sealing key every member holds, `cluster/keys.key`).
    pub fn cluster(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            aad_prefix: CLUSTER_AAD_PREFIX,
        }
    }

    fn aad(&self, id: &str) -> Vec<u8> {
        let mut a = self.aad_prefix.to_vec();
        a.extend_from_slice(id.as_bytes());
        a
    }

    /// The secret of key `id`, sealed.
    pub fn seal(&self, id: &str, secret: &Secret) -> Result<Vec<u8>, KeyStoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: &self.aad(id),
                },
            )
            .map_err(|_| KeyStoreError::Seal(id.to_string()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// The secret of key `id` out of `sealed`; `None` if it does not open (another key,
    /// another id, altered bytes).
    pub fn unseal(&self, id: &str, sealed: &[u8]) -> Option<Secret> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: &self.aad(id),
                    },
                )
                .ok()?,
        );
        let s = std::str::from_utf8(&plain).ok()?;
        Some(Secret(Zeroizing::new(s.to_string())))
    }
}

impl KeyStore {
    /// Opens (creating) `<state_dir>/keys.redb` and `<state_dir>/keys.key`, and opens every
    /// sealed secret into memory.
    pub fn open(state_dir: &Path) -> Result<KeyStore, KeyStoreError> {
        let master = read_or_make_key_file(
            &state_dir.join(MASTER_KEY_FILE),
            "the access keys' master key",
            MASTER_KEY_HINT,
        )?;
        let sealer = Sealer::host(&master);
        let db = Database::create(state_dir.join(DB_FILE))?;
        let txn = db.begin_write()?;
        txn.open_table(KEYS)?;
        txn.commit()?;
        let store = KeyStore {
            db,
            sealer,
            keys: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
        };
        let mut keys = HashMap::new();
        let txn = store.db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let id = k.value().to_string();
            let rec: Record =
                serde_json::from_slice(v.value()).map_err(|source| KeyStoreError::Corrupt {
                    id: id.clone(),
                    source,
                })?;
            let secret = store.unseal(&id, &rec.sealed);
            if secret.is_none() {
                tracing::warn!(access_key_id = %id, "the sealed secret of this access key does not open with keys.key (was the master key replaced?): it lets nobody in; remove it and make a new one");
            }
            let used = rec.info.last_used.as_deref().map_or(0, parse_rfc3339);
            keys.insert(
                id,
                Arc::new(Entry {
                    info: rec.info,
                    secret,
                    last_used: AtomicU64::new(used),
                    persisted: AtomicU64::new(used),
                }),
            );
        }
        *store.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(store)
    }

    /// Hex of the secret sealed with the master key (what a record holds).
    fn seal(&self, id: &str, secret: &Secret) -> Result<String, KeyStoreError> {
        Ok(hex::encode(self.sealer.seal(id, secret)?))
    }

    fn unseal(&self, id: &str, sealed: &str) -> Option<Secret> {
        self.sealer.unseal(id, &hex::decode(sealed).ok()?)
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Entry>>> {
        // A panic while holding the lock leaves the map as it was: keep using it.
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes an admin key for every function. The secret is returned this once: the store
    /// keeps it sealed only.
    pub fn create(&self, description: &str) -> Result<(KeyInfo, Secret), KeyStoreError> {
        self.create_scoped(description, Scope::Admin, &[])
    }

    /// Makes a key of `scope`, limited to the functions matching `functions` (none: every
    /// function).
    pub fn create_scoped(
        &self,
        description: &str,
        scope: Scope,
        functions: &[String],
    ) -> Result<(KeyInfo, Secret), KeyStoreError> {
        check_description(description)?;
        if let Some(p) = functions.iter().find(|p| !valid_pattern(p)) {
            return Err(KeyStoreError::BadDescription(format!(
                "function pattern {p:?}: 1-64 characters of a-z, 0-9, -, _ and *"
            )));
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let id = loop {
            let id = new_id()?;
            if !self.map().contains_key(&id) {
                break id;
            }
        };
        let secret = new_secret()?;
        // To the millisecond: what the catalog keeps, so every host shows the same time.
        let info = KeyInfo {
            access_key_id: id.clone(),
            description: description.to_string(),
            created_at: rfc3339_ms(unix_ms(SystemTime::now())),
            last_used: None,
            scope,
            functions: functions.to_vec(),
        };
        let rec = Record {
            info: info.clone(),
            sealed: self.seal(&id, &secret)?,
        };
        let bytes = serde_json::to_vec(&rec).expect("records serialize");
        let txn = self.db.begin_write()?;
        txn.open_table(KEYS)?
            .insert(id.as_str(), bytes.as_slice())?;
        txn.commit()?;
        self.keys.write().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Arc::new(Entry {
                info: info.clone(),
                secret: Some(secret.clone()),
                last_used: AtomicU64::new(0),
                persisted: AtomicU64::new(0),
            }),
        );
        Ok((info, secret))
    }

    /// Every key, oldest first; never a secret. Writes out the last uses seen since the last
    /// call.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.flush_last_used()?;
        let mut out: Vec<KeyInfo> = self.map().values().map(|e| e.current_info()).collect();
        // By time, not by string: keys stored before the times had fixed-width milliseconds.
        out.sort_by_cached_key(|k| (created_ms(k), k.access_key_id.clone()));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Option<KeyInfo> {
        self.map().get(id).map(|e| e.current_info())
    }

    pub fn remove(&self, id: &str) -> Result<(), KeyStoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !self.map().contains_key(id) {
            return Err(KeyStoreError::NotFound(id.to_string()));
        }
        let txn = self.db.begin_write()?;
        txn.open_table(KEYS)?.remove(id)?;
        txn.commit()?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// Adds, or replaces, a key made on another host of the cluster (sealed here with this
    /// host's master key); the last use seen here is kept. Returns whether anything changed.
    pub fn import(&self, info: &KeyInfo, secret: &Secret) -> Result<bool, KeyStoreError> {
        check_description(&info.description)?;
        let id = info.access_key_id.as_str();
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.map().get(id).cloned();
        if let Some(e) = &old
            && e.info.description == info.description
            && e.info.created_at == info.created_at
            && e.secret
                .as_ref()
                .is_some_and(|s| s.expose() == secret.expose())
        {
            return Ok(false);
        }
        let used = old
            .as_ref()
            .map_or(0, |e| e.last_used.load(Ordering::Relaxed));
        let info = KeyInfo {
            access_key_id: id.to_string(),
            description: info.description.clone(),
            created_at: info.created_at.clone(),
            last_used: rfc3339(used).filter(|_| used > 0),
            scope: info.scope,
            functions: info.functions.clone(),
        };
        let rec = Record {
            info: info.clone(),
            sealed: self.seal(id, secret)?,
        };
        let bytes = serde_json::to_vec(&rec).expect("records serialize");
        let txn = self.db.begin_write()?;
        txn.open_table(KEYS)?.insert(id, bytes.as_slice())?;
        txn.commit()?;
        self.keys.write().unwrap_or_else(|p| p.into_inner()).insert(
            id.to_string(),
            Arc::new(Entry {
                info,
                secret: Some(secret.clone()),
                last_used: AtomicU64::new(used),
                persisted: AtomicU64::new(used),
            }),
        );
        Ok(true)
    }

    /// Removes a key if this host has it; whether it had.
    pub fn forget(&self, id: &str) -> Result<bool, KeyStoreError> {
        match self.remove(id) {
            Ok(()) => Ok(true),
            Err(KeyStoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every key's id.
    pub fn ids(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// Every key whose secret opens, with it (to publish them to a cluster).
    pub fn with_secrets(&self) -> Vec<(KeyInfo, Secret)> {
        self.map()
            .values()
            .filter_map(|e| Some((e.info.clone(), e.secret.clone()?)))
            .collect()
    }

    /// The secret of a key, for verification; `None` for an unknown key.
    pub fn secret(&self, id: &str) -> Option<Secret> {
        self.map().get(id).and_then(|e| e.secret.clone())
    }

    /// Checks the request's SigV4 signature (header or presigned query) against the key it
    /// names, with `body` as its payload; returns that access key id. See the module doc of
    /// `auth` for what is checked. Touches no disk.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<String, AuthError> {
        self.verify_payload(method, uri, headers, sigv4::Payload::Body(body), now)
    }

    /// `verify` for a body the caller hashed as it streamed in.
    pub fn verify_sha256(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body_sha256: &[u8; 32],
        now: SystemTime,
    ) -> Result<String, AuthError> {
        self.verify_payload(
            method,
            uri,
            headers,
            sigv4::Payload::Sha256(body_sha256),
            now,
        )
    }

    fn verify_payload(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        payload: sigv4::Payload<'_>,
        now: SystemTime,
    ) -> Result<String, AuthError> {
        let mut entry = None;
        let id = sigv4::authenticate(method, uri, headers, payload, now, |id| {
            let e = self.map().get(id).cloned()?;
            let secret = e.secret.clone()?;
            entry = Some(e);
            Some(secret)
        })?;
        if let Some(e) = entry {
            e.last_used.fetch_max(unix(now), Ordering::Relaxed);
        }
        Ok(id)
    }

    /// Writes the last uses newer than what the database holds.
    pub fn flush_last_used(&self) -> Result<(), KeyStoreError> {
        let stale: Vec<(Arc<Entry>, u64)> = self
            .map()
            .values()
            .filter_map(|e| {
                let used = e.last_used.load(Ordering::Relaxed);
                (used > e.persisted.load(Ordering::Relaxed)).then(|| (e.clone(), used))
            })
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(KEYS)?;
            for (e, used) in &stale {
                let id = e.info.access_key_id.as_str();
                let Some(bytes) = table.get(id)?.map(|v| v.value().to_vec()) else {
                    continue; // removed meanwhile
                };
                let mut rec: Record =
                    serde_json::from_slice(&bytes).map_err(|source| KeyStoreError::Corrupt {
                        id: id.to_string(),
                        source,
                    })?;
                rec.info.last_used = rfc3339(*used);
                let bytes = serde_json::to_vec(&rec).expect("records serialize");
                table.insert(id, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        for (e, used) in stale {
            e.persisted.fetch_max(used, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Entry {
    fn current_info(&self) -> KeyInfo {
        let mut info = self.info.clone();
        let used = self.last_used.load(Ordering::Relaxed);
        if used > 0 {
            info.last_used = rfc3339(used);
        }
        info
    }
}

impl Drop for KeyStore {
    fn drop(&mut self) {
        if let Err(e) = self.flush_last_used() {
            tracing::warn!("writing the access keys' last uses: {e}");
        }
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn patterns_and_scopes() {
        for (p, n, want) in [
            ("*", "anything", true),
            ("orders-*", "orders-eu", true),
            ("orders-*", "orders-", true),
            ("orders-*", "billing", false),
            ("*-prod", "api-prod", true),
            ("*-prod", "api-prod-2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(matches_pattern(p, n), want, "{p} vs {n}");
        }
        let k = KeyInfo {
            access_key_id: "FNLTAAAAAAAAAAAAAAAA".into(),
            description: String::new(),
            created_at: String::new(),
            last_used: None,
            scope: Scope::Invoke,
            functions: vec!["orders-*".into()],
        };
        assert!(k.allows(Scope::Invoke, Some("orders-eu")));
        assert!(!k.allows(Scope::Invoke, Some("billing")));
        assert!(!k.allows(Scope::Deploy, Some("orders-eu")));
        assert!(!k.allows(Scope::Invoke, None));
        let admin = KeyInfo {
            scope: Scope::Admin,
            functions: Vec::new(),
            ..k
        };
        assert!(admin.allows(Scope::Deploy, None));
        // Keys stored before scopes were admin keys for every function.
        let old: KeyInfo = serde_json::from_str(
            r#"{"access_key_id":"FNLTAAAAAAAAAAAAAAAA","description":"","created_at":"","last_used":null}"#,
        )
        .unwrap();
        assert_eq!(old.scope, Scope::Admin);
        assert!(old.functions.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::HeaderValue;

    use super::*;

    fn signed_request(id: &str, secret: &str, now: SystemTime) -> (Method, Uri, HeaderMap) {
        let uri: Uri = "/2015-03-31/functions/hello/invocations".parse().unwrap();
        let date = sigv4::format_amz_date(now);
        let cred = sigv4::Credential {
            access_key_id: id.into(),
            date: date[..8].into(),
            region: "eu-west-1".into(),
            service: "lambda".into(),
        };
        let claim = sigv4::Claim {
            form: sigv4::Form::Header,
            credential: cred.clone(),
            amz_date: date.clone(),
            time: now,
            signed_headers: vec!["host".into(), "x-amz-date".into()],
            signature: None,
        };
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:8740"));
        h.insert("x-amz-date", HeaderValue::from_str(&date).unwrap());
        let cr =
            sigv4::canonical_request(&claim, &Method::POST, &uri, &h, sigv4::Payload::Body(b"{}"))
                .unwrap();
        let key = sigv4::signing_key(secret, &cred.date, &cred.region, "lambda");
        let sig = sigv4::signature(&key, &sigv4::string_to_sign(&date, &cred, &cr));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={id}/{}, SignedHeaders=host;x-amz-date, Signature={}",
            cred.scope(),
            hex::encode(sig)
        );
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        (Method::POST, uri, h)
    }

    fn files_contain(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut hits = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let data = fs::read(&p).unwrap();
                if data.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
        hits
    }

    #[test]
    fn ids_and_secrets_look_like_aws() {
        for _ in 0..50 {
            let id = new_id().unwrap();
            assert!(valid_id(&id), "{id}");
            let s = new_secret().unwrap();
            assert_eq!(s.expose().len(), SECRET_LEN);
            assert!(s.expose().bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        assert_ne!(new_id().unwrap(), new_id().unwrap());
        assert!(!valid_id("FNLT0000000000000000"));
        assert!(!valid_id("AKIAAAAAAAAAAAAAAAAA"));
        assert!(!valid_id("FNLTAAAA"));
        assert_eq!(format!("{:?}", new_secret().unwrap()), "Secret(<redacted>)");
    }

    #[test]
    fn create_list_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.list().unwrap(), vec![]);
        let (a, sa) = ks.create("ci").unwrap();
        let (b, _) = ks.create("").unwrap();
        assert_eq!(a.description, "ci");
        assert_eq!(a.last_used, None);
        let ids: Vec<String> = ks
            .list()
            .unwrap()
            .into_iter()
            .map(|k| k.access_key_id)
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&a.access_key_id) && ids.contains(&b.access_key_id));
        assert_eq!(ks.secret(&a.access_key_id).unwrap().expose(), sa.expose());

        // The master key is private, and no secret is on disk in clear.
        let mode = fs::metadata(dir.path().join(MASTER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read(dir.path().join(MASTER_KEY_FILE)).unwrap().len(),
            32
        );
        drop(ks);
        assert_eq!(
            files_contain(dir.path(), sa.expose().as_bytes()),
            Vec::<PathBuf>::new()
        );

        // Reopened: the same keys, the secret opens again.
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.secret(&a.access_key_id).unwrap().expose(), sa.expose());
        ks.remove(&b.access_key_id).unwrap();
        assert!(matches!(
            ks.remove(&b.access_key_id),
            Err(KeyStoreError::NotFound(_))
        ));
        assert!(ks.secret(&b.access_key_id).is_none());
        drop(ks);
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.list().unwrap().len(), 1);
        assert!(ks.get(&b.access_key_id).is_none());
    }

    #[test]
    fn descriptions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        assert!(matches!(
            ks.create("two\nlines"),
            Err(KeyStoreError::BadDescription(_))
        ));
        assert!(matches!(
            ks.create(&"x".repeat(MAX_DESCRIPTION + 1)),
            Err(KeyStoreError::BadDescription(_))
        ));
        ks.create(&"é".repeat(MAX_DESCRIPTION)).unwrap();
    }

    #[test]
    fn a_sealed_secret_is_bound_to_its_id_and_the_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let (a, secret) = ks.create("a").unwrap();
        let sealed = ks.seal(&a.access_key_id, &secret).unwrap();
        assert!(ks.unseal(&a.access_key_id, &sealed).is_some());
        assert!(ks.unseal("FNLTAAAAAAAAAAAAAAAA", &sealed).is_none());
        let mut flipped = hex::decode(&sealed).unwrap();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(ks.unseal(&a.access_key_id, &hex::encode(flipped)).is_none());
        drop(ks);

        // Another master key: the key is still listed, and lets nobody in.
        fs::write(dir.path().join(MASTER_KEY_FILE), [7u8; 32]).unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.list().unwrap().len(), 1);
        assert!(ks.secret(&a.access_key_id).is_none());
        let now = SystemTime::now();
        let (m, uri, h) = signed_request(&a.access_key_id, secret.expose(), now);
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{}", now),
            Err(AuthError::UnknownKey)
        );
        ks.remove(&a.access_key_id).unwrap();
    }

    #[test]
    fn the_cluster_sealer_opens_only_its_own_sealed_secrets() {
        let secret = new_secret().unwrap();
        let cluster = Sealer::cluster(&[1u8; 32]);
        let sealed = cluster.seal("FNLTAAAAAAAAAAAAAAAA", &secret).unwrap();
        // Nonce, the 40 bytes, the tag; a fresh nonce each time.
        assert_eq!(sealed.len(), NONCE_LEN + SECRET_LEN + 16);
        assert_ne!(
            sealed,
            cluster.seal("FNLTAAAAAAAAAAAAAAAA", &secret).unwrap()
        );
        assert!(
            !sealed
                .windows(8)
                .any(|w| w == &secret.expose().as_bytes()[..8])
        );
        let opened = cluster.unseal("FNLTAAAAAAAAAAAAAAAA", &sealed).unwrap();
        assert_eq!(opened.expose(), secret.expose());
        // Another id, another cluster's key, the same key used as a host's master key, cut
        // or altered bytes: nothing opens.
        assert!(cluster.unseal("FNLTBBBBBBBBBBBBBBBB", &sealed).is_none());
        assert!(
            Sealer::cluster(&[2u8; 32])
                .unseal("FNLTAAAAAAAAAAAAAAAA", &sealed)
                .is_none()
        );
        assert!(
            Sealer::host(&[1u8; 32])
                .unseal("FNLTAAAAAAAAAAAAAAAA", &sealed)
                .is_none()
        );
        assert!(
            cluster
                .unseal("FNLTAAAAAAAAAAAAAAAA", &sealed[..8])
                .is_none()
        );
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(cluster.unseal("FNLTAAAAAAAAAAAAAAAA", &flipped).is_none());
        assert_eq!(format!("{cluster:?}"), "Sealer(..)");
    }

    #[test]
    fn a_key_file_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.key");
        assert!(read_key_file(&path, "hint").unwrap().is_none());
        let made = read_or_make_key_file(&path, "a key", "hint").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(*read_key_file(&path, "hint").unwrap().unwrap(), *made);
        assert_eq!(
            *read_or_make_key_file(&path, "a key", "hint").unwrap(),
            *made
        );
        write_key_file(&path, &[9u8; 32]).unwrap();
        assert_eq!(*read_key_file(&path, "hint").unwrap().unwrap(), [9u8; 32]);
        fs::write(&path, [1u8; 31]).unwrap();
        let err = read_key_file(&path, "restore it").unwrap_err();
        assert!(
            err.to_string()
                .contains("31 bytes, expected 32 (restore it)"),
            "{err}"
        );
    }

    #[test]
    fn keys_from_the_cluster_are_imported_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let secret = new_secret().unwrap();
        let info = KeyInfo {
            access_key_id: "FNLTCCCCCCCCCCCCCCCC".into(),
            description: "made on another host".into(),
            created_at: rfc3339_ms(1_764_806_400_123),
            last_used: None,
            scope: Scope::Admin,
            functions: Vec::new(),
        };
        assert_eq!(info.created_at, "2025-12-04T00:00:00.123Z");
        // Fixed width, so that the strings sort as the times do (".1Z" sorted after ".15Z").
        assert_eq!(rfc3339_ms(1_764_806_400_100), "2025-12-04T00:00:00.100Z");
        assert_eq!(rfc3339_ms(1_764_806_401_000), "2025-12-04T00:00:01.000Z");
        assert_eq!(created_ms(&info), 1_764_806_400_123);
        assert!(ks.import(&info, &secret).unwrap());
        // The same again changes nothing.
        assert!(!ks.import(&info, &secret).unwrap());
        let now = SystemTime::now();
        let (m, uri, h) = signed_request(&info.access_key_id, secret.expose(), now);
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{}", now),
            Ok(info.access_key_id.clone())
        );
        // A new description replaces the old, and the use seen here is kept.
        let renamed = KeyInfo {
            description: "renamed".into(),
            ..info.clone()
        };
        assert!(ks.import(&renamed, &secret).unwrap());
        let got = ks.get(&info.access_key_id).unwrap();
        assert_eq!(got.description, "renamed");
        assert_eq!(got.last_used, rfc3339(unix(now)));
        assert_eq!(ks.with_secrets().len(), 1);
        // Sealed on disk with this host's master key, never in clear: it survives a reopen.
        drop(ks);
        assert_eq!(
            files_contain(dir.path(), secret.expose().as_bytes()),
            Vec::<PathBuf>::new()
        );
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(
            ks.secret(&info.access_key_id).unwrap().expose(),
            secret.expose()
        );
        assert!(ks.forget(&info.access_key_id).unwrap());
        assert!(!ks.forget(&info.access_key_id).unwrap());
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{}", now),
            Err(AuthError::UnknownKey)
        );
        // A description a host would refuse is refused from the cluster too.
        let bad = KeyInfo {
            description: "a\nb".into(),
            ..info
        };
        assert!(matches!(
            ks.import(&bad, &secret),
            Err(KeyStoreError::BadDescription(_))
        ));
    }

    #[test]
    fn a_bad_master_key_is_refused_and_a_loose_one_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        fs::write(&path, b"short").unwrap();
        assert!(matches!(
            KeyStore::open(dir.path()),
            Err(KeyStoreError::KeyLength { len: 5, .. })
        ));
        fs::write(&path, [1u8; 32]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        KeyStore::open(dir.path()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn verify_lets_in_the_right_secret_and_records_the_use() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let (a, secret) = ks.create("a").unwrap();
        let now = SystemTime::now();
        let (m, uri, h) = signed_request(&a.access_key_id, secret.expose(), now);
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{}", now),
            Ok(a.access_key_id.clone())
        );
        let digest: [u8; 32] =
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(b"{}")).into();
        assert_eq!(
            ks.verify_sha256(&m, &uri, &h, &digest, now),
            Ok(a.access_key_id.clone())
        );
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{ }", now),
            Err(AuthError::SignatureMismatch)
        );
        let later = now + Duration::from_secs(600);
        assert!(matches!(
            ks.verify(&m, &uri, &h, b"{}", later),
            Err(AuthError::Expired { .. })
        ));
        // Signed with a secret that is not the key's.
        let (m2, uri2, h2) = signed_request(&a.access_key_id, "not the secret", now);
        assert_eq!(
            ks.verify(&m2, &uri2, &h2, b"{}", now),
            Err(AuthError::SignatureMismatch)
        );
        // A key that does not exist (or no longer does).
        let (m3, uri3, h3) = signed_request("FNLTAAAAAAAAAAAAAAAA", secret.expose(), now);
        assert_eq!(
            ks.verify(&m3, &uri3, &h3, b"{}", now),
            Err(AuthError::UnknownKey)
        );

        let listed = ks.list().unwrap();
        assert_eq!(listed[0].last_used, rfc3339(unix(now)));
        drop(ks);
        // Written out: it survives a restart.
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.list().unwrap()[0].last_used, rfc3339(unix(now)));
        ks.remove(&a.access_key_id).unwrap();
        assert_eq!(
            ks.verify(&m, &uri, &h, b"{}", now),
            Err(AuthError::UnknownKey)
        );
    }
}
