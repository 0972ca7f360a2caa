//! Building test packets with etherparse, reading fields back from raw bytes,
//! and checking checksums with an RFC 1071 sum written here (independent of
//! both the datapath and etherparse).

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4Options, TcpHeader, UdpHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ETH_HLEN: usize = 14;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Description of a TCP/IPv4 packet; `Tcp::new(..).build()`.
#[derive(Clone)]
pub struct Tcp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
}

impl Tcp {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            seq: 1_000,
            ack: if flags & ACK != 0 { 5_000 } else { 0 },
            payload: vec![],
            ip_options: vec![],
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, 64_240);
        tcp.fin = self.flags & FIN != 0;
        tcp.syn = self.flags & SYN != 0;
        tcp.rst = self.flags & RST != 0;
        tcp.psh = self.flags & PSH != 0;
        tcp.ack = self.flags & ACK != 0;
        tcp.acknowledgment_number = self.ack;
        let ip = ipv4_header(
            self.src,
            self.dst,
            IpNumber::TCP,
            &self.ip_options,
            tcp.header_len() + self.payload.len(),
        );
        tcp.checksum = tcp
            .calc_checksum_ipv4(&ip, &self.payload)
            .expect("tcp checksum");
        frame(&ip, &tcp.to_bytes(), &self.payload)
    }
}

/// Description of a UDP/IPv4 packet; `Udp::new(..).build()`.
#[derive(Clone)]
pub struct Udp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
    /// False: checksum field 0 ("no checksum").
    pub checksum: bool,
}

impl Udp {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src,
            dst,
            payload: b"dns query".to_vec(),
            ip_options: vec![],
            checksum: true,
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    pub fn no_checksum(mut self) -> Self {
        self.checksum = false;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let ip = ipv4_header(
            self.src,
            self.dst,
            IpNumber::UDP,
            &self.ip_options,
            8 + self.payload.len(),
        );
        let mut udp =
            UdpHeader::without_ipv4_checksum(self.src.port(), self.dst.port(), self.payload.len())
                .expect("udp length");
        if self.checksum {
            udp.checksum = udp
                .calc_checksum_ipv4(&ip, &self.payload)
                .expect("udp checksum");
        }
        frame(&ip, &udp.to_bytes(), &self.payload)
    }
}

fn ipv4_header(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: IpNumber,
    options: &[u8],
    l4_len: usize,
) -> Ipv4Header {
    let mut ip =
        Ipv4Header::new(0, 64, proto, src.ip().octets(), dst.ip().octets()).expect("ipv4 header");
    ip.options =
        Ipv4Options::try_from(options).expect("ip options: a multiple of 4 bytes, at most 40");
    ip.set_payload_len(l4_len).expect("ipv4 payload length");
    ip.identification = 0x1234;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

fn frame(ip: &Ipv4Header, l4_header: &[u8], payload: &[u8]) -> Vec<u8> {
    let eth = Ethernet2Header {
        source: CLIENT_MAC,
        destination: GATEWAY_MAC,
        ether_type: EtherType::IPV4,
    };
    let mut bytes = eth.to_bytes().to_vec();
    bytes.extend_from_slice(&ip.to_bytes());
    bytes.extend_from_slice(l4_header);
    bytes.extend_from_slice(payload);
    bytes
}

/// IP options: a router alert (4 bytes), so IHL is 6.
pub const IP_OPT_ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];
/// IP options: router alert + 3 NOPs + end of list (8 bytes), so IHL is 7.
pub const IP_OPT_8_BYTES: [u8; 8] = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];

// ---------------------------------------------------------------------------
// Reading raw frames.

/// Offsets and fields of an Ethernet/IPv4/L4 frame, read straight from bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    pub ihl_bytes: usize,
    pub tot_len: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl Fields {
    pub fn l4(&self) -> usize {
        ETH_HLEN + self.ihl_bytes
    }

    /// Offset of the L4 checksum field (TCP, UDP or ICMP).
    pub fn l4_csum(&self) -> usize {
        match self.proto {
            6 => self.l4() + 16,
            17 => self.l4() + 6,
            _ => self.l4() + 2,
        }
    }
}

/// The IPv4 fields of a frame, if it has a complete IPv4 header.
pub fn ipv4_fields(frame: &[u8]) -> Option<Fields> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH_HLEN] >> 4 != 4 {
        return None;
    }
    let ihl_bytes = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    if ihl_bytes < 20 || frame.len() < ETH_HLEN + ihl_bytes {
        return None;
    }
    Some(Fields {
        ihl_bytes,
        tot_len: usize::from(u16::from_be_bytes([
            frame[ETH_HLEN + 2],
            frame[ETH_HLEN + 3],
        ])),
        proto: frame[ETH_HLEN + 9],
        src: Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        dst: Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
    })
}

pub fn be16(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

pub fn be32(frame: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([frame[off], frame[off + 1], frame[off + 2], frame[off + 3]])
}

/// Source and destination of a TCP/UDP frame.
pub fn endpoints(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let f = ipv4_fields(frame).expect("an IPv4 frame");
    (
        SocketAddrV4::new(f.src, be16(frame, f.l4())),
        SocketAddrV4::new(f.dst, be16(frame, f.l4() + 2)),
    )
}

// ---------------------------------------------------------------------------
// Checksums, computed here from the bytes.

/// RFC 1071 one's-complement sum of `bytes`, folded to 16 bits (not inverted).
pub fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 header checksum is right (the header sums to 0xffff).
pub fn ip_checksum_ok(frame: &[u8]) -> bool {
    let f = ipv4_fields(frame).expect("an IPv4 frame");
    ones_sum(&frame[ETH_HLEN..ETH_HLEN + f.ihl_bytes]) == 0xffff
}

/// The L4 (TCP/UDP/ICMP) checksum is right over the datagram that the IPv4
/// total length delimits. A UDP checksum of 0 ("none") counts as right.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let f = ipv4_fields(frame).expect("an IPv4 frame");
    let end = ETH_HLEN + f.tot_len;
    assert!(
        end <= frame.len() && f.l4() <= end,
        "IPv4 total length {} outside the {}-byte frame",
        f.tot_len,
        frame.len()
    );
    let segment = &frame[f.l4()..end];
    if f.proto == 1 {
        return ones_sum(segment) == 0xffff;
    }
    if f.proto == 17 && be16(frame, f.l4_csum()) == 0 {
        return true;
    }
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&f.src.octets());
    pseudo.extend_from_slice(&f.dst.octets());
    pseudo.extend_from_slice(&[0, f.proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    ones_sum(&pseudo) == 0xffff
}

pub fn assert_checksums_ok(frame: &[u8], what: &str) {
    assert!(
        ip_checksum_ok(frame),
        "{what}: IPv4 header checksum is wrong in {}",
        hex(frame)
    );
    assert!(
        l4_checksum_ok(frame),
        "{what}: L4 checksum is wrong in {}",
        hex(frame)
    );
}

/// Checks that `output` is `input` with only source and destination (address
/// and port) replaced by the given ones, apart from the two checksum fields,
/// and that both checksums are right.
pub fn assert_translated(
    input: &[u8],
    output: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    what: &str,
) {
    assert_eq!(
        output.len(),
        input.len(),
        "{what}: the packet changed length"
    );
    let f = ipv4_fields(input).expect("an IPv4 frame");
    let mut expected = input.to_vec();
    expected[26..30].copy_from_slice(&src.ip().octets());
    expected[30..34].copy_from_slice(&dst.ip().octets());
    expected[f.l4()..f.l4() + 2].copy_from_slice(&src.port().to_be_bytes());
    expected[f.l4() + 2..f.l4() + 4].copy_from_slice(&dst.port().to_be_bytes());
    let masked = |bytes: &[u8]| {
        let mut b = bytes.to_vec();
        b[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
        b[f.l4_csum()..f.l4_csum() + 2].fill(0);
        b
    };
    assert_eq!(
        hex(&masked(output)),
        hex(&masked(&expected)),
        "{what}: output is not the input translated to {src} -> {dst} (checksum fields masked)"
    );
    assert_checksums_ok(output, what);
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("")
}
