//! What a worker tells its schedulers of itself: its directory cache's counts and
//! directories, the blobs its CAS holds (when served to peers), and its transfers. One
//! [`ReportHub`] takes the reports and sends each to every open session, so that a worker
//! serving several schedulers tells each the same (changes are taken from the caches once).

use crate::action::WorkerContext;
use crate::holdings::Taken;
use kiln_proto::worker::{worker_message, HeldKey, WorkerMessage, WorkerReport};
use kiln_reapi::digest::BlobKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

/// Keys of each list (directories, blobs; added, removed) per report message (about 100
/// bytes each).
const KEYS_PER_MESSAGE: usize = 10_000;

/// Directories a full report lists at most (the scheduler remembers about as many).
const MAX_REPORTED_DIRS: usize = 100_000;

/// Blobs a full report lists at most.
const MAX_REPORTED_BLOBS: usize = 1_000_000;

/// Changes to a set of keys since the last report: with `full`, `added` is the whole set.
#[derive(Debug, Default)]
struct Changes {
    full: bool,
    added: Vec<BlobKey>,
    removed: Vec<BlobKey>,
}

/// The worker's report of itself: its directory cache's counts and directories, the blobs its
/// CAS holds (when served to peers), and its transfers. With `full`, every directory and blob
/// (at most [`MAX_REPORTED_DIRS`] and [`MAX_REPORTED_BLOBS`]), else the changes since the
/// last report. Taken only by the session's own loop, so reports leave in the order they
/// were taken.
async fn reports(ctx: &WorkerContext, full: bool) -> Vec<WorkerMessage> {
    let (dircache, dirs) = match ctx.dircache.as_ref() {
        Some(cache) => {
            let (mut added, removed) = cache.take_changes(full);
            if full {
                // Roots come last (see `Index::take_changes`): keep the end.
                let cut = added.len().saturating_sub(MAX_REPORTED_DIRS);
                added.drain(..cut);
            }
            let dirs = Changes {
                full,
                added,
                removed,
            };
            (Some(cache.stats().report()), dirs)
        }
        None => (None, Changes::default()),
    };
    let (blobs, served) = match &ctx.serving {
        Some(serving) => (blob_changes(ctx, serving, full).await, (serving.served)()),
        None => (Changes::default(), 0),
    };
    report_messages(dircache, ctx.transfers.report(served), dirs, blobs)
}

/// The blobs added to and removed from the CAS since the last report; the whole CAS when
/// `full` or when more changed than was kept.
async fn blob_changes(ctx: &WorkerContext, serving: &crate::peers::Serving, full: bool) -> Changes {
    // Taken before listing: a change made while the listing runs is reported again next
    // time, which is harmless; none is lost.
    let taken = serving.holdings.take();
    match taken {
        Taken::Changes { added, removed } if !full => Changes {
            full: false,
            added,
            removed,
        },
        _ => match ctx.local.cas().client().keys(MAX_REPORTED_BLOBS).await {
            Ok(added) => Changes {
                full: true,
                added,
                removed: Vec::new(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the local CAS for the scheduler");
                serving.holdings.lost();
                Changes::default()
            }
        },
    }
}

/// The messages of one report: the counts and the `full` flags in the first, every list in
/// pieces of at most [`KEYS_PER_MESSAGE`] keys.
fn report_messages(
    dircache: Option<kiln_proto::worker::DirCacheReport>,
    transfers: kiln_proto::worker::TransferReport,
    dirs: Changes,
    blobs: Changes,
) -> Vec<WorkerMessage> {
    fn pieces(keys: Vec<BlobKey>) -> std::vec::IntoIter<Vec<HeldKey>> {
        let held = |k: &BlobKey| HeldKey {
            instance_name: k.instance.as_str().to_string(),
            digest_function: k.digest.function.proto() as i32,
            digest: Some(k.digest.to_proto()),
        };
        let chunks: Vec<Vec<HeldKey>> = keys
            .chunks(KEYS_PER_MESSAGE)
            .map(|c| c.iter().map(held).collect())
            .collect();
        chunks.into_iter()
    }
    let mut lists = [
        pieces(dirs.added),
        pieces(dirs.removed),
        pieces(blobs.added),
        pieces(blobs.removed),
    ];
    let mut messages = Vec::new();
    loop {
        let first = messages.is_empty();
        let [added, removed, blobs_added, blobs_removed] =
            lists.each_mut().map(|l| l.next().unwrap_or_default());
        messages.push(WorkerMessage {
            message: Some(worker_message::Message::Report(WorkerReport {
                dircache: if first { dircache } else { None },
                full: dirs.full && first,
                added,
                removed,
                blobs_full: blobs.full && first,
                blobs_added,
                blobs_removed,
                transfers: first.then_some(transfers),
            })),
        });
        if lists.iter().all(|l| l.len() == 0) {
            return messages;
        }
    }
}

/// Takes the worker's reports and sends them to every open session, in order: the whole of
/// it to all when a session opens (taking changes resets them for everyone), else the
/// changes since the last report, whenever [`ReportHub::due`] is called. Each session gets
/// its reports through a forwarder of its own, so a session slow to take them holds up no
/// other; one that falls [`BEHIND`] reports gets nothing more until it can take the whole
/// again (one whole report for all, not one per report missed).
pub struct ReportHub {
    /// Open sessions: a token of their joining, and their forwarder.
    sessions: Mutex<Vec<Joined>>,
    joined: AtomicU64,
    due: Notify,
    full: AtomicBool,
}

/// A session that joined.
struct Joined {
    /// The token of its joining.
    token: u64,
    /// Its forwarder.
    forward: mpsc::Sender<Arc<[WorkerMessage]>>,
    /// It missed a report (its forwarder was full): it gets the whole next, once it can.
    missed: bool,
}

/// Reports waiting for a session before it is sent the whole again instead.
pub const BEHIND: usize = 4;

impl ReportHub {
    /// Starts the hub's task (reports of `ctx`'s caches) on the current runtime, for as long
    /// as the runtime runs.
    pub fn start(ctx: Arc<WorkerContext>) -> Arc<ReportHub> {
        let hub = Arc::new(ReportHub {
            sessions: Mutex::new(Vec::new()),
            joined: AtomicU64::new(0),
            due: Notify::new(),
            full: AtomicBool::new(true),
        });
        let this = hub.clone();
        tokio::spawn(async move {
            loop {
                this.due.notified().await;
                // The whole when a session joined, or one that missed reports can take it.
                let full = this.full.swap(false, Ordering::SeqCst)
                    || this
                        .sessions()
                        .iter()
                        .any(|s| s.missed && s.forward.capacity() > 0);
                let report: Arc<[WorkerMessage]> = reports(&ctx, full).await.into();
                this.sessions().retain_mut(|s| {
                    if s.missed && !full {
                        return true; // it waits for a whole report
                    }
                    match s.forward.try_send(report.clone()) {
                        Ok(()) => {
                            s.missed = false;
                            true
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            s.missed = true;
                            true
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    }
                });
            }
        });
        hub
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Vec<Joined>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session opened (its Hello sent), sending through `tx`: it gets a whole report now,
    /// and every report after, until it [leaves](ReportHub::leave) with the token returned.
    pub fn join(&self, tx: mpsc::Sender<WorkerMessage>) -> u64 {
        let token = self.joined.fetch_add(1, Ordering::Relaxed);
        let (forward, mut reports) = mpsc::channel::<Arc<[WorkerMessage]>>(BEHIND);
        tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                for m in report.iter() {
                    if tx.send(m.clone()).await.is_err() {
                        return;
                    }
                }
            }
        });
        self.sessions().push(Joined {
            token,
            forward,
            missed: false,
        });
        self.full.store(true, Ordering::SeqCst);
        self.due.notify_one();
        token
    }

    /// The session that joined with `token` ended.
    pub fn leave(&self, token: u64) {
        self.sessions().retain(|s| s.token != token);
    }

    /// Something changed (an action's result sent, a fetch ahead done, a keep-alive): report.
    pub fn due(&self) {
        self.due.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn keys(range: std::ops::Range<u32>) -> Vec<BlobKey> {
        range
            .map(|i| {
                BlobKey::new(
                    InstanceName::default_instance(),
                    Digest::of(DigestFunction::Sha256, &i.to_le_bytes()),
                )
            })
            .collect()
    }

    fn report(m: &WorkerMessage) -> &WorkerReport {
        match &m.message {
            Some(worker_message::Message::Report(r)) => r,
            other => panic!("not a report: {other:?}"),
        }
    }

    #[test]
    fn a_large_report_goes_in_pieces_and_only_the_first_is_full() {
        let stats = kiln_proto::worker::DirCacheReport {
            entries: 25_000,
            ..Default::default()
        };
        let transfers = kiln_proto::worker::TransferReport {
            peer_bytes: 5,
            ..Default::default()
        };
        let dirs = Changes {
            full: true,
            added: keys(0..25_000),
            removed: keys(0..3),
        };
        let blobs = Changes {
            full: true,
            added: keys(0..12_000),
            removed: keys(0..31_000),
        };
        let messages = report_messages(Some(stats), transfers, dirs, blobs);
        let reports: Vec<&WorkerReport> = messages.iter().map(report).collect();
        let sizes =
            |f: fn(&WorkerReport) -> usize| reports.iter().map(|r| f(r)).collect::<Vec<_>>();
        assert_eq!(sizes(|r| r.added.len()), vec![10_000, 10_000, 5_000, 0]);
        assert_eq!(sizes(|r| r.removed.len()), vec![3, 0, 0, 0]);
        assert_eq!(sizes(|r| r.blobs_added.len()), vec![10_000, 2_000, 0, 0]);
        assert_eq!(
            sizes(|r| r.blobs_removed.len()),
            vec![10_000, 10_000, 10_000, 1_000],
            "removals are cut into pieces too"
        );
        assert_eq!(
            reports
                .iter()
                .map(|r| (r.full, r.blobs_full))
                .collect::<Vec<_>>(),
            vec![(true, true), (false, false), (false, false), (false, false)],
            "a later piece must add to the set, not replace it"
        );
        assert_eq!(reports[0].dircache, Some(stats));
        assert_eq!(reports[0].transfers, Some(transfers));
        assert!(reports[1..]
            .iter()
            .all(|r| r.dircache.is_none() && r.transfers.is_none()));
        // A report of no changes still carries the counts.
        let quiet = report_messages(
            Some(stats),
            transfers,
            Changes::default(),
            Changes::default(),
        );
        assert_eq!(quiet.len(), 1);
        assert_eq!(report(&quiet[0]).dircache, Some(stats));
        assert!(!report(&quiet[0]).full && !report(&quiet[0]).blobs_full);
    }
}
