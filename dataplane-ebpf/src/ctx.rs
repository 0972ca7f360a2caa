//! What the shared stages need from a program's context: bounded reads and
//! writes of packet bytes, checksum updates, where the packet is, and how
//! to send it on. `TcContext` and `XdpContext` implement it, both with
//! direct packet access through one bounds-checked pointer helper each (tc
//! pulls headers that lie past the linear area into it first), so parse,
//! NAT rewrite and the external pipelines (IPv4 and IPv6) are written once
//! for both hooks.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
    EbpfContext as _,
};

use dataplane_common::Counter;

use crate::{fib::NextHop, parse::Ipv4Flow, parse6::Ipv6Flow, skb, Verdict};

/// The checksum update flags of `bpf_l4_csum_replace`, which the XDP
/// implementation follows too.
pub const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
pub const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
const CSUM_SIZE_MASK: u64 = 0xf;

pub trait PacketCtx {
    /// The packet goes on (translated or not).
    const PASS: i32;
    const DROP: i32;
    /// XDP: what it cannot finish (answering a client with a RST or ICMP,
    /// a next hop without a neighbour entry) is left untouched to the tc
    /// program behind it, which does.
    const DEFERS_TO_TC: bool;

    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()>;
    /// `load` at any offset the packet has: tc through
    /// `bpf_skb_load_bytes`, which needs no bound the verifier can see (an
    /// IPv6 extension header chain can be long); XDP as `load`, within the
    /// bound of direct access.
    fn load_far<T: Copy>(&self, off: usize) -> Option<T>;
    /// `store` at any offset the packet has, as [`PacketCtx::load_far`].
    fn store_far<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()>;
    /// Bytes of the packet from its Ethernet header on.
    fn packet_len(&self) -> u32;
    /// A GSO super-packet (BIG TCP); never in XDP.
    fn is_gso(&self) -> bool;
    fn ifindex(&self) -> u32;
    fn raw(&self) -> *mut c_void;
    /// An IPv4 header checksum at `off` after a 4-byte field changed.
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32) -> Result<(), ()>;
    /// An L4 checksum at `off` after a field of `flags & 0xf` bytes changed
    /// (with `BPF_F_PSEUDO_HDR` / `BPF_F_MARK_MANGLED_0` as the helper).
    fn l4_csum_replace(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), ()>;
    /// Writes the MAC addresses of `hop` and sends the packet out of its
    /// interface; returns the verdict.
    fn send(&self, hop: &NextHop) -> i32;
    /// Answers a refused client (tc); XDP never gets here (`DEFERS_TO_TC`).
    fn refuse(&self, flow: &Ipv4Flow) -> Verdict;
    /// [`PacketCtx::refuse`] for IPv6, counting `decision` (tc); XDP passes
    /// the packet to tc uncounted.
    fn refuse6(&self, decision: Counter, flow: &Ipv6Flow) -> Verdict;
}

impl PacketCtx for TcContext {
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const DEFERS_TO_TC: bool = false;

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let ptr = tc_ptr_at::<T>(self, off)?;
        // SAFETY: `tc_ptr_at` checked that the bytes lie inside the linear
        // area; packet data has no alignment guarantee, hence the unaligned
        // read.
        Some(unsafe { core::ptr::read_unaligned(ptr) })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()> {
        let ptr = tc_ptr_at::<T>(self, off).ok_or(())?;
        // SAFETY: as for `load`. The verifier makes a program that writes
        // packet data unclone a cloned skb before it runs, so the write
        // never shows in another clone's data.
        unsafe { core::ptr::write_unaligned(ptr, *value) };
        Ok(())
    }

    #[inline(always)]
    fn load_far<T: Copy>(&self, off: usize) -> Option<T> {
        TcContext::load(self, off).ok()
    }

    #[inline(always)]
    fn store_far<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()> {
        TcContext::store(self, off, value, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        skb::is_gso(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        skb::ifindex(self)
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    /// Folded in place, without `bpf_l3_csum_replace`: an IPv4 header
    /// checksum is always a full one, never offloaded, and the helper only
    /// does this same arithmetic on the field (behind a call and a
    /// writability check the direct access has made already).
    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32) -> Result<(), ()> {
        let csum: u16 = PacketCtx::load(self, off).ok_or(())?;
        PacketCtx::store(self, off, &csum_update(csum, old, new, 4))
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), ()> {
        TcContext::l4_csum_replace(self, off, old as u64, new as u64, flags).map_err(|_| ())
    }

    #[inline(always)]
    fn send(&self, hop: &NextHop) -> i32 {
        match hop.macs {
            Some(macs) => {
                if TcContext::store(self, 0, &macs, 0).is_err() {
                    return TC_ACT_SHOT;
                }
                skb::redirect_egress(hop.ifindex)
            }
            None => skb::redirect_neigh(hop.ifindex),
        }
    }

    #[inline(always)]
    fn refuse(&self, flow: &Ipv4Flow) -> Verdict {
        crate::refuse_tc(self, flow)
    }

    #[inline(always)]
    fn refuse6(&self, decision: Counter, flow: &Ipv6Flow) -> Verdict {
        crate::pod6::refuse(self, decision, flow)
    }
}

/// Farthest offset the programs read or write: a bound the verifier can
/// see on every variable offset (Ethernet + IPv4 with options + an ICMP
/// quote).
const MAX_OFF: usize = 256;

/// How much of a non-linear packet `tc_ptr_at` pulls into the linear area:
/// every offset the programs touch, whatever is asked first.
const PULL_LEN: u32 = (MAX_OFF + 64) as u32;

/// The one place tc touches packet memory: a pointer to `size_of::<T>()`
/// bytes at `off`, or `None` when they are not all inside the packet.
/// Headers past the linear area (a non-linear skb) are pulled into it
/// first, and the bounds checked again: the pull moves the data.
#[inline(always)]
fn tc_ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    if off > MAX_OFF {
        return None;
    }
    // The bound is checked on the very pointer returned, so the verifier
    // sees it.
    let ptr = ctx.data() + off;
    if ptr + size_of::<T>() <= ctx.data_end() {
        return Some(ptr as *mut T);
    }
    ctx.pull_data(ctx.len().min(PULL_LEN)).ok()?;
    let ptr = ctx.data() + off;
    if ptr + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(ptr as *mut T)
}

/// `data` and `data_end` of an XDP context, read from it where they are
/// used. Volatile: left to itself, LLVM hands them to a function out of
/// line as 32-bit arguments and widens the end pointer there, arithmetic
/// on it that the verifier refuses.
#[inline(always)]
fn xdp_bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: `ctx.ctx` is the program's context, valid for the whole run;
    // both fields are plain `u32`s.
    unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ctx).data)) as usize,
            core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ctx).data_end)) as usize,
        )
    }
}

/// The one place XDP touches packet memory: a pointer to `size_of::<T>()`
/// bytes at `off`, or `None` when they are not all inside the packet.
#[inline(always)]
fn xdp_ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    if off > MAX_OFF {
        return None;
    }
    let (start, end) = xdp_bounds(ctx);
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

impl PacketCtx for XdpContext {
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    const DEFERS_TO_TC: bool = true;

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let ptr = xdp_ptr_at::<T>(self, off)?;
        // SAFETY: `xdp_ptr_at` checked that the bytes lie inside the packet;
        // packet data has no alignment guarantee, hence the unaligned read.
        Some(unsafe { core::ptr::read_unaligned(ptr) })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()> {
        let ptr = xdp_ptr_at::<T>(self, off).ok_or(())?;
        // SAFETY: as for `load`; XDP packet data is writable.
        unsafe { core::ptr::write_unaligned(ptr, *value) };
        Ok(())
    }

    #[inline(always)]
    fn load_far<T: Copy>(&self, off: usize) -> Option<T> {
        PacketCtx::load(self, off)
    }

    #[inline(always)]
    fn store_far<T: Copy>(&self, off: usize, value: &T) -> Result<(), ()> {
        PacketCtx::store(self, off, value)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        let (start, end) = xdp_bounds(self);
        (end - start) as u32
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, old: u32, new: u32) -> Result<(), ()> {
        let csum: u16 = self.load(off).ok_or(())?;
        self.store(off, &csum_update(csum, old, new, 4))
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), ()> {
        let csum: u16 = self.load(off).ok_or(())?;
        if flags & BPF_F_MARK_MANGLED_0 != 0 && csum == 0 {
            // UDP without a checksum stays without one.
            return Ok(());
        }
        let mut updated = csum_update(csum, old, new, flags & CSUM_SIZE_MASK);
        if flags & BPF_F_MARK_MANGLED_0 != 0 && updated == 0 {
            updated = 0xffff;
        }
        self.store(off, &updated)
    }

    #[inline(always)]
    fn send(&self, hop: &NextHop) -> i32 {
        let Some(macs) = hop.macs else {
            return Self::DROP;
        };
        if self.store(0, &macs).is_err() {
            return Self::DROP;
        }
        if hop.ifindex == self.ifindex() {
            return xdp_action::XDP_TX as i32;
        }
        // Not reached from the external pipeline, which leaves other
        // interfaces to tc (see `external::next_hop`).
        skb::xdp_redirect(hop.ifindex)
    }

    #[inline(always)]
    fn refuse(&self, _flow: &Ipv4Flow) -> Verdict {
        Ok(Self::PASS)
    }

    #[inline(always)]
    fn refuse6(&self, _decision: Counter, _flow: &Ipv6Flow) -> Verdict {
        Ok(Self::PASS)
    }
}

/// RFC 1624 incremental update of a one's-complement checksum (as stored,
/// in memory order) after a `size`-byte field (2 or 4) went from `old` to
/// `new` (memory order too: the sum does not depend on byte order as long
/// as both sides use the same).
#[inline(always)]
pub fn csum_update(csum: u16, old: u32, new: u32, size: u64) -> u16 {
    let mut sum = u32::from(!csum);
    let words = |v: u32| -> (u32, u32) {
        let b = v.to_ne_bytes();
        (
            u32::from(u16::from_ne_bytes([b[0], b[1]])),
            u32::from(u16::from_ne_bytes([b[2], b[3]])),
        )
    };
    if size == 2 {
        sum += u32::from(!(old as u16)) + u32::from(new as u16);
    } else {
        let (o1, o2) = words(old);
        let (n1, n2) = words(new);
        sum += (!o1 & 0xffff) + (!o2 & 0xffff) + n1 + n2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
