//! Completeness checking: an action result is served only when every blob it references is in
//! the CAS — output files, stdout/stderr, output directories' `Tree` messages and every file
//! inside them (or, for directory-format outputs, the `Directory` blobs and their files).
//! Checking counts as a use, so a hit also refreshes those blobs' place in the LRU.

use crate::error::ControlError;
use kiln_proto::reapi::{self, ActionResult, Directory, Tree};
use kiln_reapi::cas::{self, Cas};
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use kiln_reapi::walk::{Walk, WalkError, WalkLimits};
use prost::Message;
use std::collections::HashSet;

/// Bytes of Directory blobs held at once while walking an output directory.
const WALK_BATCH_BYTES: u64 = 16 << 20;
/// File digests gathered before they are looked up: a check holds at most one output tree's
/// (or one walk's) files and this many more, however many output directories it covers.
const CHECK_CHUNK: usize = 1 << 16;

/// Limits on how much a check may read.
#[derive(Debug, Clone, Copy)]
pub struct CheckLimits {
    /// Largest `Tree` or `Directory` blob fetched: a result naming a larger one cannot be
    /// checked whole, so it is not served (as one over `max_digests`).
    pub max_tree_bytes: u64,
    /// Most digests one check goes through: the output directories a result names, the
    /// files their trees list and the directories and files its walks meet, all together.
    /// A result that needs more (many large trees, or many roots sharing one large subtree)
    /// is not served, so no result costs more than this at each check.
    pub max_digests: usize,
    /// A result found complete is checked again after this long even when no blob has left
    /// the CAS, so that a hit keeps marking its blobs used.
    pub recheck_after: std::time::Duration,
}

/// Why a result is not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incomplete {
    /// These blobs are missing from the CAS.
    Missing(Vec<Digest>),
    /// A referenced digest, tree or directory is malformed.
    Malformed(String),
    /// Checking it needs more than this server allows (another server may allow more): more
    /// digests than [`CheckLimits::max_digests`], or a tree or directory blob larger than
    /// [`CheckLimits::max_tree_bytes`].
    OverBudget(String),
}

/// Checks `result`; `Ok(None)` means complete.
pub async fn check(
    cas: &dyn Cas,
    instance: &InstanceName,
    function: DigestFunction,
    result: &ActionResult,
    limits: CheckLimits,
) -> Result<Option<Incomplete>, ControlError> {
    let parse = |d: &reapi::Digest| Digest::from_proto(d, function.proto() as i32);
    let mut direct = Vec::new();
    let mut trees = Vec::new();
    let mut roots = Vec::new();
    let push = |d: Option<&reapi::Digest>, out: &mut Vec<Digest>| -> Result<(), String> {
        if let Some(d) = d {
            out.push(parse(d).map_err(|e| e.to_string())?);
        }
        Ok(())
    };
    let collected: Result<(), String> = (|| {
        for f in &result.output_files {
            push(f.digest.as_ref(), &mut direct)?;
        }
        push(result.stdout_digest.as_ref(), &mut direct)?;
        push(result.stderr_digest.as_ref(), &mut direct)?;
        for d in &result.output_directories {
            push(d.tree_digest.as_ref(), &mut trees)?;
            push(d.root_directory_digest.as_ref(), &mut roots)?;
        }
        Ok(())
    })();
    if let Err(e) = collected {
        return Ok(Some(Incomplete::Malformed(e)));
    }
    // Each tree and root is read once, however often the result names it.
    trees.sort_unstable();
    trees.dedup();
    roots.sort_unstable();
    roots.dedup();
    if trees.len() + roots.len() > limits.max_digests {
        return Ok(Some(Incomplete::OverBudget(format!(
            "{} output directories: more than {} to check (action_cache.max_check_digests)",
            trees.len() + roots.len(),
            limits.max_digests
        ))));
    }
    let mut all = direct;
    all.extend(trees.iter().copied());
    all.extend(roots.iter().copied());
    let missing = missing_of(cas, instance, &all).await?;
    if !missing.is_empty() {
        return Ok(Some(Incomplete::Missing(missing)));
    }
    let too_much = || {
        Ok(Some(Incomplete::OverBudget(format!(
            "more than {} digests to check in its output directories (action_cache.max_check_digests)",
            limits.max_digests
        ))))
    };
    // What is left of the check's digests once the output directories are counted.
    let mut budget = limits.max_digests - (trees.len() + roots.len());
    let mut files = Vec::new();
    for tree in trees {
        if tree.size > limits.max_tree_bytes {
            // Its files cannot be checked, so it is not believed complete.
            return Ok(Some(Incomplete::OverBudget(format!(
                "output tree {tree:?} is over the {} bytes a check reads (server.max_message_bytes, at least 64 MiB)",
                limits.max_tree_bytes
            ))));
        }
        let data = match fetch(cas, instance, tree).await? {
            Some(d) => d,
            None => return Ok(Some(Incomplete::Missing(vec![tree]))),
        };
        let Ok(tree_msg) = Tree::decode(data) else {
            return Ok(Some(Incomplete::Malformed(format!(
                "{tree:?} is not a Tree"
            ))));
        };
        let before = files.len();
        for dir in tree_msg.root.iter().chain(tree_msg.children.iter()) {
            if let Err(e) = dir_files(dir, &parse, &mut files) {
                return Ok(Some(Incomplete::Malformed(e)));
            }
        }
        let Some(left) = budget.checked_sub(files.len() - before) else {
            return too_much();
        };
        budget = left;
        if let Some(missing) = look_up(cas, instance, &mut files, CHECK_CHUNK).await? {
            return Ok(Some(missing));
        }
    }
    for root in roots {
        match walk(cas, instance, root, limits, &mut budget, &mut files).await? {
            WalkEnd::Done => {}
            WalkEnd::TooMuch => return too_much(),
            WalkEnd::Incomplete(incomplete) => return Ok(Some(incomplete)),
        }
        if let Some(missing) = look_up(cas, instance, &mut files, CHECK_CHUNK).await? {
            return Ok(Some(missing));
        }
    }
    look_up(cas, instance, &mut files, 0).await
}

/// Looks the gathered `files` up (and forgets them) once there are at least `at_least` of
/// them; what is missing, if anything.
async fn look_up(
    cas: &dyn Cas,
    instance: &InstanceName,
    files: &mut Vec<Digest>,
    at_least: usize,
) -> Result<Option<Incomplete>, ControlError> {
    if files.is_empty() || files.len() < at_least {
        return Ok(None);
    }
    let missing = missing_of(cas, instance, files).await?;
    files.clear();
    Ok((!missing.is_empty()).then_some(Incomplete::Missing(missing)))
}

async fn missing_of(
    cas: &dyn Cas,
    instance: &InstanceName,
    digests: &[Digest],
) -> Result<Vec<Digest>, ControlError> {
    let unique: Vec<Digest> = digests
        .iter()
        .copied()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    Ok(cas.find_missing(instance, &unique).await?)
}

async fn fetch(
    cas: &dyn Cas,
    instance: &InstanceName,
    digest: Digest,
) -> Result<Option<bytes::Bytes>, ControlError> {
    Ok(cas::read_blob(cas, instance, digest).await?)
}

fn dir_files(
    dir: &Directory,
    parse: &impl Fn(&reapi::Digest) -> Result<Digest, kiln_reapi::digest::DigestError>,
    out: &mut Vec<Digest>,
) -> Result<(), String> {
    for f in &dir.files {
        let d = f
            .digest
            .as_ref()
            .ok_or_else(|| format!("file {:?} has no digest", f.name))?;
        out.push(parse(d).map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// How a walk of one output directory ended.
enum WalkEnd {
    /// Its files are gathered.
    Done,
    /// It meets more digests than the check has left.
    TooMuch,
    /// Parts are missing, or malformed.
    Incomplete(Incomplete),
}

/// Walks a directory-format output with `kiln_reapi::walk`, collecting file digests and
/// taking the digests it meets from `budget`. A directory too large to read ends it: the
/// output cannot be checked whole, so the result is over the budget.
async fn walk(
    cas: &dyn Cas,
    instance: &InstanceName,
    root: Digest,
    limits: CheckLimits,
    budget: &mut usize,
    files: &mut Vec<Digest>,
) -> Result<WalkEnd, ControlError> {
    let mut walk = Walk::new(
        root,
        WalkLimits {
            max_digests: *budget,
            max_directory_bytes: limits.max_tree_bytes,
            batch_bytes: WALK_BATCH_BYTES,
        },
    );
    loop {
        let batch = match walk.next_batch() {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => batch,
            // A Directory too large to read: the rest of the tree cannot be checked.
            Err(e) => {
                let why = format!("{e} (server.max_message_bytes, at least 64 MiB)");
                return Ok(WalkEnd::Incomplete(Incomplete::OverBudget(why)));
            }
        };
        let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
        let fetched = cas.read_blobs(instance, &digests).await?;
        for ((digest, depth), bytes) in batch.into_iter().zip(fetched) {
            let Some(bytes) = bytes else {
                walk.missing(digest);
                continue;
            };
            match walk.found(digest, depth, &bytes) {
                Ok(_) => {}
                Err(WalkError::TooMany(_)) => return Ok(WalkEnd::TooMuch),
                Err(e) => return Ok(WalkEnd::Incomplete(Incomplete::Malformed(e.to_string()))),
            }
        }
    }
    let walked = walk.finish();
    if !walked.missing.is_empty() {
        return Ok(WalkEnd::Incomplete(Incomplete::Missing(walked.missing)));
    }
    let met = walked.directories.len() + walked.files.len();
    *budget = budget.saturating_sub(met);
    files.extend(walked.files);
    Ok(WalkEnd::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::cas::{CasError, CasFuture};
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A CAS in memory that counts the blobs read whole (no store here counts its reads).
    #[derive(Default)]
    struct Counting {
        blobs: HashMap<Digest, bytes::Bytes>,
        reads: AtomicUsize,
        /// The most digests one `find_missing` was asked about.
        largest_lookup: AtomicUsize,
    }

    impl Cas for Counting {
        fn find_missing<'a>(
            &'a self,
            _: &'a InstanceName,
            digests: &'a [Digest],
        ) -> CasFuture<'a, Vec<Digest>> {
            self.largest_lookup
                .fetch_max(digests.len(), Ordering::SeqCst);
            let missing = digests
                .iter()
                .filter(|d| !self.blobs.contains_key(d))
                .copied();
            let missing = missing.collect();
            Box::pin(async move { Ok(missing) })
        }
        fn read_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            digests: &'a [Digest],
        ) -> CasFuture<'a, Vec<Option<bytes::Bytes>>> {
            self.reads.fetch_add(digests.len(), Ordering::SeqCst);
            let found = digests.iter().map(|d| self.blobs.get(d).cloned()).collect();
            Box::pin(async move { Ok(found) })
        }
        fn read_to_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a Path,
        ) -> CasFuture<'a, bool> {
            Box::pin(async move { Err(CasError::Remote(tonic::Status::unimplemented("not here"))) })
        }
        fn write_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Vec<(Digest, bytes::Bytes)>,
        ) -> CasFuture<'a, ()> {
            Box::pin(async move { Err(CasError::Remote(tonic::Status::unimplemented("not here"))) })
        }
        fn write_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a Path,
        ) -> CasFuture<'a, ()> {
            Box::pin(async move { Err(CasError::Remote(tonic::Status::unimplemented("not here"))) })
        }
    }

    /// An output tree, or a directory output's `Directory`, larger than a check reads cannot
    /// be checked whole: the result is over the check's budget, not complete.
    #[tokio::test]
    async fn trees_too_large_to_read_are_over_the_budget() {
        let sha = DigestFunction::Sha256;
        let file = Digest::of(sha, b"a file");
        let big_dir = Directory {
            files: (0..100)
                .map(|i| reapi::FileNode {
                    name: format!("file-{i}"),
                    digest: Some(file.to_proto()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let tree = Tree {
            root: Some(big_dir.clone()),
            children: Vec::new(),
        }
        .encode_to_vec();
        let dir = big_dir.encode_to_vec();
        let (tree_digest, dir_digest) = (Digest::of(sha, &tree), Digest::of(sha, &dir));
        let mut cas = Counting::default();
        cas.blobs.insert(tree_digest, tree.into());
        cas.blobs.insert(dir_digest, dir.into());
        cas.blobs.insert(file, bytes::Bytes::from_static(b"a file"));
        let instance = InstanceName::default_instance();
        let as_tree = ActionResult {
            output_directories: vec![reapi::OutputDirectory {
                tree_digest: Some(tree_digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let as_root = ActionResult {
            output_directories: vec![reapi::OutputDirectory {
                root_directory_digest: Some(dir_digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let limits = |max_tree_bytes| CheckLimits {
            max_tree_bytes,
            max_digests: 1_000,
            recheck_after: std::time::Duration::from_secs(60),
        };
        for result in [&as_tree, &as_root] {
            let whole = check(&cas, &instance, sha, result, limits(1 << 20)).await;
            assert_eq!(whole.unwrap(), None, "read whole: complete");
            let over = check(&cas, &instance, sha, result, limits(1 << 10)).await;
            assert!(
                matches!(over.unwrap(), Some(Incomplete::OverBudget(_))),
                "too large to read: not complete"
            );
        }
    }

    #[tokio::test]
    async fn a_tree_named_many_times_is_read_once_and_too_many_are_refused() {
        let tree = Tree::default().encode_to_vec();
        let digest = Digest::of(DigestFunction::Sha256, &tree);
        let mut cas = Counting::default();
        cas.blobs.insert(digest, tree.into());
        let dir = reapi::OutputDirectory {
            tree_digest: Some(digest.to_proto()),
            ..Default::default()
        };
        let result = ActionResult {
            output_directories: vec![dir; 1000],
            ..Default::default()
        };
        let limits = CheckLimits {
            max_tree_bytes: 1 << 20,
            max_digests: 10,
            recheck_after: std::time::Duration::from_secs(60),
        };
        let instance = InstanceName::default_instance();
        let checked = check(&cas, &instance, DigestFunction::Sha256, &result, limits).await;
        assert_eq!(checked.unwrap(), None, "complete");
        assert_eq!(cas.reads.load(Ordering::SeqCst), 1, "read once");
        // More distinct trees than a check may read: not believed complete.
        let many: Vec<reapi::OutputDirectory> = (0..11u32)
            .map(|i| reapi::OutputDirectory {
                tree_digest: Some(Digest::of(DigestFunction::Sha256, &i.to_le_bytes()).to_proto()),
                ..Default::default()
            })
            .collect();
        let result = ActionResult {
            output_directories: many,
            ..Default::default()
        };
        let checked = check(&cas, &instance, DigestFunction::Sha256, &result, limits).await;
        assert!(matches!(checked.unwrap(), Some(Incomplete::OverBudget(_))));
    }

    /// However many output trees a result names, their files are all checked, a chunk at a
    /// time (a look-up never holds more than a chunk and one tree's files): a missing file
    /// is found whichever tree lists it.
    #[tokio::test]
    async fn every_tree_file_is_checked_a_chunk_at_a_time() {
        const FILES: u32 = 40_000;
        for absent_in in 0..3u32 {
            let mut cas = Counting::default();
            let mut dirs = Vec::new();
            let mut absent = None;
            for t in 0..3u32 {
                let files: Vec<reapi::FileNode> = (0..FILES)
                    .map(|f| {
                        let data = [t.to_le_bytes(), f.to_le_bytes()].concat();
                        let digest = Digest::of(DigestFunction::Sha256, &data);
                        if t == absent_in && f == FILES / 2 {
                            absent = Some(digest);
                        } else {
                            cas.blobs.insert(digest, data.into());
                        }
                        reapi::FileNode {
                            name: format!("f{f}"),
                            digest: Some(digest.to_proto()),
                            ..Default::default()
                        }
                    })
                    .collect();
                let tree = Tree {
                    root: Some(Directory {
                        files,
                        ..Default::default()
                    }),
                    children: Vec::new(),
                }
                .encode_to_vec();
                let digest = Digest::of(DigestFunction::Sha256, &tree);
                cas.blobs.insert(digest, tree.into());
                dirs.push(reapi::OutputDirectory {
                    tree_digest: Some(digest.to_proto()),
                    ..Default::default()
                });
            }
            let result = ActionResult {
                output_directories: dirs,
                ..Default::default()
            };
            let limits = CheckLimits {
                max_tree_bytes: 64 << 20,
                max_digests: 1_000_000,
                recheck_after: std::time::Duration::from_secs(60),
            };
            let instance = InstanceName::default_instance();
            let checked = check(&cas, &instance, DigestFunction::Sha256, &result, limits).await;
            assert_eq!(
                checked.unwrap(),
                Some(Incomplete::Missing(vec![absent.unwrap()])),
                "missing in tree {absent_in}"
            );
            let largest = cas.largest_lookup.load(Ordering::SeqCst);
            assert!(
                largest <= CHECK_CHUNK + FILES as usize,
                "one look-up of {largest} digests"
            );
        }
    }

    /// Output directories that share one subtree are walked each (the walks are separate),
    /// so what they meet is counted together against the check's limit: past it the result
    /// is not served, and within it every file is checked.
    #[tokio::test]
    async fn roots_sharing_a_subtree_count_together() {
        let mut cas = Counting::default();
        let mut put = |bytes: Vec<u8>| {
            let digest = Digest::of(DigestFunction::Sha256, &bytes);
            cas.blobs.insert(digest, bytes.into());
            digest
        };
        let node = |name: String, digest: Digest| reapi::FileNode {
            name,
            digest: Some(digest.to_proto()),
            ..Default::default()
        };
        let files: Vec<reapi::FileNode> = (0..50u32)
            .map(|f| node(format!("f{f}"), put(f.to_le_bytes().to_vec())))
            .collect();
        let shared = put(Directory {
            files,
            ..Default::default()
        }
        .encode_to_vec());
        let mut dirs = Vec::new();
        for r in 0..2u32 {
            let marker = put(format!("root {r}").into_bytes());
            let root = put(Directory {
                files: vec![node("marker".into(), marker)],
                directories: vec![reapi::DirectoryNode {
                    name: "sub".into(),
                    digest: Some(shared.to_proto()),
                }],
                ..Default::default()
            }
            .encode_to_vec());
            dirs.push(reapi::OutputDirectory {
                root_directory_digest: Some(root.to_proto()),
                ..Default::default()
            });
        }
        let result = ActionResult {
            output_directories: dirs,
            ..Default::default()
        };
        let instance = InstanceName::default_instance();
        let limits = |max_digests| CheckLimits {
            max_tree_bytes: 1 << 20,
            max_digests,
            recheck_after: std::time::Duration::from_secs(60),
        };
        // The two roots named, then each walk meets its root, the shared directory, the
        // marker and 50 files: 2 + 53 + 53 = 108.
        let sha = DigestFunction::Sha256;
        let within = check(&cas, &instance, sha, &result, limits(108)).await;
        assert_eq!(within.unwrap(), None);
        let past = check(&cas, &instance, sha, &result, limits(107)).await;
        assert!(
            matches!(past.unwrap(), Some(Incomplete::OverBudget(ref why)) if why.contains("more than 107")),
            "108 digests are over 107"
        );
        // Within the limit, every file is looked up: one gone from the CAS is found.
        let gone = Digest::of(sha, &49u32.to_le_bytes());
        cas.blobs.remove(&gone);
        let missing = check(&cas, &instance, sha, &result, limits(108)).await;
        assert_eq!(missing.unwrap(), Some(Incomplete::Missing(vec![gone])));
    }
}
