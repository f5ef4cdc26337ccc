//! Connections to the endpoint: several HTTP/2 connections with large windows, used in turn.

use anyhow::{bail, Context};
use kiln_tls::client::{ClientIdentity, Connector, Trust};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Largest message the bench accepts or sends.
pub const MAX_MESSAGE: usize = 256 << 20;

/// An endpoint as a URL tonic dials (`http://HOST:PORT`; TLS, when the endpoint is
/// `grpcs://` or `https://`, is added by the connector), and whether it wants TLS.
pub fn endpoint_url(endpoint: &str) -> anyhow::Result<(String, bool)> {
    let (rest, tls) = if let Some(r) = endpoint
        .strip_prefix("grpcs://")
        .or_else(|| endpoint.strip_prefix("https://"))
    {
        (r, true)
    } else {
        (
            endpoint
                .strip_prefix("grpc://")
                .or_else(|| endpoint.strip_prefix("http://"))
                .unwrap_or(endpoint),
            false,
        )
    };
    if rest.is_empty() || rest.contains('/') {
        bail!("endpoint {endpoint:?} is not grpc://HOST:PORT or grpcs://HOST:PORT");
    }
    Ok((format!("http://{rest}"), tls))
}

/// TLS settings for a `grpcs://` endpoint.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificates to trust.
    pub ca: Option<PathBuf>,
    /// A client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let ca = self
            .ca
            .as_ref()
            .context("a grpcs:// endpoint needs --tls-ca (the CA that signs its certificate)")?;
        let identity = match &self.identity {
            Some((cert, key)) => Some(ClientIdentity::from_files(cert, key)?),
            None => None,
        };
        Ok(kiln_tls::client::config(Trust::ca_file(ca)?, identity)?)
    }
}

/// A set of connections, handed out round robin.
#[derive(Clone)]
pub struct Connections {
    channels: Arc<Vec<Channel>>,
    next: Arc<AtomicUsize>,
}

impl Connections {
    /// Opens `count` separate HTTP/2 connections.
    pub async fn open(endpoint: &str, count: usize, tls: &TlsFiles) -> anyhow::Result<Connections> {
        let (url, secure) = endpoint_url(endpoint)?;
        let client = if secure {
            Some(tls.client_config()?)
        } else {
            None
        };
        let mut channels = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let e = Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .initial_stream_window_size(16 << 20)
                .initial_connection_window_size(64 << 20)
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(30));
            let channel = match &client {
                None => e.connect().await,
                Some(c) => e.connect_with_connector(Connector::new(c.clone())).await,
            }
            .with_context(|| format!("cannot connect to {endpoint}"))?;
            channels.push(channel);
        }
        Ok(Connections {
            channels: Arc::new(channels),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The next connection.
    pub fn pick(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            endpoint_url("grpc://127.0.0.1:50051").unwrap(),
            ("http://127.0.0.1:50051".to_string(), false)
        );
        assert_eq!(
            endpoint_url("localhost:1").unwrap(),
            ("http://localhost:1".to_string(), false)
        );
        assert_eq!(
            endpoint_url("grpcs://x:1").unwrap(),
            ("http://x:1".to_string(), true)
        );
        assert!(endpoint_url("grpc://x:1/path").is_err());
    }
}
