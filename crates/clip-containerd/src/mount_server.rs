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

/// The tree's shared prefetch profile in the fleet's span store,
/// `<span store>/profiles/<stem>.json` (the archive's file stem names the image and depth), and
/// how long the store may take to answer (as for spans: a slow store never holds up a mount).
fn profile_object(
    cfg: &clip_core::policy::Config,
    stem: &str,
) -> Option<(clip_core::objstore::RemoteObject, Duration)> {
    let s3 = cfg.span_store.as_ref()?;
    let o = clip_core::service::span_store_options(s3);
    clip_core::objstore::RemoteObject::open(&format!("{}/profiles/{stem}.json", o.url), &o.remote)
        .map_err(|e| tracing::warn!(error = %e, "span store profile object"))
        .ok()
        .map(|obj| (obj, o.timeout))
}

/// Mounts and serves until unmounted (then returns) or signalled (then unmounts).
pub fn serve(args: &MountServerArgs) -> anyhow::Result<()> {
    let cfg = clip_core::policy::Config::load(args.config.as_deref())?;
    let net = clip_core::registry::BlockingClient::new(clip_core::service::client_config(&cfg)?)?;
    // With a span store, trees share prefetch profiles through it: the first node to run a
    // tree publishes its first `profileWindowSecs` of reads; the others prefetch them.
    let stem = args
        .archive
        .file_stem()
        .map_or_else(|| "tree".into(), |s| s.to_string_lossy().into_owned());
    let profile_obj = (cfg.profile_window_secs > 0)
        .then(|| profile_object(&cfg, &stem))
        .flatten();
    let shared = profile_obj.as_ref().and_then(|(o, limit)| {
        let bytes = net
            .block_on(async {
                tokio::time::timeout(*limit, o.get_bounded(clip_core::service::MAX_SMALL_OBJECT))
                    .await
            })
            .ok()?
            .ok()
            .flatten()?;
        clip_core::fs::Profile::from_slice(&bytes)
            .map_err(|e| tracing::warn!(error = %e, "shared prefetch profile rejected"))
            .ok()
    });
    if let Some(p) = &shared {
        tracing::info!(
            touches = p.touches.len(),
            "prefetching the tree's shared profile"
        );
    }
    let record = (profile_obj.is_some() && shared.is_none()).then(|| {
        cfg.cache_dir
            .join(format!("profile-{stem}-{}.json", std::process::id()))
    });
    let recording = record.is_some();
    let handle = clip_core::fs::mount_archive(clip_core::fs::MountOptions {
        archive: args.archive.clone(),
        mountpoint: args.mountpoint.clone(),
        cache_dir: cfg.cache_dir.clone(),
        cache_bytes: cfg.cache_size_gib << 30,
        cache_min_free_percent: cfg.cache_min_free_percent,
        registry: Some(net.clone()),
        span_store: cfg
            .span_store
            .as_ref()
            .map(clip_core::service::span_store_options),
        prefetch: shared,
        record_profile: record,
        ..clip_core::fs::MountOptions::default()
    })
    .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let window = Duration::from_secs(cfg.profile_window_secs);
    let started = std::time::Instant::now();
    let mut published = !recording;
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let mut tick = {
        let _rt = rt.enter();
        tokio::time::interval(Duration::from_millis(200))
    };
    // Waits for a signal or the unmount (`Some(why)`), or for the moment to publish the
    // profile (`None`: published outside the runtime, which the registry client blocks on).
    let why = loop {
        let event = rt.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => return Some("SIGTERM"),
                    _ = int.recv() => return Some("SIGINT"),
                    _ = tick.tick() => {
                        if handle.is_finished() {
                            return Some("unmounted");
                        }
                        if !published && started.elapsed() >= window {
                            return None;
                        }
                    }
                }
            }
        });
        match event {
            Some(why) => break why,
            None => publish_profile(&net, profile_obj.as_ref(), &handle, &mut published),
        }
    };
    publish_profile(&net, profile_obj.as_ref(), &handle, &mut published);
    let stats = handle.stats();
    handle.unmount()?;
    tracing::info!(mountpoint = %args.mountpoint.display(), why, served = stats.served_bytes, fetched = stats.fetched_bytes, "mount server stopped");
    Ok(())
}

/// Publishes the tree's recorded profile to the span store (create-only), once, if anything
/// was read.
fn publish_profile(
    net: &clip_core::registry::BlockingClient,
    obj: Option<&(clip_core::objstore::RemoteObject, Duration)>,
    handle: &clip_core::fs::MountHandle,
    published: &mut bool,
) {
    if *published {
        return;
    }
    let (Some((obj, limit)), Some(p)) = (obj, handle.profile()) else {
        return;
    };
    if p.touches.is_empty() {
        return;
    }
    *published = true;
    let Ok(bytes) = serde_json::to_vec(&p) else {
        return;
    };
    match net.block_on(async { tokio::time::timeout(*limit, obj.put_if_absent(&bytes)).await }) {
        Ok(Ok(true)) => tracing::info!(
            touches = p.touches.len(),
            "shared the tree's prefetch profile"
        ),
        Ok(Ok(false)) => tracing::debug!("another node shared this tree's profile first"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not share the prefetch profile"),
        Err(_) => tracing::warn!("could not share the prefetch profile: the span store timed out"),
    }
}
