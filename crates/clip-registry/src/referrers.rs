//! OCI 1.1 referrers: artifacts attached to a manifest (their `subject`), found through the
//! referrers API (`GET /v2/NAME/referrers/DIGEST`) or, where a registry lacks it (distribution
//! 2.8), through the referrers tag schema: an image index tagged `<alg>-<hex>` of the subject,
//! listing the artifacts that refer to it.
//!
//! Attaching pushes the artifact's blobs, an empty config (`application/vnd.oci.empty.v1+json`,
//! `{}`) and its manifest by digest; on a registry without the API it then adds the manifest's
//! descriptor to the tag-schema index (read, add, push — two attachers racing can drop one
//! another's entry, as the OCI spec notes for every client of the tag schema; the artifact itself
//! stays in the registry and is listed again by the next attach).

use bytes::Bytes;
use clip_format::Digest;
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Client, Error, MAX_DOCUMENT, Reference};

/// Media type of an OCI image index (the referrers list, the tag-schema index).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest (an artifact's manifest).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty descriptor's media type, and its content.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// One artifact that refers to a subject, as a referrers list describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    /// The artifact manifest's digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its `artifactType`.
    pub artifact_type: String,
    /// Its annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A blob of an artifact to attach.
#[derive(Debug, Clone)]
pub struct ArtifactBlob {
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Bytes,
    /// Its annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The tag under which the referrers tag schema lists the artifacts of `subject`.
#[must_use]
pub fn tag_schema_tag(subject: &Digest) -> String {
    let tag = format!("{}-{}", subject.algorithm(), subject.hex());
    tag.chars().take(128).collect()
}

/// The referrers an index document lists, of `artifact_type` if given (a registry may ignore
/// the filter: it is applied here too).
fn referrers_in(
    doc: &[u8],
    artifact_type: Option<&str>,
    url: &str,
) -> Result<Vec<Referrer>, Error> {
    let v: Value = serde_json::from_slice(doc).map_err(|e| Error::Protocol {
        url: url.to_owned(),
        reason: format!("referrers list: {e}"),
    })?;
    let mut out = Vec::new();
    for m in v["manifests"].as_array().into_iter().flatten() {
        let at = m["artifactType"].as_str().unwrap_or_default();
        if artifact_type.is_some_and(|want| want != at) {
            continue;
        }
        let (Some(d), Some(size)) = (m["digest"].as_str(), m["size"].as_u64()) else {
            continue;
        };
        let Ok(digest) = Digest::parse(d) else {
            continue;
        };
        let annotations = m["annotations"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Referrer {
            digest,
            size,
            artifact_type: at.to_owned(),
            annotations,
        });
    }
    Ok(out)
}

impl Client {
    /// The referrers API's list for `subject`: `Ok(None)` when the registry does not offer the
    /// API (404 without an index), so the caller uses the tag schema.
    async fn referrers_api(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Referrer>>, Error> {
        let _slot = self.slot(r.api_host()).await;
        let mut path = format!("/v2/{}/referrers/{subject}", r.repository);
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.push_str(&t.replace('+', "%2B"));
        }
        let resp = self
            .send(
                r.api_host(),
                &r.repository,
                Method::GET,
                &path,
                &[(ACCEPT, INDEX_MEDIA_TYPE.into())],
            )
            .await?;
        let url = resp.url().to_string();
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("referrers request answered {}", resp.status()),
            });
        }
        let doc = Self::read_document(resp, &url).await?;
        referrers_in(&doc, artifact_type, &url).map(Some)
    }

    /// The tag schema's list for `subject` (empty when the tag does not exist).
    async fn referrers_tag(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, Error> {
        match self.manifest(r, &tag_schema_tag(subject)).await {
            Ok((doc, _, _)) => referrers_in(&doc, artifact_type, &r.to_string()),
            Err(Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// The artifacts of `artifact_type` (all, if `None`) whose subject is manifest `subject` in
    /// `r`'s repository: through the referrers API, or the tag schema where the registry lacks
    /// it. Pull requests, so mirrors and pull-through caches are asked first.
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, Error> {
        match self.referrers_api(r, subject, artifact_type).await? {
            Some(list) => Ok(list),
            None => self.referrers_tag(r, subject, artifact_type).await,
        }
    }

    /// An artifact's manifest, checked: its digest, that it is an OCI manifest whose `subject`
    /// is `subject` (an attachment listed for one image but made for another is refused).
    pub async fn artifact_manifest(
        &self,
        r: &Reference,
        artifact: &Digest,
        subject: &Digest,
    ) -> Result<Value, Error> {
        let (doc, _, _) = self.manifest(r, artifact.as_str()).await?;
        let url = format!("{}@{artifact}", r.repository);
        let v: Value = serde_json::from_slice(&doc).map_err(|e| Error::Protocol {
            url: url.clone(),
            reason: format!("artifact manifest: {e}"),
        })?;
        if v["subject"]["digest"].as_str() != Some(subject.as_str()) {
            return Err(Error::Protocol {
                url,
                reason: format!("the artifact's subject is not {subject}"),
            });
        }
        Ok(v)
    }

    /// Attaches an artifact of `artifact_type` made of `blobs` to manifest `subject` (its
    /// digest, media type and size) in `r`'s repository; returns the artifact manifest's digest.
    /// On a registry without the referrers API, the tag-schema index is updated too.
    pub async fn attach(
        &self,
        r: &Reference,
        subject: (&Digest, &str, u64),
        artifact_type: &str,
        blobs: Vec<ArtifactBlob>,
        annotations: std::collections::BTreeMap<String, String>,
    ) -> Result<Digest, Error> {
        let (subject_digest, subject_media, subject_size) = subject;
        let empty = Digest::sha256(EMPTY);
        self.push_blob(r, &empty, Bytes::from_static(EMPTY)).await?;
        let mut layers = Vec::new();
        for b in blobs {
            let digest = Digest::sha256(&b.bytes);
            let size = b.bytes.len();
            self.push_blob(r, &digest, b.bytes).await?;
            let mut d =
                json!({"mediaType": b.media_type, "digest": digest.to_string(), "size": size});
            if !b.annotations.is_empty() {
                d["annotations"] = json!(b.annotations);
            }
            layers.push(d);
        }
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": empty.to_string(), "size": EMPTY.len()},
            "layers": layers,
            "subject": {"mediaType": subject_media, "digest": subject_digest.to_string(), "size": subject_size},
        });
        if !annotations.is_empty() {
            manifest["annotations"] = json!(annotations);
        }
        let bytes = Bytes::from(serde_json::to_vec(&manifest).unwrap_or_default());
        let size = bytes.len();
        let digest = Digest::sha256(&bytes);
        self.push_manifest(r, digest.as_str(), MANIFEST_MEDIA_TYPE, bytes)
            .await?;
        if self
            .referrers_api(r, subject_digest, Some(artifact_type))
            .await?
            .is_none()
        {
            let mut entry = json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": digest.to_string(),
                "size": size,
                "artifactType": artifact_type,
            });
            if !annotations.is_empty() {
                entry["annotations"] = json!(annotations);
            }
            self.add_to_tag_schema(r, subject_digest, entry).await?;
        }
        Ok(digest)
    }

    /// Adds `entry` to the tag-schema index of `subject` (created if missing; kept if listed).
    async fn add_to_tag_schema(
        &self,
        r: &Reference,
        subject: &Digest,
        entry: Value,
    ) -> Result<(), Error> {
        let tag = tag_schema_tag(subject);
        let mut index = match self.manifest(r, &tag).await {
            Ok((doc, _, _)) => serde_json::from_slice::<Value>(&doc).unwrap_or(Value::Null),
            Err(Error::NotFound { .. }) => Value::Null,
            Err(e) => return Err(e),
        };
        if !index["manifests"].is_array() {
            index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []});
        }
        let listed = index["manifests"]
            .as_array()
            .is_some_and(|m| m.iter().any(|d| d["digest"] == entry["digest"]));
        if listed {
            return Ok(());
        }
        if let Some(m) = index["manifests"].as_array_mut() {
            m.push(entry);
        }
        let bytes = Bytes::from(serde_json::to_vec(&index).unwrap_or_default());
        if bytes.len() > MAX_DOCUMENT {
            return Err(Error::Protocol {
                url: format!("{}:{tag}", r.repository),
                reason: "the referrers tag-schema index would pass the document size limit".into(),
            });
        }
        self.push_manifest(r, &tag, INDEX_MEDIA_TYPE, bytes).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_lists_are_filtered_and_malformed_entries_skipped() {
        let d = Digest::sha256(b"a");
        let doc = json!({"schemaVersion": 2, "manifests": [
            {"mediaType": MANIFEST_MEDIA_TYPE, "digest": d.to_string(), "size": 10, "artifactType": "x/y", "annotations": {"k": "v"}},
            {"mediaType": MANIFEST_MEDIA_TYPE, "digest": d.to_string(), "size": 10, "artifactType": "other"},
            {"mediaType": MANIFEST_MEDIA_TYPE, "digest": "not a digest", "size": 10, "artifactType": "x/y"},
            {"mediaType": MANIFEST_MEDIA_TYPE, "digest": d.to_string(), "artifactType": "x/y"},
        ]});
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        let got = referrers_in(&bytes, Some("x/y"), "u").unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].annotations.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            referrers_in(&bytes, None, "u").map(|v| v.len()).ok(),
            Some(2)
        );
        assert!(referrers_in(b"{", None, "u").is_err());
        assert_eq!(tag_schema_tag(&d), format!("sha256-{}", d.hex()));
    }
}
