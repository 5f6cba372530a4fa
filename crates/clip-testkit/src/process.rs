//! Child processes that live as long as a test needs them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// A running service process, killed (and its log shown if the test is failing) on drop.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .ctx(|| format!("opening log file {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("cloning log file {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    Error::MissingProgram {
                        program: program.clone(),
                    }
                } else {
                    Error::Spawn {
                        program: program.clone(),
                        source,
                    }
                }
            })?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The log file of this service.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `max` bytes of the log.
    #[must_use]
    pub fn log_tail(&self, max: u64) -> String {
        log_tail(&self.log, max)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Polls `ready` until it returns true, the process exits, or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if ready() {
                return Ok(());
            }
            if !self.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(Error::NotReady {
            service: self.name.clone(),
            seconds: timeout.as_secs(),
            log: self.log.clone(),
            log_tail: self.log_tail(4096),
        })
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // A failing test shows what the service said; this is test support, so stderr is right.
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "---- log of {} ({}) ----\n{}\n---- end of log ----",
                    self.name,
                    self.log.display(),
                    self.log_tail(16 * 1024)
                );
            }
        }
    }
}

/// The last `max` bytes of a file, lossily decoded.
pub(crate) fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l =
        TcpListener::bind("127.0.0.1:0").ctx(|| "binding an ephemeral port on 127.0.0.1".into())?;
    Ok(l.local_addr()
        .ctx(|| "reading the ephemeral port".into())?
        .port())
}

/// Whether something accepts TCP connections at `addr`.
#[must_use]
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether `program` can be found on PATH (or in /usr/sbin, where Debian puts some tools).
#[must_use]
pub fn have_program(program: &str) -> bool {
    which(program).is_some()
}

/// The full path of `program`, searching PATH and the sbin directories.
#[must_use]
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/local/sbin"]
                .into_iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs a command to completion; a non-zero exit is an error carrying its output.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let line = format!(
        "{} {}",
        program,
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingProgram {
                program: program.clone(),
            }
        } else {
            Error::Spawn {
                program: program.clone(),
                source,
            }
        }
    })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command: line,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        });
    }
    Ok(out)
}
