//! One Lambda-mode instance: a long-running sandbox whose runtime polls the Runtime API for
//! events, serving one invocation at a time and kept warm between them.
//!
//! Life: [`LambdaInstance::start`] starts the sandbox (a prepared one when ready), serves the
//! Runtime API on the listener inside its network namespace and waits for the runtime's first
//! `/next` (the end of init). [`LambdaInstance::invoke`] hands it an event and waits for the
//! answer within the deadline. A timeout, a crash or an exit ends the instance; dropping it
//! kills the sandbox and removes its cgroup.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use isolate::{CgroupUsage, ExitStatus, Isolator, Outcome, PreparedSandbox, SandboxWatch};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::InvokeError;
use super::runtime_api::{self, Event, Init, Reply, RuntimeHandle};
use crate::logs::Logs;
use crate::pool::ActiveFunction;

/// Bytes of an invocation's log kept for `X-Amz-Log-Type: Tail` (Lambda's 4 KB).
pub const TAIL_BYTES: usize = 4096;

/// What one invocation sends the instance.
pub struct EventArgs<'a> {
    pub request_id: &'a str,
    pub body: Bytes,
    pub deadline: Instant,
    pub function_arn: String,
    pub client_context: Option<String>,
}

/// Lines the instance writes, attributed to the invocation it is serving (or to its init).
struct LogTap {
    request_id: String,
    /// The current invocation's lines, newest last, for the Tail log type.
    tail: Vec<String>,
    tail_bytes: usize,
}

impl LogTap {
    fn push(&mut self, line: &str) {
        self.tail_bytes += line.len() + 1;
        self.tail.push(line.to_string());
        while self.tail_bytes > TAIL_BYTES * 2 && self.tail.len() > 1 {
            let old = self.tail.remove(0);
            self.tail_bytes -= old.len() + 1;
        }
    }
}

/// Shared by the instance and its output readers.
struct Output {
    tap: Mutex<LogTap>,
    logs: Arc<Logs>,
    function: String,
    version: u64,
    instance: String,
}

impl Output {
    fn line(&self, stream: &str, line: &str) {
        let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        tap.push(line);
        self.logs.append_from_instance(
            &self.function,
            self.version,
            &tap.request_id,
            &self.instance,
            stream,
            line,
        );
    }

    /// An agent line (START/END/REPORT) in the function's log and the invocation's tail.
    pub fn agent_line(&self, request_id: &str, line: &str) {
        self.tap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        self.logs.append_from_instance(
            &self.function,
            self.version,
            request_id,
            &self.instance,
            "agent",
            line,
        );
    }

    fn begin(&self, request_id: &str) {
        let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        tap.request_id = request_id.to_string();
        tap.tail.clear();
        tap.tail_bytes = 0;
    }

    /// Ends the invocation's attribution; returns its last [`TAIL_BYTES`] of log.
    fn end(&self) -> String {
        let mut tap = self.tap.lock().unwrap_or_else(|p| p.into_inner());
        tap.request_id = "-".into();
        let mut text = tap.tail.join("\n");
        text.push('\n');
        tap.tail.clear();
        tap.tail_bytes = 0;
        if text.len() > TAIL_BYTES {
            let mut cut = text.len() - TAIL_BYTES;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
        }
        text
    }
}

/// A request to an output reader: read what is already in the pipe, then answer.
type Flush = oneshot::Sender<()>;

/// Reads one of the instance's output pipes into lines. On a flush request it drains what the
/// pipe holds right now: whatever the function wrote before posting its answer is then logged
/// under that invocation, not the next one.
async fn read_output(
    fd: OwnedFd,
    stream: &'static str,
    out: Arc<Output>,
    mut flushes: mpsc::Receiver<Flush>,
) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let emit = |pending: &mut Vec<u8>, data: &[u8], out: &Output| {
        pending.extend_from_slice(data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            out.line(
                stream,
                String::from_utf8_lossy(&line[..nl]).trim_end_matches('\r'),
            );
        }
        // A line longer than the log keeps is cut rather than buffered without bound.
        if pending.len() > 64 * 1024 {
            out.line(stream, &String::from_utf8_lossy(pending));
            pending.clear();
        }
    };
    loop {
        tokio::select! {
            r = pipe.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => emit(&mut pending, &buf[..n], &out),
            },
            Some(ack) = flushes.recv() => {
                loop {
                    match pipe.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => emit(&mut pending, &buf[..n], &out),
                        Err(_) => break,
                    }
                }
                if !pending.is_empty() {
                    out.line(stream, &String::from_utf8_lossy(&pending));
                    pending.clear();
                }
                let _ = ack.send(());
            }
        }
    }
    if !pending.is_empty() {
        out.line(stream, &String::from_utf8_lossy(&pending));
    }
}

/// A live instance. Dropping it kills the sandbox.
pub struct LambdaInstance {
    /// The sandbox's cgroup leaf: unique, and what an operator finds on the host.
    pub id: String,
    pub version: u64,
    pub memory_mb: u64,
    pub init_duration: Duration,
    runtime: RuntimeHandle,
    watch: SandboxWatch,
    /// Cancelled once the sandbox has ended and its outcome is known.
    ended: CancellationToken,
    outcome: Arc<Mutex<Option<Outcome>>>,
    /// Asks the sandbox's owner for live accounting.
    usage: mpsc::Sender<oneshot::Sender<CgroupUsage>>,
    flushes: Vec<mpsc::Sender<Flush>>,
    output: Arc<Output>,
}

impl Drop for LambdaInstance {
    fn drop(&mut self) {
        // The owner task stops the Runtime API once the sandbox has exited: a long poll
        // answered earlier would only make the runtime fail loudly before the kill lands.
        let _ = self.watch.kill();
    }
}

/// What a started instance needs from the agent.
pub struct StartArgs<'a> {
    pub isolator: &'a Arc<Isolator>,
    pub network: Option<&'a Arc<crate::network::Network>>,
    pub logs: &'a Arc<Logs>,
    pub function: &'a Arc<ActiveFunction>,
    pub prepared: Option<PreparedSandbox>,
    pub max_response: usize,
    /// Kills the start early (agent shutdown).
    pub cancel: &'a CancellationToken,
    /// Where the sandbox's owner task is tracked, so shutdown can wait for every sandbox.
    pub tracker: &'a tokio_util::task::TaskTracker,
}

impl LambdaInstance {
    /// Starts an instance and waits for its runtime's first `/next`.
    pub async fn start(args: StartArgs<'_>) -> Result<LambdaInstance, InvokeError> {
        let f = args.function;
        let init_timeout = Duration::from_secs_f64(f.resolved.init_timeout_s);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + init_timeout;
        let spawn = match args.prepared {
            Some(p) => {
                tokio::task::spawn_blocking(move || p.start(None).map_err(InvokeError::Spawn))
            }
            None if f.net.is_some() => {
                let (iso, network, f) = (args.isolator.clone(), args.network.cloned(), f.clone());
                tokio::task::spawn_blocking(move || {
                    crate::pool::prepare_sandbox(&iso, network.as_ref(), &f.spec, f.net.as_ref())
                        .and_then(|p| p.start(None).map_err(InvokeError::Spawn))
                })
            }
            None => {
                let iso = args.isolator.clone();
                let spec = f.spec.clone();
                tokio::task::spawn_blocking(move || iso.spawn(&spec).map_err(InvokeError::Spawn))
            }
        };
        let mut sandbox = tokio::time::timeout_at(deadline, spawn)
            .await
            .map_err(|_| InvokeError::InitTimeout(init_timeout))?
            .map_err(|e| InvokeError::Internal(e.to_string()))??;
        let id = sandbox
            .cgroup_path()
            .and_then(|p| p.rsplit('/').next().map(str::to_string))
            .unwrap_or_else(|| sandbox.pid().to_string());
        let watch = sandbox
            .watch()
            .map_err(|e| InvokeError::Internal(e.to_string()))?;
        let listener = sandbox
            .take_listener()
            .ok_or_else(|| InvokeError::Internal("the sandbox has no Runtime API socket".into()))?;
        let stop = CancellationToken::new();
        let runtime = runtime_api::serve(listener, stop.clone(), args.max_response)
            .map_err(|e| InvokeError::Internal(format!("serving the Runtime API: {e}")))?;

        let output = Arc::new(Output {
            tap: Mutex::new(LogTap {
                request_id: "init".into(),
                tail: Vec::new(),
                tail_bytes: 0,
            }),
            logs: args.logs.clone(),
            function: f.name.clone(),
            version: f.version,
            instance: id.clone(),
        });
        let mut flushes = Vec::new();
        for (fd, stream) in [
            (sandbox.take_stdout(), "stdout"),
            (sandbox.take_stderr(), "stderr"),
        ] {
            if let Some(fd) = fd {
                let (tx, rx) = mpsc::channel(1);
                flushes.push(tx);
                tokio::spawn(read_output(fd, stream, output.clone(), rx));
            }
        }
        drop(sandbox.take_stdin());

        // The sandbox's owner: answers accounting queries until it ends, then reaps it and
        // records how it ended.
        let ended = CancellationToken::new();
        let outcome = Arc::new(Mutex::new(None));
        let (usage_tx, mut usage_rx) = mpsc::channel::<oneshot::Sender<CgroupUsage>>(4);
        {
            let (ended, outcome, watch, stop) =
                (ended.clone(), outcome.clone(), watch.clone(), stop.clone());
            args.tracker.spawn(async move {
                let exited = watch.exited();
                tokio::pin!(exited);
                loop {
                    tokio::select! {
                        _ = &mut exited => break,
                        q = usage_rx.recv() => match q {
                            Some(tx) => { let _ = tx.send(sandbox.usage()); }
                            // The instance was dropped: it is being killed.
                            None => { let _ = sandbox.kill(); break; }
                        },
                    }
                }
                let o = sandbox.wait().await.ok();
                *outcome.lock().unwrap_or_else(|p| p.into_inner()) = o;
                stop.cancel();
                ended.cancel();
            });
        }

        let mut instance = LambdaInstance {
            id,
            version: f.version,
            memory_mb: f.resolved.memory_mb,
            init_duration: Duration::ZERO,
            runtime,
            watch,
            ended,
            outcome,
            usage: usage_tx,
            flushes,
            output,
        };
        let mut init = instance.runtime.init.clone();
        let settled = async {
            loop {
                match &*init.borrow_and_update() {
                    Init::Starting => {}
                    other => return other.clone(),
                }
                if init.changed().await.is_err() {
                    return Init::Starting;
                }
            }
        };
        let result = tokio::select! {
            s = settled => match s {
                Init::Ready => Ok(()),
                Init::Failed { error_type, body } => Err(InvokeError::InitFailed { error_type, body }),
                Init::Starting => Err(InvokeError::Internal("Runtime API server stopped".into())),
            },
            _ = instance.ended.cancelled() => Err(instance.exit_error(true)),
            _ = tokio::time::sleep_until(deadline) => Err(InvokeError::InitTimeout(init_timeout)),
            _ = args.cancel.cancelled() => Err(InvokeError::Draining),
        };
        instance.init_duration = started.elapsed();
        if let Err(e) = result {
            // Lines of a failed init are worth keeping: flush them before the kill.
            instance.flush().await;
            return Err(e);
        }
        Ok(instance)
    }

    pub fn is_alive(&self) -> bool {
        !self.ended.is_cancelled()
    }

    /// Why the instance ended, as an invocation error.
    fn exit_error(&self, during_init: bool) -> InvokeError {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match outcome {
            Some(o) if o.oom_killed => InvokeError::OutOfMemory {
                limit_mb: self.memory_mb,
            },
            Some(Outcome {
                status: ExitStatus::Signaled(sig),
                ..
            }) => InvokeError::Crashed {
                signal: sig,
                name: super::signal_name(sig),
            },
            Some(Outcome {
                status: ExitStatus::Exited(code),
                ..
            }) if during_init => InvokeError::InitFailed {
                error_type: "Runtime.ExitError".into(),
                body: Bytes::from(
                    serde_json::json!({
                        "errorType": "Runtime.ExitError",
                        "errorMessage": format!("Runtime exited with error: exit status {code}"),
                    })
                    .to_string(),
                ),
            },
            Some(Outcome {
                status: ExitStatus::Exited(code),
                ..
            }) => InvokeError::FunctionError(code),
            None => InvokeError::Internal("the instance ended without a status".into()),
        }
    }

    /// Reads what the function has written so far into the log, under the current attribution.
    async fn flush(&self) {
        for tx in &self.flushes {
            let (ack, done) = oneshot::channel();
            if tx.send(ack).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
            }
        }
    }

    /// Serves one invocation. On a timeout or cancel the instance is killed; after any error
    /// but a handler's own, it is not to be reused.
    pub async fn invoke(
        &self,
        ev: EventArgs<'_>,
        cancel: &CancellationToken,
    ) -> (Result<Payload, InvokeError>, InvokeLog) {
        self.output.begin(ev.request_id);
        self.output.agent_line(
            ev.request_id,
            &format!(
                "START RequestId: {} Version: {}",
                ev.request_id, self.version
            ),
        );
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let deadline_ms = SystemTime::now()
            .checked_add(ev.deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(SystemTime::now)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let event = Event {
            request_id: ev.request_id.to_string(),
            deadline_ms,
            function_arn: ev.function_arn,
            trace_id: trace_id(ev.request_id),
            client_context: ev.client_context,
            cognito_identity: None,
            body: ev.body,
            reply: tx,
        };
        let mut streaming = None;
        let result = if self.runtime.events.try_send(event).is_err() {
            Err(self.exit_error(false))
        } else {
            let deadline = tokio::time::Instant::from_std(ev.deadline);
            tokio::select! {
                r = rx => match r {
                    Ok(Reply::Response(body)) => Ok(Payload::Full(body)),
                    Ok(Reply::Stream { content_type, frames, finished }) => {
                        streaming = Some(finished);
                        Ok(Payload::Stream { content_type, frames, released: None })
                    }
                    Ok(Reply::Error { error_type, body }) => Err(InvokeError::Handler { error_type, body }),
                    Ok(Reply::TooLarge { limit }) => Err(InvokeError::ResponseTooLarge { limit }),
                    // The reply channel went with the instance.
                    Err(_) => {
                        self.ended.cancelled().await;
                        Err(self.exit_error(false))
                    }
                },
                _ = self.ended.cancelled() => Err(self.exit_error(false)),
                _ = tokio::time::sleep_until(deadline) => {
                    self.runtime.abandon_current();
                    let _ = self.watch.kill();
                    Err(InvokeError::Timeout(ev.deadline.saturating_duration_since(started)))
                }
                _ = cancel.cancelled() => {
                    let _ = self.watch.kill();
                    Err(InvokeError::Draining)
                }
            }
        };
        let duration = started.elapsed();
        if streaming.is_none() {
            self.flush().await;
        }
        (
            result,
            InvokeLog {
                started,
                streaming,
                duration,
                output: self.output.clone(),
            },
        )
    }

    /// Peak memory of the instance so far (its cgroup's high-water mark).
    pub async fn peak_memory(&self) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.usage.send(tx).await.ok()?;
        rx.await.ok()?.peak_memory_bytes
    }

    /// Kills the instance now (it is being reaped or replaced).
    pub fn kill(&self) {
        let _ = self.watch.kill();
    }
}

/// The end of an invocation's log: what [`LambdaInstance::invoke`] leaves for the caller to
/// finish (END and REPORT lines, then the tail).
pub struct InvokeLog {
    pub duration: Duration,
    started: Instant,
    /// A streamed answer: resolves when the runtime's response has ended.
    streaming: Option<oneshot::Receiver<()>>,
    output: Arc<Output>,
}

/// What an invocation answered.
pub enum Payload {
    Full(Bytes),
    /// Response streaming: the chunks as the runtime sends them.
    Stream {
        content_type: Option<String>,
        frames: mpsc::Receiver<runtime_api::StreamFrame>,
        /// Resolves once the instance is back in the warm pool (or gone): the answer ends
        /// only then, so a caller's next call finds the instance idle.
        released: Option<oneshot::Receiver<()>>,
    },
}

impl Payload {
    /// Bytes of a full answer (0 for a stream, which has not been read yet).
    pub fn len(&self) -> usize {
        match self {
            Payload::Full(b) => b.len(),
            Payload::Stream { .. } => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole answer: a stream is read to its end (the Invoke API answers buffered); an
    /// error the stream ended with is the handler's.
    pub async fn collect(self, limit: usize) -> Result<Bytes, InvokeError> {
        match self {
            Payload::Full(b) => Ok(b),
            Payload::Stream {
                frames, released, ..
            } => {
                let r = runtime_api::collect_stream(frames, limit).await;
                if let Some(r) = released {
                    let _ = r.await;
                }
                r.map_err(|(error_type, body)| InvokeError::Handler { error_type, body })
            }
        }
    }
}

impl LambdaInstance {
    /// For a streamed answer: waits until the runtime has finished it (within the deadline,
    /// else the instance is killed), so the instance can serve again. Returns whether it
    /// ended in time.
    pub async fn finish_stream(
        &self,
        log: &mut InvokeLog,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), InvokeError> {
        let Some(finished) = log.streaming.take() else {
            return Ok(());
        };
        let r = tokio::select! {
            _ = finished => Ok(()),
            _ = self.ended.cancelled() => Err(self.exit_error(false)),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                let _ = self.watch.kill();
                Err(InvokeError::Timeout(deadline.saturating_duration_since(log.started)))
            }
            _ = cancel.cancelled() => {
                let _ = self.watch.kill();
                Err(InvokeError::Draining)
            }
        };
        log.duration = log.started.elapsed();
        self.flush().await;
        r
    }
}

impl InvokeLog {
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// Writes a line under the invocation (REPORT and the like).
    pub fn agent_line(&self, request_id: &str, line: &str) {
        self.output.agent_line(request_id, line);
    }

    /// Ends the invocation's log attribution and returns its tail.
    pub fn finish(self) -> String {
        self.output.end()
    }
}

/// An X-Ray-shaped trace id derived from the request id (no tracing backend here; runtime
/// clients expect the header).
fn trace_id(request_id: &str) -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let hex: String = request_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(24)
        .collect();
    format!("Root=1-{secs:08x}-{hex:0<24};Parent=0000000000000000;Sampled=0")
}
