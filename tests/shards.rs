//! The CAS sharded across servers: a front server whose chain has a `shard` tier over two
//! other Kiln servers (real processes, plain gRPC on 127.0.0.1) puts each blob on the shard
//! rendezvous hashing picks, finds and reads blobs through them (keeping what it read), and
//! when one shard is down answers UNAVAILABLE for that shard's blobs only.

#[macro_use]
mod common;

use common::blobs::{self, digest, read_name};
use common::{Kiln, Options, Runtime};
use kiln_dataplane::store::tier::rendezvous;
use kiln_proto::reapi::{self, digest_function::Value as Function};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_tier_spreads_blobs_over_servers_and_survives_one_going_down() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = plain(dir.path(), "s1").await;
    let s2 = plain(dir.path(), "s2").await;
    let shards = vec![
        (format!("grpc://{}", s1.addr), 1u32),
        (format!("grpc://{}", s2.addr), 1u32),
    ];
    let front = Kiln::start_async(
        &dir.path().join("front"),
        Options {
            config: Some(format!(
                concat!(
                    "[storage]\nchain = [\"memory\", \"cluster\", \"filesystem\"]\n",
                    "[storage.tiers.cluster]\nkind = \"shard\"\n",
                    "shards = [{{ endpoint = \"{}\" }}, {{ endpoint = \"{}\" }}]\n",
                    "[worker]\nembedded = false\n"
                ),
                shards[0].0, shards[1].0
            )),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await;
    let (chf, ch1, ch2) = (
        front.channel().await,
        s1.channel().await,
        s2.channel().await,
    );
    let owner = |d: &reapi::Digest| rendezvous::owner(&hash(d), &shards);

    // Uploaded through the front: each blob on its shard only, both shards used.
    let mut all = Vec::new();
    for i in 0..40u32 {
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
    let missing1 = blobs::find_missing(&ch1, "", F, digests.clone()).await;
    let missing2 = blobs::find_missing(&ch2, "", F, digests.clone()).await;
    for d in &digests {
        let on = [!missing1.contains(d), !missing2.contains(d)];
        let mut want = [false, false];
        want[owner(d)] = true;
        assert_eq!(on, want, "{d:?} is on its shard only");
    }
    assert!(
        missing1.len() > 5 && missing2.len() > 5,
        "both shards hold some"
    );

    // Blobs the front does not hold: found and read through their shard, then kept.
    let on = |shard: usize, tag: &str| {
        (0..)
            .map(|i| format!("{tag} {i}").into_bytes())
            .find(|data| owner(&digest(F, data)) == shard)
            .unwrap()
    };
    let (x, y, z) = (on(1, "x"), on(0, "y"), on(1, "z"));
    let (dx, dy, dz) = (digest(F, &x), digest(F, &y), digest(F, &z));
    common::exec::upload(
        &ch2,
        F,
        vec![(dx.clone(), x.clone()), (dz.clone(), z.clone())],
    )
    .await;
    common::exec::upload(&ch1, F, vec![(dy.clone(), y.clone())]).await;
    assert!(blobs::find_missing(&chf, "", F, vec![dx.clone()])
        .await
        .is_empty());
    assert_eq!(
        blobs::read(&chf, &read_name("", F, &dx), 0, 0)
            .await
            .unwrap(),
        x
    );
    assert_eq!(
        blobs::read(&chf, &read_name("", F, &dl), 0, 0)
            .await
            .unwrap(),
        large
    );

    // s1 down: its blobs are unavailable through the front, s2's are not.
    s1.stop().await;
    let e = blobs::read(&chf, &read_name("", F, &dy), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&format!("CAS shard {}", shards[0].0)),
        "{e:?}"
    );
    assert_eq!(
        blobs::read(&chf, &read_name("", F, &dz), 0, 0)
            .await
            .unwrap(),
        z
    );
    assert_eq!(
        blobs::read(&chf, &read_name("", F, &dx), 0, 0)
            .await
            .unwrap(),
        x,
        "kept by the front"
    );
    assert_eq!(
        blobs::find_missing(&chf, "", F, vec![dy.clone(), dz.clone()]).await,
        vec![dy.clone()],
        "a down shard's blobs answered missing"
    );
    let (new1, new2) = (on(0, "new"), on(1, "new"));
    let upload = |data: Vec<u8>| {
        let chf = chf.clone();
        async move {
            let d = digest(F, &data);
            blobs::cas(&chf)
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
                .into_inner()
                .responses[0]
                .status
                .clone()
                .unwrap()
                .code
        }
    };
    assert_eq!(
        upload(new1).await,
        Code::Unavailable as i32,
        "s1's upload fails"
    );
    assert_eq!(upload(new2).await, 0, "s2's goes on");
    front.stop().await;
    s2.stop().await;
}
