//! One module per subcommand; each takes its parsed arguments and writes its answer to `out`.

pub(crate) mod archive;
pub(crate) mod cat;
pub(crate) mod containerd;
pub(crate) mod extract;
pub(crate) mod index;
pub(crate) mod inspect;
pub(crate) mod ls;
pub(crate) mod mount;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clip_core::format::Archive;

/// The layer indexes attached to `image`'s platform manifest in its registry, unsigned ones
/// included (a user's command against a registry they chose); a failed lookup is said on stderr
/// and means indexing here.
pub(crate) fn attached(
    net: &clip_core::registry::BlockingClient,
    image: &clip_core::registry::ResolvedImage,
) -> Option<clip_core::indexer::Attached> {
    clip_core::indexer::Attached::find(net, &image.reference, &image.manifest_digest, None)
        .unwrap_or_else(|e| {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("looking for attached layer indexes failed ({e}); indexing here");
            }
            None
        })
}

/// Writes `clip.1` and `clip-SUBCOMMAND.1` into `dir`, from the same definitions as `--help`.
/// `clip keygen FILE`: a signing key pair, written create-only (the private key `0600`).
pub(crate) fn keygen(file: &Path, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (private, key) = clip_core::objstore::signed::SigningKey::generate()?;
    let public = format!("{}\n", key.public());
    let pub_path = PathBuf::from(format!("{}.pub", file.display()));
    let create = |path: &Path, mode: u32, text: &str| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| {
                format!(
                    "creating {} (an existing key is never overwritten)",
                    path.display()
                )
            })?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    if pub_path.exists() {
        anyhow::bail!(
            "{} exists; an existing key is never overwritten",
            pub_path.display()
        );
    }
    create(file, 0o600, &private)?;
    create(&pub_path, 0o644, &public)?;
    write!(out, "{public}")?;
    Ok(())
}

pub(crate) fn man(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
    let mut pages = vec![("clip".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((
            format!("clip-{}", sub.get_name()),
            sub.clone().name(format!("clip-{}", sub.get_name())),
        ));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        let path = dir.join(format!("{name}.1"));
        clip_core::host::publish_bytes(&path, &buf)?;
    }
    Ok(())
}

/// Opens an archive, naming it in the error.
pub(crate) fn open(file: &Path) -> anyhow::Result<Archive> {
    Archive::open(file).with_context(|| format!("opening {}", file.display()))
}

/// Checks, before any work, that a file can be created where `output` goes: its directory
/// exists and is writable (a mistyped path fails now, not after minutes of downloading).
pub(crate) fn check_output(output: &Path) -> anyhow::Result<()> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if output.is_dir() {
        anyhow::bail!(
            "{} is a directory; name the file to write",
            output.display()
        );
    }
    tempfile::Builder::new()
        .prefix(".clip-check-")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "cannot write {}: {} is not a writable directory",
                output.display(),
                dir.display()
            )
        })?;
    Ok(())
}
