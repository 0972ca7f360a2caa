//! Conntrack under BPF_PROG_TEST_RUN: when a flow counts as established,
//! super-packets, lost reply entries and clashing reply tuples. Maps are
//! filled through the agent's sync engine, as in `datapath.rs`.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::SocketAddrV4;

use dataplane_agent::{
    control::model::Protocol,
    node::{
        datapath::{DatapathClock, DatapathConfig},
        pinned::monotonic_now_ns,
    },
};
use dataplane_common::{ct_dir, ct_flags, ct_state, Counter, CtEntry, CtLifetimes};
use dataplane_testkit::datapath::{self as harness, addr, ct_key, Harness, TC_ACT_OK};
use dataplane_testkit::packets::{
    self, assert_translated, hex, ones_sum, Tcp, Udp, ACK, ETH_HLEN, FIN, RST, SYN,
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

/// Key of the web flow's original entry.
fn original_key() -> dataplane_common::CtKey {
    ct_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL)
}

fn original(dp: &Harness) -> CtEntry {
    dp.ct_get(&original_key()).expect("the flow is tracked")
}

/// The web flow's original entry gone, as LRU eviction takes it.
fn evict_original(dp: &mut Harness) {
    dp.conntrack
        .remove(&original_key())
        .expect("evicting the original entry");
}

/// A web service with one backend and the client's SYN through it.
fn opened_flow() -> Harness {
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK, "SYN");
    dp
}

/// CLOCK_MONOTONIC_COARSE, what `bpf_ktime_get_coarse_ns` reads.
fn coarse_now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Either clock the agent can choose loads, and a new flow's two entries
/// carry that clock's now: read around the run on the same clock, so a
/// datapath on the other one (a jiffy ahead or behind) shows.
#[test]
fn new_flows_are_stamped_with_now_on_either_datapath_clock() {
    let has_coarse = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 11, 0));
    for coarse_clock in [false, true] {
        let config = DatapathConfig {
            coarse_clock,
            ..DatapathConfig::default()
        };
        let bpffs = harness::Bpffs::new().expect("a bpffs");
        let mut dp = Harness::load_on(bpffs, &config).unwrap_or_else(|e| panic!("{e:#}"));
        let (clock, now): (_, fn() -> u64) = if coarse_clock && has_coarse {
            (DatapathClock::Coarse, coarse_now_ns)
        } else {
            (DatapathClock::Precise, monotonic_now_ns)
        };
        assert_eq!(dp.datapath.clock(), clock, "coarse wanted: {coarse_clock}");
        dp.set_service("web", service(), Protocol::Tcp, &[backend()]);
        let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();

        let before = now();
        assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK, "SYN");
        let after = now();

        let reply = dp
            .ct_get(&ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY))
            .expect("the reply entry");
        for (what, entry) in [("original", original(&dp)), ("reply", reply)] {
            for (field, ns) in [
                ("created", entry.created_ns),
                ("last seen", entry.last_seen_ns),
            ] {
                assert!(
                    (before..=after).contains(&ns),
                    "{clock:?}: {what} entry {field} {ns} outside [{before}, {after}]"
                );
            }
        }
    }
}

fn syn_ack() -> Vec<u8> {
    Tcp::new(backend(), client(), SYN | ACK)
        .seq(90_000)
        .ack(7_001)
        .build()
}

#[test]
fn syn_ack_alone_keeps_a_flow_in_the_opening_timeout() {
    let dp = opened_flow();

    assert_eq!(dp.run_to_pod(&syn_ack()).verdict, TC_ACT_OK, "SYN-ACK");
    // A retransmitted SYN and another SYN-ACK: still no handshake.
    let syn = Tcp::new(client(), service(), SYN).seq(7_000).build();
    assert_eq!(dp.run_from_pod(&syn).verdict, TC_ACT_OK, "SYN again");
    assert_eq!(
        dp.run_to_pod(&syn_ack()).verdict,
        TC_ACT_OK,
        "SYN-ACK again"
    );

    let entry = original(&dp);
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0, "the reply was seen");
    assert_eq!(
        entry.state,
        ct_state::OPENING,
        "a half-open flow keeps the opening lifetime"
    );
    assert_eq!(
        entry.lifetime_ns(&CtLifetimes::default()),
        60 * 1_000_000_000,
        "opening lifetime, not 6 hours"
    );

    let ack = Tcp::new(client(), service(), ACK)
        .seq(7_001)
        .ack(90_001)
        .build();
    assert_eq!(dp.run_from_pod(&ack).verdict, TC_ACT_OK, "ACK");
    assert_eq!(
        original(&dp).state,
        ct_state::ESTABLISHED,
        "the client's ACK completes the handshake"
    );
}

#[test]
fn client_ack_before_any_reply_does_not_establish() {
    let dp = opened_flow();
    let ack = Tcp::new(client(), service(), ACK).seq(7_001).build();

    assert_eq!(dp.run_from_pod(&ack).verdict, TC_ACT_OK);

    assert_eq!(original(&dp).state, ct_state::OPENING);
}

#[test]
fn reset_from_the_backend_closes_an_established_flow_and_keeps_its_flags() {
    let dp = opened_flow();
    let ack = Tcp::new(client(), service(), ACK).seq(7_001).build();
    let fin = Tcp::new(client(), service(), FIN | ACK).seq(7_001).build();
    let rst = Tcp::new(backend(), client(), RST).seq(90_001).build();
    assert_eq!(dp.run_to_pod(&syn_ack()).verdict, TC_ACT_OK);
    assert_eq!(dp.run_from_pod(&ack).verdict, TC_ACT_OK);
    assert_eq!(dp.run_from_pod(&fin).verdict, TC_ACT_OK);

    let run = dp.run_to_pod(&rst);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&rst, &run.output, service(), client(), "translated RST");
    let entry = original(&dp);
    assert_eq!(entry.state, ct_state::CLOSING, "RST closes");
    assert_eq!(
        entry.flags & (ct_flags::SEEN_REPLY | ct_flags::FIN_ORIGINAL),
        ct_flags::SEEN_REPLY | ct_flags::FIN_ORIGINAL,
        "earlier flags kept"
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 2);
}

#[test]
fn big_tcp_super_packet_with_total_length_zero_is_translated() {
    let dp = opened_flow();
    let data = Tcp::new(client(), service(), ACK)
        .seq(7_001)
        .payload(&[0x5a; 2_000])
        .build();
    let plain = dp.run_from_pod(&data);
    assert_eq!(plain.verdict, TC_ACT_OK);
    assert_translated(&data, &plain.output, client(), backend(), "plain segment");
    // The same bytes as a BIG TCP super-packet: IPv4 total length 0.
    let mut big = data.clone();
    big[ETH_HLEN + 2..ETH_HLEN + 4].fill(0);
    fix_ip_checksum(&mut big);

    let run = dp.run_gso("from_pod", &big, 1_000, 2);

    assert_eq!(run.verdict, TC_ACT_OK);
    let mut expected = plain.output.clone();
    expected[ETH_HLEN + 2..ETH_HLEN + 4].fill(0);
    fix_ip_checksum(&mut expected);
    assert_eq!(
        hex(&run.output),
        hex(&expected),
        "translated as the same packet with its length filled in"
    );
    assert_eq!(dp.counter(Counter::Malformed), 0);
    assert_eq!(dp.counter(Counter::Established), 2);
}

#[test]
fn total_length_zero_without_gso_is_malformed() {
    let dp = opened_flow();
    let mut data = Tcp::new(client(), service(), ACK)
        .seq(7_001)
        .payload(b"GET /")
        .build();
    data[ETH_HLEN + 2..ETH_HLEN + 4].fill(0);
    fix_ip_checksum(&mut data);

    let run = dp.run_from_pod(&data);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(hex(&run.output), hex(&data), "left untouched");
    assert_eq!(dp.counter(Counter::Malformed), 1);
}

/// Recomputes the IPv4 header checksum after a test patched the header.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let csum = !ones_sum(&frame[ETH_HLEN..ETH_HLEN + ihl]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
}

fn reply_key() -> dataplane_common::CtKey {
    ct_key(backend(), client(), Protocol::Tcp, ct_dir::REPLY)
}

/// SYN, SYN-ACK and ACK through the web service: an established flow.
fn established_flow() -> Harness {
    let dp = opened_flow();
    let ack = Tcp::new(client(), service(), ACK)
        .seq(7_001)
        .ack(90_001)
        .build();
    assert_eq!(dp.run_to_pod(&syn_ack()).verdict, TC_ACT_OK, "SYN-ACK");
    assert_eq!(dp.run_from_pod(&ack).verdict, TC_ACT_OK, "ACK");
    assert_eq!(original(&dp).state, ct_state::ESTABLISHED);
    dp
}

/// The original entry as if the flow's last packet were `secs` seconds old.
fn age_tcp_flow(dp: &mut Harness, secs: u64) {
    let key = original_key();
    let mut entry = original(dp);
    entry.last_seen_ns = monotonic_now_ns() - secs * 1_000_000_000;
    dp.conntrack.insert(key, entry, 0).expect("aging the flow");
}

#[test]
fn lost_reply_entry_is_rebuilt_by_the_clients_next_packet_a_second_on() {
    // The datapath looks for the reply entry only when a packet refreshes
    // the flow (at most once a second) or moves its state, not on every
    // packet: a second is the most a busy flow's replies go untranslated.
    let mut dp = established_flow();
    let lost = dp.ct_get(&reply_key()).expect("the reply entry");
    dp.conntrack
        .remove(&reply_key())
        .expect("evicting the reply entry");
    age_tcp_flow(&mut dp, 2);
    let request = Tcp::new(client(), service(), ACK | packets::PSH)
        .seq(7_001)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();
    let response = Tcp::new(backend(), client(), ACK | packets::PSH)
        .seq(90_001)
        .payload(b"HTTP/1.1 200 OK\r\n\r\n")
        .build();

    let forwarded = dp.run_from_pod(&request);
    let reply = dp.run_to_pod(&response);

    assert_translated(&request, &forwarded.output, client(), backend(), "request");
    let rebuilt = dp.ct_get(&reply_key()).expect("the reply entry is back");
    assert_eq!(
        (rebuilt.original_key(), rebuilt.reply_key()),
        (lost.original_key(), lost.reply_key()),
        "the rebuilt entry translates as the lost one did"
    );
    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated(&response, &reply.output, service(), client(), "response");
    assert_eq!(dp.counter(Counter::ReplyTranslated), 2);
}

fn other_service() -> SocketAddrV4 {
    addr([10, 96, 0, 11], 80)
}

#[test]
fn second_flow_with_the_same_reply_tuple_is_refused_and_the_first_keeps_its_replies() {
    // Two services share the backend; the client uses one source port for
    // both: the backend would answer both flows with the same tuple.
    let mut dp = opened_flow();
    dp.set_service("api", other_service(), Protocol::Tcp, &[backend()]);
    let syn_other = Tcp::new(client(), other_service(), SYN).seq(3_000).build();

    let refused = dp.run_from_pod(&syn_other);

    assert_eq!(
        refused.verdict,
        harness::TC_ACT_SHOT,
        "the clashing SYN is dropped"
    );
    assert_eq!(dp.counter(Counter::ReplyTupleClash), 1);
    assert_eq!(dp.counter(Counter::NewFlow), 1, "only the first flow");
    assert!(
        dp.ct_get(&ct_key(
            client(),
            other_service(),
            Protocol::Tcp,
            ct_dir::ORIGINAL
        ))
        .is_none(),
        "the refused flow leaves no entry"
    );
    let reply = dp.run_to_pod(&syn_ack());
    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_translated(
        &syn_ack(),
        &reply.output,
        service(),
        client(),
        "the first flow's SYN-ACK still comes from its service",
    );
}

#[test]
fn reply_tuple_left_by_a_forgotten_flow_is_taken_over() {
    let mut dp = opened_flow();
    dp.set_service("api", other_service(), Protocol::Tcp, &[backend()]);
    // The first flow's original entry is evicted; its reply entry stays.
    evict_original(&mut dp);
    let syn_other = Tcp::new(client(), other_service(), SYN).seq(3_000).build();

    let run = dp.run_from_pod(&syn_other);

    assert_eq!(run.verdict, TC_ACT_OK);
    assert_translated(&syn_other, &run.output, client(), backend(), "SYN");
    assert_eq!(dp.counter(Counter::ReplyTupleClash), 0);
    let reply = dp.run_to_pod(&syn_ack());
    assert_translated(
        &syn_ack(),
        &reply.output,
        other_service(),
        client(),
        "replies now belong to the new flow",
    );
}

fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 5353)
}

/// A datapath loaded with `lifetimes` (as `--conntrack-udp-timeout` and
/// friends set them) and a DNS service with one backend.
fn dns_with_lifetimes(lifetimes: CtLifetimes) -> Harness {
    let config = DatapathConfig {
        ct_lifetimes: lifetimes,
        ..DatapathConfig::default()
    };
    let bpffs = harness::Bpffs::new().expect("a bpffs");
    let mut dp = Harness::load_on(bpffs, &config).unwrap_or_else(|e| panic!("{e:#}"));
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    dp
}

/// Makes the flow's last packet `secs` seconds old.
fn age_udp_flow(dp: &mut Harness, secs: u64) {
    let key = ct_key(client(), dns_service(), Protocol::Udp, ct_dir::ORIGINAL);
    let mut entry = dp.ct_get(&key).expect("the flow is tracked");
    entry.last_seen_ns = monotonic_now_ns() - secs * 1_000_000_000;
    dp.conntrack.insert(key, entry, 0).expect("aging the flow");
}

/// The datapath expires UDP flows by the configured lifetimes: 5 s for a
/// flow that has seen no reply, 100 s for one that has (a stream), instead
/// of one built-in figure.
#[test]
fn udp_flows_expire_by_the_configured_unreplied_and_stream_lifetimes() {
    let lifetimes = CtLifetimes {
        udp_s: 5,
        udp_stream_s: 100,
        ..CtLifetimes::default()
    };
    let query = Udp::new(client(), dns_service()).payload(b"q").build();
    let answer = Udp::new(dns_backend(), client()).payload(b"a").build();

    // Unreplied, 10 s idle: expired, the next query starts a new flow.
    let mut dp = dns_with_lifetimes(lifetimes);
    dp.run_from_pod(&query);
    age_udp_flow(&mut dp, 10);
    dp.run_from_pod(&query);
    assert_eq!(
        dp.counter(Counter::NewFlow),
        2,
        "expired after the 5 s lifetime"
    );

    // Replied, 50 s idle: still the same flow.
    let mut dp = dns_with_lifetimes(lifetimes);
    dp.run_from_pod(&query);
    dp.run_to_pod(&answer);
    age_udp_flow(&mut dp, 50);
    dp.run_from_pod(&query);
    assert_eq!(
        (
            dp.counter(Counter::NewFlow),
            dp.counter(Counter::Established)
        ),
        (1, 1),
        "a stream lives 100 s"
    );
    // 150 s idle: expired.
    age_udp_flow(&mut dp, 150);
    dp.run_from_pod(&query);
    assert_eq!(
        dp.counter(Counter::NewFlow),
        2,
        "expired after the stream lifetime"
    );
}

#[test]
fn last_seen_is_refreshed_at_most_once_a_second_but_flags_at_once() {
    let mut dp = opened_flow();
    let key = original_key();
    let fin = Tcp::new(client(), service(), FIN | ACK).seq(7_001).build();
    let now = dataplane_agent::node::pinned::monotonic_now_ns();

    // Refreshed half a second ago: the packet leaves the time alone (no
    // write to the line the reply direction reads) but still records its
    // FIN.
    let recent = now - 500_000_000;
    let mut entry = original(&dp);
    entry.last_seen_ns = recent;
    dp.conntrack
        .insert(key, entry, 0)
        .expect("ageing the entry");
    assert_eq!(dp.run_from_pod(&fin).verdict, TC_ACT_OK, "FIN");
    let after = original(&dp);
    assert_eq!(after.last_seen_ns, recent, "refreshed within the second");
    assert_ne!(after.flags & ct_flags::FIN_ORIGINAL, 0, "FIN recorded");

    // Two seconds ago: the next packet refreshes it.
    let mut entry = after;
    entry.last_seen_ns = now - 2_000_000_000;
    dp.conntrack
        .insert(key, entry, 0)
        .expect("ageing the entry");
    assert_eq!(dp.run_from_pod(&fin).verdict, TC_ACT_OK, "FIN again");
    // Up to a jiffy (10 ms at HZ=100) behind `now` on the coarse clock.
    let refreshed = original(&dp).last_seen_ns;
    assert!(
        refreshed + 50_000_000 >= now,
        "refreshed: {refreshed} against {now}"
    );
}

fn response() -> Vec<u8> {
    Tcp::new(backend(), client(), ACK | packets::PSH)
        .seq(90_001)
        .ack(7_001)
        .payload(b"HTTP/1.1 200 OK\r\n\r\n")
        .build()
}

/// The REPLY entry as if `ct4_reply_accept` stamped it `secs` seconds ago.
fn age_reply_entry(dp: &mut Harness, secs: u64) {
    let mut entry = dp.ct_get(&reply_key()).expect("the reply entry");
    entry.last_seen_ns = monotonic_now_ns() - secs * 1_000_000_000;
    dp.conntrack
        .insert(reply_key(), entry, 0)
        .expect("ageing the reply entry");
}

#[test]
fn replies_of_an_established_flow_are_translated_from_their_reply_entry_for_a_second() {
    // A reply looks up its flow's original entry (a second hash lookup)
    // only when its reply entry was not stamped within the last second by
    // a reply that found the flow established: a flow's original entry
    // evicted is noticed by its replies within a second, not at once.
    let mut dp = established_flow();
    let unstamped = dp.ct_get(&reply_key()).expect("the reply entry");
    assert_eq!(
        (unstamped.state, unstamped.flags & ct_flags::SEEN_REPLY),
        (ct_state::OPENING, 0),
        "a SYN-ACK of an opening flow does not stamp the reply entry"
    );

    let first = dp.run_to_pod(&response());
    assert_translated(&response(), &first.output, service(), client(), "first");
    let stamped = dp.ct_get(&reply_key()).expect("the reply entry");
    assert_eq!(
        (stamped.state, stamped.flags & ct_flags::SEEN_REPLY),
        (ct_state::ESTABLISHED, ct_flags::SEEN_REPLY),
        "stamped by a reply of the established flow"
    );
    assert!(
        stamped.last_seen_ns + 50_000_000 >= monotonic_now_ns(),
        "stamped now"
    );

    evict_original(&mut dp);
    let within = dp.run_to_pod(&response());
    assert_eq!(within.verdict, TC_ACT_OK);
    assert_translated(
        &response(),
        &within.output,
        service(),
        client(),
        "within the second, from the stamped reply entry",
    );

    age_reply_entry(&mut dp, 2);
    let after = dp.run_to_pod(&response());
    assert_eq!(after.verdict, TC_ACT_OK);
    assert_eq!(
        hex(&after.output),
        hex(&response()),
        "a second on, the lost flow is noticed: untranslated"
    );
    assert!(
        dp.ct_get(&reply_key()).is_none(),
        "and its stale reply entry deleted"
    );
    assert_eq!(dp.counter(Counter::ReplyTranslated), 3);
}

#[test]
fn backend_fin_and_reset_reach_the_flow_while_its_reply_entry_is_stamped() {
    let dp = established_flow();
    let run = dp.run_to_pod(&response());
    assert_translated(&response(), &run.output, service(), client(), "stamps");
    let fin = Tcp::new(backend(), client(), FIN | ACK)
        .seq(90_020)
        .ack(7_001)
        .build();

    let run = dp.run_to_pod(&fin);

    assert_translated(&fin, &run.output, service(), client(), "backend's FIN");
    let entry = original(&dp);
    assert_ne!(entry.flags & ct_flags::FIN_REPLY, 0, "FIN recorded");
    let client_fin = Tcp::new(client(), service(), FIN | ACK)
        .seq(7_001)
        .ack(90_021)
        .build();
    assert_eq!(dp.run_from_pod(&client_fin).verdict, TC_ACT_OK);
    assert_eq!(original(&dp).state, ct_state::CLOSING, "both FINs close");

    // A reset from a fresh, stamped reply entry closes too.
    let dp = established_flow();
    dp.run_to_pod(&response());
    let rst = Tcp::new(backend(), client(), RST).seq(90_020).build();
    let run = dp.run_to_pod(&rst);
    assert_translated(&rst, &run.output, service(), client(), "backend's RST");
    assert_eq!(original(&dp).state, ct_state::CLOSING, "RST closes");
}
