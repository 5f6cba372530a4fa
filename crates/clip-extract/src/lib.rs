//! The v1 path: data-carrying archives and safe extraction.
//!
//! # Model
//!
//! v1 is the default and the fallback whenever v2 cannot be used. An image (from a registry or an
//! OCI layout directory) or an existing root filesystem directory becomes a v1 archive holding every
//! file's bytes and a content digest per file, written in one streaming pass with bounded memory.
//! The archive may live locally or in object storage behind a small v1-remote metadata archive.
//! Extraction restores an archive of any kind into a directory, resolving every path beneath the
//! target root so a hostile archive cannot write outside it.
//!
//! Status: implemented in the v1 issue.
