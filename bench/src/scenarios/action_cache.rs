//! `action-cache`: GetActionResult hits (of results stored before measuring) and misses, and
//! UpdateActionResult, nine reads to one write. Every answer is checked.

use super::{timed, Ctx, Prepared};
use crate::blobs::{self, BlobPool};
use crate::load::Workload;
use crate::size::unit;
use crate::stats::{code_name, Sample};
use futures::future::BoxFuture;
use kiln_proto::reapi::{self, ActionResult, OutputFile};
use std::sync::Arc;

struct ActionCacheLoad {
    ctx: Arc<Ctx>,
    /// (action digest, its result) of stored entries.
    stored: Vec<(reapi::Digest, ActionResult)>,
    nonce: String,
}

pub(super) async fn prepare(ctx: Arc<Ctx>) -> anyhow::Result<Prepared> {
    let n = ctx.args.blobs.unwrap_or(1000).max(1);
    let pool = BlobPool::new(64);
    let outputs: Vec<(u64, u64)> = (0..n as u64).map(|i| (i, 64)).collect();
    let digests = pool.digests(ctx.function, &outputs);
    let items: Vec<_> = outputs
        .iter()
        .zip(&digests)
        .map(|((id, size), d)| (*id, *size, d.clone()))
        .collect();
    ctx.upload(&pool, &items).await?;
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut stored = Vec::with_capacity(n);
    for (i, d) in digests.into_iter().enumerate() {
        let action = blobs::digest_of(ctx.function, &[format!("action {nonce} {i}").as_bytes()]);
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: format!("out/{i}"),
                digest: Some(d),
                ..Default::default()
            }],
            exit_code: 0,
            ..Default::default()
        };
        update(&ctx, &action, result.clone()).await?;
        stored.push((action, result));
    }
    Ok(Prepared::Run(Arc::new(ActionCacheLoad {
        ctx,
        stored,
        nonce,
    })))
}

async fn update(
    ctx: &Ctx,
    action: &reapi::Digest,
    result: ActionResult,
) -> Result<(), tonic::Status> {
    ctx.action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: ctx.args.instance.clone(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: ctx.proto_function(),
        })
        .await
        .map(|_| ())
}

impl Workload for ActionCacheLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let ctx = &self.ctx;
            let (action, expected) = &self.stored[index as usize % self.stored.len()];
            if unit(index, 7) < ctx.args.update_fraction {
                let (r, latency) = timed(update(ctx, action, expected.clone())).await;
                return vec![Sample::from_result("update", latency, 0, &r)];
            }
            let hit = unit(index, 5) < ctx.args.hit_fraction;
            let (kind, action) = if hit {
                ("get-hit", action.clone())
            } else {
                let absent = format!("absent {} {index}", self.nonce);
                (
                    "get-miss",
                    blobs::digest_of(ctx.function, &[absent.as_bytes()]),
                )
            };
            let request = reapi::GetActionResultRequest {
                instance_name: ctx.args.instance.clone(),
                action_digest: Some(action),
                digest_function: ctx.proto_function(),
                ..Default::default()
            };
            let (r, latency) = timed(ctx.action_cache().get_action_result(request)).await;
            let sample = match (hit, r) {
                (true, Ok(got)) if got.get_ref() == expected => Sample::ok(kind, latency, 0),
                (false, Err(s)) if s.code() == tonic::Code::NotFound => {
                    Sample::ok(kind, latency, 0)
                }
                (_, Ok(_)) => Sample::failed(kind, latency, "WRONG_ANSWER"),
                (_, Err(s)) => Sample::failed(kind, latency, code_name(s.code())),
            };
            vec![sample]
        })
    }
}
