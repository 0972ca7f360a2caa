//! The conntrack garbage collector. The datapath ignores expired entries and the
//! LRU evicts under pressure; this sweep removes dead flows early so the
//! table (and `inspect conntrack`) holds live flows only.

use dataplane_common::{ct_dir, CtEntry, CtKey};

use crate::node::pinned::{monotonic_now_ns, ConntrackMap};

/// Keys to delete: expired flows (both entries) and reply entries whose flow
/// is gone.
pub fn expired_keys(entries: &[(CtKey, CtEntry)], now_ns: u64) -> Vec<CtKey> {
    let live_originals: std::collections::HashSet<CtKey> = entries
        .iter()
        .filter(|(k, e)| k.direction == ct_dir::ORIGINAL && !e.is_expired(now_ns))
        .map(|(k, _)| *k)
        .collect();
    entries
        .iter()
        .filter(|(k, e)| {
            if k.direction == ct_dir::ORIGINAL {
                e.is_expired(now_ns)
            } else {
                !live_originals.contains(&e.original_key())
            }
        })
        .map(|(k, _)| *k)
        .collect()
}

/// What one sweep saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub removed: usize,
    /// Entries left (two per flow).
    pub remaining: usize,
}

/// One sweep of the expired entries.
pub fn sweep(map: &mut ConntrackMap) -> Sweep {
    let entries: Vec<(CtKey, CtEntry)> = map.iter().filter_map(Result::ok).collect();
    let dead = expired_keys(&entries, monotonic_now_ns());
    let removed = dead.iter().filter(|k| map.remove(k).is_ok()).count();
    Sweep {
        removed,
        remaining: entries.len() - removed,
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{ct_state, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    const SEC: u64 = 1_000_000_000;

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
        assert_eq!(expired_keys(&entries, 61 * SEC).len(), 2);
        assert!(expired_keys(&entries, 59 * SEC).is_empty());
    }

    #[test]
    fn established_tcp_outlives_opening_tcp() {
        let established = flow(IPPROTO_TCP, ct_state::ESTABLISHED, 0);
        let opening = flow(IPPROTO_TCP, ct_state::OPENING, 0);
        assert!(expired_keys(&established, 3600 * SEC).is_empty());
        assert_eq!(expired_keys(&opening, 3600 * SEC).len(), 2);
    }

    #[test]
    fn orphaned_reply_entry_is_swept() {
        let [_, reply] = flow(IPPROTO_TCP, ct_state::ESTABLISHED, 0);
        assert_eq!(expired_keys(&[reply], 0), vec![reply.0]);
    }
}
