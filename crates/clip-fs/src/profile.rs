//! Prefetch profiles: the first-touch order of file ranges during a run.
//!
//! A profile names files by path and ranges by file offsets, not spans, so it stays valid for any
//! archive of the same image whatever its checkpoint spacing. Recording keeps the first read of
//! each (file, MiB block); loading maps the ranges back to spans of the mounted archive, in order,
//! without duplicates.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Granularity of recorded ranges.
const BLOCK: u64 = 1 << 20;

/// One touched range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touch {
    /// Absolute path inside the image.
    pub path: String,
    /// Offset in the file.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// A recorded profile (JSON on disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Format version (1).
    pub version: u32,
    /// Manifest digest of the image it was recorded on (informational).
    #[serde(default)]
    pub image: String,
    /// Touches in first-touch order.
    pub touches: Vec<Touch>,
}

impl Profile {
    /// Reads a profile file.
    pub fn load(path: &Path) -> Result<Self, crate::Error> {
        let bytes = std::fs::read(path)?;
        Self::from_slice(&bytes)
            .map_err(|e| crate::Error::Config(format!("profile {}: {e}", path.display())))
    }

    /// Parses a profile (untrusted: it may come from another machine).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, String> {
        let p: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if p.version != 1 {
            return Err(format!("unsupported version {}", p.version));
        }
        Ok(p)
    }

    /// Writes the profile atomically.
    pub fn save(&self, path: &Path) -> Result<(), crate::Error> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| crate::Error::Config(format!("profile: {e}")))?;
        clip_host::publish_bytes(path, &json).map_err(std::io::Error::from)?;
        Ok(())
    }
}

/// Records first touches during a mount.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    seen: Mutex<Touched>,
}

/// (inode, block) pairs seen, and (inode, offset, len) in first-touch order.
type Touched = (HashSet<(u64, u64)>, Vec<(u64, u64, u64)>);

impl Recorder {
    /// Notes a read of `len` bytes at `offset` of inode `ino`.
    pub(crate) fn touch(&self, ino: u64, offset: u64, len: u64) {
        let mut g = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (seen, order) = &mut *g;
        let end = offset.saturating_add(len.max(1));
        for block in offset / BLOCK..end.div_ceil(BLOCK) {
            if seen.insert((ino, block)) {
                order.push((ino, block * BLOCK, BLOCK));
            }
        }
    }

    /// The touches so far, with inodes resolved to paths by `path_of`.
    pub(crate) fn profile(&self, image: &str, path_of: impl Fn(u64) -> Option<String>) -> Profile {
        let g = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Profile {
            version: 1,
            image: image.to_owned(),
            touches: g
                .1
                .iter()
                .filter_map(|&(ino, offset, len)| {
                    Some(Touch {
                        path: path_of(ino)?,
                        offset,
                        len,
                    })
                })
                .collect(),
        }
    }
}
