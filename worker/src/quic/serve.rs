//! Accepting peers over QUIC: each connection's client certificate (the farm CA's, required
//! by the TLS config) is checked against the worker's policy — a revoked worker's is refused
//! once the handshake is done, at every new stream and at every call ([`super::service`]),
//! so a revocation the scheduler pushes later also ends an open connection's use (a read
//! already streaming runs to its end) — and each stream is handed to one gRPC server as an
//! HTTP/2 connection of its own.

use super::io::{PeerIdentity, QuicIo};
use super::service::ServedCas;
use kiln_auth::Policy;
use kiln_proto::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument};

/// Streams accepted and waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 64;
/// Calls at once on one stream (one HTTP/2 connection).
const CALLS_PER_STREAM: u32 = 64;

/// The worker's CAS being served over QUIC.
pub struct QuicServing {
    endpoint: quinn::Endpoint,
    reads: Arc<tokio::sync::Semaphore>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Whether it agrees to uploads (the server's CAS).
    pub(super) uploads: bool,
    /// Set once it takes no new connection: a certificate reload must not accept again.
    stopped: Arc<std::sync::Mutex<bool>>,
}

/// Swaps the certificate new QUIC connections get (a reload of the TCP listener's); those
/// open keep theirs.
#[derive(Clone)]
pub struct QuicCertificates {
    endpoint: quinn::Endpoint,
    uploads: bool,
    stopped: Arc<std::sync::Mutex<bool>>,
}

impl QuicCertificates {
    /// New connections are made with `tls` from now on (unless serving stopped).
    pub fn use_tls(&self, tls: &rustls::ServerConfig) -> Result<(), super::QuicError> {
        let config = super::server_config(tls, self.uploads)?;
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if !*stopped {
            self.endpoint.set_server_config(Some(config));
        }
        Ok(())
    }
}

impl QuicServing {
    /// Takes no new connection (shutting down); those open go on.
    pub fn stop_accepting(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        self.endpoint.set_server_config(None);
    }

    /// What swaps its certificate when the TCP listener's is reloaded.
    pub fn certificates(&self) -> QuicCertificates {
        QuicCertificates {
            endpoint: self.endpoint.clone(),
            uploads: self.uploads,
            stopped: self.stopped.clone(),
        }
    }

    /// Resolves once no read is being served (new ones wait meanwhile).
    pub async fn reads_done(&self) {
        let all = u32::try_from(super::service::MAX_READS).unwrap_or(u32::MAX);
        let _ = self.reads.acquire_many(all).await;
    }
}

impl Drop for QuicServing {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"worker stopping");
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `cas` on `endpoint` (a [`super::server_endpoint`]) to callers `policy` lets in, with
/// gRPC messages up to `max_message` bytes: a worker's CAS to its peers, or the server's to
/// its workers. Must be called inside the tokio runtime.
pub fn serve(
    endpoint: quinn::Endpoint,
    cas: ServedCas,
    policy: Arc<Policy>,
    max_message: usize,
) -> QuicServing {
    let cas = cas.guarded_by(policy.clone());
    let reads = cas.reads.clone();
    let (tx, rx) = mpsc::channel::<Result<QuicIo, std::io::Error>>(ACCEPT_QUEUE);
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(CALLS_PER_STREAM)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .add_service(
            ByteStreamServer::new(cas.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(
            ContentAddressableStorageServer::new(cas)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx));
    let server = tokio::spawn(async move {
        if let Err(e) = grpc.await {
            tracing::warn!(error = %e, "the CAS over QUIC stopped");
        }
    });
    let accepting = endpoint.clone();
    let open = Arc::new(tokio::sync::Semaphore::new(super::MAX_CONNECTIONS));
    let acceptor = tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            // Past the bound a connection is refused (its client goes over TCP, or retries).
            let Ok(place) = open.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let (tx, policy) = (tx.clone(), policy.clone());
            let span = info_span!("quic peer", remote = %incoming.remote_address());
            tokio::spawn(
                async move {
                    connection(incoming, tx, policy).await;
                    drop(place);
                }
                .instrument(span),
            );
        }
    });
    QuicServing {
        endpoint,
        reads,
        tasks: vec![server, acceptor],
        uploads: false,
        stopped: Arc::new(std::sync::Mutex::new(false)),
    }
}

/// The client certificate's common name and fingerprint.
fn identity(connection: &quinn::Connection) -> Option<PeerIdentity> {
    let certs = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let leaf = certs.first()?;
    Some(PeerIdentity {
        name: kiln_tls::pem::common_name(leaf).unwrap_or_default(),
        fingerprint: kiln_tls::pem::fingerprint(leaf),
    })
}

async fn connection(
    incoming: quinn::Incoming,
    tx: mpsc::Sender<Result<QuicIo, std::io::Error>>,
    policy: Arc<Policy>,
) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "QUIC handshake failed");
            return;
        }
    };
    // A caller without a certificate (the TLS config lets it in only where the server takes
    // tokens) is checked at each call, by its token.
    let peer = identity(&connection);
    let refused = || {
        peer.as_ref().is_some_and(|p| {
            policy
                .identify(Some((&p.name, &p.fingerprint)), None)
                .is_err()
        })
    };
    if refused() {
        debug!(peer = ?peer, "QUIC caller refused");
        connection.close(1u32.into(), b"refused");
        return;
    }
    while let Ok((send, recv)) = connection.accept_bi().await {
        if refused() {
            connection.close(1u32.into(), b"refused");
            return;
        }
        if tx
            .send(Ok(QuicIo::new(send, recv, peer.clone())))
            .await
            .is_err()
        {
            return;
        }
    }
}
