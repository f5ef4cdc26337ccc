//! What can go wrong setting up TLS.

use std::path::PathBuf;

/// A TLS set-up failure; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// rustls refused the certificates or settings.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client CA: {0}")]
    Verifier(String),
    /// A certificate could not be made.
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A server name that is neither a DNS name nor an IP address.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
}

impl TlsError {
    /// Wraps an I/O error with its file.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TlsError {
        TlsError::Io {
            path: path.into(),
            source,
        }
    }
}
