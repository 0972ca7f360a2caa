//! Answers the client ourselves: a TCP RST or an ICMP port unreachable, built
//! in place of the client's packet and sent back out of the interface it came
//! in on. This is how a connect() to a service without endpoints fails at once
//! with ECONNREFUSED, as with kube-proxy's REJECT rule, and how TCP flows to a
//! removed backend are reset.

use aya_ebpf::programs::TcContext;
use dataplane_common::IPPROTO_TCP;

use crate::{
    csum::{csum_fold, csum_prepare_partial, csum_sum_words, csum_words},
    parse::{Ipv4Flow, ETH_HLEN, IP_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    skb,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;

pub struct RejectError;

/// Swaps the Ethernet addresses: the answer goes back to the sender.
#[inline(always)]
pub(crate) fn swap_macs(ctx: &TcContext) -> Result<(), RejectError> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| RejectError)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| RejectError)
}

/// The TCP header of the RST answering a segment (ports network order,
/// sequence numbers host order), checksum still 0. RFC 793: an
/// acknowledging segment gets `seq = its ack`, any other an ACK of what it
/// consumed (payload, SYN, FIN).
#[inline(always)]
pub(crate) fn tcp_rst_segment(
    src_port: u16,
    dst_port: u16,
    tcp_seq: u32,
    tcp_ack_seq: u32,
    tcp_flags: u8,
    payload_len: u32,
) -> [u8; 20] {
    let (seq, ack_seq, flags) = if tcp_flags & TCP_ACK != 0 {
        (tcp_ack_seq, 0u32, TCP_RST)
    } else {
        let mut consumed = payload_len;
        if tcp_flags & TCP_SYN != 0 {
            consumed += 1;
        }
        if tcp_flags & TCP_FIN != 0 {
            consumed += 1;
        }
        (0u32, tcp_seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
    };
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&dst_port.to_ne_bytes());
    tcp[2..4].copy_from_slice(&src_port.to_ne_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack_seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp
}

/// IPv4 header without options, checksum filled, as four-byte words in wire
/// order (so `csum_sum_words` can sum them directly).
#[inline(always)]
fn ipv4_header(src: u32, dst: u32, proto: u8, tot_len: u16) -> [u32; 5] {
    let mut b = [0u8; 20];
    b[0] = 0x45;
    b[2..4].copy_from_slice(&tot_len.to_be_bytes());
    b[6] = 0x40; // DF
    b[8] = TTL;
    b[9] = proto;
    b[12..16].copy_from_slice(&src.to_ne_bytes());
    b[16..20].copy_from_slice(&dst.to_ne_bytes());
    let mut words = csum_words::<5, 20>(&b);
    let csum = csum_fold(csum_sum_words(&mut words, 0));
    b[10..12].copy_from_slice(&csum.to_ne_bytes());
    csum_words::<5, 20>(&b)
}

/// Replaces the packet with a TCP RST from the service (the packet's
/// destination) to the client, acceptable to the client's stack: it either
/// acknowledges the client's segment (answering a SYN) or carries the
/// sequence number the client expects next.
#[inline(always)]
pub fn reject4_tcp_reset(ctx: &TcContext, flow: &Ipv4Flow) -> Result<i32, RejectError> {
    let payload_len = flow
        .ip_tot_len
        .saturating_sub((flow.ip_hlen + flow.tcp_hlen) as u32);
    skb::change_tail(ctx, (ETH_HLEN + 40) as u32).map_err(|_| RejectError)?;
    swap_macs(ctx)?;

    let mut tcp = tcp_rst_segment(
        flow.src_port,
        flow.dst_port,
        flow.tcp_seq,
        flow.tcp_ack_seq,
        flow.tcp_flags,
        payload_len,
    );
    // Pseudo header: src, dst, zero, proto, TCP length.
    let mut pseudo = [
        flow.dst_addr,
        flow.src_addr,
        u32::from_ne_bytes([0, IPPROTO_TCP, 0, 20]),
    ];
    let mut tcp_words = csum_words::<5, 20>(&tcp);
    let sum = csum_sum_words(&mut pseudo, 0);
    let csum = csum_fold(csum_sum_words(&mut tcp_words, sum));
    tcp[16..18].copy_from_slice(&csum.to_ne_bytes());

    let ip = ipv4_header(flow.dst_addr, flow.src_addr, IPPROTO_TCP, 40);
    ctx.store(IP_OFF, &ip, 0).map_err(|_| RejectError)?;
    ctx.store(IP_OFF + 20, &tcp, 0).map_err(|_| RejectError)?;
    // The client's segment may be CHECKSUM_PARTIAL (its TCP checksum left
    // to the device); the RST's checksum field is where that segment's was
    // (unless the segment had IP options).
    let pseudo_only = !csum_fold(sum);
    csum_prepare_partial(ctx, IP_OFF + 20 + 16, csum, pseudo_only).map_err(|_| RejectError)?;
    Ok(skb::redirect_egress(skb::ifindex(ctx)))
}

/// Replaces the packet with an ICMP port unreachable from the service to the
/// client, quoting the original IPv4 header and first 8 bytes of L4 as
/// RFC 792 asks, so the client's stack matches it to its socket.
#[inline(always)]
pub fn reject4_icmp_port_unreachable(ctx: &TcContext, flow: &Ipv4Flow) -> Result<i32, RejectError> {
    // Quoting a header with options would need a variable-size copy; such
    // packets to a service without endpoints are dropped instead.
    if flow.ip_hlen != 20 {
        return Err(RejectError);
    }
    let quoted: [u32; 7] = ctx.load(IP_OFF).map_err(|_| RejectError)?;

    skb::change_tail(ctx, (ETH_HLEN + 20 + 8 + 28) as u32).map_err(|_| RejectError)?;
    swap_macs(ctx)?;

    let mut icmp = [0u32; 9];
    icmp[0] = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0]);
    let mut i = 0;
    while i < 7 {
        icmp[2 + i] = quoted[i];
        i += 1;
    }
    let csum = csum_fold(csum_sum_words(&mut icmp, 0));
    let [t, c, _, _] = icmp[0].to_ne_bytes();
    let [lo, hi] = csum.to_ne_bytes();
    icmp[0] = u32::from_ne_bytes([t, c, lo, hi]);

    let ip = ipv4_header(flow.dst_addr, flow.src_addr, IPPROTO_ICMP, 56);
    ctx.store(IP_OFF, &ip, 0).map_err(|_| RejectError)?;
    // A CHECKSUM_PARTIAL datagram needs nothing more: its UDP checksum
    // field falls on the ICMP header's unused bytes, and the sum from there
    // over the (valid) ICMP message writes zero (0 or 0xffff) into them,
    // which leaves the ICMP checksum valid.
    ctx.store(IP_OFF + 20, &icmp, 0).map_err(|_| RejectError)?;
    Ok(skb::redirect_egress(skb::ifindex(ctx)))
}
