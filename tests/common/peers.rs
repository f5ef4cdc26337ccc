//! Peer tests' shared parts: workers in pools, the inputs they fetch, and waiting for the
//! scheduler to know what they hold (tests/peers.rs, tests/quic.rs).

use super::exec::{start_worker, Spec, Tree, Worker};
use super::metric_or_zero as number;
use std::path::Path;

/// A worker in pool `pool` with `config` as its `[worker]` settings (dircache off, so every
/// input is fetched); returns it and its admin address.
pub async fn worker(
    rt: super::Runtime,
    kiln: &super::Kiln,
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
pub fn pool_args<'a>(config: &'a str, property: &'a str) -> [&'a str; 8] {
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
pub fn inputs(tag: &str) -> (Tree, u64) {
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

/// An action on pool `pool` reading every input of `tree`, salted with `salt`.
pub fn run_on(pool: &str, tree: &Tree, salt: &str) -> Spec {
    Spec {
        tree: tree.clone(),
        platform: vec![("pool".into(), pool.into())],
        ..Spec::script(&format!("cat big small/* | wc -c; echo {salt}"))
    }
}

/// Waits until the scheduler knows of at least `facts` blobs held by workers.
pub async fn facts_known(admin: &str, facts: f64) {
    super::eventually("the workers' reports of what they hold", || async move {
        (number(admin, "kiln_scheduler_blob_facts").await >= facts).then_some(())
    })
    .await;
}
