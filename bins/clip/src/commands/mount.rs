//! `clip mount` and `clip umount`: the foreground server and the background launcher.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cli::MountArgs;

/// `clip mount`: in the background (a server process started with `--foreground`), or here.
pub(crate) fn run(args: MountArgs) -> anyhow::Result<()> {
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(clip_core::fs::default_cache_dir);
    if !args.foreground {
        return spawn_background(&args.mountpoint, &cache_dir);
    }
    let archive = super::open(&args.file)?;
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
        archive: args.file,
        mountpoint: args.mountpoint,
        cache_dir,
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
    let mountpoint = options.mountpoint.clone();
    let args_had_store = options.span_store.is_some();
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
    use std::os::unix::process::CommandExt as _;
    let log_dir = cache_dir.join("logs");
    clip_core::format::private_dir(cache_dir)?;
    clip_core::format::private_dir(&log_dir)?;
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
    let log = clip_core::format::private_file(&log_path)?;
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
