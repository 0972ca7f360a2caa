//! Service lookup and backend selection, shared by the tc path (per new
//! flow) and the socket hooks (per connect or datagram): both call
//! [`lb4_lookup_service`] and [`lb4_choose_backend`], so they pick backends
//! by the same slots, affinity and traffic policy.

use dataplane_common::{
    service_flags, AffinityEntry, AffinityKey, Backend, ServiceKey, ServiceValue,
};

use crate::{
    maps::{affinity_slot, backend_get, backend_slot_get, service_get, AFFINITY, SERVICE_IPS},
    skb,
};

/// Cheap pre-filter: is `addr` the IP of any service?
#[inline(always)]
pub fn lb4_is_service_ip(addr: u32) -> bool {
    SERVICE_IPS.get_ptr(addr).is_some()
}

/// The frontend at (addr, port, proto), all as stored in maps.
#[inline(always)]
pub fn lb4_lookup_service(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    service_get(&key)
}

/// Who opens a connection, as session affinity knows it: a pod by its IP
/// (tc path), a socket by its network namespace (socket hooks).
#[derive(Clone, Copy)]
pub struct Client {
    addr: u32,
    netns: u64,
}

impl Client {
    #[inline(always)]
    pub fn addr(addr: u32) -> Self {
        Self { addr, netns: 0 }
    }

    #[inline(always)]
    pub fn netns(cookie: u64) -> Self {
        Self {
            addr: 0,
            netns: cookie,
        }
    }
}

/// What a new connection to a service gets.
pub enum Choice {
    Backend(Selected),
    /// The service has no endpoints at all: refused.
    NoEndpoints,
    /// `internalTrafficPolicy: Local` and none on this node.
    NoLocalEndpoints,
}

/// The one backend decision of the datapath (see the module comment).
#[inline(always)]
pub fn lb4_choose_backend(svc: &ServiceValue, client: Client, now: u64) -> Choice {
    match lb4_select_backend(svc, client, now) {
        Some(selected) => Choice::Backend(selected),
        None if svc.flags & service_flags::DROP_NO_LOCAL_ENDPOINTS != 0 => Choice::NoLocalEndpoints,
        None => Choice::NoEndpoints,
    }
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
fn lb4_select_backend(svc: &ServiceValue, client: Client, now: u64) -> Option<Selected> {
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
        client_addr: client.addr,
        client_netns: client.netns,
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
