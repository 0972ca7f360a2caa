//! Narrow wrappers over the kernel helpers the datapath needs beyond what
//! `TcContext` exposes. Every `unsafe` block of the datapath lives here or,
//! for reads and writes of map values, in `maps`.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_fib_lookup, TC_ACT_REDIRECT},
    helpers::{
        bpf_csum_diff, bpf_fib_lookup as fib_lookup_helper, bpf_get_prandom_u32,
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_skb_change_tail, bpf_skb_change_type,
    },
    programs::TcContext,
};

fn raw(ctx: &TcContext) -> *mut __sk_buff {
    ctx.skb.skb
}

/// Index of the interface the packet is on (the pod's host-side veth).
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel hands the program a valid __sk_buff context for its
    // whole run; `ifindex` is a readable field of it.
    unsafe { (*raw(ctx)).ifindex }
}

/// Whether the packet is a GSO super-packet (segmented later, on the way
/// out), as BIG TCP ones are.
#[inline(always)]
pub fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: as for `ifindex`; `gso_size` is a readable field for tc.
    unsafe { (*raw(ctx)).gso_size != 0 }
}

/// Resizes the packet to exactly `len` bytes (grow with zeroes or trim).
#[inline(always)]
pub fn change_tail(ctx: &TcContext, len: u32) -> Result<(), i64> {
    // SAFETY: helper call on the program's own context; flags must be 0.
    let ret = unsafe { bpf_skb_change_tail(raw(ctx), len, 0) };
    if ret == 0 {
        Ok(())
    } else {
        Err(ret)
    }
}

/// Sends the packet out of `ifindex` (egress) and returns the verdict for it.
#[inline(always)]
pub fn redirect_egress(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; the verdict it returns is TC_ACT_REDIRECT or
    // TC_ACT_SHOT, both valid tc verdicts.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        aya_ebpf::bindings::TC_ACT_SHOT
    }
}

/// Hands the packet to the other end of veth `ifindex` (a pod's eth0),
/// as if it arrived there: the host's stack and the veth's backlog are
/// skipped. Only from tc ingress, and only towards a veth (or netkit): the
/// kernel drops it anywhere else.
#[inline(always)]
pub fn redirect_peer(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; the verdict it returns is TC_ACT_REDIRECT or
    // TC_ACT_SHOT, both valid tc verdicts.
    let ret = unsafe { bpf_redirect_peer(ifindex, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        aya_ebpf::bindings::TC_ACT_SHOT
    }
}

/// `PACKET_HOST`: the packet is for the host it arrives at.
const PACKET_HOST: u32 = 0;

/// Marks the packet as addressed to the host that gets it, as the pod's
/// stack wants it after `redirect_peer`: the mark was set on arrival from
/// the destination MAC of the hop before (a bridge's, say), and kernels
/// before 6.8 keep it across the redirect.
#[inline(always)]
pub fn set_packet_host(ctx: &TcContext) -> Result<(), i64> {
    // SAFETY: helper call on the program's own context.
    let ret = unsafe { bpf_skb_change_type(raw(ctx), PACKET_HOST) };
    if ret == 0 {
        Ok(())
    } else {
        Err(ret)
    }
}

/// XDP: sends the frame out of `ifindex`; returns the XDP verdict.
#[inline(always)]
pub fn xdp_redirect(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED,
    // both valid XDP verdicts.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Sends the packet out of `ifindex` with the next hop's MAC address
/// resolved by the kernel's neighbour table (for a FIB result without one).
#[inline(always)]
pub fn redirect_neigh(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; a null `params` with length 0 asks the
    // kernel to look the next hop up itself.
    let ret = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        aya_ebpf::bindings::TC_ACT_SHOT
    }
}

/// `bpf_fib_lookup` for the packet `ctx` holds; returns the helper's result
/// code (`BPF_FIB_LKUP_RET_*`), `params` filled with the egress interface
/// and MAC addresses on success.
#[inline(always)]
pub fn fib_lookup(ctx: *mut core::ffi::c_void, params: &mut bpf_fib_lookup, flags: u32) -> i64 {
    // SAFETY: `ctx` is the program's own context pointer (an skb or an
    // xdp_md); `params` is a live stack struct of exactly the size passed.
    unsafe {
        fib_lookup_helper(
            ctx,
            params as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    }
}

/// FIB lookup parameters, all zero.
#[inline(always)]
pub fn fib_params() -> bpf_fib_lookup {
    // SAFETY: the struct is integers, integer arrays and unions of them:
    // all zero bits is a valid value of each.
    unsafe { core::mem::zeroed() }
}

/// `bpf_csum_diff` adding `words` to `seed`; see `csum::csum_sum_words`.
#[inline(always)]
pub fn csum_diff_add<const N: usize>(words: &mut [u32; N], seed: u32) -> u32 {
    // SAFETY: `words` is a live stack buffer of exactly N*4 bytes; the helper
    // only reads `to_size` bytes from it; `from` is null with size 0.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            words.as_mut_ptr(),
            (N * 4) as u32,
            seed,
        )
    };
    sum as u32
}

/// Set by the agent at load when the kernel has `bpf_ktime_get_coarse_ns`
/// (5.11) for every program type that reads the clock; read-only to the
/// programs, so the verifier prunes the call an older kernel would refuse.
#[unsafe(no_mangle)]
static COARSE_CLOCK: u8 = 0;

/// CLOCK_MONOTONIC nanoseconds, the clock conntrack, NAT and affinity
/// timestamps use: its coarse variant where the agent found it (the time of
/// the last tick, so up to a jiffy behind, for half the cost), else the
/// precise one. A call of its own: inlined, the branch costs stack slots
/// in callers that are at the 512-byte limit, and a call clobbers the same
/// registers a helper call does.
#[inline(never)]
pub fn now_ns() -> u64 {
    // SAFETY: a plain read of a constant the loader may have rewritten; the
    // volatile read keeps the compiler from folding in the default.
    let coarse = unsafe { core::ptr::read_volatile(&COARSE_CLOCK) } != 0;
    if coarse {
        // SAFETY: helper without arguments or side effects.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: as above.
        unsafe { bpf_ktime_get_ns() }
    }
}

#[inline(always)]
pub fn random_u32() -> u32 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_get_prandom_u32() }
}

/// `bpf_csum_diff` of a 16-byte field (an IPv6 address) going from `from`
/// to `to`: what to add to a checksum that covers it. Read where they are
/// (stack or map value), without copies: the IPv6 path's stack is tight.
#[inline(always)]
pub fn csum_diff16(from: &[u8; 16], to: &[u8; 16]) -> u32 {
    // SAFETY: both point to 16 readable bytes for the call; the helper only
    // reads them (its pointer arguments are read-only memory), so the
    // casts to *mut never lead to a write.
    let diff = unsafe {
        bpf_csum_diff(
            from.as_ptr() as *mut u32,
            16,
            to.as_ptr() as *mut u32,
            16,
            0,
        )
    };
    diff as u32
}

/// The frame's EtherType as on the wire, read straight from the linear
/// packet data: the family dispatch at the top of the pod programs costs
/// no helper call. `None` when the Ethernet header is not in the linear
/// part (never for frames from a veth).
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> Option<u16> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 > end {
        return None;
    }
    // SAFETY: the 14 bytes of the Ethernet header lie inside the packet
    // data (checked against data_end above); no alignment is guaranteed.
    Some(unsafe { core::ptr::read_unaligned((data + 12) as *const u16) })
}
