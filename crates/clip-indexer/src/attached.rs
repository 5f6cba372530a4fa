//! Layer indexes that travel with the image: attached to its platform manifest in its own
//! registry as an OCI 1.1 artifact, and found there by anyone about to index it.
//!
//! # Model
//!
//! The attachment carries the image's per-layer indexes (the stored layer-index encoding,
//! [`crate::encode_layer_index`]; one blob per layer, annotated with its store key), not a
//! merged archive. Layer indexes are a function
//! of the layer blob and the span size only, so images that share base layers push the same
//! blobs — the registry stores them once — and a node's layer-index cache fills by layer digest
//! whichever image brought them. A node builds the archive from them (merging is local and
//! fast), exactly as it does from its own cache.
//!
//! An attachment is an artifact manifest of type [`ARTIFACT_TYPE`] whose `subject` is the
//! platform manifest (multi-arch images get one per platform), found through the referrers API
//! or the tag schema ([`clip_registry::referrers`]). [`Attached`] is a read-only
//! [`LayerIndexStore`] over the newest one: the indexer asks it like any other tier and uses an
//! index only if it names the same blob, span, size and `diff_id` as the layer (anything else,
//! or a blob that fails its digest, means the layer is indexed here). A fleet that signs its
//! stores passes a verifier that unwraps signed blobs and refuses unsigned or foreign ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use clip_format::Digest;
use clip_registry::referrers::ArtifactBlob;
use clip_registry::{BlockingClient, Reference};

use crate::reuse::{LAYER_INDEX_VERSION, LayerIndexStore, layer_key};
use crate::{Error, Result};

/// The `artifactType` of clip's layer-index attachments.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.clip.layer-indexes.v1";
/// The annotation naming a blob's layer-index store key.
pub const KEY_ANNOTATION: &str = "dev.clip.layer-index.key";
/// The largest attached layer index read.
const MAX_BLOB: u64 = 256 << 20;

/// The media type of one attached layer index (its encoding version included).
#[must_use]
pub fn blob_media_type() -> String {
    format!("application/vnd.dev.clip.layer-index.v{LAYER_INDEX_VERSION}")
}

/// Checks (and unwraps) an attached blob before it is used: `Err(why)` refuses it. Given the
/// blob's store key and bytes.
pub type Verifier =
    Arc<dyn Fn(&str, Vec<u8>) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// Makes the bytes to attach for a layer index (a signature, where the fleet signs).
pub type Sealer<'a> = &'a dyn Fn(&str, &[u8]) -> Vec<u8>;

/// The layer indexes attached to one image manifest (read-only).
pub struct Attached {
    net: BlockingClient,
    reference: Reference,
    artifact: Digest,
    blobs: HashMap<String, (Digest, u64)>,
    verify: Option<Verifier>,
    used: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("artifact", &self.artifact)
            .field("layers", &self.blobs.len())
            .finish_non_exhaustive()
    }
}

impl Attached {
    /// The newest attachment to manifest `manifest` of `reference`'s repository, if any.
    /// Attachments whose manifest does not name `manifest` as its subject are refused (and the
    /// next older one is tried). Blocking.
    pub fn find(
        net: &BlockingClient,
        reference: &Reference,
        manifest: &Digest,
        verify: Option<Verifier>,
    ) -> Result<Option<Self>> {
        let r = reference.pinned(manifest.as_str());
        let list = net.block_on(net.client().referrers(&r, manifest, Some(ARTIFACT_TYPE)))?;
        for found in list.iter().rev() {
            let doc = match net.block_on(net.client().artifact_manifest(
                &r,
                &found.digest,
                manifest,
            )) {
                Ok(doc) => doc,
                Err(e) => {
                    tracing::warn!(artifact = %found.digest, error = %e, "attached layer indexes refused");
                    continue;
                }
            };
            let mut blobs = HashMap::new();
            for l in doc["layers"].as_array().into_iter().flatten() {
                let key = l["annotations"][KEY_ANNOTATION].as_str();
                let digest = l["digest"].as_str().and_then(|d| Digest::parse(d).ok());
                let size = l["size"].as_u64();
                if let (Some(key), Some(digest), Some(size)) = (key, digest, size) {
                    blobs.insert(key.to_owned(), (digest, size));
                }
            }
            tracing::info!(image = %r, artifact = %found.digest, layers = blobs.len(), "found attached layer indexes");
            return Ok(Some(Self {
                net: net.clone(),
                reference: r,
                artifact: found.digest.clone(),
                blobs,
                verify,
                used: std::sync::atomic::AtomicUsize::new(0),
            }));
        }
        Ok(None)
    }

    /// The attachment's artifact manifest digest.
    #[must_use]
    pub fn artifact(&self) -> &Digest {
        &self.artifact
    }

    /// How many layer indexes it carries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// How many layer indexes were handed out (read, and accepted by the verifier).
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it carries none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

impl LayerIndexStore for Attached {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (digest, size) = self.blobs.get(key)?;
        if *size > MAX_BLOB {
            tracing::warn!(
                key,
                size,
                "attached layer index too large; indexing the layer here"
            );
            return None;
        }
        let limit = usize::try_from(*size).ok()?;
        let bytes = match self.net.block_on(self.net.client().blob_bytes(
            &self.reference,
            digest,
            limit,
        )) {
            Ok(b) => b.to_vec(),
            Err(e) => {
                tracing::warn!(key, error = %e, "attached layer index unreadable; indexing the layer here");
                return None;
            }
        };
        let out = match &self.verify {
            None => Some(bytes),
            Some(v) => match v(key, bytes) {
                Ok(b) => Some(b),
                Err(why) => {
                    tracing::warn!(key, reason = %why, "attached layer index refused; indexing the layer here");
                    None
                }
            },
        };
        if out.is_some() {
            self.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out
    }

    fn put(&self, _key: &str, _bytes: &[u8]) -> std::io::Result<bool> {
        Ok(false)
    }

    fn describe(&self) -> String {
        format!("attached to {} ({})", self.reference, self.artifact)
    }
}

/// What [`attach`] pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSummary {
    /// The platform manifest it is attached to.
    pub subject: Digest,
    /// The attachment's artifact manifest.
    pub artifact: Digest,
    /// Layer indexes attached.
    pub layers: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Attaches the layer indexes of image `reference` (its `platform` manifest, default this
/// machine's), indexed with spans of `span` bytes and held in `store`, to that manifest in its
/// registry. Every layer's index must be in `store` (index the image with it first). `seal`
/// turns an index into the bytes to push (signing it, where the fleet signs). Blocking.
pub fn attach(
    net: &BlockingClient,
    reference: &str,
    platform: Option<&clip_registry::Platform>,
    store: &dyn LayerIndexStore,
    span: u64,
    seal: Option<Sealer<'_>>,
) -> Result<AttachSummary> {
    let r = Reference::parse(reference)?;
    let image = net.block_on(net.client().resolve(&r, platform))?;
    let (manifest_bytes, media, _) = net.block_on(
        net.client()
            .manifest(&image.reference, image.manifest_digest.as_str()),
    )?;
    let mut blobs = Vec::new();
    let mut bytes = 0u64;
    for (i, d) in image.manifest.layers().iter().enumerate() {
        let digest = clip_registry::oci::digest(d)?;
        let key = layer_key(&digest, span);
        let index = store.get(&key).ok_or_else(|| {
            Error::Image(format!(
                "layer {i} ({digest}) has no stored index in {} (index the image with it first)",
                store.describe()
            ))
        })?;
        let sealed = seal.map_or_else(|| index.clone(), |s| s(&key, &index));
        bytes += sealed.len() as u64;
        blobs.push(ArtifactBlob {
            media_type: blob_media_type(),
            bytes: Bytes::from(sealed),
            annotations: BTreeMap::from([
                (KEY_ANNOTATION.to_owned(), key),
                ("dev.clip.layer.digest".to_owned(), digest.to_string()),
            ]),
        });
    }
    let layers = blobs.len();
    let media = if media.is_empty() {
        clip_registry::referrers::MANIFEST_MEDIA_TYPE.to_owned()
    } else {
        media
    };
    let artifact = net.block_on(net.client().attach(
        &image.reference,
        (&image.manifest_digest, &media, manifest_bytes.len() as u64),
        ARTIFACT_TYPE,
        blobs,
        BTreeMap::from([("dev.clip.span-bytes".to_owned(), span.to_string())]),
    ))?;
    tracing::info!(image = %image.reference, artifact = %artifact, layers, bytes, "attached layer indexes");
    Ok(AttachSummary {
        subject: image.manifest_digest,
        artifact,
        layers,
        bytes,
    })
}
