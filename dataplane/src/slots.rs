//! A count of things in use across every shard, bounded (sans-IO): connections open, zstd
//! decoders running, bytes of uploads held in memory. Taking places gives a [`Slot`], which
//! gives them back when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `max` things in use at once.
#[derive(Debug)]
pub struct Slots {
    open: AtomicUsize,
    max: usize,
}

/// One thing's places; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    n: usize,
}

impl Slots {
    /// Room for `max`.
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// A place for one more, or `None` when `max` are taken.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        self.take_n(1)
    }

    /// `n` places at once (bytes, say), or `None` when fewer than `n` are free.
    pub fn take_n(self: &Arc<Self>, n: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |open| {
                open.checked_add(n).filter(|total| *total <= self.max)
            })
            .ok()
            .map(|_| Slot {
                slots: self.clone(),
                n,
            })
    }

    /// Places taken now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The most that may be taken at once.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(self.n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let slots = Slots::new(2);
        let a = slots.take().expect("first");
        let b = slots.take().expect("second");
        assert!(slots.take().is_none(), "full");
        assert_eq!(slots.open(), 2);
        drop(a);
        let _c = slots.take().expect("room again");
        drop(b);
        assert_eq!(slots.open(), 1);
    }

    #[test]
    fn many_places_are_taken_and_given_back_at_once() {
        let bytes = Slots::new(100);
        let a = bytes.take_n(60).expect("fits");
        assert!(bytes.take_n(41).is_none(), "over");
        assert!(bytes.take_n(usize::MAX).is_none(), "no overflow");
        let b = bytes.take_n(40).expect("exactly full");
        drop(a);
        assert_eq!(bytes.open(), 40);
        drop(b);
        assert_eq!(bytes.open(), 0);
    }
}
