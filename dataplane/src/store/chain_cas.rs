//! The store's chain of tiers as a [`Cas`], for code on a tokio runtime that uses this
//! process's CAS: the control plane (an action's metadata and input tree, completeness
//! checks) and the worker (its local CAS). Reads come checked from the chain ([`super::tier::Blob`]);
//! writes go to a temp file, synced when the blob must be durable and group commit does not
//! cover it, and are committed through the chain. File work runs on tokio's blocking pool.

use super::layout::Layout;
use super::tier::{self, BlobStore, VerifiedUpload};
use super::{CasClient, StoreError};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use kiln_reapi::cas::{Cas, CasError, CasFuture, RoomHold};
use kiln_reapi::digest::{BlobKey, Digest, Hasher, InstanceName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Blobs read or written at once by one call.
const PARALLELISM: usize = 16;

/// This process's CAS: its owner shards' handle, the chain of tiers over them, where files
/// live, and whether what is written must be durable.
#[derive(Clone)]
pub struct ChainCas {
    cas: CasClient,
    store: Arc<dyn BlobStore>,
    layout: Layout,
    durable: bool,
    /// Group commit covers the data of durable blobs up to this size.
    group_max: Option<u64>,
}

impl ChainCas {
    /// The CAS whose shards `cas` reaches (`store`: its chain of tiers), files laid out by
    /// `layout`. With `durable`, blobs written are synced before they are committed (a
    /// server's CAS, whose blobs an action result names); without, the CAS is a cache (a
    /// remote worker's, whose outputs the server makes durable).
    pub fn new(
        cas: CasClient,
        store: Arc<dyn BlobStore>,
        layout: Layout,
        durable: bool,
    ) -> ChainCas {
        ChainCas {
            cas,
            store,
            layout,
            durable,
            group_max: None,
        }
    }

    /// With group commit on in the store (blobs up to `group_max` bytes are made durable by
    /// its filesystem sync), durable blobs up to that size skip their own data sync.
    pub fn with_group_commit(mut self, group_max: Option<u64>) -> ChainCas {
        self.group_max = group_max;
        self
    }

    /// The owner shards' handle.
    pub fn client(&self) -> &CasClient {
        &self.cas
    }

    /// The chain of tiers.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Where the CAS's files are.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether a blob of `size` bytes written to a temp file must have its data synced
    /// before [`ChainCas::commit`] (durable, and not covered by group commit).
    pub fn sync_own_data(&self, size: u64) -> bool {
        super::durable::sync_own_data(self.durable, self.group_max, size)
    }

    /// Stores bytes already known to hash to `d`.
    pub async fn put_bytes(&self, key: &BlobKey, data: Bytes) -> Result<(), StoreError> {
        if key.digest.is_empty_blob() {
            return Ok(());
        }
        let (this, key) = (self.clone(), key.clone());
        to_the_end(async move { this.write_and_commit(&key, data).await }).await
    }

    async fn write_and_commit(&self, key: &BlobKey, data: Bytes) -> Result<(), StoreError> {
        let epoch = self.cas.sync_epoch();
        if !self.store.keeps_files(key) {
            let upload = VerifiedUpload {
                temp: None,
                data: Some(data),
                epoch,
            };
            return self.put(key, upload).await;
        }
        let temp = self.layout.temp_path();
        let durable = self.sync_own_data(key.digest.size);
        let written = {
            let (temp, data) = (temp.clone(), data.clone());
            blocking(move || {
                use std::io::Write;
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&data)?;
                if durable {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await
        };
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(StoreError::io("write", temp, e));
        }
        self.put(
            key,
            VerifiedUpload {
                temp: Some(temp),
                data: Some(data),
                epoch,
            },
        )
        .await
    }

    /// Stores a file whose content hashes to the key's digest: hardlinked into the CAS
    /// (copied across filesystems). The file must not change afterwards.
    pub async fn put_file(&self, key: &BlobKey, file: &Path) -> Result<(), StoreError> {
        if key.digest.is_empty_blob() {
            return Ok(());
        }
        let (this, key, file) = (self.clone(), key.clone(), file.to_path_buf());
        to_the_end(async move { this.link_and_commit(&key, &file).await }).await
    }

    async fn link_and_commit(&self, key: &BlobKey, file: &Path) -> Result<(), StoreError> {
        if !self.store.keeps_files(key) {
            return self.read_and_commit(key, file).await;
        }
        let temp = self.layout.temp_path();
        let epoch = self.cas.sync_epoch();
        let durable = self.sync_own_data(key.digest.size);
        let (from, to) = (file.to_path_buf(), temp.clone());
        let linked = blocking(move || {
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to)?;
            }
            if durable {
                std::fs::File::open(&to)?.sync_data()?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = linked {
            let _ = std::fs::remove_file(&temp);
            return Err(StoreError::io("link", file, e));
        }
        self.put(
            key,
            VerifiedUpload {
                temp: Some(temp),
                data: None,
                epoch,
            },
        )
        .await
    }

    /// Stores a file's bytes in a store that keeps no files: read, and hashed again once in
    /// memory (the file could have changed since it was hashed; these bytes cannot).
    async fn read_and_commit(&self, key: &BlobKey, file: &Path) -> Result<(), StoreError> {
        let epoch = self.cas.sync_epoch();
        let (path, size) = (file.to_path_buf(), key.digest.size);
        let data = blocking(move || {
            use std::io::Read;
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            std::fs::File::open(&path)?
                .take(size.saturating_add(1))
                .read_to_end(&mut data)?;
            Ok(data)
        })
        .await
        .map_err(|e| StoreError::io("read", file, e))?;
        if data.len() as u64 != size || Hasher::hash(key.digest.function, &data) != key.digest.hash
        {
            let changed = std::io::Error::other("the file changed after it was hashed");
            return Err(StoreError::io("store", file, changed));
        }
        let upload = VerifiedUpload {
            temp: None,
            data: Some(Bytes::from(data)),
            epoch,
        };
        self.put(key, upload).await
    }

    /// Commits a temp file already checked against the key's digest through the chain (its
    /// bytes, when given, for memory tiers), handing the file over: the commit runs to the
    /// end even if the caller gives up (see [`to_the_end`]), so the file is never left in the
    /// temp directory. `epoch` is [`CasClient::sync_epoch`] read before the file's first byte
    /// was written.
    pub async fn commit(
        &self,
        key: &BlobKey,
        temp: PathBuf,
        data: Option<Bytes>,
        epoch: u64,
    ) -> Result<(), StoreError> {
        let (this, key) = (self.clone(), key.clone());
        let upload = VerifiedUpload {
            temp: Some(temp),
            data,
            epoch,
        };
        to_the_end(async move { this.put(&key, upload).await }).await
    }

    /// Stores a verified upload through the chain (already inside [`to_the_end`]).
    async fn put(&self, key: &BlobKey, upload: VerifiedUpload) -> Result<(), StoreError> {
        self.store.put(key, upload).await?;
        Ok(())
    }
}

/// Runs a store's write in a tokio task of its own (in the caller's span), to the end even if
/// the caller is cancelled (a client that gave up): the temp file it makes is then always
/// committed or removed, never left behind in the temp directory. A panic in the write is
/// passed on as it would have been.
async fn to_the_end(
    work: impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
) -> Result<(), StoreError> {
    use tracing::Instrument;
    match tokio::spawn(work.in_current_span()).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::Unavailable),
    }
}

/// Runs file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

fn keys(instance: &InstanceName, digests: &[Digest]) -> Vec<BlobKey> {
    digests
        .iter()
        .map(|d| BlobKey::new(instance.clone(), *d))
        .collect()
}

fn local(e: StoreError) -> CasError {
    CasError::local(&e)
}

impl Cas for ChainCas {
    fn find_missing<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Digest>> {
        Box::pin(async move {
            let missing = tier::find_missing(&*self.store, &keys(instance, digests))
                .await
                .map_err(local)?;
            Ok(missing.into_iter().map(|k| k.digest).collect())
        })
    }

    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<Bytes>>> {
        Box::pin(async move {
            stream::iter(keys(instance, digests))
                .map(|key| async move { tier::read_whole(&*self.store, &key).await })
                .buffered(PARALLELISM)
                .try_collect()
                .await
                .map_err(local)
        })
    }

    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool> {
        Box::pin(async move {
            let key = BlobKey::new(instance.clone(), digest);
            let Some(blob) = self.store.open(&key).await.map_err(local)? else {
                return Ok(false);
            };
            let dest = path.to_path_buf();
            let copied = tokio::task::spawn_blocking(move || blob.copy_to_blocking(&dest))
                .await
                .map_err(|_| local(StoreError::Unavailable))?;
            match copied {
                Ok(()) => Ok(true),
                // Damaged or gone: it has left the store, which no longer holds it.
                Err(StoreError::Corrupt(_) | StoreError::Vanished(_)) => Ok(false),
                Err(e) => Err(local(e)),
            }
        })
    }

    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, Bytes)>,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            stream::iter(blobs)
                .map(|(d, data)| async move {
                    self.put_bytes(&BlobKey::new(instance.clone(), d), data)
                        .await
                })
                .buffer_unordered(PARALLELISM)
                // Every write runs to its end (a write dropped half-way would leave its temp
                // file behind), then the first failure is the answer.
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<(), _>>()
                .map_err(local)
        })
    }

    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            self.put_file(&BlobKey::new(instance.clone(), digest), path)
                .await
                .map_err(local)
        })
    }

    fn hold_room(&self, bytes: u64) -> CasFuture<'_, RoomHold> {
        Box::pin(async move {
            let staged = self.client().stage(bytes).await.map_err(local)?;
            Ok(RoomHold::new(staged))
        })
    }
}
