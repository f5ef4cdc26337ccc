//! Collecting an action's outputs after it ran: files (with their executable bit),
//! directories (as `Tree` messages, and as `Directory` blobs when the Command asks), and
//! symlinks — from `output_paths`, or the older `output_files`/`output_directories`. Returns the
//! ActionResult fields and the blobs to store.

use crate::error::{io, ActionError};
use crate::local::hash_path;
use bytes::Bytes;
use kiln_dataplane::store::clone::clone_or_copy_from;
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    ActionResult, Command, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use kiln_reapi::digest::{Digest, DigestFunction};
use kiln_reapi::paths;
use prost::Message;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A blob an output consists of.
#[derive(Debug, Clone)]
pub enum Blob {
    /// A file in the action directory.
    File(PathBuf),
    /// Bytes (Tree and Directory messages).
    Bytes(Bytes),
}

/// The output part of an ActionResult, and what must be stored for it.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The ActionResult, without exit code, stdout/stderr and metadata.
    pub result: ActionResult,
    /// Every blob it references, by digest.
    pub blobs: HashMap<Digest, Blob>,
}

/// Private copies of output files, made before they are hashed: the bytes stored are the
/// bytes hashed, whatever happens to the action's own files afterwards (a copy is a new
/// inode no action process ever had open; where the filesystem can, it is a clone and costs
/// no data copy).
pub struct Staging {
    dir: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

impl Staging {
    /// Stages into `dir` (created now, and refused if anything is already there: a symlink
    /// the action left in its place must not take the copies elsewhere; removed with the
    /// action's directory).
    pub fn new(dir: PathBuf) -> Result<Staging, ActionError> {
        std::fs::create_dir(&dir).map_err(io("create", &dir))?;
        Ok(Staging {
            dir,
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Fixes the bytes of `file` and hashes them: a file up to [`IN_MEMORY`] is read into
    /// memory (one read; those bytes are what is hashed and stored), a larger one is copied
    /// (cloned where the filesystem can) into the staging directory and the copy is hashed.
    pub async fn fix(
        &self,
        function: DigestFunction,
        file: &Path,
    ) -> Result<(Digest, Blob), ActionError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy = self.dir.join(n.to_string());
        let from = file.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<(Digest, Blob)> {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            // Not through a symlink, and without blocking on a FIFO or a device the action
            // left in place of a file: only a regular file is an output file.
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&from)?;
            let meta = f.metadata()?;
            if !meta.is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file (a FIFO, socket or device is not an output)",
                ));
            }
            let len = meta.len();
            if len <= IN_MEMORY {
                // Bounded even if the file grew since: no process of the action is alive.
                let mut bytes = Vec::with_capacity(len as usize);
                f.by_ref().take(IN_MEMORY).read_to_end(&mut bytes)?;
                let bytes = Bytes::from(bytes);
                return Ok((Digest::of(function, &bytes), Blob::Bytes(bytes)));
            }
            // From the handle checked above, not the path again (which the action's
            // processes could have swapped for a symlink meanwhile).
            clone_or_copy_from(&f, &copy)?;
            drop(f);
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o444))?;
            Ok((hash_path(function, &copy)?, Blob::File(copy)))
        })
        .await
        .map_err(|e| ActionError::io("copy", file, std::io::Error::other(e)))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => {
                ActionError::BadInput(format!("output {}: {e}", file.display()))
            }
            _ => ActionError::io("copy", file, e),
        })
    }
}

/// Outputs up to this size are read into memory rather than copied to a file.
pub const IN_MEMORY: u64 = 1 << 20;

/// The path below `root` of an output's components, if it exists, without following a
/// symlink in any parent (the action may have replaced a directory with a link to anywhere).
fn locate(root: &Path, components: &[String], rel: &str) -> Result<Option<PathBuf>, ActionError> {
    let mut path = root.to_path_buf();
    let (last, parents) = match components.split_last() {
        Some(split) => split,
        // "" from the input root: the root itself.
        None => return Ok(Some(path)),
    };
    for c in parents {
        path.push(c);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ActionError::BadInput(format!(
                    "output path {rel:?}: {} is a symlink; output paths are not followed through symlinks",
                    path.strip_prefix(root).unwrap_or(&path).display()
                )))
            }
            Ok(m) if m.is_dir() => {}
            _ => return Ok(None),
        }
    }
    path.push(last);
    Ok(Some(path))
}

/// Collects the outputs the Command declares (relative to its working directory, itself
/// below `root`), each file staged in `staging` before it is hashed.
pub async fn collect(
    command: &Command,
    root: &Path,
    function: DigestFunction,
    staging: &Staging,
) -> Result<Outputs, ActionError> {
    let mut out = Outputs::default();
    let format = OutputDirectoryFormat::try_from(command.output_directory_format)
        .unwrap_or(OutputDirectoryFormat::TreeOnly);
    #[allow(deprecated)]
    let (legacy_files, legacy_dirs) = (&command.output_files, &command.output_directories);
    let modern = !command.output_paths.is_empty();
    let declared: Vec<(&String, Kind)> = if modern {
        command
            .output_paths
            .iter()
            .map(|p| (p, Kind::Any))
            .collect()
    } else {
        legacy_files
            .iter()
            .map(|p| (p, Kind::File))
            .chain(legacy_dirs.iter().map(|p| (p, Kind::Directory)))
            .collect()
    };
    let wd = paths::relative("Command.working_directory", &command.working_directory)
        .map_err(|e| ActionError::BadInput(e.to_string()))?;
    for (rel, kind) in declared {
        let components =
            paths::output(&wd, rel).map_err(|e| ActionError::BadInput(e.to_string()))?;
        let Some(path) = locate(root, &components, rel)? else {
            continue;
        };
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io("read link", &path))?;
            let symlink = OutputSymlink {
                path: rel.clone(),
                target: target.to_string_lossy().into_owned(),
                node_properties: None,
            };
            #[allow(deprecated)]
            match kind {
                Kind::File => out.result.output_file_symlinks.push(symlink.clone()),
                Kind::Directory => out.result.output_directory_symlinks.push(symlink.clone()),
                Kind::Any => {}
            }
            out.result.output_symlinks.push(symlink);
        } else if meta.is_dir() {
            if kind == Kind::File {
                return Err(ActionError::BadInput(format!(
                    "output file {rel:?} is a directory"
                )));
            }
            let (tree, root_digest) = tree(
                &path,
                function,
                &mut out,
                format != OutputDirectoryFormat::TreeOnly,
                staging,
            )
            .await?;
            let bytes = Bytes::from(tree.encode_to_vec());
            let tree_digest = Digest::of(function, &bytes);
            out.blobs.insert(tree_digest, Blob::Bytes(bytes));
            out.result.output_directories.push(OutputDirectory {
                path: rel.clone(),
                tree_digest: (format != OutputDirectoryFormat::DirectoryOnly)
                    .then(|| tree_digest.to_proto()),
                is_topologically_sorted: false,
                root_directory_digest: (format != OutputDirectoryFormat::TreeOnly)
                    .then(|| root_digest.to_proto()),
            });
        } else {
            if kind == Kind::Directory {
                return Err(ActionError::BadInput(format!(
                    "output directory {rel:?} is a file"
                )));
            }
            let (digest, blob) = staging.fix(function, &path).await?;
            out.blobs.insert(digest, blob);
            out.result.output_files.push(OutputFile {
                path: rel.clone(),
                digest: Some(digest.to_proto()),
                is_executable: meta.permissions().mode() & 0o111 != 0,
                contents: Bytes::new(),
                node_properties: None,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Directory,
    Any,
}

/// Builds the Tree of a directory (children deduplicated), adding file blobs — and with
/// `directory_blobs`, each Directory message — to `out`. Returns the Tree and the root's digest.
async fn tree(
    root: &Path,
    function: DigestFunction,
    out: &mut Outputs,
    directory_blobs: bool,
    staging: &Staging,
) -> Result<(Tree, Digest), ActionError> {
    let mut children: HashMap<Digest, Directory> = HashMap::new();
    let root_dir = directory(root, function, out, &mut children, staging).await?;
    let root_bytes = root_dir.encode_to_vec();
    let root_digest = Digest::of(function, &root_bytes);
    if directory_blobs {
        out.blobs
            .insert(root_digest, Blob::Bytes(root_bytes.into()));
        for child in children.values() {
            let bytes = child.encode_to_vec();
            out.blobs
                .insert(Digest::of(function, &bytes), Blob::Bytes(bytes.into()));
        }
    }
    let mut list: Vec<(Digest, Directory)> = children.into_iter().collect();
    list.sort_by_key(|(d, _)| *d);
    Ok((
        Tree {
            root: Some(root_dir),
            children: list.into_iter().map(|(_, d)| d).collect(),
        },
        root_digest,
    ))
}

/// A directory being built: its path, its entries once read, its message so far.
type Pending = (PathBuf, Option<Vec<(String, std::fs::Metadata)>>, Directory);

/// One directory's message, recursing into subdirectories (iteratively, deepest first).
async fn directory(
    path: &Path,
    function: DigestFunction,
    out: &mut Outputs,
    children: &mut HashMap<Digest, Directory>,
    staging: &Staging,
) -> Result<Directory, ActionError> {
    // Post-order walk with an explicit stack: (path, entries read?, message being built).
    let mut stack: Vec<Pending> = vec![(path.to_path_buf(), None, Directory::default())];
    let mut finished: HashMap<PathBuf, Directory> = HashMap::new();
    while let Some((dir_path, entries, mut msg)) = stack.pop() {
        let entries = match entries {
            Some(e) => e,
            None => {
                let mut e = Vec::new();
                for entry in
                    std::fs::read_dir(&dir_path).map_err(io("read directory", &dir_path))?
                {
                    let entry = entry.map_err(io("read directory", &dir_path))?;
                    let meta = entry.metadata().map_err(io("stat", &entry.path()))?;
                    e.push((entry.file_name().to_string_lossy().into_owned(), meta));
                }
                e.sort_by(|a, b| a.0.cmp(&b.0));
                let subdirs: Vec<PathBuf> = e
                    .iter()
                    .filter(|(_, m)| m.is_dir() && !m.file_type().is_symlink())
                    .map(|(n, _)| dir_path.join(n))
                    .collect();
                if subdirs.iter().any(|s| !finished.contains_key(s)) {
                    stack.push((dir_path.clone(), Some(e), msg));
                    for s in subdirs.into_iter().rev() {
                        stack.push((s, None, Directory::default()));
                    }
                    continue;
                }
                e
            }
        };
        for (name, meta) in &entries {
            let child = dir_path.join(name);
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&child).map_err(io("read link", &child))?;
                msg.symlinks.push(SymlinkNode {
                    name: name.clone(),
                    target: target.to_string_lossy().into_owned(),
                    node_properties: None,
                });
            } else if meta.is_dir() {
                let sub = finished.remove(&child).unwrap_or_default();
                let bytes = sub.encode_to_vec();
                let digest = Digest::of(function, &bytes);
                children.entry(digest).or_insert(sub);
                msg.directories.push(DirectoryNode {
                    name: name.clone(),
                    digest: Some(digest.to_proto()),
                });
            } else {
                let (digest, blob) = staging.fix(function, &child).await?;
                out.blobs.insert(digest, blob);
                msg.files.push(FileNode {
                    name: name.clone(),
                    digest: Some(digest.to_proto()),
                    is_executable: meta.permissions().mode() & 0o111 != 0,
                    node_properties: None,
                });
            }
        }
        finished.insert(dir_path, msg);
    }
    Ok(finished.remove(path).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_directories_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir_all(cwd.join("out/sub/deeper")).unwrap();
        std::fs::write(cwd.join("out/a.txt"), "a").unwrap();
        std::fs::write(cwd.join("out/sub/b.txt"), "b").unwrap();
        std::fs::write(cwd.join("out/sub/deeper/c.sh"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(
            cwd.join("out/sub/deeper/c.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("a.txt", cwd.join("out/link")).unwrap();
        std::fs::write(cwd.join("file.bin"), "bin").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", cwd.join("abs-link")).unwrap();
        let command = Command {
            output_paths: vec![
                "out".into(),
                "file.bin".into(),
                "abs-link".into(),
                "never-made".into(),
            ],
            ..Default::default()
        };
        let staged = tempfile::tempdir().unwrap();
        let staging = Staging::new(staged.path().join("staged")).unwrap();
        let outputs = collect(&command, cwd, DigestFunction::Sha256, &staging)
            .await
            .unwrap();
        let r = &outputs.result;
        assert_eq!(r.output_files.len(), 1);
        assert_eq!(r.output_files[0].path, "file.bin");
        assert_eq!(r.output_symlinks.len(), 1);
        assert_eq!(r.output_symlinks[0].target, "/etc/hostname");
        assert_eq!(r.output_directories.len(), 1);
        let tree_digest =
            Digest::from_proto(r.output_directories[0].tree_digest.as_ref().unwrap(), 1).unwrap();
        let Blob::Bytes(tree_bytes) = &outputs.blobs[&tree_digest] else {
            panic!("tree is bytes")
        };
        let tree = Tree::decode(tree_bytes.clone()).unwrap();
        let root = tree.root.unwrap();
        assert_eq!(
            root.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["a.txt"]
        );
        assert_eq!(root.symlinks[0].name, "link");
        assert_eq!(root.directories[0].name, "sub");
        assert_eq!(tree.children.len(), 2, "sub and sub/deeper");
        let deeper = tree
            .children
            .iter()
            .find(|d| d.files.iter().any(|f| f.name == "c.sh"))
            .unwrap();
        assert!(deeper.files[0].is_executable);
        // Every referenced file is among the blobs to store.
        assert!(outputs.blobs.len() >= 5);
    }

    #[tokio::test]
    async fn legacy_fields_and_directory_format() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir_all(cwd.join("d")).unwrap();
        std::fs::write(cwd.join("d/x"), "x").unwrap();
        std::os::unix::fs::symlink("d/x", cwd.join("f")).unwrap();
        #[allow(deprecated)]
        let command = Command {
            output_files: vec!["f".into()],
            output_directories: vec!["d".into()],
            output_directory_format: OutputDirectoryFormat::DirectoryOnly as i32,
            ..Default::default()
        };
        let staged = tempfile::tempdir().unwrap();
        let staging = Staging::new(staged.path().join("staged")).unwrap();
        let outputs = collect(&command, cwd, DigestFunction::Blake3, &staging)
            .await
            .unwrap();
        #[allow(deprecated)]
        let file_symlinks = &outputs.result.output_file_symlinks;
        assert_eq!(file_symlinks.len(), 1);
        let d = &outputs.result.output_directories[0];
        assert!(d.tree_digest.is_none() && d.root_directory_digest.is_some());
        let root = Digest::from_proto(d.root_directory_digest.as_ref().unwrap(), 9).unwrap();
        assert!(
            outputs.blobs.contains_key(&root),
            "the root Directory blob is stored"
        );
    }
}
