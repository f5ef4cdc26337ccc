//! Serving calls the data plane handed over: each forwarded h2 stream is turned into an
//! `http::Request` for tonic's router, and the router's response is written straight back onto
//! the stream, honouring HTTP/2 flow control. A call whose client resets its stream before the
//! answer is ready is dropped (its work stops).

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
    // A client that resets the stream (or whose connection goes) before the answer is ready
    // takes the call with it: the work is dropped, not finished for no one.
    let call = std::pin::pin!(routes.call(request));
    let reset = std::pin::pin!(std::future::poll_fn(|cx| respond.poll_reset(cx)));
    let response = match futures::future::select(call, reset).await {
        futures::future::Either::Left((Ok(response), _)) => response,
        futures::future::Either::Left((Err(never), _)) => match never {},
        futures::future::Either::Right(_) => {
            if let Some(r) = &recorder {
                r.finish(tonic::Code::Cancelled);
            }
            return;
        }
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
    loop {
        // An answer that streams (WaitExecution's updates) may be idle for long: a reset is
        // noticed while waiting for its next frame, not only when that frame is sent.
        let next = std::pin::pin!(body.frame());
        let reset = std::pin::pin!(std::future::poll_fn(|cx| stream.poll_reset(cx)));
        let frame = match futures::future::select(next, reset).await {
            futures::future::Either::Left((Some(frame), _)) => frame,
            futures::future::Either::Left((None, _)) => break,
            futures::future::Either::Right(_) => return,
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::oneshot;
    use std::convert::Infallible;

    /// A service that tells when it is called and when its call is dropped, and never
    /// finishes: it never answers (work the server is still doing when the client gives up),
    /// or, with `streams`, answers with a stream that stays idle (WaitExecution between
    /// updates).
    #[derive(Clone)]
    struct Endless {
        called: Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>,
        dropped: Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>,
        streams: bool,
    }

    /// A response body that never sends anything, and tells when it is dropped.
    struct Idle(#[allow(dead_code)] TellsOnDrop);

    impl Body for Idle {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            Poll::Pending
        }
    }

    impl tonic::server::NamedService for Endless {
        const NAME: &'static str = "test.Endless";
    }

    struct TellsOnDrop(Option<oneshot::Sender<()>>);

    impl Drop for TellsOnDrop {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    impl<B: Send + 'static> Service<http::Request<B>> for Endless {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<B>) -> Self::Future {
            let called = self.called.lock().unwrap().take();
            let guard = TellsOnDrop(self.dropped.lock().unwrap().take());
            let streams = self.streams;
            Box::pin(async move {
                if let Some(tx) = called {
                    let _ = tx.send(());
                }
                if streams {
                    let body = tonic::body::Body::new(Idle(guard));
                    return Ok(http::Response::new(body));
                }
                let _guard = guard;
                futures::future::pending().await
            })
        }
    }

    #[tokio::test]
    async fn a_call_whose_client_resets_is_dropped() {
        reset_drops_the_call(false).await;
    }

    #[tokio::test]
    async fn an_idle_stream_whose_client_resets_is_dropped() {
        reset_drops_the_call(true).await;
    }

    async fn reset_drops_the_call(streams: bool) {
        let (called_tx, called_rx) = oneshot::channel();
        let (dropped_tx, dropped_rx) = oneshot::channel();
        let routes = Routes::new(Endless {
            called: Arc::new(std::sync::Mutex::new(Some(called_tx))),
            dropped: Arc::new(std::sync::Mutex::new(Some(dropped_tx))),
            streams,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let (request, respond) = conn.accept().await.unwrap().unwrap();
            // Keep the connection going, so that the reset arrives.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let call = ForwardedCall {
                request,
                read: Vec::new(),
                respond,
                recorder: None,
            };
            serve_one(routes, call).await;
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(socket).await.unwrap();
        let driver = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::post(format!("http://{addr}/test.Endless/Call"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        let limit = std::time::Duration::from_secs(30);
        tokio::time::timeout(limit, called_rx)
            .await
            .unwrap()
            .unwrap();
        if streams {
            // The answer has begun: its headers arrived.
            tokio::time::timeout(limit, response)
                .await
                .unwrap()
                .unwrap();
        }
        body.send_reset(h2::Reason::CANCEL);
        tokio::time::timeout(limit, dropped_rx)
            .await
            .expect("the call was not dropped after the client's reset")
            .unwrap();
        tokio::time::timeout(limit, server).await.unwrap().unwrap();
        driver.abort();
    }
}
