//! `clip archive`: image, OCI layout or directory → v1 archive, optionally kept in object
//! storage behind a metadata archive.

use std::io::Write;

use anyhow::Context as _;
use clip_core::archive::{archive_image, archive_layout, archive_rootfs, upload_v1};
use clip_core::format::Meta;
use clip_core::registry::{BlockingClient, ClientConfig, Reference};

use super::check_output;
use crate::cli::{ArchiveArgs, split_layout};

pub(crate) fn run(args: &ArchiveArgs, out: &mut impl Write) -> anyhow::Result<()> {
    check_output(&args.output)?;
    let start = std::time::Instant::now();
    let json = args.json;
    // With --remote the data-carrying archive is staged next to the output, uploaded, and only
    // the metadata archive is kept.
    let final_output = args.output.clone();
    let output = if args.remote.is_some() {
        args.output.with_extension("data.clip")
    } else {
        args.output.clone()
    };
    let mut client: Option<BlockingClient> = None;
    let (kind, entries, bytes, source) = if let Some(rootfs) = &args.rootfs {
        let meta = Meta {
            created_by: format!("clip {}", env!("CARGO_PKG_VERSION")),
            ..Meta::default()
        };
        let s = archive_rootfs(rootfs, &output, &meta)?;
        (s.kind, s.entries, s.bytes, rootfs.display().to_string())
    } else if let Some(layout) = &args.oci_layout {
        let (dir, tag) = split_layout(layout);
        let s = archive_layout(dir.as_ref(), tag.as_deref(), args.platform.clone(), &output)?;
        (s.kind, s.entries, s.bytes, layout.clone())
    } else {
        let image = args
            .image
            .as_deref()
            .context("name an image, --oci-layout DIR or --rootfs DIR")?;
        let reference = Reference::parse(image)?;
        let c = client.insert(args.registry.client(&reference.registry)?);
        let line = crate::progress::ProgressLine::start("downloading", !json);
        let counter = line.counter();
        let s = archive_image(image, c, args.platform.as_ref(), &output, Some(&counter))?;
        drop(line);
        (s.kind, s.entries, s.bytes, reference.to_string())
    };
    let (kind, bytes, output) = if let Some(url) = &args.remote {
        #[allow(clippy::print_stderr)]
        let progress = |sent: u64, total: u64| {
            if !json {
                eprint!("\ruploading {sent}/{total} bytes");
            }
        };
        let net = match client {
            Some(c) => c,
            None => BlockingClient::new(ClientConfig::default())?,
        };
        let up = upload_v1(
            net.handle(),
            &output,
            url,
            &final_output,
            &args.s3.options(),
            Some(&progress),
        );
        let _ = std::fs::remove_file(&output);
        let up = up?;
        #[allow(clippy::print_stderr)]
        if !json {
            eprintln!();
        }
        (up.metadata.kind, up.metadata.bytes, final_output)
    } else {
        (kind, bytes, output)
    };
    let secs = start.elapsed().as_secs_f64();
    if json {
        let v = serde_json::json!({"kind": kind.to_string(), "source": source, "entries": entries, "bytes": bytes, "seconds": secs, "output": output});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "{}: {kind} archive of {source}, {entries} entries, {bytes} bytes, {secs:.2}s",
            output.display(),
        )?;
    }
    Ok(())
}
