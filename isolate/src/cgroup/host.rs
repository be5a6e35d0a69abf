//! Where fnlet's cgroups go on this host. The layout comes from the mounted filesystems (statfs of
//! /sys/fs/cgroup and /sys/fs/cgroup/unified), our own place from /proc/self/cgroup, and systemd's
//! delegation from the unit's cgroup; nothing is guessed from names alone.
//!
//! [`plan`] is pure: tests feed it fake /proc/self/cgroup contents and mount tables.
//! [`HostView::read`] gathers the real ones.
//!
//! The rules, for `cgroup_root = "auto"` (the agent's default):
//! - **cgroup v2 host** (/sys/fs/cgroup is cgroup2): under a systemd unit with `Delegate=yes`
//!   the agent moves itself into `<unit>/agent` (systemd 252 has no `DelegateSubgroup=`, and v2
//!   forbids processes in a cgroup that hands controllers to its children), and sandboxes go
//!   beside it under `<unit>/instances`. Outside systemd: `fnlet` below the mount.
//! - **hybrid host** (v1 controllers, cgroup2 at /sys/fs/cgroup/unified without controllers):
//!   systemd delegates only the cgroup2 tree, which cannot limit anything there, so sandboxes get
//!   fnlet's own root (`fnlet`) under each v1 controller, as outside systemd.
//! - **v1 controllers unusable** (read-only, as in a container, or missing) but a cgroup2 tree
//!   is there: sandboxes go to the cgroup2 tree (the delegated subtree under systemd), with
//!   whatever controllers it has; the caller learns which limits are not enforced.

use std::path::{Path, PathBuf};

use super::{CgroupMode, CgroupMount, CgroupVersion, v1::CONTROLLERS};
use crate::error::{IsolateError, Result};

/// Where the kernel's cgroup filesystems are mounted.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";
/// The `cgroup_root` that means: the delegated subtree under systemd, else [`DEFAULT_ROOT`].
pub const AUTO_ROOT: &str = "auto";
/// fnlet's own root below each hierarchy when nothing is delegated to it.
pub const DEFAULT_ROOT: &str = "fnlet";
/// Under a delegated unit: the agent's own leaf ...
pub const AGENT_LEAF: &str = "agent";
/// ... and the parent of the sandboxes' groups, beside it.
pub const INSTANCES_LEAF: &str = "instances";

/// How the host mounts its cgroup hierarchies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// /sys/fs/cgroup is cgroup2.
    Unified,
    /// /sys/fs/cgroup holds v1 hierarchies, and cgroup2 is at /sys/fs/cgroup/unified.
    Hybrid,
    /// v1 hierarchies only.
    Legacy,
}

impl Layout {
    /// statfs magic of `base` and `base/unified`.
    pub fn detect(base: &Path) -> Layout {
        if super::is_cgroup2_mount(base) {
            Layout::Unified
        } else if super::is_cgroup2_mount(&base.join("unified")) {
            Layout::Hybrid
        } else {
            Layout::Legacy
        }
    }

    /// The cgroup2 mount point of this layout.
    pub fn cgroup2_mount(self, base: &Path) -> Option<PathBuf> {
        match self {
            Layout::Unified => Some(base.into()),
            Layout::Hybrid => Some(base.join("unified")),
            Layout::Legacy => None,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Unified => "cgroup v2 (unified)",
            Layout::Hybrid => "cgroup v1 (hybrid, cgroup2 at unified/)",
            Layout::Legacy => "cgroup v1 (legacy)",
        })
    }
}

/// /proc/self/cgroup: our path in the cgroup2 hierarchy (`0::/...`) and in each v1 one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    pub unified: Option<String>,
    /// (controllers or `name=...`, path) of each v1 hierarchy.
    pub v1: Vec<(String, String)>,
}

/// Parses /proc/self/cgroup (`id:controllers:path` per line); malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> ProcCgroup {
    let mut out = ProcCgroup::default();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        if id == "0" && ctrl.is_empty() {
            out.unified = Some(path.to_string());
        } else {
            out.v1.push((ctrl.to_string(), path.to_string()));
        }
    }
    out
}

/// Why we believe systemd delegated the unit's cgroup to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// systemd >= 251 marks a delegated cgroup with the `trusted.delegate` xattr.
    Xattr,
    /// Older systemd marks nothing; a service's main process has `INVOCATION_ID` set.
    InvocationId,
}

/// A systemd unit's cgroup that is ours to manage (`Delegate=yes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The unit's path in the cgroup2 hierarchy, e.g. `/system.slice/fnlet.service`.
    pub unit: String,
    pub evidence: Evidence,
}

/// The systemd unit cgroup a cgroup2 path belongs to: the path itself when it ends in a
/// `.service` or `.scope`, or its parent when we are already in our `agent` leaf (a re-exec).
pub fn unit_of(path: &str) -> Option<&str> {
    let path = path.trim_end_matches('/');
    let unit = match path.rsplit_once('/') {
        Some((parent, AGENT_LEAF)) => parent,
        _ => path,
    };
    let last = unit.rsplit('/').next()?;
    (last.ends_with(".service") || last.ends_with(".scope")).then_some(unit)
}

/// Everything about the host that decides where cgroups go.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Where the hierarchies are mounted (/sys/fs/cgroup).
    pub base: PathBuf,
    pub layout: Layout,
    pub mounts: Vec<CgroupMount>,
    pub own: ProcCgroup,
    /// The unit cgroup we are in carries systemd's delegation mark (xattr).
    pub delegate_marked: bool,
    /// `INVOCATION_ID` is set: systemd started this process as (part of) a unit.
    pub invocation_id: bool,
}

impl HostView {
    /// Reads this host: statfs, /proc/self/mountinfo, /proc/self/cgroup, the unit's xattr.
    pub fn read() -> Result<HostView> {
        let base = PathBuf::from(CGROUP_FS);
        let layout = Layout::detect(&base);
        let mounts = super::read_mountinfo()?;
        let path = Path::new("/proc/self/cgroup");
        let own = parse_proc_cgroup(&std::fs::read_to_string(path).map_err(|source| {
            IsolateError::Read {
                path: path.into(),
                source,
            }
        })?);
        let delegate_marked = match (layout.cgroup2_mount(&base), own.unified.as_deref()) {
            (Some(m), Some(p)) => unit_of(p).is_some_and(|unit| {
                let dir = in_mount(&m, mount_root(&mounts, &m), unit);
                dir.is_some_and(|d| {
                    crate::sys::xattr_is(&d, c"trusted.delegate", b"1")
                        || crate::sys::xattr_is(&d, c"user.delegate", b"1")
                })
            }),
            _ => false,
        };
        Ok(HostView {
            base,
            layout,
            mounts,
            own,
            delegate_marked,
            invocation_id: std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty()),
        })
    }

    /// The unit cgroup delegated to us, if there is one.
    pub fn delegation(&self) -> Option<Delegation> {
        let unit = unit_of(self.own.unified.as_deref()?)?;
        let evidence = if self.delegate_marked {
            Evidence::Xattr
        } else if self.invocation_id && unit.ends_with(".service") {
            Evidence::InvocationId
        } else {
            return None;
        };
        Some(Delegation {
            unit: unit.to_string(),
            evidence,
        })
    }
}

/// The root (inside the hierarchy) of the cgroup2 mount at `mount`, from mountinfo: "/" unless
/// the mount shows a subtree (a bind mount, or a cgroup namespace other than ours).
fn mount_root<'a>(mounts: &'a [CgroupMount], mount: &Path) -> &'a str {
    mounts
        .iter()
        .find(|m| m.v2 && m.mount_point == mount)
        .map(|m| m.root.as_str())
        .unwrap_or("/")
}

/// The directory of hierarchy path `path` under a mount whose root is `root`; None when the
/// mount does not show that path.
fn in_mount(mount: &Path, root: &str, path: &str) -> Option<PathBuf> {
    let rel = relative_to(root, path)?;
    Some(if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    })
}

/// `path` relative to `root` (both hierarchy paths starting with '/'), or None if outside it.
fn relative_to<'a>(root: &str, path: &'a str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    Some(rest.trim_matches('/'))
}

/// Where sandboxes' cgroups go, and what the agent must do first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub version: CgroupVersion,
    /// The cgroup2 mount (v2 only).
    pub mount: Option<PathBuf>,
    /// The root below each v1 controller's mount, or below the cgroup2 mount.
    pub root: String,
    /// Under delegation: the leaf this process moves into before the root is created.
    pub move_self_to: Option<PathBuf>,
    /// The unit whose delegated subtree holds the root.
    pub delegation: Option<Delegation>,
    /// What the operator should know about the choice (log these).
    pub notes: Vec<String>,
}

/// Why the v1 controllers cannot be used, if they cannot.
fn v1_unusable(mounts: &[CgroupMount]) -> Option<String> {
    for c in CONTROLLERS {
        match mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
        {
            None => return Some(format!("no cgroup v1 mount has the {c} controller")),
            Some(m) if m.read_only => {
                return Some(format!(
                    "the cgroup v1 {c} hierarchy at {} is mounted read-only",
                    m.mount_point.display()
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// Decides the placement for `mode` and `root` (a relative path, or [`AUTO_ROOT`]).
pub fn plan(host: &HostView, mode: &CgroupMode, root: &str) -> Result<Placement> {
    let auto = root == AUTO_ROOT;
    let fixed_root = if auto { DEFAULT_ROOT } else { root };
    let delegation = if auto { host.delegation() } else { None };
    let mut notes = Vec::new();
    let v1 = |notes: Vec<String>| Placement {
        version: CgroupVersion::V1,
        mount: None,
        root: fixed_root.to_string(),
        move_self_to: None,
        delegation: None,
        notes,
    };
    match mode {
        CgroupMode::V1 => match v1_unusable(&host.mounts) {
            Some(why) => Err(IsolateError::CgroupDetect(why)),
            None => Ok(v1(notes)),
        },
        CgroupMode::V2At(mount) => v2(host, mount, fixed_root, delegation, notes),
        CgroupMode::Auto => {
            let cgroup2 = host.layout.cgroup2_mount(&host.base);
            match (host.layout, cgroup2) {
                (Layout::Unified, Some(m)) => v2(host, &m, fixed_root, delegation, notes),
                (_, cgroup2) => match (v1_unusable(&host.mounts), cgroup2) {
                    (None, _) => {
                        if let Some(d) = &delegation {
                            notes.push(format!(
                                "{}: systemd delegates {} only in the cgroup2 tree, which has no \
                                 controllers on this host; sandboxes use fnlet's own root \
                                 {fixed_root:?} under each cgroup v1 controller",
                                host.layout, d.unit
                            ));
                        }
                        Ok(v1(notes))
                    }
                    (Some(why), Some(m)) => {
                        notes.push(format!(
                            "cgroup v1 cannot be used here ({why}; a container?): sandboxes go \
                             to the cgroup2 tree at {}",
                            m.display()
                        ));
                        v2(host, &m, fixed_root, delegation, notes)
                    }
                    (Some(why), None) => Err(IsolateError::CgroupDetect(why)),
                },
            }
        }
    }
}

fn v2(
    host: &HostView,
    mount: &Path,
    fixed_root: &str,
    delegation: Option<Delegation>,
    mut notes: Vec<String>,
) -> Result<Placement> {
    let mut placement = Placement {
        version: CgroupVersion::V2,
        mount: Some(mount.to_path_buf()),
        root: fixed_root.to_string(),
        move_self_to: None,
        delegation: None,
        notes: Vec::new(),
    };
    if let Some(d) = delegation {
        match relative_to(mount_root(&host.mounts, mount), &d.unit) {
            Some(unit_rel) if !unit_rel.is_empty() => {
                placement.root = format!("{unit_rel}/{INSTANCES_LEAF}");
                placement.move_self_to = Some(mount.join(unit_rel).join(AGENT_LEAF));
                if d.evidence == Evidence::InvocationId {
                    notes.push(format!(
                        "{} has no trusted.delegate mark (systemd older than 251?): trusting \
                         INVOCATION_ID and the unit's Delegate=yes",
                        d.unit
                    ));
                }
                placement.delegation = Some(d);
            }
            _ => notes.push(format!(
                "the delegated cgroup {} is not visible under {}: using {fixed_root:?}",
                d.unit,
                mount.display()
            )),
        }
    }
    placement.notes = notes;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::parse_mountinfo;

    /// This project's hosts: v1 controllers, name=systemd, cgroup2 at unified/.
    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:7 - cgroup cgroup rw,cpu
33 25 0:29 / /sys/fs/cgroup/cpuacct rw,relatime shared:8 - cgroup cgroup rw,cpuacct
34 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
35 25 0:31 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
36 25 0:32 / /sys/fs/cgroup/freezer rw,relatime shared:11 - cgroup cgroup rw,freezer
";

    /// The same host seen from inside a systemd-nspawn container: v1 controllers read-only.
    const CONTAINER_MOUNTS: &str = "\
630 620 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
631 620 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,xattr,name=systemd
632 620 0:28 / /sys/fs/cgroup/cpu ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
633 620 0:29 / /sys/fs/cgroup/cpuacct ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpuacct
634 620 0:30 /process_api/1 /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
635 620 0:31 / /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,pids
636 620 0:32 / /sys/fs/cgroup/freezer ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,freezer
";

    const UNIFIED_MOUNTS: &str = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    /// /proc/self/cgroup of a service on a v2 host (v1 lines may still be listed: ignored).
    const SERVICE_V2: &str = "0::/system.slice/fnlet.service\n";
    const SERVICE_HYBRID: &str = "\
12:pids:/system.slice/fnlet.service
4:memory:/system.slice/fnlet.service
1:name=systemd:/system.slice/fnlet.service
0::/system.slice/fnlet.service
";
    const SSH_SESSION: &str = "0::/user.slice/user-0.slice/session-4.scope\n";
    const THIS_HOST: &str = "9:name=systemd:/\n4:memory:/process_api/338b\n0::/\n";

    fn host(layout: Layout, mounts: &str, own: &str, marked: bool, invocation: bool) -> HostView {
        HostView {
            base: CGROUP_FS.into(),
            layout,
            mounts: parse_mountinfo(mounts),
            own: parse_proc_cgroup(own),
            delegate_marked: marked,
            invocation_id: invocation,
        }
    }

    #[test]
    fn parses_proc_self_cgroup() {
        let p = parse_proc_cgroup(SERVICE_HYBRID);
        assert_eq!(p.unified.as_deref(), Some("/system.slice/fnlet.service"));
        assert_eq!(p.v1.len(), 3);
        assert_eq!(
            p.v1[2],
            ("name=systemd".into(), "/system.slice/fnlet.service".into())
        );
        let p = parse_proc_cgroup("garbage\n3:cpu:relative\n0::/a:b\n");
        assert_eq!(p.unified.as_deref(), Some("/a:b"));
        assert!(p.v1.is_empty());
    }

    #[test]
    fn finds_the_unit_of_a_path() {
        assert_eq!(
            unit_of("/system.slice/fnlet.service"),
            Some("/system.slice/fnlet.service")
        );
        assert_eq!(
            unit_of("/system.slice/fnlet.service/agent"),
            Some("/system.slice/fnlet.service")
        );
        assert_eq!(
            unit_of("/system.slice/run-u7.scope"),
            Some("/system.slice/run-u7.scope")
        );
        assert_eq!(unit_of("/"), None);
        assert_eq!(unit_of("/system.slice/fnlet.service/instances"), None);
        assert_eq!(unit_of("/user.slice"), None);
    }

    #[test]
    fn v2_service_with_delegation_uses_its_subtree() {
        let h = host(Layout::Unified, UNIFIED_MOUNTS, SERVICE_V2, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.version, CgroupVersion::V2);
        assert_eq!(p.mount.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(p.root, "system.slice/fnlet.service/instances");
        assert_eq!(
            p.move_self_to.as_deref(),
            Some(Path::new("/sys/fs/cgroup/system.slice/fnlet.service/agent"))
        );
        assert_eq!(p.delegation.unwrap().evidence, Evidence::Xattr);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn a_restarted_agent_already_in_its_leaf_finds_the_same_unit() {
        let own = "0::/system.slice/fnlet.service/agent\n";
        let h = host(Layout::Unified, UNIFIED_MOUNTS, own, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.root, "system.slice/fnlet.service/instances");
    }

    #[test]
    fn old_systemd_without_the_mark_is_trusted_for_services_with_a_note() {
        let h = host(Layout::Unified, UNIFIED_MOUNTS, SERVICE_V2, false, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.root, "system.slice/fnlet.service/instances");
        assert_eq!(p.delegation.unwrap().evidence, Evidence::InvocationId);
        assert!(p.notes[0].contains("trusted.delegate"), "{:?}", p.notes);
    }

    #[test]
    fn outside_systemd_the_root_is_fnlet() {
        for (own, invocation) in [(SSH_SESSION, false), ("0::/\n", false), (SSH_SESSION, true)] {
            let h = host(Layout::Unified, UNIFIED_MOUNTS, own, false, invocation);
            let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
            assert_eq!(p.root, DEFAULT_ROOT, "{own}");
            assert_eq!(p.move_self_to, None);
            assert_eq!(p.delegation, None);
        }
    }

    #[test]
    fn an_explicit_root_is_kept_even_under_systemd() {
        let h = host(Layout::Unified, UNIFIED_MOUNTS, SERVICE_V2, true, true);
        let p = plan(&h, &CgroupMode::Auto, "custom/root").unwrap();
        assert_eq!(p.root, "custom/root");
        assert_eq!(p.move_self_to, None);
    }

    #[test]
    fn hybrid_host_keeps_fnlets_own_v1_root_and_says_why() {
        let h = host(Layout::Hybrid, HYBRID_MOUNTS, SERVICE_HYBRID, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.version, CgroupVersion::V1);
        assert_eq!(p.root, DEFAULT_ROOT);
        assert_eq!(p.move_self_to, None);
        assert!(
            p.notes[0].contains("only in the cgroup2 tree"),
            "{:?}",
            p.notes
        );
        // This machine: not under systemd, nothing to say.
        let h = host(Layout::Hybrid, HYBRID_MOUNTS, THIS_HOST, false, false);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!((p.version, p.root.as_str()), (CgroupVersion::V1, "fnlet"));
        assert!(p.notes.is_empty());
    }

    #[test]
    fn read_only_v1_in_a_container_falls_back_to_the_delegated_cgroup2_tree() {
        let h = host(Layout::Hybrid, CONTAINER_MOUNTS, SERVICE_HYBRID, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.version, CgroupVersion::V2);
        assert_eq!(
            p.mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(p.root, "system.slice/fnlet.service/instances");
        assert_eq!(
            p.move_self_to.as_deref(),
            Some(Path::new(
                "/sys/fs/cgroup/unified/system.slice/fnlet.service/agent"
            ))
        );
        assert!(p.notes[0].contains("read-only"), "{:?}", p.notes);
        // Asked for v1 explicitly: an error naming the reason, no fallback.
        let err = plan(&h, &CgroupMode::V1, AUTO_ROOT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("read-only"), "{err}");
    }

    #[test]
    fn no_usable_hierarchy_is_an_error() {
        let h = host(Layout::Legacy, "", THIS_HOST, false, false);
        let err = plan(&h, &CgroupMode::Auto, AUTO_ROOT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn a_mount_showing_a_subtree_is_taken_into_account() {
        // cgroup2 mounted with its root at /system.slice (a cgroup namespace of a parent unit).
        let mounts = "30 25 0:26 /system.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = host(Layout::Unified, mounts, SERVICE_V2, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.root, "fnlet.service/instances");
        // A unit outside what the mount shows cannot be used.
        let mounts = "30 25 0:26 /other.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = host(Layout::Unified, mounts, SERVICE_V2, true, true);
        let p = plan(&h, &CgroupMode::Auto, AUTO_ROOT).unwrap();
        assert_eq!(p.root, DEFAULT_ROOT);
        assert!(p.notes[0].contains("not visible"), "{:?}", p.notes);
    }

    #[test]
    fn an_explicit_cgroup2_mount_uses_the_delegation_too() {
        let h = host(Layout::Hybrid, CONTAINER_MOUNTS, SERVICE_HYBRID, true, true);
        let p = plan(
            &h,
            &CgroupMode::V2At("/sys/fs/cgroup/unified".into()),
            AUTO_ROOT,
        )
        .unwrap();
        assert_eq!(p.root, "system.slice/fnlet.service/instances");
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative_to("/", "/a/b"), Some("a/b"));
        assert_eq!(relative_to("/a", "/a/b"), Some("b"));
        assert_eq!(relative_to("/a", "/a"), Some(""));
        assert_eq!(relative_to("/a", "/ab"), None);
        assert_eq!(relative_to("/x", "/a"), None);
    }
}
