//! tc programs of the service dataplane, and the socket hooks (`sock`,
//! `sock6`, `sock_release`).
//!
//! `from_pod` runs on tc ingress of a pod's host-side interface (packets the
//! pod sends): service DNAT, conntrack, rejects, hairpin replies.
//! `to_pod` runs on tc egress of the same interface (packets to the pod):
//! reverse translation of backend replies to the service address.
//!
//! Pipeline: parse -> service IP filter -> conntrack -> service lookup ->
//! backend selection -> conntrack create -> NAT rewrite. Every outcome is an
//! explicit verdict; every decision is counted and traced through `Packet`,
//! one method per outcome (pass, drop, reject), and every helper failure is
//! a counted drop (`fail`).
#![no_std]
#![no_main]
// Atomic OR on conntrack flags: the BPF target has no atomic read-modify-write
// types in core (see `maps::CtSlot::or_state_flags`).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for the BPF atomic OR")]

mod conntrack;
mod conntrack6;
mod csum;
mod ctx;
mod external;
mod external6;
mod fib;
mod fragment;
mod icmp;
mod icmp6;
mod lb;
mod lb6;
mod maps;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod pod6;
mod redirect;
mod redirect6;
mod reject;
mod reject6;
mod skb;
mod snat;
mod sock;
mod sock6;
mod sock_ctx;
mod sock_release;
mod trace;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{
    backend_flags, ct_dir, ct_flags, ct_state, trace_hook, Counter, CtEntry, ServiceValue,
    TraceTuple, IPPROTO_TCP,
};

use crate::{
    conntrack::{
        ct4_create, ct4_delete, ct4_is_expired, ct4_is_reopen, ct4_key, ct4_lookup,
        ct4_reply_accept, ct4_restore_reply, ct4_update, CtCreateError,
    },
    ctx::PacketCtx,
    fragment::frag4_track,
    icmp::{icmp4_error_flow, icmp4_reverse_translate},
    lb::{
        lb4_choose_backend, lb4_flow_to_backend, lb4_is_service_ip, lb4_lookup_backend,
        lb4_lookup_frontend, lb4_may_be_node_port_reply, lb4_may_be_reply, lb4_service_ip,
        lb4_source_allowed, Choice, Client, Selected,
    },
    maps::{count, ct_insert, CtSlot},
    nat::{nat4_rewrite_dst, nat4_rewrite_src},
    parse::{frag, parse_ipv4_flow, parse_ipv4_header, Ipv4Flow, ParseError, TCP_RST},
    redirect::{redirect4_enabled, redirect4_learn_backend, redirect4_to_backend},
    reject::{reject4_icmp_port_unreachable, reject4_tcp_reset},
    trace::{trace, tuple, Decision},
};

/// IPv6 frames go to `pod6` before anything else, so neither family's
/// stack frame is stacked on the other's.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return match pod6::from_pod6(&ctx) {
            MAYBE_NODE_PORT_REPLY => match pod6::node_port_reply_from_pod6(&ctx) {
                TO_CLIENT => redirect6::redirect6_to_client(&ctx),
                verdict => verdict,
            },
            TO_BACKEND => redirect6::redirect6_to_backend(&ctx),
            verdict => verdict,
        };
    }
    // The follow-ups are called from here, not from `from_pod4`: the two
    // stack frames together would not fit in 512 bytes.
    match from_pod4(&ctx) {
        MAYBE_NODE_PORT_REPLY => node_port_reply_from_pod4(&ctx),
        TO_BACKEND => redirect4_to_backend(&ctx),
        verdict => verdict,
    }
}

/// `from_pod4`'s (`from_pod6`'s) answer for a packet to no service that
/// may come from a backend a NodePort flow went to
/// (`lb4_may_be_node_port_reply`): see [`node_port_reply_from_pod4`]
/// (`pod6::node_port_reply_from_pod6`). No tc verdict has this value.
const MAYBE_NODE_PORT_REPLY: i32 = 0x4e50_5259;

/// `pod6::node_port_reply_from_pod6`'s verdict for a NodePort reply it
/// translated, to be sent on by `redirect6_to_client`; never a tc verdict.
const TO_CLIENT: i32 = 0x2_0000;

/// `from_pod4`'s (`from_pod6`'s) verdict for a packet it DNATed to a
/// backend, to be sent on by [`redirect4_to_backend`]
/// (`redirect6_to_backend`) with `--direct-redirect`; never a tc verdict.
const TO_BACKEND: i32 = 0x1_0000;

#[inline(never)]
fn from_pod4(ctx: &TcContext) -> i32 {
    try_from_pod(ctx).unwrap_or_else(|verdict| verdict)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return pod6::to_pod6(&ctx);
    }
    to_pod4(&ctx)
}

#[inline(never)]
fn to_pod4(ctx: &TcContext) -> i32 {
    try_to_pod(ctx).unwrap_or_else(|verdict| verdict)
}

/// tc ingress of an uplink: NodePorts, load-balancer IPs and externalIPs
/// from outside (`--external-datapath tc`).
#[classifier]
pub fn from_outside(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return external6::from_outside6(&ctx);
    }
    if external::is_icmp4(&ctx) {
        external::tc_icmp_error_from_outside(&ctx)
    } else {
        external::tc_from_outside(&ctx)
    }
}

/// XDP on an uplink: the same pipeline as `from_outside`, IPv4 and IPv6,
/// on the driver's buffer before an skb exists; what it cannot finish
/// (answers to refused clients, next hops without a neighbour entry or out
/// of another interface, ICMP errors, fragments and malformed frames) it
/// passes untouched and uncounted to `from_outside` behind it. Each family
/// is a call of its own, so neither's stack frame is stacked on the
/// other's.
#[xdp]
pub fn xdp_from_outside(ctx: XdpContext) -> u32 {
    if parse6::is_ipv6(&ctx) {
        return external6::xdp_from_outside6(&ctx) as u32;
    }
    external::xdp_from_outside4(&ctx) as u32
}

/// tc egress of an uplink: local backends' replies to outside clients.
#[classifier]
pub fn to_outside(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return external6::to_outside6(&ctx);
    }
    to_outside4(&ctx)
}

/// Not inlined, as `from_pod4`: the IPv4 body's frame is not under the
/// IPv6 path's calls (that chain is at the verifier's 512 bytes).
#[inline(never)]
fn to_outside4(ctx: &TcContext) -> i32 {
    let verdict = if external::is_icmp4(ctx) {
        icmp4_error_to_client(ctx, trace_hook::TO_OUTSIDE)
    } else {
        external::try_to_outside(ctx)
    };
    verdict.unwrap_or_else(|verdict| verdict)
}

/// The error side carries the verdict for packets that cannot go on as they
/// are (half-rewritten, or refused).
type Verdict = Result<i32, i32>;

/// A packet on its way through one program: where it was seen and its tuple
/// on arrival. Every decision on it is counted and traced through here, one
/// method per outcome.
struct Packet<'a, C: PacketCtx> {
    ctx: &'a C,
    hook: u8,
    before: TraceTuple,
}

/// The flow a decision is about, for the trace.
#[derive(Clone, Copy, Default)]
struct Ids {
    service_id: u32,
    backend_id: u32,
}

impl Ids {
    #[inline(always)]
    fn of(ct: &CtEntry) -> Self {
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

impl<'a, C: PacketCtx> Packet<'a, C> {
    #[inline(always)]
    fn new(ctx: &'a C, hook: u8, flow: &Ipv4Flow) -> Self {
        Self {
            ctx,
            hook,
            before: tuple(flow),
        }
    }

    /// Counts `decision` and reports it to `monitor` (when tracing is on)
    /// with the packet's tuple as it is now.
    #[inline(always)]
    fn record_tuple(&self, decision: Counter, proto: u8, after: TraceTuple, ids: Ids) {
        count(decision);
        trace(
            self.ctx,
            &Decision {
                hook: self.hook,
                decision,
                proto,
                service_id: ids.service_id,
                backend_id: ids.backend_id,
                before: self.before,
                after,
            },
        );
    }

    #[inline(always)]
    fn record(&self, decision: Counter, flow: &Ipv4Flow, ids: Ids) {
        self.record_tuple(decision, flow.proto, tuple(flow), ids);
    }

    /// The packet goes on (translated or not).
    #[inline(always)]
    fn pass(&self, decision: Counter, flow: &Ipv4Flow, ids: Ids) -> Verdict {
        self.record(decision, flow, ids);
        Ok(C::PASS)
    }

    /// The packet is dropped without an answer.
    #[inline(always)]
    fn drop(&self, decision: Counter, flow: &Ipv4Flow, ids: Ids) -> Verdict {
        self.record(decision, flow, ids);
        Err(C::DROP)
    }

    /// The client is answered at once: a RST for TCP (unless the packet is a
    /// RST itself), an ICMP port unreachable otherwise. XDP leaves the
    /// answer (and the counting) to tc: callers check
    /// `C::DEFERS_TO_TC` before changing any state on the way here.
    #[inline(always)]
    fn reject(&self, decision: Counter, flow: &Ipv4Flow, ids: Ids) -> Verdict {
        if C::DEFERS_TO_TC {
            return Ok(C::PASS);
        }
        self.record(decision, flow, ids);
        self.ctx.refuse(flow)
    }
}

/// Answers a refused client from tc: a RST for TCP, an ICMP port
/// unreachable otherwise.
#[inline(always)]
fn refuse_tc(ctx: &TcContext, flow: &Ipv4Flow) -> Verdict {
    if flow.proto == IPPROTO_TCP {
        return tcp_reset_unless_reset(ctx, flow);
    }
    reject4_icmp_port_unreachable(ctx, flow).map_err(|_| fail(Counter::RejectFailed))
}

/// A helper failed half way through (rewrite, reject): the packet cannot go
/// on as it is and is dropped, counted under `counter`.
#[inline(always)]
fn fail(counter: Counter) -> i32 {
    fail_as::<TcContext>(counter)
}

/// [`fail`] with the drop verdict of context `C`.
#[inline(always)]
fn fail_as<C: PacketCtx>(counter: Counter) -> i32 {
    count(counter);
    C::DROP
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Verdict {
    let mut flow = match parse_ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(ParseError::NotIpv4L4) => return Ok(TC_ACT_OK),
        Err(ParseError::Malformed { dst_addr }) => {
            if dst_addr != 0 && lb4_is_service_ip(dst_addr) {
                let to = TraceTuple {
                    dst_addr,
                    ..TraceTuple::default()
                };
                let packet = Packet {
                    ctx,
                    hook: trace_hook::FROM_POD,
                    before: to,
                };
                packet.record_tuple(Counter::Malformed, 0, to, Ids::default());
            }
            return Ok(TC_ACT_OK);
        }
        Err(ParseError::UnknownFragment { dst_addr }) => {
            if !lb4_is_service_ip(dst_addr) {
                return Ok(TC_ACT_OK);
            }
            // Sent on untranslated it would go to the service IP, nowhere.
            count(Counter::FragmentUnknown);
            return Err(TC_ACT_SHOT);
        }
    };
    let Some(ip_value) = lb4_service_ip(flow.dst_addr) else {
        if lb4_may_be_node_port_reply(&flow) {
            return Ok(MAYBE_NODE_PORT_REPLY);
        }
        return Ok(TC_ACT_OK);
    };
    let now = skb::now_ns();
    let packet = Packet::new(ctx, trace_hook::FROM_POD, &flow);
    if flow.frag == frag::FIRST {
        frag4_track(&flow);
    }

    if let Some(slot) = ct4_lookup(&ct4_key(&flow, ct_dir::ORIGINAL)) {
        let ct = slot.get();
        let expired = ct4_is_expired(&ct, now) || ct4_is_reopen(&ct, &flow);
        let backend = lb4_lookup_backend(ct.backend_id)
            .filter(|b| b.addr == ct.backend_addr && b.port == ct.backend_port);
        if let (false, Some(backend)) = (expired, backend) {
            if ct4_update(slot, &flow, ct_dir::ORIGINAL, now) {
                ct4_restore_reply(&ct, now);
                let local = backend.flags & backend_flags::LOCAL != 0;
                let hairpin = ct.flags & ct_flags::HAIRPIN != 0;
                lb4_flow_to_backend(&backend, ct.service_addr, local && !hairpin);
            }
            forward_established(ctx, &mut flow, &ct)?;
            let decision = if flow.frag == frag::LATER {
                Counter::FragmentTranslated
            } else {
                Counter::Established
            };
            packet.pass(decision, &flow, Ids::of(&ct))?;
            return Ok(deliver(&packet.before, &flow));
        }
        if flow.frag == frag::LATER {
            // The rest of a datagram whose flow ended: no answer, no new
            // flow from a fragment without a header.
            return packet.drop(Counter::FragmentUnknown, &flow, Ids::of(&ct));
        }
        ct4_delete(&ct);
        if !expired && flow.proto == IPPROTO_TCP {
            // The backend is gone: its connection state is lost with it, so
            // the client is told at once instead of timing out.
            return packet.reject(Counter::ResetBackendGone, &flow, Ids::of(&ct));
        }
        if !expired {
            count(Counter::UdpFlowMoved);
        }
    } else if let Some(reply) = hairpin_reply(&flow) {
        // Reply of a hairpinned flow: the backend answers the service IP,
        // which stands for the client (itself).
        return reply_translate(&packet, &mut flow, reply, &reply.get(), now);
    }
    if flow.frag == frag::LATER {
        return packet.drop(Counter::FragmentUnknown, &flow, Ids::default());
    }

    let verdict = new_flow(&packet, &mut flow, now, ip_value)?;
    if verdict != TC_ACT_OK {
        return Ok(verdict);
    }
    Ok(deliver(&packet.before, &flow))
}

/// The REPLY entry of the hairpinned flow a pod's packet to a service IP
/// without a flow of its own may answer. Looked up only when the packet's
/// source is a backend a flow went to (`lb4_may_be_reply`; a hairpinned
/// flow cleared its backend's bits when it was made), so a client's new
/// flow costs one conntrack miss, not two.
#[inline(always)]
fn hairpin_reply(flow: &Ipv4Flow) -> Option<CtSlot> {
    if !lb4_may_be_reply(flow) {
        return None;
    }
    ct4_lookup(&ct4_key(flow, ct_dir::REPLY))
}

/// Where a packet that passes goes: straight to its backend when it was
/// DNATed to one ([`TO_BACKEND`]), else to the stack. A hairpin flow (its
/// source became the service), fragments and anything untranslated stay
/// with the stack.
#[inline(always)]
fn deliver(before: &TraceTuple, flow: &Ipv4Flow) -> i32 {
    let to_backend = flow.src_addr == before.src_addr
        && (flow.dst_addr != before.dst_addr || flow.dst_port != before.dst_port);
    if !to_backend || flow.frag != frag::NONE || !redirect4_enabled() {
        return TC_ACT_OK;
    }
    TO_BACKEND
}

#[inline(always)]
fn new_flow(packet: &Packet<TcContext>, flow: &mut Ipv4Flow, now: u64, ip_value: u32) -> Verdict {
    let Some(service) = lb4_lookup_frontend(flow, ip_value) else {
        if ip_value & dataplane_common::service_ip_flags::COUNT_MASK == 0 {
            // Only a node address: the node's own traffic, not a service.
            return Ok(TC_ACT_OK);
        }
        return packet.pass(Counter::UnknownPort, flow, Ids::default());
    };
    if !lb4_source_allowed(&service, flow.src_addr) {
        return packet.drop(
            Counter::DropSourceRange,
            flow,
            Ids::service(service.service_id),
        );
    }
    let selected = match choose_backend(packet, flow, &service, now) {
        Ok(selected) => selected,
        Err(verdict) => return verdict,
    };
    ct_new_flow(packet, flow, now, &service, selected)
}

/// The backend of a new connection to `service` (`lb4_choose_backend`, as
/// the socket hooks choose), or the verdict when there is none: dropped
/// when the traffic policy is Local and other nodes have endpoints (as
/// kube-proxy drops it), refused at once otherwise.
#[inline(always)]
fn choose_backend<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &Ipv4Flow,
    service: &ServiceValue,
    now: u64,
) -> Result<Selected, Verdict> {
    let ids = Ids::service(service.service_id);
    match lb4_choose_backend(service, Client::addr(flow.src_addr), now) {
        Choice::Backend(selected) => Ok(selected),
        Choice::NoLocalEndpoints => Err(packet.drop(Counter::DropNoLocalEndpoints, flow, ids)),
        Choice::NoEndpoints => Err(packet.reject(Counter::RejectNoEndpoints, flow, ids)),
    }
}

/// A new flow to `selected` tracked in conntrack (`CT_TCP`, `CT_OTHER`)
/// and DNATed; the stack delivers it (and the backend's replies are translated back where they
/// leave: `to_pod`, `to_outside`, or, NodePort replies of local backends, `from_pod`).
#[inline(always)]
fn ct_new_flow<C: PacketCtx>(
    packet: &Packet<C>,
    flow: &mut Ipv4Flow,
    now: u64,
    service: &ServiceValue,
    selected: Selected,
) -> Verdict {
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
        _pad0: 0,
        backend_id,
        state: ct_state::OPENING,
        flags: if hairpin { ct_flags::HAIRPIN } else { 0 },
        _pad: [0; 2],
        service_id: service.service_id,
    };
    let ct = match ct4_create(&entry, now) {
        Ok(ct) => ct,
        Err(CtCreateError::ReplyClash) => {
            return packet.drop(Counter::ReplyTupleClash, flow, Ids::of(&entry));
        }
        Err(CtCreateError::InsertFailed) => return Err(fail_as::<C>(Counter::CtInsertFailed)),
    };
    // The backend's packets are now looked up as replies (`to_pod`), and,
    // for a NodePort flow to a pod of this node, as NodePort replies
    // (`from_pod`).
    let local = backend.flags & backend_flags::LOCAL != 0;
    lb4_flow_to_backend(&backend, entry.service_addr, local && !hairpin);
    forward_established(packet.ctx, flow, &ct)?;
    if selected.by_affinity {
        // Counted as a new flow too; traced as the affinity hit it is.
        count(Counter::NewFlow);
        return packet.pass(Counter::AffinityHit, flow, Ids::of(&ct));
    }
    packet.pass(Counter::NewFlow, flow, Ids::of(&ct))
}

/// Answers a TCP segment with a RST, except a RST itself, which is never
/// answered (RFC 9293 3.10.7.1; iptables' REJECT behaves the same): it is
/// dropped, its reason already counted by the caller.
#[inline(always)]
fn tcp_reset_unless_reset(ctx: &TcContext, flow: &Ipv4Flow) -> Verdict {
    if flow.tcp_flags & TCP_RST != 0 {
        return Err(TC_ACT_SHOT);
    }
    reject4_tcp_reset(ctx, flow).map_err(|_| fail(Counter::RejectFailed))
}

/// Client -> service packet of a known flow: DNAT to its backend, and in a
/// hairpin flow SNAT to the service IP so the pod does not get a packet from
/// its own address (which it would drop as a martian).
#[inline(always)]
fn forward_established<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv4Flow,
    ct: &CtEntry,
) -> Result<(), i32> {
    if ct.flags & ct_flags::HAIRPIN != 0 {
        nat4_rewrite_src(ctx, flow, ct.service_addr, flow.src_port)
            .map_err(|_| fail_as::<C>(Counter::RewriteFailed))?;
    }
    nat4_rewrite_dst(ctx, flow, ct.backend_addr, ct.backend_port)
        .map_err(|_| fail_as::<C>(Counter::RewriteFailed))
}

/// Backend -> client packet of the flow whose REPLY entry `ct` is (in
/// place at `reply`): the source becomes the service again, unless the
/// entry is stale (`ct4_reply_accept`).
#[inline(always)]
fn reply_translate(
    packet: &Packet<TcContext>,
    flow: &mut Ipv4Flow,
    reply: CtSlot,
    ct: &CtEntry,
    now: u64,
) -> Verdict {
    if !ct4_reply_accept(reply, ct, flow, now) {
        return Ok(TC_ACT_OK);
    }
    nat4_rewrite_src(packet.ctx, flow, ct.service_addr, ct.service_port)
        .map_err(|_| fail(Counter::RewriteFailed))?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        nat4_rewrite_dst(packet.ctx, flow, ct.client_addr, ct.client_port)
            .map_err(|_| fail(Counter::RewriteFailed))?;
    }
    let decision = if flow.frag == frag::LATER {
        Counter::FragmentTranslated
    } else {
        Counter::ReplyTranslated
    };
    packet.pass(decision, flow, Ids::of(ct))
}

/// A local backend's reply to a client of a NodePort on this node's
/// address, translated as it leaves the backend: the client may be a pod
/// of another node, reached over an overlay device, where the uplink's
/// `to_outside` never sees the reply (only the encapsulated packet). With
/// this node's address as source the stack would drop it on ingress (a
/// martian): it is sent to its next hop by FIB lookup, as `from_outside`
/// sends SNATed replies. Every other reply is translated where it leaves
/// the node (`to_outside`) or enters the client (`to_pod`).
///
/// Not inlined: a subprogram of its own, called by `from_pod` after
/// `from_pod4` (see [`MAYBE_NODE_PORT_REPLY`]).
#[inline(never)]
fn node_port_reply_from_pod4(ctx: &TcContext) -> i32 {
    let Ok(mut flow) = parse_ipv4_flow(ctx) else {
        return TC_ACT_OK;
    };
    let Some(reply) = ct4_lookup(&ct4_key(&flow, ct_dir::REPLY)) else {
        return TC_ACT_OK;
    };
    let ct = reply.get();
    let node_port = lb4_service_ip(ct.service_addr)
        .is_some_and(|v| v & dataplane_common::service_ip_flags::NODE_ADDRESS != 0);
    if !node_port || ct.flags & ct_flags::HAIRPIN != 0 {
        return TC_ACT_OK;
    }
    let after = Ipv4Flow {
        src_addr: ct.service_addr,
        src_port: ct.service_port,
        ..flow
    };
    // No route to the client: left as it is, to the stack.
    let Some(hop) = fib::fib4_lookup(ctx.raw(), ctx.ifindex(), &after) else {
        return TC_ACT_OK;
    };
    if flow.frag == frag::FIRST {
        frag4_track(&flow);
    }
    let packet = Packet::new(ctx, trace_hook::FROM_POD, &flow);
    match reply_translate(&packet, &mut flow, reply, &ct, skb::now_ns()) {
        Ok(_) if flow.src_addr == ct.service_addr => ctx.send(&hop),
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Verdict {
    let mut flow = match parse_ipv4_flow(ctx) {
        Ok(flow) => flow,
        Err(ParseError::NotIpv4L4) => return icmp4_error_to_client(ctx, trace_hook::TO_POD),
        Err(_) => return Ok(TC_ACT_OK),
    };
    redirect4_learn_backend(ctx, &flow);
    if !lb4_may_be_reply(&flow) {
        // Not from a backend: traffic between pods, untouched.
        return Ok(TC_ACT_OK);
    }
    let Some(reply) = ct4_lookup(&ct4_key(&flow, ct_dir::REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    let ct = reply.get();
    if flow.frag == frag::FIRST {
        frag4_track(&flow);
    }
    if ct.flags & ct_flags::HAIRPIN != 0 {
        // Hairpin replies are translated on the way out of the pod.
        return Ok(TC_ACT_OK);
    }
    let packet = Packet::new(ctx, trace_hook::TO_POD, &flow);
    reply_translate(&packet, &mut flow, reply, &ct, skb::now_ns())
}

/// An ICMP error about one of the client's translated flows is made about
/// the service, as its replies are; any other packet passes. On its way
/// to a client pod (`to_pod`) or out of an uplink to an outside client
/// (`to_outside`, `hook`).
#[inline(always)]
fn icmp4_error_to_client(ctx: &TcContext, hook: u8) -> Verdict {
    let Some(outer) = parse_ipv4_header(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let Some(error) = icmp4_error_flow(ctx, &outer) else {
        return Ok(TC_ACT_OK);
    };
    icmp4_reverse_translate(ctx, &error).map_err(|_| fail(Counter::RewriteFailed))?;
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
    let packet = Packet { ctx, hook, before };
    packet.record_tuple(
        Counter::IcmpErrorTranslated,
        outer.proto,
        after,
        Ids::of(ct),
    );
    Ok(TC_ACT_OK)
}

/// Reference for benchmarks, never attached: parses like `from_pod` (either
/// family) and does one hash lookup. The floor every datapath figure is
/// compared against.
#[classifier]
pub fn bench_floor(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return bench_floor6(&ctx);
    }
    // Distinct verdicts keep the lookup from being optimised away.
    match parse_ipv4_flow(&ctx) {
        Ok(flow) if lb4_is_service_ip(flow.dst_addr) => TC_ACT_OK,
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

/// Reference for benchmarks, never attached: [`bench_floor`] plus one
/// conntrack lookup of the packet's own tuple, the least an established
/// packet costs in any design that keeps its flows in a BPF hash map (the
/// flow's entry is as cold as the translating path finds it).
#[classifier]
pub fn bench_floor_flow(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return bench_floor_flow6(&ctx);
    }
    match parse_ipv4_flow(&ctx) {
        Ok(flow)
            if lb4_is_service_ip(flow.dst_addr)
                && ct4_lookup(&ct4_key(&flow, ct_dir::ORIGINAL)).is_some() =>
        {
            TC_ACT_OK
        }
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

/// [`bench_floor_flow`] for IPv6.
#[inline(never)]
fn bench_floor_flow6(ctx: &TcContext) -> i32 {
    let mut flow = parse6::Ipv6Flow::default();
    match parse6::parse_ipv6_flow_into(ctx, &mut flow) {
        Ok(())
            if lb6::lb6_service_ip(&flow.dst_addr).is_some()
                && conntrack6::ct6_lookup_flow(&flow, ct_dir::ORIGINAL).is_some() =>
        {
            TC_ACT_OK
        }
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

/// Reference for benchmarks, never attached: [`bench_floor`] plus the two
/// conntrack inserts every tracked flow makes (an entry per direction,
/// `BPF_NOEXIST`, as `ct4_create` writes them), the least a new flow costs
/// in any design that tracks its flows in a BPF LRU hash map. The entries
/// are keyed by the packet's tuple and hold nothing: the bench runs it
/// last, on flows of its own.
#[classifier]
pub fn bench_floor_insert(ctx: TcContext) -> i32 {
    if parse6::is_ipv6_frame(&ctx) {
        return bench_floor_insert6(&ctx);
    }
    bench_floor_insert4(&ctx)
}

/// [`bench_floor_insert`] for IPv4: a frame of its own, not stacked on
/// the IPv6 one's calls.
#[inline(never)]
fn bench_floor_insert4(ctx: &TcContext) -> i32 {
    let inserted = |flow: &Ipv4Flow| {
        let entry = CtEntry::default();
        [ct_dir::ORIGINAL, ct_dir::REPLY].iter().all(|direction| {
            ct_insert(&ct4_key(flow, *direction), &entry, BPF_NOEXIST as u64).is_ok()
        })
    };
    match parse_ipv4_flow(ctx) {
        Ok(flow) if lb4_is_service_ip(flow.dst_addr) && inserted(&flow) => TC_ACT_OK,
        _ => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

/// [`bench_floor_insert`] for IPv6.
#[inline(never)]
fn bench_floor_insert6(ctx: &TcContext) -> i32 {
    let mut flow = parse6::Ipv6Flow::default();
    if parse6::parse_ipv6_flow_into(ctx, &mut flow).is_err()
        || lb6::lb6_service_ip(&flow.dst_addr).is_none()
    {
        return aya_ebpf::bindings::TC_ACT_UNSPEC;
    }
    let entry = dataplane_common::Ct6Entry::default();
    for direction in [ct_dir::ORIGINAL, ct_dir::REPLY] {
        let key = conntrack6::ct6_key(&flow, direction);
        if maps::ct6_insert(&key, &entry, BPF_NOEXIST as u64).is_err() {
            return aya_ebpf::bindings::TC_ACT_UNSPEC;
        }
    }
    TC_ACT_OK
}

/// Reference for benchmarks, never attached: does nothing. What one
/// BPF_PROG_TEST_RUN call costs around any program (timers, context
/// setup), shown beside the figures so readers can see the fixed part.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// [`bench_floor`] for IPv6: the IPv6 parse (extension headers walked) and
/// one `LB6_SERVICE_IPS` lookup.
#[inline(never)]
fn bench_floor6(ctx: &TcContext) -> i32 {
    let mut flow = parse6::Ipv6Flow::default();
    match parse6::parse_ipv6_flow_into(ctx, &mut flow) {
        Ok(()) if lb6::lb6_service_ip(&flow.dst_addr).is_some() => TC_ACT_OK,
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
