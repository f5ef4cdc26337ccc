//! Kiln's own farm CA (`[tls] mode = "auto"`): on first start a CA and a server certificate
//! signed by it are made under `{data_dir}/tls/`, every file mode 0600 in a 0700 directory.
//! The server certificate is made again (same CA) when the names it must carry change.
//! Operators hand `ca.pem` to clients (`kiln ca export`); workers pin it by fingerprint.

use crate::TlsError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The files of a farm CA directory.
#[derive(Debug, Clone)]
pub struct Farm {
    dir: PathBuf,
}

/// The CA's subject; also how an issuer is rebuilt from its key alone.
const CA_NAME: &str = "Kiln farm CA";

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

/// A SAN from a name: an IP address or a DNS name.
fn san(name: &str) -> Result<SanType, TlsError> {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|_| TlsError::ServerName(name.to_string()))?,
        )),
    }
}

/// What enrolled workers' names end with as servers (their CAS, to their peers).
pub const PEER_NAME_SUFFIX: &str = ".peer.kiln.invalid";

/// The name the certificate of the worker enrolled as `worker` carries as a server: under
/// `.invalid` (RFC 6761), so that no real host's name can be it.
pub fn peer_name(worker: &str) -> String {
    format!("{worker}{PEER_NAME_SUFFIX}")
}

/// Writes `contents` to `path` readable by its owner only (replacing it atomically).
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| TlsError::io(&temp, e))?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| TlsError::io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| TlsError::io(path, e))
}

/// Creates `dir` (and its parents) accessible by its owner only.
pub fn private_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TlsError::io(dir, e))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::io(path, e))
}

impl Farm {
    /// The farm CA kept in `dir` (nothing is made until [`Farm::ensure`]).
    pub fn at(dir: impl Into<PathBuf>) -> Farm {
        Farm { dir: dir.into() }
    }

    /// The CA certificate (PEM): what clients trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA's private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// The server certificate, signed by the CA.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server certificate's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }

    fn server_names(&self) -> PathBuf {
        self.dir.join("server.names")
    }

    /// Makes whatever is missing: the CA on first start, the server certificate when there is
    /// none or when `names` (its SANs) changed. Returns whether anything was made.
    pub fn ensure(&self, names: &[String]) -> Result<bool, TlsError> {
        private_dir(&self.dir)?;
        let mut made = false;
        if !self.ca_cert().exists() || !self.ca_key().exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write_private(&self.ca_key(), &key.serialize_pem())?;
            write_private(&self.ca_cert(), &cert.pem())?;
            // A new CA invalidates any server certificate signed by an old one.
            let _ = std::fs::remove_file(self.server_names());
            made = true;
        }
        let wanted = names.join("\n");
        let current = std::fs::read_to_string(self.server_names()).ok();
        if current.as_deref() != Some(wanted.as_str()) || !self.server_cert().exists() {
            let (cert, key) = self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)?;
            write_private(&self.server_key(), &key)?;
            // The chain includes the CA, so a worker that pins the CA by fingerprint (a join
            // token) can find it in the handshake.
            write_private(
                &self.server_cert(),
                &format!("{cert}{}", read(&self.ca_cert())?),
            )?;
            write_private(&self.server_names(), &wanted)?;
            made = true;
        }
        Ok(made)
    }

    /// Issues a certificate for `names` (SANs; the first is also the subject's common name)
    /// with a fresh key, signed by the CA. Returns (certificate PEM, key PEM).
    pub fn issue(
        &self,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), TlsError> {
        let ca_key = KeyPair::from_pem(&read(&self.ca_key())?)?;
        let issuer = Issuer::new(ca_params(), ca_key);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("kiln", String::as_str),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a worker's certificate signing request (PEM): whatever it asks for, the
    /// certificate names `name` as its common name and serves client authentication
    /// (towards the server and its peers) and server authentication as [`peer_name`]`(name)`
    /// only (its CAS, as its peers reach it) — a name under `.invalid`, which no server of
    /// the farm can have, so a worker's certificate can never pass as the scheduler's. A name
    /// that makes no valid DNS name that way gets a client certificate only. Returns the
    /// certificate (PEM) and its SHA-256 fingerprint.
    pub fn sign_request(&self, csr_pem: &str, name: &str) -> Result<(String, String), TlsError> {
        let ca_key = KeyPair::from_pem(&read(&self.ca_key())?)?;
        let issuer = Issuer::new(ca_params(), ca_key);
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        request.params = CertificateParams::default();
        request.params.distinguished_name = dn;
        request.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        request.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let peer = peer_name(name);
        if rustls::pki_types::DnsName::try_from(peer.clone()).is_ok() {
            if let Ok(san) = peer.try_into() {
                request.params.subject_alt_names = vec![SanType::DnsName(san)];
                request
                    .params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ServerAuth);
            }
        }
        request.params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        request.params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = request.signed_by(&issuer)?;
        Ok((cert.pem(), crate::pem::fingerprint(cert.der())))
    }

    /// The CA certificate's SHA-256 fingerprint (hex).
    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        let certs = crate::pem::certificates(&self.ca_cert())?;
        Ok(crate::pem::fingerprint(&certs[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_farm_is_made_once_private_and_reissued_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Farm::at(dir.path().join("tls"));
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        assert!(farm.ensure(&names).unwrap(), "made on first start");
        for f in [
            farm.ca_cert(),
            farm.ca_key(),
            farm.server_cert(),
            farm.server_key(),
        ] {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let dir_mode = std::fs::metadata(dir.path().join("tls"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let fingerprint = farm.ca_fingerprint().unwrap();
        assert_eq!(fingerprint.len(), 64);
        assert!(
            !farm.ensure(&names).unwrap(),
            "nothing to do the second time"
        );
        let server = std::fs::read(farm.server_cert()).unwrap();
        let more = vec!["localhost".to_string(), "build.example".to_string()];
        assert!(
            farm.ensure(&more).unwrap(),
            "new names: a new server certificate"
        );
        assert_ne!(std::fs::read(farm.server_cert()).unwrap(), server);
        assert_eq!(farm.ca_fingerprint().unwrap(), fingerprint, "same CA");
        // Issued certificates carry their first name as the subject's common name.
        let (client, _) = farm
            .issue(&["worker-mac1".into()], ExtendedKeyUsagePurpose::ClientAuth)
            .unwrap();
        let der = &crate::pem::certificates_from(client.as_bytes()).unwrap()[0];
        assert_eq!(crate::pem::common_name(der).as_deref(), Some("worker-mac1"));
        // A worker's request is signed for the name the server chooses, whatever it asked.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let (cert, fingerprint) = farm.sign_request(&csr, "mac-7").unwrap();
        let der = &crate::pem::certificates_from(cert.as_bytes()).unwrap()[0];
        assert_eq!(crate::pem::common_name(der).as_deref(), Some("mac-7"));
        assert_eq!(crate::pem::fingerprint(der), fingerprint);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert!(
            !parsed.is_ca(),
            "a CA was asked for, a client certificate was issued"
        );
        // Its one name is the server's choice (peers check it when they reach the worker's
        // CAS); none it asked for is kept.
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![x509_parser::extensions::GeneralName::DNSName(
                "mac-7.peer.kiln.invalid"
            )]
        );
        let usage = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.client_auth && usage.server_auth, "{usage:?}");
        // A name that makes no DNS name (a label over 63 characters) gets a client
        // certificate only.
        let long = "w".repeat(64);
        let (cert, _) = farm.sign_request(&csr, &long).unwrap();
        let der = &crate::pem::certificates_from(cert.as_bytes()).unwrap()[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        assert!(parsed.subject_alternative_name().unwrap().is_none());
        let usage = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.client_auth && !usage.server_auth, "{usage:?}");
    }
}
