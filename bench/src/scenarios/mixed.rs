//! `mixed`: a Bazel-like build step, many at once — FindMissingBlobs for the inputs, upload
//! the missing ones, GetActionResult; on a miss, Execute (when the server executes) or run
//! "locally" and upload the output and the result; finally read the output back. Each step is
//! reported, and the whole step as `build-step`.

use super::execute::{execute, upload_message};
use super::{read_sample, read_verified, timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::size::unit;
use crate::stats::{code_name, Sample};
use futures::future::BoxFuture;
use kiln_proto::reapi::{
    self, batch_update_blobs_request, Action, ActionResult, Command, Directory, FileNode,
    OutputFile,
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct MixedLoad {
    ctx: Arc<Ctx>,
    pool: BlobPool,
    nonce: String,
    /// Command that copies input 0 to `out` (when the server executes).
    command: Option<reapi::Digest>,
    /// Finished steps: (action, output), for cache hits.
    done: Mutex<Vec<(reapi::Digest, reapi::Digest)>>,
}

const OUTPUT_IDS: u64 = 1 << 40;

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let pool = BlobPool::of(ctx.args.size.max(), ctx.args.content);
    let command = if ctx.exec_enabled() {
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), "cat in0 > out".into()],
            output_paths: vec!["out".into()],
            ..Default::default()
        };
        Some(upload_message(&ctx, &command).await?)
    } else {
        ctx.note("the server does not execute: misses are run \"locally\" (upload output + UpdateActionResult)");
        None
    };
    Ok(Prepared::Run(Arc::new(MixedLoad {
        ctx,
        pool,
        nonce: uuid::Uuid::new_v4().to_string(),
        command,
        done: Mutex::new(Vec::new()),
    })))
}

impl MixedLoad {
    fn inputs(&self, index: u64) -> Vec<(u64, bytes::Bytes, reapi::Digest)> {
        let k = self.ctx.args.batch.max(1) as u64;
        (index * k..(index + 1) * k)
            .map(|id| {
                let size = self.ctx.args.size.sample(id);
                let data = self.pool.contents(id, size);
                let d = blobs::digest_of(self.ctx.function, &[&data]);
                (id, data, d)
            })
            .collect()
    }

    async fn upload(&self, blobs: Vec<&(u64, bytes::Bytes, reapi::Digest)>) -> Result<(), String> {
        let limit = self.ctx.max_batch() as usize / 2;
        let mut start = 0;
        while start < blobs.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < blobs.len() && (end == start || bytes + blobs[end].1.len() <= limit) {
                bytes += blobs[end].1.len();
                end += 1;
            }
            let requests = blobs[start..end]
                .iter()
                .map(|(_, data, d)| batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.clone(),
                    compressor: 0,
                })
                .collect();
            self.ctx.update_blobs(requests).await.map_err(code_name)?;
            start = end;
        }
        Ok(())
    }

    /// Runs the action (remotely or "locally"); returns the output's digest.
    async fn run_action(
        &self,
        index: u64,
        inputs: &[(u64, bytes::Bytes, reapi::Digest)],
        action: &reapi::Digest,
        out: &mut Vec<Sample>,
    ) -> Option<reapi::Digest> {
        let ctx = &self.ctx;
        if let Some(command) = &self.command {
            let root = Directory {
                files: inputs
                    .iter()
                    .enumerate()
                    .map(|(j, (_, _, d))| FileNode {
                        name: format!("in{j}"),
                        digest: Some(d.clone()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            let root = upload_message(ctx, &root).await.ok()?;
            let action_msg = Action {
                command_digest: Some(command.clone()),
                input_root_digest: Some(root),
                salt: self.nonce.clone().into_bytes().into(),
                ..Default::default()
            };
            let action = upload_message(ctx, &action_msg).await.ok()?;
            let (r, latency) = timed(execute(ctx, &action, false)).await;
            return match r {
                Ok(resp) => {
                    let output = resp
                        .result
                        .and_then(|a| a.output_files.into_iter().next())
                        .and_then(|f| f.digest);
                    out.push(match &output {
                        Some(_) => Sample::ok("execute", latency, 0),
                        None => Sample::failed("execute", latency, "NO_OUTPUT"),
                    });
                    output
                }
                Err(code) => {
                    out.push(Sample::failed("execute", latency, code));
                    None
                }
            };
        }
        let id = OUTPUT_IDS + index;
        let size = ctx.args.size.sample(id);
        let output = self.pool.digest(ctx.function, id, size);
        let name = blobs::write_name(&ctx.args.instance, ctx.function, &output);
        let requests = self.pool.write_requests(&name, id, size, ctx.args.chunk);
        let (r, latency) = timed(ctx.bytestream().write(futures::stream::iter(requests))).await;
        out.push(Sample::from_result("write-output", latency, size, &r));
        r.ok()?;
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(output.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let request = reapi::UpdateActionResultRequest {
            instance_name: ctx.args.instance.clone(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: ctx.proto_function(),
        };
        let (r, latency) = timed(ctx.action_cache().update_action_result(request)).await;
        out.push(Sample::from_result("update-result", latency, 0, &r));
        r.ok().map(|_| output)
    }
}

impl Workload for MixedLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let ctx = self.ctx.clone();
            let inputs = self.inputs(index);
            let mut out = Vec::new();
            let step = Instant::now();
            let fail = |mut out: Vec<Sample>, code: String| {
                out.push(Sample::failed("build-step", step.elapsed(), code));
                out
            };

            let request = reapi::FindMissingBlobsRequest {
                instance_name: ctx.args.instance.clone(),
                blob_digests: inputs.iter().map(|b| b.2.clone()).collect(),
                digest_function: ctx.proto_function(),
            };
            let (r, latency) = timed(ctx.cas().find_missing_blobs(request)).await;
            out.push(Sample::from_result("find-missing", latency, 0, &r));
            let missing: Vec<String> = match r {
                Ok(r) => r
                    .into_inner()
                    .missing_blob_digests
                    .into_iter()
                    .map(|d| d.hash)
                    .collect(),
                Err(s) => return fail(out, code_name(s.code())),
            };
            let to_upload: Vec<_> = inputs
                .iter()
                .filter(|b| missing.contains(&b.2.hash))
                .collect();
            let bytes: u64 = to_upload.iter().map(|b| b.1.len() as u64).sum();
            let (r, latency) = timed(self.upload(to_upload)).await;
            match r {
                Ok(()) => out.push(Sample::ok("upload", latency, bytes)),
                Err(code) => {
                    out.push(Sample::failed("upload", latency, code.clone()));
                    return fail(out, code);
                }
            }

            let reuse = unit(index, 9) < ctx.args.hit_fraction;
            let earlier = {
                let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                (reuse && !done.is_empty())
                    .then(|| done[(index as usize * 7919) % done.len()].clone())
            };
            let action = match &earlier {
                Some((action, _)) => action.clone(),
                None => {
                    let hashes: Vec<&str> = inputs.iter().map(|b| b.2.hash.as_str()).collect();
                    blobs::digest_of(
                        ctx.function,
                        &[self.nonce.as_bytes(), hashes.concat().as_bytes()],
                    )
                }
            };
            let request = reapi::GetActionResultRequest {
                instance_name: ctx.args.instance.clone(),
                action_digest: Some(action.clone()),
                digest_function: ctx.proto_function(),
                ..Default::default()
            };
            let (r, latency) = timed(ctx.action_cache().get_action_result(request)).await;
            let cached = match r {
                Ok(result) => {
                    out.push(Sample::ok("get-result", latency, 0));
                    result
                        .into_inner()
                        .output_files
                        .into_iter()
                        .next()
                        .and_then(|f| f.digest)
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    out.push(Sample::ok("get-result", latency, 0));
                    None
                }
                Err(s) => {
                    out.push(Sample::failed("get-result", latency, code_name(s.code())));
                    return fail(out, code_name(s.code()));
                }
            };
            let output = match cached {
                Some(d) => d,
                None => match self.run_action(index, &inputs, &action, &mut out).await {
                    Some(d) => d,
                    None => return fail(out, "ACTION_FAILED".into()),
                },
            };
            let (r, latency) = timed(read_verified(&ctx, &output)).await;
            let read = read_sample("read-output", latency, &output, r);
            let failed = read.error.clone();
            out.push(read);
            if let Some(code) = failed {
                return fail(out, code);
            }
            if earlier.is_none() {
                self.done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((action, output));
            }
            let total: u64 = out.iter().map(|s| s.bytes).sum();
            out.push(Sample::ok("build-step", step.elapsed(), total));
            out
        })
    }
}
