//! `kiln worker`: a worker machine. It keeps its own CAS (served on its data plane, where peers
//! will fetch from), connects to the scheduler, and runs actions until SIGTERM/SIGINT; then it
//! finishes what it runs and exits.

use crate::cli::WorkerArgs;
use crate::signals::StopSignals;
use anyhow::{bail, Context};
use kiln_config::Config;
use kiln_dataplane::metrics::Metrics;
use kiln_dataplane::runtime::backend_for;
use kiln_dataplane::server::{shard_count, DataPlane, OpenedStore};
use kiln_dataplane::store::layout::Layout;
use kiln_worker::link::Link;
use kiln_worker::remote::{CasLinks, RemoteCas};
use kiln_worker::{prepare_work_dir, Identity, LocalCas, WorkerContext};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

/// A worker running on a tokio runtime.
pub struct RunningWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    /// Starts a session loop on `runtime` for each scheduler (its link, and the context its
    /// actions run in), sharing the worker's slots and reports.
    pub fn start(
        runtime: &tokio::runtime::Runtime,
        sessions: Vec<(Link, Arc<WorkerContext>)>,
        identity: Identity,
        max_delay: Duration,
    ) -> anyhow::Result<RunningWorker> {
        let (stop, stopped) = watch::channel(false);
        let Some((_, first)) = sessions.first() else {
            bail!("a worker needs a scheduler");
        };
        let _guard = runtime.enter();
        let slots = kiln_worker::slots::Slots::new(identity.max_inflight, sessions.len());
        let reports = kiln_worker::reports::ReportHub::start(first.clone());
        let running = kiln_worker::running::Running::new();
        let loops: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(index, (link, ctx))| {
                let shared = kiln_worker::session::Shared {
                    index,
                    slots: slots.clone(),
                    reports: reports.clone(),
                    running: running.clone(),
                };
                kiln_worker::session::run(
                    link,
                    identity.clone(),
                    ctx,
                    shared,
                    max_delay,
                    stopped.clone(),
                )
            })
            .collect();
        let mut all = tokio::task::JoinSet::new();
        for session in loops {
            all.spawn(session);
        }
        let task = runtime.spawn(async move { while all.join_next().await.is_some() {} });
        Ok(RunningWorker { stop, task })
    }

    /// Says GoingAway, lets running actions finish (at most `grace`), and stops.
    pub fn stop(self, runtime: &tokio::runtime::Runtime, grace: Duration) {
        let _ = self.stop.send(true);
        let task = self.task;
        runtime.block_on(async move {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("worker did not finish its actions within the grace period");
            }
        });
    }
}

/// Unreported changes to the local CAS kept for the scheduler, of each kind (added,
/// removed); past it the next report lists the whole CAS instead.
const HOLDINGS_KEPT: usize = 200_000;

/// The worker's CAS over mutual TLS, for its peers, when the worker is enrolled (its
/// certificate from `kiln worker --join`, signed by the farm CA, names it as a server under
/// `.peer.kiln.invalid`): that certificate as the server's, and client certificates
/// required, signed by the farm CA. Returns the acceptor and the name peers check. `None`:
/// not enrolled (a worker with certificates of another PKI serves its peers in plain gRPC,
/// since its CA may sign certificates for others than the farm), or its certificate is one
/// from before peers had TLS (client only), or peers are off.
fn peer_tls(
    config: &Config,
    enrolled: bool,
) -> anyhow::Result<Option<(kiln_dataplane::tls::TlsAccept, String)>> {
    let w = &config.worker;
    let (Some(cert), Some(key), Some(ca), true, true) =
        (&w.tls_cert, &w.tls_key, &w.tls_ca, w.peers, enrolled)
    else {
        return Ok(None);
    };
    let leaf = kiln_tls::pem::certificates(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?;
    let Some(name) = leaf.first().and_then(kiln_tls::pem::common_name) else {
        return Ok(None);
    };
    let files = kiln_tls::server::ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(ca.clone()),
        client_auth: kiln_tls::server::ClientAuth::Required,
    };
    let tls = kiln_tls::server::ServerTls::load(files)
        .context("cannot serve the local CAS over TLS with the worker's certificate")?;
    Ok(Some((
        kiln_dataplane::tls::TlsAccept {
            tls,
            handshake_timeout: Duration::from_secs(config.tls.handshake_timeout_secs),
        },
        kiln_tls::farm::peer_name(&name),
    )))
}

/// Where a worker keeps the fingerprints of revoked workers' certificates it was told of.
fn revoked_peers_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("identity").join("revoked-peers")
}

/// The fingerprints kept in [`revoked_peers_file`] (none if it is absent or unreadable).
fn revoked_peers(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(revoked_peers_file(data_dir))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// How the session tells the local CAS which certificates to refuse: added to `policy`, and
/// the whole list kept on disk for the next start.
fn refuser(
    policy: Arc<kiln_auth::Policy>,
    data_dir: &std::path::Path,
) -> kiln_worker::peers::Refuse {
    let file = revoked_peers_file(data_dir);
    Arc::new(move |fingerprints: &[String]| {
        policy.refuse_fingerprints(fingerprints);
        let text: String = policy
            .revoked_fingerprints()
            .iter()
            .map(|f| format!("{f}\n"))
            .collect();
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                kiln_tls::farm::write_private(&file, &text).map_err(std::io::Error::other)
            });
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "cannot keep the revoked workers' certificates for the next start");
        }
    })
}

/// Whether this worker serves its CAS to peers (and reports what it holds): with
/// `worker.peer_endpoint`, or when `server.listen` is one address peers can reach (a loopback
/// address only when the scheduler, and so the whole farm, is on this host). Peers reach it
/// at `worker.peer_endpoint`, else at the address it is bound to.
fn serves_peers(config: &Config, scheduler: &str) -> bool {
    if !config.worker.peers {
        return false;
    }
    if config.worker.peer_endpoint.is_some() {
        return true;
    }
    let listen = config.server.listen;
    if listen.ip().is_unspecified() {
        tracing::warn!(%listen, "the local CAS listens on every address, so peers cannot be told which to use: set worker.peer_endpoint to serve it to them");
        return false;
    }
    if listen.ip().is_loopback() && !on_loopback(scheduler) {
        tracing::info!(%listen, "the local CAS is on loopback, out of other hosts' reach: not served to peers (set server.listen and worker.peer_endpoint)");
        return false;
    }
    true
}

/// Whether the `grpc://HOST:PORT` URL names this host's loopback.
fn on_loopback(url: &str) -> bool {
    let rest = url
        .strip_prefix("grpc://")
        .or_else(|| url.strip_prefix("grpcs://"))
        .unwrap_or(url);
    let host = rest
        .parse::<http::uri::Authority>()
        .map(|a| {
            a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
        .unwrap_or_default();
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// This machine's host name ("" if it has none).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    }
}

/// The name a worker enrols under by default: its host name, in the characters names allow.
fn enrolment_name() -> String {
    let name: String = host_name()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if name.is_empty() {
        "worker".into()
    } else {
        name
    }
}

/// The worker's name: host name and process id (several workers may share a host).
pub fn default_name() -> String {
    let host = match host_name() {
        h if h.is_empty() => "worker".to_string(),
        h => h,
    };
    format!("{host}-{}", std::process::id())
}

/// The user actions run as, from `worker.run_as_user`.
pub fn run_as_user(config: &Config) -> anyhow::Result<Option<kiln_worker::run_as::RunAs>> {
    config
        .worker
        .run_as_user
        .as_deref()
        .map(|u| kiln_worker::run_as::RunAs::lookup(u).map_err(anyhow::Error::msg))
        .transpose()
}

/// Actions at once: the configured number, or one per core.
pub fn max_inflight(config: &Config) -> usize {
    match config.worker.max_inflight {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs `kiln worker`.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args)?;
    // The local CAS gets TLS only from an enrolment with peers on: where it cannot (peers
    // off, or TLS files of the worker's own, which enrolment leaves alone), refuse a plain
    // one off loopback before a join token is spent. Otherwise the check follows once the
    // identity is known.
    let no_tls = !config.worker.peers || config.worker.tls_cert.is_some();
    anyhow::ensure!(
        config.server.listen.ip().is_loopback() || !no_tls || args.insecure,
        "refusing to serve the worker's local CAS on {} in plain gRPC (only an enrolled worker \
         with worker.peers on and no TLS files of its own serves it over TLS): keep it on \
         loopback, or pass --insecure on a network you trust",
        config.server.listen
    );
    if let Some(admin) = args.admin_listen.filter(|a| !a.ip().is_loopback()) {
        anyhow::ensure!(
            args.insecure,
            "refusing to serve the worker's metrics on {admin} without TLS or authorization: keep \
             --admin-listen on loopback, or pass --insecure"
        );
    }
    // Enrol with a join token once; afterwards the stored identity is used by itself.
    let identity = crate::enrol::Identity::of(&config);
    if let Some(token) = &args.join {
        let name = args.name.clone().unwrap_or_else(enrolment_name);
        let started = std::time::Instant::now();
        let once = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        identity.enrol(&once, token, &name)?;
        info!(worker = %name, elapsed = ?started.elapsed(), "enrolled: client certificate stored under the CAS directory");
    }
    let enrolled = identity.apply(&mut config)? && identity.in_use(&config);
    // The local CAS, as peers reach it: over mutual TLS with the worker's enrolment
    // certificate, else plain (and then kept on loopback unless told otherwise).
    let peer_tls = peer_tls(&config, enrolled)?;
    if !config.server.listen.ip().is_loopback() && peer_tls.is_none() {
        anyhow::ensure!(
            args.insecure,
            "refusing to serve the worker's local CAS on {} in plain gRPC: anyone who can reach \
             it could read it (it is read-only: peers fetch inputs from it). Enrol the worker \
             (kiln worker --join) to serve it over mutual TLS, keep it on loopback, or pass \
             --insecure on a network you trust",
            config.server.listen
        );
        tracing::warn!(listen = %config.server.listen, "--insecure: the local CAS can be read by anyone who can reach it");
    }
    // The worker's client TLS: towards the scheduler, and towards peers served over TLS.
    let peer_client = crate::tls::worker_client(&config)?;
    let Some(scheduler) = config.worker.scheduler.clone() else {
        bail!("no scheduler: pass --scheduler grpc://HOST:PORT or set worker.scheduler");
    };
    let mut schedulers = vec![scheduler];
    for more in &config.worker.schedulers {
        if !schedulers.contains(more) {
            schedulers.push(more.clone());
        }
    }
    // The worker's own CAS is a cache of the server's: nothing in it needs to survive a power
    // cut, and every file a restart finds is hashed before an action gets it. Syncing each
    // fetched blob (a full flush per directory on macOS) would only slow fetching down.
    config.storage.fsync = false;
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let work_dir = config
        .worker
        .work_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("work"));
    let exec_cache = prepare_work_dir(&work_dir)
        .with_context(|| format!("cannot prepare {}", work_dir.display()))?;
    let mut store = OpenedStore::open(&config, shard_count(&config), Metrics::new())
        .with_context(|| format!("cannot open the local CAS in {}", data_dir.display()))?;
    // What the CAS holds, for the scheduler to tell other workers.
    let holdings = schedulers
        .iter()
        .all(|scheduler| serves_peers(&config, scheduler))
        .then(|| Arc::new(kiln_worker::holdings::Holdings::new(HOLDINGS_KEPT)));
    if let Some(h) = &holdings {
        store.watch(h.clone());
    }
    let local = LocalCas::new(store.cas(), store.chain(), Layout::cas(&data_dir), false);
    // Read-only: peers read from it (checking every byte); nothing writes to it over the
    // network.
    let tls_name = peer_tls.as_ref().map(|(_, name)| name.clone());
    // Certificates of revoked workers the scheduler told of before (kept across restarts:
    // a worker started while the scheduler is away refuses them all the same).
    let peer_policy = Arc::new(kiln_auth::Policy::read_only());
    peer_policy.refuse_fingerprints(&revoked_peers(&data_dir));
    // The same TLS serves the CAS over QUIC, unless peers go by TCP only.
    let quic_tls = peer_tls
        .as_ref()
        .filter(|_| config.worker.peer_transport != kiln_config::PeerTransport::Tcp)
        .map(|(accept, _)| accept.tls.config());
    let mut data = DataPlane::start(
        &config,
        store,
        backend_for(config.server.runtime),
        None,
        peer_tls.map(|(accept, _)| accept),
        peer_policy.clone(),
    )
    .with_context(|| format!("cannot serve the local CAS on {}", config.server.listen))?;
    let transfers = Arc::new(kiln_worker::peers::TransferStats::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.control_plane.threads)
        .thread_name("kiln-worker")
        .enable_all()
        .build()?;
    let quic = match (&quic_tls, &holdings) {
        (Some(tls), Some(_)) => {
            let _guard = runtime.enter();
            let served = kiln_worker::quic::serve_cas(
                data.local_addr(),
                tls,
                local.cas().clone(),
                peer_policy.clone(),
                &config.server,
                // Read-only to peers.
                None,
            );
            Some(served.context("cannot serve the local CAS over QUIC")?)
        }
        _ => None,
    };
    let serving = holdings.map(|holdings| {
        let metrics = local.cas().client().metrics().clone();
        let scheme = if tls_name.is_some() { "grpcs" } else { "grpc" };
        let endpoint = match &config.worker.peer_endpoint {
            Some(e) => e.replacen("grpc://", &format!("{scheme}://"), 1),
            None => format!("{scheme}://{}", data.local_addr()),
        };
        kiln_worker::peers::Serving {
            endpoint,
            tls_name: tls_name.clone(),
            holdings,
            served: Arc::new(move || metrics.blob_bytes_sent()),
        }
    });
    let asks_quic = config.worker.peer_transport != kiln_config::PeerTransport::Tcp
        || config.worker.server_transport != kiln_config::PeerTransport::Tcp;
    if asks_quic && peer_client.is_none() {
        tracing::warn!("worker.peer_transport or worker.server_transport asks for QUIC, which needs TLS (enrol the worker, or give it worker.tls_ca): using TCP");
    }
    // One endpoint (one UDP socket) dials peers and the server alike.
    let quic_client = match (&peer_client, asks_quic) {
        (Some(tls), true) => {
            let _guard = runtime.enter();
            Some(kiln_worker::quic::client_endpoint(tls).context("cannot dial over QUIC")?)
        }
        _ => None,
    };
    let quic_dialling = match (config.worker.peer_transport, &quic_client) {
        (kiln_config::PeerTransport::Tcp, _) | (_, None) => None,
        (transport, Some(endpoint)) => Some(kiln_worker::peers::QuicDialling {
            endpoint: endpoint.clone(),
            timeout: Duration::from_millis(config.worker.peer_quic_connect_timeout_ms),
            only: transport == kiln_config::PeerTransport::Quic,
        }),
    };
    let peers = config.worker.peers.then(|| {
        Arc::new(kiln_worker::peers::Peers::new(
            kiln_worker::peers::PeerSettings {
                race_delay: Duration::from_millis(config.worker.peer_race_delay_ms),
                min_rate: config.worker.peer_min_bytes_per_sec.as_u64(),
                cooldown: Duration::from_secs(config.worker.peer_cooldown_secs),
            },
            transfers.clone(),
            peer_client.clone(),
            quic_dialling,
        ))
    });
    let name = args.name.clone().unwrap_or_else(default_name);
    let identity = Identity {
        name: name.clone(),
        properties: kiln_worker::parse_properties(&config.worker.properties),
        max_inflight: max_inflight(&config),
    };
    let token = match &config.worker.token_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            anyhow::ensure!(!token.is_empty(), "{} holds no token", file.display());
            Some(token)
        }
        None => None,
    };
    let mut servers = Vec::new();
    for url in &schedulers {
        let _guard = runtime.enter();
        servers.push(server_link(
            &config,
            url,
            &peer_client,
            token.as_deref(),
            &quic_client,
        )?);
    }
    let ctx = {
        let _guard = runtime.enter();
        let dircache = open_dircache(&config)?;
        Arc::new(WorkerContext {
            name: name.clone(),
            local,
            remote: Some(servers[0].1.clone()),
            work_dir: work_dir.clone(),
            exec_cache,
            fetch_parallelism: config.worker.fetch_parallelism,
            contain: kiln_worker::contain::Containment::detect(),
            run_as: run_as_user(&config)?,
            dircache_overlay: dircache_overlay(&config, &work_dir, dircache.as_deref()),
            dircache,
            peers,
            transfers: transfers.clone(),
            serving: serving.clone(),
            refuse: Some(refuser(peer_policy, &data_dir)),
        })
    };
    if let Some(listen) = args.admin_listen {
        let cache = ctx.dircache.clone();
        let probe: kiln_controlplane::admin::worker_listener::CacheProbe =
            Arc::new(move || cache.as_ref().map(|c| c.stats().report()));
        let metrics = ctx.local.cas().client().metrics().clone();
        let served = serving.as_ref().map(|s| s.served.clone());
        let transfer_probe: kiln_controlplane::admin::worker_listener::TransferProbe =
            Arc::new(move || transfers.report(served.as_ref().map_or(0, |s| s())));
        let addr = runtime
            .block_on(kiln_controlplane::admin::worker_listener::start(
                listen,
                metrics,
                probe,
                transfer_probe,
            ))
            .with_context(|| format!("cannot serve the worker's metrics on {listen}"))?;
        info!("worker metrics on http://{addr}/metrics");
    }
    let stop = StopSignals::watch(&runtime)?;
    // A SIGHUP (sent to the whole farm by a rotation script) must not stop the worker.
    let _hup = StopSignals::hangup(&runtime);
    // A session per scheduler, each reading and uploading through its own server.
    let sessions = servers
        .into_iter()
        .map(|(link, remote)| {
            let ctx = Arc::new(WorkerContext {
                remote: Some(remote),
                ..(*ctx).clone()
            });
            (link, ctx)
        })
        .collect();
    let worker = RunningWorker::start(
        &runtime,
        sessions,
        identity.clone(),
        Duration::from_secs(config.worker.max_reconnect_delay_secs),
    )?;
    info!(
        "kiln worker {name} for {}: {} actions at once, properties {:?}; local CAS on {} ({} shards, {}); work in {}",
        schedulers.join(", "),
        identity.max_inflight,
        identity.properties,
        data.local_addr(),
        data.shards(),
        data.backend(),
        work_dir.display()
    );
    runtime.block_on(stop.wait());
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    info!("shutting down: finishing running actions (up to {grace:?})");
    worker.stop(&runtime, grace);
    drop(quic);
    let drained = data.begin_shutdown();
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), drained).await });
    data.finish_shutdown();
    runtime.shutdown_timeout(Duration::from_secs(2));
    info!("stopped");
    Ok(())
}

/// Whether cached input roots are mounted as overlays: when `worker.dircache_layout` asks
/// for it, there is a cache, and a trial mount in `work_dir` works (else they are linked,
/// and the log says why).
pub(crate) fn dircache_overlay(
    config: &Config,
    work_dir: &std::path::Path,
    cache: Option<&kiln_worker::dircache::DirCache>,
) -> bool {
    if config.worker.dircache_layout != kiln_config::DirCacheLayout::Overlay {
        return false;
    }
    let Some(cache) = cache else {
        return false;
    };
    let probe =
        kiln_worker::overlay::probe(&cache.dirs().build_path(), &work_dir.join(".overlay-probe"));
    match probe {
        Ok(()) => {
            info!("cached input roots are mounted as overlays");
            true
        }
        Err(why) => {
            tracing::warn!(%why, "worker.dircache_layout = \"overlay\", but overlays cannot be mounted here: cached input roots are linked");
            false
        }
    }
}

/// Opens the worker's directory cache (`worker.dircache_bytes`, 0: none).
pub(crate) fn open_dircache(
    config: &Config,
) -> anyhow::Result<Option<Arc<kiln_worker::dircache::DirCache>>> {
    let cap = config.worker.dircache_bytes.as_u64();
    if cap == 0 {
        return Ok(None);
    }
    let dir = config
        .worker
        .dircache_dir
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("dircache"));
    let work_dir = config
        .worker
        .work_dir
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("work"));
    kiln_worker::dircache::check_place(&dir, &config.storage.data_dir, &work_dir)
        .map_err(|why| anyhow::anyhow!("worker.dircache_dir: {why}"))?;
    let cache = kiln_worker::dircache::DirCache::open(&dir, cap)
        .with_context(|| format!("cannot open the directory cache in {}", dir.display()))?;
    Ok(Some(cache))
}

/// The link to the scheduler at `url` (with the farm's `token`, when set), and its CAS as
/// this worker reads from and uploads to it: over TCP, or over QUIC too when
/// `worker.server_transport` asks for it and the link has TLS. Called within the runtime.
fn server_link(
    config: &Config,
    url: &str,
    peer_client: &Option<Arc<rustls::ClientConfig>>,
    token: Option<&str>,
    quic_client: &Option<kiln_worker::quic::ClientEndpoint>,
) -> anyhow::Result<(Link, Arc<dyn kiln_reapi::cas::Cas>)> {
    let mut link = Link::new(url, peer_client.clone())?;
    if let Some(token) = token {
        link = link.with_token(token)?;
    }
    // Reads from the server over QUIC too, when asked for and the link has TLS.
    let server_quic = match (config.worker.server_transport, quic_client) {
        (kiln_config::PeerTransport::Tcp, _) | (_, None) => None,
        (transport, Some(endpoint)) => {
            let only = transport == kiln_config::PeerTransport::Quic;
            match link.quic_target() {
                None if only => bail!("cannot resolve {url} to reach the server over QUIC"),
                None => {
                    tracing::warn!(scheduler = %url, "cannot resolve the server's address for QUIC; reading over TCP");
                    None
                }
                Some((addr, name)) => {
                    let server = kiln_worker::quic::connect::QuicPeer::new(
                        endpoint.clone(),
                        addr,
                        &name,
                        Duration::from_millis(config.worker.peer_quic_connect_timeout_ms),
                        Duration::from_secs(config.worker.peer_cooldown_secs),
                    );
                    Some((server, only))
                }
            }
        }
    };
    let cas_link = || match &server_quic {
        Some((server, only)) => link.connect_lazy_preferring(server.clone(), *only),
        None => link.connect_lazy(),
    };
    let main = cas_link();
    // Each range of a large download on a connection of its own (the first shares main).
    let ranges: Vec<_> = std::iter::once(main.clone())
        .chain((1..config.worker.fetch_ranges).map(|_| cas_link()))
        .collect();
    let links = CasLinks {
        main,
        ranges: ranges.into(),
        ranged_min: config.worker.ranged_fetch_min_bytes.as_u64(),
    };
    Ok((link, Arc::new(RemoteCas::new(links))))
}

fn load_config(args: &WorkerArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => {
            let mut c = Config::default();
            // A worker's own data plane is for its peers, which do not fetch from it yet: by
            // default it serves on a free loopback port, not on the network.
            c.server.listen = "127.0.0.1:0".parse()?;
            c.storage.data_dir = kiln_config::default_data_dir().join("worker");
            c
        }
    };
    if let Some((first, more)) = args.scheduler.split_first() {
        config.worker.scheduler = Some(first.clone());
        config.worker.schedulers = more.to_vec();
    }
    if let Some(d) = &args.work_dir {
        config.worker.work_dir = Some(d.clone());
    }
    if let Some(f) = &args.tls_ca {
        config.worker.tls_ca = Some(f.clone());
    }
    if let Some(f) = &args.tls_cert {
        config.worker.tls_cert = Some(f.clone());
    }
    if let Some(f) = &args.tls_key {
        config.worker.tls_key = Some(f.clone());
    }
    if let Some(f) = &args.token_file {
        config.worker.token_file = Some(f.clone());
    }
    if let Some(d) = &args.cas_dir {
        config.storage.data_dir = d.clone();
    }
    if !args.property.is_empty() {
        config.worker.properties = args.property.clone();
    }
    if let Some(n) = args.max_inflight {
        config.worker.max_inflight = n;
    }
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(s) = args.shards {
        config.server.shards = s;
    }
    if let Some(r) = args.runtime {
        config.server.runtime = r;
    }
    config.validate()?;
    Ok(config)
}
