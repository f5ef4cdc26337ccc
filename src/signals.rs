//! Waiting for SIGTERM or SIGINT; watching SIGHUP.

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::info;

/// SIGTERM and SIGINT, watched from the moment [`StopSignals::watch`] returns: install it
/// before announcing readiness, so that a signal sent right after the announcement is
/// caught instead of killing the process.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Starts watching, on `runtime`'s signal driver.
    pub fn watch(runtime: &tokio::runtime::Runtime) -> anyhow::Result<StopSignals> {
        let _guard = runtime.enter();
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// Watches SIGHUP (which then no longer terminates the process); `None`, logged, when
    /// it cannot be watched.
    pub fn hangup(runtime: &tokio::runtime::Runtime) -> Option<Signal> {
        let _guard = runtime.enter();
        signal(SignalKind::hangup())
            .map_err(|e| tracing::error!(error = %e, "cannot watch SIGHUP"))
            .ok()
    }

    /// Completes when SIGTERM or SIGINT arrives.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}
