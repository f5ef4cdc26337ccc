//! What the action-cache store hands out: a stored result, with the mark that remembers when
//! it was last found complete.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A stored result, as the store hands it out.
#[derive(Clone)]
pub struct Stored {
    /// The serialized `ActionResult`.
    pub data: Bytes,
    /// Shared by every hit of this stored version of the entry (a new `put` starts a new
    /// one): lets the cache remember that the result was found complete, and when.
    pub checked: Arc<CheckMark>,
    /// The file this version is in (device, inode), so that dropping it cannot drop a newer
    /// one a put renamed in meanwhile.
    pub(super) file: (u64, u64),
}

impl Stored {
    /// A result not kept in the store (read from Redis when the store could not keep it).
    pub(crate) fn detached(data: Bytes) -> Stored {
        Stored {
            data,
            checked: CheckMark::new(),
            // No file has inode 0: dropping it drops nothing.
            file: (0, 0),
        }
    }
}

/// When a stored result was last found complete.
#[derive(Debug)]
pub struct CheckMark {
    /// The CAS's removal count read before that check ([`NEVER_CHECKED`] before any).
    pub removals: AtomicU64,
    /// When it was made (nanoseconds since the Unix epoch).
    pub at: AtomicU64,
}

impl CheckMark {
    /// Whether the last check still holds at `now`: made less than `recheck_after` ago, and
    /// no blob has left the CAS since (`removals` is its count now).
    pub fn holds(&self, now: u64, removals: u64, recheck_after: std::time::Duration) -> bool {
        let at = self.at.load(Ordering::Acquire);
        at != 0
            && now.saturating_sub(at) < u64::try_from(recheck_after.as_nanos()).unwrap_or(u64::MAX)
            && self.removals.load(Ordering::Acquire) == removals
    }

    pub(super) fn new() -> Arc<CheckMark> {
        Arc::new(CheckMark {
            removals: AtomicU64::new(NEVER_CHECKED),
            at: AtomicU64::new(0),
        })
    }
}

/// `CheckMark::removals` before any completeness check.
pub const NEVER_CHECKED: u64 = u64::MAX;
