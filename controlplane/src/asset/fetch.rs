//! `Fetch` from origin: each URL tried in turn within one timeout, a blob stored as downloaded,
//! a directory unpacked from its archive, the result remembered.

use super::attempt::{AttemptArgs, AttemptKey, Attempted};
use super::download::FetchFailure;
use super::remember::Trust;
use super::unpack;
use super::{
    check_sizes, credentials, AssetError, AssetService, FetchArgs, Key, Kind, Outcome, Qualifiers,
};
use crate::temp_file::TempFile;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use kiln_reapi::status::Classify;
use std::time::{Duration, SystemTime};

/// Attempts of one URI a fetch joins at most (each one another call started that ran out of
/// that call's time).
const MAX_JOINS: usize = 8;

impl AssetService {
    pub(super) async fn fetch(&self, kind: Kind, args: FetchArgs) -> Result<Outcome, AssetError> {
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
        let key = |uri: &str, credentials| Key {
            instance: instance.clone(),
            kind,
            uri: uri.to_string(),
            selectors: selectors.clone(),
            credentials,
        };
        let sent = |index: usize, uri: &str| credentials(&qualifiers.headers_for(index, uri));
        for (index, uri) in args.uris.iter().enumerate() {
            // Made with credentials: only for the same ones, first. Made without (downloaded
            // in public, or pushed): anyone's, but a fetch that sends credentials takes a
            // public download only when it matches a checksum the fetch asks for.
            let tries = match sent(index, uri) {
                Some(c) => vec![(Some(c), Trust::Any), (None, Trust::Public)],
                None => vec![(None, Trust::Any)],
            };
            for (credentials, trust) in tries {
                let key = key(uri, credentials);
                if let Some(digest) = self
                    .remembered(&key, function, oldest, &qualifiers.sri, trust, deadline)
                    .await?
                {
                    return Ok(Ok((uri.clone(), digest)));
                }
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
        let timed_out = |uri: &String| {
            let failure = FetchFailure::Timeout {
                url: uri.clone(),
                secs: timeout.as_secs(),
            };
            Some((uri.clone(), failure.rpc_status()))
        };
        for (index, uri) in args.uris.iter().enumerate() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                last = timed_out(uri);
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
            let args = || AttemptArgs {
                id: AttemptKey {
                    key: key(uri, sent(index, uri)),
                    function,
                    sri: qualifiers.sri.clone(),
                },
                headers: qualifiers.headers_for(index, uri),
                archive,
                subdir: qualifiers.selectors.get("directory").cloned(),
                deadline,
            };
            // The download runs as a task of its own, shared with identical fetches; this call
            // waits for it within its own timeout (the download goes on, and is remembered,
            // however this call ends). One that another call started and that ran out of that
            // call's shorter time is tried again within this one's.
            let mut attempted = None;
            for _ in 0..MAX_JOINS {
                match tokio::time::timeout_at(deadline.into(), self.attempt(args())).await {
                    Err(_) => break,
                    Ok(a) if a.timed_out() && std::time::Instant::now() < deadline => {}
                    Ok(a) => {
                        attempted = Some(a);
                        break;
                    }
                }
            }
            match attempted {
                None | Some(Attempted::NoPlace) => {
                    last = timed_out(uri);
                    break;
                }
                Some(Attempted::Stored(digest)) => return Ok(Ok((uri.clone(), digest))),
                Some(Attempted::Failed(status)) => last = Some((uri.clone(), status)),
                Some(Attempted::Local(e)) => return Err(AssetError::Shared(e)),
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
    pub(super) async fn unpack(
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
}
