//! A real S3 API server (`s3s-fs`) on loopback, storing objects under a temp directory.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::process::{Service, free_port, port_open, which};

/// A running `s3s-fs` with random credentials; everything is removed on drop.
#[derive(Debug)]
pub struct S3 {
    service: Service,
    dir: TempDir,
    addr: SocketAddr,
    access_key: String,
    secret_key: String,
}

impl S3 {
    /// Starts the server and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        let program = which("s3s-fs").ok_or_else(|| Error::MissingProgram {
            program: "s3s-fs".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("clip-s3-")
            .tempdir()
            .ctx(|| "creating the S3 server's temp dir".into())?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root).ctx(|| format!("creating {}", root.display()))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let access_key = format!("CLIPTEST{nanos:08X}");
        let secret_key = format!("clip-testkit-secret-{nanos:x}-{}", std::process::id());
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut cmd = Command::new(&program);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&root);
            let mut service = Service::spawn("s3s-fs", cmd, &dir.path().join("s3s-fs.log"))?;
            match service.wait_ready(Duration::from_secs(20), || port_open(addr)) {
                Ok(()) => {
                    return Ok(Self {
                        service,
                        dir,
                        addr,
                        access_key,
                        secret_key,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Crypto("unreachable".into())))
    }

    /// `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The access key id.
    #[must_use]
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret access key.
    #[must_use]
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The region clients should sign for.
    #[must_use]
    pub fn region(&self) -> &'static str {
        "us-east-1"
    }

    /// Creates a bucket. `s3s-fs` keeps each bucket as a top-level directory of its root.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let path = self.root().join(name);
        std::fs::create_dir_all(&path).ctx(|| format!("creating bucket dir {}", path.display()))
    }

    /// The directory the server stores buckets in.
    #[must_use]
    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    /// The server's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.service.log_tail(64 * 1024)
    }

    /// The temp directory (for tests that want to check nothing was left behind).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
