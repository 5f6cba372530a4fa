//! The HTTP API: JSON in, JSON out; flows run on blocking threads.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clip_core::service::{ImageService, ServiceError};
use serde::Deserialize;

type Svc = Arc<ImageService>;

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
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

fn bad_request(what: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, what.to_string())
}

async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(Into::into)
}

#[derive(Deserialize)]
struct PullReq {
    image: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BuildReq {
    context: std::path::PathBuf,
    dockerfile: Option<std::path::PathBuf>,
    #[serde(default)]
    build_args: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct RunReq {
    #[serde(default)]
    args: Vec<String>,
}

fn mount_json(m: &clip_core::service::MountedImage) -> serde_json::Value {
    let s = m.stats();
    serde_json::json!({"image_id": m.image_id, "version": m.version, "mountpoint": m.mountpoint,
        "fetched_bytes": s.fetched_bytes, "served_bytes": s.served_bytes, "cache_hits": s.cache.hits})
}

fn router(svc: Svc) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/pull",
            post(|State(s): State<Svc>, Json(r): Json<PullReq>| async move {
                let out = blocking(move || s.pull_and_archive(&r.image)).await?;
                Ok::<_, ApiError>(Json(out))
            }),
        )
        .route(
            "/v1/build",
            post(|State(s): State<Svc>, Json(r): Json<BuildReq>| async move {
                let out = blocking(move || {
                    let df = r.dockerfile.unwrap_or_else(|| r.context.join("Dockerfile"));
                    let args: Vec<_> = r.build_args.into_iter().collect();
                    s.build_and_archive(&df, &r.context, &args)
                })
                .await?;
                Ok::<_, ApiError>(Json(out))
            }),
        )
        .route(
            "/v1/images/{id}/mount",
            post(|State(s): State<Svc>, Path(id): Path<String>| async move {
                let m = blocking(move || s.pull_lazy(&id)).await?;
                Ok::<_, ApiError>(Json(mount_json(&m)))
            })
            .delete(|State(s): State<Svc>, Path(id): Path<String>| async move {
                blocking(move || s.unmount(&id)).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }),
        )
        .route(
            "/v1/images/{id}/run",
            post(
                |State(s): State<Svc>, Path(id): Path<String>, body: Option<Json<RunReq>>| async move {
                    let args = body.map(|Json(r)| r.args).unwrap_or_default();
                    let out = blocking(move || {
                        s.run(&id, (!args.is_empty()).then_some(&args[..]))
                    })
                    .await?;
                    Ok::<_, ApiError>(Json(out))
                },
            ),
        )
        .route(
            "/v1/images",
            get(|State(s): State<Svc>| async move {
                let images = blocking(move || s.images()).await?;
                Ok::<_, ApiError>(Json(images))
            }),
        )
        .route(
            "/v1/build-context",
            post(|State(s): State<Svc>, axum::extract::Query(q): axum::extract::Query<std::collections::BTreeMap<String, String>>, body: axum::body::Bytes| async move {
                let out = blocking(move || {
                    let dir = tempfile::tempdir().map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("staging the context: {e}")))?;
                    tar::Archive::new(&body[..])
                        .unpack(dir.path())
                        .map_err(|e| bad_request(format!("unpacking the uploaded context (a tar stream): {e}")))?;
                    let df = dir.path().join(q.get("dockerfile").map_or("Dockerfile", String::as_str));
                    if !df.starts_with(dir.path()) || q.get("dockerfile").is_some_and(|d| d.contains("..")) {
                        return Err(bad_request("dockerfile must be a path inside the context"));
                    }
                    let args: Vec<(String, String)> = q
                        .iter()
                        .filter_map(|(k, v)| k.strip_prefix("arg.").map(|k| (k.to_owned(), v.clone())))
                        .collect();
                    Ok(s.build_and_archive(&df, dir.path(), &args)?)
                })
                .await?;
                Ok::<_, ApiError>(Json(out))
            })
            .layer(axum::extract::DefaultBodyLimit::max(4 << 30)),
        )
        .route(
            "/v1/mounts",
            get(|State(s): State<Svc>| async move {
                Json(s.mounts().iter().map(|m| mount_json(m)).collect::<Vec<_>>())
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Svc>| async move {
                let mut text = PROMETHEUS.get().map(metrics_exporter_prometheus::PrometheusHandle::render).unwrap_or_default();
                text.push_str(&metrics(&s));
                text
            }),
        )
        .with_state(svc)
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
                m.image_id, m.version
            );
        }
    }
    out
}

async fn shutdown_signal() {
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

/// The `metrics` facade's recorder, rendered at `/metrics`.
static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Serves until SIGTERM/SIGINT, then unmounts everything.
pub(crate) fn serve(svc: &Svc, listen: &str) -> anyhow::Result<()> {
    if let Ok(h) = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        let _ = PROMETHEUS.set(h);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(addr = %listener.local_addr()?, "clip-worker listening");
        axum::serve(listener, router(Arc::clone(svc)))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    tracing::info!("shutting down: unmounting all images");
    svc.unmount_all();
    Ok(())
}

/// Blocks until SIGTERM/SIGINT.
pub(crate) fn wait_for_signal() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(shutdown_signal());
    Ok(())
}
