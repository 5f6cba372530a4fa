//! Sparse files: which parts of a file hold data and where that data is stored.
//!
//! A PAX sparse file (GNU tar `--sparse`, formats 0.0, 0.1 and 1.0) stores only its data
//! extents, back to back; everything between them reads as zeros. A [`SparseMap`] is that list
//! of extents (logical offset, length), kept sorted, non-overlapping, non-empty and merged where
//! they touch, plus the file's logical size. Stored byte `k` of the file is logical byte
//! `extent.offset + (k - bytes stored before the extent)`.
//!
//! Readers turn a logical range into the stored range that holds its data
//! ([`SparseMap::stored_range`]) and expand those stored bytes back into the logical bytes
//! ([`SparseMap::expand`]); sequential consumers wrap the stored byte stream in a
//! [`SparseReader`] that yields the whole logical file.

use std::io::Read;

/// One data extent of a sparse file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Logical offset of the extent's first byte.
    pub offset: u64,
    /// Its length (> 0).
    pub length: u64,
}

impl Extent {
    fn end(self) -> u64 {
        self.offset + self.length
    }
}

/// The data extents of a sparse file of logical size [`SparseMap::size`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseMap {
    extents: Vec<Extent>,
    /// `before[k]`: stored bytes of the extents before `k`; one more entry: the total.
    before: Vec<u64>,
    size: u64,
}

impl SparseMap {
    /// The map of a `size`-byte file whose data extents are `extents` (logical offset, length),
    /// in file order as tar writes them. Empty extents are dropped and touching ones merged.
    ///
    /// # Errors
    /// A description of the problem if extents are out of order, overlap, or pass `size`.
    pub fn new(
        extents: impl IntoIterator<Item = (u64, u64)>,
        size: u64,
    ) -> std::result::Result<Self, String> {
        let mut out: Vec<Extent> = Vec::new();
        let mut end = 0u64;
        for (offset, length) in extents {
            let e = offset
                .checked_add(length)
                .ok_or_else(|| format!("extent at {offset} of {length} bytes overflows"))?;
            if offset < end {
                return Err(format!(
                    "extent at {offset} starts before the previous one ends ({end})"
                ));
            }
            if e > size {
                return Err(format!(
                    "extent {offset}..{e} passes the end of the {size}-byte file"
                ));
            }
            end = e;
            if length == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end() == offset => last.length += length,
                _ => out.push(Extent { offset, length }),
            }
        }
        let mut before = Vec::with_capacity(out.len() + 1);
        let mut total = 0u64;
        for e in &out {
            before.push(total);
            total += e.length;
        }
        before.push(total);
        Ok(Self {
            extents: out,
            before,
            size,
        })
    }

    /// The data extents.
    #[must_use]
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The logical file size.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many bytes are stored (the sum of the extent lengths).
    #[must_use]
    pub fn stored_len(&self) -> u64 {
        self.before.last().copied().unwrap_or(0)
    }

    /// True when the map has no holes: one extent covering the whole file (or an empty file).
    #[must_use]
    pub fn is_dense(&self) -> bool {
        self.stored_len() == self.size
    }

    /// The stored offset of logical position `pos` (inside a hole: of the next data byte).
    #[must_use]
    pub fn stored_at(&self, pos: u64) -> u64 {
        // First extent that ends after `pos`.
        let k = self.extents.partition_point(|e| e.end() <= pos);
        match self.extents.get(k) {
            Some(e) if e.offset <= pos => self.before[k] + (pos - e.offset),
            _ => self.before[k],
        }
    }

    /// Where the data at or after logical position `pos` starts (`SEEK_DATA`); `None` past the
    /// last extent.
    #[must_use]
    pub fn next_data(&self, pos: u64) -> Option<u64> {
        let k = self.extents.partition_point(|e| e.end() <= pos);
        self.extents.get(k).map(|e| e.offset.max(pos))
    }

    /// Where the hole at or after logical position `pos` starts (`SEEK_HOLE`); the end of the
    /// file counts as a hole.
    #[must_use]
    pub fn next_hole(&self, pos: u64) -> u64 {
        let k = self.extents.partition_point(|e| e.end() <= pos);
        match self.extents.get(k) {
            Some(e) if e.offset <= pos => e.end(),
            _ => pos.min(self.size),
        }
    }

    /// The stored bytes holding the data of logical range `from..to`.
    #[must_use]
    pub fn stored_range(&self, from: u64, to: u64) -> std::ops::Range<u64> {
        self.stored_at(from)..self.stored_at(to.max(from))
    }

    /// The logical bytes `from..to` (clamped to the file), given `stored`: the bytes of
    /// [`Self::stored_range`]`(from, to)`. Missing stored bytes read as zeros.
    #[must_use]
    pub fn expand(&self, from: u64, to: u64, stored: &[u8]) -> Vec<u8> {
        let to = to.min(self.size);
        let from = from.min(to);
        let mut out = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
        let base = self.stored_at(from);
        let k = self.extents.partition_point(|e| e.end() <= from);
        for (e, before) in self.extents[k..].iter().zip(&self.before[k..]) {
            if e.offset >= to {
                break;
            }
            let (a, z) = (e.offset.max(from), e.end().min(to));
            let s = before + (a - e.offset) - base;
            let (lo, hi) = (
                usize::try_from(s).unwrap_or(usize::MAX),
                usize::try_from(s + (z - a)).unwrap_or(usize::MAX),
            );
            if let Some(src) = stored.get(lo..hi.min(stored.len())) {
                let at = usize::try_from(a - from).unwrap_or(0);
                out[at..at + src.len()].copy_from_slice(src);
            }
        }
        out
    }
}

/// Yields a sparse file's logical bytes from a reader of its stored bytes: zeros for the holes,
/// the stored bytes for the extents. Errors if the stored stream ends early.
pub struct SparseReader<'m, R> {
    map: &'m SparseMap,
    inner: R,
    pos: u64,
    next: usize,
}

impl<'m, R: Read> SparseReader<'m, R> {
    /// Reads `map`'s file from `inner`, positioned at its first stored byte.
    pub fn new(map: &'m SparseMap, inner: R) -> Self {
        Self {
            map,
            inner,
            pos: 0,
            next: 0,
        }
    }
}

impl<R: Read> Read for SparseReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.map.size || buf.is_empty() {
            return Ok(0);
        }
        while self
            .map
            .extents
            .get(self.next)
            .is_some_and(|e| e.end() <= self.pos)
        {
            self.next += 1;
        }
        let room = buf.len() as u64;
        match self.map.extents.get(self.next) {
            Some(e) if e.offset <= self.pos => {
                let want = usize::try_from((e.end() - self.pos).min(room)).unwrap_or(buf.len());
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "sparse file data ends early",
                    ));
                }
                self.pos += n as u64;
                Ok(n)
            }
            other => {
                let hole_end = other.map_or(self.map.size, |e| e.offset);
                let n = usize::try_from((hole_end - self.pos).min(room)).unwrap_or(buf.len());
                buf[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logical(map: &SparseMap, stored: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; map.size() as usize];
        let mut s = 0usize;
        for e in map.extents() {
            let n = e.length as usize;
            v[e.offset as usize..e.offset as usize + n].copy_from_slice(&stored[s..s + n]);
            s += n;
        }
        v
    }

    #[test]
    fn normalises_and_rejects() {
        let m = SparseMap::new([(0, 0), (10, 5), (15, 5), (30, 0), (40, 2)], 50).unwrap();
        assert_eq!(
            m.extents(),
            &[
                Extent {
                    offset: 10,
                    length: 10
                },
                Extent {
                    offset: 40,
                    length: 2
                }
            ]
        );
        assert_eq!(m.stored_len(), 12);
        assert!(!m.is_dense());
        assert!(SparseMap::new([(0, 50)], 50).unwrap().is_dense());
        assert!(SparseMap::new([(10, 5), (12, 1)], 50).is_err());
        assert!(SparseMap::new([(10, 50)], 50).is_err());
        assert!(SparseMap::new([(u64::MAX, 2)], 50).is_err());
    }

    #[test]
    fn every_range_expands_to_the_logical_slice() {
        let m = SparseMap::new([(3, 4), (10, 1), (20, 6)], 30).unwrap();
        let stored: Vec<u8> = (1..=m.stored_len() as u8).collect();
        let full = logical(&m, &stored);
        for from in 0..=32u64 {
            for to in from..=32u64 {
                let r = m.stored_range(from, to);
                let got = m.expand(from, to, &stored[r.start as usize..r.end as usize]);
                let (a, z) = (from.min(30) as usize, to.min(30) as usize);
                assert_eq!(got, full[a..z], "{from}..{to}");
            }
        }
        let mut out = Vec::new();
        SparseReader::new(&m, &stored[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, full);
        let short = SparseReader::new(&m, &stored[..5]).read_to_end(&mut Vec::new());
        assert!(short.is_err());
        // SEEK_DATA / SEEK_HOLE agree with the logical bytes' extents.
        let data = |p: usize| {
            m.extents()
                .iter()
                .any(|e| (e.offset..e.end()).contains(&(p as u64)))
        };
        for pos in 0..30usize {
            let want_data = (pos..30).find(|&p| data(p)).map(|p| p as u64);
            assert_eq!(m.next_data(pos as u64), want_data, "data after {pos}");
            let want_hole = (pos..30).find(|&p| !data(p)).unwrap_or(30) as u64;
            assert_eq!(m.next_hole(pos as u64), want_hole, "hole after {pos}");
        }
    }
}
