//! `dataplane-agent monitor` on a scripted flow: the events it prints are
//! the datapath's decisions, with the tuples before and after translation.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use dataplane_lab::{agent::agent_bin, manifests, CrossNode, Topology};
use integration_tests::{http, lab_pod, require_root, web, Cluster, Seen, WEB_IP};
use serde_json::Value;

const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

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
    let mut monitor = Command::new(agent_bin())
        .arg("monitor")
        .arg("--bpffs")
        .arg(c.bpffs(1))
        .args(["--ip", "10.244.1.10", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dataplane-agent monitor");
    let mut stderr = BufReader::new(monitor.stderr.take().unwrap());
    let mut ready = String::new();
    stderr.read_line(&mut ready).unwrap();
    assert!(
        ready.contains("tracing IP 10.244.1.10"),
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

    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let has = |seen: &[Value], decision: &str| seen.iter().any(|e| e["decision"] == decision);
    while ![
        "new_flow",
        "established",
        "reply_translated",
        "reject_no_endpoints",
    ]
    .iter()
    .all(|d| has(&seen, d))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(e) => seen.push(e),
            Err(_) => panic!("missing decisions; events: {seen:#?}\n{}", c.logs()),
        }
    }
    nix_kill(monitor.id());
    let status = monitor.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "monitor exit {status}");

    let find = |decision: &str| {
        seen.iter()
            .find(|e| e["decision"] == decision)
            .unwrap_or_else(|| panic!("no {decision} in {seen:#?}"))
    };
    let new_flow = find("new_flow");
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

    let established = find("established");
    assert_eq!(established["hook"], "from-pod");
    assert_eq!(
        established["after"], new_flow["after"],
        "same flow, same backend"
    );

    let reply = find("reply_translated");
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

    let reject = find("reject_no_endpoints");
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

fn nix_kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
