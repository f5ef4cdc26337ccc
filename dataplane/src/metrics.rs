//! What the data plane counts, in Prometheus form: calls per method and status, latency,
//! bytes in and out, CAS lookups by tier, evictions, messages between shards, connections.
//! Hot paths touch only atomics (and one uncontended lock per call for the latency histogram);
//! totals that need asking the shards (blobs, bytes, queue depths) are gathered at scrape time
//! by the admin server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Label of a method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// `Service.Method`, or `other`.
    pub method: &'static str,
}

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `Service.Method`, or `other`.
    pub method: &'static str,
    /// gRPC status code name.
    pub code: &'static str,
}

/// Where a CAS lookup found its blob.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    /// `memory`, `disk` or `miss`.
    pub result: &'static str,
}

/// Who sent a command to an owner shard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    /// `local` (same core), `remote` (another core) or `control` (the control plane).
    pub origin: &'static str,
}

type HistogramFamily = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to ~200 s.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 15))
}

/// Every data-plane counter; one per process, shared by all shards and the control plane.
pub struct Metrics {
    /// Finished calls by method and code.
    pub calls: Family<CallLabels, Counter>,
    /// Call latency by method.
    pub latency: HistogramFamily,
    /// Calls running now.
    pub in_flight: Family<MethodLabel, Gauge>,
    /// Request payload bytes received.
    pub bytes_in: Family<MethodLabel, Counter>,
    /// Response payload bytes sent.
    pub bytes_out: Family<MethodLabel, Counter>,
    /// Blob bytes sent over QUIC (a CAS served by the QUIC listener, beside the data plane).
    pub quic_bytes_out: Family<MethodLabel, Counter>,
    /// Blob bytes received over QUIC (uploads to the server's CAS over `server.quic`).
    pub quic_bytes_in: Family<MethodLabel, Counter>,
    /// CAS lookups by where the blob was found.
    pub lookups: Family<LookupLabel, Counter>,
    /// Compressed reads from a blob's start by whether its zstd frame was kept (`hit`) or
    /// made (`miss`).
    pub zstd_frames: Family<LookupLabel, Counter>,
    /// Digests asked about in FindMissingBlobs (and completeness checks) that were present.
    pub present: Counter,
    /// ...and missing.
    pub missing: Counter,
    /// Blobs evicted.
    pub evictions: Counter,
    /// Bytes evicted.
    pub evicted_bytes: Counter,
    /// Blobs committed.
    pub commits: Counter,
    /// Filesystem syncs made for group commit.
    pub group_syncs: Counter,
    /// Commits made durable by those syncs (their ratio is the mean group size).
    pub group_synced_commits: Counter,
    /// Commits waiting for durability now: for a group sync, or for the sync of another copy
    /// of the same blob.
    pub awaiting_sync: Gauge,
    /// Stored blobs found corrupt and removed.
    pub corrupt: Counter,
    /// Batches the small-blob logs wrote (each one write and, when durable, one data sync).
    pub log_syncs: Counter,
    /// Records the small-blob logs appended (blobs stored, and copied forward).
    pub log_appended: Counter,
    /// Blobs the small-blob logs dropped with their segments.
    pub log_evicted: Counter,
    /// Records copied forward out of dropped segments (pinned, or used since written).
    pub log_copied: Counter,
    /// Bytes of the small-blob logs' segment files.
    pub log_bytes: Gauge,
    /// Bytes of the records they index (the rest is dead, freed with its segment).
    pub log_live_bytes: Gauge,
    /// Blobs they hold.
    pub log_blobs: Gauge,
    /// Calls of the `redis` tier that Redis failed (or did not answer in time).
    pub redis_failures: Counter,
    /// Bytes of blobs written through to Redis by the `redis` tier.
    pub redis_stored_bytes: Counter,
    /// Bytes of blobs the `redis` tier fetched from Redis into this server's store.
    pub redis_fetched_bytes: Counter,
    /// Calls of a `grpc` or `shard` tier that its endpoint failed.
    pub remote_failures: Counter,
    /// Bytes of blobs a `grpc` or `shard` tier fetched into this server's store.
    pub remote_fetched_bytes: Counter,
    /// Commands to owner shards, by origin.
    pub commands: Family<OriginLabel, Counter>,
    /// HTTP/2 connections accepted.
    pub connections_total: Counter,
    /// HTTP/2 connections open.
    pub connections_open: Gauge,
    /// Connections closed at once because `server.max_connections` were open.
    pub connections_refused: Counter,
    /// Connections closed for having no call in flight for `server.idle_timeout_secs`.
    pub connections_idle_closed: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    total_calls: Counter,
    total_bytes_in: Counter,
    total_bytes_out: Counter,
}

impl Metrics {
    /// Fresh counters.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            quic_bytes_out: Family::default(),
            quic_bytes_in: Family::default(),
            lookups: Family::default(),
            zstd_frames: Family::default(),
            present: Counter::default(),
            missing: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            commits: Counter::default(),
            group_syncs: Counter::default(),
            group_synced_commits: Counter::default(),
            log_syncs: Counter::default(),
            log_appended: Counter::default(),
            log_evicted: Counter::default(),
            log_copied: Counter::default(),
            log_bytes: Gauge::default(),
            log_live_bytes: Gauge::default(),
            log_blobs: Gauge::default(),
            awaiting_sync: Gauge::default(),
            corrupt: Counter::default(),
            redis_failures: Counter::default(),
            redis_stored_bytes: Counter::default(),
            redis_fetched_bytes: Counter::default(),
            remote_failures: Counter::default(),
            remote_fetched_bytes: Counter::default(),
            commands: Family::default(),
            connections_total: Counter::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            connections_idle_closed: Counter::default(),
            tls_handshake_failures: Counter::default(),
            total_calls: Counter::default(),
            total_bytes_in: Counter::default(),
            total_bytes_out: Counter::default(),
        })
    }

    /// Adds every counter to `registry` (prefix `kiln_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_calls",
            "Finished gRPC calls by method and status code",
            self.calls.clone(),
        );
        registry.register(
            "kiln_call_duration_seconds",
            "gRPC call latency by method",
            self.latency.clone(),
        );
        registry.register(
            "kiln_calls_in_flight",
            "gRPC calls running now",
            self.in_flight.clone(),
        );
        registry.register(
            "kiln_received_bytes",
            "Request bytes received by method",
            self.bytes_in.clone(),
        );
        registry.register(
            "kiln_sent_bytes",
            "Response bytes sent by method",
            self.bytes_out.clone(),
        );
        registry.register(
            "kiln_quic_sent_bytes",
            "Blob bytes sent over QUIC by method (server.quic, or a worker's CAS to its peers)",
            self.quic_bytes_out.clone(),
        );
        registry.register(
            "kiln_quic_received_bytes",
            "Blob bytes received over QUIC by method (uploads from workers over server.quic)",
            self.quic_bytes_in.clone(),
        );
        registry.register(
            "kiln_cas_lookups",
            "CAS lookups by where the blob was found",
            self.lookups.clone(),
        );
        registry.register(
            "kiln_zstd_frames",
            "Compressed reads from a blob's start: frame kept (hit) or made (miss)",
            self.zstd_frames.clone(),
        );
        registry.register(
            "kiln_cas_present_digests",
            "Digests asked about that were present",
            self.present.clone(),
        );
        registry.register(
            "kiln_cas_missing_digests",
            "Digests asked about that were missing",
            self.missing.clone(),
        );
        registry.register(
            "kiln_cas_evictions",
            "Blobs evicted from the CAS",
            self.evictions.clone(),
        );
        registry.register(
            "kiln_cas_evicted_bytes",
            "Bytes evicted from the CAS",
            self.evicted_bytes.clone(),
        );
        registry.register("kiln_cas_commits", "Blobs stored", self.commits.clone());
        registry.register(
            "kiln_cas_group_syncs",
            "Filesystem syncs made for group commit",
            self.group_syncs.clone(),
        );
        registry.register(
            "kiln_cas_group_synced_commits",
            "Commits made durable by group-commit syncs (divided by kiln_cas_group_syncs: the mean group)",
            self.group_synced_commits.clone(),
        );
        registry.register(
            "kiln_cas_commits_awaiting_sync",
            "Commits waiting for durability (their group's sync, or another copy's of the same blob): not yet acknowledged or visible",
            self.awaiting_sync.clone(),
        );
        registry.register(
            "kiln_log_batches",
            "Batches the small-blob logs wrote: one write and, when durable, one data sync each",
            self.log_syncs.clone(),
        );
        registry.register(
            "kiln_log_appended_records",
            "Records the small-blob logs appended (divided by kiln_log_batches: the mean batch)",
            self.log_appended.clone(),
        );
        registry.register(
            "kiln_log_evicted_blobs",
            "Blobs the small-blob logs dropped with their oldest segments",
            self.log_evicted.clone(),
        );
        registry.register(
            "kiln_log_copied_records",
            "Records copied forward out of dropped segments (pinned, or used since written)",
            self.log_copied.clone(),
        );
        registry.register(
            "kiln_log_bytes",
            "Bytes of the small-blob logs' segment files",
            self.log_bytes.clone(),
        );
        registry.register(
            "kiln_log_live_bytes",
            "Bytes of the records the small-blob logs index (the rest goes with its segment)",
            self.log_live_bytes.clone(),
        );
        registry.register(
            "kiln_log_blobs",
            "Blobs the small-blob logs hold",
            self.log_blobs.clone(),
        );
        registry.register(
            "kiln_cas_corrupt_blobs",
            "Stored blobs that failed verification and were removed",
            self.corrupt.clone(),
        );
        registry.register(
            "kiln_redis_tier_failures",
            "Calls of the redis tier that Redis failed or did not answer in time",
            self.redis_failures.clone(),
        );
        registry.register(
            "kiln_redis_tier_stored_bytes",
            "Bytes of blobs written through to Redis",
            self.redis_stored_bytes.clone(),
        );
        registry.register(
            "kiln_redis_tier_fetched_bytes",
            "Bytes of blobs fetched from Redis into this server's store",
            self.redis_fetched_bytes.clone(),
        );
        registry.register(
            "kiln_remote_tier_failures",
            "Calls of a grpc or shard tier that its CAS endpoint failed",
            self.remote_failures.clone(),
        );
        registry.register(
            "kiln_remote_tier_fetched_bytes",
            "Bytes of blobs a grpc or shard tier fetched into this server's store",
            self.remote_fetched_bytes.clone(),
        );
        registry.register(
            "kiln_shard_commands",
            "Commands sent to owner shards, by origin",
            self.commands.clone(),
        );
        registry.register(
            "kiln_connections",
            "HTTP/2 connections accepted",
            self.connections_total.clone(),
        );
        registry.register(
            "kiln_connections_open",
            "HTTP/2 connections open",
            self.connections_open.clone(),
        );
        registry.register(
            "kiln_connections_refused",
            "Connections closed at once because server.max_connections were open",
            self.connections_refused.clone(),
        );
        registry.register(
            "kiln_connections_idle_closed",
            "Connections closed with GOAWAY after server.idle_timeout_secs without a call",
            self.connections_idle_closed.clone(),
        );
        registry.register(
            "kiln_tls_handshake_failures",
            "TLS handshakes on the main port that failed or timed out",
            self.tls_handshake_failures.clone(),
        );
    }

    /// Starts recording a call to `path`.
    pub fn call(self: &Arc<Self>, path: &str) -> CallRecorder {
        let method = method_label(path);
        self.in_flight.get_or_create(&MethodLabel { method }).inc();
        CallRecorder {
            metrics: self.clone(),
            method,
            start: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            code: AtomicI32::new(NO_CODE),
        }
    }

    /// Totals over every method: (calls finished, bytes received, bytes sent).
    pub fn totals(&self) -> (u64, u64, u64) {
        (
            self.total_calls.get(),
            self.total_bytes_in.get(),
            self.total_bytes_out.get(),
        )
    }

    /// Lookups that found their blob in `result` (`memory`, `disk`, `miss`).
    pub fn lookups_of(&self, result: &'static str) -> u64 {
        self.lookups.get_or_create(&LookupLabel { result }).get()
    }

    /// Counts a lookup by where it found its blob.
    pub fn lookups_inc(&self, result: &'static str) {
        self.lookups.get_or_create(&LookupLabel { result }).inc();
    }

    /// Counts a compressed read's frame lookup (`hit` or `miss`).
    pub fn zstd_frames_inc(&self, result: &'static str) {
        self.zstd_frames
            .get_or_create(&LookupLabel { result })
            .inc();
    }

    /// Counts `n` blob bytes sent over QUIC in answer to `path`.
    pub fn quic_sent(&self, path: &str, n: u64) {
        let method = method_label(path);
        self.quic_bytes_out
            .get_or_create(&MethodLabel { method })
            .inc_by(n);
    }

    /// Counts `n` blob bytes received over QUIC in a call to `path`.
    pub fn quic_received(&self, path: &str, n: u64) {
        let method = method_label(path);
        self.quic_bytes_in
            .get_or_create(&MethodLabel { method })
            .inc_by(n);
    }

    /// Counts a command to an owner shard.
    pub fn command(&self, origin: &'static str) {
        self.commands.get_or_create(&OriginLabel { origin }).inc();
    }
}

/// Records one call when dropped: latency, status (CANCELLED if none was set), bytes.
pub struct CallRecorder {
    metrics: Arc<Metrics>,
    method: &'static str,
    start: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    code: AtomicI32,
}

const NO_CODE: i32 = -1;

impl CallRecorder {
    /// Request bytes received.
    pub fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Response bytes sent.
    pub fn sent(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The call's status.
    pub fn finish(&self, code: tonic::Code) {
        self.code.store(code as i32, Ordering::Relaxed);
    }
}

impl Drop for CallRecorder {
    fn drop(&mut self) {
        let m = &self.metrics;
        let method = self.method;
        let code = match self.code.load(Ordering::Relaxed) {
            NO_CODE => tonic::Code::Cancelled,
            c => tonic::Code::from_i32(c),
        };
        let code = code_name(code);
        let (bytes_in, bytes_out) = (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        );
        m.in_flight.get_or_create(&MethodLabel { method }).dec();
        m.calls.get_or_create(&CallLabels { method, code }).inc();
        m.latency
            .get_or_create(&MethodLabel { method })
            .observe(self.start.elapsed().as_secs_f64());
        m.bytes_in
            .get_or_create(&MethodLabel { method })
            .inc_by(bytes_in);
        m.bytes_out
            .get_or_create(&MethodLabel { method })
            .inc_by(bytes_out);
        m.total_calls.inc();
        m.total_bytes_in.inc_by(bytes_in);
        m.total_bytes_out.inc_by(bytes_out);
    }
}

/// gRPC paths Kiln knows, and their labels.
const METHODS: [(&str, &str); 25] = [
    ("/google.bytestream.ByteStream/Read", "ByteStream.Read"),
    ("/google.bytestream.ByteStream/Write", "ByteStream.Write"),
    (
        "/google.bytestream.ByteStream/QueryWriteStatus",
        "ByteStream.QueryWriteStatus",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        "CAS.FindMissingBlobs",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        "CAS.BatchUpdateBlobs",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
        "CAS.BatchReadBlobs",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
        "CAS.GetTree",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob",
        "CAS.SplitBlob",
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob",
        "CAS.SpliceBlob",
    ),
    (
        "/build.bazel.remote.asset.v1.Fetch/FetchBlob",
        "Fetch.FetchBlob",
    ),
    (
        "/build.bazel.remote.asset.v1.Fetch/FetchDirectory",
        "Fetch.FetchDirectory",
    ),
    (
        "/build.bazel.remote.asset.v1.Push/PushBlob",
        "Push.PushBlob",
    ),
    (
        "/build.bazel.remote.asset.v1.Push/PushDirectory",
        "Push.PushDirectory",
    ),
    (
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
        "ActionCache.GetActionResult",
    ),
    (
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        "ActionCache.UpdateActionResult",
    ),
    (
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        "Capabilities.GetCapabilities",
    ),
    (
        "/build.bazel.remote.execution.v2.Execution/Execute",
        "Execution.Execute",
    ),
    (
        "/build.bazel.remote.execution.v2.Execution/WaitExecution",
        "Execution.WaitExecution",
    ),
    (
        "/google.longrunning.Operations/GetOperation",
        "Operations.GetOperation",
    ),
    (
        "/google.longrunning.Operations/ListOperations",
        "Operations.ListOperations",
    ),
    (
        "/google.longrunning.Operations/DeleteOperation",
        "Operations.DeleteOperation",
    ),
    (
        "/google.longrunning.Operations/CancelOperation",
        "Operations.CancelOperation",
    ),
    (
        "/google.longrunning.Operations/WaitOperation",
        "Operations.WaitOperation",
    ),
    ("/kiln.worker.v1.WorkerApi/Session", "WorkerApi.Session"),
    ("/grpc.health.v1.Health/Check", "Health.Check"),
];

/// The label for a gRPC path: known methods by name, anything else `other` (so clients
/// cannot grow the number of series).
pub fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("other", |(_, label)| label)
}

impl Metrics {
    /// Bytes sent in answers to blob reads (ByteStream Read and BatchReadBlobs), over TCP
    /// and over QUIC: for a worker, what its CAS served to its peers.
    pub fn blob_bytes_sent(&self) -> u64 {
        ["ByteStream.Read", "CAS.BatchReadBlobs"]
            .into_iter()
            .map(|method| {
                let label = MethodLabel { method };
                let tcp = self.bytes_out.get_or_create(&label).get();
                tcp.saturating_add(self.quic_bytes_out.get_or_create(&label).get())
            })
            .sum()
    }
}

/// A gRPC code's canonical name (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_counted_once_with_its_code_and_bytes() {
        let m = Metrics::new();
        {
            let call = m.call("/google.bytestream.ByteStream/Read");
            call.received(10);
            call.sent(100);
            call.sent(5);
            call.finish(tonic::Code::NotFound);
        }
        drop(m.call("/nonsense/Path"));
        let read = CallLabels {
            method: "ByteStream.Read",
            code: "NOT_FOUND",
        };
        assert_eq!(m.calls.get_or_create(&read).get(), 1);
        let other = CallLabels {
            method: "other",
            code: "CANCELLED",
        };
        assert_eq!(
            m.calls.get_or_create(&other).get(),
            1,
            "no status means the peer went away"
        );
        assert_eq!(m.totals(), (2, 10, 105));
        assert_eq!(
            m.in_flight
                .get_or_create(&MethodLabel {
                    method: "ByteStream.Read"
                })
                .get(),
            0
        );
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("kiln_calls_total{method=\"ByteStream.Read\",code=\"NOT_FOUND\"} 1"),
            "{text}"
        );
    }
}
