//! An enrolled farm (TLS, authorization, workers joined with tokens) and clients of a CAS over
//! TLS and QUIC, for the tests of peers and links over QUIC and mutual TLS (tests/quic.rs).

use super::exec::Worker;
use super::peers::pool_args;
use kiln_proto::reapi::digest_function::Value as Function;
use std::path::Path;

const F: Function = Function::Sha256;

/// A TLS channel to `addr` checking its certificate for `name` against the CA in `ca`,
/// presenting `identity` (certificate and key files) if given.
pub async fn tls_channel(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    kiln_tls::install_provider();
    let identity =
        identity.map(|(c, k)| kiln_tls::client::ClientIdentity::from_files(c, k).unwrap());
    let trust = kiln_tls::client::Trust::ca_file(ca).unwrap();
    let config = kiln_tls::client::config(trust, identity).unwrap();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(kiln_tls::client::Connector::for_name(config, name))
        .await
}

/// The worker CAS at `addr` over QUIC, checking its certificate for `name` against the CA in
/// `ca` and presenting `cert` and `key` (one connection, made at the first call).
pub fn quic_cas(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: (&Path, &Path),
) -> kiln_worker::remote::RemoteCas {
    let channel = quic_channel(addr, name, ca, identity);
    kiln_worker::remote::RemoteCas::new(kiln_worker::remote::CasLinks::single(channel))
}

/// A gRPC channel to `addr` over QUIC, as [`quic_cas`] makes it.
pub fn quic_channel(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: (&Path, &Path),
) -> kiln_worker::link::LinkChannel {
    quic_link(addr, name, ca, identity).0
}

/// [`quic_channel`], and the QUIC connection under it.
pub fn quic_link(
    addr: &str,
    name: &str,
    ca: &Path,
    (cert, key): (&Path, &Path),
) -> (
    kiln_worker::link::LinkChannel,
    std::sync::Arc<kiln_worker::quic::connect::QuicPeer>,
) {
    kiln_tls::install_provider();
    let identity = kiln_tls::client::ClientIdentity::from_files(cert, key).unwrap();
    let trust = kiln_tls::client::Trust::ca_file(ca).unwrap();
    let config = kiln_tls::client::config(trust, Some(identity)).unwrap();
    let endpoint = kiln_worker::quic::client_endpoint(&config).unwrap();
    let peer = kiln_worker::quic::connect::QuicPeer::new(
        endpoint,
        addr.parse().unwrap(),
        name,
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(30),
    );
    let link = kiln_worker::link::Link::new(&format!("grpc://{addr}"), None).unwrap();
    let channel = link.connect_lazy_via(kiln_worker::quic::connect::QuicConnector(peer.clone()));
    (channel, peer)
}

/// Reads `digest` from `cas`: the blob, `None` if the worker does not hold it, or why the
/// read failed.
pub async fn quic_read(
    cas: &kiln_worker::remote::RemoteCas,
    digest: &kiln_proto::reapi::Digest,
) -> Result<Option<Vec<u8>>, String> {
    use kiln_reapi::cas::Cas;
    let digest = kiln_reapi::digest::Digest::from_proto(digest, F as i32).unwrap();
    let got = cas
        .read_blobs(
            &kiln_reapi::digest::InstanceName::default_instance(),
            &[digest],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(got.into_iter().next().flatten().map(|b| b.to_vec()))
}

/// A farm with TLS (`mode = "auto"`) and authorization, `kiln serve`'s data in `dir/server`,
/// and a worker enrolled with a join token for each (name, pool, more `[worker]` settings).
pub async fn enrolled_farm<const N: usize>(
    rt: super::Runtime,
    dir: &Path,
    server: &str,
    workers: [(&'static str, &'static str, &'static str); N],
) -> (super::Kiln, Vec<Worker>) {
    let data = dir.join("server");
    let options = super::Options {
        config: Some(format!(
            "[server]\n{server}\n{}",
            concat!(
                "[tls]\nmode = \"auto\"\n[worker]\nembedded = false\n",
                "[execution]\nkeepalive_secs = 1\n",
                "[auth]\nenabled = true\nanonymous_roles = [\"execute\", \"cache-read\", \"cache-write\"]\n",
            )
        )),
        ..super::Options::on(rt)
    };
    let kiln = super::Kiln::start_async(&data, options).await;
    let url = format!("grpcs://{}", kiln.addr);
    let mut started = Vec::new();
    for (name, pool, more) in workers {
        let token = kiln.join_token(&data);
        let (url, wdir, property) = (url.clone(), dir.join(name), format!("pool={pool}"));
        let w = tokio::task::spawn_blocking(move || {
            let config = wdir.join("worker.toml");
            std::fs::create_dir_all(&wdir).unwrap();
            std::fs::write(&config, format!("[worker]\ndircache_bytes = 0\n{more}")).unwrap();
            let mut args = vec!["--join", &token];
            args.extend(pool_args(config.to_str().unwrap(), &property));
            Worker::start_for(&url, rt, &wdir, name, &args)
        })
        .await
        .unwrap();
        started.push(w);
    }
    (kiln, started)
}

/// Where worker `w` serves its CAS, as it logged it.
pub fn cas_address(w: &Worker) -> String {
    w.start_log
        .iter()
        .find_map(|l| l.split("local CAS on ").nth(1)?.split_whitespace().next())
        .expect("the worker logs its CAS address")
        .to_string()
}

/// Waits until the scheduler knows of at least `facts` blobs held by `worker`.
pub async fn facts_known_over_tls(kiln: &super::Kiln, ca: &Path, worker: &str, facts: f64) {
    let metric = format!("kiln_worker_held_blobs{{worker=\"{worker}\"}} ");
    super::eventually("a worker's reports of what it holds", || {
        let metric = metric.clone();
        async move { (kiln.metric_over_tls(ca, &[&metric]).await >= facts).then_some(()) }
    })
    .await;
}
