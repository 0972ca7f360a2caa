//! The same service behaviour on the other cluster network layouts: a VXLAN
//! overlay between nodes, and Calico-style routed /32 pods with proxy ARP.

use dataplane_lab::{CrossNode, Topology};
use integration_tests::{dns, http, lab_pod, require_root, web, Cluster, Seen, WEB_IP};

fn check_all_backends_and_reply_source(topology: Topology, cross_node: CrossNode) {
    let backends = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let c = Cluster::start(
        topology,
        cross_node,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    );
    let want: std::collections::BTreeSet<String> =
        ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("all three backends answer", || {
        c.tcp_backends("client", http(WEB_IP), 30) == want
    });
    match c.udp("client", dns(WEB_IP)) {
        Seen::Answered { from, .. } => assert_eq!(from, dns(WEB_IP)),
        other => panic!("UDP: {other:?}\n{}", c.logs()),
    }
    assert!(
        c.tcp("web-a", http(WEB_IP)).backend().is_some(),
        "from a backend pod\n{}",
        c.logs()
    );
}

#[test]
fn bridge_pods_across_a_vxlan_overlay() {
    require_root();
    check_all_backends_and_reply_source(Topology::Bridge, CrossNode::Vxlan);
}

#[test]
fn routed_pods_with_proxy_arp_across_direct_routes() {
    require_root();
    check_all_backends_and_reply_source(Topology::Routed, CrossNode::Direct);
}

#[test]
fn routed_pods_hairpin_through_the_service() {
    require_root();
    let c = Cluster::start(
        Topology::Routed,
        CrossNode::Direct,
        &[("web.yaml", web(&[&lab_pod("web-b")]))],
    );
    assert_eq!(
        c.tcp("web-b", http(WEB_IP)).backend(),
        Some("web-b"),
        "{}",
        c.logs()
    );
}
