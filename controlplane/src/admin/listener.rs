//! The admin listener's connections: accept, a TLS handshake when the server has TLS
//! (ALPN `http/1.1`, the main port's certificate and client checks, the same handshake
//! timeout), then HTTP/1.1 to the router with who is calling attached to each request as a
//! [`Caller`]. Open connections are bounded; a connection over the bound is closed at once.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use kiln_tls::server::ServerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, Instrument};

/// At most this many admin connections are open at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS on the admin listener.
#[derive(Clone, Debug)]
pub struct AdminTls {
    /// The server's certificate (reloaded with the main port's).
    pub tls: Arc<ServerTls>,
    /// `tls.handshake_timeout_secs`.
    pub handshake_timeout: Duration,
}

/// Who sent a request to the admin listener.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Its verified client certificate (common name, SHA-256 fingerprint), if any.
    pub certificate: Option<(String, String)>,
}

/// Serves `app` on `listener` until the runtime ends.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<AdminTls>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%addr, "admin connection refused: {MAX_CONNECTIONS} open already");
            continue;
        };
        let app = app.clone();
        let tls = tls.clone();
        let span = tracing::debug_span!("admin_connection", %addr);
        tokio::spawn(
            async move {
                if let Err(e) = connection(stream, addr, app, tls).await {
                    debug!(error = %e, "admin connection ended");
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
}

async fn connection(
    stream: TcpStream,
    addr: SocketAddr,
    app: Router,
    tls: Option<AdminTls>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(tls) = tls else {
        let caller = Caller {
            addr,
            certificate: None,
        };
        return http1(stream, caller, app).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.tls.http1_config());
    let stream = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream))
        .await
        .map_err(|_| "no TLS handshake in time (tls.handshake_timeout_secs)")??;
    let caller = Caller {
        addr,
        certificate: kiln_tls::server::client_identity(stream.get_ref().1),
    };
    http1(stream, caller, app).await
}

async fn http1<S>(
    stream: S,
    caller: Caller,
    app: Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app.layer(axum::Extension(caller)));
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}
