//! The Remote Asset API against a real `kiln serve` and a real HTTP server on 127.0.0.1 (a
//! small one of the test's own, so that it can also misbehave: a 404, a redirect loop, a body
//! too large, an answer that never comes). `FetchBlob` downloads into the CAS and checks
//! `checksum.sri`; `FetchDirectory` unpacks a tar.gz into the CAS; associations are
//! remembered; `Push` records them for content already stored.

#[macro_use]
mod common;

use base64::Engine;
use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::origin::{http_server, http_server_with, repo_tar_gz, two_member_tar_gz, Seen};
use common::{assert_code, Kiln, Options};
use kiln_proto::asset::{self, fetch_client::FetchClient, push_client::PushClient, Qualifier};
use kiln_proto::reapi::{self, digest_function::Value as Function};
use prost::Message;
use sha2::Digest as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

fn sri(data: &[u8]) -> String {
    let hash = sha2::Sha256::digest(data);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

fn q(name: &str, value: &str) -> Qualifier {
    Qualifier {
        name: name.into(),
        value: value.into(),
    }
}

async fn fetch(
    ch: &Channel,
    uris: &[String],
    qualifiers: Vec<Qualifier>,
    timeout_secs: Option<i64>,
) -> Result<asset::FetchBlobResponse, tonic::Status> {
    FetchClient::new(ch.clone())
        .fetch_blob(asset::FetchBlobRequest {
            uris: uris.to_vec(),
            qualifiers,
            timeout: timeout_secs.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn code(r: &asset::FetchBlobResponse) -> Code {
    Code::from_i32(r.status.as_ref().map_or(0, |s| s.code))
}

fn message(r: &asset::FetchBlobResponse) -> &str {
    r.status.as_ref().map_or("", |s| s.message.as_str())
}

on_every_runtime! {
    async fn fetch_blob_downloads_checks_and_remembers(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            config: Some("[remote_asset]\nmax_fetch_bytes = \"64 KiB\"\nfetch_loopback = true\n".into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let data = pseudo_random(70, 20_000);
        let secret = pseudo_random(71, 5000);
        let (base, seen) = http_server(HashMap::from([
            ("/blob", data.clone()),
            ("/other", pseudo_random(72, 3000)),
            ("/private", secret.clone()),
            ("/big", vec![7u8; 100 << 10]),
            ("/repo.tar.gz", repo_tar_gz()),
        ]))
        .await;
        let url = |p: &str| format!("{base}{p}");
        let requests = |p: &str| seen.lock().unwrap().get(p).map_or(0, Vec::len);

        // A download, checked against its checksum, stored in the CAS.
        let d = digest(Function::Sha256, &data);
        let got = fetch(&ch, &[url("/blob")], vec![q("checksum.sri", &sri(&data))], None).await.unwrap();
        assert_eq!(code(&got), Code::Ok, "{}", message(&got));
        assert_eq!(got.blob_digest, Some(d.clone()));
        assert_eq!(got.uri, url("/blob"));
        assert_eq!(blobs::read(&ch, &read_name("", Function::Sha256, &d), 0, 0).await.unwrap(), data);
        // Asked again: remembered, no second download.
        let again = fetch(&ch, &[url("/blob")], vec![q("checksum.sri", &sri(&data))], None).await.unwrap();
        assert_eq!(again.blob_digest, Some(d.clone()));
        assert_eq!(requests("/blob"), 1);
        // Content older than the client accepts is fetched again.
        let fresh = FetchClient::new(ch.clone())
            .fetch_blob(asset::FetchBlobRequest {
                uris: vec![url("/blob")],
                oldest_content_accepted: Some(prost_types::Timestamp::from(
                    std::time::SystemTime::now() + std::time::Duration::from_secs(1),
                )),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(fresh.blob_digest, Some(d.clone()));
        assert_eq!(requests("/blob"), 2);

        // A checksum that does not match: ABORTED, nothing stored.
        let other = pseudo_random(72, 3000);
        let od = digest(Function::Sha256, &other);
        let bad = fetch(&ch, &[url("/other")], vec![q("checksum.sri", &sri(b"something else"))], None).await.unwrap();
        assert_eq!(code(&bad), Code::Aborted, "{}", message(&bad));
        assert!(message(&bad).contains("checksum.sri"), "{}", message(&bad));
        assert_eq!(blobs::find_missing(&ch, "", Function::Sha256, vec![od.clone()]).await, vec![od]);

        // Headers from qualifiers reach the origin.
        let denied = fetch(&ch, &[url("/private")], vec![], None).await.unwrap();
        assert_eq!(code(&denied), Code::PermissionDenied, "{}", message(&denied));
        let allowed = fetch(&ch, &[url("/private")], vec![q("http_header:Authorization", "Bearer sesame")], None)
            .await
            .unwrap();
        assert_eq!(allowed.blob_digest, Some(digest(Function::Sha256, &secret)));
        // Remembered for those credentials only: without them the origin is asked (and
        // refuses); with them again, no second download.
        let private = requests("/private");
        let without = fetch(&ch, &[url("/private")], vec![], None).await.unwrap();
        assert_eq!(code(&without), Code::PermissionDenied, "{}", message(&without));
        assert_eq!(requests("/private"), private + 1);
        let other_token = fetch(&ch, &[url("/private")], vec![q("http_header:Authorization", "Bearer guess")], None)
            .await
            .unwrap();
        assert_eq!(code(&other_token), Code::PermissionDenied, "{}", message(&other_token));
        let same = fetch(&ch, &[url("/private")], vec![q("http_header:Authorization", "Bearer sesame")], None)
            .await
            .unwrap();
        assert_eq!(same.blob_digest, Some(digest(Function::Sha256, &secret)));
        assert_eq!(requests("/private"), private + 2);
        // A public download answers a fetch that sends credentials only when it matches a
        // checksum the fetch asks for (the public answer may have been a login page): without
        // one, the origin is asked with the credentials.
        let blob_requests = requests("/blob");
        let bearer = || q("http_header:Authorization", "Bearer sesame");
        let checked = fetch(&ch, &[url("/blob")], vec![bearer(), q("checksum.sri", &sri(&data))], None)
            .await
            .unwrap();
        assert_eq!(checked.blob_digest, Some(d.clone()));
        assert_eq!(requests("/blob"), blob_requests);
        let unchecked = fetch(&ch, &[url("/blob")], vec![bearer()], None).await.unwrap();
        assert_eq!(unchecked.blob_digest, Some(d.clone()));
        assert_eq!(requests("/blob"), blob_requests + 1);

        // The origin's failures, each in the response's status, each promptly.
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            drop(l);
            format!("http://127.0.0.1:{port}/gone")
        };
        for (uris, expected, needle) in [
            (vec![url("/nothing")], Code::NotFound, "404"),
            (vec![url("/loop")], Code::Aborted, "redirected more than"),
            (vec![url("/big")], Code::ResourceExhausted, "max_fetch_bytes"),
            (vec![refused], Code::Unavailable, "fetching"),
            (vec!["ftp://127.0.0.1/x".to_string()], Code::NotFound, "not an http"),
        ] {
            let r = fetch(&ch, &uris, vec![], None).await.unwrap();
            assert_eq!(code(&r), expected, "{uris:?}: {}", message(&r));
            assert!(message(&r).contains(needle), "{uris:?}: {}", message(&r));
            assert!(r.blob_digest.is_none());
        }
        // A server that never answers, and one that drips its body: the request's timeout
        // ends both, and it covers every mirror together.
        for path in ["/hang", "/drip"] {
            let started = std::time::Instant::now();
            let r = fetch(&ch, &[url(path), url(path)], vec![], Some(1)).await.unwrap();
            assert_eq!(code(&r), Code::DeadlineExceeded, "{path}: {}", message(&r));
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "{path}");
        }
        // Link-local addresses (cloud metadata services) are never fetched from.
        let metadata = fetch(&ch, &["http://169.254.169.254/latest/meta-data".to_string()], vec![], None)
            .await
            .unwrap();
        assert_eq!(code(&metadata), Code::PermissionDenied, "{}", message(&metadata));
        // Mirrors: the first that works answers, and says which it was.
        let mirrored = fetch(&ch, &[url("/nothing"), url("/other")], vec![], None).await.unwrap();
        assert_eq!(mirrored.uri, url("/other"));
        assert_eq!(mirrored.blob_digest, Some(digest(Function::Sha256, &other)));

        // A qualifier Kiln does not know: INVALID_ARGUMENT naming it, with a BadRequest.
        let err = fetch(&ch, &[url("/blob")], vec![q("frobnicate", "1")], None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("\"frobnicate\" not supported"), "{}", err.message());
        let err = fetch(&ch, &[url("/blob")], vec![q("frobnicate", "1"), q("zap", "2")], None).await.unwrap_err();
        let status = kiln_proto::google::rpc::Status::decode(err.details()).unwrap();
        let bad_request = kiln_proto::google::rpc::BadRequest::decode(&status.details[0].value[..]).unwrap();
        assert_eq!(bad_request.field_violations.len(), 2, "one violation per unsupported name");
        let err = fetch(&ch, &[url("/blob")], vec![q("frobnicate", "1")], None).await.unwrap_err();
        let status = kiln_proto::google::rpc::Status::decode(err.details()).unwrap();
        let bad_request = kiln_proto::google::rpc::BadRequest::decode(&status.details[0].value[..]).unwrap();
        assert_eq!(bad_request.field_violations[0].field, "qualifiers.name");
        assert_code(fetch(&ch, &[], vec![], None).await, Code::InvalidArgument, "no URI");

        // A directory: a tar.gz unpacked into the CAS, the whole tree or a subdirectory.
        let dir_of = |uri: String, qualifiers: Vec<Qualifier>| asset::FetchDirectoryRequest {
            uris: vec![uri],
            qualifiers,
            ..Default::default()
        };
        let got = FetchClient::new(ch.clone())
            .fetch_directory(dir_of(url("/repo.tar.gz"), vec![q("checksum.sri", &sri(&repo_tar_gz()))]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.status.as_ref().map(|s| s.code), Some(0), "{:?}", got.status);
        let root = got.root_directory_digest.unwrap();
        let tree = blobs::tree_directories(&ch, &root).await;
        assert_eq!(tree.len(), 3, "root, src, src/lib: {tree:?}");
        let src = &tree[1];
        assert_eq!(src.files[0].name, "main.rs");
        assert!(src.files[1].is_executable, "{src:?}");
        let main = src.files[0].digest.clone().unwrap();
        assert_eq!(blobs::read(&ch, &read_name("", Function::Sha256, &main), 0, 0).await.unwrap(), b"fn main() {}\n");
        let sub = FetchClient::new(ch.clone())
            .fetch_directory(dir_of(url("/repo.tar.gz"), vec![q("directory", "src/lib")]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sub.root_directory_digest, src.directories[0].digest.clone());
        // Not an archive Kiln unpacks.
        let not_tar = FetchClient::new(ch.clone())
            .fetch_directory(dir_of(url("/blob"), vec![]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(not_tar.status.map(|s| s.code), Some(Code::NotFound as i32));
        assert!(common::temp_files(dir.path()).is_empty());
        kiln.stop().await;
    }
}

/// A remembered directory answers only while its whole tree is stored: a file of it gone
/// from the CAS, the archive is fetched again. A tar.gz in two gzip members unpacks whole.
/// Waiting for a place among `concurrent_fetches` counts against the fetch's timeout. (One
/// backend: the control plane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_trees_are_whole_and_fetches_wait_within_their_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let options = Options {
        config: Some("[storage]\nmemory_bytes = 0\n[remote_asset]\nfetch_loopback = true\nconcurrent_fetches = 1\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&data_dir, options).await;
    let ch = kiln.channel().await;
    let blob = pseudo_random(95, 2000);
    let (base, seen) = http_server(HashMap::from([
        ("/repo.tar.gz", two_member_tar_gz()),
        ("/blob", blob.clone()),
    ]))
    .await;
    let url = |p: &str| format!("{base}{p}");
    let requests = |p: &str| seen.lock().unwrap().get(p).map_or(0, Vec::len);
    let fetch_dir = || async {
        FetchClient::new(ch.clone())
            .fetch_directory(asset::FetchDirectoryRequest {
                uris: vec![url("/repo.tar.gz")],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };

    let got = fetch_dir().await;
    assert_eq!(
        got.status.as_ref().map(|s| s.code),
        Some(0),
        "{:?}",
        got.status
    );
    let root = got.root_directory_digest.unwrap();
    let files: Vec<(String, reapi::Digest)> = blobs::tree_directories(&ch, &root)
        .await
        .into_iter()
        .flat_map(|d| d.files)
        .map(|f| (f.name, f.digest.unwrap()))
        .collect();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["README", "main.rs", "run.sh", "mod.rs"],
        "every file, from both members"
    );
    assert_eq!(fetch_dir().await.root_directory_digest, Some(root.clone()));
    assert_eq!(requests("/repo.tar.gz"), 1, "remembered");

    // A file of the tree leaves the CAS (its file removed behind the server's back, which a
    // read then notices).
    let main = files
        .iter()
        .find(|(n, _)| n == "main.rs")
        .unwrap()
        .1
        .clone();
    std::fs::remove_file(blobs::blob_file(&data_dir, &main)).unwrap();
    assert_code(
        blobs::read(&ch, &read_name("", Function::Sha256, &main), 0, 0).await,
        Code::NotFound,
        "",
    );
    assert_eq!(
        blobs::find_missing(&ch, "", Function::Sha256, vec![main.clone()]).await,
        vec![main.clone()]
    );
    let again = fetch_dir().await;
    assert_eq!(again.root_directory_digest, Some(root.clone()));
    assert_eq!(
        requests("/repo.tar.gz"),
        2,
        "fetched again, the tree being incomplete"
    );
    assert!(
        blobs::find_missing(&ch, "", Function::Sha256, vec![main.clone()])
            .await
            .is_empty()
    );

    // One place: a fetch that waits behind a hanging one ends at its own timeout.
    let hanging = {
        let ch = ch.clone();
        let uri = url("/hang");
        tokio::spawn(async move { fetch(&ch, &[uri], vec![], Some(20)).await })
    };
    common::eventually("the hanging fetch to reach the origin", || async {
        (requests("/hang") == 1).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let waited = fetch(&ch, &[url("/blob")], vec![], Some(1)).await.unwrap();
    assert_eq!(
        code(&waited),
        Code::DeadlineExceeded,
        "{}",
        message(&waited)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(requests("/blob"), 0);
    hanging.abort();
    kiln.stop().await;
}

/// Identical fetches at once make one download, and a fetch whose call is cancelled goes on
/// and is remembered (the spec: keep the fetch going after the RPC completes). (One backend:
/// the control plane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_fetches_share_one_download_which_outlives_its_call() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[remote_asset]\nfetch_loopback = true\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    let (a, b, c) = (
        pseudo_random(96, 5000),
        pseudo_random(97, 5000),
        pseudo_random(98, 5000),
    );
    let (base, seen) = http_server(HashMap::from([
        ("/slow/a", a.clone()),
        ("/slow/b", b.clone()),
        ("/slower/c", c.clone()),
    ]))
    .await;
    let url = |p: &str| format!("{base}{p}");
    let requests = |p: &str| seen.lock().unwrap().get(p).map_or(0, Vec::len);
    let spawn_fetch = |p: &str| {
        let (ch, uri) = (ch.clone(), url(p));
        tokio::spawn(async move { fetch(&ch, &[uri], vec![], None).await })
    };

    let calls: Vec<_> = (0..4).map(|_| spawn_fetch("/slow/a")).collect();
    for call in calls {
        let got = call.await.unwrap().unwrap();
        assert_eq!(
            got.blob_digest,
            Some(digest(Function::Sha256, &a)),
            "{}",
            message(&got)
        );
    }
    assert_eq!(requests("/slow/a"), 1, "one download for four fetches");

    let cancelled = spawn_fetch("/slow/b");
    common::eventually("the download to reach the origin", || async {
        (requests("/slow/b") == 1).then_some(())
    })
    .await;
    cancelled.abort();
    let again = fetch(&ch, &[url("/slow/b")], vec![], None).await.unwrap();
    assert_eq!(
        again.blob_digest,
        Some(digest(Function::Sha256, &b)),
        "{}",
        message(&again)
    );
    assert_eq!(
        requests("/slow/b"),
        1,
        "the cancelled call's download served the next"
    );

    // A fetch with more time that joined the download of one with less (a second, against an
    // origin that takes three) tries again within its own time when that one gives up.
    let hasty = {
        let (ch, uri) = (ch.clone(), url("/slower/c"));
        tokio::spawn(async move { fetch(&ch, &[uri], vec![], Some(1)).await })
    };
    common::eventually("the hasty download to reach the origin", || async {
        (requests("/slower/c") == 1).then_some(())
    })
    .await;
    let patient = fetch(&ch, &[url("/slower/c")], vec![], Some(20))
        .await
        .unwrap();
    assert_eq!(
        patient.blob_digest,
        Some(digest(Function::Sha256, &c)),
        "{}",
        message(&patient)
    );
    let hasty = hasty.await.unwrap().unwrap();
    assert_eq!(code(&hasty), Code::DeadlineExceeded, "{}", message(&hasty));
    assert_eq!(requests("/slower/c"), 2, "the patient fetch's own download");
    kiln.stop().await;
}

/// Push, and fetches of what only a push can supply (vcs qualifiers, a directory that is not
/// an archive). (One backend: the control plane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_associations_are_fetched_and_push_only_qualifiers_are_not_downloaded() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = Kiln::start_on(common::Runtime::Glommio, dir.path()).await;
    let ch = kiln.channel().await;
    // By default the server does not fetch from its own loopback addresses.
    let own = fetch(&ch, &[format!("{}/metrics", kiln.admin)], vec![], None)
        .await
        .unwrap();
    assert_eq!(code(&own), Code::PermissionDenied, "{}", message(&own));
    let f = Function::Sha256;
    let data = pseudo_random(80, 4000);
    let d = digest(f, &data);
    let urn = "urn:kiln:test:tool".to_string();
    let push = |d: reapi::Digest, qualifiers: Vec<Qualifier>, expire_at| asset::PushBlobRequest {
        uris: vec![urn.clone()],
        qualifiers,
        expire_at,
        blob_digest: Some(d),
        ..Default::default()
    };
    // Content must be in the CAS before it is pushed.
    assert_code(
        PushClient::new(ch.clone())
            .push_blob(push(d.clone(), vec![], None))
            .await,
        Code::InvalidArgument,
        "upload it before pushing",
    );
    blobs::write(&ch, &write_name("", f, &d), &data, 1 << 20)
        .await
        .unwrap();
    PushClient::new(ch.clone())
        .push_blob(push(d.clone(), vec![q("vcs.commit", "abc")], None))
        .await
        .unwrap();
    let got = fetch(
        &ch,
        std::slice::from_ref(&urn),
        vec![q("vcs.commit", "abc")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(got.blob_digest, Some(d.clone()));
    // Other qualifiers select other content: not pushed, and not downloadable.
    let other = fetch(
        &ch,
        std::slice::from_ref(&urn),
        vec![q("vcs.commit", "def")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(code(&other), Code::NotFound, "{}", message(&other));
    // A checksum the push did not vouch for is checked against the stored bytes.
    let checked = fetch(
        &ch,
        std::slice::from_ref(&urn),
        vec![q("vcs.commit", "abc"), q("checksum.sri", &sri(&data))],
        None,
    )
    .await
    .unwrap();
    assert_eq!(checked.blob_digest, Some(d.clone()));
    let wrong = fetch(
        &ch,
        std::slice::from_ref(&urn),
        vec![q("vcs.commit", "abc"), q("checksum.sri", &sri(b"x"))],
        None,
    )
    .await
    .unwrap();
    assert_eq!(code(&wrong), Code::NotFound, "{}", message(&wrong));
    // An association past its expiry is not served.
    let past = prost_types::Timestamp::from(
        std::time::SystemTime::now() - std::time::Duration::from_secs(60),
    );
    PushClient::new(ch.clone())
        .push_blob(push(d.clone(), vec![q("resource_type", "x")], Some(past)))
        .await
        .unwrap();
    let expired = fetch(
        &ch,
        std::slice::from_ref(&urn),
        vec![q("resource_type", "x")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(code(&expired), Code::NotFound, "{}", message(&expired));

    // Directories: a pushed one is fetched; one never pushed is NOT_FOUND, without a download.
    let directory = reapi::Directory::default().encode_to_vec();
    let dd = digest(f, &directory);
    blobs::write(&ch, &write_name("", f, &dd), &directory, 1 << 20)
        .await
        .unwrap();
    PushClient::new(ch.clone())
        .push_directory(asset::PushDirectoryRequest {
            uris: vec!["https://example.invalid/repo.git".into()],
            root_directory_digest: Some(dd.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let fetch_dir = |uri: &str| asset::FetchDirectoryRequest {
        uris: vec![uri.to_string()],
        ..Default::default()
    };
    let got = FetchClient::new(ch.clone())
        .fetch_directory(fetch_dir("https://example.invalid/repo.git"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.root_directory_digest, Some(dd));
    let missing = FetchClient::new(ch.clone())
        .fetch_directory(fetch_dir("https://example.invalid/other.git"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.status.map(|s| s.code), Some(Code::NotFound as i32));
    kiln.stop().await;

    // Turned off: UNIMPLEMENTED.
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some("[remote_asset]\nenabled = false\n".into()),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(dir.path(), options).await;
    let ch = kiln.channel().await;
    assert_code(
        fetch(&ch, &[urn], vec![], None).await,
        Code::Unimplemented,
        "turned off",
    );
    kiln.stop().await;
}

/// The headers a fetch's qualifiers give go only to the origin of the URL they were given for:
/// a redirect to another origin gets none of them. The proxy environment is not used; an
/// explicit `remote_asset.proxy` is. (One backend: the control plane.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_stay_with_their_origin_and_proxies_are_explicit() {
    // A "proxy" that only counts who connects to it and what they ask.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let asked = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = proxy.accept().await {
                // The request line, however the client splits its writes.
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\r\n") && line.len() < 4096 {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    line.push(byte[0]);
                }
                asked
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&line).trim().to_string());
                let _ = socket
                    .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    // Every proxy variable names the proxy, and none exempts loopback (whatever the test's own
    // environment says), so only ignoring them keeps the fetches off it.
    let every_proxy_variable = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k.to_string(), proxy_url.clone()))
    .chain(["NO_PROXY", "no_proxy"].map(|k| (k.to_string(), String::new())))
    .collect();
    let options = Options {
        config: Some("[remote_asset]\nfetch_loopback = true\n".into()),
        env: every_proxy_variable,
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&dir.path().join("a"), options).await;
    let ch = kiln.channel().await;

    let there = pseudo_random(90, 3000);
    let here = pseudo_random(91, 3000);
    let (other_origin, seen_there) = http_server(HashMap::from([("/there", there.clone())])).await;
    let (base, seen_here) = http_server_with(
        HashMap::from([("/here", here.clone())]),
        HashMap::from([
            ("/away", format!("{other_origin}/there")),
            ("/near", "here".to_string()),
        ]),
    )
    .await;
    let secret = || {
        vec![
            q("http_header:X-Secret", "sesame"),
            q("http_header:Authorization", "Bearer sesame"),
        ]
    };
    let heads =
        |seen: &Seen, path: &str| seen.lock().unwrap().get(path).cloned().unwrap_or_default();

    // Redirected to another origin (another port): the content arrives, the headers do not.
    let away = fetch(&ch, &[format!("{base}/away")], secret(), None)
        .await
        .unwrap();
    assert_eq!(code(&away), Code::Ok, "{}", message(&away));
    assert_eq!(away.blob_digest, Some(digest(Function::Sha256, &there)));
    assert!(heads(&seen_here, "/away")[0].contains("x-secret: sesame"));
    let at_other = heads(&seen_there, "/there");
    assert_eq!(at_other.len(), 1);
    assert!(
        !at_other[0].contains("x-secret") && !at_other[0].contains("authorization"),
        "{}",
        at_other[0]
    );
    // Redirected within the origin (a relative Location): the headers follow.
    let near = fetch(&ch, &[format!("{base}/near")], secret(), None)
        .await
        .unwrap();
    assert_eq!(near.blob_digest, Some(digest(Function::Sha256, &here)));
    assert!(heads(&seen_here, "/here")[0].contains("x-secret: sesame"));
    // None of it went through the proxy the environment names.
    assert!(
        asked.lock().unwrap().is_empty(),
        "{:?}",
        asked.lock().unwrap()
    );
    kiln.stop().await;

    // Named in the configuration, the proxy is used.
    let options = Options {
        config: Some(format!(
            "[remote_asset]\nfetch_loopback = true\nproxy = \"{proxy_url}\"\n"
        )),
        ..Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&dir.path().join("b"), options).await;
    let ch = kiln.channel().await;
    let via = fetch(&ch, &[format!("{base}/here")], vec![], None)
        .await
        .unwrap();
    assert_ne!(code(&via), Code::Ok, "the proxy refuses everything");
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].contains(base.trim_start_matches("http://")),
        "{asked:?}"
    );
    kiln.stop().await;
}
