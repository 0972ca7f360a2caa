//! Conntrack: the flow -> backend pinning, with per-state lifetimes.
//!
//! Each flow has an ORIGINAL entry (client -> service tuple) and a REPLY entry
//! (backend -> client tuple after translation). The ORIGINAL entry holds the
//! state and the last-seen time for both directions.

use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{ct_dir, ct_flags, ct_state, CtEntry, CtKey, IPPROTO_TCP};

use crate::{
    maps::{ct_get, ct_slot, CtSlot, CONNTRACK},
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

/// Inserts both entries of a new flow. If another CPU created the flow first
/// (retransmitted SYN racing), its entry wins and is returned.
#[inline(always)]
pub fn ct4_create(entry: &CtEntry) -> Result<CtEntry, ()> {
    let original = entry.original_key();
    if CONNTRACK
        .insert(original, entry, BPF_NOEXIST as u64)
        .is_err()
    {
        return ct_get(&original).ok_or(());
    }
    if CONNTRACK.insert(entry.reply_key(), entry, 0).is_err() {
        let _ = CONNTRACK.remove(original);
        return Err(());
    }
    Ok(*entry)
}

#[inline(always)]
pub fn ct4_delete(entry: &CtEntry) {
    let _ = CONNTRACK.remove(entry.original_key());
    let _ = CONNTRACK.remove(entry.reply_key());
}

/// A TCP SYN (without ACK) on a flow that is closing starts a new connection
/// that reuses the tuple: it must get a fresh backend choice.
#[inline(always)]
pub fn ct4_is_reopen(entry: &CtEntry, flow: &Ipv4Flow) -> bool {
    flow.proto == IPPROTO_TCP
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.state == ct_state::CLOSING
}

/// Updates state and last-seen time of a flow's ORIGINAL entry for a packet in
/// `direction`.
#[inline(always)]
pub fn ct4_update(slot: CtSlot, flow: &Ipv4Flow, direction: u8, now_ns: u64) {
    slot.set_last_seen(now_ns);
    let e = slot.get();
    let fin_flag = if direction == ct_dir::ORIGINAL {
        ct_flags::FIN_ORIGINAL
    } else {
        ct_flags::FIN_REPLY
    };
    let mut flags = e.flags;
    if direction == ct_dir::REPLY {
        flags |= ct_flags::SEEN_REPLY;
    }
    if flow.proto != IPPROTO_TCP {
        if direction == ct_dir::REPLY {
            slot.add_flags(flags);
            slot.set_state(ct_state::ESTABLISHED);
        }
        return;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        slot.add_flags(flags);
        slot.set_state(ct_state::CLOSING);
        return;
    }
    if flow.tcp_flags & TCP_FIN != 0 {
        flags |= fin_flag;
    }
    slot.add_flags(flags);
    if flags & (ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY)
        == (ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY)
    {
        slot.set_state(ct_state::CLOSING);
    } else if e.state == ct_state::OPENING
        && flags & ct_flags::SEEN_REPLY != 0
        && flow.tcp_flags & TCP_ACK != 0
    {
        slot.set_state(ct_state::ESTABLISHED);
    }
}
