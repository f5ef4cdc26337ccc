//! `write`: ByteStream uploads of blobs not yet on the server (zstd-compressed with
//! `--compressed`, compressed before the measured phase).

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::Sample;
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_proto::reapi;
use kiln_reapi::compression::Compressor;
use std::sync::Arc;

struct WriteLoad {
    ctx: Arc<Ctx>,
    pool: BlobPool,
    blobs: Vec<(u64, u64, reapi::Digest)>,
    /// With `--compressed`: each blob as one zstd frame.
    packed: Vec<Bytes>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let n = ctx.planned_items(4 << 30, 16);
    let pool = BlobPool::of(ctx.args.size.max(), ctx.args.content);
    let sizes: Vec<(u64, u64)> = (0..n as u64)
        .map(|i| (i, ctx.args.size.sample(i)))
        .collect();
    let digests = pool.digests(ctx.function, &sizes);
    let packed = if ctx.args.compressed {
        let packed = compress_all(&pool, &sizes, ctx.args.zstd_level)?;
        let (raw, sent) = sizes
            .iter()
            .zip(&packed)
            .fold((0u64, 0u64), |(r, s), ((_, size), p)| {
                (r + size, s + p.len() as u64)
            });
        ctx.note(format!(
            "zstd level {}: {:.1} MiB sent as {:.1} MiB ({:.2}x)",
            ctx.args.zstd_level,
            raw as f64 / 1048576.0,
            sent as f64 / 1048576.0,
            raw as f64 / sent.max(1) as f64
        ));
        packed
    } else {
        Vec::new()
    };
    let blobs = sizes
        .into_iter()
        .zip(digests)
        .map(|((id, size), d)| (id, size, d))
        .collect();
    Ok(Prepared::Run(Arc::new(WriteLoad {
        ctx,
        pool,
        blobs,
        packed,
    })))
}

/// Every blob as a zstd frame, compressed on every core.
pub(super) fn compress_all(
    pool: &BlobPool,
    sizes: &[(u64, u64)],
    level: i32,
) -> anyhow::Result<Vec<Bytes>> {
    let packed = blobs::on_every_core(sizes, |id, size| pool.compressed(id, size, level));
    anyhow::ensure!(packed.len() == sizes.len(), "a compressing thread failed");
    packed.into_iter().collect()
}

impl Workload for WriteLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            self.ctx.count_repeat(index, self.blobs.len());
            let i = index as usize % self.blobs.len();
            let (id, size, d) = &self.blobs[i];
            let (requests, expected) = match self.packed.get(i) {
                Some(packed) => {
                    let name = blobs::write_name_in(
                        &self.ctx.args.instance,
                        Compressor::Zstd,
                        self.ctx.function,
                        d,
                    );
                    let requests = blobs::data_write_requests(&name, packed, self.ctx.args.chunk);
                    (requests, packed.len() as i64)
                }
                None => {
                    let name = blobs::write_name(&self.ctx.args.instance, self.ctx.function, d);
                    let requests = self
                        .pool
                        .write_requests(&name, *id, *size, self.ctx.args.chunk);
                    (requests, *size as i64)
                }
            };
            let mut client = self.ctx.bytestream();
            let (result, latency) = timed(client.write(futures::stream::iter(requests))).await;
            let sample = match result {
                Ok(r) if r.get_ref().committed_size == expected => {
                    Sample::ok("write", latency, *size)
                }
                Ok(_) => Sample::failed("write", latency, "WRONG_COMMITTED_SIZE"),
                Err(s) => Sample::failed("write", latency, crate::stats::code_name(s.code())),
            };
            vec![sample]
        })
    }
}
