//! A connection's writes gathered into one send per round of the task that drives it.
//!
//! It sits between h2 and the connection below it (TLS, or the socket): h2 → gather → TLS →
//! socket. Its flush is deferred, so it must only be written to from futures run under
//! [`Flusher::flushing`] (a TLS handshake over it would wait for its own flush forever).
//!
//! h2 writes each DATA frame larger than 256 bytes in a write call of its own and flushes after
//! each one; clients allow 16 KiB frames, so a 64 KiB read cost five `sendmsg` calls, each a
//! trip through the TCP stack. Here a flush is deferred: writes are copied into one buffer (up
//! to [`LIMIT`], past which it is sent at once), and the buffer goes out when the future that
//! drives the connection has been polled ([`Flushing`]), so everything h2 wrote in one poll
//! leaves in one send. Only a write that is itself at least [`LIMIT`] bytes, arriving with
//! nothing gathered, goes straight through uncopied.

use super::BoxConnection;
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before they are sent without waiting for the end of the round.
pub const LIMIT: usize = 128 << 10;
/// Buffers kept for reuse per thread: a connection holds one only while it has bytes to send
/// (thousands may be open and idle), and one taken from here has grown already.
const POOLED: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer, from this thread's pool if it has one.
fn take_buffer() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Gives an emptied buffer back to this thread's pool.
fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > LIMIT {
        return;
    }
    buf.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED {
            p.push(buf);
        }
    });
}

struct Gathered {
    io: BoxConnection,
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
    /// A send that failed: reported to every later write and flush.
    failed: Option<(io::ErrorKind, String)>,
    /// A write was turned away (the buffer was full and the socket would not take it): once
    /// the driver's drain empties the buffer, the writer's task must run again, since the
    /// socket may become writable within that same poll and then wake no one.
    refused: bool,
}

impl Gathered {
    /// The error of an earlier failed send, again.
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        while self.sent < self.buf.len() {
            let sent = match ready!(self.io.as_mut().poll_write(cx, &self.buf[self.sent..])) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                other => other,
            };
            match sent {
                Ok(n) => self.sent += n,
                Err(e) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Poll::Ready(Err(e));
                }
            }
        }
        self.sent = 0;
        give_back(std::mem::take(&mut self.buf));
        Poll::Ready(Ok(()))
    }

    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if !self.buf.is_empty()
            && self.buf.len() + total > LIMIT
            && self.poll_drain(cx)?.is_pending()
        {
            self.refused = true;
            return Poll::Pending;
        }
        if self.buf.is_empty() && total >= LIMIT {
            return self.io.as_mut().poll_write_vectored(cx, bufs);
        }
        if self.buf.capacity() == 0 && total > 0 {
            self.buf = take_buffer();
        }
        let mut taken = 0;
        for b in bufs {
            let take = (LIMIT - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..take]);
            taken += take;
            if take < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }
}

/// Wraps `io`: the connection to hand to h2 (or TLS), and the [`Flusher`] its driver uses.
pub fn gather(io: BoxConnection) -> (BoxConnection, Flusher) {
    let shared = Rc::new(RefCell::new(Gathered {
        io,
        buf: Vec::new(),
        sent: 0,
        failed: None,
        refused: false,
    }));
    (Box::pin(GatheredIo(shared.clone())), Flusher(shared))
}

/// The connection's side: reads pass through, writes are gathered, a flush is deferred.
struct GatheredIo(Rc<RefCell<Gathered>>);

impl AsyncRead for GatheredIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.borrow_mut().io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for GatheredIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().poll_gather(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Deferred: the driver's [`Flushing`] sends what was gathered once its poll is over.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.borrow().check())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut g = self.0.borrow_mut();
        if g.poll_drain(cx)?.is_pending() {
            // As for a write turned away: the driver's drain may empty the buffer first.
            g.refused = true;
            return Poll::Pending;
        }
        g.io.as_mut().poll_shutdown(cx)
    }
}

/// The driver's side: sends what the connection gathered.
pub struct Flusher(Rc<RefCell<Gathered>>);

impl Flusher {
    /// Sends what is gathered (pending while the socket is full). A writer turned away
    /// since the last drain is woken once the buffer is empty: the socket's readiness, which
    /// it waited for, may have come and gone within this poll.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut g = self.0.borrow_mut();
        let drained = ready!(g.poll_drain(cx));
        // Sent or failed: either way the writer must run again (to write on, or to see the
        // error).
        if std::mem::take(&mut g.refused) {
            cx.waker().wake_by_ref();
        }
        drained?;
        g.io.as_mut().poll_flush(cx)
    }

    /// Sends what is gathered, waiting for room in the socket.
    pub async fn drain(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// `future`, with what it wrote sent after each of its polls.
    pub fn flushing<F: Future + Unpin>(&self, future: F) -> Flushing<'_, F> {
        Flushing {
            future,
            flusher: self,
        }
    }
}

/// A future driving the connection, whose writes are sent after each of its polls. A send
/// that fails is reported to the connection's next write or flush.
pub struct Flushing<'a, F> {
    future: F,
    flusher: &'a Flusher,
}

impl<F: Future + Unpin> Future for Flushing<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = Pin::new(&mut self.future).poll(cx);
        // Pending: the socket's readiness wakes this task to send the rest. An error is kept
        // for the connection's next write.
        let _ = self.flusher.poll_drain(cx);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A socket that records each send and takes at most `room` bytes per call (none: every
    /// send fails); with `refuse_once`, its first send is refused as a full socket's is (and
    /// its readiness then dropped, as glommio's is when a later send succeeds).
    struct Recorder {
        sends: Arc<Mutex<Vec<usize>>>,
        room: Option<usize>,
        refuse_once: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if std::mem::take(&mut self.refuse_once) {
                return Poll::Pending;
            }
            let Some(room) = self.room else {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            };
            let n = buf.len().min(room);
            self.sends.lock().unwrap().push(n);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Counts its wakes.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A writer turned away by a full buffer is woken once the driver's drain has emptied
    /// it, even though the socket that refused it then wakes no one: without that it slept,
    /// with its frames unsent, until the client's next packet (a 30 s stall on glommio).
    #[test]
    fn a_writer_turned_away_is_woken_when_the_drain_empties_the_buffer() {
        use tokio::io::AsyncWriteExt;
        let sends = Arc::new(Mutex::new(Vec::new()));
        let (mut io, flusher) = gather(Box::pin(Recorder {
            sends: sends.clone(),
            room: Some(usize::MAX),
            refuse_once: true,
        }));
        let sent = || sends.lock().unwrap().iter().sum::<usize>();
        let wakes = Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let writer = Box::pin(async move {
            io.write_all(&vec![1u8; LIMIT - 10]).await.unwrap();
            io.write_all(&[2u8; 100]).await.unwrap();
        });
        let mut round = flusher.flushing(writer);
        // The second write finds the buffer full and the socket refusing: the writer waits.
        assert!(Pin::new(&mut round).poll(&mut cx).is_pending());
        // The drain after it sent the buffer, so the writer must be run again.
        assert_eq!(sent(), LIMIT - 10);
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(Pin::new(&mut round).poll(&mut cx).is_ready());
        assert_eq!(sent(), LIMIT + 90);
        assert_eq!(
            wakes.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "woken once"
        );

        // A drain that fails after turning a writer away wakes it too, to see the error.
        let (mut io, flusher) = gather(Box::pin(Recorder {
            sends: Arc::new(Mutex::new(Vec::new())),
            room: None,
            refuse_once: true,
        }));
        let writer = Box::pin(async move {
            let _ = io.write_all(&vec![1u8; LIMIT - 10]).await;
            io.write_all(&[2u8; 100]).await
        });
        let mut round = flusher.flushing(writer);
        assert!(Pin::new(&mut round).poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        match Pin::new(&mut round).poll(&mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("the writer sees the failed send: {other:?}"),
        }
    }

    /// A send that failed at the end of a round is the error of the connection's next write
    /// and flush, not lost.
    #[test]
    fn a_failed_send_is_reported_to_the_next_write() {
        futures::executor::block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut io, flusher, _) = gathered(None);
            flusher
                .flushing(Box::pin(async {
                    io.write_all(b"frame").await.unwrap();
                    io.flush().await.unwrap();
                }))
                .await;
            let e = io.write_all(b"next").await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
            assert_eq!(
                io.flush().await.unwrap_err().kind(),
                io::ErrorKind::ConnectionReset
            );
        });
    }

    fn gathered(room: Option<usize>) -> (BoxConnection, Flusher, Arc<Mutex<Vec<usize>>>) {
        let sends = Arc::new(Mutex::new(Vec::new()));
        let (io, flusher) = gather(Box::pin(Recorder {
            sends: sends.clone(),
            room,
            refuse_once: false,
        }));
        (io, flusher, sends)
    }

    /// Frames written and "flushed" one at a time, as h2 does, leave in one send when the
    /// driver's poll ends; a round past the limit is sent as it fills; a large write with
    /// nothing gathered goes straight through; a socket taking less than asked gets the rest.
    #[test]
    fn a_round_of_writes_is_one_send() {
        futures::executor::block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut io, flusher, sends) = gathered(Some(usize::MAX));
            flusher
                .flushing(Box::pin(async {
                    for _ in 0..4 {
                        let header = [0u8; 9];
                        let payload = vec![1u8; 16 << 10];
                        let bufs = [IoSlice::new(&header), IoSlice::new(&payload)];
                        let n = io.write_vectored(&bufs).await.unwrap();
                        assert_eq!(n, 9 + (16 << 10));
                        io.flush().await.unwrap();
                    }
                    assert!(sends.lock().unwrap().is_empty(), "nothing sent mid-round");
                }))
                .await;
            assert_eq!(*sends.lock().unwrap(), vec![4 * (9 + (16 << 10))]);

            sends.lock().unwrap().clear();
            flusher
                .flushing(Box::pin(async {
                    io.write_all(&vec![2u8; LIMIT - 10]).await.unwrap();
                    io.write_all(&[3u8; 100]).await.unwrap();
                }))
                .await;
            assert_eq!(
                *sends.lock().unwrap(),
                vec![LIMIT - 10, 100],
                "full: sent early"
            );

            sends.lock().unwrap().clear();
            io.write_all(&vec![4u8; LIMIT]).await.unwrap();
            assert_eq!(
                *sends.lock().unwrap(),
                vec![LIMIT],
                "large: straight through"
            );

            let (mut io, flusher, sends) = gathered(Some(1000));
            io.write_all(&[5u8; 2500]).await.unwrap();
            flusher.drain().await.unwrap();
            assert_eq!(*sends.lock().unwrap(), vec![1000, 1000, 500]);
        });
    }
}
