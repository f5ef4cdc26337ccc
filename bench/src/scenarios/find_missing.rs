//! `find-missing`: FindMissingBlobs of N digests per call, a chosen fraction present; every
//! answer is checked.

use super::{timed, Ctx, Prepared};
use crate::blobs::BlobPool;
use crate::load::Workload;
use crate::stats::{code_name, Sample};
use futures::future::BoxFuture;
use kiln_proto::reapi;
use std::collections::HashSet;
use std::sync::Arc;

struct FindMissingLoad {
    ctx: Arc<Ctx>,
    digests: Vec<(reapi::Digest, bool)>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let per_call = ctx.args.digests_per_call.max(1);
    let universe = per_call * 4;
    let size = ctx.args.size.max().min(4096);
    let pool = BlobPool::new(size);
    let items: Vec<(u64, u64)> = (0..universe as u64).map(|i| (i, size)).collect();
    let digests = pool.digests(ctx.function, &items);
    let present: Vec<bool> = (0..universe as u64)
        .map(|i| crate::size::unit(i, 77) < ctx.args.present_fraction)
        .collect();
    let upload: Vec<_> = items
        .iter()
        .zip(&digests)
        .zip(&present)
        .filter(|(_, p)| **p)
        .map(|(((id, size), d), _)| (*id, *size, d.clone()))
        .collect();
    ctx.upload(&pool, &upload).await?;
    Ok(Prepared::Run(Arc::new(FindMissingLoad {
        ctx,
        digests: digests.into_iter().zip(present).collect(),
    })))
}

impl Workload for FindMissingLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let per_call = self.ctx.args.digests_per_call.max(1);
            let start = (index as usize * per_call) % self.digests.len();
            let chosen: Vec<&(reapi::Digest, bool)> = self
                .digests
                .iter()
                .cycle()
                .skip(start)
                .take(per_call)
                .collect();
            let expected: HashSet<&str> = chosen
                .iter()
                .filter(|(_, p)| !p)
                .map(|(d, _)| d.hash.as_str())
                .collect();
            let request = reapi::FindMissingBlobsRequest {
                instance_name: self.ctx.args.instance.clone(),
                blob_digests: chosen.iter().map(|(d, _)| d.clone()).collect(),
                digest_function: self.ctx.proto_function(),
            };
            let mut cas = self.ctx.cas();
            let (result, latency) = timed(cas.find_missing_blobs(request)).await;
            let sample = match result {
                Err(s) => Sample::failed("find-missing", latency, code_name(s.code())),
                Ok(r) => {
                    let got: HashSet<String> = r
                        .into_inner()
                        .missing_blob_digests
                        .into_iter()
                        .map(|d| d.hash)
                        .collect();
                    if got.len() == expected.len() && expected.iter().all(|h| got.contains(*h)) {
                        Sample::ok("find-missing", latency, 0)
                    } else {
                        Sample::failed("find-missing", latency, "WRONG_ANSWER")
                    }
                }
            };
            vec![sample]
        })
    }
}
