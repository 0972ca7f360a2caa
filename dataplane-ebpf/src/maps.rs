//! The maps shared with the agent. Pinned by name under the agent's bpffs
//! directory, so a restarted agent adopts them and established flows survive.
//!
//! Map values are read and written only through the wrappers at the bottom
//! of this file: they hold the datapath's `unsafe` blocks besides `skb`.

use core::intrinsics::{atomic_or, AtomicOrdering};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use dataplane_common::{
    capacity, AffinityEntry, AffinityKey, Backend, BackendSlotKey, Counter, CtEntry, CtKey,
    ServiceKey, ServiceLabel, ServiceValue, TraceConfig,
};

/// Hash maps the agent fills incrementally are not preallocated: their
/// capacity is large and most of it is usually unused.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Service IP -> number of service ports on it. Lets non-service traffic
/// leave after a single lookup.
#[map(name = "SERVICE_IPS")]
pub static SERVICE_IPS: HashMap<u32, u32> =
    HashMap::pinned(capacity::SERVICE_IPS, BPF_F_NO_PREALLOC);

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// (service id, slot) -> backend id, slots `0..backend_count` valid.
#[map(name = "BACKEND_SLOTS")]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, u32> =
    HashMap::pinned(capacity::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

/// Backend id -> pod address and port.
#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

/// Our conntrack. LRU so that a table full of dead flows evicts the oldest
/// instead of refusing new connections; entries also carry their own expiry.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// ClientIP session affinity: (service, client) -> last backend. LRU so a
/// churn of clients evicts the oldest; entries also carry their own age.
#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

/// Service id -> `namespace/name:port`, written by the agent for operators
/// (`inspect`, `bpftool map dump`). Lives in this object so it is pinned and
/// adopted like every other map.
#[map(name = "SERVICE_NAMES")]
#[expect(dead_code, reason = "read and written by userspace only")]
pub static SERVICE_NAMES: HashMap<u32, ServiceLabel> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// Packet tracing filter, one entry, written by `dataplane-agent monitor`.
#[map(name = "TRACE_CONFIG")]
pub static TRACE_CONFIG: Array<TraceConfig> = Array::pinned(1, 0);

/// Trace events (`TraceEvent`) for `dataplane-agent monitor`.
#[map(name = "TRACE_EVENTS")]
pub static TRACE_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Per-CPU counters indexed by `Counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; no other program instance runs on
        // it concurrently (tc programs do not nest on one CPU).
        unsafe { *slot += 1 };
    }
}

// Every value pointer below comes from a map lookup of this program run. The
// kernel keeps the value alive until the run ends (an LRU eviction or a
// userspace delete frees it only after an RCU grace period), so reading it
// or writing plain fields of it stays within the value; other CPUs may write
// the same fields concurrently, which is noted where it matters.

#[inline(always)]
fn copied<V: Copy>(value: Option<*const V>) -> Option<V> {
    // SAFETY: a value pointer of this run's lookup (see above), copied at once.
    value.map(|v| unsafe { *v })
}

#[inline(always)]
pub fn service_get(key: &ServiceKey) -> Option<ServiceValue> {
    copied(SERVICES.get_ptr(key))
}

#[inline(always)]
pub fn backend_slot_get(key: &BackendSlotKey) -> Option<u32> {
    copied(BACKEND_SLOTS.get_ptr(key))
}

#[inline(always)]
pub fn backend_get(backend_id: u32) -> Option<Backend> {
    copied(BACKENDS.get_ptr(backend_id))
}

#[inline(always)]
pub fn ct_get(key: &CtKey) -> Option<CtEntry> {
    copied(CONNTRACK.get_ptr(key))
}

/// A conntrack entry in place, for updates.
#[derive(Clone, Copy)]
pub struct CtSlot(*mut CtEntry);

#[inline(always)]
pub fn ct_slot(key: &CtKey) -> Option<CtSlot> {
    CONNTRACK.get_ptr_mut(key).map(CtSlot)
}

impl CtSlot {
    #[inline(always)]
    pub fn get(&self) -> CtEntry {
        // SAFETY: a value pointer of this run's lookup, copied at once.
        unsafe { *self.0 }
    }

    /// Racing refreshes from other CPUs store equally recent times; an
    /// aligned u64 store does not tear.
    #[inline(always)]
    pub fn set_last_seen(&self, now_ns: u64) {
        // SAFETY: a plain field of this run's value.
        unsafe { (*self.0).last_seen_ns = now_ns };
    }

    /// ORs `state` and `flags` into the entry atomically (see
    /// `CtEntry::state`) and returns both as they are after it.
    #[inline(always)]
    pub fn or_state_flags(&self, state: u8, flags: u8) -> (u8, u8) {
        let bits = u64::from_le_bytes([state, flags, 0, 0, 0, 0, 0, 0]);
        // SAFETY: `state` starts an aligned 64-bit word of this run's value
        // (asserted in dataplane-common); the OR sets only bits of `state`
        // and `flags`. The BPF target has no atomic read-modify-write types
        // in core; the intrinsic lowers to BPF's atomic fetch-and-OR.
        let before = unsafe {
            let word = core::ptr::addr_of_mut!((*self.0).state).cast::<u64>();
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, bits)
        };
        let [state, flags, ..] = (before | bits).to_le_bytes();
        (state, flags)
    }
}

/// A session affinity entry in place.
pub struct AffinitySlot(*mut AffinityEntry);

#[inline(always)]
pub fn affinity_slot(key: &AffinityKey) -> Option<AffinitySlot> {
    AFFINITY.get_ptr_mut(key).map(AffinitySlot)
}

impl AffinitySlot {
    #[inline(always)]
    pub fn get(&self) -> AffinityEntry {
        // SAFETY: a value pointer of this run's lookup, copied at once.
        unsafe { *self.0 }
    }

    /// A racing writer on another CPU can at worst store an equally recent
    /// timestamp; an aligned u64 store does not tear.
    #[inline(always)]
    pub fn set_last_used(&self, now_ns: u64) {
        // SAFETY: a plain field of this run's value.
        unsafe { (*self.0).last_used_ns = now_ns };
    }
}
