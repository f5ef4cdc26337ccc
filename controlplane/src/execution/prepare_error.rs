//! Why an `Execute` request could not be turned into a job, with its kind (and so its gRPC
//! status) from `kiln_reapi::status`'s table.

use kiln_dataplane::store::StoreError;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_reapi::digest::{Digest, DigestError};
use kiln_reapi::paths::PathError;
use kiln_reapi::status::{Classify, ErrorKind};
use kiln_reapi::tree::TreeError;
use kiln_reapi::walk::WalkError;

/// A refused or failed preparation.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Blobs the action needs are not in the CAS: REAPI's `FAILED_PRECONDITION` with a
    /// `PreconditionFailure` listing them.
    #[error("{}", .0.message)]
    Missing(RpcStatus),
    /// A digest field of the Action is absent or malformed.
    #[error("{field}: {source}")]
    Digest {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        source: DigestError,
    },
    /// An Action, Command or Directory blob that does not decode.
    #[error("the {what} blob is not a valid {what}: {why}")]
    Decode {
        /// Which message.
        what: &'static str,
        /// The decoder's complaint.
        why: String,
    },
    /// An Action, Command or Directory blob over the size read into memory.
    #[error("the {what} blob {digest:?} is {} bytes; at most {limit} are accepted", digest.size)]
    TooLarge {
        /// Which message.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The limit.
        limit: u64,
    },
    /// The working directory or an output path leaves the input root.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A Directory breaks the tree rules (names, duplicates, symlinks).
    #[error("input tree: {0}")]
    Tree(#[from] TreeError),
    /// The tree is over the walk's limits or malformed.
    #[error("input tree: {0}{hint}", hint = walk_hint(.0))]
    Walk(#[from] WalkError),
    /// The platform asks for something no configuration allows.
    #[error("{0}")]
    Platform(String),
    /// The CAS failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CAS call failed.
    #[error(transparent)]
    Cas(#[from] kiln_reapi::cas::CasError),
}

impl Classify for PrepareError {
    fn kind(&self) -> ErrorKind {
        match self {
            PrepareError::Missing(_) => ErrorKind::Precondition,
            PrepareError::Digest { .. }
            | PrepareError::Decode { .. }
            | PrepareError::TooLarge { .. }
            | PrepareError::Path(_)
            | PrepareError::Tree(_)
            | PrepareError::Walk(_)
            | PrepareError::Platform(_) => ErrorKind::Invalid,
            PrepareError::Store(e) => e.kind(),
            PrepareError::Cas(e) => e.kind(),
        }
    }

    fn client_message(&self) -> String {
        match self {
            PrepareError::Store(e) => e.client_message(),
            PrepareError::Cas(e) => e.client_message(),
            other => other.to_string(),
        }
    }

    /// Missing blobs carry their `PreconditionFailure`.
    fn details(&self) -> Vec<prost_types::Any> {
        match self {
            PrepareError::Missing(rpc) => rpc.details.clone(),
            _ => Vec::new(),
        }
    }
}

impl From<PrepareError> for tonic::Status {
    fn from(e: PrepareError) -> tonic::Status {
        if e.kind().is_server_fault() {
            tracing::error!(error = %e, "Execute could not be prepared");
        } else {
            tracing::debug!(error = %e, "Execute refused");
        }
        e.status()
    }
}

/// The setting to name when a tree is over a limit the operator configures.
fn walk_hint(e: &WalkError) -> &'static str {
    match e {
        WalkError::TooMany(_) => " (execution.max_input_digests)",
        _ => "",
    }
}
