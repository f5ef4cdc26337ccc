//! One download from origin, blocking (run on tokio's blocking pool): the body streamed into a
//! new file while it is hashed with the request's digest function and every SRI algorithm
//! asked for, bounded in time (the whole download, redirects included), in bytes and in
//! redirects. Every host it connects to, redirects included, is checked by address after it is
//! resolved ([`Guarded`]): link-local addresses (cloud metadata services among them) never,
//! loopback and private networks as configured. Redirects are followed here, one hop at a
//! time, and the request's headers go only to its URL's own origin ([`super::redirect`]).
//! The proxy environment is ignored (a proxy would resolve the hosts the guard must see);
//! `remote_asset.proxy` names one explicitly. Only a `200 OK` body is stored. Its failures
//! are what the response's `status` carries.

use super::qualifiers::{Sri, SriAlgorithm};
use super::redirect;
use kiln_reapi::digest::{Digest, DigestFunction, Hasher};
use kiln_reapi::status::{Classify, ErrorKind};
use sha2::Digest as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// What to download and the bounds.
#[derive(Debug, Clone)]
pub struct Download {
    /// The URL.
    pub url: String,
    /// Headers to send.
    pub headers: Vec<(String, String)>,
    /// The whole download's time.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Redirects followed.
    pub max_redirects: u32,
    /// The digest function of the result.
    pub function: DigestFunction,
    /// Checksums one of which must validate (none: any content).
    pub sri: Vec<Sri>,
    /// The new file the body goes to.
    pub dest: PathBuf,
    /// Whether loopback addresses may be fetched from.
    pub fetch_loopback: bool,
    /// Whether private networks (RFC 1918, unique-local) may be fetched from.
    pub fetch_private_networks: bool,
    /// The proxy every request goes through (`remote_asset.proxy`), if any.
    pub proxy: Option<ureq::Proxy>,
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The body's digest.
    pub digest: Digest,
    /// The checksums asked for that it matched.
    pub sri_ok: Vec<Sri>,
}

/// Why a download failed: outside the server's control, so it goes in the response.
#[derive(Debug, thiserror::Error)]
pub enum FetchFailure {
    /// The origin answered with a status other than 200.
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// The URL, or a redirect, leads to an address the server may not fetch from.
    #[error("fetching {url}: {why}")]
    Disallowed { url: String, why: String },
    /// The download took longer than its timeout.
    #[error("fetching {url} took longer than {secs} s")]
    Timeout { url: String, secs: u64 },
    /// More redirects than allowed.
    #[error("fetching {url} was redirected more than {max} times")]
    Redirects { url: String, max: u32 },
    /// The body is larger than allowed.
    #[error("{url} is larger than remote_asset.max_fetch_bytes ({max} bytes)")]
    TooLarge { url: String, max: u64 },
    /// No checksum validated.
    #[error("{url} does not match checksum.sri: it is {actual}")]
    Checksum { url: String, actual: String },
    /// The origin could not be reached or the transfer broke.
    #[error("fetching {url}: {why}")]
    Transport { url: String, why: String },
    /// Writing the download failed here.
    #[error("storing the download of {url}: {source}")]
    Local {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for FetchFailure {
    fn kind(&self) -> ErrorKind {
        match self {
            FetchFailure::Status { status, .. } => match status {
                401 | 403 => ErrorKind::Denied,
                404 | 410 => ErrorKind::Missing,
                408 | 429 | 500..=599 => ErrorKind::Unavailable,
                _ => ErrorKind::Missing,
            },
            FetchFailure::Disallowed { .. } => ErrorKind::Denied,
            FetchFailure::Timeout { .. } => ErrorKind::TimedOut,
            // A consistency check that failed: the spec's `ABORTED`.
            FetchFailure::Redirects { .. } | FetchFailure::Checksum { .. } => ErrorKind::Conflict,
            FetchFailure::TooLarge { .. } => ErrorKind::Exhausted,
            FetchFailure::Transport { .. } => ErrorKind::Unavailable,
            FetchFailure::Local { source, .. } => ErrorKind::of_io(source),
        }
    }
}

/// Runs `d`: blocking.
pub fn download(d: &Download) -> Result<Downloaded, FetchFailure> {
    let url = || d.url.clone();
    let deadline = std::time::Instant::now() + d.timeout;
    // Redirects come back as responses: followed below.
    let config = ureq::Agent::config_builder()
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(true)
        .proxy(d.proxy.clone())
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build();
    let guard = Guarded {
        inner: DefaultResolver::default(),
        loopback: d.fetch_loopback,
        private: d.fetch_private_networks,
    };
    let agent = ureq::Agent::with_parts(config, DefaultConnector::new(), guard);
    let failed = |e: ureq::Error| match e {
        ureq::Error::StatusCode(status) => FetchFailure::Status { url: url(), status },
        ureq::Error::Timeout(_) => FetchFailure::Timeout {
            url: url(),
            secs: d.timeout.as_secs(),
        },
        ureq::Error::TooManyRedirects => FetchFailure::Redirects {
            url: url(),
            max: d.max_redirects,
        },
        ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => FetchFailure::Timeout {
            url: url(),
            secs: d.timeout.as_secs(),
        },
        ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            FetchFailure::Disallowed {
                url: url(),
                why: e.to_string(),
            }
        }
        other => FetchFailure::Transport {
            url: url(),
            why: other.to_string(),
        },
    };
    let timed_out = || FetchFailure::Timeout {
        url: url(),
        secs: d.timeout.as_secs(),
    };
    let mut at = d.url.clone();
    let mut redirects = 0;
    let response = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let mut request = agent.get(&at).config().timeout_global(Some(left)).build();
        if redirect::same_origin(&at, &d.url) {
            for (name, value) in &d.headers {
                request = request.header(name, value);
            }
        }
        let response = request.call().map_err(failed)?;
        if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
            break response;
        }
        redirects += 1;
        if redirects > d.max_redirects {
            return Err(FetchFailure::Redirects {
                url: url(),
                max: d.max_redirects,
            });
        }
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| FetchFailure::Transport {
                url: url(),
                why: format!(
                    "{at} answered HTTP {} without a usable Location",
                    response.status().as_u16()
                ),
            })?;
        at = redirect::resolve(&at, location)
            .map_err(|why| FetchFailure::Transport { url: url(), why })?;
    };
    // A 204 or a 206 is not the content.
    if response.status() != 200 {
        return Err(FetchFailure::Status {
            url: url(),
            status: response.status().as_u16(),
        });
    }
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(u64::MAX)
        .reader();
    let local = |source| FetchFailure::Local { url: url(), source };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&d.dest)
        .map_err(local)?;
    let mut hasher = Hasher::new(d.function);
    let mut sri = SriHashers::for_(&d.sri);
    // A SHA-256 checksum of a SHA-256 download is its digest: hashed once.
    let sha256_is_digest = d.function == DigestFunction::Sha256 && sri.sha256.take().is_some();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // ureq wraps its own errors (a timeout while reading) in io::Error.
            Err(e) => return Err(failed(ureq::Error::from(e))),
        };
        total += n as u64;
        if total > d.max_bytes {
            return Err(FetchFailure::TooLarge {
                url: url(),
                max: d.max_bytes,
            });
        }
        hasher.update(&buf[..n]);
        sri.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(local)?;
    }
    // Made durable when stored (`Cas::write_file` syncs as `storage.fsync` says).
    let hash = hasher.finalize();
    let mut computed = sri.finish();
    if sha256_is_digest {
        computed.push(Sri {
            algorithm: SriAlgorithm::Sha256,
            hash: hash.to_vec(),
        });
    }
    let sri_ok: Vec<Sri> = d
        .sri
        .iter()
        .filter(|s| computed.contains(s))
        .cloned()
        .collect();
    if !d.sri.is_empty() && sri_ok.is_empty() {
        let actual = computed
            .iter()
            .map(Sri::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        return Err(FetchFailure::Checksum { url: url(), actual });
    }
    Ok(Downloaded {
        digest: Digest {
            function: d.function,
            hash,
            size: total,
        },
        sri_ok,
    })
}

/// The system's resolver, refusing addresses the server may not fetch from: checked on every
/// connection ureq makes, redirects included, with the addresses it then connects to.
#[derive(Debug)]
struct Guarded {
    inner: DefaultResolver,
    loopback: bool,
    private: bool,
}

/// Cloud metadata services outside link-local space: Alibaba Cloud's (in the shared address
/// space) and AWS's IPv6 one (a unique-local address).
const METADATA: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// The IPv4 address an IPv6 one stands for: IPv4-mapped (`::ffff:a.b.c.d`), or reached
/// through a NAT64 gateway (`64:ff9b::a.b.c.d`, RFC 6052) or a 6to4 relay (`2002:AABB:CCDD::`),
/// which would take a request on to that address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(v4(s[6], s[7]));
    }
    (s[0] == 0x2002).then(|| v4(s[1], s[2]))
}

impl Guarded {
    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if METADATA.contains(&ip) {
            return false;
        }
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, ..] = v4.octets();
                let never = v4.is_link_local()
                    || v4.is_unspecified()
                    || v4.is_broadcast()
                    || v4.is_multicast()
                    || a == 0
                    // Reserved (240.0.0.0/4) and benchmarking (198.18.0.0/15).
                    || a >= 240
                    || (a == 198 && b & 0xfe == 18);
                // The shared address space (100.64.0.0/10: carrier NAT, Tailscale) is as
                // private as RFC 1918's.
                let private = v4.is_private() || (a == 100 && b & 0xc0 == 64);
                !never && (self.loopback || !v4.is_loopback()) && (self.private || !private)
            }
            IpAddr::V6(v6) => {
                let segment = v6.segments()[0];
                let link_local = segment & 0xffc0 == 0xfe80;
                let unique_local = segment & 0xfe00 == 0xfc00;
                let never = link_local || v6.is_unspecified() || v6.is_multicast();
                !never && (self.loopback || !v6.is_loopback()) && (self.private || !unique_local)
            }
        }
    }
}

impl Resolver for Guarded {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let found = self.inner.resolve(uri, config, timeout)?;
        let mut kept = self.empty();
        for addr in found.iter() {
            if self.allowed(addr.ip()) {
                kept.push(*addr);
            }
        }
        if kept.is_empty() {
            let host = uri.host().unwrap_or("");
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{host} resolves only to addresses this server does not fetch from (link-local; loopback and private networks as remote_asset.fetch_loopback and fetch_private_networks say)"),
            )));
        }
        Ok(kept)
    }
}

/// One hasher per SRI algorithm asked for.
#[derive(Default)]
pub struct SriHashers {
    sha256: Option<sha2::Sha256>,
    sha384: Option<sha2::Sha384>,
    sha512: Option<sha2::Sha512>,
}

impl SriHashers {
    /// Hashers for the algorithms of `sri`.
    pub fn for_(sri: &[Sri]) -> SriHashers {
        let has = |a| sri.iter().any(|s| s.algorithm == a);
        SriHashers {
            sha256: has(SriAlgorithm::Sha256).then(sha2::Sha256::new),
            sha384: has(SriAlgorithm::Sha384).then(sha2::Sha384::new),
            sha512: has(SriAlgorithm::Sha512).then(sha2::Sha512::new),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.sha256 {
            h.update(data);
        }
        if let Some(h) = &mut self.sha384 {
            h.update(data);
        }
        if let Some(h) = &mut self.sha512 {
            h.update(data);
        }
    }

    /// The checksums of what was fed.
    pub fn finish(self) -> Vec<Sri> {
        let mut out = Vec::new();
        if let Some(h) = self.sha256 {
            out.push(Sri {
                algorithm: SriAlgorithm::Sha256,
                hash: h.finalize().to_vec(),
            });
        }
        if let Some(h) = self.sha384 {
            out.push(Sri {
                algorithm: SriAlgorithm::Sha384,
                hash: h.finalize().to_vec(),
            });
        }
        if let Some(h) = self.sha512 {
            out.push(Sri {
                algorithm: SriAlgorithm::Sha512,
                hash: h.finalize().to_vec(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_refused_as_configured() {
        let guard = |loopback, private| Guarded {
            inner: DefaultResolver::default(),
            loopback,
            private,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let default = guard(false, true);
        let strict = guard(false, false);
        let open = guard(true, true);
        for never in [
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "::ffff:169.254.169.254",
            "100.100.100.200",
            "fd00:ec2::254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            for g in [&default, &strict, &open] {
                assert!(!g.allowed(ip(never)), "{never}");
            }
        }
        for loopback in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"] {
            assert!(
                !default.allowed(ip(loopback)) && open.allowed(ip(loopback)),
                "{loopback}"
            );
        }
        for private in [
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.9",
            "fd00::1",
            "::ffff:10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "2002:c0a8:101::",
        ] {
            assert!(
                default.allowed(ip(private)) && !strict.allowed(ip(private)),
                "{private}"
            );
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "100.128.0.1",
            "198.20.0.1",
            "64:ff9b::5db8:d822",
        ] {
            assert!(strict.allowed(ip(public)), "{public}");
        }
    }
}
