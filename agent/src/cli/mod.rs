//! Command-line front: clap definitions and dispatch.

/// The help epilogue of an admin command (`keys`, `cluster`): its examples and exit statuses.
macro_rules! admin_examples {
    ($($line:literal),+ $(,)?) => {
        concat!(
            "Examples:\n",
            $("  ", $line, "\n",)+
            "\nExit status: 0 success; 1 the agent answered with an error; 2 usage error; \
             3 the agent could not be reached.",
        )
    };
}

mod client;
mod cluster;
mod functions;
mod keys;
pub(crate) mod pack;
mod quic;
mod runtime;
mod sandbox;
mod topics;
mod triggers;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// fnlet turns bare-metal Linux hosts into a serverless function platform.
#[derive(Debug, Parser)]
#[command(
    name = "fnlet",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "\
Getting started (as root, next to a running `fnlet agent`):
  fnlet deploy ./hello                 # a folder holding fnlet.toml and the code
  fnlet invoke hello -d '{\"name\": \"world\"}'
  fnlet logs hello -f

The client commands find the agent at $FNLET_ENDPOINT (default http://127.0.0.1:8740) and use
the token in $FNLET_TOKEN, else <state dir>/admin.token ($FNLET_STATE_DIR, default
/var/lib/fnlet). Every command has --help with examples."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Functions(functions::FunctionsCommand),
    /// Run the agent daemon (as root; usually under systemd).
    Agent(crate::daemon::AgentArgs),
    /// Run programs in the sandbox every function instance gets.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Access keys that sign Lambda Invoke API calls (AWS SigV4): create, list, remove.
    #[command(
        subcommand,
        after_help = "\
Examples:
  fnlet keys create --description ci   # prints the id and the secret, once
  fnlet keys ls
  fnlet keys rm FNLTABCDEFGHIJKLMNOP"
    )]
    Keys(keys::KeysCommand),
    /// Lambda runtimes (`runtime = "python3.11"`): install a runtime's client, list them.
    #[command(
        subcommand,
        after_help = "\
Examples:
  fnlet runtime add python3.11         # AWS's awslambdaric, with the host's python3
  fnlet runtime ls"
    )]
    Runtime(runtime::RuntimeCommand),
    /// The cluster: make one here, print join tokens.
    #[command(
        subcommand,
        after_help = "\
Examples:
  fnlet cluster init                   # prints a join token for the other hosts
  fnlet cluster token --ttl 2h"
    )]
    Cluster(cluster::ClusterCommand),
    /// The cluster's members as the local agent sees them: id, address, state, RTT.
    #[command(after_help = "\
Examples:
  fnlet members
  fnlet members --json | jq -r '.[] | select(.state != \"alive\") | .id'")]
    Members(cluster::MembersArgs),
    /// Publish an event to a topic: every function subscribed to it (`[[triggers]] topic`)
    /// whose filter the event passes runs it as an async event.
    #[command(after_help = admin_examples!(
        "fnlet publish orders -d '{\"id\": 42}'",
        "fnlet publish orders --type order.created --source /shop -d @order.json",
        "fnlet publish orders --id order-42 --source /shop -d '{}'   # sent twice, delivered once"
    ))]
    Publish(topics::PublishArgs),
    /// List the topics: who subscribes (with their filters), who may publish, and the counts
    /// since the agent started.
    #[command(after_help = admin_examples!(
        "fnlet topics",
        "fnlet topics --json | jq '.topics[] | {topic, counts}'"
    ))]
    Topics(topics::TopicsArgs),
    /// Every trigger of every function (or of one): schedules with their next fire times, last
    /// fired tick and owner host; topic subscriptions.
    #[command(after_help = "\
Examples:
  fnlet triggers
  fnlet triggers nightly
  fnlet triggers --json | jq '.triggers[] | select(.type == \"schedule\") | .next'")]
    Triggers(triggers::TriggersArgs),
    /// Print shell completions for fnlet.
    #[command(after_help = "\
Examples:
  fnlet completions bash > /etc/bash_completion.d/fnlet
  fnlet completions zsh > \"${fpath[1]}/_fnlet\"
  fnlet completions fish > ~/.config/fish/completions/fnlet.fish")]
    Completions {
        /// The shell to write completions for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (fnlet.1, fnlet-<command>.1, ...) into a directory; packaging uses it.
    #[command(
        hide = true,
        after_help = "Examples:\n  fnlet manpages target/man && man -l target/man/fnlet.1"
    )]
    Manpages {
        /// Directory to write into (created if missing).
        dir: std::path::PathBuf,
    },
}

pub fn main() -> ExitCode {
    // The agent's relaunched spawn helper: before anything else is set up (no logging, no
    // runtime), and never a command a user types.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(isolate::spawner::LAUNCH_ARG)) {
        isolate::spawner::serve_launched(args.next().as_deref());
    }
    let cli = Cli::parse();
    // The daemon logs one line per invocation; the CLI only its warnings.
    let default_level = if matches!(cli.command, Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    // To the journal, with fields, when systemd connected stderr to it; else to stderr.
    crate::systemd::init_logging(default_level);
    let result = match cli.command {
        Command::Agent(args) => crate::daemon::run(args),
        Command::Sandbox(cmd) => sandbox::run(cmd),
        Command::Functions(cmd) => Ok(functions::run(cmd)),
        Command::Keys(cmd) => Ok(keys::run(cmd)),
        Command::Cluster(cmd) => Ok(cluster::run(cmd)),
        Command::Members(args) => Ok(cluster::run_members(args)),
        Command::Publish(args) => Ok(topics::run_publish(args)),
        Command::Topics(args) => Ok(topics::run_topics(args)),
        Command::Triggers(args) => Ok(triggers::run(args)),
        Command::Runtime(cmd) => Ok(runtime::run(cmd)),
        Command::Completions { shell } => Ok(completions(shell)),
        Command::Manpages { dir } => manpages(&dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fnlet: {e:#}");
            ExitCode::from(125)
        }
    }
}

/// Prints completions; generated into memory first because clap_complete panics on a write
/// error (`fnlet completions bash | head`).
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "fnlet", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the completions: {e}");
            ExitCode::from(1)
        }
    }
}

/// Man pages from the clap definitions: one page for fnlet and one per (visible) subcommand.
/// A hidden subcommand of the shipped binary rather than a build script or an xtask: the
/// definitions live in this library, so the pages describe exactly the binary that is packaged,
/// with no second build.
fn manpages(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_help_with_examples() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            if name == "help" || name == "agent" || name == "sandbox" {
                continue;
            }
            let after = sub
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(after.contains("Examples:"), "{name} has no examples");
            assert!(
                after.contains(&format!("fnlet {name}")),
                "{name}'s examples do not use it"
            );
        }
    }

    #[test]
    fn man_pages_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        super::manpages(dir.path()).unwrap();
        for page in [
            "fnlet.1",
            "fnlet-deploy.1",
            "fnlet-agent.1",
            "fnlet-sandbox-run.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
        }
        assert!(!dir.path().join("fnlet-manpages.1").exists());
    }

    #[test]
    fn completions_for_the_usual_shells() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "fnlet", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("deploy") && text.contains("rollback"),
                "{shell}"
            );
        }
    }
}
