//! The workers' directory cache and placement by input root, end to end: `kiln serve` (its
//! embedded worker off) plus `kiln worker` processes, on every data-plane backend.

#[macro_use]
mod common;

use common::blobs;
use common::exec::{code, execute, start_server, start_worker, worker_of, Spec, Tree};
use kiln_proto::reapi::digest_function::Value as Function;

const F: Function = Function::Sha256;

async fn read(ch: &tonic::transport::Channel, d: &kiln_proto::reapi::Digest) -> Vec<u8> {
    common::exec::read_output(ch, F, d).await
}

// The worker's directory cache: an action whose input root the worker has laid out before
// (a rebuild with a new salt: same inputs, new action) gets it from the cache, and so does
// one after the worker was killed and restarted (the entry is checked against its manifest
// first); the server exports the counts the worker reports, and shows them on /status.
on_every_runtime! {
    async fn a_repeated_input_root_comes_from_the_worker_directory_cache(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let wdir = dir.path().join("w1");
        let mut w = start_worker(rt, &kiln, &wdir, "w1", &["--admin-listen", "127.0.0.1:0"]).await;
        // The worker's own metrics, on the address it logged.
        let worker_admin = w.admin();
        let ch = kiln.channel().await;
        let tree = Tree::default()
            .file("src/a.txt", b"alpha ", false)
            .file("src/deep/b.txt", b"beta ", false)
            .file("bin/tool", b"#!/bin/sh\necho tool\n", true);
        let run = |salt: &str| Spec {
            tree: tree.clone(),
            ..Spec::script(&format!("cat src/a.txt src/deep/b.txt; ./bin/tool; echo {salt}"))
        };
        let counts = |admin: String| async move {
            (
                common::metric_if_any(&admin, "kiln_worker_dircache_hits_total{worker=\"w1\"}").await,
                common::metric_if_any(&admin, "kiln_worker_dircache_misses_total{worker=\"w1\"}").await,
            )
        };
        for (salt, hits) in [("one", 0.0), ("two", 1.0)] {
            let (_, r) = execute(&ch, F, &run(salt).upload(&ch, F).await, false).await.unwrap();
            assert_eq!(code(&r), 0, "{r:?}");
            let out = read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
            assert_eq!(out, format!("alpha beta tool\n{salt}\n").into_bytes());
            common::eventually("the worker's report", || {
                let admin = kiln.admin.clone();
                async move { (counts(admin).await == (Some(hits), Some(1.0))).then_some(()) }
            })
            .await;
        }
        assert_eq!(common::metric(&worker_admin, "kiln_worker_dircache_hits_total").await, 1.0);
        assert_eq!(common::metric(&worker_admin, "kiln_worker_dircache_misses_total").await, 1.0);
        assert_eq!(common::metric(&worker_admin, "kiln_worker_dircache_entries").await, 1.0);
        let (_, status) = common::curl(&format!("{}/status", kiln.admin), &[]);
        assert!(status.contains("id=\"workers\"") && status.contains("<th>w1</th>"), "{status}");
        assert!(status.contains("50.0% of 2 input roots from the cache"), "{status}");
        // Killed and started again on the same directories: the entry is kept.
        w.kill();
        let _w = start_worker(rt, &kiln, &wdir, "w1", &[]).await;
        let (_, r) = execute(&ch, F, &run("three").upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let out = read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
        assert_eq!(out, b"alpha beta tool\nthree\n");
        common::eventually("the restarted worker's hit to be counted", || {
            let admin = kiln.admin.clone();
            async move { (counts(admin).await == (Some(2.0), Some(1.0))).then_some(()) }
        })
        .await;
        kiln.stop().await;
    }
}

// Placement by locality: with every worker free, an action goes to the worker whose
// directory cache holds its input root — here the second worker, which the scheduler would not
// pick by load (ties go to the first to join) — and so does one whose root is new but shares
// a directory with that root.
on_every_runtime! {
    async fn an_action_goes_to_the_worker_that_has_its_input_root(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let _w1 = start_worker(rt, &kiln, &dir.path().join("w1"), "w1", &["--max-inflight", "1"]).await;
        let _w2 = start_worker(rt, &kiln, &dir.path().join("w2"), "w2", &["--max-inflight", "1"]).await;
        let ch = kiln.channel().await;
        // w1 is kept busy until the flag exists, so the first action of the shared root runs on w2.
        let (flag, started) = (dir.path().join("flag"), dir.path().join("started"));
        let hold = Spec::script(&format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.02; done",
            started.display(),
            flag.display()
        ));
        let hold = hold.upload(&ch, F).await;
        let held = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &hold, false).await }) };
        common::eventually("the holding action to start", || async { started.exists().then_some(()) }).await;
        let tree = Tree::default().file("src/x", b"shared ", false);
        let run = |salt: &str| Spec { tree: tree.clone(), ..Spec::script(&format!("cat src/x; echo {salt}")) };
        let (_, r) = execute(&ch, F, &run("first").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        std::fs::write(&flag, b"").unwrap();
        let (_, r) = held.await.unwrap().unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        common::eventually("w2's report of its new entry", || {
            let admin = kiln.admin.clone();
            async move { (common::metric_if_any(&admin, "kiln_worker_dircache_entries{worker=\"w2\"}").await == Some(1.0)).then_some(()) }
        })
        .await;
        for salt in ["second", "third"] {
            let (_, r) = execute(&ch, F, &run(salt).upload(&ch, F).await, false).await.unwrap();
            assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{salt}: {r:?}");
            let out = read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
            assert_eq!(out, format!("shared {salt}\n").into_bytes());
        }
        // Another input root sharing the `src` directory: no worker caches the root, and w2
        // caches most of its bytes (7 of 12), so it goes there too.
        let other = Spec {
            tree: tree.clone().file("extra", b"other", false),
            ..Spec::script("cat src/x extra")
        };
        let (_, r) = execute(&ch, F, &other.upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        // w2 busy with an action of that root: the next one waits for it a little
        // (`locality_wait_ms`), then goes to the idle w1.
        let (flag, started) = (dir.path().join("flag2"), dir.path().join("started2"));
        let hold = Spec {
            tree: tree.clone(),
            ..Spec::script(&format!("touch {}; while [ ! -e {} ]; do sleep 0.02; done", started.display(), flag.display()))
        };
        let hold = hold.upload(&ch, F).await;
        let held = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &hold, false).await }) };
        common::eventually("the second holding action to start", || async { started.exists().then_some(()) }).await;
        let (_, r) = execute(&ch, F, &run("fourth").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        std::fs::write(&flag, b"").unwrap();
        let (_, r) = held.await.unwrap().unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let placed = |reason: &'static str| {
            let admin = kiln.admin.clone();
            async move { common::metric(&admin, &format!("kiln_scheduler_placements_total{{reason=\"{reason}\"}}")).await }
        };
        assert_eq!(placed("input_root").await, 3.0, "second, third and the second holding action");
        assert_eq!(placed("input_tree").await, 1.0, "the root sharing `src`");
        assert_eq!(placed("load").await, 2.0, "the first holding action and the first of the root");
        assert_eq!(placed("holder_busy").await, 1.0, "fourth");
        kiln.stop().await;
    }
}

// A worker's stored input whose mode was changed while the worker was down is read-only
// again before an action gets it: the local CAS checks each file found at start-up before its
// first use, its mode too (the directory cache is off here, so the input comes from the CAS).
on_every_runtime! {
    async fn a_stored_input_whose_mode_changed_while_the_worker_was_down_is_read_only_again(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let wdir = dir.path().join("w1");
        std::fs::create_dir_all(&wdir).unwrap();
        let config = wdir.join("worker.toml");
        std::fs::write(&config, "[worker]\ndircache_bytes = 0\n").unwrap();
        let args = ["--config", config.to_str().unwrap()];
        let mut w = start_worker(rt, &kiln, &wdir, "w1", &args).await;
        let ch = kiln.channel().await;
        let data = b"an input kept in the worker's own CAS".to_vec();
        let run = |salt: &str| Spec {
            tree: Tree::default().file("in", &data, false),
            ..Spec::script(&format!("stat -c %a in; echo {salt}"))
        };
        for salt in ["before", "after"] {
            let (_, r) = execute(&ch, F, &run(salt).upload(&ch, F).await, false).await.unwrap();
            assert_eq!(code(&r), 0, "{r:?}");
            let out = read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
            assert_eq!(out, format!("444\n{salt}\n").into_bytes());
            if salt == "before" {
                w.kill();
                let stored = blobs::blob_file(&wdir.join("cas"), &blobs::digest(F, &data));
                std::fs::set_permissions(&stored, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
                w = start_worker(rt, &kiln, &wdir, "w1", &args).await;
            }
        }
        kiln.stop().await;
    }
}

/// Unmounts, when dropped, every mount below its directory: what a server killed while an
/// action ran would leave (so the test's directory can always be removed).
#[cfg(target_os = "linux")]
struct UnmountBelow(std::path::PathBuf);

#[cfg(target_os = "linux")]
impl Drop for UnmountBelow {
    fn drop(&mut self) {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let below = self.0.to_string_lossy().into_owned();
        for at in info.lines().filter_map(|l| l.split(' ').nth(4)) {
            if at.starts_with(&below) {
                if let Ok(at) = std::ffi::CString::new(at) {
                    // SAFETY: a valid C string; MNT_DETACH cannot fail in a harmful way.
                    unsafe { libc::umount2(at.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

/// A server (its embedded worker) whose worker mounts cached input roots as overlays, with
/// `extra` added to its `[worker]` section.
#[cfg(target_os = "linux")]
async fn overlay_server(dir: &std::path::Path, extra: &str) -> common::Kiln {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "overlay mounts need root: run the suite as root (CI does)"
    );
    // An action user other than root must be able to reach its directory.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    common::Kiln::start_async(
        &dir.join("server"),
        common::Options {
            config: Some(format!("[worker]\ndircache_layout = \"overlay\"\n{extra}")),
            ..common::Options::on(common::Runtime::Glommio)
        },
    )
    .await
}

// worker.dircache_layout = "overlay": a cached input root is an overlay mount over the
// cache entry (the action sees an overlayfs), and an action that writes to an input writes
// to its own layer: the next action sees the input as it was, and the server's CAS still
// holds it.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_overlay_layout_a_cached_input_root_is_mounted_and_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(dir.path().to_path_buf());
    let kiln = overlay_server(dir.path(), "").await;
    let ch = kiln.channel().await;
    let tree =
        Tree::default()
            .file("src/a.txt", b"alpha ", false)
            .file("src/deep/b.txt", b"beta ", false);
    let run = |script: &str| Spec {
        tree: tree.clone(),
        ..Spec::script(script)
    };
    let stdout = |r: kiln_proto::reapi::ExecuteResponse| r.result.unwrap().stdout_digest.unwrap();
    let fs_and_input = "stat -f -c %T .; cat src/a.txt src/deep/b.txt";
    let (_, r) = execute(&ch, F, &run(fs_and_input).upload(&ch, F).await, false)
        .await
        .unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    let first = String::from_utf8(read(&ch, &stdout(r)).await).unwrap();
    assert!(first.ends_with("\nalpha beta "), "{first}");
    assert!(
        !first.starts_with("overlayfs"),
        "a miss is laid out from the CAS: {first}"
    );
    let tamper =
        "stat -f -c %T .; chmod u+w src/a.txt && printf 'tampered ' > src/a.txt; cat src/a.txt";
    let (_, r) = execute(&ch, F, &run(tamper).upload(&ch, F).await, false)
        .await
        .unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    assert_eq!(read(&ch, &stdout(r)).await, b"overlayfs\ntampered ");
    let (_, r) = execute(&ch, F, &run(fs_and_input).upload(&ch, F).await, false)
        .await
        .unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    assert_eq!(read(&ch, &stdout(r)).await, b"overlayfs\nalpha beta ");
    assert_eq!(read(&ch, &blobs::digest(F, b"alpha ")).await, b"alpha ");
    kiln.stop().await;
}

// The overlay layout with worker.run_as_user: the action (as nobody) creates its outputs in
// the mounted tree, and an input it declares as an output (a file the worker owns, on the
// mount) is collected like one it made.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_overlay_layout_an_action_run_as_another_user_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(dir.path().to_path_buf());
    let kiln = overlay_server(dir.path(), "run_as_user = \"nobody\"\n").await;
    let ch = kiln.channel().await;
    let run = || Spec {
        tree: Tree::default().file("src/a.txt", b"alpha", false),
        outputs: vec!["out/uid".into(), "out/fs".into(), "src/a.txt".into()],
        ..Spec::script("id -u > out/uid; stat -f -c %T . > out/fs")
    };
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap()
        .stdout;
    for fs in [None, Some(&b"overlayfs\n"[..])] {
        let (_, r) = execute(&ch, F, &run().upload(&ch, F).await, false)
            .await
            .unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        let file = |name: &str| common::exec::output_file(&r, name);
        assert_eq!(read(&ch, &file("out/uid")).await, nobody);
        assert_eq!(read(&ch, &file("src/a.txt")).await, b"alpha");
        if let Some(fs) = fs {
            assert_eq!(read(&ch, &file("out/fs")).await, fs);
        }
    }
    kiln.stop().await;
}
