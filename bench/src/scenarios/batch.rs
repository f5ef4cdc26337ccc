//! `batch`: one BatchUpdateBlobs of fresh small blobs, then one BatchReadBlobs of the same
//! blobs, verified.

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::{code_name, Sample};
use anyhow::bail;
use futures::future::BoxFuture;
use kiln_proto::reapi::{self, batch_update_blobs_request};
use std::sync::Arc;

struct BatchLoad {
    ctx: Arc<Ctx>,
    pool: BlobPool,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let worst = ctx.args.size.max() * ctx.args.batch as u64;
    if worst > ctx.max_batch() {
        bail!(
            "{} blobs of up to {} bytes exceed the server's batch limit of {} bytes; lower --batch or --size",
            ctx.args.batch,
            ctx.args.size.max(),
            ctx.max_batch()
        );
    }
    let pool = BlobPool::of(ctx.args.size.max(), ctx.args.content);
    Ok(Prepared::Run(Arc::new(BatchLoad { ctx, pool })))
}

impl Workload for BatchLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let n = self.ctx.args.batch as u64;
            let blobs: Vec<(u64, bytes::Bytes, reapi::Digest)> = (index * n..(index + 1) * n)
                .map(|id| {
                    let size = self.ctx.args.size.sample(id);
                    let data = self.pool.contents(id, size);
                    let d = blobs::digest_of(self.ctx.function, &[&data]);
                    (size, data, d)
                })
                .collect();
            let total: u64 = blobs.iter().map(|b| b.0).sum();
            let update = reapi::BatchUpdateBlobsRequest {
                instance_name: self.ctx.args.instance.clone(),
                requests: blobs
                    .iter()
                    .map(|(_, data, d)| batch_update_blobs_request::Request {
                        digest: Some(d.clone()),
                        data: data.clone(),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: self.ctx.proto_function(),
            };
            let mut cas = self.ctx.cas();
            let (result, latency) = timed(cas.batch_update_blobs(update)).await;
            let update_sample = match &result {
                Ok(r) => match r
                    .get_ref()
                    .responses
                    .iter()
                    .find_map(|x| x.status.as_ref().filter(|s| s.code != 0))
                {
                    None => Sample::ok("batch-update", latency, total),
                    Some(s) => Sample::failed(
                        "batch-update",
                        latency,
                        code_name(tonic::Code::from_i32(s.code)),
                    ),
                },
                Err(s) => Sample::failed("batch-update", latency, code_name(s.code())),
            };
            let read = reapi::BatchReadBlobsRequest {
                instance_name: self.ctx.args.instance.clone(),
                digests: blobs.iter().map(|b| b.2.clone()).collect(),
                acceptable_compressors: vec![],
                digest_function: self.ctx.proto_function(),
            };
            let (result, latency) = timed(cas.batch_read_blobs(read)).await;
            let read_sample = match result {
                Err(s) => Sample::failed("batch-read", latency, code_name(s.code())),
                Ok(r) => {
                    let r = r.into_inner();
                    let mut error = None;
                    for ((_, data, _), got) in blobs.iter().zip(&r.responses) {
                        match got.status.as_ref().filter(|s| s.code != 0) {
                            Some(s) => error = Some(code_name(tonic::Code::from_i32(s.code))),
                            None if got.data != *data => error = Some("DIGEST_MISMATCH".into()),
                            None => {}
                        }
                    }
                    if r.responses.len() != blobs.len() {
                        error = Some("WRONG_ANSWER".into());
                    }
                    match error {
                        None => Sample::ok("batch-read", latency, total),
                        Some(e) => Sample::failed("batch-read", latency, e),
                    }
                }
            };
            vec![update_sample, read_sample]
        })
    }
}
