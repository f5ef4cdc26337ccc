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
    /// A declared output is not what the Command's older fields declared it to be (a file
    /// in `output_files` that is a directory, or the other way round): `FAILED_PRECONDITION`,
    /// as the spec says.
    #[error("{0}")]
    WrongOutputType(String),
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
    /// A CAS call failed: the server's, or the local one's reads and writes.
    #[error("{0}")]
    Cas(#[from] kiln_reapi::cas::CasError),
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
            ActionError::MissingInputs(_) | ActionError::WrongOutputType(_) => {
                ErrorKind::Precondition
            }
            ActionError::BadInput(_) | ActionError::Spawn { .. } => ErrorKind::Invalid,
            ActionError::Tree(e) => e.kind(),
            ActionError::Io { source, .. } => ErrorKind::of_io(source),
            // A blob the server (or the local CAS) does not have, or no longer has intact, is
            // an input the client must upload again.
            ActionError::Cas(e) => match e.kind() {
                ErrorKind::Missing => ErrorKind::Precondition,
                kind => kind,
            },
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
            // What failed, not where: the worker's paths are not the client's business.
            ActionError::Io { op, source, .. } => format!("the worker could not {op}: {source}"),
            ActionError::Store(e) => format!("the worker's CAS: {}", e.client_message()),
            ActionError::Cas(e @ kiln_reapi::cas::CasError::Local { .. }) => {
                format!("the worker's CAS: {}", e.client_message())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The status an `ExecuteResponse` carries says what failed, not where on the worker, and
    /// missing inputs carry their `PreconditionFailure`.
    #[test]
    fn statuses_name_what_failed_but_not_the_workers_paths() {
        let io = ActionError::io(
            "write",
            std::path::Path::new("/srv/secret/work/42/out"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        let status = io.rpc_status();
        assert!(
            status.message.starts_with("the worker could not write"),
            "{}",
            status.message
        );
        assert!(
            !status.message.contains("/srv/secret"),
            "{}",
            status.message
        );
        assert!(status.details.is_empty());
        let d = Digest::of(kiln_reapi::digest::DigestFunction::Sha256, b"x");
        let missing = ActionError::MissingInputs(vec![d]).rpc_status();
        assert_eq!(missing.code, tonic::Code::FailedPrecondition as i32);
        assert_eq!(missing.details.len(), 1);
    }
}
