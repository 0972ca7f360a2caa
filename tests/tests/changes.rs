//! Changes applied while traffic flows: endpoints, bad manifests, new pods.

use dataplane_lab::{manifests, netns, traffic, CrossNode, Lab, PodSpec, Topology};
use integration_tests::{dns, http, lab_pod, require_root, web, Cluster, Seen, WEB_IP};

fn names<const N: usize>(names: [&str; N]) -> std::collections::BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

/// Upstream: "should serve a basic endpoint from pods": the service reaches
/// every endpoint as they come and go, and refuses once none is left.
#[test]
fn should_serve_a_basic_endpoint_from_pods() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[]))],
    );
    assert_eq!(c.tcp("client", http(WEB_IP)), Seen::Refused, "{}", c.logs());
    c.write_manifest("web.yaml", &web(&[&a]));
    c.eventually("web-a answers", || {
        c.tcp_backends("client", http(WEB_IP), 5) == names(["web-a"])
    });
    c.write_manifest("web.yaml", &web(&[&a, &b]));
    c.eventually("web-b answers too", || {
        c.tcp_backends("client", http(WEB_IP), 12) == names(["web-a", "web-b"])
    });
    c.write_manifest("web.yaml", &web(&[&b]));
    c.eventually("only web-b answers", || {
        c.tcp_backends("client", http(WEB_IP), 8) == names(["web-b"])
    });
    c.write_manifest("web.yaml", &web(&[]));
    c.eventually("refused once no endpoint is left", || {
        c.tcp("client", http(WEB_IP)) == Seen::Refused
    });
}

/// Networking Granular Checks: "should update endpoints: http" and "…:
/// udp": an endpoint taken out of the service stops getting traffic of
/// either protocol while the others keep theirs.
#[test]
fn should_update_endpoints_http_and_udp() {
    require_root();
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&a, &b, &cc]))],
    );
    let udp_backends = |n: usize| -> std::collections::BTreeSet<String> {
        (0..n)
            .filter_map(|_| c.udp("client", dns(WEB_IP)).backend().map(str::to_owned))
            .collect()
    };
    let all = names(["web-a", "web-b", "web-c"]);
    c.eventually("every endpoint answers TCP", || {
        c.tcp_backends("client", http(WEB_IP), 30) == all
    });
    c.eventually("every endpoint answers UDP", || udp_backends(30) == all);
    c.write_manifest("web.yaml", &web(&[&a, &cc]));
    let left = names(["web-a", "web-c"]);
    c.eventually("web-b no longer answers TCP", || {
        c.tcp_backends("client", http(WEB_IP), 20) == left
    });
    c.eventually("web-b no longer answers UDP", || udp_backends(20) == left);
}

#[test]
fn removed_endpoint_gets_no_new_connections_and_its_tcp_flow_is_reset() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&a]))],
    );
    // A connection established to web-a while it is the only backend.
    let (conn_tx, conn_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let client = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let mut conn = traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        seen_tx.send(conn.request()).unwrap();
        conn_rx.recv().unwrap();
        conn.request()
    })
    .unwrap();
    assert_eq!(
        seen_rx.recv().unwrap().backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );

    c.write_manifest("web.yaml", &web(&[&b]));
    c.eventually("only web-b answers new connections", || {
        c.tcp_backends("client", http(WEB_IP), 10) == ["web-b".to_string()].into()
    });
    conn_tx.send(()).unwrap();
    assert_eq!(
        client.join().unwrap(),
        Seen::Reset,
        "the flow to the removed backend is reset\n{}",
        c.logs()
    );
}

/// Upstream: "should be able to preserve UDP traffic when server pod cycles
/// for a ClusterIP service": the flow's backend is removed, a new one comes,
/// and the same socket reaches it (no black hole).
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-c"));
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&a]))],
    );
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let flow = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let conn = traffic::UdpConn::open(dns(WEB_IP)).expect("udp socket");
        first_tx.send(conn.request()).unwrap();
        go_rx.recv().unwrap();
        // Same socket, same 5-tuple: at most a few tries while the change lands.
        (0..20)
            .map(|_| conn.request())
            .find(|o| o.backend() == Some("web-c"))
    })
    .unwrap();
    assert_eq!(
        first_rx.recv().unwrap().backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    c.write_manifest("web.yaml", &web(&[&b]));
    c.eventually("new flows reach web-c", || {
        c.udp("client", dns(WEB_IP)).backend() == Some("web-c")
    });
    go_tx.send(()).unwrap();
    assert!(
        flow.join().unwrap().is_some(),
        "the existing UDP flow moved to web-c\n{}",
        c.logs()
    );
}

#[test]
fn bad_manifests_are_reported_by_file_and_the_rest_keeps_serving() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&lab_pod("web-a")]))],
    );
    c.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n",
    );
    c.write_manifest(
        "badip.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: badip}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
    );
    let other = std::net::Ipv4Addr::new(10, 96, 0, 11);
    c.write_manifest(
        "other.yaml",
        &dataplane_lab::manifests::web_manifest("other", other, &[&lab_pod("web-b")]),
    );
    c.eventually("both bad files are named in the log", || {
        let log = c.agent_log(1);
        log.contains("broken.yaml") && log.contains("badip.yaml") && log.contains("10.96.0.300")
    });
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );
    c.eventually("a service added beside the bad files works", || {
        c.tcp("client", http(other)).backend() == Some("web-b")
    });
}

#[test]
fn pod_created_after_start_gets_service_traffic() {
    require_root();
    let backends = [lab_pod("web-a"), lab_pod("web-b")];
    let mut c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    );
    c.add_pod(PodSpec::new("late", 2, 20));
    c.eventually("the new pod reaches the service with replies from the service IP", || {
        matches!(c.tcp("late", http(WEB_IP)), Seen::Answered { from, .. } if from == http(WEB_IP))
    });
}

/// A new pod's veth joins its node's `cbr0`. Had the bridge taken the
/// lowest MAC of its ports, this one's (the lowest there is) would become
/// the gateway's MAC under the older pods' cached neighbour entries.
#[test]
fn pod_created_later_leaves_the_gateway_mac_and_older_pods_service_traffic_alone() {
    require_root();
    // Backends on node2: the client's service traffic is routed through its
    // gateway, node1's cbr0.
    let backends = [lab_pod("web-b"), lab_pod("web-c")];
    let mut c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    );
    assert!(
        c.tcp("client", http(WEB_IP)).backend().is_some(),
        "{}",
        c.logs()
    );
    let gateway = netns::mac(&c.lab.node_ns(1), "cbr0").expect("cbr0's MAC");

    let late = PodSpec::new("late", 1, 20);
    c.add_pod(late.clone());
    netns::set_mac(
        &c.lab.node_ns(1),
        &Lab::host_iface(&late),
        "02:00:00:00:00:01",
    )
    .expect("setting the new veth's MAC");

    assert_eq!(
        netns::mac(&c.lab.node_ns(1), "cbr0").expect("cbr0's MAC"),
        gateway,
        "the gateway's MAC changed when a pod was added"
    );
    // At once, not after the client's neighbour entry expired.
    for _ in 0..4 {
        assert!(
            c.tcp("client", http(WEB_IP)).backend().is_some(),
            "the older pod lost the service after a pod was added\n{}",
            c.logs()
        );
        assert!(
            c.udp("client", dns(WEB_IP)).backend().is_some(),
            "{}",
            c.logs()
        );
    }
}

#[test]
fn sigterm_leaves_the_datapath_running_and_cleanup_removes_it() {
    require_root();
    let mut c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[&lab_pod("web-a")]))],
    );
    assert!(
        c.tcp("client", http(WEB_IP)).backend().is_some(),
        "{}",
        c.logs()
    );
    for status in c.stop_agents() {
        assert!(
            status.is_some_and(|s| s.success()),
            "agent exit status {status:?}"
        );
    }
    // As kube-proxy's rules outlive kube-proxy: the service still works.
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-a"),
        "service traffic with the agents stopped\n{}",
        c.logs()
    );
    assert!(
        !c.pinned_links(1).is_empty(),
        "the links stay pinned after the agent exits"
    );

    for node in [1u8, 2] {
        c.cleanup(node);
        assert_eq!(c.pinned_links(node), Vec::<String>::new());
    }
    // The kernel releases an unpinned link after an RCU grace period.
    c.eventually(
        "after cleanup the service IP is no longer translated",
        || c.tcp("client", http(WEB_IP)).backend().is_none(),
    );
}

#[test]
fn open_tcp_connection_survives_an_agent_restart() {
    require_root();
    let mut c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web(&[&lab_pod("web-a"), &lab_pod("web-b"), &lab_pod("web-c")]),
        )],
    );
    let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let client = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let mut conn = traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        // Before, while no agent runs, and after the new agents took over.
        for _ in 0..3 {
            seen_tx.send(conn.request()).unwrap();
            if step_rx.recv().is_err() {
                break;
            }
        }
    })
    .unwrap();
    let before = seen_rx.recv().unwrap();
    let backend = before.backend().map(str::to_owned);
    assert!(backend.is_some(), "{before:?}\n{}", c.logs());

    for status in c.stop_agents() {
        assert!(status.is_some_and(|s| s.success()), "agent exit {status:?}");
    }
    step_tx.send(()).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap().backend().map(str::to_owned),
        backend,
        "the open connection while no agent runs\n{}",
        c.logs()
    );

    c.restart_agents();
    step_tx.send(()).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap().backend().map(str::to_owned),
        backend,
        "the open connection after the new agents took over\n{}",
        c.logs()
    );
    drop(step_tx);
    client.join().unwrap();

    let log = c.agent_log(1);
    assert!(
        log.contains("switched the link a previous agent pinned"),
        "the new agent switched the links over in one step: {log}"
    );
    assert!(
        c.tcp("client", http(WEB_IP)).backend().is_some(),
        "new connections after the restart\n{}",
        c.logs()
    );
}

/// Upgrading from the previous release (maps of layout 4): open TCP and
/// UDP flows keep their backends while this build's agents migrate the maps
/// and switch the programs. Needs that release's agent binary in
/// `DATAPLANE_PREVIOUS_AGENT_BIN` (`cargo xtask test` builds it from the
/// last commit of layout 4).
#[test]
fn open_connections_survive_an_upgrade_from_the_previous_release() {
    require_root();
    let previous = std::env::var_os("DATAPLANE_PREVIOUS_AGENT_BIN").expect(
        "DATAPLANE_PREVIOUS_AGENT_BIN: the previous release's agent (`cargo xtask test` builds it)",
    );
    let mut c = Cluster::start_with_agent_bin(
        previous.into(),
        Topology::Bridge,
        CrossNode::Direct,
        &[(
            "web.yaml",
            web(&[&lab_pod("web-a"), &lab_pod("web-b"), &lab_pod("web-c")]),
        )],
    );
    let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let client = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let mut tcp = traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        let udp = traffic::UdpConn::open(dns(WEB_IP)).expect("UDP socket");
        // Before and after the upgrade.
        for _ in 0..2 {
            seen_tx.send((tcp.request(), udp.request())).unwrap();
            if step_rx.recv().is_err() {
                break;
            }
        }
    })
    .unwrap();
    let (tcp_before, udp_before) = seen_rx.recv().unwrap();
    assert!(
        tcp_before.backend().is_some() && udp_before.backend().is_some(),
        "{tcp_before:?} {udp_before:?}\n{}",
        c.logs()
    );

    c.upgrade_agents();
    step_tx.send(()).unwrap();
    let (tcp_after, udp_after) = seen_rx.recv().unwrap();
    drop(step_tx);
    client.join().unwrap();

    assert_eq!(
        tcp_after.backend(),
        tcp_before.backend(),
        "the TCP connection after the upgrade\n{}",
        c.logs()
    );
    assert_eq!(
        udp_after.backend(),
        udp_before.backend(),
        "the UDP flow after the upgrade\n{}",
        c.logs()
    );
    let log = c.agent_log(1);
    // The previous release (xtask's previous_release COMMIT) is the last
    // commit of layout 7; move this with the next layout bump.
    assert!(
        log.contains("migrated from layout Some(7)"),
        "the new agent migrated the maps from layout 7: {log}"
    );
    assert!(
        c.tcp("client", http(WEB_IP)).backend().is_some(),
        "new connections after the upgrade\n{}",
        c.logs()
    );
}

/// Upstream: "should be able to preserve UDP traffic when initial unready
/// endpoints get ready": a UDP socket that started sending while the only
/// endpoint was not ready (refused, nothing tracked) reaches the endpoint
/// once it is ready, on the same 5-tuple.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    require_root();
    let pod = lab_pod("web-a");
    let with_state = |state| {
        manifests::manifest(
            &manifests::web_service("web", WEB_IP),
            vec![manifests::endpoint(
                pod.ip(),
                Some(&format!("node{}", pod.node)),
                state,
            )],
        )
    };
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", with_state(manifests::State::NotReady))],
    );
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let flow = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let conn = traffic::UdpConn::open(dns(WEB_IP)).expect("udp socket");
        first_tx.send(conn.request()).unwrap();
        go_rx.recv().unwrap();
        (0..20)
            .map(|_| conn.request())
            .find(|o| o.backend().is_some())
    })
    .unwrap();
    assert_eq!(first_rx.recv().unwrap(), Seen::Refused, "{}", c.logs());

    c.write_manifest("web.yaml", &with_state(manifests::State::Ready));
    c.eventually("new flows reach web-a", || {
        c.udp("client", dns(WEB_IP)).backend() == Some("web-a")
    });
    go_tx.send(()).unwrap();

    assert_eq!(
        flow.join().unwrap().as_ref().and_then(|o| o.backend()),
        Some("web-a"),
        "the socket that was refused reaches the ready endpoint\n{}",
        c.logs()
    );
}
