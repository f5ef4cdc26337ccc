//! Getting an action's inputs into the local CAS: the input tree's Directory messages, then
//! every file blob not already local, downloaded in parallel (small ones in batches), each
//! verified before it is committed. Everything the action uses is pinned until it finishes.

use crate::error::ActionError;
use crate::local::LocalCas;
use crate::remote::{RemoteCas, SMALL};
use futures::stream::{self, StreamExt};
use kiln_proto::reapi::Directory;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};

/// An input tree: every directory by digest, from the root down.
pub struct InputTree {
    /// The root directory's digest.
    pub root: Digest,
    /// Every directory in the tree.
    pub directories: HashMap<Digest, Directory>,
}

/// Where missing inputs come from.
pub enum Source<'a> {
    /// The local CAS is the server's: a blob missing there is missing.
    Shared,
    /// Download from the server.
    Remote(&'a RemoteCas),
}

/// Fetches the tree under `root` and its files; returns the tree and the pins to release.
pub async fn fetch(
    local: &LocalCas,
    source: &Source<'_>,
    instance: &InstanceName,
    root: Digest,
    function: i32,
    parallelism: usize,
) -> Result<(InputTree, Vec<BlobKey>), ActionError> {
    let directories = fetch_directories(local, source, instance, root, function).await?;
    let mut files: Vec<Digest> = Vec::new();
    let mut seen = HashSet::new();
    for dir in directories.values() {
        for f in &dir.files {
            let d = parse(f.digest.as_ref(), function)?;
            if !d.is_empty_blob() && seen.insert(d) {
                files.push(d);
            }
        }
    }
    let (missing, mut pins) = local.pin(instance, &files).await?;
    if !missing.is_empty() {
        let Source::Remote(remote) = source else {
            local.unpin(&pins).await;
            return Err(ActionError::MissingInputs(missing));
        };
        if let Err(e) = download(local, remote, instance, &missing, parallelism).await {
            local.unpin(&pins).await;
            return Err(e);
        }
        let (still, more) = local.pin(instance, &missing).await?;
        pins.extend(more);
        if !still.is_empty() {
            local.unpin(&pins).await;
            return Err(ActionError::MissingInputs(still));
        }
    }
    Ok((InputTree { root, directories }, pins))
}

fn parse(d: Option<&kiln_proto::reapi::Digest>, function: i32) -> Result<Digest, ActionError> {
    Digest::from_proto_field(d, function)
        .map_err(|e| ActionError::BadInput(format!("input tree: {e}")))
}

async fn fetch_directories(
    local: &LocalCas,
    source: &Source<'_>,
    instance: &InstanceName,
    root: Digest,
    function: i32,
) -> Result<HashMap<Digest, Directory>, ActionError> {
    let mut directories = HashMap::new();
    let mut level = VecDeque::from([root]);
    while !level.is_empty() {
        let wanted: Vec<Digest> = level
            .drain(..)
            .filter(|d| !directories.contains_key(d))
            .collect();
        let mut found = Vec::new();
        let mut absent = Vec::new();
        for d in wanted {
            match local.read(instance, d).await? {
                Some(bytes) => found.push((d, bytes)),
                None => absent.push(d),
            }
        }
        if !absent.is_empty() {
            let Source::Remote(remote) = source else {
                return Err(ActionError::MissingInputs(absent));
            };
            let got = remote.read_small(&absent).await?;
            if got.len() != absent.len() {
                let have: HashSet<Digest> = got.iter().map(|(d, _)| *d).collect();
                return Err(ActionError::MissingInputs(
                    absent.into_iter().filter(|d| !have.contains(d)).collect(),
                ));
            }
            for (d, bytes) in got {
                local.put_bytes(instance, d, bytes.clone()).await?;
                found.push((d, bytes));
            }
        }
        for (d, bytes) in found {
            let dir = Directory::decode(bytes)
                .map_err(|e| ActionError::BadInput(format!("{d:?} is not a Directory: {e}")))?;
            for sub in &dir.directories {
                level.push_back(parse(sub.digest.as_ref(), function)?);
            }
            directories.insert(d, dir);
        }
    }
    Ok(directories)
}

/// Downloads blobs into the local CAS: small ones in batches, large ones streamed to files.
async fn download(
    local: &LocalCas,
    remote: &RemoteCas,
    instance: &InstanceName,
    missing: &[Digest],
    parallelism: usize,
) -> Result<(), ActionError> {
    let (small, large): (Vec<Digest>, Vec<Digest>) = missing.iter().partition(|d| d.size <= SMALL);
    let mut not_found = Vec::new();
    for batch in small.chunks(256) {
        let got = remote.read_small(batch).await?;
        let have: HashSet<Digest> = got.iter().map(|(d, _)| *d).collect();
        not_found.extend(batch.iter().filter(|d| !have.contains(d)).copied());
        stream::iter(got)
            .map(|(d, bytes)| local.put_bytes(instance, d, bytes))
            .buffer_unordered(parallelism.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<(), _>>()?;
    }
    let results: Vec<Result<(), (Digest, ActionError)>> = stream::iter(large)
        .map(|d| async move {
            let temp = local.temp_path();
            match remote.download(d, &temp).await {
                Ok(()) => local
                    .commit_download(instance, d, temp)
                    .await
                    .map_err(|e| (d, e)),
                Err(e) => {
                    let _ = tokio::fs::remove_file(&temp).await;
                    Err((d, e))
                }
            }
        })
        .buffer_unordered(parallelism.max(1))
        .collect()
        .await;
    for r in results {
        match r {
            Ok(()) => {}
            Err((d, ActionError::Remote(s))) if s.code() == tonic::Code::NotFound => {
                not_found.push(d)
            }
            Err((_, e)) => return Err(e),
        }
    }
    if !not_found.is_empty() {
        return Err(ActionError::MissingInputs(not_found));
    }
    Ok(())
}
