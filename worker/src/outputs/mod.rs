//! Collecting an action's outputs after it ran: files (with their executable bit),
//! directories (as `Tree` messages, and as `Directory` blobs when the Command asks), and
//! symlinks — from `output_paths`, or the older `output_files`/`output_directories`. Returns the
//! ActionResult fields and the blobs to store.

use crate::beneath;
use crate::error::{io, ActionError};
use bytes::Bytes;
use kiln_proto::reapi::command::OutputDirectoryFormat;
use kiln_proto::reapi::{
    ActionResult, Command, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use kiln_reapi::digest::{Digest, DigestFunction};
use kiln_reapi::paths;
use prost::Message;
use rustix::fd::OwnedFd;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod staging;

use staging::fix_error;
pub use staging::{OutputOwners, Staging, IN_MEMORY, MEMORY_BUDGET};

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

/// The directory holding an output (opened below `root`, never through a symlink: the action
/// may have replaced a directory with a link to anywhere) and the output's own name; `None`
/// when a parent is missing or not a directory. The empty path is the input root itself.
fn locate(
    root: &OwnedFd,
    components: &[String],
    rel: &str,
) -> Result<Option<(OwnedFd, OsString)>, ActionError> {
    let Some((last, parents)) = components.split_last() else {
        return Ok(Some((
            beneath::open_dir(root, OsStr::new(".")).map_err(io("open", Path::new(rel)))?,
            OsString::from("."),
        )));
    };
    let mut dir = beneath::open_dir(root, OsStr::new(".")).map_err(io("open", Path::new(rel)))?;
    let mut shown = PathBuf::new();
    for c in parents {
        shown.push(c);
        match beneath::kind(&dir, OsStr::new(c)).map_err(io("stat", &shown))? {
            Some(beneath::Kind::Dir) => {}
            Some(beneath::Kind::Symlink) => {
                return Err(ActionError::BadInput(format!(
                    "output path {rel:?}: {} is a symlink; output paths are not followed through symlinks",
                    shown.display()
                )))
            }
            _ => return Ok(None),
        }
        dir = match beneath::open_dir(&dir, OsStr::new(c)) {
            Ok(d) => d,
            Err(e) if beneath::is_not_a_directory(&e) => {
                return Err(ActionError::BadInput(format!(
                    "output path {rel:?}: {} changed while its outputs were collected",
                    shown.display()
                )))
            }
            Err(e) => return Err(ActionError::io("open", &shown, e)),
        };
    }
    Ok(Some((dir, OsString::from(last))))
}

/// Collects the outputs the Command declares (relative to its working directory, itself
/// below `root`), each file staged in `staging` before it is hashed and refused unless
/// `owners` allows it.
pub async fn collect(
    command: &Command,
    root: &Path,
    function: DigestFunction,
    staging: &Staging,
    owners: &OutputOwners,
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
    let root_dir = beneath::open_root(root).map_err(io("open", root))?;
    for (rel, kind) in declared {
        let components =
            paths::output(&wd, rel).map_err(|e| ActionError::BadInput(e.to_string()))?;
        let Some((parent, name)) = locate(&root_dir, &components, rel)? else {
            continue;
        };
        // Below the input root, as messages to the client name it (the worker's own paths
        // are not the client's business); every access goes by handle.
        let path: PathBuf = if components.is_empty() {
            PathBuf::from(".")
        } else {
            components.iter().collect()
        };
        let Some(found) = beneath::kind(&parent, &name).map_err(io("stat", &path))? else {
            continue;
        };
        if found == beneath::Kind::Symlink {
            let target = beneath::read_link(&parent, &name).map_err(|e| fix_error(&path, e))?;
            let symlink = OutputSymlink {
                path: rel.clone(),
                target,
                node_properties: None,
            };
            #[allow(deprecated)]
            match kind {
                Kind::File => out.result.output_file_symlinks.push(symlink.clone()),
                Kind::Directory => out.result.output_directory_symlinks.push(symlink.clone()),
                Kind::Any => {}
            }
            out.result.output_symlinks.push(symlink);
        } else if found == beneath::Kind::Dir {
            if kind == Kind::File {
                return Err(ActionError::WrongOutputType(format!(
                    "output file {rel:?} is a directory"
                )));
            }
            let dir = beneath::open_dir(&parent, &name).map_err(|e| fix_error(&path, e))?;
            let (tree, root_digest) = tree(
                dir,
                &path,
                function,
                &mut out,
                format != OutputDirectoryFormat::TreeOnly,
                (staging, owners),
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
                return Err(ActionError::WrongOutputType(format!(
                    "output directory {rel:?} is a file"
                )));
            }
            let file = beneath::open_file(&parent, &name).map_err(|e| fix_error(&path, e))?;
            let (digest, blob, mode) = staging
                .fix_file(function, file, &path, Some(owners))
                .await?;
            out.blobs.insert(digest, blob);
            out.result.output_files.push(OutputFile {
                path: rel.clone(),
                digest: Some(digest.to_proto()),
                is_executable: mode & 0o111 != 0,
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
    root: OwnedFd,
    shown: &Path,
    function: DigestFunction,
    out: &mut Outputs,
    directory_blobs: bool,
    files: (&Staging, &OutputOwners),
) -> Result<(Tree, Digest), ActionError> {
    let mut children: HashMap<Digest, Directory> = HashMap::new();
    let root_dir = directory(root, shown, function, out, &mut children, files).await?;
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

/// A directory being built: its handle (opened when it is first taken off the stack, below
/// its parent's), its path (for messages and to match it to its parent's entry), its entries
/// once read, its message so far.
struct Pending {
    dir: Option<Arc<OwnedFd>>,
    parent: Option<(Arc<OwnedFd>, OsString)>,
    depth: usize,
    path: PathBuf,
    entries: Option<Vec<(OsString, beneath::Kind)>>,
    msg: Directory,
}

/// One directory's message, recursing into subdirectories (iteratively, deepest first), every
/// name read below its directory's handle: at most one handle per level is open at a time.
async fn directory(
    root: OwnedFd,
    shown: &Path,
    function: DigestFunction,
    out: &mut Outputs,
    children: &mut HashMap<Digest, Directory>,
    (staging, owners): (&Staging, &OutputOwners),
) -> Result<Directory, ActionError> {
    let mut stack = vec![Pending {
        dir: Some(Arc::new(root)),
        parent: None,
        depth: 0,
        path: shown.to_path_buf(),
        entries: None,
        msg: Directory::default(),
    }];
    let mut finished: HashMap<PathBuf, Directory> = HashMap::new();
    while let Some(mut p) = stack.pop() {
        // A handle is held per level: the depth bounds them (and no input tree is deeper).
        if p.depth > kiln_reapi::tree::MAX_DEPTH {
            return Err(ActionError::BadInput(format!(
                "output directory {}: deeper than {} levels",
                shown.display(),
                kiln_reapi::tree::MAX_DEPTH
            )));
        }
        let dir = match p.dir.take() {
            Some(d) => d,
            None => {
                let (parent, name) = p.parent.take().ok_or_else(|| {
                    ActionError::io("open", &p.path, std::io::Error::other("no parent"))
                })?;
                Arc::new(beneath::open_dir(&*parent, &name).map_err(|e| fix_error(&p.path, e))?)
            }
        };
        let entries = match p.entries.take() {
            Some(e) => e,
            None => {
                let e = beneath::list(&*dir).map_err(io("read directory", &p.path))?;
                staging.count_entries(e.len(), shown)?;
                let subdirs: Vec<&OsString> = e
                    .iter()
                    .filter(|(_, k)| *k == beneath::Kind::Dir)
                    .map(|(n, _)| n)
                    .collect();
                if subdirs
                    .iter()
                    .any(|n| !finished.contains_key(&p.path.join(n)))
                {
                    let below: Vec<Pending> = subdirs
                        .into_iter()
                        .rev()
                        .map(|n| Pending {
                            dir: None,
                            parent: Some((dir.clone(), n.clone())),
                            depth: p.depth + 1,
                            path: p.path.join(n),
                            entries: None,
                            msg: Directory::default(),
                        })
                        .collect();
                    stack.push(Pending {
                        dir: Some(dir),
                        entries: Some(e),
                        ..p
                    });
                    stack.extend(below);
                    continue;
                }
                e
            }
        };
        let mut msg = p.msg;
        for (name, kind) in &entries {
            let child = p.path.join(name);
            let shown_name = name.to_string_lossy().into_owned();
            match kind {
                beneath::Kind::Symlink => {
                    let target =
                        beneath::read_link(&*dir, name).map_err(|e| fix_error(&child, e))?;
                    msg.symlinks.push(SymlinkNode {
                        name: shown_name,
                        target,
                        node_properties: None,
                    });
                }
                beneath::Kind::Dir => {
                    let sub = finished.remove(&child).unwrap_or_default();
                    let bytes = sub.encode_to_vec();
                    let digest = Digest::of(function, &bytes);
                    children.entry(digest).or_insert(sub);
                    msg.directories.push(DirectoryNode {
                        name: shown_name,
                        digest: Some(digest.to_proto()),
                    });
                }
                beneath::Kind::File { .. } => {
                    let file = beneath::open_file(&*dir, name).map_err(|e| fix_error(&child, e))?;
                    let (digest, blob, mode) = staging
                        .fix_file(function, file, &child, Some(owners))
                        .await?;
                    out.blobs.insert(digest, blob);
                    msg.files.push(FileNode {
                        name: shown_name,
                        digest: Some(digest.to_proto()),
                        is_executable: mode & 0o111 != 0,
                        node_properties: None,
                    });
                }
                beneath::Kind::Other => {
                    return Err(ActionError::BadInput(format!(
                        "output {}: not a regular file (a FIFO, socket or device is not an output)",
                        child.display()
                    )))
                }
            }
        }
        finished.insert(p.path, msg);
    }
    Ok(finished.remove(shown).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::status::{Classify, ErrorKind};
    use std::os::unix::fs::PermissionsExt;

    /// The outputs at `paths` (`output_paths`) below `cwd`, staged in `staging`.
    async fn collected(
        cwd: &Path,
        paths: &[&str],
        staging: &Staging,
    ) -> Result<Outputs, ActionError> {
        let command = Command {
            output_paths: paths.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        collect(
            &command,
            cwd,
            DigestFunction::Sha256,
            staging,
            &OutputOwners::default(),
        )
        .await
    }

    /// With `run_as_user`, an output file must be the action user's or an input the worker
    /// linked in: a hard link to a root-only file is refused, in a directory output too.
    #[tokio::test]
    async fn outputs_that_are_not_the_action_users_are_refused() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // Only root can make files of two owners here.
        }
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        let action = 65534;
        std::fs::create_dir(cwd.join("out")).unwrap();
        for f in ["mine", "out/mine", "input", "root-only", "out/root-only"] {
            std::fs::write(cwd.join(f), f).unwrap();
        }
        for f in ["mine", "out/mine"] {
            std::os::unix::fs::lchown(cwd.join(f), Some(action), Some(action)).unwrap();
        }
        let input = std::fs::metadata(cwd.join("input")).unwrap();
        let owners = OutputOwners {
            action_uid: Some(action),
            inputs: [(input.dev(), input.ino())].into(),
            input_device: None,
        };
        let staged = tempfile::tempdir().unwrap();
        for (paths, refused) in [
            (vec!["mine", "input", "out/mine"], false),
            (vec!["root-only"], true),
            (vec!["out"], true),
        ] {
            let command = Command {
                output_paths: paths.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            };
            let staging = Staging::new(
                staged.path().join(uuid::Uuid::new_v4().to_string()),
                u64::MAX,
            )
            .unwrap();
            let result = collect(&command, cwd, DigestFunction::Sha256, &staging, &owners).await;
            match result {
                Err(ActionError::BadInput(m)) if refused => assert!(m.contains("uid 0"), "{m}"),
                Ok(_) if !refused => {}
                other => panic!("{paths:?}: {other:?}"),
            }
        }
    }

    /// Outputs are held in memory only within the action's budget (the rest staged as
    /// files), a file linked at many paths is fixed (copied) once, and outputs adding up to
    /// more than the room where they are staged (a sparse file of any size) are refused
    /// before being copied.
    #[tokio::test]
    async fn outputs_are_bounded_in_memory_and_bytes_and_links_are_fixed_once() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir(cwd.join("out")).unwrap();
        let per_file = IN_MEMORY;
        let files = (MEMORY_BUDGET / per_file) as usize + 3;
        for i in 0..files {
            std::fs::write(
                cwd.join(format!("out/{i}")),
                vec![i as u8; per_file as usize],
            )
            .unwrap();
        }
        std::fs::write(cwd.join("big"), vec![7u8; 2 << 20]).unwrap();
        for i in 0..50 {
            std::fs::hard_link(cwd.join("big"), cwd.join(format!("out/big-{i}"))).unwrap();
        }
        let staged = tempfile::tempdir().unwrap();
        let staging = Staging::new(staged.path().join("staged"), u64::MAX).unwrap();
        let outputs = collected(cwd, &["out", "big"], &staging).await.unwrap();
        let in_memory: u64 = outputs
            .blobs
            .values()
            .map(|b| match b {
                Blob::Bytes(b) => b.len() as u64,
                Blob::File(_) => 0,
            })
            .sum();
        // The Tree message is bytes too, outside the budget.
        assert!(in_memory <= MEMORY_BUDGET + (64 << 10), "{in_memory}");
        let copies = std::fs::read_dir(staged.path().join("staged"))
            .unwrap()
            .count();
        assert_eq!(
            copies,
            3 + 1,
            "three past the budget, and one copy of the linked file"
        );
        assert_eq!(outputs.result.output_files.len(), 1);

        let staging = Staging::new(staged.path().join("bounded"), 10 << 20).unwrap();
        // Entries of output directories are bounded too: `out` holds more than 10.
        let few = Staging::new(staged.path().join("few"), u64::MAX)
            .unwrap()
            .with_max_entries(10);
        let err = collected(cwd, &["out"], &few).await.unwrap_err();
        assert!(err.to_string().contains("more than 10 files"), "{err}");
        let sparse = std::fs::File::create(cwd.join("sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        let err = collected(cwd, &["sparse"], &staging).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("more than the 10485760 bytes free"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(staged.path().join("bounded"))
                .unwrap()
                .count(),
            0
        );
    }

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
        let staged = tempfile::tempdir().unwrap();
        let staging = Staging::new(staged.path().join("staged"), u64::MAX).unwrap();
        let paths = ["out", "file.bin", "abs-link", "never-made"];
        let outputs = collected(cwd, &paths, &staging).await.unwrap();
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
        let staging = Staging::new(staged.path().join("staged"), u64::MAX).unwrap();
        let outputs = collect(
            &command,
            cwd,
            DigestFunction::Blake3,
            &staging,
            &OutputOwners::default(),
        )
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
        // A declared file that is a directory, and the other way round: FAILED_PRECONDITION,
        // as the spec says.
        std::fs::write(cwd.join("plain"), "p").unwrap();
        #[allow(deprecated)]
        for command in [
            Command {
                output_files: vec!["d".into()],
                ..Default::default()
            },
            Command {
                output_directories: vec!["plain".into()],
                ..Default::default()
            },
        ] {
            let err = collect(
                &command,
                cwd,
                DigestFunction::Sha256,
                &staging,
                &OutputOwners::default(),
            )
            .await
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Precondition, "{err}");
        }
    }
}
