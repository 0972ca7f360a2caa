//! The node agent of the eBPF service dataplane, as a library so that tests
//! and tools drive the datapath through the same code the agent runs.
//!
//! Three rooms, and arrows that only run down:
//!
//! - [`control`], the control plane: sources (manifest files, the Kubernetes
//!   API) feed one channel of updates; the control loop applies them to the
//!   one model of Services and EndpointSlices and has the sync engine write
//!   the difference to the maps.
//! - [`node`], the node datapath: loading the eBPF object, attaching it to
//!   pod interfaces, the bpffs, the load-balancing maps, the one reader of
//!   the pinned maps (`node::pinned`) and conntrack expiry.
//! - [`operator`], the operator surface: `/healthz` and `/metrics` over one
//!   small HTTP server, `inspect` and `monitor`.
//!
//! `control` and `operator` use `node` and `dataplane-common`; `node` uses
//! neither of them. The sync engine knows nothing of HTTP or metrics: the
//! control loop reports its numbers through [`control::run_loop::Report`],
//! which the metrics implement, and marks [`control::health::Health`], which
//! `/healthz` serves. [`run`] is `dataplane-agent run`: options,
//! kubeconfig, servers and signals, wiring the three rooms together;
//! [`kubeproxy_config`] reads kube-proxy's configuration file onto its
//! options.

pub mod control;
pub mod kubeproxy_config;
pub mod node;
pub mod operator;
pub mod run;
