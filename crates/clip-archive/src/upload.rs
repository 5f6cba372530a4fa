//! v1 archives in object storage: the data-carrying archive uploaded as one object
//! (`s3://BUCKET/KEY`, or `file:///DIR/KEY`), and a small v1-remote metadata archive (the same
//! index, no data, the object's URL, size and where its data region starts) pointing at it.
//! Uploads are multipart and abort on any error, and the metadata archive is published only
//! after the object is complete and its size checked.

use std::path::Path;

use clip_format::{Archive, ArchiveKind, WriteSummary, write_v1_remote};
use clip_objstore::{RemoteObject, RemoteOptions};

use crate::{Error, Result};

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
/// checked. `runtime` drives the upload (a runtime the caller shares across its work).
pub fn upload_v1(
    runtime: &tokio::runtime::Handle,
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
    let bytes = archive.as_bytes();
    runtime.block_on(object.upload(bytes, progress))?;
    let size = runtime.block_on(object.size())?;
    if size != bytes.len() as u64 {
        return Err(Error::UploadSize {
            url: url.to_owned(),
            sent: bytes.len() as u64,
            size,
        });
    }
    let metadata = write_v1_remote(&archive, url, out)?;
    Ok(UploadSummary {
        url: url.to_owned(),
        uploaded: size,
        metadata,
    })
}
