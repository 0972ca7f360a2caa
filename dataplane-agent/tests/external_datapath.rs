//! The external datapath (`from_outside` on an uplink's ingress,
//! `to_outside` on its egress) under BPF_PROG_TEST_RUN: build a packet from
//! outside, program the frontends through the agent's sync engine, check
//! the output bytes (checksums recomputed here) and the conntrack and NAT
//! entries.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::{Ipv4Addr, SocketAddrV4};

use dataplane_agent::{
    control::model::{Frontend, Protocol, Scope},
    node::{ct_gc::sweep_nat, pinned::monotonic_now_ns},
};
use dataplane_common::{
    ct_dir, ct_state, ipv4_to_map, nat_dir, port_to_map, Counter, CtLifetimes, HopCache, NatEntry,
    NatKey, IPPROTO_TCP, IPPROTO_UDP,
};
use dataplane_testkit::datapath::{
    addr, ct_key, Harness, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX,
};
use dataplane_testkit::netns::{in_new_netns, ip, link, mac_text};
use dataplane_testkit::packets::{
    assert_checksums_ok, assert_translated, endpoints, Tcp, Udp, ACK, RST, SYN,
};

const NODE: [u8; 4] = [192, 168, 100, 1];
const NODE_PORT: u16 = 30080;
const SNAT_PORT: u16 = 61000;

fn outside_client() -> SocketAddrV4 {
    addr([203, 0, 113, 5], 40_000)
}
fn node_port() -> SocketAddrV4 {
    addr(NODE, NODE_PORT)
}
fn local_backend() -> SocketAddrV4 {
    addr([10, 244, 1, 11], 8080)
}
fn remote_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 8080)
}
fn lb_ip() -> SocketAddrV4 {
    addr([198, 51, 100, 10], 80)
}

fn external(ip: SocketAddrV4, proto: Protocol) -> Frontend {
    Frontend {
        ip: (*ip.ip()).into(),
        port: ip.port(),
        proto,
        scope: Scope::External,
    }
}

/// A node with address NODE, SNAT ports `SNAT_PORT..=SNAT_PORT + extra`.
fn node(extra_ports: u16) -> Harness {
    let mut dp = Harness::new();
    dp.set_node_addresses(&[Ipv4Addr::from(NODE)]);
    dp.set_snat(Ipv4Addr::from(NODE), SNAT_PORT, SNAT_PORT + extra_ports);
    dp
}

/// A NodePort with policy Cluster whose only endpoint is `backend`.
fn node_port_to(dp: &mut Harness, backend: SocketAddrV4, local: bool, proto: Protocol) {
    dp.set_frontend_with(
        "web",
        Frontend::node_port(NODE_PORT, proto),
        &[backend],
        |spec| {
            spec.masquerade_remote = true;
            if local {
                spec.local_ips = vec![(*backend.ip()).into()];
            }
        },
    );
}

fn nat_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, direction: u8) -> NatKey {
    NatKey {
        src_addr: ipv4_to_map(src.ip().octets()),
        dst_addr: ipv4_to_map(dst.ip().octets()),
        src_port: port_to_map(src.port()),
        dst_port: port_to_map(dst.port()),
        proto,
        direction,
        _pad: [0; 2],
    }
}

const BACKEND_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Runs `f` on a thread in a network namespace of its own (test runs look
/// routes up there) holding the node's address on `uplink0`, a route to
/// the other node's pods and a default route, with permanent neighbours.
fn in_routed_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_new_netns(move || {
        ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        ip(&["link", "set", "uplink0", "up"]);
        ip(&["link", "set", "uplink1", "up"]);
        ip(&["addr", "add", "192.168.100.1/24", "dev", "uplink0"]);
        ip(&["route", "add", "10.244.2.0/24", "via", "192.168.100.2"]);
        ip(&["route", "add", "default", "via", "192.168.100.254"]);
        for (neighbour, mac) in [
            ("192.168.100.2", BACKEND_NODE_MAC),
            ("192.168.100.254", ROUTER_MAC),
        ] {
            let mac = mac_text(mac);
            ip(&[
                "neigh",
                "add",
                neighbour,
                "lladdr",
                &mac,
                "dev",
                "uplink0",
                "nud",
                "permanent",
            ]);
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding on");
        f()
    })
}

/// A redirect to the next hop, counted.
fn assert_sent_on(dp: &Harness, run: &Run, dst_mac: [u8; 6], what: &str) {
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "{what}");
    assert!(dp.counter(Counter::Redirected) >= 1, "{what}");
    assert_eq!(&run.output[..6], &dst_mac, "{what}: next hop's MAC");
}

#[test]
fn node_port_from_outside_to_a_local_endpoint_keeps_the_client_address() {
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();

    let run = dp.run("from_outside", &syn);

    assert_eq!(run.verdict, TC_ACT_OK, "the stack delivers it to the pod");
    assert_translated(
        &syn,
        &run.output,
        outside_client(),
        local_backend(),
        "DNATed SYN",
    );
    assert!(dp
        .ct_get(&ct_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_some());
    assert_eq!(dp.nat().keys().count(), 0, "no SNAT for a local endpoint");
    assert_eq!(dp.counter(Counter::NewFlow), 1);

    // The pod's reply leaves through the uplink as the NodePort's.
    let reply = Tcp::new(local_backend(), outside_client(), SYN | ACK).build();
    let run = dp.run("to_outside", &reply);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&reply, &run.output, node_port(), outside_client(), "reply");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn packets_leaving_the_uplink_from_no_backend_are_not_looked_up() {
    // Only a backend's packets are looked up in conntrack on the uplink's
    // egress: the node's own traffic and its other pods' leave as they
    // are. A flow whose backend left the NodePort keeps its entries until
    // the client's next packet, but its former backend's packets pass.
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Tcp);
    dp.run(
        "from_outside",
        &Tcp::new(outside_client(), node_port(), SYN).build(),
    );
    node_port_to(&mut dp, addr([10, 244, 1, 12], 8080), true, Protocol::Tcp);
    assert!(
        dp.ct_get(&ct_key(
            local_backend(),
            outside_client(),
            Protocol::Tcp,
            ct_dir::REPLY
        ))
        .is_some(),
        "the reply entry is still there"
    );
    let reply = Tcp::new(local_backend(), outside_client(), SYN | ACK).build();

    let run = dp.run("to_outside", &reply);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(run.output, reply, "a packet of no backend leaves untouched");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 0);
}

#[test]
fn a_local_endpoints_lost_reply_entry_is_rebuilt_by_the_clients_next_packet_a_second_on() {
    // A flow of a masquerading NodePort to this node's own endpoint is in
    // conntrack (its NAT lookup, made first, misses). As on the pod path,
    // its REPLY entry is looked for only when a packet refreshes the flow
    // (at most once a second) or moves its state, not on every packet.
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Tcp);
    let original_key = ct_key(
        outside_client(),
        node_port(),
        Protocol::Tcp,
        ct_dir::ORIGINAL,
    );
    let reply_key = ct_key(
        local_backend(),
        outside_client(),
        Protocol::Tcp,
        ct_dir::REPLY,
    );
    let client = |flags| Tcp::new(outside_client(), node_port(), flags).build();
    let response = Tcp::new(local_backend(), outside_client(), ACK).build();
    assert_eq!(dp.run("from_outside", &client(SYN)).verdict, TC_ACT_OK);
    let syn_ack = Tcp::new(local_backend(), outside_client(), SYN | ACK).build();
    assert_eq!(dp.run("to_outside", &syn_ack).verdict, TC_ACT_OK);
    assert_eq!(dp.run("from_outside", &client(ACK)).verdict, TC_ACT_OK);
    let established = dp.ct_get(&original_key).expect("the flow");
    assert_eq!(established.state, ct_state::ESTABLISHED);
    let lost = dp.ct_get(&reply_key).expect("the reply entry");
    dp.conntrack
        .remove(&reply_key)
        .expect("evicting the reply entry");

    // Within the second: forwarded, the REPLY entry not looked for.
    let run = dp.run("from_outside", &client(ACK));
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &client(ACK),
        &run.output,
        outside_client(),
        local_backend(),
        "a packet within the second",
    );
    assert!(
        dp.ct_get(&reply_key).is_none(),
        "the REPLY entry is not looked for on every packet"
    );
    assert_eq!(dp.nat().keys().count(), 0, "no SNAT for a local endpoint");

    // A second on: the client's next packet rebuilds it.
    let mut aged = established;
    aged.last_seen_ns = monotonic_now_ns() - 2_000_000_000;
    dp.conntrack
        .insert(original_key, aged, 0)
        .expect("aging the flow");
    let run = dp.run("from_outside", &client(ACK));
    assert_translated(
        &client(ACK),
        &run.output,
        outside_client(),
        local_backend(),
        "a packet a second on",
    );
    let rebuilt = dp.ct_get(&reply_key).expect("the reply entry is back");
    assert_eq!(
        (rebuilt.original_key(), rebuilt.reply_key()),
        (lost.original_key(), lost.reply_key()),
        "the rebuilt entry translates as the lost one did"
    );
    let run = dp.run("to_outside", &response);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &response,
        &run.output,
        node_port(),
        outside_client(),
        "the response",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 2);
    assert_eq!(dp.counter(Counter::Established), 3);
}

#[test]
fn node_port_from_outside_to_a_remote_endpoint_is_snatted_to_the_node_and_back() {
    in_routed_netns(snatted_to_the_node_and_back);
}

fn snatted_to_the_node_and_back() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();

    let run = dp.run("from_outside", &syn);

    assert_sent_on(&dp, &run, BACKEND_NODE_MAC, "SNATed SYN");
    let snat = addr(NODE, SNAT_PORT);
    assert_eq!(
        endpoints(&run.output),
        (snat, remote_backend()),
        "SNAT + DNAT"
    );
    assert_checksums_ok(&run.output, "SNATed SYN");
    let nat = dp.nat();
    let original = nat
        .get(
            &nat_key(
                outside_client(),
                node_port(),
                IPPROTO_TCP,
                nat_dir::ORIGINAL,
            ),
            0,
        )
        .expect("NAT holds the original tuple");
    let reply = nat
        .get(
            &nat_key(remote_backend(), snat, IPPROTO_TCP, nat_dir::REPLY),
            0,
        )
        .expect("NAT holds the reply tuple, reserving the port");
    assert_eq!(original, reply);
    assert_eq!(original.nat_port, port_to_map(SNAT_PORT));
    assert_eq!(dp.ct_len(), 0, "conntrack is not used for SNATed flows");

    // The backend's answer to the node goes back to the client, from the
    // NodePort.
    let answer = Tcp::new(remote_backend(), snat, SYN | ACK).build();
    let run = dp.run("from_outside", &answer);
    assert!(
        matches!(run.verdict, TC_ACT_REDIRECT | TC_ACT_SHOT),
        "{}",
        run.verdict
    );
    assert_eq!(endpoints(&run.output), (node_port(), outside_client()));
    assert_checksums_ok(&run.output, "reverse-translated reply");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);

    // The next client packet follows the same translation.
    let ack = Tcp::new(outside_client(), node_port(), ACK).build();
    let run = dp.run("from_outside", &ack);
    assert_eq!(endpoints(&run.output), (snat, remote_backend()));
    assert_eq!(dp.counter(Counter::NewFlow), 1, "one flow");

    // Without a route the packet is dropped, never passed with the node's
    // address as source.
    let status = std::process::Command::new("ip")
        .args(["route", "replace", "unreachable", "10.244.2.0/24"])
        .status()
        .expect("ip");
    assert!(status.success());
    // (Once the flow's cached next hop is a second old.)
    age_hops(&dp);
    let run = dp.run("from_outside", &ack);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::FibLookupFailed), 1);
}

/// Every `NAT` entry's cached next hop made two seconds old.
fn age_hops(dp: &Harness) {
    let mut nat = dp.nat();
    let entries: Vec<(NatKey, NatEntry)> = nat.iter().map(Result::unwrap).collect();
    for (key, mut entry) in entries {
        entry.hop.checked = entry
            .hop
            .checked
            .wrapping_sub(HopCache::stamp(2 * HopCache::REFRESH_NS));
        nat.insert(key, entry, 0).unwrap();
    }
}

/// The cached next hop of the `NAT` entry from `src` to `dst`.
fn hop(dp: &Harness, src: SocketAddrV4, dst: SocketAddrV4, direction: u8) -> HopCache {
    dp.nat()
        .get(&nat_key(src, dst, IPPROTO_TCP, direction), 0)
        .expect("the flow's NAT entry")
        .hop
}

#[test]
fn established_snatted_flow_keeps_its_next_hop_for_a_second_then_follows_the_neighbour() {
    in_routed_netns(next_hop_cached);
}

fn next_hop_cached() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let (uplink, uplink_mac) = link("uplink0");
    let snat = addr(NODE, SNAT_PORT);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();
    assert_eq!(dp.run_xdp_on(&syn, uplink).verdict, XDP_TX);
    assert_eq!(
        hop(&dp, outside_client(), node_port(), nat_dir::ORIGINAL),
        HopCache::default(),
        "a new flow's hop is looked up, not cached"
    );
    let answer = Tcp::new(remote_backend(), snat, SYN | ACK).build();
    assert_eq!(dp.run_xdp_on(&answer, uplink).verdict, XDP_TX);
    let macs = |dst: [u8; 6]| {
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&dst);
        m[6..].copy_from_slice(&uplink_mac);
        m
    };
    let reply_hop = hop(&dp, remote_backend(), snat, nat_dir::REPLY);
    assert_eq!(
        (reply_hop.ifindex, reply_hop.macs),
        (uplink, macs(ROUTER_MAC)),
        "the reply direction's hop, in its own entry"
    );
    let ack = Tcp::new(outside_client(), node_port(), ACK).build();
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..12], &macs(BACKEND_NODE_MAC));
    let cached = hop(&dp, outside_client(), node_port(), nat_dir::ORIGINAL);
    assert_eq!(
        (cached.ifindex, cached.macs),
        (uplink, macs(BACKEND_NODE_MAC))
    );

    // The backend node's and the router's MACs change (a replaced NIC):
    // within the second both directions keep the cached hop (no FIB
    // lookup) ...
    let moved = [0x02, 0, 0, 0, 0, 0x22];
    let router_moved = [0x02, 0, 0, 0, 0, 0xfd];
    for (neighbour, mac) in [("192.168.100.2", moved), ("192.168.100.254", router_moved)] {
        let mac = mac_text(mac);
        ip(&[
            "neigh",
            "replace",
            neighbour,
            "lladdr",
            &mac,
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ]);
    }
    let answer_ack = Tcp::new(remote_backend(), snat, ACK).build();
    assert_eq!(
        &dp.run_xdp_on(&ack, uplink).output[..6],
        &BACKEND_NODE_MAC,
        "cached"
    );
    assert_eq!(
        &dp.run_xdp_on(&answer_ack, uplink).output[..6],
        &ROUTER_MAC,
        "cached"
    );
    // ... and once it is a second old, the next packet looks it up again
    // and caches the new one.
    age_hops(&dp);
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..6], &moved, "the new MAC");
    assert_eq!(endpoints(&run.output), (snat, remote_backend()));
    assert_checksums_ok(&run.output, "ACK");
    let run = dp.run_xdp_on(&answer_ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..6], &router_moved, "the router's new MAC");
    assert_eq!(endpoints(&run.output), (node_port(), outside_client()));
    assert_eq!(
        hop(&dp, outside_client(), node_port(), nat_dir::ORIGINAL).macs,
        macs(moved),
        "cached anew"
    );
    assert_eq!(
        hop(&dp, remote_backend(), snat, nat_dir::REPLY).macs,
        macs(router_moved)
    );
    assert_eq!(dp.counter(Counter::Established), 3);
    assert_eq!(dp.counter(Counter::ReplyTranslated), 3);
}

#[test]
fn snat_port_exhaustion_refuses_the_new_connection_and_counts_it() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let first = Tcp::new(outside_client(), node_port(), SYN).build();
    dp.run("from_outside", &first);
    let second = Tcp::new(addr([203, 0, 113, 6], 40_000), node_port(), SYN).build();

    let run = dp.run("from_outside", &second);

    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::NatPortsExhausted), 1);
    assert_eq!(dp.nat().keys().count(), 2, "the first flow keeps its port");
}

#[test]
fn a_snat_port_keeps_the_client_port_when_the_range_holds_it() {
    in_routed_netns(|| {
        let mut dp = node(1000);
        node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
        let client = addr([203, 0, 113, 5], SNAT_PORT + 500);
        let run = dp.run("from_outside", &Tcp::new(client, node_port(), SYN).build());
        assert_eq!(
            endpoints(&run.output),
            (addr(NODE, SNAT_PORT + 500), remote_backend()),
            "the client's own port, as netfilter's NAT keeps it"
        );

        // Another client on the same port must not share the tuple.
        let other = addr([203, 0, 113, 6], SNAT_PORT + 500);
        let run = dp.run("from_outside", &Tcp::new(other, node_port(), SYN).build());
        let (snat, backend) = endpoints(&run.output);
        assert_eq!(backend, remote_backend());
        assert_eq!(*snat.ip(), Ipv4Addr::from(NODE));
        assert_ne!(snat.port(), SNAT_PORT + 500, "a port of its own");
        assert!((SNAT_PORT..=SNAT_PORT + 1000).contains(&snat.port()));
        assert_eq!(dp.nat().keys().count(), 4, "two flows, two entries each");
        assert_eq!(dp.counter(Counter::NatPortsExhausted), 0);
    });
}

/// A busy client cycles through its ephemeral ports within seconds, each
/// connection closed (here by a reset) long before its closing flow
/// expires. With the range no larger than the client's ports, only the
/// port its own previous flow held is free for each reconnection: random
/// picks alone found it in 8 tries 40% of the time. Its ports inside the
/// SNAT range, then outside it (as the top of Linux's ephemeral range is
/// above the agent's default SNAT range).
#[test]
fn a_client_cycling_through_its_ports_is_never_refused_a_snat_port() {
    in_routed_netns(|| cycle_through_client_ports(SNAT_PORT));
    in_routed_netns(|| cycle_through_client_ports(SNAT_PORT + 100));
}

fn cycle_through_client_ports(first_client_port: u16) {
    const PORTS: u16 = 16;
    let mut dp = node(PORTS - 1);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    for _round in 0..3 {
        for i in 0..PORTS {
            let client = addr([203, 0, 113, 5], first_client_port + i);
            let run = dp.run("from_outside", &Tcp::new(client, node_port(), SYN).build());
            assert_sent_on(&dp, &run, BACKEND_NODE_MAC, &format!("SYN from {client}"));
            dp.run(
                "from_outside",
                &Tcp::new(client, node_port(), RST | ACK).build(),
            );
        }
    }
    assert_eq!(dp.counter(Counter::NatPortsExhausted), 0);
    assert_eq!(dp.counter(Counter::NewFlow), 3 * u64::from(PORTS));
}

#[test]
fn traffic_to_the_node_that_is_not_a_node_port_passes_untouched() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    for packet in [
        Tcp::new(outside_client(), addr(NODE, 22), SYN).build(),
        Udp::new(outside_client(), addr(NODE, NODE_PORT)).build(),
        Tcp::new(outside_client(), addr([192, 168, 100, 9], NODE_PORT), SYN).build(),
    ] {
        let run = dp.run("from_outside", &packet);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(run.output, packet);
    }
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
}

#[test]
fn load_balancer_ip_outside_its_source_ranges_is_dropped_and_counted() {
    let mut dp = node(0);
    dp.set_frontend_with(
        "web",
        external(lb_ip(), Protocol::Tcp),
        &[local_backend()],
        |spec| {
            spec.masquerade_remote = true;
            spec.local_ips = vec![(*local_backend().ip()).into()];
            spec.source_ranges = vec!["203.0.113.0/28".parse().unwrap()];
        },
    );
    let allowed = Tcp::new(outside_client(), lb_ip(), SYN).build();
    let run = dp.run("from_outside", &allowed);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &allowed,
        &run.output,
        outside_client(),
        local_backend(),
        "allowed",
    );

    let stranger = Tcp::new(addr([203, 0, 113, 77], 40_000), lb_ip(), SYN).build();
    let run = dp.run("from_outside", &stranger);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropSourceRange), 1);
}

#[test]
fn external_ip_is_served_without_being_a_node_address() {
    let mut dp = node(0);
    let external_ip = addr([192, 0, 2, 7], 80);
    dp.set_frontend_with(
        "web",
        external(external_ip, Protocol::Udp),
        &[local_backend()],
        |spec| {
            spec.masquerade_remote = true;
            spec.local_ips = vec![(*local_backend().ip()).into()];
        },
    );
    let query = Udp::new(outside_client(), external_ip)
        .payload(b"q")
        .build();
    let run = dp.run("from_outside", &query);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &query,
        &run.output,
        outside_client(),
        local_backend(),
        "UDP",
    );
    assert!(dp
        .ct_get(&ct_key(
            outside_client(),
            external_ip,
            Protocol::Udp,
            ct_dir::ORIGINAL
        ))
        .is_some_and(|e| e.proto == IPPROTO_UDP));
}

#[test]
fn policy_local_without_a_local_endpoint_drops_new_connections() {
    let mut dp = node(0);
    dp.set_frontend_with(
        "web",
        Frontend::node_port(NODE_PORT, Protocol::Tcp),
        &[],
        |spec| {
            spec.drop_without_local_endpoints = true;
        },
    );
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();
    let run = dp.run("from_outside", &syn);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropNoLocalEndpoints), 1);
}

#[test]
fn pods_reach_a_node_port_on_their_node_address_too() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let pod = addr([10, 244, 1, 10], 40_000);
    let syn = Tcp::new(pod, node_port(), SYN).build();
    let run = dp.run_from_pod(&syn);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&syn, &run.output, pod, remote_backend(), "pod to NodePort");
    let reply = Tcp::new(remote_backend(), pod, SYN | ACK).build();
    let run = dp.run_to_pod(&reply);
    assert_translated(&reply, &run.output, node_port(), pod, "reply to the pod");
}

// The XDP program in front of the tc one: the same pipeline on direct
// packet access, with its own checksum arithmetic (checked here against
// checksums computed from scratch), leaving to tc what only tc can do.

#[test]
fn xdp_dnats_a_node_port_to_a_local_endpoint_with_correct_checksums() {
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN)
        .payload(b"hello")
        .build();

    let run = dp.run_xdp(&syn);

    assert_eq!(run.verdict, XDP_PASS, "the stack delivers it to the pod");
    assert_translated(
        &syn,
        &run.output,
        outside_client(),
        local_backend(),
        "XDP DNAT",
    );
    assert!(dp
        .ct_get(&ct_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_some());
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    // The next segment follows the flow.
    let ack = Tcp::new(outside_client(), node_port(), ACK).build();
    let run = dp.run_xdp(&ack);
    assert_translated(
        &ack,
        &run.output,
        outside_client(),
        local_backend(),
        "XDP established",
    );
    assert_eq!(dp.counter(Counter::Established), 1);
}

#[test]
fn xdp_udp_checksums_follow_the_rewrite_and_zero_stays_zero() {
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Udp);
    let with = Udp::new(outside_client(), node_port())
        .payload(b"query")
        .build();
    let run = dp.run_xdp(&with);
    assert_eq!(run.verdict, XDP_PASS);
    assert_translated(&with, &run.output, outside_client(), local_backend(), "UDP");

    let client2 = addr([203, 0, 113, 9], 40_001);
    let without = Udp::new(client2, node_port())
        .payload(b"query")
        .no_checksum()
        .build();
    let run = dp.run_xdp(&without);
    assert_eq!(run.verdict, XDP_PASS);
    let l4_csum = 14 + 20 + 6;
    assert_eq!(
        &run.output[l4_csum..l4_csum + 2],
        &[0, 0],
        "no checksum stays none"
    );
    assert_eq!(endpoints(&run.output), (client2, local_backend()));
}

#[test]
fn xdp_leaves_what_it_cannot_finish_untouched_and_uncounted_for_tc() {
    let mut dp = node(0);
    dp.set_frontend_with(
        "web",
        Frontend::node_port(NODE_PORT, Protocol::Tcp),
        &[],
        |_| {},
    );
    for packet in [
        // No endpoints: tc answers with a RST.
        Tcp::new(outside_client(), node_port(), SYN).build(),
        // Not a NodePort: the node's own traffic.
        Tcp::new(outside_client(), addr(NODE, 22), SYN).build(),
    ] {
        let run = dp.run_xdp(&packet);
        assert_eq!(run.verdict, XDP_PASS);
        assert_eq!(run.output, packet);
    }
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
    // tc, behind it, refuses the connection.
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();
    let run = dp.run("from_outside", &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "a RST back to the client");
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
}

#[test]
fn xdp_hands_a_snat_flow_it_cannot_send_itself_to_tc_which_follows_it() {
    in_routed_netns(xdp_hands_over_to_tc);
}

fn xdp_hands_over_to_tc() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();

    let run = dp.run_xdp(&syn);

    // Under test-run the packet "arrives" on lo: the backend's next hop is
    // another interface (uplink0), which only tc sends to.
    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(run.output, syn, "left untouched for tc");
    assert_eq!(dp.nat().keys().count(), 2, "the flow is set up");
    let run = dp.run("from_outside", &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        endpoints(&run.output),
        (addr(NODE, SNAT_PORT), remote_backend()),
        "tc translates it as the flow says"
    );
    assert_eq!(dp.counter(Counter::Established), 1);
}

#[test]
fn xdp_drops_load_balancer_clients_outside_the_source_ranges() {
    let mut dp = node(0);
    dp.set_frontend_with(
        "web",
        external(lb_ip(), Protocol::Tcp),
        &[local_backend()],
        |spec| {
            spec.local_ips = vec![(*local_backend().ip()).into()];
            spec.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        },
    );
    let syn = Tcp::new(outside_client(), lb_ip(), SYN).build();
    let run = dp.run_xdp(&syn);
    assert_eq!(run.verdict, XDP_DROP);
    assert_eq!(dp.counter(Counter::DropSourceRange), 1);
}

#[test]
fn fragmentation_needed_about_a_snatted_flow_reaches_the_client_about_what_it_sent() {
    in_routed_netns(fragmentation_needed_reaches_the_client);
}

fn fragmentation_needed_reaches_the_client() {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();
    let sent = dp.run("from_outside", &syn).output;
    assert_eq!(endpoints(&sent), (addr(NODE, SNAT_PORT), remote_backend()));
    // A router between the nodes cannot forward it unfragmented.
    let router = Ipv4Addr::new(192, 168, 100, 254);
    let quote = &sent[14..14 + 28];
    let builder = PacketBuilder::ethernet2(ROUTER_MAC, [0x02, 0, 0, 0, 0, 0x01])
        .ipv4(router.octets(), NODE, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut error = Vec::with_capacity(builder.size(quote.len()));
    builder.write(&mut error, quote).expect("ICMP error");

    let run = dp.run("from_outside", &error);

    assert_sent_on(&dp, &run, ROUTER_MAC, "the error, towards the client");
    let out = &run.output;
    let f = dataplane_testkit::packets::ipv4_fields(out).expect("IPv4");
    assert_eq!(
        (f.src, f.dst),
        (router, *outside_client().ip()),
        "outer addresses"
    );
    let q = f.l4() + 8;
    let quoted = |off: usize| Ipv4Addr::new(out[off], out[off + 1], out[off + 2], out[off + 3]);
    let port = |off: usize| u16::from_be_bytes([out[off], out[off + 1]]);
    assert_eq!(
        (
            addr(quoted(q + 12).octets(), port(q + 20)),
            addr(quoted(q + 16).octets(), port(q + 22))
        ),
        (outside_client(), node_port()),
        "the quote is what the client sent"
    );
    assert_eq!(port(f.l4() + 6), 1400, "MTU kept");
    assert!(
        dataplane_testkit::packets::ip_checksum_ok(out)
            && dataplane_testkit::packets::l4_checksum_ok(out)
            && dataplane_testkit::packets::ones_sum(&out[q..q + 20]) == 0xffff,
        "checksums (outer IP, ICMP, quoted IP)"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// Both NAT entries of every flow from `client_port`, with `f` applied.
fn age_nat_flow(dp: &Harness, client_port: u16, f: impl Fn(&mut NatEntry)) {
    let mut nat = dp.nat();
    let entries: Vec<(NatKey, NatEntry)> = nat.iter().map(Result::unwrap).collect();
    for (key, mut entry) in entries {
        if entry.client_port == port_to_map(client_port) {
            f(&mut entry);
            nat.insert(key, entry, 0).unwrap();
        }
    }
}

#[test]
fn expired_nat_entries_are_swept_and_live_ones_kept() {
    let mut dp = node(1);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    let other_client = addr([203, 0, 113, 5], 40_001);
    for client in [outside_client(), other_client] {
        dp.run("from_outside", &Tcp::new(client, node_port(), SYN).build());
    }
    assert_eq!(dp.nat().keys().count(), 4, "two SNATed flows");
    // The first flow was last seen at boot: past any lifetime.
    age_nat_flow(&dp, outside_client().port(), |e| e.last_seen_ns = 0);

    let (removed, left) = sweep_nat(&mut dp.nat(), &CtLifetimes::default());

    assert_eq!((removed, left), (2, 2));
    let kept: Vec<NatEntry> = dp.nat().iter().map(|r| r.unwrap().1).collect();
    assert!(
        kept.iter()
            .all(|e| e.client_port == port_to_map(other_client.port())),
        "{kept:?}"
    );
}

#[test]
fn nat_last_seen_is_written_at_most_once_a_second() {
    in_routed_netns(nat_last_seen_once_a_second);
}

fn nat_last_seen_once_a_second() {
    let mut dp = node(0);
    node_port_to(&mut dp, remote_backend(), false, Protocol::Tcp);
    dp.run(
        "from_outside",
        &Tcp::new(outside_client(), node_port(), SYN).build(),
    );
    let original = nat_key(
        outside_client(),
        node_port(),
        IPPROTO_TCP,
        nat_dir::ORIGINAL,
    );
    let created = dp.nat().get(&original, 0).unwrap();
    let snat = addr(NODE, SNAT_PORT);

    // The answer within the second: the state moves on, the time stays.
    dp.run(
        "from_outside",
        &Tcp::new(remote_backend(), snat, SYN | ACK).build(),
    );
    let answered = dp.nat().get(&original, 0).unwrap();
    assert_eq!(answered.state, ct_state::ESTABLISHED);
    assert_eq!(answered.last_seen_ns, created.last_seen_ns);

    // Two seconds later (as the map says), the next packet writes it.
    let two_seconds_ago = created.last_seen_ns - 2_000_000_000;
    age_nat_flow(&dp, outside_client().port(), |e| {
        e.last_seen_ns = two_seconds_ago
    });
    dp.run(
        "from_outside",
        &Tcp::new(outside_client(), node_port(), ACK).build(),
    );
    let refreshed = dp.nat().get(&original, 0).unwrap();
    assert!(
        refreshed.last_seen_ns >= created.last_seen_ns,
        "{refreshed:?}"
    );
}

const ROUTER: [u8; 4] = [192, 168, 100, 254];

/// An ICMP error from the router to `to` about `quote` (an IPv4 packet, as
/// much of it as the router quotes), checksummed by etherparse.
fn icmp_error_from_router(to: [u8; 4], kind: etherparse::Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, [0x02, 0, 0, 0, 0, 0x01])
        .ipv4(ROUTER, to, 64)
        .icmpv4(kind);
    let mut error = Vec::with_capacity(builder.size(quote.len()));
    builder.write(&mut error, quote).expect("ICMP error");
    error
}

fn fragmentation_needed(mtu: u16) -> etherparse::Icmpv4Type {
    use etherparse::icmpv4::DestUnreachableHeader;
    etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

/// A NodePort flow from the outside client to the local backend: the SYN,
/// then the backend's SYN-ACK as it leaves the pod (returned) and as it
/// leaves the uplink (translated, returned).
fn local_node_port_flow(dp: &mut Harness) -> (Vec<u8>, Vec<u8>) {
    node_port_to(dp, local_backend(), true, Protocol::Tcp);
    let syn = Tcp::new(outside_client(), node_port(), SYN).build();
    assert_eq!(dp.run("from_outside", &syn).verdict, TC_ACT_OK);
    let reply = Tcp::new(local_backend(), outside_client(), SYN | ACK).build();
    let sent = dp.run("to_outside", &reply).output;
    assert_eq!(endpoints(&sent), (node_port(), outside_client()));
    (reply, sent)
}

/// Issue 12's path MTU discovery through a NodePort to a local backend: a
/// router towards the client cannot forward the backend's reply, which
/// left as the NodePort's, and tells the node address it came from. The
/// backend gets the error about what it sent (from its own address and
/// port), so its socket lowers its MSS. The router quotes the classic 28
/// bytes: every byte of the output is what the router would have sent the
/// backend itself, every checksum computed here by etherparse.
#[test]
fn fragmentation_needed_about_a_node_port_reply_of_a_local_backend_reaches_the_backend() {
    let mut dp = node(0);
    let (reply, sent) = local_node_port_flow(&mut dp);
    let error = icmp_error_from_router(NODE, fragmentation_needed(1400), &sent[14..14 + 28]);

    let run = dp.run("from_outside", &error);

    assert_eq!(run.verdict, TC_ACT_OK, "the stack delivers it to the pod");
    let expected = icmp_error_from_router(
        local_backend().ip().octets(),
        fragmentation_needed(1400),
        &reply[14..14 + 28],
    );
    assert_eq!(
        dataplane_testkit::packets::hex(&run.output),
        dataplane_testkit::packets::hex(&expected),
        "the error, to the backend about what it sent"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// The same on a load-balancer IP over UDP, the router quoting the whole
/// datagram (as Linux does): the quoted UDP checksum stays as it was sent
/// (receivers match errors by addresses and ports), everything else is
/// what the backend sent.
#[test]
fn icmp_errors_about_a_load_balancer_ip_flow_to_a_local_backend_reach_the_backend() {
    let mut dp = node(0);
    dp.set_frontend_with(
        "dns",
        external(lb_ip(), Protocol::Udp),
        &[local_backend()],
        |spec| spec.local_ips = vec![(*local_backend().ip()).into()],
    );
    let query = Udp::new(outside_client(), lb_ip())
        .payload(b"query")
        .build();
    assert_eq!(dp.run("from_outside", &query).verdict, TC_ACT_OK);
    let reply = Udp::new(local_backend(), outside_client())
        .payload(&[7u8; 600])
        .build();
    let sent = dp.run("to_outside", &reply).output;
    assert_eq!(endpoints(&sent), (lb_ip(), outside_client()));
    let error = icmp_error_from_router(
        lb_ip().ip().octets(),
        fragmentation_needed(576),
        &sent[14..],
    );

    let run = dp.run("from_outside", &error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut quote = reply[14..].to_vec();
    quote[26..28].copy_from_slice(&sent[14 + 26..14 + 28]);
    let expected = icmp_error_from_router(
        local_backend().ip().octets(),
        fragmentation_needed(576),
        &quote,
    );
    assert_eq!(
        dataplane_testkit::packets::hex(&run.output),
        dataplane_testkit::packets::hex(&expected),
        "the error, to the backend about what it sent"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// Under XDP the error passes untouched and uncounted to tc behind it,
/// which translates it.
#[test]
fn xdp_leaves_icmp_errors_about_a_local_backend_flow_to_tc_which_translates_them() {
    let mut dp = node(0);
    let (reply, sent) = local_node_port_flow(&mut dp);
    let error = icmp_error_from_router(NODE, fragmentation_needed(1400), &sent[14..14 + 28]);

    let run = dp.run_xdp(&error);

    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(run.output, error, "left untouched for tc");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0);
    let run = dp.run("from_outside", &error);
    assert_eq!(run.verdict, TC_ACT_OK);
    let expected = icmp_error_from_router(
        local_backend().ip().octets(),
        fragmentation_needed(1400),
        &reply[14..14 + 28],
    );
    assert_eq!(
        dataplane_testkit::packets::hex(&run.output),
        dataplane_testkit::packets::hex(&expected),
        "tc makes it about what the backend sent"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// Errors this node cannot match to a flow to a local backend are never
/// rewritten: a quote cut before the ports, one about a flow that does
/// not exist, and one addressed elsewhere than the quoted source.
#[test]
fn icmp_errors_from_outside_that_are_truncated_or_about_no_flow_pass_untouched() {
    let mut dp = node(0);
    let (_, sent) = local_node_port_flow(&mut dp);
    let truncated = icmp_error_from_router(NODE, fragmentation_needed(1400), &sent[14..14 + 22]);
    let mut other_client = sent[14..14 + 28].to_vec();
    other_client[16..20].copy_from_slice(&[203, 0, 113, 6]);
    let about_no_flow = icmp_error_from_router(NODE, fragmentation_needed(1400), &other_client);
    let elsewhere = icmp_error_from_router(
        lb_ip().ip().octets(),
        fragmentation_needed(1400),
        &sent[14..14 + 28],
    );
    dp.set_frontend_with(
        "lb",
        external(lb_ip(), Protocol::Tcp),
        &[local_backend()],
        |spec| spec.local_ips = vec![(*local_backend().ip()).into()],
    );

    for (error, what) in [
        (truncated, "truncated"),
        (about_no_flow, "about no flow"),
        (elsewhere, "to another frontend"),
    ] {
        let run = dp.run("from_outside", &error);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(run.output, error, "{what}: untouched");
    }
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0);
    assert_eq!(dp.counter(Counter::RewriteFailed), 0);
}

/// An ICMP error a local backend sends an outside client (a UDP port
/// unreachable, as a backend that stopped listening answers) leaves the
/// uplink about what the client sent, from the NodePort's address, as the
/// backend's replies do: the client's socket matches it and gets
/// ECONNREFUSED instead of waiting. Every byte but the quoted UDP checksum
/// (left as the backend got it) is what the node itself would have sent.
#[test]
fn icmp_errors_a_local_backend_sends_an_outside_client_are_about_the_node_port() {
    let mut dp = node(0);
    node_port_to(&mut dp, local_backend(), true, Protocol::Udp);
    let query = Udp::new(outside_client(), node_port())
        .payload(b"query")
        .build();
    let delivered = dp.run("from_outside", &query).output;
    assert_eq!(endpoints(&delivered), (outside_client(), local_backend()));
    let unreachable = |from: SocketAddrV4, quote: &[u8]| {
        use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
        let builder = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x01], ROUTER_MAC)
            .ipv4(from.ip().octets(), outside_client().ip().octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ));
        let mut error = Vec::with_capacity(builder.size(quote.len()));
        builder.write(&mut error, quote).expect("ICMP error");
        error
    };
    let error = unreachable(local_backend(), &delivered[14..]);

    let run = dp.run("to_outside", &error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut quote = query[14..].to_vec();
    quote[26..28].copy_from_slice(&delivered[14 + 26..14 + 28]);
    let expected = unreachable(node_port(), &quote);
    assert_eq!(
        dataplane_testkit::packets::hex(&run.output),
        dataplane_testkit::packets::hex(&expected),
        "the error, from the NodePort about what the client sent"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}
