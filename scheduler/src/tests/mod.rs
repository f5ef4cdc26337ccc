//! The scheduler's tests, by what they cover: the queue and the workers' lifecycle, placement
//! by locality (input roots, blobs held, hints), and fetching ahead. The helpers here build
//! jobs and read the commands.

mod lifecycle;
mod placement;
mod prefetch;

use super::*;
use crate::locality::Placements;
use kiln_config::PropertyKind;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

type S = Scheduler<&'static str, &'static str>;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        kinds: Kinds(BTreeMap::from([(
            "cores".to_string(),
            PropertyKind::Minimum,
        )])),
        max_retries: 1,
        worker_timeout: Duration::from_secs(10),
        timeout_grace: Duration::from_secs(5),
        max_queued: 100,
        unserved_timeout: Some(Duration::from_secs(30)),
        locality_wait: Duration::from_millis(100),
        max_cached_dirs: 1000,
        weights: crate::locality::Weights::default(),
        max_blob_facts: 10_000,
    }
}

fn job(name: &'static str, priority: i32, reqs: &[(&str, &str)]) -> Job<&'static str> {
    let kinds = config().kinds;
    Job {
        key: BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, name.as_bytes()),
        ),
        priority,
        requirements: Requirements::new(
            &kinds,
            reqs.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
        .unwrap(),
        timeout: Duration::from_secs(60),
        mergeable: true,
        queued_at: SystemTime::UNIX_EPOCH,
        input_root: None,
        inputs: Arc::from(Vec::new()),
        tree: Arc::new(crate::input_tree::InputTree::empty()),
        payload: name,
    }
}

fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Peer hints as (hinted peer, digests hinted from it).
type Hints = Vec<(WorkerId, usize)>;

/// A dispatch as (worker, payload, attempt, hints).
type Dispatched = (WorkerId, &'static str, u32, Hints);

/// The dispatches among the commands.
fn dispatches(s: &mut S) -> Vec<Dispatched> {
    s.commands()
        .into_iter()
        .filter_map(|c| match c {
            Command::Dispatch {
                worker,
                payload,
                attempt,
                peers,
                ..
            } => Some((
                worker,
                payload,
                attempt,
                peers.into_iter().map(|(w, d)| (w, d.len())).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// The dispatches among the commands, as (worker, payload, attempt).
fn dispatched(s: &mut S) -> Vec<(WorkerId, &'static str, u32)> {
    dispatches(s)
        .into_iter()
        .map(|(w, p, a, _)| (w, p, a))
        .collect()
}

fn finished(s: &mut S) -> Vec<(OpId, Outcome<&'static str>)> {
    s.commands()
        .into_iter()
        .filter_map(|c| match c {
            Command::Finished { op, outcome } => Some((op, outcome)),
            _ => None,
        })
        .collect()
}

fn rooted(name: &'static str, root: u8) -> Job<&'static str> {
    Job {
        input_root: Some(BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &[root]),
        )),
        ..job(name, 0, &[])
    }
}

fn holds(s: &mut S, now: Instant, worker: WorkerId, root: u8) {
    let key = rooted("", root).input_root.unwrap();
    s.worker_dirs(now, worker, false, vec![key], vec![]);
}

fn with_inputs(name: &'static str, inputs: &[u8]) -> Job<&'static str> {
    Job {
        inputs: inputs.iter().map(|n| file(*n)).collect(),
        ..job(name, 0, &[])
    }
}

/// Input file `n`, of `n` bytes.
fn file(n: u8) -> BlobKey {
    BlobKey::new(
        InstanceName::default_instance(),
        Digest {
            size: u64::from(n),
            ..Digest::of(DigestFunction::Sha256, &[n, 0xf1])
        },
    )
}

/// The dispatches among the commands, as (worker, payload, peer hints).
fn dispatched_with_hints(s: &mut S) -> Vec<(WorkerId, &'static str, Hints)> {
    dispatches(s)
        .into_iter()
        .map(|(w, p, _, h)| (w, p, h))
        .collect()
}
