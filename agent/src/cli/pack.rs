//! Bundles as `fnlet deploy` sends them: a folder packed into a .tar.gz, or an archive as is.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// The manifest every bundle holds at its root.
pub const MANIFEST_FILE: &str = "fnlet.toml";

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(
        "{} has no fnlet.toml at its root: a bundle folder needs one naming the function and its \
         entrypoint",
        dir.display()
    )]
    NoManifest { dir: PathBuf },
    #[error("{}: fnlet.toml must be a regular file", path.display())]
    ManifestNotFile { path: PathBuf },
    #[error("{}: cannot pack a {kind} (a bundle holds files, folders and symlinks)", path.display())]
    Special { path: PathBuf, kind: &'static str },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("packing {}: {source}", path.display())]
    Append {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive: {source}")]
    Write {
        #[source]
        source: io::Error,
    },
}

impl PackError {
    /// The folder itself is unfit (as opposed to a failure while reading or writing it).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PackError::NoManifest { .. }
                | PackError::ManifestNotFile { .. }
                | PackError::Special { .. }
        )
    }
}

/// What was packed, and where to.
#[derive(Debug)]
pub struct Packed<W> {
    pub out: W,
    pub files: u64,
    /// Bytes of file content before compression.
    pub bytes: u64,
}

/// Packs the folder `dir` as a gzip-compressed tar into `out`.
///
/// Entries are relative to `dir` (so fnlet.toml sits at the archive's root), in sorted order.
/// Nothing is skipped; permission bits are kept (owner is root; the agent assigns its own), and
/// symlinks are stored as symlinks, never followed. Sockets, fifos and devices are refused.
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<Packed<W>, PackError> {
    let manifest = dir.join(MANIFEST_FILE);
    match fs::symlink_metadata(&manifest) {
        Ok(md) if md.file_type().is_file() => {}
        Ok(_) => return Err(PackError::ManifestNotFile { path: manifest }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PackError::NoManifest { dir: dir.into() });
        }
        Err(source) => {
            return Err(PackError::Read {
                path: manifest,
                source,
            });
        }
    }
    let mut tar = tar::Builder::new(GzEncoder::new(out, Compression::default()));
    let mut packed = Packed {
        out: (),
        files: 0,
        bytes: 0,
    };
    add_dir(&mut tar, dir, Path::new(""), &mut packed)?;
    let gz = tar
        .into_inner()
        .map_err(|source| PackError::Write { source })?;
    let out = gz.finish().map_err(|source| PackError::Write { source })?;
    Ok(Packed {
        out,
        files: packed.files,
        bytes: packed.bytes,
    })
}

/// Appends the entries below `root/rel`, depth first.
fn add_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    packed: &mut Packed<()>,
) -> Result<(), PackError> {
    let abs = root.join(rel);
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Read { path, source }
    };
    let mut entries = fs::read_dir(&abs)
        .map_err(read_err(&abs))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(&abs))?;
    // Sorted, so the same folder packs to the same entry order.
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let abs_path = abs.join(&name);
        let rel_path = rel.join(&name);
        let md = fs::symlink_metadata(&abs_path).map_err(read_err(&abs_path))?;
        let ft = md.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(md.mode() & 0o777);
        header.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        let append_err = |source| PackError::Append {
            path: abs_path.clone(),
            source,
        };
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, &rel_path, io::empty())
                .map_err(append_err)?;
            add_dir(tar, root, &rel_path, packed)?;
        } else if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(md.len());
            let file = File::open(&abs_path).map_err(read_err(&abs_path))?;
            let reader = ExactReader {
                inner: file.take(md.len()),
                remaining: md.len(),
            };
            tar.append_data(&mut header, &rel_path, reader)
                .map_err(append_err)?;
            packed.files += 1;
            packed.bytes += md.len();
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs_path).map_err(read_err(&abs_path))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &rel_path, &target)
                .map_err(append_err)?;
            packed.files += 1;
        } else {
            let kind = if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_block_device() || ft.is_char_device() {
                "device"
            } else {
                "special file"
            };
            return Err(PackError::Special {
                path: abs_path,
                kind,
            });
        }
    }
    Ok(())
}

/// Reads exactly the size written in the tar header: a file that shrinks while being packed
/// fails instead of producing a corrupt archive (one that grows is cut at the header's size).
struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// An archive sent as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    TarGz,
    Zip,
}

impl ArchiveKind {
    /// By file name: .tar.gz, .tgz or .zip (any case).
    pub fn from_path(path: &Path) -> Option<ArchiveKind> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if name.ends_with(".zip") {
            Some(ArchiveKind::Zip)
        } else {
            None
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ArchiveKind::TarGz => "application/gzip",
            ArchiveKind::Zip => "application/zip",
        }
    }

    /// Whether the first bytes of a file are this format's magic number.
    pub fn matches_magic(self, head: &[u8]) -> bool {
        match self {
            ArchiveKind::TarGz => head.starts_with(&[0x1f, 0x8b]),
            // A local file header, or the end-of-central-directory record of an empty zip.
            ArchiveKind::Zip => head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ArchiveKind::TarGz => "a gzip file",
            ArchiveKind::Zip => "a zip file",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use flate2::read::GzDecoder;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Node {
        Dir(u32),
        File(u32, Vec<u8>),
        Link(PathBuf),
    }

    /// Every entry below `root` by relative path.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
        fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Node>) {
            for e in fs::read_dir(root.join(rel)).unwrap() {
                let e = e.unwrap();
                let rel = rel.join(e.file_name());
                let abs = root.join(&rel);
                let md = fs::symlink_metadata(&abs).unwrap();
                let mode = md.permissions().mode() & 0o777;
                if md.is_dir() {
                    out.insert(rel.clone(), Node::Dir(mode));
                    walk(root, &rel, out);
                } else if md.file_type().is_symlink() {
                    out.insert(rel, Node::Link(fs::read_link(&abs).unwrap()));
                } else {
                    out.insert(rel, Node::File(mode, fs::read(&abs).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    fn write(path: &Path, data: &[u8], mode: u32) {
        fs::write(path, data).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn sample_bundle() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("fnlet.toml"),
            b"name = \"hello\"\nentrypoint = \"bootstrap\"\n",
            0o644,
        );
        write(&d.join("bootstrap"), b"#!/bin/sh\ncat\n", 0o755);
        write(&d.join(".hidden"), b"kept", 0o600);
        fs::create_dir_all(d.join("lib/deep/er")).unwrap();
        fs::set_permissions(d.join("lib"), fs::Permissions::from_mode(0o750)).unwrap();
        write(&d.join("lib/deep/er/data.bin"), &[0u8, 1, 2, 255], 0o640);
        write(&d.join("lib/run.sh"), b"exit 0\n", 0o700);
        fs::create_dir(d.join("empty")).unwrap();
        symlink("../bootstrap", d.join("lib/link")).unwrap();
        symlink("/etc/hostname", d.join("abs-link")).unwrap();
        symlink("missing", d.join("dangling")).unwrap();
        let long = "x".repeat(150);
        fs::create_dir(d.join(&long)).unwrap();
        write(&d.join(&long).join(&long), b"long names", 0o644);
        dir
    }

    #[test]
    fn packed_folder_unpacks_to_the_same_tree_and_modes() {
        let src = sample_bundle();
        let packed = pack_dir(src.path(), Vec::new()).unwrap();
        assert_eq!(packed.files, 9);

        let dst = tempfile::tempdir().unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(packed.out.as_slice()));
        archive.set_preserve_permissions(true);
        archive.unpack(dst.path()).unwrap();

        assert_eq!(snapshot(src.path()), snapshot(dst.path()));
    }

    #[test]
    fn entries_are_relative_with_the_manifest_at_the_root() {
        let src = sample_bundle();
        let packed = pack_dir(src.path(), Vec::new()).unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(packed.out.as_slice()));
        let mut paths = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            assert!(path.is_relative(), "{path:?}");
            assert!(!path.starts_with("."), "{path:?}");
            assert_eq!(e.header().uid().unwrap(), 0);
            paths.push(path);
        }
        assert!(paths.contains(&PathBuf::from("fnlet.toml")));
        assert!(paths.contains(&PathBuf::from(".hidden")));
        assert!(paths.contains(&PathBuf::from("lib/deep/er/data.bin")));
        // Sorted, folders before what they hold.
        let lib = paths.iter().position(|p| p == Path::new("lib")).unwrap();
        let deep = paths
            .iter()
            .position(|p| p == Path::new("lib/deep"))
            .unwrap();
        assert!(lib < deep);
    }

    #[test]
    fn packing_is_repeatable() {
        let src = sample_bundle();
        let a = pack_dir(src.path(), Vec::new()).unwrap().out;
        let b = pack_dir(src.path(), Vec::new()).unwrap().out;
        assert_eq!(a, b);
    }

    #[test]
    fn a_folder_without_fnlet_toml_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("bootstrap"), b"x", 0o755);
        let err = pack_dir(dir.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, PackError::NoManifest { .. }), "{err:?}");
        assert!(err.is_usage());
        assert!(err.to_string().contains("has no fnlet.toml"), "{err}");
    }

    #[test]
    fn a_nested_fnlet_toml_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        write(&dir.path().join("sub/fnlet.toml"), b"", 0o644);
        let err = pack_dir(dir.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, PackError::NoManifest { .. }), "{err:?}");
    }

    #[test]
    fn a_manifest_that_is_not_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("fnlet.toml")).unwrap();
        let err = pack_dir(dir.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, PackError::ManifestNotFile { .. }), "{err:?}");
    }

    #[test]
    fn sockets_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("fnlet.toml"), b"", 0o644);
        let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).unwrap();
        let err = pack_dir(dir.path(), Vec::new()).unwrap_err();
        assert!(
            matches!(err, PackError::Special { kind: "socket", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("s.sock"), "{err}");
    }

    #[test]
    fn archive_kinds() {
        assert_eq!(
            ArchiveKind::from_path(Path::new("a/b.tar.gz")),
            Some(ArchiveKind::TarGz)
        );
        assert_eq!(
            ArchiveKind::from_path(Path::new("B.TGZ")),
            Some(ArchiveKind::TarGz)
        );
        assert_eq!(
            ArchiveKind::from_path(Path::new("x.zip")),
            Some(ArchiveKind::Zip)
        );
        assert_eq!(ArchiveKind::from_path(Path::new("x.tar")), None);
        assert_eq!(ArchiveKind::from_path(Path::new("gz")), None);
        assert_eq!(ArchiveKind::TarGz.content_type(), "application/gzip");
        assert_eq!(ArchiveKind::Zip.content_type(), "application/zip");
        assert!(ArchiveKind::TarGz.matches_magic(&[0x1f, 0x8b, 8]));
        assert!(!ArchiveKind::TarGz.matches_magic(b"PK\x03\x04"));
        assert!(ArchiveKind::Zip.matches_magic(b"PK\x03\x04rest"));
        assert!(!ArchiveKind::Zip.matches_magic(b"name = "));
    }
}
