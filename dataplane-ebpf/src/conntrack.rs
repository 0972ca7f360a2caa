//! Conntrack: the flow -> backend pinning, with per-state lifetimes.
//!
//! Each flow has an ORIGINAL entry (client -> service tuple) and a REPLY entry
//! (backend -> client tuple after translation). The ORIGINAL entry holds the
//! state and the last-seen time for both directions.

use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{ct_dir, ct_flags, ct_state, CtEntry, CtKey, IPPROTO_TCP};

use crate::{
    maps::{ct_get, ct_insert, ct_lifetimes, ct_remove, ct_slot, CtSlot},
    parse::{Ipv4Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn ct4_key(flow: &Ipv4Flow, direction: u8) -> CtKey {
    CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

/// The entry at `key`, in place (for `ct4_update`).
#[inline(always)]
pub fn ct4_lookup(key: &CtKey) -> Option<CtSlot> {
    ct_slot(key)
}

/// A copy of the entry at `key`.
#[inline(always)]
pub fn ct4_get(key: &CtKey) -> Option<CtEntry> {
    ct_get(key)
}

/// Why a new flow could not be tracked.
pub enum CtCreateError {
    /// The map refused an insert.
    InsertFailed,
    /// A live flow of another client port or service already has this
    /// flow's reply tuple: taking it would steal that flow's replies.
    ReplyClash,
}

/// Inserts both entries of a new flow. If another CPU created the flow first
/// (retransmitted SYN racing), its entry wins and is returned.
#[inline(always)]
pub fn ct4_create(entry: &CtEntry, now_ns: u64) -> Result<CtEntry, CtCreateError> {
    let original = entry.original_key();
    if ct_insert(&original, entry, BPF_NOEXIST as u64).is_err() {
        return ct_get(&original).ok_or(CtCreateError::InsertFailed);
    }
    if let Err(e) = ct4_claim_reply(entry, now_ns) {
        ct_remove(&original);
        return Err(e);
    }
    Ok(*entry)
}

/// Writes the REPLY entry of the flow `entry` describes, unless another live
/// flow holds that tuple. An entry left behind by a flow that is gone (its
/// ORIGINAL entry evicted, expired, or now pointing at another backend) is
/// taken over.
#[inline(always)]
fn ct4_claim_reply(entry: &CtEntry, now_ns: u64) -> Result<(), CtCreateError> {
    let reply = entry.reply_key();
    if ct_insert(&reply, entry, BPF_NOEXIST as u64).is_ok() {
        return Ok(());
    }
    if let Some(holder) = ct_get(&reply) {
        if holder.original_key() != entry.original_key() && ct4_is_live_reply(&holder, now_ns) {
            return Err(CtCreateError::ReplyClash);
        }
    }
    ct_insert(&reply, entry, 0).map_err(|_| CtCreateError::InsertFailed)
}

/// Whether the REPLY entry `reply` belongs to a live flow: its ORIGINAL entry
/// is there, unexpired, and translates to this same reply tuple.
#[inline(always)]
fn ct4_is_live_reply(reply: &CtEntry, now_ns: u64) -> bool {
    ct_get(&reply.original_key()).is_some_and(|owner| {
        !ct4_is_expired(&owner, now_ns) && owner.reply_key() == reply.reply_key()
    })
}

/// Whether the flow `entry` has outlived the lifetime of its state.
#[inline(always)]
pub fn ct4_is_expired(entry: &CtEntry, now_ns: u64) -> bool {
    // The array's one entry is always there.
    ct_lifetimes().is_some_and(|l| entry.is_expired(now_ns, l))
}

/// Rebuilds a flow's REPLY entry from its ORIGINAL one (`ct`) when it is
/// gone (LRU eviction, the agent's sweep) or left over from an earlier flow,
/// so the backend's replies keep being translated. A tuple another live flow
/// holds is left to it. Costs a lookup: callers check only when
/// `ct4_update` wrote the ORIGINAL entry (at most once a second, or when the
/// flow's state moves), so a lost entry of a busy flow is back within a
/// second.
#[inline(always)]
pub fn ct4_restore_reply(ct: &CtEntry, now_ns: u64) {
    let consistent =
        ct_get(&ct.reply_key()).is_some_and(|reply| reply.original_key() == ct.original_key());
    if !consistent {
        let _ = ct4_claim_reply(ct, now_ns);
    }
}

/// Whether the reply `flow` of the flow whose REPLY entry is `reply` (in
/// place at `slot`) is translated, its flow's state and time updated
/// (`ct4_update`): its ORIGINAL entry must be there, be the flow the REPLY
/// entry was made for, and be unexpired; a REPLY entry that fails that is
/// stale and deleted. Looking the ORIGINAL entry up is a second cold hash
/// lookup per reply, most of a reply's cost: so once it finds the flow
/// established with its reply seen, the REPLY entry is stamped (its
/// `last_seen_ns`, `ESTABLISHED` and `SEEN_REPLY`, which nothing else
/// reads in a REPLY entry), and for `CT_REFRESH_NS` after that the flow's
/// replies that add nothing to its state (no FIN, no RST) are translated on
/// the REPLY entry alone. The ORIGINAL entry's time is refreshed at most
/// once a second anyway; what the window gives up is noticing within it
/// that the ORIGINAL entry went away (evicted, or expired: an established
/// flow's lifetime is hours), and the flow's own deletions (`ct4_delete`:
/// a backend gone, a reopened tuple) take the REPLY entry with it.
#[inline(always)]
pub fn ct4_reply_accept(slot: CtSlot, reply: &CtEntry, flow: &Ipv4Flow, now_ns: u64) -> bool {
    if ct4_reply_stamped(reply, flow, now_ns) {
        return true;
    }
    let Some(owner) = ct_slot(&reply.original_key()) else {
        // The flow is gone (expired, evicted, or its backend removed).
        ct4_delete(reply);
        return false;
    };
    let owner_entry = owner.get();
    if !ct4_owns_reply(&owner_entry, reply) {
        // Left over from an earlier flow of this client tuple: the flow
        // now goes to another backend.
        ct4_delete_reply(reply);
        return false;
    }
    if ct4_is_expired(&owner_entry, now_ns) {
        ct4_delete(reply);
        return false;
    }
    ct4_update(owner, flow, ct_dir::REPLY, now_ns);
    let (state, flags) = owner.state_flags();
    if state == ct_state::ESTABLISHED && flags & ct_flags::SEEN_REPLY != 0 {
        slot.set_last_seen(now_ns);
        ct4_or(slot, reply, ct_state::ESTABLISHED, ct_flags::SEEN_REPLY);
    }
    true
}

/// Whether `reply`, a REPLY entry, was stamped by [`ct4_reply_accept`]
/// within the last `CT_REFRESH_NS` and `flow` adds nothing to its flow's
/// state: the reply is translated without the ORIGINAL entry.
#[inline(always)]
fn ct4_reply_stamped(reply: &CtEntry, flow: &Ipv4Flow, now_ns: u64) -> bool {
    let closes = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    !closes
        && reply.state == ct_state::ESTABLISHED
        && reply.flags & ct_flags::SEEN_REPLY != 0
        && now_ns.saturating_sub(reply.last_seen_ns) < CT_REFRESH_NS
}

/// Whether `owner`, the ORIGINAL entry a REPLY entry `reply` points at, is
/// the flow that entry was made for (and not a later flow of the same client
/// tuple that went to another backend).
#[inline(always)]
pub fn ct4_owns_reply(owner: &CtEntry, reply: &CtEntry) -> bool {
    owner.reply_key() == reply.reply_key()
}

#[inline(always)]
pub fn ct4_delete(entry: &CtEntry) {
    ct_remove(&entry.original_key());
    ct_remove(&entry.reply_key());
}

/// Removes a stale REPLY entry alone.
#[inline(always)]
pub fn ct4_delete_reply(reply: &CtEntry) {
    ct_remove(&reply.reply_key());
}

/// A TCP SYN (without ACK) on a flow that is closing starts a new connection
/// that reuses the tuple: it must get a fresh backend choice.
#[inline(always)]
pub fn ct4_is_reopen(entry: &CtEntry, flow: &Ipv4Flow) -> bool {
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
/// most once per `CT_REFRESH_NS`. Returns whether it wrote anything.
#[inline(always)]
pub fn ct4_update(slot: CtSlot, flow: &Ipv4Flow, direction: u8, now_ns: u64) -> bool {
    let e = slot.get();
    let refreshed = now_ns.saturating_sub(e.last_seen_ns) >= CT_REFRESH_NS;
    if refreshed {
        slot.set_last_seen(now_ns);
    }
    ct4_update_state(slot, &e, flow, direction) || refreshed
}

/// The state part of `ct4_update`: whether it changed state or flags.
#[inline(always)]
fn ct4_update_state(slot: CtSlot, e: &CtEntry, flow: &Ipv4Flow, direction: u8) -> bool {
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
        return ct4_or(slot, e, state, flags).0;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        return ct4_or(slot, e, ct_state::CLOSING, flags).0;
    }
    if flow.tcp_flags & TCP_FIN != 0 {
        flags |= if direction == ct_dir::ORIGINAL {
            ct_flags::FIN_ORIGINAL
        } else {
            ct_flags::FIN_REPLY
        };
    }
    let (wrote, (state, flags)) = ct4_or(slot, e, ct_state::OPENING, flags);
    let both_fins = ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY;
    if flags & both_fins == both_fins {
        // Of two CPUs adding the two FINs at once, the later OR sees both.
        return ct4_or(slot, e, ct_state::CLOSING, 0).0 || wrote;
    } else if state == ct_state::OPENING
        && direction == ct_dir::ORIGINAL
        && flags & ct_flags::SEEN_REPLY != 0
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    {
        // The client's first segment after the backend's SYN-ACK completes
        // the handshake; the SYN-ACK alone does not (half-open flows keep
        // the short opening lifetime).
        return ct4_or(slot, e, ct_state::ESTABLISHED, 0).0 || wrote;
    }
    wrote
}

/// ORs `state` and `flags` into the entry unless `seen` (read just before)
/// already has them all: the common packet writes nothing. Returns whether
/// it wrote, and state and flags after it.
#[inline(always)]
fn ct4_or(slot: CtSlot, seen: &CtEntry, state: u8, flags: u8) -> (bool, (u8, u8)) {
    if state & !seen.state == 0 && flags & !seen.flags == 0 {
        return (false, (seen.state, seen.flags));
    }
    (true, slot.or_state_flags(state, flags))
}
