//! `clip`: the command-line tool for `.clip` archives.
//!
//! Subcommands: `inspect`, `ls`, `cat` (format), `index` (image → v2, from a registry or an OCI
//! layout), `archive` (image, OCI layout or directory → v1), `extract` (any local archive →
//! directory), `mount` / `umount` (lazy FUSE mount). This binary holds only argument parsing and wiring.
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
        /// Keep per-layer indexes in DIR: layers indexed before (by any image) are not fetched
        /// again, new layer indexes are added.
        #[arg(long, value_name = "DIR", env = "CLIP_LAYER_CACHE")]
        layer_cache: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Mount an archive read-only; file bytes are fetched when read (v2) or read from the
    /// archive (v1). Returns once the mount answers; the mount is served by a background
    /// process unless `--foreground`.
    Mount {
        /// The archive.
        file: PathBuf,
        /// An existing directory.
        mountpoint: PathBuf,
        /// Span cache shared by all mounts (default /var/cache/clip as root).
        #[arg(long, env = "CLIP_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Cache size bound: bytes, or with a K/M/G/T suffix.
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        cache_size: u64,
        /// Fetch the spans of this recorded profile right after mounting.
        #[arg(long, value_name = "PROFILE")]
        prefetch: Option<PathBuf>,
        /// Record the first-touch order of file ranges; written at unmount.
        #[arg(long, value_name = "OUT")]
        record_profile: Option<PathBuf>,
        /// Spans fetched ahead of a sequential reader.
        #[arg(long, default_value_t = 2)]
        readahead_spans: usize,
        /// v2: fetch whole layers in the background after mounting, at most RATE bytes/s
        /// (K/M/G suffixes); off by default.
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        background_fetch: Option<u64>,
        /// Read the image from this registry host instead of the recorded one (a mirror).
        #[arg(long, value_name = "HOST")]
        registry_mirror: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        s3: RemoteArgs,
        /// Serve the mount from this process until unmounted or signalled.
        #[arg(long)]
        foreground: bool,
    },
    /// Unmount a clip mount (a dead one, left by a killed process, is detached).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Create a v1 (data-carrying) archive of an image (from its registry or an OCI layout) or
    /// of a root filesystem directory.
    Archive {
        /// The image, e.g. `registry.example.com/team/app:v1`.
        #[arg(required_unless_present_any = ["rootfs", "oci_layout"])]
        image: Option<String>,
        /// Archive this root filesystem directory instead.
        #[arg(long, conflicts_with_all = ["image", "oci_layout"])]
        rootfs: Option<PathBuf>,
        /// Archive an image of this OCI layout directory instead, optionally with `:TAG`.
        #[arg(long, value_name = "DIR[:TAG]", conflicts_with = "image")]
        oci_layout: Option<String>,
        /// Platform to pick from a multi-platform image, `os/arch[/variant]`.
        #[arg(long)]
        platform: Option<String>,
        /// Output file (with `--remote`: the small v1-remote metadata archive).
        #[arg(short, long)]
        output: PathBuf,
        /// Upload the data-carrying archive to `s3://BUCKET/KEY` or `file:///DIR/KEY` and write
        /// a v1-remote metadata archive pointing at it.
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        s3: RemoteArgs,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Extract an archive (v1, or v2 by streaming its layers from the registry) into a
    /// directory; every path is resolved beneath it.
    Extract {
        /// The archive.
        file: PathBuf,
        /// Target directory (created if missing).
        dir: PathBuf,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        s3: RemoteArgs,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
}

/// How to reach registries (shared by the commands that talk to one).
#[derive(Debug, clap::Args)]
struct RegistryArgs {
    /// A registry host that may be reached over plain HTTP (loopback hosts always may).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
    /// Credentials for the image's registry, `USER:PASSWORD`.
    #[arg(long, env = "CLIP_REGISTRY_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// A PEM file of CA certificates to trust for HTTPS.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// Client settings for `host`: these flags, then docker's config.json.
    fn client_config(&self, host: &str) -> anyhow::Result<clip_core::registry::ClientConfig> {
        let docker_config = match clip_core::registry::dockerconfig::default_path() {
            Some(p) => Some(std::sync::Arc::new(
                clip_core::registry::dockerconfig::DockerConfig::load(&p)?,
            )),
            None => None,
        };
        let mut cfg = clip_core::registry::ClientConfig {
            insecure: self.insecure.clone(),
            docker_config,
            ..Default::default()
        };
        if let Some(c) = &self.creds {
            let (username, password) =
                c.split_once(':').context("--creds must be USER:PASSWORD")?;
            cfg.credentials.push((
                host.to_owned(),
                clip_core::registry::Credentials::Basic {
                    username: username.into(),
                    password: password.into(),
                },
            ));
        }
        if let Some(f) = &self.ca_file {
            cfg.ca_pem = Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            );
        }
        Ok(cfg)
    }
}

/// Object-store settings beyond the standard AWS environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, …).
#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// S3 endpoint URL (S3-compatible servers; implies path-style requests).
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
}

impl RemoteArgs {
    fn options(&self) -> clip_core::extract::remote::RemoteOptions {
        clip_core::extract::remote::RemoteOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_endpoint.is_some(),
            ..Default::default()
        }
    }
}

/// `1048576`, `512K`, `64M`, `10G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size"))
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
            layer_cache,
            registry,
            json,
        } => {
            let layer_store = layer_cache.map(|d| {
                std::sync::Arc::new(clip_core::indexer::DirLayerStore::new(d))
                    as std::sync::Arc<dyn clip_core::indexer::LayerIndexStore>
            });
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
                    index_layout(
                        &layout,
                        &output,
                        &source,
                        platform,
                        checkpoint_mib,
                        layer_store,
                    )?,
                    source,
                )
            } else {
                let image = image.context("name an image, or use --oci-layout DIR")?;
                let reference = clip_core::registry::Reference::parse(&image)?;
                let cfg = registry.client_config(&reference.registry)?;
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
                            clip_core::indexer::Progress::LayerReused {
                                layer,
                                digest,
                                entries,
                            } => {
                                eprintln!(
                                    "layer {layer} {digest}: index reused, {entries} entries"
                                );
                            }
                        }
                    }
                };
                let opts = clip_core::indexer::IndexOptions {
                    platform,
                    checkpoint_bytes: checkpoint_mib.max(1) << 20,
                    layer_store,
                    ..clip_core::indexer::IndexOptions::default()
                };
                let s = clip_core::indexer::index_image_with(
                    &image,
                    &output,
                    &client,
                    &opts,
                    Some(&progress),
                )?;
                (s, reference.to_string())
            };
            let secs = start.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({"kind": "v2-oci", "image": what, "manifest_digest": s.manifest_digest, "layers": s.layers,
                    "entries": s.entries, "checkpoints": s.checkpoints, "bytes": s.archive_bytes, "index_bytes": s.index_bytes,
                    "compressed_bytes": s.compressed_bytes, "uncompressed_bytes": s.uncompressed_bytes, "reused_layers": s.reused_layers, "toc_layers": s.toc_layers, "seconds": secs, "output": output});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{}: v2 archive of {what}@{}: {} layers ({} reused, {} from eStargz TOCs), {} entries, {} checkpoints, {} bytes ({} without windows) for {} bytes of layers, {secs:.2}s",
                    output.display(),
                    s.manifest_digest,
                    s.layers,
                    s.reused_layers,
                    s.toc_layers,
                    s.entries,
                    s.checkpoints,
                    s.archive_bytes,
                    s.index_bytes,
                    s.compressed_bytes
                )?;
            }
            Ok(())
        }
        Command::Mount {
            file,
            mountpoint,
            cache_dir,
            cache_size,
            prefetch,
            record_profile,
            readahead_spans,
            background_fetch,
            registry_mirror,
            registry,
            s3,
            foreground,
        } => {
            if !foreground {
                return mount::spawn_background(&mountpoint);
            }
            let archive = open(&file)?;
            let host = registry_mirror
                .clone()
                .or_else(|| archive.meta().source.as_ref().map(|s| s.registry.clone()))
                .unwrap_or_default();
            drop(archive);
            let prefetch = prefetch
                .map(|p| clip_core::fs::Profile::load(&p))
                .transpose()?;
            let options = clip_core::fs::MountOptions {
                archive: file,
                mountpoint,
                cache_dir: cache_dir.unwrap_or_else(clip_core::fs::default_cache_dir),
                cache_bytes: cache_size,
                registry: registry.client_config(&host)?,
                registry_override: registry_mirror,
                readahead_spans,
                prefetch,
                record_profile,
                remote: s3.options(),
                background_fetch,
                ..clip_core::fs::MountOptions::default()
            };
            mount::foreground(options)
        }
        Command::Umount { mountpoint } => {
            clip_core::fs::unmount(&mountpoint)?;
            Ok(())
        }
        Command::Archive {
            image,
            rootfs,
            oci_layout,
            platform,
            output,
            remote,
            registry,
            s3,
            json,
        } => {
            let start = std::time::Instant::now();
            // With --remote the data-carrying archive is staged next to the output, uploaded,
            // and only the metadata archive is kept.
            let final_output = output.clone();
            let output = if remote.is_some() {
                output.with_extension("data.clip")
            } else {
                output
            };
            let platform = match platform {
                Some(p) => Some(
                    clip_core::indexer::Platform::parse(&p)
                        .with_context(|| format!("--platform {p:?} must be os/arch[/variant]"))?,
                ),
                None => None,
            };
            let (kind, entries, bytes, source) = if let Some(rootfs) = rootfs {
                let meta = Meta {
                    created_by: format!("clip {}", env!("CARGO_PKG_VERSION")),
                    ..Meta::default()
                };
                let s = clip_core::extract::archive_rootfs(&rootfs, &output, &meta)?;
                (s.kind, s.entries, s.bytes, rootfs.display().to_string())
            } else if let Some(layout) = oci_layout {
                let (dir, tag) = split_layout(&layout);
                let s = clip_core::extract::archive_layout(
                    dir.as_ref(),
                    tag.as_deref(),
                    platform,
                    &output,
                )?;
                (s.kind, s.entries, s.bytes, layout)
            } else {
                let image = image.context("name an image, --oci-layout DIR or --rootfs DIR")?;
                let reference = clip_core::registry::Reference::parse(&image)?;
                let client =
                    clip_core::registry::Client::new(registry.client_config(&reference.registry)?)?;
                let s =
                    clip_core::extract::archive_image(&image, &client, platform.as_ref(), &output)?;
                (s.kind, s.entries, s.bytes, reference.to_string())
            };
            let (kind, bytes, output) = if let Some(url) = remote {
                #[allow(clippy::print_stderr)]
                let progress = |sent: u64, total: u64| {
                    if !json {
                        eprint!("\ruploading {sent}/{total} bytes");
                    }
                };
                let up = clip_core::extract::remote::upload_v1(
                    &output,
                    &url,
                    &final_output,
                    &s3.options(),
                    Some(&progress),
                );
                let _ = std::fs::remove_file(&output);
                let up = up?;
                #[allow(clippy::print_stderr)]
                if !json {
                    eprintln!();
                }
                (up.metadata.kind, up.metadata.bytes, final_output)
            } else {
                (kind, bytes, output)
            };
            let secs = start.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({"kind": kind.to_string(), "source": source, "entries": entries, "bytes": bytes, "seconds": secs, "output": output});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{}: {kind} archive of {source}, {entries} entries, {bytes} bytes, {secs:.2}s",
                    output.display(),
                )?;
            }
            Ok(())
        }
        Command::Extract {
            file,
            dir,
            registry,
            s3,
            json,
        } => {
            let start = std::time::Instant::now();
            let host = open(&file)?
                .meta()
                .source
                .as_ref()
                .map(|s| s.registry.clone())
                .unwrap_or_default();
            let opts = clip_core::extract::ExtractOptions {
                registry: registry.client_config(&host)?,
                remote: s3.options(),
            };
            let s = clip_core::extract::extract(&file, &dir, &opts)
                .with_context(|| format!("extracting {} into {}", file.display(), dir.display()))?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({"entries": s.entries, "files": s.files, "bytes": s.bytes, "seconds": secs, "dir": dir});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{}: {} entries, {} files, {} bytes, {secs:.2}s",
                    dir.display(),
                    s.entries,
                    s.files,
                    s.bytes
                )?;
            }
            Ok(())
        }
    }
}

mod mount {
    //! `clip mount`: the foreground server and the background launcher.
    #![allow(clippy::print_stderr)]

    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{Context as _, bail};

    /// Serves the mount until it is unmounted or the process gets SIGTERM/SIGINT/SIGHUP.
    pub(crate) fn foreground(options: clip_core::fs::MountOptions) -> anyhow::Result<()> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
        let mountpoint = options.mountpoint.clone();
        let handle = clip_core::fs::mount_archive(options)
            .with_context(|| format!("mounting at {}", mountpoint.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let why = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut hup = signal(SignalKind::hangup())?;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let why = loop {
                tokio::select! {
                    _ = term.recv() => break "SIGTERM",
                    _ = int.recv() => break "SIGINT",
                    _ = hup.recv() => break "SIGHUP",
                    _ = tick.tick() => if handle.is_finished() { break "unmounted" },
                }
            };
            Ok::<_, std::io::Error>(why)
        })?;
        let stats = handle.stats();
        handle.unmount()?;
        eprintln!(
            "clip mount {}: stopped ({why}); {} bytes served, {} requests, {} bytes fetched, cache {} hits / {} misses",
            mountpoint.display(),
            stats.served_bytes,
            stats.requests,
            stats.fetched_bytes,
            stats.cache.hits,
            stats.cache.misses
        );
        Ok(())
    }

    /// Re-runs this command with `--foreground` in a new process group, logging to a file next
    /// to the cache, and returns once the mount answers (or reports why it did not).
    pub(crate) fn spawn_background(mountpoint: &Path) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let log_dir = std::env::temp_dir().join("clip-mount-logs");
        std::fs::create_dir_all(&log_dir)?;
        let canon = std::fs::canonicalize(mountpoint)
            .with_context(|| format!("mount point {}", mountpoint.display()))?;
        let log_path = log_dir.join(format!(
            "{}.log",
            canon.to_string_lossy().trim_matches('/').replace('/', "_")
        ));
        // Readiness is "a clip mount answers here": clear a dead one first, refuse a live one.
        clip_core::fs::clean_stale_mount(&canon);
        if clip_core::fs::is_mounted(&canon) {
            bail!("{} is already a clip mount point", canon.display());
        }
        let log = std::fs::File::create(&log_path)?;
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        args.push("--foreground".into());
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting the mount server")?;
        let start = Instant::now();
        loop {
            if clip_core::fs::is_mounted(&canon) {
                eprintln!(
                    "mounted at {} (server pid {}, log {})",
                    canon.display(),
                    child.id(),
                    log_path.display()
                );
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("the mount server exited ({status}):\n{}", log.trim_end());
            }
            if start.elapsed() > Duration::from_mins(1) {
                let _ = child.kill();
                bail!(
                    "the mount did not answer within 60 s; see {}",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `DIR[:TAG]` → (DIR, TAG).
fn split_layout(arg: &str) -> (String, Option<String>) {
    match arg.rsplit_once(':') {
        Some((d, t)) if !t.contains('/') => (d.to_owned(), Some(t.to_owned())),
        _ => (arg.to_owned(), None),
    }
}

fn index_layout(
    oci_layout: &str,
    output: &Path,
    source: &str,
    platform: Option<clip_core::indexer::Platform>,
    checkpoint_mib: u64,
    layer_store: Option<std::sync::Arc<dyn clip_core::indexer::LayerIndexStore>>,
) -> anyhow::Result<clip_core::indexer::IndexSummary> {
    let (dir, tag) = split_layout(oci_layout);
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
        layer_store,
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
