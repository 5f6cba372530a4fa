//! Open-time validation: every checksum, offset, reference, name rule and the tree's shape are
//! checked once, so that afterwards every accessor can read the mapping in place without checks.

use std::collections::HashMap;

use crate::ArchiveKind;
use crate::entry::Raw;
use crate::error::{Error, Result, entry_err, section_err};
use crate::meta::{CheckpointKind, MediaKind, Meta};
use crate::read::{Archive, EntryKind};
use crate::spec::{
    ATTR_SIZE, CHECKPOINT_SIZE, DIGEST_SIZE, LAYER_SIZE, MAX_META, SectionId, XATTR_SIZE, mode,
    u32_at, u64_at,
};

/// What the entry checks need to know of the other sections.
struct Bounds {
    /// Entries.
    n: u32,
    /// Attribute records.
    attrs: usize,
    /// Digest records (v1).
    digests: usize,
    /// v1: the data's length.
    data_len: u64,
    /// v2: each layer's uncompressed size.
    layer_sizes: Vec<u64>,
}

impl Archive {
    /// Every check, in the order the format builds on: metadata, attributes, entries (names,
    /// places, inodes, payloads), xattrs, layers and checkpoints.
    pub(crate) fn validate(&mut self) -> Result<()> {
        self.meta = self.validated_meta()?;
        let n = self.len();
        if n == 0 {
            return Err(section_err(SectionId::ENTRIES, "no root entry"));
        }
        let n =
            u32::try_from(n).map_err(|_| section_err(SectionId::ENTRIES, "too many entries"))?;
        let n_layers = self.section(SectionId::LAYERS).len() / LAYER_SIZE;
        let bounds = Bounds {
            n,
            attrs: self.validated_attrs()?,
            digests: self.section(SectionId::DIGESTS).len() / DIGEST_SIZE,
            data_len: match self.kind {
                ArchiveKind::V1Local => self.section(SectionId::DATA).len() as u64,
                ArchiveKind::V1Remote => self.meta.remote.as_ref().map_or(0, |r| r.data_length),
                ArchiveKind::V2Oci => 0,
            },
            layer_sizes: (0..n_layers)
                .map(|l| u64_at(self.section(SectionId::LAYERS), l * LAYER_SIZE + 32))
                .collect(),
        };
        self.validate_entries(&bounds)?;
        self.validate_xattrs(n)?;
        self.validate_layers(n_layers)
    }

    /// The metadata section, parsed, with what its archive kind requires.
    fn validated_meta(&self) -> Result<Meta> {
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
        Ok(meta)
    }

    /// Checks every attribute record (mode, nanoseconds, link count); returns how many there are.
    fn validated_attrs(&self) -> Result<usize> {
        let attrs = self.section(SectionId::ATTRS);
        let n_attrs = attrs.len() / ATTR_SIZE;
        for i in 0..n_attrs {
            let r = &attrs[i * ATTR_SIZE..(i + 1) * ATTR_SIZE];
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
        Ok(n_attrs)
    }

    /// Every entry: its name and place in the tree, its inode, the fields its type leaves
    /// unused, and its payload.
    fn validate_entries(&self, b: &Bounds) -> Result<()> {
        // Per inode: the first entry that had it, so every name of one inode can be checked to
        // agree.
        let mut first_of_ino: Vec<u32> = vec![u32::MAX; b.n as usize];
        // Sparse maps already checked (by header record and file size): their stored length.
        let mut sparse_checked: HashMap<(u32, u64), u64> = HashMap::new();
        for i in 0..b.n {
            let e = self.raw(i);
            let kind = e.kind_checked(b.attrs).map_err(|r| entry_err(i, r))?;
            self.check_place(i, &e, kind, b.attrs)?;
            self.check_inode(i, &e, kind, b.n, &mut first_of_ino)?;
            self.check_unused(i, &e, kind)?;
            match kind {
                EntryKind::Dir => self.check_children(i, &e, b.n)?,
                EntryKind::File => self.check_file_data(i, &e, b, &mut sparse_checked)?,
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
        Ok(())
    }

    /// Entry `i`'s name, and that it is among its parent's children (the root: an unnamed
    /// directory that is its own parent).
    fn check_place(&self, i: u32, e: &Raw<'_>, kind: EntryKind, n_attrs: usize) -> Result<()> {
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
            return Ok(());
        }
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
        Ok(())
    }

    /// Entry `i`'s inode is in range, and every other name of it (a hard link) is a file with
    /// the same data and attributes.
    fn check_inode(
        &self,
        i: u32,
        e: &Raw<'_>,
        kind: EntryKind,
        n: u32,
        first_of_ino: &mut [u32],
    ) -> Result<()> {
        let ino = e.ino();
        if ino == 0 || ino > n {
            return Err(entry_err(i, format!("inode {ino} out of range")));
        }
        let slot = &mut first_of_ino[(ino - 1) as usize];
        if *slot == u32::MAX {
            *slot = i;
            return Ok(());
        }
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
        Ok(())
    }

    /// Fields a type does not use must be zero (see docs/format.md).
    fn check_unused(&self, i: u32, e: &Raw<'_>, kind: EntryKind) -> Result<()> {
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
        if unused_ok {
            Ok(())
        } else {
            Err(entry_err(i, "a field its type does not use is not zero"))
        }
    }

    /// Directory `i`'s children: in bounds, after it, naming it as parent, sorted by name
    /// without repeats.
    fn check_children(&self, i: u32, e: &Raw<'_>, n: u32) -> Result<()> {
        let (first, count) = (e.first_child(), e.child_count());
        if count > 0 && (first <= i || u64::from(first) + u64::from(count) > u64::from(n)) {
            return Err(entry_err(i, "children range out of bounds"));
        }
        let mut prev: Option<&[u8]> = None;
        for c in first..first.saturating_add(count) {
            let child = self.raw(c);
            if child.parent() != i {
                return Err(entry_err(c, "child does not name its directory as parent"));
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
        Ok(())
    }

    /// File `i`'s data: v1, a digest record and a range within the data; v2, a range (its
    /// stored bytes, after a sparse map) within its layer.
    fn check_file_data(
        &self,
        i: u32,
        e: &Raw<'_>,
        b: &Bounds,
        sparse_checked: &mut HashMap<(u32, u64), u64>,
    ) -> Result<()> {
        if self.kind != ArchiveKind::V2Oci {
            if e.digest_index() as usize >= b.digests
                || e.data_offset()
                    .checked_add(e.size())
                    .is_none_or(|end| end > b.data_len)
            {
                return Err(entry_err(i, "file data is out of bounds"));
            }
            return Ok(());
        }
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
        let ok = layer < b.layer_sizes.len()
            && e.layer_offset()
                .checked_add(stored)
                .is_some_and(|end| end <= b.layer_sizes[layer]);
        if !ok && stored > 0 {
            return Err(entry_err(i, "file range is outside its layer"));
        }
        Ok(())
    }

    /// Xattrs: sorted by entry, then name; references valid.
    fn validate_xattrs(&self, n: u32) -> Result<()> {
        let xs = self.section(SectionId::XATTRS);
        let mut prev: Option<(u32, &[u8])> = None;
        for k in 0..xs.len() / XATTR_SIZE {
            let r = k * XATTR_SIZE;
            let entry = u32_at(xs, r);
            let name = self.string(u32_at(xs, r + 4))?;
            self.string(u32_at(xs, r + 8))?;
            if entry >= n
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
        Ok(())
    }

    /// Layers (digests, media type and flags, checkpoint range) and their checkpoints.
    fn validate_layers(&self, n_layers: usize) -> Result<()> {
        let n_cps = self.section(SectionId::CHECKPOINTS).len() / CHECKPOINT_SIZE;
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
            self.check_checkpoints(l, r, first..first + count)?;
        }
        Ok(())
    }

    /// Layer `l`'s checkpoints (`cps` of the table): kinds known, offsets within the layer and
    /// strictly increasing, windows within the windows section.
    fn check_checkpoints(&self, l: usize, r: &[u8], cps: std::ops::Range<usize>) -> Result<()> {
        let windows_len = self.section(SectionId::WINDOWS).len() as u64;
        let (csize, usize_) = (u64_at(r, 24), u64_at(r, 32));
        let chained = r[9] & 4 != 0;
        let first = cps.start;
        let mut last = (0u64, 0u64);
        for c in cps {
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
        Ok(())
    }
}
