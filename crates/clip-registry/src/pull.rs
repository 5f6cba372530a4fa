//! The pull side of the distribution API: manifests and indexes (with platform selection),
//! config and small blobs verified against their digests, streamed blobs, exact byte ranges, and
//! a blocking reader over a streamed blob.

use std::ops::Range;

use bytes::Bytes;
use clip_format::Digest;
use futures_util::StreamExt as _;
use reqwest::header::{ACCEPT, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};

use crate::client::{ACCEPT_MANIFESTS, Client, MAX_DOCUMENT, ResolvedImage};
use crate::oci;
use crate::{Error, Reference};

impl Client {
    /// Fetches a manifest (any type) by tag or digest; returns its bytes, media type and digest
    /// (checked against `reference` when that is a digest).
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<(Bytes, String, Digest), Error> {
        let _slot = self.slot(r.api_host()).await;
        let path = format!("/v2/{}/manifests/{reference}", r.repository);
        let resp = self
            .send(
                r.api_host(),
                &r.repository,
                Method::GET,
                &path,
                &[(ACCEPT, ACCEPT_MANIFESTS.into())],
            )
            .await?;
        let url = resp.url().to_string();
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: format!("manifest {reference}"),
                repository: r.repository.clone(),
                host: r.registry.clone(),
            });
        }
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("manifest request answered {}", resp.status()),
            });
        }
        let media = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let bytes = Self::read_document(resp, &url).await?;
        let digest = if let Ok(expected) = Digest::parse(reference) {
            expected.verify(format!("manifest from {url}"), &bytes)?;
            expected
        } else {
            Digest::sha256(&bytes)
        };
        Ok((bytes, media, digest))
    }

    /// Resolves `r` to one platform's manifest and config (default platform: this machine's).
    pub async fn resolve(
        &self,
        r: &Reference,
        platform: Option<&oci::Platform>,
    ) -> Result<ResolvedImage, Error> {
        let (bytes, media, digest) = self.manifest(r, r.manifest_ref()).await?;
        let probe: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("manifest is not JSON: {e}"),
            })?;
        if probe
            .get("schemaVersion")
            .and_then(serde_json::Value::as_u64)
            == Some(1)
        {
            return Err(Error::Unsupported(format!(
                "{r} is a Docker schema 1 manifest (deprecated since 2017); push the image again with a current tool (docker, buildah, skopeo) to get a schema 2 or OCI manifest"
            )));
        }
        let is_index = oci::is_index(&oci::MediaType::from(media.as_str()))
            || probe.get("manifests").is_some();
        let (bytes, digest) = if is_index {
            let index: oci::Index =
                serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                    url: r.to_string(),
                    reason: format!("image index: {e}"),
                })?;
            let want = platform.cloned().unwrap_or_else(oci::host_platform);
            let chosen = oci::select_platform(&index, &want).ok_or_else(|| Error::NotFound {
                what: format!("a manifest for platform {}", oci::platform_name(&want)),
                repository: r.repository.clone(),
                host: r.registry.clone(),
            })?;
            let (b, _, d) = self.manifest(r, oci::digest(chosen)?.as_str()).await?;
            (b, d)
        } else {
            (bytes, digest)
        };
        let manifest: oci::Manifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("manifest: {e}"),
            })?;
        let config_bytes = self
            .blob_bytes(r, &oci::digest(manifest.config())?, MAX_DOCUMENT)
            .await?;
        let config: oci::ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("image config: {e}"),
            })?;
        Ok(ResolvedImage {
            reference: r.pinned(digest.as_str()),
            manifest_digest: digest,
            manifest,
            config,
        })
    }

    async fn blob_response(
        &self,
        r: &Reference,
        digest: &Digest,
        range: Option<&Range<u64>>,
    ) -> Result<reqwest::Response, Error> {
        let path = format!("/v2/{}/blobs/{digest}", r.repository);
        let mut headers = Vec::new();
        if let Some(rg) = range {
            headers.push((RANGE, format!("bytes={}-{}", rg.start, rg.end - 1)));
        }
        let resp = self
            .send(r.api_host(), &r.repository, Method::GET, &path, &headers)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: format!("blob {digest}"),
                repository: r.repository.clone(),
                host: r.registry.clone(),
            });
        }
        Ok(resp)
    }

    /// The response to a GET of the whole blob, and its URL; anything but success is an error.
    async fn whole_blob(
        &self,
        r: &Reference,
        digest: &Digest,
    ) -> Result<(reqwest::Response, String), Error> {
        let resp = self.blob_response(r, digest, None).await?;
        let url = resp.url().to_string();
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("blob request answered {}", resp.status()),
            });
        }
        Ok((resp, url))
    }

    /// A whole (small) blob, verified against its digest.
    pub async fn blob_bytes(
        &self,
        r: &Reference,
        digest: &Digest,
        limit: usize,
    ) -> Result<Bytes, Error> {
        let _slot = self.slot(r.api_host()).await;
        let (resp, url) = self.whole_blob(r, digest).await?;
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            if out.len() + c.len() > limit {
                return Err(Error::Protocol {
                    url,
                    reason: format!("blob larger than {limit} bytes"),
                });
            }
            out.extend_from_slice(&c);
        }
        digest.verify(format!("blob from {url}"), &out)?;
        Ok(out.into())
    }

    /// Streams a blob's chunks to `sink` (the caller verifies the digest as it consumes them).
    pub async fn blob_stream(
        &self,
        r: &Reference,
        digest: &Digest,
        mut sink: impl FnMut(Bytes) -> bool,
    ) -> Result<u64, Error> {
        let (resp, url) = self.whole_blob(r, digest).await?;
        let mut n = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            n += c.len() as u64;
            if !sink(c) {
                break;
            }
        }
        Ok(n)
    }

    /// Exactly the bytes `range` of a blob: a 206 must carry the matching `Content-Range`; a 200
    /// (a registry ignoring `Range`) is trimmed to the range. Anything else is an error.
    pub async fn read_range(
        &self,
        r: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let _slot = self.slot(r.api_host()).await;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let want = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Config("range too large".into()))?;
        let resp = self.blob_response(r, digest, Some(&range)).await?;
        let url = resp.url().to_string();
        let status = resp.status();
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let expect = format!("bytes {}-{}/", range.start, range.end - 1);
                if !cr.starts_with(&expect) {
                    return Err(Error::Protocol {
                        url,
                        reason: format!("asked for {expect}…, got Content-Range {cr:?}"),
                    });
                }
                0
            }
            StatusCode::OK => range.start,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Error::Protocol {
                    url,
                    reason: format!("range {range:?} is beyond the blob"),
                });
            }
            s => {
                return Err(Error::Protocol {
                    url,
                    reason: format!("range request answered {s}"),
                });
            }
        };
        let mut out = Vec::with_capacity(want);
        let mut skip = skip;
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            let mut c = &c[..];
            let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(c.len());
            skip -= drop as u64;
            c = &c[drop..];
            let take = c.len().min(want - out.len());
            out.extend_from_slice(&c[..take]);
            if out.len() == want {
                break;
            }
        }
        if out.len() != want {
            return Err(Error::Protocol {
                url,
                reason: format!("short body: {} of {want} bytes", out.len()),
            });
        }
        Ok(out.into())
    }
}

/// A blocking [`std::io::Read`] over a blob streamed from the registry by a task on `runtime`:
/// CPU-bound consumers (inflate, tar walking) run on their own threads and pull bytes as they
/// need them, with a bounded buffer in between.
pub struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, Error>>,
    current: Bytes,
    failed: bool,
}

/// Blobs at least this large are fetched with parallel range requests when the registry
/// answers ranges ([`Client::blob_reader_sized`]).
pub const PARALLEL_MIN: u64 = 64 << 20;
/// The size of each request of a [`Client::range_reader`].
pub const RANGE_READER_CHUNK: u64 = 4 << 20;
/// The size of each range of a parallel fetch.
pub const PARALLEL_CHUNK: u64 = 8 << 20;
/// Ranges in flight during a parallel fetch (memory: this many chunks, plus one being read).
pub const PARALLEL_STREAMS: usize = 4;

impl Client {
    /// Whether the registry (or whatever serves its blobs) answers a range request for blob
    /// `digest` with 206.
    pub async fn answers_ranges(&self, r: &Reference, digest: &Digest) -> bool {
        let _slot = self.slot(r.api_host()).await;
        self.blob_response(r, digest, Some(&(0..1)))
            .await
            .is_ok_and(|resp| resp.status() == StatusCode::PARTIAL_CONTENT)
    }

    /// [`Self::blob_reader`] for a blob of known `size`: one of [`PARALLEL_MIN`] bytes or more
    /// is fetched as [`PARALLEL_CHUNK`]-byte ranges, [`PARALLEL_STREAMS`] at a time, handed on
    /// in order — where each connection is capped (a registry's or CDN's per-connection limit,
    /// one TCP window over a long path), one big layer is no longer limited to one connection.
    /// Memory stays bounded; bytes are verified by the consumer as before. A registry that does
    /// not answer ranges gets one stream.
    #[must_use]
    pub fn blob_reader_sized(
        &self,
        runtime: &tokio::runtime::Handle,
        r: &Reference,
        digest: &Digest,
        size: u64,
    ) -> BlobReader {
        BlobReader {
            rx: self.blob_chunks(runtime, r, digest, size),
            current: Bytes::new(),
            failed: false,
        }
    }

    /// The chunks of blob `digest` (of `size` bytes) in order, produced by a task on `runtime`:
    /// parallel ranges for a big blob of a registry that answers them, else one stream.
    /// Bytes `range` of blob `digest`, as a blocking [`std::io::Read`] fed by a task on
    /// `runtime`: exact ranges ([`Self::read_range`]) of at most [`RANGE_READER_CHUNK`] bytes, one
    /// after another, at most two waiting — for ranges too large to hold in memory (a span of
    /// gigabytes), read by a consumer on its own thread.
    #[must_use]
    pub fn range_reader(
        &self,
        runtime: &tokio::runtime::Handle,
        r: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> BlobReader {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (client, r, digest) = (self.clone(), r.clone(), digest.clone());
        runtime.spawn(async move {
            let mut next = range.start;
            while next < range.end {
                let end = (next + RANGE_READER_CHUNK).min(range.end);
                let res = client.read_range(&r, &digest, next..end).await;
                let stop = res.is_err();
                if tx.send(res).await.is_err() || stop {
                    return;
                }
                next = end;
            }
        });
        BlobReader {
            rx,
            current: Bytes::new(),
            failed: false,
        }
    }

    pub(crate) fn blob_chunks(
        &self,
        runtime: &tokio::runtime::Handle,
        r: &Reference,
        digest: &Digest,
        size: u64,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes, Error>> {
        let streams = self
            .cfg
            .range_streams
            .or_else(|| {
                std::env::var("CLIP_RANGE_STREAMS")
                    .ok()
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(PARALLEL_STREAMS)
            .clamp(1, 16);
        if size < PARALLEL_MIN || streams == 1 {
            let (tx, rx) = tokio::sync::mpsc::channel(32);
            let (client, r, digest) = (self.clone(), r.clone(), digest.clone());
            runtime.spawn(async move { client.stream_to(&r, &digest, tx).await });
            return rx;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(streams);
        let (client, r, digest) = (self.clone(), r.clone(), digest.clone());
        runtime.spawn(async move {
            if !client.answers_ranges(&r, &digest).await {
                tracing::debug!(%digest, "no range answers: one stream");
                client.stream_to(&r, &digest, tx).await;
                return;
            }
            let mut next = 0u64;
            let mut inflight = futures_util::stream::FuturesOrdered::new();
            loop {
                while next < size && inflight.len() < streams {
                    let end = (next + PARALLEL_CHUNK).min(size);
                    let (c, r, d) = (client.clone(), r.clone(), digest.clone());
                    inflight.push_back(async move { c.read_range(&r, &d, next..end).await });
                    next = end;
                }
                let Some(res) = inflight.next().await else {
                    return;
                };
                let stop = res.is_err();
                if tx.send(res).await.is_err() || stop {
                    return;
                }
            }
        });
        rx
    }

    /// Streams blob `digest` of `r` into `tx` chunk by chunk (an error ends the stream), as
    /// fast as the receiver takes them: memory stays bounded by the channel. The receiver
    /// verifies the digest.
    pub async fn stream_to(
        &self,
        r: &Reference,
        digest: &Digest,
        tx: tokio::sync::mpsc::Sender<Result<Bytes, Error>>,
    ) {
        let _slot = self.slot(r.api_host()).await;
        let resp = match self.blob_response(r, digest, None).await {
            Ok(resp) if resp.status().is_success() => resp,
            Ok(resp) => {
                let url = resp.url().to_string();
                let _ = tx
                    .send(Err(Error::Protocol {
                        url,
                        reason: format!("blob request answered {}", resp.status()),
                    }))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let url = resp.url().to_string();
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let item = c.map_err(|e| Error::transport(&url, &e));
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    }

    /// Starts streaming blob `digest` of `r` on `runtime`; read it from any thread.
    #[must_use]
    pub fn blob_reader(
        &self,
        runtime: &tokio::runtime::Handle,
        r: &Reference,
        digest: &Digest,
    ) -> BlobReader {
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let (client, r, digest) = (self.clone(), r.clone(), digest.clone());
        runtime.spawn(async move { client.stream_to(&r, &digest, tx).await });
        BlobReader {
            rx,
            current: Bytes::new(),
            failed: false,
        }
    }
}

impl BlobReader {
    /// The next bytes as the network delivered them (shared, not copied); `None` at the end.
    /// After an error, only `None`.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        while self.current.is_empty() {
            if self.failed {
                return Ok(None);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.failed = true;
                    return Err(std::io::Error::other(e));
                }
                None => return Ok(None),
            }
        }
        Ok(Some(std::mem::take(&mut self.current)))
    }
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            match self.next_chunk()? {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}
