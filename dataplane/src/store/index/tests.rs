//! The index against a plain LRU, and its packing of odd sizes, instances and access times.

use super::node::NANOS;
use super::*;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

fn key(n: u8) -> BlobKey {
    BlobKey::new(
        InstanceName::default_instance(),
        Digest::of(DigestFunction::Sha256, &[n]),
    )
}

/// The persisted access time survives touches (to the second), for clocks past 2106 too:
/// a blob whose file time was just written is not due again until the resolution passed.
#[test]
fn persisted_access_times_hold_for_any_clock() {
    let resolution = std::time::Duration::from_secs(60);
    for base in [1_700_000_000 * NANOS, 5_000_000_000 * NANOS] {
        let mut idx: BlobIndex = BlobIndex::new();
        idx.insert(key(1), Entry::scanned(1, base));
        let e = *idx.touch(&key(1), base + 30 * NANOS).unwrap();
        assert_eq!(e.atime, base + 30 * NANOS);
        assert_eq!(e.persisted_atime, base, "kept through the touch");
        assert!(!crate::store::atime::due(
            e.atime,
            e.persisted_atime,
            resolution
        ));
        let e = *idx.touch(&key(1), base + 61 * NANOS).unwrap();
        assert!(crate::store::atime::due(
            e.atime,
            e.persisted_atime,
            resolution
        ));
        idx.peek_mut(&key(1)).unwrap().persisted_atime = e.atime;
        let e = *idx.touch(&key(1), base + 62 * NANOS).unwrap();
        assert!(!crate::store::atime::due(
            e.atime,
            e.persisted_atime,
            resolution
        ));
    }
}

#[test]
fn a_node_is_64_bytes() {
    assert_eq!(std::mem::size_of::<Node>(), 64);
}

/// Sizes past what the packed node holds, and entries charged other than their digest's
/// size, keep both sizes; the byte count follows the charges.
#[test]
fn odd_sizes_are_kept_whole() {
    let mut idx: BlobIndex = BlobIndex::new();
    let huge = BlobKey::new(
        InstanceName::default_instance(),
        Digest {
            size: 1 << 60,
            ..Digest::of(DigestFunction::Blake3, b"huge")
        },
    );
    idx.insert(huge.clone(), Entry::fresh(1 << 60, 1));
    idx.insert(key(1), Entry::fresh(4096, 2));
    assert_eq!(idx.bytes(), (1 << 60) + 4096);
    assert_eq!(idx.peek(&huge).unwrap().size, 1 << 60);
    assert_eq!(idx.peek(&key(1)).unwrap().size, 4096);
    let keys: Vec<BlobKey> = idx.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![key(1), huge.clone()]);
    // Charged as its digest again: back in the node.
    idx.insert(key(1), Entry::fresh(1, 3));
    assert_eq!(idx.bytes(), (1 << 60) + 1);
    assert_eq!(idx.odd.len(), 1);
    assert_eq!(idx.remove(&huge).unwrap().size, 1 << 60);
    assert!(idx.odd.is_empty());
    assert_eq!(idx.bytes(), 1);
}

/// An instance's number is freed with its last blob and reused by another name; the
/// first name is not found through it afterwards.
#[test]
fn instance_numbers_are_reused_without_mixing_names() {
    let mut idx: BlobIndex = BlobIndex::new();
    let a = BlobKey::new(InstanceName::new("a").unwrap(), key(1).digest);
    let b = BlobKey::new(InstanceName::new("b").unwrap(), key(1).digest);
    idx.insert(a.clone(), Entry::fresh(1, 1));
    idx.insert(key(2), Entry::fresh(1, 1));
    assert!(idx.peek(&a).is_some());
    assert!(idx.peek(&b).is_none(), "same digest, another instance");
    idx.remove(&a);
    idx.insert(b.clone(), Entry::fresh(1, 2));
    assert_eq!(idx.instances.len(), 2);
    assert!(idx.peek(&a).is_none(), "a's number now names b");
    assert!(idx.peek(&b).is_some());
    assert_eq!(
        idx.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        vec![b, key(2)]
    );
}

#[test]
fn evicts_least_recently_used_first() {
    let mut idx: BlobIndex = BlobIndex::new();
    for n in 0..4u8 {
        idx.insert(key(n), Entry::fresh(10, 100 + n as u64));
    }
    assert_eq!(idx.bytes(), 40);
    idx.touch(&key(0), 200);
    assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(1));
    assert_eq!(idx.oldest_atime(), Some(102));
    assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(2));
    assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(3));
    assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(0));
    assert!(idx.pop_oldest_unpinned().is_none());
    assert_eq!(idx.bytes(), 0);
}

#[test]
fn blobs_found_late_are_placed_by_their_access_times() {
    let mut idx: BlobIndex = BlobIndex::new();
    idx.insert(key(1), Entry::scanned(1, 10));
    idx.insert(key(2), Entry::scanned(2, 30));
    idx.insert_aged(vec![
        (key(3), Entry::scanned(4, 5)),
        (key(4), Entry::scanned(8, 20)),
        (key(5), Entry::scanned(16, 30)),
        (key(6), Entry::scanned(32, 40)),
    ]);
    assert_eq!(idx.len(), 6);
    assert_eq!(idx.bytes(), 63);
    let newest_first: Vec<BlobKey> = idx.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(newest_first, [6, 5, 2, 4, 1, 3].map(key));
    let mut evicted = Vec::new();
    while let Some((k, _)) = idx.pop_oldest_unpinned() {
        evicted.push(k);
    }
    assert_eq!(evicted, [3, 1, 4, 2, 5, 6].map(key));
    // Into an empty index, in their own order.
    let mut empty: BlobIndex = BlobIndex::new();
    empty.insert_aged(vec![
        (key(7), Entry::scanned(1, 1)),
        (key(8), Entry::scanned(1, 2)),
    ]);
    assert_eq!(empty.pop_oldest_unpinned().unwrap().0, key(7));
    assert_eq!(empty.pop_oldest_unpinned().unwrap().0, key(8));
}

#[test]
fn pinned_blobs_are_skipped() {
    let mut idx: BlobIndex = BlobIndex::new();
    idx.insert(key(1), Entry::fresh(5, 1));
    idx.insert(key(2), Entry::fresh(5, 2));
    idx.peek_mut(&key(1)).unwrap().pins = 1;
    assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(2));
    assert!(
        idx.pop_oldest_unpinned().is_none(),
        "only a pinned blob is left"
    );
    assert_eq!(idx.len(), 1);
}

#[test]
fn replacing_keeps_byte_count_right() {
    let mut idx: BlobIndex = BlobIndex::new();
    idx.insert(key(1), Entry::fresh(5, 1));
    idx.insert(key(1), Entry::fresh(5, 2));
    assert_eq!((idx.len(), idx.bytes()), (1, 5));
    assert_eq!(idx.remove(&key(1)).map(|e| e.atime), Some(2));
    assert_eq!(idx.bytes(), 0);
}

/// The same operations on the index and on `lru::LruCache` (the structure it replaced),
/// in a seeded random order: the same blobs, order, bytes and evictions throughout.
#[test]
fn behaves_like_a_plain_lru_under_random_operations() {
    let mut idx: BlobIndex = BlobIndex::new();
    let mut model: lru::LruCache<BlobKey, Entry> = lru::LruCache::unbounded();
    let mut model_bytes = 0u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let instances = [
        InstanceName::default_instance(),
        InstanceName::new("other").unwrap(),
    ];
    for step in 0..20_000u64 {
        let n = next();
        // Two instances, each name parsed afresh or not (the index's cache of the last
        // name looked up must not tell them apart by allocation alone).
        let instance = match n % 3 {
            0 => instances[0].clone(),
            1 => instances[1].clone(),
            _ => InstanceName::new("other").unwrap(),
        };
        // Sizes that fit the packed node (the entry charged as the digest) and ones that
        // do not (charged otherwise, as the action cache does).
        let k = BlobKey::new(
            instance,
            Digest::of(DigestFunction::Sha256, &[(n >> 8) as u8 % 24]),
        );
        match next() % 6 {
            0 | 1 => {
                // Whole seconds: the index keeps the persisted access time to the second.
                let size = if next() % 2 == 0 {
                    k.digest.size
                } else {
                    next() % 100
                };
                let e = Entry::fresh(size, step * NANOS);
                idx.insert(k.clone(), e);
                model_bytes += e.size;
                if let Some(old) = model.put(k, e) {
                    model_bytes -= old.size;
                }
            }
            2 => {
                let a = idx.touch(&k, step * NANOS).map(|e| *e);
                let b = model.get_mut(&k).map(|e| {
                    e.atime = e.atime.max(step * NANOS);
                    *e
                });
                assert_eq!(a, b);
            }
            3 => {
                let a = idx.remove(&k);
                let b = model.pop(&k);
                if let Some(e) = b {
                    model_bytes -= e.size;
                }
                assert_eq!(a, b);
            }
            4 => {
                let pins = (next() % 2) as u32;
                if let Some(mut e) = idx.peek_mut(&k) {
                    e.pins = pins;
                }
                if let Some(e) = model.peek_mut(&k) {
                    e.pins = pins;
                }
            }
            _ => {
                let a = idx.pop_oldest_unpinned();
                let mut b = None;
                for _ in 0..model.len() {
                    let (key, pinned) = match model.peek_lru() {
                        Some((key, e)) => (key.clone(), e.pins > 0),
                        None => break,
                    };
                    if !pinned {
                        b = model.pop_lru();
                        break;
                    }
                    model.promote(&key);
                }
                if let Some((_, e)) = &b {
                    model_bytes -= e.size;
                }
                assert_eq!(a, b);
            }
        }
        assert_eq!(idx.len(), model.len());
        assert_eq!(idx.bytes(), model_bytes);
        assert_eq!(idx.oldest_atime(), model.peek_lru().map(|(_, e)| e.atime));
        if step % 97 == 0 {
            let a: Vec<(BlobKey, Entry)> = idx.iter().collect();
            let b: Vec<(BlobKey, Entry)> = model.iter().map(|(k, e)| (k.clone(), *e)).collect();
            assert_eq!(a, b, "step {step}");
        }
    }
}

/// `touch_persisting` says an access time is due once per resolution, and records it as
/// written when it says so; an absent key is `None` and adds nothing.
#[test]
fn touch_persisting_claims_each_due_access_time_once() {
    let resolution = std::time::Duration::from_secs(60);
    let base = 1_700_000_000 * NANOS;
    let mut idx: BlobIndex = BlobIndex::new();
    idx.insert(key(1), Entry::scanned(1, base));
    let (e, due) = idx
        .touch_persisting(&key(1), base + 30 * NANOS, resolution)
        .unwrap();
    assert!(!due, "within the resolution of the file's time");
    assert_eq!(e.atime, base + 30 * NANOS);
    let (e, due) = idx
        .touch_persisting(&key(1), base + 61 * NANOS, resolution)
        .unwrap();
    assert!(due);
    assert_eq!(e.persisted_atime, e.atime, "recorded as written");
    let (_, due) = idx
        .touch_persisting(&key(1), base + 62 * NANOS, resolution)
        .unwrap();
    assert!(!due, "claimed once");
    assert!(idx.touch_persisting(&key(2), base, resolution).is_none());
    assert_eq!(idx.len(), 1);
}
