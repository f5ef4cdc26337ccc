//! The worker's link to the scheduler: `grpc://HOST:PORT` in plain HTTP/2, or `grpcs://`
//! (or any link given a TLS config) over TLS with the farm's CA, or with the server's own
//! certificate pinned (the worker inside `kiln serve`), and a client certificate for mutual
//! TLS; optionally a bearer token sent on every call.

use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How to reach the scheduler.
#[derive(Clone)]
pub struct Link {
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the server's certificate must carry, when not the URL's host.
    server_name: Option<rustls::pki_types::ServerName<'static>>,
    url: String,
    authorization: Option<http::HeaderValue>,
}

/// A channel to the scheduler that presents the link's bearer token (if any) on every call;
/// with a QUIC route, its blob reads and uploads go over QUIC once that connection is up (QUIC
/// only: always), and over TCP meanwhile.
#[derive(Clone)]
pub struct LinkChannel {
    inner: Channel,
    authorization: Option<http::HeaderValue>,
    quic: Option<QuicRoute>,
}

/// The reads a QUIC route carries.
const READS_OVER_QUIC: [&str; 3] = crate::quic::service::SERVED;
/// The uploads a QUIC route carries, where the server takes them.
const UPLOADS_OVER_QUIC: [&str; 3] = crate::quic::service::UPLOADS;

/// The same server over QUIC.
#[derive(Clone)]
struct QuicRoute {
    channel: Channel,
    server: Arc<crate::quic::connect::QuicPeer>,
    /// QUIC only: never the TCP channel.
    only: bool,
}

impl tower::Service<http::Request<tonic::body::Body>> for LinkChannel {
    type Response = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        use std::task::Poll;
        // With a QUIC route both channels must take the call: which one does is decided by
        // the call's method (only blob reads and uploads go over QUIC).
        if let Some(q) = &mut self.quic {
            match tower::Service::poll_ready(&mut q.channel, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(v) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
        }
        let path = request.uri().path();
        let read = READS_OVER_QUIC.contains(&path);
        let upload = UPLOADS_OVER_QUIC.contains(&path);
        match &mut self.quic {
            Some(q) if read && (q.only || q.server.up_or_dial()) => q.channel.call(request),
            // Over QUIC once the connection is up, where the server takes them (a server from
            // before uploads over QUIC gets them over TCP).
            Some(q) if upload && q.server.up_or_dial() && q.server.takes_uploads() => {
                q.channel.call(request)
            }
            _ => self.inner.call(request),
        }
    }
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
            server_name: None,
            url: url.to_string(),
            authorization: None,
        })
    }

    /// Checks the server's certificate for `name` rather than the URL's host (a peer's CAS:
    /// its certificate names the worker, whatever address it is reached at).
    pub fn with_server_name(mut self, name: &str) -> Result<Link, LinkError> {
        let name =
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|_| LinkError {
                url: self.url.clone(),
                why: format!("{name:?} is not a server name"),
            })?;
        self.server_name = Some(name);
        Ok(self)
    }

    fn connector(&self, config: &Arc<rustls::ClientConfig>) -> kiln_tls::client::Connector {
        match &self.server_name {
            Some(name) => kiln_tls::client::Connector::for_name(config.clone(), name.clone()),
            None => kiln_tls::client::Connector::new(config.clone()),
        }
    }

    /// Presents `token` as `authorization: Bearer TOKEN` on every call.
    pub fn with_token(mut self, token: &str) -> Result<Link, LinkError> {
        let fail = |why: &str| LinkError {
            url: self.url.clone(),
            why: why.to_string(),
        };
        let loopback = self
            .endpoint
            .uri()
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if self.tls.is_none() && !loopback {
            return Err(fail(
                "a bearer token is never sent in the clear off loopback: use grpcs:// (--tls-ca)",
            ));
        }
        let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| fail("the token is not a valid header value"))?;
        // Never indexed by HPACK.
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    fn wrap(&self, inner: Channel) -> LinkChannel {
        LinkChannel {
            inner,
            authorization: self.authorization.clone(),
            quic: None,
        }
    }

    /// A channel that connects on first use, whose blob reads go over QUIC to `server` once
    /// that connection is up and over this link while it is dialled or unreachable (`only`:
    /// always over QUIC); every other call goes over this link.
    pub fn connect_lazy_preferring(
        &self,
        server: Arc<crate::quic::connect::QuicPeer>,
        only: bool,
    ) -> LinkChannel {
        let mut channel = self.connect_lazy();
        let quic = self
            .endpoint
            .connect_with_connector_lazy(crate::quic::connect::QuicConnector(server.clone()));
        channel.quic = Some(QuicRoute {
            channel: quic,
            server,
            only,
        });
        channel
    }

    /// The server's address and the name its certificate must carry, for QUIC: the URL's
    /// host (resolved now) and port, or `None` when they do not resolve.
    pub fn quic_target(&self) -> Option<(std::net::SocketAddr, String)> {
        use std::net::ToSocketAddrs;
        let uri = self.endpoint.uri();
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let addr = (host, uri.port_u16()?).to_socket_addrs().ok()?.next()?;
        let name = match &self.server_name {
            Some(n) => n.to_str().into_owned(),
            None => host.to_string(),
        };
        Some((addr, name))
    }

    /// The address as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<LinkChannel, tonic::transport::Error> {
        let channel = match &self.tls {
            None => self.endpoint.connect().await,
            Some(c) => {
                self.endpoint
                    .connect_with_connector(self.connector(c))
                    .await
            }
        }?;
        Ok(self.wrap(channel))
    }

    /// A channel whose connections are streams on a peer's QUIC connection (made on first
    /// use, and again after a failure), whatever the link's own TLS: QUIC secures them.
    pub fn connect_lazy_via(&self, connector: crate::quic::connect::QuicConnector) -> LinkChannel {
        self.wrap(self.endpoint.connect_with_connector_lazy(connector))
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self) -> LinkChannel {
        let channel = match &self.tls {
            None => self.endpoint.connect_lazy(),
            Some(c) => self.endpoint.connect_with_connector_lazy(self.connector(c)),
        };
        self.wrap(channel)
    }
}
