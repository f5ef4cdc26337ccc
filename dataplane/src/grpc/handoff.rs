//! Calls the data plane does not serve itself go to the control plane in-process: the h2
//! request and response handles cross to the control plane's tokio runtime through a bounded
//! channel, and the control plane answers on them directly. Both handles are `Send`, and h2
//! wakes whichever executor polls them, so the bytes never pass through the data plane twice.

use bytes::Bytes;

/// A call handed to the control plane.
pub struct ForwardedCall {
    /// The HTTP/2 request with its streaming body.
    pub request: http::Request<h2::RecvStream>,
    /// Body bytes the data plane already read (a unary request it looked at before handing
    /// it over), to be read before the rest of the body; usually none.
    pub read: Vec<Bytes>,
    /// Where the control plane writes the response.
    pub respond: h2::server::SendResponse<Bytes>,
    /// Counts the call (status, bytes, latency) when dropped.
    pub recorder: Option<crate::metrics::CallRecorder>,
}

/// The data plane's end of the hand-over channel (bounded by `control_plane.handoff_queue_depth`).
pub type HandoffSender = async_channel::Sender<ForwardedCall>;
