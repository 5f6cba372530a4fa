//! The real CNCF distribution registry (`docker-registry serve`) on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::http::HttpClient;
use crate::image::{BuiltImage, PushedImage};
use crate::pki::{LeafCert, TestCa};
use crate::process::{Service, free_port, port_open, which};
use crate::token::{TokenServer, TokenSettings, TokenStats};

/// How the registry authenticates clients.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anyone may pull and push.
    Anonymous,
    /// `auth.htpasswd`: one user with a password (bcrypt-hashed into the htpasswd file).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `auth.token`: bearer tokens from the testkit's token server.
    Token {
        /// Users allowed to pull and push.
        users: Vec<(String, String)>,
        /// Whether anonymous clients may pull.
        anonymous_pull: bool,
        /// Token lifetime (the registry rejects a token exactly this long after issue).
        lifetime: Duration,
    },
}

/// How to start a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Authentication mode.
    pub auth: Auth,
    /// Serve HTTPS with a certificate from a fresh testkit CA.
    pub tls: bool,
    /// With `tls`: demand a client certificate signed by the same CA (`http.tls.clientcas`);
    /// [`Registry::client_cert`] is one.
    pub client_certs: bool,
    /// Run as a pull-through cache of this registry URL (`proxy.remoteurl`): read-only, it
    /// fetches what it lacks from there and keeps it.
    pub proxy_of: Option<String>,
    /// Post notification envelopes (`notifications.endpoints`) to this URL, with
    /// `Authorization: Bearer TOKEN` when a token is given; failed deliveries are retried.
    pub notify: Option<(String, Option<String>)>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            auth: Auth::Anonymous,
            tls: false,
            client_certs: false,
            proxy_of: None,
            notify: None,
        }
    }
}

/// A running registry with its own storage, config and log; everything is removed on drop.
#[derive(Debug)]
pub struct Registry {
    service: Service,
    dir: TempDir,
    addr: SocketAddr,
    options: RegistryOptions,
    ca: Option<Arc<TestCa>>,
    token_server: Option<TokenServer>,
    config: PathBuf,
    client_cert: Option<LeafCert>,
}

const SERVICE_NAME: &str = "clip-testkit-registry";

impl Registry {
    /// Pushes `image` (blobs, manifests and the index) to `repo` and tags its top-level
    /// document `tag`.
    pub fn push(&self, image: &BuiltImage, repo: &str, tag: &str) -> Result<PushedImage> {
        let client = self.client()?;
        for m in &image.manifests {
            for l in &m.layers {
                client.push_blob(repo, &l.blob.digest, &l.blob.bytes)?;
            }
            client.push_blob(repo, &m.config.digest, &m.config.bytes)?;
            let reference = if image.index.is_some() {
                m.manifest.digest.as_str()
            } else {
                tag
            };
            client.push_manifest(repo, reference, &m.manifest.media_type, &m.manifest.bytes)?;
        }
        if let Some(index) = &image.index {
            client.push_manifest(repo, tag, &index.media_type, &index.bytes)?;
        }
        let host = self.host();
        Ok(PushedImage {
            reference: format!("{host}/{repo}:{tag}"),
            pinned: format!("{host}/{repo}@{}", image.digest()),
            digest: image.digest().to_owned(),
        })
    }

    /// Starts an anonymous plain-HTTP registry.
    pub fn start_anonymous() -> Result<Self> {
        Self::start(RegistryOptions::default())
    }

    /// Starts a registry as described by `options` and waits until `/v2/` answers.
    // Over 100 lines on purpose: test support: writes the registry's configuration (auth, TLS,
    // notifications) and starts it; the configuration reads as one document.
    pub fn start(options: RegistryOptions) -> Result<Self> {
        let program = which("docker-registry").ok_or_else(|| Error::MissingProgram {
            program: "docker-registry".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("clip-registry-")
            .tempdir()
            .ctx(|| "creating the registry's temp dir".into())?;
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).ctx(|| format!("creating {}", storage.display()))?;

        let needs_ca = options.tls || matches!(options.auth, Auth::Token { .. });
        // The CA sits alone in certs/: skopeo and buildah read every *.key beside it as a client key.
        let ca = if needs_ca {
            let certs = dir.path().join("certs");
            std::fs::create_dir(&certs).ctx(|| format!("creating {}", certs.display()))?;
            Some(Arc::new(TestCa::new(&certs, "clip testkit registry CA")?))
        } else {
            None
        };

        let mut auth_yaml = String::new();
        let mut token_server = None;
        match &options.auth {
            Auth::Anonymous => {}
            Auth::Basic { username, password } => {
                let hash =
                    bcrypt::hash(password, 5).map_err(|e| Error::Crypto(format!("bcrypt: {e}")))?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{username}:{hash}\n"))
                    .ctx(|| format!("writing {}", htpasswd.display()))?;
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: clip-testkit\n    path: {}\n",
                    htpasswd.display()
                );
            }
            Auth::Token {
                users,
                anonymous_pull,
                lifetime,
            } => {
                let ca = ca.as_ref().ok_or_else(|| Error::Crypto("no CA".into()))?;
                let signer = ca.issue(dir.path(), "token-signer", false)?;
                let server = TokenServer::start(
                    TokenSettings {
                        service: SERVICE_NAME.into(),
                        issuer: "clip-testkit-token-server".into(),
                        lifetime: *lifetime,
                        users: users.clone(),
                        anonymous_pull: *anonymous_pull,
                    },
                    &signer,
                )?;
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {SERVICE_NAME}\n    issuer: clip-testkit-token-server\n    rootcertbundle: {}\n",
                    server.realm(),
                    ca.cert_path().display()
                );
                token_server = Some(server);
            }
        }
        let mut client_cert = None;
        let tls_yaml = if options.tls {
            let ca = ca.as_ref().ok_or_else(|| Error::Crypto("no CA".into()))?;
            let leaf = ca.issue(dir.path(), "registry", true)?;
            let mut y = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                leaf.cert_path.display(),
                leaf.key_path.display()
            );
            if options.client_certs {
                y += "    clientcas:\n      - ";
                y += &ca.cert_path().display().to_string();
                y += "\n";
                client_cert = Some(ca.issue(dir.path(), "client", false)?);
            }
            y
        } else {
            String::new()
        };
        let notify_yaml = options
            .notify
            .as_ref()
            .map(|(url, token)| {
                let headers = token
                    .as_ref()
                    .map(|t| format!("      headers:\n        Authorization: [\"Bearer {t}\"]\n"))
                    .unwrap_or_default();
                format!(
                    "notifications:\n  endpoints:\n    - name: clip\n      url: {url}\n{headers}      timeout: 2s\n      threshold: 2\n      backoff: 500ms\n"
                )
            })
            .unwrap_or_default();
        let proxy_yaml = options
            .proxy_of
            .as_ref()
            .map(|url| format!("proxy:\n  remoteurl: {url}\n"))
            .unwrap_or_default();

        // A taken port (someone grabbed it between free_port and bind) is retried with a new one.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let config = dir.path().join("config.yml");
            let yaml = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nvalidation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\nhttp:\n  addr: {addr}\n  secret: clip-testkit-secret\n{tls_yaml}{auth_yaml}{proxy_yaml}{notify_yaml}",
                storage.display()
            );
            std::fs::write(&config, yaml).ctx(|| format!("writing {}", config.display()))?;
            let log = dir.path().join("registry.log");
            let mut service = spawn(&program, &config, &log)?;
            let probe = v2_probe(addr, options.tls, ca.as_deref(), client_cert.as_ref())?;
            match service.wait_ready(Duration::from_secs(20), || port_open(addr) && probe()) {
                Ok(()) => {
                    return Ok(Self {
                        service,
                        dir,
                        addr,
                        options,
                        ca,
                        token_server,
                        config,
                        client_cert,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Crypto("unreachable".into())))
    }

    /// `127.0.0.1:PORT`, the registry host as image references spell it.
    #[must_use]
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    #[must_use]
    pub fn base_url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Whether the registry serves HTTPS.
    #[must_use]
    pub fn is_tls(&self) -> bool {
        self.options.tls
    }

    /// The CA that signed the TLS certificate and the token signer, if any.
    #[must_use]
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_deref()
    }

    /// A directory holding `ca.crt` (for skopeo's `--cert-dir`), if the registry uses TLS.
    #[must_use]
    pub fn cert_dir(&self) -> Option<&Path> {
        self.ca
            .as_ref()
            .filter(|_| self.options.tls)
            .and_then(|ca| ca.cert_path().parent())
    }

    /// Credentials of a user allowed to push, if the registry has any.
    #[must_use]
    pub fn credentials(&self) -> Option<(String, String)> {
        match &self.options.auth {
            Auth::Anonymous => None,
            Auth::Basic { username, password } => Some((username.clone(), password.clone())),
            Auth::Token { users, .. } => users.first().cloned(),
        }
    }

    /// The token server's counters, in token mode.
    #[must_use]
    pub fn token_stats(&self) -> Option<&TokenStats> {
        self.token_server.as_ref().map(TokenServer::stats)
    }

    /// An HTTP client for this registry that authenticates as the configured user (with the
    /// client certificate, when the registry demands one).
    pub fn client(&self) -> Result<HttpClient> {
        HttpClient::with_identity(
            self.base_url(),
            self.ca.as_ref().map(|c| c.cert_pem()),
            self.credentials(),
            self.client_cert.as_ref(),
        )
    }

    /// The client certificate this registry accepts, when it demands one.
    #[must_use]
    pub fn client_cert(&self) -> Option<&LeafCert> {
        self.client_cert.as_ref()
    }

    /// Writes this registry's trust the way docker and containerd read it: under
    /// `root/HOST:PORT/`, `ca.crt`, and `client.cert` + `client.key` when it demands a client
    /// certificate. Returns that directory.
    pub fn write_certs_d(&self, root: &Path) -> Result<PathBuf> {
        self.write_certs_d_as(root, &self.host())
    }

    /// [`Registry::write_certs_d`] for this registry reached as `host` (through a [`crate::Tap`]).
    pub fn write_certs_d_as(&self, root: &Path, host: &str) -> Result<PathBuf> {
        let dir = root.join(host);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        if let Some(ca) = self.ca.as_ref().filter(|_| self.options.tls) {
            let p = dir.join("ca.crt");
            std::fs::write(&p, ca.cert_pem()).ctx(|| format!("writing {}", p.display()))?;
        }
        if let Some(c) = &self.client_cert {
            for (from, to) in [(&c.cert_path, "client.cert"), (&c.key_path, "client.key")] {
                std::fs::copy(from, dir.join(to)).ctx(|| format!("copying {}", from.display()))?;
            }
        }
        Ok(dir)
    }

    /// Whether this registry's storage holds blob `digest` (`sha256:…`) — for a pull-through
    /// cache, whether it has kept it.
    #[must_use]
    pub fn has_blob(&self, digest: &str) -> bool {
        let Some(hex) = digest.strip_prefix("sha256:") else {
            return false;
        };
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(""))
            .join(hex)
            .join("data")
            .is_file()
    }

    /// The registry's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.service.log_tail(64 * 1024)
    }

    /// Stops the registry process, keeping its storage (to model an outage).
    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// Starts the registry again on the same address with the same storage.
    pub fn restart(&mut self) -> Result<()> {
        self.service.stop();
        let program = which("docker-registry").ok_or_else(|| Error::MissingProgram {
            program: "docker-registry".into(),
        })?;
        let log = self.dir.path().join("registry.log");
        let mut service = spawn(&program, &self.config, &log)?;
        let addr = self.addr;
        let probe = v2_probe(
            addr,
            self.options.tls,
            self.ca.as_deref(),
            self.client_cert.as_ref(),
        )?;
        service.wait_ready(Duration::from_secs(20), || port_open(addr) && probe())?;
        self.service = service;
        Ok(())
    }
}

/// A readiness check: `GET /v2/` gets an HTTP answer (200, or 401 when auth is on).
fn v2_probe(
    addr: SocketAddr,
    tls: bool,
    ca: Option<&TestCa>,
    identity: Option<&LeafCert>,
) -> Result<impl Fn() -> bool + use<>> {
    let scheme = if tls { "https" } else { "http" };
    let client = HttpClient::with_identity(
        format!("{scheme}://{addr}"),
        ca.map(TestCa::cert_pem),
        None,
        identity,
    )?;
    Ok(move || {
        client
            .raw(reqwest::Method::GET, "/v2/", None)
            .is_ok_and(|r| r.status == 200 || r.status == 401)
    })
}

fn spawn(program: &Path, config: &Path, log: &Path) -> Result<Service> {
    let mut cmd = Command::new(program);
    cmd.arg("serve").arg(config);
    Service::spawn("docker-registry", cmd, log)
}
