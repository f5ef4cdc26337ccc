//! Group commit: one thread for the whole process makes commits durable with one filesystem
//! sync (`syncfs`) per group. A commit asks for a sync once its file is renamed into place;
//! the thread takes every request queued, syncs, answers them all, and starts over. A request
//! queued while a sync runs waits for the next one (that sync may have begun before its
//! rename). One thread rather than one per shard: every `syncfs` writes the whole filesystem,
//! so concurrent ones only repeat each other's work.

use super::accounting::Accounting;
use super::StoreError;
use crate::metrics::Metrics;
use futures::channel::oneshot;
use std::path::Path;
use std::sync::Arc;
use tracing::warn;

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// The process's group-commit thread.
pub struct GroupCommit {
    tx: async_channel::Sender<Waiter>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Opens `tree` (the CAS root) for `syncfs` and starts the thread. A failed sync is
    /// recorded in `accounting` (see [`Accounting::sync_failures`]).
    pub fn start(
        tree: &Path,
        accounting: Arc<Accounting>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<GroupCommit> {
        let root = std::fs::File::open(tree)?;
        let path = tree.to_path_buf();
        GroupCommit::start_with(move || sync_all(&root, &path), accounting, metrics)
    }

    /// The thread, with `sync` as the filesystem sync (tests give it faults the disk here
    /// cannot produce).
    fn start_with(
        mut sync: impl FnMut() -> Result<(), StoreError> + Send + 'static,
        accounting: Arc<Accounting>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<GroupCommit> {
        let (tx, rx) = async_channel::unbounded::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("kiln-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv_blocking() {
                    let mut group = vec![first];
                    while let Ok(next) = rx.try_recv() {
                        group.push(next);
                    }
                    let synced = sync();
                    metrics.group_syncs.inc();
                    metrics.group_synced_commits.inc_by(group.len() as u64);
                    metrics.awaiting_sync.dec_by(group.len() as i64);
                    if let Err(e) = &synced {
                        accounting.sync_failed();
                        warn!(commits = group.len(), error = %e, "a group-commit sync failed; its commits are refused");
                    }
                    for waiter in group {
                        let _ = waiter.send(match &synced {
                            Ok(()) => Ok(()),
                            Err(e) => Err(e.retell()),
                        });
                    }
                }
            })?;
        Ok(GroupCommit {
            tx,
            thread: Some(thread),
        })
    }

    /// Resolves once a sync that began after this call has finished (`metrics.awaiting_sync`
    /// counts the caller until then).
    pub fn sync(
        &self,
        metrics: &Metrics,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        metrics.awaiting_sync.inc();
        let queued = self.tx.try_send(tx);
        if queued.is_err() {
            // The thread is gone (it panicked) and will not count this one off.
            metrics.awaiting_sync.dec();
        }
        async move {
            if queued.is_err() {
                return Err(StoreError::Unavailable);
            }
            rx.await.unwrap_or(Err(StoreError::Unavailable))
        }
    }
}

impl Drop for GroupCommit {
    /// Answers what is queued, then ends the thread.
    fn drop(&mut self) {
        self.tx.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `syncfs` of the CAS's filesystem.
fn sync_all(root: &std::fs::File, path: &Path) -> Result<(), StoreError> {
    #[cfg(target_os = "linux")]
    let synced = super::durable::syncfs(root);
    // Never reached: group commit starts only where `durable::group_commit_supported` (this
    // branch only keeps the crate compiling there).
    #[cfg(not(target_os = "linux"))]
    let synced = root.sync_all();
    synced.map_err(|e| StoreError::io("sync the filesystem of", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many commits from several threads: every one is answered once a sync has run, and
    /// the counters add up.
    #[test]
    fn every_commit_is_answered_after_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let accounting = Arc::new(Accounting::new(u64::MAX, 1));
        let metrics = Metrics::new();
        let group =
            Arc::new(GroupCommit::start(dir.path(), accounting.clone(), metrics.clone()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (group, metrics) = (group.clone(), metrics.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        futures::executor::block_on(group.sync(&metrics)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(metrics.group_synced_commits.get(), 200);
        assert!(metrics.group_syncs.get() >= 1 && metrics.group_syncs.get() <= 200);
        assert_eq!(metrics.awaiting_sync.get(), 0);
        assert_eq!(accounting.sync_failures(), 0);
    }

    /// A failed sync fails exactly the commits that were waiting when it began, counts a
    /// failure for the uploads still being written, and does not poison the next group:
    /// commits that arrived during it are answered by the next sync.
    #[test]
    fn a_failed_sync_fails_its_group_only() {
        use std::sync::mpsc;
        let accounting = Arc::new(Accounting::new(u64::MAX, 1));
        let metrics = Metrics::new();
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let mut calls = 0;
        let group = GroupCommit::start_with(
            move || {
                calls += 1;
                if calls > 1 {
                    return Ok(());
                }
                let _ = entered_tx.send(());
                let _ = release_rx.recv();
                Err(StoreError::io(
                    "sync the filesystem of",
                    Path::new("/test"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ))
            },
            accounting.clone(),
            metrics.clone(),
        )
        .unwrap();
        let first = group.sync(&metrics);
        entered.recv().unwrap();
        let during = [group.sync(&metrics), group.sync(&metrics)];
        assert_eq!(metrics.awaiting_sync.get(), 3);
        release.send(()).unwrap();
        assert!(
            futures::executor::block_on(first).is_err(),
            "its sync failed"
        );
        for later in during {
            assert!(
                futures::executor::block_on(later).is_ok(),
                "answered by the next sync"
            );
        }
        assert_eq!(accounting.sync_failures(), 1);
        assert_eq!(metrics.group_syncs.get(), 2);
        assert_eq!(metrics.group_synced_commits.get(), 3);
        assert_eq!(metrics.awaiting_sync.get(), 0);
    }
}
