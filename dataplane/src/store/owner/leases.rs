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
use std::collections::HashMap;

/// Every pinned blob's holders.
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<BlobKey, Vec<(u64, u64)>>,
}

impl Leases {
    /// `holder` pins `key`, whose index entry has `pins` pins: returns its new count (the
    /// same when `holder` already held it, whose deadline is then the later one).
    pub fn pin(&mut self, key: &BlobKey, holder: PinHolder, pins: u32) -> u32 {
        let list = self.held.entry(key.clone()).or_default();
        if pins == 0 {
            // Left over from an entry that is gone.
            list.clear();
        }
        match list.iter_mut().find(|(id, _)| *id == holder.id) {
            Some((_, until)) => {
                *until = (*until).max(holder.until);
                pins
            }
            None => {
                list.push((holder.id, holder.until));
                pins.saturating_add(1)
            }
        }
    }

    /// `holder` releases `key`, whose index entry has `pins` pins: returns its new count (the
    /// same when `holder` held no pin of this entry).
    pub fn unpin(&mut self, key: &BlobKey, holder: PinHolder, pins: u32) -> u32 {
        let Some(list) = self.held.get_mut(key) else {
            return pins;
        };
        if pins == 0 {
            self.held.remove(key);
            return 0;
        }
        let before = list.len();
        list.retain(|(id, _)| *id != holder.id);
        let released = (before - list.len()) as u32;
        if list.is_empty() {
            self.held.remove(key);
        }
        pins.saturating_sub(released)
    }

    /// Ends the leases past their deadline at `now` and forgets lists of entries that are gone
    /// (`pins_of`: a key's index count, 0 when it has no entry); returns each key whose count
    /// must drop, with its new count.
    pub fn expire(
        &mut self,
        now: u64,
        mut pins_of: impl FnMut(&BlobKey) -> u32,
    ) -> Vec<(BlobKey, u32)> {
        let mut changed = Vec::new();
        self.held.retain(|key, list| {
            let pins = pins_of(key);
            if pins == 0 {
                return false;
            }
            let before = list.len();
            list.retain(|(_, until)| *until > now);
            let ended = (before - list.len()) as u32;
            if ended > 0 {
                changed.push((key.clone(), pins.saturating_sub(ended)));
            }
            !list.is_empty()
        });
        changed
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
    fn leases_end_at_their_deadline_and_lists_of_gone_entries_are_forgotten() {
        let mut leases = Leases::default();
        let k = key();
        let pins = leases.pin(&k, holder(1, 100), 0);
        let pins = leases.pin(&k, holder(2, 300), pins);
        assert_eq!(leases.expire(50, |_| pins), vec![]);
        assert_eq!(leases.expire(150, |_| pins), vec![(k.clone(), 1)]);
        assert_eq!(leases.len(), 1);
        assert_eq!(
            leases.expire(150, |_| 0),
            vec![],
            "the entry is gone: nothing to lower"
        );
        assert!(leases.is_empty());
    }
}
