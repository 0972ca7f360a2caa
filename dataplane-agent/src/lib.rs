//! The node agent of the eBPF service dataplane, as a library so that tests
//! and tools drive the datapath through the same code the agent runs.
//!
//! Flow: sources (`source`) feed one model of Services and EndpointSlices
//! (`model`); the sync engine (`sync`) turns it into writes to the pinned
//! maps (`lb_maps`); `datapath` loads and attaches the tc programs.

pub mod bpffs;
pub mod conntrack;
pub mod datapath;
pub mod healthz;
pub mod inspect;
pub mod interfaces;
pub mod lb_maps;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod run;
pub mod source;
pub mod sync;
