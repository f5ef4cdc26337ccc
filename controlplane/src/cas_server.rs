//! The CAS's gRPC service as the control plane serves it: `GetTree` (pages written from the
//! bytes the CAS holds, see [`crate::tree::raw`]), `SplitBlob` and `SpliceBlob`. A tonic
//! service of our own for the CAS's name, since the generated one wants every method and
//! decoded `GetTree` pages. The data plane answers the CAS's other methods; any that reach
//! this service are refused.

use crate::chunking::ChunkService;
use crate::tree::raw::{PageStream, RawPage};
use crate::tree::TreeService;
use futures::future::BoxFuture;
use kiln_proto::reapi::{
    GetTreeRequest, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::{Request, Response, Status};

/// The control plane's CAS methods.
#[derive(Clone)]
pub struct CasServer {
    tree: Arc<TreeService>,
    chunks: Arc<ChunkService>,
    max_message: usize,
}

impl CasServer {
    /// Serves `tree` and `chunks`, with messages up to `max_message` bytes.
    pub fn new(tree: TreeService, chunks: ChunkService, max_message: usize) -> CasServer {
        CasServer {
            tree: Arc::new(tree),
            chunks: Arc::new(chunks),
            max_message,
        }
    }
}

impl tonic::server::NamedService for CasServer {
    const NAME: &'static str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
}

struct GetTreeCall(Arc<TreeService>);

impl tonic::server::ServerStreamingService<GetTreeRequest> for GetTreeCall {
    type Response = RawPage;
    type ResponseStream = PageStream;
    type Future = BoxFuture<'static, Result<Response<PageStream>, Status>>;

    fn call(&mut self, request: Request<GetTreeRequest>) -> Self::Future {
        Box::pin(TreeService::answer(&self.0, request))
    }
}

/// A unary chunking method: the service and the function that answers the call.
type Answer<Resp> = BoxFuture<'static, Result<Response<Resp>, Status>>;

struct ChunkCall<Req, Resp>(
    Arc<ChunkService>,
    fn(Arc<ChunkService>, Request<Req>) -> Answer<Resp>,
);

impl<Req, Resp> tonic::server::UnaryService<Req> for ChunkCall<Req, Resp> {
    type Response = Resp;
    type Future = Answer<Resp>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        (self.1)(self.0.clone(), request)
    }
}

fn split(
    service: Arc<ChunkService>,
    request: Request<SplitBlobRequest>,
) -> Answer<SplitBlobResponse> {
    Box::pin(async move { service.split_blob(request).await })
}

fn splice(
    service: Arc<ChunkService>,
    request: Request<SpliceBlobRequest>,
) -> Answer<SpliceBlobResponse> {
    Box::pin(async move { service.splice_blob(request).await })
}

/// A tonic server for one method's messages, with the message size limits.
fn grpc<Resp, Req>(max: Option<usize>) -> tonic::server::Grpc<tonic_prost::ProstCodec<Resp, Req>>
where
    Resp: prost::Message + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .apply_max_message_size_config(max, max)
}

impl<B> tower::Service<http::Request<B>> for CasServer
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
        let max = Some(self.max_message);
        let path = request.uri().path().to_string();
        let (tree, chunks) = (self.tree.clone(), self.chunks.clone());
        Box::pin(async move {
            Ok(match path.as_str() {
                crate::auth::paths::GET_TREE => {
                    grpc::<RawPage, GetTreeRequest>(max)
                        .server_streaming(GetTreeCall(tree), request)
                        .await
                }
                crate::auth::paths::SPLIT_BLOB => {
                    grpc::<SplitBlobResponse, SplitBlobRequest>(max)
                        .unary(ChunkCall(chunks, split), request)
                        .await
                }
                crate::auth::paths::SPLICE_BLOB => {
                    grpc::<SpliceBlobResponse, SpliceBlobRequest>(max)
                        .unary(ChunkCall(chunks, splice), request)
                        .await
                }
                _ => Status::unimplemented(
                    "only GetTree, SplitBlob and SpliceBlob of the CAS are served here (the data plane serves its blob methods)",
                )
                .into_http(),
            })
        })
    }
}
