//! The north-south path: traffic from outside the cluster arriving on the
//! node's uplink (`from_outside`), and the replies of local backends
//! leaving through it (`to_outside`).
//!
//! Pipeline on ingress: parse -> service IP / node address filter -> SNAT
//! replies -> external frontend lookup -> conntrack (local backends) or NAT
//! (SNATed remote backends) -> backend selection -> DNAT (+ SNAT and FIB
//! redirect for remote backends with policy Cluster). A flow to a local
//! backend (policy Local, or a local endpoint with policy Cluster) keeps
//! the client's address and is tracked in `CT_TCP`/`CT_OTHER` like a
//! pod's; a flow to a remote backend with policy Cluster gets this node's
//! address and a port of the SNAT range, tracked in `NAT`.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    programs::{TcContext, XdpContext},
};

use crate::{
    ctx::PacketCtx,
    fib::{fib4_lookup, fib4_route, NextHop, Route4},
};
use dataplane_common::{
    backend_flags, ct_dir, nat_dir, service_flags, service_ip_flags, trace_hook, Counter, HopCache,
    NatEntry, ServiceValue, IPPROTO_TCP,
};

use crate::{
    conntrack::{
        ct4_delete, ct4_is_expired, ct4_is_reopen, ct4_key, ct4_lookup, ct4_restore_reply,
        ct4_update,
    },
    ct_new_flow, fail_as, forward_established,
    fragment::frag4_track,
    icmp::{
        icmp4_local_error_flow, icmp4_local_translate, icmp4_nat_error_flow,
        icmp4_nat_reverse_translate, icmp4_nat_translated_outer, IPPROTO_ICMP,
    },
    lb::{
        lb4_choose_backend, lb4_is_backend_source, lb4_lookup_backend, lb4_lookup_external,
        lb4_service_ip, lb4_source_allowed, Choice, Client, Selected,
    },
    maps::{count, nat_config, nat_slot, NatSlot},
    nat::{nat4_rewrite_dst, nat4_rewrite_src},
    parse::{frag, parse_ipv4_flow, parse_ipv4_header, Ipv4Flow, Ipv4Hdr, ParseError},
    reply_translate, skb,
    snat::{
        nat4_create, nat4_delete, nat4_is_expired, nat4_is_reopen, nat4_key, nat4_lookup,
        nat4_update, NatCreateError,
    },
    Ids, Packet, Verdict,
};

/// Whether the packet is IPv4 ICMP (checked before the TCP/UDP pipeline by
/// the tc classifier).
#[inline(always)]
pub fn is_icmp4(ctx: &TcContext) -> bool {
    parse_ipv4_header(ctx).is_some_and(|ip| ip.proto == IPPROTO_ICMP)
}

/// [`try_from_outside`] for tc, as a subprogram of its own (see
/// [`icmp_error_from_outside`]). Returns the verdict itself, not a
/// `Verdict` through the caller's stack: the classifier then has no frame,
/// and this one may take all of the 512 bytes.
#[inline(never)]
pub fn tc_from_outside(ctx: &TcContext) -> i32 {
    try_from_outside(ctx).unwrap_or_else(|verdict| verdict)
}

/// [`icmp_error_from_outside`] returning the verdict itself (see
/// [`tc_from_outside`]).
#[inline(never)]
pub fn tc_icmp_error_from_outside(ctx: &TcContext) -> i32 {
    icmp_error_from_outside(ctx).unwrap_or_else(|verdict| verdict)
}

/// [`try_from_outside`] for XDP, as a subprogram of its own (the XDP entry
/// calls it or `external6`'s).
#[inline(never)]
pub fn xdp_from_outside4(ctx: &XdpContext) -> i32 {
    try_from_outside(ctx).unwrap_or_else(|verdict| verdict)
}

/// The ingress pipeline, for tc (`from_outside`) and XDP
/// (`xdp_from_outside`) alike. Under XDP, whatever would pass untranslated
/// is passed without being counted: the tc program behind sees it again.
#[inline(always)]
pub fn try_from_outside<C: PacketCtx>(ctx: &C) -> Verdict {
    let mut flow = match parse_ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(ParseError::NotIpv4L4) => return Ok(C::PASS),
        Err(ParseError::Malformed { dst_addr }) => {
            if !C::DEFERS_TO_TC && dst_addr != 0 && lb4_service_ip(dst_addr).is_some() {
                count(Counter::Malformed);
            }
            return Ok(C::PASS);
        }
        Err(ParseError::UnknownFragment { dst_addr }) => {
            // A later fragment whose first was not seen: the node's own
            // traffic goes on; one to a load-balancer or external IP could
            // not reach the right backend.
            let frontend =
                lb4_service_ip(dst_addr).is_some_and(|v| v & service_ip_flags::COUNT_MASK != 0);
            if C::DEFERS_TO_TC || !frontend {
                return Ok(C::PASS);
            }
            count(Counter::FragmentUnknown);
            return Ok(C::DROP);
        }
    };
    let Some(ip_value) = lb4_service_ip(flow.dst_addr) else {
        return Ok(C::PASS);
    };
    let now = skb::now_ns();
    let packet = Packet::new(ctx, trace_hook::FROM_OUTSIDE, &flow);
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 && in_snat_range(flow.dst_port) {
        if let Some(verdict) = snat_reply(&packet, &mut flow, now) {
            return verdict;
        }
    }
    let Some(service) = lb4_lookup_external(&flow, ip_value) else {
        if ip_value & service_ip_flags::COUNT_MASK == 0 || C::DEFERS_TO_TC {
            // The node's own traffic (not to a NodePort), or counted by tc.
            return Ok(C::PASS);
        }
        return packet.pass(Counter::UnknownPort, &flow, Ids::default());
    };

    let mut backend_gone = None;
    // Established flows. A frontend that masquerades SNATs every flow but
    // those to this node's own endpoints, so its NAT entry is looked up
    // first and conntrack only without one: an established SNATed packet
    // (the common one) does one flow lookup, not a conntrack miss first.
    let nat = if service.flags & service_flags::MASQUERADE_REMOTE != 0 {
        nat4_lookup(&nat4_key(&flow, nat_dir::ORIGINAL))
    } else {
        None
    };
    if let Some(slot) = nat {
        // ... SNATed to a remote backend ...
        let nat = slot.get();
        let expired = nat4_is_expired(&nat, now) || nat4_is_reopen(&nat, &flow);
        let backend_alive = lb4_lookup_backend(nat.backend_id)
            .is_some_and(|b| b.addr == nat.backend_addr && b.port == nat.backend_port);
        if !expired && backend_alive {
            nat4_update(slot, &flow, nat_dir::ORIGINAL, now);
            let cache = Some(slot);
            return snat_forward(&packet, &mut flow, &nat, cache, now, Counter::Established);
        }
        if !expired && flow.proto == IPPROTO_TCP && C::DEFERS_TO_TC {
            return Ok(C::PASS);
        }
        nat4_delete(&nat);
        if !expired && flow.proto == IPPROTO_TCP {
            backend_gone = Some(Ids {
                service_id: nat.service_id,
                backend_id: nat.backend_id,
            });
        } else if !expired {
            count(Counter::UdpFlowMoved);
        }
    } else if let Some(slot) = ct4_lookup(&ct4_key(&flow, ct_dir::ORIGINAL)) {
        // ... or to a local backend (conntrack).
        let ct = slot.get();
        let expired = ct4_is_expired(&ct, now) || ct4_is_reopen(&ct, &flow);
        let backend_alive = lb4_lookup_backend(ct.backend_id)
            .is_some_and(|b| b.addr == ct.backend_addr && b.port == ct.backend_port);
        if !expired && backend_alive {
            // The REPLY entry is checked (a lookup) only when the ORIGINAL
            // one was written, at most once a second, as on the pod path.
            if ct4_update(slot, &flow, ct_dir::ORIGINAL, now) {
                ct4_restore_reply(&ct, now);
            }
            forward_established(ctx, &mut flow, &ct)?;
            return packet.pass(Counter::Established, &flow, Ids::of(&ct));
        }
        if !expired && flow.proto == IPPROTO_TCP && C::DEFERS_TO_TC {
            // tc resets the client.
            return Ok(C::PASS);
        }
        ct4_delete(&ct);
        if !expired && flow.proto == IPPROTO_TCP {
            return packet.reject(Counter::ResetBackendGone, &flow, Ids::of(&ct));
        }
        if !expired {
            count(Counter::UdpFlowMoved);
        }
    }
    if let Some(ids) = backend_gone {
        // Out of the block above: the flow's entry copy is no longer on
        // the stack while the reset is built.
        return packet.reject(Counter::ResetBackendGone, &flow, ids);
    }

    if flow.frag == frag::LATER {
        if C::DEFERS_TO_TC {
            return Ok(C::PASS);
        }
        return packet.drop(Counter::FragmentUnknown, &flow, Ids::default());
    }
    if !lb4_source_allowed(&service, flow.src_addr) {
        return packet.drop(
            Counter::DropSourceRange,
            &flow,
            Ids::service(service.service_id),
        );
    }
    let ids = Ids::service(service.service_id);
    let selected = match lb4_choose_backend(&service, Client::addr(flow.src_addr), now) {
        Choice::Backend(selected) => selected,
        Choice::NoLocalEndpoints => return packet.drop(Counter::DropNoLocalEndpoints, &flow, ids),
        Choice::NoEndpoints => return packet.reject(Counter::RejectNoEndpoints, &flow, ids),
    };
    if service.flags & service_flags::MASQUERADE_REMOTE == 0
        || selected.backend.flags & backend_flags::LOCAL != 0
    {
        return ct_new_flow(&packet, &mut flow, now, &service, selected);
    }
    snat_new_flow(&packet, &mut flow, now, &service, selected)
}

#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    let port = u16::from_be(port);
    nat_config().is_some_and(|c| c.port_min <= port && port <= c.port_max)
}

/// A new external flow to a remote backend: a SNAT port, both NAT entries,
/// then DNAT + SNAT and on to the backend's node.
#[inline(always)]
fn snat_new_flow<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &mut Ipv4Flow,
    now: u64,
    service: &ServiceValue,
    selected: Selected,
) -> Verdict {
    let mut entry = NatEntry {
        last_seen_ns: now,
        client_addr: flow.src_addr,
        frontend_addr: flow.dst_addr,
        backend_addr: selected.backend.addr,
        nat_addr: 0,
        client_port: flow.src_port,
        frontend_port: flow.dst_port,
        backend_port: selected.backend.port,
        nat_port: 0,
        backend_id: selected.backend_id,
        service_id: service.service_id,
        proto: flow.proto,
        state: 0,
        _pad: [0; 2],
        hop: HopCache::default(),
    };
    let ids = Ids {
        service_id: service.service_id,
        backend_id: selected.backend_id,
    };
    match nat4_create(&mut entry, now) {
        Ok(()) => {}
        Err(NatCreateError::Exhausted) => {
            return packet.drop(Counter::NatPortsExhausted, flow, ids);
        }
        Err(NatCreateError::InsertFailed) => return Err(fail_as::<C>(Counter::CtInsertFailed)),
    }
    if selected.by_affinity {
        count(Counter::AffinityHit);
    }
    // The next packet of the flow caches its hop: the entry of this one
    // may be another CPU's (see `nat4_create`).
    snat_forward(packet, flow, &entry, None, now, Counter::NewFlow)
}

/// Client -> frontend packet of a SNATed flow: to the backend, from this
/// node's SNAT address and port, sent on by FIB lookup.
#[inline(always)]
fn snat_forward<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &mut Ipv4Flow,
    nat: &NatEntry,
    cache: Option<NatSlot>,
    now: u64,
    decision: Counter,
) -> Verdict {
    let ids = Ids {
        service_id: nat.service_id,
        backend_id: nat.backend_id,
    };
    let after = Route4 {
        src_addr: nat.nat_addr,
        src_port: nat.nat_port,
        dst_addr: nat.backend_addr,
        dst_port: nat.backend_port,
        proto: flow.proto,
    };
    let hop = match next_hop(packet, flow, &after, cache, now, decision, ids) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    nat4_rewrite_dst(packet.ctx, flow, nat.backend_addr, nat.backend_port)
        .map_err(|_| fail_as::<C>(Counter::RewriteFailed))?;
    nat4_rewrite_src(packet.ctx, flow, nat.nat_addr, nat.nat_port)
        .map_err(|_| fail_as::<C>(Counter::RewriteFailed))?;
    send(packet, flow, &hop, decision, ids)
}

/// Backend -> SNAT port packet: back to the client, from the frontend.
/// `None` when it is not a reply of a live SNATed flow.
#[inline(always)]
fn snat_reply<C: PacketCtx>(packet: &Packet<C>, flow: &mut Ipv4Flow, now: u64) -> Option<Verdict> {
    let reply_slot = nat_slot(&nat4_key(flow, nat_dir::REPLY))?;
    let reply = reply_slot.get();
    let owner = nat4_lookup(&reply.original_key());
    let live = owner.is_some_and(|o| {
        let e = o.entry();
        e.reply_key() == reply.reply_key() && !nat4_is_expired(e, now)
    });
    let Some(owner) = owner.filter(|_| live) else {
        // Left by a flow that is gone: the port is free again.
        let _ = crate::maps::NAT.remove(reply.reply_key());
        return None;
    };
    let ids = Ids {
        service_id: reply.service_id,
        backend_id: reply.backend_id,
    };
    let after = Route4 {
        src_addr: reply.frontend_addr,
        src_port: reply.frontend_port,
        dst_addr: reply.client_addr,
        dst_port: reply.client_port,
        proto: flow.proto,
    };
    let cache = Some(reply_slot);
    let hop = match next_hop(
        packet,
        flow,
        &after,
        cache,
        now,
        Counter::ReplyTranslated,
        ids,
    ) {
        Ok(hop) => hop,
        Err(verdict) => return Some(verdict),
    };
    nat4_update(owner, flow, nat_dir::REPLY, now);
    let rewritten = nat4_rewrite_src(packet.ctx, flow, reply.frontend_addr, reply.frontend_port)
        .and_then(|()| nat4_rewrite_dst(packet.ctx, flow, reply.client_addr, reply.client_port));
    if rewritten.is_err() {
        return Some(Err(fail_as::<C>(Counter::RewriteFailed)));
    }
    Some(send(packet, flow, &hop, Counter::ReplyTranslated, ids))
}

/// The next hop of the packet once translated to `after`, known before
/// anything is rewritten: the one cached in the flow direction's entry
/// (`cache`, an established flow's) while fresh, else looked up (and
/// cached there). Without a route it is dropped (a packet from
/// this node's address cannot go through the stack on ingress), counted
/// with its `decision` (the flow's state changed all the same); without a
/// neighbour entry, or out of another interface (a native XDP redirect
/// works only towards XDP-capable devices), XDP leaves it untouched to
/// tc, which sends it anywhere.
#[inline(always)]
fn next_hop<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &Ipv4Flow,
    after: &Route4,
    cache: Option<NatSlot>,
    now: u64,
    decision: Counter,
    ids: Ids,
) -> Result<NextHop, Verdict> {
    let hop = match cache.and_then(|slot| slot.cached_hop(now)) {
        Some(hop) => hop,
        None => {
            let Some(hop) = fib4_route(packet.ctx.raw(), packet.ctx.ifindex(), after) else {
                count(decision);
                return Err(packet.drop(Counter::FibLookupFailed, flow, ids));
            };
            if let Some(slot) = cache {
                slot.keep_hop(&hop, now);
            }
            hop
        }
    };
    if C::DEFERS_TO_TC && (hop.macs.is_none() || hop.ifindex != packet.ctx.ifindex()) {
        return Err(Ok(C::PASS));
    }
    Ok(hop)
}

/// Sends a translated packet to `hop`, counting `decision` and the redirect.
#[inline(always)]
fn send<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &Ipv4Flow,
    hop: &NextHop,
    decision: Counter,
    ids: Ids,
) -> Verdict {
    count(Counter::Redirected);
    packet.record(decision, flow, ids);
    Ok(packet.ctx.send(hop))
}

/// tc: an ICMP error from outside about a translated flow (fragmentation
/// needed, above all) is made about what the other end of the flow sent
/// and sent on to it: about a SNATed flow, arriving at this node's SNAT
/// address, to the client; about a flow to a local backend, arriving at
/// the frontend its replies come from, to the backend. Anything else
/// passes. (XDP passes all ICMP to here.)
///
/// Not inlined: a subprogram of its own, so its stack frame does not add to
/// the TCP/UDP pipeline's (the classifier calls one or the other); each
/// kind of flow is a call of its own below it.
#[inline(never)]
pub fn icmp_error_from_outside(ctx: &TcContext) -> Verdict {
    let Some(outer) = parse_ipv4_header(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let Some(ip_value) = lb4_service_ip(outer.dst_addr) else {
        return Ok(TC_ACT_OK);
    };
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        let verdict = icmp_error_to_client(ctx, &outer);
        if verdict != Ok(NOT_SNATTED) {
            return verdict;
        }
    }
    icmp_error_to_backend(ctx, &outer)
}

/// [`icmp_error_to_client`]'s answer for an error about no SNATed flow;
/// never a tc verdict.
const NOT_SNATTED: i32 = 0x4e_4f53;

/// An ICMP error about a SNATed flow, to the client (see
/// [`icmp_error_from_outside`]); [`NOT_SNATTED`] when it is about none.
#[inline(never)]
fn icmp_error_to_client(ctx: &TcContext, outer: &Ipv4Hdr) -> Verdict {
    let Some(error) = icmp4_nat_error_flow(ctx, outer) else {
        return Ok(NOT_SNATTED);
    };
    icmp4_nat_reverse_translate(ctx, &error)
        .map_err(|_| fail_as::<TcContext>(Counter::RewriteFailed))?;
    let (src_addr, dst_addr) = icmp4_nat_translated_outer(&error);
    let flow = icmp_flow(src_addr, dst_addr);
    let packet = Packet::new(ctx, trace_hook::FROM_OUTSIDE, &flow);
    let ids = Ids {
        service_id: error.nat.service_id,
        backend_id: error.nat.backend_id,
    };
    let Some(hop) = fib4_lookup(ctx.raw(), ctx.ifindex(), &flow) else {
        count(Counter::IcmpErrorTranslated);
        return packet.drop(Counter::FibLookupFailed, &flow, ids);
    };
    send(&packet, &flow, &hop, Counter::IcmpErrorTranslated, ids)
}

/// An ICMP error about a flow to a local backend (policy Local, or a
/// local endpoint with policy Cluster: conntrack only), to the backend
/// through the stack, as the flow's packets from the client go.
#[inline(never)]
fn icmp_error_to_backend(ctx: &TcContext, outer: &Ipv4Hdr) -> Verdict {
    let Some(error) = icmp4_local_error_flow(ctx, outer) else {
        return Ok(TC_ACT_OK);
    };
    let packet = Packet::new(
        ctx,
        trace_hook::FROM_OUTSIDE,
        &icmp_flow(outer.src_addr, outer.dst_addr),
    );
    icmp4_local_translate(ctx, &error).map_err(|_| fail_as::<TcContext>(Counter::RewriteFailed))?;
    let flow = icmp_flow(outer.src_addr, error.ct.backend_addr);
    packet.pass(Counter::IcmpErrorTranslated, &flow, Ids::of(&error.ct))
}

/// An ICMP packet's flow (addresses only), for the trace and the FIB.
#[inline(always)]
fn icmp_flow(src_addr: u32, dst_addr: u32) -> Ipv4Flow {
    Ipv4Flow {
        src_addr,
        dst_addr,
        src_port: 0,
        dst_port: 0,
        proto: IPPROTO_ICMP,
        ip_hlen: 20,
        ip_tot_len: 0,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_ack_seq: 0,
        tcp_hlen: 0,
        frag: frag::NONE,
        ip_id: 0,
    }
}

/// Uplink egress: a local backend's reply to an outside client gets the
/// frontend (node address and NodePort, or load-balancer IP) as source.
#[inline(always)]
pub fn try_to_outside(ctx: &TcContext) -> Verdict {
    let Ok(mut flow) = parse_ipv4_flow(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !lb4_is_backend_source(&flow) {
        // Not from a backend: the node's own traffic and its other pods'
        // leave without a conntrack lookup.
        return Ok(TC_ACT_OK);
    }
    let Some(reply) = ct4_lookup(&ct4_key(&flow, ct_dir::REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    let ct = reply.get();
    if flow.frag == frag::FIRST {
        frag4_track(&flow);
    }
    if ct.flags & dataplane_common::ct_flags::HAIRPIN != 0 {
        return Ok(TC_ACT_OK);
    }
    let packet = Packet::new(ctx, trace_hook::TO_OUTSIDE, &flow);
    reply_translate(&packet, &mut flow, reply, &ct, skb::now_ns())
}
