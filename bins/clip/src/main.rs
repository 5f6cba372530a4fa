//! `clip`: the command-line tool for `.clip` archives.
//!
//! Subcommands arrive with the capabilities they expose (format: `inspect`, `ls`, `cat`; indexer:
//! `index`; v1: `archive`, `extract`; fs: `mount`, `umount`). This binary holds only argument
//! parsing and wiring.

use clap::Parser;

/// Make container images start in seconds: index, archive, extract and mount `.clip` archives.
#[derive(Debug, Parser)]
#[command(name = "clip", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
