//! A server's CAS that can be switched to another server's: an action keeps running when its
//! session ends (an orphan, see [`crate::running`]), and once another server adopts it, its
//! outputs go to that server's CAS. Each call goes to the CAS current when it starts; calls
//! made while the action is an orphan wait for its adoption, and one that failed because its
//! server went away while it ran is made again against the adopting server's.

use kiln_reapi::cas::{Cas, CasError, CasFuture};
use kiln_reapi::digest::{Digest, InstanceName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A CAS forwarding to the one last switched to; while there is none (the action's session
/// ended and nobody adopted it yet), calls wait for one; once given up, they fail.
pub struct SwitchedCas {
    /// The target, and how many switches it follows: a call that failed against a CAS
    /// switched away from meanwhile (its server went away while it ran) is made again
    /// against the new one.
    to: watch::Sender<(Target, u64)>,
}

#[derive(Clone)]
enum Target {
    To(Arc<dyn Cas>),
    Waiting,
    Gone,
}

/// How long a call that failed as if its server had gone away waits to learn whether it did
/// (the worker's session with that server ends about as soon).
const VERDICT: Duration = Duration::from_secs(3);

impl SwitchedCas {
    /// Forwarding to `to` until switched.
    pub fn new(to: Arc<dyn Cas>) -> Arc<SwitchedCas> {
        Arc::new(SwitchedCas {
            to: watch::channel((Target::To(to), 0)).0,
        })
    }

    fn set(&self, target: Target) {
        self.to.send_modify(|(t, n)| {
            *t = target;
            *n += 1;
        });
    }

    /// Forwards to `to` from now on.
    pub fn switch(&self, to: Arc<dyn Cas>) {
        self.set(Target::To(to));
    }

    /// Calls wait for a CAS to forward to.
    pub fn hold(&self) {
        self.set(Target::Waiting);
    }

    /// Calls fail from now on (waiting ones too).
    pub fn give_up(&self) {
        self.set(Target::Gone);
    }

    /// The CAS to call now, and the count of switches it goes with.
    async fn current(&self) -> Result<(Arc<dyn Cas>, u64), CasError> {
        let mut to = self.to.subscribe();
        loop {
            let (target, at) = to.borrow_and_update().clone();
            match target {
                Target::To(cas) => return Ok((cas, at)),
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

    /// Whether a call made at switch `at` that failed with `error` is to be made again: the
    /// CAS was switched since, or is within [`VERDICT`] (the failure looked like its server
    /// going away).
    async fn again(&self, at: u64, error: &CasError) -> bool {
        let mut to = self.to.subscribe();
        if to.borrow_and_update().1 != at {
            return true;
        }
        let gone = matches!(error, CasError::Remote(s) if s.code() == tonic::Code::Unavailable);
        gone && matches!(
            tokio::time::timeout(VERDICT, to.changed()).await,
            Ok(Ok(()))
        )
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
                    Err(e) if self.again(at, &e).await => continue,
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
                    Err(e) if self.again(at, &e).await => continue,
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
                    Err(e) if self.again(at, &e).await => continue,
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
                    Err(e) if self.again(at, &e).await => continue,
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
                    Err(e) if self.again(at, &e).await => continue,
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

    #[tokio::test(start_paused = true)]
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
