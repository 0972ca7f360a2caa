//! The tc programs under BPF_PROG_TEST_RUN, in three steps each: build a
//! packet, set up the maps through the agent's sync engine, check the output
//! bytes and the map side effects. Checksums are recomputed here, never taken
//! from the code under test.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::{cell::RefCell, collections::HashMap, net::SocketAddrV4};

use dataplane_agent::control::model::Protocol;
use dataplane_common::{
    ct_dir, ct_flags, ct_state, ipv4_to_map, port_to_map, Counter, IPPROTO_TCP, IPPROTO_UDP,
};
use dataplane_testkit::datapath::{
    addr, ct_key, Harness, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
};
use dataplane_testkit::packets::{
    assert_checksums_ok, assert_translated, be16, be32, endpoints, hex, ip_checksum_ok,
    ipv4_fields, l4_checksum_ok, ones_sum, Fields, Tcp, Udp, ACK, CLIENT_MAC, ETH_HLEN, FIN,
    GATEWAY_MAC, IP_OPT_8_BYTES, IP_OPT_ROUTER_ALERT, PSH, RST, SYN,
};
use etherparse::{Icmpv4Type, IpNumber, PacketBuilder, TransportHeader};
use proptest::{
    bool::weighted,
    collection::vec,
    prelude::*,
    sample::{select, Index},
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 80)
}
fn backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 8080)
}
fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 3, 10], 5353)
}

/// The client's packet went on unchanged.
#[track_caller]
fn assert_untouched(run: &Run, input: &[u8], what: &str) {
    assert_eq!(run.verdict, TC_ACT_OK, "{what}: verdict");
    assert_eq!(
        hex(&run.output),
        hex(input),
        "{what}: the packet must pass byte for byte"
    );
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) frames shorter than an Ethernet
/// header, and IPv4 frames shorter than Ethernet + a 20-byte IPv4 header: the
/// programs can never be shown such frames here.
fn kernel_refuses(frame: &[u8]) -> bool {
    frame.len() < ETH_HLEN || (frame[12..14] == [0x08, 0x00] && frame.len() < ETH_HLEN + 20)
}

/// Counters that changed between two snapshots.
fn counter_delta(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}

/// Recomputes the IPv4 header checksum after a test patched the header.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let end = (ETH_HLEN + ihl.max(20)).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let csum = !ones_sum(&frame[ETH_HLEN..end]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
}

// ---------------------------------------------------------------------------
// 1-3: the life of a TCP connection.

#[test]
fn syn_to_a_service_is_dnatted_to_its_backend_and_tracked_both_ways() {
    let syn = Tcp::new(client(), service(), SYN)
        .seq(7_000)
        .payload(b"hello")
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&syn, &run.output, client(), backend(), "DNATed SYN");
    let parsed =
        etherparse::PacketHeaders::from_ethernet_slice(&run.output).expect("output parses");
    assert_eq!(parsed.payload.slice(), b"hello", "payload unchanged");
    let Some(TransportHeader::Tcp(tcp)) = parsed.transport else {
        panic!("output is not TCP")
    };
    assert!(
        tcp.syn && !tcp.ack && tcp.sequence_number == 7_000,
        "TCP header unchanged: {tcp:?}"
    );

    let original = dp
        .ct_get(&ct_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL,
        ))
        .expect("conntrack holds the original tuple");
    let reply = dp
        .ct_get(&ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
        .expect("conntrack holds the reply tuple");
    for (entry, what) in [(original, "original"), (reply, "reply")] {
        assert_eq!(
            entry.client_addr,
            ipv4_to_map([10, 244, 1, 10]),
            "{what} entry client"
        );
        assert_eq!(
            entry.client_port,
            port_to_map(40_000),
            "{what} entry client port"
        );
        assert_eq!(
            entry.service_addr,
            ipv4_to_map([10, 96, 0, 10]),
            "{what} entry service"
        );
        assert_eq!(
            entry.service_port,
            port_to_map(80),
            "{what} entry service port"
        );
        assert_eq!(
            entry.backend_addr,
            ipv4_to_map([10, 244, 2, 10]),
            "{what} entry backend"
        );
        assert_eq!(
            entry.backend_port,
            port_to_map(8080),
            "{what} entry backend port"
        );
        assert_eq!(entry.proto, IPPROTO_TCP, "{what} entry proto");
        assert_eq!(
            entry.flags & ct_flags::HAIRPIN,
            0,
            "{what} entry is not a hairpin"
        );
    }
    assert_eq!(original.state, ct_state::OPENING);
    assert_eq!(dp.ct_len(), 2, "exactly the two entries of the flow");
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    assert_eq!(dp.counter(Counter::Established), 0);
}

#[test]
fn every_packet_of_a_flow_goes_to_the_backend_its_syn_got() {
    let backends = [
        addr([10, 244, 2, 10], 8080),
        addr([10, 244, 2, 11], 8080),
        addr([10, 244, 2, 12], 8080),
    ];
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &backends);

    let mut chosen = Vec::new();
    for i in 0..20u16 {
        let client = addr([10, 244, 1, 10], 41_000 + i);
        let syn = Tcp::new(client, service(), SYN).build();
        let first = dp.run_from_pod(&syn);
        assert_eq!(first.verdict, TC_ACT_OK, "flow {i}: SYN verdict");
        let (_, picked) = endpoints(&first.output);
        assert!(
            backends.contains(&picked),
            "flow {i}: SYN went to {picked}, not a backend"
        );
        assert_translated(&syn, &first.output, client, picked, "SYN");
        for (n, flags) in [ACK, PSH | ACK, FIN | ACK].into_iter().enumerate() {
            let next = Tcp::new(client, service(), flags)
                .seq(1_001)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .build();
            let run = dp.run_from_pod(&next);
            assert_eq!(run.verdict, TC_ACT_OK, "flow {i} packet {n}: verdict");
            assert_translated(
                &next,
                &run.output,
                client,
                picked,
                &format!("flow {i} packet {n}"),
            );
        }
        chosen.push(picked);
    }

    assert_eq!(dp.counter(Counter::NewFlow), 20);
    assert_eq!(dp.counter(Counter::Established), 60);
    let distinct: std::collections::BTreeSet<_> = chosen.iter().collect();
    assert!(
        distinct.len() > 1,
        "20 flows over 3 backends all went to {:?}: selection is not spreading",
        distinct
    );
}

#[test]
fn backend_reply_is_translated_back_to_the_service_address() {
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let syn_ack = Tcp::new(backend(), client(), SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build();
    let ack = Tcp::new(client(), service(), ACK)
        .seq(7_001)
        .ack(90_001)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);

    let reply = dp.run_to_pod(&syn_ack);

    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated(
        &syn_ack,
        &reply.output,
        service(),
        client(),
        "translated SYN-ACK",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
    let original_key = ct_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL);
    let entry = dp.ct_get(&original_key).expect("flow still tracked");
    assert_ne!(
        entry.flags & ct_flags::SEEN_REPLY,
        0,
        "the reply was recorded"
    );
    // The client's ACK completes the handshake.
    assert_eq!(dp.run_from_pod(&ack).verdict, TC_ACT_OK);
    assert_eq!(
        dp.ct_get(&original_key).expect("flow still tracked").state,
        ct_state::ESTABLISHED
    );
    // Traffic towards the pod that is not a reply of a tracked flow is left alone.
    let stranger = Tcp::new(addr([10, 244, 2, 99], 8080), client(), SYN | ACK).build();
    assert_untouched(
        &dp.run_to_pod(&stranger),
        &stranger,
        "reply of an unknown flow",
    );
}

#[test]
fn packets_into_a_pod_from_a_pod_that_serves_no_service_are_not_looked_up() {
    // Only packets from a backend's address and port are looked up in
    // conntrack on their way into a pod (`REPLY_SOURCES` follows the
    // backends): a flow whose backend left the service keeps its entries
    // until the client's next packet, but its former backend's packets pass
    // as they are.
    let other = addr([10, 244, 2, 11], 8080);
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let syn_ack = Tcp::new(backend(), client(), SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    dp.set_service("web", service(), Protocol::Tcp, &[other]);
    assert!(
        dp.ct_get(&ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
            .is_some(),
        "the reply entry is still there"
    );

    let run = dp.run_to_pod(&syn_ack);

    assert_untouched(&run, &syn_ack, "packet of a pod that serves no service");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 0);
}

#[test]
fn a_port_a_backend_pod_starts_serving_later_keeps_its_first_ports_replies_translated() {
    // The reply pre-filter starts at the backend address's own entry, whose
    // "no flows yet" bits stand for every port at the address: a port
    // added after a flow went to another must not set them again.
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let syn_ack = Tcp::new(backend(), client(), SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build();
    let admin = addr([10, 96, 0, 11], 80);
    let admin_backend = addr([10, 244, 2, 10], 9090);
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    dp.set_service("admin", admin, Protocol::Tcp, &[admin_backend]);

    let reply = dp.run_to_pod(&syn_ack);

    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated(
        &syn_ack,
        &reply.output,
        service(),
        client(),
        "the first port's reply",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
}

#[test]
fn closed_connection_reopened_with_a_syn_is_a_new_flow() {
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let syn_ack = Tcp::new(backend(), client(), SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build();
    let fin = Tcp::new(client(), service(), FIN | ACK)
        .seq(7_001)
        .ack(90_001)
        .build();
    let fin_back = Tcp::new(backend(), client(), FIN | ACK)
        .seq(90_001)
        .ack(7_002)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    for (program, packet) in [
        ("from_pod", &syn),
        ("to_pod", &syn_ack),
        ("from_pod", &fin),
        ("to_pod", &fin_back),
    ] {
        assert_eq!(dp.run(program, packet).verdict, TC_ACT_OK);
    }
    let key = ct_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL);
    assert_eq!(
        dp.ct_get(&key).expect("flow tracked").state,
        ct_state::CLOSING,
        "FIN both ways"
    );

    let again = dp.run_from_pod(&syn.clone());

    assert_eq!(again.verdict, TC_ACT_OK);
    assert_translated(
        &syn,
        &again.output,
        client(),
        backend(),
        "SYN reusing the tuple",
    );
    assert_eq!(
        dp.counter(Counter::NewFlow),
        2,
        "the reopening SYN made a new flow"
    );
    assert_eq!(
        dp.ct_get(&key).expect("flow tracked").state,
        ct_state::OPENING
    );
}

#[test]
fn expired_flow_is_replaced_by_a_new_one() {
    let syn = Tcp::new(client(), service(), SYN).build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    let key = ct_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL);
    let mut entry = dp.ct_get(&key).expect("flow tracked");
    // Last seen at boot: far older than the 60 s an opening flow lives (the
    // test machine has been up longer than that).
    entry.last_seen_ns = 1;
    dp.conntrack.insert(key, entry, 0).expect("aging the entry");

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&syn, &run.output, client(), backend(), "SYN after expiry");
    assert_eq!(
        (
            dp.counter(Counter::NewFlow),
            dp.counter(Counter::Established)
        ),
        (2, 0)
    );
    assert!(
        dp.ct_get(&key).expect("flow tracked").last_seen_ns > 1,
        "a fresh entry"
    );
}

#[test]
fn reply_of_a_forgotten_flow_passes_untouched_and_its_stale_entry_goes() {
    let syn = Tcp::new(client(), service(), SYN).build();
    let syn_ack = Tcp::new(backend(), client(), SYN | ACK).build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    dp.conntrack
        .remove(&ct_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL,
        ))
        .expect("evicting");

    let run = dp.run_to_pod(&syn_ack);

    assert_untouched(&run, &syn_ack, "reply without its original entry");
    assert!(
        dp.ct_get(&ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
            .is_none(),
        "stale reply entry"
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 0);
}

// ---------------------------------------------------------------------------
// 4: UDP.

#[test]
fn udp_to_a_service_is_dnatted_with_a_valid_checksum() {
    let query = Udp::new(client(), dns_service())
        .payload(b"\x12\x34 query for kubernetes.default")
        .build();
    let answer = Udp::new(dns_backend(), client())
        .payload(b"\x12\x34 answer")
        .build();
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);

    let run = dp.run_from_pod(&query);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&query, &run.output, client(), dns_backend(), "DNATed UDP");
    let f = ipv4_fields(&run.output).unwrap();
    assert_ne!(
        be16(&run.output, f.l4_csum()),
        0,
        "a UDP checksum must not become 0 (\"none\")"
    );
    assert!(dp
        .ct_get(&ct_key(
            client(),
            dns_service(),
            Protocol::Udp,
            ct_dir::ORIGINAL
        ))
        .is_some());
    let back = dp.run_to_pod(&answer);
    assert_eq!(back.verdict, TC_ACT_OK);
    assert_translated(
        &answer,
        &back.output,
        dns_service(),
        client(),
        "translated UDP answer",
    );
}

#[test]
fn udp_without_checksum_keeps_checksum_zero_through_both_translations() {
    let query = Udp::new(client(), dns_service()).no_checksum().build();
    let answer = Udp::new(dns_backend(), client()).no_checksum().build();
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);

    let run = dp.run_from_pod(&query);
    let back = dp.run_to_pod(&answer);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &query,
        &run.output,
        client(),
        dns_backend(),
        "DNATed UDP without checksum",
    );
    let f = ipv4_fields(&run.output).unwrap();
    assert_eq!(
        be16(&run.output, f.l4_csum()),
        0,
        "UDP checksum 0 must stay 0"
    );
    assert_eq!(back.verdict, TC_ACT_OK);
    assert_translated(
        &answer,
        &back.output,
        dns_service(),
        client(),
        "translated answer without checksum",
    );
    assert_eq!(
        be16(&back.output, f.l4_csum()),
        0,
        "UDP checksum 0 must stay 0 on the reply"
    );
}

// ---------------------------------------------------------------------------
// 5: services without endpoints.

/// The output is a bare RST from `from` to `to` answering `input`; returns
/// its (seq, ack, flags).
#[track_caller]
fn assert_reset(run: &Run, input: &[u8], from: SocketAddrV4, to: SocketAddrV4) -> (u32, u32, u8) {
    let out = &run.output;
    assert_eq!(
        run.verdict, TC_ACT_REDIRECT,
        "a reset is sent back out of the interface"
    );
    assert_eq!(
        out.len(),
        54,
        "RST is Ethernet + IPv4 + TCP without payload: {}",
        hex(out)
    );
    assert_eq!(out[0..6], input[6..12], "RST goes to the sender's MAC");
    assert_eq!(
        out[6..12],
        input[0..6],
        "RST comes from the MAC the sender addressed"
    );
    assert_eq!(out[12..14], [0x08, 0x00], "ethertype IPv4");
    let f = ipv4_fields(out).expect("RST is IPv4");
    assert_eq!(
        (f.ihl_bytes, f.tot_len, f.proto),
        (20, 40, IPPROTO_TCP),
        "RST IPv4 header"
    );
    assert_eq!(endpoints(out), (from, to), "RST addresses");
    assert_eq!(out[f.l4() + 12] >> 4, 5, "TCP data offset");
    assert_checksums_ok(out, "RST");
    let flags = out[f.l4() + 13];
    assert_ne!(flags & RST, 0, "RST flag set");
    (be32(out, f.l4() + 4), be32(out, f.l4() + 8), flags)
}

#[test]
fn syn_to_a_service_without_endpoints_is_refused_with_a_reset() {
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[]);

    let run = dp.run_from_pod(&syn);

    let (_, ack, flags) = assert_reset(&run, &syn, service(), client());
    assert_eq!(flags, RST | ACK, "a SYN is refused with RST+ACK");
    assert_eq!(ack, 7_001, "the RST acknowledges the SYN");
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
    assert_eq!(
        dp.ct_len(),
        0,
        "a refused connection leaves no conntrack entry"
    );
}

#[test]
fn syn_with_data_and_padding_to_a_service_without_endpoints_is_acknowledged_whole() {
    let mut syn = Tcp::new(client(), service(), SYN)
        .seq(7_000)
        .payload(b"fastopen")
        .build();
    syn.extend_from_slice(&[0xab; 6]);
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[]);

    let run = dp.run_from_pod(&syn);

    let (_, ack, _) = assert_reset(&run, &syn, service(), client());
    assert_eq!(
        ack,
        7_000 + 1 + 8,
        "SYN + 8 bytes of data acknowledged, padding not counted"
    );
}

#[test]
fn reset_to_a_service_without_endpoints_is_not_answered_with_a_reset() {
    // RFC 9293 3.10.7.1: a RST is never sent in response to a RST (iptables'
    // REJECT --reject-with tcp-reset, kube-proxy's rule, ignores them too).
    let rst = Tcp::new(client(), service(), RST | ACK)
        .seq(7_000)
        .ack(3_000)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[]);

    let run = dp.run_from_pod(&rst);

    assert_ne!(
        run.verdict,
        TC_ACT_REDIRECT,
        "a RST to a service without endpoints was answered with a packet: {}",
        hex(&run.output)
    );
}

#[test]
fn reset_on_a_flow_whose_backend_was_removed_is_not_answered_with_a_reset() {
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let rst = Tcp::new(client(), service(), RST | ACK)
        .seq(7_001)
        .ack(777_777)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    dp.set_service(
        "web",
        service(),
        Protocol::Tcp,
        &[addr([10, 244, 2, 11], 8080)],
    );

    let run = dp.run_from_pod(&rst);

    assert_ne!(
        run.verdict,
        TC_ACT_REDIRECT,
        "the client's RST was answered with a packet: {}",
        hex(&run.output)
    );
}

#[test]
fn udp_to_a_service_without_endpoints_is_refused_with_port_unreachable() {
    let query = Udp::new(client(), dns_service())
        .payload(b"\x12\x34 query")
        .build();
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[]);

    let run = dp.run_from_pod(&query);

    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let out = &run.output;
    assert_eq!(
        out.len(),
        ETH_HLEN + 20 + 8 + 28,
        "ICMP quotes IPv4 header + 8 bytes: {}",
        hex(out)
    );
    assert_eq!(out[0..6], query[6..12], "ICMP goes to the sender's MAC");
    assert_eq!(
        out[6..12],
        query[0..6],
        "ICMP comes from the MAC the sender addressed"
    );
    let parsed = etherparse::PacketHeaders::from_ethernet_slice(out).expect("ICMP parses");
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = &parsed.net else {
        panic!("not IPv4")
    };
    assert_eq!(
        (ip.source, ip.destination),
        ([10, 96, 0, 10], [10, 244, 1, 10]),
        "from the service to the client"
    );
    assert_eq!(ip.protocol, IpNumber::ICMP);
    assert_eq!(ip.total_len, 56);
    let Some(TransportHeader::Icmpv4(icmp)) = &parsed.transport else {
        panic!("not ICMP")
    };
    let Icmpv4Type::DestinationUnreachable(unreachable) = &icmp.icmp_type else {
        panic!("not unreachable: {icmp:?}")
    };
    assert_eq!(
        *unreachable,
        etherparse::icmpv4::DestUnreachableHeader::Port,
        "code 3, port unreachable"
    );
    assert_eq!(
        out[ETH_HLEN + 28..],
        query[ETH_HLEN..ETH_HLEN + 28],
        "quotes the original IPv4 header + 8 bytes"
    );
    assert!(ip_checksum_ok(out), "IPv4 checksum of the ICMP error");
    assert_eq!(ones_sum(&out[ETH_HLEN + 20..]), 0xffff, "ICMP checksum");
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 1);
}

// ---------------------------------------------------------------------------
// 6: a backend goes away under an established flow.

#[test]
fn tcp_flow_whose_backend_was_removed_is_reset_in_window() {
    let other = addr([10, 244, 2, 11], 8080);
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let data = Tcp::new(client(), service(), PSH | ACK)
        .seq(7_001)
        .ack(777_777)
        .payload(b"GET /")
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK);
    dp.set_service("web", service(), Protocol::Tcp, &[other]);

    let run = dp.run_from_pod(&data);

    let (seq, _, flags) = assert_reset(&run, &data, service(), client());
    assert_eq!(
        seq, 777_777,
        "the RST carries the sequence number the client acknowledged"
    );
    assert_eq!(flags, RST, "an ACKed segment is answered with a bare RST");
    assert_eq!(dp.counter(Counter::ResetBackendGone), 1);
    assert!(
        dp.ct_get(&ct_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_none(),
        "flow forgotten"
    );
    assert!(
        dp.ct_get(&ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
            .is_none(),
        "reply entry forgotten"
    );
    // A new connection from the same port gets the live backend.
    let again = dp.run_from_pod(&syn);
    assert_eq!(again.verdict, TC_ACT_OK);
    assert_translated(
        &syn,
        &again.output,
        client(),
        other,
        "new SYN after the reset",
    );
}

#[test]
fn udp_flow_whose_backend_was_removed_moves_to_a_live_backend() {
    let other = addr([10, 244, 3, 11], 5353);
    let query = Udp::new(client(), dns_service()).build();
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    assert_translated(
        &query,
        &dp.run_from_pod(&query).output,
        client(),
        dns_backend(),
        "first datagram",
    );
    dp.set_service("dns", dns_service(), Protocol::Udp, &[other]);

    let run = dp.run_from_pod(&query);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &query,
        &run.output,
        client(),
        other,
        "datagram after the backend left",
    );
    assert_eq!(dp.counter(Counter::UdpFlowMoved), 1);
    let entry = dp
        .ct_get(&ct_key(
            client(),
            dns_service(),
            Protocol::Udp,
            ct_dir::ORIGINAL,
        ))
        .expect("flow tracked");
    assert_eq!(
        (entry.backend_addr, entry.backend_port),
        (ipv4_to_map([10, 244, 3, 11]), port_to_map(5353))
    );
    assert!(
        dp.ct_get(&ct_key(
            dns_backend(),
            client(),
            Protocol::Udp,
            ct_dir::REPLY
        ))
        .is_none(),
        "old reply entry"
    );
    assert!(
        dp.ct_get(&ct_key(other, client(), Protocol::Udp, ct_dir::REPLY))
            .is_some(),
        "new reply entry"
    );
}

// ---------------------------------------------------------------------------
// 7: hairpin.

#[test]
fn pod_reaching_itself_through_its_service_is_snatted_to_the_service_ip_both_ways() {
    let itself = addr([10, 244, 1, 10], 8080);
    let service_as_client = addr([10, 96, 0, 10], 40_000);
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    let syn_ack = Tcp::new(itself, service_as_client, SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build();
    let mut dp = Harness::new();
    dp.set_service("self", service(), Protocol::Tcp, &[itself]);

    let forward = dp.run_from_pod(&syn);
    let reply = dp.run_from_pod(&syn_ack);

    assert_eq!(forward.verdict, TC_ACT_OK);
    assert_translated(
        &syn,
        &forward.output,
        service_as_client,
        itself,
        "hairpinned SYN",
    );
    let entry = dp
        .ct_get(&ct_key(
            client(),
            service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL,
        ))
        .expect("flow tracked");
    assert_ne!(entry.flags & ct_flags::HAIRPIN, 0, "flow marked hairpin");
    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated(
        &syn_ack,
        &reply.output,
        service(),
        client(),
        "hairpinned SYN-ACK",
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
    // Both translated packets then go back into the pod through to_pod, which
    // must leave them alone.
    assert_untouched(
        &dp.run_to_pod(&forward.output),
        &forward.output,
        "hairpinned SYN into the pod",
    );
    assert_untouched(
        &dp.run_to_pod(&reply.output),
        &reply.output,
        "hairpinned SYN-ACK into the pod",
    );
}

// ---------------------------------------------------------------------------
// 8: everything else passes byte for byte.

#[test]
fn traffic_that_is_not_for_a_service_passes_byte_identical() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    let non_service = Tcp::new(client(), backend(), SYN).build();
    let other_port = Tcp::new(client(), addr([10, 96, 0, 10], 443), SYN).build();
    let udp_on_tcp_port = Udp::new(client(), service()).build();
    let mut arp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6])
        .arp(
            etherparse::ArpEthIpv4Packet {
                operation: etherparse::ArpOperation::REQUEST,
                sender_mac: CLIENT_MAC,
                sender_ipv4: [10, 244, 1, 10],
                target_mac: [0; 6],
                target_ipv4: [10, 96, 0, 10],
            }
            .into(),
        )
        .write(&mut arp)
        .expect("arp");
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40_000, 80, 1, 1000)
        .syn()
        .write(&mut ipv6, &[])
        .expect("ipv6");
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4([10, 244, 1, 10], [10, 96, 0, 10], 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut echo, b"ping")
        .expect("icmp");
    let before = dp.counters();

    for (input, what) in [
        (&non_service, "TCP to a pod"),
        (
            &other_port,
            "TCP to a service IP on a port that is not a service",
        ),
        (&udp_on_tcp_port, "UDP to a TCP-only service port"),
        (&arp, "ARP for a service IP"),
        (&ipv6, "IPv6 TCP"),
        (&echo, "ICMP echo to a service IP"),
    ] {
        assert_untouched(&dp.run_from_pod(input), input, &format!("from_pod: {what}"));
        assert_untouched(&dp.run_to_pod(input), input, &format!("to_pod: {what}"));
    }

    assert_eq!(
        counter_delta(&before, &dp.counters()),
        vec![(Counter::UnknownPort, 2)],
        "only the two packets to a service IP on a foreign port are counted"
    );
    assert_eq!(dp.ct_len(), 0, "nothing tracked");
}

// ---------------------------------------------------------------------------
// 9: hostile input.

#[test]
fn truncated_headers_to_a_service_ip_pass_untouched_and_count_as_malformed() {
    let syn = Tcp::new(client(), service(), SYN).payload(b"xyz").build();
    let query = Udp::new(client(), dns_service()).build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);

    let mut expected_malformed = 0;
    for full in [&syn, &query] {
        for cut in 0..full.len() {
            let cut_frame = &full[..cut];
            match dp.try_run("from_pod", cut_frame) {
                Err(_) if kernel_refuses(cut_frame) => {}
                Err(e) => panic!("{cut}-byte frame: test run failed: {e}"),
                Ok(run) => assert_untouched(&run, cut_frame, &format!("frame cut to {cut} bytes")),
            }
            // The same cut with the IPv4 total length made to match the frame:
            // a consistent IP header, a truncated TCP/UDP header.
            if cut >= ETH_HLEN + 20 && cut < ETH_HLEN + 20 + if full == &syn { 20 } else { 8 } {
                let mut consistent = cut_frame.to_vec();
                consistent[ETH_HLEN + 2..ETH_HLEN + 4]
                    .copy_from_slice(&((cut - ETH_HLEN) as u16).to_be_bytes());
                fix_ip_checksum(&mut consistent);
                let run = dp.run_from_pod(&consistent);
                assert_untouched(
                    &run,
                    &consistent,
                    &format!("{cut}-byte frame with a truncated L4 header"),
                );
                expected_malformed += 1;
            }
            if cut >= ETH_HLEN + 20 {
                expected_malformed += 1;
            }
        }
    }

    assert_eq!(
        dp.counter(Counter::Malformed),
        expected_malformed,
        "every truncated packet with a readable service IP"
    );
    assert_eq!(dp.counter(Counter::NewFlow), 0);
    assert_eq!(dp.ct_len(), 0);
}

#[test]
fn packets_with_ip_options_are_dnatted_with_valid_checksums() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);

    for (options, ihl) in [(&IP_OPT_ROUTER_ALERT[..], 6), (&IP_OPT_8_BYTES[..], 7)] {
        let client = addr([10, 244, 1, 10], 40_000 + ihl);
        let syn = Tcp::new(client, service(), SYN)
            .payload(b"data")
            .ip_options(options)
            .build();
        let syn_ack = Tcp::new(backend(), client, SYN | ACK)
            .ip_options(options)
            .build();
        let query = Udp::new(client, dns_service()).ip_options(options).build();
        assert_eq!(syn[ETH_HLEN] & 0x0f, ihl as u8, "test packet has IHL {ihl}");

        let run = dp.run_from_pod(&syn);
        assert_eq!(run.verdict, TC_ACT_OK, "IHL {ihl} SYN");
        assert_translated(
            &syn,
            &run.output,
            client,
            backend(),
            &format!("IHL {ihl} SYN"),
        );
        let run = dp.run_to_pod(&syn_ack);
        assert_eq!(run.verdict, TC_ACT_OK, "IHL {ihl} SYN-ACK");
        assert_translated(
            &syn_ack,
            &run.output,
            service(),
            client,
            &format!("IHL {ihl} SYN-ACK"),
        );
        let run = dp.run_from_pod(&query);
        assert_eq!(run.verdict, TC_ACT_OK, "IHL {ihl} UDP");
        assert_translated(
            &query,
            &run.output,
            client,
            dns_backend(),
            &format!("IHL {ihl} UDP"),
        );
    }
    assert_eq!(dp.counter(Counter::Malformed), 0);
}

#[test]
fn syn_with_ip_options_to_a_service_without_endpoints_gets_a_plain_reset() {
    let syn = Tcp::new(client(), service(), SYN)
        .seq(7_000)
        .ip_options(&IP_OPT_8_BYTES)
        .build();
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[]);

    let run = dp.run_from_pod(&syn);

    let (_, ack, _) = assert_reset(&run, &syn, service(), client());
    assert_eq!(ack, 7_001);
}

#[test]
fn inconsistent_ip_and_tcp_lengths_to_a_service_pass_untouched_and_count_as_malformed() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    let patched = |mut frame: Vec<u8>, patch: &dyn Fn(&mut Vec<u8>, Fields)| {
        let f = ipv4_fields(&frame).unwrap();
        patch(&mut frame, f);
        fix_ip_checksum(&mut frame);
        frame
    };
    let syn = Tcp::new(client(), service(), SYN).payload(b"abcd").build();
    let udp = Udp::new(client(), dns_service()).build();
    let set_tot_len =
        |len: u16| move |b: &mut Vec<u8>, _: Fields| b[16..18].copy_from_slice(&len.to_be_bytes());
    let cases = [
        (
            patched(syn.clone(), &set_tot_len(20 + 20 + 4 + 1)),
            "IPv4 total length 1 byte past the frame",
        ),
        (
            patched(syn.clone(), &set_tot_len(1500)),
            "IPv4 total length 1500 in a 58-byte frame",
        ),
        (
            patched(syn.clone(), &set_tot_len(19)),
            "IPv4 total length below the header",
        ),
        (
            patched(syn.clone(), &|b, f| b[f.l4() + 12] = 4 << 4),
            "TCP data offset 4",
        ),
        (
            patched(syn.clone(), &|b, f| b[f.l4() + 12] = 0),
            "TCP data offset 0",
        ),
        (
            patched(syn.clone(), &|b, f| b[f.l4() + 12] = 15 << 4),
            "TCP data offset 15 past the datagram",
        ),
        (patched(syn.clone(), &|b, _| b[ETH_HLEN] = 0x44), "IHL 4"),
        (
            patched(syn.clone(), &|b, _| b[ETH_HLEN] = 0x4f),
            "IHL 15 past the datagram",
        ),
        (
            patched(syn, &|b, _| b[ETH_HLEN] = 0x65),
            "IP version 6 with ethertype IPv4",
        ),
        (
            patched(udp.clone(), &|b, f| {
                b[f.l4() + 4..f.l4() + 6].copy_from_slice(&7u16.to_be_bytes())
            }),
            "UDP length 7",
        ),
        (
            patched(udp, &|b, f| {
                b[f.l4() + 4..f.l4() + 6].copy_from_slice(&200u16.to_be_bytes())
            }),
            "UDP length past IP",
        ),
    ];

    for (frame, what) in &cases {
        assert_untouched(&dp.run_from_pod(frame), frame, what);
    }

    assert_eq!(dp.counter(Counter::Malformed), cases.len() as u64);
    assert_eq!(dp.counter(Counter::NewFlow), 0);
}

#[test]
fn packets_without_payload_are_dnatted() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    let ack = Tcp::new(client(), service(), ACK).build();
    let empty_udp = Udp::new(client(), dns_service()).payload(&[]).build();
    assert_eq!((ack.len(), empty_udp.len()), (54, 42));

    let tcp_run = dp.run_from_pod(&ack);
    let udp_run = dp.run_from_pod(&empty_udp);

    assert_eq!(tcp_run.verdict, TC_ACT_OK);
    assert_translated(&ack, &tcp_run.output, client(), backend(), "bare ACK");
    assert_eq!(udp_run.verdict, TC_ACT_OK);
    assert_translated(
        &empty_udp,
        &udp_run.output,
        client(),
        dns_backend(),
        "empty UDP datagram",
    );
}

#[test]
fn trailing_ethernet_padding_is_kept_and_left_out_of_checksums() {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    let pad = |mut frame: Vec<u8>, byte: u8| {
        frame.resize(60.max(frame.len() + 3), byte);
        frame
    };
    let cases = [
        (
            pad(Tcp::new(client(), service(), SYN).build(), 0),
            backend(),
            "SYN padded with zeroes",
        ),
        (
            pad(
                Tcp::new(addr([10, 244, 1, 11], 1), service(), SYN).build(),
                0xa5,
            ),
            backend(),
            "SYN padded with junk",
        ),
        (
            pad(Udp::new(client(), dns_service()).payload(b"q").build(), 0),
            dns_backend(),
            "UDP padded with zeroes",
        ),
        (
            pad(
                Udp::new(addr([10, 244, 1, 11], 1), dns_service()).build(),
                0xff,
            ),
            dns_backend(),
            "UDP padded with junk",
        ),
    ];

    for (frame, to, what) in &cases {
        let run = dp.run_from_pod(frame);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        let (from, _) = endpoints(frame);
        assert_translated(frame, &run.output, from, *to, what);
    }
}

#[test]
fn hairpinned_udp_without_checksum_keeps_checksum_zero() {
    let itself = addr([10, 244, 1, 10], 5353);
    let query = Udp::new(client(), dns_service()).no_checksum().build();
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[itself]);

    let run = dp.run_from_pod(&query);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(
        &query,
        &run.output,
        addr([10, 96, 0, 10], 40_000),
        itself,
        "hairpinned UDP",
    );
    let f = ipv4_fields(&run.output).unwrap();
    assert_eq!(be16(&run.output, f.l4_csum()), 0);
}

/// The checker the other tests rely on: it accepts etherparse's checksums and
/// rejects any single flipped bit in the checksummed bytes.
#[test]
fn checksum_checker_agrees_with_etherparse_and_catches_flipped_bits() {
    let packets = [
        Tcp::new(client(), service(), PSH | ACK)
            .payload(b"odd")
            .ip_options(&IP_OPT_8_BYTES)
            .build(),
        Udp::new(client(), dns_service()).payload(b"even").build(),
    ];
    for packet in packets {
        assert_checksums_ok(&packet, "etherparse-built packet");
        for at in ETH_HLEN..packet.len() {
            let mut flipped = packet.clone();
            flipped[at] ^= 0x10;
            let f = ipv4_fields(&flipped);
            let caught = f.is_none_or(|f| {
                ETH_HLEN + f.tot_len > flipped.len()
                    || !ip_checksum_ok(&flipped)
                    || !l4_checksum_ok(&flipped)
            });
            assert!(caught, "bit flip at byte {at} not caught");
        }
    }
}

// ---------------------------------------------------------------------------
// 10: random and corrupted packets.

/// What the maps hold, as the fuzz test's oracle.
struct Services {
    /// (service IP, port, proto) -> backends (empty: no endpoints).
    frontends: HashMap<(SocketAddrV4, u8), Vec<SocketAddrV4>>,
}

impl Services {
    fn backends(&self, dst: SocketAddrV4, proto: u8) -> Option<&Vec<SocketAddrV4>> {
        self.frontends.get(&(dst, proto))
    }
}

/// Whether a packet is a complete IPv4 TCP/UDP datagram or the first
/// fragment of one (whose UDP length covers more than it holds), judged
/// here independently of the datapath's parser.
fn well_formed(frame: &[u8]) -> Option<Fields> {
    let f = ipv4_fields(frame)?;
    let frag = be16(frame, ETH_HLEN + 6);
    let first_fragment = frag & 0x2000 != 0;
    let l4_len = f.tot_len.checked_sub(f.ihl_bytes)?;
    if frag & 0x1fff != 0 || ETH_HLEN + f.tot_len > frame.len() {
        return None;
    }
    match f.proto {
        6 if l4_len >= 20 && usize::from(frame[f.l4() + 12] >> 4) * 4 >= 20 => {
            (usize::from(frame[f.l4() + 12] >> 4) * 4 <= l4_len).then_some(f)
        }
        17 if l4_len >= 8 => {
            let udp_len = usize::from(be16(frame, f.l4() + 4));
            (udp_len >= 8 && (first_fragment || udp_len <= l4_len)).then_some(f)
        }
        _ => None,
    }
}

/// A later fragment (no L4 header) of a TCP/UDP datagram to a service IP,
/// with lengths that fit the frame: translated if its datagram's first
/// fragment was (`FRAGMENTS`), dropped otherwise.
fn later_fragment_to_a_service(services: &Services, frame: &[u8]) -> Option<Fields> {
    let f = ipv4_fields(frame)?;
    let frag = be16(frame, ETH_HLEN + 6);
    let fits = f.tot_len >= f.ihl_bytes && ETH_HLEN + f.tot_len <= frame.len();
    let to_service = services
        .frontends
        .keys()
        .any(|(frontend, _)| *frontend.ip() == f.dst);
    (frag & 0x1fff != 0 && matches!(f.proto, 6 | 17) && fits && to_service).then_some(f)
}

/// A later fragment translated: only its addresses (to a backend of a
/// service on its destination IP, or back from one) and the IPv4 header
/// checksum changed.
fn check_later_fragment_rewrite(services: &Services, input: &[u8], output: &[u8], what: &str) {
    let f = later_fragment_to_a_service(services, input)
        .unwrap_or_else(|| panic!("{what}: a malformed packet was rewritten"));
    let out = ipv4_fields(output).expect("an IPv4 frame");
    let backend_ips: Vec<_> = services
        .frontends
        .iter()
        .filter(|((frontend, proto), _)| *frontend.ip() == f.dst && *proto == f.proto)
        .flat_map(|(_, backends)| backends.iter().map(|b| *b.ip()))
        .collect();
    assert!(
        backend_ips.contains(&out.dst) || out.src == f.dst,
        "{what}: later fragment {} -> {} became {} -> {}",
        f.src,
        f.dst,
        out.src,
        out.dst
    );
    let mut expected = input.to_vec();
    expected[26..34].copy_from_slice(&output[26..34]);
    expected[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&output[ETH_HLEN + 10..ETH_HLEN + 12]);
    assert_eq!(
        hex(output),
        hex(&expected),
        "{what}: a later fragment's payload changed"
    );
    if ip_checksum_ok(input) {
        assert!(
            ip_checksum_ok(output),
            "{what}: valid IPv4 checksum became invalid"
        );
    }
}

/// Checks a translated (OK, changed) packet against the oracle.
fn check_rewrite(services: &Services, input: &[u8], output: &[u8], what: &str) {
    let f =
        well_formed(input).unwrap_or_else(|| panic!("{what}: a malformed packet was rewritten"));
    let (in_src, in_dst) = endpoints(input);
    let (out_src, out_dst) = endpoints(output);
    let dnat = services
        .backends(in_dst, f.proto)
        .is_some_and(|b| b.contains(&out_dst));
    let plain = dnat && out_src == in_src;
    let hairpin = dnat
        && out_dst.ip() == in_src.ip()
        && out_src == SocketAddrV4::new(*in_dst.ip(), in_src.port());
    // A hairpinned pod answering its client, which is itself behind the service IP.
    let hairpin_reply = out_src.ip() == in_dst.ip()
        && services
            .backends(out_src, f.proto)
            .is_some_and(|b| b.contains(&in_src))
        && out_dst == SocketAddrV4::new(*in_src.ip(), in_dst.port());
    assert!(
        plain || hairpin || hairpin_reply,
        "{what}: {in_src} -> {in_dst} (proto {}) became {out_src} -> {out_dst}: not a translation the services allow",
        f.proto
    );
    // Apart from those fields and the checksums, nothing changed.
    let mut expected = input.to_vec();
    expected[26..34].copy_from_slice(&output[26..34]);
    expected[f.l4()..f.l4() + 4].copy_from_slice(&output[f.l4()..f.l4() + 4]);
    for off in [ETH_HLEN + 10, f.l4_csum()] {
        expected[off..off + 2].copy_from_slice(&output[off..off + 2]);
    }
    assert_eq!(
        hex(output),
        hex(&expected),
        "{what}: bytes other than addresses, ports and checksums changed"
    );
    if ip_checksum_ok(input) {
        assert!(
            ip_checksum_ok(output),
            "{what}: valid IPv4 checksum became invalid: {}",
            hex(output)
        );
    }
    if l4_checksum_ok(input) {
        assert!(
            l4_checksum_ok(output),
            "{what}: valid L4 checksum became invalid: {}",
            hex(output)
        );
    }
    if f.proto == IPPROTO_UDP {
        let (before, after) = (be16(input, f.l4_csum()), be16(output, f.l4_csum()));
        assert_eq!(
            before == 0,
            after == 0,
            "{what}: UDP checksum {before:#06x} became {after:#06x}"
        );
    }
}

/// Checks a reject (REDIRECT) against the oracle.
fn check_reject(services: &Services, input: &[u8], output: &[u8], what: &str) {
    let f = well_formed(input).unwrap_or_else(|| panic!("{what}: a malformed packet was answered"));
    let (in_src, in_dst) = endpoints(input);
    assert!(
        services
            .backends(in_dst, f.proto)
            .is_some_and(|b| b.is_empty()),
        "{what}: {in_src} -> {in_dst} rejected but the service has endpoints"
    );
    assert_eq!(
        (&output[0..6], &output[6..12]),
        (&input[6..12], &input[0..6]),
        "{what}: MACs swapped"
    );
    let out = ipv4_fields(output).unwrap_or_else(|| panic!("{what}: reject is not IPv4"));
    assert_eq!(
        (out.src, out.dst),
        (*in_dst.ip(), *in_src.ip()),
        "{what}: reject addresses"
    );
    assert_checksums_ok(output, what);
    if f.proto == IPPROTO_TCP {
        assert_eq!(output.len(), 54, "{what}: RST length");
        assert_eq!(endpoints(output), (in_dst, in_src), "{what}: RST ports");
        assert_ne!(output[out.l4() + 13] & RST, 0, "{what}: RST flag");
    } else {
        assert_eq!((output.len(), out.proto), (70, 1), "{what}: ICMP error");
        assert_eq!(
            output[out.l4()..out.l4() + 2],
            [3, 3],
            "{what}: port unreachable"
        );
        assert_eq!(
            output[out.l4() + 8..],
            input[ETH_HLEN..ETH_HLEN + 28],
            "{what}: quote"
        );
    }
}

/// Where a generated packet goes.
#[derive(Debug, Clone, Copy)]
enum To {
    /// The TCP service with three backends.
    Service,
    /// The UDP service with two backends.
    DnsService,
    /// The TCP or UDP service without endpoints.
    NoEndpoints { tcp: bool },
    /// The service whose one backend is the client itself.
    Hairpin,
    /// That backend answering its client through the service IP.
    HairpinReply,
    /// A port of the service IP that no service has.
    OtherPort { tcp: bool },
    /// A backend directly, no service.
    Backend { tcp: bool },
}

#[derive(Debug, Clone, Copy)]
enum IpOptions {
    None,
    RouterAlert,
    EightBytes,
}

/// How a well-formed packet is damaged before the run.
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Cut to a length below the packet's.
    Truncate(Index),
    /// Bits flipped in the headers: (byte, bit).
    Flip(Vec<(Index, u8)>),
}

/// One generated packet, described so that a failure shrinks to a readable
/// case.
#[derive(Debug, Clone)]
struct PacketCase {
    to: To,
    /// Client 10.244.1.(10 + host):(40000 + port).
    client_host: u8,
    client_port: u16,
    tcp_flags: u8,
    seq: u32,
    ack: u32,
    udp_checksum: bool,
    payload: Vec<u8>,
    ip_options: IpOptions,
    /// Bytes after the datagram, inside the frame.
    trailer: Vec<u8>,
    damage: Damage,
}

impl PacketCase {
    fn frame(&self) -> Vec<u8> {
        let client = addr(
            [10, 244, 1, 10 + self.client_host],
            40_000 + self.client_port,
        );
        let (src, dst, tcp) = match self.to {
            To::Service => (client, service(), true),
            To::DnsService => (client, dns_service(), false),
            To::NoEndpoints { tcp } => (
                client,
                addr([10, 96, 0, 11], if tcp { 80 } else { 53 }),
                tcp,
            ),
            To::Hairpin => (client, addr([10, 96, 0, 12], 80), true),
            To::HairpinReply => (
                addr([10, 244, 1, 10], 8080),
                addr([10, 96, 0, 12], 40_000 + self.client_port),
                true,
            ),
            To::OtherPort { tcp } => (client, addr([10, 96, 0, 10], 443), tcp),
            To::Backend { tcp } => (client, backend(), tcp),
        };
        let options: &[u8] = match self.ip_options {
            IpOptions::None => &[],
            IpOptions::RouterAlert => &IP_OPT_ROUTER_ALERT,
            IpOptions::EightBytes => &IP_OPT_8_BYTES,
        };
        let mut frame = if tcp {
            Tcp::new(src, dst, self.tcp_flags)
                .seq(self.seq)
                .ack(self.ack)
                .payload(&self.payload)
                .ip_options(options)
                .build()
        } else {
            let udp = Udp::new(src, dst)
                .payload(&self.payload)
                .ip_options(options);
            if self.udp_checksum {
                udp
            } else {
                udp.no_checksum()
            }
            .build()
        };
        frame.extend_from_slice(&self.trailer);
        match &self.damage {
            Damage::None => {}
            Damage::Truncate(cut) => frame.truncate(cut.index(frame.len())),
            Damage::Flip(flips) => {
                let header_end = frame
                    .len()
                    .min(ETH_HLEN + usize::from(frame[ETH_HLEN] & 0x0f) * 4 + 20);
                for (at, bit) in flips {
                    frame[at.index(header_end)] ^= 1 << bit;
                }
            }
        }
        frame
    }
}

/// Packets to every kind of destination, a quarter of them cut short and
/// half with bits flipped in their headers.
fn packet_cases() -> impl Strategy<Value = PacketCase> {
    let to = prop_oneof![
        2 => Just(To::Service),
        1 => Just(To::DnsService),
        1 => Just(To::NoEndpoints { tcp: true }),
        1 => Just(To::NoEndpoints { tcp: false }),
        1 => Just(To::Hairpin),
        1 => Just(To::HairpinReply),
        1 => any::<bool>().prop_map(|tcp| To::OtherPort { tcp }),
        1 => any::<bool>().prop_map(|tcp| To::Backend { tcp }),
    ];
    let flags = select(vec![
        SYN,
        SYN,
        ACK,
        PSH | ACK,
        FIN | ACK,
        RST,
        RST | ACK,
        SYN | ACK,
        0,
    ]);
    let payload = select(vec![0usize, 0, 1, 7, 32]).prop_flat_map(|n| vec(any::<u8>(), n));
    let ip_options = prop_oneof![
        8 => Just(IpOptions::None),
        1 => Just(IpOptions::RouterAlert),
        1 => Just(IpOptions::EightBytes),
    ];
    let trailer = prop_oneof![9 => Just(vec![]), 1 => vec(any::<u8>(), 1..=16)];
    let damage = prop_oneof![
        1 => Just(Damage::None),
        1 => any::<Index>().prop_map(Damage::Truncate),
        2 => vec((any::<Index>(), 0u8..8), 1..=3).prop_map(Damage::Flip),
    ];
    (
        (to, 0u8..3, 0u16..8, flags, any::<u32>(), any::<u32>()),
        (weighted(0.85), payload, ip_options, trailer, damage),
    )
        .prop_map(
            |(
                (to, client_host, client_port, tcp_flags, seq, ack),
                (udp_checksum, payload, ip_options, trailer, damage),
            )| PacketCase {
                to,
                client_host,
                client_port,
                tcp_flags,
                seq,
                ack,
                udp_checksum,
                payload,
                ip_options,
                trailer,
                damage,
            },
        )
}

/// How the datapath treated one packet (for the coverage check).
#[derive(Default)]
struct Outcomes {
    untouched: usize,
    rewritten: usize,
    rejected: usize,
    dropped: usize,
}

#[test]
fn random_and_corrupted_packets_never_get_a_wrong_rewrite() {
    let three = vec![
        addr([10, 244, 2, 10], 8080),
        addr([10, 244, 2, 11], 8080),
        addr([10, 244, 2, 12], 8080),
    ];
    let two = vec![addr([10, 244, 3, 10], 5353), addr([10, 244, 3, 11], 5353)];
    let services = Services {
        frontends: HashMap::from([
            ((service(), IPPROTO_TCP), three),
            ((dns_service(), IPPROTO_UDP), two),
            ((addr([10, 96, 0, 11], 80), IPPROTO_TCP), vec![]),
            ((addr([10, 96, 0, 11], 53), IPPROTO_UDP), vec![]),
            (
                (addr([10, 96, 0, 12], 80), IPPROTO_TCP),
                vec![addr([10, 244, 1, 10], 8080)],
            ),
        ]),
    };
    let mut dp = Harness::new();
    for (n, ((frontend, proto), backends)) in services.frontends.iter().enumerate() {
        let proto = if *proto == IPPROTO_TCP {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        dp.set_service(&format!("svc-{n}"), *frontend, proto, backends);
    }
    // Deterministic: the same cases on every run; a failure is shrunk to a
    // small case and shown with its bytes.
    let config = Config {
        cases: 4000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let outcomes = RefCell::new(Outcomes::default());
    let result = runner.run(&packet_cases(), |case| {
        let input = case.frame();
        let what = format!("{case:?} ({})", hex(&input));
        let run = match dp.try_run("from_pod", &input) {
            Ok(run) => run,
            Err(_) if kernel_refuses(&input) => return Ok(()),
            Err(e) => panic!("{what}: test run failed: {e}"),
        };
        let mut seen = outcomes.borrow_mut();
        match run.verdict {
            TC_ACT_OK if run.output == input => seen.untouched += 1,
            TC_ACT_OK if later_fragment_to_a_service(&services, &input).is_some() => {
                check_later_fragment_rewrite(&services, &input, &run.output, &what);
                seen.rewritten += 1;
            }
            TC_ACT_OK => {
                check_rewrite(&services, &input, &run.output, &what);
                seen.rewritten += 1;
            }
            // A later fragment of a datagram whose start was not seen.
            TC_ACT_SHOT if later_fragment_to_a_service(&services, &input).is_some() => {
                seen.dropped += 1;
            }
            TC_ACT_REDIRECT => {
                check_reject(&services, &input, &run.output, &what);
                seen.rejected += 1;
            }
            TC_ACT_SHOT => {
                // The drops by design, both to a service without endpoints: a
                // UDP datagram with IP options (too long to quote in an ICMP
                // error) and a TCP RST (a RST is never answered with a RST).
                let f = well_formed(&input).unwrap_or_else(|| panic!("{what}: dropped"));
                let (_, dst) = endpoints(&input);
                let no_endpoints = services
                    .backends(dst, f.proto)
                    .is_some_and(|b| b.is_empty());
                let udp_with_options = f.proto == IPPROTO_UDP && f.ihl_bytes > 20;
                let tcp_rst = f.proto == 6 && input[f.l4() + 13] & 0x04 != 0;
                assert!(
                    (udp_with_options || tcp_rst) && no_endpoints,
                    "{what}: dropped, and it is neither UDP with IP options nor a TCP RST to a service without endpoints"
                );
                seen.dropped += 1;
            }
            other => panic!("{what}: unexpected verdict {other}"),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let Outcomes {
        untouched,
        rewritten,
        rejected,
        dropped,
    } = outcomes.into_inner();
    eprintln!(
        "untouched {untouched}, rewritten {rewritten}, rejected {rejected}, dropped {dropped}"
    );
    assert!(
        rewritten > 500 && rejected > 100 && untouched > 500,
        "the generator must exercise every outcome"
    );
    assert!(
        dp.counter(Counter::Malformed) > 100,
        "corrupted packets to service IPs are counted"
    );
}
