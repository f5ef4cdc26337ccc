//! `GetTree` on the wire without encoding directories again: pages are written from the
//! `Directory` bytes the CAS holds (a repeated message field and a repeated `bytes` field are
//! the same on the wire), through a tonic service of our own for the CAS's name, since the
//! generated one wants decoded messages. The data plane answers the CAS's other methods; any
//! that reach this service are refused.

use super::TreeService;
use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use futures::Stream;
use kiln_proto::reapi::GetTreeRequest;
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::{Request, Response, Status};

/// A `GetTreeResponse` whose directories are already encoded.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawPage {
    /// Each directory's `Directory` message (field 1).
    pub directories: Vec<Bytes>,
    /// `next_page_token` (field 2).
    pub next_page_token: String,
}

impl prost::Message for RawPage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for d in &self.directories {
            encoding::bytes::encode(1, d, buf);
        }
        if !self.next_page_token.is_empty() {
            encoding::string::encode(2, &self.next_page_token, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::bytes::merge_repeated(wire_type, &mut self.directories, buf, ctx),
            2 => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let token = if self.next_page_token.is_empty() {
            0
        } else {
            encoding::string::encoded_len(2, &self.next_page_token)
        };
        encoding::bytes::encoded_len_repeated(1, &self.directories) + token
    }

    fn clear(&mut self) {
        self.directories.clear();
        self.next_page_token.clear();
    }
}

/// The pages of one call.
pub type PageStream = Pin<Box<dyn Stream<Item = Result<RawPage, Status>> + Send>>;

/// The CAS's gRPC service as the control plane serves it: `GetTree`.
#[derive(Clone)]
pub struct TreeServer {
    inner: Arc<TreeService>,
    max_message: usize,
}

impl TreeServer {
    /// Serves `service`, with messages up to `max_message` bytes.
    pub fn new(service: TreeService, max_message: usize) -> TreeServer {
        TreeServer {
            inner: Arc::new(service),
            max_message,
        }
    }
}

impl tonic::server::NamedService for TreeServer {
    const NAME: &'static str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
}

struct GetTreeCall(Arc<TreeService>);

impl tonic::server::ServerStreamingService<GetTreeRequest> for GetTreeCall {
    type Response = RawPage;
    type ResponseStream = PageStream;
    type Future = BoxFuture<'static, Result<Response<PageStream>, Status>>;

    fn call(&mut self, request: Request<GetTreeRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.get_tree(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for TreeServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != crate::auth::paths::GET_TREE {
            let refused = Status::unimplemented(
                "only GetTree of the CAS is served here (the data plane serves its blob methods; SplitBlob and SpliceBlob are not offered)",
            );
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        let (inner, max) = (self.inner.clone(), self.max_message);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<RawPage, GetTreeRequest>::default();
            let mut grpc =
                tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.server_streaming(GetTreeCall(inner), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{Directory, FileNode, GetTreeResponse};
    use prost::Message;

    /// A raw page decodes as the `GetTreeResponse` it stands for.
    #[test]
    fn a_raw_page_is_a_get_tree_response() {
        let dirs: Vec<Directory> = (0..3)
            .map(|i| Directory {
                files: vec![FileNode {
                    name: format!("f{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        for token in ["", "t1.next"] {
            let raw = RawPage {
                directories: dirs.iter().map(|d| d.encode_to_vec().into()).collect(),
                next_page_token: token.into(),
            };
            let bytes = raw.encode_to_vec();
            assert_eq!(bytes.len(), raw.encoded_len());
            let decoded = GetTreeResponse::decode(&bytes[..]).unwrap();
            assert_eq!(decoded.directories, dirs);
            assert_eq!(decoded.next_page_token, token);
            assert_eq!(RawPage::decode(&bytes[..]).unwrap(), raw);
        }
    }
}
