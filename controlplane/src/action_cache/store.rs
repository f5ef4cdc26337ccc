//! The action cache on disk: one file per action digest (a serialized `ActionResult` behind a
//! checked header, [`super::entry`]) in the same tree shape as the CAS, an LRU index rebuilt at start-up by access time, and a byte
//! cap. Writes go to a temp file, are synced when configured, and are renamed into place.
//! Recently used results are also kept in memory (moka, TinyLFU, weighted by size), so a hit
//! reads no file and needs no blocking thread; the index decides what exists, the memory only
//! saves the read.

use super::entry;
use crate::error::ControlError;
use bytes::Bytes;
use kiln_dataplane::store::atime;
use kiln_dataplane::store::durable::sync_dir;
use kiln_dataplane::store::index::{BlobIndex, ClientKeys, Entry};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::scan::{scan, ScanReport, TreeKind};
use kiln_dataplane::store::snapshot;
use kiln_reapi::digest::BlobKey;
use std::path::Path;
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

/// A stored result, as the store hands it out.
#[derive(Clone)]
pub struct Stored {
    /// The serialized `ActionResult`.
    pub data: Bytes,
    /// Shared by every hit of this stored version of the entry (a new `put` starts a new
    /// one): lets the cache remember that the result was found complete, and when.
    pub checked: Arc<CheckMark>,
    /// The file this version is in (device, inode), so that dropping it cannot drop a newer
    /// one a put renamed in meanwhile.
    file: (u64, u64),
}

/// When a stored result was last found complete.
#[derive(Debug)]
pub struct CheckMark {
    /// The CAS's removal count read before that check ([`NEVER_CHECKED`] before any).
    pub removals: AtomicU64,
    /// When it was made (nanoseconds since the Unix epoch).
    pub at: AtomicU64,
}

impl CheckMark {
    /// Whether the last check still holds at `now`: made less than `recheck_after` ago, and
    /// no blob has left the CAS since (`removals` is its count now).
    pub fn holds(&self, now: u64, removals: u64, recheck_after: std::time::Duration) -> bool {
        let at = self.at.load(Ordering::Acquire);
        at != 0
            && now.saturating_sub(at) < u64::try_from(recheck_after.as_nanos()).unwrap_or(u64::MAX)
            && self.removals.load(Ordering::Acquire) == removals
    }

    fn new() -> Arc<CheckMark> {
        Arc::new(CheckMark {
            removals: AtomicU64::new(NEVER_CHECKED),
            at: AtomicU64::new(0),
        })
    }
}

/// `CheckMark::removals` before any completeness check.
pub const NEVER_CHECKED: u64 = u64::MAX;

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
        let now = atime::now();
        let mut entry = index.touch(key, now)?;
        let due = atime::due(
            entry.atime,
            entry.persisted_atime,
            self.settings.atime_resolution,
        );
        if due {
            entry.persisted_atime = entry.atime;
        }
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

    fn put(&self, key: BlobKey, data: Bytes) -> Result<(), ControlError> {
        let temp = self.layout.temp_path();
        write_file(&temp, &entry::encode(&data), self.settings.fsync).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            ControlError::io("write", &temp, e)
        })?;
        let path = self.layout.blob_path(&key);
        let file = std::fs::metadata(&temp)
            .map(|m| identity(&m))
            .map_err(|e| {
                let _ = std::fs::remove_file(&temp);
                ControlError::io("write", &temp, e)
            })?;
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
        self.puts.fetch_add(1, Ordering::Relaxed);
        if let Some(memory) = &self.memory {
            let stored = Stored {
                data: data.clone(),
                checked: CheckMark::new(),
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

/// What a read found at an entry's path, for [`Inner::drop_entry`].
enum Found {
    /// No file.
    Nothing,
    /// The file with this identity (device, inode).
    File((u64, u64)),
}

fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// A file's bytes and its identity (device, inode), from one open.
fn read_with_identity(path: &Path) -> std::io::Result<(Vec<u8>, (u64, u64))> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut data)?;
    Ok((data, identity(&meta)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
    use kiln_reapi::status::Classify;
    use std::sync::atomic::Ordering;

    fn settings(max_bytes: u64) -> AcSettings {
        AcSettings {
            max_bytes,
            max_entry_bytes: 1 << 20,
            fsync: true,
            atime_resolution: std::time::Duration::from_secs(60),
            memory_bytes: 1 << 20,
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
            store.get(&key("a", 1)).await.unwrap().unwrap().data,
            Bytes::from_static(b"result-a2")
        );
        assert_eq!(
            store.get(&key("b", 1)).await.unwrap().unwrap().data,
            Bytes::from_static(b"result-b")
        );
        assert!(store.get(&key("c", 1)).await.unwrap().is_none());
    }

    /// A clean stop's index snapshot is loaded at the next start: unchanged directories come
    /// from it, with the bytes each result is counted as, and a directory written after the
    /// snapshot (a crash before the next clean stop) is scanned; a damaged snapshot is not
    /// used at all.
    #[tokio::test]
    async fn a_restart_loads_the_index_snapshot_and_scans_what_changed_since() {
        let dir = tempfile::tempdir().unwrap();
        let big = Bytes::from(vec![7u8; 3 * BLOCK as usize]);
        let usage = {
            let (store, _) = AcStore::open(dir.path(), settings(1 << 30)).unwrap();
            for n in 0..40u8 {
                let data = if n == 0 {
                    big.clone()
                } else {
                    Bytes::from(vec![n; 10])
                };
                store.put(key("a", n), data).await.unwrap();
            }
            assert_eq!(store.write_snapshot().unwrap(), 40);
            // Written after the snapshot, as if the server then crashed: in an instance of
            // its own, so in a directory the snapshot does not list (a listed directory whose
            // stamp changed is scanned too, see scan.rs's tests).
            store
                .put(key("late", 200), Bytes::from_static(b"late"))
                .await
                .unwrap();
            store.usage()
        };
        let (store, report) = AcStore::open(dir.path(), settings(1 << 30)).unwrap();
        assert!(report.dirs_from_snapshot > 0, "{report:?}");
        assert!(
            report.dirs_scanned >= 1,
            "the late result's directory: {report:?}"
        );
        assert_eq!(store.usage(), usage, "the same entries, counted the same");
        assert_eq!(store.get(&key("a", 0)).await.unwrap().unwrap().data, big);
        assert!(store.get(&key("late", 200)).await.unwrap().is_some());
        // A damaged snapshot: everything is scanned, nothing lost.
        drop(store);
        let file = Layout::action_cache(dir.path()).index_file();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let (store, report) = AcStore::open(dir.path(), settings(1 << 30)).unwrap();
        assert_eq!(report.dirs_from_snapshot, 0);
        assert_eq!(store.usage(), usage);
    }

    /// A result cut short by a crash (written without fsync) is a miss, and leaves the store;
    /// one written before the checked format is still served after an upgrade.
    #[tokio::test]
    async fn an_entry_cut_short_is_a_miss_and_an_older_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = AcStore::open(dir.path(), settings(1 << 20)).unwrap();
            for n in 1..=3 {
                store
                    .put(key("", n), Bytes::from(format!("result-{n}")))
                    .await
                    .unwrap();
            }
        }
        let layout = Layout::action_cache(dir.path());
        let cut = layout.blob_path(&key("", 1));
        let file = std::fs::read(&cut).unwrap();
        std::fs::write(&cut, &file[..file.len() - 3]).unwrap();
        let emptied = layout.blob_path(&key("", 3));
        std::fs::write(&emptied, b"").unwrap();
        std::fs::write(layout.blob_path(&key("", 2)), b"old-result").unwrap();

        let (store, report) = AcStore::open(dir.path(), settings(1 << 20)).unwrap();
        assert_eq!(report.blobs, 3);
        assert!(store.get(&key("", 1)).await.unwrap().is_none(), "cut short");
        assert!(store.get(&key("", 3)).await.unwrap().is_none(), "emptied");
        assert!(!cut.exists() && !emptied.exists(), "unusable files removed");
        assert_eq!(store.usage().0, 1);
        assert_eq!(
            store.get(&key("", 2)).await.unwrap().unwrap().data,
            Bytes::from_static(b"old-result")
        );
    }

    /// Dropping a version found unusable leaves a newer one a put made meanwhile.
    #[tokio::test]
    async fn removing_an_old_version_keeps_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        for memory_bytes in [0, 1 << 20] {
            let (store, _) = AcStore::open(
                dir.path(),
                AcSettings {
                    memory_bytes,
                    ..settings(1 << 20)
                },
            )
            .unwrap();
            let k = key("", 9);
            store
                .put(k.clone(), Bytes::from_static(b"old"))
                .await
                .unwrap();
            let old = store.get(&k).await.unwrap().unwrap();
            store
                .put(k.clone(), Bytes::from_static(b"new"))
                .await
                .unwrap();
            store.remove(&k, &old);
            let new = store.get(&k).await.unwrap().unwrap();
            assert_eq!(
                new.data,
                Bytes::from_static(b"new"),
                "memory {memory_bytes}"
            );
            store.remove(&k, &new);
            assert!(
                store.get(&k).await.unwrap().is_none(),
                "memory {memory_bytes}"
            );
        }
    }

    #[tokio::test]
    async fn evicts_least_recently_used_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AcStore::open(dir.path(), settings(3 * BLOCK)).unwrap();
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
        assert_eq!(store.usage(), (3, 3 * BLOCK), "each counted as a block");
    }

    #[test]
    fn entries_are_counted_in_whole_blocks() {
        assert_eq!(charged(0), BLOCK);
        assert_eq!(charged(1), BLOCK);
        assert_eq!(charged(BLOCK), BLOCK);
        assert_eq!(charged(BLOCK + 1), 2 * BLOCK);
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

    #[tokio::test]
    async fn memory_copies_follow_puts_evictions_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = AcStore::open(dir.path(), settings(3 * BLOCK)).unwrap();
        store
            .put(key("", 1), Bytes::from_static(b"first"))
            .await
            .unwrap();
        let first = store.get(&key("", 1)).await.unwrap().unwrap();
        first.checked.removals.store(7, Ordering::Relaxed);
        // Served from memory even with the file gone (the index says it exists)...
        std::fs::remove_file(store.inner.layout.blob_path(&key("", 1))).unwrap();
        let again = store.get(&key("", 1)).await.unwrap().unwrap();
        assert_eq!(again.data, Bytes::from_static(b"first"));
        assert_eq!(
            again.checked.removals.load(Ordering::Relaxed),
            7,
            "one shared check mark"
        );
        // ...and a put replaces the copy and its check mark.
        store
            .put(key("", 1), Bytes::from_static(b"second"))
            .await
            .unwrap();
        let second = store.get(&key("", 1)).await.unwrap().unwrap();
        assert_eq!(second.data, Bytes::from_static(b"second"));
        assert_eq!(
            second.checked.removals.load(Ordering::Relaxed),
            NEVER_CHECKED
        );
        // An evicted entry is not served from memory.
        for n in 2..5 {
            store
                .put(key("", n), Bytes::from(vec![n; 10]))
                .await
                .unwrap();
        }
        assert!(store.get(&key("", 1)).await.unwrap().is_none(), "evicted");
        // Nor a removed one.
        let fourth = store.get(&key("", 4)).await.unwrap().unwrap();
        store.remove(&key("", 4), &fourth);
        assert!(store.get(&key("", 4)).await.unwrap().is_none(), "removed");
        // Without memory, every hit reads its file.
        let (plain, _) = AcStore::open(
            dir.path(),
            AcSettings {
                memory_bytes: 0,
                ..settings(3 * BLOCK)
            },
        )
        .unwrap();
        assert_eq!(
            plain.get(&key("", 3)).await.unwrap().unwrap().data,
            Bytes::from(vec![3u8; 10])
        );
    }
}
