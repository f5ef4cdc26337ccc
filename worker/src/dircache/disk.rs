//! The directory cache on disk:
//!
//! ```text
//! {dir}/FORMAT              "kiln-dircache 1": anything else and the whole cache is discarded
//! {dir}/entries/{name}/     one input tree, laid out as an action gets it (read-only files)
//! {dir}/manifests/{name}    its DirCacheManifest (the tree's Directory messages); its mtime
//!                           is the entry's last use, for eviction order across restarts
//! {dir}/tmp/                entries being built
//! {dir}/trash/              entries being removed
//! ```
//!
//! `{name}` is `{function}-{hash}-{size}-{instance directory}` of the input root. An entry
//! becomes visible by renaming its finished tree, then its manifest, into place; at start-up
//! an entry without a readable manifest (a crash between the two) is removed, and every entry
//! kept is checked file by file against its manifest before its first use in the process
//! ([`verify`]).

use super::index::Place;
use crate::beneath;
use crate::fetch::InputTree;
use crate::materialise::remove_tree;
use crate::tamper::FileState;
use kiln_dataplane::store::layout::instance_dir_name;
use kiln_proto::reapi::Directory;
use kiln_proto::worker::{DirCacheDirectory, DirCacheManifest};
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, Hasher, InstanceName};
use prost::Message;
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The format this code writes and reads.
pub const FORMAT: &[u8] = b"kiln-dircache 1\n";

/// What an entry is charged per directory, besides its files' bytes (inodes and entries).
const PER_DIRECTORY: u64 = 4096;

/// The cache's directories.
#[derive(Debug, Clone)]
pub struct Dirs {
    root: PathBuf,
}

impl Dirs {
    /// The cache kept in `root`.
    pub fn new(root: &Path) -> Dirs {
        Dirs {
            root: root.to_path_buf(),
        }
    }

    fn sub(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The tree of entry `key`.
    pub fn entry(&self, key: &BlobKey) -> PathBuf {
        self.sub("entries").join(name(key))
    }

    /// Where a subtree inside an entry is.
    pub fn place(&self, place: &Place) -> PathBuf {
        self.entry(&place.entry).join(&place.rel)
    }

    fn manifest(&self, key: &BlobKey) -> PathBuf {
        self.sub("manifests").join(name(key))
    }

    /// A fresh path to build an entry at.
    pub fn build_path(&self) -> PathBuf {
        self.sub("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }
}

/// The file name of entry `key`.
fn name(key: &BlobKey) -> String {
    format!(
        "{}-{}-{}-{}",
        key.digest.function.name(),
        key.digest.hex(),
        key.digest.size,
        instance_dir_name(&key.instance)
    )
}

/// An entry as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The input root.
    pub key: BlobKey,
    /// What it is charged against the cap.
    pub bytes: u64,
    /// Every directory in it with its path below the root, root first.
    pub dirs: Vec<(BlobKey, PathBuf)>,
    /// Whether the cache can keep it: the worker must be able to read every directory and
    /// file of an entry to lay it out and check it, so a tree with a directory mode lacking
    /// the owner's read and search bits, or a file mode lacking the owner's read bit, is laid
    /// out without the cache.
    pub cacheable: bool,
}

/// Reads what an input tree holds, checking that its manifest is whole.
pub fn facts(m: &DirCacheManifest) -> Result<(Facts, HashMap<Digest, Directory>), String> {
    let instance = InstanceName::new(&m.instance_name).map_err(|e| e.to_string())?;
    let function = m.digest_function;
    DigestFunction::from_request(function, 64).map_err(|e| e.to_string())?;
    let root = Digest::from_proto_field(m.root.as_ref(), function).map_err(|e| e.to_string())?;
    let mut directories = HashMap::new();
    for d in &m.directories {
        let digest =
            Digest::from_proto_field(d.digest.as_ref(), function).map_err(|e| e.to_string())?;
        directories.insert(digest, d.directory.clone().unwrap_or_default());
    }
    let mut dirs = Vec::new();
    let mut files: HashSet<Digest> = HashSet::new();
    let mut cacheable = true;
    let mode = |p: &Option<kiln_proto::reapi::NodeProperties>| p.as_ref().and_then(|p| p.unix_mode);
    let mut queue = std::collections::VecDeque::from([(root, PathBuf::new())]);
    while let Some((digest, rel)) = queue.pop_front() {
        if rel.components().count() > kiln_reapi::tree::MAX_DEPTH {
            return Err("the tree is too deep".into());
        }
        let dir = directories
            .get(&digest)
            .ok_or_else(|| format!("directory {digest:?} is missing"))?;
        cacheable &= mode(&dir.node_properties).is_none_or(|m| m & 0o500 == 0o500);
        for f in &dir.files {
            cacheable &= mode(&f.node_properties).is_none_or(|m| m & 0o400 == 0o400);
            files.insert(
                Digest::from_proto_field(f.digest.as_ref(), function).map_err(|e| e.to_string())?,
            );
        }
        for sub in &dir.directories {
            let d = Digest::from_proto_field(sub.digest.as_ref(), function)
                .map_err(|e| e.to_string())?;
            if !kiln_reapi::tree::valid_name(&sub.name) {
                return Err(format!("bad name {:?}", sub.name));
            }
            queue.push_back((d, rel.join(&sub.name)));
        }
        dirs.push((BlobKey::new(instance.clone(), digest), rel));
    }
    let bytes = files
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.size))
        .saturating_add(PER_DIRECTORY.saturating_mul(dirs.len() as u64));
    Ok((
        Facts {
            key: BlobKey::new(instance, root),
            bytes,
            dirs,
            cacheable,
        },
        directories,
    ))
}

/// The manifest of an entry for `tree`.
pub fn manifest(instance: &InstanceName, function: i32, tree: &InputTree) -> DirCacheManifest {
    DirCacheManifest {
        instance_name: instance.as_str().to_string(),
        digest_function: function,
        root: Some(tree.root.to_proto()),
        directories: tree
            .directories
            .iter()
            .map(|(d, dir)| DirCacheDirectory {
                digest: Some(d.to_proto()),
                directory: Some(dir.clone()),
            })
            .collect(),
    }
}

/// Opens the cache at `dirs`: creates it, discards it when its format is not [`FORMAT`],
/// clears unfinished builds and removals, and returns the entries with their last use, oldest
/// first. Entries without a readable manifest are removed.
pub fn open(dirs: &Dirs) -> io::Result<Vec<Facts>> {
    std::fs::create_dir_all(&dirs.root)?;
    let format = dirs.sub("FORMAT");
    let known = std::fs::read(&format).is_ok_and(|f| f == FORMAT);
    if !known {
        tracing::info!(dir = %dirs.root.display(), "directory cache of another format or none: starting empty");
        for sub in ["entries", "manifests"] {
            remove_tree(&dirs.sub(sub))?;
        }
    }
    for sub in ["tmp", "trash"] {
        if let Err(e) = remove_tree(&dirs.sub(sub)) {
            // Left behind under a name of its own; the cache goes on without it.
            tracing::warn!(dir = %dirs.sub(sub).display(), error = %e, "cannot clear it; moving it aside");
            std::fs::rename(
                dirs.sub(sub),
                dirs.sub(&format!("{sub}.{}", uuid::Uuid::new_v4().simple())),
            )?;
        }
    }
    for sub in ["entries", "manifests", "tmp", "trash"] {
        std::fs::create_dir_all(dirs.sub(sub))?;
    }
    if !known {
        let temp = dirs.sub("tmp").join("FORMAT");
        std::fs::write(&temp, FORMAT)?;
        std::fs::rename(&temp, &format)?;
    }
    let mut found = Vec::new();
    let mut named = HashSet::new();
    for item in std::fs::read_dir(dirs.sub("manifests"))? {
        let item = item?;
        let file_name = item.file_name();
        let readable = std::fs::read(item.path())
            .ok()
            .and_then(|b| DirCacheManifest::decode(b.as_slice()).ok())
            .and_then(|m| facts(&m).ok())
            .filter(|(f, _)| OsStr::new(&name(&f.key)) == file_name)
            .filter(|(f, _)| dirs.entry(&f.key).is_dir());
        let used = item
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match readable {
            Some((f, _)) => {
                named.insert(file_name);
                found.push((used, f));
            }
            None => {
                tracing::warn!(manifest = %item.path().display(), "unreadable directory-cache manifest: entry removed");
                if let Err(e) = std::fs::remove_file(item.path()) {
                    tracing::warn!(manifest = %item.path().display(), error = %e, "cannot remove it");
                }
            }
        }
    }
    for item in std::fs::read_dir(dirs.sub("entries"))? {
        let item = item?;
        if !named.contains(&item.file_name()) {
            if let Err(e) = remove_tree(&item.path()) {
                tracing::warn!(entry = %item.path().display(), error = %e, "cannot remove a directory-cache entry without a manifest");
            }
        }
    }
    found.sort_by_key(|(used, _)| *used);
    Ok(found.into_iter().map(|(_, f)| f).collect())
}

/// Puts the tree built at `built` in place as entry `key` with manifest `m`.
pub fn install(dirs: &Dirs, key: &BlobKey, built: &Path, m: &DirCacheManifest) -> io::Result<()> {
    let temp = dirs.build_path().with_extension("manifest");
    std::fs::write(&temp, m.encode_to_vec())?;
    if let Err(e) = std::fs::rename(built, dirs.entry(key)) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&temp, dirs.manifest(key)) {
        // Not left in place without its manifest, where it would block the name.
        let _ = std::fs::remove_file(&temp);
        if let Ok(Some(trash)) = detach(dirs, key) {
            let _ = remove_tree(&trash);
        }
        return Err(e);
    }
    Ok(())
}

/// Deletes the manifest of entry `key`: a crash from now on leaves its tree without one,
/// which the next start removes (an evicted entry still leased keeps its tree until released).
pub fn forget_manifest(dirs: &Dirs, key: &BlobKey) -> io::Result<()> {
    match std::fs::remove_file(dirs.manifest(key)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Takes entry `key` out of the cache's names: its manifest deleted, its tree moved to the
/// trash, whose path is returned to be removed at leisure ([`remove_tree`]). Done while the
/// index is locked, so a new entry of the same name cannot be installed meanwhile.
pub fn detach(dirs: &Dirs, key: &BlobKey) -> io::Result<Option<PathBuf>> {
    forget_manifest(dirs, key)?;
    let trash = dirs
        .sub("trash")
        .join(uuid::Uuid::new_v4().simple().to_string());
    match std::fs::rename(dirs.entry(key), &trash) {
        Ok(()) => Ok(Some(trash)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether entry `key`'s tree has a file of content `d` (from its manifest; an unreadable
/// manifest counts as holding it).
pub fn holds(dirs: &Dirs, key: &BlobKey, d: &Digest) -> bool {
    let Some(m) = std::fs::read(dirs.manifest(key))
        .ok()
        .and_then(|b| DirCacheManifest::decode(b.as_slice()).ok())
    else {
        return true;
    };
    let wanted = d.to_proto();
    m.directories.iter().any(|dir| {
        dir.directory
            .as_ref()
            .is_some_and(|dir| dir.files.iter().any(|f| f.digest.as_ref() == Some(&wanted)))
    })
}

/// Records that entry `key` was used now (its manifest's mtime), for the order after a
/// restart.
pub fn touch(dirs: &Dirs, key: &BlobKey) {
    let now = filetime::FileTime::now();
    let _ = filetime::set_file_mtime(dirs.manifest(key), now);
}

/// The digest of the file at `rel` in entry `key`, from its manifest.
pub fn file_digest(dirs: &Dirs, key: &BlobKey, rel: &Path) -> Option<Digest> {
    let bytes = std::fs::read(dirs.manifest(key)).ok()?;
    let m = DirCacheManifest::decode(bytes.as_slice()).ok()?;
    let (facts, directories) = facts(&m).ok()?;
    let mut dir = directories.get(&facts.key.digest)?;
    let mut parts: Vec<&OsStr> = rel.iter().collect();
    let last = parts.pop()?;
    for part in parts {
        let node = dir
            .directories
            .iter()
            .find(|d| OsStr::new(&d.name) == part)?;
        dir = directories
            .get(&Digest::from_proto_field(node.digest.as_ref(), m.digest_function).ok()?)?;
    }
    let file = dir.files.iter().find(|f| OsStr::new(&f.name) == last)?;
    Digest::from_proto_field(file.digest.as_ref(), m.digest_function).ok()
}

/// Checks entry `key` against its manifest: every directory holds exactly the names its
/// `Directory` lists, each of the kind listed; every file has the listed content and no write
/// bit; every symlink the listed target.
pub fn verify(dirs: &Dirs, key: &BlobKey) -> Result<(), String> {
    let bytes = std::fs::read(dirs.manifest(key)).map_err(|e| e.to_string())?;
    let m = DirCacheManifest::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    let (facts, directories) = facts(&m)?;
    if &facts.key != key {
        return Err("the manifest is another entry's".into());
    }
    let function = m.digest_function;
    let fail = |what: &str, rel: &Path| format!("{}: {what}", rel.display());
    let mut hashed: HashMap<(u64, u64), Digest> = HashMap::new();
    let root = beneath::open_root(&dirs.entry(key)).map_err(|e| e.to_string())?;
    let mut stack = vec![(root, key.digest, PathBuf::new())];
    while let Some((fd, digest, rel)) = stack.pop() {
        let dir = directories
            .get(&digest)
            .ok_or_else(|| fail("not in the manifest", &rel))?;
        let mut expected: HashMap<OsString, beneath::Kind> = HashMap::new();
        let on_disk = beneath::list(&fd).map_err(|e| fail(&e.to_string(), &rel))?;
        if on_disk.len() != dir.files.len() + dir.directories.len() + dir.symlinks.len() {
            return Err(fail("holds other names than its Directory", &rel));
        }
        for (name, kind) in on_disk {
            expected.insert(name, kind);
        }
        for f in &dir.files {
            let want =
                Digest::from_proto_field(f.digest.as_ref(), function).map_err(|e| e.to_string())?;
            let name = OsStr::new(&f.name);
            let Some(beneath::Kind::File { mode, inode, .. }) = expected.get(name).copied() else {
                return Err(fail("not a file", &rel.join(name)));
            };
            // As the materialiser made it: read-only, executable as listed, or the listed
            // mode without write bits; the listed time.
            let listed = f.node_properties.as_ref();
            let want_mode = listed
                .and_then(|p| p.unix_mode)
                .map_or(if f.is_executable { 0o555 } else { 0o444 }, |m| m & 0o555);
            if mode != want_mode {
                return Err(fail(
                    &format!("mode {mode:o}, not {want_mode:o}"),
                    &rel.join(name),
                ));
            }
            if let Some(t) = listed.and_then(|p| p.mtime.as_ref()) {
                let st = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| fail(&e.to_string(), &rel.join(name)))?;
                if !same_time(&st, t) {
                    return Err(fail("modification time changed", &rel.join(name)));
                }
            }
            let got = match hashed.get(&inode) {
                Some(d) => *d,
                None => {
                    let file = beneath::open_file(&fd, name)
                        .map_err(|e| fail(&e.to_string(), &rel.join(name)))?;
                    let d = hash(want.function, file)
                        .map_err(|e| fail(&e.to_string(), &rel.join(name)))?;
                    hashed.insert(inode, d);
                    d
                }
            };
            if got != want {
                return Err(fail("content changed", &rel.join(name)));
            }
        }
        for s in &dir.symlinks {
            let name = OsStr::new(&s.name);
            if expected.get(name) != Some(&beneath::Kind::Symlink)
                || beneath::read_link(&fd, name).ok().as_deref() != Some(s.target.as_str())
            {
                return Err(fail("not the listed symlink", &rel.join(name)));
            }
        }
        for sub in &dir.directories {
            let name = OsStr::new(&sub.name);
            if expected.get(name) != Some(&beneath::Kind::Dir) {
                return Err(fail("not a directory", &rel.join(name)));
            }
            let d = Digest::from_proto_field(sub.digest.as_ref(), function)
                .map_err(|e| e.to_string())?;
            let child =
                beneath::open_dir(&fd, name).map_err(|e| fail(&e.to_string(), &rel.join(name)))?;
            stack.push((child, d, rel.join(name)));
        }
        // A directory's listed mode and time (others are whatever creating it gave).
        if let Some(p) = &dir.node_properties {
            let st = rustix::fs::fstat(&fd).map_err(|e| fail(&e.to_string(), &rel))?;
            #[allow(clippy::unnecessary_cast)]
            let mode = st.st_mode as u32 & 0o7777;
            if p.unix_mode.is_some_and(|m| m & 0o755 != mode) {
                return Err(fail("directory mode changed", &rel));
            }
            if p.mtime.as_ref().is_some_and(|t| !same_time(&st, t)) {
                return Err(fail("directory modification time changed", &rel));
            }
        }
    }
    Ok(())
}

/// Whether `st`'s modification time is `t` (as the materialiser sets it: negative nanoseconds
/// as zero).
#[allow(clippy::unnecessary_cast)]
fn same_time(st: &rustix::fs::Stat, t: &prost_types::Timestamp) -> bool {
    st.st_mtime as i64 == t.seconds && st.st_mtime_nsec as i64 == t.nanos.max(0) as i64
}

fn hash(function: DigestFunction, mut file: std::fs::File) -> io::Result<Digest> {
    use std::io::Read;
    let mut hasher = Hasher::new(function);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size = size.saturating_add(n as u64);
        hasher.update(&buf[..n]);
    }
    Ok(Digest {
        function,
        hash: hasher.finalize(),
        size,
    })
}

/// What [`link_tree`] reports of each file it linked.
pub struct Linked<'a> {
    /// The file in the source tree.
    pub source: &'a Path,
    /// Its state when linked; for a copy, the copy's.
    pub state: FileState,
    /// Whether the destination is a copy (a link was impossible) rather than the same inode.
    pub copied: bool,
}

/// Lays out the tree at `src` in the empty directory `dst`: directories made (with the
/// source's mode and modification time), files hardlinked (copied where a link is
/// impossible), symlinks made with the same target. `linked` hears of every file.
pub fn link_tree(src: &Path, dst: &Path, linked: &mut dyn FnMut(Linked<'_>)) -> io::Result<()> {
    let from = beneath::open_root(src)?;
    let to = beneath::open_root(dst)?;
    let mut path = src.to_path_buf();
    link_below(&from, &to, &mut path, 0, linked)?;
    copy_dir_attributes(&from, &to)
}

fn link_below(
    from: &OwnedFd,
    to: &OwnedFd,
    path: &mut PathBuf,
    depth: usize,
    linked: &mut dyn FnMut(Linked<'_>),
) -> io::Result<()> {
    if depth > kiln_reapi::tree::MAX_DEPTH {
        return Err(io::Error::other(
            "directory-cache entry deeper than the tree limit",
        ));
    }
    let mut names = Vec::new();
    let mut listing = rustix::fs::Dir::read_from(from)?;
    while let Some(item) = listing.read() {
        let item = item?;
        let name = OsStr::from_bytes(item.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push((name.to_os_string(), item.file_type()));
        }
    }
    for (name, file_type) in names {
        let st = rustix::fs::statat(from, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        let kind = match file_type {
            FileType::Unknown => FileType::from_raw_mode(st.st_mode as _),
            known => known,
        };
        match kind {
            FileType::Directory => {
                rustix::fs::mkdirat(to, &name, Mode::from_raw_mode(0o755))?;
                let sub_from = beneath::open_dir(from, &name)?;
                let sub_to = beneath::open_dir(to, &name)?;
                path.push(&name);
                let r = link_below(&sub_from, &sub_to, path, depth + 1, linked);
                path.pop();
                r?;
                copy_dir_attributes(&sub_from, &sub_to)?;
            }
            FileType::RegularFile => {
                let copied = match rustix::fs::linkat(from, &name, to, &name, AtFlags::empty()) {
                    Ok(()) => false,
                    Err(
                        rustix::io::Errno::MLINK
                        | rustix::io::Errno::XDEV
                        | rustix::io::Errno::PERM,
                    ) => {
                        copy_file(from, to, &name, &st)?;
                        true
                    }
                    Err(e) => return Err(e.into()),
                };
                // A copy is a file of its own: its state is the copy's.
                let st = if copied {
                    rustix::fs::statat(to, &name, AtFlags::SYMLINK_NOFOLLOW)?
                } else {
                    st
                };
                path.push(&name);
                linked(Linked {
                    source: path,
                    state: state_of(&st),
                    copied,
                });
                path.pop();
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(from, &name, Vec::new())?;
                rustix::fs::symlinkat(target.as_c_str(), to, &name)?;
            }
            _ => {
                return Err(io::Error::other(format!(
                    "{}: not a file, directory or symlink",
                    path.join(&name).display()
                )))
            }
        }
    }
    Ok(())
}

/// The tamper check's view of a file from its `stat`.
#[allow(clippy::unnecessary_cast)]
fn state_of(st: &rustix::fs::Stat) -> FileState {
    FileState {
        inode: (st.st_dev as u64, st.st_ino as u64),
        len: st.st_size as u64,
        modified: time(st.st_mtime as i64, st.st_mtime_nsec as i64),
        mode: st.st_mode as u32 & 0o7777,
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = nanos.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(secs.unsigned_abs())
            + std::time::Duration::from_nanos(nanos as u64)
    }
}

/// Gives `to` the permission bits and modification time of `from`.
fn copy_dir_attributes(from: &OwnedFd, to: &OwnedFd) -> io::Result<()> {
    let st = rustix::fs::fstat(from)?;
    #[allow(clippy::unnecessary_cast)]
    let mode = st.st_mode as u32 & 0o7777;
    if mode != 0o755 {
        rustix::fs::fchmod(to, Mode::from_raw_mode(mode as _))?;
    }
    set_times(to, &st)
}

fn set_times(fd: impl AsFd, st: &rustix::fs::Stat) -> io::Result<()> {
    let at = |secs, nanos| Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: at(st.st_atime as _, st.st_atime_nsec as _),
            last_modification: at(st.st_mtime as _, st.st_mtime_nsec as _),
        },
    )?;
    Ok(())
}

/// A copy of the file `name` from `from` to `to`, with its mode and modification time (where
/// a hardlink is impossible: another filesystem, or the inode's link count at its limit).
fn copy_file(from: &OwnedFd, to: &OwnedFd, name: &OsStr, st: &rustix::fs::Stat) -> io::Result<()> {
    let mut src = beneath::open_file(from, name)?;
    let fd = rustix::fs::openat(
        to,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut dst = std::fs::File::from(fd);
    std::io::copy(&mut src, &mut dst)?;
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fchmod(&dst, Mode::from_raw_mode((st.st_mode as u32 & 0o555) as _))?;
    set_times(&dst, st)
}
