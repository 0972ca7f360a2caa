//! What the tests and the bench share: the datapath loaded on a private
//! bpffs and run under BPF_PROG_TEST_RUN ([`datapath`]), test packets built
//! with etherparse and checked from their bytes ([`packets`]), and a
//! Kubernetes API server double ([`apiserver`]). Kept out of `dataplane-lab`
//! so that `cargo xtask` (which uses the lab) does not build axum.

pub mod apiserver;
pub mod datapath;
pub mod datapath6;
pub mod netns;
pub mod packets;
pub mod packets6;
