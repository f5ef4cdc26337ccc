//! The scheduler's vocabulary: its settings, the jobs it is given, and the commands and
//! outcomes it hands back.

use crate::platform::{Kinds, Requirements};
use kiln_reapi::digest::{BlobKey, Digest};
use kiln_reapi::status::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// An operation inside the scheduler.
pub type OpId = u64;
/// A connected worker session.
pub type WorkerId = u64;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How platform properties are matched.
    pub kinds: Kinds,
    /// Re-runs after worker loss.
    pub max_retries: u32,
    /// A worker silent this long is lost.
    pub worker_timeout: Duration,
    /// Time past an action's timeout the worker gets to report before the scheduler gives up.
    pub timeout_grace: Duration,
    /// Bound on queued operations.
    pub max_queued: usize,
    /// A queued operation no connected worker could ever run fails after this long
    /// (`None`: it waits for a matching worker forever).
    pub unserved_timeout: Option<Duration>,
    /// How long an action may wait for a busy worker whose directory cache holds its input
    /// root, before it goes to another free worker.
    pub locality_wait: Duration,
    /// Directories remembered per worker (its directory cache's).
    pub max_cached_dirs: usize,
    /// How placement weighs what a free worker holds.
    pub weights: crate::locality::Weights,
    /// Facts "worker W holds blob B" remembered, for all workers together.
    pub max_blob_facts: usize,
}

/// Something to run.
#[derive(Debug, Clone)]
pub struct Job<P> {
    /// The action (instance, digest function, digest): identical cacheable jobs merge.
    pub key: BlobKey,
    /// Lower runs first.
    pub priority: i32,
    /// Platform requirements.
    pub requirements: Requirements,
    /// The action's timeout.
    pub timeout: Duration,
    /// May share an operation with an identical job.
    pub mergeable: bool,
    /// When the client asked.
    pub queued_at: SystemTime,
    /// The action's input root (instance and `Directory` digest), for placement by locality.
    pub input_root: Option<BlobKey>,
    /// The action's input files, the largest first: for placement by the bytes a worker
    /// holds and for hints of the peers that hold them.
    pub inputs: Arc<[BlobKey]>,
    /// The input tree's largest directories, for placement by the bytes of it a worker's
    /// directory cache holds.
    pub tree: Arc<crate::input_tree::InputTree>,
    /// What the worker needs (opaque here).
    pub payload: P,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for a worker.
    Queued,
    /// On a worker.
    Executing,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<R> {
    /// The worker's report.
    Reported(R),
    /// The scheduler gave up: what kind of failure (its gRPC code follows from
    /// `kiln_reapi::status`'s table) and a message.
    Failed {
        /// What kind of failure.
        kind: ErrorKind,
        /// Why.
        message: String,
    },
}

/// What the scheduler wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Command<P, R> {
    /// Send the job to a worker.
    Dispatch {
        /// The worker.
        worker: WorkerId,
        /// The operation.
        op: OpId,
        /// 1 for the first try.
        attempt: u32,
        /// The job's payload.
        payload: P,
        /// Its timeout.
        timeout: Duration,
        /// When it was queued.
        queued_at: SystemTime,
        /// Inputs other workers hold that this one is not known to hold, by a peer holding
        /// each.
        peers: Vec<(WorkerId, Vec<Digest>)>,
        /// The input files this worker is not known to hold and no peer is hinted for (only
        /// for a worker whose holdings the scheduler tracks; empty otherwise), so that it
        /// fetches them, with the hinted ones, at once.
        missing: Vec<Digest>,
    },
    /// Fetch a queued operation's inputs ahead: the worker is busy, and likely to run it.
    Prefetch {
        /// The worker.
        worker: WorkerId,
        /// The operation (its payload says what to fetch).
        op: OpId,
        /// The job's payload.
        payload: P,
        /// Its input files the worker is not known to hold (at most a bounded number).
        digests: Vec<Digest>,
        /// Of those, the ones other workers hold, by a peer holding each.
        peers: Vec<(WorkerId, Vec<Digest>)>,
    },
    /// Stop an operation on a worker.
    Kill {
        /// The worker.
        worker: WorkerId,
        /// The operation.
        op: OpId,
    },
    /// The operation moved to a new stage.
    Stage {
        /// The operation.
        op: OpId,
        /// Its stage.
        stage: Stage,
    },
    /// The worker is lost (silent, or its session broke): close its session, so that a
    /// worker that was only stalled stops its actions (they were re-queued) and reconnects.
    Disconnect {
        /// The worker.
        worker: WorkerId,
    },
    /// The operation ended; it is forgotten by the scheduler.
    Finished {
        /// The operation.
        op: OpId,
        /// How.
        outcome: Outcome<R>,
    },
}

/// Why a job was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is at its bound.
    #[error("the execution queue is full ({0} actions); retry later")]
    QueueFull(usize),
}

impl kiln_reapi::status::Classify for SubmitError {
    fn kind(&self) -> ErrorKind {
        match self {
            SubmitError::QueueFull(_) => ErrorKind::Exhausted,
        }
    }
}

/// Result of a submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The operation the job runs as.
    pub op: OpId,
    /// It joined an identical operation already in flight.
    pub merged: bool,
}
