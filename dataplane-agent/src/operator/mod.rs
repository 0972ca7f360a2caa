//! The operator surface: what a person or a scraper sees of the agent.
//!
//! `healthz` and `metrics` are served through `http`; `inspect` and
//! `monitor` read the pinned maps (through `node::pinned`, as the metrics
//! do), with or without a running agent.

pub mod health_check;
pub mod healthz;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod monitor;
