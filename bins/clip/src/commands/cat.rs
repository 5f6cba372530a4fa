//! `clip cat`: a file's content from a v1 local archive.

use std::io::Write;

use anyhow::{Context as _, bail};
use clip_core::format::EntryKind;

use super::open;
use crate::cli::CatArgs;

pub(crate) fn run(args: &CatArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let a = open(&args.file)?;
    let path = &args.path;
    let e = a
        .lookup(path.as_bytes())
        .with_context(|| format!("{path}: no such entry in {}", args.file.display()))?;
    if e.kind() != EntryKind::File {
        bail!("{path} is a {:?}, not a regular file", e.kind());
    }
    out.write_all(a.file_data(&e, true)?)?;
    Ok(())
}
