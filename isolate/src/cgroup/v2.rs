//! cgroup v2: one directory per sandbox in the unified tree; processes are born inside it
//! (clone3 CLONE_INTO_CGROUP) and the group dies with one write to cgroup.kill.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CgroupBackend, CgroupUsage, CgroupVersion, SandboxCgroup};
use super::{child_dirs, keyed, mkdir, read_file, rmdir, write_file};
use crate::error::{IsolateError, Result};
use crate::spec::Limits;

const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct V2 {
    mount: PathBuf,
    root: PathBuf,
    /// Skip limits whose controller is missing instead of failing the spawn.
    best_effort: bool,
}

/// The controller each limit needs.
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

impl V2 {
    /// `mount` is a cgroup2 mount (or a fake tree in tests); `root` is created below it.
    pub fn new(mount: PathBuf, root: &str) -> Result<V2> {
        if !mount.join("cgroup.controllers").exists() {
            return Err(IsolateError::CgroupDetect(format!(
                "{} is not a cgroup2 hierarchy",
                mount.display()
            )));
        }
        Ok(V2 {
            root: mount.join(root),
            mount,
            best_effort: false,
        })
    }

    /// Limits whose controller this hierarchy cannot give are left out (see
    /// [`CgroupBackend::missing_controllers`]) rather than failing every spawn: for a tree
    /// delegated without controllers, as a container on a hybrid host gets.
    pub fn best_effort(mut self) -> V2 {
        self.best_effort = true;
        self
    }

    /// What our root's parent can hand down: the `cgroup.controllers` of the nearest existing
    /// directory above the root (the mount, or the delegated unit's cgroup).
    fn offered(&self) -> Vec<String> {
        let mut dir = self.root.parent();
        while let Some(d) = dir {
            if d.join("cgroup.controllers").exists() || !d.starts_with(&self.mount) {
                return Self::available(d);
            }
            dir = d.parent();
        }
        Vec::new()
    }

    /// The limits left once the missing controllers' ones are dropped (best-effort only).
    fn enforceable(&self, limits: &Limits) -> Limits {
        let mut l = limits.clone();
        if self.best_effort {
            let missing = self.missing_controllers();
            let gone = |c| missing.contains(&c);
            if gone("memory") {
                l.memory_bytes = None;
            }
            if gone("cpu") {
                l.cpus = None;
            }
            if gone("pids") {
                l.pids = None;
            }
        }
        l
    }

    fn available(dir: &Path) -> Vec<String> {
        read_file(dir, "cgroup.controllers")
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Creates the root and turns on, along the path from the mount, the controllers the
    /// limits need (v2 only offers a child what its parent's subtree_control enables).
    fn ensure_root(&self, wanted: &[&'static str]) -> Result<()> {
        let rel = self.root.strip_prefix(&self.mount).unwrap_or(Path::new(""));
        let mut dir = self.mount.clone();
        for comp in rel.components() {
            self.enable(&dir, wanted)?;
            dir.push(comp);
            mkdir(&dir)?;
        }
        self.enable(&dir, wanted)
    }

    fn enable(&self, dir: &Path, wanted: &[&'static str]) -> Result<()> {
        let available = Self::available(dir);
        let enabled = read_file(dir, "cgroup.subtree_control").unwrap_or_default();
        for c in wanted {
            if !available.iter().any(|a| a == c) {
                return Err(IsolateError::CgroupControllerMissing {
                    controller: c,
                    path: dir.into(),
                });
            }
            if !enabled.split_whitespace().any(|e| e == *c) {
                write_file(dir, "cgroup.subtree_control", &format!("+{c}"))?;
            }
        }
        Ok(())
    }
}

fn wanted(limits: &Limits) -> Vec<&'static str> {
    let mut w = Vec::new();
    if limits.memory_bytes.is_some() {
        w.push("memory");
    }
    if limits.cpus.is_some() {
        w.push("cpu");
    }
    if limits.pids.is_some() {
        w.push("pids");
    }
    w
}

impl CgroupBackend for V2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn create(&self, leaf: &str, limits: &Limits) -> Result<Box<dyn SandboxCgroup>> {
        let limits = &self.enforceable(limits);
        self.ensure_root(&wanted(limits))?;
        let dir = self.root.join(leaf);
        mkdir(&dir)?;
        let mut group = V2Group { dir, fd: None };
        let res = group.apply(limits).and_then(|()| {
            let f = File::open(&group.dir).map_err(|source| IsolateError::Cgroup {
                op: "open",
                path: group.dir.clone(),
                source,
            })?;
            group.fd = Some(f);
            Ok(())
        });
        if let Err(e) = res {
            let _ = group.remove();
            return Err(e);
        }
        Ok(Box::new(group))
    }

    fn reap_stale(&self) -> Result<usize> {
        let mut n = 0;
        for dir in child_dirs(&self.root) {
            let mut g = V2Group { dir, fd: None };
            g.kill_all()?;
            g.remove()?;
            n += 1;
        }
        Ok(n)
    }

    fn root_dir(&self) -> Result<PathBuf> {
        let rel = self.root.strip_prefix(&self.mount).unwrap_or(Path::new(""));
        let mut dir = self.mount.clone();
        for comp in rel.components() {
            dir.push(comp);
            mkdir(&dir)?;
        }
        Ok(self.root.clone())
    }

    fn remove_root(&self) -> Result<()> {
        if self.root.exists() {
            rmdir(&self.root)
        } else {
            Ok(())
        }
    }

    fn root_display(&self) -> String {
        self.root.display().to_string()
    }

    fn missing_controllers(&self) -> Vec<&'static str> {
        let offered = self.offered();
        LIMIT_CONTROLLERS
            .into_iter()
            .filter(|c| !offered.iter().any(|o| o == c))
            .collect()
    }
}

#[derive(Debug)]
struct V2Group {
    dir: PathBuf,
    fd: Option<File>,
}

impl V2Group {
    fn apply(&self, limits: &Limits) -> Result<()> {
        if let Some(bytes) = limits.memory_bytes {
            write_file(&self.dir, "memory.max", &bytes.to_string())?;
            if self.dir.join("memory.swap.max").exists() {
                write_file(&self.dir, "memory.swap.max", "0")?;
            }
            // An OOM kills the whole sandbox, not one process of it: the instance is gone either way.
            if self.dir.join("memory.oom.group").exists() {
                write_file(&self.dir, "memory.oom.group", "1")?;
            }
        }
        if let Some(cpus) = limits.cpus {
            write_file(
                &self.dir,
                "cpu.max",
                &format!("{} {CPU_PERIOD_US}", super::v1::cpu_quota_us(cpus)),
            )?;
        }
        if let Some(pids) = limits.pids {
            write_file(&self.dir, "pids.max", &pids.to_string())?;
        }
        Ok(())
    }
}

impl SandboxCgroup for V2Group {
    fn join_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn clone_into_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    fn usage(&self) -> CgroupUsage {
        CgroupUsage {
            peak_memory_bytes: super::read_u64(&self.dir, "memory.peak"),
            cpu_time: read_file(&self.dir, "cpu.stat")
                .and_then(|t| keyed(&t, "usage_usec"))
                .map(Duration::from_micros),
            oom_kills: self.oom_kills(),
        }
    }

    fn oom_kills(&self) -> u64 {
        read_file(&self.dir, "memory.events")
            .and_then(|t| keyed(&t, "oom_kill"))
            .unwrap_or(0)
    }

    fn peak_memory_file(&self) -> PathBuf {
        self.dir.join("memory.peak")
    }

    fn populated(&self) -> Result<bool> {
        match read_file(&self.dir, "cgroup.events") {
            Some(t) => Ok(keyed(&t, "populated").unwrap_or(0) == 1),
            None => Ok(!super::procs(&self.dir).is_empty()),
        }
    }

    fn kill_all(&self) -> Result<()> {
        if !self.populated()? {
            return Ok(());
        }
        write_file(&self.dir, "cgroup.kill", "1")?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.populated()? {
            if Instant::now() > deadline {
                return Err(IsolateError::CgroupBusy {
                    path: self.dir.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn remove(&mut self) -> Result<()> {
        self.fd = None;
        rmdir(&self.dir)
    }

    fn threads_file(&self) -> PathBuf {
        self.dir.join("cgroup.threads")
    }

    fn path_display(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(controllers: &str) -> (tempfile::TempDir, V2) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), controllers).unwrap();
        // A fake tree has no kernel to propagate controllers; pre-create the root's files.
        std::fs::create_dir_all(tmp.path().join("fnlet")).unwrap();
        std::fs::write(tmp.path().join("fnlet/cgroup.controllers"), controllers).unwrap();
        let v2 = V2::new(tmp.path().into(), "fnlet").unwrap();
        (tmp, v2)
    }

    #[test]
    fn the_root_dir_is_made_along_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "").unwrap();
        let v2 = V2::new(tmp.path().into(), "unit.service/instances").unwrap();
        let dir = v2.root_dir().unwrap();
        assert_eq!(dir, tmp.path().join("unit.service/instances"));
        assert!(dir.is_dir());
        assert_eq!(v2.root_dir().unwrap(), dir);
    }

    #[test]
    fn writes_limits_and_enables_controllers() {
        let (tmp, v2) = fake("cpu memory pids");
        std::fs::create_dir_all(tmp.path().join("fnlet/f1")).unwrap();
        std::fs::write(tmp.path().join("fnlet/f1/memory.swap.max"), "max").unwrap();
        let limits = Limits {
            memory_bytes: Some(128 << 20),
            cpus: Some(1.5),
            pids: Some(10),
            nofile: 64,
        };
        let g = v2.create("f1", &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("fnlet/f1/memory.max"), (128u64 << 20).to_string());
        assert_eq!(read("fnlet/f1/memory.swap.max"), "0");
        assert_eq!(read("fnlet/f1/cpu.max"), "150000 100000");
        assert_eq!(read("fnlet/f1/pids.max"), "10");
        // Each write of subtree_control enables one controller; the last one written is pids.
        assert_eq!(read("fnlet/cgroup.subtree_control"), "+pids");
        assert!(g.clone_into_fd().is_some());
        assert!(g.join_files().is_empty());
    }

    #[test]
    fn missing_controller_is_an_error_naming_it() {
        let (_tmp, v2) = fake("pids");
        let limits = Limits {
            memory_bytes: Some(128 << 20),
            cpus: None,
            pids: None,
            nofile: 64,
        };
        let err = v2.create("f2", &limits).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn usage_reads_v2_files() {
        let (tmp, v2) = fake("");
        let g = v2
            .create(
                "f3",
                &Limits {
                    memory_bytes: None,
                    cpus: None,
                    pids: None,
                    nofile: 64,
                },
            )
            .unwrap();
        std::fs::write(tmp.path().join("fnlet/f3/memory.peak"), "8192\n").unwrap();
        std::fs::write(
            tmp.path().join("fnlet/f3/cpu.stat"),
            "usage_usec 250\nuser_usec 200\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("fnlet/f3/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let u = g.usage();
        assert_eq!(u.peak_memory_bytes, Some(8192));
        assert_eq!(u.cpu_time, Some(Duration::from_micros(250)));
        assert_eq!(u.oom_kills, 1);
        let peak = super::super::PeakMemory::open(&g.peak_memory_file()).unwrap();
        assert_eq!(peak.read(), Some(8192));
    }

    #[test]
    fn best_effort_leaves_out_the_limits_it_cannot_enforce() {
        // A delegated unit that got no controllers: the root's parent offers nothing.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cgroup.controllers"), "pids\n").unwrap();
        std::fs::create_dir_all(tmp.path().join("unit.service")).unwrap();
        std::fs::write(tmp.path().join("unit.service/cgroup.controllers"), "pids\n").unwrap();
        // No kernel propagates controllers in a fake tree: the root's file is written up front.
        std::fs::create_dir_all(tmp.path().join("unit.service/instances")).unwrap();
        std::fs::write(
            tmp.path().join("unit.service/instances/cgroup.controllers"),
            "pids\n",
        )
        .unwrap();
        let strict = V2::new(tmp.path().into(), "unit.service/instances").unwrap();
        assert_eq!(strict.missing_controllers(), vec!["memory", "cpu"]);
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(1.0),
            pids: Some(8),
            nofile: 64,
        };
        let err = strict.create("f1", &limits).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");

        let lenient = strict.clone().best_effort();
        lenient.create("f2", &limits).unwrap();
        let dir = tmp.path().join("unit.service/instances/f2");
        assert!(!dir.join("memory.max").exists());
        assert!(!dir.join("cpu.max").exists());
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "8");
    }

    #[test]
    fn rejects_a_directory_that_is_not_cgroup2() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(V2::new(tmp.path().into(), "fnlet").is_err());
    }
}
