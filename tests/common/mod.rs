//! Shared helpers for the integration tests: find the built binaries, require root, make a
//! bundle holding the probe, and check that nothing is left behind. `agent` runs the real
//! `fnlet agent` for a test.

#![allow(dead_code)]

pub mod agent;
pub mod aws;
pub mod sink;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// target/<profile>/ next to the running test executable (target/<profile>/deps/<test>).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn built(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` before the tests (the README's test command does)",
        p.display()
    );
    p
}

pub fn fnlet() -> PathBuf {
    built("fnlet")
}

pub fn probe() -> PathBuf {
    built("fnlet-probe")
}

pub fn peer_client() -> PathBuf {
    built("fnlet-peer-client")
}

/// The Lambda API client made with AWS's Rust SDK (tests/fixtures/aws-sdk-lambda).
pub fn aws_sdk_lambda() -> PathBuf {
    built("fixture-aws-sdk-lambda")
}

/// `program` run in network namespace `ns` (a name under /run/netns), or here when None.
/// nsenter, not `ip netns exec`: that one also mounts a new /sys, hiding the cgroup
/// hierarchies an agent needs; nsenter changes only the network namespace, and execs the
/// program (its pid is the program's).
pub fn in_netns(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            cmd
        }
    }
}

/// Sandboxes need root: fail loudly rather than pass by skipping.
pub fn require_root() {
    // SAFETY-free: geteuid via /proc to keep tests free of unsafe.
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .expect("Uid line");
    assert_eq!(
        euid, "0",
        "these tests create namespaces and cgroups and must run as root (try: sudo cargo nextest run)"
    );
}

/// A bundle directory, readable by the sandbox's unprivileged uid, holding the probe.
pub struct Bundle {
    pub dir: tempfile::TempDir,
}

impl Bundle {
    pub fn with_probe() -> Bundle {
        let dir = tempfile::Builder::new()
            .prefix("fnlet-test-bundle")
            .tempdir()
            .expect("tempdir");
        set_mode(dir.path(), 0o755);
        std::fs::copy(probe(), dir.path().join("probe")).expect("copy probe");
        Bundle { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The built `bootstrap` of a Lambda fixture (tests/fixtures/NAME/bundle/bootstrap).
pub fn fixture_bootstrap(fixture: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(fixture)
        .join("bundle/bootstrap");
    assert!(
        p.exists(),
        "{} is not built: run scripts/build-fixtures.sh (the README's test command does)",
        p.display()
    );
    p
}

/// A cgroup root name unique to this test.
pub fn cgroup_root(test: &str) -> String {
    format!("fnlet-test-{}-{test}", std::process::id())
}

/// `fnlet sandbox run --cgroup-root ROOT [flags] -- program args`.
pub fn sandbox_run(root: &str, flags: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(fnlet());
    cmd.args(["sandbox", "run", "--cgroup-root", root])
        .args(flags)
        .arg("--")
        .args(command);
    cmd.stdin(Stdio::null());
    cmd
}

pub fn output(mut cmd: Command) -> Output {
    cmd.output().expect("run fnlet")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything a sandbox could leave behind on the host, for before/after comparison.
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    pub mounts: usize,
    pub netns: Vec<String>,
}

/// What sandboxes could leave on the host, less the network namespaces that the multi-host
/// tests make on purpose (`fnlet-test-*` under /run/netns, and their mounts there): those tests
/// run beside the others and check their own.
pub fn host_state() -> HostState {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| {
            // Field 5 is the mount point.
            l.split(' ')
                .nth(4)
                .is_none_or(|m| m != "/run/netns" && !m.starts_with("/run/netns/"))
        })
        .count();
    let netns = std::fs::read_dir("/run/netns")
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("fnlet-test-"))
                .collect()
        })
        .unwrap_or_default();
    HostState { mounts, netns }
}

/// Cgroup directories under `root` in every hierarchy: must be none once a sandbox is gone.
pub fn leftover_cgroups(root: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .expect("/sys/fs/cgroup")
        .filter_map(|e| e.ok())
    {
        let p = h.path().join(root);
        if p.exists() {
            out.push(p);
        }
    }
    out
}

/// Processes whose command line mentions `needle` (other than us).
pub fn processes_matching(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()) && n != me)
        })
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Asserts the sandbox left nothing: cgroups, mounts, netns, processes.
pub fn assert_clean(root: &str, before: &HostState, needle: &str) {
    assert_eq!(
        leftover_cgroups(root),
        Vec::<PathBuf>::new(),
        "cgroups left behind"
    );
    assert_eq!(
        &host_state(),
        before,
        "mounts or network namespaces left behind"
    );
    assert_eq!(
        processes_matching(needle),
        Vec::<String>::new(),
        "processes left behind"
    );
}
