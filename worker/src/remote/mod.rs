//! The server's CAS as the worker uses it, a [`Cas`] over gRPC: downloads streamed to files
//! while hashing (large blobs in parallel ranges, each on a connection of its own), small
//! blobs in batches, uploads of output files.
//!
//! Whole reads are in [`read`], downloads into files in [`download`], uploads in [`upload`].

mod download;
mod read;
pub mod switch;
#[cfg(test)]
mod tests;
mod upload;

use download::RemoveOnDrop;

use crate::link::LinkChannel as Channel;
use bytes::Bytes;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, ReadResponse};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::FindMissingBlobsRequest;
use kiln_reapi::cas::{Cas, CasError, CasFuture};
use kiln_reapi::compression::Compressor;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::resource::ReadResource;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Largest message exchanged with the server.
const MAX_MESSAGE: usize = 64 << 20;
/// Blobs up to this size travel in batches.
pub const SMALL: u64 = 256 << 10;
/// Bytes per batch call.
const BATCH: u64 = 2 << 20;
/// Digests per FindMissingBlobs call.
const FIND_MISSING: usize = 10_000;
/// ByteStream write message size.
const CHUNK: usize = 1 << 20;
/// The smallest range a download is split into.
const MIN_RANGE: u64 = 1 << 20;

/// The worker's connections to the server's CAS.
#[derive(Clone)]
pub struct CasLinks {
    /// Every call but the ranges of a large download.
    pub main: Channel,
    /// One connection per range of a large download (the first may be `main`): the server
    /// serves each connection on one of its cores.
    pub ranges: Arc<[Channel]>,
    /// Blobs of at least this size are downloaded in ranges.
    pub ranged_min: u64,
}

impl CasLinks {
    /// Everything on one connection, every download one stream.
    pub fn single(channel: Channel) -> CasLinks {
        CasLinks {
            ranges: Arc::from(vec![channel.clone()]),
            main: channel,
            ranged_min: u64::MAX,
        }
    }
}

/// The server's CAS over gRPC, as a [`Cas`]: every call names its instance and each digest
/// its function, so one handle serves every action.
#[derive(Clone)]
pub struct RemoteCas {
    links: CasLinks,
}

fn bytestream_client(channel: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Splits `digests` into runs, in order, of one digest function each and at most `count`
/// digests and (past the first) `bytes` bytes: a request names one function, and has a size.
fn runs(digests: &[Digest], count: usize, bytes: u64) -> Vec<&[Digest]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut total = 0u64;
    for (i, d) in digests.iter().enumerate() {
        let full = i - start >= count
            || total.saturating_add(d.size) > bytes
            || d.function != digests[start].function;
        if i > start && full {
            out.push(&digests[start..i]);
            start = i;
            total = 0;
        }
        total = total.saturating_add(d.size);
    }
    if start < digests.len() {
        out.push(&digests[start..]);
    }
    out
}

fn remote(status: tonic::Status) -> CasError {
    CasError::Remote(status)
}

impl RemoteCas {
    /// The server through `links`.
    pub fn new(links: CasLinks) -> RemoteCas {
        RemoteCas { links }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.links.main.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        bytestream_client(&self.links.main)
    }

    /// A ByteStream Read of `len` bytes (0: to the end) of a blob from `offset`, on `channel`.
    async fn open_read(
        channel: &Channel,
        instance: &InstanceName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<tonic::Streaming<ReadResponse>, tonic::Status> {
        let as_i64 =
            |v: u64| i64::try_from(v).map_err(|_| tonic::Status::out_of_range("offset past 2^63"));
        let request = ReadRequest {
            resource_name: Self::name(instance, digest),
            read_offset: as_i64(offset)?,
            read_limit: as_i64(len)?,
        };
        Ok(bytestream_client(channel).read(request).await?.into_inner())
    }

    fn name(instance: &InstanceName, d: &Digest) -> String {
        ReadResource {
            key: BlobKey::new(instance.clone(), *d),
            compressor: Compressor::Identity,
        }
        .name()
    }
}

impl Cas for RemoteCas {
    fn find_missing<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Digest>> {
        Box::pin(async move {
            let mut missing = Vec::new();
            for run in runs(digests, FIND_MISSING, u64::MAX) {
                let function = run[0].function.proto() as i32;
                let response = self
                    .cas()
                    .find_missing_blobs(FindMissingBlobsRequest {
                        instance_name: instance.as_str().to_string(),
                        blob_digests: run.iter().map(Digest::to_proto).collect(),
                        digest_function: function,
                    })
                    .await
                    .map_err(remote)?
                    .into_inner();
                let asked: std::collections::HashSet<&Digest> = run.iter().collect();
                for d in response.missing_blob_digests {
                    let d = Digest::from_proto(&d, function)
                        .map_err(|e| CasError::bad_answer(e.to_string()))?;
                    if !asked.contains(&d) {
                        return Err(CasError::bad_answer(format!(
                            "FindMissingBlobs answered with {d:?}, which was not asked about"
                        )));
                    }
                    missing.push(d);
                }
            }
            Ok(missing)
        })
    }

    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<Bytes>>> {
        Box::pin(async move {
            let mut out: Vec<Option<Bytes>> = vec![None; digests.len()];
            // Small blobs in batches, larger ones streamed, each answer to its place.
            let (small, large): (Vec<usize>, Vec<usize>) =
                (0..digests.len()).partition(|&i| digests[i].size <= SMALL);
            let small_digests: Vec<Digest> = small.iter().map(|&i| digests[i]).collect();
            let mut places = small.into_iter();
            for run in runs(&small_digests, usize::MAX, BATCH) {
                for found in self.read_batch(instance, run).await? {
                    if let Some(i) = places.next() {
                        out[i] = found;
                    }
                }
            }
            for i in large {
                out[i] = self.read_stream(instance, digests[i]).await?;
            }
            Ok(out)
        })
    }

    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool> {
        Box::pin(async move {
            // A file already there is not this call's to replace or remove.
            if tokio::fs::symlink_metadata(path).await.is_ok() {
                let exists = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
                return Err(CasError::io("create a download's file", &exists));
            }
            // Whatever happens from here (a failure, or the caller giving up), no partial
            // file stays.
            let mut partial = RemoveOnDrop(Some(path.to_path_buf()));
            let result = self.download(instance, digest, path).await;
            if result.is_ok() {
                partial.0 = None;
            }
            match result {
                Ok(()) => Ok(true),
                Err(e) if e.is_missing() => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, Bytes)>,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            let (small, large): (Vec<_>, Vec<_>) =
                blobs.into_iter().partition(|(d, _)| d.size <= SMALL);
            self.upload_small(instance, &small).await?;
            for (d, data) in large {
                let pieces = (0..data.len())
                    .step_by(CHUNK)
                    .map(|at| Ok(data.slice(at..(at + CHUNK).min(data.len()))))
                    .collect::<Vec<_>>();
                self.upload_stream(instance, d, futures::stream::iter(pieces))
                    .await?;
            }
            Ok(())
        })
    }

    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            if digest.size <= SMALL {
                let data = tokio::fs::read(path)
                    .await
                    .map_err(|e| CasError::io("read an output", &e))?;
                return self.upload_small(instance, &[(digest, data.into())]).await;
            }
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| CasError::io("open an output", &e))?;
            let pieces = futures::stream::try_unfold(file, |mut file| async move {
                let mut buf = vec![0u8; CHUNK];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| CasError::io("read an output", &e))?;
                buf.truncate(n);
                Ok((n > 0).then(|| (Bytes::from(buf), file)))
            });
            self.upload_stream(instance, digest, Box::pin(pieces)).await
        })
    }
}

/// The bytes received do not hash to the digest.
fn mismatch(digest: &Digest) -> CasError {
    CasError::bad_answer(format!("downloaded bytes do not match {digest:?}"))
}
