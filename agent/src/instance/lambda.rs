//! One Lambda-mode instance: a long-running sandbox whose runtime polls the Runtime API for
//! events, serving one invocation at a time and kept warm between them.
//!
//! Life: [`LambdaInstance::start`] starts the sandbox (a prepared one when ready), serves the
//! Runtime API on the listener inside its network namespace and waits for the runtime's first
//! `/next` (the end of init). [`LambdaInstance::invoke`] hands it an event and waits for the
//! answer within the deadline. A timeout, a crash or an exit ends the instance; dropping it
//! kills the sandbox and removes its cgroup.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use isolate::{ExitStatus, Isolator, Outcome, PeakMemory, PreparedSandbox, Sandbox, SandboxWatch};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::InvokeError;
use super::runtime_api::{self, Event, Init, Invocation, Reply, RuntimeHandle};
use crate::logs::{AgentLine, Logs};
use crate::placement;
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
    /// The caller asked for the log tail (`X-Amz-Log-Type: Tail`): keep the call's lines.
    pub keep_tail: bool,
}

/// Lines the instance writes, attributed to the invocation it is serving (or to its init).
struct LogTap {
    request_id: String,
    /// The current invocation's caller wants its tail: `tail` is kept.
    keep_tail: bool,
    /// The current invocation's lines, newest last, for the Tail log type.
    tail: Vec<String>,
    tail_bytes: usize,
    /// The agent's lines not yet in the function's log (START until the function writes
    /// something, END and REPORT until the invocation ends): they go out in one write.
    unwritten: Vec<AgentLine>,
}

impl LogTap {
    fn push(&mut self, line: &str) {
        if !self.keep_tail {
            return;
        }
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
    fn lock(&self) -> std::sync::MutexGuard<'_, LogTap> {
        self.tap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the agent's lines held back so far (under the tap's lock: they keep their place
    /// before whatever the function writes next).
    fn write_unwritten(&self, tap: &mut LogTap) {
        if tap.unwritten.is_empty() {
            return;
        }
        self.logs.append_agent_lines(
            &self.function,
            self.version,
            Some(&self.instance),
            &tap.unwritten,
        );
        tap.unwritten.clear();
    }

    fn line(&self, stream: &str, line: &str) {
        let mut tap = self.lock();
        self.write_unwritten(&mut tap);
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

    /// An agent line (START/END/REPORT) in the invocation's tail now, and in the function's
    /// log with the next line the function writes or at the invocation's end.
    pub fn agent_line(&self, request_id: &str, line: String) {
        let mut tap = self.lock();
        tap.push(&line);
        tap.unwritten.push(AgentLine {
            at: time::OffsetDateTime::now_utc(),
            request_id: request_id.to_string(),
            line,
        });
    }

    fn begin(&self, request_id: &str, keep_tail: bool) {
        let mut tap = self.lock();
        self.write_unwritten(&mut tap);
        tap.request_id.clear();
        tap.request_id.push_str(request_id);
        tap.keep_tail = keep_tail;
        tap.tail.clear();
        tap.tail_bytes = 0;
    }

    /// Ends the invocation's attribution; returns its last [`TAIL_BYTES`] of log.
    fn end(&self) -> String {
        let mut tap = self.lock();
        self.write_unwritten(&mut tap);
        tap.request_id.clear();
        tap.request_id.push('-');
        if !std::mem::take(&mut tap.keep_tail) {
            return String::new();
        }
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

/// One of the instance's output pipes (stdout, stderr), read into lines by its reader task as
/// data comes, and drained by the invoking task when an invocation ends ([`OutPipe::drain`]):
/// whatever the function wrote before posting its answer is logged under that invocation,
/// not the next one, without a round trip to the reader.
struct OutPipe {
    pipe: tokio::net::unix::pipe::Receiver,
    stream: &'static str,
    /// Held from a read until its lines are emitted, so a drain never overtakes a read.
    state: Mutex<PipeState>,
}

struct PipeState {
    /// An unfinished line.
    pending: Vec<u8>,
    closed: bool,
}

/// Bytes read from a pipe at a time, into a buffer on the reading thread's stack: an idle
/// instance holds no read buffer (with 1,000 instances, two 16 KiB buffers each were 32 MiB of
/// the agent's memory).
const PIPE_READ: usize = 16 * 1024;

impl OutPipe {
    fn new(fd: OwnedFd, stream: &'static str) -> std::io::Result<OutPipe> {
        Ok(OutPipe {
            pipe: tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?,
            stream,
            state: Mutex::new(PipeState {
                pending: Vec::new(),
                closed: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits what was read into lines.
    fn emit(&self, pending: &mut Vec<u8>, data: &[u8], out: &Output) {
        pending.extend_from_slice(data);
        let mut from = 0;
        while let Some(nl) = pending[from..].iter().position(|&b| b == b'\n') {
            let line = &pending[from..from + nl];
            out.line(
                self.stream,
                String::from_utf8_lossy(line).trim_end_matches('\r'),
            );
            from += nl + 1;
        }
        pending.drain(..from);
        // A line longer than the log keeps is cut rather than buffered without bound.
        if pending.len() > 64 * 1024 {
            out.line(self.stream, &String::from_utf8_lossy(pending));
            pending.clear();
        }
    }

    /// The partial line, logged as it is (the invocation ends, or the pipe).
    fn emit_partial(&self, pending: &mut Vec<u8>, out: &Output) {
        if !pending.is_empty() {
            out.line(self.stream, &String::from_utf8_lossy(pending));
            pending.clear();
        }
    }

    /// Drains the pipe right now (from the invoking task): `readable` from a poll of the
    /// descriptor says whether a read is worth a system call.
    fn drain(&self, st: &mut PipeState, readable: bool, out: &Output) {
        if st.closed {
            return;
        }
        let PipeState { pending, closed } = st;
        if readable {
            let mut buf = [0u8; PIPE_READ];
            loop {
                match nix::unistd::read(&self.pipe, &mut buf) {
                    Ok(0) => {
                        *closed = true;
                        break;
                    }
                    Ok(n) => self.emit(pending, &buf[..n], out),
                    Err(nix::errno::Errno::EINTR) => continue,
                    // EAGAIN: empty now; the reader task sees what comes later.
                    Err(_) => break,
                }
            }
        }
        self.emit_partial(pending, out);
    }
}

/// Reads one of the instance's output pipes into lines until it closes.
async fn read_output(p: Arc<OutPipe>, out: Arc<Output>) {
    loop {
        if p.pipe.readable().await.is_err() {
            break;
        }
        if !read_ready(&p, &out) {
            break;
        }
    }
}

/// Reads what a pipe holds now (its buffer on the stack, not in the reader task's future);
/// false once it has closed.
fn read_ready(p: &OutPipe, out: &Output) -> bool {
    let mut st = p.lock();
    let PipeState { pending, closed } = &mut *st;
    if *closed {
        return false;
    }
    let mut buf = [0u8; PIPE_READ];
    loop {
        // tokio's try_read: a WouldBlock clears the readiness, so the next await waits.
        match p.pipe.try_read(&mut buf) {
            Ok(0) => {
                *closed = true;
                break;
            }
            Ok(n) => p.emit(pending, &buf[..n], out),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                *closed = true;
                break;
            }
        }
    }
    if *closed {
        p.emit_partial(pending, out);
        return false;
    }
    true
}

/// The Runtime API's server taken out of its instance while a task drives it; put back (after a
/// last poll without a waker, see [`runtime_api::Server::park`]) when the driving ends, or is
/// dropped half-way.
struct Driving<'a> {
    home: &'a Mutex<Option<runtime_api::Server>>,
    server: Option<runtime_api::Server>,
    /// An invocation leaves the last poll to its end ([`PendingEnd::write`]), after the
    /// caller's answer: the runtime's 202 is written then.
    park: bool,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            if self.park {
                s.park();
            }
            let mut home = self.home.lock().unwrap_or_else(|p| p.into_inner());
            if home.is_none() {
                *home = Some(s);
            }
        }
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
    /// The Runtime API's server, driven by the task waiting on the instance (see
    /// [`runtime_api::Server`]); the sandbox's owner task drops it once the sandbox has ended.
    server: Arc<Mutex<Option<runtime_api::Server>>>,
    watch: SandboxWatch,
    /// Cancelled once the sandbox has ended and its outcome is known.
    ended: CancellationToken,
    /// False once the sandbox has ended (before `ended` is cancelled).
    alive: Arc<AtomicBool>,
    outcome: Arc<Mutex<Option<Outcome>>>,
    /// The output side: pipes, log attribution, peak memory, and the last invocation's END
    /// and REPORT while they are not yet written.
    ending: Arc<Ending>,
    /// Which CPUs the instance runs on ([`crate::placement`]).
    placement: Arc<Placement>,
    /// The deadline timer of its calls, kept from one call to the next.
    call_timer: CallTimer,
}

/// An instance's call deadline timer, kept between calls. A kept timer re-armed for a later
/// deadline only moves its expiry. A new one is inserted into tokio's timer wheel, and as it
/// is due before the earliest timer the event loop saw when it last slept (a connection's idle
/// timeout), tokio wakes that loop through its eventfd: one more `write` per warm call. Each
/// HTTP thread is an event loop with timers of its own: a timer is only reused on the thread
/// that made it.
#[derive(Default)]
struct CallTimer(Mutex<Option<KeptTimer>>);

struct KeptTimer {
    thread: Option<usize>,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl CallTimer {
    /// A timer due at `deadline`: the kept one when it was made on this thread.
    fn arm(&self, deadline: tokio::time::Instant) -> KeptTimer {
        let thread = crate::api::listener::serving_thread();
        let kept = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|k| k.thread == thread);
        match kept {
            Some(mut k) => {
                k.sleep.as_mut().reset(deadline);
                k
            }
            None => KeptTimer {
                thread,
                sleep: Box::pin(tokio::time::sleep_until(deadline)),
            },
        }
    }

    fn keep(&self, timer: KeptTimer) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(timer);
    }
}

/// Where an instance runs: on one CPU, that of the HTTP thread that served its last call, or
/// on every CPU while its calls run long. Changed after a call's answer, off the caller's path.
struct Placement {
    id: String,
    watch: SandboxWatch,
    /// The CPU the instance is pinned to; [`ANY_CPU`]: every CPU.
    placed_on: AtomicUsize,
    /// A call ran past [`placement::SHORT_CALL`]: the instance keeps every CPU until a call
    /// ends sooner.
    long_calls: AtomicBool,
}

const ANY_CPU: usize = usize::MAX;

impl Placement {
    fn is_pinned(&self) -> bool {
        self.placed_on.load(Ordering::Relaxed) != ANY_CPU
    }

    /// After a call served on `cpu`'s HTTP thread: the instance onto that CPU, unless it is
    /// there already or its calls run long.
    fn colocate(&self, cpu: usize) {
        if self.long_calls.load(Ordering::Relaxed) || self.placed_on.load(Ordering::Relaxed) == cpu
        {
            return;
        }
        match self.watch.set_cpus(&[cpu]) {
            Ok(_) => self.placed_on.store(cpu, Ordering::Relaxed),
            Err(e) => tracing::debug!(instance = %self.id, cpu, "pinning an instance: {e}"),
        }
    }

    /// A call past [`placement::SHORT_CALL`]: every CPU back, for this call and the next ones
    /// until one ends sooner.
    fn release(&self) {
        self.long_calls.store(true, Ordering::Relaxed);
        let Some(all) = placement::all_cpus() else {
            return;
        };
        if self.placed_on.swap(ANY_CPU, Ordering::Relaxed) != ANY_CPU
            && let Err(e) = self.watch.set_cpus(all)
        {
            tracing::warn!(instance = %self.id, "releasing an instance to every CPU: {e}");
        }
    }
}

/// What ends an invocation's log: the function's pipes and log attribution, the cgroup's peak
/// memory (read through a descriptor kept open), and an invocation whose END and REPORT are
/// still to be written. Shared with the task that writes them after the answer.
struct Ending {
    pipes: Vec<Arc<OutPipe>>,
    output: Arc<Output>,
    peak: Option<PeakMemory>,
    pending: Mutex<Option<(EndReport, InvokeLog)>>,
}

/// What an invocation's REPORT says besides its duration and peak memory.
pub struct EndReport {
    pub request_id: String,
    pub memory_mb: u64,
    pub init: Option<Duration>,
    pub error_kind: Option<&'static str>,
}

/// An invocation's END and REPORT, to be written by [`PendingEnd::write`] after the answer
/// (or by the instance's next invocation before its START, whichever comes first).
pub struct PendingEnd {
    ending: Arc<Ending>,
    server: Arc<Mutex<Option<runtime_api::Server>>>,
    placement: Arc<Placement>,
    /// The CPU of the HTTP thread that served the call, if pinned.
    serving_cpu: Option<usize>,
}

impl PendingEnd {
    /// Writes END and REPORT, then polls the Runtime API once (the runtime's 202 for its
    /// answer, held back until now); returns the log tail.
    pub fn write(&self) -> Option<String> {
        let tail = self.ending.write_pending();
        // Taken by the next invocation already: it serves the connection itself.
        if let Some(s) = self
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            s.park();
        }
        if let Some(cpu) = self.serving_cpu {
            self.placement.colocate(cpu);
        }
        tail
    }
}

impl Ending {
    /// Reads what the function has written so far into the log, under the current
    /// attribution: one poll of the pipes, and reads only of those holding data.
    fn flush(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        // Both pipes locked first: a reader task in the middle of a read finishes its lines.
        let mut states: Vec<_> = self.pipes.iter().map(|p| p.lock()).collect();
        let mut fds: Vec<PollFd<'_>> = self
            .pipes
            .iter()
            .map(|p| PollFd::new(p.pipe.as_fd(), PollFlags::POLLIN))
            .collect();
        let polled = poll(&mut fds, PollTimeout::ZERO).is_ok();
        let readable: Vec<bool> = fds
            .iter()
            // On a failed poll, read anyway: a read of an empty pipe only costs EAGAIN.
            .map(|f| !polled || f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        for ((p, st), readable) in self.pipes.iter().zip(&mut states).zip(readable) {
            p.drain(st, readable, &self.output);
        }
    }

    /// Writes the pending invocation's END and REPORT, after the function's last lines;
    /// returns its log tail (None when nothing was pending).
    fn write_pending(&self) -> Option<String> {
        let (end, log) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        self.flush();
        let peak = self.peak.as_ref().and_then(PeakMemory::read);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let id = &end.request_id;
        let mut report = format!(
            "REPORT RequestId: {id}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB\tMax Memory Used: {} MB",
            ms(log.duration),
            log.duration.as_micros().div_ceil(1000),
            end.memory_mb,
            peak.map_or(0, |b| b.div_ceil(1 << 20)),
        );
        if let Some(init) = end.init {
            report.push_str(&format!("\tInit Duration: {:.2} ms", ms(init)));
        }
        if let Some(kind) = end.error_kind {
            report.push_str(&format!("\tStatus: {kind}"));
        }
        log.agent_line(id, format!("END RequestId: {id}"));
        log.agent_line(id, report);
        Some(log.finish())
    }
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

/// A sandbox on its way to run: prepared and not yet released, or already running.
enum Begun {
    Prepared(PreparedSandbox),
    Running(Sandbox),
}

/// What an instance takes from its sandbox before the function runs: the Runtime API on the
/// sandbox's listener, the output readers, the pidfd watch and the peak-memory descriptor.
struct Wiring {
    id: String,
    watch: SandboxWatch,
    stop: CancellationToken,
    runtime: RuntimeHandle,
    server: Arc<Mutex<Option<runtime_api::Server>>>,
    peak: Option<PeakMemory>,
    output: Arc<Output>,
    pipes: Vec<Arc<OutPipe>>,
}

impl Wiring {
    fn of(
        sandbox: &mut Sandbox,
        f: &ActiveFunction,
        logs: &Arc<Logs>,
        max_response: usize,
    ) -> Result<Wiring, InvokeError> {
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
        let (runtime, mut server) = runtime_api::server(listener, stop.clone(), max_response)
            .map_err(|e| InvokeError::Internal(format!("serving the Runtime API: {e}")))?;
        if let Some(notifier) = sandbox.take_connect_notifier() {
            server.serve_paired(super::paired::answer_connects(
                notifier,
                id.clone(),
                stop.clone(),
            ));
        }
        // Without it REPORT says 0 MB; not worth failing the start for.
        let peak = sandbox.peak_memory().unwrap_or_else(|e| {
            tracing::debug!(instance = %id, "peak memory not readable: {e}");
            None
        });
        let output = Arc::new(Output {
            tap: Mutex::new(LogTap {
                request_id: "init".into(),
                keep_tail: false,
                tail: Vec::new(),
                tail_bytes: 0,
                unwritten: Vec::new(),
            }),
            logs: logs.clone(),
            function: f.name.clone(),
            version: f.version,
            instance: id.clone(),
        });
        let mut pipes = Vec::new();
        for (fd, stream) in [
            (sandbox.take_stdout(), "stdout"),
            (sandbox.take_stderr(), "stderr"),
        ] {
            if let Some(fd) = fd {
                let pipe = Arc::new(
                    OutPipe::new(fd, stream)
                        .map_err(|e| InvokeError::Internal(format!("sandbox pipe: {e}")))?,
                );
                pipes.push(pipe.clone());
                tokio::spawn(read_output(pipe, output.clone()));
            }
        }
        drop(sandbox.take_stdin());
        Ok(Wiring {
            id,
            watch,
            stop,
            runtime,
            server: Arc::new(Mutex::new(Some(server))),
            peak,
            output,
            pipes,
        })
    }
}

impl LambdaInstance {
    /// Starts an instance and waits for its runtime's first `/next`.
    ///
    /// The Runtime API and the output readers are set up before a prepared sandbox is
    /// released (the listener, the pipes and the pidfd exist since it was prepared), and
    /// nothing waits for its exec: the runtime's first `/next` says it runs. A failed exec ends
    /// the sandbox; its report then names the step.
    pub async fn start(args: StartArgs<'_>) -> Result<LambdaInstance, InvokeError> {
        let f = args.function;
        let init_timeout = Duration::from_secs_f64(f.resolved.init_timeout_s);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + init_timeout;
        let mut begun = match args.prepared {
            Some(p) => Begun::Prepared(p),
            None if f.net.is_some() => {
                // A sandbox with a network is prepared (veth, address, rules), then released.
                let (iso, network, f) = (args.isolator.clone(), args.network.cloned(), f.clone());
                let prepare = tokio::task::spawn_blocking(move || {
                    crate::pool::prepare_sandbox(&iso, network.as_ref(), &f.spec, f.net.as_ref())
                });
                let prepared = tokio::time::timeout_at(deadline, prepare)
                    .await
                    .map_err(|_| InvokeError::InitTimeout(init_timeout))?
                    .map_err(|e| InvokeError::Internal(e.to_string()))??;
                Begun::Prepared(prepared)
            }
            None => {
                let iso = args.isolator.clone();
                let spec = f.spec.clone();
                let spawn = tokio::task::spawn_blocking(move || iso.spawn(&spec));
                let sandbox = tokio::time::timeout_at(deadline, spawn)
                    .await
                    .map_err(|_| InvokeError::InitTimeout(init_timeout))?
                    .map_err(|e| InvokeError::Internal(e.to_string()))?
                    .map_err(InvokeError::Spawn)?;
                Begun::Running(sandbox)
            }
        };
        // Wired up before a prepared sandbox is released, so that nothing of the agent's own
        // setup can lie between the runtime's connect and its first `/next` being served (on
        // this host the exec takes longer than the wiring, so either order measured the same).
        let wiring = {
            let sandbox = match &mut begun {
                Begun::Prepared(p) => p.sandbox_mut().map_err(InvokeError::Spawn)?,
                Begun::Running(s) => s,
            };
            Wiring::of(sandbox, f, args.logs, args.max_response)?
        };
        let (mut sandbox, exec_report) = match begun {
            Begun::Prepared(p) => {
                let (sandbox, report) = p.release(None).map_err(InvokeError::Spawn)?;
                (sandbox, Some(report))
            }
            Begun::Running(sandbox) => (sandbox, None),
        };
        let Wiring {
            id,
            watch,
            stop,
            runtime,
            server,
            peak,
            output,
            pipes,
        } = wiring;

        // The sandbox's owner: reaps it once it ends (killed by the instance's drop, or on
        // its own) and records how it ended. The Runtime API goes only then: a long poll
        // answered (or a connection closed) earlier would only make the runtime fail loudly
        // before the kill lands.
        let ended = CancellationToken::new();
        let alive = Arc::new(AtomicBool::new(true));
        let outcome = Arc::new(Mutex::new(None));
        {
            let (ended, alive, outcome, stop) =
                (ended.clone(), alive.clone(), outcome.clone(), stop.clone());
            let (server, kill) = (server.clone(), args.cancel.clone());
            args.tracker.spawn(async move {
                // The shutdown's grace is over: the instance goes, idle or serving (a call in
                // flight then ends as Draining). Watched here, once per instance, rather than
                // by every call.
                let o = tokio::select! {
                    o = sandbox.wait() => o.ok(),
                    () = kill.cancelled() => {
                        let _ = sandbox.kill();
                        sandbox.wait().await.ok()
                    }
                };
                *outcome.lock().unwrap_or_else(|p| p.into_inner()) = o;
                alive.store(false, Ordering::Release);
                stop.cancel();
                ended.cancel();
                drop(server.lock().unwrap_or_else(|p| p.into_inner()).take());
            });
        }

        let (placement_id, placement_watch) = (id.clone(), watch.clone());
        let mut instance = LambdaInstance {
            id,
            version: f.version,
            memory_mb: f.resolved.memory_mb,
            init_duration: Duration::ZERO,
            runtime,
            server,
            watch,
            ended,
            alive,
            outcome,
            ending: Arc::new(Ending {
                pipes,
                output,
                peak,
                pending: Mutex::new(None),
            }),
            placement: Arc::new(Placement {
                id: placement_id,
                watch: placement_watch,
                placed_on: AtomicUsize::new(ANY_CPU),
                long_calls: AtomicBool::new(false),
            }),
            call_timer: CallTimer::default(),
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
        let result = instance.serving(async { tokio::select! {
            s = settled => match s {
                Init::Ready => Ok(()),
                Init::Failed { error_type, body } => Err(InvokeError::InitFailed { error_type, body }),
                Init::Starting => Err(InvokeError::Internal("Runtime API server stopped".into())),
            },
            _ = instance.ended.cancelled() => Err(match exec_report {
                // Ended before its first /next: a failed exec says which step failed (the
                // report is there: every writer of it has exited).
                Some(report) => match tokio::task::spawn_blocking(move || report.result()).await {
                    Ok(Err(e)) => InvokeError::Spawn(e),
                    _ => instance.exit_error(true),
                },
                None => instance.exit_error(true),
            }),
            _ = tokio::time::sleep_until(deadline) => Err(InvokeError::InitTimeout(init_timeout)),
            _ = args.cancel.cancelled() => Err(InvokeError::Draining),
        }}).await;
        instance.init_duration = started.elapsed();
        if let Err(e) = result {
            // Lines of a failed init are worth keeping: flush them before the kill.
            instance.flush();
            return Err(e);
        }
        Ok(instance)
    }

    /// The call's deadline; a pinned instance is released to every CPU on the way if the call
    /// runs long.
    async fn deadline(&self, timer: &mut KeptTimer, pinned: bool) {
        if pinned {
            let release = tokio::time::Instant::now() + placement::SHORT_CALL;
            if release < timer.sleep.deadline() {
                tokio::time::sleep_until(release).await;
                self.placement.release();
            }
        }
        timer.sleep.as_mut().await
    }

    /// Lock-free: the warm pool asks it of every idle instance on every call.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The HTTP thread whose event loop the runtime's connection is registered with.
    pub fn home(&self) -> Option<usize> {
        self.runtime.home()
    }

    /// Drives the Runtime API's server while `until` runs (the instance's start, an
    /// invocation): the runtime's requests are served by this task.
    async fn serving<T>(&self, until: impl Future<Output = T>) -> T {
        self.drive(until, true).await
    }

    /// [`LambdaInstance::serving`], for an invocation: the server's last poll is left to the
    /// invocation's end ([`PendingEnd::write`]).
    async fn serving_call<T>(&self, until: impl Future<Output = T>) -> T {
        self.drive(until, false).await
    }

    async fn drive<T>(&self, until: impl Future<Output = T>, park: bool) -> T {
        let taken = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(server) = taken else {
            // The sandbox has ended (its owner dropped the server): nothing to serve.
            return until.await;
        };
        let mut driving = Driving {
            home: &self.server,
            server: Some(server),
            park,
        };
        match driving.server.as_mut() {
            Some(s) => s.drive(until).await,
            None => until.await,
        }
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

    /// Why a call's instance ended under it: killed at the end of the shutdown's grace (its
    /// owner watches `cancel`), or on its own.
    fn ended_error(&self, cancel: &CancellationToken) -> InvokeError {
        if cancel.is_cancelled() {
            InvokeError::Draining
        } else {
            self.exit_error(false)
        }
    }

    /// Reads what the function has written so far into the log.
    fn flush(&self) {
        self.ending.flush();
    }

    /// Serves one invocation. On a timeout or cancel the instance is killed; after any error
    /// but a handler's own, it is not to be reused.
    pub async fn invoke(
        &self,
        ev: EventArgs<'_>,
        cancel: &CancellationToken,
    ) -> (Result<Payload, InvokeError>, InvokeLog) {
        // The previous invocation's END and REPORT, if its task has not written them yet.
        self.ending.write_pending();
        self.ending.output.begin(ev.request_id, ev.keep_tail);
        self.ending.output.agent_line(
            ev.request_id,
            format!(
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
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let event = Event {
            invocation: Invocation {
                request_id: ev.request_id.to_string(),
                deadline_ms,
                function_arn: ev.function_arn,
                trace_id: trace_id(ev.request_id),
                client_context: ev.client_context,
                cognito_identity: None,
                body: ev.body,
            },
            reply: tx,
        };
        let mut streaming = None;
        let pinned = self.placement.is_pinned();
        let result = if self.runtime.events.try_send(event).is_err() {
            Err(self.exit_error(false))
        } else {
            let mut timer = self
                .call_timer
                .arm(tokio::time::Instant::from_std(ev.deadline));
            let r = self.serving_call(async { tokio::select! {
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
                        Err(self.ended_error(cancel))
                    }
                },
                _ = self.ended.cancelled() => Err(self.ended_error(cancel)),
                _ = self.deadline(&mut timer, pinned) => {
                    self.runtime.abandon_current();
                    let _ = self.watch.kill();
                    Err(InvokeError::Timeout(ev.deadline.saturating_duration_since(started)))
                }
            }}).await;
            self.call_timer.keep(timer);
            r
        };
        let duration = started.elapsed();
        if duration < placement::SHORT_CALL && self.placement.long_calls.load(Ordering::Relaxed) {
            self.placement.long_calls.store(false, Ordering::Relaxed);
        }
        // What the function wrote meanwhile is flushed into the log by whoever ends the
        // invocation ([`LambdaInstance::flush`], before END), after the answer went out; a
        // streamed answer's end flushes it itself.
        (
            result,
            InvokeLog {
                started,
                streaming,
                duration,
                output: self.ending.output.clone(),
            },
        )
    }

    /// Ends an invocation's log: END and REPORT are written by [`PendingEnd::write`] (after
    /// the answer), or before this instance's next invocation starts, whichever is first.
    pub fn end_later(&self, end: EndReport, log: InvokeLog) -> PendingEnd {
        *self
            .ending
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((end, log));
        PendingEnd {
            ending: self.ending.clone(),
            server: self.server.clone(),
            placement: self.placement.clone(),
            serving_cpu: placement::serving_cpu(),
        }
    }

    /// Ends an invocation's log now; returns its tail.
    pub fn end_now(&self, end: EndReport, log: InvokeLog) -> String {
        self.end_later(end, log).write().unwrap_or_default()
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
        released: Option<oneshot::Receiver<Settled>>,
    },
}

/// How a streamed invocation ended, once its instance is settled.
#[derive(Debug)]
pub struct Settled {
    /// The invocation's log tail (the last 4 KB, END and REPORT included).
    pub log_tail: String,
    /// What ended the stream on the agent's side (a timeout, the instance dying), if
    /// anything did; an error the runtime reported is in the stream's last frame.
    pub error: Option<InvokeError>,
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
        let r = self
            .serving(async {
                tokio::select! {
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
                }
            })
            .await;
        log.duration = log.started.elapsed();
        self.flush();
        r
    }
}

impl InvokeLog {
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// Writes a line under the invocation (REPORT and the like).
    pub fn agent_line(&self, request_id: &str, line: String) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_kept_call_timer_fires_at_each_calls_own_deadline() {
        let timers = CallTimer::default();
        let start = tokio::time::Instant::now();
        // A first call's timer, kept after the call ended early.
        let first = timers.arm(start + Duration::from_millis(50));
        timers.keep(first);
        // The next call's later deadline moves the kept timer: it does not fire at the first.
        let mut second = timers.arm(start + Duration::from_millis(200));
        assert!(
            tokio::time::timeout_at(start + Duration::from_millis(150), second.sleep.as_mut())
                .await
                .is_err(),
            "fired at the earlier call's deadline"
        );
        second.sleep.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        timers.keep(second);
        // Fired and kept, then armed earlier than before: it fires again, at the new deadline.
        let now = tokio::time::Instant::now();
        let mut third = timers.arm(now + Duration::from_millis(20));
        third.sleep.as_mut().await;
        assert_eq!(now.elapsed(), Duration::from_millis(20));
    }
}
