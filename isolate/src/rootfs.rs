//! The sandbox's root file system: planned in the parent, carried out in the child.
//!
//! The plan is a list of [`Op`]s holding ready-made C strings, so the child only makes system
//! calls. The new root is a small tmpfs mounted over `/sys` inside the child's private mount
//! namespace (a path no bind source may come from, so every source stays reachable while the root
//! is built), then `pivot_root(".", ".")` swaps it in and the old root is detached.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{IsolateError, Result, Step};
use crate::spec::{SandboxSpec, TASK_ROOT};

/// Where the new root is assembled, inside the child's own mount namespace only.
pub const STAGING: &str = "/sys";

/// /proc files and directories hidden from the function, as runc hides them.
const MASKED_FILES: [&str; 6] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/sysrq-trigger",
];
const MASKED_DIRS: [&str; 4] = ["/proc/acpi", "/proc/asound", "/proc/scsi", "/proc/firmware"];
/// /proc paths left visible but read-only.
const READ_ONLY_PROC: [&str; 4] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"];

/// Device nodes in /dev: (name, major, minor).
const DEVICES: [(&str, u64, u64); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
];
const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Serializable: the spawn helper receives the plan the caller built.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// Stop every mount event from propagating back to the host.
    MakePrivate,
    StagingTmpfs {
        dst: CString,
        data: CString,
    },
    Mkdir(CString),
    Touch(CString),
    /// Bind, made read-only, nosuid and nodev right away (`seal_now`) or by the
    /// [`Op::SealTree`] that follows every bind.
    Bind {
        src: CString,
        dst: CString,
        seal_now: bool,
    },
    /// Read-only, nosuid and nodev on the new root and every mount below it, in one
    /// `mount_setattr(AT_RECURSIVE)`: one call for the staging tmpfs and each bind, where a
    /// remount per mount cost one call each (16 for the default binds and a bundle).
    SealTree(CString),
    Tmpfs {
        dst: CString,
        flags: libc::c_ulong,
        data: CString,
        step: Step,
    },
    Proc(CString),
    MaskFile(CString),
    MaskDir(CString),
    ReadOnlyBind(CString),
    /// Bind a host device node (user namespaces cannot mknod).
    BindDevice {
        src: CString,
        dst: CString,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    RemountReadOnly {
        path: CString,
        flags: libc::c_ulong,
    },
    PivotRoot {
        new_root: CString,
    },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub ops: Vec<Op>,
}

/// A bind that a later op creates or mounts something beneath (an extra bind nested in a
/// runtime directory, say) is sealed right away, as every bind used to be: the later mkdir or
/// touch then fails on a read-only mount, as before, instead of writing into the host's
/// directory through a bind not yet sealed.
fn seal_binds_with_paths_below(ops: &mut [Op]) {
    for i in 0..ops.len() {
        let (head, tail) = ops.split_at_mut(i + 1);
        let Some(Op::Bind { dst, seal_now, .. }) = head.last_mut() else {
            continue;
        };
        let dst = dst.as_bytes();
        let is_below = |p: &CString| {
            let p = p.as_bytes();
            p.starts_with(dst) && p.get(dst.len()) == Some(&b'/')
        };
        *seal_now = tail.iter().any(|op| match op {
            Op::Mkdir(p) | Op::Touch(p) | Op::Bind { dst: p, .. } => is_below(p),
            _ => false,
        });
    }
}

fn cstr(p: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(p.as_ref().to_vec()).map_err(|_| IsolateError::InvalidSpec {
        field: "ro_binds",
        reason: "path contains a NUL byte".into(),
    })
}

fn staged(p: &Path) -> Result<CString> {
    let mut s = STAGING.as_bytes().to_vec();
    s.extend_from_slice(p.as_os_str().as_encoded_bytes());
    cstr(s)
}

impl Plan {
    pub fn build(spec: &SandboxSpec) -> Result<Plan> {
        let mut ops = vec![
            Op::MakePrivate,
            Op::StagingTmpfs {
                dst: cstr(STAGING)?,
                data: cstr("mode=0755,size=1m,nr_inodes=4096")?,
            },
        ];
        let mut dirs = BTreeSet::new();
        let mut mkdir_p = |ops: &mut Vec<Op>, p: &Path| -> Result<()> {
            let mut acc = PathBuf::from("/");
            for c in p.components().skip(1) {
                acc.push(c);
                if dirs.insert(acc.clone()) {
                    ops.push(Op::Mkdir(staged(&acc)?));
                }
            }
            Ok(())
        };

        for b in &spec.ro_binds {
            let meta = match std::fs::metadata(&b.source) {
                Ok(m) => m,
                Err(_) if b.optional => continue,
                Err(e) => {
                    return Err(IsolateError::InvalidSpec {
                        field: "ro_binds",
                        reason: format!("{}: {e}", b.source.display()),
                    });
                }
            };
            if meta.is_dir() {
                mkdir_p(&mut ops, &b.dest)?;
            } else {
                if let Some(parent) = b.dest.parent() {
                    mkdir_p(&mut ops, parent)?;
                }
                ops.push(Op::Touch(staged(&b.dest)?));
            }
            ops.push(Op::Bind {
                src: cstr(b.source.as_os_str().as_encoded_bytes())?,
                dst: staged(&b.dest)?,
                seal_now: false,
            });
        }

        let task = Path::new(TASK_ROOT);
        mkdir_p(&mut ops, task)?;
        if let Some(bundle) = &spec.bundle {
            if !bundle.is_dir() {
                return Err(IsolateError::InvalidSpec {
                    field: "bundle",
                    reason: format!("{} is not a directory", bundle.display()),
                });
            }
            ops.push(Op::Bind {
                src: cstr(bundle.as_os_str().as_encoded_bytes())?,
                dst: staged(task)?,
                seal_now: false,
            });
        }

        // Every mount point still to come, then the whole tree read-only at once.
        for dir in ["/proc", "/dev", "/tmp"] {
            mkdir_p(&mut ops, Path::new(dir))?;
        }
        seal_binds_with_paths_below(&mut ops);
        ops.push(Op::SealTree(cstr(STAGING)?));

        // /proc of the new pid namespace, with the kernel's sensitive files hidden.
        ops.push(Op::Proc(staged(Path::new("/proc"))?));
        for f in MASKED_FILES {
            ops.push(Op::MaskFile(staged(Path::new(f))?));
        }
        for d in MASKED_DIRS {
            ops.push(Op::MaskDir(staged(Path::new(d))?));
        }
        for d in READ_ONLY_PROC {
            ops.push(Op::ReadOnlyBind(staged(Path::new(d))?));
        }

        // A minimal /dev: device nodes need a mount without nodev; it is read-only once built.
        mkdir_p(&mut ops, Path::new("/dev"))?;
        let dev = staged(Path::new("/dev"))?;
        ops.push(Op::Tmpfs {
            dst: dev.clone(),
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: cstr("mode=0755,size=64k,nr_inodes=64")?,
            step: Step::MountDev,
        });
        for (name, major, minor) in DEVICES {
            let path = staged(&Path::new("/dev").join(name))?;
            if spec.user_namespace {
                // mknod is refused inside a user namespace: bind the host's nodes instead.
                ops.push(Op::Touch(path.clone()));
                ops.push(Op::BindDevice {
                    src: cstr(format!("/dev/{name}"))?,
                    dst: path,
                });
            } else {
                ops.push(Op::Mknod {
                    path,
                    dev: libc::makedev(major as u32, minor as u32),
                });
            }
        }
        for (name, target) in DEV_LINKS {
            ops.push(Op::Symlink {
                target: cstr(target)?,
                path: staged(&Path::new("/dev").join(name))?,
            });
        }
        ops.push(Op::RemountReadOnly {
            path: dev,
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        });

        // The only writable place.
        mkdir_p(&mut ops, Path::new("/tmp"))?;
        ops.push(Op::Tmpfs {
            dst: staged(Path::new("/tmp"))?,
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: cstr(format!("mode=1777,size={}", spec.tmp_size_bytes))?,
            step: Step::MountTmp,
        });

        ops.push(Op::PivotRoot {
            new_root: cstr(STAGING)?,
        });
        Ok(Plan { ops })
    }

    /// The path an op works on, for error messages.
    pub fn describe(&self, index: usize) -> Option<String> {
        let s = |c: &CStr| {
            let p = c.to_string_lossy();
            Some(
                p.strip_prefix(STAGING)
                    .filter(|r| r.starts_with('/'))
                    .unwrap_or(&p)
                    .to_string(),
            )
        };
        match self.ops.get(index)? {
            Op::MakePrivate => None,
            Op::StagingTmpfs { .. } => Some(STAGING.into()),
            Op::Mkdir(p)
            | Op::Touch(p)
            | Op::Proc(p)
            | Op::MaskFile(p)
            | Op::MaskDir(p)
            | Op::ReadOnlyBind(p) => s(p),
            Op::Bind { src, dst, .. } => Some(format!("{} -> {}", src.to_string_lossy(), s(dst)?)),
            Op::SealTree(p) => s(p),
            Op::Tmpfs { dst, .. }
            | Op::RemountReadOnly { path: dst, .. }
            | Op::Mknod { path: dst, .. }
            | Op::BindDevice { dst, .. } => s(dst),
            Op::Symlink { path, .. } => s(path),
            Op::PivotRoot { new_root } => s(new_root),
        }
    }

    /// Child side: carries out every op. Only system calls; no allocation. `sources[i]`, when
    /// given and not -1, is an `O_PATH` descriptor of op `i`'s bind source
    /// ([`Plan::open_sources`]), bound through `/proc/self/fd` instead of its path.
    pub fn run(&self, sources: Option<&[RawFd]>) -> std::result::Result<(), (Step, u32, Errno)> {
        for (i, op) in self.ops.iter().enumerate() {
            let fd = sources
                .and_then(|s| s.get(i).copied())
                .filter(|&fd| fd >= 0);
            let r = match (op, fd) {
                (Op::Bind { dst, seal_now, .. }, Some(fd)) => {
                    let mut buf = [0u8; 32];
                    match fd_path(fd, &mut buf) {
                        Some(src) => bind(src, dst, *seal_now),
                        None => Err((Step::BindMount, Errno::EINVAL)),
                    }
                }
                _ => run_op(op),
            };
            r.map_err(|(step, e)| (step, i as u32, e))?;
        }
        Ok(())
    }

    /// Child side, with a user namespace, before it takes the function's ids: opens each bind
    /// source (`O_PATH`) while the host's root still owns this process's filesystem ids. Those
    /// ids then become the function's (the kernel makes files only for a mapped owner), and a
    /// path lookup as the function would stop at a host directory only root may traverse (the
    /// agent's 0750 state directory, which holds the bundles). Fills `fds[i]` for op `i`; on
    /// error, the bind's index.
    pub fn open_sources(&self, fds: &mut [RawFd]) -> std::result::Result<(), (Step, u32, Errno)> {
        for (i, op) in self.ops.iter().enumerate() {
            if let (Op::Bind { src, .. }, Some(slot)) = (op, fds.get_mut(i)) {
                // SAFETY: src is NUL-terminated; the descriptor is ours (closed by the caller).
                let fd = unsafe { libc::open(src.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err((Step::BindMount, i as u32, Errno::last()));
                }
                *slot = fd;
            }
        }
        Ok(())
    }
}

/// `/proc/self/fd/<fd>` in `buf`, NUL-terminated, without allocating.
fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> Option<&CStr> {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (k, d) in digits[..len].iter().rev().enumerate() {
        buf[PREFIX.len() + k] = *d;
    }
    let end = PREFIX.len() + len;
    buf[end] = 0;
    // The buffer holds exactly one NUL, at `end`.
    CStr::from_bytes_with_nul(&buf[..=end]).ok()
}

fn cvt(step: Step, ret: libc::c_int) -> std::result::Result<(), (Step, Errno)> {
    if ret < 0 {
        Err((step, Errno::last()))
    } else {
        Ok(())
    }
}

fn mount(
    step: Step,
    src: Option<&CStr>,
    dst: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::result::Result<(), (Step, Errno)> {
    let p = |c: Option<&CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    cvt(step, unsafe {
        libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast())
    })
}

/// Missing /proc entries (no ACPI, no SCSI on this kernel) are fine to skip.
fn skip_missing(
    r: std::result::Result<(), (Step, Errno)>,
) -> std::result::Result<(), (Step, Errno)> {
    match r {
        Err((_, Errno::ENOENT)) => Ok(()),
        r => r,
    }
}

const RO_BIND: libc::c_ulong = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;

fn bind(src: &CStr, dst: &CStr, seal_now: bool) -> std::result::Result<(), (Step, Errno)> {
    mount(Step::BindMount, Some(src), dst, None, libc::MS_BIND, None)?;
    if !seal_now {
        return Ok(());
    }
    mount(
        Step::RemountReadOnly,
        None,
        dst,
        None,
        RO_BIND | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

fn run_op(op: &Op) -> std::result::Result<(), (Step, Errno)> {
    match op {
        Op::MakePrivate => mount(
            Step::MakeMountsPrivate,
            None,
            c"/",
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        ),
        Op::StagingTmpfs { dst, data } => mount(
            Step::MountStagingRoot,
            Some(c"tmpfs"),
            dst,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(data),
        ),
        Op::Mkdir(p) => {
            // SAFETY: p is NUL-terminated.
            cvt(Step::Mkdir, unsafe { libc::mkdir(p.as_ptr(), 0o755) })
        }
        Op::Touch(p) => {
            // SAFETY: p is NUL-terminated; the fd is closed right away.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            cvt(Step::CreateMountPoint, fd)?;
            // SAFETY: fd was just opened by us.
            unsafe { libc::close(fd) };
            Ok(())
        }
        Op::Bind { src, dst, seal_now } => bind(src, dst, *seal_now),
        Op::SealTree(root) => seal_tree(root),
        Op::Tmpfs {
            dst,
            flags,
            data,
            step,
        } => mount(
            *step,
            Some(c"tmpfs"),
            dst,
            Some(c"tmpfs"),
            *flags,
            Some(data),
        ),
        Op::Proc(p) => mount(
            Step::MountProc,
            Some(c"proc"),
            p,
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        Op::MaskFile(p) => skip_missing(mount(
            Step::MaskProcPath,
            Some(c"/dev/null"),
            p,
            None,
            libc::MS_BIND,
            None,
        )),
        Op::MaskDir(p) => skip_missing(mount(
            Step::MaskProcPath,
            Some(c"tmpfs"),
            p,
            Some(c"tmpfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"size=0"),
        )),
        Op::ReadOnlyBind(p) => skip_missing(
            mount(
                Step::MaskProcPath,
                Some(p),
                p,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )
            .and_then(|()| {
                mount(
                    Step::MaskProcPath,
                    None,
                    p,
                    None,
                    RO_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    None,
                )
            }),
        ),
        Op::BindDevice { src, dst } => {
            mount(Step::Mknod, Some(src), dst, None, libc::MS_BIND, None)?;
            // Keep nosuid and noexec: inside a user namespace the host's flags are locked.
            mount(
                Step::RemountReadOnly,
                None,
                dst,
                None,
                RO_BIND | libc::MS_NOSUID | libc::MS_NOEXEC,
                None,
            )
        }
        Op::Mknod { path, dev } => {
            // SAFETY: path is NUL-terminated.
            cvt(Step::Mknod, unsafe {
                libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, *dev)
            })
        }
        Op::Symlink { target, path } => {
            // SAFETY: both are NUL-terminated.
            cvt(Step::Symlink, unsafe {
                libc::symlink(target.as_ptr(), path.as_ptr())
            })
        }
        Op::RemountReadOnly { path, flags } => mount(
            Step::RemountReadOnly,
            None,
            path,
            None,
            RO_BIND | flags,
            None,
        ),
        Op::PivotRoot { new_root } => pivot_root(new_root),
    }
}

fn seal_tree(root: &CStr) -> std::result::Result<(), (Step, Errno)> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: root is NUL-terminated and attr a live mount_attr whose size is passed; the
    // kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            root.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        Err((Step::SealRoot, Errno::last()))
    } else {
        Ok(())
    }
}

/// pivot_root(".", ".") as runc does it: no directory for the old root is needed, and the old
/// root (stacked on top of the new one) is detached right away.
fn pivot_root(new_root: &CStr) -> std::result::Result<(), (Step, Errno)> {
    // SAFETY: constant path; the fd is closed below.
    let old = unsafe {
        libc::open(
            c"/".as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    cvt(Step::PivotRoot, old)?;
    // SAFETY: new_root is NUL-terminated.
    let new = unsafe {
        libc::open(
            new_root.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    let res = (|| {
        cvt(Step::PivotRoot, new)?;
        // SAFETY: new is an open directory fd.
        cvt(Step::PivotRoot, unsafe { libc::fchdir(new) })?;
        // SAFETY: constant paths.
        cvt(Step::PivotRoot, unsafe {
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
        })?;
        // SAFETY: old is an open directory fd: the old root, now stacked above the new one.
        cvt(Step::DetachOldRoot, unsafe { libc::fchdir(old) })?;
        // SAFETY: constant path.
        cvt(Step::DetachOldRoot, unsafe {
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        })?;
        // SAFETY: constant path.
        cvt(Step::DetachOldRoot, unsafe { libc::chdir(c"/".as_ptr()) })
    })();
    // SAFETY: closing fds we opened (close of -1 is harmless).
    unsafe {
        libc::close(old);
        libc::close(new);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buf = [0u8; 32];
        assert_eq!(fd_path(0, &mut buf), Some(c"/proc/self/fd/0"));
        assert_eq!(fd_path(7, &mut buf), Some(c"/proc/self/fd/7"));
        assert_eq!(fd_path(1_048_575, &mut buf), Some(c"/proc/self/fd/1048575"));
    }

    #[test]
    fn binds_are_sealed_together_after_the_last_one_and_before_proc() {
        let plan = Plan::build(&SandboxSpec::default()).unwrap();
        let at = |want: fn(&Op) -> bool| plan.ops.iter().position(want);
        let seal = at(|op| matches!(op, Op::SealTree(_))).unwrap();
        let last_bind = plan
            .ops
            .iter()
            .rposition(|op| matches!(op, Op::Bind { .. }))
            .unwrap();
        let proc = at(|op| matches!(op, Op::Proc(_))).unwrap();
        assert!(last_bind < seal && seal < proc, "{:?}", plan.ops);
        assert!(
            !plan
                .ops
                .iter()
                .any(|op| matches!(op, Op::Bind { seal_now: true, .. })),
            "no default bind has anything below it: {:?}",
            plan.ops
        );
        // Nothing is created on the sealed root after the seal: every mount point came first
        // (what is made in /dev is made in its own tmpfs).
        let created_on_the_root = |op: &Op| match op {
            Op::Mkdir(p) | Op::Touch(p) => !p.as_bytes().starts_with(b"/sys/dev/"),
            _ => false,
        };
        assert!(
            !plan.ops[seal..].iter().any(created_on_the_root),
            "{:?}",
            plan.ops
        );
    }
}
