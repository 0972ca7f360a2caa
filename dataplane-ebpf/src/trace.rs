//! Packet tracing for `dataplane-agent monitor`: when `TRACE_CONFIG` says
//! so, each decision on a matching packet is reported on `TRACE_EVENTS`
//! with the tuple before and after translation. Off (the default) it costs
//! one array lookup and a branch per traced decision point.
//!
//! IPv6 decisions go on the same ring as [`TraceEvent6`] records, filtered
//! here by `TRACE_CONFIG`'s IPv6 addresses as IPv4 ones are by its IPv4
//! addresses (which stay where an IPv4 packet reads them: the IPv4 cost is
//! unchanged). An IPv6 packet's decision
//! is traced once, at the program's entry, after its pipeline returned
//! (see [`Packet6`]): a trace tail at every decision point, as IPv4 has,
//! took `from_pod` past the verifier's budget of 1M instructions.

use dataplane_common::{
    trace_families, Counter, Ipv6Bytes, Trace6Scratch, Trace6Tuple, TraceConfig, TraceEvent,
    TraceEvent6, TraceTuple,
};

use crate::{
    ctx::PacketCtx,
    maps::{count, TRACE6_SCRATCH, TRACE_CONFIG, TRACE_EVENTS},
    parse::Ipv4Flow,
    parse6::Ipv6Flow,
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

/// The trace configuration when IPv6 tracing is on (one `TRACE_CONFIG`
/// read).
#[inline(always)]
fn config6() -> Option<&'static TraceConfig> {
    TRACE_CONFIG
        .get(0)
        .filter(|config| config.enabled & trace_families::IPV6 != 0)
}

/// Whether each non-zero address of the IPv6 filter (`filter`) is one that
/// the decision `touches` (a source or destination, before or after
/// translation).
#[inline(always)]
fn passes6(filter: [&Ipv6Bytes; 2], touches: impl Fn(&Ipv6Bytes) -> bool) -> bool {
    filter
        .into_iter()
        .all(|addr| *addr == [0; 16] || touches(addr))
}

/// An IPv6 packet on its way through one program: where it was seen. The
/// IPv6 shape of the IPv4 `Packet`: the stages count their decision and
/// hand it up (in `pod6::Outcome`, whose `pass`, `drop` and `refuse` take
/// the counter and ids as `Packet`'s methods do) instead of tracing it
/// where it is made; the entry point traces it once ([`Packet6::finish`]),
/// after the pipeline returned, so the verifier meets one trace tail per
/// program rather than one per decision point. The tuple on arrival waits
/// in `TRACE6_SCRATCH`, not on the stack: the IPv6 paths' deepest call
/// chains are at the verifier's 512 bytes. Beside it wait the filter's
/// addresses and a mark that the packet is traced, so `TRACE_CONFIG` is
/// read once per packet (on arrival) and the trace reads the scratch slot:
/// off, tracing costs one array lookup per packet to a service and one per
/// traced decision (no flag is carried from one to the other on the stack:
/// a flag known on one path and not on the other would have the verifier
/// walk the whole pipeline twice). A packet marked on arrival whose
/// decision is not traced (a helper failure) leaves its mark to the next
/// traced decision on the CPU: if a monitor stopped in between, that is
/// one event nobody asked for.
pub struct Packet6 {
    hook: u8,
}

impl Packet6 {
    #[inline(always)]
    pub fn new(hook: u8) -> Self {
        Self { hook }
    }

    /// The packet's tuple as parsed, before any translation: kept, with
    /// the filter, when IPv6 tracing is on.
    #[inline(always)]
    pub fn arrived(&self, flow: &Ipv6Flow) {
        if let Some(config) = config6() {
            keep6(flow, config);
        }
    }

    /// Reports a decision (`decision`, a [`Counter`], with the flow's ids)
    /// if IPv6 tracing was on when the packet arrived and the filter kept
    /// then matches, with the tuple kept on arrival and the packet's as it
    /// leaves (`flow`).
    #[inline(always)]
    pub fn finish<C: PacketCtx>(
        &self,
        ctx: &C,
        decision: u8,
        ids: (u32, u32),
        proto: u8,
        flow: &Ipv6Flow,
    ) {
        if TRACE6_SCRATCH.get(0).is_some_and(|kept| kept.armed != 0) {
            let header = u32::from(self.hook) | u32::from(proto) << 8 | u32::from(decision) << 16;
            emit6_packet(ctx.ifindex(), header, ids.0, ids.1, flow);
        }
    }
}

/// Not inlined: the copy is made in a frame of its own, not in the entry
/// point's.
#[inline(never)]
fn keep6(flow: &Ipv6Flow, config: &TraceConfig) {
    if let Some(slot) = TRACE6_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the tc and XDP programs do not nest on
        // a CPU, and only they use it.
        unsafe {
            (*slot).before.src_addr = flow.src_addr;
            (*slot).before.dst_addr = flow.dst_addr;
            (*slot).before.src_port = flow.src_port;
            (*slot).before.dst_port = flow.dst_port;
            (*slot).addr_a = config.addr6_a;
            (*slot).addr_b = config.addr6_b;
            (*slot).armed = 1;
        }
    }
}

/// Writes an IPv6 record in place in the ring, one field at a time
/// (`tuples` writes the two tuples): a record built whole would be a
/// 112-byte value on the stack. A full ring drops the event, never the
/// packet.
#[inline(always)]
fn emit6(header: &Header6, tuples: impl FnOnce(&Tuples6)) {
    let Some(mut entry) = TRACE_EVENTS.reserve_untyped::<TraceEvent6>(0) else {
        count(Counter::TraceLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the record reserved above, ours alone until it is
    // submitted; every field is written through the raw pointer (no
    // reference to the uninitialised record is made), all are `Copy`, and
    // `tuples` writes every field of both tuples.
    unsafe {
        (*event).ts_ns = skb::now_ns();
        (*event).ifindex = header.ifindex;
        (*event).hook = header.hook;
        (*event).proto = header.proto;
        (*event).decision = header.decision;
        (*event).family = TraceEvent6::FAMILY;
        (*event).service_id = header.service_id;
        (*event).backend_id = header.backend_id;
        (*event).netns_cookie = header.netns_cookie;
        (*event).cgroup_id = header.cgroup_id;
        tuples(&Tuples6 {
            before: core::ptr::addr_of_mut!((*event).before),
            after: core::ptr::addr_of_mut!((*event).after),
        });
    }
    entry.submit(0);
}

/// The tuples of a record being written in the ring (`emit6`).
struct Tuples6 {
    before: *mut Trace6Tuple,
    after: *mut Trace6Tuple,
}

impl Tuples6 {
    /// `t` := `tuple`.
    #[inline(always)]
    fn set(t: *mut Trace6Tuple, tuple: &Trace6Tuple) {
        // SAFETY: `t` is one of the reserved record's tuples (`emit6`).
        unsafe { *t = *tuple };
    }

    /// `t` := the tuple of `flow`.
    #[inline(always)]
    fn flow(t: *mut Trace6Tuple, flow: &Ipv6Flow) {
        // SAFETY: as in `set`.
        unsafe {
            (*t).src_addr = flow.src_addr;
            (*t).dst_addr = flow.dst_addr;
            (*t).src_port = flow.src_port;
            (*t).dst_port = flow.dst_port;
        }
    }

    /// `t` := a tuple of one side (the destination when `dst`, else the
    /// source), the other zero.
    #[inline(always)]
    fn side(t: *mut Trace6Tuple, dst: bool, addr: &Ipv6Bytes, port: u16) {
        // SAFETY: as in `set`.
        unsafe {
            (*t).src_addr = if dst { [0; 16] } else { *addr };
            (*t).dst_addr = if dst { *addr } else { [0; 16] };
            (*t).src_port = if dst { 0 } else { port };
            (*t).dst_port = if dst { port } else { 0 };
        }
    }
}

/// The fields of a [`TraceEvent6`] before its tuples.
struct Header6 {
    ifindex: u32,
    hook: u8,
    proto: u8,
    decision: u8,
    service_id: u32,
    backend_id: u32,
    netns_cookie: u64,
    cgroup_id: u64,
}

/// Not inlined: one copy of the tail per program. Plain numbers as
/// arguments (`header`: hook, protocol and decision bytes), nothing built
/// on the caller's stack.
#[inline(never)]
fn emit6_packet(ifindex: u32, header: u32, service_id: u32, backend_id: u32, flow: &Ipv6Flow) {
    let Some(slot) = TRACE6_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, as in `keep6`; the packet's trace ends its
    // mark.
    let kept: &Trace6Scratch = unsafe {
        (*slot).armed = 0;
        &*slot
    };
    let before = &kept.before;
    let touches = |addr: &Ipv6Bytes| {
        before.src_addr == *addr
            || before.dst_addr == *addr
            || flow.src_addr == *addr
            || flow.dst_addr == *addr
    };
    if !passes6([&kept.addr_a, &kept.addr_b], touches) {
        return;
    }
    let header = Header6 {
        ifindex,
        hook: header as u8,
        proto: (header >> 8) as u8,
        decision: (header >> 16) as u8,
        service_id,
        backend_id,
        netns_cookie: 0,
        cgroup_id: 0,
    };
    emit6(&header, |t| {
        Tuples6::set(t.before, before);
        Tuples6::flow(t.after, flow);
    });
}

/// What an IPv6 socket hook did to the one address it rewrites: the
/// destination (`connect6`, `sendmsg6`) or the source (`recvmsg6`,
/// `getpeername6`), from `before` to `after`. References, so no tuple is
/// built on the hook's stack (its frame and the lookups' are near the
/// verifier's 512 bytes).
pub struct Sock6Decision<'a> {
    pub hook: u8,
    pub decision: Counter,
    pub proto: u8,
    /// Whether the destination (else the source) was rewritten.
    pub forward: bool,
    pub service_id: u32,
    pub backend_id: u32,
    pub before: (&'a Ipv6Bytes, u16),
    pub after: (&'a Ipv6Bytes, u16),
}

/// Counts an IPv6 socket hook's `decision` and reports it (when IPv6
/// tracing is on and the filter matches) with the socket's network
/// namespace and the caller's cgroup.
#[inline(always)]
pub fn record6_sock(sock: &SockAddr, decision: &Sock6Decision) {
    count(decision.decision);
    let Some(config) = config6() else {
        return;
    };
    // Compared in place, in the map value and the hook's addresses (the
    // filter handed to `emit6_sock` would be passed in more registers
    // than a BPF call has).
    let touches = |addr: &Ipv6Bytes| *decision.before.0 == *addr || *decision.after.0 == *addr;
    if passes6([&config.addr6_a, &config.addr6_b], touches) {
        emit6_sock(sock, decision);
    }
}

#[inline(never)]
fn emit6_sock(sock: &SockAddr, decision: &Sock6Decision) {
    let header = Header6 {
        ifindex: 0,
        hook: decision.hook,
        proto: decision.proto,
        decision: decision.decision as u8,
        service_id: decision.service_id,
        backend_id: decision.backend_id,
        netns_cookie: sock.netns_cookie(),
        cgroup_id: sock_ctx::cgroup_id(),
    };
    emit6(&header, |t| {
        let (addr, port) = decision.before;
        Tuples6::side(t.before, decision.forward, addr, port);
        let (addr, port) = decision.after;
        Tuples6::side(t.after, decision.forward, addr, port);
    });
}
