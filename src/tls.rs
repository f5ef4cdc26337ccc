//! TLS for `kiln serve` and `kiln worker`: the server's certificate from `[tls]` (the
//! operator's files, or the farm CA made under `{data_dir}/tls/`), reloaded on SIGHUP and when
//! its files change; the worker's client config; and `kiln ca export`.

use anyhow::Context;
use kiln_config::{ClientAuthMode, Config, TlsMode};
use kiln_dataplane::tls::TlsAccept;
use kiln_tls::client::{ClientIdentity, Trust};
use kiln_tls::farm::Farm;
use kiln_tls::server::{ClientAuth, ServerFiles, ServerTls};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// The farm CA directory of a data directory.
pub fn farm(config: &Config) -> Farm {
    Farm::at(config.storage.data_dir.join("tls"))
}

/// The names an auto-mode server certificate carries.
fn server_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = crate::worker::host_name();
    if !host.is_empty() {
        names.push(host);
    }
    let ip = config.server.listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(config.tls.names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The server's TLS, if `[tls]` turns it on.
pub fn server(config: &Config) -> anyhow::Result<Option<TlsAccept>> {
    let client_auth = match config.tls.client_auth {
        ClientAuthMode::None => ClientAuth::None,
        ClientAuthMode::Optional => ClientAuth::Optional,
        ClientAuthMode::Required => ClientAuth::Required,
    };
    let files = match config.tls.mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Files => ServerFiles {
            cert: config.tls.cert.clone().context("tls.cert is not set")?,
            key: config.tls.key.clone().context("tls.key is not set")?,
            client_ca: config.tls.client_ca.clone(),
            client_auth,
        },
        TlsMode::Auto => {
            let farm = farm(config);
            if farm
                .ensure(&server_names(config))
                .context("cannot make the farm CA")?
            {
                info!(dir = %config.storage.data_dir.join("tls").display(), "made the farm CA and server certificate (tls.mode = \"auto\"); clients need `kiln ca export`");
            }
            ServerFiles {
                cert: farm.server_cert(),
                key: farm.server_key(),
                client_ca: Some(farm.ca_cert()),
                client_auth,
            }
        }
    };
    let tls = ServerTls::load(files).context("cannot load the TLS certificate")?;
    Ok(Some(TlsAccept {
        tls,
        handshake_timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
    }))
}

/// Reloads the server's certificate on SIGHUP (`hup`, watched since before the server
/// announced itself) and, every `tls.reload_check_secs`, when its files changed, for the TCP
/// listeners and for `quic` (the CAS over QUIC). Runs on the control plane's runtime until the
/// process ends.
pub async fn reload_loop(
    tls: Arc<ServerTls>,
    check_every: Duration,
    mut hup: Option<tokio::signal::unix::Signal>,
    quic: Option<kiln_worker::quic::serve::QuicCertificates>,
) {
    let mut tick = (!check_every.is_zero()).then(|| tokio::time::interval(check_every));
    loop {
        let forced = tokio::select! {
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = async { match tick.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending::<()>().await } } => false,
        };
        let result = if forced {
            tls.reload().map(|()| true)
        } else {
            tls.reload_if_changed()
        };
        if let (Ok(true), Some(q)) = (&result, &quic) {
            if let Err(e) = q.use_tls(&tls.config()) {
                error!(error = %e, "cannot use the reloaded TLS certificate for QUIC; QUIC keeps the previous one");
            }
        }
        match result {
            Ok(true) => info!("TLS certificate reloaded; new connections use it"),
            Ok(false) => {}
            Err(e) => {
                error!(error = %e, "cannot reload the TLS certificate; still serving the previous one")
            }
        }
    }
}

/// The client config the worker inside `kiln serve` uses for its own server: exactly the
/// certificate the server presents at that moment (so rotations are followed), and a client
/// certificate when the server asks for one: issued in memory by the farm CA in auto mode,
/// `[worker] tls_cert`/`tls_key` in files mode.
pub fn embedded_client(
    config: &Config,
    tls: &TlsAccept,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let server = tls.tls.clone();
    let trust = Trust::Current(Arc::new(move || server.leaf()));
    let identity = match (config.tls.mode, config.tls.client_auth) {
        (_, ClientAuthMode::None) => None,
        (TlsMode::Auto, _) => {
            let (cert, key) = farm(config).issue(
                &["kiln-embedded-worker".to_string()],
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            )?;
            Some(ClientIdentity::from_pem(&cert, &key)?)
        }
        _ => match (&config.worker.tls_cert, &config.worker.tls_key) {
            (Some(c), Some(k)) => Some(ClientIdentity::from_files(c, k)?),
            _ if config.tls.client_auth == ClientAuthMode::Required => anyhow::bail!(
                "tls.client_auth = \"required\" in files mode: give the embedded worker a client \
                 certificate ([worker] tls_cert and tls_key), or set [worker] embedded = false"
            ),
            _ => None,
        },
    };
    Ok(kiln_tls::client::config(trust, identity)?)
}

/// The client config of `kiln worker`, from `[worker] tls_*`; `None` without a CA.
pub fn worker_client(config: &Config) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let Some(ca) = &config.worker.tls_ca else {
        return Ok(None);
    };
    let identity = match (&config.worker.tls_cert, &config.worker.tls_key) {
        (Some(c), Some(k)) => Some(ClientIdentity::from_files(c, k)?),
        _ => None,
    };
    Ok(Some(kiln_tls::client::config(
        Trust::ca_file(ca)?,
        identity,
    )?))
}

/// `kiln ca export`: prints the farm CA certificate.
pub fn export_ca(config: &Config) -> anyhow::Result<()> {
    let farm = farm(config);
    let pem = std::fs::read_to_string(farm.ca_cert()).with_context(|| {
        format!(
            "no farm CA in {} (start `kiln serve` with tls.mode = \"auto\" first)",
            config.storage.data_dir.join("tls").display()
        )
    })?;
    print!("{pem}");
    Ok(())
}

/// Refuses to serve a non-loopback address unless every caller is both encrypted and
/// authenticated: the main port and the admin listener need TLS *and* either `[auth]` or
/// required client certificates (TLS alone would let any host on the network run commands or
/// read the status page). `--insecure` overrides, with a warning on every start.
pub fn check_exposure(config: &Config, insecure: bool) -> anyhow::Result<()> {
    let mut open = Vec::new();
    let mut check = |what: String, addr: std::net::SocketAddr| {
        if addr.ip().is_loopback() {
            return;
        }
        if config.tls.mode == TlsMode::Off {
            open.push(format!(
                "{what} {addr} without TLS (set [tls] mode = \"auto\")"
            ));
        } else if !config.auth.enabled && config.tls.client_auth != ClientAuthMode::Required {
            open.push(format!(
                "{what} {addr} to unauthenticated callers (set [auth] enabled = true, or [tls] client_auth = \"required\")"
            ));
        }
    };
    check("the main port".into(), config.server.listen);
    if config.admin.enabled {
        check("the admin listener".into(), config.admin.listen);
    }
    if open.is_empty() {
        return Ok(());
    }
    let what = open.join(" and ");
    if insecure {
        warn!("--insecure: serving {what}; anyone who can reach it can use it");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {what}: anyone who can reach it could use it. \
         Keep it on loopback, or pass --insecure if this network is yours alone"
    )
}

/// Warns about `[[auth.certificates]]` rules that can never match: no certificate reaches
/// the server when TLS is off, client certificates are not asked for, or (files mode) there
/// is no client CA to verify them.
pub fn warn_dead_certificate_rules(config: &Config) {
    if !config.auth.enabled || config.auth.certificates.is_empty() {
        return;
    }
    let why = match (config.tls.mode, config.tls.client_auth) {
        (TlsMode::Off, _) => Some("TLS is off"),
        (_, ClientAuthMode::None) => Some("tls.client_auth = \"none\""),
        (TlsMode::Files, _) if config.tls.client_ca.is_none() => Some("tls.client_ca is not set"),
        _ => None,
    };
    if let Some(why) = why {
        warn!("[[auth.certificates]] rules can never match: {why}, so no client certificate reaches the server");
    }
}
