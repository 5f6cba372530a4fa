//! Criterion micro benchmarks for clip; the benches live in `benches/benches/`.
//!
//! Run all of them with `cargo bench -p clip-benches`; CI runs each briefly as a smoke test
//! (`cargo bench -p clip-benches -- --test`), never asserting times.
