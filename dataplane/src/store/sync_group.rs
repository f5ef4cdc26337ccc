//! Group commit (sans-IO): commits that need to become durable share one sync. A commit that
//! joins while no sync runs starts one; commits that join while one runs wait for the next,
//! because the running sync may have started before their rename. So with N commits arriving
//! during one sync, the next sync makes all N durable at once.

/// The waiters of one sync.
pub type Batch<W> = Vec<W>;

/// Commits waiting to be made durable, and whether a sync is running.
#[derive(Debug)]
pub struct SyncGroup<W> {
    /// Covered by the sync that is running (empty when none runs).
    running: Option<Batch<W>>,
    /// Joined while a sync ran: covered by the next one.
    next: Batch<W>,
}

impl<W> Default for SyncGroup<W> {
    fn default() -> Self {
        SyncGroup {
            running: None,
            next: Vec::new(),
        }
    }
}

impl<W> SyncGroup<W> {
    /// A group with no sync running.
    pub fn new() -> SyncGroup<W> {
        SyncGroup::default()
    }

    /// A commit whose rename has completed wants durability. True: no sync is running, so
    /// the caller starts one now (and reports it with [`SyncGroup::finished`]).
    #[must_use]
    pub fn join(&mut self, waiter: W) -> bool {
        match &mut self.running {
            Some(_) => {
                self.next.push(waiter);
                false
            }
            None => {
                self.running = Some(vec![waiter]);
                true
            }
        }
    }

    /// The running sync ended: returns the waiters it covered (to be answered with its
    /// outcome) and whether another sync must start now for those that joined meanwhile.
    pub fn finished(&mut self) -> (Batch<W>, bool) {
        let done = self.running.take().unwrap_or_default();
        if self.next.is_empty() {
            return (done, false);
        }
        self.running = Some(std::mem::take(&mut self.next));
        (done, true)
    }

    /// Commits waiting, in the running sync and for the next.
    pub fn waiting(&self) -> usize {
        self.running.as_ref().map_or(0, Vec::len) + self.next.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_commit_starts_a_sync_and_later_ones_share_the_next() {
        let mut g = SyncGroup::new();
        assert!(g.join(1), "nothing running: start");
        assert!(!g.join(2), "joined during the sync: waits for the next");
        assert!(!g.join(3));
        assert_eq!(g.waiting(), 3);
        assert_eq!(
            g.finished(),
            (vec![1], true),
            "2 and 3 need a sync of their own"
        );
        assert!(!g.join(4), "a sync is running again");
        assert_eq!(g.finished(), (vec![2, 3], true));
        assert_eq!(g.finished(), (vec![4], false), "nothing left: idle");
        assert_eq!(g.waiting(), 0);
        assert!(g.join(5), "idle again: the next commit starts a sync");
    }

    #[test]
    fn a_commit_is_never_answered_by_a_sync_that_started_before_it_joined() {
        // Model: each commit joins at a step; syncs start and end at steps. A commit may only
        // be answered by a sync that started after it joined.
        let mut g = SyncGroup::new();
        let mut sync_started_at: Option<usize> = None;
        let mut joined_at = std::collections::HashMap::new();
        for step in 0..200usize {
            if step % 3 != 2 {
                joined_at.insert(step, step);
                if g.join(step) {
                    sync_started_at = Some(step);
                }
            } else if let Some(started) = sync_started_at {
                let (done, again) = g.finished();
                for w in done {
                    assert!(
                        joined_at[&w] <= started,
                        "commit {w} answered by an older sync"
                    );
                }
                sync_started_at = again.then_some(step);
            }
        }
    }
}
