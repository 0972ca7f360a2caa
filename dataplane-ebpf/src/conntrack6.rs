//! IPv6 conntrack (`CT6_TCP`, `CT6_OTHER`): the rules of `conntrack`
//! (ORIGINAL and REPLY entries, the same lifetimes and state steps) on
//! IPv6 tuples.

use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{ct_dir, ct_flags, ct_state, Ct6Entry, Ct6Key, IPPROTO_TCP};

use crate::{
    conntrack::CtCreateError,
    maps::{ct6_insert, ct6_remove, ct6_slot, ct_lifetimes, Ct6Slot},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse6::Ipv6Flow,
};

#[inline(always)]
pub fn ct6_key(flow: &Ipv6Flow, direction: u8) -> Ct6Key {
    Ct6Key {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

/// The entry of `flow`'s tuple in `direction`, in place (the key built out
/// of line, off the caller's stack).
#[inline(never)]
pub fn ct6_lookup_flow(flow: &Ipv6Flow, direction: u8) -> Option<Ct6Slot> {
    ct6_slot(&ct6_key(flow, direction))
}

/// The entry at `key`, in place (for `ct6_update`).
#[inline(always)]
pub fn ct6_lookup(key: &Ct6Key) -> Option<Ct6Slot> {
    ct6_slot(key)
}

/// Inserts both entries of a new flow. If another CPU created the flow first
/// (retransmitted SYN racing), its entry wins and is copied into `entry`.
/// Entries are compared and read in place throughout: this module's
/// functions run deep in the IPv6 path's call chain, within its 512 bytes
/// of stack.
#[inline(never)]
pub fn ct6_create(entry: &mut Ct6Entry, now_ns: u64) -> Result<(), CtCreateError> {
    let original = entry.original_key();
    if ct6_insert(&original, entry, BPF_NOEXIST as u64).is_err() {
        let winner = ct6_slot(&original).ok_or(CtCreateError::InsertFailed)?;
        *entry = *winner.entry();
        return Ok(());
    }
    if let Err(e) = ct6_claim_reply(entry, now_ns) {
        ct6_remove(&original);
        return Err(e);
    }
    Ok(())
}

/// Whether two entries are of the same flow (equal ORIGINAL keys).
#[inline(always)]
fn ct6_same_original(a: &Ct6Entry, b: &Ct6Entry) -> bool {
    a.client_port == b.client_port
        && a.service_port == b.service_port
        && a.proto == b.proto
        && a.client_addr == b.client_addr
        && a.service_addr == b.service_addr
}

/// Whether two entries translate to the same REPLY key.
#[inline(always)]
fn ct6_same_reply(a: &Ct6Entry, b: &Ct6Entry) -> bool {
    let reply_dst = |e: &Ct6Entry| {
        if e.flags & ct_flags::HAIRPIN != 0 {
            e.service_addr
        } else {
            e.client_addr
        }
    };
    a.backend_port == b.backend_port
        && a.client_port == b.client_port
        && a.proto == b.proto
        && a.backend_addr == b.backend_addr
        && reply_dst(a) == reply_dst(b)
}

/// Writes the REPLY entry of the flow `entry` describes, unless another live
/// flow holds that tuple. An entry left behind by a flow that is gone (its
/// ORIGINAL entry evicted, expired, or now pointing at another backend) is
/// taken over.
#[inline(always)]
fn ct6_claim_reply(entry: &Ct6Entry, now_ns: u64) -> Result<(), CtCreateError> {
    let reply = entry.reply_key();
    if ct6_insert(&reply, entry, BPF_NOEXIST as u64).is_ok() {
        return Ok(());
    }
    if let Some(holder) = ct6_slot(&reply) {
        let holder = holder.entry();
        if !ct6_same_original(holder, entry) && ct6_is_live_reply(holder, now_ns) {
            return Err(CtCreateError::ReplyClash);
        }
    }
    ct6_insert(&reply, entry, 0).map_err(|_| CtCreateError::InsertFailed)
}

/// Whether the REPLY entry `reply` belongs to a live flow: its ORIGINAL entry
/// is there, unexpired, and translates to this same reply tuple.
#[inline(always)]
fn ct6_is_live_reply(reply: &Ct6Entry, now_ns: u64) -> bool {
    ct6_slot(&reply.original_key()).is_some_and(|owner| {
        let owner = owner.entry();
        !ct6_is_expired(owner, now_ns) && ct6_same_reply(owner, reply)
    })
}

/// Whether the flow `entry` has outlived the lifetime of its state.
#[inline(always)]
pub fn ct6_is_expired(entry: &Ct6Entry, now_ns: u64) -> bool {
    // The array's one entry is always there.
    ct_lifetimes().is_some_and(|l| entry.is_expired(now_ns, l))
}

/// Rebuilds a flow's REPLY entry from its ORIGINAL one (`ct`) when it is
/// gone (LRU eviction, the agent's sweep) or left over from an earlier flow,
/// so the backend's replies keep being translated. A tuple another live flow
/// holds is left to it.
#[inline(never)]
pub fn ct6_restore_reply(ct: &Ct6Entry, now_ns: u64) {
    let consistent =
        ct6_slot(&ct.reply_key()).is_some_and(|reply| ct6_same_original(reply.entry(), ct));
    if !consistent {
        let _ = ct6_claim_reply(ct, now_ns);
    }
}

/// Whether `owner`, the ORIGINAL entry a REPLY entry `reply` points at, is
/// the flow that entry was made for (and not a later flow of the same client
/// tuple that went to another backend).
#[inline(always)]
pub fn ct6_owns_reply(owner: &Ct6Entry, reply: &Ct6Entry) -> bool {
    ct6_same_reply(owner, reply)
}

/// Removes both entries of a flow (keys taken before either goes: `entry`
/// may be read in place).
#[inline(never)]
pub fn ct6_delete(entry: &Ct6Entry) {
    let original = entry.original_key();
    let reply = entry.reply_key();
    ct6_remove(&original);
    ct6_remove(&reply);
}

/// Removes a stale REPLY entry alone.
#[inline(always)]
pub fn ct6_delete_reply(reply: &Ct6Entry) {
    ct6_remove(&reply.reply_key());
}

/// A TCP SYN (without ACK) on a flow that is closing starts a new connection
/// that reuses the tuple: it must get a fresh backend choice.
#[inline(always)]
pub fn ct6_is_reopen(entry: &Ct6Entry, flow: &Ipv6Flow) -> bool {
    flow.proto == IPPROTO_TCP
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.state == ct_state::CLOSING
}

/// How stale `last_seen_ns` may get before a packet refreshes it. Every
/// write dirties a cache line the other direction's CPU reads too; one a
/// second is plenty for lifetimes of 10 s and more (a flow may expire up to
/// this much early).
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Updates state and last-seen time of a flow's ORIGINAL entry for a packet in
/// `direction`. State and flags only gain bits, each with one atomic OR, and
/// only when the packet adds something; the last-seen time is written at
/// most once per `CT_REFRESH_NS`. Returns whether it wrote anything (as
/// `ct4_update`).
#[inline(always)]
pub fn ct6_update(slot: Ct6Slot, flow: &Ipv6Flow, direction: u8, now_ns: u64) -> bool {
    let e = slot.get();
    let refreshed = now_ns.saturating_sub(e.last_seen_ns) >= CT_REFRESH_NS;
    if refreshed {
        slot.set_last_seen(now_ns);
    }
    ct6_update_state(slot, &e, flow, direction) || refreshed
}

/// The state part of `ct6_update`: whether it changed state or flags.
#[inline(always)]
fn ct6_update_state(slot: Ct6Slot, e: &Ct6Entry, flow: &Ipv6Flow, direction: u8) -> bool {
    let mut flags = 0;
    if direction == ct_dir::REPLY {
        flags |= ct_flags::SEEN_REPLY;
    }
    if flow.proto != IPPROTO_TCP {
        let state = if direction == ct_dir::REPLY {
            ct_state::ESTABLISHED
        } else {
            ct_state::OPENING
        };
        return ct6_or(slot, e, state, flags).0;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        return ct6_or(slot, e, ct_state::CLOSING, flags).0;
    }
    if flow.tcp_flags & TCP_FIN != 0 {
        flags |= if direction == ct_dir::ORIGINAL {
            ct_flags::FIN_ORIGINAL
        } else {
            ct_flags::FIN_REPLY
        };
    }
    let (wrote, (state, flags)) = ct6_or(slot, e, ct_state::OPENING, flags);
    let both_fins = ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY;
    if flags & both_fins == both_fins {
        // Of two CPUs adding the two FINs at once, the later OR sees both.
        return ct6_or(slot, e, ct_state::CLOSING, 0).0 || wrote;
    } else if state == ct_state::OPENING
        && direction == ct_dir::ORIGINAL
        && flags & ct_flags::SEEN_REPLY != 0
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    {
        // The client's first segment after the backend's SYN-ACK completes
        // the handshake; the SYN-ACK alone does not (half-open flows keep
        // the short opening lifetime).
        return ct6_or(slot, e, ct_state::ESTABLISHED, 0).0 || wrote;
    }
    wrote
}

/// ORs `state` and `flags` into the entry unless `seen` (read just before)
/// already has them all: the common packet writes nothing. Returns whether
/// it wrote, and state and flags after.
#[inline(always)]
fn ct6_or(slot: Ct6Slot, seen: &Ct6Entry, state: u8, flags: u8) -> (bool, (u8, u8)) {
    if state & !seen.state == 0 && flags & !seen.flags == 0 {
        return (false, (seen.state, seen.flags));
    }
    (true, slot.or_state_flags(state, flags))
}
