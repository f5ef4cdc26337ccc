//! The worker API: one bidirectional stream per worker. The first message is Hello; after
//! that the worker reports progress and results and keeps the stream alive, and the scheduler
//! sends work and kills. When the stream ends (or goes silent) the worker is lost and its
//! actions are re-queued.

use super::ExecutionCore;
use kiln_proto::worker::worker_api_server::WorkerApi;
use kiln_proto::worker::{
    server_message, worker_message, KeepAlive, PeerRevocations, ServerMessage, Welcome,
    WorkerMessage,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Messages queued to one worker before it is considered stuck.
const SESSION_QUEUE: usize = 1024;

/// Longest peer endpoint accepted from a worker.
const MAX_ENDPOINT: usize = 256;

/// The name a worker's CAS certificate must carry, as its peers will check it: from the name
/// it enrolled under (`worker:NAME`, from its verified certificate), never from what it says
/// of itself — else a worker could announce another's address under its own name. With
/// authorization off (principal `anyone`) the scheduler trusts every caller anyway, and
/// takes the name the worker announces if it is an enrolled worker's kind of name. Empty:
/// none (a `grpcs://` endpoint is then not passed on).
fn peer_tls_name(principal: Option<&str>, announced: &str) -> String {
    match principal {
        Some(p) => match p.strip_prefix("worker:") {
            Some(enrolled) => kiln_tls::farm::peer_name(enrolled),
            None if p == "anyone" && announced.ends_with(kiln_tls::farm::PEER_NAME_SUFFIX) => {
                announced.to_string()
            }
            None => String::new(),
        },
        None => String::new(),
    }
}

/// A worker's announced peer endpoint, if it is one other workers can use: `grpc://HOST:PORT`,
/// or `grpcs://HOST:PORT` with the name its certificate carries (a DNS name), at most
/// [`MAX_ENDPOINT`] characters each (both are passed on to every other worker).
fn peer_endpoint(announced: &str, tls_name: &str) -> Option<super::PeerEndpoint> {
    let (rest, secure) = match announced.strip_prefix("grpcs://") {
        Some(rest) => (rest, true),
        None => (announced.strip_prefix("grpc://")?, false),
    };
    let named = !secure
        || (tls_name.len() <= MAX_ENDPOINT
            && rustls_pki_types::DnsName::try_from(tls_name.to_string()).is_ok());
    let usable = announced.len() <= MAX_ENDPOINT
        && !rest.is_empty()
        && rest.parse::<http::uri::Authority>().is_ok()
        && named;
    usable.then(|| super::PeerEndpoint {
        endpoint: announced.to_string(),
        tls_name: if secure {
            tls_name.to_string()
        } else {
            String::new()
        },
    })
}

/// The worker API service.
pub struct WorkerApiService {
    core: Arc<ExecutionCore>,
}

impl WorkerApiService {
    /// Serves worker sessions for `core`.
    pub fn new(core: Arc<ExecutionCore>) -> WorkerApiService {
        WorkerApiService { core }
    }
}

type ServerStream = Pin<Box<dyn futures::Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerApi for WorkerApiService {
    type SessionStream = ServerStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<ServerStream>, Status> {
        crate::auth::check(&request, crate::auth::paths::WORKER_SESSION, None)?;
        // Who this worker is, to end its session as soon as its token or certificate is
        // revoked (`kiln token revoke`, `kiln worker revoke`).
        let credential = request
            .extensions()
            .get::<Arc<kiln_auth::Principal>>()
            .cloned()
            .zip(
                request
                    .extensions()
                    .get::<Arc<kiln_auth::Policy>>()
                    .cloned(),
            );
        let mut incoming = request.into_inner();
        let hello = match incoming.message().await? {
            Some(WorkerMessage {
                message: Some(worker_message::Message::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a worker session must be Hello",
                ))
            }
        };
        let properties: Vec<(String, String)> = hello
            .properties
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect();
        let keepalive = keepalive_every(
            Duration::from_secs(self.core.config.keepalive_secs),
            self.core.orphan_grace(),
        );
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let welcome = ServerMessage {
            message: Some(server_message::Message::Welcome(Welcome {
                keep_alive_interval: Some(kiln_reapi::convert::proto_duration(keepalive)),
                orphan_grace: self
                    .core
                    .orphan_grace()
                    .map(kiln_reapi::convert::proto_duration),
            })),
        };
        tx.try_send(welcome)
            .map_err(|_| Status::internal("cannot queue the welcome"))?;
        let name = if hello.worker_id.is_empty() {
            "unnamed".to_string()
        } else {
            hello.worker_id.clone()
        };
        let tls_name = peer_tls_name(
            credential.as_ref().map(|(p, _)| p.name.as_str()),
            &hello.cas_tls_name,
        );
        let endpoint = peer_endpoint(&hello.cas_endpoint, &tls_name);
        if endpoint.is_none() && !hello.cas_endpoint.is_empty() {
            tracing::warn!(worker = %name, endpoint = %hello.cas_endpoint, tls_name = %hello.cas_tls_name, "ignoring a peer endpoint that is not grpc://HOST:PORT or grpcs://HOST:PORT with a certificate name");
        }
        // Claims that an operation still runs there are believed of the worker it was sent
        // to: known by its credential when it presented one (a name in Hello is its word).
        let claimant = match &credential {
            Some((principal, policy)) if policy.enabled() => principal.name.clone(),
            _ => hello.worker_id.clone(),
        };
        let joining = super::worker_events::Joining {
            name,
            claimant,
            properties,
            capacity: hello.max_inflight as usize,
            endpoint,
            orphans: hello.running,
        };
        let id = self.core.worker_joined(joining, tx.clone());
        // Only the session registry holds the sender for good: when the core closes the session
        // (shutdown), the response stream ends even though this task still pings.
        let tx = tx.downgrade();
        let core = self.core.clone();
        // Pinged from a task of its own, so that a slow call below (a result written to
        // Redis) never holds a keep-alive back; it ends when the session's queue is full or
        // gone, and so does the session; and with the session, however that ends (a panic
        // included: the worker must not be told a dead session lives).
        let mut ping = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
            let tx = tx.clone();
            async move {
                let mut every = tokio::time::interval(keepalive);
                loop {
                    every.tick().await;
                    let keep = ServerMessage {
                        message: Some(server_message::Message::KeepAlive(KeepAlive {})),
                    };
                    match tx.upgrade() {
                        Some(tx) if tx.try_send(keep).is_ok() => {}
                        _ => return,
                    }
                }
            }
        }));
        tokio::spawn(async move {
            let mut revocation = tokio::time::interval(Duration::from_secs(1));
            // The revoked workers' certificates this worker was last told of.
            let mut told: Vec<String> = Vec::new();
            loop {
                tokio::select! {
                    _ = revocation.tick() => {
                        if let Some((principal, policy)) = &credential {
                            if !policy.still_valid(principal) {
                                tracing::warn!(caller = %principal.name, id, "credential revoked; closing the worker's session");
                                break;
                            }
                            // Its CAS must refuse them as peers too.
                            let revoked = policy.revoked_fingerprints();
                            if revoked != told {
                                let message = ServerMessage { message: Some(server_message::Message::Revocations(PeerRevocations { fingerprints: revoked.clone() })) };
                                match tx.upgrade() {
                                    Some(tx) if tx.try_send(message).is_ok() => told = revoked,
                                    Some(_) => {}
                                    None => break,
                                }
                            }
                        }
                    }
                    message = incoming.message() => match message {
                        Ok(Some(m)) => {
                            core.worker_seen(id);
                            match m.message {
                                Some(worker_message::Message::ExecuteComplete(c)) => core.executed(id, &c.operation),
                                Some(worker_message::Message::Result(r)) => core.reported(id, r).await,
                                Some(worker_message::Message::GoingAway(_)) => core.worker_draining(id),
                                Some(worker_message::Message::Report(r)) => core.worker_report(id, r),
                                Some(worker_message::Message::Capacity(c)) => core.worker_capacity(id, c.max_inflight as usize),
                                Some(worker_message::Message::Orphans(o)) => core.worker_orphans(id, o.operations),
                                Some(worker_message::Message::NotRunning(n)) => core.not_running(id, &n.operation),
                                _ => {}
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = &mut ping => break,
                }
            }
            drop(ping);
            core.worker_left(id);
        });
        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures::StreamExt::map(out, Ok))))
    }
}

/// How often a server and its workers say they are alive: `execution.keepalive_secs`, or,
/// where the farm takes operations over (workers keep a session's actions for `grace`, three
/// leases), at least every fifth of a lease. A worker leaves a session whose server has said
/// nothing for three of these: a dead server's actions are orphans three fifths of a lease
/// after its last word, normally before its lease lapses (a lease after its last renewal),
/// so the server that takes its operations over finds them reported.
fn keepalive_every(keepalive: Duration, grace: Option<Duration>) -> Duration {
    match grace {
        Some(grace) => keepalive.min(grace / 15).max(Duration::from_millis(100)),
        None => keepalive,
    }
}

#[cfg(test)]
mod tests {
    use super::{keepalive_every, peer_endpoint};
    use std::time::Duration;

    /// Where the farm takes operations over, three keep-alive intervals (a worker's patience
    /// with a silent server) end before a dead server's lease can lapse (four fifths of a
    /// lease after its last renewal, at the soonest); elsewhere the configured interval.
    #[test]
    fn three_keepalives_fit_in_four_fifths_of_a_lease() {
        let secs = Duration::from_secs;
        assert_eq!(keepalive_every(secs(5), None), secs(5));
        assert_eq!(keepalive_every(secs(5), Some(secs(30))), secs(2));
        for (keepalive, lease) in [(5, 10), (1, 3), (5, 3), (30, 10), (1, 600), (60, 2)] {
            let every = keepalive_every(secs(keepalive), Some(secs(lease) * 3));
            assert!(every <= secs(keepalive));
            assert!(
                every * 3 < secs(lease) * 4 / 5,
                "{keepalive} s, lease {lease} s: {every:?}"
            );
        }
    }

    #[test]
    fn only_grpc_endpoints_with_an_authority_are_passed_on() {
        let plain = |e: &str| peer_endpoint(e, "").map(|p| p.endpoint);
        assert_eq!(
            plain("grpc://10.0.0.5:50052").as_deref(),
            Some("grpc://10.0.0.5:50052")
        );
        assert!(plain("grpc://[::1]:9").is_some());
        for bad in [
            "",
            "grpc://",
            "grpcs://10.0.0.5:1",
            "http://10.0.0.5:1",
            "grpc://a b:1",
            "grpc://x/y",
        ] {
            assert_eq!(plain(bad), None, "{bad:?}");
        }
        assert_eq!(plain(&format!("grpc://{}:1", "a".repeat(300))), None);
        // Over TLS only with the name the worker's certificate carries.
        let tls = peer_endpoint("grpcs://10.0.0.5:1", "mac-5").unwrap();
        assert_eq!(
            (tls.endpoint.as_str(), tls.tls_name.as_str()),
            ("grpcs://10.0.0.5:1", "mac-5")
        );
        assert!(peer_endpoint("grpcs://10.0.0.5:1", "not a name").is_none());
        assert_eq!(
            peer_endpoint("grpc://10.0.0.5:1", "mac-5")
                .unwrap()
                .tls_name,
            ""
        );
    }

    #[test]
    fn the_peer_name_comes_from_the_enrolment_not_from_the_worker() {
        use super::peer_tls_name;
        let named = "mac-5.peer.kiln.invalid";
        assert_eq!(
            peer_tls_name(Some("worker:mac-5"), "other.peer.kiln.invalid"),
            named
        );
        assert_eq!(peer_tls_name(Some("cert:mac-5"), named), "", "not enrolled");
        assert_eq!(peer_tls_name(Some("token:ci"), named), "");
        assert_eq!(peer_tls_name(None, named), "");
        // Authorization off: the announced name, only of the enrolled kind.
        assert_eq!(peer_tls_name(Some("anyone"), named), named);
        assert_eq!(peer_tls_name(Some("anyone"), "buildserver"), "");
    }
}
