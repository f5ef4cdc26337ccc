//! Everything that can go wrong serving a blob method, and its gRPC status (mapped here, once).

use crate::store::upload::UploadError;
use crate::store::StoreError;
use kiln_reapi::compression::{InflateError, UnknownCompressor};
use kiln_reapi::digest::{BlobKey, DigestError, InstanceNameError};
use kiln_reapi::resource::ResourceError;
use kiln_reapi::status::{Classify, ErrorKind};
use tonic::Status;

/// A failed blob request.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Malformed ByteStream resource name.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// Malformed digest or unsupported digest function.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// Unacceptable instance name.
    #[error("invalid instance name: {0}")]
    Instance(#[from] InstanceNameError),
    /// An upload message broke the ByteStream rules or the data did not match its digest.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// The first `WriteRequest` named no resource, or a later one named a different one.
    #[error("{0}")]
    WriteResource(&'static str),
    /// A `Write` stream carried no message.
    #[error("Write stream carried no WriteRequest")]
    EmptyWrite,
    /// The client sent nothing for too long; the upload was parked and can be resumed.
    #[error("no data for {secs} s (server.stalled_upload_secs): upload parked at offset {committed} of {size}; resume after QueryWriteStatus")]
    Stalled {
        secs: u64,
        committed: u64,
        size: u64,
    },
    /// The stream ended before `finish_write`; the upload can be resumed.
    #[error("stream ended at offset {committed} of {size} without finish_write; resume after QueryWriteStatus")]
    Unfinished { committed: u64, size: u64 },
    /// Another stream is writing the same upload.
    #[error("upload {0} is being written by another stream")]
    UploadBusy(String),
    /// Uploads in progress already hold as much of the CAS's cap as may be held.
    #[error("uploads in progress hold {staging} bytes of the CAS's {cap}; a blob of {size} bytes does not fit now (retry when they finish)")]
    StagingFull { size: u64, staging: u64, cap: u64 },
    /// The blob is not in the CAS.
    #[error("blob {0:?} not found")]
    NotFound(BlobKey),
    /// No such upload for `QueryWriteStatus`.
    #[error("no upload named {0}")]
    UnknownUpload(String),
    /// `read_offset` outside the blob.
    #[error("read_offset {offset} is outside the blob of {size} bytes")]
    ReadOffset { offset: i64, size: u64 },
    /// Negative `read_limit`.
    #[error("read_limit {0} is negative")]
    ReadLimit(i64),
    /// A batch over `max_batch_total_size_bytes`.
    #[error("batch of {total} bytes exceeds max_batch_total_size_bytes ({limit}); use ByteStream for large blobs")]
    BatchTooLarge { total: u64, limit: u64 },
    /// A blob larger than the whole CAS.
    #[error("blob of {size} bytes exceeds the CAS capacity of {cap} bytes")]
    TooLarge { size: u64, cap: u64 },
    /// Batch data whose length differs from the digest's size.
    #[error("data is {got} bytes but the digest says {size}")]
    DataSize { size: u64, got: u64 },
    /// Batch data that does not hash to the digest.
    #[error("data hashes to {actual}, not to {expected:?}")]
    DataHash {
        expected: kiln_reapi::digest::Digest,
        actual: String,
    },
    /// A compressor Kiln does not speak.
    #[error(transparent)]
    Compressor(#[from] UnknownCompressor),
    /// zstd asked of a server that has it turned off.
    #[error(
        "zstd is turned off on this server ([compression] zstd = false); send uncompressed data"
    )]
    CompressionOff,
    /// A compressed read with a `read_limit` (the spec requires 0).
    #[error("read_limit must be 0 for a compressed read (got {0})")]
    CompressedReadLimit(i64),
    /// Compressed batch data that does not decompress to its blob.
    #[error(transparent)]
    Inflate(#[from] InflateError),
    /// Every zstd decoder the memory budget allows is in use.
    #[error("{max} zstd uploads are being decompressed already (the most compression.max_window_log allows at once); retry, or send this one uncompressed")]
    DecodersBusy { max: usize },
    /// The server failed to compress a blob it holds.
    #[error("could not compress the blob: {0}")]
    Deflate(std::io::Error),
    /// The caller may not make this call (or was not identified).
    #[error(transparent)]
    Denied(#[from] kiln_auth::Denied),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Local file I/O failed while serving.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    /// Wraps a local I/O error.
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> BlobError {
        BlobError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl Classify for BlobError {
    fn kind(&self) -> ErrorKind {
        match self {
            // A decoder the server could not make is its own failure.
            BlobError::Upload(UploadError::Inflate(e)) | BlobError::Inflate(e)
                if !e.is_senders() =>
            {
                ErrorKind::Internal
            }
            BlobError::Resource(_)
            | BlobError::Digest(_)
            | BlobError::Instance(_)
            | BlobError::Upload(_)
            | BlobError::WriteResource(_)
            | BlobError::EmptyWrite
            | BlobError::Unfinished { .. }
            | BlobError::ReadLimit(_)
            | BlobError::BatchTooLarge { .. }
            | BlobError::TooLarge { .. }
            | BlobError::DataSize { .. }
            | BlobError::DataHash { .. }
            | BlobError::Compressor(_)
            | BlobError::CompressionOff
            | BlobError::CompressedReadLimit(_)
            | BlobError::Inflate(_) => ErrorKind::Invalid,
            BlobError::Deflate(_) => ErrorKind::Internal,
            BlobError::UploadBusy(_) => ErrorKind::Conflict,
            BlobError::StagingFull { .. } | BlobError::DecodersBusy { .. } => ErrorKind::Exhausted,
            BlobError::Stalled { .. } => ErrorKind::TimedOut,
            BlobError::NotFound(_) | BlobError::UnknownUpload(_) => ErrorKind::Missing,
            BlobError::ReadOffset { .. } => ErrorKind::OutOfRange,
            BlobError::Denied(d) => d.kind(),
            BlobError::Store(e) => e.kind(),
            BlobError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    /// The error, except that server-side I/O failures name what failed but not the server's
    /// paths (those go to the log).
    fn client_message(&self) -> String {
        match self {
            BlobError::Io { op, source, .. } => {
                format!("the server could not {op} the blob: {source}")
            }
            BlobError::Store(e) => e.client_message(),
            _ => self.to_string(),
        }
    }
}

impl From<BlobError> for Status {
    fn from(e: BlobError) -> Status {
        if e.kind().is_server_fault() {
            tracing::error!(error = %e, "blob request failed");
        } else {
            tracing::debug!(error = %e, "blob request refused");
        }
        e.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::compression::InflateError;

    #[test]
    fn bad_compressed_data_is_the_senders_a_decoder_not_made_is_ours() {
        let bad = BlobError::Upload(UploadError::Inflate(InflateError::Truncated));
        assert_eq!(bad.kind(), ErrorKind::Invalid);
        let ours = BlobError::Upload(UploadError::Inflate(InflateError::Setup("oom".into())));
        assert_eq!(ours.kind(), ErrorKind::Internal);
        assert_eq!(
            BlobError::Inflate(InflateError::Setup("oom".into())).kind(),
            ErrorKind::Internal
        );
    }
}
