//! Start-up: rebuild every shard's index from the files on disk, oldest access first, so that
//! eviction after a restart removes what was least recently used before it. Directories are
//! scanned on several threads (a large CAS is mostly `stat` calls). Files whose size does not
//! match their name (cut short by a crash) are deleted; the temp directory is emptied. With
//! an index snapshot from the last clean stop, a directory unchanged since then is taken from
//! the snapshot and only the others are scanned (see [`super::snapshot`]). The server's CAS
//! defers all of this to the background rebuild ([`super::rebuild`]), which lists the
//! directories the same way, so that a start never waits for the index.

use super::atime;
use super::index::Entry;
use super::layout::{parse_blob_file_name, Layout, INSTANCE_FILE};
use super::rebuild::PendingDir;
use super::snapshot::{DirKey, DirSnapshot, DirStamp, Snapshot};
use kiln_reapi::digest::{BlobKey, DigestFunction, InstanceName};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::warn;

/// What the scan found.
#[derive(Debug, Default, Clone)]
pub struct ScanReport {
    /// Blobs indexed.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Damaged blob files deleted.
    pub removed: u64,
    /// Files in the CAS tree that are not blobs (left alone).
    pub ignored: u64,
    /// Leftover upload temp files deleted.
    pub temp_removed: u64,
    /// Blob directories taken from the index snapshot.
    pub dirs_from_snapshot: u64,
    /// Blob directories scanned file by file.
    pub dirs_scanned: u64,
    /// Blob directories left to the background rebuild ([`super::rebuild`]).
    pub dirs_pending: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// The blobs of each shard, oldest first.
pub type ShardEntries = Vec<Vec<(BlobKey, Entry)>>;

/// What the files of a tree hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// CAS blobs: a file's size must equal the size in its name (else it is damaged).
    Blobs,
    /// Entries keyed by a digest but holding other data (action results): any size.
    Entries,
}

/// Creates the directories, empties `tmp/`, and indexes `cas/` for `shards` shards, owner
/// chosen by `owner_of`; directories whose stamp matches `snapshot` come from it. With
/// `defer`, no blob directory is read (nor its stamp): all are returned, for the background
/// rebuild to list (from the snapshot it loads itself, or from their files).
pub fn scan(
    layout: &Layout,
    kind: TreeKind,
    shards: usize,
    threads: usize,
    snapshot: Option<&Snapshot>,
    defer: bool,
    owner_of: impl Fn(&BlobKey) -> usize + Sync,
) -> io::Result<(ShardEntries, ScanReport, Vec<PendingDir>)> {
    let start = Instant::now();
    std::fs::create_dir_all(layout.tree_dir())?;
    // The tree's own entry, made on a first start, is durable before anything is committed
    // into it (commits sync the directories below it).
    if let Some(data_dir) = layout.tree_dir().parent() {
        super::durable::sync_dir(data_dir)?;
    }
    let mut report = ScanReport {
        temp_removed: layout.reset_temp_dirs()?,
        ..ScanReport::default()
    };

    let mut work: Vec<DirWork> = Vec::new();
    let mut pending: Vec<PendingDir> = Vec::new();
    for entry in std::fs::read_dir(layout.tree_dir())? {
        let dir = entry?.path();
        if !dir.is_dir() {
            continue;
        }
        let Some(instance) = read_instance_name(&dir) else {
            warn!(dir = %dir.display(), "CAS directory without a readable {INSTANCE_FILE} file; skipped");
            continue;
        };
        for function in DigestFunction::ALL {
            let fdir = dir.join(function.name());
            let Ok(fanout) = std::fs::read_dir(&fdir) else {
                continue;
            };
            for sub in fanout.flatten() {
                if !is_dir(&sub) {
                    continue;
                }
                let path = sub.path();
                match fanout_byte(&path).filter(|_| defer) {
                    Some(fanout) => {
                        let key = DirKey {
                            instance: instance.clone(),
                            function,
                            fanout,
                        };
                        pending.push(PendingDir { key, path });
                    }
                    None => work.push((instance.clone(), function, path)),
                }
            }
        }
    }

    let (mut entries, counts, _) =
        scan_dirs(kind, &work, snapshot, shards, threads, &owner_of, true);
    oldest_first(&mut entries);
    report.add(&counts);
    report.dirs_pending = pending.len() as u64;
    report.elapsed = start.elapsed();
    Ok((entries, report, pending))
}

impl ScanReport {
    /// Adds the counts of another part of the scan.
    fn add(&mut self, other: &ScanReport) {
        self.blobs += other.blobs;
        self.bytes += other.bytes;
        self.removed += other.removed;
        self.ignored += other.ignored;
        self.dirs_from_snapshot += other.dirs_from_snapshot;
        self.dirs_scanned += other.dirs_scanned;
    }
}

/// Sorts each shard's entries oldest access first, each shard on a thread of its own (a
/// million entries take a while to sort).
pub(crate) fn oldest_first(entries: &mut ShardEntries) {
    std::thread::scope(|scope| {
        for shard in entries.iter_mut() {
            scope.spawn(move || shard.sort_unstable_by_key(|(_, e)| e.atime));
        }
    });
}

/// Whether a directory entry is a directory (following a symlink, as the paths through it
/// do), without a `stat` when the listing already says.
fn is_dir(entry: &std::fs::DirEntry) -> bool {
    match entry.file_type() {
        Ok(t) if t.is_symlink() => std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()),
        Ok(t) => t.is_dir(),
        Err(_) => false,
    }
}

/// The listing of the blob directory `dir` in `snapshot`, when it has one and the directory
/// is unchanged since it was written (its stamp matches).
fn from_snapshot<'s>(
    snapshot: Option<&'s Snapshot>,
    instance: &InstanceName,
    function: DigestFunction,
    dir: &Path,
) -> Option<&'s DirSnapshot> {
    let key = DirKey {
        instance: instance.clone(),
        function,
        fanout: fanout_byte(dir)?,
    };
    let known = snapshot?.get(&key)?;
    let meta = std::fs::metadata(dir).ok()?;
    (DirStamp::of(&meta) == known.stamp).then_some(known)
}

/// A blob directory to scan: its instance, digest function and path.
pub(crate) type DirWork = (InstanceName, DigestFunction, PathBuf);

/// Lists `work` on `threads` threads, each directory from `snapshot` when it is unchanged
/// since, from its files otherwise; the blobs found, by owner shard (in no order), the
/// counts, and (unless `delete_damaged`, which deletes them) the blob files whose size does
/// not match their name.
pub(crate) fn scan_dirs(
    kind: TreeKind,
    work: &[DirWork],
    snapshot: Option<&Snapshot>,
    shards: usize,
    threads: usize,
    owner_of: &(impl Fn(&BlobKey) -> usize + Sync),
    delete_damaged: bool,
) -> (ShardEntries, ScanReport, Vec<BlobKey>) {
    let next = AtomicUsize::new(0);
    let results: Mutex<(ShardEntries, ScanReport, Vec<BlobKey>)> = Mutex::new((
        (0..shards).map(|_| Vec::new()).collect(),
        ScanReport::default(),
        Vec::new(),
    ));
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut local: ShardEntries = (0..shards).map(|_| Vec::new()).collect();
                let mut counts = ScanReport::default();
                let mut damaged = (!delete_damaged).then(Vec::new);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((instance, function, dir)) = work.get(i) else {
                        break;
                    };
                    if let Some(known) = from_snapshot(snapshot, instance, *function, dir) {
                        counts.dirs_from_snapshot += 1;
                        for &(digest, atime, size) in &known.blobs {
                            let key = BlobKey::new(instance.clone(), digest);
                            // A blob is counted as its digest's size whatever the file says.
                            let size = if kind == TreeKind::Blobs {
                                digest.size
                            } else {
                                size
                            };
                            counts.blobs += 1;
                            counts.bytes += size;
                            local[owner_of(&key)].push((key, Entry::scanned(size, atime)));
                        }
                        continue;
                    }
                    counts.dirs_scanned += 1;
                    scan_dir(
                        kind,
                        instance,
                        *function,
                        dir,
                        &owner_of,
                        &mut local,
                        &mut counts,
                        damaged.as_mut(),
                    );
                }
                let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                for (shard, entries) in local.into_iter().enumerate() {
                    all.0[shard].extend(entries);
                }
                all.1.add(&counts);
                all.2.extend(damaged.unwrap_or_default());
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// The fan-out byte a blob directory is named for (`"ab"` → 0xab).
fn fanout_byte(dir: &Path) -> Option<u8> {
    let name = dir.file_name()?.to_str()?;
    let byte = u8::from_str_radix(name, 16).ok()?;
    (name == hex::encode([byte])).then_some(byte)
}

fn read_instance_name(dir: &Path) -> Option<InstanceName> {
    let text = std::fs::read(dir.join(INSTANCE_FILE)).ok()?;
    InstanceName::new(std::str::from_utf8(&text).ok()?).ok()
}

/// Indexes the blob files of one directory into `out` by owner shard. Blob files whose size
/// does not match their name go to `damaged`, or are deleted when it is `None`.
#[allow(clippy::too_many_arguments)]
fn scan_dir(
    kind: TreeKind,
    instance: &InstanceName,
    function: DigestFunction,
    dir: &Path,
    owner_of: &impl Fn(&BlobKey) -> usize,
    out: &mut ShardEntries,
    counts: &mut ScanReport,
    damaged: Option<&mut Vec<BlobKey>>,
) {
    let mut damaged = damaged;
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    let fanout = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    for file in files.flatten() {
        let name = file.file_name();
        let Some(digest) = name
            .to_str()
            .and_then(|n| parse_blob_file_name(function, n))
        else {
            counts.ignored += 1;
            continue;
        };
        if hex::encode([digest.hash[0]]) != fanout {
            counts.ignored += 1;
            continue;
        }
        let path = file.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            counts.ignored += 1;
            continue;
        }
        if kind == TreeKind::Blobs && meta.len() != digest.size {
            if let Some(d) = damaged.as_mut() {
                d.push(BlobKey::new(instance.clone(), digest));
                continue;
            }
            warn!(path = %path.display(), found = meta.len(), "blob file has the wrong size (cut short by a crash?); deleting it");
            if std::fs::remove_file(&path).is_ok() {
                counts.removed += 1;
            }
            continue;
        }
        let atime = meta
            .accessed()
            .or_else(|_| meta.modified())
            .map_or(0, atime::from_system_time);
        let key = BlobKey::new(instance.clone(), digest);
        counts.blobs += 1;
        counts.bytes += meta.len();
        let shard = owner_of(&key);
        out[shard].push((key, Entry::scanned(meta.len(), atime)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::snapshot;

    /// Stores `n`-th test blob as a file, as a commit would.
    fn put(layout: &Layout, n: u32) -> BlobKey {
        let data = n.to_le_bytes().repeat(1 + n as usize % 5);
        let key = BlobKey::new(
            InstanceName::new("main").unwrap(),
            kiln_reapi::digest::Digest::of(DigestFunction::Sha256, &data),
        );
        layout.ensure_blob_dir(&key).unwrap();
        std::fs::write(layout.blob_path(&key), &data).unwrap();
        key
    }

    fn keys(entries: &ShardEntries) -> std::collections::BTreeSet<BlobKey> {
        entries.iter().flatten().map(|(k, _)| k.clone()).collect()
    }

    /// Waits until the filesystem's clock has moved past `stamp` (directory times are coarse:
    /// a change within the same tick as the stamp would be invisible to it).
    fn wait_for_tick_after(scratch: &Path, dir: &Path) {
        let stamp = DirStamp::of(&std::fs::metadata(dir).unwrap());
        for _ in 0..100_000 {
            std::fs::write(scratch.join("tick"), b"x").unwrap();
            let probe = DirStamp::of(&std::fs::metadata(scratch).unwrap());
            if probe.mtime > stamp.mtime && probe.ctime > stamp.ctime {
                return;
            }
            std::fs::remove_file(scratch.join("tick")).unwrap();
        }
        panic!("the filesystem clock did not move");
    }

    /// An empty CAS under `dir`, its directories made.
    fn empty_store(dir: &Path) -> Layout {
        let layout = Layout::cas(&dir.join("data"));
        std::fs::create_dir_all(layout.tree_dir()).unwrap();
        layout.reset_temp_dirs().unwrap();
        layout
    }

    #[test]
    fn unchanged_directories_come_from_the_snapshot_and_changed_ones_are_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let layout = empty_store(dir.path());
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let stored: Vec<BlobKey> = (0..300).map(|n| put(&layout, n)).collect();
        let owner_of = |k: &BlobKey| (k.digest.hash[1] % 2) as usize;
        let (entries, report, _) =
            scan(&layout, TreeKind::Blobs, 2, 2, None, false, owner_of).unwrap();
        assert_eq!(report.blobs, 300);
        assert_eq!(report.dirs_from_snapshot, 0);
        let dirs = report.dirs_scanned;

        // The snapshot a clean stop would write, read back.
        let grouped = entries
            .iter()
            .map(|shard| snapshot::group(shard.iter().map(|(k, e)| (k.clone(), *e))))
            .collect();
        snapshot::write(&layout.index_file(), &snapshot::stamp(&layout, grouped)).unwrap();
        let snap = snapshot::load(&layout.index_file()).unwrap();
        let (again, report, _) =
            scan(&layout, TreeKind::Blobs, 2, 2, Some(&snap), false, owner_of).unwrap();
        assert_eq!((report.dirs_from_snapshot, report.dirs_scanned), (dirs, 0));
        assert_eq!(keys(&again), keys(&entries));
        assert_eq!(
            report.bytes,
            entries.iter().flatten().map(|(_, e)| e.size).sum::<u64>()
        );
        for (key, entry) in again.iter().flatten() {
            assert!(
                !entry.verified,
                "{key:?}: snapshot entries are hashed on first read"
            );
            assert_eq!(
                owner_of(key),
                again
                    .iter()
                    .position(|s| s.iter().any(|(k, _)| k == key))
                    .unwrap()
            );
        }

        // Behind the server's back: one blob removed, one added in another directory.
        wait_for_tick_after(&scratch, &layout.blob_dir(&stored[0]));
        std::fs::remove_file(layout.blob_path(&stored[0])).unwrap();
        let added = (300..400)
            .map(|n| put(&layout, n))
            .find(|k| k.digest.hash[0] != stored[0].digest.hash[0])
            .unwrap();
        let on_disk: std::collections::BTreeSet<BlobKey> = {
            let (fresh, _, _) =
                scan(&layout, TreeKind::Blobs, 2, 2, None, false, owner_of).unwrap();
            keys(&fresh)
        };
        let (after, report, _) =
            scan(&layout, TreeKind::Blobs, 2, 2, Some(&snap), false, owner_of).unwrap();
        assert_eq!(keys(&after), on_disk, "exactly what is on disk");
        assert!(!keys(&after).contains(&stored[0]));
        assert!(keys(&after).contains(&added));
        assert!(report.dirs_scanned >= 2, "{report:?}");
        assert!(report.dirs_from_snapshot > 0, "{report:?}");

        // A torn snapshot is not used at all.
        let bytes = std::fs::read(layout.index_file()).unwrap();
        std::fs::write(layout.index_file(), &bytes[..bytes.len() / 2]).unwrap();
        assert!(snapshot::load(&layout.index_file()).is_none());
    }

    /// A stop before the rebuild delivered anything (no blob indexed, every directory
    /// pending) keeps the listings the start found in the last snapshot, for every directory
    /// unchanged since: not one that gained a file, nor one that was delivered.
    #[test]
    fn a_stop_before_the_rebuild_carries_unchanged_directories_over() {
        let dir = tempfile::tempdir().unwrap();
        let layout = empty_store(dir.path());
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let stored: Vec<BlobKey> = (0..200).map(|n| put(&layout, n)).collect();
        let owner_of = |_: &BlobKey| 0;
        let (entries, _, _) = scan(&layout, TreeKind::Blobs, 1, 1, None, false, owner_of).unwrap();
        let grouped = vec![snapshot::group(
            entries[0].iter().map(|(k, e)| (k.clone(), *e)),
        )];
        let previous = snapshot::stamp(&layout, grouped);
        let dirs = previous.len();
        // A file added to one directory after that snapshot.
        wait_for_tick_after(&scratch, &layout.blob_dir(&stored[0]));
        let fanout = |n: u32| {
            let data = n.to_le_bytes().repeat(1 + n as usize % 5);
            kiln_reapi::digest::Digest::of(DigestFunction::Sha256, &data).hash[0]
        };
        let n = (1000..)
            .find(|&n| fanout(n) == stored[0].digest.hash[0])
            .unwrap();
        let added = put(&layout, n);
        let mut stopped = snapshot::stamp(&layout, vec![snapshot::Grouped::new()]);
        assert!(stopped.is_empty(), "nothing indexed: nothing listed");
        let all: std::collections::HashSet<snapshot::DirKey> = previous.keys().cloned().collect();
        let carried = snapshot::carry_over(&layout, &mut stopped, previous.clone(), &all);
        assert_eq!(carried, dirs - 1, "all but the changed directory");
        let changed = snapshot::DirKey {
            instance: added.instance.clone(),
            function: added.digest.function,
            fanout: added.digest.hash[0],
        };
        assert!(!stopped.contains_key(&changed));
        for (key, listed) in &stopped {
            assert_eq!(Some(listed), previous.get(key));
        }
        // A directory the stop listed itself is kept as it listed it.
        let first = previous.keys().next().unwrap().clone();
        let mine = snapshot::DirSnapshot {
            stamp: previous[&first].stamp,
            blobs: Vec::new(),
        };
        let mut own = snapshot::Snapshot::from([(first.clone(), mine.clone())]);
        snapshot::carry_over(&layout, &mut own, previous.clone(), &all);
        assert_eq!(own[&first], mine);
        assert_eq!(own.len(), dirs - usize::from(first != changed));
        // Only pending directories: one the rebuild delivered and the stop left out (its
        // index disagreed with its files) is left to the next start's scan.
        let unchanged = previous.keys().find(|k| **k != changed).unwrap().clone();
        let mut only = snapshot::Snapshot::new();
        let one = std::collections::HashSet::from([unchanged.clone()]);
        assert_eq!(
            snapshot::carry_over(&layout, &mut only, previous.clone(), &one),
            1
        );
        assert_eq!(only.keys().collect::<Vec<_>>(), [&unchanged]);
    }

    #[test]
    fn a_directory_whose_files_differ_from_the_index_is_left_out_of_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let layout = empty_store(dir.path());
        let stored: Vec<BlobKey> = (0..50).map(|n| put(&layout, n)).collect();
        let owner_of = |_: &BlobKey| 0;
        let (entries, _, _) = scan(&layout, TreeKind::Blobs, 1, 1, None, false, owner_of).unwrap();
        let grouped = || {
            vec![snapshot::group(
                entries[0].iter().map(|(k, e)| (k.clone(), *e)),
            )]
        };
        let all = snapshot::stamp(&layout, grouped()).len();
        // The index believes in a blob whose file is gone (removed behind its back, or an
        // unlink that finished after the owner's blobs were grouped): that directory is out.
        std::fs::remove_file(layout.blob_path(&stored[0])).unwrap();
        let snap = snapshot::stamp(&layout, grouped());
        assert_eq!(snap.len(), all - 1);
        let gone = snapshot::DirKey {
            instance: stored[0].instance.clone(),
            function: stored[0].digest.function,
            fanout: stored[0].digest.hash[0],
        };
        assert!(!snap.contains_key(&gone));
        // A file the index does not list (a commit that finished late): out as well.
        std::fs::write(layout.blob_path(&stored[0]), b"back").unwrap();
        let extra = put(&layout, 1000);
        let snap = snapshot::stamp(&layout, grouped());
        let extra_dir = snapshot::DirKey {
            instance: extra.instance.clone(),
            function: extra.digest.function,
            fanout: extra.digest.hash[0],
        };
        assert!(!snap.contains_key(&extra_dir));
    }
}
