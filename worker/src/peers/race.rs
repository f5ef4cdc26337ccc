//! A peer raced against the server for the same blobs: the peer is asked first; the server
//! only if the peer has not answered within a delay, or at once when the peer fails or lacks
//! them. The first complete copy wins and the other request is dropped (cancelled). Each
//! side's future checks its own bytes against their digests, so whichever wins is verified.

use std::future::Future;
use std::time::Duration;

/// Where the copy that won came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The peer.
    Peer,
    /// The server.
    Server,
}

/// How a race ended.
#[derive(Debug)]
pub struct Raced<T, E> {
    /// The winning copy, or the server's error when neither had one.
    pub result: Result<T, E>,
    /// Who sent it (the server when neither did).
    pub winner: Winner,
    /// The peer failed (an error, or no answer within the delay after the server failed;
    /// not merely lacking the blobs): the caller may avoid it for a while.
    pub peer_failed: bool,
    /// The peer was raced and the server's copy came first: the peer is slow.
    pub peer_slow: bool,
}

/// Runs `peer`; starts `server()` once the peer has taken `delay()` (read again when it runs
/// out: it may have grown meanwhile, as more was asked of the same peer) without finishing,
/// or at once when it finished without the blobs (`Ok(None)`) or with an error. Returns the
/// first complete copy; a server error is returned only if the peer has none either (the
/// peer then gets the delay once more, not forever).
pub async fn race<T, E, P, S, F>(peer: P, delay: impl Fn() -> Duration, server: S) -> Raced<T, E>
where
    P: Future<Output = Result<Option<T>, E>>,
    S: FnOnce() -> F,
    F: Future<Output = Result<T, E>>,
{
    let from_server = |result, peer_failed| Raced {
        result,
        winner: Winner::Server,
        peer_failed,
        peer_slow: false,
    };
    let from_peer = |copy| Raced {
        result: Ok(copy),
        winner: Winner::Peer,
        peer_failed: false,
        peer_slow: false,
    };
    let mut peer = std::pin::pin!(peer);
    let start = tokio::time::Instant::now();
    // A delay too long to add (a zero rate) waits a year: for the peer, in practice.
    let deadline = || {
        let d = delay();
        start
            .checked_add(d)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 86_400))
    };
    loop {
        match tokio::time::timeout_at(deadline(), peer.as_mut()).await {
            Ok(Ok(Some(copy))) => return from_peer(copy),
            Ok(Ok(None)) => return from_server(server().await, false),
            Ok(Err(_)) => return from_server(server().await, true),
            // Out of time, unless the delay grew meanwhile.
            Err(_) if tokio::time::Instant::now() >= deadline() => break,
            Err(_) => {}
        }
    }
    // The peer is slow: the server too, and the first complete copy wins.
    let mut server = std::pin::pin!(server());
    tokio::select! {
        biased;
        answer = peer.as_mut() => match answer {
            Ok(Some(copy)) => from_peer(copy),
            Ok(None) => from_server(server.await, false),
            Err(_) => from_server(server.await, true),
        },
        answer = server.as_mut() => match answer {
            Ok(copy) => Raced { peer_slow: true, ..from_server(Ok(copy), false) },
            Err(e) => match tokio::time::timeout(delay(), peer).await {
                Ok(Ok(Some(copy))) => from_peer(copy),
                Ok(Ok(None)) => from_server(Err(e), false),
                Ok(Err(_)) | Err(_) => from_server(Err(e), true),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    type Answer = Result<Option<u32>, &'static str>;

    /// A side whose answer the test sends when it chooses, and which notes whether it was
    /// dropped before answering.
    fn side() -> (oneshot::Sender<Answer>, impl Future<Output = Answer>) {
        let (tx, rx) = oneshot::channel();
        (tx, async move { rx.await.unwrap_or(Err("dropped")) })
    }

    type ServerAnswer = Result<u32, &'static str>;
    type ServerStart = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = ServerAnswer>>>>;

    /// The server's side: started (noted in `started`) only when the race asks for it.
    fn server_side(started: Arc<AtomicBool>) -> (oneshot::Sender<ServerAnswer>, ServerStart) {
        let (tx, rx) = oneshot::channel();
        let start: ServerStart = Box::new(move || {
            started.store(true, Ordering::SeqCst);
            Box::pin(async move { rx.await.unwrap_or(Err("dropped")) })
        });
        (tx, start)
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_peer_wins_and_the_server_is_never_asked() {
        let started = Arc::new(AtomicBool::new(false));
        let (peer_tx, peer) = side();
        let (_server_tx, server) = server_side(started.clone());
        peer_tx.send(Ok(Some(7))).unwrap();
        let raced = race(peer, || Duration::from_millis(50), server).await;
        assert_eq!(raced.result, Ok(7));
        assert_eq!(raced.winner, Winner::Peer);
        assert!(!started.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_lacks_the_blob_or_fails_sends_the_caller_to_the_server_at_once() {
        for (answer, failed) in [(Ok(None), false), (Err("refused"), true)] {
            let started = Arc::new(AtomicBool::new(false));
            let (peer_tx, peer) = side();
            let (server_tx, server) = server_side(started.clone());
            peer_tx.send(answer).unwrap();
            server_tx.send(Ok(9)).unwrap();
            let before = tokio::time::Instant::now();
            let raced = race(peer, || Duration::from_secs(60), server).await;
            assert_eq!(raced.result, Ok(9));
            assert_eq!(raced.winner, Winner::Server);
            assert_eq!(raced.peer_failed, failed);
            assert_eq!(before.elapsed(), Duration::ZERO, "no wait for the delay");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_peer_is_raced_and_the_first_complete_copy_wins() {
        // The server answers first.
        let started = Arc::new(AtomicBool::new(false));
        let (_peer_tx, peer) = side();
        let (server_tx, server) = server_side(started.clone());
        server_tx.send(Ok(1)).unwrap();
        let before = tokio::time::Instant::now();
        let raced = race(peer, || Duration::from_millis(50), server).await;
        assert_eq!((raced.result, raced.winner), (Ok(1), Winner::Server));
        assert_eq!(
            before.elapsed(),
            Duration::from_millis(50),
            "server asked after the delay"
        );

        // The peer answers once the server was asked, before the server answers.
        let (peer_tx, peer) = side();
        let (asked_tx, asked) = oneshot::channel::<()>();
        let (_server_tx, server_answer) = oneshot::channel::<ServerAnswer>();
        let server = move || {
            let _ = asked_tx.send(());
            async move { server_answer.await.unwrap_or(Err("dropped")) }
        };
        let answer = tokio::spawn(async move {
            asked.await.unwrap();
            peer_tx.send(Ok(Some(2))).unwrap();
        });
        let raced = race(peer, || Duration::from_millis(50), server).await;
        answer.await.unwrap();
        assert_eq!((raced.result, raced.winner), (Ok(2), Winner::Peer));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_that_grows_while_the_peer_works_holds_the_server_back() {
        let (peer_tx, peer) = side();
        let started = Arc::new(AtomicBool::new(false));
        let (_server_tx, server) = server_side(started.clone());
        // More is asked of the peer at 30 ms: its delay grows from 50 to 150 ms.
        let grown = Arc::new(AtomicBool::new(false));
        let flag = grown.clone();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            flag.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(90)).await;
            peer_tx.send(Ok(Some(4))).unwrap();
        });
        let delay = || {
            let ms = if grown.load(Ordering::SeqCst) {
                150
            } else {
                50
            };
            Duration::from_millis(ms)
        };
        let raced = race(peer, delay, server).await;
        answer.await.unwrap();
        assert_eq!((raced.result, raced.winner), (Ok(4), Winner::Peer));
        assert!(
            !started.load(Ordering::SeqCst),
            "the server was never asked"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_failure_waits_for_the_peer_and_is_returned_only_if_it_has_nothing() {
        let (peer_tx, peer) = side();
        let (server_tx, server) = server_side(Arc::new(AtomicBool::new(false)));
        server_tx.send(Err("server down")).unwrap();
        let answer = tokio::spawn(async move {
            // Past the delay (the server fails then), within the delay more it is given.
            tokio::time::sleep(Duration::from_millis(80)).await;
            peer_tx.send(Ok(Some(3))).unwrap();
        });
        let raced = race(peer, || Duration::from_millis(50), server).await;
        answer.await.unwrap();
        assert_eq!((raced.result, raced.winner), (Ok(3), Winner::Peer));

        let (peer_tx, peer) = side();
        let (server_tx, server) = server_side(Arc::new(AtomicBool::new(false)));
        server_tx.send(Err("server down")).unwrap();
        let answer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(80)).await;
            peer_tx.send(Err("peer down")).unwrap();
        });
        let raced = race(peer, || Duration::from_millis(50), server).await;
        answer.await.unwrap();
        assert_eq!(raced.result, Err("server down"));
        assert!(raced.peer_failed);

        // A peer that never answers is given the delay once more, not forever.
        let (_peer_tx, peer) = side();
        let (server_tx, server) = server_side(Arc::new(AtomicBool::new(false)));
        server_tx.send(Err("server down")).unwrap();
        let before = tokio::time::Instant::now();
        let raced = race(peer, || Duration::from_millis(50), server).await;
        assert_eq!(raced.result, Err("server down"));
        assert!(raced.peer_failed);
        assert_eq!(before.elapsed(), Duration::from_millis(100));
    }
}
