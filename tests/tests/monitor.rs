//! `dataplane-agent monitor` on a scripted flow: the events it prints are
//! the datapath's decisions, with the tuples before and after translation.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dataplane_lab::{
    agent::agent_bin,
    manifests::{self, pod_endpoint_of},
    topology::{node_ip6, OUTSIDE_CLIENT_IP6},
    CrossNode, Topology,
};
use integration_tests::{http, lab_pod, require_root, web, Cluster, Seen, WEB_IP, WEB_IP6};
use serde_json::Value;

const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// `dataplane-agent monitor --ip ip -o json` on node 1, once it said it is
/// tracing: the process, its JSON events, and the thread reading them.
fn start_monitor(c: &Cluster, ip: IpAddr) -> (Child, mpsc::Receiver<Value>, JoinHandle<()>) {
    let mut monitor = Command::new(agent_bin())
        .arg("monitor")
        .arg("--bpffs")
        .arg(c.bpffs(1))
        .args(["--ip", &ip.to_string(), "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dataplane-agent monitor");
    let mut stderr = BufReader::new(monitor.stderr.take().unwrap());
    let mut ready = String::new();
    stderr.read_line(&mut ready).unwrap();
    assert!(
        ready.contains(&format!("tracing IP {ip}")),
        "monitor said: {ready}"
    );
    let (tx, events) = mpsc::channel::<Value>();
    let stdout = BufReader::new(monitor.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    (monitor, events, reader)
}

/// Events from `events` until each of `decisions` was seen (5 s at most).
fn events_until(c: &Cluster, events: &mpsc::Receiver<Value>, decisions: &[&str]) -> Vec<Value> {
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let has = |seen: &[Value], decision: &str| seen.iter().any(|e| e["decision"] == decision);
    while !decisions.iter().all(|d| has(&seen, d)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(e) => seen.push(e),
            Err(_) => panic!("missing decisions; events: {seen:#?}\n{}", c.logs()),
        }
    }
    seen
}

fn stop_monitor(mut monitor: Child, reader: JoinHandle<()>) {
    nix_kill(monitor.id());
    let status = monitor.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "monitor exit {status}");
}

#[test]
fn monitor_shows_new_flow_established_reply_and_reject() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[
            ("web.yaml", web(&[&lab_pod("web-b")])),
            (
                "empty.yaml",
                manifests::web_manifest("empty", EMPTY_IP, &[]),
            ),
        ],
    );
    let (monitor, events, reader) = start_monitor(&c, Ipv4Addr::new(10, 244, 1, 10).into());

    // Cross-node: client on node1, web-b on node2.
    assert_eq!(
        c.tcp("client", http(WEB_IP)).backend(),
        Some("web-b"),
        "{}",
        c.logs()
    );
    assert_eq!(
        c.tcp("client", SocketAddr::from((EMPTY_IP, 80))),
        Seen::Refused,
        "{}",
        c.logs()
    );

    let seen = events_until(
        &c,
        &events,
        &[
            "new_flow",
            "established",
            "reply_translated",
            "reject_no_endpoints",
        ],
    );
    stop_monitor(monitor, reader);

    let new_flow = find(&seen, "new_flow");
    assert_eq!(new_flow["hook"], "from-pod");
    assert_eq!(new_flow["proto"], "TCP");
    assert_eq!(new_flow["service"], "default/web:http");
    let before = new_flow["before"].as_str().unwrap();
    let after = new_flow["after"].as_str().unwrap();
    assert!(
        before.starts_with("10.244.1.10:") && before.ends_with("-> 10.96.0.10:80"),
        "{before}"
    );
    assert!(
        after.ends_with("-> 10.244.2.10:8080"),
        "DNAT to web-b: {after}"
    );
    assert_eq!(
        before.split(" -> ").next(),
        after.split(" -> ").next(),
        "client side kept"
    );

    let established = find(&seen, "established");
    assert_eq!(established["hook"], "from-pod");
    assert_eq!(
        established["after"], new_flow["after"],
        "same flow, same backend"
    );

    let reply = find(&seen, "reply_translated");
    assert_eq!(reply["hook"], "to-pod");
    let r_before = reply["before"].as_str().unwrap();
    let r_after = reply["after"].as_str().unwrap();
    assert!(
        r_before.starts_with("10.244.2.10:8080 -> 10.244.1.10:"),
        "{r_before}"
    );
    assert!(
        r_after.starts_with("10.96.0.10:80 -> 10.244.1.10:"),
        "{r_after}"
    );

    let reject = find(&seen, "reject_no_endpoints");
    assert_eq!(reject["service"], "default/empty:http");
    assert!(
        reject["before"]
            .as_str()
            .unwrap()
            .ends_with("-> 10.96.0.20:80"),
        "{reject}"
    );

    // Tracing is off again: TRACE_CONFIG, as bpftool shows it, is all zero.
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(c.bpffs(1).join("TRACE_CONFIG"))
        .output()
        .expect("running bpftool");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump: Value = serde_json::from_slice(&dump.stdout).unwrap();
    let value = &dump[0]["value"];
    let bytes = value
        .as_array()
        .unwrap_or_else(|| panic!("unexpected dump {dump}"));
    assert!(
        bytes.iter().all(|b| b == "0x00"),
        "tracing left on after the monitor exited: {dump}"
    );
}

#[test]
fn monitor_shows_an_ipv6_connection_to_an_ipv6_cluster_ip_with_bracketed_addresses() {
    require_root();
    let web_b = lab_pod("web-b");
    let service =
        manifests::with_cluster_ips(manifests::web_service("web", WEB_IP), &[WEB_IP6.into()]);
    let manifest =
        manifests::manifest_per_family(&service, |family| vec![pod_endpoint_of(&web_b, family)]);
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
    );
    let client = lab_pod("client").ipv6();
    let (monitor, events, reader) = start_monitor(&c, client.into());

    // Cross-node: client on node1, web-b on node2.
    assert_web6_answers_from_web_b(&c);

    let seen = events_until(&c, &events, &["new_flow", "reply_translated"]);
    stop_monitor(monitor, reader);
    let new_flow = find(&seen, "new_flow");
    assert_eq!(new_flow["hook"], "from-pod");
    assert_eq!(new_flow["proto"], "TCP");
    assert_eq!(new_flow["service"], "default/web:http");
    let before = new_flow["before"].as_str().unwrap();
    let after = new_flow["after"].as_str().unwrap();
    assert!(
        before.starts_with(&format!("[{client}]:"))
            && before.ends_with(&format!("-> [{WEB_IP6}]:80")),
        "{before}"
    );
    assert!(
        after.ends_with(&format!("-> [{}]:8080", web_b.ipv6())),
        "DNAT to web-b: {after}"
    );
    let reply = find(&seen, "reply_translated");
    assert_eq!(reply["hook"], "to-pod");
    let r_before = reply["before"].as_str().unwrap();
    let r_after = reply["after"].as_str().unwrap();
    assert!(
        r_before.starts_with(&format!("[{}]:8080 -> [{client}]:", web_b.ipv6())),
        "{r_before}"
    );
    assert!(
        r_after.starts_with(&format!("[{WEB_IP6}]:80 -> [{client}]:")),
        "{r_after}"
    );
}

const NODE_PORT_HTTP: u16 = 30080;

/// The monitor on node 1, filtering by the outside client's IPv6 address,
/// while that client reaches a NodePort on node 1's IPv6 address whose only
/// backend is on node 2: node 1's XDP program SNATs the connection and
/// sends it back out, and translates the backend's replies back, all
/// before the stack (and the tc program behind it) could see a packet
/// (`external6`'s XDP test). The datapath's filter keeps the client pod's
/// own IPv6 and IPv4 flows to the same service out of the events.
#[test]
fn monitor_shows_ipv6_decisions_of_the_xdp_program_on_the_uplink() {
    require_root();
    let web_b = lab_pod("web-b");
    let manifest = integration_tests::dual_stack_web_node_port([NODE_PORT_HTTP, 30053], &["web-b"]);
    let c = Cluster::start_dual(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", manifest)],
    );
    let node_port = SocketAddr::new(node_ip6(1).into(), NODE_PORT_HTTP);
    c.eventually("the IPv6 NodePort on node1 answers from web-b", || {
        c.outside_tcp(node_port).is_ok_and(|s| s.backend == "web-b")
    });
    assert!(
        c.agent_log(1).contains("XDP attached"),
        "{}",
        c.agent_log(1)
    );
    let client = OUTSIDE_CLIENT_IP6;
    let (monitor, events, reader) = start_monitor(&c, client.into());

    // Flows of another client, which the filter leaves out.
    assert_web6_answers_from_web_b(&c);
    assert_eq!(c.tcp("client", http(WEB_IP)).backend(), Some("web-b"));
    let seen = c.outside_tcp(node_port);
    assert!(
        seen.as_ref().is_ok_and(|s| s.backend == "web-b"),
        "{seen:?}\n{}",
        c.logs()
    );

    let seen = events_until(&c, &events, &["new_flow", "reply_translated"]);
    stop_monitor(monitor, reader);
    let bracketed = format!("[{client}]:");
    for e in &seen {
        assert_eq!(e["hook"], "from-outside", "{e:#}");
        let (before, after) = (e["before"].as_str().unwrap(), e["after"].as_str().unwrap());
        assert!(
            before.contains(&bracketed) || after.contains(&bracketed),
            "an event of another address: {e:#}"
        );
    }
    let node = format!("[{}]", node_ip6(1));
    let new_flow = find(&seen, "new_flow");
    assert_eq!(new_flow["service"], "default/web:http");
    let before = new_flow["before"].as_str().unwrap();
    let after = new_flow["after"].as_str().unwrap();
    assert!(
        before.starts_with(&bracketed) && before.ends_with(&format!("-> {node}:{NODE_PORT_HTTP}")),
        "{before}"
    );
    assert!(
        after.starts_with(&format!("{node}:"))
            && after.ends_with(&format!("-> [{}]:8080", web_b.ipv6())),
        "SNAT to node1, DNAT to web-b: {after}"
    );
    let reply = find(&seen, "reply_translated");
    let r_before = reply["before"].as_str().unwrap();
    let r_after = reply["after"].as_str().unwrap();
    assert!(
        r_before.starts_with(&format!("[{}]:8080 -> {node}:", web_b.ipv6())),
        "{r_before}"
    );
    assert!(
        r_after.starts_with(&format!("{node}:{NODE_PORT_HTTP} -> {bracketed}")),
        "{r_after}"
    );
}

/// The client pod reaches `web` on its IPv6 cluster IP, answered by web-b.
fn assert_web6_answers_from_web_b(c: &Cluster) {
    let to = SocketAddr::new(WEB_IP6.into(), 80);
    assert_eq!(c.tcp("client", to).backend(), Some("web-b"), "{}", c.logs());
}

/// The first event of `decision` in `seen`.
fn find<'a>(seen: &'a [Value], decision: &str) -> &'a Value {
    seen.iter()
        .find(|e| e["decision"] == decision)
        .unwrap_or_else(|| panic!("no {decision} in {seen:#?}"))
}

fn nix_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
