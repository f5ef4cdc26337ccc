//! Actions cannot reach past their run, against a real `kiln serve` and its embedded worker
//! on every backend: a write to an input never reaches the CAS, paths and symlinks that
//! escape the input root are refused, no process outlives its action, and with
//! `worker.run_as_user` inputs cannot even be made writable.

#[macro_use]
mod common;

use common::blobs::{self, read_name};
use common::exec::{code, execute, read_output, Spec, Tree};
use common::{Kiln, Options};
use kiln_proto::reapi::{digest_function::Value as Function, Tree as TreeMsg};
use prost::Message;
use tonic::Code;

const F: Function = Function::Sha256;

async fn read(ch: &tonic::transport::Channel, d: &kiln_proto::reapi::Digest) -> Vec<u8> {
    read_output(ch, F, d).await
}

// Inputs are hardlinks into the CAS — with the embedded worker, the server's own CAS. An
// action that makes one writable and writes to it must not leave the CAS serving the new
// bytes: the blob is dropped (clients upload it again) and later actions get the original.
on_every_runtime! {
    async fn an_action_writing_to_an_input_does_not_corrupt_the_cas(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let original = b"pristine input".to_vec();
        let tree = Tree::default().file("in", &original, false);
        let spec = Spec {
            tree: tree.clone(),
            ..Spec::script("chmod u+w in && printf 'tampered input' > in; cat in")
        };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        assert_eq!(read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await, b"tampered input");
        let d = common::blobs::digest(F, &original);
        common::eventually("the written input to leave the CAS", || {
            let (ch, d) = (ch.clone(), d.clone());
            async move { (blobs::find_missing(&ch, "", F, vec![d]).await.len() == 1).then_some(()) }
        })
        .await;
        let err = blobs::read(&ch, &read_name("", F, &d), 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // Uploaded again (as Bazel would after FAILED_PRECONDITION), it is intact.
        let again = Spec { tree, ..Spec::script("cat in") };
        let (_, r) = execute(&ch, F, &again.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await, original);
        // Touching an input changes its time, not its content: the blob stays.
        let touch = Spec { tree: Tree::default().file("in", &original, false), ..Spec::script("touch in") };
        let (_, r) = execute(&ch, F, &touch.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        assert!(blobs::find_missing(&ch, "", F, vec![d.clone()]).await.is_empty(), "a touched input is kept");
        // Dropping a pinned blob gave its pinned bytes back too.
        common::eventually("every pin to be released", || {
            let admin = kiln.admin.clone();
            async move { (common::metric(&admin, "kiln_cas_pinned_bytes").await == 0.0).then_some(()) }
        })
        .await;
        kiln.stop().await;
    }
}

// With the directory cache, an input file is the same inode in the CAS and in every cache
// entry holding it. An action that writes to one (linked from the cache) must leave no entry
// serving the new bytes: every entry with that content is evicted, not only the one it came
// from; when it writes to two such inputs, both leave the CAS (the first one's eviction must
// not lose the second one's digest). An action that only changes an input's mode or time has
// them put back.
on_every_runtime! {
    async fn an_action_writing_to_a_cached_input_leaves_no_entry_serving_it(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let original = b"pristine shared input".to_vec();
        let second = b"another pristine input".to_vec();
        let a = Tree::default().file("in", &original, false).file("in2", &second, false).file("a", b"only in a", false);
        let b = Tree::default().file("in", &original, false).file("in2", &second, false).file("b", b"only in b", false);
        let run = |tree: &Tree, script: &str| Spec { tree: tree.clone(), ..Spec::script(script) };
        let stdout = |r: kiln_proto::reapi::ExecuteResponse| r.result.unwrap().stdout_digest.unwrap();
        // Both roots built into entries (sharing the CAS's inode of `in`), then `a` again:
        // linked from its entry.
        for (tree, salt) in [(&a, "1"), (&b, "2"), (&a, "3")] {
            let (_, r) = execute(&ch, F, &run(tree, &format!("cat in; echo {salt}")).upload(&ch, F).await, false).await.unwrap();
            assert_eq!(code(&r), 0, "{r:?}");
        }
        // Only the mode changed: put back, and the entry stays.
        let chmod = run(&a, "chmod 644 in; stat -c %a in");
        let (_, r) = execute(&ch, F, &chmod.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(read(&ch, &stdout(r)).await, b"644\n");
        let check = run(&a, "stat -c %a in; cat in");
        let (_, r) = execute(&ch, F, &check.upload(&ch, F).await, false).await.unwrap();
        let mut want = b"444\n".to_vec();
        want.extend_from_slice(&original);
        assert_eq!(read(&ch, &stdout(r)).await, want, "mode put back");
        // Written through the link from `a`'s entry.
        let tamper = run(&a, "chmod u+w in in2 && printf 'tampered shared input' > in && printf 'tampered too' > in2; cat in");
        let (_, r) = execute(&ch, F, &tamper.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(read(&ch, &stdout(r)).await, b"tampered shared input");
        let written = vec![blobs::digest(F, &original), blobs::digest(F, &second)];
        common::eventually("both written inputs to leave the CAS", || {
            let (ch, written) = (ch.clone(), written.clone());
            async move { (blobs::find_missing(&ch, "", F, written).await.len() == 2).then_some(()) }
        })
        .await;
        // `b`'s entry shared that inode too: uploaded again, `b` gets the original bytes.
        let again = run(&b, "cat in; echo 4");
        let (_, r) = execute(&ch, F, &again.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let mut want = original.clone();
        want.extend_from_slice(b"4\n");
        assert_eq!(read(&ch, &stdout(r)).await, want);
        kiln.stop().await;
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

on_every_runtime! {
    async fn escaping_paths_and_trees_are_refused(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let refused = |spec: Spec, needle: &'static str| {
            let ch = ch.clone();
            async move {
                let err = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
                assert!(err.message().contains(needle), "{needle}: {err:?}");
            }
        };
        refused(Spec { outputs: vec!["../escape".into()], ..Spec::script("true") }, "leaves the input root").await;
        refused(Spec { outputs: vec!["out/a".into(), "out/b/../a".into()], ..Spec::script("true") }, "declared more than once").await;
        refused(Spec { outputs: vec!["/etc/passwd".into()], ..Spec::script("true") }, "is absolute").await;
        refused(Spec { outputs: vec!["a//b".into()], ..Spec::script("true") }, "empty component").await;
        refused(
            Spec { working_directory: "../up".into(), ..Spec::script("true") },
            "Command.working_directory",
        )
        .await;
        refused(
            Spec { tree: Tree::default().symlink("pkg/out", "../../outside"), ..Spec::script("true") },
            "leaves the input root",
        )
        .await;
        refused(
            Spec { tree: Tree::default().symlink("etc", "/etc"), ..Spec::script("true") },
            "is absolute",
        )
        .await;
        // Trees at most 256 levels deep (the worker walks them a handle per level): deeper
        // inputs are refused before anything runs, deeper outputs fail their action.
        let deep = format!("{}f", "d/".repeat(257));
        refused(
            Spec { tree: Tree::default().file(&deep, b"x", false), ..Spec::script("true") },
            "levels below the input root",
        )
        .await;
        // A tree of 31 distinct directories, each naming the next twice: laid out, 2^31
        // entries. Refused before anything is made.
        let bomb = Spec { tree: Tree::default().file("f", b"x", false).doubled(30), ..Spec::script("true") };
        let started = std::time::Instant::now();
        let (_, r) = execute(&ch, F, &bomb.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), Code::InvalidArgument as i32, "{r:?}");
        assert!(r.status.as_ref().unwrap().message.contains("lays out"), "{r:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        let too_deep = Spec {
            outputs: vec!["deep".into()],
            ..Spec::script("mkdir -p deep/$(printf 'd/%.0s' $(seq 300))")
        };
        let (_, r) = execute(&ch, F, &too_deep.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), Code::InvalidArgument as i32, "{r:?}");
        // Inside the root, `..` is fine, from the working directory too.
        let ok = Spec {
            tree: Tree::default().file("pkg/sub/in", b"x", false).symlink("pkg/link", "sub/in"),
            working_directory: "pkg/sub".into(),
            outputs: vec!["../made".into()],
            ..Spec::script("cat ../link > ../made")
        };
        let (_, r) = execute(&ch, F, &ok.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let made = r.result.unwrap();
        assert_eq!(made.output_files[0].path, "../made");
        assert_eq!(read(&ch, made.output_files[0].digest.as_ref().unwrap()).await, b"x");
        // An output that is a symlink out of the root is reported as a symlink, not followed;
        // a parent the action turned into a symlink is never followed.
        let links = Spec {
            outputs: vec!["out/link".into(), "d/hostname".into()],
            ..Spec::script("ln -s /etc/hostname out/link")
        };
        let (_, r) = execute(&ch, F, &links.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        assert_eq!(r.output_symlinks.len(), 1);
        assert_eq!(r.output_symlinks[0].target, "/etc/hostname");
        assert!(r.output_files.is_empty());
        // A FIFO where an output file should be is refused, not read (which would block).
        let fifo = Spec { outputs: vec!["out/fifo".into()], ..Spec::script("mkfifo out/fifo") };
        let (_, r) = execute(&ch, F, &fifo.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), Code::InvalidArgument as i32, "{r:?}");
        // "" is the whole working directory (REAPI allows it for output directories).
        let whole = Spec {
            tree: Tree::default().file("w/in", b"input", false),
            working_directory: "w".into(),
            outputs: vec!["".into()],
            ..Spec::script("echo made > made")
        };
        let (_, r) = execute(&ch, F, &whole.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let dirs = r.result.unwrap().output_directories;
        assert_eq!(dirs.len(), 1);
        assert_eq!(dirs[0].path, "");
        let tree = TreeMsg::decode(read(&ch, dirs[0].tree_digest.as_ref().unwrap()).await.as_slice()).unwrap();
        let mut names: Vec<String> = tree.root.unwrap().files.into_iter().map(|f| f.name).collect();
        names.sort();
        assert_eq!(names, ["in", "made"]);
        let swapped = Spec {
            outputs: vec!["d/hostname".into()],
            ..Spec::script("rmdir d && ln -s /etc d")
        };
        let (_, r) = execute(&ch, F, &swapped.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), Code::InvalidArgument as i32, "{r:?}");
        assert!(r.status.unwrap().message.contains("is a symlink"));
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn no_process_outlives_its_action(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        // A daemon in a new session keeps appending to the output after the action exits.
        let spec = Spec {
            outputs: vec!["out/grow".into()],
            ..Spec::script(
                "setsid sh -c 'while :; do echo more >> out/grow; done' >/dev/null 2>&1 & echo $!; echo first >> out/grow",
            )
        };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        let pid: i32 = String::from_utf8(read(&ch, r.stdout_digest.as_ref().unwrap()).await)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!alive(pid), "the setsid daemon {pid} outlived its action");
        // The stored output is exactly the bytes that were hashed.
        let grow = &r.output_files[0];
        let bytes = read(&ch, grow.digest.as_ref().unwrap()).await;
        assert_eq!(common::blobs::digest(F, &bytes), grow.digest.clone().unwrap());
        kiln.stop().await;
    }
}

// worker.run_as_user as a list: each running action takes a user of its own, so two at once
// run as two users (they meet in a directory of the test's to prove they overlapped), and
// neither can list the work directory to find the other's tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_actions_take_users_of_their_own() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run_as_user needs the worker to run as root: run the suite as root (CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let meet = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(
        meet.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let kiln = Kiln::start_async(
        &dir.path().join("server"),
        Options {
            config: Some(
                "[worker]\nmax_inflight = 2\nrun_as_user = [\"nobody\", \"daemon\"]\n".into(),
            ),
            ..Options::on(common::Runtime::Glommio)
        },
    )
    .await;
    let ch = kiln.channel().await;
    let script = format!(
        "id -u > out/uid; ls ../.. > out/others 2>/dev/null; touch {m}/$(id -u); i=0; while [ $(ls {m} | wc -l) -lt 2 ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; ls {m} | wc -l > out/met",
        m = meet.path().display()
    );
    let spec = || Spec {
        outputs: vec!["out/uid".into(), "out/others".into(), "out/met".into()],
        ..Spec::script(&script)
    };
    let (a, b) = (spec(), spec());
    let (a, b) = (a.upload(&ch, F).await, b.upload(&ch, F).await);
    let (ra, rb) = tokio::join!(execute(&ch, F, &a, false), execute(&ch, F, &b, false));
    let mut uids = Vec::new();
    for (_, r) in [ra.unwrap(), rb.unwrap()] {
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        let file = |name: &str| common::exec::output_file(&r, name);
        assert_eq!(
            read(&ch, &file("out/met")).await,
            b"2\n",
            "both ran at once"
        );
        assert!(
            read(&ch, &file("out/others")).await.is_empty(),
            "the work directory cannot be listed"
        );
        uids.push(read(&ch, &file("out/uid")).await);
    }
    assert_ne!(uids[0], uids[1], "two users");
    kiln.stop().await;
}

// worker.run_as_user: the action runs as that user and cannot make its (worker-owned,
// read-only) inputs writable, so the CAS copy stays intact without relying on the tamper
// check; it still creates its outputs in its own tree.
on_every_runtime! {
    async fn actions_run_as_another_user_cannot_touch_their_inputs(rt: Runtime) {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "run_as_user needs the worker to run as root: run the suite as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        // The action user must be able to reach its directory.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let kiln = Kiln::start_async(
            &dir.path().join("server"),
            Options {
                config: Some("[worker]\nrun_as_user = \"nobody\"\n".into()),
                ..Options::on(rt)
            },
        ).await;
        let ch = kiln.channel().await;
        let original = b"owned by the worker".to_vec();
        let spec = Spec {
            tree: Tree::default().file("in", &original, false),
            outputs: vec!["out/uid".into(), "out/seen".into()],
            // Even putting the mtime back afterwards (which the tamper check cannot see) has
            // nothing to hide: the chmod fails.
            ..Spec::script("id -u > out/uid; touch -r in /tmp/kiln-ref-$$ 2>/dev/null; chmod u+w in 2>/dev/null && printf 'tampered inputs!!!!' > in && touch -r /tmp/kiln-ref-$$ in; rm -f /tmp/kiln-ref-$$; cat in > out/seen")
        };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let r = r.result.unwrap();
        let file = |name: &str| common::exec::output_file(&r, name);
        let nobody = std::process::Command::new("id").args(["-u", "nobody"]).output().unwrap().stdout;
        assert_eq!(read(&ch, &file("out/uid")).await, nobody);
        assert_eq!(read(&ch, &file("out/seen")).await, original, "the input could not be changed");
        let d = common::blobs::digest(F, &original);
        assert!(blobs::find_missing(&ch, "", F, vec![d.clone()]).await.is_empty());
        assert_eq!(read(&ch, &d).await, original);
        kiln.stop().await;
    }
}
