//! The worker's session loops: one per scheduler, sharing its slots, reports and running
//! actions; stopped by saying GoingAway and letting what runs finish.

use anyhow::bail;
use kiln_worker::link::Link;
use kiln_worker::{Identity, WorkerContext};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A worker running on a tokio runtime.
pub struct RunningWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    /// Starts a session loop on `runtime` for each scheduler (its link, and the context its
    /// actions run in), sharing the worker's slots and reports.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        sessions: Vec<(Link, Arc<WorkerContext>)>,
        identity: Identity,
        max_delay: Duration,
    ) -> anyhow::Result<RunningWorker> {
        let (stop, stopped) = watch::channel(false);
        let Some((_, first)) = sessions.first() else {
            bail!("a worker needs a scheduler");
        };
        let _guard = runtime.enter();
        let slots = kiln_worker::slots::Slots::new(identity.max_inflight, sessions.len());
        let reports = kiln_worker::reports::ReportHub::start(first.clone());
        let running = kiln_worker::running::Running::new();
        let loops: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(index, (link, ctx))| {
                let shared = kiln_worker::session::Shared {
                    index,
                    slots: slots.clone(),
                    reports: reports.clone(),
                    running: running.clone(),
                };
                kiln_worker::session::run(
                    link,
                    identity.clone(),
                    ctx,
                    shared,
                    max_delay,
                    stopped.clone(),
                )
            })
            .collect();
        let mut all = tokio::task::JoinSet::new();
        for session in loops {
            all.spawn(session);
        }
        let task = runtime.spawn(async move { while all.join_next().await.is_some() {} });
        Ok(RunningWorker { stop, task })
    }

    /// Says GoingAway, lets running actions finish (at most `grace`), and stops.
    pub fn stop(self, runtime: &tokio::runtime::Runtime, grace: Duration) {
        let _ = self.stop.send(true);
        let task = self.task;
        runtime.block_on(async move {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("worker did not finish its actions within the grace period");
            }
        });
    }
}
