//! Reverse translation of ICMP errors about translated flows.
//!
//! A backend (or a router on the way) that answers a client's packet with an
//! ICMP error (port unreachable, fragmentation needed, time exceeded) quotes
//! the packet as the backend saw it: to the backend's address and port. The
//! client's socket only matches errors about what it sent, the service
//! address and port, so without this a UDP client waits for a timeout
//! instead of getting ECONNREFUSED, and path MTU discovery through a service
//! breaks. Linux conntrack does the same for related ICMP errors.

use aya_ebpf::programs::TcContext;
use dataplane_common::{ct_dir, ct_flags, CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    conntrack::ct4_get,
    csum::{csum4_replace_ip, csum_replace_plain},
    nat::RewriteError,
    parse::{Ipv4Hdr, IP_CSUM_OFF, IP_OFF, IP_SRC_OFF},
};

pub const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Type, code, checksum, and 4 bytes that depend on the type.
const ICMP_HLEN: usize = 8;

/// An ICMP error about a flow of ours, located in the packet.
pub struct IcmpError {
    outer_src: u32,
    /// Offset of the ICMP checksum.
    icmp_csum_off: usize,
    /// Offset of the quoted IPv4 header.
    inner_off: usize,
    inner_dst: u32,
    /// Offset of the quoted L4 header (its ports).
    inner_l4_off: usize,
    inner_dst_port: u16,
    pub ct: CtEntry,
}

/// Finds the flow an ICMP error towards a client pod is about. `None` for
/// anything else: not an error type we translate, truncated, a fragment, or
/// no conntrack entry (not one of ours).
#[inline(always)]
pub fn icmp4_error_flow(ctx: &TcContext, outer: &Ipv4Hdr) -> Option<IcmpError> {
    if outer.proto != IPPROTO_ICMP
        || outer.ver_ihl >> 4 != 4
        || u16::from_be(outer.frag_off) & 0x3fff != 0
    {
        return None;
    }
    let outer_hlen = ((outer.ver_ihl & 0x0f) as usize) * 4;
    if outer_hlen < 20 {
        return None;
    }
    let icmp_off = IP_OFF + outer_hlen;
    let icmp_type: u8 = ctx.load(icmp_off).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_off = icmp_off + ICMP_HLEN;
    let inner: Ipv4Hdr = ctx.load(inner_off).ok()?;
    if inner.ver_ihl >> 4 != 4 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return None;
    }
    let inner_hlen = ((inner.ver_ihl & 0x0f) as usize) * 4;
    if inner_hlen < 20 {
        return None;
    }
    let inner_l4_off = inner_off + inner_hlen;
    // The quoted packet went client -> backend; its reply entry is
    // backend -> client.
    let ports: [u16; 2] = ctx.load(inner_l4_off).ok()?;
    let key = CtKey {
        src_addr: inner.dst_addr,
        dst_addr: inner.src_addr,
        src_port: ports[1],
        dst_port: ports[0],
        proto: inner.proto,
        direction: ct_dir::REPLY,
        _pad: [0; 2],
    };
    let ct = ct4_get(&key)?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        return None;
    }
    Some(IcmpError {
        outer_src: outer.src_addr,
        icmp_csum_off: icmp_off + 2,
        inner_off,
        inner_dst: inner.dst_addr,
        inner_l4_off,
        inner_dst_port: ports[1],
        ct,
    })
}

/// Makes the error about the service instead of the backend: the quoted
/// destination becomes the service address and port (with the quoted IPv4
/// checksum and the ICMP checksum updated), and an error sent by the backend
/// itself comes from the service address, as its replies do. The quoted L4
/// checksum is left alone: the quote is usually truncated before it, and
/// receivers match errors to sockets by addresses and ports only.
#[inline(always)]
pub fn icmp4_reverse_translate(ctx: &TcContext, error: &IcmpError) -> Result<(), RewriteError> {
    let ct = &error.ct;
    let inner_csum_off = error.inner_off + 10;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    csum4_replace_ip(ctx, inner_csum_off, error.inner_dst, ct.service_addr)
        .map_err(|_| RewriteError)?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    icmp_csum_replace(ctx, error, old_inner_csum as u32, new_inner_csum as u32, 2)?;
    icmp_csum_replace(ctx, error, error.inner_dst, ct.service_addr, 4)?;
    ctx.store(error.inner_off + 16, &ct.service_addr, 0)
        .map_err(|_| RewriteError)?;
    icmp_csum_replace(
        ctx,
        error,
        error.inner_dst_port as u32,
        ct.service_port as u32,
        2,
    )?;
    ctx.store(error.inner_l4_off + 2, &ct.service_port, 0)
        .map_err(|_| RewriteError)?;

    if error.outer_src == ct.backend_addr {
        csum4_replace_ip(ctx, IP_CSUM_OFF, error.outer_src, ct.service_addr)
            .map_err(|_| RewriteError)?;
        ctx.store(IP_SRC_OFF, &ct.service_addr, 0)
            .map_err(|_| RewriteError)?;
    }
    Ok(())
}

/// ICMP has no pseudo header: its checksum follows every changed word.
#[inline(always)]
fn icmp_csum_replace(
    ctx: &TcContext,
    error: &IcmpError,
    old: u32,
    new: u32,
    size: u64,
) -> Result<(), RewriteError> {
    csum_replace_plain(ctx, error.icmp_csum_off, old, new, size).map_err(|_| RewriteError)
}
