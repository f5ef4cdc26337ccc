//! The scenarios. Each prepares what it needs (uploads blobs, builds trees) before the
//! measured phase and returns a [`Workload`] whose operations the load driver repeats, or a
//! reason to skip when the server lacks the feature.

mod action_cache;
mod batch;
mod execute;
mod find_missing;
mod get_tree;
mod mixed;
mod read;
mod splice;
pub mod tcp;
mod write;

use crate::blobs::{self, BlobPool};
use crate::cli::{Args, DigestFunction, Scenario};
use crate::connect::{Connections, MAX_MESSAGE};
use crate::load::Workload;
use crate::stats::Sample;
use anyhow::{bail, Context};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{self, batch_update_blobs_request};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tonic::transport::Channel;

/// What every scenario works with.
pub struct Ctx {
    /// The command line.
    pub args: Args,
    /// Connections to the endpoint.
    pub conns: Connections,
    /// The digest function.
    pub function: DigestFunction,
    /// The server's capabilities.
    pub caps: reapi::ServerCapabilities,
    /// Notes for the report, added while running.
    pub notes: std::sync::Mutex<Vec<String>>,
    /// Operations that reused a prepared item (counted by scenarios that prefer fresh ones).
    pub repeats: AtomicU64,
}

/// A scenario ready to run, or skipped.
pub enum Prepared {
    /// Run this.
    Run(Arc<dyn Workload>),
    /// Not possible against this server; why.
    Skip(String),
}

/// The write rate a duration-bound run plans distinct blobs for (more than this machine's
/// loopback uploads reach; a faster server recycles blobs and the run says so).
const PLANNED_BYTES_PER_SEC: f64 = 1.5e9;

impl Ctx {
    /// Uploads blobs with one `BatchUpdateBlobs`; the error is the code of the call, or of
    /// the first blob the server refused.
    pub async fn update_blobs(
        &self,
        requests: Vec<kiln_proto::reapi::batch_update_blobs_request::Request>,
    ) -> Result<(), tonic::Code> {
        let response = self
            .cas()
            .batch_update_blobs(kiln_proto::reapi::BatchUpdateBlobsRequest {
                instance_name: self.args.instance.clone(),
                requests,
                digest_function: self.proto_function(),
            })
            .await
            .map_err(|s| s.code())?
            .into_inner();
        match response
            .responses
            .iter()
            .find_map(|r| r.status.as_ref().filter(|s| s.code != 0))
        {
            Some(s) => Err(tonic::Code::from_i32(s.code)),
            None => Ok(()),
        }
    }

    /// Connects and asks for capabilities.
    pub async fn new(args: Args) -> anyhow::Result<Ctx> {
        let endpoint = args
            .endpoint
            .clone()
            .context("--endpoint grpc://HOST:PORT is required")?;
        let tls = crate::connect::TlsFiles {
            ca: args.tls_ca.clone(),
            identity: args.tls_cert.clone().zip(args.tls_key.clone()),
        };
        let conns = Connections::open(&endpoint, args.connections, &tls).await?;
        let caps = kiln_proto::reapi::capabilities_client::CapabilitiesClient::new(conns.pick())
            .get_capabilities(reapi::GetCapabilitiesRequest {
                instance_name: args.instance.clone(),
            })
            .await
            .with_context(|| {
                format!("GetCapabilities on {endpoint} failed; is it a REAPI server?")
            })?
            .into_inner();
        let function = args.digest_function;
        let supported = caps
            .cache_capabilities
            .as_ref()
            .map(|c| c.digest_functions.clone())
            .unwrap_or_default();
        if !supported.is_empty() && !supported.contains(&blobs::proto_function(function)) {
            bail!("{endpoint} does not support the {function:?} digest function (it advertises {supported:?})");
        }
        Ok(Ctx {
            function,
            conns,
            caps,
            notes: std::sync::Mutex::new(Vec::new()),
            repeats: AtomicU64::new(0),
            args,
        })
    }

    /// A note for the report.
    pub fn note(&self, note: impl Into<String>) {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(note.into());
    }

    /// The server's batch limit (4 MiB when it does not say).
    pub fn max_batch(&self) -> u64 {
        match self
            .caps
            .cache_capabilities
            .as_ref()
            .map(|c| c.max_batch_total_size_bytes)
        {
            Some(n) if n > 0 => n as u64,
            _ => 4 << 20,
        }
    }

    /// Whether the server executes actions.
    pub fn exec_enabled(&self) -> bool {
        self.caps
            .execution_capabilities
            .as_ref()
            .is_some_and(|e| e.exec_enabled)
    }

    /// The function's REAPI value.
    pub fn proto_function(&self) -> i32 {
        blobs::proto_function(self.function)
    }

    /// Clients on the next connection.
    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.conns.pick())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// CAS client.
    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.conns.pick())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// ActionCache client.
    pub fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.conns.pick())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Execution client.
    pub fn execution(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.conns.pick())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// How many distinct items to prepare: `--blobs`, else `--ops`, else enough for
    /// `budget` bytes of blobs of the configured sizes, or for the run's seconds at
    /// [`PLANNED_BYTES_PER_SEC`], whichever is more (at least `min`).
    pub fn planned_items(&self, budget: u64, min: usize) -> usize {
        if let Some(n) = self.args.blobs {
            return n.max(1);
        }
        if let Some(n) = self.args.ops {
            return (n as usize).max(1);
        }
        let seconds = self.args.duration.unwrap_or(0.0) + self.args.warmup.unwrap_or(1.0);
        let budget = budget.max((seconds * PLANNED_BYTES_PER_SEC) as u64);
        let mean = (0..1000).map(|i| self.args.size.sample(i)).sum::<u64>() / 1000;
        ((budget / mean.max(1)) as usize).clamp(min, 500_000)
    }

    /// Uploads blobs with ByteStream (large) or BatchUpdateBlobs (small), several at once.
    pub async fn upload(
        &self,
        pool: &BlobPool,
        items: &[(u64, u64, reapi::Digest)],
    ) -> anyhow::Result<()> {
        use futures::StreamExt;
        let limit = self.max_batch() / 2;
        let (small, large): (Vec<_>, Vec<_>) =
            items.iter().partition(|(_, size, _)| *size <= limit / 8);
        let mut batches: Vec<Vec<&(u64, u64, reapi::Digest)>> = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for item in small {
            if bytes + item.1 > limit && !current.is_empty() {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += item.1;
            current.push(item);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        let batch_uploads = futures::stream::iter(batches)
            .map(|batch| async move { self.batch_update(pool, &batch).await });
        let results: Vec<anyhow::Result<()>> = batch_uploads.buffer_unordered(8).collect().await;
        results.into_iter().collect::<anyhow::Result<()>>()?;
        let streams = futures::stream::iter(large).map(|(id, size, d)| async move {
            let name = blobs::write_name(&self.args.instance, self.function, d);
            let requests = pool.write_requests(&name, *id, *size, self.args.chunk);
            self.bytestream()
                .write(futures::stream::iter(requests))
                .await
                .with_context(|| format!("uploading {}/{} while preparing", d.hash, d.size_bytes))
        });
        let results: Vec<anyhow::Result<_>> = streams.buffer_unordered(4).collect().await;
        results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        Ok(())
    }

    async fn batch_update(
        &self,
        pool: &BlobPool,
        batch: &[&(u64, u64, reapi::Digest)],
    ) -> anyhow::Result<()> {
        let requests = batch
            .iter()
            .map(|(id, size, d)| batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: pool.contents(*id, *size),
                compressor: 0,
            })
            .collect();
        let response = self
            .cas()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: self.args.instance.clone(),
                requests,
                digest_function: self.proto_function(),
            })
            .await
            .context("BatchUpdateBlobs while preparing")?
            .into_inner();
        for r in response.responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                bail!(
                    "server refused a blob while preparing: {} {}",
                    s.code,
                    s.message
                );
            }
        }
        Ok(())
    }

    /// Records a repeat of a prepared item.
    pub fn count_repeat(&self, index: u64, prepared: usize) {
        if index as usize >= prepared {
            self.repeats.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Prepares `scenario` against the endpoint in `ctx`.
pub async fn prepare(ctx: Arc<Ctx>, scenario: Scenario) -> anyhow::Result<Prepared> {
    match scenario {
        Scenario::Write => write::prepare(ctx).await,
        Scenario::Read => read::prepare(ctx).await,
        Scenario::Batch => batch::prepare(ctx).await,
        Scenario::FindMissing => find_missing::prepare(ctx).await,
        Scenario::ActionCache => action_cache::prepare(ctx).await,
        Scenario::GetTree => get_tree::prepare(ctx).await,
        Scenario::Splice => splice::prepare(ctx).await,
        Scenario::Execute => execute::prepare(ctx).await,
        Scenario::Mixed => mixed::prepare(ctx).await,
        Scenario::Tcp => bail!("the tcp scenario needs no endpoint"),
    }
}

/// Times a future.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// Reads a blob compressed (`compressed-blobs/zstd/…`), decompressing and hashing as it
/// arrives; `Ok(false)` if the result is not the blob.
async fn read_compressed(ctx: &Ctx, d: &reapi::Digest) -> Result<bool, tonic::Status> {
    use futures::StreamExt;
    use kiln_reapi::compression::Inflater;
    let size = u64::try_from(d.size_bytes).unwrap_or_default();
    let Ok(mut inflater) = Inflater::new(size, 1 << 20, 27) else {
        return Ok(false);
    };
    let name = blobs::read_name_in(
        &ctx.args.instance,
        kiln_reapi::compression::Compressor::Zstd,
        ctx.function,
        d,
    );
    let mut stream = ctx
        .bytestream()
        .read(kiln_proto::bytestream::ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut h = blobs::hasher(ctx.function);
    let mut got = 0u64;
    while let Some(msg) = stream.next().await {
        inflater.push(msg?.data);
        loop {
            match inflater.next_chunk() {
                Ok(Some(piece)) => {
                    got += piece.len() as u64;
                    h.update(&piece);
                }
                Ok(None) => break,
                Err(_) => return Ok(false),
            }
        }
    }
    Ok(inflater.finish().is_ok() && got == size && h.finish_hex() == d.hash)
}

/// Reads a blob with ByteStream, hashing as it arrives; `Ok(false)` if the bytes do not
/// match the digest. With `--compressed`, reads it zstd-compressed, whole. With `--ranges N` (and at least 1 MiB per range), N reads of its ranges
/// run at once and the whole is hashed in order once all have arrived.
pub async fn read_verified(ctx: &Ctx, d: &reapi::Digest) -> Result<bool, tonic::Status> {
    const MIN_RANGE: i64 = 1 << 20;
    if ctx.args.compressed {
        return read_compressed(ctx, d).await;
    }
    let ranges = i64::try_from(ctx.args.ranges.max(1)).unwrap_or(1);
    let mut h = blobs::hasher(ctx.function);
    let mut size = 0i64;
    if ranges == 1 || d.size_bytes / ranges < MIN_RANGE {
        read_range(ctx, d, 0, 0, |data| {
            size += data.len() as i64;
            h.update(data);
        })
        .await?;
    } else {
        let per = (d.size_bytes + ranges - 1) / ranges;
        let parts = (0..ranges).map(|i| {
            let offset = i * per;
            let limit = per.min(d.size_bytes - offset);
            async move {
                let mut got = Vec::new();
                read_range(ctx, d, offset, limit, |data| got.push(data.clone())).await?;
                Ok::<_, tonic::Status>(got)
            }
        });
        for part in futures::future::try_join_all(parts).await? {
            for data in part {
                size += data.len() as i64;
                h.update(&data);
            }
        }
    }
    Ok(size == d.size_bytes && h.finish_hex() == d.hash)
}

/// One ByteStream read of `limit` bytes at `offset` (0: to the end), each message's data to
/// `each`.
async fn read_range(
    ctx: &Ctx,
    d: &reapi::Digest,
    offset: i64,
    limit: i64,
    mut each: impl FnMut(&bytes::Bytes),
) -> Result<(), tonic::Status> {
    use futures::StreamExt;
    let mut stream = ctx
        .bytestream()
        .read(kiln_proto::bytestream::ReadRequest {
            resource_name: blobs::read_name(&ctx.args.instance, ctx.function, d),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    while let Some(msg) = stream.next().await {
        each(&msg?.data);
    }
    Ok(())
}

/// A sample for a verified read.
pub fn read_sample(
    kind: &'static str,
    latency: std::time::Duration,
    d: &reapi::Digest,
    r: Result<bool, tonic::Status>,
) -> Sample {
    match r {
        Ok(true) => Sample::ok(kind, latency, d.size_bytes as u64),
        Ok(false) => Sample::failed(kind, latency, "DIGEST_MISMATCH"),
        Err(s) => Sample::failed(kind, latency, crate::stats::code_name(s.code())),
    }
}
