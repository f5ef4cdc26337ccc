//! The worker's link to one scheduler, and that server's CAS as the worker reads from and
//! uploads to it (over TCP, or QUIC too).

use anyhow::bail;
use kiln_config::Config;
use kiln_worker::link::Link;
use kiln_worker::remote::{CasLinks, RemoteCas};
use std::sync::Arc;
use std::time::Duration;

/// The link to the scheduler at `url` (with the farm's `token`, when set), and its CAS as
/// this worker reads from and uploads to it: over TCP, or over QUIC too when
/// `worker.server_transport` asks for it and the link has TLS. Called within the runtime.
pub(super) fn server_link(
    config: &Config,
    url: &str,
    peer_client: &Option<Arc<rustls::ClientConfig>>,
    token: Option<&str>,
    quic_client: &Option<kiln_worker::quic::ClientEndpoint>,
) -> anyhow::Result<(Link, Arc<dyn kiln_reapi::cas::Cas>)> {
    let mut link = Link::new(url, peer_client.clone())?;
    if let Some(token) = token {
        link = link.with_token(token)?;
    }
    // Reads from the server over QUIC too, when asked for and the link has TLS.
    let server_quic = match (config.worker.server_transport, quic_client) {
        (kiln_config::PeerTransport::Tcp, _) | (_, None) => None,
        (transport, Some(endpoint)) => {
            let only = transport == kiln_config::PeerTransport::Quic;
            match link.quic_target() {
                None if only => bail!("cannot resolve {url} to reach the server over QUIC"),
                None => {
                    tracing::warn!(scheduler = %url, "cannot resolve the server's address for QUIC; reading over TCP");
                    None
                }
                Some((addr, name)) => {
                    let server = kiln_worker::quic::connect::QuicPeer::new(
                        endpoint.clone(),
                        addr,
                        &name,
                        Duration::from_millis(config.worker.peer_quic_connect_timeout_ms),
                        Duration::from_secs(config.worker.peer_cooldown_secs),
                    );
                    Some((server, only))
                }
            }
        }
    };
    let cas_link = || match &server_quic {
        Some((server, only)) => link.connect_lazy_preferring(server.clone(), *only),
        None => link.connect_lazy(),
    };
    let main = cas_link();
    // Each range of a large download on a connection of its own (the first shares main).
    let ranges: Vec<_> = std::iter::once(main.clone())
        .chain((1..config.worker.fetch_ranges).map(|_| cas_link()))
        .collect();
    let links = CasLinks {
        main,
        ranges: ranges.into(),
        ranged_min: config.worker.ranged_fetch_min_bytes.as_u64(),
    };
    Ok((link, Arc::new(RemoteCas::new(links))))
}
