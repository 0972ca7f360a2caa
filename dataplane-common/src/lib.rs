//! Map keys and values shared by the eBPF datapath and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte. Addresses and ports are stored in **network byte
//! order**, exactly as they appear in packets: the datapath compares them with
//! header fields without swapping, and userspace converts with the helpers at
//! the bottom of this file.
#![no_std]

use bytemuck::{Pod, Zeroable};

mod ipv6;
pub use ipv6::*;

/// Names of the maps as pinned under the agent's bpffs directory. They are
/// part of the operator interface (`bpftool map dump pinned DIR/NAME`).
pub mod map_names {
    pub const SERVICE_IPS: &str = "SERVICE_IPS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    /// Conntrack of TCP flows.
    pub const CT_TCP: &str = "CT_TCP";
    /// Conntrack of UDP (and any other protocol's) flows, apart from TCP so
    /// that a burst of DNS flows cannot evict long-lived TCP flows.
    pub const CT_OTHER: &str = "CT_OTHER";
    /// Conntrack lifetimes the agent was configured with, read by the
    /// datapath, the sweep and `inspect`.
    pub const CT_LIFETIMES: &str = "CT_LIFETIMES";
    /// Ports of fragmented datagrams, so every fragment follows the first.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// The single conntrack map of layouts 1 and 2, split into `CT_TCP` and
    /// `CT_OTHER` since 3. Only the migration still opens it.
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
    pub const AFFINITY: &str = "AFFINITY";
    pub const TRACE_CONFIG: &str = "TRACE_CONFIG";
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    /// Socket-level reverse translation: (socket, backend) -> service.
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// The layout version of the maps pinned next to it.
    pub const LAYOUT: &str = "LAYOUT";
    pub const NAT: &str = "NAT";
    pub const NAT_CONFIG: &str = "NAT_CONFIG";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    /// Backends' (address, port, protocol): the sources of packets into a
    /// pod that may be replies to translate.
    pub const REPLY_SOURCES: &str = "REPLY_SOURCES";
    // IPv6: the family in the name; see `crate::ipv6`.
    pub const LB6_SERVICE_IPS: &str = "LB6_SERVICE_IPS";
    pub const LB6_SERVICES: &str = "LB6_SERVICES";
    pub const LB6_BACKENDS: &str = "LB6_BACKENDS";
    pub const LB6_AFFINITY: &str = "LB6_AFFINITY";
    pub const LB6_SOCK_REVNAT: &str = "LB6_SOCK_REVNAT";
    /// IPv6 backends' (address, port, protocol): `REPLY_SOURCES` of IPv6.
    pub const LB6_REPLY_SOURCES: &str = "LB6_REPLY_SOURCES";
    pub const CT6_TCP: &str = "CT6_TCP";
    pub const CT6_OTHER: &str = "CT6_OTHER";
    pub const CT6_FRAGMENTS: &str = "CT6_FRAGMENTS";
    /// SNAT of external IPv6 flows to remote backends.
    pub const NAT6: &str = "NAT6";
    /// This node's IPv6 SNAT address.
    pub const NAT6_CONFIG: &str = "NAT6_CONFIG";
    /// IPv6 `loadBalancerSourceRanges`.
    pub const SOURCE_RANGES6: &str = "SOURCE_RANGES6";
    /// Per CPU: a traced IPv6 packet's tuple on arrival and the filter it
    /// is traced under, kept off the stack until its decision is traced.
    pub const TRACE6_SCRATCH: &str = "TRACE6_SCRATCH";
    /// Every map, for tools that walk them all (`cleanup`).
    pub const ALL: [&str; 32] = [
        SERVICE_IPS,
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        CT_TCP,
        CT_OTHER,
        CT_LIFETIMES,
        FRAGMENTS,
        COUNTERS,
        SERVICE_NAMES,
        AFFINITY,
        TRACE_CONFIG,
        TRACE_EVENTS,
        SOCK_REVNAT,
        LAYOUT,
        NAT,
        NAT_CONFIG,
        SOURCE_RANGES,
        REPLY_SOURCES,
        LB6_SERVICE_IPS,
        LB6_SERVICES,
        LB6_BACKENDS,
        LB6_AFFINITY,
        LB6_SOCK_REVNAT,
        CT6_TCP,
        CT6_OTHER,
        CT6_FRAGMENTS,
        NAT6,
        NAT6_CONFIG,
        SOURCE_RANGES6,
        TRACE6_SCRATCH,
        LB6_REPLY_SOURCES,
    ];
}

/// Version of the pinned maps' layout: their key and value types and what
/// their fields mean. Pinned maps outlive the agent, so an agent meets the
/// maps of the release before it; it adopts them only when the version
/// stored in the `LAYOUT` map and each map's sizes match its own. Bump it
/// with any change to a map type below, even one that keeps sizes (moving a
/// field, giving values new meanings).
///
/// Version 1 (no `LAYOUT` map): legacy maps without BTF, `CtEntry::state`
/// at offset 35. Version 2: BTF-defined maps, `CtEntry` state and flags in
/// one word, `Counter::ReplyTupleClash`. Version 3: `CONNTRACK` split into
/// `CT_TCP` and `CT_OTHER` (sized at load), lifetimes in `CT_LIFETIMES`,
/// `FRAGMENTS`, `Counter::FragmentTranslated` and `FragmentUnknown`; socket-level
/// load balancing: `AffinityKey` gains the client's network namespace cookie,
/// new `SOCK_REVNAT` map, socket counters and trace hooks, `TraceEvent`
/// carries the socket's netns cookie and cgroup id; `BACKENDS` is an array
/// indexed by dense backend ids (was a hash map of the same key and value);
/// `BACKEND_SLOTS` an array (was a hash keyed by service id and slot) in
/// which each frontend owns a block starting at `ServiceValue::slot_base`;
/// north-south: `ServiceKey::scope` (external frontends, NodePorts keyed by
/// address 0), the node-address bit in `SERVICE_IPS`, `Backend::flags`
/// `LOCAL`, the `NAT`, `NAT_CONFIG` and `SOURCE_RANGES` maps, their counters
/// and the uplink trace hooks. Version 4: the `REPLY_SOURCES` map (backends'
/// address, port and protocol), the pre-filter of reply translation; IPv6
/// maps (`LB6_*`, `CT6_*`, new, created) and their counters. Version 5:
/// north-south on IPv6: the `NAT6`, `NAT6_CONFIG` and `SOURCE_RANGES6` maps
/// (new, created). Version 6: IPv6 trace events, the `TRACE6_SCRATCH` map
/// (new, created). Version 7: `REPLY_SOURCES` values carry the
/// [`reply_source_flags`] ("no flows yet" bits; a value without them means
/// "flows may exist"); IPv6 addresses in `TraceConfig` (the IPv6 trace
/// filter in the datapath), `TRACE6_SCRATCH` holds a [`Trace6Scratch`]
/// (the filter copied on a packet's arrival, read at its trace); the
/// `LB6_REPLY_SOURCES` map (IPv6 backends' address, port and protocol;
/// new, created and filled from the backends), the reply pre-filter and
/// direct delivery of IPv6; `NatEntry` and `Nat6Entry` keep the flow's
/// next hop ([`HopCache`]), so an established SNATed flow skips the FIB.
/// Version 8: `REPLY_SOURCES` and `LB6_REPLY_SOURCES` hold an entry per
/// backend address besides the per-port ones ([`ReplySource::address`]),
/// the "no flows yet" bits moved from the ports' entries to the address's,
/// twice the capacity (recreated, filled from the backends).
pub const LAYOUT_VERSION: u32 = 8;

/// Shape of a pinned map as this release creates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    /// The object's capacity; the agent sizes the conntrack maps at load
    /// (`--conntrack-max-tcp`, `--conntrack-max-other`).
    pub max_entries: u32,
}

/// Every pinned map's shape, checked against what is pinned before adopting.
pub mod map_layouts {
    use core::mem::size_of;

    use super::*;

    const fn layout<K, V>(name: &'static str, max_entries: u32) -> MapLayout {
        MapLayout {
            name,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }

    pub const ALL: [MapLayout; map_names::ALL.len()] = [
        layout::<u32, u32>(map_names::SERVICE_IPS, capacity::SERVICE_IPS),
        layout::<ServiceKey, ServiceValue>(map_names::SERVICES, capacity::SERVICES),
        layout::<u32, u32>(map_names::BACKEND_SLOTS, capacity::BACKEND_SLOTS),
        layout::<u32, Backend>(map_names::BACKENDS, capacity::BACKENDS),
        layout::<CtKey, CtEntry>(map_names::CT_TCP, capacity::CT_TCP),
        layout::<CtKey, CtEntry>(map_names::CT_OTHER, capacity::CT_OTHER),
        layout::<u32, CtLifetimes>(map_names::CT_LIFETIMES, 1),
        layout::<FragKey, FragPorts>(map_names::FRAGMENTS, capacity::FRAGMENTS),
        layout::<u32, u64>(map_names::COUNTERS, Counter::COUNT),
        layout::<u32, ServiceLabel>(map_names::SERVICE_NAMES, capacity::SERVICES),
        layout::<AffinityKey, AffinityEntry>(map_names::AFFINITY, capacity::AFFINITY),
        layout::<u32, TraceConfig>(map_names::TRACE_CONFIG, 1),
        // A ring buffer has neither key nor value; its size is in bytes.
        layout::<(), ()>(map_names::TRACE_EVENTS, capacity::TRACE_EVENTS_BYTES),
        layout::<SockRevNatKey, SockRevNatEntry>(map_names::SOCK_REVNAT, capacity::SOCK_REVNAT),
        layout::<u32, u32>(map_names::LAYOUT, 1),
        layout::<NatKey, NatEntry>(map_names::NAT, capacity::NAT),
        layout::<u32, NatConfig>(map_names::NAT_CONFIG, 1),
        layout::<SourceRangeKey, u32>(map_names::SOURCE_RANGES, capacity::SOURCE_RANGES),
        layout::<ReplySource, u32>(map_names::REPLY_SOURCES, capacity::REPLY_SOURCES),
        layout::<Ipv6Bytes, u32>(map_names::LB6_SERVICE_IPS, capacity::SERVICE_IPS),
        layout::<Service6Key, ServiceValue>(map_names::LB6_SERVICES, capacity::SERVICES),
        layout::<u32, Backend6>(map_names::LB6_BACKENDS, capacity::LB6_BACKENDS),
        layout::<Affinity6Key, AffinityEntry>(map_names::LB6_AFFINITY, capacity::AFFINITY),
        layout::<SockRevNat6Key, SockRevNat6Entry>(
            map_names::LB6_SOCK_REVNAT,
            capacity::SOCK_REVNAT,
        ),
        layout::<Ct6Key, Ct6Entry>(map_names::CT6_TCP, capacity::CT_TCP),
        layout::<Ct6Key, Ct6Entry>(map_names::CT6_OTHER, capacity::CT_OTHER),
        layout::<Frag6Key, FragPorts>(map_names::CT6_FRAGMENTS, capacity::FRAGMENTS),
        layout::<Nat6Key, Nat6Entry>(map_names::NAT6, capacity::NAT6),
        layout::<u32, Nat6Config>(map_names::NAT6_CONFIG, 1),
        layout::<SourceRange6Key, u32>(map_names::SOURCE_RANGES6, capacity::SOURCE_RANGES),
        layout::<u32, Trace6Scratch>(map_names::TRACE6_SCRATCH, 1),
        layout::<ReplySource6, u32>(map_names::LB6_REPLY_SOURCES, capacity::LB6_REPLY_SOURCES),
    ];
}

/// Capacities of the maps. The agent refuses what does not fit rather than
/// letting a map insert fail half way through a service.
pub mod capacity {
    // One IP per service at most (dual-port services share theirs).
    pub const SERVICE_IPS: u32 = 131_072;
    pub const SERVICES: u32 = 131_072;
    /// Slots of all frontends, in blocks of a power of two each (so up to
    /// half of it may be padding). A power of two itself.
    pub const BACKEND_SLOTS: u32 = 1_048_576;
    pub const BACKENDS: u32 = 262_144;
    /// One entry per backend and one per backend address at most.
    pub const REPLY_SOURCES: u32 = 2 * BACKENDS;
    /// IPv6 backends (an array, preallocated: fewer than IPv4's).
    pub const LB6_BACKENDS: u32 = 65_536;
    /// One entry per IPv6 backend and one per its address at most.
    pub const LB6_REPLY_SOURCES: u32 = 2 * LB6_BACKENDS;
    /// `CT_TCP` and `CT_OTHER` as built; the agent sizes them at load.
    pub const CT_TCP: u32 = 131_072;
    pub const CT_OTHER: u32 = 65_536;
    /// Fragmented datagrams in flight (LRU).
    pub const FRAGMENTS: u32 = 8_192;
    /// Clients remembered for ClientIP session affinity (LRU).
    pub const AFFINITY: u32 = 131_072;
    /// Most backends one service port may have.
    pub const BACKENDS_PER_SERVICE: u32 = 4_096;
    /// Size of the `TRACE_EVENTS` ring buffer in bytes.
    pub const TRACE_EVENTS_BYTES: u32 = 256 * 1024;
    /// Translated sockets remembered for reverse translation (LRU): one
    /// entry per (socket, backend) a socket hook sent to.
    pub const SOCK_REVNAT: u32 = 131_072;
    /// SNAT flows of external traffic (two entries each).
    pub const NAT: u32 = 131_072;
    /// SNAT flows of external IPv6 traffic (two entries each).
    pub const NAT6: u32 = 65_536;
    /// `loadBalancerSourceRanges` prefixes over all services.
    pub const SOURCE_RANGES: u32 = 16_384;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of `SERVICES`: one frontend (address, port, protocol, scope).
///
/// Internal frontends are cluster IPs. External ones are what the outside
/// reaches: load-balancer ingress IPs and externalIPs by address, and
/// NodePorts with address 0, meaning "any address of this node" (the node's
/// addresses carry [`service_ip_flags::NODE_ADDRESS`] in `SERVICE_IPS`), so
/// a NodePort is one entry however many addresses the node has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Service IP, network byte order; 0 for a NodePort.
    pub addr: u32,
    /// Service port (or node port), network byte order.
    pub port: u16,
    pub proto: u8,
    /// One of [`service_scope`].
    pub scope: u8,
}

/// Scope of a [`ServiceKey`].
pub mod service_scope {
    /// A cluster IP: reached from pods (and nodes) only.
    pub const INTERNAL: u8 = 0;
    /// A NodePort, load-balancer IP or externalIP: reached from outside
    /// through the uplink, and from inside too.
    pub const EXTERNAL: u8 = 1;
}

/// Bits of a `SERVICE_IPS` value besides the count of frontends on the
/// address (the low bits).
pub mod service_ip_flags {
    /// An address of this node: NodePorts (key address 0) are served on it.
    pub const NODE_ADDRESS: u32 = 1 << 31;
    /// The count of frontends on the address.
    pub const COUNT_MASK: u32 = !NODE_ADDRESS;
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Stable id of this frontend; keys its backend slots and names it in
    /// conntrack entries.
    pub service_id: u32,
    /// Number of valid slots, `slot_base..slot_base + backend_count` in
    /// `BACKEND_SLOTS`. Zero means
    /// the service exists but has no endpoints: new connections are rejected.
    pub backend_count: u32,
    /// Bits of [`service_flags`].
    pub flags: u32,
    /// ClientIP session affinity timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_s: u32,
    /// Index in `BACKEND_SLOTS` of this frontend's slot 0.
    pub slot_base: u32,
}

/// Flags of a [`ServiceValue`].
pub mod service_flags {
    /// `internalTrafficPolicy: Local` with endpoints on other nodes only: new
    /// connections are dropped, as kube-proxy drops them, instead of being
    /// rejected (the service does have endpoints, just none here).
    pub const DROP_NO_LOCAL_ENDPOINTS: u32 = 1 << 0;
    /// External frontend with `externalTrafficPolicy: Cluster`: a connection
    /// from outside to a backend on another node is SNATed to this node's
    /// address (with a port from `NAT_CONFIG`'s range), as kube-proxy
    /// masquerades it, so the replies come back through this node.
    pub const MASQUERADE_REMOTE: u32 = 1 << 1;
    /// Load-balancer IP of a service with `loadBalancerSourceRanges`: only
    /// sources in `SOURCE_RANGES` for this service id are served.
    pub const SOURCE_RANGES: u32 = 1 << 2;
}

/// Key of `AFFINITY`: a client of one ClientIP-affinity frontend. The tc
/// path knows a client by its IP; the socket hooks, which run before the
/// socket has a source address, by its network namespace, so that every
/// process of the node's network namespace is one client (as they share the
/// node IP under kube-proxy). Exactly one of the two is non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub service_id: u32,
    /// Client pod IP, network byte order (tc path), else 0.
    pub client_addr: u32,
    /// `bpf_get_netns_cookie` of the client's socket (socket hooks), else 0.
    pub client_netns: u64,
}

/// Key of `SOCK_REVNAT`: a socket a socket hook translated, and the backend
/// it sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie` of the client socket.
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}

/// Value of `SOCK_REVNAT`: the service address the application asked for,
/// shown again by `recvmsg` and `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevNatEntry {
    pub service_addr: u32,
    pub service_port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// Value of `AFFINITY`: the backend a client was last sent to. It stays valid
/// while `slot` of the service still holds `backend_id` and the last new
/// connection is younger than the service's affinity timeout (kube-proxy's
/// `recent` match: the timeout runs from the last new connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityEntry {
    /// `bpf_ktime_get_ns` of the client's last new connection.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub slot: u32,
}

/// Value of `SERVICE_NAMES` (keyed by service id): `namespace/name:port`,
/// NUL-padded. Only for operators (`inspect`, `bpftool`); the datapath never
/// reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceLabel {
    pub bytes: [u8; 128],
}

impl ServiceLabel {
    /// Truncates at a character boundary if the label is longer than 127 bytes.
    pub fn new(label: &str) -> Self {
        let mut bytes = [0u8; 128];
        let mut end = label.len().min(127);
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        bytes[..end].copy_from_slice(&label.as_bytes()[..end]);
        Self { bytes }
    }

    pub fn as_str(&self) -> &str {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.bytes.len());
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("<invalid label>")
    }
}

/// Value of `BACKENDS` (an array indexed by backend id, ids from 1, kept
/// dense by the agent): where a pod listens. An unused id holds the
/// all-zero value (address 0.0.0.0 is never a pod's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Pod IP, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// Bits of [`backend_flags`].
    pub flags: u8,
}

/// Key of `REPLY_SOURCES`: a backend's address, port and protocol, as its
/// replies carry them in their source (network byte order), or a backend
/// address as a whole ([`ReplySource::address`]: port and protocol 0, which
/// no packet's source has).
///
/// A port's entry says where the backend sits (the uplink's egress looks
/// up only packets from one; `--direct-redirect` learns its interface). An
/// address's entry carries the "no flows yet" bits of all its ports
/// ([`reply_source_flags`]): the pre-filter of reply translation in pods
/// looks up the address only, a key the same for every packet of a pod, so
/// a pod that is no backend, or none a flow went to, is answered from a
/// warm bucket instead of the one its ephemeral port hashes to, and a
/// backend's reply costs one lookup before its conntrack one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ReplySource {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ReplySource {
    pub fn of(backend: &Backend) -> Self {
        Self {
            addr: backend.addr,
            port: backend.port,
            proto: backend.proto,
            _pad: 0,
        }
    }

    /// The entry of address `addr` (network byte order) as a whole.
    pub fn address(addr: u32) -> Self {
        Self {
            addr,
            ..Self::default()
        }
    }
}

/// `REPLY_SOURCES` values. A port's entry holds the pod interface `to_pod`
/// saw flows to the backend go into (1 before it saw one: a backend,
/// [`reply_source_flags::PORT`]). An address's entry holds 1 and two bits
/// saying "no flow of this node can be to a backend at this address yet":
/// the agent sets them on the entry it adds with the address's first
/// backend while conntrack holds nothing of it
/// ([`reply_source_flags::FRESH`]); the datapath clears them when it
/// creates a flow to any of its ports. A value without them (the agent's
/// while flows carried over from before its start may exist) means "look
/// it up".
pub mod reply_source_flags {
    /// No flow to this address yet: its packets into a pod are no
    /// replies, `to_pod` leaves them without a conntrack lookup.
    pub const NO_FLOWS: u32 = 1 << 30;
    /// No NodePort flow (one whose service address is this node's) to
    /// this address yet: `from_pod` does not look its packets up as
    /// NodePort replies.
    pub const NO_NODE_PORT_FLOWS: u32 = 1 << 31;
    /// The interface part of a port's value.
    pub const IFINDEX_MASK: u32 = !(NO_FLOWS | NO_NODE_PORT_FLOWS);
    /// What the agent writes for a port: a backend, no interface learnt.
    pub const PORT: u32 = 1;
    /// What it writes for an address no flow can be to yet.
    pub const FRESH: u32 = 1 | NO_FLOWS | NO_NODE_PORT_FLOWS;
    /// What it writes for an address flows to may exist: no bit.
    pub const MAY_HAVE_FLOWS: u32 = 1;
}

/// Flags of a [`Backend`].
pub mod backend_flags {
    /// The endpoint runs on this node: external traffic reaches it without
    /// SNAT, its replies pass this node anyway.
    pub const LOCAL: u8 = 1 << 0;
}

/// Direction of a [`NatKey`].
pub mod nat_dir {
    /// Client to frontend, as it arrives on the uplink.
    pub const ORIGINAL: u8 = 0;
    /// Backend to this node's SNAT address and port.
    pub const REPLY: u8 = 1;
}

/// Key of `NAT`: a tuple as it arrives on the uplink. Each SNATed flow has
/// an ORIGINAL entry (client -> frontend) and a REPLY entry (backend ->
/// SNAT address and port); the REPLY entry is what reserves the SNAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NatKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`nat_dir`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of `NAT`: the two translations of an external flow to a remote
/// backend, DNAT (frontend -> backend) and SNAT (client -> this node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    /// `bpf_ktime_get_ns` of the last packet in either direction.
    pub last_seen_ns: u64,
    pub client_addr: u32,
    pub frontend_addr: u32,
    pub backend_addr: u32,
    /// This node's address the backend sees as the source.
    pub nat_addr: u32,
    pub client_port: u16,
    pub frontend_port: u16,
    pub backend_port: u16,
    pub nat_port: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub proto: u8,
    /// One of [`ct_state`]; plain stores (a lost update only shortens or
    /// lengthens one lifetime step).
    pub state: u8,
    pub _pad: [u8; 2],
    /// Where this direction's packets were last sent (each of the flow's
    /// two entries keeps its own direction's).
    pub hop: HopCache,
}

/// A flow direction's next hop as the FIB last gave it (`NAT`, `NAT6`):
/// packets within [`HopCache::REFRESH_NS`] of the lookup reuse it instead
/// of calling `bpf_fib_lookup` again, so a route or neighbour change
/// reaches an established flow within that time. Plain stores: racing
/// CPUs store equally fresh results.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HopCache {
    /// Egress interface; 0: nothing cached.
    pub ifindex: u32,
    /// Destination and source MAC, as the Ethernet header holds them.
    pub macs: [u8; 12],
    /// When it was looked up, in [`HopCache::stamp`] units (wrapping).
    pub checked: u32,
}

impl HopCache {
    /// How long a looked-up hop is used, as the flows' last-seen refresh.
    pub const REFRESH_NS: u64 = 1_000_000_000;
    /// `stamp` units are 2^20 ns (about 1 ms): 32 bits wrap after 52 days,
    /// which `wrapping_sub` in [`HopCache::is_fresh`] absorbs.
    const STAMP_SHIFT: u32 = 20;

    #[inline(always)]
    pub fn stamp(now_ns: u64) -> u32 {
        (now_ns >> Self::STAMP_SHIFT) as u32
    }

    /// Whether a hop is cached and younger than [`HopCache::REFRESH_NS`].
    #[inline(always)]
    pub fn is_fresh(&self, now_ns: u64) -> bool {
        self.ifindex != 0
            && Self::stamp(now_ns).wrapping_sub(self.checked)
                < (Self::REFRESH_NS >> Self::STAMP_SHIFT) as u32
    }
}

impl NatEntry {
    /// How long after `last_seen_ns` the flow's entries stay valid: the
    /// conntrack lifetimes (`CT_LIFETIMES`).
    #[inline(always)]
    pub fn lifetime_ns(&self, lifetimes: &CtLifetimes) -> u64 {
        lifetimes.lifetime_ns(self.proto, self.state)
    }

    #[inline(always)]
    pub fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(lifetimes)
    }

    #[inline(always)]
    pub fn original_key(&self) -> NatKey {
        NatKey {
            src_addr: self.client_addr,
            dst_addr: self.frontend_addr,
            src_port: self.client_port,
            dst_port: self.frontend_port,
            proto: self.proto,
            direction: nat_dir::ORIGINAL,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub fn reply_key(&self) -> NatKey {
        NatKey {
            src_addr: self.backend_addr,
            dst_addr: self.nat_addr,
            src_port: self.backend_port,
            dst_port: self.nat_port,
            proto: self.proto,
            direction: nat_dir::REPLY,
            _pad: [0; 2],
        }
    }
}

/// Value of `NAT_CONFIG` (one entry, written by the agent): where SNAT
/// ports come from. `port_min..=port_max` (host order) lies outside the
/// node's ephemeral port range and is reserved for us
/// (`net.ipv4.ip_local_reserved_ports`), so no socket of the node ever
/// holds a tuple we hand out. `snat_addr` 0: no SNAT possible, external
/// connections to remote backends are refused and counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatConfig {
    /// Network order.
    pub snat_addr: u32,
    pub port_min: u16,
    pub port_max: u16,
}

/// Key of the `SOURCE_RANGES` LPM trie: a `loadBalancerSourceRanges`
/// prefix of one service. `prefix_len` counts the bits after itself: 32
/// for the service id plus the prefix's own length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    pub prefix_len: u32,
    /// Network byte order, so the trie matches it bit by bit first.
    pub service_id_be: u32,
    /// Network byte order.
    pub addr: u32,
}

/// Direction of a conntrack key.
pub mod ct_dir {
    /// Client to service, as seen leaving the client pod (before DNAT).
    pub const ORIGINAL: u8 = 0;
    /// Backend to client, as seen after DNAT (the reply tuple).
    pub const REPLY: u8 = 1;
}

/// Key of `CONNTRACK`. Each flow has two entries: the original tuple (looked up
/// on packets from the client pod) and the reply tuple (looked up on packets
/// towards the client pod, or from it when the flow is hairpinned).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`ct_dir`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// TCP state of a flow as far as timeouts care. The values are bit sets that
/// only grow (OPENING ⊂ ESTABLISHED ⊂ CLOSING), so the datapath moves a flow
/// on with an atomic OR and two CPUs can never move it back.
pub mod ct_state {
    /// Handshake not complete: a TCP flow whose client has not yet sent a
    /// non-SYN segment after the backend's reply (a SYN-ACK alone does not
    /// establish), or a UDP flow that has seen no reply.
    pub const OPENING: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    /// FIN seen in both directions, or a RST.
    pub const CLOSING: u8 = 3;
}

/// Flags of a conntrack entry.
pub mod ct_flags {
    /// Client and backend are the same pod: the source is rewritten to the
    /// service IP too, so the pod does not see its own address as source.
    pub const HAIRPIN: u8 = 1 << 0;
    pub const SEEN_REPLY: u8 = 1 << 1;
    pub const FIN_ORIGINAL: u8 = 1 << 2;
    pub const FIN_REPLY: u8 = 1 << 3;
}

/// Value of `CONNTRACK`. Both entries of a flow carry the full translation;
/// the original-direction entry is authoritative for state and lifetime.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of flow creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet in either direction.
    pub last_seen_ns: u64,
    pub client_addr: u32,
    pub service_addr: u32,
    pub backend_addr: u32,
    pub client_port: u16,
    pub service_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub backend_id: u32,
    /// One of [`ct_state`]. `state` starts an aligned 64-bit word that the
    /// datapath changes only by ORing bits into `state` and `flags`,
    /// atomically (BPF has 64-bit atomic OR only), so that updates from two
    /// CPUs (a FIN each way, a RST) are never lost. The OR leaves the rest of
    /// the word (padding, `service_id`) as it is.
    pub state: u8,
    /// Bits of [`ct_flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
    pub service_id: u32,
}

// The word `state` and `flags` share (see above) is 8-byte aligned.
const _: () = assert!(core::mem::offset_of!(CtEntry, state) % 8 == 0);
const _: () =
    assert!(core::mem::offset_of!(CtEntry, flags) == core::mem::offset_of!(CtEntry, state) + 1);

/// Conntrack lifetimes after the last packet of a flow, in seconds: value
/// of `CT_LIFETIMES`, written by the agent from its flags at every start
/// (kube-proxy's defaults otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtLifetimes {
    /// TCP before the handshake completes.
    pub tcp_opening_s: u32,
    pub tcp_established_s: u32,
    /// TCP after a FIN each way or a RST.
    pub tcp_closing_s: u32,
    /// UDP (and other protocols) that has seen one direction only.
    pub udp_s: u32,
    /// UDP that has seen replies (a stream).
    pub udp_stream_s: u32,
    pub _pad: u32,
}

impl Default for CtLifetimes {
    fn default() -> Self {
        Self {
            tcp_opening_s: 60,
            tcp_established_s: 6 * 3600,
            tcp_closing_s: 10,
            udp_s: 30,
            udp_stream_s: 120,
            _pad: 0,
        }
    }
}

impl CtLifetimes {
    /// How long after its last packet a flow of `proto` in `state` (one of
    /// [`ct_state`]) stays valid; conntrack and NAT entries alike.
    #[inline(always)]
    pub fn lifetime_ns(&self, proto: u8, state: u8) -> u64 {
        let secs = if proto == IPPROTO_TCP {
            match state {
                ct_state::ESTABLISHED => self.tcp_established_s,
                ct_state::CLOSING => self.tcp_closing_s,
                _ => self.tcp_opening_s,
            }
        } else if state == ct_state::OPENING {
            self.udp_s
        } else {
            // A reply was seen (the datapath moves the flow on with it).
            self.udp_stream_s
        };
        secs as u64 * 1_000_000_000
    }
}

impl CtEntry {
    /// How long after `last_seen_ns` this flow's entries stay valid.
    #[inline(always)]
    pub fn lifetime_ns(&self, lifetimes: &CtLifetimes) -> u64 {
        lifetimes.lifetime_ns(self.proto, self.state)
    }

    #[inline(always)]
    pub fn is_expired(&self, now_ns: u64, lifetimes: &CtLifetimes) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(lifetimes)
    }

    /// Key of this flow's ORIGINAL entry (client -> service).
    #[inline(always)]
    pub fn original_key(&self) -> CtKey {
        CtKey {
            src_addr: self.client_addr,
            dst_addr: self.service_addr,
            src_port: self.client_port,
            dst_port: self.service_port,
            proto: self.proto,
            direction: ct_dir::ORIGINAL,
            _pad: [0; 2],
        }
    }

    /// Key of this flow's REPLY entry: what the backend's answers look like.
    /// In a hairpin flow the client sees itself addressed by the service IP.
    #[inline(always)]
    pub fn reply_key(&self) -> CtKey {
        let dst_addr = if self.flags & ct_flags::HAIRPIN != 0 {
            self.service_addr
        } else {
            self.client_addr
        };
        CtKey {
            src_addr: self.backend_addr,
            dst_addr,
            src_port: self.backend_port,
            dst_port: self.client_port,
            proto: self.proto,
            direction: ct_dir::REPLY,
            _pad: [0; 2],
        }
    }
}

/// Key of `FRAGMENTS`: one fragmented datagram, as IPv4 tells its
/// fragments apart (RFC 791: source, destination, protocol, identification),
/// as the packets carry it (before any translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `FRAGMENTS`: the ports in the first fragment's L4 header, which
/// the later fragments lack; network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Value of `TRACE_CONFIG` (one entry, written by `dataplane-agent
/// monitor`): which packets the datapath reports on `TRACE_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceConfig {
    /// Bits of [`trace_families`]: which families' packets are traced; 0:
    /// tracing off, the datapath pays one array lookup per packet.
    pub enabled: u32,
    /// Network-order IPv4 addresses; an IPv4 packet is traced when each
    /// non-zero one is its source or destination, before or after
    /// translation.
    pub addr_a: u32,
    pub addr_b: u32,
    /// The IPv6 addresses, filtering IPv6 packets and sockets as `addr_a`
    /// and `addr_b` do IPv4 ones; all zero (`::`): no filter. After the
    /// IPv4 fields, so an IPv4 packet reads what it read before.
    pub addr6_a: Ipv6Bytes,
    pub addr6_b: Ipv6Bytes,
}

/// Bits of [`TraceConfig::enabled`]. A monitor filtering by an address of
/// one family turns the other off, so its events do not fill the ring.
pub mod trace_families {
    /// IPv4 packets and sockets ([`crate::TraceEvent`] records); 1 is what
    /// `enabled` held before IPv6 was traced.
    pub const IPV4: u32 = 1;
    /// IPv6 packets and sockets ([`crate::TraceEvent6`] records).
    pub const IPV6: u32 = 2;
}

/// Where a traced packet was seen.
pub mod trace_hook {
    /// tc ingress of a pod's host-side interface: the pod sent it.
    pub const FROM_POD: u8 = 1;
    /// tc egress of a pod's host-side interface: on its way into the pod.
    pub const TO_POD: u8 = 2;
    /// `cgroup/connect4`: a socket connecting.
    pub const SOCK_CONNECT: u8 = 3;
    /// `cgroup/sendmsg4`: a datagram sent with an address (unconnected UDP).
    pub const SOCK_SENDMSG: u8 = 4;
    /// `cgroup/recvmsg4`: a datagram read with its source address.
    pub const SOCK_RECVMSG: u8 = 5;
    /// `cgroup/getpeername4`.
    pub const SOCK_GETPEERNAME: u8 = 6;
    /// Ingress of an uplink (XDP or tc): from outside the node.
    pub const FROM_OUTSIDE: u8 = 7;
    /// tc egress of an uplink: replies of local backends leaving the node.
    pub const TO_OUTSIDE: u8 = 8;
}

/// The 4-tuple of a traced packet, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceTuple {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// One event on `TRACE_EVENTS`: what the datapath decided for a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    pub ts_ns: u64,
    /// The pod interface of a packet; 0 for socket hooks.
    pub ifindex: u32,
    /// One of [`trace_hook`].
    pub hook: u8,
    pub proto: u8,
    /// The [`Counter`] this decision counts under: the decision itself
    /// (new flow, established, reply translated, reject or drop reason).
    pub decision: u8,
    /// Always 0; the IPv6 record has its `family` (6) here, so a reader
    /// tells the two apart by this byte (and by their sizes).
    pub _pad: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub before: TraceTuple,
    pub after: TraceTuple,
    /// Socket hooks: the socket's network namespace cookie and the cgroup
    /// id of the calling process; 0 for packets.
    pub netns_cookie: u64,
    pub cgroup_id: u64,
}

/// Indices of the per-CPU `COUNTERS` array: what the datapath did and every
/// reason it dropped or rejected a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A new flow to a service got a backend.
    NewFlow = 0,
    /// A packet followed an existing conntrack entry.
    Established = 1,
    /// A reply was translated back to the service address.
    ReplyTranslated = 2,
    /// New connection to a service without endpoints: rejected.
    RejectNoEndpoints = 3,
    /// TCP packet of a flow whose backend was removed: reset sent.
    ResetBackendGone = 4,
    /// UDP flow whose backend was removed: moved to a live backend.
    UdpFlowMoved = 5,
    /// Packet to a service IP that could not be parsed safely (truncated
    /// header, fragment, IP options where not supported): left untouched.
    Malformed = 6,
    /// Packet to a service IP on a port/protocol that is not a service.
    UnknownPort = 7,
    /// A checksum or store helper failed while rewriting: dropped.
    RewriteFailed = 8,
    /// Conntrack insert failed (map full beyond LRU eviction): dropped.
    CtInsertFailed = 9,
    /// New connection to an `internalTrafficPolicy: Local` service with no
    /// endpoint on this node: dropped, as kube-proxy does.
    DropNoLocalEndpoints = 10,
    /// A new connection followed the client's ClientIP session affinity.
    AffinityHit = 11,
    /// An ICMP error about a translated flow was made about the service.
    IcmpErrorTranslated = 12,
    /// The TCP RST or ICMP unreachable answering a refused connection could
    /// not be built: the packet was dropped instead.
    RejectFailed = 13,
    /// A trace event was lost (ring buffer full); the packet was not.
    TraceLost = 14,
    /// New connection whose reply tuple (backend, client address and port)
    /// a live flow already has, e.g. the same client port through two
    /// services to one backend: dropped, the other flow keeps its replies.
    ReplyTupleClash = 15,
    /// A later fragment of a translated datagram was translated as its
    /// first fragment was.
    FragmentTranslated = 16,
    /// A later fragment to a service whose first fragment was not seen (or
    /// not tracked): dropped, it could not reach the right backend.
    FragmentUnknown = 17,
    /// A socket's connect() to a service went to a backend (socket LB).
    SockConnectTranslated = 18,
    /// An unconnected UDP datagram to a service went to a backend.
    SockSendmsgTranslated = 19,
    /// A datagram from a backend was shown to recvmsg() as from the service.
    SockRecvmsgTranslated = 20,
    /// getpeername() of a translated socket showed the service address.
    SockGetpeernameTranslated = 21,
    /// connect() or sendmsg() to a service without endpoints failed with
    /// ECONNREFUSED.
    SockRefusedNoEndpoints = 22,
    /// connect() or sendmsg() to an `internalTrafficPolicy: Local` service
    /// without endpoints on this node: left untranslated, to be dropped on
    /// the packet path as kube-proxy drops it.
    SockNoLocalEndpoints = 23,
    /// The reverse entry of a translated socket could not be stored
    /// (`SOCK_REVNAT` insert failed): its replies keep the backend address.
    SockRevNatFailed = 24,
    /// New external connection to a remote backend with every SNAT port
    /// in use (or no SNAT address): refused, never given a colliding tuple.
    NatPortsExhausted = 25,
    /// New connection to a load-balancer IP from outside its
    /// `loadBalancerSourceRanges`: dropped.
    DropSourceRange = 26,
    /// A packet was sent on by FIB lookup and redirect: an external one, or
    /// (`--direct-redirect`) a pod's translated one, to its backend.
    Redirected = 27,
    /// No route or no usable next hop for a translated external packet:
    /// dropped (a node-addressed packet cannot go through the stack).
    FibLookupFailed = 28,
    /// An IPv6 packet with more extension headers than the datapath walks
    /// (towards a service IP): passed untouched, never rewritten.
    Ipv6ExtHeadersPastBound = 29,
}

impl Counter {
    pub const COUNT: u32 = 30;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::NewFlow,
        Counter::Established,
        Counter::ReplyTranslated,
        Counter::RejectNoEndpoints,
        Counter::ResetBackendGone,
        Counter::UdpFlowMoved,
        Counter::Malformed,
        Counter::UnknownPort,
        Counter::RewriteFailed,
        Counter::CtInsertFailed,
        Counter::DropNoLocalEndpoints,
        Counter::AffinityHit,
        Counter::IcmpErrorTranslated,
        Counter::RejectFailed,
        Counter::TraceLost,
        Counter::ReplyTupleClash,
        Counter::FragmentTranslated,
        Counter::FragmentUnknown,
        Counter::SockConnectTranslated,
        Counter::SockSendmsgTranslated,
        Counter::SockRecvmsgTranslated,
        Counter::SockGetpeernameTranslated,
        Counter::SockRefusedNoEndpoints,
        Counter::SockNoLocalEndpoints,
        Counter::SockRevNatFailed,
        Counter::NatPortsExhausted,
        Counter::DropSourceRange,
        Counter::Redirected,
        Counter::FibLookupFailed,
        Counter::Ipv6ExtHeadersPastBound,
    ];

    pub fn from_index(index: u32) -> Option<Counter> {
        Counter::ALL.get(index as usize).copied()
    }

    /// Stable snake_case name used in metrics and `inspect`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlow => "new_flow",
            Counter::Established => "established",
            Counter::ReplyTranslated => "reply_translated",
            Counter::RejectNoEndpoints => "reject_no_endpoints",
            Counter::ResetBackendGone => "reset_backend_gone",
            Counter::UdpFlowMoved => "udp_flow_moved",
            Counter::Malformed => "malformed",
            Counter::UnknownPort => "unknown_port",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::CtInsertFailed => "ct_insert_failed",
            Counter::DropNoLocalEndpoints => "drop_no_local_endpoints",
            Counter::AffinityHit => "affinity_hit",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::RejectFailed => "reject_failed",
            Counter::TraceLost => "trace_lost",
            Counter::ReplyTupleClash => "reply_tuple_clash",
            Counter::FragmentTranslated => "fragment_translated",
            Counter::FragmentUnknown => "fragment_unknown",
            Counter::SockConnectTranslated => "sock_connect_translated",
            Counter::SockSendmsgTranslated => "sock_sendmsg_translated",
            Counter::SockRecvmsgTranslated => "sock_recvmsg_translated",
            Counter::SockGetpeernameTranslated => "sock_getpeername_translated",
            Counter::SockRefusedNoEndpoints => "sock_refused_no_endpoints",
            Counter::SockNoLocalEndpoints => "sock_no_local_endpoints",
            Counter::SockRevNatFailed => "sock_revnat_failed",
            Counter::NatPortsExhausted => "nat_ports_exhausted",
            Counter::DropSourceRange => "drop_source_range",
            Counter::Redirected => "redirected",
            Counter::FibLookupFailed => "fib_lookup_failed",
            Counter::Ipv6ExtHeadersPastBound => "ipv6_ext_headers_past_bound",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)], bytemuck::Pod (no padding holes, any
    // bit pattern valid), which is exactly what aya::Pod requires.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReplySource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceLabel {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TraceConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtLifetimes {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NatConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRangeKey {}
}

/// Network-order u32 of an IPv4 address, as stored in maps.
pub fn ipv4_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Octets of a map-stored (network-order) IPv4 address.
pub fn ipv4_from_map(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// Network-order port as stored in maps.
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// Host-order port from a map-stored port.
pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // bytemuck's derive already refuses padding; these pin the sizes the
        // eBPF side was verified with.
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 48);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<TraceEvent>(), 64);
        assert_eq!(size_of::<CtLifetimes>(), 24);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragPorts>(), 4);
        assert_eq!(size_of::<SockRevNatKey>(), 16);
        assert_eq!(size_of::<SockRevNatEntry>(), 12);
        assert_eq!(size_of::<NatKey>(), 16);
        assert_eq!(size_of::<NatEntry>(), 64);
        assert_eq!(size_of::<HopCache>(), 20);
        assert_eq!(size_of::<NatConfig>(), 8);
        assert_eq!(size_of::<SourceRangeKey>(), 12);
    }

    #[test]
    fn every_pinned_map_has_its_layout_in_name_order() {
        for (layout, name) in map_layouts::ALL.iter().zip(map_names::ALL) {
            assert_eq!(layout.name, name);
        }
        for ct in &map_layouts::ALL[4..6] {
            assert_eq!((ct.key_size, ct.value_size), (16, 48));
        }
    }

    #[test]
    fn counters_are_listed_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
            assert_eq!(Counter::from_index(i as u32), Some(*c));
        }
        assert_eq!(Counter::from_index(Counter::COUNT), None);
    }

    #[test]
    fn tcp_lifetime_follows_state() {
        let l = CtLifetimes::default();
        let mut e = CtEntry {
            proto: IPPROTO_TCP,
            last_seen_ns: 0,
            ..Default::default()
        };
        assert!(!e.is_expired(59 * 1_000_000_000, &l));
        assert!(e.is_expired(61 * 1_000_000_000, &l));
        e.state = ct_state::ESTABLISHED;
        assert!(!e.is_expired(3600 * 1_000_000_000, &l));
        e.state = ct_state::CLOSING;
        assert!(e.is_expired(11 * 1_000_000_000, &l));
    }

    #[test]
    fn udp_lifetime_is_longer_once_replied() {
        let l = CtLifetimes {
            udp_s: 30,
            udp_stream_s: 120,
            ..CtLifetimes::default()
        };
        let mut e = CtEntry {
            proto: IPPROTO_UDP,
            ..Default::default()
        };
        assert!(e.is_expired(31 * 1_000_000_000, &l));
        e.state = ct_state::ESTABLISHED;
        assert!(!e.is_expired(119 * 1_000_000_000, &l));
        assert!(e.is_expired(121 * 1_000_000_000, &l));
    }

    #[test]
    fn service_label_round_trips_and_truncates_on_char_boundary() {
        assert_eq!(
            ServiceLabel::new("default/web:http").as_str(),
            "default/web:http"
        );
        let long = "é".repeat(100);
        let label = ServiceLabel::new(&long);
        assert_eq!(label.as_str().len(), 126);
    }

    #[test]
    fn byte_order_helpers_round_trip() {
        let a = ipv4_to_map([10, 96, 0, 10]);
        assert_eq!(ipv4_from_map(a), [10, 96, 0, 10]);
        assert_eq!(a.to_ne_bytes()[0], 10);
        assert_eq!(port_from_map(port_to_map(8080)), 8080);
        assert_eq!(port_to_map(80).to_ne_bytes(), [0, 80]);
    }
}
