//! The worker's own CAS (its data plane's store; for the worker inside `kiln serve`, the
//! server's store itself): blobs are read and stored through it as a [`Cas`]
//! ([`ChainCas`]), pinned while an action uses them, and hardlinked into action directories.

use crate::error::ActionError;
use futures::StreamExt;
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::tier::filesystem::Filesystem;
use kiln_dataplane::store::tier::{BlobStore, PinHolder};
use kiln_dataplane::store::{CasClient, ChainCas, StoreError};
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{BlobKey, Digest, Hasher, InstanceName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Gives a stored file found with another mode than the store's read-only one its mode back.
fn read_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.is_file() && meta.permissions().mode() & 0o7777 != 0o444 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o7777), "a stored input's mode was changed; put back to read-only");
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444));
        }
    }
}

/// Files checked at once when pinned inputs need checking.
const VERIFY_PARALLELISM: usize = 4;

/// A local CAS: the store as a [`Cas`], plus the pins and file paths the worker needs to
/// hardlink inputs.
#[derive(Clone)]
pub struct LocalCas {
    chain: ChainCas,
}

impl LocalCas {
    /// The CAS whose shards `cas` reaches (`store`: its chain of tiers) and whose files are
    /// laid out by `layout`. With
    /// `durable`, blobs the worker stores are synced to disk before they are committed: the
    /// server's own CAS (the embedded worker), whose outputs an action result will name;
    /// a remote worker's CAS is a cache, and the server makes its uploads durable.
    pub fn new(
        cas: CasClient,
        store: Arc<dyn BlobStore>,
        layout: Layout,
        durable: bool,
    ) -> LocalCas {
        LocalCas {
            chain: ChainCas::new(cas, store, layout, durable),
        }
    }

    /// With group commit on in the store (blobs up to `group_max` bytes are made durable by
    /// its filesystem sync), durable blobs up to that size skip their own data sync.
    pub fn with_group_commit(mut self, group_max: Option<u64>) -> LocalCas {
        self.chain = self.chain.with_group_commit(group_max);
        self
    }

    /// The local CAS as a [`Cas`].
    pub fn cas(&self) -> &ChainCas {
        &self.chain
    }

    fn store(&self) -> &Arc<dyn BlobStore> {
        self.chain.store()
    }

    fn key(instance: &InstanceName, d: Digest) -> BlobKey {
        BlobKey::new(instance.clone(), d)
    }

    /// Whether the CAS keeps the blob as a file (to hardlink) rather than in a small-blob log
    /// (to copy: [`LocalCas::bytes_of`]).
    pub fn keeps_file(&self, instance: &InstanceName, d: Digest) -> bool {
        self.store().keeps_files(&Self::key(instance, d))
    }

    /// The bytes of a blob the CAS keeps no file of, checked; `None` when it is not held.
    pub async fn bytes_of(
        &self,
        instance: &InstanceName,
        d: Digest,
    ) -> Result<Option<bytes::Bytes>, ActionError> {
        let key = Self::key(instance, d);
        Ok(kiln_dataplane::store::tier::read_whole(&**self.store(), &key).await?)
    }

    /// The file of a committed blob.
    pub fn path(&self, instance: &InstanceName, d: Digest) -> PathBuf {
        self.chain.layout().blob_path(&Self::key(instance, d))
    }

    /// Drops a stored blob whose file no longer holds its content (the owner deletes it).
    pub async fn drop_changed(&self, instance: &InstanceName, d: Digest) {
        self.chain
            .client()
            .drop_changed(&Self::key(instance, d))
            .await;
    }

    /// A fresh temp path on the CAS's filesystem.
    pub fn temp_path(&self) -> PathBuf {
        self.chain.layout().temp_path()
    }

    /// Pins what is present, for `holder`; returns the digests that are not.
    pub async fn pin(
        &self,
        holder: PinHolder,
        instance: &InstanceName,
        digests: &[Digest],
    ) -> Result<(Vec<Digest>, Vec<BlobKey>), ActionError> {
        let keys: Vec<BlobKey> = digests.iter().map(|d| Self::key(instance, *d)).collect();
        let present = self.store().pin(holder, &keys).await?;
        let mut missing = Vec::new();
        let mut pinned = Vec::new();
        let mut unchecked = Vec::new();
        for (key, state) in keys.into_iter().zip(present) {
            match state {
                Some(true) => pinned.push(key),
                Some(false) => unchecked.push(key),
                None => missing.push(key.digest),
            }
        }
        // Files found on disk at start-up are checked before an action sees them (a read
        // through the CAS would check them; a hardlink into an action directory does not),
        // by the same check as a read, which tells the store the verdict (a damaged or
        // vanished blob leaves it). The file itself, from the filesystem tier: a memory tier
        // could answer with good bytes while the file is damaged.
        let files = Filesystem::new(self.chain.client().clone());
        let files = &files;
        let layout = self.chain.layout();
        let store = self.store();
        let checked: Vec<(BlobKey, bool)> = futures::stream::iter(unchecked)
            .map(|key| async move {
                if !store.keeps_files(&key) {
                    // No file of it (the small-blob log): reading it checks it.
                    let good = matches!(store.open(&key).await, Ok(Some(_)));
                    return (key, good);
                }
                let path = layout.blob_path(&key);
                let good = match files.open(&key).await {
                    Ok(Some(blob)) => {
                        // Its mode too: it is about to be linked into actions read-only, and
                        // may have been changed while the worker was down.
                        let checked = move || {
                            blob.check_blocking()?;
                            read_only(&path);
                            Ok(())
                        };
                        match tokio::task::spawn_blocking(checked).await {
                            Ok(Ok(())) => true,
                            Ok(Err(StoreError::Io { source, .. })) => {
                                // Kept: a passing failure (too many open files) says nothing
                                // of it.
                                tracing::warn!(blob = ?key, error = %source, "cannot read a stored input; fetching it again");
                                false
                            }
                            Ok(Err(_)) | Err(_) => false,
                        }
                    }
                    Ok(None) | Err(_) => false,
                };
                (key, good)
            })
            .buffer_unordered(VERIFY_PARALLELISM)
            .collect()
            .await;
        for (key, good) in checked {
            if good {
                pinned.push(key);
                continue;
            }
            // A blob that left the store took its pin with it, and then this does nothing;
            // otherwise (kept, or the store's notice was lost) the pin is released here.
            self.store().unpin(holder, std::slice::from_ref(&key)).await;
            missing.push(key.digest);
        }
        Ok((missing, pinned))
    }

    /// Releases `holder`'s pins.
    pub async fn unpin(&self, holder: PinHolder, keys: &[BlobKey]) {
        self.store().unpin(holder, keys).await;
    }

    /// Stores the file at `file`, whose content hashes to `d` (see [`Cas::write_file`]).
    pub async fn put_file(
        &self,
        instance: &InstanceName,
        d: Digest,
        file: &Path,
    ) -> Result<(), ActionError> {
        Ok(self.chain.write_file(instance, d, file).await?)
    }

    /// Stores bytes already known to hash to `d`.
    pub async fn put_bytes(
        &self,
        instance: &InstanceName,
        d: Digest,
        data: bytes::Bytes,
    ) -> Result<(), ActionError> {
        Ok(self.chain.write_blobs(instance, vec![(d, data)]).await?)
    }

    /// What a download reads before it writes its temp file, for [`LocalCas::commit_download`].
    pub fn sync_epoch(&self) -> u64 {
        self.chain.client().sync_epoch()
    }

    /// Commits a downloaded file (already verified against `d`); `epoch` is
    /// [`LocalCas::sync_epoch`] from before the download began. Runs to the end even if the
    /// action is cancelled meanwhile, so the file is never left in the temp directory.
    pub async fn commit_download(
        &self,
        instance: &InstanceName,
        d: Digest,
        temp: PathBuf,
        epoch: u64,
    ) -> Result<(), ActionError> {
        Ok(self
            .chain
            .commit(&Self::key(instance, d), temp, None, epoch)
            .await?)
    }
}

/// The digest of a file, hashed off the async threads.
pub async fn hash_file(
    function: kiln_reapi::digest::DigestFunction,
    path: &Path,
) -> Result<Digest, ActionError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || hash_path(function, &p))
        .await
        .map_err(|e| ActionError::io("hash", path, std::io::Error::other(e)))?
        .map_err(|e| ActionError::io("hash", path, e))
}

/// The digest of a file (blocking), read in chunks of at most 1 MiB.
pub fn hash_path(
    function: kiln_reapi::digest::DigestFunction,
    path: &Path,
) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Hasher::new(function);
    let mut buf = vec![0u8; len.clamp(1, 1 << 20) as usize];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digest {
        function,
        hash: hasher.finalize(),
        size,
    })
}
