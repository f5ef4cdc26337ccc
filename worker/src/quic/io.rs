//! One QUIC bidirectional stream as a byte stream for HTTP/2 (both ends).

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A QUIC stream's two halves as one duplex byte stream.
pub struct QuicIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: Option<PeerIdentity>,
}

/// Who is at the other end of an accepted stream: its client certificate's common name and
/// SHA-256 fingerprint (each call over the stream is checked against the policy with it).
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The certificate's common name.
    pub name: String,
    /// Its fingerprint.
    pub fingerprint: String,
}

impl QuicIo {
    /// The stream made of `send` and `recv`; `peer` on the accepting side.
    pub fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: Option<PeerIdentity>,
    ) -> QuicIo {
        QuicIo { send, recv, peer }
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl tonic::transport::server::Connected for QuicIo {
    type ConnectInfo = Option<PeerIdentity>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}
