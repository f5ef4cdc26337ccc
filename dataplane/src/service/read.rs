//! ByteStream `Read`: a range of a blob as a stream of `ReadResponse`s, from the chain of
//! tiers. Small blobs are read whole (and kept by a memory tier); large ones stream from their
//! file on this core, the next chunk read while the current one is sent. A blob this process
//! has not checked is checked as it goes out ([`Blob::stream`]).

use super::{BlobError, BlobServices};
use crate::grpc::codec::encode_bytes_field;
use crate::grpc::{Call, Caller, Responder};
use crate::store::tier::{Blob, ChunkSink, StreamEnd};
use bytes::Bytes;
use kiln_proto::bytestream::ReadRequest;
use kiln_reapi::resource::parse_read;

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
    let Some(blob) = svc.store.open(&key).await.map_err(BlobError::from)? else {
        return Err(BlobError::NotFound(key).into());
    };
    // A small blob is read whole (a memory tier keeps it); a large one streams from its file.
    let blob = if !blob.in_memory() && blob.size() <= svc.limits.inline_read {
        Blob::bytes(
            key,
            blob.read_all(&*svc.runtime)
                .await
                .map_err(BlobError::from)?,
        )
    } else {
        blob
    };
    blob.stream(
        &*svc.runtime,
        start,
        end,
        svc.limits.read_chunk,
        &mut Responses(out),
    )
    .await
    .map_err(|e| match e {
        StreamEnd::Store(e) => ReadEnd::Failed(e.into()),
        StreamEnd::Sink(e) => e,
    })
}

/// Pieces of the blob as `ReadResponse`s.
struct Responses<'a>(&'a mut Responder);

impl ChunkSink for Responses<'_> {
    type Error = ReadEnd;

    async fn send(&mut self, data: Bytes) -> Result<(), ReadEnd> {
        self.0
            .send(&encode_bytes_field(DATA_FIELD, &data))
            .await
            .map_err(|_| ReadEnd::PeerGone)
    }
}
