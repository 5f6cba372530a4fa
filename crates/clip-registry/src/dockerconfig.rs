//! Credentials from docker's `config.json`: `auths` entries, `credsStore`, and per-registry
//! `credHelpers` (run as `docker-credential-NAME get` processes, off the async runtime).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use crate::{Credentials, DOCKER_HUB, Error};

#[derive(Debug, Default, Deserialize)]
struct Raw {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs: only which fields are present.
        f.debug_struct("AuthEntry")
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "identitytoken",
                &self.identitytoken.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What a credential helper prints for `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// A loaded docker `config.json`.
#[derive(Debug, Default)]
pub struct DockerConfig {
    raw: Raw,
    helper_dir: Option<PathBuf>,
}

/// Where docker keeps its config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
#[must_use]
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// The keys docker may have stored a host's credentials under.
fn keys_for(host: &str) -> Vec<String> {
    if host == DOCKER_HUB || host == "registry-1.docker.io" {
        return vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "https://index.docker.io/v1".into(),
        ];
    }
    vec![
        host.to_owned(),
        format!("https://{host}"),
        format!("http://{host}"),
        format!("https://{host}/v1/"),
        format!("https://{host}/v2/"),
    ]
}

impl DockerConfig {
    /// Loads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let raw = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Config(format!(
                    "{}: not a valid docker config: {e}",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Raw::default(),
            Err(e) => return Err(Error::Config(format!("reading {}: {e}", path.display()))),
        };
        Ok(Self {
            raw,
            helper_dir: None,
        })
    }

    /// Looks for `docker-credential-*` helpers in `dir` instead of on `PATH`.
    #[must_use]
    pub fn with_helper_dir(mut self, dir: PathBuf) -> Self {
        self.helper_dir = Some(dir);
        self
    }

    /// The credentials for `host`: its credential helper, else `credsStore`, else `auths`.
    /// Blocking (it may run a helper process): call it off the async runtime.
    pub fn credentials_for(&self, host: &str) -> Result<Option<Credentials>, Error> {
        let keys = keys_for(host);
        let helper = keys
            .iter()
            .find_map(|k| self.raw.cred_helpers.get(k))
            .or(self.raw.creds_store.as_ref());
        if let Some(helper) = helper
            && let Some(c) = self.run_helper(helper, &keys[0])?
        {
            return Ok(Some(c));
        }
        for k in &keys {
            let Some(e) = self.raw.auths.get(k) else {
                continue;
            };
            if let (Some(u), Some(p)) = (&e.username, &e.password) {
                return Ok(Some(Credentials::Basic {
                    username: u.clone(),
                    password: p.clone(),
                }));
            }
            if let Some(a) = &e.auth {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "the docker config entry for {k} has an invalid `auth`"
                        ))
                    })?;
                let (u, p) = decoded.split_once(':').ok_or_else(|| {
                    Error::Config(format!(
                        "the docker config entry for {k} has an invalid `auth`"
                    ))
                })?;
                return Ok(Some(Credentials::Basic {
                    username: u.into(),
                    password: p.into(),
                }));
            }
            if let Some(t) = &e.identitytoken {
                return Ok(Some(Credentials::IdentityToken(t.clone())));
            }
        }
        Ok(None)
    }

    fn run_helper(&self, helper: &str, server: &str) -> Result<Option<Credentials>, Error> {
        let name = format!("docker-credential-{helper}");
        let program = self
            .helper_dir
            .as_ref()
            .map_or_else(|| PathBuf::from(&name), |d| d.join(&name));
        let mut child = Command::new(&program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Config(format!("running credential helper {name}: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(server.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Config(format!("running credential helper {name}: {e}")))?;
        if !out.status.success() {
            // Helpers answer "credentials not found" with a failure: not an error for us.
            let msg = String::from_utf8_lossy(&out.stdout).to_lowercase();
            if msg.contains("not found") {
                return Ok(None);
            }
            return Err(Error::Config(format!(
                "credential helper {name} failed for {server}"
            )));
        }
        let a: HelperAnswer = serde_json::from_slice(&out.stdout).map_err(|_| {
            Error::Config(format!(
                "credential helper {name} answered something that is not credentials"
            ))
        })?;
        Ok(Some(Credentials::Basic {
            username: a.username,
            password: a.secret,
        }))
    }
}
