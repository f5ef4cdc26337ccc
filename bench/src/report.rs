//! Results: built from what a run measured, printed as a table, written and read as JSON, and
//! compared side by side.

use crate::cpu::{ServerCpu, ServerRss};
use crate::load::Measured;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One run's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Name of the run (default: the endpoint).
    pub label: String,
    /// The scenario.
    pub scenario: String,
    /// The endpoint measured.
    pub endpoint: String,
    /// Digest function used.
    pub digest_function: String,
    /// Blob sizes.
    pub size: String,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Operations in flight.
    pub concurrency: usize,
    /// Open-loop rate, if any.
    pub rate: Option<f64>,
    /// Length of the measured phase.
    pub seconds: f64,
    /// Per kind of operation.
    pub results: Vec<KindReport>,
    /// Anything the reader should know (skipped parts, repeated blobs...).
    pub notes: Vec<String>,
    /// The server's CPU over the measured phase (`--server-pid`).
    #[serde(default)]
    pub server_cpu: Option<ServerCpu>,
    /// The server's resident memory through the run (`--rss-every`).
    #[serde(default)]
    pub server_rss: Option<ServerRss>,
}

/// Results for one kind of operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindReport {
    /// The kind (`write`, `batch-read`, ...).
    pub kind: String,
    /// Operations finished, including failures.
    pub ops: u64,
    /// Failures.
    pub errors: u64,
    /// Failures by gRPC code (or `DIGEST_MISMATCH`).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Bytes moved by successful operations.
    pub bytes: u64,
    /// Gigabytes (10^9) per second.
    pub gb_per_sec: f64,
    /// Latency percentiles, milliseconds.
    pub latency_ms: Percentiles,
    /// (percentile, milliseconds) points of the whole distribution, for plots.
    pub distribution: Vec<(f64, f64)>,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Percentiles sampled for the distribution curve.
const CURVE: [f64; 15] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 100.0,
];

impl Report {
    /// Builds a report from a run; `head` carries the run's description.
    pub fn from_measured(head: Report, measured: &Measured) -> Report {
        let seconds = measured.elapsed.as_secs_f64().max(1e-9);
        let results = measured
            .recorder
            .kinds
            .iter()
            .map(|(kind, k)| {
                let ms = |q: f64| k.latency.value_at_quantile(q) as f64 / 1000.0;
                KindReport {
                    kind: kind.to_string(),
                    ops: k.ops,
                    errors: k.errors.values().sum(),
                    errors_by_code: k.errors.clone(),
                    ops_per_sec: k.ops as f64 / seconds,
                    bytes: k.bytes,
                    gb_per_sec: k.bytes as f64 / seconds / 1e9,
                    latency_ms: Percentiles {
                        p50: ms(0.5),
                        p90: ms(0.9),
                        p99: ms(0.99),
                        p999: ms(0.999),
                        max: k.latency.max() as f64 / 1000.0,
                        mean: k.latency.mean() / 1000.0,
                    },
                    distribution: CURVE.iter().map(|p| (*p, ms(p / 100.0))).collect(),
                }
            })
            .collect();
        let mut notes = head.notes.clone();
        let server_cpu = match &measured.server_cpu {
            Some((pid, Ok(used))) => {
                Some(ServerCpu::new(*pid, *used, measured.operations, seconds))
            }
            Some((_, Err(e))) => {
                notes.push(format!("server CPU not measured: {e}"));
                None
            }
            None => None,
        };
        Report {
            seconds,
            results,
            notes,
            server_cpu,
            server_rss: ServerRss::new(&measured.server_rss),
            ..head
        }
    }

    /// Reads a JSON report.
    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a kiln-bench result: {e}", path.display()))
    }

    /// Writes the report as JSON.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    /// The report as a text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} {} against {} ({}, {}, {} connections x {} in flight{}, {:.1} s measured)\n",
            self.label,
            self.scenario,
            self.endpoint,
            self.digest_function,
            self.size,
            self.connections,
            self.concurrency,
            self.rate
                .map(|r| format!(", {r} ops/s open loop"))
                .unwrap_or_default(),
            self.seconds
        );
        out.push_str(&format!(
            "{:<14} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
            "op",
            "ops",
            "ops/s",
            "GB/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors"
        ));
        for r in &self.results {
            out.push_str(&format!(
                "{:<14} {:>9} {:>11.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}\n",
                r.kind,
                r.ops,
                r.ops_per_sec,
                r.gb_per_sec,
                r.latency_ms.p50,
                r.latency_ms.p90,
                r.latency_ms.p99,
                r.latency_ms.p999,
                r.latency_ms.max,
                r.errors
            ));
            for (code, n) in &r.errors_by_code {
                out.push_str(&format!("    error {code}: {n}\n"));
            }
        }
        if let Some(c) = &self.server_cpu {
            out.push_str(&format!(
                "server (pid {}): {:.3} CPU s (user {:.3}, system {:.3}) = {:.1} µs per operation over {} operations, {:.2} cores busy\n",
                c.pid,
                c.user_seconds + c.system_seconds,
                c.user_seconds,
                c.system_seconds,
                c.micros_per_op,
                c.operations,
                c.cores
            ));
        }
        if let Some(r) = &self.server_rss {
            let first = r.samples.first().map_or(0.0, |s| s.1);
            let last = r.samples.last().map_or(0.0, |s| s.1);
            out.push_str(&format!(
                "server RSS: {first:.0} MiB at start, {last:.0} MiB at end, {:.0} MiB peak; last two thirds: {:+.2} MiB/min ({:+.1}%)\n",
                r.max_mib, r.growth_mib_per_min, r.growth_percent
            ));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

/// Side-by-side comparison: each run against the first, as ratios (throughput: higher is
/// better; latency: lower is better).
pub fn compare(reports: &[Report]) -> String {
    let Some(base) = reports.first() else {
        return String::new();
    };
    let mut out = String::new();
    for other in &reports[1..] {
        out.push_str(&format!(
            "{} vs {} ({} / {}):\n{:<14} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9}\n",
            other.label,
            base.label,
            other.scenario,
            base.scenario,
            "op",
            "ops/s",
            "ops/s base",
            "x",
            "p50 x",
            "p99 x",
            "p99.9 x"
        ));
        for r in &other.results {
            let Some(b) = base.results.iter().find(|b| b.kind == r.kind) else {
                out.push_str(&format!("{:<14} (not in {})\n", r.kind, base.label));
                continue;
            };
            let ratio = |x: f64, y: f64| {
                if y > 0.0 {
                    format!("{:.2}", x / y)
                } else {
                    "-".into()
                }
            };
            out.push_str(&format!(
                "{:<14} {:>12.1} {:>12.1} {:>9} {:>9} {:>9} {:>9}\n",
                r.kind,
                r.ops_per_sec,
                b.ops_per_sec,
                ratio(r.ops_per_sec, b.ops_per_sec),
                ratio(r.latency_ms.p50, b.latency_ms.p50),
                ratio(r.latency_ms.p99, b.latency_ms.p99),
                ratio(r.latency_ms.p999, b.latency_ms.p999)
            ));
        }
        if let (Some(c), Some(b)) = (&other.server_cpu, &base.server_cpu) {
            out.push_str(&format!(
                "{:<14} {:>12.1} {:>12.1} {:>9}   (server CPU µs per operation)\n",
                "server-cpu",
                c.micros_per_op,
                b.micros_per_op,
                if b.micros_per_op > 0.0 {
                    format!("{:.2}", c.micros_per_op / b.micros_per_op)
                } else {
                    "-".into()
                }
            ));
        }
    }
    out
}
