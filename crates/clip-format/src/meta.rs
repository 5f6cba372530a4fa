//! The archive's JSON metadata section: image config, registry source, remote data reference.

use serde::{Deserialize, Serialize};

/// The runtime configuration of the image, so a container can start without the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// `os` of the image's platform.
    pub os: String,
    /// `architecture` of the image's platform.
    pub architecture: String,
    /// Platform variant (e.g. `v8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
    /// User (`name`, `uid` or `uid:gid`).
    pub user: String,
    /// Working directory.
    pub working_dir: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Exposed ports (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// Volumes.
    pub volumes: Vec<String>,
    /// Stop signal.
    pub stop_signal: String,
}

/// Where a v2 archive's image lives: pinned by manifest digest, never only a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    #[serde(default)]
    pub registry: String,
    /// Repository, e.g. `library/ubuntu`.
    #[serde(default)]
    pub repository: String,
    /// The platform manifest the archive was built from.
    pub manifest_digest: crate::Digest,
    /// The reference the user gave (informational: tags move).
    #[serde(default)]
    pub reference: String,
}

/// Where a v1-remote archive's data lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Remote {
    /// Object URL (`s3://bucket/key`, `file:///dir/key`, …).
    pub url: String,
    /// Size of the object in bytes.
    pub size: u64,
    /// Offset inside the object where the data region starts (file offsets are relative to it).
    pub data_offset: u64,
    /// Length of the data region.
    pub data_length: u64,
}

/// The metadata section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    /// The image's runtime configuration.
    pub image: ImageConfig,
    /// v2: the registry location.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// v1 remote: the data object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
    /// Which program wrote the archive.
    pub created_by: String,
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MediaKind {
    /// Uncompressed tar.
    Tar,
    /// gzip (one or several members).
    Gzip,
    /// zstd (one or several frames).
    Zstd,
}

impl MediaKind {
    /// The code stored for this value.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::Tar => 1,
            Self::Gzip => 2,
            Self::Zstd => 3,
        }
    }
    /// The value stored as code `c`.
    #[must_use]
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Tar),
            2 => Some(Self::Gzip),
            3 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The 32 bytes of a `sha256:<hex>` digest; `None` for another algorithm or a malformed digest.
#[must_use]
pub fn sha256_bytes(digest: &str) -> Option<[u8; 32]> {
    crate::Digest::parse(digest).ok()?.sha256_bytes()
}

/// One layer of a v2 archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// Blob digest.
    pub digest: crate::Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: crate::Digest,
    /// Compression.
    pub media: MediaKind,
    /// A single zstd frame: no seek points, readers materialise the layer once.
    pub single_frame: bool,
    /// Indexed from the layer's table of contents (eStargz): file offsets are positions in a
    /// virtual stream where the data chunks lie back to back, one span each, not offsets in the
    /// layer's tar stream. Readers go through the checkpoints; nothing streams the layer against
    /// these offsets.
    pub toc_indexed: bool,
    /// Blob size.
    pub compressed_size: u64,
    /// Uncompressed tar size.
    pub uncompressed_size: u64,
    /// Nominal distance between checkpoints (uncompressed bytes).
    pub span_size: u64,
}

/// What a checkpoint resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CheckpointKind {
    /// A deflate block boundary inside a gzip member (needs bits and window).
    Deflate,
    /// The start of a gzip member (header follows; no window needed).
    GzipMember,
    /// The start of a zstd frame.
    ZstdFrame,
    /// A plain offset into an uncompressed blob.
    Plain,
}

impl CheckpointKind {
    /// The code stored for this value.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::Deflate => 1,
            Self::GzipMember => 2,
            Self::ZstdFrame => 3,
            Self::Plain => 4,
        }
    }
    /// The value stored as code `c`.
    #[must_use]
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Deflate),
            2 => Some(Self::GzipMember),
            3 => Some(Self::ZstdFrame),
            4 => Some(Self::Plain),
            _ => None,
        }
    }
}

/// A point where decompression of a layer can resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// What kind of resume point this is.
    pub kind: CheckpointKind,
    /// Offset in the compressed blob of the first byte to feed.
    pub compressed_offset: u64,
    /// Offset in the uncompressed stream this checkpoint produces first.
    pub uncompressed_offset: u64,
    /// Bits (0–7) of the byte before `compressed_offset` that belong to the next block.
    pub bits: u8,
    /// The preceding 32 KiB of output, compressed (empty where no window is needed).
    #[serde(skip)]
    pub window: Vec<u8>,
    /// What the span from this checkpoint to the next (or the layer's end) is verified with.
    /// Without a [`Self::chain_head`]: the sha256 of the span's uncompressed bytes. With one
    /// (a chained layer): the SHA-256 chaining value (eight big-endian words) after the layer's
    /// first `uncompressed_offset − uncompressed_offset % 64` bytes, the state the layer's
    /// `diff_id` computation passes through there.
    #[serde(skip)]
    pub span_digest: [u8; 32],
    /// In a chained layer: the layer's `uncompressed_offset % 64` bytes before this checkpoint
    /// (from the 64-byte block boundary the chaining value stands at).
    #[serde(skip)]
    pub chain_head: Option<Vec<u8>>,
}
