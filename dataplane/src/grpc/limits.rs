//! Per-connection bounds that are not HTTP/2 settings (sans-IO): how long a connection has had
//! no call in flight. (How many are open across shards is a [`crate::slots::Slots`].)

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Calls in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    in_flight: Cell<usize>,
    idle_since: Cell<Option<Instant>>,
}

impl Activity {
    /// A connection opened at `now`, with nothing in flight.
    pub fn new(now: Instant) -> Activity {
        Activity {
            in_flight: Cell::new(0),
            idle_since: Cell::new(Some(now)),
        }
    }

    /// Records a call starting.
    pub fn start(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.idle_since.set(None);
    }

    /// Records a call ending at `now`.
    pub fn end(&self, now: Instant) {
        let left = self.in_flight.get().saturating_sub(1);
        self.in_flight.set(left);
        if left == 0 {
            self.idle_since.set(Some(now));
        }
    }

    /// How long to wait before the connection could have been idle for `limit`: `None` when
    /// it has been (close it), else the time left (a full `limit` while calls are in flight).
    pub fn wait(&self, limit: Duration, now: Instant) -> Option<Duration> {
        match self.idle_since.get() {
            None => Some(limit),
            Some(since) => {
                let left = limit.saturating_sub(now.saturating_duration_since(since));
                (!left.is_zero()).then_some(left)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let a = Activity::new(t0);
        assert_eq!(a.wait(s(10), t0 + s(4)), Some(s(6)));
        a.start();
        a.start();
        assert_eq!(
            a.wait(s(10), t0 + s(60)),
            Some(s(10)),
            "busy: check again later"
        );
        a.end(t0 + s(61));
        assert_eq!(
            a.wait(s(10), t0 + s(80)),
            Some(s(10)),
            "one call still in flight"
        );
        a.end(t0 + s(81));
        assert_eq!(a.wait(s(10), t0 + s(85)), Some(s(6)));
        assert_eq!(a.wait(s(10), t0 + s(91)), None, "idle for the limit");
    }
}
