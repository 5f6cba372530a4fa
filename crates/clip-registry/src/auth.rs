//! Authentication: credentials by host (configuration, then docker's config), the
//! `WWW-Authenticate` challenge, Bearer tokens per host and scope (refreshed a fifth of their
//! lifetime early), and OAuth2 refresh tokens (docker's `identitytoken`).

use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::AUTHORIZATION;

use crate::Error;
use crate::client::{Client, Credentials, Scheme, Token};

pub(crate) fn pattern_matches(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern == host
        || pattern
            .strip_prefix("*.")
            .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
}

/// Parses `Bearer realm="…",service="…",scope="…"` parameters.
pub(crate) fn challenge_params(s: &str) -> Vec<(String, String)> {
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
    pub(crate) fn credentials(&self, host: &str) -> Option<Credentials> {
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
    pub(crate) async fn load_docker_credentials(&self, host: &str) -> Result<(), Error> {
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

    pub(crate) fn basic_header(&self, host: &str) -> Option<String> {
        match self.credentials(host)? {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credentials::IdentityToken(_) => None,
        }
    }

    /// The Authorization header to send proactively, if the host's scheme is known.
    pub(crate) fn cached_auth(&self, host: &str, scope: &Scope) -> Option<String> {
        // The state lock is released before `basic_header`, which takes it again.
        let bearer = {
            let st = self.state.lock().ok()?;
            match st.schemes.get(host)? {
                Scheme::Basic => None,
                Scheme::Bearer { .. } => {
                    let t = st.tokens.get(&(host.to_owned(), scope.clone()))?;
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
    // Over 100 lines on purpose: the token exchange (challenge parameters, scopes, OAuth2 refresh
    // token or Basic, the answer's expiry) is one protocol conversation; each step uses what the
    // previous one learnt.
    pub(crate) async fn authenticate(
        &self,
        host: &str,
        scope: &Scope,
        challenge: &str,
    ) -> Result<(), Error> {
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
            let ours = scope.to_string();
            if !scopes.contains(&ours) {
                scopes.push(ours);
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
                    self.http_for(&realm_host(&realm_url))?
                        .post(realm_url)
                        .header(
                            reqwest::header::CONTENT_TYPE,
                            "application/x-www-form-urlencoded",
                        )
                        .body(form.query().unwrap_or_default().to_owned())
                }
                _ => self.http_for(&realm_host(&url))?.get(url.clone()),
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
                    repository: scope.repository().to_owned(),
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
                    (host.to_owned(), scope.clone()),
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
}

/// `host[:port]` of a token realm: a token server may have certs.d material of its own.
fn realm_host(u: &reqwest::Url) -> String {
    u.host_str()
        .map(|h| {
            u.port()
                .map_or_else(|| h.to_owned(), |p| format!("{h}:{p}"))
        })
        .unwrap_or_default()
}

/// What a request may do in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    /// Read manifests and blobs.
    Pull,
    /// Read and write (uploads, manifests, cross-repository mounts).
    PullPush,
}

/// A token scope: distribution's `repository:NAME:ACTIONS`, the key tokens are cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Scope {
    repository: String,
    access: Access,
}

impl Scope {
    /// `access` to `repository`.
    pub(crate) fn new(repository: &str, access: Access) -> Self {
        Self {
            repository: repository.to_owned(),
            access,
        }
    }

    /// The repository.
    pub(crate) fn repository(&self) -> &str {
        &self.repository
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let actions = match self.access {
            Access::Pull => "pull",
            Access::PullPush => "pull,push",
        };
        write!(f, "repository:{}:{actions}", self.repository)
    }
}
