//! `clip mount` and `clip umount`: the foreground server and the background launcher.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::cli::MountArgs;

/// `clip mount`: in the background (a server process started with `--foreground`), or here.
pub(crate) fn run(args: MountArgs) -> anyhow::Result<()> {
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(clip_core::fs::default_cache_dir);
    // By reference: the archive made here (before a background server starts, so that its
    // wait for the mount is not spent indexing).
    let file = archive_for(&args, &cache_dir)?;
    if !args.foreground {
        return spawn_background(&args.mountpoint, &cache_dir);
    }
    let archive = super::open(&file)?;
    let host = args
        .registry_mirror
        .clone()
        .or_else(|| archive.meta().source.as_ref().map(|s| s.registry.clone()))
        .unwrap_or_default();
    drop(archive);
    let prefetch = args
        .prefetch
        .map(|p| clip_core::fs::Profile::load(&p))
        .transpose()?;
    let options = clip_core::fs::MountOptions {
        archive: file,
        mountpoint: args.mountpoint,
        // The node's one span cache: `<cache dir>/spans`, as the worker and the snapshotter.
        cache_dir: clip_core::node::span_cache_dir(&cache_dir),
        cache_bytes: args.cache_size,
        cache_min_free_percent: args.cache_min_free,
        registry: Some(args.registry.client(&host)?),
        registry_override: args.registry_mirror,
        registry_check: !args.no_registry_check,
        readahead_spans: args.readahead_spans,
        prefetch,
        record_profile: args.record_profile,
        remote: args.s3.options(),
        background_fetch: args.background_fetch,
        span_store: args
            .span_store
            .as_deref()
            .map(|url| clip_core::fs::SpanStoreOptions::new(url, args.s3.options())),
        suid: args.suid,
        dev: args.dev,
        ..clip_core::fs::MountOptions::default()
    };
    foreground(options)
}

/// The archive to mount: `args.file` when it is one; for an image reference, its v2 archive in
/// `CACHE_DIR/archives/<manifest>.clip`, made from the layer indexes attached to the image where
/// it has them (and the node's layer cache), else by indexing the image here.
fn archive_for(args: &MountArgs, cache_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use clip_core::indexer::{self, DirLayerStore, LayerIndexStore};
    use std::sync::Arc;
    if args.file.exists() {
        return Ok(args.file.clone());
    }
    let text = args.file.to_string_lossy();
    let reference = clip_core::registry::Reference::parse(&text).with_context(|| {
        format!("{text}: no such archive, and not an image reference to mount by reference")
    })?;
    let net = args.registry.client(&reference.registry)?;
    let resolved = net.block_on(net.client().resolve(&reference, None))?;
    let archives = cache_dir.join("archives");
    clip_core::host::private_dir(cache_dir)?;
    clip_core::host::private_dir(&archives)?;
    let path = archives.join(format!("{}.clip", resolved.manifest_digest.hex()));
    if clip_core::format::Archive::open(&path).is_ok() {
        return Ok(path);
    }
    let layers = cache_dir.join("layers");
    clip_core::host::private_dir(&layers)?;
    let attached = super::attached(&net, &resolved).map(Arc::new);
    let used = attached.clone();
    let opts = indexer::IndexOptions {
        layer_store: clip_core::node::with_attached(
            Some(Arc::new(DirLayerStore::new(layers)) as Arc<dyn LayerIndexStore>),
            attached,
        ),
        ..indexer::IndexOptions::default()
    };
    let pinned = resolved.reference.to_string();
    let s = indexer::index(
        indexer::Input::Registry {
            reference: &pinned,
            client: &net,
        },
        &path,
        &opts,
        None,
    )?;
    eprintln!(
        "indexed {pinned}: {} layers, {} from the index attached to the image, {} reused from this node's cache",
        s.layers,
        used.as_ref().map_or(0, |a| a.used()),
        s.reused_layers - used.as_ref().map_or(0, |a| a.used()).min(s.reused_layers)
    );
    Ok(path)
}

/// `clip umount`.
pub(crate) fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    clip_core::fs::unmount(mountpoint)?;
    Ok(())
}

/// Serves the mount until it is unmounted or the process gets SIGTERM/SIGINT/SIGHUP.
fn foreground(options: clip_core::fs::MountOptions) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let (archive, mountpoint) = (options.archive.clone(), options.mountpoint.clone());
    let args_had_store = options.span_store.is_some();
    let handle = clip_core::node::MountBuilder::from_options(options)
        .mount(&archive, &mountpoint)
        .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    let why = clip_core::node::serve_until_signal(&handle)?;
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
    if args_had_store {
        let s = stats.span_store;
        eprintln!(
            "clip mount {}: span store {} hits ({} bytes), {} rejected, {} errors, {} uploads ({} skipped), {} waited for a peer",
            mountpoint.display(),
            s.hits,
            s.hit_bytes,
            s.rejected,
            s.errors,
            s.uploads,
            s.uploads_skipped,
            s.waited
        );
    }
    Ok(())
}

/// Re-runs this command with `--foreground` in a new process group, logging to
/// `CACHE_DIR/logs/<mount point>.log` (a private directory; the file is opened without following
/// symlinks), and returns once the mount answers (or reports why it did not).
fn spawn_background(mountpoint: &Path, cache_dir: &Path) -> anyhow::Result<()> {
    let log_dir = cache_dir.join("logs");
    clip_core::host::private_dir(cache_dir)?;
    clip_core::host::private_dir(&log_dir)?;
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
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args);
    let pid = clip_core::node::spawn_mount_server(cmd, &canon, &log_path, Duration::from_mins(1))?;
    eprintln!(
        "mounted at {} (server pid {pid}, log {})",
        canon.display(),
        log_path.display()
    );
    Ok(())
}
