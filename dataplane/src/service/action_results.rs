//! `GetActionResult` answered on the core that received it when the action cache can vouch for
//! the answer without any I/O: the result is held in memory and its last completeness check
//! still holds. The stored bytes are the response, so there is no decoding, no encoding and no
//! hand-over to the control plane (two thread wake-ups per call). Anything else — a result not
//! in memory, a check or an access-time write due, a request that does not parse, a caller the
//! check would refuse — goes to the control plane unchanged, which answers it (and every error)
//! as before.

use super::BlobServices;
use crate::grpc::codec::{put_prefix, PREFIX_LEN};
use crate::grpc::Call;
use bytes::{Bytes, BytesMut};
use kiln_proto::reapi::GetActionResultRequest;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use tracing::debug_span;

/// Action results the data plane may serve itself; the action cache implements it.
pub trait ReadyResults: Send + Sync {
    /// The encoded `ActionResult` for `key` when it can be served now without the control
    /// plane (held in memory, known complete, nothing due); the implementation counts the hit
    /// and marks the entry used. `None`: let the control plane answer.
    fn ready(&self, key: &BlobKey) -> Option<Bytes>;
}

/// A `GetActionResultRequest` is an instance name and a digest: anything larger is not one
/// to serve here.
const REQUEST_LIMIT: usize = 16 << 10;

/// Serves a `GetActionResult` from `results` when it can, else hands the call over.
pub(super) async fn serve_get(svc: &BlobServices, results: &dyn ReadyResults, mut call: Call) {
    let Ok((request, read)) = call
        .peek_unary::<GetActionResultRequest>(REQUEST_LIMIT)
        .await
    else {
        return; // The peer is gone.
    };
    let ready = request.and_then(|request| {
        let span =
            debug_span!("GetActionResult", instance = %request.instance_name, on = "data plane");
        span.in_scope(|| {
            let instance = InstanceName::new(&request.instance_name).ok()?;
            call.caller().check(instance.as_str()).ok()?;
            let digest =
                Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)
                    .ok()?;
            let result = results.ready(&BlobKey::new(instance, digest))?;
            let len = u32::try_from(result.len()).ok()?;
            Some((result, len))
        })
    });
    let Some((result, len)) = ready else {
        return svc.forward_after(call, read).await;
    };
    let mut responder = call.responder;
    let mut prefix = BytesMut::with_capacity(PREFIX_LEN);
    put_prefix(&mut prefix, len);
    if responder.send(&[prefix.freeze(), result]).await.is_ok() {
        responder.finish(Ok(()));
    }
}
