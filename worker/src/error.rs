//! Why an action could not run (or finish), and the status the client gets for it.

use kiln_proto::google::rpc::{
    precondition_failure::Violation, PreconditionFailure, Status as RpcStatus,
};
use kiln_reapi::digest::Digest;
use prost::Message;

/// A failure of the worker's part of an action (never the action's own non-zero exit).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Blobs the action needs are in neither the local nor the remote CAS.
    #[error("{} input blob(s) are missing from the CAS, e.g. {:?}", .0.len(), .0.first())]
    MissingInputs(Vec<Digest>),
    /// The Action, Command or input tree is malformed.
    #[error("{0}")]
    BadInput(String),
    /// The program could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Local file I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server's CAS refused or failed.
    #[error("CAS request failed: {0}")]
    Remote(#[from] tonic::Status),
    /// The local CAS failed.
    #[error("local CAS: {0}")]
    Store(#[from] kiln_dataplane::store::StoreError),
    /// Killed on request (cancelled, or the session ended).
    #[error("killed")]
    Killed,
}

/// `map_err` helper: an I/O error doing `op` on `path`.
pub fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> ActionError + 'a {
    move |e| ActionError::io(op, path, e)
}

impl ActionError {
    /// Wraps an I/O error with what was being done where.
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> ActionError {
        ActionError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The google.rpc.Status reported in the ExecuteResponse.
    pub fn to_status(&self) -> RpcStatus {
        let code = match self {
            ActionError::MissingInputs(_) => tonic::Code::FailedPrecondition,
            ActionError::BadInput(_) | ActionError::Spawn { .. } => tonic::Code::InvalidArgument,
            ActionError::Io { .. } | ActionError::Store(_) => tonic::Code::Internal,
            ActionError::Remote(s) if s.code() == tonic::Code::NotFound => {
                tonic::Code::FailedPrecondition
            }
            ActionError::Remote(_) => tonic::Code::Unavailable,
            ActionError::Killed => tonic::Code::Cancelled,
        };
        let mut details = Vec::new();
        if let ActionError::MissingInputs(missing) = self {
            let failure = PreconditionFailure {
                violations: missing
                    .iter()
                    .map(|d| Violation {
                        r#type: "MISSING".into(),
                        subject: format!("blobs/{}/{}", d.hex(), d.size),
                        description: format!("{d:?} is not in the CAS"),
                    })
                    .collect(),
            };
            details.push(prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
                value: failure.encode_to_vec(),
            });
        }
        RpcStatus {
            code: code as i32,
            message: self.to_string(),
            details,
        }
    }
}
