//! `clip`: the command-line tool for `.clip` archives.
//!
//! Subcommands: `inspect`, `ls`, `cat` (an archive's contents), `index` (image → v2, from a
//! registry or an OCI layout), `archive` (image, OCI layout or directory → v1), `extract` (any
//! local archive → directory), `mount` / `umount` (lazy FUSE mount). This binary holds only
//! argument parsing (`cli`) and one module per command (`commands`); the work is `clip-core`'s.

mod cli;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser as _;

use cli::{Cli, Command};

/// The version `--version` prints: the program's and the archive format it reads and writes.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| clip_core::version_line(env!("CARGO_PKG_VERSION"), ""));

/// Errors are reported as their chain of causes, never as a backtrace (even with
/// `RUST_BACKTRACE=1`, which stays for panics), the way cargo and rustup report them.
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stderr)]
fn report(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Warnings (a layer streamed because its table of contents is unusable, a cache that cannot
    // be written) go to stderr; `CLIP_LOG` sets the filter. The mount server sets up its own.
    if !matches!(cli.command, Command::Mount(_)) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Inspect(a) => commands::inspect::run(&a, &mut out),
        Command::Ls(a) => commands::ls::run(&a, &mut out),
        Command::Cat(a) => commands::cat::run(&a, &mut out),
        Command::Index(a) => commands::index::run(a, &mut out),
        Command::Mount(a) => commands::mount::run(a),
        Command::Umount { mountpoint } => commands::mount::umount(&mountpoint),
        Command::Archive(a) => commands::archive::run(&a, &mut out),
        Command::Extract(a) => commands::extract::run(&a, &mut out),
        Command::Containerd(cli::ContainerdCommand::Pull(a)) => {
            commands::containerd::pull(&a, &mut out)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "clip",
                &mut out,
            );
            Ok(())
        }
        Command::Man { dir } => commands::man(&dir),
        Command::Keygen { file } => commands::keygen(&file, &mut out),
    }
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
