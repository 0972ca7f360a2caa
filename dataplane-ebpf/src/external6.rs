//! The north-south path on IPv6: `from_outside` and `to_outside` for IPv6
//! frames, the pipeline of `external` on the `LB6_*`, `CT6_*` and `NAT6`
//! maps. A flow to a local backend (policy Local, or a local endpoint)
//! keeps the client's address and is tracked in `CT6_*` like a pod's; a
//! flow to a remote backend with policy Cluster gets this node's IPv6
//! address (`NAT6_CONFIG`) and a port of the SNAT range (`NAT_CONFIG`'s),
//! tracked in `NAT6`, and is sent on by FIB lookup. ICMPv6 errors from
//! outside about either kind of flow (Packet Too Big above all) are made
//! about what the other end sent and sent on to it: to the client of a
//! SNATed flow, to the local backend of a tracked one.
//!
//! The TCP/UDP pipeline runs on tc (`from_outside`) and on XDP
//! (`xdp_from_outside`) alike, generic over `PacketCtx` as `external`'s
//! IPv4 one is. What XDP cannot finish it passes untouched, uncounted and
//! untraced to the tc program behind it: answers to refused clients (with
//! the flow state they need left in place), next hops without a neighbour
//! entry or out of another interface, fragments, frames whose headers lie
//! past XDP's direct-access bound, and ICMPv6 (errors about translated
//! flows are translated by tc; NDP passes). Every function that holds a large
//! value is a call of its own, so no two of them stack their frames on one
//! path. Traced as `pod6` is: decisions handed up, traced once at each
//! entry (tc's and XDP's).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{
    backend_flags, ct_dir, ct_flags, ct_state, nat_dir, service_flags, service_ip_flags,
    trace_hook, Counter, Ct6Key, HopCache, Ipv6Bytes, Nat6Entry, Nat6Key, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    conntrack6::{ct6_lookup, ct6_lookup_flow},
    csum::csum_replace_plain,
    ctx::PacketCtx,
    fail, fail_as,
    fib::{fib6_lookup, NextHop, Route6},
    fragment::frag6_track,
    lb6::{
        lb6_choose_backend, lb6_is_backend_source, lb6_lookup_backend, lb6_lookup_external,
        lb6_service_ip, lb6_source_allowed, Choice6, Selected6,
    },
    maps::{count, nat6_config, nat6_get, nat6_slot, nat_config, Nat6Slot, NAT6},
    nat6::{csum6_add_pseudo, csum6_addr_diff, nat6_rewrite_dst, nat6_rewrite_src},
    parse::{frag, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse6::{
        ipv6_dst, parse_ipv6_flow_into, parse_ipv6_header, Ipv6Flow, Ipv6Hdr, Parse6Error,
        IP6_DST_OFF, IP6_HLEN, IP6_L4_OFF, IP6_OFF, IP6_SRC_OFF, IPPROTO_ICMPV6,
    },
    pod6::{self, drop_as, next, Ids, Outcome},
    skb,
    snat::{nat_port_candidate, NAT_PORT_TRIES},
    trace::Packet6,
};

/// As `snat::NAT_REFRESH_NS`.
const NAT_REFRESH_NS: u64 = 1_000_000_000;

/// `from_outside` for an IPv6 frame: an ICMPv6 error about a translated
/// flow, or the TCP/UDP pipeline; traced as `pod6::from_pod6` is.
#[inline(never)]
pub fn from_outside6(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    let packet = Packet6::new(trace_hook::FROM_OUTSIDE);
    let outcome = if is_icmp6(ctx) {
        icmp6_error_from_outside(ctx, &mut flow, &packet)
    } else {
        try_from_outside6(ctx, &mut flow, &packet)
    };
    outcome.trace(ctx, &packet, &flow);
    outcome.verdict()
}

/// `xdp_from_outside` for an IPv6 frame: the TCP/UDP pipeline, traced as
/// `from_outside6` is; ICMPv6 and what else it cannot finish pass to
/// `from_outside` behind it, which traces them.
#[inline(never)]
pub fn xdp_from_outside6(ctx: &XdpContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    let packet = Packet6::new(trace_hook::FROM_OUTSIDE);
    let outcome = try_from_outside6(ctx, &mut flow, &packet);
    outcome.trace(ctx, &packet, &flow);
    outcome.verdict()
}

/// Whether the fixed IPv6 header is followed by ICMPv6 (where an error
/// about a translated flow is).
#[inline(always)]
fn is_icmp6(ctx: &TcContext) -> bool {
    PacketCtx::load_far::<u8>(ctx, IP6_OFF + 6) == Some(IPPROTO_ICMPV6)
}

/// `to_outside` for an IPv6 frame.
#[inline(never)]
pub fn to_outside6(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    let packet = Packet6::new(trace_hook::TO_OUTSIDE);
    let outcome = try_to_outside6(ctx, &mut flow, &packet);
    outcome.trace(ctx, &packet, &flow);
    outcome.verdict()
}

/// The ids of a SNATed flow, for the trace.
#[inline(always)]
fn nat_ids(nat: &Nat6Entry) -> Ids {
    Ids::new(nat.service_id, nat.backend_id)
}

/// The `LB6_SERVICE_IPS` value of the frame's destination.
#[inline(always)]
fn dst_ip_value<C: PacketCtx>(ctx: &C) -> Option<u32> {
    ipv6_dst(ctx).and_then(|dst| lb6_service_ip(&dst))
}

/// The ingress pipeline for TCP and UDP, for tc and XDP alike. Under XDP,
/// whatever would pass untranslated is passed without being counted or
/// traced: the tc program behind sees it again.
#[inline(always)]
fn try_from_outside6<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow, packet: &Packet6) -> Outcome {
    let untouched = Outcome::done(Ok(C::PASS));
    let parsed = parse_ipv6_flow_into(ctx, flow);
    if C::DEFERS_TO_TC {
        // tc counts what is wrong with the frame, and a fragment (its
        // first one tracked, a later one followed) is its to handle.
        if parsed.is_err() || flow.frag != frag::NONE {
            return untouched;
        }
    }
    match parsed {
        Ok(()) => {}
        // ICMPv6 errors are `from_outside6`'s; NDP and the rest pass.
        Err(Parse6Error::NotL4) => return untouched,
        Err(Parse6Error::Malformed) => {
            if dst_ip_value(ctx).is_some_and(|v| v & service_ip_flags::COUNT_MASK != 0) {
                count(Counter::Malformed);
            }
            return untouched;
        }
        Err(Parse6Error::PastBound) => {
            if dst_ip_value(ctx).is_some_and(|v| v & service_ip_flags::COUNT_MASK != 0) {
                count(Counter::Ipv6ExtHeadersPastBound);
            }
            return untouched;
        }
        Err(Parse6Error::UnknownFragment) => {
            // The node's own traffic goes on; one to a load-balancer or
            // external IP could not reach the right backend.
            if dst_ip_value(ctx).is_some_and(|v| v & service_ip_flags::COUNT_MASK != 0) {
                return Outcome::done(drop_as::<C>(Counter::FragmentUnknown));
            }
            return untouched;
        }
    }
    let Some(ip_value) = lb6_service_ip(&flow.dst_addr) else {
        return untouched;
    };
    packet.arrived(flow);
    let mut outcome = outside_flow(ctx, flow, ip_value);
    if outcome.next == next::NEW_FLOW {
        // Each stage called from here, none from another: their frames
        // are never stacked (the new-flow path's calls go deep).
        let mut selected = Selected6::default();
        outcome = choose_backend::<C>(flow, ip_value, &mut selected);
        let now = skb::now_ns();
        if outcome.next == next::NEW_FLOW {
            outcome = pod6::ct6_new_flow(ctx, flow, now, &selected);
        } else if outcome.next == NEW_SNAT_FLOW {
            outcome = snat6_new_flow::<C>(flow, now, &selected);
        }
        if outcome.next == SNAT_FORWARD {
            outcome = snat6_forward_new(ctx, flow);
        }
    }
    if outcome.next == next::REFUSE {
        if C::DEFERS_TO_TC {
            // XDP leaves the answer (its counting and its trace) to tc:
            // the stages change no state on the way to a refusal there.
            return untouched;
        }
        return outcome.refused(ctx.refuse6(outcome.refusal(), flow));
    }
    outcome
}

/// A packet from outside to a node address, load-balancer IP or
/// externalIP: the reply of a SNATed flow, a packet of a known flow, or
/// (`next::NEW_FLOW`) a new flow.
#[inline(never)]
fn outside_flow<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow, ip_value: u32) -> Outcome {
    let now = skb::now_ns();
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 && in_snat_range(flow.dst_port) {
        if let Some(slot) = nat6_slot(&nat6_key(flow, nat_dir::REPLY)) {
            let outcome = snat6_reply(ctx, flow, slot, now);
            if outcome.next != next::NEW_FLOW {
                return outcome;
            }
        }
    }
    let Some(service) = lb6_lookup_external(flow, ip_value) else {
        if ip_value & service_ip_flags::COUNT_MASK == 0 || C::DEFERS_TO_TC {
            // The node's own traffic (not to a NodePort), or counted by tc.
            return Outcome::done(Ok(C::PASS));
        }
        return Outcome::pass_as::<C>(Counter::UnknownPort, Ids::NONE);
    };
    if flow.frag == frag::FIRST {
        frag6_track(flow);
    }
    // Established flows: SNATed to a remote backend, looked up first where
    // the frontend masquerades (all its flows but those to this node's
    // endpoints; see `external::try_from_outside`) ...
    let nat = if service.flags & service_flags::MASQUERADE_REMOTE != 0 {
        nat6_slot(&nat6_key(flow, nat_dir::ORIGINAL))
    } else {
        None
    };
    if let Some(slot) = nat {
        let outcome = snat6_known_flow(ctx, flow, slot, now);
        if outcome.next != next::NEW_FLOW {
            return outcome;
        }
    } else if let Some(slot) = ct6_lookup_flow(flow, ct_dir::ORIGINAL) {
        // ... or to a local one (conntrack).
        let outcome = pod6::known_flow(ctx, flow, slot, now);
        if outcome.next != next::NEW_FLOW {
            return outcome;
        }
    }
    if flow.frag == frag::LATER {
        return Outcome::drop_as::<C>(Counter::FragmentUnknown, Ids::NONE);
    }
    Outcome::new_flow()
}

/// The backend of a new flow to an external frontend (looked up again:
/// see `try_from_outside6`), written to `selected`: `next::NEW_FLOW` for
/// a flow tracked in conntrack (local backend, or policy Local),
/// [`NEW_SNAT_FLOW`] for one SNATed to a remote backend, else what
/// becomes of the packet.
#[inline(never)]
fn choose_backend<C: PacketCtx>(
    flow: &mut Ipv6Flow,
    ip_value: u32,
    selected: &mut Selected6,
) -> Outcome {
    let Some(service) = lb6_lookup_external(flow, ip_value) else {
        return Outcome::done(Ok(C::PASS));
    };
    let ids = Ids::service(service.service_id);
    if !lb6_source_allowed(&service, &flow.src_addr) {
        return Outcome::drop_as::<C>(Counter::DropSourceRange, ids);
    }
    match lb6_choose_backend(&service, &flow.src_addr, skb::now_ns(), selected) {
        Choice6::Backend => {}
        Choice6::NoLocalEndpoints => {
            return Outcome::drop_as::<C>(Counter::DropNoLocalEndpoints, ids)
        }
        Choice6::NoEndpoints => return Outcome::refuse(Counter::RejectNoEndpoints, ids),
    }
    if service.flags & service_flags::MASQUERADE_REMOTE == 0
        || selected.backend.flags & backend_flags::LOCAL != 0
    {
        return Outcome::new_flow();
    }
    Outcome::new_flow().with_next(NEW_SNAT_FLOW)
}

/// `Outcome::next` of [`choose_backend`]: a new flow to a remote backend,
/// to SNAT.
const NEW_SNAT_FLOW: u32 = 4;

/// The first packet of a SNATed flow whose `NAT6` entries
/// [`snat6_new_flow`] made: on to the backend.
#[inline(never)]
fn snat6_forward_new<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow) -> Outcome {
    let Some(slot) = nat6_slot(&nat6_key(flow, nat_dir::ORIGINAL)) else {
        return Outcome::done(Err(fail_as::<C>(Counter::CtInsertFailed)));
    };
    // The next packet caches the hop, as on IPv4.
    let forward = Forward {
        slot,
        now: None,
        decision: Counter::NewFlow,
    };
    snat6_forward(ctx, flow, &forward)
}

#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    let port = u16::from_be(port);
    nat_config().is_some_and(|c| c.port_min <= port && port <= c.port_max)
}

#[inline(always)]
fn nat6_key(flow: &Ipv6Flow, direction: u8) -> Nat6Key {
    Nat6Key {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn nat6_is_expired(entry: &Nat6Entry, now_ns: u64) -> bool {
    crate::maps::ct_lifetimes().is_some_and(|l| entry.is_expired(now_ns, l))
}

/// As `snat::nat4_is_reopen`.
#[inline(always)]
fn nat6_is_reopen(entry: &Nat6Entry, flow: &Ipv6Flow) -> bool {
    flow.proto == IPPROTO_TCP
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.state == ct_state::CLOSING
}

/// As `snat::nat4_update`.
#[inline(always)]
fn nat6_update(slot: Nat6Slot, flow: &Ipv6Flow, direction: u8, now_ns: u64) {
    let state = if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        ct_state::CLOSING
    } else if direction == nat_dir::REPLY {
        ct_state::ESTABLISHED
    } else {
        ct_state::OPENING
    };
    slot.touch(now_ns, state, NAT_REFRESH_NS);
}

#[inline(always)]
fn nat6_delete(entry: &Nat6Entry) {
    let _ = NAT6.remove(&entry.original_key());
    let _ = NAT6.remove(&entry.reply_key());
}

/// Whether the REPLY entry `reply` still belongs to a live flow.
#[inline(always)]
fn nat6_is_live(reply: &Nat6Entry, now_ns: u64) -> bool {
    nat6_slot(&reply.original_key()).is_some_and(|owner| {
        let owner = owner.entry();
        !nat6_is_expired(owner, now_ns) && owner.reply_key() == reply.reply_key()
    })
}

/// A packet of a SNATed flow: forwarded to its backend, refused (its
/// backend is gone), or to be taken as a new flow. On XDP a refusal is
/// tc's, flow state and all.
#[inline(never)]
fn snat6_known_flow<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    slot: Nat6Slot,
    now: u64,
) -> Outcome {
    let nat = slot.entry();
    let expired = nat6_is_expired(nat, now) || nat6_is_reopen(nat, flow);
    let backend_alive = lb6_lookup_backend(nat.backend_id)
        .is_some_and(|b| b.addr == nat.backend_addr && b.port == nat.backend_port);
    if !expired && backend_alive {
        nat6_update(slot, flow, nat_dir::ORIGINAL, now);
        let forward = Forward {
            slot,
            now: Some(now),
            decision: Counter::Established,
        };
        return snat6_forward(ctx, flow, &forward);
    }
    if flow.frag == frag::LATER {
        return Outcome::drop_as::<C>(Counter::FragmentUnknown, nat_ids(nat));
    }
    if C::DEFERS_TO_TC && !expired && flow.proto == IPPROTO_TCP {
        // tc resets the client.
        return Outcome::done(Ok(C::PASS));
    }
    nat6_delete(nat);
    if !expired && flow.proto == IPPROTO_TCP {
        return Outcome::refuse(Counter::ResetBackendGone, nat_ids(nat));
    }
    if !expired {
        count(Counter::UdpFlowMoved);
    }
    Outcome::new_flow()
}

/// Why a new SNATed flow could not be set up: plain numbers, as a
/// data-carrying result crossing a BPF call can get a BTF layout the
/// kernel refuses.
mod nat6_create_error {
    /// No free SNAT port (or no IPv6 SNAT address configured).
    pub const EXHAUSTED: u32 = 1;
    /// The map refused an insert.
    pub const INSERT_FAILED: u32 = 2;
}

/// As `snat::nat4_create`: claims a SNAT port by inserting the REPLY
/// entry where no live flow holds that tuple, then the ORIGINAL entry; a
/// concurrent creation of the same flow wins and is copied into `entry`.
/// 0, or one of [`nat6_create_error`]. Inlined: a frame of its own
/// below `snat6_new_flow`'s would pass the 512-byte stack.
#[inline(always)]
fn nat6_create(entry: &mut Nat6Entry, now_ns: u64) -> u32 {
    let (Some(config), Some(addr)) = (nat_config(), nat6_config()) else {
        return nat6_create_error::EXHAUSTED;
    };
    if addr.snat_addr == [0; 16] || config.port_max < config.port_min {
        return nat6_create_error::EXHAUSTED;
    }
    entry.nat_addr = addr.snat_addr;
    let range = u32::from(config.port_max - config.port_min) + 1;
    let mut claimed = false;
    // Free ports only in the loop: one branch per try keeps the verifier's
    // paths few (a liveness check per try multiplies them past its limit).
    for attempt in 0..NAT_PORT_TRIES {
        let port = nat_port_candidate(&config, range, entry.client_port, attempt);
        entry.nat_port = port.to_be();
        if NAT6
            .insert(&entry.reply_key(), &*entry, BPF_NOEXIST as u64)
            .is_ok()
        {
            claimed = true;
            break;
        }
    }
    // The last port tried, if held by a flow that is gone, is free again
    // (the sweep frees the others).
    if !claimed {
        let reply = entry.reply_key();
        claimed = nat6_slot(&reply).is_some_and(|holder| !nat6_is_live(holder.entry(), now_ns))
            && NAT6.insert(&reply, &*entry, 0).is_ok();
    }
    if !claimed {
        return nat6_create_error::EXHAUSTED;
    }
    let original = entry.original_key();
    if NAT6.insert(&original, &*entry, BPF_NOEXIST as u64).is_err() {
        let _ = NAT6.remove(&entry.reply_key());
        let Some(winner) = nat6_get(&original) else {
            return nat6_create_error::INSERT_FAILED;
        };
        *entry = winner;
    }
    0
}

/// A new external flow to a remote backend: a SNAT port and both `NAT6`
/// entries ([`SNAT_FORWARD`]: the caller sends the packet on).
#[inline(never)]
fn snat6_new_flow<C: PacketCtx>(flow: &Ipv6Flow, now: u64, selected: &Selected6) -> Outcome {
    let mut entry = Nat6Entry {
        last_seen_ns: now,
        client_addr: flow.src_addr,
        frontend_addr: flow.dst_addr,
        backend_addr: selected.backend.addr,
        nat_addr: [0; 16],
        client_port: flow.src_port,
        frontend_port: flow.dst_port,
        backend_port: selected.backend.port,
        nat_port: 0,
        backend_id: selected.backend_id,
        service_id: selected.service_id,
        proto: flow.proto,
        state: ct_state::OPENING,
        _pad: [0; 2],
        hop: HopCache::default(),
    };
    match nat6_create(&mut entry, now) {
        0 => {}
        nat6_create_error::EXHAUSTED => {
            let ids = Ids::new(selected.service_id, selected.backend_id);
            return Outcome::drop_as::<C>(Counter::NatPortsExhausted, ids);
        }
        _ => return Outcome::done(Err(fail_as::<C>(Counter::CtInsertFailed))),
    }
    if selected.by_affinity {
        count(Counter::AffinityHit);
    }
    // Sent on by the caller, so `snat6_forward`'s frame is not stacked on
    // this one's.
    Outcome::new_flow().with_next(SNAT_FORWARD)
}

/// `Outcome::next` of [`snat6_new_flow`]: the flow's `NAT6` entries exist,
/// the packet is to be sent on (`snat6_forward`).
const SNAT_FORWARD: u32 = 3;

/// What [`snat6_forward`] sends a packet with (by reference: a BPF call
/// takes five registers).
struct Forward {
    /// The flow's ORIGINAL entry.
    slot: Nat6Slot,
    /// An established flow's time: its cached next hop is used while fresh,
    /// else looked up and cached. `None` (a new flow): looked up only.
    now: Option<u64>,
    decision: Counter,
}

/// Client -> frontend packet of a SNATed flow: to the backend, from this
/// node's SNAT address and port, sent to the next hop (see [`Forward`]).
#[inline(never)]
fn snat6_forward<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow, forward: &Forward) -> Outcome {
    let Forward {
        slot,
        now,
        decision,
    } = *forward;
    let hop = match now.and_then(|now| slot.cached_hop(now)) {
        Some(hop) => hop,
        None => {
            let nat = slot.entry();
            let route = Route6 {
                src_addr: &nat.nat_addr,
                dst_addr: &nat.backend_addr,
                src_port: nat.nat_port,
                dst_port: nat.backend_port,
                proto: flow.proto,
            };
            let Some(hop) = fib6_lookup(ctx.raw(), ctx.ifindex(), &route) else {
                // A packet from this node's address cannot go through the
                // stack on ingress: without a route it is dropped.
                count(decision);
                return Outcome::drop_as::<C>(Counter::FibLookupFailed, nat_ids(nat));
            };
            if let Some(now) = now {
                slot.keep_hop(&hop, now);
            }
            hop
        }
    };
    if leaves_to_tc(ctx, &hop) {
        return Outcome::done(Ok(C::PASS));
    }
    let nat = slot.entry();
    let rewritten = nat6_rewrite_dst(ctx, flow, &nat.backend_addr, nat.backend_port)
        .and_then(|()| nat6_rewrite_src(ctx, flow, &nat.nat_addr, nat.nat_port));
    if rewritten.is_err() {
        return Outcome::done(Err(fail_as::<C>(Counter::RewriteFailed)));
    }
    send(ctx, &hop, decision, nat_ids(nat))
}

/// Whether XDP leaves a translated packet to `hop` untouched, uncounted
/// and untraced to tc, which sends it anywhere: without a neighbour entry,
/// or out of another interface (a native XDP redirect works only towards
/// XDP-capable devices). Asked before anything is rewritten. (No route at
/// all drops the packet, counted with its decision, on either hook: the
/// flow's state changed all the same.) Checked where the hop is looked
/// up, not in a helper returning it: a result holding an `Outcome` took
/// `snat6_forward`'s frame past the stack the chain above it leaves.
#[inline(always)]
fn leaves_to_tc<C: PacketCtx>(ctx: &C, hop: &NextHop) -> bool {
    C::DEFERS_TO_TC && (hop.macs.is_none() || hop.ifindex != ctx.ifindex())
}

/// Sends a translated packet to `hop`, counting `decision` and the redirect.
#[inline(always)]
fn send<C: PacketCtx>(ctx: &C, hop: &NextHop, decision: Counter, ids: Ids) -> Outcome {
    count(Counter::Redirected);
    count(decision);
    Outcome::decided(Ok(ctx.send(hop)), decision, ids)
}

/// Backend -> SNAT port packet, `slot` its REPLY entry: back to the
/// client, from the frontend. A new flow (`next::NEW_FLOW`) when the entry
/// was left by a flow that is gone.
#[inline(never)]
fn snat6_reply<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow, slot: Nat6Slot, now: u64) -> Outcome {
    let reply = slot.entry();
    let owner = nat6_slot(&reply.original_key());
    let live = owner.is_some_and(|o| {
        let e = o.entry();
        e.reply_key() == reply.reply_key() && !nat6_is_expired(e, now)
    });
    let Some(owner) = owner.filter(|_| live) else {
        // Left by a flow that is gone: the port is free again.
        let _ = NAT6.remove(&reply.reply_key());
        return Outcome::new_flow();
    };
    let hop = match slot.cached_hop(now) {
        Some(hop) => hop,
        None => {
            let route = Route6 {
                src_addr: &reply.frontend_addr,
                dst_addr: &reply.client_addr,
                src_port: reply.frontend_port,
                dst_port: reply.client_port,
                proto: flow.proto,
            };
            let Some(hop) = fib6_lookup(ctx.raw(), ctx.ifindex(), &route) else {
                count(Counter::ReplyTranslated);
                return Outcome::drop_as::<C>(Counter::FibLookupFailed, nat_ids(reply));
            };
            slot.keep_hop(&hop, now);
            hop
        }
    };
    if leaves_to_tc(ctx, &hop) {
        return Outcome::done(Ok(C::PASS));
    }
    let reply = slot.entry();
    nat6_update(owner, flow, nat_dir::REPLY, now);
    let rewritten = nat6_rewrite_src(ctx, flow, &reply.frontend_addr, reply.frontend_port)
        .and_then(|()| nat6_rewrite_dst(ctx, flow, &reply.client_addr, reply.client_port));
    if rewritten.is_err() {
        return Outcome::done(Err(fail_as::<C>(Counter::RewriteFailed)));
    }
    send(ctx, &hop, Counter::ReplyTranslated, nat_ids(reply))
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_HLEN: usize = 8;
const ICMPV6_CSUM_OFF: usize = IP6_L4_OFF + 2;
const INNER_OFF: usize = IP6_L4_OFF + ICMPV6_HLEN;
const INNER_SRC_OFF: usize = INNER_OFF + 8;
const INNER_DST_OFF: usize = INNER_OFF + 24;
const INNER_L4_OFF: usize = INNER_OFF + IP6_HLEN;

/// An ICMPv6 error from outside about a translated flow (Packet Too Big,
/// above all) is made about what the other end of the flow sent and sent
/// on to it. About a SNATed flow (on the way to the backend), arriving at
/// this node's SNAT address: about what the client sent (quoted client ->
/// frontend, from the frontend if the backend itself sent it), to the
/// client. About a flow to a local backend (conntrack only), arriving at
/// the frontend its replies come from: about what the backend sent, to
/// the backend. Anything else passes. (XDP passes all ICMPv6 to here.)
#[inline(never)]
fn icmp6_error_from_outside(ctx: &TcContext, flow: &mut Ipv6Flow, packet: &Packet6) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let Some(outer) = parse_ipv6_header(ctx) else {
        return untouched;
    };
    if outer.next_header != IPPROTO_ICMPV6 {
        return untouched;
    }
    let Some(ip_value) = lb6_service_ip(&outer.dst_addr) else {
        return untouched;
    };
    let Some(icmp_type) = PacketCtx::load::<u8>(ctx, IP6_L4_OFF) else {
        return untouched;
    };
    if icmp_type != ICMPV6_PKT_TOOBIG
        && icmp_type != ICMPV6_DEST_UNREACH
        && icmp_type != ICMPV6_TIME_EXCEED
    {
        return untouched;
    }
    // The quote, reversed: the tuple of the flow's entry that matches it
    // (about a SNATed flow, its REPLY entry backend -> SNAT address; about
    // a flow to a local backend, its ORIGINAL entry client -> frontend).
    // Loaded straight into the key: the quoted header whole would not
    // leave the stack room for the calls below.
    let (Some(quoted_src), Some(quoted_dst), Some(proto), Some(ports)) = (
        PacketCtx::load::<Ipv6Bytes>(ctx, INNER_SRC_OFF),
        PacketCtx::load::<Ipv6Bytes>(ctx, INNER_DST_OFF),
        PacketCtx::load::<u8>(ctx, INNER_OFF + 6),
        PacketCtx::load::<[u16; 2]>(ctx, INNER_L4_OFF),
    ) else {
        return untouched;
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return untouched;
    }
    let mut key = Nat6Key {
        src_addr: quoted_dst,
        dst_addr: quoted_src,
        src_port: ports[1],
        dst_port: ports[0],
        proto,
        direction: nat_dir::REPLY,
        _pad: [0; 2],
    };
    // Traced with the outer addresses (`flow` holds no ports here).
    *flow = Ipv6Flow {
        src_addr: outer.src_addr,
        dst_addr: outer.dst_addr,
        proto: IPPROTO_ICMPV6,
        ..Ipv6Flow::default()
    };
    if ip_value & service_ip_flags::NODE_ADDRESS != 0 {
        if let Some(slot) = nat6_slot(&key) {
            packet.arrived(flow);
            return icmp6_nat_translate(ctx, &outer, slot.entry(), flow);
        }
    }
    // An error about a reply sent from the frontend is addressed to it.
    if key.dst_addr != outer.dst_addr {
        return untouched;
    }
    key.direction = ct_dir::ORIGINAL;
    packet.arrived(flow);
    icmp6_local_translate(ctx, &outer, &key, flow)
}

/// Rewrites an ICMPv6 error about a flow to a local backend (see
/// [`icmp6_error_from_outside`]), found by its conntrack entry (at
/// `quoted`, the reversed quote with the ORIGINAL direction; a `Ct6Key`
/// has the same fields): the quote's source becomes the backend
/// address and port, and the error goes to the backend through the stack,
/// as the flow's packets from the client do; `flow` gets the outer
/// addresses it leaves with. The quoted L4 checksum is left alone. A call
/// of its own: its frame is not above the SNATed flows' path.
#[inline(never)]
fn icmp6_local_translate(
    ctx: &TcContext,
    outer: &Ipv6Hdr,
    quoted: &Nat6Key,
    flow: &mut Ipv6Flow,
) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let key = Ct6Key {
        src_addr: quoted.src_addr,
        dst_addr: quoted.dst_addr,
        src_port: quoted.src_port,
        dst_port: quoted.dst_port,
        proto: quoted.proto,
        direction: quoted.direction,
        _pad: [0; 2],
    };
    let Some(slot) = ct6_lookup(&key) else {
        return untouched;
    };
    let ct = slot.entry();
    if ct.flags & ct_flags::HAIRPIN != 0 {
        return untouched;
    }
    let rewrite = || -> Result<(), ()> {
        quote_addr(ctx, INNER_SRC_OFF, &outer.dst_addr, &ct.backend_addr)?;
        quote_port(ctx, INNER_L4_OFF, ct.service_port, ct.backend_port)?;
        outer_addr(ctx, IP6_DST_OFF, &outer.dst_addr, &ct.backend_addr)
    };
    if rewrite().is_err() {
        return Outcome::done(Err(fail(Counter::RewriteFailed)));
    }
    flow.dst_addr = ct.backend_addr;
    Outcome::pass(Counter::IcmpErrorTranslated, Ids::of(ct))
}

/// Rewrites an ICMPv6 error about the SNATed flow `nat` (see
/// [`icmp6_error_from_outside`]) and sends it to the client; `flow` gets
/// the outer addresses it leaves with. The quoted L4 checksum is left
/// alone, as on IPv4.
#[inline(never)]
fn icmp6_nat_translate(
    ctx: &TcContext,
    outer: &Ipv6Hdr,
    nat: &Nat6Entry,
    flow: &mut Ipv6Flow,
) -> Outcome {
    let rewrite = || -> Result<(), ()> {
        // The quote: source SNAT address:port -> client, destination
        // backend -> frontend (plain changes of bytes the checksum covers).
        quote_addr(ctx, INNER_SRC_OFF, &nat.nat_addr, &nat.client_addr)?;
        quote_addr(ctx, INNER_DST_OFF, &nat.backend_addr, &nat.frontend_addr)?;
        quote_port(ctx, INNER_L4_OFF, nat.nat_port, nat.client_port)?;
        quote_port(ctx, INNER_L4_OFF + 2, nat.backend_port, nat.frontend_port)?;
        // The outer header: to the client, and from the frontend when the
        // backend sent it (pseudo-header changes).
        outer_addr(ctx, IP6_DST_OFF, &outer.dst_addr, &nat.client_addr)?;
        if outer.src_addr == nat.backend_addr {
            outer_addr(ctx, IP6_SRC_OFF, &outer.src_addr, &nat.frontend_addr)?;
        }
        Ok(())
    };
    if rewrite().is_err() {
        return Outcome::done(Err(fail(Counter::RewriteFailed)));
    }
    if outer.src_addr == nat.backend_addr {
        flow.src_addr = nat.frontend_addr;
    }
    flow.dst_addr = nat.client_addr;
    let route = Route6 {
        src_addr: &flow.src_addr,
        dst_addr: &nat.client_addr,
        src_port: 0,
        dst_port: 0,
        proto: IPPROTO_ICMPV6,
    };
    let Some(hop) = fib6_lookup(ctx.raw(), PacketCtx::ifindex(ctx), &route) else {
        count(Counter::IcmpErrorTranslated);
        return Outcome::drop(Counter::FibLookupFailed, nat_ids(nat));
    };
    send(ctx, &hop, Counter::IcmpErrorTranslated, nat_ids(nat))
}

#[inline(always)]
fn quote_addr(ctx: &TcContext, off: usize, old: &Ipv6Bytes, new: &Ipv6Bytes) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    csum_replace_plain(ctx, ICMPV6_CSUM_OFF, 0, csum6_addr_diff(old, new), 0).map_err(|_| ())?;
    PacketCtx::store(ctx, off, new)
}

#[inline(always)]
fn quote_port(ctx: &TcContext, off: usize, old: u16, new: u16) -> Result<(), ()> {
    csum_replace_plain(ctx, ICMPV6_CSUM_OFF, u32::from(old), u32::from(new), 2).map_err(|_| ())?;
    PacketCtx::store(ctx, off, &new)
}

#[inline(always)]
fn outer_addr(ctx: &TcContext, off: usize, old: &Ipv6Bytes, new: &Ipv6Bytes) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    csum6_add_pseudo(
        ctx,
        ICMPV6_CSUM_OFF,
        IPPROTO_ICMPV6,
        csum6_addr_diff(old, new),
    )
    .map_err(|_| ())?;
    PacketCtx::store(ctx, off, new)
}

#[inline(always)]
fn try_to_outside6(ctx: &TcContext, flow: &mut Ipv6Flow, packet: &Packet6) -> Outcome {
    match parse_ipv6_flow_into(ctx, flow) {
        Ok(()) => {}
        // An ICMPv6 error a local backend (or this node) sends an outside
        // client about a flow to it is made about the frontend, as an
        // error to a client pod is made about the service.
        Err(Parse6Error::NotL4) => return pod6::icmp6_error_to_pod(ctx, flow, packet),
        Err(_) => return Outcome::done(Ok(TC_ACT_OK)),
    }
    if !lb6_is_backend_source(flow) {
        // Not from a backend: the node's own traffic and its other pods'
        // leave without a conntrack lookup.
        return Outcome::done(Ok(TC_ACT_OK));
    }
    packet.arrived(flow);
    // Uplink egress: a local backend's reply to an outside client gets the
    // frontend as source, as a reply into a pod gets the service.
    pod6::to_pod_flow(ctx, flow)
}
