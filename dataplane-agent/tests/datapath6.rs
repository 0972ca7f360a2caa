//! The tc programs on IPv6 under BPF_PROG_TEST_RUN: build a frame, set up
//! the `LB6_*` maps, check the output bytes and the `CT6_*` maps.
//! Expected frames are written out here byte by byte and every checksum is
//! recomputed here over the IPv6 pseudo header, never taken from the code
//! under test.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::{Ipv6Addr, SocketAddrV6};

use aya::maps::{Array, Map, MapData, RingBuf};
use dataplane_agent::{
    control::model::Protocol,
    node::pinned::monotonic_now_ns,
    operator::monitor::{read_record, Record},
};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, map_names, service_flags, trace_families, trace_hook, Counter,
    Trace6Tuple, TraceConfig, TraceEvent6, IPPROTO_TCP,
};
use dataplane_testkit::{
    datapath::{Harness, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    datapath6::{ct6_key, ipv6_bytes, Frontend6Options},
    packets::{be16, be32, hex, ACK, CLIENT_MAC, ETH_HLEN, GATEWAY_MAC, RST, SYN},
    packets6::{
        checksum6, endpoints6, ipv6_fields, ipv6_frame, l4_checksum6_ok, tcp_segment,
        with_checksum6, ExtHeader, Tcp6, Udp6, IP6_L4, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    },
};

fn sa(addr: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr.parse().expect("an IPv6 address"), port, 0, 0)
}
fn client() -> SocketAddrV6 {
    sa("fd00:10:244:1::a", 40_000)
}
fn service() -> SocketAddrV6 {
    sa("fd00:10:96::a", 80)
}
fn backend() -> SocketAddrV6 {
    sa("fd00:10:244:2::a", 8080)
}
fn dns_service() -> SocketAddrV6 {
    sa("fd00:10:96::a", 53)
}
fn dns_backend() -> SocketAddrV6 {
    sa("fd00:10:244:3::a", 5353)
}
fn router() -> Ipv6Addr {
    "fd00:ffff::1".parse().unwrap()
}

fn web(dp: &Harness, backends: &[SocketAddrV6]) -> u32 {
    dp.set_service6(
        0,
        service(),
        Protocol::Tcp,
        backends,
        1,
        Frontend6Options::default(),
    )
}

fn dns(dp: &Harness, backends: &[SocketAddrV6]) -> u32 {
    dp.set_service6(
        1,
        dns_service(),
        Protocol::Udp,
        backends,
        20,
        Frontend6Options::default(),
    )
}

#[track_caller]
fn assert_untouched(run: &Run, input: &[u8], what: &str) {
    assert_eq!(run.verdict, TC_ACT_OK, "{what}: verdict");
    assert_eq!(
        hex(&run.output),
        hex(input),
        "{what}: must pass byte for byte"
    );
}

/// `input` with source and destination (addresses and ports) replaced and
/// the L4 checksum field masked; checks the checksum separately.
#[track_caller]
fn assert_translated6(
    input: &[u8],
    output: &[u8],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    what: &str,
) {
    assert_eq!(
        output.len(),
        input.len(),
        "{what}: the packet changed length"
    );
    let f = ipv6_fields(input);
    let mut expected = input.to_vec();
    expected[ETH_HLEN + 8..ETH_HLEN + 24].copy_from_slice(&src.ip().octets());
    expected[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&dst.ip().octets());
    expected[f.l4..f.l4 + 2].copy_from_slice(&src.port().to_be_bytes());
    expected[f.l4 + 2..f.l4 + 4].copy_from_slice(&dst.port().to_be_bytes());
    let csum = f.l4 + if f.proto == PROTO_TCP { 16 } else { 6 };
    let masked = |bytes: &[u8]| {
        let mut b = bytes.to_vec();
        b[csum..csum + 2].fill(0);
        b
    };
    assert_eq!(
        hex(&masked(output)),
        hex(&masked(&expected)),
        "{what}: not the input translated to {src} -> {dst} (checksum field masked)"
    );
    assert!(
        l4_checksum6_ok(output),
        "{what}: L4 checksum wrong in {}",
        hex(output)
    );
}

// ---------------------------------------------------------------------------
// DNAT, reverse NAT, conntrack.

#[test]
fn ipv6_syn_to_a_service_is_dnatted_to_its_backend_and_tracked_both_ways() {
    let dp = Harness::new();
    let service_id = web(&dp, &[backend()]);
    let syn = Tcp6::new(client(), service(), SYN)
        .payload(b"hello")
        .build();

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated6(&syn, &run.output, client(), backend(), "DNATed SYN");
    // The checksum is exactly the one of the translated segment, computed
    // here from scratch.
    let seg = tcp_segment(client().port(), backend().port(), SYN, 1_000, 0, b"hello");
    let expected = with_checksum6(*client().ip(), *backend().ip(), PROTO_TCP, seg);
    assert_eq!(hex(&run.output[IP6_L4..]), hex(&expected), "TCP segment");
    let original = dp
        .ct6_get(&ct6_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL,
        ))
        .expect("ORIGINAL entry");
    assert_eq!(original.backend_addr, ipv6_bytes(&backend()));
    assert_eq!(original.service_id, service_id);
    assert_eq!(original.backend_id, 1);
    assert_eq!(original.state, ct_state::OPENING);
    let reply = dp
        .ct6_get(&ct6_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
        .expect("REPLY entry");
    assert_eq!(reply.original_key(), original.original_key());
    assert_eq!(dp.counter(Counter::NewFlow), 1);
}

#[test]
fn ipv6_backend_reply_is_translated_back_to_the_service_address() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    dp.run_from_pod(&Tcp6::new(client(), service(), SYN).build());
    let synack = Tcp6::new(backend(), client(), SYN | ACK).build();

    let run = dp.run_to_pod(&synack);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated6(&synack, &run.output, service(), client(), "reply");
    let seg = tcp_segment(
        service().port(),
        client().port(),
        SYN | ACK,
        1_000,
        5_000,
        b"",
    );
    let expected = with_checksum6(*service().ip(), *client().ip(), PROTO_TCP, seg);
    assert_eq!(hex(&run.output[IP6_L4..]), hex(&expected), "TCP segment");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);

    // The handshake completes: the flow is established.
    let ack = Tcp6::new(client(), service(), ACK).build();
    let run = dp.run_from_pod(&ack);
    assert_translated6(&ack, &run.output, client(), backend(), "ACK");
    let original = dp
        .ct6_get(&ct6_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL,
        ))
        .unwrap();
    assert_eq!(original.state, ct_state::ESTABLISHED);
    assert_ne!(original.flags & ct_flags::SEEN_REPLY, 0);
    assert_eq!(dp.counter(Counter::Established), 1);
}

#[test]
fn ipv6_lost_reply_entry_is_rebuilt_by_the_clients_next_packet_a_second_on() {
    // As on IPv4: the REPLY entry is looked for only when a packet
    // refreshes the flow (at most once a second) or moves its state.
    let dp = Harness::new();
    web(&dp, &[backend()]);
    dp.run_from_pod(&Tcp6::new(client(), service(), SYN).build());
    dp.run_to_pod(&Tcp6::new(backend(), client(), SYN | ACK).build());
    dp.run_from_pod(&Tcp6::new(client(), service(), ACK).build());
    let original_key = ct6_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL);
    let reply_key = ct6_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY);
    let lost = dp.ct6_get(&reply_key).expect("the reply entry");
    dp.ct6_remove(&reply_key);
    let request = Tcp6::new(client(), service(), ACK)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();

    let within_the_second = dp.run_from_pod(&request);
    assert_translated6(
        &request,
        &within_the_second.output,
        client(),
        backend(),
        "request",
    );
    assert!(
        dp.ct6_get(&reply_key).is_none(),
        "not looked for on every packet"
    );

    let mut aged = dp.ct6_get(&original_key).expect("the original entry");
    aged.last_seen_ns = monotonic_now_ns() - 2_000_000_000;
    dp.ct6_insert(&original_key, &aged);
    let forwarded = dp.run_from_pod(&request);
    let response = Tcp6::new(backend(), client(), ACK)
        .payload(b"HTTP/1.1 200 OK\r\n\r\n")
        .build();
    let reply = dp.run_to_pod(&response);

    assert_translated6(&request, &forwarded.output, client(), backend(), "request");
    let rebuilt = dp.ct6_get(&reply_key).expect("the reply entry is back");
    assert_eq!(
        (rebuilt.original_key(), rebuilt.reply_key()),
        (lost.original_key(), lost.reply_key()),
        "the rebuilt entry translates as the lost one did"
    );
    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated6(&response, &reply.output, service(), client(), "response");
}

#[test]
fn ipv6_packets_into_a_pod_from_a_pod_that_serves_no_service_are_not_looked_up() {
    // Only packets from a backend's address and port
    // (`LB6_REPLY_SOURCES`) are looked up in conntrack on their way into a
    // pod: the reply entry of a flow whose backend left every service is
    // still there, but its former backend's packets pass as they are.
    let dp = Harness::new();
    web(&dp, &[backend()]);
    assert_eq!(dp.reply_source6(backend()), Some(1));
    dp.run_from_pod(&Tcp6::new(client(), service(), SYN).build());
    let synack = Tcp6::new(backend(), client(), SYN | ACK).build();
    dp.remove_reply_source6(backend());
    assert!(
        dp.ct6_get(&ct6_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
            .is_some(),
        "the reply entry is still there"
    );

    let run = dp.run_to_pod(&synack);

    assert_untouched(&run, &synack, "packet of a pod that serves no service");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 0);

    // The same packet from a backend is translated (the pre-filter is what
    // made the difference).
    web(&dp, &[backend()]);
    let run = dp.run_to_pod(&synack);
    assert_translated6(&synack, &run.output, service(), client(), "reply");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn ipv6_udp_is_translated_both_ways_with_a_valid_checksum() {
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let query = Udp6::new(client(), dns_service()).build();

    let run = dp.run_from_pod(&query);
    assert_translated6(&query, &run.output, client(), dns_backend(), "query");
    let expected = with_checksum6(
        *client().ip(),
        *dns_backend().ip(),
        PROTO_UDP,
        dataplane_testkit::packets6::udp_datagram(
            client().port(),
            dns_backend().port(),
            b"dns query",
        ),
    );
    assert_eq!(hex(&run.output[IP6_L4..]), hex(&expected), "UDP datagram");

    let answer = Udp6::new(dns_backend(), client())
        .payload(b"answer")
        .build();
    let run = dp.run_to_pod(&answer);
    assert_translated6(&answer, &run.output, dns_service(), client(), "answer");
}

#[test]
fn ipv6_udp_checksum_that_comes_out_zero_is_sent_as_ffff() {
    // A payload chosen so that the translated datagram sums to exactly
    // zero: its checksum must then be sent as 0xffff (0 is "none", which
    // IPv6 forbids).
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let translated = with_checksum6(
        *client().ip(),
        *dns_backend().ip(),
        PROTO_UDP,
        dataplane_testkit::packets6::udp_datagram(client().port(), dns_backend().port(), &[0, 0]),
    );
    // With a zero payload the checksum is `c`, the complement of the sum;
    // a payload word of `c` raises the sum to 0xffff, whose checksum is 0.
    let c = be16(&translated, 6);
    let query = Udp6::new(client(), dns_service())
        .payload(&c.to_be_bytes())
        .build();

    let run = dp.run_from_pod(&query);

    assert_translated6(&query, &run.output, client(), dns_backend(), "query");
    let f = ipv6_fields(&run.output);
    assert_eq!(
        be16(&run.output, f.l4 + 6),
        0xffff,
        "a checksum of 0 goes out as 0xffff"
    );
}

// ---------------------------------------------------------------------------
// Extension headers.

#[test]
fn ipv6_extension_headers_within_the_bound_are_walked_and_the_packet_translated() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    let ext = [ExtHeader::HopByHop, ExtHeader::DestOpts, ExtHeader::Routing];
    let syn = Tcp6::new(client(), service(), SYN).ext(&ext).build();

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(ipv6_fields(&run.output).l4, IP6_L4 + 8 + 16 + 8);
    assert_translated6(
        &syn,
        &run.output,
        client(),
        backend(),
        "SYN with ext headers",
    );
    assert_eq!(dp.counter(Counter::NewFlow), 1);

    let reply = Tcp6::new(backend(), client(), SYN | ACK)
        .ext(&[ExtHeader::DestOpts])
        .build();
    let run = dp.run_to_pod(&reply);
    assert_translated6(
        &reply,
        &run.output,
        service(),
        client(),
        "reply with ext header",
    );
}

#[test]
fn ipv6_packet_with_more_extension_headers_than_the_bound_passes_untouched_and_is_counted() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    let ext = [
        ExtHeader::HopByHop,
        ExtHeader::DestOpts,
        ExtHeader::Routing,
        ExtHeader::DestOpts,
        ExtHeader::DestOpts,
    ];
    let syn = Tcp6::new(client(), service(), SYN).ext(&ext).build();

    let run = dp.run_from_pod(&syn);

    assert_untouched(&run, &syn, "SYN past the bound");
    assert_eq!(dp.counter(Counter::Ipv6ExtHeadersPastBound), 1);
    assert_eq!(dp.counter(Counter::NewFlow), 0);
    assert_eq!(dp.ct6_len(), 0, "nothing tracked");

    // Four are walked.
    let syn = Tcp6::new(client(), service(), SYN).ext(&ext[..4]).build();
    let run = dp.run_from_pod(&syn);
    assert_translated6(&syn, &run.output, client(), backend(), "four ext headers");
}

#[test]
fn ipv6_ndp_and_echo_pass_untouched() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    // Neighbour solicitation for the service address, and an echo request
    // to it.
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&service().ip().octets());
    let ns = with_checksum6(*client().ip(), *service().ip(), PROTO_ICMPV6, ns);
    let ns = ipv6_frame(*client().ip(), *service().ip(), &[], PROTO_ICMPV6, &ns);
    let echo = with_checksum6(
        *client().ip(),
        *service().ip(),
        PROTO_ICMPV6,
        vec![128, 0, 0, 0, 0, 1, 0, 1],
    );
    let echo = ipv6_frame(*client().ip(), *service().ip(), &[], PROTO_ICMPV6, &echo);
    for (frame, what) in [(&ns, "neighbour solicitation"), (&echo, "echo request")] {
        assert_untouched(&dp.run_from_pod(frame), frame, what);
        assert_untouched(&dp.run_to_pod(frame), frame, what);
    }
}

// ---------------------------------------------------------------------------
// Fragments.

#[test]
fn ipv6_fragments_of_a_datagram_follow_their_first_fragment() {
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let query = Udp6::new(client(), dns_service()).payload(&[7u8; 100]);
    let [first, later] = query.fragments(0x1234_5678, 48);

    let run = dp.run_from_pod(&first);
    assert_eq!(run.verdict, TC_ACT_OK);
    let (src, dst) = endpoints6(&run.output);
    assert_eq!(
        (src, dst),
        (client(), dns_backend()),
        "first fragment DNATed"
    );
    // The first fragment's UDP checksum covers the whole datagram: check it
    // over the translated datagram reassembled here.
    let mut datagram = run.output[ipv6_fields(&run.output).l4..].to_vec();
    datagram.extend_from_slice(&later[ipv6_fields(&later).l4..]);
    let mut pseudo_ok = datagram.clone();
    pseudo_ok[6..8].fill(0);
    assert_eq!(
        be16(&datagram, 6),
        checksum6(*client().ip(), *dns_backend().ip(), PROTO_UDP, &pseudo_ok),
        "UDP checksum of the translated datagram"
    );

    let run = dp.run_from_pod(&later);
    assert_eq!(run.verdict, TC_ACT_OK);
    let mut expected = later.clone();
    expected[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&dns_backend().ip().octets());
    assert_eq!(
        hex(&run.output),
        hex(&expected),
        "later fragment: address only"
    );
    assert_eq!(dp.counter(Counter::FragmentTranslated), 1);

    // A later fragment of a datagram never seen is dropped.
    let [_, stray] = query.fragments(0x9999, 48);
    let run = dp.run_from_pod(&stray);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::FragmentUnknown), 1);
}

// ---------------------------------------------------------------------------
// Rejects.

#[test]
fn ipv6_syn_to_a_service_without_endpoints_is_answered_with_a_rst() {
    let dp = Harness::new();
    web(&dp, &[]);
    let syn = Tcp6::new(client(), service(), SYN).build();

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = &run.output;
    assert_eq!(out.len(), IP6_L4 + 20, "RST is Ethernet + IPv6 + TCP");
    assert_eq!(out[0..6], CLIENT_MAC, "to the sender");
    assert_eq!(out[6..12], GATEWAY_MAC);
    let f = ipv6_fields(out);
    assert_eq!((f.proto, f.payload_len), (PROTO_TCP, 20));
    assert_eq!(endpoints6(out), (service(), client()));
    assert_eq!(out[IP6_L4 + 13], RST | ACK, "a SYN is refused with RST+ACK");
    assert_eq!(be32(out, IP6_L4 + 8), 1_001, "the RST acknowledges the SYN");
    assert!(l4_checksum6_ok(out), "RST checksum: {}", hex(out));
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
}

#[test]
fn ipv6_udp_to_a_service_without_endpoints_is_answered_with_port_unreachable() {
    let dp = Harness::new();
    dns(&dp, &[]);
    let query = Udp6::new(client(), dns_service()).build();

    let run = dp.run_from_pod(&query);

    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = &run.output;
    let f = ipv6_fields(out);
    assert_eq!(
        (f.proto, f.src, f.dst),
        (PROTO_ICMPV6, *dns_service().ip(), *client().ip())
    );
    assert_eq!(out.len(), IP6_L4 + 8 + 48);
    assert_eq!(f.payload_len, 56);
    assert_eq!(
        out[IP6_L4..IP6_L4 + 2],
        [1, 4],
        "destination unreachable, port"
    );
    assert_eq!(be32(out, IP6_L4 + 4), 0, "unused bytes zero");
    assert_eq!(
        hex(&out[IP6_L4 + 8..]),
        hex(&query[ETH_HLEN..ETH_HLEN + 48]),
        "quotes the client's IPv6 and UDP headers"
    );
    assert!(l4_checksum6_ok(out), "ICMPv6 checksum: {}", hex(out));
}

#[test]
fn ipv6_rst_to_a_service_without_endpoints_is_not_answered() {
    let dp = Harness::new();
    web(&dp, &[]);
    let rst = Tcp6::new(client(), service(), RST | ACK).build();
    let run = dp.run_from_pod(&rst);
    assert_eq!(run.verdict, TC_ACT_SHOT);
}

#[test]
fn ipv6_tcp_flow_to_a_removed_backend_is_reset_and_udp_moves() {
    let dp = Harness::new();
    let other = sa("fd00:10:244:4::a", 8080);
    web(&dp, &[backend()]);
    dp.run_from_pod(&Tcp6::new(client(), service(), SYN).build());
    dp.remove_backend6(1);
    dp.set_service6(
        0,
        service(),
        Protocol::Tcp,
        &[other],
        2,
        Frontend6Options::default(),
    );

    let run = dp.run_from_pod(&Tcp6::new(client(), service(), ACK).build());
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(endpoints6(&run.output), (service(), client()));
    assert_eq!(
        run.output[IP6_L4 + 13],
        RST,
        "an ACKed segment gets a bare RST"
    );
    assert_eq!(dp.counter(Counter::ResetBackendGone), 1);

    let dns_other = sa("fd00:10:244:5::a", 5353);
    dns(&dp, &[dns_backend()]);
    dp.run_from_pod(&Udp6::new(client(), dns_service()).build());
    dp.remove_backend6(20);
    dp.set_service6(
        1,
        dns_service(),
        Protocol::Udp,
        &[dns_other],
        21,
        Frontend6Options::default(),
    );
    let query = Udp6::new(client(), dns_service()).build();
    let run = dp.run_from_pod(&query);
    assert_translated6(&query, &run.output, client(), dns_other, "moved UDP flow");
    assert_eq!(dp.counter(Counter::UdpFlowMoved), 1);
}

// ---------------------------------------------------------------------------
// ICMPv6 errors.

/// An ICMPv6 error of `kind` from `from` to the client quoting the
/// client's packet `quoted` as the backend would get it (the whole IPv6
/// packet, as a Packet Too Big quotes as much as fits).
fn icmp6_error(kind: [u8; 2], from: Ipv6Addr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind[0], kind[1], 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted[ETH_HLEN..]);
    let icmp = with_checksum6(from, *client().ip(), PROTO_ICMPV6, icmp);
    ipv6_frame(from, *client().ip(), &[], PROTO_ICMPV6, &icmp)
}

#[test]
fn ipv6_packet_too_big_from_a_router_reaches_the_client_about_the_service() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    let segment = Tcp6::new(client(), service(), SYN)
        .payload(&[1u8; 64])
        .build();
    let sent = dp.run_from_pod(&segment).output;
    let ptb = icmp6_error([2, 0], router(), 1280, &sent);

    let run = dp.run_to_pod(&ptb);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut expected = ptb.clone();
    let inner = IP6_L4 + 8;
    expected[inner + 24..inner + 40].copy_from_slice(&service().ip().octets());
    expected[inner + 42..inner + 44].copy_from_slice(&service().port().to_be_bytes());
    let masked = |b: &[u8]| {
        let mut b = b.to_vec();
        b[IP6_L4 + 2..IP6_L4 + 4].fill(0);
        b
    };
    assert_eq!(
        hex(&masked(&run.output)),
        hex(&masked(&expected)),
        "quoted destination is the service; the router stays the source"
    );
    assert!(
        l4_checksum6_ok(&run.output),
        "ICMPv6 checksum: {}",
        hex(&run.output)
    );
    assert_eq!(be32(&run.output, IP6_L4 + 4), 1280, "MTU kept");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

#[test]
fn ipv6_port_unreachable_from_the_backend_comes_from_the_service() {
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let sent = dp
        .run_from_pod(&Udp6::new(client(), dns_service()).build())
        .output;
    let error = icmp6_error([1, 4], *dns_backend().ip(), 0, &sent);

    let run = dp.run_to_pod(&error);

    let f = ipv6_fields(&run.output);
    assert_eq!((f.src, f.dst), (*dns_service().ip(), *client().ip()));
    let inner = IP6_L4 + 8;
    let (q_src, q_dst) = endpoints6(&{
        let mut q = run.output[..ETH_HLEN].to_vec();
        q.extend_from_slice(&run.output[inner..]);
        q
    });
    assert_eq!(
        (q_src, q_dst),
        (client(), dns_service()),
        "quote is what the client sent"
    );
    assert!(
        l4_checksum6_ok(&run.output),
        "ICMPv6 checksum: {}",
        hex(&run.output)
    );
}

#[test]
fn ipv6_icmp_error_about_an_unknown_flow_passes_untouched() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    let segment = Tcp6::new(client(), backend(), SYN).build();
    let ptb = icmp6_error([2, 0], router(), 1280, &segment);
    assert_untouched(&dp.run_to_pod(&ptb), &ptb, "PTB about an untranslated flow");
}

// ---------------------------------------------------------------------------
// Hairpin and affinity.

#[test]
fn ipv6_hairpin_flow_is_snatted_to_the_service_address_both_ways() {
    let dp = Harness::new();
    let me = sa("fd00:10:244:2::a", 41_000);
    web(&dp, &[backend()]);
    let syn = Tcp6::new(me, service(), SYN).build();

    let run = dp.run_from_pod(&syn);
    let to_backend = SocketAddrV6::new(*service().ip(), me.port(), 0, 0);
    assert_translated6(&syn, &run.output, to_backend, backend(), "hairpin SYN");

    // The backend answers the service address; from_pod translates it back.
    let synack = Tcp6::new(backend(), to_backend, SYN | ACK).build();
    let run = dp.run_from_pod(&synack);
    assert_translated6(&synack, &run.output, service(), me, "hairpin reply");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend() {
    let dp = Harness::new();
    let backends: Vec<_> = (1..=4)
        .map(|i| sa(&format!("fd00:10:244:9::{i}"), 8080))
        .collect();
    let service_id = dp.set_service6(
        0,
        service(),
        Protocol::Tcp,
        &backends,
        1,
        Frontend6Options {
            affinity_timeout_s: 10_800,
            flags: 0,
        },
    );
    let mut chosen = Vec::new();
    for port in 0..12u16 {
        let c = SocketAddrV6::new(*client().ip(), 30_000 + port, 0, 0);
        let run = dp.run_from_pod(&Tcp6::new(c, service(), SYN).build());
        chosen.push(endpoints6(&run.output).1);
    }
    assert!(
        chosen.iter().all(|b| *b == chosen[0]),
        "every connection of the client went to one backend: {chosen:?}"
    );
    assert_eq!(dp.counter(Counter::AffinityHit), 11);
    let affinity = dp.affinity6();
    assert_eq!(affinity.len(), 1);
    assert_eq!(affinity[0].0.service_id, service_id);
    assert_eq!(affinity[0].0.client_addr, ipv6_bytes(&client()));
}

#[test]
fn ipv6_local_traffic_policy_without_local_endpoints_drops() {
    let dp = Harness::new();
    dp.set_service6(
        0,
        service(),
        Protocol::Tcp,
        &[],
        1,
        Frontend6Options {
            affinity_timeout_s: 0,
            flags: service_flags::DROP_NO_LOCAL_ENDPOINTS,
        },
    );
    let run = dp.run_from_pod(&Tcp6::new(client(), service(), SYN).build());
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropNoLocalEndpoints), 1);
}

#[test]
fn ipv6_time_exceeded_about_a_translated_flow_is_made_about_the_service() {
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let sent = dp
        .run_from_pod(&Udp6::new(client(), dns_service()).build())
        .output;
    let error = icmp6_error([3, 0], router(), 0, &sent);

    let run = dp.run_to_pod(&error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let f = ipv6_fields(&run.output);
    assert_eq!(
        (f.src, f.dst),
        (router(), *client().ip()),
        "outer addresses kept"
    );
    let inner = IP6_L4 + 8;
    let mut quote = run.output[..ETH_HLEN].to_vec();
    quote.extend_from_slice(&run.output[inner..]);
    assert_eq!(endpoints6(&quote), (client(), dns_service()));
    assert!(
        l4_checksum6_ok(&run.output),
        "ICMPv6 checksum: {}",
        hex(&run.output)
    );
}

#[test]
fn ipv6_fragment_header_after_hop_by_hop_is_found_and_its_datagram_tracked() {
    let dp = Harness::new();
    dns(&dp, &[dns_backend()]);
    let query = Udp6::new(client(), dns_service()).payload(&[9u8; 64]);
    let datagram = query.datagram();
    let (src, dst) = (*client().ip(), *dns_service().ip());
    let first = ipv6_frame(
        src,
        dst,
        &[
            ExtHeader::HopByHop,
            ExtHeader::Fragment {
                offset: 0,
                more: true,
                id: 77,
            },
        ],
        PROTO_UDP,
        &datagram[..32],
    );
    let later = ipv6_frame(
        src,
        dst,
        &[ExtHeader::Fragment {
            offset: 32,
            more: false,
            id: 77,
        }],
        PROTO_UDP,
        &datagram[32..],
    );

    let run = dp.run_from_pod(&first);
    assert_eq!(ipv6_fields(&run.output).l4, IP6_L4 + 16);
    assert_eq!(endpoints6(&run.output), (client(), dns_backend()));
    let run = dp.run_from_pod(&later);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(ipv6_fields(&run.output).dst, *dns_backend().ip());
    assert_eq!(dp.counter(Counter::FragmentTranslated), 1);
}

#[test]
fn ipv6_truncated_segment_to_a_service_passes_untouched_and_is_counted() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    let mut syn = Tcp6::new(client(), service(), SYN).build();
    // The payload length claims 8 bytes more than the frame holds.
    let len = be16(&syn, ETH_HLEN + 4) + 8;
    syn[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());

    let run = dp.run_from_pod(&syn);

    assert_untouched(&run, &syn, "truncated SYN");
    assert_eq!(dp.counter(Counter::Malformed), 1);
    assert_eq!(dp.ct6_len(), 0);
}

/// Turns tracing on for the `families` (bits of `trace_families`), as
/// `monitor` does.
fn trace(dp: &Harness, families: u32) {
    trace_with(
        dp,
        TraceConfig {
            enabled: families,
            ..TraceConfig::default()
        },
    );
}

/// Writes `value` to `TRACE_CONFIG`, as `monitor` does.
fn trace_with(dp: &Harness, value: TraceConfig) {
    let data = MapData::from_pin(dp.bpffs().join(map_names::TRACE_CONFIG)).expect("TRACE_CONFIG");
    let mut config: Array<MapData, TraceConfig> =
        Array::try_from(Map::Array(data)).expect("an array");
    config.set(0, value, 0).expect("writing TRACE_CONFIG");
}

/// IPv6 tracing on for packets of `addr6_a` and `addr6_b` (each `::` or
/// an address the packet must have, before or after translation).
fn trace6_of(dp: &Harness, addr6_a: Ipv6Addr, addr6_b: Ipv6Addr) {
    trace_with(
        dp,
        TraceConfig {
            enabled: trace_families::IPV6,
            addr6_a: addr6_a.octets(),
            addr6_b: addr6_b.octets(),
            ..TraceConfig::default()
        },
    );
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
fn ipv6_dnat_and_its_reply_are_each_traced_once_with_the_tuple_before_and_after() {
    let dp = Harness::new();
    let service_id = web(&dp, &[backend()]);
    trace(&dp, trace_families::IPV6);
    let syn = Tcp6::new(client(), service(), SYN).build();

    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);

    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "one event for the SYN: {events:?}");
    let e = events[0];
    assert_eq!(e.family, TraceEvent6::FAMILY);
    assert_eq!(e.hook, trace_hook::FROM_POD);
    assert_eq!(e.proto, IPPROTO_TCP);
    assert_eq!(e.decision, Counter::NewFlow as u8);
    assert_eq!((e.service_id, e.backend_id), (service_id, 1));
    assert_eq!(e.before, tuple6(client(), service()), "as the pod sent it");
    assert_eq!(e.after, tuple6(client(), backend()), "DNATed");

    let reply = Tcp6::new(backend(), client(), SYN | ACK).build();
    assert_eq!(dp.run_to_pod(&reply).verdict, TC_ACT_OK);

    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "one event for the reply: {events:?}");
    let e = events[0];
    assert_eq!(e.hook, trace_hook::TO_POD);
    assert_eq!(e.decision, Counter::ReplyTranslated as u8);
    assert_eq!((e.service_id, e.backend_id), (service_id, 1));
    assert_eq!(e.before, tuple6(backend(), client()));
    assert_eq!(e.after, tuple6(service(), client()), "from the service");
}

#[test]
fn ipv6_refusal_is_traced_once_with_the_tuple_the_client_sent() {
    let dp = Harness::new();
    let service_id = web(&dp, &[]);
    trace(&dp, trace_families::IPV4 | trace_families::IPV6);
    let syn = Tcp6::new(client(), service(), SYN).build();

    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_REDIRECT);

    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(e.hook, trace_hook::FROM_POD);
    assert_eq!(e.decision, Counter::RejectNoEndpoints as u8);
    assert_eq!((e.service_id, e.backend_id), (service_id, 0));
    assert_eq!(e.before, tuple6(client(), service()));
    assert_eq!(e.after, e.before, "refused untranslated");
}

#[test]
fn ipv6_packets_are_not_traced_when_only_ipv4_tracing_is_on() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    dns(&dp, &[]);
    trace(&dp, trace_families::IPV4);

    let syn = Tcp6::new(client(), service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    let refused = Udp6::new(client(), dns_service()).payload(b"q").build();
    dp.run_from_pod(&refused);

    assert_eq!(trace_events6(&dp), [], "IPv6 tracing is off");
    assert_eq!(dp.counter(Counter::NewFlow), 1, "the SYN was translated");
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
}

/// `monitor --service web --ip CLIENT` over IPv6: the service's address
/// (only in the tuple before translation) and the client's; the datapath
/// reports the client's packets and no other client's.
#[test]
fn ipv6_trace_filter_reports_a_matching_clients_packets_and_no_others() {
    let dp = Harness::new();
    let service_id = web(&dp, &[backend()]);
    trace6_of(&dp, *service().ip(), *client().ip());

    let syn = Tcp6::new(client(), service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    let events = trace_events6(&dp);
    assert_eq!(events.len(), 1, "the client's SYN: {events:?}");
    assert_eq!(events[0].service_id, service_id);
    assert_eq!(events[0].before, tuple6(client(), service()));
    assert_eq!(events[0].after, tuple6(client(), backend()));

    let other = sa("fd00:10:244:1::b", 40_001);
    let syn = Tcp6::new(other, service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    assert_eq!(trace_events6(&dp), [], "another client's SYN");
    assert_eq!(dp.counter(Counter::NewFlow), 2, "both SYNs were translated");
}

/// `monitor --ip BACKEND` over IPv6: the backend's address is only in the
/// tuple after translation of a client's packet and only before it of the
/// reply; both are reported, and nothing once the filter is another
/// address.
#[test]
fn ipv6_trace_filter_matches_an_address_before_or_after_translation() {
    let dp = Harness::new();
    web(&dp, &[backend()]);
    trace6_of(&dp, Ipv6Addr::UNSPECIFIED, *backend().ip());

    let syn = Tcp6::new(client(), service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    let reply = Tcp6::new(backend(), client(), SYN | ACK).build();
    assert_eq!(dp.run_to_pod(&reply).verdict, TC_ACT_OK);
    let events = trace_events6(&dp);
    assert_eq!(events.len(), 2, "the SYN and its reply: {events:?}");
    assert_eq!(events[0].hook, trace_hook::FROM_POD);
    assert_eq!(events[0].after, tuple6(client(), backend()), "DNATed");
    assert_eq!(events[1].hook, trace_hook::TO_POD);
    assert_eq!(events[1].before, tuple6(backend(), client()), "as sent");

    trace6_of(
        &dp,
        Ipv6Addr::UNSPECIFIED,
        "fd00:10:244:9::9".parse().unwrap(),
    );
    let syn = Tcp6::new(sa("fd00:10:244:1::a", 40_002), service(), SYN).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    assert_eq!(trace_events6(&dp), [], "no packet of that address");
    assert_eq!(dp.counter(Counter::NewFlow), 2);
}
