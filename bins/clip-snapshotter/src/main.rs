//! `clip-snapshotter`: containerd's snapshots service on a unix socket, serving unmodified
//! gzip/zstd images lazily from clip v2 indexes (see `clip-containerd` for the model).
//!
//! ```text
//! clip-snapshotter --address /run/clip/snapshotter.sock --root /var/lib/clip-snapshotter \
//!     [--config /etc/clip/snapshotter.yaml] [--metrics-address 127.0.0.1:9102]
//! ```
//!
//! containerd's configuration names it as a proxy plugin:
//! `[proxy_plugins.clip] type = "snapshot" address = "/run/clip/snapshotter.sock"`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// The version `--version` prints: the program's and the archive format it reads.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    clip_core::version_line(env!("CARGO_PKG_VERSION"), ", containerd snapshots API v1")
});

#[derive(Debug, Parser)]
#[command(
    name = "clip-snapshotter",
    version = VERSION.as_str(),
    about = "containerd remote snapshotter: starts unmodified images lazily from clip v2 indexes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The unix socket containerd's `proxy_plugins` entry names.
    #[arg(long, default_value = "/run/clip/snapshotter.sock")]
    address: PathBuf,
    /// Where snapshots, archives, mount points and metadata live (root's alone).
    #[arg(long, default_value = "/var/lib/clip-snapshotter")]
    root: PathBuf,
    /// The worker's configuration file (`imageService:` registries, credentials, cacheDir,
    /// cacheSizeGiB, checkpointMiB, certsDirs, registriesConf); unknown keys are errors.
    #[arg(long, env = "CLIP_CONFIG")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    #[arg(long, value_name = "ADDR")]
    metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve one lazy tree (started by the snapshotter itself; outlives it).
    #[command(hide = true)]
    MountServer {
        /// The v2 archive.
        #[arg(long)]
        archive: PathBuf,
        /// The mount point.
        #[arg(long)]
        mountpoint: PathBuf,
        /// The snapshotter's configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e}");
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::MountServer {
        archive,
        mountpoint,
        config,
    }) = cli.command
    {
        return Ok(clip_containerd::mount_server::serve(
            &clip_containerd::mount_server::MountServerArgs {
                archive,
                mountpoint,
                config,
            },
        )?);
    }
    let cfg = clip_core::policy::Config::load(cli.config.as_deref())
        .context("loading the configuration")?;
    let server = clip_containerd::lazy::ServerCommand {
        program: std::env::current_exe().context("finding this program")?,
        config: cli
            .config
            .as_ref()
            .map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone())),
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let root = cli.root.clone();
        let snapshotter = tokio::task::spawn_blocking(move || {
            let lazy = clip_containerd::lazy::Lazy::new(&root, cfg, server)?;
            clip_containerd::Snapshotter::open(&root, lazy)
                .with_context(|| format!("opening {}", root.display()))
        })
        .await??;
        if let (Some(addr), Some(handle)) = (cli.metrics_address, metrics) {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let h = handle.clone();
                    async move { h.render() }
                }),
            );
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics listener on {addr}"))?;
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            tracing::info!("stopping; lazy mounts keep serving running containers");
        };
        Ok(clip_containerd::serve_unix(&cli.address, snapshotter, shutdown).await?)
    })
}
