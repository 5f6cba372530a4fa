use std::path::PathBuf;

/// Everything that can go wrong while starting a service, building an image or running the oracle.
///
/// Messages say what failed and, where one exists, which log file holds the service's own words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A helper program is not installed.
    #[error("`{program}` is not installed or not on PATH: run scripts/setup")]
    MissingProgram {
        /// The program that was looked for.
        program: String,
    },
    /// A program could not be started.
    #[error("could not start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("`{command}` failed with {status}:\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed (stderr, then stdout).
        output: String,
    },
    /// A service did not become ready in time.
    #[error("{service} did not become ready within {seconds}s; its log ({log}):\n{log_tail}")]
    NotReady {
        /// Which service.
        service: String,
        /// How long we waited.
        seconds: u64,
        /// Where its log is.
        log: PathBuf,
        /// The end of the log.
        log_tail: String,
    },
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// An HTTP exchange with a test service failed.
    #[error("{context}: {message}")]
    Http {
        /// What was being done, with the URL.
        context: String,
        /// What went wrong (status and body, or the transport error).
        message: String,
    },
    /// Generating keys or certificates failed.
    #[error("generating test PKI material failed: {0}")]
    Crypto(String),
    /// An image description cannot be built as asked.
    #[error("invalid image description: {0}")]
    InvalidImage(String),
}

/// The testkit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a context string to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
