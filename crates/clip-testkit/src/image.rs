//! Programmatic, seeded, deterministic OCI and Docker images.
//!
//! An [`Image`] is a list of [`Layer`]s of [`Entry`]s plus a config. [`ImageBuilder`] turns one or
//! more images (one per platform) into blobs and manifests — a single manifest, or an image index /
//! manifest list for several platforms — which can be pushed to a [`Registry`] or written as an OCI
//! layout directory. [`edge_cases`] describes an image that exercises every merge rule and entry
//! kind the product must get right.

use std::io::Write as _;
use std::path::Path;

use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::registry::Registry;

/// An `Accept` header listing every manifest type.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// One gzip member.
    Gzip,
    /// Several concatenated gzip members (what pigz and some builders produce).
    GzipMultiMember(usize),
    /// One zstd frame.
    Zstd,
    /// Several concatenated zstd frames.
    ZstdMultiFrame(usize),
    /// eStargz with data chunks of at most this many bytes (gzip members per chunk, a TOC, a
    /// footer, and the TOC digest annotation on the descriptor).
    EStargz(usize),
    /// zstd:chunked (a zstd frame per file's data, the manifest in a skippable frame, the
    /// manifest position and checksum annotations on the descriptor).
    ZstdChunked,
}

/// Which manifest media types to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// OCI image manifest / image index.
    Oci,
    /// Docker v2 schema 2 manifest / manifest list.
    Docker,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file with its content.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symbolic link to the target.
    Symlink(String),
    /// A hard link to an earlier entry of the same layer (path as written in the tar).
    Hardlink(String),
    /// A named pipe.
    Fifo,
    /// A character device (major, minor).
    CharDevice(u32, u32),
    /// A block device (major, minor).
    BlockDevice(u32, u32),
    /// A sparse regular file of `size` bytes holding `data` (offset, bytes) and zeros elsewhere,
    /// written as GNU tar writes it in `format`.
    Sparse {
        /// Logical size.
        size: u64,
        /// The data extents: logical offset and bytes, in order, not overlapping.
        data: Vec<(u64, Vec<u8>)>,
        /// Which PAX sparse format.
        format: SparseFormat,
    },
}

/// GNU tar's PAX sparse formats (`tar --sparse --format=posix --sparse-version=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseFormat {
    /// 0.0: repeated `GNU.sparse.offset`/`numbytes` records; the header keeps the real name.
    Pax00,
    /// 0.1: one `GNU.sparse.map` record; the real name in `GNU.sparse.name`.
    Pax01,
    /// 1.0: the map leads the data in 512-byte blocks; the real name in `GNU.sparse.name`.
    Pax10,
}

impl Kind {
    /// A sparse file's logical content.
    #[must_use]
    pub fn sparse_content(size: u64, data: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(size).unwrap_or(0)];
        for (off, bytes) in data {
            let at = usize::try_from(*off).unwrap_or(0);
            v[at..at + bytes.len()].copy_from_slice(bytes);
        }
        v
    }
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the layer, without a leading `/`.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time: seconds and nanoseconds (nanoseconds go in a PAX record).
    pub mtime: (u64, u32),
    /// Extended attributes, written as `SCHILY.xattr.` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Write the path in a PAX `path` record instead of a GNU long-name entry.
    pub pax_path: bool,
}

/// A default modification time for entries (2023-11-14T22:13:20Z).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

impl Entry {
    fn new(path: &str, kind: Kind, mode: u32) -> Self {
        Self {
            path: path.trim_start_matches('/').to_owned(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: (DEFAULT_MTIME, 0),
            xattrs: Vec::new(),
            pax_path: false,
        }
    }
    /// A sparse regular file, mode 0644: `size` bytes, `data` at its offsets, zeros elsewhere.
    #[must_use]
    pub fn sparse(path: &str, size: u64, data: Vec<(u64, Vec<u8>)>, format: SparseFormat) -> Self {
        Self::new(path, Kind::Sparse { size, data, format }, 0o644)
    }
    /// A regular file, mode 0644.
    #[must_use]
    pub fn file(path: &str, content: impl Into<Vec<u8>>) -> Self {
        Self::new(path, Kind::File(content.into()), 0o644)
    }
    /// A directory, mode 0755.
    #[must_use]
    pub fn dir(path: &str) -> Self {
        Self::new(path, Kind::Dir, 0o755)
    }
    /// A symlink, mode 0777.
    #[must_use]
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, Kind::Symlink(target.into()), 0o777)
    }
    /// A hard link to `target` (an earlier entry of the same layer).
    #[must_use]
    pub fn hardlink(path: &str, target: &str) -> Self {
        Self::new(
            path,
            Kind::Hardlink(target.trim_start_matches('/').into()),
            0o644,
        )
    }
    /// A fifo, mode 0644.
    #[must_use]
    pub fn fifo(path: &str) -> Self {
        Self::new(path, Kind::Fifo, 0o644)
    }
    /// A character device, mode 0666.
    #[must_use]
    pub fn char_device(path: &str, major: u32, minor: u32) -> Self {
        Self::new(path, Kind::CharDevice(major, minor), 0o666)
    }
    /// A block device, mode 0660.
    #[must_use]
    pub fn block_device(path: &str, major: u32, minor: u32) -> Self {
        Self::new(path, Kind::BlockDevice(major, minor), 0o660)
    }
    /// A whiteout: hides `path` of the layers below.
    #[must_use]
    pub fn whiteout(path: &str) -> Self {
        let path = path.trim_matches('/');
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        Self::new(&wh, Kind::File(Vec::new()), 0o644)
    }
    /// An opaque marker: hides every child of `dir` from the layers below.
    #[must_use]
    pub fn opaque(dir: &str) -> Self {
        Self::new(
            &format!("{}/.wh..wh..opq", dir.trim_matches('/')),
            Kind::File(Vec::new()),
            0o644,
        )
    }
    /// Sets the permission bits.
    #[must_use]
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    /// Sets owner and group.
    #[must_use]
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    /// Sets the modification time.
    #[must_use]
    pub fn mtime(mut self, secs: u64, nanos: u32) -> Self {
        self.mtime = (secs, nanos);
        self
    }
    /// Adds an extended attribute.
    #[must_use]
    pub fn xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.push((name.into(), value.into()));
        self
    }
    /// Writes the path as a PAX record.
    #[must_use]
    pub fn pax_path(mut self) -> Self {
        self.pax_path = true;
        self
    }
}

/// One layer: its entries in tar order and its compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Entries, in the order they are written.
    pub entries: Vec<Entry>,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Prefix every path with `./` (as some tools write them).
    pub dot_slash: bool,
    /// A ready-made tar stream (e.g. from GNU tar) used instead of `entries`.
    pub raw_tar: Option<Vec<u8>>,
}

impl Layer {
    /// A gzip layer of `entries`.
    #[must_use]
    pub fn new(entries: Vec<Entry>) -> Self {
        Self {
            entries,
            compression: Compression::Gzip,
            dot_slash: false,
            raw_tar: None,
        }
    }
    /// A layer whose tar stream was written by another tool.
    #[must_use]
    pub fn from_tar(tar: Vec<u8>) -> Self {
        Self {
            entries: Vec::new(),
            compression: Compression::Gzip,
            dot_slash: false,
            raw_tar: Some(tar),
        }
    }
    /// Sets the compression.
    #[must_use]
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }
    /// Writes paths as `./path`.
    #[must_use]
    pub fn dot_slash(mut self) -> Self {
        self.dot_slash = true;
        self
    }
    /// The layer with every sparse file written whole (as eStargz and zstd:chunked converters
    /// write them: they read the source tar with a reader that expands sparse files).
    #[must_use]
    pub fn sparse_expanded(&self) -> Self {
        let mut l = self.clone();
        for e in &mut l.entries {
            if let Kind::Sparse { size, data, .. } = &e.kind {
                e.kind = Kind::File(Kind::sparse_content(*size, data));
            }
        }
        l
    }
}

/// The runtime part of the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// User.
    pub user: String,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Exposed ports, e.g. `8080/tcp`.
    pub exposed_ports: Vec<String>,
    /// Volumes.
    pub volumes: Vec<String>,
    /// Stop signal.
    pub stop_signal: String,
}

/// An image for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Runtime config.
    pub config: RuntimeConfig,
    /// `os` of the platform.
    pub os: String,
    /// `architecture` of the platform.
    pub architecture: String,
    /// `variant`, e.g. `v8`.
    pub variant: Option<String>,
}

impl Image {
    /// A linux/amd64 image of `layers`.
    #[must_use]
    pub fn new(layers: Vec<Layer>) -> Self {
        Self {
            layers,
            config: RuntimeConfig {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                cmd: vec!["/bin/sh".into()],
                ..RuntimeConfig::default()
            },
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
    /// Sets the platform.
    #[must_use]
    pub fn platform(mut self, os: &str, architecture: &str, variant: Option<&str>) -> Self {
        self.os = os.into();
        self.architecture = architecture.into();
        self.variant = variant.map(Into::into);
        self
    }
    /// Sets the compression of every layer.
    #[must_use]
    pub fn with_compression(mut self, c: Compression) -> Self {
        for l in &mut self.layers {
            l.compression = c;
        }
        self
    }
}

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
    /// The digest a client resolves the tag to.
    #[must_use]
    pub fn digest(&self) -> &str {
        match &self.index {
            Some(i) => &i.digest,
            None => &self.manifests[0].manifest.digest,
        }
    }

    /// Pushes blobs, manifests and the index, and tags the top-level document.
    pub fn push(&self, registry: &Registry, repo: &str, tag: &str) -> Result<PushedImage> {
        let client = registry.client()?;
        for m in &self.manifests {
            for l in &m.layers {
                client.push_blob(repo, &l.blob.digest, &l.blob.bytes)?;
            }
            client.push_blob(repo, &m.config.digest, &m.config.bytes)?;
            let reference = if self.index.is_some() {
                m.manifest.digest.as_str()
            } else {
                tag
            };
            client.push_manifest(repo, reference, &m.manifest.media_type, &m.manifest.bytes)?;
        }
        if let Some(index) = &self.index {
            client.push_manifest(repo, tag, &index.media_type, &index.bytes)?;
        }
        let host = registry.host();
        Ok(PushedImage {
            reference: format!("{host}/{repo}:{tag}"),
            pinned: format!("{host}/{repo}@{}", self.digest()),
            digest: self.digest().to_owned(),
        })
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

fn to_json(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::InvalidImage(format!("serialising JSON: {e}")))
}

/// `sha256:HEX` of `bytes`.
#[must_use]
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
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

/// Writes a layer's entries as a tar stream (GNU headers; PAX records where needed).
pub fn write_tar(layer: &Layer) -> Result<Vec<u8>> {
    let io = |what: &str, e: std::io::Error| {
        Error::InvalidImage(format!("writing tar entry {what}: {e}"))
    };
    let mut b = tar::Builder::new(Vec::new());
    for e in &layer.entries {
        let mut path = if layer.dot_slash {
            format!("./{}", e.path)
        } else {
            e.path.clone()
        };
        if e.kind == Kind::Dir && !path.ends_with('/') {
            path.push('/');
        }
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if e.mtime.1 != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", e.mtime.0, e.mtime.1).into_bytes(),
            ));
        }
        for (k, v) in &e.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        if e.pax_path {
            pax.push(("path".into(), path.clone().into_bytes()));
        }
        // A sparse file: its PAX records, the name its header carries, and its stored bytes.
        let sparse_body = match &e.kind {
            Kind::Sparse { size, data, format } => {
                Some(sparse_records(&path, *size, data, *format, &mut pax))
            }
            _ => None,
        };
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|x| io(&e.path, x))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime.0);
        h.set_size(0);
        let (ty, data): (tar::EntryType, &[u8]) = match &e.kind {
            Kind::File(c) => (tar::EntryType::Regular, c),
            Kind::Dir => (tar::EntryType::Directory, &[]),
            Kind::Symlink(_) => (tar::EntryType::Symlink, &[]),
            Kind::Hardlink(_) => (tar::EntryType::Link, &[]),
            Kind::Fifo => (tar::EntryType::Fifo, &[]),
            Kind::CharDevice(..) => (tar::EntryType::Char, &[]),
            Kind::BlockDevice(..) => (tar::EntryType::Block, &[]),
            Kind::Sparse { .. } => (
                tar::EntryType::Regular,
                sparse_body.as_ref().map_or(&[][..], |(_, b)| b),
            ),
        };
        h.set_entry_type(ty);
        if let Kind::CharDevice(ma, mi) | Kind::BlockDevice(ma, mi) = e.kind {
            h.set_device_major(ma).map_err(|x| io(&e.path, x))?;
            h.set_device_minor(mi).map_err(|x| io(&e.path, x))?;
        }
        match &e.kind {
            Kind::Symlink(target) | Kind::Hardlink(target) => {
                let target = if layer.dot_slash && matches!(e.kind, Kind::Hardlink(_)) {
                    format!("./{target}")
                } else {
                    target.clone()
                };
                if e.pax_path {
                    set_raw_name(&mut h, &path);
                    h.set_link_name(&target).map_err(|x| io(&e.path, x))?;
                    h.set_cksum();
                    b.append(&h, data).map_err(|x| io(&e.path, x))?;
                } else {
                    b.append_link(&mut h, &path, &target)
                        .map_err(|x| io(&e.path, x))?;
                }
            }
            Kind::Sparse { .. } => {
                h.set_size(data.len() as u64);
                let name = sparse_body.as_ref().map_or(path.as_str(), |(n, _)| n);
                b.append_data(&mut h, name, data)
                    .map_err(|x| io(&e.path, x))?;
            }
            _ => {
                h.set_size(data.len() as u64);
                if e.pax_path {
                    set_raw_name(&mut h, &path);
                    h.set_cksum();
                    b.append(&h, data).map_err(|x| io(&e.path, x))?;
                } else {
                    b.append_data(&mut h, &path, data)
                        .map_err(|x| io(&e.path, x))?;
                }
            }
        }
    }
    b.into_inner().map_err(|x| io("(finish)", x))
}

/// Adds the PAX records GNU tar writes for a sparse file in `format` to `pax`; returns the name
/// its header carries and its stored bytes (the 1.0 map, padded to 512, then the data extents).
/// Like GNU tar, the map ends with an empty extent at the file's end.
fn sparse_records(
    path: &str,
    size: u64,
    data: &[(u64, Vec<u8>)],
    format: SparseFormat,
    pax: &mut Vec<(String, Vec<u8>)>,
) -> (String, Vec<u8>) {
    let mut extents: Vec<(u64, u64)> = data.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
    extents.push((size, 0));
    let (dir, base) = path.rsplit_once('/').map_or(("", path), |(d, b)| (d, b));
    let hidden = if dir.is_empty() {
        format!("GNUSparseFile.0/{base}")
    } else {
        format!("{dir}/GNUSparseFile.0/{base}")
    };
    let mut rec = |k: &str, v: String| pax.push((k.to_owned(), v.into_bytes()));
    let mut body = Vec::new();
    let header_name = match format {
        SparseFormat::Pax00 => {
            rec("GNU.sparse.size", size.to_string());
            rec("GNU.sparse.numblocks", extents.len().to_string());
            for (o, l) in &extents {
                rec("GNU.sparse.offset", o.to_string());
                rec("GNU.sparse.numbytes", l.to_string());
            }
            path.to_owned()
        }
        SparseFormat::Pax01 => {
            rec("GNU.sparse.size", size.to_string());
            rec("GNU.sparse.numblocks", extents.len().to_string());
            rec("GNU.sparse.name", path.to_owned());
            let map: Vec<String> = extents
                .iter()
                .flat_map(|(o, l)| [o.to_string(), l.to_string()])
                .collect();
            rec("GNU.sparse.map", map.join(","));
            hidden
        }
        SparseFormat::Pax10 => {
            rec("GNU.sparse.major", "1".into());
            rec("GNU.sparse.minor", "0".into());
            rec("GNU.sparse.name", path.to_owned());
            rec("GNU.sparse.realsize", size.to_string());
            let mut map = format!("{}\n", extents.len());
            for (o, l) in &extents {
                for n in [o, l] {
                    map.push_str(&n.to_string());
                    map.push('\n');
                }
            }
            body.extend_from_slice(map.as_bytes());
            body.resize(body.len().next_multiple_of(512), 0);
            hidden
        }
    };
    for (_, bytes) in data {
        body.extend_from_slice(bytes);
    }
    (header_name, body)
}

/// Puts the first 99 bytes of `path` in the header's name field (the PAX record holds the rest).
fn set_raw_name(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    let n = path.len().min(99);
    name[..n].copy_from_slice(&path.as_bytes()[..n]);
}

fn split_points(len: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let step = len.div_ceil(parts).max(1);
    (0..len)
        .step_by(step)
        .map(|s| (s, (s + step).min(len)))
        .collect::<Vec<_>>()
}

/// Compresses a tar stream as the layer asks.
pub fn compress(tar: &[u8], c: Compression) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::InvalidImage(format!("compressing a layer: {e}"));
    let gzip = |data: &[u8]| -> Result<Vec<u8>> {
        let mut enc = GzEncoder::new(Vec::new(), GzLevel::new(6));
        enc.write_all(data).map_err(io)?;
        enc.finish().map_err(io)
    };
    let zstd = |data: &[u8]| zstd::bulk::compress(data, 3).map_err(io);
    Ok(match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => gzip(tar)?,
        Compression::Zstd => zstd(tar)?,
        Compression::GzipMultiMember(n) => {
            let mut out = Vec::new();
            for (s, e) in split_points(tar.len(), n) {
                out.extend(gzip(&tar[s..e])?);
            }
            out
        }
        Compression::ZstdMultiFrame(n) => {
            let mut out = Vec::new();
            for (s, e) in split_points(tar.len(), n) {
                out.extend(zstd(&tar[s..e])?);
            }
            out
        }
        Compression::EStargz(chunk) => crate::estargz::build(tar, chunk)?.blob,
        Compression::ZstdChunked => crate::zstd_chunked::build(tar)?.blob,
    })
}

/// Seeded pseudo-random bytes (incompressible).
#[must_use]
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Seeded pseudo-text (compresses like real files do, roughly 3:1 with gzip).
#[must_use]
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "container",
        "image",
        "layer",
        "registry",
        "digest",
        "manifest",
        "gzip",
        "index",
        "mount",
        "lazy",
        "fuse",
        "overlay",
        "runtime",
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "for",
        "on",
        "with",
        "bytes",
        "file",
        "path",
        "root",
        "etc",
        "usr",
        "lib",
        "python",
        "numpy",
        "debian",
        "package",
        "version",
        "config",
        "0",
        "1",
        "42",
        "1024",
        "=",
        "{",
        "}",
        "\n",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        let w = WORDS[(rng.next_u32() as usize) % WORDS.len()];
        v.extend_from_slice(w.as_bytes());
        v.push(if rng.next_u32() % 11 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    v.truncate(len);
    v
}

/// A `security.capability` value (`VFS_CAP_REVISION_2`) granting `cap` as permitted and effective.
#[must_use]
pub fn file_capability(cap: u32) -> Vec<u8> {
    let magic: u32 = 0x0200_0000 | 1; // revision 2, effective bit
    let (lo, hi) = if cap < 32 {
        (1u32 << cap, 0u32)
    } else {
        (0, 1u32 << (cap - 32))
    };
    let mut v = Vec::with_capacity(20);
    for word in [magic, lo, 0, hi, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// Options for [`edge_cases`].
#[derive(Debug, Clone, Copy)]
pub struct EdgeCaseOptions {
    /// Seed of all generated content.
    pub seed: u64,
    /// Size of the large file (spanning several checkpoints at small span sizes).
    pub large_file: usize,
    /// How many small files.
    pub small_files: usize,
    /// Compression of the three layers, bottom first.
    pub compression: [Compression; 3],
    /// Include device nodes (extracting them needs root).
    pub devices: bool,
}

impl Default for EdgeCaseOptions {
    fn default() -> Self {
        Self {
            seed: 7,
            large_file: 6 << 20,
            small_files: 300,
            compression: [
                Compression::Gzip,
                Compression::GzipMultiMember(3),
                Compression::None,
            ],
            devices: true,
        }
    }
}

/// An image exercising every entry kind and merge rule the product must reproduce:
/// setuid/setgid/sticky, owners, xattrs incl. `security.capability`, hard links, absolute,
/// relative and dangling symlinks, GNU and PAX long names and link targets, odd names, fifos,
/// devices, nanosecond mtimes, whiteouts, opaque directories, a file replacing a directory and a
/// directory replacing a file, implicit parents, `./`-prefixed paths, a same-layer whiteout, and
/// PAX sparse files (formats 0.0, 0.1 and 1.0).
#[must_use]
pub fn edge_cases(o: &EdgeCaseOptions) -> Image {
    let s = o.seed;
    let long_dir = format!("data/{}/{}", "d".repeat(60), "e".repeat(60));
    let sparse_size = o.large_file as u64 + 3;
    let long_target = format!("/{}/{}/target", "t".repeat(70), "u".repeat(40));
    let mut base = vec![
        Entry::dir("etc"),
        Entry::file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::file("etc/os-release", text_bytes(s, 400)),
        Entry::dir("usr"),
        Entry::dir("usr/bin"),
        Entry::file("usr/bin/suid-tool", random_bytes(s + 1, 3000)).mode(0o4755),
        Entry::file("usr/bin/sgid-tool", random_bytes(s + 2, 2000))
            .mode(0o2755)
            .owner(0, 50),
        Entry::file("usr/bin/cap-tool", random_bytes(s + 3, 1500))
            .mode(0o755)
            .xattr("security.capability", file_capability(10)),
        Entry::symlink("usr/bin/abs-link", "/etc/passwd"),
        Entry::symlink("usr/bin/rel-link", "../../etc/passwd"),
        Entry::symlink("usr/bin/dangling", "does/not/exist"),
        Entry::symlink("usr/bin/long-target", &long_target),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("data").owner(1000, 1000).mode(0o750),
        Entry::file("data/owned", text_bytes(s + 4, 5000))
            .owner(1000, 1001)
            .mode(0o640),
        Entry::file("data/large.bin", random_bytes(s + 5, o.large_file)),
        Entry::file("data/large.txt", text_bytes(s + 6, o.large_file)),
        Entry::file("data/empty", Vec::new()),
        Entry::file("data/hl-a", text_bytes(s + 7, 10_000))
            .mode(0o600)
            .owner(7, 8),
        Entry::hardlink("data/hl-b", "data/hl-a"),
        Entry::hardlink("data/hl-c", "data/hl-a"),
        Entry::file("data/xattrs", "has xattrs\n")
            .xattr("user.comment", "hello")
            .xattr("user.binary", vec![0u8, 1, 2, 255]),
        Entry::file("data/ns-time", "nanoseconds\n").mtime(1_600_000_000, 123_456_789),
        Entry::fifo("data/fifo").mode(0o620),
        Entry::dir("data/odd"),
        Entry::file("data/odd/with space.txt", "space\n"),
        Entry::file("data/odd/ünïcödé-名前.txt", "unicode\n"),
        Entry::file("data/odd/new\nline", "newline\n"),
        Entry::dir(&long_dir),
        Entry::file(&format!("{long_dir}/gnu-long-name-file.txt"), "gnu long\n"),
        Entry::file(&format!("{long_dir}/pax-long-name-file.txt"), "pax long\n").pax_path(),
        Entry::file("data/remove-me", "lower\n"),
        Entry::file("data/keep-me", "lower keep\n"),
        Entry::dir("olddir"),
        Entry::file("olddir/a", "a\n"),
        Entry::dir("olddir/sub"),
        Entry::file("olddir/sub/b", "b\n"),
        Entry::dir("opaque"),
        Entry::file("opaque/lower1", "1\n"),
        Entry::dir("opaque/lowerdir"),
        Entry::file("opaque/lowerdir/x", "x\n"),
        Entry::dir("replace-dir"),
        Entry::dir("replace-dir/x"),
        Entry::file("replace-dir/x/y", "y\n"),
        Entry::file("replace-file", "i become a dir\n"),
        Entry::dir("data/many"),
        // PAX sparse files in GNU tar's three formats: holes at the start, middle and end, a
        // data extent spanning several checkpoints, and a file that is all hole.
        Entry::sparse(
            "data/sparse-0.0",
            300_000,
            vec![
                (0, random_bytes(s + 11, 1000)),
                (200_000, text_bytes(s + 12, 500)),
            ],
            SparseFormat::Pax00,
        )
        .mode(0o640),
        Entry::sparse(
            "data/sparse-0.1",
            (2 << 20) + 17,
            vec![
                (65_536, random_bytes(s + 13, 3000)),
                ((1 << 20) - 10, random_bytes(s + 14, 5000)),
            ],
            SparseFormat::Pax01,
        ),
        Entry::sparse(
            "data/sparse-1.0",
            sparse_size,
            vec![
                (
                    sparse_size / 16,
                    random_bytes(s + 15, (sparse_size / 3) as usize),
                ),
                (
                    sparse_size * 5 / 6,
                    text_bytes(s + 16, (sparse_size / 10).min(777) as usize),
                ),
            ],
            SparseFormat::Pax10,
        )
        .mtime(1_650_000_000, 0),
        Entry::hardlink("data/sparse-link", "data/sparse-1.0"),
        Entry::sparse(
            "data/sparse-empty",
            100_000,
            Vec::new(),
            SparseFormat::Pax10,
        ),
    ];
    if o.devices {
        base.push(Entry::dir("dev"));
        base.push(Entry::char_device("dev/null", 1, 3));
        base.push(Entry::block_device("dev/loop9", 7, 9));
    }
    for i in 0..o.small_files {
        base.push(Entry::file(
            &format!("data/many/f{i:05}"),
            text_bytes(s + 100 + i as u64, 50 + (i * 37) % 3000),
        ));
    }
    let upper = vec![
        Entry::whiteout("data/remove-me"),
        Entry::whiteout("olddir"),
        Entry::dir("opaque"),
        Entry::opaque("opaque"),
        Entry::file("opaque/upper", "upper\n"),
        Entry::file("replace-dir", "now a file\n"),
        Entry::dir("replace-file").mode(0o711),
        Entry::file("replace-file/child", "child\n"),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n",
        ),
        // implicit parents: no entries for implicit/ and implicit/parent/
        Entry::file("implicit/parent/child.txt", "implicit\n"),
        Entry::file("data/pax-owner", "big ids\n").owner(3_000_000, 3_000_001),
    ];
    let top = vec![
        // re-adding a path whited out below is allowed
        Entry::file("data/remove-me", "re-added above the whiteout\n"),
        // same-layer whiteout: hides the lower keep-me only; this layer's keep-me survives
        Entry::whiteout("data/keep-me"),
        Entry::file("data/keep-me", "upper keep\n"),
        Entry::file("data/large.txt", text_bytes(s + 9, 200_000)),
        Entry::file("usr/bin/suid-tool", random_bytes(s + 10, 2500)).mode(0o4711),
    ];
    let mut img = Image::new(vec![
        Layer::new(base).compression(o.compression[0]),
        Layer::new(upper).compression(o.compression[1]).dot_slash(),
        Layer::new(top).compression(o.compression[2]),
    ]);
    img.config = RuntimeConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "CLIP_TEST=1".into()],
        entrypoint: vec!["/usr/bin/suid-tool".into()],
        cmd: vec!["--help".into()],
        working_dir: "/data".into(),
        user: "1000:1000".into(),
        labels: vec![("org.example.test".into(), "edge".into())],
        exposed_ports: vec!["8080/tcp".into()],
        volumes: vec!["/data/vol".into()],
        stop_signal: "SIGTERM".into(),
    };
    img
}
