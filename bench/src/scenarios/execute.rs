//! `execute`: Execute of no-op (or sleeping) actions, each unique so none is cached, with an
//! input file of its own when asked (`--input-size`) and an output file (`--output-size`);
//! skipped when the server does not execute.

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::{code_name, Sample};
use futures::future::BoxFuture;
use futures::StreamExt;
use kiln_proto::longrunning::operation;
use kiln_proto::reapi::{self, Action, Command, ExecuteResponse};
use prost::Message;
use std::sync::Arc;

struct ExecuteLoad {
    ctx: Arc<Ctx>,
    command: reapi::Digest,
    nonce: String,
    /// Where each action's input file comes from, with `--input-size`.
    inputs: Option<BlobPool>,
    /// With `--shared-inputs`: the one input root, uploaded by the first action.
    shared_root: tokio::sync::OnceCell<reapi::Digest>,
    /// `--platform`: what every action asks for.
    platform: Option<reapi::Platform>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    if !ctx.exec_enabled() {
        return Ok(Prepared::Skip(
            "the server does not execute actions (exec_enabled is false)".into(),
        ));
    }
    let mut script = vec!["exit 0".to_string()];
    if ctx.args.sleep_ms > 0 {
        script.insert(0, format!("sleep {:.3}", ctx.args.sleep_ms as f64 / 1000.0));
    }
    let mut output_paths = Vec::new();
    if let Some(size) = ctx.args.output_size {
        script.insert(0, format!("head -c {} /dev/urandom > out", size.max()));
        output_paths.push("out".to_string());
    }
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.join(" && ")],
        output_paths,
        ..Default::default()
    };
    let command = upload_message(&ctx, &command).await?;
    let inputs = ctx
        .args
        .input_size
        .map(|size| BlobPool::seeded(size.max(), crate::cli::Content::Random, ctx.args.seed));
    let mut properties = Vec::new();
    for p in &ctx.args.platform {
        let Some((name, value)) = p.split_once('=') else {
            anyhow::bail!("--platform {p:?} is not NAME=VALUE");
        };
        properties.push(reapi::platform::Property {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    Ok(Prepared::Run(Arc::new(ExecuteLoad {
        ctx,
        command,
        nonce: uuid::Uuid::new_v4().to_string(),
        inputs,
        shared_root: tokio::sync::OnceCell::new(),
        platform: (!properties.is_empty()).then_some(reapi::Platform { properties }),
    })))
}

/// Uploads a message as a blob and returns its digest.
pub(super) async fn upload_message(
    ctx: &Ctx,
    message: &impl Message,
) -> anyhow::Result<reapi::Digest> {
    let bytes = message.encode_to_vec();
    let digest = blobs::digest_of(ctx.function, &[&bytes]);
    let request = reapi::batch_update_blobs_request::Request {
        digest: Some(digest.clone()),
        data: bytes.into(),
        compressor: 0,
    };
    ctx.update_blobs(vec![request])
        .await
        .map_err(|code| anyhow::anyhow!("the server refused a blob: {}", code_name(code)))?;
    Ok(digest)
}

/// Runs an action with Execute to completion; the error is a code name.
pub(super) async fn execute(
    ctx: &Ctx,
    action: &reapi::Digest,
    skip_cache_lookup: bool,
) -> Result<ExecuteResponse, String> {
    let mut stream = ctx
        .execution()
        .execute(reapi::ExecuteRequest {
            instance_name: ctx.args.instance.clone(),
            skip_cache_lookup,
            action_digest: Some(action.clone()),
            digest_function: ctx.proto_function(),
            ..Default::default()
        })
        .await
        .map_err(|s| code_name(s.code()))?
        .into_inner();
    while let Some(op) = stream.next().await {
        let op = op.map_err(|s| code_name(s.code()))?;
        if !op.done {
            continue;
        }
        return match op.result {
            Some(operation::Result::Response(any)) => {
                let response = ExecuteResponse::decode(any.value.as_slice())
                    .map_err(|_| "BAD_RESPONSE".to_string())?;
                match response.status.as_ref().filter(|s| s.code != 0) {
                    Some(s) => Err(code_name(tonic::Code::from_i32(s.code))),
                    None => Ok(response),
                }
            }
            Some(operation::Result::Error(s)) => Err(code_name(tonic::Code::from_i32(s.code))),
            None => Err("BAD_RESPONSE".into()),
        };
    }
    Err("STREAM_ENDED".into())
}

/// The time from `a` to `b` (zero if `b` is earlier: clocks of two machines).
fn between(a: prost_types::Timestamp, b: prost_types::Timestamp) -> Option<std::time::Duration> {
    let nanos = |t: prost_types::Timestamp| t.seconds as i128 * 1_000_000_000 + t.nanos as i128;
    let d = (nanos(b) - nanos(a)).max(0);
    Some(std::time::Duration::from_nanos(d as u64))
}

impl ExecuteLoad {
    /// The input root of action `index`: empty, or `--input-files` files of its own (blobs
    /// that fit a batch go in batches, larger ones by ByteStream), or with `--shared-inputs`
    /// the same files for every action.
    async fn input_root(&self, index: u64) -> anyhow::Result<reapi::Digest> {
        if self.ctx.args.shared_inputs {
            let shared = self
                .shared_root
                .get_or_try_init(|| self.new_input_root(0))
                .await
                .cloned()?;
            if !self.ctx.args.own_root {
                return Ok(shared);
            }
            let own = format!("action {index} of {}\n", self.nonce).into_bytes();
            let own_digest = blobs::digest_of(self.ctx.function, &[&own]);
            self.upload_batch(vec![reapi::batch_update_blobs_request::Request {
                digest: Some(own_digest.clone()),
                data: own.into(),
                compressor: 0,
            }])
            .await?;
            let root = reapi::Directory {
                files: vec![reapi::FileNode {
                    name: "own".into(),
                    digest: Some(own_digest),
                    ..Default::default()
                }],
                directories: vec![reapi::DirectoryNode {
                    name: "shared".into(),
                    digest: Some(shared),
                }],
                ..Default::default()
            };
            return upload_message(&self.ctx, &root).await;
        }
        self.new_input_root(index).await
    }

    async fn new_input_root(&self, index: u64) -> anyhow::Result<reapi::Digest> {
        let (Some(pool), Some(size)) = (&self.inputs, self.ctx.args.input_size) else {
            return Ok(blobs::digest_of(self.ctx.function, &[]));
        };
        let size = size.sample(index);
        let count = self.ctx.args.input_files;
        let batch_limit = self.ctx.max_batch() / 2;
        let mut files = Vec::new();
        let mut batch: Vec<reapi::batch_update_blobs_request::Request> = Vec::new();
        let mut batch_bytes = 0u64;
        for j in 0..count {
            let id = index.saturating_mul(count).saturating_add(j);
            let digest = pool.digest(self.ctx.function, id, size);
            files.push(reapi::FileNode {
                // Zero-padded, so that the names sort as REAPI wants them.
                name: format!("input-{j:07}"),
                digest: Some(digest.clone()),
                ..Default::default()
            });
            if size > batch_limit {
                let name = blobs::write_name(&self.ctx.args.instance, self.ctx.function, &digest);
                let requests = pool.write_requests(&name, id, size, self.ctx.args.chunk);
                self.ctx
                    .bytestream()
                    .write(futures::stream::iter(requests))
                    .await?;
                continue;
            }
            if batch_bytes + size > batch_limit && !batch.is_empty() {
                self.upload_batch(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += size;
            batch.push(reapi::batch_update_blobs_request::Request {
                digest: Some(digest),
                data: pool.contents(id, size),
                compressor: 0,
            });
        }
        if !batch.is_empty() {
            self.upload_batch(batch).await?;
        }
        let per_dir = self.ctx.args.files_per_dir;
        if per_dir == 0 {
            let root = reapi::Directory {
                files,
                ..Default::default()
            };
            return upload_message(&self.ctx, &root).await;
        }
        let mut directories = Vec::new();
        for (k, chunk) in files.chunks(per_dir as usize).enumerate() {
            let dir = reapi::Directory {
                files: chunk.to_vec(),
                ..Default::default()
            };
            directories.push(reapi::DirectoryNode {
                name: format!("dir-{k:06}"),
                digest: Some(upload_message(&self.ctx, &dir).await?),
            });
        }
        let root = reapi::Directory {
            directories,
            ..Default::default()
        };
        upload_message(&self.ctx, &root).await
    }

    async fn upload_batch(
        &self,
        requests: Vec<reapi::batch_update_blobs_request::Request>,
    ) -> anyhow::Result<()> {
        self.ctx
            .update_blobs(requests)
            .await
            .map_err(|code| anyhow::anyhow!("the server refused a blob: {}", code_name(code)))
    }
}

impl Workload for ExecuteLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let Ok(input_root) = self.input_root(index).await else {
                return vec![Sample::failed(
                    "execute",
                    Default::default(),
                    "UPLOAD_FAILED",
                )];
            };
            let action = Action {
                command_digest: Some(self.command.clone()),
                input_root_digest: Some(input_root),
                salt: format!("{} {index}", self.nonce).into_bytes().into(),
                do_not_cache: true,
                platform: self.platform.clone(),
                ..Default::default()
            };
            let digest = match upload_message(&self.ctx, &action).await {
                Ok(d) => d,
                Err(_) => {
                    return vec![Sample::failed(
                        "execute",
                        Default::default(),
                        "UPLOAD_FAILED",
                    )]
                }
            };
            let (result, latency) = timed(execute(&self.ctx, &digest, true)).await;
            match result {
                Ok(r) if r.result.as_ref().is_some_and(|a| a.exit_code == 0) => {
                    let mut samples = vec![Sample::ok("execute", latency, 0)];
                    // The scheduler's share: from queued to a worker starting on it.
                    let meta = r.result.and_then(|a| a.execution_metadata);
                    if let Some(wait) = meta
                        .clone()
                        .and_then(|m| between(m.queued_timestamp?, m.worker_start_timestamp?))
                    {
                        samples.push(Sample::ok("queue-to-start", wait, 0));
                    }
                    // The worker's upload of the action's output file.
                    if let (Some(size), Some(upload)) = (
                        self.ctx.args.output_size,
                        meta.clone().and_then(|m| {
                            between(
                                m.output_upload_start_timestamp?,
                                m.output_upload_completed_timestamp?,
                            )
                        }),
                    ) {
                        samples.push(Sample::ok("output-upload", upload, size.max()));
                    }
                    // The worker's fetch of the action's input file.
                    if let (Some(size), Some(fetch)) = (
                        self.ctx
                            .args
                            .input_size
                            .map(|s| s.sample(index) * self.ctx.args.input_files),
                        meta.and_then(|m| {
                            between(
                                m.input_fetch_start_timestamp?,
                                m.input_fetch_completed_timestamp?,
                            )
                        }),
                    ) {
                        samples.push(Sample::ok("input-fetch", fetch, size));
                    }
                    samples
                }
                Ok(_) => vec![Sample::failed("execute", latency, "NONZERO_EXIT")],
                Err(code) => vec![Sample::failed("execute", latency, code)],
            }
        })
    }
}
