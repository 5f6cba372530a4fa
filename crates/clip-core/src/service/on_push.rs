//! Index on push: a registry's notifications ("an image was pushed") become archives in the
//! store before any worker asks for the image, so that the first pull anywhere finds it.
//!
//! The CNCF distribution registry posts event envelopes (`{"events": [...]}`, media type
//! `application/vnd.docker.distribution.events.v1+json`) to its configured endpoints;
//! [`PushIndexer::submit`] takes such a body. Manifest and index pushes to repositories matching
//! `indexOnPush.repositories` are queued — bounded, deduplicated by registry, repository and
//! digest (what an image id names) — and indexed by
//! background threads exactly as `PullAndArchiveImage` would (`pull_and_archive` of
//! `HOST/REPO@DIGEST`: same image id, same store, create-only), so a later pull by tag answers
//! `"reused": true`. Only events about the registries `indexOnPush.registries` names are taken
//! (the host comes from the event, so any other would let a sender pick what the worker
//! fetches); the endpoint authenticates with its own secret (`indexOnPush.secretFile`, checked by
//! the worker's API), not the API's token. A pushed index is indexed for the configured platforms (default: this
//! machine's); a pushed platform manifest only if its platform is one of them. Failures are
//! retried with backoff (1, 2, 4, 8, 16 s), then dropped with an error logged and counted — and
//! forgotten, so the next event for the same image queues it again.
//! Everything else in an envelope (blob pushes, pulls, deletes) is ignored and counted.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{ImageService, ServiceError};
use crate::registry;

/// How many jobs wait at most; a fuller queue refuses the envelope (the registry retries).
pub const QUEUE_CAPACITY: usize = 1024;
/// How many digests are remembered for deduplication.
const SEEN_CAPACITY: usize = 16_384;
/// Attempts per image before it is dropped.
const ATTEMPTS: u32 = 5;

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnPushError {
    /// The body is not a notification envelope.
    #[error("not a registry notification envelope: {0}")]
    Envelope(String),
    /// Index on push is not configured on this worker.
    #[error("index on push is not configured (imageService.indexOnPush)")]
    NotConfigured,
    /// The queue is full.
    #[error("the index-on-push queue is full ({QUEUE_CAPACITY} images waiting); retry later")]
    QueueFull,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(default)]
    action: String,
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    target: Target,
    #[serde(default)]
    request: RequestInfo,
}

#[derive(Debug, Default, Deserialize)]
struct Target {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    url: String,
}

#[derive(Debug, Default, Deserialize)]
struct RequestInfo {
    #[serde(default)]
    host: String,
}

/// What an envelope brought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Submitted {
    /// Events in the envelope.
    pub received: usize,
    /// Images queued for indexing.
    pub queued: usize,
    /// Already queued, being indexed or done.
    pub duplicates: usize,
    /// Not a manifest or index push, or not a configured repository.
    pub ignored: usize,
}

#[derive(Debug, Clone)]
struct Job {
    host: String,
    repository: String,
    digest: String,
    index: bool,
    pushed_at: Option<SystemTime>,
    attempts: u32,
    not_before: Instant,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    stop: bool,
}

impl Queue {
    fn forget(&mut self, key: &str) {
        if self.seen.remove(key) {
            self.seen_order.retain(|k| k != key);
        }
    }

    fn remember(&mut self, digest: &str) -> bool {
        if !self.seen.insert(digest.to_owned()) {
            return false;
        }
        self.seen_order.push_back(digest.to_owned());
        while self.seen_order.len() > SEEN_CAPACITY {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The index-on-push queue and its threads.
pub struct PushIndexer {
    svc: Arc<ImageService>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PushIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushIndexer")
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

fn is_manifest(media: &str) -> bool {
    registry::oci::MediaKind::of_str(media) == registry::oci::MediaKind::Manifest
}

fn is_index(media: &str) -> bool {
    registry::oci::MediaKind::of_str(media) == registry::oci::MediaKind::Index
}

/// `HOST[:PORT]` of a URL like `http://127.0.0.1:5000/v2/…`.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then_some(host)
}

impl PushIndexer {
    /// Starts `workers` indexing threads for `svc`.
    #[must_use]
    pub fn start(svc: Arc<ImageService>, workers: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let threads = (0..workers.max(1))
            .map(|_| {
                let (svc, shared) = (Arc::clone(&svc), Arc::clone(&shared));
                std::thread::spawn(move || work(&svc, &shared))
            })
            .collect();
        Self {
            svc,
            shared,
            threads,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Images waiting.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Takes a notification envelope (the request body).
    pub fn submit(&self, body: &[u8]) -> Result<Submitted, OnPushError> {
        let conf = self
            .svc
            .config()
            .index_on_push
            .clone()
            .ok_or(OnPushError::NotConfigured)?;
        let env: Envelope =
            serde_json::from_slice(body).map_err(|e| OnPushError::Envelope(e.to_string()))?;
        let mut out = Submitted {
            received: env.events.len(),
            ..Submitted::default()
        };
        let mut q = self.lock();
        for e in env.events {
            let t = &e.target;
            let kind_ok = is_manifest(&t.media_type) || is_index(&t.media_type);
            let host = url_host(&t.url)
                .map(str::to_owned)
                .or_else(|| (!e.request.host.is_empty()).then(|| e.request.host.clone()));
            let digest_ok = clip_format::Digest::parse(&t.digest).is_ok();
            let Some(host) = host.filter(|_| {
                e.action == "push"
                    && kind_ok
                    && digest_ok
                    && registry::Reference::parse(&format!("localhost/{}", t.repository)).is_ok()
            }) else {
                out.ignored += 1;
                metrics::counter!("clip_index_on_push_events_total", "result" => "ignored")
                    .increment(1);
                continue;
            };
            if !conf.trusts_host(&host) {
                tracing::warn!(host, repository = %t.repository, "index on push: an event about a registry not in indexOnPush.registries; ignored");
                out.ignored += 1;
                metrics::counter!("clip_index_on_push_events_total", "result" => "untrusted_host")
                    .increment(1);
                continue;
            }
            if !conf.wants(&host, &t.repository) {
                out.ignored += 1;
                metrics::counter!("clip_index_on_push_events_total", "result" => "ignored")
                    .increment(1);
                continue;
            }
            // One archive per image id, which names the registry and the repository too.
            let key = format!("{host}/{}@{}", t.repository, t.digest);
            if !q.remember(&key) {
                out.duplicates += 1;
                metrics::counter!("clip_index_on_push_events_total", "result" => "duplicate")
                    .increment(1);
                continue;
            }
            if q.jobs.len() >= QUEUE_CAPACITY {
                q.seen.remove(&key);
                return Err(OnPushError::QueueFull);
            }
            q.jobs.push_back(Job {
                host,
                repository: t.repository.clone(),
                digest: t.digest.clone(),
                index: is_index(&t.media_type),
                pushed_at: crate::rfc3339::parse(&e.timestamp),
                attempts: 0,
                not_before: Instant::now(),
            });
            out.queued += 1;
            metrics::counter!("clip_index_on_push_events_total", "result" => "queued").increment(1);
        }
        metrics::gauge!("clip_index_on_push_queue_depth").set(q.jobs.len() as f64);
        drop(q);
        self.shared.wake.notify_all();
        Ok(out)
    }
}

impl Drop for PushIndexer {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The next job whose time has come (waiting for one), or `None` when stopping.
fn next_job(shared: &Shared) -> Option<Job> {
    let mut q = shared
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if q.stop {
            return None;
        }
        let now = Instant::now();
        if let Some(i) = q.jobs.iter().position(|j| j.not_before <= now) {
            let job = q.jobs.remove(i);
            metrics::gauge!("clip_index_on_push_queue_depth").set(q.jobs.len() as f64);
            return job;
        }
        let wait = q
            .jobs
            .iter()
            .map(|j| j.not_before.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_hours(1));
        q = shared
            .wake
            .wait_timeout(q, wait)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

/// Why an index-on-push job failed.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// Resolving the pushed manifest failed.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// Archiving it failed.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl JobError {
    /// Whether a retry can help; a permanent failure (a denied pull, a deleted manifest, an
    /// image clip cannot read) is not tried again.
    fn is_transient(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_transient(),
            Self::Service(e) => e.is_transient(),
        }
    }
}

fn work(svc: &ImageService, shared: &Shared) {
    while let Some(mut job) = next_job(shared) {
        let Err(e) = index_job(svc, shared, &job) else {
            continue;
        };
        job.attempts += 1;
        let key = format!("{}/{}@{}", job.host, job.repository, job.digest);
        if job.attempts >= ATTEMPTS || !e.is_transient() {
            let reason = if e.is_transient() {
                "attempts exhausted"
            } else {
                "permanent failure"
            };
            tracing::error!(image = %key, attempts = job.attempts, reason, error = %e, "index on push: giving up until the next event for this image");
            metrics::counter!("clip_index_on_push_failures_total").increment(1);
            // Forgotten, so that the next event for it (a push again, the registry's retry)
            // queues it anew instead of counting as a duplicate forever.
            shared
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .forget(&key);
            continue;
        }
        let delay = Duration::from_secs(1 << (job.attempts - 1));
        tracing::warn!(image = %key, attempt = job.attempts, retry_in_s = delay.as_secs(), error = %e, "index on push failed; retrying");
        job.not_before = Instant::now() + delay;
        shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .jobs
            .push_back(job);
        shared.wake.notify_all();
    }
}

/// One job: an index is expanded into its configured platforms' manifests (queued as jobs of
/// their own); a manifest of a configured platform is archived.
fn index_job(svc: &ImageService, shared: &Shared, job: &Job) -> Result<(), JobError> {
    let conf = svc.config().index_on_push.clone().unwrap_or_default();
    let platforms: Vec<registry::Platform> = if conf.platforms.is_empty() {
        vec![registry::oci::host_platform()]
    } else {
        conf.platforms
            .iter()
            .filter_map(|p| registry::oci::parse_platform(p))
            .collect()
    };
    let reference = registry::Reference::at_digest(&job.host, &job.repository, &job.digest)?;
    let pinned = reference.to_string();
    let net = svc.registry();
    if job.index {
        for p in &platforms {
            match net.block_on(net.client().resolve(&reference, Some(p))) {
                Ok(img) => {
                    let digest = img.manifest_digest.to_string();
                    let mut q = shared
                        .queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if q.remember(&format!("{}/{}@{digest}", job.host, job.repository)) {
                        q.jobs.push_back(Job {
                            digest,
                            index: false,
                            attempts: 0,
                            not_before: Instant::now(),
                            ..job.clone()
                        });
                    }
                }
                Err(registry::Error::NotFound { .. }) => {
                    tracing::info!(image = %pinned, platform = %registry::oci::platform_name(p), "index on push: no such platform in the index");
                }
                Err(e) => return Err(e.into()),
            }
        }
        shared.wake.notify_all();
        return Ok(());
    }
    // A platform manifest: only if it is one of the configured platforms.
    let img = net.block_on(net.client().resolve(&reference, None))?;
    let mut offered = registry::Platform::default();
    offered.set_os(img.config.os().clone());
    offered.set_architecture(img.config.architecture().clone());
    offered.set_variant(img.config.variant().clone());
    if !platforms
        .iter()
        .any(|want| registry::oci::platform_matches(&offered, want))
    {
        tracing::info!(image = %pinned, platform = %registry::oci::platform_name(&offered), "index on push: not a configured platform");
        metrics::counter!("clip_index_on_push_events_total", "result" => "other_platform")
            .increment(1);
        return Ok(());
    }
    let started = Instant::now();
    let r = svc.pull_and_archive(&pinned)?;
    if conf.attach && r.version == super::ArchiveVersion::V2 {
        // The index travels with the image: every node finds it. A failure to attach (no push
        // access) leaves the archive in the store and is logged, not retried.
        match svc.attach_index(&pinned) {
            Ok(Some(a)) => {
                tracing::info!(image = %pinned, artifact = %a.artifact, layers = a.layers, "index on push: attached the layer indexes to the image");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(image = %pinned, error = %e, "index on push: attaching the layer indexes failed");
            }
        }
    }
    let lag = job
        .pushed_at
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    if let Some(l) = lag {
        metrics::histogram!("clip_index_on_push_lag_seconds").record(l.as_secs_f64());
    }
    tracing::info!(image = %pinned, image_id = %r.image_id, version = r.version.number(), reused = r.reused, ms = started.elapsed().as_millis() as u64, lag_ms = lag.map(|l| l.as_millis() as u64), "indexed on push");
    metrics::counter!("clip_index_on_push_indexed_total").increment(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_forgotten_image_is_queued_again() {
        let mut q = Queue::default();
        assert!(q.remember("h/r@sha256:a") && !q.remember("h/r@sha256:a"));
        q.forget("h/r@sha256:a");
        assert!(q.remember("h/r@sha256:a"), "given up, then pushed again");
        assert_eq!(q.seen_order.len(), 1);
    }

    #[test]
    fn only_failures_a_retry_can_fix_are_retried() {
        let unreachable = registry::Error::Unreachable {
            host: "r".into(),
            reason: "connection refused".into(),
        };
        assert!(JobError::from(unreachable).is_transient());
        let denied = registry::Error::Unauthorized {
            host: "r".into(),
            repository: "a".into(),
        };
        assert!(!JobError::from(denied).is_transient());
        let gone = registry::Error::NotFound {
            what: "manifest".into(),
            repository: "a".into(),
            host: "r".into(),
        };
        assert!(!JobError::Service(ServiceError::Registry(gone)).is_transient());
        let io = ServiceError::Io {
            context: "writing",
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        assert!(JobError::Service(io).is_transient());
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host("http://127.0.0.1:5000/v2/a/manifests/x"),
            Some("127.0.0.1:5000")
        );
        assert_eq!(url_host("nope"), None);
    }
}
