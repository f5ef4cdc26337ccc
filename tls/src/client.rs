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
    /// A CA known only by its SHA-256 fingerprint (from a join token): the server must send
    /// it in its chain, and the chain must verify against it.
    CaFingerprint(String),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Roots(r) => write!(f, "Roots({} certificates)", r.len()),
            Trust::Pinned(_) => write!(f, "Pinned"),
            Trust::Current(_) => write!(f, "Current"),
            Trust::CaFingerprint(fp) => write!(f, "CaFingerprint({fp})"),
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
            .with_custom_certificate_verifier(Verifier::new(Check::Exactly(Arc::new(move || {
                cert.clone()
            })))),
        Trust::Current(cert) => builder
            .dangerous()
            .with_custom_certificate_verifier(Verifier::new(Check::Exactly(cert))),
        Trust::CaFingerprint(fingerprint) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Verifier::new(Check::CaFingerprint(
                    fingerprint.to_ascii_lowercase(),
                )))
        }
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.certs, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a custom verifier accepts.
enum Check {
    /// Exactly the certificate the function returns now.
    Exactly(Arc<dyn Fn() -> CertificateDer<'static> + Send + Sync>),
    /// A chain that includes the CA with this SHA-256 fingerprint and verifies against it
    /// as usual (names, dates, signatures).
    CaFingerprint(String),
}

/// A server certificate verifier for the trusts rustls has no builder for; handshake
/// signatures are checked with the provider's algorithms as usual.
struct Verifier {
    check: Check,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Verifier {
    fn new(check: Check) -> Arc<Verifier> {
        Arc::new(Verifier {
            check,
            provider: provider(),
        })
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.check {
            Check::Exactly(_) => f.write_str("Verifier(exactly one certificate)"),
            Check::CaFingerprint(fp) => write!(f, "Verifier(CA {fp})"),
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let unknown = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        match &self.check {
            Check::Exactly(cert) if end_entity.as_ref() == cert().as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            Check::Exactly(_) => Err(unknown()),
            Check::CaFingerprint(fingerprint) => {
                let ca = intermediates
                    .iter()
                    .find(|c| &pem::fingerprint(c) == fingerprint)
                    .ok_or_else(unknown)?;
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?
                .verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )
            }
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
/// `http://HOST:PORT` endpoint; the server name checked is HOST, or the one given with
/// [`Connector::for_name`].
#[derive(Clone)]
pub struct Connector {
    config: Arc<rustls::ClientConfig>,
    name: Option<ServerName<'static>>,
}

impl Connector {
    /// Connects with `config`.
    pub fn new(config: Arc<rustls::ClientConfig>) -> Connector {
        Connector { config, name: None }
    }

    /// Connects with `config`, checking the server's certificate for `name` whatever address
    /// it is reached at (a worker's CAS, whose certificate names the worker).
    pub fn for_name(config: Arc<rustls::ClientConfig>, name: ServerName<'static>) -> Connector {
        Connector {
            config,
            name: Some(name),
        }
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
        let fixed = self.name.clone();
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
            let name = match fixed {
                Some(name) => name,
                None => ServerName::try_from(host.clone())
                    .map_err(|_| bad("the endpoint's host is not a valid server name"))?,
            };
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::farm::Farm;
    use crate::server::{ClientAuth, ServerFiles};

    /// Runs a handshake between `client` and `server` in memory; the client's error, if any.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            let server_side = s.process_new_packets();
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
            server_side.map_err(|e| rustls::Error::General(format!("server: {e}")))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn pinned_certificates_and_ca_fingerprints_are_trusted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Farm::at(dir.path().join("a"));
        farm.ensure(&["localhost".to_string()]).unwrap();
        let other = Farm::at(dir.path().join("b"));
        other.ensure(&["localhost".to_string()]).unwrap();
        let server = ServerFiles {
            cert: farm.server_cert(),
            key: farm.server_key(),
            client_ca: None,
            client_auth: ClientAuth::None,
        };
        let leaf = |f: &Farm| pem::certificates(&f.server_cert()).unwrap().remove(0);
        let fingerprint = farm.ca_fingerprint().unwrap();
        let wrong_fingerprint = other.ca_fingerprint().unwrap();
        let try_with =
            |trust: Trust| handshake(config(trust, None).unwrap(), server.build().unwrap());

        try_with(Trust::ca_file(&farm.ca_cert()).unwrap()).expect("the farm CA");
        try_with(Trust::Pinned(leaf(&farm))).expect("the server's own certificate");
        try_with(Trust::CaFingerprint(fingerprint.to_ascii_uppercase()))
            .expect("the farm CA's fingerprint, in either case");
        let current = leaf(&farm);
        try_with(Trust::Current(Arc::new(move || current.clone()))).expect("the current one");

        for (what, trust) in [
            ("another CA", Trust::ca_file(&other.ca_cert()).unwrap()),
            ("another certificate", Trust::Pinned(leaf(&other))),
            (
                "another fingerprint",
                Trust::CaFingerprint(wrong_fingerprint),
            ),
            (
                "the server's leaf as if it were the CA",
                Trust::CaFingerprint(pem::fingerprint(&leaf(&farm))),
            ),
        ] {
            let error = try_with(trust).expect_err(what);
            assert!(
                matches!(error, rustls::Error::InvalidCertificate(_)),
                "{what}: {error}"
            );
        }
    }
}
