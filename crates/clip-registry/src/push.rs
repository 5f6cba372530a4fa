//! Pushing: blob existence checks, cross-repository mounts, monolithic and chunked uploads,
//! manifests and tags — enough to push an OCI layout as `buildah push oci:` writes it.

use std::path::Path;

use bytes::Bytes;
use clip_format::Digest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};

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
                crate::auth::Access::PullPush,
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
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, Error> {
        let path = format!("/v2/{}/blobs/{digest}", r.repository);
        let resp = self.push_call(r, Method::HEAD, &path, &[], None).await?;
        Ok(resp.status().is_success())
    }

    /// Asks the registry to mount blob `digest` from repository `from` (same registry) instead of
    /// uploading it; returns whether it did.
    pub async fn mount_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, Error> {
        let path = format!(
            "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
            r.repository
        );
        let resp = self.push_call(r, Method::POST, &path, &[], None).await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads a blob (skipped when present): one PUT up to [`CHUNK`] bytes, else PATCH chunks
    /// then a closing PUT. The digest is checked before anything is sent.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), Error> {
        self.push_blob_chunked(r, digest, bytes, CHUNK).await
    }

    /// [`Self::push_blob`] with an explicit chunk size.
    pub async fn push_blob_chunked(
        &self,
        r: &Reference,
        digest: &Digest,
        bytes: Bytes,
        chunk: usize,
    ) -> Result<(), Error> {
        digest.verify("blob to push", &bytes)?;
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
    ) -> Result<Digest, Error> {
        let digest = Digest::sha256(&bytes);
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
    ) -> Result<Digest, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| Error::Io {
                context: "reading",
                path: p.to_owned(),
                source,
            })
        };
        let bad = |what: String| Error::Protocol {
            url: layout.display().to_string(),
            reason: what,
        };
        let blob = |digest: &Digest| -> Result<Bytes, Error> {
            Ok(read(&layout.join(digest.blob_path()))?.into())
        };
        let index: oci::Index = serde_json::from_slice(&read(&layout.join("index.json"))?)
            .map_err(|e| bad(format!("index.json: {e}")))?;
        let top = index
            .manifests()
            .iter()
            .find(|d| oci::annotation(d, "org.opencontainers.image.ref.name") == Some(tag))
            .ok_or_else(|| bad(format!("tag {tag:?} not found")))?
            .clone();
        let top_digest = oci::digest(&top)?;
        let target_tag = r.tag.clone().unwrap_or_else(|| "latest".into());
        let manifests = if oci::is_index(top.media_type()) {
            let nested: oci::Index = serde_json::from_slice(&blob(&top_digest)?)
                .map_err(|e| bad(format!("image index: {e}")))?;
            nested.manifests().clone()
        } else {
            vec![top.clone()]
        };
        let mut first = None;
        for m in &manifests {
            let m_digest = oci::digest(m)?;
            first.get_or_insert_with(|| m_digest.clone());
            let bytes = blob(&m_digest)?;
            let manifest: oci::Manifest =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest: {e}")))?;
            for d in manifest
                .layers()
                .iter()
                .chain(std::iter::once(manifest.config()))
            {
                let d = oci::digest(d)?;
                self.push_blob(r, &d, blob(&d)?).await?;
            }
            let reference = if manifests.len() > 1 || m_digest != top_digest {
                m_digest.to_string()
            } else {
                target_tag.clone()
            };
            self.push_manifest(r, &reference, m.media_type().as_ref(), bytes)
                .await?;
        }
        if first.as_ref() != Some(&top_digest) || manifests.len() > 1 {
            self.push_manifest(
                r,
                &target_tag,
                top.media_type().as_ref(),
                blob(&top_digest)?,
            )
            .await?;
        }
        Ok(top_digest)
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
