//! The server side: a rustls `ServerConfig` built from certificate files, swapped whole when
//! the files are re-read (SIGHUP, or a change noticed by [`ServerTls::reload_if_changed`]).
//! Each handshake takes the config current at that moment; connections already up keep the
//! one they started with, so a rotation drops nothing in flight.

use crate::{pem, provider, TlsError};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates are asked for.
    None,
    /// A client may present one (signed by the client CA); callers without one are identified
    /// some other way (a bearer token) or not at all.
    Optional,
    /// Every client must present one signed by the client CA.
    Required,
}

/// Where the server's certificate material lives.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (PEM), if clients may present any.
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are asked for or required.
    pub client_auth: ClientAuth,
}

impl ServerFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.cert.as_path(), self.key.as_path()];
        p.extend(self.client_ca.as_deref());
        p
    }

    /// Modification times and sizes: what "the files changed" compares.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// Builds a rustls config (ALPN `h2`) from the files as they are now.
    pub fn build(&self) -> Result<rustls::ServerConfig, TlsError> {
        let certs = pem::certificates(&self.cert)?;
        let key = pem::private_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match (&self.client_ca, self.client_auth) {
            (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in pem::certificates(ca)? {
                    roots.add(c)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if self.client_auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| TlsError::Verifier(e.to_string()))?,
                )
            }
            (None, ClientAuth::Required) => {
                return Err(TlsError::Verifier(
                    "client certificates are required but no client CA is configured".into(),
                ))
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The server's current TLS config, reloadable.
pub struct ServerTls {
    files: ServerFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    leaf: RwLock<rustls_pki_types::CertificateDer<'static>>,
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish()
    }
}

impl ServerTls {
    /// Loads the files; fails if they do not make a valid config.
    pub fn load(files: ServerFiles) -> Result<Arc<ServerTls>, TlsError> {
        let stamp = files.stamp();
        let config = files.build()?;
        let leaf = pem::certificates(&files.cert)?.remove(0);
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(Arc::new(config)),
            leaf: RwLock::new(leaf),
            stamp: Mutex::new(stamp),
        }))
    }

    /// The config for the next handshake.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The certificate the server presents now (its chain's first).
    pub fn leaf(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.leaf.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The config for the next handshake on a listener that speaks HTTP/1.1 (the admin
    /// listener: browsers, Prometheus, curl); the same certificate and client checks.
    pub fn http1_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = (*self.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// What the config is built from.
    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// Re-reads the files. On error the current config stays (a half-written file during a
    /// rotation must not take the server down).
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = self.files.stamp();
        let config = self.files.build()?;
        let leaf = pem::certificates(&self.files.cert)?.remove(0);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.leaf.write().unwrap_or_else(|e| e.into_inner()) = leaf;
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        Ok(())
    }

    /// Re-reads the files if any changed since the last load; returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = self.files.stamp();
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }
}

/// The verified client certificate of `connection`, if it presented one: its subject's
/// common name (empty when it has none) and its SHA-256 fingerprint.
pub fn client_identity(connection: &rustls::ServerConnection) -> Option<(String, String)> {
    let cert = connection.peer_certificates()?.first()?;
    Some((
        pem::common_name(cert).unwrap_or_default(),
        pem::fingerprint(cert),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::farm::Farm;

    #[test]
    fn configs_are_built_swapped_on_change_and_kept_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Farm::at(dir.path());
        farm.ensure(&["localhost".into()]).unwrap();
        let files = ServerFiles {
            cert: farm.server_cert(),
            key: farm.server_key(),
            client_ca: Some(farm.ca_cert()),
            client_auth: ClientAuth::Optional,
        };
        let tls = ServerTls::load(files.clone()).unwrap();
        let first = tls.config();
        assert_eq!(first.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
        farm.ensure(&["localhost".into(), "other".into()]).unwrap();
        assert!(
            tls.reload_if_changed().unwrap(),
            "a new certificate is picked up"
        );
        assert!(!Arc::ptr_eq(&first, &tls.config()));
        // A broken key file: the reload fails and the working config stays.
        std::fs::write(farm.server_key(), "not a key").unwrap();
        let before = tls.config();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.config()));
        // Required client certificates need a client CA.
        let no_ca = ServerFiles {
            client_ca: None,
            client_auth: ClientAuth::Required,
            ..files
        };
        assert!(matches!(
            no_ca.build(),
            Err(TlsError::Verifier(_)) | Err(TlsError::Pem { .. })
        ));
    }
}
