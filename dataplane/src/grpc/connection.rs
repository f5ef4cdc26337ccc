//! Serving one HTTP/2 connection: the handshake with Kiln's window and frame settings, the
//! accept loop that drives the connection, a task per stream, and graceful shutdown (GOAWAY,
//! then wait for in-flight streams).

use super::call::Responder;
use super::limits::Activity;
use super::{Call, CallHandler};
use crate::metrics::Metrics;
use crate::runtime::{coalesce, BoxConnection, LocalBoxFuture, Runtime};
use crate::shutdown::ShutdownWatch;
use futures::future::{select, Either};
use kiln_auth::{Denied, Policy, Principal};
use kiln_config::ServerConfig;
use kiln_reapi::status::Classify;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, Instrument};

/// HTTP/2 settings derived from the server configuration.
#[derive(Debug, Clone)]
pub struct Http2Settings {
    /// Flow-control window per stream.
    pub stream_window: u32,
    /// Flow-control window per connection.
    pub connection_window: u32,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest DATA frame we accept.
    pub max_frame_size: u32,
    /// Largest gRPC message in either direction.
    pub max_message: usize,
    /// Close a connection with no call in flight for this long.
    pub idle_timeout: Option<Duration>,
}

impl Http2Settings {
    /// Reads the settings from the `[server]` section.
    pub fn from_config(c: &ServerConfig) -> Http2Settings {
        Http2Settings {
            stream_window: c.stream_window_bytes.as_u64().min(i32::MAX as u64) as u32,
            connection_window: c.connection_window_bytes.as_u64().min(i32::MAX as u64) as u32,
            max_concurrent_streams: c.max_concurrent_streams,
            max_frame_size: 1 << 20,
            max_message: c.max_message_bytes.as_u64() as usize,
            idle_timeout: (c.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(c.idle_timeout_secs)),
        }
    }
}

/// Who is on the other end of a connection: the policy that identifies each call's caller,
/// and the name on the client's TLS certificate, if it presented one.
#[derive(Clone)]
pub struct PeerIdentity {
    /// Identifies callers and checks their roles.
    pub policy: Arc<Policy>,
    /// The client certificate's common name and fingerprint.
    pub certificate: Option<(String, String)>,
    anyone: Arc<Principal>,
}

/// The one method a caller without credentials may call (it checks a join token itself).
const ENROL: &str = "/kiln.worker.v1.Enrolment/Enrol";

impl PeerIdentity {
    /// A connection checked by `policy`, from a client that presented `certificate`.
    pub fn new(policy: Arc<Policy>, certificate: Option<(String, String)>) -> PeerIdentity {
        PeerIdentity {
            policy,
            certificate,
            anyone: Arc::new(Principal::unrestricted()),
        }
    }

    /// The caller of one request: its bearer token, else the connection's certificate.
    fn identify(&self, request: &http::Request<h2::RecvStream>) -> Result<Arc<Principal>, Denied> {
        if !self.policy.enabled() {
            return Ok(self.anyone.clone());
        }
        if request.uri().path() == ENROL {
            return Ok(Arc::new(Principal::nobody("enrolling")));
        }
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        self.policy
            .identify(
                self.certificate
                    .as_ref()
                    .map(|(name, fp)| (name.as_str(), fp.as_str())),
                authorization,
            )
            .map(Arc::new)
    }
}

/// Serves `io` until the peer closes it or shutdown completes the graceful close.
#[allow(clippy::too_many_arguments)]
pub async fn serve_connection(
    runtime: Rc<dyn Runtime>,
    io: BoxConnection,
    peer: SocketAddr,
    identity: PeerIdentity,
    settings: Rc<Http2Settings>,
    handler: Rc<dyn CallHandler>,
    shutdown: ShutdownWatch,
    metrics: Arc<Metrics>,
) {
    metrics.connections_total.inc();
    metrics.connections_open.inc();
    let _open = OpenConnection(metrics.clone());
    let span = tracing::debug_span!("connection", %peer);
    async move {
        // h2 flushes after every frame: its writes are gathered and sent once per poll of the
        // futures that drive it (see `runtime::coalesce`).
        let (io, flusher) = coalesce::gather(io);
        let handshake = h2::server::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_frame_size(settings.max_frame_size)
            .max_send_buffer_size(4 << 20)
            .max_header_list_size(64 << 10)
            .handshake::<_, bytes::Bytes>(io);
        let mut conn = match select(
            flusher.flushing(Box::pin(handshake)),
            Box::pin(shutdown.wait()),
        )
        .await
        {
            Either::Left((Ok(conn), _)) => conn,
            Either::Left((Err(e), _)) => {
                debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
            Either::Right(_) => return,
        };
        let mut stopping = Box::pin(shutdown.wait());
        let mut draining = false;
        let activity = Rc::new(Activity::new(runtime.now()));
        // One idle timer for the connection, re-armed only when it fires (not per call).
        let mut idle: LocalBoxFuture<'static, ()> = match settings.idle_timeout {
            None => Box::pin(std::future::pending()),
            Some(limit) => runtime.sleep(limit),
        };
        loop {
            let next = if draining {
                flusher.flushing(Box::pin(conn.accept())).await
            } else {
                let woken = match select(
                    flusher.flushing(Box::pin(conn.accept())),
                    select(stopping.as_mut(), idle.as_mut()),
                )
                .await
                {
                    Either::Left((next, _)) => Wake::Call(next),
                    Either::Right((Either::Left(_), _)) => Wake::Shutdown,
                    Either::Right((Either::Right(_), _)) => Wake::IdleCheck,
                };
                match woken {
                    Wake::Call(next) => next,
                    Wake::Shutdown => {
                        debug!("shutdown: sending GOAWAY, finishing in-flight streams");
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                    Wake::IdleCheck => {
                        // Close only if the connection has had no call for the whole limit;
                        // else wait for what is left of it (all of it while calls run).
                        let limit = settings.idle_timeout.unwrap_or_default();
                        match activity.wait(limit, runtime.now()) {
                            Some(left) => idle = runtime.sleep(left),
                            None => {
                                debug!(?limit, "idle: sending GOAWAY");
                                metrics.connections_idle_closed.inc();
                                conn.graceful_shutdown();
                                draining = true;
                            }
                        }
                        continue;
                    }
                }
            };
            match next {
                Some(Ok((request, respond))) => {
                    activity.start();
                    let in_flight = CallInFlight {
                        activity: activity.clone(),
                        runtime: runtime.clone(),
                    };
                    let recorder = metrics.call(request.uri().path());
                    let handler = handler.clone();
                    let settings = settings.clone();
                    let identity = identity.clone();
                    let call_span = tracing::debug_span!("call", path = %request.uri().path());
                    runtime.spawn(Box::pin(
                        async move {
                            let _in_flight = in_flight;
                            let Some(mut call) =
                                Call::new(request, respond, settings.max_message, Some(recorder))
                            else {
                                return;
                            };
                            // Identified once, here; each method checks the caller's role on
                            // its instance (the control plane's from the request's extensions).
                            match identity.identify(&call.request) {
                                Ok(principal) => {
                                    call.request.extensions_mut().insert(principal);
                                    // Long-lived calls (a worker's session) ask it whether
                                    // their credential still holds.
                                    call.request
                                        .extensions_mut()
                                        .insert(identity.policy.clone());
                                    handler.handle(call).await;
                                }
                                Err(denied) => {
                                    debug!(message = %denied, "call refused: unauthenticated");
                                    call.responder.finish(Err(denied.status()));
                                }
                            }
                        }
                        .instrument(call_span),
                    ));
                }
                Some(Err(e)) => {
                    debug!(error = %e, "connection error");
                    break;
                }
                None => break,
            }
        }
        // Flush the final frames (GOAWAY, trailers) before dropping the socket.
        let _ = flusher
            .flushing(futures::future::poll_fn(|cx| conn.poll_closed(cx)))
            .await;
        // A peer that stopped reading does not hold the connection's slot past a bound.
        let _ = select(Box::pin(flusher.drain()), runtime.sleep(FINAL_DRAIN)).await;
    }
    .instrument(span)
    .await
}

/// How long a closing connection may take to send its last frames.
const FINAL_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What woke a connection's loop.
enum Wake<T> {
    /// A new stream, the connection's end, or its error.
    Call(T),
    /// The server is shutting down.
    Shutdown,
    /// The idle timer ran out.
    IdleCheck,
}

/// One call in flight on a connection; the connection's idle clock starts again when the
/// last one ends, however it ends.
struct CallInFlight {
    activity: Rc<Activity>,
    runtime: Rc<dyn Runtime>,
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.activity.end(self.runtime.now());
    }
}

/// Keeps the open-connections gauge right however the connection ends.
struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// Checks that a request is a gRPC call at all; answers it when it is not.
pub(super) fn validate(
    request: &http::Request<h2::RecvStream>,
    responder: Responder,
) -> Option<Responder> {
    if request.method() != http::Method::POST {
        responder.reject_http(http::StatusCode::METHOD_NOT_ALLOWED);
        return None;
    }
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        responder.reject_http(http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        return None;
    }
    let encoding = request
        .headers()
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok());
    if let Some(encoding) = encoding {
        if encoding != "identity" {
            responder.finish(Err(tonic::Status::unimplemented(format!(
                "grpc-encoding {encoding:?} is not supported; this server accepts identity only"
            ))));
            return None;
        }
    }
    Some(responder)
}
