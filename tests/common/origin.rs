//! An HTTP/1.1 origin on 127.0.0.1 for the Remote Asset tests, with fixed routes and ways to
//! misbehave (an answer that never comes, a body that drips, a redirect loop, a slow answer,
//! a login wall), and the archives those tests fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the test's HTTP server has been asked: path → requests, with their headers.
pub type Seen = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// An HTTP/1.1 server on 127.0.0.1 with fixed routes; stops when the test's runtime does.
pub async fn http_server(routes: HashMap<&'static str, Vec<u8>>) -> (String, Seen) {
    http_server_with(routes, HashMap::new()).await
}

/// [`http_server`] that also answers `302 Found` with a `Location` on the paths of `redirects`.
pub async fn http_server_with(
    routes: HashMap<&'static str, Vec<u8>>,
    redirects: HashMap<&'static str, String>,
) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let routes = Arc::new(routes);
    let redirects = Arc::new(redirects);
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (routes, redirects, log) = (routes.clone(), redirects.clone(), log.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                log.lock()
                    .unwrap()
                    .entry(path.clone())
                    .or_default()
                    .push(head.clone());
                let reply = |status: &str, extra: &str, body: &[u8]| {
                    let mut r = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                };
                let response = match path.as_str() {
                    "/hang" => {
                        // Never answers: the fetch's timeout must end it.
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                        return;
                    }
                    "/loop" => reply("302 Found", "location: /loop\r\n", b""),
                    "/drip" => {
                        // Headers at once, then a byte every half second: the timeout must
                        // cut the body off too.
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n";
                        if socket.write_all(head).await.is_err() {
                            return;
                        }
                        for _ in 0..1000 {
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            if socket.write_all(b"x").await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    p if p.starts_with("/slow/") || p.starts_with("/slower/") => {
                        // A second (three for /slower/) before the answer: long enough for
                        // others to ask too, or for a fetch of a second's timeout to give up.
                        let secs = if p.starts_with("/slow/") { 1 } else { 3 };
                        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
                        match routes.get(p) {
                            Some(body) => reply("200 OK", "", body),
                            None => reply("404 Not Found", "", b""),
                        }
                    }
                    "/private" if !head.contains("authorization: bearer sesame") => {
                        reply("401 Unauthorized", "", b"")
                    }
                    p if redirects.contains_key(p) => {
                        reply("302 Found", &format!("location: {}\r\n", redirects[p]), b"")
                    }
                    p => match routes.get(p) {
                        Some(body) => reply("200 OK", "", body),
                        None => reply("404 Not Found", "", b""),
                    },
                };
                let _ = socket.write_all(&response).await;
            });
        }
    });
    (base, seen)
}

/// A small source tree as a tar.gz: `README`, `src/main.rs`, `src/run.sh` (executable),
/// `src/lib/mod.rs`.
pub fn repo_tar_gz() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in [
        ("README", 0o644, &b"hello\n"[..]),
        ("src/main.rs", 0o644, b"fn main() {}\n"),
        ("src/run.sh", 0o755, b"#!/bin/sh\n"),
        ("src/lib/mod.rs", 0o644, b"pub fn f() {}\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// A tar.gz in two gzip members (as `cat a.gz b.gz` or BGZF makes): the whole tar.
pub fn two_member_tar_gz() -> Vec<u8> {
    let whole = repo_tar_gz();
    let tar = {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&whole[..]), &mut out)
            .unwrap();
        out
    };
    let (a, b) = tar.split_at(tar.len() / 2);
    let mut out = Vec::new();
    for part in [a, b] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, part).unwrap();
        out.extend(gz.finish().unwrap());
    }
    out
}
