//! Downloads from a server that sends more than it was asked for.

use super::*;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use tonic::{Request, Response, Status, Streaming};

/// A server that answers every read with far more than any blob: a fault Kiln's own
/// server cannot be made to commit, so a fake stands in for a hostile or broken one.
struct Flooding;

#[tonic::async_trait]
impl ByteStream for Flooding {
    type ReadStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReadResponse, Status>> + Send>>;

    async fn read(&self, _: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let flood = futures::stream::repeat_with(move || {
            Ok(ReadResponse {
                data: chunk.clone(),
            })
        })
        .take(1 << 14); // 16 GiB, were it all written
        Ok(Response::new(Box::pin(flood)))
    }

    async fn write(
        &self,
        _: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        Err(Status::unimplemented("read only"))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("read only"))
    }
}

/// A download, whole or in ranges, stops at the first byte past what it asked for, with
/// DATA_LOSS, having written nothing past the blob's size.
#[tokio::test]
async fn a_server_sending_past_the_size_is_cut_off() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ByteStreamServer::new(Flooding))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = crate::link::Link::new(&format!("grpc://{addr}"), None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let blob = vec![7u8; (4 << 20) + 10];
    let digest = Digest::of(kiln_reapi::digest::DigestFunction::Sha256, &blob);
    let dir = tempfile::tempdir().unwrap();
    // One stream, and four ranges on two connections.
    let single = CasLinks::single(channel.clone());
    let ranged = CasLinks {
        main: channel.clone(),
        ranges: Arc::from(vec![
            channel.clone(),
            channel.clone(),
            channel.clone(),
            channel,
        ]),
        ranged_min: 1,
    };
    for (i, links) in [single, ranged].into_iter().enumerate() {
        let remote = RemoteCas::new(links);
        let path = dir.path().join(format!("blob{i}"));
        let instance = InstanceName::default_instance();
        let err = remote.download(&instance, digest, &path).await.unwrap_err();
        match err {
            CasError::Remote(s) => assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}"),
            other => panic!("{other:?}"),
        }
        let written = std::fs::metadata(&path).unwrap().len();
        assert!(written <= digest.size, "{written} bytes written");
        // Through the trait, the partial file is removed as well.
        let path = dir.path().join(format!("blob{i}-cas"));
        let err = remote.read_to_file(&instance, digest, &path).await;
        assert!(err.is_err(), "{err:?}");
        assert!(!path.exists(), "a failed download leaves no file");
    }
    server.abort();
}
