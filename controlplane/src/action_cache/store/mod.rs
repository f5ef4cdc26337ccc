//! The action cache on disk: one file per action digest (a serialized `ActionResult` behind a
//! checked header, [`super::entry`]) in the same tree shape as the CAS, an LRU index rebuilt at start-up by access time, and a byte
//! cap. Writes go to a temp file, are synced when configured, and are renamed into place.
//! Recently used results are also kept in memory (moka, TinyLFU, weighted by size), so a hit
//! reads no file and needs no blocking thread; the index decides what exists, the memory only
//! saves the read.

mod files;
mod stored;
#[cfg(test)]
mod tests;

pub use stored::{CheckMark, Stored, NEVER_CHECKED};

use super::entry;
use crate::error::ControlError;
use bytes::Bytes;
use files::{identity, read_with_identity, write_file, Found};
use kiln_dataplane::store::atime;
use kiln_dataplane::store::durable::sync_dir;
use kiln_dataplane::store::index::{BlobIndex, ClientKeys, Entry};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::scan::{scan, ScanReport, TreeKind};
use kiln_dataplane::store::snapshot;
use kiln_dataplane::store::tree_commit;
use kiln_dataplane::store::StoreError;
use kiln_reapi::digest::BlobKey;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a result is, as far as memory can tell.
enum Lookup {
    /// Not stored.
    Absent,
    /// In memory; with the access time to write to its file, when due.
    Memory(Stored, Option<u64>),
    /// Stored, to be read from its file; with the access time to write, when due, and the
    /// put count when it was looked up.
    Disk(Option<u64>, u64),
}

/// What an entry is counted as against the cap: its size rounded up to whole 4 KiB blocks,
/// about what a small file takes on disk. It also bounds the number of entries, and so the
/// index's memory, to `max_bytes / 4 KiB`.
pub const BLOCK: u64 = 4096;

/// The bytes an entry of `len` bytes is counted as.
pub fn charged(len: u64) -> u64 {
    len.div_ceil(BLOCK).max(1) * BLOCK
}

/// Settings of the action-cache store.
#[derive(Debug, Clone)]
pub struct AcSettings {
    /// Cap on stored results, each counted as [`charged`] bytes.
    pub max_bytes: u64,
    /// Largest single result.
    pub max_entry_bytes: u64,
    /// Sync results (and their directory) before acknowledging.
    pub fsync: bool,
    /// Access times are written to files at most this often.
    pub atime_resolution: std::time::Duration,
    /// Bytes of results kept in memory (0: none).
    pub memory_bytes: u64,
}

/// The durable action cache.
#[derive(Clone)]
pub struct AcStore {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    settings: AcSettings,
    /// SipHash: action digests come from clients unverified.
    index: Mutex<BlobIndex<ClientKeys>>,
    /// Puts so far (changed under the index lock): a file read that raced a put must not put
    /// the older result it read back into memory.
    puts: AtomicU64,
    /// In-memory copies, changed only under the index lock so that they never outlive their
    /// index entry.
    memory: Option<moka::sync::Cache<BlobKey, Stored>>,
    /// Entry directories (and every one above them) a sync by this process made durable.
    durable_dirs: Mutex<HashSet<PathBuf>>,
}

impl AcStore {
    /// Opens (creating if needed) the action cache under `data_dir` and indexes it: from the
    /// index snapshot of the last clean stop for every directory unchanged since, by scanning
    /// the others (see `kiln_dataplane::store::snapshot`).
    pub fn open(data_dir: &Path, settings: AcSettings) -> std::io::Result<(AcStore, ScanReport)> {
        let layout = Layout::action_cache(data_dir);
        let snap = snapshot::load(&layout.index_file());
        let (mut shards, report, _) = scan(
            &layout,
            TreeKind::Entries,
            1,
            4,
            snap.as_ref(),
            false,
            |_| 0,
        )?;
        let mut index = BlobIndex::<ClientKeys>::new();
        for (key, entry) in shards.pop().unwrap_or_default() {
            // Results are small and were written whole by this server: no hash to check.
            index.insert(
                key,
                Entry {
                    verified: true,
                    size: charged(entry.size),
                    ..entry
                },
            );
        }
        let memory = (settings.memory_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(settings.memory_bytes)
                .weigher(|key: &BlobKey, v: &Stored| {
                    let bytes = v.data.len() + std::mem::size_of_val(key) + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build()
        });
        let store = AcStore {
            inner: Arc::new(Inner {
                layout,
                settings,
                index: Mutex::new(index),
                puts: AtomicU64::new(0),
                memory,
                durable_dirs: Mutex::new(HashSet::new()),
            }),
        };
        let mut index = store.inner.lock();
        store.inner.evict_over_cap(&mut index);
        drop(index);
        Ok((store, report))
    }

    /// Writes the index snapshot the next start loads (call at a clean stop, once nothing
    /// writes results any more); returns the entries written. A directory that changed
    /// meanwhile is left out, to be scanned then.
    pub fn write_snapshot(&self) -> std::io::Result<usize> {
        // The results it lists are made durable first (with storage.fsync off they may
        // still be in the page cache), as the CAS's snapshot does.
        kiln_dataplane::store::durable::sync_filesystem(self.inner.layout.tree_dir())?;
        let grouped = {
            let index = self.inner.lock();
            snapshot::group(index.iter())
        };
        let stamped = snapshot::stamp(&self.inner.layout, vec![grouped]);
        let entries = stamped.values().map(|d| d.blobs.len()).sum();
        snapshot::write(&self.inner.layout.index_file(), &stamped)?;
        Ok(entries)
    }

    /// Whether results are kept in memory at all (else [`AcStore::ready`] never has one).
    pub fn has_memory(&self) -> bool {
        self.inner.memory.is_some()
    }

    /// Entries and bytes stored.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.inner.lock();
        (index.len(), index.bytes())
    }

    /// The stored result for an action, if any (and marks it used). A result held in memory
    /// is served without touching the disk (its access time is written later, off this task).
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Stored>, ControlError> {
        let persist = match self.inner.lookup(key) {
            Lookup::Absent => return Ok(None),
            Lookup::Memory(stored, persist) => {
                if let Some(t) = persist {
                    let path = self.inner.layout.blob_path(key);
                    drop(tokio::task::spawn_blocking(move || {
                        atime::persist(&path, t)
                    }));
                }
                return Ok(Some(stored));
            }
            Lookup::Disk(persist, puts) => (persist, puts),
        };
        let inner = self.inner.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || inner.read(&key, persist))
            .await
            .map_err(|e| {
                ControlError::io("read", Path::new("action cache"), std::io::Error::other(e))
            })?
    }

    /// The in-memory copy of a result when serving it needs no I/O and no waiting: held in
    /// memory, no access time due for writing to its file, the index not locked by someone
    /// else (then it is marked used). `None`: go through [`AcStore::get`].
    pub fn ready(&self, key: &BlobKey) -> Option<Stored> {
        let memory = self.inner.memory.as_ref()?;
        // Called on a data-plane core: never wait for the lock (a put holds it across file
        // calls); a busy lock sends the call the ordinary way.
        let mut index = self.inner.index.try_lock().ok()?;
        let now = atime::now();
        let entry = index.peek(key)?;
        if atime::due(
            now,
            entry.persisted_atime,
            self.inner.settings.atime_resolution,
        ) {
            return None;
        }
        let stored = memory.get(key)?;
        index.touch(key, now);
        Some(stored)
    }

    /// Whether a result of `len` bytes may be stored (`action_cache.max_entry_bytes`).
    pub fn fits(&self, len: usize) -> Result<(), ControlError> {
        let limit = self.inner.settings.max_entry_bytes;
        if len as u64 > limit {
            return Err(ControlError::TooLarge {
                what: "ActionResult",
                size: len as u64,
                limit,
            });
        }
        Ok(())
    }

    /// Stores (or replaces) the result for an action; returns the check mark of the version
    /// stored (shared with its in-memory copy, if one is kept).
    pub async fn put(&self, key: BlobKey, data: Bytes) -> Result<Arc<CheckMark>, ControlError> {
        self.fits(data.len())?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.put(key, data))
            .await
            .map_err(|e| {
                ControlError::io("write", Path::new("action cache"), std::io::Error::other(e))
            })?
    }

    /// Drops an entry that turned out to be unusable: the version `stored` (a newer one a
    /// put made meanwhile stays).
    pub fn remove(&self, key: &BlobKey, stored: &Stored) {
        self.inner.drop_entry(key, Found::File(stored.file));
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BlobIndex<ClientKeys>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `key` used; `persist` is the access time to write to its file, when one is due.
    fn touch(&self, index: &mut BlobIndex<ClientKeys>, key: &BlobKey) -> Option<Option<u64>> {
        let (entry, due) =
            index.touch_persisting(key, atime::now(), self.settings.atime_resolution)?;
        Some(due.then_some(entry.atime))
    }

    /// Whether `key` is stored, and where (marking it used).
    fn lookup(&self, key: &BlobKey) -> Lookup {
        let mut index = self.lock();
        let Some(persist) = self.touch(&mut index, key) else {
            return Lookup::Absent;
        };
        match self.memory.as_ref().and_then(|m| m.get(key)) {
            Some(stored) => Lookup::Memory(stored, persist),
            None => Lookup::Disk(persist, self.puts.load(Ordering::Relaxed)),
        }
    }

    /// Reads a stored entry's file (blocking; [`Inner::lookup`] already marked it used and
    /// said whether its access time is due) and keeps it in memory afterwards.
    fn read(
        &self,
        key: &BlobKey,
        (persist, puts): (Option<u64>, u64),
    ) -> Result<Option<Stored>, ControlError> {
        let path = self.layout.blob_path(key);
        match read_with_identity(&path) {
            Ok((file, identity)) => {
                let data = match entry::decode(Bytes::from(file)) {
                    Ok(data) => data,
                    Err(why) => {
                        tracing::warn!(action = ?key.digest, error = %why, "action cache entry unusable (cut short by a crash, or damaged); dropping it");
                        self.drop_entry(key, Found::File(identity));
                        return Ok(None);
                    }
                };
                if let Some(t) = persist {
                    atime::persist(&path, t);
                }
                let stored = Stored {
                    data,
                    checked: CheckMark::new(),
                    file: identity,
                };
                if let Some(memory) = &self.memory {
                    // Only if nothing was put since the lookup and it is still indexed: a put
                    // or an eviction since wins over what this read found.
                    let index = self.lock();
                    let unchanged = self.puts.load(Ordering::Relaxed) == puts;
                    if unchanged && index.peek(key).is_some() && !memory.contains_key(key) {
                        memory.insert(key.clone(), stored.clone());
                    }
                }
                Ok(Some(stored))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.drop_entry(key, Found::Nothing);
                Ok(None)
            }
            Err(e) => Err(ControlError::io("read", &path, e)),
        }
    }

    /// Drops an entry and its file, if what is at its path is still what a read `found`
    /// (a put since renamed a newer result in, which stays).
    fn drop_entry(&self, key: &BlobKey, found: Found) {
        let mut index = self.lock();
        let path = self.layout.blob_path(key);
        let now = std::fs::symlink_metadata(&path).ok().map(|m| identity(&m));
        let still = match found {
            Found::Nothing => now.is_none(),
            Found::File(was) => now == Some(was),
        };
        if !still {
            return;
        }
        let removed = index.remove(key);
        self.forget(key);
        // Under the lock, like a put's rename: a put right after must not lose its new file.
        if removed.is_some() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Drops the in-memory copy (call with the index locked).
    fn forget(&self, key: &BlobKey) {
        if let Some(memory) = &self.memory {
            memory.invalidate(key);
        }
    }

    fn put(&self, key: BlobKey, data: Bytes) -> Result<Arc<CheckMark>, ControlError> {
        let temp = self.layout.temp_path();
        write_file(&temp, &entry::encode(&data), self.settings.fsync).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            ControlError::io("write", &temp, e)
        })?;
        let dir = self.layout.blob_dir(&key);
        let path = self.layout.blob_path(&key);
        let file = std::fs::metadata(&temp)
            .map(|m| identity(&m))
            .map_err(|e| {
                let _ = std::fs::remove_file(&temp);
                ControlError::io("write", &temp, e)
            })?;
        // Rename and index update happen under the index lock, so an eviction can never delete
        // a file that was just replaced. The CAS's commits put their files in the same way.
        let mut index = self.lock();
        // Entries stay writable by their owner: nothing links them, unlike blob files.
        tree_commit::rename_in(&self.layout, &key, true, false, &temp, &path).map_err(
            |e| match e {
                StoreError::Io { op, path, source } => ControlError::Io { op, path, source },
                other => ControlError::Store(other),
            },
        )?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        let checked = CheckMark::new();
        if let Some(memory) = &self.memory {
            let stored = Stored {
                data: data.clone(),
                checked: checked.clone(),
                file,
            };
            memory.insert(key.clone(), stored);
        }
        // Charged by the file's length, header included, as the start-up scan counts it.
        let stored_len = (entry::HEADER + data.len()) as u64;
        index.insert(key, Entry::fresh(charged(stored_len), atime::now()));
        self.evict_over_cap(&mut index);
        drop(index);
        if self.settings.fsync {
            self.make_durable(&dir)?;
        }
        Ok(checked)
    }

    /// Syncs what a rename into `dir` needs to survive a crash, by the CAS's rule
    /// ([`tree_commit::dirs_to_sync`]): `dir`, and every directory above it until this process
    /// has once made `dir` durable (another put may have created it and not synced it yet).
    fn make_durable(&self, dir: &Path) -> Result<(), ControlError> {
        let todo = {
            let durable = self.durable_dirs.lock().unwrap_or_else(|e| e.into_inner());
            tree_commit::dirs_to_sync(dir, self.layout.tree_dir(), &durable)
        };
        for d in &todo {
            sync_dir(d).map_err(|e| ControlError::io("sync", d, e))?;
        }
        self.durable_dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.to_path_buf());
        Ok(())
    }

    fn evict_over_cap(&self, index: &mut BlobIndex<ClientKeys>) {
        while index.bytes() > self.settings.max_bytes {
            let Some((key, _)) = index.pop_oldest_unpinned() else {
                break;
            };
            self.forget(&key);
            let _ = std::fs::remove_file(self.layout.blob_path(&key));
        }
    }
}
