//! Directory → v1 archive against the oracle: every entry kind of the testkit's edge-case image,
//! unpacked by umoci, archived, and read back equal.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

use clip_format::{Archive, EntryKind};
use clip_testkit::image::{EdgeCaseOptions, edge_cases};
use clip_testkit::snapshot::ItemKind;
use clip_testkit::{ImageBuilder, ManifestFormat, oracle};

#[test]
fn a_rootfs_archive_holds_exactly_what_umoci_unpacked() {
    oracle::require_oracle_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let img = edge_cases(&EdgeCaseOptions {
        large_file: 1 << 20,
        small_files: 50,
        devices: clip_testkit::is_root(),
        ..EdgeCaseOptions::default()
    });
    ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .write_oci_layout(&layout, "t")
        .unwrap();
    let rootfs = oracle::umoci_unpack(&layout, "t", &dir.path().join("bundle")).unwrap();

    let out = dir.path().join("rootfs.clip");
    let summary =
        clip_archive::archive_rootfs(&rootfs, &out, &clip_format::Meta::default()).unwrap();
    let a = Archive::open(&out).unwrap();
    assert_eq!(summary.entries, a.len());

    let tree = clip_testkit::Snapshot::scan(&rootfs).unwrap();
    assert_eq!(a.len(), tree.nodes.len());
    for (path, node) in &tree.nodes {
        let e = a
            .lookup(path.as_bytes())
            .unwrap_or_else(|| panic!("{path:?} missing"));
        assert_eq!(e.mode(), node.mode, "{path:?}");
        assert_eq!((e.uid(), e.gid()), (node.uid, node.gid), "{path:?}");
        assert_eq!(
            (e.mtime().0, i64::from(e.mtime().1)),
            node.mtime,
            "{path:?}"
        );
        let xattrs: BTreeMap<String, Vec<u8>> = e
            .xattrs()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
            .collect();
        assert_eq!(xattrs, node.xattrs, "{path:?}");
        match &node.kind {
            ItemKind::File { size, .. } => {
                assert_eq!(e.size(), *size);
                let data = a.file_data(&e, true).unwrap();
                assert_eq!(data, std::fs::read(rootfs.join(path)).unwrap().as_slice());
                assert_eq!(u64::from(e.nlink()), node.nlink, "{path:?}");
            }
            ItemKind::Dir => assert_eq!(e.kind(), EntryKind::Dir),
            ItemKind::Symlink(t) => assert_eq!(e.symlink_target().unwrap(), t.as_bytes()),
            ItemKind::Fifo => assert_eq!(e.kind(), EntryKind::Fifo),
            ItemKind::CharDevice(r) | ItemKind::BlockDevice(r) => {
                assert_eq!(
                    e.rdev().unwrap(),
                    (rustix::fs::major(*r), rustix::fs::minor(*r))
                );
            }
            ItemKind::Socket => assert_eq!(e.kind(), EntryKind::Socket),
        }
    }
    for group in tree.hardlink_groups() {
        let inos: BTreeSet<u32> = group
            .iter()
            .map(|p| a.lookup(p.as_bytes()).unwrap().ino())
            .collect();
        assert_eq!(inos.len(), 1, "{group:?} share one inode");
    }
}
