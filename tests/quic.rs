//! Peers, and workers' links to the server, over QUIC and mutual TLS, end to end: `kiln
//! serve` with TLS and authorization and enrolled `kiln worker` processes on 127.0.0.1. QUIC
//! carries peer transfers and, with `server.quic`, the workers' reads and uploads; a peer not
//! reachable over UDP is reached over TCP; uploads over QUIC are held to the data plane's
//! rules; a revoked worker is refused by its peers over TCP and QUIC.

#[macro_use]
mod common;

use common::exec::{code, execute, worker_of, Spec};
use common::farm::{
    cas_address, enrolled_farm, facts_known_over_tls, quic_cas, quic_channel, quic_link, quic_read,
    tls_channel,
};
use common::metric_or_zero as number;
use common::peers::{inputs, run_on};
use kiln_proto::reapi::digest_function::Value as Function;

const F: Function = Function::Sha256;

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
// `server.quic`, and w1 with `server_transport = "quic"` (its reads QUIC only: had QUIC not
// carried them, its fetch would fail; uploads go over QUIC once the connection is up) runs an action whose inputs it fetches from the server
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

// Uploads over QUIC into a server whose small blobs go to a small-blob log: a streamed one and
// a batch land in the log (no blob file each), are read back over TCP (from the memory tier,
// which the uploads seeded, as TCP uploads do), and QueryWriteStatus over QUIC says the
// streamed one is complete; one whose bytes do not match is refused and appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_quic_go_into_a_small_blob_log() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
    use tonic::Code;
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let server_config = format!("quic = true\n{}", common::log_chain("64 MiB", "1 MiB"));
    let (kiln, _workers) = enrolled_farm(rt, dir.path(), &server_config, [("w1", "a", "")]).await;
    let ca = dir.path().join("server/tls/ca.pem");
    let identity = dir.path().join("w1/cas/identity");
    let me = (identity.join("cert.pem"), identity.join("key.pem"));
    let (server, _link) = quic_link(
        &kiln.addr.to_string(),
        "127.0.0.1",
        &ca,
        (me.0.as_path(), me.1.as_path()),
    );
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    let appended = || kiln.metric_over_tls(&ca, &["kiln_log_appended_records_total"]);
    assert_eq!(appended().await, 0.0);

    let streamed = common::blobs::pseudo_random(21, 20_000);
    let d = common::blobs::digest(F, &streamed);
    let name = common::blobs::write_name("", F, &d);
    let write = |bytes: &[u8]| {
        let requests = common::blobs::write_requests(&name, bytes, 8 << 10, 0);
        let server = server.clone();
        async move {
            ByteStreamClient::new(server)
                .write(futures::stream::iter(requests))
                .await
                .map(|r| r.into_inner().committed_size)
        }
    };
    let mut forged = streamed.clone();
    forged[100] ^= 1;
    assert_eq!(
        write(&forged).await.map_err(|s| s.code()),
        Err(Code::InvalidArgument)
    );
    assert_eq!(appended().await, 0.0, "a refused upload appends nothing");
    assert_eq!(write(&streamed).await.unwrap(), 20_000);
    let status = ByteStreamClient::new(server.clone())
        .query_write_status(kiln_proto::bytestream::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (20_000, true));

    let small: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("small {i} over quic").into_bytes())
        .collect();
    let answer = ContentAddressableStorageClient::new(server.clone())
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: small
                .iter()
                .map(|b| batch_update_blobs_request::Request {
                    digest: Some(common::blobs::digest(F, b)),
                    data: b.clone().into(),
                    compressor: 0,
                })
                .collect(),
            digest_function: F as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        answer
            .responses
            .iter()
            .all(|r| r.status.as_ref().unwrap().code == 0),
        "{answer:?}"
    );
    assert_eq!(
        appended().await,
        4.0,
        "the streamed blob and the batch's three"
    );
    let server_data = dir.path().join("server");
    let memory_hits = ["kiln_cas_lookups_total{result=\"memory\"}"];
    let before = kiln.metric_over_tls(&ca, &memory_hits).await;
    for bytes in small.iter().chain([&streamed]) {
        let d = common::blobs::digest(F, bytes);
        let read = common::blobs::read(&ch, &common::blobs::read_name("", F, &d), 0, 0)
            .await
            .unwrap();
        assert_eq!(&read, bytes, "read back over TCP");
        let file = common::blobs::blob_file(&server_data, &d);
        assert!(
            !file.exists(),
            "in the log, not in a file of its own: {}",
            file.display()
        );
    }
    let from_memory = kiln.metric_over_tls(&ca, &memory_hits).await - before;
    assert_eq!(from_memory, 4.0, "all four read from the memory tier");
    kiln.stop().await;
}
