//! Address and port rewrites with incremental checksum updates.

use aya_ebpf::programs::TcContext;
use dataplane_common::IPPROTO_UDP;

use crate::parse::{Ipv4Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF};

/// The L4 checksum covers the pseudo header, so address changes update it too.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// A UDP checksum of 0 means "none": keep it 0 instead of making one up.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Rewrite failed in a checksum or store helper. The packet may be half
/// rewritten and must be dropped.
pub struct RewriteError;

#[inline(always)]
fn l4_flags(flow: &Ipv4Flow) -> u64 {
    if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        flow.l4_csum_off(),
        old as u64,
        new as u64,
        BPF_F_PSEUDO_HDR | l4_flags(flow) | 4,
    )
    .map_err(|_| RewriteError)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| RewriteError)?;
    ctx.store(off, &new, 0).map_err(|_| RewriteError)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        flow.l4_csum_off(),
        old as u64,
        new as u64,
        l4_flags(flow) | 2,
    )
    .map_err(|_| RewriteError)?;
    ctx.store(off, &new, 0).map_err(|_| RewriteError)
}

/// DNAT: destination becomes `addr:port` (network byte order).
#[inline(always)]
pub fn nat4_rewrite_dst(
    ctx: &TcContext,
    flow: &mut Ipv4Flow,
    addr: u32,
    port: u16,
) -> Result<(), RewriteError> {
    rewrite_addr(ctx, flow, IP_DST_OFF, flow.dst_addr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off() + 2, flow.dst_port, port)?;
    flow.dst_addr = addr;
    flow.dst_port = port;
    Ok(())
}

/// SNAT / reverse translation: source becomes `addr:port`.
#[inline(always)]
pub fn nat4_rewrite_src(
    ctx: &TcContext,
    flow: &mut Ipv4Flow,
    addr: u32,
    port: u16,
) -> Result<(), RewriteError> {
    rewrite_addr(ctx, flow, IP_SRC_OFF, flow.src_addr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off(), flow.src_port, port)?;
    flow.src_addr = addr;
    flow.src_port = port;
    Ok(())
}
