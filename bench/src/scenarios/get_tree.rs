//! `get-tree`: GetTree (following pages) over a synthetic tree uploaded before measuring;
//! skipped when the server does not implement GetTree.

use super::{timed, Ctx, Prepared};
use crate::blobs;
use crate::load::Workload;
use crate::stats::{code_name, Sample};
use futures::future::BoxFuture;
use futures::StreamExt;
use kiln_proto::reapi::{self, Directory, DirectoryNode, FileNode};
use prost::Message;
use std::sync::Arc;

struct GetTreeLoad {
    ctx: Arc<Ctx>,
    root: reapi::Digest,
    directories: usize,
}

/// Builds the tree bottom-up; returns the root and every directory blob.
fn build(ctx: &Ctx, nonce: &str) -> (reapi::Digest, Vec<(reapi::Digest, Vec<u8>)>) {
    fn level(
        ctx: &Ctx,
        nonce: &str,
        depth: u32,
        path: String,
        out: &mut Vec<(reapi::Digest, Vec<u8>)>,
    ) -> reapi::Digest {
        let files = (0..ctx.args.files)
            .map(|f| FileNode {
                name: format!("file{f}"),
                digest: Some(blobs::digest_of(
                    ctx.function,
                    &[format!("{nonce}{path}/{f}").as_bytes()],
                )),
                is_executable: f % 3 == 0,
                node_properties: None,
            })
            .collect();
        let directories = if depth == 0 {
            Vec::new()
        } else {
            (0..ctx.args.fanout)
                .map(|d| DirectoryNode {
                    name: format!("dir{d}"),
                    digest: Some(level(ctx, nonce, depth - 1, format!("{path}/{d}"), out)),
                })
                .collect()
        };
        let dir = Directory {
            files,
            directories,
            ..Default::default()
        };
        let bytes = dir.encode_to_vec();
        let digest = blobs::digest_of(ctx.function, &[&bytes]);
        out.push((digest.clone(), bytes));
        digest
    }
    let mut out = Vec::new();
    let root = level(ctx, nonce, ctx.args.depth, String::new(), &mut out);
    (root, out)
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let nonce = uuid::Uuid::new_v4().to_string();
    let (root, dirs) = build(&ctx, &nonce);
    let directories = dirs.len();
    // Upload the directories in batches below the server's limit.
    let limit = ctx.max_batch() as usize / 2;
    let mut batch = Vec::new();
    let mut bytes = 0;
    for (d, data) in dirs {
        if bytes + data.len() > limit && !batch.is_empty() {
            send(&ctx, std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
        bytes += data.len();
        batch.push(reapi::batch_update_blobs_request::Request {
            digest: Some(d),
            data: data.into(),
            compressor: 0,
        });
    }
    send(&ctx, batch).await?;
    let probe = GetTreeLoad {
        ctx,
        root,
        directories,
    };
    match probe.walk().await {
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(Prepared::Skip(
            "the server does not implement GetTree".into(),
        )),
        Err(s) => Err(anyhow::anyhow!("GetTree failed while preparing: {s}")),
        Ok(_) => Ok(Prepared::Run(Arc::new(probe))),
    }
}

async fn send(
    ctx: &Ctx,
    requests: Vec<reapi::batch_update_blobs_request::Request>,
) -> anyhow::Result<()> {
    if requests.is_empty() {
        return Ok(());
    }
    ctx.update_blobs(requests)
        .await
        .map_err(|code| anyhow::anyhow!("the server refused a directory: {}", code_name(code)))
}

impl GetTreeLoad {
    /// Every page of the tree; returns the number of directories seen.
    async fn walk(&self) -> Result<usize, tonic::Status> {
        let mut token = String::new();
        let mut seen = 0;
        let mut cas = self.ctx.cas();
        loop {
            let mut stream = cas
                .get_tree(reapi::GetTreeRequest {
                    instance_name: self.ctx.args.instance.clone(),
                    root_digest: Some(self.root.clone()),
                    page_size: self.ctx.args.page_size,
                    page_token: token.clone(),
                    digest_function: self.ctx.proto_function(),
                })
                .await?
                .into_inner();
            let mut next = String::new();
            while let Some(page) = stream.next().await {
                let page = page?;
                seen += page.directories.len();
                next = page.next_page_token;
            }
            if next.is_empty() {
                return Ok(seen);
            }
            token = next;
        }
    }
}

impl Workload for GetTreeLoad {
    fn run(self: Arc<Self>, _index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let (r, latency) = timed(self.walk()).await;
            let sample = match r {
                Ok(n) if n == self.directories => Sample::ok("get-tree", latency, 0),
                Ok(_) => Sample::failed("get-tree", latency, "WRONG_ANSWER"),
                Err(s) => Sample::failed("get-tree", latency, code_name(s.code())),
            };
            vec![sample]
        })
    }
}
