//! The shared span store: a second tier between a worker's span cache and the registry, in the
//! object store a fleet already runs, so that what one worker fetched the others read instead of
//! going to the registry again.
//!
//! Spans are content-addressed by the span key the archive already carries (`spans/<hex>`), hold
//! the span's verified bytes as one zstd frame (level 3: a store behind a slow link costs about
//! what the registry's compressed bytes would), and are written create-only. A frame is decoded
//! into at most the span's length, so a hostile object cannot make a reader allocate more. Every object read is
//! verified like a registry fetch; one that fails (poisoned, truncated) is never served — the
//! span comes from the registry instead and the event is counted. A read tries the store for at
//! most `timeout`, then goes to the registry; after a failure or timeout the store is left alone
//! for `backoff`, so a slow or broken store costs one bounded wait, not one per read.
//! Uploads happen in the background after a verified registry fetch, at most `uploads` at a
//! time; when more than `upload_queue_bytes` wait for a slot the upload is skipped, so uploads
//! never delay a read nor hold unbounded memory. A mount that ends waits a few seconds for its
//! queued uploads.
//!
//! Simultaneous cold starts: before a worker fetches a span the store lacks from the registry it
//! puts a claim (`claims/<hex>`, create-only). A worker that finds the claim taken waits up to
//! `claim_wait` for the span to appear in the store (a peer is fetching it) and reads it from
//! there; if it does not appear (the peer is slow or died), it fetches it itself. Claims hold their
//! creation time. A claim stays after its span is uploaded (so a peer that missed the span a
//! moment before does not fetch it again; expire `claims/` with a bucket lifecycle rule) and is
//! deleted when its fetch failed; one older than four `claim_wait`s with no span in the store
//! was left by a worker that died and is taken over. An object that fails verification is
//! deleted, so the verified bytes fetched from the registry next replace it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clip_objstore::{RemoteObject, RemoteOptions};

/// Where the shared span store is and how patient to be with it.
#[derive(Debug, Clone)]
pub struct SpanStoreOptions {
    /// `s3://BUCKET/PREFIX` (spans go under `PREFIX/spans/`, claims under `PREFIX/claims/`).
    pub url: String,
    /// Endpoint, region and credentials.
    pub remote: RemoteOptions,
    /// Longest a store read may take before the registry is asked instead (default 2 s).
    pub timeout: Duration,
    /// Longest to wait for a span another worker has claimed (default 2 s).
    pub claim_wait: Duration,
    /// After a store read or claim fails or times out, the store is left alone (reads go
    /// straight to the registry, nothing is uploaded) for this long (default 30 s), so an
    /// unreachable store costs one `timeout`, not one per read.
    pub backoff: Duration,
    /// Uploads in flight at most (default 4).
    pub uploads: usize,
    /// Bytes of spans waiting for an upload slot at most (default 128 MiB); past it an
    /// upload is skipped (a later fetch of the span uploads it).
    pub upload_queue_bytes: u64,
}

impl SpanStoreOptions {
    /// The store at `url` with default patience.
    #[must_use]
    pub fn new(url: &str, remote: RemoteOptions) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            remote,
            timeout: Duration::from_secs(2),
            claim_wait: Duration::from_secs(2),
            backoff: Duration::from_secs(30),
            uploads: 4,
            upload_queue_bytes: 128 << 20,
        }
    }
}

/// What the store did for a mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpanStoreStats {
    /// Spans read from the store (verified).
    pub hits: u64,
    /// Stored (compressed) bytes of those spans: what crossed the network from the store.
    pub hit_bytes: u64,
    /// Objects that failed verification (never served).
    pub rejected: u64,
    /// Reads that failed or took too long (the registry answered instead).
    pub errors: u64,
    /// Spans uploaded by this mount.
    pub uploads: u64,
    /// Uploads skipped because the upload queue was full or the store was failing.
    pub uploads_skipped: u64,
    /// Spans this mount waited for while a peer fetched them.
    pub waited: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    hit_bytes: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    uploads: AtomicU64,
    uploads_skipped: AtomicU64,
    waited: AtomicU64,
}

/// An opened span store.
#[derive(Debug)]
pub(crate) struct SpanStore {
    spans: RemoteObject,
    claims: RemoteObject,
    timeout: Duration,
    claim_wait: Duration,
    slots: Arc<tokio::sync::Semaphore>,
    queued: AtomicU64,
    queue_bound: u64,
    backoff: Duration,
    down_until: std::sync::Mutex<Option<Instant>>,
    counters: Counters,
}

impl SpanStore {
    pub(crate) fn open(o: &SpanStoreOptions) -> Result<Self, crate::Error> {
        let root = |name: &str| {
            RemoteObject::open(&format!("{}/{name}", o.url), &o.remote)
                .map_err(|e| crate::Error::Config(format!("span store {}: {e}", o.url)))
        };
        Ok(Self {
            spans: root("spans")?,
            claims: root("claims")?,
            timeout: o.timeout,
            claim_wait: o.claim_wait,
            slots: Arc::new(tokio::sync::Semaphore::new(o.uploads.max(1))),
            queued: AtomicU64::new(0),
            queue_bound: o.upload_queue_bytes,
            backoff: o.backoff,
            down_until: std::sync::Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub(crate) fn stats(&self) -> SpanStoreStats {
        let c = &self.counters;
        SpanStoreStats {
            hits: c.hits.load(Ordering::Relaxed),
            hit_bytes: c.hit_bytes.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            uploads: c.uploads.load(Ordering::Relaxed),
            uploads_skipped: c.uploads_skipped.load(Ordering::Relaxed),
            waited: c.waited.load(Ordering::Relaxed),
        }
    }

    /// Whether the store failed within the last `backoff` (then it is not asked).
    fn is_down(&self) -> bool {
        let mut d = self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *d {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *d = None;
                tracing::info!("asking the span store again");
                false
            }
            None => false,
        }
    }

    /// Counts a failed or slow store operation and leaves the store alone for `backoff`.
    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("clip_span_store_errors_total").increment(1);
        let mut d = self
            .down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.is_none() {
            tracing::warn!(error = %error, secs = self.backoff.as_secs(), "span store {what} failed; reading from the registry only for a while");
        }
        *d = Some(Instant::now() + self.backoff);
    }

    /// `op` if the store is up and answers within `timeout`; a failure or timeout is counted
    /// and leaves the store alone for `backoff` (`None`).
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = clip_objstore::Result<T>>,
    ) -> Option<T> {
        if self.is_down() {
            return None;
        }
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(what, &e);
                None
            }
            Err(_) => {
                self.failed(what, &"timed out");
                None
            }
        }
    }

    /// The stored bytes of span `key` (of `len` bytes decoded), if the store answers in time
    /// with an object no larger than a zstd frame of `len` bytes can be: a larger one is never
    /// read whole (whoever wrote it, it cannot be the span).
    pub(crate) async fn get(&self, key: &[u8; 32], len: u64) -> Option<Bytes> {
        let obj = self.spans.child(&hex::encode(key));
        self.bounded("read", obj.get_bounded(max_object(len)))
            .await
            .flatten()
    }

    pub(crate) fn count_hit(&self, bytes: u64) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.counters.hit_bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("clip_span_store_hits_total").increment(1);
    }

    pub(crate) fn count_rejected(&self) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("clip_span_store_rejected_total").increment(1);
    }

    /// Claims the fetch of span `key`: `true` when this worker is to fetch it (claim taken
    /// now, a stale claim of a worker that died replaced, or the store unusable), `false` when
    /// a live peer holds the claim.
    pub(crate) async fn claim(&self, key: &[u8; 32]) -> bool {
        let obj = self.claims.child(&hex::encode(key));
        let stamp = now_millis().to_string();
        let taken = async {
            if obj.put_if_absent(stamp.as_bytes()).await? {
                return Ok(true);
            }
            // A claim older than a fetch could take was left by a worker that died: take it.
            // So is one dated in the future (beyond clock skew): whoever wrote it would
            // otherwise make every cold read of the span wait for as long as it likes.
            let held = obj.get_bounded(MAX_CLAIM).await?;
            let since = held
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.trim().parse::<u64>().ok());
            if since.is_none_or(|t| claim_is_stale(t, now_millis(), self.claim_wait)) {
                obj.delete().await?;
                return obj.put_if_absent(stamp.as_bytes()).await;
            }
            Ok(false)
        };
        // An unusable store: this worker fetches the span itself.
        self.bounded("claim", taken).await.unwrap_or(true)
    }

    /// Drops this worker's claim on span `key` without uploading it (its fetch failed).
    pub(crate) fn release(self: &Arc<Self>, key: [u8; 32]) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _ = me.claims.child(&hex::encode(key)).delete().await;
        });
    }

    /// Removes span `key`'s object after it failed verification, so that the verified bytes
    /// fetched from the registry next can replace it.
    pub(crate) async fn discard(&self, key: &[u8; 32]) {
        let obj = self.spans.child(&hex::encode(key));
        let _ = tokio::time::timeout(self.timeout, obj.delete()).await;
    }

    /// Waits (up to `claim_wait`) for span `key` to appear; its bytes if it does.
    pub(crate) async fn wait_for(&self, key: &[u8; 32], len: u64) -> Option<Bytes> {
        self.counters.waited.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + self.claim_wait;
        while Instant::now() < until && !self.is_down() {
            if let Some(b) = self.get(key, len).await {
                return Some(b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Uploads span `key` in the background (create-only), at most `uploads` at a time; drops
    /// this worker's claim on it (if it held one) only when the upload failed. Skipped (and
    /// counted) when the bytes waiting for a slot would pass the queue bound or the store is
    /// failing: an upload never delays a read.
    pub(crate) fn upload(self: &Arc<Self>, key: [u8; 32], bytes: Vec<u8>, claimed: bool) {
        let len = bytes.len() as u64;
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.queue_bound || self.is_down() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.counters
                .uploads_skipped
                .fetch_add(1, Ordering::Relaxed);
            if claimed {
                self.release(key);
            }
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let name = hex::encode(key);
            let permit = Arc::clone(&me.slots).acquire_owned().await;
            let frame = tokio::task::spawn_blocking(move || zstd::bulk::compress(&bytes, 3)).await;
            let mut uploaded = false;
            if let Ok(Ok(frame)) = frame {
                match me.spans.child(&name).put_if_absent(&frame).await {
                    Ok(created) => {
                        uploaded = true;
                        if created {
                            me.counters.uploads.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("clip_span_store_uploads_total").increment(1);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "span store upload failed"),
                }
            } else {
                tracing::debug!("compressing a span for the span store failed");
            }
            drop(permit);
            // A claim stays after a successful upload: a peer that missed the span a moment
            // ago and claims it now finds the claim taken and reads the span from the store,
            // instead of fetching it again. It is only released when there is nothing to read.
            if claimed && !uploaded {
                let _ = me.claims.child(&name).delete().await;
            }
            me.queued.fetch_sub(len, Ordering::AcqRel);
        });
    }

    /// Waits up to `limit` for the uploads queued so far to finish (before a mount ends).
    pub(crate) async fn drain(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.queued.load(Ordering::Acquire) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stored span object's bytes: its zstd frame decoded into exactly `len` bytes, or `None`
/// (undecodable, longer, or shorter: never served). The caller still verifies the bytes
/// against the span's digest.
#[must_use]
pub fn decode(object: &[u8], len: u64) -> Option<Vec<u8>> {
    let cap = usize::try_from(len).ok()?;
    let bytes = zstd::bulk::decompress(object, cap).ok()?;
    (bytes.len() == cap).then_some(bytes)
}

/// The largest claim object read (a claim is a decimal timestamp).
const MAX_CLAIM: u64 = 64;

/// The largest object a span of `len` bytes can be stored as: a zstd frame is at most its input
/// plus a small overhead (`ZSTD_compressBound`: `len + len/256 + 64 KiB` is above it).
fn max_object(len: u64) -> u64 {
    len.saturating_add(len / 256).saturating_add(64 << 10)
}

/// Whether a claim made at `at` (Unix ms) is stale at `now`: older than four `wait`s (its holder
/// died), or dated more than one `wait` ahead of this clock (no live peer's clock is that far
/// off; such a claim is forged or broken).
fn claim_is_stale(at: u64, now: u64, wait: Duration) -> bool {
    let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    now.saturating_sub(at) > wait.saturating_mul(4) || at.saturating_sub(now) > wait
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_from_the_past_and_from_the_future_go_stale() {
        let wait = Duration::from_secs(2);
        let now = 1_000_000_000;
        assert!(!claim_is_stale(now, now, wait), "a fresh claim");
        assert!(
            !claim_is_stale(now - 7_999, now, wait),
            "a claim within four waits"
        );
        assert!(claim_is_stale(now - 8_001, now, wait), "its holder died");
        assert!(
            !claim_is_stale(now + 1_500, now, wait),
            "a peer's clock a little ahead"
        );
        assert!(
            claim_is_stale(now + 2_001, now, wait),
            "dated in the future"
        );
        assert!(claim_is_stale(u64::MAX, now, wait));
    }

    #[test]
    fn a_stored_span_is_never_read_beyond_what_its_frame_can_be() {
        let span = vec![7u8; 1 << 20];
        let random: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for bytes in [span, random] {
            let frame = zstd::bulk::compress(&bytes, 3).unwrap_or_default();
            assert!(frame.len() as u64 <= max_object(bytes.len() as u64));
        }
        assert_eq!(max_object(0), 64 << 10);
        assert_eq!(max_object(u64::MAX), u64::MAX);
    }

    /// Nothing in these tests may depend on how fast the machine is: no store operation times
    /// out, no claim goes stale, and no back-off ends by itself within a test.
    const NEVER: Duration = Duration::from_mins(10);

    /// A handle on the store in `dir` that waits `claim_wait` for a peer's upload (a live claim
    /// goes stale after four of those).
    fn store(dir: &std::path::Path, claim_wait: Duration) -> Arc<SpanStore> {
        let mut o = SpanStoreOptions::new(
            &format!("file://{}", dir.display()),
            RemoteOptions::default(),
        );
        o.claim_wait = claim_wait;
        o.backoff = NEVER;
        o.timeout = NEVER;
        Arc::new(SpanStore::open(&o).unwrap_or_else(|e| panic!("{e}")))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_worker_claims_a_span_the_others_wait_for_its_upload() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (store(dir.path(), NEVER), store(dir.path(), NEVER));
        // A peer that waits only briefly for an upload.
        let impatient = store(dir.path(), Duration::from_millis(200));
        let key = [1u8; 32];
        rt().block_on(async {
            assert!(a.claim(&key).await, "the first claim is taken");
            assert!(!b.claim(&key).await, "a live peer's claim is respected");
            assert!(
                impatient.wait_for(&key, 5).await.is_none(),
                "nothing uploaded yet: waits, then gives up"
            );
            a.upload(key, b"hello".to_vec(), true);
            a.drain(NEVER).await;
            let got = b.wait_for(&key, 5).await.unwrap_or_default();
            assert_eq!(decode(&got, 5).as_deref(), Some(&b"hello"[..]));
            // The claim stays after the upload: a late peer reads the store, not the registry.
            assert!(!b.claim(&key).await);
            assert_eq!(a.stats().uploads, 1);
            assert_eq!((b.stats().waited, impatient.stats().waited), (1, 1));
        });
    }

    #[test]
    fn a_dead_workers_claim_and_a_failed_fetchs_claim_are_taken_over() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (store(dir.path(), NEVER), store(dir.path(), NEVER));
        let (dead, failed) = ([2u8; 32], [3u8; 32]);
        // A claim written long ago (its holder died), one dated far ahead, and garbage.
        let claims = dir.path().join("claims");
        std::fs::create_dir_all(&claims).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(claims.join(hex::encode(dead)), b"1000").unwrap_or_else(|e| panic!("{e}"));
        let future = [4u8; 32];
        std::fs::write(claims.join(hex::encode(future)), u64::MAX.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let garbage = [5u8; 32];
        std::fs::write(claims.join(hex::encode(garbage)), b"not a time")
            .unwrap_or_else(|e| panic!("{e}"));
        rt().block_on(async {
            for k in [dead, future, garbage] {
                assert!(
                    b.claim(&k).await,
                    "stale claim {} taken over",
                    hex::encode(&k[..1])
                );
            }
            // A fetch that failed drops its claim: the next worker claims the span itself.
            assert!(a.claim(&failed).await);
            a.release(failed);
            let t0 = Instant::now();
            while !b.claim(&failed).await {
                assert!(t0.elapsed() < NEVER, "the claim was never released");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    #[test]
    fn a_failing_store_is_left_alone_for_the_backoff_then_asked_again() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = store(dir.path(), NEVER);
        let key = [6u8; 32];
        // The store's directories are files: every operation fails.
        std::fs::write(dir.path().join("claims"), b"").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("spans"), b"").unwrap_or_else(|e| panic!("{e}"));
        rt().block_on(async {
            assert!(s.claim(&key).await, "an unusable store: fetch it yourself");
            assert_eq!(s.stats().errors, 1);
            assert!(s.is_down());
            // While down: not asked at all (no new errors), uploads skipped.
            assert!(s.get(&key, 5).await.is_none());
            s.upload(key, b"hello".to_vec(), false);
            assert_eq!((s.stats().errors, s.stats().uploads_skipped), (1, 1));
            // After the backoff (made to end now), and with the store repaired, it is used
            // again.
            std::fs::remove_file(dir.path().join("claims")).unwrap_or_else(|e| panic!("{e}"));
            std::fs::remove_file(dir.path().join("spans")).unwrap_or_else(|e| panic!("{e}"));
            assert!(s.is_down(), "still within the backoff");
            *s.down_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            assert!(!s.is_down());
            assert!(s.claim(&key).await);
            s.upload(key, b"hello".to_vec(), true);
            s.drain(NEVER).await;
            assert_eq!(s.stats().uploads, 1);
            assert!(s.get(&key, 5).await.is_some());
        });
    }
}
