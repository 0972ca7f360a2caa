//! The control plane: a Service's path from a source to the maps.
//!
//! `source` (manifests or the Kubernetes API) → one channel of
//! `SourceUpdate`s → `run_loop` (owns the model, the engine and health) →
//! `model` (Services and EndpointSlices → frontends and backends) → `sync`
//! (the diff against what the maps hold) → `node::lb_maps`.

mod family_map;
pub mod health;
pub mod model;
pub mod run_loop;
pub mod source;
pub mod sync;
