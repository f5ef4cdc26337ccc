//! The behaviour every chain must show, run against each tier alone and in chains (a tier is a
//! drop-in), over a real data plane: owner shards on glommio over files in a temp directory.
//! Calls are made from the test thread (like the control plane's); blobs are read with
//! [`Blob::read_all_blocking`]. The runtime read path ([`Blob::stream`]) is tested in
//! `blob.rs` and through the server in tests/.

use super::filesystem::Filesystem;
use super::memory::{Memory, MemoryCache};
use super::size_partition::SizePartition;
use super::{Blob, BlobStore, ChainPlan, VerifiedUpload};
use crate::metrics::Metrics;
use crate::runtime::GlommioBackend;
use crate::server::{DataPlane, OpenedStore};
use crate::store::layout::Layout;
use crate::store::{CasClient, Committed};
use bytes::Bytes;
use futures::executor::block_on;
use kiln_config::Config;
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use std::sync::Arc;

/// A data plane of two shards over a temp directory, for tiers to sit on.
pub(crate) struct Plane {
    _dir: tempfile::TempDir,
    pub(crate) plane: DataPlane,
    pub(crate) cas: CasClient,
    pub(crate) layout: Layout,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) plan: Arc<ChainPlan>,
}

impl Plane {
    /// Starts it with `storage` (TOML under `[storage]`, without the data directory).
    pub(crate) fn start(storage: &str) -> Plane {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[storage]\ndata_dir = {:?}\nfsync = false\n{storage}",
            dir.path().display().to_string()
        );
        let config = Config::from_toml(&text, "test").expect("config");
        let metrics = Metrics::new();
        let store = OpenedStore::open(&config, 2, metrics.clone()).expect("store");
        let cas = store.cas();
        let plan = store.chain_plan();
        let plane = serve(&config, store);
        Plane {
            layout: Layout::cas(dir.path()),
            _dir: dir,
            plane,
            cas,
            metrics,
            plan,
        }
    }

    /// A verified upload of `data`: its temp file written.
    pub(crate) fn upload(&self, data: &[u8], keep: bool) -> VerifiedUpload {
        let temp = self.layout.temp_path();
        std::fs::write(&temp, data).expect("temp file");
        VerifiedUpload {
            temp: Some(temp),
            data: keep.then(|| Bytes::copy_from_slice(data)),
            epoch: self.cas.sync_epoch(),
        }
    }
}

/// A data plane on glommio serving `store`, without a control plane, TLS or authorisation.
pub(crate) fn serve(config: &Config, store: OpenedStore) -> DataPlane {
    DataPlane::start(
        config,
        store,
        Arc::new(GlommioBackend),
        None,
        None,
        Arc::new(kiln_auth::Policy::disabled()),
    )
    .expect("data plane")
}

pub(crate) fn key(data: &[u8]) -> BlobKey {
    BlobKey::new(
        InstanceName::default_instance(),
        Digest::of(DigestFunction::Sha256, data),
    )
}

fn blob(n: u32, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u32 ^ n).wrapping_mul(31) as u8)
        .collect()
}

fn read(store: &dyn BlobStore, key: &BlobKey) -> Option<Bytes> {
    let blob: Option<Blob> = block_on(store.open(key)).expect("open");
    blob.map(|b| b.read_all_blocking().expect("read"))
}

/// What every chain does: stores, finds, reads (whole and in ranges), pins, and answers the
/// empty blob without storing it.
fn behaves_as_a_store(plane: &Plane, store: &dyn BlobStore) {
    let sizes = [1usize, 100, 5_000, 200_000];
    let blobs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(n, s)| blob(n as u32, *s))
        .collect();
    let keys: Vec<BlobKey> = blobs.iter().map(|b| key(b)).collect();
    let absent = key(b"never stored");
    let empty = key(b"");

    assert_eq!(
        block_on(store.contains(&keys)).unwrap(),
        vec![false; keys.len()],
        "nothing stored yet"
    );
    assert!(read(store, &keys[0]).is_none());
    for (i, (data, k)) in blobs.iter().zip(&keys).enumerate() {
        let committed = block_on(store.put(k, plane.upload(data, i % 2 == 0))).unwrap();
        assert_eq!(committed, Committed::Stored);
    }
    // A second copy is acknowledged without being stored again.
    assert_eq!(
        block_on(store.put(&keys[1], plane.upload(&blobs[1], true))).unwrap(),
        Committed::AlreadyPresent
    );
    let mut asked = keys.clone();
    asked.push(absent.clone());
    asked.push(empty.clone());
    let mut expected = vec![true; keys.len()];
    expected.extend([false, true]);
    assert_eq!(block_on(store.contains(&asked)).unwrap(), expected);
    for (data, k) in blobs.iter().zip(&keys) {
        // Twice: the second read may come from a tier that kept the first.
        for _ in 0..2 {
            assert_eq!(read(store, k).as_deref(), Some(&data[..]), "{k:?}");
        }
    }
    assert!(read(store, &absent).is_none());
    assert_eq!(read(store, &empty).as_deref(), Some(&b""[..]));

    let holder = super::PinHolder::new(std::time::Duration::from_secs(60));
    let pinned = block_on(store.pin(holder, &asked)).unwrap();
    assert!(
        pinned[..keys.len()].iter().all(Option::is_some),
        "{pinned:?}"
    );
    assert_eq!(pinned[keys.len()], None, "an absent blob is not pinned");
    assert!(
        pinned[keys.len() + 1].is_some(),
        "the empty blob is always there"
    );
    let held = super::pinned_keys(&asked, &pinned);
    assert!(plane.cas.accounting().pinned() > 0);
    block_on(store.unpin(holder, &held));
    // Unpins are not answered; a call after them on every shard sees them done.
    block_on(store.contains(&keys)).unwrap();
    assert_eq!(plane.cas.accounting().pinned(), 0);
}

fn filesystem(plane: &Plane) -> Arc<dyn BlobStore> {
    Arc::new(Filesystem::new(plane.cas.clone()))
}

#[test]
fn the_filesystem_tier_alone() {
    let plane = Plane::start("");
    behaves_as_a_store(&plane, &*filesystem(&plane));
    assert_eq!(plane.metrics.lookups_of("memory"), 0);
}

#[test]
fn a_memory_tier_over_the_filesystem() {
    let plane = Plane::start("");
    let cache = Arc::new(MemoryCache::new(1 << 20, 64 << 10));
    let store = Memory::new(cache.clone(), filesystem(&plane), plane.metrics.clone());
    behaves_as_a_store(&plane, &store);
    assert!(
        plane.metrics.lookups_of("memory") > 0,
        "the second reads hit memory"
    );
    assert!(cache.weighted_size() > 0);
}

#[test]
fn a_size_partition_of_memory_and_filesystem() {
    let plane = Plane::start("");
    let cache = Arc::new(MemoryCache::new(1 << 20, 1 << 20));
    let small: Arc<dyn BlobStore> = Arc::new(Memory::new(
        cache.clone(),
        filesystem(&plane),
        plane.metrics.clone(),
    ));
    let store = SizePartition::new(10_000, small, filesystem(&plane));
    behaves_as_a_store(&plane, &store);
    // The 200,000-byte blob went the large way, past the memory tier.
    let large = key(&blob(3, 200_000));
    assert!(cache.get(&large).is_none());
    assert!(cache.get(&key(&blob(2, 5_000))).is_some());
}

#[test]
fn the_configured_chains() {
    for storage in [
        "",
        "chain = [\"filesystem\"]",
        "chain = [\"in_flight\", \"memory\", \"filesystem\"]",
        "chain = [\"hot\", \"split\"]\n[storage.tiers.hot]\nkind = \"memory\"\nbytes = \"1 MiB\"\nmax_blob_bytes = \"4 KiB\"\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"memory\", \"filesystem\"]\nlarge = [\"filesystem\"]",
        "chain = [\"split\"]\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"memory\", \"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"4 MiB\"\nsegment_bytes = \"1 MiB\"",
    ] {
        let plane = Plane::start(storage);
        let store = plane.plan.build(&plane.cas);
        behaves_as_a_store(&plane, &*store);
        let memory_hits = plane.metrics.lookups_of("memory");
        if storage.contains("chain = [\"filesystem\"]") {
            assert_eq!(memory_hits, 0, "{storage}");
            assert_eq!(plane.plan.memory_bytes(), 0);
        } else {
            assert!(memory_hits > 0, "{storage}");
            assert!(plane.plan.memory_bytes() > 0);
        }
        drop(plane.plane);
    }
}

/// A memory hit keeps the filesystem's order of use (the blob read through memory is not the
/// one evicted), and a blob the filesystem evicts leaves the memory tier too: every tier
/// agrees it is gone.
#[test]
fn memory_hits_count_as_use_below_and_evictions_reach_memory() {
    let plane = Plane::start("disk_bytes = \"30 KiB\"\naccess_time_resolution_secs = 0");
    let store = plane.plan.build(&plane.cas);
    let a = blob(1, 10_000);
    let b = blob(2, 10_000);
    block_on(store.put(&key(&a), plane.upload(&a, true))).unwrap();
    block_on(store.put(&key(&b), plane.upload(&b, true))).unwrap();
    assert!(block_on(store.open(&key(&b))).unwrap().unwrap().in_memory());
    // `a` is now the older; reading it through memory must make `b` the one to go.
    assert!(block_on(store.open(&key(&a))).unwrap().unwrap().in_memory());
    // The touch is not answered; a call to every shard after it sees it done.
    block_on(plane.cas.stats()).unwrap();
    let c = blob(3, 15_000);
    block_on(store.put(&key(&c), plane.upload(&c, false))).unwrap();
    let present = block_on(store.contains(&[key(&a), key(&b), key(&c)])).unwrap();
    assert_eq!(present, vec![true, false, true]);
    assert!(
        block_on(store.open(&key(&b))).unwrap().is_none(),
        "the evicted blob is not served from memory either"
    );
}

/// A pin whose caller went away before the answer (a cancelled Execute) is released by the
/// owner: no one else would.
#[test]
fn a_pin_whose_caller_is_gone_is_released() {
    let plane = Plane::start("");
    let data = blob(9, 1_000);
    let k = key(&data);
    block_on(filesystem(&plane).put(&k, plane.upload(&data, false))).unwrap();
    let (reply, gone) = futures::channel::oneshot::channel();
    drop(gone);
    let pin = crate::store::commands::Command::Pin {
        holder: super::PinHolder::new(std::time::Duration::from_secs(60)),
        keys: vec![k.clone()],
        reply,
    };
    plane
        .cas
        .send_blocking(plane.cas.owner_of(&k.digest), pin)
        .unwrap();
    // Answered in order: after this, the pin was handled.
    block_on(plane.cas.stats()).unwrap();
    assert_eq!(plane.cas.accounting().pinned(), 0);
}

/// Pins are leases of their holders: a holder releases only its own, so one that releases
/// late — after its blob was dropped and stored again, and pinned by another — leaves the
/// other's pin in place; and a holder's pins end at its deadline.
#[test]
fn a_late_release_leaves_another_holders_pin() {
    let plane = Plane::start("");
    let store = filesystem(&plane);
    let data = blob(11, 2_000);
    let k = key(&data);
    let minute = std::time::Duration::from_secs(60);
    block_on(store.put(&k, plane.upload(&data, false))).unwrap();
    let (first, second) = (super::PinHolder::new(minute), super::PinHolder::new(minute));
    assert_eq!(
        block_on(store.pin(first, std::slice::from_ref(&k))).unwrap(),
        vec![Some(true)]
    );
    // Dropped (an action wrote to it) and stored again: the old entry's pin went with it.
    block_on(plane.cas.drop_changed(&k));
    block_on(store.put(&k, plane.upload(&data, false))).unwrap();
    assert_eq!(
        block_on(store.pin(second, std::slice::from_ref(&k))).unwrap(),
        vec![Some(true)]
    );
    block_on(store.unpin(first, std::slice::from_ref(&k)));
    block_on(store.unpin(first, std::slice::from_ref(&k)));
    // Unpins are not answered; a call after them on the shard sees them done.
    block_on(plane.cas.stats()).unwrap();
    assert_eq!(
        plane.cas.accounting().pinned(),
        data.len() as u64,
        "the second holder's pin stays"
    );
    block_on(store.unpin(second, std::slice::from_ref(&k)));
    block_on(plane.cas.stats()).unwrap();
    assert_eq!(plane.cas.accounting().pinned(), 0);
}

/// A holder's pins end by themselves at its deadline (a release that never came): the
/// owner's maintenance, every second, gives the pinned bytes back.
#[test]
fn pins_end_at_their_holders_deadline() {
    let plane = Plane::start("");
    let store = filesystem(&plane);
    let data = blob(12, 3_000);
    let k = key(&data);
    block_on(store.put(&k, plane.upload(&data, false))).unwrap();
    let lapsed = super::PinHolder::new(std::time::Duration::ZERO);
    assert_eq!(
        block_on(store.pin(lapsed, std::slice::from_ref(&k))).unwrap(),
        vec![Some(true)]
    );
    block_on(plane.cas.stats()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while plane.cas.accounting().pinned() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lapsed pin was never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
