//! Socket-level load balancing on IPv6, on a dual-stack lab: host-network
//! processes of a node reach IPv6 cluster IPs through the `connect6`,
//! `sendmsg6`, `recvmsg6` and `getpeername6` hooks, and an AF_INET6 socket
//! reaches an IPv4 service by its IPv4-mapped address. Clients are
//! `sockclient` processes in the node's netns and cgroup, as in
//! `socket_lb.rs`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::Command,
};

use dataplane_lab::{
    agent::agent_bin,
    manifests::{self, pod_endpoint_of},
    CrossNode, PodSpec, Topology,
};
use integration_tests::{
    assert_socket_to_removed_backend_closed, http, lab_pod, require_root, sockclient_command,
    sockclient_outcomes, Cluster, HeldClient, Seen, WEB_IP,
};

/// The web service's IPv6 cluster IP.
const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

fn http6() -> SocketAddr {
    SocketAddr::new(WEB_IP6.into(), 80)
}

fn dns6() -> SocketAddr {
    SocketAddr::new(WEB_IP6.into(), 53)
}

/// `[::ffff:10.96.0.10]:port`: the IPv4 cluster IP as a dual-stack
/// application's AF_INET6 socket names it.
fn mapped(port: u16) -> SocketAddr {
    SocketAddr::new(WEB_IP.to_ipv6_mapped().into(), port)
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

/// web-a is on node 1, web-b and web-c on node 2.
fn all_web() -> Vec<PodSpec> {
    ["web-a", "web-b", "web-c"].map(lab_pod).to_vec()
}

fn cluster(manifest: String) -> Cluster {
    Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
    )
}

/// `n` requests of a host-network process of node 1.
fn from_node(c: &Cluster, mode: &str, to: SocketAddr, n: usize) -> Vec<Seen> {
    sockclient_outcomes(sockclient_command(
        &c.lab.node_ns(1),
        &c.lab.node_cgroup(1),
        &[mode, &to.to_string(), &n.to_string()],
    ))
}

fn backends(seen: &[Seen]) -> BTreeSet<String> {
    seen.iter()
        .filter_map(|s| s.backend().map(str::to_owned))
        .collect()
}

/// A datapath counter of node 1, from `inspect counters`.
fn counter(c: &Cluster, name: &str) -> u64 {
    let out = Command::new(agent_bin())
        .args(["inspect", "counters", "-o", "json", "--bpffs"])
        .arg(c.bpffs(1))
        .output()
        .expect("running inspect");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect's JSON");
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["counter"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name}"))
}

const TRANSLATED: [&str; 4] = [
    "sock_connect_translated",
    "sock_sendmsg_translated",
    "sock_recvmsg_translated",
    "sock_getpeername_translated",
];

fn translations(c: &Cluster) -> [u64; 4] {
    TRANSLATED.map(|name| counter(c, name))
}

/// Each of the socket hooks' translation counters grew by at least `more`.
fn assert_translated_at_least(c: &Cluster, before: [u64; 4], more: [u64; 4]) {
    let after = translations(c);
    for (((name, before), after), more) in TRANSLATED.iter().zip(before).zip(after).zip(more) {
        assert!(
            after >= before + more,
            "{name}: {before} -> {after}, want at least {more} more"
        );
    }
}

/// Every request answered, by all of `want`, each answer from `to`.
fn assert_served(c: &Cluster, what: &str, seen: &[Seen], to: SocketAddr, want: &BTreeSet<String>) {
    for s in seen {
        match s {
            // getpeername() (TCP) and recvfrom() (UDP) both.
            Seen::Answered { from, .. } => assert_eq!(*from, to, "{what}: reply source"),
            other => panic!("{what}: {other:?}\n{}", c.logs()),
        }
    }
    assert_eq!(&backends(seen), want, "{what}: {seen:?}\n{}", c.logs());
}

/// "should function for node-Service: http / udp", over IPv6: TCP,
/// connected and unconnected UDP from the node reach the backends on both
/// nodes, translated at the socket; getpeername() and recvfrom() show the
/// service address.
#[test]
fn should_function_for_node_service_http_and_udp_over_ipv6() {
    require_root();
    let c = cluster(web_of(&[WEB_IP6.into()], &all_web()));
    let want: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually("the IPv6 service is served from the node", || {
        from_node(&c, "tcp", http6(), 1)
            .first()
            .is_some_and(|s| s.backend().is_some())
    });
    let before = translations(&c);
    for (mode, to) in [
        ("tcp", http6()),
        ("udp", dns6()),
        ("udp-unconnected", dns6()),
    ] {
        let seen = from_node(&c, mode, to, 30);
        assert_served(&c, mode, &seen, to, &want);
    }
    assert_translated_at_least(&c, before, [60, 30, 60, 30]);
}

/// "should be rejected when no endpoints exist", from the node over IPv6:
/// connect() fails at once with ECONNREFUSED, as does a UDP send.
#[test]
fn should_be_rejected_when_no_endpoints_exist_from_the_node_over_ipv6() {
    require_root();
    let c = cluster(web_of(&[WEB_IP6.into()], &[]));
    c.eventually("the IPv6 service refuses the node's connect()", || {
        from_node(&c, "tcp", http6(), 1) == [Seen::Refused]
    });
    let refused = counter(&c, "sock_refused_no_endpoints");
    for (mode, to) in [("tcp", http6()), ("udp", dns6())] {
        let started = std::time::Instant::now();
        let seen = from_node(&c, mode, to, 3);
        assert_eq!(seen, vec![Seen::Refused; 3], "{mode}\n{}", c.logs());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{mode}: refused at once, not after a timeout"
        );
    }
    assert!(counter(&c, "sock_refused_no_endpoints") >= refused + 6);
}

/// A dual-stack application's AF_INET6 socket naming the IPv4 cluster IP
/// by its IPv4-mapped address (`::ffff:10.96.0.10`) is served by the IPv4
/// service's backends, TCP and UDP, and sees the mapped service address in
/// getpeername() and recvfrom().
#[test]
fn ipv4_mapped_address_on_an_ipv6_socket_reaches_the_ipv4_service() {
    require_root();
    let c = cluster(web_of(&[IpAddr::from(WEB_IP)], &all_web()));
    let want: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    c.eventually(
        "the IPv4 service is served through ::ffff:10.96.0.10",
        || {
            from_node(&c, "tcp", mapped(80), 1)
                .first()
                .is_some_and(|s| s.backend().is_some())
        },
    );
    let before = translations(&c);
    for (mode, to) in [
        ("tcp", mapped(80)),
        ("udp", mapped(53)),
        ("udp-unconnected", mapped(53)),
    ] {
        let seen = from_node(&c, mode, to, 30);
        assert_served(&c, mode, &seen, to, &want);
    }
    // Translated at the socket (the unconnected datagrams by sendmsg4, to
    // which the kernel hands a mapped destination as IPv4), not by tc.
    assert_translated_at_least(&c, before, [60, 30, 60, 30]);
}

/// "should have session affinity work for service with type clusterIP",
/// from the node over IPv6: the host processes of a node are one client
/// (its network namespace), held to one backend per service port.
#[test]
fn session_affinity_holds_across_host_processes_of_a_node_over_ipv6() {
    require_root();
    let mut service =
        manifests::with_cluster_ips(manifests::web_service("web", WEB_IP), &[WEB_IP6.into()]);
    service.spec.as_mut().expect("a spec").session_affinity = Some("ClientIP".into());
    let c = cluster(manifests::manifest_per_family(&service, |family| {
        all_web()
            .iter()
            .map(|p| pod_endpoint_of(p, family))
            .collect()
    }));
    c.eventually("the IPv6 service is served from the node", || {
        from_node(&c, "tcp", http6(), 1)
            .first()
            .is_some_and(|s| s.backend().is_some())
    });
    let hits = counter(&c, "affinity_hit");
    for (mode, to) in [("tcp", http6()), ("udp", dns6())] {
        let mut seen = from_node(&c, mode, to, 6);
        seen.extend(from_node(&c, mode, to, 6));
        // Without affinity, 12 connections over 3 backends would all land
        // on one with probability 3^-11.
        assert_eq!(backends(&seen).len(), 1, "{mode}: {seen:?}\n{}", c.logs());
    }
    assert!(counter(&c, "affinity_hit") >= hits + 22);
}

/// "connected UDP sockets pinned to deleted backends", over IPv6: a
/// backend leaves the service while a host process holds a connected UDP
/// socket aimed at its IPv6 address; the agent closes that socket and a
/// new socket reaches a remaining backend.
#[test]
fn connected_udp_socket_to_a_removed_ipv6_backend_is_closed() {
    require_root();
    let c = cluster(web_of(&[WEB_IP6.into()], &all_web()));
    c.eventually("the IPv6 service is served from the node", || {
        from_node(&c, "udp", dns6(), 1)
            .first()
            .is_some_and(|s| s.backend().is_some())
    });
    let mut held = HeldClient::open(&c.lab.node_ns(1), &c.lab.node_cgroup(1), "udp-hold", dns6());
    let first = held.request();
    let gone = first
        .backend()
        .unwrap_or_else(|| panic!("{first:?}\n{}", c.logs()))
        .to_owned();
    let rest: Vec<PodSpec> = all_web().into_iter().filter(|p| p.name != gone).collect();
    c.write_manifest("web.yaml", &web_of(&[WEB_IP6.into()], &rest));
    assert_socket_to_removed_backend_closed(&c, &mut held, &gone, || {
        from_node(&c, "udp", dns6(), 6)
    });
}

/// When the IPv6 socket hooks cannot be attached, the IPv4 ones stay and
/// serve, and the agent says once what happened. The failure is a real one:
/// a directory where the restarted agent pins its `connect6` link.
#[test]
fn ipv6_socket_hooks_failing_leave_the_ipv4_ones_serving_and_say_so_once() {
    require_root();
    let mut c = cluster(web_of(&[IpAddr::from(WEB_IP), WEB_IP6.into()], &all_web()));
    c.eventually("the IPv4 service is served from the node", || {
        from_node(&c, "tcp", http(WEB_IP), 1)
            .first()
            .is_some_and(|s| s.backend().is_some())
    });
    c.stop_agents();
    let links = c.bpffs(1).join("sock-links");
    let blocked = links.join("connect6");
    std::fs::remove_file(&blocked).expect("the previous agent's connect6 link");
    std::fs::create_dir(&blocked).expect("a directory on bpffs");
    c.restart_agents();
    c.eventually("the restarted agent has attached the socket hooks", || {
        c.agent_log(1)
            .contains("socket-level load balancing attached")
    });

    let log = c.agent_log(1);
    let said = log.matches("IPv6 socket hooks not attached").count();
    assert_eq!(said, 1, "said once: {log}");
    let line = log
        .lines()
        .find(|l| l.contains("IPv6 socket hooks not attached"))
        .expect("the line");
    assert!(
        line.contains("IPv4 ones attached") && line.contains(&blocked.display().to_string()),
        "names the IPv4 hooks kept and the failed pin: {line}"
    );
    let mut pinned: Vec<String> = std::fs::read_dir(&links)
        .expect("sock-links")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pinned.sort();
    assert_eq!(
        pinned,
        [
            "connect4",
            "getpeername4",
            "recvmsg4",
            "sendmsg4",
            "sock_release"
        ],
        "no IPv6 hook left half attached"
    );

    // IPv4 is still translated at the socket, by the new agent's hooks.
    let before = counter(&c, "sock_connect_translated");
    let want: BTreeSet<String> = ["web-a", "web-b", "web-c"].map(String::from).into();
    let seen = from_node(&c, "tcp", http(WEB_IP), 30);
    assert_served(&c, "tcp", &seen, http(WEB_IP), &want);
    assert!(counter(&c, "sock_connect_translated") >= before + 30);
    std::fs::remove_dir(&blocked).expect("removing the blocking directory");
}

/// `monitor --ip <IPv6 cluster IP>` shows the IPv6 socket hooks' decisions,
/// addresses in their usual text form, with the process's network
/// namespace cookie and cgroup id; no IPv4 event passes its filter.
#[test]
fn monitor_shows_ipv6_socket_decisions_with_netns_and_cgroup() {
    use std::{
        io::{BufRead as _, BufReader},
        os::unix::fs::MetadataExt as _,
        process::Stdio,
    };
    require_root();
    let c = cluster(web_of(&[IpAddr::from(WEB_IP), WEB_IP6.into()], &all_web()));
    c.eventually("the IPv6 service is served from the node", || {
        from_node(&c, "tcp", http6(), 1)
            .first()
            .is_some_and(|s| s.backend().is_some())
    });
    let mut monitor = Command::new(agent_bin())
        .arg("monitor")
        .arg("--bpffs")
        .arg(c.bpffs(1))
        .args(["--ip", &WEB_IP6.to_string(), "-o", "json", "--count", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dataplane-agent monitor");
    let mut ready = String::new();
    BufReader::new(monitor.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("monitor's first line");
    assert!(ready.contains("tracing"), "monitor said: {ready}");
    // IPv4 traffic first: filtered out. Then connect + getpeername (TCP),
    // sendmsg + recvmsg (UDP): at least 6 IPv6 events.
    from_node(&c, "tcp", http(WEB_IP), 1);
    from_node(&c, "tcp", http6(), 1);
    from_node(&c, "udp-unconnected", dns6(), 1);
    from_node(&c, "tcp", http6(), 1);
    let out = monitor.wait_with_output().expect("monitor's events");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let cgroup_id = std::fs::metadata(c.lab.node_cgroup(1))
        .expect("node cgroup")
        .ino();
    for (hook, decision) in [
        ("connect", "sock_connect_translated"),
        ("getpeername", "sock_getpeername_translated"),
        ("sendmsg", "sock_sendmsg_translated"),
        ("recvmsg", "sock_recvmsg_translated"),
    ] {
        let event = events
            .iter()
            .find(|e| e["hook"] == hook)
            .unwrap_or_else(|| panic!("no {hook} event in {events:#?}"));
        assert_eq!(event["decision"], decision, "{event:#}");
        assert_eq!(event["interface"], "socket");
        assert_eq!(event["cgroup_id"].as_u64(), Some(cgroup_id), "{event:#}");
        assert!(event["netns_cookie"].as_u64().is_some_and(|c| c != 0));
        assert!(
            event["service"]
                .as_str()
                .is_some_and(|s| s.starts_with("default/web:")),
            "{event:#}"
        );
    }
    assert!(
        events.iter().all(|e| !e.to_string().contains("10.96.0.10")),
        "only IPv6 events pass an IPv6 filter: {events:#?}"
    );
    let connect = events.iter().find(|e| e["hook"] == "connect").unwrap();
    assert_eq!(connect["before"], "[::]:0 -> [fd00:10:96::10]:80");
    assert!(
        connect["after"]
            .as_str()
            .is_some_and(|a| a.ends_with("]:8080") && !a.contains("fd00:10:96::10")),
        "{connect:#}"
    );
}
