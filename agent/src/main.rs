//! `fnlet`: the agent daemon and its command-line interface.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    fnlet::cli::main()
}
