//! Configuration and the v1/v2 decisions.
//!
//! # Model
//!
//! Configuration comes from defaults, then the YAML file's `imageService:` section, then the
//! environment (`CLIP_VERSION`, `B9_BUILD_REGISTRY`, `CLIP_CACHE_DIR`,
//! `CLIP_V2_ROLLOUT_PERCENT`): env > file > defaults.
//! Decisions are pure functions of that configuration and of observed facts (is the build
//! registry reachable? did the push or the index fail?), implementing the seed's behaviour matrix:
//!
//! | flow  | clipVersion | build registry      | what happens                                 |
//! |-------|-------------|---------------------|----------------------------------------------|
//! | pull  | 2           | –                   | index straight from the source registry (v2) |
//! | pull  | 1 (default) | –                   | copy, extract, archive (v1)                  |
//! | build | 2           | reachable           | push to it, index from it (v2)               |
//! | build | 2           | down / not set      | v1, with the reason logged                   |
//! | build | 1           | –                   | extract, archive (v1)                        |
//!
//! Any v2 failure (push, index) falls back to v1 with its reason: builds never fail because of v2.
//!
//! ```
//! use clip_policy::{BuildPlan, Config, RegistryProbe, build_plan};
//! let cfg = Config::from_yaml("imageService:\n  clipVersion: 2\n").unwrap();
//! assert_eq!(cfg.clip_version, 2);
//! assert_eq!(cfg.build_registry, "localhost:5000");
//! let plan = build_plan(&cfg, "img", &RegistryProbe::Unreachable("connection refused".into()));
//! assert!(matches!(plan, BuildPlan::V1 { .. }));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or has wrong types.
    #[error("invalid configuration: {0}")]
    Yaml(String),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Credentials and transport settings of one registry. Its `Debug` output never shows the
/// password.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryEntry {
    /// User name.
    pub username: Option<String>,
    /// Password or token.
    pub password: Option<String>,
    /// Reach it over plain HTTP when it does not speak TLS.
    pub insecure: bool,
    /// A PEM file of CA certificates trusted for this registry only (beside certs.d).
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate to present to it (mutual TLS); with `clientKey`.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    pub client_key: Option<PathBuf>,
}

impl std::fmt::Debug for RegistryEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryEntry")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("insecure", &self.insecure)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

/// S3 settings of the archive store. Its `Debug` output never shows the secret key.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Store {
    /// Bucket.
    pub bucket: String,
    /// Key prefix.
    pub prefix: String,
    /// Endpoint URL (S3-compatible servers).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Access key id (default: the AWS environment).
    pub access_key_id: Option<String>,
    /// Secret access key (default: the AWS environment).
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where `<id>.clip` archives live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveStore {
    /// A local directory (the embedded default).
    Local(PathBuf),
    /// An S3 bucket.
    S3(S3Store),
}

/// The `imageService:` section (keys as the seed spells them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// 1 (default) or 2.
    pub clip_version: u8,
    /// Where built images are pushed for v2 indexing (default `localhost:5000`).
    pub build_registry: String,
    /// Whether `build_registry` came from the file or the environment (not the default).
    pub build_registry_configured: bool,
    /// Uncompressed MiB between checkpoints.
    pub checkpoint_mib: u64,
    /// Archive store.
    pub archive_store: ArchiveStore,
    /// Span cache directory.
    pub cache_dir: PathBuf,
    /// Span cache bound.
    pub cache_size_gib: u64,
    /// Percentage of the span cache's filesystem to keep free (default 10).
    pub cache_min_free_percent: u8,
    /// Where images are mounted.
    pub mount_base: PathBuf,
    /// Registries by host (`docker` means Docker Hub).
    pub registries: BTreeMap<String, RegistryEntry>,
    /// certs.d roots (`HOST[:PORT]/*.crt`, `*.cert` + `*.key`); default
    /// `/etc/containers/certs.d` and `/etc/docker/certs.d`.
    pub certs_dirs: Option<Vec<PathBuf>>,
    /// containers-registries.conf naming mirrors (default `/etc/containers/registries.conf`,
    /// if present).
    pub registries_conf: Option<PathBuf>,
    /// With clipVersion 2: the share of images (by a stable hash of the image id) that use v2;
    /// the rest use v1 (the seed's gradual rollout, 25 → 50 → 75 → 100). Default 100.
    pub clip_v2_rollout_percent: u8,
    /// Where build contexts named by a host path must live (`POST /v1/build` with `context`);
    /// `None`: host paths are refused and contexts must be uploaded.
    pub build_context_root: Option<PathBuf>,
    /// Index images when a registry reports their push (`POST /v1/registry-events`); `None`:
    /// events are refused.
    pub index_on_push: Option<IndexOnPush>,
    /// Seconds of a v2 image's first lazy run on any worker that are recorded as its prefetch
    /// profile and published beside its archive (every later mount prefetches it); 0: profiles
    /// are neither recorded nor used. Default 30.
    pub profile_window_secs: u64,
    /// After a v2 build, run the image's command for at most this many seconds in a sandbox
    /// (a container without network) to record and publish its prefetch profile before any
    /// worker pulls it, as stargz's `optimize` does but on the unmodified image; 0 (default):
    /// off.
    pub profile_at_build_secs: u64,
    /// The fleet's shared span store (`spanStore: {s3: …}`): v2 mounts read spans from it
    /// before the registry and upload what they fetched; `None` (default): off.
    pub span_store: Option<S3Store>,
    /// The private key (`clip keygen`) that signs what this node writes to a shared archive
    /// store (archives, layer indexes); `None`: it writes unsigned objects.
    pub signing_key: Option<PathBuf>,
    /// Public keys (`clip-ed25519 BASE64 [comment]`, or a path to a file of them, one per
    /// line) whose signatures this node accepts on archives and layer indexes from a shared
    /// store; the signing key's own is always accepted.
    pub trusted_keys: Vec<String>,
    /// Accept unsigned archives and layer indexes from a shared store (a fleet from before
    /// signatures). Off by default: anyone with the bucket's write keys could then rewrite
    /// every image's files.
    pub allow_unsigned: bool,
}

/// `indexOnPush:` — which pushed images to index ahead of any pull.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexOnPush {
    /// Repository patterns (`team/*`, `registry.example.com/app`, `*`); `*` matches any run of
    /// characters. A pattern without a host matches the repository on any registry.
    pub repositories: Vec<String>,
    /// Platforms (`os/arch[/variant]`) to index from multi-platform images; empty: this
    /// machine's.
    pub platforms: Vec<String>,
    /// The registries (`HOST[:PORT]`, as events name them) whose notifications are taken; an
    /// event about any other host is ignored, so a forged event cannot send the worker to a
    /// registry of the sender's choosing. Required.
    pub registries: Vec<String>,
    /// A file of secrets (one per line, at least 16 characters) the registry's notification
    /// endpoint sends as `Authorization: Bearer SECRET`: the webhook's own credential, so the
    /// registry's configuration never holds the API's root-equivalent token. Required to serve
    /// `POST /v1/registry-events`.
    #[serde(rename = "secretFile")]
    pub secret_file: Option<PathBuf>,
    /// Attach what is indexed to the image in its registry (its layer indexes as an OCI 1.1
    /// artifact whose subject is the platform manifest, signed with `signingKey` where one is
    /// configured), so that every node and worker finds them. Needs push access to the
    /// repository.
    pub attach: bool,
}

impl IndexOnPush {
    /// Whether `host` is one of the registries whose events are taken.
    #[must_use]
    pub fn trusts_host(&self, host: &str) -> bool {
        self.registries.iter().any(|r| r.eq_ignore_ascii_case(host))
    }

    /// Whether `repository` on `host` is one to index.
    #[must_use]
    pub fn wants(&self, host: &str, repository: &str) -> bool {
        let full = format!("{host}/{repository}");
        self.repositories
            .iter()
            .any(|p| glob(p, repository) || glob(p, &full))
    }
}

/// `*` matches any run of characters (none included); everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            clip_version: 1,
            build_registry: "localhost:5000".into(),
            build_registry_configured: false,
            checkpoint_mib: 4,
            archive_store: ArchiveStore::Local(PathBuf::from("/images")),
            cache_dir: PathBuf::from("/images/cache"),
            cache_size_gib: 20,
            cache_min_free_percent: 10,
            mount_base: PathBuf::from("/images/mnt"),
            registries: BTreeMap::new(),
            certs_dirs: None,
            registries_conf: None,
            clip_v2_rollout_percent: 100,
            build_context_root: None,
            index_on_push: None,
            profile_window_secs: 30,
            profile_at_build_secs: 0,
            span_store: None,
            signing_key: None,
            trusted_keys: Vec::new(),
            allow_unsigned: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct File {
    image_service: Option<Section>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct Section {
    clip_version: Option<u8>,
    build_registry: Option<String>,
    #[serde(rename = "checkpointMiB")]
    checkpoint_mib: Option<u64>,
    archive_store: Option<StoreSection>,
    cache_dir: Option<PathBuf>,
    #[serde(rename = "cacheSizeGiB")]
    cache_size_gib: Option<u64>,
    cache_min_free_percent: Option<u8>,
    mount_base: Option<PathBuf>,
    registries: BTreeMap<String, RegistryEntry>,
    certs_dirs: Option<Vec<PathBuf>>,
    registries_conf: Option<PathBuf>,
    #[serde(rename = "clipV2RolloutPercent")]
    clip_v2_rollout_percent: Option<u8>,
    build_context_root: Option<PathBuf>,
    index_on_push: Option<IndexOnPush>,
    profile_window_secs: Option<u64>,
    profile_at_build_secs: Option<u64>,
    span_store: Option<SpanStoreSection>,
    signing_key: Option<PathBuf>,
    trusted_keys: Vec<String>,
    allow_unsigned: Option<bool>,
}

/// `spanStore:` as written: `s3` (the only backend a fleet shares).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SpanStoreSection {
    s3: Option<S3Store>,
}

/// `archiveStore:` as written: exactly one of `local` and `s3`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StoreSection {
    local: Option<PathBuf>,
    s3: Option<S3Store>,
}

impl StoreSection {
    fn into_store(self) -> Result<ArchiveStore, Error> {
        match (self.local, self.s3) {
            (Some(dir), None) => Ok(ArchiveStore::Local(dir)),
            (None, Some(s3)) if !s3.bucket.is_empty() => Ok(ArchiveStore::S3(s3)),
            (None, Some(_)) => Err(Error::Invalid("archiveStore.s3 needs a bucket".into())),
            _ => Err(Error::Invalid(
                "archiveStore takes exactly one of `local` and `s3`".into(),
            )),
        }
    }
}

impl Config {
    /// Parses a configuration file's text (defaults for what it leaves out; no environment).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| Error::Yaml(e.to_string()))?;
        let s = file.image_service.unwrap_or_default();
        let d = Self::default();
        let cfg = Self {
            clip_version: s.clip_version.unwrap_or(d.clip_version),
            build_registry_configured: s.build_registry.is_some(),
            build_registry: s.build_registry.unwrap_or(d.build_registry),
            checkpoint_mib: s.checkpoint_mib.unwrap_or(d.checkpoint_mib),
            archive_store: match s.archive_store {
                Some(store) => store.into_store()?,
                None => d.archive_store,
            },
            cache_dir: s.cache_dir.unwrap_or(d.cache_dir),
            cache_size_gib: s.cache_size_gib.unwrap_or(d.cache_size_gib),
            cache_min_free_percent: s.cache_min_free_percent.unwrap_or(d.cache_min_free_percent),
            mount_base: s.mount_base.unwrap_or(d.mount_base),
            registries: s.registries,
            certs_dirs: s.certs_dirs,
            registries_conf: s.registries_conf,
            clip_v2_rollout_percent: s
                .clip_v2_rollout_percent
                .unwrap_or(d.clip_v2_rollout_percent),
            build_context_root: s.build_context_root,
            index_on_push: s.index_on_push,
            profile_window_secs: s.profile_window_secs.unwrap_or(d.profile_window_secs),
            profile_at_build_secs: s.profile_at_build_secs.unwrap_or(d.profile_at_build_secs),
            span_store: match s.span_store {
                None => None,
                Some(SpanStoreSection { s3: Some(s3) }) if !s3.bucket.is_empty() => Some(s3),
                Some(_) => return Err(Error::Invalid("spanStore needs s3 with a bucket".into())),
            },
            signing_key: s.signing_key,
            trusted_keys: s.trusted_keys,
            allow_unsigned: s.allow_unsigned.unwrap_or(d.allow_unsigned),
        };
        cfg.validate()
    }

    /// Loads `path` (if given) and applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let base = match path {
            Some(p) => {
                Self::from_yaml(&std::fs::read_to_string(p).map_err(|source| Error::Read {
                    path: p.to_owned(),
                    source,
                })?)?
            }
            None => Self::default(),
        };
        base.with_env(|k| std::env::var(k).ok())
    }

    /// Applies overrides from an environment (`CLIP_VERSION`, `B9_BUILD_REGISTRY`,
    /// `CLIP_CACHE_DIR`); `get` looks a variable up.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        if let Some(v) = get("CLIP_VERSION").filter(|v| !v.is_empty()) {
            self.clip_version = v
                .trim()
                .parse()
                .ok()
                .filter(|n| matches!(n, 1 | 2))
                .ok_or_else(|| Error::Invalid(format!("CLIP_VERSION={v:?} is not 1 or 2")))?;
        }
        if let Some(r) = get("B9_BUILD_REGISTRY").filter(|v| !v.is_empty()) {
            self.build_registry = r;
            self.build_registry_configured = true;
        }
        if let Some(v) = get("CLIP_V2_ROLLOUT_PERCENT").filter(|v| !v.is_empty()) {
            self.clip_v2_rollout_percent =
                v.trim().parse().ok().filter(|p| *p <= 100).ok_or_else(|| {
                    Error::Invalid(format!("CLIP_V2_ROLLOUT_PERCENT={v:?} is not 0..=100"))
                })?;
        }
        if let Some(d) = get("CLIP_CACHE_DIR").filter(|v| !v.is_empty()) {
            self.cache_dir = PathBuf::from(d);
        }
        self.validate()
    }

    fn validate(self) -> Result<Self, Error> {
        if !matches!(self.clip_version, 1 | 2) {
            return Err(Error::Invalid(format!(
                "clipVersion must be 1 or 2, not {}",
                self.clip_version
            )));
        }
        if self.clip_v2_rollout_percent > 100 {
            return Err(Error::Invalid(
                "clipV2RolloutPercent must be 0..=100".into(),
            ));
        }
        if self.cache_min_free_percent > 90 {
            return Err(Error::Invalid("cacheMinFreePercent must be 0..=90".into()));
        }
        for (host, e) in &self.registries {
            if e.client_cert.is_some() != e.client_key.is_some() {
                return Err(Error::Invalid(format!(
                    "registries.{host}: clientCert and clientKey go together"
                )));
            }
        }
        if self.checkpoint_mib == 0 || self.checkpoint_mib > 1024 {
            return Err(Error::Invalid("checkpointMiB must be 1..=1024".into()));
        }
        if let Some(p) = &self.index_on_push
            && p.registries.is_empty()
        {
            return Err(Error::Invalid(
                "indexOnPush.registries must name the registries (HOST[:PORT]) whose notifications are taken".into(),
            ));
        }
        Ok(self)
    }

    /// The registry entry for `host` (`docker` also answers for Docker Hub's hosts).
    #[must_use]
    pub fn registry(&self, host: &str) -> Option<&RegistryEntry> {
        self.registries.get(host).or_else(|| {
            matches!(
                host,
                "docker.io" | "index.docker.io" | "registry-1.docker.io"
            )
            .then(|| self.registries.get("docker"))
            .flatten()
        })
    }
}

/// What probing the build registry found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryProbe {
    /// `/v2/` answered.
    Reachable,
    /// It did not answer (the reason, e.g. "connection refused").
    Unreachable(String),
}

/// How a pull is archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullPlan {
    /// v2: index straight from the source registry.
    IndexFromRegistry,
    /// v1: copy, extract, archive.
    CopyAndArchive,
}

/// How a build is archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildPlan {
    /// v2: push to `registry`, index from it.
    PushAndIndex {
        /// The build registry.
        registry: String,
    },
    /// v1, because of `reason` (`None`: v1 was configured).
    V1 {
        /// Why v2 was not used.
        reason: Option<RegistryDown>,
    },
}

/// Why a v2 build cannot push: the build registry did not answer the probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryDown {
    /// No build registry was configured and the default one is not answering.
    #[error(
        "no registry configured (set imageService.buildRegistry or B9_BUILD_REGISTRY; the default {default} is not answering: {why})"
    )]
    NotConfigured {
        /// The default that was probed.
        default: String,
        /// What the probe found.
        why: String,
    },
    /// The configured build registry is not answering.
    #[error("build registry {registry} is unreachable: {why}")]
    Unreachable {
        /// The configured registry.
        registry: String,
        /// What the probe found.
        why: String,
    },
}

/// A size that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size (bytes, or a number with K, M, G or T: powers of 1024)")]
pub struct SizeError(pub String);

/// A size as people write it on a command line: `1048576`, `512K`, `64M`, `10G`, `1T`
/// (powers of 1024; `KiB`, `MB` and lower case too). The one parser every clip program uses.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(SizeError(s.to_owned())),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| SizeError(s.to_owned()))
}

/// Whether image `image_id` is inside the v2 rollout: a stable hash (FNV-1a) of the id, mod
/// 100, under `clipV2RolloutPercent` — the same answer on every worker, every time.
#[must_use]
pub fn in_v2_rollout(cfg: &Config, image_id: &str) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in image_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % 100 < u64::from(cfg.clip_v2_rollout_percent)
}

/// The pull row of the behaviour matrix (with the rollout applied to `image_id`).
#[must_use]
pub fn pull_plan(cfg: &Config, image_id: &str) -> PullPlan {
    if cfg.clip_version == 2 && in_v2_rollout(cfg, image_id) {
        PullPlan::IndexFromRegistry
    } else {
        PullPlan::CopyAndArchive
    }
}

/// The build rows of the behaviour matrix (with the rollout applied to `image_id`).
#[must_use]
pub fn build_plan(cfg: &Config, image_id: &str, probe: &RegistryProbe) -> BuildPlan {
    if cfg.clip_version != 2 || !in_v2_rollout(cfg, image_id) {
        return BuildPlan::V1 { reason: None };
    }
    match probe {
        RegistryProbe::Reachable => BuildPlan::PushAndIndex {
            registry: cfg.build_registry.clone(),
        },
        RegistryProbe::Unreachable(why) if !cfg.build_registry_configured => BuildPlan::V1 {
            reason: Some(RegistryDown::NotConfigured {
                default: cfg.build_registry.clone(),
                why: why.clone(),
            }),
        },
        RegistryProbe::Unreachable(why) => BuildPlan::V1 {
            reason: Some(RegistryDown::Unreachable {
                registry: cfg.build_registry.clone(),
                why: why.clone(),
            }),
        },
    }
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_one_way_everywhere() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "K", "1.5G", "-1", "10X", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FULL: &str = r#"
imageService:
  clipVersion: 2
  buildRegistry: registry.internal:5000
  checkpointMiB: 8
  archiveStore:
    s3: {bucket: images, prefix: clip/, endpoint: "http://127.0.0.1:9000", region: us-east-1, forcePathStyle: true}
  cacheDir: /var/cache/clip
  cacheSizeGiB: 50
  mountBase: /run/clip
  registries:
    docker: {username: u, password: p}
    "registry.example.com:5000": {username: a, password: b, insecure: true}
    "private.example.com": {caFile: /etc/clip/ca.pem, clientCert: /etc/clip/c.pem, clientKey: /etc/clip/c.key}
  certsDirs: [/etc/clip/certs.d]
  registriesConf: /etc/clip/registries.conf
  spanStore:
    s3: {bucket: spans, prefix: fleet/, endpoint: "http://127.0.0.1:9000"}
  profileAtBuildSecs: 20
"#;

    #[test]
    fn the_seed_shaped_file_parses() {
        let c = Config::from_yaml(FULL).unwrap();
        assert_eq!(c.clip_version, 2);
        assert_eq!(c.build_registry, "registry.internal:5000");
        assert!(c.build_registry_configured);
        assert_eq!(c.checkpoint_mib, 8);
        assert_eq!(
            c.archive_store,
            ArchiveStore::S3(S3Store {
                bucket: "images".into(),
                prefix: "clip/".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("us-east-1".into()),
                force_path_style: true,
                access_key_id: None,
                secret_access_key: None,
            })
        );
        assert_eq!(c.cache_size_gib, 50);
        assert_eq!(c.profile_at_build_secs, 20);
        assert_eq!(Config::default().profile_at_build_secs, 0, "off by default");
        let spans = c.span_store.as_ref().unwrap();
        assert_eq!(
            (spans.bucket.as_str(), spans.prefix.as_str()),
            ("spans", "fleet/")
        );
        assert!(Config::from_yaml("imageService:\n  spanStore: {s3: {prefix: x}}\n").is_err());
        assert!(Config::from_yaml("imageService:\n  spanStore: {local: /x}\n").is_err());
        assert_eq!(
            c.registry("docker.io").unwrap().username.as_deref(),
            Some("u")
        );
        assert!(c.registry("registry.example.com:5000").unwrap().insecure);
        assert!(c.registry("quay.io").is_none());
        let p = c.registry("private.example.com").unwrap();
        assert_eq!(p.ca_file.as_deref(), Some(Path::new("/etc/clip/ca.pem")));
        assert_eq!(p.client_key.as_deref(), Some(Path::new("/etc/clip/c.key")));
        assert_eq!(c.certs_dirs, Some(vec![PathBuf::from("/etc/clip/certs.d")]));
        assert_eq!(
            c.registries_conf.as_deref(),
            Some(Path::new("/etc/clip/registries.conf"))
        );
        assert!(
            Config::from_yaml("imageService:\n  registries:\n    r: {clientCert: /c}\n").is_err()
        );
    }

    #[test]
    fn index_on_push_patterns() {
        let c = Config::from_yaml(
            "imageService:\n  indexOnPush:\n    repositories: [\"team/*\", \"reg.example.com:5000/app\"]\n    platforms: [linux/arm64]\n    registries: [\"reg.example.com:5000\"]\n    secretFile: /etc/clip/push-secret\n",
        )
        .unwrap();
        let p = c.index_on_push.unwrap();
        assert!(p.trusts_host("reg.example.com:5000") && !p.trusts_host("evil.example.com"));
        assert_eq!(
            p.secret_file.as_deref(),
            Some(Path::new("/etc/clip/push-secret"))
        );
        assert!(
            Config::from_yaml("imageService:\n  indexOnPush:\n    repositories: [\"*\"]\n")
                .is_err(),
            "events from any host"
        );
        assert!(p.wants("any:5000", "team/a") && p.wants("h", "team/a/b"));
        assert!(p.wants("reg.example.com:5000", "app") && !p.wants("other", "app"));
        assert!(!p.wants("h", "teams/a"));
        assert_eq!(p.platforms, ["linux/arm64"]);
        assert!(glob("*", "") && glob("a*b*c", "aXbYc") && !glob("a*b", "ac"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = Config::from_yaml(
            "imageService:\n  registries:\n    r: {username: u, password: canary-pw}\n  archiveStore:\n    s3: {bucket: b, secretAccessKey: canary-sk}\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn defaults_then_file_then_env() {
        let d = Config::from_yaml("").unwrap();
        assert_eq!(d, Config::default());
        assert_eq!(d.clip_version, 1);
        let env = |k: &str| match k {
            "CLIP_VERSION" => Some("2".to_owned()),
            "B9_BUILD_REGISTRY" => Some("127.0.0.1:5999".to_owned()),
            _ => None,
        };
        let c = Config::from_yaml("imageService:\n  clipVersion: 1\n")
            .unwrap()
            .with_env(env)
            .unwrap();
        assert_eq!(
            (c.clip_version, c.build_registry.as_str()),
            (2, "127.0.0.1:5999")
        );
        assert!(c.build_registry_configured);
    }

    #[test]
    fn the_rollout_is_stable_and_proportional() {
        let mut cfg = Config {
            clip_version: 2,
            ..Config::default()
        };
        let ids: Vec<String> = (0..2000).map(|i| format!("{i:016x}")).collect();
        for pct in [0u8, 25, 50, 75, 100] {
            cfg.clip_v2_rollout_percent = pct;
            let n = ids.iter().filter(|id| in_v2_rollout(&cfg, id)).count();
            let want = 2000 * usize::from(pct) / 100;
            assert!(n.abs_diff(want) <= 80, "{pct}%: {n} of 2000");
            // Raising the percentage only adds images: nobody flips back to v1.
            if pct > 0 {
                let lower = Config {
                    clip_v2_rollout_percent: pct - 25,
                    ..cfg.clone()
                };
                assert!(
                    ids.iter()
                        .all(|id| !in_v2_rollout(&lower, id) || in_v2_rollout(&cfg, id))
                );
            }
        }
        cfg.clip_v2_rollout_percent = 0;
        assert_eq!(pull_plan(&cfg, "abc"), PullPlan::CopyAndArchive);
        assert_eq!(
            build_plan(&cfg, "abc", &RegistryProbe::Reachable),
            BuildPlan::V1 { reason: None }
        );
        let env = Config::default()
            .with_env(|k| (k == "CLIP_V2_ROLLOUT_PERCENT").then(|| "25".to_owned()))
            .unwrap();
        assert_eq!(env.clip_v2_rollout_percent, 25);
        assert!(Config::from_yaml("imageService:\n  clipV2RolloutPercent: 101\n").is_err());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        for (text, want) in [
            (
                "imageService:\n  clipVersion: 3\n",
                "clipVersion must be 1 or 2",
            ),
            ("imageService:\n  clipVersoin: 2\n", "unknown field"),
            ("imageService:\n  checkpointMiB: 0\n", "checkpointMiB"),
            ("imageService: [", "invalid configuration"),
            ("imageService:\n  archiveStore: {}\n", "exactly one"),
        ] {
            let e = Config::from_yaml(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = Config::default()
            .with_env(|k| (k == "CLIP_VERSION").then(|| "two".to_owned()))
            .unwrap_err();
        assert!(e.to_string().contains("CLIP_VERSION"), "{e}");
    }

    #[test]
    fn the_behaviour_matrix() {
        let v1 = Config::default();
        let v2 = Config {
            clip_version: 2,
            ..Config::default()
        };
        let down = RegistryProbe::Unreachable("connection refused".into());
        assert_eq!(pull_plan(&v1, "img"), PullPlan::CopyAndArchive);
        assert_eq!(pull_plan(&v2, "img"), PullPlan::IndexFromRegistry);
        assert_eq!(
            build_plan(&v1, "img", &RegistryProbe::Reachable),
            BuildPlan::V1 { reason: None }
        );
        assert_eq!(
            build_plan(&v2, "img", &RegistryProbe::Reachable),
            BuildPlan::PushAndIndex {
                registry: "localhost:5000".into()
            }
        );
        let BuildPlan::V1 { reason: Some(r) } = build_plan(&v2, "img", &down) else {
            panic!("v1 expected")
        };
        let r = r.to_string();
        assert!(
            r.contains("no registry configured") && r.contains("connection refused"),
            "{r}"
        );
        let configured = Config {
            build_registry: "r:5000".into(),
            build_registry_configured: true,
            ..v2
        };
        let BuildPlan::V1 { reason: Some(r) } = build_plan(&configured, "img", &down) else {
            panic!("v1 expected")
        };
        assert!(r.to_string().contains("r:5000 is unreachable"), "{r}");
    }
}
