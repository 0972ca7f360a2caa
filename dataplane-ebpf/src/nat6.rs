//! IPv6 address and port rewrites. IPv6 has no header checksum: an address
//! change only reaches the L4 checksum, through its pseudo header, as the
//! one's-complement difference of the two 16-byte addresses
//! (`bpf_csum_diff`) added with `bpf_l4_csum_replace` (on XDP, its
//! `PacketCtx` equivalent).

use dataplane_common::{Ipv6Bytes, IPPROTO_UDP};

use crate::{
    ctx::{PacketCtx, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    nat::RewriteError,
    parse6::{Ipv6Flow, IP6_DST_OFF, IP6_SRC_OFF},
    skb,
};

/// `bpf_l4_csum_replace`: the packet is IPv6, so a pseudo-header change
/// leaves a CHECKSUM_COMPLETE skb's sum alone (Linux 6.16 on; older kernels
/// refuse the flag and are retried without it).
const BPF_F_IPV6: u64 = 1 << 7;

/// A UDP checksum that comes out 0 is sent as 0xffff: 0 would mean "none",
/// which IPv6 does not allow.
#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// Adds `diff` (a one's-complement difference of pseudo-header bytes) to
/// the L4 checksum at `csum_off`.
#[inline(always)]
pub fn csum6_add_pseudo<C: PacketCtx>(
    ctx: &C,
    csum_off: usize,
    proto: u8,
    diff: u32,
) -> Result<(), RewriteError> {
    let flags = BPF_F_PSEUDO_HDR | l4_flags(proto);
    if ctx
        .l4_csum_replace(csum_off, 0, diff, flags | BPF_F_IPV6)
        .is_ok()
    {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, 0, diff, flags)
        .map_err(|_| RewriteError)
}

/// The checksum difference of an address going from `old` to `new`.
#[inline(always)]
pub fn csum6_addr_diff(old: &Ipv6Bytes, new: &Ipv6Bytes) -> u32 {
    skb::csum_diff16(old, new)
}

#[inline(always)]
fn rewrite_addr<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv6Flow,
    off: usize,
    old: &Ipv6Bytes,
    new: &Ipv6Bytes,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    if flow.has_l4_header() {
        csum6_add_pseudo(
            ctx,
            flow.l4_csum_off(),
            flow.proto,
            csum6_addr_diff(old, new),
        )?;
    }
    // A later fragment: the L4 checksum, in the first fragment, already has
    // the change, and there is no IP header checksum to update.
    ctx.store_far(off, new).map_err(|_| RewriteError)
}

#[inline(always)]
fn rewrite_port<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv6Flow,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteError> {
    if old == new || !flow.has_l4_header() {
        return Ok(());
    }
    ctx.l4_csum_replace(
        flow.l4_csum_off(),
        u32::from(old),
        u32::from(new),
        l4_flags(flow.proto) | 2,
    )
    .map_err(|_| RewriteError)?;
    ctx.store_far(off, &new).map_err(|_| RewriteError)
}

/// DNAT: destination becomes `addr:port` (port in network byte order).
#[inline(always)]
pub fn nat6_rewrite_dst<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    addr: &Ipv6Bytes,
    port: u16,
) -> Result<(), RewriteError> {
    let old = flow.dst_addr;
    rewrite_addr(ctx, flow, IP6_DST_OFF, &old, addr)?;
    rewrite_port(ctx, flow, flow.l4_off() + 2, flow.dst_port, port)?;
    flow.dst_addr = *addr;
    flow.dst_port = port;
    Ok(())
}

/// SNAT / reverse translation: source becomes `addr:port`.
#[inline(always)]
pub fn nat6_rewrite_src<C: PacketCtx>(
    ctx: &C,
    flow: &mut Ipv6Flow,
    addr: &Ipv6Bytes,
    port: u16,
) -> Result<(), RewriteError> {
    let old = flow.src_addr;
    rewrite_addr(ctx, flow, IP6_SRC_OFF, &old, addr)?;
    rewrite_port(ctx, flow, flow.l4_off(), flow.src_port, port)?;
    flow.src_addr = *addr;
    flow.src_port = port;
    Ok(())
}
