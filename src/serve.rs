//! `kiln serve`: open the store, start the control plane and the data plane, wait for SIGTERM
//! or SIGINT, then stop accepting, let in-flight calls finish (up to the grace period) and exit.

use crate::cli::ServeArgs;
use crate::signals::StopSignals;
use crate::worker::{default_name, max_inflight, run_as_user, RunningWorker};
use anyhow::Context;
use kiln_auth::Role;
use kiln_config::Config;
use kiln_controlplane::admin::listener::AdminTls;
use kiln_controlplane::admin::ServerInfo;
use kiln_controlplane::ControlPlane;
use kiln_dataplane::metrics::Metrics;
use kiln_dataplane::runtime::backend_for;
use kiln_dataplane::server::{shard_count, DataPlane, OpenedStore};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::tier::BlobStore;
use kiln_dataplane::store::CasClient;
use kiln_dataplane::tls::TlsAccept;
use kiln_worker::link::Link;
use kiln_worker::{prepare_work_dir, Identity, LocalCas, WorkerContext};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Runs the server until a signal stops it.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    crate::tls::check_exposure(&config, args.insecure)?;
    crate::tls::warn_dead_certificate_rules(&config);
    crate::allocator::purge_in_background();
    let data_dir = &config.storage.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let shards = shard_count(&config);
    let metrics = Metrics::new();
    // The chain's grpc and shard tiers reach other CAS endpoints as a worker reaches its
    // server.
    let remotes: kiln_dataplane::store::tier::remote::RemoteMaker = Arc::new(|endpoint: &str| {
        let link = kiln_worker::link::Link::new(endpoint, None).map_err(|e| e.to_string())?;
        let links = kiln_worker::remote::CasLinks::single(link.connect_lazy());
        Ok(Arc::new(kiln_worker::remote::RemoteCas::new(links)) as Arc<dyn kiln_reapi::cas::Cas>)
    });
    let store = OpenedStore::open_with(&config, shards, metrics, Some(remotes))
        .with_context(|| format!("cannot open the CAS in {}", data_dir.display()))?;
    let scan = store.report().clone();
    let cas = store.cas();
    let policy = crate::auth::policy(&config)?;
    let blobs = store.chain();
    // Uploads over QUIC seed the memory tiers up to the size they keep, as TCP uploads do.
    let seed_memory = store.chain_plan().largest_cached_blob();
    let control = ControlPlane::start(
        &config,
        store.cas(),
        blobs.clone(),
        enroller(&config, &policy),
    )
    .context("cannot start the control plane")?;
    let backend = backend_for(config.server.runtime);
    let tls = crate::tls::server(&config)?;
    // SIGHUP reloads certificates; watched from here on (with or without TLS) so that it
    // never terminates the server.
    let hup = StopSignals::hangup(control.runtime());
    if policy.enabled() {
        control
            .runtime()
            .spawn(crate::auth::reload_loop(policy.clone()));
    }
    let mut data = DataPlane::start(
        &config,
        store,
        backend,
        Some(control.link()),
        tls.clone(),
        policy.clone(),
    )
    .with_context(|| format!("cannot serve on {}", config.server.listen))?;
    // The CAS's blob reads and uploads over QUIC too (`server.quic`, with TLS).
    let quic = match (&tls, config.server.quic) {
        (Some(t), true) => {
            let _guard = control.runtime().enter();
            // Group commit as over TCP: an upload's data is synced by its shard's group.
            let chain = kiln_dataplane::store::ChainCas::new(
                cas.clone(),
                blobs.clone(),
                Layout::cas(data_dir),
                config.storage.fsync,
            )
            .with_group_commit(data.group_commit_max());
            let served = kiln_worker::quic::serve_cas(
                data.local_addr(),
                &t.tls.config(),
                chain,
                policy.clone(),
                &config.server,
                Some(kiln_worker::quic::UploadLimits {
                    max_blob: config.storage.disk_bytes.as_u64(),
                    seed_memory,
                }),
            );
            Some(served.context("cannot serve the CAS over QUIC")?)
        }
        _ => None,
    };
    // Certificates reload from here on (a SIGHUP since `hup` was made waits in it).
    if let Some(t) = &tls {
        let check = Duration::from_secs(config.tls.reload_check_secs);
        let quic = quic.as_ref().map(|q| q.certificates());
        control
            .runtime()
            .spawn(crate::tls::reload_loop(t.tls.clone(), check, hup, quic));
    }
    let admin = start_admin(&config, &control, &data, tls.as_ref(), &policy);
    let worker =
        start_embedded_worker(&config, &control, &data, cas, blobs, tls.as_ref(), &policy)?;
    let stop = StopSignals::watch(control.runtime())?;
    control.set_ready(true);
    let (ac_entries, _) = control.action_cache_usage();
    info!(
        "kiln listening on {} ({}, {} shards, {}); admin on {}; data in {} (CAS: {} blob directories being indexed in the background, {} other directories scanned in {:.2?}; action cache {} entries)",
        data.local_addr(),
        if tls.is_some() { "TLS" } else { "plain HTTP/2" },
        data.shards(),
        data.backend(),
        admin,
        data_dir.display(),
        scan.dirs_pending,
        scan.dirs_scanned,
        scan.elapsed,
        ac_entries,
    );
    if scan.removed > 0 {
        warn!(
            removed = scan.removed,
            "deleted damaged blob files found at start-up"
        );
    }

    control.runtime().block_on(stop.wait());
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    info!("shutting down: no new connections; waiting up to {grace:?} for in-flight calls");
    control.set_ready(false);
    let stopping = std::time::Instant::now();
    if let Some(q) = &quic {
        q.stop_accepting();
    }
    let drained = data.begin_shutdown();
    if let Some(worker) = worker {
        worker.stop(control.runtime(), grace);
    }
    if let Some(execution) = control.execution() {
        control.runtime().block_on(execution.shutdown(grace));
    }
    let clean = control
        .runtime()
        .block_on(async { tokio::time::timeout(grace, drained).await.is_ok() });
    if !clean {
        warn!("grace period over; closing the remaining connections");
    }
    // QUIC reads in flight get what is left of the grace period.
    if let Some(q) = &quic {
        let left = grace.saturating_sub(stopping.elapsed());
        let _ = control
            .runtime()
            .block_on(async { tokio::time::timeout(left, q.reads_done()).await });
    }
    drop(quic);
    data.finish_shutdown();
    control.shutdown(Duration::from_secs(5));
    info!("stopped");
    Ok(())
}

/// Starts the worker that runs in the server's process, on the server's own CAS (no
/// downloads, outputs stored in place), when execution and `worker.embedded` are on.
fn start_embedded_worker(
    config: &Config,
    control: &ControlPlane,
    data: &DataPlane,
    cas: CasClient,
    blobs: Arc<dyn BlobStore>,
    tls: Option<&TlsAccept>,
    policy: &kiln_auth::Policy,
) -> anyhow::Result<Option<RunningWorker>> {
    if !config.execution.enabled || !config.worker.embedded {
        return Ok(None);
    }
    let data_dir = &config.storage.data_dir;
    let work_dir = config
        .worker
        .work_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("work"));
    let exec_cache = prepare_work_dir(&work_dir)
        .with_context(|| format!("cannot prepare {}", work_dir.display()))?;
    let mut addr = data.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let name = format!("{}-embedded", default_name());
    let identity = Identity {
        name: name.clone(),
        properties: kiln_worker::parse_properties(&config.worker.properties),
        max_inflight: max_inflight(config),
    };
    let dircache = crate::worker::open_dircache(config)?;
    let dircache_overlay = crate::worker::dircache_overlay(config, &work_dir, dircache.as_deref());
    let ctx = Arc::new(WorkerContext {
        name,
        local: LocalCas::new(cas, blobs, Layout::cas(data_dir), config.storage.fsync)
            .with_group_commit(data.group_commit_max()),
        remote: None,
        work_dir,
        exec_cache,
        fetch_parallelism: config.worker.fetch_parallelism,
        contain: kiln_worker::contain::Containment::detect(),
        run_as: run_as_user(config)?,
        dircache_overlay,
        dircache,
        // The server's own worker fetches nothing: its CAS is the server's.
        peers: None,
        transfers: Default::default(),
        serving: None,
        refuse: None,
    });
    // Over TLS when the port has it, trusting exactly this server's certificate.
    let link = match tls {
        None => Link::new(&format!("grpc://{addr}"), None)?,
        Some(t) => Link::new(
            &format!("grpcs://{addr}"),
            Some(crate::tls::embedded_client(config, t)?),
        )?,
    };
    // With [auth] on, it presents a token that exists in this process only.
    let link = if policy.enabled() {
        let roles = [Role::Worker, Role::CacheRead, Role::CacheWrite];
        link.with_token(&policy.internal_token("embedded-worker", &roles)?)?
    } else {
        link
    };
    let worker = RunningWorker::start(
        control.runtime(),
        vec![(link, ctx)],
        identity,
        Duration::from_secs(config.worker.max_reconnect_delay_secs),
    )?;
    Ok(Some(worker))
}

/// Starts the admin listener; a failure is logged, not fatal: builds must keep working even
/// when something else (a Prometheus server, say) already holds the admin port.
fn start_admin(
    config: &Config,
    control: &ControlPlane,
    data: &DataPlane,
    tls: Option<&TlsAccept>,
    policy: &Arc<kiln_auth::Policy>,
) -> String {
    if !config.admin.enabled {
        return "(disabled)".into();
    }
    let info = ServerInfo {
        grpc_addr: data.local_addr(),
        shards: data.shards(),
        backend: data.backend().to_string(),
        data_dir: config.storage.data_dir.display().to_string(),
        cas_capacity: config.storage.disk_bytes.as_u64(),
        chain: Some(data.chain_plan()),
        allocator: Some(crate::allocator::stats),
    };
    let access = kiln_controlplane::admin::Access {
        tls: tls.map(|t| AdminTls {
            tls: t.tls.clone(),
            handshake_timeout: t.handshake_timeout,
        }),
        policy: policy.clone(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    match control.start_admin(config.admin.listen, info, access) {
        Ok(addr) => format!("{scheme}://{addr}"),
        Err(e) => {
            error!(listen = %config.admin.listen, error = %e, "cannot start the admin listener (metrics, status page); serving without it");
            "(unavailable)".into()
        }
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.storage.data_dir = dir.clone();
    }
    if let Some(shards) = args.shards {
        config.server.shards = shards;
    }
    if let Some(runtime) = args.runtime {
        config.server.runtime = runtime;
    }
    if let Some(admin) = args.admin_listen {
        config.admin.listen = admin;
    }
    config.validate()?;
    Ok(config)
}

/// The configuration a `kiln ca` or `kiln token` command names.
pub fn server_config(args: &crate::cli::CaArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &args.data_dir {
        config.storage.data_dir = d.clone();
    }
    Ok(config)
}

/// The enroller of `kiln worker --join`, with the farm CA (auto mode only).
fn enroller(
    config: &Config,
    policy: &Arc<kiln_auth::Policy>,
) -> Option<Arc<dyn kiln_controlplane::enrolment::Enroller>> {
    let auto = config.tls.mode == kiln_config::TlsMode::Auto;
    if auto && !config.auth.enabled {
        tracing::warn!("[auth] is off: workers may still enrol, but every farm certificate may do everything, whatever its join token's roles, and `kiln worker revoke` does not cut a worker off; turn [auth] on to have either");
    }
    auto.then(|| Arc::new(crate::enrol::FarmEnroller::new(config, policy.clone())) as Arc<_>)
}

/// `kiln ca export`.
pub fn export_ca(args: crate::cli::CaArgs) -> anyhow::Result<()> {
    crate::tls::export_ca(&server_config(&args)?)
}
