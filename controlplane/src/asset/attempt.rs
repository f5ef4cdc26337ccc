//! One download from origin — a place among `concurrent_fetches`, the download, storing (or
//! unpacking) it and remembering the association — run as a task of its own and shared:
//! identical fetches in progress at once (ten builds asking for the same archive) make one
//! download, and a fetch whose call ends first (cancelled, or past its own timeout) still
//! finishes and is remembered for the next one, as the spec asks ("the server SHOULD keep
//! the fetch going after the RPC completes").

use super::download::{self, Download, FetchFailure};
use super::unpack;
use super::{AssetError, AssetService, Association, Key, Sri};
use crate::temp_file::TempFile;
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_reapi::digest::{Digest, DigestFunction};
use kiln_reapi::status::Classify;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What makes two fetches the same download: where the result is remembered (instance,
/// kind, URI, selectors, the credentials sent), the digest function and the checksums the
/// download is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct AttemptKey {
    pub(super) key: Key,
    pub(super) function: DigestFunction,
    pub(super) sri: Vec<Sri>,
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub(super) enum Attempted {
    /// Stored (and remembered) as this digest.
    Stored(Digest),
    /// The origin's failure, for the response's `status`.
    Failed(RpcStatus),
    /// No place among `concurrent_fetches` before the deadline.
    NoPlace,
    /// A failure of the server's own (the call's error).
    Local(Arc<AssetError>),
}

impl Attempted {
    /// Whether it ended for want of time (the deadline of the call that started it).
    pub(super) fn timed_out(&self) -> bool {
        match self {
            Attempted::NoPlace => true,
            Attempted::Failed(status) => status.code == tonic::Code::DeadlineExceeded as i32,
            _ => false,
        }
    }
}

/// An attempt in progress, awaited by every fetch that asked for it.
pub(super) type SharedAttempt = Shared<BoxFuture<'static, Attempted>>;

/// Everything an attempt needs, owned (it outlives the call that started it).
pub(super) struct AttemptArgs {
    pub(super) id: AttemptKey,
    pub(super) headers: Vec<(String, String)>,
    /// The archive to unpack, for a directory.
    pub(super) archive: Option<unpack::ArchiveKind>,
    pub(super) subdir: Option<String>,
    pub(super) deadline: Instant,
}

impl AssetService {
    /// The attempt of `args.id` in progress, or a new one started.
    pub(super) fn attempt(&self, args: AttemptArgs) -> SharedAttempt {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = attempts.get(&args.id) {
            return running.clone();
        }
        let id = args.id.clone();
        let service = self.clone();
        let task = tokio::spawn(async move {
            let id = args.id.clone();
            let attempted = service.run_attempt(args).await;
            service
                .attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            attempted
        });
        let shared = async move {
            task.await.unwrap_or_else(|e| {
                Attempted::Local(Arc::new(AssetError::Io {
                    op: "fetch",
                    source: std::io::Error::other(e),
                }))
            })
        }
        .boxed()
        .shared();
        attempts.insert(id, shared.clone());
        shared
    }

    async fn run_attempt(&self, args: AttemptArgs) -> Attempted {
        let AttemptArgs {
            id,
            headers,
            archive,
            subdir,
            deadline,
        } = args;
        let uri = id.key.uri.clone();
        // The permit and the temp file go with the download: it holds its place until done.
        let place = tokio::time::timeout_at(deadline.into(), self.fetches.clone().acquire_owned());
        let permit = match place.await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Attempted::Local(Arc::new(AssetError::Off)),
            Err(_) => return Attempted::NoPlace,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let temp = TempFile(self.settings.layout.temp_path());
        let download = Download {
            url: uri.clone(),
            headers,
            timeout: left.max(Duration::from_millis(1)),
            max_bytes: self.settings.max_bytes,
            max_redirects: self.settings.max_redirects,
            function: id.function,
            sri: id.sri.clone(),
            dest: temp.0.clone(),
            fetch_loopback: self.settings.fetch_loopback,
            fetch_private_networks: self.settings.fetch_private_networks,
            proxy: self.settings.proxy.clone(),
        };
        let started = SystemTime::now();
        // An archive to unpack keeps the place through its unpacking.
        let downloaded = tokio::task::spawn_blocking(move || {
            let result = download::download(&download);
            (temp, result, permit)
        })
        .await;
        let (temp, result, permit) = match downloaded {
            Ok(d) => d,
            Err(e) => {
                return Attempted::Local(Arc::new(AssetError::Io {
                    op: "download",
                    source: std::io::Error::other(e),
                }))
            }
        };
        let local = |e: AssetError| Attempted::Local(Arc::new(e));
        let got = match result {
            // A failure here, not at the origin: the call's error.
            Err(FetchFailure::Local { source, .. }) => {
                return local(AssetError::Io {
                    op: "store the download",
                    source,
                })
            }
            Err(failure) => {
                tracing::debug!(%uri, error = %failure, "fetch from origin failed");
                return Attempted::Failed(failure.rpc_status());
            }
            Ok(got) => got,
        };
        let instance = &id.key.instance;
        let digest = match archive {
            None => {
                if let Err(e) = self.cas.write_file(instance, got.digest, &temp.0).await {
                    return local(e.into());
                }
                got.digest
            }
            Some(archive) => {
                let unpacked = self
                    .unpack(
                        instance,
                        (temp, permit),
                        archive,
                        id.function,
                        subdir,
                        deadline,
                    )
                    .await;
                match unpacked {
                    Ok(Ok(root)) => root,
                    Ok(Err(refused)) => return Attempted::Failed(refused.rpc_status()),
                    Err(e) => return local(e),
                }
            }
        };
        // Its age counts from when the retrieval started, as the spec measures.
        let association = Association {
            digest,
            at: started,
            expires: None,
            sri: got.sri_ok,
            pushed: false,
        };
        self.known.insert(id.key.clone(), association).await;
        tracing::debug!(%uri, ?digest, "fetched from origin");
        Attempted::Stored(digest)
    }
}
