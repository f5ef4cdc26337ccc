//! Blobs downloaded into files, hashed as they arrive: one stream, or parallel ranges on
//! connections of their own for large blobs.

use super::{mismatch, remote, RemoteCas, MIN_RANGE};
use crate::link::LinkChannel as Channel;
use futures::StreamExt;
use kiln_reapi::cas::CasError;
use kiln_reapi::digest::{Digest, Hasher, InstanceName};
use std::path::Path;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

impl RemoteCas {
    /// Downloads a blob into a new file at `path`, verifying it; NOT_FOUND when the server
    /// lacks it. A large blob comes in parallel ranges.
    pub(super) async fn download(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
    ) -> Result<(), CasError> {
        match self.ranges_for(digest.size) {
            0 | 1 => self.download_stream(instance, digest, path).await,
            n => self.download_ranges(instance, digest, path, n).await,
        }
    }

    /// How many ranges a blob of `size` bytes is downloaded in.
    pub(super) fn ranges_for(&self, size: u64) -> usize {
        if size < self.links.ranged_min {
            return 1;
        }
        let most = usize::try_from(size / MIN_RANGE).unwrap_or(usize::MAX);
        self.links.ranges.len().min(most)
    }

    /// Streams a blob into a new file at `path`, hashing it as it arrives.
    pub(super) async fn download_stream(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
    ) -> Result<(), CasError> {
        let mut stream = Self::open_read(&self.links.main, instance, &digest, 0, 0)
            .await
            .map_err(remote)?;
        let mut file = create(path).await?;
        let mut hasher = Hasher::new(digest.function);
        let size = receive_into(&mut stream, &mut file, &digest, digest.size, |data| {
            hasher.update(data)
        })
        .await?;
        if size != digest.size || hasher.finalize() != digest.hash {
            return Err(mismatch(&digest));
        }
        Ok(())
    }

    /// Downloads a blob in `n` ranges at once, each into its part of the file, then hashes
    /// the whole file (the ranges arrive out of order).
    pub(super) async fn download_ranges(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
        n: usize,
    ) -> Result<(), CasError> {
        let file = create(path).await?;
        file.set_len(digest.size)
            .await
            .map_err(|e| CasError::io("size a download's file", &e))?;
        drop(file);
        let per = digest.size.div_ceil(n as u64);
        let parts = (0..n as u64).filter_map(|i| {
            let start = i * per;
            let len = per.min(digest.size.checked_sub(start)?);
            let channel = &self.links.ranges[i as usize % self.links.ranges.len()];
            (len > 0).then(|| self.download_range(channel, instance, digest, path, start, len))
        });
        futures::future::try_join_all(parts).await?;
        let stored = crate::local::hash_file(digest.function, path)
            .await
            .map_err(|e| CasError::local(&e))?;
        if stored != digest {
            return Err(mismatch(&digest));
        }
        Ok(())
    }

    /// Writes `len` bytes of the blob from `start` into the file at `path`, from `channel`.
    pub(super) async fn download_range(
        &self,
        channel: &Channel,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
        start: u64,
        len: u64,
    ) -> Result<(), CasError> {
        let mut stream = Self::open_read(channel, instance, &digest, start, len)
            .await
            .map_err(remote)?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|e| CasError::io("open a download's file", &e))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| CasError::io("seek in a download's file", &e))?;
        let got = receive_into(&mut stream, &mut file, &digest, len, |_| {}).await?;
        if got != len {
            return Err(CasError::bad_answer(format!(
                "the server sent {got} of the {len} bytes from offset {start} of {digest:?}"
            )));
        }
        Ok(())
    }
}

/// Creates a download's file, which must not exist.
async fn create(path: &Path) -> Result<tokio::fs::File, CasError> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|e| CasError::io("create a download's file", &e))
}

/// Removes a file when dropped, unless emptied first.
pub(super) struct RemoveOnDrop(pub(super) Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes a Read's messages into `file`, showing each to `seen`; stops with DATA_LOSS,
/// before writing it, at the first byte past `limit`. Returns the bytes received.
async fn receive_into(
    stream: &mut tonic::Streaming<kiln_proto::bytestream::ReadResponse>,
    file: &mut tokio::fs::File,
    digest: &Digest,
    limit: u64,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64, CasError> {
    let mut got = 0u64;
    while let Some(message) = stream.next().await {
        let data = message.map_err(remote)?.data;
        got = got.saturating_add(data.len() as u64);
        if got > limit {
            return Err(too_much(digest, limit));
        }
        seen(&data);
        file.write_all(&data)
            .await
            .map_err(|e| CasError::io("write a download's file", &e))?;
    }
    file.flush()
        .await
        .map_err(|e| CasError::io("write a download's file", &e))?;
    Ok(got)
}

/// The server sent more than was asked for.
pub(super) fn too_much(digest: &Digest, asked: u64) -> CasError {
    CasError::bad_answer(format!(
        "the server sent more than the {asked} bytes asked for of {digest:?}"
    ))
}
