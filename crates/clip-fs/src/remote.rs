//! The v1-remote read path: a file's bytes are one range of the data object in object storage.
//!
//! The v1 format carries one sha256 per file (no finer digests), so the unit of fetching and
//! verification is the file: the first read of a file fetches the whole file with one ranged
//! GET, checks its sha256, and stores it in the span cache under that digest (content-addressed,
//! so identical files are fetched once); later reads are local. Concurrent first reads share the
//! fetch. Bytes that fail the check are fetched once more, then reported — never served. The
//! cost is that a first read of a large file waits for all of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clip_objstore::RemoteObject;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::Error;
use crate::cache::{SpanCache, SpanFile};

use crate::layers::Outcome;

/// The object-backed file source of one mount.
pub(crate) struct RemoteFiles {
    object: RemoteObject,
    data_offset: u64,
    cache: Arc<SpanCache>,
    inflight: Mutex<HashMap<[u8; 32], watch::Receiver<Outcome>>>,
    pub(crate) requests: AtomicU64,
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) verify_failures: AtomicU64,
}

impl RemoteFiles {
    pub(crate) fn new(object: RemoteObject, data_offset: u64, cache: Arc<SpanCache>) -> Self {
        Self {
            object,
            data_offset,
            cache,
            inflight: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
        }
    }

    pub(crate) fn cache(&self) -> &SpanCache {
        &self.cache
    }

    /// The file if the local cache has it (no network).
    pub(crate) fn local(&self, sha256: &[u8; 32], length: u64) -> Option<SpanFile> {
        self.cache.get(sha256, length)
    }

    /// The file's verified bytes, fetching them if needed.
    pub(crate) async fn file(
        self: &Arc<Self>,
        offset: u64,
        length: u64,
        sha256: [u8; 32],
    ) -> Result<SpanFile, Error> {
        if let Some(f) = self.cache.get(&sha256, length) {
            return Ok(f);
        }
        let (rx, tx) = {
            let mut m = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(rx) = m.get(&sha256) {
                (rx.clone(), None)
            } else {
                let (tx, rx) = watch::channel(None);
                m.insert(sha256, rx.clone());
                (rx, Some(tx))
            }
        };
        if let Some(tx) = tx {
            self.cache.count_misses(1);
            let mut result = self.fetch(offset, length, &sha256).await;
            if matches!(result, Err(Error::Verify { .. })) {
                result = self.fetch(offset, length, &sha256).await;
            }
            let result = result.map_err(Arc::new);
            let _ = tx.send(Some(result.clone()));
            self.inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&sha256);
            return result.map_err(Error::Shared);
        }
        crate::layers::join_fetch(rx).await
    }

    async fn fetch(&self, offset: u64, length: u64, sha256: &[u8; 32]) -> Result<SpanFile, Error> {
        let start = self.data_offset + offset;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .object
            .get_range(start..start + length)
            .await
            .map_err(|e| Error::Fetch(e.to_string()))?;
        self.fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let found = clip_format::Digest::from_sha256(Sha256::digest(&bytes).into());
        if let Err(e) = clip_format::Digest::from_sha256(*sha256).check(
            format!("file at data offset {offset} of {}", self.object.url()),
            found,
        ) {
            self.verify_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(self.cache.insert(sha256, bytes.to_vec()))
    }
}
