//! IPv6 test frames, built byte by byte here (extension headers and
//! fragments included), and their checksums computed from the bytes with
//! [`ones_sum`] (independent of the datapath).

use std::net::{Ipv6Addr, SocketAddrV6};

use crate::packets::{be16, ones_sum, CLIENT_MAC, ETH_HLEN, FIN, GATEWAY_MAC, PSH, RST, SYN};

pub const IP6_HLEN: usize = 40;
pub const IP6_L4: usize = ETH_HLEN + IP6_HLEN;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;

/// One extension header before the upper layer.
#[derive(Clone, Copy, Debug)]
pub enum ExtHeader {
    /// Hop-by-hop options: 8 bytes of padding options.
    HopByHop,
    /// Destination options: 16 bytes (length field 1) of padding.
    DestOpts,
    /// Routing header type 4 (segment routing) with segments left 0: 8
    /// bytes.
    Routing,
    /// Fragment header: `offset` in bytes (a multiple of 8).
    Fragment { offset: u16, more: bool, id: u32 },
}

impl ExtHeader {
    fn kind(&self) -> u8 {
        match self {
            ExtHeader::HopByHop => NEXTHDR_HOP,
            ExtHeader::DestOpts => NEXTHDR_DEST,
            ExtHeader::Routing => NEXTHDR_ROUTING,
            ExtHeader::Fragment { .. } => NEXTHDR_FRAGMENT,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            // PadN option covering the 6 bytes after next/length.
            ExtHeader::HopByHop => vec![next, 0, 1, 4, 0, 0, 0, 0],
            ExtHeader::DestOpts => {
                let mut b = vec![next, 1, 1, 12];
                b.resize(16, 0);
                b
            }
            ExtHeader::Routing => vec![next, 0, 4, 0, 0, 0, 0, 0],
            ExtHeader::Fragment { offset, more, id } => {
                let field = offset | u16::from(more);
                let mut b = vec![next, 0];
                b.extend_from_slice(&field.to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

/// An Ethernet/IPv6 frame: `ext` headers, then `upper` (protocol `proto`).
pub fn ipv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: &[ExtHeader],
    proto: u8,
    upper: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, h) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, ExtHeader::kind);
        chain.extend_from_slice(&h.bytes(next));
    }
    let first = ext.first().map_or(proto, ExtHeader::kind);
    let mut f = Vec::new();
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((chain.len() + upper.len()) as u16).to_be_bytes());
    f.push(first);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&chain);
    f.extend_from_slice(upper);
    f
}

/// The checksum of an upper-layer `segment` (TCP, UDP, ICMPv6) with its
/// checksum field zeroed, over the IPv6 pseudo header.
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(segment);
    !ones_sum(&pseudo)
}

fn csum_off(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    }
}

/// `segment` with its checksum filled in (UDP: 0 sent as 0xffff).
pub fn with_checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, mut segment: Vec<u8>) -> Vec<u8> {
    let off = csum_off(proto);
    segment[off..off + 2].fill(0);
    let mut csum = checksum6(src, dst, proto, &segment);
    if proto == PROTO_UDP && csum == 0 {
        csum = 0xffff;
    }
    segment[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    segment
}

/// A TCP header (20 bytes) and payload, checksum 0.
pub fn tcp_segment(
    src_port: u16,
    dst_port: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&src_port.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push(5 << 4);
    t.push(flags & (FIN | SYN | RST | PSH | crate::packets::ACK));
    t.extend_from_slice(&64_240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// A UDP header and payload, checksum 0.
pub fn udp_datagram(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// Description of a TCP/IPv6 packet; `Tcp6::new(..).build()`.
#[derive(Clone)]
pub struct Tcp6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub ext: Vec<ExtHeader>,
}

impl Tcp6 {
    pub fn new(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            seq: 1_000,
            ack: if flags & crate::packets::ACK != 0 {
                5_000
            } else {
                0
            },
            payload: vec![],
            ext: vec![],
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ext(mut self, ext: &[ExtHeader]) -> Self {
        self.ext = ext.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let seg = tcp_segment(
            self.src.port(),
            self.dst.port(),
            self.flags,
            self.seq,
            self.ack,
            &self.payload,
        );
        let seg = with_checksum6(*self.src.ip(), *self.dst.ip(), PROTO_TCP, seg);
        ipv6_frame(*self.src.ip(), *self.dst.ip(), &self.ext, PROTO_TCP, &seg)
    }
}

/// Description of a UDP/IPv6 packet; `Udp6::new(..).build()`.
#[derive(Clone)]
pub struct Udp6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub payload: Vec<u8>,
    pub ext: Vec<ExtHeader>,
}

impl Udp6 {
    pub fn new(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self {
            src,
            dst,
            payload: b"dns query".to_vec(),
            ext: vec![],
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ext(mut self, ext: &[ExtHeader]) -> Self {
        self.ext = ext.to_vec();
        self
    }

    /// The UDP datagram (header and payload) with its checksum.
    pub fn datagram(&self) -> Vec<u8> {
        let d = udp_datagram(self.src.port(), self.dst.port(), &self.payload);
        with_checksum6(*self.src.ip(), *self.dst.ip(), PROTO_UDP, d)
    }

    pub fn build(&self) -> Vec<u8> {
        ipv6_frame(
            *self.src.ip(),
            *self.dst.ip(),
            &self.ext,
            PROTO_UDP,
            &self.datagram(),
        )
    }

    /// The datagram in two fragments: the first `first_len` bytes (a
    /// multiple of 8, with the UDP header) and the rest.
    pub fn fragments(&self, id: u32, first_len: usize) -> [Vec<u8>; 2] {
        let d = self.datagram();
        let (src, dst) = (*self.src.ip(), *self.dst.ip());
        let first = ExtHeader::Fragment {
            offset: 0,
            more: true,
            id,
        };
        let later = ExtHeader::Fragment {
            offset: first_len as u16,
            more: false,
            id,
        };
        [
            ipv6_frame(src, dst, &[first], PROTO_UDP, &d[..first_len]),
            ipv6_frame(src, dst, &[later], PROTO_UDP, &d[first_len..]),
        ]
    }
}

// ---------------------------------------------------------------------------
// Reading raw IPv6 frames.

/// The fixed header's fields and where the upper layer starts (after the
/// extension headers this module builds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub payload_len: usize,
    /// Upper-layer protocol and its offset in the frame.
    pub proto: u8,
    pub l4: usize,
    /// Whether a fragment header came before it.
    pub fragment: bool,
}

fn addr_at(frame: &[u8], off: usize) -> Ipv6Addr {
    let b: [u8; 16] = frame[off..off + 16].try_into().expect("16 bytes");
    Ipv6Addr::from(b)
}

/// The IPv6 fields of a frame.
pub fn ipv6_fields(frame: &[u8]) -> Fields6 {
    assert!(frame.len() >= IP6_L4, "frame shorter than an IPv6 header");
    assert_eq!(frame[12..14], [0x86, 0xdd], "not an IPv6 frame");
    assert_eq!(frame[ETH_HLEN] >> 4, 6, "IPv6 version");
    let mut next = frame[ETH_HLEN + 6];
    let mut off = IP6_L4;
    let mut fragment = false;
    loop {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let len = (usize::from(frame[off + 1]) + 1) * 8;
                next = frame[off];
                off += len;
            }
            NEXTHDR_FRAGMENT => {
                next = frame[off];
                off += 8;
                fragment = true;
            }
            _ => break,
        }
    }
    Fields6 {
        src: addr_at(frame, ETH_HLEN + 8),
        dst: addr_at(frame, ETH_HLEN + 24),
        payload_len: usize::from(be16(frame, ETH_HLEN + 4)),
        proto: next,
        l4: off,
        fragment,
    }
}

/// Source and destination of a TCP/UDP frame.
pub fn endpoints6(frame: &[u8]) -> (SocketAddrV6, SocketAddrV6) {
    let f = ipv6_fields(frame);
    (
        SocketAddrV6::new(f.src, be16(frame, f.l4), 0, 0),
        SocketAddrV6::new(f.dst, be16(frame, f.l4 + 2), 0, 0),
    )
}

/// The upper-layer checksum of an unfragmented frame is right (computed
/// here over the pseudo header; a UDP checksum of 0 is wrong on IPv6).
pub fn l4_checksum6_ok(frame: &[u8]) -> bool {
    let f = ipv6_fields(frame);
    assert!(
        !f.fragment,
        "a fragment's checksum covers the whole datagram"
    );
    let end = IP6_L4 + f.payload_len;
    assert!(end <= frame.len(), "payload length past the frame");
    let seg = &frame[f.l4..end];
    if f.proto == PROTO_UDP && be16(seg, 6) == 0 {
        return false;
    }
    // The segment with its checksum sums to zero (0xffff) with the pseudo
    // header; !checksum6 is that sum without the stored checksum.
    let mut pseudo = Vec::with_capacity(40 + seg.len());
    pseudo.extend_from_slice(&f.src.octets());
    pseudo.extend_from_slice(&f.dst.octets());
    pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, f.proto]);
    pseudo.extend_from_slice(seg);
    ones_sum(&pseudo) == 0xffff
}
