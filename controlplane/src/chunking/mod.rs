//! `SplitBlob` and `SpliceBlob` in the control plane, through the [`Cas`] trait. A split
//! chunks a stored blob with FastCDC 2020 ([`fastcdc`]) on a blocking thread, stores the chunks
//! and remembers the list (a second split of the blob is a lookup, once its chunks are found
//! still stored). A splice concatenates chunks already stored into a temp file, hashing as it
//! goes, and stores the blob only if it hashes to the digest asked for. Neither holds more than
//! a few chunks in memory; at most [`CONCURRENT_JOBS`] run at once.

mod cdc;
mod splice;
mod split;

pub use cdc::ChunkParams;

use crate::auth;
use kiln_dataplane::store::layout::Layout;
use kiln_proto::reapi::{
    chunking_function, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use kiln_reapi::cas::{Cas, CasError};
use kiln_reapi::digest::{Digest, DigestError, InstanceName, InstanceNameError};
use kiln_reapi::status::{Classify, ErrorKind};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Splits and splices that may run at once (each reads and writes whole blobs).
pub const CONCURRENT_JOBS: usize = 2;

/// Why a split or splice failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The blob to split is not in the CAS.
    #[error("blob {0:?} is not in the CAS")]
    BlobMissing(Digest),
    /// Chunks of a splice are not in the CAS.
    #[error("{count} of the chunks are not in the CAS, the first {first:?}; upload them first")]
    ChunksMissing { count: usize, first: Digest },
    /// Chunks a split stored were evicted before it finished (the CAS is too small for it).
    #[error("{count} of the blob's chunks left the CAS while it was split, the first {first:?}; the CAS is too full to hold them")]
    Evicted { count: usize, first: Digest },
    /// A split that would answer more than `chunking.max_chunks` chunks.
    #[error("the blob cuts into more than chunking.max_chunks ({max}) chunks")]
    SplitTooLong { max: usize },
    /// A blob larger than the CAS.
    #[error(
        "a blob of {size} bytes is larger than the CAS ({max} bytes, max_cas_blob_size_bytes)"
    )]
    TooLarge { size: u64, max: u64 },
    /// A chunking function that is not one.
    #[error("chunking_function {0} is not a ChunkingFunction value")]
    UnknownFunction(i32),
    /// The writer of a splice stopped (its own error says why).
    #[error("the spliced blob's writer stopped")]
    WriterStopped,
    /// A splice list over `chunking.max_chunks`.
    #[error("{count} chunks is more than chunking.max_chunks ({max})")]
    TooManyChunks { count: usize, max: usize },
    /// The chunks' sizes do not add up to the blob's.
    #[error("the chunks add up to {sum} bytes, not the blob's {size}")]
    SizeMismatch { sum: u128, size: u64 },
    /// The concatenation hashes to something else.
    #[error("the chunks concatenate to {actual}, not to {expected:?}")]
    HashMismatch { expected: Digest, actual: String },
    /// Splicing is turned off.
    #[error("SplitBlob and SpliceBlob are turned off on this server (chunking.enabled = false)")]
    Off,
    /// A digest in the request.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// The instance name.
    #[error(transparent)]
    Instance(#[from] InstanceNameError),
    /// The CAS failed.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// Local I/O on a temp file.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ChunkError {
    fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> ChunkError {
        move |source| ChunkError::Io { op, source }
    }
}

impl Classify for ChunkError {
    fn kind(&self) -> ErrorKind {
        match self {
            ChunkError::BlobMissing(_) | ChunkError::ChunksMissing { .. } => ErrorKind::Missing,
            ChunkError::TooManyChunks { .. }
            | ChunkError::TooLarge { .. }
            | ChunkError::UnknownFunction(_)
            | ChunkError::SizeMismatch { .. }
            | ChunkError::HashMismatch { .. }
            | ChunkError::Digest(_)
            | ChunkError::Instance(_) => ErrorKind::Invalid,
            ChunkError::Off => ErrorKind::Unsupported,
            ChunkError::Evicted { .. } | ChunkError::SplitTooLong { .. } => ErrorKind::Exhausted,
            ChunkError::WriterStopped => ErrorKind::Internal,
            ChunkError::Cas(e) => e.kind(),
            ChunkError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    fn client_message(&self) -> String {
        match self {
            ChunkError::Cas(e) => e.client_message(),
            ChunkError::Io { op, source } => format!("the server could not {op}: {source}"),
            other => other.to_string(),
        }
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ChunkSettings {
    /// `chunking.enabled`.
    pub enabled: bool,
    /// FastCDC's parameters.
    pub params: ChunkParams,
    /// `chunking.max_chunks`: the longest list spliced or answered.
    pub max_chunks: usize,
    /// The CAS's capacity: no blob may be larger (`max_cas_blob_size_bytes`).
    pub max_blob_bytes: u64,
    /// `chunking.list_cache_bytes`.
    pub list_cache_bytes: u64,
    /// The CAS's layout: temp files go in its temp directories, on its filesystem (so a spliced
    /// blob is linked, not copied) and cleared at start-up.
    pub layout: Layout,
}

type Key = (InstanceName, Digest);

/// A blob's chunks, and the chunking function they were cut with.
#[derive(Debug)]
pub struct ChunkList {
    /// `ChunkingFunction.Value`: FastCDC 2020 for Kiln's own splits, what the client said for
    /// its splices.
    pub function: i32,
    /// The chunks, in order.
    pub digests: Vec<Digest>,
}

/// The service.
pub struct ChunkService {
    cas: Arc<dyn Cas>,
    settings: ChunkSettings,
    /// Chunk lists of blobs split or spliced, by blob.
    lists: moka::future::Cache<Key, Arc<ChunkList>>,
    jobs: Semaphore,
}

impl ChunkService {
    /// A service over `cas`.
    pub fn new(cas: Arc<dyn Cas>, settings: ChunkSettings) -> ChunkService {
        // A remembered digest costs about its own size and the list's share of overhead.
        let lists = moka::future::Cache::builder()
            .weigher(|_: &Key, list: &Arc<ChunkList>| {
                u32::try_from(list.digests.len().saturating_mul(48).saturating_add(128))
                    .unwrap_or(u32::MAX)
            })
            .max_capacity(settings.list_cache_bytes)
            .build();
        ChunkService {
            cas,
            settings,
            lists,
            jobs: Semaphore::new(CONCURRENT_JOBS),
        }
    }

    /// Answers `SplitBlob`.
    pub async fn split_blob(
        &self,
        request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        let instance = request.get_ref().instance_name.clone();
        auth::check(&request, auth::paths::SPLIT_BLOB, Some(&instance))?;
        let request = request.into_inner();
        let span = tracing::debug_span!("SplitBlob", instance = %request.instance_name);
        let list = self
            .split(request)
            .instrument(span)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(SplitBlobResponse {
            chunk_digests: list.digests.iter().map(Digest::to_proto).collect(),
            chunking_function: list.function,
        }))
    }

    /// Answers `SpliceBlob`.
    pub async fn splice_blob(
        &self,
        request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        let instance = request.get_ref().instance_name.clone();
        auth::check(&request, auth::paths::SPLICE_BLOB, Some(&instance))?;
        let request = request.into_inner();
        let span = tracing::debug_span!("SpliceBlob", instance = %request.instance_name);
        let blob = self
            .splice(request)
            .instrument(span)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(SpliceBlobResponse {
            blob_digest: Some(blob.to_proto()),
        }))
    }

    async fn split(&self, request: SplitBlobRequest) -> Result<Arc<ChunkList>, ChunkError> {
        if !self.settings.enabled {
            return Err(ChunkError::Off);
        }
        let instance = InstanceName::new(&request.instance_name)?;
        let blob = Digest::from_proto_field(request.blob_digest.as_ref(), request.digest_function)?;
        let key = (instance.clone(), blob);
        if let Some(list) = self.lists.get(&key).await {
            // Remembered, and the blob and its chunks still stored (the check marks them all
            // used, as a split should): a lookup.
            let mut wanted = list.digests.clone();
            wanted.push(blob);
            let missing = self.cas.find_missing(&instance, &wanted).await?;
            if missing.contains(&blob) {
                self.lists.invalidate(&key).await;
                return Err(ChunkError::BlobMissing(blob));
            }
            if missing.is_empty() {
                return Ok(list);
            }
        }
        // Only a stored blob is split: one still arriving (read-while-write) is not yet in the
        // CAS, and waiting for its upload would hold a job for as long as the upload lasts.
        if !self.cas.find_missing(&instance, &[blob]).await?.is_empty() {
            return Err(ChunkError::BlobMissing(blob));
        }
        let _job = self.jobs.acquire().await.map_err(|_| ChunkError::Off)?;
        let digests = split::split(self, &instance, blob).await?;
        // Stored as they were cut; still there now (a small CAS may have evicted early chunks
        // while later ones were written)?
        let missing = self.cas.find_missing(&instance, &digests).await?;
        if let Some(first) = missing.first() {
            return Err(ChunkError::Evicted {
                count: missing.len(),
                first: *first,
            });
        }
        let list = Arc::new(ChunkList {
            function: chunking_function::Value::FastCdc2020 as i32,
            digests,
        });
        self.lists.insert(key, list.clone()).await;
        Ok(list)
    }

    async fn splice(&self, request: SpliceBlobRequest) -> Result<Digest, ChunkError> {
        if !self.settings.enabled {
            return Err(ChunkError::Off);
        }
        let instance = InstanceName::new(&request.instance_name)?;
        let blob = Digest::from_proto_field(request.blob_digest.as_ref(), request.digest_function)?;
        if chunking_function::Value::try_from(request.chunking_function).is_err() {
            return Err(ChunkError::UnknownFunction(request.chunking_function));
        }
        if blob.size > self.settings.max_blob_bytes {
            return Err(ChunkError::TooLarge {
                size: blob.size,
                max: self.settings.max_blob_bytes,
            });
        }
        if request.chunk_digests.len() > self.settings.max_chunks {
            return Err(ChunkError::TooManyChunks {
                count: request.chunk_digests.len(),
                max: self.settings.max_chunks,
            });
        }
        let chunks = request
            .chunk_digests
            .iter()
            .map(|d| Digest::from_proto(d, request.digest_function))
            .collect::<Result<Vec<_>, _>>()?;
        // Sizes from the wire, summed where they cannot wrap.
        let sum: u128 = chunks.iter().map(|c| u128::from(c.size)).sum();
        if sum != u128::from(blob.size) {
            return Err(ChunkError::SizeMismatch {
                sum,
                size: blob.size,
            });
        }
        let missing = self.cas.find_missing(&instance, &chunks).await?;
        if let Some(first) = missing.first() {
            return Err(ChunkError::ChunksMissing {
                count: missing.len(),
                first: *first,
            });
        }
        let _job = self.jobs.acquire().await.map_err(|_| ChunkError::Off)?;
        // Only a list whose concatenation was checked here is remembered: a splice of a blob
        // already stored reads nothing, and its list may not be the blob's.
        if splice::splice(self, &instance, blob, &chunks).await? == splice::Spliced::Checked {
            let list = ChunkList {
                function: request.chunking_function,
                digests: chunks,
            };
            self.lists.insert((instance, blob), Arc::new(list)).await;
        }
        Ok(blob)
    }

    /// A fresh temp file name in the CAS's temp directories.
    fn temp_path(&self) -> PathBuf {
        self.settings.layout.temp_path()
    }
}
