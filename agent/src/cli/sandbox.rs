//! `fnlet sandbox run`: one program in exactly the sandbox a function gets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use isolate::{Bind, ExitStatus, Isolator, IsolatorConfig, SandboxSpec, StdioSpec};

use crate::units::{format_size, parse_size};

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Run PROGRAM in a function sandbox, passing stdin/stdout/stderr through.
    ///
    /// The program sees what a function sees: the bundle read-only at /var/task, the host's
    /// runtime directories read-only, a private /proc, a minimal /dev, a size-limited /tmp, only a
    /// loopback network, an unprivileged uid, no capabilities and a seccomp filter. fnlet exits
    /// with the program's status (128+N when killed by signal N; 125 when the sandbox could not
    /// be set up).
    ///
    /// Example: fnlet sandbox run --bundle ./hello --memory 64M -- /var/task/bootstrap
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory mounted read-only at /var/task.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Memory limit (swap off), e.g. 128M.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    memory: u64,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long, default_value_t = 1.0)]
    cpus: f64,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = 64)]
    pids: u64,
    /// Size of the writable /tmp.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    tmp_size: u64,
    /// Extra read-only bind mount (repeatable).
    #[arg(long, value_name = "SRC:DEST")]
    ro_bind: Vec<String>,
    /// Environment variable for the program (repeatable); nothing is inherited from the host.
    #[arg(long, short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Unprivileged uid and gid to run as.
    #[arg(long, default_value_t = 65534)]
    uid: u32,
    #[arg(long, default_value_t = 65534)]
    gid: u32,
    /// Hostname inside the sandbox (and cgroup name prefix).
    #[arg(long, default_value = "sandbox")]
    name: String,
    /// Working directory inside the sandbox.
    #[arg(long, default_value = isolate::TASK_ROOT)]
    cwd: String,
    /// Cgroup root below each hierarchy.
    #[arg(long, default_value = "fnlet-sandbox")]
    cgroup_root: String,
    /// Also a new user namespace (the uid and gid map to themselves, nothing else is mapped).
    #[arg(long)]
    userns: bool,
    /// Print what the sandbox used (peak memory, CPU time, wall time) on stderr.
    #[arg(long)]
    stats: bool,
    /// Clone the sandbox from a spawn helper process, as the agent does (`sandbox.spawn_helper`),
    /// to check that path; slower for one program.
    #[arg(long)]
    spawn_helper: bool,
    /// Program and arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]...")]
    command: Vec<String>,
}

pub fn run(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SandboxCommand::Run(args) => run_one(args),
    }
}

fn spec_from(args: &RunArgs) -> anyhow::Result<SandboxSpec> {
    let mut spec = SandboxSpec {
        name: args.name.clone(),
        ..Default::default()
    };
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no PROGRAM given")
    };
    spec.program = program.clone();
    spec.args = rest.to_vec();
    spec.bundle = match &args.bundle {
        Some(b) => {
            Some(std::fs::canonicalize(b).with_context(|| format!("--bundle {}", b.display()))?)
        }
        None => None,
    };
    spec.cwd = args.cwd.clone();
    spec.tmp_size_bytes = args.tmp_size;
    spec.limits.memory_bytes = Some(args.memory);
    spec.limits.cpus = Some(args.cpus);
    spec.limits.pids = Some(args.pids);
    spec.uid = args.uid;
    spec.gid = args.gid;
    spec.stdio = StdioSpec::inherit();
    // The CLI spawns from its main thread and waits: tie the sandbox to it.
    spec.die_with_parent = true;
    spec.user_namespace = args.userns;
    for b in &args.ro_bind {
        let (src, dest) = b
            .split_once(':')
            .with_context(|| format!("--ro-bind {b:?}: expected SRC:DEST"))?;
        spec.ro_binds.push(Bind {
            source: src.into(),
            dest: dest.into(),
            optional: false,
        });
    }
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("--env {e:?}: expected KEY=VALUE"))?;
        spec.env.insert(k.into(), v.into());
    }
    spec.validate()?;
    Ok(spec)
}

fn run_one(args: RunArgs) -> anyhow::Result<ExitCode> {
    let spec = spec_from(&args)?;
    let mut isolator = Isolator::new(IsolatorConfig {
        cgroup_root: args.cgroup_root.clone(),
        ..Default::default()
    })
    .context("preparing the sandbox runtime")?;
    if args.spawn_helper {
        let spawner = isolate::spawner::Spawner::start().context("starting the spawn helper")?;
        isolator.use_spawner(spawner)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let outcome = rt.block_on(async {
        // Handlers first: a SIGTERM that arrives while the sandbox starts must be forwarded,
        // not kill us before we can remove its cgroup.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sandbox = isolator.spawn(&spec)?;
        loop {
            tokio::select! {
                out = sandbox.wait() => break anyhow::Ok(out?),
                _ = term.recv() => sandbox.signal(nix::sys::signal::Signal::SIGTERM)?,
                _ = int.recv() => sandbox.signal(nix::sys::signal::Signal::SIGINT)?,
            }
        }
    });
    // Our cgroup root is only ours while we run; leave nothing behind (busy if another run is live).
    let _ = isolator.remove_root();
    let outcome = outcome?;
    if outcome.oom_killed {
        eprintln!(
            "fnlet: killed: out of memory (limit {})",
            format_size(args.memory)
        );
    } else if let ExitStatus::Signaled(sig) = outcome.status {
        eprintln!("fnlet: killed by signal {sig}");
    }
    if args.stats {
        eprintln!(
            "fnlet: peak memory {}, cpu {:.3}s, wall {:.3}s",
            outcome
                .peak_memory_bytes
                .map(format_size)
                .unwrap_or_else(|| "?".into()),
            outcome.cpu_time.map(|d| d.as_secs_f64()).unwrap_or(0.0),
            outcome.wall_time.as_secs_f64()
        );
    }
    Ok(ExitCode::from(outcome.status.code().clamp(0, 255) as u8))
}
