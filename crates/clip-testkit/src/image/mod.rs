//! Programmatic, seeded, deterministic OCI and Docker images.
//!
//! An [`Image`] is a list of [`Layer`]s of [`Entry`]s plus a config (this module). [`ImageBuilder`]
//! turns one or more images (one per platform) into blobs and manifests — a single manifest, or
//! an image index / manifest list for several platforms — which [`crate::Registry::push`] pushes or
//! [`BuiltImage::write_oci_layout`] writes as an OCI layout directory (`build`). The tar streams
//! and their compression are `tar`; seeded file contents are `content`; [`edge_cases`] describes
//! an image that exercises every merge rule and entry kind the product must get right (`edge`).

mod build;
mod content;
mod edge;
mod random;
mod tar;

pub use crate::media::{ACCEPT_MANIFESTS, sha256_digest};
pub use build::{Blob, BuiltImage, BuiltLayer, BuiltManifest, ImageBuilder, PushedImage};
pub use content::{file_capability, random_bytes, text_bytes};
pub use edge::{EdgeCaseOptions, edge_builder, edge_cases, edge_image};
pub use random::{RandomImageOptions, random_image};
pub use tar::{compress, write_tar};

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

/// `bin/busybox` (this machine's, mode 0755) and a symlink to it for each of `applets`
/// (`sh`, `cat`, …): the smallest image content that runs commands.
///
/// # Panics
/// When `/bin/busybox` cannot be read (`scripts/setup` installs it).
#[must_use]
pub fn busybox_entries(applets: &[&str]) -> Vec<Entry> {
    #[allow(clippy::expect_used)]
    let busybox = std::fs::read("/bin/busybox").expect("reading /bin/busybox");
    let mut out = vec![
        Entry::dir("bin"),
        Entry::file("bin/busybox", busybox).mode(0o755),
    ];
    out.extend(
        applets
            .iter()
            .map(|a| Entry::symlink(&format!("bin/{a}"), "busybox")),
    );
    out
}

/// A base layer containers run on: busybox with `sh`, `cat` and `sleep`, `root` and `app`
/// (uid 1000, home `/home/app`) in `/etc/passwd` and `/etc/group`, and a sticky `/tmp`.
#[must_use]
pub fn busybox_base() -> Layer {
    let mut entries = busybox_entries(&["sh", "cat", "sleep"]);
    entries.extend([
        Entry::dir("etc"),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        ),
        Entry::file("etc/group", "root:x:0:\napp:x:1000:\n"),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("home/app").owner(1000, 1000),
    ]);
    Layer::new(entries)
}
