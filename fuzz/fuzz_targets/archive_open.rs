//! Open arbitrary bytes as a `.clip` archive and, if that succeeds, walk every entry and read
//! every field: no input may panic, hang or read out of bounds. Each input is tried twice: as
//! given (exercising header and checksum checks) and resealed with correct checksums (exercising
//! the structural validation behind them).
#![no_main]

use clip_format::{Archive, ArchiveKind, EntryKind};
use libfuzzer_sys::fuzz_target;

fn walk(bytes: Vec<u8>) {
    let Ok(archive) = Archive::from_bytes(bytes) else { return };
    let _ = archive.meta();
    for i in 0..archive.len() as u32 {
        let Some(e) = archive.entry(i) else { continue };
        let _ = (e.path(), e.name(), e.mode(), e.uid(), e.gid(), e.nlink(), e.mtime(), e.ino());
        let _ = (e.size(), e.symlink_target(), e.rdev(), e.data(), e.parent().index());
        for (k, v) in e.xattrs() {
            let _ = (k.len(), v.len());
        }
        for c in e.children() {
            let _ = e.child(c.name());
        }
        if e.kind() == EntryKind::File && archive.kind() == ArchiveKind::V1Local {
            let _ = archive.file_data(&e, true);
        }
    }
    for l in 0..archive.layers().len() as u32 {
        let _ = archive.checkpoints(l);
    }
    let _ = archive.lookup(b"a/b/c");
}

fuzz_target!(|data: &[u8]| {
    walk(data.to_vec());
    let mut resealed = data.to_vec();
    clip_format::spec::reseal(&mut resealed);
    walk(resealed);
});
