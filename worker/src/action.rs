//! One action from start to report: fetch inputs, materialise them, run, collect and store
//! outputs, report the result with timestamps, and clean up. Pins on inputs are held from fetch
//! to the end.

use crate::dircache::{DirCache, Lease};
use crate::error::ActionError;
use crate::fetch::{Remote, Source};
use crate::inputs::{place, CacheUse, EntryBuilding};
use crate::local::LocalCas;
use crate::materialise::remove_tree;
use crate::outputs::{collect, Blob, OutputOwners, Staging};
use crate::remote::SMALL;
use crate::run::{run, RunEnd, RunSpec};
use kiln_dataplane::store::tier::PinHolder;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::{ActionResult, Command, ExecutedActionMetadata};
use kiln_proto::worker::{ExecutionResult, StartExecute};
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use kiln_reapi::paths;
use kiln_reapi::status::Classify;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// Input files taken from a `StartExecute`'s list of those known missing (the scheduler sends
/// at most as many).
const MAX_MISSING: usize = 100_000;

/// What every action on this worker shares (cloned per scheduler, each with its own
/// server CAS, when it serves several).
#[derive(Clone)]
pub struct WorkerContext {
    /// The worker's name, reported in ExecutedActionMetadata.
    pub name: String,
    /// The local CAS.
    pub local: LocalCas,
    /// The server's CAS; `None` when the local CAS is the server's own (the worker in
    /// `kiln serve`).
    pub remote: Option<Arc<dyn Cas>>,
    /// Where action directories are made.
    pub work_dir: PathBuf,
    /// Read-only executable copies.
    pub exec_cache: PathBuf,
    /// Blobs downloaded at once per action.
    pub fetch_parallelism: usize,
    /// How actions' processes are kept together and killed.
    pub contain: crate::contain::Containment,
    /// The user actions run as (`worker.run_as_user`), if not the worker's own.
    pub run_as: Option<Arc<crate::run_as::ActionUsers>>,
    /// Input trees kept laid out (`worker.dircache_bytes`), if on.
    pub dircache: Option<Arc<DirCache>>,
    /// Cached input roots are mounted as overlays (`worker.dircache_layout = "overlay"`,
    /// checked to work at start), not linked.
    pub dircache_overlay: bool,
    /// Other workers, asked first for inputs the scheduler hints they hold (`None`: never).
    pub peers: Option<Arc<crate::peers::Peers>>,
    /// Bytes of inputs fetched, by source.
    pub transfers: Arc<crate::peers::TransferStats>,
    /// Where this worker's CAS is served to peers (`grpc://HOST:PORT`), and the record of
    /// what it holds that its reports carry; `None` when it is not served.
    pub serving: Option<crate::peers::Serving>,
    /// Tells its CAS which certificates to refuse (`None`: the worker inside `kiln serve`,
    /// whose CAS is the server's).
    pub refuse: Option<crate::peers::Refuse>,
}

/// Progress reported while an action runs.
pub enum Progress {
    /// The process exited; outputs are being stored.
    Executed,
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// Fetches a waiting action's inputs ahead into the local CAS (see
/// [`crate::fetch::prefetch`]); does nothing for the worker inside `kiln serve`, whose CAS is
/// the server's. Failures are only logged: the action fetches what it lacks when it starts.
pub async fn prefetch(ctx: Arc<WorkerContext>, message: kiln_proto::worker::PrefetchInputs) {
    let Some(server) = ctx.remote.as_deref() else {
        return;
    };
    let span = tracing::debug_span!("prefetch", operation = %message.operation);
    let Ok(instance) = InstanceName::new(&message.instance_name) else {
        return;
    };
    let function = message.digest_function;
    let digests: Vec<Digest> = message
        .digests
        .iter()
        .filter_map(|d| Digest::from_proto(d, function).ok())
        .collect();
    let own = ctx.serving.as_ref().map(|s| s.endpoint.as_str());
    let hints = crate::peers::Hints::from_proto(&message.peer_hints, function, own);
    let remote = Remote {
        server,
        peers: ctx.peers.as_deref().map(|p| (p, &hints)),
        stats: &ctx.transfers,
        missing: &[],
    };
    let fetched = crate::fetch::prefetch(
        &ctx.local,
        &remote,
        &instance,
        &digests,
        ctx.fetch_parallelism,
    );
    match tracing::Instrument::instrument(fetched, span).await {
        Ok(n) => tracing::debug!(blobs = n, "inputs fetched ahead"),
        Err(e) => tracing::debug!(error = %e, "fetching inputs ahead failed"),
    }
}

/// Runs an action; never fails: failures are in the result's status.
pub async fn execute(
    ctx: Arc<WorkerContext>,
    start: StartExecute,
    kill: oneshot::Receiver<()>,
    progress: impl Fn(Progress) + Send,
) -> ExecutionResult {
    let mut metadata = ExecutedActionMetadata {
        worker: ctx.name.clone(),
        queued_timestamp: start.queued_timestamp,
        worker_start_timestamp: Some(now()),
        ..Default::default()
    };
    let dir = ctx.work_dir.join(uuid::Uuid::new_v4().simple().to_string());
    // This action's pins on its inputs last until it is done, or by themselves a while past
    // its timeout (should the release never come).
    let timeout = start
        .timeout
        .as_ref()
        .map_or(Duration::from_secs(3600), kiln_reapi::convert::duration);
    let holder = PinHolder::new(timeout.saturating_add(Duration::from_secs(3600)));
    let mut held = Held::default();
    let outcome = attempt(
        &ctx,
        &start,
        &dir,
        kill,
        &progress,
        &mut metadata,
        (holder, &mut held),
    )
    .await;
    let Held {
        pins,
        mut leases,
        building,
        mount,
    } = held;
    // The cache entry of a missed root is built from the pinned blobs, beside the action.
    if let Some(build) = building {
        if let Ok(Some(lease)) = build.await {
            leases.push(lease);
        }
    }
    ctx.local.unpin(holder, &pins).await;
    let cleanup = dir.clone();
    // All on the blocking pool, to the end even if this action is dropped meanwhile: the
    // tree unmounted first (the clean-up removes the action's own files, not the entry's),
    // then the directory removed, then the leases released (a lease's last release may remove
    // an evicted entry). A tree that stays mounted keeps its directory and its entry.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(Err(e)) = mount.map(crate::overlay::Mounted::unmount) {
            tracing::error!(dir = %cleanup.display(), error = %e, "an action's input overlay stays mounted: its directory and cache entry are kept until the worker restarts");
            std::mem::forget(leases);
            return;
        }
        let _ = remove_tree(&cleanup);
        drop(leases);
    })
    .await;
    metadata.worker_completed_timestamp = Some(now());
    let (status, result, message) = match outcome {
        Ok((end, mut result)) => {
            let status = match end {
                RunEnd::Exited(_) => RpcStatus::default(),
                RunEnd::TimedOut => ActionError::TimedOut.rpc_status(),
                RunEnd::Killed => ActionError::Killed.rpc_status(),
            };
            result.execution_metadata = Some(metadata);
            (status, Some(result), String::new())
        }
        Err(e) => {
            tracing::info!(operation = %start.operation, error = %e, "action failed on the worker");
            let message = e.client_message();
            (
                e.rpc_status(),
                Some(ActionResult {
                    execution_metadata: Some(metadata),
                    ..Default::default()
                }),
                message,
            )
        }
    };
    ExecutionResult {
        operation: start.operation,
        status: Some(status),
        result,
        message,
    }
}

/// What an action holds until it is done, past its attempt: its pins on input blobs, its
/// leases on directory-cache entries, the entry being built beside it, the overlay its inputs
/// are mounted as.
/// (The mount is declared first: should the action be dropped half-way, it is unmounted
/// before the leases are released.)
#[derive(Default)]
struct Held {
    mount: Option<crate::overlay::Mounted>,
    pins: Vec<BlobKey>,
    leases: Vec<Lease>,
    building: Option<EntryBuilding>,
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &WorkerContext,
    start: &StartExecute,
    dir: &Path,
    kill: oneshot::Receiver<()>,
    progress: &(impl Fn(Progress) + Send),
    metadata: &mut ExecutedActionMetadata,
    (holder, held): (PinHolder, &mut Held),
) -> Result<(RunEnd, ActionResult), ActionError> {
    let bad = |what: &str| ActionError::BadInput(format!("StartExecute without {what}"));
    let instance = InstanceName::new(&start.instance_name)
        .map_err(|e| ActionError::BadInput(e.to_string()))?;
    let function = start.digest_function;
    let digest_function = DigestFunction::from_request(function, 64)
        .map_err(|e| ActionError::BadInput(e.to_string()))?;
    let action = start.action.as_ref().ok_or_else(|| bad("action"))?;
    let command = start.command.as_ref().ok_or_else(|| bad("command"))?;
    let root_digest = Digest::from_proto_field(action.input_root_digest.as_ref(), function)
        .map_err(|e| ActionError::BadInput(e.to_string()))?;
    let timeout = start
        .timeout
        .as_ref()
        .map(kiln_reapi::convert::duration)
        .unwrap_or(Duration::from_secs(3600));

    metadata.input_fetch_start_timestamp = Some(now());
    let hints = crate::peers::Hints::from_proto(
        &start.peer_hints,
        function,
        ctx.serving.as_ref().map(|s| s.endpoint.as_str()),
    );
    // Fetched while the tree is read: the inputs hinted from peers, and those only the server
    // is known to have (malformed digests skipped: a hint), at most as many as the scheduler
    // sends.
    let missing: Vec<Digest> = hints
        .digests()
        .copied()
        .chain(
            start
                .missing_inputs
                .iter()
                .take(MAX_MISSING)
                .filter_map(|d| Digest::from_proto(d, function).ok()),
        )
        .collect();
    let source = match ctx.remote.as_deref() {
        Some(server) => Source::Remote(Remote {
            server,
            peers: ctx.peers.as_deref().map(|p| (p, &hints)),
            stats: &ctx.transfers,
            missing: &missing,
        }),
        None => Source::Shared,
    };
    let root = dir.join("root");
    let inputs = place(
        ctx,
        holder,
        &source,
        &instance,
        function,
        root_digest,
        &root,
        &mut held.pins,
    )
    .await?;
    held.leases = inputs.leases;
    held.building = inputs.building;
    // Every file of a mounted tree is on the mount's device, inputs included.
    let input_device = inputs.mount.as_ref().map(|m| m.device());
    held.mount = inputs.mount;
    let shared = inputs.shared;
    if inputs.cache != CacheUse::Off {
        tracing::debug!(operation = %start.operation, cache = ?inputs.cache, "inputs in place");
    }
    metadata.input_fetch_completed_timestamp = Some(now());

    let wd = paths::relative("Command.working_directory", &command.working_directory)
        .map_err(|e| ActionError::BadInput(e.to_string()))?;
    let cwd = wd.iter().fold(root.clone(), |p, c| p.join(c));
    create_output_parents(command, &root, &wd)?;
    // The action's user, held until its outputs are collected: with users of their own, no
    // other action runs as it meanwhile.
    let lease = match &ctx.run_as {
        Some(users) => Some(users.take().await),
        None => None,
    };
    let run_as = lease.as_ref().map(|l| l.user().clone());
    if let Some(user) = run_as.clone() {
        let tree = root.clone();
        tokio::task::spawn_blocking(move || user.give_directories(&tree))
            .await
            .map_err(|e| ActionError::io("chown", &root, std::io::Error::other(e)))?
            .map_err(|e| ActionError::io("chown", &root, e))?;
    }
    let spec = RunSpec {
        argv: command.arguments.clone(),
        env: command
            .environment_variables
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        cwd: cwd.clone(),
        stdout: dir.join("stdout"),
        stderr: dir.join("stderr"),
        timeout,
        id: dir
            .file_name()
            .map_or_else(|| "action".into(), |n| n.to_string_lossy().into_owned()),
        run_as: run_as.clone(),
    };
    metadata.execution_start_timestamp = Some(now());
    let ran = run(&spec, &ctx.contain, kill).await;
    metadata.execution_completed_timestamp = Some(now());
    let owners = OutputOwners {
        action_uid: run_as.as_ref().map(|u| u.uid),
        inputs: shared.inodes(),
        input_device,
    };
    // Whatever became of the run (it may have failed after the action's processes ran),
    // what they did to shared inputs is put right first.
    crate::repair::repair(ctx, &instance, shared).await;
    let end = ran?;
    progress(Progress::Executed);
    if end == RunEnd::Killed {
        return Err(ActionError::Killed);
    }

    metadata.output_upload_start_timestamp = Some(now());
    // Every output file (stdout and stderr too) is hashed and stored from a private copy made
    // now, so no process that could still hold one open changes bytes after they were hashed.
    // Outputs are bounded by the room free where they are staged (a remote worker's own CAS
    // may be far smaller than the server's, which they go to).
    let room = rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(u64::MAX);
    let staging = Staging::new(dir.join("staged"), room)?;
    let mut outputs = collect(command, &root, digest_function, &staging, &owners).await?;
    let (stdout, stdout_blob) = staging.fix(digest_function, &spec.stdout).await?;
    let (stderr, stderr_blob) = staging.fix(digest_function, &spec.stderr).await?;
    outputs.blobs.insert(stdout, stdout_blob);
    outputs.blobs.insert(stderr, stderr_blob);
    // Collected: the user may run the next action while these upload (the tree it leaves is
    // in a directory no action can list).
    drop(lease);
    store(ctx, &instance, ctx.remote.as_deref(), &outputs.blobs).await?;
    metadata.output_upload_completed_timestamp = Some(now());
    let mut result = outputs.result;
    result.exit_code = match end {
        RunEnd::Exited(code) => code,
        _ => -1,
    };
    result.stdout_digest = Some(stdout.to_proto());
    result.stderr_digest = Some(stderr.to_proto());
    Ok((end, result))
}

/// Creates the parent directories of every declared output (not the outputs themselves),
/// below `root` and never through a symlink.
fn create_output_parents(command: &Command, root: &Path, wd: &[String]) -> Result<(), ActionError> {
    for rel in kiln_reapi::paths::declared_outputs(command) {
        let components =
            paths::output(wd, rel).map_err(|e| ActionError::BadInput(e.to_string()))?;
        let mut path = root.to_path_buf();
        let parents = components.split_last().map_or(&[][..], |(_, p)| p);
        for c in parents {
            path.push(c);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ActionError::BadInput(format!(
                        "output path {rel:?}: {} is not a directory in the input tree",
                        path.strip_prefix(root).unwrap_or(&path).display()
                    )))
                }
                Err(_) => {
                    std::fs::create_dir(&path).map_err(|e| ActionError::io("create", &path, e))?
                }
            }
        }
    }
    Ok(())
}

/// Stores output blobs: in the local CAS, and on the server when it is another machine.
async fn store(
    ctx: &WorkerContext,
    instance: &InstanceName,
    remote: Option<&dyn Cas>,
    blobs: &HashMap<Digest, Blob>,
) -> Result<(), ActionError> {
    for (digest, blob) in blobs {
        let stored = match blob {
            Blob::File(path) => ctx.local.put_file(instance, *digest, path).await,
            Blob::Bytes(bytes) => ctx.local.put_bytes(instance, *digest, bytes.clone()).await,
        };
        match (stored, remote) {
            // The local CAS is the server's: it must hold the outputs.
            (Err(e), None) => return Err(e),
            // A worker's own copy only saves a later download.
            (Err(e), Some(_)) => {
                tracing::debug!(blob = ?digest, error = %e, "cannot keep an output in the local CAS")
            }
            (Ok(()), _) => {}
        }
    }
    let Some(remote) = remote else { return Ok(()) };
    let digests: Vec<Digest> = blobs.keys().copied().collect();
    let missing = remote.find_missing(instance, &digests).await?;
    // Blobs in memory, and small files read into it, go in one call (batched by the CAS);
    // larger files are streamed from disk.
    let mut in_memory = Vec::new();
    for d in missing {
        let Some(blob) = blobs.get(&d) else {
            continue;
        };
        match blob {
            Blob::Bytes(b) => in_memory.push((d, b.clone())),
            Blob::File(p) if d.size <= SMALL => {
                let bytes = tokio::fs::read(p)
                    .await
                    .map_err(|e| ActionError::io("read", p, e))?;
                in_memory.push((d, bytes.into()));
            }
            Blob::File(p) => remote.write_file(instance, d, p).await?,
        }
    }
    Ok(remote.write_blobs(instance, in_memory).await?)
}
