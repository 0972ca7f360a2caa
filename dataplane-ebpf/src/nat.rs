//! Address and port rewrites, each with its checksum updates (`csum`).

use crate::{
    csum::{csum4_replace_addr, csum4_replace_ip, csum4_replace_port},
    ctx::PacketCtx,
    parse::{Ipv4Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
};

/// Rewrite failed in a checksum or store helper. The packet may be half
/// rewritten and must be dropped.
pub struct RewriteError;

#[inline(always)]
fn rewrite_addr<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv4Flow,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteError> {
    if old == new {
        return Ok(());
    }
    if flow.has_l4_header() {
        csum4_replace_addr(ctx, flow, old, new).map_err(|_| RewriteError)?;
    } else {
        // A later fragment: the L4 checksum, in the first fragment, already
        // has the change.
        csum4_replace_ip(ctx, IP_CSUM_OFF, old, new).map_err(|_| RewriteError)?;
    }
    ctx.store(off, &new).map_err(|_| RewriteError)
}

#[inline(always)]
fn rewrite_port<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv4Flow,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteError> {
    if old == new || !flow.has_l4_header() {
        return Ok(());
    }
    csum4_replace_port(ctx, flow, old, new).map_err(|_| RewriteError)?;
    ctx.store(off, &new).map_err(|_| RewriteError)
}

/// DNAT: destination becomes `addr:port` (network byte order).
#[inline(always)]
pub fn nat4_rewrite_dst<C: PacketCtx>(
    ctx: &C,
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
pub fn nat4_rewrite_src<C: PacketCtx>(
    ctx: &C,
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
