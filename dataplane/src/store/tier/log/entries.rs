//! A log's index, packed: each blob in a 64-byte [`Slot`] (its hash, digest size and
//! function, instance by number, segment, offset, record length and flags), found through a
//! table of slot numbers, with pins in a side table. A map from `BlobKey` to an entry, each
//! key listed again in its segment, took about 350 bytes a blob; segments now list slot
//! numbers (see `docs/benchmarking.md` for the measurement).

use super::super::PinHolder;
use crate::store::index::instances::Instances;
use crate::store::index::VerifiedKeys;
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction};
use std::hash::BuildHasher;

/// A slot's number. Segments list the slots of the records they got; a slot may since have
/// been freed or reused, so [`Entries::place_in`] checks it still points into the segment.
pub type SlotId = u32;

/// [`Slot::instance`] of a free slot.
const VACANT: u32 = u32::MAX;
/// The bytes were hashed by this process (written by it, or read once).
const CHECKED: u8 = 1;
/// Used while a segment newer than its own was appended: it earns a second chance when its
/// segment is dropped.
const USED: u8 = 2;
/// Has holders in [`Entries::pins`].
const PINNED: u8 = 4;

/// One indexed record.
struct Slot {
    hash: [u8; 32],
    /// The segment holding the record.
    segment: u64,
    /// Where its bytes start in the segment.
    offset: u64,
    /// The digest's size: a log holds blobs of at most 1 MiB.
    size: u32,
    /// The instance's number; [`VACANT`] for a free slot.
    instance: u32,
    /// The record's length, header included.
    record_len: u32,
    /// The digest function's place in [`DigestFunction::ALL`].
    function: u8,
    flags: u8,
}

/// Where a record is and what is known of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The segment holding it.
    pub segment: u64,
    /// Where its bytes start.
    pub offset: u64,
    /// The record's length, header included.
    pub record_len: u64,
    /// Whether this process has hashed its bytes.
    pub checked: bool,
    /// Whether it was used since its segment was sealed.
    pub used: bool,
}

/// The index: slots (freed ones reused), a hash table of slot numbers, instance names by
/// number, and the pins of pinned slots.
#[derive(Default)]
pub struct Entries {
    hasher: VerifiedKeys,
    table: hashbrown::HashTable<SlotId>,
    slots: Vec<Slot>,
    free: Vec<SlotId>,
    instances: Instances,
    pins: std::collections::HashMap<SlotId, Vec<PinHolder>, VerifiedKeys>,
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entries")
            .field("blobs", &self.len())
            .finish()
    }
}

/// A digest function's number in a slot (every function its own: a new one must be given a
/// number here, or this does not compile).
fn function_number(f: DigestFunction) -> u8 {
    match f {
        DigestFunction::Sha256 => 0,
        DigestFunction::Blake3 => 1,
    }
}

/// The digest function numbered `n` by [`function_number`].
fn function_of(n: u8) -> DigestFunction {
    match n {
        1 => DigestFunction::Blake3,
        _ => DigestFunction::Sha256,
    }
}

impl Entries {
    /// Blobs held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Room for `n` more blobs.
    pub fn reserve(&mut self, n: usize) {
        let Entries {
            hasher,
            table,
            slots,
            free,
            ..
        } = self;
        table.reserve(n, |&i| rehash(hasher, &slots[i as usize]));
        slots.reserve(n.saturating_sub(free.len()));
    }

    /// `key`'s slot, if held.
    pub fn find(&self, key: &BlobKey) -> Option<SlotId> {
        let instance = self.instances.number(&key.instance)?;
        let size = u32::try_from(key.digest.size).ok()?;
        let function = function_number(key.digest.function);
        let hash = hash_of(&self.hasher, instance, function, &key.digest.hash, size);
        self.table
            .find(hash, |&i| {
                let s = &self.slots[i as usize];
                s.instance == instance
                    && s.hash == key.digest.hash
                    && s.size == size
                    && s.function == function
            })
            .copied()
    }

    /// Indexes `key` (which it does not hold) at `place` (`used` is not taken: a new record
    /// is not used since its segment was sealed). `None` when its digest's size does not fit
    /// a slot, which a log's blobs (at most 1 MiB) always do.
    pub fn add(&mut self, key: &BlobKey, place: Place) -> Option<SlotId> {
        debug_assert!(self.find(key).is_none());
        let size = u32::try_from(key.digest.size).ok()?;
        // Four billion records is far past any log's cap.
        let next = u32::try_from(self.slots.len()).ok();
        if self.free.is_empty() && next.is_none() {
            return None;
        }
        let instance = self.instances.acquire(&key.instance);
        let slot = Slot {
            hash: key.digest.hash,
            segment: 0,
            offset: 0,
            size,
            instance,
            record_len: 0,
            function: function_number(key.digest.function),
            flags: 0,
        };
        let i = match (self.free.pop(), next) {
            (Some(i), _) => {
                self.slots[i as usize] = slot;
                i
            }
            (None, Some(i)) => {
                self.slots.push(slot);
                i
            }
            (None, None) => return None,
        };
        self.move_to(i, place);
        let s = &self.slots[i as usize];
        let hash = hash_of(&self.hasher, s.instance, s.function, &s.hash, s.size);
        let Entries {
            hasher,
            table,
            slots,
            ..
        } = self;
        table.insert_unique(hash, i, |&j| rehash(hasher, &slots[j as usize]));
        Some(i)
    }

    /// Slot `i`'s record, when `i` is held and its record is in `segment`.
    pub fn place_in(&self, i: SlotId, segment: u64) -> Option<Place> {
        let s = self.slots.get(i as usize)?;
        (s.instance != VACANT && s.segment == segment).then(|| self.place(i))
    }

    /// Slot `i`'s record (`i` is held).
    pub fn place(&self, i: SlotId) -> Place {
        let s = &self.slots[i as usize];
        Place {
            segment: s.segment,
            offset: s.offset,
            record_len: u64::from(s.record_len),
            checked: s.flags & CHECKED != 0,
            used: s.flags & USED != 0,
        }
    }

    /// Points slot `i` at `place`'s record with its `checked`; it is not used since that
    /// record's segment was sealed.
    pub fn move_to(&mut self, i: SlotId, place: Place) {
        let s = &mut self.slots[i as usize];
        s.segment = place.segment;
        s.offset = place.offset;
        // Records are at most a header and 1 MiB: only the live bytes' sum would be off.
        s.record_len = u32::try_from(place.record_len).unwrap_or(u32::MAX);
        s.flags &= PINNED;
        if place.checked {
            s.flags |= CHECKED;
        }
    }

    /// Slot `i`'s bytes were hashed to its digest.
    pub fn set_checked(&mut self, i: SlotId) {
        self.slots[i as usize].flags |= CHECKED;
    }

    /// Slot `i` is used while segment `active` is appended.
    pub fn set_used(&mut self, i: SlotId, active: u64) {
        let s = &mut self.slots[i as usize];
        if s.segment < active {
            s.flags |= USED;
        }
    }

    /// The key of slot `i` (which is held).
    pub fn key(&self, i: SlotId) -> BlobKey {
        let s = &self.slots[i as usize];
        let function = function_of(s.function);
        BlobKey::new(
            self.instances.name(s.instance).clone(),
            Digest {
                function,
                hash: s.hash,
                size: u64::from(s.size),
            },
        )
    }

    /// Frees slot `i` (which is held), with its pins.
    pub fn remove(&mut self, i: SlotId) {
        let s = &self.slots[i as usize];
        let hash = hash_of(&self.hasher, s.instance, s.function, &s.hash, s.size);
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        let instance = s.instance;
        self.instances.release(instance);
        self.pins.remove(&i);
        let s = &mut self.slots[i as usize];
        s.instance = VACANT;
        s.flags = 0;
        self.free.push(i);
    }

    /// Pins slot `i` for `holder` (its earlier pin, and expired ones, replaced).
    pub fn pin(&mut self, i: SlotId, holder: PinHolder, now: u64) {
        let pins = self.pins.entry(i).or_default();
        pins.retain(|p| p.until > now && p.id != holder.id);
        pins.push(holder);
        self.slots[i as usize].flags |= PINNED;
    }

    /// Releases `holder`'s pin of slot `i`.
    pub fn unpin(&mut self, i: SlotId, holder: PinHolder) {
        if self.slots[i as usize].flags & PINNED == 0 {
            return;
        }
        let Some(pins) = self.pins.get_mut(&i) else {
            return;
        };
        pins.retain(|p| p.id != holder.id);
        if pins.is_empty() {
            self.pins.remove(&i);
            self.slots[i as usize].flags &= !PINNED;
        }
    }

    /// Whether slot `i` has a pin that lasts past `now`.
    pub fn pinned(&self, i: SlotId, now: u64) -> bool {
        self.slots[i as usize].flags & PINNED != 0
            && self
                .pins
                .get(&i)
                .is_some_and(|pins| pins.iter().any(|p| p.until > now))
    }

    /// Forgets that slot `i` was used (tests of eviction's choices).
    #[cfg(test)]
    pub fn clear_used(&mut self, i: SlotId) {
        self.slots[i as usize].flags &= !USED;
    }
}

fn hash_of(hasher: &VerifiedKeys, instance: u32, function: u8, hash: &[u8; 32], size: u32) -> u64 {
    hasher.hash_one((instance, function, hash, size))
}

fn rehash(hasher: &VerifiedKeys, s: &Slot) -> u64 {
    hash_of(hasher, s.instance, s.function, &s.hash, s.size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::InstanceName;

    fn key(instance: &str, n: u32) -> BlobKey {
        BlobKey::new(
            InstanceName::new(instance).unwrap(),
            Digest::of(DigestFunction::Sha256, &n.to_le_bytes()),
        )
    }

    fn at(segment: u64, offset: u64) -> Place {
        Place {
            segment,
            offset,
            record_len: 100,
            checked: false,
            used: false,
        }
    }

    /// The point of the packing: a slot stays 64 bytes.
    #[test]
    fn a_slot_is_64_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
    }

    #[test]
    fn keys_are_told_apart_by_instance_function_and_size() {
        let mut e = Entries::default();
        let a = key("a", 1);
        let i = e.add(&a, at(1, 10)).unwrap();
        assert_eq!(e.find(&a), Some(i));
        assert_eq!(e.key(i), a);
        assert_eq!(e.find(&key("b", 1)), None, "another instance");
        let mut other_size = a.clone();
        other_size.digest.size += 1;
        assert_eq!(e.find(&other_size), None);
        let mut other_function = a.clone();
        other_function.digest.function = DigestFunction::Blake3;
        assert_eq!(e.find(&other_function), None);
        let mut huge = a.clone();
        huge.digest.size = u64::from(u32::MAX) + 1;
        assert_eq!(e.find(&huge), None);
        assert_eq!(e.add(&huge, at(1, 0)), None, "a size no log holds");
        let j = e.add(&other_function, at(1, 200)).unwrap();
        assert_eq!(e.key(j), other_function);
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn a_freed_slot_is_reused_and_no_longer_in_its_segment() {
        let mut e = Entries::default();
        let i = e.add(&key("a", 1), at(1, 10)).unwrap();
        assert_eq!(e.place_in(i, 1).map(|p| p.offset), Some(10));
        assert_eq!(e.place_in(i, 2), None, "another segment");
        e.remove(i);
        assert_eq!(e.place_in(i, 1), None, "freed");
        assert_eq!(e.find(&key("a", 1)), None);
        let j = e.add(&key("b", 2), at(3, 0)).unwrap();
        assert_eq!(j, i, "reused");
        assert_eq!(e.place_in(j, 1), None, "segment 1's stale number");
        assert_eq!(e.key(j), key("b", 2));
        assert_eq!(e.place_in(99, 1), None, "never a slot");
    }

    #[test]
    fn used_counts_only_after_the_segment_is_sealed_and_a_move_resets_it() {
        let mut e = Entries::default();
        let i = e.add(&key("a", 1), at(4, 0)).unwrap();
        e.set_used(i, 4);
        assert!(!e.place(i).used, "its own segment is still appended");
        e.set_used(i, 5);
        assert!(e.place(i).used);
        e.set_checked(i);
        e.move_to(i, at(5, 8));
        let p = e.place(i);
        assert!(!p.used && !p.checked && p.segment == 5 && p.offset == 8);
    }

    #[test]
    fn pins_end_by_release_or_expiry_and_leave_with_the_slot() {
        let mut e = Entries::default();
        let i = e.add(&key("a", 1), at(1, 0)).unwrap();
        let (h1, h2) = (
            PinHolder { id: 1, until: 100 },
            PinHolder { id: 2, until: 50 },
        );
        e.pin(i, h1, 0);
        e.pin(i, h2, 0);
        assert!(e.pinned(i, 60), "h1 still holds it");
        e.unpin(i, h1);
        assert!(!e.pinned(i, 60), "h2's pin has expired");
        assert!(e.pinned(i, 10));
        e.remove(i);
        assert!(e.pins.is_empty());
        let j = e.add(&key("a", 2), at(1, 0)).unwrap();
        assert!(!e.pinned(j, 0), "a reused slot has no pins");
    }
}
