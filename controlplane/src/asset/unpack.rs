//! `FetchDirectory` from origin: a downloaded tar (or gzip-compressed tar) unpacked, blocking,
//! into a tree of `Directory` messages and the files they name, ready to store in the CAS.
//! Every path is checked before it is used (no absolute path, no `..`, no component that is
//! not a name, at most [`MAX_DEPTH`] deep), symlink targets must stay inside the tree that is
//! answered (the subdirectory, when one is asked for), the unpacked file bytes are bounded (a
//! small archive cannot inflate past the limit), so are the bytes the tar reader takes between
//! two entries (headers, long names, PAX records, skipped data: [`MAX_BETWEEN_ENTRIES`]), the
//! entries, the bytes of names and the size of each `Directory`, and the whole unpack ends at
//! the fetch's deadline. Hard links become copies; devices, FIFOs and the like are left out.

use super::TempFile;
use bytes::Bytes;
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use kiln_reapi::digest::{Digest, DigestFunction, Hasher};
use kiln_reapi::status::{Classify, ErrorKind};
use prost::Message;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// Most entries in one archive.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Deepest path in one archive.
pub const MAX_DEPTH: usize = 128;
/// Most bytes of names and symlink targets in one archive.
pub const MAX_NAME_BYTES: usize = 64 << 20;
/// Most bytes the tar reader may take between two entries it hands out: headers, GNU long
/// names, PAX records, and the data of entries left out. (The crate reads long names and PAX
/// records whole into memory.)
pub const MAX_BETWEEN_ENTRIES: u64 = 1 << 20;
/// Largest `Directory` message: under the 4 MiB gRPC clients accept by default.
pub const MAX_DIRECTORY_BYTES: usize = 3 << 20;

/// The archive formats Kiln unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A tar.
    Tar,
    /// A gzip-compressed tar.
    TarGz,
}

impl ArchiveKind {
    /// The format named by the `resource_type` qualifier, or else by the URL's ending.
    pub fn of(url: &str, resource_type: Option<&str>) -> Option<ArchiveKind> {
        match resource_type {
            Some("application/x-tar") => return Some(ArchiveKind::Tar),
            Some(
                "application/gzip"
                | "application/x-gzip"
                | "application/x-compressed-tar"
                | "application/x-tar+gzip",
            ) => return Some(ArchiveKind::TarGz),
            Some(_) | None => {}
        }
        let path = url.split(['?', '#']).next().unwrap_or(url);
        if path.ends_with(".tar.gz") || path.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if path.ends_with(".tar") {
            Some(ArchiveKind::Tar)
        } else {
            None
        }
    }
}

/// Why an archive was refused: its content, so it goes in the response's status.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Not a readable archive, or one whose paths or links are not allowed.
    #[error("the archive {0}")]
    Bad(String),
    /// More bytes or entries than allowed.
    #[error("the archive unpacks to more than {0}")]
    TooLarge(String),
    /// The fetch's deadline passed while unpacking.
    #[error("unpacking the archive took longer than the fetch's timeout")]
    TimedOut,
    /// The `directory` qualifier names nothing in it.
    #[error("the archive has no directory {0:?}")]
    NoSuchDirectory(String),
    /// Writing a file here failed.
    #[error("unpacking: {0}")]
    Local(#[source] std::io::Error),
}

impl Classify for UnpackError {
    fn kind(&self) -> ErrorKind {
        match self {
            // A failed consistency check: the spec's ABORTED.
            UnpackError::Bad(_) => ErrorKind::Conflict,
            UnpackError::TooLarge(_) => ErrorKind::Exhausted,
            UnpackError::TimedOut => ErrorKind::TimedOut,
            UnpackError::NoSuchDirectory(_) => ErrorKind::Missing,
            UnpackError::Local(e) => ErrorKind::of_io(e),
        }
    }
}

/// An unpacked tree: the files to store (each in a temp file), every `Directory` message, and
/// the digest of the root (or of the subdirectory asked for).
pub struct Unpacked {
    /// Each distinct file once.
    pub files: Vec<(Digest, TempFile)>,
    /// Each distinct directory once, every one after the directories it names.
    pub directories: Vec<(Digest, Bytes)>,
    /// The tree's root.
    pub root: Digest,
}

enum Node {
    File { digest: Digest, executable: bool },
    Dir(BTreeMap<String, Node>),
    Symlink(String),
}

/// Counts what the tar reader takes outside the file contents Kiln copies: the bytes since the
/// last entry handed out, refused past [`MAX_BETWEEN_ENTRIES`].
struct Metered<R> {
    inner: R,
    meter: Rc<Cell<Meter>>,
}

#[derive(Clone, Copy, Default)]
struct Meter {
    /// Reading an entry's contents for Kiln (bounded by the file budget instead).
    in_file: bool,
    /// Bytes taken since the last entry was handed out, outside file contents.
    between: u64,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut m = self.meter.get();
        if !m.in_file {
            m.between += n as u64;
            if m.between > MAX_BETWEEN_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_BETWEEN_ENTRIES} bytes of headers, long names or left-out data between two entries"
                )));
            }
            self.meter.set(m);
        }
        Ok(n)
    }
}

/// Unpacks `archive`, hashing with `function`; at most `max_bytes` of file contents; temp
/// files at the paths `temp` gives; the root is `subdir` when given; refused once `deadline`
/// has passed.
pub fn unpack(
    archive: &Path,
    kind: ArchiveKind,
    function: DigestFunction,
    max_bytes: u64,
    temp: &dyn Fn() -> PathBuf,
    subdir: Option<&str>,
    deadline: Instant,
) -> Result<Unpacked, UnpackError> {
    let file = std::fs::File::open(archive).map_err(UnpackError::Local)?;
    let reader: Box<dyn Read> = match kind {
        ArchiveKind::Tar => Box::new(file),
        ArchiveKind::TarGz => Box::new(flate2::read::GzDecoder::new(file)),
    };
    let meter = Rc::new(Cell::new(Meter::default()));
    let reader = Metered {
        inner: reader,
        meter: meter.clone(),
    };
    let bad = |why: String| UnpackError::Bad(why);
    let mut tar = tar::Archive::new(reader);
    let mut root: BTreeMap<String, Node> = BTreeMap::new();
    let mut files: BTreeMap<Digest, TempFile> = BTreeMap::new();
    let mut total = 0u64;
    let mut name_bytes = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("is not a tar: {e}")))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(UnpackError::TooLarge(format!("{MAX_ENTRIES} entries")));
        }
        if Instant::now() >= deadline {
            return Err(UnpackError::TimedOut);
        }
        let mut entry = entry.map_err(|e| bad(format!("is damaged: {e}")))?;
        meter.set(Meter::default());
        // GNU sparse files in PAX form are not expanded by the reader: their contents would be
        // the sparse map, not the file.
        let sparse = entry
            .pax_extensions()
            .map_err(|e| bad(format!("is damaged: {e}")))?
            .is_some_and(|mut ext| {
                ext.any(|e| e.is_ok_and(|e| e.key_bytes().starts_with(b"GNU.sparse")))
            });
        if sparse {
            return Err(bad(
                "holds a PAX sparse file, which Kiln does not unpack".into()
            ));
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("has an unreadable path: {e}")))?
            .into_owned();
        let Some(at) = components(&path).map_err(bad)? else {
            continue; // "." itself
        };
        name_bytes += path.as_os_str().len();
        if name_bytes > MAX_NAME_BYTES {
            return Err(UnpackError::TooLarge(format!(
                "{MAX_NAME_BYTES} bytes of names"
            )));
        }
        let kind = entry.header().entry_type();
        let is_file = kind.is_file()
            || kind == tar::EntryType::Continuous
            || kind == tar::EntryType::GNUSparse;
        let node = if is_file {
            let dest = TempFile(temp());
            meter.set(Meter {
                in_file: true,
                between: 0,
            });
            let copied = copy_hashed(&mut entry, &dest.0, function, max_bytes - total, &mut buf);
            meter.set(Meter::default());
            let (digest, size) = copied?;
            total += size;
            let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
            files.entry(digest).or_insert(dest);
            Node::File { digest, executable }
        } else if kind.is_dir() {
            Node::Dir(BTreeMap::new())
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| bad(format!("has an unreadable link: {e}")))?
                .ok_or_else(|| bad(format!("has a symlink without a target at {path:?}")))?;
            let target = target
                .to_str()
                .ok_or_else(|| {
                    bad(format!(
                        "has a symlink target that is not UTF-8 at {path:?}"
                    ))
                })?
                .to_string();
            kiln_reapi::paths::symlink_target(at.len() - 1, &target)
                .map_err(|e| bad(format!("has a symlink at {path:?} whose target {e}")))?;
            name_bytes += target.len();
            Node::Symlink(target)
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| bad(format!("has an unreadable link: {e}")))?
                .ok_or_else(|| bad(format!("has a hard link without a target at {path:?}")))?;
            let linked = components(&target)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("has a hard link to the root at {path:?}")))?;
            match find(&root, &linked) {
                Some(Node::File { digest, executable }) => Node::File {
                    digest: *digest,
                    executable: *executable,
                },
                _ => {
                    return Err(bad(format!(
                        "has a hard link at {path:?} to no file before it"
                    )))
                }
            }
        } else {
            continue; // devices, FIFOs, global headers: nothing a tree holds
        };
        insert(&mut root, &at, node).map_err(|why| bad(format!("{why} at {path:?}")))?;
    }
    let mut top = &root;
    if let Some(dir) = subdir {
        let at = components(Path::new(dir))
            .map_err(|_| UnpackError::NoSuchDirectory(dir.to_string()))?;
        if let Some(at) = at {
            top = match find(&root, &at) {
                Some(Node::Dir(children)) => children,
                _ => return Err(UnpackError::NoSuchDirectory(dir.to_string())),
            };
        }
    }
    // Symlinks were checked against the archive's root; the tree answered may be below it.
    check_symlinks(top, 0).map_err(bad)?;
    let mut directories = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let root = build(top, function, &mut directories, &mut seen)?;
    // Only the files the chosen tree names are stored.
    let mut named = std::collections::BTreeSet::new();
    collect_files(top, &mut named);
    let files = files
        .into_iter()
        .filter(|(d, _)| named.contains(d))
        .collect();
    Ok(Unpacked {
        files,
        directories,
        root,
    })
}

/// The path's components, checked: `None` for the root itself.
fn components(path: &Path) -> Result<Option<Vec<String>>, String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(name) => {
                let name = name
                    .to_str()
                    .ok_or_else(|| format!("has a path that is not UTF-8: {path:?}"))?;
                if !kiln_reapi::tree::valid_name(name) {
                    return Err(format!("has a path with a bad name: {path:?}"));
                }
                out.push(name.to_string());
            }
            _ => return Err(format!("has a path that leaves the tree: {path:?}")),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(format!("has a path deeper than {MAX_DEPTH}: {path:?}"));
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Copies an entry's bytes into a new file while hashing them; at most `left` bytes.
fn copy_hashed(
    from: &mut impl Read,
    to: &Path,
    function: DigestFunction,
    left: u64,
    buf: &mut [u8],
) -> Result<(Digest, u64), UnpackError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(UnpackError::Local)?;
    let mut hasher = Hasher::new(function);
    let mut size = 0u64;
    loop {
        let n = from
            .read(buf)
            .map_err(|e| UnpackError::Bad(format!("is damaged: {e}")))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > left {
            return Err(UnpackError::TooLarge(
                "remote_asset.max_fetch_bytes of files".into(),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(UnpackError::Local)?;
    }
    Ok((
        Digest {
            function,
            hash: hasher.finalize(),
            size,
        },
        size,
    ))
}

/// Puts `node` at `path`, making the directories above it; a later entry replaces an earlier
/// one of the same kind, a directory keeps what it holds.
fn insert(root: &mut BTreeMap<String, Node>, path: &[String], node: Node) -> Result<(), String> {
    let (name, parents) = path.split_last().ok_or("an empty path")?;
    let mut here = root;
    for p in parents {
        let next = here
            .entry(p.clone())
            .or_insert_with(|| Node::Dir(BTreeMap::new()));
        here = match next {
            Node::Dir(children) => children,
            _ => return Err(format!("{p:?} is both a file and a directory")),
        };
    }
    match (here.get(name), &node) {
        (Some(Node::Dir(_)), Node::Dir(_)) => {}
        (Some(Node::Dir(_)), _) | (Some(_), Node::Dir(_)) => {
            return Err(format!("{name:?} is both a file and a directory"))
        }
        _ => {
            here.insert(name.clone(), node);
        }
    }
    Ok(())
}

fn find<'a>(root: &'a BTreeMap<String, Node>, path: &[String]) -> Option<&'a Node> {
    let (name, parents) = path.split_last()?;
    let mut here = root;
    for p in parents {
        here = match here.get(p)? {
            Node::Dir(children) => children,
            _ => return None,
        };
    }
    here.get(name)
}

/// Checks every symlink's target against its depth below `children`, the tree answered.
fn check_symlinks(children: &BTreeMap<String, Node>, depth: usize) -> Result<(), String> {
    for (name, node) in children {
        match node {
            Node::Symlink(target) => {
                kiln_reapi::paths::symlink_target(depth, target).map_err(|e| {
                    format!("has a symlink {name:?} whose target {e} of the directory answered")
                })?
            }
            Node::Dir(below) => check_symlinks(below, depth + 1)?,
            Node::File { .. } => {}
        }
    }
    Ok(())
}

/// The `Directory` of `children` (names sorted, as REAPI requires: a `BTreeMap`'s order),
/// pushed into `out` after those below it (each distinct one once: `seen`).
fn build(
    children: &BTreeMap<String, Node>,
    function: DigestFunction,
    out: &mut Vec<(Digest, Bytes)>,
    seen: &mut std::collections::BTreeSet<Digest>,
) -> Result<Digest, UnpackError> {
    let mut dir = Directory::default();
    for (name, node) in children {
        match node {
            Node::File { digest, executable } => dir.files.push(FileNode {
                name: name.clone(),
                digest: Some(digest.to_proto()),
                is_executable: *executable,
                ..Default::default()
            }),
            Node::Dir(below) => dir.directories.push(DirectoryNode {
                name: name.clone(),
                digest: Some(build(below, function, out, seen)?.to_proto()),
            }),
            Node::Symlink(target) => dir.symlinks.push(SymlinkNode {
                name: name.clone(),
                target: target.clone(),
                ..Default::default()
            }),
        }
    }
    let bytes = Bytes::from(dir.encode_to_vec());
    if bytes.len() > MAX_DIRECTORY_BYTES {
        return Err(UnpackError::TooLarge(format!(
            "a directory of {MAX_DIRECTORY_BYTES} bytes (too many entries in one directory)"
        )));
    }
    let digest = Digest::of(function, &bytes);
    if seen.insert(digest) {
        out.push((digest, bytes));
    }
    Ok(digest)
}

fn collect_files(children: &BTreeMap<String, Node>, out: &mut std::collections::BTreeSet<Digest>) {
    for node in children.values() {
        match node {
            Node::File { digest, .. } => {
                out.insert(*digest);
            }
            Node::Dir(below) => collect_files(below, out),
            Node::Symlink(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry at `path` (written raw, so that bad paths can be made too).
    fn entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    /// Path, type, mode, link target, data.
    type Entry<'a> = (&'a str, tar::EntryType, u32, &'a str, &'a [u8]);

    fn archive(dir: &Path, entries: &[Entry]) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, mode, link, data) in entries {
            entry(&mut b, path, *kind, *mode, link, data);
        }
        let tar = b.into_inner().unwrap();
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("a{n}.tar.gz"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }

    fn run(
        dir: &Path,
        path: &Path,
        max: u64,
        subdir: Option<&str>,
    ) -> Result<Unpacked, UnpackError> {
        // Unique across calls: the files of an earlier result may still be there.
        static T: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let temp = || {
            dir.join(format!(
                "t{}",
                T.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
        };
        unpack(
            path,
            ArchiveKind::TarGz,
            DigestFunction::Sha256,
            max,
            &temp,
            subdir,
            far(),
        )
    }

    fn dir_of(u: &Unpacked, d: Digest) -> Directory {
        let (_, bytes) = u.directories.iter().find(|(x, _)| *x == d).unwrap();
        Directory::decode(&bytes[..]).unwrap()
    }

    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[test]
    fn a_tree_with_modes_links_and_subdirectories() {
        let tmp = tempfile::tempdir().unwrap();
        let path = archive(
            tmp.path(),
            &[
                ("./", D, 0o755, "", b""),
                ("pkg/", D, 0o755, "", b""),
                ("pkg/tool", F, 0o755, "", b"#!/bin/sh\n"),
                ("pkg/lib/a.txt", F, 0o644, "", b"a"),
                ("pkg/lib/same.txt", L, 0o644, "pkg/lib/a.txt", b""),
                ("pkg/link", S, 0o777, "lib/a.txt", b""),
                ("pkg/fifo", tar::EntryType::Fifo, 0o644, "", b""),
            ],
        );
        let u = run(tmp.path(), &path, 1 << 20, None).unwrap();
        let root = dir_of(&u, u.root);
        assert_eq!(root.directories.len(), 1);
        let pkg_digest =
            Digest::from_proto(root.directories[0].digest.as_ref().unwrap(), 0).unwrap();
        let pkg = dir_of(&u, pkg_digest);
        let names: Vec<&str> = pkg.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["tool"]);
        assert!(pkg.files[0].is_executable);
        assert_eq!(pkg.symlinks[0].target, "lib/a.txt");
        let lib = dir_of(
            &u,
            Digest::from_proto(pkg.directories[0].digest.as_ref().unwrap(), 0).unwrap(),
        );
        assert_eq!(lib.files.len(), 2, "the hard link is a copy");
        assert_eq!(lib.files[0].digest, lib.files[1].digest);
        assert!(!lib.files[0].is_executable);
        // Two distinct files, each stored once.
        assert_eq!(u.files.len(), 2);
        // Every directory comes after the directories it names.
        for (i, (_, bytes)) in u.directories.iter().enumerate() {
            for child in Directory::decode(&bytes[..]).unwrap().directories {
                let child = Digest::from_proto(child.digest.as_ref().unwrap(), 0).unwrap();
                let at = u.directories.iter().position(|(d, _)| *d == child).unwrap();
                assert!(at < i, "a directory before its child");
            }
        }
        assert_eq!(u.directories.last().unwrap().0, u.root);
        // The `directory` qualifier picks a subtree.
        let sub = run(tmp.path(), &path, 1 << 20, Some("pkg/lib")).unwrap();
        assert_eq!(dir_of(&sub, sub.root), lib);
        assert_eq!(sub.files.len(), 1);
        assert!(matches!(
            run(tmp.path(), &path, 1 << 20, Some("pkg/nothing")),
            Err(UnpackError::NoSuchDirectory(_))
        ));
    }

    #[test]
    fn unsafe_paths_links_and_bombs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cases: Vec<Vec<Entry>> = vec![
            vec![("../evil", F, 0o644, "", b"x")],
            vec![("/etc/evil", F, 0o644, "", b"x")],
            vec![("a/link", S, 0o777, "/etc/passwd", b"")],
            vec![("a/link", S, 0o777, "../../out", b"")],
            vec![("a", F, 0o644, "", b"x"), ("a/b", F, 0o644, "", b"y")],
            vec![("h", L, 0o644, "missing", b"")],
        ];
        for entries in cases {
            let path = archive(tmp.path(), &entries);
            assert!(
                matches!(
                    run(tmp.path(), &path, 1 << 20, None),
                    Err(UnpackError::Bad(_))
                ),
                "{:?}",
                entries.iter().map(|e| e.0).collect::<Vec<_>>()
            );
        }
        let big = vec![0u8; 100_000];
        let path = archive(tmp.path(), &[("zeros", F, 0o644, "", &big[..])]);
        assert!(matches!(
            run(tmp.path(), &path, 64 << 10, None),
            Err(UnpackError::TooLarge(_))
        ));
        assert!(
            matches!(
                unpack(
                    &path,
                    ArchiveKind::Tar,
                    DigestFunction::Sha256,
                    1 << 20,
                    &|| tmp.path().join("x"),
                    None,
                    far(),
                ),
                Err(UnpackError::Bad(_))
            ),
            "a gzip file is not a plain tar"
        );
        // A symlink inside the archive that leaves the subdirectory answered.
        let path = archive(tmp.path(), &[("pkg/lib/x", S, 0o777, "../../y", b"")]);
        assert!(run(tmp.path(), &path, 1 << 20, None).is_ok());
        assert!(matches!(
            run(tmp.path(), &path, 1 << 20, Some("pkg/lib")),
            Err(UnpackError::Bad(_))
        ));
        // A GNU long name of 2 MiB: refused before the reader holds it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "d/".repeat(1 << 20) + "f", &b"x"[..])
            .unwrap();
        let long = tmp.path().join("long.tar");
        std::fs::write(&long, b.into_inner().unwrap()).unwrap();
        let refused = unpack(
            &long,
            ArchiveKind::Tar,
            DigestFunction::Sha256,
            1 << 20,
            &|| tmp.path().join("y"),
            None,
            far(),
        );
        assert!(
            matches!(&refused, Err(UnpackError::Bad(m)) if m.contains("between two entries")),
            "{:?}",
            refused.err()
        );
        // Past the deadline: stopped.
        let path = archive(tmp.path(), &[("a", F, 0o644, "", b"x")]);
        let late = unpack(
            &path,
            ArchiveKind::TarGz,
            DigestFunction::Sha256,
            1 << 20,
            &|| tmp.path().join("z"),
            None,
            Instant::now(),
        );
        assert!(matches!(late, Err(UnpackError::TimedOut)));
    }

    #[test]
    fn archive_kinds_by_type_or_name() {
        assert_eq!(
            ArchiveKind::of("https://x/a.tar.gz", None),
            Some(ArchiveKind::TarGz)
        );
        assert_eq!(
            ArchiveKind::of("https://x/a.tgz?sig=1", None),
            Some(ArchiveKind::TarGz)
        );
        assert_eq!(
            ArchiveKind::of("https://x/a.tar", None),
            Some(ArchiveKind::Tar)
        );
        assert_eq!(ArchiveKind::of("https://x/a.zip", None), None);
        assert_eq!(
            ArchiveKind::of("https://x/download", Some("application/x-tar")),
            Some(ArchiveKind::Tar)
        );
    }
}
