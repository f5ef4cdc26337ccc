//! TLS on the main port, on the shard that accepted the connection: rustls is sans-IO and
//! `tokio-rustls` needs only tokio's I/O traits, which every backend's connections implement,
//! so the handshake runs on glommio and monoio alike without a tokio runtime. The config is
//! taken from [`kiln_tls::server::ServerTls`] at each handshake, so a certificate rotation
//! applies to new connections and leaves open ones alone.

use crate::runtime::{BoxConnection, Runtime};
use futures::future::{select, Either};
use kiln_tls::server::ServerTls;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// What a shard needs to accept TLS connections.
#[derive(Clone, Debug)]
pub struct TlsAccept {
    /// The server's current certificate and settings.
    pub tls: Arc<ServerTls>,
    /// A handshake not done by then closes the connection.
    pub handshake_timeout: Duration,
}

impl TlsAccept {
    /// Runs the server side of the handshake on `io`; the result speaks HTTP/2 inside TLS.
    /// Also returns the common name and SHA-256 fingerprint of the client's certificate, when
    /// it presented one (rustls has verified it against the client CA by then).
    pub async fn accept(
        &self,
        runtime: &Rc<dyn Runtime>,
        io: BoxConnection,
    ) -> io::Result<(BoxConnection, Option<(String, String)>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config());
        let handshake = Box::pin(acceptor.accept(io));
        match select(handshake, runtime.sleep(self.handshake_timeout)).await {
            Either::Left((Ok(stream), _)) => {
                let peer = kiln_tls::server::client_identity(stream.get_ref().1);
                Ok((Box::pin(stream), peer))
            }
            Either::Left((Err(e), _)) => Err(e),
            Either::Right(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TLS handshake within {:?} (tls.handshake_timeout_secs)",
                    self.handshake_timeout
                ),
            )),
        }
    }
}
