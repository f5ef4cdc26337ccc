//! The actions a worker runs, across its sessions: each with the way its messages go (the
//! session it reports to) and how to kill it. When a session ends, what it ran is killed,
//! or, when its server said so in its Welcome (`orphan_grace`: the farm takes operations of a
//! dead server over), kept running as an orphan for that long: every session lists the
//! orphans (`Orphans`), and a server that takes one over adopts it (`AdoptOperation`), after
//! which its messages go to that server. An orphan nobody adopts in time is killed.

use crate::remote::switch::SwitchedCas;
use crate::slots::Slot;
use kiln_proto::worker::{worker_message, ExecuteComplete, WorkerMessage};
use kiln_reapi::cas::Cas;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Where a running action's messages go.
#[derive(Clone)]
enum Way {
    /// To the session of this index, through its sender.
    To(usize, mpsc::Sender<WorkerMessage>),
    /// Nowhere yet: its session ended and nobody adopted it.
    Orphan,
    /// Nowhere ever: it was killed, or given up.
    Gone,
}

/// A running action's way to a session, the server CAS it uses, its slot, and whether its
/// process has exited.
pub struct Route {
    way: watch::Sender<Way>,
    executed: AtomicBool,
    slot: Mutex<Option<Slot>>,
    /// The server's CAS as the action uses it (none for the worker inside `kiln serve`).
    cas: Option<Arc<SwitchedCas>>,
    /// Bumped each time it becomes an orphan (a grace timer only ends the orphaning it began).
    orphaned: AtomicU64,
}

/// The slots of orphans are counted under this session index: no server's.
const ORPHANS: usize = usize::MAX;

impl Route {
    /// An action sent by session `index`, whose messages go to `tx`, using the server's CAS
    /// through `cas`.
    pub fn new(
        index: usize,
        tx: mpsc::Sender<WorkerMessage>,
        cas: Option<Arc<SwitchedCas>>,
    ) -> Arc<Route> {
        Arc::new(Route {
            way: watch::channel(Way::To(index, tx)).0,
            executed: AtomicBool::new(false),
            slot: Mutex::new(None),
            cas,
            orphaned: AtomicU64::new(0),
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Slot>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The action holds `slot` from now on (counted as the session's it reports to now).
    pub fn hold(&self, mut slot: Slot) {
        slot.move_to(self.session().unwrap_or(ORPHANS));
        *self.slot() = Some(slot);
    }

    fn session(&self) -> Option<usize> {
        match &*self.way.borrow() {
            Way::To(index, _) => Some(*index),
            _ => None,
        }
    }

    fn set(&self, way: Way) {
        if let Some(cas) = &self.cas {
            match way {
                Way::Gone => cas.give_up(),
                Way::Orphan => cas.hold(),
                Way::To(..) => {}
            }
        }
        let session = match &way {
            Way::To(index, _) => *index,
            _ => ORPHANS,
        };
        if matches!(way, Way::Orphan) {
            self.orphaned.fetch_add(1, Ordering::SeqCst);
        }
        // Its slot (while held) counts against no server while it is an orphan: a server it
        // reconnects to is not told it has that slot.
        if let Some(slot) = self.slot().as_mut() {
            slot.move_to(session);
        }
        self.way.send_replace(way);
    }

    /// Operation `operation`'s process exited: its slot is free, and its session is told
    /// (now, or when a session adopts it).
    pub fn executed(&self, operation: &str) {
        self.executed.store(true, Ordering::SeqCst);
        if let Some(slot) = self.slot().as_mut() {
            slot.release();
        }
        if let Way::To(_, tx) = &*self.way.borrow() {
            let _ = tx.try_send(complete(operation));
        }
    }

    /// Sends `message` (the result) to the action's session, waiting while it is an orphan;
    /// dropped once it is gone.
    pub async fn deliver(&self, message: WorkerMessage) {
        if let Some(slot) = self.slot().as_mut() {
            slot.release();
        }
        let mut way = self.way.subscribe();
        loop {
            let now = way.borrow_and_update().clone();
            match now {
                Way::Gone => return,
                Way::To(_, tx) => {
                    if tx.send(message.clone()).await.is_ok() {
                        return;
                    }
                    // Its session is ending: it is killed or orphaned next.
                }
                Way::Orphan => {}
            }
            if way.changed().await.is_err() {
                return;
            }
        }
    }
}

fn complete(operation: &str) -> WorkerMessage {
    WorkerMessage {
        message: Some(worker_message::Message::ExecuteComplete(ExecuteComplete {
            operation: operation.to_string(),
        })),
    }
}

struct Entry {
    kill: Option<oneshot::Sender<()>>,
    route: Arc<Route>,
}

impl Entry {
    fn end(mut self) {
        self.route.set(Way::Gone);
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}

/// The worker's running actions, by operation name.
#[derive(Default)]
pub struct Running {
    map: Mutex<HashMap<String, Entry>>,
    /// Bumped when the orphans change.
    changed: watch::Sender<u64>,
}

impl Running {
    /// No actions.
    pub fn new() -> Arc<Running> {
        Arc::new(Running::default())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Operation `name` started, killed through `kill`, reporting by `route`. One already
    /// running under that name (a server sent it again) is killed.
    pub fn start(&self, name: String, kill: oneshot::Sender<()>, route: Arc<Route>) {
        let entry = Entry {
            kill: Some(kill),
            route,
        };
        let old = self.map().insert(name, entry);
        if let Some(old) = old {
            let orphan = old.route.session().is_none();
            old.end();
            if orphan {
                self.bump();
            }
        }
    }

    /// Operation `name` (run by `route`) ended.
    pub fn finished(&self, name: &str, route: &Arc<Route>) {
        let mut map = self.map();
        if map.get(name).is_some_and(|e| Arc::ptr_eq(&e.route, route)) {
            map.remove(name);
        }
    }

    /// Kills operation `name` for session `index`: one it runs, or an orphan. Whether it
    /// was there.
    pub fn kill(&self, name: &str, index: usize) -> bool {
        let entry = {
            let mut map = self.map();
            let ours = map
                .get(name)
                .is_some_and(|e| e.route.session().is_none_or(|s| s == index));
            if !ours {
                return false;
            }
            map.remove(name)
        };
        let orphan = entry.as_ref().is_some_and(|e| e.route.session().is_none());
        if let Some(entry) = entry {
            entry.end();
        }
        if orphan {
            self.bump();
        }
        true
    }

    /// Actions session `index` runs.
    pub fn count(&self, index: usize) -> usize {
        self.map()
            .values()
            .filter(|e| e.route.session() == Some(index))
            .count()
    }

    /// Session `index` ended: what it ran is killed, or with `grace`, kept as orphans for
    /// that long (then killed unless adopted).
    pub fn session_ended(self: &Arc<Self>, index: usize, grace: Option<Duration>) {
        let mine: Vec<(String, Arc<Route>)> = self
            .map()
            .iter()
            .filter(|(_, e)| e.route.session() == Some(index))
            .map(|(n, e)| (n.clone(), e.route.clone()))
            .collect();
        if mine.is_empty() {
            return;
        }
        let Some(grace) = grace else {
            for (name, route) in mine {
                let entry = {
                    let mut map = self.map();
                    let same = map
                        .get(&name)
                        .is_some_and(|e| Arc::ptr_eq(&e.route, &route));
                    if !same {
                        continue;
                    }
                    map.remove(&name)
                };
                if let Some(entry) = entry {
                    entry.end();
                }
            }
            return;
        };
        let mut kept = Vec::new();
        for (name, route) in mine {
            let map = self.map();
            if map
                .get(&name)
                .is_some_and(|e| Arc::ptr_eq(&e.route, &route))
            {
                route.set(Way::Orphan);
                let generation = route.orphaned.load(Ordering::SeqCst);
                kept.push((name, route.clone(), generation));
            }
        }
        tracing::info!(
            orphans = kept.len(),
            ?grace,
            "session ended: its actions run on, for a server that takes them over"
        );
        self.bump();
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut expired = 0;
            for (name, route, generation) in kept {
                let entry = {
                    let mut map = this.map();
                    // Still this orphaning: not adopted meanwhile (and orphaned again).
                    let still = map.get(&name).is_some_and(|e| {
                        Arc::ptr_eq(&e.route, &route)
                            && matches!(*e.route.way.borrow(), Way::Orphan)
                            && e.route.orphaned.load(Ordering::SeqCst) == generation
                    });
                    if !still {
                        continue;
                    }
                    map.remove(&name)
                };
                if let Some(entry) = entry {
                    expired += 1;
                    entry.end();
                }
            }
            if expired > 0 {
                tracing::warn!(expired, "orphaned actions nobody took over were killed");
                this.bump();
            }
        });
    }

    /// The orphans' names.
    pub fn orphans(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .map()
            .iter()
            .filter(|(_, e)| matches!(*e.route.way.borrow(), Way::Orphan))
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Wakes when the orphans change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Session `index` (sending through `tx`, its server's CAS `cas`) adopts orphan `name`;
    /// false when there is no such orphan.
    pub fn adopt(
        &self,
        name: &str,
        index: usize,
        tx: mpsc::Sender<WorkerMessage>,
        cas: Option<Arc<dyn Cas>>,
    ) -> bool {
        {
            let map = self.map();
            let Some(entry) = map.get(name) else {
                return false;
            };
            if entry.route.session() == Some(index) {
                return true; // adopted by this session already
            }
            if !matches!(*entry.route.way.borrow(), Way::Orphan) {
                return false;
            }
            if entry.route.executed.load(Ordering::SeqCst) {
                let _ = tx.try_send(complete(name));
            }
            if let (Some(switched), Some(cas)) = (&entry.route.cas, cas) {
                switched.switch(cas);
            }
            entry.route.set(Way::To(index, tx));
        }
        self.bump();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::worker::ExecutionResult;

    fn result(operation: &str) -> WorkerMessage {
        WorkerMessage {
            message: Some(worker_message::Message::Result(ExecutionResult {
                operation: operation.into(),
                ..Default::default()
            })),
        }
    }

    fn op_of(m: WorkerMessage) -> String {
        match m.message {
            Some(worker_message::Message::Result(r)) => r.operation,
            Some(worker_message::Message::ExecuteComplete(c)) => {
                format!("complete {}", c.operation)
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_orphan_runs_on_until_adopted_and_reports_to_its_new_session() {
        let running = Running::new();
        let (a, _a_rx) = mpsc::channel(4);
        let (kill, mut killed) = oneshot::channel();
        let route = Route::new(0, a, None);
        running.start("op".into(), kill, route.clone());
        assert_eq!(running.count(0), 1);
        let changes = running.changes();
        running.session_ended(0, Some(Duration::from_secs(30)));
        assert!(changes.has_changed().unwrap());
        assert_eq!(running.orphans(), ["op"]);
        assert_eq!(running.count(0), 0);
        assert!(killed.try_recv().is_err(), "kept running");
        // Its process exits while orphaned; its result waits for a session.
        route.executed("op");
        let delivered = tokio::spawn({
            let route = route.clone();
            async move { route.deliver(result("op")).await }
        });
        tokio::task::yield_now().await;
        assert!(!delivered.is_finished());
        let (b, mut b_rx) = mpsc::channel(4);
        assert!(running.adopt("op", 1, b.clone(), None));
        assert!(
            running.adopt("op", 1, b.clone(), None),
            "again by the same: nothing more"
        );
        assert!(
            !running.adopt("op", 2, b, None),
            "by another: no longer an orphan"
        );
        delivered.await.unwrap();
        assert_eq!(op_of(b_rx.recv().await.unwrap()), "complete op");
        assert_eq!(op_of(b_rx.recv().await.unwrap()), "op");
        assert!(running.orphans().is_empty());
        running.finished("op", &route);
        assert_eq!(running.count(1), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_grace_or_past_it_an_action_is_killed_and_reports_nothing() {
        let running = Running::new();
        let (a, _a_rx) = mpsc::channel(4);
        let (kill, mut killed) = oneshot::channel();
        let route = Route::new(0, a.clone(), None);
        running.start("now".into(), kill, route.clone());
        running.session_ended(0, None);
        assert!(killed.try_recv().is_ok(), "killed at once");
        route.deliver(result("now")).await; // gone: returns without a session
        let (kill, mut killed) = oneshot::channel();
        let route = Route::new(0, a, None);
        running.start("later".into(), kill, route.clone());
        running.session_ended(0, Some(Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(killed.try_recv().is_err());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(killed.try_recv().is_ok(), "killed once the grace ran out");
        assert!(running.orphans().is_empty());
        let (b, _b_rx) = mpsc::channel(4);
        assert!(!running.adopt("later", 1, b, None), "too late to adopt");
        route.deliver(result("later")).await;
    }

    #[tokio::test]
    async fn a_kill_from_another_session_leaves_an_action_alone() {
        let running = Running::new();
        let (a, _a_rx) = mpsc::channel(4);
        let (kill, mut killed) = oneshot::channel();
        running.start("op".into(), kill, Route::new(0, a, None));
        assert!(!running.kill("op", 1));
        assert!(killed.try_recv().is_err());
        assert!(running.kill("op", 0));
        assert!(killed.try_recv().is_ok());
    }
}
