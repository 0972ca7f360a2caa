//! `dataplane-agent inspect` (the binary, both formats) against maps with
//! known contents: filled through the sync engine and by running the real
//! programs on a packet, in a bpffs of the test's own.
//!
//! Needs root and a kernel with BPF.

use std::{net::Ipv4Addr, process::Command};

use dataplane_agent::control::model::{Frontend, Protocol};
use dataplane_testkit::datapath::{addr, Harness, TC_ACT_OK};
use dataplane_testkit::packets::{endpoints, Tcp, SYN};
use serde_json::{json, Value};

fn inspect(dp: &Harness, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane-agent"))
        .arg("inspect")
        .args(args)
        .arg("--bpffs")
        .arg(dp.bpffs())
        .output()
        .expect("running dataplane-agent inspect");
    assert!(
        out.status.success(),
        "inspect {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn inspect_json(dp: &Harness, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.extend(["-o", "json"]);
    serde_json::from_str(&inspect(dp, &with_json)).expect("inspect's JSON")
}

/// web (two backends, ClientIP affinity), empty (no endpoints), and one
/// flow from the client to web. Returns the backend the flow got.
fn known_maps() -> (Harness, String) {
    let mut dp = Harness::new();
    dp.set_service_with(
        "web",
        addr([10, 96, 0, 10], 80),
        Protocol::Tcp,
        &[addr([10, 244, 2, 10], 8080), addr([10, 244, 2, 11], 8080)],
        |spec| spec.affinity_timeout_s = Some(10_800),
    );
    dp.set_service("empty", addr([10, 96, 0, 20], 53), Protocol::Udp, &[]);
    let syn = Tcp::new(
        addr([10, 244, 1, 10], 40_000),
        addr([10, 96, 0, 10], 80),
        SYN,
    )
    .build();
    let run = dp.run_from_pod(&syn);
    assert_eq!(run.verdict, TC_ACT_OK);
    let backend = endpoints(&run.output).1.to_string();
    (dp, backend)
}

#[test]
fn services_in_both_formats() {
    let (dp, _) = known_maps();
    assert_eq!(
        inspect(&dp, &["services"]),
        "default/empty 10.96.0.20:53/UDP -> (no endpoints: connections rejected)\n\
         default/web 10.96.0.10:80/TCP -> 10.244.2.10:8080, 10.244.2.11:8080 (affinity ClientIP 10800s)\n"
    );
    assert_eq!(
        inspect_json(&dp, &["services"]),
        json!([
            {"service": "default/empty", "frontend": "10.96.0.20:53/UDP",
             "backends": [], "affinity_timeout_s": null},
            {"service": "default/web", "frontend": "10.96.0.10:80/TCP",
             "backends": ["10.244.2.10:8080", "10.244.2.11:8080"], "affinity_timeout_s": 10800},
        ])
    );
}

#[test]
fn conntrack_shows_both_tuples_and_filters() {
    let (dp, backend) = known_maps();
    let rows = inspect_json(&dp, &["conntrack"]);
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "one flow: {rows:?}");
    let flow = &rows[0];
    assert_eq!(flow["service"], "default/web");
    assert_eq!(flow["proto"], "TCP");
    assert_eq!(flow["original"], "10.244.1.10:40000 -> 10.96.0.10:80");
    assert_eq!(
        flow["translated"],
        format!("10.244.1.10:40000 -> {backend}")
    );
    assert_eq!(flow["state"], "SYN_SENT");
    assert_eq!(flow["hairpin"], false);
    // A SYN waits 60 s for its answer.
    let expires = flow["expires_in_s"].as_u64().unwrap();
    assert!((58..=60).contains(&expires), "{flow}");

    let table = inspect(&dp, &["conntrack", "--service", "default/web"]);
    assert!(
        table.starts_with(&format!(
            "default/web TCP 10.244.1.10:40000 -> 10.96.0.10:80 => 10.244.1.10:40000 -> {backend} SYN_SENT age 0s expires in"
        )),
        "{table}"
    );
    for filter in [
        ["--service", "default/empty"],
        ["--client", "10.244.1.99"],
        ["--backend", "10.244.9.9"],
    ] {
        let mut args = vec!["conntrack"];
        args.extend(filter);
        assert_eq!(inspect_json(&dp, &args), json!([]), "{filter:?}");
    }
    let client_ip = inspect_json(&dp, &["conntrack", "--client", "10.244.1.10"]);
    assert_eq!(client_ip.as_array().map(Vec::len), Some(1));
}

#[test]
fn counters_and_backends() {
    let (dp, _) = known_maps();
    let counters = inspect_json(&dp, &["counters"]);
    let count = |name: &str| {
        counters
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["counter"] == name)
            .unwrap_or_else(|| panic!("no counter {name}"))["packets"]
            .clone()
    };
    assert_eq!(count("new_flow"), 1);
    assert_eq!(count("established"), 0);
    assert_eq!(count("reject_no_endpoints"), 0);
    let table = inspect(&dp, &["counters"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["new_flow", "1"])),
        "{table}"
    );

    let backends = inspect(&dp, &["backends"]);
    let lines: Vec<&str> = backends.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 2, "{backends}");
    for b in ["10.244.2.10:8080/TCP", "10.244.2.11:8080/TCP"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("{b} <- default/web 10.96.0.10:80/TCP"))),
            "{backends}"
        );
    }
}

/// A NodePort (policy Cluster) on node 192.168.100.1 whose one endpoint is
/// on another node, and one connection from outside to it: SNATed.
#[test]
fn nat_lists_snatted_external_flows_with_both_tuples() {
    let mut dp = Harness::new();
    dp.set_node_addresses(&[Ipv4Addr::new(192, 168, 100, 1)]);
    dp.set_snat(Ipv4Addr::new(192, 168, 100, 1), 61_000, 61_000);
    dp.set_frontend_with(
        "web",
        Frontend::node_port(30_080, Protocol::Tcp),
        &[addr([10, 244, 2, 10], 8080)],
        |spec| spec.masquerade_remote = true,
    );
    let syn = Tcp::new(
        addr([203, 0, 113, 5], 40_000),
        addr([192, 168, 100, 1], 30_080),
        SYN,
    )
    .build();
    dp.run("from_outside", &syn);

    let rows = inspect_json(&dp, &["nat"]);
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "one flow (its ORIGINAL entry): {rows:?}");
    let flow = &rows[0];
    assert!(
        flow["service"].as_str().unwrap().starts_with("default/web"),
        "{flow}"
    );
    assert_eq!(flow["original"], "203.0.113.5:40000 -> 192.168.100.1:30080");
    assert_eq!(
        flow["translated"],
        "192.168.100.1:61000 -> 10.244.2.10:8080"
    );
    assert_eq!(flow["state"], "SYN_SENT");
    let table = inspect(&dp, &["nat"]);
    assert!(
        table.contains(
            "TCP 203.0.113.5:40000 -> 192.168.100.1:30080 => 192.168.100.1:61000 -> 10.244.2.10:8080 SYN_SENT expires in"
        ),
        "{table}"
    );
}

/// One IPv4 and one IPv6 socket the hooks translated (written as the hooks
/// write them: the hooks cannot run under BPF_PROG_TEST_RUN): both listed,
/// each address in its usual text form.
#[test]
fn sock_revnat_lists_translated_sockets_of_both_families() {
    use dataplane_agent::node::pinned::{self, ServiceNamesMap, SockRevNat6Map, SockRevNatMap};
    use dataplane_common::{
        ipv4_to_map, map_names, port_to_map, SockRevNat6Entry, SockRevNat6Key, SockRevNatEntry,
        SockRevNatKey,
    };
    let (dp, _) = known_maps();
    let names: ServiceNamesMap = pinned::open(dp.bpffs(), map_names::SERVICE_NAMES).unwrap();
    let web = names
        .iter()
        .flatten()
        .find(|(_, label)| label.as_str().starts_with("default/web"))
        .map(|(id, _)| id)
        .expect("web in SERVICE_NAMES");
    let mut v4: SockRevNatMap = pinned::open(dp.bpffs(), map_names::SOCK_REVNAT).unwrap();
    v4.insert(
        SockRevNatKey {
            cookie: 7,
            backend_addr: ipv4_to_map([10, 244, 2, 10]),
            backend_port: port_to_map(8080),
            _pad: 0,
        },
        SockRevNatEntry {
            service_addr: ipv4_to_map([10, 96, 0, 10]),
            service_port: port_to_map(80),
            _pad: 0,
            service_id: web,
        },
        0,
    )
    .unwrap();
    let mut v6: SockRevNat6Map = pinned::open(dp.bpffs(), map_names::LB6_SOCK_REVNAT).unwrap();
    let v6_addr = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    v6.insert(
        SockRevNat6Key {
            cookie: 9,
            backend_addr: v6_addr("fd00:10:244:2::10"),
            backend_port: port_to_map(8080),
            _pad: [0; 6],
        },
        SockRevNat6Entry {
            service_addr: v6_addr("fd00:10:96::10"),
            service_port: port_to_map(80),
            _pad: 0,
            service_id: web,
        },
        0,
    )
    .unwrap();

    let rows = inspect_json(&dp, &["sock-revnat"]);
    let label = names.get(&web, 0).unwrap().as_str().to_owned();
    assert_eq!(
        rows,
        json!([
            {"cookie": 7, "backend": "10.244.2.10:8080", "service": label,
             "frontend": "10.96.0.10:80"},
            {"cookie": 9, "backend": "[fd00:10:244:2::10]:8080", "service": label,
             "frontend": "[fd00:10:96::10]:80"},
        ])
    );
    let table = inspect(&dp, &["sock-revnat"]);
    assert!(
        table.contains(&format!(
            "[fd00:10:244:2::10]:8080 shown as [fd00:10:96::10]:80 [{label}]"
        )),
        "{table}"
    );
}

/// An IPv6 SNATed flow (written as `external6` writes it: an ORIGINAL
/// entry seen just now) is listed with both tuples, addresses bracketed.
#[test]
fn nat_lists_snatted_ipv6_flows_with_both_tuples() {
    use dataplane_agent::node::pinned::{self, monotonic_now_ns, Nat6Map, ServiceNamesMap};
    use dataplane_common::{ct_state, map_names, port_to_map, Nat6Entry, IPPROTO_TCP};
    let (dp, _) = known_maps();
    let names: ServiceNamesMap = pinned::open(dp.bpffs(), map_names::SERVICE_NAMES).unwrap();
    let (web, label) = names
        .iter()
        .flatten()
        .find(|(_, label)| label.as_str().starts_with("default/web"))
        .map(|(id, label)| (id, label.as_str().to_owned()))
        .expect("web in SERVICE_NAMES");
    let v6_addr = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let flow = Nat6Entry {
        last_seen_ns: monotonic_now_ns(),
        client_addr: v6_addr("2001:db8:cafe::5"),
        frontend_addr: v6_addr("fd00:192:168:100::1"),
        backend_addr: v6_addr("fd00:10:244:2::a"),
        nat_addr: v6_addr("fd00:192:168:100::1"),
        client_port: port_to_map(40_000),
        frontend_port: port_to_map(30_080),
        backend_port: port_to_map(8080),
        nat_port: port_to_map(61_000),
        backend_id: 1,
        service_id: web,
        proto: IPPROTO_TCP,
        state: ct_state::ESTABLISHED,
        ..Default::default()
    };
    let mut nat6: Nat6Map = pinned::open(dp.bpffs(), map_names::NAT6).unwrap();
    nat6.insert(flow.original_key(), flow, 0).unwrap();
    // The REPLY entry reserves the port; it is not a row of its own.
    nat6.insert(flow.reply_key(), flow, 0).unwrap();

    let rows = inspect_json(&dp, &["nat"]);
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "one flow (its ORIGINAL entry): {rows:?}");
    assert_eq!(rows[0]["service"], label.as_str());
    assert_eq!(
        rows[0]["original"],
        "[2001:db8:cafe::5]:40000 -> [fd00:192:168:100::1]:30080"
    );
    assert_eq!(
        rows[0]["translated"],
        "[fd00:192:168:100::1]:61000 -> [fd00:10:244:2::a]:8080"
    );
    assert_eq!(rows[0]["state"], "ESTABLISHED");
}
