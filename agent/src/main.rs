//! `fnlet`: the agent daemon and its command-line interface.

#![forbid(unsafe_code)]

mod cli;
mod units;

fn main() -> std::process::ExitCode {
    cli::main()
}
