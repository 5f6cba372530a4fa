use std::path::PathBuf;

use crate::spec::SectionId;

/// Why an archive could not be read or written.
///
/// Reading errors name the part of the archive that is wrong, so a user can tell a truncated
/// download from a foreign file from a newer format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not start with the `.clip` magic bytes.
    #[error("not a .clip archive (bad magic bytes)")]
    BadMagic,
    /// The archive was written by a newer (or unknown) format version.
    #[error(
        "unsupported .clip format version {found} (this build reads version {supported}); upgrade clip"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The file is shorter than its header says, or shorter than a header.
    #[error("archive is truncated: {expected} bytes expected, {found} present")]
    Truncated {
        /// Length the header declares (or the minimum length).
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// The header (or its section table) does not match its checksum.
    #[error("archive header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// A section does not match its checksum.
    #[error("section {section} is corrupt (checksum mismatch)")]
    SectionChecksum {
        /// The damaged section.
        section: SectionId,
    },
    /// The header is structurally invalid.
    #[error("invalid archive header: {0}")]
    InvalidHeader(String),
    /// A section is missing, duplicated, misplaced or malformed.
    #[error("invalid section {section}: {reason}")]
    InvalidSection {
        /// The section.
        section: SectionId,
        /// What is wrong.
        reason: String,
    },
    /// An index entry is invalid.
    #[error("invalid entry #{index}: {reason}")]
    InvalidEntry {
        /// Entry index.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// The metadata section is not valid JSON of the expected shape.
    #[error("invalid archive metadata: {0}")]
    InvalidMeta(String),
    /// The tree given to a writer is invalid.
    #[error("invalid tree: {0}")]
    InvalidTree(String),
    /// An operation needs another kind of archive.
    #[error("{operation} needs a {needed} archive, this one is {found}")]
    WrongKind {
        /// What was attempted.
        operation: &'static str,
        /// The kind it needs.
        needed: &'static str,
        /// The kind at hand.
        found: crate::ArchiveKind,
    },
    /// File data does not match its recorded digest.
    #[error("content of {path} does not match its digest")]
    DigestMismatch {
        /// The file.
        path: String,
    },
    /// An I/O error while reading or writing an archive file.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Publishing a file on the host failed (temp file, fsync, rename).
    #[error(transparent)]
    Host(#[from] clip_host::HostError),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn section_err(section: SectionId, reason: impl Into<String>) -> Error {
    Error::InvalidSection {
        section,
        reason: reason.into(),
    }
}

pub(crate) fn entry_err(index: u32, reason: impl Into<String>) -> Error {
    Error::InvalidEntry {
        index,
        reason: reason.into(),
    }
}
