//! Start-up: rebuild every shard's index from the files on disk, oldest access first, so that
//! eviction after a restart removes what was least recently used before it. Directories are
//! scanned on several threads (a large CAS is mostly `stat` calls). Files whose size does not
//! match their name (cut short by a crash) are deleted; the temp directory is emptied.

use super::atime;
use super::index::Entry;
use super::layout::{parse_blob_file_name, Layout, INSTANCE_FILE};
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
/// chosen by `owner_of`.
pub fn scan(
    layout: &Layout,
    kind: TreeKind,
    shards: usize,
    threads: usize,
    owner_of: impl Fn(&BlobKey) -> usize + Sync,
) -> io::Result<(ShardEntries, ScanReport)> {
    let start = Instant::now();
    std::fs::create_dir_all(layout.tree_dir())?;
    std::fs::create_dir_all(layout.tmp_dir())?;
    let mut report = ScanReport::default();
    for entry in std::fs::read_dir(layout.tmp_dir())? {
        let path = entry?.path();
        if std::fs::remove_file(&path).is_ok() {
            report.temp_removed += 1;
        }
    }

    let mut work: Vec<(InstanceName, DigestFunction, PathBuf)> = Vec::new();
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
                let p = sub.path();
                if p.is_dir() {
                    work.push((instance.clone(), function, p));
                }
            }
        }
    }

    let next = AtomicUsize::new(0);
    let results: Mutex<(ShardEntries, ScanReport)> = Mutex::new((
        (0..shards).map(|_| Vec::new()).collect(),
        ScanReport::default(),
    ));
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut local: ShardEntries = (0..shards).map(|_| Vec::new()).collect();
                let mut counts = ScanReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((instance, function, dir)) = work.get(i) else {
                        break;
                    };
                    scan_dir(
                        kind,
                        instance,
                        *function,
                        dir,
                        &owner_of,
                        &mut local,
                        &mut counts,
                    );
                }
                let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                for (shard, entries) in local.into_iter().enumerate() {
                    all.0[shard].extend(entries);
                }
                all.1.blobs += counts.blobs;
                all.1.bytes += counts.bytes;
                all.1.removed += counts.removed;
                all.1.ignored += counts.ignored;
            });
        }
    });
    let (mut entries, counts) = results.into_inner().unwrap_or_else(|e| e.into_inner());
    for shard in &mut entries {
        shard.sort_by_key(|(_, e)| e.atime);
    }
    report.blobs = counts.blobs;
    report.bytes = counts.bytes;
    report.removed = counts.removed;
    report.ignored = counts.ignored;
    report.elapsed = start.elapsed();
    Ok((entries, report))
}

fn read_instance_name(dir: &Path) -> Option<InstanceName> {
    let text = std::fs::read(dir.join(INSTANCE_FILE)).ok()?;
    InstanceName::new(std::str::from_utf8(&text).ok()?).ok()
}

fn scan_dir(
    kind: TreeKind,
    instance: &InstanceName,
    function: DigestFunction,
    dir: &Path,
    owner_of: &impl Fn(&BlobKey) -> usize,
    out: &mut ShardEntries,
    counts: &mut ScanReport,
) {
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
