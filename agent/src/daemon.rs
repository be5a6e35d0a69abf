//! `fnlet agent`: start-up, serving, and shutdown of the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Options of `fnlet agent`; each overrides the config file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on [default: 127.0.0.1:8740].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for bundles, metadata, logs and the admin token [default: /var/lib/fnlet].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file [default: /etc/fnlet/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Deploy every bundle folder found under DIR at start (for demos and tests).
    #[arg(long, value_name = "DIR")]
    pub deploy_examples: Option<PathBuf>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("the agent is being written")
}
