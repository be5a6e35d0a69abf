//! Command-line front: clap definitions and dispatch.

mod sandbox;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fnlet turns bare-metal Linux hosts into a serverless function platform.
#[derive(Debug, Parser)]
#[command(name = "fnlet", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon (as root; usually under systemd).
    Agent(crate::daemon::AgentArgs),
    /// Run programs in the sandbox every function instance gets.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FNLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Agent(args) => crate::daemon::run(args),
        Command::Sandbox(cmd) => sandbox::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fnlet: {e:#}");
            ExitCode::from(125)
        }
    }
}
