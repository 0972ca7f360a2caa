//! The same service behaviour on the other cluster network layouts: a VXLAN
//! overlay between nodes, and Calico-style routed /32 pods with proxy ARP;
//! `--direct-redirect` on both, IPv4 and IPv6.

use std::net::IpAddr;

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

/// Packets node 1's stack forwarded to `to` port 8080, counted by the
/// nftables rule [`count_forwarding_to`] put on its forward hook.
fn forwarded_to(c: &Cluster, to: IpAddr) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.lab.node_ns(1), "nft", "list", "table"])
        .args([nft_family(to), "dptfwd"])
        .output()
        .expect("nft");
    assert!(out.status.success(), "nft list: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text}"))
}

/// Counts what node 1 forwards to `to` port 8080 ([`forwarded_to`]), in a
/// table of `to`'s family.
fn count_forwarding_to(c: &Cluster, to: IpAddr) {
    let family = nft_family(to);
    let rules = format!(
        "table {family} dptfwd {{ chain counted {{ type filter hook forward priority 0; \
         {family} daddr {to} tcp dport 8080 counter; }}; }}"
    );
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &c.lab.node_ns(1), "nft", &rules])
        .status()
        .expect("nft");
    assert!(status.success(), "nft add");
}

/// nftables' family (and address expression) of `addr`.
fn nft_family(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// `web-a`'s address.
fn web_a() -> IpAddr {
    lab_pod("web-a").ip().into()
}

#[test]
fn a_same_node_backend_gets_service_packets_without_the_nodes_forwarding_path() {
    require_root();
    // The tc path: with the socket hooks a client connects to the pod
    // address itself.
    let mut c = Cluster::start_with_agent_args(
        Topology::Routed,
        CrossNode::Direct,
        &[("web.yaml", web(&[&lab_pod("web-a")]))],
        &["--socket-lb", "false", "--direct-redirect", "true"],
    );
    count_forwarding_to(&c, web_a());
    // The first packet finds no neighbour entry for the pod yet: the stack
    // forwards it and resolves one.
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    let resolving = forwarded_to(&c, web_a());
    for _ in 0..3 {
        assert_eq!(
            c.tcp("client", http(WEB_IP)).backend(),
            Some("web-a"),
            "{}",
            c.logs()
        );
    }
    assert_eq!(
        forwarded_to(&c, web_a()),
        resolving,
        "redirected straight to the pod, never forwarded by the node's stack"
    );
    assert!(c.counter(1, "redirected") > 0, "{}", c.logs());

    // The same connections through the stack (the default), for contrast:
    // the rule sees them.
    c.stop_agents();
    c.set_agent_args(&["--socket-lb", "false", "--direct-redirect", "false"]);
    c.restart_agents();
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    assert!(
        forwarded_to(&c, web_a()) > 0,
        "--direct-redirect false: the node forwards"
    );
}

// ---------------------------------------------------------------------------
// `--direct-redirect` on IPv6, on both pod networks, same node and across.

/// The IPv6-only web service's cluster IP.
const WEB_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The IPv6-only `web` service backed by `backend` alone.
fn web6(backend: &str) -> String {
    use dataplane_lab::manifests;
    let service = manifests::with_cluster_ips(
        manifests::web_service("web", WEB_IP),
        &[IpAddr::V6(WEB_IP6)],
    );
    manifests::manifest_per_family(&service, |family| {
        vec![manifests::pod_endpoint_of(&lab_pod(backend), family)]
    })
}

/// The client (node 1) reaches `backend` through the IPv6 service without
/// node 1's forwarding path once a neighbour entry exists, and through it
/// with `--direct-redirect false`.
fn check_direct_redirect6(topology: Topology, cross_node: CrossNode, backend: &str) {
    let to = std::net::SocketAddr::new(WEB_IP6.into(), 80);
    let mut c = Cluster::start_dual_with(
        topology,
        cross_node,
        &[("web.yaml", web6(backend))],
        &["--socket-lb", "false", "--direct-redirect", "true"],
        |_| {},
    );
    let backend_ip = IpAddr::V6(lab_pod(backend).ipv6());
    count_forwarding_to(&c, backend_ip);
    // The first packets may find no neighbour entry yet: the stack
    // forwards them and resolves one.
    assert_eq!(c.tcp("client", to).backend(), Some(backend), "{}", c.logs());
    let resolving = forwarded_to(&c, backend_ip);
    for _ in 0..3 {
        assert_eq!(c.tcp("client", to).backend(), Some(backend), "{}", c.logs());
    }
    assert_eq!(
        forwarded_to(&c, backend_ip),
        resolving,
        "sent straight on, never forwarded by node 1's stack"
    );
    assert!(c.counter(1, "redirected") > 0, "{}", c.logs());

    // The same connections through the stack, for contrast: the rule sees
    // them.
    c.stop_agents();
    c.set_agent_args(&["--socket-lb", "false", "--direct-redirect", "false"]);
    c.restart_agents();
    assert_eq!(c.tcp("client", to).backend(), Some(backend), "{}", c.logs());
    assert!(
        forwarded_to(&c, backend_ip) > resolving,
        "--direct-redirect false: the node forwards"
    );
}

#[test]
fn ipv6_bridge_same_node_backend_gets_service_packets_without_the_nodes_forwarding_path() {
    require_root();
    check_direct_redirect6(Topology::Bridge, CrossNode::Direct, "web-a");
}

#[test]
fn ipv6_bridge_cross_node_backend_gets_service_packets_without_the_nodes_forwarding_path() {
    require_root();
    check_direct_redirect6(Topology::Bridge, CrossNode::Vxlan, "web-b");
}

#[test]
fn ipv6_routed_same_node_backend_gets_service_packets_without_the_nodes_forwarding_path() {
    require_root();
    check_direct_redirect6(Topology::Routed, CrossNode::Direct, "web-a");
}

#[test]
fn ipv6_routed_cross_node_backend_gets_service_packets_without_the_nodes_forwarding_path() {
    require_root();
    check_direct_redirect6(Topology::Routed, CrossNode::Direct, "web-b");
}
