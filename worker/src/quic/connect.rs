//! Dialling a peer over QUIC: one connection per peer, made once and shared by every stream
//! to it; each HTTP/2 connection tonic asks for is a new stream on it ([`QuicConnector`]).
//!
//! The handshake runs in a task of its own, so a fetch that gives up on the peer (the server
//! won the race) does not cancel it, and its outcome is always recorded: a peer that did not
//! answer within the connect timeout is marked unreachable over UDP for the cooldown. A
//! caller that may go over TCP too (`both`) uses QUIC only once the connection is up, and TCP
//! while it is dialled or unreachable ([`QuicPeer::up_or_dial`]).

use super::io::QuicIo;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

type Dialled = Shared<BoxFuture<'static, Result<quinn::Connection, Arc<str>>>>;

enum State {
    Idle,
    Dialling(Dialled),
    Up(quinn::Connection),
    /// Not reachable over UDP until then.
    Down(Instant),
}

/// One peer over QUIC.
pub struct QuicPeer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    /// The name its certificate must carry.
    name: String,
    timeout: Duration,
    cooldown: Duration,
    state: Mutex<State>,
}

impl QuicPeer {
    /// The peer at `addr` whose certificate names `name`, dialled from `endpoint`; a handshake
    /// not done within `timeout` marks it unreachable over UDP for `cooldown`.
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        name: &str,
        timeout: Duration,
        cooldown: Duration,
    ) -> Arc<QuicPeer> {
        Arc::new(QuicPeer {
            endpoint,
            addr,
            name: name.to_string(),
            timeout,
            cooldown,
            state: Mutex::new(State::Idle),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the connection is up now (not being dialled, not found unreachable).
    pub fn is_up(&self) -> bool {
        matches!(&*self.lock(), State::Up(c) if c.close_reason().is_none())
    }

    /// Whether the connection is up now; if it is not, and not being dialled nor found
    /// unreachable within the cooldown, a dial starts in the background (so that a caller
    /// that can go another way loses nothing while QUIC comes up). Must be called inside the
    /// tokio runtime.
    pub fn up_or_dial(self: &Arc<Self>) -> bool {
        let idle = match &*self.lock() {
            State::Up(c) if c.close_reason().is_none() => return true,
            State::Dialling(_) => false,
            State::Down(until) => Instant::now() >= *until,
            _ => true,
        };
        if idle {
            let peer = self.clone();
            tokio::spawn(async move { peer.connection().await });
        }
        false
    }

    /// Whether the connection is up now and takes uploads (the server agreed on
    /// [`super::ALPN_UPLOADS`]).
    pub fn takes_uploads(&self) -> bool {
        match &*self.lock() {
            State::Up(c) if c.close_reason().is_none() => c
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol)
                .is_some_and(|p| p == super::ALPN_UPLOADS),
            _ => false,
        }
    }

    /// Whether the peer may be reached over QUIC now: not found unreachable within the
    /// cooldown.
    pub fn reachable(&self) -> bool {
        match &*self.lock() {
            State::Down(until) => Instant::now() >= *until,
            _ => true,
        }
    }

    /// The connection, dialling it when there is none (must be called inside the tokio
    /// runtime).
    pub async fn connection(self: &Arc<Self>) -> Result<quinn::Connection, Arc<str>> {
        let dialled = {
            let mut state = self.lock();
            match &*state {
                State::Up(c) if c.close_reason().is_none() => return Ok(c.clone()),
                State::Down(until) if Instant::now() < *until => {
                    return Err(Arc::from("the peer did not answer over UDP"))
                }
                State::Dialling(d) => d.clone(),
                _ => {
                    let peer = self.clone();
                    let task = tokio::spawn(async move { peer.dial().await });
                    let peer = self.clone();
                    let dialled: Dialled = async move {
                        match task.await {
                            Ok(outcome) => outcome,
                            // The dial never recorded its outcome: record one, or the peer
                            // would wait on this failure for good.
                            Err(e) => {
                                *peer.lock() = State::Down(Instant::now() + peer.cooldown);
                                Err(Arc::from(format!("QUIC dial task failed: {e}")))
                            }
                        }
                    }
                    .boxed()
                    .shared();
                    *state = State::Dialling(dialled.clone());
                    dialled
                }
            }
        };
        dialled.await
    }

    /// Dials, within the timeout, and records the outcome.
    async fn dial(&self) -> Result<quinn::Connection, Arc<str>> {
        let connecting = self
            .endpoint
            .connect(self.addr, &self.name)
            .map_err(|e| Arc::<str>::from(e.to_string()));
        let outcome = match connecting {
            Ok(c) => match tokio::time::timeout(self.timeout, c).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(Arc::from(e.to_string())),
                Err(_) => Err(Arc::from(format!(
                    "no QUIC handshake within {:?}",
                    self.timeout
                ))),
            },
            Err(e) => Err(e),
        };
        *self.lock() = match &outcome {
            Ok(c) => State::Up(c.clone()),
            Err(e) => {
                tracing::info!(peer = %self.addr, error = %e, cooldown = ?self.cooldown, "peer not reachable over QUIC; using TCP");
                State::Down(Instant::now() + self.cooldown)
            }
        };
        outcome
    }
}

/// A tonic connector whose every connection is a new stream on the peer's QUIC connection
/// (the URI is ignored: the peer is fixed).
#[derive(Clone)]
pub struct QuicConnector(pub Arc<QuicPeer>);

type Io = hyper_util::rt::TokioIo<QuicIo>;

impl tower::Service<http::Uri> for QuicConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let peer = self.0.clone();
        Box::pin(async move {
            let failed = |e: &dyn std::fmt::Display| {
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
            };
            let connection = peer.connection().await.map_err(|e| failed(&e))?;
            let (send, recv) = connection.open_bi().await.map_err(|e| failed(&e))?;
            Ok(hyper_util::rt::TokioIo::new(QuicIo::new(send, recv, None)))
        })
    }
}
