//! From an Execute request to a job: fetch the Action and Command, walk the input tree, make
//! sure every blob is in the CAS (pinning them for the action's lifetime while the pin budget
//! allows), and read the platform and timeout. Missing blobs are answered the way REAPI says,
//! FAILED_PRECONDITION with a PreconditionFailure naming each one, so clients upload them.

use super::prepare_error::PrepareError;
use super::{ExecutionCore, Payload};
use crate::scheduler::input_tree::{InputTree, WalkedDir};
use crate::scheduler::platform::Requirements;
use crate::scheduler::Job;
use futures::stream::{self, StreamExt, TryStreamExt};
use kiln_dataplane::store::tier::{pin_to_the_end, PinHolder};
use kiln_proto::reapi::{Action, Command, Directory, ExecuteRequest};
use kiln_proto::worker::StartExecute;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::status;
use kiln_reapi::walk::WalkLimits;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Directory blobs fetched at once while walking.
const WALK_PARALLELISM: usize = 64;
/// Largest Action, Command or Directory blob read: they are read whole into memory (the
/// walk's own bound for a Directory, so that every metadata blob has the same).
const MAX_METADATA_BYTES: u64 = WALK_DEFAULTS.max_directory_bytes;
/// Directories, and subdirectory links between them, of a tree sized for placement at most.
const MAX_SIZED_DIRS: usize = 100_000;
const MAX_SIZED_EDGES: usize = 1_000_000;
/// The walk's bounds other than the digest count, which is configured.
const WALK_DEFAULTS: WalkLimits = WalkLimits::DEFAULT;

/// Builds the job for an Execute request (the cache lookup has already missed).
pub(super) async fn prepare(
    core: &ExecutionCore,
    key: &BlobKey,
    request: &ExecuteRequest,
) -> Result<Job<Arc<Payload>>, PrepareError> {
    let instance = &key.instance;
    let function = key.digest.function.proto() as i32;
    let mut missing: Vec<Digest> = Vec::new();
    let action: Action = match fetch(core, instance, key.digest, "Action").await? {
        Some(bytes) => decode(&bytes, "Action")?,
        None => return Err(precondition(vec![key.digest])),
    };
    let command_digest = field(
        action.command_digest.as_ref(),
        function,
        "Action.command_digest",
    )?;
    let root_digest = field(
        action.input_root_digest.as_ref(),
        function,
        "Action.input_root_digest",
    )?;
    let command: Option<Command> = match fetch(core, instance, command_digest, "Command").await? {
        Some(bytes) => Some(decode(&bytes, "Command")?),
        None => {
            missing.push(command_digest);
            None
        }
    };
    if let Some(command) = &command {
        check_paths(command)?;
    }
    let (blobs, files, missing_dirs, tree) = walk(core, instance, root_digest).await?;
    missing.extend(missing_dirs);
    let mut all: Vec<BlobKey> = blobs
        .into_iter()
        .map(|d| BlobKey::new(instance.clone(), d))
        .collect();
    all.push(key.clone());
    all.push(BlobKey::new(instance.clone(), command_digest));
    let total: u64 = all
        .iter()
        .fold(0u64, |sum, k| sum.saturating_add(k.digest.size));
    let accounting = core.cas.accounting();
    let budget = accounting.cap() / 100 * core.config.pin_budget_percent as u64;
    let pin = accounting.pinned().saturating_add(total) <= budget;
    // No deadline: the operation releases them when it ends, and the scheduler ends every
    // operation (a result, its timeout, a cancellation, shutdown), however long it queued.
    let holder = PinHolder::unbounded();
    let present: Vec<bool> = if pin {
        let pinned = pin_to_the_end(core.store.clone(), holder, all.clone()).await?;
        pinned.into_iter().map(|p| p.is_some()).collect()
    } else {
        tracing::warn!(action = ?key.digest, bytes = total, "pin budget exhausted; running this action's inputs unpinned");
        core.store.contains(&all).await?
    };
    let pins: Vec<BlobKey> = if pin {
        all.iter()
            .zip(&present)
            .filter(|(_, p)| **p)
            .map(|(k, _)| k.clone())
            .collect()
    } else {
        Vec::new()
    };
    missing.extend(
        all.iter()
            .zip(&present)
            .filter(|(_, p)| !**p)
            .map(|(k, _)| k.digest),
    );
    let command = match (command, missing.is_empty()) {
        (Some(c), true) => c,
        _ => {
            release(core, holder, pins);
            return Err(precondition(missing));
        }
    };
    let properties = kiln_reapi::convert::platform_properties(&action, &command);
    let requirements = match Requirements::new(&core.kinds, properties) {
        Ok(r) => r,
        Err(why) => {
            release(core, holder, pins);
            return Err(PrepareError::Platform(why));
        }
    };
    let requested = action
        .timeout
        .as_ref()
        .map(kiln_reapi::convert::duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(core.config.default_timeout_secs));
    let timeout = requested.min(Duration::from_secs(core.config.max_timeout_secs));
    let cacheable = !action.do_not_cache;
    Ok(Job {
        key: key.clone(),
        priority: request.execution_policy.as_ref().map_or(0, |p| p.priority),
        requirements,
        timeout,
        mergeable: cacheable,
        queued_at: SystemTime::now(),
        input_root: Some(BlobKey::new(instance.clone(), root_digest)),
        inputs: largest_first(instance, files),
        tree: Arc::new(tree),
        payload: Arc::new(Payload {
            start: StartExecute {
                instance_name: instance.as_str().to_string(),
                digest_function: function,
                action_digest: Some(key.digest.to_proto()),
                action: Some(action),
                command: Some(command),
                ..Default::default()
            },
            key: key.clone(),
            cacheable,
            pins,
            holder,
        }),
    })
}

/// The working directory and every output path must stay inside the input root (REAPI: "The
/// path MUST NOT include a trailing slash, nor a leading slash, being a relative path").
/// Tested by `escaping_paths_and_trees_are_refused` in tests/execution.rs.
fn check_paths(command: &Command) -> Result<(), PrepareError> {
    let wd = kiln_reapi::paths::relative("Command.working_directory", &command.working_directory)?;
    for rel in kiln_reapi::paths::declared_outputs(command) {
        kiln_reapi::paths::output(&wd, rel)?;
    }
    // REAPI: output paths "MUST be deduplicated" (and an output file or directory "cannot be
    // duplicated"): the same place twice would be collected twice. Among the outputs the
    // worker collects: `output_paths` when given, else the older fields (a client may send
    // both, the same paths in each, for older servers).
    #[allow(deprecated)]
    let collected: Vec<&String> = if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .chain(&command.output_directories)
            .collect()
    } else {
        command.output_paths.iter().collect()
    };
    let mut seen = std::collections::HashSet::new();
    for rel in collected {
        if !seen.insert(kiln_reapi::paths::output(&wd, rel)?) {
            return Err(kiln_reapi::paths::PathError {
                what: "output path".into(),
                path: rel.clone(),
                why: "is declared more than once (the same place, however written)",
            }
            .into());
        }
    }
    Ok(())
}

fn field(
    d: Option<&kiln_proto::reapi::Digest>,
    function: i32,
    name: &'static str,
) -> Result<Digest, PrepareError> {
    Digest::from_proto_field(d, function).map_err(|source| PrepareError::Digest {
        field: name,
        source,
    })
}

fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, PrepareError> {
    M::decode(bytes).map_err(|e| PrepareError::Decode {
        what,
        why: e.to_string(),
    })
}

/// Reads a small message blob (`what`: Action, Command, Directory); `None` if it is missing.
async fn fetch(
    core: &ExecutionCore,
    instance: &InstanceName,
    digest: Digest,
    what: &'static str,
) -> Result<Option<bytes::Bytes>, PrepareError> {
    let too_large = || PrepareError::TooLarge {
        what,
        digest,
        limit: MAX_METADATA_BYTES,
    };
    if digest.size > MAX_METADATA_BYTES {
        return Err(too_large());
    }
    Ok(kiln_reapi::cas::read_blob(&*core.blobs, instance, digest).await?)
}

/// Every blob digest of the input tree (directories and files), the files apart, the
/// directories missing, and the tree's largest directories with their bytes (for placement).
/// The walk is `kiln_reapi::walk`'s, bounded by `execution.max_input_digests`, 16 MiB per
/// Directory and 64 MiB of them in memory at once; each Directory is checked with
/// `kiln_reapi::tree`'s rules at the depth it was first met.
async fn walk(
    core: &ExecutionCore,
    instance: &InstanceName,
    root: Digest,
) -> Result<(Vec<Digest>, Vec<Digest>, Vec<Digest>, InputTree), PrepareError> {
    let limits = WalkLimits {
        max_digests: core.config.max_input_digests,
        ..WALK_DEFAULTS
    };
    let fetch_batch = |batch: Vec<Digest>| async move {
        stream::iter(batch)
            .map(|d| fetch(core, instance, d, "Directory"))
            .buffered(WALK_PARALLELISM)
            .try_collect::<Vec<_>>()
            .await
    };
    // Each directory's own file bytes and subdirectories, for the tree's sizes (the walk
    // has parsed and checked every digest in it); past a bound, no sizes (placement then
    // goes by root and blobs only) rather than memory growing with the tree.
    let mut dirs: Vec<WalkedDir> = Vec::new();
    let mut edges = 0usize;
    let mut sized = true;
    let check = |digest: Digest, depth, dir: Directory| {
        kiln_reapi::tree::check_directory(&dir, depth, &format!("{digest:?}"))
            .map_err(PrepareError::from)?;
        if sized {
            let walked = walked_dir(digest, &dir);
            edges = edges.saturating_add(walked.children.len());
            sized = dirs.len() < MAX_SIZED_DIRS && edges <= MAX_SIZED_EDGES;
            dirs.push(walked);
        }
        Ok::<(), PrepareError>(())
    };
    let walked = kiln_reapi::walk::walk(root, limits, fetch_batch, check).await?;
    let tree = if sized {
        InputTree::new(instance, root, &dirs)
    } else {
        InputTree::empty()
    };
    // A digest can be both a directory and a file (the empty blob): pin it once.
    let mut seen = std::collections::HashSet::new();
    let blobs = walked
        .directories
        .into_iter()
        .chain(walked.files.iter().copied())
        .filter(|d| seen.insert(*d))
        .collect();
    Ok((blobs, walked.files, walked.missing, tree))
}

/// What placement needs of a walked directory: its files' bytes and its subdirectories.
fn walked_dir(digest: Digest, dir: &Directory) -> WalkedDir {
    let function = digest.function.proto() as i32;
    let parse = |d| Digest::from_proto_field(d, function).ok();
    let file_bytes = dir
        .files
        .iter()
        .filter_map(|f| parse(f.digest.as_ref()))
        .fold(0u64, |sum, d| sum.saturating_add(d.size));
    let nodes = dir
        .directories
        .iter()
        .filter_map(|n| parse(n.digest.as_ref()));
    WalkedDir::new(digest, file_bytes, nodes)
}

/// The input files the scheduler places by and hints peers for: the largest first (it weighs
/// a bounded number), the empty blob left out.
fn largest_first(instance: &InstanceName, mut files: Vec<Digest>) -> Arc<[BlobKey]> {
    files.retain(|d| !d.is_empty_blob());
    files.sort_unstable_by_key(|d| std::cmp::Reverse(d.size));
    files
        .into_iter()
        .map(|d| BlobKey::new(instance.clone(), d))
        .collect()
}

/// Releases `holder`'s pins in a task of its own (the caller may be cancelled at its next
/// await).
fn release(core: &ExecutionCore, holder: PinHolder, pins: Vec<BlobKey>) {
    if pins.is_empty() {
        return;
    }
    let store = core.store.clone();
    tokio::spawn(async move { store.unpin(holder, &pins).await });
}

/// FAILED_PRECONDITION naming the missing blobs (see [`kiln_reapi::status::missing_blobs`]).
/// Tested by `failures_timeouts_and_missing_inputs` and `escaping_paths_and_trees_are_refused`
/// in tests/execution.rs.
fn precondition(missing: Vec<Digest>) -> PrepareError {
    PrepareError::Missing(status::missing_blobs("the action", missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same output place twice is refused among the outputs collected; a client that
    /// sends the same paths in `output_paths` and the older fields (for older servers) is not.
    #[test]
    #[allow(deprecated)]
    fn duplicate_outputs_are_refused_among_those_collected() {
        let paths = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let both = Command {
            output_paths: paths(&["a", "b"]),
            output_files: paths(&["a"]),
            output_directories: paths(&["b"]),
            ..Default::default()
        };
        assert!(check_paths(&both).is_ok());
        for command in [
            Command {
                output_paths: paths(&["out/a", "out/b/../a"]),
                ..Default::default()
            },
            Command {
                output_files: paths(&["x"]),
                output_directories: paths(&["x"]),
                ..Default::default()
            },
            Command {
                working_directory: "w".into(),
                output_paths: paths(&["../w/f", "f"]),
                ..Default::default()
            },
        ] {
            let err = check_paths(&command).unwrap_err();
            assert!(err.to_string().contains("more than once"), "{err}");
        }
    }
}
