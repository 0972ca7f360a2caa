//! Traffic from outside the cluster over IPv6: an IPv6 client beyond the
//! lab's router reaches a NodePort on each node's IPv6 address (dual-stack
//! lab, `LabSpec::ipv6`). The agents run their default external datapath
//! (XDP), which serves IPv6 as it does IPv4.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use dataplane_lab::{
    manifests::{self, pod_endpoint_of, Exposure},
    topology::{node_ip6, OUTSIDE_CLIENT_IP6},
    traffic::TCP_PORT,
    CrossNode, Topology,
};
use integration_tests::{bulk, lab_pod, require_root, Cluster, Seen, WEB_IP};

const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
/// The web service's IPv6 cluster IP.
const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The dual-stack `web` NodePort service (policy Cluster) on web-a (node
/// 1), web-b and web-c (node 2).
fn web_node_port() -> String {
    integration_tests::dual_stack_web_node_port(
        [NODE_PORT_HTTP, NODE_PORT_DNS],
        &["web-a", "web-b", "web-c"],
    )
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
}

/// Packets the node's uplink delivers to the stack (its packet taps, which
/// see a frame after XDP and before tc), captured by `tcpdump` in the
/// node's namespace while `traffic` runs: one line per TCP packet to the
/// NodePort or to the backends' port.
fn tapped_on_uplink(c: &Cluster, node: u8, traffic: impl FnOnce()) -> Vec<String> {
    use std::io::{BufRead, BufReader, Read};
    let mut tcpdump = std::process::Command::new("ip")
        .args(["netns", "exec", &c.lab.node_ns(node)])
        .args([
            "tcpdump",
            "-i",
            "eth0",
            "-nn",
            "-l",
            "--immediate-mode",
            "-Q",
            "in",
        ])
        .arg(format!(
            "ip6 and tcp and (dst port {NODE_PORT_HTTP} or dst port {TCP_PORT})"
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running tcpdump");
    // It says so on stderr once the capture is on.
    let mut stderr = BufReader::new(tcpdump.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        let read = stderr.read_line(&mut line).expect("tcpdump stderr");
        assert!(read > 0, "tcpdump ended: {line}");
    }
    traffic();
    std::thread::sleep(std::time::Duration::from_millis(500));
    tcpdump.kill().expect("stopping tcpdump");
    let _ = tcpdump.wait();
    let mut out = String::new();
    tcpdump
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("tcpdump output");
    out.lines().map(str::to_owned).collect()
}

/// The XDP program serves IPv6 itself: on node 1's uplink the stack never
/// sees a packet to the NodePort (XDP DNATs those for the local backend
/// before the stack, and sends those for node 2's backends straight back
/// out), only the DNATed ones to the local backend. Were IPv6 passed on to
/// tc, the taps would see every packet to the NodePort as it arrived.
#[test]
fn ipv6_node_port_from_outside_is_served_by_xdp_before_the_stack_sees_it() {
    require_root();
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web_node_port())],
    );
    let to = SocketAddr::new(node_ip6(1).into(), NODE_PORT_HTTP);
    let all: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("IPv6 NodePort on node1 reaches all backends", || {
        let seen = seen_from_outside(&c, to, 30);
        seen.iter().map(|(b, _)| b.clone()).collect::<BTreeSet<_>>() == all
    });
    let new_flows = c.counter(1, "new_flow");

    let mut seen = BTreeSet::new();
    let tapped = tapped_on_uplink(&c, 1, || {
        seen = seen_from_outside(&c, to, 30);
    });

    let backends: BTreeSet<&str> = seen.iter().map(|(b, _)| b.as_str()).collect();
    assert!(
        backends.contains("web-a") && backends.len() >= 2,
        "both nodes' backends answer: {seen:?}"
    );
    let to_node_port = format!(".{NODE_PORT_HTTP}: ");
    let to_backend = format!(".{TCP_PORT}: ");
    assert!(
        !tapped.iter().any(|l| l.contains(&to_node_port)),
        "the stack saw packets to the NodePort: XDP passed them on\n{}",
        tapped.join("\n")
    );
    assert!(
        tapped.iter().any(|l| l.contains(&to_backend)),
        "the taps see the local backend's flows, DNATed by XDP\n{}",
        tapped.join("\n")
    );
    assert!(c.counter(1, "new_flow") > new_flows);
    assert!(
        c.agent_log(1).contains("XDP attached"),
        "{}",
        c.agent_log(1)
    );
}

// The tests below run the tc external datapath (`--external-datapath tc`).

const HEALTH_PORT: u16 = 32000;
/// Load-balancer and external IPv6 addresses, routed by the router to both
/// nodes ([`Cluster::route_to_nodes6`]).
const LB_CIDR6: &str = "2001:db8:100::/64";
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20);

fn at6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The dual-stack `web` service on `pods` (both families' endpoints),
/// exposed as `exposure` says, with IPv6 `load_balancer_ips` and
/// `external_ips` (`Exposure` holds IPv4 ones only).
fn web6_exposed(
    pods: &[&str],
    exposure: &Exposure,
    load_balancer_ips: &[Ipv6Addr],
    external_ips: &[Ipv6Addr],
) -> String {
    let mut service = manifests::exposed(
        manifests::with_cluster_ips(
            manifests::web_service("web", WEB_IP),
            &[WEB_IP.into(), WEB_IP6.into()],
        ),
        exposure,
    );
    if !external_ips.is_empty() {
        let spec = service.spec.get_or_insert_with(Default::default);
        spec.external_ips = Some(external_ips.iter().map(ToString::to_string).collect());
    }
    if !load_balancer_ips.is_empty() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    load_balancer_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
    }
    manifests::manifest_per_family(&service, |family| {
        pods.iter()
            .map(|p| pod_endpoint_of(&lab_pod(p), family))
            .collect()
    })
}

fn node_port6(local: bool) -> Exposure {
    Exposure {
        type_: Some("NodePort"),
        node_ports: vec![NODE_PORT_HTTP, NODE_PORT_DNS],
        local,
        ..Default::default()
    }
}

/// A dual-stack lab whose agents run the tc external datapath, with the
/// IPv6 load-balancer prefix routed to the nodes.
fn start_tc6(manifest: String) -> Cluster {
    let c = Cluster::start_dual_with(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
        &["--external-datapath", "tc"],
        |_| {},
    );
    c.route_to_nodes6(LB_CIDR6);
    c
}

/// Backends answering `n` connections from outside to `to`.
fn backends_from_outside(c: &Cluster, to: SocketAddr, n: usize) -> BTreeSet<String> {
    seen_from_outside(c, to, n)
        .into_iter()
        .map(|(b, _)| b)
        .collect()
}

/// `status.loadBalancer.ingress[].ip` and `spec.externalIPs` of IPv6 are
/// served from outside on the service port, by the backends of both nodes,
/// and answers come from the address the client asked.
#[test]
fn ipv6_load_balancer_ip_and_external_ip_are_served_from_outside() {
    require_root();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        ..node_port6(false)
    };
    let c = start_tc6(web6_exposed(
        &["web-a", "web-b"],
        &exposure,
        &[LB_IP6],
        &[EXTERNAL_IP6],
    ));
    let all: BTreeSet<String> = ["web-a", "web-b"].map(String::from).into();
    for ip in [LB_IP6, EXTERNAL_IP6] {
        c.eventually(&format!("{ip} reaches both backends from outside"), || {
            backends_from_outside(&c, at6(ip, 80), 30) == all
        });
        let answer = c
            .outside_tcp(at6(ip, 80))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", c.logs()));
        assert_eq!(answer.from, at6(ip, 80), "reply from the frontend");
    }
}

/// `externalTrafficPolicy: Local` over IPv6: node 1 serves its local
/// endpoint with the outside client's IPv6 address preserved; node 2, with
/// no local endpoint, drops the connection (counted); the health check
/// node port says 200 with one local endpoint on node 1 and 503 on node 2,
/// asked over IPv6 as over IPv4.
#[test]
fn ipv6_external_traffic_policy_local_keeps_the_client_address_and_health_checks_answer_over_both_families(
) {
    require_root();
    let exposure = Exposure {
        type_: Some("LoadBalancer"),
        health_check_node_port: Some(HEALTH_PORT),
        ..node_port6(true)
    };
    let c = start_tc6(web6_exposed(&["web-a"], &exposure, &[], &[]));
    let client = IpAddr::V6(OUTSIDE_CLIENT_IP6);
    let want: BTreeSet<(String, IpAddr)> = [("web-a".to_string(), client)].into();
    c.eventually(
        "node1 serves its local endpoint with the client's IPv6 address",
        || seen_from_outside(&c, at6(node_ip6(1), NODE_PORT_HTTP), 5) == want,
    );
    let on_node2 = c.outside_tcp(at6(node_ip6(2), NODE_PORT_HTTP));
    assert!(on_node2.is_err(), "node2 answered: {on_node2:?}");
    assert!(
        c.counter(2, "drop_no_local_endpoints") >= 1,
        "the drop is counted"
    );
    let node_addrs: [(u8, IpAddr, IpAddr); 2] = [1, 2].map(|n| {
        (
            n,
            IpAddr::V6(node_ip6(n)),
            IpAddr::V4(dataplane_lab::topology::node_ip(n)),
        )
    });
    for (node, ip6, ip4) in node_addrs {
        for ip in [ip6, ip4] {
            let (status, body) = c
                .outside_http_get(SocketAddr::new(ip, HEALTH_PORT))
                .unwrap_or_else(|| panic!("no health check answer on {ip}\n{}", c.logs()));
            if node == 1 {
                assert_eq!(status, 200, "{ip}: {body}");
                let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
                assert_eq!(body["service"]["name"], "web");
                assert_eq!(body["localEndpoints"], 1, "{ip}");
            } else {
                assert_eq!(status, 503, "{ip}: {body}");
            }
        }
    }
}

/// UDP through an IPv6 NodePort from outside: every backend of both nodes
/// answers, and each answer comes from the NodePort.
#[test]
fn udp_through_an_ipv6_node_port_reaches_the_backends_of_both_nodes() {
    require_root();
    let c = start_tc6(web6_exposed(
        &["web-a", "web-b", "web-c"],
        &node_port6(false),
        &[],
        &[],
    ));
    let all: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    for node in [1u8, 2] {
        let to = at6(node_ip6(node), NODE_PORT_DNS);
        c.eventually(&format!("UDP to node{node}'s IPv6 NodePort"), || {
            (0..30)
                .filter_map(|_| c.outside_udp(to).ok())
                .map(|s| s.backend)
                .collect::<BTreeSet<_>>()
                == all
        });
        let answer = c
            .outside_udp(to)
            .unwrap_or_else(|e| panic!("UDP: {e:?}\n{}", c.logs()));
        assert_eq!(answer.from, to, "UDP reply from the NodePort");
    }
}

/// `loadBalancerSourceRanges` with an IPv6 CIDR: IPv6 clients outside it
/// are dropped at the load-balancer IP (counted), the NodePort stays open
/// to them (kube-proxy filters the load-balancer IP only), and the client
/// is let in once its network is listed.
#[test]
fn ipv6_load_balancer_source_ranges_drop_other_clients() {
    require_root();
    let mut exposure = Exposure {
        type_: Some("LoadBalancer"),
        source_ranges: vec!["2001:db8:ffff::/48".into()],
        ..node_port6(false)
    };
    let c = start_tc6(web6_exposed(&["web-a", "web-b"], &exposure, &[LB_IP6], &[]));
    c.eventually("the IPv6 NodePort answers", || {
        c.outside_tcp(at6(node_ip6(1), NODE_PORT_HTTP)).is_ok()
    });
    let outside_ranges = c.outside_tcp(at6(LB_IP6, 80));
    assert!(outside_ranges.is_err(), "answered: {outside_ranges:?}");
    assert!(
        c.counter(1, "drop_source_range") + c.counter(2, "drop_source_range") >= 1,
        "the drop is counted"
    );
    exposure.source_ranges = vec!["2001:db8:113::/64".into()];
    c.write_manifest(
        "web.yaml",
        &web6_exposed(&["web-a", "web-b"], &exposure, &[LB_IP6], &[]),
    );
    c.eventually("the client's IPv6 range is let in", || {
        c.outside_tcp(at6(LB_IP6, 80)).is_ok()
    });
}

/// An address outside the router's view of the nodes' network, given to
/// node 1's uplink and routed there by the router.
const OTHER_NODE1_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);

/// `--nodeport-addresses` with an IPv6 CIDR: the IPv6 NodePort is served
/// on node 1's IPv6 address inside it and not on its other IPv6 address
/// (reachable: a listener of the node answers there), and the IPv4 NodePort, with no
/// IPv4 CIDR given, stays on the uplink's IPv4 address (kube-proxy filters
/// each family by its own CIDRs).
#[test]
fn ipv6_node_port_is_served_only_on_the_ipv6_addresses_in_nodeport_addresses() {
    require_root();
    let c = Cluster::start_dual_with(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web6_exposed(&["web-a"], &node_port6(false), &[], &[]),
        )],
        &[
            "--external-datapath",
            "tc",
            "--nodeport-addresses",
            "fd00:192:168:100::/64",
        ],
        |lab| {
            let other = format!("{OTHER_NODE1_IP6}/64");
            let node1 = node_ip6(1).to_string();
            for args in [
                &[
                    "-n",
                    &lab.node_ns(1),
                    "-6",
                    "addr",
                    "add",
                    &other,
                    "dev",
                    "eth0",
                    "nodad",
                ][..],
                &[
                    "-n",
                    &lab.router_ns(),
                    "-6",
                    "route",
                    "add",
                    "2001:db8:200::/64",
                    "via",
                    &node1,
                ],
            ] {
                dataplane_lab::netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
            }
        },
    );
    c.eventually("the IPv6 NodePort answers inside the CIDR", || {
        c.outside_tcp(at6(node_ip6(1), NODE_PORT_HTTP)).is_ok()
    });
    // The other address is reachable from outside: a listener of node 1
    // on another port answers there.
    let listener = dataplane_lab::netns::in_netns(&c.lab.node_ns(1), || {
        std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 9999))
    })
    .expect("thread in node 1")
    .expect("a listener on node 1");
    let reachable = c.outside(|| {
        std::net::TcpStream::connect_timeout(
            &at6(OTHER_NODE1_IP6, 9999),
            std::time::Duration::from_secs(2),
        )
        .is_ok()
    });
    assert!(reachable, "node 1's other IPv6 address is reachable");
    drop(listener);
    let other = c.outside_tcp(at6(OTHER_NODE1_IP6, NODE_PORT_HTTP));
    assert!(other.is_err(), "served outside the CIDR: {other:?}");
    let ipv4 = SocketAddr::from((dataplane_lab::topology::node_ip(1), NODE_PORT_HTTP));
    c.eventually("the IPv4 NodePort keeps the uplink's address", || {
        c.outside_tcp(ipv4).is_ok()
    });
}

/// A node whose only default route is IPv6 (an IPv6-only node): the
/// interface holding it is an uplink (the agent attaches the external
/// datapath to it, and pins the tcx link), and the IPv6 NodePort is
/// served through it.
#[test]
fn an_ipv6_default_route_alone_makes_the_interface_an_uplink() {
    require_root();
    let c = Cluster::start_dual_with(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web6_exposed(&["web-a"], &node_port6(false), &[], &[]),
        )],
        &["--external-datapath", "tc"],
        |lab| {
            dataplane_lab::netns::ip(&["-n", &lab.node_ns(1), "-4", "route", "del", "default"])
                .expect("removing node 1's IPv4 default route");
        },
    );
    let log = c.agent_log(1);
    assert!(
        log.contains("attached the external datapath to uplink eth0"),
        "{log}"
    );
    // The kernel's side: the tcx link on eth0's ingress (`from_outside`), pinned by
    // the agent (bpftool 7.1 does not list tcx links).
    let eth0 = dataplane_lab::netns::output(
        "ip",
        &["-n", &c.lab.node_ns(1), "-o", "link", "show", "eth0"],
    )
    .expect("node 1's eth0");
    let eth0 = eth0.split(':').next().unwrap_or_default().trim();
    let links = c.pinned_links(1);
    assert!(
        links.contains(&format!("{eth0}-uplink-ingress")),
        "pinned links of node 1: {links:?}"
    );
    c.eventually("the IPv6 NodePort answers through the uplink", || {
        c.outside_tcp(at6(node_ip6(1), NODE_PORT_HTTP))
            .is_ok_and(|s| s.backend == "web-a")
    });
}

/// A node whose only default routes are in a policy routing table (table
/// 100, looked up after `main` by an `ip rule`), none in `main`: the
/// interface holding them is an uplink all the same, and the IPv6 NodePort
/// is served through it (the backend's replies take that table back to
/// the router).
#[test]
fn a_default_route_in_a_policy_routing_table_makes_the_interface_an_uplink() {
    require_root();
    let c = Cluster::start_dual_with(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web6_exposed(&["web-a"], &node_port6(false), &[], &[]),
        )],
        &["--external-datapath", "tc"],
        |lab| {
            let ns = lab.node_ns(1);
            let gateway = dataplane_lab::topology::ROUTER_NODE_IP6.to_string();
            for args in [
                &["-n", &ns, "-4", "route", "del", "default"][..],
                &["-n", &ns, "-6", "route", "del", "default"],
                &[
                    "-n", &ns, "-6", "route", "add", "default", "via", &gateway, "table", "100",
                ],
                &[
                    "-n", &ns, "-6", "rule", "add", "lookup", "100", "priority", "40000",
                ],
            ] {
                dataplane_lab::netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
            }
        },
    );
    let log = c.agent_log(1);
    assert!(
        log.contains("attached the external datapath to uplink eth0"),
        "{log}"
    );
    c.eventually("the IPv6 NodePort answers through the uplink", || {
        c.outside_tcp(at6(node_ip6(1), NODE_PORT_HTTP))
            .is_ok_and(|s| s.backend == "web-a")
    });
}

/// The `bulk` service's port: the download server of [`bulk`].
const BULK: manifests::Port = manifests::Port {
    name: "bulk",
    protocol: "TCP",
    port: 90,
    target_port: 9000,
};
/// The `bulk` service's cluster IPs (dual-stack).
const BULK_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 30);
const BULK_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x30);
const NODE_PORT_BULK: u16 = 30090;
/// Bytes downloaded: many segments of a full 1500-byte MTU.
const BULK_BYTES: usize = 1 << 20;
/// The MTU of the router's link to the outside network: IPv6's minimum.
const NARROW_MTU: u32 = 1280;

/// Issue 15's path MTU discovery through an IPv6 NodePort to a local
/// backend (policy Local: no SNAT, conntrack only): the router's link to
/// the outside network is narrower than the nodes', so the router
/// answers the backend's full-size segments with a Packet Too Big to the
/// NodePort address they left from (IPv6 routers never fragment). The
/// node makes it about what the backend sent and delivers it to the
/// backend (XDP, the default, passes it to tc), whose socket lowers its
/// MSS: the download completes.
#[test]
fn ipv6_path_mtu_discovery_works_through_a_node_port_to_a_local_backend() {
    require_root();
    let service = manifests::exposed(
        manifests::with_cluster_ips(
            manifests::service("default", "bulk", BULK_IP, &[BULK]),
            &[BULK_IP.into(), BULK_IP6.into()],
        ),
        &Exposure {
            type_: Some("NodePort"),
            node_ports: vec![NODE_PORT_BULK],
            local: true,
            ..Default::default()
        },
    );
    let backend = lab_pod("web-a");
    let manifest =
        manifests::manifest_per_family(&service, |family| vec![pod_endpoint_of(&backend, family)]);
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("bulk.yaml", manifest)],
    );
    let backend_ns = c.lab.pod_ns(&backend.name);
    bulk::serve_downloads(
        &backend_ns,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), BULK.target_port),
    );
    dataplane_lab::netns::ip(&[
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
    let to = at6(node_ip6(backend.node), NODE_PORT_BULK);
    c.eventually("the IPv6 NodePort answers from outside", || {
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
        bulk::learnt_mtu(&backend_ns, OUTSIDE_CLIENT_IP6.into()),
        Some(NARROW_MTU),
        "the backend learnt the narrow link's MTU"
    );
}

/// `pods_reach_a_node_port_of_another_node_with_a_local_backend_across_a_vxlan_overlay`
/// over IPv6: a pod of node 1 connects to node 2's IPv6 address on a
/// NodePort whose only backend is on node 2, the nodes joined by a VXLAN
/// overlay. The backend's reply goes back to the pod over the overlay, not
/// out of the uplink where `to_outside` would see it, and is translated all
/// the same as it leaves the backend: the pod sees the NodePort answer.
#[test]
fn pods_reach_an_ipv6_node_port_of_another_node_with_a_local_backend_across_a_vxlan_overlay() {
    require_root();
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Vxlan,
        &[(
            "web.yaml",
            integration_tests::dual_stack_web_node_port(
                [NODE_PORT_HTTP, NODE_PORT_DNS],
                &["web-b"],
            ),
        )],
    );
    assert_eq!(lab_pod("client").node, 1);
    assert_eq!(lab_pod("web-b").node, 2);
    let to = SocketAddr::new(IpAddr::V6(node_ip6(2)), NODE_PORT_HTTP);
    c.eventually(
        "the IPv6 NodePort answers the pod of the other node",
        || c.tcp("client", to).backend() == Some("web-b"),
    );
    match c.tcp("client", to) {
        Seen::Answered { from, .. } => assert_eq!(from, to, "TCP reply from the NodePort"),
        other => panic!("TCP: {other:?}\n{}", c.logs()),
    }
    let dns = SocketAddr::new(IpAddr::V6(node_ip6(2)), NODE_PORT_DNS);
    match c.udp("client", dns) {
        Seen::Answered { from, .. } => assert_eq!(from, dns, "UDP reply from the NodePort"),
        other => panic!("UDP: {other:?}\n{}", c.logs()),
    }
}
