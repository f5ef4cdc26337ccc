//! The client side: a rustls `ClientConfig` (ALPN `h2`) trusting a CA, or exactly one pinned
//! certificate, optionally presenting a client certificate; and a connector that gives tonic
//! channels TLS over TCP with it (`Endpoint::connect_with_connector`).

use crate::{pem, provider, TlsError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What the client trusts.
#[derive(Clone)]
pub enum Trust {
    /// Servers whose chain leads to one of these CA certificates.
    Roots(Vec<CertificateDer<'static>>),
    /// Exactly this server certificate.
    Pinned(CertificateDer<'static>),
    /// Exactly the certificate this function returns at each handshake (the server's own,
    /// for the worker inside `kiln serve`, which must follow rotations).
    Current(Arc<dyn Fn() -> CertificateDer<'static> + Send + Sync>),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Roots(r) => write!(f, "Roots({} certificates)", r.len()),
            Trust::Pinned(_) => write!(f, "Pinned"),
            Trust::Current(_) => write!(f, "Current"),
        }
    }
}

impl Trust {
    /// Trusts the CA certificates in a PEM file.
    pub fn ca_file(path: &Path) -> Result<Trust, TlsError> {
        Ok(Trust::Roots(pem::certificates(path)?))
    }
}

/// A client certificate and its key.
#[derive(Debug)]
pub struct ClientIdentity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The key.
    pub key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// A certificate chain and key from PEM text.
    pub fn from_pem(cert: &str, key: &str) -> Result<ClientIdentity, TlsError> {
        let pem_error = |what: String| TlsError::Pem {
            path: "(in memory)".into(),
            what,
        };
        Ok(ClientIdentity {
            certs: pem::certificates_from(cert.as_bytes()).map_err(pem_error)?,
            key: rustls_pki_types::pem::PemObject::from_pem_slice(key.as_bytes())
                .map_err(|e| pem_error(format!("no private key: {e}")))?,
        })
    }

    /// Reads a certificate chain and key from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<ClientIdentity, TlsError> {
        Ok(ClientIdentity {
            certs: pem::certificates(cert)?,
            key: pem::private_key(key)?,
        })
    }
}

/// Builds a client config.
pub fn config(
    trust: Trust,
    identity: Option<ClientIdentity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match trust {
        Trust::Roots(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Pinned(cert) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                cert: Arc::new(move || cert.clone()),
                provider: provider(),
            })),
        Trust::Current(cert) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                cert,
                provider: provider(),
            })),
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.certs, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate (as `cert` returns it now), with the handshake
/// signatures checked as usual.
struct Pinned {
    cert: Arc<dyn Fn() -> CertificateDer<'static> + Send + Sync>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinned")
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == (self.cert)().as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS over TCP for tonic: `Endpoint::connect_with_connector(Connector::new(config))` with an
/// `http://HOST:PORT` endpoint; the server name checked is HOST.
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
}

impl Connector {
    /// Connects with `config`.
    pub fn new(config: Arc<rustls::ClientConfig>) -> Connector {
        Connector { config }
    }
}

type Stream = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for Connector {
    type Response = Stream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let bad = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
            };
            let host = uri.host().ok_or_else(|| bad("the endpoint has no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| bad("the endpoint has no port"))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| bad("the endpoint's host is not a valid server name"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
