//! IPv6 service lookup and backend selection: the rules of `lb` (slots,
//! ClientIP affinity, traffic policy) on the `LB6_*` maps. Slots are shared
//! with IPv4 (`BACKEND_SLOTS`); an IPv6 frontend's slots hold ids in
//! `LB6_BACKENDS`.

use dataplane_common::{
    reply_source_flags, service_flags, service_ip_flags, service_scope, Affinity6Key,
    AffinityEntry, Backend6, Ct6Entry, Ipv6Bytes, ReplySource6, Service6Key, ServiceValue,
};

use crate::{
    maps::{
        affinity6_insert, affinity6_slot, backend6_get, backend_slot_get, reply_source6_get,
        reply_source6_slot, service6_get, service6_ip_get, source_range6_contains,
    },
    parse6::Ipv6Flow,
    skb,
};

/// The `LB6_SERVICE_IPS` value of `addr`, if it is a service IP or one of
/// this node's addresses.
#[inline(always)]
pub fn lb6_service_ip(addr: &Ipv6Bytes) -> Option<u32> {
    service6_ip_get(addr)
}

/// Cheap pre-filter of reply translation, as `lb4_may_be_reply`: may
/// `flow` (into a pod) be a backend's reply to a flow of this node? Not
/// when its source is no IPv6 backend's address, or one no flow went to
/// yet (`NO_FLOWS`), by the address's `LB6_REPLY_SOURCES` entry only. A
/// later fragment, without ports, may.
#[inline(always)]
pub fn lb6_may_be_reply(flow: &Ipv6Flow) -> bool {
    lb6_address_may_have(flow, reply_source_flags::NO_FLOWS)
}

/// Pre-filter of NodePort reply translation in `from_pod`, as
/// `lb4_may_be_node_port_reply`: only from an address a NodePort flow went
/// to (`NO_NODE_PORT_FLOWS` cleared).
#[inline(always)]
pub fn lb6_may_be_node_port_reply(flow: &Ipv6Flow) -> bool {
    lb6_address_may_have(flow, reply_source_flags::NO_NODE_PORT_FLOWS)
}

/// Whether `flow`'s source address is an IPv6 backend's whose
/// `LB6_REPLY_SOURCES` entry has none of `bits` (`lb4_address_may_have`).
#[inline(always)]
fn lb6_address_may_have(flow: &Ipv6Flow, bits: u32) -> bool {
    !flow.has_l4_header()
        || reply_source6_get(&ReplySource6::address(flow.src_addr)).is_some_and(|v| v & bits == 0)
}

/// `lb4_is_backend_source` of an IPv6 flow: is its source an IPv6
/// backend's address and port (the uplink egress's pre-filter)?
#[inline(always)]
pub fn lb6_is_backend_source(flow: &Ipv6Flow) -> bool {
    !flow.has_l4_header()
        || reply_source6_get(&ReplySource6 {
            addr: flow.src_addr,
            port: flow.src_port,
            proto: flow.proto,
            _pad: 0,
        })
        .is_some()
}

/// `lb4_flow_to_backend` of an IPv6 flow: the flow `ct` (new, or
/// refreshed) goes to its backend, so the "no flows yet" bits of the
/// backend's address go, the NodePort one when the flow's service address
/// is this node's and the replies leave a local pod unhairpinned
/// (`node_port_candidate`). With the bits already clear it reads one value
/// and writes nothing. A call of its own: inlined, its key took the
/// new-flow and established paths past the verifier's 512 bytes of stack.
#[inline(never)]
pub fn lb6_flow_to_backend(ct: &Ct6Entry, node_port_candidate: bool) {
    let Some(slot) = reply_source6_slot(&ReplySource6::address(ct.backend_addr)) else {
        return;
    };
    slot.clear_for_flow(|| {
        node_port_candidate
            && lb6_service_ip(&ct.service_addr)
                .is_some_and(|v| v & service_ip_flags::NODE_ADDRESS != 0)
    });
}

#[inline(always)]
fn lb6_key(addr: Ipv6Bytes, port: u16, proto: u8, scope: u8) -> Service6Key {
    Service6Key {
        addr,
        port,
        proto,
        scope,
    }
}

/// The frontend a pod's packet is for: a cluster IP first, then a
/// load-balancer IP or externalIP, then a NodePort on one of this node's
/// addresses (as `lb4_lookup_frontend`).
#[inline(always)]
pub fn lb6_lookup_frontend(flow: &Ipv6Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        for scope in [service_scope::INTERNAL, service_scope::EXTERNAL] {
            let key = lb6_key(flow.dst_addr, flow.dst_port, flow.proto, scope);
            if let Some(svc) = service6_get(&key) {
                return Some(svc);
            }
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service6_get(&lb6_key(
            [0; 16],
            flow.dst_port,
            flow.proto,
            service_scope::EXTERNAL,
        ));
    }
    None
}

/// The frontend a packet from outside is for: a load-balancer IP or
/// externalIP by address, else a NodePort when the address is one of this
/// node's (as `lb4_lookup_external`).
#[inline(always)]
pub fn lb6_lookup_external(flow: &Ipv6Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        let key = lb6_key(
            flow.dst_addr,
            flow.dst_port,
            flow.proto,
            service_scope::EXTERNAL,
        );
        if let Some(svc) = service6_get(&key) {
            return Some(svc);
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service6_get(&lb6_key(
            [0; 16],
            flow.dst_port,
            flow.proto,
            service_scope::EXTERNAL,
        ));
    }
    None
}

/// The frontend a socket's connect()/sendmsg() to `addr:port` is for: a
/// cluster IP, else a NodePort on one of this node's addresses (as
/// `lb4_lookup_sock`; load-balancer IPs and externalIPs stay with the
/// packet path).
#[inline(always)]
pub fn lb6_lookup_sock(addr: &Ipv6Bytes, port: u16, proto: u8) -> Option<ServiceValue> {
    let ip_value = service6_ip_get(addr)?;
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        if let Some(svc) = service6_get(&lb6_key(*addr, port, proto, service_scope::INTERNAL)) {
            return Some(svc);
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service6_get(&lb6_key([0; 16], port, proto, service_scope::EXTERNAL));
    }
    None
}

/// `loadBalancerSourceRanges`: a frontend that has them admits the IPv6
/// clients in its `SOURCE_RANGES6` prefixes only.
#[inline(always)]
pub fn lb6_source_allowed(svc: &ServiceValue, client: &Ipv6Bytes) -> bool {
    svc.flags & service_flags::SOURCE_RANGES == 0 || source_range6_contains(svc.service_id, client)
}

/// What a new IPv6 connection to a service gets; see `lb::Choice`. The
/// backend itself is written to the caller's [`Selected6`]: a data-carrying
/// enum crossing a BPF function call gets a BTF layout (its tag inside the
/// payload) the kernel refuses.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Choice6 {
    Backend,
    NoEndpoints,
    NoLocalEndpoints,
}

#[derive(Clone, Copy, Default)]
pub struct Selected6 {
    /// The service's id, so callers need not carry it beside.
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Backend6,
    pub by_affinity: bool,
}

/// `lb4_choose_backend` for an IPv6 client; the backend goes to
/// `selected`.
#[inline(never)]
pub fn lb6_choose_backend(
    svc: &ServiceValue,
    client: &Ipv6Bytes,
    now: u64,
    selected: &mut Selected6,
) -> Choice6 {
    lb6_choice(lb6_select_backend(svc, client, 0, now), svc, selected)
}

/// `lb6_choose_backend` for a socket, which session affinity knows by its
/// network namespace (see `lb::Client`).
#[inline(never)]
pub fn lb6_choose_backend_netns(
    svc: &ServiceValue,
    netns: u64,
    now: u64,
    selected: &mut Selected6,
) -> Choice6 {
    lb6_choice(lb6_select_backend(svc, &[0; 16], netns, now), svc, selected)
}

#[inline(always)]
fn lb6_choice(chosen: Option<Selected6>, svc: &ServiceValue, selected: &mut Selected6) -> Choice6 {
    match chosen {
        Some(chosen) => {
            *selected = chosen;
            Choice6::Backend
        }
        None if svc.flags & service_flags::DROP_NO_LOCAL_ENDPOINTS != 0 => {
            Choice6::NoLocalEndpoints
        }
        None => Choice6::NoEndpoints,
    }
}

#[inline(always)]
fn lb6_select_backend(
    svc: &ServiceValue,
    client: &Ipv6Bytes,
    client_netns: u64,
    now: u64,
) -> Option<Selected6> {
    if svc.backend_count == 0 {
        return None;
    }
    if svc.affinity_timeout_s == 0 {
        let (_, backend_id, backend) = lb6_random_backend(svc)?;
        return Some(Selected6 {
            service_id: svc.service_id,
            backend_id,
            backend,
            by_affinity: false,
        });
    }
    let key = Affinity6Key {
        service_id: svc.service_id,
        client_addr: *client,
        _pad: 0,
        client_netns,
    };
    if let Some(selected) = lb6_affinity_backend(svc, &key, now) {
        return Some(selected);
    }
    let (slot, backend_id, backend) = lb6_random_backend(svc)?;
    affinity6_insert(
        &key,
        &AffinityEntry {
            last_used_ns: now,
            backend_id,
            slot,
        },
    );
    Some(Selected6 {
        service_id: svc.service_id,
        backend_id,
        backend,
        by_affinity: false,
    })
}

/// As `lb4_affinity_backend`.
#[inline(always)]
fn lb6_affinity_backend(svc: &ServiceValue, key: &Affinity6Key, now: u64) -> Option<Selected6> {
    let entry = affinity6_slot(key)?;
    let remembered = entry.get();
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(remembered.last_used_ns) > timeout_ns
        || remembered.slot >= svc.backend_count
        || lb6_slot(svc, remembered.slot) != Some(remembered.backend_id)
    {
        return None;
    }
    let backend = lb6_lookup_backend(remembered.backend_id)?;
    entry.set_last_used(now);
    Some(Selected6 {
        service_id: svc.service_id,
        backend_id: remembered.backend_id,
        backend,
        by_affinity: true,
    })
}

/// As `lb4_random_backend`.
#[inline(always)]
fn lb6_random_backend(svc: &ServiceValue) -> Option<(u32, u32, Backend6)> {
    let slot = skb::random_u32() % svc.backend_count;
    let (slot, backend_id) = match lb6_slot(svc, slot) {
        Some(id) => (slot, id),
        None => (0, lb6_slot(svc, 0)?),
    };
    lb6_lookup_backend(backend_id).map(|b| (slot, backend_id, b))
}

#[inline(always)]
fn lb6_slot(svc: &ServiceValue, slot: u32) -> Option<u32> {
    backend_slot_get(svc.slot_base.wrapping_add(slot))
}

#[inline(always)]
pub fn lb6_lookup_backend(backend_id: u32) -> Option<Backend6> {
    backend6_get(backend_id)
}
