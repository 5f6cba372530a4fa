//! The snapshot logic over trees that need no registry, no root and no containerd: a tree
//! "mounts" as a directory, and a layer is admitted when its labels say so.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clip_core::format::Digest;

use super::{Prepared, SnapshotError, Snapshots, Trees};
use crate::lazy::{LazyError, NotLazy, labels};
use crate::meta::{Kind, LazyLayer, MountKey, MountRecord};

/// What the trees were asked.
#[derive(Debug, Default)]
struct Calls {
    mounted: Vec<MountKey>,
    unmounted: Vec<MountKey>,
    collected: Vec<(HashSet<MountKey>, HashSet<MountKey>)>,
    /// Trees whose mounts are dead (after a "restart").
    dead: HashSet<MountKey>,
}

/// Trees in directories under `root`: admitted when the labels name a manifest and a layer.
#[derive(Clone)]
struct DirTrees {
    root: PathBuf,
    calls: Arc<Mutex<Calls>>,
}

impl DirTrees {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            calls: Arc::default(),
        }
    }
}

impl Trees for DirTrees {
    fn admit(
        &self,
        l: &BTreeMap<String, String>,
        parent_depth: usize,
    ) -> Result<LazyLayer, LazyError> {
        let (Some(m), Some(layer)) = (l.get(labels::MANIFEST), l.get(labels::LAYER)) else {
            return Err(NotLazy::NoLabels.into());
        };
        Ok(LazyLayer {
            image: "r.example/app:1".into(),
            manifest: Digest::parse(m).unwrap(),
            layer: Digest::parse(layer).unwrap(),
            depth: parent_depth + 1,
        })
    }

    fn ensure_mounted(&self, layer: &LazyLayer) -> Result<MountRecord, LazyError> {
        let key = layer.mount_key();
        let mountpoint = self.root.join(key.file_name());
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut c = self.calls.lock().unwrap();
        c.mounted.push(key.clone());
        c.dead.remove(&key);
        Ok(MountRecord { key, mountpoint })
    }

    fn is_live(&self, record: &MountRecord) -> bool {
        !self.calls.lock().unwrap().dead.contains(&record.key)
    }

    fn unmount(&self, key: &MountKey) {
        self.calls.lock().unwrap().unmounted.push(key.clone());
    }

    fn collect(&self, keep: &HashSet<MountKey>, mounted: &HashSet<MountKey>) {
        self.calls
            .lock()
            .unwrap()
            .collected
            .push((keep.clone(), mounted.clone()));
    }
}

fn manifest() -> Digest {
    Digest::sha256(b"manifest")
}

/// The labels of layer `i` of the test image, to be committed as `chain`.
fn layer_labels(i: u8, chain: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::TARGET.to_owned(), chain.to_owned()),
        (labels::IMAGE_REF.to_owned(), "r.example/app:1".to_owned()),
        (labels::MANIFEST.to_owned(), manifest().to_string()),
        (labels::LAYER.to_owned(), Digest::sha256(&[i]).to_string()),
    ])
}

fn open(dir: &Path, trees: &DirTrees) -> Snapshots {
    Snapshots::open(&dir.join("root"), Box::new(trees.clone())).unwrap()
}

/// Two lazy layers, then a container's active snapshot: an overlay whose lowest layer is the
/// tree of both layers, mounted once.
fn lazy_image(s: &Snapshots) -> Vec<crate::api::containerd::types::Mount> {
    for (i, (chain, parent)) in [("c1", ""), ("c2", "c1")].into_iter().enumerate() {
        let got = s
            .prepare(
                &format!("extract-{i}"),
                parent,
                layer_labels(i as u8, chain),
            )
            .unwrap();
        assert_eq!(
            got,
            Prepared::CommittedLazily {
                target: chain.into()
            }
        );
    }
    match s.prepare("ctr", "c2", BTreeMap::new()).unwrap() {
        Prepared::Mounts(m) => m,
        other @ Prepared::CommittedLazily { .. } => panic!("{other:?}"),
    }
}

#[test]
fn lazy_layers_commit_and_a_container_gets_the_tree_below_its_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let trees = DirTrees::new(&dir.path().join("mnt"));
    let s = open(dir.path(), &trees);
    let mounts = lazy_image(&s);
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    assert_eq!(m.r#type, "overlay");
    let tree = dir
        .path()
        .join("mnt")
        .join(format!("{}-2", manifest().hex()));
    assert!(
        m.options.contains(&format!("lowerdir={}", tree.display())),
        "{:?}",
        m.options
    );
    assert!(m.options.iter().any(|o| o.starts_with("upperdir=")));
    let c2 = s.stat("c2").unwrap();
    assert_eq!(c2.kind, Kind::Committed);
    assert_eq!(c2.lazy.as_ref().unwrap().depth, 2);
    assert_eq!(
        s.usage("c2").unwrap(),
        (0, 0),
        "a lazy layer holds nothing here"
    );
    // Preparing the same layer again: already there.
    assert_eq!(
        s.prepare("again", "", layer_labels(0, "c1")).unwrap(),
        Prepared::CommittedLazily {
            target: "c1".into()
        }
    );
    // A view on the lazy chain: the tree itself, read-only.
    let v = s.view("v", "c2", BTreeMap::new()).unwrap();
    assert_eq!(
        (v[0].r#type.as_str(), v[0].source.clone()),
        ("bind", tree.display().to_string())
    );
    assert!(v[0].options.contains(&"ro".to_owned()));
    assert_eq!(
        trees.calls.lock().unwrap().mounted.len(),
        2,
        "mounted per snapshot asked"
    );
}

#[test]
fn a_layer_the_trees_refuse_is_an_ordinary_snapshot_and_so_is_everything_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let trees = DirTrees::new(&dir.path().join("mnt"));
    let s = open(dir.path(), &trees);
    let mut no_image = layer_labels(0, "c1");
    no_image.remove(labels::MANIFEST);
    let Prepared::Mounts(m) = s.prepare("extract-0", "", no_image).unwrap() else {
        panic!("not lazy: mounts")
    };
    assert_eq!(
        (m[0].r#type.as_str(), m[0].options[0].as_str()),
        ("bind", "rw")
    );
    s.commit("c1", "extract-0", BTreeMap::new()).unwrap();
    // On an unpacked parent, even a layer the trees would admit is unpacked too.
    let Prepared::Mounts(_) = s.prepare("extract-1", "c1", layer_labels(1, "c2")).unwrap() else {
        panic!("a lazy layer on an unpacked parent")
    };
    assert!(trees.calls.lock().unwrap().mounted.is_empty());
}

#[test]
fn commit_remove_update_and_walk_follow_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let trees = DirTrees::new(&dir.path().join("mnt"));
    let s = open(dir.path(), &trees);
    assert!(matches!(
        s.prepare("", "", BTreeMap::new()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.prepare("a", "nope", BTreeMap::new()),
        Err(SnapshotError::ParentNotFound(_))
    ));
    s.prepare("a", "", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.prepare("a", "", BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.prepare("b", "a", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    std::fs::write(
        s.dir(s.stat("a").unwrap().id).join("fs/f"),
        vec![7u8; 10_000],
    )
    .unwrap();
    let (bytes, inodes) = s.usage("a").unwrap();
    assert!(bytes >= 10_000 && inodes == 1, "{bytes} {inodes}");
    s.commit("base", "a", BTreeMap::from([("k".into(), "v".into())]))
        .unwrap();
    assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound(_))));
    assert!(matches!(
        s.commit("base2", "base", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.mounts("base"),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    s.prepare("top", "base", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.remove("base"),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    // Labels: all, or the ones named; other fields are refused.
    let new = BTreeMap::from([("x".to_owned(), "1".to_owned())]);
    let u = s.update("base", &new, &["labels.x".into()]).unwrap();
    assert_eq!(u.labels.len(), 2);
    let u = s
        .update("base", &BTreeMap::new(), &["labels.k".into()])
        .unwrap();
    assert_eq!(u.labels, new);
    assert!(matches!(
        s.update("base", &new, &["parent".into()]),
        Err(SnapshotError::InvalidArgument(_))
    ));
    let names = |f: &[&str]| -> Vec<String> {
        let f: Vec<String> = f.iter().map(|s| (*s).to_owned()).collect();
        s.list(&f).unwrap().into_iter().map(|s| s.name).collect()
    };
    assert_eq!(names(&["kind==committed"]), ["base"]);
    assert_eq!(names(&["parent==base"]), ["top"]);
    assert_eq!(names(&["labels.x==1"]), ["base"]);
    assert!(matches!(
        s.list(&["name~=x".into()]),
        Err(SnapshotError::InvalidArgument(_))
    ));
    let top_dir = s.dir(s.stat("top").unwrap().id);
    s.remove("top").unwrap();
    assert!(!top_dir.exists(), "files go with the snapshot");
    s.remove("base").unwrap();
    assert!(names(&[]).is_empty());
}

#[test]
fn trees_go_when_no_snapshot_needs_them_and_cleanup_collects_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let trees = DirTrees::new(&dir.path().join("mnt"));
    let s = open(dir.path(), &trees);
    lazy_image(&s);
    let tree = MountKey {
        manifest: manifest(),
        depth: 2,
    };
    s.remove("ctr").unwrap();
    // The image's layers are still there: their tree stays mounted.
    assert!(trees.calls.lock().unwrap().unmounted.is_empty());
    s.remove("c2").unwrap();
    assert_eq!(trees.calls.lock().unwrap().unmounted, [tree]);
    std::fs::create_dir_all(s.root().join("snapshots/999")).unwrap();
    s.cleanup();
    assert!(!s.root().join("snapshots/999").exists());
    let c = trees.calls.lock().unwrap();
    let (keep, mounted) = c.collected.last().unwrap();
    assert_eq!(
        keep.len(),
        1,
        "the tree of the remaining layer c1: {keep:?}"
    );
    assert!(mounted.is_empty());
}

#[test]
fn a_restart_adopts_live_mounts_and_remounts_dead_ones_still_needed() {
    let dir = tempfile::tempdir().unwrap();
    let trees = DirTrees::new(&dir.path().join("mnt"));
    let key = {
        let s = open(dir.path(), &trees);
        lazy_image(&s);
        MountKey {
            manifest: manifest(),
            depth: 2,
        }
    };
    // The state was saved; a new snapshotter reads it and finds the mount alive.
    trees.calls.lock().unwrap().mounted.clear();
    let s = open(dir.path(), &trees);
    assert!(trees.calls.lock().unwrap().mounted.is_empty(), "adopted");
    assert_eq!(s.stat("ctr").unwrap().kind, Kind::Active);
    drop(s);
    // Its server died: the tree is mounted again, since the container still needs it.
    trees.calls.lock().unwrap().dead.insert(key.clone());
    let _s = open(dir.path(), &trees);
    assert_eq!(trees.calls.lock().unwrap().mounted, [key]);
}
