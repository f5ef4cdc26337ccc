//! Who may call what (`[auth]`), and TLS on the main port (`[tls]`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Roles for client certificates by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CertificateRoles {
    /// The certificate's common name, or a prefix ending in `*`.
    pub name: String,
    /// Roles: cache-read, cache-write, ac-write, execute, worker, admin.
    pub roles: Vec<String>,
    /// Instances they apply to; empty for all.
    pub instances: Vec<String>,
}

/// Identities and permissions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check every call's caller (off: everyone may do everything).
    pub enabled: bool,
    /// Bearer tokens, stored hashed (default `auth/tokens.toml` under the data directory).
    pub tokens_file: Option<PathBuf>,
    /// Roles of callers that present no credentials (none: they are refused).
    pub anonymous_roles: Vec<String>,
    /// Roles of client certificates, first match wins.
    pub certificates: Vec<CertificateRoles>,
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain HTTP/2 (the embedded default, on loopback).
    #[default]
    Off,
    /// `cert` and `key` from the operator's own PKI.
    Files,
    /// Kiln's own farm CA, made under `{data_dir}/tls/` on first start.
    Auto,
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthMode {
    /// Never asked for.
    None,
    /// Verified when presented (against `client_ca`, or the farm CA in auto mode).
    #[default]
    Optional,
    /// Every connection must present one.
    Required,
}

/// TLS on the main port: the handshake runs on the data-plane shard that accepted the
/// connection (rustls, ALPN `h2`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `off`, `files` or `auto`.
    pub mode: TlsMode,
    /// The certificate chain, PEM (files mode).
    pub cert: Option<PathBuf>,
    /// Its private key, PEM (files mode).
    pub key: Option<PathBuf>,
    /// CA certificates that sign client certificates, PEM (files mode; auto mode uses the farm
    /// CA).
    pub client_ca: Option<PathBuf>,
    /// `none`, `optional` or `required`.
    pub client_auth: ClientAuthMode,
    /// Extra names (DNS names or IP addresses) for the auto-mode server certificate.
    pub names: Vec<String>,
    /// A connection that has not finished its TLS handshake after this long is closed (seconds).
    pub handshake_timeout_secs: u64,
    /// How often the certificate files are checked for changes (seconds; 0: on SIGHUP only).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: TlsMode::Off,
            cert: None,
            key: None,
            client_ca: None,
            client_auth: ClientAuthMode::Optional,
            names: Vec::new(),
            handshake_timeout_secs: 10,
            reload_check_secs: 10,
        }
    }
}
