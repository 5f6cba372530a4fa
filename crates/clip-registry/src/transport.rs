//! The transport: one request with authentication, hand-followed redirects (credentials stay
//! with the registry; blob redirect targets are reused for a minute), per-host request slots,
//! HTTPS first (plain HTTP only for loopback and insecure hosts that do not speak TLS), and
//! retries with exponential backoff and jitter on connection errors, 5xx and 429.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use crate::Error;
use crate::auth::{Access, Scope};
use crate::client::{Client, MAX_DOCUMENT, RetryPolicy, is_loopback};

impl Client {
    /// Follows one redirect by hand: to another host without credentials (object storage), to
    /// the same host with them; a blob GET's target is remembered for a minute.
    pub(crate) async fn follow(
        &self,
        resp: reqwest::Response,
        url: &str,
        method: &Method,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
        scope: &Scope,
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
        let http = if same_origin {
            self.http_for(&from_host(&from))?
        } else {
            self.http.clone()
        };
        let mut req = http.request(method.clone(), target.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        if same_origin {
            let host = from_host(&from);
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
    pub(crate) fn may_use_http(&self, host: &str) -> bool {
        is_loopback(host)
            || self.cfg.insecure.iter().any(|h| h == host)
            || self
                .cfg
                .mirrors
                .iter()
                .flat_map(|(_, ms)| ms)
                .any(|m| m.insecure && m.host == host)
    }

    /// The mirrors configured for `host` (the reference's registry or its API host).
    fn mirrors_of(&self, host: &str) -> Vec<crate::mirrors::Mirror> {
        let aliases: &[&str] = if host == "registry-1.docker.io" {
            &["registry-1.docker.io", "docker.io", "index.docker.io"]
        } else {
            &[host]
        };
        self.cfg
            .mirrors
            .iter()
            .filter(|(h, _)| aliases.contains(&h.as_str()))
            .flat_map(|(_, ms)| ms.iter().cloned())
            .collect()
    }

    pub(crate) fn base_url(&self, host: &str) -> String {
        let https = !self.may_use_http(host)
            || self
                .state
                .lock()
                .ok()
                .and_then(|st| st.https.get(host).copied())
                .unwrap_or(true);
        format!("{}://{host}", if https { "https" } else { "http" })
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
        self.send_with(host, repository, Access::Pull, method, path, headers, None)
            .await
    }

    /// [`Self::send`] with the access asked for and an optional body.
    /// `path` may also be an absolute URL on `host` (an upload `Location`). Pull requests go to
    /// the host's mirrors first, in order ([`crate::mirrors`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_with(
        &self,
        host: &str,
        repository: &str,
        access: Access,
        method: Method,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, Error> {
        let pull = access == Access::Pull
            && (method == Method::GET || method == Method::HEAD)
            && path.starts_with('/');
        if pull {
            // One attempt per mirror: a dead mirror must not cost the registry's retries.
            let once = RetryPolicy {
                attempts: 1,
                ..self.cfg.retry.clone()
            };
            for m in self.mirrors_of(host) {
                let skip = self.state.lock().ok().is_some_and(|st| {
                    st.mirror_down
                        .get(&m.host)
                        .is_some_and(|until| Instant::now() < *until)
                });
                if skip {
                    continue;
                }
                match self
                    .send_to(
                        &m.host,
                        repository,
                        access,
                        method.clone(),
                        path,
                        headers,
                        None,
                        &once,
                    )
                    .await
                {
                    Ok(resp) if resp.status().is_success() => {
                        tracing::debug!(mirror = %m.host, registry = host, path, "served by a mirror");
                        return Ok(resp);
                    }
                    Ok(resp) => {
                        tracing::debug!(mirror = %m.host, status = %resp.status(), path, "mirror did not serve it; trying the next");
                    }
                    Err(e) => {
                        tracing::info!(mirror = %m.host, error = %e, "mirror unreachable; skipping it for 30 s");
                        if let Ok(mut st) = self.state.lock() {
                            st.mirror_down
                                .insert(m.host.clone(), Instant::now() + Duration::from_secs(30));
                        }
                    }
                }
            }
        }
        let policy = self.cfg.retry.clone();
        self.send_to(
            host, repository, access, method, path, headers, body, &policy,
        )
        .await
    }

    /// A blob the registry redirected recently: straight to the target (no credentials). `None`
    /// when there is none, or the target no longer answers (an expired signed URL: forgotten,
    /// the registry is asked again).
    async fn via_remembered_redirect(
        &self,
        url: &str,
        headers: &[(reqwest::header::HeaderName, String)],
    ) -> Option<reqwest::Response> {
        let target = self.state.lock().ok().and_then(|st| {
            st.redirects
                .get(url)
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(t, _)| t.clone())
        })?;
        let mut req = self.http.get(&target);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Ok(resp) = req.send().await
            && resp.status().is_success()
        {
            return Some(resp);
        }
        if let Ok(mut st) = self.state.lock() {
            st.redirects.remove(url);
        }
        None
    }

    /// Whether an HTTPS request to `host` that failed with `e` is to be tried over plain HTTP:
    /// a loopback or insecure host, not known to speak HTTPS (unknown, or a concurrent first
    /// request already found plain HTTP), whose peer does not speak TLS at all — never after a
    /// TLS failure (an untrusted certificate, a refused client certificate).
    fn falls_back_to_http(&self, host: &str, e: &reqwest::Error) -> bool {
        let not_https = self
            .state
            .lock()
            .ok()
            .is_some_and(|st| st.https.get(host) != Some(&true));
        self.may_use_http(host) && not_https && crate::trust::peer_speaks_no_tls(e)
    }

    /// One host: authentication, one re-authentication on 401/403, redirects, retries.
    ///
    /// Over 100 lines on purpose: one request's state machine (re-authenticate once, follow a
    /// redirect, fall back to plain HTTP once, retry with back-off until the policy's attempts
    /// or deadline) stays in one loop, so its bookkeeping — the attempt count, whether it
    /// re-authenticated, the HTTPS error a plain-HTTP answer may have to report — is in one
    /// place.
    #[allow(clippy::too_many_arguments)]
    async fn send_to(
        &self,
        host: &str,
        repository: &str,
        access: Access,
        method: Method,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
        body: Option<Bytes>,
        policy: &RetryPolicy,
    ) -> Result<reqwest::Response, Error> {
        self.load_docker_credentials(host).await?;
        let http = self.http_for(host)?;
        let mut url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base_url(host))
        };
        let scope = Scope::new(repository, access);
        if method == Method::GET
            && let Some(resp) = self.via_remembered_redirect(&url, headers).await
        {
            return Ok(resp);
        }
        let mut https_error: Option<Error> = None;
        let start = Instant::now();
        let mut reauthed = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = http.request(method.clone(), &url);
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
                        let after = retry_after(&resp);
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
                    if url.starts_with("https://") && self.falls_back_to_http(host, &e) {
                        // First contact with a loopback/insecure host that does not speak TLS:
                        // plain HTTP. Never after a TLS failure (an untrusted certificate, a
                        // refused client certificate): that is reported as what it is.
                        https_error = Some(Error::transport(&url, &e));
                        if let Ok(mut st) = self.state.lock() {
                            st.https.insert(host.to_owned(), false);
                        }
                        url = format!("http://{host}{path}");
                        attempt -= 1;
                        continue;
                    }
                    if attempt >= policy.attempts
                        || start.elapsed() >= policy.deadline
                        || crate::trust::is_tls_failure(&e)
                    {
                        // The current attempt's error (a TLS port answering HTTP is handled above).
                        return Err(Error::transport(&url, &e));
                    }
                    None
                }
            };
            tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(policy, attempt))).await;
        }
    }

    pub(crate) async fn read_document(resp: reqwest::Response, url: &str) -> Result<Bytes, Error> {
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
}

/// `host[:port]` of a URL, as registries are named.
fn from_host(u: &reqwest::Url) -> String {
    u.host_str()
        .map(|h| {
            u.port()
                .map_or_else(|| h.to_owned(), |p| format!("{h}:{p}"))
        })
        .unwrap_or_default()
}

/// Exponential backoff with full jitter.
pub(crate) fn backoff(p: &RetryPolicy, attempt: u32) -> Duration {
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

/// A `Retry-After` header in seconds.
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}
