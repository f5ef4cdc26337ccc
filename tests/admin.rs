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
        let kiln = Kiln::start_on(rt, dir.path()).await;
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
        // The process's own resident memory (what a soak watches), and nothing staged once
        // the upload is stored.
        let rss = sample(&text, "process_resident_memory_bytes");
        assert!(rss > 1e6 && rss < 64e9, "{rss}");
        // The allocator's own view: live bytes (at least the memory tier's copy of the blob)
        // within what it keeps resident.
        let allocated = sample(&text, "kiln_allocator_allocated_bytes");
        let resident = sample(&text, "kiln_allocator_resident_bytes");
        assert!(allocated >= 300_000.0, "{text}");
        assert!(allocated <= resident && resident < 64e9, "{text}");
        // Queued access times: exported, and within their bound (the one commit, or none
        // once the owner's tick wrote it).
        assert!(
            text.contains("\nkiln_cas_pending_access_times ")
                && sample(&text, "kiln_cas_pending_access_times") <= 1.0,
            "{text}"
        );
        assert!(text.contains("kiln_cas_staging_bytes 0"), "{text}");
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
        let kiln = Kiln::start_on(rt, &dir.path().join("data")).await;
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

// With TLS on, the admin listener is HTTPS with the main port's certificate; with [auth], the
// probes stay open, metrics are open to the server's own host, and the status page needs the
// admin role: 401 with a Basic challenge without credentials (a browser then asks), 403 for
// a token without the role, 200 for an admin token (Bearer or Basic) or an admin
// certificate. The admin role cannot be limited to an instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_speaks_tls_and_asks_for_the_admin_role() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let ops = common::kiln_token(&data_dir, &["create", "--name", "ops", "--role", "admin"]);
    let reader = common::kiln_token(
        &data_dir,
        &["create", "--name", "reader", "--role", "cache-read"],
    );
    let scoped = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "token",
            "create",
            "--name",
            "x",
            "--role",
            "admin",
            "--instance",
            "main",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!scoped.status.success());
    let stderr = String::from_utf8_lossy(&scoped.stderr);
    assert!(stderr.contains("whole farm"), "{stderr}");

    let config = "[tls]\nmode = \"auto\"\n[auth]\nenabled = true\n\
                  [[auth.certificates]]\nname = \"ops-cert\"\nroles = [\"admin\"]\n\
                  [[auth.certificates]]\nname = \"someone\"\nroles = [\"cache-read\"]\n";
    let options = common::Options {
        config: Some(config.into()),
        ..common::Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&data_dir, options).await;
    assert!(kiln.admin.starts_with("https://"), "{}", kiln.admin);
    let farm = kiln_tls::farm::Farm::at(data_dir.join("tls"));
    let ca = farm.ca_cert().to_str().unwrap().to_string();
    let mut certs = Vec::new();
    for name in ["ops-cert", "someone"] {
        let (cert, key) = farm
            .issue(&[name.into()], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
            .unwrap();
        let (c, k) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        certs.push((
            c.to_str().unwrap().to_string(),
            k.to_str().unwrap().to_string(),
        ));
    }
    let admin = kiln.admin.clone();
    tokio::task::spawn_blocking(move || {
        let ca = ca.as_str();
        let url = |path: &str| format!("{admin}{path}");
        let with_ca = ["--cacert", ca];
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (code, text) = common::curl(&url(path), &with_ca);
            assert_eq!(code, 200, "{path}: {text}");
        }
        let (code, text) = common::curl(&url("/status"), &with_ca);
        assert_eq!(code, 401, "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{text}"
        );
        let status_with = |extra: &[&str]| {
            let mut args = vec!["--cacert", ca];
            args.extend_from_slice(extra);
            common::curl(&url("/status"), &args)
        };
        let bearer = |token: &str| format!("Authorization: Bearer {token}");
        let (code, text) = status_with(&["-H", &bearer(&reader)]);
        assert_eq!(code, 403, "{text}");
        assert!(
            text.contains("token:reader") && text.contains("admin role"),
            "{text}"
        );
        let (code, text) = status_with(&["-H", &bearer(&ops)]);
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("<html"), "{text}");
        let (code, text) = status_with(&["-u", &format!("me:{ops}")]);
        assert_eq!(code, 200, "Basic with the token as password: {text}");
        let (cert, key) = &certs[0];
        let (code, text) = status_with(&["--cert", cert, "--key", key]);
        assert_eq!(code, 200, "admin certificate: {text}");
        let (cert, key) = &certs[1];
        let (code, text) = status_with(&["--cert", cert, "--key", key]);
        assert_eq!(code, 403, "certificate without the role: {text}");
        // Plain HTTP to the TLS listener gets no page.
        let plain = admin.replacen("https://", "http://", 1);
        let (code, text) = common::curl(&format!("{plain}/healthz"), &[]);
        assert_ne!(code, 200, "{text}");
    })
    .await
    .unwrap();
    kiln.stop().await;
}
