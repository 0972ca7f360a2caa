//! Service lookup and backend selection.

use dataplane_common::{AffinityEntry, AffinityKey, Backend, ServiceKey, ServiceValue};

use crate::{
    maps::{affinity_slot, backend_get, backend_slot_get, service_get, AFFINITY, SERVICE_IPS},
    parse::Ipv4Flow,
    skb,
};

/// Cheap pre-filter: is `addr` the IP of any service?
#[inline(always)]
pub fn lb4_is_service_ip(addr: u32) -> bool {
    SERVICE_IPS.get_ptr(addr).is_some()
}

#[inline(always)]
pub fn lb4_lookup_service(flow: &Ipv4Flow) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
    };
    service_get(&key)
}

/// A backend picked for a new connection.
pub struct Selected {
    pub backend_id: u32,
    pub backend: Backend,
    /// Chosen by the client's session affinity rather than at random.
    pub by_affinity: bool,
}

/// Picks the backend of a new connection: the client's previous one while
/// its ClientIP affinity holds, else one uniformly at random among the
/// service's slots, as kube-proxy's iptables mode does with `statistic
/// --mode random`.
#[inline(always)]
pub fn lb4_select_backend(svc: &ServiceValue, client_addr: u32, now: u64) -> Option<Selected> {
    if svc.backend_count == 0 {
        return None;
    }
    if svc.affinity_timeout_s == 0 {
        let (_, backend_id, backend) = lb4_random_backend(svc)?;
        return Some(Selected {
            backend_id,
            backend,
            by_affinity: false,
        });
    }
    let key = AffinityKey {
        service_id: svc.service_id,
        client_addr,
    };
    if let Some(selected) = lb4_affinity_backend(svc, &key, now) {
        return Some(selected);
    }
    let (slot, backend_id, backend) = lb4_random_backend(svc)?;
    let entry = AffinityEntry {
        last_used_ns: now,
        backend_id,
        slot,
    };
    // Best effort: without the entry the next connection is balanced anew.
    let _ = AFFINITY.insert(key, entry, 0);
    Some(Selected {
        backend_id,
        backend,
        by_affinity: false,
    })
}

/// The client's remembered backend, if the affinity has not timed out and
/// the backend still holds its slot in this service (it may have been
/// removed, or the service id reused).
#[inline(always)]
fn lb4_affinity_backend(svc: &ServiceValue, key: &AffinityKey, now: u64) -> Option<Selected> {
    let entry = affinity_slot(key)?;
    let remembered = entry.get();
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(remembered.last_used_ns) > timeout_ns
        || remembered.slot >= svc.backend_count
        || lb4_slot(svc, remembered.slot) != Some(remembered.backend_id)
    {
        return None;
    }
    let backend = lb4_lookup_backend(remembered.backend_id)?;
    entry.set_last_used(now);
    Some(Selected {
        backend_id: remembered.backend_id,
        backend,
        by_affinity: true,
    })
}

/// (slot, backend id, backend) chosen uniformly at random.
#[inline(always)]
fn lb4_random_backend(svc: &ServiceValue) -> Option<(u32, u32, Backend)> {
    let slot = skb::random_u32() % svc.backend_count;
    // The agent shrinks a service by lowering the count before deleting the
    // slots past it; a reader that saw the old count may miss its slot and
    // then takes slot 0, which always exists while the count is non-zero.
    let (slot, backend_id) = match lb4_slot(svc, slot) {
        Some(id) => (slot, id),
        None => (0, lb4_slot(svc, 0)?),
    };
    lb4_lookup_backend(backend_id).map(|b| (slot, backend_id, b))
}

/// The backend id in the service's `slot`.
#[inline(always)]
fn lb4_slot(svc: &ServiceValue, slot: u32) -> Option<u32> {
    backend_slot_get(svc.slot_base.wrapping_add(slot))
}

#[inline(always)]
pub fn lb4_lookup_backend(backend_id: u32) -> Option<Backend> {
    backend_get(backend_id)
}
