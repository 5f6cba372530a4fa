//! Archive → directory, resolving every path beneath the target root.
//!
//! Entries are created in archive order (parents first) with private modes, relative to a
//! directory descriptor opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the
//! root: a parent that is a symlink, or `..`, or anything that would leave the root, is an
//! error, never followed. Names are single path components (the archive reader refuses
//! others). File bytes come from the data section (v1 local, each file checked against its
//! sha256) or from the image's layers streamed from the registry once each (v2, each layer
//! checked against its `diff_id`). Owners, modes, xattrs and times are applied last, directories
//! after their contents, so read-only directories and setuid bits come out right.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use clip_format::{Archive, ArchiveKind, DataLocation, Digest, Entry, EntryKind};
use clip_registry::BlockingClient;
use clip_seekable::stream::{CopyJob, copy_out, decoder};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use crate::{Error, Result};

type Job<T> = CopyJob<T>;

/// How to extract.
#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// The registry client for v2 archives, and the runtime for all network reads (default: a
    /// client with the default settings and docker's credentials, made when first needed).
    pub registry: Option<BlockingClient>,
    /// Object-store settings, for v1-remote archives.
    pub remote: clip_objstore::RemoteOptions,
    /// Counts the file bytes written so far (for a progress display).
    pub bytes_written: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl ExtractOptions {
    fn wrote(&self, n: u64) {
        if let Some(c) = &self.bytes_written {
            c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl ExtractOptions {
    fn client(&self) -> Result<BlockingClient> {
        match &self.registry {
            Some(c) => Ok(c.clone()),
            None => Ok(BlockingClient::new(
                clip_registry::ClientConfig::default().with_docker_config()?,
            )?),
        }
    }
}

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    /// Entries created (the root excluded).
    pub entries: u64,
    /// Regular files with their own data (hard links excluded).
    pub files: u64,
    /// File bytes written.
    pub bytes: u64,
}

fn unsafe_path(path: &[u8], reason: &str) -> Error {
    Error::Unsafe {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// An I/O error on the archive entry at `path`.
fn io_at(context: &'static str, path: &[u8]) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = PathBuf::from(String::from_utf8_lossy(path).into_owned());
    move |source| Error::Io {
        context,
        path,
        source,
    }
}

/// A system-call error on the archive entry at `path`.
fn sys(context: &'static str, path: &[u8]) -> impl FnOnce(rustix::io::Errno) -> Error + use<> {
    let io = io_at(context, path);
    move |e| io(e.into())
}

/// Opens directory `rel` (relative, no `..`, no symlinks) beneath `root`.
fn open_dir(root: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd> {
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV | rustix::io::Errno::NOTDIR => {
            unsafe_path(
                rel,
                "a parent is not a directory beneath the extraction root",
            )
        }
        e => sys("opening", rel)(e),
    })
}

/// Parent directory descriptors, cached for runs of siblings (archive order groups them).
struct Parents<'a> {
    root: BorrowedFd<'a>,
    last: Option<(u32, OwnedFd)>,
}

impl Parents<'_> {
    fn get(&mut self, e: &Entry<'_>) -> Result<BorrowedFd<'_>> {
        let parent = e.parent();
        if parent.index() == 0 {
            return Ok(self.root);
        }
        if self.last.as_ref().is_none_or(|(i, _)| *i != parent.index()) {
            self.last = Some((parent.index(), open_dir(self.root, &parent.path())?));
        }
        Ok(self.last.as_ref().map_or(self.root, |(_, fd)| fd.as_fd()))
    }
}

fn mtime(e: &Entry<'_>) -> Timestamps {
    let (sec, nsec) = e.mtime();
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner, mode, xattrs and mtime of `name` in `dir` (the root itself when `name` is `.`).
fn apply_meta(dir: BorrowedFd<'_>, name: &[u8], e: &Entry<'_>, as_root: bool) -> Result<()> {
    let path = e.path();
    if as_root {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::process::Uid::from_raw(e.uid())),
            Some(rustix::process::Gid::from_raw(e.gid())),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(sys("changing the owner of", &path))?;
    }
    if e.kind() != EntryKind::Symlink {
        // After chown, which clears setuid/setgid.
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(e.mode() & 0o7777),
            AtFlags::empty(),
        )
        .map_err(sys("changing the mode of", &path))?;
    }
    let xattrs: Vec<_> = e.xattrs().collect();
    if !xattrs.is_empty() {
        let mut at = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        at.extend_from_slice(name);
        for (k, v) in xattrs {
            rustix::fs::lsetxattr(&at[..], k, v, rustix::fs::XattrFlags::empty())
                .map_err(sys("setting an extended attribute on", &path))?;
        }
    }
    rustix::fs::utimensat(dir, name, &mtime(e), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(sys("setting the times of", &path))?;
    Ok(())
}

/// Makes directory `name` in `pfd` (`0700` until its metadata is applied last), or accepts a
/// directory already there; anything else there is refused.
fn make_dir(pfd: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<()> {
    let Err(err) = rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(0o700)) else {
        return Ok(());
    };
    let is_dir = rustix::fs::statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & 0o170_000 == 0o040_000);
    if err == rustix::io::Errno::EXIST && is_dir {
        return Ok(());
    }
    Err(if err == rustix::io::Errno::EXIST {
        unsafe_path(path, "exists and is not a directory")
    } else {
        sys("creating", path)(err)
    })
}

/// Makes entry `e` (a symlink, device, FIFO or socket) in `pfd`; devices only as root.
fn make_special(pfd: BorrowedFd<'_>, e: &Entry<'_>, path: &[u8], as_root: bool) -> Result<()> {
    let name = e.name();
    let (ft, dev) = match e.kind() {
        EntryKind::Symlink => {
            let target = e.symlink_target().unwrap_or_default();
            return rustix::fs::symlinkat(target, pfd, name).map_err(sys("creating", path));
        }
        kind @ (EntryKind::CharDevice | EntryKind::BlockDevice) => {
            if !as_root {
                return Err(Error::NeedsRoot {
                    path: String::from_utf8_lossy(path).into_owned(),
                });
            }
            let (major, minor) = e.rdev().unwrap_or((0, 0));
            let ft = if kind == EntryKind::CharDevice {
                rustix::fs::FileType::CharacterDevice
            } else {
                rustix::fs::FileType::BlockDevice
            };
            (ft, rustix::fs::makedev(major, minor))
        }
        EntryKind::Fifo => (rustix::fs::FileType::Fifo, 0),
        EntryKind::Socket => (rustix::fs::FileType::Socket, 0),
        EntryKind::Dir | EntryKind::File => return Ok(()),
    };
    rustix::fs::mknodat(pfd, name, ft, Mode::from_raw_mode(0o600), dev)
        .map_err(sys("creating", path))
}

/// Extracts the archive at `archive` into `dir` (created if missing; should be empty).
// Over 100 lines on purpose: the three phases of an extraction (make every entry, fill file data
// in layer order, apply metadata children first) share their bookkeeping (parents cache,
// hard-link map, jobs); the per-kind work is in make_dir, make_special and the fill functions.
pub fn extract(archive: &Path, dir: &Path, opts: &ExtractOptions) -> Result<ExtractSummary> {
    let a = Archive::open(archive)?;
    let remote_kind = a.kind() == ArchiveKind::V1Remote;
    let mut remote_jobs: Vec<Job<u32>> = Vec::new();
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening", dir.as_os_str().as_encoded_bytes()))?;
    let as_root = rustix::process::geteuid().is_root();
    let mut parents = Parents {
        root: root.as_fd(),
        last: None,
    };
    let mut summary = ExtractSummary::default();
    let mut first_of_ino: HashMap<u32, u32> = HashMap::new();
    let mut meta_order: Vec<u32> = Vec::new();
    let mut dirs: Vec<u32> = Vec::new();
    let layers = a.layers();
    let mut jobs: Vec<Vec<Job<u32>>> = vec![Vec::new(); layers.len()];
    let count = u32::try_from(a.len()).unwrap_or(u32::MAX);
    for i in 1..count {
        let Some(e) = a.entry(i) else { break };
        let name = e.name();
        let path = e.path();
        let pfd = parents.get(&e)?;
        summary.entries += 1;
        match e.kind() {
            EntryKind::Dir => {
                make_dir(pfd, name, &path)?;
                dirs.push(i);
                continue;
            }
            EntryKind::File => {
                if let Some(&first) = first_of_ino.get(&e.ino()) {
                    let target = a.entry(first).map(|t| t.path()).unwrap_or_default();
                    let src = rustix::fs::openat2(
                        parents.root,
                        &target[..],
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                    )
                    .map_err(sys("opening the link target", &target))?;
                    let pfd = parents.get(&e)?;
                    rustix::fs::linkat(&src, "", pfd, name, AtFlags::EMPTY_PATH)
                        .map_err(sys("linking", &path))?;
                    continue;
                }
                first_of_ino.insert(e.ino(), i);
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(sys("creating", &path))?;
                summary.files += 1;
                match e.data() {
                    Some(DataLocation::V1 { .. }) if remote_kind => {
                        if let Some(DataLocation::V1 { offset, length, .. }) = e.data()
                            && length > 0
                        {
                            remote_jobs.push(Job {
                                offset,
                                size: length,
                                target: i,
                            });
                        }
                    }
                    Some(DataLocation::V1 { .. }) => {
                        let bytes = a.file_data(&e, true)?;
                        std::fs::File::from(fd)
                            .write_all(bytes)
                            .map_err(io_at("writing", &path))?;
                        summary.bytes += bytes.len() as u64;
                        opts.wrote(bytes.len() as u64);
                    }
                    Some(DataLocation::V2 {
                        layer,
                        offset,
                        length,
                        sparse,
                    }) if length > 0 => {
                        let mut size = length;
                        if sparse {
                            // Sized now: the holes stay holes, the extents are written later.
                            rustix::fs::ftruncate(&fd, length).map_err(sys("sizing", &path))?;
                            size = e.sparse_map().map_or(0, |m| m.stored_len());
                        }
                        if size > 0 {
                            jobs.get_mut(layer as usize)
                                .ok_or_else(|| unsafe_path(&path, "names a missing layer"))?
                                .push(Job {
                                    offset,
                                    size,
                                    target: i,
                                });
                        }
                    }
                    _ => {}
                }
            }
            EntryKind::Symlink
            | EntryKind::CharDevice
            | EntryKind::BlockDevice
            | EntryKind::Fifo
            | EntryKind::Socket => make_special(pfd, &e, &path, as_root)?,
        }
        meta_order.push(i);
    }

    if !remote_jobs.is_empty() {
        summary.bytes += fill_from_object(&a, &mut remote_jobs, root.as_fd(), opts)?;
    }
    if jobs.iter().any(|j| !j.is_empty()) {
        summary.bytes += fill_from_registry(&a, &layers, &mut jobs, root.as_fd(), opts)?;
    }

    let mut parents = Parents {
        root: root.as_fd(),
        last: None,
    };
    for &i in meta_order.iter().chain(dirs.iter().rev()) {
        let Some(e) = a.entry(i) else { continue };
        let pfd = parents.get(&e)?;
        apply_meta(pfd, e.name(), &e, as_root)?;
    }
    apply_meta(root.as_fd(), b".", &a.root(), as_root)?;
    Ok(summary)
}

/// A writer of entry `i`'s stored bytes into `path`: sequential for a whole file; for a sparse
/// file (already sized), each byte at its place in the file's extents.
fn file_writer(
    a: &Archive,
    i: u32,
    root: BorrowedFd<'_>,
    path: &[u8],
) -> Result<Box<dyn std::io::Write>> {
    let f = open_for_data(root, path)?;
    Ok(match a.entry(i).and_then(|e| e.sparse_map()) {
        Some(map) => Box::new(ExtentWriter {
            file: f,
            map,
            next: 0,
            done: 0,
        }),
        None => Box::new(std::io::BufWriter::with_capacity(256 << 10, f)),
    })
}

/// Writes a sparse file's stored bytes, in order, to the logical offsets of its extents.
struct ExtentWriter {
    file: std::fs::File,
    map: clip_format::SparseMap,
    /// The extent being filled and how many of its bytes are written.
    next: usize,
    done: u64,
}

impl std::io::Write for ExtentWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(e) = self.map.extents().get(self.next) else {
            return Err(std::io::Error::other("more data than the sparse map holds"));
        };
        let n = usize::try_from(e.length - self.done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.file.write_all_at(&buf[..n], e.offset + self.done)?;
        self.done += n as u64;
        if self.done == e.length {
            self.next += 1;
            self.done = 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens `path` (a regular file created by this extraction) for writing, beneath `root`.
fn open_for_data(root: BorrowedFd<'_>, path: &[u8]) -> Result<std::fs::File> {
    let fd = rustix::fs::openat2(
        root,
        path,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(sys("opening", path))?;
    Ok(std::fs::File::from(fd))
}

/// v1 remote: reads the data region of the object once, in order, checking each file's sha256.
fn fill_from_object(
    archive: &Archive,
    jobs: &mut [Job<u32>],
    root: BorrowedFd<'_>,
    opts: &ExtractOptions,
) -> Result<u64> {
    use sha2::Digest as _;
    let remote = archive
        .meta()
        .remote
        .clone()
        .ok_or_else(|| Error::Unsupported("v1-remote archive without a data object".into()))?;
    let object = clip_objstore::RemoteObject::open(&remote.url, &opts.remote)?;
    let net = opts.client()?;
    let data = clip_objstore::RangeReader::new(
        &object,
        net.handle(),
        remote.data_offset..remote.data_offset + remote.data_length,
    );
    let mut written = 0u64;
    copy_out::<_, Error>(&remote.url, None, data, jobs, |i, r, _| {
        let Some(e) = archive.entry(*i) else {
            return Ok(());
        };
        let path = e.path();
        let Some(DataLocation::V1 { sha256, .. }) = e.data() else {
            return Ok(());
        };
        let mut f = std::io::BufWriter::with_capacity(256 << 10, open_for_data(root, &path)?);
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(io_at("reading the data object for", &path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n]).map_err(io_at("writing", &path))?;
            written += n as u64;
            opts.wrote(n as u64);
        }
        f.flush().map_err(io_at("writing", &path))?;
        Digest::from_sha256(sha256).check(
            format!("{} from {}", String::from_utf8_lossy(&path), remote.url),
            Digest::of_hasher(h),
        )?;
        Ok(())
    })?;
    Ok(written)
}

/// A layer indexed from its table of contents (eStargz, zstd:chunked): its file offsets are
/// virtual, so each file is read through its spans (one range request per run of adjacent spans,
/// each span decoded from its checkpoint and checked against its digest) instead of streaming the
/// layer.
#[allow(clippy::too_many_arguments)]
fn fill_by_spans(
    a: &Archive,
    layer: u32,
    info: &clip_format::LayerInfo,
    jobs: &mut [Job<u32>],
    root: BorrowedFd<'_>,
    net: &BlockingClient,
    reference: &clip_registry::Reference,
) -> Result<u64> {
    let cps = a.checkpoints(layer);
    let layer_err = |source: clip_seekable::Error| Error::Layer {
        layer: info.digest.clone(),
        source,
    };
    let short = |reason: String| layer_err(clip_seekable::Error::Stream(reason));
    let layer_end = clip_seekable::LayerEnd::new(info.uncompressed_size, &info.diff_id)
        .ok_or_else(|| short(format!("diff_id {} is not a sha256", info.diff_id)))?;
    let span_end = |k: usize| {
        cps.get(k + 1)
            .map_or(info.uncompressed_size, |c| c.uncompressed_offset)
    };
    let mut written = 0u64;
    jobs.sort_by_key(|j| j.offset);
    for job in jobs.iter() {
        let path = a.entry(job.target).map(|e| e.path()).unwrap_or_default();
        let mut f = file_writer(a, job.target, root, &path)?;
        let end = job.offset + job.size;
        let first = cps.partition_point(|c| c.uncompressed_offset <= job.offset);
        let Some(first) = first.checked_sub(1) else {
            return Err(short(format!("no checkpoint before offset {}", job.offset)));
        };
        let mut last = first;
        while span_end(last) < end && last + 1 < cps.len() {
            last += 1;
        }
        let from = cps[first].compressed_offset;
        let to = cps
            .get(last + 1)
            .map_or(info.compressed_size, |c| c.compressed_offset);
        let bytes = net.block_on(net.client().read_range(reference, &info.digest, from..to))?;
        for (k, cp) in cps.iter().enumerate().take(last + 1).skip(first) {
            let len = usize::try_from(span_end(k) - cp.uncompressed_offset)
                .map_err(|_| short("span too large".into()))?;
            let span =
                clip_seekable::decode_span(info.media, cp, &bytes, from, len).map_err(layer_err)?;
            clip_seekable::verify_span(&cps, k, &layer_end, &span).map_err(layer_err)?;
            let lo = job.offset.max(cp.uncompressed_offset) - cp.uncompressed_offset;
            let hi = end.min(span_end(k)) - cp.uncompressed_offset;
            let part = span
                .get(usize::try_from(lo).unwrap_or(usize::MAX)..usize::try_from(hi).unwrap_or(0))
                .ok_or_else(|| short(format!("span at {} is short", cp.uncompressed_offset)))?;
            f.write_all(part).map_err(io_at("writing", &path))?;
            written += part.len() as u64;
        }
        f.flush().map_err(io_at("writing", &path))?;
    }
    Ok(written)
}

/// v2: streams each layer once from the registry and writes the files it holds.
fn fill_from_registry(
    a: &Archive,
    layers: &[clip_format::LayerInfo],
    jobs: &mut [Vec<Job<u32>>],
    root: BorrowedFd<'_>,
    opts: &ExtractOptions,
) -> Result<u64> {
    let source = a
        .meta()
        .source
        .clone()
        .ok_or_else(|| Error::Unsupported("v2 archive without a registry source".into()))?;
    let reference = clip_registry::Reference::at_digest(
        &source.registry,
        &source.repository,
        source.manifest_digest.as_str(),
    )?;
    let net = opts.client()?;
    let mut written = 0u64;
    for (layer, (info, jobs)) in (0u32..).zip(layers.iter().zip(jobs.iter_mut())) {
        if jobs.is_empty() {
            continue;
        }
        if info.toc_indexed {
            let n = fill_by_spans(a, layer, info, jobs, root, &net, &reference)?;
            opts.wrote(n);
            written += n;
            continue;
        }
        let blob = net
            .client()
            .blob_reader(net.handle(), &reference, &info.digest);
        let stream = decoder(info.media, std::io::BufReader::with_capacity(1 << 20, blob))?;
        copy_out::<_, Error>(
            &info.digest,
            Some(&info.diff_id),
            stream,
            jobs,
            |i, r, _| {
                let path = a.entry(*i).map(|e| e.path()).unwrap_or_default();
                let mut f = file_writer(a, *i, root, &path)?;
                let n = std::io::copy(r, &mut f)
                    .and_then(|n| f.flush().map(|()| n))
                    .map_err(io_at("writing", &path))?;
                written += n;
                opts.wrote(n);
                Ok(())
            },
        )?;
    }
    Ok(written)
}
