//! The client: its configuration, its shared state (tokens, schemes, per-host limits, redirect
//! targets) and construction. The calls live beside it: `auth`, `transport`, `pull`, `push`,
//! `layout`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::oci;
use crate::{Error, Reference};

/// Every manifest type the client understands.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest or config accepted.
pub const MAX_DOCUMENT: usize = 4 << 20;

/// Credentials for a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password (or a token used as password).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token realm with the
    /// `refresh_token` grant.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

/// How hard to try.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, first included.
    pub attempts: u32,
    /// First backoff delay.
    pub base: Duration,
    /// Longest backoff delay.
    pub max_delay: Duration,
    /// Give up retrying after this long in total.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            base: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_mins(1),
        }
    }
}

/// Client configuration.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Credentials by host pattern (`host[:port]`, or `*.example.com`, or `*`), first match wins.
    pub credentials: Vec<(String, Credentials)>,
    /// Hosts to reach over plain HTTP (loopback hosts always are, as docker does).
    pub insecure: Vec<String>,
    /// Extra CA certificates (PEM) trusted for HTTPS.
    pub ca_pem: Option<String>,
    /// Per-request timeout (default 60 s).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Docker's `config.json` to consult after `credentials` (see [`crate::dockerconfig`]).
    pub docker_config: Option<std::sync::Arc<crate::dockerconfig::DockerConfig>>,
    /// Most requests in flight to one host, bodies included (default 8).
    pub max_per_host: Option<usize>,
    /// Ranges in flight when a big blob is streamed (default [`crate::PARALLEL_STREAMS`]; 1:
    /// one stream). The environment variable `CLIP_RANGE_STREAMS` sets it too.
    pub range_streams: Option<usize>,
    /// The certs.d roots to read per-registry CAs and client certificates from (`None`: the
    /// conventional `/etc/containers/certs.d` and `/etc/docker/certs.d`; see [`crate::trust`]).
    pub certs_dirs: Option<Vec<std::path::PathBuf>>,
    /// Per-registry TLS settings from the configuration, by host.
    pub registry_tls: Vec<(String, crate::trust::RegistryTls)>,
    /// Mirrors per registry host, tried in order before it (see [`crate::mirrors`]).
    pub mirrors: Vec<(String, Vec<crate::mirrors::Mirror>)>,
}

impl ClientConfig {
    /// This configuration with docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`; a missing file is no credentials) consulted after
    /// [`ClientConfig::credentials`]: the one place clip reads it.
    pub fn with_docker_config(mut self) -> Result<Self, Error> {
        if let Some(p) = crate::dockerconfig::default_path() {
            self.docker_config = Some(Arc::new(crate::dockerconfig::DockerConfig::load(&p)?));
        }
        Ok(self)
    }
}

#[derive(Clone)]
pub(crate) struct Token {
    pub(crate) value: String,
    pub(crate) refresh_at: Instant,
}

#[derive(Clone, Debug)]
pub(crate) enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

pub(crate) struct State {
    pub(crate) tokens: HashMap<(String, crate::auth::Scope), Token>,
    pub(crate) schemes: HashMap<String, Scheme>,
    /// For loopback and insecure hosts: whether HTTPS worked (`true`) or plain HTTP is used.
    pub(crate) https: HashMap<String, bool>,
    /// Credentials found in docker's config, per host (looked up once).
    pub(crate) docker_creds: HashMap<String, Option<Credentials>>,
    /// Per-host request limits.
    pub(crate) limits: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Blob URL -> where the registry redirected it, and until when to reuse that.
    pub(crate) redirects: HashMap<String, (String, Instant)>,
    /// HTTP clients of registries with TLS material of their own (certs.d, configuration).
    pub(crate) per_host: HashMap<String, reqwest::Client>,
    /// Mirrors that failed to connect, and until when they are skipped.
    pub(crate) mirror_down: HashMap<String, Instant>,
}

/// An OCI distribution client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) cfg: Arc<ClientConfig>,
    pub(crate) state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("insecure", &self.cfg.insecure)
            .finish_non_exhaustive()
    }
}

/// A resolved platform image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference pinned by the platform manifest's digest.
    pub reference: Reference,
    /// The platform manifest's digest.
    pub manifest_digest: clip_format::Digest,
    /// The platform manifest.
    pub manifest: oci::Manifest,
    /// The image config document.
    pub config: oci::ImageConfiguration,
}

/// Whether `host` (`name[:port]`, `[v6]:port`) is this machine: `localhost` or a loopback address.
/// Such registries are reached over plain HTTP, as docker does.
#[must_use]
pub fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(h, p)| p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'))
        .map_or(host, |(h, _)| h);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    /// A client with `cfg`.
    pub fn new(cfg: ClientConfig) -> Result<Self, Error> {
        let extra: Vec<&str> = cfg.ca_pem.as_deref().into_iter().collect();
        let http = http_client(&cfg, crate::trust::rustls_config(&extra, None)?)?;
        Ok(Self {
            http,
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(State {
                tokens: HashMap::new(),
                schemes: HashMap::new(),
                https: HashMap::new(),
                docker_creds: HashMap::new(),
                limits: HashMap::new(),
                redirects: HashMap::new(),
                per_host: HashMap::new(),
                mirror_down: HashMap::new(),
            })),
        })
    }

    /// The HTTP client for `host`: its own when certs.d or the configuration give it a CA or a
    /// client certificate, else the shared one. Built once per host.
    pub(crate) fn http_for(&self, host: &str) -> Result<reqwest::Client, Error> {
        if let Some(c) = self
            .state
            .lock()
            .ok()
            .and_then(|st| st.per_host.get(host).cloned())
        {
            return Ok(c);
        }
        let default_dirs: Vec<std::path::PathBuf> = crate::trust::CERTS_DIRS
            .iter()
            .map(std::path::PathBuf::from)
            .collect();
        let dirs = self.cfg.certs_dirs.as_ref().unwrap_or(&default_dirs);
        let configured = self
            .cfg
            .registry_tls
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, t)| t);
        let m = crate::trust::material(host, dirs, configured)?;
        let client = if m.is_empty() {
            self.http.clone()
        } else {
            tracing::debug!(host, sources = ?m.sources, "registry TLS material");
            let mut extra: Vec<&str> = self.cfg.ca_pem.as_deref().into_iter().collect();
            extra.extend(m.cas.iter().map(String::as_str));
            http_client(
                &self.cfg,
                crate::trust::rustls_config(&extra, m.identity.as_ref())?,
            )?
        };
        if let Ok(mut st) = self.state.lock() {
            st.per_host.insert(host.to_owned(), client.clone());
        }
        Ok(client)
    }
}

/// An HTTP client with `tls`, the configured timeouts and hand-followed redirects.
fn http_client(cfg: &ClientConfig, tls: rustls::ClientConfig) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(cfg.timeout.unwrap_or(Duration::from_mins(1)))
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(16)
        // Redirects are followed by hand (see `send_with`): credentials stay with the registry
        // and blob redirect targets are cached.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Access, Scope, challenge_params, pattern_matches};
    use crate::transport::backoff;

    #[test]
    fn loopback_and_patterns() {
        assert!(
            is_loopback("127.0.0.1:5000")
                && is_loopback("localhost:5000")
                && is_loopback("[::1]:5000")
                && is_loopback("localhost")
        );
        assert!(!is_loopback("registry.example.com:5000") && !is_loopback("10.0.0.1"));
        assert!(
            pattern_matches("*", "x")
                && pattern_matches("*.example.com", "r.example.com")
                && !pattern_matches("*.example.com", "example.com")
        );
        let p = challenge_params(
            r#" realm="http://h/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p[0], ("realm".into(), "http://h/token".into()));
        assert_eq!(p[2].1, "repository:a/b:pull,push");
        assert_eq!(
            Scope::new("a/b", Access::PullPush).to_string(),
            "repository:a/b:pull,push"
        );
        assert_eq!(Scope::new("a/b", Access::Pull).repository(), "a/b");
        let policy = RetryPolicy::default();
        assert!(backoff(&policy, 10) <= policy.max_delay);
    }
}
