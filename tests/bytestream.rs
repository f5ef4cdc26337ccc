//! ByteStream Read/Write/QueryWriteStatus against a real `kiln serve`.

#[macro_use]
mod common;

use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::{eventually, Kiln, Options};
use futures::StreamExt;
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::digest_function::Value as Function;
use sha2::Digest as _;
use tonic::Code;

const FUNCTIONS: [Function; 2] = [Function::Sha256, Function::Blake3];

/// Config under which every upload asks for direct I/O (which glommio gives).
const DIRECT_FOR_ALL: &str = "[storage]\ndirect_io_min_bytes = 1\n";

on_every_runtime! {
    async fn round_trip_with_both_digest_functions_and_ranges(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        for (i, function) in FUNCTIONS.into_iter().enumerate() {
            // One blob served from memory, one large enough to stream from its file.
            for size in [1000usize, 3 << 20] {
                let data = pseudo_random(i as u64 * 10 + size as u64, size);
                let d = digest(function, &data);
                let resp = blobs::write(&ch, &write_name("", function, &d), &data, 64 << 10)
                    .await
                    .unwrap();
                assert_eq!(resp.committed_size, size as i64);
                let name = read_name("", function, &d);
                assert_eq!(blobs::read(&ch, &name, 0, 0).await.unwrap(), data);
                assert_eq!(
                    blobs::read(&ch, &name, 10, 100).await.unwrap(),
                    &data[10..110]
                );
                assert_eq!(
                    blobs::read(&ch, &name, size as i64 - 5, 0).await.unwrap(),
                    &data[size - 5..]
                );
                assert!(blobs::read(&ch, &name, size as i64, 0)
                    .await
                    .unwrap()
                    .is_empty());
                assert!(blobs::find_missing(&ch, "", function, vec![d])
                    .await
                    .is_empty());
            }
        }
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn direct_uploads_of_every_alignment_are_stored_exactly(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let options = Options {
            config: Some(DIRECT_FOR_ALL.into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        for size in [1usize, 4095, 4097, (1 << 20) + 1, (3 << 20) + 4096, 5 << 20] {
            let data = pseudo_random(size as u64, size);
            let d = digest(f, &data);
            let resp = blobs::write(&ch, &write_name("", f, &d), &data, 60_000)
                .await
                .unwrap();
            assert_eq!(resp.committed_size, size as i64);
            // Exactly the blob: the padding of the last direct write is cut off.
            let stored = std::fs::read(blobs::blob_file(&data_dir, &d)).unwrap();
            assert!(stored == data, "{size}-byte blob stored as {} bytes", stored.len());
            assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
        }
        assert!(common::temp_files(&data_dir).is_empty());
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn empty_blob_is_always_present(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        for function in FUNCTIONS {
            let d = digest(function, b"");
            assert!(blobs::read(&ch, &read_name("", function, &d), 0, 0)
                .await
                .unwrap()
                .is_empty());
            assert!(blobs::find_missing(&ch, "", function, vec![d.clone()])
                .await
                .is_empty());
            let resp = blobs::write(&ch, &write_name("", function, &d), b"", 1)
                .await
                .unwrap();
            assert_eq!(resp.committed_size, 0);
        }
        kiln.stop().await;
    }
}

// 256 MiB through ByteStream, generated and hashed as it streams (no 256 MiB buffers here).
on_every_runtime! {
    async fn large_blob_streams_both_ways(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        const SIZE: usize = 256 << 20;
        const CHUNK: usize = 1 << 20;
        let chunk = |i: usize| pseudo_random(i as u64 + 7, CHUNK);
        let mut hasher = blake3::Hasher::new();
        for i in 0..SIZE / CHUNK {
            hasher.update(&chunk(i));
        }
        let d = kiln_proto::reapi::Digest {
            hash: hasher.finalize().to_hex().to_string(),
            size_bytes: SIZE as i64,
        };
        let name = write_name("", Function::Blake3, &d);
        let requests = futures::stream::iter(0..SIZE / CHUNK).map(move |i| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * CHUNK) as i64,
            finish_write: i == SIZE / CHUNK - 1,
            data: chunk(i).into(),
        });
        let resp = blobs::bytestream(&ch)
            .write(requests)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.committed_size, SIZE as i64);

        let mut stream = blobs::bytestream(&ch)
            .read(kiln_proto::bytestream::ReadRequest {
                resource_name: read_name("", Function::Blake3, &d),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut check = blake3::Hasher::new();
        let mut total = 0usize;
        while let Some(msg) = stream.next().await {
            let msg = msg.unwrap();
            total += msg.data.len();
            check.update(&msg.data);
        }
        assert_eq!(total, SIZE);
        assert_eq!(check.finalize().to_hex().to_string(), d.hash);
        kiln.stop().await;
    }
}

// Interrupt an upload, ask QueryWriteStatus where it got to, and resume from there.
on_every_runtime! {
    async fn interrupted_upload_resumes_from_committed_size(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        // Every upload asks for direct I/O: on glommio the first half is written direct and
        // the resumed rest through the page cache; the monoio backends write both buffered.
        let options = Options {
            config: Some(DIRECT_FOR_ALL.into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&dir.path().join("data"), options).await;
        let ch = kiln.channel().await;
        let data = pseudo_random(42, 5 << 20);
        let d = digest(Function::Sha256, &data);
        let name = write_name("main", Function::Sha256, &d);
        let half = 2 << 20;

        // Send the first half, then abandon the call (the client resets the stream).
        let upload = blobs::open_upload(&ch);
        for r in blobs::write_requests(&name, &data[..half], 256 << 10, 0) {
            upload
                .tx
                .send(WriteRequest {
                    finish_write: false,
                    ..r
                })
                .await
                .unwrap();
        }
        blobs::wait_committed(&ch, &name, half).await;
        upload.call.abort();
        drop(upload.tx);
        let _ = upload.call.await;

        // Resume; the server may not have noticed the reset yet (ABORTED: retry), as a client would.
        let resumed = eventually("the upload to be resumable", || async {
            let (committed, complete) = blobs::query(&ch, &name).await.unwrap();
            assert!(!complete);
            let offset = committed as usize;
            let mut requests = blobs::write_requests("", &data, 1 << 20, offset);
            requests[0].resource_name = name.clone();
            match blobs::bytestream(&ch)
                .write(futures::stream::iter(requests))
                .await
            {
                Ok(r) => Some((offset, r.into_inner())),
                Err(s) if s.code() == Code::Aborted => None,
                Err(s) => panic!("resume failed: {s:?}"),
            }
        })
        .await;
        let (offset, resp) = resumed;
        assert_eq!(offset, half, "resumed from where the first stream stopped");
        assert_eq!(resp.committed_size, data.len() as i64);
        assert_eq!(
            blobs::read(&ch, &read_name("main", Function::Sha256, &d), 0, 0)
                .await
                .unwrap(),
            data
        );
        assert_eq!(
            blobs::query(&ch, &name).await.unwrap(),
            (data.len() as i64, true)
        );
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn concurrent_identical_uploads_all_succeed(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let data = pseudo_random(7, 8 << 20);
        let d = digest(Function::Blake3, &data);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            // Separate connections, so the uploads land on different shards.
            let ch = kiln.channel().await;
            let data = data.clone();
            let name = write_name("", Function::Blake3, &d);
            tasks.push(tokio::spawn(async move {
                blobs::write(&ch, &name, &data, 128 << 10).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().committed_size, data.len() as i64);
        }
        let ch = kiln.channel().await;
        let got = blobs::read(&ch, &read_name("", Function::Blake3, &d), 0, 0)
            .await
            .unwrap();
        assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&data));
        // Exactly one copy on disk, and no temp files left behind.
        let tmp = common::temp_files(dir.path());
        assert!(tmp.is_empty(), "{tmp:?}");
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn disconnect_mid_upload_leaves_no_blob(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let data = pseudo_random(3, 1 << 20);
        let d = digest(Function::Sha256, &data);
        let name = write_name("", Function::Sha256, &d);
        // The stream ends cleanly but without finish_write: an error, and nothing is stored.
        let mut requests = blobs::write_requests(&name, &data[..1000], 100, 0);
        for r in &mut requests {
            r.finish_write = false;
        }
        let err = blobs::bytestream(&ch)
            .write(futures::stream::iter(requests))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            blobs::find_missing(&ch, "", Function::Sha256, vec![d.clone()]).await,
            vec![d.clone()]
        );
        let err = blobs::read(&ch, &read_name("", Function::Sha256, &d), 0, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // It was kept for resumption, at the offset where it stopped.
        assert_eq!(blobs::query(&ch, &name).await.unwrap(), (1000, false));
        kiln.stop().await;
    }
}

// A client that opens a Write and then sends no bytes (nothing, or empty messages) does not hold the stream for ever: after
// server.stalled_upload_secs the call ends with DEADLINE_EXCEEDED and what it sent is parked,
// so the client can resume from QueryWriteStatus.
on_every_runtime! {
    async fn a_stalled_upload_is_ended_and_parked(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[server]\nstalled_upload_secs = 1\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let data = pseudo_random(21, 200_000);
        let d = digest(f, &data);
        let name = write_name("", f, &d);
        let upload = blobs::open_upload(&ch);
        let half = 80_000;
        upload
            .tx
            .send(WriteRequest { resource_name: name.clone(), write_offset: 0, finish_write: false, data: data[..half].to_vec().into() })
            .await
            .unwrap();
        // The sender stays open and sends only empty messages (a slow-loris client): they do
        // not count as progress, and the server ends the call by itself.
        let tx = upload.tx.clone();
        let feeder = tokio::spawn(async move {
            let empty = WriteRequest { resource_name: String::new(), write_offset: half as i64, finish_write: false, data: Default::default() };
            while tx.send(empty.clone()).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        let err = upload.call.await.unwrap().unwrap_err();
        feeder.abort();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("QueryWriteStatus"), "{err:?}");
        assert_eq!(blobs::query(&ch, &name).await.unwrap(), (half as i64, false));
        let rest = blobs::write_requests(&name, &data, 50_000, half);
        let done = blobs::bytestream(&ch).write(tokio_stream::iter(rest)).await.unwrap().into_inner();
        assert_eq!(done.committed_size, data.len() as i64);
        assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
        drop(upload.tx);
        kiln.stop().await;
    }
}

// Uploads in progress count against the disk cap: an open upload makes old blobs go to make
// room for its temp file, and an upload that could not fit beside the others is refused with
// RESOURCE_EXHAUSTED before it writes anything; once the first finishes, it goes through.
on_every_runtime! {
    async fn uploads_in_progress_count_against_the_disk_cap(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[storage]\ndisk_bytes = \"1 MiB\"\nmemory_bytes = 0\naccess_time_resolution_secs = 0\n".into()),
            ..Options::on(rt)
        };
        let data_dir = dir.path().join("data");
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let mut old = Vec::new();
        for seed in 0..3u64 {
            let data = pseudo_random(seed, 300 << 10);
            let d = digest(f, &data);
            blobs::write(&ch, &write_name("", f, &d), &data, 64 << 10).await.unwrap();
            old.push(d);
        }
        // A 600 KiB upload, started and left open: 900 KiB stored + 600 KiB staged > 1 MiB.
        let big = pseudo_random(10, 600 << 10);
        let big_d = digest(f, &big);
        let big_name = write_name("", f, &big_d);
        let upload = blobs::HeldUpload::begin(&ch, &big_name, &big, 64 << 10).await;
        // (Which two depends on how the blobs fall on the shards: eviction is an
        // approximate LRU across shards.)
        eventually("two old blobs evicted for the upload", || async {
            let missing = blobs::find_missing(&ch, "", f, old.clone()).await;
            (missing.len() == 2).then_some(())
        })
        .await;

        // A second 600 KiB upload does not fit beside the first.
        let other = pseudo_random(11, 600 << 10);
        let other_d = digest(f, &other);
        let other_name = write_name("", f, &other_d);
        let refused = blobs::write(&ch, &other_name, &other, 64 << 10).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("uploads in progress hold"), "{refused:?}");
        assert!(matches!(blobs::query(&ch, &other_name).await, Err(s) if s.code() == Code::NotFound));

        let done = upload.finish().await;
        assert_eq!(done.committed_size, big.len() as i64);
        blobs::write(&ch, &other_name, &other, 64 << 10).await.unwrap();
        assert_eq!(blobs::read(&ch, &read_name("", f, &other_d), 0, 0).await.unwrap(), other);
        assert_eq!(common::temp_files(&data_dir), Vec::<std::path::PathBuf>::new(), "no temp file left behind");
        kiln.stop().await;
    }
}

/// The next `bytes` bytes of a Read stream (which may come in more messages).
async fn receive(
    stream: &mut tonic::Streaming<kiln_proto::bytestream::ReadResponse>,
    bytes: usize,
) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < bytes {
        let m = stream
            .message()
            .await
            .expect("a message")
            .expect("not ended");
        got.extend_from_slice(&m.data);
    }
    got
}

async fn open_read(
    ch: &tonic::transport::Channel,
    name: &str,
) -> tonic::Streaming<kiln_proto::bytestream::ReadResponse> {
    blobs::bytestream(ch)
        .read(kiln_proto::bytestream::ReadRequest {
            resource_name: name.to_string(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("read starts")
        .into_inner()
}

// With `in_flight` in the chain, Reads of a blob being uploaded follow the upload: two readers
// (on their own connections) get what has arrived, the rest when the upload is stored; a
// reader of an upload that is interrupted gets NOT_FOUND, and the blob is not stored.
on_every_runtime! {
    async fn reads_follow_an_upload_in_progress(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            // Direct writes (glommio) tell their followers as each write completes.
            config: Some(format!("{DIRECT_FOR_ALL}chain = [\"in_flight\", \"memory\", \"filesystem\"]\n")),
            ..Options::on(rt)
        };
        let data_dir = dir.path().join("data");
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let data = pseudo_random(7, 3 << 20);
        let d = digest(f, &data);
        let name = write_name("", f, &d);
        let upload = blobs::open_upload(&ch);
        let requests = blobs::write_requests(&name, &data, 64 << 10, 0);
        let (first, rest) = requests.split_at(32); // 2 MiB: two full write buffers on disk
        for r in first {
            upload.tx.send(r.clone()).await.unwrap();
        }
        blobs::wait_committed(&ch, &name, 2 << 20).await;
        let mut readers = Vec::new();
        for _ in 0..2 {
            let reader_ch = kiln.channel().await;
            readers.push(open_read(&reader_ch, &read_name("", f, &d)).await);
        }
        for r in &mut readers {
            assert_eq!(receive(r, 2 << 20).await, &data[..2 << 20], "what has arrived");
        }
        for r in rest {
            upload.tx.send(r.clone()).await.unwrap();
        }
        let response = upload.call.await.unwrap().unwrap().into_inner();
        assert_eq!(response.committed_size, data.len() as i64);
        for r in &mut readers {
            assert_eq!(receive(r, 1 << 20).await, &data[2 << 20..]);
            assert!(r.message().await.unwrap().is_none(), "the stream ends after the blob");
        }
        assert!(common::metric(&kiln.admin, "kiln_cas_lookups_total{result=\"in_flight\"}").await >= 2.0);

        // An upload interrupted under its reader: NOT_FOUND, and nothing stored.
        let other = pseudo_random(8, 3 << 20);
        let od = digest(f, &other);
        let oname = write_name("", f, &od);
        let upload = blobs::open_upload(&ch);
        for r in blobs::write_requests(&oname, &other, 64 << 10, 0).into_iter().take(20) {
            upload.tx.send(r).await.unwrap();
        }
        blobs::wait_committed(&ch, &oname, 20 << 16).await;
        let reader_ch = kiln.channel().await;
        let mut reader = open_read(&reader_ch, &read_name("", f, &od)).await;
        assert_eq!(receive(&mut reader, 1 << 20).await, &other[..1 << 20]);
        upload.call.abort();
        let end = loop {
            match reader.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert_eq!(end.unwrap_err().code(), Code::NotFound);
        assert_eq!(blobs::find_missing(&ch, "", f, vec![od.clone()]).await, vec![od]);
        kiln.stop().await;
    }
}
