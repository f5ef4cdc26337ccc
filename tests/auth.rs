//! `[auth]` against a real `kiln serve`: tokens made with `kiln token create`, every role
//! allowed and refused on both planes (blob methods checked on the data-plane core, the rest
//! in the control plane), per instance, with the right codes and messages; the embedded
//! worker's own token; revocation without a restart.

#[macro_use]
mod common;

use common::blobs::{digest, pseudo_random, read_name, write_name, write_requests};
use common::{kiln_token, Kiln, Options};
use kiln_proto::asset::fetch_client::FetchClient;
use kiln_proto::asset::push_client::PushClient;
use kiln_proto::asset::{FetchBlobRequest, PushBlobRequest};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest};
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::GetOperationRequest;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    batch_update_blobs_request, digest_function::Value as Function, ActionResult,
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, ExecuteRequest, FindMissingBlobsRequest,
    GetActionResultRequest, GetCapabilitiesRequest, GetTreeRequest, SpliceBlobRequest,
    SplitBlobRequest, UpdateActionResultRequest,
};
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const F: Function = Function::Sha256;

/// Adds `authorization: Bearer TOKEN` when a token is given.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// Every client, with one caller's credentials.
struct As {
    ch: Channel,
    token: Bearer,
}

impl As {
    fn cas(&self) -> ContentAddressableStorageClient<Authed> {
        ContentAddressableStorageClient::with_interceptor(self.ch.clone(), self.token.clone())
    }
    fn bytestream(&self) -> ByteStreamClient<Authed> {
        ByteStreamClient::with_interceptor(self.ch.clone(), self.token.clone())
    }
    fn ac(&self) -> ActionCacheClient<Authed> {
        ActionCacheClient::with_interceptor(self.ch.clone(), self.token.clone())
    }

    /// The status code of each method, called on `instance` (OK = 0).
    async fn codes(&self, instance: &str) -> Vec<(&'static str, Code)> {
        let data = pseudo_random(3, 1000);
        let d = digest(F, &data);
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        let mut out = Vec::new();
        out.push((
            "FindMissingBlobs",
            code(
                self.cas()
                    .find_missing_blobs(FindMissingBlobsRequest {
                        instance_name: instance.into(),
                        blob_digests: vec![d.clone()],
                        digest_function: F as i32,
                    })
                    .await
                    .map(|_| ()),
            ),
        ));
        out.push((
            "BatchUpdateBlobs",
            code(
                self.cas()
                    .batch_update_blobs(BatchUpdateBlobsRequest {
                        instance_name: instance.into(),
                        requests: vec![batch_update_blobs_request::Request {
                            digest: Some(d.clone()),
                            data: data.clone().into(),
                            compressor: 0,
                        }],
                        digest_function: F as i32,
                    })
                    .await
                    .map(|_| ()),
            ),
        ));
        out.push((
            "BatchReadBlobs",
            code(
                self.cas()
                    .batch_read_blobs(BatchReadBlobsRequest {
                        instance_name: instance.into(),
                        digests: vec![d.clone()],
                        acceptable_compressors: vec![],
                        digest_function: F as i32,
                    })
                    .await
                    .map(|_| ()),
            ),
        ));
        let write = write_requests(&write_name(instance, F, &d), &data, 1000, 0);
        out.push((
            "Write",
            code(
                self.bytestream()
                    .write(tokio_stream::iter(write))
                    .await
                    .map(|_| ()),
            ),
        ));
        out.push((
            "QueryWriteStatus",
            code(
                self.bytestream()
                    .query_write_status(QueryWriteStatusRequest {
                        resource_name: write_name(instance, F, &d),
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::NotFound),
        ));
        let read = async {
            let mut s = self
                .bytestream()
                .read(ReadRequest {
                    resource_name: read_name(instance, F, &d),
                    read_offset: 0,
                    read_limit: 0,
                })
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        };
        out.push(("Read", code(read.await).max_ok(Code::NotFound)));
        out.push((
            "GetActionResult",
            code(
                self.ac()
                    .get_action_result(GetActionResultRequest {
                        instance_name: instance.into(),
                        action_digest: Some(d.clone()),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::NotFound),
        ));
        out.push((
            "UpdateActionResult",
            code(
                self.ac()
                    .update_action_result(UpdateActionResultRequest {
                        instance_name: instance.into(),
                        action_digest: Some(d.clone()),
                        action_result: Some(ActionResult::default()),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::InvalidArgument)
            .max_ok(Code::FailedPrecondition),
        ));
        out.push((
            "GetCapabilities",
            code(
                CapabilitiesClient::with_interceptor(self.ch.clone(), self.token.clone())
                    .get_capabilities(GetCapabilitiesRequest {
                        instance_name: instance.into(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ));
        out.push((
            "Execute",
            code(
                ExecutionClient::with_interceptor(self.ch.clone(), self.token.clone())
                    .execute(ExecuteRequest {
                        instance_name: instance.into(),
                        action_digest: Some(d.clone()),
                        digest_function: F as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::FailedPrecondition)
            .max_ok(Code::InvalidArgument),
        ));
        out.push((
            "GetOperation",
            code(
                OperationsClient::with_interceptor(self.ch.clone(), self.token.clone())
                    .get_operation(GetOperationRequest {
                        name: "operations/none".into(),
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::NotFound),
        ));
        let session = async {
            // No Hello: a caller that passes the check is told INVALID_ARGUMENT at once.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            drop(tx);
            WorkerApiClient::with_interceptor(self.ch.clone(), self.token.clone())
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|_| ())
        };
        out.push((
            "WorkerApi.Session",
            code(session.await).max_ok(Code::InvalidArgument),
        ));
        let tree = async {
            let mut s = self
                .cas()
                .get_tree(GetTreeRequest {
                    instance_name: instance.into(),
                    // A root no caller uploads: past the check, NOT_FOUND.
                    root_digest: Some(digest(F, b"no such tree")),
                    digest_function: F as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        };
        out.push(("GetTree", code(tree.await).max_ok(Code::NotFound)));
        // A blob no caller uploads: past the check, NOT_FOUND.
        let absent = digest(F, b"no such blob");
        out.push((
            "SplitBlob",
            code(
                self.cas()
                    .split_blob(SplitBlobRequest {
                        instance_name: instance.into(),
                        blob_digest: Some(absent.clone()),
                        digest_function: F as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::NotFound),
        ));
        out.push((
            "SpliceBlob",
            code(
                self.cas()
                    .splice_blob(SpliceBlobRequest {
                        instance_name: instance.into(),
                        blob_digest: Some(absent.clone()),
                        chunk_digests: vec![absent.clone()],
                        digest_function: F as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::NotFound),
        ));
        // Not an http(s) URL and never pushed: past the check, an answer saying NOT_FOUND.
        out.push((
            "FetchBlob",
            code(
                FetchClient::with_interceptor(self.ch.clone(), self.token.clone())
                    .fetch_blob(FetchBlobRequest {
                        instance_name: instance.into(),
                        uris: vec!["urn:kiln:none".into()],
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ));
        // Content not in the CAS: past the check, INVALID_ARGUMENT.
        out.push((
            "PushBlob",
            code(
                PushClient::with_interceptor(self.ch.clone(), self.token.clone())
                    .push_blob(PushBlobRequest {
                        instance_name: instance.into(),
                        uris: vec!["urn:kiln:none".into()],
                        blob_digest: Some(absent),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            )
            .max_ok(Code::InvalidArgument),
        ));
        out
    }
}

/// Treats an expected non-auth error (the call got past the check) as OK.
trait PastTheCheck {
    fn max_ok(self, passed: Code) -> Code;
}

impl PastTheCheck for Code {
    fn max_ok(self, passed: Code) -> Code {
        if self == passed {
            Code::Ok
        } else {
            self
        }
    }
}

on_every_runtime! {
    async fn every_role_is_allowed_and_refused_on_both_planes(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let token = |name: &str, roles: &str, instance: Option<&str>| {
            let mut args = vec!["create", "--name", name, "--role", roles];
            if let Some(i) = instance {
                args.extend(["--instance", i]);
            }
            kiln_token(&data_dir, &args)
        };
        let reader = token("reader", "cache-read", Some("main"));
        let writer = token("writer", "cache-write,cache-read", None);
        let acw = token("acw", "ac-write", None);
        let exec = token("exec", "execute,cache-read,cache-write", None);
        let worker = token("worker", "worker", None);
        let listed = kiln_token(&data_dir, &["list"]);
        assert!(listed.contains("reader\tcache-read\tmain") && !listed.contains(&reader), "{listed}");
        let options = Options { config: Some("[auth]\nenabled = true\n".into()), ..Options::on(rt) };
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let caller = |t: Option<&String>| As { ch: ch.clone(), token: Bearer(t.cloned()) };
        use Code::{Ok as Y, PermissionDenied as N, Unauthenticated as U};
        let expect = |who: &str, got: Vec<(&str, Code)>, want: [Code; 17]| {
            assert_eq!(got.len(), want.len(), "{who}");
            for ((method, g), w) in got.iter().zip(want) {
                assert_eq!(*g, w, "{who}: {method}");
            }
        };
        let names = ["FindMissingBlobs", "BatchUpdateBlobs", "BatchReadBlobs", "Write", "QueryWriteStatus", "Read", "GetActionResult", "UpdateActionResult", "GetCapabilities", "Execute", "GetOperation", "WorkerApi.Session", "GetTree", "SplitBlob", "SpliceBlob", "FetchBlob", "PushBlob"];
        assert_eq!(caller(None).codes("main").await.iter().map(|(m, _)| *m).collect::<Vec<_>>(), names);
        expect("no token", caller(None).codes("main").await, [U; 17]);
        expect("bad token", caller(Some(&"kiln_bogus".to_string())).codes("main").await, [U; 17]);
        //                                          FMB BUB BRB Wr QWS Rd GAR UAR Cap Exe Op Wkr Tree Spl Spc Fet Push
        expect("reader@main", caller(Some(&reader)).codes("main").await, [Y, N, Y, N, N, Y, Y, N, Y, N, N, N, Y, Y, N, N, N]);
        expect("reader@other", caller(Some(&reader)).codes("other").await, [N; 17]);
        expect("writer", caller(Some(&writer)).codes("main").await, [Y, Y, Y, Y, Y, Y, Y, N, Y, N, N, N, Y, Y, Y, Y, N]);
        expect("acw", caller(Some(&acw)).codes("main").await, [N, N, N, N, N, N, N, Y, Y, N, N, N, N, N, N, N, Y]);
        expect("exec", caller(Some(&exec)).codes("x").await, [Y, Y, Y, Y, Y, Y, Y, N, Y, Y, Y, N, Y, Y, Y, Y, N]);
        expect("worker", caller(Some(&worker)).codes("main").await, [N, N, N, N, N, N, N, N, Y, N, N, Y, N, N, N, N, N]);
        // The refusal names the caller, the method and the instance.
        let e = caller(Some(&reader)).cas().batch_update_blobs(BatchUpdateBlobsRequest { instance_name: "main".into(), ..Default::default() }).await.unwrap_err();
        assert!(e.message().contains("token:reader") && e.message().contains("BatchUpdateBlobs") && e.message().contains("\"main\"") && e.message().contains("cache-write"), "{e:?}");
        // Revoked: refused within seconds, no restart.
        kiln_token(&data_dir, &["revoke", "reader"]);
        common::eventually("the revoked token to be refused", || {
            let c = caller(Some(&reader));
            async move {
                let r = c.cas().find_missing_blobs(FindMissingBlobsRequest { instance_name: "main".into(), ..Default::default() }).await;
                matches!(r, Err(s) if s.code() == Code::Unauthenticated).then_some(())
            }
        })
        .await;
        kiln.stop().await;
    }
}

// The data plane answers GetActionResult hits held in memory itself; it checks the caller's
// role on the instance first, exactly as the control plane does.
on_every_runtime! {
    async fn hits_served_by_the_data_plane_check_the_caller(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let rw = kiln_token(&data_dir, &["create", "--name", "rw", "--role", "cache-read,ac-write", "--instance", "main"]);
        let acw = kiln_token(&data_dir, &["create", "--name", "acw", "--role", "ac-write"]);
        let other = kiln_token(&data_dir, &["create", "--name", "other", "--role", "cache-read", "--instance", "other"]);
        let options = Options { config: Some("[auth]\nenabled = true\n".into()), ..Options::on(rt) };
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let caller = |t: &String| As { ch: ch.clone(), token: Bearer(Some(t.clone())) };
        let action = digest(F, b"served from memory");
        let result = ActionResult { exit_code: 7, ..Default::default() };
        caller(&rw)
            .ac()
            .update_action_result(UpdateActionResultRequest {
                instance_name: "main".into(),
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                digest_function: F as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        let get = |t: &String| {
            let c = caller(t);
            let action = action.clone();
            async move {
                c.ac()
                    .get_action_result(GetActionResultRequest {
                        instance_name: "main".into(),
                        action_digest: Some(action),
                        digest_function: F as i32,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner())
            }
        };
        let on_data_plane = "kiln_action_cache_data_plane_hits_total";
        // Found complete when it was stored: served by the data plane from the first hit.
        assert_eq!(get(&rw).await.unwrap(), result, "served by the data plane");
        assert_eq!(get(&rw).await.unwrap(), result, "served by the data plane");
        assert_eq!(common::metric(&kiln.admin, on_data_plane).await, 2.0);
        assert_eq!(get(&acw).await.unwrap_err().code(), Code::PermissionDenied, "no cache-read");
        assert_eq!(get(&other).await.unwrap_err().code(), Code::PermissionDenied, "another instance");
        assert_eq!(common::metric(&kiln.admin, on_data_plane).await, 2.0, "refusals are not hits");
        kiln.stop().await;
    }
}

// Callers without credentials may cache and execute here but hold no worker role: the
// embedded worker still runs the action, with the token that exists only in the server.
on_every_runtime! {
    async fn the_embedded_worker_has_its_own_token(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[auth]\nenabled = true\nanonymous_roles = [\"cache-read\", \"cache-write\", \"execute\"]\n".into()),
            ..Options::on(rt)
        };
        let d = dir.path().join("data");
        std::fs::create_dir_all(&d).unwrap();
        let elsewhere = kiln_token(&d, &["create", "--name", "b-only", "--role", "execute", "--instance", "b"]);
        let kiln = Kiln::start_async(&d, options).await;
        let ch = kiln.channel().await;
        let spec = common::exec::Spec::script("echo authorised");
        let (ops, r) = common::exec::execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(common::exec::code(&r), 0, "{r:?}");
        // An operation is seen only by callers with the execute role in its instance.
        let name = ops[0].name.clone();
        let get = |token: Option<String>| {
            let ch = ch.clone();
            let name = name.clone();
            async move {
                OperationsClient::with_interceptor(ch, Bearer(token))
                    .get_operation(GetOperationRequest { name })
                    .await
                    .map(|_| ())
            }
        };
        get(None).await.unwrap();
        let e = get(Some(elsewhere)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("instance \"\""), "{e:?}");
        // An anonymous caller cannot pose as a worker.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let e = WorkerApiClient::new(ch.clone()).session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        kiln.stop().await;
    }
}
