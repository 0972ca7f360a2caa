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
use integration_tests::{
    bulk, lab_pod, require_root, sockclient_command, sockclient_outcomes, Cluster, Seen as Outcome,
    WEB_IP,
};

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

#[test]
fn session_affinity_holds_through_a_node_port() {
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

/// A host-network process of node 1 connecting to node 1's own address on
/// the NodePort: the socket hooks translate it at connect() (its packets
/// cross no program of the packet path: they stay on `lo`), and the
/// process sees the NodePort as its peer.
#[test]
fn node_processes_reach_a_node_port_on_their_own_node_address() {
    require_root();
    let c = start(web_exposed(&["web-a", "web-b", "web-c"], &node_port(false)));
    let to = at(node_ip(1), NODE_PORT_HTTP);
    // 40 connections: with 20, one of three backends went unpicked by
    // chance ((2/3)^20 ≈ 3e-4) in a CI run; (2/3)^40 ≈ 1e-7.
    let seen = sockclient_outcomes(sockclient_command(
        &c.lab.node_ns(1),
        &c.lab.node_cgroup(1),
        &["tcp", &to.to_string(), "40"],
    ));
    let backends: BTreeSet<&str> = seen.iter().filter_map(|s| s.backend()).collect();
    assert_eq!(
        backends,
        BTreeSet::from(["web-a", "web-b", "web-c"]),
        "{seen:?}\n{}",
        c.logs()
    );
    assert!(
        seen.iter()
            .all(|s| matches!(s, Outcome::Answered { from, .. } if *from == to)),
        "{seen:?}"
    );
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
