//! CAS `BatchUpdateBlobs` and `BatchReadBlobs` (`FindMissingBlobs` is in
//! [`super::find_missing`]). Batch entries may travel zstd-compressed: an update entry is decompressed (bounded by its declared size) before it is
//! hashed; a read answers compressed where the client accepts zstd and that is smaller.

use super::{unary, BlobError, BlobServices, ZstdSettings};
use crate::grpc::Call;
use crate::store::blob_io;
use crate::store::tier::VerifiedUpload;
use futures::stream::{self, StreamExt};
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::{
    batch_read_blobs_response, batch_update_blobs_request, batch_update_blobs_response,
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse,
};
use kiln_reapi::compression::{compress, decompress, Compressor};
use kiln_reapi::digest::{BlobKey, Digest, Hasher, InstanceName};
use kiln_reapi::status::Classify;

/// Blobs of one batch written or read at the same time.
const BATCH_PARALLELISM: usize = 32;

fn ok_status() -> Option<RpcStatus> {
    Some(RpcStatus::default())
}

fn error_status(e: &BlobError) -> Option<RpcStatus> {
    Some(e.rpc_status())
}

pub(super) async fn serve_batch_update(svc: &BlobServices, call: Call) {
    unary(
        call,
        |request: BatchUpdateBlobsRequest, caller| async move {
            let instance = InstanceName::new(&request.instance_name)?;
            caller.check(instance.as_str())?;
            // A compressed entry counts at its declared size: that is what it inflates to
            // in memory. Sums saturate (past u64 is over any limit).
            let total: u64 = request.requests.iter().fold(0u64, |sum, r| {
                let size = match (r.compressor, r.digest.as_ref()) {
                    (0, _) | (_, None) => r.data.len() as u64,
                    // A negative size fails its own entry later; it is not a huge one.
                    (_, Some(d)) => u64::try_from(d.size_bytes)
                        .unwrap_or(0)
                        .max(r.data.len() as u64),
                };
                sum.saturating_add(size)
            });
            if total > svc.limits.max_batch_total {
                return Err(BlobError::BatchTooLarge {
                    total,
                    limit: svc.limits.max_batch_total,
                });
            }
            tracing::debug!(
                blobs = request.requests.len(),
                bytes = total,
                "batch update"
            );
            let function = request.digest_function;
            let responses = stream::iter(request.requests)
                .map(|r| {
                    let instance = instance.clone();
                    async move {
                        let status = match update_one(svc, &instance, function, &r).await {
                            Ok(()) => ok_status(),
                            Err(e) => error_status(&e),
                        };
                        batch_update_blobs_response::Response {
                            digest: r.digest,
                            status,
                        }
                    }
                })
                .buffered(BATCH_PARALLELISM)
                .collect::<Vec<_>>()
                .await;
            Ok(BatchUpdateBlobsResponse { responses })
        },
    )
    .await
}

async fn update_one(
    svc: &BlobServices,
    instance: &InstanceName,
    function: i32,
    request: &batch_update_blobs_request::Request,
) -> Result<(), BlobError> {
    let digest = Digest::from_proto_field(request.digest.as_ref(), function)?;
    let (data, zstd) = match Compressor::from_proto(request.compressor)? {
        Compressor::Identity => (request.data.clone(), None),
        Compressor::Zstd => {
            let zstd = svc.limits.zstd()?;
            let _decoder = zstd.decoder()?;
            let data = decompress(request.data.clone(), digest.size, zstd.max_window_log)?;
            (data, Some(zstd))
        }
    };
    if data.len() as u64 != digest.size {
        return Err(BlobError::DataSize {
            size: digest.size,
            got: data.len() as u64,
        });
    }
    let actual = Hasher::hash(digest.function, &data);
    if actual != digest.hash {
        return Err(BlobError::DataHash {
            expected: digest,
            actual: hex::encode(actual),
        });
    }
    if digest.is_empty_blob() {
        return Ok(());
    }
    if digest.size > svc.limits.cas_capacity {
        return Err(BlobError::TooLarge {
            size: digest.size,
            cap: svc.limits.cas_capacity,
        });
    }
    let key = BlobKey::new(instance.clone(), digest);
    // The client's frame decompressed to exactly the blob: kept for compressed reads once
    // the blob is stored (copied, as the entry is a slice of the whole request), when it
    // could be.
    let keep_frame = |key: BlobKey| {
        let fits = (request.data.len() as u64) < digest.size;
        if let Some(z) = zstd.filter(|z| fits && z.frames.keeps(digest.size)) {
            let frame = bytes::Bytes::copy_from_slice(&request.data);
            z.frames.keep_uploaded(key, frame, z.max_window_log);
        }
    };
    if svc.store.contains(std::slice::from_ref(&key)).await?[0] {
        keep_frame(key);
        return Ok(());
    }
    let epoch = svc.cas.sync_epoch();
    // A store that keeps no file per blob (the small-blob log) takes the bytes as they are.
    let temp = if svc.store.keeps_files(&key) {
        let temp = svc.layout.temp_path();
        let sync_data = svc.limits.sync_own_data(digest.size);
        if let Err(e) = blob_io::write_new(&*svc.runtime, &temp, &data, sync_data).await {
            let _ = svc.runtime.remove_file(&temp).await;
            return Err(BlobError::io("write", &temp, e));
        }
        Some(temp)
    } else {
        None
    };
    let upload = VerifiedUpload {
        temp,
        data: Some(data),
        epoch,
    };
    svc.store.put(&key, upload).await?;
    keep_frame(key);
    Ok(())
}

pub(super) async fn serve_batch_read(svc: &BlobServices, call: Call) {
    unary(call, |request: BatchReadBlobsRequest, caller| async move {
        let instance = InstanceName::new(&request.instance_name)?;
        caller.check(instance.as_str())?;
        let parsed: Vec<Result<Digest, BlobError>> = request
            .digests
            .iter()
            .map(|d| Digest::from_proto(d, request.digest_function).map_err(BlobError::from))
            .collect();
        // Sizes come from the client: summed without wrapping (two sizes near 2^63 used to
        // wrap to a small total and let a tiny request read gigabytes). A total past u64 is
        // over any limit. Tested by `oversized_batches_and_messages` in tests/bad_input.rs.
        let total: u64 = parsed
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .fold(0u64, |sum, d| sum.saturating_add(d.size));
        if total > svc.limits.max_batch_total {
            return Err(BlobError::BatchTooLarge {
                total,
                limit: svc.limits.max_batch_total,
            });
        }
        // zstd answers where the client accepts them and this server speaks zstd.
        let zstd = svc.limits.zstd.as_ref().filter(|_| {
            request
                .acceptable_compressors
                .contains(&Compressor::Zstd.proto())
        });
        tracing::debug!(blobs = parsed.len(), bytes = total, "batch read");
        let responses = stream::iter(request.digests.into_iter().zip(parsed))
            .map(|(proto, digest)| {
                let instance = instance.clone();
                async move {
                    let result = match digest {
                        Ok(d) => read_answer(svc, BlobKey::new(instance, d), zstd).await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok((data, compressor)) => batch_read_blobs_response::Response {
                            digest: Some(proto),
                            data,
                            compressor: compressor.proto(),
                            status: ok_status(),
                        },
                        Err(e) => batch_read_blobs_response::Response {
                            digest: Some(proto),
                            data: Default::default(),
                            compressor: 0,
                            status: error_status(&e),
                        },
                    }
                }
            })
            .buffered(BATCH_PARALLELISM)
            .collect::<Vec<_>>()
            .await;
        Ok(BatchReadBlobsResponse { responses })
    })
    .await
}

/// A blob for a batch answer: as it is, or zstd-compressed when `zstd` is given and that is
/// smaller. A kept frame of the blob is used rather than compressing again, and a frame made
/// here is kept when it is the smaller.
async fn read_answer(
    svc: &BlobServices,
    key: BlobKey,
    zstd: Option<&ZstdSettings>,
) -> Result<(bytes::Bytes, Compressor), BlobError> {
    let data = read_one(svc, key.clone()).await?;
    let Some(z) = zstd.filter(|_| !data.is_empty()) else {
        return Ok((data, Compressor::Identity));
    };
    let kept = z.frames.keeps(data.len() as u64);
    let packed = match kept.then(|| z.frames.get(&key)).flatten() {
        Some(frame) => frame,
        None => {
            let packed = compress(z.level, &data).map_err(BlobError::Deflate)?;
            if kept {
                z.frames.insert(key, packed.clone());
            }
            packed
        }
    };
    Ok(if packed.len() < data.len() {
        (packed, Compressor::Zstd)
    } else {
        (data, Compressor::Identity)
    })
}

async fn read_one(svc: &BlobServices, key: BlobKey) -> Result<bytes::Bytes, BlobError> {
    // The batch limit bounds the size, so every blob is read whole.
    match svc.store.open(&key).await? {
        Some(blob) => Ok(blob.read_all(&*svc.runtime).await?),
        None => Err(BlobError::NotFound(key)),
    }
}
