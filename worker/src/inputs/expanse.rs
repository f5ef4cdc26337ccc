//! How much an input tree lays out: a directory named N times is made N times, so a tree of
//! thirty distinct directories, each naming the next twice, would make a billion entries (and,
//! past a filesystem's hard-link limit, a billion copies of its files). Counted once per
//! distinct directory before anything is made, and refused past the limit.

use crate::error::ActionError;
use crate::fetch::InputTree;
use kiln_reapi::digest::Digest;
use std::collections::{HashMap, HashSet};

/// Most entries (files, symlinks, directories) one input tree may lay out: as many as a tree
/// may hold distinct digests by default (`execution.max_input_digests`).
pub const MAX_ENTRIES: u64 = kiln_reapi::walk::WalkLimits::DEFAULT.max_digests as u64;

/// The entries laying out `tree` makes, each counted every time it is named (saturating). A
/// directory the tree lacks counts as empty (the layout fails on it).
pub fn laid_out(tree: &InputTree, function: i32) -> u64 {
    let mut done: HashMap<Digest, u64> = HashMap::new();
    // Entered and not finished: a cycle (impossible between content digests, but the tree
    // comes from a client) is cut there rather than looped on.
    let mut open: HashSet<Digest> = HashSet::new();
    let mut stack: Vec<(Digest, bool)> = vec![(tree.root, false)];
    let child = |d: Option<&kiln_proto::reapi::Digest>| Digest::from_proto_field(d, function).ok();
    while let Some((digest, finishing)) = stack.pop() {
        let Some(dir) = tree.directories.get(&digest) else {
            continue;
        };
        if !finishing {
            if done.contains_key(&digest) || !open.insert(digest) {
                continue;
            }
            stack.push((digest, true));
            stack.extend(
                dir.directories
                    .iter()
                    .filter_map(|n| child(n.digest.as_ref()))
                    .map(|d| (d, false)),
            );
            continue;
        }
        open.remove(&digest);
        let own = (dir.files.len() + dir.symlinks.len() + dir.directories.len()) as u64;
        let total = dir
            .directories
            .iter()
            .filter_map(|n| child(n.digest.as_ref()))
            .fold(own, |entries, d| {
                entries.saturating_add(done.get(&d).copied().unwrap_or(0))
            });
        done.insert(digest, total);
    }
    done.get(&tree.root).copied().unwrap_or(0)
}

/// Refuses a tree that would lay out more than [`MAX_ENTRIES`] entries. Bytes are not
/// bounded here: a file named many times is linked, not copied, so a runtime that appears in
/// sixty runfiles trees costs its size once (the distinct files are the CAS's to hold).
pub fn check(tree: &InputTree, function: i32) -> Result<(), ActionError> {
    let entries = laid_out(tree, function);
    if entries > MAX_ENTRIES {
        return Err(ActionError::BadInput(format!(
            "the input tree lays out {entries} files, symlinks and directories (a directory named more than once is made each time), more than {MAX_ENTRIES}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{Directory, DirectoryNode, FileNode};
    use kiln_reapi::digest::DigestFunction;
    use prost::Message;

    fn digest(dir: &Directory) -> Digest {
        Digest::of(DigestFunction::Sha256, &dir.encode_to_vec())
    }

    /// `levels` directories, each naming the next twice, the last holding a file of `size`
    /// bytes: 2^levels copies of it.
    fn doubling(levels: u32, size: i64) -> InputTree {
        let file = FileNode {
            name: "f".into(),
            digest: Some(kiln_proto::reapi::Digest {
                hash: "ab".repeat(32),
                size_bytes: size,
            }),
            ..Default::default()
        };
        let mut dir = Directory {
            files: vec![file],
            ..Default::default()
        };
        let mut directories = HashMap::new();
        for _ in 0..levels {
            let d = digest(&dir);
            directories.insert(d, dir);
            let node = |name: &str| DirectoryNode {
                name: name.into(),
                digest: Some(d.to_proto()),
            };
            dir = Directory {
                directories: vec![node("a"), node("b")],
                ..Default::default()
            };
        }
        let root = digest(&dir);
        directories.insert(root, dir);
        InputTree { root, directories }
    }

    #[test]
    fn a_directory_named_twice_counts_twice() {
        let sha = DigestFunction::Sha256.proto() as i32;
        // Level 0: one file. Each level above: two directory entries and twice the below.
        let below = |n: u64| 2 + 2 * n;
        assert_eq!(laid_out(&doubling(3, 10), sha), below(below(below(1))));
        let bomb = doubling(40, 1 << 30);
        assert_eq!(
            bomb.directories.len(),
            41,
            "a handful of distinct directories"
        );
        let entries = laid_out(&bomb, sha);
        assert!(entries > MAX_ENTRIES, "{entries}");
        let err = check(&bomb, sha).unwrap_err();
        assert!(err.to_string().contains("lays out"), "{err}");
        // A large file named many times is fine: it is linked.
        assert!(check(&doubling(6, 1 << 40), sha).is_ok());
    }
}
