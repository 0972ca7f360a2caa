//! The conntrack sweep against the datapath's own map: a flow the datapath
//! refreshes between the sweep's walk and its deletes keeps both entries.
//!
//! Needs root and a kernel with BPF (each test mounts its own bpffs).

use std::net::SocketAddrV4;

use dataplane_agent::{
    control::model::Protocol,
    node::{
        ct_gc::{delete_still_dead, expired_keys, sweep},
        pinned::monotonic_now_ns,
    },
};
use dataplane_common::{ct_dir, CtEntry, CtKey, CtLifetimes};
use dataplane_testkit::datapath::{addr, ct_key, Harness, TC_ACT_OK};
use dataplane_testkit::packets::Udp;

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 5353)
}

/// A DNS service with one backend and one query through it.
fn udp_flow() -> (Harness, Vec<u8>) {
    let mut dp = Harness::new();
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    let query = Udp::new(client(), dns_service()).payload(b"q").build();
    assert_eq!(dp.run_from_pod(&query).verdict, TC_ACT_OK);
    assert_eq!(dp.ct_len(), 2, "the query opened a flow");
    (dp, query)
}

/// Ages both entries of every flow past any lifetime (last seen at boot).
fn age_all(dp: &mut Harness) {
    let entries: Vec<(CtKey, CtEntry)> = dp.conntrack.iter().map(Result::unwrap).collect();
    for (key, mut entry) in entries {
        entry.last_seen_ns = 0;
        dp.conntrack.insert(key, entry, 0).unwrap();
    }
}

#[test]
fn flow_refreshed_between_walk_and_delete_keeps_its_entries() {
    let (mut dp, query) = udp_flow();
    age_all(&mut dp);

    // The sweep's walk: both entries look dead.
    let walked: Vec<(CtKey, CtEntry)> = dp.conntrack.iter().map(Result::unwrap).collect();
    let now = monotonic_now_ns();
    let candidates = expired_keys(&walked, now, &CtLifetimes::default());
    assert_eq!(candidates.len(), 2);

    // Another query before the deletes.
    assert_eq!(dp.run_from_pod(&query).verdict, TC_ACT_OK);

    assert_eq!(
        delete_still_dead(&mut dp.conntrack, &candidates, now, &CtLifetimes::default()),
        0
    );
    let original = ct_key(client(), dns_service(), Protocol::Udp, ct_dir::ORIGINAL);
    assert!(dp.ct_get(&original).is_some());
    assert_eq!(dp.ct_len(), 2);
}

#[test]
fn sweep_removes_a_flow_nobody_refreshed() {
    let (mut dp, _) = udp_flow();
    age_all(&mut dp);
    let swept = sweep(&mut dp.conntrack, &CtLifetimes::default());
    assert_eq!((swept.removed, swept.remaining()), (2, 0));
    assert_eq!(dp.ct_len(), 0);
}
