//! v1 archives in object storage, through the `object_store` crate.
//!
//! A remote v1 archive is two things: the data-carrying archive uploaded as one object (`s3://BUCKET/KEY`,
//! or `file:///DIR/KEY` for a local-filesystem store), and a small v1-remote metadata archive
//! (the same index, no data, the object's URL, size and where its data region starts). Uploads are
//! multipart (8 MiB parts, four in flight) and abort on any error, so a failed upload never
//! leaves a visible object; readers fetch byte ranges of the object.
//!
//! S3 settings come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, …) and may be
//! overridden by [`RemoteOptions`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use clip_format::{Archive, ArchiveKind, WriteSummary, write_v1_remote};
use object_store::{ObjectStore, ObjectStoreExt as _};

use crate::{Error, Result};

/// Part size of multipart uploads.
const PART: usize = 8 << 20;

/// Overrides of the environment's object-store settings.
#[derive(Debug, Clone, Default)]
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

fn store_err(url: &str, e: &object_store::Error) -> Error {
    let text = e.to_string();
    let hint = if text.contains("403")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("InvalidAccessKeyId")
    {
        " (check the access key and secret: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    } else if text.contains("NoSuchBucket") {
        " (the bucket does not exist)"
    } else {
        ""
    };
    Error::Remote {
        url: url.to_owned(),
        reason: format!("{text}{hint}"),
    }
}

/// One object in a store.
#[derive(Debug, Clone)]
pub struct RemoteObject {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    url: String,
}

impl RemoteObject {
    /// Resolves `s3://BUCKET/KEY` or `file:///ABSOLUTE/PATH`.
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self> {
        let bad = |reason: &str| Error::Remote {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .filter(|(b, k)| !b.is_empty() && !k.is_empty())
                .ok_or_else(|| bad("expected s3://BUCKET/KEY"))?;
            let _ = rustls_ring();
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
            let store = b.build().map_err(|e| store_err(url, &e))?;
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

    /// Bytes `range` of the object.
    pub async fn get_range(&self, range: Range<u64>) -> Result<Bytes> {
        let want = range.end.saturating_sub(range.start);
        let b = self
            .store
            .get_range(&self.path, range)
            .await
            .map_err(|e| store_err(&self.url, &e))?;
        if b.len() as u64 != want {
            return Err(Error::Remote {
                url: self.url.clone(),
                reason: format!("asked for {want} bytes, got {}", b.len()),
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
            .map_err(|e| store_err(&self.url, &e))?
            .size)
    }

    /// The whole object, or `None` when it does not exist.
    pub async fn get_all(&self) -> Result<Option<Bytes>> {
        match self.store.get(&self.path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| store_err(&self.url, &e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(&self.url, &e)),
        }
    }

    /// Whether the object exists.
    pub async fn exists(&self) -> Result<bool> {
        match self.store.head(&self.path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(&self.url, &e)),
        }
    }

    /// Creates the object holding `bytes` unless it exists: one conditional, create-only PUT
    /// (`If-None-Match: *` on S3; an atomic create on a file store). `Ok(true)` when this call
    /// created it, `Ok(false)` when the object was already there (it is left as it was). The
    /// coordination point of workers sharing a store: the first writer wins, the others reuse.
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
            Err(e) => Err(store_err(&self.url, &e)),
        }
    }

    /// Deletes the object (an absent object is not an error).
    pub async fn delete(&self) -> Result<()> {
        match self.store.delete(&self.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&self.url, &e)),
        }
    }

    /// Uploads `bytes` as the object, in parts; `progress(sent, total)` after each part. Aborts
    /// the upload on any error.
    pub async fn upload(
        &self,
        bytes: &[u8],
        progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    ) -> Result<()> {
        // The bucket must exist: some servers create one on a multipart upload.
        let parts: Vec<_> = self.path.parts().collect();
        let parent: object_store::path::Path = parts[..parts.len().saturating_sub(1)]
            .iter()
            .cloned()
            .collect();
        self.store
            .list_with_delimiter(Some(&parent))
            .await
            .map_err(|e| store_err(&self.url, &e))?;
        let upload = self
            .store
            .put_multipart(&self.path)
            .await
            .map_err(|e| store_err(&self.url, &e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
        let total = bytes.len() as u64;
        let mut sent = 0u64;
        for chunk in bytes.chunks(PART) {
            if let Err(e) = w.wait_for_capacity(4).await {
                let _ = w.abort().await;
                return Err(store_err(&self.url, &e));
            }
            w.write(chunk);
            sent += chunk.len() as u64;
            if let Some(p) = progress {
                p(sent, total);
            }
        }
        w.finish().await.map_err(|e| store_err(&self.url, &e))?;
        Ok(())
    }
}

/// Installs rustls' ring provider as the process default (the object store's HTTP client needs one).
fn rustls_ring() -> bool {
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
}

/// What an upload produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSummary {
    /// The object's URL.
    pub url: String,
    /// Bytes uploaded.
    pub uploaded: u64,
    /// The metadata archive written.
    pub metadata: WriteSummary,
}

/// Uploads the v1 local archive `local` to `url` and writes the v1-remote metadata archive
/// `out` pointing at it. `out` is published only after the object is complete and its size
/// checked.
pub fn upload_v1(
    local: &Path,
    url: &str,
    out: &Path,
    opts: &RemoteOptions,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<UploadSummary> {
    let archive = Archive::open(local)?;
    if archive.kind() != ArchiveKind::V1Local {
        return Err(Error::Unsupported(format!(
            "{} is a {} archive; only v1-local archives are uploaded",
            local.display(),
            archive.kind()
        )));
    }
    let object = RemoteObject::open(url, opts)?;
    let rt = crate::runtime()?;
    let bytes = archive.as_bytes();
    rt.block_on(object.upload(bytes, progress))?;
    let size = rt.block_on(object.size())?;
    if size != bytes.len() as u64 {
        return Err(Error::Remote {
            url: url.to_owned(),
            reason: format!("uploaded {} bytes but the object has {size}", bytes.len()),
        });
    }
    let metadata = write_v1_remote(&archive, url, out)?;
    Ok(UploadSummary {
        url: url.to_owned(),
        uploaded: size,
        metadata,
    })
}

/// A blocking, sequential [`std::io::Read`] over `range` of an object, fetched in 16 MiB windows.
pub(crate) struct RangeReader<'a> {
    object: &'a RemoteObject,
    rt: &'a tokio::runtime::Runtime,
    pos: u64,
    end: u64,
    buf: Bytes,
}

impl<'a> RangeReader<'a> {
    pub(crate) fn new(
        object: &'a RemoteObject,
        rt: &'a tokio::runtime::Runtime,
        range: Range<u64>,
    ) -> Self {
        Self {
            object,
            rt,
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
                .rt
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
