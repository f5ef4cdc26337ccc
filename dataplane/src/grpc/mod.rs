//! Kiln's own small HTTP/2 gRPC server for the data plane: h2 on the core's executor, gRPC
//! message framing, and hand-over of calls that are not blob methods to the control plane.
//!
//! tonic's server needs tokio, and the data plane runs on glommio or monoio, so the framing is
//! Kiln's: [`codec`] (sans-IO), [`call`] (flow-controlled reading and writing of one call),
//! [`connection`] (the accept loop).

pub mod call;
pub mod codec;
pub mod connection;
mod handoff;
pub mod limits;

pub use call::{send_with_capacity, RecvError, RequestBody, Responder};
pub use connection::{serve_connection, Http2Settings, PeerIdentity};
pub use handoff::{ForwardedCall, HandoffSender};

use crate::metrics::CallRecorder;
use crate::runtime::LocalBoxFuture;
use std::rc::Rc;

/// A call accepted on a connection, not yet split into its gRPC parts.
pub struct Call {
    /// The HTTP/2 request (headers and body).
    pub request: http::Request<h2::RecvStream>,
    /// Where the response goes.
    pub responder: Responder,
    max_message: usize,
    recorder: Option<Rc<CallRecorder>>,
}

impl Call {
    /// Accepts a request if it is a gRPC call; otherwise answers it with an HTTP error.
    fn new(
        request: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<bytes::Bytes>,
        max_message: usize,
        recorder: Option<CallRecorder>,
    ) -> Option<Call> {
        let recorder = recorder.map(Rc::new);
        let responder = connection::validate(&request, Responder::new(respond, recorder.clone()))?;
        Some(Call {
            request,
            responder,
            max_message,
            recorder,
        })
    }

    /// The gRPC method path, `/package.Service/Method`.
    pub fn path(&self) -> &str {
        self.request.uri().path()
    }

    /// Who is calling and what: checks the caller's role on an instance once the request
    /// names it. The connection identified the caller before the call began.
    pub fn caller(&self) -> Caller {
        Caller {
            principal: self
                .request
                .extensions()
                .get::<std::sync::Arc<kiln_auth::Principal>>()
                .cloned(),
            path: self.path().to_string(),
        }
    }

    /// Hands the call over for the control plane to serve; `read` is what
    /// [`Call::peek_unary`] already read of its body (the control plane reads it first, as
    /// if the data plane had never looked), empty for an untouched call.
    pub fn into_forwarded_after(self, read: Vec<bytes::Bytes>) -> ForwardedCall {
        let (respond, responder_recorder) = self.responder.into_raw();
        drop(responder_recorder);
        ForwardedCall {
            request: self.request,
            read,
            respond,
            // The control plane finishes the count (status, bytes) when it is done.
            recorder: self.recorder.and_then(|r| Rc::try_unwrap(r).ok()),
        }
    }

    /// Reads a small unary request whole and decodes its message while keeping the call, so
    /// that it can still be answered here or handed over ([`Call::into_forwarded_after`] with
    /// the bytes read). `None` (with the bytes read so far) when the request is not a single
    /// well-formed message of at most `limit` bytes, or the body is larger: the caller hands
    /// it over, and the control plane answers it as it answers any request. Holds at most
    /// `limit` plus one chunk of body.
    pub async fn peek_unary<M: prost::Message + Default>(
        &mut self,
        limit: usize,
    ) -> Result<(Option<M>, Vec<bytes::Bytes>), h2::Error> {
        let mut read = Vec::new();
        let mut held = 0usize;
        let body = self.request.body_mut();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if let Some(r) = &self.recorder {
                r.received(chunk.len());
            }
            held += chunk.len();
            read.push(chunk);
            if held > limit + codec::PREFIX_LEN {
                return Ok((None, read));
            }
        }
        let mut decoder = codec::MessageDecoder::new(limit);
        for chunk in &read {
            decoder.push(chunk.clone());
        }
        let message = match (decoder.next_message(), decoder.buffered()) {
            (Ok(Some(bytes)), 0) => M::decode(bytes).ok(),
            _ => None,
        };
        Ok((message, read))
    }

    /// Splits the call into its message reader and responder.
    pub fn into_parts(self) -> (RequestBody, Responder) {
        let body = RequestBody::new(self.request.into_body(), self.max_message, self.recorder);
        (body, self.responder)
    }
}

/// The caller of one call, for the check once its instance is known.
pub struct Caller {
    principal: Option<std::sync::Arc<kiln_auth::Principal>>,
    path: String,
}

impl Caller {
    /// Whether the caller may make this call on `instance`.
    pub fn check(&self, instance: &str) -> Result<(), kiln_auth::Denied> {
        match &self.principal {
            Some(p) => kiln_auth::policy::authorize(p, &self.path, Some(instance)),
            None => Err(kiln_auth::Denied {
                unauthenticated: true,
                message: "the caller was not identified".into(),
            }),
        }
    }
}

/// Serves calls; the data plane's router implements it.
pub trait CallHandler {
    /// Serves one call to completion.
    fn handle(self: Rc<Self>, call: Call) -> LocalBoxFuture<'static, ()>;
}
