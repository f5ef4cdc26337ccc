//! The one bounded walk of an input or output tree of `Directory` messages, breadth first,
//! used by the control plane before it queues an action, by the action cache's completeness
//! check and by the worker fetching inputs.
//!
//! [`Walk`] is the walk itself with no I/O: it hands out bounded batches of directories to
//! fetch, takes back what was found (or that a directory is missing) and queues the children.
//! [`walk`] drives it with the caller's fetch, so every caller gets the same limits, the same
//! error for the same bad tree, and the same order (a directory met at several depths is
//! visited at the shallowest, where a climbing symlink reaches furthest).

use crate::digest::{Digest, DigestError};
use crate::status::{Classify, ErrorKind};
use bytes::Bytes;
use kiln_proto::reapi::Directory;
use prost::Message;
use std::collections::{HashSet, VecDeque};
use std::future::Future;

/// How much a walk may take on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Most distinct digests (directories and files together) in the tree.
    pub max_digests: usize,
    /// Largest single `Directory` blob.
    pub max_directory_bytes: u64,
    /// Bytes of `Directory` blobs asked for in one batch, and so held at once (a batch always
    /// holds at least one directory).
    pub batch_bytes: u64,
}

impl WalkLimits {
    /// The execution defaults: 16 M digests, 16 MiB directories, 64 MiB batches.
    pub const DEFAULT: WalkLimits = WalkLimits {
        max_digests: 16_000_000,
        max_directory_bytes: 16 << 20,
        batch_bytes: 64 << 20,
    };
}

impl Default for WalkLimits {
    fn default() -> WalkLimits {
        WalkLimits::DEFAULT
    }
}

/// A tree the walk refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// More distinct digests than [`WalkLimits::max_digests`].
    #[error("the tree has more than {0} distinct files and directories")]
    TooMany(usize),
    /// A `Directory` blob over [`WalkLimits::max_directory_bytes`].
    #[error("Directory {digest:?} is {} bytes, over the limit of {limit} bytes", digest.size)]
    DirectoryTooLarge {
        /// The directory.
        digest: Digest,
        /// The limit.
        limit: u64,
    },
    /// Bytes that are not a `Directory` message.
    #[error("{digest:?} is not a valid Directory: {why}")]
    NotADirectory {
        /// The blob.
        digest: Digest,
        /// What the decoder said.
        why: String,
    },
    /// A node's digest is absent or malformed.
    #[error("{field} of {name:?} in Directory {dir:?}: {source}")]
    Digest {
        /// `FileNode.digest` or `DirectoryNode.digest`.
        field: &'static str,
        /// The node's name.
        name: String,
        /// The directory holding the node.
        dir: Digest,
        /// What is wrong with the digest.
        source: DigestError,
    },
}

impl Classify for WalkError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

/// What a finished walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walked {
    /// Every distinct directory, the root first, in the order they were met.
    pub directories: Vec<Digest>,
    /// Every distinct file blob, in the order they were met (a digest can be both a file and
    /// a directory: the empty blob is also the empty `Directory`).
    pub files: Vec<Digest>,
    /// The directories the CAS did not have (their subtrees were not walked).
    pub missing: Vec<Digest>,
}

/// A walk in progress, without I/O.
#[derive(Debug)]
pub struct Walk {
    limits: WalkLimits,
    /// Directories and files are kept apart: the empty `Directory` has the empty blob's
    /// digest, and a file may hold bytes that are also a `Directory` used elsewhere.
    seen_dirs: HashSet<Digest>,
    seen_files: HashSet<Digest>,
    queue: VecDeque<(Digest, usize)>,
    walked: Walked,
    /// Whether files are recorded (every caller but a listing of directories wants them).
    keep_files: bool,
}

impl Walk {
    /// A walk of the tree under `root`; every digest in it is read with `root`'s function.
    pub fn new(root: Digest, limits: WalkLimits) -> Walk {
        Walk {
            limits,
            seen_dirs: HashSet::from([root]),
            seen_files: HashSet::new(),
            queue: VecDeque::from([(root, 0)]),
            walked: Walked {
                directories: vec![root],
                ..Walked::default()
            },
            keep_files: true,
        }
    }

    /// The same walk, checking file digests but keeping none of them ([`Walked::files`] stays
    /// empty, and only directories count toward [`WalkLimits::max_digests`]): for a caller
    /// that needs the directories alone.
    pub fn without_files(mut self) -> Walk {
        self.keep_files = false;
        self
    }

    /// The next directories to fetch, each with its depth below the root (0 for the root):
    /// at most [`WalkLimits::batch_bytes`] of them, at least one; none when the walk is done.
    pub fn next_batch(&mut self) -> Result<Vec<(Digest, usize)>, WalkError> {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while let Some(&(digest, depth)) = self.queue.front() {
            if digest.size > self.limits.max_directory_bytes {
                return Err(WalkError::DirectoryTooLarge {
                    digest,
                    limit: self.limits.max_directory_bytes,
                });
            }
            if !batch.is_empty() && bytes.saturating_add(digest.size) > self.limits.batch_bytes {
                break;
            }
            self.queue.pop_front();
            bytes = bytes.saturating_add(digest.size);
            batch.push((digest, depth));
        }
        Ok(batch)
    }

    /// A directory of the last batch, fetched: decodes it, queues the subdirectories not met
    /// before and records the files; returns the message for the caller's own checks.
    pub fn found(
        &mut self,
        digest: Digest,
        depth: usize,
        bytes: &[u8],
    ) -> Result<Directory, WalkError> {
        let dir = Directory::decode(bytes).map_err(|e| WalkError::NotADirectory {
            digest,
            why: e.to_string(),
        })?;
        let function = digest.function.proto() as i32;
        let parse = |field, name: &str, d| {
            Digest::from_proto_field(d, function).map_err(|source| WalkError::Digest {
                field,
                name: name.chars().take(200).collect(),
                dir: digest,
                source,
            })
        };
        for f in &dir.files {
            let d = parse("FileNode.digest", &f.name, f.digest.as_ref())?;
            if self.keep_files && self.seen_files.insert(d) {
                self.walked.files.push(d);
            }
        }
        for sub in &dir.directories {
            let d = parse("DirectoryNode.digest", &sub.name, sub.digest.as_ref())?;
            if self.seen_dirs.insert(d) {
                self.walked.directories.push(d);
                self.queue.push_back((d, depth + 1));
            }
        }
        if self.seen_dirs.len() + self.seen_files.len() > self.limits.max_digests {
            return Err(WalkError::TooMany(self.limits.max_digests));
        }
        Ok(dir)
    }

    /// A directory of the last batch that the CAS does not have.
    pub fn missing(&mut self, digest: Digest) {
        self.walked.missing.push(digest);
    }

    /// Takes the directory [`Walk::next_batch`] refused as too large off the queue, as
    /// missing: for a caller that found the CAS does not have it (a digest's claimed size is
    /// no reason to refuse a tree that only lacks that directory).
    pub fn skip_missing(&mut self) -> Option<Digest> {
        let (digest, _) = self.queue.pop_front()?;
        self.walked.missing.push(digest);
        Some(digest)
    }

    /// What the walk found (call once [`Walk::next_batch`] is empty).
    pub fn finish(self) -> Walked {
        self.walked
    }
}

/// Walks the tree under `root`. `fetch` gets each batch of directory digests and answers, in
/// the same order, each one's bytes or `None` where the CAS does not have it; `visit` sees
/// every directory found, with its depth, and may refuse it. Errors of the walk itself become
/// the caller's error type through `From`.
pub async fn walk<E, F, Fut>(
    root: Digest,
    limits: WalkLimits,
    mut fetch: F,
    mut visit: impl FnMut(Digest, usize, Directory) -> Result<(), E>,
) -> Result<Walked, E>
where
    E: From<WalkError>,
    F: FnMut(Vec<Digest>) -> Fut,
    Fut: Future<Output = Result<Vec<Option<Bytes>>, E>>,
{
    let mut walk = Walk::new(root, limits);
    loop {
        let batch = walk.next_batch()?;
        if batch.is_empty() {
            return Ok(walk.finish());
        }
        let fetched = fetch(batch.iter().map(|(d, _)| *d).collect()).await?;
        // A fetch that answers fewer digests than it was asked leaves the rest missing.
        let mut fetched = fetched.into_iter();
        for (digest, depth) in batch {
            match fetched.next().flatten() {
                Some(bytes) => {
                    let dir = walk.found(digest, depth, &bytes)?;
                    visit(digest, depth, dir)?;
                }
                None => walk.missing(digest),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use kiln_proto::reapi::{DirectoryNode, FileNode};
    use std::collections::HashMap;

    /// An in-memory CAS of directories, and the sizes of the batches asked of it.
    #[derive(Default)]
    struct Cas {
        blobs: HashMap<Digest, Bytes>,
        batches: Vec<u64>,
    }

    impl Cas {
        fn put(&mut self, dir: &Directory) -> Digest {
            let bytes = Bytes::from(dir.encode_to_vec());
            let d = Digest::of(DigestFunction::Sha256, &bytes);
            self.blobs.insert(d, bytes);
            d
        }

        fn file(name: &str, content: &[u8]) -> (FileNode, Digest) {
            let d = Digest::of(DigestFunction::Sha256, content);
            let node = FileNode {
                name: name.into(),
                digest: Some(d.to_proto()),
                ..Default::default()
            };
            (node, d)
        }

        fn dir_node(name: &str, d: Digest) -> DirectoryNode {
            DirectoryNode {
                name: name.into(),
                digest: Some(d.to_proto()),
            }
        }

        async fn walk(&mut self, root: Digest, limits: WalkLimits) -> Result<Walked, WalkError> {
            let walked = walk(
                root,
                limits,
                |batch| {
                    let size = batch.iter().map(|d| d.size).sum();
                    self.batches.push(size);
                    let out = batch.iter().map(|d| self.blobs.get(d).cloned()).collect();
                    async move { Ok::<_, WalkError>(out) }
                },
                |_, _, _| Ok(()),
            )
            .await?;
            Ok(walked)
        }
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn finds_every_distinct_digest_once_and_the_missing_directories() {
        let mut cas = Cas::default();
        let (a, da) = Cas::file("a", b"a");
        let (b, db) = Cas::file("b", b"b");
        let leaf = cas.put(&Directory {
            files: vec![a.clone(), b],
            ..Default::default()
        });
        let absent = Digest::of(DigestFunction::Sha256, b"not stored");
        let root = cas.put(&Directory {
            files: vec![a],
            directories: vec![
                Cas::dir_node("x", leaf),
                Cas::dir_node("y", leaf),
                Cas::dir_node("z", absent),
            ],
            ..Default::default()
        });
        let walked = run(cas.walk(root, WalkLimits::default())).unwrap();
        assert_eq!(walked.directories, vec![root, leaf, absent]);
        assert_eq!(walked.files, vec![da, db]);
        assert_eq!(walked.missing, vec![absent]);

        // Without files: the same directories, no files kept, and only directories counted
        // (three distinct: within a limit of three, where with files five are too many).
        let limits = WalkLimits {
            max_digests: 3,
            ..WalkLimits::default()
        };
        assert_eq!(
            run(cas.walk(root, limits)).unwrap_err(),
            WalkError::TooMany(3)
        );
        let mut walk = Walk::new(root, limits).without_files();
        loop {
            let batch = walk.next_batch().unwrap();
            if batch.is_empty() {
                break;
            }
            for (d, depth) in batch {
                match cas.blobs.get(&d).cloned() {
                    Some(bytes) => {
                        walk.found(d, depth, &bytes).unwrap();
                    }
                    None => walk.missing(d),
                }
            }
        }
        let dirs_only = walk.finish();
        assert_eq!(dirs_only.directories, vec![root, leaf, absent]);
        assert!(dirs_only.files.is_empty());
        assert_eq!(dirs_only.missing, vec![absent]);
    }

    #[test]
    fn batches_are_bounded_by_bytes() {
        let mut cas = Cas::default();
        let subs: Vec<DirectoryNode> = (0..10u8)
            .map(|i| {
                let (f, _) = Cas::file("f", &[i]);
                let d = cas.put(&Directory {
                    files: vec![f],
                    ..Default::default()
                });
                Cas::dir_node(&format!("d{i}"), d)
            })
            .collect();
        let each = subs[0].digest.as_ref().unwrap().size_bytes as u64;
        let root = cas.put(&Directory {
            directories: subs,
            ..Default::default()
        });
        let limits = WalkLimits {
            batch_bytes: each * 3,
            ..WalkLimits::default()
        };
        let walked = run(cas.walk(root, limits)).unwrap();
        assert_eq!(walked.directories.len(), 11);
        assert!(walked.missing.is_empty());
        // The root alone (it is larger than the bound), then 3 + 3 + 3 + 1.
        assert_eq!(cas.batches.len(), 5, "{:?}", cas.batches);
        assert!(cas.batches[1..].iter().all(|b| *b <= each * 3));
    }

    #[test]
    fn refuses_too_many_digests_large_directories_and_bad_nodes() {
        let mut cas = Cas::default();
        let files: Vec<FileNode> = (0..5u8).map(|i| Cas::file("f", &[i]).0).collect();
        let root = cas.put(&Directory {
            files,
            ..Default::default()
        });
        let few = WalkLimits {
            max_digests: 5,
            ..WalkLimits::default()
        };
        assert_eq!(run(cas.walk(root, few)), Err(WalkError::TooMany(5)));
        let small = WalkLimits {
            max_directory_bytes: root.size - 1,
            ..WalkLimits::default()
        };
        assert!(matches!(
            run(cas.walk(root, small)),
            Err(WalkError::DirectoryTooLarge { .. })
        ));
        let bad = cas.put(&Directory {
            files: vec![FileNode {
                name: "no-digest".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let err = run(cas.walk(bad, WalkLimits::default())).unwrap_err();
        assert!(
            matches!(&err, WalkError::Digest { field: "FileNode.digest", name, .. } if name == "no-digest"),
            "{err:?}"
        );
        let garbage = Bytes::from_static(&[0xff, 0xff, 0xff]);
        let g = Digest::of(DigestFunction::Sha256, &garbage);
        cas.blobs.insert(g, garbage);
        assert!(matches!(
            run(cas.walk(g, WalkLimits::default())),
            Err(WalkError::NotADirectory { .. })
        ));
    }

    #[test]
    fn an_empty_directory_beside_an_empty_file_is_still_walked() {
        let mut cas = Cas::default();
        let (empty_file, e) = Cas::file("__init__.py", b"");
        let empty_dir = cas.put(&Directory::default());
        assert_eq!(empty_dir, e, "the same digest");
        let root = cas.put(&Directory {
            files: vec![empty_file],
            directories: vec![Cas::dir_node("empty", empty_dir)],
            ..Default::default()
        });
        let mut visited = Vec::new();
        let fetch = |batch: Vec<Digest>| {
            let out = batch.iter().map(|d| cas.blobs.get(d).cloned()).collect();
            async move { Ok::<_, WalkError>(out) }
        };
        let walked = run(walk(root, WalkLimits::default(), fetch, |d, _, _| {
            visited.push(d);
            Ok::<_, WalkError>(())
        }))
        .unwrap();
        assert_eq!(visited, vec![root, empty_dir]);
        assert_eq!(walked.directories, vec![root, empty_dir]);
        assert_eq!(walked.files, vec![e]);
    }

    #[test]
    fn a_directory_met_twice_is_visited_once_at_its_first_depth() {
        let mut cas = Cas::default();
        let shared = cas.put(&Directory::default());
        let mid = cas.put(&Directory {
            directories: vec![Cas::dir_node("deep", shared)],
            ..Default::default()
        });
        let root = cas.put(&Directory {
            directories: vec![Cas::dir_node("mid", mid), Cas::dir_node("near", shared)],
            ..Default::default()
        });
        let mut seen = Vec::new();
        let fetch = |batch: Vec<Digest>| {
            let out = batch.iter().map(|d| cas.blobs.get(d).cloned()).collect();
            async move { Ok::<_, WalkError>(out) }
        };
        run(walk(root, WalkLimits::default(), fetch, |d, depth, _| {
            seen.push((d, depth));
            Ok::<_, WalkError>(())
        }))
        .unwrap();
        assert_eq!(seen, vec![(root, 0), (mid, 1), (shared, 1)]);
    }
}
