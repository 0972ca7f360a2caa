//! ClusterIP routing on the talk's topology: bridges, direct routes.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use dataplane_lab::{
    manifests::{self, Port},
    traffic, CrossNode, Topology,
};
use integration_tests::{dns, http, lab_pod, multiport, require_root, web, Cluster, Seen, WEB_IP};
use k8s_openapi::{
    api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig},
    apimachinery::pkg::util::intstr::IntOrString,
};

fn web_on_both_nodes() -> Cluster {
    let backends = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    )
}

/// Networking Granular Checks: "should function for pod-Service: http" and
/// "…: udp": a pod client reaches every endpoint, on both nodes, over both.
#[test]
fn should_function_for_pod_service_http_and_udp() {
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

/// Upstream: "should be rejected when no endpoints exist".
#[test]
fn should_be_rejected_when_no_endpoints_exist() {
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
fn should_be_rejected_when_no_endpoints_exist_with_tx_checksum_offload_on_and_off() {
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

/// Upstream: "should allow pods to hairpin back to themselves through
/// services": the only endpoint reaches itself through its service.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
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

const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const THIRD_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

/// Upstream: "should be able to up and down services": a service deleted
/// stops answering while the others keep theirs, and one created later
/// answers.
#[test]
fn should_be_able_to_up_and_down_services() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[
            ("web.yaml", web(&[&a])),
            (
                "other.yaml",
                manifests::web_manifest("other", OTHER_IP, &[&b]),
            ),
        ],
    );
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    assert_eq!(c.tcp("client", http(OTHER_IP)).backend(), Some("web-b"));
    c.remove_manifest("web.yaml");
    c.eventually("the deleted service no longer answers", || {
        c.tcp("client", http(WEB_IP)).backend().is_none()
            && c.udp("client", dns(WEB_IP)).backend().is_none()
    });
    assert_eq!(
        c.tcp("client", http(OTHER_IP)).backend(),
        Some("web-b"),
        "the service left up\n{}",
        c.logs()
    );
    c.write_manifest(
        "third.yaml",
        &manifests::web_manifest("third", THIRD_IP, &[&a]),
    );
    c.eventually("the service brought up later answers", || {
        c.tcp("client", http(THIRD_IP)).backend() == Some("web-a")
    });
    assert_eq!(c.udp("client", dns(THIRD_IP)).backend(), Some("web-a"));
    assert!(c.tcp("client", http(WEB_IP)).backend().is_none());
}

/// Upstream: "should work after the service has been recreated": deleted,
/// then created again on the same IP with another endpoint, it reaches the
/// new endpoint only (nothing left of the old service).
#[test]
fn should_work_after_the_service_has_been_recreated() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&a]))],
    );
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    c.remove_manifest("web.yaml");
    c.eventually("the deleted service no longer answers", || {
        c.tcp("client", http(WEB_IP)).backend().is_none()
    });
    c.write_manifest("web.yaml", &web(&[&b]));
    c.eventually("the recreated service answers", || {
        c.tcp("client", http(WEB_IP)).backend().is_some()
    });
    let want: BTreeSet<String> = ["web-b".to_owned()].into();
    assert_eq!(
        c.tcp_backends("client", http(WEB_IP), 10),
        want,
        "{}",
        c.logs()
    );
    let udp: BTreeSet<String> = (0..10)
        .filter_map(|_| c.udp("client", dns(WEB_IP)).backend().map(str::to_owned))
        .collect();
    assert_eq!(udp, want, "{}", c.logs());
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

/// Upstream: "should have session affinity work for service with type
/// clusterIP".
#[test]
fn should_have_session_affinity_work_for_service_with_type_clusterip() {
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

fn names<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

/// The backends `n` new UDP sockets of `from_pod` reached.
fn udp_backends(c: &Cluster, from_pod: &str, to: SocketAddr, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| c.udp(from_pod, to).backend().map(str::to_owned))
        .collect()
}

/// Upstream: "should serve multiport endpoints from pods": see
/// [`multiport`].
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("multi.yaml", multiport::manifest(WEB_IP.into()))],
    );
    multiport::serve_and_check(&c, WEB_IP.into());
}

/// Upstream: "should serve endpoints on same port and different protocols":
/// TCP 80 and UDP 80 are two frontends of one service.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    require_root();
    let tcp = Port {
        name: "tcp",
        protocol: "TCP",
        port: 80,
        target_port: traffic::TCP_PORT,
    };
    let udp = Port {
        name: "udp",
        protocol: "UDP",
        port: 80,
        target_port: traffic::UDP_PORT,
    };
    let service = manifests::service("default", "web", WEB_IP, &[tcp, udp]);
    let backends = ["web-a", "web-b"];
    let endpoints = backends
        .iter()
        .map(|p| manifests::pod_endpoint(&lab_pod(p)))
        .collect();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifests::manifest(&service, endpoints))],
    );
    let to = http(WEB_IP);
    c.eventually("TCP 80 reaches both endpoints", || {
        c.tcp_backends("client", to, 20) == names(backends)
    });
    c.eventually("UDP 80 reaches both endpoints", || {
        udp_backends(&c, "client", to, 20) == names(backends)
    });
}

/// Upstream: "should be updated after adding or deleting ports": a port
/// added starts answering, a port removed stops.
#[test]
fn should_be_updated_after_adding_or_deleting_ports() {
    require_root();
    let a = lab_pod("web-a");
    let with_ports = |ports: &[Port]| {
        manifests::manifest(
            &manifests::service("default", "web", WEB_IP, ports),
            vec![manifests::pod_endpoint(&a)],
        )
    };
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", with_ports(&[manifests::HTTP]))],
    );
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    assert_eq!(
        c.udp("client", dns(WEB_IP)).backend(),
        None,
        "no dns port yet"
    );

    c.write_manifest("web.yaml", &with_ports(&[manifests::HTTP, manifests::DNS]));
    c.eventually("the added dns port answers", || {
        c.udp("client", dns(WEB_IP)).backend() == Some("web-a")
    });
    assert_eq!(c.tcp("client", http(WEB_IP)).backend(), Some("web-a"));

    c.write_manifest("web.yaml", &with_ports(&[manifests::DNS]));
    c.eventually("the deleted http port no longer answers", || {
        c.tcp("client", http(WEB_IP)).backend().is_none()
    });
    assert_eq!(
        c.udp("client", dns(WEB_IP)).backend(),
        Some("web-a"),
        "the port kept\n{}",
        c.logs()
    );
}

/// Upstream: "should preserve source pod IP for traffic thru service
/// cluster IP": each endpoint, on this node and the other, sees the client
/// pod's own address (no SNAT between pods), over TCP and UDP.
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    require_root();
    let c = web_on_both_nodes();
    integration_tests::assert_endpoints_see_the_client(
        &c,
        IpAddr::V4(lab_pod("client").ip()),
        &["web-a", "web-b", "web-c"],
        http(WEB_IP),
        dns(WEB_IP),
    );
}

/// Networking Granular Checks: "should function for endpoint-Service: http"
/// and "…: udp": an endpoint pod reaches every endpoint of its own service,
/// itself included, and the answers come from the service.
#[test]
fn should_function_for_endpoint_service_http_and_udp() {
    require_root();
    let c = web_on_both_nodes();
    let all = names(["web-a", "web-b", "web-c"]);
    c.eventually("web-a reaches every endpoint over TCP", || {
        c.tcp_backends("web-a", http(WEB_IP), 30) == all
    });
    c.eventually("web-a reaches every endpoint over UDP", || {
        udp_backends(&c, "web-a", dns(WEB_IP), 30) == all
    });
    for _ in 0..5 {
        match c.tcp("web-a", http(WEB_IP)) {
            Seen::Answered { from, .. } => assert_eq!(from, http(WEB_IP)),
            other => panic!("TCP: {other:?}\n{}", c.logs()),
        }
        match c.udp("web-a", dns(WEB_IP)) {
            Seen::Answered { from, .. } => assert_eq!(from, dns(WEB_IP)),
            other => panic!("UDP: {other:?}\n{}", c.logs()),
        }
    }
}

/// Upstream: "should be rejected for evicted pods (no endpoints exist)":
/// once the only endpoint's pod is evicted (listed not ready, then gone
/// from the slice), clients are refused at once, not left to time out.
#[test]
fn should_be_rejected_for_evicted_pods() {
    require_root();
    let a = lab_pod("web-a");
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&a]))],
    );
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    let evicted = manifests::manifest(
        &manifests::web_service("web", WEB_IP),
        vec![manifests::endpoint(
            a.ip(),
            Some("node1"),
            manifests::State::NotReady,
        )],
    );
    for (stage, manifest) in [("listed not ready", evicted), ("removed", web(&[]))] {
        c.write_manifest("web.yaml", &manifest);
        c.eventually(&format!("{stage}: TCP refused"), || {
            c.tcp("client", http(WEB_IP)) == Seen::Refused
        });
        for _ in 0..3 {
            assert_eq!(c.tcp("client", http(WEB_IP)), Seen::Refused, "{stage}");
            assert_eq!(c.udp("client", dns(WEB_IP)), Seen::Refused, "{stage}");
        }
    }
}

/// `web` with ClientIP affinity (`timeout` seconds, if given).
fn with_affinity(spec: &mut ServiceSpec, timeout: Option<i32>) {
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(t),
        }),
    });
}

/// Upstream: "should have session affinity timeout work for service with
/// type clusterIP": the client sticks to one endpoint while it keeps
/// coming back, and is balanced again once it stayed away longer than
/// `timeoutSeconds`.
#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_clusterip() {
    require_root();
    let c = web_cluster_with(
        |spec| with_affinity(spec, Some(2)),
        &["web-a", "web-b", "web-c"],
    );
    let sticky = c.tcp_backends("client", http(WEB_IP), 12);
    assert_eq!(
        sticky.len(),
        1,
        "within the timeout: {sticky:?}\n{}",
        c.logs()
    );
    // One connection after each pause longer than the timeout: without
    // expiry all ten land on the same endpoint; with it, all ten do so with
    // probability 3^-9.
    let after_pauses: BTreeSet<String> = (0..10)
        .filter_map(|_| {
            std::thread::sleep(Duration::from_secs(3));
            c.tcp("client", http(WEB_IP)).backend().map(str::to_owned)
        })
        .collect();
    assert!(
        after_pauses.len() > 1,
        "affinity outlived its timeout: {after_pauses:?}\n{}",
        c.logs()
    );
}

/// Networking Granular Checks: "should function for client IP based
/// session affinity: http" and "…: udp": every new connection and every new
/// UDP socket of one client reaches the same endpoint.
#[test]
fn should_function_for_client_ip_based_session_affinity_http_and_udp() {
    require_root();
    let c = web_cluster_with(
        |spec| with_affinity(spec, None),
        &["web-a", "web-b", "web-c"],
    );
    // Without affinity, 12 over 3 endpoints all land on one with
    // probability 3^-11.
    let tcp = c.tcp_backends("client", http(WEB_IP), 12);
    assert_eq!(tcp.len(), 1, "TCP reached {tcp:?}\n{}", c.logs());
    let udp = udp_backends(&c, "client", dns(WEB_IP), 12);
    assert_eq!(udp.len(), 1, "UDP reached {udp:?}\n{}", c.logs());
}
