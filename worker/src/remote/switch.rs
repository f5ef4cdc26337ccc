//! A server's CAS that can be switched to another server's: an action keeps running when its
//! session ends (an orphan, see [`crate::running`]), and once another server adopts it, its
//! outputs go to that server's CAS. Each call goes to the CAS current when it starts; calls
//! made while the action is an orphan wait for its adoption, and one that failed because its
//! server went away while it ran is made again against the adopting server's.

use kiln_reapi::cas::{Cas, CasError, CasFuture};
use kiln_reapi::digest::{Digest, InstanceName};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// A CAS forwarding to the one last switched to; while there is none (the action's session
/// ended and nobody adopted it yet), calls wait for one; once given up, they fail.
pub struct SwitchedCas {
    to: watch::Sender<Target>,
    /// Bumped at every switch: a call that failed against a CAS switched away from
    /// meanwhile (its server went away while it ran) is made again against the new one.
    switches: AtomicU64,
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
            switches: AtomicU64::new(0),
        })
    }

    /// Forwards to `to` from now on.
    pub fn switch(&self, to: Arc<dyn Cas>) {
        self.switches.fetch_add(1, Ordering::SeqCst);
        self.to.send_replace(Target::To(to));
    }

    /// Calls wait for a CAS to forward to.
    pub fn hold(&self) {
        self.switches.fetch_add(1, Ordering::SeqCst);
        self.to.send_replace(Target::Waiting);
    }

    /// Calls fail from now on (waiting ones too).
    pub fn give_up(&self) {
        self.switches.fetch_add(1, Ordering::SeqCst);
        self.to.send_replace(Target::Gone);
    }

    /// Whether the CAS was switched since `at` (a count of switches).
    fn switched_since(&self, at: u64) -> bool {
        self.switches.load(Ordering::SeqCst) != at
    }

    /// The CAS to call now, and the count of switches it goes with.
    async fn current(&self) -> Result<(Arc<dyn Cas>, u64), CasError> {
        let mut to = self.to.subscribe();
        loop {
            let now = to.borrow_and_update().clone();
            match now {
                Target::To(cas) => return Ok((cas, self.switches.load(Ordering::SeqCst))),
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
        Box::pin(async move {
            loop {
                let (to, at) = self.current().await?;
                match to.find_missing(instance, digests).await {
                    Err(_) if self.switched_since(at) => continue,
                    done => return done,
                }
            }
        })
    }

    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<bytes::Bytes>>> {
        Box::pin(async move {
            loop {
                let (to, at) = self.current().await?;
                match to.read_blobs(instance, digests).await {
                    Err(_) if self.switched_since(at) => continue,
                    done => return done,
                }
            }
        })
    }

    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool> {
        Box::pin(async move {
            loop {
                let (to, at) = self.current().await?;
                match to.read_to_file(instance, digest, path).await {
                    Err(_) if self.switched_since(at) => continue,
                    done => return done,
                }
            }
        })
    }

    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, bytes::Bytes)>,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            loop {
                let (to, at) = self.current().await?;
                match to.write_blobs(instance, blobs.clone()).await {
                    Err(_) if self.switched_since(at) => continue,
                    done => return done,
                }
            }
        })
    }

    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            loop {
                let (to, at) = self.current().await?;
                match to.write_file(instance, digest, path).await {
                    Err(_) if self.switched_since(at) => continue,
                    done => return done,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A CAS for faults the real ones cannot be made to show on cue: every call fails, and
    /// first switches the CAS under test to `next` (its server went away mid-call), or
    /// answers with `missing` when it has no `next`.
    /// The CAS switched, and what it is switched to.
    type Next = (Arc<SwitchedCas>, Arc<dyn Cas>);

    struct Fake {
        next: Mutex<Option<Next>>,
        missing: usize,
    }

    impl Fake {
        fn answer(&self) -> Result<Vec<Digest>, CasError> {
            match self.next.lock().unwrap().take() {
                Some((switched, next)) => {
                    switched.switch(next);
                    Err(CasError::Remote(tonic::Status::unavailable("gone")))
                }
                None => Ok(vec![
                    Digest::of(
                        kiln_reapi::digest::DigestFunction::Sha256,
                        b""
                    );
                    self.missing
                ]),
            }
        }
    }

    impl Cas for Fake {
        fn find_missing<'a>(
            &'a self,
            _: &'a InstanceName,
            _: &'a [Digest],
        ) -> CasFuture<'a, Vec<Digest>> {
            Box::pin(async move { self.answer() })
        }
        fn read_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            _: &'a [Digest],
        ) -> CasFuture<'a, Vec<Option<bytes::Bytes>>> {
            Box::pin(async move { self.answer().map(|_| Vec::new()) })
        }
        fn read_to_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a Path,
        ) -> CasFuture<'a, bool> {
            Box::pin(async move { self.answer().map(|_| true) })
        }
        fn write_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Vec<(Digest, bytes::Bytes)>,
        ) -> CasFuture<'a, ()> {
            Box::pin(async move { self.answer().map(|_| ()) })
        }
        fn write_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a Path,
        ) -> CasFuture<'a, ()> {
            Box::pin(async move { self.answer().map(|_| ()) })
        }
    }

    fn fake(missing: usize) -> Arc<Fake> {
        Arc::new(Fake {
            next: Mutex::new(None),
            missing,
        })
    }

    #[tokio::test]
    async fn a_call_cut_short_by_a_switch_is_made_again_and_waits_while_held() {
        let instance = InstanceName::default_instance();
        let (dead, adopting) = (fake(0), fake(2));
        let switched = SwitchedCas::new(dead.clone());
        *dead.next.lock().unwrap() = Some((switched.clone(), adopting.clone()));
        let missing = switched.find_missing(&instance, &[]).await.unwrap();
        assert_eq!(missing.len(), 2, "answered by the CAS switched to");
        // Held: calls wait for the next CAS; given up: they fail.
        switched.hold();
        let waiting = {
            let switched = switched.clone();
            tokio::spawn(async move {
                let instance = InstanceName::default_instance();
                switched.find_missing(&instance, &[]).await.map(|m| m.len())
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        switched.switch(fake(3));
        assert_eq!(waiting.await.unwrap().unwrap(), 3);
        switched.hold();
        switched.give_up();
        assert!(switched.find_missing(&instance, &[]).await.is_err());
        // A failure with no switch is the caller's.
        let (failing, other) = (fake(0), fake(1));
        let plain = SwitchedCas::new(failing.clone());
        *failing.next.lock().unwrap() = Some((SwitchedCas::new(other.clone()), other));
        assert!(plain.find_missing(&instance, &[]).await.is_err());
    }
}
