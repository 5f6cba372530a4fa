//! Objects in object storage.
//!
//! # Model
//!
//! clip keeps three kinds of things in object storage: v1 data-carrying archives (read by byte
//! ranges from FUSE mounts and by extraction), the archive store that workers share (`<id>.clip`
//! objects and layer indexes), and whatever a fleet shares next. All of it goes through one type,
//! [`RemoteObject`]: an object named by a URL — `s3://BUCKET/KEY` (any S3 API server) or
//! `file:///ABSOLUTE/PATH` (a local-filesystem store, for single hosts and tests) — with the few
//! operations clip needs: exact byte ranges, whole reads, existence, a **create-only** put (the
//! coordination point of workers sharing a store: the first writer wins, the others reuse),
//! delete, and multipart uploads that abort on error so a failed upload never leaves a visible
//! object.
//!
//! S3 settings come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, …) and may be
//! overridden by [`RemoteOptions`] (whose `Debug` output never shows the secret). Errors are
//! typed by what the store said (not found, denied, conflict), and carry the object's URL.
//!
//! Objects that anyone with the bucket's write keys could have written are read with a byte bound
//! ([`RemoteObject::get_bounded`], [`RemoteObject::download_bounded`]), and what a node must
//! trust (archives, layer indexes) is signed ([`signed`]: Ed25519, bound to the object's name).
//!
//! The operations are async; [`RangeReader`] adapts a byte range to a blocking, sequential
//! [`std::io::Read`] for callers on their own threads.
//!
//! ```no_run
//! # async fn f() -> Result<(), clip_objstore::Error> {
//! use clip_objstore::{RemoteObject, RemoteOptions};
//! let obj = RemoteObject::open("s3://images/app.clip", &RemoteOptions::default())?;
//! if obj.put_if_absent(b"...").await? {
//!     println!("{} published by this call", obj.url());
//! }
//! let head = obj.get_range(0..3).await?;
//! # Ok(()) }
//! ```

use std::ops::Range;
use std::sync::Arc;

pub mod signed;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt as _};

/// Part size of multipart uploads.
const PART: usize = 8 << 20;

/// Overrides of the environment's object-store settings.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RemoteOptions {
    /// S3 endpoint URL (S3-compatible servers); `http://` endpoints are allowed.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Use path-style requests (`endpoint/bucket/key`), as most S3-compatible servers want.
    pub path_style: bool,
}

impl RemoteOptions {
    /// Settings for an S3-compatible server at `endpoint` (path-style requests) with these
    /// credentials.
    #[must_use]
    pub fn s3_compatible(endpoint: &str, region: &str, access_key: &str, secret: &str) -> Self {
        Self {
            endpoint: Some(endpoint.to_owned()),
            region: Some(region.to_owned()),
            access_key_id: Some(access_key.to_owned()),
            secret_access_key: Some(secret.to_owned()),
            path_style: true,
        }
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("path_style", &self.path_style)
            .finish()
    }
}

/// What went wrong with an object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL does not name an object clip can reach.
    #[error("{url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store refused the credentials.
    #[error(
        "{url}: access denied (check the access key and secret: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )]
    Denied {
        /// The object.
        url: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// The object (or its bucket) does not exist.
    #[error("{url}: not found (the object or its bucket does not exist)")]
    NotFound {
        /// The object.
        url: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// Any other failure of the store or of the way to it (S3 servers also answer wrong
    /// credentials this way).
    #[error(
        "{url}: {source} (check the endpoint, the bucket and the credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )]
    Store {
        /// The object.
        url: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// The store answered with fewer or more bytes than asked for.
    #[error("{url}: asked for {want} bytes, got {got}")]
    Short {
        /// The object.
        url: String,
        /// Bytes asked for.
        want: u64,
        /// Bytes received.
        got: u64,
    },
    /// The object is larger than the reader accepts (a damaged or hostile object).
    #[error("{url}: the object is larger than the {max} bytes accepted here")]
    TooLarge {
        /// The object.
        url: String,
        /// The most this reader takes.
        max: u64,
    },
    /// Writing the downloaded object locally failed.
    #[error("{url}: writing it to {}: {source}", path.display())]
    Local {
        /// The object.
        url: String,
        /// Where it was being written.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn from_store(url: &str, source: object_store::Error) -> Self {
        let url = url.to_owned();
        match source {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => Self::Denied { url, source },
            object_store::Error::NotFound { .. } => Self::NotFound { url, source },
            source => Self::Store { url, source },
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One object in a store (cheap to clone; clones share the store's client and connections).
#[derive(Debug, Clone)]
pub struct RemoteObject {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    url: String,
}

/// Installs rustls' ring provider as the process default (the object store's HTTP client needs one).
fn rustls_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RemoteObject {
    /// Resolves `s3://BUCKET/KEY` or `file:///ABSOLUTE/PATH`.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self> {
        let bad = |reason: &str| Error::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .filter(|(b, k)| !b.is_empty() && !k.is_empty())
                .ok_or_else(|| bad("expected s3://BUCKET/KEY"))?;
            rustls_ring();
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = &opts.endpoint {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            }
            if let Some(r) = &opts.region {
                b = b.with_region(r);
            }
            if let Some(k) = &opts.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = &opts.secret_access_key {
                b = b.with_secret_access_key(s);
            }
            if opts.path_style {
                b = b.with_virtual_hosted_style_request(false);
            }
            let store = b.build().map_err(|e| Error::from_store(url, e))?;
            let path = object_store::path::Path::parse(key).map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                path,
                url: url.to_owned(),
            });
        }
        if let Some(p) = url.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(bad("expected file:///ABSOLUTE/PATH"));
            }
            let store = object_store::local::LocalFileSystem::new().with_automatic_cleanup(true);
            let path =
                object_store::path::Path::from_absolute_path(p).map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                path,
                url: url.to_owned(),
            });
        }
        Err(bad("unsupported URL scheme (s3:// or file://)"))
    }

    /// The object `name` under this one's key taken as a prefix (`KEY/name`), on the same
    /// client (and so the same connections).
    #[must_use]
    pub fn child(&self, name: &str) -> Self {
        Self {
            store: Arc::clone(&self.store),
            path: object_store::path::Path::from(format!("{}/{name}", self.path)),
            url: format!("{}/{name}", self.url.trim_end_matches('/')),
        }
    }

    /// The object's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bytes `range` of the object, exactly.
    pub async fn get_range(&self, range: Range<u64>) -> Result<Bytes> {
        let want = range.end.saturating_sub(range.start);
        let b = self
            .store
            .get_range(&self.path, range)
            .await
            .map_err(|e| Error::from_store(&self.url, e))?;
        if b.len() as u64 != want {
            return Err(Error::Short {
                url: self.url.clone(),
                want,
                got: b.len() as u64,
            });
        }
        Ok(b)
    }

    /// The object's size.
    pub async fn size(&self) -> Result<u64> {
        Ok(self
            .store
            .head(&self.path)
            .await
            .map_err(|e| Error::from_store(&self.url, e))?
            .size)
    }

    /// The whole object, or `None` when it does not exist.
    pub async fn get_all(&self) -> Result<Option<Bytes>> {
        match self.store.get(&self.path).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| Error::from_store(&self.url, e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::from_store(&self.url, e)),
        }
    }

    /// The whole object if it holds at most `max` bytes (else [`Error::TooLarge`], having read
    /// at most `max` bytes of it), or `None` when it does not exist. What readers of objects
    /// anyone with the bucket's write keys could have written use instead of [`get_all`].
    ///
    /// [`get_all`]: Self::get_all
    pub async fn get_bounded(&self, max: u64) -> Result<Option<Bytes>> {
        let mut out = Vec::new();
        let found = self
            .stream_bounded(max, |chunk| {
                out.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok(found.then(|| Bytes::from(out)))
    }

    /// Streams the object (at most `max` bytes) into a new file at `path`, fsynced; `false`
    /// when it does not exist (nothing is written). A partial file is removed on failure.
    pub async fn download_bounded(&self, path: &std::path::Path, max: u64) -> Result<bool> {
        use std::io::Write as _;
        let local = |source| Error::Local {
            url: self.url.clone(),
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(local)?;
        let found = self
            .stream_bounded(max, |chunk| file.write_all(chunk).map_err(local))
            .await
            .and_then(|found| {
                file.sync_all().map_err(local)?;
                Ok(found)
            });
        if !matches!(found, Ok(true)) {
            let _ = std::fs::remove_file(path);
        }
        found
    }

    async fn stream_bounded(
        &self,
        max: u64,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        let r = match self.store.get(&self.path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(Error::from_store(&self.url, e)),
        };
        let too_large = || Error::TooLarge {
            url: self.url.clone(),
            max,
        };
        if r.meta.size > max {
            return Err(too_large());
        }
        let mut stream = r.into_stream();
        let mut got = 0u64;
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|e| Error::from_store(&self.url, e))?;
            got += chunk.len() as u64;
            if got > max {
                return Err(too_large());
            }
            sink(&chunk)?;
        }
        Ok(true)
    }

    /// Whether the object exists.
    pub async fn exists(&self) -> Result<bool> {
        match self.store.head(&self.path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::from_store(&self.url, e)),
        }
    }

    /// Creates the object holding `bytes` unless it exists: one conditional, create-only PUT
    /// (`If-None-Match: *` on S3; an atomic create on a file store). `Ok(true)` when this call
    /// created it, `Ok(false)` when the object was already there (it is left as it was).
    pub async fn put_if_absent(&self, bytes: &[u8]) -> Result<bool> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..object_store::PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path, Bytes::copy_from_slice(bytes).into(), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(Error::from_store(&self.url, e)),
        }
    }

    /// Deletes the object (an absent object is not an error).
    pub async fn delete(&self) -> Result<()> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::from_store(&self.url, e)),
        }
    }

    /// The names of the objects directly under this one's key taken as a prefix (`KEY/…`),
    /// sorted.
    pub async fn list_children(&self) -> Result<Vec<String>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.path))
            .await
            .map_err(|e| Error::from_store(&self.url, e))?;
        let mut names: Vec<String> = listing
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Uploads `bytes` as the object (replacing it), in parts; `progress(sent, total)` after
    /// each part. Aborts the upload on any error, so no partial object is ever visible.
    pub async fn upload(
        &self,
        bytes: &[u8],
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<()> {
        let err = |e| Error::from_store(&self.url, e);
        // The bucket must exist: some servers create one on a multipart upload.
        let parts: Vec<_> = self.path.parts().collect();
        let parent: object_store::path::Path = parts[..parts.len().saturating_sub(1)]
            .iter()
            .cloned()
            .collect();
        self.store
            .list_with_delimiter(Some(&parent))
            .await
            .map_err(err)?;
        let upload = self.store.put_multipart(&self.path).await.map_err(err)?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
        let total = bytes.len() as u64;
        let mut sent = 0u64;
        for chunk in bytes.chunks(PART) {
            if let Err(e) = w.wait_for_capacity(4).await {
                let _ = w.abort().await;
                return Err(err(e));
            }
            w.write(chunk);
            sent += chunk.len() as u64;
            if let Some(p) = progress {
                p(sent, total);
            }
        }
        w.finish().await.map_err(err)?;
        Ok(())
    }
}

/// A blocking, sequential [`std::io::Read`] over `range` of an object, fetched in 16 MiB
/// windows on `runtime` (call it from a thread that is not one of the runtime's workers).
pub struct RangeReader<'a> {
    object: &'a RemoteObject,
    runtime: &'a tokio::runtime::Handle,
    pos: u64,
    end: u64,
    buf: Bytes,
}

impl<'a> RangeReader<'a> {
    /// A reader of `range` of `object`.
    #[must_use]
    pub fn new(
        object: &'a RemoteObject,
        runtime: &'a tokio::runtime::Handle,
        range: Range<u64>,
    ) -> Self {
        Self {
            object,
            runtime,
            pos: range.start,
            end: range.end,
            buf: Bytes::new(),
        }
    }
}

impl std::io::Read for RangeReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.end {
                return Ok(0);
            }
            let to = self.end.min(self.pos + (16 << 20));
            self.buf = self
                .runtime
                .block_on(self.object.get_range(self.pos..to))
                .map_err(std::io::Error::other)?;
            self.pos = to;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_file_store_object_is_created_once_read_by_ranges_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store/a.clip", dir.path().display());
        let obj = RemoteObject::open(&url, &RemoteOptions::default()).unwrap();
        assert!(!obj.exists().await.unwrap());
        assert!(obj.get_all().await.unwrap().is_none());
        assert!(obj.put_if_absent(b"hello world").await.unwrap());
        assert!(!obj.put_if_absent(b"second").await.unwrap());
        assert_eq!(&obj.get_range(6..11).await.unwrap()[..], b"world");
        assert_eq!(obj.size().await.unwrap(), 11);
        assert_eq!(
            &obj.get_bounded(11).await.unwrap().unwrap()[..],
            b"hello world"
        );
        assert!(matches!(
            obj.get_bounded(10).await,
            Err(Error::TooLarge { max: 10, .. })
        ));
        let local = dir.path().join("copy");
        assert!(obj.download_bounded(&local, 11).await.unwrap());
        assert_eq!(std::fs::read(&local).unwrap(), b"hello world");
        assert!(
            obj.download_bounded(&dir.path().join("small"), 5)
                .await
                .is_err()
        );
        assert!(
            !dir.path().join("small").exists(),
            "no partial file is left"
        );
        let parent = RemoteObject::open(
            &format!("file://{}/store", dir.path().display()),
            &RemoteOptions::default(),
        )
        .unwrap();
        assert_eq!(parent.list_children().await.unwrap(), ["a.clip"]);
        let missing = parent.child("b.clip");
        assert!(matches!(
            missing.get_range(0..1).await,
            Err(Error::NotFound { .. })
        ));
        obj.delete().await.unwrap();
        obj.delete().await.unwrap();
        assert!(!obj.exists().await.unwrap());
    }

    #[test]
    fn urls_are_checked_and_secrets_never_printed() {
        for url in ["s3://bucket", "s3:///key", "file://relative", "http://x/y"] {
            assert!(
                matches!(
                    RemoteObject::open(url, &RemoteOptions::default()),
                    Err(Error::Url { .. })
                ),
                "{url}"
            );
        }
        let opts = RemoteOptions {
            secret_access_key: Some("canary-secret".into()),
            ..RemoteOptions::default()
        };
        assert!(!format!("{opts:?}").contains("canary-secret"));
    }
}
