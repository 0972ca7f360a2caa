//! Socket-level load balancing: node (host-network) and pod processes in a
//! node's cgroup reach services through the socket hooks, with real
//! sockets. Clients are `sockclient` processes, since the hooks select by
//! cgroup and a cgroup holds processes, not the test's threads.

use std::{
    io::BufReader,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_lab::{agent::agent_bin, manifests, CrossNode, Topology};
use integration_tests::{
    assert_socket_to_removed_backend_closed, dns, http, lab_pod, require_root, sockclient_command,
    sockclient_outcomes, web, Cluster, HeldClient, Seen, WEB_IP,
};
use k8s_openapi::api::core::v1::ServiceSpec;

fn sockclient(ns: &str, cgroup: &Path, args: &[&str]) -> Command {
    sockclient_command(ns, cgroup, args)
}

fn outcomes(cmd: Command) -> Vec<Seen> {
    sockclient_outcomes(cmd)
}

/// A host-network process of `node` (its netns, its cgroup).
fn from_node(c: &Cluster, node: u8, mode: &str, to: SocketAddr, n: usize) -> Vec<Seen> {
    outcomes(sockclient(
        &c.lab.node_ns(node),
        &c.lab.node_cgroup(node),
        &[mode, &to.to_string(), &n.to_string()],
    ))
}

/// A process of pod `pod`, in its node's cgroup.
fn from_pod_process(c: &Cluster, pod: &str, mode: &str, to: SocketAddr, n: usize) -> Vec<Seen> {
    outcomes(sockclient(
        &c.lab.pod_ns(pod),
        &c.lab.node_cgroup(c.pod(pod).node),
        &[mode, &to.to_string(), &n.to_string()],
    ))
}

fn backends(seen: &[Seen]) -> std::collections::BTreeSet<String> {
    seen.iter()
        .filter_map(|s| s.backend().map(str::to_owned))
        .collect()
}

/// A client of node `node` holding one connection or connected socket.
fn held(c: &Cluster, node: u8, mode: &str, to: SocketAddr) -> HeldClient {
    HeldClient::open(&c.lab.node_ns(node), &c.lab.node_cgroup(node), mode, to)
}

/// A datapath counter of `node`, from `inspect counters`.
fn counter(c: &Cluster, node: u8, name: &str) -> u64 {
    let out = Command::new(agent_bin())
        .args(["inspect", "counters", "-o", "json", "--bpffs"])
        .arg(c.bpffs(node))
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

/// Names of the programs attached to a node's cgroup (`bpftool cgroup show`).
fn attached_to_cgroup(c: &Cluster, node: u8) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(c.lab.node_cgroup(node))
        .output()
        .expect("running bpftool");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    names.sort();
    names
}

const HOOKS: [&str; 9] = [
    "sock4_connect",
    "sock4_getpeername",
    "sock4_recvmsg",
    "sock4_sendmsg",
    "sock6_connect",
    "sock6_getpeername",
    "sock6_recvmsg",
    "sock6_sendmsg",
    "sock_release",
];

/// `SOCK_REVNAT` entries of node `node` whose frontend is `service` (`inspect
/// sock-revnat`).
fn revnat_entries(c: &Cluster, node: u8, service: SocketAddr) -> usize {
    let out = Command::new(agent_bin())
        .args(["inspect", "sock-revnat", "-o", "json", "--bpffs"])
        .arg(c.bpffs(node))
        .output()
        .expect("running inspect");
    assert!(
        out.status.success(),
        "inspect sock-revnat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect's JSON");
    rows.as_array()
        .expect("a list of entries")
        .iter()
        .filter(|r| r["frontend"] == service.to_string())
        .count()
}

/// Connection churn from node 1 to the web service: `n` TCP connections
/// and `n` connected UDP sockets, each opened, used and closed, while one
/// TCP connection stays open. The open one keeps its entry and is still
/// shown the service address (getpeername); returns how many entries the
/// closed sockets left in `SOCK_REVNAT` (TCP, UDP).
fn churn_leaves_revnat_entries(c: &Cluster, n: usize) -> (usize, usize) {
    let mut open = held(c, 1, "tcp-hold", http(WEB_IP));
    let first = open.request();
    assert!(
        matches!(&first, Seen::Answered { from, .. } if *from == http(WEB_IP)),
        "{first:?}\n{}",
        c.logs()
    );
    for (mode, to) in [("tcp", http(WEB_IP)), ("udp", dns(WEB_IP))] {
        let seen = from_node(c, 1, mode, to, n);
        assert!(
            seen.iter()
                .all(|s| matches!(s, Seen::Answered { from, .. } if *from == to)),
            "{mode}: {seen:?}\n{}",
            c.logs()
        );
    }
    let tcp = revnat_entries(c, 1, http(WEB_IP))
        .checked_sub(1)
        .unwrap_or_else(|| panic!("no entry for the open connection\n{}", c.logs()));
    let left = (tcp, revnat_entries(c, 1, dns(WEB_IP)));
    // The open connection still has its entry: getpeername() still shows
    // the service, on the same backend.
    let again = open.request();
    assert_eq!(again, first, "{}", c.logs());
    left
}

fn web_on_both_nodes() -> Cluster {
    let backends = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    )
}

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

/// Networking Granular Checks: "should function for node-Service: http /
/// udp", same-node (web-a) and cross-node (web-b, web-c) backends, TCP,
/// connected and unconnected UDP; replies show the service address.
#[test]
fn should_function_for_node_service_http_and_udp() {
    require_root();
    let c = web_on_both_nodes();
    let want: std::collections::BTreeSet<String> =
        ["web-a", "web-b", "web-c"].map(String::from).into();
    for (mode, to) in [
        ("tcp", http(WEB_IP)),
        ("udp", dns(WEB_IP)),
        ("udp-unconnected", dns(WEB_IP)),
    ] {
        let seen = from_node(&c, 1, mode, to, 30);
        assert_eq!(backends(&seen), want, "{mode}: {seen:?}\n{}", c.logs());
        for s in &seen {
            match s {
                // getpeername() (TCP) and recvfrom() (UDP) both.
                Seen::Answered { from, .. } => assert_eq!(*from, to, "{mode}"),
                other => panic!("{mode}: {other:?}\n{}", c.logs()),
            }
        }
    }
    assert!(counter(&c, 1, "sock_connect_translated") >= 60);
    assert!(counter(&c, 1, "sock_sendmsg_translated") >= 30);
    assert!(counter(&c, 1, "sock_recvmsg_translated") >= 60);
    assert!(counter(&c, 1, "sock_getpeername_translated") >= 30);
}

/// A pod's process in the node's cgroup is translated at the socket: the
/// tc programs see pod-to-pod traffic and create no conntrack flow.
#[test]
fn pod_processes_are_translated_once_at_the_socket() {
    require_root();
    let c = web_on_both_nodes();
    let new_flows = counter(&c, 1, "new_flow");
    let seen = from_pod_process(&c, "client", "tcp", http(WEB_IP), 10);
    assert!(
        seen.iter()
            .all(|s| matches!(s, Seen::Answered { from, .. } if *from == http(WEB_IP))),
        "{seen:?}\n{}",
        c.logs()
    );
    let seen = from_pod_process(&c, "client", "udp-unconnected", dns(WEB_IP), 10);
    assert!(
        seen.iter()
            .all(|s| matches!(s, Seen::Answered { from, .. } if *from == dns(WEB_IP))),
        "{seen:?}\n{}",
        c.logs()
    );
    assert_eq!(
        counter(&c, 1, "new_flow"),
        new_flows,
        "the tc path translated too"
    );
    // The test's own threads are outside the node's cgroup: the tc path
    // still serves them.
    let thread = c.in_pod("client", || {
        dataplane_lab::traffic::tcp_request(http(WEB_IP))
    });
    assert!(thread.backend().is_some(), "{thread:?}");
    assert!(counter(&c, 1, "new_flow") > new_flows);
}

/// "should be rejected when no endpoints exist", from the node: connect()
/// and sendto() fail at once with ECONNREFUSED.
#[test]
fn should_be_rejected_when_no_endpoints_exist_from_the_node() {
    require_root();
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&[]))],
    );
    for (mode, to) in [
        ("tcp", http(WEB_IP)),
        ("udp", dns(WEB_IP)),
        ("udp-unconnected", dns(WEB_IP)),
    ] {
        let started = Instant::now();
        let seen = from_node(&c, 1, mode, to, 3);
        assert_eq!(seen, vec![Seen::Refused; 3], "{mode}\n{}", c.logs());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode}: refused only after {:?}",
            started.elapsed()
        );
    }
    assert!(counter(&c, 1, "sock_refused_no_endpoints") >= 9);
}

/// "should have session affinity work for service with type clusterIP",
/// from the node: two host-network processes are one client (one netns),
/// as they share the node IP under kube-proxy.
#[test]
fn session_affinity_holds_across_host_processes_of_a_node() {
    require_root();
    let c = web_cluster_with(
        |spec| spec.session_affinity = Some("ClientIP".into()),
        &["web-a", "web-b", "web-c"],
    );
    // Affinity is per service port, as kube-proxy keeps it.
    for (mode, to) in [("tcp", http(WEB_IP)), ("udp", dns(WEB_IP))] {
        let mut seen = from_node(&c, 1, mode, to, 6);
        seen.extend(from_node(&c, 1, mode, to, 6));
        // Without affinity, 12 connections over 3 backends would all land
        // on one with probability 3^-11.
        assert_eq!(backends(&seen).len(), 1, "{mode}: {seen:?}\n{}", c.logs());
    }
    assert!(counter(&c, 1, "affinity_hit") >= 22);
}

/// "should respect internalTrafficPolicy=Local Pod to Pod" (hostNetwork
/// variant): the node with endpoints uses only its own; on the node without
/// any the socket is left untranslated (the packet path drops it, as
/// kube-proxy does; this lab's nodes do not route the service IP at all).
#[test]
fn should_respect_internal_traffic_policy_local_from_the_node() {
    require_root();
    let c = web_cluster_with(
        |spec| spec.internal_traffic_policy = Some("Local".into()),
        &["web-b", "web-c"],
    );
    let from_node2 = backends(&from_node(&c, 2, "tcp", http(WEB_IP), 8));
    assert!(
        !from_node2.is_empty() && from_node2.iter().all(|b| b == "web-b" || b == "web-c"),
        "{from_node2:?}\n{}",
        c.logs()
    );
    let from_node1 = from_node(&c, 1, "tcp", http(WEB_IP), 1);
    assert!(
        matches!(&from_node1[..], [Seen::Other(_) | Seen::Timeout]),
        "{from_node1:?}\n{}",
        c.logs()
    );
    assert_eq!(counter(&c, 1, "sock_no_local_endpoints"), 1);
    assert_eq!(counter(&c, 1, "sock_connect_translated"), 0);
}

/// An agent restart keeps an open connection working and the hooks
/// attached, exactly one program per hook (the new agent's).
#[test]
fn agent_restart_keeps_open_connections_and_the_socket_hooks() {
    require_root();
    let mut c = web_on_both_nodes();
    assert_eq!(attached_to_cgroup(&c, 1), HOOKS, "{}", c.logs());
    let mut conn = held(&c, 1, "tcp-hold", http(WEB_IP));
    let first = conn.request();
    let backend = first
        .backend()
        .unwrap_or_else(|| panic!("{first:?}"))
        .to_owned();
    c.stop_agents();
    assert_eq!(conn.request().backend(), Some(backend.as_str()));
    assert_eq!(
        attached_to_cgroup(&c, 1),
        HOOKS,
        "hooks gone with the agent"
    );
    // New connections too, while no agent runs.
    assert!(from_node(&c, 1, "tcp", http(WEB_IP), 1)[0]
        .backend()
        .is_some());
    c.restart_agents();
    assert_eq!(conn.request().backend(), Some(backend.as_str()));
    assert_eq!(attached_to_cgroup(&c, 1), HOOKS, "{}", c.logs());
    assert!(c
        .agent_log(1)
        .contains("replaced the link a previous agent pinned"));
}

/// Closing a socket deletes its `SOCK_REVNAT` entry (`sock_release`): after
/// 200 TCP connections and 200 connected UDP sockets from the node, opened
/// and closed, the reverse map holds only the connection still open, which
/// keeps its entry and is still shown the service address.
#[test]
fn closed_sockets_leave_no_reverse_map_entries() {
    require_root();
    let c = web_on_both_nodes();
    assert_eq!(churn_leaves_revnat_entries(&c, 200), (0, 0), "{}", c.logs());
    assert!(counter(&c, 1, "sock_connect_translated") >= 401);
}

/// A kernel refusing `sock_release` (here: the agent's test switch): the
/// agent says so once and every other socket hook stays attached and
/// serving; closed sockets' entries then stay until the LRU evicts them.
#[test]
fn without_sock_release_the_other_hooks_serve_and_closed_sockets_keep_entries() {
    require_root();
    let backends_ = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let c = Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends_.iter().collect::<Vec<_>>()))],
        &["--test-refuse-socket-hooks", "sock_release"],
    );
    assert_eq!(attached_to_cgroup(&c, 1), HOOKS[..8], "{}", c.logs());
    assert!(!c.bpffs(1).join("sock-links").join("sock_release").exists());
    let log = c.agent_log(1);
    assert_eq!(
        log.matches("sock_release not attached").count(),
        1,
        "said once: {log}"
    );
    assert!(
        !log.contains("socket-level load balancing unavailable"),
        "{log}"
    );
    assert_eq!(
        churn_leaves_revnat_entries(&c, 20),
        (20, 20),
        "{}",
        c.logs()
    );
}

/// `dataplane-agent cleanup` detaches the socket hooks with the rest.
#[test]
fn cleanup_leaves_no_socket_hooks_attached() {
    require_root();
    let mut c = web_on_both_nodes();
    assert_eq!(attached_to_cgroup(&c, 1), HOOKS);
    c.stop_agents();
    c.cleanup(1);
    assert_eq!(attached_to_cgroup(&c, 1), Vec::<String>::new());
    assert!(!c.bpffs(1).join("sock-links").exists());
}

/// An agent restarted with `--socket-lb false` removes the hooks the
/// previous one left attached; the tc path serves pods from then on.
#[test]
fn restart_with_socket_lb_false_detaches_the_hooks() {
    require_root();
    let mut c = web_on_both_nodes();
    assert_eq!(attached_to_cgroup(&c, 1), HOOKS);
    c.stop_agents();
    c.set_agent_args(&["--socket-lb", "false"]);
    c.restart_agents();
    assert_eq!(
        attached_to_cgroup(&c, 1),
        Vec::<String>::new(),
        "{}",
        c.logs()
    );
    let seen = from_pod_process(&c, "client", "tcp", http(WEB_IP), 3);
    assert!(
        seen.iter()
            .all(|s| matches!(s, Seen::Answered { from, .. } if *from == http(WEB_IP))),
        "{seen:?}\n{}",
        c.logs()
    );
    assert_eq!(counter(&c, 1, "sock_connect_translated"), 0);
}

/// `--socket-lb false`: nothing attached to the cgroup; pod processes get
/// the same answers from the tc path (backends, service address as source).
#[test]
fn socket_lb_false_falls_back_to_the_tc_path() {
    require_root();
    let backends_ = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let c = Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends_.iter().collect::<Vec<_>>()))],
        &["--socket-lb", "false"],
    );
    assert_eq!(attached_to_cgroup(&c, 1), Vec::<String>::new());
    pod_processes_are_served_by_the_tc_path(&c);
}

/// Pod processes reach the web service, TCP and UDP, with the service
/// address as source, and every connection was translated by tc.
fn pod_processes_are_served_by_the_tc_path(c: &Cluster) {
    let new_flows = counter(c, 1, "new_flow");
    for (mode, to) in [("tcp", http(WEB_IP)), ("udp", dns(WEB_IP))] {
        let seen = from_pod_process(c, "client", mode, to, 12);
        assert!(
            seen.iter()
                .all(|s| matches!(s, Seen::Answered { from, .. } if *from == to)),
            "{mode}: {seen:?}\n{}",
            c.logs()
        );
    }
    assert_eq!(counter(c, 1, "sock_connect_translated"), 0);
    assert!(counter(c, 1, "new_flow") >= new_flows + 24);
}

/// A cgroup v1 hierarchy the test mounts itself (a node without cgroup2
/// there); unmounted when dropped.
struct CgroupV1 {
    dir: tempfile::TempDir,
}

impl CgroupV1 {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("a directory to mount on");
        let name = format!("name=dpt{}v1", std::process::id());
        let status = Command::new("mount")
            .args(["-t", "cgroup", "-o", &format!("none,{name}"), "cgroup"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a cgroup v1 hierarchy: {status}");
        Self { dir }
    }
}

impl Drop for CgroupV1 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A node where the kernel refuses the socket hooks (here: the cgroup it
/// is given is a cgroup v1 hierarchy, to which the kernel attaches no BPF
/// program, as a kernel without the hooks refuses to load them): the agent
/// says so once in its log, attaches nothing, and pods reach ClusterIPs
/// through the tc path, TCP and UDP, with the service address as source.
#[test]
fn without_socket_hooks_the_agent_says_so_once_and_the_tc_path_serves_pods() {
    require_root();
    let v1 = CgroupV1::mount();
    let root = v1.dir.path().to_str().expect("a UTF-8 path").to_owned();
    let backends_ = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let c = Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends_.iter().collect::<Vec<_>>()))],
        &["--cgroup-root", &root],
    );
    assert_eq!(attached_to_cgroup(&c, 1), Vec::<String>::new());
    assert!(!c.bpffs(1).join("sock-links").join("connect4").exists());
    let new_flows = counter(&c, 1, "new_flow");
    for (mode, to) in [("tcp", http(WEB_IP)), ("udp", dns(WEB_IP))] {
        let seen = from_pod_process(&c, "client", mode, to, 12);
        assert!(
            seen.iter()
                .all(|s| matches!(s, Seen::Answered { from, .. } if *from == to)),
            "{mode}: {seen:?}\n{}",
            c.logs()
        );
    }
    let thread = c.tcp("client", http(WEB_IP));
    assert!(thread.backend().is_some(), "{thread:?}\n{}", c.logs());
    assert_eq!(counter(&c, 1, "sock_connect_translated"), 0);
    assert!(counter(&c, 1, "new_flow") >= new_flows + 25);
    let log = c.agent_log(1);
    assert_eq!(
        log.matches("socket-level load balancing unavailable")
            .count(),
        1,
        "said once: {log}"
    );
    assert!(log.contains(&root), "the log names the cgroup: {log}");
    // The agents go before the hierarchy they were given is unmounted.
    drop(c);
}

/// A kernel that refuses to load the socket hooks (an old one: here the
/// agent's test switch refuses `connect4` at load, where such a kernel
/// fails): the agent says once why, attaches none of them, and pods reach
/// ClusterIPs through the tc path, TCP and UDP, with the service address
/// as source.
#[test]
fn when_the_socket_hooks_cannot_load_the_agent_says_why_once_and_the_tc_path_serves_pods() {
    require_root();
    let backends_ = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let c = Cluster::start_with_agent_args(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends_.iter().collect::<Vec<_>>()))],
        &["--test-refuse-socket-hooks", "connect4"],
    );
    assert_eq!(attached_to_cgroup(&c, 1), Vec::<String>::new());
    assert!(!c.bpffs(1).join("sock-links").exists());
    pod_processes_are_served_by_the_tc_path(&c);
    let log = c.agent_log(1);
    assert_eq!(
        log.matches("socket-level load balancing unavailable")
            .count(),
        1,
        "said once: {log}"
    );
    assert!(
        log.contains(
            "loading the socket hook sock4_connect (kernel without cgroup socket hooks?): \
             `bpf_prog_load (refused by --test-refuse-socket-hooks)` failed"
        ),
        "the log names the reason: {log}"
    );
}

/// Cilium's "connected UDP sockets pinned to deleted backends": a backend
/// leaves the service while a host process holds a connected UDP socket
/// aimed at it; the agent closes that socket (the application sees an
/// error and reconnects) and a new socket reaches a remaining backend.
#[test]
fn connected_udp_socket_to_a_removed_backend_is_closed() {
    require_root();
    let c = web_on_both_nodes();
    let mut held = held(&c, 1, "udp-hold", dns(WEB_IP));
    let first = held.request();
    let gone = first
        .backend()
        .unwrap_or_else(|| panic!("{first:?}\n{}", c.logs()))
        .to_owned();
    let rest: Vec<_> = ["web-a", "web-b", "web-c"]
        .into_iter()
        .filter(|p| *p != gone)
        .map(lab_pod)
        .collect();
    c.write_manifest("web.yaml", &web(&rest.iter().collect::<Vec<_>>()));
    assert_socket_to_removed_backend_closed(&c, &mut held, &gone, || {
        from_node(&c, 1, "udp", dns(WEB_IP), 6)
    });
}

/// `monitor` shows the socket hooks' decisions with the process's network
/// namespace cookie and cgroup id (the node cgroup's inode number).
#[test]
fn monitor_shows_socket_decisions_with_netns_and_cgroup() {
    use std::{io::BufRead as _, os::unix::fs::MetadataExt as _};
    require_root();
    let c = web_on_both_nodes();
    let mut monitor = Command::new(agent_bin())
        .arg("monitor")
        .arg("--bpffs")
        .arg(c.bpffs(1))
        .args(["--ip", &WEB_IP.to_string(), "-o", "json", "--count", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dataplane-agent monitor");
    let mut ready = String::new();
    BufReader::new(monitor.stderr.take().expect("stderr"))
        .read_line(&mut ready)
        .expect("monitor's first line");
    assert!(ready.contains("tracing"), "monitor said: {ready}");
    // connect + getpeername (TCP), sendmsg + recvmsg (UDP): at least 4.
    from_node(&c, 1, "tcp", http(WEB_IP), 1);
    from_node(&c, 1, "udp-unconnected", dns(WEB_IP), 1);
    from_node(&c, 1, "tcp", http(WEB_IP), 1);
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
    let connect = events.iter().find(|e| e["hook"] == "connect").unwrap();
    assert_eq!(connect["before"], "0.0.0.0:0 -> 10.96.0.10:80");
    assert!(
        connect["after"]
            .as_str()
            .is_some_and(|a| a.ends_with(":8080") && !a.contains("10.96.0.10")),
        "{connect:#}"
    );
}
