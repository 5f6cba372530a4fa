//! containerd's snapshots service over gRPC: the edge where [`Snapshots`]' typed answers become
//! containerd's messages and status codes. Every call runs off the async threads (metadata saves
//! fsync; lazy trees index and mount).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::lazy::LazyError;
use crate::meta::{Kind, Snapshot};
use crate::snapshots::{Prepared, SnapshotError, Snapshots, Trees};

/// The snapshotter: [`Snapshots`] served as containerd's `Snapshots` gRPC service.
#[derive(Clone)]
pub struct Snapshotter {
    inner: Arc<Snapshots>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.inner.root())
            .finish_non_exhaustive()
    }
}

impl Snapshotter {
    /// A snapshotter keeping its state under `root`, its lazy trees from `trees`. Blocking.
    pub fn open(root: &Path, trees: impl Trees + 'static) -> Result<Self, SnapshotError> {
        Ok(Self {
            inner: Arc::new(Snapshots::open(root, Box::new(trees))?),
        })
    }

    /// The snapshot logic behind the service.
    #[must_use]
    pub fn snapshots(&self) -> &Snapshots {
        &self.inner
    }

    /// Runs `f` on the snapshots off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(format!("worker thread: {e}")))?
            .map_err(|e| status(&e))
    }
}

/// containerd's status code for `e`.
#[must_use]
pub fn status(e: &SnapshotError) -> Status {
    let msg = e.to_string();
    match e {
        SnapshotError::NotFound(_) | SnapshotError::ParentNotFound(_) => Status::not_found(msg),
        SnapshotError::AlreadyExists(_) => Status::already_exists(msg),
        SnapshotError::InvalidArgument(_) => Status::invalid_argument(msg),
        SnapshotError::FailedPrecondition(_) | SnapshotError::Lazy(LazyError::NotLazy(_)) => {
            Status::failed_precondition(msg)
        }
        SnapshotError::Lazy(LazyError::Registry(_) | LazyError::Index { .. }) => {
            Status::unavailable(msg)
        }
        SnapshotError::Lazy(_)
        | SnapshotError::Meta(_)
        | SnapshotError::Host(_)
        | SnapshotError::Io { .. } => Status::internal(msg),
    }
}

fn timestamp((seconds, nanos): (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

fn info(s: &Snapshot) -> pb::Info {
    pb::Info {
        name: s.name.clone(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Snapshotter {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        match self
            .blocking(move |s| s.prepare(&r.key, &r.parent, labels))
            .await?
        {
            Prepared::Mounts(mounts) => Ok(Response::new(pb::PrepareSnapshotResponse { mounts })),
            // containerd's signal that the layer is there: it fetches and unpacks nothing.
            Prepared::CommittedLazily { target } => Err(Status::already_exists(format!(
                "target snapshot {target} already exists"
            ))),
        }
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = r.labels.into_iter().collect();
        let mounts = self
            .blocking(move |s| s.view(&r.key, &r.parent, labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let mounts = self.blocking(move |s| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let labels = r.labels.into_iter().collect();
        self.blocking(move |s| s.commit(&r.name, &r.key, labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        self.blocking(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let s = self.inner.stat(&key).map_err(|e| status(&e))?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let new = r
            .info
            .ok_or_else(|| Status::invalid_argument("update needs the snapshot's info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let labels: BTreeMap<String, String> = new.labels.into_iter().collect();
        let s = self
            .blocking(move |s| s.update(&new.name, &labels, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(&s)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let infos: Vec<pb::Info> = self
            .inner
            .list(&filters)
            .map_err(|e| status(&e))?
            .iter()
            .map(info)
            .collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let (size, inodes) = self.blocking(move |s| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| {
            s.cleanup();
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }
}
