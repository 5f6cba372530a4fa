//! One layer, streamed once: its compressed bytes hashed on the way in (the blob digest), inflated
//! while `clip-seekable` records checkpoints, its tar walked (a checkpoint requested at the start
//! of every large file), and its `diff_id` checked.

use std::fs::File;
use std::io::{BufRead, Read};
use std::path::PathBuf;

use clip_format::merge::LayerEntry;
use clip_format::{Digest, MediaKind};
use clip_seekable::{GzipIndexer, HashThread, InputFeed, LayerIndex, PlainIndexer};

use crate::image::LayerDesc;
use crate::{Error, Result, tarwalk};

/// A layer blob's bytes in the pieces its source delivers them, passed on without copying.
pub(crate) trait Chunks {
    /// The next piece; `None` at the end.
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>>;
}

/// The registry's network buffers.
impl Chunks for clip_registry::BlobReader {
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        clip_registry::BlobReader::next_chunk(self)
    }
}

/// A blob file of an OCI layout, read in 1 MiB pieces.
pub(crate) struct FileChunks(pub(crate) File);

impl Chunks for FileChunks {
    fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let mut buf = Vec::with_capacity(1 << 20);
        let n = (&mut self.0).take(1 << 20).read_to_end(&mut buf)?;
        Ok((n > 0).then(|| bytes::Bytes::from(buf)))
    }
}

/// A [`BufRead`] over a blob's chunks that hands each chunk, shared rather than copied, to the
/// indexer's helper thread, which computes the blob digest and byte count
/// ([`clip_seekable::LayerIndex::input`]) beside its hashing of the output.
struct Hashing<'p, C> {
    src: C,
    cur: bytes::Bytes,
    ended: bool,
    feed: InputFeed,
    progress: Option<&'p std::sync::atomic::AtomicU64>,
}

impl<'p, C> Hashing<'p, C> {
    fn new(src: C, feed: InputFeed, progress: Option<&'p std::sync::atomic::AtomicU64>) -> Self {
        Self {
            src,
            cur: bytes::Bytes::new(),
            ended: false,
            feed,
            progress,
        }
    }
}

impl<C: Chunks> BufRead for Hashing<'_, C> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() && !self.ended {
            if let Some(c) = self.src.next_chunk()? {
                if let Some(p) = self.progress {
                    p.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                self.feed.feed(c.clone());
                self.cur = c;
            } else {
                self.ended = true;
                self.feed.flush();
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, n: usize) {
        let _ = self.cur.split_to(n.min(self.cur.len()));
    }
}

impl<C: Chunks> Read for Hashing<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

pub(crate) struct IndexedLayer {
    pub(crate) entries: Vec<LayerEntry>,
    pub(crate) index: LayerIndex,
    pub(crate) media: MediaKind,
    /// Indexed from a TOC (virtual offsets).
    pub(crate) toc: bool,
    /// Compressed bytes fetched to index it.
    pub(crate) fetched: u64,
    /// How it was indexed (before any reuse) and, if streamed despite a TOC, why.
    pub(crate) method: crate::LayerMethod,
    pub(crate) why_streamed: Option<String>,
}

// Over 100 lines on purpose: one layer streamed once: sniffing, hashing, decompression with
// checkpoints and the tar walk are wired together here and run as one pipeline.
pub(crate) fn index_layer<C: Chunks>(
    src: C,
    d: &LayerDesc,
    span: u64,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> Result<IndexedLayer> {
    let i = d.index;
    let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
    // A registry failure surfaces through the reader as an io::Error wrapping the registry error.
    let io = |source: std::io::Error| {
        if source
            .get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<clip_registry::Error>)
        {
            match source
                .into_inner()
                .map(<dyn std::error::Error + Send + Sync>::downcast::<clip_registry::Error>)
            {
                Some(Ok(e)) => Error::Registry(*e),
                _ => Error::Image(format!("layer {i}: reading failed")),
            }
        } else {
            Error::Io {
                context: "reading layer",
                path: PathBuf::from(d.digest.as_str()),
                source,
            }
        }
    };
    let mut thread = HashThread::start();
    let mut src = Hashing::new(src, thread.input(), progress);
    let mut magic = [0u8; 4];
    let head = {
        let buf = src.fill_buf().map_err(io)?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    let media = if head >= 2 && magic[..2] == [0x1f, 0x8b] {
        MediaKind::Gzip
    } else if head == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        MediaKind::Zstd
    } else {
        MediaKind::Tar
    };
    let declared = clip_registry::oci::MediaKind::of_str(&d.media_type)
        .layer()
        .map(|c| match c {
            clip_registry::oci::Compression::None => MediaKind::Tar,
            clip_registry::oci::Compression::Gzip => MediaKind::Gzip,
            clip_registry::oci::Compression::Zstd => MediaKind::Zstd,
        });
    if let Some(decl) = declared
        && decl != media
        && d.size > 0
    {
        return Err(Error::Image(format!(
            "layer {i} is declared {:?} ({}) but its bytes are {media:?}",
            decl, d.media_type
        )));
    }
    let large = span / 2;
    let layer_err = |source| Error::Layer {
        layer: i,
        digest: Some(d.digest.clone()),
        source,
    };
    let (entries, index) = match media {
        MediaKind::Gzip => {
            let ix = GzipIndexer::with_hash_thread(src, span, thread).map_err(layer_err)?;
            walk_gzip(ix, i, Some(&d.digest), span)?
        }
        MediaKind::Tar => {
            let ix = PlainIndexer::with_hash_thread(src, span, thread);
            let (entries, ix) = tarwalk::walk(ix, layer, None, large)
                .map_err(|e| seekable_cause(e, i, Some(&d.digest)))?;
            (entries, ix.finish().map_err(layer_err)?)
        }
        MediaKind::Zstd => {
            let ix = clip_seekable::ZstdIndexer::with_hash_thread(src, span, thread)
                .map_err(layer_err)?;
            let (entries, ix) = tarwalk::walk(ix, layer, None, large)
                .map_err(|e| seekable_cause(e, i, Some(&d.digest)))?;
            (entries, ix.finish().map_err(layer_err)?)
        }
    };
    // The indexer read its input to the end, so the helper thread saw every byte.
    let (blob_digest, read) = index
        .input
        .map(|d| (Digest::from_sha256(d.sha256), d.len))
        .ok_or_else(|| Error::Image(format!("layer {i}: hashing failed")))?;
    d.digest
        .check(format!("layer {i} blob ({read} bytes)"), blob_digest)?;
    if read != d.size {
        return Err(Error::Image(format!(
            "layer {i} blob {} is {read} bytes where the manifest says {}",
            d.digest, d.size
        )));
    }
    d.diff_id.check(
        format!("layer {i} uncompressed content (diff_id)"),
        Digest::from_sha256(index.diff_id),
    )?;
    let fetched = index.compressed_size;
    Ok(IndexedLayer {
        entries,
        index,
        media,
        toc: false,
        fetched,
        method: crate::LayerMethod::Streamed,
        why_streamed: None,
    })
}

/// A tar error that was really a decompression error is reported as such.
/// Walks a gzip layer's tar stream through its indexer, asking for a checkpoint at the start of
/// every large file (over half a span), and finishes the index.
fn walk_gzip<R: BufRead>(
    ix: GzipIndexer<R>,
    i: usize,
    digest: Option<&Digest>,
    span: u64,
) -> Result<(Vec<LayerEntry>, LayerIndex)> {
    let layer = u32::try_from(i).map_err(|_| Error::Image("too many layers".into()))?;
    let requests = ix.requests();
    let (entries, ix) = tarwalk::walk(ix, layer, Some(&requests), span / 2)
        .map_err(|e| seekable_cause(e, i, digest))?;
    let index = ix.finish().map_err(|source| Error::Layer {
        layer: i,
        digest: digest.cloned(),
        source,
    })?;
    Ok((entries, index))
}

/// Indexes one gzip layer from its compressed bytes: inflation, the tar walk, checkpoints (every
/// `span` bytes and at large files) with their span checks, and the `diff_id`. This is the
/// per-layer work of [`crate::index`], without the blob digest, the
/// comparison with the image config, the merge and the archive (the unit the micro benchmark
/// compares with plain inflate).
pub fn index_gzip_layer<R: BufRead>(blob: R, span: u64) -> Result<(Vec<LayerEntry>, LayerIndex)> {
    let ix = GzipIndexer::new(blob, span).map_err(|source| Error::Layer {
        layer: 0,
        digest: None,
        source,
    })?;
    walk_gzip(ix, 0, None, span)
}

/// Names the layer's blob in a decompression error the tar walk reported without it.
fn seekable_cause(e: Error, layer: usize, digest: Option<&Digest>) -> Error {
    match e {
        Error::Layer {
            digest: None,
            source,
            ..
        } => Error::Layer {
            layer,
            digest: digest.cloned(),
            source,
        },
        other => other,
    }
}
