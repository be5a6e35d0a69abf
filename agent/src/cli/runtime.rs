//! `fnlet runtime`: the Lambda runtimes that manifests name (`runtime = "python3.11"`). `add`
//! installs AWS's runtime interface client for one with the host's interpreter, where the
//! agent's config expects it; `ls` shows what the config maps and whether it is installed.
//!
//! Local commands: they read the agent's config and state directory, not its API.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::{self, Config, ConfigError, DEFAULT_CONFIG_PATH, RuntimeConfig};

/// AWS's Python runtime interface client (PyPI); the default runtime command runs
/// `python3 -m awslambdaric`, so whatever is installed must provide this module.
const PYTHON_CLIENT: &str = "awslambdaric";
/// The interpreter when neither --python nor the config names one.
const DEFAULT_PYTHON: &str = "/usr/bin/python3";
/// PATH for the commands run here, as instances get it.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Prints the interpreter's version as "3.11.2".
const VERSION_SCRIPT: &str = "import sys; print('%d.%d.%d' % sys.version_info[:3])";
/// What the runtime imports at start (the C extension too), then its version and location.
const IMPORT_SCRIPT: &str = "import awslambdaric, awslambdaric.bootstrap, runtime_client\n\
print(getattr(awslambdaric, '__version__', 'unknown'))\n\
print(awslambdaric.__file__)";
/// Lines of pip's output shown when it fails.
const PIP_TAIL_LINES: usize = 15;

macro_rules! examples {
    ($($line:literal),+ $(,)?) => {
        concat!(
            "Examples:\n",
            $("  ", $line, "\n",)+
            "\nExit status: 0 success; 1 failure (the message says which step); 2 usage error.",
        )
    };
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// Install (or upgrade) a runtime's client where the agent's config expects it.
    ///
    /// `pythonX.Y` gets AWS's runtime interface client (awslambdaric, from PyPI) installed by
    /// the host's Python X.Y with pip into <STATE_DIR>/runtimes/pythonX.Y, readable by the
    /// functions' uids. Only wheels are used: nothing is compiled. The interpreter must be
    /// the one the runtime runs, and its version must match the name. Running it again
    /// upgrades the client, or keeps it when nothing changed; functions started afterwards
    /// use it, without an agent restart.
    ///
    /// On a host that cannot reach a package index, download the wheels elsewhere and pass
    /// the folder with --wheels:
    ///   python3 -m pip download --only-binary=:all: --python-version 3.11 \
    ///       --platform manylinux2014_x86_64 -d wheels awslambdaric
    #[command(verbatim_doc_comment, after_help = examples!(
        "fnlet runtime add python3.11",
        "fnlet runtime add python3.11 --package awslambdaric==4.2.2",
        "fnlet runtime add python3.11 --wheels ./wheels      # offline"
    ))]
    Add(AddArgs),

    /// List the runtimes the agent's config maps, and whether each is installed.
    #[command(visible_alias = "list", after_help = examples!(
        "fnlet runtime ls",
        "fnlet runtime ls --config /etc/fnlet/config.toml --json"
    ))]
    Ls(LsArgs),
}

/// Where the agent's config and state are; both commands read them as `fnlet agent` does.
#[derive(Debug, Clone, Args)]
pub struct Location {
    /// The agent's config file, for its [runtimes] and state_dir
    /// [default: /etc/fnlet/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's state directory [env: FNLET_STATE_DIR] [default: the config's state_dir,
    /// /var/lib/fnlet].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The runtime, as manifests name it: pythonX.Y (e.g. python3.11).
    #[arg(value_name = "NAME", value_parser = parse_runtime_name)]
    runtime: PythonRuntime,
    /// The interpreter that installs the client: the one the runtime runs [default: the
    /// runtime's command in the config, else /usr/bin/pythonX.Y or /usr/bin/python3].
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// What pip installs: a requirement such as awslambdaric==4.2.2.
    #[arg(long, value_name = "REQUIREMENT", default_value = PYTHON_CLIENT,
          value_parser = parse_requirement)]
    package: String,
    /// Install from the wheels in DIR alone and ask no index (for hosts without one).
    #[arg(long, value_name = "DIR")]
    wheels: Option<PathBuf>,
    #[command(flatten)]
    location: Location,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    location: Location,
}

/// A Python runtime's name and the interpreter version it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonRuntime {
    name: String,
    major: u32,
    minor: u32,
}

fn parse_runtime_name(s: &str) -> Result<PythonRuntime, String> {
    let bad = || {
        format!(
            "{s:?}: `fnlet runtime add` installs Python runtimes, named pythonX.Y after the \
             interpreter (e.g. python3.11); other runtimes ship a `bootstrap` in the bundle"
        )
    };
    let (major, minor) = s
        .strip_prefix("python")
        .and_then(|v| v.split_once('.'))
        .ok_or_else(bad)?;
    let (major, minor): (u32, u32) = match (major.parse(), minor.parse()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(bad()),
    };
    // Only the canonical spelling: "python3.011" or "python+3.11" would name another runtime.
    if format!("python{major}.{minor}") != s {
        return Err(bad());
    }
    Ok(PythonRuntime {
        name: s.to_string(),
        major,
        minor,
    })
}

/// A pip requirement (`awslambdaric`, `awslambdaric==4.2.2`), never an option or a list.
fn parse_requirement(s: &str) -> Result<String, String> {
    if s.is_empty() || s.starts_with('-') || s.contains(char::is_whitespace) {
        Err("a single pip requirement such as awslambdaric==4.2.2".into())
    } else {
        Ok(s.to_string())
    }
}

/// `sys.version_info` as the version script prints it.
fn parse_interpreter_version(out: &str) -> Option<(u32, u32, u32)> {
    let mut it = out.trim().split('.').map(|p| p.parse::<u32>().ok());
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is under /tmp, /dev, /proc or /var/task, which every sandbox builds for itself: \
         functions could not see a runtime there (give the agent a state_dir elsewhere)"
    )]
    NotBindable(PathBuf),
    #[error("--wheels {0}: not a directory")]
    NoWheels(PathBuf),
    #[error("running {python}: {source}")]
    Spawn {
        python: PathBuf,
        source: std::io::Error,
    },
    #[error("{python} did not say its version (exit {status}): {output}")]
    NoVersion {
        python: PathBuf,
        status: String,
        output: String,
    },
    #[error(
        "{python} is Python {found}, but {runtime} needs Python {want}.x: pass the matching \
         interpreter with --python, or add the runtime named after this one (python{found_short})"
    )]
    VersionMismatch {
        python: PathBuf,
        runtime: String,
        found: String,
        found_short: String,
        want: String,
    },
    #[error("{python} has no pip (on Debian and Ubuntu: apt-get install python3-pip)")]
    NoPip { python: PathBuf },
    #[error(
        "pip could not reach the package index:\n{tail}\nOn a host without one, download the \
         wheels where there is one and install from them:\n  {download}\n  fnlet runtime add \
         {runtime} --wheels wheels"
    )]
    IndexUnreachable {
        runtime: String,
        tail: String,
        download: String,
    },
    #[error("pip found no wheel of {package} for Python {want} {place}:\n{tail}\n{hint}")]
    NoDistribution {
        package: String,
        want: String,
        place: String,
        tail: String,
        hint: String,
    },
    #[error("pip install failed ({status}):\n{tail}")]
    Pip { status: String, tail: String },
    #[error("the installed client does not import with {python} (exit {status}):\n{tail}")]
    Import {
        python: PathBuf,
        status: String,
        tail: String,
    },
    #[error("the installed awslambdaric was imported from {found}, not from {dir}")]
    ImportedElsewhere { dir: PathBuf, found: String },
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Path {
        path: path.to_path_buf(),
        source,
    }
}

pub fn run(cmd: RuntimeCommand) -> ExitCode {
    let env = |k: &str| std::env::var_os(k);
    let result = match cmd {
        RuntimeCommand::Add(a) => add(&a, &env),
        RuntimeCommand::Ls(a) => ls(&a, &env),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The agent's config and state directory, found as `fnlet agent` finds them.
#[derive(Debug)]
struct Located {
    config: Config,
    /// The file read, if there was one (else the embedded defaults).
    config_file: Option<PathBuf>,
    state_dir: PathBuf,
}

type Env<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// --state-dir, then $FNLET_STATE_DIR, then the config's state_dir.
fn locate(loc: &Location, env: Env) -> Result<Located, RuntimeError> {
    let (path, explicit) = match &loc.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let config = Config::load(&path, explicit)?;
    let config_file = (explicit || path.exists()).then_some(path);
    let state_dir = loc
        .state_dir
        .clone()
        .or_else(|| {
            env(super::client::ENV_STATE_DIR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| config.state_dir.clone());
    let state_dir = std::path::absolute(&state_dir).map_err(at(&state_dir))?;
    Ok(Located {
        config,
        config_file,
        state_dir,
    })
}

/// The interpreter to install with: --python, the configured runtime's own, or the host's
/// `pythonX.Y` (`exists` is asked only for that last guess).
fn pick_python(
    args_python: Option<&Path>,
    configured: Option<&RuntimeConfig>,
    rt: &PythonRuntime,
    exists: &dyn Fn(&Path) -> bool,
) -> PathBuf {
    if let Some(p) = args_python {
        return p.to_path_buf();
    }
    if let Some(c) = configured.and_then(|r| r.command.first()) {
        return PathBuf::from(c);
    }
    let named = PathBuf::from(format!("/usr/bin/python{}.{}", rt.major, rt.minor));
    if exists(&named) {
        named
    } else {
        PathBuf::from(DEFAULT_PYTHON)
    }
}

fn check_version(
    rt: &PythonRuntime,
    python: &Path,
    found: (u32, u32, u32),
) -> Result<(), RuntimeError> {
    if (found.0, found.1) == (rt.major, rt.minor) {
        return Ok(());
    }
    Err(RuntimeError::VersionMismatch {
        python: python.to_path_buf(),
        runtime: rt.name.clone(),
        found: format!("{}.{}.{}", found.0, found.1, found.2),
        found_short: format!("{}.{}", found.0, found.1),
        want: format!("{}.{}", rt.major, rt.minor),
    })
}

/// pip's arguments: wheels only (no source builds), into `target`; with `wheels`, from that
/// folder and no index.
fn pip_args(target: &Path, package: &str, wheels: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--no-warn-script-location",
        "--only-binary=:all:",
        "--target",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(target.into());
    if let Some(w) = wheels {
        args.push("--no-index".into());
        args.push("--find-links".into());
        args.push(w.into());
    }
    args.push(package.into());
    args
}

/// The last lines of pip's output, for an error message.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why pip failed, from what it wrote.
#[derive(Debug, PartialEq, Eq)]
enum PipFailure {
    NoPip,
    Unreachable,
    NoDistribution,
    Other,
}

fn classify_pip_failure(stderr: &str) -> PipFailure {
    const NETWORK: [&str; 8] = [
        "NewConnectionError",
        "Failed to establish a new connection",
        "ConnectTimeoutError",
        "Temporary failure in name resolution",
        "Name or service not known",
        "Network is unreachable",
        "ProxyError",
        "connection error:",
    ];
    if stderr.contains("No module named pip") {
        PipFailure::NoPip
    } else if NETWORK.iter().any(|m| stderr.contains(m)) {
        PipFailure::Unreachable
    } else if stderr.contains("No matching distribution found") {
        PipFailure::NoDistribution
    } else {
        PipFailure::Other
    }
}

/// The `pip download` that fills a --wheels folder for this host elsewhere.
fn download_command(rt: &PythonRuntime, package: &str, dir: &Path) -> String {
    format!(
        "python3 -m pip download --only-binary=:all: --python-version {}.{} --platform \
         manylinux2014_{} -d {} {package}",
        rt.major,
        rt.minor,
        std::env::consts::ARCH,
        dir.display()
    )
}

fn status_text(o: &Output) -> String {
    match o.status.code() {
        Some(c) => format!("exit status {c}"),
        None => o.status.to_string(),
    }
}

/// Adds read (and, where anyone may execute, or for directories, search) permission for
/// everyone below `dir`, which the functions' uids need; symlinks are left as they are.
fn make_readable(dir: &Path) -> Result<(), RuntimeError> {
    let meta = std::fs::symlink_metadata(dir).map_err(at(dir))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    let want = if meta.is_dir() || mode & 0o111 != 0 {
        mode | 0o555
    } else {
        mode | 0o444
    };
    if want != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want)).map_err(at(dir))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(at(dir))? {
            make_readable(&entry.map_err(at(dir))?.path())?;
        }
    }
    Ok(())
}

/// The distributions installed in a `--target` folder: (name, version) from the
/// `NAME-VERSION.dist-info` folders, sorted.
fn dist_infos(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".dist-info")?;
            let (n, v) = stem.rsplit_once('-')?;
            Some((n.to_string(), v.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The version of `awslambdaric` in a folder, if it is installed there.
fn client_version(dir: &Path) -> Option<String> {
    dist_infos(dir)
        .into_iter()
        .find(|(n, _)| n == PYTHON_CLIENT)
        .map(|(_, v)| v)
}

/// Whether sandboxes can see `dir` bound at its own path (not under what they build).
fn bindable(dir: &Path) -> bool {
    isolate::bind_dest_allowed(dir)
}

/// Removes a folder when dropped, unless disarmed: the staging copy of a failed install.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// What the interpreter imported from a runtime folder: (version, awslambdaric's __init__).
fn import_check(python: &Path, dir: &Path) -> Result<(String, String), RuntimeError> {
    // As an instance starts it: a bare environment, the folder on PYTHONPATH; no bytecode
    // written, so nothing root-owned appears in a folder the functions only read.
    let out = Command::new(python)
        .arg("-s")
        .arg("-c")
        .arg(IMPORT_SCRIPT)
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .env("LANG", "C.UTF-8")
        .env("PYTHONPATH", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RuntimeError::Spawn {
            python: python.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(v), Some(file)) => Ok((v.to_string(), file.to_string())),
        _ => Err(RuntimeError::Import {
            python: python.to_path_buf(),
            status: status_text(&out),
            tail: tail(
                &format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
                PIP_TAIL_LINES,
            ),
        }),
    }
}

fn interpreter_version(python: &Path) -> Result<(u32, u32, u32), RuntimeError> {
    let out = Command::new(python)
        .args(["-E", "-s", "-c", VERSION_SCRIPT])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RuntimeError::Spawn {
            python: python.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match parse_interpreter_version(&stdout) {
        Some(v) if out.status.success() => Ok(v),
        _ => Err(RuntimeError::NoVersion {
            python: python.to_path_buf(),
            status: status_text(&out),
            output: tail(
                &format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
                PIP_TAIL_LINES,
            ),
        }),
    }
}

/// The `[runtimes]` entry that would run a runtime installed here, as TOML.
fn config_snippet(rt: &PythonRuntime, python: &Path) -> String {
    let dir = config::runtime_dir(Path::new(config::STATE_DIR_VAR), &rt.name);
    format!(
        "[runtimes.\"{name}\"]\ncommand = [\"{python}\", \"-m\", \"awslambdaric\"]\npaths = \
         [\"{dir}\"]\nenv = {{ PYTHONPATH = \"{dir}\" }}\n",
        name = rt.name,
        python = python.display(),
        dir = dir.display(),
    )
}

fn add(a: &AddArgs, env: Env) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let rt = &a.runtime;
    let loc = locate(&a.location, env)?;
    let dir = config::runtime_dir(&loc.state_dir, &rt.name);
    if !bindable(&dir) {
        return Err(RuntimeError::NotBindable(dir));
    }
    if let Some(w) = &a.wheels
        && !w.is_dir()
    {
        return Err(RuntimeError::NoWheels(w.clone()));
    }
    let configured = loc
        .config
        .runtimes
        .get(&rt.name)
        .map(|r| r.resolved(&loc.state_dir));
    let python = pick_python(a.python.as_deref(), configured.as_ref(), rt, &|p| {
        p.exists()
    });
    let found = interpreter_version(&python)?;
    check_version(rt, &python, found)?;

    let runtimes = dir
        .parent()
        .expect("runtime_dir has a parent")
        .to_path_buf();
    std::fs::create_dir_all(&runtimes).map_err(at(&runtimes))?;
    make_readable_dir(&runtimes)?;
    // One install at a time per runtime: two would race on the final renames.
    let lock_path = runtimes.join(format!(".{}.lock", rt.name));
    let lock = std::fs::File::create(&lock_path).map_err(at(&lock_path))?;
    lock.lock().map_err(at(&lock_path))?;

    let staging = runtimes.join(format!(".{}.new-{}", rt.name, std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(at(&staging))?;
    }
    let mut cleanup = RemoveOnDrop(Some(staging.clone()));
    println!(
        "installing {} for {} into {} with {} (Python {}.{}.{}){} ...",
        a.package,
        rt.name,
        dir.display(),
        python.display(),
        found.0,
        found.1,
        found.2,
        match &a.wheels {
            Some(w) => format!(" from the wheels in {}", w.display()),
            None => String::new(),
        }
    );
    let out = Command::new(&python)
        .args(pip_args(&staging, &a.package, a.wheels.as_deref()))
        // The host's PYTHONPATH could shadow pip itself; root is expected here.
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RuntimeError::Spawn {
            python: python.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let t = tail(&stderr, PIP_TAIL_LINES);
        let want = format!("{}.{}", rt.major, rt.minor);
        return Err(match classify_pip_failure(&stderr) {
            PipFailure::NoPip => RuntimeError::NoPip { python },
            PipFailure::Unreachable => RuntimeError::IndexUnreachable {
                runtime: rt.name.clone(),
                tail: t,
                download: download_command(rt, &a.package, Path::new("wheels")),
            },
            PipFailure::NoDistribution => RuntimeError::NoDistribution {
                package: a.package.clone(),
                want,
                place: match &a.wheels {
                    Some(w) => format!("in {}", w.display()),
                    None => "on the package index".into(),
                },
                hint: match &a.wheels {
                    Some(w) => format!("Fill it with:\n  {}", download_command(rt, &a.package, w)),
                    None => format!(
                        "If this host cannot reach the index, download the wheels where one \
                         can:\n  {}\nand pass that folder with --wheels.",
                        download_command(rt, &a.package, Path::new("wheels"))
                    ),
                },
                tail: t,
            },
            PipFailure::Other => RuntimeError::Pip {
                status: status_text(&out),
                tail: t,
            },
        });
    }
    make_readable(&staging)?;
    let (version, file) = import_check(&python, &staging)?;
    if !Path::new(&file).starts_with(&staging) {
        return Err(RuntimeError::ImportedElsewhere {
            dir: staging.clone(),
            found: file,
        });
    }
    let new = dist_infos(&staging);
    let old = dir.is_dir().then(|| dist_infos(&dir));
    let kept = old.as_ref() == Some(&new) && import_check(&python, &dir).is_ok();
    let others: Vec<String> = new
        .iter()
        .filter(|(n, _)| n != PYTHON_CLIENT)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    let with = if others.is_empty() {
        String::new()
    } else {
        format!(" (with {})", others.join(", "))
    };
    let seconds = started.elapsed().as_secs_f64();
    if kept {
        println!(
            "awslambdaric {version}{with} was installed in {} already: kept it ({seconds:.1} s)",
            dir.display()
        );
    } else {
        // The previous install is moved aside, not deleted: a sandbox built ahead of time (or
        // an instance running) has it bound and goes on with it. The next add removes it.
        if dir.exists() || dir.is_symlink() {
            let previous = runtimes.join(format!(".{}.old", rt.name));
            if previous.exists() {
                std::fs::remove_dir_all(&previous).map_err(at(&previous))?;
            }
            std::fs::rename(&dir, &previous).map_err(at(&dir))?;
        }
        std::fs::rename(&staging, &dir).map_err(at(&staging))?;
        cleanup.0 = None;
        let replaced = old
            .as_deref()
            .and_then(|o| o.iter().find(|(n, _)| n == PYTHON_CLIENT))
            .map(|(_, v)| format!(", replacing {v}"))
            .unwrap_or_default();
        println!(
            "installed awslambdaric {version}{with} into {}{replaced} ({seconds:.1} s)",
            dir.display()
        );
    }
    drop(cleanup);
    println!(
        "{}",
        after_install_note(rt, &loc, configured.as_ref(), &dir, &python)
    );
    Ok(())
}

/// Only the folder itself: `runtimes/` must be searchable for `ls` and the operator's eyes.
fn make_readable_dir(dir: &Path) -> Result<(), RuntimeError> {
    let mode = std::fs::metadata(dir)
        .map_err(at(dir))?
        .permissions()
        .mode();
    if mode & 0o555 != 0o555 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o555))
            .map_err(at(dir))?;
    }
    Ok(())
}

/// What to do next: nothing, when the config runs this runtime from here with this python.
fn after_install_note(
    rt: &PythonRuntime,
    loc: &Located,
    configured: Option<&RuntimeConfig>,
    dir: &Path,
    python: &Path,
) -> String {
    let file = match &loc.config_file {
        Some(p) => p.display().to_string(),
        None => format!("the built-in defaults (no {DEFAULT_CONFIG_PATH})"),
    };
    match configured {
        None => format!(
            "note: the agent's config ({file}) maps no runtime {:?}; for functions to run on \
             this one, add to it and restart the agent:\n\n{}",
            rt.name,
            config_snippet(rt, python)
        ),
        Some(r) if !r.paths.iter().any(|p| p == dir) => format!(
            "note: [runtimes.\"{}\"] in {file} does not bind {}: its functions will not see \
             this install",
            rt.name,
            dir.display()
        ),
        Some(r) if r.command.first().map(Path::new) != Some(python) => format!(
            "note: [runtimes.\"{}\"] in {file} runs {}, not {}: the client was installed for \
             the latter",
            rt.name,
            r.command.first().map(String::as_str).unwrap_or(""),
            python.display()
        ),
        Some(_) => format!(
            "Functions with runtime = \"{}\" run on it from their next start; the agent needs \
             no restart.",
            rt.name
        ),
    }
}

/// One configured runtime as `ls` shows it.
#[derive(Debug, PartialEq)]
struct RuntimeRow {
    name: String,
    status: &'static str,
    client: Option<String>,
    command: Vec<String>,
    /// Resolved paths and whether each exists.
    paths: Vec<(PathBuf, bool)>,
    /// What to do about a runtime that is not ready.
    hint: Option<String>,
}

fn runtime_row(name: &str, r: &RuntimeConfig, state_dir: &Path) -> RuntimeRow {
    let r = r.resolved(state_dir);
    let paths: Vec<(PathBuf, bool)> = r.paths.iter().map(|p| (p.clone(), p.exists())).collect();
    let client = r.paths.iter().find_map(|p| client_version(p));
    let interpreter = r.command.first().map(PathBuf::from).unwrap_or_default();
    let installable = parse_runtime_name(name).is_ok();
    let (status, hint) = if let Some(p) = r.paths.iter().find(|p| !bindable(p)) {
        (
            "unusable",
            Some(format!(
                "{} is under /tmp, /dev, /proc or /var/task, which sandboxes build for \
                 themselves",
                p.display()
            )),
        )
    } else if !interpreter.exists() {
        (
            "no interpreter",
            Some(format!("{} does not exist", interpreter.display())),
        )
    } else if let Some((p, _)) = paths.iter().find(|(_, exists)| !exists) {
        let fix = if installable && *p == config::runtime_dir(state_dir, name) {
            format!(": fnlet runtime add {name}")
        } else {
            String::new()
        };
        (
            "not installed",
            Some(format!("{} is missing{fix}", p.display())),
        )
    } else {
        ("ready", None)
    };
    RuntimeRow {
        name: name.to_string(),
        status,
        client: client.map(|v| format!("{PYTHON_CLIENT} {v}")),
        command: r.command.clone(),
        paths,
        hint,
    }
}

fn ls(a: &LsArgs, env: Env) -> Result<(), RuntimeError> {
    let loc = locate(&a.location, env)?;
    let rows: Vec<RuntimeRow> = loc
        .config
        .runtimes
        .iter()
        .map(|(name, r)| runtime_row(name, r, &loc.state_dir))
        .collect();
    if a.json {
        let v = json!({
            "config": loc.config_file.as_ref().map(|p| p.display().to_string()),
            "state_dir": loc.state_dir.display().to_string(),
            "runtimes": rows.iter().map(|r| json!({
                "name": r.name,
                "status": r.status,
                "client": r.client,
                "command": r.command,
                "paths": r.paths.iter().map(|(p, e)| json!({
                    "path": p.display().to_string(),
                    "exists": e,
                })).collect::<Vec<_>>(),
                "hint": r.hint,
            })).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("a JSON value formats")
        );
    } else {
        print!("{}", ls_text(&loc, &rows));
    }
    Ok(())
}

fn ls_text(loc: &Located, rows: &[RuntimeRow]) -> String {
    let table = super::functions::table(
        &["NAME", "STATUS", "CLIENT", "COMMAND"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.status.to_string(),
                    r.client.clone().unwrap_or_else(|| "-".into()),
                    r.command.join(" "),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let mut out = match &loc.config_file {
        Some(p) => format!(
            "runtimes of {} (state dir {})\n",
            p.display(),
            loc.state_dir.display()
        ),
        None => format!(
            "runtimes of the built-in defaults (no {DEFAULT_CONFIG_PATH}; state dir {})\n",
            loc.state_dir.display()
        ),
    };
    if rows.is_empty() {
        out.push_str("none: add [runtimes.\"NAME\"] to the agent's config\n");
        return out;
    }
    out.push_str(&table);
    for r in rows {
        if let Some(h) = &r.hint {
            let _ = writeln!(out, "{}: {h}", r.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn rt(name: &str) -> PythonRuntime {
        parse_runtime_name(name).unwrap()
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn runtime_names_are_python_major_minor() {
        assert_eq!(
            rt("python3.11"),
            PythonRuntime {
                name: "python3.11".into(),
                major: 3,
                minor: 11
            }
        );
        assert_eq!(rt("python3.9").minor, 9);
        for bad in [
            "python3",
            "python3.11.2",
            "python3.x",
            "python3.011",
            "python+3.11",
            "Python3.11",
            "nodejs20.x",
            "provided.al2023",
            "",
        ] {
            let e = parse_runtime_name(bad).unwrap_err();
            assert!(e.contains("pythonX.Y"), "{bad}: {e}");
        }
    }

    #[test]
    fn requirements_are_single_and_never_options() {
        assert_eq!(
            parse_requirement("awslambdaric==4.2.2").unwrap(),
            "awslambdaric==4.2.2"
        );
        for bad in ["", "-e.", "--index-url=http://x", "a b"] {
            assert!(parse_requirement(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line() {
        let cli = Cli::try_parse_from([
            "fnlet",
            "runtime",
            "add",
            "python3.11",
            "--state-dir",
            "/srv/fnlet",
            "--python",
            "/opt/py/bin/python3",
            "--wheels",
            "/w",
            "--package",
            "awslambdaric==4.2.2",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        for s in [
            "python3.11",
            "/srv/fnlet",
            "/opt/py/bin/python3",
            "/w",
            "awslambdaric==4.2.2",
        ] {
            assert!(dbg.contains(s), "{s} in {dbg}");
        }
        assert!(Cli::try_parse_from(["fnlet", "runtime", "add", "node18"]).is_err());
        assert!(Cli::try_parse_from(["fnlet", "runtime", "add"]).is_err());
        assert!(
            Cli::try_parse_from(["fnlet", "runtime", "add", "python3.11", "--package", "-r x"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["fnlet", "runtime", "ls", "--json", "--config", "/c"]).is_ok()
        );
        assert!(Cli::try_parse_from(["fnlet", "runtime", "list"]).is_ok());
    }

    #[test]
    fn the_interpreter_must_be_the_runtimes_version() {
        assert_eq!(parse_interpreter_version("3.11.2\n"), Some((3, 11, 2)));
        assert_eq!(parse_interpreter_version("3.11"), None);
        assert_eq!(parse_interpreter_version("Python 3.11.2"), None);
        assert_eq!(parse_interpreter_version("3.11.2.1"), None);
        let py = Path::new("/usr/bin/python3");
        assert!(check_version(&rt("python3.11"), py, (3, 11, 2)).is_ok());
        assert!(check_version(&rt("python3.11"), py, (3, 11, 0)).is_ok());
        let e = check_version(&rt("python3.11"), py, (3, 12, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/usr/bin/python3 is Python 3.12.1")
                && e.contains("python3.11 needs Python 3.11.x")
                && e.contains("python3.12"),
            "{e}"
        );
        assert!(check_version(&rt("python3.1"), py, (3, 11, 2)).is_err());
    }

    #[test]
    fn the_interpreter_is_the_one_the_runtime_runs() {
        let r = rt("python3.12");
        let never = |_: &Path| false;
        let configured = RuntimeConfig {
            command: vec![
                "/opt/py/bin/python3".into(),
                "-m".into(),
                "awslambdaric".into(),
            ],
            paths: vec![],
            env: Default::default(),
        };
        assert_eq!(
            pick_python(Some(Path::new("/x/python")), Some(&configured), &r, &never),
            Path::new("/x/python")
        );
        assert_eq!(
            pick_python(None, Some(&configured), &r, &never),
            Path::new("/opt/py/bin/python3")
        );
        assert_eq!(
            pick_python(None, None, &r, &never),
            Path::new("/usr/bin/python3")
        );
        assert_eq!(
            pick_python(None, None, &r, &|p| p == Path::new("/usr/bin/python3.12")),
            Path::new("/usr/bin/python3.12")
        );
    }

    #[test]
    fn state_dir_from_the_flag_then_the_environment_then_the_config() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config.toml");
        std::fs::write(&cfg, "state_dir = \"/srv/from-config\"\n").unwrap();
        let loc = |state_dir: Option<&str>, env: Env| {
            locate(
                &Location {
                    config: Some(cfg.clone()),
                    state_dir: state_dir.map(PathBuf::from),
                },
                env,
            )
            .unwrap()
        };
        let env = |k: &str| (k == "FNLET_STATE_DIR").then(|| OsString::from("/srv/from-env"));
        assert_eq!(
            loc(Some("/srv/flag"), &env).state_dir,
            Path::new("/srv/flag")
        );
        assert_eq!(loc(None, &env).state_dir, Path::new("/srv/from-env"));
        let l = loc(None, &no_env);
        assert_eq!(l.state_dir, Path::new("/srv/from-config"));
        assert_eq!(l.config_file.as_deref(), Some(cfg.as_path()));
        // A relative flag is taken from the working directory, as `fnlet agent` takes it.
        assert!(loc(Some("rel"), &no_env).state_dir.is_absolute());
        // A named config file must exist; a bad one is refused by key.
        let missing = Location {
            config: Some(d.path().join("nope.toml")),
            state_dir: None,
        };
        assert!(locate(&missing, &no_env).is_err());
        std::fs::write(&cfg, "[runtimes.\"python3.11\"]\ncommand = [\"python3\"]\n").unwrap();
        let e = locate(
            &Location {
                config: Some(cfg.clone()),
                state_dir: None,
            },
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("runtimes.command"), "{e}");
    }

    #[test]
    fn pip_installs_wheels_only_and_offline_from_a_folder() {
        let args = |w: Option<&Path>| -> Vec<String> {
            pip_args(Path::new("/s/.python3.11.new-1"), "awslambdaric", w)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        let online = args(None);
        assert_eq!(&online[..3], ["-m", "pip", "install"]);
        assert!(online.contains(&"--only-binary=:all:".to_string()));
        let t = online.iter().position(|a| a == "--target").unwrap();
        assert_eq!(online[t + 1], "/s/.python3.11.new-1");
        assert_eq!(online.last().unwrap(), "awslambdaric");
        assert!(!online.contains(&"--no-index".to_string()));
        let offline = args(Some(Path::new("/w")));
        let f = offline.iter().position(|a| a == "--find-links").unwrap();
        assert_eq!(offline[f + 1], "/w");
        assert!(offline.contains(&"--no-index".to_string()));
        assert_eq!(offline.last().unwrap(), "awslambdaric");
    }

    #[test]
    fn pip_failures_are_told_apart() {
        // pip 23's words (Debian 12) for each case.
        let refused = "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, \
            status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.\
            connection.HTTPConnection object at 0x7f>: Failed to establish a new connection: \
            [Errno 111] Connection refused')': /simple/awslambdaric/\nERROR: Could not find a \
            version that satisfies the requirement awslambdaric (from versions: none)\nERROR: No \
            matching distribution found for awslambdaric\n";
        assert_eq!(classify_pip_failure(refused), PipFailure::Unreachable);
        let dns = "WARNING: Retrying (Retry(total=4...)) after connection broken by \
            'NewConnectionError(... [Errno -3] Temporary failure in name resolution')'";
        assert_eq!(classify_pip_failure(dns), PipFailure::Unreachable);
        let none = "ERROR: Could not find a version that satisfies the requirement awslambdaric \
            (from versions: none)\nERROR: No matching distribution found for awslambdaric\n";
        assert_eq!(classify_pip_failure(none), PipFailure::NoDistribution);
        assert_eq!(
            classify_pip_failure("/usr/bin/python3: No module named pip\n"),
            PipFailure::NoPip
        );
        assert_eq!(
            classify_pip_failure("ERROR: Could not install packages due to an OSError"),
            PipFailure::Other
        );
        let e = RuntimeError::IndexUnreachable {
            runtime: "python3.11".into(),
            tail: tail(refused, 2),
            download: download_command(&rt("python3.11"), "awslambdaric", Path::new("wheels")),
        }
        .to_string();
        assert!(e.contains("could not reach the package index"), "{e}");
        assert!(
            e.contains("pip download --only-binary=:all: --python-version 3.11 --platform"),
            "{e}"
        );
        assert!(
            e.contains("fnlet runtime add python3.11 --wheels wheels"),
            "{e}"
        );
        assert!(e.contains("  ERROR: No matching distribution found"), "{e}");
    }

    #[test]
    fn installed_files_become_readable_by_everyone() {
        let d = tempfile::tempdir().unwrap();
        let pkg = d.path().join("pkg");
        std::fs::create_dir(&pkg).unwrap();
        std::fs::write(pkg.join("mod.py"), "").unwrap();
        std::fs::write(pkg.join("ext.so"), "").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", pkg.join("link")).unwrap();
        let set = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        set(&pkg.join("mod.py"), 0o600).unwrap();
        set(&pkg.join("ext.so"), 0o700).unwrap();
        set(&pkg, 0o700).unwrap();
        make_readable(d.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&pkg), 0o755);
        assert_eq!(mode(&pkg.join("mod.py")), 0o644);
        assert_eq!(mode(&pkg.join("ext.so")), 0o755);
        // Not followed: /etc/shadow keeps its mode.
        assert_ne!(mode(Path::new("/etc/shadow")) & 0o004, 0o004);
    }

    #[test]
    fn distributions_come_from_dist_info_folders() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "awslambdaric-4.2.2.dist-info",
            "simplejson-4.3.0.dist-info",
            "snapshot_restore_py-1.0.0.dist-info",
            "awslambdaric",
            "__pycache__",
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        assert_eq!(
            dist_infos(d.path()),
            [
                ("awslambdaric".to_string(), "4.2.2".to_string()),
                ("simplejson".into(), "4.3.0".into()),
                ("snapshot_restore_py".into(), "1.0.0".into()),
            ]
        );
        assert_eq!(client_version(d.path()).as_deref(), Some("4.2.2"));
        assert_eq!(client_version(&d.path().join("missing")), None);
    }

    #[test]
    fn runtimes_under_paths_sandboxes_build_are_refused() {
        assert!(!bindable(Path::new("/tmp/fnlet/state/runtimes/python3.11")));
        assert!(!bindable(Path::new("/var/task/runtimes/python3.11")));
        assert!(bindable(Path::new("/var/lib/fnlet/runtimes/python3.11")));
        assert!(bindable(Path::new("/var/tmp/fnlet/runtimes/python3.11")));
        // Refused before any interpreter runs.
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config.toml");
        std::fs::write(&cfg, "").unwrap();
        let e = add(
            &AddArgs {
                runtime: rt("python3.11"),
                python: Some("/nonexistent/python3".into()),
                package: PYTHON_CLIENT.into(),
                wheels: None,
                location: Location {
                    config: Some(cfg),
                    state_dir: Some(d.path().join("state")),
                },
            },
            &no_env,
        )
        .unwrap_err();
        assert!(matches!(e, RuntimeError::NotBindable(_)), "{e}");
        assert!(!d.path().join("state").exists());
    }

    #[test]
    fn ls_rows_say_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        // Under /tmp nothing can be used (sandboxes have their own /tmp); /var/tmp can.
        let state_dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let state = state_dir.path().to_path_buf();
        let defaults = Config::default();
        let py = &defaults.runtimes["python3.11"];
        let row = runtime_row("python3.11", py, &state);
        if Path::new("/usr/bin/python3").exists() {
            assert_eq!(row.status, "not installed");
            let hint = row.hint.unwrap();
            assert!(hint.ends_with(": fnlet runtime add python3.11"), "{hint}");
            std::fs::create_dir_all(state.join("runtimes/python3.11/awslambdaric-4.2.2.dist-info"))
                .unwrap();
            let row = runtime_row("python3.11", py, &state);
            assert_eq!(row.status, "ready");
            assert_eq!(row.client.as_deref(), Some("awslambdaric 4.2.2"));
            assert_eq!(row.paths, [(state.join("runtimes/python3.11"), true)]);
        }
        assert_eq!(runtime_row("python3.11", py, d.path()).status, "unusable");
        let custom = RuntimeConfig {
            command: vec!["/nonexistent/python".into()],
            paths: vec![],
            env: Default::default(),
        };
        let row = runtime_row("custom", &custom, Path::new("/var/lib/fnlet"));
        assert_eq!(row.status, "no interpreter");
        let loc = Located {
            config: Config::default(),
            config_file: None,
            state_dir: "/var/lib/fnlet".into(),
        };
        let text = ls_text(&loc, &[row]);
        assert!(
            text.starts_with("runtimes of the built-in defaults"),
            "{text}"
        );
        assert!(
            text.contains("NAME    STATUS          CLIENT  COMMAND\ncustom  no interpreter  -")
        );
        assert!(
            text.contains("custom: /nonexistent/python does not exist"),
            "{text}"
        );
    }

    #[test]
    fn the_suggested_config_entry_is_valid_and_binds_the_install() {
        let snippet = config_snippet(&rt("python3.12"), Path::new("/usr/bin/python3.12"));
        let c = Config::parse(&snippet, Path::new("snippet.toml")).unwrap();
        let r = c.runtimes["python3.12"].resolved(Path::new("/var/lib/fnlet"));
        let dir = config::runtime_dir(Path::new("/var/lib/fnlet"), "python3.12");
        assert_eq!(r.command, ["/usr/bin/python3.12", "-m", "awslambdaric"]);
        assert_eq!(r.paths, [dir.as_path()]);
        assert_eq!(r.env["PYTHONPATH"], dir.display().to_string());
        // The default entry is what `add python3.11` installs for.
        let d = Config::default().runtimes["python3.11"].resolved(Path::new("/var/lib/fnlet"));
        assert_eq!(
            d.paths,
            [config::runtime_dir(
                Path::new("/var/lib/fnlet"),
                "python3.11"
            )]
        );
        assert_eq!(d.command[0], DEFAULT_PYTHON);
    }
}
