//! The v2 read path: layer range → spans → cache, else one Range GET → decode → verify → cache.
//!
//! A span is the uncompressed bytes from one checkpoint to the next; its sha256 was recorded at
//! indexing time and is its cache key. A miss fetches the compressed bytes of a run of adjacent
//! missing spans with one ranged GET, decodes each span from its own checkpoint on a blocking
//! thread, verifies it, and stores it. Concurrent requests for a span share one fetch (single
//! flight). Bytes that fail verification are fetched once more, then reported — never served.
//!
//! A span longer than [`LARGE_SPAN`] (their lengths are partly the image author's choice: a
//! single-frame zstd layer, an eStargz chunk) is never held in memory: it is fetched alone, in
//! ranges of a few MiB, decoded and verified streaming into its cache file, and never goes
//! through the span store (whose objects are read whole).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clip_format::{Archive, Checkpoint, MediaKind};
use clip_registry::{Client, Reference};
use tokio::sync::watch;

use crate::Error;
use crate::cache::{SpanCache, SpanFile};

/// Spans longer than this are decoded and verified streaming into the cache file, never into one
/// buffer.
pub const LARGE_SPAN: u64 = 16 << 20;

/// One layer's random-access index.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) digest: clip_format::Digest,
    pub(crate) media: MediaKind,
    pub(crate) compressed_size: u64,
    pub(crate) uncompressed_size: u64,
    pub(crate) checkpoints: Vec<Checkpoint>,
    /// What the last span is verified against.
    pub(crate) end: clip_seekable::LayerEnd,
    /// Span cache names ([`clip_seekable::span_key`]), one per span.
    pub(crate) keys: Vec<[u8; 32]>,
}

impl Layer {
    /// The span holding uncompressed offset `at`.
    pub(crate) fn span_of(&self, at: u64) -> usize {
        self.checkpoints
            .partition_point(|c| c.uncompressed_offset <= at)
            .saturating_sub(1)
    }

    /// Uncompressed range of span `i`.
    pub(crate) fn span_range(&self, i: usize) -> Range<u64> {
        let start = self.checkpoints[i].uncompressed_offset;
        let end = self
            .checkpoints
            .get(i + 1)
            .map_or(self.uncompressed_size, |c| c.uncompressed_offset);
        start..end.max(start)
    }

    /// Whether `bytes` are span `i`: its length, and its check ([`clip_seekable::verify_span`]).
    /// Bytes from every source (registry, span store) are served only after this.
    pub(crate) fn verifies(&self, i: usize, bytes: &[u8]) -> bool {
        let want = self.span_range(i);
        bytes.len() as u64 == want.end - want.start
            && clip_seekable::verify_span(&self.checkpoints, i, &self.end, bytes).is_ok()
    }

    /// Compressed bytes needed to decode spans `first..=last`.
    fn compressed_range(&self, first: usize, last: usize) -> Range<u64> {
        let cp = &self.checkpoints[first];
        let start = if self.media == MediaKind::Tar {
            cp.uncompressed_offset
        } else {
            cp.compressed_offset
                .saturating_sub(u64::from(cp.bits > 0 && self.media == MediaKind::Gzip))
        };
        let end = match (self.media, self.checkpoints.get(last + 1)) {
            (MediaKind::Tar, Some(n)) => n.uncompressed_offset,
            (MediaKind::Tar, None) => self.uncompressed_size,
            // The next block starts inside this byte when it has leftover bits.
            (_, Some(n)) => (n.compressed_offset + 1).min(self.compressed_size),
            (_, None) => self.compressed_size,
        };
        start..end.max(start)
    }
}

/// Counters of the v2 source.
#[derive(Debug, Default)]
pub(crate) struct FetchStats {
    pub(crate) requests: AtomicU64,
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) spans_fetched: AtomicU64,
    pub(crate) verify_failures: AtomicU64,
}

/// What a fetch in flight publishes to the readers waiting on it (`None` until it is done).
pub(crate) type Outcome = Option<Result<SpanFile, Arc<Error>>>;

/// Waits for the fetch another task leads (single flight) and takes its outcome.
pub(crate) async fn join_fetch(mut rx: watch::Receiver<Outcome>) -> Result<SpanFile, Error> {
    let outcome = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| Error::Fetch("the fetch being waited on was abandoned".into()))?
        .clone();
    match outcome {
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) => Err(Error::Shared(e)),
        None => Err(Error::Fetch("no outcome".into())),
    }
}

/// The registry-backed span source of one mount.
pub(crate) struct V2Source {
    client: Client,
    reference: Reference,
    pub(crate) layers: Vec<Layer>,
    cache: Arc<SpanCache>,
    inflight: Mutex<HashMap<[u8; 32], watch::Receiver<Outcome>>>,
    pub(crate) stats: FetchStats,
    /// Fetches started by reads, in flight (prefetch and background fetch start nothing new
    /// meanwhile).
    demand: std::sync::atomic::AtomicUsize,
    /// The fleet's span store, between the cache and the registry.
    pub(crate) store: Option<Arc<crate::spanstore::SpanStore>>,
}

/// Counts a fetch started by a read for as long as it is in flight.
struct Demand<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Demand<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a fetch group's spans from the in-flight table however the fetch ends.
struct InflightGuard<'a> {
    map: &'a Mutex<HashMap<[u8; 32], watch::Receiver<Outcome>>>,
    keys: Vec<[u8; 32]>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for k in &self.keys {
            m.remove(k);
        }
    }
}

impl V2Source {
    pub(crate) fn new(
        archive: &Archive,
        client: Client,
        cache: Arc<SpanCache>,
        registry_override: Option<&str>,
    ) -> Result<Self, Error> {
        let source = archive
            .meta()
            .source
            .clone()
            .ok_or_else(|| Error::Config("v2 archive without a registry source".into()))?;
        let reference = Reference::at_digest(
            registry_override.unwrap_or(&source.registry),
            &source.repository,
            source.manifest_digest.as_str(),
        )?;
        let layers = archive
            .layers()
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let checkpoints = archive.checkpoints(u32::try_from(i).unwrap_or(u32::MAX));
                if checkpoints
                    .first()
                    .is_none_or(|c| c.uncompressed_offset != 0)
                {
                    return Err(Error::Config(format!(
                        "layer {i} has no checkpoint at offset 0"
                    )));
                }
                let end = clip_seekable::LayerEnd::new(l.uncompressed_size, &l.diff_id)
                    .ok_or_else(|| {
                        Error::Config(format!("layer {i} diff_id {} is not a sha256", l.diff_id))
                    })?;
                let keys = (0..checkpoints.len())
                    .map(|k| clip_seekable::span_key(&checkpoints, k, &end))
                    .collect();
                Ok(Layer {
                    digest: l.digest,
                    media: l.media,
                    compressed_size: l.compressed_size,
                    uncompressed_size: l.uncompressed_size,
                    checkpoints,
                    end,
                    keys,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            client,
            reference,
            layers,
            cache,
            inflight: Mutex::new(HashMap::new()),
            stats: FetchStats::default(),
            demand: std::sync::atomic::AtomicUsize::new(0),
            store: None,
        })
    }

    /// Reads the first byte of every layer blob, all at once, the way lazy reads will (the
    /// client's trust, credentials, mirrors): the first failure, named by its layer.
    pub(crate) async fn check_registry(&self) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::new();
        let checks = self
            .layers
            .iter()
            .filter(|l| l.compressed_size > 0 && seen.insert(l.digest.clone()))
            .map(|l| async move {
                self.client
                    .read_range(&self.reference, &l.digest, 0..1)
                    .await
                    .map_err(|source| Error::RegistryCheck {
                        layer: l.digest.clone(),
                        registry: self.reference.registry.clone(),
                        source: Box::new(source),
                    })
            });
        futures_util::future::try_join_all(checks).await?;
        Ok(())
    }

    pub(crate) fn cache(&self) -> &SpanCache {
        &self.cache
    }

    fn digest(&self, layer: usize, span: usize) -> [u8; 32] {
        self.layers[layer].keys[span]
    }

    /// The span if it is open in this process already (no I/O).
    pub(crate) fn span_ready(&self, layer: usize, span: usize) -> Option<SpanFile> {
        self.cache.get_open(&self.digest(layer, span))
    }

    /// The span if the local cache has it (open already, or verified from disk; no network).
    pub(crate) fn span_local(&self, layer: usize, span: usize) -> Option<SpanFile> {
        let r = self.layers[layer].span_range(span);
        self.cache.get(&self.digest(layer, span), r.end - r.start)
    }

    /// [`span`](Self::span) for a process's read: while a fetch this read had to start itself
    /// (the span was neither cached nor already being fetched, e.g. by the prefetch) is in
    /// flight, prefetch and background fetch start no new fetches, so on-demand reads go first.
    pub(crate) async fn span_on_demand(
        self: &Arc<Self>,
        layer: usize,
        span: usize,
        ahead: usize,
    ) -> Result<SpanFile, Error> {
        self.span_with(layer, span, ahead, true).await
    }

    /// Waits (up to 1 s) until no fetch started by a read is in flight: prefetch calls this
    /// before each fetch it starts, so it does not compete with on-demand misses for the link.
    pub(crate) async fn yield_to_demand(&self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.demand.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Span `span` of `layer`, fetching it (and up to `ahead` following missing spans of the
    /// same layer, in the same request) if no process has it cached.
    pub(crate) async fn span(
        self: &Arc<Self>,
        layer: usize,
        span: usize,
        ahead: usize,
    ) -> Result<SpanFile, Error> {
        self.span_with(layer, span, ahead, false).await
    }

    async fn span_with(
        self: &Arc<Self>,
        layer: usize,
        span: usize,
        ahead: usize,
        on_demand: bool,
    ) -> Result<SpanFile, Error> {
        let layer_index = &self.layers[layer];
        let digest = self.digest(layer, span);
        let len = layer_index.span_range(span).end - layer_index.span_range(span).start;
        if let Some(f) = self.cache.get_open(&digest) {
            return Ok(f);
        }
        // Disk lookups hash the file once: keep that off the async workers.
        let me = Arc::clone(self);
        let found = tokio::task::spawn_blocking(move || me.cache.get(&digest, len)).await?;
        if let Some(f) = found {
            return Ok(f);
        }
        // Join a fetch in flight, or lead one for this span and the missing spans after it.
        let (rx, group) = {
            let mut inflight = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(rx) = inflight.get(&digest) {
                (rx.clone(), None)
            } else {
                let mut senders = Vec::new();
                let mut last = span;
                let (tx, rx) = watch::channel(None);
                inflight.insert(digest, rx.clone());
                senders.push((span, digest, tx));
                // A large span is fetched alone; none joins a run of small ones.
                let ahead = if len > LARGE_SPAN { 0 } else { ahead };
                while last + 1 < layer_index.checkpoints.len() && last < span + ahead {
                    let d = self.digest(layer, last + 1);
                    if inflight.contains_key(&d)
                        || self.cache.get_open(&d).is_some()
                        || span_len(layer_index, last + 1) > LARGE_SPAN
                    {
                        break;
                    }
                    let (t, r) = watch::channel(None);
                    inflight.insert(d, r);
                    senders.push((last + 1, d, t));
                    last += 1;
                }
                self.cache.count_misses(senders.len() as u64);
                (rx, Some(senders))
            }
        };
        if let Some(senders) = group {
            let _guard = InflightGuard {
                map: &self.inflight,
                keys: senders.iter().map(|s| s.1).collect(),
            };
            let first = senders[0].0;
            let last = senders[senders.len() - 1].0;
            let _demand = on_demand.then(|| Demand::new(&self.demand));
            let results = self.fetch_group(layer, first, last).await;
            let mut mine = Err(Error::Config("span not fetched".into()));
            for ((idx, _, tx), r) in senders.into_iter().zip(results) {
                let r = r.map_err(Arc::new);
                let _ = tx.send(Some(r.clone()));
                if idx == span {
                    mine = r.map_err(Error::Shared);
                }
            }
            return mine;
        }
        join_fetch(rx).await
    }

    /// Span `i` of `layer` from the fleet's span store, verified and cached; `None` when the
    /// store lacks it, is slow, or holds bytes that fail verification (counted, never served).
    async fn span_from_store(
        self: &Arc<Self>,
        layer: usize,
        i: usize,
        got: Option<bytes::Bytes>,
    ) -> Option<SpanFile> {
        let store = self.store.as_ref()?;
        let l = &self.layers[layer];
        let object = match got {
            Some(b) => b,
            None => store.get(&l.keys[i], span_len(l, i)).await?,
        };
        let stored = object.len() as u64;
        // Decode (bounded by the span's length) and verify off the runtime's threads.
        let me = Arc::clone(self);
        let span = tokio::task::spawn_blocking(move || {
            let l = &me.layers[layer];
            let want = l.span_range(i);
            let bytes = crate::spanstore::decode(&object, want.end - want.start)?;
            l.verifies(i, &bytes)
                .then(|| me.cache.insert(&l.keys[i], bytes))
        })
        .await
        .ok()
        .flatten();
        if span.is_none() {
            store.count_rejected();
            tracing::warn!(layer = %l.digest, offset = l.span_range(i).start, "span store object failed verification; fetching the span from the registry");
            store.discard(&l.keys[i]).await;
            return None;
        }
        store.count_hit(stored);
        span
    }

    /// Spans `first..=last` of `layer`: those the span store has; of the rest, those this
    /// worker claims come from the registry (one ranged GET per run of claimed spans, uploaded
    /// to the store afterwards) while those a peer claimed are read from the store once the
    /// peer uploads them — or from the registry if it does not in time. Workers starting
    /// together therefore fetch each span from the registry about once.
    async fn fetch_group(
        self: &Arc<Self>,
        layer: usize,
        first: usize,
        last: usize,
    ) -> Vec<Result<SpanFile, Error>> {
        use futures_util::future::join_all;
        if first == last && span_len(&self.layers[layer], first) > LARGE_SPAN {
            let got = match self.fetch_large(layer, first).await {
                Err(Error::Verify { .. }) => self.fetch_large(layer, first).await,
                other => other,
            };
            return vec![got];
        }
        let Some(store) = self.store.clone() else {
            return self.fetch_from_registry(layer, first, last).await;
        };
        let key = |i: usize| self.layers[layer].keys[i];
        let mut out: Vec<Option<Result<SpanFile, Error>>> = join_all(
            (first..=last)
                .map(|i| async move { self.span_from_store(layer, i, None).await.map(Ok) }),
        )
        .await;
        let missing: Vec<usize> = (first..=last)
            .filter(|i| out[i - first].is_none())
            .collect();
        if missing.is_empty() {
            return out.into_iter().flatten().collect();
        }
        let claimed = join_all(missing.iter().map(|&i| {
            let k = key(i);
            let store = &store;
            async move { store.claim(&k).await }
        }))
        .await;
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for (i, c) in missing.into_iter().zip(claimed) {
            if c { mine.push(i) } else { theirs.push(i) }
        }
        let fetch_mine = join_all(runs(&mine).into_iter().map(|(a, b)| {
            let store = &store;
            async move { (a, self.fetch_for_store(store, layer, a, b, true).await) }
        }));
        let wait_theirs = join_all(theirs.into_iter().map(|i| {
            let store = Arc::clone(&store);
            async move {
                let len = span_len(&self.layers[layer], i);
                let span = match store.wait_for(&key(i), len).await {
                    Some(b) => self.span_from_store(layer, i, Some(b)).await,
                    None => None,
                };
                (i, span)
            }
        }));
        let (fetched, waited) = futures_util::future::join(fetch_mine, wait_theirs).await;
        for (a, got) in fetched {
            for (k, r) in got.into_iter().enumerate() {
                out[a + k - first] = Some(r);
            }
        }
        let mut late = Vec::new();
        for (i, span) in waited {
            match span {
                Some(f) => out[i - first] = Some(Ok(f)),
                None => late.push(i),
            }
        }
        // Claimed by a peer that did not upload in time: from the registry after all.
        for (a, b) in runs(&late) {
            let got = self.fetch_for_store(&store, layer, a, b, false).await;
            for (k, r) in got.into_iter().enumerate() {
                out[a + k - first] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Fetch("span left unfetched".into()))))
            .collect()
    }

    /// [`fetch_from_registry`](Self::fetch_from_registry), then each span fetched uploaded
    /// to the store; with `claimed` (this worker holds their claims), the claim of each span
    /// that could not be fetched is released.
    async fn fetch_for_store(
        self: &Arc<Self>,
        store: &Arc<crate::spanstore::SpanStore>,
        layer: usize,
        first: usize,
        last: usize,
        claimed: bool,
    ) -> Vec<Result<SpanFile, Error>> {
        let got = self.fetch_from_registry(layer, first, last).await;
        for (k, r) in got.iter().enumerate() {
            let key = self.layers[layer].keys[first + k];
            match r {
                Ok(f) => store.upload(key, f.bytes().to_vec(), claimed),
                Err(_) if claimed => store.release(key),
                Err(_) => {}
            }
        }
        got
    }

    /// Spans `first..=last` of `layer` from the registry with one ranged GET (each span that
    /// fails verification refetched once on its own).
    async fn fetch_from_registry(
        self: &Arc<Self>,
        layer: usize,
        first: usize,
        last: usize,
    ) -> Vec<Result<SpanFile, Error>> {
        let mut out = match self.fetch_once(layer, first, last).await {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                return (first..=last)
                    .map(|_| Err(Error::Fetch(msg.clone())))
                    .collect();
            }
        };
        for (k, r) in out.iter_mut().enumerate() {
            if matches!(r, Err(Error::Verify { .. })) {
                let i = first + k;
                *r = match self.fetch_once(layer, i, i).await {
                    Ok(mut v) => v.remove(0),
                    Err(e) => Err(e),
                };
            }
        }
        out
    }

    async fn fetch_once(
        self: &Arc<Self>,
        layer: usize,
        first: usize,
        last: usize,
    ) -> Result<Vec<Result<SpanFile, Error>>, Error> {
        let l = &self.layers[layer];
        let range = l.compressed_range(first, last);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .client
            .read_range(&self.reference, &l.digest, range.clone())
            .await?;
        self.stats
            .fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            (first..=last)
                .map(|i| me.decode_span(layer, i, &bytes, range.start))
                .collect()
        })
        .await
        .map_err(Error::from)
    }

    /// Span `i` of `layer`, longer than [`LARGE_SPAN`]: its compressed range read in pieces,
    /// decoded and verified streaming into its cache file (memory: a few MiB, whatever its
    /// length). Bytes that fail verification are never served (the file is not kept).
    async fn fetch_large(self: &Arc<Self>, layer: usize, i: usize) -> Result<SpanFile, Error> {
        let handle = tokio::runtime::Handle::current();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let l = &me.layers[layer];
            let range = l.compressed_range(i, i);
            let want = l.span_range(i);
            let len = want.end - want.start;
            let mut reader = Counted {
                inner: me
                    .client
                    .range_reader(&handle, &me.reference, &l.digest, range.clone()),
                n: &me.stats.fetched_bytes,
            };
            let mut verifier = Some(
                clip_seekable::SpanVerifier::new(&l.checkpoints, i, &l.end)
                    .map_err(|e| Error::Fetch(format!("layer {}: {e}", l.digest)))?,
            );
            let mut failure: Option<Error> = None;
            let stored = me.cache.insert_with(&l.keys[i], len, |put| {
                let decoded = clip_seekable::decode_span_to(
                    l.media,
                    &l.checkpoints[i],
                    &mut reader,
                    range.start,
                    len,
                    &mut |piece| {
                        if let Some(v) = verifier.as_mut() {
                            v.update(piece);
                        }
                        put(piece).map_err(|e| clip_seekable::Error::Corrupt {
                            compressed: 0,
                            reason: format!("writing the span to the cache: {e}"),
                        })
                    },
                );
                let verdict = decoded.and_then(|()| {
                    verifier
                        .take()
                        .map_or(Ok(()), clip_seekable::SpanVerifier::finish)
                });
                verdict.map_err(|e| {
                    let err = match e {
                        clip_seekable::Error::SpanDigest { .. } => Error::Verify {
                            layer: l.digest.clone(),
                            offset: want.start,
                        },
                        other => Error::Fetch(format!(
                            "layer {}: the span at uncompressed offset {}: {other}",
                            l.digest, want.start
                        )),
                    };
                    let io = std::io::Error::other(err.to_string());
                    failure = Some(err);
                    io
                })
            });
            match stored {
                Ok(f) => {
                    me.stats.spans_fetched.fetch_add(1, Ordering::Relaxed);
                    Ok(f)
                }
                Err(e) => {
                    let err = failure.unwrap_or(Error::Io(e));
                    if matches!(err, Error::Verify { .. }) {
                        me.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(layer = %l.digest, offset = want.start, "span failed verification");
                    }
                    Err(err)
                }
            }
        })
        .await?
    }

    fn decode_span(
        &self,
        layer: usize,
        i: usize,
        input: &[u8],
        input_offset: u64,
    ) -> Result<SpanFile, Error> {
        let l = &self.layers[layer];
        let cp = &l.checkpoints[i];
        let want = l.span_range(i);
        let len = usize::try_from(want.end - want.start)
            .map_err(|_| Error::Config("span larger than memory".into()))?;
        let bytes = match clip_seekable::decode_span(l.media, cp, input, input_offset, len) {
            Ok(b) => b,
            Err(_) if l.media == MediaKind::Tar => {
                return Err(Error::Fetch("short range for an uncompressed span".into()));
            }
            // Undecodable bytes are bad bytes like any other: refetch, never serve.
            Err(_) => Vec::new(),
        };
        if !l.verifies(i, &bytes) {
            self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(layer = %l.digest, offset = want.start, "span failed verification");
            return Err(Error::Verify {
                layer: l.digest.clone(),
                offset: want.start,
            });
        }
        self.stats.spans_fetched.fetch_add(1, Ordering::Relaxed);
        Ok(self.cache.insert(&l.keys[i], bytes))
    }
}

/// A reader that counts the bytes it passes on.
struct Counted<'a, R> {
    inner: R,
    n: &'a AtomicU64,
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// Sorted span indexes as runs of consecutive indexes, `(first, last)`.
fn runs(sorted: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == i => *b = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// The length of span `i` of `l` (what a store object of it decodes to).
fn span_len(l: &Layer, i: usize) -> u64 {
    let r = l.span_range(i);
    r.end - r.start
}
