//! What the index tells of one blob, by value ([`Entry`]), and the guard through which it is
//! changed in place ([`EntryMut`]).

use super::BlobIndex;
use std::hash::BuildHasher;

/// What the index knows about one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Size in bytes (also in the key; kept here for accounting).
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch (see [`super::atime`]).
    pub atime: u64,
    /// The access time last written to the file's metadata (nanoseconds; the index keeps how
    /// far it is behind `atime` in whole seconds, which is all that deciding when to write the
    /// next needs, so it may read up to a second later than it was).
    pub persisted_atime: u64,
    /// The file's content was hashed by this process (written here, or read and checked).
    /// Blobs found on disk at start-up are checked on first read.
    pub verified: bool,
    /// Holders that need the blob to stay (running actions, transfers); never evicted while > 0.
    pub pins: u32,
}

impl Entry {
    /// A blob just written and verified.
    pub fn fresh(size: u64, now: u64) -> Entry {
        Entry {
            size,
            atime: now,
            persisted_atime: now,
            verified: true,
            pins: 0,
        }
    }

    /// A blob found on disk at start-up.
    pub fn scanned(size: u64, atime: u64) -> Entry {
        Entry {
            size,
            atime,
            persisted_atime: atime,
            verified: false,
            pins: 0,
        }
    }
}

/// A blob's entry, to change in place: written back to the index when dropped.
pub struct EntryMut<'a, S: BuildHasher> {
    pub(super) index: &'a mut BlobIndex<S>,
    pub(super) slot: u32,
    pub(super) entry: Entry,
}

impl<S: BuildHasher> std::ops::Deref for EntryMut<'_, S> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl<S: BuildHasher> std::ops::DerefMut for EntryMut<'_, S> {
    fn deref_mut(&mut self) -> &mut Entry {
        &mut self.entry
    }
}

impl<S: BuildHasher> Drop for EntryMut<'_, S> {
    fn drop(&mut self) {
        let old = self.index.entry(self.slot).size;
        self.index.bytes = self.index.bytes - old + self.entry.size;
        self.index.set_entry(self.slot, &self.entry);
    }
}
