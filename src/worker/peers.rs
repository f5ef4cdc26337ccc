//! Serving the worker's CAS to its peers: over mutual TLS when enrolled, the certificates of
//! revoked workers refused (kept across restarts), and whether it is served at all.

use anyhow::Context;
use kiln_config::Config;
use std::sync::Arc;
use std::time::Duration;

/// The worker's CAS over mutual TLS, for its peers, when the worker is enrolled (its
/// certificate from `kiln worker --join`, signed by the farm CA, names it as a server under
/// `.peer.kiln.invalid`): that certificate as the server's, and client certificates
/// required, signed by the farm CA. Returns the acceptor and the name peers check. `None`:
/// not enrolled (a worker with certificates of another PKI serves its peers in plain gRPC,
/// since its CA may sign certificates for others than the farm), or its certificate is one
/// from before peers had TLS (client only), or peers are off.
pub(super) fn peer_tls(
    config: &Config,
    enrolled: bool,
) -> anyhow::Result<Option<(kiln_dataplane::tls::TlsAccept, String)>> {
    let w = &config.worker;
    let (Some(cert), Some(key), Some(ca), true, true) =
        (&w.tls_cert, &w.tls_key, &w.tls_ca, w.peers, enrolled)
    else {
        return Ok(None);
    };
    let leaf = kiln_tls::pem::certificates(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?;
    let Some(name) = leaf.first().and_then(kiln_tls::pem::common_name) else {
        return Ok(None);
    };
    let files = kiln_tls::server::ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(ca.clone()),
        client_auth: kiln_tls::server::ClientAuth::Required,
    };
    let tls = kiln_tls::server::ServerTls::load(files)
        .context("cannot serve the local CAS over TLS with the worker's certificate")?;
    Ok(Some((
        kiln_dataplane::tls::TlsAccept {
            tls,
            handshake_timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
        },
        kiln_tls::farm::peer_name(&name),
    )))
}

/// Where a worker keeps the fingerprints of revoked workers' certificates it was told of.
pub(super) fn revoked_peers_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("identity").join("revoked-peers")
}

/// The fingerprints kept in [`revoked_peers_file`] (none if it is absent or unreadable).
pub(super) fn revoked_peers(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(revoked_peers_file(data_dir))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// How the session tells the local CAS which certificates to refuse: the whole list kept on
/// disk for the next start, then added to `policy` (so whoever finds a certificate refused
/// finds it kept too).
pub(super) fn refuser(
    policy: Arc<kiln_auth::Policy>,
    data_dir: &std::path::Path,
) -> kiln_worker::peers::Refuse {
    let file = revoked_peers_file(data_dir);
    // One session at a time (each scheduler's says it): two writing at once would race on
    // the file's temp path, and a list written last could lack the other's fingerprints.
    let one = std::sync::Mutex::new(());
    Arc::new(move |fingerprints: &[String]| {
        let _one = one.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = policy.revoked_fingerprints();
        all.extend(fingerprints.iter().cloned());
        all.sort_unstable();
        all.dedup();
        let text: String = all.iter().map(|f| format!("{f}\n")).collect();
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                kiln_tls::farm::write_private(&file, &text).map_err(std::io::Error::other)
            });
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "cannot keep the revoked workers' certificates for the next start");
        }
        policy.refuse_fingerprints(fingerprints);
    })
}

/// Whether this worker serves its CAS to peers (and reports what it holds): with
/// `worker.peer_endpoint`, or when `server.listen` is one address peers can reach (a loopback
/// address only when the scheduler, and so the whole farm, is on this host). Peers reach it
/// at `worker.peer_endpoint`, else at the address it is bound to.
pub(super) fn serves_peers(config: &Config, scheduler: &str) -> bool {
    if !config.worker.peers {
        return false;
    }
    if config.worker.peer_endpoint.is_some() {
        return true;
    }
    let listen = config.server.listen;
    if listen.ip().is_unspecified() {
        tracing::warn!(%listen, "the local CAS listens on every address, so peers cannot be told which to use: set worker.peer_endpoint to serve it to them");
        return false;
    }
    if listen.ip().is_loopback() && !on_loopback(scheduler) {
        tracing::info!(%listen, "the local CAS is on loopback, out of other hosts' reach: not served to peers (set server.listen and worker.peer_endpoint)");
        return false;
    }
    true
}

/// Whether the `grpc://HOST:PORT` URL names this host's loopback.
pub(super) fn on_loopback(url: &str) -> bool {
    let rest = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("grpcs://"))
        .unwrap_or(url);
    let host = rest
        .parse::<http::uri::Authority>()
        .map(|a| {
            a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
        .unwrap_or_default();
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
