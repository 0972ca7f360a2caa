//! Per-service policies in the datapath under BPF_PROG_TEST_RUN: ClientIP
//! session affinity and `internalTrafficPolicy: Local` without a local
//! endpoint. Maps are filled through the agent's sync engine, as in
//! `datapath.rs`.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::{collections::BTreeSet, net::SocketAddrV4};

use aya::maps::MapData;
use dataplane_agent::control::model::Protocol;
use dataplane_common::{ipv4_to_map, AffinityEntry, AffinityKey, Counter};
use dataplane_testkit::datapath::{addr, Harness, TC_ACT_OK, TC_ACT_SHOT};
use dataplane_testkit::packets::{assert_translated, endpoints, Tcp, SYN};

fn service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 80)
}

fn backends() -> [SocketAddrV4; 4] {
    [
        addr([10, 244, 2, 10], 8080),
        addr([10, 244, 2, 11], 8080),
        addr([10, 244, 2, 12], 8080),
        addr([10, 244, 2, 13], 8080),
    ]
}

/// Sends a SYN from `client` to the service; the backend it was sent to.
fn connect(dp: &Harness, client: SocketAddrV4) -> SocketAddrV4 {
    let syn = Tcp::new(client, service(), SYN).build();
    let run = dp.run_from_pod(&syn);
    assert_eq!(run.verdict, TC_ACT_OK, "SYN from {client}: verdict");
    let (_, backend) = endpoints(&run.output);
    assert_translated(&syn, &run.output, client, backend, "SYN");
    backend
}

fn with_affinity(dp: &mut Harness, backends: &[SocketAddrV4], timeout_s: u32) {
    dp.set_service_with("web", service(), Protocol::Tcp, backends, |spec| {
        spec.affinity_timeout_s = Some(timeout_s);
    });
}

/// The affinity entries, as (client octets, entry).
fn affinity_entries(
    map: &aya::maps::HashMap<MapData, AffinityKey, AffinityEntry>,
) -> Vec<([u8; 4], AffinityEntry)> {
    map.iter()
        .map(|r| r.expect("reading AFFINITY"))
        .map(|(k, v)| (k.client_addr.to_ne_bytes(), v))
        .collect()
}

#[test]
fn client_ip_affinity_sends_every_new_connection_of_a_client_to_one_backend() {
    let mut dp = Harness::new();
    with_affinity(&mut dp, &backends(), 10_800);

    let mut per_client = Vec::new();
    for client_host in 10..14u8 {
        let picked: BTreeSet<SocketAddrV4> = (0..12u16)
            .map(|i| connect(&dp, addr([10, 244, 1, client_host], 40_000 + i)))
            .collect();
        assert_eq!(
            picked.len(),
            1,
            "client 10.244.1.{client_host}: 12 connections went to {picked:?}, not one backend"
        );
        per_client.push(*picked.first().expect("one backend"));
    }
    // 4 clients x 12 connections: the first of each balanced, the rest sticky.
    assert_eq!(dp.counter(Counter::NewFlow), 48);
    assert_eq!(dp.counter(Counter::AffinityHit), 44);

    let entries = affinity_entries(&dp.affinity());
    assert_eq!(entries.len(), 4, "one affinity entry per client");
    for (client, entry) in entries {
        let backend = backends()[entry.slot as usize];
        assert_eq!(
            per_client[usize::from(client[3] - 10)],
            backend,
            "the entry of {client:?} names the backend its connections reached"
        );
    }
}

#[test]
fn without_affinity_one_client_is_spread_over_the_backends() {
    // The control for the test above: the same traffic without affinity.
    let mut dp = Harness::new();
    dp.set_service("web", service(), Protocol::Tcp, &backends());
    let picked: BTreeSet<SocketAddrV4> = (0..40u16)
        .map(|i| connect(&dp, addr([10, 244, 1, 10], 40_000 + i)))
        .collect();
    assert!(picked.len() > 1, "40 connections all went to {picked:?}");
    assert_eq!(dp.counter(Counter::AffinityHit), 0);
    assert_eq!(affinity_entries(&dp.affinity()).len(), 0);
}

#[test]
fn expired_affinity_is_balanced_anew() {
    let mut dp = Harness::new();
    with_affinity(&mut dp, &backends(), 60);
    let client = addr([10, 244, 1, 10], 40_000);
    connect(&dp, client);

    // Age the entry past the timeout, as 61 s without a new connection would.
    let mut map = dp.affinity();
    let key = AffinityKey {
        service_id: map
            .keys()
            .next()
            .expect("one entry")
            .expect("key")
            .service_id,
        client_addr: ipv4_to_map([10, 244, 1, 10]),
        client_netns: 0,
    };
    let mut entry = map.get(&key, 0).expect("the client's entry");
    entry.last_used_ns = entry.last_used_ns.saturating_sub(61_000_000_000);
    let aged = entry.last_used_ns;
    map.insert(key, entry, 0).expect("ageing the entry");

    connect(&dp, addr([10, 244, 1, 10], 40_001));
    assert_eq!(
        dp.counter(Counter::AffinityHit),
        0,
        "an expired affinity is not followed"
    );
    let renewed = map.get(&key, 0).expect("a fresh entry");
    assert!(renewed.last_used_ns > aged, "the entry is renewed");
}

#[test]
fn affinity_to_a_removed_backend_is_not_followed() {
    let mut dp = Harness::new();
    let all = backends();
    with_affinity(&mut dp, &all, 10_800);
    let client = addr([10, 244, 1, 10], 40_000);
    let first = connect(&dp, client);

    let remaining: Vec<SocketAddrV4> = all.iter().copied().filter(|b| *b != first).collect();
    with_affinity(&mut dp, &remaining, 10_800);
    for i in 1..10u16 {
        let next = connect(&dp, addr([10, 244, 1, 10], 40_000 + i));
        assert_ne!(next, first, "connection {i} went to the removed backend");
    }
    // After the first rebalanced connection the client sticks again.
    assert_eq!(dp.counter(Counter::AffinityHit), 8);
}

#[test]
fn local_policy_without_local_endpoint_drops_new_connections_silently() {
    let mut dp = Harness::new();
    dp.set_service_with("web", service(), Protocol::Tcp, &[], |spec| {
        spec.drop_without_local_endpoints = true;
    });
    let syn = Tcp::new(addr([10, 244, 1, 10], 40_000), service(), SYN).build();

    let run = dp.run_from_pod(&syn);

    assert_eq!(run.verdict, TC_ACT_SHOT, "dropped, as kube-proxy drops it");
    assert_eq!(dp.counter(Counter::DropNoLocalEndpoints), 1);
    assert_eq!(dp.counter(Counter::RejectNoEndpoints), 0, "no reset sent");
    assert_eq!(dp.ct_len(), 0);
}
