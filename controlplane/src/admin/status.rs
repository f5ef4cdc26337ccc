//! The `/status` page: one self-contained HTML document (inline CSS and SVG, no scripts, no
//! external assets) rendered from a [`Snapshot`].

use super::sampler::Rates;
use std::fmt::Write as _;
use std::time::Duration;

/// Everything the page shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Kiln's version.
    pub version: String,
    /// Time since start.
    pub uptime: Duration,
    /// The gRPC listener.
    pub grpc_addr: String,
    /// The admin listener.
    pub admin_addr: String,
    /// Data-plane shards and their backend.
    pub shards: usize,
    /// Runtime backend name.
    pub backend: String,
    /// Data directory.
    pub data_dir: String,
    /// CAS blobs, bytes and cap.
    pub cas_blobs: u64,
    /// Bytes stored.
    pub cas_bytes: u64,
    /// Disk cap.
    pub cas_capacity: u64,
    /// Memory tier bytes and budget.
    pub memory_bytes: u64,
    /// Memory budget.
    pub memory_capacity: u64,
    /// Lookups found in memory, on disk, or missing.
    pub lookups: (u64, u64, u64),
    /// Action cache entries and bytes.
    pub ac_entries: u64,
    /// Action cache bytes.
    pub ac_bytes: u64,
    /// Action-cache gets: hits, misses, incomplete.
    pub ac_gets: (u64, u64, u64),
    /// Uploads being written and parked.
    pub uploads: (u64, u64),
    /// Open connections.
    pub connections: i64,
    /// The scheduler, when execution is enabled.
    pub execution: Option<crate::execution::SchedulerStats>,
    /// Each connected worker's directory cache, as it last reported it.
    pub workers: Vec<crate::execution::WorkerView>,
    /// Rates over the last minute.
    pub rates: Option<Rates>,
    /// Bytes per second, per second of the last minute.
    pub series: Vec<f64>,
}

fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn sparkline(series: &[f64]) -> String {
    let max = series.iter().cloned().fold(0.0f64, f64::max).max(1.0);
    let w = 300.0;
    let h = 40.0;
    let step = if series.len() > 1 {
        w / (series.len() - 1) as f64
    } else {
        w
    };
    let points: Vec<String> = series
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, h - v / max * h))
        .collect();
    format!(
        r##"<svg width="300" height="40" viewBox="0 0 300 40" role="img" aria-label="throughput, last minute"><polyline points="{}" fill="none" stroke="#c2410c" stroke-width="2"/></svg>"##,
        points.join(" ")
    )
}

/// Renders the page.
pub fn render(s: &Snapshot) -> String {
    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        let _ = write!(
            rows,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        );
    };
    let up = s.uptime.as_secs();
    row(
        "Uptime",
        format!(
            "{}d {:02}h {:02}m {:02}s",
            up / 86400,
            up / 3600 % 24,
            up / 60 % 60,
            up % 60
        ),
    );
    row("gRPC listener", s.grpc_addr.clone());
    row("Admin listener", s.admin_addr.clone());
    row(
        "Data plane",
        format!("{} shards on {}", s.shards, s.backend),
    );
    row("Data directory", s.data_dir.clone());
    row("Open connections", s.connections.to_string());
    let mut store = String::new();
    let mut srow = |k: &str, v: String| {
        let _ = write!(
            store,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        );
    };
    srow(
        "CAS on disk",
        format!(
            "{} blobs, {} of {} ({})",
            s.cas_blobs,
            human_bytes(s.cas_bytes as f64),
            human_bytes(s.cas_capacity as f64),
            percent(s.cas_bytes, s.cas_capacity)
        ),
    );
    srow(
        "Memory tier",
        format!(
            "{} of {} ({})",
            human_bytes(s.memory_bytes as f64),
            human_bytes(s.memory_capacity as f64),
            percent(s.memory_bytes, s.memory_capacity)
        ),
    );
    let (mem, disk, miss) = s.lookups;
    let total = mem + disk + miss;
    srow(
        "Blob reads",
        format!(
            "{total} lookups: {} from memory, {} from disk, {} missing",
            percent(mem, total),
            percent(disk, total),
            percent(miss, total)
        ),
    );
    let (hit, missed, incomplete) = s.ac_gets;
    let gets = hit + missed + incomplete;
    srow(
        "Action cache",
        format!(
            "{} entries, {}; {gets} lookups, {} hits ({} incomplete)",
            s.ac_entries,
            human_bytes(s.ac_bytes as f64),
            percent(hit, gets),
            incomplete
        ),
    );
    if let Some(e) = s.execution {
        srow(
            "Execution",
            format!(
                "{} workers; {} actions running, {} queued",
                e.workers, e.running, e.queued
            ),
        );
        let p = e.placements;
        srow(
            "Placements",
            format!(
                "{} on a worker caching the input root, {} on the worker caching most of the input tree, {} on the worker that fetched its inputs ahead, {} on the worker holding most input bytes, {} by load, {} after its holder stayed busy",
                p.input_root, p.input_tree, p.prefetched, p.input_blobs, p.load, p.holder_busy
            ),
        );
    }
    srow(
        "Uploads",
        format!(
            "{} in progress, {} interrupted and resumable",
            s.uploads.0, s.uploads.1
        ),
    );
    let mut workers = String::new();
    for w in &s.workers {
        let cache = match &w.dircache {
            Some(c) => {
                let roots = c.hits + c.misses;
                format!(
                    "{} of {} ({} entries); {} of {roots} input roots from the cache; {} subtrees reused; {} evicted",
                    human_bytes(c.bytes as f64),
                    human_bytes(c.capacity as f64),
                    c.entries,
                    percent(c.hits, roots),
                    c.subtree_hits,
                    c.evictions
                )
            }
            None => "no directory cache".into(),
        };
        let transfers = match &w.transfers {
            Some(t) => format!(
                "fetched {} from peers{}, {} from the server; served {} to peers{}",
                human_bytes(t.peer_bytes as f64),
                if t.peer_quic_bytes > 0 {
                    format!(" ({} over QUIC)", human_bytes(t.peer_quic_bytes as f64))
                } else {
                    String::new()
                },
                human_bytes(t.server_bytes as f64),
                human_bytes(t.served_bytes as f64),
                if t.peer_failures > 0 {
                    format!("; {} peer fetches failed", t.peer_failures)
                } else {
                    String::new()
                }
            ),
            None => "no report yet".into(),
        };
        let _ = write!(
            workers,
            "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&w.name),
            w.slots,
            cache,
            transfers,
            match &w.endpoint {
                Some(e) => format!(
                    "{}; {} blobs known to be held",
                    escape(&e.endpoint),
                    w.blob_facts
                ),
                None => "not served to peers".into(),
            }
        );
    }
    let workers = if workers.is_empty() {
        String::new()
    } else {
        format!("<h2>Workers</h2>\n<table id=\"workers\"><tr><th>worker</th><th>slots</th><th>directory cache</th><th>transfers</th><th>CAS for peers</th></tr>{workers}</table>")
    };
    let traffic = match s.rates {
        Some(r) => format!(
            "{:.1} calls/s, in {}/s, out {}/s (last {} s)",
            r.calls,
            human_bytes(r.bytes_in),
            human_bytes(r.bytes_out),
            r.window.as_secs()
        ),
        None => "collecting…".into(),
    };
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Kiln status</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #1c1917; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; width: 100%; }}
th {{ text-align: left; width: 12em; font-weight: 600; }}
th, td {{ padding: .3em .6em; border-bottom: 1px solid #e7e5e4; }}
.muted {{ color: #78716c; }}
</style></head>
<body>
<h1>Kiln <span class="muted">{version}</span></h1>
<table id="server">{rows}</table>
<h2>Storage</h2>
<table id="store">{store}</table>
{workers}
<h2>Traffic</h2>
<p id="traffic">{traffic}</p>
{spark}
<p class="muted">Prometheus metrics at <a href="/metrics">/metrics</a>; health at <a href="/healthz">/healthz</a> and <a href="/readyz">/readyz</a>. This page refreshes every 5 s.</p>
</body></html>
"#,
        version = escape(&s.version),
        traffic = escape(&traffic),
        spark = sparkline(&s.series),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_figures_and_escapes() {
        let page = render(&Snapshot {
            version: "1.0".into(),
            uptime: Duration::from_secs(90061),
            data_dir: "/data/<kiln>".into(),
            cas_blobs: 12,
            cas_bytes: 512 << 20,
            cas_capacity: 1 << 30,
            lookups: (3, 1, 0),
            series: vec![0.0, 10.0, 5.0],
            workers: vec![crate::execution::WorkerView {
                name: "mac<1>".into(),
                dircache: Some(kiln_proto::worker::DirCacheReport {
                    bytes: 3 << 30,
                    capacity: 4 << 30,
                    entries: 7,
                    hits: 3,
                    misses: 1,
                    subtree_hits: 2,
                    evictions: 0,
                    run: 1,
                }),
                transfers: Some(kiln_proto::worker::TransferReport {
                    peer_bytes: 2 << 20,
                    server_bytes: 1 << 20,
                    served_bytes: 5 << 20,
                    peer_failures: 1,
                    peer_quic_bytes: 1 << 20,
                    run: 1,
                }),
                endpoint: Some(crate::execution::PeerEndpoint {
                    endpoint: "grpc://10.0.0.7:50052".into(),
                    tls_name: String::new(),
                }),
                blob_facts: 3,
                slots: 4,
            }],
            ..Default::default()
        });
        assert!(page.contains("<th>mac&lt;1&gt;</th><td>4</td><td>3.0 GiB of 4.0 GiB (7 entries); 75.0% of 4 input roots from the cache; 2 subtrees reused; 0 evicted</td><td>fetched 2.0 MiB from peers (1.0 MiB over QUIC), 1.0 MiB from the server; served 5.0 MiB to peers; 1 peer fetches failed</td><td>grpc://10.0.0.7:50052; 3 blobs known to be held</td>"), "{page}");
        assert!(page.contains("1d 01h 01m 01s"), "{page}");
        assert!(
            page.contains("12 blobs, 512.0 MiB of 1.0 GiB (50.0%)"),
            "{page}"
        );
        assert!(page.contains("75.0% from memory"), "{page}");
        assert!(page.contains("/data/&lt;kiln&gt;"));
        assert!(!page.contains("<kiln>"));
        assert!(page.contains("<polyline"));
    }
}
