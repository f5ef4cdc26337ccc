//! `splice`: SpliceBlob of a blob of `--size` bytes from `--chunks` chunks uploaded before the
//! measured phase. Each blob's first chunk holds its unique header; the other chunks are the
//! same slices of the shared pool for every blob, so they are uploaded once. The server reads
//! every chunk, hashes the concatenation and stores the blob.

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::{code_name, Sample};
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_proto::reapi;
use std::sync::Arc;

struct SpliceLoad {
    ctx: Arc<Ctx>,
    /// Each blob's digest and its unique first chunk's.
    blobs: Vec<(reapi::Digest, reapi::Digest)>,
    /// The chunks every blob shares, after its first.
    shared: Vec<reapi::Digest>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let caps = ctx.caps.cache_capabilities.clone().unwrap_or_default();
    if !caps.splice_blob_support {
        return Ok(Prepared::Skip(
            "the server does not advertise splice_blob_support".into(),
        ));
    }
    let size = ctx.args.size.max();
    let pieces = ctx.args.chunks.min(size.max(1));
    let piece = size.div_ceil(pieces).max(1);
    let pool = BlobPool::of(size, ctx.args.content);
    let n = ctx.planned_items(4 << 30, 16);
    let sizes: Vec<(u64, u64)> = (0..n as u64).map(|id| (id, size)).collect();
    let digests = pool.digests(ctx.function, &sizes);
    // Blob `id` is its header and the pool's first `size - 16` bytes; cut at `piece`.
    let whole = |id: u64| pool.contents(id, size);
    let sample = whole(0);
    let mut shared = Vec::new();
    let mut at = piece.min(size);
    while at < size {
        let end = (at + piece).min(size);
        let data = sample.slice(at as usize..end as usize);
        shared.push(upload(&ctx, data).await?);
        at = end;
    }
    let mut blobs = Vec::with_capacity(n);
    for (id, d) in (0..n as u64).zip(digests) {
        let first = whole(id).slice(..piece.min(size) as usize);
        blobs.push((d, upload(&ctx, first).await?));
    }
    ctx.note(format!(
        "{} blobs of {size} bytes, each from {} chunks of up to {piece} bytes",
        blobs.len(),
        shared.len() + 1
    ));
    Ok(Prepared::Run(Arc::new(SpliceLoad { ctx, blobs, shared })))
}

/// Uploads one chunk by ByteStream; its digest.
async fn upload(ctx: &Ctx, data: Bytes) -> anyhow::Result<reapi::Digest> {
    let d = blobs::digest_of(ctx.function, &[&data]);
    let name = blobs::write_name(&ctx.args.instance, ctx.function, &d);
    let requests = blobs::data_write_requests(&name, &data, ctx.args.chunk);
    ctx.bytestream()
        .write(futures::stream::iter(requests))
        .await
        .map_err(|s| anyhow::anyhow!("uploading a chunk while preparing: {s}"))?;
    Ok(d)
}

impl Workload for SpliceLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            self.ctx.count_repeat(index, self.blobs.len());
            let (blob, first) = &self.blobs[index as usize % self.blobs.len()];
            let mut chunk_digests = Vec::with_capacity(self.shared.len() + 1);
            chunk_digests.push(first.clone());
            chunk_digests.extend(self.shared.iter().cloned());
            let request = reapi::SpliceBlobRequest {
                instance_name: self.ctx.args.instance.clone(),
                blob_digest: Some(blob.clone()),
                chunk_digests,
                digest_function: self.ctx.proto_function(),
                chunking_function: 0,
            };
            let (result, latency) = timed(self.ctx.cas().splice_blob(request)).await;
            let sample = match result {
                Ok(r) if r.get_ref().blob_digest.as_ref() == Some(blob) => {
                    Sample::ok("splice", latency, blob.size_bytes as u64)
                }
                Ok(_) => Sample::failed("splice", latency, "WRONG_DIGEST"),
                Err(s) => Sample::failed("splice", latency, code_name(s.code())),
            };
            vec![sample]
        })
    }
}
