//! Registry → OCI image layout (what `skopeo copy docker://REF oci:DIR:TAG` does): the input of
//! the v1 path when it starts from a registry.

use std::io::Write as _;
use std::path::Path;

use clip_format::Digest;
use sha2::{Digest as _, Sha256};

use crate::client::{Client, ResolvedImage};
use crate::{Error, Reference, oci};

/// Largest config blob accepted.
const MAX_CONFIG: usize = 4 << 20;

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io {
        context,
        path,
        source,
    }
}

/// Writes `bytes` as blob `digest` of the layout (temp file, then rename).
fn put_blob(dir: &Path, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
    let path = dir.join(digest.blob_path());
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io_err("writing", &path))
}

impl Client {
    /// Copies the platform image `r` names into the OCI layout `dir` under `tag` (created if
    /// needed; blobs already present are kept). Layers download concurrently (bounded by the
    /// per-host limit), each streamed to disk and verified against its digest before it is
    /// renamed into place; the layout's `index.json` is written last. `progress` counts the
    /// layer bytes downloaded.
    pub async fn pull_layout(
        &self,
        r: &Reference,
        platform: Option<&oci::Platform>,
        dir: &Path,
        tag: &str,
        progress: Option<&std::sync::atomic::AtomicU64>,
    ) -> Result<ResolvedImage, Error> {
        let image = self.resolve(r, platform).await?;
        let (manifest_bytes, media, digest) =
            self.manifest(r, image.manifest_digest.as_str()).await?;
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io_err("creating", dir))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io_err("writing", dir))?;
        let config_digest = oci::digest(image.manifest.config())?;
        let config = self
            .blob_bytes(&image.reference, &config_digest, MAX_CONFIG)
            .await?;
        put_blob(dir, &config_digest, &config)?;
        let mut layers = Vec::new();
        let mut urls = Vec::new();
        for l in image.manifest.layers() {
            let d = oci::digest(l)?;
            // An image may use one blob for several layers: fetch it once.
            if !layers.iter().any(|(have, _)| *have == d) {
                layers.push((d, l.size()));
                urls.push(l.urls().clone().unwrap_or_default());
            }
        }
        let pulls = layers
            .iter()
            .map(|(d, size)| self.pull_blob(&image.reference, d, *size, dir, progress));
        for ((r, (d, _)), urls) in futures_util::future::join_all(pulls)
            .await
            .into_iter()
            .zip(&layers)
            .zip(urls)
        {
            match r {
                // A non-distributable layer the registry does not hold: said as such.
                Err(Error::NotFound { .. }) if !urls.is_empty() => {
                    return Err(Error::ForeignLayer {
                        digest: d.clone(),
                        host: image.reference.registry.clone(),
                        urls,
                    });
                }
                r => r?,
            }
        }
        put_blob(dir, &digest, &manifest_bytes)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": if media.is_empty() {
                    image.manifest.media_type().as_ref().map(ToString::to_string).unwrap_or_default()
                } else {
                    media
                },
                "digest": digest,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        let index_path = dir.join("index.json");
        let tmp = dir.join("index.json.partial");
        std::fs::write(&tmp, index.to_string())
            .and_then(|()| std::fs::rename(&tmp, &index_path))
            .map_err(io_err("writing", &index_path))?;
        Ok(image)
    }

    async fn pull_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        dir: &Path,
        progress: Option<&std::sync::atomic::AtomicU64>,
    ) -> Result<(), Error> {
        let path = dir.join(digest.blob_path());
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let tmp = path.with_extension(format!(
            "partial.{}.{}",
            std::process::id(),
            PARTIAL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?,
        );
        let mut hasher = Sha256::new();
        let mut write_error = None;
        // Big layers come as parallel ranges (see `blob_reader_sized`).
        let mut chunks = self.blob_chunks(&tokio::runtime::Handle::current(), r, digest, size);
        let got: Result<u64, Error> = async {
            let mut n = 0u64;
            while let Some(chunk) = chunks.recv().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                if let Some(p) = progress {
                    p.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                hasher.update(&chunk);
                if let Err(e) = file.write_all(&chunk) {
                    write_error = Some(e);
                    break;
                }
            }
            Ok(n)
        }
        .await;
        let result = (|| {
            let n = got?;
            if let Some(e) = write_error {
                return Err(io_err("writing", &tmp)(e));
            }
            file.flush().map_err(io_err("writing", &tmp))?;
            digest.check(
                format!("layer blob ({n} of {size} bytes)"),
                Digest::of_hasher(hasher),
            )?;
            if n != size {
                return Err(Error::Protocol {
                    url: format!("{r} blob {digest}"),
                    reason: format!("{n} bytes where the manifest says {size}"),
                });
            }
            std::fs::rename(&tmp, &path).map_err(io_err("publishing", &path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Makes the names of concurrent partial downloads unique within the process.
static PARTIAL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
