//! The maps shared with the agent. Pinned by name under the agent's bpffs
//! directory, so a restarted agent adopts them and established flows survive.
//!
//! Map values are read and written only through the wrappers at the bottom
//! of this file: they hold the datapath's `unsafe` blocks besides `skb`.

use core::{
    intrinsics::{atomic_or, AtomicOrdering},
    ptr::NonNull,
};

use crate::fib::NextHop;

use aya_ebpf::{
    btf_maps::{
        lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf,
    },
    macros::btf_map,
};
use dataplane_common::{
    capacity, reply_source_flags, AffinityEntry, AffinityKey, Backend, Counter, CtEntry, CtKey,
    CtLifetimes, FragKey, FragPorts, HopCache, NatConfig, NatEntry, NatKey, ReplySource,
    ServiceKey, ServiceLabel, ServiceValue, SockRevNatEntry, SockRevNatKey, Trace6Scratch,
    TraceConfig, TraceEvent, IPPROTO_TCP,
};
use dataplane_common::{
    Affinity6Key, Backend6, Ct6Entry, Ct6Key, Frag6Key, Ipv6Bytes, Nat6Config, Nat6Entry, Nat6Key,
    ReplySource6, Service6Key, SockRevNat6Entry, SockRevNat6Key,
};

// BTF-defined maps: each carries its key and value types, so `bpftool map
// dump` prints field names. The agent pins every one by name (aya-ebpf's BTF
// map definitions have no `pinning` field) and checks a pinned map's layout
// before adopting it (`dataplane_common::map_layouts`).

/// Hash maps the agent fills incrementally are not preallocated: their
/// capacity is large and most of it is usually unused.
const BPF_F_NO_PREALLOC: usize = 1;

/// `LAYOUT_VERSION` of the maps pinned next to it, written by the agent.
#[btf_map(name = "LAYOUT")]
#[expect(dead_code, reason = "read and written by userspace only")]
pub static LAYOUT: Array<u32, 1> = Array::new();

/// Service IP -> number of service ports on it. Lets non-service traffic
/// leave after a single lookup.
#[btf_map(name = "SERVICE_IPS")]
pub static SERVICE_IPS: HashMap<u32, u32, { capacity::SERVICE_IPS as usize }, BPF_F_NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "SERVICES")]
pub static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { capacity::SERVICES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Slot -> backend id. Each frontend owns the block of slots from its
/// `slot_base`, `backend_count` of them valid; 0 is no backend. An array, so
/// the lookup of a new connection's backend is inlined by the verifier and
/// the agent writes 100 000 slots in one cheap batch.
#[btf_map(name = "BACKEND_SLOTS")]
pub static BACKEND_SLOTS: Array<u32, { capacity::BACKEND_SLOTS as usize }> = Array::new();

/// Backend id -> pod address and port. An array: the agent hands out dense
/// ids, and an array lookup is an address computation the verifier inlines,
/// where a hash lookup hashes the key on every established packet. An unused
/// id holds the all-zero backend.
#[btf_map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend, { capacity::BACKENDS as usize }> = Array::new();

/// Backends' (address, port, protocol) -> 1, and backend addresses (port
/// and protocol 0) -> 1 and bits, written by the agent with `BACKENDS`: the
/// only sources whose packets into a pod `to_pod` looks up in conntrack, so
/// traffic between pods costs one lookup in this small map, keyed by the
/// source address. The address's top two bits (`reply_source_flags`) say
/// no flow, or no NodePort flow, went to a backend there yet: `to_pod` and
/// `from_pod` then skip their conntrack lookups. With `--direct-redirect`,
/// `to_pod` replaces a port's 1 with the pod interface it saw a flow to the
/// backend go into (`redirect`); the uplink's egress looks up ports.
#[btf_map(name = "REPLY_SOURCES")]
static REPLY_SOURCES: HashMap<
    ReplySource,
    u32,
    { capacity::REPLY_SOURCES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Our conntrack, TCP flows. LRU so that a table full of dead flows evicts
/// the oldest instead of refusing new connections; entries also carry their
/// own expiry. Sized by the agent at load.
#[btf_map(name = "CT_TCP")]
static CT_TCP: LruHashMap<CtKey, CtEntry, { capacity::CT_TCP as usize }> = LruHashMap::new();

/// Conntrack of every other protocol, apart so that a burst of short UDP
/// flows (DNS) evicts its own kind, never established TCP flows.
#[btf_map(name = "CT_OTHER")]
static CT_OTHER: LruHashMap<CtKey, CtEntry, { capacity::CT_OTHER as usize }> = LruHashMap::new();

/// Fragmented datagrams: the ports their first fragment carried, for the
/// fragments after it (which have no L4 header). LRU: a datagram's entry
/// is not needed once its last fragment passed.
#[btf_map(name = "FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragKey, FragPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// The conntrack lifetimes the agent was started with.
#[btf_map(name = "CT_LIFETIMES")]
static CT_LIFETIMES: Array<CtLifetimes, 1> = Array::new();

/// ClientIP session affinity: (service, client) -> last backend. LRU so a
/// churn of clients evicts the oldest; entries also carry their own age.
#[btf_map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

/// Service id -> `namespace/name:port`, written by the agent for operators
/// (`inspect`, `bpftool map dump`). Lives in this object so it is pinned and
/// adopted like every other map.
#[btf_map(name = "SERVICE_NAMES")]
#[expect(dead_code, reason = "read and written by userspace only")]
pub static SERVICE_NAMES: HashMap<
    u32,
    ServiceLabel,
    { capacity::SERVICES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

/// Packet tracing filter, one entry, written by `dataplane-agent monitor`.
#[btf_map(name = "TRACE_CONFIG")]
pub static TRACE_CONFIG: Array<TraceConfig, 1> = Array::new();

/// Trace events for `dataplane-agent monitor`: `TraceEvent` records, and
/// `TraceEvent6` ones (reserved untyped) for IPv6.
#[btf_map(name = "TRACE_EVENTS")]
pub static TRACE_EVENTS: RingBuf<TraceEvent, { capacity::TRACE_EVENTS_BYTES as usize }> =
    RingBuf::new();

/// A traced IPv6 packet's tuple on arrival and its filter, one slot per
/// CPU: kept here from the packet's parse to its trace, since the IPv6
/// paths' deepest call chains have no stack to spare for them. The tc and XDP programs do
/// not nest on a CPU (XDP has finished before tc sees the packet); the
/// socket hooks never use it.
#[btf_map(name = "TRACE6_SCRATCH")]
pub static TRACE6_SCRATCH: PerCpuArray<Trace6Scratch, 1> = PerCpuArray::new();

/// Socket hooks: (socket cookie, backend) -> the service the socket asked
/// for, so `recvmsg` and `getpeername` show the service address. A closed
/// socket's connect() entry is deleted by `sock_release`; what that cannot
/// find (unconnected UDP's per-datagram entries) ages out of the LRU.
#[btf_map(name = "SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<
    SockRevNatKey,
    SockRevNatEntry,
    { capacity::SOCK_REVNAT as usize },
> = LruHashMap::new();
/// SNAT of external flows to remote backends: ORIGINAL (client ->
/// frontend) and REPLY (backend -> this node's SNAT port) entries. LRU so
/// dead flows make room; entries also carry their own expiry. Kept apart
/// from the conntrack maps, whose layout this does not touch.
#[btf_map(name = "NAT")]
pub static NAT: LruHashMap<NatKey, NatEntry, { capacity::NAT as usize }> = LruHashMap::new();

/// SNAT address and port range, one entry, written by the agent.
#[btf_map(name = "NAT_CONFIG")]
pub static NAT_CONFIG: Array<NatConfig, 1> = Array::new();

/// `loadBalancerSourceRanges`: (service id, client prefix) -> 1.
#[btf_map(name = "SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<[u32; 2], u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Per-CPU counters indexed by `Counter`.
// IPv6 maps, beside the IPv4 ones so no IPv4 key carries 16-byte
// addresses; the same roles as their IPv4 namesakes above.

#[btf_map(name = "LB6_SERVICE_IPS")]
pub static LB6_SERVICE_IPS: HashMap<
    Ipv6Bytes,
    u32,
    { capacity::SERVICE_IPS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "LB6_SERVICES")]
pub static LB6_SERVICES: HashMap<
    Service6Key,
    ServiceValue,
    { capacity::SERVICES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "LB6_BACKENDS")]
pub static LB6_BACKENDS: Array<Backend6, { capacity::LB6_BACKENDS as usize }> = Array::new();

/// `REPLY_SOURCES` of the IPv6 backends, written with `LB6_BACKENDS`; the
/// same values (interface and "no flows yet" bits).
#[btf_map(name = "LB6_REPLY_SOURCES")]
static LB6_REPLY_SOURCES: HashMap<
    ReplySource6,
    u32,
    { capacity::LB6_REPLY_SOURCES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "LB6_AFFINITY")]
pub static LB6_AFFINITY: LruHashMap<Affinity6Key, AffinityEntry, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "LB6_SOCK_REVNAT")]
pub static LB6_SOCK_REVNAT: LruHashMap<
    SockRevNat6Key,
    SockRevNat6Entry,
    { capacity::SOCK_REVNAT as usize },
> = LruHashMap::new();

#[btf_map(name = "CT6_TCP")]
pub static CT6_TCP: LruHashMap<Ct6Key, Ct6Entry, { capacity::CT_TCP as usize }> = LruHashMap::new();

#[btf_map(name = "CT6_OTHER")]
pub static CT6_OTHER: LruHashMap<Ct6Key, Ct6Entry, { capacity::CT_OTHER as usize }> =
    LruHashMap::new();

#[btf_map(name = "CT6_FRAGMENTS")]
pub static CT6_FRAGMENTS: LruHashMap<Frag6Key, FragPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// SNAT of external IPv6 flows to remote backends; see `NAT`.
#[btf_map(name = "NAT6")]
pub static NAT6: LruHashMap<Nat6Key, Nat6Entry, { capacity::NAT6 as usize }> = LruHashMap::new();

/// This node's IPv6 SNAT address, one entry, written by the agent (the
/// port range is `NAT_CONFIG`'s).
#[btf_map(name = "NAT6_CONFIG")]
pub static NAT6_CONFIG: Array<Nat6Config, 1> = Array::new();

/// IPv6 `loadBalancerSourceRanges`: (service id, client prefix) -> 1.
#[btf_map(name = "SOURCE_RANGES6")]
pub static SOURCE_RANGES6: LpmTrie<[u8; 20], u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

#[btf_map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU, in bounds. tc programs do not
        // nest on one CPU; a tc program interrupting a socket hook (softirq
        // over process context) can at worst lose one increment of a counter
        // both use: statistics, never a decision.
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

/// The backend id in slot `index`, if it holds one.
#[inline(always)]
pub fn backend_slot_get(index: u32) -> Option<u32> {
    copied(BACKEND_SLOTS.get_ptr(index)).filter(|id| *id != 0)
}

/// The backend with this id, if the id is in use.
#[inline(always)]
pub fn backend_get(backend_id: u32) -> Option<Backend> {
    copied(BACKENDS.get_ptr(backend_id)).filter(|b| b.addr != 0)
}

/// The `REPLY_SOURCES` value of `source`, if it is a backend's.
#[inline(always)]
pub fn reply_source_get(source: &ReplySource) -> Option<u32> {
    copied(REPLY_SOURCES.get_ptr(source))
}

/// The pod interface flows to `backend` were seen going into, if any
/// (`redirect`); 1 only marks a backend.
#[inline(always)]
pub fn backend_interface(backend: &ReplySource) -> Option<u32> {
    reply_source_get(backend)
        .map(|v| v & reply_source_flags::IFINDEX_MASK)
        .filter(|ifindex| *ifindex > 1)
}

/// Remembers `ifindex` as the pod interface of `backend`, if it is one.
#[inline(always)]
pub fn learn_backend_interface(backend: &ReplySource, ifindex: u32) {
    if let Some(slot) = reply_source_slot(backend) {
        let mask = reply_source_flags::IFINDEX_MASK;
        slot.update(|v| (v & !mask) | (ifindex & mask));
    }
}

/// `backend`'s `REPLY_SOURCES` value in place, if it is a backend.
#[inline(always)]
pub fn reply_source_slot(backend: &ReplySource) -> Option<ReplySourceSlot> {
    REPLY_SOURCES.get_ptr_mut(backend).map(ReplySourceSlot)
}

/// A `REPLY_SOURCES` (`LB6_REPLY_SOURCES`) value in place.
pub struct ReplySourceSlot(*mut u32);

impl ReplySourceSlot {
    #[inline(always)]
    pub fn get(&self) -> u32 {
        // SAFETY: points into this run's map value.
        unsafe { core::ptr::read_volatile(self.0) }
    }

    /// Writes `change(value)` if that differs: the common packet writes
    /// nothing, so the line stays shared between CPUs. Not atomic (the BPF
    /// target without alu32 has no 32-bit atomic AND/OR): the value is read
    /// just before the write. A port's entry has one kind of writer
    /// (`to_pod` learning an interface), an address's another (new flows
    /// clearing "no flows yet" bits, which race only on the address's first
    /// flows on two CPUs at once: bits one cleared and the other wrote
    /// back are cleared again by the flow's next refresh, `from_pod`, at
    /// most a second later, or the next new flow).
    #[inline(always)]
    pub fn update(&self, change: impl FnOnce(u32) -> u32) {
        let value = self.get();
        let changed = change(value);
        if changed != value {
            // SAFETY: an aligned u32 of this run's map value.
            unsafe { core::ptr::write_volatile(self.0, changed) };
        }
    }

    /// A flow of this node now goes to a backend at the address whose
    /// entry this is: clears `NO_FLOWS`,
    /// and `NO_NODE_PORT_FLOWS` when `node_port_flow()` says it is a
    /// NodePort flow to a local pod (asked only while that bit is set).
    /// The common case, bits already clear, reads the value and writes
    /// nothing. Both families (`lb4_flow_to_backend`,
    /// `lb6_flow_to_backend`).
    #[inline(always)]
    pub fn clear_for_flow(&self, node_port_flow: impl FnOnce() -> bool) {
        let value = self.get();
        let mut bits = value & reply_source_flags::NO_FLOWS;
        if value & reply_source_flags::NO_NODE_PORT_FLOWS != 0 && node_port_flow() {
            bits |= reply_source_flags::NO_NODE_PORT_FLOWS;
        }
        if bits != 0 {
            self.update(|v| v & !bits);
        }
    }
}

/// The `SERVICE_IPS` value of `addr`: frontend count and node bit.
#[inline(always)]
pub fn service_ip_get(addr: u32) -> Option<u32> {
    copied(SERVICE_IPS.get_ptr(&addr))
}

#[inline(always)]
pub fn nat_config() -> Option<NatConfig> {
    NAT_CONFIG.get(0).copied()
}

/// Whether `client_addr` lies in one of `service_id`'s source ranges.
#[inline(always)]
pub fn source_range_contains(service_id: u32, client_addr: u32) -> bool {
    let key = LpmKey::new(64, [service_id.to_be(), client_addr]);
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
fn cached_hop(cache: &HopCache, now_ns: u64) -> Option<NextHop> {
    cache.is_fresh(now_ns).then(|| NextHop {
        ifindex: cache.ifindex,
        macs: Some(cache.macs),
    })
}

#[inline(always)]
fn keep_hop(cache: &mut HopCache, hop: &NextHop, now_ns: u64) {
    if let Some(macs) = hop.macs {
        *cache = HopCache {
            ifindex: hop.ifindex,
            macs,
            checked: HopCache::stamp(now_ns),
        };
    }
}

#[inline(always)]
pub fn nat_get(key: &NatKey) -> Option<NatEntry> {
    copied(NAT.get_ptr(key))
}

/// A NAT entry in place, for updates.
#[derive(Clone, Copy)]
/// Non-null, so an `Option<NatSlot>` is one register.
pub struct NatSlot(NonNull<NatEntry>);

#[inline(always)]
pub fn nat_slot(key: &NatKey) -> Option<NatSlot> {
    NAT.get_ptr_mut(key).and_then(NonNull::new).map(NatSlot)
}

impl NatSlot {
    #[inline(always)]
    pub fn get(&self) -> NatEntry {
        // SAFETY: a value pointer of this run's lookup, copied at once.
        unsafe { *self.0.as_ptr() }
    }

    /// The entry read in place, for what needs a few fields only (a
    /// whole copy costs the external pipeline stack it does not have).
    #[inline(always)]
    pub fn entry(&self) -> &NatEntry {
        // SAFETY: a value pointer of this run's lookup, valid for the run;
        // only read through this reference, which the callers drop before
        // writing the entry.
        unsafe { self.0.as_ref() }
    }

    /// This direction's next hop while the cached one is fresh.
    #[inline(always)]
    pub fn cached_hop(&self, now_ns: u64) -> Option<NextHop> {
        // SAFETY: a value pointer of this run's lookup; the field is copied.
        cached_hop(unsafe { &(*self.0.as_ptr()).hop }, now_ns)
    }

    /// Caches `hop` as this direction's, looked up at `now_ns` (a complete
    /// one only: without a neighbour entry the next packet looks again).
    #[inline(always)]
    pub fn keep_hop(&self, hop: &NextHop, now_ns: u64) {
        // SAFETY: a plain field of this run's value.
        keep_hop(unsafe { &mut (*self.0.as_ptr()).hop }, hop, now_ns);
    }

    /// Plain stores: racing CPUs store equally recent times, and a lost
    /// state step is made good by the flow's next packet. The last-seen
    /// time is written only once it is `refresh_ns` old (see
    /// `snat::NAT_REFRESH_NS`). A call of its own: the external pipeline
    /// has no stack left for the comparison's registers.
    #[inline(never)]
    pub fn touch(self, now_ns: u64, state: u8, refresh_ns: u64) {
        // SAFETY: plain fields of this run's value.
        unsafe {
            if now_ns.saturating_sub((*self.0.as_ptr()).last_seen_ns) >= refresh_ns {
                (*self.0.as_ptr()).last_seen_ns = now_ns;
            }
            if (*self.0.as_ptr()).state < state {
                (*self.0.as_ptr()).state = state;
            }
        }
    }
}

#[inline(always)]
pub fn sock_revnat_get(key: &SockRevNatKey) -> Option<SockRevNatEntry> {
    copied(SOCK_REVNAT.get_ptr(key))
}

#[inline(always)]
pub fn ct_get(key: &CtKey) -> Option<CtEntry> {
    copied(ct_get_ptr_mut(key).map(|p| p as *const CtEntry))
}

/// The conntrack map of a key's protocol: every call site names one map
/// per branch, so the verifier sees a single map at each helper call.
#[inline(always)]
fn ct_get_ptr_mut(key: &CtKey) -> Option<*mut CtEntry> {
    if key.proto == IPPROTO_TCP {
        CT_TCP.get_ptr_mut(key)
    } else {
        CT_OTHER.get_ptr_mut(key)
    }
}

/// Inserts (with BPF_* `flags`) into the conntrack map of the key's
/// protocol.
#[inline(always)]
pub fn ct_insert(key: &CtKey, entry: &CtEntry, flags: u64) -> Result<(), i32> {
    if key.proto == IPPROTO_TCP {
        CT_TCP.insert(key, entry, flags)
    } else {
        CT_OTHER.insert(key, entry, flags)
    }
}

#[inline(always)]
pub fn ct_remove(key: &CtKey) {
    let _ = if key.proto == IPPROTO_TCP {
        CT_TCP.remove(key)
    } else {
        CT_OTHER.remove(key)
    };
}

#[inline(always)]
pub fn frag_get(key: &FragKey) -> Option<FragPorts> {
    copied(FRAGMENTS.get_ptr(key))
}

/// Records a datagram's ports; a failed insert leaves its later fragments
/// unknown (counted where they are dropped).
#[inline(always)]
pub fn frag_insert(key: &FragKey, ports: &FragPorts) {
    let _ = FRAGMENTS.insert(key, ports, 0);
}

/// The lifetimes the agent configured (kube-proxy's defaults if it has not
/// written them yet).
#[inline(always)]
pub fn ct_lifetimes() -> Option<&'static CtLifetimes> {
    // Read in place: a copy would take stack the external pipeline lacks.
    CT_LIFETIMES.get(0)
}

/// A conntrack entry in place, for updates.
#[derive(Clone, Copy)]
pub struct CtSlot(*mut CtEntry);

#[inline(always)]
pub fn ct_slot(key: &CtKey) -> Option<CtSlot> {
    ct_get_ptr_mut(key).map(CtSlot)
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

    /// State and flags as they are now (two bytes, not the entry).
    #[inline(always)]
    pub fn state_flags(&self) -> (u8, u8) {
        // SAFETY: plain fields of this run's value.
        unsafe { ((*self.0).state, (*self.0).flags) }
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

// IPv6 wrappers, the same roles as their IPv4 namesakes above.

#[inline(always)]
pub fn service6_ip_get(addr: &Ipv6Bytes) -> Option<u32> {
    copied(LB6_SERVICE_IPS.get_ptr(addr))
}

#[inline(always)]
pub fn service6_get(key: &Service6Key) -> Option<ServiceValue> {
    copied(LB6_SERVICES.get_ptr(key))
}

/// The IPv6 backend with this id, if the id is in use.
#[inline(always)]
pub fn backend6_get(backend_id: u32) -> Option<Backend6> {
    copied(LB6_BACKENDS.get_ptr(backend_id)).filter(|b| b.addr != [0; 16])
}

/// The `LB6_REPLY_SOURCES` value of `source`, if it is an IPv6 backend's.
#[inline(always)]
pub fn reply_source6_get(source: &ReplySource6) -> Option<u32> {
    copied(LB6_REPLY_SOURCES.get_ptr(source))
}

/// [`backend_interface`] of an IPv6 backend.
#[inline(always)]
pub fn backend_interface6(backend: &ReplySource6) -> Option<u32> {
    reply_source6_get(backend)
        .map(|v| v & reply_source_flags::IFINDEX_MASK)
        .filter(|ifindex| *ifindex > 1)
}

/// [`learn_backend_interface`] of an IPv6 backend: the "no flows yet"
/// bits are kept.
#[inline(always)]
pub fn learn_backend_interface6(backend: &ReplySource6, ifindex: u32) {
    if let Some(slot) = reply_source6_slot(backend) {
        let mask = reply_source_flags::IFINDEX_MASK;
        slot.update(|v| (v & !mask) | (ifindex & mask));
    }
}

/// [`reply_source_slot`] of an IPv6 backend (`LB6_REPLY_SOURCES`).
#[inline(always)]
pub fn reply_source6_slot(backend: &ReplySource6) -> Option<ReplySourceSlot> {
    LB6_REPLY_SOURCES.get_ptr_mut(backend).map(ReplySourceSlot)
}

#[inline(always)]
pub fn affinity6_slot(key: &Affinity6Key) -> Option<AffinitySlot> {
    LB6_AFFINITY.get_ptr_mut(key).map(AffinitySlot)
}

#[inline(always)]
pub fn sock6_revnat_get(key: &SockRevNat6Key) -> Option<SockRevNat6Entry> {
    copied(LB6_SOCK_REVNAT.get_ptr(key))
}

#[inline(always)]
pub fn affinity6_insert(key: &Affinity6Key, entry: &AffinityEntry) {
    // Best effort: without the entry the next connection is balanced anew.
    let _ = LB6_AFFINITY.insert(key, entry, 0);
}

#[inline(always)]
fn ct6_get_ptr_mut(key: &Ct6Key) -> Option<*mut Ct6Entry> {
    if key.proto == IPPROTO_TCP {
        CT6_TCP.get_ptr_mut(key)
    } else {
        CT6_OTHER.get_ptr_mut(key)
    }
}

#[inline(always)]
pub fn ct6_get(key: &Ct6Key) -> Option<Ct6Entry> {
    copied(ct6_get_ptr_mut(key).map(|p| p as *const Ct6Entry))
}

#[inline(always)]
pub fn ct6_insert(key: &Ct6Key, entry: &Ct6Entry, flags: u64) -> Result<(), i32> {
    if key.proto == IPPROTO_TCP {
        CT6_TCP.insert(key, entry, flags)
    } else {
        CT6_OTHER.insert(key, entry, flags)
    }
}

#[inline(always)]
pub fn ct6_remove(key: &Ct6Key) {
    let _ = if key.proto == IPPROTO_TCP {
        CT6_TCP.remove(key)
    } else {
        CT6_OTHER.remove(key)
    };
}

#[inline(always)]
pub fn frag6_get(key: &Frag6Key) -> Option<FragPorts> {
    copied(CT6_FRAGMENTS.get_ptr(key))
}

/// As `frag_insert`.
#[inline(always)]
pub fn frag6_insert(key: &Frag6Key, ports: &FragPorts) {
    let _ = CT6_FRAGMENTS.insert(key, ports, 0);
}

/// An IPv6 conntrack entry in place; see [`CtSlot`].
#[derive(Clone, Copy)]
pub struct Ct6Slot(*mut Ct6Entry);

#[inline(always)]
pub fn ct6_slot(key: &Ct6Key) -> Option<Ct6Slot> {
    ct6_get_ptr_mut(key).map(Ct6Slot)
}

impl Ct6Slot {
    #[inline(always)]
    pub fn get(&self) -> Ct6Entry {
        // SAFETY: a value pointer of this run's lookup, copied at once.
        unsafe { *self.0 }
    }

    /// The entry read in place: an 88-byte copy per use would not fit the
    /// IPv6 path's stack. Fields other CPUs change concurrently (the state
    /// word, last seen) read as a copy would read them, old or new.
    #[inline(always)]
    pub fn entry(&self) -> &Ct6Entry {
        // SAFETY: a value pointer of this run's lookup, valid for the run
        // (see above); only read through this reference.
        unsafe { &*self.0 }
    }

    #[inline(always)]
    pub fn set_last_seen(&self, now_ns: u64) {
        // SAFETY: a plain field of this run's value; see `CtSlot`.
        unsafe { (*self.0).last_seen_ns = now_ns };
    }

    /// As [`CtSlot::or_state_flags`].
    #[inline(always)]
    pub fn or_state_flags(&self, state: u8, flags: u8) -> (u8, u8) {
        let bits = u64::from_le_bytes([state, flags, 0, 0, 0, 0, 0, 0]);
        // SAFETY: `state` starts an aligned 64-bit word of this run's value
        // (asserted in dataplane-common); the OR sets only bits of `state`
        // and `flags`.
        let before = unsafe {
            let word = core::ptr::addr_of_mut!((*self.0).state).cast::<u64>();
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, bits)
        };
        let [state, flags, ..] = (before | bits).to_le_bytes();
        (state, flags)
    }
}

/// This node's IPv6 SNAT address, read in place (all zero: none).
#[inline(always)]
pub fn nat6_config() -> Option<&'static Nat6Config> {
    NAT6_CONFIG.get(0)
}

/// Whether IPv6 `client_addr` lies in one of `service_id`'s source ranges.
#[inline(always)]
pub fn source_range6_contains(service_id: u32, client_addr: &Ipv6Bytes) -> bool {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&service_id.to_be_bytes());
    data[4..].copy_from_slice(client_addr);
    let key = LpmKey::new(160, data);
    SOURCE_RANGES6.get(&key).is_some()
}

#[inline(always)]
pub fn nat6_get(key: &Nat6Key) -> Option<Nat6Entry> {
    copied(NAT6.get_ptr(key))
}

/// A `NAT6` entry in place; see [`NatSlot`].
#[derive(Clone, Copy)]
pub struct Nat6Slot(*mut Nat6Entry);

#[inline(always)]
pub fn nat6_slot(key: &Nat6Key) -> Option<Nat6Slot> {
    NAT6.get_ptr_mut(key).map(Nat6Slot)
}

impl Nat6Slot {
    /// The entry read in place (a 112-byte copy would not fit the stack);
    /// see [`Ct6Slot::entry`].
    #[inline(always)]
    pub fn entry(&self) -> &Nat6Entry {
        // SAFETY: a value pointer of this run's lookup, valid for the run;
        // only read through this reference.
        unsafe { &*self.0 }
    }

    /// As [`NatSlot::cached_hop`].
    #[inline(always)]
    pub fn cached_hop(&self, now_ns: u64) -> Option<NextHop> {
        // SAFETY: a value pointer of this run's lookup; the field is copied.
        cached_hop(unsafe { &(*self.0).hop }, now_ns)
    }

    /// As [`NatSlot::keep_hop`].
    #[inline(always)]
    pub fn keep_hop(&self, hop: &NextHop, now_ns: u64) {
        // SAFETY: a plain field of this run's value (no `&Nat6Entry` from
        // `entry` is alive across this store in the callers).
        keep_hop(unsafe { &mut (*self.0).hop }, hop, now_ns);
    }

    /// As [`NatSlot::touch`].
    #[inline(never)]
    pub fn touch(self, now_ns: u64, state: u8, refresh_ns: u64) {
        // SAFETY: plain fields of this run's value.
        unsafe {
            if now_ns.saturating_sub((*self.0).last_seen_ns) >= refresh_ns {
                (*self.0).last_seen_ns = now_ns;
            }
            if (*self.0).state < state {
                (*self.0).state = state;
            }
        }
    }
}
