//! The function store: metadata in redb, bundles content-addressed on disk.
//!
//! Layout under the state dir:
//! - `fnlet.redb`: functions (name -> record) and versions ((name, version) -> record);
//! - `bundles/<sha256>/`: unpacked bundles, immutable, shared by versions with the same content;
//! - `staging/`: where uploads are unpacked before they are moved into `bundles/`.
//!
//! A deploy moves the bundle into place first and then commits one redb transaction that adds
//! the version and makes it active: a crash in between leaves the previous version serving and
//! an unreferenced bundle that the next start removes.
//!
//! Changes (deploy, rollback, remove, gc) go through [`Store::changes`], one at a time per
//! store: a collection that ran between a deploy's move and its commit would see an
//! unreferenced bundle and delete the version about to become active.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::bundle::Unpacked;
use crate::manifest::Manifest;

const FUNCTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("functions");
const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("versions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Lambda aliases ((function, alias) -> [`AliasRecord`]).
const ALIASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("aliases");
/// Lambda tags of a function (name -> JSON object of strings), set by the AWS tools.
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    /// The unprivileged uid (and gid) this function's instances run as.
    pub uid: u32,
    pub active: u64,
    pub next_version: u64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
    pub created_at: String,
    pub manifest: Manifest,
    /// The base64 sha256 of the archive it came from, when it came through the Lambda API
    /// (Lambda's `CodeSha256`); a new configuration keeps its code's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
}

/// A Lambda alias: a name for a version, optionally sending a share of calls to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub function: String,
    pub name: String,
    pub version: u64,
    #[serde(default)]
    pub description: String,
    /// Other versions and the share of calls each gets (0-1); the rest go to `version`.
    #[serde(default)]
    pub weights: BTreeMap<u64, f64>,
    /// Changes with every update (Lambda's RevisionId).
    pub revision: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no function named {0:?}")]
    NotFound(String),
    #[error("{name} has no version {version}")]
    NoSuchVersion { name: String, version: u64 },
    #[error("{0} has no earlier version to roll back to")]
    NothingToRollBack(String),
    /// Named relative to the state dir: callers of a function see this too.
    #[error(
        "{name} version {version} cannot run: its bundle (bundles/{sha256} in the agent's state \
         dir) is missing; redeploy it"
    )]
    BundleMissing {
        name: String,
        version: u64,
        sha256: String,
    },
    #[error(
        "version {version} is the one {name} runs: deploy another first, or remove the function"
    )]
    ActiveVersion { name: String, version: u64 },
    #[error("{name} has no alias {alias:?}")]
    NoSuchAlias { name: String, alias: String },
    #[error("{name} has an alias {alias:?} already")]
    AliasExists { name: String, alias: String },
    #[error(
        "version {version} of {name} is used by the alias {alias:?}: change or delete the alias first"
    )]
    VersionInUse {
        name: String,
        version: u64,
        alias: String,
    },
    #[error("no free uid left in the configured range")]
    UidsExhausted,
    #[error("metadata store: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record for {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("bundle store: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! db_err {
    ($($t:ty),*) => { $(impl From<$t> for StoreError { fn from(e: $t) -> Self { StoreError::Db(e.into()) } })* };
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub struct Store {
    db: Database,
    dir: PathBuf,
    uid_base: u32,
    uid_count: u32,
    /// Held by [`Changes`].
    changing: Mutex<()>,
}

/// The right to change the store, one holder at a time (see [`Store::changes`]). Reads go
/// through it too (it derefs to the [`Store`]); they never wait for it.
pub struct Changes<'a> {
    store: &'a Store,
    _held: MutexGuard<'a, ()>,
}

impl Deref for Changes<'_> {
    type Target = Store;

    fn deref(&self) -> &Store {
        self.store
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.into(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Store {
    pub fn open(state_dir: &Path, uid_base: u32, uid_count: u32) -> Result<Store, StoreError> {
        for d in ["bundles", "staging"] {
            fs::create_dir_all(state_dir.join(d))?;
        }
        let db = Database::create(state_dir.join("fnlet.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(FUNCTIONS)?;
        txn.open_table(VERSIONS)?;
        txn.open_table(META)?;
        txn.open_table(TAGS)?;
        txn.open_table(ALIASES)?;
        txn.commit()?;
        Ok(Store {
            db,
            dir: state_dir.to_path_buf(),
            uid_base,
            uid_count,
            changing: Mutex::new(()),
        })
    }

    /// Waits for the right to change the store. Hold it across a change and whatever must see
    /// that change alone: a deploy's move and record, making the result the version that runs,
    /// and the collection after it.
    pub fn changes(&self) -> Changes<'_> {
        Changes {
            store: self,
            // The guarded data is (): a holder that panicked left nothing half-changed here
            // (redb transactions roll back), so a poisoned lock is taken as it is.
            _held: self.changing.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// A fresh empty directory to unpack an upload into.
    pub fn staging_dir(&self) -> Result<tempfile::TempDir, StoreError> {
        Ok(tempfile::Builder::new()
            .prefix("upload-")
            .tempdir_in(self.dir.join("staging"))?)
    }

    pub fn bundle_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("bundles").join(sha256)
    }

    pub fn function(&self, name: &str) -> Result<FunctionRecord, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FUNCTIONS)?;
        let g = t
            .get(name)?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        decode(name, g.value())
    }

    pub fn version(&self, name: &str, version: u64) -> Result<VersionRecord, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(VERSIONS)?;
        let g = t
            .get((name, version))?
            .ok_or_else(|| StoreError::NoSuchVersion {
                name: name.into(),
                version,
            })?;
        decode(name, g.value())
    }

    /// Every function with its active version.
    pub fn list(&self) -> Result<Vec<(FunctionRecord, VersionRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let functions = txn.open_table(FUNCTIONS)?;
        let versions = txn.open_table(VERSIONS)?;
        let mut out = Vec::new();
        for item in functions.iter()? {
            let (k, v) = item?;
            let rec: FunctionRecord = decode(k.value(), v.value())?;
            let g = versions
                .get((rec.name.as_str(), rec.active))?
                .ok_or_else(|| StoreError::NoSuchVersion {
                    name: rec.name.clone(),
                    version: rec.active,
                })?;
            let ver = decode(k.value(), g.value())?;
            out.push((rec, ver));
        }
        Ok(out)
    }

    /// Versions of `name`, newest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StoreError> {
        self.function(name)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(VERSIONS)?;
        let mut out = Vec::new();
        for item in t.range((name, 0)..=(name, u64::MAX))? {
            let (_, v) = item?;
            out.push(decode(name, v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// The function's aliases, by name.
    pub fn aliases(&self, name: &str) -> Result<Vec<AliasRecord>, StoreError> {
        self.function(name)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ALIASES)?;
        let mut out = Vec::new();
        for item in t.range((name, "")..)? {
            let (k, v) = item?;
            if k.value().0 != name {
                break;
            }
            out.push(decode(name, v.value())?);
        }
        Ok(out)
    }

    pub fn alias(&self, name: &str, alias: &str) -> Result<AliasRecord, StoreError> {
        self.function(name)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ALIASES)?;
        let g = t
            .get((name, alias))?
            .ok_or_else(|| StoreError::NoSuchAlias {
                name: name.into(),
                alias: alias.into(),
            })?;
        decode(name, g.value())
    }

    /// The function's Lambda tags.
    pub fn tags(&self, name: &str) -> Result<BTreeMap<String, String>, StoreError> {
        self.function(name)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TAGS)?;
        match t.get(name)? {
            Some(g) => decode(name, g.value()),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Removes half-finished uploads (called at start, when no upload can be running).
    pub fn clear_staging(&self) -> Result<(), StoreError> {
        for e in fs::read_dir(self.dir.join("staging"))? {
            let p = e?.path();
            if p.is_dir() {
                fs::remove_dir_all(p)?
            } else {
                fs::remove_file(p)?
            }
        }
        Ok(())
    }
}

impl Changes<'_> {
    /// Records a new version from an unpacked upload and makes it active.
    pub fn deploy(&self, unpacked: &Unpacked) -> Result<VersionRecord, StoreError> {
        self.deploy_code(unpacked, &unpacked.manifest, None)
    }

    /// [`Changes::deploy`] with the manifest the Lambda API settled on (`manifest`, the
    /// bundle's own or one made from the call's fields) and the archive's `CodeSha256`.
    pub fn deploy_code(
        &self,
        unpacked: &Unpacked,
        manifest: &Manifest,
        code_sha256: Option<String>,
    ) -> Result<VersionRecord, StoreError> {
        self.keep_bundle(unpacked)?;
        self.record(
            manifest,
            &unpacked.sha256,
            unpacked.size_bytes,
            None,
            code_sha256,
        )
    }

    /// Records a new version of `name` running the active version's code with `manifest`
    /// (UpdateFunctionConfiguration), and makes it active.
    pub fn configure(&self, name: &str, manifest: &Manifest) -> Result<VersionRecord, StoreError> {
        let rec = self.function(name)?;
        let v = self.version(name, rec.active)?;
        if !self.bundle_path(&v.sha256).is_dir() {
            return Err(StoreError::BundleMissing {
                name: name.into(),
                version: v.version,
                sha256: v.sha256,
            });
        }
        self.record(manifest, &v.sha256, v.size_bytes, None, v.code_sha256)
    }

    /// Forgets version `version` of `name` (DeleteFunction with a qualifier); never the
    /// active one.
    pub fn remove_version(&self, name: &str, version: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let functions = txn.open_table(FUNCTIONS)?;
            let rec: FunctionRecord = {
                let g = functions
                    .get(name)?
                    .ok_or_else(|| StoreError::NotFound(name.into()))?;
                decode(name, g.value())?
            };
            if rec.active == version {
                return Err(StoreError::ActiveVersion {
                    name: name.into(),
                    version,
                });
            }
            for item in txn.open_table(ALIASES)?.range((name, "")..)? {
                let (k, v) = item?;
                if k.value().0 != name {
                    break;
                }
                let a: AliasRecord = decode(name, v.value())?;
                if a.version == version || a.weights.contains_key(&version) {
                    return Err(StoreError::VersionInUse {
                        name: name.into(),
                        version,
                        alias: a.name,
                    });
                }
            }
            let mut versions = txn.open_table(VERSIONS)?;
            if versions.remove((name, version))?.is_none() {
                return Err(StoreError::NoSuchVersion {
                    name: name.into(),
                    version,
                });
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records version `version` of a function as the cluster's catalog says it is (deployed
    /// on another host) and makes it active. `unpacked` is its bundle, when it had to be
    /// fetched; without it the bundle must be here already. A version of that number holding
    /// other content (concurrent deploys in a partition, the other one won) is replaced.
    pub fn import(
        &self,
        manifest: &Manifest,
        sha256: &str,
        size_bytes: u64,
        version: u64,
        unpacked: Option<&Unpacked>,
    ) -> Result<VersionRecord, StoreError> {
        if let Some(u) = unpacked {
            self.keep_bundle(u)?;
        }
        if !self.bundle_path(sha256).is_dir() {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("bundles/{sha256} is not here"),
            )));
        }
        self.record(manifest, sha256, size_bytes, Some(version), None)
    }

    /// Moves an unpacked bundle into `bundles/` (unless that content is there already).
    fn keep_bundle(&self, unpacked: &Unpacked) -> Result<(), StoreError> {
        let dest = self.bundle_path(&unpacked.sha256);
        if !dest.exists() {
            fs::rename(&unpacked.root, &dest)?;
            // The rename must be durable before the metadata points at it.
            fs::File::open(self.dir.join("bundles"))?.sync_all()?;
        }
        Ok(())
    }

    /// Records a version (the next number, or `version`) and makes it active.
    fn record(
        &self,
        manifest: &Manifest,
        sha256: &str,
        size_bytes: u64,
        version: Option<u64>,
        code_sha256: Option<String>,
    ) -> Result<VersionRecord, StoreError> {
        let name = manifest.name.as_str();
        let now = now_rfc3339();
        let txn = self.db.begin_write()?;
        let version = {
            let mut functions = txn.open_table(FUNCTIONS)?;
            let mut meta = txn.open_table(META)?;
            let existing = functions
                .get(name)?
                .map(|g| decode::<FunctionRecord>(name, g.value()))
                .transpose()?;
            let mut rec = match existing {
                Some(r) => r,
                None => {
                    let n = meta.get("next_uid")?.map(|g| g.value()).unwrap_or(0);
                    if n >= u64::from(self.uid_count) {
                        return Err(StoreError::UidsExhausted);
                    }
                    meta.insert("next_uid", n + 1)?;
                    FunctionRecord {
                        name: name.into(),
                        uid: self.uid_base + n as u32,
                        active: 0,
                        next_version: 1,
                        created_at: now.clone(),
                        updated_at: now.clone(),
                    }
                }
            };
            let number = version.unwrap_or(rec.next_version);
            let v = VersionRecord {
                name: name.into(),
                version: number,
                sha256: sha256.to_string(),
                size_bytes,
                created_at: now.clone(),
                manifest: manifest.clone(),
                code_sha256,
            };
            rec.active = v.version;
            rec.next_version = rec.next_version.max(number.saturating_add(1));
            rec.updated_at = now;
            txn.open_table(VERSIONS)?
                .insert((name, v.version), encode(&v).as_slice())?;
            functions.insert(name, encode(&rec).as_slice())?;
            v
        };
        txn.commit()?;
        Ok(version)
    }

    /// Makes `to` (default: the newest version before the active one) active.
    pub fn rollback(&self, name: &str, to: Option<u64>) -> Result<VersionRecord, StoreError> {
        let txn = self.db.begin_write()?;
        let v = {
            let mut functions = txn.open_table(FUNCTIONS)?;
            let versions = txn.open_table(VERSIONS)?;
            let mut rec: FunctionRecord = {
                let g = functions
                    .get(name)?
                    .ok_or_else(|| StoreError::NotFound(name.into()))?;
                decode(name, g.value())?
            };
            let target = match to {
                Some(t) => t,
                None => {
                    let mut prev = versions.range((name, 0)..(name, rec.active))?;
                    let Some(last) = prev.next_back() else {
                        return Err(StoreError::NothingToRollBack(name.into()));
                    };
                    last?.0.value().1
                }
            };
            let g = versions
                .get((name, target))?
                .ok_or_else(|| StoreError::NoSuchVersion {
                    name: name.into(),
                    version: target,
                })?;
            let v: VersionRecord = decode(name, g.value())?;
            if !self.bundle_path(&v.sha256).is_dir() {
                return Err(StoreError::BundleMissing {
                    name: name.into(),
                    version: target,
                    sha256: v.sha256,
                });
            }
            rec.active = target;
            rec.updated_at = now_rfc3339();
            drop(g);
            functions.insert(name, encode(&rec).as_slice())?;
            v
        };
        txn.commit()?;
        Ok(v)
    }

    /// Creates (`create`) or replaces an alias; the versions it names must exist.
    pub fn put_alias(&self, a: &AliasRecord, create: bool) -> Result<(), StoreError> {
        let name = a.function.as_str();
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(FUNCTIONS)?.get(name)?.is_none() {
                return Err(StoreError::NotFound(name.into()));
            }
            let versions = txn.open_table(VERSIONS)?;
            for v in std::iter::once(a.version).chain(a.weights.keys().copied()) {
                if versions.get((name, v))?.is_none() {
                    return Err(StoreError::NoSuchVersion {
                        name: name.into(),
                        version: v,
                    });
                }
            }
            let mut t = txn.open_table(ALIASES)?;
            let exists = t.get((name, a.name.as_str()))?.is_some();
            match (create, exists) {
                (true, true) => {
                    return Err(StoreError::AliasExists {
                        name: name.into(),
                        alias: a.name.clone(),
                    });
                }
                (false, false) => {
                    return Err(StoreError::NoSuchAlias {
                        name: name.into(),
                        alias: a.name.clone(),
                    });
                }
                _ => {}
            }
            t.insert((name, a.name.as_str()), encode(a).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn remove_alias(&self, name: &str, alias: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(ALIASES)?;
            if t.remove((name, alias))?.is_none() {
                return Err(StoreError::NoSuchAlias {
                    name: name.into(),
                    alias: alias.into(),
                });
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Adds `add` to the function's tags and removes the keys in `remove`.
    pub fn set_tags(
        &self,
        name: &str,
        add: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<BTreeMap<String, String>, StoreError> {
        let txn = self.db.begin_write()?;
        let tags = {
            if txn.open_table(FUNCTIONS)?.get(name)?.is_none() {
                return Err(StoreError::NotFound(name.into()));
            }
            let mut t = txn.open_table(TAGS)?;
            let mut tags: BTreeMap<String, String> = match t.get(name)? {
                Some(g) => decode(name, g.value())?,
                None => BTreeMap::new(),
            };
            tags.extend(add.iter().map(|(k, v)| (k.clone(), v.clone())));
            for k in remove {
                tags.remove(k);
            }
            t.insert(name, encode(&tags).as_slice())?;
            tags
        };
        txn.commit()?;
        Ok(tags)
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            txn.open_table(TAGS)?.remove(name)?;
            txn.open_table(ALIASES)?
                .retain_in((name, "")..=(name, "\u{10FFFF}"), |k, _| k.0 != name)?;
            let mut functions = txn.open_table(FUNCTIONS)?;
            if functions.remove(name)?.is_none() {
                return Err(StoreError::NotFound(name.into()));
            }
            let mut versions = txn.open_table(VERSIONS)?;
            versions.retain_in((name, 0)..=(name, u64::MAX), |_, _| false)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Forgets versions beyond the newest `retain` of each function (never the active one),
    /// then deletes bundles no version refers to, except those in `in_use`, and stale uploads.
    pub fn gc(&self, retain: u32, in_use: &HashSet<String>) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let functions = txn.open_table(FUNCTIONS)?;
            let mut versions = txn.open_table(VERSIONS)?;
            // Versions an alias names stay, however old.
            let mut aliased: HashSet<(String, u64)> = HashSet::new();
            for item in txn.open_table(ALIASES)?.iter()? {
                let (k, v) = item?;
                let a: AliasRecord = decode(k.value().0, v.value())?;
                aliased.insert((a.function.clone(), a.version));
                aliased.extend(a.weights.keys().map(|w| (a.function.clone(), *w)));
            }
            for item in functions.iter()? {
                let (k, v) = item?;
                let rec: FunctionRecord = decode(k.value(), v.value())?;
                let all: Vec<u64> = versions
                    .range((rec.name.as_str(), 0)..=(rec.name.as_str(), u64::MAX))?
                    .filter_map(|r| r.ok())
                    .map(|(k, _)| k.value().1)
                    .collect();
                let keep_from = all.len().saturating_sub(retain as usize);
                for &old in &all[..keep_from] {
                    if old != rec.active && !aliased.contains(&(rec.name.clone(), old)) {
                        versions.remove((rec.name.as_str(), old))?;
                    }
                }
            }
        }
        txn.commit()?;

        let mut referenced: HashSet<String> = in_use.clone();
        let txn = self.db.begin_read()?;
        for item in txn.open_table(VERSIONS)?.iter()? {
            let (k, v) = item?;
            let rec: VersionRecord = decode(k.value().0, v.value())?;
            referenced.insert(rec.sha256);
        }
        let mut removed = 0;
        for e in fs::read_dir(self.dir.join("bundles"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                fs::remove_dir_all(e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{
        self,
        tests::{LIMITS, tar_gz},
    };

    fn upload(store: &Store, name: &str, body: &str) -> VersionRecord {
        let manifest = format!("name = \"{name}\"\nentrypoint = \"run.sh\"\n");
        let bytes = tar_gz(&[
            (
                "fnlet.toml",
                tar::EntryType::Regular,
                manifest.as_bytes(),
                None,
            ),
            ("run.sh", tar::EntryType::Regular, body.as_bytes(), None),
        ]);
        let staging = store.staging_dir().unwrap();
        let u = bundle::unpack(&bytes, staging.path(), LIMITS).unwrap();
        store.changes().deploy(&u).unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 200_000, 10).unwrap();
        (dir, s)
    }

    #[test]
    fn configurations_versions_and_tags() {
        let (_d, s) = store();
        let v1 = upload(&s, "a", "v1");
        let mut m = v1.manifest.clone();
        m.memory_mb = Some(256);
        let v2 = s.changes().configure("a", &m).unwrap();
        // Same code, new configuration, a new active version.
        assert_eq!(v2.version, 2);
        assert_eq!(v2.sha256, v1.sha256);
        assert_eq!(v2.manifest.memory_mb, Some(256));
        assert_eq!(s.function("a").unwrap().active, 2);
        // The active version stays; another goes.
        assert!(matches!(
            s.changes().remove_version("a", 2),
            Err(StoreError::ActiveVersion { version: 2, .. })
        ));
        s.changes().remove_version("a", 1).unwrap();
        assert!(matches!(
            s.changes().remove_version("a", 1),
            Err(StoreError::NoSuchVersion { .. })
        ));
        assert_eq!(s.versions("a").unwrap().len(), 1);
        // Tags merge, are removed by key, and go with the function.
        let t = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        s.changes()
            .set_tags("a", &t(&[("x", "1"), ("y", "2")]), &[])
            .unwrap();
        let now = s
            .changes()
            .set_tags("a", &t(&[("y", "3")]), &["x".to_string()])
            .unwrap();
        assert_eq!(now, t(&[("y", "3")]));
        assert_eq!(s.tags("a").unwrap(), now);
        assert!(matches!(
            s.changes().set_tags("nope", &now, &[]),
            Err(StoreError::NotFound(_))
        ));
        s.changes().remove("a").unwrap();
        upload(&s, "a", "again");
        assert!(s.tags("a").unwrap().is_empty());
    }

    #[test]
    fn aliases_keep_their_versions() {
        let (_d, s) = store();
        for body in ["v1", "v2", "v3", "v4"] {
            upload(&s, "a", body);
        }
        let alias = AliasRecord {
            function: "a".into(),
            name: "live".into(),
            version: 1,
            description: String::new(),
            weights: [(2, 0.25)].into_iter().collect(),
            revision: "r".into(),
        };
        s.changes().put_alias(&alias, true).unwrap();
        assert!(matches!(
            s.changes().put_alias(&alias, true),
            Err(StoreError::AliasExists { .. })
        ));
        let missing = AliasRecord {
            version: 9,
            ..alias.clone()
        };
        assert!(matches!(
            s.changes().put_alias(&missing, false),
            Err(StoreError::NoSuchVersion { version: 9, .. })
        ));
        // Retention keeps the newest one and what the alias names.
        s.changes().gc(1, &HashSet::new()).unwrap();
        let kept: Vec<u64> = s.versions("a").unwrap().iter().map(|v| v.version).collect();
        assert_eq!(kept, vec![4, 2, 1]);
        assert!(matches!(
            s.changes().remove_version("a", 2),
            Err(StoreError::VersionInUse { version: 2, .. })
        ));
        assert_eq!(s.alias("a", "live").unwrap(), alias);
        s.changes().remove_alias("a", "live").unwrap();
        assert!(matches!(
            s.alias("a", "live"),
            Err(StoreError::NoSuchAlias { .. })
        ));
        s.changes().put_alias(&alias, true).unwrap();
        // Removing the function takes its aliases.
        s.changes().remove("a").unwrap();
        upload(&s, "a", "again");
        assert!(s.aliases("a").unwrap().is_empty());
    }

    #[test]
    fn deploy_versions_and_rollback() {
        let (_d, s) = store();
        assert_eq!(upload(&s, "a", "v1").version, 1);
        assert_eq!(upload(&s, "a", "v2").version, 2);
        assert_eq!(s.function("a").unwrap().active, 2);
        assert_eq!(s.changes().rollback("a", None).unwrap().version, 1);
        assert_eq!(s.function("a").unwrap().active, 1);
        assert!(matches!(
            s.changes().rollback("a", None),
            Err(StoreError::NothingToRollBack(_))
        ));
        assert_eq!(s.changes().rollback("a", Some(2)).unwrap().version, 2);
        assert!(matches!(
            s.changes().rollback("a", Some(9)),
            Err(StoreError::NoSuchVersion { .. })
        ));
        assert_eq!(
            s.versions("a")
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            vec![2, 1]
        );
    }

    #[test]
    fn no_rollback_onto_a_missing_bundle() {
        let (_d, s) = store();
        let v1 = upload(&s, "a", "1");
        upload(&s, "a", "2");
        fs::remove_dir_all(s.bundle_path(&v1.sha256)).unwrap();
        assert!(matches!(
            s.changes().rollback("a", Some(1)),
            Err(StoreError::BundleMissing { version: 1, .. })
        ));
        assert_eq!(s.function("a").unwrap().active, 2);
    }

    #[test]
    fn imports_take_the_clusters_version_number() {
        let (_d, s) = store();
        let v1 = upload(&s, "a", "1");
        let v2 = upload(&s, "a", "2");
        let changes = s.changes();
        // The cluster's version 7 of "a", with content already here.
        let v = changes
            .import(&v1.manifest, &v1.sha256, v1.size_bytes, 7, None)
            .unwrap();
        assert_eq!((v.version, s.function("a").unwrap().active), (7, 7));
        // Version 2 as another host won it: its record is replaced.
        let v = changes
            .import(&v1.manifest, &v1.sha256, v1.size_bytes, 2, None)
            .unwrap();
        assert_eq!(v.version, 2);
        assert_eq!(s.version("a", 2).unwrap().sha256, v1.sha256);
        assert_ne!(v2.sha256, v1.sha256);
        drop(changes);
        // Local deploys go on after the highest number seen.
        assert_eq!(upload(&s, "a", "3").version, 8);
        // Content that is not here cannot be imported without its bundle.
        assert!(
            s.changes()
                .import(&v1.manifest, &"0".repeat(64), 1, 9, None)
                .is_err()
        );
    }

    #[test]
    fn uids_are_per_function_and_bounded() {
        let (_d, s) = store();
        upload(&s, "a", "x");
        upload(&s, "b", "x");
        upload(&s, "a", "y");
        assert_eq!(s.function("a").unwrap().uid, 200_000);
        assert_eq!(s.function("b").unwrap().uid, 200_001);
    }

    #[test]
    fn identical_content_shares_a_bundle_and_gc_keeps_what_is_referenced() {
        let (d, s) = store();
        let v1 = upload(&s, "a", "same");
        let v2 = upload(&s, "a", "same");
        assert_eq!(v1.sha256, v2.sha256);
        for i in 0..5 {
            upload(&s, "a", &format!("body {i}"));
        }
        let removed = s.changes().gc(2, &HashSet::new()).unwrap();
        assert!(removed >= 1);
        let kept: Vec<u64> = s.versions("a").unwrap().iter().map(|v| v.version).collect();
        assert_eq!(kept, vec![7, 6]);
        assert_eq!(fs::read_dir(d.path().join("bundles")).unwrap().count(), 2);
    }

    #[test]
    fn gc_never_drops_the_active_version() {
        let (_d, s) = store();
        upload(&s, "a", "1");
        upload(&s, "a", "2");
        upload(&s, "a", "3");
        s.changes().rollback("a", Some(1)).unwrap();
        s.changes().gc(1, &HashSet::new()).unwrap();
        let kept: Vec<u64> = s.versions("a").unwrap().iter().map(|v| v.version).collect();
        assert_eq!(kept, vec![3, 1]);
    }

    #[test]
    fn remove_and_reopen() {
        let (d, s) = store();
        upload(&s, "a", "1");
        upload(&s, "b", "1");
        s.changes().remove("a").unwrap();
        assert!(matches!(s.function("a"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.changes().remove("a"),
            Err(StoreError::NotFound(_))
        ));
        drop(s);
        let s = Store::open(d.path(), 200_000, 10).unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
    }

    /// Deploys racing garbage collection: a bundle moved into place is recorded before any
    /// collection decides what is unreferenced, so no recorded version loses its bundle.
    #[test]
    fn deploys_racing_gc_keep_every_recorded_bundle() {
        let (_d, s) = store();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|t| {
            let deployers: Vec<_> = (0..3)
                .map(|w| {
                    let s = &s;
                    t.spawn(move || {
                        for i in 0..30 {
                            upload(s, &format!("f{w}"), &format!("{w} {i}"));
                        }
                    })
                })
                .collect();
            t.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    s.changes().gc(3, &HashSet::new()).unwrap();
                }
            });
            for d in deployers {
                d.join().unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        for (rec, _) in s.list().unwrap() {
            for v in s.versions(&rec.name).unwrap() {
                assert!(
                    s.bundle_path(&v.sha256).is_dir(),
                    "{} version {} lost its bundle",
                    v.name,
                    v.version
                );
            }
        }
    }

    #[test]
    fn a_bundle_moved_in_but_never_recorded_is_collected() {
        let (d, s) = store();
        upload(&s, "a", "1");
        fs::create_dir(d.path().join("bundles/deadbeef")).unwrap();
        assert_eq!(s.changes().gc(5, &HashSet::new()).unwrap(), 1);
    }
}
