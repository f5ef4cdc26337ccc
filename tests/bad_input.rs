//! Every bad input gets the right gRPC status and a clear message, and stores nothing.

#[macro_use]
mod common;

use bytes::Bytes;
use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::{assert_code, Kiln, Options};
use kiln_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use kiln_proto::reapi::{self, batch_update_blobs_request, digest_function::Value as Function};
use tonic::Code;

on_every_runtime! {
    async fn uploads_that_do_not_match_their_digest(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let data = pseudo_random(1, 300_000);
        let d = digest(Function::Sha256, &data);

        let mut wrong = data.clone();
        wrong[5] ^= 1;
        assert_code(
            blobs::write(&ch, &write_name("", Function::Sha256, &d), &wrong, 65536).await,
            Code::InvalidArgument,
            "hash",
        );
        // Too much data, too little data.
        let longer = [data.clone(), vec![0]].concat();
        assert_code(
            blobs::write(&ch, &write_name("", Function::Sha256, &d), &longer, 65536).await,
            Code::InvalidArgument,
            "more than",
        );
        assert_code(
            blobs::write(
                &ch,
                &write_name("", Function::Sha256, &d),
                &data[..1000],
                100,
            )
            .await,
            Code::InvalidArgument,
            "finish_write",
        );
        // A BLAKE3 digest is verified with BLAKE3: bytes hashed with SHA-256 do not pass as BLAKE3.
        let as_blake3 = write_name("", Function::Blake3, &d);
        assert_code(
            blobs::write(&ch, &as_blake3, &data, 65536).await,
            Code::InvalidArgument,
            "hash",
        );
        // Wrong write_offset.
        let mut requests =
            blobs::write_requests(&write_name("", Function::Sha256, &d), &data, 65536, 0);
        requests[1].write_offset += 1;
        assert_code(
            blobs::bytestream(&ch)
                .write(futures::stream::iter(requests))
                .await,
            Code::InvalidArgument,
            "write_offset",
        );
        // A first message without a resource name.
        let requests = vec![WriteRequest {
            resource_name: String::new(),
            write_offset: 0,
            finish_write: true,
            data: Bytes::from_static(b"x"),
        }];
        assert_code(
            blobs::bytestream(&ch)
                .write(futures::stream::iter(requests))
                .await,
            Code::InvalidArgument,
            "resource_name",
        );
        // None of it was stored.
        assert_eq!(
            blobs::find_missing(&ch, "", Function::Sha256, vec![d.clone()])
                .await
                .len(),
            1
        );
        let leftovers = common::temp_files(dir.path());
        assert!(leftovers.is_empty(), "{leftovers:?}");
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn malformed_resource_names_sizes_and_offsets(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let data = pseudo_random(2, 1000);
        let d = digest(Function::Sha256, &data);
        blobs::write(&ch, &write_name("", Function::Sha256, &d), &data, 1000)
            .await
            .unwrap();
        let h = &d.hash;
        for (name, needle) in [
            ("nonsense".to_string(), "not of the form"),
            (format!("blobs/{h}"), "not of the form"),
            (format!("blobs/{h}/-5"), "negative"),
            (format!("blobs/{h}/ten"), "not a number"),
            (format!("blobs/{}/1000", &h[..20]), "hex"),
            (format!("blobs/sha1/{h}/1000"), "not supported"),
            (format!("blobs/md5/{h}/1000"), "not supported"),
            (format!("compressed-blobs/deflate/{h}/1000"), "compressor"),
            (format!("compressed-blobs/identity/{h}/1000"), "compressor"),
        ] {
            assert_code(
                blobs::read(&ch, &name, 0, 0).await,
                Code::InvalidArgument,
                needle,
            );
        }
        for (name, needle) in [
            (format!("blobs/{h}/1000"), "not of the form"),
            (format!("uploads/u/blobs/{h}/-1"), "negative"),
            (format!("uploads/u/blobs/vso/{h}/1000"), "not supported"),
            (format!("x/blobs/y/uploads/u/blobs/{h}/1000"), "reserved"),
        ] {
            assert_code(
                blobs::write(&ch, &name, &data, 1000).await,
                Code::InvalidArgument,
                needle,
            );
        }
        let name = read_name("", Function::Sha256, &d);
        assert_code(
            blobs::read(&ch, &name, 1001, 0).await,
            Code::OutOfRange,
            "read_offset",
        );
        assert_code(
            blobs::read(&ch, &name, -1, 0).await,
            Code::OutOfRange,
            "read_offset",
        );
        assert_code(
            blobs::read(&ch, &name, 0, -1).await,
            Code::InvalidArgument,
            "read_limit",
        );
        // Missing blob, unknown upload.
        let other = digest(Function::Sha256, b"never uploaded");
        assert_code(
            blobs::read(&ch, &read_name("", Function::Sha256, &other), 0, 0).await,
            Code::NotFound,
            "not found",
        );
        assert_code(
            blobs::bytestream(&ch)
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: write_name("", Function::Sha256, &other),
                })
                .await,
            Code::NotFound,
            "no upload",
        );
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn batch_and_find_missing_bad_input(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let mut cas = blobs::cas(&ch);

        // Malformed digest or unknown function in FindMissing: the whole call is refused.
        let bad = reapi::Digest {
            hash: "xyz".into(),
            size_bytes: 3,
        };
        assert_code(
            cas.find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![bad.clone()],
                digest_function: 0,
            })
            .await,
            Code::InvalidArgument,
            "hash",
        );
        // Hashes are lowercase hex (an uppercase one would be answered in lowercase and match
        // nothing the client holds).
        let mut upper = digest(Function::Sha256, b"a");
        upper.hash = upper.hash.to_uppercase();
        assert_code(
            cas.find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![digest(Function::Sha256, b"b"), upper],
                digest_function: 0,
            })
            .await,
            Code::InvalidArgument,
            "lowercase hex",
        );
        assert_code(
            cas.find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![digest(Function::Sha256, b"a")],
                digest_function: 99,
            })
            .await,
            Code::InvalidArgument,
            "unknown digest function",
        );
        let negative = reapi::Digest {
            hash: digest(Function::Sha256, b"a").hash,
            size_bytes: -1,
        };
        assert_code(
            cas.find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![negative.clone()],
                digest_function: Function::Sha256 as i32,
            })
            .await,
            Code::InvalidArgument,
            "negative",
        );

        // Per-blob statuses in BatchUpdate: good, wrong hash, wrong size, compressed, bad digest.
        let good = b"good".to_vec();
        let req =
            |d: reapi::Digest, data: &[u8], compressor: i32| batch_update_blobs_request::Request {
                digest: Some(d),
                data: Bytes::copy_from_slice(data),
                compressor,
            };
        let response = cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: vec![
                    req(digest(Function::Sha256, &good), &good, 0),
                    req(digest(Function::Sha256, b"other"), b"0ther", 0),
                    req(digest(Function::Sha256, b"abc"), b"abcd", 0),
                    req(digest(Function::Sha256, b"zz"), b"zz", 3),
                    req(bad, b"xyz", 0),
                    req(negative, b"a", 0),
                ],
                digest_function: Function::Sha256 as i32,
            })
            .await
            .unwrap()
            .into_inner();
        let codes: Vec<i32> = response
            .responses
            .iter()
            .map(|r| r.status.as_ref().unwrap().code)
            .collect();
        let ia = Code::InvalidArgument as i32;
        assert_eq!(codes, vec![0, ia, ia, ia, ia, ia]);
        let messages: Vec<&str> = response
            .responses
            .iter()
            .map(|r| r.status.as_ref().unwrap().message.as_str())
            .collect();
        assert!(messages[1].contains("hashes to"), "{messages:?}");
        assert!(messages[2].contains("bytes"), "{messages:?}");
        assert!(messages[3].contains("compressor"), "{messages:?}");
        let missing = blobs::find_missing(
            &ch,
            "",
            Function::Sha256,
            vec![
                digest(Function::Sha256, &good),
                digest(Function::Sha256, b"other"),
            ],
        )
        .await;
        assert_eq!(missing, vec![digest(Function::Sha256, b"other")]);

        // BatchRead: missing blob is a per-blob NOT_FOUND.
        let response = cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: vec![
                    digest(Function::Sha256, &good),
                    digest(Function::Sha256, b"nope"),
                ],
                acceptable_compressors: vec![],
                digest_function: Function::Sha256 as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.responses[0].data.as_ref(), good.as_slice());
        assert_eq!(
            response.responses[1].status.as_ref().unwrap().code,
            Code::NotFound as i32
        );
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn oversized_batches_and_messages(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some(
                "[server]\nmax_message_bytes = \"2 MiB\"\nmax_batch_total_size_bytes = \"1 MiB\"\n[storage]\ndisk_bytes = \"8 MiB\"\n"
                    .into(),
            ),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let mut cas = blobs::cas(&ch);
        let blob = |seed| {
            let data = pseudo_random(seed, 600 << 10);
            batch_update_blobs_request::Request {
                digest: Some(digest(Function::Sha256, &data)),
                data: data.into(),
                compressor: 0,
            }
        };
        // Two 600 KiB blobs: over the 1 MiB batch limit.
        assert_code(
            cas.batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: vec![blob(1), blob(2)],
                digest_function: Function::Sha256 as i32,
            })
            .await,
            Code::InvalidArgument,
            "max_batch_total_size_bytes",
        );
        assert_code(
            cas.batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: vec![blob(1).digest.unwrap(), blob(2).digest.unwrap()],
                acceptable_compressors: vec![],
                digest_function: Function::Sha256 as i32,
            })
            .await,
            Code::InvalidArgument,
            "max_batch_total_size_bytes",
        );
        // Sizes near 2^63 must not wrap the total to something small: three of them sum past
        // 2^64 (they used to wrap, or panic in a debug build).
        let near_max = |seed: u8| reapi::Digest {
            hash: hex::encode([seed; 32]),
            size_bytes: i64::MAX,
        };
        assert_code(
            cas.batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: String::new(),
                digests: vec![near_max(1), near_max(2), near_max(3), digest(Function::Sha256, b"x")],
                acceptable_compressors: vec![],
                digest_function: Function::Sha256 as i32,
            })
            .await,
            Code::InvalidArgument,
            "max_batch_total_size_bytes",
        );
        // A single message above max_message_bytes.
        let big = pseudo_random(9, 3 << 20);
        let name = write_name("", Function::Sha256, &digest(Function::Sha256, &big));
        assert_code(
            blobs::write(&ch, &name, &big, 3 << 20).await,
            Code::ResourceExhausted,
            "exceeds the limit",
        );
        // A blob larger than the whole CAS.
        let huge = reapi::Digest {
            hash: digest(Function::Sha256, b"x").hash,
            size_bytes: 9 << 20,
        };
        assert_code(
            blobs::write(&ch, &write_name("", Function::Sha256, &huge), b"x", 1).await,
            Code::InvalidArgument,
            "capacity",
        );
        // The server is still fine.
        let small = b"still alive".to_vec();
        blobs::write(
            &ch,
            &write_name("", Function::Sha256, &digest(Function::Sha256, &small)),
            &small,
            4,
        )
        .await
        .unwrap();
        kiln.stop().await;
    }
}

/// A tmpfs of `size` mounted on `dir` for the test (a real full disk, no fake), unmounted on
/// drop; `None` where this process may not mount (not root).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

// A disk that fills up mid-upload: RESOURCE_EXHAUSTED, no temp file left behind, and the
// server keeps serving.
on_every_runtime! {
    async fn a_full_disk_is_resource_exhausted_and_leaves_nothing(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("small");
        // The suite runs as root (CI does); a test that cannot run fails, it never passes
        // silently.
        let _disk = SmallDisk::mount(&data_dir, "3m")
            .expect("cannot mount a 3 MiB tmpfs for the full-disk test: run the suite as root");
        let options = Options {
            // The cap is above the disk: only the disk itself can say no.
            config: Some("[storage]\ndisk_bytes = \"1 GiB\"\nmemory_bytes = 0\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let big = pseudo_random(31, 8 << 20);
        let name = write_name("", Function::Sha256, &digest(Function::Sha256, &big));
        assert_code(blobs::write(&ch, &name, &big, 1 << 20).await, Code::ResourceExhausted, "No space left");
        let leftovers = common::temp_files(&data_dir);
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        let small = b"room for this".to_vec();
        let name = write_name("", Function::Sha256, &digest(Function::Sha256, &small));
        blobs::write(&ch, &name, &small, 64).await.unwrap();
        kiln.stop().await;
    }
}

async fn capabilities(ch: &tonic::transport::Channel) -> Result<(), tonic::Status> {
    use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
    CapabilitiesClient::new(ch.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .map(|_| ())
}

/// A raw HTTP/2 connection; the task ends when the server closes it.
async fn raw_connection(
    addr: std::net::SocketAddr,
) -> tokio::task::JoinHandle<Result<(), h2::Error>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    match h2::client::handshake(tcp).await {
        Ok((_send, conn)) => tokio::spawn(async move {
            let _send = _send;
            conn.await
        }),
        Err(e) => tokio::spawn(async move { Err(e) }),
    }
}

// server.max_connections: a connection beyond it is closed at once and counted, the open ones
// keep working, and a closed one makes room again.
on_every_runtime! {
    async fn connections_beyond_the_limit_are_closed_at_once(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[server]\nmax_connections = 2\n[worker]\nembedded = false\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let first = kiln.channel().await;
        let second = kiln.channel().await;
        capabilities(&first).await.unwrap();
        capabilities(&second).await.unwrap();
        let third = raw_connection(kiln.addr).await;
        third.await.unwrap().expect_err("the third connection is closed by the server");
        capabilities(&first).await.unwrap();
        capabilities(&second).await.unwrap();
        let (code, metrics) = common::curl(&format!("{}/metrics", kiln.admin), &[]);
        assert_eq!(code, 200);
        assert!(metrics.contains("kiln_connections_refused_total 1"), "{metrics}");
        drop(first);
        common::eventually("room for a new connection", || async {
            let ch = tonic::transport::Endpoint::from_shared(kiln.url()).ok()?.connect().await.ok()?;
            capabilities(&ch).await.ok()
        })
        .await;
        drop(second);
        kiln.stop().await;
    }
}

// server.idle_timeout_secs: a connection with no call in flight gets GOAWAY and is closed; one
// with a call in flight (an upload that pauses longer than the idle limit) is left alone.
on_every_runtime! {
    async fn idle_connections_are_closed_busy_ones_are_not(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[server]\nidle_timeout_secs = 1\n[worker]\nembedded = false\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let busy = kiln.channel().await;
        let data = pseudo_random(41, 300_000);
        let d = digest(Function::Sha256, &data);
        let name = write_name("", Function::Sha256, &d);
        let upload = blobs::open_upload(&busy);
        let requests = blobs::write_requests(&name, &data, 100_000, 0);
        upload.tx.send(requests[0].clone()).await.unwrap();
        blobs::wait_committed(&busy, &name, 100_000).await;
        // Opened after the upload started, so it reaches the idle limit later than the busy
        // connection would have.
        let started = std::time::Instant::now();
        let idle = raw_connection(kiln.addr).await;
        idle.await.unwrap().expect("closed gracefully (GOAWAY)");
        assert!(started.elapsed() >= std::time::Duration::from_secs(1));
        for r in &requests[1..] {
            upload.tx.send(r.clone()).await.unwrap();
        }
        let done = upload.call.await.unwrap().expect("the busy connection was kept");
        assert_eq!(done.into_inner().committed_size, data.len() as i64);
        let (_, metrics) = common::curl(&format!("{}/metrics", kiln.admin), &[]);
        assert!(metrics.contains("kiln_connections_idle_closed_total 1"), "{metrics}");
        kiln.stop().await;
    }
}
