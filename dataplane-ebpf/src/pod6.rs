//! `from_pod` and `to_pod` for IPv6: the pipeline of the IPv4 path (parse
//! -> service IP filter -> conntrack -> service lookup -> backend selection
//! -> conntrack create -> NAT rewrite) on the `LB6_*` and `CT6_*` maps, with
//! the same verdicts and counters. The entry points are not inlined, so the
//! IPv4 path's stack frame stays as it was and this one gets its own.
//!
//! Each decision is traced (`trace6`) where the packet's way ends, at the
//! top of the call chain: the stages hand their decision up in `Outcome`.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, service_ip_flags, trace_hook, Counter, Ct6Entry, Trace6Tuple,
    IPPROTO_TCP,
};

use crate::{
    conntrack::CtCreateError,
    conntrack6::{
        ct6_create, ct6_delete, ct6_delete_reply, ct6_is_expired, ct6_is_reopen, ct6_lookup,
        ct6_lookup_flow, ct6_owns_reply, ct6_restore_reply, ct6_update,
    },
    fail,
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
    skb,
    trace::{trace6, tuple6, Decision6},
    Verdict,
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

/// The frame's destination, if it is a service IP (or node address).
#[inline(always)]
fn service_dst(ctx: &TcContext) -> Option<Trace6Tuple> {
    let dst_addr = ipv6_dst(ctx)?;
    lb6_service_ip(&dst_addr)?;
    Some(Trace6Tuple {
        dst_addr,
        ..Trace6Tuple::default()
    })
}

/// Counts and traces a decision about a packet that was not parsed to its
/// ports: only its destination is known.
#[inline(never)]
fn record_unparsed(ctx: &TcContext, decision: Counter, dst: &Trace6Tuple) {
    count(decision);
    trace_decision(
        ctx,
        trace_hook::FROM_POD,
        dst,
        dst,
        0,
        &Outcome::decided(Ok(TC_ACT_OK), decision, Ids::default()),
    );
}

/// The flow a decision is about, for the trace.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Ids {
    service_id: u32,
    backend_id: u32,
}

impl Ids {
    #[inline(always)]
    fn of(ct: &Ct6Entry) -> Self {
        Self {
            service_id: ct.service_id,
            backend_id: ct.backend_id,
        }
    }

    #[inline(always)]
    fn service(service_id: u32) -> Self {
        Self {
            service_id,
            backend_id: 0,
        }
    }
}

/// Reports `outcome`'s decision (if it has one) to `monitor`, with the
/// packet's tuple on arrival and as it leaves.
#[inline(always)]
fn trace_decision(
    ctx: &TcContext,
    hook: u8,
    before: &Trace6Tuple,
    after: &Trace6Tuple,
    proto: u8,
    outcome: &Outcome,
) {
    if outcome.traced == 0 {
        return;
    }
    trace6(
        ctx,
        &Decision6 {
            hook,
            decision: outcome.decision,
            proto,
            service_id: outcome.ids.service_id,
            backend_id: outcome.ids.backend_id,
            before,
            after,
        },
    );
}

/// What a stage decided: a verdict, or that the client is answered at once
/// (done at the top of the call chain, where the stack has room for
/// building the answer), or (`known_flow`) that the packet starts a new
/// flow; and the decision to trace, if any. A plain struct: a
/// data-carrying enum crossing a BPF function call can get a BTF layout the
/// kernel refuses.
#[repr(C)]
#[derive(Clone, Copy)]
struct Outcome {
    verdict: i32,
    /// One of the `next` values.
    next: u32,
    /// The counter of a refusal, or of the decision that is traced.
    decision: Counter,
    /// 1 when `decision` is to be traced (0: a helper failure, or a packet
    /// that is no service's).
    traced: u32,
    ids: Ids,
}

mod next {
    pub const DONE: u32 = 0;
    pub const REFUSE: u32 = 1;
    pub const NEW_FLOW: u32 = 2;
}

impl Outcome {
    /// A verdict with no decision to trace.
    #[inline(always)]
    fn done(verdict: Verdict) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            decision: Counter::NewFlow,
            traced: 0,
            ids: Ids::default(),
        }
    }

    /// A verdict and the decision it was, counted already.
    #[inline(always)]
    fn decided(verdict: Verdict, decision: Counter, ids: Ids) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            decision,
            traced: 1,
            ids,
        }
    }

    /// The packet goes on, counted under `decision`.
    #[inline(always)]
    fn pass(decision: Counter, ids: Ids) -> Self {
        count(decision);
        Self::decided(Ok(TC_ACT_OK), decision, ids)
    }

    /// The packet is dropped, counted under `decision`.
    #[inline(always)]
    fn drop(decision: Counter, ids: Ids) -> Self {
        count(decision);
        Self::decided(Err(TC_ACT_SHOT), decision, ids)
    }

    /// The client is answered at once (counted by `refuse`).
    #[inline(always)]
    fn refuse(refusal: Counter, ids: Ids) -> Self {
        Self {
            verdict: TC_ACT_SHOT,
            next: next::REFUSE,
            decision: refusal,
            traced: 1,
            ids,
        }
    }

    #[inline(always)]
    fn new_flow() -> Self {
        Self::done(Ok(TC_ACT_OK)).with_next(next::NEW_FLOW)
    }

    #[inline(always)]
    fn with_next(self, next: u32) -> Self {
        Self { next, ..self }
    }
}

/// Answers the client at once: a RST for TCP (never for a RST), an ICMPv6
/// port unreachable otherwise.
#[inline(never)]
fn refuse(ctx: &TcContext, decision: Counter, flow: &Ipv6Flow) -> Verdict {
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
            if let Some(dst) = service_dst(ctx) {
                record_unparsed(ctx, Counter::Malformed, &dst);
            }
            return Ok(TC_ACT_OK);
        }
        Err(Parse6Error::PastBound) => {
            if let Some(dst) = service_dst(ctx) {
                record_unparsed(ctx, Counter::Ipv6ExtHeadersPastBound, &dst);
            }
            return Ok(TC_ACT_OK);
        }
        Err(Parse6Error::UnknownFragment) => {
            if service_dst(ctx).is_none() {
                return Ok(TC_ACT_OK);
            }
            // Sent on untranslated it would go to the service IP, nowhere.
            count(Counter::FragmentUnknown);
            return Err(TC_ACT_SHOT);
        }
    }
    let Some(ip_value) = lb6_service_ip(&flow.dst_addr) else {
        return Ok(TC_ACT_OK);
    };
    let before = tuple6(&flow);
    let outcome = pod_flow(ctx, &mut flow, ip_value);
    let after = tuple6(&flow);
    trace_decision(
        ctx,
        trace_hook::FROM_POD,
        &before,
        &after,
        flow.proto,
        &outcome,
    );
    if outcome.next == next::REFUSE {
        return refuse(ctx, outcome.decision, &flow);
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
        return reply_translate(ctx, flow, reply.entry(), now);
    }
    if flow.frag == frag::LATER {
        return Outcome::drop(Counter::FragmentUnknown, Ids::default());
    }
    new_flow(ctx, flow, now, ip_value)
}

/// A packet of a tracked flow: forwarded to its backend, refused (its
/// backend is gone), or to be taken as a new flow (expired, or a UDP flow
/// whose backend is gone).
#[inline(never)]
fn known_flow(ctx: &TcContext, flow: &mut Ipv6Flow, slot: Ct6Slot, now: u64) -> Outcome {
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
        return Outcome::pass(decision, Ids::of(ct));
    }
    if flow.frag == frag::LATER {
        // The rest of a datagram whose flow ended.
        return Outcome::drop(Counter::FragmentUnknown, Ids::of(ct));
    }
    let ids = Ids::of(ct);
    ct6_delete(ct);
    if !expired && flow.proto == IPPROTO_TCP {
        // The backend is gone, and its connection state with it: the
        // client is told at once instead of timing out.
        return Outcome::refuse(Counter::ResetBackendGone, ids);
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
        return Outcome::pass(Counter::UnknownPort, Ids::default());
    };
    let ids = Ids::service(service.service_id);
    if !lb6_source_allowed(&service) {
        return Outcome::drop(Counter::DropSourceRange, ids);
    }
    let mut selected = Selected6::default();
    match lb6_choose_backend(&service, &flow.src_addr, now, &mut selected) {
        Choice6::Backend => {}
        Choice6::NoLocalEndpoints => return Outcome::drop(Counter::DropNoLocalEndpoints, ids),
        Choice6::NoEndpoints => return Outcome::refuse(Counter::RejectNoEndpoints, ids),
    }
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
        service_id: service.service_id,
        backend_id: selected.backend_id,
        _pad1: 0,
    };
    match ct6_create(&mut entry, now) {
        Ok(()) => {}
        Err(CtCreateError::ReplyClash) => {
            return Outcome::drop(Counter::ReplyTupleClash, Ids::of(&entry))
        }
        Err(CtCreateError::InsertFailed) => {
            return Outcome::done(Err(fail(Counter::CtInsertFailed)))
        }
    }
    if let Err(verdict) = forward_established(ctx, flow, &entry) {
        return Outcome::done(Err(verdict));
    }
    if selected.by_affinity {
        // Counted as a new flow too; traced as the affinity hit it is.
        count(Counter::NewFlow);
        return Outcome::pass(Counter::AffinityHit, Ids::of(&entry));
    }
    Outcome::pass(Counter::NewFlow, Ids::of(&entry))
}

/// Client -> service packet of a known flow: DNAT to its backend, and in a
/// hairpin flow SNAT to the service address (the pod would drop a packet
/// from its own address).
#[inline(never)]
fn forward_established(ctx: &TcContext, flow: &mut Ipv6Flow, ct: &Ct6Entry) -> Result<(), i32> {
    if ct.flags & ct_flags::HAIRPIN != 0 {
        let port = flow.src_port;
        nat6_rewrite_src(ctx, flow, &ct.service_addr, port)
            .map_err(|_| fail(Counter::RewriteFailed))?;
    }
    nat6_rewrite_dst(ctx, flow, &ct.backend_addr, ct.backend_port)
        .map_err(|_| fail(Counter::RewriteFailed))
}

/// Backend -> client packet: the source becomes the service again (and in
/// a hairpin flow the destination the client).
#[inline(never)]
fn reply_translate(ctx: &TcContext, flow: &mut Ipv6Flow, ct: &Ct6Entry, now: u64) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let Some(owner) = ct6_lookup(&ct.original_key()) else {
        // The flow is gone: its reply entry is stale.
        ct6_delete(ct);
        return untouched;
    };
    let owner_entry = owner.entry();
    if !ct6_owns_reply(owner_entry, ct) {
        // Left over from an earlier flow of this client tuple.
        ct6_delete_reply(ct);
        return untouched;
    }
    if ct6_is_expired(owner_entry, now) {
        ct6_delete(ct);
        return untouched;
    }
    ct6_update(owner, flow, ct_dir::REPLY, now);
    if let Err(verdict) = translate_reply(ctx, flow, ct) {
        return Outcome::done(Err(verdict));
    }
    let decision = if flow.frag == frag::LATER {
        Counter::FragmentTranslated
    } else {
        Counter::ReplyTranslated
    };
    Outcome::pass(decision, Ids::of(ct))
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
    let before = tuple6(&flow);
    let outcome = to_pod_flow(ctx, &mut flow);
    let after = tuple6(&flow);
    trace_decision(
        ctx,
        trace_hook::TO_POD,
        &before,
        &after,
        flow.proto,
        &outcome,
    );
    Ok(outcome.verdict)
}

/// A packet to a pod: translated back if it is a backend's reply.
#[inline(never)]
fn to_pod_flow(ctx: &TcContext, flow: &mut Ipv6Flow) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let Some(reply) = ct6_lookup_flow(flow, ct_dir::REPLY) else {
        return untouched;
    };
    if flow.frag == frag::FIRST {
        frag6_track(flow);
    }
    let ct = reply.entry();
    if ct.flags & ct_flags::HAIRPIN != 0 {
        // Hairpin replies are translated on the way out of the pod.
        return untouched;
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
    count(Counter::IcmpErrorTranslated);
    let ct = &error.ct;
    let before = Trace6Tuple {
        src_addr: error.outer_src,
        dst_addr: outer.dst_addr,
        ..Trace6Tuple::default()
    };
    let after = Trace6Tuple {
        src_addr: if error.outer_src == ct.backend_addr {
            ct.service_addr
        } else {
            error.outer_src
        },
        ..before
    };
    let outcome = Outcome::decided(Ok(TC_ACT_OK), Counter::IcmpErrorTranslated, Ids::of(ct));
    trace_decision(
        ctx,
        trace_hook::TO_POD,
        &before,
        &after,
        outer.next_header,
        &outcome,
    );
    Ok(TC_ACT_OK)
}
