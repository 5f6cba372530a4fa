//! `clip`: the command-line tool for `.clip` archives.
//!
//! Subcommands arrive with the capabilities they expose. Today: `inspect`, `ls`, `cat` (format),
//! `index --oci-layout` (image → v2) and `archive --rootfs` (directory → v1). This binary holds only argument parsing and wiring.
#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use clip_core::format::{Archive, EntryKind, Meta, SectionId};

/// Make container images start in seconds: index, archive, extract and mount `.clip` archives.
#[derive(Debug, Parser)]
#[command(name = "clip", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an archive's kind, version, source image, layers, sections and image config.
    Inspect {
        /// The archive.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a directory of an archive (or one entry), like `ls -la`.
    Ls {
        /// The archive.
        file: PathBuf,
        /// Path inside the archive.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Write a file's content to stdout (v1 local archives; others need the lazy read path).
    Cat {
        /// The archive.
        file: PathBuf,
        /// Path inside the archive.
        path: String,
    },
    /// Create a v2 (index-only) archive of an image, straight from its registry (or from an
    /// OCI layout directory).
    Index {
        /// The image, e.g. `registry.example.com/team/app:v1` (omit with `--oci-layout`).
        image: Option<String>,
        /// Index an OCI image layout directory instead, optionally with `:TAG`.
        #[arg(long, value_name = "DIR[:TAG]", conflicts_with = "image")]
        oci_layout: Option<String>,
        /// With `--oci-layout`: the registry location to record, `HOST/REPOSITORY`.
        #[arg(long, value_name = "HOST/REPO", requires = "oci_layout")]
        source: Option<String>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Platform to pick from a multi-platform image, `os/arch[/variant]`.
        #[arg(long)]
        platform: Option<String>,
        /// Uncompressed MiB between checkpoints.
        #[arg(long, default_value_t = 4)]
        checkpoint_mib: u64,
        /// A registry host that may be reached over plain HTTP (loopback hosts always may).
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure: Vec<String>,
        /// Credentials for the image's registry, `USER:PASSWORD`.
        #[arg(long, env = "CLIP_REGISTRY_CREDS", hide_env_values = true)]
        creds: Option<String>,
        /// A PEM file of CA certificates to trust for HTTPS.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Create a v1 (data-carrying) archive.
    Archive {
        /// Archive this root filesystem directory.
        #[arg(long)]
        rootfs: PathBuf,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Inspect { file, json } => inspect(&file, json, &mut out),
        Command::Ls { file, path } => ls(&file, &path, &mut out),
        Command::Cat { file, path } => {
            let a = open(&file)?;
            let e = a
                .lookup(path.as_bytes())
                .with_context(|| format!("{path}: no such entry in {}", file.display()))?;
            if e.kind() != EntryKind::File {
                bail!("{path} is a {:?}, not a regular file", e.kind());
            }
            out.write_all(a.file_data(&e, true)?)?;
            Ok(())
        }
        Command::Index {
            image,
            oci_layout,
            source,
            output,
            platform,
            checkpoint_mib,
            insecure,
            creds,
            ca_file,
            json,
        } => {
            let platform = match platform {
                Some(p) => Some(
                    clip_core::indexer::Platform::parse(&p)
                        .with_context(|| format!("--platform {p:?} must be os/arch[/variant]"))?,
                ),
                None => None,
            };
            let start = std::time::Instant::now();
            let (s, what) = if let Some(layout) = oci_layout {
                let source = source.context("--oci-layout needs --source HOST/REPOSITORY")?;
                (
                    index_layout(&layout, &output, &source, platform, checkpoint_mib)?,
                    source,
                )
            } else {
                let image = image.context("name an image, or use --oci-layout DIR")?;
                let reference = clip_core::registry::Reference::parse(&image)?;
                let docker_config = match clip_core::registry::dockerconfig::default_path() {
                    Some(p) => Some(std::sync::Arc::new(
                        clip_core::registry::dockerconfig::DockerConfig::load(&p)?,
                    )),
                    None => None,
                };
                let mut cfg = clip_core::registry::ClientConfig {
                    insecure,
                    docker_config,
                    ..Default::default()
                };
                if let Some(c) = creds {
                    let (username, password) =
                        c.split_once(':').context("--creds must be USER:PASSWORD")?;
                    cfg.credentials.push((
                        reference.registry.clone(),
                        clip_core::registry::Credentials::Basic {
                            username: username.into(),
                            password: password.into(),
                        },
                    ));
                }
                if let Some(f) = ca_file {
                    cfg.ca_pem = Some(
                        std::fs::read_to_string(&f)
                            .with_context(|| format!("reading {}", f.display()))?,
                    );
                }
                let client = clip_core::registry::Client::new(cfg)?;
                // Progress on stderr, one line per layer (stdout stays the summary).
                let progress = |p: &clip_core::indexer::Progress| {
                    #[allow(clippy::print_stderr)]
                    if !json {
                        match p {
                            clip_core::indexer::Progress::Resolved {
                                manifest_digest,
                                layers,
                                bytes,
                            } => {
                                eprintln!(
                                    "resolved {manifest_digest}: {layers} layers, {bytes} bytes"
                                );
                            }
                            clip_core::indexer::Progress::LayerDone {
                                layer,
                                digest,
                                compressed,
                                entries,
                            } => {
                                eprintln!(
                                    "layer {layer} {digest}: {compressed} bytes, {entries} entries"
                                );
                            }
                        }
                    }
                };
                let s = clip_core::indexer::index_image(
                    &image,
                    &output,
                    &client,
                    platform.as_ref(),
                    checkpoint_mib.max(1) << 20,
                    Some(&progress),
                )?;
                (s, reference.to_string())
            };
            let secs = start.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({"kind": "v2-oci", "image": what, "manifest_digest": s.manifest_digest, "layers": s.layers,
                    "entries": s.entries, "checkpoints": s.checkpoints, "bytes": s.archive_bytes, "index_bytes": s.index_bytes,
                    "compressed_bytes": s.compressed_bytes, "uncompressed_bytes": s.uncompressed_bytes, "seconds": secs, "output": output});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{}: v2 archive of {what}@{}: {} layers, {} entries, {} checkpoints, {} bytes ({} without windows) for {} bytes of layers, {secs:.2}s",
                    output.display(),
                    s.manifest_digest,
                    s.layers,
                    s.entries,
                    s.checkpoints,
                    s.archive_bytes,
                    s.index_bytes,
                    s.compressed_bytes
                )?;
            }
            Ok(())
        }
        Command::Archive {
            rootfs,
            output,
            json,
        } => {
            let meta = Meta {
                created_by: format!("clip {}", env!("CARGO_PKG_VERSION")),
                ..Meta::default()
            };
            let start = std::time::Instant::now();
            let s = clip_core::extract::archive_rootfs(&rootfs, &output, &meta)?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({"kind": s.kind.to_string(), "entries": s.entries, "bytes": s.bytes, "index_bytes": s.index_bytes, "seconds": secs, "output": output});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{}: {} archive, {} entries, {} bytes ({} index), {secs:.2}s",
                    output.display(),
                    s.kind,
                    s.entries,
                    s.bytes,
                    s.index_bytes
                )?;
            }
            Ok(())
        }
    }
}

fn index_layout(
    oci_layout: &str,
    output: &Path,
    source: &str,
    platform: Option<clip_core::indexer::Platform>,
    checkpoint_mib: u64,
) -> anyhow::Result<clip_core::indexer::IndexSummary> {
    let (dir, tag) = match oci_layout.rsplit_once(':') {
        Some((d, t)) if !t.contains('/') => (d.to_owned(), Some(t.to_owned())),
        _ => (oci_layout.to_owned(), None),
    };
    let (registry, repository) = source
        .split_once('/')
        .with_context(|| format!("--source {source:?} must be HOST/REPOSITORY"))?;
    let opts = clip_core::indexer::IndexOptions {
        tag: tag.clone(),
        platform,
        checkpoint_bytes: checkpoint_mib.max(1) << 20,
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        reference: format!("{source}:{}", tag.as_deref().unwrap_or("latest")),
    };
    Ok(clip_core::indexer::index_layout(
        dir.as_ref(),
        output,
        &opts,
    )?)
}

fn open(file: &Path) -> anyhow::Result<Archive> {
    Archive::open(file).with_context(|| format!("opening {}", file.display()))
}

fn inspect(file: &Path, json: bool, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let a = open(file)?;
    let sections: Vec<_> = a
        .sections()
        .iter()
        .map(|s| serde_json::json!({"name": s.id.name(), "offset": s.offset, "length": s.length}))
        .collect();
    let index_bytes: u64 = a
        .sections()
        .iter()
        .filter(|s| s.id != SectionId::DATA && s.id != SectionId::WINDOWS)
        .map(|s| s.length)
        .sum::<u64>();
    let header = a.sections().iter().map(|s| s.offset).min().unwrap_or(0);
    let per_entry = (index_bytes + header) as f64 / a.len().max(1) as f64;
    let v = serde_json::json!({
        "kind": a.kind().to_string(),
        "format_version": clip_core::format::FORMAT_VERSION,
        "entries": a.len(),
        "bytes": a.as_bytes().len(),
        "index_bytes_per_entry": (per_entry * 10.0).round() / 10.0,
        "source": a.meta().source,
        "remote": a.meta().remote,
        "layers": a.layers(),
        "checkpoints": a.checkpoint_count(),
        "sections": sections,
        "image": a.meta().image,
        "created_by": a.meta().created_by,
    });
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "file:        {}", file.display())?;
    writeln!(
        out,
        "kind:        {} (format version {})",
        a.kind(),
        clip_core::format::FORMAT_VERSION
    )?;
    writeln!(out, "entries:     {}", a.len())?;
    writeln!(
        out,
        "size:        {} bytes; index {per_entry:.1} bytes/entry",
        a.as_bytes().len()
    )?;
    if let Some(s) = &a.meta().source {
        writeln!(
            out,
            "image:       {}/{}@{}",
            s.registry, s.repository, s.manifest_digest
        )?;
        writeln!(out, "reference:   {}", s.reference)?;
    }
    if let Some(r) = &a.meta().remote {
        writeln!(
            out,
            "data:        {} ({} bytes at offset {})",
            r.url, r.data_length, r.data_offset
        )?;
    }
    for (i, l) in a.layers().iter().enumerate() {
        writeln!(
            out,
            "layer {i}:     {} {:?} {} -> {} bytes, {} checkpoints",
            l.digest,
            l.media,
            l.compressed_size,
            l.uncompressed_size,
            a.checkpoints(u32::try_from(i)?).len()
        )?;
    }
    writeln!(out, "sections:")?;
    for s in a.sections() {
        writeln!(
            out,
            "  {:<12} offset {:>10} length {:>12}",
            s.id.name(),
            s.offset,
            s.length
        )?;
    }
    let img = &a.meta().image;
    if !img.os.is_empty() || !img.cmd.is_empty() || !img.entrypoint.is_empty() {
        writeln!(
            out,
            "config:      {}/{} entrypoint {:?} cmd {:?} user {:?} workdir {:?}",
            img.os, img.architecture, img.entrypoint, img.cmd, img.user, img.working_dir
        )?;
        writeln!(out, "env:         {:?}", img.env)?;
    }
    Ok(())
}

fn mode_string(kind: EntryKind, mode: u32) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
        EntryKind::CharDevice => 'c',
        EntryKind::BlockDevice => 'b',
        EntryKind::Fifo => 'p',
        EntryKind::Socket => 's',
    };
    let mut s = String::from(t);
    for (i, c) in ['r', 'w', 'x', 'r', 'w', 'x', 'r', 'w', 'x']
        .iter()
        .enumerate()
    {
        let bit = 0o400 >> i;
        let special = match i {
            2 if mode & 0o4000 != 0 => Some('s'),
            5 if mode & 0o2000 != 0 => Some('s'),
            8 if mode & 0o1000 != 0 => Some('t'),
            _ => None,
        };
        s.push(match (special, mode & bit != 0) {
            (Some(sp), true) => sp,
            (Some(sp), false) => sp.to_ascii_uppercase(),
            (None, true) => *c,
            (None, false) => '-',
        });
    }
    s
}

fn ls(file: &Path, path: &str, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let a = open(file)?;
    let e = a
        .lookup(path.as_bytes())
        .with_context(|| format!("{path}: no such entry in {}", file.display()))?;
    let entries: Vec<_> = if e.kind() == EntryKind::Dir {
        e.children().collect()
    } else {
        vec![e]
    };
    for c in entries {
        let size = match c.rdev() {
            Some((ma, mi)) => format!("{ma}, {mi}"),
            None => c.size().to_string(),
        };
        let name = String::from_utf8_lossy(c.name()).escape_debug().to_string();
        let target = c
            .symlink_target()
            .map(|t| format!(" -> {}", String::from_utf8_lossy(t)))
            .unwrap_or_default();
        writeln!(
            out,
            "{} {:>3} {:>5} {:>5} {:>10} {:>10} {name}{target}",
            mode_string(c.kind(), c.mode()),
            c.nlink(),
            c.uid(),
            c.gid(),
            size,
            c.mtime().0
        )?;
    }
    Ok(())
}
