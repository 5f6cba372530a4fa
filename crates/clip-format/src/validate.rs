//! Open-time validation: every checksum, offset, reference, name rule and the tree's shape are
//! checked once, so that afterwards every accessor can read the mapping in place without checks.

use crate::ArchiveKind;
use crate::error::{Error, Result, entry_err, section_err};
use crate::meta::{CheckpointKind, MediaKind, Meta};
use crate::read::{Archive, EntryKind};
use crate::spec::{
    ATTR_SIZE, CHECKPOINT_SIZE, DIGEST_SIZE, LAYER_SIZE, MAX_META, SectionId, XATTR_SIZE, mode,
    u32_at, u64_at,
};

impl Archive {
    pub(crate) fn validate(&mut self) -> Result<()> {
        // Metadata.
        let meta_bytes = self.section(SectionId::META);
        if meta_bytes.len() as u64 > MAX_META {
            return Err(Error::InvalidMeta(format!(
                "{} bytes is too large",
                meta_bytes.len()
            )));
        }
        let meta: Meta =
            serde_json::from_slice(meta_bytes).map_err(|e| Error::InvalidMeta(e.to_string()))?;
        match self.kind {
            ArchiveKind::V2Oci => {
                let ok = meta
                    .source
                    .as_ref()
                    .is_some_and(|s| s.manifest_digest.algorithm() == "sha256");
                if !ok {
                    return Err(Error::InvalidMeta(
                        "a v2 archive needs a source pinned by a sha256 manifest digest".into(),
                    ));
                }
            }
            ArchiveKind::V1Remote => {
                if meta.remote.as_ref().is_none_or(|r| r.url.is_empty()) {
                    return Err(Error::InvalidMeta(
                        "a v1-remote archive needs a remote data URL".into(),
                    ));
                }
            }
            ArchiveKind::V1Local => {}
        }
        self.meta = meta;

        let n = self.len();
        if n == 0 {
            return Err(section_err(SectionId::ENTRIES, "no root entry"));
        }
        let n32 =
            u32::try_from(n).map_err(|_| section_err(SectionId::ENTRIES, "too many entries"))?;
        let n_attrs = self.section(SectionId::ATTRS).len() / ATTR_SIZE;
        for i in 0..n_attrs {
            let r = &self.section(SectionId::ATTRS)[i * ATTR_SIZE..(i + 1) * ATTR_SIZE];
            if EntryKind::from_mode(u32_at(r, 0)).is_none()
                || u32_at(r, 0) & !(mode::S_IFMT | 0o7777) != 0
            {
                return Err(section_err(
                    SectionId::ATTRS,
                    format!("record {i} has an invalid mode {:o}", u32_at(r, 0)),
                ));
            }
            if u32_at(r, 24) >= 1_000_000_000 || u32_at(r, 12) == 0 {
                return Err(section_err(
                    SectionId::ATTRS,
                    format!("record {i} has invalid nanoseconds or nlink"),
                ));
            }
        }
        let n_digests = self.section(SectionId::DIGESTS).len() / DIGEST_SIZE;
        let n_layers = self.section(SectionId::LAYERS).len() / LAYER_SIZE;
        let n_cps = self.section(SectionId::CHECKPOINTS).len() / CHECKPOINT_SIZE;
        let data_len = match self.kind {
            ArchiveKind::V1Local => self.section(SectionId::DATA).len() as u64,
            ArchiveKind::V1Remote => self.meta.remote.as_ref().map_or(0, |r| r.data_length),
            ArchiveKind::V2Oci => 0,
        };
        let layer_sizes: Vec<u64> = (0..n_layers)
            .map(|l| u64_at(self.section(SectionId::LAYERS), l * LAYER_SIZE + 32))
            .collect();

        // Per inode: the first entry that had it, so every name of one inode can be checked to agree.
        let mut first_of_ino: Vec<u32> = vec![u32::MAX; n];
        // Sparse maps already checked (by header record and file size): their stored length.
        let mut sparse_checked: std::collections::HashMap<(u32, u64), u64> =
            std::collections::HashMap::new();
        for i in 0..n32 {
            let e = self.raw(i);
            let kind = e.kind_checked(n_attrs).map_err(|r| entry_err(i, r))?;
            let name = self
                .string(e.name_ref())
                .map_err(|x| entry_err(i, x.to_string()))?;
            let parent = e.parent();
            if i == 0 {
                if !name.is_empty() || parent != 0 || kind != EntryKind::Dir {
                    return Err(entry_err(
                        0,
                        "the root must be an unnamed directory that is its own parent",
                    ));
                }
            } else {
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(entry_err(
                        i,
                        format!("invalid name {:?}", String::from_utf8_lossy(name)),
                    ));
                }
                if parent >= i {
                    return Err(entry_err(i, "parent does not precede the entry"));
                }
                let p = self.raw(parent);
                if p.kind_checked(n_attrs).ok() != Some(EntryKind::Dir)
                    || i < p.first_child()
                    || i - p.first_child() >= p.child_count()
                {
                    return Err(entry_err(i, "is not among its parent's children"));
                }
            }
            let ino = e.ino();
            if ino == 0 || ino > n32 {
                return Err(entry_err(i, format!("inode {ino} out of range")));
            }
            let slot = &mut first_of_ino[(ino - 1) as usize];
            if *slot == u32::MAX {
                *slot = i;
            } else {
                let f = self.raw(*slot);
                if kind != EntryKind::File
                    || f.attr() != e.attr()
                    || f.payload() != e.payload()
                    || f.size() != e.size()
                {
                    return Err(entry_err(
                        i,
                        format!(
                            "shares inode {ino} with entry #{} but not its data and attributes",
                            *slot
                        ),
                    ));
                }
            }
            // Fields a type does not use must be zero (see docs/format.md).
            let unused_ok = match kind {
                // v1: digest index and data offset; v2: layer, sparse map and offset.
                EntryKind::File => u32_at(e.r, 28) == 0 || self.kind == ArchiveKind::V2Oci,
                // The target's string reference.
                EntryKind::Symlink => e.unused_zero(4),
                // Children (first, count) or device numbers (major, minor).
                EntryKind::Dir | EntryKind::CharDevice | EntryKind::BlockDevice => {
                    e.size() == 0 && e.unused_zero(8)
                }
                EntryKind::Fifo | EntryKind::Socket => e.size() == 0 && e.unused_zero(0),
            };
            if !unused_ok {
                return Err(entry_err(i, "a field its type does not use is not zero"));
            }
            match kind {
                EntryKind::Dir => {
                    let (first, count) = (e.first_child(), e.child_count());
                    if count > 0
                        && (first <= i || u64::from(first) + u64::from(count) > u64::from(n32))
                    {
                        return Err(entry_err(i, "children range out of bounds"));
                    }
                    let mut prev: Option<&[u8]> = None;
                    for c in first..first.saturating_add(count) {
                        let child = self.raw(c);
                        if child.parent() != i {
                            return Err(entry_err(
                                c,
                                "child does not name its directory as parent",
                            ));
                        }
                        let cn = self
                            .string(child.name_ref())
                            .map_err(|x| entry_err(c, x.to_string()))?;
                        if prev.is_some_and(|p| p >= cn) {
                            return Err(entry_err(
                                c,
                                "children are not sorted by name or repeat a name",
                            ));
                        }
                        prev = Some(cn);
                    }
                }
                EntryKind::File => match self.kind {
                    ArchiveKind::V1Local | ArchiveKind::V1Remote => {
                        if e.digest_index() as usize >= n_digests
                            || e.data_offset()
                                .checked_add(e.size())
                                .is_none_or(|end| end > data_len)
                        {
                            return Err(entry_err(i, "file data is out of bounds"));
                        }
                    }
                    ArchiveKind::V2Oci => {
                        let sparse = e.sparse_ref();
                        let stored = if sparse == 0 {
                            e.size()
                        } else if let Some(n) = sparse_checked.get(&(sparse, e.size())) {
                            *n
                        } else {
                            let n = self
                                .sparse_map_at(sparse, e.size())
                                .map_err(|r| entry_err(i, format!("sparse map: {r}")))?
                                .stored_len();
                            sparse_checked.insert((sparse, e.size()), n);
                            n
                        };
                        let layer = e.layer() as usize;
                        let ok = layer < n_layers
                            && e.layer_offset()
                                .checked_add(stored)
                                .is_some_and(|end| end <= layer_sizes[layer]);
                        if !ok && stored > 0 {
                            return Err(entry_err(i, "file range is outside its layer"));
                        }
                    }
                },
                EntryKind::Symlink => {
                    let t = self
                        .string(e.target_ref())
                        .map_err(|x| entry_err(i, x.to_string()))?;
                    if t.is_empty() || t.len() as u64 != e.size() {
                        return Err(entry_err(i, "bad symlink target"));
                    }
                }
                _ => {}
            }
        }
        // Xattrs: sorted by entry, then name; references valid.
        let xs = self.section(SectionId::XATTRS);
        let mut prev: Option<(u32, &[u8])> = None;
        for k in 0..xs.len() / XATTR_SIZE {
            let r = k * XATTR_SIZE;
            let entry = u32_at(xs, r);
            let name = self.string(u32_at(xs, r + 4))?;
            self.string(u32_at(xs, r + 8))?;
            if entry >= n32
                || name.is_empty()
                || prev.is_some_and(|(pe, pn)| (pe, pn) >= (entry, name))
            {
                return Err(section_err(
                    SectionId::XATTRS,
                    format!("record {k} is out of order or out of range"),
                ));
            }
            prev = Some((entry, name));
        }
        // Layers and checkpoints.
        let windows_len = self.section(SectionId::WINDOWS).len() as u64;
        for l in 0..n_layers {
            let r = &self.section(SectionId::LAYERS)[l * LAYER_SIZE..(l + 1) * LAYER_SIZE];
            for (what, off) in [("digest", 0), ("diff_id", 4)] {
                let text = self.string(u32_at(r, off))?;
                if std::str::from_utf8(text)
                    .ok()
                    .and_then(|t| crate::Digest::parse(t).ok())
                    .is_none()
                {
                    return Err(section_err(
                        SectionId::LAYERS,
                        format!("layer {l} has an invalid {what}"),
                    ));
                }
            }
            let media = MediaKind::from_code(r[8]);
            if media.is_none()
                || !matches!(
                    (media, r[9]),
                    (_, 0 | 4)
                        | (Some(MediaKind::Zstd), 1 | 5)
                        | (Some(MediaKind::Gzip | MediaKind::Zstd), 2)
                )
            {
                return Err(section_err(
                    SectionId::LAYERS,
                    format!("layer {l} has an unknown media type or flags"),
                ));
            }
            let (first, count) = (u32_at(r, 12) as usize, u32_at(r, 16) as usize);
            if first.checked_add(count).is_none_or(|end| end > n_cps) {
                return Err(section_err(
                    SectionId::LAYERS,
                    format!("layer {l} checkpoint range is out of bounds"),
                ));
            }
            let (csize, usize_) = (u64_at(r, 24), u64_at(r, 32));
            let chained = r[9] & 4 != 0;
            let mut last = (0u64, 0u64);
            for c in first..first + count {
                let cp = &self.section(SectionId::CHECKPOINTS)
                    [c * CHECKPOINT_SIZE..(c + 1) * CHECKPOINT_SIZE];
                let (co, uo) = (u64_at(cp, 0), u64_at(cp, 8));
                let (wo, wl) = (u64::from(u32_at(cp, 16)), u64::from(u32_at(cp, 20)));
                // A chained layer's checkpoint head follows its window.
                let wl = wl + if chained { uo % 64 } else { 0 };
                let bad = cp[24] > 7
                    || CheckpointKind::from_code(cp[25]).is_none()
                    || co > csize
                    || uo > usize_
                    || wo + wl > windows_len
                    || (c > first && (co, uo) <= last);
                if bad {
                    return Err(section_err(
                        SectionId::CHECKPOINTS,
                        format!("checkpoint {c} of layer {l} is invalid"),
                    ));
                }
                last = (co, uo);
            }
        }
        Ok(())
    }
}
