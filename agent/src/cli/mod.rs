//! Command-line front: clap definitions and dispatch.

mod client;
mod functions;
mod pack;
mod sandbox;

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
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs one line per invocation; the CLI only its warnings.
    let default_level = if matches!(cli.command, Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FNLET_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Agent(args) => crate::daemon::run(args),
        Command::Sandbox(cmd) => sandbox::run(cmd),
        Command::Functions(cmd) => Ok(functions::run(cmd)),
        Command::Completions { shell } => Ok(completions(shell)),
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
