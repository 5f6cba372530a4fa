//! `clip ls`: a directory of an archive (or one entry), like `ls -la`.

use std::io::Write;

use anyhow::Context as _;
use clip_core::format::EntryKind;

use super::open;
use crate::cli::LsArgs;

fn mode_string(kind: EntryKind, mode: u32) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
        EntryKind::CharDevice => 'c',
        EntryKind::BlockDevice => 'b',
        EntryKind::Fifo => 'p',
        EntryKind::Socket => 's',
    };
    let mut s = String::from(t);
    for (i, c) in ['r', 'w', 'x', 'r', 'w', 'x', 'r', 'w', 'x']
        .iter()
        .enumerate()
    {
        let bit = 0o400 >> i;
        let special = match i {
            2 if mode & 0o4000 != 0 => Some('s'),
            5 if mode & 0o2000 != 0 => Some('s'),
            8 if mode & 0o1000 != 0 => Some('t'),
            _ => None,
        };
        s.push(match (special, mode & bit != 0) {
            (Some(sp), true) => sp,
            (Some(sp), false) => sp.to_ascii_uppercase(),
            (None, true) => *c,
            (None, false) => '-',
        });
    }
    s
}

pub(crate) fn run(args: &LsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let (file, path) = (&args.file, &args.path);
    let a = open(file)?;
    let e = a
        .lookup(path.as_bytes())
        .with_context(|| format!("{path}: no such entry in {}", file.display()))?;
    let entries: Vec<_> = if e.kind() == EntryKind::Dir {
        e.children().collect()
    } else {
        vec![e]
    };
    for c in entries {
        let size = match c.rdev() {
            Some((ma, mi)) => format!("{ma}, {mi}"),
            None => c.size().to_string(),
        };
        let name = String::from_utf8_lossy(c.name()).escape_debug().to_string();
        let target = c
            .symlink_target()
            .map(|t| format!(" -> {}", String::from_utf8_lossy(t)))
            .unwrap_or_default();
        writeln!(
            out,
            "{} {:>3} {:>5} {:>5} {:>10} {:>10} {name}{target}",
            mode_string(c.kind(), c.mode()),
            c.nlink(),
            c.uid(),
            c.gid(),
            size,
            c.mtime().0
        )?;
    }
    Ok(())
}
