//! The blob methods served on the data plane's cores, and the router that sends every other
//! method to the control plane.

mod action_results;
mod cas;
mod error;
mod find_missing;
pub mod frames;
mod read;
mod write;

pub use action_results::ReadyResults;
pub use error::BlobError;

use crate::grpc::{Call, CallHandler, Caller, HandoffSender, Responder};
use crate::runtime::{LocalBoxFuture, Runtime};
use crate::slots::{Slot, Slots};
use crate::store::layout::Layout;
use crate::store::tier::in_flight::Uploads;
use crate::store::tier::BlobStore;
use crate::store::CasClient;
use std::rc::Rc;
use std::sync::Arc;

/// The data plane's link to the control plane.
#[derive(Clone)]
pub struct ControlLink {
    /// Where the calls the data plane does not serve go.
    pub handoff: HandoffSender,
    /// Action results the data plane may answer itself (`GetActionResult` hits held in memory).
    pub results: Option<Arc<dyn ReadyResults>>,
}

/// gRPC paths of the methods served on the data plane.
pub mod paths {
    /// ByteStream.Read
    pub const READ: &str = "/google.bytestream.ByteStream/Read";
    /// ByteStream.Write
    pub const WRITE: &str = "/google.bytestream.ByteStream/Write";
    /// ByteStream.QueryWriteStatus
    pub const QUERY_WRITE_STATUS: &str = "/google.bytestream.ByteStream/QueryWriteStatus";
    /// CAS.FindMissingBlobs
    pub const FIND_MISSING: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    /// CAS.BatchUpdateBlobs
    pub const BATCH_UPDATE: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
    /// CAS.BatchReadBlobs
    pub const BATCH_READ: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
    /// ActionCache.GetActionResult (answered here when the action cache can vouch for it).
    pub const GET_ACTION_RESULT: &str =
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
}

/// Limits the blob methods enforce.
#[derive(Debug, Clone)]
pub struct BlobLimits {
    /// Largest total of blob bytes in one batch call.
    pub max_batch_total: u64,
    /// Size of each ByteStream `ReadResponse`.
    pub read_chunk: usize,
    /// Blobs up to this size are read whole (so that a memory tier can keep them), larger ones
    /// streamed from their file.
    pub inline_read: u64,
    /// The CAS capacity: larger blobs are refused up front.
    pub cas_capacity: u64,
    /// fsync uploads before acknowledging them.
    pub fsync: bool,
    /// With group commit on: blobs up to this size leave their data to the group's sync.
    pub group_commit_max: Option<u64>,
    /// Uploads of at least this size are written with direct I/O where available.
    pub direct_io_min: Option<u64>,
    /// A Write that sends nothing for this long is ended and parked.
    pub stalled_upload: Option<std::time::Duration>,
    /// zstd as this server speaks it (`None`: turned off, compressed requests refused).
    pub zstd: Option<ZstdSettings>,
    /// Bytes of ByteStream uploads held in memory for a store that keeps no files (a
    /// small-blob log), across the process; past it an upload goes through a temp file.
    pub held_uploads: Arc<Slots>,
}

/// The bytes [`BlobLimits::held_uploads`] allows.
pub const HELD_UPLOAD_BYTES: usize = 256 << 20;

/// How the blob methods speak zstd.
#[derive(Debug, Clone)]
pub struct ZstdSettings {
    /// The level reads and batch answers are compressed at.
    pub level: i32,
    /// Largest window a client's frame may ask for, as a power of two.
    pub max_window_log: u32,
    /// zstd decoders in use across the process (shared by every shard): a frame header
    /// alone can make one allocate its whole window, so their number is capped.
    pub decoders: Arc<Slots>,
    /// Frames of blobs read compressed, kept for the next read (shared by every shard).
    pub frames: Arc<frames::FrameCache>,
}

/// The memory all zstd decoders' windows may take together.
pub const DECODER_MEMORY: usize = 1 << 30;

impl ZstdSettings {
    /// Room for as many decoders as windows of 2^`max_window_log` bytes fit in
    /// [`DECODER_MEMORY`].
    pub fn decoder_slots(max_window_log: u32) -> Arc<Slots> {
        let window = 1usize.checked_shl(max_window_log).unwrap_or(usize::MAX);
        Slots::new((DECODER_MEMORY / window.max(1)).max(1))
    }

    /// A place for one more decoder, or `RESOURCE_EXHAUSTED` when all are in use.
    pub fn decoder(&self) -> Result<Slot, BlobError> {
        self.decoders.take().ok_or(BlobError::DecodersBusy {
            max: self.decoders.max(),
        })
    }
}

impl BlobLimits {
    /// Whether an upload of `size` bytes syncs its own data before its commit: with fsync
    /// on, unless group commit covers it (its commit then waits for a sync of the whole
    /// filesystem, which writes the data too).
    pub fn sync_own_data(&self, size: u64) -> bool {
        crate::store::durable::sync_own_data(self.fsync, self.group_commit_max, size)
    }

    /// zstd settings for a request in `compressor`'s form; an error when it is off.
    pub fn zstd(&self) -> Result<&ZstdSettings, BlobError> {
        self.zstd.as_ref().ok_or(BlobError::CompressionOff)
    }

    /// Whether a new upload of `size` bytes asks for direct I/O.
    pub fn direct_io(&self, size: u64) -> bool {
        self.direct_io_min.is_some_and(|min| size >= min)
    }
}

/// The blob services of one shard.
pub struct BlobServices {
    runtime: Rc<dyn Runtime>,
    /// The upload table and the shard router, for what is not a tier's business (claiming,
    /// parking and querying uploads).
    cas: CasClient,
    /// The chain of tiers blobs are read from and stored through.
    store: Arc<dyn BlobStore>,
    /// With an in-flight tier: where uploads register for readers to follow.
    uploads: Option<Arc<Uploads>>,
    layout: Layout,
    limits: BlobLimits,
    control: Option<ControlLink>,
}

impl BlobServices {
    /// Services running on `runtime` over the chain `store`; calls they do not serve go to
    /// `handoff` (or are answered `UNIMPLEMENTED` when there is no control plane).
    pub fn new(
        runtime: Rc<dyn Runtime>,
        cas: CasClient,
        store: Arc<dyn BlobStore>,
        uploads: Option<Arc<Uploads>>,
        layout: Layout,
        limits: BlobLimits,
        control: Option<ControlLink>,
    ) -> Rc<BlobServices> {
        Rc::new(BlobServices {
            runtime,
            cas,
            store,
            uploads,
            layout,
            limits,
            control,
        })
    }

    async fn forward(&self, call: Call) {
        self.forward_after(call, Vec::new()).await
    }

    /// Hands a call over whose first body bytes (`read`) were already read here.
    async fn forward_after(&self, call: Call, read: Vec<bytes::Bytes>) {
        let Some(ControlLink { handoff, .. }) = &self.control else {
            let path = call.path().to_string();
            call.responder
                .finish(Err(tonic::Status::unimplemented(format!(
                    "method {path} is not served here"
                ))));
            return;
        };
        if let Err(async_channel::SendError(call)) =
            handoff.send(call.into_forwarded_after(read)).await
        {
            Responder::new(call.respond, call.recorder.map(std::rc::Rc::new)).finish(Err(
                tonic::Status::unavailable("the control plane is shutting down"),
            ));
        }
    }
}

impl CallHandler for BlobServices {
    fn handle(self: Rc<Self>, call: Call) -> LocalBoxFuture<'static, ()> {
        // Each method's future is boxed on its own: one future matching on the path would be
        // as large as the largest method's (an upload's), and copying that into its box was
        // 5 % of the server's time on small calls.
        match call.path() {
            paths::READ => Box::pin(async move { read::serve(&self, call).await }),
            paths::WRITE => Box::pin(async move { write::serve(&self, call).await }),
            paths::QUERY_WRITE_STATUS => {
                Box::pin(async move { write::serve_query(&self, call).await })
            }
            paths::FIND_MISSING => Box::pin(async move { find_missing::serve(&self, call).await }),
            paths::BATCH_UPDATE => {
                Box::pin(async move { cas::serve_batch_update(&self, call).await })
            }
            paths::BATCH_READ => Box::pin(async move { cas::serve_batch_read(&self, call).await }),
            paths::GET_ACTION_RESULT => {
                match self.control.as_ref().and_then(|c| c.results.clone()) {
                    Some(results) => {
                        Box::pin(
                            async move { action_results::serve_get(&self, &*results, call).await },
                        )
                    }
                    None => Box::pin(async move { self.forward(call).await }),
                }
            }
            _ => Box::pin(async move { self.forward(call).await }),
        }
    }
}

/// Runs a unary method: decode the request, run `f`, send its response or status.
async fn unary<Req, Resp, F, Fut>(call: Call, f: F)
where
    Req: prost::Message + Default,
    Resp: prost::Message,
    F: FnOnce(Req, Caller) -> Fut,
    Fut: std::future::Future<Output = Result<Resp, BlobError>>,
{
    let caller = call.caller();
    let (mut body, mut responder) = call.into_parts();
    let request = match body.unary::<Req>().await {
        Ok(r) => r,
        Err(e) => {
            if let Some(status) = e.into_status() {
                responder.finish(Err(status));
            }
            return;
        }
    };
    match f(request, caller).await {
        Ok(response) => {
            if responder.send_message(&response).await.is_ok() {
                responder.finish(Ok(()));
            }
        }
        Err(e) => responder.finish(Err(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_windows_fit_their_memory() {
        assert_eq!(ZstdSettings::decoder_slots(23).max(), 128);
        assert_eq!(ZstdSettings::decoder_slots(29).max(), 2);
        assert_eq!(ZstdSettings::decoder_slots(30).max(), 1);
        assert_eq!(ZstdSettings::decoder_slots(10).max(), 1 << 20);
    }
}
