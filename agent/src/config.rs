//! The agent's configuration: TOML with an embedded default for every key.
//!
//! `fnlet agent` with no file runs on the defaults. Unknown keys and bad values are refused at
//! start, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/fnlet/config.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8740";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fnlet";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Where bundles, metadata, logs and the admin token live.
    pub state_dir: PathBuf,
    pub limits: LimitsConfig,
    pub sandbox: SandboxConfig,
    pub defaults: FunctionDefaults,
    /// Versions kept per function (the active one always is).
    pub retain_versions: u32,
    /// On SIGTERM, how long in-flight invocations may finish before they are killed.
    pub shutdown_grace_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest bundle archive accepted by a deploy.
    pub max_bundle_mb: u64,
    /// Largest total size of a bundle once unpacked.
    pub max_unpacked_mb: u64,
    /// Most files in one bundle.
    pub max_bundle_files: u64,
    /// Largest invocation request body.
    pub max_request_mb: u64,
    /// Largest invocation response body.
    pub max_response_mb: u64,
    /// How long an invocation may wait for a free slot before 429.
    pub queue_timeout_ms: u64,
    /// Bytes of log kept per function (two files of this size).
    pub log_max_kb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// cgroup root below each hierarchy: a relative path, or "auto": under systemd with
    /// Delegate=yes on a cgroup v2 host, the unit's delegated subtree
    /// (`<unit>/instances`, beside the agent's own `<unit>/agent`), else "fnlet".
    pub cgroup_root: String,
    /// "auto", "v1", or a path to a cgroup2 mount.
    pub cgroup: String,
    /// Functions run as uids from uid_base to uid_base + uid_count - 1, one per function.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Size of each instance's /tmp.
    pub tmp_mb: u64,
    /// Processes and threads per instance.
    pub pids: u64,
    /// Run every instance in a user namespace of its own too (its uid maps to itself only).
    pub user_namespace: bool,
    /// Refuse to start when the host cannot enforce the memory, cpu or pids limit (a container
    /// whose cgroup tree has no controllers). Off: the agent starts, runs functions without the
    /// limits it cannot enforce, and says so (log, `systemctl status`, `fnlet status`).
    pub require_limits: bool,
    /// Keep one sandbox per function built ahead of time, so an invocation only pays for the
    /// function's own exec.
    pub prepare_ahead: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionDefaults {
    pub memory_mb: u64,
    pub cpus: f64,
    pub timeout_s: f64,
    pub max_concurrency: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address"),
            state_dir: DEFAULT_STATE_DIR.into(),
            limits: LimitsConfig::default(),
            sandbox: SandboxConfig::default(),
            defaults: FunctionDefaults::default(),
            retain_versions: 5,
            shutdown_grace_s: 30.0,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bundle_mb: 250,
            max_unpacked_mb: 1024,
            max_bundle_files: 50_000,
            max_request_mb: 6,
            max_response_mb: 6,
            queue_timeout_ms: 1000,
            log_max_kb: 1024,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cgroup_root: "auto".into(),
            cgroup: "auto".into(),
            uid_base: 200_000,
            uid_count: 10_000,
            tmp_mb: 64,
            pids: 256,
            user_namespace: false,
            require_limits: false,
            prepare_ahead: true,
        }
    }
}

impl Default for FunctionDefaults {
    fn default() -> Self {
        FunctionDefaults {
            memory_mb: 128,
            cpus: 1.0,
            timeout_s: 10.0,
            max_concurrency: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl Config {
    /// Loads `path`; with `explicit` false a missing file means the embedded defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                path: path.into(),
                key,
                reason: reason.into(),
            })
        };
        if !self.state_dir.is_absolute() {
            return bad("state_dir", "must be an absolute path");
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_bundle_mb", l.max_bundle_mb),
            ("limits.max_unpacked_mb", l.max_unpacked_mb),
            ("limits.max_bundle_files", l.max_bundle_files),
            ("limits.max_request_mb", l.max_request_mb),
            ("limits.max_response_mb", l.max_response_mb),
            ("limits.log_max_kb", l.log_max_kb),
        ] {
            if v == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if l.max_request_mb > 1024 || l.max_response_mb > 1024 {
            return bad("limits.max_request_mb", "must be at most 1024");
        }
        let s = &self.sandbox;
        if s.uid_base < 1000 || s.uid_count == 0 || s.uid_base.checked_add(s.uid_count).is_none() {
            return bad(
                "sandbox.uid_base",
                "uids must be at least 1000 and the range must fit in 32 bits",
            );
        }
        if s.cgroup != "auto" && s.cgroup != "v1" && !s.cgroup.starts_with('/') {
            return bad(
                "sandbox.cgroup",
                "must be \"auto\", \"v1\", or the absolute path of a cgroup2 mount",
            );
        }
        if s.cgroup_root.is_empty()
            || s.cgroup_root.starts_with('/')
            || s.cgroup_root.contains("..")
        {
            return bad(
                "sandbox.cgroup_root",
                "must be \"auto\" or a relative path like \"fnlet\"",
            );
        }
        if s.tmp_mb == 0 || s.pids < 2 {
            return bad("sandbox.pids", "tmp_mb must be > 0 and pids at least 2");
        }
        let d = &self.defaults;
        if !(16..=65536).contains(&d.memory_mb) {
            return bad("defaults.memory_mb", "must be between 16 and 65536");
        }
        if !(d.cpus.is_finite() && (0.01..=1024.0).contains(&d.cpus)) {
            return bad("defaults.cpus", "must be between 0.01 and 1024");
        }
        if !(d.timeout_s.is_finite() && (0.001..=86400.0).contains(&d.timeout_s)) {
            return bad("defaults.timeout_s", "must be between 0.001 and 86400");
        }
        if d.max_concurrency == 0 {
            return bad("defaults.max_concurrency", "must be at least 1");
        }
        if self.retain_versions == 0 {
            return bad("retain_versions", "must be at least 1");
        }
        if !(self.shutdown_grace_s.is_finite() && self.shutdown_grace_s >= 0.0) {
            return bad("shutdown_grace_s", "must be a non-negative number");
        }
        Ok(())
    }

    pub fn cgroup_mode(&self) -> isolate::CgroupMode {
        match self.sandbox.cgroup.as_str() {
            "auto" => isolate::CgroupMode::Auto,
            "v1" => isolate::CgroupMode::V1,
            path => isolate::CgroupMode::V2At(path.into()),
        }
    }

    /// Every key with its default, as `--print-default-config` prints it. (The package installs
    /// packaging/config.toml: the same keys, commented; a test keeps the two in step.)
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_round_trip() {
        assert_eq!(parse(&Config::default_toml()).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = parse("listen = \"127.0.0.1:1\"\n[limits]\nmax_bundel_mb = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bundel_mb"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse("[defaults]\ncpus = -1\n").unwrap_err().to_string();
        assert!(err.contains("defaults.cpus"), "{err}");
        let err = parse("listen = \"nowhere\"").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let err = parse("state_dir = \"relative\"").unwrap_err().to_string();
        assert!(err.contains("state_dir"), "{err}");
    }

    /// The file the packages install as /etc/fnlet/config.toml.
    const PACKAGED: &str = include_str!("../../packaging/config.toml");

    /// Dotted names of every key in a TOML document.
    fn keys(text: &str) -> std::collections::BTreeSet<String> {
        fn walk(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeSet<String>) {
            for (k, v) in t {
                let name = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(t) => walk(&format!("{name}."), t, out),
                    _ => {
                        out.insert(name);
                    }
                }
            }
        }
        let mut out = Default::default();
        walk("", &text.parse::<toml::Table>().unwrap(), &mut out);
        out
    }

    #[test]
    fn the_packaged_config_parses_and_documents_every_default() {
        // As shipped, every setting commented out: the agent runs on its defaults.
        assert_eq!(parse(PACKAGED).unwrap(), Config::default());
        // Uncommenting every setting changes nothing: the file shows the real defaults ...
        let uncommented: Vec<&str> = PACKAGED
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with(|c: char| c.is_ascii_lowercase())
                        && rest.contains(" = ") =>
                {
                    rest
                }
                _ => l,
            })
            .collect();
        let uncommented = uncommented.join("\n");
        assert_eq!(parse(&uncommented).unwrap(), Config::default());
        // ... and every key: a new key needs its line in packaging/config.toml.
        assert_eq!(
            keys(&uncommented),
            keys(&Config::default_toml()),
            "packaging/config.toml must show every key of Config with its default"
        );
    }

    #[test]
    fn missing_default_file_is_fine_but_missing_explicit_file_is_not() {
        assert!(Config::load(Path::new("/nonexistent/fnlet.toml"), false).is_ok());
        assert!(Config::load(Path::new("/nonexistent/fnlet.toml"), true).is_err());
    }
}
