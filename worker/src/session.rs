//! The worker's session with a scheduler: connect, say Hello, run what it is sent (up to its
//! capacity), report, keep the stream alive; when the stream drops, kill what runs (the
//! scheduler re-queues it) and reconnect with exponential backoff, so a restarted server gets
//! its workers back on its own. A worker serving several schedulers (servers of one farm) has
//! a session with each at once, sharing its [`Slots`] and its [`ReportHub`].

use crate::action::{execute, Progress, WorkerContext};
use crate::remote::switch::SwitchedCas;
use crate::reports::ReportHub;
use crate::running::{Route, Running};
use crate::slots::Slots;
use kiln_proto::worker::worker_api_client::WorkerApiClient;
use kiln_proto::worker::{
    server_message, worker_message, Capacity, ExecutionStarted, GoingAway, Hello, KeepAlive,
    NotRunning, Orphans, Property, ServerMessage, WorkerMessage,
};
use std::sync::Arc;
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

/// What a worker's sessions share, and which one this is.
#[derive(Clone)]
pub struct Shared {
    /// This session's index among the worker's (one per scheduler).
    pub index: usize,
    /// The worker's slots.
    pub slots: Arc<Slots>,
    /// The worker's reports.
    pub reports: Arc<ReportHub>,
    /// The worker's running actions, across its sessions.
    pub running: Arc<Running>,
}

/// Tells session `index`'s scheduler what is left for it of the worker's slots, if that
/// changed since it was last `told` (and the message fits the session's queue).
fn tell_capacity(slots: &Slots, tx: &mpsc::Sender<WorkerMessage>, told: &mut usize, index: usize) {
    let now = slots.capacity_for(index);
    if now == *told {
        return;
    }
    let message = WorkerMessage {
        message: Some(worker_message::Message::Capacity(Capacity {
            max_inflight: now as u32,
        })),
    };
    if tx.try_send(message).is_ok() {
        *told = now;
    }
}

/// How long a server that sends keep-alives `every` so often may be silent before a session
/// with it ends, where its farm takes operations over: three intervals. Such a server says
/// it is alive at least every fifth of its lease (its Welcome gives the interval), so a
/// server whose host vanished (its connection open until HTTP/2 gives up, tens of seconds
/// later) has its actions turned orphans three fifths of a lease after its last word,
/// normally before another server takes its operations over (a lease after its last
/// renewal), while a live server is not left.
fn patience(every: Duration) -> Duration {
    every * 3
}

/// Connects to the scheduler of `link` and serves sessions until `stop` turns true; then says
/// GoingAway and lets running actions finish.
pub async fn run(
    link: crate::link::Link,
    identity: Identity,
    ctx: Arc<WorkerContext>,
    shared: Shared,
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
                let ended = session(channel, &identity, ctx.clone(), &shared, stop.clone()).await;
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

async fn session(
    channel: crate::link::LinkChannel,
    identity: &Identity,
    ctx: Arc<WorkerContext>,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::Status> {
    let Shared {
        index,
        slots,
        reports,
        running,
    } = shared.clone();
    // Watched from before Hello, so no change after the count Hello carries goes unsaid.
    let mut orphans = running.changes();
    let mut capacity = slots.changes();
    let mut told = slots.capacity_for(index);
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
            max_inflight: told as u32,
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
            running: running.orphans(),
        }),
    );
    let mut inbound = WorkerApiClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(scheduler = "connected", "worker session open");
    // Reports go out from the worker's hub, the whole of it first.
    let joined = reports.join(tx.clone());
    // How long what this session runs is kept running after it ends (its Welcome says).
    let mut orphan_grace = None;
    // The fetch ahead running, if any: its operation, and how to stop it (a session that
    // ends stops it too).
    let mut prefetching: Option<(String, tokio::task::AbortHandle)> = None;
    let mut every = Duration::from_secs(5);
    let mut keepalive = tokio::time::interval(every);
    // When the server counts as gone if it has said nothing more (only where its farm takes
    // operations over; see `patience`).
    let mut silent_at = tokio::time::Instant::now() + patience(every);
    let mut going_away = false;
    let result = loop {
        tokio::select! {
            // The server's messages first: one waiting while this task was held up proves the
            // server alive before its silence is judged.
            biased;
            message = inbound.message() => {
                if let Ok(Some(_)) = &message {
                    silent_at = tokio::time::Instant::now() + patience(every);
                }
                match message {
                    Ok(Some(ServerMessage { message: Some(m) })) => match m {
                        server_message::Message::Welcome(w) => {
                            if let Some(d) = w.keep_alive_interval.and_then(|d| Duration::try_from(d).ok()) {
                                every = d.max(Duration::from_millis(100));
                                keepalive = tokio::time::interval(every);
                            }
                            silent_at = tokio::time::Instant::now() + patience(every);
                            orphan_grace = w.orphan_grace.and_then(|d| {
                                let d = std::time::Duration::try_from(d).ok()?;
                                (!d.is_zero()).then_some(d)
                            });
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
                            // The server's CAS as this action uses it: another server's, should
                            // this one go away and the other adopt it (only where its farm takes
                            // operations over: else it never switches).
                            let cas = ctx
                                .remote
                                .clone()
                                .filter(|_| orphan_grace.is_some())
                                .map(SwitchedCas::new);
                            let ctx = match &cas {
                                Some(cas) => Arc::new(WorkerContext {
                                    remote: Some(cas.clone() as Arc<dyn kiln_reapi::cas::Cas>),
                                    ..(*ctx).clone()
                                }),
                                None => ctx.clone(),
                            };
                            let route = Route::new(index, tx.clone(), cas);
                            running.start(operation.clone(), kill_tx, route.clone());
                            send(&tx, worker_message::Message::Started(ExecutionStarted { operation: operation.clone() }));
                            let running = running.clone();
                            let (slots, reports) = (slots.clone(), reports.clone());
                            tokio::spawn(async move {
                                // Counted at once; waits only when another scheduler took the
                                // last slot at the same moment.
                                route.hold(slots.take(index).await);
                                let progress = |p: Progress| match p {
                                    Progress::Executed => route.executed(&operation),
                                };
                                let result = execute(ctx.clone(), start, kill_rx, progress).await;
                                // To this session, or to the one that adopted it (an orphan).
                                route.deliver(WorkerMessage { message: Some(worker_message::Message::Result(result)) }).await;
                                running.finished(&operation, &route);
                                reports.due();
                            });
                        }
                        server_message::Message::Prefetch(p) => {
                            // One at a time: the newest replaces the one before, whose action the
                            // scheduler has placed elsewhere by now.
                            let operation = p.operation.clone();
                            let (ctx, reports) = (ctx.clone(), reports.clone());
                            let task = tokio::spawn(async move {
                                crate::action::prefetch(ctx, p).await;
                                // What it fetched, for the scheduler's placement.
                                reports.due();
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
                            running.kill(&k.operation, index);
                        }
                        server_message::Message::Adopt(a) => {
                            if running.adopt(&a.operation, index, tx.clone(), ctx.remote.clone()) {
                                tracing::info!(operation = %a.operation, "a server took over an action still running here");
                            } else {
                                // Ended meanwhile (killed, or given up): it must run again.
                                send(&tx, worker_message::Message::NotRunning(NotRunning { operation: a.operation }));
                            }
                        }
                        server_message::Message::KeepAlive(_) => {}
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            },
            _ = tokio::time::sleep_until(silent_at), if orphan_grace.is_some() => {
                tracing::warn!(silent_for = ?patience(every), "the scheduler has gone silent (its host gone?): leaving the session, its actions run on for whoever takes them over");
                break Err(tonic::Status::unavailable("the scheduler went silent"));
            }
            _ = keepalive.tick() => {
                send(&tx, worker_message::Message::KeepAlive(KeepAlive {}));
                // A change whose message did not fit the queue is said now.
                tell_capacity(&slots, &tx, &mut told, index);
                // Also between results: what it served to peers, and what left its CAS.
                reports.due();
            }
            Ok(()) = orphans.changed() => {
                send(&tx, worker_message::Message::Orphans(Orphans { operations: running.orphans() }));
            }
            Ok(()) = capacity.changed() => {
                // Another session's actions started or ended: what is left for this one.
                tell_capacity(&slots, &tx, &mut told, index);
            }
            _ = stop.changed(), if !going_away => {
                if *stop.borrow() {
                    going_away = true;
                    send(&tx, worker_message::Message::GoingAway(GoingAway {}));
                    tracing::info!("going away: finishing running actions");
                }
            }
        }
        if going_away && running.count(index) == 0 {
            break Ok(());
        }
    };
    if let Some((_, ahead)) = prefetching.take() {
        ahead.abort();
    }
    // Whatever still runs cannot be reported on this session: the scheduler re-queues it,
    // unless its farm takes operations over (then it runs on a while, for whoever does).
    running.session_ended(index, orphan_grace.filter(|_| !going_away));
    reports.leave(joined);
    result
}
