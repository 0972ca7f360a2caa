//! SNAT state of external flows to remote backends, in the `NAT` map (kept
//! apart from conntrack): the SNAT port is reserved by the flow's REPLY
//! entry (backend -> this node's address and port), inserted only where no
//! live flow holds that tuple, so two flows never share a reply tuple.

use aya_ebpf::bindings::BPF_NOEXIST;
use dataplane_common::{ct_state, nat_dir, NatConfig, NatEntry, NatKey, IPPROTO_TCP};

use crate::{
    maps::{nat_config, nat_get, nat_slot, NatSlot, NAT},
    parse::{Ipv4Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    skb,
};

/// SNAT ports tried for a new flow before it is refused as exhausted: the
/// client's own port (folded into the range) first, then random ones (with
/// the range half full, 7 random tries all fail 0.8% of the time).
pub const NAT_PORT_TRIES: u32 = 8;

/// What a `BPF_NOEXIST` insert over an existing key returns, negated.
const EEXIST: i32 = 17;

/// How stale a flow's `last_seen_ns` may get before a packet refreshes it,
/// as conntrack's: every write dirties a cache line the other direction's
/// CPU reads too; a flow may expire up to this much early.
const NAT_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn nat4_key(flow: &Ipv4Flow, direction: u8) -> NatKey {
    NatKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn nat4_lookup(key: &NatKey) -> Option<NatSlot> {
    nat_slot(key)
}

/// Why a new SNATed flow could not be set up.
pub enum NatCreateError {
    /// No free SNAT port found (or no SNAT address configured).
    Exhausted,
    /// The map refused an insert.
    InsertFailed,
}

/// Whether the REPLY entry `reply` still belongs to a live flow.
#[inline(always)]
fn nat4_is_live(reply: &NatEntry, now_ns: u64) -> bool {
    nat_slot(&reply.original_key()).is_some_and(|owner| {
        let owner = owner.entry();
        !nat4_is_expired(owner, now_ns) && owner.reply_key() == reply.reply_key()
    })
}

/// Whether the SNATed flow `entry` has outlived the conntrack lifetime of
/// its state (`CT_LIFETIMES`).
#[inline(always)]
pub fn nat4_is_expired(entry: &NatEntry, now_ns: u64) -> bool {
    crate::maps::ct_lifetimes().is_some_and(|l| entry.is_expired(now_ns, l))
}

/// Creates both entries of a flow: `entry` with `nat_addr`/`nat_port`
/// chosen here. A concurrent creation of the same flow (retransmitted SYN
/// on another CPU) wins and is written to `entry` (in place: a second
/// `NatEntry` on the pipeline's stack would not fit).
#[inline(always)]
pub fn nat4_create(entry: &mut NatEntry, now_ns: u64) -> Result<(), NatCreateError> {
    let config = nat_config().ok_or(NatCreateError::Exhausted)?;
    if config.snat_addr == 0 || config.port_max < config.port_min {
        return Err(NatCreateError::Exhausted);
    }
    entry.nat_addr = config.snat_addr;
    let range = u32::from(config.port_max - config.port_min) + 1;
    let mut claimed = false;
    for attempt in 0..NAT_PORT_TRIES {
        let port = nat_port_candidate(&config, range, entry.client_port, attempt);
        entry.nat_port = port.to_be();
        let reply = entry.reply_key();
        match NAT.insert(reply, *entry, BPF_NOEXIST as u64) {
            Ok(()) => {
                claimed = true;
                break;
            }
            // Not a taken tuple: the map took no entry (an LRU map that
            // found no node to evict). Counted as such, not as exhaustion.
            Err(errno) if errno != -EEXIST => return Err(NatCreateError::InsertFailed),
            Err(_) => {}
        }
        // Held by a flow that is gone: its port is free again.
        if let Some(holder) = nat_slot(&reply) {
            if !nat4_is_live(holder.entry(), now_ns) && NAT.insert(reply, *entry, 0).is_ok() {
                claimed = true;
                break;
            }
        }
    }
    if !claimed {
        return Err(NatCreateError::Exhausted);
    }
    let original = entry.original_key();
    if NAT.insert(original, *entry, BPF_NOEXIST as u64).is_err() {
        let _ = NAT.remove(entry.reply_key());
        *entry = nat_get(&original).ok_or(NatCreateError::InsertFailed)?;
    }
    Ok(())
}

/// The SNAT port of try `attempt` (host order) for a client whose source
/// port is `client_port` (network order): first the client's own port
/// folded into the range (itself when the range holds it, as netfilter's
/// NAT keeps a source port whose tuple is free), then random ones. A
/// client reusing its ports (a busy one cycles through its ephemeral range
/// within seconds) so finds each port freed by its own previous flow,
/// whose entries the reopening SYN deleted, where random picks collide
/// with the range's other live and closing flows; folding keeps distinct
/// the ports of a client whose ephemeral range sticks out of ours.
#[inline(always)]
pub fn nat_port_candidate(config: &NatConfig, range: u32, client_port: u16, attempt: u32) -> u16 {
    let min = u32::from(config.port_min);
    let offset = if attempt == 0 {
        // (client port - min) mod range, for ports below min too.
        let own = u32::from(u16::from_be(client_port));
        if own >= min {
            (own - min) % range
        } else {
            (range - (min - own) % range) % range
        }
    } else {
        skb::random_u32() % range
    };
    (min + offset) as u16
}

#[inline(always)]
pub fn nat4_delete(entry: &NatEntry) {
    let _ = NAT.remove(entry.original_key());
    let _ = NAT.remove(entry.reply_key());
}

/// Refreshes a flow's ORIGINAL entry for a packet in `direction`: a reply
/// establishes it, a FIN or RST starts closing; the last-seen time is
/// written at most once per `NAT_REFRESH_NS`. (Coarser than conntrack:
/// a TCP flow the backend answered is established without waiting for the
/// client's ACK; the entries are LRU either way.)
#[inline(always)]
pub fn nat4_update(slot: NatSlot, flow: &Ipv4Flow, direction: u8, now_ns: u64) {
    let state = if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        ct_state::CLOSING
    } else if direction == nat_dir::REPLY {
        ct_state::ESTABLISHED
    } else {
        ct_state::OPENING
    };
    slot.touch(now_ns, state, NAT_REFRESH_NS);
}

/// A TCP SYN (without ACK) on a closing flow starts a new connection on the
/// same tuple: it gets a fresh backend and port.
#[inline(always)]
pub fn nat4_is_reopen(entry: &NatEntry, flow: &Ipv4Flow) -> bool {
    flow.proto == IPPROTO_TCP
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.state == ct_state::CLOSING
}
