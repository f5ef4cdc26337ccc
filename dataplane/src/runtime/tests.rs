//! The same checks on every backend: files with owned buffers, listeners and connections with
//! vectored writes, timers, spawning, and stopping a listener. Each runs inside a real shard
//! thread started by the backend.

use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn backends() -> Vec<Arc<dyn Backend>> {
    kiln_config::RuntimeKind::available()
        .iter()
        .map(|k| backend_for(*k))
        .collect()
}

/// Runs `check` on a shard of every backend; panics with the backend's name on failure.
fn on_every_backend<F>(check: F)
where
    F: Fn(Rc<dyn Runtime>) -> LocalBoxFuture<'static, Result<(), String>>
        + Send
        + Sync
        + Clone
        + 'static,
{
    for backend in backends() {
        let check = check.clone();
        let name = backend.name();
        let result = on_shard(&*backend, &format!("test-{name}"), check);
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[test]
fn files_round_trip_with_owned_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    on_every_backend(move |rt| {
        let base = base.clone();
        Box::pin(async move {
            let path = base.join(rt.name());
            let file = rt.create_new(&path).await.map_err(err)?;
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            file.write_all_at(data[..1_000_000].to_vec(), 0)
                .await
                .map_err(err)?;
            file.write_all_at(data[1_000_000..].to_vec(), 1_000_000)
                .await
                .map_err(err)?;
            file.sync_data().await.map_err(err)?;
            file.close().await.map_err(err)?;
            if rt.create_new(&path).await.is_ok() {
                return Err("create_new must refuse an existing file".into());
            }
            let file = rt.open_read(&path).await.map_err(err)?;
            let middle = file.read_at(999_990, 20).await.map_err(err)?;
            if middle[..] != data[999_990..1_000_010] {
                return Err("read across the write boundary differs".into());
            }
            let tail = file.read_at(2_999_990, 100).await.map_err(err)?;
            if tail.len() != 10 {
                return Err(format!("short read at end of file: {} bytes", tail.len()));
            }
            file.close().await.map_err(err)?;
            let file = rt.open_read_write(&path).await.map_err(err)?;
            file.write_all_at(vec![7; 4], 0).await.map_err(err)?;
            let head = file.read_at(0, 5).await.map_err(err)?;
            if head[..] != [7, 7, 7, 7, data[4]] {
                return Err(format!("rewrite not visible: {head:?}"));
            }
            file.close().await.map_err(err)?;
            rt.sync_dir(&base).await.map_err(err)?;
            if rt.open_read(&base.join("missing")).await.is_ok() {
                return Err("opening a missing file must fail".into());
            }
            rt.remove_file(&path).await.map_err(err)?;
            if path.exists() {
                return Err("remove_file left the file".into());
            }
            match rt.remove_file(&path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => return Err(format!("removing a missing file: {other:?}")),
            }
            Ok(())
        })
    });
}

#[test]
fn sockets_timers_spawn_and_stop() {
    on_every_backend(|rt| {
        Box::pin(async move {
            let sockets =
                bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 1, 16).map_err(err)?;
            let addr = sockets[0].local_addr().map_err(err)?;
            let listener = rt
                .listener(sockets.into_iter().next().ok_or("no socket")?)
                .map_err(err)?;
            let (done_tx, done_rx) = futures::channel::oneshot::channel();
            let rt2 = rt.clone();
            rt.spawn(Box::pin(async move {
                let result = async {
                    let mut client = rt2.connect(addr).await.map_err(err)?;
                    let parts = [
                        std::io::IoSlice::new(b"hello "),
                        std::io::IoSlice::new(b"shard"),
                    ];
                    let sent = futures::future::poll_fn(|cx| {
                        Pin::new(&mut client).poll_write_vectored(cx, &parts[..])
                    })
                    .await
                    .map_err(err)?;
                    client
                        .write_all(&b"hello shard"[sent..])
                        .await
                        .map_err(err)?;
                    client.flush().await.map_err(err)?;
                    let mut reply = [0u8; 2];
                    client.read_exact(&mut reply).await.map_err(err)?;
                    Ok::<_, String>(reply)
                }
                .await;
                let _ = done_tx.send(result);
            }));
            let (mut server, _) = listener.accept().await.map_err(err)?;
            let mut got = [0u8; 11];
            server.read_exact(&mut got).await.map_err(err)?;
            if &got != b"hello shard" {
                return Err(format!("got {got:?}"));
            }
            server.write_all(b"ok").await.map_err(err)?;
            server.flush().await.map_err(err)?;
            let reply = done_rx.await.map_err(err)??;
            if &reply != b"ok" {
                return Err("no reply".into());
            }
            let before = rt.now();
            rt.sleep(Duration::from_millis(20)).await;
            if rt.now().duration_since(before) < Duration::from_millis(20) {
                return Err("sleep returned early".into());
            }
            listener.stop();
            if std::net::TcpStream::connect(addr).is_ok() {
                return Err("connection accepted after stop".into());
            }
            Ok(())
        })
    });
}
