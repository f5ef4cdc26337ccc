//! A glommio TCP stream exposed through tokio's I/O traits, with real vectored writes and
//! reads into buffers that need not be zeroed first.
//! glommio's own stream writes one buffer per call; h2 hands over a frame header and its
//! payload as separate buffers, so here they go out together in one `sendmsg`.

use crate::runtime::sys::{recv_uninit, send_vectored};
use futures_lite::{AsyncRead as _, AsyncWrite as _};
use glommio::net::TcpStream;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An accepted or connected socket on this core.
pub(super) struct Conn(pub(super) TcpStream);

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: `recv_uninit` only writes into the unfilled part, and reports how much.
        match recv_uninit(self.0.as_raw_fd(), unsafe { buf.unfilled_mut() }) {
            Ok(n) => {
                // SAFETY: the kernel wrote these `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
            Err(_) => {}
        }
        // Nothing waiting: glommio registers for readiness (and reads what arrived meanwhile
        // into a small initialized part, rather than zeroing the whole buffer).
        let room = buf.remaining().min(4096);
        let unfilled = buf.initialize_unfilled_to(room);
        let n = ready!(Pin::new(&mut self.0).poll_read(cx, unfilled))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match send_vectored(self.0.as_raw_fd(), bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Full socket buffer: glommio waits for it to drain (and may send the first
                // buffer itself when it already has).
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &**b);
                Pin::new(&mut self.0).poll_write(cx, first)
            }
            other => Poll::Ready(other),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}
