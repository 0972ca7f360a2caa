//! Checksums, in one place: incremental updates after a rewrite go through
//! the kernel's replace helpers (which also keep the skb's checksum state
//! right), and packets built from scratch (rejects) are summed in full.

use aya_ebpf::programs::TcContext;
use dataplane_common::IPPROTO_UDP;

use crate::{
    ctx::{PacketCtx, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    parse::Ipv4Flow,
    skb,
};

/// A checksum helper failed; the packet may be half rewritten.
pub struct CsumError;

#[inline(always)]
fn l4_flags(flow: &Ipv4Flow) -> u64 {
    if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// The flow's L4 and IPv4 header checksums after one of its addresses
/// changes from `old` to `new`.
#[inline(always)]
pub fn csum4_replace_addr<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv4Flow,
    old: u32,
    new: u32,
) -> Result<(), CsumError> {
    // The L4 checksum covers the pseudo header, so address changes update
    // it too; a UDP checksum of 0 means "none" and stays 0.
    ctx.l4_csum_replace(
        flow.l4_csum_off(),
        old,
        new,
        BPF_F_PSEUDO_HDR | l4_flags(flow) | 4,
    )
    .map_err(|_| CsumError)?;
    csum4_replace_ip(ctx, crate::parse::IP_CSUM_OFF, old, new)
}

/// The flow's L4 checksum after one of its ports changes.
#[inline(always)]
pub fn csum4_replace_port<C: PacketCtx>(
    ctx: &C,
    flow: &Ipv4Flow,
    old: u16,
    new: u16,
) -> Result<(), CsumError> {
    ctx.l4_csum_replace(
        flow.l4_csum_off(),
        u32::from(old),
        u32::from(new),
        l4_flags(flow) | 2,
    )
    .map_err(|_| CsumError)
}

/// An IPv4 header checksum at `csum_off` (the packet's own, or one quoted
/// in an ICMP error) after an address in that header changes.
#[inline(always)]
pub fn csum4_replace_ip<C: PacketCtx>(
    ctx: &C,
    csum_off: usize,
    old: u32,
    new: u32,
) -> Result<(), CsumError> {
    ctx.l3_csum_replace(csum_off, old, new)
        .map_err(|_| CsumError)
}

/// A checksum without pseudo header (ICMP) at `csum_off` after a `size`-byte
/// field it covers changes.
#[inline(always)]
pub fn csum_replace_plain<C: PacketCtx>(
    ctx: &C,
    csum_off: usize,
    old: u32,
    new: u32,
    size: u64,
) -> Result<(), CsumError> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, old, new, size)
        .map_err(|_| CsumError)
}

/// One's-complement sum of two 16-bit values in the same byte order.
#[inline(always)]
pub fn csum_add16(a: u16, b: u16) -> u16 {
    let sum = a as u32 + b as u32;
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// A packet built in place of one the pod sent keeps that packet's checksum
/// state. If it is CHECKSUM_PARTIAL (a pod's socket leaves the L4 checksum
/// to the device, and veth passes that on), whatever computes the checksum
/// later (the host veth with tx offload off, or the stack) sums from the old
/// packet's L4 header to the end and writes the result at the old checksum
/// field, `field_off`: that field must then hold `partial` (the pseudo
/// header sum, uncomplemented) instead of the full checksum `full` already
/// written. BPF cannot read the state, but `bpf_l4_csum_replace` acts by
/// it: with the pseudo-header flag it changes a CHECKSUM_PARTIAL field as
/// a pseudo-header change, and any other field as a plain one; without the
/// flag it leaves a CHECKSUM_PARTIAL field alone. Adding `partial - full`
/// with the flag, then taking it back without, leaves `full` in every other
/// state and `partial` in CHECKSUM_PARTIAL.
#[inline(always)]
pub fn csum_prepare_partial(
    ctx: &TcContext,
    field_off: usize,
    full: u16,
    partial: u16,
) -> Result<(), CsumError> {
    let diff = csum_add16(partial, !full);
    if diff == 0 || diff == 0xffff {
        return Ok(());
    }
    ctx.l4_csum_replace(field_off, 0, diff as u64, BPF_F_PSEUDO_HDR | 2)
        .map_err(|_| CsumError)?;
    ctx.l4_csum_replace(field_off, diff as u64, 0, 2)
        .map_err(|_| CsumError)
}

/// One's-complement sum of `words` added to `seed` (not folded).
#[inline(always)]
pub fn csum_sum_words<const N: usize>(words: &mut [u32; N], seed: u32) -> u32 {
    skb::csum_diff_add(words, seed)
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum field value.
#[inline(always)]
pub fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `B` bytes as `W` four-byte words in wire order, as the sums take them.
#[inline(always)]
pub fn csum_words<const W: usize, const B: usize>(bytes: &[u8; B]) -> [u32; W] {
    let mut words = [0u32; W];
    let mut i = 0;
    while i < W {
        words[i] = u32::from_ne_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]);
        i += 1;
    }
    words
}
