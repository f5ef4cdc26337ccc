//! The worker's link to the scheduler: `grpc://HOST:PORT` in plain HTTP/2, or `grpcs://`
//! (or any link given a TLS config) over TLS with the farm's CA, or with the server's own
//! certificate pinned (the worker inside `kiln serve`), and a client certificate for mutual
//! TLS.

use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How to reach the scheduler.
#[derive(Clone)]
pub struct Link {
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    url: String,
}

/// A scheduler address Kiln cannot use.
#[derive(Debug, thiserror::Error)]
#[error("bad scheduler address {url:?}: {why}")]
pub struct LinkError {
    url: String,
    why: String,
}

impl Link {
    /// A link to `url` (`grpc://` or `grpcs://HOST:PORT`); `tls` is required for `grpcs://`
    /// and makes any link use TLS.
    pub fn new(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Link, LinkError> {
        let fail = |why: &str| LinkError {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (secure, rest) = if let Some(r) = url.strip_prefix("grpcs://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("grpc://") {
            (false, r)
        } else {
            return Err(fail("use grpc://HOST:PORT or grpcs://HOST:PORT"));
        };
        if secure && tls.is_none() {
            return Err(fail(
                "a grpcs:// scheduler needs the CA that signs its certificate (--tls-ca)",
            ));
        }
        // The TLS connector dials HOST:PORT itself: tonic sees plain http.
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .map_err(|e| fail(&e.to_string()))?
            .tcp_nodelay(true)
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(64 << 20)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10));
        Ok(Link {
            endpoint,
            tls,
            url: url.to_string(),
        })
    }

    /// The address as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            None => self.endpoint.connect().await,
            Some(c) => {
                self.endpoint
                    .connect_with_connector(kiln_tls::client::Connector::new(c.clone()))
                    .await
            }
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            None => self.endpoint.connect_lazy(),
            Some(c) => self
                .endpoint
                .connect_with_connector_lazy(kiln_tls::client::Connector::new(c.clone())),
        }
    }
}
