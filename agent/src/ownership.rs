//! One agent per state dir and per cgroup root. The agent owns each through an exclusive flock
//! that it holds for its whole life and that the kernel drops when it exits, however it exits.
//! A second agent on either is refused, naming the owner, before it touches anything: at start
//! an agent kills every sandbox under its cgroup root as left by a crashed predecessor, which
//! under a root a live agent uses would be that agent's sandboxes.
//!
//! The state dir's lock is `<state dir>/agent.lock` (it says the owner's pid and state dir).
//! The cgroup root's lock is on the root's own directory in the cgroup tree, so it holds for
//! every agent on the host whatever their state dirs, and no file elsewhere (e.g. in /run,
//! which systemd empties when the unit stops) has to stay for it to hold. The owner of a lock
//! is found through the kernel: its pid in /proc/locks, its state dir from the `agent.lock`
//! among its open files.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The state dir's lock file.
pub const LOCK_FILE: &str = "agent.lock";

/// Ownership of a state dir or a cgroup root, until dropped (or the process ends).
#[derive(Debug)]
pub struct Claim {
    _locked: File,
}

/// Who holds a lock, as far as /proc tells.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: Option<u32>,
    pub state_dir: Option<PathBuf>,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.pid, &self.state_dir) {
            (Some(pid), Some(dir)) => write!(f, "pid {pid}, state dir {}", dir.display()),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => f.write_str("its pid not found in /proc/locks"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "state dir {} is in use by another fnlet agent ({owner}); give each agent its own \
         --state-dir",
        dir.display()
    )]
    StateDirInUse { dir: PathBuf, owner: Owner },
    #[error(
        "cgroup root {root} ({}) is in use by another fnlet agent ({owner}); its sandboxes are \
         left alone. Give each agent on a host its own sandbox.cgroup_root, state dir and \
         listen address",
        dir.display()
    )]
    CgroupRootInUse {
        root: String,
        dir: PathBuf,
        owner: Owner,
    },
    #[error("locking {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cgroup root's directory: {0}")]
    RootDir(#[from] isolate::IsolateError),
}

/// Takes `<state_dir>/agent.lock`, and writes this agent's pid and state dir into it.
pub fn claim_state_dir(state_dir: &Path) -> Result<Claim, ClaimError> {
    let path = state_dir.join(LOCK_FILE);
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .map(|f| (path.clone(), f))
            .map_err(|source| ClaimError::Lock {
                path: path.clone(),
                source,
            })
    };
    let (path, mut file) = match lock(open)? {
        Locked::Held(path, file) => (path, file),
        Locked::Busy(path) => {
            return Err(ClaimError::StateDirInUse {
                dir: state_dir.to_path_buf(),
                owner: owner(&path),
            });
        }
    };
    // Never removed: a newcomer could lock a fresh file while the old one is still held.
    let note = format!(
        "pid={}\nstate_dir={}\n",
        std::process::id(),
        state_dir.display()
    );
    file.set_len(0)
        .and_then(|()| file.write_all(note.as_bytes()))
        .map_err(|source| ClaimError::Lock { path, source })?;
    Ok(Claim { _locked: file })
}

/// Takes the cgroup root `root` (its relative name, for messages), whose directory
/// `root_dir` creates where missing and returns.
pub fn claim_cgroup_root(
    root: &str,
    root_dir: impl Fn() -> Result<PathBuf, isolate::IsolateError>,
) -> Result<Claim, ClaimError> {
    let open = || -> Result<(PathBuf, File), ClaimError> {
        let dir = root_dir()?;
        let f = File::open(&dir).map_err(|source| ClaimError::Lock {
            path: dir.clone(),
            source,
        })?;
        Ok((dir, f))
    };
    match lock(open)? {
        Locked::Held(_, file) => Ok(Claim { _locked: file }),
        Locked::Busy(dir) => Err(ClaimError::CgroupRootInUse {
            root: root.to_string(),
            owner: owner(&dir),
            dir,
        }),
    }
}

enum Locked {
    Held(PathBuf, File),
    Busy(PathBuf),
}

/// Opens and locks (without waiting) what `open` gives. The lock holds only if the path still
/// names the file locked: an owner that was exiting may have removed it (a cgroup root is
/// removed at shutdown) between our open and our lock; then the new one is locked instead.
fn lock(open: impl Fn() -> Result<(PathBuf, File), ClaimError>) -> Result<Locked, ClaimError> {
    let mut last = PathBuf::new();
    for _ in 0..3 {
        let (path, file) = open()?;
        let lock_err = |source| ClaimError::Lock {
            path: path.clone(),
            source,
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(Locked::Busy(path)),
            Err(TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let held = file.metadata().map_err(lock_err)?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                return Ok(Locked::Held(path, file));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(lock_err(e)),
        }
        last = path;
    }
    Err(ClaimError::Lock {
        path: last,
        source: std::io::Error::other("removed and made again while being locked, three times"),
    })
}

/// Who holds the flock on `path`: its pid from /proc/locks, its state dir from the
/// `agent.lock` it has open.
pub fn owner(path: &Path) -> Owner {
    let Ok(meta) = std::fs::metadata(path) else {
        return Owner::default();
    };
    let dev = meta.dev();
    // /proc/locks is a seq_file read in pages: a lock taken or released elsewhere between two
    // pages shifts the list, and one entry (ours among them) can be skipped. A few reads.
    let pid = (0..4).find_map(|_| {
        let text = std::fs::read_to_string("/proc/locks").ok()?;
        flock_holder(
            &text,
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev),
            meta.ino(),
        )
    });
    Owner {
        pid,
        state_dir: pid.and_then(state_dir_of),
    }
}

/// The pid holding a flock on the inode `ino` of device `major:minor`, from the text of
/// /proc/locks: `1: FLOCK  ADVISORY  WRITE 4242 00:24:8 0 EOF` (device numbers in hex);
/// `1: -> FLOCK ...` lines are waiters, not holders.
fn flock_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let mut t = line.split_whitespace().skip(1);
        if t.next()? != "FLOCK" {
            return None;
        }
        let pid: u32 = t.nth(2)?.parse().ok()?;
        let mut id = t.next()?.split(':');
        let maj = u64::from_str_radix(id.next()?, 16).ok()?;
        let min = u64::from_str_radix(id.next()?, 16).ok()?;
        let i: u64 = id.next()?.parse().ok()?;
        ((maj, min, i) == (major, minor, ino)).then_some(pid)
    })
}

/// The state dir of the agent `pid`: what its open `agent.lock` says, else that file's folder.
fn state_dir_of(pid: u32) -> Option<PathBuf> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let lock = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .find(|target| target.file_name().is_some_and(|n| n == LOCK_FILE))?;
    let said = std::fs::read_to_string(&lock).ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("state_dir="))
            .map(PathBuf::from)
    });
    said.or_else(|| lock.parent().map(Path::to_path_buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_holder_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 700 fe:00:8 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:24:8 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 00:24:8 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 5151 fe:01:1234567 0 EOF\n";
        assert_eq!(flock_holder(text, 0, 0x24, 8), Some(4242));
        assert_eq!(flock_holder(text, 0xfe, 1, 1234567), Some(5151));
        // Only flocks: the POSIX lock on fe:00:8 is not one.
        assert_eq!(flock_holder(text, 0xfe, 0, 8), None);
        assert_eq!(flock_holder(text, 0, 0x24, 9), None);
        assert_eq!(flock_holder("garbage\n\n1:\n", 0, 0, 0), None);
    }

    /// Two claims in one process conflict as two agents do (a flock belongs to the open file),
    /// and the refusal names this process and the state dir.
    #[test]
    fn a_held_state_dir_is_refused_naming_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let held = claim_state_dir(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(
            text,
            format!(
                "pid={}\nstate_dir={}\n",
                std::process::id(),
                dir.path().display()
            )
        );
        let err = claim_state_dir(dir.path()).unwrap_err();
        let ClaimError::StateDirInUse { owner, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(owner.pid, Some(std::process::id()));
        assert_eq!(owner.state_dir.as_deref(), Some(dir.path()));
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(held);
        // Released: the next claim gets it.
        claim_state_dir(dir.path()).unwrap();
    }

    /// A directory (what a cgroup root is) locks the same way; the owner is named with the
    /// state dir whose agent.lock it holds.
    #[test]
    fn a_held_root_is_refused_naming_its_owner() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let _state = claim_state_dir(state.path()).unwrap();
        let dir = || Ok(root.path().to_path_buf());
        let held = claim_cgroup_root("fnlet-x", dir).unwrap();
        let err = claim_cgroup_root("fnlet-x", dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cgroup root fnlet-x")
                && msg.contains(&format!(
                    "pid {}, state dir {}",
                    std::process::id(),
                    state.path().display()
                )),
            "{msg}"
        );
        drop(held);
        claim_cgroup_root("fnlet-x", dir).unwrap();
    }

    /// An owner that removed its root and went away between our open and our lock: the root
    /// made again is the one locked, not the removed one.
    #[test]
    fn a_root_made_again_while_locking_is_the_one_locked() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let opened = std::cell::Cell::new(0);
        let open = || {
            opened.set(opened.get() + 1);
            let f = File::open(&root).unwrap();
            if opened.get() == 1 {
                // Removed and made again after our open.
                std::fs::remove_dir(&root).unwrap();
                std::fs::create_dir(&root).unwrap();
            }
            Ok((root.clone(), f))
        };
        let Locked::Held(path, file) = lock(open).unwrap() else {
            panic!("not locked");
        };
        assert_eq!(opened.get(), 2);
        assert_eq!(path, root);
        let (now, held) = (std::fs::metadata(&root).unwrap(), file.metadata().unwrap());
        assert_eq!((now.dev(), now.ino()), (held.dev(), held.ino()));
    }
}
