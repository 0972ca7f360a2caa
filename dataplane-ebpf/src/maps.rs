//! The maps shared with the agent. Pinned by name under the agent's bpffs
//! directory, so a restarted agent adopts them and established flows survive.

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
