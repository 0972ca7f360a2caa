//! Sending a translated external packet on to its next hop: a FIB lookup
//! and a redirect, the way a router forwards it. Needed because a packet
//! whose source became this node's address (SNAT) would be dropped by the
//! stack as a martian if handed back to it on ingress.

use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS};

use dataplane_common::Ipv6Bytes;

use crate::{parse::Ipv4Flow, parse6::Ipv6Flow, skb};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the FIB sends a packet.
pub struct NextHop {
    pub ifindex: u32,
    /// Destination and source MAC, as the Ethernet header wants them;
    /// `None` when the kernel has no neighbour entry yet.
    pub macs: Option<[u8; 12]>,
}

/// Looks up the route of `flow` as if it arrived on `ingress_ifindex`.
/// `None`: no usable unicast route (blackhole, unreachable, local, not
/// forwarding).
#[inline(always)]
pub fn fib4_lookup(
    raw_ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    flow: &Ipv4Flow,
) -> Option<NextHop> {
    let route = Route4 {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
    };
    fib4_route(raw_ctx, ingress_ifindex, &route)
}

/// The IPv4 tuple of a packet to route (network order), for callers that
/// have no [`Ipv4Flow`] of the translated packet (a whole one on the stack
/// costs the external pipeline room it does not have).
pub struct Route4 {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// [`fib4_lookup`] of a [`Route4`].
#[inline(always)]
pub fn fib4_route(
    raw_ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    route: &Route4,
) -> Option<NextHop> {
    let mut params = skb::fib_params();
    params.family = AF_INET;
    params.l4_protocol = route.proto;
    params.sport = route.src_port;
    params.dport = route.dst_port;
    // tot_len 0 skips the MTU check: GRO may have merged segments past the
    // MTU that are split again on the way out.
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_3.ipv4_src = route.src_addr;
    params.__bindgen_anon_4.ipv4_dst = route.dst_addr;
    fib_result(raw_ctx, &mut params)
}

/// [`fib4_lookup`] for a packet of `ip_len` bytes (its IPv4 total length)
/// that must fit the route's MTU as it is: `None` also when it does not
/// (`BPF_FIB_LKUP_RET_FRAG_NEEDED`), so the stack fragments it or tells
/// the sender. The route's MTU (`ip route ... mtu`) counts, not only the
/// egress device's, and without the four bytes of VLAN slack the kernel
/// allows when it checks the skb itself (`ip_len` 0).
#[inline(always)]
pub fn fib4_lookup_fitting(
    raw_ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    flow: &Ipv4Flow,
    ip_len: u16,
) -> Option<NextHop> {
    let mut params = skb::fib_params();
    params.family = AF_INET;
    params.l4_protocol = flow.proto;
    params.sport = flow.src_port;
    params.dport = flow.dst_port;
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_3.ipv4_src = flow.src_addr;
    params.__bindgen_anon_4.ipv4_dst = flow.dst_addr;
    fib_result(raw_ctx, &mut params)
}

/// The IPv6 tuple of a packet to route: addresses as in the header, ports
/// in network order.
pub struct Route6<'a> {
    pub src_addr: &'a Ipv6Bytes,
    pub dst_addr: &'a Ipv6Bytes,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl<'a> Route6<'a> {
    /// The route of `flow` as it is now.
    #[inline(always)]
    pub fn of(flow: &'a Ipv6Flow) -> Self {
        Self {
            src_addr: &flow.src_addr,
            dst_addr: &flow.dst_addr,
            src_port: flow.src_port,
            dst_port: flow.dst_port,
            proto: flow.proto,
        }
    }
}

/// [`fib4_lookup`] for IPv6 (`AF_INET6`).
#[inline(always)]
pub fn fib6_lookup(
    raw_ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    route: &Route6,
) -> Option<NextHop> {
    fib6_lookup_fitting(raw_ctx, ingress_ifindex, route, 0)
}

/// [`fib4_lookup_fitting`] for IPv6: `ip_len` is the packet's length from
/// its IPv6 header on (0: no MTU check). IPv6 routers never fragment, so
/// a packet that does not fit goes to the stack, which answers the sender
/// with a Packet Too Big.
#[inline(always)]
pub fn fib6_lookup_fitting(
    raw_ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    route: &Route6,
    ip_len: u16,
) -> Option<NextHop> {
    let mut params = skb::fib_params();
    params.family = AF_INET6;
    params.l4_protocol = route.proto;
    params.sport = route.src_port;
    params.dport = route.dst_port;
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_3.ipv6_src = words(route.src_addr);
    params.__bindgen_anon_4.ipv6_dst = words(route.dst_addr);
    fib_result(raw_ctx, &mut params)
}

/// The address's bytes as the four words the FIB parameters hold, in
/// memory order.
#[inline(always)]
fn words(addr: &Ipv6Bytes) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ]);
    }
    out
}

#[inline(always)]
fn fib_result(
    raw_ctx: *mut core::ffi::c_void,
    params: &mut aya_ebpf::bindings::bpf_fib_lookup,
) -> Option<NextHop> {
    let ret = skb::fib_lookup(raw_ctx, params, 0);
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..].copy_from_slice(&params.smac);
        return Some(NextHop {
            ifindex: params.ifindex,
            macs: Some(macs),
        });
    }
    if ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Some(NextHop {
            ifindex: params.ifindex,
            macs: None,
        });
    }
    None
}
