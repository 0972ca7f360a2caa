//! ClusterIP routing on the talk's topology: bridges, direct routes.

use dataplane_lab::{manifests, CrossNode, Topology};
use integration_tests::{dns, http, lab_pod, require_root, web, Cluster, Seen, WEB_IP};
use k8s_openapi::{api::core::v1::ServiceSpec, apimachinery::pkg::util::intstr::IntOrString};

fn web_on_both_nodes() -> Cluster {
    let backends = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    )
}

#[test]
fn every_backend_on_both_nodes_is_reached_over_tcp_and_udp() {
    require_root();
    let c = web_on_both_nodes();
    let want: std::collections::BTreeSet<String> =
        ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("all three backends answer TCP", || {
        c.tcp_backends("client", http(WEB_IP), 30) == want
    });
    let mut udp = std::collections::BTreeSet::new();
    for _ in 0..30 {
        if let Some(b) = c.udp("client", dns(WEB_IP)).backend() {
            udp.insert(b.to_owned());
        }
    }
    assert_eq!(udp, want, "{}", c.logs());
}

/// "should function for pod-Service: udp" with a datagram larger than the
/// MTU: the client's stack sends it in fragments, and only the first one
/// carries the UDP header. Every fragment must reach the backend the first
/// one went to, or the backend cannot reassemble it and never answers.
#[test]
fn udp_datagram_larger_than_the_mtu_reaches_a_backend_through_the_service() {
    require_root();
    let c = web_on_both_nodes();
    for size in [1_400usize, 4_000, 9_000] {
        let to = dns(WEB_IP);
        let seen = c.in_pod("client", move || {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
            socket.send(&vec![7u8; size])?;
            let mut buf = [0u8; 256];
            let (n, from) = socket.recv_from(&mut buf)?;
            std::io::Result::Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
        });
        let (backend, from) = seen.unwrap_or_else(|e| panic!("{size} bytes: {e}\n{}", c.logs()));
        assert!(
            backend.starts_with("web-"),
            "{size} bytes: answered by {backend}"
        );
        assert_eq!(from, to, "{size} bytes: the answer comes from the service");
    }
}

#[test]
fn replies_come_from_the_service_ip_and_port() {
    require_root();
    let c = web_on_both_nodes();
    for _ in 0..5 {
        match c.tcp("client", http(WEB_IP)) {
            Seen::Answered { from, .. } => assert_eq!(from, http(WEB_IP)),
            other => panic!("TCP: {other:?}\n{}", c.logs()),
        }
        match c.udp("client", dns(WEB_IP)) {
            Seen::Answered { from, .. } => assert_eq!(from, dns(WEB_IP), "UDP reply source"),
            other => panic!("UDP: {other:?}\n{}", c.logs()),
        }
    }
}

#[test]
fn one_connection_sticks_to_one_backend() {
    require_root();
    let c = web_on_both_nodes();
    let answers = c.in_pod("client", || {
        let mut conn = dataplane_lab::traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        (0..20).map(|_| conn.request()).collect::<Vec<_>>()
    });
    let first = answers[0]
        .backend()
        .unwrap_or_else(|| panic!("{:?}\n{}", answers[0], c.logs()))
        .to_owned();
    assert!(
        answers.iter().all(|a| a.backend() == Some(first.as_str())),
        "{answers:?}"
    );
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[]))],
    );
    // Refused (RST, ICMP port unreachable), not Timeout: nothing is dropped.
    for _ in 0..3 {
        assert_eq!(c.tcp("client", http(WEB_IP)), Seen::Refused, "{}", c.logs());
        assert_eq!(c.udp("client", dns(WEB_IP)), Seen::Refused, "{}", c.logs());
    }
}

/// "should be rejected when no endpoints exist", whatever the host-side
/// veth's tx checksum offload: the client's packets arrive CHECKSUM_PARTIAL
/// (its socket leaves the checksum to the device), the RST and the ICMP
/// port unreachable are built in their place, and with offload off the
/// host veth computes the checksum where the client's packet had it.
#[test]
fn rejected_when_no_endpoints_exist_with_tx_checksum_offload_on_and_off() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[]))],
    );
    let client = c.pod("client");
    let host_veth = dataplane_lab::Lab::host_iface(&client);
    for tx in ["off", "on"] {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &c.lab.node_ns(client.node)])
            .args(["ethtool", "-K", &host_veth, "tx", tx])
            .status()
            .expect("running ethtool");
        assert!(status.success(), "ethtool -K {host_veth} tx {tx}");
        for _ in 0..3 {
            assert_eq!(
                c.tcp("client", http(WEB_IP)),
                Seen::Refused,
                "TCP with tx offload {tx}\n{}",
                c.logs()
            );
            assert_eq!(
                c.udp("client", dns(WEB_IP)),
                Seen::Refused,
                "UDP with tx offload {tx}\n{}",
                c.logs()
            );
        }
    }
}

#[test]
fn pod_reaching_itself_through_the_service_gets_its_answer() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&lab_pod("web-a")]))],
    );
    for _ in 0..3 {
        match c.tcp("web-a", http(WEB_IP)) {
            Seen::Answered { backend, from } => {
                assert_eq!(backend, "web-a");
                assert_eq!(from, http(WEB_IP));
            }
            other => panic!("hairpin TCP: {other:?}\n{}", c.logs()),
        }
        assert_eq!(
            c.udp("web-a", dns(WEB_IP)).backend(),
            Some("web-a"),
            "hairpin UDP\n{}",
            c.logs()
        );
    }
}

#[test]
fn deleted_service_stops_answering() {
    require_root();
    let c = web_on_both_nodes();
    assert!(
        c.tcp("client", http(WEB_IP)).backend().is_some(),
        "{}",
        c.logs()
    );
    c.remove_manifest("web.yaml");
    c.eventually("the deleted service no longer answers", || {
        c.tcp("client", http(WEB_IP)).backend().is_none()
    });
}

/// Both agents serving `web`, backed by `backends`, with its spec adjusted
/// (e.g. session affinity, traffic policy).
fn web_cluster_with(configure: impl FnOnce(&mut ServiceSpec), backends: &[&str]) -> Cluster {
    let mut service = manifests::web_service("web", WEB_IP);
    configure(service.spec.as_mut().expect("a spec"));
    let endpoints = backends
        .iter()
        .map(|pod| manifests::pod_endpoint(&lab_pod(pod)))
        .collect();
    Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifests::manifest(&service, endpoints))],
    )
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend() {
    require_root();
    let c = web_cluster_with(
        |spec| spec.session_affinity = Some("ClientIP".into()),
        &["web-a", "web-b", "web-c"],
    );
    // Without affinity, 12 connections over 3 backends would all land on
    // one with probability 3^-11.
    let seen = c.tcp_backends("client", http(WEB_IP), 12);
    assert_eq!(seen.len(), 1, "client reached {seen:?}\n{}", c.logs());
}

#[test]
fn local_traffic_policy_serves_from_this_node_and_drops_where_it_has_none() {
    require_root();
    // Both endpoints on node2.
    let c = web_cluster_with(
        |spec| spec.internal_traffic_policy = Some("Local".into()),
        &["web-b", "web-c"],
    );
    // node2's pods reach their node's endpoints.
    let from_node2 = c.tcp_backends("web-b", http(WEB_IP), 6);
    assert!(
        !from_node2.is_empty() && from_node2.iter().all(|b| b == "web-b" || b == "web-c"),
        "from node2: {from_node2:?}\n{}",
        c.logs()
    );
    // node1 has none: dropped as kube-proxy drops it (a timeout, not a
    // refusal: the service does have endpoints, elsewhere).
    assert_eq!(c.tcp("client", http(WEB_IP)), Seen::Timeout, "{}", c.logs());
}

#[test]
fn udp_to_a_backend_port_nobody_listens_on_is_refused_through_the_service() {
    require_root();
    // The backends listen on UDP 5353; the service targets 5999.
    let c = web_cluster_with(
        |spec| {
            let dns = spec.ports.iter_mut().flatten().find(|p| p.port == 53);
            dns.expect("a dns port").target_port = Some(IntOrString::Int(5999));
        },
        &["web-a", "web-b"],
    );
    // The backend's ICMP port unreachable quotes the backend's address; it is
    // made about the service, so the client's socket sees it: refused, on
    // the same node and across nodes, rather than a timeout.
    for _ in 0..4 {
        assert_eq!(c.udp("client", dns(WEB_IP)), Seen::Refused, "{}", c.logs());
    }
}
