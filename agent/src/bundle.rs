//! Function bundles: a .tar.gz or .zip holding `fnlet.toml` and the code, unpacked safely.
//!
//! Archives are untrusted. Absolute paths, `..`, device files, fifos, hard links and symlinks
//! that lead outside the bundle are refused; total size and file count are bounded; nothing is
//! ever written through a symlink. Every file is owned by the agent, directories are 0755 and
//! files 0644 or 0755 (any execute bit in the archive makes it 0755).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::{MANIFEST_FILE, Manifest, ManifestError};

#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    pub max_unpacked_bytes: u64,
    pub max_files: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a .tar.gz or .zip archive")]
    UnknownFormat,
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    #[error("{path}: {reason}")]
    Unsafe { path: String, reason: &'static str },
    #[error("bundle unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("bundle has more than {limit} files")]
    TooManyFiles { limit: u64 },
    #[error("bundle has no fnlet.toml at its root")]
    NoManifest,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("entrypoint {0:?} is not an executable file in the bundle")]
    Entrypoint(String),
    #[error("writing bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// An unpacked bundle, ready to be moved into the store.
#[derive(Debug)]
pub struct Unpacked {
    /// The bundle root (the staging dir, or its single top-level folder).
    pub root: PathBuf,
    pub manifest: Manifest,
    /// Content address: sha256 over the sorted tree (paths, kinds, modes, contents).
    pub sha256: String,
    pub size_bytes: u64,
}

struct Writer<'a> {
    dest: &'a Path,
    limits: BundleLimits,
    bytes: u64,
    files: u64,
}

/// Only plain relative components; anything else is refused.
fn safe_relative(raw: &Path) -> Result<PathBuf, BundleError> {
    let shown = raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(BundleError::Unsafe {
                    path: shown,
                    reason: "path contains ..",
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(BundleError::Unsafe {
                    path: shown,
                    reason: "absolute path",
                });
            }
        }
    }
    Ok(out)
}

impl Writer<'_> {
    fn count(&mut self) -> Result<(), BundleError> {
        self.files += 1;
        if self.files > self.limits.max_files {
            return Err(BundleError::TooManyFiles {
                limit: self.limits.max_files,
            });
        }
        Ok(())
    }

    /// Creates the parents of `rel`, refusing to pass through anything that is not a real
    /// directory we made (a symlink planted by an earlier entry, say).
    fn parent_dirs(&mut self, rel: &Path) -> Result<PathBuf, BundleError> {
        let mut at = self.dest.to_path_buf();
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                at.push(c);
                match fs::symlink_metadata(&at) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(BundleError::Unsafe {
                            path: rel.display().to_string(),
                            reason: "a parent is not a directory (a symlink?)",
                        });
                    }
                    Err(_) => {
                        self.count()?;
                        fs::create_dir(&at)?;
                        fs::set_permissions(&at, fs::Permissions::from_mode(0o755))?;
                    }
                }
            }
        }
        Ok(self.dest.join(rel))
    }

    fn dir(&mut self, rel: &Path) -> Result<(), BundleError> {
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        let path = self.parent_dirs(rel)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(BundleError::Unsafe {
                path: rel.display().to_string(),
                reason: "duplicate entry",
            }),
            Err(_) => {
                self.count()?;
                fs::create_dir(&path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                Ok(())
            }
        }
    }

    fn file(&mut self, rel: &Path, mode: u32, data: &mut dyn Read) -> Result<(), BundleError> {
        if rel.as_os_str().is_empty() {
            return Err(BundleError::Unsafe {
                path: String::new(),
                reason: "empty file name",
            });
        }
        let path = self.parent_dirs(rel)?;
        self.count()?;
        // create_new: never follow or overwrite an existing entry (a planted symlink).
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    BundleError::Unsafe {
                        path: rel.display().to_string(),
                        reason: "duplicate entry",
                    }
                } else {
                    BundleError::Io(e)
                }
            })?;
        let room = self.limits.max_unpacked_bytes.saturating_sub(self.bytes);
        let n = std::io::copy(&mut data.take(room + 1), &mut f)?;
        self.bytes += n;
        if self.bytes > self.limits.max_unpacked_bytes {
            return Err(BundleError::TooLarge {
                limit: self.limits.max_unpacked_bytes,
            });
        }
        f.flush()?;
        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(perm))?;
        Ok(())
    }

    fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), BundleError> {
        let shown = rel.display().to_string();
        if target.is_absolute() {
            return Err(BundleError::Unsafe {
                path: shown,
                reason: "symlink to an absolute path",
            });
        }
        if target.as_os_str().is_empty() {
            return Err(BundleError::Unsafe {
                path: shown,
                reason: "empty symlink",
            });
        }
        let path = self.parent_dirs(rel)?;
        self.count()?;
        symlink(target, &path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                BundleError::Unsafe {
                    path: shown.clone(),
                    reason: "duplicate entry",
                }
            } else {
                BundleError::Io(e)
            }
        })
    }
}

/// Resolves `rel` inside `root` the way the kernel would with `root` as `/`, following symlinks
/// inside the tree; returns false when it climbs above the root.
fn stays_inside(root: &Path, rel: &Path) -> bool {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| {
            if let Component::Normal(p) = c {
                Some(p.to_owned())
            } else {
                None
            }
        })
        .collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if stack.pop().is_none() {
                return false;
            }
            continue;
        }
        if c == "." {
            continue;
        }
        let mut here: PathBuf = root.to_path_buf();
        here.extend(&stack);
        here.push(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                let Ok(target) = fs::read_link(&here) else {
                    return false;
                };
                if hops > 40 || target.is_absolute() {
                    return false;
                }
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(p) => pending.push(p.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        Component::CurDir => {}
                        _ => return false,
                    }
                }
            }
            // A dangling or plain entry: lexical from here on.
            _ => stack.push(c),
        }
    }
    true
}

fn unpack_tar_gz(bytes: &[u8], w: &mut Writer) -> Result<(), BundleError> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut ar = tar::Archive::new(gz);
    let entries = ar
        .entries()
        .map_err(|e| BundleError::Corrupt(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::Corrupt(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| BundleError::Corrupt(e.to_string()))?
            .into_owned();
        let rel = safe_relative(&raw)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => w.dir(&rel)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = entry.header().mode().unwrap_or(0o644);
                w.file(&rel, mode, &mut entry)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| BundleError::Corrupt(e.to_string()))?
                    .ok_or_else(|| BundleError::Corrupt("symlink without target".into()))?
                    .into_owned();
                w.symlink(&rel, &target)?;
            }
            tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            tar::EntryType::Link => {
                return Err(BundleError::Unsafe {
                    path: raw.display().to_string(),
                    reason: "hard links are not supported",
                });
            }
            _ => {
                return Err(BundleError::Unsafe {
                    path: raw.display().to_string(),
                    reason: "only files, directories and symlinks are allowed (no devices or fifos)",
                });
            }
        }
    }
    Ok(())
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

fn unpack_zip(bytes: &[u8], w: &mut Writer) -> Result<(), BundleError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| BundleError::Corrupt(e.to_string()))?;
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| BundleError::Corrupt(e.to_string()))?;
        let name = f
            .name()
            .map_err(|e| BundleError::Corrupt(e.to_string()))?
            .to_string();
        // enclosed_name refuses absolute paths and "..", but check ourselves for the message.
        let rel = safe_relative(Path::new(&name))?;
        if f.enclosed_name().is_none() {
            return Err(BundleError::Unsafe {
                path: name,
                reason: "path leaves the bundle",
            });
        }
        let mode = f.unix_mode().unwrap_or(0);
        let fmt = mode & S_IFMT;
        if f.is_dir() || fmt == S_IFDIR {
            w.dir(&rel)?;
        } else if fmt == S_IFLNK {
            let mut target = String::new();
            f.by_ref()
                .take(4096)
                .read_to_string(&mut target)
                .map_err(|e| BundleError::Corrupt(e.to_string()))?;
            w.symlink(&rel, Path::new(&target))?;
        } else if fmt == 0 || fmt == S_IFREG {
            w.file(&rel, mode, &mut f)?;
        } else {
            return Err(BundleError::Unsafe {
                path: name,
                reason: "only files, directories and symlinks are allowed (no devices or fifos)",
            });
        }
    }
    Ok(())
}

/// Unpacks `bytes` into the empty directory `dest` and checks the result.
pub fn unpack(bytes: &[u8], dest: &Path, limits: BundleLimits) -> Result<Unpacked, BundleError> {
    let size_bytes = extract(bytes, dest, limits)?;
    let root = bundle_root(dest)?;
    finish(root, size_bytes)
}

/// Unpacks a Lambda deployment package: a bundle with its own `fnlet.toml` as [`unpack`] does
/// (the bool is true); one without gets `generated` written as its `fnlet.toml` at the
/// archive's root, so that the stored bundle is whole (a cluster peer unpacks it too).
pub fn unpack_or_generate(
    bytes: &[u8],
    dest: &Path,
    limits: BundleLimits,
    generated: &Manifest,
) -> Result<(Unpacked, bool), BundleError> {
    let size_bytes = extract(bytes, dest, limits)?;
    match bundle_root(dest) {
        Ok(root) => Ok((finish(root, size_bytes)?, true)),
        Err(BundleError::NoManifest) => {
            let text = crate::manifest::to_toml(generated)
                .map_err(|e| ManifestError::Syntax(format!("writing the manifest: {e}")))?;
            let path = dest.join(MANIFEST_FILE);
            // A dangling symlink of that name would not count as a manifest above: never
            // write through it.
            if fs::symlink_metadata(&path).is_ok() {
                return Err(BundleError::Unsafe {
                    path: MANIFEST_FILE.into(),
                    reason: "must be a regular file",
                });
            }
            fs::write(&path, text)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
            Ok((finish(dest.to_path_buf(), size_bytes)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Writes the archive's entries under `dest`; the bytes written.
fn extract(bytes: &[u8], dest: &Path, limits: BundleLimits) -> Result<u64, BundleError> {
    let mut w = Writer {
        dest,
        limits,
        bytes: 0,
        files: 0,
    };
    match bytes {
        [0x1f, 0x8b, ..] => unpack_tar_gz(bytes, &mut w)?,
        [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => unpack_zip(bytes, &mut w)?,
        _ => return Err(BundleError::UnknownFormat),
    }
    Ok(w.bytes)
}

/// Checks an extracted bundle rooted at `root` and hashes it.
fn finish(root: PathBuf, size_bytes: u64) -> Result<Unpacked, BundleError> {
    check_symlinks(&root, &root)?;
    let manifest = read_manifest(&root)?;
    check_entrypoint(&root, &manifest)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    let sha256 = tree_hash(&root)?;
    Ok(Unpacked {
        root,
        manifest,
        sha256,
        size_bytes,
    })
}

/// The bundle root: `dest`, or its only folder when the archive wrapped everything in one.
fn bundle_root(dest: &Path) -> Result<PathBuf, BundleError> {
    if fs::symlink_metadata(dest.join(MANIFEST_FILE)).is_ok() {
        return Ok(dest.to_path_buf());
    }
    let entries: Vec<_> = fs::read_dir(dest)?.filter_map(|e| e.ok()).collect();
    if let [only] = entries.as_slice()
        && only.file_type().is_ok_and(|t| t.is_dir())
        && fs::symlink_metadata(only.path().join(MANIFEST_FILE)).is_ok()
    {
        return Ok(only.path());
    }
    Err(BundleError::NoManifest)
}

fn check_symlinks(root: &Path, dir: &Path) -> Result<(), BundleError> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        if t.is_symlink() {
            if !stays_inside(root, &rel) {
                return Err(BundleError::Unsafe {
                    path: rel.display().to_string(),
                    reason: "symlink leads outside the bundle",
                });
            }
        } else if t.is_dir() {
            check_symlinks(root, &path)?;
        }
    }
    Ok(())
}

fn read_manifest(root: &Path) -> Result<Manifest, BundleError> {
    let path = root.join(MANIFEST_FILE);
    let meta = fs::symlink_metadata(&path)?;
    if !meta.is_file() {
        return Err(BundleError::Unsafe {
            path: MANIFEST_FILE.into(),
            reason: "must be a regular file",
        });
    }
    if meta.len() > 64 * 1024 {
        return Err(BundleError::Unsafe {
            path: MANIFEST_FILE.into(),
            reason: "larger than 64 KiB",
        });
    }
    let text = fs::read_to_string(&path).map_err(|_| ManifestError::Syntax("not UTF-8".into()))?;
    Ok(Manifest::parse(&text)?)
}

fn check_entrypoint(root: &Path, m: &Manifest) -> Result<(), BundleError> {
    use crate::manifest::{BOOTSTRAP, Entrypoint, Mode};
    // A Lambda bundle without entrypoint or runtime runs its own bootstrap.
    let program = match (&m.entrypoint, m.mode, &m.runtime) {
        (Some(Entrypoint::Path(p)), _, _) => Some(p.clone()),
        (None, Mode::Lambda, None) => Some(BOOTSTRAP.to_string()),
        _ => None,
    };
    if let Some(p) = &program {
        let rel = Path::new(p);
        let ok = stays_inside(root, rel)
            && fs::metadata(root.join(rel))
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
        if !ok {
            return Err(BundleError::Entrypoint(p.clone()));
        }
    }
    Ok(())
}

/// sha256 over "D path", "F path mode sha256", "L path target" lines of the sorted tree.
pub fn tree_hash(root: &Path) -> Result<String, BundleError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                out.push(format!(
                    "L {rel} {}",
                    fs::read_link(&path)?.to_string_lossy()
                ));
            } else if meta.is_dir() {
                out.push(format!("D {rel}"));
                walk(root, &path, out)?;
            } else {
                let mut h = Sha256::new();
                std::io::copy(&mut fs::File::open(&path)?, &mut h)?;
                out.push(format!(
                    "F {rel} {:o} {}",
                    meta.permissions().mode() & 0o777,
                    hex::encode(h.finalize())
                ));
            }
        }
        Ok(())
    }
    let mut lines = Vec::new();
    walk(root, root, &mut lines)?;
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// (path, kind, data, link target) of one archive entry.
    pub type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

    pub const LIMITS: BundleLimits = BundleLimits {
        max_unpacked_bytes: 1 << 20,
        max_files: 100,
    };
    const MANIFEST: &[u8] = b"name = \"t\"\nentrypoint = \"run.sh\"\n";

    /// Builds a .tar.gz from (path, kind) entries with raw header control.
    pub fn tar_gz(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(if path.ends_with(".sh") { 0o755 } else { 0o644 });
            // Write the raw name so "../x" and "/abs" reach the unpacker unchanged.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn ok_entries() -> Vec<Entry<'static>> {
        vec![
            ("fnlet.toml", tar::EntryType::Regular, MANIFEST, None),
            ("run.sh", tar::EntryType::Regular, b"#!/bin/sh\ncat\n", None),
        ]
    }

    fn try_unpack(bytes: &[u8]) -> Result<Unpacked, BundleError> {
        let dir = tempfile::tempdir().unwrap();
        let r = unpack(bytes, dir.path(), LIMITS);
        // Keep the dir alive only for the call; results are inspected by value.
        drop(dir);
        r
    }

    #[test]
    fn unpacks_a_good_bundle_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let u = unpack(&tar_gz(&ok_entries()), dir.path(), LIMITS).unwrap();
        assert_eq!(u.manifest.name, "t");
        let mode = fs::metadata(dir.path().join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
        assert_eq!(u.sha256.len(), 64);
    }

    #[test]
    fn same_tree_same_address() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ua = unpack(&tar_gz(&ok_entries()), a.path(), LIMITS).unwrap();
        let ub = unpack(&tar_gz(&ok_entries()), b.path(), LIMITS).unwrap();
        assert_eq!(ua.sha256, ub.sha256);
    }

    #[test]
    fn refuses_zip_slip_absolute_devices_and_escaping_symlinks() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![("../evil", tar::EntryType::Regular, b"x", None)], ".."),
            (
                vec![("/etc/evil", tar::EntryType::Regular, b"x", None)],
                "absolute",
            ),
            (vec![("dev", tar::EntryType::Char, b"", None)], "devices"),
            (vec![("fifo", tar::EntryType::Fifo, b"", None)], "fifos"),
            (
                vec![("l", tar::EntryType::Symlink, b"", Some("/etc/shadow"))],
                "absolute",
            ),
            (
                vec![("l", tar::EntryType::Symlink, b"", Some("../../etc"))],
                "outside",
            ),
            // "x" -> "." looks harmless, and "y" -> "x/.." is "." lexically, but it resolves to ".."
            (
                vec![
                    ("x", tar::EntryType::Symlink, b"", Some(".")),
                    ("y", tar::EntryType::Symlink, b"", Some("x/..")),
                ],
                "outside",
            ),
            (
                vec![("h", tar::EntryType::Link, b"", Some("fnlet.toml"))],
                "hard links",
            ),
            // A symlink planted first, then a file written "through" it.
            (
                vec![
                    ("d", tar::EntryType::Symlink, b"", Some("sub")),
                    ("d/f", tar::EntryType::Regular, b"x", None),
                ],
                "parent",
            ),
        ];
        for (mut entries, want) in cases {
            entries.extend(ok_entries());
            let err = try_unpack(&tar_gz(&entries)).unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?}, got {err:?}");
        }
    }

    #[test]
    fn symlinks_inside_are_fine() {
        let mut e = ok_entries();
        e.push(("lib/a.txt", tar::EntryType::Regular, b"a", None));
        e.push((
            "bin/link",
            tar::EntryType::Symlink,
            b"",
            Some("../lib/a.txt"),
        ));
        try_unpack(&tar_gz(&e)).unwrap();
    }

    #[test]
    fn size_and_count_limits() {
        let big = vec![0u8; (1 << 20) + 1];
        let mut e = ok_entries();
        e.push(("big", tar::EntryType::Regular, &big, None));
        assert!(matches!(
            try_unpack(&tar_gz(&e)),
            Err(BundleError::TooLarge { .. })
        ));
        let names: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
        let mut e = ok_entries();
        for n in &names {
            e.push((n.as_str(), tar::EntryType::Regular, b"", None));
        }
        assert!(matches!(
            try_unpack(&tar_gz(&e)),
            Err(BundleError::TooManyFiles { .. })
        ));
    }

    #[test]
    fn manifest_and_entrypoint_are_checked() {
        let e = vec![("run.sh", tar::EntryType::Regular, &b"x"[..], None)];
        assert!(matches!(
            try_unpack(&tar_gz(&e)),
            Err(BundleError::NoManifest)
        ));
        let e = vec![(
            "fnlet.toml",
            tar::EntryType::Regular,
            &b"name = \"t\"\nentrypoint = \"missing\"\n"[..],
            None,
        )];
        assert!(matches!(
            try_unpack(&tar_gz(&e)),
            Err(BundleError::Entrypoint(_))
        ));
        let e = vec![(
            "fnlet.toml",
            tar::EntryType::Regular,
            &b"name = 3\n"[..],
            None,
        )];
        let err = try_unpack(&tar_gz(&e)).unwrap_err().to_string();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn single_top_level_folder_is_the_root() {
        let e = vec![
            ("hello/fnlet.toml", tar::EntryType::Regular, MANIFEST, None),
            (
                "hello/run.sh",
                tar::EntryType::Regular,
                &b"#!/bin/sh\n"[..],
                None,
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let u = unpack(&tar_gz(&e), dir.path(), LIMITS).unwrap();
        assert!(u.root.ends_with("hello"));
    }

    #[test]
    fn zip_bundles_and_zip_slip() {
        use zip::write::SimpleFileOptions;
        let mk = |names: &[(&str, &[u8])]| {
            let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            for (n, d) in names {
                w.start_file(*n, SimpleFileOptions::default().unix_permissions(0o755))
                    .unwrap();
                w.write_all(d).unwrap();
            }
            w.finish().unwrap().into_inner()
        };
        let good = mk(&[("fnlet.toml", MANIFEST), ("run.sh", b"#!/bin/sh\n")]);
        try_unpack(&good).unwrap();
        let slip = mk(&[
            ("fnlet.toml", MANIFEST),
            ("run.sh", b"#!/bin/sh\n"),
            ("../../evil", b"x"),
        ]);
        let err = try_unpack(&slip).unwrap_err().to_string();
        assert!(err.contains(".."), "{err}");
    }

    #[test]
    fn a_lambda_zip_without_fnlet_toml_gets_the_generated_one() {
        use zip::write::SimpleFileOptions;
        let mk = |names: &[(&str, &[u8])]| {
            let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            for (n, d) in names {
                w.start_file(*n, SimpleFileOptions::default().unix_permissions(0o755))
                    .unwrap();
                w.write_all(d).unwrap();
            }
            w.finish().unwrap().into_inner()
        };
        let generated =
            Manifest::parse("name = \"gen\"\nmode = \"lambda\"\nmemory_mb = 256\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (u, own) = unpack_or_generate(
            &mk(&[("bootstrap", b"#!/bin/sh\n")]),
            dir.path(),
            LIMITS,
            &generated,
        )
        .unwrap();
        assert!(!own);
        assert_eq!(u.manifest, generated);
        // Written into the bundle: a peer that unpacks it reads the same manifest.
        let written = fs::read_to_string(u.root.join(MANIFEST_FILE)).unwrap();
        assert_eq!(Manifest::parse(&written).unwrap(), generated);
        // A zip with its own keeps it.
        let dir = tempfile::tempdir().unwrap();
        let (u, own) = unpack_or_generate(
            &mk(&[("fnlet.toml", MANIFEST), ("run.sh", b"#!/bin/sh\n")]),
            dir.path(),
            LIMITS,
            &generated,
        )
        .unwrap();
        assert!(own);
        assert_eq!(u.manifest.name, "t");
        // The generated manifest's bootstrap must be there.
        let dir = tempfile::tempdir().unwrap();
        let err = unpack_or_generate(&mk(&[("app.py", b"x")]), dir.path(), LIMITS, &generated)
            .unwrap_err();
        assert!(
            matches!(err, BundleError::Entrypoint(ref p) if p == "bootstrap"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_a_bundle() {
        assert!(matches!(
            try_unpack(b"hello"),
            Err(BundleError::UnknownFormat)
        ));
        assert!(matches!(
            try_unpack(&[0x1f, 0x8b, 0, 1, 2]),
            Err(BundleError::Corrupt(_))
        ));
    }
}
