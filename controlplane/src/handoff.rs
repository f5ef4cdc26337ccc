//! Serving calls the data plane handed over: each forwarded h2 stream is turned into an
//! `http::Request` for tonic's router, and the router's response is written straight back onto
//! the stream, honouring HTTP/2 flow control.

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use kiln_dataplane::grpc::{send_with_capacity, ForwardedCall};
use kiln_dataplane::metrics::CallRecorder;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::service::Routes;
use tower::Service;

/// Takes forwarded calls off the queue and serves each in its own task.
pub async fn serve(routes: Routes, queue: async_channel::Receiver<ForwardedCall>) {
    while let Ok(call) = queue.recv().await {
        let routes = routes.clone();
        tokio::spawn(serve_one(routes, call));
    }
}

async fn serve_one(mut routes: Routes, call: ForwardedCall) {
    let ForwardedCall {
        request,
        read,
        mut respond,
        recorder,
    } = call;
    let recorder = recorder.map(Arc::new);
    let (parts, body) = request.into_parts();
    let body = H2Body {
        read: read.into(),
        stream: body,
        recorder: recorder.clone(),
    };
    let request = http::Request::from_parts(parts, body);
    let response = match routes.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, mut body) = response.into_parts();
    let end = body.is_end_stream();
    record_status(&recorder, &parts.headers);
    let Ok(mut stream) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => {
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                record_status(&recorder, &trailers);
                let _ = stream.send_trailers(trailers);
                return;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                let len = data.len();
                if send_with_capacity(&mut stream, data).await.is_err() {
                    return;
                }
                if let Some(r) = &recorder {
                    r.sent(len);
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    record_status(&recorder, &trailers);
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// Notes the call's gRPC status from response headers or trailers.
fn record_status(recorder: &Option<Arc<CallRecorder>>, headers: &http::HeaderMap) {
    if let (Some(r), Some(code)) = (recorder, headers.get("grpc-status")) {
        let code = code
            .to_str()
            .ok()
            .and_then(|c| c.parse::<i32>().ok())
            .unwrap_or(2);
        r.finish(tonic::Code::from_i32(code));
    }
}

/// An h2 request body as an `http_body::Body`: first what the data plane already read (it
/// counted and released those bytes), then the stream, releasing flow-control capacity as it
/// is read.
struct H2Body {
    read: VecDeque<Bytes>,
    stream: h2::RecvStream,
    recorder: Option<Arc<CallRecorder>>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(data) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match self.stream.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.stream.flow_control().release_capacity(data.len());
                if let Some(r) = &self.recorder {
                    r.received(data.len());
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match self.stream.poll_trailers(cx) {
                Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.stream.is_end_stream()
    }
}
