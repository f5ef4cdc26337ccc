//! `read`: ByteStream downloads of blobs uploaded before the measured phase, each verified
//! against its digest.

use super::{read_sample, read_verified, timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::Sample;
use futures::future::BoxFuture;
use kiln_proto::reapi;
use kiln_reapi::compression::Compressor;
use std::sync::Arc;

struct ReadLoad {
    ctx: Arc<Ctx>,
    blobs: Vec<reapi::Digest>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let n = ctx.args.blobs.unwrap_or_else(|| {
        let mean = (0..1000).map(|i| ctx.args.size.sample(i)).sum::<u64>() / 1000;
        ((2u64 << 30) / mean.max(1)).clamp(1, 1000) as usize
    });
    let pool = BlobPool::of(ctx.args.size.max(), ctx.args.content);
    let sizes: Vec<(u64, u64)> = (0..n as u64)
        .map(|i| (i, ctx.args.size.sample(i)))
        .collect();
    let digests = pool.digests(ctx.function, &sizes);
    let items: Vec<_> = sizes
        .iter()
        .zip(&digests)
        .map(|((id, size), d)| (*id, *size, d.clone()))
        .collect();
    if ctx.args.upload_compressed {
        upload_compressed(&ctx, &pool, &sizes, &digests).await?;
    } else {
        ctx.upload(&pool, &items).await?;
    }
    Ok(Prepared::Run(Arc::new(ReadLoad {
        ctx,
        blobs: digests,
    })))
}

/// Uploads every blob as one zstd frame through ByteStream (`compressed-blobs/zstd/…`).
async fn upload_compressed(
    ctx: &Ctx,
    pool: &BlobPool,
    sizes: &[(u64, u64)],
    digests: &[reapi::Digest],
) -> anyhow::Result<()> {
    use anyhow::Context;
    use futures::StreamExt;
    let packed = super::write::compress_all(pool, sizes, ctx.args.zstd_level)?;
    let uploads = futures::stream::iter(packed.iter().zip(digests)).map(|(packed, d)| async move {
        let name = blobs::write_name_in(&ctx.args.instance, Compressor::Zstd, ctx.function, d);
        let requests = blobs::data_write_requests(&name, packed, ctx.args.chunk);
        ctx.bytestream()
            .write(futures::stream::iter(requests))
            .await
            .with_context(|| format!("uploading {}/{} compressed", d.hash, d.size_bytes))
    });
    let results: Vec<anyhow::Result<_>> = uploads.buffer_unordered(4).collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

impl Workload for ReadLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let d = &self.blobs[index as usize % self.blobs.len()];
            let (result, latency) = timed(read_verified(&self.ctx, d)).await;
            vec![read_sample("read", latency, d, result)]
        })
    }
}
