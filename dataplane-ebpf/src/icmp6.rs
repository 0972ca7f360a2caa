//! Reverse translation of ICMPv6 errors about translated flows, above all
//! Packet Too Big: IPv6 routers never fragment, so path MTU discovery
//! through a service depends on the client getting it about the service
//! address it sent to. As `icmp` does for IPv4: the quoted destination
//! becomes the service address and port, and an error from the backend
//! itself comes from the service address. The ICMPv6 checksum covers a
//! pseudo header: the outer source change is added as a pseudo-header
//! change, the quote's changes as plain ones. NDP and every other ICMPv6
//! message pass untouched.

use aya_ebpf::programs::TcContext;
use dataplane_common::{ct_dir, ct_flags, Ct6Entry, Ct6Key, Ipv6Bytes, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    csum::csum_replace_plain,
    maps::ct6_get,
    nat::RewriteError,
    nat6::{csum6_add_pseudo, csum6_addr_diff},
    parse6::{Ipv6Hdr, IP6_HLEN, IP6_L4_OFF, IP6_SRC_OFF, IPPROTO_ICMPV6},
    reject6::ICMPV6_DEST_UNREACH,
};

const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// Type, code, checksum, and 4 bytes that depend on the type (the MTU of
/// a Packet Too Big).
const ICMPV6_HLEN: usize = 8;
const ICMPV6_CSUM_OFF: usize = IP6_L4_OFF + 2;
const INNER_OFF: usize = IP6_L4_OFF + ICMPV6_HLEN;
const INNER_DST_OFF: usize = INNER_OFF + 24;
const INNER_L4_OFF: usize = INNER_OFF + IP6_HLEN;

/// An ICMPv6 error about a flow of ours.
pub struct Icmp6Error {
    pub outer_src: Ipv6Bytes,
    inner_dst: Ipv6Bytes,
    inner_dst_port: u16,
    pub ct: Ct6Entry,
}

/// Finds the flow an ICMPv6 error towards a client pod is about: an error
/// right after the fixed header quoting TCP or UDP right after its fixed
/// header (what routers and backends send). `None` for anything else.
#[inline(always)]
pub fn icmp6_error_flow(ctx: &TcContext, outer: &Ipv6Hdr) -> Option<Icmp6Error> {
    if outer.next_header != IPPROTO_ICMPV6 {
        return None;
    }
    let icmp_type: u8 = ctx.load(IP6_L4_OFF).ok()?;
    if icmp_type != ICMPV6_PKT_TOOBIG
        && icmp_type != ICMPV6_DEST_UNREACH
        && icmp_type != ICMPV6_TIME_EXCEED
    {
        return None;
    }
    let inner: Ipv6Hdr = ctx.load(INNER_OFF).ok()?;
    if inner.next_header != IPPROTO_TCP && inner.next_header != IPPROTO_UDP {
        return None;
    }
    // The quoted packet went client -> backend; its reply entry is
    // backend -> client.
    let ports: [u16; 2] = ctx.load(INNER_L4_OFF).ok()?;
    let key = Ct6Key {
        src_addr: inner.dst_addr,
        dst_addr: inner.src_addr,
        src_port: ports[1],
        dst_port: ports[0],
        proto: inner.next_header,
        direction: ct_dir::REPLY,
        _pad: [0; 2],
    };
    let ct = ct6_get(&key)?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        return None;
    }
    Some(Icmp6Error {
        outer_src: outer.src_addr,
        inner_dst: inner.dst_addr,
        inner_dst_port: ports[1],
        ct,
    })
}

/// Makes the error about the service instead of the backend (see the
/// module comment). The quoted L4 checksum is left alone, as on IPv4:
/// receivers match errors to sockets by addresses and ports.
#[inline(always)]
pub fn icmp6_reverse_translate(ctx: &TcContext, error: &Icmp6Error) -> Result<(), RewriteError> {
    let ct = &error.ct;
    if error.inner_dst != ct.service_addr {
        let diff = csum6_addr_diff(&error.inner_dst, &ct.service_addr);
        // A plain change of bytes the checksum covers (diff mode, size 0).
        csum_replace_plain(ctx, ICMPV6_CSUM_OFF, 0, diff, 0).map_err(|_| RewriteError)?;
        ctx.store(INNER_DST_OFF, &ct.service_addr, 0)
            .map_err(|_| RewriteError)?;
    }
    csum_replace_plain(
        ctx,
        ICMPV6_CSUM_OFF,
        u32::from(error.inner_dst_port),
        u32::from(ct.service_port),
        2,
    )
    .map_err(|_| RewriteError)?;
    ctx.store(INNER_L4_OFF + 2, &ct.service_port, 0)
        .map_err(|_| RewriteError)?;

    if error.outer_src == ct.backend_addr {
        let diff = csum6_addr_diff(&error.outer_src, &ct.service_addr);
        csum6_add_pseudo(ctx, ICMPV6_CSUM_OFF, IPPROTO_ICMPV6, diff)?;
        ctx.store(IP6_SRC_OFF, &ct.service_addr, 0)
            .map_err(|_| RewriteError)?;
    }
    Ok(())
}
