//! Service lookup and backend selection.

use dataplane_common::{Backend, BackendSlotKey, ServiceKey, ServiceValue};

use crate::{
    maps::{BACKENDS, BACKEND_SLOTS, SERVICES, SERVICE_IPS},
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

/// Picks a backend uniformly at random among the service's slots, as
/// kube-proxy's iptables mode does with `statistic --mode random`.
#[inline(always)]
pub fn lb4_select_backend(svc: &ServiceValue) -> Option<(u32, Backend)> {
    if svc.backend_count == 0 {
        return None;
    }
    let slot = skb::random_u32() % svc.backend_count;
    // The agent shrinks a service by lowering the count before deleting the
    // slots past it; a reader that saw the old count may miss its slot and
    // then takes slot 0, which always exists while the count is non-zero.
    let backend_id = lb4_slot(svc.service_id, slot).or_else(|| lb4_slot(svc.service_id, 0))?;
    lb4_lookup_backend(backend_id).map(|b| (backend_id, b))
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
