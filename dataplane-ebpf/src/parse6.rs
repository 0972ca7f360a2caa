//! IPv6 header parsing for the tc programs and the uplink's XDP program:
//! the fixed header, then the extension headers (hop-by-hop, routing,
//! destination options, fragment) up to a fixed number, then TCP or UDP.
//! Reads go through `PacketCtx::load_far`: `bpf_skb_load_bytes` on tc, as
//! the IPv4 parser's do, and bounded direct access on XDP (a header past
//! that bound makes the frame `Malformed` there, and XDP leaves it to tc).

use aya_ebpf::programs::TcContext;
use dataplane_common::{Frag6Key, Ipv6Bytes, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    ctx::PacketCtx,
    maps::frag6_get,
    parse::{frag, ETH_HLEN},
    skb,
};

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IP6_OFF: usize = ETH_HLEN;
pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = IP6_OFF + 8;
pub const IP6_DST_OFF: usize = IP6_OFF + 24;
/// Where the L4 header starts when there are no extension headers.
pub const IP6_L4_OFF: usize = IP6_OFF + IP6_HLEN;

pub const IPPROTO_ICMPV6: u8 = 58;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Fragment header: offset in 8-byte units (top 13 bits), M flag (bit 0).
const IP6_OFFSET_MASK: u16 = 0xfff8;
const IP6_MF: u16 = 0x0001;

/// Extension headers walked before giving up: as many as a packet carries
/// in practice (hop-by-hop, destination options, routing, fragment), as
/// Cilium bounds it.
pub const IP6_EXT_HEADERS_MAX: usize = 4;

/// Why an IPv6 packet is not a candidate for translation.
#[derive(Clone, Copy)]
pub enum Parse6Error {
    /// Not IPv6, or not TCP/UDP (ICMPv6, ESP, ...): not ours, pass it on.
    NotL4,
    /// TCP/UDP that cannot be handled safely (truncated, bad lengths):
    /// never rewritten.
    Malformed,
    /// More extension headers than [`IP6_EXT_HEADERS_MAX`]: passed
    /// untouched.
    PastBound,
    /// A later fragment whose first fragment was not tracked.
    UnknownFragment,
}

// Fieldless on purpose: an error carrying an address leaves undefined
// bytes in the result on the other variants, which LLVM may copy from
// registers the verifier considers unreadable. Callers that need the
// destination read it back with [`ipv6_dst`].

/// The destination address of an IPv6 frame.
#[inline(always)]
pub fn ipv6_dst<C: PacketCtx>(ctx: &C) -> Option<Ipv6Bytes> {
    ctx.load_far(IP6_DST_OFF)
}

/// The IPv6 4-tuple and what the datapath needs to rewrite it.
#[derive(Clone, Copy, Default)]
pub struct Ipv6Flow {
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
    /// Network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`frag`].
    pub frag: u8,
    pub tcp_flags: u8,
    /// TCP header length in bytes.
    pub tcp_hlen: u8,
    /// Offset of the L4 header (after the extension headers); for a later
    /// fragment, of its fragment data.
    pub l4_off: u32,
    /// Bytes after the fixed IPv6 header (its payload length, or for a BIG
    /// TCP super-packet the rest of the skb).
    pub payload_len: u32,
    /// TCP sequence and acknowledgment numbers (host order), for resets.
    pub tcp_seq: u32,
    pub tcp_ack_seq: u32,
    /// Fragment header identification (network byte order).
    pub frag_id: u32,
}

impl Ipv6Flow {
    #[inline(always)]
    pub fn frag_key(&self) -> Frag6Key {
        Frag6Key {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            id: self.frag_id,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.frag != frag::LATER
    }

    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.l4_off as usize
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off() + 16
        } else {
            self.l4_off() + 6
        }
    }
}

/// Fixed IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src_addr: Ipv6Bytes,
    pub dst_addr: Ipv6Bytes,
}

/// Whether the frame is IPv6, by direct packet access (the dispatch on
/// every packet).
#[inline(always)]
pub fn is_ipv6_frame(ctx: &TcContext) -> bool {
    skb::ether_type(ctx).is_some_and(|t| u16::from_be(t) == ETH_P_IPV6)
}

/// Whether the frame is IPv6 (tc: through `bpf_skb_load_bytes`).
#[inline(always)]
pub fn is_ipv6<C: PacketCtx>(ctx: &C) -> bool {
    ctx.load_far::<u16>(12)
        .is_some_and(|t| u16::from_be(t) == ETH_P_IPV6)
}

/// The fixed IPv6 header of an Ethernet/IPv6 frame.
#[inline(always)]
pub fn parse_ipv6_header<C: PacketCtx>(ctx: &C) -> Option<Ipv6Hdr> {
    if !is_ipv6(ctx) {
        return None;
    }
    let ip: Ipv6Hdr = ctx.load_far(IP6_OFF)?;
    (ip.ver_tc_flow.to_ne_bytes()[0] >> 4 == 6).then_some(ip)
}

/// Where the extension headers end: (upper-layer protocol, its offset,
/// fragment position, fragment identification).
struct Upper {
    proto: u8,
    off: usize,
    frag: u8,
    frag_id: u32,
}

/// Walks the extension headers after the fixed header. `NotL4` for an
/// upper layer other than TCP/UDP; `PastBound` when more than
/// [`IP6_EXT_HEADERS_MAX`] come before it.
#[inline(always)]
fn walk_ext_headers<C: PacketCtx>(ctx: &C, ip: &Ipv6Hdr) -> Result<Upper, Parse6Error> {
    let mut next = ip.next_header;
    let mut off = IP6_L4_OFF;
    let mut position = frag::NONE;
    let mut frag_id = 0u32;
    let mut i = 0;
    while i <= IP6_EXT_HEADERS_MAX {
        if next == IPPROTO_TCP || next == IPPROTO_UDP {
            return Ok(Upper {
                proto: next,
                off,
                frag: position,
                frag_id,
            });
        }
        if i == IP6_EXT_HEADERS_MAX {
            break;
        }
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = ctx.load_far(off).ok_or(Parse6Error::Malformed)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let h: [u8; 8] = ctx.load_far(off).ok_or(Parse6Error::Malformed)?;
                next = h[0];
                off += 8;
                frag_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                let field = u16::from_be_bytes([h[2], h[3]]);
                if field & IP6_OFFSET_MASK != 0 {
                    // No L4 header follows: the fragment's data does.
                    if next != IPPROTO_TCP && next != IPPROTO_UDP {
                        return Err(Parse6Error::NotL4);
                    }
                    return Ok(Upper {
                        proto: next,
                        off,
                        frag: frag::LATER,
                        frag_id,
                    });
                }
                if field & IP6_MF != 0 {
                    position = frag::FIRST;
                }
            }
            _ => return Err(Parse6Error::NotL4),
        }
        i += 1;
    }
    Err(Parse6Error::PastBound)
}

/// First 16 bytes of the TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdrHead {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack_seq: u32,
    doff_res: u8,
    flags: u8,
    window: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHdr {
    src_port: u16,
    dst_port: u16,
    len: u16,
    check: u16,
}

/// Parses Ethernet/IPv6/extension headers/(TCP|UDP); a later fragment takes
/// its ports from its first fragment (`CT6_FRAGMENTS`).
///
/// Out of line, into the caller's `flow` (no copy through a result).
#[inline(never)]
pub fn parse_ipv6_flow_into<C: PacketCtx>(ctx: &C, flow: &mut Ipv6Flow) -> Result<(), Parse6Error> {
    let ip = parse_ipv6_header(ctx).ok_or(Parse6Error::NotL4)?;
    let upper = walk_ext_headers(ctx, &ip)?;
    let payload_len = match u16::from_be(ip.payload_len) {
        // BIG TCP: a GSO super-packet longer than 64 KiB carries payload
        // length 0 and is as long as the skb.
        0 if upper.proto == IPPROTO_TCP && ctx.is_gso() => {
            ctx.packet_len().saturating_sub(IP6_L4_OFF as u32)
        }
        len => u32::from(len),
    };
    let end = IP6_L4_OFF as u32 + payload_len;
    if end > ctx.packet_len() || upper.off as u32 > end {
        return Err(Parse6Error::Malformed);
    }
    *flow = Ipv6Flow {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        src_port: 0,
        dst_port: 0,
        proto: upper.proto,
        frag: upper.frag,
        tcp_flags: 0,
        tcp_hlen: 0,
        l4_off: upper.off as u32,
        payload_len,
        tcp_seq: 0,
        tcp_ack_seq: 0,
        frag_id: upper.frag_id,
    };
    let l4_len = end - upper.off as u32;
    if flow.frag == frag::LATER {
        let Some(ports) = frag6_get(&flow.frag_key()) else {
            return Err(Parse6Error::UnknownFragment);
        };
        flow.src_port = ports.src_port;
        flow.dst_port = ports.dst_port;
        return Ok(());
    }
    if flow.proto == IPPROTO_TCP {
        let tcp: TcpHdrHead = ctx.load_far(upper.off).ok_or(Parse6Error::Malformed)?;
        let tcp_hlen = u32::from(tcp.doff_res >> 4) * 4;
        if tcp_hlen < 20 || tcp_hlen > l4_len {
            return Err(Parse6Error::Malformed);
        }
        // The checksum field is written on rewrite: it must be there too.
        let _: u32 = ctx.load_far(upper.off + 16).ok_or(Parse6Error::Malformed)?;
        flow.src_port = tcp.src_port;
        flow.dst_port = tcp.dst_port;
        flow.tcp_flags = tcp.flags;
        flow.tcp_seq = u32::from_be(tcp.seq);
        flow.tcp_ack_seq = u32::from_be(tcp.ack_seq);
        flow.tcp_hlen = tcp_hlen as u8;
    } else {
        let udp: UdpHdr = ctx.load_far(upper.off).ok_or(Parse6Error::Malformed)?;
        let udp_len = u32::from(u16::from_be(udp.len));
        let fits = flow.frag == frag::FIRST || udp_len <= l4_len;
        if udp_len < 8 || !fits {
            return Err(Parse6Error::Malformed);
        }
        flow.src_port = udp.src_port;
        flow.dst_port = udp.dst_port;
    }
    Ok(())
}
