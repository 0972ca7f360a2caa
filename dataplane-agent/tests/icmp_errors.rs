//! ICMP errors about translated flows, under BPF_PROG_TEST_RUN: a backend's
//! "port unreachable" (or a router's "fragmentation needed") quotes the
//! packet as the backend got it; `to_pod` must make it about the service so
//! the client's socket matches it. Checksums are recomputed here.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::{Ipv4Addr, SocketAddrV4};

use dataplane_agent::control::model::Protocol;
use dataplane_common::Counter;
use dataplane_testkit::datapath::{addr, Harness, TC_ACT_OK};
use dataplane_testkit::packets::{
    be16, endpoints, hex, ip_checksum_ok, ipv4_fields, l4_checksum_ok, ones_sum, Udp, CLIENT_MAC,
    ETH_HLEN, GATEWAY_MAC,
};
use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 3, 10], 5353)
}

/// A datapath with the DNS service, and the client's query as `from_pod`
/// sent it on (to the backend).
fn translated_query() -> (Harness, Vec<u8>) {
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    let query = Udp::new(client(), dns_service()).payload(b"query").build();
    let run = dp.run_from_pod(&query);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(endpoints(&run.output).1, dns_backend(), "query DNATted");
    (dp, run.output)
}

/// ICMP `icmp_type` from `from` to the client quoting `quoted` (an Ethernet
/// frame; its IPv4 packet is quoted, cut to `quote_len` bytes).
fn icmp_error(from: Ipv4Addr, icmp_type: Icmpv4Type, quoted: &[u8], quote_len: usize) -> Vec<u8> {
    let ip = &quoted[ETH_HLEN..];
    let quote = &ip[..quote_len.min(ip.len())];
    let builder = PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
        .ipv4(from.octets(), client().ip().octets(), 64)
        .icmpv4(icmp_type);
    let mut frame = Vec::with_capacity(builder.size(quote.len()));
    builder
        .write(&mut frame, quote)
        .expect("building the ICMP error");
    frame
}

/// Offset of the quoted IPv4 header in an ICMP error frame.
fn quote_off(frame: &[u8]) -> usize {
    ipv4_fields(frame).expect("IPv4").l4() + 8
}

fn quoted_dst(frame: &[u8]) -> SocketAddrV4 {
    let q = quote_off(frame);
    let ihl = usize::from(frame[q] & 0x0f) * 4;
    SocketAddrV4::new(
        Ipv4Addr::new(frame[q + 16], frame[q + 17], frame[q + 18], frame[q + 19]),
        be16(frame, q + ihl + 2),
    )
}

fn quoted_src(frame: &[u8]) -> SocketAddrV4 {
    let q = quote_off(frame);
    let ihl = usize::from(frame[q] & 0x0f) * 4;
    SocketAddrV4::new(
        Ipv4Addr::new(frame[q + 12], frame[q + 13], frame[q + 14], frame[q + 15]),
        be16(frame, q + ihl),
    )
}

fn quoted_ip_checksum_ok(frame: &[u8]) -> bool {
    let q = quote_off(frame);
    let ihl = usize::from(frame[q] & 0x0f) * 4;
    ones_sum(&frame[q..q + ihl]) == 0xffff
}

#[test]
fn port_unreachable_from_a_backend_is_made_about_the_service() {
    let (dp, sent) = translated_query();
    let error = icmp_error(
        *dns_backend().ip(),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &sent,
        usize::MAX,
    );
    assert!(l4_checksum_ok(&error), "test packet is well formed");

    let run = dp.run_to_pod(&error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let out = &run.output;
    assert_eq!(out.len(), error.len(), "nothing added or cut");
    let f = ipv4_fields(out).expect("IPv4");
    assert_eq!(
        f.src,
        *dns_service().ip(),
        "the error comes from the service, as replies do"
    );
    assert_eq!(f.dst, *client().ip());
    assert_eq!(
        quoted_dst(out),
        dns_service(),
        "the quote is what the client sent"
    );
    assert_eq!(quoted_src(out), client(), "the quoted source is untouched");
    assert!(ip_checksum_ok(out), "outer IPv4 checksum: {}", hex(out));
    assert!(l4_checksum_ok(out), "ICMP checksum: {}", hex(out));
    assert!(
        quoted_ip_checksum_ok(out),
        "quoted IPv4 checksum: {}",
        hex(out)
    );
    // Everything else is byte for byte the same: type/code, the quoted
    // payload, the MACs.
    let q = quote_off(out);
    assert_eq!(out[..12], error[..12]);
    assert_eq!(
        out[f.l4()..f.l4() + 2],
        error[f.l4()..f.l4() + 2],
        "type and code"
    );
    assert_eq!(out[q + 20 + 8..], error[q + 20 + 8..], "quoted payload");
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 1);
}

#[test]
fn error_from_a_router_keeps_its_source_and_gets_a_translated_quote() {
    let (dp, sent) = translated_query();
    let router = Ipv4Addr::new(10, 244, 3, 1);
    // Fragmentation needed: path MTU discovery through a service.
    let error = icmp_error(
        router,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
        &sent,
        28,
    );

    let run = dp.run_to_pod(&error);

    assert_eq!(run.verdict, TC_ACT_OK);
    let out = &run.output;
    assert_eq!(
        ipv4_fields(out).unwrap().src,
        router,
        "a router's error keeps its source"
    );
    assert_eq!(quoted_dst(out), dns_service());
    assert!(
        ip_checksum_ok(out) && l4_checksum_ok(out) && quoted_ip_checksum_ok(out),
        "{}",
        hex(out)
    );
    assert_eq!(
        be16(out, ipv4_fields(out).unwrap().l4() + 6),
        1400,
        "MTU kept"
    );
}

#[test]
fn icmp_errors_about_unknown_flows_and_truncated_ones_pass_untouched() {
    let (dp, sent) = translated_query();
    // About a flow nobody translated (another client port).
    let other = Udp::new(addr([10, 244, 1, 10], 40_001), dns_backend())
        .payload(b"query")
        .build();
    let unknown = icmp_error(
        *dns_backend().ip(),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &other,
        usize::MAX,
    );
    // A quote cut inside the IPv4 header: the ports are not there.
    let truncated = icmp_error(
        *dns_backend().ip(),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &sent,
        16,
    );
    // Not an error: an echo reply from the backend.
    let echo = {
        let builder = PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_MAC)
            .ipv4(dns_backend().ip().octets(), client().ip().octets(), 64)
            .icmpv4_echo_reply(1, 1);
        let mut frame = Vec::new();
        builder.write(&mut frame, &sent[ETH_HLEN..]).unwrap();
        frame
    };
    for (what, packet) in [
        ("unknown flow", unknown),
        ("truncated", truncated),
        ("echo reply", echo),
    ] {
        let run = dp.run_to_pod(&packet);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(
            hex(&run.output),
            hex(&packet),
            "{what}: must pass byte for byte"
        );
    }
    assert_eq!(dp.counter(Counter::IcmpErrorTranslated), 0);
}
