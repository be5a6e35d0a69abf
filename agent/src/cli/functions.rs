//! The client commands (`deploy`, `invoke`, `ls`, ...): arguments, calls to the agent, output.

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::client::{
    self, ApiError, Client, ClientError, FunctionInfo, LogLine, StatusInfo, Target, TargetFlags,
    TokenFileProblem, TokenSource, VersionInfo,
};
use super::pack::{self, ArchiveKind};
use crate::units::format_size;

/// Show a progress bar for uploads larger than this (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 1 << 20;
/// Hex digits of a sha256 shown to people.
const SHORT_SHA: usize = 12;
/// Characters of a request id shown in log lines.
const SHORT_REQUEST_ID: usize = 8;

// What the API says a manifest without `mode` means.
const DEFAULT_MODE: &str = "exec";

/// Help text after the options: `Examples:` with one indented line per example, then the
/// exit statuses every client command shares.
macro_rules! examples {
    ($($line:literal),+ $(,)?) => {
        concat!(
            "Examples:\n",
            $("  ", $line, "\n",)+
            "\nExit status: 0 success; 1 the agent or the function answered with an error; \
             2 usage error; 3 the agent could not be reached.",
        )
    };
}

#[derive(Debug, Subcommand)]
pub enum FunctionsCommand {
    /// Deploy a function: pack a bundle folder (or send a .tar.gz/.zip) as a new version.
    ///
    /// A folder must hold fnlet.toml at its root; everything in it is packed (nothing is
    /// skipped, executable bits and symlinks are kept). A .tar.gz, .tgz or .zip file is sent
    /// as is. The new version becomes active at once; `fnlet rollback` goes back.
    #[command(after_help = examples!(
        "fnlet deploy ./hello                 # a folder holding fnlet.toml",
        "fnlet deploy hello.zip",
        "fnlet deploy ./hello --json | jq -r .version"
    ))]
    Deploy(DeployArgs),

    /// Invoke a function and write its output to stdout, byte for byte.
    ///
    /// The input is empty unless -d gives it. On an error (the function failed, timed out,
    /// ran out of memory, or the agent refused), its kind and message go to stderr and fnlet
    /// exits with status 1.
    #[command(after_help = examples!(
        "fnlet invoke hello -d '{\"name\": \"world\"}'",
        "fnlet invoke resize -d @photo.jpg > thumb.jpg",
        "echo hi | fnlet invoke echo -d @- -v",
        "fnlet invoke hello --quic 10.0.0.7:8741 -d '{}'   # over QUIC, the cluster endpoint",
        "fnlet invoke hello --async -d '{}'   # 202 once stored; prints the request id"
    ))]
    Invoke(InvokeArgs),

    /// Show a function's asynchronous events: waiting, running, retrying (with the next try's
    /// time), the oldest one's age, and the last failures with their request ids.
    #[command(after_help = examples!(
        "fnlet events hello",
        "fnlet events hello --json | jq '.last_failures[].request_id'"
    ))]
    Events(NameArgs),

    /// List the deployed functions.
    #[command(visible_alias = "list", after_help = examples!(
        "fnlet ls",
        "fnlet ls --json | jq -r '.functions[].name'"
    ))]
    Ls(ListArgs),

    /// Show a function: its manifest, active version, running instances and kept versions.
    #[command(after_help = examples!(
        "fnlet describe hello",
        "fnlet describe hello --json | jq .manifest"
    ))]
    Describe(NameArgs),

    /// List the kept versions of a function, newest first (* marks the active one).
    #[command(after_help = examples!(
        "fnlet versions hello",
        "fnlet rollback hello --to \"$(fnlet versions hello --json | jq '.versions[-1].version')\""
    ))]
    Versions(NameArgs),

    /// Show a function's log: what it wrote to stderr, and the agent's notes about it.
    ///
    /// Each line reads: time, function, version, the start of the request id, the line.
    #[command(after_help = examples!(
        "fnlet logs hello                  # the last 100 lines",
        "fnlet logs hello -f --tail 0      # only new lines, as they come",
        "fnlet logs hello --json | jq -r 'select(.request_id == \"…\") | .line'"
    ))]
    Logs(LogsArgs),

    /// Make an earlier version of a function active again (by default the one before).
    #[command(after_help = examples!(
        "fnlet rollback hello              # back to the version before the active one",
        "fnlet rollback hello --to 3"
    ))]
    Rollback(RollbackArgs),

    /// Remove a function and all its versions.
    #[command(visible_alias = "remove", after_help = examples!(
        "fnlet rm hello"
    ))]
    Rm(NameArgs),

    /// Show the agent's status: version, uptime, functions, running instances, cgroup mode.
    #[command(after_help = examples!(
        "fnlet status",
        "fnlet status --endpoint http://10.0.0.7:8740 --json"
    ))]
    Status(ListArgs),
}

/// How to reach the agent; shared by every client command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Agent connection")]
pub struct ConnArgs {
    /// The agent's API [env: FNLET_ENDPOINT] [default: http://127.0.0.1:8740].
    #[arg(long, value_name = "URL", value_parser = client::parse_endpoint)]
    endpoint: Option<client::Endpoint>,
    /// Admin token [env: FNLET_TOKEN] [default: the contents of <STATE_DIR>/admin.token].
    ///
    /// Prefer FNLET_TOKEN: other users can see command lines.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The agent's state directory, where admin.token is [env: FNLET_STATE_DIR]
    /// [default: /var/lib/fnlet].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print the agent's JSON answer (pretty) instead of text, for scripts.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// A bundle folder holding fnlet.toml, or a .tar.gz, .tgz or .zip file.
    #[arg(value_name = "DIR|ARCHIVE")]
    path: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The function's name.
    #[arg(value_name = "NAME", value_parser = parse_name)]
    name: String,
    /// The input: DATA as is, @FILE for a file's contents, @- for stdin.
    #[arg(short = 'd', long = "data", value_name = "DATA|@FILE|@-")]
    data: Option<String>,
    /// Also print the status, request id, version and duration on stderr.
    #[arg(short, long)]
    verbose: bool,
    /// On an error, print the agent's JSON error on stdout (the output is always raw).
    #[arg(long)]
    json: bool,
    /// Call the agent over QUIC at its cluster endpoint (`[cluster] listen`, UDP) instead of
    /// its HTTP API.
    #[arg(long, value_name = "ADDR:PORT")]
    quic: Option<std::net::SocketAddr>,
    /// With --quic: the cluster CA certificate the agent must show
    /// [default: <STATE_DIR>/cluster/ca.pem].
    #[arg(long, value_name = "FILE", requires = "quic")]
    ca: Option<PathBuf>,
    /// Invoke asynchronously (a Lambda Event invoke): the agent answers once the event is
    /// stored, and runs it after, retrying as its [async] config says. Prints the request id.
    #[arg(long = "async", conflicts_with = "quic")]
    is_async: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The function's name.
    #[arg(value_name = "NAME", value_parser = parse_name)]
    name: String,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The function's name.
    #[arg(value_name = "NAME", value_parser = parse_name)]
    name: String,
    /// The version to make active [default: the one before the active one].
    #[arg(long, value_name = "VERSION", value_parser = clap::value_parser!(u64).range(1..))]
    to: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The function's name.
    #[arg(value_name = "NAME", value_parser = parse_name)]
    name: String,
    /// Keep the connection open and print new lines as they are written.
    #[arg(short, long)]
    follow: bool,
    /// How many of the latest lines to print first [default: the agent's, 100].
    #[arg(short = 'n', long, value_name = "N")]
    tail: Option<u64>,
    /// Print the log's JSON lines as they are (one object per line).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Function names as the API defines them: `^[a-z0-9][a-z0-9_-]{0,63}$`.
pub fn parse_name(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(
            "function names are 1 to 64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
                .into(),
        )
    }
}

/// Why a command failed; decides the message and the exit status.
#[derive(Debug)]
pub(super) enum CliError {
    /// Bad input found before talking to the agent: status 2, like clap's usage errors.
    Usage(String),
    /// The agent answered with an error, or could not be reached.
    Client(ClientError),
    /// A local failure (a file, stdout): status 1.
    Local(String),
    /// stdout was closed by the reader (`fnlet logs x | head`): stop quietly.
    BrokenPipe,
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

pub(super) type CmdResult = Result<(), CliError>;

pub(super) fn write_err(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::BrokenPipe
    } else {
        CliError::Local(format!("writing the output: {e}"))
    }
}

/// Runs one client command; prints its errors and returns the exit status.
pub fn run(cmd: FunctionsCommand) -> ExitCode {
    let conn = match &cmd {
        FunctionsCommand::Deploy(a) => &a.conn,
        FunctionsCommand::Invoke(a) => &a.conn,
        FunctionsCommand::Ls(a) | FunctionsCommand::Status(a) => &a.conn,
        FunctionsCommand::Describe(a)
        | FunctionsCommand::Versions(a)
        | FunctionsCommand::Rm(a)
        | FunctionsCommand::Events(a) => &a.conn,
        FunctionsCommand::Rollback(a) => &a.conn,
        FunctionsCommand::Logs(a) => &a.conn,
    };
    let context = error_context(&cmd);
    let flags = conn_flags(conn);
    let target = match client::resolve_target(&flags, &|k| std::env::var(k).ok(), &|p| {
        std::fs::read_to_string(p)
    }) {
        Ok(t) => t,
        Err(e) => return report(&CliError::Usage(e), None, &context),
    };
    let result = dispatch(cmd, &target);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, Some(&target), &context),
    }
}

/// Runs a client command from another module (`fnlet keys`): finds the agent from `conn`,
/// runs `f`, and prints its error with the usual hints (`not_found_hint` on a 404).
pub(super) fn run_client(
    conn: &ConnArgs,
    not_found_hint: Option<String>,
    f: impl FnOnce(&Client) -> CmdResult,
) -> ExitCode {
    let context = ErrorContext {
        name: None,
        not_found_hint,
    };
    let flags = TargetFlags {
        endpoint: conn.endpoint.clone(),
        token: conn.token.clone(),
        state_dir: conn.state_dir.clone(),
    };
    let target = match client::resolve_target(&flags, &|k| std::env::var(k).ok(), &|p| {
        std::fs::read_to_string(p)
    }) {
        Ok(t) => t,
        Err(e) => return report(&CliError::Usage(e), None, &context),
    };
    let client = match Client::new(&target) {
        Ok(c) => c,
        Err(e) => return report(&CliError::from(e), Some(&target), &context),
    };
    match f(&client) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e, Some(&target), &context),
    }
}

fn conn_flags(conn: &ConnArgs) -> TargetFlags {
    TargetFlags {
        endpoint: conn.endpoint.clone(),
        token: conn.token.clone(),
        state_dir: conn.state_dir.clone(),
    }
}

fn error_context(cmd: &FunctionsCommand) -> ErrorContext {
    let name = match cmd {
        FunctionsCommand::Deploy(_) | FunctionsCommand::Ls(_) | FunctionsCommand::Status(_) => None,
        FunctionsCommand::Invoke(a) => Some(a.name.clone()),
        FunctionsCommand::Describe(a)
        | FunctionsCommand::Versions(a)
        | FunctionsCommand::Rm(a)
        | FunctionsCommand::Events(a) => Some(a.name.clone()),
        FunctionsCommand::Rollback(a) => Some(a.name.clone()),
        FunctionsCommand::Logs(a) => Some(a.name.clone()),
    };
    let not_found_hint = match (cmd, &name) {
        // A rollback's 404 may be about the version rather than the function.
        (FunctionsCommand::Rollback(_), Some(n)) => Some(format!(
            "hint: `fnlet versions {n}` lists the versions kept, `fnlet ls` the functions"
        )),
        (_, Some(_)) => Some("hint: `fnlet ls` lists the deployed functions".into()),
        (_, None) => None,
    };
    ErrorContext {
        name,
        not_found_hint,
    }
}

/// What an error's hints may mention.
#[derive(Debug, Default)]
struct ErrorContext {
    /// The function the command is about.
    name: Option<String>,
    /// What to say when the agent answers not_found.
    not_found_hint: Option<String>,
}

fn dispatch(cmd: FunctionsCommand, target: &Target) -> CmdResult {
    let client = Client::new(target)?;
    // Read inputs before starting the runtime: they are plain blocking file work.
    match cmd {
        FunctionsCommand::Deploy(a) => {
            let bundle = prepare_bundle(&a.path)?;
            block_on(deploy(&client, bundle, a.output.json))
        }
        FunctionsCommand::Invoke(a) => {
            let input = read_input(a.data.as_deref())?;
            match a.quic {
                Some(addr) => {
                    let ca = match &a.ca {
                        Some(f) => f.clone(),
                        None => client::state_dir(&conn_flags(&a.conn), &|k| std::env::var(k).ok())
                            .join("cluster")
                            .join("ca.pem"),
                    };
                    let ca = super::quic::read_ca(&ca, a.ca.is_some())?;
                    block_on(invoke_quic(target, addr, ca, &a, input))
                }
                None if a.is_async => block_on(async {
                    let id = client.invoke_event(&a.name, input).await?;
                    println!("{id}");
                    Ok(())
                }),
                None => block_on(invoke(&client, &a, input)),
            }
        }
        FunctionsCommand::Ls(a) => block_on(list(&client, a.output.json)),
        FunctionsCommand::Describe(a) => block_on(describe(&client, &a.name, a.output.json)),
        FunctionsCommand::Versions(a) => block_on(versions(&client, &a.name, a.output.json)),
        FunctionsCommand::Events(a) => block_on(events(&client, &a.name, a.output.json)),
        FunctionsCommand::Rm(a) => block_on(async {
            client.remove(&a.name).await?;
            if !a.output.json {
                println!("removed {}", a.name);
            }
            Ok(())
        }),
        FunctionsCommand::Rollback(a) => block_on(async {
            let v = client.rollback(&a.name, a.to).await?;
            if a.output.json {
                return print_json(&v);
            }
            let info: VersionInfo = typed(&client, v)?;
            println!(
                "{} is now at version {} (sha256 {})",
                info.name,
                info.version,
                short_sha(&info.sha256)
            );
            Ok(())
        }),
        FunctionsCommand::Logs(a) => block_on(logs(&client, &a)),
        FunctionsCommand::Status(a) => block_on(status(&client, a.output.json)),
    }
}

pub(super) fn block_on<F: Future<Output = CmdResult>>(f: F) -> CmdResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Local(format!("starting the async runtime: {e}")))?;
    rt.block_on(f)
}

/// Prints the error and returns the exit status it means.
fn report(e: &CliError, target: Option<&Target>, context: &ErrorContext) -> ExitCode {
    match e {
        CliError::Usage(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        CliError::Local(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        CliError::BrokenPipe => ExitCode::SUCCESS,
        CliError::Client(ClientError::Api(api)) => {
            eprintln!("error ({}): {}", api.kind, api.message);
            for hint in api_hints(api, target, context) {
                eprintln!("{hint}");
            }
            ExitCode::from(1)
        }
        CliError::Client(c) => {
            eprintln!("error: {c}");
            if c.is_unreachable() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Follow-up lines for an API error: what to do about it.
fn api_hints(api: &ApiError, target: Option<&Target>, context: &ErrorContext) -> Vec<String> {
    let mut hints = Vec::new();
    if api.status == http::StatusCode::UNAUTHORIZED {
        match target.map(|t| &t.token_source) {
            Some(TokenSource::Missing {
                file,
                problem: TokenFileProblem::NotFound,
            }) => hints.push(format!(
                "hint: set FNLET_TOKEN, or point --state-dir (FNLET_STATE_DIR) at the agent's \
                 state directory: there is no {}",
                file.display()
            )),
            Some(TokenSource::Missing { file, problem }) => hints.push(format!(
                "hint: set FNLET_TOKEN or run as root so fnlet can read {} ({problem})",
                file.display()
            )),
            Some(TokenSource::File(file)) => hints.push(format!(
                "hint: the agent refused the token in {}; is it this agent's state directory \
                 (--state-dir, FNLET_STATE_DIR)?",
                file.display()
            )),
            Some(TokenSource::Flag) | Some(TokenSource::Env) => hints.push(
                "hint: the agent refused the token given by --token or FNLET_TOKEN; the right one \
                 is in the agent's <state dir>/admin.token"
                    .into(),
            ),
            None => {}
        }
    }
    if let Some(after) = &api.retry_after {
        // Retry-After is seconds or an HTTP date.
        let when = match after.trim().parse::<u64>() {
            Ok(secs) => format!("{secs}s"),
            Err(_) => after.clone(),
        };
        hints.push(format!("hint: the agent says to retry after {when}"));
    }
    if let (Some(h), "not_found") = (&context.not_found_hint, api.kind.as_str()) {
        hints.push(h.clone());
    }
    let about_the_run = matches!(
        api.kind.as_str(),
        "timeout" | "out_of_memory" | "crashed" | "function_error" | "response_too_large"
    );
    if let (true, Some(id), Some(n)) = (about_the_run, &api.request_id, &context.name) {
        hints.push(format!(
            "request id {id}: `fnlet logs {n}` shows what the function wrote"
        ));
    }
    hints
}

pub(super) fn print_json(v: &Value) -> CmdResult {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Local(format!("formatting JSON: {e}")))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").map_err(write_err)
}

pub(super) fn print_text(text: &str) -> CmdResult {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(write_err)?;
    out.flush().map_err(write_err)
}

/// The agent's JSON read as `T`, or a protocol error saying what did not fit.
pub(super) fn typed<T: serde::de::DeserializeOwned>(
    client: &Client,
    v: Value,
) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| {
        CliError::Client(ClientError::Protocol {
            endpoint: client.endpoint().to_string(),
            detail: format!("the answer does not match the API: {e}"),
        })
    })
}

// ---- deploy ----

/// A bundle ready to send.
struct Bundle {
    file: std::fs::File,
    len: u64,
    kind: ArchiveKind,
}

fn prepare_bundle(path: &Path) -> Result<Bundle, CliError> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            CliError::Usage(format!("{}: no such folder or file", path.display()))
        }
        _ => CliError::Usage(format!("{}: {e}", path.display())),
    })?;
    if md.is_dir() {
        let tmp = tempfile::tempfile()
            .map_err(|e| CliError::Local(format!("creating a temporary file: {e}")))?;
        let packed = pack::pack_dir(path, std::io::BufWriter::new(tmp)).map_err(|e| {
            if e.is_usage() {
                CliError::Usage(e.to_string())
            } else {
                CliError::Local(e.to_string())
            }
        })?;
        let mut file = packed
            .out
            .into_inner()
            .map_err(|e| CliError::Local(format!("writing the archive: {}", e.error())))?;
        let len = file
            .stream_position()
            .map_err(|e| CliError::Local(format!("writing the archive: {e}")))?;
        file.rewind()
            .map_err(|e| CliError::Local(format!("reading the archive back: {e}")))?;
        if std::io::stderr().is_terminal() {
            eprintln!(
                "packed {}: {} files, {} ({} compressed)",
                path.display(),
                packed.files,
                format_size(packed.bytes),
                format_size(len)
            );
        }
        return Ok(Bundle {
            file,
            len,
            kind: ArchiveKind::TarGz,
        });
    }
    let Some(kind) = ArchiveKind::from_path(path) else {
        return Err(CliError::Usage(format!(
            "{}: expected a bundle folder holding fnlet.toml, or a .tar.gz, .tgz or .zip file",
            path.display()
        )));
    };
    let mut file = std::fs::File::open(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let mut head = [0u8; 4];
    let n = read_up_to(&mut file, &mut head)
        .map_err(|e| CliError::Local(format!("reading {}: {e}", path.display())))?;
    if !kind.matches_magic(&head[..n]) {
        return Err(CliError::Usage(format!(
            "{} is not {}",
            path.display(),
            kind.describe()
        )));
    }
    file.rewind()
        .map_err(|e| CliError::Local(format!("reading {}: {e}", path.display())))?;
    Ok(Bundle {
        file,
        len: md.len(),
        kind,
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The file as a streamed request body, advancing `progress` as it is read.
fn file_body(file: std::fs::File, progress: Option<indicatif::ProgressBar>) -> client::Body {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold(Some((file, progress)), |state| async move {
        let (mut file, progress) = state?;
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                if let Some(p) = &progress {
                    p.inc(n as u64);
                }
                Some((Ok(bytes::Bytes::from(buf)), Some((file, progress))))
            }
            // Ends the stream after the error.
            Err(e) => Some((Err(e), None)),
        }
    });
    client::stream_body(stream)
}

fn upload_progress(len: u64) -> Option<indicatif::ProgressBar> {
    if len <= PROGRESS_MIN_BYTES || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(
        "uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

async fn deploy(client: &Client, bundle: Bundle, json: bool) -> CmdResult {
    let progress = upload_progress(bundle.len);
    let body = file_body(bundle.file, progress.clone());
    let result = client
        .deploy(body, bundle.len, bundle.kind.content_type())
        .await;
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let v = result?;
    if json {
        return print_json(&v);
    }
    let info: VersionInfo = typed(client, v)?;
    println!("{}", deployed_line(&info));
    Ok(())
}

fn deployed_line(v: &VersionInfo) -> String {
    format!(
        "deployed {} version {} (sha256 {})",
        v.name,
        v.version,
        short_sha(&v.sha256)
    )
}

// ---- invoke ----

pub(super) fn read_input(data: Option<&str>) -> Result<Vec<u8>, CliError> {
    match data {
        None => Ok(Vec::new()),
        Some("@-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::Local(format!("reading stdin: {e}")))?;
            Ok(buf)
        }
        Some(s) => match s.strip_prefix('@') {
            Some(path) => {
                std::fs::read(path).map_err(|e| CliError::Usage(format!("-d @{path}: {e}")))
            }
            None => Ok(s.as_bytes().to_vec()),
        },
    }
}

async fn invoke(client: &Client, a: &InvokeArgs, input: Vec<u8>) -> CmdResult {
    // A Lambda-mode function takes its input as the event, through the Invoke API (its
    // /fn/{name} is a function URL, which would wrap the input in an HTTP event).
    let lambda = client
        .function(&a.name)
        .await
        .is_ok_and(|f| f["manifest"]["mode"] == "lambda");
    let start = Instant::now();
    let result = if lambda {
        client.invoke_lambda(&a.name, input).await
    } else {
        client.invoke(&a.name, input).await
    };
    show_invocation(a, result, start).await
}

/// `fnlet invoke --quic`: the agent picks the function's own door (the Invoke API for a
/// Lambda-mode function, exec otherwise), as the HTTP path does with a lookup first.
async fn invoke_quic(
    target: &Target,
    addr: std::net::SocketAddr,
    ca: rustls_pki_types::CertificateDer<'static>,
    a: &InvokeArgs,
    input: Vec<u8>,
) -> CmdResult {
    let start = Instant::now();
    let session = super::quic::Session::connect(addr, &ca).await?;
    let result = session
        .invoke(&a.name, target.token.as_deref(), input)
        .await;
    let shown = show_invocation(a, result, start).await;
    session.close().await;
    shown
}

/// Prints an invocation's answer, or its error, as `fnlet invoke` does whichever way it went.
async fn show_invocation(
    a: &InvokeArgs,
    result: client::ClientResult<client::Invocation>,
    start: Instant,
) -> CmdResult {
    let mut inv = match result {
        Ok(inv) => inv,
        Err(ClientError::Api(api)) => {
            if a.verbose {
                eprint!(
                    "{}",
                    invoke_summary(
                        api.status,
                        api.request_id.as_deref(),
                        api.version.as_deref(),
                        start.elapsed()
                    )
                );
            }
            if let (true, Some(body)) = (a.json, &api.body) {
                print_json(body)?;
            }
            return Err(ClientError::Api(api).into());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = inv.chunk().await? {
        out.write_all(&chunk).map_err(write_err)?;
    }
    out.flush().map_err(write_err)?;
    if a.verbose {
        eprint!(
            "{}",
            invoke_summary(
                inv.status,
                inv.request_id.as_deref(),
                inv.version.as_deref(),
                start.elapsed()
            )
        );
    }
    match inv.function_error {
        Some(kind) => Err(CliError::Local(format!(
            "the function failed ({kind}): its error is above; `fnlet logs {}` has its output",
            a.name
        ))),
        None => Ok(()),
    }
}

fn invoke_summary(
    status: http::StatusCode,
    request_id: Option<&str>,
    version: Option<&str>,
    took: Duration,
) -> String {
    kv(&[
        ("status", status.to_string()),
        ("request id", request_id.unwrap_or("-").to_string()),
        ("version", version.unwrap_or("-").to_string()),
        ("duration", format_duration(took)),
    ])
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

// ---- events ----

async fn events(client: &Client, name: &str, json: bool) -> CmdResult {
    let v = client.events(name).await?;
    if json {
        return print_json(&v);
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    // With NATS, "in flight" is the stream's: every agent's tries and the events waiting for a
    // retry (they are taken, NAKed with their wait).
    let in_flight = if v["backend"] == "nats" {
        format!(
            "{} (NATS: tries on any agent and events waiting for a retry{})",
            n("in_flight"),
            if v["nats_unavailable"] == true {
                "; NATS unreachable, local counts only"
            } else {
                ""
            }
        )
    } else {
        n("in_flight").to_string()
    };
    let mut out = kv(&[
        ("function", name.to_string()),
        ("stored", n("stored").to_string()),
        ("pending", n("pending").to_string()),
        ("in flight", in_flight),
        (
            "retrying",
            v["retrying"].as_array().map_or(0, Vec::len).to_string(),
        ),
        (
            "oldest age",
            format_duration(Duration::from_secs_f64(
                v["oldest_age_s"].as_f64().unwrap_or(0.0).max(0.0),
            )),
        ),
        (
            "retries",
            format!(
                "{} (retry n waits n x {}s; throttles back off {}s..{}s)",
                v["config"]["max_retry_attempts"],
                v["config"]["retry_base_s"],
                v["config"]["backoff_min_s"],
                v["config"]["backoff_max_s"]
            ),
        ),
        (
            "max event age",
            format!("{}s", v["config"]["max_event_age_s"]),
        ),
        (
            "on success",
            v["config"]["on_success"]
                .as_str()
                .unwrap_or("-")
                .to_string(),
        ),
        (
            "on failure",
            v["config"]["on_failure"]
                .as_str()
                .unwrap_or("-")
                .to_string(),
        ),
    ]);
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    if let Some(r) = v["retrying"].as_array().filter(|r| !r.is_empty()) {
        out.push_str("\nretrying:\n");
        let rows: Vec<Vec<String>> = r
            .iter()
            .map(|e| {
                vec![
                    s(&e["request_id"]),
                    s(&e["next_attempt_at"]),
                    e["function_errors"].to_string(),
                    e["throttles"].to_string(),
                    s(&e["last_error"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "REQUEST ID",
                "NEXT TRY",
                "ERRORS",
                "THROTTLES",
                "LAST ERROR",
            ],
            &rows,
        ));
    }
    if let Some(r) = v["last_failures"].as_array().filter(|r| !r.is_empty()) {
        out.push_str("\nlast failures:\n");
        let rows: Vec<Vec<String>> = r
            .iter()
            .map(|e| {
                vec![
                    s(&e["request_id"]),
                    s(&e["at"]),
                    s(&e["condition"]),
                    e["invokes"].to_string(),
                    s(&e["error"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &["REQUEST ID", "AT", "CONDITION", "TRIES", "LAST ERROR"],
            &rows,
        ));
    }
    print_text(&out)
}

// ---- ls, describe, versions, status ----

async fn list(client: &Client, json: bool) -> CmdResult {
    let v = client.functions().await?;
    if json {
        return print_json(&v);
    }
    #[derive(serde::Deserialize)]
    struct Listing {
        #[serde(default)]
        functions: Vec<FunctionInfo>,
    }
    let listing: Listing = typed(client, v)?;
    if listing.functions.is_empty() {
        eprintln!("no functions deployed (deploy one with `fnlet deploy DIR`)");
        return Ok(());
    }
    print_text(&functions_table(&listing.functions, SystemTime::now()))
}

fn functions_table(functions: &[FunctionInfo], now: SystemTime) -> String {
    let rows = functions
        .iter()
        .map(|f| {
            let m = &f.manifest;
            let lim = f.limits.clone().unwrap_or_default();
            vec![
                f.name.clone(),
                f.version.to_string(),
                m.mode.clone().unwrap_or_else(|| DEFAULT_MODE.into()),
                memory(m.memory_mb.unwrap_or(lim.memory_mb)),
                seconds(m.timeout_s.unwrap_or(lim.timeout_s)),
                yes_no(m.public.unwrap_or(false)).into(),
                f.running.map_or("-".into(), |n| n.to_string()),
                age(&f.updated_at, now),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NAME", "VERSION", "MODE", "MEMORY", "TIMEOUT", "PUBLIC", "RUNNING", "UPDATED",
        ],
        &rows,
    )
}

async fn describe(client: &Client, name: &str, json: bool) -> CmdResult {
    let v = client.function(name).await?;
    if json {
        return print_json(&v);
    }
    let f: FunctionInfo = typed(client, v)?;
    // The API may leave the versions out of a Function; ask for them then.
    let versions = match &f.versions {
        Some(v) => v.clone(),
        None => {
            let v = client.versions(name).await?;
            typed::<VersionList>(client, v)?.versions
        }
    };
    print_text(&describe_text(&f, &versions))
}

fn describe_text(f: &FunctionInfo, versions: &[VersionInfo]) -> String {
    let m = &f.manifest;
    let lim = f.limits.clone().unwrap_or_default();
    let mut pairs = vec![("name", f.name.clone())];
    if let Some(d) = m.description.as_ref().filter(|d| !d.is_empty()) {
        pairs.push(("description", d.clone()));
    }
    pairs.push(("version", format!("{} (active)", f.version)));
    if f.status.as_deref() == Some("failed") {
        let why = f.status_reason.as_deref().unwrap_or("no reason given");
        pairs.push(("status", format!("failed: {why}")));
    }
    if let Some(sha) = &f.sha256 {
        pairs.push(("sha256", sha.clone()));
    }
    pairs.push(("mode", or_default(m.mode.clone(), DEFAULT_MODE.into())));
    match (m.reuse_sandbox, m.start_ahead) {
        (true, true) => pairs.push((
            "sandbox",
            "kept between calls (reuse_sandbox), the next process started ahead (start_ahead)"
                .into(),
        )),
        (true, false) => pairs.push(("sandbox", "kept between calls (reuse_sandbox)".into())),
        (false, true) => pairs.push((
            "sandbox",
            "fresh per call, its process started ahead (start_ahead)".into(),
        )),
        _ => {}
    }
    pairs.push((
        "entrypoint",
        m.entrypoint.as_ref().map_or("-".into(), entrypoint),
    ));
    // Lambda's names for it, when it has them (a runtime, or what the AWS tools set).
    let lambda = [
        (
            "runtime",
            m.runtime.clone().or_else(|| m.aws.runtime.clone()),
        ),
        (
            "handler",
            m.handler.clone().or_else(|| m.aws.handler.clone()),
        ),
        ("role", m.aws.role.clone()),
    ];
    for (k, v) in lambda {
        if let Some(v) = v {
            pairs.push((k, v));
        }
    }
    pairs.push((
        "memory",
        or_default(m.memory_mb.map(memory), memory(lim.memory_mb)),
    ));
    pairs.push((
        "cpus",
        or_default(m.cpus.map(|c| c.to_string()), lim.cpus.to_string()),
    ));
    pairs.push((
        "timeout",
        or_default(m.timeout_s.map(seconds), seconds(lim.timeout_s)),
    ));
    pairs.push((
        "concurrency",
        or_default(
            m.max_concurrency.map(|c| c.to_string()),
            lim.max_concurrency.to_string(),
        ),
    ));
    if let Some(n) = m.min_instances.filter(|&n| n > 0) {
        let what = if m.reuse_sandbox {
            "kept sandboxes"
        } else {
            "instances"
        };
        pairs.push(("warm", format!("{n} {what} kept warm (min_instances)")));
    }
    pairs.push((
        "public",
        or_default(m.public.map(|p| yes_no(p).into()), "no".into()),
    ));
    if let Some(n) = &f.network {
        let egress = match &n.egress {
            serde_json::Value::String(w) if w == "none" => "none (only its own loopback)".into(),
            serde_json::Value::String(w) => w.clone(),
            serde_json::Value::Array(rules) => rules
                .iter()
                .map(|r| r.as_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        pairs.push(("egress", egress));
        if let Some(c) = n.max_connections {
            pairs.push((
                "bandwidth",
                n.rate_mbit.map_or("unlimited".into(), |r| {
                    format!("{r} Mbit/s each way per instance")
                }),
            ));
            pairs.push(("connections", format!("at most {c} open")));
        }
    }
    if let Some(uid) = f.uid {
        pairs.push(("uid", uid.to_string()));
    }
    if let Some(n) = f.running {
        pairs.push(("running", n.to_string()));
    }
    pairs.push(("created", trim_fraction(&f.created_at, 0)));
    pairs.push(("updated", trim_fraction(&f.updated_at, 0)));
    let env = m
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    pairs.push((
        "env",
        if env.is_empty() {
            "-".into()
        } else {
            env.join("\n")
        },
    ));
    let mut text = kv(&pairs);
    if !versions.is_empty() {
        text.push('\n');
        text.push_str(&versions_table(versions, Some(f.version)));
    }
    text
}

#[derive(serde::Deserialize)]
struct VersionList {
    #[serde(default)]
    versions: Vec<VersionInfo>,
}

async fn versions(client: &Client, name: &str, json: bool) -> CmdResult {
    let v = client.versions(name).await?;
    if json {
        return print_json(&v);
    }
    let list: VersionList = typed(client, v)?;
    print_text(&versions_table(&list.versions, None))
}

/// `active` is the function's active version, when known; else each version's flag says.
fn versions_table(versions: &[VersionInfo], active: Option<u64>) -> String {
    let rows = versions
        .iter()
        .map(|v| {
            let is_active = v.active.unwrap_or(false) || active == Some(v.version);
            vec![
                v.version.to_string(),
                if is_active { "*" } else { "" }.into(),
                format_size(v.size_bytes),
                short_sha(&v.sha256),
                trim_fraction(&v.created_at, 0),
            ]
        })
        .collect::<Vec<_>>();
    table(&["VERSION", "ACTIVE", "SIZE", "SHA256", "CREATED"], &rows)
}

async fn status(client: &Client, json: bool) -> CmdResult {
    let v = client.status().await?;
    if json {
        return print_json(&v);
    }
    let s: StatusInfo = typed(client, v)?;
    print_text(&status_text(&s, client.endpoint()))
}

fn status_text(s: &StatusInfo, endpoint: &str) -> String {
    let opt = |v: Option<u64>| v.map_or("-".into(), |n| n.to_string());
    let none = || "-".to_string();
    // Under cgroup v1 the root is one directory per hierarchy, listed with commas.
    let cgroup_root = s
        .cgroup_root
        .as_ref()
        .map_or_else(none, |r| r.split(", ").collect::<Vec<_>>().join("\n"));
    kv(&[
        ("endpoint", endpoint.to_string()),
        ("agent", s.version.clone().unwrap_or_else(|| "-".into())),
        (
            "uptime",
            s.uptime_s
                .filter(|u| u.is_finite() && *u >= 0.0)
                .map_or("-".into(), |u| {
                    humantime::format_duration(Duration::from_secs(u as u64)).to_string()
                }),
        ),
        ("functions", opt(s.functions)),
        ("running", opt(s.running_instances)),
        (
            "capacity",
            s.capacity.as_ref().map_or_else(none, |c| {
                format!(
                    "memory {} of {} MiB, cpus {:.2} of {:.2}, instances {} of {}; {} evicted",
                    c.memory_bytes.committed >> 20,
                    c.memory_bytes.capacity >> 20,
                    c.cpus.committed,
                    c.cpus.capacity,
                    c.instances.committed,
                    c.instances.capacity,
                    c.evictions
                )
            }),
        ),
        ("cgroup", s.cgroup.clone().unwrap_or_else(none)),
        ("cgroup root", cgroup_root),
        (
            "limits",
            match &s.unenforced_limits {
                None => none(),
                Some(u) if u.is_empty() => "enforced".into(),
                Some(u) => format!("NOT enforced: no {} controller here", u.join(", ")),
            },
        ),
        (
            "spawner",
            s.spawn_helper.as_ref().map_or_else(none, |h| {
                let restarts = match h.restarts {
                    Some(n @ 1..) => format!(" ({n} lost and replaced)"),
                    _ => String::new(),
                };
                match (h.state.as_str(), h.pid) {
                    ("up", Some(pid)) => format!("spawn helper, pid {pid}{restarts}"),
                    ("off", _) => "the agent itself (sandbox.spawn_helper = false)".into(),
                    ("lost", _) => format!(
                        "the agent itself: the spawn helper was LOST (see the log), a new \
                             one is on its way{restarts}"
                    ),
                    (other, _) => other.to_string(),
                }
            }),
        ),
        (
            "state dir",
            s.state_dir.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "draining",
            s.draining.map_or_else(none, |d| yes_no(d).into()),
        ),
        (
            "cluster",
            s.cluster.as_ref().map_or_else(
                || "not in a cluster".into(),
                |c| {
                    let counts: Vec<String> =
                        c.members.iter().map(|(k, v)| format!("{v} {k}")).collect();
                    format!(
                        "node {} at {}; other members: {}{}",
                        c.node_id,
                        c.peer_addr,
                        if counts.is_empty() {
                            "none".into()
                        } else {
                            counts.join(", ")
                        },
                        if c.shared_access_keys == Some(false) {
                            "; access keys: this host's own (it joined before keys were the \
                             cluster's)"
                        } else {
                            ""
                        }
                    )
                },
            ),
        ),
    ])
}

// ---- logs ----

async fn logs(client: &Client, a: &LogsArgs) -> CmdResult {
    let mut resp = client.logs(&a.name, a.follow, a.tail).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = client.chunk(&mut resp).await? {
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            start += nl + 1;
            write_log_line(&mut out, line, a.json)?;
        }
        pending.drain(..start);
        // Lines show up as they arrive, even through a pipe.
        out.flush().map_err(write_err)?;
    }
    if !pending.is_empty() {
        write_log_line(&mut out, &pending, a.json)?;
    }
    out.flush().map_err(write_err)?;
    if a.follow {
        // Following only ends when the agent ends it: say so, and fail like a lost connection.
        return Err(ClientError::Connection {
            endpoint: client.endpoint().to_string(),
            reason: "the agent closed the log stream (is it shutting down?)".into(),
        }
        .into());
    }
    Ok(())
}

fn write_log_line(out: &mut impl Write, raw: &[u8], json: bool) -> CmdResult {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    if json {
        out.write_all(raw).map_err(write_err)?;
        return out.write_all(b"\n").map_err(write_err);
    }
    match serde_json::from_slice::<LogLine>(raw) {
        Ok(l) => writeln!(out, "{}", format_log_line(&l)).map_err(write_err),
        // Not a log object: show it rather than lose it.
        Err(_) => {
            out.write_all(raw).map_err(write_err)?;
            out.write_all(b"\n").map_err(write_err)
        }
    }
}

/// `2026-11-22T03:40:00Z hello v3 1a2b3c4d the line`; lines from the agent itself are marked.
fn format_log_line(l: &LogLine) -> String {
    let version = l.version.map_or("v-".into(), |v| format!("v{v}"));
    let rid = match l.request_id.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => r.chars().take(SHORT_REQUEST_ID).collect::<String>(),
        None => "-".into(),
    };
    let marker = match l.stream.as_deref() {
        None | Some("stderr") => String::new(),
        Some(other) => format!("[{other}] "),
    };
    format!(
        "{} {} {} {:<width$} {marker}{}",
        trim_fraction(&l.ts, 3),
        l.function,
        version,
        rid,
        l.line,
        width = SHORT_REQUEST_ID
    )
}

// ---- formatting helpers ----

/// Columns aligned with two spaces between them; the last column is not padded.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row = headers.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i < last {
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count());
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key:   value` lines, values aligned; a value's further lines are indented under it.
fn kv(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let mut lines = v.lines();
        let first = lines.next().unwrap_or("");
        out.push_str(&format!("{:<width$}  {first}\n", format!("{k}:")));
        for more in lines {
            out.push_str(&format!("{:<width$}  {more}\n", ""));
        }
    }
    out
}

fn short_sha(sha: &str) -> String {
    if sha.chars().count() > SHORT_SHA {
        format!("{}…", sha.chars().take(SHORT_SHA).collect::<String>())
    } else {
        sha.to_string()
    }
}

fn memory(mb: u64) -> String {
    format_size(mb.saturating_mul(1 << 20))
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The manifest's value, or the API's default for it, marked as such.
fn or_default(value: Option<String>, default: String) -> String {
    value.unwrap_or_else(|| format!("{default} (default)"))
}

/// An RFC 3339 time with its fraction of a second cut or padded to `digits` (none for 0),
/// so that times line up: the agent writes nanoseconds without trailing zeros.
fn trim_fraction(ts: &str, digits: usize) -> String {
    // Seconds end 9 bytes after the 'T' ("T03:40:00").
    let Some(secs_end) = ts
        .find('T')
        .map(|t| t + 9)
        .filter(|&e| e <= ts.len() && ts.is_char_boundary(e))
    else {
        return ts.to_string();
    };
    let (head, rest) = ts.split_at(secs_end);
    let rest_digits = rest.strip_prefix('.').unwrap_or("");
    let frac_len = rest_digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest_digits.len());
    let (frac, tail) = if rest.starts_with('.') {
        rest_digits.split_at(frac_len)
    } else {
        ("", rest)
    };
    if digits == 0 {
        return format!("{head}{tail}");
    }
    let frac = format!("{frac:0<digits$}");
    format!("{head}.{}{tail}", &frac[..digits])
}

fn seconds(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s}s")
    }
}

fn entrypoint(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// "5m ago" for an RFC 3339 time, or the text as is when it does not parse.
pub(super) fn age(ts: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339_weak(ts) else {
        return ts.to_string();
    };
    let secs = match now.duration_since(then) {
        Ok(d) => d.as_secs(),
        Err(_) => 0,
    };
    match secs {
        0..10 => "just now".into(),
        10..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: FunctionsCommand,
    }

    fn parse(args: &[&str]) -> Result<FunctionsCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("fnlet").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn arguments() {
        match parse(&["invoke", "hello", "-d", "@-", "-v"]).unwrap() {
            FunctionsCommand::Invoke(a) => {
                assert_eq!(a.name, "hello");
                assert_eq!(a.data.as_deref(), Some("@-"));
                assert!(a.verbose);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["logs", "hello", "-f", "-n", "5", "--json"]).unwrap() {
            FunctionsCommand::Logs(a) => {
                assert!(a.follow && a.json);
                assert_eq!(a.tail, Some(5));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["rollback", "hello", "--to", "3", "--endpoint", "10.0.0.1:9"]).unwrap() {
            FunctionsCommand::Rollback(a) => {
                assert_eq!(a.to, Some(3));
                assert_eq!(
                    a.conn.endpoint.map(|u| u.to_string()).as_deref(),
                    Some("http://10.0.0.1:9/")
                );
            }
            other => panic!("{other:?}"),
        }
        match parse(&["list", "--json", "--token", "t", "--state-dir", "/x"]).unwrap() {
            FunctionsCommand::Ls(a) => {
                assert!(a.output.json);
                assert_eq!(a.conn.token.as_deref(), Some("t"));
                assert_eq!(a.conn.state_dir, Some(PathBuf::from("/x")));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["remove", "x"]).unwrap(),
            FunctionsCommand::Rm(_)
        ));
        assert!(matches!(
            parse(&["deploy", "./dir"]).unwrap(),
            FunctionsCommand::Deploy(_)
        ));
    }

    #[test]
    fn usage_errors() {
        use clap::error::ErrorKind;
        assert_eq!(
            parse(&["invoke", "Hello"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["describe", "a/b"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["rollback", "x", "--to", "0"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["ls", "--endpoint", "https://x"])
                .unwrap_err()
                .kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["deploy"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(parse(&["ls", "--help"]).unwrap_err().exit_code(), 0);
        assert_eq!(parse(&["invoke", "Bad"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn names() {
        assert!(parse_name("hello").is_ok());
        assert!(parse_name("0-a_b").is_ok());
        assert!(parse_name(&"a".repeat(64)).is_ok());
        assert!(parse_name(&"a".repeat(65)).is_err());
        assert!(parse_name("").is_err());
        assert!(parse_name("-a").is_err());
        assert!(parse_name("_a").is_err());
        assert!(parse_name("A").is_err());
        assert!(parse_name("a.b").is_err());
    }

    #[test]
    fn input_data() {
        assert_eq!(read_input(None).unwrap(), b"");
        assert_eq!(read_input(Some("{\"a\":1}")).unwrap(), b"{\"a\":1}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.bin");
        std::fs::write(&p, [0u8, 255, 10]).unwrap();
        assert_eq!(
            read_input(Some(&format!("@{}", p.display()))).unwrap(),
            [0u8, 255, 10]
        );
        let err = read_input(Some("@/nonexistent/file")).unwrap_err();
        assert!(
            matches!(err, CliError::Usage(ref m) if m.contains("/nonexistent/file")),
            "{err:?}"
        );
    }

    fn version(v: u64, active: bool) -> VersionInfo {
        VersionInfo {
            name: "hello".into(),
            version: v,
            sha256: format!("{v}{}", "ab".repeat(31)),
            size_bytes: 1536 << 10,
            created_at: "2026-11-22T03:40:00Z".into(),
            active: Some(active),
        }
    }

    fn function() -> FunctionInfo {
        serde_json::from_value(serde_json::json!({
            "name": "hello",
            "version": 3,
            "manifest": {"name": "hello", "mode": "exec", "entrypoint": ["python3", "app.py"],
                         "memory_mb": 256, "timeout_s": 2.5, "cpus": 0.5, "max_concurrency": 4,
                         "env": {"A": "1", "B": "x y"}},
            "sha256": "ab".repeat(32),
            "uid": 200003,
            "created_at": "2026-11-22T03:00:00Z",
            "updated_at": "2026-11-22T03:40:00Z",
            "running": 2
        }))
        .unwrap()
    }

    #[test]
    fn tables_are_aligned() {
        let t = table(
            &["NAME", "VERSION", "X"],
            &[
                vec!["a".into(), "10".into(), "last".into()],
                vec!["longer-name".into(), "2".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         VERSION  X\n\
             a            10       last\n\
             longer-name  2\n"
        );
    }

    #[test]
    fn ls_output() {
        let now = humantime::parse_rfc3339("2026-11-22T03:45:00Z").unwrap();
        let mut other = function();
        other.name = "resize-images".into();
        other.version = 12;
        other.manifest.public = Some(true);
        other.manifest.memory_mb = Some(1024);
        other.manifest.timeout_s = Some(30.0);
        other.updated_at = "2026-11-20T03:45:00Z".into();
        let mut bare = function();
        bare.name = "bare".into();
        bare.manifest = serde_json::from_value(serde_json::json!({"entrypoint": "run"})).unwrap();
        bare.running = None;
        bare.updated_at = "2026-11-22T03:44:00.123456789Z".into();
        let t = functions_table(&[function(), other, bare], now);
        assert_eq!(
            t,
            "NAME           VERSION  MODE  MEMORY  TIMEOUT  PUBLIC  RUNNING  UPDATED\n\
             hello          3        exec  256M    2.5s     no      2        5m ago\n\
             resize-images  12       exec  1G      30s      yes     2        2d ago\n\
             bare           3        exec  128M    10s      no      -        59s ago\n"
        );
    }

    #[test]
    fn describe_output() {
        let text = describe_text(&function(), &[version(3, true), version(2, false)]);
        let expected = format!(
            "name:         hello\n\
             version:      3 (active)\n\
             sha256:       {sha}\n\
             mode:         exec\n\
             entrypoint:   python3 app.py\n\
             memory:       256M\n\
             cpus:         0.5\n\
             timeout:      2.5s\n\
             concurrency:  4\n\
             public:       no (default)\n\
             uid:          200003\n\
             running:      2\n\
             created:      2026-11-22T03:00:00Z\n\
             updated:      2026-11-22T03:40:00Z\n\
             env:          A=1\n\
             \x20             B=x y\n\
             \n\
             VERSION  ACTIVE  SIZE  SHA256         CREATED\n\
             3        *       1.5M  3abababababa…  2026-11-22T03:40:00Z\n\
             2                1.5M  2abababababa…  2026-11-22T03:40:00Z\n",
            sha = "ab".repeat(32)
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn describe_shows_the_network_and_its_limits() {
        let mut f = function();
        f.network = Some(crate::cli::client::NetworkInfo {
            egress: serde_json::json!(["10.0.0.0/8:5432", "api.example.com:443"]),
            rate_mbit: Some(20),
            max_connections: Some(64),
        });
        let text = describe_text(&f, &[]);
        for line in [
            "\negress:       10.0.0.0/8:5432, api.example.com:443\n",
            "\nbandwidth:    20 Mbit/s each way per instance\n",
            "\nconnections:  at most 64 open\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        f.network = Some(crate::cli::client::NetworkInfo {
            egress: serde_json::json!("none"),
            rate_mbit: None,
            max_connections: None,
        });
        let text = describe_text(&f, &[]);
        assert!(
            text.contains("\negress:       none (only its own loopback)\n"),
            "{text}"
        );
        assert!(!text.contains("bandwidth"), "{text}");
    }

    #[test]
    fn describe_shows_what_is_kept_warm() {
        let mut f = function();
        assert!(!describe_text(&f, &[]).contains("warm:"));
        f.manifest.min_instances = Some(2);
        f.manifest.reuse_sandbox = true;
        let text = describe_text(&f, &[]);
        assert!(
            text.contains(
                "\nconcurrency:  4\nwarm:         2 kept sandboxes kept warm (min_instances)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn describe_says_why_a_function_is_failed() {
        let mut f = function();
        assert!(!describe_text(&f, &[]).contains("status:"));
        f.status = Some("failed".into());
        f.status_reason = Some("its bundle is missing; redeploy it".into());
        let text = describe_text(&f, &[]);
        assert!(
            text.contains("\nstatus:       failed: its bundle is missing; redeploy it\n"),
            "{text}"
        );
    }

    #[test]
    fn deploy_and_status_lines() {
        assert_eq!(
            deployed_line(&version(3, true)),
            "deployed hello version 3 (sha256 3abababababa…)"
        );
        let s = StatusInfo {
            version: Some("0.1.0".into()),
            uptime_s: Some(3725.4),
            functions: Some(2),
            running_instances: Some(1),
            cgroup: Some("v2".into()),
            cgroup_root: Some("fnlet".into()),
            state_dir: Some("/var/lib/fnlet".into()),
            draining: Some(false),
            unenforced_limits: Some(vec!["memory".into(), "pids".into()]),
            spawn_helper: Some(crate::cli::client::SpawnHelperStatus {
                state: "up".into(),
                pid: Some(4242),
                restarts: Some(1),
            }),
            cluster: Some(crate::cli::client::ClusterStatus {
                node_id: "host-a".into(),
                peer_addr: "10.0.0.1:8741".into(),
                members: [("alive".to_string(), 2), ("down".to_string(), 1)].into(),
                shared_access_keys: Some(true),
            }),
            capacity: Some(crate::cli::client::CapacityStatus {
                memory_bytes: crate::cli::client::Committed {
                    committed: 384 << 20,
                    capacity: 1024 << 20,
                },
                cpus: crate::cli::client::Committed {
                    committed: 1.5,
                    capacity: 32.0,
                },
                instances: crate::cli::client::Committed {
                    committed: 3,
                    capacity: 2048,
                },
                evictions: 2,
            }),
        };
        assert_eq!(
            status_text(&s, "http://127.0.0.1:8740"),
            "endpoint:     http://127.0.0.1:8740\n\
             agent:        0.1.0\n\
             uptime:       1h 2m 5s\n\
             functions:    2\n\
             running:      1\n\
             capacity:     memory 384 of 1024 MiB, cpus 1.50 of 32.00, instances 3 of 2048; 2 evicted\n\
             cgroup:       v2\n\
             cgroup root:  fnlet\n\
             limits:       NOT enforced: no memory, pids controller here\n\
             spawner:      spawn helper, pid 4242 (1 lost and replaced)\n\
             state dir:    /var/lib/fnlet\n\
             draining:     no\n\
             cluster:      node host-a at 10.0.0.1:8741; other members: 2 alive, 1 down\n"
        );
        let mut unshared = s.clone();
        if let Some(c) = unshared.cluster.as_mut() {
            c.shared_access_keys = Some(false);
        }
        assert!(status_text(&unshared, "http://127.0.0.1:8740").ends_with(
            "other members: 2 alive, 1 down; access keys: this host's own (it joined \
                 before keys were the cluster's)\n"
        ));
    }

    #[test]
    fn log_lines() {
        let l: LogLine = serde_json::from_str(
            r#"{"ts":"2026-11-22T03:40:00Z","function":"hello","version":3,
                "request_id":"0123456789abcdef","stream":"stderr","line":"hi there"}"#,
        )
        .unwrap();
        assert_eq!(
            format_log_line(&l),
            "2026-11-22T03:40:00.000Z hello v3 01234567 hi there"
        );
        let l: LogLine = serde_json::from_str(
            r#"{"ts":"2026-11-22T03:40:01.0523Z","function":"hello","version":3,
                "stream":"agent","line":"instance started"}"#,
        )
        .unwrap();
        assert_eq!(
            format_log_line(&l),
            "2026-11-22T03:40:01.052Z hello v3 -        [agent] instance started"
        );

        let mut out = Vec::new();
        write_log_line(
            &mut out,
            br#"{"ts":"t","function":"f","version":1,"line":"x"}"#,
            false,
        )
        .unwrap();
        write_log_line(&mut out, b"not json\r", false).unwrap();
        write_log_line(&mut out, b"", false).unwrap();
        write_log_line(&mut out, br#"{"a":1}"#, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "t f v1 -        x\nnot json\n{\"a\":1}\n"
        );
    }

    #[test]
    fn hints() {
        let api = |status: u16, kind: &str| ApiError {
            status: http::StatusCode::from_u16(status).unwrap(),
            kind: kind.into(),
            message: "m".into(),
            body: None,
            request_id: Some("req-9".into()),
            version: None,
            retry_after: None,
        };
        let target = |src| Target {
            endpoint: client::parse_endpoint(client::DEFAULT_ENDPOINT).unwrap(),
            token: None,
            token_source: src,
        };
        let missing = |problem| {
            target(TokenSource::Missing {
                file: "/var/lib/fnlet/admin.token".into(),
                problem,
            })
        };
        let denied = missing(TokenFileProblem::PermissionDenied);
        let none = ErrorContext::default();
        assert_eq!(
            api_hints(&api(401, "unauthorized"), Some(&denied), &none),
            [
                "hint: set FNLET_TOKEN or run as root so fnlet can read /var/lib/fnlet/admin.token \
              (permission denied)"
            ]
        );
        let h = api_hints(
            &api(401, "unauthorized"),
            Some(&missing(TokenFileProblem::NotFound)),
            &none,
        );
        assert!(h[0].contains("--state-dir"), "{h:?}");
        let h = api_hints(
            &api(401, "unauthorized"),
            Some(&target(TokenSource::Env)),
            &none,
        );
        assert!(h[0].contains("refused the token given"), "{h:?}");

        let context = |args: &[&str]| error_context(&parse(args).unwrap());
        let h = api_hints(
            &api(404, "not_found"),
            None,
            &context(&["describe", "nope"]),
        );
        assert_eq!(h, ["hint: `fnlet ls` lists the deployed functions"]);
        let h = api_hints(
            &api(404, "not_found"),
            None,
            &context(&["rollback", "x", "--to", "9"]),
        );
        assert!(h[0].contains("fnlet versions x"), "{h:?}");
        let h = api_hints(&api(504, "timeout"), None, &context(&["invoke", "slow"]));
        assert_eq!(
            h,
            ["request id req-9: `fnlet logs slow` shows what the function wrote"]
        );
        let mut busy = api(429, "overloaded");
        busy.retry_after = Some("1".into());
        assert_eq!(
            api_hints(&busy, None, &context(&["invoke", "x"])),
            ["hint: the agent says to retry after 1s"]
        );
    }

    #[test]
    fn small_formats() {
        assert_eq!(seconds(10.0), "10s");
        assert_eq!(seconds(0.25), "0.25s");
        assert_eq!(memory(128), "128M");
        assert_eq!(
            trim_fraction("2026-11-22T03:40:00.68982626Z", 3),
            "2026-11-22T03:40:00.689Z"
        );
        assert_eq!(
            trim_fraction("2026-11-22T03:40:00.5Z", 3),
            "2026-11-22T03:40:00.500Z"
        );
        assert_eq!(
            trim_fraction("2026-11-22T03:40:00Z", 3),
            "2026-11-22T03:40:00.000Z"
        );
        assert_eq!(
            trim_fraction("2026-11-22T03:40:00.123456+02:00", 0),
            "2026-11-22T03:40:00+02:00"
        );
        assert_eq!(
            trim_fraction("2026-11-22T03:40:00.1Z", 0),
            "2026-11-22T03:40:00Z"
        );
        assert_eq!(trim_fraction("t", 3), "t");
        assert_eq!(trim_fraction("2026-11-22T03", 3), "2026-11-22T03");
        assert_eq!(short_sha("abc"), "abc");
        assert_eq!(format_duration(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1.50s");
        let now = humantime::parse_rfc3339("2026-11-22T03:45:00Z").unwrap();
        assert_eq!(age("2026-11-22T03:44:58Z", now), "just now");
        assert_eq!(age("2026-11-22T03:44:00.5Z", now), "59s ago");
        assert_eq!(age("2026-11-22T01:44:00Z", now), "2h ago");
        assert_eq!(age("2026-11-23T00:00:00Z", now), "just now");
        assert_eq!(age("yesterday", now), "yesterday");
    }
}
