//! Acknowledged means durable: many writers killed with `kill -9` lose nothing acknowledged
//! (with group commit and without; blobs and action results), a blob is neither acknowledged
//! nor visible before its group's sync is done, and an upload cut short by `kill -9` leaves
//! no trace.

#[macro_use]
mod common;

use common::blobs::{self, digest, pseudo_random, read_name, write_name};
use common::{Kiln, Options};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::{
    self, digest_function::Value as Function, ActionResult, GetActionResultRequest,
    UpdateActionResultRequest,
};
use std::path::{Path, PathBuf};
use tonic::Code;

// Group commit: many writers at once (ByteStream and BatchUpdateBlobs), kill -9 while they are
// still writing. Every blob acknowledged before the kill is there after the restart, with its
// bytes; and each acknowledgement waited for a group sync (the synced-commit counter covers
// every acknowledged blob). kill -9 keeps the page cache, so the restart proves that
// acknowledged means renamed into place and indexed; that the sync reached the disk is what
// the counter shows (a power cut cannot be caused here).
on_every_runtime! {
    async fn concurrent_writes_acknowledged_before_kill_9_survive(rt: Runtime) {
        writes_acknowledged_before_kill_9_survive(Options::on(rt), Durable::Group).await;
    }
}

/// How the server under test makes writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// Group commit: one filesystem sync per group of commits.
    Group,
    /// Each blob syncs its own file and directory.
    PerBlob,
    /// Small blobs appended to a log, one data sync per batch.
    Log,
}

// The same with the small-blob log: the 64 KiB ByteStream uploads and the 1 KiB batches all go
// to it, each acknowledged after its batch's data sync.
on_every_runtime! {
    async fn logged_writes_acknowledged_before_kill_9_survive(rt: Runtime) {
        let options = Options {
            config: Some(common::log_chain("1 GiB", "64 MiB")),
            ..Options::on(rt)
        };
        writes_acknowledged_before_kill_9_survive(options, Durable::Log).await;
    }
}

// The same with group commit off: each blob syncs its own file and directory.
on_every_runtime! {
    async fn without_group_commit_acknowledged_writes_survive_kill_9(rt: Runtime) {
        let options = Options {
            config: Some("[storage]\ngroup_commit = false\n".into()),
            ..Options::on(rt)
        };
        writes_acknowledged_before_kill_9_survive(options, Durable::PerBlob).await;
    }
}

// The same with the ByteStream uploads written with direct I/O (on glommio), their last
// write padded and cut back before the group's sync.
on_every_runtime! {
    async fn direct_writes_acknowledged_before_kill_9_survive(rt: Runtime) {
        let options = Options {
            config: Some("[storage]\ndirect_io_min_bytes = 1\n".into()),
            ..Options::on(rt)
        };
        writes_acknowledged_before_kill_9_survive(options, Durable::Group).await;
    }
}

async fn writes_acknowledged_before_kill_9_survive(options: Options, durable: Durable) {
    use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let f = Function::Sha256;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(reapi::Digest, Vec<u8>)>::new()));
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel::<()>();
    {
        let kiln = Kiln::start_async(&data_dir, options.clone()).await;
        let ch = kiln.channel().await;
        let mut writers = Vec::new();
        for w in 0..8u64 {
            let (ch, acked, progress_tx) = (ch.clone(), acked.clone(), progress_tx.clone());
            writers.push(tokio::spawn(async move {
                for n in 0u64.. {
                    let seed = w << 32 | n;
                    if w % 2 == 0 {
                        let data = pseudo_random(seed, 64 << 10);
                        let d = digest(f, &data);
                        if blobs::write(&ch, &write_name("", f, &d), &data, 16 << 10)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        acked.lock().unwrap().push((d, data));
                    } else {
                        let batch: Vec<Vec<u8>> =
                            (0..8).map(|i| pseudo_random(seed << 4 | i, 1024)).collect();
                        let requests = batch
                            .iter()
                            .map(|data| batch_update_blobs_request::Request {
                                digest: Some(digest(f, data)),
                                data: data.clone().into(),
                                ..Default::default()
                            })
                            .collect();
                        let Ok(r) = blobs::cas(&ch)
                            .batch_update_blobs(BatchUpdateBlobsRequest {
                                requests,
                                ..Default::default()
                            })
                            .await
                        else {
                            return;
                        };
                        let mut acked = acked.lock().unwrap();
                        for (resp, data) in r.into_inner().responses.into_iter().zip(batch) {
                            if resp.status.is_none_or(|s| s.code == 0) {
                                acked.push((resp.digest.unwrap(), data));
                            }
                        }
                    }
                    if progress_tx.send(()).is_err() {
                        return;
                    }
                }
            }));
        }
        for _ in 0..64 {
            progress.recv().await.unwrap();
        }
        let so_far = acked.lock().unwrap().len();
        let synced = common::metric(&kiln.admin, "kiln_cas_group_synced_commits_total").await;
        let logged = common::metric(&kiln.admin, "kiln_log_appended_records_total").await;
        match durable {
            Durable::Group => assert!(
                synced >= so_far as f64,
                "{so_far} blobs acknowledged but only {synced} commits synced"
            ),
            Durable::PerBlob => assert_eq!(synced, 0.0, "group commit is off"),
            Durable::Log => {
                assert!(
                    logged >= so_far as f64,
                    "{so_far} blobs acknowledged but only {logged} appended to the log"
                );
                assert_eq!(synced, 0.0, "no blob went to the filesystem");
            }
        }
        drop(kiln); // SIGKILL, writers still writing
        for w in writers {
            let _ = w.await;
        }
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= 64, "{} blobs acknowledged", acked.len());
    let kiln = Kiln::start_async(&data_dir, options).await;
    let ch = kiln.channel().await;
    let digests: Vec<reapi::Digest> = acked.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(
        blobs::find_missing(&ch, "", f, digests).await,
        Vec::<reapi::Digest>::new(),
        "acknowledged blobs lost"
    );
    for (d, data) in acked.iter().step_by(7) {
        assert_eq!(
            &blobs::read(&ch, &read_name("", f, d), 0, 0).await.unwrap(),
            data
        );
    }
    kiln.stop().await;
}

/// The server's group-commit sync thread (`kiln-sync`) held in a cgroup v1 freezer (the only way to hold a
/// `syncfs` back from outside): frozen on creation, thawed and removed on drop.
struct FrozenSyncs {
    dir: PathBuf,
    tids: Vec<String>,
}

impl FrozenSyncs {
    fn freeze(pid: u32) -> FrozenSyncs {
        FrozenSyncs::freeze_threads(pid, "kiln-sync")
    }

    /// Freezes the threads of `pid` called `name`.
    fn freeze_threads(pid: u32, name: &str) -> FrozenSyncs {
        let root = Path::new("/sys/fs/cgroup/freezer");
        assert!(
            root.is_dir(),
            "this test needs the cgroup v1 freezer at {}",
            root.display()
        );
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!tids.is_empty(), "no {name} thread in {pid}");
        let dir = root.join(format!("kiln-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let frozen = FrozenSyncs { dir, tids };
        for tid in &frozen.tids {
            std::fs::write(frozen.dir.join("tasks"), tid).unwrap();
        }
        std::fs::write(frozen.dir.join("freezer.state"), "FROZEN").unwrap();
        frozen
    }

    fn thaw(&self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
    }
}

impl Drop for FrozenSyncs {
    fn drop(&mut self) {
        self.thaw();
        for tid in &self.tids {
            let _ = std::fs::write("/sys/fs/cgroup/freezer/tasks", tid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// Group commit: a blob whose sync has not finished is neither acknowledged nor visible — not to
// FindMissingBlobs, not to reads, not to a second upload of it, which waits for the same sync.
on_every_runtime! {
    async fn a_blob_is_visible_only_once_its_group_sync_is_done(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let f = Function::Sha256;
        let data = pseudo_random(77, 10_000);
        let d = digest(f, &data);
        let name = write_name("", f, &d);
        let kiln = Kiln::start_async(dir.path(), Options::on(rt)).await;
        let ch = kiln.channel().await;
        let frozen = FrozenSyncs::freeze(kiln.pid());
        let first = tokio::spawn({
            let (ch, name, data) = (ch.clone(), name.clone(), data.clone());
            async move { blobs::write(&ch, &name, &data, 4096).await }
        });
        common::eventually("the upload waiting for its sync", || async {
            (common::metric(&kiln.admin, "kiln_cas_commits_awaiting_sync").await >= 1.0).then_some(())
        })
        .await;
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        assert_eq!(
            blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap_err().code(),
            Code::NotFound
        );
        let second = tokio::spawn({
            let (ch, data) = (ch.clone(), data.clone());
            // Another upload id for the same blob.
            let name = write_name("", f, &d);
            async move { blobs::write(&ch, &name, &data, 4096).await }
        });
        // The copy waits for the first one's sync (counted with the commits awaiting one).
        common::eventually("the second upload waiting on the first", || async {
            (common::metric(&kiln.admin, "kiln_cas_commits_awaiting_sync").await >= 2.0).then_some(())
        })
        .await;
        assert!(!first.is_finished(), "acknowledged before its sync");
        assert!(!second.is_finished(), "the copy acknowledged before the sync");
        frozen.thaw();
        assert_eq!(first.await.unwrap().unwrap().committed_size, data.len() as i64);
        assert_eq!(second.await.unwrap().unwrap().committed_size, data.len() as i64);
        drop(frozen);
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, Vec::<reapi::Digest>::new());
        assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
        kiln.stop().await;
    }
}

// The small-blob log: a blob whose batch is not yet written and synced is neither acknowledged
// nor visible, through ByteStream or a batch; a second upload of it waits the same way.
on_every_runtime! {
    async fn a_logged_blob_is_visible_only_once_its_batch_is_synced(rt: Runtime) {
        use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
        let dir = tempfile::tempdir().unwrap();
        let f = Function::Sha256;
        let data = pseudo_random(78, 10_000);
        let d = digest(f, &data);
        let options = Options {
            config: Some(common::log_chain("1 GiB", "64 MiB")),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let frozen = FrozenSyncs::freeze_threads(kiln.pid(), "kiln-log");
        let first = tokio::spawn({
            let (ch, name, data) = (ch.clone(), write_name("", f, &d), data.clone());
            async move { blobs::write(&ch, &name, &data, 4096).await }
        });
        let second = tokio::spawn({
            let (ch, data, d) = (ch.clone(), data.clone(), d.clone());
            async move {
                blobs::cas(&ch)
                    .batch_update_blobs(BatchUpdateBlobsRequest {
                        requests: vec![batch_update_blobs_request::Request {
                            digest: Some(d),
                            data: data.into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .await
            }
        });
        common::eventually("both uploads waiting for the log", || async {
            (common::metric(&kiln.admin, "kiln_cas_commits_awaiting_sync").await >= 2.0).then_some(())
        })
        .await;
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        assert_eq!(
            blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap_err().code(),
            Code::NotFound
        );
        assert!(!first.is_finished() && !second.is_finished(), "acknowledged before its sync");
        frozen.thaw();
        assert_eq!(first.await.unwrap().unwrap().committed_size, data.len() as i64);
        let batch = second.await.unwrap().unwrap().into_inner();
        assert!(batch.responses[0].status.as_ref().is_none_or(|s| s.code == 0), "{batch:?}");
        drop(frozen);
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, Vec::<reapi::Digest>::new());
        assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
        assert_eq!(common::metric(&kiln.admin, "kiln_log_blobs").await, 1.0);
        // Both were queued while the writer was held: one batch, one record (the second is
        // the same blob, answered with the first).
        assert_eq!(common::metric(&kiln.admin, "kiln_log_batches_total").await, 1.0);
        assert_eq!(common::metric(&kiln.admin, "kiln_log_appended_records_total").await, 1.0);
        kiln.stop().await;
    }
}

// A log added to a server that already holds small blobs as files: those files are not what
// the chain serves any more, so they neither answer for the log (FindMissingBlobs, a write's
// "already present", QueryWriteStatus) nor keep a write from storing the blob in the log.
on_every_runtime! {
    async fn a_file_left_from_before_a_log_does_not_stand_for_it(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let f = Function::Sha256;
        let data = pseudo_random(79, 3_000);
        let d = digest(f, &data);
        {
            let kiln = Kiln::start_async(dir.path(), Options::on(rt)).await;
            let ch = kiln.channel().await;
            blobs::write(&ch, &write_name("", f, &d), &data, 4096).await.unwrap();
            kiln.stop().await;
        }
        assert_eq!(common::blob_files(dir.path()).len(), 1, "stored as a file");
        let options = Options {
            config: Some(common::log_chain("1 GiB", "64 MiB")),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, vec![d.clone()]);
        let name = write_name("", f, &d);
        assert!(blobs::query(&ch, &name).await.is_err(), "no such upload, and not complete");
        assert_eq!(
            blobs::write(&ch, &name, &data, 1024).await.unwrap().committed_size,
            data.len() as i64
        );
        assert_eq!(common::metric(&kiln.admin, "kiln_log_blobs").await, 1.0, "stored in the log");
        assert_eq!(blobs::query(&ch, &name).await.unwrap(), (data.len() as i64, true));
        assert_eq!(blobs::find_missing(&ch, "", f, vec![d.clone()]).await, Vec::<reapi::Digest>::new());
        assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), data);
        kiln.stop().await;
    }
}

// An upload bound for the log and held in memory takes no room against the files' cap: with
// that cap all but taken by a large upload in progress, a small one still goes to the log
// (it used to be refused with RESOURCE_EXHAUSTED, and could make the files evict).
on_every_runtime! {
    async fn a_log_upload_needs_no_room_in_the_files(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let f = Function::Sha256;
        let config = "[storage]\ndisk_bytes = \"100 KiB\"\nchain = [\"split\"]\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"16 KiB\"\nsmall = [\"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"8 MiB\"\nsegment_bytes = \"1 MiB\"\n";
        let options = Options {
            config: Some(config.into()),
            ..Options::on(rt)
        };
        let kiln = Kiln::start_async(dir.path(), options).await;
        let ch = kiln.channel().await;
        let large = pseudo_random(80, 90 << 10);
        let large_name = write_name("", f, &digest(f, &large));
        let upload = blobs::open_upload(&ch);
        for r in blobs::write_requests(&large_name, &large, 10 << 10, 0).into_iter().take(2) {
            upload.tx.send(r).await.unwrap();
        }
        blobs::wait_committed(&ch, &large_name, 20 << 10).await;
        let small = pseudo_random(81, 15 << 10);
        let d = digest(f, &small);
        assert_eq!(
            blobs::write(&ch, &write_name("", f, &d), &small, 4096).await.unwrap().committed_size,
            small.len() as i64
        );
        assert_eq!(blobs::read(&ch, &read_name("", f, &d), 0, 0).await.unwrap(), small);
        drop(upload.tx);
        let _ = upload.call.await;
        kiln.stop().await;
    }
}

// kill -9 mid-upload: after a restart there is no trace of the partial blob.
on_every_runtime! {
    async fn crash_mid_upload_leaves_nothing(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let f = Function::Sha256;
        let data = pseudo_random(12, 4 << 20);
        let d = digest(f, &data);
        let name = write_name("", f, &d);
        {
            let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
            let ch = kiln.channel().await;
            let upload = blobs::open_upload(&ch);
            for r in blobs::write_requests(&name, &data, 1 << 20, 0)
                .into_iter()
                .take(2)
            {
                upload.tx.send(r).await.unwrap();
            }
            blobs::wait_committed(&ch, &name, 2 << 20).await;
            drop(kiln); // SIGKILL
            drop(upload.tx);
            let _ = upload.call.await;
        }
        let kiln = Kiln::start_async(&data_dir, Options::on(rt)).await;
        let ch = kiln.channel().await;
        assert_eq!(
            blobs::find_missing(&ch, "", f, vec![d.clone()]).await,
            vec![d.clone()]
        );
        assert_eq!(common::temp_files(&data_dir), Vec::<PathBuf>::new(), "temp files wiped");
        assert_eq!(
            blobs::read(&ch, &read_name("", f, &d), 0, 0)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
        kiln.stop().await;
    }
}

fn action_cache(ch: &tonic::transport::Channel) -> ActionCacheClient<tonic::transport::Channel> {
    ActionCacheClient::new(ch.clone())
}

/// Stores a result with exit code `code` for `action` (a result with no outputs is complete).
async fn update_result(
    ch: &tonic::transport::Channel,
    action: &reapi::Digest,
    code: i32,
) -> Result<(), tonic::Status> {
    action_cache(ch)
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(ActionResult {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn result_code(ch: &tonic::transport::Channel, action: &reapi::Digest) -> Result<i32, Code> {
    action_cache(ch)
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().exit_code)
        .map_err(|s| s.code())
}

// Action results acknowledged before kill -9 are there after the restart, each with its own
// bytes (results sync their own file and directory: see docs/benchmarking.md for why they do
// not share the CAS's group commit). The action cache is control-plane code, the same on every
// runtime: one is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_acknowledged_before_kill_9_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let options = Options::on(common::Runtime::Glommio);
    let action = |n: u64| digest(Function::Sha256, &n.to_le_bytes());
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(reapi::Digest, i32)>::new()));
    {
        let kiln = Kiln::start_async(&data_dir, options.clone()).await;
        let ch = kiln.channel().await;
        let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel::<()>();
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (ch, acked, progress_tx) = (ch.clone(), acked.clone(), progress_tx.clone());
                tokio::spawn(async move {
                    for n in 0u64.. {
                        let (a, code) = (action(w << 32 | n), (n % 100) as i32);
                        if update_result(&ch, &a, code).await.is_err() {
                            return;
                        }
                        acked.lock().unwrap().push((a, code));
                        if progress_tx.send(()).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for _ in 0..64 {
            progress.recv().await.unwrap();
        }
        drop(kiln); // SIGKILL, writers still writing
        for w in writers {
            let _ = w.await;
        }
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= 64, "{} results acknowledged", acked.len());
    let kiln = Kiln::start_async(&data_dir, options).await;
    let ch = kiln.channel().await;
    for (a, code) in &acked {
        assert_eq!(result_code(&ch, a).await, Ok(*code), "{a:?}");
    }
    kiln.stop().await;
}
