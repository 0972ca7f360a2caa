//! tc programs of the service dataplane.
//!
//! `from_pod` runs on tc ingress of a pod's host-side interface (packets the
//! pod sends): service DNAT, conntrack, rejects, hairpin replies.
//! `to_pod` runs on tc egress of the same interface (packets to the pod):
//! reverse translation of backend replies to the service address.
//!
//! Pipeline: parse -> service IP filter -> conntrack -> service lookup ->
//! backend selection -> conntrack create -> NAT rewrite. Every outcome is an
//! explicit verdict; every drop or reject has a counter.
#![no_std]
#![no_main]

mod conntrack;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod skb;
mod trace;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, service_flags, trace_hook, Counter, CtEntry, TraceTuple,
    IPPROTO_TCP,
};

use crate::{
    conntrack::{ct4_create, ct4_delete, ct4_is_reopen, ct4_key, ct4_lookup, ct4_update},
    icmp::{icmp4_error_flow, icmp4_reverse_translate},
    lb::{lb4_is_service_ip, lb4_lookup_backend, lb4_lookup_service, lb4_select_backend},
    maps::count,
    nat::{nat4_rewrite_dst, nat4_rewrite_src},
    parse::{parse_ipv4_flow, parse_ipv4_header, Ipv4Flow, ParseError, TCP_RST},
    reject::{reject4_icmp_port_unreachable, reject4_tcp_reset},
    trace::{trace, tuple, Decision},
};

/// Reports a decision on `flow` (as it is now, after any rewrite) to
/// `monitor`, when tracing is on.
#[inline(always)]
fn trace_flow(
    ctx: &TcContext,
    hook: u8,
    decision: Counter,
    before: TraceTuple,
    flow: &Ipv4Flow,
    service_id: u32,
    backend_id: u32,
) {
    trace(
        ctx,
        &Decision {
            hook,
            decision,
            proto: flow.proto,
            service_id,
            backend_id,
            before,
            after: tuple(flow),
        },
    );
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    try_from_pod(&ctx).unwrap_or_else(|verdict| verdict)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    try_to_pod(&ctx).unwrap_or_else(|verdict| verdict)
}

/// The error side carries the verdict for packets that cannot go on as they
/// are (half-rewritten, or refused).
type Verdict = Result<i32, i32>;

fn drop_with(counter: Counter) -> i32 {
    count(counter);
    TC_ACT_SHOT
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Verdict {
    let mut flow = match parse_ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(ParseError::NotIpv4L4) => return Ok(TC_ACT_OK),
        Err(ParseError::Malformed { dst_addr }) => {
            if dst_addr != 0 && lb4_is_service_ip(dst_addr) {
                count(Counter::Malformed);
                let to = TraceTuple {
                    dst_addr,
                    ..TraceTuple::default()
                };
                trace(
                    ctx,
                    &Decision {
                        hook: trace_hook::FROM_POD,
                        decision: Counter::Malformed,
                        proto: 0,
                        service_id: 0,
                        backend_id: 0,
                        before: to,
                        after: to,
                    },
                );
            }
            return Ok(TC_ACT_OK);
        }
    };
    if !lb4_is_service_ip(flow.dst_addr) {
        return Ok(TC_ACT_OK);
    }
    let now = skb::now_ns();
    let before = tuple(&flow);

    if let Some(entry) = ct4_lookup(&ct4_key(&flow, ct_dir::ORIGINAL)) {
        // SAFETY: copied out of the map value at once.
        let ct = unsafe { *entry };
        let expired = ct.is_expired(now) || ct4_is_reopen(&ct, &flow);
        let backend_alive = lb4_lookup_backend(ct.backend_id)
            .is_some_and(|b| b.addr == ct.backend_addr && b.port == ct.backend_port);
        if !expired && backend_alive {
            count(Counter::Established);
            ct4_update(entry, &flow, ct_dir::ORIGINAL, now);
            let verdict = forward_established(ctx, &mut flow, &ct)?;
            trace_flow(
                ctx,
                trace_hook::FROM_POD,
                Counter::Established,
                before,
                &flow,
                ct.service_id,
                ct.backend_id,
            );
            return Ok(verdict);
        }
        ct4_delete(&ct);
        if !expired && flow.proto == IPPROTO_TCP {
            // The backend is gone: its connection state is lost with it, so
            // the client is told at once instead of timing out.
            count(Counter::ResetBackendGone);
            trace_flow(
                ctx,
                trace_hook::FROM_POD,
                Counter::ResetBackendGone,
                before,
                &flow,
                ct.service_id,
                ct.backend_id,
            );
            return tcp_reset_unless_reset(ctx, &flow);
        }
        if !expired {
            count(Counter::UdpFlowMoved);
        }
    } else if let Some(entry) = ct4_lookup(&ct4_key(&flow, ct_dir::REPLY)) {
        // Reply of a hairpinned flow: the backend answers the service IP,
        // which stands for the client (itself).
        // SAFETY: copied out of the map value at once.
        let ct = unsafe { *entry };
        return reply_translate(ctx, trace_hook::FROM_POD, &mut flow, &ct, now);
    }

    new_flow(ctx, &mut flow, now)
}

#[inline(always)]
fn new_flow(ctx: &TcContext, flow: &mut Ipv4Flow, now: u64) -> Verdict {
    let before = tuple(flow);
    let Some(service) = lb4_lookup_service(flow) else {
        count(Counter::UnknownPort);
        trace_flow(
            ctx,
            trace_hook::FROM_POD,
            Counter::UnknownPort,
            before,
            flow,
            0,
            0,
        );
        return Ok(TC_ACT_OK);
    };
    let Some(selected) = lb4_select_backend(&service, flow.src_addr, now) else {
        if service.flags & service_flags::DROP_NO_LOCAL_ENDPOINTS != 0 {
            let decision = Counter::DropNoLocalEndpoints;
            trace_flow(
                ctx,
                trace_hook::FROM_POD,
                decision,
                before,
                flow,
                service.service_id,
                0,
            );
            return Err(drop_with(decision));
        }
        count(Counter::RejectNoEndpoints);
        let decision = Counter::RejectNoEndpoints;
        trace_flow(
            ctx,
            trace_hook::FROM_POD,
            decision,
            before,
            flow,
            service.service_id,
            0,
        );
        if flow.proto == IPPROTO_TCP {
            return tcp_reset_unless_reset(ctx, flow);
        }
        return reject4_icmp_port_unreachable(ctx, flow)
            .map_err(|_| drop_with(Counter::RejectFailed));
    };
    if selected.by_affinity {
        count(Counter::AffinityHit);
    }
    let (backend_id, backend) = (selected.backend_id, selected.backend);
    let hairpin = backend.addr == flow.src_addr;
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        client_addr: flow.src_addr,
        service_addr: flow.dst_addr,
        backend_addr: backend.addr,
        client_port: flow.src_port,
        service_port: flow.dst_port,
        backend_port: backend.port,
        proto: flow.proto,
        state: ct_state::OPENING,
        backend_id,
        service_id: service.service_id,
        flags: if hairpin { ct_flags::HAIRPIN } else { 0 },
        _pad: [0; 3],
    };
    let Ok(ct) = ct4_create(&entry) else {
        return Err(drop_with(Counter::CtInsertFailed));
    };
    count(Counter::NewFlow);
    let verdict = forward_established(ctx, flow, &ct)?;
    let decision = if selected.by_affinity {
        Counter::AffinityHit
    } else {
        Counter::NewFlow
    };
    trace_flow(
        ctx,
        trace_hook::FROM_POD,
        decision,
        before,
        flow,
        ct.service_id,
        ct.backend_id,
    );
    Ok(verdict)
}

/// Answers a TCP segment with a RST, except a RST itself, which is never
/// answered (RFC 9293 3.10.7.1; iptables' REJECT behaves the same): it is
/// dropped, its reason already counted by the caller.
#[inline(always)]
fn tcp_reset_unless_reset(ctx: &TcContext, flow: &Ipv4Flow) -> Verdict {
    if flow.tcp_flags & TCP_RST != 0 {
        return Err(TC_ACT_SHOT);
    }
    reject4_tcp_reset(ctx, flow).map_err(|_| drop_with(Counter::RejectFailed))
}

/// Client -> service packet of a known flow: DNAT to its backend, and in a
/// hairpin flow SNAT to the service IP so the pod does not get a packet from
/// its own address (which it would drop as a martian).
#[inline(always)]
fn forward_established(ctx: &TcContext, flow: &mut Ipv4Flow, ct: &CtEntry) -> Verdict {
    if ct.flags & ct_flags::HAIRPIN != 0 {
        nat4_rewrite_src(ctx, flow, ct.service_addr, flow.src_port)
            .map_err(|_| drop_with(Counter::RewriteFailed))?;
    }
    nat4_rewrite_dst(ctx, flow, ct.backend_addr, ct.backend_port)
        .map_err(|_| drop_with(Counter::RewriteFailed))?;
    Ok(TC_ACT_OK)
}

/// Backend -> client packet: the source becomes the service again.
#[inline(always)]
fn reply_translate(
    ctx: &TcContext,
    hook: u8,
    flow: &mut Ipv4Flow,
    ct: &CtEntry,
    now: u64,
) -> Verdict {
    let before = tuple(flow);
    let original = ct.original_key();
    let Some(owner) = ct4_lookup(&original) else {
        // The flow is gone (expired, evicted, or its backend removed): its
        // reply entry is stale.
        ct4_delete(ct);
        return Ok(TC_ACT_OK);
    };
    // SAFETY: read of a live map value.
    if unsafe { (*owner).is_expired(now) } {
        ct4_delete(ct);
        return Ok(TC_ACT_OK);
    }
    ct4_update(owner, flow, ct_dir::REPLY, now);
    count(Counter::ReplyTranslated);
    nat4_rewrite_src(ctx, flow, ct.service_addr, ct.service_port)
        .map_err(|_| drop_with(Counter::RewriteFailed))?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        nat4_rewrite_dst(ctx, flow, ct.client_addr, ct.client_port)
            .map_err(|_| drop_with(Counter::RewriteFailed))?;
    }
    trace_flow(
        ctx,
        hook,
        Counter::ReplyTranslated,
        before,
        flow,
        ct.service_id,
        ct.backend_id,
    );
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Verdict {
    let mut flow = match parse_ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(ParseError::NotIpv4L4) => return icmp_error_to_pod(ctx),
        Err(_) => return Ok(TC_ACT_OK),
    };
    let Some(entry) = ct4_lookup(&ct4_key(&flow, ct_dir::REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: copied out of the map value at once.
    let ct = unsafe { *entry };
    if ct.flags & ct_flags::HAIRPIN != 0 {
        // Hairpin replies are translated on the way out of the pod.
        return Ok(TC_ACT_OK);
    }
    reply_translate(ctx, trace_hook::TO_POD, &mut flow, &ct, skb::now_ns())
}

/// An ICMP error about one of the client's translated flows is made about
/// the service, as its replies are; any other packet passes.
#[inline(always)]
fn icmp_error_to_pod(ctx: &TcContext) -> Verdict {
    let Some(outer) = parse_ipv4_header(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let Some(error) = icmp4_error_flow(ctx, &outer) else {
        return Ok(TC_ACT_OK);
    };
    icmp4_reverse_translate(ctx, &error).map_err(|_| drop_with(Counter::RewriteFailed))?;
    count(Counter::IcmpErrorTranslated);
    let before = TraceTuple {
        src_addr: outer.src_addr,
        dst_addr: outer.dst_addr,
        ..TraceTuple::default()
    };
    let ct = &error.ct;
    let after = TraceTuple {
        src_addr: if outer.src_addr == ct.backend_addr {
            ct.service_addr
        } else {
            outer.src_addr
        },
        ..before
    };
    trace(
        ctx,
        &Decision {
            hook: trace_hook::TO_POD,
            decision: Counter::IcmpErrorTranslated,
            proto: outer.proto,
            service_id: ct.service_id,
            backend_id: ct.backend_id,
            before,
            after,
        },
    );
    Ok(TC_ACT_OK)
}

/// Reference for benchmarks, never attached: parses like `from_pod` and does
/// one hash lookup. The floor every datapath figure is compared against.
#[classifier]
pub fn bench_floor(ctx: TcContext) -> i32 {
    // Distinct verdicts keep the lookup from being optimised away.
    match parse_ipv4_flow(&ctx) {
        Ok(flow) if lb4_is_service_ip(flow.dst_addr) => TC_ACT_OK,
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
