//! `from_pod` and `to_pod` for IPv6: the pipeline of the IPv4 path (parse
//! -> service IP filter -> conntrack -> service lookup -> backend selection
//! -> conntrack create -> NAT rewrite) on the `LB6_*` and `CT6_*` maps, with
//! the same verdicts and counters. The entry points are not inlined, so the
//! IPv4 path's stack frame stays as it was and this one gets its own.
//!
//! Each stage counts its decision and hands it up in its `Outcome`; the
//! entry points trace it once (`Packet6::finish`), after the pipeline
//! returned: a tracing tail on every decision (as the IPv4 path has) took
//! `from_pod` past the verifier's budget of 1M instructions.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use dataplane_common::{
    backend_flags, ct_dir, ct_flags, ct_state, service_ip_flags, trace_hook, Counter, Ct6Entry,
    IPPROTO_TCP,
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
        lb6_choose_backend, lb6_flow_to_backend, lb6_lookup_backend, lb6_lookup_frontend,
        lb6_may_be_node_port_reply, lb6_may_be_reply, lb6_service_ip, lb6_source_allowed, Choice6,
        Selected6,
    },
    maps::{count, Ct6Slot},
    nat6::{nat6_rewrite_dst, nat6_rewrite_src},
    parse::{frag, TCP_RST},
    parse6::{ipv6_dst, parse_ipv6_flow_into, parse_ipv6_header, Ipv6Flow, Parse6Error},
    redirect6::{redirect6_enabled, redirect6_learn_backend},
    reject6::{reject6_icmp_port_unreachable, reject6_tcp_reset},
    skb,
    trace::Packet6,
    Verdict,
};

/// `from_pod` for an IPv6 frame. The pipeline is a call of its own, so
/// its decisions reach the one trace tail here as values the compiler
/// cannot fold (a tail copied into every decision path is what the
/// verifier's budget cannot take).
#[inline(never)]
pub fn from_pod6(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    let packet = Packet6::new(trace_hook::FROM_POD);
    let outcome = try_from_pod6(ctx, &mut flow, &packet);
    // Worked out before the trace, so only the verdict is kept across its
    // call (one more value there is past the verifier's 512 bytes of
    // stack on the new-flow path).
    let verdict = if redirect6_enabled() && outcome.to_backend() && flow.frag == frag::NONE {
        // Sent on by `redirect6_to_backend`, called by `from_pod` after
        // this returned: the two frames together are past 512 bytes too.
        crate::TO_BACKEND
    } else {
        outcome.verdict()
    };
    outcome.trace(ctx, &packet, &flow);
    verdict
}

/// `to_pod` for an IPv6 frame; traced as `from_pod6` is.
#[inline(never)]
pub fn to_pod6(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    let packet = Packet6::new(trace_hook::TO_POD);
    let outcome = try_to_pod6(ctx, &mut flow, &packet);
    outcome.trace(ctx, &packet, &flow);
    outcome.verdict()
}

/// A frame that could not be parsed to its ports (`decision`): counted and
/// traced with its destination when that is a service IP (or node
/// address).
#[inline(always)]
fn unparsed(ctx: &TcContext, flow: &mut Ipv6Flow, packet: &Packet6, decision: Counter) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let Some(dst_addr) = ipv6_dst(ctx) else {
        return untouched;
    };
    if lb6_service_ip(&dst_addr).is_none() {
        return untouched;
    }
    *flow = Ipv6Flow {
        dst_addr,
        ..Ipv6Flow::default()
    };
    packet.arrived(flow);
    Outcome::pass(decision, Ids::NONE)
}

#[inline(always)]
pub(crate) fn drop(decision: Counter) -> Verdict {
    drop_as::<TcContext>(decision)
}

/// [`drop`] with the verdict of context `C` (the stages `external6` runs
/// on XDP too).
#[inline(always)]
pub(crate) fn drop_as<C: PacketCtx>(decision: Counter) -> Verdict {
    count(decision);
    Err(C::DROP)
}

/// The flow a decision is about, for the trace.
#[derive(Clone, Copy)]
pub(crate) struct Ids {
    pub service_id: u32,
    pub backend_id: u32,
}

impl Ids {
    pub const NONE: Self = Self::new(0, 0);

    #[inline(always)]
    pub const fn new(service_id: u32, backend_id: u32) -> Self {
        Self {
            service_id,
            backend_id,
        }
    }

    #[inline(always)]
    pub fn of(ct: &Ct6Entry) -> Self {
        Self::new(ct.service_id, ct.backend_id)
    }

    #[inline(always)]
    pub fn service(service_id: u32) -> Self {
        Self::new(service_id, 0)
    }
}

/// What a stage decided: a verdict, or that the client is answered at once
/// (done at the top of the call chain, where the stack has room for
/// building the answer), or (`known_flow`) that the packet starts a new
/// flow; and the decision to trace, if any. The constructors are the IPv6
/// shape of the IPv4 `Packet` methods (`pass`, `drop`, `refuse`), each with
/// the counter and ids. A plain struct: a data-carrying enum crossing a
/// BPF function call can get a BTF layout the kernel refuses. Words, not
/// bytes: the verifier knows the constants a stage stores in 4-byte stack
/// words, not in single bytes, and without them it walks every stage's
/// continuation after every other's.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Outcome {
    /// The verdict (`TC_ACT_*`).
    verdict: i32,
    /// One of the `next` values.
    pub next: u32,
    /// The [`Counter`] of the decision (for `next::REFUSE`, of the
    /// refusal), or [`UNTRACED`]: a packet that is no service's, or a
    /// helper failure (counted only, as on IPv4).
    decision: u32,
    ids: Ids,
}

/// [`Outcome::decision`] of an outcome with nothing to trace.
const UNTRACED: u32 = u32::MAX;

pub(crate) mod next {
    pub const DONE: u32 = 0;
    pub const REFUSE: u32 = 1;
    pub const NEW_FLOW: u32 = 2;
}

impl Outcome {
    /// A verdict with nothing to trace (no service's packet, or a helper
    /// failure, counted already).
    #[inline(always)]
    pub fn done(verdict: Verdict) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            decision: UNTRACED,
            ids: Ids::NONE,
        }
    }

    /// `verdict`, the outcome of `decision` (counted already).
    #[inline(always)]
    pub fn decided(verdict: Verdict, decision: Counter, ids: Ids) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            decision: decision as u32,
            ids,
        }
    }

    #[inline(always)]
    pub fn verdict(&self) -> i32 {
        self.verdict
    }

    /// A packet that goes on DNATed to a backend (a hairpin flow's too):
    /// what `--direct-redirect` may send straight on.
    #[inline(always)]
    fn to_backend(&self) -> bool {
        self.verdict == TC_ACT_OK
            && (self.decision == Counter::Established as u32
                || self.decision == Counter::NewFlow as u32
                || self.decision == Counter::AffinityHit as u32)
    }

    /// The counter of a `next::REFUSE` outcome.
    #[inline(always)]
    pub fn refusal(&self) -> Counter {
        if self.decision == Counter::ResetBackendGone as u32 {
            Counter::ResetBackendGone
        } else {
            Counter::RejectNoEndpoints
        }
    }

    /// Reports the decision, if there is one, to `monitor` (when IPv6
    /// tracing is on), with the packet's tuple now (`flow`).
    #[inline(always)]
    pub fn trace<C: PacketCtx>(&self, ctx: &C, packet: &Packet6, flow: &Ipv6Flow) {
        if self.decision != UNTRACED {
            let ids = (self.ids.service_id, self.ids.backend_id);
            packet.finish(ctx, self.decision as u8, ids, flow.proto, flow);
        }
    }

    /// The packet goes on (translated or not), counted under `decision`.
    #[inline(always)]
    pub fn pass(decision: Counter, ids: Ids) -> Self {
        Self::pass_as::<TcContext>(decision, ids)
    }

    /// [`Outcome::pass`] with the verdict of context `C` (the stages
    /// `external6` runs on XDP too).
    #[inline(always)]
    pub fn pass_as<C: PacketCtx>(decision: Counter, ids: Ids) -> Self {
        count(decision);
        Self::decided(Ok(C::PASS), decision, ids)
    }

    /// The packet is dropped without an answer, counted under `decision`.
    #[inline(always)]
    pub fn drop(decision: Counter, ids: Ids) -> Self {
        Self::drop_as::<TcContext>(decision, ids)
    }

    /// [`Outcome::drop`] with the verdict of context `C`.
    #[inline(always)]
    pub fn drop_as<C: PacketCtx>(decision: Counter, ids: Ids) -> Self {
        count(decision);
        Self::decided(Err(C::DROP), decision, ids)
    }

    /// The client is to be answered at once ([`refuse`], which counts it).
    /// On XDP the answer is tc's (`C::DEFERS_TO_TC`): the caller passes
    /// the packet on untraced, and the stages change no state on the way
    /// here.
    #[inline(always)]
    pub fn refuse(refusal: Counter, ids: Ids) -> Self {
        Self {
            next: next::REFUSE,
            ..Self::decided(Err(TC_ACT_SHOT), refusal, ids)
        }
    }

    #[inline(always)]
    pub fn new_flow() -> Self {
        Self::done(Ok(TC_ACT_OK)).with_next(next::NEW_FLOW)
    }

    /// This outcome with `next` set (a stage's own continuation).
    #[inline(always)]
    pub fn with_next(self, next: u32) -> Self {
        Self { next, ..self }
    }

    /// The client answered (or not: `refuse` failed) as `next::REFUSE` asked.
    #[inline(always)]
    pub fn refused(self, verdict: Verdict) -> Self {
        Self {
            verdict: verdict.unwrap_or_else(|v| v),
            next: next::DONE,
            ..self
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
fn try_from_pod6(ctx: &TcContext, flow: &mut Ipv6Flow, packet: &Packet6) -> Outcome {
    match parse_ipv6_flow_into(ctx, flow) {
        Ok(()) => {}
        Err(Parse6Error::NotL4) => return Outcome::done(Ok(TC_ACT_OK)),
        // Never rewritten; counted when it was meant for a service.
        Err(Parse6Error::Malformed) => return unparsed(ctx, flow, packet, Counter::Malformed),
        Err(Parse6Error::PastBound) => {
            return unparsed(ctx, flow, packet, Counter::Ipv6ExtHeadersPastBound)
        }
        Err(Parse6Error::UnknownFragment) => {
            if ipv6_dst(ctx).is_none_or(|dst| lb6_service_ip(&dst).is_none()) {
                return Outcome::done(Ok(TC_ACT_OK));
            }
            // Sent on untranslated it would go to the service IP, nowhere.
            // Counted only, as on IPv4.
            return Outcome::done(drop(Counter::FragmentUnknown));
        }
    }
    let Some(ip_value) = lb6_service_ip(&flow.dst_addr) else {
        if lb6_may_be_node_port_reply(flow) {
            return Outcome::done(Ok(crate::MAYBE_NODE_PORT_REPLY));
        }
        return Outcome::done(Ok(TC_ACT_OK));
    };
    packet.arrived(flow);
    // Each stage called from here, none from another: the new-flow
    // path's frames are at the verifier's 512 bytes with this one's.
    let mut outcome = pod_flow(ctx, flow);
    if outcome.next == next::NEW_FLOW {
        outcome = new_flow(ctx, flow, skb::now_ns(), ip_value);
    }
    if outcome.next == next::REFUSE {
        return outcome.refused(refuse(ctx, outcome.refusal(), flow));
    }
    outcome
}

/// A pod's packet to a service IP: its tracked flow, the reply of a
/// hairpinned flow, or (`next::NEW_FLOW`) a new flow. Not inlined: the
/// entry point's trace tail meets its decisions as values the compiler
/// cannot fold into a tail per decision.
#[inline(never)]
fn pod_flow(ctx: &TcContext, flow: &mut Ipv6Flow) -> Outcome {
    let now = skb::now_ns();
    if flow.frag == frag::FIRST {
        frag6_track(flow);
    }
    if let Some(slot) = ct6_lookup_flow(flow, ct_dir::ORIGINAL) {
        let outcome = known_flow(ctx, flow, slot, now);
        if outcome.next != next::NEW_FLOW {
            return outcome;
        }
    } else if let Some(reply) = lb6_may_be_reply(flow)
        .then(|| ct6_lookup_flow(flow, ct_dir::REPLY))
        .flatten()
    {
        // Reply of a hairpinned flow: the backend answers the service
        // address, which stands for the client (itself). Looked up only
        // from a backend a flow went to (as IPv4's `hairpin_reply`).
        return reply_translate(ctx, flow, reply.entry(), now);
    }
    if flow.frag == frag::LATER {
        return Outcome::drop(Counter::FragmentUnknown, Ids::NONE);
    }
    Outcome::new_flow()
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
    // The backend's flags, if it is still the flow's.
    let backend = lb6_lookup_backend(ct.backend_id)
        .filter(|b| b.addr == ct.backend_addr && b.port == ct.backend_port)
        .map(|b| b.flags);
    if let (false, Some(flags)) = (expired, backend) {
        if ct6_update(slot, flow, ct_dir::ORIGINAL, now) {
            // Once a second at most, or on a move of state, as on IPv4: a
            // lost REPLY entry is rebuilt, not looked for on every packet
            // (a cold lookup, the largest part of an established packet).
            ct6_restore_reply(ct, now);
            // A backend that left and came back under its old id has its
            // flows' replies looked up again. Not on XDP (its program is
            // at the verifier's 1M instructions; as on IPv4, where only
            // `from_pod` does it).
            if !C::DEFERS_TO_TC {
                let local = flags & backend_flags::LOCAL != 0;
                let hairpin = ct.flags & ct_flags::HAIRPIN != 0;
                lb6_flow_to_backend(ct, local && !hairpin);
            }
        }
        if let Err(verdict) = forward_established(ctx, flow, ct) {
            return Outcome::done(Err(verdict));
        }
        let decision = if flow.frag == frag::LATER {
            Counter::FragmentTranslated
        } else {
            Counter::Established
        };
        return Outcome::pass_as::<C>(decision, Ids::of(ct));
    }
    if flow.frag == frag::LATER {
        // The rest of a datagram whose flow ended.
        return Outcome::drop_as::<C>(Counter::FragmentUnknown, Ids::of(ct));
    }
    if C::DEFERS_TO_TC && !expired && flow.proto == IPPROTO_TCP {
        // tc resets the client (and deletes the entry).
        return Outcome::done(Ok(C::PASS));
    }
    ct6_delete(ct);
    if !expired && flow.proto == IPPROTO_TCP {
        // The backend is gone, and its connection state with it: the
        // client is told at once instead of timing out.
        return Outcome::refuse(Counter::ResetBackendGone, Ids::of(ct));
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
        return Outcome::pass(Counter::UnknownPort, Ids::NONE);
    };
    let ids = Ids::service(service.service_id);
    if !lb6_source_allowed(&service, &flow.src_addr) {
        return Outcome::drop(Counter::DropSourceRange, ids);
    }
    let mut selected = Selected6::default();
    match lb6_choose_backend(&service, &flow.src_addr, now, &mut selected) {
        Choice6::Backend => {}
        Choice6::NoLocalEndpoints => return Outcome::drop(Counter::DropNoLocalEndpoints, ids),
        Choice6::NoEndpoints => return Outcome::refuse(Counter::RejectNoEndpoints, ids),
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
            return Outcome::drop_as::<C>(Counter::ReplyTupleClash, Ids::of(&entry))
        }
        Err(CtCreateError::InsertFailed) => {
            return Outcome::done(Err(fail_as::<C>(Counter::CtInsertFailed)))
        }
    }
    // The backend's packets are now looked up as replies (`to_pod`), and
    // the NodePort bit goes for a NodePort flow to a pod of this node.
    let local = backend.flags & backend_flags::LOCAL != 0;
    lb6_flow_to_backend(&entry, local && !hairpin);
    if let Err(verdict) = forward_established(ctx, flow, &entry) {
        return Outcome::done(Err(verdict));
    }
    if selected.by_affinity {
        // Counted as a new flow too; traced as the affinity hit it is.
        count(Counter::NewFlow);
        return Outcome::pass_as::<C>(Counter::AffinityHit, Ids::of(&entry));
    }
    Outcome::pass_as::<C>(Counter::NewFlow, Ids::of(&entry))
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
) -> Outcome {
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
fn try_to_pod6(ctx: &TcContext, flow: &mut Ipv6Flow, packet: &Packet6) -> Outcome {
    match parse_ipv6_flow_into(ctx, flow) {
        Ok(()) => {}
        Err(Parse6Error::NotL4) => return icmp6_error_to_pod(ctx, flow, packet),
        Err(_) => return Outcome::done(Ok(TC_ACT_OK)),
    }
    redirect6_learn_backend(ctx, flow);
    if !lb6_may_be_reply(flow) {
        // Not from a backend: traffic between pods, untouched.
        return Outcome::done(Ok(TC_ACT_OK));
    }
    packet.arrived(flow);
    to_pod_flow(ctx, flow)
}

/// A local backend's reply to a client of a NodePort on this node's IPv6
/// address, translated as it leaves the backend (IPv4's
/// `node_port_reply_from_pod4`): the client may be a pod of another node
/// reached over an overlay, where the uplink's `to_outside` sees only the
/// encapsulated packet. Called by `from_pod` after `from_pod6` answered
/// [`crate::MAYBE_NODE_PORT_REPLY`]; a translated reply is answered with
/// [`crate::TO_CLIENT`], for `redirect6_to_client` to send on (with this
/// node's address as source the stack would take it for a martian), a
/// call of its own after this one returned: the FIB parameters on top of
/// the translation's frames are past the verifier's 512 bytes.
#[inline(never)]
pub fn node_port_reply_from_pod6(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    if parse_ipv6_flow_into(ctx, &mut flow).is_err() {
        return TC_ACT_OK;
    }
    let Some(reply) = ct6_lookup_flow(&flow, ct_dir::REPLY) else {
        return TC_ACT_OK;
    };
    let ct = reply.entry();
    let node_port =
        lb6_service_ip(&ct.service_addr).is_some_and(|v| v & service_ip_flags::NODE_ADDRESS != 0);
    if !node_port || ct.flags & ct_flags::HAIRPIN != 0 {
        return TC_ACT_OK;
    }
    if flow.frag == frag::FIRST {
        frag6_track(&flow);
    }
    let packet = Packet6::new(trace_hook::FROM_POD);
    packet.arrived(&flow);
    let outcome = reply_translate(ctx, &mut flow, ct, skb::now_ns());
    let verdict = outcome.verdict();
    outcome.trace(ctx, &packet, &flow);
    if verdict == TC_ACT_OK && flow.src_addr == ct.service_addr {
        return crate::TO_CLIENT;
    }
    verdict
}

/// A packet to a pod (or, from `external6`, to the uplink): translated
/// back if it is a backend's reply.
#[inline(never)]
pub(crate) fn to_pod_flow(ctx: &TcContext, flow: &mut Ipv6Flow) -> Outcome {
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
/// the service; any other packet passes. Traced with the outer addresses
/// (in `flow`, which holds no ports here): the source becomes the service
/// when the backend sent it.
#[inline(never)]
pub(crate) fn icmp6_error_to_pod(
    ctx: &TcContext,
    flow: &mut Ipv6Flow,
    packet: &Packet6,
) -> Outcome {
    let untouched = Outcome::done(Ok(TC_ACT_OK));
    let Some(outer) = parse_ipv6_header(ctx) else {
        return untouched;
    };
    let Some(error) = icmp6_error_flow(ctx, &outer) else {
        return untouched;
    };
    if icmp6_reverse_translate(ctx, &error).is_err() {
        return Outcome::done(Err(fail(Counter::RewriteFailed)));
    }
    *flow = Ipv6Flow {
        src_addr: error.outer_src,
        dst_addr: outer.dst_addr,
        proto: outer.next_header,
        ..Ipv6Flow::default()
    };
    packet.arrived(flow);
    let ct = &error.ct;
    if error.outer_src == ct.backend_addr {
        flow.src_addr = ct.service_addr;
    }
    Outcome::pass(Counter::IcmpErrorTranslated, Ids::of(ct))
}
