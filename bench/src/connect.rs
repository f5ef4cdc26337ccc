//! Connections to the endpoint: several HTTP/2 connections with large windows, used in turn.

use anyhow::{bail, Context};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Largest message the bench accepts or sends.
pub const MAX_MESSAGE: usize = 256 << 20;

/// `grpc://host:port` (or `http://`) as a URL tonic understands.
pub fn endpoint_url(endpoint: &str) -> anyhow::Result<String> {
    let rest = endpoint
        .strip_prefix("grpc://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .unwrap_or(endpoint);
    if endpoint.starts_with("grpcs://") || endpoint.starts_with("https://") {
        bail!("TLS endpoints are not supported by kiln-bench yet: {endpoint}");
    }
    if rest.is_empty() || rest.contains('/') {
        bail!("endpoint {endpoint:?} is not grpc://HOST:PORT");
    }
    Ok(format!("http://{rest}"))
}

/// A set of connections, handed out round robin.
#[derive(Clone)]
pub struct Connections {
    channels: Arc<Vec<Channel>>,
    next: Arc<AtomicUsize>,
}

impl Connections {
    /// Opens `count` separate HTTP/2 connections.
    pub async fn open(endpoint: &str, count: usize) -> anyhow::Result<Connections> {
        let url = endpoint_url(endpoint)?;
        let mut channels = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let channel = Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .initial_stream_window_size(16 << 20)
                .initial_connection_window_size(64 << 20)
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .connect()
                .await
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
            "http://127.0.0.1:50051"
        );
        assert_eq!(endpoint_url("localhost:1").unwrap(), "http://localhost:1");
        assert!(endpoint_url("grpcs://x:1").is_err());
        assert!(endpoint_url("grpc://x:1/path").is_err());
    }
}
