//! clip for containerd: a remote ("proxy") snapshotter that starts unmodified gzip/zstd images
//! lazily from v2 indexes, and the lazy pull client containerd 1.6's `ctr` lacks.
//!
//! # Model
//!
//! containerd unpacks an image by preparing one snapshot per layer, bottom up, each named by its
//! chain id, and runs a container on a writable snapshot prepared on the top one. With the CRI
//! plugin's snapshot labels (or `clip containerd pull`'s), the [`service::Snapshotter`] answers each layer's
//! `Prepare` by recording a committed snapshot and `AlreadyExists` — containerd then fetches and
//! unpacks nothing — and gives a container an overlay whose lowest layer is a clip mount of the
//! image's tree, indexed once from the registry ([`lazy`]) and mounted once per image by a server
//! process that outlives the snapshotter ([`mount_server`]). Everything else is containerd's
//! ordinary overlay model, persisted under `--root` ([`meta`]); `List` understands containerd's
//! filters ([`filter`]).

pub mod filter;
pub mod lazy;
pub mod meta;
pub mod mount_server;
pub mod pull;
pub mod service;

pub use service::Snapshotter;

/// Serves `snapshotter` on the unix socket `path` (a stale socket file is replaced; the socket
/// is `0600`, root's: containerd connects as root) until `shutdown` completes.
pub async fn serve_unix(
    path: &std::path::Path,
    snapshotter: Snapshotter,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "snapshotter serving");
    tonic::transport::Server::builder()
        .add_service(
            api::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer::new(
                snapshotter,
            ),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving gRPC")?;
    Ok(())
}

/// Generated gRPC code, in modules that mirror the proto packages.
#[allow(missing_docs, clippy::pedantic, unreachable_pub, clippy::all)]
pub mod api {
    /// `containerd.*`.
    pub mod containerd {
        /// Shared types (`Mount`, `Descriptor`).
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// Services.
        pub mod services {
            /// Snapshots (served by the snapshotter, called by the lazy pull).
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            /// The content store.
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            /// Image records.
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            /// Leases.
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            /// Applying a layer onto mounts.
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
    /// Kubernetes CRI, `runtime.v1`.
    pub mod runtime {
        pub mod v1 {
            tonic::include_proto!("runtime.v1");
        }
    }
}
