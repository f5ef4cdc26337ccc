//! The worker's session with the scheduler: connect, say Hello, run what it is sent (up to its
//! capacity), report, keep the stream alive; when the stream drops, kill what runs (the
//! scheduler re-queues it) and reconnect with exponential backoff, so a restarted server gets
//! its workers back on its own.

use crate::action::{execute, Progress, WorkerContext};
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use kiln_proto::worker::{
    server_message, worker_message, CachedRoot, ExecuteComplete, ExecutionStarted, GoingAway,
    Hello, KeepAlive, Property, ServerMessage, WorkerMessage, WorkerReport,
};
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

/// Input roots per report message (about 100 bytes each).
const ROOTS_PER_MESSAGE: usize = 10_000;

/// Input roots a full report lists at most (the scheduler remembers about as many).
const MAX_REPORTED_ROOTS: usize = 100_000;

/// The worker's report of itself (its directory cache), when it has one: with `full`, every
/// input root its cache holds (at most [`MAX_REPORTED_ROOTS`]), else the changes since the last
/// report; in messages of at most [`ROOTS_PER_MESSAGE`] roots, the first carrying `full`.
/// Taken only by the session's own loop, so reports leave in the order they were taken.
fn reports(ctx: &WorkerContext, full: bool) -> Vec<WorkerMessage> {
    let Some(cache) = ctx.dircache.as_ref() else {
        return Vec::new();
    };
    let (mut added, removed) = cache.take_changes(full);
    if full {
        added.truncate(MAX_REPORTED_ROOTS);
    }
    report_messages(cache.stats().report(), full, added, removed)
}

/// The messages of one report: `stats` and `removed` in the first, which carries `full`, and
/// `added` in pieces of at most [`ROOTS_PER_MESSAGE`].
fn report_messages(
    stats: kiln_proto::worker::DirCacheReport,
    full: bool,
    added: Vec<kiln_reapi::digest::BlobKey>,
    removed: Vec<kiln_reapi::digest::BlobKey>,
) -> Vec<WorkerMessage> {
    let root = |k: kiln_reapi::digest::BlobKey| CachedRoot {
        instance_name: k.instance.as_str().to_string(),
        digest_function: k.digest.function.proto() as i32,
        digest: Some(k.digest.to_proto()),
    };
    let mut messages = Vec::new();
    let mut removed: Vec<CachedRoot> = removed.into_iter().map(root).collect();
    let mut added = added.into_iter().map(root).peekable();
    loop {
        let chunk: Vec<CachedRoot> = added.by_ref().take(ROOTS_PER_MESSAGE).collect();
        let first = messages.is_empty();
        messages.push(WorkerMessage {
            message: Some(worker_message::Message::Report(WorkerReport {
                dircache: first.then_some(stats),
                full: full && first,
                added: chunk,
                removed: std::mem::take(&mut removed),
            })),
        });
        if added.peek().is_none() {
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
            cas_endpoint: String::new(),
            running: Vec::new(),
        }),
    );
    for report in reports(&ctx, true) {
        let _ = tx.try_send(report);
    }
    // Signalled by an action's task once its result is sent: the loop then reports what
    // changed in the directory cache.
    let report_due = Arc::new(tokio::sync::Notify::new());
    let mut inbound = WorkerApiClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(scheduler = "connected", "worker session open");
    let running: Running = Arc::default();
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
            _ = keepalive.tick() => send(&tx, worker_message::Message::KeepAlive(KeepAlive {})),
            _ = report_due.notified() => {
                for report in reports(&ctx, false) {
                    let _ = tx.send(report).await;
                }
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
    // Whatever still runs cannot be reported on this session: the scheduler re-queues it.
    for (_, kill) in running.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        let _ = kill.send(());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};

    fn roots(range: std::ops::Range<u32>) -> Vec<BlobKey> {
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
        let messages = report_messages(stats, true, roots(0..25_000), roots(0..3));
        let reports: Vec<&WorkerReport> = messages.iter().map(report).collect();
        let sizes: Vec<usize> = reports.iter().map(|r| r.added.len()).collect();
        assert_eq!(sizes, vec![10_000, 10_000, 5_000]);
        assert_eq!(
            reports.iter().map(|r| r.full).collect::<Vec<_>>(),
            vec![true, false, false],
            "a later piece must add to the set, not replace it"
        );
        assert_eq!(reports[0].dircache, Some(stats));
        assert!(reports[1..].iter().all(|r| r.dircache.is_none()));
        assert_eq!(reports[0].removed.len(), 3);
        assert!(reports[1..].iter().all(|r| r.removed.is_empty()));
        // A report of no changes still carries the counts.
        let quiet = report_messages(stats, false, Vec::new(), Vec::new());
        assert_eq!(quiet.len(), 1);
        assert_eq!(report(&quiet[0]).dircache, Some(stats));
    }
}
