//! Service lookup and backend selection.

use dataplane_common::{
    service_flags, service_ip_flags, service_scope, AffinityEntry, AffinityKey, Backend,
    BackendSlotKey, ServiceKey, ServiceValue,
};

use crate::{
    maps::{
        affinity_slot, backend_get, backend_slot_get, service_get, service_ip_get,
        source_range_contains, AFFINITY, SERVICE_IPS,
    },
    parse::Ipv4Flow,
    skb,
};

/// Cheap pre-filter: is `addr` the IP of any service?
#[inline(always)]
pub fn lb4_is_service_ip(addr: u32) -> bool {
    SERVICE_IPS.get_ptr(addr).is_some()
}

/// The `SERVICE_IPS` value of `addr` (frontend count, node bit), if it is
/// a service IP or one of this node's addresses.
#[inline(always)]
pub fn lb4_service_ip(addr: u32) -> Option<u32> {
    service_ip_get(addr)
}

#[inline(always)]
fn lb4_key(addr: u32, flow: &Ipv4Flow, scope: u8) -> ServiceKey {
    ServiceKey {
        addr,
        port: flow.dst_port,
        proto: flow.proto,
        scope,
    }
}

/// The external frontend a packet to `flow`'s destination is for: a
/// load-balancer IP or externalIP by address, else a NodePort when the
/// address is one of this node's (`ip_value` from `SERVICE_IPS`).
#[inline(always)]
pub fn lb4_lookup_external(flow: &Ipv4Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        if let Some(svc) = service_get(&lb4_key(flow.dst_addr, flow, service_scope::EXTERNAL)) {
            return Some(svc);
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service_get(&lb4_key(0, flow, service_scope::EXTERNAL));
    }
    None
}

/// The frontend a pod's (or node's) packet is for: a cluster IP first,
/// then the external frontends, which in-cluster clients reach too.
#[inline(always)]
pub fn lb4_lookup_service(flow: &Ipv4Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        if let Some(svc) = service_get(&lb4_key(flow.dst_addr, flow, service_scope::INTERNAL)) {
            return Some(svc);
        }
    }
    lb4_lookup_external(flow, ip_value)
}

/// `loadBalancerSourceRanges`: whether `client_addr` may use `svc`.
#[inline(always)]
pub fn lb4_source_allowed(svc: &ServiceValue, client_addr: u32) -> bool {
    svc.flags & service_flags::SOURCE_RANGES == 0
        || source_range_contains(svc.service_id, client_addr)
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
        || lb4_slot(svc.service_id, remembered.slot) != Some(remembered.backend_id)
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
    let (slot, backend_id) = match lb4_slot(svc.service_id, slot) {
        Some(id) => (slot, id),
        None => (0, lb4_slot(svc.service_id, 0)?),
    };
    lb4_lookup_backend(backend_id).map(|b| (slot, backend_id, b))
}

#[inline(always)]
fn lb4_slot(service_id: u32, slot: u32) -> Option<u32> {
    backend_slot_get(&BackendSlotKey { service_id, slot })
}

#[inline(always)]
pub fn lb4_lookup_backend(backend_id: u32) -> Option<Backend> {
    backend_get(backend_id)
}
