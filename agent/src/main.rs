//! `fnlet`: the agent daemon and its command-line interface.

#![forbid(unsafe_code)]

mod api;
mod bundle;
mod cli;
mod config;
mod daemon;
mod instance;
mod logs;
mod manifest;
mod metrics;
mod pool;
mod router;
mod store;
mod units;

fn main() -> std::process::ExitCode {
    cli::main()
}
