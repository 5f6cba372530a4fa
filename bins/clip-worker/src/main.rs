//! `clip-worker`: the daemon that pulls, builds and lazily mounts images on a worker.
//!
//! The image service (pull, build, PullLazy), its HTTP API and one-shot subcommands arrive with the
//! image service issue. This binary holds only argument parsing, config loading and wiring.

use clap::Parser;

/// The clip worker daemon.
#[derive(Debug, Parser)]
#[command(name = "clip-worker", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
