//! Answers an IPv6 client ourselves, as `reject` does for IPv4: a TCP RST
//! or an ICMPv6 port unreachable from the service address, built in place
//! of the client's packet and sent back out of the interface it came in on.

use aya_ebpf::programs::TcContext;
use dataplane_common::{Ipv6Bytes, IPPROTO_TCP};

use crate::{
    csum::{csum_fold, csum_prepare_partial, csum_sum_words, csum_words},
    parse6::{Ipv6Flow, IP6_HLEN, IP6_L4_OFF, IP6_OFF, IPPROTO_ICMPV6},
    reject::{swap_macs, tcp_rst_segment, RejectError},
    skb,
};

pub const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const HOP_LIMIT: u8 = 64;
/// The quote of an ICMPv6 port unreachable: the client's IPv6 header and
/// UDP header, what its stack matches the error to a socket by.
const QUOTE_LEN: usize = IP6_HLEN + 8;

/// An IPv6 header without extension headers, as ten words in wire order.
#[inline(always)]
fn ipv6_header(src: &Ipv6Bytes, dst: &Ipv6Bytes, next: u8, payload_len: u16) -> [u32; 10] {
    let mut b = [0u8; IP6_HLEN];
    b[0] = 0x60;
    b[4..6].copy_from_slice(&payload_len.to_be_bytes());
    b[6] = next;
    b[7] = HOP_LIMIT;
    b[8..24].copy_from_slice(src);
    b[24..40].copy_from_slice(dst);
    csum_words::<10, IP6_HLEN>(&b)
}

/// One's-complement sum (unfolded) of the IPv6 pseudo header.
#[inline(always)]
fn pseudo_sum(src: &Ipv6Bytes, dst: &Ipv6Bytes, next: u8, len: u32) -> u32 {
    let mut words = [0u32; 10];
    let s = csum_words::<4, 16>(src);
    let d = csum_words::<4, 16>(dst);
    let mut i = 0;
    while i < 4 {
        words[i] = s[i];
        words[4 + i] = d[i];
        i += 1;
    }
    words[8] = u32::from_ne_bytes(len.to_be_bytes());
    words[9] = u32::from_ne_bytes([0, 0, 0, next]);
    csum_sum_words(&mut words, 0)
}

/// Replaces the packet with a TCP RST from the service (the packet's
/// destination) to the client; see `reject4_tcp_reset`.
#[inline(never)]
pub fn reject6_tcp_reset(ctx: &TcContext, flow: &Ipv6Flow) -> Result<i32, RejectError> {
    let headers = flow.l4_off - IP6_L4_OFF as u32 + u32::from(flow.tcp_hlen);
    let payload_len = flow.payload_len.saturating_sub(headers);
    skb::change_tail(ctx, (IP6_L4_OFF + 20) as u32).map_err(|_| RejectError)?;
    swap_macs(ctx)?;

    let mut tcp = tcp_rst_segment(
        flow.src_port,
        flow.dst_port,
        flow.tcp_seq,
        flow.tcp_ack_seq,
        flow.tcp_flags,
        payload_len,
    );
    let sum = pseudo_sum(&flow.dst_addr, &flow.src_addr, IPPROTO_TCP, 20);
    let mut tcp_words = csum_words::<5, 20>(&tcp);
    let csum = csum_fold(csum_sum_words(&mut tcp_words, sum));
    tcp[16..18].copy_from_slice(&csum.to_ne_bytes());

    let ip = ipv6_header(&flow.dst_addr, &flow.src_addr, IPPROTO_TCP, 20);
    ctx.store(IP6_OFF, &ip, 0).map_err(|_| RejectError)?;
    ctx.store(IP6_L4_OFF, &tcp, 0).map_err(|_| RejectError)?;
    // As on IPv4: a CHECKSUM_PARTIAL segment (without extension headers)
    // has its checksum field where the RST's is.
    let pseudo_only = !csum_fold(sum);
    csum_prepare_partial(ctx, IP6_L4_OFF + 16, csum, pseudo_only).map_err(|_| RejectError)?;
    Ok(skb::redirect_egress(skb::ifindex(ctx)))
}

/// Replaces the packet with an ICMPv6 port unreachable from the service to
/// the client, quoting the client's IPv6 and UDP headers (RFC 4443 asks
/// for as much as fits; the headers are what the client's stack matches).
#[inline(never)]
pub fn reject6_icmp_port_unreachable(ctx: &TcContext, flow: &Ipv6Flow) -> Result<i32, RejectError> {
    // A quote past extension headers would need a variable-size copy;
    // such datagrams to a service without endpoints are dropped instead.
    if flow.l4_off() != IP6_L4_OFF {
        return Err(RejectError);
    }
    let quoted: [u32; QUOTE_LEN / 4] = ctx.load(IP6_OFF).map_err(|_| RejectError)?;
    let icmp_len = 8 + QUOTE_LEN;

    skb::change_tail(ctx, (IP6_L4_OFF + icmp_len) as u32).map_err(|_| RejectError)?;
    swap_macs(ctx)?;

    let mut icmp = [0u32; 2 + QUOTE_LEN / 4];
    icmp[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0]);
    let mut i = 0;
    while i < QUOTE_LEN / 4 {
        icmp[2 + i] = quoted[i];
        i += 1;
    }
    let sum = pseudo_sum(
        &flow.dst_addr,
        &flow.src_addr,
        IPPROTO_ICMPV6,
        icmp_len as u32,
    );
    let csum = csum_fold(csum_sum_words(&mut icmp, sum));
    let [lo, hi] = csum.to_ne_bytes();
    icmp[0] = u32::from_ne_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, lo, hi]);

    let ip = ipv6_header(
        &flow.dst_addr,
        &flow.src_addr,
        IPPROTO_ICMPV6,
        icmp_len as u16,
    );
    ctx.store(IP6_OFF, &ip, 0).map_err(|_| RejectError)?;
    ctx.store(IP6_L4_OFF, &icmp, 0).map_err(|_| RejectError)?;
    // A CHECKSUM_PARTIAL datagram: its UDP checksum field falls on the
    // ICMPv6 header's unused bytes (offset 6), and whatever computes it sums
    // from the ICMPv6 header on without the pseudo header. Those bytes must
    // then hold the pseudo-header sum, which the computed checksum turns
    // back into zero.
    let pseudo_only = !csum_fold(sum);
    csum_prepare_partial(ctx, IP6_L4_OFF + 6, 0, pseudo_only).map_err(|_| RejectError)?;
    Ok(skb::redirect_egress(skb::ifindex(ctx)))
}
