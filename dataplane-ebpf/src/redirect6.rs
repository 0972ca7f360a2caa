//! Direct delivery of a pod's translated IPv6 packet (`--direct-redirect`):
//! the rules of `redirect` on the IPv6 FIB and `LB6_REPLY_SOURCES`. A
//! backend behind a pod interface `to_pod` saw flows to it go into gets
//! the packet with `bpf_redirect_peer` when the FIB names that very
//! interface; any other next hop with a neighbour entry gets it with the
//! next hop's MAC addresses on its egress; no neighbour, no route, a
//! packet larger than the route's MTU (the stack answers Packet Too Big)
//! or a hairpin flow leaves it to the stack.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use dataplane_common::{ReplySource6, IPPROTO_TCP};

use crate::{
    ctx::PacketCtx,
    fib::{fib6_lookup, fib6_lookup_fitting, Route6},
    lb6::lb6_service_ip,
    maps::{backend_interface6, learn_backend_interface6},
    parse::{frag, TCP_ACK, TCP_SYN},
    parse6::{parse_ipv6_flow_into, Ipv6Flow, IP6_HLEN},
    redirect::{redirect4_enabled, send_to_hop},
};

/// `--direct-redirect`: one switch for both families.
#[inline(always)]
pub fn redirect6_enabled() -> bool {
    redirect4_enabled()
}

#[inline(always)]
fn backend_of(flow: &Ipv6Flow) -> ReplySource6 {
    ReplySource6 {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
    }
}

/// `from_pod`: sends the packet, DNATed to a backend, on to it;
/// `TC_ACT_OK` leaves it to the stack. A call of its own, on the packet as
/// it is now: the pipeline's frames have no room for the FIB parameters.
#[inline(never)]
pub fn redirect6_to_backend(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    if parse_ipv6_flow_into(ctx, &mut flow).is_err() || flow.frag != frag::NONE {
        return TC_ACT_OK;
    }
    let flow = &flow;
    // A hairpin flow's source became the service (or node) address: the
    // packet goes back into the pod it came from, the stack's business.
    if lb6_service_ip(&flow.src_addr).is_some() {
        return TC_ACT_OK;
    }
    let ingress = PacketCtx::ifindex(ctx);
    // Checked against the route's MTU as it is; a GSO packet is checked by
    // the kernel per segment (length 0).
    let ip_len = if PacketCtx::is_gso(ctx) {
        0
    } else {
        u16::try_from(IP6_HLEN as u32 + flow.payload_len).unwrap_or(u16::MAX)
    };
    let route = Route6::of(flow);
    let hop = fib6_lookup_fitting(PacketCtx::raw(ctx), ingress, &route, ip_len);
    send_to_hop(ctx, ingress, hop, || backend_interface6(&backend_of(flow)))
}

/// `to_pod`: a packet opening a flow to an IPv6 backend goes into the pod
/// interface the backend sits behind; remembered for
/// [`redirect6_to_backend`].
#[inline(always)]
pub fn redirect6_learn_backend(ctx: &TcContext, flow: &Ipv6Flow) {
    if !redirect6_enabled() || !flow.has_l4_header() {
        return;
    }
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let ifindex = PacketCtx::ifindex(ctx);
    // 1 is the loopback (and a test run's device): never a pod's.
    if ifindex > 1 {
        learn_backend_interface6(&backend_of(flow), ifindex);
    }
}

/// `from_pod`: a local backend's NodePort reply, translated by
/// `pod6::node_port_reply_from_pod6`, goes to the client's next hop by FIB
/// lookup, as `from_outside` sends SNATed replies; no route leaves it to
/// the stack. A call of its own, on the packet as it is now.
#[inline(never)]
pub fn redirect6_to_client(ctx: &TcContext) -> i32 {
    let mut flow = Ipv6Flow::default();
    if parse_ipv6_flow_into(ctx, &mut flow).is_err() {
        return TC_ACT_OK;
    }
    let route = Route6::of(&flow);
    match fib6_lookup(PacketCtx::raw(ctx), PacketCtx::ifindex(ctx), &route) {
        Some(hop) => PacketCtx::send(ctx, &hop),
        None => TC_ACT_OK,
    }
}
