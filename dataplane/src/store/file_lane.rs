//! Metadata calls on the CAS's files — rename, chmod, unlink, mkdir, access times — run on
//! one thread per owner shard instead of on the shard's core, where each would stall every
//! connection on that core for as long as the filesystem takes (ZFS under load: milliseconds).
//!
//! One thread per shard, not a pool, because the owner's ordering must survive the move: an
//! eviction's unlink queued before a re-upload's rename of the same path runs first. The
//! queue is bounded; when it is full the caller waits for room (the old cost of running the
//! call on the core, and only under a backlog of `LANE_DEPTH` calls), never runs it out of
//! order.

use futures::channel::oneshot;
use std::future::Future;
use std::io;

/// Calls queued per lane before callers wait for room.
pub const LANE_DEPTH: usize = 65_536;

type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs filesystem calls in the order they were queued.
pub struct FileLane {
    tx: async_channel::Sender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileLane {
    /// Starts a lane on a new thread called `name`. Dropping the lane runs what is queued and
    /// waits for the thread to end, so that once an owner is gone its files are settled.
    pub fn start(name: String) -> io::Result<FileLane> {
        let (tx, rx) = async_channel::bounded::<Job>(LANE_DEPTH);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(job) = rx.recv_blocking() {
                job();
            }
        })?;
        Ok(FileLane {
            tx,
            thread: Some(thread),
        })
    }

    /// Queues `op` after everything queued before it, without waiting for it.
    pub fn queue(&self, op: impl FnOnce() + Send + 'static) {
        match self.tx.try_send(Box::new(op)) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Full(job)) => {
                // Running it here would overtake the queue; waiting keeps the order.
                let _ = self.tx.send_blocking(job);
            }
            // The thread is gone only with the process (a panic aborts).
            Err(async_channel::TrySendError::Closed(job)) => job(),
        }
    }

    /// Runs `op` after everything queued before it; resolves to its result (`None` only if
    /// the lane's thread is gone, which a panic would take the whole process with).
    pub fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Option<T>> + 'static {
        let (tx, rx) = oneshot::channel();
        self.queue(move || {
            let _ = tx.send(op());
        });
        async move { rx.await.ok() }
    }

    /// Resolves once everything queued so far has run (at shutdown, before the process exits).
    pub fn drained(&self) -> impl Future<Output = ()> + 'static {
        let done = self.run(|| ());
        async move {
            let _ = done.await;
        }
    }

    /// Calls queued and not yet run.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

impl Drop for FileLane {
    fn drop(&mut self) {
        self.tx.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn runs_calls_in_order_off_the_caller_thread() {
        let lane = FileLane::start("lane-test".into()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let caller = std::thread::current().id();
        for i in 0..100 {
            let seen = seen.clone();
            lane.queue(move || {
                assert_ne!(std::thread::current().id(), caller);
                seen.lock().unwrap().push(i);
            });
        }
        let n = futures::executor::block_on(lane.run({
            let seen = seen.clone();
            move || seen.lock().unwrap().len()
        }))
        .unwrap();
        assert_eq!(n, 100, "a run waits for everything queued before it");
        assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_full_queue_makes_the_caller_wait_in_order() {
        let lane = Arc::new(FileLane::start("lane-full".into()).unwrap());
        // Hold the lane's thread so the queue fills.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        lane.queue(move || {
            started_tx.send(()).unwrap();
            blocked.recv().unwrap();
        });
        started.recv().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..LANE_DEPTH {
            let seen = seen.clone();
            lane.queue(move || seen.lock().unwrap().push(i));
        }
        assert_eq!(lane.depth(), LANE_DEPTH);
        let (queued_tx, queued) = std::sync::mpsc::channel::<()>();
        let extra = {
            let (lane, seen) = (lane.clone(), seen.clone());
            std::thread::spawn(move || {
                lane.queue(move || seen.lock().unwrap().push(LANE_DEPTH));
                queued_tx.send(()).unwrap();
            })
        };
        assert!(
            queued
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "past the bound the caller waits"
        );
        assert!(seen.lock().unwrap().is_empty(), "nothing ran out of order");
        release.send(()).unwrap();
        extra.join().unwrap();
        futures::executor::block_on(lane.drained());
        assert_eq!(*seen.lock().unwrap(), (0..=LANE_DEPTH).collect::<Vec<_>>());
    }
}
