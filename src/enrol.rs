//! Enrolment: `kiln join-token create` (a one-time token naming the server, the farm CA's
//! fingerprint and a secret), the server's [`Enroller`] that turns a token and a CSR into a
//! client certificate from the farm CA, `kiln worker --join` (pin the CA by fingerprint, send
//! a CSR, keep the certificate in the worker's CAS directory), and `kiln worker revoke`.

use crate::cli::{CaArgs, JoinTokenCommand};
use anyhow::Context;
use kiln_auth::join::{Enrolment, JoinError};
use kiln_auth::Policy;
use kiln_config::Config;
use kiln_controlplane::enrolment::Enroller;
use kiln_tls::farm::Farm;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The enrolment file (join tokens and enrolled workers), next to the token file.
pub fn enrolment_file(config: &Config) -> PathBuf {
    crate::auth::tokens_file(config)
        .parent()
        .map(|p| p.join("enrolment.toml"))
        .unwrap_or_else(|| config.storage.data_dir.join("auth/enrolment.toml"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
fn seconds(ttl: &str) -> anyhow::Result<u64> {
    let ttl = ttl.trim();
    let (number, unit) = match ttl.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => ttl.split_at(i),
        None => (ttl, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("bad --ttl {ttl:?}"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("bad --ttl {ttl:?}: use s, m, h or d"),
    };
    n.checked_mul(scale).context("--ttl is too long")
}

/// A join token as printed: `kiln-join/v1/HOST:PORT/CA-SHA256/SECRET`.
struct JoinToken {
    server: String,
    ca: String,
    secret: String,
}

impl JoinToken {
    fn parse(text: &str) -> anyhow::Result<JoinToken> {
        let rest = text
            .trim()
            .strip_prefix("kiln-join/v1/")
            .context("not a Kiln join token (kiln-join/v1/…)")?;
        let mut parts = rest.rsplitn(3, '/');
        let (secret, ca, server) = (parts.next(), parts.next(), parts.next());
        match (server, ca, secret) {
            (Some(server), Some(ca), Some(secret))
                if !server.is_empty() && ca.len() == 64 && !secret.is_empty() =>
            {
                Ok(JoinToken {
                    server: server.to_string(),
                    ca: ca.to_string(),
                    secret: secret.to_string(),
                })
            }
            _ => anyhow::bail!("malformed join token"),
        }
    }
}

/// `kiln join-token create`.
pub fn join_token(command: JoinTokenCommand) -> anyhow::Result<()> {
    let JoinTokenCommand::Create {
        server,
        role,
        ttl,
        server_address,
    } = command;
    let config = crate::serve::server_config(&server)?;
    let roles = crate::auth::roles(&role, "--role")?;
    let fingerprint = crate::tls::farm(&config)
        .ca_fingerprint()
        .context("no farm CA yet: start `kiln serve` with [tls] mode = \"auto\" first")?;
    let address = match server_address {
        Some(a) => a,
        None => {
            let listen = config.server.listen;
            if listen.ip().is_unspecified() {
                format!("{}:{}", crate::worker::host_name(), listen.port())
            } else {
                listen.to_string()
            }
        }
    };
    let secret = Enrolment::create_token(&enrolment_file(&config), &roles, now(), seconds(&ttl)?)?;
    eprintln!(
        "one-time join token, valid for {ttl} (give it to one worker: kiln worker --join TOKEN):"
    );
    println!("kiln-join/v1/{address}/{fingerprint}/{secret}");
    Ok(())
}

/// `kiln worker revoke NAME`.
pub fn revoke(server: &CaArgs, name: &str) -> anyhow::Result<()> {
    let config = crate::serve::server_config(server)?;
    Enrolment::revoke(&enrolment_file(&config), name)?;
    eprintln!(
        "worker {name:?} revoked: its calls are refused and its session closed within a second"
    );
    Ok(())
}

/// The server's enroller: the farm CA signs, the enrolment file keeps the books, and the
/// policy learns of a new worker before the worker is told it is enrolled (else its first
/// session would be refused until the next periodic reload).
pub struct FarmEnroller {
    farm: Farm,
    file: PathBuf,
    policy: Arc<Policy>,
}

impl FarmEnroller {
    /// Enrols with `config`'s farm CA, into `policy`.
    pub fn new(config: &Config, policy: Arc<Policy>) -> FarmEnroller {
        FarmEnroller {
            farm: crate::tls::farm(config),
            file: enrolment_file(config),
            policy,
        }
    }
}

impl Enroller for FarmEnroller {
    fn enrol(
        &self,
        token: &str,
        name: &str,
        csr_pem: &str,
    ) -> Result<(String, String), tonic::Status> {
        let internal = |e: &dyn std::fmt::Display| tonic::Status::internal(e.to_string());
        let redeemed = Enrolment::redeem(&self.file, token, name, now(), |_| {
            self.farm
                .sign_request(csr_pem, name)
                .map_err(|e| kiln_auth::tokens::TokenError::Issue(e.to_string()))
        });
        let redeemed = match redeemed {
            Err(kiln_auth::tokens::TokenError::Issue(why)) => {
                return Err(tonic::Status::invalid_argument(format!(
                    "cannot sign the certificate request: {why}"
                )))
            }
            other => other.map_err(|e| internal(&e))?,
        };
        let certificate = match redeemed {
            Ok(cert) => cert,
            Err(e @ JoinError::NameTaken(_)) => {
                return Err(tonic::Status::already_exists(e.to_string()))
            }
            Err(e @ JoinError::Unknown) => {
                return Err(tonic::Status::unauthenticated(e.to_string()))
            }
            Err(e) => return Err(tonic::Status::permission_denied(e.to_string())),
        };
        let ca = std::fs::read_to_string(self.farm.ca_cert()).map_err(|e| internal(&e))?;
        self.policy.reload_if_changed();
        tracing::info!(worker = name, "worker enrolled");
        Ok((certificate, ca))
    }
}

/// Where a worker keeps what enrolment gave it.
pub struct Identity {
    dir: PathBuf,
}

impl Identity {
    /// The identity kept under a worker's CAS directory.
    pub fn of(config: &Config) -> Identity {
        Identity {
            dir: config.storage.data_dir.join("identity"),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Points `config` at the stored identity, if there is one and `config` names no
    /// scheduler or TLS files of its own.
    pub fn apply(&self, config: &mut Config) -> anyhow::Result<bool> {
        let Ok(scheduler) = std::fs::read_to_string(self.file("scheduler")) else {
            return Ok(false);
        };
        if config.worker.scheduler.is_none() {
            config.worker.scheduler = Some(scheduler.trim().to_string());
        }
        if config.worker.tls_ca.is_none() && config.worker.tls_cert.is_none() {
            config.worker.tls_ca = Some(self.file("ca.pem"));
            config.worker.tls_cert = Some(self.file("cert.pem"));
            config.worker.tls_key = Some(self.file("key.pem"));
        }
        Ok(true)
    }

    /// Whether `config` uses this identity's certificate (not TLS files of its own).
    pub fn in_use(&self, config: &Config) -> bool {
        config.worker.tls_cert.as_deref() == Some(self.file("cert.pem").as_path())
    }

    /// Enrols with `token` as `name` and stores the result.
    pub fn enrol(
        &self,
        runtime: &tokio::runtime::Runtime,
        token: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let token = JoinToken::parse(token)?;
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let config = kiln_tls::client::config(
            kiln_tls::client::Trust::CaFingerprint(token.ca.clone()),
            None,
        )?;
        let response = runtime.block_on(async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", token.server))?
                    .connect_timeout(std::time::Duration::from_secs(10))
                    .connect_with_connector(kiln_tls::client::Connector::new(config))
                    .await
                    .with_context(|| {
                        format!(
                            "cannot reach {} over TLS with the farm CA the token names",
                            token.server
                        )
                    })?;
            let response = kiln_proto::worker::enrolment_client::EnrolmentClient::new(channel)
                .enrol(kiln_proto::worker::EnrolRequest {
                    token: token.secret.clone(),
                    name: name.to_string(),
                    csr_pem: csr,
                })
                .await
                .map_err(|s| anyhow::anyhow!("enrolment refused: {}", s.message()))?;
            Ok::<_, anyhow::Error>(response.into_inner())
        })?;
        use kiln_tls::farm::{private_dir, write_private};
        private_dir(&self.dir)?;
        write_private(&self.file("key.pem"), &key.serialize_pem())?;
        write_private(&self.file("cert.pem"), &response.certificate_pem)?;
        write_private(&self.file("ca.pem"), &response.ca_pem)?;
        write_private(
            &self.file("scheduler"),
            &format!("grpcs://{}\n", token.server),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_ttls_parse() {
        let fp = "a".repeat(64);
        let t = JoinToken::parse(&format!("kiln-join/v1/build:50051/{fp}/kiln_join_x")).unwrap();
        assert_eq!(
            (t.server.as_str(), t.ca.as_str(), t.secret.as_str()),
            ("build:50051", fp.as_str(), "kiln_join_x")
        );
        let v6 = JoinToken::parse(&format!("kiln-join/v1/[::1]:5/{fp}/s")).unwrap();
        assert_eq!(v6.server, "[::1]:5");
        for bad in [
            "",
            "kiln-join/v1/x",
            "other",
            &format!("kiln-join/v1//{fp}/s"),
            "kiln-join/v1/h:1/short/s",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("90").unwrap(), 90);
        assert_eq!(seconds("30m").unwrap(), 1800);
        assert_eq!(seconds("1h").unwrap(), 3600);
        assert_eq!(seconds("7d").unwrap(), 604_800);
        assert!(seconds("1y").is_err() && seconds("h").is_err());
    }
}
