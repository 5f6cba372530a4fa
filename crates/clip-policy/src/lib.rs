//! Configuration and the v1/v2 decisions.
//!
//! # Model
//!
//! Configuration comes from defaults, then the YAML file's `imageService:` section, then the
//! environment (`CLIP_VERSION`, `B9_BUILD_REGISTRY`, …): env > file > defaults. Decisions are pure
//! functions of that configuration and of observed facts (is the build registry reachable? did the
//! push or the index fail?), implementing the behaviour matrix: v1 is the default; v2 pulls index
//! straight from the source registry; v2 builds push to the build registry and index from it; any
//! v2 problem during a build falls back to v1, so builds never fail because of v2.
//!
//! Status: implemented in the image service issue.
