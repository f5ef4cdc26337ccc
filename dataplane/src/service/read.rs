//! ByteStream `Read`: a range of a blob as a stream of `ReadResponse`s, from the chain of
//! tiers. Small blobs are read whole (and kept by a memory tier); large ones stream from their
//! file on this core, the next chunk read while the current one is sent. A blob this process
//! has not checked is checked as it goes out ([`Blob::stream`]).
//!
//! A compressed read (`compressed-blobs/zstd/…`) sends one zstd frame of the blob from
//! `read_offset` (an offset into the uncompressed blob, as the spec says) to its end, compressed
//! one chunk at a time as it goes out; a frame of a whole blob is kept ([`super::frames`]) and
//! sent as it is to the next reader from the start.

use super::frames::Collecting;
use super::{BlobError, BlobServices};
use crate::grpc::codec::encode_bytes_field;
use crate::grpc::{Call, Caller, Responder};
use crate::store::tier::{Blob, ChunkSink, StreamEnd};
use bytes::Bytes;
use kiln_proto::bytestream::ReadRequest;
use kiln_reapi::compression::{Compressor, Deflater};
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
    let zstd = match resource.compressor {
        Compressor::Identity => None,
        Compressor::Zstd => {
            let zstd = svc.limits.zstd()?;
            if request.read_limit != 0 {
                return Err(BlobError::CompressedReadLimit(request.read_limit).into());
            }
            Some(zstd)
        }
    };
    let start = request.read_offset as u64;
    let end = match request.read_limit {
        0 => size,
        limit => size.min(start.saturating_add(limit as u64)),
    };
    let Some(blob) = svc.store.open(&key).await.map_err(BlobError::from)? else {
        return Err(BlobError::NotFound(key).into());
    };
    let chunk = svc.limits.read_chunk;
    // A compressed read from the start of a blob whose frame is kept (the blob was just found
    // in the store): the frame as it is.
    if let Some(z) = zstd.filter(|z| start == 0 && z.frames.keeps(size)) {
        if let Some(frame) = z.frames.get(&key) {
            let mut at = 0;
            while at < frame.len() {
                let end = (at + chunk.max(1)).min(frame.len());
                Responses(out).send(frame.slice(at..end)).await?;
                at = end;
            }
            return Ok(());
        }
    }
    // Otherwise the frame made now is kept, when it is of the whole blob and not too large.
    let (keep_as, collecting) = zstd
        .filter(|_| start == 0)
        .and_then(|z| z.frames.collect(size))
        .map(|c| (key.clone(), c))
        .unzip();
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
    let ended = |e| match e {
        StreamEnd::Store(e) => ReadEnd::Failed(e.into()),
        StreamEnd::Sink(e) => e,
    };
    let Some(zstd) = zstd else {
        return blob
            .stream(&*svc.runtime, start, end, chunk, &mut Responses(out))
            .await
            .map_err(ended);
    };
    let deflater = Deflater::new(zstd.level, Some(end - start)).map_err(BlobError::Deflate)?;
    let mut sink = Compressing {
        deflater,
        out: Responses(out),
        kept: collecting,
    };
    blob.stream(&*svc.runtime, start, end, chunk, &mut sink)
        .await
        .map_err(ended)?;
    let tail = sink.deflater.finish().map_err(BlobError::Deflate)?;
    if let (Some(key), Some(mut frame)) = (keep_as, sink.kept.take()) {
        frame.push(&tail);
        zstd.frames.keep(key, frame);
    }
    sink.out.send(tail).await
}

/// Pieces of the blob compressed into one zstd frame on their way out.
struct Compressing<'a> {
    deflater: Deflater,
    out: Responses<'a>,
    /// The frame so far, when it is to be kept.
    kept: Option<Collecting>,
}

impl ChunkSink for Compressing<'_> {
    type Error = ReadEnd;

    async fn send(&mut self, data: Bytes) -> Result<(), ReadEnd> {
        let packed = self.deflater.push(&data).map_err(BlobError::Deflate)?;
        if packed.is_empty() {
            return Ok(());
        }
        if let Some(kept) = self.kept.as_mut() {
            kept.push(&packed);
        }
        self.out.send(packed).await
    }
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
