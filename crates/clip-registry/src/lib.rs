//! OCI distribution client.
//!
//! # Model
//!
//! Everything that touches a registry goes through this crate: resolving references
//! (`nginx` → `docker.io/library/nginx:latest`), authenticating (anonymous, Basic, Bearer tokens from
//! the `WWW-Authenticate` challenge, refreshed *before* they expire and on 401/403), resolving
//! manifests and indexes with platform selection, streaming blobs with digest verification, exact
//! byte-range reads of blobs (the v2 lazy read path), and pushing images built by buildah.
//!
//! Requests share one connection pool, retry with backoff and jitter on transient failures within a
//! deadline, follow redirects to object storage without leaking credentials, and fail with typed
//! errors that carry the registry, repository, digest and OCI error code.
//!
//! Status: implemented in the registry client issue.
