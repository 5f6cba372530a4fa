//! `clip inspect`: an archive's kind, source, layers, sections and image config.

use std::io::Write;

use clip_core::format::{FORMAT_VERSION, SectionId};

use super::open;
use crate::cli::InspectArgs;

pub(crate) fn run(args: &InspectArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let (file, json) = (&args.file, args.json);
    let a = open(file)?;
    let sections: Vec<_> = a
        .sections()
        .iter()
        .map(|s| serde_json::json!({"name": s.id.name(), "offset": s.offset, "length": s.length}))
        .collect();
    let index_bytes: u64 = a
        .sections()
        .iter()
        .filter(|s| s.id != SectionId::DATA && s.id != SectionId::WINDOWS)
        .map(|s| s.length)
        .sum::<u64>();
    let header = a.sections().iter().map(|s| s.offset).min().unwrap_or(0);
    let per_entry = (index_bytes + header) as f64 / a.len().max(1) as f64;
    let v = serde_json::json!({
        "kind": a.kind().to_string(),
        "format_version": FORMAT_VERSION,
        "entries": a.len(),
        "bytes": a.as_bytes().len(),
        "index_bytes_per_entry": (per_entry * 10.0).round() / 10.0,
        "source": a.meta().source,
        "remote": a.meta().remote,
        "layers": a.layers(),
        "checkpoints": a.checkpoint_count(),
        "sections": sections,
        "image": a.meta().image,
        "created_by": a.meta().created_by,
    });
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "file:        {}", file.display())?;
    writeln!(
        out,
        "kind:        {} (format version {})",
        a.kind(),
        FORMAT_VERSION
    )?;
    writeln!(out, "entries:     {}", a.len())?;
    writeln!(
        out,
        "size:        {} bytes; index {per_entry:.1} bytes/entry",
        a.as_bytes().len()
    )?;
    if let Some(s) = &a.meta().source {
        writeln!(
            out,
            "image:       {}/{}@{}",
            s.registry, s.repository, s.manifest_digest
        )?;
        writeln!(out, "reference:   {}", s.reference)?;
    }
    if let Some(r) = &a.meta().remote {
        writeln!(
            out,
            "data:        {} ({} bytes at offset {})",
            r.url, r.data_length, r.data_offset
        )?;
    }
    for (i, l) in a.layers().iter().enumerate() {
        writeln!(
            out,
            "layer {i}:     {} {:?} {} -> {} bytes, {} checkpoints",
            l.digest,
            l.media,
            l.compressed_size,
            l.uncompressed_size,
            a.checkpoints(u32::try_from(i)?).len()
        )?;
    }
    writeln!(out, "sections:")?;
    for s in a.sections() {
        writeln!(
            out,
            "  {:<12} offset {:>10} length {:>12}",
            s.id.name(),
            s.offset,
            s.length
        )?;
    }
    let img = &a.meta().image;
    if !img.os.is_empty() || !img.cmd.is_empty() || !img.entrypoint.is_empty() {
        writeln!(
            out,
            "config:      {}/{} entrypoint {:?} cmd {:?} user {:?} workdir {:?}",
            img.os, img.architecture, img.entrypoint, img.cmd, img.user, img.working_dir
        )?;
        writeln!(out, "env:         {:?}", img.env)?;
    }
    Ok(())
}
