//! The log over real segment files in a temp directory: stores, restarts, damage, eviction.
//! (The behaviour every store shows is tested in `behaviour.rs`, with the log in a chain.)

use super::*;
use crate::store::tier::behaviour::{key, Plane};
use futures::executor::block_on;
use std::sync::Mutex as StdMutex;

const MIB: u64 = 1 << 20;

fn options(cap: u64) -> LogOptions {
    LogOptions {
        cap,
        segment: MIB,
        max_blob: 64 << 10,
        durable: true,
    }
}

/// Remembers what it is told is gone.
#[derive(Default)]
struct Forgotten(StdMutex<Vec<BlobKey>>);

impl BlobEvents for Forgotten {
    fn forget(&self, key: &BlobKey) {
        self.0.lock().unwrap().push(key.clone());
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    metrics: Arc<Metrics>,
    forgotten: Arc<Forgotten>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            metrics: Metrics::new(),
            forgotten: Arc::default(),
        }
    }

    fn open(&self, options: LogOptions) -> SmallBlobLog {
        let events: Vec<Arc<dyn BlobEvents>> = vec![self.forgotten.clone()];
        SmallBlobLog::open(self.dir.path(), options, events, self.metrics.clone()).unwrap()
    }

    /// Bytes of segment files.
    fn on_disk(&self) -> u64 {
        self.segment_files()
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum()
    }

    fn segment_files(&self) -> Vec<PathBuf> {
        self.files("seg")
    }

    /// The files of the log's directory ending in `.{ext}`, in name order.
    fn files(&self, ext: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        files.sort();
        files
    }
}

/// A blob of `size` bytes (at least 4) unique to `n`.
fn blob(n: u32, size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(7) as u8)
        .collect();
    data[..4].copy_from_slice(&n.to_le_bytes());
    data
}

fn in_memory(data: &[u8]) -> VerifiedUpload {
    VerifiedUpload {
        temp: None,
        data: Some(Bytes::copy_from_slice(data)),
        epoch: 0,
    }
}

fn put(log: &SmallBlobLog, data: &[u8]) -> Committed {
    block_on(log.put(&key(data), in_memory(data))).unwrap()
}

fn read(log: &SmallBlobLog, k: &BlobKey) -> Option<Bytes> {
    block_on(log.open(k))
        .unwrap()
        .map(|b| b.read_all_blocking().unwrap())
}

#[test]
fn blobs_are_found_again_after_a_restart_and_a_torn_tail_is_cut() {
    let fx = Fixture::new();
    let blobs: Vec<Vec<u8>> = (0..50).map(|n| blob(n, 100 + n as usize * 300)).collect();
    {
        let log = fx.open(options(64 * MIB));
        for b in &blobs {
            assert_eq!(put(&log, b), Committed::Stored);
        }
        assert_eq!(put(&log, &blobs[3]), Committed::AlreadyPresent);
    }
    // A crash while a batch was being written: half a record at the end of the last segment.
    let last = fx.segment_files().pop().unwrap();
    let mut torn = record::header(&key(b"never acknowledged"), b"never acknowledged");
    torn.extend_from_slice(b"never");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &torn).unwrap();
    drop(f);
    let log = fx.open(options(64 * MIB));
    let keys: Vec<BlobKey> = blobs.iter().map(|b| key(b)).collect();
    assert_eq!(block_on(log.contains(&keys)).unwrap(), vec![true; 50]);
    assert_eq!(
        block_on(log.contains(&[key(b"never acknowledged")])).unwrap(),
        vec![false]
    );
    for (b, k) in blobs.iter().zip(&keys) {
        assert_eq!(read(&log, k).as_deref(), Some(&b[..]));
    }
    assert_eq!(
        std::fs::metadata(&last).unwrap().len() as usize,
        blobs
            .iter()
            .map(|b| b.len() + record::header(&key(b), b).len())
            .sum::<usize>(),
        "the torn record was cut off"
    );
}

#[test]
fn a_damaged_record_is_found_on_its_first_read_and_dropped() {
    let fx = Fixture::new();
    let (good, bad) = (blob(1, 5_000), blob(2, 5_000));
    {
        let log = fx.open(options(64 * MIB));
        put(&log, &good);
        put(&log, &bad);
    }
    // Opened once more, so that the segment is listed from its index file from now on (a
    // scan would find the damage by the record's CRC, before any read).
    drop(fx.open(options(64 * MIB)));
    // Flip a byte inside the second record's data.
    let file = fx.segment_files().remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let log = fx.open(options(64 * MIB));
    assert_eq!(
        block_on(log.contains(&[key(&good), key(&bad)])).unwrap(),
        vec![true, true],
        "not hashed before it is read"
    );
    assert_eq!(read(&log, &key(&good)).as_deref(), Some(&good[..]));
    assert_eq!(read(&log, &key(&bad)), None, "never served");
    assert_eq!(
        block_on(log.contains(&[key(&bad)])).unwrap(),
        vec![false],
        "gone from the index, so the client uploads it again"
    );
    assert_eq!(fx.metrics.corrupt.get(), 1);
    assert_eq!(*fx.forgotten.0.lock().unwrap(), vec![key(&bad)]);
    assert_eq!(put(&log, &bad), Committed::Stored);
    assert_eq!(read(&log, &key(&bad)).as_deref(), Some(&bad[..]));
}

#[test]
fn the_oldest_segments_go_keeping_what_is_pinned_or_used() {
    let fx = Fixture::new();
    let log = fx.open(options(3 * MIB));
    // 10 KiB blobs: about 100 per 1 MiB segment.
    let blobs: Vec<Vec<u8>> = (0..450).map(|n| blob(n, 10 << 10)).collect();
    let keys: Vec<BlobKey> = blobs.iter().map(|b| key(b)).collect();
    for b in &blobs[..250] {
        put(&log, b);
    }
    let holder = PinHolder::unbounded();
    assert_eq!(
        block_on(log.pin(holder, &keys[..1])).unwrap(),
        vec![Some(true)]
    );
    // Used after its segment was sealed.
    assert!(read(&log, &keys[1]).is_some());
    for b in &blobs[250..] {
        put(&log, b);
    }
    block_on(log.settled());
    let present = block_on(log.contains(&keys)).unwrap();
    assert!(present[0], "pinned");
    assert!(present[1], "used since it was written");
    assert!(!present[2], "neither: dropped with the oldest segment");
    assert!(present[449]);
    let held = present.iter().filter(|p| **p).count();
    assert!((200..450).contains(&held), "{held} held");
    assert_eq!(read(&log, &keys[0]).as_deref(), Some(&blobs[0][..]));
    assert_eq!(read(&log, &keys[1]).as_deref(), Some(&blobs[1][..]));
    let on_disk = fx.on_disk();
    assert!(
        on_disk <= 4 * MIB,
        "{on_disk} bytes: the cap and one segment"
    );
    assert!(fx.metrics.log_copied.get() >= 2);
    let forgotten = fx.forgotten.0.lock().unwrap().clone();
    assert_eq!(forgotten.len() as u64, fx.metrics.log_evicted.get());
    assert!(forgotten.contains(&keys[2]));
    assert!(!forgotten.contains(&keys[0]) && !forgotten.contains(&keys[1]));
    // Released, and not used again: the next pass over its segment drops it.
    block_on(log.unpin(holder, &keys[..1]));
    // Survives a restart where it is: the copies forward are what the index finds.
    drop(log);
    let log = fx.open(options(3 * MIB));
    assert_eq!(block_on(log.contains(&keys)).unwrap(), present);
}

/// Sealed segments are listed from their index files at the next start; a damaged index file
/// is not believed (the segment is read through instead, and its index file written again).
#[test]
fn a_start_lists_sealed_segments_from_their_index_files() {
    let fx = Fixture::new();
    let blobs: Vec<Vec<u8>> = (0..250).map(|n| blob(n, 10 << 10)).collect();
    let keys: Vec<BlobKey> = blobs.iter().map(|b| key(b)).collect();
    {
        let log = fx.open(options(64 * MIB));
        for b in &blobs {
            put(&log, b);
        }
    }
    let (segments, indexes) = (fx.segment_files(), fx.files("idx"));
    assert_eq!(segments.len(), 3, "{segments:?}");
    assert_eq!(indexes.len(), 2, "the sealed ones: {indexes:?}");
    let from_index = || -> Vec<bool> {
        let found = segments::recover(fx.dir.path(), true, 64 << 10).unwrap();
        found.iter().map(|s| s.from_index).collect()
    };
    // The last one is read through once, and indexed for the next start.
    assert_eq!(from_index(), vec![true, true, false]);
    assert_eq!(from_index(), vec![true, true, true]);
    // Damaged: flip a byte of the first index file.
    let first = fx.files("idx")[0].clone();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&first, &bytes).unwrap();
    // An index file left of a segment dropped before a crash goes.
    let stray = index_file::path(fx.dir.path(), 0xdead);
    std::fs::write(&stray, b"stale").unwrap();
    let log = fx.open(options(64 * MIB));
    assert_eq!(block_on(log.contains(&keys)).unwrap(), vec![true; 250]);
    for n in [0, 120, 249] {
        assert_eq!(read(&log, &keys[n]).as_deref(), Some(&blobs[n][..]));
    }
    drop(log);
    assert!(!stray.exists());
    assert_ne!(
        std::fs::read(&first).unwrap(),
        bytes,
        "written again from a scan"
    );
    assert_eq!(
        from_index(),
        vec![true, true, true, false],
        "the three; the one begun by that start, still empty, is read through"
    );
}

/// A log whose every blob is in use (asked for after each write, as FindMissingBlobs and the
/// action cache's checks do) still stays within its cap: second chances are bounded.
#[test]
fn a_log_whose_every_blob_is_used_stays_within_its_cap() {
    let fx = Fixture::new();
    let log = fx.open(options(3 * MIB));
    let blobs: Vec<Vec<u8>> = (0..700).map(|n| blob(n, 10 << 10)).collect();
    let keys: Vec<BlobKey> = blobs.iter().map(|b| key(b)).collect();
    let mut most = 0u64;
    for (n, b) in blobs.iter().enumerate() {
        put(&log, b);
        block_on(log.contains(&keys[..=n])).unwrap();
        block_on(log.settled());
        let on_disk = fx.on_disk();
        most = most.max(on_disk);
    }
    assert!(
        most <= 3 * MIB + 3 * MIB / 2 + (11 << 10),
        "{most} bytes: the cap, the segment being appended and half a segment of copies"
    );
    assert!(fx.metrics.log_evicted.get() > 0);
    assert!(
        fx.metrics.log_copied.get() > 0,
        "some got their second chance"
    );
}

/// A segment that cannot be made (its name taken, here by a directory: the disk full or the
/// process out of file descriptors do the same) fails the writes that need it, and loses
/// nothing acknowledged: the segment being appended stays as it is, index included, and
/// writing goes on once the next one can be made.
#[test]
fn a_segment_that_cannot_be_made_loses_nothing() {
    let fx = Fixture::new();
    let blobs: Vec<Vec<u8>> = (0..300).map(|n| blob(n, 10 << 10)).collect();
    let mut acked = Vec::new();
    {
        let log = fx.open(options(64 * MIB));
        let blocked = segments::path(fx.dir.path(), 2);
        std::fs::create_dir(&blocked).unwrap();
        let mut failed = 0;
        for b in &blobs[..200] {
            match block_on(log.put(&key(b), in_memory(b))) {
                Ok(_) => acked.push(b.clone()),
                Err(_) => failed += 1,
            }
        }
        assert!(
            failed > 0 && acked.len() > 50,
            "{failed} failed, {} stored",
            acked.len()
        );
        std::fs::remove_dir(&blocked).unwrap();
        for b in &blobs[200..] {
            put(&log, b);
            acked.push(b.clone());
        }
    }
    assert!(!fx.files("idx").is_empty(), "the first segment was sealed");
    let log = fx.open(options(64 * MIB));
    let keys: Vec<BlobKey> = acked.iter().map(|b| key(b)).collect();
    assert_eq!(
        block_on(log.contains(&keys)).unwrap(),
        vec![true; keys.len()]
    );
    for (b, k) in acked.iter().zip(&keys).step_by(25) {
        assert_eq!(read(&log, k).as_deref(), Some(&b[..]));
    }
}

#[test]
fn concurrent_writers_share_batches_and_one_copy_is_stored() {
    let fx = Fixture::new();
    let log = Arc::new(fx.open(options(64 * MIB)));
    let same = blob(7, 3_000);
    let outcomes: Vec<Committed> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|n| {
                let (log, same) = (log.clone(), same.clone());
                s.spawn(move || {
                    for i in 0..20u32 {
                        put(&log, &blob(1000 + n * 100 + i, 2_000));
                    }
                    put(&log, &same)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        outcomes.iter().filter(|c| **c == Committed::Stored).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(fx.metrics.log_appended.get(), 16 * 20 + 1);
    assert_eq!(fx.metrics.log_blobs.get(), 16 * 20 + 1);
}

#[test]
fn uploads_from_temp_files_and_oversized_blobs() {
    let fx = Fixture::new();
    let log = fx.open(options(64 * MIB));
    let data = blob(3, 4_000);
    let temp = fx.dir.path().join("upload.tmp");
    std::fs::write(&temp, &data).unwrap();
    let upload = VerifiedUpload {
        temp: Some(temp.clone()),
        data: None,
        epoch: 0,
    };
    assert_eq!(
        block_on(log.put(&key(&data), upload)).unwrap(),
        Committed::Stored
    );
    assert!(!temp.exists(), "the temp file is taken over");
    assert_eq!(read(&log, &key(&data)).as_deref(), Some(&data[..]));
    let large = blob(4, (64 << 10) + 1);
    assert!(matches!(
        block_on(log.put(&key(&large), in_memory(&large))),
        Err(StoreError::TooLarge { .. })
    ));
    assert!(!log.keeps_files(&key(&data)));
}

/// Through a chain, as configured: small blobs go to the log (no file in the CAS
/// directory), large ones to the filesystem; the log survives a restart of the data plane.
#[test]
fn a_configured_chain_keeps_small_blobs_in_its_log() {
    let storage = "chain = [\"split\"]\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"memory\", \"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"4 MiB\"\nsegment_bytes = \"1 MiB\"";
    let plane = Plane::start(storage);
    let store = plane.plan.build(&plane.cas);
    let (small, large) = (blob(1, 1_000), blob(2, 100_000));
    assert!(!store.keeps_files(&key(&small)));
    assert!(store.keeps_files(&key(&large)));
    block_on(store.put(&key(&small), in_memory(&small))).unwrap();
    block_on(store.put(&key(&large), plane.upload(&large, false))).unwrap();
    assert!(!plane.layout.blob_path(&key(&small)).exists());
    assert!(plane.layout.blob_path(&key(&large)).exists());
    assert_eq!(plane.metrics.log_blobs.get(), 1);
    let log_dir = plane
        .layout
        .tree_dir()
        .parent()
        .unwrap()
        .join("log")
        .join("log");
    assert!(log_dir.is_dir(), "{}", log_dir.display());
    // Blobs the log lets go count as removals from the store: the action cache trusts a
    // checked result only while that count stands still.
    let removals = plane.cas.accounting().removals();
    for n in 0..500 {
        let b = blob(100 + n, 10 << 10);
        block_on(store.put(&key(&b), in_memory(&b))).unwrap();
    }
    block_on(plane.plan.log("log").expect("the log").settled());
    assert!(plane.metrics.log_evicted.get() > 0);
    assert_eq!(
        plane.cas.accounting().removals() - removals,
        plane.metrics.log_evicted.get()
    );
}
