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

/// The worker's report of itself (its directory cache), when it has anything to report:
/// with `full`, every input root its cache holds, else the changes since the last report.
fn report(ctx: &WorkerContext, full: bool) -> Option<WorkerMessage> {
    let cache = ctx.dircache.as_ref()?;
    let (added, removed) = cache.take_changes(full);
    let root = |k: kiln_reapi::digest::BlobKey| CachedRoot {
        instance_name: k.instance.as_str().to_string(),
        digest_function: k.digest.function.proto() as i32,
        digest: Some(k.digest.to_proto()),
    };
    Some(WorkerMessage {
        message: Some(worker_message::Message::Report(WorkerReport {
            dircache: Some(cache.stats().report()),
            full,
            added: added.into_iter().map(root).collect(),
            removed: removed.into_iter().map(root).collect(),
        })),
    })
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
    if let Some(report) = report(&ctx, true) {
        let _ = tx.try_send(report);
    }
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
                            if let Some(report) = report(&ctx, false) {
                                let _ = tx.send(report).await;
                            }
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
