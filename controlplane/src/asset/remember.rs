//! Associations remembered: a fetch answered from one while it is young enough, unexpired,
//! its content still stored and matching the checksum asked for.

use super::download::SriHashers;
use super::{AssetError, AssetService, Key, Kind, Sri};
use crate::temp_file::TempFile;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use std::time::SystemTime;

impl AssetService {
    /// The digest remembered under `key`, if it is still good: the same function, not
    /// expired, not older than `oldest`, still in the CAS, and matching `sri` when given.
    pub(super) async fn remembered(
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
        if !self
            .cas
            .find_missing(&key.instance, &[a.digest])
            .await?
            .is_empty()
        {
            self.known.invalidate(key).await;
            return Ok(None);
        }
        if sri.is_empty() || sri.iter().any(|s| a.sri.contains(s)) {
            return Ok(Some(a.digest));
        }
        // Checksums it was never checked against: check the stored bytes (blobs only), once.
        if key.kind == Kind::Blob {
            if let Some(matched) = self.matches_sri(&key.instance, a.digest, sri).await? {
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
}
