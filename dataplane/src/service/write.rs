//! ByteStream `Write` and `QueryWriteStatus`.
//!
//! A `Write` streams into a temp file while hashing with the digest's function; on a valid
//! `finish_write` the owner shard renames it into place. A stream that drops (or ends without
//! `finish_write`) parks its temp file and hash state with the owner, so the client can ask
//! `QueryWriteStatus` and resume from the committed offset. A blob already stored is answered
//! at once with its full size (-1 for a compressed upload, as the spec says), without reading
//! the rest of the stream.
//!
//! A compressed upload (`compressed-blobs/zstd/…`) is decompressed one chunk at a time on its
//! way to the same temp file and hash ([`CompressedUpload`]); what is parked and what
//! `QueryWriteStatus` reports is the uncompressed bytes, where a resumed stream starts a new
//! frame. The frames of a blob uploaded whole in one stream are kept for compressed reads
//! ([`super::frames`]) once the blob is stored.

use super::frames::Collecting;
use super::{BlobError, BlobServices};
use crate::grpc::{Call, Caller, RecvError, RequestBody};
use crate::slots::Slot;
use crate::store::accounting::Staged;
use crate::store::blob_io::TempWriter;
use crate::store::compressed_upload::CompressedUpload;
use crate::store::parked::ParkedUpload;
use crate::store::tier::in_flight::Arriving;
use crate::store::tier::{held_outside_files, VerifiedUpload};
use crate::store::upload::{UploadError, UploadState};
use crate::store::{UploadClaim, UploadStatus};
use bytes::{Bytes, BytesMut};
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, WriteRequest, WriteResponse,
};
use kiln_reapi::compression::Compressor;
use kiln_reapi::resource::{parse_write, WriteResource};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a write ended without a result.
enum WriteEnd {
    Failed(BlobError),
    /// The request stream itself was malformed (framing, decoding).
    Malformed(tonic::Status),
    PeerGone,
}

impl From<BlobError> for WriteEnd {
    fn from(e: BlobError) -> WriteEnd {
        WriteEnd::Failed(e)
    }
}

impl From<RecvError> for WriteEnd {
    fn from(e: RecvError) -> WriteEnd {
        match e {
            RecvError::Status(s) => WriteEnd::Malformed(s),
            RecvError::Gone(_) => WriteEnd::PeerGone,
        }
    }
}

pub(super) async fn serve(svc: &BlobServices, call: Call) {
    let caller = call.caller();
    let (mut body, mut responder) = call.into_parts();
    match write(svc, &mut body, &caller).await {
        Ok(committed_size) => {
            if responder
                .send_message(&WriteResponse { committed_size })
                .await
                .is_ok()
            {
                responder.finish(Ok(()));
            }
        }
        Err(WriteEnd::Failed(e)) => responder.finish(Err(e.into())),
        Err(WriteEnd::Malformed(status)) => responder.finish(Err(status)),
        Err(WriteEnd::PeerGone) => {}
    }
}

async fn write(
    svc: &BlobServices,
    body: &mut RequestBody,
    caller: &Caller,
) -> Result<i64, WriteEnd> {
    let first: WriteRequest = match svc.limits.stalled_upload {
        None => body.decode().await?,
        Some(limit) => {
            match futures::future::select(Box::pin(body.decode()), svc.runtime.sleep(limit)).await {
                futures::future::Either::Left((first, _)) => first?,
                futures::future::Either::Right(_) => {
                    return Err(BlobError::Stalled {
                        secs: limit.as_secs(),
                        committed: 0,
                        size: 0,
                    }
                    .into())
                }
            }
        }
    }
    .ok_or(BlobError::EmptyWrite)?;
    if first.resource_name.is_empty() {
        return Err(
            BlobError::WriteResource("the first WriteRequest must carry resource_name").into(),
        );
    }
    let resource = parse_write(&first.resource_name).map_err(BlobError::from)?;
    caller
        .check(resource.key.instance.as_str())
        .map_err(BlobError::from)?;
    let digest = resource.key.digest;
    let compressed = resource.compressor != Compressor::Identity;
    let zstd = if compressed {
        Some(svc.limits.zstd()?.clone())
    } else {
        None
    };
    tracing::debug!(resource = %first.resource_name, "write");
    if digest.size > svc.limits.cas_capacity {
        return Err(BlobError::TooLarge {
            size: digest.size,
            cap: svc.limits.cas_capacity,
        }
        .into());
    }
    if digest.is_empty_blob() {
        if compressed {
            // Always present: answered as a blob already stored, whatever frame came with it.
            if first.write_offset != 0 {
                return Err(BlobError::from(UploadError::Offset {
                    expected: 0,
                    got: first.write_offset,
                })
                .into());
            }
            return Ok(-1);
        }
        // Always present; still hold the client to the rules for this one message.
        UploadState::new(digest)
            .accept(first.write_offset, &first.data, true)
            .map_err(BlobError::from)?;
        return Ok(0);
    }
    let upload_key = resource.upload_key();
    let progress = Arc::new(AtomicU64::new(0));
    // A blob the chain keeps outside files (a small-blob log): the chain says whether it is
    // held, not the owner's index of files.
    let outside = held_outside_files(&*svc.store, &resource.key)
        .await
        .map_err(BlobError::from)?;
    if outside == Some(true) {
        return Ok(if compressed { -1 } else { digest.size as i64 });
    }
    let elsewhere = outside.is_some();
    // Such a blob is taken from memory, without a temp file (and so without room against the
    // files' cap), within the process's budget of bytes held so (past it, through a temp file
    // as for the files); one held in memory starts over when interrupted rather than resumes.
    let held = if elsewhere {
        usize::try_from(digest.size)
            .ok()
            .and_then(|n| svc.limits.held_uploads.take_n(n))
    } else {
        None
    };
    let claim = svc
        .cas
        .claim_upload(
            upload_key.clone(),
            &resource.key,
            progress.clone(),
            !elsewhere,
            held.is_none(),
        )
        .await
        .map_err(BlobError::from)?;
    // Held in memory only when starting afresh (a parked upload resumes from its file).
    let held = held.filter(|_| matches!(claim, UploadClaim::Fresh(_)));
    let in_memory = held.is_some();
    let (state, mut writer, staged, epoch) = match claim {
        UploadClaim::Present if compressed => return Ok(-1),
        UploadClaim::Present => return Ok(digest.size as i64),
        UploadClaim::Busy => return Err(BlobError::UploadBusy(resource.upload_id.clone()).into()),
        UploadClaim::Full { staging, cap } => {
            return Err(BlobError::StagingFull {
                size: digest.size,
                staging,
                cap,
            }
            .into())
        }
        // Claimed without room against the cap: held in memory.
        UploadClaim::Fresh(staged) if in_memory => {
            (UploadState::new(digest), None, staged, svc.cas.sync_epoch())
        }
        UploadClaim::Fresh(staged) => match new_temp(svc, digest.size).await {
            Ok((w, epoch)) => (UploadState::new(digest), Some(w), staged, epoch),
            Err(e) => {
                svc.cas
                    .release_upload(upload_key, &resource.key, None)
                    .await;
                return Err(e.into());
            }
        },
        UploadClaim::Resume(parked) => {
            progress.store(parked.committed, Ordering::Relaxed);
            match TempWriter::reopen(&*svc.runtime, parked.temp.clone(), parked.committed).await {
                Ok(w) => (
                    UploadState::resume(digest, parked.committed, parked.hasher),
                    Some(w),
                    parked.staged,
                    parked.epoch,
                ),
                Err(_) => {
                    // The parked file is gone; start over (the client learns from the offset).
                    let _ = svc.runtime.remove_file(&parked.temp).await;
                    match new_temp(svc, digest.size).await {
                        Ok((w, epoch)) => {
                            progress.store(0, Ordering::Relaxed);
                            (UploadState::new(digest), Some(w), parked.staged, epoch)
                        }
                        Err(e) => {
                            svc.cas
                                .release_upload(upload_key, &resource.key, None)
                                .await;
                            return Err(e.into());
                        }
                    }
                }
            }
        }
    };
    let inflate = match zstd {
        None => None,
        Some(z) => match z.decoder().and_then(|permit| {
            let upload = CompressedUpload::new(
                state.committed(),
                digest.size,
                svc.limits.read_chunk,
                z.max_window_log,
            )?;
            Ok((upload, permit))
        }) {
            Ok(c) => Some(c),
            Err(e) => {
                // Nothing written: the temp file and the claim go back.
                if let Some(w) = writer {
                    w.discard(&*svc.runtime).await;
                }
                svc.cas
                    .release_upload(upload_key, &resource.key, None)
                    .await;
                return Err(e.into());
            }
        },
    };
    // A small blob sent whole on this stream also seeds the memory tiers.
    // (Bytes kept in memory in place of a file are held whatever their size: a store
    // keeping no files takes only small blobs.)
    let keep = (state.committed() == 0 && (in_memory || digest.size <= svc.limits.inline_read))
        .then(|| Kept::new(digest.size as usize));
    // The client's frames of a blob sent whole on this stream are kept for compressed reads.
    let frame = match (&inflate, svc.limits.zstd.as_ref()) {
        (Some(_), Some(z)) if state.committed() == 0 => z.frames.collect(digest.size),
        _ => None,
    };
    // Readers of the blob may follow this upload (with an in-flight tier).
    // Readers follow an upload through its temp file: one kept in memory is not followed.
    let arriving = match (svc.uploads.as_ref(), writer.as_mut()) {
        (Some(u), Some(w)) => {
            let arriving = u.begin(&resource.key, w.path(), w.on_disk());
            if let Some(a) = &arriving {
                w.on_progress(a.follower());
            }
            arriving
        }
        _ => None,
    };
    let mut upload = Upload {
        svc,
        resource: &resource,
        name: first.resource_name.clone(),
        state,
        writer,
        held,
        staged: Some(staged),
        epoch,
        progress,
        keep,
        frame,
        arriving,
        inflate,
    };
    let result = upload.run(first, body).await;
    upload.end(upload_key, &result).await;
    result
}

/// A new temp file for an upload of `size` bytes (written with direct I/O when it is large),
/// and the count of failed filesystem syncs before its first byte.
async fn new_temp(svc: &BlobServices, size: u64) -> Result<(TempWriter, u64), BlobError> {
    let path = svc.layout.temp_path();
    let epoch = svc.cas.sync_epoch();
    let direct = svc.limits.direct_io(size);
    match TempWriter::create(&*svc.runtime, path.clone(), size, direct).await {
        Ok(w) => Ok((w, epoch)),
        Err(e) => Err(BlobError::io("create", &path, e)),
    }
}

/// One upload in progress on this stream.
struct Upload<'a> {
    svc: &'a BlobServices,
    resource: &'a WriteResource,
    /// The resource name as the first message gave it.
    name: String,
    state: UploadState,
    writer: Option<TempWriter>,
    /// Its place in [`crate::service::BlobLimits::held_uploads`] when it is kept in memory
    /// (`keep`) rather than in a temp file.
    held: Option<Slot>,
    /// The space the temp file holds against the cap, until committed or dropped.
    staged: Option<Staged>,
    /// Failed filesystem syncs before the temp file was first written (see
    /// [`crate::store::CasClient::commit`]).
    epoch: u64,
    progress: Arc<AtomicU64>,
    /// For small blobs uploaded in one go: the data, to seed the memory tier.
    keep: Option<Kept>,
    /// For a blob uploaded compressed in one go: the client's frames, to keep for reads.
    frame: Option<Collecting>,
    /// This upload as readers following it see it (dropped unstored: it failed for them).
    arriving: Option<Arriving>,
    /// For a compressed upload: its decompression and offsets, and its decoder's place in
    /// the memory budget.
    inflate: Option<(CompressedUpload, Slot)>,
}

impl Upload<'_> {
    async fn run(&mut self, first: WriteRequest, body: &mut RequestBody) -> Result<i64, WriteEnd> {
        let mut message = first;
        // The stall clock restarts only when bytes arrive: empty messages do not keep a
        // stream alive.
        let mut progressed = self.svc.runtime.now();
        loop {
            if !message.data.is_empty() {
                progressed = self.svc.runtime.now();
            }
            if !message.resource_name.is_empty() && message.resource_name != self.name {
                return Err(BlobError::WriteResource(
                    "resource_name changed within one Write stream",
                )
                .into());
            }
            self.take(message.write_offset, message.data, message.finish_write)
                .await?;
            if self.state.is_finished() {
                return self.commit().await;
            }
            let next = Box::pin(body.decode::<WriteRequest>());
            let next = match self.svc.limits.stalled_upload {
                None => next.await,
                Some(limit) => {
                    let since = self.svc.runtime.now().saturating_duration_since(progressed);
                    let left = limit.saturating_sub(since);
                    match futures::future::select(next, self.svc.runtime.sleep(left)).await {
                        futures::future::Either::Left((next, _)) => next,
                        futures::future::Either::Right(_) => {
                            return Err(BlobError::Stalled {
                                secs: limit.as_secs(),
                                committed: self.state.committed(),
                                size: self.state.digest().size,
                            }
                            .into())
                        }
                    }
                }
            };
            message = match next? {
                Some(m) => m,
                None => {
                    return Err(BlobError::Unfinished {
                        committed: self.state.committed(),
                        size: self.state.digest().size,
                    }
                    .into())
                }
            };
        }
    }

    /// Takes one message's data: as it is, or decompressed one chunk at a time.
    async fn take(&mut self, offset: i64, data: Bytes, finish: bool) -> Result<(), WriteEnd> {
        let Some((inflate, _)) = self.inflate.as_mut() else {
            self.state
                .accept(offset, &data, finish)
                .map_err(BlobError::from)?;
            return self.store_piece(data).await;
        };
        if let Some(frame) = self.frame.as_mut() {
            frame.push(&data);
        }
        inflate
            .push(self.state.committed(), offset, data)
            .map_err(BlobError::from)?;
        while let Some(piece) = self.next_piece()? {
            let at = self.state.committed() as i64;
            self.state
                .accept(at, &piece, false)
                .map_err(BlobError::from)?;
            self.store_piece(piece).await?;
        }
        if finish {
            if let Some((inflate, _)) = self.inflate.as_ref() {
                inflate.finish().map_err(BlobError::from)?;
            }
            let at = self.state.committed() as i64;
            self.state.accept(at, &[], true).map_err(BlobError::from)?;
        }
        Ok(())
    }

    /// The next decompressed piece of a compressed upload's current message.
    fn next_piece(&mut self) -> Result<Option<Bytes>, BlobError> {
        match self.inflate.as_mut() {
            Some((inflate, _)) => Ok(inflate.next_chunk()?),
            None => Ok(None),
        }
    }

    /// Writes accepted bytes to the temp file (and keeps them for the memory tier).
    async fn store_piece(&mut self, data: Bytes) -> Result<(), WriteEnd> {
        if let Some(writer) = self.writer.as_mut() {
            writer
                .append(&data)
                .await
                .map_err(|e| BlobError::io("write", writer.path(), e))?;
        }
        if let Some(keep) = self.keep.as_mut() {
            keep.push(data);
        }
        // An upload held in memory cannot be resumed: QueryWriteStatus keeps saying 0, so
        // that a client that retries starts over.
        if self.held.is_none() {
            self.progress
                .store(self.state.committed(), Ordering::Relaxed);
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<i64, WriteEnd> {
        let (temp, data) = if self.held.is_some() {
            let Some(kept) = self.keep.take() else {
                return Err(BlobError::WriteResource("upload already committed").into());
            };
            (None, Some(kept.into_bytes()))
        } else {
            let Some(writer) = self.writer.take() else {
                return Err(BlobError::WriteResource("upload already committed").into());
            };
            let path = writer.path().to_path_buf();
            if let Err(e) = writer
                .finish(self.svc.limits.sync_own_data(self.state.digest().size))
                .await
            {
                let _ = self.svc.runtime.remove_file(&path).await;
                return Err(BlobError::io("write", &path, e).into());
            }
            (Some(path), self.keep.take().map(Kept::into_bytes))
        };
        // The committed blob is counted by its owner from here on.
        self.staged = None;
        let upload = VerifiedUpload {
            temp,
            data,
            epoch: self.epoch,
        };
        self.svc
            .store
            .put(&self.resource.key, upload)
            .await
            .map_err(BlobError::from)?;
        if let Some(a) = self.arriving.take() {
            a.stored();
        }
        // The frame decompressed to exactly the blob's bytes, now stored.
        let collected = self.frame.take().and_then(|f| f.into_frame());
        if let (Some(frame), Some(z)) = (collected, self.svc.limits.zstd.as_ref()) {
            z.frames
                .keep_uploaded(self.resource.key.clone(), frame, z.max_window_log);
        }
        Ok(match &self.inflate {
            Some((inflate, _)) => inflate.committed_size(),
            None => self.state.digest().size as i64,
        })
    }

    /// Releases the upload: parks it when the stream was interrupted, else drops its file.
    async fn end(mut self, upload_key: String, result: &Result<i64, WriteEnd>) {
        let park = match (result, self.writer.take()) {
            (Err(WriteEnd::PeerGone), Some(w))
            | (Err(WriteEnd::Failed(BlobError::Unfinished { .. })), Some(w))
            | (Err(WriteEnd::Failed(BlobError::Stalled { .. })), Some(w)) => {
                let path = w.path().to_path_buf();
                match (w.suspend().await, self.staged.take()) {
                    (Ok((temp, written)), Some(staged)) if written == self.state.committed() => {
                        let (committed, hasher) = self.state.clone().into_parts();
                        Some(ParkedUpload {
                            temp,
                            committed,
                            hasher,
                            parked_at: self.svc.runtime.now(),
                            staged,
                            epoch: self.epoch,
                        })
                    }
                    (Ok((temp, _)), _) => {
                        let _ = self.svc.runtime.remove_file(&temp).await;
                        None
                    }
                    (Err(_), _) => {
                        // A write that failed (a direct write reports it late): nothing to
                        // resume from.
                        let _ = self.svc.runtime.remove_file(&path).await;
                        None
                    }
                }
            }
            (_, Some(w)) => {
                w.discard(&*self.svc.runtime).await;
                None
            }
            (_, None) => None,
        };
        self.svc
            .cas
            .release_upload(upload_key, &self.resource.key, park)
            .await;
    }
}

pub(super) async fn serve_query(svc: &BlobServices, call: Call) {
    super::unary(
        call,
        |request: QueryWriteStatusRequest, caller| async move {
            let resource = parse_write(&request.resource_name)?;
            caller.check(resource.key.instance.as_str())?;
            let size = resource.key.digest.size as i64;
            if resource.key.digest.is_empty_blob() {
                return Ok(QueryWriteStatusResponse {
                    committed_size: 0,
                    complete: true,
                });
            }
            // As for a write: the chain answers for blobs it keeps outside files.
            let outside = held_outside_files(&*svc.store, &resource.key).await?;
            if outside == Some(true) {
                return Ok(QueryWriteStatusResponse {
                    committed_size: size,
                    complete: true,
                });
            }
            match svc
                .cas
                .query_upload(resource.upload_key(), &resource.key, outside.is_none())
                .await?
            {
                UploadStatus::Complete => Ok(QueryWriteStatusResponse {
                    committed_size: size,
                    complete: true,
                }),
                UploadStatus::Partial(n) => Ok(QueryWriteStatusResponse {
                    committed_size: n as i64,
                    complete: false,
                }),
                UploadStatus::Unknown => {
                    Err(BlobError::UnknownUpload(request.resource_name.clone()))
                }
            }
        },
    )
    .await
}

/// The bytes of a small upload, kept for the memory tier: a blob sent in one message is kept as
/// that message's data (no copy); one sent in several is copied into one buffer of the blob's
/// size, so that many tiny messages cannot hold an allocation each.
struct Kept {
    size: usize,
    first: Option<Bytes>,
    rest: Option<BytesMut>,
}

impl Kept {
    fn new(size: usize) -> Kept {
        Kept {
            size,
            first: None,
            rest: None,
        }
    }

    fn push(&mut self, data: Bytes) {
        if let Some(buf) = self.rest.as_mut() {
            buf.extend_from_slice(&data);
        } else if let Some(first) = self.first.take() {
            let mut buf = BytesMut::with_capacity(self.size.max(first.len() + data.len()));
            buf.extend_from_slice(&first);
            buf.extend_from_slice(&data);
            self.rest = Some(buf);
        } else {
            self.first = Some(data);
        }
    }

    fn into_bytes(self) -> Bytes {
        match (self.rest, self.first) {
            (Some(buf), _) => buf.freeze(),
            (None, first) => first.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_is_kept_as_it_came_several_in_one_buffer() {
        let data = Bytes::from(vec![7u8; 1000]);
        let mut one = Kept::new(1000);
        one.push(data.clone());
        assert_eq!(one.into_bytes().as_ptr(), data.as_ptr(), "no copy");
        let mut many = Kept::new(1000);
        for piece in data.chunks(10) {
            many.push(Bytes::copy_from_slice(piece));
        }
        let kept = many.into_bytes();
        assert_eq!(kept, data);
        assert!(Kept::new(0).into_bytes().is_empty());
    }
}
