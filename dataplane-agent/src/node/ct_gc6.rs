//! The sweep of the IPv6 conntrack maps (`CT6_TCP`, `CT6_OTHER`): the same
//! rule as [`crate::node::ct_gc`], on the IPv6 entries.

use dataplane_common::{ct_dir, Ct6Entry, Ct6Key, CtLifetimes, IPPROTO_TCP};

use crate::node::{
    ct_gc::{delete_still_dead, expired_keys, FlowEntry, FlowTable, Sweep},
    pinned::{monotonic_now_ns, Conntrack6Maps},
};

impl FlowEntry for Ct6Entry {
    type Key = Ct6Key;

    fn is_original(key: &Ct6Key) -> bool {
        key.direction == ct_dir::ORIGINAL
    }

    fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        Ct6Entry::is_expired(self, now_ns, lifetimes)
    }

    fn original_key(&self) -> Ct6Key {
        Ct6Entry::original_key(self)
    }

    fn reply_of(&self, _original: &Self) -> bool {
        true
    }
}

impl FlowTable<Ct6Entry> for Conntrack6Maps {
    fn lookup(&self, key: &Ct6Key) -> Option<Ct6Entry> {
        self.map(key.proto).get(key, 0).ok()
    }

    fn delete(&mut self, key: &Ct6Key) -> bool {
        self.map_mut(key.proto).remove(key).is_ok()
    }
}

/// Removes what is dead among `entries` (a walk of `table`); what the
/// sweep removed and left, by map.
fn sweep_entries(
    table: &mut impl FlowTable<Ct6Entry>,
    entries: &[(Ct6Key, Ct6Entry)],
    now_ns: u64,
    lifetimes: &CtLifetimes,
) -> Sweep {
    let candidates = expired_keys(entries, now_ns, lifetimes);
    let removed = |tcp: bool, table: &mut _| {
        let of_map: Vec<Ct6Key> = candidates
            .iter()
            .filter(|k| (k.proto == IPPROTO_TCP) == tcp)
            .copied()
            .collect();
        delete_still_dead(table, &of_map, now_ns, lifetimes)
    };
    let removed_tcp = removed(true, table);
    let removed_other = removed(false, table);
    let tcp = entries
        .iter()
        .filter(|(k, _)| k.proto == IPPROTO_TCP)
        .count();
    Sweep {
        removed: removed_tcp + removed_other,
        remaining_tcp: tcp - removed_tcp,
        remaining_other: entries.len() - tcp - removed_other,
    }
}

/// One sweep of both IPv6 conntrack maps, as [`crate::node::ct_gc::sweep`]
/// sweeps the IPv4 ones.
pub fn sweep6(maps: &mut Conntrack6Maps, lifetimes: &CtLifetimes) -> Sweep {
    let entries: Vec<(Ct6Key, Ct6Entry)> = maps.iter().filter_map(Result::ok).collect();
    sweep_entries(maps, &entries, monotonic_now_ns(), lifetimes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use dataplane_common::{ct_state, IPPROTO_UDP};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn addr(last: u8) -> [u8; 16] {
        let mut a = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[15] = last;
        a
    }

    /// Both entries of one IPv6 flow, client port `port`.
    fn flow6(proto: u8, state: u8, last_seen_s: u64, port: u16) -> [(Ct6Key, Ct6Entry); 2] {
        let e = Ct6Entry {
            client_addr: addr(1),
            service_addr: addr(2),
            backend_addr: addr(3),
            client_port: port,
            service_port: 80,
            backend_port: 8080,
            proto,
            state,
            last_seen_ns: last_seen_s * SEC,
            ..Default::default()
        };
        [(e.original_key(), e), (e.reply_key(), e)]
    }

    #[test]
    fn expired_ipv6_flows_are_swept_with_their_reply_entries_and_live_ones_kept() {
        let lifetimes = CtLifetimes::default();
        let udp_dead = flow6(IPPROTO_UDP, ct_state::ESTABLISHED, 0, 1000);
        let tcp_live = flow6(IPPROTO_TCP, ct_state::ESTABLISHED, 0, 1001);
        let tcp_closed = flow6(IPPROTO_TCP, ct_state::CLOSING, 0, 1002);
        let [_, orphan] = flow6(IPPROTO_UDP, ct_state::ESTABLISHED, 3600, 1003);
        let entries: Vec<(Ct6Key, Ct6Entry)> = udp_dead
            .into_iter()
            .chain(tcp_live)
            .chain(tcp_closed)
            .chain([orphan])
            .collect();
        let mut table: HashMap<Ct6Key, Ct6Entry> = entries.iter().copied().collect();
        let now = 3600 * SEC;
        let sweep = sweep_entries(&mut table, &entries, now, &lifetimes);
        assert_eq!(
            sweep,
            Sweep {
                removed: 5,
                remaining_tcp: 2,
                remaining_other: 0,
            }
        );
        let mut left: Vec<Ct6Key> = table.into_keys().collect();
        left.sort_by_key(|k| k.direction);
        assert_eq!(left, [tcp_live[0].0, tcp_live[1].0]);
    }

    #[test]
    fn ipv6_flow_refreshed_after_the_walk_survives() {
        let lifetimes = CtLifetimes::default();
        let entries = flow6(IPPROTO_UDP, ct_state::ESTABLISHED, 0, 1000);
        let mut table: HashMap<Ct6Key, Ct6Entry> = entries.into_iter().collect();
        let now = 3600 * SEC;
        table.get_mut(&entries[0].0).unwrap().last_seen_ns = now;
        let sweep = sweep_entries(&mut table, &entries, now, &lifetimes);
        assert_eq!(sweep.removed, 0);
        assert_eq!(table.len(), 2);
    }
}
