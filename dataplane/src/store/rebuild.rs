//! The background rebuild of the index. The server starts serving before it reads any blob
//! directory ([`super::scan`] with `defer`); every directory is listed here, on threads of its
//! own: from the index snapshot of the last clean stop when the directory is unchanged since
//! (its stamp matches), from its files otherwise (all of them after a crash without a
//! snapshot, the ones written since the last clean stop otherwise). Until an owner has the
//! listings, it answers for each blob of those directories by looking at its file (see
//! `owner/rebuild.rs`), so answers are correct meanwhile. The listings are delivered at once,
//! when all are taken, so that each owner can place the blobs among the others by access time
//! in one pass (eviction order stays what it was before the restart).

use super::commands::Command;
use super::scan::{oldest_first, scan_dirs, DirWork, ScanReport, ShardEntries, TreeKind};
use super::snapshot::{self, DirKey, Snapshot};
use super::CasClient;
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::time::Instant;
use tracing::{info, warn};

/// A blob directory whose listing the index still lacks.
#[derive(Debug, Clone)]
pub struct PendingDir {
    /// Which directory.
    pub key: DirKey,
    /// Where it is.
    pub path: PathBuf,
}

/// The listings of some pending directories, by owner shard, oldest first.
pub struct Listings {
    dirs: Vec<DirKey>,
    shards: ShardEntries,
    /// Blob files whose size does not match their name (cut short by a crash), by shard.
    damaged: Vec<Vec<BlobKey>>,
    counts: ScanReport,
}

/// Lists `dirs` on `threads` threads (each from `snapshot` when unchanged since, else from its
/// files). Files cut short by a crash are not deleted here but by their owners, on their file
/// lanes, unless a commit has replaced them meanwhile.
pub fn list(
    dirs: &[PendingDir],
    snapshot: Option<&Snapshot>,
    cas: &CasClient,
    threads: usize,
) -> Listings {
    let work: Vec<DirWork> = dirs
        .iter()
        .map(|d| (d.key.instance.clone(), d.key.function, d.path.clone()))
        .collect();
    let (mut shards, counts, found_damaged) = scan_dirs(
        TreeKind::Blobs,
        &work,
        snapshot,
        cas.shard_count(),
        threads,
        &|k: &BlobKey| cas.owner_of(&k.digest),
        false,
    );
    oldest_first(&mut shards);
    let mut damaged: Vec<Vec<BlobKey>> = vec![Vec::new(); shards.len()];
    for key in found_damaged {
        damaged[cas.owner_of(&key.digest)].push(key);
    }
    Listings {
        dirs: dirs.iter().map(|d| d.key.clone()).collect(),
        shards,
        damaged,
        counts,
    }
}

/// Hands the listings to every owner shard (each takes its blobs and stops treating the
/// directories as pending). Blocks while a shard's queue is full; false once the shards have
/// stopped.
pub fn deliver(listings: Listings, cas: &CasClient) -> bool {
    for (shard, (entries, damaged)) in listings
        .shards
        .into_iter()
        .zip(listings.damaged)
        .enumerate()
    {
        let command = Command::Listed {
            dirs: listings.dirs.clone(),
            entries,
            damaged,
        };
        if cas.send_blocking(shard, command).is_err() {
            return false;
        }
    }
    true
}

/// Lists and delivers `dirs` on a thread of its own (`kiln-rebuild`, listing with `threads`),
/// with the index snapshot at `snapshot_file` when there is a usable one.
pub fn start(
    dirs: Vec<PendingDir>,
    snapshot_file: PathBuf,
    cas: CasClient,
    threads: usize,
) -> std::io::Result<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("kiln-rebuild".into())
        .spawn(move || {
            let started = Instant::now();
            let snapshot = snapshot::load(&snapshot_file);
            let listings = list(&dirs, snapshot.as_ref(), &cas, threads);
            drop(snapshot);
            let ScanReport {
                blobs,
                dirs_from_snapshot,
                dirs_scanned,
                ..
            } = listings.counts;
            let damaged: usize = listings.damaged.iter().map(Vec::len).sum();
            if !deliver(listings, &cas) {
                return;
            }
            if damaged > 0 {
                warn!(
                    damaged,
                    "blob files cut short (by a crash?) found by the index rebuild; their owners delete them unless uploaded again meanwhile"
                );
            }
            info!(
                directories = dirs.len(),
                from_snapshot = dirs_from_snapshot,
                scanned = dirs_scanned,
                blobs,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index rebuilt in the background"
            );
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::server::OpenedStore;
    use crate::store::layout::Layout;
    use crate::store::tier::VerifiedUpload;
    use futures::executor::block_on;
    use kiln_config::Config;
    use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};

    fn blob(n: u32) -> Vec<u8> {
        n.to_le_bytes().repeat(1 + n as usize % 7)
    }

    fn key(data: &[u8]) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, data),
        )
    }

    /// A CAS under `dir` holding 300 test blobs written straight into its layout (as a run
    /// left them); with the blobs and their keys.
    fn stored(dir: &std::path::Path) -> (Layout, Vec<Vec<u8>>, Vec<BlobKey>) {
        let layout = Layout::cas(dir);
        std::fs::create_dir_all(layout.tree_dir()).unwrap();
        layout.reset_temp_dirs().unwrap();
        let data: Vec<Vec<u8>> = (0..300).map(blob).collect();
        let keys: Vec<BlobKey> = data.iter().map(|d| key(d)).collect();
        for (k, d) in keys.iter().zip(&data) {
            layout.ensure_blob_dir(k).unwrap();
            std::fs::write(layout.blob_path(k), d).unwrap();
        }
        (layout, data, keys)
    }

    /// A two-shard server's configuration for the data directory `dir`, fsync off.
    fn config_for(dir: &std::path::Path) -> Config {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[storage]\ndata_dir = {:?}\nfsync = false\naccess_time_resolution_secs = 0\n",
            dir.display().to_string()
        );
        Config::from_toml(&text, "test").unwrap()
    }

    /// A start from a snapshot stopped before the rebuild delivered anything (held here):
    /// the snapshot it writes still lists every directory, carried over from the one it
    /// started from, so the next start does not scan.
    #[test]
    fn a_stop_before_the_rebuild_delivers_keeps_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, _, _) = stored(dir.path());
        let (entries, _, _) = crate::store::scan::scan(
            &layout,
            crate::store::scan::TreeKind::Blobs,
            1,
            1,
            None,
            false,
            |_| 0,
        )
        .unwrap();
        let grouped = snapshot::group(entries[0].iter().map(|(k, e)| (k.clone(), *e)));
        let written = snapshot::stamp(&layout, vec![grouped]);
        snapshot::write(&layout.index_file(), &written).unwrap();
        let config = config_for(dir.path());
        let mut store = OpenedStore::open(&config, 2, Metrics::new()).unwrap();
        let held = store.hold_rebuild();
        assert_eq!(held.len(), written.len(), "every directory pending");
        let mut plane = crate::store::tier::behaviour::serve(&config, store);
        drop(plane.begin_shutdown());
        plane.finish_shutdown();
        let after = snapshot::load(&layout.index_file()).expect("a snapshot");
        assert_eq!(after, written);
    }

    /// A store left by a run that stopped without a snapshot (a crash): the next start serves
    /// at once, with every directory pending. Held here, the rebuild runs when the test says:
    /// before it, stored blobs are found (and read, checked) by their files, a file cut short
    /// and a made-up digest are missing; a blob removed after its directory was listed is not
    /// brought back by the listing, one stored meanwhile is kept, and nothing is counted twice.
    #[test]
    fn answers_are_right_before_the_rebuild_delivers_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, data, keys) = stored(dir.path());
        // Cut short by the crash.
        let short = keys[299].clone();
        std::fs::write(layout.blob_path(&short), &data[299][..1]).unwrap();
        let good = &keys[..299];
        let good_bytes: u64 = data[..299].iter().map(|d| d.len() as u64).sum();

        let config = config_for(dir.path());
        let mut store = OpenedStore::open(&config, 2, Metrics::new()).unwrap();
        assert_eq!(store.report().blobs, 0, "nothing scanned before serving");
        assert!(store.report().dirs_pending > 100, "{:?}", store.report());
        let held = store.hold_rebuild();
        let cas = store.cas();
        let chain = store.chain();
        let _plane = crate::store::tier::behaviour::serve(&config, store);

        let absent = key(b"never stored");
        let mut asked = keys.clone();
        asked.push(absent.clone());
        let mut expected = vec![true; 299];
        expected.extend([false, false]);
        assert_eq!(block_on(chain.contains(&asked)).unwrap(), expected);
        let read = block_on(chain.open(&keys[7])).unwrap().unwrap();
        assert!(
            read.needs_check(),
            "found on disk: checked on its first read"
        );
        assert_eq!(read.read_all_blocking().unwrap(), data[7]);
        let stats = block_on(cas.stats()).unwrap();
        assert_eq!(stats.iter().map(|s| s.blobs).sum::<u64>(), 299);
        assert!(stats.iter().all(|s| s.pending_dirs > 0));
        assert_eq!(cas.accounting().used(), good_bytes);

        // The listings are taken; then a blob goes and another comes.
        let listings = list(&held, None, &cas, 2);
        assert_eq!(
            listings.damaged.concat(),
            vec![short.clone()],
            "the short file"
        );
        assert!(layout.blob_path(&short).exists(), "left to its owner");
        let gone = good[3].clone();
        block_on(cas.drop_changed(&gone));
        let new = blob(1000);
        let new_key = key(&new);
        let temp = layout.temp_path();
        std::fs::write(&temp, &new).unwrap();
        let upload = VerifiedUpload {
            temp: Some(temp),
            data: None,
            epoch: cas.sync_epoch(),
        };
        block_on(chain.put(&new_key, upload)).unwrap();
        assert!(deliver(listings, &cas));

        let stats = block_on(cas.stats()).unwrap();
        assert!(stats.iter().all(|s| s.pending_dirs == 0), "{stats:?}");
        assert_eq!(stats.iter().map(|s| s.blobs).sum::<u64>(), 299);
        let gone_bytes = data[3].len() as u64;
        assert_eq!(
            cas.accounting().used(),
            good_bytes - gone_bytes + new.len() as u64,
            "each blob counted once"
        );
        let mut asked = good.to_vec();
        asked.extend([gone.clone(), new_key.clone(), short.clone(), absent]);
        let mut expected = vec![true; 299];
        expected[3] = false;
        expected.extend([false, true, false, false]);
        assert_eq!(block_on(chain.contains(&asked)).unwrap(), expected);
        // The short file is deleted by its owner, on its file lane: a lookup of a blob the
        // index lacks answers without the lane, so the deletion is awaited (it flaked under
        // load when taken to be done by then).
        assert!(block_on(chain.open(&short)).unwrap().is_none());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while layout.blob_path(&short).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!layout.blob_path(&short).exists());
    }
}
