//! Completeness checking: an action result is served only when every blob it references is in
//! the CAS — output files, stdout/stderr, output directories' `Tree` messages and every file
//! inside them (or, for directory-format outputs, the `Directory` blobs and their files).
//! Checking counts as a use, so a hit also refreshes those blobs' place in the LRU.

use crate::error::ControlError;
use kiln_dataplane::store::{CasClient, Found};
use kiln_proto::reapi::{self, ActionResult, Directory, Tree};
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use prost::Message;
use std::collections::{HashSet, VecDeque};

/// Limits on how much a check may read.
#[derive(Debug, Clone, Copy)]
pub struct CheckLimits {
    /// Largest `Tree` or `Directory` blob fetched.
    pub max_tree_bytes: u64,
    /// Most `Directory` blobs walked for one directory-format output.
    pub max_directories: usize,
}

/// Why a result is not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incomplete {
    /// These blobs are missing from the CAS.
    Missing(Vec<Digest>),
    /// A referenced digest, tree or directory is malformed.
    Malformed(String),
}

/// Checks `result`; `Ok(None)` means complete.
pub async fn check(
    cas: &CasClient,
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
    let mut all = direct;
    all.extend(trees.iter().copied());
    all.extend(roots.iter().copied());
    let missing = missing_of(cas, instance, &all).await?;
    if !missing.is_empty() {
        return Ok(Some(Incomplete::Missing(missing)));
    }
    let mut files = Vec::new();
    for tree in trees {
        if tree.size > limits.max_tree_bytes {
            tracing::warn!(tree = ?tree, limit = limits.max_tree_bytes, "output tree too large to check its files; checked the tree blob only");
            continue;
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
        for dir in tree_msg.root.iter().chain(tree_msg.children.iter()) {
            if let Err(e) = dir_files(dir, &parse, &mut files) {
                return Ok(Some(Incomplete::Malformed(e)));
            }
        }
    }
    for root in roots {
        match walk(cas, instance, root, &parse, limits, &mut files).await? {
            None => {}
            Some(incomplete) => return Ok(Some(incomplete)),
        }
    }
    let missing = missing_of(cas, instance, &files).await?;
    Ok((!missing.is_empty()).then_some(Incomplete::Missing(missing)))
}

async fn missing_of(
    cas: &CasClient,
    instance: &InstanceName,
    digests: &[Digest],
) -> Result<Vec<Digest>, ControlError> {
    let unique: Vec<Digest> = digests
        .iter()
        .copied()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let keys: Vec<BlobKey> = unique
        .iter()
        .map(|d| BlobKey::new(instance.clone(), *d))
        .collect();
    Ok(cas
        .find_missing(&keys)
        .await?
        .into_iter()
        .map(|k| k.digest)
        .collect())
}

async fn fetch(
    cas: &CasClient,
    instance: &InstanceName,
    digest: Digest,
) -> Result<Option<bytes::Bytes>, ControlError> {
    match cas
        .lookup(&BlobKey::new(instance.clone(), digest), u64::MAX)
        .await?
    {
        Found::Bytes(b) => Ok(Some(b)),
        Found::Missing | Found::File { .. } => Ok(None),
    }
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

/// Walks a directory-format output breadth first, collecting file digests.
async fn walk(
    cas: &CasClient,
    instance: &InstanceName,
    root: Digest,
    parse: &impl Fn(&reapi::Digest) -> Result<Digest, kiln_reapi::digest::DigestError>,
    limits: CheckLimits,
    files: &mut Vec<Digest>,
) -> Result<Option<Incomplete>, ControlError> {
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    while let Some(digest) = queue.pop_front() {
        if seen.len() > limits.max_directories || digest.size > limits.max_tree_bytes {
            tracing::warn!(root = ?root, "output directory too large to check completely; checked part of it");
            return Ok(None);
        }
        let Some(data) = fetch(cas, instance, digest).await? else {
            return Ok(Some(Incomplete::Missing(vec![digest])));
        };
        let Ok(dir) = Directory::decode(data) else {
            return Ok(Some(Incomplete::Malformed(format!(
                "{digest:?} is not a Directory"
            ))));
        };
        if let Err(e) = dir_files(&dir, parse, files) {
            return Ok(Some(Incomplete::Malformed(e)));
        }
        for sub in &dir.directories {
            let Some(d) = sub.digest.as_ref() else {
                return Ok(Some(Incomplete::Malformed(format!(
                    "directory {:?} has no digest",
                    sub.name
                ))));
            };
            let d = match parse(d) {
                Ok(d) => d,
                Err(e) => return Ok(Some(Incomplete::Malformed(e.to_string()))),
            };
            if seen.insert(d) {
                queue.push_back(d);
            }
        }
    }
    Ok(None)
}
