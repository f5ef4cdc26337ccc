//! TLS on the main port against a real `kiln serve`: the farm CA of auto mode (files, `kiln ca
//! export`, blobs and control-plane calls over TLS, the embedded worker's own TLS link, a
//! plain client and a client trusting another CA refused), mutual TLS required, and a
//! certificate rotation on SIGHUP that new connections (TCP and QUIC) see while a stream in
//! flight finishes.

#[macro_use]
mod common;

use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::exec::{code, execute, Spec};
use common::{Kiln, Options};
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::{digest_function::Value as Function, GetCapabilitiesRequest};
use kiln_tls::farm::Farm;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const F: Function = Function::Sha256;

/// A `FindMissingBlobs` over QUIC to `kiln`, trusting `ca`, as `identity`.
async fn works_over_quic(
    kiln: &Kiln,
    ca: &Path,
    identity: (&Path, &Path),
) -> Result<(), tonic::Status> {
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use kiln_proto::reapi::FindMissingBlobsRequest;
    let ch = common::farm::quic_channel(&kiln.addr.to_string(), "127.0.0.1", ca, identity);
    ContentAddressableStorageClient::new(ch)
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![digest(F, b"over quic")],
            digest_function: F as i32,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn start(dir: &Path, options: Options) -> Kiln {
    Kiln::start_async(dir, options).await
}

/// A blob round trip and a control-plane call on `ch`.
async fn works(ch: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    let data = pseudo_random(rand_seed(), 100_000);
    let d = digest(F, &data);
    blobs::write(ch, &write_name("", F, &d), &data, 1 << 14).await?;
    assert_eq!(blobs::read(ch, &read_name("", F, &d), 0, 0).await?, data);
    CapabilitiesClient::new(ch.clone())
        .get_capabilities(GetCapabilitiesRequest::default())
        .await?;
    Ok(())
}

fn rand_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Writes a client certificate issued by `farm` for `name`; returns (cert, key) paths.
fn client_cert(farm: &Farm, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = farm
        .issue(
            &[name.to_string()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
        .unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

on_every_runtime! {
    async fn auto_mode_serves_everything_over_tls(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let options = Options {
            config: Some("[tls]\nmode = \"auto\"\n".into()),
            ..Options::on(rt)
        };
        let kiln = start(&data_dir, options).await;
        let tls_dir = data_dir.join("tls");
        for f in ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"] {
            let mode = std::fs::metadata(tls_dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // `kiln ca export` prints the CA clients need.
        let exported = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["ca", "export", "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(exported.status.success(), "{exported:?}");
        assert_eq!(exported.stdout, std::fs::read(tls_dir.join("ca.pem")).unwrap());
        // Blobs (data plane) and Capabilities (handed to the control plane) over TLS.
        let ch = kiln.tls_channel(&tls_dir.join("ca.pem"), None).await.unwrap();
        works(&ch).await.unwrap();
        // Enrolment is open to anyone (a worker enrols before it has a certificate): nothing
        // larger than a real request (a 64 KiB certificate request) is read.
        let big = kiln_proto::worker::EnrolRequest {
            name: "w".into(),
            token: "t".into(),
            csr_pem: "x".repeat(200 << 10),
        };
        let err = kiln_proto::worker::enrolment_client::EnrolmentClient::new(ch.clone())
            .enrol(big)
            .await
            .unwrap_err();
        assert!(err.message().contains("too large"), "{err:?}");
        // The embedded worker reaches its server over TLS too.
        let (_, r) = execute(&ch, F, &Spec::script("echo over tls").upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        // A plain-text client gets nowhere.
        let plain = async {
            let ch = tonic::transport::Endpoint::from_shared(kiln.url()).unwrap().connect().await?;
            CapabilitiesClient::new(ch)
                .get_capabilities(GetCapabilitiesRequest::default())
                .await
                .map_err(|e| e.to_string())
                .map(|_| ())
                .map_err(|e| -> Box<dyn std::error::Error> { e.into() })?;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        assert!(plain.await.is_err(), "plain HTTP/2 on a TLS port must fail");
        // A client that trusts another CA refuses the server.
        let other = Farm::at(dir.path().join("other"));
        other.ensure(&["localhost".into()]).unwrap();
        assert!(kiln.tls_channel(&other.ca_cert(), None).await.is_err());
        // The metrics count the failed handshakes.
        let ca = data_dir.join("tls/ca.pem");
        let (code, metrics) = common::curl(&format!("{}/metrics", kiln.admin), &["--cacert", ca.to_str().unwrap()]);
        assert_eq!(code, 200, "{metrics}");
        let failures = metrics
            .lines()
            .find(|l| l.starts_with("kiln_tls_handshake_failures_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(failures >= 2.0, "{failures}");
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn mutual_tls_and_rotation_on_sighup(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let first = Farm::at(pki.join("first"));
        first.ensure(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = (pki.join("server.pem"), pki.join("server-key.pem"));
        std::fs::copy(first.server_cert(), &cert).unwrap();
        std::fs::copy(first.server_key(), &key).unwrap();
        let (client, client_key) = client_cert(&first, &pki, "ci");
        let options = Options {
            config: Some(format!(
                "[server]\nquic = true\n[tls]\nmode = \"files\"\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {:?}\nclient_auth = \"required\"\nreload_check_secs = 0\n[worker]\ntls_cert = {client:?}\ntls_key = {client_key:?}\n",
                first.ca_cert()
            )),
            ..Options::on(rt)
        };
        let mut kiln = start(&dir.path().join("data"), options).await;
        let me = (client.as_path(), client_key.as_path());
        works_over_quic(&kiln, &first.ca_cert(), me).await.unwrap();
        // Without a client certificate the handshake (or the first call) fails.
        let anonymous = async {
            let ch = kiln.tls_channel(&first.ca_cert(), None).await.map_err(|e| e.to_string())?;
            works(&ch).await.map_err(|e| e.to_string())
        };
        assert!(anonymous.await.is_err(), "a client certificate is required");
        let ch = kiln
            .tls_channel(&first.ca_cert(), Some((&client, &client_key)))
            .await
            .unwrap();
        works(&ch).await.unwrap();
        // An upload in flight on the old certificate...
        let data = pseudo_random(7, 300_000);
        let d = digest(F, &data);
        let name = write_name("", F, &d);
        let upload = blobs::open_upload(&ch);
        let half = 100_000;
        upload
            .tx
            .send(WriteRequest { resource_name: name.clone(), write_offset: 0, finish_write: false, data: data[..half].to_vec().into() })
            .await
            .unwrap();
        blobs::wait_committed(&ch, &name, half).await;
        // ...while the server's certificate is replaced by one from another CA and SIGHUP
        // reloads it.
        let second = Farm::at(pki.join("second"));
        second.ensure(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::copy(second.server_cert(), &cert).unwrap();
        std::fs::copy(second.server_key(), &key).unwrap();
        kiln.signal(libc::SIGHUP);
        kiln.wait_for_log("TLS certificate reloaded");
        // New connections get the new certificate...
        assert!(kiln.tls_channel(&first.ca_cert(), Some((&client, &client_key))).await.is_err());
        let fresh = kiln
            .tls_channel(&second.ca_cert(), Some((&client, &client_key)))
            .await
            .unwrap();
        works(&fresh).await.unwrap();
        // ...over QUIC too.
        assert!(works_over_quic(&kiln, &first.ca_cert(), me).await.is_err());
        works_over_quic(&kiln, &second.ca_cert(), me).await.unwrap();
        // The embedded worker (with its client certificate) still runs actions.
        let (_, r) = execute(&fresh, F, &Spec::script("true").upload(&fresh, F).await, false)
            .await
            .unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        // ...and the stream in flight finishes on the old one.
        upload
            .tx
            .send(WriteRequest { resource_name: String::new(), write_offset: half as i64, finish_write: true, data: data[half..].to_vec().into() })
            .await
            .unwrap();
        drop(upload.tx);
        let done = upload.call.await.unwrap().unwrap().into_inner();
        assert_eq!(done.committed_size, data.len() as i64);
        assert_eq!(blobs::read(&fresh, &read_name("", F, &d), 0, 0).await.unwrap(), data);
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn a_worker_joins_over_mutual_tls(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let options = Options {
            config: Some(concat!(
                "[tls]\nmode = \"auto\"\nclient_auth = \"required\"\n[worker]\nembedded = false\n",
                "[auth]\nenabled = true\n",
                "[[auth.certificates]]\nname = \"mac-*\"\nroles = [\"worker\", \"cache-read\", \"cache-write\"]\n",
                "[[auth.certificates]]\nname = \"client\"\nroles = [\"cache-read\", \"cache-write\", \"execute\"]\n",
            ).into()),
            ..Options::on(rt)
        };
        let kiln = start(&data_dir, options).await;
        let farm = Farm::at(data_dir.join("tls"));
        let (cert, key) = client_cert(&farm, dir.path(), "mac-1");
        // The worker's certificate holds worker and cache roles, never ac-write: results reach
        // the action cache only through the scheduler.
        let as_worker = kiln.tls_channel(&farm.ca_cert(), Some((&cert, &key))).await.unwrap();
        let e = kiln_proto::reapi::action_cache_client::ActionCacheClient::new(as_worker)
            .update_action_result(kiln_proto::reapi::UpdateActionResultRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("cert:mac-1"), "{e:?}");
        let url = format!("grpcs://{}", kiln.addr);
        let (wdir, ca) = (dir.path().join("w"), farm.ca_cert());
        let _worker = tokio::task::spawn_blocking(move || {
            let args = ["--tls-ca", ca.to_str().unwrap(), "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
            common::exec::Worker::start_for(&url, rt, &wdir, "mac-1", &args)
        })
        .await
        .unwrap();
        let (cert, key) = client_cert(&farm, dir.path(), "client");
        let ch = kiln.tls_channel(&farm.ca_cert(), Some((&cert, &key))).await.unwrap();
        let spec = Spec { outputs: vec!["out".into()], ..Spec::script("echo remote > out") };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        assert_eq!(r.execution_metadata.unwrap().worker, "mac-1");
        assert_eq!(blobs::read(&ch, &read_name("", F, r.output_files[0].digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"remote\n");
        kiln.stop().await;
    }
}

/// Client certificates required, auto mode: kiln-bench measures the endpoint with its own
/// certificate, and the embedded worker, which the farm CA gives one in memory, runs actions.
#[tokio::test]
async fn kiln_bench_and_the_embedded_worker_under_required_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let options = Options {
        config: Some("[tls]\nmode = \"auto\"\nclient_auth = \"required\"\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = start(&data_dir, options).await;
    let farm = Farm::at(data_dir.join("tls"));
    let (cert, key) = client_cert(&farm, dir.path(), "bench");
    let line = format!(
        "kiln-bench write --size 64KiB --ops 20 --connections 2 --concurrency 4 --endpoint grpcs://{} --tls-ca {} --tls-cert {} --tls-key {}",
        kiln.addr,
        farm.ca_cert().display(),
        cert.display(),
        key.display()
    );
    use clap::Parser;
    let args = kiln_bench::Args::parse_from(line.split_whitespace());
    let report = kiln_bench::run(args)
        .await
        .expect("bench over TLS")
        .remove(0);
    let write = report.results.iter().find(|r| r.kind == "write").unwrap();
    assert_eq!((write.ops, write.errors), (20, 0), "{write:?}");
    // Without the client certificate it cannot connect.
    let line = format!(
        "kiln-bench write --ops 1 --endpoint grpcs://{} --tls-ca {}",
        kiln.addr,
        farm.ca_cert().display()
    );
    assert!(
        kiln_bench::run(kiln_bench::Args::parse_from(line.split_whitespace()))
            .await
            .is_err()
    );
    let ch = kiln
        .tls_channel(&farm.ca_cert(), Some((&cert, &key)))
        .await
        .unwrap();
    let (_, r) = execute(&ch, F, &Spec::script("true").upload(&ch, F).await, false)
        .await
        .unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    kiln.stop().await;
}

/// `kiln serve` on a non-loopback address in the clear, or with TLS but no authentication
/// (no [auth], client certificates not required), or with its admin listener off loopback
/// under the same conditions, refuses to start unless told `--insecure`; so does a worker's local CAS
/// or its admin listener off loopback. Nothing is bound: they stop first.
#[test]
fn serving_unauthenticated_off_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls_only = dir.path().join("tls-only.toml");
    std::fs::write(&tls_only, "[tls]\nmode = \"auto\"\n").unwrap();
    let tls = tls_only.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            "without TLS",
        ),
        (
            vec![
                "serve",
                "--config",
                tls,
                "--listen",
                "0.0.0.0:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            "unauthenticated",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "0.0.0.0:0",
            ],
            "admin listener",
        ),
        (
            vec![
                "serve",
                "--config",
                tls,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "0.0.0.0:0",
            ],
            "the admin listener 0.0.0.0:0 to unauthenticated callers",
        ),
        (
            vec![
                "worker",
                "--scheduler",
                "grpc://127.0.0.1:1",
                "--listen",
                "0.0.0.0:0",
            ],
            "local CAS",
        ),
        (
            vec![
                "worker",
                "--scheduler",
                "grpc://127.0.0.1:1",
                "--admin-listen",
                "0.0.0.0:0",
            ],
            "worker's metrics",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .arg(if args[0] == "serve" {
                "--data-dir"
            } else {
                "--cas-dir"
            })
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("refusing to serve") && err.contains(needle) && err.contains("--insecure"),
            "{args:?}: {err}"
        );
    }
}

fn kiln_command(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

// One command per worker: `kiln worker --join TOKEN` pins the farm CA by the token's
// fingerprint, gets a client certificate for a CSR, and runs actions with it (the enrolled
// certificate carries the worker role); the token cannot be used twice; `kiln worker revoke`
// closes the worker's session at once.
on_every_runtime! {
    async fn a_worker_joins_with_a_token_and_is_revoked(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let options = Options {
            config: Some(concat!(
                "[tls]\nmode = \"auto\"\n[worker]\nembedded = false\n",
                "[auth]\nenabled = true\nanonymous_roles = [\"execute\", \"cache-read\", \"cache-write\"]\n",
            ).into()),
            ..Options::on(rt)
        };
        let mut kiln = start(&data_dir, options).await;
        let data = data_dir.to_str().unwrap().to_string();
        let addr = kiln.addr.to_string();
        let made = kiln_command(&["join-token", "create", "--ttl", "10m", "--server-address", &addr, "--data-dir", &data]);
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let token = String::from_utf8(made.stdout).unwrap().trim().to_string();
        assert!(token.starts_with(&format!("kiln-join/v1/{addr}/")), "{token}");
        let (wdir, url, t) = (dir.path().join("w"), format!("grpcs://{addr}"), token.clone());
        let worker = tokio::task::spawn_blocking(move || {
            common::exec::Worker::start_for(&url, rt, &wdir, "mac-9", &["--join", &t])
        })
        .await
        .unwrap();
        // The server knows the new worker before it answers the enrolment: the first session
        // is accepted, not refused until a periodic reload.
        assert!(
            !worker.start_log.iter().any(|l| l.contains("session with the scheduler failed")),
            "{:#?}",
            worker.start_log
        );
        let identity = dir.path().join("w/cas/identity");
        for f in ["cert.pem", "key.pem", "ca.pem"] {
            let mode = std::fs::metadata(identity.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let ch = kiln.tls_channel(&data_dir.join("tls/ca.pem"), None).await.unwrap();
        let (_, r) = execute(&ch, F, &Spec::script("echo joined").upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        assert_eq!(r.result.unwrap().execution_metadata.unwrap().worker, "mac-9");
        // After a restart it uses the stored certificate: no token needed.
        drop(worker);
        let (wdir, url) = (dir.path().join("w"), format!("grpcs://{addr}"));
        let _worker = tokio::task::spawn_blocking(move || {
            common::exec::Worker::start_for(&url, rt, &wdir, "mac-9", &[])
        })
        .await
        .unwrap();
        let (_, r) = execute(&ch, F, &Spec::script("echo again").upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        // Single use.
        let other = dir.path().join("other");
        let again = kiln_command(&[
            "worker", "--join", &token, "--name", "mac-10", "--listen", "127.0.0.1:0",
            "--cas-dir", other.join("cas").to_str().unwrap(), "--work-dir", other.join("work").to_str().unwrap(),
        ]);
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("used already"), "{}", String::from_utf8_lossy(&again.stderr));
        // Revoked: the session is closed within a second.
        let revoked = kiln_command(&["worker", "revoke", "mac-9", "--data-dir", &data]);
        assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
        kiln.wait_for_log("credential revoked; closing the worker's session");
        kiln.stop().await;
    }
}
