//! Uploads over QUIC to the server's CAS (`server.quic`: a worker's outputs, when its
//! `server_transport` is `quic` or `both`): ByteStream `Write` and `BatchUpdateBlobs` of
//! uncompressed blobs, held to the data plane's rules and answered with its errors — a
//! `Write` claims its place against the CAS's cap from the owner shard before its first byte
//! is written (as over TCP: `UploadClaim`), is checked by the same sans-IO [`UploadState`]
//! (offsets that continue, no data past the digest's size, the hash on `finish_write`),
//! hashed off the runtime's threads, ended when it stalls for `server.stalled_upload_secs`,
//! and committed through the store's chain, durable before the answer. A worker's CAS takes
//! no upload from its peers (`PERMISSION_DENIED`).
//!
//! Over QUIC an upload is not resumable: one cut short leaves nothing behind, and
//! `QueryWriteStatus` knows only whether the blob is stored. Compressed uploads go over TCP.

use super::service::{bad, instance, read_only, status, ServedCas};
use futures::StreamExt;
use kiln_dataplane::service::BlobError;
use kiln_dataplane::store::tier::held_outside_files;
use kiln_dataplane::store::upload::UploadState;
use kiln_dataplane::store::UploadClaim;
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, WriteRequest, WriteResponse,
};
use kiln_proto::reapi::{
    batch_update_blobs_response, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
};
use kiln_reapi::cas::Cas;
use kiln_reapi::compression::Compressor;
use kiln_reapi::digest::{BlobKey, Digest};
use kiln_reapi::resource::WriteResource;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

pub(crate) const WRITE: &str = "/google.bytestream.ByteStream/Write";
pub(crate) const QUERY_WRITE: &str = "/google.bytestream.ByteStream/QueryWriteStatus";
pub(crate) const BATCH_UPDATE: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";

/// Entries of one batch stored at the same time.
const BATCH_PARALLELISM: usize = 32;

/// How the server's CAS takes uploads over QUIC.
#[derive(Clone)]
pub(super) struct Uploads {
    /// The largest blob taken (the CAS's cap).
    pub max_blob: u64,
    /// A `Write` with no new bytes for this long is ended (`server.stalled_upload_secs`).
    pub stall: Option<std::time::Duration>,
    /// Uploads received at once (apart from reads).
    pub places: Arc<tokio::sync::Semaphore>,
    /// Blobs up to this size are also handed to the memory tiers (the largest any keeps; 0:
    /// none), as uploads over TCP are.
    pub seed_memory: u64,
}

/// A temp file removed when dropped, unless handed to the store.
struct Temp(Option<PathBuf>);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn compressed() -> Status {
    Status::unimplemented(
        "compressed uploads are taken over TCP (QUIC carries blobs/, not compressed-blobs/)",
    )
}

impl ServedCas {
    /// How uploads are taken; `PERMISSION_DENIED` on a read-only CAS.
    fn uploads(&self) -> Result<&Uploads, Status> {
        self.uploads.as_ref().ok_or_else(read_only)
    }

    /// Refuses a blob larger than the store.
    fn fits(&self, d: &Digest) -> Result<(), Status> {
        let cap = self.uploads()?.max_blob;
        if d.size > cap {
            return Err(bad(BlobError::TooLarge { size: d.size, cap }));
        }
        Ok(())
    }

    /// A place among the uploads received at once: waits for one at most as long as a read.
    async fn upload_place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let places = self.uploads()?.places.clone();
        tokio::time::timeout(super::service::READ_WAIT, places.acquire_owned())
            .await
            .map_err(|_| Status::resource_exhausted("too many uploads at once; try again"))?
            .map_err(|_| Status::unavailable("shutting down"))
    }

    /// `BatchUpdateBlobs`: each entry checked on its own, those not stored yet stored, each
    /// entry's status in the answer.
    pub(super) async fn batch_update(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.uploads()?;
        let caller = self.caller(&request)?;
        self.allow(&caller, BATCH_UPDATE, &request.get_ref().instance_name)?;
        let r = request.into_inner();
        let instance = instance(&r.instance_name)?;
        let total = r
            .requests
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.data.len() as u64));
        if total > self.max_batch {
            return Err(bad(BlobError::BatchTooLarge {
                total,
                limit: self.max_batch,
            }));
        }
        let _place = self.upload_place().await?;
        // Each entry checked (hashing off the runtime's threads: a batch holds up to its
        // limit) by the data plane's rules for a whole upload in one message.
        let function = r.digest_function;
        let entries = r.requests;
        let checked = tokio::task::spawn_blocking(move || {
            let results: Vec<Result<Digest, Status>> = entries
                .iter()
                .map(|e| {
                    if e.compressor != Compressor::Identity.proto() {
                        return Err(compressed());
                    }
                    let digest =
                        Digest::from_proto_field(e.digest.as_ref(), function).map_err(bad)?;
                    UploadState::new(digest)
                        .accept(0, &e.data, true)
                        .map_err(bad)?;
                    Ok(digest)
                })
                .collect();
            (entries, results)
        })
        .await
        .map_err(|_| Status::unavailable("the check of an upload was cut short"))?;
        let (entries, checked) = checked;
        let valid: Vec<Digest> = checked.iter().filter_map(|c| c.clone().ok()).collect();
        let missing: std::collections::HashSet<Digest> = self
            .cas
            .find_missing(&instance, &valid)
            .await
            .map_err(|e| status(&e))?
            .into_iter()
            .collect();
        let responses = futures::stream::iter(entries.into_iter().zip(checked))
            .map(|(entry, checked)| {
                let (instance, missing) = (&instance, &missing);
                async move {
                    let result = match checked {
                        Err(s) => Err(s),
                        Ok(d) if !missing.contains(&d) => Ok(()),
                        Ok(d) => match self.fits(&d) {
                            Err(s) => Err(s),
                            Ok(()) => self
                                .cas
                                .put_bytes(&BlobKey::new(instance.clone(), d), entry.data.clone())
                                .await
                                .map(|()| self.metrics.quic_received(BATCH_UPDATE, d.size))
                                .map_err(|e| status(&e)),
                        },
                    };
                    batch_update_blobs_response::Response {
                        digest: entry.digest,
                        status: Some(match result {
                            Ok(()) => kiln_proto::google::rpc::Status::default(),
                            Err(s) => kiln_proto::google::rpc::Status {
                                code: s.code() as i32,
                                message: s.message().to_string(),
                                details: Vec::new(),
                            },
                        }),
                    }
                }
            })
            .buffered(BATCH_PARALLELISM)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    /// ByteStream `Write`: the blob's place claimed against the cap, its bytes streamed into
    /// a temp file while hashed, committed on a valid `finish_write`; a blob already stored
    /// is answered at once. Runs in a task of its own, so that the claim is always released
    /// and the temp file removed, even when the caller goes away.
    pub(super) async fn upload(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.uploads()?;
        let caller = self.caller(&request)?;
        let mut stream = request.into_inner();
        let stall = self.uploads()?.stall;
        let first = next(&mut stream, stall, stall, 0)
            .await?
            .ok_or_else(|| bad(BlobError::EmptyWrite))?;
        if first.resource_name.is_empty() {
            return Err(bad(BlobError::WriteResource(
                "the first WriteRequest must carry resource_name",
            )));
        }
        let resource = kiln_reapi::resource::parse_write(&first.resource_name).map_err(bad)?;
        self.allow(&caller, WRITE, resource.key.instance.as_str())?;
        if resource.compressor != Compressor::Identity {
            return Err(compressed());
        }
        self.fits(&resource.key.digest)?;
        let this = self.clone();
        let size = tokio::spawn(async move { this.receive(resource, first, stream).await })
            .await
            .map_err(|_| Status::unavailable("the upload was cut short"))??;
        Ok(Response::new(WriteResponse {
            committed_size: size as i64,
        }))
    }

    /// Claims the upload's place, receives it and releases the claim.
    async fn receive(
        &self,
        resource: WriteResource,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<u64, Status> {
        let key = resource.key.clone();
        if key.digest.is_empty_blob() {
            // Always present; still hold the client to the rules for this one message.
            UploadState::new(key.digest)
                .accept(first.write_offset, &first.data, true)
                .map_err(bad)?;
            return Ok(0);
        }
        let _place = self.upload_place().await?;
        let client = self.cas.client().clone();
        let upload_key = resource.upload_key();
        let progress = Arc::new(AtomicU64::new(0));
        // A blob the chain keeps outside files (a small-blob log): the chain says whether it
        // is held, not the owner's index of files.
        let outside = held_outside_files(&**self.cas.store(), &key)
            .await
            .map_err(|e| status(&e))?;
        if outside == Some(true) {
            return Ok(key.digest.size);
        }
        let claim = client
            .claim_upload(
                upload_key.clone(),
                &key,
                progress.clone(),
                outside.is_none(),
                true,
            )
            .await
            .map_err(|e| status(&e))?;
        let staged = match claim {
            UploadClaim::Present => return Ok(key.digest.size),
            UploadClaim::Busy => return Err(bad(BlobError::UploadBusy(resource.upload_id))),
            UploadClaim::Full { staging, cap } => {
                return Err(bad(BlobError::StagingFull {
                    size: key.digest.size,
                    staging,
                    cap,
                }))
            }
            UploadClaim::Fresh(staged) => staged,
            // Parked by a TCP stream of the same upload: not resumed here, started again.
            UploadClaim::Resume(parked) => {
                let _ = tokio::fs::remove_file(&parked.temp).await;
                parked.staged
            }
        };
        let result = self
            .write_and_commit(&resource, first, &mut stream, staged, &progress)
            .await;
        client.release_upload(upload_key, &key, None).await;
        result
    }

    /// Streams the upload into a temp file and commits it, holding `staged` (its place
    /// against the cap) until the store counts it.
    async fn write_and_commit(
        &self,
        resource: &WriteResource,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
        staged: kiln_dataplane::store::accounting::Staged,
        progress: &AtomicU64,
    ) -> Result<u64, Status> {
        let key = &resource.key;
        let size = key.digest.size;
        let (stall, seed_memory) = {
            let uploads = self.uploads()?;
            (uploads.stall, uploads.seed_memory)
        };
        // The bytes hashed, kept for the memory tiers: the very buffers checked, not the file.
        let mut kept = (size <= seed_memory)
            .then(|| bytes::BytesMut::with_capacity(usize::try_from(size).unwrap_or(0)));
        let mut upload = UploadState::new(key.digest);
        let epoch = self.cas.client().sync_epoch();
        let path = self.cas.layout().temp_path();
        let mut temp = Temp(Some(path.clone()));
        let io = |e: std::io::Error| Status::unavailable(format!("cannot write an upload: {e}"));
        let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
        let name = first.resource_name.clone();
        let mut message = first;
        // The stall clock restarts only when bytes arrive: empty messages do not keep an
        // upload alive.
        let mut progressed = tokio::time::Instant::now();
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                return Err(bad(BlobError::WriteResource(
                    "resource_name changed within the upload",
                )));
            }
            let (offset, finish, data) = (message.write_offset, message.finish_write, message.data);
            let (checked, result) = tokio::task::spawn_blocking(move || {
                let r = upload.accept(offset, &data, finish);
                ((upload, data), r)
            })
            .await
            .map_err(|_| Status::unavailable("the check of an upload was cut short"))?;
            result.map_err(bad)?;
            let data;
            (upload, data) = checked;
            file.write_all(&data).await.map_err(io)?;
            if let Some(kept) = kept.as_mut() {
                kept.extend_from_slice(&data);
            }
            progress.store(upload.committed(), Ordering::Relaxed);
            if !data.is_empty() {
                progressed = tokio::time::Instant::now();
            }
            if finish {
                break;
            }
            let left = stall.map(|s| s.saturating_sub(progressed.elapsed()));
            message = next(stream, left, stall, upload.committed())
                .await?
                .ok_or_else(|| {
                    bad(BlobError::Unfinished {
                        committed: upload.committed(),
                        size,
                    })
                })?;
        }
        file.flush().await.map_err(io)?;
        if self.cas.sync_own_data(size) {
            file.sync_data().await.map_err(io)?;
        }
        drop(file);
        // The committed blob is counted by its owner from here on.
        drop(staged);
        let temp = temp.0.take().unwrap_or(path);
        self.cas
            .commit(key, temp, kept.map(bytes::BytesMut::freeze), epoch)
            .await
            .map_err(|e| status(&e))?;
        self.metrics.quic_received(WRITE, size);
        Ok(size)
    }

    /// `QueryWriteStatus`: complete when the blob is stored, else `NOT_FOUND` (an upload over
    /// QUIC is not resumed).
    pub(super) async fn write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        self.uploads()?;
        let resource =
            kiln_reapi::resource::parse_write(&request.get_ref().resource_name).map_err(bad)?;
        let caller = self.caller(&request)?;
        self.allow(&caller, QUERY_WRITE, resource.key.instance.as_str())?;
        let missing = self
            .cas
            .find_missing(&resource.key.instance, &[resource.key.digest])
            .await
            .map_err(|e| status(&e))?;
        if !missing.is_empty() {
            return Err(Status::not_found(
                "no upload of this blob here (uploads over QUIC are not resumed)",
            ));
        }
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: resource.key.digest.size as i64,
            complete: true,
        }))
    }
}

/// The stream's next message, within `left` when set (`stall`, the limit, and `committed`,
/// the bytes so far, for the error).
async fn next(
    stream: &mut Streaming<WriteRequest>,
    left: Option<std::time::Duration>,
    stall: Option<std::time::Duration>,
    committed: u64,
) -> Result<Option<WriteRequest>, Status> {
    match left {
        None => stream.message().await,
        Some(left) => tokio::time::timeout(left, stream.message())
            .await
            .map_err(|_| {
                bad(BlobError::Stalled {
                    secs: stall.unwrap_or(left).as_secs(),
                    committed,
                    size: 0,
                })
            })?,
    }
}
