//! The HTTP client: transport, authentication, retries, and the distribution API calls.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_RANGE, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::oci::{self, Platform};
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
}

#[derive(Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

#[derive(Clone, Debug)]
enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct State {
    tokens: HashMap<(String, String), Token>,
    schemes: HashMap<String, Scheme>,
    /// For loopback and insecure hosts: whether HTTPS worked (`true`) or plain HTTP is used.
    https: HashMap<String, bool>,
    /// Credentials found in docker's config, per host (looked up once).
    docker_creds: HashMap<String, Option<Credentials>>,
    /// Per-host request limits.
    limits: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Blob URL -> where the registry redirected it, and until when to reuse that.
    redirects: HashMap<String, (String, Instant)>,
}

/// An OCI distribution client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    cfg: Arc<ClientConfig>,
    state: Arc<Mutex<State>>,
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
    pub manifest_digest: String,
    /// The platform manifest.
    pub manifest: oci::Manifest,
    /// The image config document.
    pub config: oci::Config,
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

fn pattern_matches(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern == host
        || pattern
            .strip_prefix("*.")
            .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
}

/// Parses `Bearer realm="…",service="…",scope="…"` parameters.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once('=') {
        let key = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = match after.strip_prefix('"') {
            Some(q) => q.find('"').map_or((q, ""), |e| (&q[..e], &q[e + 1..])),
            None => after
                .find(',')
                .map_or((after, ""), |e| (&after[..e], &after[e..])),
        };
        out.push((key, v.to_owned()));
        rest = next;
    }
    out
}

impl Client {
    /// A client with `cfg`.
    pub fn new(cfg: ClientConfig) -> Result<Self, Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_roots();
        roots.add_parsable_certificates(native);
        if let Some(pem) = &cfg.ca_pem {
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| Error::Config(format!("CA bundle: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("CA bundle: {e}")))?;
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(cfg.timeout.unwrap_or(Duration::from_mins(1)))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(16)
            // Redirects are followed by hand (see `send_with`): credentials stay with the
            // registry and blob redirect targets are cached.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
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
            })),
        })
    }

    /// Follows one redirect by hand: to another host without credentials (object storage), to
    /// the same host with them; a blob GET's target is remembered for a minute.
    async fn follow(
        &self,
        resp: reqwest::Response,
        url: &str,
        method: &Method,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
        scope: &str,
    ) -> Result<reqwest::Response, Error> {
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol {
                url: url.to_owned(),
                reason: format!("{} without Location", resp.status()),
            })?;
        let from = reqwest::Url::parse(url).map_err(|e| Error::Protocol {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let target = from.join(location).map_err(|e| Error::Protocol {
            url: url.to_owned(),
            reason: format!("bad Location {location:?}: {e}"),
        })?;
        let same_origin = target.host_str() == from.host_str()
            && target.port_or_known_default() == from.port_or_known_default();
        let mut req = self.http.request(method.clone(), target.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        if same_origin {
            let host = from
                .host_str()
                .map(|h| {
                    from.port()
                        .map_or_else(|| h.to_owned(), |p| format!("{h}:{p}"))
                })
                .unwrap_or_default();
            if let Some(a) = self.cached_auth(&host, scope) {
                req = req.header(AUTHORIZATION, a);
            }
        }
        let out = req
            .send()
            .await
            .map_err(|e| Error::transport(target.as_str(), &e))?;
        if !same_origin
            && *method == Method::GET
            && url.contains("/blobs/")
            && out.status().is_success()
            && let Ok(mut st) = self.state.lock()
        {
            st.redirects.insert(
                url.to_owned(),
                (target.to_string(), Instant::now() + Duration::from_mins(1)),
            );
        }
        Ok(out)
    }

    /// Waits for a request slot on `host` (held until the returned permit drops).
    pub(crate) async fn slot(&self, host: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut st = self.state.lock().ok()?;
            let n = self.cfg.max_per_host.unwrap_or(8).max(1);
            Arc::clone(
                st.limits
                    .entry(host.to_owned())
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(n))),
            )
        };
        sem.acquire_owned().await.ok()
    }

    /// Loopback and insecure hosts may fall back to plain HTTP (as docker does); they try HTTPS
    /// first, and the outcome is remembered per host. Certificate errors are never ignored.
    fn may_use_http(&self, host: &str) -> bool {
        is_loopback(host) || self.cfg.insecure.iter().any(|h| h == host)
    }

    fn base_url(&self, host: &str) -> String {
        let https = !self.may_use_http(host)
            || self
                .state
                .lock()
                .ok()
                .and_then(|st| st.https.get(host).copied())
                .unwrap_or(true);
        format!("{}://{host}", if https { "https" } else { "http" })
    }

    fn credentials(&self, host: &str) -> Option<Credentials> {
        if let Some((_, c)) = self
            .cfg
            .credentials
            .iter()
            .find(|(p, _)| pattern_matches(p, host))
        {
            return Some(c.clone());
        }
        self.state
            .lock()
            .ok()
            .and_then(|st| st.docker_creds.get(host).cloned().flatten())
    }

    /// Looks the host up in docker's config once (a helper may run: off the async runtime).
    async fn load_docker_credentials(&self, host: &str) -> Result<(), Error> {
        let Some(dc) = self.cfg.docker_config.clone() else {
            return Ok(());
        };
        if self
            .state
            .lock()
            .ok()
            .is_some_and(|st| st.docker_creds.contains_key(host))
        {
            return Ok(());
        }
        let h = host.to_owned();
        let found = tokio::task::spawn_blocking(move || dc.credentials_for(&h))
            .await
            .map_err(|e| Error::Config(format!("credential lookup: {e}")))??;
        if let Ok(mut st) = self.state.lock() {
            st.docker_creds.insert(host.to_owned(), found);
        }
        Ok(())
    }

    fn basic_header(&self, host: &str) -> Option<String> {
        match self.credentials(host)? {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credentials::IdentityToken(_) => None,
        }
    }

    /// The Authorization header to send proactively, if the host's scheme is known.
    fn cached_auth(&self, host: &str, scope: &str) -> Option<String> {
        // The state lock is released before `basic_header`, which takes it again.
        let bearer = {
            let st = self.state.lock().ok()?;
            match st.schemes.get(host)? {
                Scheme::Basic => None,
                Scheme::Bearer { .. } => {
                    let t = st.tokens.get(&(host.to_owned(), scope.to_owned()))?;
                    Some((Instant::now() < t.refresh_at).then(|| format!("Bearer {}", t.value)))
                }
            }
        };
        match bearer {
            Some(token) => token,
            None => self.basic_header(host),
        }
    }

    /// Answers a challenge: learns the scheme and, for Bearer, fetches a token for `scope`.
    async fn authenticate(&self, host: &str, scope: &str, challenge: &str) -> Result<(), Error> {
        let mut wanted_scopes: Vec<String> = Vec::new();
        let scheme = if challenge.len() >= 6 && challenge[..6].eq_ignore_ascii_case("bearer") {
            let params = challenge_params(&challenge[6..]);
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(kk, _)| kk == k)
                    .map(|(_, v)| v.clone())
            };
            let realm = get("realm").ok_or_else(|| Error::Protocol {
                url: host.into(),
                reason: "Bearer challenge without realm".into(),
            })?;
            // The registry names the scopes it needs (several for a cross-repository mount);
            // ask for those, and for ours.
            let mut scopes: Vec<String> = get("scope")
                .map(|s| s.split(' ').map(str::to_owned).collect())
                .unwrap_or_default();
            if !scopes.iter().any(|x| x == scope) {
                scopes.push(scope.to_owned());
            }
            wanted_scopes = scopes;
            Scheme::Bearer {
                realm,
                service: get("service"),
            }
        } else {
            Scheme::Basic
        };
        if let Scheme::Bearer { realm, service } = &scheme {
            let mut url = reqwest::Url::parse(realm).map_err(|e| Error::Protocol {
                url: realm.clone(),
                reason: format!("bad realm: {e}"),
            })?;
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for sc in &wanted_scopes {
                    q.append_pair("scope", sc);
                }
            }
            let mut req = match self.credentials(host) {
                // OAuth2: POST the refresh token as a form to the realm.
                Some(Credentials::IdentityToken(rt)) => {
                    let mut form = reqwest::Url::parse("http://form.invalid/")
                        .map_err(|e| Error::Config(e.to_string()))?;
                    {
                        let mut q = form.query_pairs_mut();
                        q.append_pair("grant_type", "refresh_token");
                        q.append_pair("refresh_token", &rt);
                        q.append_pair("client_id", "clip");
                        if let Some(s) = service {
                            q.append_pair("service", s);
                        }
                        q.append_pair("scope", &wanted_scopes.join(" "));
                    }
                    let mut realm_url = url.clone();
                    realm_url.set_query(None);
                    self.http
                        .post(realm_url)
                        .header(
                            reqwest::header::CONTENT_TYPE,
                            "application/x-www-form-urlencoded",
                        )
                        .body(form.query().unwrap_or_default().to_owned())
                }
                _ => self.http.get(url.clone()),
            };
            if let Some(b) = self.basic_header(host) {
                req = req.header(AUTHORIZATION, b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Error::transport(url.as_str(), &e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(Error::Unauthorized {
                    host: host.into(),
                    repository: scope_repo(scope),
                });
            }
            if !status.is_success() {
                return Err(Error::Protocol {
                    url: url.to_string(),
                    reason: format!("token endpoint answered {status}"),
                });
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| Error::transport(url.as_str(), &e))?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| Error::Protocol {
                    url: url.to_string(),
                    reason: format!("token response: {e}"),
                })?;
            let value = v["token"]
                .as_str()
                .or_else(|| v["access_token"].as_str())
                .ok_or_else(|| Error::Protocol {
                    url: url.to_string(),
                    reason: "token response without a token".into(),
                })?;
            // Tokens default to 60 s (distribution's token spec); refresh a fifth of the lifetime
            // (at most 30 s) early so a token never lapses mid-request.
            let lifetime = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(60).max(1));
            let early = (lifetime / 5).min(Duration::from_secs(30));
            if let Ok(mut st) = self.state.lock() {
                st.tokens.insert(
                    (host.to_owned(), scope.to_owned()),
                    Token {
                        value: value.to_owned(),
                        refresh_at: Instant::now() + lifetime.saturating_sub(early),
                    },
                );
            }
        }
        if let Ok(mut st) = self.state.lock() {
            st.schemes.insert(host.to_owned(), scheme);
        }
        Ok(())
    }

    /// Sends a request with authentication, one re-authentication on 401/403, and retries with
    /// backoff on connection errors, 5xx and 429.
    pub(crate) async fn send(
        &self,
        host: &str,
        repository: &str,
        method: Method,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
    ) -> Result<reqwest::Response, Error> {
        self.send_with(host, repository, "pull", method, path, headers, None)
            .await
    }

    /// [`Self::send`] with the scope's actions (`pull` or `pull,push`) and an optional body.
    /// `path` may also be an absolute URL on `host` (an upload `Location`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_with(
        &self,
        host: &str,
        repository: &str,
        actions: &str,
        method: Method,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, Error> {
        self.load_docker_credentials(host).await?;
        let mut url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base_url(host))
        };
        let scope = format!("repository:{repository}:{actions}");
        // A blob the registry redirected recently: go straight to the target (no credentials);
        // if the target no longer answers (expired signed URL), ask the registry again.
        if method == Method::GET {
            let cached = self.state.lock().ok().and_then(|st| {
                st.redirects
                    .get(&url)
                    .filter(|(_, until)| Instant::now() < *until)
                    .map(|(t, _)| t.clone())
            });
            if let Some(target) = cached {
                let mut req = self.http.get(&target);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                if let Ok(resp) = req.send().await
                    && resp.status().is_success()
                {
                    return Ok(resp);
                }
                if let Ok(mut st) = self.state.lock() {
                    st.redirects.remove(&url);
                }
            }
        }
        let mut https_error: Option<Error> = None;
        let policy = &self.cfg.retry;
        let start = Instant::now();
        let mut reauthed = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if let Some(a) = self.cached_auth(host, &scope) {
                req = req.header(AUTHORIZATION, a);
            }
            let span = tracing::debug_span!("registry_request", %url, attempt);
            let _enter = span.enter();
            let retry_after = match req.send().await {
                Ok(resp) if resp.status().is_redirection() => {
                    return self
                        .follow(resp, &url, &method, headers, body.clone(), &scope)
                        .await;
                }
                Ok(resp) => {
                    let status = resp.status();
                    if (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
                        && !reauthed
                    {
                        reauthed = true;
                        if let Some(ch) = resp
                            .headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                        {
                            self.authenticate(host, &scope, &ch).await?;
                            continue;
                        }
                        // 403 without a challenge: our token may be stale; forget it and retry once.
                        if let Ok(mut st) = self.state.lock() {
                            st.tokens.remove(&(host.to_owned(), scope.clone()));
                        }
                        continue;
                    }
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(Error::Unauthorized {
                            host: host.into(),
                            repository: repository.into(),
                        });
                    }
                    if url.starts_with("https://")
                        && let Ok(mut st) = self.state.lock()
                    {
                        st.https.entry(host.to_owned()).or_insert(true);
                    }
                    // Plain HTTP to a TLS port: the HTTPS failure is the real story.
                    if status == StatusCode::BAD_REQUEST
                        && url.starts_with("http://")
                        && let Some(e) = https_error.take()
                    {
                        return Err(e);
                    }
                    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                        let after = resp
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .map(Duration::from_secs);
                        if attempt >= policy.attempts || start.elapsed() >= policy.deadline {
                            return Err(Error::Protocol {
                                url,
                                reason: format!("{status} after {attempt} attempts"),
                            });
                        }
                        after
                    } else {
                        return Ok(resp);
                    }
                }
                Err(e) => {
                    // Not known to speak HTTPS: either unknown, or a concurrent first request
                    // already found plain HTTP while this one was probing HTTPS.
                    let not_https = self
                        .state
                        .lock()
                        .ok()
                        .is_some_and(|st| st.https.get(host) != Some(&true));
                    if url.starts_with("https://") && self.may_use_http(host) && not_https {
                        // First contact with a loopback/insecure host: HTTPS failed, try HTTP.
                        https_error = Some(Error::transport(&url, &e));
                        if let Ok(mut st) = self.state.lock() {
                            st.https.insert(host.to_owned(), false);
                        }
                        url = format!("http://{host}{path}");
                        attempt -= 1;
                        continue;
                    }
                    if attempt >= policy.attempts || start.elapsed() >= policy.deadline {
                        // The current attempt's error (a TLS port answering HTTP is handled above).
                        return Err(Error::transport(&url, &e));
                    }
                    None
                }
            };
            tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(policy, attempt))).await;
        }
    }

    async fn read_document(resp: reqwest::Response, url: &str) -> Result<Bytes, Error> {
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_DOCUMENT as u64)
        {
            return Err(Error::Protocol {
                url: url.into(),
                reason: format!("document larger than {MAX_DOCUMENT} bytes"),
            });
        }
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::transport(url, &e))?;
            if out.len() + chunk.len() > MAX_DOCUMENT {
                return Err(Error::Protocol {
                    url: url.into(),
                    reason: format!("document larger than {MAX_DOCUMENT} bytes"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }

    /// Fetches a manifest (any type) by tag or digest; returns its bytes, media type and digest.
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<(Bytes, String, String), Error> {
        let _slot = self.slot(r.api_host()).await;
        let path = format!("/v2/{}/manifests/{reference}", r.repository);
        let resp = self
            .send(
                r.api_host(),
                &r.repository,
                Method::GET,
                &path,
                &[(ACCEPT, ACCEPT_MANIFESTS.into())],
            )
            .await?;
        let url = resp.url().to_string();
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: format!("manifest {reference}"),
                repository: r.repository.clone(),
                host: r.registry.clone(),
            });
        }
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("manifest request answered {}", resp.status()),
            });
        }
        let media = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let bytes = Self::read_document(resp, &url).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(Error::Digest {
                what: format!("manifest from {url}"),
                expected: reference.into(),
                found: digest,
            });
        }
        Ok((bytes, media, digest))
    }

    /// Resolves `r` to one platform's manifest and config (default platform: this machine's).
    pub async fn resolve(
        &self,
        r: &Reference,
        platform: Option<&Platform>,
    ) -> Result<ResolvedImage, Error> {
        let (bytes, media, digest) = self.manifest(r, r.manifest_ref()).await?;
        let probe: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("manifest is not JSON: {e}"),
            })?;
        let is_index =
            oci::INDEX_TYPES.contains(&media.as_str()) || probe.get("manifests").is_some();
        let (bytes, digest) = if is_index {
            let index: oci::Index =
                serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                    url: r.to_string(),
                    reason: format!("image index: {e}"),
                })?;
            let want = platform.cloned().unwrap_or_else(Platform::host);
            let chosen = index
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| p.matches(&want)))
                .ok_or_else(|| Error::NotFound {
                    what: format!("a manifest for platform {}/{}", want.os, want.architecture),
                    repository: r.repository.clone(),
                    host: r.registry.clone(),
                })?;
            let (b, _, d) = self.manifest(r, &chosen.digest).await?;
            (b, d)
        } else {
            (bytes, digest)
        };
        let manifest: oci::Manifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("manifest: {e}"),
            })?;
        let config_bytes = self
            .blob_bytes(r, &manifest.config.digest, MAX_DOCUMENT)
            .await?;
        let config: oci::Config =
            serde_json::from_slice(&config_bytes).map_err(|e| Error::Protocol {
                url: r.to_string(),
                reason: format!("image config: {e}"),
            })?;
        Ok(ResolvedImage {
            reference: r.pinned(&digest),
            manifest_digest: digest,
            manifest,
            config,
        })
    }

    async fn blob_response(
        &self,
        r: &Reference,
        digest: &str,
        range: Option<&Range<u64>>,
    ) -> Result<reqwest::Response, Error> {
        let path = format!("/v2/{}/blobs/{digest}", r.repository);
        let mut headers = Vec::new();
        if let Some(rg) = range {
            headers.push((RANGE, format!("bytes={}-{}", rg.start, rg.end - 1)));
        }
        let resp = self
            .send(r.api_host(), &r.repository, Method::GET, &path, &headers)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                what: format!("blob {digest}"),
                repository: r.repository.clone(),
                host: r.registry.clone(),
            });
        }
        Ok(resp)
    }

    /// A whole (small) blob, verified against its digest.
    pub async fn blob_bytes(
        &self,
        r: &Reference,
        digest: &str,
        limit: usize,
    ) -> Result<Bytes, Error> {
        let _slot = self.slot(r.api_host()).await;
        let resp = self.blob_response(r, digest, None).await?;
        let url = resp.url().to_string();
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("blob request answered {}", resp.status()),
            });
        }
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            if out.len() + c.len() > limit {
                return Err(Error::Protocol {
                    url,
                    reason: format!("blob larger than {limit} bytes"),
                });
            }
            out.extend_from_slice(&c);
        }
        let found = format!("sha256:{}", hex::encode(Sha256::digest(&out)));
        if found != digest {
            return Err(Error::Digest {
                what: format!("blob from {url}"),
                expected: digest.into(),
                found,
            });
        }
        Ok(out.into())
    }

    /// Streams a blob's chunks to `sink` (the caller verifies the digest as it consumes them).
    pub async fn blob_stream(
        &self,
        r: &Reference,
        digest: &str,
        mut sink: impl FnMut(Bytes) -> bool,
    ) -> Result<u64, Error> {
        let resp = self.blob_response(r, digest, None).await?;
        let url = resp.url().to_string();
        if !resp.status().is_success() {
            return Err(Error::Protocol {
                url,
                reason: format!("blob request answered {}", resp.status()),
            });
        }
        let mut n = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            n += c.len() as u64;
            if !sink(c) {
                break;
            }
        }
        Ok(n)
    }

    /// Exactly the bytes `range` of a blob: a 206 must carry the matching `Content-Range`; a 200
    /// (a registry ignoring `Range`) is trimmed to the range. Anything else is an error.
    pub async fn read_range(
        &self,
        r: &Reference,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let _slot = self.slot(r.api_host()).await;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let want = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Config("range too large".into()))?;
        let resp = self.blob_response(r, digest, Some(&range)).await?;
        let url = resp.url().to_string();
        let status = resp.status();
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let expect = format!("bytes {}-{}/", range.start, range.end - 1);
                if !cr.starts_with(&expect) {
                    return Err(Error::Protocol {
                        url,
                        reason: format!("asked for {expect}…, got Content-Range {cr:?}"),
                    });
                }
                0
            }
            StatusCode::OK => range.start,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(Error::Protocol {
                    url,
                    reason: format!("range {range:?} is beyond the blob"),
                });
            }
            s => {
                return Err(Error::Protocol {
                    url,
                    reason: format!("range request answered {s}"),
                });
            }
        };
        let mut out = Vec::with_capacity(want);
        let mut skip = skip;
        let mut stream = resp.bytes_stream();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| Error::transport(&url, &e))?;
            let mut c = &c[..];
            let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(c.len());
            skip -= drop as u64;
            c = &c[drop..];
            let take = c.len().min(want - out.len());
            out.extend_from_slice(&c[..take]);
            if out.len() == want {
                break;
            }
        }
        if out.len() != want {
            return Err(Error::Protocol {
                url,
                reason: format!("short body: {} of {want} bytes", out.len()),
            });
        }
        Ok(out.into())
    }
}

fn scope_repo(scope: &str) -> String {
    scope
        .trim_start_matches("repository:")
        .rsplit_once(':')
        .map_or(scope, |(r, _)| r)
        .to_owned()
}

/// Exponential backoff with full jitter.
fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
    let exp = p
        .base
        .saturating_mul(1u32 << attempt.min(16))
        .min(p.max_delay);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let frac = (x % 1000) as u32;
    (exp / 2) + exp / 2 * frac / 1000
}

/// The machine's CA certificates (Debian's bundle), for public registries.
fn rustls_native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let Ok(pem) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") else {
        return Vec::new();
    };
    rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect()
}

/// A blocking [`std::io::Read`] over a blob streamed from the registry by a task on `runtime`:
/// CPU-bound consumers (inflate, tar walking) run on their own threads and pull bytes as they
/// need them, with a bounded buffer in between.
pub struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, Error>>,
    current: Bytes,
    failed: bool,
}

impl Client {
    /// Starts streaming blob `digest` of `r` on `runtime`; read it from any thread.
    #[must_use]
    pub fn blob_reader(
        &self,
        runtime: &tokio::runtime::Handle,
        r: &Reference,
        digest: &str,
    ) -> BlobReader {
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let (client, r, digest) = (self.clone(), r.clone(), digest.to_owned());
        runtime.spawn(async move {
            let _slot = client.slot(r.api_host()).await;
            let resp = match client.blob_response(&r, &digest, None).await {
                Ok(resp) if resp.status().is_success() => resp,
                Ok(resp) => {
                    let url = resp.url().to_string();
                    let _ = tx
                        .send(Err(Error::Protocol {
                            url,
                            reason: format!("blob request answered {}", resp.status()),
                        }))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let url = resp.url().to_string();
            let mut stream = resp.bytes_stream();
            while let Some(c) = stream.next().await {
                let item = c.map_err(|e| Error::transport(&url, &e));
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        BlobReader {
            rx,
            current: Bytes::new(),
            failed: false,
        }
    }
}

impl BlobReader {
    /// The next bytes as the network delivered them (shared, not copied); `None` at the end.
    /// After an error, only `None`.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        while self.current.is_empty() {
            if self.failed {
                return Ok(None);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => {
                    self.failed = true;
                    return Err(std::io::Error::other(e));
                }
                None => return Ok(None),
            }
        }
        Ok(Some(std::mem::take(&mut self.current)))
    }
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            match self.next_chunk()? {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(scope_repo("repository:a/b:pull"), "a/b");
        let policy = RetryPolicy::default();
        assert!(backoff(&policy, 10) <= policy.max_delay);
    }
}
