//! Pushing: blob existence checks, cross-repository mounts, monolithic and chunked uploads,
//! manifests and tags — enough to push an OCI layout as `buildah push oci:` writes it.

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::{Client, Error, Reference, oci};

/// Blobs larger than this are uploaded in chunks of this size.
pub const CHUNK: usize = 8 << 20;

/// The body of `GET /v2/NAME/tags/list`.
#[derive(serde::Deserialize)]
struct Tags {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

fn unexpected(what: &str, status: StatusCode) -> Error {
    Error::Protocol {
        url: what.to_owned(),
        reason: format!("answered {status}"),
    }
}

fn push_denied(r: &Reference) -> Error {
    Error::Unauthorized {
        host: r.registry.clone(),
        repository: r.repository.clone(),
    }
}

impl Client {
    async fn push_call(
        &self,
        r: &Reference,
        method: Method,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, Error> {
        let resp = self
            .send_with(
                r.api_host(),
                &r.repository,
                "pull,push",
                method,
                path,
                headers,
                body,
            )
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(push_denied(r));
        }
        Ok(resp)
    }

    /// Whether the repository already has blob `digest`.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, Error> {
        let path = format!("/v2/{}/blobs/{digest}", r.repository);
        let resp = self.push_call(r, Method::HEAD, &path, &[], None).await?;
        Ok(resp.status().is_success())
    }

    /// Asks the registry to mount blob `digest` from repository `from` (same registry) instead of
    /// uploading it; returns whether it did.
    pub async fn mount_blob(&self, r: &Reference, digest: &str, from: &str) -> Result<bool, Error> {
        let path = format!(
            "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
            r.repository
        );
        let resp = self.push_call(r, Method::POST, &path, &[], None).await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads a blob (skipped when present): one PUT up to [`CHUNK`] bytes, else PATCH chunks
    /// then a closing PUT. The digest is checked before anything is sent.
    pub async fn push_blob(&self, r: &Reference, digest: &str, bytes: Bytes) -> Result<(), Error> {
        self.push_blob_chunked(r, digest, bytes, CHUNK).await
    }

    /// [`Self::push_blob`] with an explicit chunk size.
    pub async fn push_blob_chunked(
        &self,
        r: &Reference,
        digest: &str,
        bytes: Bytes,
        chunk: usize,
    ) -> Result<(), Error> {
        let found = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if found != digest {
            return Err(Error::Digest {
                what: "blob to push".into(),
                expected: digest.into(),
                found,
            });
        }
        if self.blob_exists(r, digest).await? {
            return Ok(());
        }
        let start = format!("/v2/{}/blobs/uploads/", r.repository);
        let resp = self.push_call(r, Method::POST, &start, &[], None).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(unexpected(&start, resp.status()));
        }
        let mut location = location_of(&resp, &start)?;
        let chunk = chunk.max(1);
        if bytes.len() > chunk {
            let mut at = 0usize;
            while at < bytes.len() {
                let end = (at + chunk).min(bytes.len());
                let headers = [
                    (CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (CONTENT_RANGE, format!("{at}-{}", end - 1)),
                    (CONTENT_LENGTH, (end - at).to_string()),
                ];
                let resp = self
                    .push_call(
                        r,
                        Method::PATCH,
                        &location,
                        &headers,
                        Some(bytes.slice(at..end)),
                    )
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(unexpected(&location, resp.status()));
                }
                location = location_of(&resp, &location)?;
                at = end;
            }
            let sep = if location.contains('?') { '&' } else { '?' };
            let put = format!("{location}{sep}digest={digest}");
            let resp = self
                .push_call(
                    r,
                    Method::PUT,
                    &put,
                    &[(CONTENT_LENGTH, "0".into())],
                    Some(Bytes::new()),
                )
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(unexpected(&put, resp.status()));
            }
        } else {
            let sep = if location.contains('?') { '&' } else { '?' };
            let put = format!("{location}{sep}digest={digest}");
            let headers = [
                (CONTENT_TYPE, "application/octet-stream".to_owned()),
                (CONTENT_LENGTH, bytes.len().to_string()),
            ];
            let resp = self
                .push_call(r, Method::PUT, &put, &headers, Some(bytes))
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(unexpected(&put, resp.status()));
            }
        }
        Ok(())
    }

    /// Uploads a manifest (or index) under `reference` (tag or digest); returns its digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, Error> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let path = format!("/v2/{}/manifests/{reference}", r.repository);
        let resp = self
            .push_call(
                r,
                Method::PUT,
                &path,
                &[(CONTENT_TYPE, media_type.to_owned())],
                Some(bytes),
            )
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(unexpected(&path, resp.status()));
        }
        Ok(digest)
    }

    /// The repository's tags.
    pub async fn tags(&self, r: &Reference) -> Result<Vec<String>, Error> {
        let path = format!("/v2/{}/tags/list", r.repository);
        let resp = self
            .send(r.api_host(), &r.repository, Method::GET, &path, &[])
            .await?;
        if !resp.status().is_success() {
            return Err(unexpected(&path, resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| Error::Protocol {
            url: path.clone(),
            reason: e.to_string(),
        })?;
        let t: Tags = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
            url: path,
            reason: e.to_string(),
        })?;
        Ok(t.tags.unwrap_or_default())
    }

    /// Pushes the image tagged `tag` in the OCI layout at `layout` (blobs, platform manifests, and
    /// the index if it is one) to `r`, tagging it with `r`'s tag; returns the top digest.
    pub async fn push_layout(
        &self,
        layout: &Path,
        tag: &str,
        r: &Reference,
    ) -> Result<String, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::Config(format!("reading {}: {e}", p.display())))
        };
        let blob = |digest: &str| -> Result<Bytes, Error> {
            let hex = digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| Error::Config(format!("unsupported digest {digest}")))?;
            Ok(read(&layout.join("blobs/sha256").join(hex))?.into())
        };
        let index: oci::Index = serde_json::from_slice(&read(&layout.join("index.json"))?)
            .map_err(|e| Error::Config(format!("{}: index.json: {e}", layout.display())))?;
        let top = index
            .manifests
            .iter()
            .find(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(tag)
            })
            .ok_or_else(|| Error::Config(format!("tag {tag:?} not found in {}", layout.display())))?
            .clone();
        let target_tag = r.tag.clone().unwrap_or_else(|| "latest".into());
        let manifests = if oci::INDEX_TYPES.contains(&top.media_type.as_str()) {
            let nested: oci::Index = serde_json::from_slice(&blob(&top.digest)?)
                .map_err(|e| Error::Config(format!("image index: {e}")))?;
            nested.manifests
        } else {
            vec![top.clone()]
        };
        for m in &manifests {
            let bytes = blob(&m.digest)?;
            let manifest: oci::Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Config(format!("manifest: {e}")))?;
            for d in manifest
                .layers
                .iter()
                .chain(std::iter::once(&manifest.config))
            {
                self.push_blob(r, &d.digest, blob(&d.digest)?).await?;
            }
            let reference = if manifests.len() > 1 || m.digest != top.digest {
                m.digest.clone()
            } else {
                target_tag.clone()
            };
            self.push_manifest(r, &reference, &m.media_type, bytes)
                .await?;
        }
        if top.digest != manifests[0].digest || manifests.len() > 1 {
            self.push_manifest(r, &target_tag, &top.media_type, blob(&top.digest)?)
                .await?;
        }
        Ok(top.digest)
    }
}

fn location_of(resp: &reqwest::Response, what: &str) -> Result<String, Error> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Protocol {
            url: what.to_owned(),
            reason: "upload answer without Location".into(),
        })?;
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Ok(loc.to_owned());
    }
    // A relative Location: resolve against the request URL.
    let base = resp.url();
    base.join(loc)
        .map(|u| u.to_string())
        .map_err(|e| Error::Protocol {
            url: what.to_owned(),
            reason: format!("bad Location {loc:?}: {e}"),
        })
}
