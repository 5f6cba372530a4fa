//! Mirrors and pull-through caches, configured the way podman, skopeo and buildah read them:
//! `containers-registries.conf` (v2 TOML).
//!
//! ```toml
//! [[registry]]
//! location = "registry.example.com"
//! [[registry.mirror]]
//! location = "mirror.internal:5000"
//! insecure = true
//! ```
//!
//! Pulls from `registry.example.com` — manifests, configs, whole blobs and range reads — go to
//! each mirror in order, then to the registry itself. A mirror that cannot be reached is skipped
//! for 30 s; one that answers anything but success (not found, unauthorized, an error) passes the
//! request on. Every byte is verified against the digest that names it, so reading from a mirror
//! is as safe as reading from the registry. Pushes always go to the registry.

use std::path::Path;

use serde::Deserialize;

use crate::Error;

/// A mirror of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `HOST[:PORT]`.
    pub host: String,
    /// Reached over plain HTTP when it does not speak TLS.
    pub insecure: bool,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    registry: Vec<RegistryTable>,
}

#[derive(Deserialize)]
struct RegistryTable {
    #[serde(default)]
    location: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    mirror: Vec<MirrorTable>,
}

#[derive(Deserialize)]
struct MirrorTable {
    location: String,
    #[serde(default)]
    insecure: bool,
}

/// The mirrors a registries.conf text names, by registry host.
pub fn parse(text: &str) -> Result<Vec<(String, Vec<Mirror>)>, Error> {
    parse_named(text, "registries.conf")
}

fn parse_named(text: &str, name: &str) -> Result<Vec<(String, Vec<Mirror>)>, Error> {
    let f: File = toml::from_str(text).map_err(|e| Error::Config(format!("{name}: {e}")))?;
    Ok(f.registry
        .into_iter()
        .filter(|r| !r.mirror.is_empty())
        .map(|r| {
            let host = if r.location.is_empty() {
                r.prefix
            } else {
                r.location
            };
            let mirrors = r
                .mirror
                .into_iter()
                .map(|m| Mirror {
                    host: m.location.trim_end_matches('/').to_owned(),
                    insecure: m.insecure,
                })
                .collect();
            (host.trim_end_matches('/').to_owned(), mirrors)
        })
        .collect())
}

/// The mirrors `path` names (a missing file names none).
pub fn load(path: &Path) -> Result<Vec<(String, Vec<Mirror>)>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_named(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Io {
            context: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The system's mirrors as podman reads them: [`REGISTRIES_CONF`], then the drop-ins in
/// [`REGISTRIES_CONF_D`] (`*.conf`, in name order); a registry named again replaces its earlier
/// mirrors.
pub fn load_system() -> Result<Vec<(String, Vec<Mirror>)>, Error> {
    let mut all = load(Path::new(REGISTRIES_CONF))?;
    let mut dropins: Vec<_> = std::fs::read_dir(REGISTRIES_CONF_D)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    dropins.sort();
    for p in dropins {
        for (host, mirrors) in load(&p)? {
            all.retain(|(h, _)| *h != host);
            all.push((host, mirrors));
        }
    }
    Ok(all)
}

/// Where podman and skopeo keep it.
pub const REGISTRIES_CONF: &str = "/etc/containers/registries.conf";
/// Its drop-in directory.
pub const REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registries_conf_mirrors_parse_in_order() {
        let m = parse(
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
location = "registry.example.com"
[[registry.mirror]]
location = "mirror-a.internal:5000"
insecure = true
[[registry.mirror]]
location = "mirror-b.internal"
[[registry]]
location = "quay.io"
"#,
        )
        .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, "registry.example.com");
        assert_eq!(
            m[0].1,
            [
                Mirror {
                    host: "mirror-a.internal:5000".into(),
                    insecure: true
                },
                Mirror {
                    host: "mirror-b.internal".into(),
                    insecure: false
                }
            ]
        );
        assert!(parse("[[registry]]\nlocation = 5").is_err());
    }
}
