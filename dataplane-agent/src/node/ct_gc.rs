//! The conntrack garbage collector. The datapath ignores expired entries and the
//! LRU evicts under pressure; this sweep removes dead flows early so the
//! tables (and `inspect conntrack`/`inspect nat`) hold live flows only. The
//! same rule serves every two-entry flow table: conntrack of both families
//! (`CT_TCP`, `CT_OTHER`; `CT6_TCP`, `CT6_OTHER` in [`crate::node::ct_gc6`])
//! and the SNAT entries of external flows (`NAT`, `NAT6`).

use std::collections::HashMap;

use dataplane_common::{
    ct_dir, nat_dir, CtEntry, CtKey, CtLifetimes, Nat6Entry, Nat6Key, NatEntry, NatKey, IPPROTO_TCP,
};

use crate::node::pinned::{monotonic_now_ns, ConntrackMaps, Nat6Map, NatMap};

/// An entry of a table holding each flow twice, under its ORIGINAL key (which
/// carries the flow's age) and its REPLY key.
pub trait FlowEntry: Copy {
    type Key: Copy + Eq + std::hash::Hash;
    fn is_original(key: &Self::Key) -> bool;
    fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool;
    fn original_key(&self) -> Self::Key;
    /// Whether this reply entry still belongs to the flow `original` (a NAT
    /// reply key is a SNAT port: a later flow may have taken it).
    fn reply_of(&self, original: &Self) -> bool;
}

impl FlowEntry for CtEntry {
    type Key = CtKey;

    fn is_original(key: &CtKey) -> bool {
        key.direction == ct_dir::ORIGINAL
    }

    fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        CtEntry::is_expired(self, now_ns, lifetimes)
    }

    fn original_key(&self) -> CtKey {
        CtEntry::original_key(self)
    }

    fn reply_of(&self, _original: &Self) -> bool {
        true
    }
}

impl FlowEntry for NatEntry {
    type Key = NatKey;

    fn is_original(key: &NatKey) -> bool {
        key.direction == nat_dir::ORIGINAL
    }

    fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        NatEntry::is_expired(self, now_ns, lifetimes)
    }

    fn original_key(&self) -> NatKey {
        NatEntry::original_key(self)
    }

    fn reply_of(&self, original: &Self) -> bool {
        original.reply_key() == self.reply_key()
    }
}

impl FlowEntry for Nat6Entry {
    type Key = Nat6Key;

    fn is_original(key: &Nat6Key) -> bool {
        key.direction == nat_dir::ORIGINAL
    }

    fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        Nat6Entry::is_expired(self, now_ns, lifetimes)
    }

    fn original_key(&self) -> Nat6Key {
        Nat6Entry::original_key(self)
    }

    fn reply_of(&self, original: &Self) -> bool {
        original.reply_key() == self.reply_key()
    }
}

/// Keys to delete: expired flows (both entries) and reply entries whose flow
/// is gone.
pub fn expired_keys<E: FlowEntry>(
    entries: &[(E::Key, E)],
    now_ns: u64,
    lifetimes: &CtLifetimes,
) -> Vec<E::Key> {
    let live_originals: HashMap<E::Key, E> = entries
        .iter()
        .filter(|(k, e)| E::is_original(k) && !e.is_expired(now_ns, lifetimes))
        .map(|(k, e)| (*k, *e))
        .collect();
    entries
        .iter()
        .filter(|(k, e)| {
            if E::is_original(k) {
                e.is_expired(now_ns, lifetimes)
            } else {
                !live_originals
                    .get(&e.original_key())
                    .is_some_and(|o| e.reply_of(o))
            }
        })
        .map(|(k, _)| *k)
        .collect()
}

/// A flow table as the sweep uses it: look an entry up, delete it. The
/// pinned maps in the agent; a plain map in the unit tests.
pub trait FlowTable<E: FlowEntry> {
    fn lookup(&self, key: &E::Key) -> Option<E>;
    /// Whether an entry was deleted.
    fn delete(&mut self, key: &E::Key) -> bool;
}

impl FlowTable<CtEntry> for ConntrackMaps {
    fn lookup(&self, key: &CtKey) -> Option<CtEntry> {
        self.get(key, 0).ok()
    }

    fn delete(&mut self, key: &CtKey) -> bool {
        self.remove(key).is_ok()
    }
}

impl FlowTable<NatEntry> for NatMap {
    fn lookup(&self, key: &NatKey) -> Option<NatEntry> {
        self.get(key, 0).ok()
    }

    fn delete(&mut self, key: &NatKey) -> bool {
        self.remove(key).is_ok()
    }
}

impl FlowTable<Nat6Entry> for Nat6Map {
    fn lookup(&self, key: &Nat6Key) -> Option<Nat6Entry> {
        self.get(key, 0).ok()
    }

    fn delete(&mut self, key: &Nat6Key) -> bool {
        self.remove(key).is_ok()
    }
}

/// Whether `key` is dead by `expired_keys`' rule, judged on what the table
/// holds now rather than on the walk's snapshot: the datapath may have
/// created or refreshed the flow since.
pub fn still_dead<E: FlowEntry>(
    table: &impl FlowTable<E>,
    key: &E::Key,
    now_ns: u64,
    lifetimes: &CtLifetimes,
) -> bool {
    let Some(entry) = table.lookup(key) else {
        return false;
    };
    if E::is_original(key) {
        entry.is_expired(now_ns, lifetimes)
    } else {
        table.lookup(&entry.original_key()).is_none_or(|original| {
            original.is_expired(now_ns, lifetimes) || !entry.reply_of(&original)
        })
    }
}

/// Deletes those of `candidates` that are still dead; the number deleted.
/// Original entries go first, so a reply entry whose flow this sweep ends
/// goes in the same sweep.
pub fn delete_still_dead<E: FlowEntry>(
    table: &mut impl FlowTable<E>,
    candidates: &[E::Key],
    now_ns: u64,
    lifetimes: &CtLifetimes,
) -> usize {
    let (originals, replies): (Vec<&E::Key>, Vec<&E::Key>) =
        candidates.iter().partition(|k| E::is_original(k));
    originals
        .into_iter()
        .chain(replies)
        .filter(|k| still_dead(table, k, now_ns, lifetimes) && table.delete(k))
        .count()
}

/// One sweep of the `NAT` map (SNAT entries of external flows); the number
/// of entries removed and left.
pub fn sweep_nat(map: &mut NatMap, lifetimes: &CtLifetimes) -> (usize, usize) {
    let entries: Vec<(NatKey, NatEntry)> = map.iter().filter_map(Result::ok).collect();
    let now_ns = monotonic_now_ns();
    let candidates = expired_keys(&entries, now_ns, lifetimes);
    let removed = delete_still_dead(map, &candidates, now_ns, lifetimes);
    (removed, entries.len() - removed)
}

/// [`sweep_nat`] for the `NAT6` map (SNAT entries of external IPv6 flows).
pub fn sweep_nat6(map: &mut Nat6Map, lifetimes: &CtLifetimes) -> (usize, usize) {
    let entries: Vec<(Nat6Key, Nat6Entry)> = map.iter().filter_map(Result::ok).collect();
    let now_ns = monotonic_now_ns();
    let candidates = expired_keys(&entries, now_ns, lifetimes);
    let removed = delete_still_dead(map, &candidates, now_ns, lifetimes);
    (removed, entries.len() - removed)
}

/// What one sweep saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub removed: usize,
    /// Entries left (two per flow) in `CT_TCP`.
    pub remaining_tcp: usize,
    /// Entries left in `CT_OTHER`.
    pub remaining_other: usize,
}

impl Sweep {
    pub fn remaining(&self) -> usize {
        self.remaining_tcp + self.remaining_other
    }
}

/// One sweep of the expired entries of both conntrack maps: a walk picks
/// the candidates, each is looked up again just before it is deleted. (aya
/// 0.14 has no `BPF_MAP_LOOKUP_BATCH`, so the walk is one syscall per
/// entry.)
pub fn sweep(maps: &mut ConntrackMaps, lifetimes: &CtLifetimes) -> Sweep {
    let entries: Vec<(CtKey, CtEntry)> = maps.iter().filter_map(Result::ok).collect();
    let now_ns = monotonic_now_ns();
    let candidates = expired_keys(&entries, now_ns, lifetimes);
    let removed_tcp = delete_still_dead(
        maps,
        &candidates
            .iter()
            .filter(|k| k.proto == IPPROTO_TCP)
            .copied()
            .collect::<Vec<_>>(),
        now_ns,
        lifetimes,
    );
    let removed_other = delete_still_dead(
        maps,
        &candidates
            .iter()
            .filter(|k| k.proto != IPPROTO_TCP)
            .copied()
            .collect::<Vec<_>>(),
        now_ns,
        lifetimes,
    );
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use dataplane_common::{ct_state, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    const SEC: u64 = 1_000_000_000;
    const L: CtLifetimes = CtLifetimes {
        tcp_opening_s: 60,
        tcp_established_s: 6 * 3600,
        tcp_closing_s: 10,
        udp_s: 30,
        udp_stream_s: 60,
        _pad: 0,
    };

    fn flow(proto: u8, state: u8, last_seen_s: u64) -> [(CtKey, CtEntry); 2] {
        let e = CtEntry {
            client_addr: 1,
            service_addr: 2,
            backend_addr: 3,
            client_port: 10,
            service_port: 20,
            backend_port: 30,
            proto,
            state,
            last_seen_ns: last_seen_s * SEC,
            ..Default::default()
        };
        let reply = CtKey {
            src_addr: 3,
            dst_addr: 1,
            src_port: 30,
            dst_port: 10,
            proto,
            direction: ct_dir::REPLY,
            _pad: [0; 2],
        };
        [(e.original_key(), e), (reply, e)]
    }

    #[test]
    fn expired_udp_flow_is_swept_with_its_reply_entry() {
        let entries = flow(IPPROTO_UDP, ct_state::ESTABLISHED, 0);
        assert_eq!(expired_keys(&entries, 61 * SEC, &L).len(), 2);
        assert!(expired_keys(&entries, 59 * SEC, &L).is_empty());
    }

    #[test]
    fn established_tcp_outlives_opening_tcp() {
        let established = flow(IPPROTO_TCP, ct_state::ESTABLISHED, 0);
        let opening = flow(IPPROTO_TCP, ct_state::OPENING, 0);
        assert!(expired_keys(&established, 3600 * SEC, &L).is_empty());
        assert_eq!(expired_keys(&opening, 3600 * SEC, &L).len(), 2);
    }

    #[test]
    fn orphaned_reply_entry_is_swept() {
        let [_, reply] = flow(IPPROTO_TCP, ct_state::ESTABLISHED, 0);
        assert_eq!(expired_keys(&[reply], 0, &L), vec![reply.0]);
    }

    impl<E: FlowEntry> FlowTable<E> for HashMap<E::Key, E> {
        fn lookup(&self, key: &E::Key) -> Option<E> {
            self.get(key).copied()
        }

        fn delete(&mut self, key: &E::Key) -> bool {
            self.remove(key).is_some()
        }
    }

    /// The walk saw a dead UDP flow; the datapath refreshed it before the
    /// delete phase. Both entries stay.
    #[test]
    fn flow_refreshed_after_the_walk_survives() {
        let entries = flow(IPPROTO_UDP, ct_state::ESTABLISHED, 0);
        let now = 61 * SEC;
        let candidates = expired_keys(&entries, now, &L);
        assert_eq!(candidates.len(), 2);

        let mut table: HashMap<CtKey, CtEntry> = entries.into_iter().collect();
        let original = entries[0].0;
        table.get_mut(&original).unwrap().last_seen_ns = now;

        assert_eq!(delete_still_dead(&mut table, &candidates, now, &L), 0);
        assert_eq!(table.len(), 2);
    }

    /// The walk saw an orphaned reply entry; its flow was created again
    /// before the delete phase. The reply entry stays.
    #[test]
    fn reply_entry_whose_flow_was_recreated_survives() {
        let [original, reply] = flow(IPPROTO_TCP, ct_state::OPENING, 100);
        let now = 101 * SEC;
        let candidates = expired_keys(&[reply], now, &L);
        assert_eq!(candidates, vec![reply.0]);

        let mut table: HashMap<CtKey, CtEntry> = [original, reply].into_iter().collect();
        assert_eq!(delete_still_dead(&mut table, &candidates, now, &L), 0);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn flow_still_dead_at_delete_time_goes_with_its_reply_entry() {
        let entries = flow(IPPROTO_UDP, ct_state::ESTABLISHED, 0);
        let now = 61 * SEC;
        let candidates = expired_keys(&entries, now, &L);
        let mut table: HashMap<CtKey, CtEntry> = entries.into_iter().collect();
        assert_eq!(delete_still_dead(&mut table, &candidates, now, &L), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn entry_gone_before_the_delete_phase_is_not_counted() {
        let entries = flow(IPPROTO_UDP, ct_state::ESTABLISHED, 0);
        let candidates = expired_keys(&entries, 61 * SEC, &L);
        let mut table: HashMap<CtKey, CtEntry> = HashMap::new();
        assert_eq!(delete_still_dead(&mut table, &candidates, 61 * SEC, &L), 0);
    }

    /// Both entries of a SNATed TCP flow last seen at `last_seen_s`.
    fn nat_flow(state: u8, last_seen_s: u64, nat_port: u16) -> [(NatKey, NatEntry); 2] {
        let e = NatEntry {
            last_seen_ns: last_seen_s * SEC,
            client_addr: 1,
            frontend_addr: 2,
            backend_addr: 3,
            nat_addr: 4,
            client_port: 10,
            frontend_port: 20,
            backend_port: 30,
            nat_port,
            proto: IPPROTO_TCP,
            state,
            ..Default::default()
        };
        [(e.original_key(), e), (e.reply_key(), e)]
    }

    #[test]
    fn expired_nat_entries_are_removed_and_live_ones_kept() {
        let dead = nat_flow(ct_state::CLOSING, 0, 61_000);
        let mut live = nat_flow(ct_state::ESTABLISHED, 0, 61_001);
        // Another client's flow: its own original key.
        for (k, e) in &mut live {
            e.client_port = 11;
            if k.direction == nat_dir::ORIGINAL {
                k.src_port = 11;
            }
        }
        let entries: Vec<(NatKey, NatEntry)> = dead.into_iter().chain(live).collect();
        let now = 11 * SEC;
        let candidates = expired_keys(&entries, now, &L);
        let mut table: HashMap<NatKey, NatEntry> = entries.into_iter().collect();
        assert_eq!(delete_still_dead(&mut table, &candidates, now, &L), 2);
        assert_eq!(table.len(), 2);
        assert!(table
            .keys()
            .all(|k| k.src_port == 11 || k.dst_port == 61_001));
    }

    /// A REPLY entry (a SNAT port) the original flow no longer points at
    /// (it was given another port) is an orphan.
    #[test]
    fn nat_reply_entry_of_a_port_its_flow_left_is_removed() {
        let [original, _] = nat_flow(ct_state::ESTABLISHED, 100, 61_000);
        let [_, stale_reply] = nat_flow(ct_state::ESTABLISHED, 100, 61_005);
        let entries = [original, stale_reply];
        assert_eq!(expired_keys(&entries, 101 * SEC, &L), vec![stale_reply.0]);
    }
}
