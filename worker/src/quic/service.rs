//! A CAS as served over QUIC — a worker's to its peers, the server's to its workers: the blob
//! methods of the CAS and ByteStream gRPC services, answered from the local store (the data
//! plane answers the same calls over TCP). A worker's CAS is read-only to its peers (writes
//! are `PERMISSION_DENIED`); the server's also takes uploads ([`super::writes`]). Each call is
//! checked against the policy as the data plane checks it: the caller's client certificate
//! (from the QUIC handshake, [`super::serve`]) or its bearer token, and the role the method
//! needs on the instance it names.

use super::io::PeerIdentity;
use futures::StreamExt;
use kiln_dataplane::service::BlobError;
use kiln_dataplane::store::ChainCas;
use kiln_proto::bytestream::byte_stream_server::ByteStream;
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use kiln_proto::reapi::{
    batch_read_blobs_response, BatchReadBlobsRequest, BatchReadBlobsResponse,
    BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, FindMissingBlobsRequest,
    FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use kiln_reapi::cas::Cas;
use kiln_reapi::compression::Compressor;
use kiln_reapi::digest::{Digest, InstanceName};
use kiln_reapi::status::Classify;
use std::pin::Pin;

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status, Streaming};

/// The reads a CAS serves over QUIC (all a worker's CAS serves its peers), as the policy
/// names them.
pub(crate) const SERVED: [&str; 3] = [READ, BATCH_READ, FIND_MISSING];
/// The uploads the server's CAS also takes over QUIC.
pub(crate) const UPLOADS: [&str; 3] = [
    super::writes::WRITE,
    super::writes::BATCH_UPDATE,
    super::writes::QUERY_WRITE,
];
const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const BATCH_READ: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
const READ: &str = "/google.bytestream.ByteStream/Read";

/// Bytes per `ReadResponse`.
const CHUNK: usize = 256 << 10;
/// How long a read waits for a place before it is `RESOURCE_EXHAUSTED`.
pub(super) const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads served at once: a ByteStream read holds its place, and one chunk, until its stream
/// ends; a batch holds it while it reads from the store (its answer, at most the batch limit,
/// is then the connection's to send). More wait for a place.
pub(super) const MAX_READS: usize = 256;

/// Uploads received at once (each holds a message, a temp file and its place against the
/// CAS's cap); more wait for a place, as reads do.
const MAX_UPLOADS: usize = 64;

/// Where a read's bytes come from.
enum Source {
    Bytes(bytes::Bytes),
    File(tokio::fs::File),
}

/// The local CAS as served over QUIC.
#[derive(Clone)]
pub struct ServedCas {
    pub(super) cas: ChainCas,
    /// Checks each call's caller (set by [`super::serve`]).
    policy: Option<Arc<kiln_auth::Policy>>,
    /// Largest batch answered or taken (the data plane's limit for batches).
    pub(super) max_batch: u64,
    /// How uploads are taken (the server's CAS); `None`: read-only.
    pub(super) uploads: Option<super::writes::Uploads>,
    /// Reads being served.
    pub(super) reads: Arc<tokio::sync::Semaphore>,
    /// Where the bytes sent and received are counted (`kiln_quic_sent_bytes_total`,
    /// `kiln_quic_received_bytes_total`).
    pub(super) metrics: Arc<kiln_dataplane::metrics::Metrics>,
}

impl ServedCas {
    /// Serves `cas`, batches up to `max_batch` bytes, counting what it sends in `metrics`.
    pub fn new(
        cas: ChainCas,
        max_batch: u64,
        metrics: Arc<kiln_dataplane::metrics::Metrics>,
    ) -> ServedCas {
        ServedCas {
            cas,
            policy: None,
            max_batch,
            uploads: None,
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_READS)),
            metrics,
        }
    }

    /// The same, refusing calls whose caller `policy` does not let in (checked at every
    /// call, so a revocation takes effect on connections already open).
    pub(super) fn guarded_by(mut self, policy: Arc<kiln_auth::Policy>) -> ServedCas {
        self.policy = Some(policy);
        self
    }

    /// The same, also taking uploads of blobs up to `max_blob` bytes, ending one with no new
    /// bytes for `stall` (the server's CAS).
    pub fn with_uploads(
        mut self,
        max_blob: u64,
        stall: Option<std::time::Duration>,
        seed_memory: u64,
    ) -> ServedCas {
        self.uploads = Some(super::writes::Uploads {
            max_blob,
            stall,
            places: Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS)),
            seed_memory,
        });
        self
    }

    /// A place among the calls served at once: waits for one at most [`READ_WAIT`].
    pub(super) async fn place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        tokio::time::timeout(READ_WAIT, self.reads.clone().acquire_owned())
            .await
            .map_err(|_| Status::resource_exhausted("too many reads at once; try again"))?
            .map_err(|_| Status::unavailable("shutting down"))
    }

    /// Whether the caller of `request` may call `path` on `instance`.
    fn check<T>(&self, request: &Request<T>, path: &str, instance: &str) -> Result<(), Status> {
        self.allow(&self.caller(request)?, path, instance)
    }

    /// Who called with `request` (`None` without a policy: anyone may).
    pub(super) fn caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<kiln_auth::Principal>, Status> {
        let Some(policy) = &self.policy else {
            return Ok(None);
        };
        let peer = request
            .extensions()
            .get::<Option<PeerIdentity>>()
            .and_then(Option::as_ref);
        let certificate = peer.map(|p| (p.name.as_str(), p.fingerprint.as_str()));
        let token = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        policy
            .identify(certificate, token)
            .map(Some)
            .map_err(|e| e.status())
    }

    /// Whether `caller` may call `path` on `instance`.
    pub(super) fn allow(
        &self,
        caller: &Option<kiln_auth::Principal>,
        path: &str,
        instance: &str,
    ) -> Result<(), Status> {
        match (&self.policy, caller) {
            (Some(policy), Some(principal)) => policy
                .authorize(principal, path, instance)
                .map_err(|e| e.status()),
            (Some(_), None) => Err(Status::unauthenticated("no caller")),
            (None, _) => Ok(()),
        }
    }
}

pub(super) fn read_only() -> Status {
    Status::permission_denied("this CAS is read-only over QUIC")
}

pub(super) fn status(e: &impl Classify) -> Status {
    e.status()
}

/// A malformed request, as the data plane classifies it.
pub(super) fn bad(e: impl Into<BlobError>) -> Status {
    e.into().status()
}

fn digests(function: i32, list: &[kiln_proto::reapi::Digest]) -> Result<Vec<Digest>, Status> {
    list.iter()
        .map(|d| Digest::from_proto(d, function).map_err(bad))
        .collect()
}

pub(super) fn instance(name: &str) -> Result<InstanceName, Status> {
    InstanceName::new(name).map_err(bad)
}

#[tonic::async_trait]
impl ContentAddressableStorage for ServedCas {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        // No place taken: a lookup holds no blob, and an action's check before its upload
        // must not wait behind reads.
        self.check(&request, FIND_MISSING, &request.get_ref().instance_name)?;
        let r = request.into_inner();
        let instance = instance(&r.instance_name)?;
        let asked = digests(r.digest_function, &r.blob_digests)?;
        let missing = self
            .cas
            .find_missing(&instance, &asked)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        self.batch_update(request).await
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        self.check(&request, BATCH_READ, &request.get_ref().instance_name)?;
        let _place = self.place().await?;
        let r = request.into_inner();
        let instance = instance(&r.instance_name)?;
        let asked = digests(r.digest_function, &r.digests)?;
        let total = asked
            .iter()
            .try_fold(0u64, |sum, d| sum.checked_add(d.size))
            .filter(|t| *t <= self.max_batch)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the blobs asked for add up to more than the batch limit of {} bytes",
                    self.max_batch
                ))
            })?;
        let got = self
            .cas
            .read_blobs(&instance, &asked)
            .await
            .map_err(|e| status(&e))?;
        let mut sent = 0u64;
        let responses = asked
            .iter()
            .zip(got)
            .map(|(d, data)| {
                let (code, message, data) = match data {
                    Some(data) => {
                        sent += data.len() as u64;
                        (0, String::new(), data)
                    }
                    None => (
                        tonic::Code::NotFound as i32,
                        "not in this CAS".to_string(),
                        Default::default(),
                    ),
                };
                batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: 0,
                    status: Some(kiln_proto::google::rpc::Status {
                        code,
                        message,
                        details: Vec::new(),
                    }),
                }
            })
            .collect();
        debug_assert!(sent <= total);
        self.metrics.quic_sent(BATCH_READ, sent);
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream =
        Pin<Box<dyn futures::Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

    async fn get_tree(
        &self,
        _: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("peers serve blobs only"))
    }

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("peers serve blobs only"))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(read_only())
    }
}

#[tonic::async_trait]
impl ByteStream for ServedCas {
    type ReadStream = Pin<Box<dyn futures::Stream<Item = Result<ReadResponse, Status>> + Send>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let resource =
            kiln_reapi::resource::parse_read(&request.get_ref().resource_name).map_err(bad)?;
        self.check(&request, READ, resource.key.instance.as_str())?;
        let r = request.into_inner();
        if resource.compressor != Compressor::Identity {
            return Err(Status::unimplemented(
                "peers send blobs uncompressed (read from blobs/, not compressed-blobs/)",
            ));
        }
        let size = resource.key.digest.size;
        let start = u64::try_from(r.read_offset)
            .ok()
            .filter(|o| *o <= size)
            .ok_or_else(|| {
                Status::out_of_range(format!("read_offset {} outside 0..={size}", r.read_offset))
            })?;
        let limit = u64::try_from(r.read_limit)
            .map_err(|_| Status::invalid_argument("read_limit must not be negative"))?;
        let end = match limit {
            0 => size,
            n => start.saturating_add(n).min(size),
        };
        // Past the bound a read waits for a place (holding no memory meanwhile), for a while.
        let permit = self.place().await?;
        let blob = self
            .cas
            .store()
            .open(&resource.key)
            .await
            .map_err(|e| status(&e))?
            .ok_or_else(|| Status::not_found("not in this CAS"))?;
        // A file no one in this process has hashed is checked whole first (a damaged one then
        // leaves the store); the bytes are then read as the peer takes them, so a peer that
        // stops reading holds a permit and one chunk, never a thread.
        let blob = if blob.needs_check() {
            tokio::task::spawn_blocking(move || blob.check_blocking().map(|()| blob))
                .await
                .map_err(|_| Status::unavailable("the check of a stored blob was cut short"))?
                .map_err(|e| status(&e))?
        } else {
            blob
        };
        let source = match blob.path() {
            Some(path) => {
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| Status::unavailable(format!("cannot open a stored blob: {e}")))?;
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| Status::unavailable(format!("cannot read a stored blob: {e}")))?;
                Source::File(file)
            }
            None => {
                let data = tokio::task::spawn_blocking(move || blob.read_all_blocking())
                    .await
                    .map_err(|_| Status::unavailable("a read of a stored blob was cut short"))?
                    .map_err(|e| status(&e))?;
                Source::Bytes(data)
            }
        };
        let state = (source, start, end, self.metrics.clone(), permit);
        let stream = futures::stream::unfold(Some(state), |state| async move {
            let (mut source, pos, end, metrics, permit) = state?;
            if pos >= end {
                return None;
            }
            let n = (end - pos).min(CHUNK as u64) as usize;
            let piece = match &mut source {
                Source::Bytes(data) => Ok(data.slice(pos as usize..pos as usize + n)),
                Source::File(file) => {
                    let mut buf = vec![0u8; n];
                    file.read_exact(&mut buf)
                        .await
                        .map(|_| bytes::Bytes::from(buf))
                        .map_err(|e| Status::unavailable(format!("cannot read a stored blob: {e}")))
                }
            };
            match piece {
                Ok(data) => {
                    metrics.quic_sent(READ, n as u64);
                    let next = Some((source, pos + n as u64, end, metrics, permit));
                    Some((Ok(ReadResponse { data }), next))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.upload(request).await
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        self.write_status(request).await
    }
}
