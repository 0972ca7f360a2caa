//! Packet tracing for `dataplane-agent monitor`: when `TRACE_CONFIG` says
//! so, each decision on a matching packet is reported on `TRACE_EVENTS`
//! with the tuple before and after translation. Off (the default) it costs
//! one array lookup and a branch per traced decision point.

use dataplane_common::{trace_families, Counter, TraceEvent, TraceTuple};

use crate::{
    ctx::PacketCtx,
    maps::{count, TRACE_CONFIG, TRACE_EVENTS},
    parse::Ipv4Flow,
    skb,
    sock_ctx::{self, SockAddr},
};

#[inline(always)]
pub fn tuple(flow: &Ipv4Flow) -> TraceTuple {
    TraceTuple {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
    }
}

#[inline(always)]
fn touches(t: &TraceTuple, addr: u32) -> bool {
    t.src_addr == addr || t.dst_addr == addr
}

/// What a trace point knows about the packet's flow.
pub struct Decision {
    pub hook: u8,
    pub decision: Counter,
    pub proto: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub before: TraceTuple,
    pub after: TraceTuple,
}

/// Whether tracing is on and `decision` matches the filter.
#[inline(always)]
fn wanted(decision: &Decision) -> bool {
    let Some(config) = TRACE_CONFIG.get(0) else {
        return false;
    };
    if config.enabled & trace_families::IPV4 == 0 {
        return false;
    }
    for addr in [config.addr_a, config.addr_b] {
        if addr != 0 && !touches(&decision.before, addr) && !touches(&decision.after, addr) {
            return false;
        }
    }
    true
}

/// Reports a packet's `decision` if tracing is on and it matches the filter.
#[inline(always)]
pub fn trace<C: PacketCtx>(ctx: &C, decision: &Decision) {
    if wanted(decision) {
        emit(decision, ctx.ifindex(), 0, 0);
    }
}

/// Reports a socket hook's `decision`, with the socket's network namespace
/// and the caller's cgroup.
#[inline(always)]
pub fn trace_sock(sock: &SockAddr, decision: &Decision) {
    if wanted(decision) {
        emit(decision, 0, sock.netns_cookie(), sock_ctx::cgroup_id());
    }
}

#[inline(always)]
fn emit(decision: &Decision, ifindex: u32, netns_cookie: u64, cgroup_id: u64) {
    // Written in place in the ring (no copy on the stack). A full ring
    // drops the event, never the packet.
    let Some(mut entry) = TRACE_EVENTS.reserve(0) else {
        count(Counter::TraceLost);
        return;
    };
    entry.write(TraceEvent {
        ts_ns: skb::now_ns(),
        ifindex,
        hook: decision.hook,
        proto: decision.proto,
        decision: decision.decision as u8,
        _pad: 0,
        service_id: decision.service_id,
        backend_id: decision.backend_id,
        before: decision.before,
        after: decision.after,
        netns_cookie,
        cgroup_id,
    });
    entry.submit(0);
}
