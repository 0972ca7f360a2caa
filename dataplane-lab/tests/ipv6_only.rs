//! The IPv6-only cluster (`cargo xtask lab up --ip-family ipv6`): pods and
//! nodes with IPv6 addresses only, pods routed between the nodes directly
//! and over VXLAN across an IPv6 underlay (the nodes' network), one agent
//! per node finding IPv4 absent and proxying IPv6 only. Needs root and the
//! release agent (`cargo xtask build`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use dataplane_lab::{
    agent::{agent_bin, Agent, Source},
    manifests, netns,
    netns::in_netns,
    require_root,
    topology::{default_pods, node_ip6, pod_cidr6, unique_prefix, ROUTER_NODE_IP6},
    traffic::{self, Outcome},
    CrossNode, Lab, LabSpec, Topology,
};

const SERVICE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The nodes' files (manifests, logs) and bpffs mounts, unmounted and
/// removed on drop.
struct NodeFiles {
    dir: PathBuf,
}

impl NodeFiles {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}files"));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Node `node`'s directory, with a bpffs mounted at `bpf/` in it.
    fn node(&self, node: u8) -> PathBuf {
        let dir = self.dir.join(format!("node{node}"));
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs).unwrap();
        netns::run("mount", &["-t", "bpf", "bpf", bpffs.to_str().unwrap()]).unwrap();
        dir
    }
}

impl Drop for NodeFiles {
    fn drop(&mut self) {
        for node in [1u8, 2] {
            let bpffs = self.dir.join(format!("node{node}/bpf"));
            let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lab `up --ip-family ipv6` builds, under a test's own prefix.
fn ipv6_only_lab(topology: Topology, cross_node: CrossNode) -> Lab {
    Lab::build(LabSpec {
        prefix: unique_prefix("six"),
        topology,
        cross_node,
        pods: default_pods(),
        ipv6: true,
        ipv4: false,
    })
    .expect("building the IPv6-only lab")
}

/// `ip ARGS` in namespace `ns`, its output.
fn ip_in(ns: &str, args: &[&str]) -> String {
    let full: Vec<&str> = ["-n", ns].iter().chain(args).copied().collect();
    netns::output("ip", &full).unwrap()
}

/// The nodes have no IPv4 address and no IPv4 default route; their
/// default routes, the direct routes to the other node's pods and the
/// VXLAN tunnel go over the nodes' IPv6 network.
fn assert_ipv6_underlay(lab: &Lab) {
    for (node, peer) in [(1u8, 2u8), (2, 1)] {
        let ns = lab.node_ns(node);
        let v4 = ip_in(&ns, &["-4", "-o", "addr", "show", "scope", "global"]);
        assert!(v4.trim().is_empty(), "node{node} has IPv4 addresses: {v4}");
        let default4 = ip_in(&ns, &["-4", "route", "show", "default"]);
        assert!(
            default4.trim().is_empty(),
            "node{node} has an IPv4 default route: {default4}"
        );
        let default6 = ip_in(&ns, &["-6", "route", "show", "default"]);
        assert!(
            default6.contains(&format!("via {ROUTER_NODE_IP6} dev eth0")),
            "node{node}'s IPv6 default route: {default6}"
        );
        match lab.spec.cross_node {
            CrossNode::Direct => {
                let route = ip_in(&ns, &["-6", "route", "show", &pod_cidr6(peer)]);
                assert!(
                    route.contains(&format!("via {} dev eth0", node_ip6(peer))),
                    "node{node}'s route to node{peer}'s pods: {route}"
                );
            }
            CrossNode::Vxlan => {
                let link = ip_in(&ns, &["-d", "link", "show", "vxlan0"]);
                assert!(
                    link.contains(&format!("local {} dev eth0", node_ip6(node))),
                    "node{node}'s vxlan0: {link}"
                );
                let fdb = netns::output(
                    "ip",
                    &[
                        "netns", "exec", &ns, "bridge", "fdb", "show", "dev", "vxlan0",
                    ],
                )
                .unwrap();
                assert!(
                    fdb.contains(&format!("dst {}", node_ip6(peer))),
                    "node{node}'s vxlan0 forwarding entries: {fdb}"
                );
            }
        }
    }
}

/// A service backed by the pods on node 2 answers the client on node 1
/// over IPv6, from the service's address, across the IPv6 underlay; the
/// pods and nodes have no IPv4 and the agents find IPv4 absent.
fn service_answers_from_a_pod(topology: Topology, cross_node: CrossNode) {
    let lab = ipv6_only_lab(topology, cross_node);
    assert_ipv6_underlay(&lab);
    for pod in &lab.spec.pods {
        let v4 = netns::output(
            "ip",
            &[
                "-n",
                &lab.pod_ns(&pod.name),
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
        )
        .unwrap();
        assert!(
            v4.trim().is_empty(),
            "{} has IPv4 addresses: {v4}",
            pod.name
        );
    }
    let remote: Vec<_> = ["web-b", "web-c"].map(|n| lab.pod(n).clone()).into();
    for pod in &remote {
        traffic::spawn_server(&lab.pod_ns(&pod.name), &pod.name).unwrap();
        traffic::wait_listening(&lab.pod_ns(&pod.name), Duration::from_secs(10)).unwrap();
    }
    let service = manifests::with_cluster_ips(
        manifests::web_service("web", Ipv4Addr::UNSPECIFIED),
        &[SERVICE_IP6.into()],
    );
    let yaml = manifests::manifest_per_family(&service, |family| {
        remote
            .iter()
            .map(|p| manifests::pod_endpoint_of(p, family))
            .collect()
    });
    // Dropped after the agents (declared before them).
    let files = NodeFiles::new(&lab.spec.prefix);
    let mut agents = Vec::new();
    for node in [1u8, 2] {
        let node_dir = files.node(node);
        manifests::write(&node_dir.join("manifests"), "web.yaml", &yaml).unwrap();
        let mut agent = Agent::launch_bin(
            &agent_bin(),
            &lab.node_ns(node),
            &format!("node{node}"),
            Source::Manifests(&node_dir.join("manifests")),
            &node_dir.join("bpf"),
            &node_dir.join("agent.log"),
            // No --ip-families: the agent finds the node's families.
            &[],
        )
        .unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
        agents.push(agent);
    }

    let to = SocketAddr::new(IpAddr::V6(SERVICE_IP6), manifests::HTTP.port);
    let mut answered = BTreeSet::new();
    for _ in 0..20 {
        let outcome = in_netns(&lab.pod_ns("client"), move || traffic::tcp_request(to)).unwrap();
        match outcome {
            Outcome::Answered { backend, from } => {
                assert_eq!(from, to, "the answer's source is the service");
                answered.insert(backend);
            }
            other => panic!(
                "request to {to}: {other:?}; agent log:\n{}",
                agents[0].log_text()
            ),
        }
    }
    assert_eq!(
        answered,
        BTreeSet::from(["web-b".to_owned(), "web-c".to_owned()]),
        "both remote backends answer"
    );
    for agent in &agents {
        let log = agent.log_text();
        assert_eq!(
            log.matches("IPv4: not proxied (the node has no address of it)")
                .count(),
            1,
            "the agent says once that it proxies IPv6 only: {log}"
        );
        assert!(!log.contains("IPv6: not proxied"), "{log}");
    }
}

#[test]
fn ipv6_only_cluster_serves_a_service_across_direct_routes() {
    require_root();
    service_answers_from_a_pod(Topology::Bridge, CrossNode::Direct);
}

#[test]
fn ipv6_only_cluster_serves_a_service_over_vxlan() {
    require_root();
    service_answers_from_a_pod(Topology::Bridge, CrossNode::Vxlan);
}

#[test]
fn ipv6_only_routed_pods_reach_a_service() {
    require_root();
    service_answers_from_a_pod(Topology::Routed, CrossNode::Direct);
}
