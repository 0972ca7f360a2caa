//! `dplab up`'s flags. xtask includes this file too (`#[path]`), so that
//! `cargo xtask lab up --help` shows the same flags without depending on
//! dataplane-lab; keep it to clap alone.

#[derive(clap::Args, Clone)]
pub struct UpOptions {
    /// How traffic crosses between the nodes.
    #[arg(long, value_enum, default_value = "direct")]
    pub overlay: Overlay,
    /// How pods attach to their node.
    #[arg(long, value_enum, default_value = "bridge")]
    pub topology: PodNetwork,
    /// Only the topology and the backend servers: no agent is built or
    /// started (pod-to-pod traffic works, service IPs do not).
    #[arg(long)]
    pub no_agent: bool,
    /// Address families of pods and services: `dual` gives pods and nodes
    /// IPv6 addresses too and the web service a cluster IP of each family;
    /// `ipv6` is an IPv6-only cluster: pods and nodes IPv6 only, routed
    /// between the nodes directly or over VXLAN across an IPv6 underlay
    /// (the nodes' network), the web service an IPv6 ClusterIP and the
    /// agents proxying IPv6 only (the nodes having no IPv4 address).
    #[arg(long, value_enum, default_value = "ipv4")]
    pub ip_family: IpFamily,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    Ipv4,
    Dual,
    Ipv6,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum Overlay {
    /// Direct routes between the nodes.
    Direct,
    /// A flannel-like VXLAN overlay.
    Vxlan,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum PodNetwork {
    /// cbr0 bridge per node (the talk's layout).
    Bridge,
    /// Routed /32 pods with proxy ARP (Calico's layout).
    Routed,
}
