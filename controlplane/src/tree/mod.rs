//! `GetTree`, in the control plane: a tree's directories walked breadth first through the CAS
//! ([`listing`]), streamed in pages that resume from tokens ([`token`]), written from the
//! bytes the CAS holds ([`raw`]). Whole trees are cached (bounded by bytes, with a time to
//! live) and concurrent calls for one tree share one walk. Every listing alive (walking,
//! cached, or held by a response a client is still reading) holds its bytes of one memory
//! budget, so `GetTree` never holds more than the budget however many calls there are.

pub mod listing;
pub mod raw;
pub mod subtrees;
pub mod token;

use crate::metrics::ControlMetrics;
use kiln_proto::reapi::GetTreeRequest;
use kiln_reapi::cas::{Cas, CasError};
use kiln_reapi::digest::{Digest, DigestError, InstanceName, InstanceNameError};
use kiln_reapi::status::{Classify, ErrorKind};
use kiln_reapi::walk::WalkError;
use listing::Listing;
use raw::{PageStream, RawPage};
use std::sync::Arc;
use std::time::Duration;
use token::{PageToken, TokenError};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Most directories in one page, whatever the client asks.
pub const MAX_PAGE: usize = 10_000;
/// Most bytes of directories in one page (at least one directory): under the 4 MiB that
/// gRPC clients accept by default (and under `server.max_message_bytes`, see
/// [`TreeSettings::page_bytes`]).
pub const PAGE_BYTES: usize = 2 << 20;
/// Walks that may run at once, each holding up to `get_tree.max_tree_bytes`.
pub const CONCURRENT_WALKS: u64 = 2;

/// Why a `GetTree` call failed.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The root is not in the CAS.
    #[error("the tree's root {0:?} is not in the CAS")]
    RootMissing(Digest),
    /// The tree's directories are over `get_tree.max_tree_bytes`.
    #[error("the tree under {root:?} has more than get_tree.max_tree_bytes ({max_bytes} bytes) of Directory messages")]
    TooLarge {
        /// The root.
        root: Digest,
        /// The limit.
        max_bytes: u64,
    },
    /// A directory is malformed.
    #[error("{0}")]
    Walk(#[from] WalkError),
    /// The page token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The root digest.
    #[error("root_digest: {0}")]
    Digest(#[from] DigestError),
    /// The instance name.
    #[error(transparent)]
    Instance(#[from] InstanceNameError),
    /// The CAS failed.
    #[error(transparent)]
    Cas(#[from] CasError),
}

impl Classify for TreeError {
    fn kind(&self) -> ErrorKind {
        match self {
            TreeError::RootMissing(_) => ErrorKind::Missing,
            TreeError::TooLarge { .. }
            | TreeError::Walk(_)
            | TreeError::Token(_)
            | TreeError::Digest(_)
            | TreeError::Instance(_) => ErrorKind::Invalid,
            TreeError::Cas(e) => e.kind(),
        }
    }

    fn client_message(&self) -> String {
        match self {
            TreeError::Cas(e) => e.client_message(),
            other => other.to_string(),
        }
    }
}

/// A walk's outcome as the cache holds it: only complete trees are kept (a directory
/// uploaded later must appear), so an incomplete one comes back as the "error" that every
/// call waiting on the same walk receives.
#[derive(Debug)]
enum Uncached {
    /// The walk found the tree with parts missing.
    Incomplete(Arc<Listing>),
    /// The walk failed.
    Failed(TreeError),
}

/// Settings of the service.
#[derive(Debug, Clone, Copy)]
pub struct TreeSettings {
    /// `get_tree.max_tree_bytes`.
    pub max_tree_bytes: u64,
    /// `get_tree.cache_bytes` (0: no cache, and no sharing of walks).
    pub cache_bytes: u64,
    /// `get_tree.cache_ttl_secs`.
    pub cache_ttl: Duration,
    /// `get_tree.subtree_cache_bytes` (0: no directories kept).
    pub subtree_cache_bytes: u64,
    /// Most bytes of directories in one page: [`PAGE_BYTES`], or less to stay 64 KiB under
    /// `server.max_message_bytes`.
    pub page_bytes: usize,
    /// Largest `Directory` served (each goes whole into one message): 64 KiB under
    /// `server.max_message_bytes`.
    pub max_directory_bytes: u64,
}

impl TreeSettings {
    /// The memory budget: what the cache may hold, and [`CONCURRENT_WALKS`] trees more.
    pub fn budget_bytes(&self) -> u64 {
        self.cache_bytes
            .saturating_add(self.max_tree_bytes.saturating_mul(CONCURRENT_WALKS))
    }
}

/// Bytes as whole KiB, the budget's unit (at least one).
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

type Key = (InstanceName, Digest);

/// The `GetTree` service.
pub struct TreeService {
    cas: Arc<dyn Cas>,
    settings: TreeSettings,
    cache: Option<moka::future::Cache<Key, Arc<Listing>>>,
    /// Directories kept by digest, for trees that share subtrees.
    subtrees: subtrees::Subtrees,
    /// The memory budget, in KiB: a walk takes `max_tree_bytes` of it and keeps what its
    /// listing holds for as long as anything holds the listing.
    budget: Arc<Semaphore>,
    metrics: Arc<ControlMetrics>,
}

impl TreeService {
    /// `GetTree` over `cas`.
    pub fn new(cas: Arc<dyn Cas>, settings: TreeSettings, metrics: Arc<ControlMetrics>) -> Self {
        let cache = (settings.cache_bytes > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(settings.cache_bytes.div_ceil(1024))
                // In KiB, so that a listing of any size weighs what it holds.
                .weigher(|_: &Key, l: &Arc<Listing>| kib(l.memory))
                .time_to_live(settings.cache_ttl)
                .build()
        });
        let budget = usize::try_from(settings.budget_bytes().div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        TreeService {
            cas,
            subtrees: subtrees::Subtrees::new(settings.subtree_cache_bytes, settings.cache_ttl),
            settings,
            cache,
            budget: Arc::new(Semaphore::new(budget)),
            metrics,
        }
    }

    /// Walks the tree, within the memory budget.
    async fn walk(&self, instance: &InstanceName, root: Digest) -> Result<Listing, TreeError> {
        let need = kib(self.settings.max_tree_bytes);
        let mut held = match self.budget.clone().try_acquire_many_owned(need) {
            Ok(permit) => Some(permit),
            Err(_) => {
                // Trees the cache evicted or let expire give their share back only once the
                // cache has done its housekeeping, which otherwise waits for later traffic.
                if let Some(cache) = &self.cache {
                    cache.run_pending_tasks().await;
                }
                // The budget is never closed.
                self.budget.clone().acquire_many_owned(need).await.ok()
            }
        };
        self.metrics.get_tree_walks.inc();
        let mut listing = listing::list(
            &*self.cas,
            &self.subtrees,
            instance,
            root,
            self.settings.max_tree_bytes,
            self.settings.max_directory_bytes,
        )
        .await?;
        self.metrics
            .get_tree_kept_directories
            .inc_by(listing.kept as u64);
        // Keep what the listing holds; the rest goes back now.
        listing._budget = held
            .as_mut()
            .and_then(|h| h.split(kib(listing.memory) as usize));
        Ok(listing)
    }

    /// The tree's listing: from the cache, from a walk another call is making of the same
    /// tree, or from a walk of this call's own.
    async fn listing(&self, instance: &InstanceName, root: Digest) -> Result<Arc<Listing>, Status> {
        let own_walk = || async {
            self.walk(instance, root)
                .await
                .map(Arc::new)
                .map_err(|e| log(&e).status())
        };
        let Some(cache) = &self.cache else {
            return own_walk().await;
        };
        let key = (instance.clone(), root);
        let mut led = false;
        // Callers run as tasks of their own (`cas_server.rs`), so a leading call is never
        // cancelled by its client.
        let walked = cache
            .try_get_with(key, async {
                led = true;
                match self.walk(instance, root).await {
                    Ok(l) if l.complete => Ok(Arc::new(l)),
                    Ok(l) => Err(Uncached::Incomplete(Arc::new(l))),
                    Err(e) => {
                        log(&e);
                        Err(Uncached::Failed(e))
                    }
                }
            })
            .await;
        match walked {
            Ok(listing) => Ok(listing),
            Err(e) => match &*e {
                Uncached::Incomplete(listing) => Ok(listing.clone()),
                // A call that waited on another's walk is not failed by that walk's passing
                // trouble (the CAS unavailable, a fault of the server's own): it walks itself.
                Uncached::Failed(e) if !led && passing(e) => own_walk().await,
                Uncached::Failed(e) => Err(e.status()),
            },
        }
    }

    /// Answers a `GetTree` call from a task of its own: a client that resets its stream does
    /// not cancel the walk it leads, which other calls for the same tree wait on (moka aborts
    /// the process once a key's leading calls have been cancelled 200 times in a row, and a
    /// cancelled walk is work thrown away).
    pub fn answer(
        service: &Arc<TreeService>,
        request: Request<GetTreeRequest>,
    ) -> impl std::future::Future<Output = Result<Response<PageStream>, Status>> + Send + 'static
    {
        let service = service.clone();
        let answer = tokio::spawn(async move { service.get_tree(request).await });
        async move {
            answer
                .await
                .unwrap_or_else(|e| Err(Status::internal(format!("GetTree failed: {e}"))))
        }
    }

    /// Answers a `GetTree` call: its pages, produced as the client reads them.
    pub async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<PageStream>, Status> {
        let instance = request.get_ref().instance_name.clone();
        crate::auth::check(&request, crate::auth::paths::GET_TREE, Some(&instance))?;
        self.metrics.get_tree_calls.inc();
        let request = request.into_inner();
        let span = tracing::debug_span!("GetTree", instance = %request.instance_name);
        self.pages(request)
            .instrument(span)
            .await
            .map(Response::new)
    }

    async fn pages(&self, request: GetTreeRequest) -> Result<PageStream, Status> {
        let parsed = (|| {
            let instance = InstanceName::new(&request.instance_name)?;
            let root =
                Digest::from_proto_field(request.root_digest.as_ref(), request.digest_function)?;
            let start = PageToken::parse(&request.page_token, root)?;
            Ok::<_, TreeError>((instance, root, start))
        })();
        let (instance, root, start) = parsed.map_err(|e| e.status())?;
        let listing = self.listing(&instance, root).await?;
        let at = match start {
            None => 0,
            Some(token) => token
                .resume(&listing.digests)
                .map_err(|e| TreeError::from(e).status())?,
        };
        let per_page = match usize::try_from(request.page_size) {
            Ok(n) if n > 0 => n.min(MAX_PAGE),
            _ => MAX_PAGE,
        };
        let page_bytes = self.settings.page_bytes;
        let pages = futures::stream::unfold(Some(at), move |at| {
            let listing = listing.clone();
            async move {
                let (page, next) = page(&listing, root, at?, per_page, page_bytes);
                Some((Ok(page), next))
            }
        });
        Ok(Box::pin(pages))
    }
}

/// The page of `listing` from directory `at`: at most `per_page` directories and
/// `page_bytes` (at least one directory), with the token of the next page and where it
/// starts, unless it is the last.
pub fn page(
    listing: &Listing,
    root: Digest,
    at: usize,
    per_page: usize,
    page_bytes: usize,
) -> (RawPage, Option<usize>) {
    let total = listing.directories.len();
    let mut bytes = 0usize;
    let mut end = at;
    while end < total && end - at < per_page {
        let len = prost::encoding::bytes::encoded_len(1, &listing.directories[end]);
        if end > at && bytes + len > page_bytes {
            break;
        }
        bytes += len;
        end += 1;
    }
    let next = (end < total).then_some(end);
    let token =
        next.map(|end| PageToken::new(root, end as u64, &listing.digests[end - 1]).encode());
    let response = RawPage {
        directories: listing.directories[at..end].to_vec(),
        next_page_token: token.unwrap_or_default(),
    };
    (response, next)
}

/// Whether a walk's failure may not recur (the CAS or the server, not the tree).
fn passing(e: &TreeError) -> bool {
    e.kind().is_server_fault() || e.kind() == ErrorKind::Unavailable
}

/// Logs a failure of the server's own; returns it.
fn log(e: &TreeError) -> &TreeError {
    if passing(e) {
        tracing::error!(error = %e, "GetTree failed");
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kiln_proto::reapi::{Directory, FileNode};
    use kiln_reapi::digest::DigestFunction;
    use prost::Message;

    fn listing(sizes: &[usize]) -> Listing {
        let directories: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                Directory {
                    files: vec![FileNode {
                        name: format!("{i}-{}", "x".repeat(len)),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
                .encode_to_vec()
                .into()
            })
            .collect();
        let digests = directories
            .iter()
            .map(|d| Digest::of(DigestFunction::Sha256, d))
            .collect();
        let memory = directories.iter().map(|d| d.len() as u64).sum();
        Listing {
            directories,
            digests,
            memory,
            complete: true,
            kept: 0,
            _budget: None,
        }
    }

    /// Pages hold at most `per_page` directories and `PAGE_BYTES` (but always one), cover the
    /// listing in order, and each token starts the next.
    #[test]
    fn pages_cover_the_listing_within_their_bounds() {
        let root = Digest::of(DigestFunction::Sha256, b"root");
        let big = PAGE_BYTES / 3;
        let l = listing(&[10, big, big, big, 10, PAGE_BYTES * 2, 10]);
        for per_page in [1, 2, 100] {
            let mut at = Some(0);
            let mut seen = Vec::new();
            while let Some(start) = at {
                let (page, next) = page(&l, root, start, per_page, PAGE_BYTES);
                assert!(!page.directories.is_empty());
                assert!(page.directories.len() <= per_page);
                let bytes = page.encoded_len();
                assert!(
                    page.directories.len() == 1 || bytes <= PAGE_BYTES + 200,
                    "{bytes}"
                );
                match next {
                    Some(end) => {
                        let token = PageToken::parse(&page.next_page_token, root)
                            .unwrap()
                            .unwrap();
                        assert_eq!(token.resume(&l.digests), Ok(end));
                    }
                    None => assert!(page.next_page_token.is_empty()),
                }
                seen.extend(page.directories);
                at = next;
            }
            assert_eq!(seen, l.directories, "per_page {per_page}");
        }
    }

    /// A CAS whose first read waits to be released and then fails as unavailable (or, with
    /// `first_fails` off, succeeds), and whose later reads find one directory: a leader's
    /// passing failure, or a walk held while others arrive, which the real store cannot be
    /// made to produce on cue (a fake for a fault, as the standards allow).
    struct FailsFirst {
        root: Digest,
        bytes: Bytes,
        reads: std::sync::atomic::AtomicUsize,
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
        first_fails: bool,
    }

    impl FailsFirst {
        fn new(first_fails: bool) -> (Arc<FailsFirst>, Digest) {
            let bytes: Bytes = Directory::default().encode_to_vec().into();
            let root = Digest::of(DigestFunction::Sha256, &bytes);
            let cas = Arc::new(FailsFirst {
                root,
                bytes,
                reads: Default::default(),
                entered: Default::default(),
                release: Default::default(),
                first_fails,
            });
            (cas, root)
        }
    }

    impl Cas for FailsFirst {
        fn find_missing<'a>(
            &'a self,
            _: &'a InstanceName,
            _: &'a [Digest],
        ) -> kiln_reapi::cas::CasFuture<'a, Vec<Digest>> {
            Box::pin(async { Err(CasError::bad_answer("not used")) })
        }

        fn read_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            digests: &'a [Digest],
        ) -> kiln_reapi::cas::CasFuture<'a, Vec<Option<Bytes>>> {
            Box::pin(async move {
                if self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    self.entered.notify_one();
                    self.release.notified().await;
                    if self.first_fails {
                        return Err(CasError::Remote(Status::unavailable("injected")));
                    }
                }
                Ok(digests
                    .iter()
                    .map(|d| (*d == self.root).then(|| self.bytes.clone()))
                    .collect())
            })
        }

        fn read_to_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a std::path::Path,
        ) -> kiln_reapi::cas::CasFuture<'a, bool> {
            Box::pin(async { Err(CasError::bad_answer("not used")) })
        }

        fn write_blobs<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Vec<(Digest, Bytes)>,
        ) -> kiln_reapi::cas::CasFuture<'a, ()> {
            Box::pin(async { Err(CasError::bad_answer("not used")) })
        }

        fn write_file<'a>(
            &'a self,
            _: &'a InstanceName,
            _: Digest,
            _: &'a std::path::Path,
        ) -> kiln_reapi::cas::CasFuture<'a, ()> {
            Box::pin(async { Err(CasError::bad_answer("not used")) })
        }
    }

    fn service(cas: Arc<FailsFirst>) -> (Arc<TreeService>, Arc<ControlMetrics>) {
        let metrics = ControlMetrics::new();
        let settings = TreeSettings {
            max_tree_bytes: 1 << 20,
            cache_bytes: 1 << 20,
            cache_ttl: Duration::from_secs(60),
            subtree_cache_bytes: 0,
            page_bytes: PAGE_BYTES,
            max_directory_bytes: 1 << 20,
        };
        let service = Arc::new(TreeService::new(cas, settings, metrics.clone()));
        (service, metrics)
    }

    async fn call(service: Arc<TreeService>, root: Digest) -> Result<usize, Status> {
        let instance = InstanceName::default_instance();
        service
            .listing(&instance, root)
            .await
            .map(|l| l.directories.len())
    }

    /// Calls that arrive while a tree is being walked wait for that walk: N callers, one walk
    /// (not N walks that a cache later hides). One thread, so that they are known to have
    /// arrived before the walk is let finish.
    #[tokio::test(flavor = "current_thread")]
    async fn calls_arriving_during_a_walk_share_it() {
        let (cas, root) = FailsFirst::new(false);
        let (service, metrics) = service(cas.clone());
        let first = tokio::spawn(call(service.clone(), root));
        cas.entered.notified().await;
        let others: Vec<_> = (0..7)
            .map(|_| tokio::spawn(call(service.clone(), root)))
            .collect();
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            metrics.get_tree_walks.get(),
            1,
            "the others wait, walking nothing"
        );
        cas.release.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        for o in others {
            assert_eq!(o.await.unwrap().unwrap(), 1);
        }
        assert_eq!(metrics.get_tree_walks.get(), 1);
        assert_eq!(cas.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A call whose client goes away while it leads a walk does not take the walk with it:
    /// the walk finishes and is cached, so the next call walks nothing (and moka never sees
    /// a leader cancelled).
    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_whose_client_goes_away_still_finishes_its_walk() {
        let (cas, root) = FailsFirst::new(false);
        let (service, metrics) = service(cas.clone());
        let request = || {
            let mut r = Request::new(GetTreeRequest {
                root_digest: Some(root.to_proto()),
                ..Default::default()
            });
            r.extensions_mut()
                .insert(Arc::new(kiln_auth::Principal::unrestricted()));
            r
        };
        let gone = TreeService::answer(&service, request());
        cas.entered.notified().await;
        drop(gone);
        cas.release.notify_one();
        let answered = TreeService::answer(&service, request()).await;
        assert!(answered.is_ok(), "{:?}", answered.err());
        assert_eq!(
            metrics.get_tree_walks.get(),
            1,
            "one walk, the abandoned call's"
        );
        assert_eq!(cas.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// Calls waiting on a walk that fails for a passing reason walk themselves and succeed;
    /// the call that walked reports its failure. One thread, so that the waiters are known to
    /// be waiting on the walk before it is let fail.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_leader_does_not_fail_the_waiters() {
        let (cas, root) = FailsFirst::new(true);
        let (service, metrics) = service(cas.clone());
        let call = |service: Arc<TreeService>| call(service, root);
        let leader = tokio::spawn(call(service.clone()));
        cas.entered.notified().await;
        let waiters: Vec<_> = (0..3)
            .map(|_| tokio::spawn(call(service.clone())))
            .collect();
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        cas.release.notify_one();
        let failed = leader.await.unwrap().unwrap_err();
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap(), 1, "a waiter walked itself");
        }
        // The leader's walk and one of each waiter's own: none of them waited on another's
        // retry, and none found the failure cached.
        assert_eq!(metrics.get_tree_walks.get(), 4);
    }

    #[test]
    fn the_budget_covers_the_cache_and_the_walks() {
        let s = TreeSettings {
            max_tree_bytes: 64 << 20,
            cache_bytes: 32 << 20,
            cache_ttl: Duration::from_secs(1),
            subtree_cache_bytes: 0,
            page_bytes: PAGE_BYTES,
            max_directory_bytes: 1 << 20,
        };
        assert_eq!(s.budget_bytes(), (32 << 20) + 2 * (64 << 20));
        assert_eq!(kib(0), 1);
        assert_eq!(kib(1025), 2);
        assert_eq!(kib(u64::MAX), u32::MAX);
    }
}
