//! The Remote Asset API (`build.bazel.remote.asset.v1`), through the [`Cas`] trait. `Fetch`
//! answers from associations it remembers (URI and selecting qualifiers to a digest, fetched
//! or pushed) while their content is still in the CAS, and otherwise downloads blobs from
//! `http(s)` URLs ([`download`]) into the CAS, checked against `checksum.sri`; a directory is a
//! tar or tar.gz unpacked into the CAS as a tree ([`unpack`]). `Push` records associations for
//! content already in the CAS (zips and repositories must be pushed: Kiln unpacks neither).
//! Associations live in memory (bounded); after a restart a fetch goes to origin again.

mod download;
mod qualifiers;
mod unpack;

pub use qualifiers::{QualifierError, Qualifiers, Sri};

use crate::auth;
use download::{Download, FetchFailure, SriHashers};
use kiln_dataplane::store::layout::Layout;
use kiln_proto::asset::fetch_server::Fetch;
use kiln_proto::asset::push_server::Push;
use kiln_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use kiln_proto::google::rpc::{bad_request, BadRequest, Status as RpcStatus};
use kiln_reapi::cas::{Cas, CasError};
use kiln_reapi::digest::{Digest, DigestError, DigestFunction, InstanceName, InstanceNameError};
use kiln_reapi::status::{any, Classify, ErrorKind};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Why a call failed (a gRPC error, as opposed to a fetch that failed, which goes in the
/// response's `status`).
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// A qualifier.
    #[error(transparent)]
    Qualifier(#[from] QualifierError),
    /// No URI.
    #[error("the request names no URI")]
    NoUris,
    /// Too many URIs, or one too long, or qualifiers too long.
    #[error("{0}")]
    TooLong(String),
    /// A digest or digest function.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// The instance name.
    #[error(transparent)]
    Instance(#[from] InstanceNameError),
    /// A timeout or timestamp that is not one.
    #[error("{0}")]
    Time(&'static str),
    /// Pushed content that is not in the CAS.
    #[error("{0:?} is not in the CAS: upload it before pushing it")]
    NotInCas(Digest),
    /// The service is turned off.
    #[error("the Remote Asset API is turned off on this server (remote_asset.enabled = false)")]
    Off,
    /// The CAS failed.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// Local I/O.
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for AssetError {
    fn kind(&self) -> ErrorKind {
        match self {
            AssetError::Qualifier(_)
            | AssetError::NoUris
            | AssetError::TooLong(_)
            | AssetError::Digest(_)
            | AssetError::Instance(_)
            | AssetError::Time(_)
            | AssetError::NotInCas(_) => ErrorKind::Invalid,
            AssetError::Off => ErrorKind::Unsupported,
            AssetError::Cas(e) => e.kind(),
            AssetError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    fn client_message(&self) -> String {
        match self {
            AssetError::Cas(e) => e.client_message(),
            AssetError::Io { op, source } => format!("the server could not {op}: {source}"),
            other => other.to_string(),
        }
    }

    /// An unsupported qualifier is named in a `BadRequest`, as the spec asks.
    fn details(&self) -> Vec<prost_types::Any> {
        match self {
            AssetError::Qualifier(QualifierError::Unsupported(names)) => vec![any(
                "google.rpc.BadRequest",
                &BadRequest {
                    field_violations: names
                        .iter()
                        .map(|name| bad_request::FieldViolation {
                            field: "qualifiers.name".into(),
                            description: format!("\"{name}\" not supported"),
                            ..Default::default()
                        })
                        .collect(),
                },
            )],
            _ => Vec::new(),
        }
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct AssetSettings {
    /// `remote_asset.enabled`.
    pub enabled: bool,
    /// `remote_asset.fetch_from_origin`.
    pub fetch_from_origin: bool,
    /// `remote_asset.default_fetch_secs`.
    pub default_timeout: Duration,
    /// `remote_asset.max_fetch_secs`.
    pub max_timeout: Duration,
    /// `remote_asset.max_fetch_bytes`.
    pub max_bytes: u64,
    /// `remote_asset.max_redirects`.
    pub max_redirects: u32,
    /// `remote_asset.concurrent_fetches`.
    pub concurrent_fetches: usize,
    /// `remote_asset.memory_bytes`: what remembered associations may take.
    pub memory_bytes: u64,
    /// `remote_asset.fetch_loopback`.
    pub fetch_loopback: bool,
    /// `remote_asset.fetch_private_networks`.
    pub fetch_private_networks: bool,
    /// The CAS's layout: downloads go to its temp directories, so they are linked in.
    pub layout: Layout,
}

/// Blob or directory: the two namespaces of associations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Blob,
    Directory,
}

/// What an association is remembered under.
type Key = (InstanceName, Kind, String, Vec<(String, String)>);

/// What a URI (with its selecting qualifiers) stands for.
#[derive(Debug, Clone)]
struct Association {
    digest: Digest,
    /// When it was fetched or pushed.
    at: SystemTime,
    /// A pushed association's own expiry.
    expires: Option<SystemTime>,
    /// Checksums it is known to match (verified when fetched, trusted when pushed).
    sri: Vec<Sri>,
}

/// The fields a `FetchBlobRequest` and a `FetchDirectoryRequest` share.
struct FetchArgs {
    instance_name: String,
    timeout: Option<prost_types::Duration>,
    oldest: Option<prost_types::Timestamp>,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    digest_function: i32,
}

/// What a fetch found: the URI and digest, or the URI and why not.
type Outcome = Result<(String, Digest), (String, RpcStatus)>;

/// The service.
pub struct AssetService {
    cas: Arc<dyn Cas>,
    settings: AssetSettings,
    known: moka::future::Cache<Key, Association>,
    fetches: Arc<Semaphore>,
}

/// Most URIs in one request, and the longest URI and qualifiers: an association is kept per
/// URI, under its text and its qualifiers.
const MAX_URIS: usize = 64;
const MAX_URI_BYTES: usize = 8 << 10;
const MAX_QUALIFIER_BYTES: usize = 8 << 10;

impl AssetService {
    /// A service over `cas`.
    pub fn new(cas: Arc<dyn Cas>, settings: AssetSettings) -> AssetService {
        AssetService {
            cas,
            known: moka::future::Cache::builder()
                .max_capacity(settings.memory_bytes)
                .weigher(|k: &Key, _: &Association| {
                    let selectors: usize = k.3.iter().map(|(n, v)| n.len() + v.len()).sum();
                    u32::try_from(k.2.len() + selectors + 256).unwrap_or(u32::MAX)
                })
                .build(),
            fetches: Arc::new(Semaphore::new(settings.concurrent_fetches.max(1))),
            settings,
        }
    }

    async fn fetch(&self, kind: Kind, args: FetchArgs) -> Result<Outcome, AssetError> {
        if !self.settings.enabled {
            return Err(AssetError::Off);
        }
        let instance = InstanceName::new(&args.instance_name)?;
        check_sizes(&args.uris, &args.qualifiers)?;
        // Unset: SHA-256, as the spec says.
        let function = DigestFunction::from_request(args.digest_function, 64)?;
        let qualifiers = Qualifiers::parse(&args.qualifiers, args.uris.len())?;
        let oldest = args
            .oldest
            .map(|t| {
                SystemTime::try_from(t)
                    .map_err(|_| AssetError::Time("oldest_content_accepted is not a time"))
            })
            .transpose()?;
        // The whole fetch, every mirror tried, within one timeout (at least a second).
        let timeout = match args.timeout {
            None => self.settings.default_timeout,
            Some(t) => Duration::try_from(t)
                .map_err(|_| AssetError::Time("timeout is negative or out of range"))?
                .clamp(Duration::from_secs(1), self.settings.max_timeout),
        };
        let deadline = std::time::Instant::now() + timeout;
        let selectors: Vec<(String, String)> = qualifiers.selectors.clone().into_iter().collect();
        let key = |uri: &str| (instance.clone(), kind, uri.to_string(), selectors.clone());
        for uri in &args.uris {
            if let Some(digest) = self
                .remembered(&key(uri), function, oldest, &qualifiers.sri)
                .await?
            {
                return Ok(Ok((uri.clone(), digest)));
            }
        }
        let not_found = |why: &str| {
            Ok(Err((
                args.uris[0].clone(),
                RpcStatus {
                    code: tonic::Code::NotFound as i32,
                    message: why.to_string(),
                    details: Vec::new(),
                },
            )))
        };
        if !self.settings.fetch_from_origin {
            return not_found("nothing was pushed for these URIs and qualifiers (remote_asset.fetch_from_origin = false)");
        }
        if !qualifiers.fetchable(kind == Kind::Directory) {
            return not_found("nothing was pushed for these URIs and qualifiers, and a download cannot satisfy their vcs (or, for a blob, directory) qualifiers");
        }
        let mut last = None;
        for (index, uri) in args.uris.iter().enumerate() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                last = Some((
                    uri.clone(),
                    FetchFailure::Timeout {
                        url: uri.clone(),
                        secs: timeout.as_secs(),
                    }
                    .rpc_status(),
                ));
                break;
            }
            if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                last = Some((
                    uri.clone(),
                    RpcStatus {
                        code: tonic::Code::NotFound as i32,
                        message: format!(
                            "{uri} is not an http or https URL, and nothing was pushed for it"
                        ),
                        details: Vec::new(),
                    },
                ));
                continue;
            }
            // A directory comes from an archive Kiln can unpack.
            let archive = match kind {
                Kind::Blob => None,
                Kind::Directory => match unpack::ArchiveKind::of(
                    uri,
                    qualifiers
                        .selectors
                        .get("resource_type")
                        .map(String::as_str),
                ) {
                    Some(a) => Some(a),
                    None => {
                        last = Some((
                            uri.clone(),
                            RpcStatus {
                                code: tonic::Code::NotFound as i32,
                                message: format!("{uri} is not a tar or tar.gz archive (by its resource_type or its name), the directories Kiln can fetch"),
                                details: Vec::new(),
                            },
                        ));
                        continue;
                    }
                },
            };
            // The permit and the temp file go with the download: a call cancelled while it
            // runs neither frees its place early nor leaves its file behind.
            let permit = self
                .fetches
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| AssetError::Off)?;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let temp = TempFile(self.settings.layout.temp_path());
            let download = Download {
                url: uri.clone(),
                headers: qualifiers.headers_for(index, uri),
                timeout: left.max(Duration::from_millis(1)),
                max_bytes: self.settings.max_bytes,
                max_redirects: self.settings.max_redirects,
                function,
                sri: qualifiers.sri.clone(),
                dest: temp.0.clone(),
                fetch_loopback: self.settings.fetch_loopback,
                fetch_private_networks: self.settings.fetch_private_networks,
            };
            let started = SystemTime::now();
            // An archive to unpack keeps the place through its unpacking.
            let (temp, result, permit) = tokio::task::spawn_blocking(move || {
                let result = download::download(&download);
                (temp, result, permit)
            })
            .await
            .map_err(|e| AssetError::Io {
                op: "download",
                source: std::io::Error::other(e),
            })?;
            match result {
                // A failure here, not at the origin: the call's error.
                Err(FetchFailure::Local { source, .. }) => {
                    return Err(AssetError::Io {
                        op: "store the download",
                        source,
                    })
                }
                Ok(got) => {
                    let digest = match archive {
                        None => {
                            self.cas.write_file(&instance, got.digest, &temp.0).await?;
                            got.digest
                        }
                        Some(archive) => {
                            let subdir = qualifiers.selectors.get("directory").cloned();
                            match self
                                .unpack(
                                    &instance,
                                    (temp, permit),
                                    archive,
                                    function,
                                    subdir,
                                    deadline,
                                )
                                .await?
                            {
                                Ok(root) => root,
                                Err(failure) => {
                                    last = Some((uri.clone(), failure.rpc_status()));
                                    continue;
                                }
                            }
                        }
                    };
                    // Its age counts from when the retrieval started, as the spec measures.
                    let association = Association {
                        digest,
                        at: started,
                        expires: None,
                        sri: got.sri_ok,
                    };
                    self.known.insert(key(uri), association).await;
                    tracing::debug!(%uri, ?digest, "fetched from origin");
                    return Ok(Ok((uri.clone(), digest)));
                }
                Err(failure) => {
                    tracing::debug!(%uri, error = %failure, "fetch from origin failed");
                    last = Some((uri.clone(), failure.rpc_status()));
                }
            }
        }
        Ok(Err(last.unwrap_or_else(|| {
            (
                args.uris[0].clone(),
                FetchFailure::Transport {
                    url: args.uris[0].clone(),
                    why: "no URL was tried".into(),
                }
                .rpc_status(),
            )
        })))
    }

    /// Unpacks the downloaded `archive` into the CAS: its files, then its directories (a tree
    /// is stored bottom up: a `Directory` is visible only once what it names is). The root's
    /// digest, or why the archive was refused.
    async fn unpack(
        &self,
        instance: &InstanceName,
        (archive, permit): (TempFile, tokio::sync::OwnedSemaphorePermit),
        kind: unpack::ArchiveKind,
        function: DigestFunction,
        subdir: Option<String>,
        deadline: std::time::Instant,
    ) -> Result<Result<Digest, unpack::UnpackError>, AssetError> {
        let (layout, max) = (self.settings.layout.clone(), self.settings.max_bytes);
        let unpacked = tokio::task::spawn_blocking(move || {
            let temp = || layout.temp_path();
            let result = unpack::unpack(
                &archive.0,
                kind,
                function,
                max,
                &temp,
                subdir.as_deref(),
                deadline,
            );
            drop((archive, permit));
            result
        })
        .await
        .map_err(|e| AssetError::Io {
            op: "unpack",
            source: std::io::Error::other(e),
        })?;
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(unpack::UnpackError::Local(source)) => {
                return Err(AssetError::Io {
                    op: "unpack the archive",
                    source,
                })
            }
            Err(refused) => return Ok(Err(refused)),
        };
        for (digest, file) in &unpacked.files {
            self.cas.write_file(instance, *digest, &file.0).await?;
        }
        for batch in unpacked.directories.chunks(1000) {
            self.cas.write_blobs(instance, batch.to_vec()).await?;
        }
        Ok(Ok(unpacked.root))
    }

    /// The digest remembered under `key`, if it is still good: the same function, not
    /// expired, not older than `oldest`, still in the CAS, and matching `sri` when given.
    async fn remembered(
        &self,
        key: &Key,
        function: DigestFunction,
        oldest: Option<SystemTime>,
        sri: &[Sri],
    ) -> Result<Option<Digest>, AssetError> {
        let Some(a) = self.known.get(key).await else {
            return Ok(None);
        };
        let now = SystemTime::now();
        if a.digest.function != function
            || a.expires.is_some_and(|e| e <= now)
            || oldest.is_some_and(|o| a.at < o)
        {
            return Ok(None);
        }
        if !self.cas.find_missing(&key.0, &[a.digest]).await?.is_empty() {
            self.known.invalidate(key).await;
            return Ok(None);
        }
        if sri.is_empty() || sri.iter().any(|s| a.sri.contains(s)) {
            return Ok(Some(a.digest));
        }
        // Checksums it was never checked against: check the stored bytes (blobs only), once.
        if key.1 == Kind::Blob {
            if let Some(matched) = self.matches_sri(&key.0, a.digest, sri).await? {
                let mut known = a.clone();
                known.sri.push(matched);
                self.known.insert(key.clone(), known).await;
                return Ok(Some(a.digest));
            }
        }
        Ok(None)
    }

    /// The one of `sri` that the stored blob `digest` matches, if any.
    async fn matches_sri(
        &self,
        instance: &InstanceName,
        digest: Digest,
        sri: &[Sri],
    ) -> Result<Option<Sri>, AssetError> {
        let temp = TempFile(self.settings.layout.temp_path());
        if !self.cas.read_to_file(instance, digest, &temp.0).await? {
            return Ok(None);
        }
        let (path, wanted) = (temp.0.clone(), sri.to_vec());
        let computed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Sri>> {
            use std::io::Read;
            let mut hashers = SriHashers::for_(&wanted);
            let mut file = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok(hashers.finish());
                }
                hashers.update(&buf[..n]);
            }
        })
        .await
        .map_err(|e| AssetError::Io {
            op: "check a checksum",
            source: std::io::Error::other(e),
        })?
        .map_err(|source| AssetError::Io {
            op: "check a checksum",
            source,
        })?;
        Ok(sri.iter().find(|s| computed.contains(s)).cloned())
    }

    async fn push(
        &self,
        kind: Kind,
        instance_name: &str,
        uris: &[String],
        qualifiers: &[Qualifier],
        expire_at: Option<prost_types::Timestamp>,
        digest: Digest,
    ) -> Result<(), AssetError> {
        if !self.settings.enabled {
            return Err(AssetError::Off);
        }
        let instance = InstanceName::new(instance_name)?;
        check_sizes(uris, qualifiers)?;
        let qualifiers = Qualifiers::parse(qualifiers, uris.len())?;
        let expires = expire_at
            .map(|t| {
                SystemTime::try_from(t).map_err(|_| AssetError::Time("expire_at is not a time"))
            })
            .transpose()?;
        if !self
            .cas
            .find_missing(&instance, &[digest])
            .await?
            .is_empty()
        {
            return Err(AssetError::NotInCas(digest));
        }
        let selectors: Vec<(String, String)> = qualifiers.selectors.into_iter().collect();
        for uri in uris {
            let association = Association {
                digest,
                at: SystemTime::now(),
                expires,
                sri: qualifiers.sri.clone(),
            };
            self.known
                .insert(
                    (instance.clone(), kind, uri.clone(), selectors.clone()),
                    association,
                )
                .await;
        }
        Ok(())
    }
}

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

/// Refuses requests without URIs, with too many, or with URIs or qualifiers too long to
/// remember.
fn check_sizes(uris: &[String], qualifiers: &[Qualifier]) -> Result<(), AssetError> {
    if uris.is_empty() {
        return Err(AssetError::NoUris);
    }
    if uris.len() > MAX_URIS {
        return Err(AssetError::TooLong(format!(
            "{} URIs; at most {MAX_URIS}",
            uris.len()
        )));
    }
    if let Some(u) = uris.iter().find(|u| u.len() > MAX_URI_BYTES) {
        return Err(AssetError::TooLong(format!(
            "a URI of {} bytes; at most {MAX_URI_BYTES}",
            u.len()
        )));
    }
    let bytes: usize = qualifiers
        .iter()
        .map(|q| q.name.len() + q.value.len())
        .sum();
    if bytes > MAX_QUALIFIER_BYTES {
        return Err(AssetError::TooLong(format!(
            "{bytes} bytes of qualifiers; at most {MAX_QUALIFIER_BYTES}"
        )));
    }
    Ok(())
}

/// Removes a temp file when dropped.
pub(super) struct TempFile(pub(super) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
