//! Why an action could not run (or finish), and the status the client gets for it.

use kiln_reapi::digest::Digest;
use kiln_reapi::status::{self, Classify, ErrorKind};

/// A failure of the worker's part of an action (never the action's own non-zero exit).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Blobs the action needs are in neither the local nor the remote CAS.
    #[error("{} input blob(s) are missing from the CAS, e.g. {:?}", .0.len(), .0.first())]
    MissingInputs(Vec<Digest>),
    /// The Action, Command or input tree is malformed.
    #[error("{0}")]
    BadInput(String),
    /// The input tree is malformed or over the walk's limits.
    #[error("input tree: {0}")]
    Tree(#[from] kiln_reapi::walk::WalkError),
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
    /// Ran past its timeout and was killed.
    #[error("the action ran past its timeout and was killed")]
    TimedOut,
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
}

impl Classify for ActionError {
    fn kind(&self) -> ErrorKind {
        match self {
            ActionError::MissingInputs(_) => ErrorKind::Precondition,
            ActionError::BadInput(_) | ActionError::Spawn { .. } => ErrorKind::Invalid,
            ActionError::Tree(e) => e.kind(),
            ActionError::Io { source, .. } => ErrorKind::of_io(source),
            // A blob the server (or the local CAS) does not have, or no longer has intact, is
            // an input the client must upload again.
            ActionError::Remote(s) if s.code() == tonic::Code::NotFound => ErrorKind::Precondition,
            ActionError::Remote(_) => ErrorKind::Unavailable,
            ActionError::Store(e) => match e.kind() {
                ErrorKind::Missing => ErrorKind::Precondition,
                kind => kind,
            },
            ActionError::Killed => ErrorKind::Cancelled,
            ActionError::TimedOut => ErrorKind::TimedOut,
        }
    }

    fn client_message(&self) -> String {
        match self {
            ActionError::MissingInputs(missing) => {
                status::missing_blobs("the action", missing.clone()).message
            }
            other => other.to_string(),
        }
    }

    /// Missing inputs carry REAPI's `PreconditionFailure` listing them.
    fn details(&self) -> Vec<prost_types::Any> {
        match self {
            ActionError::MissingInputs(missing) => {
                status::missing_blobs("the action", missing.clone()).details
            }
            _ => Vec::new(),
        }
    }
}
