//! The Remote Asset API (`build.bazel.remote.asset.v1`), through the [`Cas`] trait. `Fetch`
//! answers from associations it remembers (URI and selecting qualifiers to a digest, fetched
//! or pushed) while their content is still in the CAS, and otherwise downloads blobs from
//! `http(s)` URLs ([`download`]) into the CAS, checked against `checksum.sri`; a directory is a
//! tar or tar.gz unpacked into the CAS as a tree ([`unpack`]). `Push` records associations for
//! content already in the CAS (zips and repositories must be pushed: Kiln unpacks neither).
//! Associations live in memory (bounded); after a restart a fetch goes to origin again.

mod attempt;
mod download;
mod error;
mod fetch;
mod grpc;
mod push;
mod qualifiers;
mod redirect;
mod remember;
mod unpack;

pub use error::AssetError;
pub use qualifiers::{QualifierError, Qualifiers, Sri};

use kiln_dataplane::store::layout::Layout;
use kiln_proto::asset::Qualifier;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{Digest, InstanceName};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct AssetSettings {
    /// `remote_asset.enabled`.
    pub enabled: bool,
    /// `remote_asset.fetch_from_origin`.
    pub fetch_from_origin: bool,
    /// `remote_asset.default_fetch_secs`.
    pub default_timeout: Duration,
    /// `remote_asset.max_fetch_secs`.
    pub max_timeout: Duration,
    /// `remote_asset.max_fetch_bytes`.
    pub max_bytes: u64,
    /// `remote_asset.max_redirects`.
    pub max_redirects: u32,
    /// `remote_asset.concurrent_fetches`.
    pub concurrent_fetches: usize,
    /// `remote_asset.memory_bytes`: what remembered associations may take.
    pub memory_bytes: u64,
    /// `remote_asset.fetch_loopback`.
    pub fetch_loopback: bool,
    /// `remote_asset.fetch_private_networks`.
    pub fetch_private_networks: bool,
    /// `remote_asset.proxy`, parsed.
    pub proxy: Option<ureq::Proxy>,
    /// The CAS's layout: downloads go to its temp directories, so they are linked in.
    pub layout: Layout,
}

/// Blob or directory: the two namespaces of associations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Blob,
    Directory,
}

/// What an association is remembered under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    instance: InstanceName,
    kind: Kind,
    uri: String,
    /// The selecting qualifiers, by name.
    selectors: Vec<(String, String)>,
    /// For a fetch that sent headers: what they come to ([`credentials`]). Such an
    /// association answers only a fetch that sends the same headers; one made without any
    /// (a public download, a push) answers every fetch.
    credentials: Option<[u8; 32]>,
}

/// What the headers sent for a URL (its credentials, as often as not) come to in an
/// association's key: nothing when there are none, else a SHA-256 of them (never the values
/// themselves, which then need not be kept).
fn credentials(headers: &[(String, String)]) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    if headers.is_empty() {
        return None;
    }
    let mut sorted: Vec<(String, &str)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.as_str()))
        .collect();
    sorted.sort();
    let mut h = sha2::Sha256::new();
    h.update(b"kiln remote asset credentials\0");
    for (name, value) in sorted {
        for part in [name.as_bytes(), value.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Some(h.finalize().into())
}

/// What a URI (with its selecting qualifiers) stands for.
#[derive(Debug, Clone)]
struct Association {
    digest: Digest,
    /// When it was fetched or pushed.
    at: SystemTime,
    /// A pushed association's own expiry.
    expires: Option<SystemTime>,
    /// Checksums it is known to match (verified when fetched, trusted when pushed).
    sri: Vec<Sri>,
    /// Recorded by a `Push` (whose caller vouches for it), not by a download.
    pushed: bool,
}

/// The fields a `FetchBlobRequest` and a `FetchDirectoryRequest` share.
struct FetchArgs {
    instance_name: String,
    timeout: Option<prost_types::Duration>,
    oldest: Option<prost_types::Timestamp>,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    digest_function: i32,
}

/// What a fetch found: the URI and digest, or the URI and why not.
type Outcome = Result<(String, Digest), (String, RpcStatus)>;

/// The service (a handle: clones share everything).
#[derive(Clone)]
pub struct AssetService {
    cas: Arc<dyn Cas>,
    settings: AssetSettings,
    known: moka::future::Cache<Key, Association>,
    fetches: Arc<Semaphore>,
    /// Turns for checking that a remembered directory's tree is still stored.
    tree_checks: Arc<Semaphore>,
    /// Downloads in progress, shared by identical fetches ([`attempt`]).
    attempts: Arc<
        std::sync::Mutex<std::collections::HashMap<attempt::AttemptKey, attempt::SharedAttempt>>,
    >,
}

/// Most URIs in one request, and the longest URI and qualifiers: an association is kept per
/// URI, under its text and its qualifiers.
const MAX_URIS: usize = 64;
const MAX_URI_BYTES: usize = 8 << 10;
const MAX_QUALIFIER_BYTES: usize = 8 << 10;
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Remembered directories' trees checked at once (a walk holds the tree's digests).
const TREE_CHECKS: usize = 2;

impl AssetService {
    /// A service over `cas`.
    pub fn new(cas: Arc<dyn Cas>, settings: AssetSettings) -> AssetService {
        AssetService {
            cas,
            known: moka::future::Cache::builder()
                .max_capacity(settings.memory_bytes)
                .weigher(|k: &Key, a: &Association| {
                    let selectors: usize = k.selectors.iter().map(|(n, v)| n.len() + v.len()).sum();
                    let sri: usize = a.sri.iter().map(|s| s.hash.len() + 32).sum();
                    let bytes = k.uri.len() + selectors + sri + k.instance.as_str().len() + 256;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
            fetches: Arc::new(Semaphore::new(settings.concurrent_fetches.max(1))),
            attempts: Default::default(),
            tree_checks: Arc::new(Semaphore::new(TREE_CHECKS)),
            settings,
        }
    }
}

/// `remote_asset.proxy` parsed (empty: none): an `http://` or `https://` proxy (ureq tunnels
/// through it with `CONNECT`). A bad one stops the start, named without the URL itself, which
/// may carry a password.
pub fn proxy(configured: &str) -> std::io::Result<Option<ureq::Proxy>> {
    if configured.is_empty() {
        return Ok(None);
    }
    let bad = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("remote_asset.proxy: {why}"),
        )
    };
    let scheme = configured.split("://").next().unwrap_or("");
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad("only http:// and https:// proxies are supported".into()));
    }
    ureq::Proxy::new(configured)
        .map(Some)
        .map_err(|e| bad(format!("not a usable proxy URL ({e})")))
}

/// Refuses requests without URIs, with too many, or with URIs or qualifiers too long to
/// remember.
fn check_sizes(uris: &[String], qualifiers: &[Qualifier]) -> Result<(), AssetError> {
    if uris.is_empty() {
        return Err(AssetError::NoUris);
    }
    if uris.len() > MAX_URIS {
        return Err(AssetError::TooLong(format!(
            "{} URIs; at most {MAX_URIS}",
            uris.len()
        )));
    }
    if let Some(u) = uris.iter().find(|u| u.len() > MAX_URI_BYTES) {
        return Err(AssetError::TooLong(format!(
            "a URI of {} bytes; at most {MAX_URI_BYTES}",
            u.len()
        )));
    }
    // Headers are sent, not remembered (only a hash of them is): they have their own,
    // larger bound, so that tokens for several mirrors fit.
    let (mut headers, mut kept) = (0usize, 0usize);
    for q in qualifiers {
        let n = q.name.len() + q.value.len();
        if qualifiers::is_header(&q.name) {
            headers += n;
        } else {
            kept += n;
        }
    }
    if kept > MAX_QUALIFIER_BYTES {
        return Err(AssetError::TooLong(format!(
            "{kept} bytes of qualifiers other than headers; at most {MAX_QUALIFIER_BYTES}"
        )));
    }
    if headers > MAX_HEADER_BYTES {
        return Err(AssetError::TooLong(format!(
            "{headers} bytes of header qualifiers; at most {MAX_HEADER_BYTES}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_proxy_is_parsed_and_a_bad_one_named() {
        assert!(proxy("").unwrap().is_none());
        assert!(proxy("http://127.0.0.1:3128").unwrap().is_some());
        assert!(proxy("https://user:secret@proxy.example:3128")
            .unwrap()
            .is_some());
        for bad in [
            "socks5://proxy.example:1080",
            "gopher://proxy.example:70",
            "http://user:secret@",
        ] {
            let err = proxy(bad).unwrap_err().to_string();
            assert!(err.contains("remote_asset.proxy"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    /// Headers have a bound of their own: tokens for several mirrors fit, where the
    /// qualifiers that are remembered stay within 8 KiB.
    #[test]
    fn headers_and_remembered_qualifiers_are_bounded_apart() {
        let q = |name: &str, len: usize| Qualifier {
            name: name.into(),
            value: "v".repeat(len),
        };
        let uris = ["https://a/x".to_string()];
        let tokens: Vec<Qualifier> = (0..5)
            .map(|i| q(&format!("http_header_url:{i}:Authorization"), 3000))
            .collect();
        assert!(check_sizes(&uris, &tokens).is_ok(), "15 KB of tokens");
        let err = check_sizes(&uris, &[q("resource_type", 9000)]).unwrap_err();
        assert!(err.to_string().contains("other than headers"), "{err}");
        let err = check_sizes(&uris, &[q("bazel.auth_headers", 70_000)]).unwrap_err();
        assert!(err.to_string().contains("header qualifiers"), "{err}");
    }

    #[test]
    fn credentials_are_the_headers_whatever_their_order_and_case() {
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(credentials(&[]), None);
        let one = credentials(&h(&[("Authorization", "Bearer a"), ("X-Key", "k")]));
        assert!(one.is_some());
        assert_eq!(
            one,
            credentials(&h(&[("x-key", "k"), ("authorization", "Bearer a")]))
        );
        for other in [
            h(&[("Authorization", "Bearer b"), ("X-Key", "k")]),
            h(&[("Authorization", "Bearer a")]),
            // Where one value ends and the next begins is part of what is hashed.
            h(&[("Authorization", "Bearer aX-Keyk")]),
        ] {
            assert_ne!(one, credentials(&other), "{other:?}");
        }
    }
}
