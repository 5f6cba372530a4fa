//! `clip containerd pull`: a lazy pull into containerd through the clip snapshotter.

use std::io::Write;

use clip_core::registry::Reference;

use crate::cli::ContainerdPullArgs;

pub(crate) fn pull(args: &ContainerdPullArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.image)?;
    let net = args.registry.client(&reference.registry)?;
    let opts = clip_containerd::pull::PullOptions {
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        platform: args.platform.clone(),
    };
    let started = std::time::Instant::now();
    let s = net.block_on(clip_containerd::pull::pull(
        &args.image,
        net.client(),
        &opts,
    ))?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let v = serde_json::json!({"image": s.name, "manifest_digest": s.manifest_digest,
            "lazy_layers": s.lazy_layers, "existing_layers": s.existing_layers,
            "applied_layers": s.applied_layers, "seconds": secs});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{}@{}: {} layers lazy, {} already present, {} fetched and applied ({secs:.2}s)",
            s.name, s.manifest_digest, s.lazy_layers, s.existing_layers, s.applied_layers
        )?;
    }
    Ok(())
}
