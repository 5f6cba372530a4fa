//! The FUSE operations over one archive.
//!
//! Metadata comes from the memory-mapped index; inode numbers are the archive's dense inode
//! numbers (root = 1, hard links share one). Reads that the cache can answer are answered on the
//! FUSE thread; reads that need the network are handed to the mount's async runtime and replied
//! to when their spans arrive, so the dispatch threads never wait for a registry.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use clip_format::{Archive, DataLocation, Entry, EntryKind, SectionId, SparseMap};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};

use crate::layers::V2Source;
use crate::profile::Recorder;

/// The archive is immutable: the kernel may cache entries and attributes for long.
const TTL: Duration = Duration::from_hours(1);

/// Where file bytes come from.
pub(crate) enum Data {
    /// The archive's own data section.
    V1Local,
    /// Layer blobs in a registry.
    V2(Arc<V2Source>),
    /// The data object of a v1-remote archive.
    V1Remote(Arc<crate::remote::RemoteFiles>),
}

/// Per open file: where the last read ended, to detect sequential reading.
#[derive(Default, Clone, Copy)]
pub(crate) struct OpenFile {
    pub(crate) next: u64,
    pub(crate) ahead_until: u64,
}

/// Inode number → the archive index of its first entry (inodes are dense, the root is 1; hard
/// links share one), and the bytes of all distinct files. Built once per mount.
pub(crate) struct Inodes {
    by_ino: Vec<u32>,
    total_bytes: u64,
}

impl Inodes {
    pub(crate) fn new(archive: &Archive) -> Self {
        let mut by_ino = vec![u32::MAX; 1];
        let mut total_bytes = 0u64;
        for i in 0..u32::try_from(archive.len()).unwrap_or(u32::MAX) {
            let Some(e) = archive.entry(i) else { break };
            let ino = e.ino() as usize;
            if by_ino.len() <= ino {
                by_ino.resize(ino + 1, u32::MAX);
            }
            if by_ino[ino] == u32::MAX {
                by_ino[ino] = i;
                total_bytes += e.size();
            }
        }
        Self {
            by_ino,
            total_bytes,
        }
    }

    /// The first entry of inode `ino`.
    pub(crate) fn entry<'a>(&self, archive: &'a Archive, ino: u64) -> Option<Entry<'a>> {
        let i = *self.by_ino.get(usize::try_from(ino).ok()?)?;
        archive.entry(i)
    }
}

pub(crate) struct ClipFs {
    pub(crate) archive: Arc<Archive>,
    pub(crate) inodes: Arc<Inodes>,
    pub(crate) data: Data,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) recorder: Option<Arc<Recorder>>,
    pub(crate) open: Mutex<HashMap<u64, OpenFile>>,
    pub(crate) next_fh: AtomicU64,
    /// Spans fetched ahead of a sequential reader.
    pub(crate) readahead_spans: usize,
    /// Bytes returned to the kernel by reads.
    pub(crate) served: Arc<AtomicU64>,
    /// Extent maps of the sparse files read so far, by inode.
    pub(crate) sparse_maps: Mutex<HashMap<u64, Arc<SparseMap>>>,
}

/// A read of a sparse file: the logical range `from..to` whose stored bytes are being fetched.
pub(crate) struct Expand {
    map: Arc<SparseMap>,
    from: u64,
    to: u64,
}

/// Replies with `bytes`, expanded to the logical bytes of a sparse read.
pub(crate) fn reply_with(reply: ReplyData, bytes: &[u8], expand: Option<&Expand>) {
    match expand {
        None => reply.data(bytes),
        Some(x) => reply.data(&x.map.expand(x.from, x.to, bytes)),
    }
}

impl ClipFs {
    pub(crate) fn new(
        archive: Arc<Archive>,
        inodes: Arc<Inodes>,
        data: Data,
        runtime: tokio::runtime::Handle,
        recorder: Option<Arc<Recorder>>,
        readahead_spans: usize,
    ) -> Self {
        Self {
            archive,
            inodes,
            data,
            runtime,
            recorder,
            open: Mutex::new(HashMap::new()),
            sparse_maps: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            readahead_spans,
            served: Arc::new(AtomicU64::new(0)),
        }
    }

    fn entry(&self, ino: INodeNo) -> Option<Entry<'_>> {
        self.inodes.entry(&self.archive, ino.0)
    }
}

fn file_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::BlockDevice => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
    }
}

/// glibc's `makedev`, truncated to the 32 bits FUSE carries.
fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

pub(crate) fn attr(e: &Entry<'_>) -> FileAttr {
    let (secs, nanos) = e.mtime();
    let t = if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::new(secs.unsigned_abs(), 0))
            .unwrap_or(UNIX_EPOCH)
            + Duration::from_nanos(u64::from(nanos))
    };
    let size = match e.kind() {
        EntryKind::Symlink => e.symlink_target().map_or(0, |t| t.len() as u64),
        EntryKind::Dir => 4096,
        _ => e.size(),
    };
    // A sparse file occupies only its data.
    let stored = e.sparse_map().map_or(size, |m| m.stored_len());
    FileAttr {
        ino: INodeNo(u64::from(e.ino())),
        size,
        blocks: stored.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(e.kind()),
        perm: (e.mode() & 0o7777) as u16,
        nlink: e.nlink(),
        uid: e.uid(),
        gid: e.gid(),
        rdev: e.rdev().map_or(0, |(ma, mi)| makedev(ma, mi)),
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for ClipFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_CACHE_SYMLINKS
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        );
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.entry(parent) else {
            reply.error(Errno::ENOENT);
            return;
        };
        match p.child(name.as_bytes()) {
            Some(e) => reply.entry(&TTL, &attr(&e), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry(ino) {
            Some(e) => reply.attr(&TTL, &attr(&e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino).and_then(|e| e.symlink_target()) {
            Some(t) => reply.data(t),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc_o_trunc() != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        match self.entry(ino) {
            Some(e) if e.kind() != EntryKind::Dir => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if let Some(r) = &self.recorder {
            r.touch(ino.0, offset, u64::from(size));
        }
        match (e.data(), &self.data) {
            (None, _) => reply.data(&[]),
            (
                Some(DataLocation::V1 {
                    offset: at, length, ..
                }),
                Data::V1Local,
            ) => {
                let data = self.archive.section(SectionId::DATA);
                let end = length.min(offset.saturating_add(u64::from(size)));
                let from =
                    usize::try_from(at.saturating_add(offset.min(end))).unwrap_or(usize::MAX);
                let to = usize::try_from(at.saturating_add(end)).unwrap_or(usize::MAX);
                match data.get(from..to) {
                    Some(b) => {
                        self.served.fetch_add(b.len() as u64, Ordering::Relaxed);
                        reply.data(b);
                    }
                    None => reply.error(Errno::EIO),
                }
            }
            (
                Some(DataLocation::V2 {
                    layer,
                    offset: at,
                    length,
                    sparse: false,
                }),
                Data::V2(src),
            ) => self.read_v2(src, fh.0, (layer, at, length), (offset, size), None, reply),
            (
                Some(DataLocation::V2 {
                    layer,
                    offset: at,
                    length,
                    sparse: true,
                }),
                Data::V2(src),
            ) => {
                let Some(map) = self.sparse_map(ino.0, &e) else {
                    reply.error(Errno::EIO);
                    return;
                };
                let to = length.min(offset.saturating_add(u64::from(size)));
                let stored = map.stored_range(offset, to);
                if stored.is_empty() {
                    // All hole.
                    reply.data(&map.expand(offset, to, &[]));
                    return;
                }
                let stored_len = map.stored_len();
                let expand = Expand {
                    map,
                    from: offset,
                    to,
                };
                self.read_v2(
                    src,
                    fh.0,
                    (layer, at, stored_len),
                    (
                        stored.start,
                        u32::try_from(stored.end - stored.start).unwrap_or(u32::MAX),
                    ),
                    Some(expand),
                    reply,
                );
            }
            (
                Some(DataLocation::V1 {
                    offset: at,
                    length,
                    sha256,
                }),
                Data::V1Remote(src),
            ) => self.read_remote(src, (at, length, sha256), offset, size, reply),
            _ => reply.error(Errno::EIO),
        }
    }

    /// `SEEK_DATA` and `SEEK_HOLE` (the kernel handles the other `whence` values): a sparse
    /// file's extents, so tools that copy sparse files keep its holes.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        let Some(e) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let size = e.size();
        let Ok(pos) = u64::try_from(offset) else {
            reply.error(Errno::ENXIO);
            return;
        };
        if e.kind() != EntryKind::File || !matches!(whence, SEEK_DATA | SEEK_HOLE) {
            reply.error(Errno::EINVAL);
            return;
        }
        if pos >= size {
            reply.error(Errno::ENXIO);
            return;
        }
        let map = match e.data() {
            Some(DataLocation::V2 { sparse: true, .. }) => self.sparse_map(ino.0, &e),
            _ => None,
        };
        let found = match (whence, map) {
            (SEEK_DATA, Some(m)) => m.next_data(pos),
            (SEEK_HOLE, Some(m)) => Some(m.next_hole(pos)),
            (SEEK_DATA, None) => Some(pos),
            _ => Some(size),
        };
        match found.and_then(|p| i64::try_from(p).ok()) {
            Some(p) => reply.offset(p),
            None => reply.error(Errno::ENXIO),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Some(e) if e.kind() == EntryKind::Dir => {
                reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                );
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(d) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let parent_ino = INodeNo(u64::from(d.parent().ino()));
        let dots = [
            (ino, FileType::Directory, &b"."[..]),
            (parent_ino, FileType::Directory, &b".."[..]),
        ];
        let mut i = offset;
        while i < 2 {
            let (n, t, name) = dots[usize::try_from(i).unwrap_or(0)];
            if reply.add(n, i + 1, t, OsStr::from_bytes(name)) {
                reply.ok();
                return;
            }
            i += 1;
        }
        for c in d
            .children()
            .skip(usize::try_from(offset.saturating_sub(2)).unwrap_or(usize::MAX))
        {
            i += 1;
            if reply.add(
                INodeNo(u64::from(c.ino())),
                i,
                file_type(c.kind()),
                OsStr::from_bytes(c.name()),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(d) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let p = d.parent();
        let mut i = offset;
        while i < 2 {
            let (e, name) = if i == 0 {
                (d, &b"."[..])
            } else {
                (p, &b".."[..])
            };
            if reply.add(
                e_ino(&e),
                i + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr(&e),
                Generation(0),
            ) {
                reply.ok();
                return;
            }
            i += 1;
        }
        for c in d
            .children()
            .skip(usize::try_from(offset.saturating_sub(2)).unwrap_or(usize::MAX))
        {
            i += 1;
            if reply.add(
                e_ino(&c),
                i,
                OsStr::from_bytes(c.name()),
                &TTL,
                &attr(&c),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.archive.len() as u64;
        reply.statfs(
            self.inodes.total_bytes.div_ceil(4096),
            0,
            0,
            files,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(e) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        match e.xattrs().find(|(n, _)| *n == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some((_, v)) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
            Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(e) = self.entry(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let mut names = Vec::new();
        for (n, _) in e.xattrs() {
            names.extend_from_slice(n);
            names.push(0);
        }
        if size == 0 {
            reply.size(u32::try_from(names.len()).unwrap_or(u32::MAX));
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&names);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.entry(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }
}

fn e_ino(e: &Entry<'_>) -> INodeNo {
    INodeNo(u64::from(e.ino()))
}

const fn libc_o_trunc() -> i32 {
    0o1000
}
