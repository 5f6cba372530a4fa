//! The embeddable facade and image service.
//!
//! # Model
//!
//! `clip-core` composes the capability crates into the three worker flows other Rust services embed:
//!
//! - **pull and archive** an image (v2: index straight from the source registry; v1: copy, extract,
//!   archive);
//! - **build and archive** (buildah bud → push to the build registry → index; any v2 problem falls
//!   back to v1);
//! - **pull lazy**: fetch an archive, detect v1/v2, mount it once per image, and give each container
//!   an overlay on top of the read-only mount.
//!
//! Status: implemented in the image service issue.

pub use clip_extract as extract;
pub use clip_format as format;
pub use clip_indexer as indexer;
pub use clip_registry as registry;
