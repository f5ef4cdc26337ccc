//! The `Fetch` and `Push` services on the wire: the caller checked, the request's fields
//! handed to the service, its outcome made into the response.

use super::{AssetError, AssetService, FetchArgs, Kind};
use crate::auth;
use kiln_proto::asset::fetch_server::Fetch;
use kiln_proto::asset::push_server::Push;
use kiln_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_reapi::digest::Digest;
use kiln_reapi::status::Classify;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// A fetch's answer: status, uri, digest function and digest.
struct Answer {
    status: Option<RpcStatus>,
    uri: String,
    digest_function: i32,
    digest: Option<kiln_proto::reapi::Digest>,
}

/// The fields a `FetchBlobRequest` and a `FetchDirectoryRequest` share, moved out.
macro_rules! fetch_args {
    ($r:ident) => {
        FetchArgs {
            instance_name: $r.instance_name,
            timeout: $r.timeout,
            oldest: $r.oldest_content_accepted,
            uris: $r.uris,
            qualifiers: $r.qualifiers,
            digest_function: $r.digest_function,
        }
    };
}

/// A push's fields, whichever kind.
struct PushArgs {
    instance_name: String,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    expire_at: Option<prost_types::Timestamp>,
    digest: Option<kiln_proto::reapi::Digest>,
    digest_function: i32,
}

impl AssetService {
    /// Checks the caller for `path`, then fetches `args` of `kind` inside a span.
    async fn serve_fetch<T>(
        &self,
        request: Request<T>,
        path: &'static str,
        kind: Kind,
        args: impl FnOnce(T) -> FetchArgs,
    ) -> Result<Answer, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let args = args(message);
        let caller = Request::from_parts(metadata, extensions, ());
        auth::check(&caller, path, Some(&args.instance_name))?;
        let span = tracing::debug_span!("Fetch", path, instance = %args.instance_name, uris = args.uris.len());
        let outcome = self
            .fetch(kind, args)
            .instrument(span)
            .await
            .map_err(|e| e.status())?;
        Ok(match outcome {
            Ok((uri, digest)) => Answer {
                status: Some(RpcStatus::default()),
                uri,
                digest_function: digest.function.proto() as i32,
                digest: Some(digest.to_proto()),
            },
            Err((uri, status)) => Answer {
                status: Some(status),
                uri,
                digest_function: 0,
                digest: None,
            },
        })
    }

    /// Checks the caller for `path`, then records the push of `args` of `kind` inside a span.
    async fn serve_push<T>(
        &self,
        request: Request<T>,
        path: &'static str,
        kind: Kind,
        args: impl FnOnce(T) -> PushArgs,
    ) -> Result<(), Status> {
        let (metadata, extensions, message) = request.into_parts();
        let a = args(message);
        let caller = Request::from_parts(metadata, extensions, ());
        auth::check(&caller, path, Some(&a.instance_name))?;
        let span = tracing::debug_span!("Push", path, instance = %a.instance_name);
        async {
            let digest = Digest::from_proto_field(a.digest.as_ref(), a.digest_function)?;
            self.push(
                kind,
                &a.instance_name,
                &a.uris,
                &a.qualifiers,
                a.expire_at,
                digest,
            )
            .await
        }
        .instrument(span)
        .await
        .map_err(|e: AssetError| e.status())
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let a = self
            .serve_fetch(request, auth::paths::FETCH_BLOB, Kind::Blob, |r| {
                fetch_args!(r)
            })
            .await?;
        Ok(Response::new(FetchBlobResponse {
            status: a.status,
            uri: a.uri,
            qualifiers: Vec::new(),
            expires_at: None,
            digest_function: a.digest_function,
            blob_digest: a.digest,
        }))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let a = self
            .serve_fetch(
                request,
                auth::paths::FETCH_DIRECTORY,
                Kind::Directory,
                |r| fetch_args!(r),
            )
            .await?;
        Ok(Response::new(FetchDirectoryResponse {
            status: a.status,
            uri: a.uri,
            qualifiers: Vec::new(),
            expires_at: None,
            digest_function: a.digest_function,
            root_directory_digest: a.digest,
        }))
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        self.serve_push(request, auth::paths::PUSH_BLOB, Kind::Blob, |r| PushArgs {
            instance_name: r.instance_name,
            uris: r.uris,
            qualifiers: r.qualifiers,
            expire_at: r.expire_at,
            digest: r.blob_digest,
            digest_function: r.digest_function,
        })
        .await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        self.serve_push(request, auth::paths::PUSH_DIRECTORY, Kind::Directory, |r| {
            PushArgs {
                instance_name: r.instance_name,
                uris: r.uris,
                qualifiers: r.qualifiers,
                expire_at: r.expire_at,
                digest: r.root_directory_digest,
                digest_function: r.digest_function,
            }
        })
        .await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
