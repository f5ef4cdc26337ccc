//! `tcp`: raw loopback TCP, for scale — how fast this machine moves bytes between two
//! sockets with no protocol at all. Each operation sends `--size` bytes over one of
//! `--connections` connections to an in-process sink, which acknowledges once it has read
//! them all.

use crate::load::Workload;
use crate::stats::Sample;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

struct TcpLoad {
    connections: Vec<Mutex<TcpStream>>,
    size: crate::size::SizeSpec,
    buffer: bytes::Bytes,
}

/// Starts the sink and connects to it.
pub async fn prepare(
    connections: usize,
    size: crate::size::SizeSpec,
) -> anyhow::Result<Arc<dyn Workload>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let Ok(len) = s.read_u64().await else { return };
                    let mut left = len;
                    while left > 0 {
                        let want = left.min(buf.len() as u64) as usize;
                        match s.read(&mut buf[..want]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => left -= n as u64,
                        }
                    }
                    if s.write_u8(1).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut conns = Vec::new();
    for _ in 0..connections.max(1) {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(Mutex::new(s));
    }
    Ok(Arc::new(TcpLoad {
        connections: conns,
        size,
        buffer: bytes::Bytes::from(vec![0x5au8; 1 << 20]),
    }))
}

impl Workload for TcpLoad {
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
        Box::pin(async move {
            let size = self.size.sample(index);
            let conn = &self.connections[index as usize % self.connections.len()];
            let mut s = conn.lock().await;
            let start = Instant::now();
            let result = async {
                s.write_u64(size).await?;
                let mut left = size;
                while left > 0 {
                    let n = left.min(self.buffer.len() as u64) as usize;
                    s.write_all(&self.buffer[..n]).await?;
                    left -= n as u64;
                }
                s.read_u8().await
            }
            .await;
            let latency = start.elapsed();
            vec![match result {
                Ok(_) => Sample::ok("tcp", latency, size),
                Err(e) => {
                    Sample::failed("tcp", latency, format!("IO_{:?}", e.kind()).to_uppercase())
                }
            }]
        })
    }
}
