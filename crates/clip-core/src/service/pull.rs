//! PullAndArchiveImage: v2 indexes straight from the source registry; v1 copies the image into
//! an OCI layout, extracts and archives it. Any v2 failure falls back to v1.

use std::sync::Arc;
use std::time::Instant;

use clip_policy::PullPlan;

use super::error::{FallbackReason, ServiceError};
use super::store::ArchiveVersion;
use super::{ArchiveResult, ImageId, ImageService};
use crate::{archive, indexer, registry};

impl ImageService {
    /// Pulls `image_ref` and stores its archive (v2 or v1 per the configuration).
    pub fn pull_and_archive(&self, image_ref: &str) -> Result<ArchiveResult, ServiceError> {
        let start = Instant::now();
        let reference = registry::Reference::parse(image_ref)?;
        let resolved = self
            .net
            .block_on(self.net.client().resolve(&reference, None))?;
        let id = ImageId::hashed(&[
            reference.registry.as_bytes(),
            reference.repository.as_bytes(),
            resolved.manifest_digest.as_str().as_bytes(),
        ]);
        let plan = clip_policy::pull_plan(&self.cfg, id.as_str());
        let planned = match plan {
            PullPlan::IndexFromRegistry => ArchiveVersion::V2,
            PullPlan::CopyAndArchive => ArchiveVersion::V1,
        };
        let flow = match self.begin("pull", &id, planned, start)? {
            Ok(flow) => flow,
            Err(stored) => return Ok(stored),
        };
        let out = self.staged_path(&id);
        if self.cfg.clip_version == 2 && !clip_policy::in_v2_rollout(&self.cfg, id.as_str()) {
            tracing::info!(image = image_ref, image_id = %id, percent = self.cfg.clip_v2_rollout_percent, "outside the v2 rollout: this image uses v1");
        }
        let mut fallback = None;
        if plan == PullPlan::IndexFromRegistry {
            tracing::info!(
                image = image_ref,
                "Creating index-only archive directly from registry"
            );
            let input = indexer::Input::Registry {
                reference: image_ref,
                client: &self.net,
            };
            // The layer indexes attached to the image in its registry, if any: layers they
            // cover are not streamed.
            let attached = crate::node::attached_indexes(
                &self.net,
                &resolved.reference,
                &resolved.manifest_digest,
                Arc::clone(&self.trust),
                false,
            )
            .map(Arc::new);
            let mut opts = self.index_options();
            opts.layer_store =
                crate::node::with_attached(opts.layer_store.take(), attached.clone());
            match indexer::index(input, &out, &opts, None) {
                Ok(s) => {
                    tracing::info!(
                        image = image_ref,
                        bytes = s.archive_bytes,
                        reused_layers = s.reused_layers,
                        "v2 archive created directly from registry"
                    );
                    let mut r =
                        self.finish(flow, &id, ArchiveVersion::V2, &out, None, s.reused_layers)?;
                    r.attached_layers = attached.as_ref().map_or(0, |a| a.used());
                    return Ok(r);
                }
                Err(e) => {
                    let reason = FallbackReason::IndexFailed(e);
                    reason.log(image_ref);
                    fallback = Some(reason);
                }
            }
        }
        tracing::info!(image = image_ref, "Creating legacy archive (Clip v1)");
        archive::archive_image(image_ref, &self.net, None, &out, None)?;
        self.finish(flow, &id, ArchiveVersion::V1, &out, fallback.as_ref(), 0)
    }
}

impl ImageService {
    /// Attaches the layer indexes of `image_ref` (as this worker indexed them, in its layer
    /// cache) to the image in its registry, signed with `signingKey` where one is configured;
    /// `None` when the image already carries an attachment of every layer.
    pub fn attach_index(
        &self,
        image_ref: &str,
    ) -> Result<Option<indexer::AttachSummary>, ServiceError> {
        let reference = registry::Reference::parse(image_ref)?;
        let resolved = self
            .net
            .block_on(self.net.client().resolve(&reference, None))?;
        let present = indexer::Attached::find(
            &self.net,
            &resolved.reference,
            &resolved.manifest_digest,
            None,
        )?;
        if present.is_some_and(|a| a.len() >= resolved.manifest.layers().len()) {
            return Ok(None);
        }
        let local = crate::node::layer_cache(&self.cfg)?;
        let trust = Arc::clone(&self.trust);
        let seal = move |key: &str, bytes: &[u8]| trust.seal(key, bytes);
        Ok(Some(indexer::attach(
            &self.net,
            resolved.reference.to_string().as_str(),
            None,
            &local,
            self.cfg.checkpoint_mib.max(1) << 20,
            Some(&seal),
        )?))
    }
}
