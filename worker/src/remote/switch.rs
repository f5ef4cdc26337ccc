//! A server's CAS that can be switched to another server's: an action keeps running when its
//! session ends (an orphan, see [`crate::running`]), and once another server adopts it, its
//! outputs go to that server's CAS. Each call goes to the CAS current when it starts; calls
//! made while the action is an orphan wait for its adoption.

use kiln_reapi::cas::{Cas, CasError, CasFuture};
use kiln_reapi::digest::{Digest, InstanceName};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// A CAS forwarding to the one last switched to; while there is none (the action's session
/// ended and nobody adopted it yet), calls wait for one; once given up, they fail.
pub struct SwitchedCas {
    to: watch::Sender<Target>,
}

#[derive(Clone)]
enum Target {
    To(Arc<dyn Cas>),
    Waiting,
    Gone,
}

impl SwitchedCas {
    /// Forwarding to `to` until switched.
    pub fn new(to: Arc<dyn Cas>) -> Arc<SwitchedCas> {
        Arc::new(SwitchedCas {
            to: watch::channel(Target::To(to)).0,
        })
    }

    /// Forwards to `to` from now on.
    pub fn switch(&self, to: Arc<dyn Cas>) {
        self.to.send_replace(Target::To(to));
    }

    /// Calls wait for a CAS to forward to.
    pub fn hold(&self) {
        self.to.send_replace(Target::Waiting);
    }

    /// Calls fail from now on (waiting ones too).
    pub fn give_up(&self) {
        self.to.send_replace(Target::Gone);
    }

    async fn current(&self) -> Result<Arc<dyn Cas>, CasError> {
        let mut to = self.to.subscribe();
        loop {
            let now = to.borrow_and_update().clone();
            match now {
                Target::To(cas) => return Ok(cas),
                Target::Gone => break,
                Target::Waiting => {}
            }
            if to.changed().await.is_err() {
                break;
            }
        }
        Err(CasError::Remote(tonic::Status::unavailable(
            "the action's server went away and no other took it over",
        )))
    }
}

impl Cas for SwitchedCas {
    fn find_missing<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Digest>> {
        Box::pin(async move { self.current().await?.find_missing(instance, digests).await })
    }

    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<bytes::Bytes>>> {
        Box::pin(async move { self.current().await?.read_blobs(instance, digests).await })
    }

    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool> {
        Box::pin(async move {
            self.current()
                .await?
                .read_to_file(instance, digest, path)
                .await
        })
    }

    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, bytes::Bytes)>,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move { self.current().await?.write_blobs(instance, blobs).await })
    }

    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            self.current()
                .await?
                .write_file(instance, digest, path)
                .await
        })
    }
}
