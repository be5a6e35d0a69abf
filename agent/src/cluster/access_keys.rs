//! Access keys, cluster-wide: every key is a catalog entry (id, description, creation time, and
//! the secret sealed with the cluster's sealing key; a removal is a tombstone), and each host
//! makes its own key store, which SigV4 verification reads, hold what the catalog says.
//!
//! The sealing key is 32 random bytes in `<state dir>/cluster/keys.key` (0600). The host that
//! runs `fnlet cluster init` makes it (when its node starts: a CA holder from before this key
//! existed gets one too); a joiner gets it in the JoinResponse and keeps it, so restarts need
//! nothing. A host that joined before the key existed has none: its keys stay its own.
//!
//! `fnlet keys create` on any host makes the key in that host's store and publishes it; `rm`
//! removes it there and writes a tombstone. Both are pushed to every live peer at once and
//! reach the rest by digest swaps (when a member comes up, and every `SYNC_EVERY`). A host
//! applying a change opens the secret with the cluster's key and imports it into its store, or
//! forgets the key. What the catalog holds now decides, not the change that woke the task, so
//! changes applied out of order end as the catalog does. Keys a host made before it joined or
//! ran init (absent from the catalog) are published when it attaches.

use std::sync::Arc;

use fnlet_cluster::catalog::{AccessKeyRecord, Key};
use fnlet_cluster::frame::SealingKey;

use super::node::{ClusterError, Node};
use super::pki::ClusterDir;
use super::replica::now;
use crate::api::App;
use crate::auth::keys::{self, KeyInfo, Sealer, Secret};

/// What to do about a sealing key file of the wrong length.
const HINT: &str = "copy cluster/keys.key from another member of the cluster";

/// The cluster's sealer, from `cluster/keys.key`; made there on the CA holder if missing.
/// `None` on a member without one (it joined before the key existed).
pub(super) fn open_sealer(dir: &ClusterDir) -> Result<Option<Sealer>, ClusterError> {
    let path = dir.sealing_key();
    let key = if dir.is_ca_holder() {
        Some(keys::read_or_make_key_file(
            &path,
            "the cluster's access key sealing key",
            HINT,
        )?)
    } else {
        keys::read_key_file(&path, HINT)?
    };
    if key.is_none() {
        tracing::warn!(
            path = %path.display(),
            "this host joined the cluster before access keys were the cluster's: its keys stay \
             its own, and keys made elsewhere do not work here (copy cluster/keys.key from \
             another member and restart to share them)"
        );
    }
    Ok(key.map(|k| Sealer::cluster(&k)))
}

/// Keeps the sealing key a join's answer carried (0600).
pub(super) fn store_sealing_key(dir: &ClusterDir, key: &SealingKey) -> Result<(), ClusterError> {
    keys::write_key_file(&dir.sealing_key(), key.expose())?;
    Ok(())
}

impl Node {
    /// Whether access keys are the cluster's on this host.
    pub fn shares_keys(&self) -> bool {
        self.sealer.is_some()
    }

    /// The sealing key, for a joiner's answer (on the CA holder).
    pub(super) fn sealing_key_for_joiner(&self) -> Result<SealingKey, String> {
        let key = keys::read_key_file(&self.dir.sealing_key(), HINT)
            .map_err(|e| e.to_string())?
            .ok_or("this host holds no access key sealing key (cluster/keys.key)")?;
        Ok(SealingKey::new(*key))
    }

    /// A key made on this host: written to the catalog, its secret sealed with the cluster's
    /// key, and pushed to the peers.
    pub fn key_created(self: &Arc<Self>, info: &KeyInfo, secret: &Secret) {
        let Some(sealer) = &self.sealer else { return };
        let id = info.access_key_id.as_str();
        let delta = {
            let mut catalog = self.replica.lock();
            let written =
                sealer
                    .seal(id, secret)
                    .map_err(|e| e.to_string())
                    .and_then(|sealed_secret| {
                        let record = AccessKeyRecord {
                            sealed_secret,
                            description: info.description.clone(),
                            created_ms: keys::created_ms(info),
                            scope: (info.scope != keys::Scope::Admin)
                                .then(|| info.scope.as_str().to_string()),
                            functions: info.functions.clone(),
                        };
                        catalog
                            .put_access_key(id, record, now())
                            .map_err(|e| e.to_string())
                    });
            match written {
                Ok(d) => {
                    self.replica.save(&catalog);
                    d
                }
                Err(e) => {
                    tracing::error!(access_key_id = id, "not published to the cluster: {e}");
                    return;
                }
            }
        };
        self.push(delta);
    }

    /// A key removed on this host (`here`: it was in this host's store): a tombstone written
    /// and pushed if the catalog holds the key or this host had it. Returns whether the
    /// catalog held it.
    pub fn key_removed(self: &Arc<Self>, id: &str, here: bool) -> bool {
        if self.sealer.is_none() {
            return false;
        }
        let (known, delta) = {
            let mut catalog = self.replica.lock();
            let known = catalog.access_key(id).is_some();
            if !known && !here {
                return false;
            }
            match catalog.remove_access_key(id, now()) {
                Ok(d) => {
                    self.replica.save(&catalog);
                    (known, d)
                }
                Err(e) => {
                    tracing::error!(
                        access_key_id = id,
                        "removal not published to the cluster: {e}"
                    );
                    return known;
                }
            }
        };
        self.push(delta);
        known
    }

    /// At attach: keys this host made before it was in the cluster are published, and its
    /// store is made to hold every key the catalog holds (and none it removed).
    pub(super) fn attach_keys(self: &Arc<Self>, app: &Arc<App>) {
        if self.sealer.is_none() {
            return;
        }
        let mine = app.keys.with_secrets();
        let unpublished: Vec<(KeyInfo, Secret)> = {
            let catalog = self.replica.lock();
            mine.into_iter()
                .filter(|(info, _)| {
                    catalog
                        .version(&Key::AccessKey(info.access_key_id.clone()))
                        .is_none()
                })
                .collect()
        };
        for (info, secret) in &unpublished {
            tracing::info!(access_key_id = %info.access_key_id, "published an access key made before this host was in the cluster");
            self.key_created(info, secret);
        }
        let ids: Vec<String> = self
            .replica
            .lock()
            .entries()
            .filter_map(|e| match e.key {
                Key::AccessKey(id) => Some(id),
                Key::Function(_) => None,
            })
            .collect();
        for id in ids {
            self.sync_key(app, &id);
        }
    }

    /// A change to access key `id` from a peer: the store made to match, off the runtime.
    pub(super) async fn reconcile_key(self: &Arc<Self>, id: &str) {
        let Some(app) = self.replica.app() else {
            return;
        };
        let (node, id) = (self.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || node.sync_key(&app, &id)).await;
    }

    /// At each sync tick: keys the catalog holds that this host's store lacks, and removed
    /// ones it still holds, are made to match again, so a failed import or removal (a full
    /// disk, say) is not left for good.
    pub(super) async fn retry_keys(self: &Arc<Self>) {
        if self.sealer.is_none() {
            return;
        }
        let Some(app) = self.replica.app() else {
            return;
        };
        let behind: Vec<String> = {
            let catalog = self.replica.lock();
            let missing = catalog
                .access_keys()
                .filter(|(id, _)| app.keys.get(id).is_none())
                .map(|(id, _)| id.to_string());
            let removed = app.keys.ids().into_iter().filter(|id| {
                let key = Key::AccessKey(id.clone());
                catalog.version(&key).is_some() && catalog.get(&key).is_none()
            });
            missing.chain(removed).collect()
        };
        if behind.is_empty() {
            return;
        }
        let node = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in behind {
                node.sync_key(&app, &id);
            }
        })
        .await;
    }

    /// Makes this host's store hold what the catalog says of key `id` now: the key, its
    /// secret opened with the cluster's key, or nothing once removed.
    fn sync_key(&self, app: &App, id: &str) {
        let Some(sealer) = &self.sealer else { return };
        // One at a time: two changes to one key applied by two tasks end as the catalog is.
        let _one = self.key_sync.lock().unwrap_or_else(|p| p.into_inner());
        let (known, record) = {
            let catalog = self.replica.lock();
            let known = catalog.version(&Key::AccessKey(id.to_string())).is_some();
            (known, catalog.access_key(id).cloned())
        };
        if !known {
            return;
        }
        let Some(rec) = record else {
            match app.keys.forget(id) {
                Ok(true) => {
                    tracing::info!(access_key_id = id, "removed an access key (by the cluster)")
                }
                Ok(false) => {}
                Err(e) => tracing::error!(
                    access_key_id = id,
                    "removing an access key the cluster removed: {e}"
                ),
            }
            return;
        };
        if !keys::valid_id(id) {
            tracing::warn!(
                access_key_id = id,
                "the cluster's catalog holds an access key id fnlet never makes: ignored"
            );
            return;
        }
        let Some(secret) = sealer.unseal(id, &rec.sealed_secret) else {
            tracing::warn!(
                access_key_id = id,
                "the cluster's access key does not open with this host's cluster/keys.key: it lets nobody in here"
            );
            return;
        };
        let info = KeyInfo {
            access_key_id: id.to_string(),
            description: rec.description,
            created_at: keys::rfc3339_ms(rec.created_ms),
            last_used: None,
            scope: match rec.scope.as_deref() {
                None => keys::Scope::Admin,
                Some(s) => match keys::Scope::parse(s) {
                    Some(s) => s,
                    None => {
                        tracing::warn!(
                            access_key_id = id,
                            scope = s,
                            "the cluster's access key has a scope this host does not know: it lets nobody in here"
                        );
                        return;
                    }
                },
            },
            functions: rec.functions.clone(),
        };
        match app.keys.import(&info, &secret) {
            Ok(true) => tracing::info!(access_key_id = id, "took an access key from the cluster"),
            Ok(false) => {}
            Err(e) => tracing::error!(
                access_key_id = id,
                "taking an access key from the cluster: {e}"
            ),
        }
    }
}
