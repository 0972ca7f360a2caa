//! The lab's topologies without any agent: plain pod-to-pod traffic on the
//! same node and across nodes, in every layout. Needs root (namespaces).

use std::net::{IpAddr, SocketAddr};

use dataplane_lab::{
    netns::{self, in_netns},
    require_root,
    topology::{bridge_mac, default_pods, unique_prefix},
    traffic::{self, Outcome},
    CrossNode, Lab, LabSpec, PodSpec, Topology,
};

fn build(topology: Topology, cross_node: CrossNode) -> Lab {
    let lab = Lab::build(LabSpec {
        prefix: unique_prefix("t"),
        topology,
        cross_node,
        pods: default_pods(),
        ipv6: true,
        ipv4: true,
    })
    .expect("building the lab");
    for pod in lab.spec.pods.iter().filter(|p| p.name.starts_with("web")) {
        traffic::spawn_server(&lab.pod_ns(&pod.name), &pod.name).expect("server");
    }
    lab
}

/// TCP and UDP from `from` to each of `to`'s pod IPs (IPv4 and IPv6: the
/// labs here are dual-stack) answer with `to`'s name, from that address.
fn assert_reaches(lab: &Lab, from: &str, to: &PodSpec) {
    for ip in [IpAddr::from(to.ip()), to.ipv6().into()] {
        let tcp = SocketAddr::new(ip, traffic::TCP_PORT);
        let udp = SocketAddr::new(ip, traffic::UDP_PORT);
        let (t, u) = in_netns(&lab.pod_ns(from), move || {
            (traffic::tcp_request(tcp), traffic::udp_request(udp))
        })
        .unwrap();
        let want = |addr| Outcome::Answered {
            backend: to.name.clone(),
            from: addr,
        };
        assert_eq!(t, want(tcp), "TCP {from} -> {} {ip}", to.name);
        assert_eq!(u, want(udp), "UDP {from} -> {} {ip}", to.name);
    }
}

fn check(topology: Topology, cross_node: CrossNode) {
    let mut lab = build(topology, cross_node);
    for to in ["web-a", "web-b", "web-c"] {
        assert_reaches(&lab, "client", &lab.pod(to).clone());
    }
    // Back across the nodes, and between pods of the second node.
    assert_reaches(&lab, "web-c", &lab.pod("web-a").clone());
    assert_reaches(&lab, "web-b", &lab.pod("web-c").clone());

    // A pod added later is wired like the others.
    let late = PodSpec::new("late", 2, 20);
    lab.add_pod(&late).unwrap();
    traffic::spawn_server(&lab.pod_ns("late"), "late").unwrap();
    assert_reaches(&lab, "client", &late);

    // Dropping the lab removes every namespace it made.
    let prefix = lab.spec.prefix.clone();
    drop(lab);
    let left: Vec<_> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn bridge_direct() {
    require_root();
    check(Topology::Bridge, CrossNode::Direct);
}

#[test]
fn bridge_vxlan() {
    require_root();
    check(Topology::Bridge, CrossNode::Vxlan);
}

#[test]
fn routed_direct() {
    require_root();
    check(Topology::Routed, CrossNode::Direct);
}

#[test]
fn routed_vxlan() {
    require_root();
    check(Topology::Routed, CrossNode::Vxlan);
}

#[test]
fn vxlan_carries_the_cross_node_traffic() {
    require_root();
    let lab = build(Topology::Bridge, CrossNode::Vxlan);
    // Packets node1 sent on vxlan0 (/proc/thread-self: this thread's netns).
    let packets = |lab: &Lab| {
        in_netns(&lab.node_ns(1), || {
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            let (_, counters) = dev
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(name, _)| name.trim() == "vxlan0")
                .expect("vxlan0 in /proc/net/dev");
            counters
                .split_whitespace()
                .nth(9)
                .and_then(|n| n.parse::<u64>().ok())
                .expect("tx packets")
        })
        .unwrap()
    };
    let before = packets(&lab);
    assert_reaches(&lab, "client", &lab.pod("web-b").clone());
    assert!(packets(&lab) > before, "no packets sent on node1's vxlan0");
}

#[test]
fn a_pod_created_later_leaves_the_gateway_mac_alone() {
    require_root();
    let mut lab = build(Topology::Bridge, CrossNode::Direct);
    // Through the gateway: the client caches cbr0's MAC.
    assert_reaches(&lab, "client", &lab.pod("web-c").clone());
    assert_eq!(netns::mac(&lab.node_ns(1), "cbr0").unwrap(), bridge_mac(1));

    // A new veth with the lowest MAC there is joins node1's bridge.
    let late = PodSpec::new("late", 1, 20);
    lab.add_pod(&late).unwrap();
    netns::set_mac(
        &lab.node_ns(1),
        &Lab::host_iface(&late),
        "02:00:00:00:00:01",
    )
    .unwrap();

    assert_eq!(
        netns::mac(&lab.node_ns(1), "cbr0").unwrap(),
        bridge_mac(1),
        "cbr0 took a port's MAC"
    );
    assert_reaches(&lab, "client", &lab.pod("web-c").clone());
    traffic::spawn_server(&lab.pod_ns("late"), "late").unwrap();
    assert_reaches(&lab, "web-c", &late);
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    require_root();
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let lab = build(Topology::Bridge, CrossNode::Direct);
        *prefix.lock().unwrap() = lab.spec.prefix.clone();
        panic!("test failure with the lab up");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(!netns::list().iter().any(|n| n.starts_with(&prefix)));
}
