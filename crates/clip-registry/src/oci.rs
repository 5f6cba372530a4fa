//! OCI image-spec documents, as `oci-spec` models them, and the few things clip asks of them.
//!
//! Manifests, indexes (Docker manifest lists too), image configs, descriptors, platforms and
//! media types are `oci-spec`'s types, parsed from untrusted JSON under size limits by the
//! client. This module adds what clip needs on top: turning a descriptor's digest into a
//! verifiable [`Digest`], choosing a platform, and reading an image config into the archive's
//! [`clip_format::ImageConfig`].

pub use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex as Index, ImageManifest as Manifest,
    MediaType, Os, Platform,
};

use clip_format::Digest;

use crate::Error;

/// Media type of a Docker manifest list (OCI calls it an image index).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Media type of a Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What a media type names, as far as clip cares: the one classifier every crate asks (the
/// indexer, the TOC readers, the snapshotter, index on push).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// An image index or a Docker manifest list.
    Index,
    /// An image manifest (OCI, or Docker schema 2).
    Manifest,
    /// A layer: a tar stream, compressed as said.
    Layer(Compression),
    /// Anything else (configs, artifacts, encrypted or foreign layers clip cannot read).
    Other,
}

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (eStargz too).
    Gzip,
    /// zstd (zstd:chunked too).
    Zstd,
}

impl MediaKind {
    /// Classifies `media`.
    #[must_use]
    pub fn of(media: &MediaType) -> Self {
        match media {
            MediaType::ImageIndex => Self::Index,
            MediaType::ImageManifest => Self::Manifest,
            #[allow(deprecated)]
            MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => {
                Self::Layer(Compression::None)
            }
            #[allow(deprecated)]
            MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
                Self::Layer(Compression::Gzip)
            }
            #[allow(deprecated)]
            MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
                Self::Layer(Compression::Zstd)
            }
            other => Self::of_str(other.as_ref()),
        }
    }

    /// Classifies a media type given as text (a descriptor's field, a notification's). Media
    /// types are compared exactly, as registries and runtimes do.
    #[must_use]
    #[allow(clippy::case_sensitive_file_extension_comparisons)]
    pub fn of_str(media: &str) -> Self {
        match media {
            "application/vnd.oci.image.index.v1+json" | DOCKER_MANIFEST_LIST => Self::Index,
            "application/vnd.oci.image.manifest.v1+json" | DOCKER_MANIFEST => Self::Manifest,
            // Docker's rootfs.diff.tar[.gzip] (and the foreign variant), the OCI tar[+gzip|+zstd]
            // types and their non-distributable forms: a tar stream with a known compression.
            // Anything else (`+encrypted`, a custom suffix) is not a layer clip reads.
            m if m.starts_with("application/vnd.oci.image.layer.")
                || m.starts_with("application/vnd.docker.image.rootfs.") =>
            {
                if m.ends_with(".tar") {
                    Self::Layer(Compression::None)
                } else if m.ends_with(".tar+gzip") || m.ends_with(".tar.gzip") {
                    Self::Layer(Compression::Gzip)
                } else if m.ends_with(".tar+zstd") || m.ends_with(".tar.zstd") {
                    Self::Layer(Compression::Zstd)
                } else {
                    Self::Other
                }
            }
            _ => Self::Other,
        }
    }

    /// The compression of a layer type (`None` for anything that is not a layer clip reads).
    #[must_use]
    pub fn layer(self) -> Option<Compression> {
        match self {
            Self::Layer(c) => Some(c),
            _ => None,
        }
    }
}

/// Whether `media` names an image index or a Docker manifest list.
#[must_use]
pub fn is_index(media: &MediaType) -> bool {
    MediaKind::of(media) == MediaKind::Index
}

/// The descriptor's digest as one clip can verify (sha256 or sha512); any other algorithm is
/// an error naming it.
pub fn digest(d: &Descriptor) -> Result<Digest, Error> {
    Digest::parse(d.digest().as_ref()).map_err(|e| Error::Unsupported(format!("descriptor: {e}")))
}

/// A descriptor's annotation.
#[must_use]
pub fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations().as_ref()?.get(key).map(String::as_str)
}

/// Parses `os/arch[/variant]` (`linux/arm64/v8`).
#[must_use]
pub fn parse_platform(s: &str) -> Option<Platform> {
    let mut p = s.split('/');
    let os = p.next().filter(|x| !x.is_empty())?;
    let arch = p.next().filter(|x| !x.is_empty())?;
    let variant = p.next().filter(|x| !x.is_empty());
    if p.next().is_some() {
        return None;
    }
    let mut b = oci_spec::image::PlatformBuilder::default()
        .os(Os::from(os))
        .architecture(Arch::from(arch));
    if let Some(v) = variant {
        b = b.variant(v);
    }
    b.build().ok()
}

/// The platform of this machine, in OCI names.
#[must_use]
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    let mut p = Platform::default();
    p.set_os(Os::Linux);
    p.set_architecture(Arch::from(arch));
    p
}

/// Whether `offered` (what an index entry says) satisfies `want` (os and architecture equal; the
/// variant too when `want` names one).
#[must_use]
pub fn platform_matches(offered: &Platform, want: &Platform) -> bool {
    offered.os() == want.os()
        && offered.architecture() == want.architecture()
        && (want.variant().is_none() || offered.variant() == want.variant())
}

/// The entry of `index` for platform `want` (the first that matches; attestation manifests,
/// whose platform is `unknown/unknown`, never do).
#[must_use]
pub fn select_platform<'a>(index: &'a Index, want: &Platform) -> Option<&'a Descriptor> {
    index.manifests().iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| platform_matches(p, want))
    })
}

/// `os/arch[/variant]`, for messages.
#[must_use]
pub fn platform_name(p: &Platform) -> String {
    match p.variant() {
        Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
        None => format!("{}/{}", p.os(), p.architecture()),
    }
}

/// The runtime configuration an archive keeps, from an image config.
#[must_use]
pub fn image_config(c: &ImageConfiguration) -> clip_format::ImageConfig {
    let run = c.config().clone().unwrap_or_default();
    let labels = run
        .labels()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    clip_format::ImageConfig {
        os: c.os().to_string(),
        architecture: c.architecture().to_string(),
        variant: c.variant().clone(),
        env: run.env().clone().unwrap_or_default(),
        entrypoint: run.entrypoint().clone().unwrap_or_default(),
        cmd: run.cmd().clone().unwrap_or_default(),
        user: run.user().clone().unwrap_or_default(),
        working_dir: run.working_dir().clone().unwrap_or_default(),
        labels,
        exposed_ports: run.exposed_ports().clone().unwrap_or_default(),
        volumes: run.volumes().clone().unwrap_or_default(),
        stop_signal: run.stop_signal().clone().unwrap_or_default(),
    }
}

/// The image config's `diff_ids`, each a digest clip can verify.
pub fn diff_ids(c: &ImageConfiguration) -> Result<Vec<Digest>, Error> {
    c.rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| Error::Unsupported(format!("diff_id: {e}"))))
        .collect()
}

#[cfg(test)]
mod media_tests {
    use super::{Compression, MediaKind, MediaType};

    #[test]
    fn media_types_are_classified_once() {
        for (m, k) in [
            (
                "application/vnd.oci.image.layer.v1.tar",
                MediaKind::Layer(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                MediaKind::Layer(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                MediaKind::Layer(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                MediaKind::Layer(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                MediaKind::Layer(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                MediaKind::Layer(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                MediaKind::Other,
            ),
            ("application/vnd.oci.image.config.v1+json", MediaKind::Other),
            (
                "application/vnd.docker.distribution.manifest.list.v2+json",
                MediaKind::Index,
            ),
            ("application/vnd.oci.image.index.v1+json", MediaKind::Index),
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                MediaKind::Manifest,
            ),
            ("text/plain", MediaKind::Other),
        ] {
            assert_eq!(MediaKind::of_str(m), k, "{m}");
            assert_eq!(MediaKind::of(&MediaType::from(m)), k, "{m}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let arm = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!(platform_name(&arm), "linux/arm64/v8");
        assert!(parse_platform("linux").is_none() && parse_platform("a/b/c/d").is_none());
        let any_arm = parse_platform("linux/arm64").unwrap();
        assert!(platform_matches(&arm, &any_arm));
        assert!(!platform_matches(&any_arm, &arm));
        assert_eq!(host_platform().os(), &Os::Linux);
    }

    #[test]
    fn docker_and_oci_documents_parse() {
        let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],
            "ExposedPorts":{"80/tcp":{}},"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":
            ["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]},
            "container_config":{"Hostname":"x"},"docker_version":"20"}"#;
        let c: ImageConfiguration = serde_json::from_slice(config).unwrap();
        let ic = image_config(&c);
        assert_eq!(ic.cmd, ["sh"]);
        assert_eq!(ic.exposed_ports, ["80/tcp"]);
        assert_eq!(diff_ids(&c).unwrap().len(), 1);
        let list =
            format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        let i: Index = serde_json::from_str(&list).unwrap();
        assert!(is_index(i.media_type().as_ref().unwrap()));
    }
}
