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
