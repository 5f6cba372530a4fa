//! A small blocking registry client used to push test images and to probe services.
//!
//! It is test support, not the product's client (`clip-registry` is): it speaks just enough of the
//! distribution protocol to upload blobs and manifests, answering Basic and Bearer challenges.

use std::sync::{Arc, Mutex, Once};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::blocking::{Client, Response};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use crate::error::{Error, Result};

/// Installs ring as the process-wide rustls provider (reqwest is built without one).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A TLS client config trusting only `ca_pem` (or nothing, for plain-HTTP use).
pub fn rustls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig> {
    rustls_config_with(ca_pem, None)
}

/// [`rustls_config`] presenting `identity` as a client certificate.
pub fn rustls_config_with(
    ca_pem: Option<&str>,
    identity: Option<&crate::pki::LeafCert>,
) -> Result<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
            let cert: rustls::pki_types::CertificateDer<'static> =
                cert.map_err(|e| Error::Crypto(format!("parsing CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Crypto(format!("adding CA: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(id.cert_der.clone())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(id.key_pkcs8_der.clone().into()),
            )
            .map_err(|e| Error::Crypto(format!("client certificate: {e}"))),
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `WWW-Authenticate`, if present.
    pub www_authenticate: Option<String>,
    /// `Docker-Content-Digest`, if present.
    pub digest: Option<String>,
    /// `Content-Type`, if present.
    pub content_type: Option<String>,
    /// `Location`, if present.
    pub location: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Blocking client for one registry.
#[derive(Debug, Clone)]
pub struct HttpClient {
    base: String,
    client: Client,
    credentials: Option<(String, String)>,
    bearer: Arc<Mutex<Option<String>>>,
}

fn http_err(context: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Http {
        context: context.into(),
        message: e.to_string(),
    }
}

impl HttpClient {
    /// A client for `base` (`http(s)://host:port`), trusting `ca_pem`, authenticating as `credentials`.
    pub fn new(
        base: String,
        ca_pem: Option<&str>,
        credentials: Option<(String, String)>,
    ) -> Result<Self> {
        Self::with_identity(base, ca_pem, credentials, None)
    }

    /// [`HttpClient::new`] presenting a client certificate.
    pub fn with_identity(
        base: String,
        ca_pem: Option<&str>,
        credentials: Option<(String, String)>,
        identity: Option<&crate::pki::LeafCert>,
    ) -> Result<Self> {
        let tls = rustls_config_with(ca_pem, identity)?;
        let client = Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(std::time::Duration::from_mins(2))
            .build()
            .map_err(|e| http_err(format!("building a client for {base}"), e))?;
        Ok(Self {
            base,
            client,
            credentials,
            bearer: Arc::new(Mutex::new(None)),
        })
    }

    /// The same client without credentials.
    #[must_use]
    pub fn anonymous(&self) -> Self {
        Self {
            credentials: None,
            bearer: Arc::new(Mutex::new(None)),
            ..self.clone()
        }
    }

    /// The same client with other credentials.
    #[must_use]
    pub fn with_credentials(&self, user: &str, password: &str) -> Self {
        Self {
            credentials: Some((user.into(), password.into())),
            bearer: Arc::new(Mutex::new(None)),
            ..self.clone()
        }
    }

    /// One request with no authentication handling at all.
    pub fn raw(&self, method: Method, path: &str, auth: Option<&str>) -> Result<Reply> {
        let url = self.url(path);
        let mut req = self
            .client
            .request(method, &url)
            .header(reqwest::header::ACCEPT, crate::media::ACCEPT_MANIFESTS);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let resp = req
            .send()
            .map_err(|e| http_err(format!("requesting {url}"), e))?;
        read_reply(resp, &url)
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Sends a request, answering one auth challenge (Basic or Bearer) if the registry asks.
    pub fn send(
        &self,
        method: &Method,
        path: &str,
        body: Option<(&str, &[u8])>,
        accept: Option<&str>,
    ) -> Result<Reply> {
        let url = self.url(path);
        let build = |auth: Option<String>| {
            let mut req = self.client.request(method.clone(), &url);
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            if let Some(a) = accept {
                req = req.header(reqwest::header::ACCEPT, a);
            }
            if let Some((ct, bytes)) = &body {
                req = req.header(CONTENT_TYPE, *ct).body(bytes.to_vec());
            }
            req
        };
        let cached = self
            .bearer
            .lock()
            .ok()
            .and_then(|b| b.clone())
            .map(|t| format!("Bearer {t}"));
        let reply = read_reply(
            build(cached)
                .send()
                .map_err(|e| http_err(format!("requesting {url}"), e))?,
            &url,
        )?;
        if reply.status != 401 {
            return Ok(reply);
        }
        let Some(challenge) = reply.www_authenticate.clone() else {
            return Ok(reply);
        };
        let Some(auth) = self.answer(&challenge)? else {
            return Ok(reply);
        };
        read_reply(
            build(Some(auth))
                .send()
                .map_err(|e| http_err(format!("requesting {url}"), e))?,
            &url,
        )
    }

    /// Turns a `WWW-Authenticate` challenge into an `Authorization` header value; `None` when a
    /// Basic challenge meets a client without credentials.
    fn answer(&self, challenge: &str) -> Result<Option<String>> {
        let basic = self
            .credentials
            .as_ref()
            .map(|(u, p)| format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))));
        if challenge.starts_with("Basic") {
            return Ok(basic);
        }
        let params = parse_challenge(challenge.strip_prefix("Bearer ").unwrap_or(challenge));
        let get = |k: &str| {
            params
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.as_str())
        };
        let realm = get("realm").ok_or_else(|| http_err("bearer challenge", "no realm"))?;
        let mut url =
            reqwest::Url::parse(realm).map_err(|e| http_err(format!("realm {realm}"), e))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = get("service") {
                q.append_pair("service", s);
            }
            if let Some(s) = get("scope") {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.client.get(url.clone());
        if let Some(b) = basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req
            .send()
            .map_err(|e| http_err(format!("requesting token from {url}"), e))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .map_err(|e| http_err(format!("reading token from {url}"), e))?;
        if status != StatusCode::OK {
            return Err(http_err(
                format!("token from {url}"),
                format!("{status}: {}", String::from_utf8_lossy(&body)),
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| http_err("token response", e))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| http_err("token response", "no token"))?
            .to_owned();
        if let Ok(mut b) = self.bearer.lock() {
            *b = Some(token.clone());
        }
        Ok(Some(format!("Bearer {token}")))
    }

    /// Uploads a blob (skipped if present) and returns its digest.
    pub fn push_blob(&self, repo: &str, digest: &str, bytes: &[u8]) -> Result<()> {
        let head = self.send(
            &Method::HEAD,
            &format!("/v2/{repo}/blobs/{digest}"),
            None,
            None,
        )?;
        if head.status == 200 {
            return Ok(());
        }
        let start = self.send(
            &Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            None,
            None,
        )?;
        if start.status != 202 {
            return Err(status_err(format!("starting upload to {repo}"), &start));
        }
        let location = start
            .location
            .ok_or_else(|| http_err("upload", "no Location header"))?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self.send(
            &Method::PUT,
            &format!("{location}{sep}digest={digest}"),
            Some(("application/octet-stream", bytes)),
            None,
        )?;
        if put.status != 201 {
            return Err(status_err(format!("uploading {digest} to {repo}"), &put));
        }
        Ok(())
    }
}

impl HttpClient {
    /// Uploads a manifest under `reference` (a tag or a digest).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let put = self.send(
            &Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            Some((media_type, bytes)),
            None,
        )?;
        if put.status != 201 {
            return Err(status_err(
                format!("pushing manifest {repo}:{reference}"),
                &put,
            ));
        }
        Ok(())
    }

    /// GETs a manifest, accepting every manifest type.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<Reply> {
        self.send(
            &Method::GET,
            &format!("/v2/{repo}/manifests/{reference}"),
            None,
            Some(crate::media::ACCEPT_MANIFESTS),
        )
    }
}

fn status_err(context: String, r: &Reply) -> Error {
    http_err(
        context,
        format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body)),
    )
}

fn read_reply(resp: Response, url: &str) -> Result<Reply> {
    let h = resp.headers();
    let s = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let status = resp.status().as_u16();
    let www_authenticate = s(WWW_AUTHENTICATE.as_str());
    let digest = s("docker-content-digest");
    let content_type = s(CONTENT_TYPE.as_str());
    let location = s(LOCATION.as_str());
    let body = resp
        .bytes()
        .map_err(|e| http_err(format!("reading {url}"), e))?
        .to_vec();
    Ok(Reply {
        status,
        www_authenticate,
        digest,
        content_type,
        location,
        body,
    })
}

/// Parses `k="v",k2="v2"` challenge parameters.
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (v, next) = if let Some(stripped) = after.strip_prefix('"') {
            match stripped.find('"') {
                Some(end) => (&stripped[..end], &stripped[end + 1..]),
                None => (stripped, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.push((k, v.to_owned()));
        rest = next.trim_start_matches(',').trim();
    }
    out
}
