//! cgroup v1: one directory per controller (memory, cpu, cpuacct, pids, freezer), wherever each
//! is mounted (co-mounted `cpu,cpuacct` or apart, as on this project's hosts).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CgroupBackend, CgroupMount, CgroupUsage, CgroupVersion, SandboxCgroup};
use super::{child_dirs, keyed, mkdir, procs, read_file, read_u64, rmdir, write_file};
use crate::error::{IsolateError, Result};
use crate::spec::Limits;

/// Controllers a sandbox uses; freezer makes the kill of a whole group race-free.
pub(crate) const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct V1 {
    /// Mount point of each controller in CONTROLLERS order, plus our root below it.
    roots: Vec<(&'static str, PathBuf)>,
}

impl V1 {
    /// Finds every controller's mount; `root` is created below each one.
    pub fn from_mountinfo(mounts: &[CgroupMount], root: &str) -> Result<V1> {
        let mut roots = Vec::new();
        for c in CONTROLLERS {
            let m = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
                .ok_or_else(|| {
                    IsolateError::CgroupDetect(format!("no cgroup v1 mount has the {c} controller"))
                })?;
            roots.push((c, m.mount_point.join(root)));
        }
        Ok(V1 { roots })
    }

    /// For tests: controller mounts under one fake directory.
    pub fn at(base: &Path, root: &str) -> V1 {
        V1 {
            roots: CONTROLLERS
                .iter()
                .map(|c| (*c, base.join(c).join(root)))
                .collect(),
        }
    }

    /// Distinct directories (co-mounted controllers share one).
    fn distinct(dirs: &[(&'static str, PathBuf)]) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for (_, d) in dirs {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
        out
    }
}

impl CgroupBackend for V1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn create(&self, leaf: &str, limits: &Limits) -> Result<Box<dyn SandboxCgroup>> {
        let dirs: Vec<(&'static str, PathBuf)> =
            self.roots.iter().map(|(c, r)| (*c, r.join(leaf))).collect();
        let mut group = V1Group {
            distinct: V1::distinct(&dirs),
            dirs,
            removed: false,
        };
        for d in &group.distinct {
            if let Err(e) = mkdir_in_root(d) {
                let _ = group.remove();
                return Err(e);
            }
        }
        if let Err(e) = group.apply(limits) {
            let _ = group.remove();
            return Err(e);
        }
        Ok(Box::new(group))
    }

    fn reap_stale(&self) -> Result<usize> {
        let mut n = 0;
        for root in V1::distinct(&self.roots) {
            for leaf in child_dirs(&root) {
                let Some(name) = leaf.file_name() else {
                    continue;
                };
                let dirs: Vec<(&'static str, PathBuf)> =
                    self.roots.iter().map(|(c, r)| (*c, r.join(name))).collect();
                let mut g = V1Group {
                    distinct: V1::distinct(&dirs),
                    dirs,
                    removed: false,
                };
                g.kill_all()?;
                g.remove()?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn root_dir(&self) -> Result<PathBuf> {
        let first = V1::distinct(&self.roots)
            .into_iter()
            .next()
            .ok_or_else(|| {
                IsolateError::CgroupDetect("no cgroup v1 controller to put the root in".into())
            })?;
        mkdir(&first)?;
        Ok(first)
    }

    fn remove_root(&self) -> Result<()> {
        for root in V1::distinct(&self.roots) {
            if root.exists() {
                rmdir(&root)?;
            }
        }
        Ok(())
    }

    fn root_display(&self) -> String {
        self.roots
            .iter()
            .map(|(_, r)| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug)]
struct V1Group {
    dirs: Vec<(&'static str, PathBuf)>,
    distinct: Vec<PathBuf>,
    removed: bool,
}

impl V1Group {
    fn dir(&self, controller: &str) -> &Path {
        self.dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        let mem = self.dir("memory");
        if let Some(bytes) = limits.memory_bytes {
            write_file(mem, "memory.limit_in_bytes", &bytes.to_string())?;
            // memory+swap equal to memory: no swap. Without swap accounting, swappiness 0 is the
            // closest v1 gets.
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                write_file(mem, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
            } else {
                write_file(mem, "memory.swappiness", "0")?;
            }
        }
        if let Some(cpus) = limits.cpus {
            let cpu = self.dir("cpu");
            write_file(cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
            write_file(cpu, "cpu.cfs_quota_us", &cpu_quota_us(cpus).to_string())?;
        }
        if let Some(pids) = limits.pids {
            write_file(self.dir("pids"), "pids.max", &pids.to_string())?;
        }
        Ok(())
    }

    fn wait_frozen(&self, freezer: &Path) {
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match read_file(freezer, "freezer.state") {
                Some(s) if s.trim() == "FREEZING" => std::thread::sleep(Duration::from_micros(200)),
                _ => return,
            }
        }
    }
}

/// mkdir of a sandbox's group, and of its root first only when that is missing: the root
/// exists for every create but the first (or one racing a `remove_root` of an idle root), and
/// five mkdirs answered EEXIST were ~50 us of every spawn.
fn mkdir_in_root(dir: &Path) -> Result<()> {
    match mkdir(dir) {
        Err(IsolateError::Cgroup { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            if let Some(root) = dir.parent() {
                mkdir(root)?;
            }
            mkdir(dir)
        }
        other => other,
    }
}

pub(crate) fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CFS_PERIOD_US as f64).round() as u64).max(1000)
}

impl SandboxCgroup for V1Group {
    fn join_files(&self) -> Vec<PathBuf> {
        // `tasks`, not `cgroup.procs`: the child is single-threaded when it joins, so moving
        // its one thread moves the process, and a thread moving itself ("0" into `tasks`)
        // skips the kernel's global threadgroup rwsem (Linux 6.0+). Taking that rwsem for
        // writing waits out an RCU grace period unless another migration took it within
        // about the last one: measured here, a join after a quiet 50 ms took 14.6 ms through
        // cgroup.procs and 0.5 ms through tasks (the spawn bench's "join cgroup" rows).
        self.distinct.iter().map(|d| d.join("tasks")).collect()
    }

    fn clone_into_fd(&self) -> Option<RawFd> {
        None
    }

    fn usage(&self) -> CgroupUsage {
        let mem = self.dir("memory");
        CgroupUsage {
            peak_memory_bytes: read_u64(mem, "memory.max_usage_in_bytes"),
            cpu_time: read_u64(self.dir("cpuacct"), "cpuacct.usage").map(Duration::from_nanos),
            oom_kills: self.oom_kills(),
        }
    }

    fn oom_kills(&self) -> u64 {
        read_file(self.dir("memory"), "memory.oom_control")
            .and_then(|t| keyed(&t, "oom_kill"))
            .unwrap_or(0)
    }

    fn peak_memory_file(&self) -> PathBuf {
        self.dir("memory").join("memory.max_usage_in_bytes")
    }

    fn populated(&self) -> Result<bool> {
        Ok(self.distinct.iter().any(|d| !procs(d).is_empty()))
    }

    fn kill_all(&self) -> Result<()> {
        if !self.populated()? {
            return Ok(());
        }
        // Freeze first so nothing forks between reading the list and the kills.
        let freezer = self.dir("freezer");
        write_file(freezer, "freezer.state", "FROZEN")?;
        self.wait_frozen(freezer);
        for d in &self.distinct {
            for pid in procs(d) {
                // Ignore ESRCH: the process may already be gone.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        write_file(freezer, "freezer.state", "THAWED")?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.populated()? {
            if Instant::now() > deadline {
                return Err(IsolateError::CgroupBusy {
                    path: freezer.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        for d in &self.distinct {
            rmdir(d)?;
        }
        self.removed = true;
        Ok(())
    }

    fn remove_after_exit(&mut self) -> Result<()> {
        // rmdir is the emptiness check: reading cgroup.procs in each hierarchy first (what
        // kill_all does) cost more than the rmdirs themselves.
        for d in &self.distinct {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.kill_all()?;
                    return self.remove();
                }
                Err(source) => {
                    return Err(IsolateError::Cgroup {
                        op: "rmdir",
                        path: d.clone(),
                        source,
                    });
                }
            }
        }
        self.removed = true;
        Ok(())
    }

    fn threads_file(&self) -> PathBuf {
        // Every hierarchy the group is in lists the same threads.
        self.distinct
            .first()
            .map_or_else(|| PathBuf::from("/nonexistent"), |d| d.join("tasks"))
    }

    fn path_display(&self) -> String {
        self.dir("memory").display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, V1) {
        let tmp = tempfile::tempdir().unwrap();
        for c in CONTROLLERS {
            std::fs::create_dir(tmp.path().join(c)).unwrap();
        }
        let v1 = V1::at(tmp.path(), "fnlet-test");
        (tmp, v1)
    }

    #[test]
    fn the_root_dir_is_the_first_controllers_root() {
        let (tmp, v1) = fake();
        let dir = v1.root_dir().unwrap();
        assert_eq!(dir, tmp.path().join(CONTROLLERS[0]).join("fnlet-test"));
        assert!(dir.is_dir());
        // Already there: the same directory again.
        assert_eq!(v1.root_dir().unwrap(), dir);
    }

    #[test]
    fn writes_limits_with_swap_off() {
        let (tmp, v1) = fake();
        // Pretend the host has swap accounting.
        std::fs::create_dir_all(tmp.path().join("memory/fnlet-test/f1")).unwrap();
        std::fs::write(
            tmp.path()
                .join("memory/fnlet-test/f1/memory.memsw.limit_in_bytes"),
            "",
        )
        .unwrap();
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(32),
            nofile: 64,
        };
        let g = v1.create("f1", &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(
            read("memory/fnlet-test/f1/memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            read("memory/fnlet-test/f1/memory.memsw.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("cpu/fnlet-test/f1/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu/fnlet-test/f1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("pids/fnlet-test/f1/pids.max"), "32");
        assert_eq!(g.join_files().len(), 5);
    }

    #[test]
    fn without_memsw_sets_swappiness_zero() {
        let (tmp, v1) = fake();
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: None,
            pids: None,
            nofile: 64,
        };
        v1.create("f2", &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("memory/fnlet-test/f2/memory.swappiness"))
                .unwrap(),
            "0"
        );
        assert!(
            !tmp.path()
                .join("cpu/fnlet-test/f2/cpu.cfs_quota_us")
                .exists()
        );
    }

    #[test]
    fn comounted_controllers_share_a_directory() {
        let mounts = super::super::parse_mountinfo(
            "1 0 0:1 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             2 0 0:2 / /cg/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / /cg/pids rw - cgroup cgroup rw,pids\n\
             4 0 0:4 / /cg/freezer rw - cgroup cgroup rw,freezer\n",
        );
        let v1 = V1::from_mountinfo(&mounts, "fnlet").unwrap();
        assert_eq!(V1::distinct(&v1.roots).len(), 4);
    }

    #[test]
    fn missing_controller_is_named() {
        let mounts =
            super::super::parse_mountinfo("1 0 0:1 / /cg/memory rw - cgroup cgroup rw,memory\n");
        let err = V1::from_mountinfo(&mounts, "fnlet").unwrap_err();
        assert!(err.to_string().contains("cpu"), "{err}");
    }

    #[test]
    fn usage_reads_peak_cpu_and_oom() {
        let (tmp, v1) = fake();
        let g = v1
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
        std::fs::write(
            tmp.path()
                .join("memory/fnlet-test/f3/memory.max_usage_in_bytes"),
            "4096\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("memory/fnlet-test/f3/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(
            tmp.path().join("cpuacct/fnlet-test/f3/cpuacct.usage"),
            "1500000\n",
        )
        .unwrap();
        let u = g.usage();
        assert_eq!(u.peak_memory_bytes, Some(4096));
        assert_eq!(u.oom_kills, 2);
        assert_eq!(u.cpu_time, Some(Duration::from_micros(1500)));
        // The same figure through a descriptor kept open, read again after it changed.
        let peak = super::super::PeakMemory::open(&g.peak_memory_file()).unwrap();
        assert_eq!(peak.read(), Some(4096));
        std::fs::write(g.peak_memory_file(), "12288\n").unwrap();
        assert_eq!(peak.read(), Some(12288));
    }
}
