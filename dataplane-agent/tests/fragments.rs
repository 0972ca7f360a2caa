//! IPv4 fragments under BPF_PROG_TEST_RUN: every fragment of a datagram to
//! a service goes where the first went (its ports come from `FRAGMENTS`),
//! replies come back fragment by fragment from the service, and a later
//! fragment nobody saw the start of is dropped and counted. Fragments are
//! cut by the test from whole datagrams and checked byte by byte.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::SocketAddrV4;

use dataplane_agent::control::model::Protocol;
use dataplane_common::Counter;
use dataplane_testkit::datapath::{addr, Harness, Run, TC_ACT_OK, TC_ACT_SHOT};
use dataplane_testkit::packets::{assert_checksums_ok, endpoints, hex, ones_sum, Udp, ETH_HLEN};

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 5353)
}

const IP_HLEN: usize = 20;
/// Data bytes per fragment, as a 1500-byte MTU gives (a multiple of 8).
const CHUNK: usize = 1480;

fn set_ip_checksum(frame: &mut [u8]) {
    let ip = ETH_HLEN..ETH_HLEN + IP_HLEN;
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let sum = !ones_sum(&frame[ip]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// `frame`'s datagram as the IP layer fragments it, identification `id`.
fn fragment(frame: &[u8], id: u16) -> Vec<Vec<u8>> {
    let data = &frame[ETH_HLEN + IP_HLEN..];
    data.chunks(CHUNK)
        .enumerate()
        .map(|(i, part)| {
            let offset = i * CHUNK;
            let more = offset + part.len() < data.len();
            let mut f = frame[..ETH_HLEN + IP_HLEN].to_vec();
            f[ETH_HLEN + 2..ETH_HLEN + 4]
                .copy_from_slice(&((IP_HLEN + part.len()) as u16).to_be_bytes());
            f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&id.to_be_bytes());
            let field = if more { 0x2000 } else { 0 } | (offset / 8) as u16;
            f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&field.to_be_bytes());
            f.extend_from_slice(part);
            set_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// The datagram the fragments make, as the receiver reassembles it.
fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut whole = fragments[0][..ETH_HLEN + IP_HLEN].to_vec();
    for f in fragments {
        whole.extend_from_slice(&f[ETH_HLEN + IP_HLEN..]);
    }
    let tot = (whole.len() - ETH_HLEN) as u16;
    whole[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
    whole[ETH_HLEN + 6..ETH_HLEN + 8].fill(0);
    set_ip_checksum(&mut whole);
    whole
}

/// A later fragment translated to `src -> dst`: only the addresses and the
/// IPv4 header checksum differ from what went in.
fn assert_later_fragment_translated(input: &[u8], run: &Run, src: SocketAddrV4, dst: SocketAddrV4) {
    assert_eq!(run.verdict, TC_ACT_OK);
    let mut expected = input.to_vec();
    expected[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&src.ip().octets());
    expected[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&dst.ip().octets());
    set_ip_checksum(&mut expected);
    assert_eq!(hex(&run.output), hex(&expected), "later fragment");
}

fn dns_harness() -> Harness {
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    dp
}

fn big_query() -> Vec<u8> {
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 + 3) as u8).collect();
    Udp::new(client(), dns_service()).payload(&payload).build()
}

#[test]
fn every_fragment_of_a_datagram_to_a_service_goes_to_the_backend_of_the_first() {
    let dp = dns_harness();
    let fragments = fragment(&big_query(), 0x1234);
    assert_eq!(fragments.len(), 3);

    let runs: Vec<Run> = fragments.iter().map(|f| dp.run_from_pod(f)).collect();

    assert_eq!(runs[0].verdict, TC_ACT_OK);
    assert_eq!(endpoints(&runs[0].output), (client(), dns_backend()));
    for (input, run) in fragments.iter().zip(&runs).skip(1) {
        let backend = SocketAddrV4::new(*dns_backend().ip(), 0);
        assert_later_fragment_translated(input, run, SocketAddrV4::new(*client().ip(), 0), backend);
    }
    let outputs: Vec<Vec<u8>> = runs.into_iter().map(|r| r.output).collect();
    let whole = reassemble(&outputs);
    assert_eq!(endpoints(&whole), (client(), dns_backend()));
    assert_checksums_ok(
        &whole,
        "the reassembled datagram (UDP checksum over all fragments)",
    );
    assert_eq!(
        &whole[ETH_HLEN + IP_HLEN + 8..],
        &big_query()[ETH_HLEN + IP_HLEN + 8..]
    );
    assert_eq!(dp.counter(Counter::NewFlow), 1);
    assert_eq!(dp.counter(Counter::FragmentTranslated), 2);
    assert_eq!(dp.counter(Counter::Malformed), 0);
}

#[test]
fn fragments_of_a_reply_come_back_from_the_service() {
    let dp = dns_harness();
    for f in fragment(&big_query(), 0x1234) {
        assert_eq!(dp.run_from_pod(&f).verdict, TC_ACT_OK);
    }
    let payload: Vec<u8> = (0..3500u32).map(|i| (i * 13) as u8).collect();
    let reply = Udp::new(dns_backend(), client()).payload(&payload).build();
    let fragments = fragment(&reply, 0x0777);

    let runs: Vec<Run> = fragments.iter().map(|f| dp.run_to_pod(f)).collect();

    assert_eq!(endpoints(&runs[0].output), (dns_service(), client()));
    for (input, run) in fragments.iter().zip(&runs).skip(1) {
        let service = SocketAddrV4::new(*dns_service().ip(), 0);
        assert_later_fragment_translated(input, run, service, SocketAddrV4::new(*client().ip(), 0));
    }
    let outputs: Vec<Vec<u8>> = runs.into_iter().map(|r| r.output).collect();
    let whole = reassemble(&outputs);
    assert_eq!(endpoints(&whole), (dns_service(), client()));
    assert_checksums_ok(&whole, "the reassembled reply");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 1);
    assert_eq!(dp.counter(Counter::FragmentTranslated), 4);
}

#[test]
fn later_fragment_of_a_datagram_nobody_saw_start_is_dropped_and_counted() {
    let dp = dns_harness();
    let fragments = fragment(&big_query(), 0x4321);

    let run = dp.run_from_pod(&fragments[1]);

    assert_eq!(
        run.verdict, TC_ACT_SHOT,
        "not sent on towards the service IP"
    );
    assert_eq!(dp.counter(Counter::FragmentUnknown), 1);
    assert_eq!(dp.ct_len(), 0, "no flow from a fragment without a header");
}

#[test]
fn fragments_not_for_a_service_pass_byte_identical() {
    let dp = dns_harness();
    let other = addr([10, 244, 3, 3], 53);
    let datagram = Udp::new(client(), other).payload(&[9; 3000]).build();

    for f in fragment(&datagram, 0x55) {
        let run = dp.run_from_pod(&f);
        assert_eq!((run.verdict, hex(&run.output)), (TC_ACT_OK, hex(&f)));
    }
    assert_eq!(dp.counter(Counter::FragmentUnknown), 0);
}
