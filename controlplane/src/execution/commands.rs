//! Carrying out the scheduler's commands: dispatches and fetches ahead sent to worker
//! sessions (with their peer hints, cut to fit the worker API's message limit), kills,
//! stage changes, and sessions found broken on the way.

use super::{lock, ExecutionCore, Payload, PeerEndpoint};
use crate::scheduler::{Command, Stage, WorkerId};
use kiln_proto::reapi::execution_stage::Value as StageValue;
use kiln_proto::worker::{
    server_message, ExecutionResult, KillOperation, PeerHint, PrefetchInputs, ServerMessage,
    StartExecute,
};
use kiln_reapi::digest::Digest;
use std::sync::Arc;
use std::time::SystemTime;

impl ExecutionCore {
    /// Carries out the scheduler's commands. Called with the scheduler locked, so that
    /// commands reach workers and watchers in the order the scheduler issued them (a dispatch
    /// can never overtake the kill or re-queue that followed it). Returns the workers whose
    /// session is gone; the caller hands them to [`Self::drop_broken`] once it has unlocked.
    pub(super) fn carry_out(
        &self,
        commands: Vec<Command<Arc<Payload>, ExecutionResult>>,
    ) -> Vec<WorkerId> {
        let mut broken = Vec::new();
        for command in commands {
            match command {
                Command::Dispatch {
                    worker,
                    op,
                    attempt,
                    payload,
                    timeout,
                    queued_at,
                    peers,
                    missing,
                } => {
                    let Some(name) = lock(&self.registry).name(op).map(str::to_string) else {
                        continue;
                    };
                    let mut start = payload.start.clone();
                    start.operation = name;
                    start.attempt = attempt;
                    start.timeout = Some(kiln_reapi::convert::proto_duration(timeout));
                    start.queued_timestamp = Some(timestamp(queued_at));
                    start.peer_hints = self.peer_hints(peers);
                    start.missing_inputs = missing.iter().map(Digest::to_proto).collect();
                    fit(&mut start, self.max_message / 2);
                    if !self.send(worker, server_message::Message::StartExecute(start)) {
                        broken.push(worker);
                    } else {
                        self.mark_sent(op, worker);
                    }
                }
                Command::Prefetch {
                    worker,
                    op,
                    payload,
                    digests,
                    peers,
                } => {
                    let Some(name) = lock(&self.registry).name(op).map(str::to_string) else {
                        continue;
                    };
                    let mut prefetch = PrefetchInputs {
                        operation: name,
                        instance_name: payload.start.instance_name.clone(),
                        digest_function: payload.start.digest_function,
                        digests: digests.iter().map(Digest::to_proto).collect(),
                        peer_hints: self.peer_hints(peers),
                    };
                    fit(&mut prefetch, self.max_message / 2);
                    // Best effort: a worker whose queue is full just does not fetch ahead.
                    let _ = self.send(worker, server_message::Message::Prefetch(prefetch));
                }
                Command::Kill { worker, op } => {
                    if let Some(name) = lock(&self.registry).name(op).map(str::to_string) {
                        let _ = self.send(
                            worker,
                            server_message::Message::Kill(KillOperation { operation: name }),
                        );
                    }
                }
                Command::Stage { op, stage } => {
                    let stage = match stage {
                        Stage::Queued => StageValue::Queued,
                        Stage::Executing => StageValue::Executing,
                    };
                    lock(&self.registry).set_stage(op, stage);
                }
                Command::Finished { op, outcome } => self.finished(op, outcome),
                Command::Disconnect { worker } => {
                    // Dropping the session's only strong sender ends its response stream; a
                    // worker that was merely stalled reconnects as a new session.
                    if let Some(session) = lock(&self.sessions).remove(&worker) {
                        tracing::warn!(worker = %session.name, id = worker, "worker lost; its actions are re-queued");
                    }
                }
            }
        }
        broken
    }

    /// The scheduler's hints (peer → digests) with each peer's endpoint.
    pub(super) fn peer_hints(&self, peers: Vec<(WorkerId, Vec<Digest>)>) -> Vec<PeerHint> {
        if peers.is_empty() {
            return Vec::new();
        }
        let sessions = lock(&self.sessions);
        peers
            .into_iter()
            .filter_map(|(peer, digests)| {
                let PeerEndpoint { endpoint, tls_name } = sessions.get(&peer)?.endpoint.clone()?;
                Some(PeerHint {
                    endpoint,
                    tls_name,
                    digests: digests.iter().map(Digest::to_proto).collect(),
                })
            })
            .collect()
    }

    /// Workers whose session could not take a message: lost.
    pub(super) fn drop_broken(&self, broken: Vec<WorkerId>) {
        for worker in broken {
            tracing::warn!(worker, "worker session is gone; re-queueing its actions");
            self.worker_left(worker);
        }
    }

    pub(super) fn send(&self, worker: WorkerId, message: server_message::Message) -> bool {
        let sessions = lock(&self.sessions);
        let Some(session) = sessions.get(&worker) else {
            return false;
        };
        session
            .tx
            .try_send(ServerMessage {
                message: Some(message),
            })
            .is_ok()
    }
}
fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A message to a worker that carries lists of digests it may be cut short in: its own list
/// (the inputs known missing, or to fetch ahead) and its peer hints.
trait DigestLists: prost::Message {
    fn lists(&mut self) -> (&mut Vec<kiln_proto::reapi::Digest>, &mut Vec<PeerHint>);
}

impl DigestLists for StartExecute {
    fn lists(&mut self) -> (&mut Vec<kiln_proto::reapi::Digest>, &mut Vec<PeerHint>) {
        (&mut self.missing_inputs, &mut self.peer_hints)
    }
}

impl DigestLists for PrefetchInputs {
    fn lists(&mut self) -> (&mut Vec<kiln_proto::reapi::Digest>, &mut Vec<PeerHint>) {
        (&mut self.digests, &mut self.peer_hints)
    }
}

/// Cuts a message's lists short (its own list first, then the peer hints) until it encodes
/// to at most `budget` bytes: a message over the worker API's limit would end the worker's
/// session, and what the lists leave out the worker fetches after reading the tree anyway.
fn fit(message: &mut impl DigestLists, budget: usize) {
    loop {
        let len = message.encoded_len();
        if len <= budget {
            return;
        }
        let (own, hints) = message.lists();
        // Drop as many digests as the excess takes (each with its tag and length), at least
        // one; the next round checks.
        let drop = |list: &[kiln_proto::reapi::Digest]| {
            let each = list
                .first()
                .map_or(1, |d| prost::Message::encoded_len(d) + 2);
            (len - budget).div_ceil(each).max(1)
        };
        if !own.is_empty() {
            let keep = own.len().saturating_sub(drop(own));
            own.truncate(keep);
        } else if let Some(hint) = hints.last_mut() {
            let keep = hint.digests.len().saturating_sub(drop(&hint.digests));
            hint.digests.truncate(keep);
            if hint.digests.is_empty() {
                hints.pop();
            }
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    #[test]
    fn messages_to_workers_are_cut_to_fit_their_budget_own_list_first() {
        let digests = |n: u32| -> Vec<kiln_proto::reapi::Digest> {
            (0..n)
                .map(|i| Digest::of(DigestFunction::Sha256, &i.to_le_bytes()).to_proto())
                .collect()
        };
        let mut start = StartExecute {
            missing_inputs: digests(100_000),
            peer_hints: vec![PeerHint {
                endpoint: "grpcs://10.0.0.7:50052".into(),
                digests: digests(20_000),
                tls_name: "w.peer.kiln.invalid".into(),
            }],
            ..Default::default()
        };
        let hints = prost::Message::encoded_len(&start.peer_hints[0]);
        fit(&mut start, 4 << 20);
        assert!(prost::Message::encoded_len(&start) <= 4 << 20);
        assert!(
            start.missing_inputs.len() > 38_000,
            "only what does not fit is cut"
        );
        assert_eq!(
            prost::Message::encoded_len(&start.peer_hints[0]),
            hints,
            "hints kept"
        );
        fit(&mut start, 1 << 20);
        assert!(prost::Message::encoded_len(&start) <= 1 << 20);
        assert!(start.missing_inputs.is_empty(), "cut first");
        assert!(!start.peer_hints.is_empty() && start.peer_hints[0].digests.len() < 20_000);
        fit(&mut start, 10);
        assert!(start.peer_hints.is_empty() && start.missing_inputs.is_empty());
        // A fetch ahead is cut the same way.
        let mut prefetch = PrefetchInputs {
            digests: digests(100_000),
            peer_hints: vec![PeerHint {
                digests: digests(100_000),
                ..Default::default()
            }],
            ..Default::default()
        };
        fit(&mut prefetch, 1 << 20);
        assert!(prost::Message::encoded_len(&prefetch) <= 1 << 20);
        assert!(prefetch.digests.is_empty() && !prefetch.peer_hints.is_empty());
    }
}
