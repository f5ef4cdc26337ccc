//! Uploads over QUIC to the server's CAS (`server.quic`: a worker's outputs, when its
//! `server_transport` is `quic` or `both`): ByteStream `Write` and `BatchUpdateBlobs` of
//! uncompressed blobs, checked by the data plane's own rules ([`UploadState`]: offsets that
//! continue, no data past the digest's size, the hash on `finish_write`), answered with the
//! data plane's errors, and committed through the store's chain — durable before the answer,
//! as over TCP. A worker's CAS takes no upload from its peers (`PERMISSION_DENIED`).
//!
//! Over QUIC an upload is not resumable: a stream cut short leaves nothing behind, and
//! `QueryWriteStatus` knows only whether the blob is stored. Compressed uploads go over TCP.

use super::service::{bad, instance, read_only, status, ServedCas};
use kiln_dataplane::service::BlobError;
use kiln_dataplane::store::upload::UploadState;
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, WriteRequest, WriteResponse,
};
use kiln_proto::reapi::{
    batch_update_blobs_response, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
};
use kiln_reapi::cas::Cas;
use kiln_reapi::compression::Compressor;
use kiln_reapi::digest::{BlobKey, Digest};
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

pub(crate) const WRITE: &str = "/google.bytestream.ByteStream/Write";
pub(crate) const QUERY_WRITE: &str = "/google.bytestream.ByteStream/QueryWriteStatus";
pub(crate) const BATCH_UPDATE: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";

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
    /// The largest blob taken; `PERMISSION_DENIED` on a read-only CAS.
    fn max_upload(&self) -> Result<u64, Status> {
        self.max_upload.ok_or_else(read_only)
    }

    /// Refuses a blob larger than the store.
    fn fits(&self, d: &Digest) -> Result<(), Status> {
        let cap = self.max_upload()?;
        if d.size > cap {
            return Err(bad(BlobError::TooLarge { size: d.size, cap }));
        }
        Ok(())
    }

    /// Whether the store holds `key` already (the empty blob always).
    async fn holds(&self, key: &BlobKey) -> Result<bool, Status> {
        let missing = self
            .cas
            .find_missing(&key.instance, std::slice::from_ref(&key.digest))
            .await
            .map_err(|e| status(&e))?;
        Ok(missing.is_empty())
    }

    /// `BatchUpdateBlobs`: each entry checked and stored on its own, its status in the answer.
    pub(super) async fn batch_update(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.max_upload()?;
        let caller = self.caller(&request)?;
        self.allow(&caller, BATCH_UPDATE, &request.get_ref().instance_name)?;
        let r = request.into_inner();
        let instance = instance(&r.instance_name)?;
        let total = r
            .requests
            .iter()
            .try_fold(0u64, |sum, e| sum.checked_add(e.data.len() as u64))
            .filter(|t| *t <= self.max_batch)
            .ok_or_else(|| {
                bad(BlobError::BatchTooLarge {
                    total: r
                        .requests
                        .iter()
                        .fold(0u64, |sum, e| sum.saturating_add(e.data.len() as u64)),
                    limit: self.max_batch,
                })
            })?;
        let _place = self.place().await?;
        let mut responses = Vec::with_capacity(r.requests.len());
        for entry in r.requests {
            let result = async {
                if entry.compressor != Compressor::Identity.proto() {
                    return Err(compressed());
                }
                let digest = Digest::from_proto_field(entry.digest.as_ref(), r.digest_function)
                    .map_err(bad)?;
                self.fits(&digest)?;
                let data = entry.data.clone();
                // The data plane's rules for a whole upload in one message (hashing off the
                // runtime's threads: a batch holds up to its limit).
                tokio::task::spawn_blocking(move || {
                    UploadState::new(digest).accept(0, &data, true).map(|_| ())
                })
                .await
                .map_err(|_| Status::unavailable("the check of an upload was cut short"))?
                .map_err(bad)?;
                self.cas
                    .put_bytes(&BlobKey::new(instance.clone(), digest), entry.data.clone())
                    .await
                    .map_err(|e| status(&e))
            }
            .await;
            responses.push(batch_update_blobs_response::Response {
                digest: entry.digest,
                status: Some(match result {
                    Ok(()) => kiln_proto::google::rpc::Status::default(),
                    Err(s) => kiln_proto::google::rpc::Status {
                        code: s.code() as i32,
                        message: s.message().to_string(),
                        details: Vec::new(),
                    },
                }),
            });
        }
        self.metrics.quic_received(BATCH_UPDATE, total);
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    /// ByteStream `Write`: streamed into a temp file while hashed, committed on a valid
    /// `finish_write`; a blob already stored is answered at once.
    pub(super) async fn upload(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.max_upload()?;
        let caller = self.caller(&request)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a Write with no message"))?;
        let resource = kiln_reapi::resource::parse_write(&first.resource_name).map_err(bad)?;
        self.allow(&caller, WRITE, resource.key.instance.as_str())?;
        if resource.compressor != Compressor::Identity {
            return Err(compressed());
        }
        let key = resource.key;
        self.fits(&key.digest)?;
        let size = key.digest.size;
        let done = |n: u64| {
            Ok(Response::new(WriteResponse {
                committed_size: n as i64,
            }))
        };
        if self.holds(&key).await? {
            return done(size);
        }
        let _place = self.place().await?;
        let mut upload = UploadState::new(key.digest);
        let epoch = self.cas.client().sync_epoch();
        let mut temp = Temp(Some(self.cas.layout().temp_path()));
        let path = temp.0.clone().unwrap_or_default();
        let io = |e: std::io::Error| Status::unavailable(format!("cannot write an upload: {e}"));
        let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
        let mut message = first;
        loop {
            upload
                .accept(message.write_offset, &message.data, message.finish_write)
                .map_err(bad)?;
            file.write_all(&message.data).await.map_err(io)?;
            self.metrics.quic_received(WRITE, message.data.len() as u64);
            if message.finish_write {
                break;
            }
            message = stream
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("the Write ended without finish_write"))?;
        }
        file.flush().await.map_err(io)?;
        if self.cas.sync_own_data(size) {
            file.sync_data().await.map_err(io)?;
        }
        drop(file);
        let temp = temp.0.take().unwrap_or(path);
        self.cas
            .commit(&key, temp, None, epoch)
            .await
            .map_err(|e| status(&e))?;
        done(size)
    }

    /// `QueryWriteStatus`: complete when the blob is stored, else `NOT_FOUND` (an upload over
    /// QUIC is not resumed).
    pub(super) async fn write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        self.max_upload()?;
        let resource =
            kiln_reapi::resource::parse_write(&request.get_ref().resource_name).map_err(bad)?;
        let caller = self.caller(&request)?;
        self.allow(&caller, QUERY_WRITE, resource.key.instance.as_str())?;
        if !self.holds(&resource.key).await? {
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
