//! One gRPC call on an HTTP/2 stream: reading request messages and writing the response,
//! with HTTP/2 flow control honoured in both directions.

use super::codec::{FrameError, MessageDecoder};
use crate::metrics::CallRecorder;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Response};
use kiln_reapi::status::Classify;
use std::future::poll_fn;
use std::rc::Rc;
use tonic::Status;

/// Why reading the request stopped.
#[derive(Debug)]
pub enum RecvError {
    /// The request is malformed; answer with this status.
    Status(Status),
    /// The stream or connection is gone (reset, disconnect): there is no one to answer.
    Gone(h2::Error),
}

impl From<FrameError> for RecvError {
    fn from(e: FrameError) -> RecvError {
        RecvError::Status(e.status())
    }
}

impl RecvError {
    /// The status to answer with, or `None` when the peer is gone.
    pub fn into_status(self) -> Option<Status> {
        match self {
            RecvError::Status(s) => Some(s),
            RecvError::Gone(_) => None,
        }
    }
}

/// The request side of a call: a stream of gRPC messages.
pub struct RequestBody {
    body: RecvStream,
    decoder: MessageDecoder,
    ended: bool,
    recorder: Option<Rc<CallRecorder>>,
}

impl RequestBody {
    /// Wraps an h2 body; messages over `limit` bytes are refused.
    pub fn new(body: RecvStream, limit: usize, recorder: Option<Rc<CallRecorder>>) -> RequestBody {
        RequestBody {
            body,
            decoder: MessageDecoder::new(limit),
            ended: false,
            recorder,
        }
    }

    /// The next message's bytes, or `None` at the end of the request.
    pub async fn message(&mut self) -> Result<Option<Bytes>, RecvError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            if self.ended {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    // Received bytes are now ours: let the peer send more. Memory stays bounded
                    // by one message plus the stream window, since we pull only when we need.
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    if let Some(r) = &self.recorder {
                        r.received(chunk.len());
                    }
                    self.decoder.push(chunk);
                }
                Some(Err(e)) => return Err(RecvError::Gone(e)),
                None => self.ended = true,
            }
        }
    }

    /// The next message decoded as `M`.
    pub async fn decode<M: prost::Message + Default>(&mut self) -> Result<Option<M>, RecvError> {
        match self.message().await? {
            None => Ok(None),
            Some(bytes) => M::decode(bytes).map(Some).map_err(|e| {
                RecvError::Status(Status::invalid_argument(format!(
                    "malformed request message: {e}"
                )))
            }),
        }
    }

    /// Exactly one message, as a unary call carries.
    pub async fn unary<M: prost::Message + Default>(&mut self) -> Result<M, RecvError> {
        let message = self.decode::<M>().await?.ok_or_else(|| {
            RecvError::Status(Status::invalid_argument("request carried no message"))
        })?;
        if self.message().await?.is_some() {
            return Err(RecvError::Status(Status::invalid_argument(
                "unary request carried more than one message",
            )));
        }
        Ok(message)
    }
}

/// The response side of a call.
pub struct Responder {
    respond: SendResponse<Bytes>,
    stream: Option<SendStream<Bytes>>,
    recorder: Option<Rc<CallRecorder>>,
}

fn grpc_headers() -> Response<()> {
    let mut response = Response::new(());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

impl Responder {
    /// Wraps an h2 response handle.
    pub fn new(respond: SendResponse<Bytes>, recorder: Option<Rc<CallRecorder>>) -> Responder {
        Responder {
            respond,
            stream: None,
            recorder,
        }
    }

    /// Sends message bytes (already framed), waiting for flow-control capacity. An error means
    /// the peer is gone.
    pub async fn send(&mut self, parts: &[Bytes]) -> Result<(), h2::Error> {
        if self.stream.is_none() {
            self.stream = Some(self.respond.send_response(grpc_headers(), false)?);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        for part in parts {
            send_with_capacity(stream, part.clone()).await?;
            if let Some(r) = &self.recorder {
                r.sent(part.len());
            }
        }
        Ok(())
    }

    /// Sends one framed message.
    pub async fn send_message<M: prost::Message>(&mut self, message: &M) -> Result<(), h2::Error> {
        self.send(&[super::codec::encode(message)]).await
    }

    /// Ends the call with `result` as the gRPC status (trailers-only when nothing was sent).
    pub fn finish(mut self, result: Result<(), Status>) {
        let status = match result {
            Ok(()) => Status::ok(""),
            Err(status) => status,
        };
        if let Some(r) = &self.recorder {
            r.finish(status.code());
        }
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", HeaderValue::from_static("13"));
        }
        match self.stream.as_mut() {
            Some(stream) => {
                let _ = stream.send_trailers(trailers);
            }
            None => {
                let mut response = grpc_headers();
                response.headers_mut().extend(trailers);
                let _ = self.respond.send_response(response, true);
            }
        }
    }

    /// The raw h2 handle, for a call handed over before any response was sent.
    pub fn into_raw(self) -> (SendResponse<Bytes>, Option<Rc<CallRecorder>>) {
        (self.respond, self.recorder)
    }

    /// Answers with a plain HTTP status (for requests that are not gRPC at all).
    pub fn reject_http(mut self, status: http::StatusCode) {
        if let Some(r) = &self.recorder {
            r.finish(tonic::Code::Unknown);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        let _ = self.respond.send_response(response, true);
    }
}

/// Sends `data`, in pieces as the peer's flow-control window allows. Works from any executor.
pub async fn send_with_capacity(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return Ok(());
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let mut available = stream.capacity();
        while available == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => available = stream.capacity(),
                Some(Err(e)) => return Err(e),
                None => return Err(h2::Error::from(h2::Reason::CANCEL)),
            }
        }
        let piece = data.split_to(available.min(data.len()));
        stream.send_data(piece, false)?;
    }
    Ok(())
}
