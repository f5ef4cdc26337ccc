//! The admin listener: Prometheus metrics that move with traffic, health and readiness, and
//! the status page as a real browser (headless Chromium) renders it.

#[macro_use]
mod common;

use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::Kiln;
use kiln_proto::reapi::digest_function::Value as Function;
use std::process::Command;

fn get(url: &str) -> (u16, String) {
    let mut response = ureq::get(url)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .expect("admin request");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().expect("body"))
}

/// The value of the first sample line starting with `prefix` (labels included).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

on_every_runtime! {
    async fn metrics_move_with_traffic_and_health_endpoints_answer(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start(rt, dir.path());
        let admin = kiln.admin.clone();
        assert!(admin.starts_with("http://127.0.0.1:"), "{admin}");
        let before = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || get(&format!("{admin}/metrics"))
        })
        .await
        .unwrap();
        assert_eq!(before.0, 200);

        let ch = kiln.channel().await;
        let data = pseudo_random(1, 300_000);
        let d = digest(Function::Sha256, &data);
        blobs::write(&ch, &write_name("", Function::Sha256, &d), &data, 65536)
            .await
            .unwrap();
        assert_eq!(
            blobs::read(&ch, &read_name("", Function::Sha256, &d), 0, 0)
                .await
                .unwrap(),
            data
        );
        let missing = digest(Function::Sha256, b"missing");
        assert_eq!(
            blobs::read(&ch, &read_name("", Function::Sha256, &missing), 0, 0)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );

        let (status, text) = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || get(&format!("{admin}/metrics"))
        })
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            sample(
                &text,
                r#"kiln_calls_total{method="ByteStream.Write",code="OK"}"#
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"kiln_calls_total{method="ByteStream.Read",code="OK"}"#
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"kiln_calls_total{method="ByteStream.Read",code="NOT_FOUND"}"#
            ),
            1.0,
            "{text}"
        );
        assert!(
            sample(
                &text,
                r#"kiln_received_bytes_total{method="ByteStream.Write"}"#
            ) >= 300_000.0,
            "{text}"
        );
        assert!(
            sample(&text, r#"kiln_sent_bytes_total{method="ByteStream.Read"}"#) >= 300_000.0,
            "{text}"
        );
        assert_eq!(sample(&text, "kiln_cas_commits_total"), 1.0);
        assert_eq!(sample(&text, "kiln_cas_blobs"), 1.0);
        assert_eq!(sample(&text, "kiln_cas_bytes"), 300_000.0);
        assert!(
            sample(&text, r#"kiln_cas_lookups_total{result="miss"}"#) >= 1.0,
            "{text}"
        );
        assert!(
            text.contains("kiln_call_duration_seconds_bucket{"),
            "latency histograms are exported"
        );
        assert!(
            text.contains(r#"kiln_shard_queue_depth{shard="1"}"#),
            "{text}"
        );
        assert!(sample(&text, "kiln_connections_total") >= 1.0);
        // The embedded worker registers with the scheduler; the gauge shows it.
        common::eventually("the embedded worker in kiln_scheduler_workers", || {
            let admin = admin.clone();
            async move {
                let (_, text) = tokio::task::spawn_blocking(move || get(&format!("{admin}/metrics")))
                    .await
                    .unwrap();
                (sample(&text, "kiln_scheduler_workers") == 1.0
                    && text.contains("kiln_scheduler_queued 0"))
                .then_some(())
            }
        })
        .await;

        let (status, body) = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || {
                (
                    get(&format!("{admin}/healthz")),
                    get(&format!("{admin}/readyz")),
                )
            }
        })
        .await
        .unwrap();
        assert_eq!((status.0, status.1.trim()), (200, "ok"));
        assert_eq!((body.0, body.1.trim()), (200, "ready"));
        kiln.stop().await;
    }
}

const CHROMIUM: &str = "/usr/bin/chromium";

// The status page as headless Chromium renders it: the DOM after loading, not just the bytes.
on_every_runtime! {
    async fn status_page_renders_in_a_browser(rt: Runtime) {
        common::ensure_debian_package(CHROMIUM, "chromium");
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start(rt, &dir.path().join("data"));
        let ch = kiln.channel().await;
        let data = pseudo_random(2, 4096);
        let d = digest(Function::Blake3, &data);
        blobs::write(&ch, &write_name("", Function::Blake3, &d), &data, 4096)
            .await
            .unwrap();
        let profile = dir.path().join("chromium-profile");
        let url = format!("{}/status", kiln.admin);
        let output = tokio::task::spawn_blocking(move || {
            Command::new(CHROMIUM)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg("--dump-dom")
                .arg(url)
                .output()
                .expect("run chromium")
        })
        .await
        .unwrap();
        let dom = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(dom.contains("<title>Kiln status</title>"), "{dom}");
        assert!(
            dom.contains("1 blobs, 4.0 KiB"),
            "store fill is shown: {dom}"
        );
        assert!(
            dom.contains(&kiln.addr.to_string()),
            "listener is shown: {dom}"
        );
        assert!(dom.contains("Uptime"), "{dom}");
        assert!(dom.contains("actions running"), "the scheduler row is shown: {dom}");
        assert!(
            dom.contains("<polyline"),
            "throughput chart is inline SVG: {dom}"
        );
        kiln.stop().await;
    }
}
