//! `--direct-redirect` under BPF_PROG_TEST_RUN: a pod's packet DNATed to a
//! backend is redirected where the FIB of the test's own network namespace
//! sends it, with that next hop's MAC addresses, and left to the stack
//! where the FIB has no answer to act on.
//!
//! The same for IPv6 (`ipv6_*`), on the IPv6 FIB and `LB6_REPLY_SOURCES`.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs and
//! runs in a network namespace of its own).

use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use dataplane_agent::{
    control::model::{Frontend, Protocol},
    node::datapath::DatapathConfig,
};
use dataplane_common::{
    ipv4_to_map, map_names, port_to_map, reply_source_flags, Counter, ReplySource, IPPROTO_TCP,
};
use dataplane_testkit::datapath::{addr, Bpffs, Harness, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS};
use dataplane_testkit::datapath6::Frontend6Options;
use dataplane_testkit::netns::{in_new_netns, ip, mac_text};
use dataplane_testkit::packets::{assert_translated, hex, Tcp, ACK, ETH_HLEN, SYN};
use dataplane_testkit::packets6::{
    endpoints6, ipv6_fields, l4_checksum6_ok, with_checksum6, Tcp6, PROTO_TCP,
};

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 80)
}
/// A pod of this node, routed over its own veth (`pod0`).
fn local_backend() -> SocketAddrV4 {
    addr([10, 244, 1, 20], 8080)
}
/// A pod of the other node, behind 192.168.100.2 on `uplink0`.
fn remote_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 8080)
}
/// A pod whose next hop has no neighbour entry yet.
fn unresolved_backend() -> SocketAddrV4 {
    addr([10, 244, 3, 10], 8080)
}

const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// In the calling thread's namespace (sysfs shows the mount's).
fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("ifindex of {name}: {e}"))
}

/// Runs `f` on a thread in a network namespace of its own holding the
/// client's veth `cli0`, a local backend's veth `pod0` (a /32 route), an
/// uplink towards the other node's pods and a route without a neighbour.
fn in_node_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_new_netns(move || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding on");
        for (host, peer) in [("cli0", "cli1"), ("pod0", "pod1"), ("uplink0", "uplink1")] {
            ip(&["link", "add", host, "type", "veth", "peer", "name", peer]);
            ip(&["link", "set", host, "up"]);
            ip(&["link", "set", peer, "up"]);
        }
        ip(&["addr", "add", "192.168.100.1/24", "dev", "uplink0"]);
        ip(&["route", "add", "10.244.1.10/32", "dev", "cli0"]);
        ip(&["route", "add", "10.244.1.20/32", "dev", "pod0"]);
        ip(&["route", "add", "10.244.2.0/24", "via", "192.168.100.2"]);
        ip(&["route", "add", "10.244.3.0/24", "via", "192.168.100.3"]);
        let pod_mac = mac_text(POD_MAC);
        let node_mac = mac_text(NODE_MAC);
        ip(&[
            "neigh",
            "add",
            "10.244.1.20",
            "lladdr",
            &pod_mac,
            "dev",
            "pod0",
            "nud",
            "permanent",
        ]);
        ip(&[
            "neigh",
            "add",
            "192.168.100.2",
            "lladdr",
            &node_mac,
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ]);
        f()
    })
}

fn node(direct_redirect: bool) -> Harness {
    let config = DatapathConfig {
        direct_redirect,
        ..DatapathConfig::default()
    };
    let mut dp = Harness::load_on(Bpffs::new().expect("a bpffs"), &config)
        .unwrap_or_else(|e| panic!("{e:#}"));
    dp.set_service("web", service(), Protocol::Tcp, &[local_backend()]);
    dp
}

/// `output` with `input`'s MAC addresses, for comparing the rest.
fn with_macs_of(input: &[u8], output: &[u8]) -> Vec<u8> {
    let mut out = output.to_vec();
    out[..12].copy_from_slice(&input[..12]);
    out
}

/// The interface `REPLY_SOURCES` holds for `backend` (1: none learned).
fn learned_interface(dp: &Harness, backend: SocketAddrV4) -> Option<u32> {
    reply_source_value(dp, backend).map(|v| v & reply_source_flags::IFINDEX_MASK)
}

/// `backend`'s `REPLY_SOURCES` value: its interface.
fn reply_source_value(dp: &Harness, backend: SocketAddrV4) -> Option<u32> {
    reply_sources_get(
        dp,
        ReplySource {
            addr: ipv4_to_map(backend.ip().octets()),
            port: port_to_map(backend.port()),
            proto: IPPROTO_TCP,
            _pad: 0,
        },
    )
}

/// The `REPLY_SOURCES` value of `backend`'s address: 1 and the "no flows
/// yet" bits.
fn reply_address_value(dp: &Harness, backend: SocketAddrV4) -> Option<u32> {
    reply_sources_get(dp, ReplySource::address(ipv4_to_map(backend.ip().octets())))
}

fn reply_sources_get(dp: &Harness, key: ReplySource) -> Option<u32> {
    let data = MapData::from_pin(dp.bpffs().join(map_names::REPLY_SOURCES)).expect("pinned map");
    let map: BpfHashMap<MapData, ReplySource, u32> =
        BpfHashMap::try_from(Map::HashMap(data)).expect("a hash map");
    map.get(&key, 0).ok()
}

#[test]
fn a_local_backend_gets_the_packet_through_its_learned_pod_interface() {
    in_node_netns(|| {
        let dp = node(true);
        let (cli0, pod0) = (ifindex("cli0"), ifindex("pod0"));
        let syn = Tcp::new(client(), service(), SYN).build();

        // Before any flow was seen going into the pod: sent out of `pod0`
        // (where `to_pod` sees it) with the pod's MAC.
        let first = dp.run_on("from_pod", &syn, cli0);
        assert_eq!(first.verdict, TC_ACT_REDIRECT, "first SYN");
        assert_eq!(&first.output[..6], &POD_MAC, "first SYN: the pod's MAC");
        assert_translated(
            &syn,
            &with_macs_of(&syn, &first.output),
            client(),
            local_backend(),
            "first SYN",
        );
        assert_eq!(learned_interface(&dp, local_backend()), Some(1));

        // `to_pod` on the pod's interface learns it from the opening packet.
        let run = dp.run_on("to_pod", &first.output, pod0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(learned_interface(&dp, local_backend()), Some(pod0));
        // A packet into another interface, or not opening a flow, teaches nothing.
        let ack = Tcp::new(client(), local_backend(), ACK).build();
        dp.run_on("to_pod", &ack, cli0);
        assert_eq!(learned_interface(&dp, local_backend()), Some(pod0));

        // The flow's next packet: into the pod's namespace (the verdict is
        // the same redirect; the MACs are the pod's and `pod0`'s).
        let ack = Tcp::new(client(), service(), ACK).build();
        let run = dp.run_on("from_pod", &ack, cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "established ACK");
        assert_eq!(&run.output[..6], &POD_MAC, "established ACK: the pod's MAC");
        assert_translated(
            &ack,
            &with_macs_of(&ack, &run.output),
            client(),
            local_backend(),
            "ACK",
        );
        assert!(dp.counter(Counter::Redirected) >= 2);
    });
}

#[test]
fn a_remote_backend_gets_the_packet_through_the_fib_next_hop() {
    in_node_netns(|| {
        let mut dp = node(true);
        dp.set_service("web", service(), Protocol::Tcp, &[remote_backend()]);
        let syn = Tcp::new(client(), service(), SYN).build();

        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));

        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(&run.output[..6], &NODE_MAC, "the other node's MAC");
        assert_translated(
            &syn,
            &with_macs_of(&syn, &run.output),
            client(),
            remote_backend(),
            "SYN",
        );
    });
}

#[test]
fn without_a_neighbour_entry_or_with_direct_redirect_off_the_stack_delivers() {
    in_node_netns(|| {
        let mut dp = node(true);
        dp.set_service("web", service(), Protocol::Tcp, &[unresolved_backend()]);
        let syn = Tcp::new(client(), service(), SYN).build();
        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));
        assert_eq!(
            run.verdict, TC_ACT_OK,
            "no neighbour: the stack resolves it"
        );
        assert_translated(&syn, &run.output, client(), unresolved_backend(), "SYN");

        let dp = node(false);
        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));
        assert_eq!(run.verdict, TC_ACT_OK, "--direct-redirect false");
        assert_translated(&syn, &run.output, client(), local_backend(), "SYN");
        assert_eq!(dp.counter(Counter::Redirected), 0);
    });
}

/// A pod of the other node behind a route whose MTU is locked below the
/// uplink's, as over a tunnel.
fn narrow_route_backend() -> SocketAddrV4 {
    addr([10, 244, 4, 10], 8080)
}

/// A TCP segment from the client to the service, `ip_len` bytes of IPv4.
fn segment_of(client: SocketAddrV4, ip_len: usize) -> Vec<u8> {
    Tcp::new(client, service(), ACK)
        .payload(&vec![0x5a; ip_len - 40])
        .build()
}

#[test]
fn a_packet_larger_than_the_path_mtu_is_left_to_the_stack() {
    in_node_netns(|| {
        let cli0 = ifindex("cli0");
        ip(&[
            "route",
            "add",
            "10.244.4.0/24",
            "via",
            "192.168.100.2",
            "mtu",
            "lock",
            "1400",
        ]);
        let mut dp = node(true);
        dp.set_service("web", service(), Protocol::Tcp, &[narrow_route_backend()]);
        let syn = Tcp::new(client(), service(), SYN).build();
        assert_eq!(dp.run_on("from_pod", &syn, cli0).verdict, TC_ACT_REDIRECT);

        // Over the route's MTU, under the uplink's: the stack fragments it
        // or tells the client.
        let big = segment_of(client(), 1450);
        let run = dp.run_on("from_pod", &big, cli0);
        assert_eq!(run.verdict, TC_ACT_OK, "1450 bytes over a 1400-byte route");
        assert_translated(&big, &run.output, client(), narrow_route_backend(), "1450");
        let fits = segment_of(client(), 1400);
        let run = dp.run_on("from_pod", &fits, cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "1400 bytes fit the route");

        // Over the egress device's MTU by two bytes: within the slack the
        // kernel's own check of the skb allows (VLAN headers), not a fit.
        ip(&["link", "set", "uplink0", "mtu", "1400"]);
        dp.set_service("web", service(), Protocol::Tcp, &[remote_backend()]);
        let other = addr([10, 244, 1, 10], 40_001);
        let syn = Tcp::new(other, service(), SYN).build();
        assert_eq!(dp.run_on("from_pod", &syn, cli0).verdict, TC_ACT_REDIRECT);
        let over = segment_of(other, 1402);
        let run = dp.run_on("from_pod", &over, cli0);
        assert_eq!(run.verdict, TC_ACT_OK, "1402 bytes over a 1400-byte uplink");
        assert_translated(&over, &run.output, other, remote_backend(), "1402");
        let run = dp.run_on("from_pod", &segment_of(other, 1400), cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "1400 bytes fit the uplink");
    });
}

/// This node's address (on `uplink0`), where NodePorts are served.
const NODE_ADDR: [u8; 4] = [192, 168, 100, 1];

/// A client pod of the other node (behind 192.168.100.2 on `uplink0`, as
/// over an overlay): the uplink's `to_outside` never sees its replies.
fn remote_client() -> SocketAddrV4 {
    addr([10, 244, 2, 77], 41_000)
}

// A backend's packets are looked up in conntrack only once a flow of this
// node went to it (the "no flows yet" bits of its `REPLY_SOURCES` value):
// as replies by `to_pod` after any flow, as NodePort replies by `from_pod`
// after a NodePort flow. Until then its packets (of flows socket LB
// translated, or direct connections) pass at the cost of one lookup; after
// it, replies are translated as before.
#[test]
fn a_backends_packets_skip_conntrack_until_a_flow_of_their_kind_reaches_it() {
    in_node_netns(|| {
        let mut dp = node(false);
        let local = vec![(*local_backend().ip()).into()];
        dp.set_frontend_with(
            "web",
            Frontend::cluster_ip(*service().ip(), service().port(), Protocol::Tcp),
            &[local_backend()],
            |spec| spec.local_ips = local.clone(),
        );
        dp.set_node_addresses(&[Ipv4Addr::from(NODE_ADDR)]);
        dp.set_frontend_with(
            "web-np",
            Frontend::node_port(30_080, Protocol::Tcp),
            &[local_backend()],
            |spec| spec.local_ips = local,
        );
        let (cli0, pod0, uplink0) = (ifindex("cli0"), ifindex("pod0"), ifindex("uplink0"));
        let node_port = addr(NODE_ADDR, 30_080);
        let bits = |dp: &Harness| {
            reply_address_value(dp, local_backend()).map(|v| v & !reply_source_flags::IFINDEX_MASK)
        };
        let (no_flows, no_node_port) = (
            reply_source_flags::NO_FLOWS,
            reply_source_flags::NO_NODE_PORT_FLOWS,
        );
        assert_eq!(bits(&dp), Some(no_flows | no_node_port), "a new backend");

        // The backend's packets of a flow no program here translated (the
        // client's socket was translated at connect()): left byte for
        // byte both ways, nothing counted.
        let before = dp.counters();
        let stray = Tcp::new(local_backend(), client(), ACK).build();
        for (program, ifindex) in [("from_pod", pod0), ("to_pod", cli0)] {
            let run = dp.run_on(program, &stray, ifindex);
            assert_eq!(run.verdict, TC_ACT_OK, "{program}");
            assert_eq!(hex(&run.output), hex(&stray), "{program}: left as it is");
        }
        assert_eq!(dp.counters(), before, "nothing counted");

        // A ClusterIP flow to it: its replies are looked up (and
        // translated) from now on; it is no NodePort flow.
        let syn = Tcp::new(client(), service(), SYN).build();
        let run = dp.run_on("from_pod", &syn, cli0);
        assert_translated(
            &syn,
            &run.output,
            client(),
            local_backend(),
            "ClusterIP SYN",
        );
        assert_eq!(bits(&dp), Some(no_node_port), "after a ClusterIP flow");
        let reply = Tcp::new(local_backend(), client(), SYN | ACK).build();
        let run = dp.run_on("to_pod", &reply, cli0);
        assert_translated(&reply, &run.output, service(), client(), "ClusterIP reply");

        // A NodePort flow from a client pod of the other node ...
        let syn = Tcp::new(remote_client(), node_port, SYN).build();
        let run = dp.run_on("from_outside", &syn, uplink0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_translated(
            &syn,
            &run.output,
            remote_client(),
            local_backend(),
            "NodePort SYN",
        );
        assert_eq!(bits(&dp), Some(0), "after a NodePort flow");
        assert_eq!(
            learned_interface(&dp, local_backend()),
            Some(1),
            "interface part kept"
        );

        // ... gets its reply, leaving the backend, translated to the
        // NodePort and sent to the client's next hop.
        let translated = dp.counter(Counter::ReplyTranslated);
        let reply = Tcp::new(local_backend(), remote_client(), SYN | ACK).build();
        let run = dp.run_on("from_pod", &reply, pod0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "NodePort reply");
        assert_eq!(&run.output[..6], &NODE_MAC, "the client's next hop");
        assert_translated(
            &reply,
            &with_macs_of(&reply, &run.output),
            node_port,
            remote_client(),
            "NodePort reply",
        );
        assert_eq!(dp.counter(Counter::ReplyTranslated), translated + 1);

        // A packet of no flow still passes as it is.
        let stray = Tcp::new(local_backend(), addr([10, 244, 2, 78], 41_000), ACK).build();
        let run = dp.run_on("from_pod", &stray, pod0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(
            hex(&run.output),
            hex(&stray),
            "left as it is once looked up"
        );
    });
}

// An agent that starts with flows in conntrack (a restart, an upgrade)
// cannot know which backends they go to: the backends its first full sync
// adds keep their replies looked up; those added later start without.
#[test]
fn backends_added_while_carried_flows_may_reach_them_keep_their_replies_looked_up() {
    let mut dp = Harness::load().unwrap_or_else(|e| panic!("{e:#}"));
    dp.engine.set_flows_carried(true);
    dp.sync_all(&[("web", service(), Protocol::Tcp, &[local_backend()])]);
    assert_eq!(
        reply_address_value(&dp, local_backend()),
        Some(reply_source_flags::MAY_HAVE_FLOWS),
        "added by the first full sync"
    );
    // The first full sync is in: a backend added now is new to conntrack.
    dp.sync_all(&[(
        "web",
        service(),
        Protocol::Tcp,
        &[local_backend(), remote_backend()],
    )]);
    assert_eq!(
        reply_address_value(&dp, remote_backend()),
        Some(reply_source_flags::FRESH),
        "added later"
    );
    assert_eq!(
        reply_address_value(&dp, local_backend()),
        Some(reply_source_flags::MAY_HAVE_FLOWS),
        "kept"
    );
}

// ---------------------------------------------------------------------------
// IPv6: the same delivery on the IPv6 FIB and `LB6_REPLY_SOURCES`.

fn sa6(addr: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr.parse().expect("an IPv6 address"), port, 0, 0)
}
fn client6() -> SocketAddrV6 {
    sa6("fd00:10:244:1::a", 40_000)
}
fn service6() -> SocketAddrV6 {
    sa6("fd00:10:96::a", 80)
}
/// A pod of this node, routed over its own veth (`pod0`).
fn local_backend6() -> SocketAddrV6 {
    sa6("fd00:10:244:1::14", 8080)
}
/// A pod of the other node, behind fd00:192:168:100::2 on `uplink0`.
fn remote_backend6() -> SocketAddrV6 {
    sa6("fd00:10:244:2::a", 8080)
}
/// A pod whose next hop has no neighbour entry yet.
fn unresolved_backend6() -> SocketAddrV6 {
    sa6("fd00:10:244:3::a", 8080)
}
/// A pod of the other node behind a route whose MTU is locked below the
/// uplink's.
fn narrow_route_backend6() -> SocketAddrV6 {
    sa6("fd00:10:244:4::a", 8080)
}

/// [`in_node_netns`] with the same interfaces, IPv6 routes and neighbours.
fn in_node_netns6<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_node_netns(move || {
        for conf in ["all", "default", "cli0", "pod0", "uplink0"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/forwarding"), "1")
                .expect("IPv6 forwarding on");
        }
        ip(&[
            "-6",
            "addr",
            "add",
            "fd00:192:168:100::1/64",
            "dev",
            "uplink0",
            "nodad",
        ]);
        ip(&["-6", "route", "add", "fd00:10:244:1::a/128", "dev", "cli0"]);
        ip(&["-6", "route", "add", "fd00:10:244:1::14/128", "dev", "pod0"]);
        for (prefix, via) in [
            ("fd00:10:244:2::/64", "fd00:192:168:100::2"),
            ("fd00:10:244:3::/64", "fd00:192:168:100::3"),
        ] {
            ip(&["-6", "route", "add", prefix, "via", via, "dev", "uplink0"]);
        }
        for (addr, mac, dev) in [
            ("fd00:10:244:1::14", POD_MAC, "pod0"),
            ("fd00:192:168:100::2", NODE_MAC, "uplink0"),
        ] {
            ip(&[
                "-6",
                "neigh",
                "add",
                addr,
                "lladdr",
                &mac_text(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        f()
    })
}

fn node6(direct_redirect: bool, backends: &[SocketAddrV6]) -> Harness {
    let config = DatapathConfig {
        direct_redirect,
        ..DatapathConfig::default()
    };
    let dp = Harness::load_on(Bpffs::new().expect("a bpffs"), &config)
        .unwrap_or_else(|e| panic!("{e:#}"));
    web6(&dp, backends);
    dp
}

fn web6(dp: &Harness, backends: &[SocketAddrV6]) {
    dp.set_service6(
        0,
        service6(),
        Protocol::Tcp,
        backends,
        1,
        Frontend6Options::default(),
    );
}

/// `output` is `input` DNATed to `to` (checksum recomputed here), with
/// `dst_mac` as its destination MAC; its source MAC is whatever the
/// egress interface has.
#[track_caller]
fn assert_sent6(input: &[u8], output: &[u8], to: SocketAddrV6, dst_mac: [u8; 6], what: &str) {
    assert_eq!(output.len(), input.len(), "{what}: length");
    assert_eq!(&output[..6], &dst_mac, "{what}: destination MAC");
    let mut expected = input.to_vec();
    expected[..12].copy_from_slice(&output[..12]);
    expected[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&to.ip().octets());
    let l4 = ipv6_fields(input).l4;
    expected[l4 + 2..l4 + 4].copy_from_slice(&to.port().to_be_bytes());
    // The checksum, recomputed here over the translated segment.
    let (src, _) = endpoints6(input);
    let mut segment = expected[l4..].to_vec();
    segment[16..18].fill(0);
    let segment = with_checksum6(*src.ip(), *to.ip(), PROTO_TCP, segment);
    expected[l4..].copy_from_slice(&segment);
    assert_eq!(hex(output), hex(&expected), "{what}: not the input DNATed");
}

#[test]
fn ipv6_a_local_backend_gets_the_packet_through_its_learned_pod_interface() {
    in_node_netns6(|| {
        let dp = node6(true, &[local_backend6()]);
        let (cli0, pod0) = (ifindex("cli0"), ifindex("pod0"));
        let syn = Tcp6::new(client6(), service6(), SYN).build();

        // Before any flow was seen going into the pod: sent out of `pod0`
        // with the pod's MAC.
        let first = dp.run_on("from_pod", &syn, cli0);
        assert_eq!(first.verdict, TC_ACT_REDIRECT, "first SYN");
        assert_sent6(&syn, &first.output, local_backend6(), POD_MAC, "first SYN");
        assert_eq!(dp.reply_source6(local_backend6()), Some(1));

        // `to_pod` on the pod's interface learns it from the opening packet.
        let run = dp.run_on("to_pod", &first.output, pod0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(dp.reply_source6(local_backend6()), Some(pod0));
        // A packet into another interface, or not opening a flow, teaches
        // nothing.
        let ack = Tcp6::new(client6(), local_backend6(), ACK).build();
        dp.run_on("to_pod", &ack, cli0);
        assert_eq!(dp.reply_source6(local_backend6()), Some(pod0));

        // The flow's next packet: into the pod's namespace.
        let ack = Tcp6::new(client6(), service6(), ACK).build();
        let run = dp.run_on("from_pod", &ack, cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "established ACK");
        assert_sent6(&ack, &run.output, local_backend6(), POD_MAC, "ACK");
        assert_eq!(dp.counter(Counter::Redirected), 2);
    });
}

#[test]
fn ipv6_a_remote_backend_gets_the_packet_through_the_fib_next_hop() {
    in_node_netns6(|| {
        let dp = node6(true, &[remote_backend6()]);
        let syn = Tcp6::new(client6(), service6(), SYN).build();

        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));

        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_sent6(&syn, &run.output, remote_backend6(), NODE_MAC, "SYN");
        let uplink_mac = std::fs::read_to_string("/sys/class/net/uplink0/address");
        if let Ok(mac) = uplink_mac {
            assert_eq!(mac_text(run.output[6..12].try_into().unwrap()), mac.trim());
        }
    });
}

#[test]
fn ipv6_without_a_neighbour_entry_or_with_direct_redirect_off_the_stack_delivers() {
    in_node_netns6(|| {
        let dp = node6(true, &[unresolved_backend6()]);
        let syn = Tcp6::new(client6(), service6(), SYN).build();
        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));
        assert_eq!(
            run.verdict, TC_ACT_OK,
            "no neighbour: the stack resolves it"
        );
        assert_eq!(endpoints6(&run.output), (client6(), unresolved_backend6()));
        assert_eq!(dp.counter(Counter::Redirected), 0);

        let dp = node6(false, &[local_backend6()]);
        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));
        assert_eq!(run.verdict, TC_ACT_OK, "--direct-redirect false");
        assert_eq!(endpoints6(&run.output), (client6(), local_backend6()));
        assert!(l4_checksum6_ok(&run.output));
        assert_eq!(dp.counter(Counter::Redirected), 0);
    });
}

/// A TCP segment from `client` to the service, `ip_len` bytes from its
/// IPv6 header on.
fn segment6_of(client: SocketAddrV6, ip_len: usize) -> Vec<u8> {
    Tcp6::new(client, service6(), ACK)
        .payload(&vec![0x5a; ip_len - 40 - 20])
        .build()
}

#[test]
fn ipv6_a_packet_larger_than_the_path_mtu_is_left_to_the_stack() {
    in_node_netns6(|| {
        let cli0 = ifindex("cli0");
        ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:244:4::/64",
            "via",
            "fd00:192:168:100::2",
            "dev",
            "uplink0",
            "mtu",
            "lock",
            "1400",
        ]);
        let dp = node6(true, &[narrow_route_backend6()]);
        let syn = Tcp6::new(client6(), service6(), SYN).build();
        assert_eq!(dp.run_on("from_pod", &syn, cli0).verdict, TC_ACT_REDIRECT);

        // Over the route's MTU, under the uplink's: the stack answers the
        // client with a Packet Too Big.
        let big = segment6_of(client6(), 1450);
        let run = dp.run_on("from_pod", &big, cli0);
        assert_eq!(run.verdict, TC_ACT_OK, "1450 bytes over a 1400-byte route");
        assert_eq!(
            endpoints6(&run.output),
            (client6(), narrow_route_backend6())
        );
        assert!(l4_checksum6_ok(&run.output), "translated all the same");
        let run = dp.run_on("from_pod", &segment6_of(client6(), 1400), cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "1400 bytes fit the route");

        // Over the egress device's MTU.
        ip(&["link", "set", "uplink0", "mtu", "1400"]);
        web6(&dp, &[remote_backend6()]);
        let other = sa6("fd00:10:244:1::a", 40_001);
        let syn = Tcp6::new(other, service6(), SYN).build();
        assert_eq!(dp.run_on("from_pod", &syn, cli0).verdict, TC_ACT_REDIRECT);
        let run = dp.run_on("from_pod", &segment6_of(other, 1402), cli0);
        assert_eq!(run.verdict, TC_ACT_OK, "1402 bytes over a 1400-byte uplink");
        assert_eq!(endpoints6(&run.output), (other, remote_backend6()));
        let run = dp.run_on("from_pod", &segment6_of(other, 1400), cli0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "1400 bytes fit the uplink");
    });
}

#[test]
fn ipv6_a_hairpin_flow_is_left_to_the_stack() {
    in_node_netns6(|| {
        // The client is its own backend: its packet comes back from the
        // service address, through the stack.
        let dp = node6(true, &[sa6("fd00:10:244:1::a", 8080)]);
        let syn = Tcp6::new(client6(), service6(), SYN).build();
        let run = dp.run_on("from_pod", &syn, ifindex("cli0"));
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(
            endpoints6(&run.output),
            (sa6("fd00:10:96::a", 40_000), sa6("fd00:10:244:1::a", 8080))
        );
        assert_eq!(dp.counter(Counter::Redirected), 0);
    });
}

/// This node's IPv6 address on `uplink0`, where IPv6 NodePorts are served.
const NODE6: &str = "fd00:192:168:100::1";

/// A client pod of the other node, behind `uplink0`.
fn remote_client6() -> SocketAddrV6 {
    sa6("fd00:10:244:2::4d", 41_000)
}

/// Sets the "no flows yet" bits of `backend`'s address again, as the
/// agent writes them for an address new to conntrack.
fn mark_fresh6(dp: &Harness, backend: SocketAddrV6) {
    let value = dp.reply_address6(backend).expect("a backend's address");
    dp.set_reply_address6(backend, value | !reply_source_flags::IFINDEX_MASK);
}

/// `frame` went on from `src` to `dst`, its checksum right.
#[track_caller]
fn assert_between6(frame: &[u8], src: SocketAddrV6, dst: SocketAddrV6, what: &str) {
    assert_eq!(endpoints6(frame), (src, dst), "{what}");
    assert!(l4_checksum6_ok(frame), "{what}: checksum");
}

// `a_backends_packets_skip_conntrack_until_a_flow_of_their_kind_reaches_it`
// on IPv6: the same bits in `LB6_REPLY_SOURCES`, written by the sync
// engine, cleared by a flow from a pod, a NodePort flow from the uplink
// (tc and XDP) and an established flow's refresh; while `NO_FLOWS` is set
// `to_pod` does not look the backend's packets up.
#[test]
fn ipv6_a_backends_packets_skip_conntrack_until_a_flow_of_their_kind_reaches_it() {
    in_node_netns6(|| {
        let mut dp = Harness::load_on(Bpffs::new().expect("a bpffs"), &DatapathConfig::default())
            .unwrap_or_else(|e| panic!("{e:#}"));
        let local = vec![(*local_backend6().ip()).into()];
        dp.set_frontend6_with(
            "web6",
            Frontend::cluster_ip(*service6().ip(), service6().port(), Protocol::Tcp),
            &[local_backend6()],
            |spec| spec.local_ips = local.clone(),
        );
        let node6: std::net::Ipv6Addr = NODE6.parse().expect("an IPv6 address");
        dp.set_node_addresses6(&[node6]);
        dp.set_frontend6_with(
            "web6-np",
            Frontend::node_port6(30_080, Protocol::Tcp),
            &[local_backend6()],
            |spec| spec.local_ips = local,
        );
        let (cli0, pod0, uplink0) = (ifindex("cli0"), ifindex("pod0"), ifindex("uplink0"));
        let node_port = SocketAddrV6::new(node6, 30_080, 0, 0);
        let bits = |dp: &Harness| {
            dp.reply_address6(local_backend6())
                .map(|v| v & !reply_source_flags::IFINDEX_MASK)
        };
        let (no_flows, no_node_port) = (
            reply_source_flags::NO_FLOWS,
            reply_source_flags::NO_NODE_PORT_FLOWS,
        );
        assert_eq!(bits(&dp), Some(no_flows | no_node_port), "a new backend");

        // The backend's packets of a flow no program here translated: left
        // byte for byte both ways, nothing counted.
        let before = dp.counters();
        let stray = Tcp6::new(local_backend6(), client6(), ACK).build();
        for (program, ifindex) in [("from_pod", pod0), ("to_pod", cli0)] {
            let run = dp.run_on(program, &stray, ifindex);
            assert_eq!(run.verdict, TC_ACT_OK, "{program}");
            assert_eq!(hex(&run.output), hex(&stray), "{program}: left as it is");
        }
        assert_eq!(dp.counters(), before, "nothing counted");

        // A ClusterIP flow to it: its replies are looked up (and
        // translated) from now on; it is no NodePort flow.
        let syn = Tcp6::new(client6(), service6(), SYN).build();
        let run = dp.run_on("from_pod", &syn, cli0);
        assert_between6(&run.output, client6(), local_backend6(), "ClusterIP SYN");
        assert_eq!(bits(&dp), Some(no_node_port), "after a ClusterIP flow");
        let reply = Tcp6::new(local_backend6(), client6(), SYN | ACK).build();
        let run = dp.run_on("to_pod", &reply, cli0);
        assert_between6(&run.output, service6(), client6(), "ClusterIP reply");

        // The bits honoured: with `NO_FLOWS` set again (as for a backend
        // that left and came back under its old id), the reply is not
        // looked up ...
        mark_fresh6(&dp, local_backend6());
        let translated = dp.counter(Counter::ReplyTranslated);
        let run = dp.run_on("to_pod", &reply, cli0);
        assert_eq!(hex(&run.output), hex(&reply), "not looked up");
        assert_eq!(dp.counter(Counter::ReplyTranslated), translated);
        // ... until the flow's next refresh (at most once a second) clears
        // it again.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let ack = Tcp6::new(client6(), service6(), ACK).build();
        let run = dp.run_on("from_pod", &ack, cli0);
        assert_between6(&run.output, client6(), local_backend6(), "ClusterIP ACK");
        assert_eq!(bits(&dp), Some(no_node_port), "refreshed: looked up again");
        let run = dp.run_on("to_pod", &reply, cli0);
        assert_between6(
            &run.output,
            service6(),
            client6(),
            "reply after the refresh",
        );

        // A NodePort flow from a client pod of the other node (tc) ...
        let syn = Tcp6::new(remote_client6(), node_port, SYN).build();
        let run = dp.run_on("from_outside", &syn, uplink0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_between6(
            &run.output,
            remote_client6(),
            local_backend6(),
            "NodePort SYN",
        );
        assert_eq!(bits(&dp), Some(0), "after a NodePort flow");
        assert_eq!(
            dp.reply_source6(local_backend6())
                .map(|v| v & reply_source_flags::IFINDEX_MASK),
            Some(1),
            "interface part kept"
        );
        // ... gets its reply translated to the NodePort as it leaves the
        // backend, and sent to the client's next hop (over an overlay,
        // `to_outside` would never see it) ...
        let reply = Tcp6::new(local_backend6(), remote_client6(), SYN | ACK).build();
        let translated = dp.counter(Counter::ReplyTranslated);
        let run = dp.run_on("from_pod", &reply, pod0);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "NodePort reply");
        assert_eq!(&run.output[..6], &NODE_MAC, "the client's next hop");
        assert_between6(&run.output, node_port, remote_client6(), "NodePort reply");
        assert_eq!(dp.counter(Counter::ReplyTranslated), translated + 1);
        // ... or where it leaves the node, when it comes that way.
        let run = dp.run_on("to_outside", &reply, uplink0);
        assert_between6(&run.output, node_port, remote_client6(), "NodePort reply");
        // A packet of no flow from the backend still passes as it is.
        let stray = Tcp6::new(local_backend6(), sa6("fd00:10:244:2::4f", 41_000), ACK).build();
        let run = dp.run_on("from_pod", &stray, pod0);
        assert_eq!(run.verdict, TC_ACT_OK);
        assert_eq!(
            hex(&run.output),
            hex(&stray),
            "left as it is once looked up"
        );

        // XDP's new NodePort flows clear the bits as tc's do.
        mark_fresh6(&dp, local_backend6());
        let other_client = sa6("fd00:10:244:2::4e", 41_000);
        let syn = Tcp6::new(other_client, node_port, SYN).build();
        let run = dp.run_xdp_on(&syn, uplink0);
        assert_eq!(run.verdict, XDP_PASS, "the stack delivers it to the pod");
        assert_between6(
            &run.output,
            other_client,
            local_backend6(),
            "NodePort SYN on XDP",
        );
        assert_eq!(bits(&dp), Some(0), "after a NodePort flow on XDP");
    });
}

// `backends_added_while_carried_flows_may_reach_them_keep_their_replies_looked_up`
// on IPv6 (flows in `CT6_*`, or a previous agent's programs still running).
#[test]
fn ipv6_backends_added_while_carried_flows_may_reach_them_keep_their_replies_looked_up() {
    let mut dp = Harness::load().unwrap_or_else(|e| panic!("{e:#}"));
    dp.engine.set_flows_carried6(true);
    dp.sync_all6(&[("web6", service6(), Protocol::Tcp, &[local_backend6()])]);
    assert_eq!(
        dp.reply_address6(local_backend6()),
        Some(reply_source_flags::MAY_HAVE_FLOWS),
        "added by the first full sync"
    );
    // The first full sync is in: a backend added now is new to conntrack.
    dp.sync_all6(&[(
        "web6",
        service6(),
        Protocol::Tcp,
        &[local_backend6(), remote_backend6()],
    )]);
    assert_eq!(
        dp.reply_address6(remote_backend6()),
        Some(reply_source_flags::FRESH),
        "added later"
    );
    assert_eq!(
        dp.reply_address6(local_backend6()),
        Some(reply_source_flags::MAY_HAVE_FLOWS),
        "kept"
    );
}

// An agent starting on maps a previous agent pinned (a restart or an
// upgrade within one layout) meets that agent's programs until `attach`
// replaces them; those of the release before the IPv6 bits make flows
// without clearing them. So its first sync's IPv6 backends keep their
// replies looked up, even with no flow in conntrack yet.
#[test]
fn ipv6_backends_of_the_first_sync_after_a_previous_agent_keep_their_replies_looked_up() {
    let first = Harness::load().unwrap_or_else(|e| panic!("{e:#}"));
    let mut dp = Harness::load_on(first.into_bpffs(), &DatapathConfig::default())
        .unwrap_or_else(|e| panic!("{e:#}"));
    dp.sync_all6(&[("web6", service6(), Protocol::Tcp, &[local_backend6()])]);
    assert_eq!(
        dp.reply_address6(local_backend6()),
        Some(reply_source_flags::MAY_HAVE_FLOWS),
        "added by the first full sync after a previous agent"
    );
    dp.sync_all6(&[(
        "web6",
        service6(),
        Protocol::Tcp,
        &[local_backend6(), remote_backend6()],
    )]);
    assert_eq!(
        dp.reply_address6(remote_backend6()),
        Some(reply_source_flags::FRESH),
        "added once this agent's programs run"
    );
}
