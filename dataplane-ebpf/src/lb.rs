//! Service lookup and backend selection.

use dataplane_common::{
    AffinityEntry, AffinityKey, Backend, BackendSlotKey, ServiceKey, ServiceValue,
};

use crate::{
    maps::{AFFINITY, BACKENDS, BACKEND_SLOTS, SERVICES, SERVICE_IPS},
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
    // SAFETY: `get_ptr` returns a pointer into the map value that stays valid
    // during this program run; the value is copied out at once.
    SERVICES.get_ptr(key).map(|v| unsafe { *v })
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
    let _ = AFFINITY.insert(&key, &entry, 0);
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
    let entry = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: copied out of the map value at once.
    let remembered = unsafe { *entry };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(remembered.last_used_ns) > timeout_ns
        || remembered.slot >= svc.backend_count
        || lb4_slot(svc.service_id, remembered.slot) != Some(remembered.backend_id)
    {
        return None;
    }
    let backend = lb4_lookup_backend(remembered.backend_id)?;
    // SAFETY: a racing writer on another CPU can at worst store an equally
    // recent timestamp; an aligned u64 store does not tear.
    unsafe { (*entry).last_used_ns = now };
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
    let (slot, backend_id) = match lb4_slot(svc.service_id, slot) {
        Some(id) => (slot, id),
        None => (0, lb4_slot(svc.service_id, 0)?),
    };
    lb4_lookup_backend(backend_id).map(|b| (slot, backend_id, b))
}

#[inline(always)]
fn lb4_slot(service_id: u32, slot: u32) -> Option<u32> {
    // SAFETY: value copied out of the map at once (see above).
    BACKEND_SLOTS
        .get_ptr(BackendSlotKey { service_id, slot })
        .map(|v| unsafe { *v })
}

#[inline(always)]
pub fn lb4_lookup_backend(backend_id: u32) -> Option<Backend> {
    // SAFETY: value copied out of the map at once (see above).
    BACKENDS.get_ptr(backend_id).map(|v| unsafe { *v })
}
