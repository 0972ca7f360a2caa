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
