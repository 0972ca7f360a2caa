//! Service lookup and backend selection, shared by the tc path (per new
//! flow) and the socket hooks (per connect or datagram): both call
//! [`lb4_lookup_service`] and [`lb4_choose_backend`], so they pick backends
//! by the same slots, affinity and traffic policy.

use dataplane_common::{
    reply_source_flags, service_flags, service_ip_flags, service_scope, AffinityEntry, AffinityKey,
    Backend, ReplySource, ServiceKey, ServiceValue,
};

use crate::{
    maps::{
        affinity_slot, backend_get, backend_slot_get, reply_source_get, reply_source_slot,
        service_get, service_ip_get, source_range_contains, AFFINITY, SERVICE_IPS,
    },
    parse::Ipv4Flow,
    skb,
};

/// Cheap pre-filter: is `addr` the IP of any service?
#[inline(always)]
pub fn lb4_is_service_ip(addr: u32) -> bool {
    SERVICE_IPS.get_ptr(addr).is_some()
}

/// Whether `flow`'s source address is a backend's whose `REPLY_SOURCES`
/// entry has none of `bits` (`reply_source_flags`): a flow of the kind they
/// stand for may be this packet's. The address's entry only: its key is
/// the same for all of a pod's packets, where a port's would be a cold miss
/// keyed by a client's ephemeral port. A later fragment, without ports, may
/// always be.
#[inline(always)]
fn lb4_address_may_have(flow: &Ipv4Flow, bits: u32) -> bool {
    !flow.has_l4_header()
        || reply_source_get(&ReplySource::address(flow.src_addr)).is_some_and(|v| v & bits == 0)
}

/// Cheap pre-filter of reply translation in `to_pod`: may `flow` (into a
/// pod) be a backend's reply to a flow of this node? Not when its source
/// is no backend's address, or one no flow went to yet (`NO_FLOWS`: the
/// backend's packets of socket-translated or direct connections).
#[inline(always)]
pub fn lb4_may_be_reply(flow: &Ipv4Flow) -> bool {
    lb4_address_may_have(flow, reply_source_flags::NO_FLOWS)
}

/// Pre-filter of reply translation on the uplink's egress (`to_outside`):
/// is `flow`'s source a backend's address and port? Not the "no flows
/// yet" bits: the XDP path does not refresh them on established packets
/// (its program is at the verifier's limit), so a backend that left and
/// came back under its old id could keep them set while an outside
/// client's flow lives. The port's entry: a node address that is also a
/// host-network backend's keeps the node's own traffic out.
#[inline(always)]
pub fn lb4_is_backend_source(flow: &Ipv4Flow) -> bool {
    !flow.has_l4_header()
        || reply_source_get(&ReplySource {
            addr: flow.src_addr,
            port: flow.src_port,
            proto: flow.proto,
            _pad: 0,
        })
        .is_some()
}

/// Pre-filter of NodePort reply translation in `from_pod`: may `flow`
/// (out of a pod) answer a NodePort flow of this node? Only from an
/// address a NodePort flow went to (`NO_NODE_PORT_FLOWS` cleared).
#[inline(always)]
pub fn lb4_may_be_node_port_reply(flow: &Ipv4Flow) -> bool {
    lb4_address_may_have(flow, reply_source_flags::NO_NODE_PORT_FLOWS)
}

/// A flow of this node goes to `backend` (new, or refreshed: a backend
/// that left and came back under its old id revives its flows): clears
/// the "no flows yet" bits of its address's entry, the NodePort one when
/// the flow's service address (`service_addr`) is this node's and its
/// replies leave a local pod unhairpinned (`node_port_candidate`). The
/// common case, bits already clear, reads one value and writes nothing.
#[inline(always)]
pub fn lb4_flow_to_backend(backend: &Backend, service_addr: u32, node_port_candidate: bool) {
    let Some(slot) = reply_source_slot(&ReplySource::address(backend.addr)) else {
        return;
    };
    slot.clear_for_flow(|| {
        node_port_candidate
            && lb4_service_ip(service_addr).is_some_and(|v| v & service_ip_flags::NODE_ADDRESS != 0)
    });
}

/// The `SERVICE_IPS` value of `addr` (frontend count, node bit), if it is
/// a service IP or one of this node's addresses.
#[inline(always)]
pub fn lb4_service_ip(addr: u32) -> Option<u32> {
    service_ip_get(addr)
}

#[inline(always)]
fn lb4_key(addr: u32, port: u16, proto: u8, scope: u8) -> ServiceKey {
    ServiceKey {
        addr,
        port,
        proto,
        scope,
    }
}

/// The cluster-IP frontend at (addr, port, proto), all as stored in maps:
/// what the socket hooks translate (external frontends stay with the packet
/// path, which applies their source ranges and traffic policy).
#[inline(always)]
pub fn lb4_lookup_service(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    service_get(&lb4_key(addr, port, proto, service_scope::INTERNAL))
}

/// The external frontend a packet to `flow`'s destination is for: a
/// load-balancer IP or externalIP by address, else a NodePort when the
/// address is one of this node's (`ip_value` from `SERVICE_IPS`).
#[inline(always)]
pub fn lb4_lookup_external(flow: &Ipv4Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        let key = lb4_key(
            flow.dst_addr,
            flow.dst_port,
            flow.proto,
            service_scope::EXTERNAL,
        );
        if let Some(svc) = service_get(&key) {
            return Some(svc);
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service_get(&lb4_key(
            0,
            flow.dst_port,
            flow.proto,
            service_scope::EXTERNAL,
        ));
    }
    None
}

/// The frontend a socket's connect()/sendmsg() to `addr:port` is for: a
/// cluster IP, else a NodePort when `addr` is one of this node's addresses
/// (a node process reaching its own node's NodePort: those packets never
/// cross a program of the packet path). Load-balancer IPs and externalIPs,
/// where source ranges apply, stay with the packet path.
#[inline(always)]
pub fn lb4_lookup_sock(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    let ip_value = service_ip_get(addr)?;
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        if let Some(svc) = lb4_lookup_service(addr, port, proto) {
            return Some(svc);
        }
    }
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        return service_get(&lb4_key(0, port, proto, service_scope::EXTERNAL));
    }
    None
}

/// The frontend a pod's (or node's) packet is for: a cluster IP first,
/// then the external frontends, which in-cluster clients reach too.
#[inline(always)]
pub fn lb4_lookup_frontend(flow: &Ipv4Flow, ip_value: u32) -> Option<ServiceValue> {
    if ip_value & service_ip_flags::COUNT_MASK != 0 {
        if let Some(svc) = lb4_lookup_service(flow.dst_addr, flow.dst_port, flow.proto) {
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
