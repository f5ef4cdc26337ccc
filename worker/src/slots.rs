//! A worker's action slots (`worker.max_inflight`), shared by its sessions when it serves
//! several schedulers: each scheduler is told it may have as many actions running here as
//! the others leave free ([`Slots::capacity_for`], sent as a `Capacity` message when it
//! changes), and no more than `max_inflight` processes run at once: an action two
//! schedulers sent for the last free slot at the same moment waits here for a slot (with one
//! scheduler, its count is trusted, as before). A slot
//! is given back when the action's process exits (its outputs upload meanwhile), as the
//! scheduler counts it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// The worker's slots.
pub struct Slots {
    total: usize,
    /// Actions each session (by its index) was given and whose process has not exited.
    busy: Mutex<HashMap<usize, usize>>,
    /// Bumped whenever `busy` changes.
    changed: watch::Sender<u64>,
    /// With several sessions: no more processes than slots (with one, its scheduler's count
    /// is the truth, as it always was: a killed action's slot is free for the next at once).
    permits: Option<Arc<Semaphore>>,
}

/// An action's slot, given back by [`Slot::release`] or when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    session: usize,
    permit: Option<OwnedSemaphorePermit>,
    held: bool,
}

impl Slots {
    /// `total` slots (at least one), shared by `sessions` sessions.
    pub fn new(total: usize, sessions: usize) -> Arc<Slots> {
        let total = total.max(1);
        Arc::new(Slots {
            total,
            busy: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            permits: (sessions > 1).then(|| Arc::new(Semaphore::new(total))),
        })
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashMap<usize, usize>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The actions session `session`'s scheduler may have running here: what the other
    /// sessions leave free.
    pub fn capacity_for(&self, session: usize) -> usize {
        let others: usize = self
            .busy()
            .iter()
            .filter(|(s, _)| **s != session)
            .map(|(_, n)| n)
            .sum();
        self.total.saturating_sub(others)
    }

    /// Wakes when any session's count changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn add(&self, session: usize, up: bool) {
        {
            let mut busy = self.busy();
            let n = busy.entry(session).or_insert(0);
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                busy.remove(&session);
            }
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A slot for an action session `session` was sent: counted at once, and held once a
    /// process may start (at once unless every slot is taken).
    pub async fn take(self: &Arc<Self>, session: usize) -> Slot {
        self.add(session, true);
        let mut slot = Slot {
            slots: self.clone(),
            session,
            permit: None,
            held: true,
        };
        if let Some(permits) = &self.permits {
            // The semaphore is never closed.
            slot.permit = permits.clone().acquire_owned().await.ok();
        }
        slot
    }
}

impl Slot {
    /// Counts the slot as session `session`'s from now on (another session adopted the
    /// action).
    pub fn move_to(&mut self, session: usize) {
        if self.held && self.session != session {
            self.slots.add(session, true);
            self.slots.add(self.session, false);
        }
        self.session = session;
    }

    /// Gives the slot back (the action's process exited); later calls do nothing.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.permit = None;
            self.slots.add(self.session, false);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_session_is_never_held_up() {
        let slots = Slots::new(1, 1);
        let _a = slots.take(0).await;
        // Its scheduler freed the slot of an action still being killed: the next goes at once.
        let _b = slots.take(0).await;
        assert_eq!(slots.capacity_for(0), 1);
    }

    #[tokio::test]
    async fn sessions_share_the_slots_and_never_run_more_than_there_are() {
        let slots = Slots::new(2, 2);
        assert_eq!((slots.capacity_for(0), slots.capacity_for(1)), (2, 2));
        let mut changes = slots.changes();
        let mut a = slots.take(0).await;
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!((slots.capacity_for(0), slots.capacity_for(1)), (2, 1));
        let _b = slots.take(1).await;
        assert_eq!((slots.capacity_for(0), slots.capacity_for(1)), (1, 1));
        // Both schedulers sent one more at once: the third waits for a slot.
        let slots2 = slots.clone();
        let third = tokio::spawn(async move { slots2.take(0).await });
        tokio::task::yield_now().await;
        assert_eq!(slots.capacity_for(1), 0, "counted while it waits");
        assert!(!third.is_finished());
        a.release();
        let third = third.await.unwrap();
        assert!(third.permit.is_some());
        a.release(); // twice: nothing more
        assert_eq!((slots.capacity_for(0), slots.capacity_for(1)), (1, 1));
        drop(third);
        assert_eq!((slots.capacity_for(0), slots.capacity_for(1)), (1, 2));
    }
}
