//! The process that serves one lazy tree: `clip-snapshotter mount-server --archive A
//! --mountpoint M [--config F]`, started by the snapshotter in a process group of its own. It
//! reads registry settings and credentials from the same configuration file as the snapshotter
//! (never from its command line) — including `spanStore`, so a node's lazy trees read the spans
//! any worker or node of the fleet fetched — and serves until the tree is unmounted or it is
//! signalled.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

/// What to serve.
#[derive(Debug, Clone)]
pub struct MountServerArgs {
    /// The v2 archive.
    pub archive: PathBuf,
    /// Where.
    pub mountpoint: PathBuf,
    /// The snapshotter's configuration file.
    pub config: Option<PathBuf>,
}

/// Mounts and serves until unmounted (then returns) or signalled (then unmounts).
pub fn serve(args: &MountServerArgs) -> anyhow::Result<()> {
    let cfg = clip_core::policy::Config::load(args.config.as_deref())?;
    let net = clip_core::registry::BlockingClient::new(clip_core::service::client_config(&cfg)?)?;
    let handle = clip_core::fs::mount_archive(clip_core::fs::MountOptions {
        archive: args.archive.clone(),
        mountpoint: args.mountpoint.clone(),
        cache_dir: cfg.cache_dir.clone(),
        cache_bytes: cfg.cache_size_gib << 30,
        cache_min_free_percent: cfg.cache_min_free_percent,
        registry: Some(net),
        span_store: cfg
            .span_store
            .as_ref()
            .map(clip_core::service::span_store_options),
        ..clip_core::fs::MountOptions::default()
    })
    .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let why = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let why = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = tick.tick() => if handle.is_finished() { break "unmounted" },
            }
        };
        Ok::<_, std::io::Error>(why)
    })?;
    let stats = handle.stats();
    handle.unmount()?;
    tracing::info!(mountpoint = %args.mountpoint.display(), why, served = stats.served_bytes, fetched = stats.fetched_bytes, "mount server stopped");
    Ok(())
}
