//! What a worker's CAS holds, as the scheduler learns it: the store tells [`Holdings`] of
//! every blob committed and every blob that leaves ([`BlobEvents`]); the worker's next report
//! carries those changes, and a session's first report lists the whole store instead. The
//! scheduler uses the facts to tell other workers which peer holds an input they lack.

use kiln_dataplane::store::tier::BlobEvents;
use kiln_reapi::digest::BlobKey;
use std::collections::HashSet;
use std::sync::Mutex;

/// Changes to the CAS not yet reported, at most `cap` of each kind.
pub struct Holdings {
    changes: Mutex<Changes>,
    cap: usize,
}

#[derive(Default)]
struct Changes {
    added: HashSet<BlobKey>,
    removed: HashSet<BlobKey>,
    /// More changed than `cap` holds: the next report must list the store whole.
    overflowed: bool,
}

/// The changes [`Holdings::take`] hands over.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Blobs added and removed since the last take.
    Changes {
        /// Committed (and not removed since).
        added: Vec<BlobKey>,
        /// Removed (and not committed again since).
        removed: Vec<BlobKey>,
    },
    /// More changed than could be kept: report the whole store.
    Overflowed,
}

impl Holdings {
    /// Keeps at most `cap` unreported additions and as many removals.
    pub fn new(cap: usize) -> Holdings {
        Holdings {
            changes: Mutex::new(Changes::default()),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Changes> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The changes taken could not be reported: the next report lists the store whole.
    pub fn lost(&self) {
        self.lock().overflowed = true;
    }

    /// The changes since the last take (and forgets them).
    pub fn take(&self) -> Taken {
        let changes = std::mem::take(&mut *self.lock());
        if changes.overflowed {
            return Taken::Overflowed;
        }
        Taken::Changes {
            added: changes.added.into_iter().collect(),
            removed: changes.removed.into_iter().collect(),
        }
    }
}

impl BlobEvents for Holdings {
    fn stored(&self, key: &BlobKey) {
        let mut c = self.lock();
        c.removed.remove(key);
        if c.added.len() < self.cap {
            c.added.insert(key.clone());
        } else {
            c.overflowed = true;
        }
    }

    fn forget(&self, key: &BlobKey) {
        let mut c = self.lock();
        c.added.remove(key);
        if c.removed.len() < self.cap {
            c.removed.insert(key.clone());
        } else {
            c.overflowed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key(n: u8) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &[n]),
        )
    }

    fn sorted(mut keys: Vec<BlobKey>) -> Vec<BlobKey> {
        keys.sort_by_key(|k| k.digest.hash);
        keys
    }

    #[test]
    fn the_last_change_of_each_blob_is_reported_once() {
        let h = Holdings::new(10);
        h.stored(&key(1));
        h.stored(&key(2));
        h.forget(&key(2));
        h.forget(&key(3));
        h.stored(&key(3));
        let Taken::Changes { added, removed } = h.take() else {
            panic!("not overflowed")
        };
        assert_eq!(sorted(added), sorted(vec![key(1), key(3)]));
        assert_eq!(removed, vec![key(2)]);
        assert_eq!(
            h.take(),
            Taken::Changes {
                added: vec![],
                removed: vec![]
            },
            "taken once"
        );
    }

    #[test]
    fn more_changes_than_the_cap_ask_for_a_full_listing() {
        let h = Holdings::new(2);
        for n in 0..3 {
            h.stored(&key(n));
        }
        assert_eq!(h.take(), Taken::Overflowed);
        h.forget(&key(0));
        assert!(
            matches!(h.take(), Taken::Changes { removed, .. } if removed == vec![key(0)]),
            "an overflow is reported once"
        );
    }
}
