//! Binding one listening socket per shard on the same address with SO_REUSEPORT.

use std::io;
use std::net::{SocketAddr, TcpListener};

/// Binds `count` sockets to `addr` with SO_REUSEPORT, so the kernel spreads connections across
/// shards. Port 0 picks a free port once and binds every socket to it.
///
/// SO_REUSEPORT would also let a second Kiln of the same user silently share a port that is
/// already serving; a plain bind first makes that an "address in use" error instead.
pub fn bind_reuseport_group(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> io::Result<Vec<TcpListener>> {
    let addr = {
        let probe = std::net::TcpListener::bind(addr)?;
        probe.local_addr()?
    };
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let domain = if addr.is_ipv6() {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        let socket =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        sockets.push(socket.into());
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_shares_one_port_and_refuses_a_busy_one() {
        let group = bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 3, 128).unwrap();
        let ports: Vec<u16> = group
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
        let busy = group[0].local_addr().unwrap();
        let err = bind_reuseport_group(busy, 2, 128).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
