//! cgroups: one [`CgroupBackend`] trait over v1 and v2, picked at run time.
//!
//! A small backend of our own rather than `cgroups-rs`: cgroups-rs hard-codes the v2 mount at
//! /sys/fs/cgroup (no hybrid `unified` tree, no fake tree for tests), cannot hand out the directory
//! fd that clone3's CLONE_INTO_CGROUP needs, cannot kill a v1 group, and re-reads mountinfo for
//! every group. What a sandbox needs is a dozen file writes, kept here.

pub mod host;
mod v1;
mod v2;

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use v1::V1;
pub use v2::V2;

use crate::error::{IsolateError, Result};
use crate::spec::Limits;

/// Which cgroup hierarchy the host gives us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// How to choose the hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// v2 if /sys/fs/cgroup is a cgroup2 mount, else the v1 controllers found in mountinfo.
    #[default]
    Auto,
    V1,
    /// A cgroup2 hierarchy mounted at this path (e.g. /sys/fs/cgroup/unified on a hybrid host).
    V2At(PathBuf),
}

/// Resource accounting of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupUsage {
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time: Option<Duration>,
    pub oom_kills: u64,
}

/// A hierarchy with our root in it; makes one group per sandbox.
pub trait CgroupBackend: Send + Sync + fmt::Debug {
    fn version(&self) -> CgroupVersion;
    /// Creates `<root>/<leaf>` with the limits applied.
    fn create(&self, leaf: &str, limits: &Limits) -> Result<Box<dyn SandboxCgroup>>;
    /// Kills and removes every group under the root (what a crashed predecessor left).
    fn reap_stale(&self) -> Result<usize>;
    /// Creates the root where missing and returns the directory that stands for it: the root
    /// in the first hierarchy (v1: of the first controller).
    fn root_dir(&self) -> Result<PathBuf>;
    /// Removes the root itself if it is empty.
    fn remove_root(&self) -> Result<()>;
    /// Where the root lives, for messages.
    fn root_display(&self) -> String;
    /// Controllers the limits need that this hierarchy cannot give (skipped in best-effort
    /// mode, an error at spawn otherwise).
    fn missing_controllers(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// One sandbox's group.
pub trait SandboxCgroup: Send + Sync + fmt::Debug {
    /// v1: the files the child writes "0" into to join (`tasks`, see the v1 backend).
    fn join_files(&self) -> Vec<PathBuf>;
    /// v2: a directory fd for clone3's CLONE_INTO_CGROUP.
    fn clone_into_fd(&self) -> Option<RawFd>;
    fn usage(&self) -> CgroupUsage;
    /// How many processes the memory limit killed (what [`CgroupUsage::oom_kills`] reads): one
    /// file, for a caller that needs only this.
    fn oom_kills(&self) -> u64;
    /// The file holding the group's peak memory (what [`CgroupUsage::peak_memory_bytes`]
    /// reads), for a caller that keeps it open and reads it often.
    fn peak_memory_file(&self) -> PathBuf;
    /// Whether any process is still in the group.
    fn populated(&self) -> Result<bool>;
    /// Kills every process in the group (cgroup.kill on v2; freeze, kill, thaw on v1).
    fn kill_all(&self) -> Result<()>;
    /// Removes the group; call after the processes are gone.
    fn remove(&mut self) -> Result<()>;
    /// Removes the group of a sandbox whose init has been reaped (its pid namespace, and so
    /// every process it held, is gone with it), killing what is left first only when the group
    /// turns out to be busy.
    fn remove_after_exit(&mut self) -> Result<()> {
        self.kill_all()?;
        self.remove()
    }
    fn path_display(&self) -> String;
    /// The file listing the group's thread ids.
    fn threads_file(&self) -> PathBuf;
}

/// Picks the backend for this host.
pub fn detect(mode: &CgroupMode, root: &str) -> Result<Box<dyn CgroupBackend>> {
    validate_root(root)?;
    match mode {
        CgroupMode::V2At(mount) => Ok(Box::new(V2::new(mount.clone(), root)?)),
        CgroupMode::V1 => Ok(Box::new(V1::from_mountinfo(&read_mountinfo()?, root)?)),
        CgroupMode::Auto => {
            if is_cgroup2_mount(Path::new("/sys/fs/cgroup")) {
                Ok(Box::new(V2::new("/sys/fs/cgroup".into(), root)?))
            } else {
                Ok(Box::new(V1::from_mountinfo(&read_mountinfo()?, root)?))
            }
        }
    }
}

/// The backend [`place`] chose, and why.
#[derive(Debug)]
pub struct Placed {
    pub backend: Box<dyn CgroupBackend>,
    pub placement: host::Placement,
}

/// Like [`detect`], for an agent: `root` may be [`host::AUTO_ROOT`] (the systemd unit's
/// delegated subtree, else `fnlet`), in which case this process moves itself into its leaf
/// first; with `best_effort`, limits whose controller the hierarchy lacks are skipped (the
/// caller reports [`CgroupBackend::missing_controllers`]) instead of failing every spawn.
pub fn place(mode: &CgroupMode, root: &str, best_effort: bool) -> Result<Placed> {
    if root != host::AUTO_ROOT {
        validate_root(root)?;
    }
    let view = host::HostView::read()?;
    let placement = host::plan(&view, mode, root)?;
    validate_root(&placement.root)?;
    if let Some(leaf) = &placement.move_self_to {
        move_self(leaf)?;
    }
    let backend: Box<dyn CgroupBackend> = match (&placement.version, &placement.mount) {
        (CgroupVersion::V2, Some(mount)) => {
            let v2 = V2::new(mount.clone(), &placement.root)?;
            Box::new(if best_effort { v2.best_effort() } else { v2 })
        }
        _ => Box::new(V1::from_mountinfo(&view.mounts, &placement.root)?),
    };
    Ok(Placed { backend, placement })
}

/// Moves this whole process (every thread) into the cgroup2 leaf `dir`, creating it: a v2
/// cgroup that enables controllers for its children may hold no process itself.
fn move_self(dir: &Path) -> Result<()> {
    mkdir(dir)?;
    move_pid(dir, std::process::id())
}

/// Moves process `pid` (every thread) into the existing cgroup2 leaf `dir`.
pub(crate) fn move_pid(dir: &Path, pid: u32) -> Result<()> {
    write_file(dir, "cgroup.procs", &pid.to_string())
}

fn validate_root(root: &str) -> Result<()> {
    let ok = !root.is_empty()
        && !root.starts_with('/')
        && root
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !root.contains("process_api");
    if ok {
        Ok(())
    } else {
        Err(IsolateError::CgroupDetect(format!(
            "cgroup root {root:?} must be a relative path like \"fnlet\""
        )))
    }
}

/// statfs magic check: is `path` a cgroup2 mount?
pub fn is_cgroup2_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// One cgroup mount from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// Path of the mount's root inside the hierarchy (non-"/" inside a cgroup namespace).
    pub root: String,
    pub v2: bool,
    /// v1 controllers bound to this mount.
    pub controllers: Vec<String>,
    /// Mounted read-only (as a container sees the host's v1 hierarchies).
    pub read_only: bool,
}

pub(crate) fn read_mountinfo() -> Result<Vec<CgroupMount>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| IsolateError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Parses the cgroup lines of a mountinfo file; other lines and malformed ones are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or("");
            let (root, mount_point) = (left.get(3)?, left.get(4)?);
            let read_only = left
                .get(5)
                .is_some_and(|opts| opts.split(',').any(|o| o == "ro"));
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape(mount_point)),
                root: unescape(root),
                v2,
                read_only,
                controllers: if v2 {
                    Vec::new()
                } else {
                    super_opts
                        .split(',')
                        .filter(|o| !o.contains('=') && *o != "rw" && *o != "ro")
                        .map(String::from)
                        .collect()
                },
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &s[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- helpers shared by v1 and v2 ----

pub(crate) fn write_file(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    // O_CREAT is harmless on cgroupfs (the file exists or the open fails) and lets fake trees work.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|source| IsolateError::Cgroup {
            op: "open",
            path: path.clone(),
            source,
        })?;
    f.write_all(value.as_bytes())
        .map_err(|source| IsolateError::Cgroup {
            op: "write",
            path,
            source,
        })
}

pub(crate) fn read_file(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

pub(crate) fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    parse_u64(&read_file(dir, file)?)
}

/// A single-value file's number ("4096\n").
pub(crate) fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// One group's peak memory, read through a descriptor kept open: a `pread` per read instead
/// of open, read and close (cgroup files are regenerated on every read from offset 0).
#[derive(Debug)]
pub struct PeakMemory {
    file: fs::File,
}

impl PeakMemory {
    pub(crate) fn open(path: &Path) -> Result<PeakMemory> {
        let file = fs::File::open(path).map_err(|source| IsolateError::Cgroup {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PeakMemory { file })
    }

    /// Bytes; `None` once the group is gone (or the file says something else).
    pub fn read(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        parse_u64(std::str::from_utf8(buf.get(..n)?).ok()?)
    }
}

/// The value of `key` in a flat-keyed file such as memory.events or cpu.stat.
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub(crate) fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(IsolateError::Cgroup {
            op: "mkdir",
            path: path.into(),
            source,
        }),
    }
}

/// rmdir, retried briefly: a group stays busy for a moment after its last process is reaped.
pub(crate) fn rmdir(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(source) => {
                return Err(IsolateError::Cgroup {
                    op: "rmdir",
                    path: path.into(),
                    source,
                });
            }
        }
    }
}

/// Sub-directories (child groups) of a cgroup directory.
pub(crate) fn child_dirs(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn procs(dir: &Path) -> Vec<i32> {
    read_file(dir, "cgroup.procs")
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
37 25 0:32 / /sys/fs/cgroup/cpuacct rw,relatime shared:12 - cgroup cgroup rw,cpuacct
38 25 0:33 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
39 25 0:34 / /sys/fs/cgroup/name\\040with\\040space rw - cgroup cgroup rw,pids,freezer
40 25 0:35 / /proc rw - proc proc rw
garbage line without separator";

    #[test]
    fn parses_hybrid_mountinfo() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5);
        assert!(m[0].v2 && m[0].mount_point == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].controllers, vec!["cpu"]);
        assert_eq!(
            m[4].mount_point,
            Path::new("/sys/fs/cgroup/name with space")
        );
        assert_eq!(m[4].controllers, vec!["pids", "freezer"]);
    }

    #[test]
    fn refuses_roots_that_escape() {
        for bad in ["", "/abs", "a/../b", "process_api/x", "a//b"] {
            assert!(validate_root(bad).is_err(), "{bad:?}");
        }
        validate_root("fnlet/test-1").unwrap();
    }

    #[test]
    fn keyed_files() {
        assert_eq!(keyed("low 0\noom 2\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(keyed("usage_usec 123\n", "missing"), None);
    }
}
