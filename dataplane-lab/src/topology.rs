//! Building and tearing down the lab's namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;

use crate::netns::{exec, forward_as_a_node, ip, kill_all, list, run, sysctl};

/// How pods connect to their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// The talk's: a `cbr0` bridge per node, pods in one /24 per node.
    Bridge,
    /// Calico's: routed /32 pods, host side answers ARP by proxy.
    Routed,
}

/// How traffic crosses from one node to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossNode {
    /// Each node routes the other's pod CIDR via its address.
    Direct,
    /// flannel-like VXLAN overlay (VNI 1, port 8472).
    Vxlan,
}

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    /// 1 or 2.
    pub node: u8,
    /// Last octet of the pod IP 10.244.{node}.{host}.
    pub host: u8,
}

impl PodSpec {
    pub fn new(name: &str, node: u8, host: u8) -> Self {
        Self {
            name: name.into(),
            node,
            host,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.node, self.host)
    }

    /// Its IPv6 address (with [`LabSpec::ipv6`]): `fd00:10:244:NODE::HOST`
    /// in its node's /64, HOST written with the digits of the IPv4 one
    /// (10.244.1.11 and fd00:10:244:1::11).
    pub fn ipv6(&self) -> Ipv6Addr {
        let host = u16::from_str_radix(&self.host.to_string(), 16).expect("decimal digits");
        Ipv6Addr::new(0xfd00, 0x10, 0x244, self.node.into(), 0, 0, 0, host)
    }
}

/// A node's pod /64 (with [`LabSpec::ipv6`]).
pub fn pod_cidr6(node: u8) -> String {
    format!("fd00:10:244:{node}::/64")
}

/// A node's IPv6 address on the nodes' network.
pub fn node_ip6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, node.into())
}

/// The IPv6 gateway a routed pod's default route points at: a link-local
/// address every host-side veth holds, as Calico's does.
pub const ROUTED_GATEWAY6: &str = "fe80::1";

#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Prefix of every namespace name (unique per lab).
    pub prefix: String,
    pub topology: Topology,
    pub cross_node: CrossNode,
    pub pods: Vec<PodSpec>,
    /// Pods and nodes get IPv6 addresses too (dual-stack): a /64 per
    /// node's pods, routed between the nodes as the IPv4 ones are.
    pub ipv6: bool,
    /// Pods and nodes get IPv4 addresses. Off with `ipv6`: an IPv6-only
    /// cluster, whose nodes have no IPv4 address at all: their network
    /// (the underlay: direct routes between the nodes, VXLAN) is IPv6 as
    /// well, the router's side of it too. Only the outside network, beyond
    /// the router, keeps its IPv4 addresses.
    pub ipv4: bool,
}

impl LabSpec {
    /// Whether the nodes' network is IPv6 (the IPv6-only cluster) rather
    /// than IPv4.
    pub fn ipv6_underlay(&self) -> bool {
        !self.ipv4
    }

    /// Node `node`'s address on the nodes' network: where the other node
    /// sends its pods' traffic (the next hop of direct routes, the VXLAN
    /// tunnel's end).
    pub fn underlay_ip(&self, node: u8) -> IpAddr {
        if self.ipv6_underlay() {
            node_ip6(node).into()
        } else {
            node_ip(node).into()
        }
    }
}

/// The two-node lab with a client and three web pods, as in the talk.
pub fn default_pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("client", 1, 10),
        PodSpec::new("web-a", 1, 11),
        PodSpec::new("web-b", 2, 10),
        PodSpec::new("web-c", 2, 11),
    ]
}

/// The MAC address of node `node`'s `cbr0` (the pods' gateway): locally
/// administered, carrying the gateway's IP 10.244.NODE.1.
pub fn bridge_mac(node: u8) -> String {
    format!("02:00:0a:f4:{node:02x}:01")
}

/// Makes `ns`'s `eth0` send packets with complete L4 checksums, as frames
/// arriving off a wire have them. A veth otherwise leaves them to be
/// finished later (CHECKSUM_PARTIAL, kept across the router and the
/// bridge), which an XDP program on an uplink cannot tell and whose
/// incremental checksum updates would then be wrong.
fn full_checksums(ns: &str) -> anyhow::Result<()> {
    exec(ns, &["ethtool", "-K", "eth0", "tx", "off"])
}

/// Adds IPv6 address `cidr` to `dev` in `ns`, usable at once: no duplicate
/// address detection (nothing else on these links could hold it, and a
/// tentative address cannot be a source yet).
fn addr6(ns: &str, cidr: &str, dev: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad"])
}

/// Makes `ns` forward IPv6 as a node does (the IPv4 settings are
/// [`forward_as_a_node`]'s).
fn forward_ipv6(ns: &str) -> anyhow::Result<()> {
    sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
}

/// A unique prefix for a test's namespaces: tests run in parallel.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "dpt{}x{}{tag}-",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A built lab. Dropping it stops the processes living in its namespaces
/// and removes every namespace it created, also when a test panics.
pub struct Lab {
    pub spec: LabSpec,
    /// Namespaces are removed on drop unless the lab is kept (`lab up`).
    keep: bool,
    created: Vec<String>,
}

pub const NODES: [u8; 2] = [1, 2];

/// The outside client's address: a host beyond the router, not in the
/// cluster.
pub const OUTSIDE_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's address on the outside network.
pub const ROUTER_OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside client's IPv6 address (with [`LabSpec::ipv6`]).
pub const OUTSIDE_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
/// The router's IPv6 address on the outside network.
pub const ROUTER_OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 1);
/// The router's IPv6 address on the nodes' network.
pub const ROUTER_NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 0xfe);
/// The router's address on the nodes' network: their default gateway.
pub const ROUTER_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
/// Load-balancer IPs the router sends to the nodes (ECMP over both), as a
/// cloud load balancer or MetalLB in BGP mode would.
pub const LB_CIDR: &str = "198.51.100.0/24";

/// A node's address on the uplink (`eth0`), where NodePorts are served.
pub fn node_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, node)
}

impl Lab {
    pub fn node_ns(&self, node: u8) -> String {
        format!("{}node{node}", self.spec.prefix)
    }

    /// The router joining both nodes' uplinks to the outside network.
    pub fn router_ns(&self) -> String {
        format!("{}router", self.spec.prefix)
    }

    /// The outside client, behind the router.
    pub fn outside_ns(&self) -> String {
        format!("{}outside", self.spec.prefix)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}{pod}", self.spec.prefix)
    }

    pub fn pod(&self, name: &str) -> &PodSpec {
        self.spec
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Keeps the namespaces after the value is dropped (for `lab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    pub fn build(spec: LabSpec) -> anyhow::Result<Self> {
        let mut lab = Self {
            spec,
            keep: false,
            created: Vec::new(),
        };
        lab.build_nodes().context("building nodes")?;
        let pods = lab.spec.pods.clone();
        for pod in &pods {
            lab.add_pod(pod)
                .with_context(|| format!("adding pod {}", pod.name))?;
        }
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        if self.spec.ipv6 {
            // No duplicate address detection on any interface created here,
            // link-local addresses included (see `addr6`).
            for key in ["all", "default"] {
                crate::netns::sysctl(name, &format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
            }
        }
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// The cgroup of a node's host processes, where its agent attaches the
    /// socket hooks (see `crate::cgroup`).
    pub fn node_cgroup(&self, node: u8) -> PathBuf {
        crate::cgroup::node_cgroup(&self.node_ns(node))
    }

    fn build_nodes(&mut self) -> anyhow::Result<()> {
        for n in NODES {
            let ns = self.node_ns(n);
            self.add_ns(&ns)?;
            crate::cgroup::create_node_cgroup(&ns)?;
            forward_as_a_node(&ns)?;
            if self.spec.topology == Topology::Routed {
                // Proxy ARP answers only for addresses the node routes out of
                // another interface; a real node reaches the pods' fake
                // gateway through its default route, these nodes have none.
                ip(&["-n", &ns, "route", "add", "169.254.1.1/32", "dev", "lo"])?;
            }
            if self.spec.topology == Topology::Bridge {
                // A fixed address, as CNI's bridge plugin and docker0 set:
                // otherwise the bridge takes the lowest of its ports', and
                // a pod created later can change it under the other pods'
                // cached gateway entries (their routed traffic is lost
                // until the entries expire).
                ip(&[
                    "-n",
                    &ns,
                    "link",
                    "add",
                    "cbr0",
                    "address",
                    &bridge_mac(n),
                    "type",
                    "bridge",
                ])?;
                if self.spec.ipv4 {
                    ip(&[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("10.244.{n}.1/24"),
                        "dev",
                        "cbr0",
                    ])?;
                }
                if self.spec.ipv6 {
                    addr6(&ns, &format!("fd00:10:244:{n}::1/64"), "cbr0")?;
                }
                ip(&["-n", &ns, "link", "set", "cbr0", "up"])?;
            }
            if self.spec.ipv6 {
                forward_ipv6(&ns)?;
            }
        }
        // The nodes' network: each node's eth0 (its uplink) on a bridge in
        // the router, which also routes to the outside network and sends
        // load-balancer IPs to the nodes.
        let router = self.router_ns();
        self.add_ns(&router)?;
        forward_as_a_node(&router)?;
        ip(&["-n", &router, "link", "add", "br0", "type", "bridge"])?;
        if self.spec.ipv4 {
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{ROUTER_NODE_IP}/24"),
                "dev",
                "br0",
            ])?;
        }
        ip(&["-n", &router, "link", "set", "br0", "up"])?;
        if self.spec.ipv6 {
            forward_ipv6(&router)?;
            addr6(&router, &format!("{ROUTER_NODE_IP6}/64"), "br0")?;
        }
        for n in NODES {
            let ns = self.node_ns(n);
            let port = format!("node{n}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &router,
            ])?;
            ip(&["-n", &router, "link", "set", &port, "master", "br0", "up"])?;
            // NAPI on the router's side, so the node's native XDP can send
            // frames back out of its uplink (XDP_TX on a veth needs it).
            // (Toggled: only a change of the feature enables NAPI.)
            exec(&router, &["ethtool", "-K", &port, "gro", "off"])?;
            exec(&router, &["ethtool", "-K", &port, "gro", "on"])?;
            if self.spec.ipv4 {
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", node_ip(n)),
                    "dev",
                    "eth0",
                ])?;
            }
            if self.spec.ipv6 {
                addr6(&ns, &format!("{}/64", node_ip6(n)), "eth0")?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            if self.spec.ipv6 {
                // The outside client's replies leave through the router.
                ip(&[
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &ROUTER_NODE_IP6.to_string(),
                ])?;
            }
            if self.spec.ipv4 {
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &ROUTER_NODE_IP.to_string(),
                ])?;
            }
        }
        let outside = self.outside_ns();
        self.add_ns(&outside)?;
        ip(&[
            "-n", &router, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns",
            &outside,
        ])?;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("{ROUTER_OUTSIDE_IP}/24"),
            "dev",
            "ext0",
        ])?;
        ip(&["-n", &router, "link", "set", "ext0", "up"])?;
        ip(&[
            "-n",
            &outside,
            "addr",
            "add",
            &format!("{OUTSIDE_CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &outside, "link", "set", "eth0", "up"])?;
        if self.spec.ipv6 {
            addr6(&router, &format!("{ROUTER_OUTSIDE_IP6}/64"), "ext0")?;
            addr6(&outside, &format!("{OUTSIDE_CLIENT_IP6}/64"), "eth0")?;
            ip(&[
                "-n",
                &outside,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &ROUTER_OUTSIDE_IP6.to_string(),
            ])?;
        }
        full_checksums(&outside)?;
        ip(&[
            "-n",
            &outside,
            "route",
            "add",
            "default",
            "via",
            &ROUTER_OUTSIDE_IP.to_string(),
        ])?;
        if self.spec.ipv4 {
            ip(&[
                "-n",
                &router,
                "route",
                "add",
                LB_CIDR,
                "nexthop",
                "via",
                &node_ip(1).to_string(),
                "nexthop",
                "via",
                &node_ip(2).to_string(),
            ])?;
        }
        for (n, peer) in [(1u8, 2u8), (2, 1)] {
            let ns = self.node_ns(n);
            let peer_cidr = format!("10.244.{peer}.0/24");
            match self.spec.cross_node {
                CrossNode::Direct => {
                    if self.spec.ipv4 {
                        ip(&[
                            "-n",
                            &ns,
                            "route",
                            "add",
                            &peer_cidr,
                            "via",
                            &node_ip(peer).to_string(),
                        ])?;
                    }
                    if self.spec.ipv6 {
                        ip(&[
                            "-n",
                            &ns,
                            "-6",
                            "route",
                            "add",
                            &pod_cidr6(peer),
                            "via",
                            &node_ip6(peer).to_string(),
                        ])?;
                    }
                }
                CrossNode::Vxlan => {
                    let mac = |n: u8| format!("02:00:00:00:00:0{n}");
                    ip(&[
                        "-n",
                        &ns,
                        "link",
                        "add",
                        "vxlan0",
                        "type",
                        "vxlan",
                        "id",
                        "1",
                        "dstport",
                        "8472",
                        "local",
                        &self.spec.underlay_ip(n).to_string(),
                        "dev",
                        "eth0",
                        "nolearning",
                    ])?;
                    ip(&["-n", &ns, "link", "set", "vxlan0", "address", &mac(n)])?;
                    if self.spec.ipv4 {
                        ip(&[
                            "-n",
                            &ns,
                            "addr",
                            "add",
                            &format!("10.244.{n}.0/32"),
                            "dev",
                            "vxlan0",
                        ])?;
                    }
                    ip(&["-n", &ns, "link", "set", "vxlan0", "up"])?;
                    if self.spec.ipv4 {
                        let gw = format!("10.244.{peer}.0");
                        ip(&[
                            "-n", &ns, "route", "add", &peer_cidr, "via", &gw, "dev", "vxlan0",
                            "onlink",
                        ])?;
                        ip(&[
                            "-n",
                            &ns,
                            "neigh",
                            "add",
                            &gw,
                            "lladdr",
                            &mac(peer),
                            "dev",
                            "vxlan0",
                            "nud",
                            "permanent",
                        ])?;
                    }
                    exec(
                        &ns,
                        &[
                            "bridge",
                            "fdb",
                            "append",
                            &mac(peer),
                            "dev",
                            "vxlan0",
                            "dst",
                            &self.spec.underlay_ip(peer).to_string(),
                        ],
                    )?;
                    if self.spec.ipv6 {
                        // IPv6 pods over the same tunnel (IPv4 or IPv6
                        // underlay alike): each node's vxlan0 holds an
                        // address of its own pod /64, the peer's is the next
                        // hop, resolved statically.
                        let gw6 = |n: u8| format!("fd00:10:244:{n}::fffe");
                        addr6(&ns, &format!("{}/128", gw6(n)), "vxlan0")?;
                        ip(&[
                            "-n",
                            &ns,
                            "-6",
                            "route",
                            "add",
                            &pod_cidr6(peer),
                            "via",
                            &gw6(peer),
                            "dev",
                            "vxlan0",
                            "onlink",
                        ])?;
                        ip(&[
                            "-n",
                            &ns,
                            "-6",
                            "neigh",
                            "add",
                            &gw6(peer),
                            "lladdr",
                            &mac(peer),
                            "dev",
                            "vxlan0",
                            "nud",
                            "permanent",
                        ])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Host-side interface name of a pod (what `--pod-ifaces veth*` matches).
    pub fn host_iface(pod: &PodSpec) -> String {
        let mut name = format!("veth{}", pod.name.replace('-', ""));
        name.truncate(15);
        name
    }

    /// Adds a pod (also after agents started: a new pod appearing).
    pub fn add_pod(&mut self, pod: &PodSpec) -> anyhow::Result<()> {
        if !self.spec.pods.iter().any(|p| p.name == pod.name) {
            self.spec.pods.push(pod.clone());
        }
        let ns = self.pod_ns(&pod.name);
        let node = self.node_ns(pod.node);
        let host_if = Self::host_iface(pod);
        self.add_ns(&ns)?;
        ip(&[
            "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        if self.spec.cross_node == CrossNode::Vxlan {
            // Room for the VXLAN encapsulation on the node-to-node path:
            // 50 bytes over IPv4, 70 over IPv6.
            let mtu = if self.spec.ipv6_underlay() {
                "1430"
            } else {
                "1450"
            };
            ip(&["-n", &ns, "link", "set", "eth0", "mtu", mtu])?;
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        full_checksums(&ns)?;
        let pod_ip = pod.ip().to_string();
        let pod_ip6 = pod.ipv6().to_string();
        match self.spec.topology {
            Topology::Bridge => {
                ip(&["-n", &node, "link", "set", &host_if, "master", "cbr0", "up"])?;
                if self.spec.ipv4 {
                    ip(&[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("{pod_ip}/24"),
                        "dev",
                        "eth0",
                    ])?;
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("10.244.{}.1", pod.node),
                    ])?;
                }
                if self.spec.ipv6 {
                    addr6(&ns, &format!("{pod_ip6}/64"), "eth0")?;
                    ip(&[
                        "-n",
                        &ns,
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("fd00:10:244:{}::1", pod.node),
                    ])?;
                }
            }
            Topology::Routed => {
                ip(&["-n", &node, "link", "set", &host_if, "up"])?;
                if self.spec.ipv4 {
                    Self::route_pod4(&node, &ns, &host_if, &pod_ip)?;
                }
                if self.spec.ipv6 {
                    Self::route_pod6(&node, &ns, &host_if, &pod_ip6)?;
                }
            }
        }
        Ok(())
    }

    /// A routed pod's IPv4 /32, Calico's way: proxy ARP on the host side
    /// for the fake gateway 169.254.1.1.
    fn route_pod4(node: &str, ns: &str, host_if: &str, pod_ip: &str) -> anyhow::Result<()> {
        sysctl(node, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
        ip(&[
            "-n",
            node,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            host_if,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// A routed pod's IPv6 /128 behind the host side's link-local gateway.
    fn route_pod6(node: &str, ns: &str, host_if: &str, pod_ip6: &str) -> anyhow::Result<()> {
        // The node answers for the link-local gateway itself:
        // no proxy NDP needed.
        addr6(node, &format!("{ROUTED_GATEWAY6}/64"), host_if)?;
        ip(&[
            "-n",
            node,
            "-6",
            "route",
            "add",
            &format!("{pod_ip6}/128"),
            "dev",
            host_if,
        ])?;
        addr6(ns, &format!("{pod_ip6}/128"), "eth0")?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            ROUTED_GATEWAY6,
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    /// Stops the processes living in, then removes, every namespace whose
    /// name starts with `prefix` (`cargo xtask lab down`).
    pub fn down_by_prefix(prefix: &str) -> anyhow::Result<usize> {
        let doomed: Vec<String> = list()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        kill_all(&doomed);
        for ns in &doomed {
            crate::cgroup::remove_node_cgroup(&crate::cgroup::node_cgroup(ns));
            run("ip", &["netns", "del", ns])?;
        }
        Ok(doomed.len())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Processes started in the lab's namespaces (agents, servers) die
        // with it; threads of this process that joined them are not listed.
        kill_all(&self.created);
        for ns in self.created.iter().rev() {
            // Only node namespaces have one; removing a missing one is a no-op.
            crate::cgroup::remove_node_cgroup(&crate::cgroup::node_cgroup(ns));
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}
