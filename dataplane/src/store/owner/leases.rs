//! Pins as leases. Each pin of a blob belongs to one holder (a queued operation, an action on
//! a worker) and ends at the holder's deadline, so a holder releases only its own pins — a
//! late release can never lower another's, even of a blob dropped and stored again meanwhile
//! — and a holder that never releases (a worker that died) stops pinning by itself.
//!
//! The index keeps each blob's pin count (eviction skips pinned blobs); this keeps who holds
//! them. A lease list kept for an earlier index entry of the same key (the entry was removed,
//! taking its count with it) is recognised by the entry's count being zero, and dropped.

use crate::store::tier::PinHolder;
use kiln_reapi::digest::BlobKey;
use std::collections::{BTreeSet, HashMap};

/// Every pinned blob's holders, and every lease by deadline.
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<BlobKey, Vec<(u64, u64)>>,
    /// (deadline, holder, blob) of every lease with a deadline, soonest first.
    by_deadline: BTreeSet<(u64, u64, BlobKey)>,
}

impl Leases {
    /// `holder` pins `key`, whose index entry has `pins` pins: returns its new count (the
    /// same when `holder` already held it; its deadline is then `holder`'s). A holder's
    /// rollback of a call releases its pins of those keys, including one it held before the
    /// call: a holder must not pin a key it holds in two calls it may roll back (none does).
    pub fn pin(&mut self, key: &BlobKey, holder: PinHolder, pins: u32) -> u32 {
        let list = self.held.entry(key.clone()).or_default();
        if pins == 0 {
            // Left over from an entry that is gone.
            for (id, until) in list.drain(..) {
                self.by_deadline.remove(&(until, id, key.clone()));
            }
        }
        let pins = match list.iter_mut().find(|(id, _)| *id == holder.id) {
            Some((_, until)) => {
                self.by_deadline.remove(&(*until, holder.id, key.clone()));
                *until = holder.until;
                pins
            }
            None => {
                list.push((holder.id, holder.until));
                pins.saturating_add(1)
            }
        };
        if holder.until != u64::MAX {
            self.by_deadline
                .insert((holder.until, holder.id, key.clone()));
        }
        pins
    }

    /// `holder` releases `key`, whose index entry has `pins` pins: returns its new count (the
    /// same when `holder` held no pin of this entry).
    pub fn unpin(&mut self, key: &BlobKey, holder: PinHolder, pins: u32) -> u32 {
        let Some(list) = self.held.get_mut(key) else {
            return pins;
        };
        let mut released = 0;
        list.retain(|(id, until)| {
            let stale = pins == 0;
            if stale || *id == holder.id {
                self.by_deadline.remove(&(*until, *id, key.clone()));
                released += u32::from(!stale);
                return false;
            }
            true
        });
        if list.is_empty() {
            self.held.remove(key);
        }
        pins.saturating_sub(released)
    }

    /// Ends the leases whose deadline is past at `now` (`pins_of`: a key's index count, 0
    /// when it has no entry); returns each key whose count must drop, with its new count.
    /// Touches only the leases that ended.
    pub fn expire(
        &mut self,
        now: u64,
        mut pins_of: impl FnMut(&BlobKey) -> u32,
    ) -> Vec<(BlobKey, u32)> {
        let mut ended: HashMap<BlobKey, u32> = HashMap::new();
        while let Some(first) = self.by_deadline.first() {
            if first.0 > now {
                break;
            }
            let Some((until, id, key)) = self.by_deadline.pop_first() else {
                break;
            };
            if let Some(list) = self.held.get_mut(&key) {
                let before = list.len();
                list.retain(|l| *l != (id, until));
                if list.len() < before {
                    *ended.entry(key.clone()).or_default() += 1;
                }
                if list.is_empty() {
                    self.held.remove(&key);
                }
            }
        }
        ended
            .into_iter()
            .filter_map(|(key, n)| {
                let pins = pins_of(&key);
                // An entry that is gone took its count with it: nothing to lower.
                (pins > 0).then(|| (key, pins.saturating_sub(n)))
            })
            .collect()
    }

    /// Forgets every lease of `key`, whose index entry was removed (and its count with it).
    pub fn forget(&mut self, key: &BlobKey) {
        if let Some(list) = self.held.remove(key) {
            for (id, until) in list {
                self.by_deadline.remove(&(until, id, key.clone()));
            }
        }
    }

    /// Blobs with a lease list.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none has.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key() -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, b"blob"),
        )
    }

    fn holder(id: u64, until: u64) -> PinHolder {
        PinHolder { id, until }
    }

    #[test]
    fn a_holder_releases_only_its_own_pin() {
        let mut leases = Leases::default();
        let k = key();
        let pins = leases.pin(&k, holder(1, 100), 0);
        let pins = leases.pin(&k, holder(2, 100), pins);
        assert_eq!(pins, 2);
        assert_eq!(
            leases.pin(&k, holder(2, 200), pins),
            2,
            "a holder pins once"
        );
        let pins = leases.unpin(&k, holder(1, 100), pins);
        assert_eq!(pins, 1);
        assert_eq!(
            leases.unpin(&k, holder(1, 100), pins),
            1,
            "released twice: once"
        );
        assert_eq!(leases.unpin(&k, holder(2, 100), pins), 0);
        assert!(leases.is_empty());
    }

    #[test]
    fn a_late_release_does_not_lower_the_pins_of_a_blob_stored_again() {
        let mut leases = Leases::default();
        let k = key();
        assert_eq!(leases.pin(&k, holder(1, 100), 0), 1);
        // The blob is dropped (its entry, and its count, gone) and stored again: a new
        // entry with no pins, which holder 2 pins.
        let pins = leases.pin(&k, holder(2, 100), 0);
        assert_eq!(pins, 1);
        assert_eq!(
            leases.unpin(&k, holder(1, 100), pins),
            1,
            "holder 1's pin went with the old entry"
        );
        // And a late release onto an entry nobody pinned leaves nothing behind.
        let mut leases = Leases::default();
        leases.pin(&k, holder(1, 100), 0);
        assert_eq!(leases.unpin(&k, holder(1, 100), 0), 0);
        assert!(leases.is_empty());
    }

    #[test]
    fn leases_end_at_their_deadline_or_never() {
        let mut leases = Leases::default();
        let k = key();
        let pins = leases.pin(&k, holder(1, 100), 0);
        let pins = leases.pin(&k, holder(2, 300), pins);
        let pins = leases.pin(&k, holder(3, u64::MAX), pins);
        assert_eq!(pins, 3);
        assert_eq!(leases.expire(50, |_| pins), vec![]);
        assert_eq!(leases.expire(150, |_| pins), vec![(k.clone(), 2)]);
        // Holder 2 pins again with a later deadline: its one lease moves to it.
        assert_eq!(leases.pin(&k, holder(2, 1_000), 2), 2);
        assert_eq!(leases.expire(500, |_| 2), vec![]);
        assert_eq!(leases.expire(1_000, |_| 2), vec![(k.clone(), 1)]);
        assert_eq!(leases.len(), 1, "holder 3's lease has no deadline");
        assert_eq!(leases.expire(u64::MAX - 1, |_| 1), vec![]);
        // An entry gone meanwhile: its leases end without lowering anything; or are
        // forgotten when it is removed.
        let mut leases = Leases::default();
        leases.pin(&k, holder(4, 10), 0);
        assert_eq!(leases.expire(20, |_| 0), vec![]);
        assert!(leases.is_empty() && leases.by_deadline.is_empty());
        leases.pin(&k, holder(5, 10), 0);
        leases.pin(&k, holder(6, u64::MAX), 1);
        leases.forget(&k);
        assert!(leases.is_empty() && leases.by_deadline.is_empty());
    }
}
