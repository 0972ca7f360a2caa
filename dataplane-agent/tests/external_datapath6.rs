//! The external datapath on IPv6 (`from_outside` on an uplink's ingress,
//! `to_outside` on its egress) under BPF_PROG_TEST_RUN: frames from an
//! outside IPv6 client to a NodePort on the node's IPv6 address and to a
//! load-balancer IP. Expected frames are written out here and every
//! checksum is recomputed here over the IPv6 pseudo header, never taken
//! from the code under test.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::{Ipv6Addr, SocketAddrV6};

use aya::maps::{Array, Map, MapData, RingBuf};
use dataplane_agent::{
    control::model::Protocol,
    operator::monitor::{read_record, Record},
};
use dataplane_common::{
    ct_dir, map_names, nat_dir, service_flags, trace_families, trace_hook, Counter, HopCache,
    Trace6Tuple, TraceConfig, TraceEvent6, IPPROTO_TCP,
};
use dataplane_testkit::{
    datapath::{Harness, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX},
    datapath6::{ct6_key, nat6_key, Backend6Spec, Frontend6Options},
    netns::{in_new_netns, ip, link, mac_text},
    packets::{be32, hex, ACK, ETH_HLEN, SYN},
    packets6::{
        ipv6_fields, ipv6_frame, l4_checksum6_ok, tcp_segment, with_checksum6, ExtHeader, Tcp6,
        Udp6, IP6_L4, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    },
};

const NODE_PORT: u16 = 30080;
const SNAT_PORT: u16 = 61000;
const BACKEND_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn sa(addr: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr.parse().expect("an IPv6 address"), port, 0, 0)
}
fn node() -> Ipv6Addr {
    "fd00:192:168:100::1".parse().unwrap()
}
fn router() -> Ipv6Addr {
    "fd00:192:168:100::fe".parse().unwrap()
}
fn outside_client() -> SocketAddrV6 {
    sa("2001:db8:113::5", 40_000)
}
fn node_port() -> SocketAddrV6 {
    SocketAddrV6::new(node(), NODE_PORT, 0, 0)
}
/// The NodePort frontend: any of the node's addresses.
fn any_node_port() -> SocketAddrV6 {
    SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, NODE_PORT, 0, 0)
}
fn local_backend() -> SocketAddrV6 {
    sa("fd00:10:244:1::b", 8080)
}
fn remote_backend() -> SocketAddrV6 {
    sa("fd00:10:244:2::a", 8080)
}
fn lb_ip() -> SocketAddrV6 {
    sa("2001:db8:51:100::a", 80)
}

/// A node with address `node()` and one SNAT port.
fn node_harness() -> Harness {
    let dp = Harness::new();
    dp.set_node_address6(node());
    dp.set_snat6(node(), SNAT_PORT, SNAT_PORT);
    dp
}

/// An IPv6 NodePort with policy Cluster whose only endpoint is `backend`.
fn node_port_to(dp: &Harness, backend: SocketAddrV6, local: bool) -> u32 {
    dp.set_external6(
        0,
        any_node_port(),
        Protocol::Tcp,
        &[Backend6Spec {
            addr: backend,
            local,
        }],
        1,
        Frontend6Options {
            flags: service_flags::MASQUERADE_REMOTE,
            ..Default::default()
        },
    )
}

/// `input` with its IPv6 addresses and TCP ports replaced; the TCP segment
/// compared with one built and checksummed here.
#[track_caller]
fn assert_tcp_translated(
    input: &[u8],
    output: &[u8],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    flags: u8,
    what: &str,
) {
    assert_eq!(output.len(), input.len(), "{what}: length");
    assert_eq!(
        hex(&output[ETH_HLEN..ETH_HLEN + 8]),
        hex(&input[ETH_HLEN..ETH_HLEN + 8]),
        "{what}: IPv6 header before the addresses"
    );
    let f = ipv6_fields(output);
    assert_eq!((f.src, f.dst), (*src.ip(), *dst.ip()), "{what}: addresses");
    let ack = if flags & ACK != 0 { 5_000 } else { 0 };
    let segment = tcp_segment(src.port(), dst.port(), flags, 1_000, ack, b"");
    let expected = with_checksum6(*src.ip(), *dst.ip(), PROTO_TCP, segment);
    assert_eq!(
        hex(&output[IP6_L4..]),
        hex(&expected),
        "{what}: TCP segment (checksum recomputed here)"
    );
}

#[test]
fn ipv6_packets_leaving_the_uplink_from_no_backend_are_not_looked_up() {
    // As on IPv4: only a backend's packets are looked up in conntrack on
    // the uplink's egress.
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    dp.run(
        "from_outside",
        &Tcp6::new(outside_client(), node_port(), SYN).build(),
    );
    dp.remove_reply_source6(local_backend());
    assert!(
        dp.ct6_get(&ct6_key(
            local_backend(),
            outside_client(),
            Protocol::Tcp,
            ct_dir::REPLY
        ))
        .is_some(),
        "the reply entry is still there"
    );
    let reply = Tcp6::new(local_backend(), outside_client(), SYN | ACK).build();

    let run = dp.run("to_outside", &reply);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(
        hex(&run.output),
        hex(&reply),
        "a packet of no backend leaves untouched"
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 0);
}

#[test]
fn ipv6_node_port_to_a_local_endpoint_keeps_the_client_address_and_replies_come_from_it() {
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run("from_outside", &syn);

    assert_eq!(run.verdict, TC_ACT_OK, "the stack delivers it to the pod");
    assert_tcp_translated(
        &syn,
        &run.output,
        outside_client(),
        local_backend(),
        SYN,
        "DNATed SYN",
    );
    assert!(dp
        .ct6_get(&ct6_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_some());
    assert_eq!(dp.nat6_len(), 0, "no SNAT for a local endpoint");
    assert_eq!(dp.counter(Counter::NewFlow), 1);

    // The pod's reply leaves through the uplink as the NodePort's.
    let reply = Tcp6::new(local_backend(), outside_client(), SYN | ACK).build();
    let run = dp.run("to_outside", &reply);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_tcp_translated(
        &reply,
        &run.output,
        node_port(),
        outside_client(),
        SYN | ACK,
        "reply",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn ipv6_traffic_to_the_node_that_is_not_a_node_port_passes_untouched_and_uncounted() {
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    for packet in [
        Tcp6::new(outside_client(), SocketAddrV6::new(node(), 22, 0, 0), SYN).build(),
        Tcp6::new(outside_client(), sa("fd00:192:168:100::9", NODE_PORT), SYN).build(),
    ] {
        let run = dp.run("from_outside", &packet);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(hex(&run.output), hex(&packet));
    }
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
}

/// Runs `f` on a thread in a network namespace of its own (test runs look
/// routes up there) holding the node's IPv6 address on `uplink0`, a route
/// to the other node's pods and a default route, with permanent
/// neighbours.
fn in_routed_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_new_netns(move || {
        ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ]);
        ip(&["link", "set", "uplink0", "up"]);
        ip(&["link", "set", "uplink1", "up"]);
        ip(&[
            "-6",
            "addr",
            "add",
            "fd00:192:168:100::1/64",
            "dev",
            "uplink0",
            "nodad",
        ]);
        ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            "fd00:192:168:100::2",
        ]);
        ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:192:168:100::fe",
        ]);
        for (neighbour, mac) in [
            ("fd00:192:168:100::2", BACKEND_NODE_MAC),
            ("fd00:192:168:100::fe", ROUTER_MAC),
        ] {
            let mac = mac_text(mac);
            ip(&[
                "-6",
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
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("forwarding on");
        f()
    })
}

#[test]
fn ipv6_node_port_to_a_remote_endpoint_is_snatted_to_the_node_and_back() {
    in_routed_netns(snatted_to_the_node_and_back);
}

fn snatted_to_the_node_and_back() {
    let dp = node_harness();
    node_port_to(&dp, remote_backend(), false);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run("from_outside", &syn);

    assert_eq!(run.verdict, TC_ACT_REDIRECT, "sent on by the FIB");
    assert_eq!(
        &run.output[..6],
        &BACKEND_NODE_MAC,
        "the backend node's MAC"
    );
    let snat = SocketAddrV6::new(node(), SNAT_PORT, 0, 0);
    assert_tcp_translated(
        &syn,
        &run.output[..],
        snat,
        remote_backend(),
        SYN,
        "SNATed SYN",
    );
    let original = dp
        .nat6_get(&nat6_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            nat_dir::ORIGINAL,
        ))
        .expect("NAT6 holds the original tuple");
    let reply = dp
        .nat6_get(&nat6_key(
            remote_backend(),
            snat,
            Protocol::Tcp,
            nat_dir::REPLY,
        ))
        .expect("NAT6 holds the reply tuple, reserving the port");
    assert_eq!(original, reply);
    assert_eq!(dp.ct6_len(), 0, "conntrack is not used for SNATed flows");
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    assert_eq!(dp.counter(Counter::Redirected), 1);

    // The backend's answer to the node goes back to the client, from the
    // NodePort, through the router.
    let answer = Tcp6::new(remote_backend(), snat, SYN | ACK).build();
    let run = dp.run("from_outside", &answer);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.output[..6], &ROUTER_MAC, "towards the client");
    assert_tcp_translated(
        &answer,
        &run.output,
        node_port(),
        outside_client(),
        SYN | ACK,
        "reverse-translated reply",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);

    // The next client packet follows the same translation, one flow.
    let ack = Tcp6::new(outside_client(), node_port(), ACK).build();
    let run = dp.run("from_outside", &ack);
    assert_tcp_translated(&ack, &run.output, snat, remote_backend(), ACK, "ACK");
    assert_eq!(dp.counter(Counter::NewFlow), 1, "one flow");

    // A second client finds the only SNAT port taken: refused, counted.
    let other = Tcp6::new(sa("2001:db8:113::6", 40_000), node_port(), SYN).build();
    let run = dp.run("from_outside", &other);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::NatPortsExhausted), 1);
    assert_eq!(dp.nat6_len(), 2, "the first flow keeps its port");

    // Without a route the packet is dropped, never passed with the node's
    // address as source.
    let status = std::process::Command::new("ip")
        .args([
            "-6",
            "route",
            "replace",
            "unreachable",
            "fd00:10:244:2::/64",
        ])
        .status()
        .expect("ip");
    assert!(status.success());
    // (Once the flow's cached next hop is a second old.)
    age_hops6(&dp);
    let run = dp.run("from_outside", &ack);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::FibLookupFailed), 1);
}

/// Every `NAT6` entry's cached next hop made two seconds old.
fn age_hops6(dp: &Harness) {
    let mut nat = dp.nat6();
    let entries: Vec<_> = nat.iter().map(Result::unwrap).collect();
    for (key, mut entry) in entries {
        entry.hop.checked = entry
            .hop
            .checked
            .wrapping_sub(HopCache::stamp(2 * HopCache::REFRESH_NS));
        nat.insert(key, entry, 0).unwrap();
    }
}

/// The cached next hop of the `NAT6` entry from `src` to `dst`.
fn hop6(dp: &Harness, src: SocketAddrV6, dst: SocketAddrV6, direction: u8) -> HopCache {
    dp.nat6_get(&nat6_key(src, dst, Protocol::Tcp, direction))
        .expect("the flow's NAT6 entry")
        .hop
}

#[test]
fn ipv6_established_snatted_flow_keeps_its_next_hop_for_a_second_then_follows_the_route() {
    in_routed_netns(ipv6_next_hop_cached);
}

fn ipv6_next_hop_cached() {
    let dp = node_harness();
    node_port_to(&dp, remote_backend(), false);
    let (uplink, uplink_mac) = link("uplink0");
    let snat = SocketAddrV6::new(node(), SNAT_PORT, 0, 0);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();
    assert_eq!(dp.run_xdp_on(&syn, uplink).verdict, XDP_TX);
    assert_eq!(
        hop6(&dp, outside_client(), node_port(), nat_dir::ORIGINAL),
        HopCache::default(),
        "a new flow's hop is looked up, not cached"
    );
    let answer = Tcp6::new(remote_backend(), snat, SYN | ACK).build();
    assert_eq!(dp.run_xdp_on(&answer, uplink).verdict, XDP_TX);
    let mut to_router = [0u8; 12];
    to_router[..6].copy_from_slice(&ROUTER_MAC);
    to_router[6..].copy_from_slice(&uplink_mac);
    let reply_hop = hop6(&dp, remote_backend(), snat, nat_dir::REPLY);
    assert_eq!(
        (reply_hop.ifindex, reply_hop.macs),
        (uplink, to_router),
        "the reply direction's hop, in its own entry"
    );
    let ack = Tcp6::new(outside_client(), node_port(), ACK).build();
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..6], &BACKEND_NODE_MAC);
    let hop = hop6(&dp, outside_client(), node_port(), nat_dir::ORIGINAL);
    assert_eq!(
        (hop.ifindex, &hop.macs[..6]),
        (uplink, &BACKEND_NODE_MAC[..])
    );

    // The pods' route moves to another next hop: within the second the
    // flow keeps the cached one (no FIB lookup) ...
    let moved_mac = [0x02, 0, 0, 0, 0, 0x03];
    ip(&[
        "-6",
        "neigh",
        "add",
        "fd00:192:168:100::3",
        "lladdr",
        &mac_text(moved_mac),
        "dev",
        "uplink0",
        "nud",
        "permanent",
    ]);
    ip(&[
        "-6",
        "route",
        "replace",
        "fd00:10:244:2::/64",
        "via",
        "fd00:192:168:100::3",
    ]);
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(&run.output[..6], &BACKEND_NODE_MAC, "cached");
    // ... and once it is a second old, the next packet follows the route.
    age_hops6(&dp);
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..6], &moved_mac, "the new next hop");
    assert_tcp_translated(&ack, &run.output, snat, remote_backend(), ACK, "ACK");
    let hop = hop6(&dp, outside_client(), node_port(), nat_dir::ORIGINAL);
    assert_eq!(&hop.macs[..6], &moved_mac, "cached anew");
    assert_eq!(dp.counter(Counter::Established), 3);
}

#[test]
fn ipv6_packet_too_big_about_a_snatted_flow_reaches_the_client_about_what_it_sent() {
    in_routed_netns(packet_too_big_reaches_the_client);
}

fn packet_too_big_reaches_the_client() {
    let dp = node_harness();
    node_port_to(&dp, remote_backend(), false);
    let syn = Tcp6::new(outside_client(), node_port(), SYN)
        .payload(&[7u8; 64])
        .build();
    let sent = dp.run("from_outside", &syn).output;
    // A router between the nodes cannot forward it: Packet Too Big to the
    // node's SNAT address, quoting what it got.
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&1280u32.to_be_bytes());
    icmp.extend_from_slice(&sent[ETH_HLEN..]);
    let icmp = with_checksum6(router(), node(), PROTO_ICMPV6, icmp);
    let ptb = ipv6_frame(router(), node(), &[], PROTO_ICMPV6, &icmp);

    let run = dp.run("from_outside", &ptb);

    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.output[..6], &ROUTER_MAC, "towards the client");
    // Expected: to the client, the router still the source; the quote is
    // what the client sent (its quoted TCP checksum left as it was).
    let mut quote = sent[ETH_HLEN..].to_vec();
    quote[8..24].copy_from_slice(&outside_client().ip().octets());
    quote[24..40].copy_from_slice(&node().octets());
    quote[40..42].copy_from_slice(&outside_client().port().to_be_bytes());
    quote[42..44].copy_from_slice(&NODE_PORT.to_be_bytes());
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&1280u32.to_be_bytes());
    icmp.extend_from_slice(&quote);
    let icmp = with_checksum6(router(), *outside_client().ip(), PROTO_ICMPV6, icmp);
    let expected = ipv6_frame(router(), *outside_client().ip(), &[], PROTO_ICMPV6, &icmp);
    assert_eq!(
        hex(&run.output[ETH_HLEN..]),
        hex(&expected[ETH_HLEN..]),
        "the error, about what the client sent (ICMPv6 checksum recomputed here)"
    );
    assert!(l4_checksum6_ok(&run.output));
    assert_eq!(be32(&run.output, IP6_L4 + 4), 1280, "MTU kept");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

#[test]
fn ipv6_load_balancer_ip_admits_only_clients_in_its_ipv6_source_ranges() {
    let dp = node_harness();
    let service_id = dp.set_external6(
        0,
        lb_ip(),
        Protocol::Tcp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options {
            flags: service_flags::MASQUERADE_REMOTE | service_flags::SOURCE_RANGES,
            ..Default::default()
        },
    );
    dp.add_source_range6(service_id, "2001:db8:113::".parse().unwrap(), 64);
    let allowed = Tcp6::new(outside_client(), lb_ip(), SYN).build();
    let run = dp.run("from_outside", &allowed);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_tcp_translated(
        &allowed,
        &run.output,
        outside_client(),
        local_backend(),
        SYN,
        "allowed",
    );

    let stranger = Tcp6::new(sa("2001:db8:114::5", 40_000), lb_ip(), SYN).build();
    let run = dp.run("from_outside", &stranger);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropSourceRange), 1);
    assert_eq!(dp.counter(Counter::NewFlow), 1, "only the allowed client");
}

// XDP on the uplink (`xdp_from_outside`) runs the same pipeline on IPv6
// frames and leaves what it cannot finish to `from_outside` behind it.

#[test]
fn xdp_dnats_an_ipv6_node_port_to_a_local_endpoint_and_tc_leaves_it_alone() {
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run_xdp(&syn);

    assert_eq!(run.verdict, XDP_PASS, "the stack delivers it to the pod");
    assert_tcp_translated(
        &syn,
        &run.output,
        outside_client(),
        local_backend(),
        SYN,
        "DNATed on XDP",
    );
    assert!(dp
        .ct6_get(&ct6_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_some());
    assert_eq!(dp.counter(Counter::NewFlow), 1);

    // tc behind it sees a packet to the pod: not a frontend, left alone.
    let run = dp.run("from_outside", &run.output);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(dp.counter(Counter::NewFlow), 1, "counted once");

    // The next segment follows the flow on XDP.
    let ack = Tcp6::new(outside_client(), node_port(), ACK).build();
    let run = dp.run_xdp(&ack);
    assert_eq!(run.verdict, XDP_PASS);
    assert_tcp_translated(
        &ack,
        &run.output,
        outside_client(),
        local_backend(),
        ACK,
        "ACK on XDP",
    );
    assert_eq!(dp.counter(Counter::Established), 1);
}

/// The index and MAC address of `name` in the calling thread's namespace.
#[test]
fn xdp_snats_an_ipv6_node_port_to_a_remote_endpoint_and_sends_it_back_out_of_the_uplink() {
    in_routed_netns(xdp_snatted_to_the_node_and_back);
}

fn xdp_snatted_to_the_node_and_back() {
    let dp = node_harness();
    node_port_to(&dp, remote_backend(), false);
    let (uplink, uplink_mac) = link("uplink0");
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run_xdp_on(&syn, uplink);

    assert_eq!(run.verdict, XDP_TX, "out of the uplink it came in on");
    assert_eq!(&run.output[..6], &BACKEND_NODE_MAC, "to the backend's node");
    assert_eq!(&run.output[6..12], &uplink_mac, "from the uplink");
    let snat = SocketAddrV6::new(node(), SNAT_PORT, 0, 0);
    assert_tcp_translated(&syn, &run.output, snat, remote_backend(), SYN, "SNATed SYN");
    assert!(dp
        .nat6_get(&nat6_key(
            outside_client(),
            node_port(),
            Protocol::Tcp,
            nat_dir::ORIGINAL,
        ))
        .is_some());
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    assert_eq!(dp.counter(Counter::Redirected), 1);

    let answer = Tcp6::new(remote_backend(), snat, SYN | ACK).build();
    let run = dp.run_xdp_on(&answer, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(&run.output[..6], &ROUTER_MAC, "towards the client");
    assert_tcp_translated(
        &answer,
        &run.output,
        node_port(),
        outside_client(),
        SYN | ACK,
        "reverse-translated reply",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);

    let ack = Tcp6::new(outside_client(), node_port(), ACK).build();
    let run = dp.run_xdp_on(&ack, uplink);
    assert_eq!(run.verdict, XDP_TX);
    assert_tcp_translated(&ack, &run.output, snat, remote_backend(), ACK, "ACK");
    assert_eq!(dp.counter(Counter::NewFlow), 1, "one flow");
    assert_eq!(dp.counter(Counter::Established), 1);

    // Out of another interface (under test-run without one the packet
    // "arrives" on lo): left untouched to tc, which follows the flow.
    let run = dp.run_xdp(&ack);
    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(hex(&run.output), hex(&ack), "untouched for tc");
    assert_eq!(dp.counter(Counter::Established), 1, "counted by tc");
    let run = dp.run("from_outside", &ack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_tcp_translated(&ack, &run.output, snat, remote_backend(), ACK, "tc");
}

#[test]
fn xdp_leaves_a_refused_ipv6_client_to_tc_untouched_and_uncounted() {
    let dp = node_harness();
    dp.set_external6(
        0,
        any_node_port(),
        Protocol::Tcp,
        &[],
        1,
        Frontend6Options::default(),
    );
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run_xdp(&syn);

    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(hex(&run.output), hex(&syn));
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
    // tc, behind it, answers with a RST.
    let run = dp.run("from_outside", &syn);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "a RST back to the client");
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
}

#[test]
fn xdp_leaves_an_ipv6_flow_whose_backend_is_gone_to_tc_which_resets_it() {
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();
    assert_eq!(dp.run_xdp(&syn).verdict, XDP_PASS);
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    // The endpoint (backend id 1) goes away.
    dp.remove_backend6(1);
    let ack = Tcp6::new(outside_client(), node_port(), ACK).build();

    let run = dp.run_xdp(&ack);

    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(hex(&run.output), hex(&ack), "untouched for tc");
    let key = ct6_key(
        outside_client(),
        node_port(),
        Protocol::Tcp,
        ct_dir::ORIGINAL,
    );
    assert!(dp.ct6_get(&key).is_some(), "the flow is left for tc");
    let run = dp.run("from_outside", &ack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "a RST back to the client");
    assert_eq!(dp.counter(Counter::ResetBackendGone), 1);
    assert!(dp.ct6_get(&key).is_none());
}

#[test]
fn xdp_passes_ipv6_that_is_not_for_a_frontend_and_ndp_untouched_and_uncounted() {
    let dp = node_harness();
    node_port_to(&dp, local_backend(), true);
    // A neighbour solicitation for the node's address, from the router.
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&node().octets());
    let ns = with_checksum6(router(), node(), PROTO_ICMPV6, ns);
    let mut echo = vec![128, 0, 0, 0, 0, 1, 0, 1];
    echo.extend_from_slice(b"ping");
    let echo = with_checksum6(*outside_client().ip(), node(), PROTO_ICMPV6, echo);
    for packet in [
        Tcp6::new(outside_client(), SocketAddrV6::new(node(), 22, 0, 0), SYN).build(),
        Tcp6::new(outside_client(), sa("fd00:192:168:100::9", NODE_PORT), SYN).build(),
        ipv6_frame(router(), node(), &[], PROTO_ICMPV6, &ns),
        ipv6_frame(*outside_client().ip(), node(), &[], PROTO_ICMPV6, &echo),
    ] {
        let run = dp.run_xdp(&packet);
        assert_eq!(run.verdict, XDP_PASS);
        assert_eq!(hex(&run.output), hex(&packet));
    }
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
}

#[test]
fn xdp_drops_ipv6_load_balancer_clients_outside_the_source_ranges() {
    let dp = node_harness();
    let service_id = dp.set_external6(
        0,
        lb_ip(),
        Protocol::Tcp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options {
            flags: service_flags::SOURCE_RANGES,
            ..Default::default()
        },
    );
    dp.add_source_range6(service_id, "2001:db8:113::".parse().unwrap(), 64);
    let stranger = Tcp6::new(sa("2001:db8:114::5", 40_000), lb_ip(), SYN).build();

    let run = dp.run_xdp(&stranger);

    assert_eq!(run.verdict, XDP_DROP);
    assert_eq!(dp.counter(Counter::DropSourceRange), 1);
}

#[test]
fn xdp_translates_ipv6_udp_after_extension_headers_with_a_valid_checksum() {
    let dp = node_harness();
    dp.set_external6(
        0,
        any_node_port(),
        Protocol::Udp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options {
            flags: service_flags::MASQUERADE_REMOTE,
            ..Default::default()
        },
    );
    let ext = [ExtHeader::HopByHop, ExtHeader::DestOpts];
    let query = Udp6::new(outside_client(), node_port()).ext(&ext).build();

    let run = dp.run_xdp(&query);

    assert_eq!(run.verdict, XDP_PASS);
    let expected = Udp6::new(outside_client(), local_backend())
        .ext(&ext)
        .build();
    assert_eq!(
        hex(&run.output),
        hex(&expected),
        "DNATed past the extension headers (checksum recomputed here)"
    );
    assert_eq!(ipv6_fields(&run.output).proto, PROTO_UDP);
    assert_eq!(dp.counter(Counter::NewFlow), 1);
}

#[test]
fn xdp_leaves_ipv6_fragments_to_tc_untouched_and_uncounted() {
    let dp = node_harness();
    dp.set_external6(
        0,
        any_node_port(),
        Protocol::Udp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options::default(),
    );
    let fragments = Udp6::new(outside_client(), node_port())
        .payload(&[9u8; 64])
        .fragments(7, 40);
    for fragment in &fragments {
        let run = dp.run_xdp(fragment);
        assert_eq!(run.verdict, XDP_PASS);
        assert_eq!(hex(&run.output), hex(fragment));
    }
    assert!(
        dp.counters().iter().all(|(_, n)| *n == 0),
        "{:?}",
        dp.counters()
    );
    // tc translates them.
    let run = dp.run("from_outside", &fragments[0]);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(dp.counter(Counter::NewFlow), 1);
}

/// Turns IPv6 tracing on, as `monitor` does.
fn trace6(dp: &Harness) {
    let data = MapData::from_pin(dp.bpffs().join(map_names::TRACE_CONFIG)).expect("TRACE_CONFIG");
    let mut config: Array<MapData, TraceConfig> =
        Array::try_from(Map::Array(data)).expect("an array");
    let value = TraceConfig {
        enabled: trace_families::IPV6,
        ..TraceConfig::default()
    };
    config.set(0, value, 0).expect("writing TRACE_CONFIG");
}

/// The records on `TRACE_EVENTS` so far; panics on an IPv4 one.
fn trace_events6(dp: &Harness) -> Vec<TraceEvent6> {
    let data = MapData::from_pin(dp.bpffs().join(map_names::TRACE_EVENTS)).expect("TRACE_EVENTS");
    let mut ring = RingBuf::try_from(Map::RingBuf(data)).expect("a ring buffer");
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        match read_record(&item) {
            Some(Record::V6(event)) => events.push(event),
            other => panic!("an IPv6 record, not {other:?}"),
        }
    }
    events
}

fn tuple6(src: SocketAddrV6, dst: SocketAddrV6) -> Trace6Tuple {
    Trace6Tuple {
        src_addr: src.ip().octets(),
        dst_addr: dst.ip().octets(),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
    }
}

#[test]
fn xdp_traces_an_ipv6_node_port_dnat_once_and_tc_behind_it_does_not_again() {
    let dp = node_harness();
    let service_id = node_port_to(&dp, local_backend(), true);
    trace6(&dp);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    let run = dp.run_xdp(&syn);
    assert_eq!(run.verdict, XDP_PASS);

    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "one event for the SYN: {events:?}");
    let e = events[0];
    assert_eq!(e.family, TraceEvent6::FAMILY);
    assert_eq!(e.hook, trace_hook::FROM_OUTSIDE);
    assert_eq!(e.proto, IPPROTO_TCP);
    assert_eq!(e.decision, Counter::NewFlow as u8);
    assert_eq!((e.service_id, e.backend_id), (service_id, 1));
    assert_eq!(e.before, tuple6(outside_client(), node_port()), "as sent");
    assert_eq!(e.after, tuple6(outside_client(), local_backend()), "DNATed");

    // tc behind it sees a packet to the pod: no decision, no event.
    assert_eq!(dp.run("from_outside", &run.output).verdict, TC_ACT_OK);
    assert_eq!(trace_events6(&dp), [], "traced once, by XDP");
}

#[test]
fn xdp_leaves_the_trace_of_a_refused_ipv6_client_to_tc() {
    let dp = node_harness();
    let service_id = dp.set_external6(
        0,
        any_node_port(),
        Protocol::Tcp,
        &[],
        1,
        Frontend6Options::default(),
    );
    trace6(&dp);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();

    assert_eq!(dp.run_xdp(&syn).verdict, XDP_PASS);
    assert_eq!(trace_events6(&dp), [], "XDP passes it on untraced");

    assert_eq!(dp.run("from_outside", &syn).verdict, TC_ACT_REDIRECT);
    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(e.hook, trace_hook::FROM_OUTSIDE);
    assert_eq!(e.decision, Counter::RejectNoEndpoints as u8);
    assert_eq!((e.service_id, e.backend_id), (service_id, 0));
    assert_eq!(e.before, tuple6(outside_client(), node_port()));
    assert_eq!(e.after, e.before, "refused untranslated");
}

/// A Packet Too Big from the router to `to` about `quote` (an IPv6
/// packet), its checksum computed here.
fn packet_too_big_from_router(to: Ipv6Addr, mtu: u32, quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let icmp = with_checksum6(router(), to, PROTO_ICMPV6, icmp);
    ipv6_frame(router(), to, &[], PROTO_ICMPV6, &icmp)
}

/// A NodePort flow from the outside client to the local backend; the
/// backend's SYN-ACK as it leaves the uplink (as the NodePort's).
fn local_node_port_flow(dp: &Harness) -> Vec<u8> {
    node_port_to(dp, local_backend(), true);
    let syn = Tcp6::new(outside_client(), node_port(), SYN).build();
    assert_eq!(dp.run("from_outside", &syn).verdict, TC_ACT_OK);
    let reply = Tcp6::new(local_backend(), outside_client(), SYN | ACK)
        .payload(&[7u8; 64])
        .build();
    let sent = dp.run("to_outside", &reply).output;
    let f = ipv6_fields(&sent);
    assert_eq!((f.src, f.dst), (node(), *outside_client().ip()));
    sent
}

/// `sent` (a frame that left as the NodePort's) as the backend sent it:
/// from its address and port, its TCP checksum left as it left.
fn as_the_backend_sent_it(sent: &[u8]) -> Vec<u8> {
    let mut quote = sent[ETH_HLEN..].to_vec();
    quote[8..24].copy_from_slice(&local_backend().ip().octets());
    quote[40..42].copy_from_slice(&local_backend().port().to_be_bytes());
    quote
}

/// Issue 15's path MTU discovery through a NodePort to a local backend: a
/// router towards the client cannot forward the backend's reply, which
/// left as the NodePort's, and tells the node address it came from. The
/// backend gets the Packet Too Big about what it sent, so its socket
/// lowers its MSS; the ICMPv6 checksum (over the new pseudo header) is
/// recomputed here.
#[test]
fn ipv6_packet_too_big_about_a_node_port_reply_of_a_local_backend_reaches_the_backend() {
    let dp = node_harness();
    let sent = local_node_port_flow(&dp);
    trace6(&dp);
    let ptb = packet_too_big_from_router(node(), 1280, &sent[ETH_HLEN..]);

    let run = dp.run("from_outside", &ptb);

    assert_eq!(run.verdict, TC_ACT_OK, "the stack delivers it to the pod");
    let expected =
        packet_too_big_from_router(*local_backend().ip(), 1280, &as_the_backend_sent_it(&sent));
    assert_eq!(
        hex(&run.output),
        hex(&expected),
        "the error, to the backend about what it sent (checksum recomputed here)"
    );
    assert!(l4_checksum6_ok(&run.output));
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(e.decision, Counter::IcmpErrorTranslated as u8);
    assert_eq!(e.proto, PROTO_ICMPV6);
    let from_router = SocketAddrV6::new(router(), 0, 0, 0);
    assert_eq!(
        e.before,
        tuple6(from_router, SocketAddrV6::new(node(), 0, 0, 0))
    );
    assert_eq!(
        e.after,
        tuple6(
            from_router,
            SocketAddrV6::new(*local_backend().ip(), 0, 0, 0)
        )
    );
}

/// The same on a load-balancer IP, the error being a destination
/// unreachable (what a router without a route to the client sends).
#[test]
fn ipv6_icmp_errors_about_a_load_balancer_ip_flow_to_a_local_backend_reach_the_backend() {
    let dp = node_harness();
    dp.set_external6(
        0,
        lb_ip(),
        Protocol::Tcp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options::default(),
    );
    let syn = Tcp6::new(outside_client(), lb_ip(), SYN).build();
    assert_eq!(dp.run("from_outside", &syn).verdict, TC_ACT_OK);
    let reply = Tcp6::new(local_backend(), outside_client(), SYN | ACK).build();
    let sent = dp.run("to_outside", &reply).output;
    assert_eq!(ipv6_fields(&sent).src, *lb_ip().ip());
    let unreachable = |to: Ipv6Addr, quote: &[u8]| {
        let mut icmp = vec![1, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quote);
        let icmp = with_checksum6(router(), to, PROTO_ICMPV6, icmp);
        ipv6_frame(router(), to, &[], PROTO_ICMPV6, &icmp)
    };
    let error = unreachable(*lb_ip().ip(), &sent[ETH_HLEN..]);

    let run = dp.run("from_outside", &error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut quote = sent[ETH_HLEN..].to_vec();
    quote[8..24].copy_from_slice(&local_backend().ip().octets());
    quote[40..42].copy_from_slice(&local_backend().port().to_be_bytes());
    let expected = unreachable(*local_backend().ip(), &quote);
    assert_eq!(hex(&run.output), hex(&expected));
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// XDP passes every ICMPv6 message to tc behind it, untouched and
/// uncounted; tc translates the Packet Too Big.
#[test]
fn xdp_leaves_ipv6_packet_too_big_about_a_local_backend_flow_to_tc_which_translates_it() {
    let dp = node_harness();
    let sent = local_node_port_flow(&dp);
    let ptb = packet_too_big_from_router(node(), 1280, &sent[ETH_HLEN..]);

    let run = dp.run_xdp(&ptb);

    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(hex(&run.output), hex(&ptb), "left untouched for tc");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0);
    let run = dp.run("from_outside", &ptb);
    assert_eq!(run.verdict, TC_ACT_OK);
    let expected =
        packet_too_big_from_router(*local_backend().ip(), 1280, &as_the_backend_sent_it(&sent));
    assert_eq!(hex(&run.output), hex(&expected), "translated by tc");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

/// Errors this node cannot match to a flow to a local backend are never
/// rewritten: a quote cut before the ports, one about another client,
/// and one addressed elsewhere than the quoted source.
#[test]
fn ipv6_icmp_errors_from_outside_that_are_truncated_or_about_no_flow_pass_untouched() {
    let dp = node_harness();
    let sent = local_node_port_flow(&dp);
    dp.set_external6(
        0,
        lb_ip(),
        Protocol::Tcp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options::default(),
    );
    let quote = &sent[ETH_HLEN..];
    let mut other_client = quote.to_vec();
    other_client[39] ^= 1;
    for (error, what) in [
        (
            packet_too_big_from_router(node(), 1280, &quote[..42]),
            "truncated",
        ),
        (
            packet_too_big_from_router(node(), 1280, &other_client),
            "about no flow",
        ),
        (
            packet_too_big_from_router(*lb_ip().ip(), 1280, quote),
            "to another frontend",
        ),
    ] {
        let run = dp.run("from_outside", &error);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(hex(&run.output), hex(&error), "{what}: untouched");
    }
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0);
    assert_eq!(dp.counter(Counter::RewriteFailed), 0);
}

/// An ICMPv6 error a local backend sends an outside client (a UDP port
/// unreachable) leaves the uplink about what the client sent, from the
/// NodePort's address, as the backend's replies do; the ICMPv6 checksum
/// (over the new pseudo header) is recomputed here, the quoted UDP
/// checksum left as the backend got it.
#[test]
fn ipv6_icmp_errors_a_local_backend_sends_an_outside_client_are_about_the_node_port() {
    let dp = node_harness();
    dp.set_external6(
        0,
        any_node_port(),
        Protocol::Udp,
        &[Backend6Spec {
            addr: local_backend(),
            local: true,
        }],
        1,
        Frontend6Options::default(),
    );
    let query = Udp6::new(outside_client(), node_port()).build();
    let delivered = dp.run("from_outside", &query).output;
    assert_eq!(ipv6_fields(&delivered).dst, *local_backend().ip());
    let unreachable = |from: Ipv6Addr, quote: &[u8]| {
        let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quote);
        let icmp = with_checksum6(from, *outside_client().ip(), PROTO_ICMPV6, icmp);
        ipv6_frame(from, *outside_client().ip(), &[], PROTO_ICMPV6, &icmp)
    };
    let error = unreachable(*local_backend().ip(), &delivered[ETH_HLEN..]);

    let run = dp.run("to_outside", &error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut quote = query[ETH_HLEN..].to_vec();
    quote[46..48].copy_from_slice(&delivered[IP6_L4 + 6..IP6_L4 + 8]);
    let expected = unreachable(node(), &quote);
    assert_eq!(
        hex(&run.output),
        hex(&expected),
        "the error, from the NodePort about what the client sent"
    );
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}
