//! The command line: every subcommand's arguments, and the argument types they share.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use clip_core::registry::{BlockingClient, ClientConfig, Credentials, oci};

/// Make container images start in seconds: index, archive, extract and mount `.clip` archives.
#[derive(Debug, Parser)]
#[command(name = "clip", version = crate::VERSION.as_str(), about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show an archive's kind, version, source image, layers, sections and image config.
    Inspect(InspectArgs),
    /// List a directory of an archive (or one entry), like `ls -la`.
    Ls(LsArgs),
    /// Write a file's content to stdout (v1 local archives; others need the lazy read path).
    Cat(CatArgs),
    /// Create a v2 (index-only) archive of an image, straight from its registry (or from an
    /// OCI layout directory).
    Index(IndexArgs),
    /// Mount an archive read-only; file bytes are fetched when read (v2) or read from the
    /// archive (v1). Returns once the mount answers; the mount is served by a background
    /// process unless `--foreground`.
    Mount(MountArgs),
    /// Unmount a clip mount (a dead one, left by a killed process, is detached).
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Create a v1 (data-carrying) archive of an image (from its registry or an OCI layout) or
    /// of a root filesystem directory.
    Archive(ArchiveArgs),
    /// Extract an archive (v1, or v2 by streaming its layers from the registry) into a
    /// directory; every path is resolved beneath it.
    Extract(ExtractArgs),
    /// Work with containerd: `clip containerd pull` pulls an image lazily through the clip
    /// snapshotter (what `ctr image pull` cannot do: it sends no snapshot labels).
    #[command(subcommand)]
    Containerd(ContainerdCommand),
    /// Make an Ed25519 key pair for signing archives and layer indexes in a shared store:
    /// FILE (the private key, mode 0600: `signingKey`) and FILE.pub (the public key, one line:
    /// an entry of `trustedKeys`). Refuses to overwrite either.
    Keygen {
        /// Where to write the private key.
        file: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (clip.1 and one per subcommand) into DIR.
    Man {
        /// Where to write them (e.g. /usr/local/share/man/man1).
        dir: PathBuf,
    },
}

/// `clip containerd …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ContainerdCommand {
    /// Put an image's manifest and config into containerd and unpack it through the clip
    /// snapshotter with the lazy-pull labels: no layer is downloaded; `ctr run --snapshotter
    /// clip IMAGE ID CMD` then runs it.
    Pull(ContainerdPullArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ContainerdPullArgs {
    /// The image, e.g. `registry.example.com/team/app:v1`.
    pub(crate) image: String,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub(crate) address: PathBuf,
    /// containerd namespace (Kubernetes uses `k8s.io`).
    #[arg(long, short = 'n', default_value = "default")]
    pub(crate) namespace: String,
    /// The snapshotter's proxy-plugin name.
    #[arg(long, default_value = "clip")]
    pub(crate) snapshotter: String,
    /// Platform to pick from a multi-platform image (`os/arch[/variant]`).
    #[arg(long, value_parser = parse_platform)]
    pub(crate) platform: Option<oci::Platform>,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Print a JSON summary.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// The archive.
    pub(crate) file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    /// The archive.
    pub(crate) file: PathBuf,
    /// Path inside the archive.
    #[arg(default_value = "/")]
    pub(crate) path: String,
}

#[derive(Debug, Args)]
pub(crate) struct CatArgs {
    /// The archive.
    pub(crate) file: PathBuf,
    /// Path inside the archive.
    pub(crate) path: String,
}

#[derive(Debug, Args)]
pub(crate) struct IndexArgs {
    /// The image, e.g. `registry.example.com/team/app:v1` (omit with `--oci-layout`).
    pub(crate) image: Option<String>,
    /// Index an OCI image layout directory instead, optionally with `:TAG`.
    #[arg(long, value_name = "DIR[:TAG]", conflicts_with = "image")]
    pub(crate) oci_layout: Option<String>,
    /// With `--oci-layout`: the registry location to record, `HOST/REPOSITORY`.
    #[arg(long, value_name = "HOST/REPO", requires = "oci_layout")]
    pub(crate) source: Option<String>,
    /// Output file.
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Platform to pick from a multi-platform image, `os/arch[/variant]`.
    #[arg(long, value_parser = parse_platform)]
    pub(crate) platform: Option<oci::Platform>,
    /// Uncompressed MiB between checkpoints.
    #[arg(long, default_value_t = 4)]
    pub(crate) checkpoint_mib: u64,
    /// Keep per-layer indexes in DIR: layers indexed before (by any image) are not fetched
    /// again, new layer indexes are added.
    #[arg(long, value_name = "DIR", env = "CLIP_LAYER_CACHE")]
    pub(crate) layer_cache: Option<PathBuf>,
    /// Then attach the image's layer indexes to it in its registry (an OCI 1.1 artifact whose
    /// subject is the platform manifest), so that every node and worker finds them instead of
    /// streaming the layers.
    #[arg(long, conflicts_with = "oci_layout")]
    pub(crate) attach: bool,
    /// With `--attach`: sign the attached layer indexes with this key (`clip keygen`), as the
    /// fleet's nodes require (their `trustedKeys`).
    #[arg(long, value_name = "FILE", requires = "attach")]
    pub(crate) signing_key: Option<PathBuf>,
    /// Do not look for layer indexes attached to the image in its registry.
    #[arg(long)]
    pub(crate) no_attached: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// Print a JSON summary.
    #[arg(long)]
    pub(crate) json: bool,
}

// Independent switches, as mount(8) options are.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Args)]
pub(crate) struct MountArgs {
    /// The archive, or an image reference: mounted by reference, from the layer indexes
    /// attached to the image in its registry where it has them, else indexed here (the archive
    /// is kept in the cache directory).
    pub(crate) file: PathBuf,
    /// An existing directory.
    pub(crate) mountpoint: PathBuf,
    /// The node's clip cache directory, shared by all mounts, the worker and the snapshotter:
    /// spans go to `DIR/spans`, logs of background mounts to `DIR/logs` (default
    /// /var/cache/clip as root).
    #[arg(long, env = "CLIP_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Cache size bound: bytes, or with a K/M/G/T suffix.
    #[arg(long, default_value = "10G", value_parser = clip_core::policy::parse_size)]
    pub(crate) cache_size: u64,
    /// Percentage of the cache's filesystem to keep free: the cache shrinks below its size
    /// when the disk fills from elsewhere.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=90))]
    pub(crate) cache_min_free: u8,
    /// Fetch the spans of this recorded profile right after mounting.
    #[arg(long, value_name = "PROFILE")]
    pub(crate) prefetch: Option<PathBuf>,
    /// Record the first-touch order of file ranges; written at unmount.
    #[arg(long, value_name = "OUT")]
    pub(crate) record_profile: Option<PathBuf>,
    /// Spans fetched ahead of a sequential reader.
    #[arg(long, default_value_t = 2)]
    pub(crate) readahead_spans: usize,
    /// v2: fetch whole layers in the background after mounting, at most RATE bytes/s
    /// (K/M/G suffixes); off by default.
    #[arg(long, value_name = "RATE", value_parser = clip_core::policy::parse_size)]
    pub(crate) background_fetch: Option<u64>,
    /// Read the image from this registry host instead of the recorded one (a mirror).
    #[arg(long, value_name = "HOST")]
    pub(crate) registry_mirror: Option<String>,
    /// v2: the fleet's shared span store, `s3://BUCKET/PREFIX`: spans are read from it before
    /// the registry and what this mount fetches is uploaded to it (credentials from the AWS
    /// environment, endpoint from --s3-endpoint).
    #[arg(long, value_name = "URL", env = "CLIP_SPAN_STORE")]
    pub(crate) span_store: Option<String>,
    /// Mount even if a layer's registry (and its mirrors) cannot be read right now; by default
    /// the mount is refused with the registry's error.
    #[arg(long)]
    pub(crate) no_registry_check: bool,
    /// Honour setuid/setgid bits on this mount (off by default: a setuid-root program of an
    /// image would run as root for any user who can reach the mount point).
    #[arg(long)]
    pub(crate) suid: bool,
    /// Honour device nodes on this mount (off by default).
    #[arg(long)]
    pub(crate) dev: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    #[command(flatten)]
    pub(crate) s3: RemoteArgs,
    /// Serve the mount from this process until unmounted or signalled.
    #[arg(long)]
    pub(crate) foreground: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ArchiveArgs {
    /// The image, e.g. `registry.example.com/team/app:v1`.
    #[arg(required_unless_present_any = ["rootfs", "oci_layout"])]
    pub(crate) image: Option<String>,
    /// Archive this root filesystem directory instead.
    #[arg(long, conflicts_with_all = ["image", "oci_layout"])]
    pub(crate) rootfs: Option<PathBuf>,
    /// Archive an image of this OCI layout directory instead, optionally with `:TAG`.
    #[arg(long, value_name = "DIR[:TAG]", conflicts_with = "image")]
    pub(crate) oci_layout: Option<String>,
    /// Platform to pick from a multi-platform image, `os/arch[/variant]`.
    #[arg(long, value_parser = parse_platform)]
    pub(crate) platform: Option<oci::Platform>,
    /// Output file (with `--remote`: the small v1-remote metadata archive).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Upload the data-carrying archive to `s3://BUCKET/KEY` or `file:///DIR/KEY` and write
    /// a v1-remote metadata archive pointing at it.
    #[arg(long, value_name = "URL")]
    pub(crate) remote: Option<String>,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    #[command(flatten)]
    pub(crate) s3: RemoteArgs,
    /// Print a JSON summary.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ExtractArgs {
    /// The archive.
    pub(crate) file: PathBuf,
    /// Target directory (created if missing).
    pub(crate) dir: PathBuf,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    #[command(flatten)]
    pub(crate) s3: RemoteArgs,
    /// Print a JSON summary.
    #[arg(long)]
    pub(crate) json: bool,
}

/// How to reach registries (shared by the commands that talk to one).
#[derive(Debug, Args)]
pub(crate) struct RegistryArgs {
    /// A registry host that may be reached over plain HTTP (loopback hosts always may).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub(crate) insecure: Vec<String>,
    /// Credentials for the image's registry, `USER:PASSWORD`.
    #[arg(long, env = "CLIP_REGISTRY_CREDS", hide_env_values = true)]
    pub(crate) creds: Option<String>,
    /// A PEM file of CA certificates to trust for HTTPS (every registry).
    #[arg(long)]
    pub(crate) ca_file: Option<PathBuf>,
    /// A certs.d root holding `HOST[:PORT]/*.crt` CAs and `*.cert`/`*.key` client
    /// certificates per registry; repeatable. Default: /etc/containers/certs.d and
    /// /etc/docker/certs.d.
    #[arg(long, value_name = "DIR", env = "CLIP_CERTS_DIR")]
    pub(crate) certs_dir: Vec<PathBuf>,
    /// containers-registries.conf naming mirrors per registry (`[[registry]]` with
    /// `[[registry.mirror]]`). Default: /etc/containers/registries.conf if present.
    #[arg(long, value_name = "FILE", env = "CLIP_REGISTRIES_CONF")]
    pub(crate) registries_conf: Option<PathBuf>,
}

impl RegistryArgs {
    /// Client settings for `host`: these flags, then docker's config.json.
    pub(crate) fn client_config(&self, host: &str) -> anyhow::Result<ClientConfig> {
        let mut cfg = ClientConfig {
            insecure: self.insecure.clone(),
            ..ClientConfig::default()
        }
        .with_docker_config()?;
        if let Some(c) = &self.creds {
            let (username, password) =
                c.split_once(':').context("--creds must be USER:PASSWORD")?;
            cfg.credentials.push((
                host.to_owned(),
                Credentials::Basic {
                    username: username.into(),
                    password: password.into(),
                },
            ));
        }
        if let Some(f) = &self.ca_file {
            cfg.ca_pem = Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            );
        }
        if !self.certs_dir.is_empty() {
            cfg.certs_dirs = Some(self.certs_dir.clone());
        }
        cfg.mirrors = match &self.registries_conf {
            Some(conf) if !conf.exists() => {
                bail!("--registries-conf {}: no such file", conf.display())
            }
            Some(conf) => clip_core::registry::mirrors::load(conf)?,
            None => clip_core::registry::mirrors::load_system()?,
        };
        Ok(cfg)
    }

    /// The one client (and runtime) of this invocation, for `host`.
    pub(crate) fn client(&self, host: &str) -> anyhow::Result<BlockingClient> {
        Ok(BlockingClient::new(self.client_config(host)?)?)
    }
}

/// Object-store settings beyond the standard AWS environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, …).
#[derive(Debug, Args)]
pub(crate) struct RemoteArgs {
    /// S3 endpoint URL (S3-compatible servers; implies path-style requests).
    #[arg(long, value_name = "URL")]
    pub(crate) s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, value_name = "REGION")]
    pub(crate) s3_region: Option<String>,
}

impl RemoteArgs {
    pub(crate) fn options(&self) -> clip_core::objstore::RemoteOptions {
        clip_core::objstore::RemoteOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_endpoint.is_some(),
            ..Default::default()
        }
    }
}

/// `os/arch[/variant]`.
pub(crate) fn parse_platform(s: &str) -> Result<oci::Platform, String> {
    oci::parse_platform(s).ok_or_else(|| format!("{s:?} is not os/arch[/variant]"))
}

/// `DIR[:TAG]` → (DIR, TAG).
pub(crate) fn split_layout(arg: &str) -> (String, Option<String>) {
    match arg.rsplit_once(':') {
        Some((d, t)) if !t.contains('/') => (d.to_owned(), Some(t.to_owned())),
        _ => (arg.to_owned(), None),
    }
}
