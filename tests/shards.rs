//! The CAS sharded across servers: a front server whose chain has a `shard` tier over three
//! other Kiln servers (real processes, plain gRPC on 127.0.0.1; weights 1, 1 and 2) puts each
//! blob on the shard rendezvous hashing picks, within 10 % of the weights; finds, reads and
//! pins blobs through them (keeping what it fetched: an action whose input only a shard holds
//! runs on the front's worker); and when one shard is down answers UNAVAILABLE for that
//! shard's blobs only, keeping nothing of an upload its shard did not take.

#[macro_use]
mod common;

use common::blobs::{self, digest, read_name};
use common::exec::{code, execute, Spec, Tree};
use common::{Kiln, Options, Runtime};
use kiln_dataplane::store::tier::rendezvous;
use kiln_proto::reapi::{self, digest_function::Value as Function};
use tonic::transport::Channel;
use tonic::Code;

const F: Function = Function::Sha256;

async fn plain(dir: &std::path::Path, name: &str) -> Kiln {
    Kiln::start_async(
        &dir.join(name),
        Options {
            config: Some("[worker]\nembedded = false\n".into()),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await
}

fn hash(d: &reapi::Digest) -> [u8; 32] {
    let mut h = [0u8; 32];
    hex::decode_to_slice(&d.hash, &mut h).unwrap();
    h
}

async fn read(ch: &Channel, d: &reapi::Digest) -> Result<Vec<u8>, tonic::Status> {
    blobs::read(ch, &read_name("", F, d), 0, 0).await
}

/// Uploads `data` in a batch of one; the entry's status code.
async fn upload_one(ch: &Channel, data: Vec<u8>) -> i32 {
    let d = digest(F, &data);
    let answer = blobs::cas(ch)
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(d),
                data: data.into(),
                compressor: 0,
            }],
            digest_function: F as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    answer.responses[0].status.clone().unwrap().code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_tier_spreads_blobs_over_servers_and_survives_one_going_down() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = plain(dir.path(), "s1").await;
    let s2 = plain(dir.path(), "s2").await;
    let s3 = plain(dir.path(), "s3").await;
    let shards = vec![
        (format!("grpc://{}", s1.addr), 1u32),
        (format!("grpc://{}", s2.addr), 1u32),
        (format!("grpc://{}", s3.addr), 2u32),
    ];
    // The front runs actions itself (its embedded worker), pinning inputs through the tier.
    let front = Kiln::start_async(
        &dir.path().join("front"),
        Options {
            config: Some(format!(
                concat!(
                    "[storage]\nchain = [\"memory\", \"cluster\", \"filesystem\"]\n",
                    "[storage.tiers.cluster]\nkind = \"shard\"\nshards = [\n",
                    "  {{ endpoint = \"{}\" }},\n  {{ endpoint = \"{}\" }},\n",
                    "  {{ endpoint = \"{}\", weight = 2 }},\n]\n"
                ),
                shards[0].0, shards[1].0, shards[2].0
            )),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await;
    let chf = front.channel().await;
    let chs = [s1.channel().await, s2.channel().await, s3.channel().await];
    let owner = |d: &reapi::Digest| rendezvous::owner(&hash(d), &shards);
    // Data of the given tag that belongs to shard `shard`.
    let on = |shard: usize, tag: &str| {
        (0..)
            .map(|i| format!("{tag} {i}").into_bytes())
            .find(|data| owner(&digest(F, data)) == shard)
            .unwrap()
    };

    // Uploaded through the front: each blob on its shard only, in proportion to the weights.
    let mut all = Vec::new();
    for i in 0..400u32 {
        let data = format!("small blob {i}").into_bytes();
        all.push((digest(F, &data), data));
    }
    common::exec::upload(&chf, F, all.clone()).await;
    let large = blobs::pseudo_random(5, 3 << 20);
    let dl = digest(F, &large);
    blobs::write(&chf, &blobs::write_name("", F, &dl), &large, 1 << 20)
        .await
        .unwrap();
    all.push((dl.clone(), large.clone()));
    let digests: Vec<reapi::Digest> = all.iter().map(|(d, _)| d.clone()).collect();
    let mut missing = Vec::new();
    for ch in &chs {
        missing.push(blobs::find_missing(ch, "", F, digests.clone()).await);
    }
    for d in &digests {
        let held: Vec<bool> = missing.iter().map(|m| !m.contains(d)).collect();
        let mut want = vec![false; 3];
        want[owner(d)] = true;
        assert_eq!(held, want, "{d:?} is on its shard only");
    }
    for (i, share) in [0.25, 0.25, 0.5].into_iter().enumerate() {
        let held = (digests.len() - missing[i].len()) as f64 / digests.len() as f64;
        assert!(
            (held - share).abs() < 0.1,
            "shard {i} holds {held}, not about {share}"
        );
    }

    // Blobs the front does not hold: found and read through their shards.
    let (w, x, y) = (on(0, "w"), on(1, "x"), on(0, "y"));
    let (dw, dx, dy) = (digest(F, &w), digest(F, &x), digest(F, &y));
    common::exec::upload(
        &chs[0],
        F,
        vec![(dw.clone(), w.clone()), (dy.clone(), y.clone())],
    )
    .await;
    common::exec::upload(&chs[1], F, vec![(dx.clone(), x.clone())]).await;
    assert!(
        blobs::find_missing(&chf, "", F, vec![dw.clone(), dx.clone()])
            .await
            .is_empty()
    );
    assert_eq!(read(&chf, &dw).await.unwrap(), w);
    assert_eq!(read(&chf, &dx).await.unwrap(), x);
    assert_eq!(read(&chf, &dl).await.unwrap(), large);

    // An action whose input only its shard holds: the front pins it, fetching it.
    let input = on(2, "input");
    common::exec::upload(&chs[2], F, vec![(digest(F, &input), input.clone())]).await;
    let spec = Spec {
        tree: Tree::default().file("in", &input, false),
        ..Spec::script("cat in")
    };
    let action = spec
        .upload_only(&chf, F, |data| data != input.as_slice())
        .await;
    let (_, r) = execute(&chf, F, &action, false).await.unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    let out =
        common::exec::read_output(&chf, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
    assert_eq!(out, input);

    // s1 down: its blobs are unavailable through the front (those the front fetched before
    // are still served), the others' are not.
    s1.stop().await;
    let e = read(&chf, &dy).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&format!("CAS shard {}", shards[0].0)),
        "{e:?}"
    );
    assert_eq!(read(&chf, &dw).await.unwrap(), w, "kept by the front");
    assert_eq!(read(&chf, &dx).await.unwrap(), x);
    assert_eq!(
        blobs::find_missing(&chf, "", F, vec![dy.clone(), dx.clone()]).await,
        vec![dy.clone()],
        "a down shard's blobs answered missing"
    );
    // An upload s1 cannot take fails and leaves nothing on the front (a retry will send it
    // again); one for another shard goes on.
    let (new1, new2) = (on(0, "new"), on(1, "new"));
    assert_eq!(
        upload_one(&chf, new1.clone()).await,
        Code::Unavailable as i32
    );
    let d1 = digest(F, &new1);
    assert_eq!(
        blobs::find_missing(&chf, "", F, vec![d1.clone()]).await,
        vec![d1]
    );
    assert_eq!(upload_one(&chf, new2).await, 0);
    front.stop().await;
    s2.stop().await;
    s3.stop().await;
}
