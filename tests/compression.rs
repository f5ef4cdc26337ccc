//! zstd-compressed blobs against a real `kiln serve`: ByteStream `compressed-blobs/zstd/…`
//! uploads (with the spec's offsets and `committed_size`) and reads, resumption, batches with
//! compressors, every bad input, and a server with zstd turned off. The client side is the
//! `zstd` crate, as a client would use it.

#[macro_use]
mod common;

use bytes::Bytes;
use common::blobs::{self, digest, function_segment, pseudo_random, read_name, write_name};
use common::{assert_code, eventually, Kiln, Options};
use kiln_proto::bytestream::{WriteRequest, WriteResponse};
use kiln_proto::reapi::{
    self, batch_update_blobs_request, compressor::Value as Compressor,
    digest_function::Value as Function,
};
use std::io::Write as _;
use tonic::transport::Channel;
use tonic::Code;

const FUNCTIONS: [Function; 2] = [Function::Sha256, Function::Blake3];
const ZSTD: i32 = Compressor::Zstd as i32;

/// Source-like text: compressible, but not trivially.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "pub fn item_{i}(x: u64) -> u64 {{ x.wrapping_mul({}) }}\n",
                i % 89
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// `uploads/{uuid}/compressed-blobs/zstd/{fn/}{hash}/{size}`.
fn write_zname(function: Function, d: &reapi::Digest) -> String {
    format!(
        "uploads/{}/compressed-blobs/zstd/{}{}/{}",
        uuid::Uuid::new_v4(),
        function_segment(function),
        d.hash,
        d.size_bytes
    )
}

/// `compressed-blobs/zstd/{fn/}{hash}/{size}`.
fn read_zname(function: Function, d: &reapi::Digest) -> String {
    format!(
        "compressed-blobs/zstd/{}{}/{}",
        function_segment(function),
        d.hash,
        d.size_bytes
    )
}

/// The messages of a compressed upload resuming at uncompressed offset `start`: the first
/// carries `start`, each later one `start` plus the compressed bytes before it.
fn packed_requests(name: &str, start: u64, packed: &[u8], chunk: usize) -> Vec<WriteRequest> {
    let pieces: Vec<&[u8]> = packed.chunks(chunk).collect();
    let mut offset = start as i64;
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        out.push(WriteRequest {
            resource_name: if i == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: offset,
            finish_write: i + 1 == pieces.len(),
            data: Bytes::copy_from_slice(piece),
        });
        offset += piece.len() as i64;
    }
    if out.is_empty() {
        out.push(WriteRequest {
            resource_name: name.to_string(),
            write_offset: offset,
            finish_write: true,
            data: Bytes::new(),
        });
    }
    out
}

async fn send(
    channel: &Channel,
    requests: Vec<WriteRequest>,
) -> Result<WriteResponse, tonic::Status> {
    blobs::bytestream(channel)
        .write(futures::stream::iter(requests))
        .await
        .map(|r| r.into_inner())
}

/// A frame-cache counter, 0 before it is first counted.
async fn frames(kiln: &Kiln, name: &'static str) -> f64 {
    common::metric_if_any(&kiln.admin, name)
        .await
        .unwrap_or(0.0)
}

const HITS: &str = r#"kiln_zstd_frames_total{result="hit"}"#;
const MISSES: &str = r#"kiln_zstd_frames_total{result="miss"}"#;

fn unpack(data: &[u8]) -> Vec<u8> {
    zstd::decode_all(data).expect("the server's frame decodes")
}

on_every_runtime! {
    async fn zstd_round_trips_through_bytestream_and_batches(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        for (i, f) in FUNCTIONS.into_iter().enumerate() {
            // One blob kept in memory, one streamed from its file.
            for size in [1000usize, 3 << 20] {
                let data = text(i as u64 * 1000 + size as u64, size);
                let d = digest(f, &data);
                let packed = zstd::encode_all(&data[..], 3).unwrap();
                let name = write_zname(f, &d);
                let resp = send(&ch, packed_requests(&name, 0, &packed, 16 << 10))
                    .await
                    .unwrap();
                // The spec's mixed offset: what Bazel checks a finished compressed upload by.
                assert_eq!(resp.committed_size, packed.len() as i64);
                assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
                let zname = read_zname(f, &d);
                let (h0, m0) = (frames(&kiln, HITS).await, frames(&kiln, MISSES).await);
                // The client's own frame (level 3; the server makes level 1) was kept: the
                // first compressed read sends it as it came.
                assert_eq!(blobs::read(&ch, &zname, 0, 0).await.unwrap(), packed);
                assert_eq!(frames(&kiln, HITS).await, h0 + 1.0);
                assert_eq!(frames(&kiln, MISSES).await, m0);
                // A blob stored plain: the first compressed read makes a frame, the next
                // sends it as it is.
                let plain = text(i as u64 * 1000 + size as u64 + 1, size);
                let pd = digest(f, &plain);
                blobs::write(&ch, &write_name("", f, &pd), &plain, 64 << 10).await.unwrap();
                let pzname = read_zname(f, &pd);
                let got = blobs::read(&ch, &pzname, 0, 0).await.unwrap();
                assert!(got.len() < plain.len() / 2, "{} of {}", got.len(), plain.len());
                assert_eq!(unpack(&got), plain);
                assert_eq!(blobs::read(&ch, &pzname, 0, 0).await.unwrap(), got);
                assert_eq!(frames(&kiln, MISSES).await, m0 + 1.0);
                assert_eq!(frames(&kiln, HITS).await, h0 + 2.0);
                // read_offset is into the uncompressed blob; the answer is a frame of the rest.
                let from = size - 100;
                let got = blobs::read(&ch, &zname, from as i64, 0).await.unwrap();
                assert_eq!(unpack(&got), &data[from..]);
                assert_code(
                    blobs::read(&ch, &zname, 0, 10).await,
                    Code::InvalidArgument,
                    "read_limit",
                );
                // Already stored: a compressed upload is answered -1, as the spec says.
                let again = send(&ch, packed_requests(&write_zname(f, &d), 0, &packed, 16 << 10))
                    .await
                    .unwrap();
                assert_eq!(again.committed_size, -1);
            }
        }
        // The empty blob is always there: -1, whether a frame or nothing came with it.
        let empty = digest(Function::Sha256, b"");
        for data in [Vec::new(), zstd::encode_all(&b""[..], 1).unwrap()] {
            let resp = send(&ch, packed_requests(&write_zname(Function::Sha256, &empty), 0, &data, 100))
                .await
                .unwrap();
            assert_eq!(resp.committed_size, -1);
        }

        // Batches: compressed entries in; answers compressed where the client accepts zstd
        // and that is smaller.
        let compressible = text(7, 50_000);
        let random = pseudo_random(7, 50_000);
        let plain = b"plain entry".to_vec();
        let f = Function::Blake3;
        // Level 5: unlike the server's own frames, so the kept client frame is recognised.
        let entry = |data: &[u8], compressor: i32| batch_update_blobs_request::Request {
            digest: Some(digest(f, data)),
            data: if compressor == ZSTD {
                Bytes::from(zstd::encode_all(data, 5).unwrap())
            } else {
                Bytes::copy_from_slice(data)
            },
            compressor,
        };
        let mut cas = blobs::cas(&ch);
        let response = cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: vec![entry(&compressible, ZSTD), entry(&random, ZSTD), entry(&plain, 0)],
                digest_function: f as i32,
            })
            .await
            .unwrap()
            .into_inner();
        let codes: Vec<i32> = response.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
        assert_eq!(codes, vec![0, 0, 0]);
        let digests = vec![digest(f, &compressible), digest(f, &random), digest(f, &plain)];
        let client_frame = zstd::encode_all(&compressible[..], 5).unwrap();
        assert_ne!(client_frame, zstd::encode_all(&compressible[..], 1).unwrap());
        for acceptable in [vec![ZSTD], vec![]] {
            let response = cas
                .batch_read_blobs(reapi::BatchReadBlobsRequest {
                    instance_name: String::new(),
                    digests: digests.clone(),
                    acceptable_compressors: acceptable.clone(),
                    digest_function: f as i32,
                })
                .await
                .unwrap()
                .into_inner();
            if !acceptable.is_empty() {
                // The compressible entry's frame is the one the client sent.
                assert_eq!(response.responses[0].data, client_frame);
            }
            let got: Vec<(i32, Vec<u8>)> = response
                .responses
                .into_iter()
                .map(|r| {
                    assert_eq!(r.status.unwrap().code, 0);
                    let data = if r.compressor == ZSTD { unpack(&r.data) } else { r.data.to_vec() };
                    (r.compressor, data)
                })
                .collect();
            let expected_compressor = if acceptable.is_empty() { 0 } else { ZSTD };
            assert_eq!(
                got,
                vec![
                    (expected_compressor, compressible.clone()),
                    // Random bytes do not shrink: sent as they are.
                    (0, random.clone()),
                    (0, plain.clone()),
                ]
            );
        }

        // A valid upload padded with a skippable frame (still smaller than the blob): stored,
        // but the padding is not handed to readers; the frame they get is the server's own.
        let small = text(9, 1000);
        let sd = digest(f, &small);
        let mut padded = zstd::encode_all(&small[..], 1).unwrap();
        padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        padded.extend_from_slice(&50u32.to_le_bytes());
        padded.extend_from_slice(&[0xAB; 50]);
        assert!(padded.len() < small.len());
        send(&ch, packed_requests(&write_zname(f, &sd), 0, &padded, 512)).await.unwrap();
        let got = blobs::read(&ch, &read_zname(f, &sd), 0, 0).await.unwrap();
        assert_ne!(got, padded);
        assert!(!got.windows(4).any(|w| w == 0x184D_2A50u32.to_le_bytes()), "no skippable frame");
        assert_eq!(unpack(&got), small);
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn a_compressed_upload_resumes_at_the_uncompressed_bytes_stored(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let data = text(11, 4 << 20);
        let size = data.len() as u64;
        let d = digest(Function::Sha256, &data);
        let name = write_zname(Function::Sha256, &d);
        let packed = zstd::encode_all(&data[..], 3).unwrap();
        // Half the frame, then the stream ends without finish_write: the upload is parked.
        let upload = blobs::open_upload(&ch);
        let half = packed.len() / 2;
        for request in packed_requests(&name, 0, &packed[..half], 16 << 10) {
            upload
                .tx
                .send(WriteRequest { finish_write: false, ..request })
                .await
                .unwrap();
        }
        drop(upload.tx);
        assert_code(upload.call.await.unwrap(), Code::InvalidArgument, "QueryWriteStatus");
        // What is reported is the uncompressed bytes stored, where a new frame must start.
        let (committed, complete) = blobs::query(&ch, &name).await.unwrap();
        assert!(!complete);
        assert!(committed > 0 && (committed as u64) < size, "{committed}");
        // The rest as a new frame from there; its offsets count from that point.
        let rest = zstd::encode_all(&data[committed as usize..], 1).unwrap();
        let resp = send(&ch, packed_requests(&name, committed as u64, &rest, 16 << 10))
            .await
            .unwrap();
        assert_eq!(resp.committed_size, committed + rest.len() as i64);
        assert_eq!(
            blobs::read(&ch, &read_name("", Function::Sha256, &d), 0, 0).await.unwrap(),
            data
        );
        // A resumed upload's frames are not kept (the first stream's are gone): the first
        // compressed read makes a frame of its own.
        let misses = frames(&kiln, MISSES).await;
        let got = blobs::read(&ch, &read_zname(Function::Sha256, &d), 0, 0).await.unwrap();
        assert_eq!(unpack(&got), data);
        assert_eq!(frames(&kiln, MISSES).await, misses + 1.0);
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn bad_compressed_data_is_refused_and_leaves_nothing(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let data = text(3, 1000);
        let d = digest(f, &data);
        // 256 MiB of zeros in a few kilobytes, sent as this 1000-byte blob.
        let mut bomb = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            bomb.write_all(&zeros).unwrap();
        }
        let bomb = bomb.finish().unwrap();
        assert!(bomb.len() < 100_000);
        let packed = zstd::encode_all(&data[..], 3).unwrap();
        let other = zstd::encode_all(&text(4, 1000)[..], 3).unwrap();
        let mut second_offset_uncompressed = packed_requests(&write_zname(f, &d), 0, &packed, 100);
        second_offset_uncompressed[1].write_offset = 0;
        let cases: Vec<(Vec<WriteRequest>, &str)> = vec![
            (packed_requests(&write_zname(f, &d), 0, &bomb, 16 << 10), "inflates past"),
            (packed_requests(&write_zname(f, &d), 0, b"not zstd at all", 100), "not a valid zstd"),
            (packed_requests(&write_zname(f, &d), 0, &other, 100), "hash"),
            (second_offset_uncompressed, "write_offset"),
            (packed_requests(&write_zname(f, &d), 5, &packed, 100), "write_offset"),
        ];
        for (requests, needle) in cases {
            assert_code(send(&ch, requests).await, Code::InvalidArgument, needle);
        }
        // A frame cut short: refused either as ending inside a frame or as too few bytes,
        // depending on where zstd's last block ends.
        let cut = send(&ch, packed_requests(&write_zname(f, &d), 0, &packed[..packed.len() - 3], 100))
            .await
            .expect_err("a truncated frame is refused");
        assert_eq!(cut.code(), Code::InvalidArgument, "{cut:?}");
        assert!(
            cut.message().contains("ends inside a zstd frame") || cut.message().contains("finish_write after"),
            "{}",
            cut.message()
        );
        // Names with a compressor Kiln does not speak.
        for name in [
            format!("uploads/u/compressed-blobs/deflate/{}/1000", d.hash),
            format!("uploads/u/compressed-blobs/identity/{}/1000", d.hash),
        ] {
            assert_code(send(&ch, packed_requests(&name, 0, &packed, 100)).await, Code::InvalidArgument, "compressor");
        }
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        assert!(common::temp_files(dir.path()).is_empty());

        // Batches: the bomb and garbage are refused per entry; a compressed entry counts at
        // its declared size against the batch limit (4 MiB by default).
        let entry = |digest: reapi::Digest, data: &[u8], compressor: i32| batch_update_blobs_request::Request {
            digest: Some(digest),
            data: Bytes::copy_from_slice(data),
            compressor,
        };
        let mut cas = blobs::cas(&ch);
        let response = cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: vec![
                    entry(d.clone(), &bomb, ZSTD),
                    entry(d.clone(), b"garbage", ZSTD),
                    entry(d.clone(), &other, ZSTD),
                    entry(d.clone(), &packed, Compressor::Brotli as i32),
                ],
                digest_function: f as i32,
            })
            .await
            .unwrap()
            .into_inner();
        let statuses: Vec<(i32, String)> = response
            .responses
            .into_iter()
            .map(|r| r.status.map(|s| (s.code, s.message)).unwrap())
            .collect();
        assert_eq!(statuses.len(), 4);
        for ((code, message), needle) in statuses.iter().zip(["inflates past", "not a valid zstd", "hashes to", "brotli"]) {
            assert_eq!(*code, Code::InvalidArgument as i32, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        let big = digest(f, &vec![0u8; 5 << 20]);
        let tiny = zstd::encode_all(&vec![0u8; 5 << 20][..], 1).unwrap();
        assert_code(
            cas.batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: vec![entry(big, &tiny, ZSTD)],
                digest_function: f as i32,
            })
            .await,
            Code::InvalidArgument,
            "max_batch_total_size_bytes",
        );
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d]);
        kiln.stop().await;
    }
}

/// With `[compression] zstd = false` nothing is advertised and every compressed request is
/// refused, saying why. (One backend: this is configuration, not I/O.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_turned_off_is_neither_advertised_nor_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[compression]\nzstd = false\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let caps = reapi::capabilities_client::CapabilitiesClient::new(ch.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    assert!(caps.supported_compressors.is_empty());
    assert!(caps.supported_batch_update_compressors.is_empty());
    let f = Function::Sha256;
    let data = text(5, 1000);
    let d = digest(f, &data);
    let packed = zstd::encode_all(&data[..], 3).unwrap();
    assert_code(
        send(&ch, packed_requests(&write_zname(f, &d), 0, &packed, 100)).await,
        Code::InvalidArgument,
        "turned off",
    );
    blobs::write(&ch, &blobs::write_name("", f, &d), &data, 1000)
        .await
        .unwrap();
    assert_code(
        blobs::read(&ch, &read_zname(f, &d), 0, 0).await,
        Code::InvalidArgument,
        "turned off",
    );
    let response = blobs::cas(&ch)
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: Bytes::from(packed),
                compressor: ZSTD,
            }],
            digest_function: f as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let status = response.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(status.message.contains("turned off"), "{}", status.message);
    // Batch reads still answer, uncompressed, whatever the client accepts.
    let response = blobs::cas(&ch)
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![d],
            acceptable_compressors: vec![ZSTD],
            digest_function: f as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].compressor, 0);
    assert_eq!(response.responses[0].data, data);
    kiln.stop().await;
}

/// Decoders are bounded by the memory their windows may take: with `max_window_log = 30`
/// one may run at a time, a second compressed upload is `RESOURCE_EXHAUSTED` until the first
/// ends, and plain uploads are not held back. (One backend: the budget is process-wide.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompressing_uploads_are_bounded_by_their_windows() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[compression]\nmax_window_log = 30\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let f = Function::Sha256;
    let first = text(21, 2 << 20);
    let d1 = digest(f, &first);
    let name = write_zname(f, &d1);
    let packed = zstd::encode_all(&first[..], 3).unwrap();
    let requests = packed_requests(&name, 0, &packed, 16 << 10);
    let (head, tail) = requests.split_at(requests.len() / 2);
    let upload = blobs::open_upload(&ch);
    for request in head {
        upload.tx.send(request.clone()).await.unwrap();
    }
    // The first upload holds the one decoder once the server has stored some of it.
    common::eventually("the first upload to make progress", || async {
        let (committed, _) = blobs::query(&ch, &name).await.ok()?;
        (committed > 0).then_some(())
    })
    .await;
    let second = text(22, 1000);
    let d2 = digest(f, &second);
    let packed2 = zstd::encode_all(&second[..], 3).unwrap();
    assert_code(
        send(&ch, packed_requests(&write_zname(f, &d2), 0, &packed2, 100)).await,
        Code::ResourceExhausted,
        "compression.max_window_log",
    );
    blobs::write(&ch, &blobs::write_name("", f, &d2), &second, 100)
        .await
        .unwrap();
    for request in tail {
        upload.tx.send(request.clone()).await.unwrap();
    }
    let done = upload.call.await.unwrap().unwrap().into_inner();
    assert_eq!(done.committed_size, packed.len() as i64);
    // The decoder is back: the next compressed upload is taken.
    let third = text(23, 1000);
    let d3 = digest(f, &third);
    let packed3 = zstd::encode_all(&third[..], 3).unwrap();
    let resp = send(&ch, packed_requests(&write_zname(f, &d3), 0, &packed3, 100))
        .await
        .unwrap();
    assert_eq!(resp.committed_size, packed3.len() as i64);
    kiln.stop().await;
}

on_every_runtime! {
    async fn a_kept_frame_is_not_served_once_its_blob_left_the_store(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[storage]\ndisk_bytes = \"1 MiB\"\nmemory_bytes = 0\naccess_time_resolution_secs = 0\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&dir.path().join("data"), options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let data = text(21, 300 << 10);
        let d = digest(f, &data);
        let packed = zstd::encode_all(&data[..], 3).unwrap();
        send(&ch, packed_requests(&write_zname(f, &d), 0, &packed, 16 << 10)).await.unwrap();
        assert_eq!(blobs::read(&ch, &read_zname(f, &d), 0, 0).await.unwrap(), packed);
        // Newer blobs until the store evicts this one (its frame stays in memory). Its file
        // is watched, not asked about: a lookup would count as a use and keep it.
        let file = blobs::blob_file(&dir.path().join("data"), &d);
        assert!(file.exists());
        let mut seed = 100;
        eventually("the compressed blob evicted", || {
            seed += 1;
            let (ch, file) = (ch.clone(), file.clone());
            async move {
                let other = pseudo_random(seed, 300 << 10);
                let od = digest(f, &other);
                blobs::write(&ch, &write_name("", f, &od), &other, 64 << 10).await.unwrap();
                (!file.exists()).then_some(())
            }
        })
        .await;
        assert_code(blobs::read(&ch, &read_zname(f, &d), 0, 0).await, Code::NotFound, "");
        kiln.stop().await;
    }
}
