//! Registry → OCI image layout (what `skopeo copy docker://REF oci:DIR:TAG` does): the input of
//! the v1 path when it starts from a registry.

use std::io::Write as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::client::{Client, ResolvedImage};
use crate::{Error, Platform, Reference};

/// Largest config blob accepted.
const MAX_CONFIG: usize = 4 << 20;

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::Config(format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` as blob `digest` of the layout (temp file, then rename).
fn put_blob(dir: &Path, digest: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = blob_path(dir, digest)?;
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| io_err("writing", &path, &e))
}

fn blob_path(dir: &Path, digest: &str) -> Result<std::path::PathBuf, Error> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Config(format!("unsupported digest {digest:?}")))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

impl Client {
    /// Copies the platform image `r` names into the OCI layout `dir` under `tag` (created if
    /// needed; blobs already present are kept). Layers download concurrently (bounded by the
    /// per-host limit), each streamed to disk and verified against its digest before it is
    /// renamed into place; the layout's `index.json` is written last.
    pub async fn pull_layout(
        &self,
        r: &Reference,
        platform: Option<&Platform>,
        dir: &Path,
        tag: &str,
    ) -> Result<ResolvedImage, Error> {
        let image = self.resolve(r, platform).await?;
        let (manifest_bytes, media, digest) = self.manifest(r, &image.manifest_digest).await?;
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .map_err(|e| io_err("creating", dir, &e))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| io_err("writing", dir, &e))?;
        let config = self
            .blob_bytes(&image.reference, &image.manifest.config.digest, MAX_CONFIG)
            .await?;
        put_blob(dir, &image.manifest.config.digest, &config)?;
        let pulls = image
            .manifest
            .layers
            .iter()
            .map(|l| self.pull_blob(&image.reference, &l.digest, l.size, dir));
        for r in futures_util::future::join_all(pulls).await {
            r?;
        }
        put_blob(dir, &digest, &manifest_bytes)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": if media.is_empty() { image.manifest.media_type.clone() } else { media },
                "digest": digest,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        let index_path = dir.join("index.json");
        let tmp = dir.join("index.json.partial");
        std::fs::write(&tmp, index.to_string())
            .and_then(|()| std::fs::rename(&tmp, &index_path))
            .map_err(|e| io_err("writing", &index_path, &e))?;
        Ok(image)
    }

    async fn pull_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        dir: &Path,
    ) -> Result<(), Error> {
        let path = blob_path(dir, digest)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let tmp = path.with_extension(format!("partial.{}", std::process::id()));
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(|e| io_err("creating", &tmp, &e))?,
        );
        let mut hasher = Sha256::new();
        let mut write_error = None;
        let _slot = self.slot(r.api_host()).await;
        let got = self
            .blob_stream(r, digest, |chunk| {
                hasher.update(&chunk);
                match file.write_all(&chunk) {
                    Ok(()) => true,
                    Err(e) => {
                        write_error = Some(e);
                        false
                    }
                }
            })
            .await;
        let result = (|| {
            let n = got?;
            if let Some(e) = write_error {
                return Err(io_err("writing", &tmp, &e));
            }
            file.flush().map_err(|e| io_err("writing", &tmp, &e))?;
            let found = format!("sha256:{}", hex::encode(hasher.finalize()));
            if found != digest || n != size {
                return Err(Error::Digest {
                    what: format!("layer blob ({n} of {size} bytes)"),
                    expected: digest.into(),
                    found,
                });
            }
            std::fs::rename(&tmp, &path).map_err(|e| io_err("publishing", &path, &e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
