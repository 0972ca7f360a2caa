//! Traffic from outside the cluster: NodePort, LoadBalancer IPs and
//! externalIPs, through the router of the lab to both nodes' uplinks, with
//! the tc external datapath. Test names follow the upstream e2e behaviours
//! of ../shared/CONFORMANCE.md where they match.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use dataplane_lab::{
    manifests::{self, pod_endpoint, Exposure},
    netns,
    topology::{node_ip, OUTSIDE_CLIENT_IP, ROUTER_NODE_IP},
    CrossNode, Topology,
};
use dataplane_testkit::apiserver::ApiServer;
use integration_tests::{
    bulk, lab_pod, require_root, sockclient_command, sockclient_outcomes, Cluster, Seen as Outcome,
    WEB_IP,
};
use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};

const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
const HEALTH_PORT: u16 = 32000;
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// The `web` service on `pods`, exposed as `exposure` says.
fn web_exposed(pods: &[&str], exposure: &Exposure) -> String {
    let service = manifests::exposed(manifests::web_service("web", WEB_IP), exposure);
    manifests::manifest(
        &service,
        pods.iter().map(|p| pod_endpoint(&lab_pod(p))).collect(),
    )
}

fn node_port(local: bool) -> Exposure {
    Exposure {
        type_: Some("NodePort"),
        node_ports: vec![NODE_PORT_HTTP, NODE_PORT_DNS],
        local,
        ..Default::default()
    }
}

/// The agent's defaults: XDP, which on the nodes' veth uplinks runs
/// generic (native XDP_TX on a veth needs NAPI on the peer, which the
/// router's bridge ports lack).
fn start(manifest: String) -> Cluster {
    Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
    )
}

/// With `--external-datapath tc`: no XDP in front.
fn start_tc(manifest: String) -> Cluster {
    Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
        &["--external-datapath", "tc"],
    )
}

/// (backend, address it saw the client as) over `n` connections to `to`.
fn seen_from_outside(c: &Cluster, to: SocketAddr, n: usize) -> BTreeSet<(String, IpAddr)> {
    (0..n)
        .filter_map(|_| c.outside_tcp(to).ok())
        .map(|s| (s.backend, s.client.ip()))
        .collect()
}

#[test]
fn should_be_able_to_create_a_functioning_nodeport_service() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    assert!(
        c.agent_log(1).contains("XDP attached, mode Generic"),
        "{}",
        c.agent_log(1)
    );
    functioning_node_port(&c);
}

#[test]
fn should_be_able_to_create_a_functioning_nodeport_service_with_the_tc_fallback() {
    require_root();
    let c = start_tc(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    assert!(
        !c.agent_log(1).contains("XDP attached"),
        "{}",
        c.agent_log(1)
    );
    functioning_node_port(&c);
}

fn functioning_node_port(c: &Cluster) {
    for node in [1u8, 2] {
        functioning_node_port_on(c, node);
    }
}

/// NodePort from outside on `node`'s address reaches every backend (each
/// seeing the source policy Cluster gives it) and replies come from it.
fn functioning_node_port_on(c: &Cluster, node: u8) {
    let client = IpAddr::V4(OUTSIDE_CLIENT_IP);
    {
        let addr = node_ip(node);
        // Local backends see the outside client; remote ones the node that
        // accepted the connection (SNAT, policy Cluster).
        let want: BTreeSet<(String, IpAddr)> = ["web-a", "web-b", "web-c"]
            .iter()
            .map(|b| {
                let local = lab_pod(b).node == node;
                (b.to_string(), if local { client } else { IpAddr::V4(addr) })
            })
            .collect();
        c.eventually(
            &format!("NodePort on node{node} reaches all backends"),
            || seen_from_outside(c, at(addr, NODE_PORT_HTTP), 30) == want,
        );
        let answer = c
            .outside_tcp(at(addr, NODE_PORT_HTTP))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", c.logs()));
        assert_eq!(
            answer.from,
            at(addr, NODE_PORT_HTTP),
            "reply from the NodePort"
        );
        let udp = c
            .outside_udp(at(addr, NODE_PORT_DNS))
            .unwrap_or_else(|e| panic!("UDP: {e:?}\n{}", c.logs()));
        assert_eq!(
            udp.from,
            at(addr, NODE_PORT_DNS),
            "UDP reply from the NodePort"
        );
    }
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_health_checks_count_local_endpoints() {
    require_root();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        health_check_node_port: Some(HEALTH_PORT),
        ..node_port(true)
    };
    let c = start(web_exposed(&["web-a"], &exposure));
    let client = IpAddr::V4(OUTSIDE_CLIENT_IP);
    let want: BTreeSet<(String, IpAddr)> = [("web-a".to_string(), client)].into();
    c.eventually(
        "node1 serves its local endpoint with the client's address",
        || seen_from_outside(&c, at(node_ip(1), NODE_PORT_HTTP), 5) == want,
    );
    // Node 2 has no local endpoint: it does not answer (no SNAT to node 1).
    let on_node2 = c.outside_tcp(at(node_ip(2), NODE_PORT_HTTP));
    assert!(on_node2.is_err(), "node2 answered: {on_node2:?}");
    assert!(c.counter(2, "drop_no_local_endpoints") >= 1);

    let (status, body) = c
        .outside_http_get(at(node_ip(1), HEALTH_PORT))
        .unwrap_or_else(|| panic!("no health check answer\n{}", c.logs()));
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["localEndpoints"], 1);
    let (status, body) = c
        .outside_http_get(at(node_ip(2), HEALTH_PORT))
        .expect("node2's health check answers");
    assert_eq!(status, 503, "{body}");
}

#[test]
fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints() {
    require_root();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        health_check_node_port: Some(HEALTH_PORT),
        ..node_port(true)
    };
    let c = start(web_exposed(&["web-a"], &exposure));
    c.eventually("node1 health check says 200", || {
        c.outside_http_get(at(node_ip(1), HEALTH_PORT))
            .is_some_and(|(s, _)| s == 200)
    });
    let service = manifests::exposed(manifests::web_service("web", WEB_IP), &exposure);
    let terminating = manifests::endpoint(
        lab_pod("web-a").ip(),
        Some("node1"),
        manifests::State::Terminating,
    );
    c.write_manifest(
        "web.yaml",
        &manifests::manifest(&service, vec![terminating]),
    );
    c.eventually("node1 health check says 503", || {
        c.outside_http_get(at(node_ip(1), HEALTH_PORT))
            .is_some_and(|(s, _)| s == 503)
    });
    // kube-proxy's terminating fallback: established and new connections
    // still reach the serving, terminating local endpoint.
    let answer = c.outside_tcp(at(node_ip(1), NODE_PORT_HTTP));
    assert_eq!(answer.map(|s| s.backend).ok().as_deref(), Some("web-a"));
}

#[test]
fn load_balancer_ip_and_external_ip_are_served_from_outside_and_inside() {
    require_root();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        load_balancer_ips: vec![LB_IP],
        external_ips: vec![EXTERNAL_IP],
        ..node_port(false)
    };
    let c = start(web_exposed(&["web-a", "web-b"], &exposure));
    let all: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    for ip in [LB_IP, EXTERNAL_IP] {
        c.eventually(&format!("{ip} reaches both backends from outside"), || {
            seen_from_outside(&c, at(ip, 80), 30)
                .into_iter()
                .map(|(b, _)| b)
                .collect::<BTreeSet<_>>()
                == all
        });
        let answer = c.outside_tcp(at(ip, 80)).expect("answered");
        assert_eq!(answer.from, at(ip, 80), "reply from the frontend");
        // Pods reach it too (kube-proxy short-circuits these in-cluster).
        c.eventually(&format!("the client pod reaches {ip}"), || {
            c.tcp_backends("client", at(ip, 80), 20) == all
        });
    }
    // And a NodePort on a node's address, from a pod.
    c.eventually("the client pod reaches node2's NodePort", || {
        c.tcp_backends("client", at(node_ip(2), NODE_PORT_HTTP), 20) == all
    });
}

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    require_root();
    let mut exposure = Exposure {
        type_: Some("LoadBalancer"),
        load_balancer_ips: vec![LB_IP],
        source_ranges: vec!["10.0.0.0/8".into()],
        ..node_port(false)
    };
    let c = start(web_exposed(&["web-a", "web-b"], &exposure));
    // The NodePort is not filtered (kube-proxy applies the ranges to the
    // load-balancer IP).
    c.eventually("the NodePort answers", || {
        c.outside_tcp(at(node_ip(1), NODE_PORT_HTTP)).is_ok()
    });
    assert!(c.outside_tcp(at(LB_IP, 80)).is_err(), "outside the ranges");
    assert!(
        c.counter(1, "drop_source_range") + c.counter(2, "drop_source_range") >= 1,
        "the drop is counted"
    );
    exposure.source_ranges = vec!["203.0.113.0/24".into()];
    c.write_manifest("web.yaml", &web_exposed(&["web-a", "web-b"], &exposure));
    c.eventually("the client's range is let in", || {
        c.outside_tcp(at(LB_IP, 80)).is_ok()
    });
}

#[test]
fn should_release_nodeports_on_delete_and_on_type_change() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b"], &node_port(false)));
    let to = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("the NodePort answers", || c.outside_tcp(to).is_ok());
    // NodePort -> ClusterIP: the port is released at once.
    c.write_manifest(
        "web.yaml",
        &web_exposed(&["web-a", "web-b"], &Exposure::default()),
    );
    c.eventually("the NodePort is released", || c.outside_tcp(to).is_err());
    // ClusterIP -> NodePort again, then deleted.
    c.write_manifest(
        "web.yaml",
        &web_exposed(&["web-a", "web-b"], &node_port(false)),
    );
    c.eventually("the NodePort is back", || c.outside_tcp(to).is_ok());
    c.remove_manifest("web.yaml");
    c.eventually("the NodePort is released on delete", || {
        c.outside_tcp(to).is_err()
    });
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() {
    require_root();
    let c = start(web_exposed(&["web-b"], &node_port(false)));
    let to = at(node_ip(1), NODE_PORT_DNS);
    // One UDP socket (one flow) from outside through node1 to node2's pod.
    let answers = c.outside(move || {
        let conn = dataplane_lab::traffic::UdpConn::open(to).expect("socket");
        let mut backends = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline && backends.is_empty() {
            if let Some(b) = conn.request().backend() {
                backends.push(b.to_owned());
            }
        }
        (conn, backends)
    });
    let (conn, first) = answers;
    assert_eq!(first, ["web-b"], "{}", c.logs());
    // The server pod is replaced by web-c.
    c.write_manifest("web.yaml", &web_exposed(&["web-c"], &node_port(false)));
    let moved = c.outside(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if conn.request().backend() == Some("web-c") {
                return true;
            }
        }
        false
    });
    assert!(moved, "the UDP flow reached the new pod\n{}", c.logs());
}

#[test]
fn agent_restart_keeps_nodeport_connections_open() {
    require_root();
    restart_keeps_connections(start(web_exposed(&["web-b"], &node_port(false))));
}

#[test]
fn agent_restart_keeps_nodeport_connections_open_with_the_tc_fallback() {
    require_root();
    restart_keeps_connections(start_tc(web_exposed(&["web-b"], &node_port(false))));
}

fn restart_keeps_connections(mut c: Cluster) {
    let to = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("the NodePort answers", || c.outside_tcp(to).is_ok());
    let conn = c.outside(move || {
        let mut conn = dataplane_lab::traffic::TcpConn::open(to).expect("connect");
        assert_eq!(conn.request().backend(), Some("web-b"));
        conn
    });
    c.stop_agents();
    let (conn, while_stopped) = c.outside(move || {
        let mut conn = conn;
        let seen = conn.request();
        (conn, seen)
    });
    assert_eq!(
        while_stopped.backend(),
        Some("web-b"),
        "with the agent stopped"
    );
    c.restart_agents();
    let after = c.outside(move || {
        let mut conn = conn;
        conn.request()
    });
    assert_eq!(
        after.backend(),
        Some("web-b"),
        "after the restart\n{}",
        c.logs()
    );
}

#[test]
fn should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols(
) {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b"], &Exposure::default()));
    let both = Exposure {
        node_ports: vec![30090, 30090],
        ..node_port(false)
    };
    c.write_manifest("web.yaml", &web_exposed(&["web-a", "web-b"], &both));
    let (tcp, udp) = (at(node_ip(1), 30090), at(node_ip(1), 30090));
    c.eventually("TCP and UDP on one node port number", || {
        c.outside_tcp(tcp).is_ok() && c.outside_udp(udp).is_ok()
    });
}

/// Upstream: "should have session affinity work for NodePort service".
#[test]
fn should_have_session_affinity_work_for_nodeport_service() {
    require_root();
    let exposure = node_port(false);
    let service = manifests::exposed(manifests::web_service("web", WEB_IP), &exposure);
    let mut service = service;
    if let Some(spec) = service.spec.as_mut() {
        spec.session_affinity = Some("ClientIP".into());
    }
    let manifest = manifests::manifest(
        &service,
        ["web-a", "web-b", "web-c"]
            .iter()
            .map(|p| pod_endpoint(&lab_pod(p)))
            .collect(),
    );
    let c = start(manifest);
    let to = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("the NodePort answers", || c.outside_tcp(to).is_ok());
    let backends: BTreeSet<String> = (0..10)
        .filter_map(|_| c.outside_tcp(to).ok().map(|s| s.backend))
        .collect();
    assert_eq!(
        backends.len(),
        1,
        "one backend for one client: {backends:?}"
    );
}

/// An address given to node 1's uplink after the agent started serves the
/// NodePort too (the agent follows netlink address notifications), and no
/// longer once it is removed.
#[test]
fn node_port_is_served_on_an_address_added_after_start() {
    require_root();
    let c = start_tc(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    let added = Ipv4Addr::new(192, 168, 100, 101);
    let node1 = c.lab.node_ns(1);
    let ip = |verb: &str| {
        dataplane_lab::netns::ip(&[
            "-n",
            &node1,
            "addr",
            verb,
            "192.168.100.101/24",
            "dev",
            "eth0",
        ])
        .expect("ip addr")
    };
    ip("add");
    c.eventually("the NodePort answers on the added address", || {
        c.outside_tcp(at(added, NODE_PORT_HTTP)).is_ok()
    });
    assert!(
        c.agent_log(1).contains("node addresses changed"),
        "{}",
        c.agent_log(1)
    );
    ip("del");
    c.eventually("the removed address no longer serves it", || {
        c.outside_tcp(at(added, NODE_PORT_HTTP)).is_err()
    });
}

/// Networking Granular Checks: "should function for node-Service: http"
/// and "…: udp" through a nodePort: host-network processes of node 1
/// reach the NodePort on their own node's address and on the other node's,
/// over TCP and UDP. The socket hooks translate them at connect() (to its
/// own address the packets stay on `lo`, crossing no program of the packet
/// path), and the process sees the NodePort as its peer.
#[test]
fn should_function_for_node_service_http_and_udp_via_node_port() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    for (mode, port) in [("tcp", NODE_PORT_HTTP), ("udp", NODE_PORT_DNS)] {
        for node in [1u8, 2] {
            let to = at(node_ip(node), port);
            // 40 requests: with 20, one of three backends went unpicked by
            // chance ((2/3)^20 ≈ 3e-4) in a CI run; (2/3)^40 ≈ 1e-7.
            let seen = sockclient_outcomes(sockclient_command(
                &c.lab.node_ns(1),
                &c.lab.node_cgroup(1),
                &[mode, &to.to_string(), "40"],
            ));
            let backends: BTreeSet<&str> = seen.iter().filter_map(|s| s.backend()).collect();
            assert_eq!(
                backends,
                BTreeSet::from(["web-a", "web-b", "web-c"]),
                "{mode} to {to}: {seen:?}\n{}",
                c.logs()
            );
            assert!(
                seen.iter()
                    .all(|s| matches!(s, Outcome::Answered { from, .. } if *from == to)),
                "{mode} to {to}: {seen:?}"
            );
        }
    }
}

/// Replaces node `node`'s uplink `eth0` with a new interface `name` (a new
/// ifindex) joined to the router as eth0 was: same address and MAC, the
/// default route and the route to the other node's pods on it. An uplink
/// that appears after the agent started.
fn replace_uplink(c: &Cluster, node: u8, name: &str) {
    let ns = c.lab.node_ns(node);
    let router = c.lab.router_ns();
    let mac = netns::mac(&ns, "eth0").expect("the uplink's MAC");
    let port = format!("node{node}");
    let peer = 3 - node;
    let node_cidr = format!("{}/24", node_ip(node));
    let peer_pods = format!("10.244.{peer}.0/24");
    let (gateway, peer_ip) = (ROUTER_NODE_IP.to_string(), node_ip(peer).to_string());
    for args in [
        &["-n", &ns, "link", "del", "eth0"][..],
        &[
            "-n", &ns, "link", "add", name, "address", &mac, "type", "veth", "peer", "name", &port,
            "netns", &router,
        ],
        &["-n", &router, "link", "set", &port, "master", "br0", "up"],
        &["-n", &ns, "addr", "add", &node_cidr, "dev", name],
        &["-n", &ns, "link", "set", name, "up"],
        &["-n", &ns, "route", "add", "default", "via", &gateway],
        &["-n", &ns, "route", "add", &peer_pods, "via", &peer_ip],
    ] {
        netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
}

/// Uplinks defaulted (the interfaces holding the default routes): node 1's
/// uplink is replaced by a new interface holding the default route after
/// the agent started; the agent follows the link and route notifications,
/// takes the datapath off the old one and puts it on the new one, and
/// NodePort from outside works through it.
#[test]
fn node_port_is_served_through_an_uplink_that_appears_after_start() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    replace_uplink(&c, 1, "uplink1");
    functioning_node_port_on(&c, 1);
    let log = c.agent_log(1);
    for line in [
        "detached the external datapath from uplink eth0",
        "attached the external datapath to uplink uplink1",
        "xdp_from_outside on uplink1: XDP attached, mode Generic",
    ] {
        assert!(log.contains(line), "{line:?} not logged:\n{log}");
    }
}

/// `--uplink-ifaces` naming an interface that does not exist yet: the agent
/// starts, says so, and attaches to it when it appears.
#[test]
fn node_port_is_served_through_a_named_uplink_created_after_start() {
    require_root();
    let c = Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)),
        )],
        &["--uplink-ifaces", "uplink1", "--external-datapath", "tc"],
    );
    assert!(
        c.agent_log(1)
            .contains(r#"uplinks ["uplink1"] not present: attached when they appear"#),
        "{}",
        c.agent_log(1)
    );
    replace_uplink(&c, 1, "uplink1");
    functioning_node_port_on(&c, 1);
    assert!(
        c.agent_log(1)
            .contains("attached the external datapath to uplink uplink1"),
        "{}",
        c.agent_log(1)
    );
}

/// A pod of node 1 connecting to node 2's address on a NodePort whose only
/// backend is on node 2, with the nodes joined by a VXLAN overlay: the
/// request arrives on node 2's uplink, the backend's reply goes back to the
/// pod over the overlay (not out of the uplink) and is translated all the
/// same: the pod sees the NodePort answer.
#[test]
fn pods_reach_a_node_port_of_another_node_with_a_local_backend_across_a_vxlan_overlay() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Vxlan,
        &[("web.yaml", web_exposed(&["web-b"], &node_port(false)))],
    );
    let to = at(node_ip(2), NODE_PORT_HTTP);
    assert_eq!(lab_pod("client").node, 1);
    c.eventually("the NodePort answers the pod of the other node", || {
        c.tcp("client", to).backend() == Some("web-b")
    });
    match c.tcp("client", to) {
        Outcome::Answered { from, .. } => assert_eq!(from, to, "TCP reply from the NodePort"),
        other => panic!("TCP: {other:?}\n{}", c.logs()),
    }
    let dns = at(node_ip(2), NODE_PORT_DNS);
    match c.udp("client", dns) {
        Outcome::Answered { from, .. } => assert_eq!(from, dns, "UDP reply from the NodePort"),
        other => panic!("UDP: {other:?}\n{}", c.logs()),
    }
}

/// Writes `net.ipv4.nexthop_compat_mode` in node `node`'s namespace: with
/// 0, routes through nexthop objects name only the object (no device), as
/// on nodes where a routing daemon manages them.
fn nexthop_compat_mode(c: &Cluster, node: u8, value: &str) {
    netns::sysctl(&c.lab.node_ns(node), "net.ipv4.nexthop_compat_mode", value)
        .expect("sysctl nexthop_compat_mode");
}

/// Node 1's uplink is replaced after the agent started by one whose
/// default route goes through a nexthop object (`ip route add default
/// nhid 10`, FRR's way), the kernel naming only the object: the agent
/// resolves it to its device and serves NodePort through it.
#[test]
fn node_port_is_served_through_an_uplink_whose_default_route_uses_a_nexthop_object() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    nexthop_compat_mode(&c, 1, "0");
    replace_uplink(&c, 1, "uplink1");
    let ns = c.lab.node_ns(1);
    let gateway = ROUTER_NODE_IP.to_string();
    for args in [
        &["-n", &ns, "route", "del", "default"][..],
        &[
            "-n", &ns, "nexthop", "add", "id", "10", "via", &gateway, "dev", "uplink1",
        ],
        &["-n", &ns, "route", "add", "default", "nhid", "10"],
    ] {
        netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    functioning_node_port_on(&c, 1);
    let log = c.agent_log(1);
    for line in [
        "detached the external datapath from uplink eth0",
        "attached the external datapath to uplink uplink1",
    ] {
        assert!(log.contains(line), "{line:?} not logged:\n{log}");
    }
}

/// Node 1 gains a second uplink `uplink2` on the router's bridge with an
/// address of its own, and its default route becomes an ECMP route over
/// both uplinks, set up by `ecmp`. Node 1 answers ARP only on the
/// interface holding the address asked for, so traffic from outside to
/// the second address arrives on `uplink2`.
fn add_ecmp_uplink(c: &Cluster, ecmp: &[&[&str]]) -> Ipv4Addr {
    let second = Ipv4Addr::new(192, 168, 100, 11);
    let ns = c.lab.node_ns(1);
    let router = c.lab.router_ns();
    netns::sysctl(&ns, "net.ipv4.conf.all.arp_ignore", "1").expect("sysctl arp_ignore");
    let addr = format!("{second}/24");
    for args in [
        &[
            "-n", &ns, "link", "add", "uplink2", "type", "veth", "peer", "name", "node1b", "netns",
            &router,
        ][..],
        &[
            "-n", &router, "link", "set", "node1b", "master", "br0", "up",
        ],
        &["-n", &ns, "addr", "add", &addr, "dev", "uplink2"],
        &["-n", &ns, "link", "set", "uplink2", "up"],
    ] {
        netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    for args in ecmp {
        let args: Vec<&str> = ["-n", ns.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        netns::ip(&args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
    }
    second
}

/// NodePort from outside on `addr` (an address of node 1) reaches every
/// backend.
fn node_port_answers_on(c: &Cluster, addr: Ipv4Addr) {
    c.eventually(&format!("NodePort on {addr} reaches all backends"), || {
        let seen: BTreeSet<String> = seen_from_outside(c, at(addr, NODE_PORT_HTTP), 30)
            .into_iter()
            .map(|(backend, _)| backend)
            .collect();
        seen == BTreeSet::from(["web-a".into(), "web-b".into(), "web-c".into()])
    });
}

fn assert_both_ecmp_uplinks_attached(c: &Cluster) {
    let log = c.agent_log(1);
    assert!(
        log.contains("attached the external datapath to uplink uplink2"),
        "{log}"
    );
    assert!(
        !log.contains("detached the external datapath from uplink eth0"),
        "{log}"
    );
}

/// A default route through a nexthop group (`ip nexthop add id 20 group
/// 10/11`, ECMP) over node 1's two uplinks, the kernel naming only the
/// group: both members get the external datapath, and NodePort is served
/// on the addresses of both.
#[test]
fn node_port_is_served_through_both_uplinks_of_a_nexthop_group_default_route() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    nexthop_compat_mode(&c, 1, "0");
    let gateway = ROUTER_NODE_IP.to_string();
    let second = add_ecmp_uplink(
        &c,
        &[
            &["nexthop", "add", "id", "10", "via", &gateway, "dev", "eth0"],
            &[
                "nexthop", "add", "id", "11", "via", &gateway, "dev", "uplink2",
            ],
            &["nexthop", "add", "id", "20", "group", "10/11"],
            &["route", "replace", "default", "nhid", "20"],
        ],
    );
    node_port_answers_on(&c, second);
    node_port_answers_on(&c, node_ip(1));
    assert_both_ecmp_uplinks_attached(&c);
}

/// A multipath default route (`ip route add default nexthop via A dev
/// eth0 nexthop via B dev uplink2`) over node 1's two uplinks: both get
/// the external datapath, and NodePort is served on the addresses of both.
#[test]
fn node_port_is_served_through_both_uplinks_of_a_multipath_default_route() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    let gateway = ROUTER_NODE_IP.to_string();
    let second = add_ecmp_uplink(
        &c,
        &[&[
            "route", "replace", "default", "nexthop", "via", &gateway, "dev", "eth0", "nexthop",
            "via", &gateway, "dev", "uplink2",
        ]],
    );
    node_port_answers_on(&c, second);
    node_port_answers_on(&c, node_ip(1));
    assert_both_ecmp_uplinks_attached(&c);
}

/// Node 1's uplink renamed while the agent runs (`ip link set eth0 name
/// wan0`, up: the same interface, routes kept): the external datapath
/// stays on it, never detached, and NodePort keeps being served.
#[test]
fn a_renamed_uplink_stays_attached() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    let ns = c.lab.node_ns(1);
    netns::ip(&["-n", &ns, "link", "set", "eth0", "name", "wan0"]).expect("ip link set name");
    c.eventually("the rename is noticed", || {
        c.agent_log(1).contains("renamed wan0")
    });
    functioning_node_port_on(&c, 1);
    let log = c.agent_log(1);
    assert!(!log.contains("detached the external datapath"), "{log}");
}

// The upstream behaviours of ../shared/CONFORMANCE.md's NodePort table
// that had no test of their name yet.

/// `web` with ClientIP affinity (`timeout` seconds, if given), exposed as
/// `exposure` says, on `pods`.
fn web_with_affinity(pods: &[&str], exposure: &Exposure, timeout: Option<i32>) -> String {
    let mut service = manifests::exposed(manifests::web_service("web", WEB_IP), exposure);
    if let Some(spec) = service.spec.as_mut() {
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = timeout.map(|t| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(t),
            }),
        });
    }
    manifests::manifest(
        &service,
        pods.iter().map(|p| pod_endpoint(&lab_pod(p))).collect(),
    )
}

/// Backends `n` connections from outside to `to` reached.
fn backends_from_outside(c: &Cluster, to: SocketAddr, n: usize) -> BTreeSet<String> {
    seen_from_outside(c, to, n)
        .into_iter()
        .map(|(b, _)| b)
        .collect()
}

/// Upstream: "should have session affinity timeout work for NodePort
/// service": the outside client sticks to one endpoint through the
/// NodePort while it keeps coming back, and is balanced again after
/// staying away longer than `timeoutSeconds`.
#[test]
fn should_have_session_affinity_timeout_work_for_nodeport_service() {
    require_root();
    let pods = ["web-a", "web-b", "web-c"];
    let c = start(web_with_affinity(&pods, &node_port(false), Some(2)));
    let to = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("the NodePort answers", || c.outside_tcp(to).is_ok());
    let sticky = backends_from_outside(&c, to, 12);
    assert_eq!(
        sticky.len(),
        1,
        "within the timeout: {sticky:?}\n{}",
        c.logs()
    );
    // Without expiry all ten land on one endpoint; with it, all ten do so
    // with probability 3^-9.
    let after_pauses: BTreeSet<String> = (0..10)
        .filter_map(|_| {
            std::thread::sleep(std::time::Duration::from_secs(3));
            c.outside_tcp(to).ok().map(|s| s.backend)
        })
        .collect();
    assert!(
        after_pauses.len() > 1,
        "affinity outlived its timeout: {after_pauses:?}\n{}",
        c.logs()
    );
}

/// Upstream: "should be able to switch session affinity for NodePort
/// service": ClientIP affinity turned off and on again, live.
#[test]
fn should_be_able_to_switch_session_affinity_for_nodeport_service() {
    require_root();
    let pods = ["web-a", "web-b", "web-c"];
    let c = start(web_with_affinity(&pods, &node_port(false), None));
    let to = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("the NodePort answers", || c.outside_tcp(to).is_ok());
    let sticky = backends_from_outside(&c, to, 12);
    assert_eq!(sticky.len(), 1, "{sticky:?}\n{}", c.logs());
    c.write_manifest("web.yaml", &web_exposed(&pods, &node_port(false)));
    c.eventually("affinity off: connections spread again", || {
        backends_from_outside(&c, to, 12).len() > 1
    });
    c.write_manifest(
        "web.yaml",
        &web_with_affinity(&pods, &node_port(false), None),
    );
    c.eventually("affinity on again: one endpoint", || {
        backends_from_outside(&c, to, 12).len() == 1
    });
    let sticky = backends_from_outside(&c, to, 12);
    assert_eq!(sticky.len(), 1, "{sticky:?}\n{}", c.logs());
}

/// Upstream: "should be possible to connect to a service via ExternalIP
/// when the external IP is not assigned to a node": the router sends the
/// externalIP to the nodes, none of which has it; it is served from
/// outside and from pods, and answers come from it.
#[test]
fn should_be_possible_to_connect_to_a_service_via_externalip_when_the_external_ip_is_not_assigned_to_a_node(
) {
    require_root();
    let exposure = Exposure {
        external_ips: vec![EXTERNAL_IP],
        ..Exposure::default()
    };
    let c = start(web_exposed(&["web-a", "web-b"], &exposure));
    for node in [1u8, 2] {
        let out = std::process::Command::new("ip")
            .args(["-n", &c.lab.node_ns(node), "-4", "addr", "show"])
            .output()
            .expect("ip addr");
        let addrs = String::from_utf8_lossy(&out.stdout);
        assert!(
            !addrs.contains(&EXTERNAL_IP.to_string()),
            "node{node} has the external IP: {addrs}"
        );
    }
    let to = at(EXTERNAL_IP, 80);
    let all: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    c.eventually(
        "the external IP reaches both endpoints from outside",
        || backends_from_outside(&c, to, 20) == all,
    );
    let answer = c.outside_tcp(to).expect("answered");
    assert_eq!(answer.from, to, "the answer comes from the external IP");
    let udp = c.outside_udp(at(EXTERNAL_IP, 53)).expect("UDP answered");
    assert_eq!(udp.from, at(EXTERNAL_IP, 53));
    c.eventually("a pod reaches the external IP", || {
        c.tcp_backends("client", to, 20) == all
    });
}

/// Upstream: "should fallback to local terminating endpoints when there are
/// no ready endpoints with externalTrafficPolicy=Local": node1's only
/// endpoint is terminating while node2 has a ready one; node1's NodePort
/// still serves its own terminating endpoint, keeping the client's
/// address, and never sends the client to node2's.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local(
) {
    require_root();
    let service = manifests::exposed(manifests::web_service("web", WEB_IP), &node_port(true));
    let with = |a: manifests::State| {
        manifests::manifest(
            &service,
            vec![
                manifests::endpoint(lab_pod("web-a").ip(), Some("node1"), a),
                pod_endpoint(&lab_pod("web-b")),
            ],
        )
    };
    let c = start(with(manifests::State::Ready));
    let client = IpAddr::V4(OUTSIDE_CLIENT_IP);
    let node1 = at(node_ip(1), NODE_PORT_HTTP);
    c.eventually("node1 serves its ready endpoint", || {
        seen_from_outside(&c, node1, 5) == [("web-a".to_string(), client)].into()
    });
    c.write_manifest("web.yaml", &with(manifests::State::Terminating));
    // Only web-b would answer if node1 lost its terminating endpoint and
    // fell back to the cluster's; nothing would if it dropped.
    std::thread::sleep(std::time::Duration::from_secs(1));
    c.eventually("node1 still serves its terminating endpoint", || {
        seen_from_outside(&c, node1, 10) == [("web-a".to_string(), client)].into()
    });
    assert_eq!(
        seen_from_outside(&c, at(node_ip(2), NODE_PORT_HTTP), 5),
        [("web-b".to_string(), client)].into(),
        "node2 serves its ready endpoint\n{}",
        c.logs()
    );
}

/// An ExternalName `default/web` (not proxied).
fn external_name_web() -> k8s_openapi::api::core::v1::Service {
    let mut s = manifests::web_service("web", WEB_IP);
    let spec = s.spec.as_mut().expect("a spec");
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("example.com".into());
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    s
}

fn web_slice_of(pods: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    manifests::slice(
        "web-1",
        "web",
        pods.iter().map(|p| pod_endpoint(&lab_pod(p))).collect(),
    )
}

/// Upstream: "should be able to change the type from ExternalName to
/// NodePort": the ExternalName service is not served; changed to NodePort
/// its nodePorts answer on both nodes, and its cluster IP from pods.
#[test]
fn should_be_able_to_change_the_type_from_externalname_to_nodeport() {
    require_root();
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&external_name_web());
        api.apply(&web_slice_of(&["web-a", "web-b"]));
    });
    assert!(c.outside_tcp(at(node_ip(1), NODE_PORT_HTTP)).is_err());
    c.api().apply(&manifests::exposed(
        manifests::web_service("web", WEB_IP),
        &node_port(false),
    ));
    for node in [1u8, 2] {
        c.eventually(&format!("node{node}'s NodePort answers"), || {
            c.outside_tcp(at(node_ip(node), NODE_PORT_HTTP)).is_ok()
                && c.outside_udp(at(node_ip(node), NODE_PORT_DNS)).is_ok()
        });
    }
    assert!(
        c.tcp("client", at(WEB_IP, 80)).backend().is_some(),
        "{}",
        c.logs()
    );
}

/// Upstream: "should be able to change the type from ClusterIP to
/// ExternalName": the cluster IP stops answering at once, and nothing of
/// the service is left in the maps.
#[test]
fn should_be_able_to_change_the_type_from_clusterip_to_externalname() {
    require_root();
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&manifests::web_service("web", WEB_IP));
        api.apply(&web_slice_of(&["web-a", "web-b"]));
    });
    c.eventually("the ClusterIP answers", || {
        c.tcp("client", at(WEB_IP, 80)).backend().is_some()
    });
    c.api().apply(&external_name_web());
    c.eventually_programmed(&Default::default());
    assert!(c.tcp("client", at(WEB_IP, 80)).backend().is_none());
    assert!(c.udp("client", at(WEB_IP, 53)).backend().is_none());
}
/// The `bulk` service's port: the download server of [`bulk`].
const BULK: manifests::Port = manifests::Port {
    name: "bulk",
    protocol: "TCP",
    port: 90,
    target_port: 9000,
};
const BULK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const NODE_PORT_BULK: u16 = 30090;
/// Bytes downloaded: many segments of a full 1500-byte MTU.
const BULK_BYTES: usize = 1 << 20;
/// The MTU of the router's link to the outside network.
const NARROW_MTU: u32 = 1280;

/// Issue 12's path MTU discovery through a NodePort to a local backend
/// (policy Local: no SNAT, conntrack only): the outside network is
/// narrower than the nodes' (the router's link to it), and the client's
/// SYN offers its own link's MSS, so the router cannot forward the
/// backend's full-size segments and answers with fragmentation needed to
/// the NodePort address they left from. The node makes the error about
/// what the backend sent and delivers it to the backend (XDP, the default,
/// passes it to tc), whose socket lowers its MSS: the download completes.
#[test]
fn path_mtu_discovery_works_through_a_node_port_to_a_local_backend() {
    require_root();
    let service = manifests::exposed(
        manifests::service("default", "bulk", BULK_IP, &[BULK]),
        &Exposure {
            type_: Some("NodePort"),
            node_ports: vec![NODE_PORT_BULK],
            local: true,
            ..Default::default()
        },
    );
    let backend = lab_pod("web-a");
    let c = start(manifests::manifest(&service, vec![pod_endpoint(&backend)]));
    let backend_ns = c.lab.pod_ns(&backend.name);
    bulk::serve_downloads(
        &backend_ns,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, BULK.target_port)),
    );
    netns::ip(&[
        "-n",
        &c.lab.router_ns(),
        "link",
        "set",
        "dev",
        "ext0",
        "mtu",
        &NARROW_MTU.to_string(),
    ])
    .expect("narrowing the outside network");
    let to = at(node_ip(backend.node), NODE_PORT_BULK);
    c.eventually("the NodePort answers from outside", || {
        c.outside(move || bulk::download(to, 1))
            .is_ok_and(|n| n == 1)
    });

    let got = c.outside(move || bulk::download(to, BULK_BYTES));

    assert_eq!(
        got.as_ref().ok(),
        Some(&BULK_BYTES),
        "download: {got:?}\n{}",
        c.logs()
    );
    assert_eq!(
        bulk::learnt_mtu(&backend_ns, OUTSIDE_CLIENT_IP.into()),
        Some(NARROW_MTU),
        "the backend learnt the narrow link's MTU"
    );
}
