//! The HTTP API: JSON in, JSON out; flows run on blocking threads.
//!
//! Every error, whatever produced it (a flow, a bad body, the limits, the credential check), is
//! answered as `{"error": "…"}` with its status: 400, 401, 403, 404, 408, 413, 429, 502, 500.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clip_core::service::{ImageService, ServiceError};
use serde::Deserialize;

use crate::auth::Credentials;

/// Limits of the API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Flows (pull, build, mount, run) running at once; more are answered 429.
    pub(crate) max_flows: usize,
    /// Largest uploaded build context.
    pub(crate) max_context_bytes: u64,
    /// Longest a request may take before it is answered 408 (its flow keeps running and stores
    /// its archive; asking again finds it).
    pub(crate) request_timeout: Duration,
}

/// Largest JSON request body.
const MAX_JSON: usize = 1 << 20;

struct App {
    svc: Arc<ImageService>,
    flows: Arc<tokio::sync::Semaphore>,
    limits: Limits,
    on_push: Option<Arc<clip_core::service::on_push::PushIndexer>>,
}

type Svc = Arc<App>;

/// An error answer: a status and a message, as JSON.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(serde_json::json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = match e {
            ServiceError::UnknownImage(_) => StatusCode::NOT_FOUND,
            ServiceError::Config(_) => StatusCode::BAD_REQUEST,
            ServiceError::Registry(_) | ServiceError::Store(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(code, e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        Self(e.status(), e.body_text())
    }
}

fn bad_request(what: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, what.to_string())
}

fn forbidden(what: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::FORBIDDEN, what.to_string())
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| bad_request(format!("request body: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body: {e}")))
}

impl App {
    /// Runs a flow on a blocking thread, if a flow slot is free (429 otherwise).
    async fn flow<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ImageService) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = Arc::clone(&self.flows).try_acquire_owned().map_err(|_| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} flows are running, the most this worker takes at once; try again later",
                    self.limits.max_flows
                ),
            )
        })?;
        let svc = Arc::clone(&self.svc);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&svc)
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    /// Reads something quick (listings) on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ImageService) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let svc = Arc::clone(&self.svc);
        tokio::task::spawn_blocking(move || f(&svc).map_err(ApiError::from))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullReq {
    image: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BuildReq {
    context: PathBuf,
    dockerfile: Option<PathBuf>,
    #[serde(default)]
    build_args: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunReq {
    #[serde(default)]
    args: Vec<String>,
}

fn mount_json(m: &clip_core::service::MountedImage) -> serde_json::Value {
    let s = m.stats();
    serde_json::json!({"image_id": m.image_id, "version": m.version, "mountpoint": m.mountpoint,
        "fetched_bytes": s.fetched_bytes, "served_bytes": s.served_bytes, "cache_hits": s.cache.hits})
}

/// A build context named by a host path: only beneath `imageService.buildContextRoot`, resolved
/// (symlinks included) before the check, and the resolved path is what the build reads.
fn confined(
    root: Option<&FsPath>,
    context: &FsPath,
    dockerfile: Option<&FsPath>,
) -> Result<(PathBuf, PathBuf), ApiError> {
    let Some(root) = root else {
        return Err(forbidden(
            "build contexts on the worker's disk are not accepted (imageService.buildContextRoot is not set); upload the context as a tar stream to /v1/build-context",
        ));
    };
    let root = std::fs::canonicalize(root).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("buildContextRoot {}: {e}", root.display()),
        )
    })?;
    let inside = |p: &FsPath, what: &str| -> Result<PathBuf, ApiError> {
        let resolved = std::fs::canonicalize(p)
            .map_err(|e| bad_request(format!("{what} {}: {e}", p.display())))?;
        if resolved.starts_with(&root) {
            Ok(resolved)
        } else {
            Err(forbidden(format!(
                "{what} {} is not beneath the build context root {} (symlinks are resolved first)",
                p.display(),
                root.display()
            )))
        }
    };
    let ctx = inside(context, "context")?;
    let df = match dockerfile {
        Some(d) => inside(d, "dockerfile")?,
        None => inside(&ctx.join("Dockerfile"), "dockerfile")?,
    };
    Ok((ctx, df))
}

/// The path registry notifications are posted to.
const WEBHOOK: &str = "/v1/registry-events";

/// What every request passes: the API's credentials (the webhook's own for [`WEBHOOK`]) and a
/// time limit.
#[derive(Clone)]
struct Guard {
    api: Arc<Credentials>,
    webhook: Option<Arc<Credentials>>,
    timeout: Duration,
}

/// The API. `webhook`: the index-on-push endpoint's own secrets (`indexOnPush.secretFile`);
/// with them, that endpoint accepts nothing else (not the API's tokens).
pub(crate) fn router(
    svc: Arc<ImageService>,
    limits: Limits,
    creds: Arc<Credentials>,
    on_push: Option<(
        Arc<clip_core::service::on_push::PushIndexer>,
        Arc<Credentials>,
    )>,
) -> axum::Router {
    let (on_push, webhook) = on_push.unzip();
    let app = Arc::new(App {
        svc,
        flows: Arc::new(tokio::sync::Semaphore::new(limits.max_flows.max(1))),
        limits,
        on_push,
    });
    let context_limit = usize::try_from(limits.max_context_bytes).unwrap_or(usize::MAX);
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/pull", post(pull))
        .route("/v1/build", post(build))
        .route(
            "/v1/build-context",
            post(build_context).layer(axum::extract::DefaultBodyLimit::max(context_limit)),
        )
        .route("/v1/images/{id}/mount", post(mount).delete(unmount))
        .route("/v1/images/{id}/run", post(run))
        .route(WEBHOOK, post(push_event))
        .route("/v1/images", get(images))
        .route("/v1/mounts", get(mounts))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON))
        .layer(axum::middleware::from_fn_with_state(
            Guard {
                api: creds,
                webhook,
                timeout: limits.request_timeout,
            },
            guard,
        ))
        .with_state(app)
}

type Body = Result<Bytes, BytesRejection>;

/// `POST /v1/pull`.
async fn pull(State(a): State<Svc>, body: Body) -> Result<impl IntoResponse, ApiError> {
    let r: PullReq = json(&body?)?;
    let out = a.flow(move |s| Ok(s.pull_and_archive(&r.image)?)).await?;
    Ok(Json(out))
}

/// `POST /v1/build`: a context beneath `buildContextRoot`.
async fn build(State(a): State<Svc>, body: Body) -> Result<impl IntoResponse, ApiError> {
    let r: BuildReq = json(&body?)?;
    let (ctx, df) = confined(
        a.svc.config().build_context_root.as_deref(),
        &r.context,
        r.dockerfile.as_deref(),
    )?;
    let args: Vec<_> = r.build_args.into_iter().collect();
    let out = a
        .flow(move |s| Ok(s.build_and_archive(&df, &ctx, &args)?))
        .await?;
    Ok(Json(out))
}

/// `POST /v1/build-context`: an uploaded tar stream as the context (bounded), with
/// `?dockerfile=` and `?arg.NAME=VALUE`.
async fn build_context(
    State(a): State<Svc>,
    Query(q): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let body = body?;
    let max = a.limits.max_context_bytes;
    let out = a
        .flow(move |s| {
            let dir = tempfile::tempdir().map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("staging the context: {e}"),
                )
            })?;
            clip_core::extract::untar(
                &body[..],
                dir.path(),
                clip_core::extract::UntarLimits {
                    max_bytes: max,
                    ..Default::default()
                },
            )
            .map_err(|e| bad_request(format!("the uploaded context (a tar stream): {e}")))?;
            let name = q.get("dockerfile").map_or("Dockerfile", String::as_str);
            let (ctx, df) = confined(Some(dir.path()), dir.path(), Some(&dir.path().join(name)))?;
            let args: Vec<(String, String)> = q
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("arg.").map(|k| (k.to_owned(), v.clone())))
                .collect();
            Ok(s.build_and_archive(&df, &ctx, &args)?)
        })
        .await?;
    Ok(Json(out))
}

/// `POST /v1/images/{id}/mount` (PullLazy).
async fn mount(
    State(a): State<Svc>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let m = a.flow(move |s| Ok(s.pull_lazy(&id)?)).await?;
    Ok(Json(mount_json(&m)))
}

/// `DELETE /v1/images/{id}/mount`.
async fn unmount(
    State(a): State<Svc>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    a.read(move |s| s.unmount(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/images/{id}/run`.
async fn run(
    State(a): State<Svc>,
    Path(id): Path<String>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let r: RunReq = json(&body?)?;
    let out = a
        .flow(move |s| Ok(s.run(&id, (!r.args.is_empty()).then_some(&r.args[..]))?))
        .await?;
    Ok(Json(out))
}

/// The index-on-push webhook: a registry's notification envelope.
async fn push_event(State(a): State<Svc>, body: Body) -> Result<impl IntoResponse, ApiError> {
    use clip_core::service::on_push::OnPushError;
    let body = body?;
    let Some(q) = a.on_push.clone() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            OnPushError::NotConfigured.to_string(),
        ));
    };
    let out = tokio::task::spawn_blocking(move || q.submit(&body))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            OnPushError::QueueFull => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            other => bad_request(other),
        })?;
    Ok(Json(out))
}

/// `GET /v1/images`.
async fn images(State(a): State<Svc>) -> Result<impl IntoResponse, ApiError> {
    let images = a.read(ImageService::images).await?;
    Ok(Json(images))
}

/// `GET /v1/mounts`.
async fn mounts(State(a): State<Svc>) -> impl IntoResponse {
    Json(
        a.svc
            .mounts()
            .iter()
            .map(|m| mount_json(m))
            .collect::<Vec<_>>(),
    )
}

/// `GET /metrics`: the process's recorder, then the service's own gauges.
async fn metrics_text(State(a): State<Svc>) -> String {
    let mut text = PROMETHEUS
        .get()
        .map(metrics_exporter_prometheus::PrometheusHandle::render)
        .unwrap_or_default();
    text.push_str(&metrics(&a.svc));
    text
}

/// Every request: the credential check (read-only endpoints may be public), then a time limit.
async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (creds, read_only) = match &g.webhook {
        Some(w) if req.uri().path() == WEBHOOK => (w, false),
        _ => (&g.api, read_only),
    };
    let timeout = g.timeout;
    if let Err(why) = creds.check(header, read_only) {
        return ApiError(StatusCode::UNAUTHORIZED, why).into_response();
    }
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} s; its flow keeps running and stores its archive — ask again later",
                timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Prometheus text exposition of the mounts' counters.
fn metrics(s: &ImageService) -> String {
    use std::fmt::Write as _;
    let mounts = s.mounts();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# TYPE clip_mounts gauge\nclip_mounts {}",
        mounts.len()
    );
    for (name, kind) in [
        ("clip_fetched_bytes_total", "counter"),
        ("clip_served_bytes_total", "counter"),
        ("clip_cache_hits_total", "counter"),
        ("clip_cache_misses_total", "counter"),
    ] {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for m in &mounts {
            let st = m.stats();
            let v = match name {
                "clip_fetched_bytes_total" => st.fetched_bytes,
                "clip_served_bytes_total" => st.served_bytes,
                "clip_cache_hits_total" => st.cache.hits,
                _ => st.cache.misses,
            };
            let _ = writeln!(
                out,
                "{name}{{image_id=\"{}\",version=\"{}\"}} {v}",
                m.image_id,
                m.version.number()
            );
        }
    }
    out
}

/// The `metrics` facade's recorder, rendered at `/metrics`.
pub(crate) static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Blocks until SIGTERM/SIGINT.
pub(crate) fn wait_for_signal() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(shutdown_signal());
    Ok(())
}
