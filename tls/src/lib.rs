//! TLS for every Kiln link, on rustls with one crypto provider (ring) for the whole binary.
//!
//! - [`pem`]: certificates and keys from PEM files.
//! - [`farm`]: Kiln's own farm CA (`[tls] mode = "auto"`): a CA and a server certificate made
//!   on first start, files mode 0600.
//! - [`server`]: the server's rustls config, re-read on demand (SIGHUP, or when its files
//!   change) without touching connections in flight.
//! - [`client`]: a connector for tonic channels (worker → server, kiln-bench → any endpoint)
//!   with a CA, an optional client identity, or one pinned certificate.
//!
//! rustls is sans-IO, so the server side runs on whichever executor accepted the
//! connection (glommio or monoio shards) through `tokio-rustls`, which needs only tokio's I/O
//! traits, not its runtime.

pub mod client;
pub mod error;
pub mod farm;
pub mod pem;
pub mod server;

pub use error::TlsError;

use std::sync::Arc;

/// The one crypto provider Kiln uses: ring, which builds with a C compiler alone (aws-lc-rs,
/// which rustls now prefers for its post-quantum key exchange, needs more of the build host).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default (for libraries that ask rustls for it, such
/// as tonic's own TLS). Calling it again is harmless.
#[allow(deprecated)]
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
