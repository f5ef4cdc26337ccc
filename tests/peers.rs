//! Blobs shared between workers, end to end: `kiln serve` (its embedded worker off) and two
//! `kiln worker` processes on 127.0.0.1, each serving its CAS to the other, on every
//! data-plane backend. The workers' platform properties decide which one runs an action.

#[macro_use]
mod common;

use common::exec::{code, execute, start_server, start_worker, worker_of, Spec, Tree, Worker};
use common::metric_or_zero as number;
use kiln_proto::reapi::digest_function::Value as Function;
use std::path::Path;

const F: Function = Function::Sha256;

/// A worker in pool `pool` with `config` as its `[worker]` settings (dircache off, so every
/// input is fetched); returns it and its admin address.
async fn worker(
    rt: common::Runtime,
    kiln: &common::Kiln,
    dir: &Path,
    name: &str,
    pool: &str,
    config: &str,
) -> (Worker, String) {
    let wdir = dir.join(name);
    std::fs::create_dir_all(&wdir).unwrap();
    let file = wdir.join("worker.toml");
    std::fs::write(&file, format!("[worker]\ndircache_bytes = 0\n{config}")).unwrap();
    let property = format!("pool={pool}");
    let w = start_worker(
        rt,
        kiln,
        &wdir,
        name,
        &pool_args(file.to_str().unwrap(), &property),
    )
    .await;
    let admin = w.admin();
    (w, admin)
}

/// A worker's arguments: its config file, a pool property, one action at a time, and an
/// admin listener.
fn pool_args<'a>(config: &'a str, property: &'a str) -> [&'a str; 8] {
    [
        "--config",
        config,
        "--property",
        property,
        "--max-inflight",
        "1",
        "--admin-listen",
        "127.0.0.1:0",
    ]
}

/// Input files: one large enough to be streamed to a file (over 256 KiB), and small ones
/// that travel in batches. Returns the tree and its files' total size.
fn inputs(tag: &str) -> (Tree, u64) {
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ tag.as_bytes()[0])
        .collect();
    let mut tree = Tree::default().file("big", &big, false);
    let mut bytes = big.len() as u64;
    for i in 0..20 {
        let small = format!("{tag} small file {i}\n").repeat(i + 1);
        bytes += small.len() as u64;
        tree = tree.file(&format!("small/{i:02}"), small.as_bytes(), false);
    }
    (tree, bytes)
}

fn run_on(pool: &str, tree: &Tree, salt: &str) -> Spec {
    Spec {
        tree: tree.clone(),
        platform: vec![("pool".into(), pool.into())],
        ..Spec::script(&format!("cat big small/* | wc -c; echo {salt}"))
    }
}

/// Waits until the scheduler knows of at least `facts` blobs held by workers.
async fn facts_known(admin: &str, facts: f64) {
    common::eventually("the workers' reports of what they hold", || async move {
        (number(admin, "kiln_scheduler_blob_facts").await >= facts).then_some(())
    })
    .await;
}

// A blob one worker holds reaches another worker from that worker, not from the server: w1
// runs an action first and so holds its inputs; the same inputs for w2 come from w1 (its
// served-bytes counter moves; the server sends no file of them). Both workers' admin
// listeners and the server's /metrics and /status say so. The race delay is long here, so
// that a slow machine never sends w2 to the server while w1 is healthy.
on_every_runtime! {
    async fn an_input_one_worker_holds_reaches_another_from_that_worker(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let patient = "peer_race_delay_ms = 60000\n";
        let (_w1, admin1) = worker(rt, &kiln, dir.path(), "w1", "a", patient).await;
        let (_w2, admin2) = worker(rt, &kiln, dir.path(), "w2", "b", patient).await;
        let ch = kiln.channel().await;
        let (tree, bytes) = inputs("x");
        let (_, r) = execute(&ch, F, &run_on("a", &tree, "one").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        let first = number(&admin1, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64;
        assert!(first >= bytes, "w1 fetched {first} of {bytes} bytes from the server");
        facts_known(&kiln.admin, 23.0).await;
        let read_before = number(&kiln.admin, "kiln_sent_bytes_total{method=\"ByteStream.Read\"}").await;
        let batch_before = number(&kiln.admin, "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}").await;

        let (_, r) = execute(&ch, F, &run_on("b", &tree, "two").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let out = common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
        assert_eq!(out, format!("{bytes}\ntwo\n").into_bytes());
        assert_eq!(number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await as u64, bytes, "every input file from w1");
        assert_eq!(number(&admin2, "kiln_worker_peer_failures_total").await, 0.0);
        let served = number(&admin1, "kiln_worker_served_bytes_total").await as u64;
        assert!(served >= bytes, "w1 served {served} of {bytes} bytes");
        let read_after = number(&kiln.admin, "kiln_sent_bytes_total{method=\"ByteStream.Read\"}").await;
        assert!(read_after - read_before < (1 << 20) as f64, "the server streamed the large input again: {read_before} -> {read_after}");
        // Only w2's Directory blobs came from the server: far less than the small files.
        let batch_after = number(&kiln.admin, "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}").await;
        assert!(batch_after - batch_before < 4096.0, "{batch_before} -> {batch_after}");

        // The server exports what the workers report, and shows it.
        common::eventually("w2's report of its transfers", || {
            let admin = kiln.admin.clone();
            async move {
                let peer = number(&admin, "kiln_worker_fetch_bytes_total{worker=\"w2\",source=\"peer\"}").await;
                let served = number(&admin, "kiln_worker_served_bytes_total{worker=\"w1\"}").await;
                (peer as u64 == bytes && served as u64 >= bytes).then_some(())
            }
        })
        .await;
        let (_, status) = common::curl(&format!("{}/status", kiln.admin), &[]);
        assert!(status.contains("id=\"workers\"") && status.contains("<th>w2</th>"), "{status}");
        assert!(status.contains("3.0 MiB from peers"), "{status}");
        kiln.stop().await;
    }
}

// A peer that stops answering (here: stopped with SIGSTOP while it is still connected, so
// the scheduler still names it) costs the worker the race delay, not the action: the server
// is asked too, its copy wins, and the peer's request is cancelled.
on_every_runtime! {
    async fn a_stalled_peer_leaves_the_worker_to_the_server(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let (w1, _) = worker(rt, &kiln, dir.path(), "w1", "a", "").await;
        // A delay no fetch on this host comes near, so that the fetch's length shows w2 asked
        // (and waited for) w1 before the server.
        let (_w2, admin2) = worker(rt, &kiln, dir.path(), "w2", "b", "peer_race_delay_ms = 1500\n").await;
        let ch = kiln.channel().await;
        let (tree, bytes) = inputs("y");
        let (_, r) = execute(&ch, F, &run_on("a", &tree, "one").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        facts_known(&kiln.admin, 23.0).await;
        let action = run_on("b", &tree, "two").upload(&ch, F).await;
        w1.signal(libc::SIGSTOP);
        let result = execute(&ch, F, &action, false).await;
        w1.signal(libc::SIGCONT);
        let (_, r) = result.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let from_server = number(&admin2, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64;
        assert!(from_server >= bytes, "{from_server} of {bytes} bytes from the server");
        assert_eq!(number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await, 0.0);
        let meta = r.result.unwrap().execution_metadata.unwrap();
        let at = |t: Option<prost_types::Timestamp>| {
            let t = t.unwrap();
            t.seconds as f64 + f64::from(t.nanos) / 1e9
        };
        let fetch = at(meta.input_fetch_completed_timestamp) - at(meta.input_fetch_start_timestamp);
        assert!(fetch >= 1.5, "w2 waited {fetch:.3} s: it was not hinted to ask w1 first");
        kiln.stop().await;
    }
}

/// A TLS channel to `addr` checking its certificate for `name` against the CA in `ca`,
/// presenting `identity` (certificate and key files) if given.
async fn tls_channel(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    kiln_tls::install_provider();
    let identity =
        identity.map(|(c, k)| kiln_tls::client::ClientIdentity::from_files(c, k).unwrap());
    let trust = kiln_tls::client::Trust::ca_file(ca).unwrap();
    let config = kiln_tls::client::config(trust, identity).unwrap();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(kiln_tls::client::Connector::for_name(config, name))
        .await
}

/// The worker CAS at `addr` over QUIC, checking its certificate for `name` against the CA in
/// `ca` and presenting `cert` and `key` (one connection, made at the first call).
fn quic_cas(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: (&Path, &Path),
) -> kiln_worker::remote::RemoteCas {
    let channel = quic_channel(addr, name, ca, identity);
    kiln_worker::remote::RemoteCas::new(kiln_worker::remote::CasLinks::single(channel))
}

/// A gRPC channel to `addr` over QUIC, as [`quic_cas`] makes it.
fn quic_channel(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: (&Path, &Path),
) -> kiln_worker::link::LinkChannel {
    quic_link(addr, name, ca, identity).0
}

/// [`quic_channel`], and the QUIC connection under it.
fn quic_link(
    addr: &str,
    name: &str,
    ca: &Path,
    (cert, key): (&Path, &Path),
) -> (
    kiln_worker::link::LinkChannel,
    std::sync::Arc<kiln_worker::quic::connect::QuicPeer>,
) {
    kiln_tls::install_provider();
    let identity = kiln_tls::client::ClientIdentity::from_files(cert, key).unwrap();
    let trust = kiln_tls::client::Trust::ca_file(ca).unwrap();
    let config = kiln_tls::client::config(trust, Some(identity)).unwrap();
    let endpoint = kiln_worker::quic::client_endpoint(&config).unwrap();
    let peer = kiln_worker::quic::connect::QuicPeer::new(
        endpoint,
        addr.parse().unwrap(),
        name,
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(30),
    );
    let link = kiln_worker::link::Link::new(&format!("grpc://{addr}"), None).unwrap();
    let channel = link.connect_lazy_via(kiln_worker::quic::connect::QuicConnector(peer.clone()));
    (channel, peer)
}

/// Reads `digest` from `cas`: the blob, `None` if the worker does not hold it, or why the
/// read failed.
async fn quic_read(
    cas: &kiln_worker::remote::RemoteCas,
    digest: &kiln_proto::reapi::Digest,
) -> Result<Option<Vec<u8>>, String> {
    use kiln_reapi::cas::Cas;
    let digest = kiln_reapi::digest::Digest::from_proto(digest, F as i32).unwrap();
    let got = cas
        .read_blobs(
            &kiln_reapi::digest::InstanceName::default_instance(),
            &[digest],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(got.into_iter().next().flatten().map(|b| b.to_vec()))
}

/// A farm with TLS (`mode = "auto"`) and authorization, `kiln serve`'s data in `dir/server`,
/// and a worker enrolled with a join token for each (name, pool, more `[worker]` settings).
async fn enrolled_farm<const N: usize>(
    rt: common::Runtime,
    dir: &Path,
    server: &str,
    workers: [(&'static str, &'static str, &'static str); N],
) -> (common::Kiln, Vec<Worker>) {
    let data = dir.join("server");
    let options = common::Options {
        config: Some(format!(
            "[server]\n{server}\n{}",
            concat!(
                "[tls]\nmode = \"auto\"\n[worker]\nembedded = false\n",
                "[execution]\nkeepalive_secs = 1\n",
                "[auth]\nenabled = true\nanonymous_roles = [\"execute\", \"cache-read\", \"cache-write\"]\n",
            )
        )),
        ..common::Options::on(rt)
    };
    let kiln = common::Kiln::start_async(&data, options).await;
    let url = format!("grpcs://{}", kiln.addr);
    let mut started = Vec::new();
    for (name, pool, more) in workers {
        let token = kiln.join_token(&data);
        let (url, wdir, property) = (url.clone(), dir.join(name), format!("pool={pool}"));
        let w = tokio::task::spawn_blocking(move || {
            let config = wdir.join("worker.toml");
            std::fs::create_dir_all(&wdir).unwrap();
            std::fs::write(&config, format!("[worker]\ndircache_bytes = 0\n{more}")).unwrap();
            let mut args = vec!["--join", &token];
            args.extend(pool_args(config.to_str().unwrap(), &property));
            Worker::start_for(&url, rt, &wdir, name, &args)
        })
        .await
        .unwrap();
        started.push(w);
    }
    (kiln, started)
}

/// Where worker `w` serves its CAS, as it logged it.
fn cas_address(w: &Worker) -> String {
    w.start_log
        .iter()
        .find_map(|l| l.split("local CAS on ").nth(1)?.split_whitespace().next())
        .expect("the worker logs its CAS address")
        .to_string()
}

/// Waits until the scheduler knows of at least `facts` blobs held by `worker`.
async fn facts_known_over_tls(kiln: &common::Kiln, ca: &Path, worker: &str, facts: f64) {
    let metric = format!("kiln_worker_held_blobs{{worker=\"{worker}\"}} ");
    common::eventually("a worker's reports of what it holds", || {
        let metric = metric.clone();
        async move { (kiln.metric_over_tls(ca, &[&metric]).await >= facts).then_some(()) }
    })
    .await;
}

// QUIC falls back to TCP by itself: w1 serves its CAS over TCP only (`peer_transport =
// "tcp"`: nothing listens on its UDP port), w2 tries QUIC first (`both`). w2 asks w1 over TCP
// while its QUIC handshake runs (in the background, failing after
// `peer_quic_connect_timeout_ms`) and afterwards, within the cooldown: both fetches come
// from w1 over TCP, none is lost to the server, and w1 is not counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_reachable_over_udp_is_reached_over_tcp() {
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let (kiln, workers) = enrolled_farm(
        rt,
        dir.path(),
        "",
        [
            ("w1", "a", "peer_transport = \"tcp\"\npeer_race_delay_ms = 60000\n"),
            ("w2", "b", "peer_transport = \"both\"\npeer_quic_connect_timeout_ms = 300\npeer_race_delay_ms = 60000\n"),
        ],
    )
    .await;
    let ca = dir.path().join("server/tls/ca.pem");
    let admin2 = workers[1].admin();
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    let peer_bytes = || number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}");
    let mut known = 0.0;
    for (tag, first) in [("u", true), ("v", false)] {
        let (tree, bytes) = inputs(tag);
        let (_, r) = execute(&ch, F, &run_on("a", &tree, tag).upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        known += 23.0;
        facts_known_over_tls(&kiln, &ca, "w1", known).await;
        let before = peer_bytes().await as u64;
        let (_, r) = execute(&ch, F, &run_on("b", &tree, tag).upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let from_peer = peer_bytes().await as u64 - before;
        assert_eq!(from_peer, bytes, "from w1 over TCP (first run: {first})");
    }
    assert_eq!(
        number(&admin2, "kiln_worker_fetch_quic_bytes_total").await,
        0.0
    );
    assert_eq!(
        number(&admin2, "kiln_worker_peer_failures_total").await,
        0.0,
        "w1 was not set aside"
    );
    kiln.stop().await;
}

// With `peer_transport = "both"` on both workers, w2's first fetch from w1 goes over TCP
// while its QUIC connection to w1 is dialled in the background; the next goes over QUIC.
// Nothing is lost to the server on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_both_link_moves_to_quic_once_the_connection_is_up() {
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let both = "peer_transport = \"both\"\npeer_race_delay_ms = 60000\n";
    let (kiln, workers) =
        enrolled_farm(rt, dir.path(), "", [("w1", "a", both), ("w2", "b", both)]).await;
    let ca = dir.path().join("server/tls/ca.pem");
    let admin2 = workers[1].admin();
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    let (mut held, mut fetched) = (0.0, 0);
    for tag in ["m", "n"] {
        let (tree, bytes) = inputs(tag);
        let (_, r) = execute(&ch, F, &run_on("a", &tree, tag).upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        held += 23.0;
        facts_known_over_tls(&kiln, &ca, "w1", held).await;
        let quic_before = number(&admin2, "kiln_worker_fetch_quic_bytes_total").await as u64;
        let (_, r) = execute(&ch, F, &run_on("b", &tree, tag).upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        fetched += bytes;
        assert_eq!(
            number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await as u64,
            fetched,
            "all from w1"
        );
        if tag == "n" {
            let over_quic =
                number(&admin2, "kiln_worker_fetch_quic_bytes_total").await as u64 - quic_before;
            assert_eq!(over_quic, bytes, "the second fetch over QUIC");
        }
    }
    assert_eq!(
        number(&admin2, "kiln_worker_peer_failures_total").await,
        0.0
    );
    kiln.stop().await;
}

// Workers read blobs from and upload them to the server over QUIC when both say so:
// `server.quic`, and w1 with `server_transport = "quic"` (QUIC only: had QUIC not carried
// them, its fetch or upload would fail) runs an action whose inputs it fetches from the server
// and whose outputs (a 6 MiB file, streamed, and its stdout, in a batch) it uploads: the
// server's TCP data plane sends it none of its inputs and receives none of its outputs. w2
// with `"both"` against the same server runs too (over TCP while its QUIC connection comes
// up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_read_from_and_upload_to_the_server_over_quic() {
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let (kiln, workers) = enrolled_farm(
        rt,
        dir.path(),
        "quic = true",
        [
            ("w1", "a", "server_transport = \"quic\"\n"),
            ("w2", "b", "server_transport = \"both\"\n"),
        ],
    )
    .await;
    let ca = dir.path().join("server/tls/ca.pem");
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    // What the server's data plane (TCP) sent of blobs read.
    let tcp_reads = &[
        "kiln_sent_bytes_total{method=\"ByteStream.Read\"}",
        "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}",
    ];
    // What it received of blobs uploaded.
    let tcp_uploads = &[
        "kiln_received_bytes_total{method=\"ByteStream.Write\"}",
        "kiln_received_bytes_total{method=\"CAS.BatchUpdateBlobs\"}",
    ];
    // w2 (`both`) may read over TCP while its QUIC connection comes up: only w1's runs are
    // checked for the transport.
    let runs = [
        ("a", 0, "q", true),
        ("b", 1, "r", false),
        ("a", 0, "s", true),
    ];
    for (pool, i, tag, checked) in runs {
        let worker = ["w1", "w2"][i];
        let (tree, bytes) = inputs(tag);
        let run = run_on(pool, &tree, tag);
        let spec = Spec {
            outputs: vec!["copy".into()],
            script: format!("cat big big > copy; {}", run.script),
            ..run
        }
        .upload(&ch, F)
        .await;
        let before = kiln.metric_over_tls(&ca, tcp_reads).await;
        let quic_before = kiln
            .metric_over_tls(&ca, &["kiln_quic_sent_bytes_total{"])
            .await;
        let uploads_before = kiln.metric_over_tls(&ca, tcp_uploads).await;
        let quic_uploads_before = kiln
            .metric_over_tls(&ca, &["kiln_quic_received_bytes_total{"])
            .await;
        let (_, r) = execute(&ch, F, &spec, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, worker), "{r:?}");
        let over_tcp = kiln.metric_over_tls(&ca, tcp_reads).await - before;
        let over_quic = kiln
            .metric_over_tls(&ca, &["kiln_quic_sent_bytes_total{"])
            .await
            - quic_before;
        assert!(
            !checked || (over_tcp < bytes as f64 && over_quic >= bytes as f64),
            "{worker}'s inputs came over QUIC ({over_quic} bytes), not TCP ({over_tcp} bytes)"
        );
        let up_tcp = kiln.metric_over_tls(&ca, tcp_uploads).await - uploads_before;
        let up_quic = kiln
            .metric_over_tls(&ca, &["kiln_quic_received_bytes_total{"])
            .await
            - quic_uploads_before;
        let copy_bytes = 6u64 << 20;
        assert!(
            !checked || (up_tcp == 0.0 && up_quic > copy_bytes as f64),
            "{worker}'s outputs went over QUIC ({up_quic} bytes), not TCP ({up_tcp} bytes)"
        );
        let copy = r.result.as_ref().unwrap().output_files[0]
            .digest
            .clone()
            .unwrap();
        assert_eq!(copy.size_bytes as u64, copy_bytes);
        let got = common::blobs::read(&ch, &common::blobs::read_name("", F, &copy), 0, 0)
            .await
            .unwrap();
        assert_eq!(
            common::blobs::digest(F, &got),
            copy,
            "the streamed output was stored whole"
        );
        let fetched = number(
            &workers[i].admin(),
            "kiln_worker_fetch_bytes_total{source=\"server\"}",
        )
        .await;
        assert!(
            fetched >= bytes as f64,
            "{worker} fetched its inputs from the server"
        );
        let stdout = r.result.as_ref().unwrap().stdout_digest.as_ref().unwrap();
        let out = common::blobs::read(&ch, &common::blobs::read_name("", F, stdout), 0, 0)
            .await
            .unwrap();
        assert_eq!(
            out,
            format!("{bytes}\n{tag}\n").into_bytes(),
            "the output was uploaded"
        );
    }
    kiln.stop().await;
}

// On a farm with TLS (`mode = "auto"`) and enrolled workers, peers serve their CAS over
// mutual TLS with their enrolment certificates: w2 gets w1's inputs from w1 over QUIC
// (`peer_transport = "quic"`), and
// w1's CAS answers only a caller with a certificate from the farm CA — not plain gRPC, not
// TLS without a client certificate — and, once w2 is revoked, refuses w2 over TCP and QUIC.
on_every_runtime! {
    async fn enrolled_workers_share_inputs_over_mutual_tls(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        // QUIC only: every fetch from a peer waits for the handshake, none goes over TCP.
        let config = "peer_race_delay_ms = 60000\npeer_transport = \"quic\"\n";
        let (kiln, workers) = enrolled_farm(rt, dir.path(), "", [("w1", "a", config), ("w2", "b", config)]).await;
        let data = dir.path().join("server");
        let ca = data.join("tls/ca.pem");
        let (admin1, admin2) = (workers[0].admin(), workers[1].admin());
        let ch = kiln.tls_channel(&ca, None).await.unwrap();
        let (tree, bytes) = inputs("t");
        let (_, r) = execute(&ch, F, &run_on("a", &tree, "one").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        facts_known_over_tls(&kiln, &ca, "w1", 23.0).await;
        let (_, r) = execute(&ch, F, &run_on("b", &tree, "two").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        assert_eq!(number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await as u64, bytes);
        assert_eq!(number(&admin2, "kiln_worker_fetch_quic_bytes_total").await as u64, bytes, "over QUIC");
        assert!(number(&admin1, "kiln_worker_served_bytes_total").await as u64 >= bytes);

        // w1's CAS, as a stranger sees it.
        let cas = cas_address(&workers[0]);
        let small = common::blobs::digest(F, b"t small file 0\n");
        let name = common::blobs::read_name("", F, &small);
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{cas}")).unwrap().connect().await;
        if let Ok(plain) = plain {
            assert!(common::blobs::read(&plain, &name, 0, 0).await.is_err(), "plain gRPC is refused");
        }
        if let Ok(anonymous) = tls_channel(&cas, "w1.peer.kiln.invalid", &ca, None).await {
            let read = common::blobs::read(&anonymous, &name, 0, 0).await;
            assert!(read.is_err(), "TLS without a certificate is refused");
        }
        let farm = kiln_tls::farm::Farm::at(data.join("tls"));
        let (cert, key) = farm.issue(&["someone".to_string()], rcgen::ExtendedKeyUsagePurpose::ClientAuth).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        let member = tls_channel(&cas, "w1.peer.kiln.invalid", &ca, Some((&c, &k))).await.unwrap();
        assert_eq!(common::blobs::read(&member, &name, 0, 0).await.unwrap(), b"t small file 0\n");

        // w2 is revoked: the scheduler tells w1, whose CAS then refuses w2's certificate.
        let identity = dir.path().join("w2/cas/identity");
        let (w2_cert, w2_key) = (identity.join("cert.pem"), identity.join("key.pem"));
        let as_w2 = || async {
            let ch = tls_channel(&cas, "w1.peer.kiln.invalid", &ca, Some((&w2_cert, &w2_key))).await.ok()?;
            Some(common::blobs::read(&ch, &name, 0, 0).await)
        };
        assert!(matches!(as_w2().await, Some(Ok(_))), "w2 reads from w1 while enrolled");
        // Over QUIC too, on a connection kept open across the revocation.
        let w2_quic = quic_cas(&cas, "w1.peer.kiln.invalid", &ca, (&w2_cert, &w2_key));
        assert_eq!(quic_read(&w2_quic, &small).await, Ok(Some(b"t small file 0\n".to_vec())), "and over QUIC");
        let revoked = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["worker", "revoke", "w2", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
        common::eventually("w1 to refuse w2's certificate", || async {
            match as_w2().await {
                Some(Ok(_)) => None,
                _ => Some(()),
            }
        })
        .await;
        let refused = quic_read(&w2_quic, &small).await;
        assert!(refused.is_err(), "refused over QUIC too, on the open connection: {refused:?}");
        let fresh = quic_cas(&cas, "w1.peer.kiln.invalid", &ca, (&w2_cert, &w2_key));
        assert!(quic_read(&fresh, &small).await.is_err(), "and on a new one");
        // Other farm members still read.
        assert!(common::blobs::read(&member, &name, 0, 0).await.is_ok());
        // w1 keeps the list for its next start (refused even before its session opens).
        let kept = std::fs::read_to_string(dir.path().join("w1/cas/identity/revoked-peers")).unwrap();
        let w2_fingerprint = kiln_tls::pem::fingerprint(&kiln_tls::pem::certificates(&w2_cert).unwrap()[0]);
        assert_eq!(kept.lines().collect::<Vec<_>>(), vec![w2_fingerprint.as_str()]);
        kiln.stop().await;
    }
}

// An action that must wait for the only worker has its inputs fetched ahead by that worker
// while it runs the action before it, and then runs there without fetching them again.
on_every_runtime! {
    async fn a_waiting_action_has_its_inputs_fetched_while_the_worker_is_busy(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let (_w, admin) = worker(rt, &kiln, dir.path(), "w1", "a", "").await;
        let ch = kiln.channel().await;
        let (flag, started) = (dir.path().join("flag"), dir.path().join("started"));
        let hold = Spec {
            platform: vec![("pool".into(), "a".into())],
            ..Spec::script(&format!("touch {}; while [ ! -e {} ]; do sleep 0.02; done", started.display(), flag.display()))
        };
        let hold = hold.upload(&ch, F).await;
        let held = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &hold, false).await }) };
        common::eventually("the holding action to start", || async { started.exists().then_some(()) }).await;
        let from_server = || async { number(&admin, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64 };
        let before = from_server().await;
        let (tree, bytes) = inputs("p");
        let waiting = run_on("a", &tree, "later").upload(&ch, F).await;
        let later = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &waiting, false).await }) };
        // Fetched while the worker is still busy with the first action.
        common::eventually("the waiting action's inputs to be fetched ahead", || async {
            (from_server().await >= before + bytes).then_some(())
        })
        .await;
        assert!(!held.is_finished());
        let fetched_ahead = from_server().await;
        std::fs::write(&flag, b"").unwrap();
        let (_, r) = held.await.unwrap().unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let (_, r) = later.await.unwrap().unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        let out = common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
        assert_eq!(out, format!("{bytes}\nlater\n").into_bytes());
        assert!(from_server().await < fetched_ahead + 4096, "no input fetched twice (only Directory blobs)");
        let placed = number(&kiln.admin, "kiln_scheduler_placements_total{reason=\"prefetched\"}").await;
        assert_eq!(placed, 1.0);
        kiln.stop().await;
    }
}

// Uploads over QUIC (`server.quic`) are held to the data plane's rules: bytes that do not
// hash to the digest, data past its size, a gap in the offsets, a stream that ends without
// `finish_write`, each refused with INVALID_ARGUMENT and nothing stored or left in the temp
// directory; a compressed upload is for TCP (UNIMPLEMENTED); a blob larger than the CAS is
// INVALID_ARGUMENT, and one that does not fit beside the uploads in progress
// RESOURCE_EXHAUSTED until they end; an upload that stalls is ended (DEADLINE_EXCEEDED); a
// caller without the role is refused; a good upload is stored and readable over TCP, and
// QueryWriteStatus says so; a batch answers each entry on its own. The server agrees to
// uploads in the QUIC handshake (ALPN `kiln-cas/2`); a worker's CAS does not, and takes no
// upload from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_quic_are_checked_and_a_peer_takes_none() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
    use tonic::Code;
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let (kiln, workers) = enrolled_farm(
        rt,
        dir.path(),
        "quic = true\nstalled_upload_secs = 1\n[storage]\ndisk_bytes = \"8 MiB\"",
        [("w1", "a", "peer_transport = \"quic\"\n")],
    )
    .await;
    let ca = dir.path().join("server/tls/ca.pem");
    let identity = dir.path().join("w1/cas/identity");
    let me = (identity.join("cert.pem"), identity.join("key.pem"));
    let me = (me.0.as_path(), me.1.as_path());
    let (server, server_link) = quic_link(&kiln.addr.to_string(), "127.0.0.1", &ca, me);
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    let write = |channel: kiln_worker::link::LinkChannel,
                 requests: Vec<kiln_proto::bytestream::WriteRequest>| async move {
        ByteStreamClient::new(channel)
            .write(futures::stream::iter(requests))
            .await
            .map(|r| r.into_inner().committed_size)
    };
    let data = common::blobs::pseudo_random(7, 300_000);
    let d = common::blobs::digest(F, &data);
    let name = || common::blobs::write_name("", F, &d);
    let requests = |bytes: &[u8]| common::blobs::write_requests(&name(), bytes, 64 << 10, 0);
    let mut other = data.clone();
    other[1] ^= 1;
    let mut gap = requests(&data);
    gap[2].write_offset += 1;
    let mut unfinished = requests(&data);
    unfinished.truncate(2);
    let mut compressed = requests(&data);
    compressed[0].resource_name = compressed[0]
        .resource_name
        .replace("/blobs/", "/compressed-blobs/zstd/");
    let refused = [
        (
            "bytes of another digest",
            requests(&other),
            Code::InvalidArgument,
        ),
        (
            "data past the size",
            {
                let mut longer = data.clone();
                longer.push(0);
                requests(&longer)
            },
            Code::InvalidArgument,
        ),
        ("a gap", gap, Code::InvalidArgument),
        ("no finish_write", unfinished, Code::InvalidArgument),
        ("compressed", compressed, Code::Unimplemented),
    ];
    for (what, requests, code) in refused {
        let got = write(server.clone(), requests).await;
        assert_eq!(
            got.as_ref().map_err(|s| s.code()),
            Err(code),
            "{what}: {got:?}"
        );
    }
    assert_eq!(
        common::blobs::find_missing(&ch, "", F, vec![d.clone()]).await,
        vec![d.clone()],
        "nothing stored"
    );
    let temp_files = || {
        std::fs::read_dir(dir.path().join("server/tmp"))
            .unwrap()
            .flat_map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap())
            .count()
    };
    common::eventually("the refused uploads' temp files to go", || async {
        (temp_files() == 0).then_some(())
    })
    .await;

    // Larger than the CAS; and beside an upload in progress that holds most of it.
    let huge = kiln_proto::reapi::Digest {
        size_bytes: 9 << 20,
        ..d.clone()
    };
    let mut too_large = requests(&data);
    too_large[0].resource_name = common::blobs::write_name("", F, &huge);
    let got = write(server.clone(), too_large).await;
    assert_eq!(got.map_err(|s| s.code()), Err(Code::InvalidArgument));
    let big = common::blobs::pseudo_random(8, 6 << 20);
    let big_digest = common::blobs::digest(F, &big);
    let big_requests = common::blobs::write_requests(
        &common::blobs::write_name("", F, &big_digest),
        &big,
        1 << 20,
        0,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(big_requests[0].clone()).await.unwrap();
    let holding = {
        let server = server.clone();
        tokio::spawn(async move {
            ByteStreamClient::new(server)
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    let other = common::blobs::pseudo_random(9, 3 << 20);
    let other_requests = || {
        common::blobs::write_requests(
            &common::blobs::write_name("", F, &common::blobs::digest(F, &other)),
            &other,
            1 << 20,
            0,
        )
    };
    common::eventually("the held upload to hold its place", || async {
        let got = write(server.clone(), other_requests()).await;
        (got.map_err(|s| s.code()) == Err(Code::ResourceExhausted)).then_some(())
    })
    .await;
    // Held without a byte for longer than server.stalled_upload_secs: ended, its place freed.
    let stalled = holding.await.unwrap();
    assert_eq!(
        stalled.map(|_| ()).map_err(|s| s.code()),
        Err(Code::DeadlineExceeded)
    );
    drop(tx);
    assert_eq!(
        write(server.clone(), other_requests()).await.unwrap(),
        3 << 20
    );

    // A member of the farm without a role on the server (not an enrolled worker).
    let farm = kiln_tls::farm::Farm::at(dir.path().join("server/tls"));
    let (cert, key) = farm
        .issue(
            &["someone".to_string()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
        .unwrap();
    let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    let stranger = quic_channel(&kiln.addr.to_string(), "127.0.0.1", &ca, (&c, &k));
    let got = write(stranger, requests(&data)).await;
    assert_eq!(
        got.map_err(|s| s.code()),
        Err(Code::PermissionDenied),
        "no role, no upload"
    );

    let query = || async {
        ByteStreamClient::new(server.clone())
            .query_write_status(kiln_proto::bytestream::QueryWriteStatusRequest {
                resource_name: name(),
            })
            .await
            .map(|r| (r.get_ref().committed_size, r.get_ref().complete))
            .map_err(|s| s.code())
    };
    assert_eq!(query().await, Err(Code::NotFound));
    assert_eq!(
        write(server.clone(), requests(&data)).await.unwrap(),
        300_000
    );
    let read = common::blobs::read(&ch, &common::blobs::read_name("", F, &d), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, data, "stored, and read over TCP");
    assert_eq!(
        write(server.clone(), requests(&data)).await.unwrap(),
        300_000,
        "stored already"
    );
    assert_eq!(query().await, Ok((300_000, true)));
    assert!(server_link.takes_uploads(), "the server agreed to uploads");

    let small = b"small over quic".to_vec();
    let entry =
        |digest: kiln_proto::reapi::Digest, data: &[u8]| batch_update_blobs_request::Request {
            digest: Some(digest),
            data: data.to_vec().into(),
            compressor: 0,
        };
    let batch = |channel: kiln_worker::link::LinkChannel, requests| async move {
        ContentAddressableStorageClient::new(channel)
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests,
                digest_function: F as i32,
            })
            .await
    };
    let small_digest = common::blobs::digest(F, &small);
    let answer = batch(
        server.clone(),
        vec![
            entry(small_digest.clone(), &small),
            entry(common::blobs::digest(F, b"something else"), &small),
        ],
    )
    .await
    .unwrap()
    .into_inner();
    let codes: Vec<i32> = answer
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, vec![0, Code::InvalidArgument as i32], "{answer:?}");
    let read = common::blobs::read(&ch, &common::blobs::read_name("", F, &small_digest), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, small);

    // w1's CAS, over QUIC, is read-only to its peers.
    let cas = cas_address(&workers[0]);
    let (peer, peer_link) = quic_link(&cas, "w1.peer.kiln.invalid", &ca, me);
    let got = write(peer.clone(), requests(&data)).await;
    assert_eq!(got.map_err(|s| s.code()), Err(Code::PermissionDenied));
    assert!(
        peer_link.is_up() && !peer_link.takes_uploads(),
        "a peer does not agree to uploads"
    );
    let got = batch(peer, vec![entry(small_digest.clone(), &small)]).await;
    assert_eq!(
        got.map_err(|s| s.code()).map(|_| ()),
        Err(Code::PermissionDenied)
    );
    kiln.stop().await;
}
