//! A farm across hosts: the server and three `kiln worker`s, each in a network namespace of
//! its own with its own address on a bridge (`ip netns`, veth pairs), so that peer traffic
//! really goes between hosts. The test creates the namespaces and removes them; where they
//! cannot be created (not root, no `ip`), it says so and does nothing. (A host whose
//! firewall drops bridged traffic, as Docker's `br_netfilter` with a FORWARD policy of DROP
//! does, fails it: the workers never reach the server.)

#[macro_use]
mod common;

use common::exec::{code, execute, worker_of, Spec, Tree, Worker, NO_EMBEDDED};
use common::metric_or_zero as number;
use common::{Kiln, Options, Runtime};
use kiln_proto::reapi::digest_function::Value as Function;
use std::process::Command;

const F: Function = Function::Sha256;

/// Network namespaces `{prefix}{i}` on a bridge, host `i` at `10.{a}.{b}.{i + 1}`, the
/// bridge (in the test's own namespace) at `.254`; what this run made is removed when
/// dropped, and only that.
struct Net {
    prefix: String,
    subnet: String,
    /// The namespaces made, and whether the bridge was.
    namespaces: Vec<String>,
    bridge_made: bool,
}

/// Why `ip` failed: `Denied` where namespaces cannot be made here at all.
enum IpError {
    Denied(String),
    Failed(String),
}

fn ip(args: &[&str]) -> Result<(), IpError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| IpError::Denied(format!("ip: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let why = format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if why.contains("Operation not permitted") || why.contains("Permission denied") {
        Err(IpError::Denied(why))
    } else {
        Err(IpError::Failed(why))
    }
}

impl Net {
    /// `hosts` namespaces; `None` (with the reason) where namespaces cannot be made here.
    /// Names and the subnet are random (tests of other processes may make theirs at once),
    /// and a subnet this host already has an address in is not used.
    fn create(hosts: usize) -> Result<Net, String> {
        for _ in 0..8 {
            let id = uuid::Uuid::new_v4();
            let b = id.as_bytes();
            let subnet = format!("10.{}.{}", 200 + b[0] % 50, b[1]);
            if !free_subnet(&subnet) {
                continue;
            }
            let mut net = Net {
                prefix: format!("kn{}", &id.simple().to_string()[..6]),
                subnet,
                namespaces: Vec::new(),
                bridge_made: false,
            };
            match net.build(hosts) {
                Ok(()) => return Ok(net),
                Err(IpError::Denied(why)) => return Err(why),
                // A name taken by another run: try other names.
                Err(IpError::Failed(why)) if why.contains("File exists") => continue,
                Err(IpError::Failed(why)) => panic!("cannot set up the namespaces: {why}"),
            }
        }
        panic!("no free names or subnet for the test's namespaces after 8 tries");
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The namespace of host `i`.
    fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// The address of host `i`.
    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    fn build(&mut self, hosts: usize) -> Result<(), IpError> {
        let bridge = self.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.bridge_made = true;
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", self.subnet),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..hosts {
            let ns = self.ns(i);
            let veth = format!("{ns}v");
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }
}

/// Whether no address of this host is in `subnet`.0/24.
fn free_subnet(subnet: &str) -> bool {
    Command::new("ip")
        .args(["-o", "-4", "addr", "show", "to", &format!("{subnet}.0/24")])
        .output()
        .is_ok_and(|o| o.stdout.is_empty())
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it ours.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        if self.bridge_made {
            let _ = ip(&["link", "del", &self.bridge()]);
        }
    }
}

/// Worker `name` on host `i` of `net`, offering `host=NAME`, with its admin listener on its
/// own address; returns it and that admin address. Plain gRPC, or enrolled with `join` (a
/// join token) over TLS.
async fn worker(
    net: &Net,
    i: usize,
    kiln: &Kiln,
    dir: &std::path::Path,
    name: &str,
    config: &str,
    join: Option<String>,
) -> (Worker, String) {
    let scheme = if join.is_some() { "grpcs" } else { "grpc" };
    let (ns, addr, url) = (net.ns(i), net.addr(i), format!("{scheme}://{}", kiln.addr));
    let wdir = dir.join(name);
    std::fs::create_dir_all(&wdir).unwrap();
    let file = wdir.join("worker.toml");
    std::fs::write(&file, format!("[worker]\n{config}")).unwrap();
    let (name, file) = (name.to_string(), file.to_str().unwrap().to_string());
    let w = tokio::task::spawn_blocking(move || {
        let property = format!("host={name}");
        let admin = format!("{addr}:0");
        let mut args = vec![
            "--config",
            &file,
            "--property",
            &property,
            "--property",
            "pool=any",
            "--max-inflight",
            "1",
            "--admin-listen",
            &admin,
        ];
        // Metrics on the host's own address need it, whatever the CAS's link.
        args.push("--insecure");
        if let Some(token) = &join {
            args.extend(["--join", token.as_str()]);
        }
        Worker::start_in(
            Some(&ns),
            &url,
            Runtime::Glommio,
            &wdir,
            &name,
            &format!("{addr}:0"),
            &args,
        )
    })
    .await
    .unwrap();
    let admin = w.admin();
    (w, admin)
}

fn inputs(tag: u8) -> (Tree, u64) {
    let big: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ tag)
        .collect();
    let small = vec![tag; 1000];
    let bytes = (big.len() + small.len()) as u64;
    (
        Tree::default()
            .file("big", &big, false)
            .file("lib/small", &small, false),
        bytes,
    )
}

fn spec(tree: &Tree, platform: &[(&str, &str)], salt: &str) -> Spec {
    Spec {
        tree: tree.clone(),
        platform: platform
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        ..Spec::script(&format!("cat big lib/small | wc -c; echo {salt}"))
    }
}

// On one farm across four "hosts": an action whose input root a worker has laid out goes
// back to that worker and hits its directory cache; a blob worker a holds reaches worker b
// from a (a's served bytes move, the server sends none of it); and when a is killed while c
// waits on it for a blob, c finishes from the server; and an action waiting for busy b has
// its inputs fetched by b before b's slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_across_namespaces_shares_inputs_between_its_hosts() {
    let net = match Net::create(4) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: cannot create network namespaces here ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        config: Some(NO_EMBEDDED.into()),
        listen: Some(format!("{}:0", net.addr(0))),
        netns: Some(net.ns(0)),
        ..Options::on(Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&dir.path().join("server"), options).await;
    let (_a, admin_a) = worker(&net, 1, &kiln, dir.path(), "a", "", None).await;
    let (_b, admin_b) = worker(
        &net,
        2,
        &kiln,
        dir.path(),
        "b",
        "peer_race_delay_ms = 60000\n",
        None,
    )
    .await;
    // c waits for its peer as long as it takes: only a's death can end the wait.
    let (_c, admin_c) = worker(
        &net,
        3,
        &kiln,
        dir.path(),
        "c",
        "peer_race_delay_ms = 600000\n",
        None,
    )
    .await;
    let mut a = _a;
    let ch = kiln.channel().await;
    let sent = || async {
        number(
            &kiln.admin,
            "kiln_sent_bytes_total{method=\"ByteStream.Read\"}",
        )
        .await
            + number(
                &kiln.admin,
                "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}",
            )
            .await
    };

    // The first action of a root runs on a; the second, free to go anywhere, goes back to a
    // and is laid out from its directory cache.
    let (tree, bytes) = inputs(1);
    let (_, r) = execute(
        &ch,
        F,
        &spec(&tree, &[("host", "a")], "one").upload(&ch, F).await,
        false,
    )
    .await
    .unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "a"), "{r:?}");
    let (_, r) = execute(
        &ch,
        F,
        &spec(&tree, &[("pool", "any")], "two").upload(&ch, F).await,
        false,
    )
    .await
    .unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "a"), "{r:?}");
    assert_eq!(
        number(&admin_a, "kiln_worker_dircache_hits_total").await,
        1.0
    );

    // The same inputs on b come from a, across the bridge.
    // All of a's inputs (two files, two directories): a partial report, or another
    // worker's, must not let b start early.
    let held_by_a = || number(&kiln.admin, "kiln_worker_held_blobs{worker=\"a\"}");
    common::eventually("a's report of what it holds", || async {
        (held_by_a().await >= 4.0).then_some(())
    })
    .await;
    let before = sent().await;
    let (_, r) = execute(
        &ch,
        F,
        &spec(&tree, &[("host", "b")], "three").upload(&ch, F).await,
        false,
    )
    .await
    .unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "b"), "{r:?}");
    assert_eq!(
        number(&admin_b, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await as u64,
        bytes
    );
    assert!(number(&admin_a, "kiln_worker_served_bytes_total").await as u64 >= bytes);
    let server_sent = sent().await - before;
    assert!(
        server_sent < (bytes / 2) as f64,
        "the server sent {server_sent} bytes of {bytes}"
    );

    // New inputs held by a alone; a stops answering while c asks it for them, then dies.
    let (tree, bytes) = inputs(2);
    let facts_before = held_by_a().await;
    let (_, r) = execute(
        &ch,
        F,
        &spec(&tree, &[("host", "a")], "four").upload(&ch, F).await,
        false,
    )
    .await
    .unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "a"), "{r:?}");
    // The new inputs' two files and two directories, at least, join a's facts.
    common::eventually("a's report of the new inputs", || async {
        (held_by_a().await >= facts_before + 4.0).then_some(())
    })
    .await;
    let action = spec(&tree, &[("host", "c")], "five").upload(&ch, F).await;
    a.signal(libc::SIGSTOP);
    let run = {
        let ch = ch.clone();
        tokio::spawn(async move { execute(&ch, F, &action, false).await })
    };
    // c has read the tree from the server: its requests to a follow at once.
    common::eventually("c to start fetching", || async {
        (number(&admin_c, "kiln_worker_fetch_bytes_total{source=\"server\"}").await > 0.0)
            .then_some(())
    })
    .await;
    a.kill();
    let (_, r) = run.await.unwrap().unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "c"), "{r:?}");
    let out =
        common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
    assert_eq!(out, format!("{bytes}\nfive\n").into_bytes());
    assert_eq!(
        number(&admin_c, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await,
        0.0
    );
    assert!(
        number(&admin_c, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64 >= bytes
    );
    assert!(
        number(&admin_c, "kiln_worker_peer_failures_total").await >= 1.0,
        "c asked a (it was hinted), and a failed it"
    );

    // While b is busy, an action only b may run waits for it: b fetches its inputs across the
    // bridge before its slot frees, and runs it without fetching them again.
    let (flag, started) = (dir.path().join("flag"), dir.path().join("started"));
    let hold = Spec {
        platform: vec![("host".into(), "b".into())],
        ..Spec::script(&format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.02; done",
            started.display(),
            flag.display()
        ))
    }
    .upload(&ch, F)
    .await;
    let held = {
        let ch = ch.clone();
        tokio::spawn(async move { execute(&ch, F, &hold, false).await })
    };
    common::eventually("b's holding action to start", || async {
        started.exists().then_some(())
    })
    .await;
    let from_server = || number(&admin_b, "kiln_worker_fetch_bytes_total{source=\"server\"}");
    let before = from_server().await;
    let (tree, bytes) = inputs(3);
    let waiting = spec(&tree, &[("host", "b")], "six").upload(&ch, F).await;
    let later = {
        let ch = ch.clone();
        tokio::spawn(async move { execute(&ch, F, &waiting, false).await })
    };
    // While the holding action runs: it ends only once the flag below is written.
    common::eventually("b to fetch the waiting action's inputs ahead", || async {
        (from_server().await >= before + bytes as f64).then_some(())
    })
    .await;
    let fetched_ahead = from_server().await;
    std::fs::write(&flag, b"").unwrap();
    let (_, r) = held.await.unwrap().unwrap();
    assert_eq!(code(&r), 0, "{r:?}");
    let (_, r) = later.await.unwrap().unwrap();
    assert_eq!((code(&r), worker_of(&r).as_str()), (0, "b"), "{r:?}");
    let out =
        common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
    assert_eq!(out, format!("{bytes}\nsix\n").into_bytes());
    assert!(
        from_server().await < fetched_ahead + 4096.0,
        "no input fetched twice (only Directory blobs)"
    );
    assert_eq!(
        number(
            &kiln.admin,
            "kiln_scheduler_placements_total{reason=\"prefetched\"}"
        )
        .await,
        1.0
    );
    kiln.stop().await;
}

// The same farm enrolled, over mutual TLS, with peers over QUIC where UDP gets through: a's
// inputs reach b (`peer_transport = "quic"`) from a over QUIC, across the bridge. On
// c's host every UDP packet out is refused (`ip rule add ipproto udp prohibit` in its
// namespace: UDP blocked), so c (`"both"`) reaches its peers over TCP, before and after its
// QUIC handshakes time out, without any peer being set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_hosts_share_inputs_over_quic_and_over_tcp_where_udp_is_blocked() {
    let net = match Net::create(4) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: cannot create network namespaces here ({why})");
            return;
        }
    };
    let blocked = ip(&[
        "-n",
        &net.ns(3),
        "rule",
        "add",
        "ipproto",
        "udp",
        "prohibit",
    ]);
    if blocked.is_err() {
        eprintln!("skipped: this kernel or ip cannot block UDP by rule (ip rule ... ipproto udp)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let options = Options {
        config: Some(format!(
            "{NO_EMBEDDED}[tls]\nmode = \"auto\"\nnames = [\"{}\"]\n[auth]\nenabled = true\nanonymous_roles = [\"execute\", \"cache-read\", \"cache-write\", \"admin\"]\n",
            net.addr(0)
        )),
        listen: Some(format!("{}:0", net.addr(0))),
        netns: Some(net.ns(0)),
        ..Options::on(Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&data, options).await;
    let ca = data.join("tls/ca.pem");
    // b takes QUIC only (every fetch waits for the handshake, none goes over TCP); a and c
    // both.
    let both = "peer_transport = \"both\"\npeer_race_delay_ms = 60000\npeer_quic_connect_timeout_ms = 2000\n";
    let only = "peer_transport = \"quic\"\npeer_race_delay_ms = 60000\n";
    let mut hosts = Vec::new();
    for (i, name, config) in [(1, "a", both), (2, "b", only), (3, "c", both)] {
        let token = kiln.join_token(&data);
        hosts.push(worker(&net, i, &kiln, dir.path(), name, config, Some(token)).await);
    }
    let (admin_a, admin_b, admin_c) = (hosts[0].1.clone(), hosts[1].1.clone(), hosts[2].1.clone());
    let ch = kiln.tls_channel(&ca, None).await.unwrap();
    // The blobs the scheduler knows a holds.
    let held_by_a = || kiln.metric_over_tls(&ca, &["kiln_worker_held_blobs{worker=\"a\"} "]);
    let run = |tree: Tree, host: &'static str, salt: &'static str| {
        let ch = ch.clone();
        async move {
            let (_, r) = execute(
                &ch,
                F,
                &spec(&tree, &[("host", host)], salt).upload(&ch, F).await,
                false,
            )
            .await
            .unwrap();
            assert_eq!((code(&r), worker_of(&r).as_str()), (0, host), "{r:?}");
        }
    };
    let from = |admin: String, source: &'static str| async move {
        number(
            &admin,
            &format!("kiln_worker_fetch_bytes_total{{source=\"{source}\"}}"),
        )
        .await
    };

    let quic_bytes = |admin: String| async move {
        number(&admin, "kiln_worker_fetch_quic_bytes_total").await as u64
    };
    // Each set of inputs runs on a first, then on b and on c, which fetch it from their
    // peers: b over QUIC, c (which sends no UDP) over TCP throughout, before and after its
    // QUIC handshakes time out.
    for (set, salt) in [(1, "one"), (2, "two")] {
        let (tree, bytes) = inputs(set);
        let known = held_by_a().await;
        run(tree.clone(), "a", salt).await;
        common::eventually("a's report of the new inputs", || async {
            (held_by_a().await >= known + 4.0).then_some(())
        })
        .await;
        let (b_before, b_quic) = (
            from(admin_b.clone(), "peer").await as u64,
            quic_bytes(admin_b.clone()).await,
        );
        run(tree.clone(), "b", salt).await;
        assert_eq!(
            from(admin_b.clone(), "peer").await as u64 - b_before,
            bytes,
            "b from its peers"
        );
        assert_eq!(
            quic_bytes(admin_b.clone()).await - b_quic,
            bytes,
            "b over QUIC"
        );
        let c_before = from(admin_c.clone(), "peer").await as u64;
        run(tree, "c", salt).await;
        assert_eq!(
            from(admin_c.clone(), "peer").await as u64 - c_before,
            bytes,
            "c over TCP"
        );
    }
    assert!(number(&admin_a, "kiln_worker_served_bytes_total").await > 0.0);
    assert_eq!(
        quic_bytes(admin_c.clone()).await,
        0,
        "nothing over QUIC to c"
    );
    assert_eq!(
        number(&admin_c, "kiln_worker_peer_failures_total").await,
        0.0
    );
    kiln.stop().await;
}
