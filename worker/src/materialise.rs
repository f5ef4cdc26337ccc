//! Laying out an input tree in a fresh directory: files hardlinked from the local CAS (whose
//! files are read-only), executables from a cache of read-only executable copies (a hardlink
//! shares its mode, so one inode cannot be both), files with mode or mtime node properties as
//! their own copies (a clone where the filesystem can), symlinks verbatim.

use crate::beneath;
use crate::dircache::{disk, DirCache, Lease};
use crate::error::{io, ActionError};
use crate::fetch::InputTree;
use crate::tamper::{Origin, SharedFiles};
use bytes::Bytes;
use kiln_dataplane::store::clone::clone_or_copy;
use kiln_proto::reapi::{Directory, NodeProperties};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const READ_ONLY: u32 = 0o444;
const EXECUTABLE: u32 = 0o555;
const DIRECTORY: u32 = 0o755;

/// Reads a blob kept outside files (see [`Materialiser::blob_bytes`]).
pub type BlobBytes<'a> = dyn Fn(Digest) -> Result<Option<Bytes>, ActionError> + Sync + 'a;

/// Where materialisation gets its files.
pub struct Materialiser<'a> {
    /// The path of a blob in the local CAS.
    pub blob_path: &'a (dyn Fn(Digest) -> PathBuf + Sync),
    /// The bytes of a blob the local CAS keeps no file of (a small-blob log), which is
    /// copied rather than linked: `Ok(None)` for a blob it keeps as a file.
    pub blob_bytes: Option<&'a BlobBytes<'a>>,
    /// Read-only executable copies, shared by actions (on the work directory's filesystem).
    pub exec_cache: &'a Path,
    /// The digest function of the tree.
    pub function: i32,
    /// A directory cache whose subtrees are linked in whole, and the tree's instance.
    pub cache: Option<(&'a Arc<DirCache>, &'a InstanceName)>,
}

/// Lays out the directory-cache tree at `src` (of entry `entry`, leased) in the empty
/// directory `dst`, recording the files it shares with the entry. When that fails (the entry
/// is damaged or unreadable), the entry is evicted, `dst` is emptied again and `false`
/// returned: the caller lays the tree out from the CAS instead.
pub fn link_from_cache(
    cache: &DirCache,
    src: &Path,
    dst: &Path,
    entry: &BlobKey,
    shared: &mut SharedFiles,
) -> Result<bool, ActionError> {
    let mark = shared.mark();
    let result = disk::link_tree(src, dst, &mut |l| {
        if l.copied {
            shared.record_made_inode(l.state.inode);
        } else {
            shared.record_linked(l.source, Origin::DirCache(entry.clone()), l.state);
        }
    });
    match result {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(entry = ?entry, error = %e, "cannot lay out a directory-cache entry: evicted");
            shared.undo(mark);
            cache.evict(entry);
            remove_tree(dst).map_err(io("clear", dst))?;
            std::fs::create_dir(dst).map_err(io("create directory", dst))?;
            Ok(false)
        }
    }
}

/// Checks one directory of the tree (names, duplicates, symlink targets) before anything of
/// it is created; `root` is the input root, `path` the directory's place below it.
fn check(dir: &Directory, root: &Path, path: &Path) -> Result<(), ActionError> {
    let below = path.strip_prefix(root).unwrap_or(Path::new(""));
    kiln_reapi::tree::check_directory(dir, below.components().count(), &below.to_string_lossy())
        .map_err(|e| ActionError::BadInput(format!("input tree: {e}")))
}

impl Materialiser<'_> {
    /// Lays out `tree` under `root` (which exists and is empty); returns the files it shares
    /// with the stores by hardlink, to be checked once the action has run, and the leases on
    /// the directory-cache entries it linked subtrees from (held while the action runs).
    pub fn materialise(
        &self,
        tree: &InputTree,
        root: &Path,
    ) -> Result<(SharedFiles, Vec<Lease>), ActionError> {
        let mut shared = SharedFiles::default();
        let mut leases = Vec::new();
        if let Some(lease) = self.reuse(tree.root, root, &mut shared)? {
            leases.push(lease);
            return Ok((shared, leases));
        }
        let mut stack: Vec<(Digest, PathBuf)> = vec![(tree.root, root.to_path_buf())];
        let mut with_properties: Vec<(PathBuf, NodeProperties)> = Vec::new();
        while let Some((digest, path)) = stack.pop() {
            let dir: &Directory = tree.directories.get(&digest).ok_or_else(|| {
                ActionError::BadInput(format!("directory {digest:?} is missing from the tree"))
            })?;
            check(dir, root, &path)?;
            for f in &dir.files {
                let d = Digest::from_proto_field(f.digest.as_ref(), self.function)
                    .map_err(|e| ActionError::BadInput(e.to_string()))?;
                self.file(
                    d,
                    f.is_executable,
                    f.node_properties.as_ref(),
                    &path.join(&f.name),
                    &mut shared,
                )?;
            }
            for s in &dir.symlinks {
                let link = path.join(&s.name);
                std::os::unix::fs::symlink(&s.target, &link).map_err(io("symlink", &link))?;
            }
            for sub in &dir.directories {
                let d = Digest::from_proto_field(sub.digest.as_ref(), self.function)
                    .map_err(|e| ActionError::BadInput(e.to_string()))?;
                let child = path.join(&sub.name);
                std::fs::create_dir(&child).map_err(io("create directory", &child))?;
                match self.reuse(d, &child, &mut shared)? {
                    Some(lease) => leases.push(lease),
                    None => stack.push((d, child)),
                }
            }
            if let Some(p) = &dir.node_properties {
                with_properties.push((path, p.clone()));
            }
        }
        // Directory modes and times last: creating entries inside would change them.
        for (path, p) in with_properties.into_iter().rev() {
            apply(&path, &p, DIRECTORY)?;
        }
        Ok((shared, leases))
    }

    /// Links the directory `d` in whole into `dst` when an entry of the cache holds it.
    fn reuse(
        &self,
        d: Digest,
        dst: &Path,
        shared: &mut SharedFiles,
    ) -> Result<Option<Lease>, ActionError> {
        let Some((cache, instance)) = self.cache else {
            return Ok(None);
        };
        let Some((lease, place)) = cache.lease_subtree(&BlobKey::new(instance.clone(), d)) else {
            return Ok(None);
        };
        if !link_from_cache(cache, &cache.dirs().place(&place), dst, lease.key(), shared)? {
            return Ok(None);
        }
        Ok(Some(lease))
    }

    fn file(
        &self,
        d: Digest,
        executable: bool,
        props: Option<&NodeProperties>,
        dst: &Path,
        shared: &mut SharedFiles,
    ) -> Result<(), ActionError> {
        let mode = if executable { EXECUTABLE } else { READ_ONLY };
        let has_props = props.is_some_and(|p| p.unix_mode.is_some() || p.mtime.is_some());
        if d.is_empty_blob() {
            std::fs::write(dst, b"").map_err(io("create", dst))?;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
                .map_err(io("chmod", dst))?;
        } else if let Some(data) = self.bytes_of(d)? {
            write_new(dst, &data)?;
        } else if has_props {
            clone_or_copy(&(self.blob_path)(d), dst).map_err(io("copy", dst))?;
        } else {
            let (mut source, origin) = if executable {
                (self.exec_copy(d)?, Origin::ExecCache)
            } else {
                ((self.blob_path)(d), Origin::Cas)
            };
            // A source dropped under us (another action wrote to it): an executable copy is
            // made again; a CAS blob is missing, which the client answers by uploading it.
            let placed = match (link_or_copy(&source, dst, mode)?, &origin) {
                (Placed::SourceGone, Origin::ExecCache) => {
                    source = self.exec_copy(d)?;
                    link_or_copy(&source, dst, mode)?
                }
                (placed, _) => placed,
            };
            match placed {
                Placed::Linked => shared.record(&source, d, origin),
                Placed::Copied => shared.record_made(dst),
                Placed::SourceGone => return Err(ActionError::MissingInputs(vec![d])),
            }
            return Ok(());
        }
        shared.record_made(dst);
        match props {
            Some(p) if has_props => apply(dst, p, mode),
            _ => std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
                .map_err(io("chmod", dst)),
        }
    }

    /// The bytes of `d` when the CAS keeps no file of it.
    fn bytes_of(&self, d: Digest) -> Result<Option<Bytes>, ActionError> {
        match self.blob_bytes {
            Some(read) => read(d),
            None => Ok(None),
        }
    }

    /// The shared read-only executable copy of a blob, created on first use.
    fn exec_copy(&self, d: Digest) -> Result<PathBuf, ActionError> {
        let path = self.exec_cache.join(format!("{}-{}", d.hex(), d.size));
        if path.exists() {
            return Ok(path);
        }
        let temp = self
            .exec_cache
            .join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        clone_or_copy(&(self.blob_path)(d), &temp).map_err(io("copy", &temp))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(EXECUTABLE))
            .map_err(io("chmod", &temp))?;
        std::fs::rename(&temp, &path).map_err(io("rename", &path))?;
        Ok(path)
    }
}

/// Creates `dst` (which must not exist) holding `data`.
fn write_new(dst: &Path, data: &[u8]) -> Result<(), ActionError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .and_then(|mut f| f.write_all(data))
        .map_err(io("create", dst))
}

/// How [`link_or_copy`] placed a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// A hardlink: the file is shared with its store.
    Linked,
    /// A copy of its own.
    Copied,
    /// The source does not exist.
    SourceGone,
}

/// Hardlinks `source` to `dst`; copies when a link is impossible (another filesystem, or the
/// inode's link count is at its limit), giving the copy `mode`.
fn link_or_copy(source: &Path, dst: &Path, mode: u32) -> Result<Placed, ActionError> {
    match std::fs::hard_link(source, dst) {
        Ok(()) => Ok(Placed::Linked),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Placed::SourceGone),
        Err(_) => {
            clone_or_copy(source, dst).map_err(io("copy", dst))?;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
                .map_err(io("chmod", dst))?;
            Ok(Placed::Copied)
        }
    }
}

/// Sets a node's mode (or `default_mode`) and mtime. The mode never carries setuid, setgid
/// or sticky bits, and a file's never write bits: inputs are read-only to the action.
fn apply(path: &Path, p: &NodeProperties, default_mode: u32) -> Result<(), ActionError> {
    // No write bits for others on a directory either: another action (the same user with
    // `run_as_user`) must not be able to change this one's tree while the worker works in it.
    let allowed = if default_mode == DIRECTORY {
        0o755
    } else {
        0o555
    };
    let mode = p.unix_mode.map_or(default_mode, |m| m & allowed);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    if let Some(t) = &p.mtime {
        let ft = filetime::FileTime::from_unix_time(t.seconds, t.nanos.max(0) as u32);
        filetime::set_symlink_file_times(path, ft, ft).map_err(io("set times", path))?;
    }
    Ok(())
}

/// Deletes a directory tree, first making read-only directories writable.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
    }
}

/// Makes the directories of a tree writable, by handle (never through a symlink a process of
/// the action may have put in a directory's place: it would make the worker chmod its target),
/// and readable again where an action took that away (`chmod 000`).
fn make_writable(path: &Path) {
    let _ = beneath::each_directory_forcing(path, &mut |dir| {
        let _ = rustix::fs::fchmod(dir, rustix::fs::Mode::from_raw_mode(0o755));
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};
    use kiln_reapi::digest::DigestFunction;
    use prost::Message;
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;

    /// Takes from this thread the capabilities that let root read and change what it does
    /// not own or may not read (capabilities are per thread), so that it acts as a worker not
    /// run as root; a no-op for a process that has none.
    fn act_as_an_unprivileged_worker() {
        use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
        let mut caps = capabilities(None).unwrap();
        caps.effective.remove(
            CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH | CapabilitySet::FOWNER,
        );
        set_capabilities(None, caps).unwrap();
    }

    /// An action that locked a directory with contents (`chmod 000`, as tests of permission
    /// errors do) leaves a tree a worker not run as root can still take apart (it used to
    /// fail, leaking the tree and stopping the worker's next start).
    #[test]
    fn a_locked_directory_is_removed_by_a_worker_not_run_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("action");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/f"), b"x").unwrap();
        std::fs::set_permissions(root.join("d/e"), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::set_permissions(root.join("d"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let at = root.clone();
        std::thread::spawn(move || {
            act_as_an_unprivileged_worker();
            assert!(
                std::fs::read_dir(at.join("d")).is_err(),
                "locked for this thread"
            );
            remove_tree(&at).unwrap();
            assert!(!at.exists());
        })
        .join()
        .unwrap();
    }

    /// A tree of the one directory `top`.
    fn one_directory(top: Directory) -> InputTree {
        let d = Digest::of(DigestFunction::Sha256, &top.encode_to_vec());
        InputTree {
            root: d,
            directories: HashMap::from([(d, top)]),
        }
    }

    fn node(name: &str, d: Digest, exec: bool, props: Option<NodeProperties>) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(d.to_proto()),
            is_executable: exec,
            node_properties: props,
        }
    }

    #[test]
    fn links_copies_modes_times_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let cas = dir.path().join("cas");
        let exec_cache = dir.path().join("exec");
        let root = dir.path().join("root");
        for d in [&cas, &exec_cache, &root] {
            std::fs::create_dir(d).unwrap();
        }
        let f = DigestFunction::Sha256;
        let put = |data: &[u8]| {
            let d = Digest::of(f, data);
            let p = cas.join(d.hex());
            std::fs::write(&p, data).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(READ_ONLY)).unwrap();
            d
        };
        let (text, tool, stamped) = (put(b"text"), put(b"#!/bin/sh\n"), put(b"stamped"));
        let empty = Digest::of(f, b"");
        let sub = Directory {
            files: vec![
                node("tool", tool, true, None),
                node("text-again", text, false, None),
            ],
            ..Default::default()
        };
        let sub_digest = Digest::of(f, &sub.encode_to_vec());
        let props = NodeProperties {
            properties: vec![],
            mtime: Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
            unix_mode: Some(0o4764),
        };
        let top = Directory {
            files: vec![
                node("text", text, false, None),
                node("empty", empty, false, None),
                node("stamped", stamped, false, Some(props)),
            ],
            directories: vec![DirectoryNode {
                name: "sub".into(),
                digest: Some(sub_digest.to_proto()),
            }],
            symlinks: vec![SymlinkNode {
                name: "link".into(),
                target: "sub/tool".into(),
                node_properties: None,
            }],
            ..Default::default()
        };
        let top_digest = Digest::of(f, &top.encode_to_vec());
        let tree = InputTree {
            root: top_digest,
            directories: HashMap::from([(top_digest, top), (sub_digest, sub)]),
        };
        let blob_path = |d: Digest| cas.join(d.hex());
        let shared = Materialiser {
            blob_path: &blob_path,
            blob_bytes: None,
            exec_cache: &exec_cache,
            function: 1,
            cache: None,
        }
        .materialise(&tree, &root)
        .unwrap()
        .0;
        assert_eq!(
            shared.len(),
            2,
            "the CAS file of `text` and the executable copy of `tool` are shared"
        );
        let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        // Plain files share the CAS inode, read-only.
        assert_eq!(
            meta("text").ino(),
            std::fs::metadata(cas.join(text.hex())).unwrap().ino()
        );
        assert_eq!(meta("sub/text-again").ino(), meta("text").ino());
        assert_eq!(meta("text").mode() & 0o777, READ_ONLY);
        // Executables come from the executable cache, not the CAS inode.
        assert_eq!(meta("sub/tool").mode() & 0o777, EXECUTABLE);
        assert_ne!(
            meta("sub/tool").ino(),
            std::fs::metadata(cas.join(tool.hex())).unwrap().ino()
        );
        assert_eq!(
            std::fs::metadata(cas.join(tool.hex())).unwrap().mode() & 0o777,
            READ_ONLY,
            "CAS copy untouched"
        );
        // Node properties: own copy with the given mode and mtime.
        // setuid and the write bits are dropped: inputs are read-only and never setuid.
        assert_eq!(meta("stamped").mode() & 0o7777, 0o544);
        assert_eq!(meta("stamped").mtime(), 1_000_000_000);
        assert_ne!(
            meta("stamped").ino(),
            std::fs::metadata(cas.join(stamped.hex())).unwrap().ino()
        );
        assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
        // Files the worker made for this action alone count as its inputs too (an output may
        // be one of them with `run_as_user`).
        let inodes = shared.inodes();
        for made in ["empty", "stamped", "text"] {
            let m = meta(made);
            assert!(inodes.contains(&(m.dev(), m.ino())), "{made}");
        }
        assert_eq!(
            std::fs::read_link(root.join("link")).unwrap(),
            Path::new("sub/tool")
        );
        // Clean-up copes with read-only entries.
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn no_input_directory_is_writable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let props = NodeProperties {
            properties: vec![],
            mtime: None,
            unix_mode: Some(0o1777),
        };
        apply(dir.path(), &props, DIRECTORY).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn a_cas_file_gone_is_a_missing_input() {
        let dir = tempfile::tempdir().unwrap();
        let f = DigestFunction::Sha256;
        let gone = Digest::of(f, b"evicted or dropped");
        let top = Directory {
            files: vec![node("in", gone, false, None)],
            ..Default::default()
        };
        let tree = one_directory(top);
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let blob_path = |d: Digest| dir.path().join(d.hex());
        let r = Materialiser {
            blob_path: &blob_path,
            blob_bytes: None,
            exec_cache: dir.path(),
            function: 1,
            cache: None,
        }
        .materialise(&tree, &root);
        assert!(
            matches!(&r, Err(ActionError::MissingInputs(m)) if m == &vec![gone]),
            "{r:?}"
        );
    }

    /// Blobs a small-blob log holds have no file to link: their bytes are copied, with the
    /// modes and properties a linked file gets, and counted as files made for the action.
    #[test]
    fn blobs_kept_outside_files_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let f = DigestFunction::Sha256;
        let (text, tool) = (b"small text".to_vec(), b"#!/bin/sh\necho".to_vec());
        let (text_d, tool_d) = (Digest::of(f, &text), Digest::of(f, &tool));
        let stamped = NodeProperties {
            properties: vec![],
            mtime: None,
            unix_mode: Some(0o640),
        };
        let top = Directory {
            files: vec![
                node("text", text_d, false, None),
                node("tool", tool_d, true, None),
                node("stamped", text_d, false, Some(stamped)),
            ],
            ..Default::default()
        };
        let tree = one_directory(top);
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // No file of either exists where the CAS would keep one.
        let blob_path = |d: Digest| dir.path().join(d.hex());
        let bytes = |d: Digest| -> Result<Option<Bytes>, ActionError> {
            match d {
                d if d == text_d => Ok(Some(Bytes::from(text.clone()))),
                d if d == tool_d => Ok(Some(Bytes::from(tool.clone()))),
                d => Err(ActionError::MissingInputs(vec![d])),
            }
        };
        let (shared, _) = Materialiser {
            blob_path: &blob_path,
            blob_bytes: Some(&bytes),
            exec_cache: dir.path(),
            function: 1,
            cache: None,
        }
        .materialise(&tree, &root)
        .unwrap();
        let mode = |name: &str| std::fs::metadata(root.join(name)).unwrap().mode() & 0o7777;
        assert_eq!(std::fs::read(root.join("text")).unwrap(), text);
        assert_eq!(std::fs::read(root.join("tool")).unwrap(), tool);
        // Write bits are taken off a given mode, as for every input file.
        assert_eq!(
            (mode("text"), mode("tool"), mode("stamped")),
            (0o444, 0o555, 0o440)
        );
        let inodes = shared.inodes();
        for made in ["text", "tool", "stamped"] {
            let m = std::fs::metadata(root.join(made)).unwrap();
            assert!(inodes.contains(&(m.dev(), m.ino())), "{made}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing cached"
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = |name: &str, target: &str| SymlinkNode {
            name: name.into(),
            target: target.into(),
            node_properties: None,
        };
        let mut bad_trees: Vec<Directory> = ["..", "a/b", "", "."]
            .iter()
            .map(|bad| Directory {
                symlinks: vec![link(bad, "x")],
                ..Default::default()
            })
            .collect();
        // Links out of the input root, and a name used twice.
        bad_trees.push(Directory {
            symlinks: vec![link("up", "../outside")],
            ..Default::default()
        });
        bad_trees.push(Directory {
            symlinks: vec![link("etc", "/etc")],
            ..Default::default()
        });
        bad_trees.push(Directory {
            symlinks: vec![link("twice", "x"), link("twice", "y")],
            ..Default::default()
        });
        for top in bad_trees {
            let bad = format!("{top:?}");
            let tree = one_directory(top);
            let blob_path = |d: Digest| dir.path().join(d.hex());
            let r = Materialiser {
                blob_path: &blob_path,
                blob_bytes: None,
                exec_cache: dir.path(),
                function: 1,
                cache: None,
            }
            .materialise(&tree, dir.path());
            assert!(matches!(r, Err(ActionError::BadInput(_))), "{bad:?}");
        }
    }
}
