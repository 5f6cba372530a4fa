//! clip for containerd: a remote ("proxy") snapshotter that starts unmodified gzip/zstd images
//! lazily from v2 indexes, and the lazy pull client containerd 1.6's `ctr` lacks.
//!
//! # Model
//!
//! containerd unpacks an image by preparing one snapshot per layer, bottom up, each named by its
//! chain id, and runs a container on a writable snapshot prepared on the top one. With the CRI
//! plugin's snapshot labels (or `clip containerd pull`'s), a layer's `Prepare` is answered by
//! recording a committed snapshot and `AlreadyExists` — containerd then fetches and unpacks
//! nothing — and a container gets an overlay whose lowest layer is a clip mount of the image's
//! tree. The crate is split where the concerns part:
//!
//! - [`snapshots`]: the snapshot logic (containerd's overlay model, lazy commits, labels,
//!   commit, remove, walk, usage, cleanup), typed [`snapshots::SnapshotError`]s, and the
//!   [`snapshots::Trees`] seam it gets lazy trees through — testable without root or
//!   containerd;
//! - [`lazy`]: the real trees: which layers can be served lazily (checked against the registry
//!   and their `diff_id`s), indexed once per image and depth, mounted once per tree by a server
//!   process that outlives the snapshotter ([`mount_server`]);
//! - [`service`]: the gRPC edge, where errors become containerd's status codes;
//! - [`meta`]: the persisted state; [`filter`]: containerd's `List` filters;
//! - [`pull`]: `clip containerd pull`, the client side.

pub mod filter;
pub mod lazy;
pub mod meta;
pub mod mount_server;
pub mod pull;
pub mod service;
pub mod snapshots;

pub use service::Snapshotter;

/// Why the snapshotter could not serve its socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be made.
    #[error("{context} {}: {source}", path.display())]
    Socket {
        /// What was being done.
        context: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Serves `snapshotter` on the unix socket `path` (a stale socket file is replaced; the socket
/// is `0600`, root's: containerd connects as root) until `shutdown` completes.
pub async fn serve_unix(
    path: &std::path::Path,
    snapshotter: Snapshotter,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |context: &'static str| {
        move |source| ServeError::Socket {
            context,
            path: path.to_owned(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Socket {
            context: "creating",
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing")(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err("listening on"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("restricting"))?;
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
        .await?;
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
