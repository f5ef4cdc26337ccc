//! ActionCache against a real server: round trips, completeness checking (including files
//! inside output directory trees, and a result whose blob was evicted after it was found
//! complete), bad input, and instances kept apart.

#[macro_use]
mod common;

use bytes::Bytes;
use common::blobs::{self, digest, write_name};
use common::{eventually, Kiln, Options};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::{
    self, digest_function::Value as Function, ActionResult, Directory, FileNode,
    GetActionResultRequest, OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

fn ac(ch: &Channel) -> ActionCacheClient<Channel> {
    ActionCacheClient::new(ch.clone())
}

async fn get(
    ch: &Channel,
    instance: &str,
    function: Function,
    action: &reapi::Digest,
) -> Result<ActionResult, tonic::Status> {
    ac(ch)
        .get_action_result(GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: vec![],
            digest_function: function as i32,
        })
        .await
        .map(|r| r.into_inner())
}

async fn update(
    ch: &Channel,
    instance: &str,
    function: Function,
    action: &reapi::Digest,
    result: ActionResult,
) -> Result<ActionResult, tonic::Status> {
    ac(ch)
        .update_action_result(UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: function as i32,
        })
        .await
        .map(|r| r.into_inner())
}

async fn upload(ch: &Channel, instance: &str, function: Function, data: &[u8]) -> reapi::Digest {
    let d = digest(function, data);
    blobs::write(ch, &write_name(instance, function, &d), data, 1 << 16)
        .await
        .unwrap();
    d
}

fn output_file(path: &str, d: &reapi::Digest) -> OutputFile {
    OutputFile {
        path: path.into(),
        digest: Some(d.clone()),
        is_executable: false,
        contents: Bytes::new(),
        node_properties: None,
    }
}

on_every_runtime! {
    async fn round_trip_and_miss_for_both_functions(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        for function in [Function::Sha256, Function::Blake3] {
            let action = digest(function, b"an action");
            assert_eq!(
                get(&ch, "", function, &action).await.unwrap_err().code(),
                Code::NotFound
            );
            let out = upload(&ch, "", function, b"output bytes").await;
            let stdout = upload(&ch, "", function, b"hello from stdout").await;
            let result = ActionResult {
                output_files: vec![output_file("out/a.txt", &out)],
                stdout_digest: Some(stdout),
                exit_code: 0,
                ..Default::default()
            };
            update(&ch, "", function, &action, result.clone())
                .await
                .unwrap();
            assert_eq!(get(&ch, "", function, &action).await.unwrap(), result);
            // Another instance does not see it.
            assert_eq!(
                get(&ch, "other", function, &action)
                    .await
                    .unwrap_err()
                    .code(),
                Code::NotFound
            );
        }
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn entries_with_missing_blobs_are_misses(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;

        // An output file that was never uploaded.
        let action = digest(f, b"action 1");
        let absent = digest(f, b"never uploaded");
        update(
            &ch,
            "",
            f,
            &action,
            ActionResult {
                output_files: vec![output_file("x", &absent)],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let err = get(&ch, "", f, &action).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(
            err.message().contains("no longer in the CAS"),
            "{}",
            err.message()
        );
        upload(&ch, "", f, b"never uploaded").await;
        get(&ch, "", f, &action).await.unwrap();

        // An output directory whose Tree is present but a file inside it is not.
        let inner = b"file inside the tree".to_vec();
        let inner_digest = digest(f, &inner);
        let child = Directory {
            files: vec![FileNode {
                name: "inner.txt".into(),
                digest: Some(inner_digest),
                is_executable: true,
                node_properties: None,
            }],
            ..Default::default()
        };
        let tree = Tree {
            root: Some(Directory::default()),
            children: vec![child],
        };
        let tree_digest = upload(&ch, "", f, &tree.encode_to_vec()).await;
        let action = digest(f, b"action 2");
        update(
            &ch,
            "",
            f,
            &action,
            ActionResult {
                output_directories: vec![OutputDirectory {
                    path: "outdir".into(),
                    tree_digest: Some(tree_digest),
                    is_topologically_sorted: false,
                    root_directory_digest: None,
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            get(&ch, "", f, &action).await.unwrap_err().code(),
            Code::NotFound
        );
        upload(&ch, "", f, &inner).await;
        get(&ch, "", f, &action).await.unwrap();

        // The same entry under a different instance: its blobs are not there.
        update(
            &ch,
            "ci",
            f,
            &action,
            get(&ch, "", f, &action).await.unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            get(&ch, "ci", f, &action).await.unwrap_err().code(),
            Code::NotFound
        );
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn bad_input_is_refused(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_on(rt, dir.path()).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let action = digest(f, b"x");
        // A GetActionResult too large for the data plane to look at (over 16 KiB) is handed
        // to the control plane with what was read of it, and answered there: an instance name
        // that long is refused.
        let err = get(&ch, &"i".repeat(20 << 10), f, &action).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("instance name"), "{}", err.message());
        // No result.
        let err = ac(&ch)
            .update_action_result(UpdateActionResultRequest {
                instance_name: String::new(),
                action_digest: Some(action.clone()),
                action_result: None,
                results_cache_policy: None,
                digest_function: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("action_result"), "{}", err.message());
        // A malformed digest inside the result.
        let bad = reapi::Digest {
            hash: "abc".into(),
            size_bytes: 1,
        };
        let err = update(
            &ch,
            "",
            f,
            &action,
            ActionResult {
                output_files: vec![output_file("o", &bad)],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("output_files[0]"),
            "{}",
            err.message()
        );
        // A malformed action digest, a missing one, an unsupported function.
        assert_eq!(
            get(&ch, "", f, &bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let err = ac(&ch)
            .get_action_result(GetActionResultRequest {
                action_digest: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            get(&ch, "", Function::Sha1, &action)
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        // A reserved word in the instance name.
        assert_eq!(
            get(&ch, "a/blobs", f, &action).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        kiln.stop().await;
    }
}

// A result found complete is served from memory without a CAS check while nothing has left
// the CAS; once its output is evicted, the next lookup checks again and misses.
on_every_runtime! {
    async fn a_result_whose_blob_was_evicted_after_a_hit_is_a_miss(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[storage]\ndisk_bytes = \"1 MiB\"\nmemory_bytes = 0\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&dir.path().join("data"), options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let output = common::blobs::pseudo_random(1, 300 << 10);
        let out = upload(&ch, "", f, &output).await;
        let action = digest(f, b"evicted later");
        let result = ActionResult {
            output_files: vec![output_file("out", &out)],
            ..Default::default()
        };
        update(&ch, "", f, &action, result.clone()).await.unwrap();
        // Found complete when it was stored: served without a check, by the data plane from
        // memory, from the first hit on.
        let on_data_plane = "kiln_action_cache_data_plane_hits_total";
        assert_eq!(get(&ch, "", f, &action).await.unwrap(), result);
        assert_eq!(common::metric(&kiln.admin, on_data_plane).await, 1.0);
        assert_eq!(get(&ch, "", f, &action).await.unwrap(), result);
        assert_eq!(common::metric(&kiln.admin, on_data_plane).await, 2.0);
        // Fill the 1 MiB CAS with newer blobs until the output is evicted. Watched on disk,
        // not through the API: any lookup would mark the output used and keep it.
        let file = common::blobs::blob_file(&dir.path().join("data"), &out);
        assert!(file.exists(), "{} holds the output", file.display());
        let mut seed = 10;
        eventually("the output evicted", || {
            seed += 1;
            let ch = ch.clone();
            let file = file.clone();
            let data = common::blobs::pseudo_random(seed, 300 << 10);
            async move {
                upload(&ch, "", f, &data).await;
                (!file.exists()).then_some(())
            }
        })
        .await;
        let err = get(&ch, "", f, &action).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("no longer in the CAS"), "{}", err.message());
        kiln.stop().await;
    }
}

/// A `Tree` of one directory holding `files`, uploaded with its files; its digest.
async fn upload_tree(ch: &Channel, f: Function, files: &[Vec<u8>]) -> reapi::Digest {
    let mut nodes = Vec::new();
    for (i, data) in files.iter().enumerate() {
        nodes.push(FileNode {
            name: format!("f{i}"),
            digest: Some(upload(ch, "", f, data).await),
            is_executable: false,
            node_properties: None,
        });
    }
    let tree = Tree {
        root: Some(Directory {
            files: nodes,
            ..Default::default()
        }),
        children: vec![],
    };
    upload(ch, "", f, &tree.encode_to_vec()).await
}

fn with_tree(tree: reapi::Digest) -> ActionResult {
    ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(tree),
            is_topologically_sorted: false,
            root_directory_digest: None,
        }],
        ..Default::default()
    }
}

// A result that no completeness check could find complete is refused when it is stored,
// instead of being stored, dropped at each read and run again each build: one with more
// digests to check than `action_cache.max_check_digests` (FAILED_PRECONDITION), one whose
// output tree is not a Tree (INVALID_ARGUMENT). Ones at and under the budget are stored and
// served.
on_every_runtime! {
    async fn a_result_over_the_check_budget_is_refused_when_stored(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[action_cache]\nmax_check_digests = 10\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(&dir.path().join("data"), options).await;
        let ch = kiln.channel().await;
        let f = Function::Sha256;
        let files = |n: usize, tag: &str| -> Vec<Vec<u8>> {
            (0..n).map(|i| format!("{tag} {i}").into_bytes()).collect()
        };
        // 1 tree and 12 files: over 10.
        let big = upload_tree(&ch, f, &files(12, "big")).await;
        let action = digest(f, b"too many outputs");
        let err = update(&ch, "", f, &action, with_tree(big)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("more than 10 digests"), "{}", err.message());
        assert!(err.message().contains("max_check_digests"), "{}", err.message());
        let miss = get(&ch, "", f, &action).await.unwrap_err();
        assert_eq!(miss.code(), Code::NotFound);
        assert!(miss.message().contains("no action result"), "not stored: {}", miss.message());

        // An output tree that is not a Tree.
        let not_a_tree = upload(&ch, "", f, b"\xff\xff\xff not a tree").await;
        let action = digest(f, b"malformed tree");
        let err = update(&ch, "", f, &action, with_tree(not_a_tree)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(get(&ch, "", f, &action).await.unwrap_err().code(), Code::NotFound);

        // 1 tree and 9 files: at the budget; 1 tree and 5 files: under it.
        for (n, tag) in [(9, "at"), (5, "under")] {
            let tree = upload_tree(&ch, f, &files(n, tag)).await;
            let action = digest(f, tag.as_bytes());
            update(&ch, "", f, &action, with_tree(tree.clone())).await.unwrap();
            assert_eq!(get(&ch, "", f, &action).await.unwrap(), with_tree(tree));
        }
        kiln.stop().await;
    }
}
