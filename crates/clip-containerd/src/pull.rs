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

use anyhow::{Context as _, bail};
use clip_core::registry::{Client, Reference, oci};
use sha2::{Digest as _, Sha256};
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
    pub manifest_digest: String,
    /// Layers committed lazily by the snapshotter (nothing fetched).
    pub lazy_layers: usize,
    /// Layers that were already unpacked.
    pub existing_layers: usize,
    /// Layers fetched and applied the ordinary way.
    pub applied_layers: usize,
}

/// A gRPC channel to the unix socket `path`.
pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    tonic::transport::Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to containerd at {shown}"))
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
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

struct Ctx<'a> {
    channel: Channel,
    ns: &'a str,
    lease: String,
}

impl Ctx<'_> {
    fn r<T>(&self, msg: T) -> tonic::Request<T> {
        req(msg, self.ns, Some(&self.lease))
    }

    /// Writes `bytes` (digest `digest`) into the content store with `labels`.
    async fn put_content(
        &self,
        digest: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let total = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        let reference = format!("clip-pull-{digest}");
        let msgs = vec![
            content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_owned(),
                offset: 0,
                data: bytes,
                labels: HashMap::new(),
            },
            content::WriteContentRequest {
                action: content::WriteAction::Commit as i32,
                r#ref: reference,
                total,
                expected: digest.to_owned(),
                offset: total,
                data: Vec::new(),
                labels: labels.clone(),
            },
        ];
        match c.write(self.r(tokio_stream::iter(msgs))).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Some(m) = stream.message().await.transpose() {
                    match m {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::AlreadyExists => break,
                        Err(s) => bail!("writing {digest} to containerd's content store: {s}"),
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => bail!("writing {digest} to containerd's content store: {s}"),
        }
        // Present already (another pull): make sure it carries our labels.
        let update = content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_owned(),
                size: total,
                created_at: None,
                updated_at: None,
                labels: labels.clone(),
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        };
        c.update(self.r(update))
            .await
            .with_context(|| format!("labelling {digest} in containerd's content store"))?;
        Ok(())
    }
}

/// Where a streamed blob's `Write` messages stand.
struct State {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, clip_core::registry::Error>>,
    offset: u64,
    done: bool,
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
        digest: &clip_core::format::Digest,
        size: u64,
    ) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (net, r2, d2) = (client.clone(), r.clone(), digest.clone());
        let feeder = tokio::spawn(async move { net.stream_to(&r2, &d2, tx).await });
        let reference = format!("clip-pull-{digest}");
        let total = i64::try_from(size).unwrap_or(i64::MAX);
        let expected = digest.to_string();
        let failure: std::sync::Arc<std::sync::Mutex<Option<String>>> = std::sync::Arc::default();
        let (reference2, expected2, fail2) = (reference.clone(), expected.clone(), failure.clone());
        let msgs = futures_util::stream::unfold(
            State {
                rx,
                offset: 0,
                done: false,
            },
            move |mut st| {
                let (reference, expected, failure) =
                    (reference2.clone(), expected2.clone(), fail2.clone());
                async move {
                    if st.done {
                        return None;
                    }
                    let mut data = Vec::new();
                    while data.len() < WRITE_CHUNK {
                        match st.rx.recv().await {
                            Some(Ok(c)) => data.extend_from_slice(&c),
                            Some(Err(e)) => {
                                *failure
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    Some(e.to_string());
                                return None;
                            }
                            None => break,
                        }
                    }
                    let at = st.offset;
                    st.offset += data.len() as u64;
                    if st.offset > size {
                        *failure
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(format!(
                            "the blob is larger than its descriptor's {size} bytes"
                        ));
                        return None;
                    }
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
            },
        );
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let written = match c.write(self.r(msgs)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let mut out = Ok(());
                while let Some(m) = stream.message().await.transpose() {
                    match m {
                        Ok(_) => {}
                        Err(s) if s.code() == tonic::Code::AlreadyExists => break,
                        Err(s) => {
                            out = Err(s);
                            break;
                        }
                    }
                }
                out
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(s) => Err(s),
        };
        feeder.abort();
        if let Some(why) = failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            bail!("fetching layer {digest} from the registry: {why}");
        }
        written.map_err(|s| anyhow::anyhow!("writing {digest} to containerd's content store: {s}"))
    }
}

/// Pulls `reference` lazily into containerd (see the module docs); `client` reaches the
/// registry.
pub async fn pull(
    reference: &str,
    client: &Client,
    opts: &PullOptions,
) -> anyhow::Result<PullSummary> {
    let r = Reference::parse(reference)?;
    let image = client.resolve(&r, opts.platform.as_ref()).await?;
    let manifest_digest = image.manifest_digest.to_string();
    let (manifest_bytes, manifest_media, _) =
        client.manifest(&image.reference, &manifest_digest).await?;
    let config_desc = image.manifest.config();
    let config_digest = oci::digest(config_desc)?;
    let config_bytes = client
        .blob_bytes(
            &image.reference,
            &config_digest,
            clip_core::registry::MAX_DOCUMENT,
        )
        .await?;
    let diff_ids: Vec<String> = oci::diff_ids(&image.config)?
        .iter()
        .map(ToString::to_string)
        .collect();
    let layers: Vec<oci::Descriptor> = image.manifest.layers().clone();
    if diff_ids.len() != layers.len() {
        bail!(
            "{reference}: the manifest lists {} layers but the config {} diff_ids",
            layers.len(),
            diff_ids.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let top = chains.last().cloned().unwrap_or_default();

    let channel = connect(&opts.address).await?;
    let ns = opts.namespace.as_str();
    let lease_id = format!(
        "clip-pull-{}",
        &manifest_digest[manifest_digest.len().saturating_sub(12)..]
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
    let lease_id = match leases_client
        .create(req(
            leases::CreateRequest {
                id: format!("{lease_id}-{}", std::process::id()),
                labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
            },
            ns,
            None,
        ))
        .await
    {
        Ok(resp) => resp.into_inner().lease.map(|l| l.id).unwrap_or_default(),
        Err(s) => bail!("creating a lease in containerd: {s}"),
    };
    let ctx = Ctx {
        channel: channel.clone(),
        ns,
        lease: lease_id.clone(),
    };
    let result = pull_in(
        &ctx,
        reference,
        &image,
        &manifest_digest,
        manifest_bytes.to_vec(),
        manifest_media,
        config_digest.as_ref(),
        config_bytes.to_vec(),
        &layers,
        &chains,
        &top,
        client,
        opts,
    )
    .await;
    // The image record and the labels now hold everything; the lease goes either way.
    let _ = leases_client
        .delete(req(
            leases::DeleteRequest {
                id: lease_id,
                sync: false,
            },
            ns,
            None,
        ))
        .await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn pull_in(
    ctx: &Ctx<'_>,
    reference: &str,
    image: &clip_core::registry::ResolvedImage,
    manifest_digest: &str,
    manifest_bytes: Vec<u8>,
    manifest_media: String,
    config_digest: &str,
    config_bytes: Vec<u8>,
    layers: &[oci::Descriptor],
    chains: &[String],
    top: &str,
    client: &Client,
    opts: &PullOptions,
) -> anyhow::Result<PullSummary> {
    let source_label = format!(
        "containerd.io/distribution.source.{}",
        image.reference.registry
    );
    // Content: the config names the snapshot chain (so GC keeps it), the manifest its config
    // and layers.
    let mut config_labels = HashMap::from([
        (
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.to_owned(),
        ),
        (source_label.clone(), image.reference.repository.clone()),
    ]);
    config_labels.retain(|_, v| !v.is_empty());
    ctx.put_content(config_digest, config_bytes, config_labels)
        .await?;
    let mut manifest_labels = HashMap::from([
        (
            "containerd.io/gc.ref.content.config".to_owned(),
            config_digest.to_owned(),
        ),
        (source_label, image.reference.repository.clone()),
    ]);
    for (i, l) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    let manifest_size = i64::try_from(manifest_bytes.len()).unwrap_or(i64::MAX);
    ctx.put_content(manifest_digest, manifest_bytes, manifest_labels)
        .await?;

    // The image record.
    let name = Reference::parse(reference)?.to_string();
    let record = images::Image {
        name: name.clone(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: if manifest_media.is_empty() {
                "application/vnd.oci.image.manifest.v1+json".into()
            } else {
                manifest_media
            },
            digest: manifest_digest.to_owned(),
            size: manifest_size,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images_client = images::images_client::ImagesClient::new(ctx.channel.clone());
    match images_client
        .create(ctx.r(images::CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            images_client
                .update(ctx.r(images::UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .context("updating the image record")?;
        }
        Err(s) => bail!("creating the image record {name}: {s}"),
    }

    // The layers' snapshots, bottom up.
    let mut snaps = snapshots::snapshots_client::SnapshotsClient::new(ctx.channel.clone());
    let mut summary = PullSummary {
        name,
        manifest_digest: manifest_digest.to_owned(),
        lazy_layers: 0,
        existing_layers: 0,
        applied_layers: 0,
    };
    let digests: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
    let diff_ids: Vec<String> = oci::diff_ids(&image.config)?
        .iter()
        .map(ToString::to_string)
        .collect();
    for (i, (layer, chain)) in layers.iter().zip(chains).enumerate() {
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let exists = snaps
            .stat(ctx.r(snapshots::StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain.clone(),
            }))
            .await;
        if exists.is_ok() {
            // Held by this pull's lease from now on: containerd's GC (after another pull that
            // failed, say) cannot remove it before the next layer is prepared on it.
            let mut l = leases::leases_client::LeasesClient::new(ctx.channel.clone());
            l.add_resource(req(
                leases::AddResourceRequest {
                    id: ctx.lease.clone(),
                    resource: Some(leases::Resource {
                        id: chain.clone(),
                        r#type: format!("snapshots/{}", opts.snapshotter),
                    }),
                },
                ctx.ns,
                None,
            ))
            .await
            .with_context(|| format!("holding layer {i} ({chain}) for the pull"))?;
            let still = snaps
                .stat(ctx.r(snapshots::StatSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    key: chain.clone(),
                }))
                .await;
            if still.is_ok() {
                summary.existing_layers += 1;
                continue;
            }
        }
        let mut image_layers = digests[i..].join(",");
        image_layers.truncate(4000);
        let layer_labels = HashMap::from([
            (labels::TARGET.to_owned(), chain.clone()),
            (labels::IMAGE_REF.to_owned(), reference.to_owned()),
            (labels::MANIFEST.to_owned(), manifest_digest.to_owned()),
            (labels::LAYER.to_owned(), layer.digest().to_string()),
            (labels::IMAGE_LAYERS.to_owned(), image_layers),
        ]);
        let key = format!(
            "extract-{}-{chain}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        match snaps
            .prepare(ctx.r(snapshots::PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels: layer_labels,
            }))
            .await
        {
            Err(s) if s.code() == tonic::Code::AlreadyExists => summary.lazy_layers += 1,
            Err(s) => bail!(
                "preparing layer {i} ({chain}) in {}: {}",
                opts.snapshotter,
                s.message()
            ),
            Ok(resp) => {
                // Not lazy: fetch the layer and let containerd apply it.
                let mounts = resp.into_inner().mounts;
                let digest = oci::digest(layer)?;
                // The rare path (a layer clip cannot serve): the blob, bounded by its
                // descriptor's size, streamed to containerd, which checks its digest.
                ctx.stream_content(client, &image.reference, &digest, layer.size())
                    .await?;
                let mut d = diff::diff_client::DiffClient::new(ctx.channel.clone());
                let applied = d
                    .apply(ctx.r(diff::ApplyRequest {
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
                    .with_context(|| format!("applying layer {i} ({digest})"))?
                    .into_inner()
                    .applied
                    .map(|a| a.digest)
                    .unwrap_or_default();
                // Committed under a chain id only if the content is what the diff_id (and so
                // the chain id) promises, as containerd's own unpack checks.
                let want = diff_ids.get(i).map_or("", String::as_str);
                if applied != want {
                    let _ = snaps
                        .remove(ctx.r(snapshots::RemoveSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            key: key.clone(),
                        }))
                        .await;
                    bail!(
                        "layer {i} ({digest}): wrong diff id calculated on extraction: {applied}, the image config says {want}"
                    );
                }
                snaps
                    .commit(ctx.r(snapshots::CommitSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        name: chain.clone(),
                        key,
                        labels: HashMap::from([(labels::TARGET.to_owned(), chain.clone())]),
                    }))
                    .await
                    .with_context(|| format!("committing layer {i} ({chain})"))?;
                summary.applied_layers += 1;
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_containerds() {
        // containerd's identity: the first chain id is the first diff_id.
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        assert_eq!(
            ids[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"sha256:a sha256:b"))
            )
        );
    }
}
