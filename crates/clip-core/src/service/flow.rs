//! What every archiving flow does around its own work: look in the store first, publish
//! create-only (or replace an archive of the other version), record metrics, time phases.

use std::path::Path;
use std::time::Instant;

use super::error::{FallbackReason, ServiceError};
use super::store::{ArchiveVersion, StoredArchive};
use super::{ArchiveResult, ImageId, ImageService};
use crate::format;

/// A flow in progress: its name (the metrics label), when it started, and whether its archive
/// replaces one of the other version (or a damaged one) in the store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    pub(crate) name: &'static str,
    pub(crate) start: Instant,
    pub(crate) replace: bool,
}

/// Times a phase of a flow (`clip_phase_seconds{phase=…}`); recorded when dropped.
pub(crate) struct Phase(&'static str, Instant);

impl Phase {
    pub(crate) fn start(name: &'static str) -> Self {
        Self(name, Instant::now())
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        metrics::histogram!("clip_phase_seconds", "phase" => self.0)
            .record(self.1.elapsed().as_secs_f64());
    }
}

/// What the store holds for an image.
enum Lookup {
    Absent,
    Found(StoredArchive),
    /// Unreadable: it is replaced, never served.
    Damaged,
}

impl ImageService {
    /// Image `id`'s archive in the store, read enough to know its version.
    fn lookup(&self, id: &ImageId) -> Result<Lookup, ServiceError> {
        let local = match self.store.get(id) {
            Ok(Some(local)) => local,
            Ok(None) => return Ok(Lookup::Absent),
            // Not signed by a key this node trusts: never served, replaced by this node's own.
            Err(ServiceError::Untrusted(e)) => {
                tracing::warn!(image_id = %id, archive = %self.store.location(id), error = %e, "stored archive refused; it will be replaced");
                metrics::counter!("clip_store_objects_refused_total", "kind" => "archive")
                    .increment(1);
                return Ok(Lookup::Damaged);
            }
            Err(e) => return Err(e),
        };
        match format::Archive::open(&local) {
            Ok(a) => Ok(Lookup::Found(StoredArchive {
                image_id: id.to_string(),
                location: self.store.location(id),
                bytes: std::fs::metadata(&local).map_or(0, |m| m.len()),
                version: ArchiveVersion::of(a.kind()),
            })),
            Err(e) => {
                tracing::warn!(image_id = %id, archive = %self.store.location(id), error = %e, "stored archive is unreadable; it will be replaced");
                self.store.forget_copy(id);
                Ok(Lookup::Damaged)
            }
        }
    }

    /// Starts flow `name` for image `id` that plans a `planned` archive: `Err(result)` when the
    /// store holds one of that version already (the flow's answer, no work to do); otherwise
    /// the flow, replacing an archive of the other version (a rollout step moved the image) or a
    /// damaged one.
    pub(crate) fn begin(
        &self,
        name: &'static str,
        id: &ImageId,
        planned: ArchiveVersion,
        start: Instant,
    ) -> Result<Result<Flow, ArchiveResult>, ServiceError> {
        let replace = match self.lookup(id)? {
            Lookup::Absent => false,
            Lookup::Found(found) if found.version == planned => {
                return Ok(Err(Self::reused(name, found, start)));
            }
            Lookup::Found(found) => {
                tracing::info!(image_id = %id, archive = %found.location, "the store holds a {} archive; replacing it with {planned}", found.version);
                true
            }
            Lookup::Damaged => true,
        };
        Ok(Ok(Flow {
            name,
            start,
            replace,
        }))
    }

    /// The result for an image whose archive `found` is already in the store.
    fn reused(flow: &'static str, found: StoredArchive, start: Instant) -> ArchiveResult {
        tracing::info!(image_id = %found.image_id, archive = %found.location, version = found.version.number(), "archive already in the store; reusing it");
        metrics::counter!("clip_archives_reused_total", "flow" => flow, "version" => found.version.label())
            .increment(1);
        ArchiveResult {
            image_id: found.image_id,
            version: found.version,
            archive: found.location,
            bytes: found.bytes,
            fallback_reason: None,
            seconds: start.elapsed().as_secs_f64(),
            reused: true,
            reused_layers: 0,
            attached_layers: 0,
        }
    }

    /// Publishes the flow's archive at `local` and makes its result. When another worker
    /// published first, its archive is the answer.
    pub(crate) fn finish(
        &self,
        flow: Flow,
        id: &ImageId,
        version: ArchiveVersion,
        local: &Path,
        fallback: Option<&FallbackReason>,
        reused_layers: usize,
    ) -> Result<ArchiveResult, ServiceError> {
        let bytes = std::fs::metadata(local).map_or(0, |m| m.len());
        let created = if flow.replace {
            self.store.replace(id, local)?;
            true
        } else {
            self.store.put_if_absent(id, local)?
        };
        if created {
            tracing::info!(image_id = %id, archive = %self.store.location(id), "archive stored");
        } else {
            tracing::info!(image_id = %id, archive = %self.store.location(id), "archive already stored by another worker; reusing it");
            if let Lookup::Found(found) = self.lookup(id)? {
                return Ok(Self::reused(flow.name, found, flow.start));
            }
        }
        let v = version.label();
        metrics::histogram!("clip_flow_seconds", "flow" => flow.name, "version" => v)
            .record(flow.start.elapsed().as_secs_f64());
        metrics::histogram!("clip_archive_bytes", "flow" => flow.name, "version" => v)
            .record(bytes as f64);
        metrics::counter!("clip_archives_total", "flow" => flow.name, "version" => v).increment(1);
        if let Some(reason) = fallback {
            metrics::counter!("clip_fallbacks_total", "flow" => flow.name, "reason" => reason.kind())
                .increment(1);
        }
        Ok(ArchiveResult {
            image_id: id.to_string(),
            version,
            archive: self.store.location(id),
            bytes,
            fallback_reason: fallback.map(ToString::to_string),
            seconds: flow.start.elapsed().as_secs_f64(),
            reused: false,
            reused_layers,
            attached_layers: 0,
        })
    }
}
