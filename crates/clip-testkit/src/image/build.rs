//! Images → blobs, manifests and indexes; OCI layout directories.

use std::path::Path;

use super::{Compression, Image, ManifestFormat};
use super::{compress, write_tar};
use crate::error::{Error, IoContext, Result};
use crate::media::sha256_digest;

/// Bytes with their digest and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:…`.
    pub digest: String,
    /// The media type the referring descriptor gives.
    pub media_type: String,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Annotations of the referring descriptor.
    pub annotations: Vec<(String, String)>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256_digest(&bytes),
            media_type: media_type.into(),
            bytes,
            annotations: Vec::new(),
        }
    }
    fn descriptor(&self) -> serde_json::Value {
        let mut d = serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()});
        if !self.annotations.is_empty() {
            d["annotations"] = self
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                .collect();
        }
        d
    }
}

/// A layer as built: the blob, and the uncompressed tar with its digest (the `diff_id`).
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The (compressed) blob.
    pub blob: Blob,
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
}

/// One platform's manifest with its config and layers.
#[derive(Debug, Clone)]
pub struct BuiltManifest {
    /// The manifest.
    pub manifest: Blob,
    /// The config.
    pub config: Blob,
    /// The layers.
    pub layers: Vec<BuiltLayer>,
    /// The platform descriptor (`os`, `architecture`, `variant`).
    pub platform: serde_json::Value,
}

/// What [`ImageBuilder::build`] produces.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// One manifest per platform.
    pub manifests: Vec<BuiltManifest>,
    /// The index / manifest list, when there is more than one platform.
    pub index: Option<Blob>,
}

/// An image as pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `HOST/REPO:TAG`.
    pub reference: String,
    /// `HOST/REPO@DIGEST` (digest of the index or the single manifest).
    pub pinned: String,
    /// The top-level digest.
    pub digest: String,
}

/// Builds one or more platform images into blobs and manifests.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    format: ManifestFormat,
    images: Vec<Image>,
    force_index: bool,
}

impl ImageBuilder {
    /// Builds the images and writes them as an OCI layout at `dir` with `tag` naming them.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        self.build()?.write_oci_layout(dir, tag)
    }

    /// A builder for manifests of `format`.
    #[must_use]
    pub fn new(format: ManifestFormat) -> Self {
        Self {
            format,
            images: Vec::new(),
            force_index: false,
        }
    }
    /// Adds a platform image.
    #[must_use]
    pub fn image(mut self, image: Image) -> Self {
        self.images.push(image);
        self
    }
    /// Writes an index even for a single platform.
    #[must_use]
    pub fn force_index(mut self) -> Self {
        self.force_index = true;
        self
    }

    /// Builds every blob.
    pub fn build(&self) -> Result<BuiltImage> {
        if self.images.is_empty() {
            return Err(Error::InvalidImage("no platform image".into()));
        }
        let manifests = self
            .images
            .iter()
            .map(|img| build_manifest(img, self.format))
            .collect::<Result<Vec<_>>>()?;
        let index = if manifests.len() > 1 || self.force_index {
            let media_type = match self.format {
                ManifestFormat::Oci => "application/vnd.oci.image.index.v1+json",
                ManifestFormat::Docker => {
                    "application/vnd.docker.distribution.manifest.list.v2+json"
                }
            };
            let list: Vec<_> = manifests
                .iter()
                .map(|m| {
                    let mut d = m.manifest.descriptor();
                    d["platform"] = m.platform.clone();
                    d
                })
                .collect();
            let doc =
                serde_json::json!({"schemaVersion": 2, "mediaType": media_type, "manifests": list});
            Some(Blob::new(media_type, to_json(&doc)?))
        } else {
            None
        };
        Ok(BuiltImage { manifests, index })
    }
}

impl BuiltImage {
    /// A hostile image: the (single-platform) image's config claims `diff_ids` — another
    /// image's — while its layers stay its own; config and manifest blobs are rebuilt around
    /// the lie (what a chain-id poisoning attack pushes).
    pub fn forge_diff_ids(&mut self, diff_ids: &[String]) -> Result<()> {
        let m = self
            .manifests
            .first_mut()
            .ok_or_else(|| Error::InvalidImage("no manifest".into()))?;
        let mut config: serde_json::Value = serde_json::from_slice(&m.config.bytes)
            .map_err(|e| Error::InvalidImage(format!("config: {e}")))?;
        config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
        m.config = Blob::new(&m.config.media_type.clone(), to_json(&config)?);
        let mut manifest: serde_json::Value = serde_json::from_slice(&m.manifest.bytes)
            .map_err(|e| Error::InvalidImage(format!("manifest: {e}")))?;
        manifest["config"]["digest"] = serde_json::json!(m.config.digest);
        manifest["config"]["size"] = serde_json::json!(m.config.bytes.len());
        m.manifest = Blob::new(&m.manifest.media_type.clone(), to_json(&manifest)?);
        self.index = None;
        Ok(())
    }

    /// The digest a client resolves the tag to.
    #[must_use]
    pub fn digest(&self) -> &str {
        match &self.index {
            Some(i) => &i.digest,
            None => &self.manifests[0].manifest.digest,
        }
    }

    /// Writes an OCI image layout (as `buildah push oci:DIR:TAG` does) with `tag` naming the image.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        let write_blob = |b: &Blob| -> Result<()> {
            let hex = b.digest.trim_start_matches("sha256:");
            let p = blobs.join(hex);
            std::fs::write(&p, &b.bytes).ctx(|| format!("writing {}", p.display()))
        };
        for m in &self.manifests {
            for l in &m.layers {
                write_blob(&l.blob)?;
            }
            write_blob(&m.config)?;
            write_blob(&m.manifest)?;
        }
        let top = match &self.index {
            Some(i) => {
                write_blob(i)?;
                i
            }
            None => &self.manifests[0].manifest,
        };
        let mut desc = top.descriptor();
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]});
        let p = dir.join("index.json");
        std::fs::write(&p, to_json(&index)?).ctx(|| format!("writing {}", p.display()))?;
        let p = dir.join("oci-layout");
        std::fs::write(&p, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .ctx(|| format!("writing {}", p.display()))
    }
}

pub(crate) fn to_json(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::InvalidImage(format!("serialising JSON: {e}")))
}

fn layer_media_type(format: ManifestFormat, c: Compression) -> Result<&'static str> {
    Ok(match (format, c) {
        (ManifestFormat::Oci, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
        (
            ManifestFormat::Oci,
            Compression::Gzip | Compression::GzipMultiMember(_) | Compression::EStargz(_),
        ) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (
            ManifestFormat::Oci,
            Compression::Zstd | Compression::ZstdMultiFrame(_) | Compression::ZstdChunked,
        ) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (ManifestFormat::Docker, Compression::None) => {
            "application/vnd.docker.image.rootfs.diff.tar"
        }
        (
            ManifestFormat::Docker,
            Compression::Gzip | Compression::GzipMultiMember(_) | Compression::EStargz(_),
        ) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        (ManifestFormat::Docker, _) => {
            return Err(Error::InvalidImage(
                "Docker v2 schema 2 has no zstd layer type".into(),
            ));
        }
    })
}

// Over 100 lines on purpose: test support: assembles an image's blobs, config and manifest (OCI
// or Docker) as the two formats lay them out.
fn build_manifest(img: &Image, format: ManifestFormat) -> Result<BuiltManifest> {
    let mut layers = Vec::new();
    for layer in &img.layers {
        let tar = match &layer.raw_tar {
            Some(t) => t.clone(),
            None if matches!(
                layer.compression,
                Compression::EStargz(_) | Compression::ZstdChunked
            ) =>
            {
                write_tar(&layer.sparse_expanded())?
            }
            None => write_tar(layer)?,
        };
        if layer.compression == Compression::ZstdChunked {
            let z = crate::zstd_chunked::build(&tar)?;
            let mut blob = Blob::new(layer_media_type(format, layer.compression)?, z.blob);
            blob.annotations = z.annotations;
            layers.push(BuiltLayer {
                blob,
                diff_id: sha256_digest(&z.tar),
                tar: z.tar,
            });
            continue;
        }
        if let Compression::EStargz(chunk) = layer.compression {
            // The blob's tar stream is the input's entries plus the TOC entry.
            let e = crate::estargz::build(&tar, chunk)?;
            let mut blob = Blob::new(layer_media_type(format, layer.compression)?, e.blob);
            blob.annotations
                .push((crate::estargz::TOC_DIGEST_ANNOTATION.into(), e.toc_digest));
            layers.push(BuiltLayer {
                blob,
                diff_id: sha256_digest(&e.tar),
                tar: e.tar,
            });
            continue;
        }
        let bytes = compress(&tar, layer.compression)?;
        layers.push(BuiltLayer {
            blob: Blob::new(layer_media_type(format, layer.compression)?, bytes),
            diff_id: sha256_digest(&tar),
            tar,
        });
    }
    let c = &img.config;
    let mut cfg = serde_json::json!({
        "Env": c.env,
        "Cmd": c.cmd,
    });
    if !c.entrypoint.is_empty() {
        cfg["Entrypoint"] = c.entrypoint.clone().into();
    }
    if !c.working_dir.is_empty() {
        cfg["WorkingDir"] = c.working_dir.clone().into();
    }
    if !c.user.is_empty() {
        cfg["User"] = c.user.clone().into();
    }
    if !c.stop_signal.is_empty() {
        cfg["StopSignal"] = c.stop_signal.clone().into();
    }
    if !c.labels.is_empty() {
        cfg["Labels"] = c
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
            .collect();
    }
    if !c.exposed_ports.is_empty() {
        cfg["ExposedPorts"] = c
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
    }
    if !c.volumes.is_empty() {
        cfg["Volumes"] = c
            .volumes
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
    }
    let mut platform = serde_json::json!({"os": img.os, "architecture": img.architecture});
    let mut config = serde_json::json!({
        "created": "2023-11-14T22:13:20Z",
        "os": img.os,
        "architecture": img.architecture,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": (0..layers.len()).map(|i| serde_json::json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("clip-testkit layer {i}")})).collect::<Vec<_>>(),
    });
    if let Some(v) = &img.variant {
        config["variant"] = v.clone().into();
        platform["variant"] = v.clone().into();
    }
    let (manifest_type, config_type) = match format {
        ManifestFormat::Oci => (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
        ),
        ManifestFormat::Docker => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
        ),
    };
    let config = Blob::new(config_type, to_json(&config)?);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
    });
    Ok(BuiltManifest {
        manifest: Blob::new(manifest_type, to_json(&manifest)?),
        config,
        layers,
        platform,
    })
}
