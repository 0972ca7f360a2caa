//! Checksums, in one place: incremental updates after a rewrite go through
//! the kernel's replace helpers (which also keep the skb's checksum state
//! right), and packets built from scratch (rejects) are summed in full.

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
