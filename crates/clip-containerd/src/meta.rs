//! The snapshot metadata: every snapshot's name, parent, kind, labels and times, which lazy
//! image layer a committed snapshot stands for, and the FUSE mounts serving lazy trees.
//!
//! Kept in memory and persisted as one JSON document (`<root>/metadata.json`), rewritten whole
//! on every change: temp file, fsync, rename, fsync of the directory — a crash leaves the old
//! state or the new one, never a mix. A snapshotter holds hundreds to a few thousand snapshots
//! of a few hundred bytes each and changes them once per layer or container, so a rewrite costs
//! well under a millisecond of I/O per change at the sizes nodes see, and needs no database
//! (containerd's own snapshotters use bbolt; an embedded B-tree would pay off only far beyond
//! that).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clip_core::format::Digest;
use serde::{Deserialize, Serialize};

/// containerd's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only.
    View,
    /// Writable, not yet committed.
    Active,
    /// Immutable; may be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

/// The image layer a lazily "unpacked" committed snapshot stands for: its tree is the first
/// `depth` layers of the image `manifest` (in repository `image`), read through a clip mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayer {
    /// The image reference containerd pulled (`HOST/REPO:TAG` or `@digest`).
    pub image: String,
    /// The platform manifest's digest.
    pub manifest: Digest,
    /// This layer's blob digest.
    pub layer: Digest,
    /// How many layers, from the bottom, this snapshot's tree holds.
    pub depth: usize,
}

impl LazyLayer {
    /// The key of the mount serving this tree.
    #[must_use]
    pub fn mount_key(&self) -> MountKey {
        MountKey {
            manifest: self.manifest.clone(),
            depth: self.depth,
        }
    }
}

/// Which tree a clip mount serves: the first `depth` layers of image `manifest`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MountKey {
    /// Platform manifest digest.
    pub manifest: Digest,
    /// Number of layers.
    pub depth: usize,
}

impl MountKey {
    /// A file-system-safe name for it (`<hex>-<depth>`).
    #[must_use]
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.manifest.hex(), self.depth)
    }
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Directory number under `<root>/snapshots/`.
    pub id: u64,
    /// Its key (active, view) or name (committed).
    pub name: String,
    /// The committed snapshot it sits on (empty: none).
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time (seconds, nanoseconds since the epoch).
    pub created: (i64, i32),
    /// Last update.
    pub updated: (i64, i32),
    /// For a committed snapshot standing for a layer of a lazily pulled image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyLayer>,
}

/// A clip mount the snapshotter started (its server is a process of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Which tree.
    pub key: MountKey,
    /// Where.
    pub mountpoint: PathBuf,
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The next snapshot directory number.
    pub next_id: u64,
    /// Snapshots by name.
    pub snapshots: BTreeMap<String, Snapshot>,
    /// Live clip mounts by key.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
}

/// Why the metadata could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Writing it failed.
    #[error("saving snapshot metadata: {0}")]
    Save(#[from] clip_core::host::HostError),
    /// Reading the file failed.
    #[error("snapshot metadata {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid metadata.
    #[error("snapshot metadata {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Now, as containerd's timestamps.
#[must_use]
pub fn now() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        i32::try_from(d.subsec_nanos()).unwrap_or(0),
    )
}

impl State {
    /// Loads `path` (a missing file is an empty state).
    pub fn load(path: &Path) -> Result<Self, MetaError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| MetaError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(MetaError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(self).map_err(|e| MetaError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(clip_core::host::publish_bytes(path, &bytes)?)
    }

    /// The snapshot named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.get(name)
    }

    /// Whether any snapshot has `name` as its parent.
    #[must_use]
    pub fn has_children(&self, name: &str) -> bool {
        self.snapshots.values().any(|s| s.parent == name)
    }

    /// The committed ancestors of `parent`, nearest first (`parent` itself included).
    #[must_use]
    pub fn chain(&self, parent: &str) -> Vec<&Snapshot> {
        let mut out = Vec::new();
        let mut cur = parent;
        while !cur.is_empty() {
            let Some(s) = self.snapshots.get(cur) else {
                break;
            };
            out.push(s);
            cur = &s.parent;
            if out.len() > 10_000 {
                break; // a cycle cannot be built through the API; never loop on a bad file
            }
        }
        out
    }

    /// The lazy tree a snapshot on `parent` reads its lowest layers from: the nearest lazy
    /// ancestor's (it holds every layer below it).
    #[must_use]
    pub fn lazy_base(&self, parent: &str) -> Option<&LazyLayer> {
        self.chain(parent).into_iter().find_map(|s| s.lazy.as_ref())
    }

    /// The mounts some snapshot still needs: the lazy base of every active or view snapshot,
    /// and every committed lazy layer's own tree (the image is still there).
    #[must_use]
    pub fn needed_mounts(&self) -> Vec<MountKey> {
        let mut keys: Vec<MountKey> = Vec::new();
        for s in self.snapshots.values() {
            let key = match s.kind {
                Kind::Committed => s.lazy.as_ref().map(LazyLayer::mount_key),
                Kind::Active | Kind::View => self.lazy_base(&s.parent).map(LazyLayer::mount_key),
            };
            if let Some(k) = key
                && !keys.contains(&k)
            {
                keys.push(k);
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Metadata written by an earlier snapshotter (mount records with the `archive` and `pid`
    /// fields it no longer keeps) still loads.
    #[test]
    fn older_metadata_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"next_id":3,"snapshots":{{}},"mounts":[{{"key":{{"manifest":"{}","depth":2}},"mountpoint":"/m","archive":"/a.clip","pid":42}}]}}"#,
                Digest::sha256(b"m")
            ),
        )
        .unwrap();
        let st = State::load(&path).unwrap();
        assert_eq!(st.mounts.len(), 1);
        assert_eq!(st.mounts[0].key.depth, 2);
    }

    fn snap(name: &str, parent: &str, kind: Kind, lazy: Option<usize>) -> Snapshot {
        Snapshot {
            id: 0,
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: BTreeMap::new(),
            created: now(),
            updated: now(),
            lazy: lazy.map(|depth| LazyLayer {
                image: "r/i:t".into(),
                manifest: Digest::sha256(b"m"),
                layer: Digest::sha256(b"l"),
                depth,
            }),
        }
    }

    #[test]
    fn chains_lazy_bases_and_needed_mounts() {
        let mut st = State::default();
        for s in [
            snap("l1", "", Kind::Committed, Some(1)),
            snap("l2", "l1", Kind::Committed, Some(2)),
            snap("u3", "l2", Kind::Committed, None),
            snap("c", "u3", Kind::Active, None),
        ] {
            st.snapshots.insert(s.name.clone(), s);
        }
        assert_eq!(st.chain("u3").len(), 3);
        assert_eq!(st.lazy_base("u3").unwrap().depth, 2);
        assert!(st.has_children("l2") && !st.has_children("c"));
        let keys = st.needed_mounts();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(
            keys[0].file_name(),
            format!("{}-2", Digest::sha256(b"m").hex())
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        st.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap(), st);
        std::fs::write(&p, b"{").unwrap();
        assert!(matches!(State::load(&p), Err(MetaError::Corrupt { .. })));
        assert_eq!(
            State::load(&dir.path().join("none")).unwrap(),
            State::default()
        );
    }
}
