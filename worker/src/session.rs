//! The worker's session with the scheduler: connect, say Hello, run what it is sent (up to its
//! capacity), report, keep the stream alive; when the stream drops, kill what runs (the
//! scheduler re-queues it) and reconnect with exponential backoff, so a restarted server gets
//! its workers back on its own.

use crate::action::{execute, Progress, WorkerContext};
use crate::holdings::Taken;
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use kiln_proto::worker::{
    server_message, worker_message, ExecuteComplete, ExecutionStarted, GoingAway, HeldKey, Hello,
    KeepAlive, Property, ServerMessage, WorkerMessage, WorkerReport,
};
use kiln_reapi::digest::BlobKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// How a worker presents itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Name in logs and results.
    pub name: String,
    /// Platform properties offered.
    pub properties: Vec<(String, String)>,
    /// Actions run at once.
    pub max_inflight: usize,
}

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

/// Connects to the scheduler and serves sessions until `stop` turns true; then says GoingAway
/// and lets running actions finish.
pub async fn run(
    link: crate::link::Link,
    identity: Identity,
    ctx: Arc<WorkerContext>,
    max_delay: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let began = Instant::now();
        match link.connect().await {
            Ok(channel) => {
                let ended = session(channel, &identity, ctx.clone(), stop.clone()).await;
                match ended {
                    Ok(()) => tracing::info!("session with the scheduler ended"),
                    Err(e) => tracing::warn!(error = %e, "session with the scheduler failed"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot reach the scheduler"),
        }
        if *stop.borrow() {
            return;
        }
        // A session that lasted a while resets the backoff.
        if began.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        let jitter = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]));
        tokio::select! {
            _ = tokio::time::sleep(delay + jitter) => {}
            _ = stop.changed() => {}
        }
        delay = (delay * 2).min(max_delay);
    }
}

type Running = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

async fn session(
    channel: crate::link::LinkChannel,
    identity: &Identity,
    ctx: Arc<WorkerContext>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<WorkerMessage>(256);
    let send = |tx: &mpsc::Sender<WorkerMessage>, m: worker_message::Message| {
        let _ = tx.try_send(WorkerMessage { message: Some(m) });
    };
    send(
        &tx,
        worker_message::Message::Hello(Hello {
            worker_id: identity.name.clone(),
            properties: identity
                .properties
                .iter()
                .map(|(name, value)| Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            max_inflight: identity.max_inflight as u32,
            cas_endpoint: ctx
                .serving
                .as_ref()
                .map(|s| s.endpoint.clone())
                .unwrap_or_default(),
            cas_tls_name: ctx
                .serving
                .as_ref()
                .and_then(|s| s.tls_name.clone())
                .unwrap_or_default(),
            running: Vec::new(),
        }),
    );
    // Signalled by an action's task once its result is sent, by a fetch ahead once done and
    // by the keep-alive: the reporter then reports what changed.
    let report_due = Arc::new(tokio::sync::Notify::new());
    let mut inbound = WorkerApiClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(scheduler = "connected", "worker session open");
    // Reports are made and sent by a task of their own, in order (the whole of it first),
    // so that listing a large CAS never holds up the messages this loop reads.
    let reporter = {
        let (ctx, tx, due) = (ctx.clone(), tx.clone(), report_due.clone());
        tokio::spawn(async move {
            let mut full = true;
            loop {
                for report in reports(&ctx, full).await {
                    if tx.send(report).await.is_err() {
                        return;
                    }
                }
                full = false;
                due.notified().await;
            }
        })
    };
    let running: Running = Arc::default();
    // The fetch ahead running, if any: its operation, and how to stop it (a session that
    // ends stops it too).
    let mut prefetching: Option<(String, tokio::task::AbortHandle)> = None;
    let mut keepalive = tokio::time::interval(Duration::from_secs(5));
    let mut going_away = false;
    let result = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(ServerMessage { message: Some(m) })) => match m {
                    server_message::Message::Welcome(w) => {
                        if let Some(d) = w.keep_alive_interval {
                            let every = Duration::from_secs(d.seconds.max(1) as u64);
                            keepalive = tokio::time::interval(every);
                        }
                    }
                    server_message::Message::StartExecute(start) => {
                        // Its own fetch takes over from a fetch ahead of the same action.
                        if prefetching.as_ref().is_some_and(|(op, _)| *op == start.operation) {
                            if let Some((_, ahead)) = prefetching.take() {
                                ahead.abort();
                            }
                        }
                        let (kill_tx, kill_rx) = oneshot::channel();
                        let operation = start.operation.clone();
                        running.lock().unwrap_or_else(|e| e.into_inner()).insert(operation.clone(), kill_tx);
                        send(&tx, worker_message::Message::Started(ExecutionStarted { operation: operation.clone() }));
                        let (tx, ctx, running) = (tx.clone(), ctx.clone(), running.clone());
                        let report_due = report_due.clone();
                        tokio::spawn(async move {
                            let progress_tx = tx.clone();
                            let op = operation.clone();
                            let progress = move |p: Progress| match p {
                                Progress::Executed => {
                                    let _ = progress_tx.try_send(WorkerMessage {
                                        message: Some(worker_message::Message::ExecuteComplete(ExecuteComplete { operation: op.clone() })),
                                    });
                                }
                            };
                            let result = execute(ctx.clone(), start, kill_rx, progress).await;
                            running.lock().unwrap_or_else(|e| e.into_inner()).remove(&operation);
                            let _ = tx.send(WorkerMessage { message: Some(worker_message::Message::Result(result)) }).await;
                            report_due.notify_one();
                        });
                    }
                    server_message::Message::Prefetch(p) => {
                        // One at a time: the newest replaces the one before, whose action the
                        // scheduler has placed elsewhere by now.
                        let operation = p.operation.clone();
                        let (ctx, report_due) = (ctx.clone(), report_due.clone());
                        let task = tokio::spawn(async move {
                            crate::action::prefetch(ctx, p).await;
                            // What it fetched, for the scheduler's placement.
                            report_due.notify_one();
                        });
                        if let Some((_, old)) = prefetching.replace((operation, task.abort_handle())) {
                            old.abort();
                        }
                    }
                    server_message::Message::Revocations(r) => {
                        if let Some(refuse) = &ctx.refuse {
                            tracing::info!(revoked = r.fingerprints.len(), "revoked workers' certificates refused by the local CAS");
                            refuse(&r.fingerprints);
                        }
                    }
                    server_message::Message::Kill(k) => {
                        if let Some(kill) = running.lock().unwrap_or_else(|e| e.into_inner()).remove(&k.operation) {
                            let _ = kill.send(());
                        }
                    }
                    server_message::Message::KeepAlive(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = keepalive.tick() => {
                send(&tx, worker_message::Message::KeepAlive(KeepAlive {}));
                // Also between results: what it served to peers, and what left its CAS.
                report_due.notify_one();
            }
            _ = stop.changed(), if !going_away => {
                if *stop.borrow() {
                    going_away = true;
                    send(&tx, worker_message::Message::GoingAway(GoingAway {}));
                    tracing::info!("going away: finishing running actions");
                }
            }
        }
        if going_away && running.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            break Ok(());
        }
    };
    reporter.abort();
    if let Some((_, ahead)) = prefetching.take() {
        ahead.abort();
    }
    // Whatever still runs cannot be reported on this session: the scheduler re-queues it.
    for (_, kill) in running.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        let _ = kill.send(());
    }
    result
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
