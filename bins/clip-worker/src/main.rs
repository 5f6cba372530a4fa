//! `clip-worker`: the daemon that pulls, builds and lazily mounts images on a worker.
//!
//! `serve` runs the image service behind a small JSON HTTP API; the one-shot subcommands (`pull`,
//! `build`, `mount`, `umount`, `run`) run one flow and print a JSON result, for scripts and
//! operators. Configuration: `--config FILE` (the `imageService:` YAML section), then the
//! environment (`CLIP_VERSION`, `B9_BUILD_REGISTRY`, `CLIP_CACHE_DIR`). This binary holds only
//! argument parsing, config loading and wiring; the flows live in `clip-core::service`.
#![allow(clippy::print_stdout)]

mod api;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use clip_core::policy::Config;
use clip_core::service::{ImageService, ServiceOptions};

/// The clip worker: pull, build and lazily mount container images.
#[derive(Debug, Parser)]
#[command(name = "clip-worker", version, about)]
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
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: String,
    },
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

fn main() -> anyhow::Result<()> {
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
        Command::Serve { listen } => api::serve(&Arc::new(svc), &listen),
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
