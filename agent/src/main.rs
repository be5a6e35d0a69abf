//! `fnlet`: the agent daemon and its command-line interface.

#![forbid(unsafe_code)]

mod bundle;
mod cli;
mod config;
mod daemon;
mod manifest;
mod store;
mod units;

fn main() -> std::process::ExitCode {
    cli::main()
}
