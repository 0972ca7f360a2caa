//! `from_pod` and `to_pod` for IPv6: the pipeline of the IPv4 path (parse
//! -> service IP filter -> conntrack -> service lookup -> backend selection
//! -> conntrack create -> NAT rewrite) on the `LB6_*` and `CT6_*` maps, with
//! the same verdicts and counters. The entry points are not inlined, so the
//! IPv4 path's stack frame stays as it was and this one gets its own.
//!
//! Not traced: a tracing tail on every decision here (as the IPv4 path has)
//! took `from_pod` past the verifier's budget of 1M instructions, since the
//! IPv6 stages reach the top with many distinct states. The counters say
//! what this path did; `monitor` shows the IPv6 socket hooks' decisions.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, service_ip_flags, Counter, Ct6Entry, IPPROTO_TCP,
};

use crate::{
    conntrack::CtCreateError,
    conntrack6::{
        ct6_create, ct6_delete, ct6_delete_reply, ct6_is_expired, ct6_is_reopen, ct6_lookup,
        ct6_lookup_flow, ct6_owns_reply, ct6_restore_reply, ct6_update,
    },
    ctx::PacketCtx,
    fail, fail_as,
    fragment::frag6_track,
    icmp6::{icmp6_error_flow, icmp6_reverse_translate},
    lb6::{
        lb6_choose_backend, lb6_lookup_backend, lb6_lookup_frontend, lb6_service_ip,
        lb6_source_allowed, Choice6, Selected6,
    },
    maps::{count, Ct6Slot},
    nat6::{nat6_rewrite_dst, nat6_rewrite_src},
    parse::{frag, TCP_RST},
    parse6::{ipv6_dst, parse_ipv6_flow_into, parse_ipv6_header, Ipv6Flow, Parse6Error},
    reject6::{reject6_icmp_port_unreachable, reject6_tcp_reset},
    skb, Verdict,
};

/// `from_pod` for an IPv6 frame.
#[inline(never)]
pub fn from_pod6(ctx: &TcContext) -> i32 {
    try_from_pod6(ctx).unwrap_or_else(|verdict| verdict)
}

/// `to_pod` for an IPv6 frame.
#[inline(never)]
pub fn to_pod6(ctx: &TcContext) -> i32 {
    try_to_pod6(ctx).unwrap_or_else(|verdict| verdict)
}

/// Whether the frame is addressed to a service IP (or node address).
#[inline(always)]
fn to_service(ctx: &TcContext) -> bool {
    ipv6_dst(ctx).is_some_and(|dst| lb6_service_ip(&dst).is_some())
}

#[inline(always)]
pub(crate) fn pass(decision: Counter) -> Verdict {
    pass_as::<TcContext>(decision)
}

#[inline(always)]
pub(crate) fn drop(decision: Counter) -> Verdict {
    drop_as::<TcContext>(decision)
}

/// [`pass`] with the verdict of context `C` (the stages `external6` runs
/// on XDP too).
#[inline(always)]
pub(crate) fn pass_as<C: PacketCtx>(decision: Counter) -> Verdict {
    count(decision);
    Ok(C::PASS)
}

/// [`drop`] with the verdict of context `C`.
#[inline(always)]
pub(crate) fn drop_as<C: PacketCtx>(decision: Counter) -> Verdict {
    count(decision);
    Err(C::DROP)
}

/// What a stage decided: a verdict, or that the client is answered at once
/// (done at the top of the call chain, where the stack has room for
/// building the answer), or (`known_flow`) that the packet starts a new
/// flow. A plain struct: a data-carrying enum crossing a BPF function call
/// can get a BTF layout the kernel refuses.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Outcome {
    pub verdict: i32,
    /// One of the `next` values.
    pub next: u32,
    /// The counter of a refusal.
    pub refusal: Counter,
}

pub(crate) mod next {
    pub const DONE: u32 = 0;
    pub const REFUSE: u32 = 1;
    pub const NEW_FLOW: u32 = 2;
}

impl Outcome {
    #[inline(always)]
    pub fn done(verdict: Verdict) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            refusal: Counter::NewFlow,
        }
    }

    #[inline(always)]
    pub fn refuse(refusal: Counter) -> Self {
        Self {
            verdict: TC_ACT_SHOT,
            next: next::REFUSE,
            refusal,
        }
    }

    #[inline(always)]
    pub fn new_flow() -> Self {
        Self {
            verdict: TC_ACT_OK,
            next: next::NEW_FLOW,
            refusal: Counter::NewFlow,
        }
    }
}

/// Answers the client at once: a RST for TCP (never for a RST), an ICMPv6
/// port unreachable otherwise.
#[inline(never)]
pub(crate) fn refuse(ctx: &TcContext, decision: Counter, flow: &Ipv6Flow) -> Verdict {
    count(decision);
    if flow.proto == IPPROTO_TCP {
        if flow.tcp_flags & TCP_RST != 0 {
            return Err(TC_ACT_SHOT);
        }
        return reject6_tcp_reset(ctx, flow).map_err(|_| fail(Counter::RejectFailed));
    }
    reject6_icmp_port_unreachable(ctx, flow).map_err(|_| fail(Counter::RejectFailed))
}

#[inline(always)]
fn try_from_pod6(ctx: &TcContext) -> Verdict {
    let mut flow = Ipv6Flow::default();
    match parse_ipv6_flow_into(ctx, &mut flow) {
        Ok(()) => {}
        Err(Parse6Error::NotL4) => return Ok(TC_ACT_OK),
        Err(Parse6Error::Malformed) => {
            // Never rewritten; counted when it was meant for a service.
            if to_service(ctx) {
                count(Counter::Malformed);
            }
            return Ok(TC_ACT_OK);
        }
        Err(Parse6Error::PastBound) => {
            if to_service(ctx) {
                count(Counter::Ipv6ExtHeadersPastBound);
            }
            return Ok(TC_ACT_OK);
        }
        Err(Parse6Error::UnknownFragment) => {
            if !to_service(ctx) {
                return Ok(TC_ACT_OK);
            }
            // Sent on untranslated it would go to the service IP, nowhere.
            return drop(Counter::FragmentUnknown);
        }
    }
    let Some(ip_value) = lb6_service_ip(&flow.dst_addr) else {
        return Ok(TC_ACT_OK);
    };
    let outcome = pod_flow(ctx, &mut flow, ip_value);
    if outcome.next == next::REFUSE {
        return refuse(ctx, outcome.refusal, &flow);
    }
    Ok(outcome.verdict)
}

/// A pod's packet to a service IP: its tracked flow, the reply of a
/// hairpinned flow, or a new flow.
#[inline(always)]
fn pod_flow(ctx: &TcContext, flow: &mut Ipv6Flow, ip_value: u32) -> Outcome {
    let now = skb::now_ns();
    if flow.frag == frag::FIRST {
        frag6_track(flow);
    }
    if let Some(slot) = ct6_lookup_flow(flow, ct_dir::ORIGINAL) {
        let outcome = known_flow(ctx, flow, slot, now);
        if outcome.next != next::NEW_FLOW {
            return outcome;
        }
    } else if let Some(reply) = ct6_lookup_flow(flow, ct_dir::REPLY) {
        // Reply of a hairpinned flow: the backend answers the service
        // address, which stands for the client (itself).
        return Outcome::done(reply_translate(ctx, flow, reply.entry(), now));
    }
    if flow.frag == frag::LATER {
        return Outcome::done(drop(Counter::FragmentUnknown));
    }
    new_flow(ctx, flow, now, ip_value)
}

/// A packet of a tracked flow: forwarded to its backend, refused (its
/// backend is gone), or to be taken as a new flow (expired, or a UDP flow
/// whose backend is gone). On XDP a refusal is tc's, flow state and all.
#[inline(never)]
pub(crate) fn known_flow<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    slot: Ct6Slot,
    now: u64,
) -> Outcome {
    let ct = slot.entry();
    let expired = ct6_is_expired(ct, now) || ct6_is_reopen(ct, flow);
    let backend_alive = lb6_lookup_backend(ct.backend_id)
        .is_some_and(|b| b.addr == ct.backend_addr && b.port == ct.backend_port);
    if !expired && backend_alive {
        ct6_update(slot, flow, ct_dir::ORIGINAL, now);
        ct6_restore_reply(ct, now);
        if let Err(verdict) = forward_established(ctx, flow, ct) {
            return Outcome::done(Err(verdict));
        }
        let decision = if flow.frag == frag::LATER {
            Counter::FragmentTranslated
        } else {
            Counter::Established
        };
        return Outcome::done(pass_as::<C>(decision));
    }
    if flow.frag == frag::LATER {
        // The rest of a datagram whose flow ended.
        return Outcome::done(drop_as::<C>(Counter::FragmentUnknown));
    }
    if C::DEFERS_TO_TC && !expired && flow.proto == IPPROTO_TCP {
        // tc resets the client (and deletes the entry).
        return Outcome::done(Ok(C::PASS));
    }
    ct6_delete(ct);
    if !expired && flow.proto == IPPROTO_TCP {
        // The backend is gone, and its connection state with it: the
        // client is told at once instead of timing out.
        return Outcome::refuse(Counter::ResetBackendGone);
    }
    if !expired {
        count(Counter::UdpFlowMoved);
    }
    Outcome::new_flow()
}

#[inline(never)]
fn new_flow(ctx: &TcContext, flow: &mut Ipv6Flow, now: u64, ip_value: u32) -> Outcome {
    let Some(service) = lb6_lookup_frontend(flow, ip_value) else {
        if ip_value & service_ip_flags::COUNT_MASK == 0 {
            // Only a node address: the node's own traffic.
            return Outcome::done(Ok(TC_ACT_OK));
        }
        return Outcome::done(pass(Counter::UnknownPort));
    };
    if !lb6_source_allowed(&service, &flow.src_addr) {
        return Outcome::done(drop(Counter::DropSourceRange));
    }
    let mut selected = Selected6::default();
    match lb6_choose_backend(&service, &flow.src_addr, now, &mut selected) {
        Choice6::Backend => {}
        Choice6::NoLocalEndpoints => return Outcome::done(drop(Counter::DropNoLocalEndpoints)),
        Choice6::NoEndpoints => return Outcome::refuse(Counter::RejectNoEndpoints),
    }
    ct6_new_flow(ctx, flow, now, &selected)
}

/// A new flow to `selected` tracked in `CT6_TCP`/`CT6_OTHER` and DNATed
/// (from a pod, or from outside to a local backend keeping the client's
/// address).
#[inline(never)]
pub(crate) fn ct6_new_flow<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    now: u64,
    selected: &Selected6,
) -> Outcome {
    let backend = &selected.backend;
    let hairpin = backend.addr == flow.src_addr;
    let mut entry = Ct6Entry {
        created_ns: now,
        last_seen_ns: now,
        client_addr: flow.src_addr,
        service_addr: flow.dst_addr,
        backend_addr: backend.addr,
        client_port: flow.src_port,
        service_port: flow.dst_port,
        backend_port: backend.port,
        proto: flow.proto,
        _pad0: 0,
        state: ct_state::OPENING,
        flags: if hairpin { ct_flags::HAIRPIN } else { 0 },
        _pad: [0; 2],
        service_id: selected.service_id,
        backend_id: selected.backend_id,
        _pad1: 0,
    };
    match ct6_create(&mut entry, now) {
        Ok(()) => {}
        Err(CtCreateError::ReplyClash) => {
            return Outcome::done(drop_as::<C>(Counter::ReplyTupleClash))
        }
        Err(CtCreateError::InsertFailed) => {
            return Outcome::done(Err(fail_as::<C>(Counter::CtInsertFailed)))
        }
    }
    if let Err(verdict) = forward_established(ctx, flow, &entry) {
        return Outcome::done(Err(verdict));
    }
    if selected.by_affinity {
        // Counted as a new flow too.
        count(Counter::NewFlow);
        return Outcome::done(pass_as::<C>(Counter::AffinityHit));
    }
    Outcome::done(pass_as::<C>(Counter::NewFlow))
}

/// Client -> service packet of a known flow: DNAT to its backend, and in a
/// hairpin flow SNAT to the service address (the pod would drop a packet
/// from its own address).
#[inline(never)]
fn forward_established<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    ct: &Ct6Entry,
) -> Result<(), i32> {
    if ct.flags & ct_flags::HAIRPIN != 0 {
        let port = flow.src_port;
        nat6_rewrite_src(ctx, flow, &ct.service_addr, port)
            .map_err(|_| fail_as::<C>(Counter::RewriteFailed))?;
    }
    nat6_rewrite_dst(ctx, flow, &ct.backend_addr, ct.backend_port)
        .map_err(|_| fail_as::<C>(Counter::RewriteFailed))
}

/// Backend -> client packet: the source becomes the service again (and in
/// a hairpin flow the destination the client).
#[inline(never)]
pub(crate) fn reply_translate(
    ctx: &TcContext,
    flow: &mut Ipv6Flow,
    ct: &Ct6Entry,
    now: u64,
) -> Verdict {
    let Some(owner) = ct6_lookup(&ct.original_key()) else {
        // The flow is gone: its reply entry is stale.
        ct6_delete(ct);
        return Ok(TC_ACT_OK);
    };
    let owner_entry = owner.entry();
    if !ct6_owns_reply(owner_entry, ct) {
        // Left over from an earlier flow of this client tuple.
        ct6_delete_reply(ct);
        return Ok(TC_ACT_OK);
    }
    if ct6_is_expired(owner_entry, now) {
        ct6_delete(ct);
        return Ok(TC_ACT_OK);
    }
    ct6_update(owner, flow, ct_dir::REPLY, now);
    translate_reply(ctx, flow, ct)?;
    if flow.frag == frag::LATER {
        return pass(Counter::FragmentTranslated);
    }
    pass(Counter::ReplyTranslated)
}

#[inline(never)]
fn translate_reply(ctx: &TcContext, flow: &mut Ipv6Flow, ct: &Ct6Entry) -> Result<(), i32> {
    nat6_rewrite_src(ctx, flow, &ct.service_addr, ct.service_port)
        .map_err(|_| fail(Counter::RewriteFailed))?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        nat6_rewrite_dst(ctx, flow, &ct.client_addr, ct.client_port)
            .map_err(|_| fail(Counter::RewriteFailed))?;
    }
    Ok(())
}

#[inline(always)]
fn try_to_pod6(ctx: &TcContext) -> Verdict {
    let mut flow = Ipv6Flow::default();
    match parse_ipv6_flow_into(ctx, &mut flow) {
        Ok(()) => {}
        Err(Parse6Error::NotL4) => return icmp6_error_to_pod(ctx),
        Err(_) => return Ok(TC_ACT_OK),
    }
    to_pod_flow(ctx, &mut flow)
}

/// A packet to a pod (or, from `external6`, to the uplink): translated
/// back if it is a backend's reply.
#[inline(never)]
pub(crate) fn to_pod_flow(ctx: &TcContext, flow: &mut Ipv6Flow) -> Verdict {
    let Some(reply) = ct6_lookup_flow(flow, ct_dir::REPLY) else {
        return Ok(TC_ACT_OK);
    };
    if flow.frag == frag::FIRST {
        frag6_track(flow);
    }
    let ct = reply.entry();
    if ct.flags & ct_flags::HAIRPIN != 0 {
        // Hairpin replies are translated on the way out of the pod.
        return Ok(TC_ACT_OK);
    }
    reply_translate(ctx, flow, ct, skb::now_ns())
}

/// An ICMPv6 error about one of the client's translated flows is made about
/// the service; any other packet passes.
#[inline(never)]
fn icmp6_error_to_pod(ctx: &TcContext) -> Verdict {
    let Some(outer) = parse_ipv6_header(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let Some(error) = icmp6_error_flow(ctx, &outer) else {
        return Ok(TC_ACT_OK);
    };
    icmp6_reverse_translate(ctx, &error).map_err(|_| fail(Counter::RewriteFailed))?;
    pass(Counter::IcmpErrorTranslated)
}
