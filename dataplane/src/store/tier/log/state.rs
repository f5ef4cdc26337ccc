//! What a log holds, without I/O: its index (where each blob's record is, whether this process
//! has checked it, when it was last used, who pins it) and its segments, and the choices of
//! eviction. Eviction drops whole segments, oldest first, and copies forward the records that
//! are pinned or were used since their segment stopped being appended to: a second chance
//! per segment, which keeps what builds use and lets the rest go in the order it came.

use super::super::{lease_clock, PinHolder};
use super::entries::{Entries, Place, SlotId};
use kiln_reapi::digest::BlobKey;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

/// One segment file.
#[derive(Debug)]
struct Segment {
    /// The open file (readers keep it while they read, even once the segment is dropped).
    file: Arc<File>,
    /// Its length.
    len: u64,
    /// The slots of the records it got (some may since point elsewhere, or be free).
    slots: Vec<SlotId>,
}

/// Where a blob's record is, as [`State::find`] found it.
#[derive(Debug)]
pub struct Located {
    /// Its segment's file.
    pub file: Arc<File>,
    /// The segment.
    pub segment: u64,
    /// Where its bytes start.
    pub offset: u64,
    /// Whether this process has hashed them.
    pub checked: bool,
}

/// A record to copy forward out of a segment being dropped.
#[derive(Debug, Clone)]
pub struct Keep {
    /// The blob.
    pub key: BlobKey,
    /// Where its bytes are now.
    pub offset: u64,
    /// Whether they were checked.
    pub checked: bool,
}

/// `items` with each once, in their first order (a blob dropped and stored again into the
/// same segment is listed twice).
pub fn each_once<T: std::hash::Hash + Eq + Copy>(mut items: Vec<T>) -> Vec<T> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.retain(|k| seen.insert(*k));
    items
}

/// A log's index and segments.
#[derive(Debug, Default)]
pub struct State {
    entries: Entries,
    segments: BTreeMap<u64, Segment>,
    /// The segment being appended.
    active: u64,
    /// The segments' lengths, summed.
    total: u64,
    /// Bytes of the records the index points at.
    live: u64,
}

impl State {
    /// Adds a segment (found at start-up, or new); the newest added is the one appended.
    pub fn add_segment(&mut self, id: u64, file: Arc<File>, len: u64) {
        self.segments.insert(
            id,
            Segment {
                file,
                len,
                slots: Vec::new(),
            },
        );
        self.total = self.total.saturating_add(len);
        self.active = self.active.max(id);
    }

    /// The segment being appended: its id, file and length.
    pub fn active(&self) -> Option<(u64, Arc<File>, u64)> {
        let s = self.segments.get(&self.active)?;
        Some((self.active, s.file.clone(), s.len))
    }

    /// The id a new segment takes.
    pub fn next_id(&self) -> u64 {
        self.active.saturating_add(1)
    }

    /// `len` bytes were appended to the active segment.
    pub fn grew(&mut self, len: u64) {
        if let Some(s) = self.segments.get_mut(&self.active) {
            s.len = s.len.saturating_add(len);
            self.total = self.total.saturating_add(len);
        }
    }

    /// Records that `key`'s record is in `segment` at `offset` (its bytes) and `record_len`
    /// long. A record of a blob the index already has elsewhere replaces it only when it is
    /// a copy forward (`replacing`: where the index had it); otherwise the first stays.
    pub fn insert(
        &mut self,
        key: BlobKey,
        segment: u64,
        offset: u64,
        record_len: u64,
        checked: bool,
        replacing: Option<(u64, u64)>,
    ) -> bool {
        let place = Place {
            segment,
            offset,
            record_len,
            checked,
            used: false,
        };
        let i = match self.entries.find(&key) {
            Some(i) => {
                let was = self.entries.place(i);
                if replacing != Some((was.segment, was.offset)) {
                    return false;
                }
                self.live = self.live.saturating_sub(was.record_len) + record_len;
                let checked = checked || was.checked;
                self.entries.move_to(i, Place { checked, ..place });
                i
            }
            None => {
                if replacing.is_some() {
                    return false;
                }
                // Only a digest over 4 GiB fails, and a log takes blobs of at most 1 MiB.
                let Some(i) = self.entries.add(&key, place) else {
                    return false;
                };
                self.live = self.live.saturating_add(record_len);
                i
            }
        };
        if let Some(s) = self.segments.get_mut(&segment) {
            s.slots.push(i);
        }
        true
    }

    /// Room for `n` more blobs (before a start's records are indexed).
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// Indexes a record found at start-up: a later record of a blob (a copy forward made
    /// before a crash, in a newer segment) replaces the earlier one.
    pub fn found(&mut self, key: BlobKey, segment: u64, offset: u64, record_len: u64) {
        let place = Place {
            segment,
            offset,
            record_len,
            checked: false,
            used: false,
        };
        let i = match self.entries.find(&key) {
            Some(i) => {
                let was = self.entries.place(i);
                self.live = self.live.saturating_sub(was.record_len);
                self.entries.move_to(i, place);
                i
            }
            None => match self.entries.add(&key, place) {
                Some(i) => i,
                None => return,
            },
        };
        self.live = self.live.saturating_add(record_len);
        if let Some(s) = self.segments.get_mut(&segment) {
            s.slots.push(i);
        }
    }

    /// `key`'s slot, counted as used now.
    fn use_slot(&mut self, key: &BlobKey) -> Option<SlotId> {
        let i = self.entries.find(key)?;
        self.entries.set_used(i, self.active);
        Some(i)
    }

    /// Whether `key` is held; a held key counts as used now.
    pub fn touch(&mut self, key: &BlobKey) -> bool {
        self.use_slot(key).is_some()
    }

    /// Where `key`'s bytes are, counting it as used.
    pub fn find(&mut self, key: &BlobKey) -> Option<Located> {
        let i = self.use_slot(key)?;
        let p = self.entries.place(i);
        let file = self.segments.get(&p.segment)?.file.clone();
        Some(Located {
            file,
            segment: p.segment,
            offset: p.offset,
            checked: p.checked,
        })
    }

    /// `key`'s slot, if the index points at its record in `segment` at `offset`.
    fn slot_at(&self, key: &BlobKey, segment: u64, offset: u64) -> Option<SlotId> {
        let i = self.entries.find(key)?;
        let p = self.entries.place(i);
        (p.segment == segment && p.offset == offset).then_some(i)
    }

    /// Whether `key` is held (without counting it as used).
    pub fn holds(&self, key: &BlobKey) -> bool {
        self.entries.find(key).is_some()
    }

    /// `key`'s bytes, found in `segment` at `offset`, hashed to its digest.
    pub fn checked(&mut self, key: &BlobKey, segment: u64, offset: u64) {
        if let Some(i) = self.slot_at(key, segment, offset) {
            self.entries.set_checked(i);
        }
    }

    /// Drops `key`'s record in `segment` at `offset` from the index (damaged, or lost with
    /// its segment), if the index still points at it: a reader that found a record damaged
    /// must not drop the good one the blob was stored as again meanwhile. Whether it did.
    pub fn remove_at(&mut self, key: &BlobKey, segment: u64, offset: u64) -> bool {
        match self.slot_at(key, segment, offset) {
            Some(i) => {
                self.free(i);
                true
            }
            None => false,
        }
    }

    /// Frees slot `i` (held), taking its record out of the live bytes.
    fn free(&mut self, i: SlotId) {
        let was = self.entries.place(i);
        self.live = self.live.saturating_sub(was.record_len);
        self.entries.remove(i);
    }

    /// Pins `key` for `holder`: `Some(checked)` when held.
    pub fn pin(&mut self, holder: PinHolder, key: &BlobKey) -> Option<bool> {
        let i = self.use_slot(key)?;
        self.entries.pin(i, holder, lease_clock());
        Some(self.entries.place(i).checked)
    }

    /// Releases `holder`'s pin of `key`.
    pub fn unpin(&mut self, holder: PinHolder, key: &BlobKey) {
        if let Some(i) = self.entries.find(key) {
            self.entries.unpin(i, holder);
        }
    }

    /// The sealed segments to drop, oldest first, so that the log is within `cap` again (at
    /// most every segment but the one being appended).
    pub fn over(&self, cap: u64) -> Vec<u64> {
        let mut total = self.total;
        let mut out = Vec::new();
        for (&id, s) in &self.segments {
            if total <= cap || id >= self.active {
                break;
            }
            out.push(id);
            total = total.saturating_sub(s.len);
        }
        out
    }

    /// The slots segment `id` got, taken from it for [`State::sort_out`] (pass them through
    /// [`each_once`]).
    pub fn take_slots(&mut self, id: u64) -> Option<Vec<SlotId>> {
        Some(std::mem::take(&mut self.segments.get_mut(&id)?.slots))
    }

    /// Splits the records of `slots` that are in segment `id` into those to copy forward and
    /// those to drop, which leave the index now. Pinned records are kept; records used since
    /// the segment was sealed are kept while `budget` (bytes, shared by one pass of eviction)
    /// lasts, so that a log whose every blob is in use still frees space. Called on a
    /// segment's slots a chunk at a time, so that the index is not held for a whole segment.
    pub fn sort_out(
        &mut self,
        id: u64,
        slots: &[SlotId],
        budget: &mut u64,
    ) -> (Vec<Keep>, Vec<BlobKey>) {
        let now = lease_clock();
        let (mut keep, mut drop) = (Vec::new(), Vec::new());
        for &i in slots {
            let Some(p) = self.entries.place_in(i, id) else {
                continue;
            };
            let pinned = self.entries.pinned(i, now);
            let second_chance = !pinned && p.used && p.record_len <= *budget;
            if second_chance {
                *budget -= p.record_len;
            }
            let key = self.entries.key(i);
            if pinned || second_chance {
                keep.push(Keep {
                    offset: p.offset,
                    checked: p.checked,
                    key,
                });
            } else {
                self.free(i);
                drop.push(key);
            }
        }
        (keep, drop)
    }

    /// Segment `id`'s file.
    pub fn segment_file(&self, id: u64) -> Option<Arc<File>> {
        self.segments.get(&id).map(|s| s.file.clone())
    }

    /// Removes segment `id` (its records copied forward or dropped).
    pub fn drop_segment(&mut self, id: u64) {
        if let Some(s) = self.segments.remove(&id) {
            self.total = self.total.saturating_sub(s.len);
        }
    }

    /// Blobs held.
    pub fn blobs(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of segment files.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of the records the index points at.
    pub fn live(&self) -> u64 {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key(n: u32) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &n.to_le_bytes()),
        )
    }

    /// Sorts out the whole of segment `id`.
    fn sort(s: &mut State, id: u64, budget: &mut u64) -> (Vec<Keep>, Vec<BlobKey>) {
        let slots = each_once(s.take_slots(id).unwrap());
        s.sort_out(id, &slots, budget)
    }

    /// A budget that never runs out.
    fn unlimited() -> u64 {
        u64::MAX
    }

    fn file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    /// Segments 1..=3 of 100 bytes, each with one record; 4 is being appended.
    fn three_sealed() -> State {
        let mut s = State::default();
        for id in 1..=4 {
            s.add_segment(id, file(), if id < 4 { 100 } else { 0 });
        }
        for id in 1..=3 {
            assert!(s.insert(key(id as u32), id, 50, 100, true, None));
        }
        s
    }

    #[test]
    fn the_oldest_sealed_segments_go_until_the_cap_holds() {
        let s = three_sealed();
        assert_eq!(s.total(), 300);
        assert_eq!(s.over(300), Vec::<u64>::new());
        assert_eq!(s.over(250), vec![1]);
        assert_eq!(s.over(0), vec![1, 2, 3], "never the one being appended");
    }

    #[test]
    fn used_and_pinned_records_are_copied_forward_the_rest_dropped() {
        let mut s = three_sealed();
        // Blob 2 is used while segment 4 is appended; blob 3 is pinned; blob 1 is neither.
        assert!(s.touch(&key(2)));
        let holder = PinHolder::unbounded();
        assert_eq!(s.pin(holder, &key(3)), Some(true));
        // pin counts as use: undo that to test the pin alone.
        let three = s.entries.find(&key(3)).unwrap();
        s.entries.clear_used(three);
        for id in 1..=3 {
            let (keep, drop) = sort(&mut s, id, &mut unlimited());
            match id {
                1 => {
                    assert!(keep.is_empty());
                    assert_eq!(drop, vec![key(1)]);
                }
                _ => {
                    assert_eq!(keep.len(), 1, "segment {id}");
                    assert_eq!(keep[0].key, key(id as u32));
                    assert!(drop.is_empty());
                }
            }
        }
        assert!(!s.holds(&key(1)));
        // A copy forward moves the entry; a stale copy (the entry moved meanwhile) does not.
        assert!(s.insert(key(2), 4, 10, 100, true, Some((2, 50))));
        assert!(!s.insert(key(2), 4, 500, 100, true, Some((2, 50))));
        assert!(
            !s.insert(key(1), 4, 600, 100, true, Some((1, 50))),
            "dropped meanwhile"
        );
        assert_eq!(s.find(&key(2)).map(|l| l.offset), Some(10));
        // Once copied, a record is not kept again unless used again.
        s.unpin(holder, &key(3));
        assert!(s.insert(key(3), 4, 200, 100, true, Some((3, 50))));
        s.drop_segment(2);
        s.drop_segment(3);
        s.add_segment(5, file(), 0);
        assert!(s.touch(&key(2)), "used while segment 5 is appended");
        let (keep, drop) = sort(&mut s, 4, &mut unlimited());
        assert!(keep.len() == 1 && keep[0].key == key(2), "{keep:?}");
        assert_eq!(drop, vec![key(3)]);
    }

    #[test]
    fn used_records_get_a_second_chance_only_within_the_budget() {
        let mut s = State::default();
        for id in 1..=2 {
            s.add_segment(id, file(), 0);
        }
        for n in 0..4 {
            assert!(s.insert(key(n), 1, 50 + u64::from(n) * 100, 100, true, None));
            assert!(s.touch(&key(n)), "used while segment 2 is appended");
        }
        // A record listed twice (dropped and stored again into the same segment) counts once.
        let zero = s.entries.find(&key(0)).unwrap();
        s.segments.get_mut(&1).unwrap().slots.push(zero);
        let mut budget = 250;
        let (keep, drop) = sort(&mut s, 1, &mut budget);
        assert_eq!(keep.len(), 2, "{keep:?}");
        assert_eq!(drop.len(), 2, "{drop:?}");
        assert_eq!(budget, 50);
    }

    #[test]
    fn a_second_record_of_a_held_blob_does_not_replace_it() {
        let mut s = three_sealed();
        assert!(!s.insert(key(1), 4, 0, 100, true, None));
        assert_eq!(s.find(&key(1)).map(|l| l.offset), Some(50));
        assert_eq!(s.live(), 300);
        assert!(!s.remove_at(&key(1), 1, 51), "not where the index has it");
        assert!(!s.remove_at(&key(1), 2, 50), "not where the index has it");
        assert!(s.remove_at(&key(1), 1, 50));
        assert_eq!(s.live(), 200);
    }

    /// A segment lists slot numbers; a slot freed and reused by a blob in another segment is
    /// not that segment's to drop.
    #[test]
    fn a_reused_slot_is_not_dropped_with_its_old_segment() {
        let mut s = three_sealed();
        assert!(s.remove_at(&key(1), 1, 50), "damaged, say");
        assert!(s.insert(key(9), 4, 0, 100, true, None));
        let (keep, drop) = sort(&mut s, 1, &mut unlimited());
        assert!(keep.is_empty() && drop.is_empty(), "{keep:?} {drop:?}");
        assert!(s.holds(&key(9)));
        assert_eq!(s.live(), 300);
    }

    #[test]
    fn an_expired_pin_keeps_nothing() {
        let mut s = three_sealed();
        let holder = PinHolder {
            id: 7,
            until: lease_clock(),
        };
        s.pin(holder, &key(1));
        let one = s.entries.find(&key(1)).unwrap();
        s.entries.clear_used(one);
        let (keep, drop) = sort(&mut s, 1, &mut unlimited());
        assert!(keep.is_empty());
        assert_eq!(drop, vec![key(1)]);
    }
}
