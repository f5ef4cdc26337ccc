//! GetTree against a real server: a tree of 12,253 distinct directories (the deepest level's
//! alike in pairs, each listed once) in pages of 2, 100 and the server's choice, resumed from tokens — also after a
//! restart, when the tree cache is cold; concurrent identical calls sharing one walk; a missing
//! root, a missing subdirectory, and bad tokens.

#[macro_use]
mod common;

use common::blobs::{self, digest};
use common::{Kiln, Options};
use kiln_proto::reapi::{
    self, batch_update_blobs_request, digest_function::Value as Function, BatchUpdateBlobsRequest,
    Directory, DirectoryNode, FileNode, GetTreeRequest,
};
use prost::Message;
use std::collections::HashSet;
use tonic::transport::Channel;
use tonic::Code;

const F: Function = Function::Sha256;

/// A tree `depth` levels below its root with `fanout` subdirectories each; directories at
/// the deepest level are alike in pairs (a digest met twice is listed once). Returns the
/// root and every distinct directory blob, the root first and then breadth first (the order
/// GetTree lists them in).
fn tree(depth: u32, fanout: u32) -> (reapi::Digest, Vec<(reapi::Digest, Vec<u8>)>) {
    type Levels = Vec<Vec<(reapi::Digest, Vec<u8>)>>;
    fn build(
        depth: u32,
        fanout: u32,
        parent: &str,
        index: u32,
        levels: &mut Levels,
        at: usize,
    ) -> reapi::Digest {
        let path = format!("{parent}/{index}");
        let directories = if depth == 0 {
            Vec::new()
        } else {
            (0..fanout)
                .map(|i| DirectoryNode {
                    name: format!("d{i:02}"),
                    digest: Some(build(depth - 1, fanout, &path, i, levels, at + 1)),
                })
                .collect()
        };
        // Leaves are alike in pairs: their file is named after their parent and the pair.
        let seed = if depth == 0 {
            format!("{parent}:{}", index / 2)
        } else {
            path
        };
        let dir = Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(digest(F, seed.as_bytes())),
                ..Default::default()
            }],
            directories,
            ..Default::default()
        };
        let bytes = dir.encode_to_vec();
        let d = digest(F, &bytes);
        if levels.len() <= at {
            levels.resize(at + 1, Vec::new());
        }
        levels[at].push((d.clone(), bytes));
        d
    }
    let mut levels = Vec::new();
    let root = build(depth, fanout, "", 0, &mut levels, 0);
    let mut seen = HashSet::new();
    let order = levels
        .into_iter()
        .flatten()
        .filter(|(d, _)| seen.insert(d.hash.clone()))
        .collect();
    (root, order)
}

async fn upload(ch: &Channel, blobs: &[(reapi::Digest, Vec<u8>)]) {
    let mut batch = Vec::new();
    let mut bytes = 0;
    for (i, (d, data)) in blobs.iter().enumerate() {
        batch.push(batch_update_blobs_request::Request {
            digest: Some(d.clone()),
            data: data.clone().into(),
            ..Default::default()
        });
        bytes += data.len();
        if bytes > (1 << 20) || i + 1 == blobs.len() {
            let r = blobs::cas(ch)
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    requests: std::mem::take(&mut batch),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r
                .responses
                .iter()
                .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)));
            bytes = 0;
        }
    }
}

/// Every page of one call: (directories in order, the tokens the pages carried).
async fn get_tree(
    ch: &Channel,
    root: &reapi::Digest,
    page_size: i32,
    token: &str,
) -> Result<(Vec<reapi::Digest>, Vec<String>), tonic::Status> {
    let mut stream = blobs::cas(ch)
        .get_tree(GetTreeRequest {
            root_digest: Some(root.clone()),
            page_size,
            page_token: token.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut dirs, mut tokens) = (Vec::new(), Vec::new());
    while let Some(page) = stream.message().await? {
        if page_size > 0 {
            assert!(
                page.directories.len() <= page_size as usize,
                "page over page_size"
            );
        }
        assert!(!page.directories.is_empty(), "an empty page");
        dirs.extend(
            page.directories
                .iter()
                .map(|d| digest(F, &d.encode_to_vec())),
        );
        tokens.push(page.next_page_token);
    }
    assert_eq!(
        tokens.last().map(String::as_str),
        Some(""),
        "the last page has no token"
    );
    Ok((dirs, tokens))
}

on_every_runtime! {
    async fn get_tree_pages_resumes_and_shares_walks(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (root, blobs) = tree(4, 12);
        let expected: Vec<reapi::Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(expected.len(), 12_253);
        let tokens_after_restart;
        {
            let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
            let ch = kiln.channel().await;
            // Missing root.
            let err = get_tree(&ch, &root, 0, "").await.unwrap_err();
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
            upload(&ch, &blobs).await;

            // N identical calls at once on a cold cache: one walk between them.
            let walks = common::metric(&kiln.admin, "kiln_get_tree_walks_total").await;
            let calls: Vec<_> = (0..16)
                .map(|_| {
                    let (ch, root) = (ch.clone(), root.clone());
                    tokio::spawn(async move { get_tree(&ch, &root, 0, "").await.unwrap().0 })
                })
                .collect();
            for c in calls {
                assert_eq!(c.await.unwrap(), expected, "the whole tree, breadth first, each directory once");
            }
            assert_eq!(common::metric(&kiln.admin, "kiln_get_tree_walks_total").await, walks + 1.0);

            // Pages of 2 and of 100, all from the cache; every token resumes where its page ended.
            for size in [2, 100] {
                let (dirs, tokens) = get_tree(&ch, &root, size, "").await.unwrap();
                assert_eq!(dirs, expected, "pages of {size}");
                assert_eq!(tokens.len(), expected.len().div_ceil(size as usize));
                let mid = &tokens[tokens.len() / 2];
                let (rest, _) = get_tree(&ch, &root, size, mid).await.unwrap();
                let offset = (tokens.len() / 2 + 1) * size as usize;
                assert_eq!(rest, expected[offset..], "resumed from a token");
            }
            assert_eq!(common::metric(&kiln.admin, "kiln_get_tree_walks_total").await, walks + 1.0);
            tokens_after_restart = get_tree(&ch, &root, 100, "").await.unwrap().1;

            // Bad tokens: malformed, another tree's, past the end.
            let (other, other_blobs) = tree(1, 2);
            upload(&ch, &other_blobs).await;
            let other_token = get_tree(&ch, &other, 1, "").await.unwrap().1[0].clone();
            let mut parts: Vec<&str> = tokens_after_restart[0].split('.').collect();
            parts[4] = "99999999";
            let past = parts.join(".");
            for bad in ["nonsense", other_token.as_str(), past.as_str()] {
                let err = get_tree(&ch, &root, 100, bad).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
            }
            kiln.stop().await;
        }
        // A cold cache: the tokens of the earlier server resume the same walk.
        let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
        let ch = kiln.channel().await;
        let mid = &tokens_after_restart[tokens_after_restart.len() / 3];
        let (rest, _) = get_tree(&ch, &root, 100, mid).await.unwrap();
        assert_eq!(rest, expected[(tokens_after_restart.len() / 3 + 1) * 100..]);
        kiln.stop().await;
    }
}

// A subdirectory the CAS lacks is left out with its subtree, and such a tree is not cached:
// once the directory is uploaded, the next call lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_subdirectory_is_left_out_until_it_is_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = Kiln::start_async(dir.path(), Options::on(common::Runtime::Glommio)).await;
    let ch = kiln.channel().await;
    let (root, blobs) = tree(2, 3);
    // Leave out the first directory of the second level, and so its three children.
    let (held_back, rest): (Vec<_>, Vec<_>) = blobs
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| *i == 1);
    let rest: Vec<_> = rest.into_iter().map(|(_, b)| b).collect();
    upload(&ch, &rest).await;
    let (dirs, tokens) = get_tree(&ch, &root, 2, "").await.unwrap();
    let missing = &held_back[0].1 .0;
    assert!(!dirs.contains(missing));
    assert_eq!(dirs[0], root);
    assert!(
        dirs.len() < blobs.len() - 1,
        "its subtree is left out too: {}",
        dirs.len()
    );
    upload(&ch, &[held_back[0].1.clone()]).await;
    let (dirs, _) = get_tree(&ch, &root, 0, "").await.unwrap();
    assert_eq!(
        dirs,
        blobs.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>()
    );
    // A token of the walk before the upload would now skip or repeat directories: refused.
    let err = get_tree(&ch, &root, 2, &tokens[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("changed"), "{err:?}");
    kiln.stop().await;
}

// With the cache off every call walks; a tree over get_tree.max_tree_bytes and a root that
// is not a Directory are INVALID_ARGUMENT, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_roots() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[get_tree]\ncache_bytes = 0\nmax_tree_bytes = \"20 KiB\"\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let (small, small_blobs) = tree(1, 3);
    let (big, big_blobs) = tree(3, 8);
    upload(&ch, &small_blobs).await;
    upload(&ch, &big_blobs).await;
    let walks = common::metric(&kiln.admin, "kiln_get_tree_walks_total").await;
    for _ in 0..2 {
        assert_eq!(
            get_tree(&ch, &small, 0, "").await.unwrap().0.len(),
            small_blobs.len()
        );
    }
    assert_eq!(
        common::metric(&kiln.admin, "kiln_get_tree_walks_total").await,
        walks + 2.0
    );
    let err = get_tree(&ch, &big, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_tree_bytes"), "{err:?}");
    // Many small directories: their messages fit in 20 KiB, but what a walk holds of each
    // (176 bytes beyond its message) does not.
    let (wide, wide_blobs) = tree(1, 120);
    let distinct: std::collections::HashMap<_, _> = wide_blobs.iter().cloned().collect();
    let messages: usize = distinct.values().map(Vec::len).sum();
    assert!(
        messages < 20 << 10 && messages + 176 * distinct.len() > 20 << 10,
        "{messages} bytes in {} directories",
        distinct.len()
    );
    upload(&ch, &wide_blobs).await;
    let err = get_tree(&ch, &wide, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A subdirectory that is not stored is left out whatever size its digest claims (over
    // max_tree_bytes here); a root that is not stored is NOT_FOUND, whatever its size.
    let claimed = reapi::Digest {
        hash: "ab".repeat(32),
        size_bytes: 1 << 40,
    };
    let (leaf, leaf_blobs) = tree(0, 0);
    let holder = Directory {
        directories: vec![
            DirectoryNode {
                name: "absent".into(),
                digest: Some(claimed.clone()),
            },
            DirectoryNode {
                name: "here".into(),
                digest: Some(leaf.clone()),
            },
        ],
        ..Default::default()
    };
    let holder_bytes = holder.encode_to_vec();
    let holder_d = digest(F, &holder_bytes);
    upload(&ch, &leaf_blobs).await;
    upload(&ch, &[(holder_d.clone(), holder_bytes)]).await;
    let (listed, _) = get_tree(&ch, &holder_d, 0, "").await.unwrap();
    assert_eq!(
        listed,
        vec![holder_d.clone(), leaf.clone()],
        "the absent one left out"
    );
    let err = get_tree(&ch, &claimed, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let not_a_directory = b"\xff\xff\xff not a Directory".to_vec();
    let d = digest(F, &not_a_directory);
    upload(&ch, &[(d.clone(), not_a_directory)]).await;
    let err = get_tree(&ch, &d, 0, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    kiln.stop().await;
}

// Trees that share subtrees: with the whole-tree cache off, a walk takes the directories it
// has read before from the kept subtrees, and reads only the new ones from the CAS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_sharing_subtrees_read_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[get_tree]\ncache_bytes = 0\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let kept = || common::metric_if_any(&kiln.admin, "kiln_get_tree_kept_directories_total");
    let (a, a_blobs) = tree(2, 3);
    upload(&ch, &a_blobs).await;
    let before = kept().await.unwrap_or(0.0);
    assert_eq!(
        get_tree(&ch, &a, 0, "").await.unwrap().0.len(),
        a_blobs.len()
    );
    assert_eq!(
        kept().await.unwrap_or(0.0),
        before,
        "a first walk reads everything"
    );
    // A new root over the same tree: only the root is new.
    let b = Directory {
        directories: vec![DirectoryNode {
            name: "old".into(),
            digest: Some(a.clone()),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let bd = digest(F, &b);
    upload(&ch, &[(bd.clone(), b)]).await;
    assert_eq!(
        get_tree(&ch, &bd, 0, "").await.unwrap().0.len(),
        a_blobs.len() + 1
    );
    assert_eq!(
        kept().await.unwrap_or(0.0),
        before + a_blobs.len() as f64,
        "every directory of the shared subtree came from the kept ones"
    );
    kiln.stop().await;
}
