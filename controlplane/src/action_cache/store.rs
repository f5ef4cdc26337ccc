//! The action cache on disk: one file per action digest (a serialized `ActionResult`) in the
//! same tree shape as the CAS, an LRU index rebuilt at start-up by access time, and a byte
//! cap. Writes go to a temp file, are synced when configured, and are renamed into place.

use crate::error::ControlError;
use bytes::Bytes;
use kiln_dataplane::store::atime;
use kiln_dataplane::store::index::{BlobIndex, Entry};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::scan::{scan, ScanReport, TreeKind};
use kiln_reapi::digest::BlobKey;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Settings of the action-cache store.
#[derive(Debug, Clone)]
pub struct AcSettings {
    /// Cap on bytes of stored results.
    pub max_bytes: u64,
    /// Largest single result.
    pub max_entry_bytes: u64,
    /// Sync results (and their directory) before acknowledging.
    pub fsync: bool,
    /// Access times are written to files at most this often.
    pub atime_resolution: std::time::Duration,
}

/// The durable action cache.
#[derive(Clone)]
pub struct AcStore {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    settings: AcSettings,
    index: Mutex<BlobIndex>,
}

impl AcStore {
    /// Opens (creating if needed) the action cache under `data_dir` and indexes it.
    pub fn open(data_dir: &Path, settings: AcSettings) -> std::io::Result<(AcStore, ScanReport)> {
        let layout = Layout::action_cache(data_dir);
        let (mut shards, report) = scan(&layout, TreeKind::Entries, 1, 4, |_| 0)?;
        let mut index = BlobIndex::new();
        for (key, entry) in shards.pop().unwrap_or_default() {
            // Results are small and were written whole by this server: no hash to check.
            index.insert(
                key,
                Entry {
                    verified: true,
                    ..entry
                },
            );
        }
        let store = AcStore {
            inner: Arc::new(Inner {
                layout,
                settings,
                index: Mutex::new(index),
            }),
        };
        let mut index = store.inner.lock();
        store.inner.evict_over_cap(&mut index);
        drop(index);
        Ok((store, report))
    }

    /// Entries and bytes stored.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.inner.lock();
        (index.len(), index.bytes())
    }

    /// The stored result for an action, if any (and marks it used).
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, ControlError> {
        let inner = self.inner.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || inner.get(&key))
            .await
            .map_err(|e| {
                ControlError::io("read", Path::new("action cache"), std::io::Error::other(e))
            })?
    }

    /// Stores (or replaces) the result for an action.
    pub async fn put(&self, key: BlobKey, data: Bytes) -> Result<(), ControlError> {
        let limit = self.inner.settings.max_entry_bytes;
        if data.len() as u64 > limit {
            return Err(ControlError::TooLarge {
                what: "ActionResult",
                size: data.len() as u64,
                limit,
            });
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.put(key, &data))
            .await
            .map_err(|e| {
                ControlError::io("write", Path::new("action cache"), std::io::Error::other(e))
            })?
    }

    /// Drops an entry that turned out to be unusable.
    pub fn remove(&self, key: &BlobKey) {
        let removed = self.inner.lock().remove(key);
        if removed.is_some() {
            let _ = std::fs::remove_file(self.inner.layout.blob_path(key));
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BlobIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, ControlError> {
        let now = atime::now();
        let persist = {
            let mut index = self.lock();
            let Some(entry) = index.touch(key, now) else {
                return Ok(None);
            };
            let due = atime::due(
                entry.atime,
                entry.persisted_atime,
                self.settings.atime_resolution,
            );
            if due {
                entry.persisted_atime = entry.atime;
            }
            due.then_some(entry.atime)
        };
        let path = self.layout.blob_path(key);
        match std::fs::read(&path) {
            Ok(data) => {
                if let Some(t) = persist {
                    atime::persist(&path, t);
                }
                Ok(Some(Bytes::from(data)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.lock().remove(key);
                Ok(None)
            }
            Err(e) => Err(ControlError::io("read", &path, e)),
        }
    }

    fn put(&self, key: BlobKey, data: &[u8]) -> Result<(), ControlError> {
        let temp = self.layout.temp_path();
        write_file(&temp, data, self.settings.fsync).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            ControlError::io("write", &temp, e)
        })?;
        let path = self.layout.blob_path(&key);
        // Rename and index update happen under the index lock, so an eviction can never delete
        // a file that was just replaced.
        let mut index = self.lock();
        let created = self.layout.ensure_blob_dir(&key).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            ControlError::io("create directory for", &path, e)
        })?;
        if let Err(e) = std::fs::rename(&temp, &path) {
            let _ = std::fs::remove_file(&temp);
            return Err(ControlError::io("rename into", &path, e));
        }
        index.insert(key, Entry::fresh(data.len() as u64, atime::now()));
        self.evict_over_cap(&mut index);
        drop(index);
        if self.settings.fsync {
            let dir = path.parent().unwrap_or(self.layout.tree_dir());
            sync_dir(dir).map_err(|e| ControlError::io("sync", dir, e))?;
            for d in created {
                if let Some(parent) = d.parent() {
                    sync_dir(parent).map_err(|e| ControlError::io("sync", parent, e))?;
                }
            }
        }
        Ok(())
    }

    fn evict_over_cap(&self, index: &mut BlobIndex) {
        while index.bytes() > self.settings.max_bytes {
            let Some((key, _)) = index.pop_oldest_unpinned() else {
                break;
            };
            let _ = std::fs::remove_file(self.layout.blob_path(&key));
        }
    }
}

fn write_file(path: &Path, data: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(data)?;
    if fsync {
        file.sync_data()?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
    use kiln_reapi::status::Classify;

    fn settings(max_bytes: u64) -> AcSettings {
        AcSettings {
            max_bytes,
            max_entry_bytes: 1 << 20,
            fsync: true,
            atime_resolution: std::time::Duration::from_secs(60),
        }
    }

    fn key(instance: &str, n: u8) -> BlobKey {
        BlobKey::new(
            InstanceName::new(instance).unwrap(),
            Digest::of(DigestFunction::Sha256, &[n]),
        )
    }

    #[tokio::test]
    async fn survives_reopen_and_keeps_instances_apart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = AcStore::open(dir.path(), settings(1 << 20)).unwrap();
            store
                .put(key("a", 1), Bytes::from_static(b"result-a"))
                .await
                .unwrap();
            store
                .put(key("b", 1), Bytes::from_static(b"result-b"))
                .await
                .unwrap();
            store
                .put(key("a", 1), Bytes::from_static(b"result-a2"))
                .await
                .unwrap();
        }
        let (store, report) = AcStore::open(dir.path(), settings(1 << 20)).unwrap();
        assert_eq!(report.blobs, 2);
        assert_eq!(
            store.get(&key("a", 1)).await.unwrap().unwrap(),
            Bytes::from_static(b"result-a2")
        );
        assert_eq!(
            store.get(&key("b", 1)).await.unwrap().unwrap(),
            Bytes::from_static(b"result-b")
        );
        assert!(store.get(&key("c", 1)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn evicts_least_recently_used_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AcStore::open(dir.path(), settings(30)).unwrap();
        for n in 0..3 {
            store
                .put(key("", n), Bytes::from(vec![n; 10]))
                .await
                .unwrap();
        }
        store.get(&key("", 0)).await.unwrap().unwrap();
        store
            .put(key("", 3), Bytes::from(vec![3; 10]))
            .await
            .unwrap();
        assert!(
            store.get(&key("", 1)).await.unwrap().is_none(),
            "least recently used is gone"
        );
        assert!(store.get(&key("", 0)).await.unwrap().is_some());
        assert_eq!(store.usage(), (3, 30));
    }

    #[tokio::test]
    async fn refuses_oversized_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AcStore::open(
            dir.path(),
            AcSettings {
                max_entry_bytes: 4,
                ..settings(100)
            },
        )
        .unwrap();
        let err = store
            .put(key("", 1), Bytes::from_static(b"12345"))
            .await
            .unwrap_err();
        assert_eq!(err.status().code(), tonic::Code::InvalidArgument);
    }
}
