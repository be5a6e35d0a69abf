//! The invoke router: decides where an invocation runs. On a single node that is always here;
//! the cluster will add "forward to the owning peer" at this seam.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use isolate::Isolator;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::Ordering;

use tokio_util::task::TaskTracker;

use crate::config::Config;
pub use crate::instance::lambda::Payload;
use crate::instance::lambda::{EndReport, EventArgs, InvokeLog, LambdaInstance, StartArgs};
use crate::instance::{self, ExecCall, InvokeError, runtime_api};
use crate::logs::{LineKind, Logs};
use crate::manifest::Mode;
use crate::metrics::Metrics;
use crate::network::Network;
use crate::pool::capacity::Commitment;
use crate::pool::{ActiveFunction, FunctionSlot, Registry, Slot, Tracked};

pub struct Router {
    pub registry: Arc<Registry>,
    pub isolator: Arc<Isolator>,
    pub logs: Arc<Logs>,
    pub metrics: Arc<Metrics>,
    pub queue_timeout: Duration,
    pub max_response: usize,
    /// Cancelled when shutdown starts: no new invocations.
    pub draining: CancellationToken,
    /// Cancelled when the shutdown grace is over: running instances are killed.
    pub kill: CancellationToken,
    /// Keep a sandbox per function built ahead of time.
    pub prepare_ahead: bool,
    /// The agent's config, for what Lambda instances are told (region, ARNs).
    pub config: Arc<Config>,
    /// Every Lambda instance's sandbox owner: shutdown waits for them.
    pub instances: TaskTracker,
    /// Functions' outbound network; None: no function gets one (unit tests).
    pub network: Option<Arc<Network>>,
}

/// One invocation as the API layer asks for it.
pub struct InvokeRequest<'a> {
    pub name: &'a str,
    pub body: Bytes,
    pub request_id: &'a str,
    /// Lambda mode: return the last 4 KB of the invocation's log (X-Amz-Log-Type: Tail).
    pub want_tail: bool,
    /// Lambda mode: the caller's client context (X-Amz-Client-Context), passed to the runtime.
    pub client_context: Option<String>,
    /// Exec mode: variables set for this call only (a topic event's `CE_*` attributes). A
    /// call with some starts a sandbox of its own rather than one prepared ahead, unless its
    /// function keeps its sandboxes (`reuse_sandbox`): they are then set for its run.
    pub env: Vec<(String, String)>,
    /// A version other than the active one (a qualified call: a version number or an alias),
    /// run within the function's concurrency; None: the active version.
    pub version: Option<Arc<ActiveFunction>>,
    /// The qualifier the caller named (a version number, an alias or `$LATEST`): the Lambda
    /// context's invoked function ARN ends with it, as Lambda's does.
    pub qualifier: Option<&'a str>,
    /// Exec mode: the function's stdout goes here as it comes (InvokeWithResponseStream), up
    /// to [`runtime_api::MAX_STREAMED_RESPONSE`], and the answer's body is empty. Lambda mode
    /// streams through its runtime ([`Payload::Stream`]) and ignores it.
    pub stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
}

/// The `running` gauge of one invocation: up while it lives, down when dropped.
struct Running<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Running<'_> {
    fn start(gauge: &prometheus_client::metrics::gauge::Gauge) -> Running<'_> {
        gauge.inc();
        Running(gauge)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Armed while an exec-mode call runs: dropped (not forgotten) means the caller hung up.
struct CallerLeft<'a> {
    router: &'a Router,
    function: &'a ActiveFunction,
    request_id: &'a str,
}

impl Drop for CallerLeft<'_> {
    fn drop(&mut self) {
        let f = self.function;
        self.router.caller_left(
            &f.name,
            f.version,
            self.request_id,
            "the sandbox was killed",
        );
    }
}

/// A Lambda-mode call, owned so that it outlives its caller.
struct LambdaCall {
    request_id: String,
    body: Bytes,
    want_tail: bool,
    client_context: Option<String>,
    /// A qualified call (a version number or an alias): its instance stays warm for the next
    /// call of its version, even when that is not the active one.
    qualified: bool,
    /// The qualifier the caller named, for the invoked function ARN.
    qualifier: Option<String>,
}

/// A successful invocation.
pub struct Invocation {
    pub body: Payload,
    pub version: u64,
    /// The invocation's log tail, when asked for.
    pub log_tail: Option<String>,
    /// What is left to do once the answer is out, done when this is dropped: the API layer
    /// keeps it in the answer's body, so that it happens after the answer, not while it is
    /// written.
    pub after: AfterAnswer,
}

/// See [`Invocation::after`]: an exec sandbox to tear down, the next sandbox to prepare.
#[derive(Default)]
pub struct AfterAnswer {
    /// An exec function's sandbox whose function ended well, and the host capacity it holds
    /// until its teardown (the init's exit, its reap, the cgroup's removal) is done.
    ending: Option<Box<(isolate::Sandbox, Commitment)>>,
    /// Dropped after `ending` has been handed to its task (field order).
    refill: Option<RefillOnDrop>,
    tracker: Option<TaskTracker>,
}

impl AfterAnswer {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ending.is_none() && self.refill.is_none()
    }
}

impl Drop for AfterAnswer {
    fn drop(&mut self) {
        let Some(ending) = self.ending.take() else {
            return;
        };
        let (mut sandbox, commitment) = *ending;
        let finish = async move {
            if let Err(e) = sandbox.wait().await {
                tracing::warn!(pid = sandbox.pid(), "tearing an exec sandbox down: {e}");
            }
            drop(commitment);
        };
        // Tracked with the instances, so shutdown waits for it. Without a runtime (never on
        // the agent's paths), the sandbox's drop kills, reaps and removes it here.
        match (&self.tracker, tokio::runtime::Handle::try_current()) {
            (Some(tracker), Ok(_)) => drop(tracker.spawn(finish)),
            _ => drop(finish),
        }
    }
}

/// See [`AfterAnswer::refill`].
pub struct RefillOnDrop {
    slot: Arc<FunctionSlot>,
    isolator: Arc<Isolator>,
    network: Option<Arc<Network>>,
    draining: CancellationToken,
    /// Lambda mode: wait [`LAMBDA_REFILL_DELAY`] first.
    delayed: bool,
}

impl Drop for RefillOnDrop {
    fn drop(&mut self) {
        if self.draining.is_cancelled() || self.slot.has_ready() {
            return;
        }
        let rt = match tokio::runtime::Handle::try_current() {
            Ok(rt) if self.delayed => rt,
            _ => {
                self.slot.refill(&self.isolator, self.network.as_ref());
                return;
            }
        };
        // Dropped once hyper has the answer, which is on the wire right after. A Lambda
        // function's next cold start is far off (its instance stays warm): the fork of the
        // agent waits a little longer, so that it does not compete for the CPUs with the
        // caller reading the answer (measured on 2 cores: 3.2 -> 2.0 ms per cold start). An
        // exec function needs its next sandbox for its next call: no wait.
        let (slot, isolator, network, draining) = (
            self.slot.clone(),
            self.isolator.clone(),
            self.network.clone(),
            self.draining.clone(),
        );
        rt.spawn(async move {
            tokio::time::sleep(LAMBDA_REFILL_DELAY).await;
            if !draining.is_cancelled() {
                slot.refill(&isolator, network.as_ref());
            }
        });
    }
}

/// A future run by the task that awaits it, until that task drops it half-way: then it runs on
/// to its end in a task of its own, and `abandoned` gets its output.
struct FinishOnDrop<T: Send + 'static> {
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
    abandoned: Option<Box<dyn FnOnce(T) + Send>>,
}

impl<T: Send + 'static> FinishOnDrop<T> {
    fn new(
        fut: std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>,
        abandoned: impl FnOnce(T) + Send + 'static,
    ) -> Self {
        FinishOnDrop {
            fut: Some(fut),
            abandoned: Some(Box::new(abandoned)),
        }
    }
}

impl<T: Send + 'static> std::future::Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        // Out while polled: a future that panics is not finished again by the drop.
        let Some(mut fut) = self.fut.take() else {
            return std::task::Poll::Pending;
        };
        match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(out) => {
                self.abandoned = None;
                std::task::Poll::Ready(out)
            }
            std::task::Poll::Pending => {
                self.fut = Some(fut);
                std::task::Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        let (Some(fut), Some(abandoned)) = (self.fut.take(), self.abandoned.take()) else {
            return;
        };
        // Without a runtime (the agent is gone) there is nothing left to finish it on.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { abandoned(fut.await) });
        }
    }
}

/// How long after a Lambda call's answer its function's next prepared sandbox is built.
const LAMBDA_REFILL_DELAY: Duration = Duration::from_millis(5);

/// How an invocation ended, as its REPORT and the warm pool need it (owned: the end may be
/// written after the answer).
struct Ended {
    error_kind: Option<&'static str>,
    /// A handler's own error leaves the instance fine; any other failure ended it.
    reusable: bool,
}

impl Ended {
    fn of(error: Option<&InvokeError>) -> Ended {
        Ended {
            error_kind: error.map(InvokeError::kind),
            reusable: matches!(error, None | Some(InvokeError::Handler { .. })),
        }
    }
}

/// A failed invocation, with the version that ran when one did.
pub struct Failure {
    pub error: InvokeError,
    pub version: Option<u64>,
    pub log_tail: Option<String>,
}

impl Router {
    /// Builds the next sandbox of `name` ahead of time (after a deploy, a rollback, a start).
    pub fn prewarm(&self, name: &str) {
        if self.draining.is_cancelled() {
            return;
        }
        if let (true, Some(slot)) = (self.prepare_ahead, self.registry.get(name)) {
            slot.refill(&self.isolator, self.network.as_ref());
        }
    }

    /// Tells the network the egress of `name`'s active version, after a deploy, a rollback or
    /// a removal: a function left without egress loses its chains and counters once its last
    /// instance is gone. Blocking (nft).
    pub fn network_changed(&self, name: &str) {
        if let Some(n) = &self.network {
            let active = self.registry.get(name).map(|s| s.active());
            n.set_function(name, active.as_ref().and_then(|f| f.net.as_ref()));
        }
    }

    /// The version an invocation of `name` would run now (for authorisation and headers).
    pub fn lookup(&self, name: &str) -> Option<Arc<ActiveFunction>> {
        self.registry.get(name).map(|s| s.active())
    }

    pub async fn invoke(self: &Arc<Self>, req: InvokeRequest<'_>) -> Result<Invocation, Failure> {
        let (name, request_id) = (req.name, req.request_id);
        let fail = |error, version| Failure {
            error,
            version,
            log_tail: None,
        };
        if self.draining.is_cancelled() {
            return Err(fail(InvokeError::Draining, None));
        }
        let slot = self
            .registry
            .get(name)
            .ok_or_else(|| fail(InvokeError::NotFound(name.into()), None))?;
        let m = slot.metrics.get_or_init(|| self.metrics.for_function(name));
        let started = Instant::now();
        let held = match slot.acquire(self.queue_timeout).await {
            Ok(h) => h,
            Err(e) => {
                self.metrics.error(name, e.kind());
                return Err(fail(e, None));
            }
        };
        m.queue_wait.observe(started.elapsed().as_secs_f64());
        let f = match &req.version {
            Some(v) => v.clone(),
            None => held.function.clone(),
        };
        // Exec output streamed to the caller may be as large as a streamed Lambda answer.
        let max_response = match req.stdout {
            Some(_) => runtime_api::MAX_STREAMED_RESPONSE,
            None => self.max_response,
        };
        m.invocations.inc();
        // Counted down however the call ends, the caller hanging up included.
        let _running = Running::start(&m.running);
        let mut log_tail = None;
        let mut ending = None;
        let result = match f.manifest.mode {
            Mode::Exec if f.manifest.reuse_sandbox => {
                let call = exec_call(&f, request_id, max_response, &req.env);
                // The exec paths are boxed: inline they would make every Lambda call's future
                // (moved into a box per request) several KB larger.
                let r = Box::pin(self.invoke_reused(&slot, &f, call, req.body, req.stdout)).await;
                drop(held);
                r.map(Payload::Full)
            }
            Mode::Exec => {
                // Exec mode starts a new instance for every call. With a sandbox built ahead of
                // time only the exec is left; without one it is a full cold start.
                // With `start_ahead` the sandbox built ahead has its function started too;
                // a call with variables of its own needs a function started for it.
                let ready = match (self.prepare_ahead && req.env.is_empty(), f.starts_ahead()) {
                    (false, _) => None,
                    (true, false) => slot.take_ready(f.version).map(instance::Ready::Prepared),
                    (true, true) => slot.take_started(f.version).map(instance::Ready::Started),
                };
                match ready {
                    None => {
                        m.cold_starts.inc();
                    }
                    Some(instance::Ready::Started(_)) => {
                        m.started_ahead.inc();
                    }
                    Some(instance::Ready::Prepared(_)) => {}
                }
                // Its share of the host, for as long as the sandbox runs.
                let commitment = match self.commit_exec(&f).await {
                    Ok(c) => c,
                    Err(e) => {
                        self.metrics.error(name, e.kind());
                        if self.log_invocation() {
                            tracing::info!(function = name, request_id, "invocation refused: {e}");
                        }
                        return Err(fail(e, Some(f.version)));
                    }
                };
                let call = exec_call(&f, request_id, max_response, &req.env);
                // Dropped with this future when the caller hangs up: the sandbox is killed
                // (nobody reads its answer), and that is said.
                let left = CallerLeft {
                    router: self,
                    function: &f,
                    request_id,
                };
                let r = Box::pin(instance::run_exec(
                    &self.isolator,
                    self.network.as_ref(),
                    &self.logs,
                    call,
                    req.body,
                    req.stdout,
                    ready,
                    &self.kill,
                ))
                .await;
                std::mem::forget(left);
                drop(held);
                r.map(|answer| {
                    ending = answer.ending.map(|sandbox| Box::new((sandbox, commitment)));
                    Payload::Full(answer.output)
                })
            }
            Mode::Lambda => {
                let (r, tail) = self.invoke_lambda_detached(&slot, held, &f, req).await;
                log_tail = tail;
                r
            }
        };
        // The next sandbox is built after the call: built during it, it would compete with the
        // function for the CPUs (measured: 5.0 ms median per call before, 3.2 ms after). After
        // a success, once the answer is written (the caller drops `refill`); after a failure,
        // now.
        let refill = self.prepare_ahead.then(|| RefillOnDrop {
            slot: slot.clone(),
            isolator: self.isolator.clone(),
            network: self.network.clone(),
            draining: self.draining.clone(),
            delayed: f.manifest.mode == Mode::Lambda,
        });
        let elapsed = started.elapsed();
        m.duration.observe(elapsed.as_secs_f64());
        let ms = elapsed.as_secs_f64() * 1000.0;
        match result {
            Ok(body) => {
                if self.log_invocation() {
                    tracing::info!(
                        function = name,
                        version = f.version,
                        request_id,
                        duration_ms = ms,
                        bytes = body.len(),
                        "invocation ok"
                    );
                }
                if f.manifest.mode == Mode::Exec {
                    self.logs.append(
                        name,
                        f.version,
                        request_id,
                        "agent",
                        &format!("END ok duration={ms:.1}ms bytes={}", body.len()),
                    );
                }
                Ok(Invocation {
                    body,
                    version: f.version,
                    log_tail,
                    after: AfterAnswer {
                        ending,
                        refill,
                        tracker: Some(self.instances.clone()),
                    },
                })
            }
            Err(e) => {
                self.metrics.error(name, e.kind());
                if self.log_invocation() {
                    tracing::info!(
                        function = name,
                        version = f.version,
                        request_id,
                        duration_ms = ms,
                        kind = e.kind(),
                        "invocation failed: {e}"
                    );
                }
                if f.manifest.mode == Mode::Exec {
                    self.logs.append(
                        name,
                        f.version,
                        request_id,
                        "agent",
                        &format!("END {} duration={ms:.1}ms: {e}", e.kind()),
                    );
                }
                Err(Failure {
                    error: e,
                    version: Some(f.version),
                    log_tail,
                })
            }
        }
    }

    /// An exec call in a sandbox kept from an earlier call of `f` (`reuse_sandbox`), or, when
    /// none waits, in a new one (a prepared one when ready) that is kept afterwards if the
    /// call left it fit to serve the next.
    async fn invoke_reused(
        &self,
        slot: &Arc<FunctionSlot>,
        f: &Arc<ActiveFunction>,
        call: ExecCall<'_>,
        body: Bytes,
        stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
    ) -> Result<Bytes, InvokeError> {
        let mut warm = match slot.take_reused(f.version) {
            Some(w) => w,
            None => self.new_reused(slot, f).await?,
        };
        let mut started = warm.take_started();
        if started.is_some() && !call.env.is_empty() {
            // A process started ahead has none of this call's own variables: it is ended,
            // and the call starts its own in the same sandbox (or, failing that, a new one).
            // Its stdin stays open until it is gone: it never reads an end of input.
            let cancelled = match warm.sandbox() {
                Some(sandbox) => tokio::time::timeout(call.timeout, sandbox.cancel_run())
                    .await
                    .ok()
                    .and_then(|end| end.ok().flatten()),
                None => None,
            };
            if cancelled.is_none() {
                // Killed with its sandbox.
                drop(warm);
                warm = self.new_reused(slot, f).await?;
            }
            started = None;
        }
        if let (Some(_), Some(m)) = (&started, slot.metrics.get()) {
            m.started_ahead.inc();
        }
        let sandbox = warm
            .sandbox()
            .ok_or_else(|| InvokeError::Internal("reused sandbox missing".into()))?;
        // Dropped with this future when the caller hangs up: the sandbox is killed (nobody
        // reads its answer), and that is said.
        let left = CallerLeft {
            router: self,
            function: f,
            request_id: call.request_id,
        };
        let (r, reusable) =
            instance::run_reused(&self.logs, call, body, stdout, sandbox, started, &self.kill)
                .await;
        std::mem::forget(left);
        if reusable && !self.draining.is_cancelled() {
            if f.manifest.start_ahead {
                warm.start_ahead();
            }
            slot.put_reused(warm);
        }
        r
    }

    /// An exec sandbox's share of the host, waiting up to the queue timeout for room (evicting
    /// idle instances of other functions).
    async fn commit_exec(&self, f: &ActiveFunction) -> Result<Commitment, InvokeError> {
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        match self
            .registry
            .commit(&f.name, None, f.need(), deadline, || false)
            .await
        {
            Ok(Some(c)) => Ok(c),
            // Only when `ready` says so, which it never does here.
            Ok(None) => Err(InvokeError::Internal("no commitment".into())),
            Err(short) => Err(InvokeError::NoCapacity(short)),
        }
    }

    /// A new reusable sandbox of `f`, holding its share of the host.
    async fn new_reused(
        &self,
        slot: &Arc<FunctionSlot>,
        f: &Arc<ActiveFunction>,
    ) -> Result<crate::pool::reused::WarmSandbox, InvokeError> {
        self.metrics
            .cold_starts
            .get_or_create(&Metrics::function(&f.name))
            .inc();
        let commitment = self.commit_exec(f).await?;
        self.build_reused(slot, f, commitment).await
    }

    /// A reusable sandbox of `f` holding `commitment`: a prepared one when ready, else one
    /// built now.
    async fn build_reused(
        &self,
        slot: &Arc<FunctionSlot>,
        f: &Arc<ActiveFunction>,
        commitment: Commitment,
    ) -> Result<crate::pool::reused::WarmSandbox, InvokeError> {
        let ready = match self.prepare_ahead {
            true => slot.take_ready(f.version),
            false => None,
        };
        let prepared = match ready {
            Some(p) => p,
            None => {
                let (iso, network, f) = (self.isolator.clone(), self.network.clone(), f.clone());
                let timeout = Duration::from_secs_f64(f.resolved.timeout_s);
                let build = tokio::task::spawn_blocking(move || {
                    crate::pool::prepare_sandbox(&iso, network.as_ref(), &f.spec, f.net.as_ref())
                });
                // A build that overruns the call's timeout finishes on its thread, and the
                // sandbox is dropped, hence killed, there.
                tokio::time::timeout(timeout, build)
                    .await
                    .map_err(|_| InvokeError::Timeout(timeout))?
                    .map_err(|e| InvokeError::Internal(e.to_string()))??
            }
        };
        let sandbox = prepared.into_reusable().map_err(InvokeError::Spawn)?;
        Ok(crate::pool::reused::WarmSandbox::new(
            f.version,
            sandbox,
            commitment,
            &slot.instances,
            &self.instances,
        ))
    }

    /// Whether this call's `invocation ok` / `invocation failed` line is logged: info is on and
    /// the agent's [`LineBudget`](crate::logs::LineBudget) has room this second.
    fn log_invocation(&self) -> bool {
        tracing::enabled!(tracing::Level::INFO)
            && self.logs.line_budget().admit(LineKind::Invocation)
    }

    /// Counts and logs a call whose caller disconnected before the answer.
    fn caller_left(&self, function: &str, version: u64, request_id: &str, outcome: &str) {
        self.metrics
            .abandoned
            .get_or_create(&Metrics::function(function))
            .inc();
        if self.log_invocation() {
            tracing::info!(
                function,
                version,
                request_id,
                "the caller disconnected before the answer; {outcome}"
            );
        }
        self.logs.append(
            function,
            version,
            request_id,
            "agent",
            &format!("the caller disconnected before the answer ({outcome})"),
        );
    }

    /// [`Router::invoke_lambda`], run by the caller's task (no hand-off to another task and
    /// back per call) but detachable: a caller who hangs up costs no warm instance, the
    /// invocation goes on in a task of its own to its end, the instance goes back to the pool,
    /// and the function's log and `fnlet_abandoned_invocations_total` say the caller left.
    async fn invoke_lambda_detached(
        self: &Arc<Self>,
        slot: &Arc<FunctionSlot>,
        held: Slot,
        f: &Arc<ActiveFunction>,
        req: InvokeRequest<'_>,
    ) -> (Result<Payload, InvokeError>, Option<String>) {
        let call = LambdaCall {
            request_id: req.request_id.to_string(),
            body: req.body,
            want_tail: req.want_tail,
            client_context: req.client_context,
            qualified: req.version.is_some(),
            qualifier: req.qualifier.map(str::to_string),
        };
        let (router, slot, f) = (self.clone(), slot.clone(), f.clone());
        let request_id = call.request_id.clone();
        let left = {
            let (router, f) = (self.clone(), f.clone());
            move |_| {
                router.caller_left(
                    &f.name,
                    f.version,
                    &request_id,
                    "the invocation ran to its end",
                )
            }
        };
        // Boxed where it is made: passed on by value, it would be copied on its way in.
        let run = Box::pin(async move {
            use futures_util::FutureExt;
            std::panic::AssertUnwindSafe(router.invoke_lambda(&slot, held, &f, call))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    (
                        Err(InvokeError::Internal("the invocation panicked".into())),
                        None,
                    )
                })
        });
        FinishOnDrop::new(run, left).await
    }

    /// Lambda mode: a warm instance if one waits, else a cold start; the instance goes back to
    /// the warm pool unless the invocation killed it. Returns the log tail when asked for.
    async fn invoke_lambda(
        self: &Arc<Self>,
        slot: &Arc<FunctionSlot>,
        held: Slot,
        f: &Arc<ActiveFunction>,
        req: LambdaCall,
    ) -> (Result<Payload, InvokeError>, Option<String>) {
        let m = slot
            .metrics
            .get_or_init(|| self.metrics.for_function(&f.name));
        let request_id = req.request_id.as_str();
        // A warm instance, or room on the host for a new one (evicting idle instances of other
        // functions, or waiting until one of this function turns idle or room is freed).
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        let warm = loop {
            if let Some(i) = slot.take_idle(f.version, crate::api::listener::serving_thread()) {
                break Ok(i);
            }
            match self
                .registry
                .commit(&f.name, Some(f.version), f.need(), deadline, || {
                    slot.has_idle_of(f.version)
                })
                .await
            {
                Ok(Some(c)) => break Err(c),
                Ok(None) => continue,
                // Logged and counted with the invocation's end, as any failure.
                Err(short) => return (Err(InvokeError::NoCapacity(short)), None),
            }
        };
        let (instance, init) = match warm {
            Ok(i) => {
                m.warm_starts.inc();
                (i, None)
            }
            Err(commitment) => {
                m.cold_starts.inc();
                // Boxed: inline, a start's future would size every warm call's (5 KB).
                match Box::pin(self.start_instance(slot, f, commitment)).await {
                    Ok(i) => {
                        let init = i.init_duration;
                        (i, Some(init))
                    }
                    Err(e) => {
                        self.logs.append(
                            &f.name,
                            f.version,
                            request_id,
                            "agent",
                            &format!("INIT_REPORT Status: error Error Type: {}: {e}", e.kind()),
                        );
                        return (Err(e), None);
                    }
                }
            }
        };
        let timeout = Duration::from_secs_f64(f.resolved.timeout_s);
        let ev = EventArgs {
            request_id,
            body: req.body,
            deadline: Instant::now() + timeout,
            function_arn: match &req.qualifier {
                Some(q) => format!("{}:{q}", f.arn(&self.config, false)),
                None => f.arn(&self.config, false),
            },
            client_context: req.client_context,
            keep_tail: req.want_tail,
        };
        let deadline = ev.deadline;
        let (mut result, mut log) = instance.invoke(ev, &self.kill).await;
        if log.is_streaming() {
            let (release, released) = tokio::sync::oneshot::channel();
            if let Ok(Payload::Stream { released: r, .. }) = &mut result {
                *r = Some(released);
            }
            // The answer is still coming: the instance is busy until the runtime has sent it
            // all. The caller reads the stream meanwhile; its log and slot are settled after.
            let (router, slot, f, id, qualified) = (
                self.clone(),
                slot.clone(),
                f.clone(),
                request_id.to_string(),
                req.qualified,
            );
            tokio::spawn(async move {
                let outcome = instance
                    .finish_stream(&mut log, deadline, &router.kill)
                    .await;
                let error = outcome.err();
                let log_tail = router
                    .end_invocation(
                        &slot,
                        instance,
                        &f,
                        &id,
                        init,
                        Ended::of(error.as_ref()),
                        log,
                        qualified,
                        true,
                    )
                    .unwrap_or_default();
                drop(held);
                let _ = release.send(crate::instance::lambda::Settled { log_tail, error });
            });
            return (result, None);
        }
        let tail = self.end_invocation(
            slot,
            instance,
            f,
            request_id,
            init,
            Ended::of(result.as_ref().err()),
            log,
            req.qualified,
            req.want_tail,
        );
        drop(held);
        (result, tail)
    }

    /// Ends an invocation: END and REPORT now (`now`: the caller wants the log tail) or right
    /// after the answer, and the instance back to the warm pool unless the invocation ended it
    /// (`qualified`: kept warm for its version, active or not). The instance is idle again
    /// before the answer goes out, so the caller's next call finds it; a REPORT not yet
    /// written then is written before that call's START. Returns the tail when `now`.
    #[allow(clippy::too_many_arguments)]
    fn end_invocation(
        &self,
        slot: &Arc<FunctionSlot>,
        instance: Tracked,
        f: &Arc<ActiveFunction>,
        request_id: &str,
        init: Option<Duration>,
        ended: Ended,
        log: InvokeLog,
        qualified: bool,
        now: bool,
    ) -> Option<String> {
        if let Some(init) = init {
            self.metrics
                .init_duration
                .get_or_create(&Metrics::function(&f.name))
                .observe(init.as_secs_f64());
        }
        let end = EndReport {
            request_id: request_id.to_string(),
            memory_mb: f.resolved.memory_mb,
            init,
            error_kind: ended.error_kind,
        };
        let (tail, pending) = if now {
            (Some(instance.end_now(end, log)), None)
        } else {
            (None, Some(instance.end_later(end, log)))
        };
        if ended.reusable && instance.is_alive() && !self.draining.is_cancelled() {
            slot.put_idle(instance, qualified);
        }
        if let Some(pending) = pending {
            // Tracked with the instances: shutdown waits for it like for any instance. Run on
            // this thread once the caller's task has written the answer and yields, so the
            // caller does not wait for the log write, the peak memory read, the output flush
            // and the runtime's 202.
            self.instances.spawn(async move {
                pending.write();
            });
        }
        tail
    }

    /// Starts a Lambda instance of `f` (a prepared sandbox when one waits) and waits for its
    /// init.
    async fn start_instance(
        &self,
        slot: &Arc<FunctionSlot>,
        f: &Arc<ActiveFunction>,
        commitment: Commitment,
    ) -> Result<Tracked, InvokeError> {
        if let Some(missing) = f.missing_runtime() {
            return Err(missing);
        }
        let reservation = Tracked::reserve(&slot.instances, commitment);
        let prepared = if self.prepare_ahead {
            slot.take_ready(f.version)
        } else {
            None
        };
        let instance = LambdaInstance::start(StartArgs {
            isolator: &self.isolator,
            network: self.network.as_ref(),
            logs: &self.logs,
            function: f,
            prepared,
            max_response: self.max_response.min(runtime_api::MAX_RESPONSE),
            cancel: &self.kill,
            tracker: &self.instances,
        })
        .await?;
        Ok(reservation.started(instance))
    }

    /// The warm pool's clock: stops instances idle past their keep-alive and starts
    /// `min_instances`. Called about every [`REAP_INTERVAL`].
    pub async fn reap(self: &Arc<Self>) {
        let now = Instant::now();
        for slot in self.registry.slots() {
            let f = slot.active();
            // Exec functions that keep their sandboxes have idle ones too.
            let reused = f.manifest.mode == Mode::Exec && f.manifest.reuse_sandbox;
            if f.manifest.mode != Mode::Lambda && !reused {
                continue;
            }
            let missing = match reused {
                true => slot.reap_reused(now),
                false => slot.reap_idle(now),
            };
            let counts = &slot.instances;
            let starting = counts.starting.load(Ordering::Acquire);
            let alive = counts.alive.load(Ordering::Acquire);
            let idle = slot.idle_count() as u64;
            for (state, n) in [
                ("starting", starting),
                ("idle", idle),
                ("busy", alive.saturating_sub(starting + idle)),
            ] {
                self.metrics
                    .instances
                    .get_or_create(&crate::metrics::InstanceLabels {
                        function: f.name.clone(),
                        state: state.into(),
                    })
                    .set(n as i64);
            }
            if self.draining.is_cancelled() || starting > 0 || missing == 0 {
                continue;
            }
            for _ in 0..missing {
                // Background warm-ups take a free slot or none, and room on the host without
                // evicting anything: callers come first.
                let commitment = match self.registry.capacity.try_commit(f.need()) {
                    Ok(c) => c,
                    Err(short) => {
                        tracing::debug!(function = %f.name, "no warm instance started (min_instances): {short}");
                        break;
                    }
                };
                let Some(held) = slot.try_acquire() else {
                    break;
                };
                let (router, slot, f) = (self.clone(), slot.clone(), f.clone());
                if reused {
                    tokio::spawn(async move {
                        router.provision_reused(&slot, &f, commitment).await;
                        drop(held);
                    });
                    continue;
                }
                tokio::spawn(async move {
                    match router.start_instance(&slot, &f, commitment).await {
                        Ok(i) => {
                            tracing::info!(function = %f.name, version = f.version, instance = %i.id, init_ms = i.init_duration.as_secs_f64() * 1000.0, "warm instance started (min_instances)");
                            slot.put_idle(i, false);
                        }
                        Err(e) => {
                            tracing::warn!(function = %f.name, "starting a warm instance failed: {e}")
                        }
                    }
                    drop(held);
                    if router.prepare_ahead {
                        slot.refill(&router.isolator, router.network.as_ref());
                    }
                });
            }
        }
    }

    /// A kept sandbox of an exec function with `reuse_sandbox`, started to reach its
    /// `min_instances`: with `start_ahead` its first process starts now too.
    async fn provision_reused(
        &self,
        slot: &Arc<FunctionSlot>,
        f: &Arc<ActiveFunction>,
        commitment: Commitment,
    ) {
        let starting = crate::pool::Starting::new(&slot.instances);
        match self.build_reused(slot, f, commitment).await {
            Ok(mut warm) if !self.draining.is_cancelled() => {
                tracing::info!(function = %f.name, version = f.version, instance = %warm.id(), "warm sandbox started (min_instances)");
                if f.manifest.start_ahead {
                    warm.start_ahead();
                }
                slot.put_reused(warm);
            }
            // Draining: dropped, hence killed.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(function = %f.name, "starting a warm sandbox failed: {e}")
            }
        }
        drop(starting);
        if self.prepare_ahead {
            slot.refill(&self.isolator, self.network.as_ref());
        }
    }

    /// At shutdown: stops every idle instance and waits (up to `limit`) until every instance's
    /// sandbox is gone.
    pub async fn stop_instances(&self, limit: Duration) {
        for slot in self.registry.slots() {
            slot.drop_idle();
        }
        self.instances.close();
        if tokio::time::timeout(limit, self.instances.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "instances still ending after {limit:?}; they are swept with the cgroups"
            );
        }
    }
}

/// What an exec call of `f` needs to know about it.
fn exec_call<'a>(
    f: &'a ActiveFunction,
    request_id: &'a str,
    max_response: usize,
    env: &'a [(String, String)],
) -> ExecCall<'a> {
    ExecCall {
        spec: &f.spec,
        function: &f.name,
        version: f.version,
        request_id,
        timeout: Duration::from_secs_f64(f.resolved.timeout_s),
        max_response,
        memory_mb: f.resolved.memory_mb,
        net: f.net.as_ref(),
        env,
    }
}

/// How often the warm pool is looked after.
pub const REAP_INTERVAL: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_future_dropped_half_way_runs_to_its_end_in_a_task_of_its_own() {
        // Dropped before its end: it finishes on its own and `abandoned` gets the output.
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (left, outcome) = tokio::sync::oneshot::channel();
        let f = FinishOnDrop::new(Box::pin(async move { wait.await.is_ok() }), move |v| {
            let _ = left.send(v);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), f)
                .await
                .is_err()
        );
        go.send(()).unwrap();
        let finished = tokio::time::timeout(Duration::from_secs(5), outcome).await;
        assert!(matches!(finished, Ok(Ok(true))), "{finished:?}");

        // Awaited to its end: the caller gets the output and `abandoned` is never called.
        let (left, outcome) = tokio::sync::oneshot::channel::<u32>();
        let f = FinishOnDrop::new(Box::pin(async { 7 }), move |v| {
            let _ = left.send(v);
        });
        assert_eq!(f.await, 7);
        assert!(outcome.await.is_err());
    }
}
