//! Recording outcomes: a latency histogram, counts, bytes and errors per kind of operation.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::Duration;

/// One finished operation (or step of one).
#[derive(Debug, Clone)]
pub struct Sample {
    /// What it was (`write`, `batch-read`, ...).
    pub kind: &'static str,
    /// How long it took.
    pub latency: Duration,
    /// Payload bytes it moved (counted only on success).
    pub bytes: u64,
    /// The error, as a gRPC code name or `DIGEST_MISMATCH`, if it failed.
    pub error: Option<String>,
}

impl Sample {
    /// A success.
    pub fn ok(kind: &'static str, latency: Duration, bytes: u64) -> Sample {
        Sample {
            kind,
            latency,
            bytes,
            error: None,
        }
    }

    /// A failure.
    pub fn failed(kind: &'static str, latency: Duration, error: impl Into<String>) -> Sample {
        Sample {
            kind,
            latency,
            bytes: 0,
            error: Some(error.into()),
        }
    }

    /// From a gRPC result.
    pub fn from_result<T>(
        kind: &'static str,
        latency: Duration,
        bytes: u64,
        r: &Result<T, tonic::Status>,
    ) -> Sample {
        match r {
            Ok(_) => Sample::ok(kind, latency, bytes),
            Err(s) => Sample::failed(kind, latency, code_name(s.code())),
        }
    }
}

/// A gRPC code's canonical name.
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .fold(String::new(), |mut out, c| {
            if c.is_uppercase() && !out.is_empty() {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
            out
        })
}

/// Counters for one kind.
#[derive(Clone)]
pub struct KindStats {
    /// Latencies in microseconds.
    pub latency: Histogram<u64>,
    /// Operations finished (successes and failures).
    pub ops: u64,
    /// Bytes moved by successful operations.
    pub bytes: u64,
    /// Failures by code.
    pub errors: BTreeMap<String, u64>,
}

impl KindStats {
    fn new() -> KindStats {
        KindStats {
            // 1 µs to 1 hour, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            ops: 0,
            bytes: 0,
            errors: BTreeMap::new(),
        }
    }
}

/// Everything recorded by one worker (or merged from all).
#[derive(Clone, Default)]
pub struct Recorder {
    /// Per kind.
    pub kinds: BTreeMap<&'static str, KindStats>,
}

impl Recorder {
    /// Adds a sample.
    pub fn record(&mut self, s: &Sample) {
        let k = self.kinds.entry(s.kind).or_insert_with(KindStats::new);
        k.ops += 1;
        let micros = (s.latency.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = k.latency.record(micros);
        match &s.error {
            None => k.bytes += s.bytes,
            Some(e) => *k.errors.entry(e.clone()).or_default() += 1,
        }
    }

    /// Merges another recorder into this one.
    pub fn merge(&mut self, other: &Recorder) {
        for (kind, o) in &other.kinds {
            let k = self.kinds.entry(kind).or_insert_with(KindStats::new);
            k.ops += o.ops;
            k.bytes += o.bytes;
            let _ = k.latency.add(&o.latency);
            for (e, n) in &o.errors {
                *k.errors.entry(e.clone()).or_default() += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let mut a = Recorder::default();
        a.record(&Sample::ok("read", Duration::from_millis(2), 100));
        a.record(&Sample::failed(
            "read",
            Duration::from_millis(5),
            "NOT_FOUND",
        ));
        let mut b = Recorder::default();
        b.record(&Sample::ok("read", Duration::from_millis(3), 50));
        a.merge(&b);
        let k = &a.kinds["read"];
        assert_eq!((k.ops, k.bytes), (3, 150));
        assert_eq!(k.errors["NOT_FOUND"], 1);
        assert_eq!(k.latency.len(), 3);
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }
}
