//! `clip index`: image → v2 archive, from a registry or an OCI layout.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context as _;
use clip_core::indexer::{
    DirLayerStore, IndexOptions, IndexSummary, Input, LayerIndexStore, Progress, index,
};
use clip_core::registry::Reference;

use super::check_output;
use crate::cli::{IndexArgs, split_layout};

pub(crate) fn run(args: IndexArgs, out: &mut impl Write) -> anyhow::Result<()> {
    check_output(&args.output)?;
    // Attaching needs every layer's index kept: a temporary layer cache when none is named.
    let scratch = (args.attach && args.layer_cache.is_none())
        .then(tempfile::tempdir)
        .transpose()?;
    let local = args
        .layer_cache
        .clone()
        .or_else(|| scratch.as_ref().map(|d| d.path().to_owned()))
        .map(DirLayerStore::new);
    let mut opts = IndexOptions {
        platform: args.platform.clone(),
        checkpoint_bytes: args.checkpoint_mib.max(1) << 20,
        layer_store: local
            .clone()
            .map(|l| Arc::new(l) as Arc<dyn LayerIndexStore>),
        ..IndexOptions::default()
    };
    let start = std::time::Instant::now();
    let json = args.json;
    let line = std::sync::Arc::new(crate::progress::ProgressLine::start("indexing", !json));
    opts.bytes_read = Some(line.counter());
    let (s, what) = if let Some(layout) = args.oci_layout {
        let source = args
            .source
            .context("--oci-layout needs --source HOST/REPOSITORY")?;
        let (dir, tag) = split_layout(&layout);
        let (registry, repository) = source
            .split_once('/')
            .with_context(|| format!("--source {source:?} must be HOST/REPOSITORY"))?;
        opts.reference = format!("{source}:{}", tag.as_deref().unwrap_or("latest"));
        opts.tag = tag;
        registry.clone_into(&mut opts.registry);
        repository.clone_into(&mut opts.repository);
        let input = Input::Layout { dir: dir.as_ref() };
        (index(input, &args.output, &opts, None)?, source)
    } else {
        let image = args
            .image
            .context("name an image, or use --oci-layout DIR")?;
        let reference = Reference::parse(&image)?;
        let client = args.registry.client(&reference.registry)?;
        if !args.no_attached {
            opts.layer_store =
                with_attached(&client, &reference, args.platform.as_ref(), local.clone())?;
        }
        let line2 = std::sync::Arc::clone(&line);
        let progress = move |p: &Progress| {
            if let Progress::Resolved { bytes, .. } = p {
                line2.set_total(*bytes);
            }
            if !json && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                report(p);
            }
        };
        let input = Input::Registry {
            reference: &image,
            client: &client,
        };
        let s = index(input, &args.output, &opts, Some(&progress))?;
        if args.attach
            && let Some(local) = &local
        {
            let key = args
                .signing_key
                .as_deref()
                .map(clip_core::objstore::signed::SigningKey::load)
                .transpose()?;
            let seal = key
                .as_ref()
                .map(|k| move |name: &str, bytes: &[u8]| k.seal(name, bytes));
            let a = clip_core::indexer::attach(
                &client,
                &image,
                args.platform.as_ref(),
                local,
                opts.checkpoint_bytes,
                seal.as_ref()
                    .map(|s| s as clip_core::indexer::attached::Sealer<'_>),
            )?;
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "attached {} layer indexes ({} bytes) to {}@{} as {}",
                    a.layers, a.bytes, reference, a.subject, a.artifact
                );
            }
        }
        (s, reference.to_string())
    };
    summary(
        &s,
        &what,
        &args.output,
        start.elapsed().as_secs_f64(),
        json,
        out,
    )
}

/// The layer stores to index with: the local cache (if any), then the layer indexes attached to
/// the image in its registry (if any are found for the platform manifest).
fn with_attached(
    client: &clip_core::registry::BlockingClient,
    reference: &Reference,
    platform: Option<&clip_core::registry::Platform>,
    local: Option<DirLayerStore>,
) -> anyhow::Result<Option<Arc<dyn LayerIndexStore>>> {
    let resolved = client.block_on(client.client().resolve(reference, platform))?;
    Ok(clip_core::node::with_attached(
        local.map(|l| Arc::new(l) as Arc<dyn LayerIndexStore>),
        super::attached(client, &resolved).map(Arc::new),
    ))
}

/// Progress on stderr, one line per layer (stdout stays the summary).
#[allow(clippy::print_stderr)]
fn report(p: &Progress) {
    match p {
        Progress::Resolved {
            manifest_digest,
            layers,
            bytes,
        } => eprintln!("resolved {manifest_digest}: {layers} layers, {bytes} bytes"),
        Progress::LayerDone {
            layer,
            digest,
            compressed,
            entries,
        } => eprintln!("layer {layer} {digest}: {compressed} bytes, {entries} entries"),
        Progress::LayerReused {
            layer,
            digest,
            entries,
        } => eprintln!("layer {layer} {digest}: index reused, {entries} entries"),
    }
}

fn summary(
    s: &IndexSummary,
    what: &str,
    output: &std::path::Path,
    secs: f64,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({"kind": "v2-oci", "image": what, "manifest_digest": s.manifest_digest, "layers": s.layers,
            "entries": s.entries, "checkpoints": s.checkpoints, "bytes": s.archive_bytes, "index_bytes": s.index_bytes,
            "compressed_bytes": s.compressed_bytes, "uncompressed_bytes": s.uncompressed_bytes, "reused_layers": s.reused_layers, "toc_layers": s.toc_layers, "per_layer": s.per_layer, "seconds": secs, "output": output});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{}: v2 archive of {what}@{}: {} layers ({} reused, {} from tables of contents), {} entries, {} checkpoints, {} bytes ({} without windows) for {} bytes of layers, {secs:.2}s",
            output.display(),
            s.manifest_digest,
            s.layers,
            s.reused_layers,
            s.toc_layers,
            s.entries,
            s.checkpoints,
            s.archive_bytes,
            s.index_bytes,
            s.compressed_bytes
        )?;
    }
    Ok(())
}
