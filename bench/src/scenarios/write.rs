//! `write`: ByteStream uploads of blobs not yet on the server.

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::stats::Sample;
use futures::future::BoxFuture;
use kiln_proto::reapi;
use std::sync::Arc;

struct WriteLoad {
    ctx: Arc<Ctx>,
    pool: BlobPool,
    blobs: Vec<(u64, u64, reapi::Digest)>,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let n = ctx.planned_items(4 << 30, 16);
    let pool = BlobPool::new(ctx.args.size.max());
    let sizes: Vec<(u64, u64)> = (0..n as u64)
        .map(|i| (i, ctx.args.size.sample(i)))
        .collect();
    let digests = pool.digests(ctx.function, &sizes);
    let blobs = sizes
        .into_iter()
        .zip(digests)
        .map(|((id, size), d)| (id, size, d))
        .collect();
    Ok(Prepared::Run(Arc::new(WriteLoad { ctx, pool, blobs })))
}

impl Workload for WriteLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            self.ctx.count_repeat(index, self.blobs.len());
            let (id, size, d) = &self.blobs[index as usize % self.blobs.len()];
            let name = blobs::write_name(&self.ctx.args.instance, self.ctx.function, d);
            let requests = self
                .pool
                .write_requests(&name, *id, *size, self.ctx.args.chunk);
            let mut client = self.ctx.bytestream();
            let (result, latency) = timed(client.write(futures::stream::iter(requests))).await;
            let sample = match result {
                Ok(r) if r.get_ref().committed_size == *size as i64 => {
                    Sample::ok("write", latency, *size)
                }
                Ok(_) => Sample::failed("write", latency, "WRONG_COMMITTED_SIZE"),
                Err(s) => Sample::failed("write", latency, crate::stats::code_name(s.code())),
            };
            vec![sample]
        })
    }
}
