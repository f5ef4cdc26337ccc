//! Remote-execution helpers: input trees, actions, Execute to completion, and worker
//! processes.

use super::blobs::{self, digest};
use super::{Kiln, Options, Runtime, PROCESS_TIMEOUT};
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, batch_update_blobs_request, command::EnvironmentVariable,
    digest_function::Value as Function, Action, Command, Directory, DirectoryNode, ExecuteRequest,
    ExecuteResponse, FileNode, SymlinkNode,
};
use prost::Message;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Instant;
use tonic::transport::Channel;

/// An input tree under construction: path → content (files), or symlink targets.
#[derive(Default, Clone)]
pub struct Tree {
    files: BTreeMap<String, (Vec<u8>, bool)>,
    symlinks: BTreeMap<String, String>,
    /// Levels of directories above the tree, each naming the one below twice.
    doubled: u32,
}

impl Tree {
    /// Adds a file (`dir/sub/name`).
    pub fn file(mut self, path: &str, content: &[u8], executable: bool) -> Tree {
        self.files
            .insert(path.to_string(), (content.to_vec(), executable));
        self
    }

    /// Adds a symlink.
    pub fn symlink(mut self, path: &str, target: &str) -> Tree {
        self.symlinks.insert(path.to_string(), target.to_string());
        self
    }

    /// The tree under `levels` directories, each naming the one below twice (as `a` and
    /// `b`): laid out, it is made 2^levels times.
    pub fn doubled(mut self, levels: u32) -> Tree {
        self.doubled = levels;
        self
    }

    /// Every blob (files and Directory messages) and the root digest.
    pub fn blobs(&self, f: Function) -> (reapi::Digest, Vec<(reapi::Digest, Vec<u8>)>) {
        let mut blobs = Vec::new();
        let mut root = self.dir("", f, &mut blobs);
        for _ in 0..self.doubled {
            let node = |name: &str| kiln_proto::reapi::DirectoryNode {
                name: name.into(),
                digest: Some(root.clone()),
            };
            let above = Directory {
                directories: vec![node("a"), node("b")],
                ..Default::default()
            };
            let bytes = above.encode_to_vec();
            root = digest(f, &bytes);
            blobs.push((root.clone(), bytes));
        }
        (root, blobs)
    }

    fn dir(
        &self,
        prefix: &str,
        f: Function,
        blobs: &mut Vec<(reapi::Digest, Vec<u8>)>,
    ) -> reapi::Digest {
        let mut d = Directory::default();
        let mut subdirs = std::collections::BTreeSet::new();
        let children = |path: &str| path.strip_prefix(prefix).map(|rest| rest.to_string());
        for (path, (content, exec)) in &self.files {
            let Some(rest) = children(path) else { continue };
            match rest.split_once('/') {
                Some((sub, _)) => {
                    subdirs.insert(sub.to_string());
                }
                None => {
                    let dg = digest(f, content);
                    blobs.push((dg.clone(), content.clone()));
                    d.files.push(FileNode {
                        name: rest,
                        digest: Some(dg),
                        is_executable: *exec,
                        node_properties: None,
                    });
                }
            }
        }
        for (path, target) in &self.symlinks {
            let Some(rest) = children(path) else { continue };
            match rest.split_once('/') {
                Some((sub, _)) => {
                    subdirs.insert(sub.to_string());
                }
                None => d.symlinks.push(SymlinkNode {
                    name: rest,
                    target: target.clone(),
                    node_properties: None,
                }),
            }
        }
        for sub in subdirs {
            let dg = self.dir(&format!("{prefix}{sub}/"), f, blobs);
            d.directories.push(DirectoryNode {
                name: sub,
                digest: Some(dg),
            });
        }
        let bytes = d.encode_to_vec();
        let dg = digest(f, &bytes);
        blobs.push((dg.clone(), bytes));
        dg
    }
}

/// Uploads blobs with BatchUpdateBlobs.
pub async fn upload(ch: &Channel, f: Function, blobs: Vec<(reapi::Digest, Vec<u8>)>) {
    let response = blobs::cas(ch)
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| batch_update_blobs_request::Request {
                    digest: Some(d),
                    data: Bytes::from(data),
                    compressor: 0,
                })
                .collect(),
            digest_function: f as i32,
        })
        .await
        .expect("upload")
        .into_inner();
    assert!(response
        .responses
        .iter()
        .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)));
}

/// An action running `script` with /bin/sh in `tree`, declaring `outputs`.
pub struct Spec {
    /// The shell script.
    pub script: String,
    /// Inputs.
    pub tree: Tree,
    /// `output_paths`.
    pub outputs: Vec<String>,
    /// Platform properties required.
    pub platform: Vec<(String, String)>,
    /// Timeout in seconds (0: the server's default).
    pub timeout_secs: i64,
    /// `do_not_cache`.
    pub do_not_cache: bool,
    /// Distinguishes otherwise identical actions.
    pub salt: String,
    /// `Command.working_directory`.
    pub working_directory: String,
}

impl Spec {
    /// A script with no inputs or outputs.
    pub fn script(script: &str) -> Spec {
        Spec {
            script: script.to_string(),
            tree: Tree::default(),
            outputs: Vec::new(),
            platform: Vec::new(),
            timeout_secs: 0,
            do_not_cache: false,
            salt: uuid::Uuid::new_v4().to_string(),
            working_directory: String::new(),
        }
    }

    /// Uploads the action's blobs; returns the action digest.
    pub async fn upload(&self, ch: &Channel, f: Function) -> reapi::Digest {
        self.upload_except(ch, f, None).await
    }

    /// Uploads the action's blobs except a file with content `skip`.
    pub async fn upload_except(
        &self,
        ch: &Channel,
        f: Function,
        skip: Option<&[u8]>,
    ) -> reapi::Digest {
        self.upload_only(ch, f, |data| Some(data) != skip).await
    }

    /// Uploads the action's blobs whose content `keep` accepts (the Action and Command are
    /// always uploaded).
    pub async fn upload_only(
        &self,
        ch: &Channel,
        f: Function,
        keep: impl Fn(&[u8]) -> bool,
    ) -> reapi::Digest {
        let platform = reapi::Platform {
            properties: self
                .platform
                .iter()
                .map(|(n, v)| reapi::platform::Property {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
        };
        let command = Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), self.script.clone()],
            environment_variables: vec![EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            }],
            output_paths: self.outputs.clone(),
            working_directory: self.working_directory.clone(),
            ..Default::default()
        };
        let (root, mut blobs) = self.tree.blobs(f);
        blobs.retain(|(_, data)| keep(data));
        let command_bytes = command.encode_to_vec();
        let command_digest = digest(f, &command_bytes);
        let action = Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(root),
            timeout: (self.timeout_secs > 0).then_some(prost_types::Duration {
                seconds: self.timeout_secs,
                nanos: 0,
            }),
            do_not_cache: self.do_not_cache,
            salt: Bytes::from(self.salt.clone()),
            platform: Some(platform),
        };
        let action_bytes = action.encode_to_vec();
        let action_digest = digest(f, &action_bytes);
        blobs.push((command_digest, command_bytes));
        blobs.push((action_digest.clone(), action_bytes));
        upload(ch, f, blobs).await;
        action_digest
    }
}

/// The digest of the output file at `path` in `result` (which must have it).
pub fn output_file(result: &kiln_proto::reapi::ActionResult, path: &str) -> reapi::Digest {
    result
        .output_files
        .iter()
        .find(|f| f.path == path)
        .and_then(|f| f.digest.clone())
        .unwrap_or_else(|| panic!("no output file {path}: {result:?}"))
}

/// Runs Execute to completion: the operations seen and the final response.
pub async fn execute(
    ch: &Channel,
    f: Function,
    action: &reapi::Digest,
    skip_cache: bool,
) -> Result<(Vec<Operation>, ExecuteResponse), tonic::Status> {
    let mut stream = ExecutionClient::new(ch.clone())
        .execute(ExecuteRequest {
            instance_name: String::new(),
            skip_cache_lookup: skip_cache,
            action_digest: Some(action.clone()),
            digest_function: f as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(op) = stream.next().await {
        let op = op?;
        seen.push(op.clone());
        if op.done {
            let Some(operation::Result::Response(any)) = op.result else {
                panic!("done operation without a response: {op:?}");
            };
            return Ok((
                seen,
                ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse"),
            ));
        }
    }
    panic!("Execute stream ended before the operation was done: {seen:?}");
}

/// The response's status code (0 when unset).
pub fn code(r: &ExecuteResponse) -> i32 {
    r.status.as_ref().map_or(0, |s: &RpcStatus| s.code)
}

/// The worker that ran the action of an `ExecuteResponse`, by its metadata.
pub fn worker_of(r: &ExecuteResponse) -> String {
    let meta = r.result.as_ref().unwrap().execution_metadata.as_ref();
    meta.unwrap().worker.clone()
}

/// The bytes of an output (or any blob) by digest; fails the test when it cannot be read.
pub async fn read_output(ch: &Channel, f: Function, d: &reapi::Digest) -> Vec<u8> {
    blobs::read(ch, &blobs::read_name("", f, d), 0, 0)
        .await
        .expect("read output")
}

/// A running `kiln worker`.
pub struct Worker {
    child: Option<Child>,
    /// Its name.
    pub name: String,
    /// What it logged until its session opened.
    pub start_log: Vec<String>,
}

impl Worker {
    /// Starts a worker for the server at `addr`, keeping its CAS and work directory under `dir`.
    pub fn start_at(
        addr: std::net::SocketAddr,
        runtime: Runtime,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Worker {
        Worker::start_for(&format!("grpc://{addr}"), runtime, dir, name, extra)
    }

    /// Starts a worker for the scheduler at `url` (`grpc://` or `grpcs://`).
    pub fn start_for(
        url: &str,
        runtime: Runtime,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Worker {
        Worker::start_in(None, url, runtime, dir, name, "127.0.0.1:0", extra)
    }

    /// Starts a worker in the network namespace `netns` (when given), its local CAS on
    /// `listen`.
    pub fn start_in(
        netns: Option<&str>,
        url: &str,
        runtime: Runtime,
        dir: &Path,
        name: &str,
        listen: &str,
        extra: &[&str],
    ) -> Worker {
        let mut cmd = super::kiln_command(netns);
        cmd.arg("worker")
            .arg("--scheduler")
            .arg(url)
            .arg("--cas-dir")
            .arg(dir.join("cas"))
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--name")
            .arg(name)
            .arg("--listen")
            .arg(listen)
            .arg("--shards")
            .arg("1")
            .arg("--runtime")
            .arg(runtime.flag())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kiln worker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let mut start_log = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("worker session open") => break,
                Ok(line) => start_log.push(line),
                Err(_) => panic!("worker {name} never connected:\n{}", start_log.join("\n")),
            }
        }
        Worker {
            child: Some(child),
            name: name.to_string(),
            start_log,
        }
    }

    /// The address of its admin listener (`--admin-listen`), as it logged it.
    pub fn admin(&self) -> String {
        self.start_log
            .iter()
            .find_map(|l| l.split("worker metrics on ").nth(1))
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .expect("the worker logs its metrics address")
            .to_string()
    }

    /// Sends a signal (`libc::SIGSTOP`, `libc::SIGCONT`, ...).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("worker is running").id();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server config for a farm test: no embedded worker, workers lost after 3 s of silence.
pub const NO_EMBEDDED: &str =
    "[worker]\nembedded = false\n[execution]\nkeepalive_secs = 1\nworker_timeout_secs = 3\n";

/// `kiln serve` for a farm test (data under `dir/server`), started on this thread.
pub fn server(rt: Runtime, dir: &Path) -> Kiln {
    Kiln::start_with(
        &dir.join("server"),
        Options {
            config: Some(NO_EMBEDDED.into()),
            ..Options::on(rt)
        },
    )
}

/// [`server`], started off the async threads.
pub async fn start_server(rt: Runtime, dir: &Path) -> Kiln {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || server(rt, &d))
        .await
        .unwrap()
}

/// A `kiln worker` named `name` for `kiln`, keeping its data under `dir`, started off the
/// async threads.
pub async fn start_worker(
    rt: Runtime,
    kiln: &Kiln,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> Worker {
    let (addr, dir, name) = (kiln.addr, dir.to_path_buf(), name.to_string());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Worker::start_at(addr, rt, &dir, &name, &extra)
    })
    .await
    .unwrap()
}
