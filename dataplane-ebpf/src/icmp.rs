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
use dataplane_common::{
    ct_dir, ct_flags, nat_dir, CtEntry, CtKey, NatEntry, NatKey, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    conntrack::{ct4_get, ct4_lookup},
    csum::{csum4_replace_ip, csum_replace_plain},
    maps::nat_get,
    nat::RewriteError,
    parse::{Ipv4Hdr, IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF},
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

/// An ICMP error about a SNATed external flow: it quotes a packet this node
/// sent to a remote backend from its SNAT address and port (a router on
/// the way needing fragmentation, above all) and so arrives at that
/// address.
pub struct NatIcmpError {
    outer_src: u32,
    outer_dst: u32,
    icmp_csum_off: usize,
    inner_off: usize,
    inner_l4_off: usize,
    inner_src: u32,
    inner_dst: u32,
    inner_src_port: u16,
    inner_dst_port: u16,
    pub nat: NatEntry,
}

/// The quoted IPv4 header and L4 ports of an ICMP error (destination
/// unreachable, time exceeded) about TCP or UDP: (ICMP offset, inner
/// offset, inner L4 offset, inner header, ports).
#[inline(always)]
fn icmp4_quote(
    ctx: &TcContext,
    outer: &Ipv4Hdr,
) -> Option<(usize, usize, usize, Ipv4Hdr, [u16; 2])> {
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
    let ports: [u16; 2] = ctx.load(inner_l4_off).ok()?;
    Some((icmp_off, inner_off, inner_l4_off, inner, ports))
}

/// Finds the SNATed flow an ICMP error arriving from outside is about.
#[inline(always)]
pub fn icmp4_nat_error_flow(ctx: &TcContext, outer: &Ipv4Hdr) -> Option<NatIcmpError> {
    let (icmp_off, inner_off, inner_l4_off, inner, ports) = icmp4_quote(ctx, outer)?;
    // The quoted packet went SNAT address -> backend; the flow's reply
    // entry is backend -> SNAT address.
    let key = NatKey {
        src_addr: inner.dst_addr,
        dst_addr: inner.src_addr,
        src_port: ports[1],
        dst_port: ports[0],
        proto: inner.proto,
        direction: nat_dir::REPLY,
        _pad: [0; 2],
    };
    let nat = nat_get(&key)?;
    Some(NatIcmpError {
        outer_src: outer.src_addr,
        outer_dst: outer.dst_addr,
        icmp_csum_off: icmp_off + 2,
        inner_off,
        inner_l4_off,
        inner_src: inner.src_addr,
        inner_dst: inner.dst_addr,
        inner_src_port: ports[0],
        inner_dst_port: ports[1],
        nat,
    })
}

/// Makes the error about what the client sent (client -> frontend) and
/// addresses it to the client; an error from the backend itself comes
/// from the frontend, as its replies do.
#[inline(always)]
pub fn icmp4_nat_reverse_translate(ctx: &TcContext, e: &NatIcmpError) -> Result<(), RewriteError> {
    let nat = &e.nat;
    let csum = |old: u32, new: u32, size: u64| {
        csum_replace_plain(ctx, e.icmp_csum_off, old, new, size).map_err(|_| RewriteError)
    };
    let inner_csum_off = e.inner_off + 10;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    csum4_replace_ip(ctx, inner_csum_off, e.inner_src, nat.client_addr)
        .map_err(|_| RewriteError)?;
    csum4_replace_ip(ctx, inner_csum_off, e.inner_dst, nat.frontend_addr)
        .map_err(|_| RewriteError)?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    csum(old_inner_csum as u32, new_inner_csum as u32, 2)?;
    csum(e.inner_src, nat.client_addr, 4)?;
    ctx.store(e.inner_off + 12, &nat.client_addr, 0)
        .map_err(|_| RewriteError)?;
    csum(e.inner_dst, nat.frontend_addr, 4)?;
    ctx.store(e.inner_off + 16, &nat.frontend_addr, 0)
        .map_err(|_| RewriteError)?;
    csum(e.inner_src_port as u32, nat.client_port as u32, 2)?;
    ctx.store(e.inner_l4_off, &nat.client_port, 0)
        .map_err(|_| RewriteError)?;
    csum(e.inner_dst_port as u32, nat.frontend_port as u32, 2)?;
    ctx.store(e.inner_l4_off + 2, &nat.frontend_port, 0)
        .map_err(|_| RewriteError)?;

    csum4_replace_ip(ctx, IP_CSUM_OFF, e.outer_dst, nat.client_addr).map_err(|_| RewriteError)?;
    ctx.store(IP_DST_OFF, &nat.client_addr, 0)
        .map_err(|_| RewriteError)?;
    if e.outer_src == nat.backend_addr {
        csum4_replace_ip(ctx, IP_CSUM_OFF, e.outer_src, nat.frontend_addr)
            .map_err(|_| RewriteError)?;
        ctx.store(IP_SRC_OFF, &nat.frontend_addr, 0)
            .map_err(|_| RewriteError)?;
    }
    Ok(())
}

/// The outer addresses after [`icmp4_nat_reverse_translate`].
#[inline(always)]
pub fn icmp4_nat_translated_outer(e: &NatIcmpError) -> (u32, u32) {
    let src = if e.outer_src == e.nat.backend_addr {
        e.nat.frontend_addr
    } else {
        e.outer_src
    };
    (src, e.nat.client_addr)
}

/// An ICMP error from outside about a flow to a local backend (no SNAT,
/// only conntrack): it quotes a reply this node sent the client from the
/// frontend (a router on the way needing fragmentation, above all) and so
/// arrives at the frontend's address.
pub struct LocalIcmpError {
    outer_dst: u32,
    icmp_csum_off: usize,
    inner_off: usize,
    inner_l4_off: usize,
    inner_src: u32,
    inner_src_port: u16,
    pub ct: CtEntry,
}

/// Finds the flow to a local backend an ICMP error arriving from outside
/// is about: one addressed to the quoted reply's source (the frontend),
/// whose quote (frontend -> client) is the REPLY of a tracked flow.
/// `None` for anything else, truncated quotes and hairpin flows included.
#[inline(always)]
pub fn icmp4_local_error_flow(ctx: &TcContext, outer: &Ipv4Hdr) -> Option<LocalIcmpError> {
    let (icmp_off, inner_off, inner_l4_off, inner, ports) = icmp4_quote(ctx, outer)?;
    if inner.src_addr != outer.dst_addr {
        return None;
    }
    // The quoted packet went frontend -> client; the flow's ORIGINAL
    // entry is client -> frontend.
    let key = CtKey {
        src_addr: inner.dst_addr,
        dst_addr: inner.src_addr,
        src_port: ports[1],
        dst_port: ports[0],
        proto: inner.proto,
        direction: ct_dir::ORIGINAL,
        _pad: [0; 2],
    };
    let ct = ct4_lookup(&key)?.get();
    if ct.flags & ct_flags::HAIRPIN != 0 {
        return None;
    }
    Some(LocalIcmpError {
        outer_dst: outer.dst_addr,
        icmp_csum_off: icmp_off + 2,
        inner_off,
        inner_l4_off,
        inner_src: inner.src_addr,
        inner_src_port: ports[0],
        ct,
    })
}

/// Makes the error about what the backend sent (backend -> client) and
/// addresses it to the backend, as the flow's packets from the client
/// are DNATed; the quoted L4 checksum is left alone (see
/// [`icmp4_reverse_translate`]).
#[inline(always)]
pub fn icmp4_local_translate(ctx: &TcContext, e: &LocalIcmpError) -> Result<(), RewriteError> {
    let ct = &e.ct;
    let csum = |old: u32, new: u32, size: u64| {
        csum_replace_plain(ctx, e.icmp_csum_off, old, new, size).map_err(|_| RewriteError)
    };
    let inner_csum_off = e.inner_off + 10;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    csum4_replace_ip(ctx, inner_csum_off, e.inner_src, ct.backend_addr)
        .map_err(|_| RewriteError)?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| RewriteError)?;
    csum(old_inner_csum as u32, new_inner_csum as u32, 2)?;
    csum(e.inner_src, ct.backend_addr, 4)?;
    ctx.store(e.inner_off + 12, &ct.backend_addr, 0)
        .map_err(|_| RewriteError)?;
    csum(e.inner_src_port as u32, ct.backend_port as u32, 2)?;
    ctx.store(e.inner_l4_off, &ct.backend_port, 0)
        .map_err(|_| RewriteError)?;

    csum4_replace_ip(ctx, IP_CSUM_OFF, e.outer_dst, ct.backend_addr).map_err(|_| RewriteError)?;
    ctx.store(IP_DST_OFF, &ct.backend_addr, 0)
        .map_err(|_| RewriteError)
}
