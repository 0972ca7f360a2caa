//! ClusterIP over IPv6, and dual-stack services, on a dual-stack lab: pods
//! have an address of each family (see `LabSpec::ipv6`), services a cluster
//! IP and an EndpointSlice per family they list.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use dataplane_lab::{
    manifests::{self, pod_endpoint_of},
    CrossNode, PodSpec, Topology,
};
use integration_tests::{lab_pod, require_root, Cluster, Seen, WEB_IP};

/// The web service's IPv6 cluster IP.
const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

fn http6() -> SocketAddr {
    SocketAddr::new(WEB_IP6.into(), 80)
}

fn dns6() -> SocketAddr {
    SocketAddr::new(WEB_IP6.into(), 53)
}

/// The `web` service with `cluster_ips` (its families, the primary first)
/// backed by `backends` in each family's EndpointSlice.
fn web_of(cluster_ips: &[IpAddr], backends: &[PodSpec]) -> String {
    let service = manifests::with_cluster_ips(manifests::web_service("web", WEB_IP), cluster_ips);
    manifests::manifest_per_family(&service, |family| {
        backends
            .iter()
            .map(|p| pod_endpoint_of(p, family))
            .collect()
    })
}

/// web-a is on the client's node, web-b and web-c on the other.
fn all_web() -> Vec<PodSpec> {
    ["web-a", "web-b", "web-c"].map(lab_pod).to_vec()
}

fn cluster(cross_node: CrossNode, manifest: String) -> Cluster {
    Cluster::start_dual(Topology::Bridge, cross_node, &[("web.yaml", manifest)])
}

fn backends_seen(c: &Cluster, to: SocketAddr, udp: bool) -> BTreeSet<String> {
    (0..30)
        .filter_map(|_| {
            let seen = if udp {
                c.udp("client", to)
            } else {
                c.tcp("client", to)
            };
            seen.backend().map(str::to_owned)
        })
        .collect()
}

/// "should function for pod-Service: http / udp", over IPv6: an IPv6-only
/// service reaches its backends on the client's node and on the other,
/// over TCP and UDP, and the replies come from the service address.
fn pod_service_over_ipv6(cross_node: CrossNode) {
    let c = cluster(cross_node, web_of(&[WEB_IP6.into()], &all_web()));
    let want: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("all three backends answer TCP over IPv6", || {
        backends_seen(&c, http6(), false) == want
    });
    assert_eq!(backends_seen(&c, dns6(), true), want, "UDP\n{}", c.logs());
    for _ in 0..3 {
        match c.tcp("client", http6()) {
            Seen::Answered { from, .. } => assert_eq!(from, http6(), "TCP reply source"),
            other => panic!("TCP: {other:?}\n{}", c.logs()),
        }
        match c.udp("client", dns6()) {
            Seen::Answered { from, .. } => assert_eq!(from, dns6(), "UDP reply source"),
            other => panic!("UDP: {other:?}\n{}", c.logs()),
        }
    }
}

#[test]
fn pod_service_http_and_udp_over_ipv6_reach_same_node_and_cross_node_backends() {
    require_root();
    pod_service_over_ipv6(CrossNode::Direct);
}

#[test]
fn pod_service_http_and_udp_over_ipv6_across_the_vxlan_overlay() {
    require_root();
    pod_service_over_ipv6(CrossNode::Vxlan);
}

/// A dual-stack service answers on both of its cluster IPs, each family
/// reaching the same pods (through that family's EndpointSlice).
#[test]
fn dual_stack_service_answers_on_both_addresses_with_the_same_backends() {
    require_root();
    let ips = [IpAddr::from(WEB_IP), WEB_IP6.into()];
    let c = cluster(CrossNode::Direct, web_of(&ips, &all_web()));
    let want: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    for ip in ips {
        let to = SocketAddr::new(ip, 80);
        c.eventually(&format!("all three backends answer on {to}"), || {
            backends_seen(&c, to, false) == want
        });
        assert_eq!(
            backends_seen(&c, SocketAddr::new(ip, 53), true),
            want,
            "UDP on {ip}\n{}",
            c.logs()
        );
    }
}

/// "should preserve source pod IP for traffic thru service cluster IP",
/// over IPv6: the backend sees the client pod's IPv6 address.
#[test]
fn backend_sees_the_client_pods_ipv6_address() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &all_web()));
    let client = IpAddr::from(lab_pod("client").ipv6());
    for _ in 0..5 {
        let seen = c
            .in_pod("client", || dataplane_lab::traffic::tcp_seen(http6()))
            .unwrap_or_else(|o| panic!("{o:?}\n{}", c.logs()));
        assert_eq!(seen.client.ip(), client, "{seen:?}");
        assert_eq!(seen.from, http6());
    }
}

/// "should be rejected when no endpoints exist", over IPv6: a TCP RST and
/// an ICMPv6 port unreachable at once, never a timeout.
#[test]
fn ipv6_service_without_endpoints_is_rejected_at_once() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &[]));
    // The agents program the service (with no endpoints) shortly after
    // they are healthy.
    c.eventually("the IPv6 service refuses TCP", || {
        c.tcp("client", http6()) == Seen::Refused
    });
    for _ in 0..3 {
        assert_eq!(c.tcp("client", http6()), Seen::Refused, "{}", c.logs());
        assert_eq!(c.udp("client", dns6()), Seen::Refused, "{}", c.logs());
    }
}

/// What the agents write for a dual-stack service, as `inspect services`
/// reads it back from each node's maps: one frontend per family and port,
/// each with that family's endpoints.
#[test]
fn dual_stack_service_is_programmed_in_each_familys_maps() {
    require_root();
    let ips = [IpAddr::from(WEB_IP6), WEB_IP.into()];
    let backends = [lab_pod("web-a"), lab_pod("web-b")];
    let c = cluster(CrossNode::Direct, web_of(&ips, &backends));
    let expected: std::collections::BTreeMap<String, Vec<String>> = [
        (
            "default/web:http [fd00:10:96::10]:80/TCP",
            ["[fd00:10:244:1::11]:8080", "[fd00:10:244:2::10]:8080"],
        ),
        (
            "default/web:dns [fd00:10:96::10]:53/UDP",
            ["[fd00:10:244:1::11]:5353", "[fd00:10:244:2::10]:5353"],
        ),
        (
            "default/web:http 10.96.0.10:80/TCP",
            ["10.244.1.11:8080", "10.244.2.10:8080"],
        ),
        (
            "default/web:dns 10.96.0.10:53/UDP",
            ["10.244.1.11:5353", "10.244.2.10:5353"],
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.map(str::to_owned).to_vec()))
    .collect();
    c.eventually_programmed(&expected);
}
