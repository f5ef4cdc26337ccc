//! Peer blob transfers over QUIC (quinn), beside TCP. A worker serving its CAS over mutual TLS
//! also serves it over QUIC on the same port number (UDP), with the same certificate and the
//! same farm CA; QUIC requires TLS 1.3, which the farm's configs allow. The protocol inside is
//! the one over TCP — gRPC (HTTP/2) — one HTTP/2 connection per QUIC stream, so a peer's
//! QUIC connection carries every stream to it ([`connect`]) and the fetching code is the same
//! `RemoteCas` either way: digests are checked the same, batches and ranges work the same.
//!
//! `worker.peer_transport` chooses per link: `tcp`, `quic`, or `both` (QUIC once the
//! connection is up, TCP while it is dialled in the background; a peer that cannot be reached
//! over UDP within `peer_quic_connect_timeout_ms` is reached over TCP until the cooldown ends).

pub mod connect;
pub mod io;
pub mod serve;
pub mod service;
mod writes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The application protocol both ends announce: gRPC over HTTP/2, one connection per stream,
/// to a CAS that serves reads (a worker's to its peers).
pub const ALPN: &[u8] = b"kiln-cas/1";
/// The same to a CAS that also takes uploads (the server's): a client offers both and sends
/// uploads over QUIC only where this one was agreed, so a server from before uploads over
/// QUIC (which knows only [`ALPN`]) gets them over TCP.
pub const ALPN_UPLOADS: &[u8] = b"kiln-cas/2";

/// Streams a peer may open at once on one connection (each an HTTP/2 connection: a fetching
/// worker opens one per link to a peer, and one per range link to the server, up to
/// `worker.fetch_ranges`, at most 64).
const MAX_STREAMS: u32 = 128;

/// Connections a serving endpoint holds at once (the farm is tens of workers).
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// Connection attempts a serving worker holds at once (the farm is tens of workers).
const MAX_INCOMING: usize = 256;

/// A link idle this long is closed (keep-alives are sent at a third of it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why QUIC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS config cannot do QUIC (it lacks TLS 1.3 or its initial cipher suite).
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Crypto(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr} for QUIC: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    // Room for a 10 GbE link with a millisecond of round trip, per stream and in all.
    t.stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20);
    Arc::new(t)
}

/// A QUIC endpoint serving on `addr` with `tls` (the worker's TLS server config: its
/// certificate, client certificates from the farm CA required); it can also dial out.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: &rustls::ServerConfig,
    uploads: bool,
) -> Result<quinn::Endpoint, QuicError> {
    let config = server_config(tls, uploads)?;
    quinn::Endpoint::server(config, addr).map_err(|source| QuicError::Bind { addr, source })
}

/// The QUIC server config made of `tls`, agreeing to uploads (ALPN) when `uploads`.
fn server_config(
    tls: &rustls::ServerConfig,
    uploads: bool,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = if uploads {
        vec![ALPN_UPLOADS.to_vec(), ALPN.to_vec()]
    } else {
        vec![ALPN.to_vec()]
    };
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    config.max_incoming(MAX_INCOMING);
    Ok(config)
}

/// What the server's CAS over QUIC takes in uploads.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// The largest blob taken (the CAS's cap).
    pub max_blob: u64,
    /// Blobs up to this size are also handed to the memory tiers (the largest any of them
    /// keeps; 0: none), as uploads over TCP are.
    pub seed_memory: u64,
}

/// Serves `cas` over QUIC on UDP at `addr` with `tls` (the TCP listener's TLS), to callers
/// `policy` lets in, within `server`'s message and batch limits: read-only, or also taking
/// `uploads` (the server's CAS). Must be called inside the tokio runtime.
pub fn serve_cas(
    addr: SocketAddr,
    tls: &rustls::ServerConfig,
    cas: kiln_dataplane::store::ChainCas,
    policy: Arc<kiln_auth::Policy>,
    server: &kiln_config::ServerConfig,
    uploads: Option<UploadLimits>,
) -> Result<serve::QuicServing, QuicError> {
    let endpoint = server_endpoint(addr, tls, uploads.is_some())?;
    let metrics = cas.client().metrics().clone();
    let cas = service::ServedCas::new(cas, server.max_batch_total_size_bytes.as_u64(), metrics);
    let cas = match uploads {
        Some(limits) => {
            let stall = (server.stalled_upload_secs > 0)
                .then(|| Duration::from_secs(server.stalled_upload_secs));
            cas.with_uploads(limits.max_blob, stall, limits.seed_memory)
        }
        None => cas,
    };
    let max_message = usize::try_from(server.max_message_bytes.as_u64()).unwrap_or(usize::MAX);
    let mut serving = serve::serve(endpoint, cas, policy, max_message);
    serving.uploads = uploads.is_some();
    Ok(serving)
}

/// The endpoint a worker dials peers and servers from.
pub type ClientEndpoint = quinn::Endpoint;

/// A QUIC endpoint that dials out only, with `tls` (the worker's TLS client config: the farm
/// CA and its own certificate).
pub fn client_endpoint(tls: &rustls::ClientConfig) -> Result<quinn::Endpoint, QuicError> {
    // Both address families where the host has IPv6 (a dual-stack socket), else IPv4.
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let any4 = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut endpoint = quinn::Endpoint::client(any6)
        .or_else(|_| quinn::Endpoint::client(any4))
        .map_err(|source| QuicError::Bind { addr: any4, source })?;
    endpoint.set_default_client_config(client_config(tls)?);
    Ok(endpoint)
}

/// The QUIC client config made of the worker's TLS client config.
fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN_UPLOADS.to_vec(), ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}
