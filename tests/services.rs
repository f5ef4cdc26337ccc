//! The one-port routing: Capabilities answered truthfully, methods that do not exist (yet)
//! answered UNIMPLEMENTED, and requests that are not gRPC refused without harming the server.

#[macro_use]
mod common;

use common::blobs::{self, digest};
use common::Kiln;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{self, digest_function::Value as Function};
use tonic::Code;

on_every_runtime! {
    async fn capabilities_are_truthful(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let caps = CapabilitiesClient::new(ch.clone())
            .get_capabilities(reapi::GetCapabilitiesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let cache = caps.cache_capabilities.unwrap();
        assert_eq!(
            cache.digest_functions,
            vec![Function::Sha256 as i32, Function::Blake3 as i32]
        );
        assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
        assert!(
            cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        );
        let zstd = kiln_proto::reapi::compressor::Value::Zstd as i32;
        assert_eq!(cache.supported_compressors, vec![zstd]);
        assert_eq!(cache.supported_batch_update_compressors, vec![zstd]);
        let exec = caps.execution_capabilities.unwrap();
        assert!(exec.exec_enabled, "the embedded default executes");
        assert_eq!(exec.digest_functions, vec![Function::Sha256 as i32, Function::Blake3 as i32]);
        let high = caps.high_api_version.unwrap();
        assert_eq!((high.major, high.minor), (2, 3));
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn unknown_and_unimplemented_methods(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let mut cas = blobs::cas(&ch);
        let root = digest(Function::Sha256, b"");
        // The empty blob is the concatenation of no chunks; a splice must name its blob.
        let split = cas
            .split_blob(reapi::SplitBlobRequest {
                blob_digest: Some(root.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(split.chunk_digests.is_empty());
        let err = cas
            .splice_blob(reapi::SpliceBlobRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = ExecutionClient::new(ch.clone())
            .execute(reapi::ExecuteRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "no action digest");
        let err = OperationsClient::new(ch.clone())
            .get_operation(kiln_proto::longrunning::GetOperationRequest { name: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // Nothing has run: an empty list.
        let listed = OperationsClient::new(ch.clone())
            .list_operations(kiln_proto::longrunning::ListOperationsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.operations.is_empty() && listed.next_page_token.is_empty());
        // The connection is still good afterwards.
        assert!(blobs::find_missing(&ch, "", Function::Sha256, vec![root])
            .await
            .is_empty());
        kiln.stop().await;
    }
}

// HTTP/1.1, garbage bytes and a half-finished HTTP/2 preface: each connection is dropped,
// the server keeps serving.
on_every_runtime! {
    async fn non_grpc_traffic_does_not_hurt(rt: Runtime) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        for junk in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[0xffu8; 4096][..],
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"[..],
        ] {
            let mut s = tokio::net::TcpStream::connect(kiln.addr).await.unwrap();
            s.write_all(junk).await.unwrap();
            s.shutdown().await.unwrap();
            let mut buf = Vec::new();
            // The server answers or closes; either way the read ends.
            let _ = s.read_to_end(&mut buf).await;
        }
        let ch = kiln.channel().await;
        let d = digest(Function::Sha256, b"");
        assert!(blobs::find_missing(&ch, "", Function::Sha256, vec![d])
            .await
            .is_empty());
        kiln.stop().await;
    }
}
