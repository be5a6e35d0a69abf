//! The functions this agent serves: the active version of each, and its concurrency slots.
//!
//! An invocation takes a slot (a semaphore permit) for as long as its instance runs; beyond
//! `max_concurrency` it queues for up to `queue_timeout`, then is refused as overloaded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use isolate::{Isolator, Limits, PreparedSandbox, SandboxSpec, StdioSpec};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::instance::InvokeError;
use crate::manifest::{Entrypoint, Manifest, Resolved};
use crate::store::{FunctionRecord, VersionRecord};

/// The variable that tells an instance its request id.
pub const REQUEST_ID_ENV: &str = "FNLET_REQUEST_ID";

/// The version of a function that new invocations run.
#[derive(Debug)]
pub struct ActiveFunction {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub manifest: Manifest,
    pub resolved: Resolved,
    /// The sandbox every instance of this version gets.
    pub spec: SandboxSpec,
}

impl ActiveFunction {
    pub fn new(
        rec: &FunctionRecord,
        v: &VersionRecord,
        bundle: PathBuf,
        config: &Config,
    ) -> ActiveFunction {
        let resolved = v.manifest.resolve(&config.defaults);
        let (program, args) = match &v.manifest.entrypoint {
            Entrypoint::Path(p) => (
                format!("{}/{}", isolate::TASK_ROOT, p.trim_start_matches("./")),
                Vec::new(),
            ),
            Entrypoint::Command(argv) => (argv[0].clone(), argv[1..].to_vec()),
        };
        let mut spec = SandboxSpec {
            name: rec.name.clone(),
            program,
            args,
            bundle: Some(bundle),
            tmp_size_bytes: config.sandbox.tmp_mb << 20,
            limits: Limits {
                memory_bytes: Some(resolved.memory_mb << 20),
                cpus: Some(resolved.cpus),
                pids: Some(config.sandbox.pids),
                nofile: 1024,
            },
            uid: rec.uid,
            gid: rec.uid,
            user_namespace: config.sandbox.user_namespace,
            stdio: StdioSpec::piped(),
            // Set when the instance starts: a prepared sandbox is built before the request.
            late_env: Some(REQUEST_ID_ENV.into()),
            ..Default::default()
        };
        spec.env.extend(v.manifest.env.clone());
        spec.env
            .insert("FNLET_FUNCTION_NAME".into(), rec.name.clone());
        spec.env
            .insert("FNLET_FUNCTION_VERSION".into(), v.version.to_string());
        spec.env
            .insert("FNLET_MEMORY_MB".into(), resolved.memory_mb.to_string());
        ActiveFunction {
            name: rec.name.clone(),
            version: v.version,
            sha256: v.sha256.clone(),
            manifest: v.manifest.clone(),
            resolved,
            spec,
        }
    }
}

/// One function's slot in the registry; survives version changes.
pub struct FunctionSlot {
    active: RwLock<Arc<ActiveFunction>>,
    permits: RwLock<Arc<Semaphore>>,
    limit: AtomicU64,
    pub running: AtomicU64,
    waiting: AtomicU64,
    /// A sandbox built ahead of time for the active version: (version, sandbox).
    ready: Mutex<Option<(u64, PreparedSandbox)>>,
    refilling: AtomicBool,
}

/// A running invocation's hold on its slot; released on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    slot: Arc<FunctionSlot>,
    pub function: Arc<ActiveFunction>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slot.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FunctionSlot {
    fn new(f: ActiveFunction) -> FunctionSlot {
        let limit = f.resolved.max_concurrency;
        FunctionSlot {
            active: RwLock::new(Arc::new(f)),
            permits: RwLock::new(Arc::new(Semaphore::new(limit as usize))),
            limit: AtomicU64::new(limit.into()),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            ready: Mutex::new(None),
            refilling: AtomicBool::new(false),
        }
    }

    pub fn active(&self) -> Arc<ActiveFunction> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_active(&self, f: ActiveFunction) {
        let limit = f.resolved.max_concurrency;
        if u64::from(limit) != self.limit.swap(limit.into(), Ordering::Relaxed) {
            // In-flight invocations keep their permits of the old semaphore.
            *self.permits.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(Semaphore::new(limit as usize));
        }
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(f);
    }

    /// Whether a sandbox built ahead of time waits for the active version.
    pub fn has_ready(&self) -> bool {
        let version = self.active().version;
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(v, _)| *v == version)
    }

    /// The sandbox built ahead of time for `version`, if one is ready.
    pub fn take_ready(&self, version: u64) -> Option<PreparedSandbox> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        match ready.take() {
            Some((v, sb)) if v == version => Some(sb),
            // Built for a version no longer active: dropping it kills it.
            _ => None,
        }
    }

    /// Builds the next sandbox ahead of time, in the background, unless one is ready or being
    /// built.
    pub fn refill(self: &Arc<Self>, isolator: &Arc<Isolator>) {
        let f = self.active();
        {
            let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            if ready.as_ref().is_some_and(|(v, _)| *v == f.version) {
                return;
            }
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = self.clone();
        let iso = isolator.clone();
        tokio::task::spawn_blocking(move || {
            let res = iso.prepare(&f.spec);
            slot.refilling.store(false, Ordering::Release);
            match res {
                Ok(sb) => {
                    if slot.active().version == f.version {
                        let old = slot
                            .ready
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .replace((f.version, sb));
                        drop(old);
                    }
                }
                Err(e) => {
                    tracing::warn!(function = %f.name, version = f.version, "building a sandbox ahead of time failed: {e}")
                }
            }
        });
    }

    /// Takes a slot, queueing up to `wait`; a queue longer than ten times the limit refuses at once.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Result<Slot, InvokeError> {
        let sem = self
            .permits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let function = self.active();
        let limit = function.resolved.max_concurrency;
        let overloaded = || InvokeError::Overloaded {
            function: function.name.clone(),
            limit,
        };
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.load(Ordering::Relaxed) >= 10 * u64::from(limit) {
                    return Err(overloaded());
                }
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let r = tokio::time::timeout(wait, sem.acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(Ok(p)) => p,
                    _ => return Err(overloaded()),
                }
            }
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            _permit: permit,
            slot: self.clone(),
            function: self.active(),
        })
    }
}

#[derive(Default)]
pub struct Registry {
    map: RwLock<HashMap<String, Arc<FunctionSlot>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<FunctionSlot>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Makes `f` the version new invocations of its function run.
    pub fn activate(&self, f: ActiveFunction) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&f.name) {
            Some(slot) => slot.set_active(f),
            None => {
                map.insert(f.name.clone(), Arc::new(FunctionSlot::new(f)));
            }
        }
    }

    pub fn remove(&self, name: &str) -> Option<Arc<FunctionSlot>> {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn running_total(&self) -> u64 {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.running.load(Ordering::Relaxed))
            .sum()
    }

    /// At shutdown: waits (up to `limit`) for sandboxes being built ahead to finish, then drops
    /// every one that waits, which kills it and removes its cgroup.
    pub fn drop_prepared(&self, limit: std::time::Duration) {
        let slots: Vec<Arc<FunctionSlot>> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let deadline = std::time::Instant::now() + limit;
        while slots.iter().any(|s| s.refilling.load(Ordering::Acquire))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for s in &slots {
            let ready = s.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(ready);
        }
    }

    /// Bundles that running instances may still have mounted.
    pub fn bundles_in_use(&self) -> std::collections::HashSet<String> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.active().sha256.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(limit: u32) -> ActiveFunction {
        let manifest = Manifest::parse(&format!(
            "name = \"f\"\nentrypoint = \"run\"\nmax_concurrency = {limit}\n"
        ))
        .unwrap();
        let rec = FunctionRecord {
            name: "f".into(),
            uid: 200_000,
            active: 1,
            next_version: 2,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let v = VersionRecord {
            name: "f".into(),
            version: 1,
            sha256: "abc".into(),
            size_bytes: 1,
            created_at: String::new(),
            manifest,
        };
        ActiveFunction::new(&rec, &v, "/b".into(), &Config::default())
    }

    #[test]
    fn spec_follows_the_manifest() {
        let f = function(3);
        assert_eq!(f.spec.program, "/var/task/run");
        assert_eq!(f.spec.uid, 200_000);
        assert_eq!(f.spec.limits.memory_bytes, Some(128 << 20));
        assert_eq!(f.spec.env["FNLET_FUNCTION_NAME"], "f");
    }

    #[tokio::test]
    async fn concurrency_is_capped_and_the_queue_times_out() {
        let reg = Registry::default();
        reg.activate(function(2));
        let slot = reg.get("f").unwrap();
        let a = slot.acquire(Duration::from_millis(10)).await.unwrap();
        let _b = slot.acquire(Duration::from_millis(10)).await.unwrap();
        assert!(matches!(
            slot.acquire(Duration::from_millis(20)).await,
            Err(InvokeError::Overloaded { .. })
        ));
        assert_eq!(reg.running_total(), 2);
        drop(a);
        slot.acquire(Duration::from_millis(10)).await.unwrap();
    }

    #[tokio::test]
    async fn a_queued_call_gets_the_freed_slot() {
        let reg = Registry::default();
        reg.activate(function(1));
        let slot = reg.get("f").unwrap();
        let a = slot.acquire(Duration::from_millis(10)).await.unwrap();
        let s2 = slot.clone();
        let waiter = tokio::spawn(async move { s2.acquire(Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert!(waiter.await.unwrap());
    }
}
