//! The lab: the talk's cluster topology (nodes with a `cbr0` bridge and pods
//! on veth pairs, or Calico-style routed /32 pods; nodes joined by direct
//! routes or a VXLAN overlay) built in network namespaces, with traffic
//! helpers, agent processes and the manifests they read. Used by
//! `cargo xtask lab`, the integration tests and the bench: one topology
//! builder for all.

pub mod agent;
pub mod cgroup;
pub mod manifests;
pub mod netns;
pub mod topology;
pub mod traffic;

pub use topology::{CrossNode, Lab, LabSpec, PodSpec, Topology};

/// Labs need root (namespaces, and BPF for the agents). A test that cannot
/// run fails here, saying why, instead of passing without having run.
#[track_caller]
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces and BPF); run it as root, \
         e.g. `sudo -E cargo xtask test`"
    );
}
