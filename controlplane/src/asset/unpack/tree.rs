//! The unpacked tree in memory: checked paths, nodes put in place, symlinks checked against
//! the tree answered, and the `Directory` messages built from the bottom up.

use super::{UnpackError, MAX_DEPTH, MAX_DIRECTORY_BYTES};
use bytes::Bytes;
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use kiln_reapi::digest::{Digest, DigestFunction};
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Component, Path};

/// One entry of the unpacked tree.
pub(super) enum Node {
    File { digest: Digest, executable: bool },
    Dir(BTreeMap<String, Node>),
    Symlink(String),
}

/// The path's components, checked: `None` for the root itself.
pub(super) fn components(path: &Path) -> Result<Option<Vec<String>>, String> {
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

/// Puts `node` at `path`, making the directories above it; a later entry replaces an earlier
/// one of the same kind, a directory keeps what it holds.
pub(super) fn insert(
    root: &mut BTreeMap<String, Node>,
    path: &[String],
    node: Node,
) -> Result<(), String> {
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

pub(super) fn find<'a>(root: &'a BTreeMap<String, Node>, path: &[String]) -> Option<&'a Node> {
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
pub(super) fn check_symlinks(
    children: &BTreeMap<String, Node>,
    depth: usize,
) -> Result<(), String> {
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
pub(super) fn build(
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

pub(super) fn collect_files(
    children: &BTreeMap<String, Node>,
    out: &mut std::collections::BTreeSet<Digest>,
) {
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
