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
    let layer_store = args
        .layer_cache
        .map(|d| Arc::new(DirLayerStore::new(d)) as Arc<dyn LayerIndexStore>);
    let mut opts = IndexOptions {
        platform: args.platform,
        checkpoint_bytes: args.checkpoint_mib.max(1) << 20,
        layer_store,
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
        (
            index(input, &args.output, &opts, Some(&progress))?,
            reference.to_string(),
        )
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
