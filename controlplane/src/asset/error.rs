//! Why a Remote Asset call failed: a gRPC error, as opposed to a fetch from origin that
//! failed, which goes in the response's `status`.

use super::QualifierError;
use kiln_proto::google::rpc::{bad_request, BadRequest};
use kiln_reapi::cas::CasError;
use kiln_reapi::digest::{Digest, DigestError, InstanceNameError};
use kiln_reapi::status::{any, Classify, ErrorKind};

/// Why a call failed (a gRPC error, as opposed to a fetch that failed, which goes in the
/// response's `status`).
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A qualifier.
    #[error(transparent)]
    Qualifier(#[from] QualifierError),
    /// No URI.
    #[error("the request names no URI")]
    NoUris,
    /// Too many URIs, or one too long, or qualifiers too long.
    #[error("{0}")]
    TooLong(String),
    /// A digest or digest function.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// The instance name.
    #[error(transparent)]
    Instance(#[from] InstanceNameError),
    /// A timeout or timestamp that is not one.
    #[error("{0}")]
    Time(&'static str),
    /// Pushed content that is not in the CAS.
    #[error("{0:?} is not in the CAS: upload it before pushing it")]
    NotInCas(Digest),
    /// The service is turned off.
    #[error("the Remote Asset API is turned off on this server (remote_asset.enabled = false)")]
    Off,
    /// The CAS failed.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// A failure of a download another call started and this one shared.
    #[error("{0}")]
    Shared(std::sync::Arc<AssetError>),
    /// Local I/O.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for AssetError {
    fn kind(&self) -> ErrorKind {
        match self {
            AssetError::Qualifier(_)
            | AssetError::NoUris
            | AssetError::TooLong(_)
            | AssetError::Digest(_)
            | AssetError::Instance(_)
            | AssetError::Time(_)
            | AssetError::NotInCas(_) => ErrorKind::Invalid,
            AssetError::Off => ErrorKind::Unsupported,
            AssetError::Cas(e) => e.kind(),
            AssetError::Shared(e) => e.kind(),
            AssetError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    fn client_message(&self) -> String {
        match self {
            AssetError::Cas(e) => e.client_message(),
            AssetError::Shared(e) => e.client_message(),
            AssetError::Io { op, source } => format!("the server could not {op}: {source}"),
            other => other.to_string(),
        }
    }

    /// An unsupported qualifier is named in a `BadRequest`, as the spec asks.
    fn details(&self) -> Vec<prost_types::Any> {
        match self {
            AssetError::Qualifier(QualifierError::Unsupported(names)) => vec![any(
                "google.rpc.BadRequest",
                &BadRequest {
                    field_violations: names
                        .iter()
                        .map(|name| bad_request::FieldViolation {
                            field: "qualifiers.name".into(),
                            description: format!("\"{name}\" not supported"),
                            ..Default::default()
                        })
                        .collect(),
                },
            )],
            _ => Vec::new(),
        }
    }
}
