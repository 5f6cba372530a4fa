//! The read path of a mount: a file range mapped to layer spans, answered at once from spans
//! already open, or handed to the mount's runtime and replied to when its spans arrive (v2), or
//! fetched whole and verified (v1 remote); sparse files expanded to their logical bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clip_format::SparseMap;
use fuser::{Errno, ReplyData};

use crate::cache::SpanFile;
use crate::fs::{ClipFs, Expand, reply_with};
use crate::layers::V2Source;

/// Copies `[start, end)` of a layer's uncompressed stream out of its spans (`spans[0]` is the
/// span holding `start`).
fn assemble(src: &V2Source, layer: usize, start: u64, end: u64, spans: &[SpanFile]) -> Vec<u8> {
    let index = &src.layers[layer];
    let first = index.span_of(start);
    let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
    for (k, span) in spans.iter().enumerate() {
        let range = index.span_range(first + k);
        let (from, to) = (start.max(range.start), end.min(range.end));
        if from < to {
            let bytes = span.bytes();
            let lo = ((from - range.start) as usize).min(bytes.len());
            let hi = ((to - range.start) as usize).min(bytes.len());
            out.extend_from_slice(&bytes[lo..hi]);
        }
    }
    out
}

impl ClipFs {
    /// Reads `want` (offset, length) of the bytes a file stores at `loc` (layer, offset in the
    /// layer, stored length); `expand` turns a sparse file's stored bytes into its logical ones.
    // Over 100 lines on purpose: the v2 read path: a read's span range, read-ahead for a
    // sequential reader, the cached fast path, then fetches and the reply, in the order a read
    // meets them.
    pub(crate) fn read_v2(
        &self,
        src: &Arc<V2Source>,
        fh: u64,
        loc: (u32, u64, u64),
        want: (u64, u32),
        expand: Option<Expand>,
        reply: ReplyData,
    ) {
        let (layer, file_off, length) = loc;
        let (offset, size) = want;
        let layer = layer as usize;
        if layer >= src.layers.len() {
            reply.error(Errno::EIO);
            return;
        }
        let end_in_file = length.min(offset.saturating_add(u64::from(size)));
        if offset >= end_in_file {
            reply.data(&[]);
            return;
        }
        let (start, end) = (file_off + offset, file_off + end_in_file);
        let l = &src.layers[layer];
        let (first, last) = (l.span_of(start), l.span_of(end - 1));

        // Sequential reader: fetch the spans ahead of it (within this file) in the background.
        let sequential = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let of = open.entry(fh).or_default();
            let seq = of.next == offset && offset > 0;
            of.next = end_in_file;
            let file_end = file_off + length;
            if seq
                && self.readahead_spans > 0
                && of.ahead_until < end
                && last + 1 < l.checkpoints.len()
            {
                let next = last + 1;
                let r = l.span_range(next);
                if r.start < file_end {
                    of.ahead_until = l
                        .span_range((next + self.readahead_spans - 1).min(l.checkpoints.len() - 1))
                        .end;
                    Some(next)
                } else {
                    None
                }
            } else {
                None
            }
        };
        if let Some(next) = sequential
            && src.span_ready(layer, next).is_none()
        {
            let src = Arc::clone(src);
            let ahead = self.readahead_spans.saturating_sub(1);
            self.runtime.spawn(async move {
                let _ = src.span(layer, next, ahead).await;
            });
        }

        // Fast path: every span in the local cache (open already, or on disk: local I/O only).
        let ready: Option<Vec<_>> = (first..=last).map(|s| src.span_local(layer, s)).collect();
        if let Some(spans) = ready {
            self.served.fetch_add(end - start, Ordering::Relaxed);
            if let [one] = &spans[..] {
                // One span: reply straight from its mapping.
                let base = l.span_range(first).start;
                let b = one.bytes();
                let (a, z) = ((start - base) as usize, (end - base) as usize);
                reply_with(reply, &b[a.min(b.len())..z.min(b.len())], expand.as_ref());
            } else {
                reply_with(
                    reply,
                    &assemble(src, layer, start, end, &spans),
                    expand.as_ref(),
                );
            }
            return;
        }
        let src = Arc::clone(src);
        let served = Arc::clone(&self.served);
        self.runtime.spawn(async move {
            let mut spans = Vec::with_capacity(last - first + 1);
            for s in first..=last {
                // The first miss fetches the rest of this read's spans in the same request.
                match src.span_on_demand(layer, s, last - s).await {
                    Ok(f) => spans.push(f),
                    Err(e) => {
                        tracing::error!(layer = %src.layers[layer].digest, offset = start, error = %e, "read failed");
                        reply.error(Errno::EIO);
                        return;
                    }
                }
            }
            let b = assemble(&src, layer, start, end, &spans);
            served.fetch_add(b.len() as u64, Ordering::Relaxed);
            reply_with(reply, &b, expand.as_ref());
        });
    }
}

impl ClipFs {
    /// The extent map of sparse file `ino` (parsed once, then cached).
    pub(crate) fn sparse_map(
        &self,
        ino: u64,
        e: &clip_format::Entry<'_>,
    ) -> Option<Arc<SparseMap>> {
        let mut maps = self
            .sparse_maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = maps.get(&ino) {
            return Some(Arc::clone(m));
        }
        let m = Arc::new(e.sparse_map()?);
        maps.insert(ino, Arc::clone(&m));
        Some(m)
    }

    pub(crate) fn read_remote(
        &self,
        src: &Arc<crate::remote::RemoteFiles>,
        loc: (u64, u64, [u8; 32]),
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let (at, length, sha256) = loc;
        let end = length.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let (lo, hi) = (offset as usize, end as usize);
        if let Some(f) = src.local(&sha256, length) {
            self.served.fetch_add(end - offset, Ordering::Relaxed);
            reply.data(&f.bytes()[lo..hi]);
            return;
        }
        let (src, served) = (Arc::clone(src), Arc::clone(&self.served));
        self.runtime.spawn(async move {
            match src.file(at, length, sha256).await {
                Ok(f) => {
                    served.fetch_add(end - offset, Ordering::Relaxed);
                    reply.data(&f.bytes()[lo..hi]);
                }
                Err(e) => {
                    tracing::error!(error = %e, "read failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }
}
