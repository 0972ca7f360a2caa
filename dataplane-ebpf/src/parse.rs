//! Header parsing, once for tc and XDP: reads go through
//! `PacketCtx::load`, bounds-checked against the packet (on tc through
//! `bpf_skb_load_bytes`, which also works on non-linear buffers and stays
//! valid after the checksum helpers; on XDP through direct packet access).

use dataplane_common::{FragKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{ctx::PacketCtx, maps::frag_get};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why a packet is not a candidate for translation.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// Not IPv4 TCP/UDP: not ours, pass it on.
    NotIpv4L4,
    /// IPv4 TCP/UDP that cannot be handled safely (truncated, bad lengths).
    /// Never rewritten. Carries the destination address when the IPv4
    /// header was readable (0 otherwise) so callers can count drops towards
    /// service IPs only.
    Malformed { dst_addr: u32 },
    /// A later fragment (no L4 header) of a datagram whose first fragment
    /// was not tracked: its ports are unknown.
    UnknownFragment { dst_addr: u32 },
}

/// Where a packet stands in its datagram.
pub mod frag {
    /// A whole datagram.
    pub const NONE: u8 = 0;
    /// The first fragment: carries the L4 header, but its UDP length and
    /// checksum cover the whole datagram.
    pub const FIRST: u8 = 1;
    /// A later fragment: no L4 header; its ports come from `FRAGMENTS`.
    pub const LATER: u8 = 2;
}

/// The IPv4 4-tuple and what the datapath needs to rewrite it.
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    /// Addresses and ports in network byte order, as in the packet.
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// IPv4 header length in bytes (20 without options).
    pub ip_hlen: usize,
    /// Length of the IPv4 datagram: the header's total length, or for a
    /// BIG TCP super-packet (total length 0) the length of the skb's data.
    pub ip_tot_len: u32,
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers (host order), for resets.
    pub tcp_seq: u32,
    pub tcp_ack_seq: u32,
    /// TCP header length in bytes.
    pub tcp_hlen: usize,
    /// One of [`frag`].
    pub frag: u8,
    /// IPv4 identification (network byte order), which ties fragments
    /// together.
    pub ip_id: u16,
}

impl Ipv4Flow {
    /// Key of this packet's datagram in `FRAGMENTS`.
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            id: self.ip_id,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// Whether the packet has an L4 header (ports, checksum) to rewrite.
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.frag != frag::LATER
    }

    pub fn l4_off(&self) -> usize {
        IP_OFF + self.ip_hlen
    }

    /// Offset of the L4 checksum field.
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off() + 16
        } else {
            self.l4_off() + 6
        }
    }
}

/// Fixed part of the IPv4 header, as laid out on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src_addr: u32,
    pub dst_addr: u32,
}

/// First 16 bytes of the TCP header (enough for ports, seq, ack and flags).
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

/// The IPv4 header of an Ethernet/IPv4 packet, unchecked beyond that.
#[inline(always)]
pub fn parse_ipv4_header<C: PacketCtx>(ctx: &C) -> Option<Ipv4Hdr> {
    let ether_type: u16 = ctx.load(12)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    ctx.load(IP_OFF)
}

/// Parses Ethernet/IPv4/(TCP|UDP). Anything that is not a complete IPv4
/// TCP/UDP header chain inside the packet is refused; a later fragment
/// takes its ports from its first fragment (`FRAGMENTS`), as Cilium does.
#[inline(always)]
pub fn parse_ipv4_flow<C: PacketCtx>(ctx: &C) -> Result<Ipv4Flow, ParseError> {
    let ether_type: u16 = ctx.load(12).ok_or(ParseError::NotIpv4L4)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return Err(ParseError::NotIpv4L4);
    }
    let ip: Ipv4Hdr = ctx
        .load(IP_OFF)
        .ok_or(ParseError::Malformed { dst_addr: 0 })?;
    let malformed = ParseError::Malformed {
        dst_addr: ip.dst_addr,
    };
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(ParseError::NotIpv4L4);
    }
    if ip.ver_ihl >> 4 != 4 {
        return Err(malformed);
    }
    let ip_hlen = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ip_hlen < 20 {
        return Err(malformed);
    }
    let frag_off = u16::from_be(ip.frag_off);
    let frag = if frag_off & IP_OFFSET_MASK != 0 {
        frag::LATER
    } else if frag_off & IP_MF != 0 {
        frag::FIRST
    } else {
        frag::NONE
    };
    let tot_len = match u16::from_be(ip.tot_len) {
        // BIG TCP: a GSO super-packet longer than 64 KiB carries total length
        // 0 and is as long as the skb (the kernel's `skb_ip_totlen`).
        0 if ip.proto == IPPROTO_TCP && ctx.is_gso() => ctx.packet_len() - ETH_HLEN as u32,
        len => u32::from(len),
    };
    // The IP datagram must fit in the frame (trailing padding is allowed).
    if tot_len + (ETH_HLEN as u32) > ctx.packet_len() {
        return Err(malformed);
    }
    let l4_off = IP_OFF + ip_hlen;
    let mut flow = Ipv4Flow {
        src_addr: ip.src_addr,
        dst_addr: ip.dst_addr,
        src_port: 0,
        dst_port: 0,
        proto: ip.proto,
        ip_hlen,
        ip_tot_len: tot_len,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_ack_seq: 0,
        tcp_hlen: 0,
        frag,
        ip_id: ip.id,
    };
    if frag == frag::LATER {
        if ip_hlen as u32 > tot_len {
            return Err(malformed);
        }
        let Some(ports) = frag_get(&flow.frag_key()) else {
            return Err(ParseError::UnknownFragment {
                dst_addr: ip.dst_addr,
            });
        };
        flow.src_port = ports.src_port;
        flow.dst_port = ports.dst_port;
        return Ok(flow);
    }
    if ip.proto == IPPROTO_TCP {
        let tcp: TcpHdrHead = ctx.load(l4_off).ok_or(malformed)?;
        let tcp_hlen = ((tcp.doff_res >> 4) as usize) * 4;
        if tcp_hlen < 20 || ip_hlen + tcp_hlen > tot_len as usize {
            return Err(malformed);
        }
        // The checksum field (bytes 16..18) must be inside the packet too.
        let _: u32 = ctx.load(l4_off + 16).ok_or(malformed)?;
        flow.src_port = tcp.src_port;
        flow.dst_port = tcp.dst_port;
        flow.tcp_flags = tcp.flags;
        flow.tcp_seq = u32::from_be(tcp.seq);
        flow.tcp_ack_seq = u32::from_be(tcp.ack_seq);
        flow.tcp_hlen = tcp_hlen;
    } else {
        let udp: UdpHdr = ctx.load(l4_off).ok_or(malformed)?;
        let udp_len = u16::from_be(udp.len) as usize;
        // A first fragment holds only part of what the UDP length covers.
        let fits = frag == frag::FIRST || ip_hlen + udp_len <= tot_len as usize;
        if udp_len < 8 || !fits {
            return Err(malformed);
        }
        flow.src_port = udp.src_port;
        flow.dst_port = udp.dst_port;
    }
    Ok(flow)
}
