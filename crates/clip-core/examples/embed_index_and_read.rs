//! Embedding clip-core in a Rust service: index an image straight from its registry into a v2
//! archive, mount it lazily, and read one file — only that file's spans are fetched.
//!
//! ```sh
//! cargo run -p clip-core --example embed_index_and_read -- 127.0.0.1:5000/library/app:latest /etc/os-release
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr, unreachable_pub)]

use std::path::Path;

/// Indexes `image`, mounts it under `work`, reads `path`; returns its bytes and the bytes
/// fetched from the registry to read them.
pub fn run(
    image: &str,
    path: &str,
    work: &Path,
) -> Result<(Vec<u8>, u64), Box<dyn std::error::Error>> {
    let archive = work.join("image.clip");
    let summary = clip_core::create_from_oci_image(&clip_core::CreateFromOciImageOptions {
        image_ref: image.to_owned(),
        output_path: archive.clone(),
        ..Default::default()
    })?;
    eprintln!(
        "indexed {image}: {} entries, {} layers, archive {} bytes",
        summary.entries, summary.layers, summary.archive_bytes
    );
    let mountpoint = work.join("rootfs");
    std::fs::create_dir_all(&mountpoint)?;
    let mount = clip_core::fs::mount_archive(clip_core::fs::MountOptions {
        archive,
        mountpoint: mountpoint.clone(),
        cache_dir: work.join("cache"),
        ..Default::default()
    })?;
    let bytes = std::fs::read(mountpoint.join(path.trim_start_matches('/')))?;
    let fetched = mount.stats().fetched_bytes;
    mount.unmount()?;
    Ok((bytes, fetched))
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: embed_index_and_read IMAGE PATH");
        std::process::exit(2);
    };
    let work = tempfile::tempdir()?;
    let (bytes, fetched) = run(&image, &path, work.path())?;
    eprintln!(
        "read {} bytes of {path}; fetched {fetched} bytes from the registry",
        bytes.len()
    );
    std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
    Ok(())
}
