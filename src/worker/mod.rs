//! `kiln worker`: a worker machine. It keeps its own CAS (served on its data plane, where peers
//! will fetch from), connects to its schedulers, and runs actions until SIGTERM/SIGINT; then it
//! finishes what it runs and exits.

mod dircache;
mod identity;
mod peers;
mod server_link;
mod sessions;

pub(crate) use dircache::{dircache_overlay, open_dircache};
use identity::enrolment_name;
pub use identity::{default_name, host_name, max_inflight, run_as_user};
use peers::{peer_tls, refuser, revoked_peers, serves_peers};
use server_link::server_link;
pub use sessions::RunningWorker;

use crate::cli::WorkerArgs;
use crate::signals::StopSignals;
use anyhow::{bail, Context};
use kiln_config::Config;
use kiln_dataplane::metrics::Metrics;
use kiln_dataplane::runtime::backend_for;
use kiln_dataplane::server::{shard_count, DataPlane, OpenedStore};
use kiln_dataplane::store::layout::Layout;
use kiln_worker::{prepare_work_dir, Identity, LocalCas, WorkerContext};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// Unreported changes to the local CAS kept for the scheduler, of each kind (added,
/// removed); past it the next report lists the whole CAS instead.
const HOLDINGS_KEPT: usize = 200_000;

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
