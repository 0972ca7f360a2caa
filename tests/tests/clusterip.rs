//! ClusterIP routing on the talk's topology: bridges, direct routes.

use dataplane_lab::{CrossNode, Topology};
use integration_tests::{dns, http, lab_pod, privileged, web, Cluster, Seen, WEB_IP};

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
    if !privileged() {
        return;
    }
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

#[test]
fn replies_come_from_the_service_ip_and_port() {
    if !privileged() {
        return;
    }
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
    if !privileged() {
        return;
    }
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
    if !privileged() {
        return;
    }
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

#[test]
fn pod_reaching_itself_through_the_service_gets_its_answer() {
    if !privileged() {
        return;
    }
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
    if !privileged() {
        return;
    }
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
