//! Per-registry TLS trust, the way docker, podman, skopeo and containerd configure it.
//!
//! For a registry `HOST[:PORT]`, the directories `/etc/containers/certs.d/HOST[:PORT]/` and
//! `/etc/docker/certs.d/HOST[:PORT]/` (roots overridable) hold `*.crt` CA certificates to trust
//! for that registry only, and `NAME.cert` + `NAME.key` pairs: a client certificate for registries
//! that demand mutual TLS. The configuration can name the same per registry (`caFile`,
//! `clientCert`, `clientKey`). A registry with any of this gets an HTTP client of its own (the
//! system roots plus its CAs, its client certificate); every other host shares the default one.

use std::path::{Path, PathBuf};

use crate::Error;

/// The conventional certs.d roots, in the order they are read.
pub const CERTS_DIRS: [&str; 2] = ["/etc/containers/certs.d", "/etc/docker/certs.d"];

/// TLS settings for one registry, from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryTls {
    /// A PEM file of CA certificates to trust for it.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (chain) to present to it.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    pub client_key: Option<PathBuf>,
}

/// What a registry's TLS needs beyond the defaults: extra CAs (PEM) and a client identity.
#[derive(Default)]
pub(crate) struct HostMaterial {
    pub(crate) cas: Vec<String>,
    pub(crate) identity: Option<(String, String)>,
    /// Where it came from, for messages.
    pub(crate) sources: Vec<PathBuf>,
}

impl HostMaterial {
    pub(crate) fn is_empty(&self) -> bool {
        self.cas.is_empty() && self.identity.is_none()
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: "reading",
        path: path.to_owned(),
        source,
    })
}

/// Collects `host`'s material from `dirs` (each `DIR/HOST/`; for `HOST:PORT` also `DIR/HOST/`
/// is not read: docker and containerd key the directory by what the reference names) and from
/// `configured`.
pub(crate) fn material(
    host: &str,
    dirs: &[PathBuf],
    configured: Option<&RegistryTls>,
) -> Result<HostMaterial, Error> {
    let mut m = HostMaterial::default();
    for root in dirs {
        let dir = root.join(host);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in &names {
            match p.extension().and_then(|e| e.to_str()) {
                Some("crt") => {
                    m.cas.push(read(p)?);
                    m.sources.push(p.clone());
                }
                Some("cert") if m.identity.is_none() => {
                    let key = p.with_extension("key");
                    if !key.exists() {
                        return Err(Error::Config(format!(
                            "{}: client certificate without its key {}",
                            p.display(),
                            key.display()
                        )));
                    }
                    m.identity = Some((read(p)?, read(&key)?));
                    m.sources.push(p.clone());
                }
                _ => {}
            }
        }
    }
    if let Some(c) = configured {
        if let Some(ca) = &c.ca_file {
            m.cas.push(read(ca)?);
            m.sources.push(ca.clone());
        }
        match (&c.client_cert, &c.client_key) {
            (Some(cert), Some(key)) => {
                m.identity = Some((read(cert)?, read(key)?));
                m.sources.push(cert.clone());
            }
            (None, None) => {}
            _ => {
                return Err(Error::Config(format!(
                    "registry {host}: clientCert and clientKey go together"
                )));
            }
        }
    }
    Ok(m)
}

/// A rustls client configuration: the system roots, `extra_pem` CAs, and an optional client
/// identity.
pub(crate) fn rustls_config(
    extra_pem: &[&str],
    identity: Option<&(String, String)>,
) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(native_roots());
    for pem in extra_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Config(format!("CA certificate: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(format!("client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| Error::Config(format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Config(format!("client certificate and key: {e}")))
        }
    }
}

/// The machine's CA certificates (Debian's bundle), for public registries.
fn native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let Ok(pem) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") else {
        return Vec::new();
    };
    rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect()
}

/// The TLS error inside a failed request, if its cause is one.
fn tls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // An io::Error's `source()` skips the error it wraps; step into that error itself.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// Whether a failed HTTPS request shows that the peer does not speak TLS at all: it answered
/// the `ClientHello` with bytes that are not a TLS record (a plain-HTTP server's `400 Bad
/// Request`). Nothing else counts — not a TLS failure (an untrusted or wrong certificate, a
/// refused or missing client certificate), not a connection closed or reset mid-handshake, not
/// a refused connection: those are reported, never retried over plain HTTP.
pub(crate) fn peer_speaks_no_tls(e: &reqwest::Error) -> bool {
    matches!(tls_error(e), Some(rustls::Error::InvalidMessage(_)))
}

/// Whether a request failed in TLS itself (a certificate, a handshake alert): retrying will
/// not change the answer, so it is reported at once.
pub(crate) fn is_tls_failure(e: &reqwest::Error) -> bool {
    tls_error(e).is_some()
}
