//! One running function instance. Exec mode (here): a fresh sandbox per invocation, the
//! request on stdin, the response on stdout, stderr to the function's log under the request id.
//! Lambda mode ([`lambda`]): a long-lived sandbox serving one invocation at a time through the
//! Runtime API ([`runtime_api`]).

pub mod lambda;
pub mod paired;
pub mod roaming;
pub mod runtime_api;
mod runtime_http;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use isolate::{ExitStatus, Isolator, PreparedSandbox, SandboxSpec, StdioSpec};

use crate::pool::REQUEST_ID_ENV;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::logs::Logs;
use crate::network::{FunctionNetwork, Network};

/// Why an invocation did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("no function named {0:?}")]
    NotFound(String),
    #[error("the function ran longer than its {0:?} timeout and was killed")]
    Timeout(Duration),
    #[error("the function ran out of memory ({limit_mb} MB) and was killed")]
    OutOfMemory { limit_mb: u64 },
    #[error("the function crashed: killed by signal {signal} ({name})")]
    Crashed { signal: i32, name: &'static str },
    #[error("the function failed: exit status {0}")]
    FunctionError(i32),
    /// A Lambda handler's own error, reported through the Runtime API; `body` is its
    /// `{errorMessage, errorType, stackTrace}`.
    #[error("the function's handler returned an error ({error_type})")]
    Handler { error_type: String, body: Bytes },
    #[error("the function's instance failed to start ({error_type})")]
    InitFailed { error_type: String, body: Bytes },
    #[error(
        "the function's instance did not ask for its first event within its {0:?} init timeout and was killed"
    )]
    InitTimeout(Duration),
    #[error("the function's response is larger than {limit} bytes")]
    ResponseTooLarge { limit: usize },
    #[error("{function} is at its concurrency limit ({limit}); retry later")]
    Overloaded { function: String, limit: u32 },
    /// The host's capacity (`[capacity]`) has no room for another instance, and no idle
    /// instance of another function could be evicted in time.
    #[error("{0}; retry later")]
    NoCapacity(crate::pool::capacity::Shortfall),
    #[error("the agent is shutting down")]
    Draining,
    #[error("the function could not be started: {0}")]
    Spawn(#[source] isolate::IsolateError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl InvokeError {
    /// The error kind of the API's JSON body and of the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokeError::NotFound(_) => "not_found",
            InvokeError::Timeout(_) => "timeout",
            InvokeError::OutOfMemory { .. } => "out_of_memory",
            InvokeError::Crashed { .. } => "crashed",
            InvokeError::FunctionError(_) => "function_error",
            InvokeError::Handler { .. } => "handler_error",
            InvokeError::InitFailed { .. } => "init_error",
            InvokeError::InitTimeout(_) => "init_timeout",
            InvokeError::ResponseTooLarge { .. } => "response_too_large",
            InvokeError::Overloaded { .. } => "overloaded",
            InvokeError::NoCapacity(s) => match s.resource() {
                "memory" => "capacity_memory",
                "cpu" => "capacity_cpu",
                _ => "capacity_instances",
            },
            InvokeError::Draining => "unavailable",
            InvokeError::Spawn(_) => "spawn_failed",
            InvokeError::Internal(_) => "internal",
        }
    }
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

/// What an exec invocation needs to know about the function.
pub struct ExecCall<'a> {
    pub spec: &'a SandboxSpec,
    pub function: &'a str,
    pub version: u64,
    pub request_id: &'a str,
    pub timeout: Duration,
    pub max_response: usize,
    pub memory_mb: u64,
    /// The function's network, when it has one.
    pub net: Option<&'a FunctionNetwork>,
    /// Variables for this call only (see [`crate::router::InvokeRequest::env`]).
    pub env: &'a [(String, String)],
}

/// An exec function's answer.
#[derive(Debug)]
pub struct ExecAnswer {
    /// All of its stdout (empty when it was streamed).
    pub output: Bytes,
    /// Its sandbox, when the function ended well and the rest is still to be torn down:
    /// [`isolate::Sandbox::wait`] (or its drop) once the answer is out.
    pub ending: Option<isolate::Sandbox>,
}

/// How much of a streamed exec function's stdout is read at a time (a pipe holds 64 KB).
const STREAM_READ: usize = 64 * 1024;

fn pipe_err(e: std::io::Error) -> InvokeError {
    InvokeError::Internal(format!("sandbox pipe: {e}"))
}

/// A fresh sandbox built ahead of an exec call.
pub enum Ready {
    /// Everything but the function's exec.
    Prepared(PreparedSandbox),
    /// With its function started, waiting on stdin (`start_ahead`).
    Started(crate::pool::StartedAhead),
}

/// Runs one exec-mode invocation. `cancel` kills it early (agent shutdown after the grace).
/// With `stdout`, the output goes there as the function writes it (each read of its pipe, as
/// read) and the answer is empty; without, the answer is all of it.
#[allow(clippy::too_many_arguments)]
pub async fn run_exec(
    isolator: &Arc<Isolator>,
    network: Option<&Arc<Network>>,
    logs: &Arc<Logs>,
    call: ExecCall<'_>,
    body: Bytes,
    stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
    ready: Option<Ready>,
    cancel: &CancellationToken,
) -> Result<ExecAnswer, InvokeError> {
    // The timeout covers the sandbox's setup too. A setup that overruns it finishes (or fails)
    // on its blocking thread, and the sandbox is dropped, hence killed, there.
    let deadline = tokio::time::Instant::now() + call.timeout;
    let request_id = call.request_id.to_string();
    // Built ahead of time: only the exec is left, which the sandbox is told to do without
    // waiting for it here (a write to an empty pipe); started ahead, not even that. Its I/O
    // goes on meanwhile; whether the exec failed is read only if the function does not end
    // well.
    let mut exec_report = None;
    let mut sandbox = match ready {
        Some(Ready::Started(started)) => {
            exec_report = Some(started.report);
            started.sandbox
        }
        Some(Ready::Prepared(prepared)) => {
            let (sandbox, report) = prepared
                .release(Some(&request_id))
                .map_err(InvokeError::Spawn)?;
            exec_report = Some(report);
            sandbox
        }
        None => {
            let mut spec = call.spec.clone();
            spec.stdio = StdioSpec::piped();
            // This sandbox serves this call only, whatever the spec says ([`run_reused`] serves
            // the functions that keep theirs).
            spec.reusable = false;
            spec.env.extend(call.env.iter().cloned());
            let spawn = if call.net.is_some() {
                // With a network the sandbox is prepared, given its veth, then started.
                let (iso, network, net) = (isolator.clone(), network.cloned(), call.net.cloned());
                tokio::task::spawn_blocking(move || {
                    crate::pool::prepare_sandbox(&iso, network.as_ref(), &spec, net.as_ref())
                        .and_then(|p| p.start(Some(&request_id)).map_err(InvokeError::Spawn))
                })
            } else {
                spec.env.insert(REQUEST_ID_ENV.into(), request_id);
                let iso = isolator.clone();
                tokio::task::spawn_blocking(move || iso.spawn(&spec).map_err(InvokeError::Spawn))
            };
            tokio::time::timeout_at(deadline, spawn)
                .await
                .map_err(|_| InvokeError::Timeout(call.timeout))?
                .map_err(|e| InvokeError::Internal(e.to_string()))??
        }
    };

    let take =
        |fd: Option<OwnedFd>| fd.ok_or_else(|| InvokeError::Internal("missing stdio pipe".into()));
    let pipes = isolate::RunPipes {
        stdin: take(sandbox.take_stdin())?,
        stdout: take(sandbox.take_stdout())?,
        stderr: take(sandbox.take_stderr())?,
    };
    // The instance is named after its cgroup leaf: unique, and what an operator finds on the host.
    let instance = sandbox
        .cgroup_path()
        .and_then(|p| p.rsplit('/').next().map(str::to_string))
        .unwrap_or_else(|| sandbox.pid().to_string());
    let limit = call.max_response;
    let run = exchange(logs, &call, instance, pipes, body, stdout)?;

    let outcome = tokio::select! {
        (out, res) = run => {
            let read = res.map_err(pipe_err)?;
            if read > limit {
                let _ = sandbox.kill();
                let _ = sandbox.wait().await;
                return Err(InvokeError::ResponseTooLarge { limit });
            }
            // Output closed: the function is exiting; its wait is bounded by the same timeout.
            // A success is answered as soon as the init reports it: the init's exit (the
            // namespaces' teardown), its reap and the cgroup's removal come after the answer.
            // A failure is answered once all of that is done.
            match tokio::time::timeout_at(deadline, sandbox.function_ended()).await {
                Ok(Ok(Some(o))) if o.status.success() && !o.oom_killed => {
                    return Ok(ExecAnswer {
                        output: Bytes::from(out),
                        ending: Some(sandbox),
                    });
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(InvokeError::Internal(e.to_string())),
                Err(_) => {
                    let _ = sandbox.kill();
                    let _ = sandbox.wait().await;
                    return Err(InvokeError::Timeout(call.timeout));
                }
            }
            match tokio::time::timeout_at(deadline, sandbox.wait()).await {
                Ok(o) => (o.map_err(|e| InvokeError::Internal(e.to_string()))?, out),
                Err(_) => {
                    let _ = sandbox.kill();
                    let _ = sandbox.wait().await;
                    return Err(InvokeError::Timeout(call.timeout));
                }
            }
        }
        _ = tokio::time::sleep_until(deadline) => {
            let _ = sandbox.kill();
            let _ = sandbox.wait().await;
            return Err(InvokeError::Timeout(call.timeout));
        }
        _ = cancel.cancelled() => {
            let _ = sandbox.kill();
            let _ = sandbox.wait().await;
            return Err(InvokeError::Draining);
        }
    };
    let (outcome, out) = outcome;
    // A sandbox whose exec failed ended without running the function: name the step.
    if let Some(report) = exec_report
        && !outcome.status.success()
    {
        report.result().map_err(InvokeError::Spawn)?;
    }
    if outcome.oom_killed {
        return Err(InvokeError::OutOfMemory {
            limit_mb: call.memory_mb,
        });
    }
    match outcome.status {
        ExitStatus::Exited(0) => Ok(ExecAnswer {
            output: Bytes::from(out),
            ending: None,
        }),
        ExitStatus::Exited(code) => Err(InvokeError::FunctionError(code)),
        ExitStatus::Signaled(sig) => Err(InvokeError::Crashed {
            signal: sig,
            name: signal_name(sig),
        }),
    }
}

/// The exchange with a running function: its input written to stdin, its stdout read (kept,
/// or passed on to `stdout` as read) up to one byte past the response limit, its stderr copied
/// to the function's log line by line under `instance`. Resolves once stdout and stderr are
/// closed: what was kept, and how much was read.
fn exchange<'a>(
    logs: &'a Arc<Logs>,
    call: &ExecCall<'a>,
    instance: String,
    pipes: isolate::RunPipes,
    body: Bytes,
    stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
) -> Result<impl std::future::Future<Output = (Vec<u8>, std::io::Result<usize>)> + 'a, InvokeError>
{
    let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(pipes.stdin).map_err(pipe_err)?;
    let out_pipe =
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipes.stdout).map_err(pipe_err)?;
    let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(pipes.stderr).map_err(pipe_err)?;
    let write = async move {
        let mut stdin = stdin;
        // A function that does not read its input is fine: ignore EPIPE.
        let _ = stdin.write_all(&body).await;
        drop(stdin);
    };
    let limit = call.max_response;
    // What was read (kept, or passed on) and how much: past `limit` the function is killed.
    let read_out = async move {
        let mut buf = Vec::new();
        let mut r = out_pipe.take(limit as u64 + 1);
        let Some(tx) = stdout else {
            let res = r.read_to_end(&mut buf).await.map(|_| buf.len());
            return (buf, res);
        };
        let mut total = 0;
        loop {
            let mut chunk = bytes::BytesMut::with_capacity(STREAM_READ);
            match r.read_buf(&mut chunk).await {
                Ok(0) => return (buf, Ok(total)),
                Ok(n) => {
                    total += n;
                    if total > limit {
                        return (buf, Ok(total));
                    }
                    // A caller that went away is the router's to notice (it drops this call).
                    let _ = tx.send(chunk.freeze()).await;
                }
                Err(e) => return (buf, Err(e)),
            }
        }
    };
    let (function, version, request_id) = (call.function, call.version, call.request_id);
    let read_err = async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            logs.append_from_instance(function, version, request_id, &instance, "stderr", &line);
        }
    };
    Ok(async move {
        let ((), (out, out_res), ()) = tokio::join!(write, read_out, read_err);
        (out, out_res)
    })
}

/// Runs one exec-mode invocation in a sandbox kept between calls (`reuse_sandbox`), as
/// [`run_exec`] does in a fresh one: in `started`, the process started ahead for it
/// (`start_ahead`), else in a new one. Also says whether the sandbox may serve the next call: it
/// may after the function ended by itself, well or not (its init has killed whatever the call
/// left); not after a kill (timeout, response too large, shutdown) or an OOM kill, nor when
/// the sandbox itself failed.
pub async fn run_reused(
    logs: &Arc<Logs>,
    call: ExecCall<'_>,
    body: Bytes,
    stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
    sandbox: &mut isolate::ReusableSandbox,
    started: Option<isolate::RunPipes>,
    cancel: &CancellationToken,
) -> (Result<Bytes, InvokeError>, bool) {
    let deadline = tokio::time::Instant::now() + call.timeout;
    let timeout = call.timeout;
    let pipes = match started {
        Some(p) => p,
        None => match sandbox.run(Some(call.request_id), call.env) {
            Ok(p) => p,
            Err(e) => return (Err(InvokeError::Spawn(e)), false),
        },
    };
    let instance = sandbox
        .sandbox()
        .cgroup_path()
        .and_then(|p| p.rsplit('/').next().map(str::to_string))
        .unwrap_or_else(|| sandbox.sandbox().pid().to_string());
    let limit = call.max_response;
    let memory_mb = call.memory_mb;
    let run = match exchange(logs, &call, instance, pipes, body, stdout) {
        Ok(run) => run,
        Err(e) => {
            let _ = sandbox.kill();
            return (Err(e), false);
        }
    };
    let killed = |sandbox: &isolate::ReusableSandbox, e: InvokeError| {
        let _ = sandbox.kill();
        (Err(e), false)
    };
    tokio::select! {
        (out, res) = run => {
            let read = match res {
                Ok(n) => n,
                Err(e) => return killed(sandbox, pipe_err(e)),
            };
            if read > limit {
                return killed(sandbox, InvokeError::ResponseTooLarge { limit });
            }
            match tokio::time::timeout_at(deadline, sandbox.run_ended()).await {
                Ok(Ok(Some(end))) if end.oom_killed => {
                    (Err(InvokeError::OutOfMemory { limit_mb: memory_mb }), false)
                }
                Ok(Ok(Some(end))) => match end.status {
                    ExitStatus::Exited(0) => (Ok(Bytes::from(out)), true),
                    ExitStatus::Exited(code) => (Err(InvokeError::FunctionError(code)), true),
                    ExitStatus::Signaled(sig) => (
                        Err(InvokeError::Crashed {
                            signal: sig,
                            name: signal_name(sig),
                        }),
                        true,
                    ),
                },
                // The sandbox itself ended: its init was killed, by the OOM killer if the
                // group says so.
                Ok(Ok(None)) => {
                    let e = match sandbox.sandbox().usage().oom_kills {
                        0 => InvokeError::Internal("the function's sandbox ended during the call".into()),
                        _ => InvokeError::OutOfMemory { limit_mb: memory_mb },
                    };
                    (Err(e), false)
                }
                Ok(Err(e)) => (Err(InvokeError::Spawn(e)), false),
                Err(_) => killed(sandbox, InvokeError::Timeout(timeout)),
            }
        }
        _ = tokio::time::sleep_until(deadline) => killed(sandbox, InvokeError::Timeout(timeout)),
        _ = cancel.cancelled() => killed(sandbox, InvokeError::Draining),
    }
}
