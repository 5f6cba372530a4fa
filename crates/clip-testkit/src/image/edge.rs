//! The edge-case image: every entry kind and merge rule.

use super::{Compression, Entry, Image, Layer, RuntimeConfig, SparseFormat};
use super::{file_capability, random_bytes, text_bytes};

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
// Over 100 lines on purpose: a table of test entries (every kind and merge rule), read top to
// bottom; splitting it would only scatter the table.
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

/// The edge-case image with each of its three layers compressed as given, device nodes included
/// when the tests run as root (the usual setup of the oracle tests).
#[must_use]
pub fn edge_image(compression: [Compression; 3]) -> Image {
    edge_cases(&EdgeCaseOptions {
        compression,
        devices: crate::is_root(),
        ..EdgeCaseOptions::default()
    })
}

/// [`edge_image`] ready to build as an OCI image.
#[must_use]
pub fn edge_builder(compression: [Compression; 3]) -> super::ImageBuilder {
    super::ImageBuilder::new(super::ManifestFormat::Oci).image(edge_image(compression))
}
