//! Associations remembered: a fetch answered from one while it is young enough, unexpired,
//! its content still stored (a directory's whole tree) and matching the checksum asked for.

use super::download::SriHashers;
use super::qualifiers::SriAlgorithm;
use super::{AssetError, AssetService, Key, Kind, Sri};
use crate::temp_file::TempFile;
use kiln_reapi::cas::CasError;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use kiln_reapi::walk::{walk, WalkError, WalkLimits};
use std::time::SystemTime;

/// Which associations may answer a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trust {
    /// Any (the association's key already holds the fetch's credentials, or it sent none).
    Any,
    /// For a fetch that sends credentials, one made without them: only a pushed one, or one
    /// that matches a checksum the fetch asks for (a public download of a private URL may
    /// have been a login page).
    Public,
}

/// Why a remembered tree could not be walked.
enum TreeCheck {
    Cas(CasError),
    Tree,
}

impl From<WalkError> for TreeCheck {
    fn from(_: WalkError) -> TreeCheck {
        TreeCheck::Tree
    }
}

impl AssetService {
    /// The digest remembered under `key`, if it is still good: the same function, not
    /// expired, not older than `oldest`, still in the CAS (a directory's whole tree), and
    /// matching `sri` when given (or, as `trust` says, required); checked by `deadline`.
    pub(super) async fn remembered(
        &self,
        key: &Key,
        function: DigestFunction,
        oldest: Option<SystemTime>,
        sri: &[Sri],
        trust: Trust,
        deadline: std::time::Instant,
    ) -> Result<Option<Digest>, AssetError> {
        let Some(a) = self.known.get(key).await else {
            return Ok(None);
        };
        let now = SystemTime::now();
        if a.digest.function != function
            || a.expires.is_some_and(|e| e <= now)
            || oldest.is_some_and(|o| a.at < o)
            || (trust == Trust::Public && !a.pushed && sri.is_empty())
        {
            return Ok(None);
        }
        let stored = match key.kind {
            Kind::Blob => self
                .cas
                .find_missing(&key.instance, &[a.digest])
                .await?
                .is_empty(),
            Kind::Directory => {
                // A few trees checked at once (each walk holds its tree's digests), within
                // the fetch's time; without a turn, the fetch goes on to the origin.
                let turn = tokio::time::timeout_at(
                    deadline.into(),
                    self.tree_checks.clone().acquire_owned(),
                );
                let Ok(Ok(_turn)) = turn.await else {
                    return Ok(None);
                };
                self.tree_stored(&key.instance, a.digest).await?
            }
        };
        if !stored {
            self.known.invalidate(key).await;
            return Ok(None);
        }
        // No checksum asked for (a public association for a credentialed fetch got here only
        // if pushed), or one it is known to match.
        if sri.is_empty() || sri.iter().any(|s| a.sri.contains(s)) {
            return Ok(Some(a.digest));
        }
        // Checksums it was never checked against: check the stored bytes (blobs only), once.
        if key.kind == Kind::Blob {
            let matches = self.matches_sri(&key.instance, a.digest, sri, deadline);
            if let Some(matched) = matches.await? {
                // Added only to the association read, if it is still the one remembered (a
                // push may have replaced it meanwhile).
                let (digest, at) = (a.digest, a.at);
                self.known
                    .entry(key.clone())
                    .and_compute_with(|current| async move {
                        use moka::ops::compute::Op;
                        match current.map(|e| e.into_value()) {
                            Some(mut known) if known.digest == digest && known.at == at => {
                                if !known.sri.contains(&matched) {
                                    known.sri.push(matched);
                                }
                                Op::Put(known)
                            }
                            _ => Op::Nop,
                        }
                    })
                    .await;
                return Ok(Some(a.digest));
            }
        }
        Ok(None)
    }

    /// Whether every directory and file of the tree under `root` is stored (each found one
    /// counts as used, as the spec asks of a served association). A tree that does not walk
    /// within the bounds of an action's input tree (which is what it is for) is taken for not
    /// stored.
    async fn tree_stored(&self, instance: &InstanceName, root: Digest) -> Result<bool, AssetError> {
        let limits = WalkLimits {
            batch_bytes: 16 << 20,
            ..WalkLimits::DEFAULT
        };
        let cas = &self.cas;
        let walked = walk(
            root,
            limits,
            |batch| async move {
                cas.read_blobs(instance, &batch)
                    .await
                    .map_err(TreeCheck::Cas)
            },
            |_, _, _| Ok(()),
        )
        .await;
        let walked = match walked {
            Ok(w) => w,
            Err(TreeCheck::Tree) => return Ok(false),
            Err(TreeCheck::Cas(e)) => return Err(e.into()),
        };
        if !walked.missing.is_empty() {
            return Ok(false);
        }
        Ok(self
            .cas
            .find_missing(instance, &walked.files)
            .await?
            .is_empty())
    }

    /// The one of `sri` that the stored blob `digest` matches, if any. A SHA-256 checksum of
    /// a SHA-256 blob is its digest; others need the bytes hashed again, one fetch's place
    /// taken for it (a stream of made-up checksums costs no more than as many fetches), if
    /// one comes by `deadline` (else no match: the fetch goes on to the origin, within the
    /// same time).
    async fn matches_sri(
        &self,
        instance: &InstanceName,
        digest: Digest,
        sri: &[Sri],
        deadline: std::time::Instant,
    ) -> Result<Option<Sri>, AssetError> {
        if digest.function == DigestFunction::Sha256 {
            let own = sri
                .iter()
                .find(|s| s.algorithm == SriAlgorithm::Sha256 && s.hash == digest.hash);
            if let Some(s) = own {
                return Ok(Some(s.clone()));
            }
            if sri.iter().all(|s| s.algorithm == SriAlgorithm::Sha256) {
                return Ok(None);
            }
        }
        let place = tokio::time::timeout_at(deadline.into(), self.fetches.clone().acquire_owned());
        let _place = match place.await {
            Ok(permit) => permit.map_err(|_| AssetError::Off)?,
            Err(_) => return Ok(None),
        };
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
}
