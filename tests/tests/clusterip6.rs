//! ClusterIP over IPv6, and dual-stack services, on a dual-stack lab: pods
//! have an address of each family (see `LabSpec::ipv6`), services a cluster
//! IP and an EndpointSlice per family they list.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use dataplane_lab::{
    manifests::{self, pod_endpoint_of},
    CrossNode, PodSpec, Topology,
};
use integration_tests::{lab_pod, require_root, Cluster, Seen, WEB_IP};
use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
use k8s_openapi::{api::core::v1::ServiceSpec, apimachinery::pkg::util::intstr::IntOrString};

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

/// The IPv6-only `web` service with its spec adjusted (e.g. session
/// affinity, traffic policy), backed by `backends`.
fn web6_with(configure: impl FnOnce(&mut ServiceSpec), backends: &[&str]) -> String {
    service6("web", WEB_IP6, configure, backends)
}

/// The IPv6-only service `name` with the web ports on `ip`, its spec
/// adjusted by `configure`, backed by `backends`.
fn service6(
    name: &str,
    ip: Ipv6Addr,
    configure: impl FnOnce(&mut ServiceSpec),
    backends: &[&str],
) -> String {
    let mut service =
        manifests::with_cluster_ips(manifests::web_service(name, WEB_IP), &[ip.into()]);
    configure(service.spec.as_mut().expect("a spec"));
    manifests::manifest_per_family(&service, |family| {
        backends
            .iter()
            .map(|p| pod_endpoint_of(&lab_pod(p), family))
            .collect()
    })
}

fn cluster(cross_node: CrossNode, manifest: String) -> Cluster {
    Cluster::start_dual(Topology::Bridge, cross_node, &[("web.yaml", manifest)])
}

fn backends_seen(c: &Cluster, to: SocketAddr, udp: bool) -> BTreeSet<String> {
    backends_seen_from(c, "client", to, udp)
}

/// The backends 30 new connections (or UDP sockets) of `pod` reached.
fn backends_seen_from(c: &Cluster, pod: &str, to: SocketAddr, udp: bool) -> BTreeSet<String> {
    (0..30)
        .filter_map(|_| {
            let seen = if udp { c.udp(pod, to) } else { c.tcp(pod, to) };
            seen.backend().map(str::to_owned)
        })
        .collect()
}

/// `pod`'s TCP and UDP answers through the IPv6 service come from the
/// service's address and ports.
fn answers_come_from_the_service(c: &Cluster, pod: &str) {
    for _ in 0..3 {
        match c.tcp(pod, http6()) {
            Seen::Answered { from, .. } => assert_eq!(from, http6(), "TCP reply source"),
            other => panic!("TCP: {other:?}\n{}", c.logs()),
        }
        match c.udp(pod, dns6()) {
            Seen::Answered { from, .. } => assert_eq!(from, dns6(), "UDP reply source"),
            other => panic!("UDP: {other:?}\n{}", c.logs()),
        }
    }
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
    answers_come_from_the_service(&c, "client");
}

#[test]
fn should_function_for_pod_service_http_and_udp_over_ipv6() {
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

/// Upstream "should preserve source pod IP for traffic thru service
/// cluster IP", over IPv6: each endpoint, on this node and the other, sees
/// the client pod's own IPv6 address, over TCP and UDP.
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip_over_ipv6() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &all_web()));
    integration_tests::assert_endpoints_see_the_client(
        &c,
        IpAddr::from(lab_pod("client").ipv6()),
        &["web-a", "web-b", "web-c"],
        http6(),
        dns6(),
    );
}

/// "should be rejected when no endpoints exist", over IPv6: a TCP RST and
/// an ICMPv6 port unreachable at once, never a timeout.
#[test]
fn should_be_rejected_when_no_endpoints_exist_over_ipv6() {
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

/// Networking Granular Checks "should function for client IP based session
/// affinity: http" and "…: udp", over IPv6: ClientIP affinity keeps every
/// new connection and UDP socket of the client on one backend.
#[test]
fn should_function_for_client_ip_based_session_affinity_http_and_udp_over_ipv6() {
    require_root();
    let c = cluster(
        CrossNode::Direct,
        web6_with(
            |spec| spec.session_affinity = Some("ClientIP".into()),
            &["web-a", "web-b", "web-c"],
        ),
    );
    c.eventually("the IPv6 service answers", || {
        c.tcp("client", http6()).backend().is_some()
    });
    // Without affinity, 12 connections over 3 backends would all land on
    // one with probability 3^-11.
    let seen = c.tcp_backends("client", http6(), 12);
    assert_eq!(seen.len(), 1, "client reached {seen:?}\n{}", c.logs());
    let seen = backends_seen(&c, dns6(), true);
    assert_eq!(seen.len(), 1, "UDP: client reached {seen:?}\n{}", c.logs());
}

/// "should respect internalTrafficPolicy=Local Pod to Pod", over IPv6: a
/// node's pods reach only that node's endpoints; a node without any drops
/// the traffic.
#[test]
fn internal_traffic_policy_local_over_ipv6_serves_from_this_node_only() {
    require_root();
    // Both endpoints on node2.
    let c = cluster(
        CrossNode::Direct,
        web6_with(
            |spec| spec.internal_traffic_policy = Some("Local".into()),
            &["web-b", "web-c"],
        ),
    );
    c.eventually("node2's pods reach the IPv6 service", || {
        c.tcp("web-b", http6()).backend().is_some()
    });
    let from_node2 = c.tcp_backends("web-b", http6(), 6);
    assert!(
        !from_node2.is_empty() && from_node2.iter().all(|b| b == "web-b" || b == "web-c"),
        "from node2: {from_node2:?}\n{}",
        c.logs()
    );
    // node1 has none: dropped as kube-proxy drops it (a timeout, not a
    // refusal: the service does have endpoints, elsewhere).
    assert_eq!(c.tcp("client", http6()), Seen::Timeout, "{}", c.logs());
}

/// "should allow pods to hairpin back to themselves through services",
/// over IPv6: a pod reaching its own service gets its own answer, from the
/// service address.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services_over_ipv6() {
    require_root();
    let c = cluster(CrossNode::Direct, web6_with(|_| {}, &["web-a"]));
    c.eventually("web-a reaches its IPv6 service", || {
        c.tcp("web-a", http6()).backend().is_some()
    });
    for _ in 0..3 {
        match c.tcp("web-a", http6()) {
            Seen::Answered { backend, from } => {
                assert_eq!(backend, "web-a");
                assert_eq!(from, http6());
            }
            other => panic!("hairpin TCP: {other:?}\n{}", c.logs()),
        }
        match c.udp("web-a", dns6()) {
            Seen::Answered { backend, from } => {
                assert_eq!(backend, "web-a");
                assert_eq!(from, dns6());
            }
            other => panic!("hairpin UDP: {other:?}\n{}", c.logs()),
        }
    }
}

/// The `bulk` service's IPv6 cluster IP (the bulk server's, see
/// [`serve_bulk`]).
const BULK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
const BULK: manifests::Port = manifests::Port {
    name: "bulk",
    protocol: "TCP",
    port: 90,
    target_port: 9000,
};
/// Bytes moved each way: many segments of a full 1500-byte MTU.
const BULK_BYTES: usize = 1 << 20;
/// The MTU of the narrow link: IPv6's minimum.
const NARROW_MTU: u32 = 1280;

/// A server on [`BULK`]'s target port in netns `ns`: `up N` reads N bytes
/// and answers `got N`; `down N` sends N bytes and closes.
fn serve_bulk(ns: &str) {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    dataplane_lab::netns::spawn_in_netns(ns, move || {
        let listener = TcpListener::bind(("::", BULK.target_port)).expect("binding bulk");
        bound_tx.send(()).expect("test waiting");
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = bulk_answer(stream);
            });
        }
    })
    .expect("bulk server thread");
    bound_rx.recv().expect("bulk server bound");
}

fn bulk_answer(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (verb, n) = (
        words.next(),
        words.next().and_then(|n| n.parse::<u64>().ok()),
    );
    let mut stream = stream;
    match (verb, n) {
        (Some("up"), Some(n)) => {
            let got = std::io::copy(&mut reader.take(n), &mut std::io::sink())?;
            stream.write_all(format!("got {got}\n").as_bytes())
        }
        (Some("down"), Some(n)) => {
            std::io::copy(&mut std::io::repeat(b'x').take(n), &mut stream).map(drop)
        }
        _ => Ok(()),
    }
}

/// Sends [`BULK_BYTES`] to `to`; what the server says it got.
fn upload(to: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("up {BULK_BYTES}\n").as_bytes())?;
    s.write_all(&vec![b'x'; BULK_BYTES])?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim_end().to_owned())
}

/// Asks `to` for `n` bytes; how many arrived before the server closed.
fn download(to: SocketAddr, n: usize) -> std::io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("down {n}\n").as_bytes())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got.len())
}

/// The path MTU netns `ns` has learnt towards `to` (`None` while it uses
/// the link's), as `ip -6 route get` shows it.
fn learnt_mtu(ns: &str, to: Ipv6Addr) -> Option<u32> {
    let out =
        dataplane_lab::netns::output("ip", &["-n", ns, "-6", "route", "get", &to.to_string()])
            .expect("ip route get");
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// Issue 15's path MTU discovery through the service: the nodes' network
/// is narrower than the pods' links, so the node forwarding a full-size
/// segment onto it answers with a Packet Too Big (IPv6 routers never
/// fragment). Uploading, node1 sends it to the client about the
/// translated packet (to the backend), and the client's node makes it
/// about the service, so the client's socket lowers its MSS; downloading,
/// node2 sends it to the backend. Both transfers complete.
#[test]
fn packet_too_big_from_a_narrow_link_reaches_the_client_translated_and_transfers_complete() {
    require_root();
    packet_too_big_through(CrossNode::Direct, |c, mtu| {
        for node in [1u8, 2] {
            let (node_ns, router) = (c.lab.node_ns(node), c.lab.router_ns());
            let port = format!("node{node}");
            for (ns, dev) in [(node_ns.as_str(), "eth0"), (router.as_str(), port.as_str())] {
                dataplane_lab::netns::ip(&["-n", ns, "link", "set", "dev", dev, "mtu", mtu])
                    .expect("narrowing the nodes' network");
            }
        }
    });
}

/// The same over the VXLAN overlay: the narrow link is the tunnel itself
/// (each node's `vxlan0`, narrower than the pods' links), so the node
/// encapsulating a full-size segment answers with the Packet Too Big.
#[test]
fn packet_too_big_from_a_narrow_overlay_reaches_the_client_translated_and_transfers_complete() {
    require_root();
    packet_too_big_through(CrossNode::Vxlan, |c, mtu| {
        for node in [1u8, 2] {
            dataplane_lab::netns::ip(&[
                "-n",
                &c.lab.node_ns(node),
                "link",
                "set",
                "dev",
                "vxlan0",
                "mtu",
                mtu,
            ])
            .expect("narrowing the overlay");
        }
    });
}

/// The bulk service backed by web-b (node2) on a lab crossing the nodes
/// by `cross_node`, the path between the nodes narrowed by `narrow` (to
/// the MTU it is given): uploads and downloads through the service
/// complete, and each end learns the narrow MTU from a Packet Too Big
/// about the addresses it uses.
fn packet_too_big_through(cross_node: CrossNode, narrow: impl FnOnce(&Cluster, &str)) {
    let service = manifests::with_cluster_ips(
        manifests::service("default", "bulk", WEB_IP, &[BULK]),
        &[BULK_IP6.into()],
    );
    let manifest = manifests::manifest_per_family(&service, |family| {
        vec![pod_endpoint_of(&lab_pod("web-b"), family)]
    });
    let c = cluster(cross_node, manifest);
    serve_bulk(&c.lab.pod_ns("web-b"));
    narrow(&c, &NARROW_MTU.to_string());
    let to = SocketAddr::new(BULK_IP6.into(), BULK.port);
    let client = lab_pod("client").ipv6();
    assert_eq!(learnt_mtu(&c.lab.pod_ns("client"), BULK_IP6), None);

    c.eventually("the bulk service answers", || {
        c.in_pod("client", move || download(to, 1))
            .is_ok_and(|n| n == 1)
    });

    let got = c.in_pod("client", move || upload(to));
    assert_eq!(
        got.as_deref().ok(),
        Some(format!("got {BULK_BYTES}").as_str()),
        "upload: {got:?}\n{}",
        c.logs()
    );
    assert_eq!(
        learnt_mtu(&c.lab.pod_ns("client"), BULK_IP6),
        Some(NARROW_MTU),
        "the client learnt the path MTU towards the service address"
    );

    // Forgotten, so that the client's SYN offers its link's MSS again (not
    // the narrow path's) and the backend's full-size segments meet node2's
    // narrow uplink.
    dataplane_lab::netns::ip(&[
        "-n",
        &c.lab.pod_ns("client"),
        "-6",
        "route",
        "flush",
        "cache",
    ])
    .expect("flushing the client's learnt MTUs");
    assert_eq!(learnt_mtu(&c.lab.pod_ns("client"), BULK_IP6), None);
    let got = c.in_pod("client", move || download(to, BULK_BYTES));
    assert_eq!(
        got.as_ref().ok(),
        Some(&BULK_BYTES),
        "download: {got:?}\n{}",
        c.logs()
    );
    assert_eq!(
        learnt_mtu(&c.lab.pod_ns("web-b"), client),
        Some(NARROW_MTU),
        "the backend learnt the narrow link's MTU"
    );
}

/// A UDP datagram larger than the path MTU, over IPv6: the client sends it
/// in fragments (IPv6 routers never fragment), only the first of which
/// carries the UDP header. Every fragment must reach the backend the first
/// one went to, or the backend cannot reassemble it and never answers.
#[test]
fn udp_datagram_larger_than_the_mtu_reaches_a_backend_through_the_ipv6_service() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &all_web()));
    c.eventually("the IPv6 service answers", || {
        c.udp("client", dns6()).backend().is_some()
    });
    for size in [1_400usize, 4_000, 9_000] {
        let to = dns6();
        let seen = c.in_pod("client", move || {
            let socket = std::net::UdpSocket::bind(("::", 0))?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
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

/// Over IPv6: the backend's ICMPv6 port unreachable quotes the backend's
/// address; made about the service, the client's socket sees it: refused,
/// on the same node and across nodes, rather than a timeout.
#[test]
fn udp_to_a_backend_port_nobody_listens_on_is_refused_through_the_ipv6_service() {
    require_root();
    // The backends listen on UDP 5353; the service targets 5999.
    let c = cluster(
        CrossNode::Direct,
        web6_with(
            |spec| {
                let dns = spec.ports.iter_mut().flatten().find(|p| p.port == 53);
                dns.expect("a dns port").target_port = Some(IntOrString::Int(5999));
            },
            &["web-a", "web-b"],
        ),
    );
    c.eventually("the IPv6 service answers TCP", || {
        c.tcp("client", http6()).backend().is_some()
    });
    for _ in 0..4 {
        assert_eq!(c.udp("client", dns6()), Seen::Refused, "{}", c.logs());
    }
}

/// Over IPv6: every request of one TCP connection reaches the backend its
/// first one did.
#[test]
fn one_ipv6_connection_sticks_to_one_backend() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &all_web()));
    c.eventually("the IPv6 service answers", || {
        c.tcp("client", http6()).backend().is_some()
    });
    let answers = c.in_pod("client", || {
        let mut conn = dataplane_lab::traffic::TcpConn::open(http6()).expect("connect");
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

const OTHER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
const THIRD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x12);

/// Upstream "should be able to up and down services", over IPv6: an IPv6
/// service deleted stops answering while the other keeps its answers, and
/// one created later answers.
#[test]
fn should_be_able_to_up_and_down_services_over_ipv6() {
    require_root();
    let other = SocketAddr::new(OTHER_IP6.into(), 80);
    let third = SocketAddr::new(THIRD_IP6.into(), 80);
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[
            ("web.yaml", web6_with(|_| {}, &["web-a"])),
            (
                "other.yaml",
                service6("other", OTHER_IP6, |_| {}, &["web-b"]),
            ),
        ],
    );
    c.eventually("both IPv6 services answer", || {
        c.tcp("client", http6()).backend() == Some("web-a")
            && c.tcp("client", other).backend() == Some("web-b")
    });
    c.remove_manifest("web.yaml");
    c.eventually("the deleted IPv6 service no longer answers", || {
        c.tcp("client", http6()).backend().is_none() && c.udp("client", dns6()).backend().is_none()
    });
    assert_eq!(
        c.tcp("client", other).backend(),
        Some("web-b"),
        "the service left up\n{}",
        c.logs()
    );
    c.write_manifest(
        "third.yaml",
        &service6("third", THIRD_IP6, |_| {}, &["web-a"]),
    );
    c.eventually("the IPv6 service brought up later answers", || {
        c.tcp("client", third).backend() == Some("web-a")
    });
    let third_dns = SocketAddr::new(THIRD_IP6.into(), 53);
    assert_eq!(c.udp("client", third_dns).backend(), Some("web-a"));
    assert!(c.tcp("client", http6()).backend().is_none());
}

/// Upstream "should work after the service has been recreated", over
/// IPv6: deleted, then created again on the same IPv6 address with another
/// endpoint, it reaches the new endpoint only.
#[test]
fn should_work_after_the_service_has_been_recreated_over_ipv6() {
    require_root();
    let c = cluster(CrossNode::Direct, web6_with(|_| {}, &["web-a"]));
    c.eventually("the IPv6 service answers from web-a", || {
        c.tcp("client", http6()).backend() == Some("web-a")
    });
    c.remove_manifest("web.yaml");
    c.eventually("the deleted IPv6 service no longer answers", || {
        c.tcp("client", http6()).backend().is_none()
    });
    c.write_manifest("web.yaml", &web6_with(|_| {}, &["web-b"]));
    c.eventually("the recreated IPv6 service answers", || {
        c.tcp("client", http6()).backend().is_some()
    });
    let want = BTreeSet::from(["web-b".to_owned()]);
    assert_eq!(backends_seen(&c, http6(), false), want, "TCP\n{}", c.logs());
    assert_eq!(backends_seen(&c, dns6(), true), want, "UDP\n{}", c.logs());
}

/// Upstream "should be rejected for evicted pods (no endpoints exist)",
/// over IPv6: once the only endpoint's pod is evicted (listed not ready,
/// then gone from the slice), clients are refused at once (a TCP RST, an
/// ICMPv6 port unreachable), not left to time out.
#[test]
fn should_be_rejected_for_evicted_pods_over_ipv6() {
    use manifests::State::NotReady;
    require_root();
    let c = cluster(CrossNode::Direct, web6_with(|_| {}, &["web-a"]));
    c.eventually("the IPv6 service answers from web-a", || {
        c.tcp("client", http6()).backend() == Some("web-a")
    });
    for (stage, manifest) in [
        ("listed not ready", web6_endpoints(&[("web-a", NotReady)])),
        ("removed", web6_endpoints(&[])),
    ] {
        c.write_manifest("web.yaml", &manifest);
        c.eventually(&format!("{stage}: TCP refused"), || {
            c.tcp("client", http6()) == Seen::Refused
        });
        for _ in 0..3 {
            assert_eq!(c.tcp("client", http6()), Seen::Refused, "{stage}");
            assert_eq!(c.udp("client", dns6()), Seen::Refused, "{stage}");
        }
    }
}

/// Networking Granular Checks "should function for endpoint-Service: http"
/// and "…: udp", over IPv6: an endpoint pod reaches every endpoint of its
/// own IPv6 service, itself included, and the answers come from the
/// service.
#[test]
fn should_function_for_endpoint_service_http_and_udp_over_ipv6() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &all_web()));
    let all: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("web-a reaches every endpoint over TCP", || {
        backends_seen_from(&c, "web-a", http6(), false) == all
    });
    c.eventually("web-a reaches every endpoint over UDP", || {
        backends_seen_from(&c, "web-a", dns6(), true) == all
    });
    answers_come_from_the_service(&c, "web-a");
}

/// "should be rejected when no endpoints exist", over IPv6, whatever the
/// host-side veth's tx checksum offload: the client's packets arrive
/// CHECKSUM_PARTIAL, the RST and the ICMPv6 port unreachable are built in
/// their place, and with offload off the host veth computes the checksum
/// where the client's packet had it.
#[test]
fn should_be_rejected_when_no_endpoints_exist_with_tx_checksum_offload_on_and_off_over_ipv6() {
    require_root();
    let c = cluster(CrossNode::Direct, web_of(&[WEB_IP6.into()], &[]));
    let client = c.pod("client");
    let host_veth = dataplane_lab::Lab::host_iface(&client);
    c.eventually("the IPv6 service refuses TCP", || {
        c.tcp("client", http6()) == Seen::Refused
    });
    for tx in ["off", "on"] {
        dataplane_lab::netns::exec(
            &c.lab.node_ns(client.node),
            &["ethtool", "-K", &host_veth, "tx", tx],
        )
        .unwrap_or_else(|e| panic!("ethtool -K {host_veth} tx {tx}: {e}"));
        for _ in 0..3 {
            assert_eq!(
                c.tcp("client", http6()),
                Seen::Refused,
                "TCP with tx offload {tx}\n{}",
                c.logs()
            );
            assert_eq!(
                c.udp("client", dns6()),
                Seen::Refused,
                "UDP with tx offload {tx}\n{}",
                c.logs()
            );
        }
    }
}

/// The IPv6-only `web` service with `endpoints` (IPv6 addresses of lab
/// pods, with their states) in its IPv6 EndpointSlice.
fn web6_endpoints(endpoints: &[(&str, manifests::State)]) -> String {
    let service =
        manifests::with_cluster_ips(manifests::web_service("web", WEB_IP), &[WEB_IP6.into()]);
    manifests::manifest_per_family(&service, |_| {
        endpoints
            .iter()
            .map(|(pod, state)| {
                let pod = lab_pod(pod);
                manifests::endpoint(pod.ipv6(), Some(&format!("node{}", pod.node)), *state)
            })
            .collect()
    })
}

/// Graceful termination over IPv6: a terminating (still serving) endpoint
/// gets new connections only while no endpoint is ready.
#[test]
fn ipv6_terminating_endpoints_serve_only_while_none_is_ready() {
    use manifests::State::{NotReady, Ready, Terminating};
    require_root();
    let c = cluster(
        CrossNode::Direct,
        web6_endpoints(&[("web-a", Ready), ("web-b", Terminating)]),
    );
    let only = |pod: &str| BTreeSet::from([pod.to_owned()]);
    c.eventually("only the ready web-a answers", || {
        backends_seen(&c, http6(), false) == only("web-a")
    });

    // web-a goes away (rolling update): the terminating web-b still serves.
    c.write_manifest(
        "web.yaml",
        &web6_endpoints(&[("web-a", NotReady), ("web-b", Terminating)]),
    );
    c.eventually("the terminating web-b answers", || {
        backends_seen(&c, http6(), false) == only("web-b")
    });

    // A ready endpoint again: the terminating one stops getting new flows.
    c.write_manifest(
        "web.yaml",
        &web6_endpoints(&[("web-a", Ready), ("web-b", Terminating)]),
    );
    c.eventually("web-a alone answers again", || {
        backends_seen(&c, http6(), false) == only("web-a")
    });
}

/// "should have session affinity timeout work for service with type
/// clusterIP", over IPv6: within `timeoutSeconds` a client stays on its
/// backend; after that long idle, its next connection is balanced anew.
#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_clusterip_over_ipv6() {
    require_root();
    const TIMEOUT_S: i32 = 2;
    let c = cluster(
        CrossNode::Direct,
        web6_with(
            |spec| {
                spec.session_affinity = Some("ClientIP".into());
                spec.session_affinity_config = Some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(TIMEOUT_S),
                    }),
                });
            },
            &["web-a", "web-b", "web-c"],
        ),
    );
    c.eventually("the IPv6 service answers", || {
        c.tcp("client", http6()).backend().is_some()
    });
    // Within the timeout: one backend (12 connections over 3 backends
    // without affinity: all on one with probability 3^-11).
    let seen = c.tcp_backends("client", http6(), 12);
    assert_eq!(seen.len(), 1, "within the timeout: {seen:?}\n{}", c.logs());

    // Each connection after the timeout has passed idle: balanced anew, so
    // 8 of them land on one backend with probability 3^-7.
    let mut after = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(TIMEOUT_S as u64 * 1000 + 600));
        if let Some(b) = c.tcp("client", http6()).backend() {
            after.insert(b.to_owned());
        }
    }
    assert!(
        after.len() > 1,
        "after the timeout every connection went to {after:?}\n{}",
        c.logs()
    );
}

/// The IPv6-only `web` service with `ports`, backed by `backends`.
fn web6_ports(ports: &[manifests::Port], backends: &[&str]) -> String {
    let service = manifests::with_cluster_ips(
        manifests::service("default", "web", WEB_IP, ports),
        &[WEB_IP6.into()],
    );
    manifests::manifest_per_family(&service, |family| {
        backends
            .iter()
            .map(|p| pod_endpoint_of(&lab_pod(p), family))
            .collect()
    })
}

/// Upstream "should serve endpoints on same port and different protocols",
/// over IPv6: TCP 80 and UDP 80 of one IPv6 cluster IP are two frontends,
/// each reaching every endpoint.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols_over_ipv6() {
    require_root();
    let tcp = manifests::Port {
        name: "tcp",
        protocol: "TCP",
        port: 80,
        target_port: dataplane_lab::traffic::TCP_PORT,
    };
    let udp = manifests::Port {
        name: "udp",
        protocol: "UDP",
        port: 80,
        target_port: dataplane_lab::traffic::UDP_PORT,
    };
    let c = cluster(
        CrossNode::Direct,
        web6_ports(&[tcp, udp], &["web-a", "web-b"]),
    );
    let both: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    c.eventually("TCP [web6]:80 reaches both endpoints", || {
        backends_seen(&c, http6(), false) == both
    });
    c.eventually("UDP [web6]:80 reaches both endpoints", || {
        backends_seen(&c, http6(), true) == both
    });
}

/// Upstream "should serve multiport endpoints from pods", over IPv6: see
/// [`integration_tests::multiport`].
#[test]
fn should_serve_multiport_endpoints_from_pods_over_ipv6() {
    require_root();
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "multi.yaml",
            integration_tests::multiport::manifest(WEB_IP6.into()),
        )],
    );
    integration_tests::multiport::serve_and_check(&c, WEB_IP6.into());
}

/// Upstream "should be updated after adding or deleting ports", over IPv6:
/// a port added to the IPv6 service starts answering, a port removed stops.
#[test]
fn should_be_updated_after_adding_or_deleting_ports_over_ipv6() {
    require_root();
    let c = cluster(
        CrossNode::Direct,
        web6_ports(&[manifests::HTTP], &["web-a"]),
    );
    assert_eq!(
        c.tcp("client", http6()).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    assert_eq!(c.udp("client", dns6()).backend(), None, "no dns port yet");

    c.write_manifest(
        "web.yaml",
        &web6_ports(&[manifests::HTTP, manifests::DNS], &["web-a"]),
    );
    c.eventually("the added dns port answers over IPv6", || {
        c.udp("client", dns6()).backend() == Some("web-a")
    });
    assert_eq!(c.tcp("client", http6()).backend(), Some("web-a"));

    c.write_manifest("web.yaml", &web6_ports(&[manifests::DNS], &["web-a"]));
    c.eventually("the deleted http port no longer answers over IPv6", || {
        c.tcp("client", http6()).backend().is_none()
    });
    assert_eq!(
        c.udp("client", dns6()).backend(),
        Some("web-a"),
        "the port kept\n{}",
        c.logs()
    );
}
