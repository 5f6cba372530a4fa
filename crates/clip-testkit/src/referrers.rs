//! A registry that speaks the OCI 1.1 referrers API, for the clients that must use it where a
//! registry offers it. Debian's distribution 2.8 does not; the testkit puts a small front in
//! loopback before a real [`Registry`]: every request goes through to the registry unchanged,
//! except that manifests pushed with a `subject` are recorded, and
//! `GET /v2/NAME/referrers/DIGEST[?artifactType=T]` is answered from those records (an image
//! index of descriptors with `artifactType` and annotations, `OCI-Filters-Applied` when the
//! filter was applied), as registries that implement the API answer it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::error::Result;
use crate::fake::{FakeRegistry, FakeRequest, FakeResponse};
use crate::image::{BuiltImage, PushedImage};
use crate::registry::Registry;

/// Referrers recorded per `(repository, subject digest)`.
type Records = Arc<Mutex<BTreeMap<(String, String), Vec<Value>>>>;

/// A real registry behind a front that adds the referrers API.
#[derive(Debug)]
pub struct ReferrersRegistry {
    backend: Registry,
    front: FakeRegistry,
    records: Records,
}

impl ReferrersRegistry {
    /// Starts an anonymous registry and its referrers-speaking front.
    pub fn start() -> Result<Self> {
        let backend = Registry::start_anonymous()?;
        let records: Records = Arc::default();
        let base = format!("http://{}", backend.host());
        let http = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| crate::Error::Http {
                context: "the referrers front's client".into(),
                message: e.to_string(),
            })?;
        let rec = Arc::clone(&records);
        let front = FakeRegistry::start(move |req| answer(&http, &base, &rec, req))?;
        Ok(Self {
            backend,
            front,
            records,
        })
    }

    /// `127.0.0.1:PORT` of the front (what clients are given).
    #[must_use]
    pub fn host(&self) -> String {
        self.front.host()
    }

    /// Pushes `image` as `repo:tag` (to the registry behind); references name the front.
    pub fn push(&self, image: &BuiltImage, repo: &str, tag: &str) -> Result<PushedImage> {
        let p = self.backend.push(image, repo, tag)?;
        let (back, front) = (self.backend.host(), self.front.host());
        Ok(PushedImage {
            reference: p.reference.replacen(&back, &front, 1),
            pinned: p.pinned.replacen(&back, &front, 1),
            digest: p.digest,
        })
    }

    /// How many referrers the front recorded in all.
    #[must_use]
    pub fn recorded(&self) -> usize {
        self.records
            .lock()
            .map_or(0, |r| r.values().map(Vec::len).sum())
    }

    /// Every request the front saw.
    #[must_use]
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.front.requests()
    }
}

/// `/v2/NAME/referrers/DIGEST` → `(NAME, DIGEST, artifactType filter)`.
fn referrers_path(path: &str) -> Option<(String, String, Option<String>)> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/referrers/")?;
    let filter = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("artifactType="))
        .map(|t| t.replace("%2B", "+").replace("%2b", "+"));
    Some((name.to_owned(), digest.to_owned(), filter))
}

/// `/v2/NAME/manifests/REF` → `NAME`.
fn manifest_repo(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    rest.rsplit_once("/manifests/").map(|(n, _)| n.to_owned())
}

fn answer(
    http: &reqwest::blocking::Client,
    base: &str,
    records: &Records,
    req: &FakeRequest,
) -> FakeResponse {
    if req.method == "GET"
        && let Some((name, subject, filter)) = referrers_path(&req.path)
    {
        let list: Vec<Value> = records
            .lock()
            .ok()
            .and_then(|r| r.get(&(name, subject)).cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|d| {
                filter
                    .as_deref()
                    .is_none_or(|t| d["artifactType"].as_str() == Some(t))
            })
            .collect();
        let body = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": list});
        let mut resp = FakeResponse::new(200, serde_json::to_vec(&body).unwrap_or_default())
            .header("Content-Type", "application/vnd.oci.image.index.v1+json");
        if filter.is_some() {
            resp = resp.header("OCI-Filters-Applied", "artifactType");
        }
        return resp;
    }
    let resp = forward(http, base, req);
    if req.method == "PUT"
        && (200..300).contains(&resp.status)
        && let Some(name) = manifest_repo(&req.path)
    {
        record(records, &name, req);
    }
    resp
}

/// Records a pushed manifest that names a subject.
fn record(records: &Records, name: &str, req: &FakeRequest) {
    let Ok(m) = serde_json::from_slice::<Value>(&req.body) else {
        return;
    };
    let Some(subject) = m["subject"]["digest"].as_str() else {
        return;
    };
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&req.body))
    );
    let mut d = json!({
        "mediaType": m["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json"),
        "digest": digest,
        "size": req.body.len(),
        "artifactType": m["artifactType"].as_str().or_else(|| m["config"]["mediaType"].as_str()).unwrap_or_default(),
    });
    if m["annotations"].is_object() {
        d["annotations"] = m["annotations"].clone();
    }
    if let Ok(mut r) = records.lock() {
        let list = r.entry((name.to_owned(), subject.to_owned())).or_default();
        if !list.iter().any(|e| e["digest"] == d["digest"]) {
            list.push(d);
        }
    }
}

/// The request sent on to the registry, and its answer.
fn forward(http: &reqwest::blocking::Client, base: &str, req: &FakeRequest) -> FakeResponse {
    let Ok(method) = reqwest::Method::from_bytes(req.method.as_bytes()) else {
        return FakeResponse::new(400, "bad method");
    };
    let url = if req.path.starts_with("http") {
        req.path.clone()
    } else {
        format!("{base}{}", req.path)
    };
    let mut r = http.request(method, url).body(req.body.clone());
    for (k, v) in &req.headers {
        if !matches!(k.as_str(), "host" | "content-length" | "connection") {
            r = r.header(k, v);
        }
    }
    match r.send() {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                // A HEAD's length is the resource's: kept (no body is written for it).
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "connection" | "transfer-encoding")
                        && (k.as_str() != "content-length" || req.method == "HEAD")
                })
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
                .collect();
            let body = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
            let mut out = FakeResponse::new(status, body);
            out.headers = headers;
            out
        }
        Err(e) => FakeResponse::new(502, e.to_string()),
    }
}
