//! `SplitBlob` and `SpliceBlob` against a real `kiln serve`: a stored blob split with FastCDC
//! 2020 exactly as the `fastcdc` crate (the spec's reference implementation) cuts it, its
//! chunks stored; a blob spliced from chunks (small ones and one over 4 MiB) stored only when
//! it hashes right; every refusal the spec names; and the capabilities that advertise it.

#[macro_use]
mod common;

use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::{assert_code, Kiln, Options};
use kiln_proto::reapi::{self, chunking_function, digest_function::Value as Function};
use tonic::transport::Channel;
use tonic::Code;

const FAST_CDC: i32 = chunking_function::Value::FastCdc2020 as i32;

async fn split(
    ch: &Channel,
    f: Function,
    d: &reapi::Digest,
) -> Result<reapi::SplitBlobResponse, tonic::Status> {
    blobs::cas(ch)
        .split_blob(reapi::SplitBlobRequest {
            instance_name: String::new(),
            blob_digest: Some(d.clone()),
            digest_function: f as i32,
            chunking_function: FAST_CDC,
        })
        .await
        .map(|r| r.into_inner())
}

async fn splice(
    ch: &Channel,
    f: Function,
    d: &reapi::Digest,
    chunks: &[reapi::Digest],
) -> Result<reapi::SpliceBlobResponse, tonic::Status> {
    blobs::cas(ch)
        .splice_blob(reapi::SpliceBlobRequest {
            instance_name: String::new(),
            blob_digest: Some(d.clone()),
            chunk_digests: chunks.to_vec(),
            digest_function: f as i32,
            chunking_function: 0,
        })
        .await
        .map(|r| r.into_inner())
}

/// Uploads each piece by ByteStream and returns their digests.
async fn upload_pieces(ch: &Channel, f: Function, pieces: &[&[u8]]) -> Vec<reapi::Digest> {
    let mut out = Vec::new();
    for piece in pieces {
        let d = digest(f, piece);
        blobs::write(ch, &write_name("", f, &d), piece, 1 << 20)
            .await
            .unwrap();
        out.push(d);
    }
    out
}

on_every_runtime! {
    async fn split_cuts_like_the_reference_and_splice_stores_only_what_hashes_right(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        for (i, f) in [Function::Sha256, Function::Blake3].into_iter().enumerate() {
            // Split: 5 MiB cut at the advertised 512 KiB average (128 KiB to 2 MiB chunks).
            let data = pseudo_random(40 + i as u64, 5 << 20);
            let d = digest(f, &data);
            blobs::write(&ch, &write_name("", f, &d), &data, 1 << 20).await.unwrap();
            let answer = split(&ch, f, &d).await.unwrap();
            assert_eq!(answer.chunking_function, FAST_CDC);
            let expected: Vec<reapi::Digest> = fastcdc::v2020::FastCDC::with_level_and_seed(
                &data,
                128 << 10,
                512 << 10,
                2 << 20,
                fastcdc::v2020::Normalization::Level2,
                0,
            )
            .map(|c| digest(f, &data[c.offset..c.offset + c.length]))
            .collect();
            assert!(expected.len() > 2);
            assert_eq!(answer.chunk_digests, expected);
            // The chunks are stored, and concatenate to the blob.
            assert!(blobs::find_missing(&ch, "", f, expected.clone()).await.is_empty());
            let mut whole = Vec::new();
            for c in &expected {
                whole.extend(blobs::read(&ch, &read_name("", f, c), 0, 0).await.unwrap());
            }
            assert!(whole == data);
            // Asked again: the same list.
            assert_eq!(split(&ch, f, &d).await.unwrap().chunk_digests, expected);

            // Splice: small chunks and one over 4 MiB (read through a file), in order.
            let other = pseudo_random(50 + i as u64, 6 << 20);
            let od = digest(f, &other);
            let pieces: Vec<&[u8]> = vec![&other[..1000], &other[1000..300_000], &other[300_000..]];
            let chunks = upload_pieces(&ch, f, &pieces).await;
            assert_eq!(blobs::find_missing(&ch, "", f, vec![od.clone()]).await, vec![od.clone()]);
            let spliced = splice(&ch, f, &od, &chunks).await.unwrap();
            assert_eq!(spliced.blob_digest, Some(od.clone()));
            assert!(blobs::read(&ch, &read_name("", f, &od), 0, 0).await.unwrap() == other);
            // Again: already stored, a no-op.
            assert_eq!(splice(&ch, f, &od, &chunks).await.unwrap().blob_digest, Some(od.clone()));
            // A split of a spliced blob answers with its chunks, under the client's function.
            let answer = split(&ch, f, &od).await.unwrap();
            assert_eq!(answer.chunk_digests, chunks);
            assert_eq!(answer.chunking_function, 0);
            // A splice of the stored blob with another list reads nothing, so it cannot
            // replace the list a split answers with.
            let other_pieces: Vec<&[u8]> = vec![&other[..500], &other[500..300_000], &other[300_000..]];
            let other_chunks = upload_pieces(&ch, f, &other_pieces).await;
            assert_eq!(
                splice(&ch, f, &od, &other_chunks).await.unwrap().blob_digest,
                Some(od.clone())
            );
            assert_eq!(split(&ch, f, &od).await.unwrap().chunk_digests, chunks);
        }
        // The empty blob: no chunks, both ways.
        let empty = digest(Function::Sha256, b"");
        assert!(split(&ch, Function::Sha256, &empty).await.unwrap().chunk_digests.is_empty());
        splice(&ch, Function::Sha256, &empty, &[]).await.unwrap();
        assert!(common::temp_files(dir.path()).is_empty());
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn bad_splits_and_splices_get_the_spec_codes_and_store_nothing(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[chunking]\nmax_chunks = 4\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let data = pseudo_random(60, 3000);
        let d = digest(f, &data);
        let pieces: Vec<&[u8]> = vec![&data[..1000], &data[1000..2000], &data[2000..]];
        let chunks = upload_pieces(&ch, f, &pieces).await;
        // A blob not stored cannot be split.
        assert_code(split(&ch, f, &d).await, Code::NotFound, "not in the CAS");
        // A chunk missing.
        let absent = digest(f, b"never uploaded");
        let mut with_absent = chunks.clone();
        with_absent[1] = absent.clone();
        let mut with_absent_data = data.clone();
        with_absent_data.splice(1000..2000, b"never uploaded".iter().copied());
        let wd = digest(f, &with_absent_data);
        assert_code(splice(&ch, f, &wd, &with_absent).await, Code::NotFound, "not in the CAS");
        // Chunks in the wrong order: the right size, the wrong hash.
        let swapped = vec![chunks[1].clone(), chunks[0].clone(), chunks[2].clone()];
        assert_code(splice(&ch, f, &d, &swapped).await, Code::InvalidArgument, "concatenate to");
        // Sizes that do not add up, and a size from the wire that would overflow a sum.
        assert_code(splice(&ch, f, &d, &chunks[..2]).await, Code::InvalidArgument, "add up");
        // Two sizes of 2^63-1 and one of 3002 wrap to exactly 3000 in 64 bits.
        let huge = reapi::Digest { size_bytes: i64::MAX, ..chunks[0].clone() };
        let wraps = reapi::Digest { size_bytes: 3002, ..chunks[2].clone() };
        assert_code(
            splice(&ch, f, &d, &[huge.clone(), huge.clone(), wraps]).await,
            Code::InvalidArgument,
            "add up",
        );
        // A blob larger than the CAS, whatever its chunks.
        let giant = reapi::Digest { size_bytes: 1 << 62, ..d.clone() };
        assert_code(
            splice(&ch, f, &giant, &[huge]).await,
            Code::InvalidArgument,
            "larger than the CAS",
        );
        // A chunking function that is not one.
        assert_code(
            blobs::cas(&ch)
                .splice_blob(reapi::SpliceBlobRequest {
                    blob_digest: Some(d.clone()),
                    chunk_digests: chunks.clone(),
                    digest_function: f as i32,
                    chunking_function: 77,
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "chunking_function",
        );
        // A size-0 digest that is not the empty blob's is not stored.
        let bogus = reapi::Digest { size_bytes: 0, ..d.clone() };
        assert_code(split(&ch, f, &bogus).await, Code::NotFound, "not in the CAS");
        // More chunks than chunking.max_chunks.
        let many = vec![chunks[0].clone(); 5];
        assert_code(splice(&ch, f, &d, &many).await, Code::InvalidArgument, "max_chunks");
        // Nothing was stored, and no temp file was left.
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        assert!(common::temp_files(dir.path()).is_empty());
        // The right order works.
        splice(&ch, f, &d, &chunks).await.unwrap();
        assert!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap() == data);
        kiln.stop().await;
    }
}

// A splice's temp file counts against the disk cap like an upload's: with a 600 KiB upload
// open under a 1 MiB cap, a splice of one 16 KiB chunk listed 40 times (640 KiB) is
// RESOURCE_EXHAUSTED before it writes anything, and goes through once the upload is done. A
// blob still arriving (read-while-write) is not split: NOT_FOUND at once, not a wait for the
// upload. The empty blob spliced from empty chunks keeps no list: its split is empty.
on_every_runtime! {
    async fn splices_count_against_the_disk_cap_and_arriving_blobs_are_not_split(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[storage]\ndisk_bytes = \"1 MiB\"\nmemory_bytes = 0\nchain = [\"in_flight\", \"filesystem\"]\n".into()),
            ..Options::on(rt)
        };
        let data_dir = dir.path().join("data");
        let kiln = Kiln::start_async(&data_dir, options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let chunk = pseudo_random(1, 16 << 10);
        let chunks = upload_pieces(&ch, f, &[&chunk]).await;
        let whole = chunk.repeat(40);
        let d = digest(f, &whole);
        let listed = vec![chunks[0].clone(); 40];

        let big = pseudo_random(10, 600 << 10);
        let big_d = digest(f, &big);
        let big_name = write_name("", f, &big_d);
        let upload = blobs::HeldUpload::begin(&ch, &big_name, &big, 64 << 10).await;

        assert_code(splice(&ch, f, &d, &listed).await, Code::ResourceExhausted, "no room in the CAS");
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        // The blob being uploaded is not in the CAS yet.
        assert_code(split(&ch, f, &big_d).await, Code::NotFound, "not in the CAS");

        upload.finish().await;
        splice(&ch, f, &d, &listed).await.unwrap();
        assert!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap() == whole);

        let empty = digest(f, b"");
        splice(&ch, f, &empty, &[empty.clone(), empty.clone()]).await.unwrap();
        assert!(split(&ch, f, &empty).await.unwrap().chunk_digests.is_empty());
        assert!(common::temp_files(&data_dir).is_empty());
        kiln.stop().await;
    }
}

/// `[chunking] enabled = false`: nothing advertised, both methods `UNIMPLEMENTED`. (One
/// backend: configuration.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_turned_off_is_neither_advertised_nor_served() {
    let dir = tempfile::tempdir().unwrap();
    let on = Kiln::start_on(common::Runtime::Glommio, dir.path()).await;
    let advertised = caps(&on.channel().await).await;
    assert!(advertised.split_blob_support && advertised.splice_blob_support);
    let cdc = advertised.fast_cdc_2020_params.unwrap();
    assert_eq!((cdc.avg_chunk_size_bytes, cdc.seed), (512 << 10, 0));
    on.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[chunking]\nenabled = false\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let caps = caps(&ch).await;
    assert!(!caps.split_blob_support && !caps.splice_blob_support);
    assert!(caps.fast_cdc_2020_params.is_none());
    let d = digest(Function::Sha256, b"x");
    assert_code(
        split(&ch, Function::Sha256, &d).await,
        Code::Unimplemented,
        "turned off",
    );
    assert_code(
        splice(&ch, Function::Sha256, &d, std::slice::from_ref(&d)).await,
        Code::Unimplemented,
        "turned off",
    );
    kiln.stop().await;
}

async fn caps(ch: &Channel) -> reapi::CacheCapabilities {
    reapi::capabilities_client::CapabilitiesClient::new(ch.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap()
}
