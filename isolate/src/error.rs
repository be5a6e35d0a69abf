//! Typed errors: one variant per stage, each naming what failed.

use std::path::PathBuf;

use nix::errno::Errno;

/// A step the sandbox child performs between clone and exec. A failure in the child
/// comes back to the parent as one of these plus an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum Step {
    JoinCgroup = 1,
    UnshareCgroupNs,
    MakeMountsPrivate,
    MountStagingRoot,
    Mkdir,
    CreateMountPoint,
    BindMount,
    RemountReadOnly,
    MountProc,
    MaskProcPath,
    MountDev,
    Mknod,
    Symlink,
    MountTmp,
    PivotRoot,
    DetachOldRoot,
    SealRoot,
    SetHostname,
    LoopbackUp,
    SetRlimit,
    SetGroups,
    SetGid,
    SetUid,
    DropCapabilities,
    NoNewPrivs,
    SetDumpable,
    Seccomp,
    ForkWorker,
    BlockSignals,
    Stdio,
    Chdir,
    Exec,
    JoinNetns,
    SetScheduler,
    SetAffinity,
}

impl Step {
    pub(crate) fn from_u32(v: u32) -> Option<Step> {
        use Step::*;
        const ALL: [Step; 35] = [
            JoinCgroup,
            UnshareCgroupNs,
            MakeMountsPrivate,
            MountStagingRoot,
            Mkdir,
            CreateMountPoint,
            BindMount,
            RemountReadOnly,
            MountProc,
            MaskProcPath,
            MountDev,
            Mknod,
            Symlink,
            MountTmp,
            PivotRoot,
            DetachOldRoot,
            SealRoot,
            SetHostname,
            LoopbackUp,
            SetRlimit,
            SetGroups,
            SetGid,
            SetUid,
            DropCapabilities,
            NoNewPrivs,
            SetDumpable,
            Seccomp,
            ForkWorker,
            BlockSignals,
            Stdio,
            Chdir,
            Exec,
            JoinNetns,
            SetScheduler,
            SetAffinity,
        ];
        ALL.iter().copied().find(|s| *s as u32 == v)
    }

    /// The name used in messages, e.g. `pivot_root`.
    pub fn name(self) -> &'static str {
        use Step::*;
        match self {
            JoinCgroup => "join cgroup",
            UnshareCgroupNs => "unshare cgroup namespace",
            MakeMountsPrivate => "make mounts private",
            MountStagingRoot => "mount root tmpfs",
            Mkdir => "mkdir",
            CreateMountPoint => "create mount point",
            BindMount => "bind mount",
            RemountReadOnly => "remount read-only",
            MountProc => "mount /proc",
            MaskProcPath => "mask /proc path",
            MountDev => "mount /dev",
            Mknod => "mknod",
            Symlink => "symlink",
            MountTmp => "mount /tmp",
            PivotRoot => "pivot_root",
            DetachOldRoot => "detach old root",
            SealRoot => "make the new root and its binds read-only",
            SetHostname => "sethostname",
            LoopbackUp => "bring up lo",
            SetRlimit => "setrlimit",
            SetGroups => "setgroups",
            SetGid => "setresgid",
            SetUid => "setresuid",
            DropCapabilities => "drop capabilities",
            NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            SetDumpable => "PR_SET_DUMPABLE",
            Seccomp => "load seccomp filter",
            ForkWorker => "fork function process",
            BlockSignals => "block signals",
            Stdio => "set up stdio",
            Chdir => "chdir",
            Exec => "exec",
            JoinNetns => "join the network namespace made ahead",
            SetScheduler => "sched_setscheduler SCHED_BATCH",
            SetAffinity => "sched_setaffinity",
        }
    }
}

/// Errors of the isolate crate.
#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    #[error("invalid sandbox spec: {field}: {reason}")]
    InvalidSpec { field: &'static str, reason: String },

    #[error("{step}{}: {errno}", detail.as_deref().map(|d| format!(" {d}")).unwrap_or_default(), step = .step.name())]
    Child {
        step: Step,
        /// The path or value the step was working on, when there is one.
        detail: Option<String>,
        errno: Errno,
    },

    #[error("sandbox child died before reporting (status {0})")]
    ChildVanished(i32),

    #[error("sandbox setup did not finish within {0:?}; the child was killed")]
    SetupTimeout(std::time::Duration),

    #[error("spawn helper: {0}")]
    Spawner(String),

    #[error("sandbox setup protocol error: {0}")]
    Protocol(&'static str),

    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },

    #[error("no usable cgroup hierarchy: {0}")]
    CgroupDetect(String),

    #[error("cgroup controller {controller} is not available under {path}")]
    CgroupControllerMissing {
        controller: &'static str,
        path: PathBuf,
    },

    #[error("cgroup {op} {path}: {source}")]
    Cgroup {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cgroup {path} still has processes after kill")]
    CgroupBusy { path: PathBuf },

    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("listening on 127.0.0.1:{port} inside the sandbox: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },

    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = IsolateError> = std::result::Result<T, E>;

impl IsolateError {
    pub(crate) fn sys(op: &'static str, source: Errno) -> Self {
        IsolateError::Sys { op, source }
    }
}
