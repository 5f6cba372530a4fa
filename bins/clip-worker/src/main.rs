//! `clip-worker`: the daemon that pulls, builds and lazily mounts images on a worker.
//!
//! `serve` runs the image service behind a small JSON HTTP API; the one-shot subcommands (`pull`,
//! `build`, `mount`, `umount`, `run`) run one flow and print a JSON result, for scripts and
//! operators. Configuration: `--config FILE` (the `imageService:` YAML section), then the
//! environment (`CLIP_VERSION`, `B9_BUILD_REGISTRY`, `CLIP_CACHE_DIR`). This binary holds only
//! argument parsing, config loading and wiring; the flows live in `clip-core::service`.
#![allow(clippy::print_stdout)]

mod api;
mod auth;
mod listen;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use clip_core::policy::Config;
use clip_core::service::{ImageService, ServiceOptions};

/// The clip worker: pull, build and lazily mount container images.
#[derive(Debug, Parser)]
#[command(name = "clip-worker", version = VERSION.as_str(), about)]
struct Cli {
    /// Configuration file (YAML with an `imageService:` section).
    #[arg(long, global = true, env = "CLIP_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// buildah storage root (default: buildah's own).
    #[arg(long, global = true)]
    buildah_root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the JSON HTTP API until SIGTERM/SIGINT; unmounts everything on the way out.
    Serve(ServeArgs),
    /// Pull an image and store its archive (v2 or v1 per the configuration).
    Pull {
        /// The image reference.
        image: String,
    },
    /// Build a Dockerfile and store its archive (v2 via the build registry, else v1).
    Build {
        /// The Dockerfile (default: CONTEXT/Dockerfile).
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// `KEY=VALUE` build arguments.
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// The build context directory.
        context: PathBuf,
    },
    /// Mount an image (PullLazy) and keep serving it until SIGTERM/SIGINT.
    Mount {
        /// The image id.
        image_id: String,
    },
    /// Run a command in a new container of an image (the image's command if none is given).
    Run {
        /// The image id.
        image_id: String,
        /// The command and its arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// How the API is reached and who may use it (docs/security.md).
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// `unix:PATH`, or `tcp:ADDR:PORT` (which needs --token-file or --tls-client-ca, and TLS
    /// unless the address is a loopback one).
    #[arg(long, default_value = "unix:/run/clip/worker.sock")]
    listen: listen::Listen,
    /// Mode of the unix socket (octal).
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group that owns the unix socket (name or gid); its members may use the API.
    #[arg(long)]
    socket_group: Option<String>,
    /// Bearer tokens, one per line (several for rotation); every request must send one.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) of a tcp: listener.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of a tcp: listener.
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// Serve read-only endpoints (`/healthz`, `/metrics`, `GET /v1/images`, `GET /v1/mounts`)
    /// without a token.
    #[arg(long)]
    public_read: bool,
    /// Allow a loopback tcp: listener with no authentication at all. Any local process could
    /// then start containers as root: for throwaway test machines only.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Flows (pull, build, mount, run) at once; more are answered 429.
    #[arg(long, default_value_t = 4)]
    max_flows: usize,
    /// Largest uploaded build context (bytes; K/M/G suffixes).
    #[arg(long, default_value = "1G", value_parser = clip_core::policy::parse_size)]
    max_context_bytes: u64,
    /// Longest a request may take, in seconds, before it is answered 408.
    #[arg(long, default_value_t = 3600)]
    request_timeout_secs: u64,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode"))
}

/// The version `--version` prints: the program's and the archive format it reads and writes.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| clip_core::version_line(env!("CARGO_PKG_VERSION"), ""));

/// Errors are reported as their chain of causes, never as a backtrace (even with
/// `RUST_BACKTRACE=1`, which stays for panics).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e}");
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    tracing::info!(
        clip_version = cfg.clip_version,
        build_registry = %cfg.build_registry,
        "clip version {} configured",
        cfg.clip_version
    );
    let svc = ImageService::new(
        cfg,
        ServiceOptions {
            buildah_root: cli.buildah_root,
        },
    )?;
    let print = |v: serde_json::Value| println!("{v}");
    match cli.command {
        Command::Serve(args) => serve(&Arc::new(svc), args),
        Command::Pull { image } => {
            let r = svc.pull_and_archive(&image)?;
            print(serde_json::to_value(r)?);
            Ok(())
        }
        Command::Build {
            file,
            build_args,
            context,
        } => {
            let dockerfile = file.unwrap_or_else(|| context.join("Dockerfile"));
            let args = build_args
                .iter()
                .map(|a| {
                    a.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("--build-arg {a:?} must be KEY=VALUE"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = svc.build_and_archive(&dockerfile, &context, &args)?;
            print(serde_json::to_value(r)?);
            Ok(())
        }
        Command::Mount { image_id } => {
            let m = svc.pull_lazy(&image_id)?;
            print(
                serde_json::json!({"image_id": m.image_id, "version": m.version, "mountpoint": m.mountpoint}),
            );
            api::wait_for_signal()?;
            drop(m);
            svc.unmount_all();
            Ok(())
        }
        Command::Run { image_id, args } => {
            let out = svc.run(&image_id, (!args.is_empty()).then_some(&args[..]))?;
            print(serde_json::to_value(&out)?);
            svc.unmount_all();
            std::process::exit(out.status);
        }
    }
}

/// Serves the API until SIGTERM/SIGINT, then unmounts everything.
fn serve(svc: &Arc<ImageService>, args: ServeArgs) -> anyhow::Result<()> {
    let creds = Arc::new(auth::Credentials::load(
        args.token_file.as_deref(),
        args.public_read,
    )?);
    let tls = listen::Tls {
        cert: args.tls_cert,
        key: args.tls_key,
        client_ca: args.tls_client_ca,
    };
    listen::check_policy(
        &args.listen,
        &tls,
        creds.has_tokens(),
        args.insecure_no_auth,
    )?;
    if let Ok(h) = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        let _ = api::PROMETHEUS.set(h);
    }
    let limits = api::Limits {
        max_flows: args.max_flows,
        max_context_bytes: args.max_context_bytes,
        request_timeout: std::time::Duration::from_secs(args.request_timeout_secs),
    };
    let perms = listen::SocketPerms {
        mode: args.socket_mode,
        group: args.socket_group,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Index on push: registry notifications at POST /v1/registry-events feed a queue indexed
    // by a background thread.
    let on_push = match &svc.config().index_on_push {
        None => None,
        Some(p) => {
            let Some(file) = &p.secret_file else {
                anyhow::bail!(
                    "imageService.indexOnPush needs secretFile: the registry's notifications authenticate with a secret of their own (`openssl rand -hex 32`, sent as `Authorization: Bearer SECRET` from the registry's notifications.endpoints headers), never with the API's token"
                );
            };
            let secrets = Arc::new(
                auth::Credentials::load(Some(file), false).context("indexOnPush.secretFile")?,
            );
            Some((
                Arc::new(clip_core::service::on_push::PushIndexer::start(
                    Arc::clone(svc),
                    1,
                )),
                secrets,
            ))
        }
    };
    let router = api::router(Arc::clone(svc), limits, creds, on_push);
    rt.block_on(async {
        let bound = listen::bind(&args.listen, &tls, &perms).await?;
        match bound {
            listen::Bound::Unix(l, path) => {
                tracing::info!(socket = %path.display(), mode = format!("{:o}", perms.mode), "clip-worker listening");
                let served = axum::serve(l, router)
                    .with_graceful_shutdown(api::shutdown_signal())
                    .await;
                let _ = std::fs::remove_file(&path);
                served?;
            }
            listen::Bound::Tcp(l) => {
                tracing::info!(addr = %l.local_addr()?, "clip-worker listening");
                axum::serve(l, router)
                    .with_graceful_shutdown(api::shutdown_signal())
                    .await?;
            }
            listen::Bound::Tls(l) => {
                tracing::info!(addr = %axum::serve::Listener::local_addr(&l)?, tls = true, "clip-worker listening");
                axum::serve(l, router)
                    .with_graceful_shutdown(api::shutdown_signal())
                    .await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    tracing::info!("shutting down: unmounting all images");
    svc.unmount_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_formats_this_build_reads() {
        let want = format!(
            "(archive format {}, layer index format {})",
            clip_core::format::FORMAT_VERSION,
            clip_core::indexer::LAYER_INDEX_VERSION
        );
        assert!(super::VERSION.ends_with(&want), "{}", *super::VERSION);
    }
}
