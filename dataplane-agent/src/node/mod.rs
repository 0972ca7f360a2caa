//! The node datapath: the eBPF object, its attach points and its maps.
//!
//! `datapath` loads the object and attaches the tc programs to the pod
//! interfaces `interfaces` reports; `bpffs` is where maps and links are
//! pinned; `lb_maps` is the load-balancing maps as the sync engine writes
//! them; `pinned` opens and decodes the maps for everyone who reads them;
//! `ct_gc` sweeps expired conntrack entries (`ct_gc6` the IPv6 ones), sized and timed by
//! `ct_options`; `migrate` carries the maps of an earlier agent (another
//! layout, other sizes) into this one's; `socket_lb` attaches the cgroup
//! socket hooks; `verify` loads a program again when a signal
//! interrupted its verification. Nothing here knows about
//! the control plane or the operator surface.

pub mod bpffs;
pub mod ct_gc;
pub mod ct_gc6;
pub mod ct_options;
pub mod datapath;
pub mod interfaces;
pub mod lb_maps;
pub mod map_batch;
pub mod migrate;
pub mod pinned;
pub mod sock_destroy;
pub mod socket_lb;
pub mod uplink;
pub mod verify;
