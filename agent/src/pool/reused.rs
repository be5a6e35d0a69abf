//! Exec functions with `reuse_sandbox`: sandboxes kept between calls ([`isolate::ReusableSandbox`]),
//! each serving one call at a time, idle ones waiting in their function's slot until their
//! keep-alive runs out or the host needs their room.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use isolate::{ReusableSandbox, RunPipes};
use tokio_util::task::TaskTracker;

use super::InstanceCounts;
use super::capacity::Commitment;

/// A reusable sandbox of one version, counted among its function's instances and holding its
/// share of the host for as long as it lives. Dropping it kills it; its teardown (reap, cgroup
/// removal) runs on a task of `tracker`, after which the commitment is given back.
pub struct WarmSandbox {
    pub version: u64,
    sandbox: Option<ReusableSandbox>,
    /// The function's next process, started ahead (`start_ahead`), waiting on stdin.
    started: Option<RunPipes>,
    commitment: Option<Commitment>,
    counts: Arc<InstanceCounts>,
    tracker: TaskTracker,
}

impl WarmSandbox {
    pub fn new(
        version: u64,
        sandbox: ReusableSandbox,
        commitment: Commitment,
        counts: &Arc<InstanceCounts>,
        tracker: &TaskTracker,
    ) -> WarmSandbox {
        let alive = counts.alive.fetch_add(1, Ordering::AcqRel) + 1;
        counts.peak.fetch_max(alive, Ordering::AcqRel);
        WarmSandbox {
            version,
            sandbox: Some(sandbox),
            started: None,
            commitment: Some(commitment),
            counts: counts.clone(),
            tracker: tracker.clone(),
        }
    }

    /// The sandbox (always there until the drop).
    pub fn sandbox(&mut self) -> Option<&mut ReusableSandbox> {
        self.sandbox.as_mut()
    }

    /// Starts the function's next process now (`start_ahead`): it runs its start-up and
    /// waits for its call on stdin. A sandbox that cannot start it is left as it is: the
    /// call then starts its own process.
    pub fn start_ahead(&mut self) {
        let Some(sandbox) = self.sandbox.as_mut() else {
            return;
        };
        if sandbox.has_run() {
            return;
        }
        match sandbox.run(None, &[]) {
            Ok(pipes) => self.started = Some(pipes),
            Err(e) => tracing::debug!(pid = sandbox.sandbox().pid(), "start ahead: {e}"),
        }
    }

    /// The process started ahead for the next call, if one waits.
    pub fn take_started(&mut self) -> Option<RunPipes> {
        self.started.take()
    }

    /// Its cgroup leaf: the instance's name in logs, unique on the host.
    pub fn id(&self) -> String {
        self.sandbox
            .as_ref()
            .and_then(|s| s.sandbox().cgroup_path())
            .and_then(|p| p.rsplit('/').next().map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for WarmSandbox {
    fn drop(&mut self) {
        self.counts.alive.fetch_sub(1, Ordering::AcqRel);
        let (Some(sandbox), commitment) = (self.sandbox.take(), self.commitment.take()) else {
            return;
        };
        let _ = sandbox.kill();
        let mut sandbox = sandbox.into_sandbox();
        let finish = async move {
            if let Err(e) = sandbox.wait().await {
                tracing::warn!(pid = sandbox.pid(), "tearing a reused sandbox down: {e}");
            }
            drop(commitment);
        };
        // Without a runtime (never on the agent's paths) the sandbox's drop reaps it here.
        match tokio::runtime::Handle::try_current() {
            Ok(_) => drop(self.tracker.spawn(finish)),
            Err(_) => drop(finish),
        }
    }
}

/// An idle warm sandbox and since when it waits.
pub(super) struct IdleSandbox {
    pub sandbox: WarmSandbox,
    pub since: Instant,
}
