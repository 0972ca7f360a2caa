//! Conntrack: the flow -> backend pinning, with per-state lifetimes.
//!
//! Each flow has an ORIGINAL entry (client -> service tuple) and a REPLY entry
//! (backend -> client tuple after translation). The ORIGINAL entry holds the
//! state and the last-seen time for both directions.

use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{ct_dir, ct_flags, ct_state, CtEntry, CtKey, IPPROTO_TCP};

use crate::{
    maps::CONNTRACK,
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

/// Key of the ORIGINAL entry of the flow an entry belongs to.
#[inline(always)]
pub fn ct4_original_key(entry: &CtEntry) -> CtKey {
    CtKey {
        src_addr: entry.client_addr,
        dst_addr: entry.service_addr,
        src_port: entry.client_port,
        dst_port: entry.service_port,
        proto: entry.proto,
        direction: ct_dir::ORIGINAL,
        _pad: [0; 2],
    }
}

/// Key of the REPLY entry: what the backend's answers look like. In a hairpin
/// flow the client sees itself addressed by the service IP.
#[inline(always)]
pub fn ct4_reply_key(entry: &CtEntry) -> CtKey {
    let dst_addr = if entry.flags & ct_flags::HAIRPIN != 0 {
        entry.service_addr
    } else {
        entry.client_addr
    };
    CtKey {
        src_addr: entry.backend_addr,
        dst_addr,
        src_port: entry.backend_port,
        dst_port: entry.client_port,
        proto: entry.proto,
        direction: ct_dir::REPLY,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn ct4_lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// Inserts both entries of a new flow. If another CPU created the flow first
/// (retransmitted SYN racing), its entry wins and is returned.
#[inline(always)]
pub fn ct4_create(entry: &CtEntry) -> Result<CtEntry, ()> {
    let original = ct4_original_key(entry);
    if CONNTRACK
        .insert(original, entry, BPF_NOEXIST as u64)
        .is_err()
    {
        return match CONNTRACK.get_ptr(original) {
            // SAFETY: copied out at once.
            Some(existing) => Ok(unsafe { *existing }),
            None => Err(()),
        };
    }
    if CONNTRACK.insert(ct4_reply_key(entry), entry, 0).is_err() {
        let _ = CONNTRACK.remove(original);
        return Err(());
    }
    Ok(*entry)
}

#[inline(always)]
pub fn ct4_delete(entry: &CtEntry) {
    let _ = CONNTRACK.remove(ct4_original_key(entry));
    let _ = CONNTRACK.remove(ct4_reply_key(entry));
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
pub fn ct4_update(entry: *mut CtEntry, flow: &Ipv4Flow, direction: u8, now_ns: u64) {
    // SAFETY: `entry` points at a live map value of this CPU's lookup. Racing
    // updates from other CPUs only touch the same small fields and at worst
    // lose one timestamp refresh.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now_ns;
    let fin_flag = if direction == ct_dir::ORIGINAL {
        ct_flags::FIN_ORIGINAL
    } else {
        ct_flags::FIN_REPLY
    };
    if direction == ct_dir::REPLY {
        e.flags |= ct_flags::SEEN_REPLY;
    }
    if flow.proto != IPPROTO_TCP {
        if direction == ct_dir::REPLY {
            e.state = ct_state::ESTABLISHED;
        }
        return;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        e.state = ct_state::CLOSING;
        return;
    }
    if flow.tcp_flags & TCP_FIN != 0 {
        e.flags |= fin_flag;
    }
    if e.flags & (ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY)
        == (ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY)
    {
        e.state = ct_state::CLOSING;
    } else if e.state == ct_state::OPENING
        && e.flags & ct_flags::SEEN_REPLY != 0
        && flow.tcp_flags & TCP_ACK != 0
    {
        e.state = ct_state::ESTABLISHED;
    }
}
