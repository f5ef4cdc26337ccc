//! How an indexed blob is packed: a 64-byte [`Node`] (hash, one word of size, function and
//! flags, access time, persisted lag, instance number, recency links), with pin counts and
//! sizes that do not fit the word in the index's side tables; and the index's methods that
//! pack an [`Entry`] into a node and read one back.

use super::{BlobIndex, Entry};
use kiln_reapi::digest::{Digest, DigestFunction};
use std::hash::BuildHasher;

/// `Node::instance` of a free slot.
pub(super) const VACANT: u32 = u32::MAX;

/// `Node::word`: the digest's size (when it fits), its function, and flags.
pub(super) const SIZE_MASK: u64 = (1 << 48) - 1;
pub(super) const FUNCTION_SHIFT: u32 = 48;
pub(super) const FUNCTION_MASK: u64 = 0xf << FUNCTION_SHIFT;
/// The blob's bytes were hashed by this process ([`Entry::verified`]).
pub(super) const VERIFIED: u64 = 1 << 52;
/// Pinned: the count is in [`BlobIndex::pins`].
pub(super) const PINNED: u64 = 1 << 53;
/// The digest's size does not fit the word, or the entry's size is not the digest's: both
/// are in [`BlobIndex::odd`] (the action cache's entries, charged by their results' size).
pub(super) const ODD: u64 = 1 << 54;

pub(super) const NANOS: u64 = 1_000_000_000;

/// One indexed blob, packed into 64 bytes: its hash, size, function and flags, access time,
/// instance (by number, see [`Instances`]) and neighbours in recency order. A `BlobKey` and an
/// `Entry` side by side took 104 bytes, the most of a million-blob index's memory. Pin counts
/// and odd sizes, which few blobs have, live in side tables.
pub(super) struct Node {
    pub(super) hash: [u8; 32],
    pub(super) word: u64,
    /// [`Entry::atime`], in full.
    pub(super) atime: u64,
    /// How far [`Entry::persisted_atime`] is behind `atime`, in whole seconds (at most
    /// `u32::MAX`): it only decides when an access time is written again, at a resolution of
    /// seconds, and a lag holds for any clock (an absolute time in seconds would end in 2106).
    pub(super) persisted_lag: u32,
    /// The instance's number; [`VACANT`] for a free slot.
    pub(super) instance: u32,
    /// Toward the most recently used end.
    pub(super) newer: u32,
    /// Toward the least recently used end.
    pub(super) older: u32,
}

/// The sizes of an [`ODD`] node.
#[derive(Clone, Copy)]
pub(super) struct Odd {
    /// The digest's.
    pub(super) size: u64,
    /// The entry's ([`Entry::size`]).
    pub(super) charge: u64,
}

impl Node {
    /// Moves the access time up to `now` (never back), keeping the persisted one where it
    /// was: its lag grows by as much.
    pub(super) fn advance_atime(&mut self, now: u64) {
        let persisted = self
            .atime
            .saturating_sub(u64::from(self.persisted_lag).saturating_mul(NANOS));
        self.atime = self.atime.max(now);
        let lag = (self.atime - persisted) / NANOS;
        self.persisted_lag = u32::try_from(lag).unwrap_or(u32::MAX);
    }
}

impl<S: BuildHasher> BlobIndex<S> {
    pub(super) fn node(&self, i: u32) -> &Node {
        let n = &self.nodes[i as usize];
        debug_assert!(
            n.instance != VACANT,
            "the table and the list only hold live nodes"
        );
        n
    }

    pub(super) fn node_mut(&mut self, i: u32) -> &mut Node {
        &mut self.nodes[i as usize]
    }

    /// The digest of node `i`.
    pub(super) fn digest(&self, i: u32) -> Digest {
        let n = self.node(i);
        let function = DigestFunction::ALL[((n.word & FUNCTION_MASK) >> FUNCTION_SHIFT) as usize];
        Digest {
            function,
            hash: n.hash,
            size: self.digest_size(i),
        }
    }

    pub(super) fn digest_size(&self, i: u32) -> u64 {
        let n = self.node(i);
        if n.word & ODD != 0 {
            self.odd.get(&i).map_or(0, |o| o.size)
        } else {
            n.word & SIZE_MASK
        }
    }

    /// The entry of node `i`.
    pub(super) fn entry(&self, i: u32) -> Entry {
        let n = self.node(i);
        let size = if n.word & ODD != 0 {
            self.odd.get(&i).map_or(0, |o| o.charge)
        } else {
            n.word & SIZE_MASK
        };
        Entry {
            size,
            atime: n.atime,
            persisted_atime: n
                .atime
                .saturating_sub(u64::from(n.persisted_lag).saturating_mul(NANOS)),
            verified: n.word & VERIFIED != 0,
            pins: if n.word & PINNED != 0 {
                self.pins.get(&i).copied().unwrap_or(0)
            } else {
                0
            },
        }
    }

    /// Writes `entry` into node `i` (whose digest is set): the caller keeps `bytes`.
    pub(super) fn set_entry(&mut self, i: u32, entry: &Entry) {
        let size = self.digest_size(i);
        let function = self.nodes[i as usize].word & FUNCTION_MASK;
        let mut word = function;
        if entry.verified {
            word |= VERIFIED;
        }
        if entry.pins > 0 {
            word |= PINNED;
            self.pins.insert(i, entry.pins);
        } else if self.nodes[i as usize].word & PINNED != 0 {
            self.pins.remove(&i);
        }
        if size > SIZE_MASK || entry.size != size {
            word |= ODD;
            self.odd.insert(
                i,
                Odd {
                    size,
                    charge: entry.size,
                },
            );
        } else {
            word |= size;
            if self.nodes[i as usize].word & ODD != 0 {
                self.odd.remove(&i);
            }
        }
        let n = self.node_mut(i);
        n.word = word;
        n.atime = entry.atime;
        let lag = entry.atime.saturating_sub(entry.persisted_atime) / NANOS;
        n.persisted_lag = u32::try_from(lag).unwrap_or(u32::MAX);
    }
}
