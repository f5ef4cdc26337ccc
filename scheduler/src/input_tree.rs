//! The directories of an action's input tree that placement weighs: for each, the bytes of
//! every file under it. A worker whose directory cache holds some of them has those bytes in
//! place without fetching or linking file by file ([`InputTree::held`]); placement prefers
//! the worker with the most (after an exact input-root hit, see [`crate::dispatch`]).
//!
//! Only the [`MAX_DIRS`] largest directories are kept, so that weighing a tree against every
//! free worker stays cheap under the scheduler's lock whatever the tree's size; a held
//! directory below those counts for nothing.

use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::collections::{HashMap, HashSet};

/// Directories of one tree weighed at most.
pub const MAX_DIRS: usize = 256;

/// One directory of the tree as the walk found it.
#[derive(Debug, Clone)]
pub struct WalkedDir {
    /// Its digest.
    pub digest: Digest,
    /// Bytes of the files directly in it.
    pub file_bytes: u64,
    /// Its subdirectories, each once, with how many of its `DirectoryNode`s name it (a
    /// repeated one counts each time: it is laid out each time).
    pub children: Vec<(Digest, u32)>,
}

impl WalkedDir {
    /// The entry of a directory whose files add up to `file_bytes` and whose subdirectory
    /// nodes name `nodes` (in any order, repeats included).
    pub fn new(digest: Digest, file_bytes: u64, nodes: impl IntoIterator<Item = Digest>) -> Self {
        let mut counts: HashMap<Digest, u32> = HashMap::new();
        for d in nodes {
            let n = counts.entry(d).or_default();
            *n = n.saturating_add(1);
        }
        WalkedDir {
            digest,
            file_bytes,
            children: counts.into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct Kept {
    key: BlobKey,
    /// Bytes of every file under it.
    bytes: u64,
    /// Its kept subdirectories, as indices in [`InputTree::dirs`] (all before it), each with
    /// how many times it is named.
    children: Vec<(u32, u32)>,
}

/// The largest directories of an input tree, children before parents.
#[derive(Debug, Clone, Default)]
pub struct InputTree {
    dirs: Vec<Kept>,
    total: u64,
}

impl InputTree {
    /// A tree with nothing to weigh.
    pub fn empty() -> InputTree {
        InputTree::default()
    }

    /// The tree under `root` from every directory the walk met (`dirs`, in the order met,
    /// the root first). A directory missing from `dirs` counts as empty.
    pub fn new(instance: &InstanceName, root: Digest, dirs: &[WalkedDir]) -> InputTree {
        let by_digest: HashMap<Digest, &WalkedDir> = dirs.iter().map(|d| (d.digest, d)).collect();
        let totals = totals(root, &by_digest);
        let total = totals.get(&root).copied().unwrap_or(0);
        if total == 0 {
            return InputTree::empty();
        }
        // The largest, ties to the one met first (a parent is met before its subdirectories).
        let mut ranked: Vec<(usize, Digest, u64)> = dirs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let t = totals.get(&d.digest).copied().unwrap_or(0);
                (t > 0).then_some((i, d.digest, t))
            })
            .collect();
        ranked.sort_unstable_by_key(|&(i, _, t)| (std::cmp::Reverse(t), i));
        let kept: HashSet<Digest> = ranked.iter().take(MAX_DIRS).map(|r| r.1).collect();
        // Children before parents: a post-order walk from the root over the kept directories.
        let mut index: HashMap<Digest, u32> = HashMap::new();
        let mut out: Vec<Kept> = Vec::new();
        let mut stack: Vec<(Digest, bool)> = vec![(root, false)];
        let mut entered: HashSet<Digest> = HashSet::new();
        while let Some((digest, expanded)) = stack.pop() {
            let Some(dir) = by_digest.get(&digest) else {
                continue;
            };
            if !expanded {
                if !kept.contains(&digest) || !entered.insert(digest) {
                    continue;
                }
                stack.push((digest, true));
                stack.extend(dir.children.iter().map(|(c, _)| (*c, false)));
                continue;
            }
            let children = dir
                .children
                .iter()
                .filter_map(|(c, n)| Some((index.get(c).copied()?, *n)))
                .collect();
            index.insert(digest, out.len() as u32);
            out.push(Kept {
                key: BlobKey::new(instance.clone(), digest),
                bytes: totals.get(&digest).copied().unwrap_or(0),
                children,
            });
        }
        InputTree { dirs: out, total }
    }

    /// Bytes of every file in the tree.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of the tree under directories for which `holds` is true, each counted once
    /// (a held directory's own held subdirectories are part of it).
    pub fn held(&self, holds: impl Fn(&BlobKey) -> bool) -> u64 {
        let mut held: Vec<u64> = Vec::with_capacity(self.dirs.len());
        for dir in &self.dirs {
            let bytes = if holds(&dir.key) {
                dir.bytes
            } else {
                dir.children.iter().fold(0u64, |sum, &(c, n)| {
                    sum.saturating_add(held[c as usize].saturating_mul(u64::from(n)))
                })
            };
            held.push(bytes);
        }
        // The root is last: nothing is kept that it does not lead to.
        held.last().copied().unwrap_or(0).min(self.total)
    }
}

/// Bytes under each directory reachable from `root`, its files and its subdirectories' (each
/// time one is named), saturating.
fn totals(root: Digest, dirs: &HashMap<Digest, &WalkedDir>) -> HashMap<Digest, u64> {
    let mut totals: HashMap<Digest, u64> = HashMap::new();
    // Entered and not finished: a cycle (impossible between content digests, but the walk's
    // input comes from clients) is cut there rather than looped on.
    let mut open: HashSet<Digest> = HashSet::new();
    let mut stack: Vec<(Digest, bool)> = vec![(root, false)];
    while let Some((digest, expanded)) = stack.pop() {
        let Some(dir) = dirs.get(&digest) else {
            continue;
        };
        if !expanded {
            if totals.contains_key(&digest) || !open.insert(digest) {
                continue;
            }
            stack.push((digest, true));
            stack.extend(dir.children.iter().map(|(c, _)| (*c, false)));
            continue;
        }
        open.remove(&digest);
        let total = dir.children.iter().fold(dir.file_bytes, |sum, (c, n)| {
            let each = totals.get(c).copied().unwrap_or(0);
            sum.saturating_add(each.saturating_mul(u64::from(*n)))
        });
        totals.insert(digest, total);
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    fn d(n: u32) -> Digest {
        Digest::of(DigestFunction::Sha256, &n.to_le_bytes())
    }

    fn dir(n: u32, file_bytes: u64, children: &[u32]) -> WalkedDir {
        WalkedDir::new(d(n), file_bytes, children.iter().map(|c| d(*c)))
    }

    fn key(n: u32) -> BlobKey {
        BlobKey::new(InstanceName::default_instance(), d(n))
    }

    fn held_by(tree: &InputTree, held: &[u32]) -> u64 {
        let keys: HashSet<BlobKey> = held.iter().map(|n| key(*n)).collect();
        tree.held(|k| keys.contains(k))
    }

    #[test]
    fn held_bytes_count_each_held_subtree_once_and_repeats_each_time() {
        // 0 ─┬─ 1 ─── 3
        //    ├─ 2 ─┬─ 3
        //    │     └─ 3   (named twice)
        //    └─ files: 1 byte
        let dirs = [
            dir(0, 1, &[1, 2]),
            dir(1, 10, &[3]),
            dir(2, 100, &[3, 3]),
            dir(3, 1000, &[]),
        ];
        let tree = InputTree::new(&InstanceName::default_instance(), d(0), &dirs);
        assert_eq!(tree.total(), 1 + 10 + 1000 + 100 + 2000);
        assert_eq!(held_by(&tree, &[]), 0);
        assert_eq!(held_by(&tree, &[0]), tree.total());
        assert_eq!(held_by(&tree, &[3]), 3000, "3 is laid out three times");
        assert_eq!(held_by(&tree, &[2]), 2100);
        assert_eq!(
            held_by(&tree, &[2, 3]),
            2100 + 1000,
            "3 under 1, and 2 once"
        );
        assert_eq!(
            held_by(&tree, &[0, 2, 3]),
            tree.total(),
            "never more than the tree"
        );
    }

    #[test]
    fn a_subdirectory_named_many_times_is_kept_once_and_counted_each_time() {
        let dirs = [dir(0, 0, &vec![1; 100_000]), dir(1, 3, &[])];
        assert_eq!(dirs[0].children, vec![(d(1), 100_000)]);
        let tree = InputTree::new(&InstanceName::default_instance(), d(0), &dirs);
        assert_eq!(tree.total(), 300_000);
        assert_eq!(tree.dirs.iter().map(|k| k.children.len()).sum::<usize>(), 1);
        assert_eq!(held_by(&tree, &[1]), 300_000);
    }

    #[test]
    fn only_the_largest_directories_are_weighed() {
        // The root holds MAX_DIRS + 10 subdirectories; the smallest fall out.
        let n = MAX_DIRS as u32 + 10;
        let mut dirs = vec![dir(0, 0, &(1..=n).collect::<Vec<_>>())];
        dirs.extend((1..=n).map(|i| dir(i, u64::from(i), &[])));
        let tree = InputTree::new(&InstanceName::default_instance(), d(0), &dirs);
        assert_eq!(tree.dirs.len(), MAX_DIRS);
        assert_eq!(held_by(&tree, &[n]), u64::from(n), "the largest is weighed");
        assert_eq!(held_by(&tree, &[1]), 0, "the smallest is not");
        assert_eq!(held_by(&tree, &[0]), tree.total(), "the root always is");
    }

    #[test]
    fn empty_trees_cycles_and_huge_repeats_are_harmless() {
        let instance = InstanceName::default_instance();
        let empty = InputTree::new(&instance, d(0), &[dir(0, 0, &[1]), dir(1, 0, &[])]);
        assert_eq!((empty.total(), held_by(&empty, &[0])), (0, 0));
        assert_eq!(InputTree::new(&instance, d(9), &[]).total(), 0);
        let cycle = InputTree::new(&instance, d(0), &[dir(0, 5, &[1]), dir(1, 7, &[0])]);
        assert_eq!(cycle.total(), 12);
        assert_eq!(held_by(&cycle, &[1]), 7);
        // 64 levels, each naming the next twice: 2^64 copies of the last saturate.
        let deep: Vec<WalkedDir> = (0..64)
            .map(|i| dir(i, 0, &[i + 1, i + 1]))
            .chain([dir(64, 1, &[])])
            .collect();
        let deep = InputTree::new(&instance, d(0), &deep);
        assert_eq!(deep.total(), u64::MAX);
        assert_eq!(held_by(&deep, &[64]), u64::MAX);
    }
}
