//! The behaviour every [`Cas`] must show, run against each implementation the worker and the
//! control plane use (an implementation is a drop-in): the store's chain in this process
//! ([`ChainCas`]) and a server over gRPC ([`RemoteCas`], whole and in ranges). Both views
//! are of one real data plane on glommio over files in a temp directory, served on
//! 127.0.0.1, so what one writes the other reads.

use crate::remote::{CasLinks, RemoteCas, SMALL};
use bytes::Bytes;
use kiln_config::Config;
use kiln_dataplane::metrics::Metrics;
use kiln_dataplane::runtime::GlommioBackend;
use kiln_dataplane::server::{DataPlane, OpenedStore};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::ChainCas;
use kiln_reapi::cas::{read_blob, Cas, CasError};
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use kiln_reapi::status::{Classify, ErrorKind};
use std::sync::Arc;

/// A data plane over a temp directory, and the ways to reach its CAS.
struct Fixture {
    dir: tempfile::TempDir,
    plane: Option<DataPlane>,
    chain: ChainCas,
}

impl Fixture {
    fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshards = 2\n[storage]\ndata_dir = {:?}\nfsync = false\n",
            dir.path().join("cas").display().to_string()
        );
        let config = Config::from_toml(&text, "test").expect("config");
        let store = OpenedStore::open(&config, 2, Metrics::new()).expect("store");
        let chain = ChainCas::new(
            store.cas(),
            store.chain(),
            Layout::cas(&dir.path().join("cas")),
            false,
        );
        let plane = DataPlane::start(
            &config,
            store,
            Arc::new(GlommioBackend),
            None,
            None,
            Arc::new(kiln_auth::Policy::disabled()),
        )
        .expect("data plane");
        Fixture {
            dir,
            plane: Some(plane),
            chain,
        }
    }

    /// The same CAS over gRPC; `ranged`: large blobs in four ranges on two connections.
    async fn remote(&self, ranged: bool) -> RemoteCas {
        let addr = self.plane.as_ref().expect("running").local_addr();
        let link = crate::link::Link::new(&format!("grpc://{addr}"), None).expect("link");
        let main = link.connect().await.expect("connect");
        let links = if ranged {
            let other = link.connect().await.expect("connect");
            CasLinks {
                ranges: Arc::from(vec![main.clone(), other.clone(), main.clone(), other]),
                main,
                ranged_min: 1 << 20,
            }
        } else {
            CasLinks::single(main)
        };
        RemoteCas::new(links)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut plane) = self.plane.take() {
            drop(plane.begin_shutdown());
            plane.finish_shutdown();
        }
    }
}

/// Bytes that differ with `seed`, of `len`.
fn bytes(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn instance(name: &str) -> InstanceName {
    InstanceName::new(name).expect("instance")
}

/// The behaviour itself; `name` says which implementation failed. Each call uses its own
/// instance name, so that what one implementation wrote does not answer for the other.
async fn behaves(cas: &dyn Cas, name: &str, scratch: &std::path::Path) {
    let inst = instance(name);
    let f = DigestFunction::Sha256;
    let small = bytes(1, 1000);
    let medium = bytes(2, SMALL as usize + 1);
    let large = bytes(3, (3 << 20) + 17);
    let absent = bytes(4, 10);
    let b3 = bytes(5, 100);
    let d = |data: &Bytes| Digest::of(f, data);
    let (ds, dm, dl, da) = (d(&small), d(&medium), d(&large), d(&absent));
    let db3 = Digest::of(DigestFunction::Blake3, &b3);
    let empty = Digest::of(f, b"");

    // Nothing is there yet but the empty blob, and the answer keeps the order asked.
    let asked = [ds, empty, dm, db3, dl];
    let missing = cas.find_missing(&inst, &asked).await.expect("find_missing");
    assert_eq!(missing, vec![ds, dm, db3, dl], "{name}: before writing");

    // Blobs in memory (small, past a batch's blob size, another digest function) and a
    // large file.
    let writes = vec![(ds, small.clone()), (dm, medium.clone()), (db3, b3.clone())];
    cas.write_blobs(&inst, writes).await.expect("write_blobs");
    let file = scratch.join(format!("{name}-large"));
    std::fs::write(&file, &large).expect("file");
    cas.write_file(&inst, dl, &file).await.expect("write_file");

    let missing = cas.find_missing(&inst, &[da, ds, dl, db3, dm]).await;
    assert_eq!(
        missing.expect("find_missing"),
        vec![da],
        "{name}: after writing"
    );
    // Another instance is another CAS.
    let other = instance(&format!("{name}-other"));
    let missing = cas.find_missing(&other, &[ds]).await.expect("find_missing");
    assert_eq!(missing, vec![ds], "{name}: another instance");

    // Whole reads: in order, each checked, `None` for what is not there.
    let read = cas
        .read_blobs(&inst, &[dm, da, ds, empty, db3])
        .await
        .expect("read_blobs");
    let expected = [
        Some(medium.clone()),
        None,
        Some(small.clone()),
        Some(Bytes::new()),
        Some(b3.clone()),
    ];
    assert_eq!(read, expected, "{name}: read_blobs");
    let one = read_blob(cas, &inst, dl).await.expect("read_blob");
    assert!(
        one.as_deref() == Some(&large[..]),
        "{name}: a large blob read whole"
    );

    // Into files: the bytes exactly; a blob not there leaves no file.
    let out = scratch.join(format!("{name}-out"));
    assert!(cas
        .read_to_file(&inst, dl, &out)
        .await
        .expect("read_to_file"));
    assert!(
        std::fs::read(&out).expect("read") == large,
        "{name}: read_to_file"
    );
    // A file already there is not replaced, and not removed.
    let taken = scratch.join(format!("{name}-taken"));
    std::fs::write(&taken, b"someone else's").expect("file");
    let refused = cas.read_to_file(&inst, dl, &taken).await;
    assert!(
        refused.is_err(),
        "{name}: onto an existing file: {refused:?}"
    );
    assert_eq!(std::fs::read(&taken).expect("read"), b"someone else's");
    assert!(
        cas.find_missing(&inst, &[dl])
            .await
            .expect("find")
            .is_empty(),
        "{name}: the blob is not blamed for it"
    );
    let none = scratch.join(format!("{name}-none"));
    let found = cas
        .read_to_file(&inst, da, &none)
        .await
        .expect("read_to_file");
    assert!(!found, "{name}: a missing blob");
    assert!(!none.exists(), "{name}: no file for a missing blob");
}

/// A tokio runtime of two worker threads, as the control plane and the worker run.
fn two_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn every_cas_behaves_the_same() {
    let fixture = Fixture::start();
    let runtime = two_threads();
    runtime.block_on(async {
        let scratch = fixture.dir.path();
        behaves(&fixture.chain, "chain", scratch).await;
        behaves(&fixture.remote(false).await, "remote", scratch).await;
        behaves(&fixture.remote(true).await, "remote-ranged", scratch).await;
    });
}

/// Listing the store (a worker's full report to the scheduler) finds every blob, from both
/// shards, and at most as many as asked for.
#[test]
fn the_store_lists_what_it_holds_up_to_a_bound() {
    let fixture = Fixture::start();
    let runtime = two_threads();
    runtime.block_on(async {
        let main = instance("listed");
        let blobs: Vec<(Digest, Bytes)> = (0..40u8)
            .map(|n| {
                let data = bytes(n, 100 + usize::from(n));
                (Digest::of(DigestFunction::Sha256, &data), data)
            })
            .collect();
        let mut wanted: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        fixture
            .chain
            .write_blobs(&main, blobs)
            .await
            .expect("write");
        let mut all: Vec<Digest> = fixture
            .chain
            .client()
            .keys(1_000)
            .await
            .expect("keys")
            .into_iter()
            .map(|k| k.digest)
            .collect();
        all.sort_by_key(|d| d.hash);
        wanted.sort_by_key(|d| d.hash);
        assert_eq!(all, wanted);
        let some = fixture.chain.client().keys(10).await.expect("keys");
        assert_eq!(some.len(), 10, "proportional shares, cut to the bound");
    });
}

/// A server checks what it is given: bytes that do not hash to their digest are refused,
/// with INVALID_ARGUMENT from the server seen as the remote CAS failing (not as a missing
/// blob), and nothing is stored.
#[test]
fn a_server_refuses_bytes_that_do_not_match_their_digest() {
    let fixture = Fixture::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let remote = fixture.remote(false).await;
        let inst = instance("main");
        let claimed = Digest::of(DigestFunction::Sha256, b"what was promised");
        let wrong = Bytes::from_static(b"what was sent, other");
        let wrong = wrong.slice(..claimed.size as usize);
        let err = remote
            .write_blobs(&inst, vec![(claimed, wrong)])
            .await
            .expect_err("a mismatch is refused");
        match &err {
            CasError::Remote(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let missing = remote.find_missing(&inst, &[claimed]).await.expect("find");
        assert_eq!(missing, vec![claimed]);
    });
}

/// A write whose caller gives up after it started still ends: the blob is stored and no temp
/// file is left behind in the CAS's temp directory.
#[test]
fn a_write_abandoned_by_its_caller_is_finished() {
    let fixture = Fixture::start();
    // One thread: the task a write hands its work to cannot run (and finish) before the
    // write's first poll returns, so the write is certainly abandoned half-way. (On two
    // threads it sometimes finished first, and the test then proved nothing and failed.)
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let inst = instance("main");
        let data = bytes(9, 3 << 20);
        let d = Digest::of(DigestFunction::Sha256, &data);
        let key = kiln_reapi::digest::BlobKey::new(inst.clone(), d);
        {
            let write = fixture.chain.put_bytes(&key, data.clone());
            futures::pin_mut!(write);
            // Started (its first step runs), then dropped: the caller gave up.
            assert!(futures::poll!(write.as_mut()).is_pending());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let missing = fixture.chain.find_missing(&inst, &[d]).await.expect("find");
            if missing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned write never finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // A temp file handed over for commit (a worker's finished download), the same way.
        let other = bytes(10, 3 << 20);
        let od = Digest::of(DigestFunction::Sha256, &other);
        let okey = kiln_reapi::digest::BlobKey::new(inst.clone(), od);
        let temp = fixture.chain.layout().temp_path();
        std::fs::write(&temp, &other).expect("temp file");
        {
            let commit = fixture.chain.commit(&okey, temp, None, 0);
            futures::pin_mut!(commit);
            assert!(futures::poll!(commit.as_mut()).is_pending());
        }
        while !fixture
            .chain
            .find_missing(&inst, &[od])
            .await
            .expect("find")
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned commit never finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let tmp = fixture.dir.path().join("cas/tmp");
        assert!(tmp.is_dir());
        let temps: Vec<_> = walk(&tmp);
        assert!(temps.is_empty(), "left behind: {temps:?}");
    });
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
