//! Bytes that do not match their digest are never served or handed to an action: damaged
//! files are dropped at start-up or on first read, an input changed while the server was down
//! is hashed before an action gets it, and a file that vanished is `NOT_FOUND`.

#[macro_use]
mod common;

use common::blobs::{self, blob_file, digest, overwrite, pseudo_random, read_name, write_name};
use common::{Kiln, Options};
use kiln_proto::reapi::{self, digest_function::Value as Function};
use tonic::Code;

// Bytes changed on disk behind the server's back are never served: a file of the wrong size
// is dropped at start-up, a file of the right size with wrong content on its first read.
on_every_runtime! {
    async fn damaged_files_are_never_served(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let f = Function::Sha256;
        let blobs_data: Vec<Vec<u8>> = vec![
            pseudo_random(5, 1000),
            pseudo_random(6, 2 << 20),
            pseudo_random(7, 5000),
        ];
        let digests: Vec<reapi::Digest> = blobs_data.iter().map(|b| digest(f, b)).collect();
        {
            let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
            let ch = kiln.channel().await;
            for (d, data) in digests.iter().zip(&blobs_data) {
                blobs::write(&ch, &write_name("", f, d), data, 1 << 16)
                    .await
                    .unwrap();
            }
            kiln.stop().await;
        }
        // Flip a byte in the first two; cut the third short.
        for d in &digests[..2] {
            let path = blob_file(&data_dir, d);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[100] ^= 0x55;
            overwrite(&path, &bytes);
        }
        let path = blob_file(&data_dir, &digests[2]);
        let bytes = std::fs::read(&path).unwrap();
        overwrite(&path, &bytes[..10]);
        // This is the start-up scan's size check: without the index snapshot, every file is
        // looked at (with it, an in-place change is caught on first read; see
        // restart_uses_the_index_snapshot_but_never_serves_what_changed).
        std::fs::remove_file(data_dir.join("cas.index")).unwrap();

        let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
        let ch = kiln.channel().await;
        let missing = blobs::find_missing(&ch, "", f, digests.clone()).await;
        assert_eq!(
            missing,
            vec![digests[2].clone()],
            "the short file was dropped at start-up"
        );
        for d in &digests[..2] {
            let err = blobs::read(&ch, &read_name("", f, d), 0, 0)
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
        }
        let missing = blobs::find_missing(&ch, "", f, digests.clone()).await;
        assert_eq!(
            missing.len(),
            3,
            "damaged blobs are gone, so clients upload them again"
        );
        assert_eq!(
            common::metric(&kiln.admin, "kiln_cas_corrupt_blobs_total").await,
            2.0,
            "the two read with wrong bytes are counted corrupt"
        );
        kiln.stop().await;
    }
}

// A blob file the start-up scan found has not been hashed by this process: before an action
// gets it (hardlinked, so no read would check it), it is hashed. One whose bytes changed
// while the server was down never reaches the action: the input is reported missing and
// removed, and once uploaded again the action runs with the right bytes.
on_every_runtime! {
    async fn a_changed_input_file_never_reaches_an_action(rt: Runtime) {
        use common::exec::{code, execute, Spec, Tree};
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let f = Function::Sha256;
        let (right, wrong) = (b"the right bytes", b"the wrong bytes");
        let spec = Spec { tree: Tree::default().file("in", right, false), ..Spec::script("cat in") };
        let input = digest(f, right);
        let action = {
            let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
            let ch = kiln.channel().await;
            let action = spec.upload(&ch, f).await;
            drop(kiln); // SIGKILL: no snapshot, so the next start scans and hashes nothing
            action
        };
        overwrite(&blob_file(&data_dir, &input), wrong);
        let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
        let ch = kiln.channel().await;
        let (_, response) = execute(&ch, f, &action, true).await.unwrap();
        assert_eq!(code(&response), Code::FailedPrecondition as i32, "{response:?}");
        assert!(response.result.is_none_or(|r| r.stdout_digest.is_none()), "the action ran");
        assert_eq!(blobs::find_missing(&ch, "", f, vec![input.clone()]).await, vec![input.clone()]);
        spec.upload(&ch, f).await;
        let (_, ok) = execute(&ch, f, &action, true).await.unwrap();
        assert_eq!(code(&ok), 0, "{ok:?}");
        let stdout = ok.result.unwrap().stdout_digest.unwrap();
        assert_eq!(blobs::read(&ch, &read_name("", f, &stdout), 0, 0).await.unwrap(), right);
        kiln.stop().await;
    }
}

// A stored file that disappears after the index was consulted (evicted between lookup and
// open, or removed behind the server's back) is NOT_FOUND without server paths in the
// message, and the blob becomes missing so that clients upload it again.
on_every_runtime! {
    async fn a_vanished_blob_file_is_not_found(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let f = Function::Sha256;
        // Over memory_max_blob_bytes (1 MiB), so it is streamed from its file.
        let data = pseudo_random(11, 2 << 20);
        let d = digest(f, &data);
        let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
        let ch = kiln.channel().await;
        blobs::write(&ch, &write_name("", f, &d), &data, 1 << 16)
            .await
            .unwrap();
        std::fs::remove_file(blob_file(&data_dir, &d)).unwrap();
        let err = blobs::read(&ch, &read_name("", f, &d), 0, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            !err.message().contains(data_dir.to_str().unwrap()),
            "no server path in {:?}",
            err.message()
        );
        let missing = blobs::find_missing(&ch, "", f, vec![d.clone()]).await;
        assert_eq!(missing, vec![d.clone()], "the index forgot the vanished blob");
        assert_eq!(
            common::metric(&kiln.admin, "kiln_cas_corrupt_blobs_total").await,
            0.0,
            "a vanished file is not a corrupt one"
        );
        blobs::write(&ch, &write_name("", f, &d), &data, 1 << 16)
            .await
            .unwrap();
        assert_eq!(
            blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(),
            data
        );
        kiln.stop().await;
    }
}
