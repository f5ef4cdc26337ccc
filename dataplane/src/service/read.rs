//! ByteStream `Read`: a range of a blob as a stream of `ReadResponse`s. Small blobs come from
//! the owner shard as `Bytes`; large ones are read from their file on this core, the next chunk
//! read while the current one is sent. Blobs found on disk at start-up are hashed in full
//! before their first byte is served.

use super::{BlobError, BlobServices};
use crate::grpc::codec::encode_bytes_field;
use crate::grpc::{Call, Caller, Responder};
use crate::store::blob_io;
use crate::store::Found;
use bytes::Bytes;
use kiln_proto::bytestream::ReadRequest;
use kiln_reapi::digest::{BlobKey, Hasher};
use kiln_reapi::resource::parse_read;
use std::path::Path;

/// `ReadResponse.data`'s field number.
const DATA_FIELD: u32 = 10;

/// How a read ended without a status to send.
enum ReadEnd {
    Failed(BlobError),
    PeerGone,
}

impl From<BlobError> for ReadEnd {
    fn from(e: BlobError) -> ReadEnd {
        ReadEnd::Failed(e)
    }
}

pub(super) async fn serve(svc: &BlobServices, call: Call) {
    let caller = call.caller();
    let (mut body, mut responder) = call.into_parts();
    let request = match body.unary::<ReadRequest>().await {
        Ok(r) => r,
        Err(e) => {
            if let Some(status) = e.into_status() {
                responder.finish(Err(status));
            }
            return;
        }
    };
    tracing::debug!(resource = %request.resource_name, offset = request.read_offset, limit = request.read_limit, "read");
    match read(svc, &request, &caller, &mut responder).await {
        Ok(()) => responder.finish(Ok(())),
        Err(ReadEnd::Failed(e)) => responder.finish(Err(e.into())),
        Err(ReadEnd::PeerGone) => {}
    }
}

async fn read(
    svc: &BlobServices,
    request: &ReadRequest,
    caller: &Caller,
    out: &mut Responder,
) -> Result<(), ReadEnd> {
    let resource = parse_read(&request.resource_name).map_err(BlobError::from)?;
    let key = resource.key;
    caller
        .check(key.instance.as_str())
        .map_err(BlobError::from)?;
    let size = key.digest.size;
    if request.read_offset < 0 || request.read_offset as u64 > size {
        return Err(BlobError::ReadOffset {
            offset: request.read_offset,
            size,
        }
        .into());
    }
    if request.read_limit < 0 {
        return Err(BlobError::ReadLimit(request.read_limit).into());
    }
    let start = request.read_offset as u64;
    let end = match request.read_limit {
        0 => size,
        limit => size.min(start.saturating_add(limit as u64)),
    };
    match svc
        .cas
        .lookup(&key, svc.limits.inline_read)
        .await
        .map_err(BlobError::from)?
    {
        Found::Missing => Err(BlobError::NotFound(key).into()),
        Found::Bytes(data) => {
            let mut pos = start as usize;
            while pos < end as usize {
                let next = (pos + svc.limits.read_chunk).min(end as usize);
                send_chunk(out, data.slice(pos..next)).await?;
                pos = next;
            }
            Ok(())
        }
        Found::File { path, verified, .. } => {
            if !verified {
                verify(svc, &key, &path).await?;
            }
            stream_file(svc, &key, &path, start, end, out).await
        }
    }
}

async fn send_chunk(out: &mut Responder, data: Bytes) -> Result<(), ReadEnd> {
    out.send(&encode_bytes_field(DATA_FIELD, &data))
        .await
        .map_err(|_| ReadEnd::PeerGone)
}

/// Hashes a blob from an earlier run before serving it; a mismatch removes it.
async fn verify(svc: &BlobServices, key: &BlobKey, path: &Path) -> Result<(), BlobError> {
    let hash = blob_io::hash_file(
        &*svc.runtime,
        path,
        key.digest.size,
        Hasher::new(key.digest.function),
    )
    .await
    .map_err(|e| vanished_or_io(svc, key, path, e))?;
    if hash != key.digest.hash {
        svc.cas.report_corrupt(key);
        return Err(BlobError::NotFound(key.clone()));
    }
    svc.cas.report_verified(key);
    Ok(())
}

/// A file that vanished after the lookup (evicted, or removed behind the server's back) is a
/// miss, and the index forgets it so that `FindMissingBlobs` reports it and clients upload it
/// again; anything else is I/O. Tested by `a_vanished_blob_file_is_not_found` in
/// tests/lifecycle.rs.
fn vanished_or_io(svc: &BlobServices, key: &BlobKey, path: &Path, e: std::io::Error) -> BlobError {
    let error = missing_or_io(key, path, e);
    if matches!(error, BlobError::NotFound(_)) {
        svc.cas.report_vanished(key);
    }
    error
}

/// A file that vanished (evicted between lookup and open) is a miss; anything else is I/O.
fn missing_or_io(key: &BlobKey, path: &Path, e: std::io::Error) -> BlobError {
    if e.kind() == std::io::ErrorKind::NotFound {
        BlobError::NotFound(key.clone())
    } else {
        BlobError::io("read", path, e)
    }
}

async fn stream_file(
    svc: &BlobServices,
    key: &BlobKey,
    path: &Path,
    start: u64,
    end: u64,
    out: &mut Responder,
) -> Result<(), ReadEnd> {
    if start == end {
        return Ok(());
    }
    let file = svc
        .runtime
        .open_read(path)
        .await
        .map_err(|e| vanished_or_io(svc, key, path, e))?;
    let chunk = svc.limits.read_chunk as u64;
    let result = async {
        let mut pos = start;
        let mut current = blob_io::read_exact_at(&*file, pos, (end - pos).min(chunk) as usize)
            .await
            .map_err(|e| BlobError::io("read", path, e))?;
        loop {
            let next_pos = pos + current.len() as u64;
            if next_pos >= end {
                return send_chunk(out, current).await;
            }
            // Read the next chunk while this one goes out.
            let next_len = (end - next_pos).min(chunk) as usize;
            let (next, sent) = futures::future::join(
                blob_io::read_exact_at(&*file, next_pos, next_len),
                send_chunk(out, current),
            )
            .await;
            sent?;
            current = next.map_err(|e| BlobError::io("read", path, e))?;
            pos = next_pos;
        }
    }
    .await;
    let _ = file.close().await;
    result
}
