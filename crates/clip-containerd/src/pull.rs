//! `clip containerd pull`: a lazy pull through containerd's own API, what `ctr-remote image
//! rpull` is for stargz. containerd 1.6's `ctr image pull` sends no snapshot labels, so it can
//! only unpack; this client
//!
//! 1. resolves the image in the registry (clip's client: credentials, certs.d, mirrors),
//! 2. puts its manifest and config into containerd's content store (under a lease, with the
//!    garbage-collection labels containerd's own pull sets, so nothing is collected early),
//! 3. creates (or updates) the image record, and
//! 4. prepares each layer's snapshot through containerd with the chain id and the CRI image
//!    labels, which the clip snapshotter commits lazily (`AlreadyExists`); a layer the
//!    snapshotter will not serve lazily is fetched into the content store and applied by
//!    containerd's diff service like an ordinary pull.
//!
//! Then `ctr run --snapshotter clip IMAGE ID CMD` runs it without any layer ever downloaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clip_core::format::Digest;
use clip_core::registry::{Client, Reference, ResolvedImage, oci};
use tonic::transport::Channel;

use crate::api::containerd::services::content::v1 as content;
use crate::api::containerd::services::diff::v1 as diff;
use crate::api::containerd::services::images::v1 as images;
use crate::api::containerd::services::leases::v1 as leases;
use crate::api::containerd::services::snapshots::v1 as snapshots;
use crate::api::containerd::types::Descriptor;
use crate::lazy::labels;

/// Where and how to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace (`default`; Kubernetes uses `k8s.io`).
    pub namespace: String,
    /// The snapshotter to unpack into (the proxy plugin's name, `clip`).
    pub snapshotter: String,
    /// The platform to pick from an index (default: this machine's).
    pub platform: Option<oci::Platform>,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSummary {
    /// The image name recorded in containerd.
    pub name: String,
    /// The platform manifest's digest.
    pub manifest_digest: Digest,
    /// Layers committed lazily by the snapshotter (nothing fetched).
    pub lazy_layers: usize,
    /// Layers that were already unpacked.
    pub existing_layers: usize,
    /// Layers fetched and applied the ordinary way.
    pub applied_layers: usize,
}

/// Why a lazy pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry refused or failed, or the image is not one clip reads.
    #[error(transparent)]
    Registry(#[from] clip_core::registry::Error),
    /// containerd's socket could not be reached.
    #[error("connecting to containerd at {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// containerd refused or failed a request.
    #[error("{what}: {}", status.message())]
    Containerd {
        /// What was asked.
        what: String,
        /// containerd's answer.
        status: Box<tonic::Status>,
    },
    /// The manifest and the config disagree.
    #[error("{reference}: the manifest lists {layers} layers but the config {diff_ids} diff_ids")]
    LayerCount {
        /// The image.
        reference: String,
        /// Layers in the manifest.
        layers: usize,
        /// `diff_id`s in the config.
        diff_ids: usize,
    },
    /// A layer fetched for an ordinary unpack could not be streamed.
    #[error("fetching layer {digest} from the registry: {reason}")]
    Fetch {
        /// The layer.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// An unpacked layer's content is not what its `diff_id` promises.
    #[error(
        "layer {index} ({digest}): wrong diff id calculated on extraction: {applied}, the image config says {want}"
    )]
    DiffId {
        /// Its position, bottom first.
        index: usize,
        /// The blob.
        digest: Digest,
        /// What containerd computed.
        applied: String,
        /// What the config says.
        want: Digest,
    },
}

fn containerd(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd {
        what,
        status: Box::new(status),
    }
}

/// A gRPC channel to the unix socket `path`.
pub async fn connect(path: &Path) -> Result<Channel, PullError> {
    let path = path.to_owned();
    let socket = path.display().to_string();
    let connect_err = |e: tonic::transport::Error| PullError::Connect {
        socket: socket.clone(),
        source: Box::new(e),
    };
    tonic::transport::Endpoint::try_from("http://[::]:0")
        .map_err(connect_err)?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(connect_err)
}

/// A request in `namespace`, under `lease` if given.
fn req<T>(msg: T, namespace: &str, lease: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = namespace.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    if let Some(l) = lease
        && let Ok(v) = l.parse()
    {
        r.metadata_mut().insert("containerd-lease", v);
    }
    r
}

/// containerd's chain ids: `chain[0] = diff_id[0]`, `chain[i] = sha256(chain[i-1] + " " +
/// diff_id[i])`.
#[must_use]
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// A pull's connection to containerd: its namespace and lease.
struct Ctx<'a> {
    channel: Channel,
    ns: &'a str,
    lease: String,
    snapshotter: &'a str,
}

/// The content-store `Write` stream of one blob, in order; the last message commits.
fn write_messages(
    digest: &Digest,
    total: i64,
    chunks: Vec<(i64, Vec<u8>)>,
    labels: HashMap<String, String>,
) -> Vec<content::WriteContentRequest> {
    let reference = format!("clip-pull-{digest}");
    let mut msgs: Vec<content::WriteContentRequest> = chunks
        .into_iter()
        .map(|(offset, data)| content::WriteContentRequest {
            action: content::WriteAction::Write as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            offset,
            data,
            labels: HashMap::new(),
        })
        .collect();
    msgs.push(content::WriteContentRequest {
        action: content::WriteAction::Commit as i32,
        r#ref: reference,
        total,
        expected: digest.to_string(),
        offset: total,
        data: Vec::new(),
        labels,
    });
    msgs
}

/// Drains a content-store `Write` answer: a blob already present is success.
async fn written(
    answer: Result<tonic::Response<tonic::Streaming<content::WriteContentResponse>>, tonic::Status>,
) -> Result<(), tonic::Status> {
    let mut stream = match answer {
        Ok(resp) => resp.into_inner(),
        Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
        Err(s) => return Err(s),
    };
    while let Some(m) = stream.message().await.transpose() {
        match m {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => break,
            Err(s) => return Err(s),
        }
    }
    Ok(())
}

impl Ctx<'_> {
    fn r<T>(&self, msg: T) -> tonic::Request<T> {
        req(msg, self.ns, Some(&self.lease))
    }

    fn snapshots(&self) -> snapshots::snapshots_client::SnapshotsClient<Channel> {
        snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    /// Writes `bytes` (digest `digest`) into the content store with `labels`.
    async fn put_content(
        &self,
        digest: &Digest,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let total = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        let msgs = write_messages(digest, total, vec![(0, bytes)], labels.clone());
        written(c.write(self.r(tokio_stream::iter(msgs))).await)
            .await
            .map_err(containerd(format!(
                "writing {digest} to containerd's content store"
            )))?;
        // Present already (another pull): make sure it carries our labels.
        let update = content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_string(),
                size: total,
                created_at: None,
                updated_at: None,
                labels: labels.clone(),
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        };
        c.update(self.r(update)).await.map_err(containerd(format!(
            "labelling {digest} in containerd's content store"
        )))?;
        Ok(())
    }
}

/// Where a streamed blob's `Write` messages stand.
struct State {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, clip_core::registry::Error>>,
    offset: u64,
    size: u64,
    done: bool,
    failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl State {
    fn fail(&self, why: String) {
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
    }

    /// The next chunk of at most [`WRITE_CHUNK`] bytes and its offset (empty at the end);
    /// `None` after a failure, which is recorded.
    async fn next_chunk(&mut self) -> Option<(u64, Vec<u8>)> {
        let mut data = Vec::new();
        while data.len() < WRITE_CHUNK {
            match self.rx.recv().await {
                Some(Ok(c)) => data.extend_from_slice(&c),
                Some(Err(e)) => {
                    self.fail(e.to_string());
                    return None;
                }
                None => break,
            }
        }
        let at = self.offset;
        self.offset += data.len() as u64;
        if self.offset > self.size {
            self.fail(format!(
                "the blob is larger than its descriptor's {} bytes",
                self.size
            ));
            return None;
        }
        Some((at, data))
    }
}

/// The largest `Write` message a streamed blob is sent in (containerd's gRPC server takes up to
/// 16 MiB per message).
const WRITE_CHUNK: usize = 1 << 20;

impl Ctx<'_> {
    /// Streams blob `digest` (of `size` bytes) from the registry into containerd's content
    /// store in messages of at most [`WRITE_CHUNK`] bytes; memory stays bounded whatever the
    /// layer's size, and containerd checks the digest at the commit.
    async fn stream_content(
        &self,
        client: &Client,
        r: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<(), PullError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (net, r2, d2) = (client.clone(), r.clone(), digest.clone());
        let feeder = tokio::spawn(async move { net.stream_to(&r2, &d2, tx).await });
        let reference = format!("clip-pull-{digest}");
        let total = i64::try_from(size).unwrap_or(i64::MAX);
        let failure: std::sync::Arc<std::sync::Mutex<Option<String>>> = std::sync::Arc::default();
        let state = State {
            rx,
            offset: 0,
            size,
            done: false,
            failure: failure.clone(),
        };
        let expected = digest.to_string();
        let msgs = futures_util::stream::unfold(state, move |mut st| {
            let (reference, expected) = (reference.clone(), expected.clone());
            async move {
                if st.done {
                    return None;
                }
                let (at, data) = st.next_chunk().await?;
                // The last message, with no data, commits.
                st.done = data.is_empty();
                let action = if st.done {
                    content::WriteAction::Commit
                } else {
                    content::WriteAction::Write
                };
                let msg = content::WriteContentRequest {
                    action: action as i32,
                    r#ref: reference,
                    total,
                    expected,
                    offset: i64::try_from(at).unwrap_or(i64::MAX),
                    data,
                    labels: HashMap::new(),
                };
                Some((msg, st))
            }
        });
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let result = written(c.write(self.r(msgs)).await).await;
        feeder.abort();
        if let Some(reason) = failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            return Err(PullError::Fetch {
                digest: digest.clone(),
                reason,
            });
        }
        result.map_err(containerd(format!(
            "writing {digest} to containerd's content store"
        )))
    }

    /// Puts the image's config and manifest into the content store with the labels that keep
    /// its snapshots and layers from being collected.
    async fn put_image_content(&self, image: &Image) -> Result<(), PullError> {
        let source_label = format!(
            "containerd.io/distribution.source.{}",
            image.resolved.reference.registry
        );
        let repository = image.resolved.reference.repository.clone();
        // The config names the snapshot chain (so GC keeps it), the manifest its config and
        // layers.
        let top = image.chains.last().map(ToString::to_string);
        let mut config_labels = HashMap::from([(source_label.clone(), repository.clone())]);
        if let Some(top) = top {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
                top,
            );
        }
        config_labels.retain(|_, v| !v.is_empty());
        self.put_content(
            &image.config_digest,
            image.config_bytes.clone(),
            config_labels,
        )
        .await?;
        let mut manifest_labels = HashMap::from([
            (
                "containerd.io/gc.ref.content.config".to_owned(),
                image.config_digest.to_string(),
            ),
            (source_label, repository),
        ]);
        for (i, l) in image.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest().to_string(),
            );
        }
        self.put_content(
            &image.resolved.manifest_digest,
            image.manifest_bytes.clone(),
            manifest_labels,
        )
        .await
    }

    /// Creates (or points anew) the image record `name`.
    async fn put_record(&self, name: &str, image: &Image) -> Result<(), PullError> {
        let record = images::Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(Descriptor {
                media_type: if image.manifest_media.is_empty() {
                    "application/vnd.oci.image.manifest.v1+json".into()
                } else {
                    image.manifest_media.clone()
                },
                digest: image.resolved.manifest_digest.to_string(),
                size: i64::try_from(image.manifest_bytes.len()).unwrap_or(i64::MAX),
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let mut images_client = images::images_client::ImagesClient::new(self.channel.clone());
        match images_client
            .create(self.r(images::CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => images_client
                .update(self.r(images::UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .map(|_| ())
                .map_err(containerd("updating the image record")),
            Err(s) => Err(containerd(format!("creating the image record {name}"))(s)),
        }
    }

    /// Whether snapshot `chain` exists; if it does, it is held under the pull's lease from now
    /// on (containerd's GC, after another pull that failed, say, cannot remove it before the
    /// next layer is prepared on it).
    async fn hold_existing(&self, i: usize, chain: &Digest) -> Result<bool, PullError> {
        let stat = || async {
            self.snapshots()
                .stat(self.r(snapshots::StatSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key: chain.to_string(),
                }))
                .await
        };
        if stat().await.is_err() {
            return Ok(false);
        }
        let mut l = leases::leases_client::LeasesClient::new(self.channel.clone());
        l.add_resource(req(
            leases::AddResourceRequest {
                id: self.lease.clone(),
                resource: Some(leases::Resource {
                    id: chain.to_string(),
                    r#type: format!("snapshots/{}", self.snapshotter),
                }),
            },
            self.ns,
            None,
        ))
        .await
        .map_err(containerd(format!(
            "holding layer {i} ({chain}) for the pull"
        )))?;
        Ok(stat().await.is_ok())
    }

    /// Fetches layer `i` (not served lazily) and lets containerd apply it onto `mounts` of
    /// active snapshot `key`, then commits it as its chain id — only if the content is what the
    /// `diff_id` (and so the chain id) promises, as containerd's own unpack checks.
    async fn apply_layer(
        &self,
        image: &Image,
        client: &Client,
        i: usize,
        key: String,
        mounts: Vec<crate::api::containerd::types::Mount>,
    ) -> Result<(), PullError> {
        let layer = &image.layers[i];
        let chain = &image.chains[i];
        let digest = oci::digest(layer)?;
        // The rare path (a layer clip cannot serve): the blob, bounded by its descriptor's
        // size, streamed to containerd, which checks its digest.
        self.stream_content(client, &image.resolved.reference, &digest, layer.size())
            .await?;
        let mut d = diff::diff_client::DiffClient::new(self.channel.clone());
        let applied = d
            .apply(self.r(diff::ApplyRequest {
                diff: Some(Descriptor {
                    media_type: layer.media_type().to_string(),
                    digest: digest.to_string(),
                    size: i64::try_from(layer.size()).unwrap_or(i64::MAX),
                    annotations: HashMap::new(),
                }),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(containerd(format!("applying layer {i} ({digest})")))?
            .into_inner()
            .applied
            .map(|a| a.digest)
            .unwrap_or_default();
        let want = &image.diff_ids[i];
        if applied != want.as_str() {
            let _ = self
                .snapshots()
                .remove(self.r(snapshots::RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key,
                }))
                .await;
            return Err(PullError::DiffId {
                index: i,
                digest,
                applied,
                want: want.clone(),
            });
        }
        self.snapshots()
            .commit(self.r(snapshots::CommitSnapshotRequest {
                snapshotter: self.snapshotter.to_owned(),
                name: chain.to_string(),
                key,
                labels: HashMap::from([(labels::TARGET.to_owned(), chain.to_string())]),
            }))
            .await
            .map_err(containerd(format!("committing layer {i} ({chain})")))?;
        Ok(())
    }
}

/// What a pull knows of its image.
struct Image {
    resolved: ResolvedImage,
    manifest_bytes: Vec<u8>,
    manifest_media: String,
    config_digest: Digest,
    config_bytes: Vec<u8>,
    layers: Vec<oci::Descriptor>,
    diff_ids: Vec<Digest>,
    chains: Vec<Digest>,
}

impl Image {
    /// Resolves `reference` and reads its manifest and config.
    async fn fetch(
        reference: &str,
        client: &Client,
        platform: Option<&oci::Platform>,
    ) -> Result<Self, PullError> {
        let r = Reference::parse(reference)?;
        let resolved = client.resolve(&r, platform).await?;
        let (manifest_bytes, manifest_media, _) = client
            .manifest(&resolved.reference, resolved.manifest_digest.as_str())
            .await?;
        let config_digest = oci::digest(resolved.manifest.config())?;
        let config_bytes = client
            .blob_bytes(
                &resolved.reference,
                &config_digest,
                clip_core::registry::MAX_DOCUMENT,
            )
            .await?;
        let diff_ids = oci::diff_ids(&resolved.config)?;
        let layers = resolved.manifest.layers().clone();
        if diff_ids.len() != layers.len() {
            return Err(PullError::LayerCount {
                reference: reference.to_owned(),
                layers: layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let chains = chain_ids(&diff_ids);
        Ok(Self {
            resolved,
            manifest_bytes: manifest_bytes.to_vec(),
            manifest_media,
            config_digest,
            config_bytes: config_bytes.to_vec(),
            layers,
            diff_ids,
            chains,
        })
    }
}

/// Pulls `reference` lazily into containerd (see the module docs); `client` reaches the
/// registry.
pub async fn pull(
    reference: &str,
    client: &Client,
    opts: &PullOptions,
) -> Result<PullSummary, PullError> {
    let image = Image::fetch(reference, client, opts.platform.as_ref()).await?;
    let channel = connect(&opts.address).await?;
    let ns = opts.namespace.as_str();
    let hex = image.resolved.manifest_digest.hex();
    let lease_id = format!(
        "clip-pull-{}-{}",
        &hex[hex.len().saturating_sub(12)..],
        std::process::id()
    );
    let mut leases_client = leases::leases_client::LeasesClient::new(channel.clone());
    let expire = {
        let t = std::time::SystemTime::now() + std::time::Duration::from_hours(1);
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        clip_core::rfc3339::format(secs)
    };
    let lease = leases_client
        .create(req(
            leases::CreateRequest {
                id: lease_id,
                labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
            },
            ns,
            None,
        ))
        .await
        .map_err(containerd("creating a lease in containerd"))?
        .into_inner()
        .lease
        .map(|l| l.id)
        .unwrap_or_default();
    let ctx = Ctx {
        channel,
        ns,
        lease: lease.clone(),
        snapshotter: &opts.snapshotter,
    };
    let result = pull_in(&ctx, reference, &image, client).await;
    // The image record and the labels now hold everything; the lease goes either way.
    let _ = leases_client
        .delete(req(
            leases::DeleteRequest {
                id: lease,
                sync: false,
            },
            ns,
            None,
        ))
        .await;
    result
}

async fn pull_in(
    ctx: &Ctx<'_>,
    reference: &str,
    image: &Image,
    client: &Client,
) -> Result<PullSummary, PullError> {
    ctx.put_image_content(image).await?;
    let name = Reference::parse(reference)?.to_string();
    ctx.put_record(&name, image).await?;
    // The layers' snapshots, bottom up.
    let mut summary = PullSummary {
        name,
        manifest_digest: image.resolved.manifest_digest.clone(),
        lazy_layers: 0,
        existing_layers: 0,
        applied_layers: 0,
    };
    let digests: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.digest().to_string())
        .collect();
    for (i, chain) in image.chains.iter().enumerate() {
        if ctx.hold_existing(i, chain).await? {
            summary.existing_layers += 1;
            continue;
        }
        let parent = i
            .checked_sub(1)
            .map_or_else(String::new, |p| image.chains[p].to_string());
        let mut image_layers = digests[i..].join(",");
        image_layers.truncate(4000);
        let layer_labels = HashMap::from([
            (labels::TARGET.to_owned(), chain.to_string()),
            (labels::IMAGE_REF.to_owned(), reference.to_owned()),
            (
                labels::MANIFEST.to_owned(),
                image.resolved.manifest_digest.to_string(),
            ),
            (labels::LAYER.to_owned(), digests[i].clone()),
            (labels::IMAGE_LAYERS.to_owned(), image_layers),
        ]);
        let key = format!(
            "extract-{}-{chain}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let prepared = ctx
            .snapshots()
            .prepare(ctx.r(snapshots::PrepareSnapshotRequest {
                snapshotter: ctx.snapshotter.to_owned(),
                key: key.clone(),
                parent,
                labels: layer_labels,
            }))
            .await;
        match prepared {
            Err(s) if s.code() == tonic::Code::AlreadyExists => summary.lazy_layers += 1,
            Err(s) => {
                return Err(containerd(format!(
                    "preparing layer {i} ({chain}) in {}",
                    ctx.snapshotter
                ))(s));
            }
            Ok(resp) => {
                // Not lazy: fetch the layer and let containerd apply it.
                ctx.apply_layer(image, client, i, key, resp.into_inner().mounts)
                    .await?;
                summary.applied_layers += 1;
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn chain_ids_are_containerds() {
        let a = Digest::sha256(b"a");
        let b = Digest::sha256(b"b");
        // containerd's identity: the first chain id is the first diff_id.
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(
            ids[1].to_string(),
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
            )
        );
    }

    #[test]
    fn a_blob_is_written_in_order_and_committed_last() {
        let d = Digest::sha256(b"xy");
        let msgs = write_messages(
            &d,
            2,
            vec![(0, b"x".to_vec()), (1, b"y".to_vec())],
            HashMap::new(),
        );
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1].offset, 1);
        assert_eq!(msgs[2].action, content::WriteAction::Commit as i32);
        assert!(msgs.iter().all(|m| m.expected == d.to_string()));
    }
}
