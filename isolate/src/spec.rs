//! What a sandbox looks like: the serde-friendly description the agent builds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{IsolateError, Result};

/// Where the function bundle appears inside the sandbox (the Lambda convention).
pub const TASK_ROOT: &str = "/var/task";

/// Everything needed to start one sandboxed process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Function name: the hostname inside and the prefix of the cgroup.
    pub name: String,
    /// Program to run: a path inside the sandbox, or a bare name looked up in `PATH` from `env`.
    pub program: String,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// The whole environment of the function: nothing is inherited from the host.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Host directory mounted read-only at `/var/task`.
    pub bundle: Option<PathBuf>,
    /// Host paths bound read-only into the sandbox (runtime directories).
    pub ro_binds: Vec<Bind>,
    /// Size of the writable tmpfs at /tmp.
    pub tmp_size_bytes: u64,
    pub limits: Limits,
    /// Unprivileged uid and gid the function runs as.
    pub uid: u32,
    pub gid: u32,
    pub stdio: StdioSpec,
    /// Kill the sandbox when the thread that spawned it exits (bubblewrap's --die-with-parent).
    /// Linux ties the parent-death signal to the spawning *thread*: leave this off when spawning
    /// from a thread pool.
    pub die_with_parent: bool,
    /// Also a new user namespace: the function's uid and gid map to the same ids on the host and
    /// nothing else is mapped, so even a kernel bug that hands the function "root" gives it root
    /// of an empty namespace only. Needs a host that allows user namespaces.
    pub user_namespace: bool,
    /// A variable whose value is only known when a prepared sandbox starts (a request id, say):
    /// [`crate::PreparedSandbox::start`] sets it. Ignored by a plain spawn (put it in `env`).
    pub late_env: Option<String>,
    /// Listen on 127.0.0.1:PORT inside the sandbox's own network namespace before the function
    /// starts, and hand the socket to the caller ([`crate::Sandbox::take_listener`]): a service
    /// the function reaches on its loopback while it has no other network.
    pub loopback_listener: Option<u16>,
    /// A function's `connect` to 127.0.0.1:PORT gets one end of a Unix socket pair instead of
    /// a TCP connection, and the caller the other ([`crate::Sandbox::take_connect_notifier`]):
    /// the same service as [`SandboxSpec::loopback_listener`] at a Unix socket's cost. Every
    /// `connect` of the function then waits for the caller's verdict (a seccomp user
    /// notification); others proceed unchanged. Needs a prepared sandbox (a spawn prepares).
    pub loopback_socketpair: Option<u16>,
    /// A sandbox that runs its function again and again ([`crate::ReusableSandbox`]): its
    /// init stays, and each run is a new process with its own stdin, stdout and stderr, after
    /// which everything the run started is killed. The namespaces, the cgroup and /tmp carry
    /// over from run to run, as a Lambda execution environment's do. Needs a prepared sandbox
    /// ([`crate::Isolator::prepare`]); `stdio` is not used (each run brings its pipes).
    pub reusable: bool,
    /// Run the function under `SCHED_BATCH`: the same share of the CPU as any process, but its
    /// wake-ups never preempt the task running (the agent that handed it an event, say): that
    /// task finishes its turn first. Not a boundary: the function may set its policy back.
    pub batch_scheduling: bool,
    /// The CPUs init, and so the function, may run on. `None`: those of the thread that
    /// clones the sandbox, which may have been pinned to one CPU for its own reasons.
    /// [`crate::SandboxWatch::set_cpus`] changes them while the sandbox runs.
    pub cpus: Option<Vec<usize>>,
}

/// A read-only bind mount of a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    pub source: PathBuf,
    pub dest: PathBuf,
    /// Skip the bind when the source does not exist on this host.
    #[serde(default)]
    pub optional: bool,
}

impl Bind {
    pub fn same(path: &str, optional: bool) -> Bind {
        Bind {
            source: path.into(),
            dest: path.into(),
            optional,
        }
    }
}

/// Resource limits, enforced by the cgroup (and rlimits for file descriptors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes, swap excluded (swap is off for the sandbox).
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores (0.5 = half a core).
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// RLIMIT_NOFILE, soft and hard.
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: Some(128 << 20),
            cpus: Some(1.0),
            pids: Some(64),
            nofile: 1024,
        }
    }
}

/// What each standard stream of the function is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stdio {
    /// The caller's own stream.
    Inherit,
    /// /dev/null.
    #[default]
    Null,
    /// A pipe the [`crate::Sandbox`] handle hands out.
    Piped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StdioSpec {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl StdioSpec {
    pub fn inherit() -> Self {
        StdioSpec {
            stdin: Stdio::Inherit,
            stdout: Stdio::Inherit,
            stderr: Stdio::Inherit,
        }
    }
    pub fn piped() -> Self {
        StdioSpec {
            stdin: Stdio::Piped,
            stdout: Stdio::Piped,
            stderr: Stdio::Piped,
        }
    }
}

/// The host directories a glibc program, the host's python3 and node need. Missing ones are skipped.
pub fn default_runtime_binds() -> Vec<Bind> {
    [
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/bin",
        "/sbin",
        "/etc/ld.so.cache",
        "/etc/alternatives",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/pki",
        "/etc/resolv.conf",
        "/etc/hosts",
        "/etc/nsswitch.conf",
        "/etc/localtime",
        "/etc/mime.types",
    ]
    .into_iter()
    .map(|p| Bind::same(p, true))
    .collect()
}

impl Default for SandboxSpec {
    fn default() -> Self {
        let mut env = BTreeMap::new();
        env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
        env.insert("HOME".into(), "/tmp".into());
        env.insert("LANG".into(), "C.UTF-8".into());
        SandboxSpec {
            name: "sandbox".into(),
            program: String::new(),
            args: Vec::new(),
            env,
            cwd: TASK_ROOT.into(),
            bundle: None,
            ro_binds: default_runtime_binds(),
            tmp_size_bytes: 64 << 20,
            limits: Limits::default(),
            uid: 65534,
            gid: 65534,
            stdio: StdioSpec::default(),
            die_with_parent: false,
            user_namespace: false,
            late_env: None,
            loopback_listener: None,
            loopback_socketpair: None,
            reusable: false,
            batch_scheduling: false,
            cpus: None,
        }
    }
}

/// Paths a bind may not target: they are built by the sandbox itself.
const RESERVED_DESTS: [&str; 4] = ["/proc", "/dev", "/tmp", TASK_ROOT];

/// Whether a bind may target `dest`: absolute, no `..`, not `/`, and not under what the sandbox
/// builds itself (/proc, /dev, its own /tmp, the bundle). Lets a caller check a host path it
/// means to bind at the same place (a runtime client under the state directory) ahead of time.
pub fn bind_dest_allowed(dest: &std::path::Path) -> bool {
    dest.is_absolute()
        && dest != std::path::Path::new("/")
        && !dest
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && !RESERVED_DESTS.iter().any(|r| dest.starts_with(r))
}

impl SandboxSpec {
    /// Checks what the child cannot check cheaply; every error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(IsolateError::InvalidSpec { field, reason });
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(
                "name",
                format!("{:?} must be 1-64 characters of [A-Za-z0-9_-]", self.name),
            );
        }
        if self.program.is_empty() {
            return bad("program", "must not be empty".into());
        }
        if self.uid == 0 || self.gid == 0 {
            return bad("uid", "the function must not run as uid or gid 0".into());
        }
        if !self.cwd.starts_with('/') {
            return bad("cwd", format!("{:?} must be absolute", self.cwd));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad("env", format!("{k:?} is not a valid variable"));
            }
        }
        if self.loopback_listener == Some(0) {
            return bad("loopback_listener", "the port must not be 0".into());
        }
        if self.loopback_socketpair == Some(0) {
            return bad("loopback_socketpair", "the port must not be 0".into());
        }
        if self.reusable && (self.loopback_listener.is_some() || self.loopback_socketpair.is_some())
        {
            return bad(
                "reusable",
                "a reusable sandbox has no loopback listener or socket pair".into(),
            );
        }
        if let Some(name) = &self.late_env
            && (name.is_empty()
                || name.len() > 48
                || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'))
        {
            return bad("late_env", format!("{name:?} is not a valid variable name"));
        }
        for s in self.args.iter().chain([&self.program, &self.cwd]) {
            if s.contains('\0') {
                return bad("args", format!("{s:?} contains a NUL byte"));
            }
        }
        if self.tmp_size_bytes < 4096 {
            return bad("tmp_size_bytes", "must be at least 4096".into());
        }
        if let Some(bundle) = self.bundle.as_ref().filter(|b| !b.is_absolute()) {
            return bad(
                "bundle",
                format!("{} must be an absolute path", bundle.display()),
            );
        }
        for b in &self.ro_binds {
            if !b.source.is_absolute() || !b.dest.is_absolute() {
                return bad(
                    "ro_binds",
                    format!(
                        "{} -> {} must be absolute",
                        b.source.display(),
                        b.dest.display()
                    ),
                );
            }
            if b.source.starts_with("/sys") || b.source.starts_with("/proc") {
                return bad(
                    "ro_binds",
                    format!("{} may not be bound into a sandbox", b.source.display()),
                );
            }
            if !bind_dest_allowed(&b.dest) {
                return bad(
                    "ro_binds",
                    format!("{} is not an allowed destination", b.dest.display()),
                );
            }
        }
        let l = &self.limits;
        if l.memory_bytes.is_some_and(|m| m < (4 << 20)) {
            return bad("limits.memory_bytes", "must be at least 4 MiB".into());
        }
        if l.cpus
            .is_some_and(|c| !(c.is_finite() && (0.01..=1024.0).contains(&c)))
        {
            return bad("limits.cpus", "must be between 0.01 and 1024".into());
        }
        if l.pids.is_some_and(|p| p < 2) {
            return bad(
                "limits.pids",
                "must be at least 2 (the init and the function)".into(),
            );
        }
        if l.nofile < 16 {
            return bad("limits.nofile", "must be at least 16".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            program: "/bin/true".into(),
            ..Default::default()
        }
    }

    #[test]
    fn default_spec_is_valid() {
        spec().validate().unwrap();
    }

    #[test]
    fn rejects_root_uid_and_names_the_field() {
        let err = SandboxSpec { uid: 0, ..spec() }.validate().unwrap_err();
        assert!(err.to_string().contains("uid"), "{err}");
    }

    #[test]
    fn rejects_binds_over_reserved_or_from_sys() {
        for (src, dst) in [
            ("/usr", "/proc/x"),
            ("/sys/kernel", "/k"),
            ("/usr", "/"),
            ("/usr", "/a/../b"),
        ] {
            let s = SandboxSpec {
                ro_binds: vec![Bind {
                    source: src.into(),
                    dest: dst.into(),
                    optional: false,
                }],
                ..spec()
            };
            assert!(s.validate().is_err(), "{src} -> {dst} accepted");
        }
    }

    #[test]
    fn rejects_bad_limits() {
        let mut s = spec();
        s.limits.cpus = Some(f64::NAN);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("limits.cpus")
        );
    }

    #[test]
    fn round_trips_through_serde_and_refuses_unknown_keys() {
        let json = serde_json_like(&spec());
        assert!(json.contains("program"));
        let bad: Result<SandboxSpec, _> = toml_like("{\"programme\": \"x\"}");
        assert!(bad.is_err());
    }

    // serde_json is only a dev-dependency; keep the helpers tiny.
    fn serde_json_like(s: &SandboxSpec) -> String {
        serde_json::to_string(s).unwrap()
    }
    fn toml_like(s: &str) -> Result<SandboxSpec, serde_json::Error> {
        serde_json::from_str(s)
    }
}
