//! Pins that outlive a cancelled caller ([`super::pin_to_the_end`]).

use super::*;
use crate::store::Committed;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// A store whose pins wait for the test's go-ahead (a fake: the real shards answer too
/// fast to cancel a caller in the middle of a pin), and which records unpins.
#[derive(Default)]
struct HeldPins {
    started: Notify,
    go: Notify,
    unpinned: Mutex<Vec<BlobKey>>,
    unpins: Notify,
}

impl BlobStore for HeldPins {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(async move { Ok(vec![true; keys.len()]) })
    }
    fn open<'a>(&'a self, _: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async { Ok(None) })
    }
    fn put<'a>(&'a self, _: &'a BlobKey, _: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async { Ok(Committed::Stored) })
    }
    fn pin<'a>(&'a self, _: PinHolder, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(async move {
            self.started.notify_one();
            self.go.notified().await;
            Ok(vec![Some(true); keys.len()])
        })
    }
    fn unpin<'a>(&'a self, _: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.unpinned.lock().unwrap().extend_from_slice(keys);
            self.unpins.notify_one();
        })
    }
    fn touched(&self, _: &[BlobKey]) {}
}

/// A caller cancelled while its pin is under way (a client giving up on its Execute)
/// leaves no pin behind; one that waits gets its pins and nothing is released.
#[tokio::test]
async fn a_cancelled_pin_is_released() {
    let store = Arc::new(HeldPins::default());
    let keys: Vec<BlobKey> = (0..3u8)
        .map(|i| {
            BlobKey::new(
                InstanceName::default_instance(),
                Digest::of(DigestFunction::Sha256, &[i]),
            )
        })
        .collect();
    let waiting = tokio::spawn(pin_to_the_end(store.clone(), holder(), keys.clone()));
    store.started.notified().await;
    waiting.abort();
    let _ = waiting.await;
    store.go.notify_one();
    tokio::time::timeout(Duration::from_secs(30), store.unpins.notified())
        .await
        .expect("the pins the cancelled caller never got are released");
    assert_eq!(*store.unpinned.lock().unwrap(), keys);

    let fresh = Arc::new(HeldPins::default());
    let pinning = tokio::spawn(pin_to_the_end(fresh.clone(), holder(), keys.clone()));
    fresh.go.notify_one();
    let pinned = pinning.await.unwrap().unwrap();
    assert_eq!(pinned, vec![Some(true); 3]);
    assert!(fresh.unpinned.lock().unwrap().is_empty());
}

fn holder() -> PinHolder {
    PinHolder::new(Duration::from_secs(60))
}
