//! `clip extract`: any local archive → a directory, every path resolved beneath it.

use std::io::Write;

use anyhow::Context as _;
use clip_core::extract::{ExtractOptions, extract};

use super::open;
use crate::cli::ExtractArgs;

pub(crate) fn run(args: &ExtractArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let (file, dir) = (&args.file, &args.dir);
    let archive = open(file)?;
    let host = archive
        .meta()
        .source
        .as_ref()
        .map(|s| s.registry.clone())
        .unwrap_or_default();
    let line = crate::progress::ProgressLine::start("extracting", !args.json);
    line.set_total(
        (0..u32::try_from(archive.len()).unwrap_or(u32::MAX))
            .filter_map(|i| archive.entry(i))
            .filter(|e| e.kind() == clip_core::format::EntryKind::File)
            .map(|e| e.size())
            .sum(),
    );
    drop(archive);
    let opts = ExtractOptions {
        registry: Some(args.registry.client(&host)?),
        remote: args.s3.options(),
        bytes_written: Some(line.counter()),
    };
    let s = extract(file, dir, &opts)
        .with_context(|| format!("extracting {} into {}", file.display(), dir.display()))?;
    drop(line);
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({"entries": s.entries, "files": s.files, "bytes": s.bytes, "seconds": secs, "dir": dir});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{}: {} entries, {} files, {} bytes, {secs:.2}s",
            dir.display(),
            s.entries,
            s.files,
            s.bytes
        )?;
    }
    Ok(())
}
