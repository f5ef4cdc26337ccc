//! Other workers as a source of inputs. With an action the scheduler sends hints: which peer
//! holds which of its input files. A blob the worker lacks is asked of that peer first and of
//! the server only after a delay that grows with the blob's size ([`race`]), or at once when
//! the peer fails or lacks it. Every byte from a peer is checked against its digest before
//! it is stored, exactly like a byte from the server ([`crate::remote::RemoteCas`]).
//!
//! [`TransferStats`] counts the bytes each source sent, for the worker's reports and metrics.

pub mod race;

use crate::link::Link;
use crate::quic::connect::{QuicConnector, QuicPeer};
use crate::remote::{CasLinks, RemoteCas};
use kiln_proto::worker::{PeerHint, TransferReport};
use kiln_reapi::digest::Digest;
use race::Winner;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Races a peer may lose in a row before it is set aside for the cooldown.
const SLOW_STRIKES: u32 = 3;

/// Peers the worker keeps links to at once.
const MAX_LINKS: usize = 1024;
/// Longest peer endpoint accepted in a hint.
const MAX_ENDPOINT: usize = 256;

/// Bytes fetched by source and served, since the worker started.
#[derive(Debug)]
pub struct TransferStats {
    peer_bytes: AtomicU64,
    /// Of `peer_bytes`, those that came over QUIC.
    quic_bytes: AtomicU64,
    server_bytes: AtomicU64,
    peer_failures: AtomicU64,
    /// Random per process: the server's counters start over when it changes.
    run: u64,
}

impl Default for TransferStats {
    fn default() -> Self {
        TransferStats {
            peer_bytes: AtomicU64::new(0),
            quic_bytes: AtomicU64::new(0),
            server_bytes: AtomicU64::new(0),
            peer_failures: AtomicU64::new(0),
            run: u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .unwrap_or([1; 8]),
            ),
        }
    }
}

impl TransferStats {
    /// Counts `bytes` of inputs fetched from `source`.
    pub fn fetched(&self, source: Winner, bytes: u64) {
        let counter = match source {
            Winner::Peer => &self.peer_bytes,
            Winner::Server => &self.server_bytes,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `bytes` fetched from peers (with [`TransferStats::fetched`]) as having come over
    /// QUIC.
    pub fn over_quic(&self, bytes: u64) {
        self.quic_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes fetched from peers over QUIC.
    pub fn quic_bytes(&self) -> u64 {
        self.quic_bytes.load(Ordering::Relaxed)
    }

    /// Counts a peer set aside (it failed, or was too slow too often).
    pub fn peer_failed(&self) {
        self.peer_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes fetched from peers and from the server.
    pub fn fetched_bytes(&self) -> (u64, u64) {
        (
            self.peer_bytes.load(Ordering::Relaxed),
            self.server_bytes.load(Ordering::Relaxed),
        )
    }

    /// Failed peer fetches.
    pub fn peer_failures(&self) -> u64 {
        self.peer_failures.load(Ordering::Relaxed)
    }

    /// The counts as reported to the scheduler, with `served` bytes sent to peers.
    pub fn report(&self, served: u64) -> TransferReport {
        let (peer_bytes, server_bytes) = self.fetched_bytes();
        TransferReport {
            peer_bytes,
            server_bytes,
            served_bytes: served,
            peer_failures: self.peer_failures(),
            peer_quic_bytes: self.quic_bytes(),
            run: self.run,
        }
    }
}

/// How the worker uses its peers (`worker.peer_*`).
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    /// How long a peer has before the server is asked too, for a blob of no size.
    pub race_delay: Duration,
    /// The peer's time grows by the bytes asked of it at this rate (bytes per second): this
    /// request's and those still in flight to it, which share its link. So a healthy peer
    /// streaming a large blob, or many at once, is not doubled by the server.
    pub min_rate: u64,
    /// A peer that failed is not asked again for this long.
    pub cooldown: Duration,
}

impl PeerSettings {
    /// How long to wait for a peer with `bytes` to send (this request's and those in flight
    /// to it) before asking the server too.
    pub fn delay(&self, bytes: u64) -> Duration {
        let transfer = Duration::try_from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64)
            .unwrap_or(Duration::MAX);
        self.race_delay.saturating_add(transfer)
    }
}

/// Links to peers, made on first use.
pub struct Peers {
    settings: PeerSettings,
    links: Mutex<HashMap<PeerAddr, PeerLink>>,
    stats: Arc<TransferStats>,
    /// The worker's TLS (the farm CA and its own certificate), for `grpcs://` peers.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// How to reach `grpcs://` peers over QUIC, when the worker does.
    quic: Option<QuicDialling>,
}

/// Reaching peers over QUIC (`worker.peer_transport` `quic` or `both`).
#[derive(Clone)]
pub struct QuicDialling {
    /// The endpoint dialling out (the worker's TLS client config).
    pub endpoint: quinn::Endpoint,
    /// A handshake not done within this marks the peer unreachable over UDP.
    pub timeout: Duration,
    /// QUIC only (`quic`): a peer unreachable over UDP is not asked at all.
    pub only: bool,
}

/// Where a peer serves its CAS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// `grpc://HOST:PORT` or `grpcs://HOST:PORT`.
    pub endpoint: Arc<str>,
    /// With `grpcs://`: the name its certificate must carry.
    pub tls_name: Option<Arc<str>>,
}

struct PeerLink {
    cas: RemoteCas,
    /// The same peer over QUIC, when dialled that way.
    quic: Option<(Arc<QuicPeer>, RemoteCas)>,
    /// Failed recently: not asked until then.
    avoid_until: Option<Instant>,
    /// Races it lost in a row (the server's copy came first).
    slow: u32,
    /// What is asked of it.
    load: Arc<Load>,
}

/// The bytes asked of one peer: in flight now, and in all.
#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicU64,
    asked: AtomicU64,
}

/// A request to a peer: its link, and its bytes counted in flight until this is dropped.
pub struct PeerRequest {
    /// The peer's CAS.
    pub cas: RemoteCas,
    /// Over QUIC: the peer's QUIC link.
    pub quic: Option<Arc<QuicPeer>>,
    /// Over QUIC, and its connection was up when this was asked.
    quic_was_up: bool,
    settings: PeerSettings,
    load: Arc<Load>,
    bytes: u64,
    /// Bytes in flight to the peer when this was asked (this request's included).
    queued: u64,
    /// The peer's asked total then (this request's included).
    asked: u64,
}

impl PeerRequest {
    /// How long the peer has before the server is asked too: the race delay plus the time
    /// at the minimum rate for what shares the peer's link with this request — what was in
    /// flight when it was asked, and what has been asked of the peer since and is still in
    /// flight (the peer serves its requests side by side, so those asked later slow this one
    /// down too; those already answered no longer excuse it, so a request stuck while the
    /// peer keeps answering others still runs out of time).
    pub fn delay(&self) -> Duration {
        let since = self
            .load
            .asked
            .load(Ordering::Relaxed)
            .saturating_sub(self.asked)
            .min(
                self.load
                    .in_flight
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.bytes),
            );
        self.settings.delay(self.queued.saturating_add(since))
    }
}

impl Drop for PeerRequest {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Peers {
    /// No links yet; `tls` (the worker's own client config) for peers served over TLS.
    pub fn new(
        settings: PeerSettings,
        stats: Arc<TransferStats>,
        tls: Option<Arc<rustls::ClientConfig>>,
        quic: Option<QuicDialling>,
    ) -> Peers {
        Peers {
            settings,
            links: Mutex::new(HashMap::new()),
            stats,
            tls,
            quic,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerAddr, PeerLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request for `bytes` to the peer serving at `endpoint`, unless it failed within the
    /// cooldown or its address cannot be used. Must be called inside the tokio runtime (the
    /// link connects lazily).
    pub fn ask(&self, peer: &PeerAddr, bytes: u64) -> Option<PeerRequest> {
        let (cas, load, quic) = self.link(peer)?;
        let queued = load.in_flight.fetch_add(bytes, Ordering::Relaxed);
        let asked = load.asked.fetch_add(bytes, Ordering::Relaxed);
        let quic_was_up = quic.as_ref().is_some_and(|q| q.is_up());
        Some(PeerRequest {
            cas,
            quic,
            quic_was_up,
            settings: self.settings,
            load,
            bytes,
            queued: queued.saturating_add(bytes),
            asked: asked.saturating_add(bytes),
        })
    }

    /// The link to `peer` to use now: over QUIC when it is up (or, QUIC only, reachable),
    /// else over TCP (unless QUIC only).
    fn link(&self, peer: &PeerAddr) -> Option<(RemoteCas, Arc<Load>, Option<Arc<QuicPeer>>)> {
        let only_quic = self.quic.as_ref().is_some_and(|q| q.only);
        let mut links = self.lock();
        if !links.contains_key(peer) {
            let link = self.new_link(peer)?;
            if links.len() >= MAX_LINKS {
                links.clear();
            }
            links.insert(peer.clone(), link);
        }
        let link = links.get_mut(peer)?;
        match link.avoid_until {
            Some(until) if Instant::now() < until => return None,
            Some(_) => link.avoid_until = None,
            None => {}
        }
        // QUIC only: over QUIC unless found unreachable. Both: over QUIC once it is up, over
        // TCP while it is dialled (in the background) or unreachable.
        let over_quic = match &link.quic {
            Some((q, _)) if only_quic => q.reachable(),
            Some((q, _)) => q.up_or_dial(),
            None => false,
        };
        match &link.quic {
            Some((q, cas)) if over_quic => Some((cas.clone(), link.load.clone(), Some(q.clone()))),
            _ if only_quic => None,
            _ => Some((link.cas.clone(), link.load.clone(), None)),
        }
    }

    /// A new link to `peer` (TCP, and QUIC when the worker dials peers that way and the
    /// peer is a `grpcs://IP:PORT` one), or `None` if its address cannot be used.
    fn new_link(&self, peer: &PeerAddr) -> Option<PeerLink> {
        let endpoint = &peer.endpoint;
        // Over TLS with the worker's own certificate, checking the peer's for its name.
        let link = match (endpoint.starts_with("grpcs://"), &self.tls, &peer.tls_name) {
            (false, _, _) => Link::new(endpoint, None),
            (true, Some(tls), Some(name)) => {
                Link::new(endpoint, Some(tls.clone())).and_then(|l| l.with_server_name(name))
            }
            (true, _, _) => return None,
        };
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(peer = %endpoint, error = %e, "unusable peer address in a hint");
                return None;
            }
        };
        let quic = match (&self.quic, &peer.tls_name) {
            (Some(dialling), Some(name)) => endpoint
                .strip_prefix("grpcs://")
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .map(|addr| {
                    let q = QuicPeer::new(
                        dialling.endpoint.clone(),
                        addr,
                        name,
                        dialling.timeout,
                        self.settings.cooldown,
                    );
                    let cas = RemoteCas::new(CasLinks::single(
                        link.connect_lazy_via(QuicConnector(q.clone())),
                    ));
                    (q, cas)
                }),
            _ => None,
        };
        Some(PeerLink {
            cas: RemoteCas::new(CasLinks::single(link.connect_lazy())),
            quic,
            avoid_until: None,
            slow: 0,
            load: Arc::new(Load::default()),
        })
    }

    /// How a request to the peer at `endpoint` went. A failure is counted and the peer is
    /// not asked again for the cooldown; so is a peer that lost [`SLOW_STRIKES`] races in a
    /// row (slow: each hinted blob would wait the race delay for it); a win clears that.
    pub fn outcome(
        &self,
        peer: &PeerAddr,
        request: &PeerRequest,
        raced: &race::Raced<impl Sized, impl Sized>,
    ) {
        // A request over QUIC while the connection was not up — still being dialled (the
        // server's copy may win meanwhile), or found unreachable over UDP — says nothing of
        // the peer: the next one goes over QUIC once up, or over TCP.
        let quic_down = request
            .quic
            .as_ref()
            .is_some_and(|q| !request.quic_was_up || !q.is_up());
        if raced.winner != Winner::Peer && quic_down {
            return;
        }
        let failed = raced.peer_failed;
        let endpoint = &peer.endpoint;
        let mut links = self.lock();
        let Some(link) = links.get_mut(peer) else {
            return;
        };
        if raced.winner == Winner::Peer {
            link.slow = 0;
            return;
        }
        if raced.peer_slow {
            link.slow += 1;
        }
        if failed || link.slow >= SLOW_STRIKES {
            link.slow = 0;
            link.avoid_until = Some(Instant::now() + self.settings.cooldown);
            self.stats.peer_failed();
            tracing::debug!(peer = %endpoint, failed, "peer set aside for the cooldown");
        }
    }
}

/// This worker's CAS as served to its peers.
#[derive(Clone)]
pub struct Serving {
    /// Where peers reach it (`grpc://HOST:PORT`, or `grpcs://` over mutual TLS), told to the
    /// scheduler in Hello.
    pub endpoint: String,
    /// With TLS: the name its certificate carries.
    pub tls_name: Option<String>,
    /// What it holds, for the scheduler.
    pub holdings: Arc<crate::holdings::Holdings>,
    /// Bytes its data plane has sent to peers so far.
    pub served: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Refuses, from now on, callers of the worker's CAS presenting certificates with these
/// fingerprints (revoked workers, as the scheduler tells them), besides those refused before.
pub type Refuse = Arc<dyn Fn(&[String]) + Send + Sync>;

/// One action's hints: which peer holds each input file.
#[derive(Debug, Default)]
pub struct Hints(HashMap<Digest, Arc<PeerAddr>>);

impl Hints {
    /// The hints of a StartExecute, for digests of `function` (`own`: this worker's own
    /// endpoint, never its own peer). Malformed digests and endpoints (anything but
    /// `grpc://`, or `grpcs://` with a name) are skipped: a hint is advice, and a wrong one
    /// costs one failed request.
    pub fn from_proto(hints: &[PeerHint], function: i32, own: Option<&str>) -> Hints {
        let mut map = HashMap::new();
        for hint in hints {
            let secure = hint.endpoint.starts_with("grpcs://");
            let usable = hint.endpoint.len() <= MAX_ENDPOINT
                && (hint.endpoint.starts_with("grpc://") || (secure && !hint.tls_name.is_empty()))
                && own != Some(hint.endpoint.as_str());
            if !usable {
                continue;
            }
            let endpoint = Arc::new(PeerAddr {
                endpoint: Arc::from(hint.endpoint.as_str()),
                tls_name: secure.then(|| Arc::from(hint.tls_name.as_str())),
            });
            for d in &hint.digests {
                if let Ok(d) = Digest::from_proto(d, function) {
                    map.insert(d, endpoint.clone());
                }
            }
        }
        Hints(map)
    }

    /// The peer hinted to hold `digest`.
    pub fn peer(&self, digest: &Digest) -> Option<&Arc<PeerAddr>> {
        self.0.get(digest)
    }

    /// Every digest hinted.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.0.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    #[test]
    fn hints_skip_bad_endpoints_bad_digests_and_the_worker_itself() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let e = Digest::of(DigestFunction::Sha256, b"y");
        let bad_digest = kiln_proto::reapi::Digest {
            hash: "zz".into(),
            size_bytes: 1,
        };
        let f = Digest::of(DigestFunction::Sha256, b"z");
        let hint =
            |endpoint: &str, tls_name: &str, digests: Vec<kiln_proto::reapi::Digest>| PeerHint {
                endpoint: endpoint.into(),
                digests,
                tls_name: tls_name.into(),
            };
        let function = DigestFunction::Sha256.proto() as i32;
        let hints = Hints::from_proto(
            &[
                hint("grpc://10.0.0.2:1", "", vec![d.to_proto(), bad_digest]),
                hint("http://10.0.0.3:1", "", vec![e.to_proto()]),
                hint("grpc://me:1", "", vec![e.to_proto()]),
                hint(
                    &format!("grpc://{}", "a".repeat(300)),
                    "",
                    vec![e.to_proto()],
                ),
                hint("grpcs://10.0.0.4:1", "", vec![e.to_proto()]),
                hint("grpcs://10.0.0.5:1", "mac-5", vec![f.to_proto()]),
            ],
            function,
            Some("grpc://me:1"),
        );
        assert_eq!(
            hints.peer(&d).map(|p| &*p.endpoint),
            Some("grpc://10.0.0.2:1")
        );
        assert_eq!(hints.peer(&e), None, "a TLS peer needs a name");
        let tls = hints.peer(&f).unwrap();
        assert_eq!(tls.tls_name.as_deref(), Some("mac-5"));
        assert_eq!(hints.0.len(), 2);
    }

    fn raced(winner: Winner, failed: bool, slow: bool) -> race::Raced<(), ()> {
        race::Raced {
            result: Ok(()),
            winner,
            peer_failed: failed,
            peer_slow: slow,
        }
    }

    // With QUIC and TCP, a peer whose QUIC connection is not up (being dialled: here it never
    // answers) is asked over TCP meanwhile; with QUIC only, over QUIC, and races lost while
    // the connection is not up say nothing of the peer: it is not set aside, and not counted
    // as failed.
    #[tokio::test]
    async fn a_peer_is_asked_over_tcp_until_its_quic_connection_is_up() {
        kiln_tls::install_provider();
        let dir = tempfile::tempdir().unwrap();
        let farm = kiln_tls::farm::Farm::at(dir.path());
        farm.ensure(&["localhost".into()]).unwrap();
        let trust = kiln_tls::client::Trust::ca_file(&farm.ca_cert()).unwrap();
        let tls = kiln_tls::client::config(trust, None).unwrap();
        // A UDP port that takes packets and never answers.
        let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dialling = |only| QuicDialling {
            endpoint: crate::quic::client_endpoint(&tls).unwrap(),
            timeout: Duration::from_secs(3600),
            only,
        };
        let settings = PeerSettings {
            race_delay: Duration::from_millis(20),
            min_rate: 1 << 20,
            cooldown: Duration::from_secs(3600),
        };
        let peer = PeerAddr {
            endpoint: format!("grpcs://{}", hole.local_addr().unwrap()).into(),
            tls_name: Some("w.peer.kiln.invalid".into()),
        };
        let stats = Arc::new(TransferStats::default());
        let both = Peers::new(
            settings,
            stats.clone(),
            Some(tls.clone()),
            Some(dialling(false)),
        );
        for _ in 0..3 {
            let request = both.ask(&peer, 1).expect("usable");
            assert!(request.quic.is_none(), "over TCP while QUIC is dialled");
        }
        let only = Peers::new(
            settings,
            stats.clone(),
            Some(tls.clone()),
            Some(dialling(true)),
        );
        for _ in 0..5 {
            let request = only.ask(&peer, 1).expect("still usable");
            assert!(request.quic.is_some(), "asked over QUIC");
            only.outcome(&peer, &request, &raced(Winner::Server, false, true));
        }
        assert_eq!(stats.peer_failures(), 0);
    }

    #[tokio::test]
    async fn a_peer_that_fails_or_is_slow_three_times_running_is_set_aside() {
        let settings = PeerSettings {
            race_delay: Duration::from_millis(20),
            min_rate: 1 << 20,
            cooldown: Duration::from_secs(3600),
        };
        let stats = Arc::new(TransferStats::default());
        let peers = Peers::new(settings, stats.clone(), None, None);
        // How a request to a usable peer went.
        let told = |peer: &PeerAddr, raced: race::Raced<(), ()>| {
            let request = peers.ask(peer, 0).expect("a usable peer");
            peers.outcome(peer, &request, &raced);
        };
        let addr = |endpoint: &str| PeerAddr {
            endpoint: endpoint.into(),
            tls_name: None,
        };
        let (a, b) = (addr("grpc://127.0.0.1:1"), addr("grpc://127.0.0.1:2"));
        // Bytes in flight to a peer lengthen the delay of requests asked after them until
        // they end; bytes asked later lengthen it too (they share the link).
        let first = peers.ask(&a, 1 << 20).expect("a usable peer");
        assert_eq!(first.delay(), Duration::from_millis(1020));
        let second = peers.ask(&a, 1 << 20).unwrap();
        assert_eq!(second.delay(), Duration::from_millis(2020));
        assert_eq!(first.delay(), Duration::from_millis(2020));
        // Once the later request is answered it no longer lengthens the first's delay.
        drop(second);
        assert_eq!(first.delay(), Duration::from_millis(1020));
        drop(first);
        assert_eq!(peers.ask(&a, 0).unwrap().delay(), Duration::from_millis(20));
        // Two slow races, a win, then three slow ones: set aside after the third.
        for outcome in [
            (Winner::Server, false, true),
            (Winner::Server, false, true),
            (Winner::Peer, false, false),
            (Winner::Server, false, true),
            (Winner::Server, false, true),
        ] {
            told(&a, raced(outcome.0, outcome.1, outcome.2));
            assert!(peers.ask(&a, 1).is_some());
        }
        told(&a, raced(Winner::Server, false, true));
        assert!(peers.ask(&a, 1).is_none(), "three slow races in a row");
        // A failure sets a peer aside at once; a stale hint (the peer lacked the blob) does not.
        peers.ask(&b, 1).unwrap();
        told(&b, raced(Winner::Server, false, false));
        assert!(peers.ask(&b, 1).is_some());
        told(&b, raced(Winner::Server, true, false));
        assert!(peers.ask(&b, 1).is_none());
        assert_eq!(stats.peer_failures(), 2);
        assert!(
            peers.ask(&addr("http://x:1"), 1).is_none(),
            "not a gRPC address"
        );
        assert!(
            peers.ask(&addr("grpcs://127.0.0.1:3"), 1).is_none(),
            "TLS, and this worker has none"
        );
    }

    #[test]
    fn a_larger_blob_gives_the_peer_longer() {
        let s = PeerSettings {
            race_delay: Duration::from_millis(20),
            min_rate: 100 << 20,
            cooldown: Duration::from_secs(30),
        };
        assert_eq!(s.delay(0), Duration::from_millis(20));
        assert_eq!(s.delay(100 << 20), Duration::from_millis(1020));
        let slowest = PeerSettings { min_rate: 0, ..s };
        assert_eq!(slowest.delay(u64::MAX), Duration::MAX, "no overflow");
    }
}
