//! A small tokio runtime of a tier's own, for tiers that reach another service (Redis, other
//! CAS endpoints) through tokio clients while the chain runs on any executor (the data
//! plane's cores, the control plane): work is spawned there and awaited from wherever the
//! tier was called. Shut down in the background when dropped (it may be dropped on a
//! runtime thread).

use std::future::Future;

/// A one-thread tokio runtime named for its tier.
pub struct SideRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

/// The runtime has shut down.
#[derive(Debug)]
pub struct Gone(pub String);

impl SideRuntime {
    /// A runtime whose thread is called `name`.
    pub fn new(name: &str) -> std::io::Result<SideRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(SideRuntime {
            runtime: Some(runtime),
        })
    }

    /// Runs `make` inside the runtime (clients that must be made in one).
    pub fn enter<T>(&self, make: impl FnOnce() -> T) -> T {
        let _guard = self.runtime.as_ref().map(|r| r.enter());
        make()
    }

    /// Runs `work` on the runtime and waits for it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, Gone> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Gone("shutting down".into()))?;
        runtime.spawn(work).await.map_err(|e| Gone(e.to_string()))
    }

    /// Runs blocking `work` on the runtime's blocking pool and waits for it.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Gone> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Gone("shutting down".into()))?;
        runtime
            .spawn_blocking(work)
            .await
            .map_err(|e| Gone(e.to_string()))
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
