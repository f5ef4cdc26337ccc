//! Process-wide shutdown signalling that works across executors and threads.
//!
//! [`Shutdown::trigger`] closes a channel; every [`ShutdownWatch`] waiting on it wakes, whatever
//! runtime polls it. [`DrainGuard`]s count live work: [`Drain::wait`] completes once every guard
//! is dropped.

/// The trigger side, held by whoever decides to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: async_channel::Sender<()>,
    rx: async_channel::Receiver<()>,
}

/// A cheap handle that completes when shutdown begins.
#[derive(Debug, Clone)]
pub struct ShutdownWatch {
    rx: async_channel::Receiver<()>,
}

impl Shutdown {
    /// A fresh, untriggered shutdown.
    pub fn new() -> Shutdown {
        let (tx, rx) = async_channel::bounded(1);
        Shutdown { tx, rx }
    }

    /// A watch that completes on trigger.
    pub fn watch(&self) -> ShutdownWatch {
        ShutdownWatch {
            rx: self.rx.clone(),
        }
    }

    /// Begins shutdown; idempotent.
    pub fn trigger(&self) {
        self.tx.close();
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl ShutdownWatch {
    /// Completes once shutdown has been triggered.
    pub async fn wait(&self) {
        // Nothing is ever sent: recv only returns when the channel is closed.
        let _ = self.rx.recv().await;
    }

    /// True once shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.rx.is_closed()
    }
}

/// Waits for outstanding work to finish.
#[derive(Debug)]
pub struct Drain {
    tx: Option<async_channel::Sender<()>>,
    rx: async_channel::Receiver<()>,
}

/// Held by a piece of work that shutdown must wait for.
#[derive(Debug, Clone)]
pub struct DrainGuard {
    _tx: async_channel::Sender<()>,
}

impl Drain {
    /// A drain with no work yet.
    pub fn new() -> Drain {
        let (tx, rx) = async_channel::bounded(1);
        Drain { tx: Some(tx), rx }
    }

    /// A guard for one piece of work.
    pub fn guard(&self) -> Option<DrainGuard> {
        self.tx.as_ref().map(|tx| DrainGuard { _tx: tx.clone() })
    }

    /// Completes once every guard has been dropped.
    pub async fn wait(mut self) {
        self.tx = None;
        let _ = self.rx.recv().await;
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_wakes_on_trigger_and_drain_waits_for_guards() {
        futures::executor::block_on(async {
            let s = Shutdown::new();
            let w = s.watch();
            assert!(!w.is_triggered());
            s.trigger();
            w.wait().await;
            assert!(w.is_triggered());

            let drain = Drain::new();
            let g1 = drain.guard().unwrap();
            let g2 = g1.clone();
            let mut waiting = Box::pin(drain.wait());
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            drop(g1);
            assert!(
                futures::poll!(waiting.as_mut()).is_pending(),
                "one guard is still alive"
            );
            drop(g2);
            waiting.await;
        });
    }
}
