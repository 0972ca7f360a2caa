//! Traffic from outside the cluster over IPv6: an IPv6 client beyond the
//! lab's router reaches a NodePort on each node's IPv6 address (dual-stack
//! lab, `LabSpec::ipv6`). The agents run their default external datapath
//! (XDP), which hands IPv6 to the tc program behind it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use dataplane_lab::{
    manifests::{self, pod_endpoint_of, Exposure},
    topology::{node_ip6, OUTSIDE_CLIENT_IP6},
    CrossNode, Topology,
};
use integration_tests::{lab_pod, require_root, Cluster, WEB_IP};

const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
/// The web service's IPv6 cluster IP.
const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The dual-stack `web` NodePort service (policy Cluster) on web-a (node
/// 1), web-b and web-c (node 2).
fn web_node_port() -> String {
    let service = manifests::exposed(
        manifests::with_cluster_ips(
            manifests::web_service("web", WEB_IP),
            &[WEB_IP.into(), WEB_IP6.into()],
        ),
        &Exposure {
            type_: Some("NodePort"),
            node_ports: vec![NODE_PORT_HTTP, NODE_PORT_DNS],
            ..Default::default()
        },
    );
    manifests::manifest_per_family(&service, |family| {
        ["web-a", "web-b", "web-c"]
            .iter()
            .map(|p| pod_endpoint_of(&lab_pod(p), family))
            .collect()
    })
}

/// (backend, address it saw the client as) over `n` connections to `to`.
fn seen_from_outside(c: &Cluster, to: SocketAddr, n: usize) -> BTreeSet<(String, IpAddr)> {
    (0..n)
        .filter_map(|_| c.outside_tcp(to).ok())
        .map(|s| (s.backend, s.client.ip()))
        .collect()
}

/// "should be able to create a functioning NodePort service", over IPv6:
/// the NodePort on each node's IPv6 address reaches the backends of both
/// nodes; local ones see the outside client, remote ones the node that
/// accepted the connection (SNAT to its IPv6 address, policy Cluster).
#[test]
fn should_be_able_to_create_a_functioning_nodeport_service_over_ipv6() {
    require_root();
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web_node_port())],
    );
    let client = IpAddr::V6(OUTSIDE_CLIENT_IP6);
    for node in [1u8, 2] {
        let addr = node_ip6(node);
        let want: BTreeSet<(String, IpAddr)> = ["web-a", "web-b", "web-c"]
            .iter()
            .map(|b| {
                let local = lab_pod(b).node == node;
                (b.to_string(), if local { client } else { IpAddr::V6(addr) })
            })
            .collect();
        c.eventually(
            &format!("IPv6 NodePort on node{node} reaches all backends"),
            || seen_from_outside(&c, SocketAddr::new(addr.into(), NODE_PORT_HTTP), 30) == want,
        );
        let answer = c
            .outside_tcp(SocketAddr::new(addr.into(), NODE_PORT_HTTP))
            .expect("an answer");
        assert_eq!(
            answer.from,
            SocketAddr::new(addr.into(), NODE_PORT_HTTP),
            "the answer comes from the NodePort"
        );
    }
    assert!(
        c.agent_log(1).contains("XDP serves IPv4 only"),
        "{}",
        c.agent_log(1)
    );
}
