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

/// Reloads the server's certificate on SIGHUP and, every `tls.reload_check_secs`, when its
/// files changed. Runs on the control plane's runtime until the process ends.
pub async fn reload_loop(tls: Arc<ServerTls>, check_every: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "cannot watch SIGHUP; certificates reload only when their files change");
            None
        }
    };
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
/// server's certificate, pinned.
pub fn embedded_client(tls: &TlsAccept) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let certs = kiln_tls::pem::certificates(&tls.tls.files().cert)?;
    Ok(kiln_tls::client::config(
        Trust::Pinned(certs[0].clone()),
        None,
    )?)
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

/// Refuses to serve a non-loopback address in the clear (the main port without TLS, or the
/// admin listener, which has no TLS yet) unless the operator says `--insecure`, which is
/// logged as a warning on every start.
pub fn check_exposure(config: &Config, insecure: bool) -> anyhow::Result<()> {
    let mut open = Vec::new();
    if config.tls.mode == TlsMode::Off && !config.server.listen.ip().is_loopback() {
        open.push(format!(
            "the main port {} without TLS (set [tls] mode = \"auto\")",
            config.server.listen
        ));
    }
    if config.admin.enabled && !config.admin.listen.ip().is_loopback() {
        open.push(format!(
            "the admin listener {} (plain HTTP)",
            config.admin.listen
        ));
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
        "refusing to serve {what} on the network: anyone who can reach it could use it. \
         Turn TLS on, keep it on loopback, or pass --insecure if this network is yours alone"
    )
}
