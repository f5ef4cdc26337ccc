//! A server that breaks the protocol: downloads of more than was asked for, missing digests
//! and bytes for blobs that were not asked about.

use super::*;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use kiln_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use kiln_proto::reapi::{
    batch_read_blobs_response, BatchReadBlobsRequest, BatchReadBlobsResponse,
    BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, FindMissingBlobsRequest,
    FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
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

/// Serves `router` on 127.0.0.1; a channel to it, and the server's task (to abort).
async fn serve(
    router: tonic::transport::server::Router,
) -> (crate::link::LinkChannel, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    let channel = crate::link::Link::new(&format!("grpc://{addr}"), None)
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, server)
}

/// A download, whole or in ranges, stops at the first byte past what it asked for, with
/// DATA_LOSS, having written nothing past the blob's size.
#[tokio::test]
async fn a_server_sending_past_the_size_is_cut_off() {
    let (channel, server) =
        serve(tonic::transport::Server::builder().add_service(ByteStreamServer::new(Flooding)))
            .await;
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

/// A CAS that answers with what it was not asked about: a missing digest no one asked for,
/// and bytes that are not the blob's. A fault Kiln's own server cannot be made to commit, so
/// a fake stands in for a hostile or broken one.
struct Lying;

#[tonic::async_trait]
impl ContentAddressableStorage for Lying {
    async fn find_missing_blobs(
        &self,
        _: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let stranger = Digest::of(kiln_reapi::digest::DigestFunction::Sha256, b"never asked");
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: vec![stranger.to_proto()],
        }))
    }

    async fn batch_update_blobs(
        &self,
        _: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        Err(Status::unimplemented("read only"))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .map(|d| batch_read_blobs_response::Response {
                data: Bytes::from(vec![0u8; d.size_bytes as usize]),
                digest: Some(d),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

    async fn get_tree(
        &self,
        _: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("no trees"))
    }

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("no chunks"))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("no chunks"))
    }
}

/// Such answers are errors (the remote CAS failing), never taken as "missing" or as the blob.
#[tokio::test]
async fn answers_that_break_the_protocol_are_errors() {
    let (channel, server) = serve(
        tonic::transport::Server::builder()
            .add_service(ContentAddressableStorageServer::new(Lying)),
    )
    .await;
    let remote = RemoteCas::new(CasLinks::single(channel));
    let instance = InstanceName::default_instance();
    let asked = Digest::of(kiln_reapi::digest::DigestFunction::Sha256, b"asked");
    for result in [
        remote.find_missing(&instance, &[asked]).await.map(|_| ()),
        remote.read_blobs(&instance, &[asked]).await.map(|_| ()),
    ] {
        match result {
            Err(CasError::Remote(s)) => assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}"),
            other => panic!("{other:?}"),
        }
    }
    server.abort();
}
