//! The lab: the talk's cluster topology (nodes with a `cbr0` bridge and pods
//! on veth pairs, or Calico-style routed /32 pods; nodes joined by direct
//! routes or a VXLAN overlay) built in network namespaces, with traffic
//! helpers and agent processes. Used by `cargo xtask lab` and by the
//! integration tests: one topology builder for both.

pub mod agent;
pub mod apiserver;
pub mod manifests;
pub mod netns;
pub mod topology;
pub mod traffic;

pub use topology::{CrossNode, Lab, LabSpec, PodSpec, Topology};

/// Labs need root (namespaces, and BPF for the agents). Returns false, after
/// saying that the test is skipped, when not root.
pub fn privileged() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipping: needs root (network namespaces and BPF)");
    }
    root
}
