//! Direct delivery of a pod's translated packet (`--direct-redirect`): once
//! DNATed to a backend, it goes straight where the FIB sends it instead of
//! through the host's stack (routing, netfilter, and for a veth the
//! backlog of the pod's side).
//!
//! A backend behind a pod interface of this node gets the packet with
//! `bpf_redirect_peer`, into its namespace directly. That helper works on a
//! veth only (the kernel drops the packet anywhere else), so it is used only
//! where `to_pod`, which runs on pod interfaces alone, saw packets to this
//! backend go into the very interface the FIB names now (`REPLY_SOURCES`
//! keeps it). Any other next hop with a known neighbour (a bridge, another
//! node over a route or an overlay) gets the packet with the next hop's MAC
//! addresses on its egress; a next hop without a neighbour entry, no route,
//! or a packet larger than the route's MTU leaves the packet to the stack,
//! which resolves, refuses or fragments it.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use dataplane_common::{Counter, ReplySource, IPPROTO_TCP};

use crate::{
    ctx::PacketCtx,
    fib::{fib4_lookup_fitting, NextHop},
    maps::{backend_interface, count, learn_backend_interface},
    parse::{parse_ipv4_flow, Ipv4Flow, TCP_ACK, TCP_SYN},
    skb,
};

/// Set by the agent at load (`--direct-redirect`); read-only to the
/// programs, so the verifier prunes the path that is off.
#[unsafe(no_mangle)]
static DIRECT_REDIRECT: u8 = 0;

#[inline(always)]
pub fn redirect4_enabled() -> bool {
    // SAFETY: a plain read of a constant the loader may have rewritten; the
    // volatile read keeps the compiler from folding in the default.
    unsafe { core::ptr::read_volatile(&DIRECT_REDIRECT) != 0 }
}

#[inline(always)]
fn backend_of(flow: &Ipv4Flow) -> ReplySource {
    ReplySource {
        addr: flow.dst_addr,
        port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
    }
}

/// `from_pod`: sends the packet, DNATed to a backend, on to it;
/// `TC_ACT_OK` leaves it to the stack. A call of its own, on the packet as
/// it is now: the pipeline's stack has no room for the FIB parameters.
#[inline(never)]
pub fn redirect4_to_backend(ctx: &TcContext) -> i32 {
    let Ok(flow) = parse_ipv4_flow(ctx) else {
        return TC_ACT_OK;
    };
    let flow = &flow;
    let ingress = PacketCtx::ifindex(ctx);
    // A packet larger than the path's MTU goes to the stack, which
    // fragments it or answers "fragmentation needed": a redirect would
    // hand the next hop a packet it drops (or a pod one it never asked
    // for). A GSO packet is checked by the kernel per segment (length 0).
    let ip_len = if PacketCtx::is_gso(ctx) {
        0
    } else {
        u16::try_from(flow.ip_tot_len).unwrap_or(u16::MAX)
    };
    let hop = fib4_lookup_fitting(PacketCtx::raw(ctx), ingress, flow, ip_len);
    send_to_hop(ctx, ingress, hop, || backend_interface(&backend_of(flow)))
}

/// Sends a DNATed packet (either family) to the FIB's `hop`: into the
/// backend's namespace when `learnt` (the pod interface `to_pod` saw the
/// backend behind) is the hop's interface, else out of it with the hop's
/// MAC addresses. No route, no neighbour entry, or back out of the
/// interface it came in by: left to the stack.
#[inline(always)]
pub fn send_to_hop(
    ctx: &TcContext,
    ingress: u32,
    hop: Option<NextHop>,
    learnt: impl FnOnce() -> Option<u32>,
) -> i32 {
    let Some(hop) = hop else {
        return TC_ACT_OK;
    };
    let Some(macs) = hop.macs else {
        return TC_ACT_OK;
    };
    if hop.ifindex == ingress {
        // Back out of the interface it came in by: the stack's business
        // (and a peer redirect would hand the client its own packet).
        return TC_ACT_OK;
    }
    count(Counter::Redirected);
    if learnt() == Some(hop.ifindex) {
        if PacketCtx::store(ctx, 0, &macs).is_err() || skb::set_packet_host(ctx).is_err() {
            return TC_ACT_OK;
        }
        return skb::redirect_peer(hop.ifindex);
    }
    PacketCtx::send(
        ctx,
        &NextHop {
            ifindex: hop.ifindex,
            macs: Some(macs),
        },
    )
}

/// `to_pod`: a packet opening a flow to a backend goes into the pod
/// interface the backend sits behind; remembered for
/// [`redirect4_to_backend`]. Only opening packets are looked at: later ones
/// of a redirected flow never come this way.
#[inline(always)]
pub fn redirect4_learn_backend(ctx: &TcContext, flow: &Ipv4Flow) {
    if !redirect4_enabled() || !flow.has_l4_header() {
        return;
    }
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let ifindex = PacketCtx::ifindex(ctx);
    // 1 is the loopback (and a test run's device): never a pod's.
    if ifindex > 1 {
        learn_backend_interface(&backend_of(flow), ifindex);
    }
}
