//! The sync engine: the one place where the internal model of services and
//! endpoints becomes map writes. It keeps what it programmed in memory, diffs
//! each service's desired frontends against it and writes only the
//! difference, in an order that never shows the datapath a service without
//! backends it still has.

use std::{borrow::Borrow, collections::BTreeSet};

// SipHash's resistance to chosen keys is not needed here (keys come from the
// cluster's own objects) and is a fifth of a 10 000-service full sync.
use foldhash::{HashMap, HashMapExt as _, HashSet};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dataplane_common::{
    backend_flags, capacity, ipv4_to_map, map_names, port_to_map, reply_source_flags,
    service_flags, service_ip_flags, service_scope, Backend, Backend6, Ipv6Bytes, ReplySource,
    ReplySource6, Service6Key, ServiceKey, ServiceValue, SourceRange6Key, SourceRangeKey,
    IPPROTO_TCP, IPPROTO_UDP,
};
use log::{debug, info};

use crate::{
    control::{
        family_map::{Family, FamilyMap},
        model::{
            BackendAddr, Frontend, FrontendSpec, IpFamily, Ipv4Prefix, Protocol, Scope, ServiceName,
        },
    },
    node::{
        lb_maps::{LbMapError, LbMaps, LbSnapshot, LbWrites},
        pinned,
    },
};

/// How many entries each map holds, against its capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub service_ips: usize,
    pub services: usize,
    pub backend_slots: usize,
    pub backends: usize,
    pub service_names: usize,
    /// From the last conntrack sweep (both entries of each flow).
    pub conntrack: CtOccupancy,
    /// Socket-level reverse entries, counted with the conntrack sweep.
    pub sock_revnat: usize,
    pub service_ips6: usize,
    pub services6: usize,
    pub backends6: usize,
}

/// Entries and capacity (as sized at load) of the two conntrack maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtOccupancy {
    pub tcp: usize,
    pub other: usize,
    /// `CT6_TCP` and `CT6_OTHER`, sized as their IPv4 counterparts.
    pub tcp6: usize,
    pub other6: usize,
    pub tcp_capacity: u32,
    pub other_capacity: u32,
}

impl Occupancy {
    /// Each map's name, entries and capacity.
    pub fn rows(&self) -> [(&'static str, usize, u32); 13] {
        [
            (
                map_names::SERVICE_IPS,
                self.service_ips,
                capacity::SERVICE_IPS,
            ),
            (map_names::SERVICES, self.services, capacity::SERVICES),
            (
                map_names::BACKEND_SLOTS,
                self.backend_slots,
                capacity::BACKEND_SLOTS,
            ),
            (map_names::BACKENDS, self.backends, capacity::BACKENDS),
            (
                map_names::SERVICE_NAMES,
                self.service_names,
                capacity::SERVICES,
            ),
            (
                map_names::CT_TCP,
                self.conntrack.tcp,
                self.conntrack.tcp_capacity,
            ),
            (
                map_names::CT_OTHER,
                self.conntrack.other,
                self.conntrack.other_capacity,
            ),
            (
                map_names::SOCK_REVNAT,
                self.sock_revnat,
                capacity::SOCK_REVNAT,
            ),
            (
                map_names::LB6_SERVICE_IPS,
                self.service_ips6,
                capacity::SERVICE_IPS,
            ),
            (map_names::LB6_SERVICES, self.services6, capacity::SERVICES),
            (
                map_names::LB6_BACKENDS,
                self.backends6,
                capacity::LB6_BACKENDS,
            ),
            (
                map_names::CT6_TCP,
                self.conntrack.tcp6,
                self.conntrack.tcp_capacity,
            ),
            (
                map_names::CT6_OTHER,
                self.conntrack.other6,
                self.conntrack.other_capacity,
            ),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("service {service} {frontend}: {count} endpoints, more than the {max} one service port may have")]
    TooManyBackends {
        service: ServiceName,
        frontend: Frontend,
        count: usize,
        max: u32,
    },
    #[error("service {service} {frontend}: already served by service {owner}")]
    FrontendConflict {
        service: ServiceName,
        frontend: Frontend,
        owner: ServiceName,
    },
    #[error("service {service}: map {map} would hold {needed} entries, more than its capacity {capacity}")]
    CapacityExceeded {
        service: ServiceName,
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("service {service}: writing the maps failed")]
    Map {
        service: ServiceName,
        #[source]
        source: LbMapError,
    },
    #[error(
        "service {service} {frontend}: backend {backend} is not of the frontend's address family"
    )]
    FamilyMismatch {
        service: ServiceName,
        frontend: Frontend,
        backend: BackendAddr,
    },
    #[error("reading the maps back failed")]
    Snapshot(#[source] LbMapError),
    #[error("writing the maps failed")]
    Write(#[source] LbMapError),
}

impl SyncError {
    /// The service the error is about (none when the maps could not be
    /// read back, or a whole batch of services failed to be written).
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            SyncError::TooManyBackends { service, .. }
            | SyncError::FrontendConflict { service, .. }
            | SyncError::CapacityExceeded { service, .. }
            | SyncError::FamilyMismatch { service, .. }
            | SyncError::Map { service, .. } => Some(service),
            SyncError::Snapshot(_) | SyncError::Write(_) => None,
        }
    }

    /// Short cause label, for metrics and logs.
    pub fn cause(&self) -> &'static str {
        match self {
            SyncError::TooManyBackends { .. } => "too_many_backends",
            SyncError::FrontendConflict { .. } => "frontend_conflict",
            SyncError::CapacityExceeded { .. } => "capacity",
            SyncError::FamilyMismatch { .. } => "invalid_object",
            SyncError::Map { .. } | SyncError::Snapshot(_) | SyncError::Write(_) => "map_write",
        }
    }
}

/// A frontend's key in its family's services map (`SERVICES` or
/// `LB6_SERVICES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(ServiceKey),
    V6(Service6Key),
}

/// A backend as its family's backends map holds it (`BACKENDS` or
/// `LB6_BACKENDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendKey {
    V4(Backend),
    V6(Backend6),
}

impl BackendKey {
    pub fn family(&self) -> IpFamily {
        match self {
            BackendKey::V4(_) => IpFamily::Ipv4,
            BackendKey::V6(_) => IpFamily::Ipv6,
        }
    }
}

/// A service IP, keyed as its family's service-IP map keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum IpKey {
    V4(u32),
    V6(Ipv6Bytes),
}

impl Family for IpKey {
    fn family(&self) -> IpFamily {
        match self {
            IpKey::V4(_) => IpFamily::Ipv4,
            IpKey::V6(_) => IpFamily::Ipv6,
        }
    }
}

/// A backend's reply source, keyed as its family's map keys it
/// (`REPLY_SOURCES` or `LB6_REPLY_SOURCES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ReplySourceKey {
    V4(ReplySource),
    V6(ReplySource6),
}

impl ReplySourceKey {
    fn of(backend: &BackendKey) -> Self {
        match backend {
            BackendKey::V4(b) => ReplySourceKey::V4(ReplySource::of(b)),
            BackendKey::V6(b) => ReplySourceKey::V6(ReplySource6::of(b)),
        }
    }

    /// The entry of the backend's address as a whole, with the "no flows
    /// yet" bits of all its ports.
    fn address_of(backend: &BackendKey) -> Self {
        match backend {
            BackendKey::V4(b) => ReplySourceKey::V4(ReplySource::address(b.addr)),
            BackendKey::V6(b) => ReplySourceKey::V6(ReplySource6::address(b.addr)),
        }
    }

    fn is_address(&self) -> bool {
        match self {
            ReplySourceKey::V4(k) => *k == ReplySource::address(k.addr),
            ReplySourceKey::V6(k) => *k == ReplySource6::address(k.addr),
        }
    }
}

/// `value`: a [`reply_source_flags`] value, the same for both families.
fn set_reply_source(w: &mut LbWrites, key: ReplySourceKey, value: u32) {
    match key {
        ReplySourceKey::V4(k) => w.set_reply_source(k, value),
        ReplySourceKey::V6(k) => w.set_reply_source6(k, value),
    }
}

fn remove_reply_source(w: &mut LbWrites, key: ReplySourceKey) {
    match key {
        ReplySourceKey::V4(k) => w.remove_reply_source(k),
        ReplySourceKey::V6(k) => w.remove_reply_source6(k),
    }
}

impl Family for BackendKey {
    fn family(&self) -> IpFamily {
        BackendKey::family(self)
    }
}

impl FrontendKey {
    pub fn family(&self) -> IpFamily {
        match self {
            FrontendKey::V4(_) => IpFamily::Ipv4,
            FrontendKey::V6(_) => IpFamily::Ipv6,
        }
    }

    /// Its service IP; none for a NodePort (address 0).
    fn ip(&self) -> Option<IpKey> {
        match self {
            FrontendKey::V4(k) => (k.addr != 0).then_some(IpKey::V4(k.addr)),
            FrontendKey::V6(k) => (k.addr != [0; 16]).then_some(IpKey::V6(k.addr)),
        }
    }
}

/// Each family's backends by id. Ids are dense (they index `BACKENDS` and
/// `LB6_BACKENDS`), so a vector each holds them in less than a hash map
/// (at 100 000 backends, 1.5 MiB rather than 4.3).
#[derive(Debug, Default)]
struct BackendsById {
    v4: Vec<Option<Backend>>,
    v6: Vec<Option<Backend6>>,
}

impl BackendsById {
    fn get(&self, family: IpFamily, id: u32) -> Option<BackendKey> {
        let id = id as usize;
        match family {
            IpFamily::Ipv4 => self.v4.get(id).copied().flatten().map(BackendKey::V4),
            IpFamily::Ipv6 => self.v6.get(id).copied().flatten().map(BackendKey::V6),
        }
    }

    fn contains(&self, family: IpFamily, id: u32) -> bool {
        self.get(family, id).is_some()
    }

    fn insert(&mut self, id: u32, backend: BackendKey) {
        fn put<T>(list: &mut Vec<Option<T>>, id: usize, value: T) {
            if list.len() <= id {
                list.resize_with(id + 1, || None);
            }
            list[id] = Some(value);
        }
        match backend {
            BackendKey::V4(b) => put(&mut self.v4, id as usize, b),
            BackendKey::V6(b) => put(&mut self.v6, id as usize, b),
        }
    }

    fn remove(&mut self, family: IpFamily, id: u32) {
        let id = id as usize;
        match family {
            IpFamily::Ipv4 => {
                if let Some(slot) = self.v4.get_mut(id) {
                    *slot = None;
                }
            }
            IpFamily::Ipv6 => {
                if let Some(slot) = self.v6.get_mut(id) {
                    *slot = None;
                }
            }
        }
    }

    fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }

    /// The ids in use of one family.
    fn ids(&self, family: IpFamily) -> Vec<u32> {
        let used = |(id, b): (usize, bool)| b.then_some(id as u32);
        match family {
            IpFamily::Ipv4 => self
                .v4
                .iter()
                .map(Option::is_some)
                .enumerate()
                .filter_map(used)
                .collect(),
            IpFamily::Ipv6 => self
                .v6
                .iter()
                .map(Option::is_some)
                .enumerate()
                .filter_map(used)
                .collect(),
        }
    }

    /// Every backend of both families.
    fn all(&self) -> impl Iterator<Item = BackendKey> + '_ {
        let v4 = self.v4.iter().flatten().map(|b| BackendKey::V4(*b));
        v4.chain(self.v6.iter().flatten().map(|b| BackendKey::V6(*b)))
    }
}

/// What one frontend looks like in the maps.
#[derive(Debug, Clone)]
struct Programmed {
    /// None for frontends adopted from a previous agent and not yet claimed.
    owner: Option<ServiceName>,
    value: ServiceValue,
    /// Backend id per slot (in the frontend's family's id space).
    slots: Vec<u32>,
    /// Backends of endpoints that are terminating (or not ready) but still
    /// listed: in `BACKENDS`, so established flows keep their backend, but
    /// in no slot, so no new flow picks them.
    draining: Vec<u32>,
    /// Its `SOURCE_RANGES` and `SOURCE_RANGES6` entries.
    source_ranges: BTreeSet<RangeKey>,
}

/// A `loadBalancerSourceRanges` entry, in its family's trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RangeKey {
    V4(SourceRangeKey),
    V6(SourceRange6Key),
}

impl RangeKey {
    fn service_id(&self) -> u32 {
        u32::from_be(match self {
            RangeKey::V4(k) => k.service_id_be,
            RangeKey::V6(k) => k.service_id_be,
        })
    }
}

fn set_source_range(w: &mut LbWrites, key: RangeKey) {
    match key {
        RangeKey::V4(k) => w.set_source_range(k),
        RangeKey::V6(k) => w.set_source_range6(k),
    }
}

fn remove_source_range(w: &mut LbWrites, key: RangeKey) {
    match key {
        RangeKey::V4(k) => w.remove_source_range(k),
        RangeKey::V6(k) => w.remove_source_range6(k),
    }
}

/// The trie entries of a frontend's source ranges, both families.
fn source_range_keys(service_id: u32, spec: &FrontendSpec) -> BTreeSet<RangeKey> {
    let v4 = spec
        .source_ranges
        .iter()
        .map(|r| RangeKey::V4(source_range_key(service_id, r)));
    let v6 = spec.source_ranges6.iter().map(|r| {
        RangeKey::V6(SourceRange6Key {
            prefix_len: 32 + u32::from(r.len),
            service_id_be: service_id.to_be(),
            addr: r.addr.octets(),
        })
    });
    v4.chain(v6).collect()
}

#[derive(Debug, Clone, Copy)]
struct BackendRef {
    id: u32,
    refs: u32,
}

/// Ids from 1 up, reusing released ones, so they stay dense: backend ids
/// index the `BACKENDS` array. An id released while writes are pending is
/// reused only after they are applied ([`IdAllocator::settle`]): the
/// pending writes may still delete its old entry.
#[derive(Debug)]
struct IdAllocator {
    next: u32,
    /// Ids below this one only.
    limit: u32,
    free: Vec<u32>,
    released: Vec<u32>,
}

impl IdAllocator {
    fn from_used(used: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |max| max + 1);
        // Lowest ids last, so they are reused first.
        let free = (1..next).rev().filter(|id| !used.contains(id)).collect();
        Self {
            next,
            limit,
            free,
            released: Vec::new(),
        }
    }
    /// How many ids `allocate` can still hand out before a `settle`.
    fn available(&self) -> usize {
        self.free.len() + self.limit.saturating_sub(self.next) as usize
    }
    fn allocate(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            let id = self.next;
            self.next += 1;
            id
        })
    }
    fn release(&mut self, id: u32) {
        self.released.push(id);
    }
    /// The pending writes are applied: released ids are free again.
    fn settle(&mut self) {
        self.free.append(&mut self.released);
    }
}

/// The blocks of `BACKEND_SLOTS` frontends own: a buddy allocator over the
/// array, each block 2^order slots at a multiple of its size. A frontend
/// with n backends owns a block of order [`slot_order`]`(n)`; one whose
/// count crosses a power of two moves to a new block. A released block is
/// reused only after the pending writes are applied, like released ids.
#[derive(Debug)]
struct SlotBlocks {
    /// `free[k]`: the bases of the free blocks of 2^k slots.
    free: Vec<BTreeSet<u32>>,
    released: Vec<(u32, u8)>,
}

/// The order of the block for `count` slots; None for no slots.
fn slot_order(count: usize) -> Option<u8> {
    (count > 0).then(|| count.next_power_of_two().trailing_zeros() as u8)
}

impl SlotBlocks {
    /// All of `BACKEND_SLOTS` free.
    fn new() -> Self {
        let top = capacity::BACKEND_SLOTS.trailing_zeros() as usize;
        let mut free = vec![BTreeSet::new(); top + 1];
        free[top].insert(0);
        Self {
            free,
            released: Vec::new(),
        }
    }

    fn allocate(&mut self, order: u8) -> Option<u32> {
        let order = usize::from(order);
        let mut k = (order..self.free.len()).find(|k| !self.free[*k].is_empty())?;
        let base = self.free[k].pop_first()?;
        // Split: the upper halves stay free.
        while k > order {
            k -= 1;
            self.free[k].insert(base + (1 << k));
        }
        Some(base)
    }

    /// Whether blocks of these orders, allocated in this order, all fit.
    fn fits(&self, orders: &[u8]) -> bool {
        let mut counts: Vec<usize> = self.free.iter().map(BTreeSet::len).collect();
        orders.iter().all(|&order| {
            let order = usize::from(order);
            let Some(k) = (order..counts.len()).find(|k| counts[*k] > 0) else {
                return false;
            };
            counts[k] -= 1;
            for c in &mut counts[order..k] {
                *c += 1;
            }
            true
        })
    }

    /// Takes the block at `base` of `order` out of the free blocks (a
    /// previous agent's, adopted); false if it is not wholly free.
    fn reserve(&mut self, base: u32, order: u8) -> bool {
        let order = usize::from(order);
        if order >= self.free.len() || !base.is_multiple_of(1 << order) {
            return false;
        }
        let Some(mut k) =
            (order..self.free.len()).find(|k| self.free[*k].contains(&(base & !((1u32 << k) - 1))))
        else {
            return false;
        };
        let mut parent = base & !((1u32 << k) - 1);
        self.free[k].remove(&parent);
        while k > order {
            k -= 1;
            let upper = parent + (1 << k);
            if base >= upper {
                self.free[k].insert(parent);
                parent = upper;
            } else {
                self.free[k].insert(upper);
            }
        }
        true
    }

    fn release(&mut self, base: u32, order: u8) {
        self.released.push((base, order));
    }

    /// The pending writes are applied: released blocks are free again,
    /// merged with their free buddies.
    fn settle(&mut self) {
        for (mut base, order) in std::mem::take(&mut self.released) {
            let mut k = usize::from(order);
            while k + 1 < self.free.len() && self.free[k].remove(&(base ^ (1 << k))) {
                base &= !(1 << k);
                k += 1;
            }
            self.free[k].insert(base);
        }
    }
}

/// Counts of what one sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends_changed: usize,
    pub frontends_removed: usize,
}

/// Services whose writes a full sync collects before it applies them: few
/// enough syscalls (a batch per map each time), and buffers that stay small
/// (at 10 000 services of 10 endpoints, all writes at once took 13 MiB
/// more at the agent's peak).
pub const FULL_SYNC_BATCH_SERVICES: usize = 1024;

pub struct SyncEngine<M: LbMaps> {
    maps: M,
    /// Writes worked out but not yet applied ([`SyncEngine::flush`]).
    pending: LbWrites,
    frontends: HashMap<FrontendKey, Programmed>,
    /// Each service's frontends, sorted: most services have one or two,
    /// and a `BTreeSet`'s smallest node holds eleven.
    owned: HashMap<ServiceName, Vec<FrontendKey>>,
    backends: FamilyMap<BackendKey, BackendRef>,
    backend_by_id: BackendsById,
    /// Backend ids per `REPLY_SOURCES` (`LB6_REPLY_SOURCES`) key (an
    /// endpoint may have two ids for a moment, e.g. while its flags change;
    /// an address's entry counts all the ids at the address).
    reply_sources: HashMap<ReplySourceKey, u32>,
    /// Conntrack may hold flows from before this engine started (a restart
    /// or an upgrade), to backends it is about to add: until its first
    /// full sync is written, the `REPLY_SOURCES` entries it adds say so
    /// ([`set_flows_carried`](Self::set_flows_carried)). IPv4, IPv6.
    flows_carried: (bool, bool),
    /// In [`sync_all`](Self::sync_all): frontends are logged at debug.
    in_full_sync: bool,
    /// Frontends per service IP (NodePorts, address 0, are not counted).
    service_ips: FamilyMap<IpKey, u32>,
    /// This node's addresses, flagged in `SERVICE_IPS` (`LB6_SERVICE_IPS`)
    /// so NodePorts match on them.
    node_addrs: BTreeSet<IpKey>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// `LB6_BACKENDS` ids: a dense space of their own.
    backend6_ids: IdAllocator,
    slot_blocks: SlotBlocks,
    slot_count: usize,
    /// Backends found in the maps without a slot (draining for a previous
    /// agent, or left by a write that failed): kept until the next full
    /// sync has claimed what is still draining, then released.
    adopted_draining: Vec<BackendKey>,
    /// A write failed part way: memory may not match the maps. The next sync
    /// first reads the maps back.
    diverged: bool,
    /// Backends of either family removed from the maps since
    /// [`SyncEngine::take_removed`]: sockets still aimed at them are closed
    /// by the caller.
    removed: Vec<BackendKey>,
}

pub fn service_key(frontend: &Frontend) -> FrontendKey {
    let port = port_to_map(frontend.port);
    let proto = proto_number(frontend.proto);
    let scope = match frontend.scope {
        Scope::Internal => service_scope::INTERNAL,
        Scope::External => service_scope::EXTERNAL,
    };
    match frontend.ip {
        IpAddr::V4(ip) => FrontendKey::V4(ServiceKey {
            addr: ipv4_to_map(ip.octets()),
            port,
            proto,
            scope,
        }),
        IpAddr::V6(ip) => FrontendKey::V6(Service6Key {
            addr: ip.octets(),
            port,
            proto,
            scope,
        }),
    }
}

/// The `SERVICE_IPS` value of an address: its frontend count, and the
/// node-address bit.
fn service_ip_value(count: u32, node_address: bool) -> u32 {
    if node_address {
        count | service_ip_flags::NODE_ADDRESS
    } else {
        count
    }
}

/// `SOURCE_RANGES` key of one prefix of a service's frontend.
fn source_range_key(service_id: u32, prefix: &Ipv4Prefix) -> SourceRangeKey {
    SourceRangeKey {
        prefix_len: 32 + u32::from(prefix.len),
        service_id_be: service_id.to_be(),
        addr: ipv4_to_map(prefix.addr.octets()),
    }
}

fn proto_number(proto: Protocol) -> u8 {
    match proto {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

fn backends_of(frontend: &Frontend, spec: &FrontendSpec) -> Vec<BackendKey> {
    to_backends(frontend, spec, &spec.backends)
}

fn draining_of(frontend: &Frontend, spec: &FrontendSpec) -> Vec<BackendKey> {
    to_backends(frontend, spec, &spec.draining)
}

/// The backends as the maps hold them; each in its own family (`check`
/// refuses a frontend with backends of the other).
fn to_backends(frontend: &Frontend, spec: &FrontendSpec, addrs: &[BackendAddr]) -> Vec<BackendKey> {
    addrs
        .iter()
        .map(|b| {
            let port = port_to_map(b.port);
            let proto = proto_number(frontend.proto);
            let flags = if spec.local_ips.binary_search(&b.ip).is_ok() {
                backend_flags::LOCAL
            } else {
                0
            };
            match b.ip {
                IpAddr::V4(ip) => BackendKey::V4(Backend {
                    addr: ipv4_to_map(ip.octets()),
                    port,
                    proto,
                    flags,
                }),
                IpAddr::V6(ip) => BackendKey::V6(Backend6 {
                    addr: ip.octets(),
                    port,
                    proto,
                    flags,
                }),
            }
        })
        .collect()
}

fn set_service(w: &mut LbWrites, key: FrontendKey, value: ServiceValue) {
    match key {
        FrontendKey::V4(k) => w.set_service(k, value),
        FrontendKey::V6(k) => w.set_service6(k, value),
    }
}

fn remove_service(w: &mut LbWrites, key: FrontendKey) {
    match key {
        FrontendKey::V4(k) => w.remove_service(k),
        FrontendKey::V6(k) => w.remove_service6(k),
    }
}

fn set_service_ip(w: &mut LbWrites, ip: IpKey, value: u32) {
    match ip {
        IpKey::V4(a) => w.set_service_ip(a, value),
        IpKey::V6(a) => w.set_service_ip6(a, value),
    }
}

fn remove_service_ip(w: &mut LbWrites, ip: IpKey) {
    match ip {
        IpKey::V4(a) => w.remove_service_ip(a),
        IpKey::V6(a) => w.remove_service_ip6(a),
    }
}

fn flags_of(frontend: &Frontend, spec: &FrontendSpec) -> u32 {
    let mut flags = 0;
    if spec.drop_without_local_endpoints {
        flags |= service_flags::DROP_NO_LOCAL_ENDPOINTS;
    }
    if frontend.scope == Scope::External && spec.masquerade_remote {
        flags |= service_flags::MASQUERADE_REMOTE;
    }
    // Any prefix restricts the frontend: a client of the other family is
    // admitted only by prefixes of its own (none: dropped).
    if frontend.scope == Scope::External
        && (!spec.source_ranges.is_empty() || !spec.source_ranges6.is_empty())
    {
        flags |= service_flags::SOURCE_RANGES;
    }
    flags
}

/// New slot layout: backends that stay keep their slot, so a change of one
/// endpoint rewrites one slot, not the whole service.
fn plan_slots(old: &[BackendKey], new: &[BackendKey]) -> Vec<BackendKey> {
    let wanted: BTreeSet<BackendKey> = new.iter().copied().collect();
    let mut layout: Vec<Option<BackendKey>> = vec![None; new.len()];
    let mut placed = BTreeSet::new();
    for (slot, backend) in old.iter().enumerate().take(new.len()) {
        if wanted.contains(backend) && placed.insert(*backend) {
            layout[slot] = Some(*backend);
        }
    }
    // Newcomers, and survivors whose slot is past the new end, fill the holes.
    let mut rest = new.iter().filter(|b| !placed.contains(*b)).copied();
    layout
        .into_iter()
        .map(|slot| slot.or_else(|| rest.next()).expect("one backend per hole"))
        .collect()
}

impl<M: LbMaps> SyncEngine<M> {
    /// Takes over whatever the maps already hold (a previous agent's work), so
    /// that the first sync only writes the difference.
    pub fn adopt(maps: M) -> Result<Self, SyncError> {
        let mut engine = Self {
            maps,
            pending: LbWrites::default(),
            frontends: HashMap::new(),
            owned: HashMap::new(),
            backends: FamilyMap::new(),
            backend_by_id: BackendsById::default(),
            reply_sources: HashMap::new(),
            flows_carried: (false, false),
            in_full_sync: false,
            service_ips: FamilyMap::new(),
            node_addrs: BTreeSet::new(),
            service_ids: IdAllocator::from_used([], u32::MAX),
            backend_ids: IdAllocator::from_used([], capacity::BACKENDS),
            backend6_ids: IdAllocator::from_used([], capacity::LB6_BACKENDS),
            slot_blocks: SlotBlocks::new(),
            slot_count: 0,
            adopted_draining: Vec::new(),
            diverged: false,
            removed: Vec::new(),
        };
        engine.reload()?;
        Ok(engine)
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Whether conntrack holds flows from before this engine's start: the
    /// backends its first full sync adds may have flows, so their
    /// `REPLY_SOURCES` entries go without the "no flows yet" bits
    /// (`reply_source_flags`), and their replies are looked up as before.
    pub fn set_flows_carried(&mut self, carried: bool) {
        self.flows_carried.0 = carried;
    }

    /// [`set_flows_carried`](Self::set_flows_carried) for the IPv6 backends
    /// (`LB6_REPLY_SOURCES`): true also while programs that do not clear
    /// the bits may still make flows (see `run`).
    pub fn set_flows_carried6(&mut self, carried: bool) {
        self.flows_carried.1 = carried;
    }

    /// Backends that left the maps (no service uses them any more) since the
    /// last call.
    pub fn take_removed(&mut self) -> Vec<BackendKey> {
        std::mem::take(&mut self.removed)
    }

    /// Applies the pending writes. On a failure memory may no longer match
    /// the maps: the next sync re-reads them.
    fn flush(&mut self) -> Result<(), LbMapError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.pending);
        if let Err(e) = self.maps.write(&writes) {
            self.diverged = true;
            return Err(e);
        }
        self.service_ids.settle();
        self.backend_ids.settle();
        self.backend6_ids.settle();
        self.slot_blocks.settle();
        Ok(())
    }

    fn reload(&mut self) -> Result<(), SyncError> {
        self.pending = LbWrites::default();
        let LbSnapshot {
            service_ips,
            services,
            slots,
            backends,
            names,
            source_ranges,
            source_ranges6,
            reply_sources,
            reply_sources6,
            service_ips6,
            services6,
            backends6,
        } = self.maps.snapshot().map_err(SyncError::Snapshot)?;
        let reply_sources: BTreeSet<ReplySourceKey> = reply_sources
            .into_keys()
            .map(ReplySourceKey::V4)
            .chain(reply_sources6.into_keys().map(ReplySourceKey::V6))
            .collect();
        let mut ranges_by_id: HashMap<u32, BTreeSet<RangeKey>> = HashMap::new();
        let all_ranges = source_ranges
            .into_iter()
            .map(RangeKey::V4)
            .chain(source_ranges6.into_iter().map(RangeKey::V6));
        for key in all_ranges {
            ranges_by_id
                .entry(key.service_id())
                .or_default()
                .insert(key);
        }
        let by_id: HashMap<(IpFamily, u32), BackendKey> = backends
            .iter()
            .map(|(id, b)| ((IpFamily::Ipv4, *id), BackendKey::V4(*b)))
            .chain(
                backends6
                    .iter()
                    .map(|(id, b)| ((IpFamily::Ipv6, *id), BackendKey::V6(*b))),
            )
            .collect();
        let all_services: Vec<(FrontendKey, ServiceValue)> = services
            .iter()
            .map(|(k, v)| (FrontendKey::V4(*k), *v))
            .chain(services6.iter().map(|(k, v)| (FrontendKey::V6(*k), *v)))
            .collect();
        let owners: HashMap<FrontendKey, ServiceName> = self
            .frontends
            .iter()
            .filter_map(|(key, p)| p.owner.clone().map(|o| (*key, o)))
            .collect();
        self.frontends.clear();
        self.backends.clear();
        self.backend_by_id.clear();
        self.adopted_draining.clear();
        self.slot_blocks = SlotBlocks::new();
        self.slot_count = 0;
        let mut owned_slots = BTreeSet::new();
        for (key, value) in &all_services {
            let family = key.family();
            let ids: Vec<u32> = (0..value.backend_count)
                .filter_map(|slot| slots.get(&(value.slot_base.wrapping_add(slot))).copied())
                .collect();
            let complete = ids.len() == value.backend_count as usize
                && ids.iter().all(|id| by_id.contains_key(&(family, *id)))
                && slot_order(ids.len())
                    .is_none_or(|order| self.slot_blocks.reserve(value.slot_base, order));
            let mut value = *value;
            // An incomplete frontend is rewritten in a new block at its
            // next sync.
            let ids = if complete { ids } else { Vec::new() };
            owned_slots.extend((0..ids.len() as u32).map(|slot| value.slot_base + slot));
            value.backend_count = ids.len() as u32;
            for id in &ids {
                let backend = by_id[&(family, *id)];
                self.backends
                    .get_or_insert_with(backend, || BackendRef { id: *id, refs: 0 })
                    .refs += 1;
                self.backend_by_id.insert(*id, backend);
            }
            self.slot_count += ids.len();
            self.frontends.insert(
                *key,
                Programmed {
                    owner: owners.get(key).cloned(),
                    value,
                    slots: ids,
                    draining: Vec::new(),
                    source_ranges: ranges_by_id.remove(&value.service_id).unwrap_or_default(),
                },
            );
        }
        for key in ranges_by_id.into_values().flatten() {
            remove_source_range(&mut self.pending, key);
        }
        // Backends no slot points at may be draining established flows: the
        // next full sync claims those still listed and removes the rest.
        let mut ids: Vec<(&(IpFamily, u32), &BackendKey)> = by_id.iter().collect();
        ids.sort();
        for (&(family, id), &backend) in ids {
            if self.backend_by_id.contains(family, id) {
                continue;
            }
            if self.backends.contains_key(&backend) {
                // The same endpoint under a second id: nothing reads this one.
                match family {
                    IpFamily::Ipv4 => self.pending.remove_backend(id),
                    IpFamily::Ipv6 => self.pending.remove_backend6(id),
                }
                continue;
            }
            self.backends.insert(backend, BackendRef { id, refs: 1 });
            self.backend_by_id.insert(id, backend);
            self.adopted_draining.push(backend);
        }
        for &index in slots.keys() {
            if !owned_slots.contains(&index) {
                self.pending.remove_slot(index);
            }
        }
        // `REPLY_SOURCES` and `LB6_REPLY_SOURCES` follow the backends
        // adopted (and are filled here when an agent of an earlier layout
        // left none).
        self.reply_sources.clear();
        for backend in self.backend_by_id.all() {
            for key in [
                ReplySourceKey::of(&backend),
                ReplySourceKey::address_of(&backend),
            ] {
                *self.reply_sources.entry(key).or_insert(0) += 1;
            }
        }
        for key in self.reply_sources.keys() {
            if !reply_sources.contains(key) {
                // Adopted backends: flows to them may exist.
                let value = if key.is_address() {
                    reply_source_flags::MAY_HAVE_FLOWS
                } else {
                    reply_source_flags::PORT
                };
                set_reply_source(&mut self.pending, *key, value);
            }
        }
        for key in &reply_sources {
            if !self.reply_sources.contains_key(key) {
                remove_reply_source(&mut self.pending, *key);
            }
        }
        let service_ids: BTreeSet<u32> = all_services.iter().map(|(_, v)| v.service_id).collect();
        for id in names.keys().filter(|id| !service_ids.contains(id)) {
            self.pending.remove_service_name(*id);
        }
        let node_address = |v: &u32| *v & service_ip_flags::NODE_ADDRESS != 0;
        self.node_addrs = service_ips
            .iter()
            .filter(|(_, v)| node_address(v))
            .map(|(k, _)| IpKey::V4(*k))
            .chain(
                service_ips6
                    .iter()
                    .filter(|(_, v)| node_address(v))
                    .map(|(k, _)| IpKey::V6(*k)),
            )
            .collect();
        self.service_ips = service_ips
            .into_iter()
            .map(|(k, v)| (IpKey::V4(k), v))
            .chain(service_ips6.into_iter().map(|(k, v)| (IpKey::V6(k), v)))
            .map(|(k, v)| (k, v & service_ip_flags::COUNT_MASK))
            .filter(|(_, count)| *count > 0)
            .collect();
        self.service_ids = IdAllocator::from_used(service_ids, u32::MAX);
        let used = |family| self.backend_by_id.ids(family);
        self.backend_ids = IdAllocator::from_used(used(IpFamily::Ipv4), capacity::BACKENDS);
        self.backend6_ids = IdAllocator::from_used(used(IpFamily::Ipv6), capacity::LB6_BACKENDS);
        self.owned.retain(|_, keys| {
            keys.retain(|k| self.frontends.contains_key(k));
            !keys.is_empty()
        });
        self.diverged = false;
        self.flush().map_err(SyncError::Snapshot)
    }

    fn slot_backends(&self, key: &FrontendKey, p: &Programmed) -> Vec<BackendKey> {
        self.backends_by_id(key.family(), &p.slots)
    }

    fn backends_by_id(&self, family: IpFamily, ids: &[u32]) -> Vec<BackendKey> {
        ids.iter()
            .filter_map(|id| self.backend_by_id.get(family, *id))
            .collect()
    }

    /// Makes the maps hold exactly `frontends` for `service` (an empty list
    /// removes the service). Nothing is written if the request cannot be
    /// programmed whole.
    pub fn sync_service(
        &mut self,
        service: &ServiceName,
        frontends: &[(Frontend, FrontendSpec)],
    ) -> Result<SyncStats, SyncError> {
        if self.diverged {
            self.reload()?;
        }
        let stats = self.sync_service_as_known(service, frontends)?;
        self.flush().map_err(|source| SyncError::Map {
            service: service.clone(),
            source,
        })?;
        Ok(stats)
    }

    /// [`SyncEngine::sync_service`] without re-reading the maps first: a
    /// full sync re-reads them once, not once per service after a failure
    /// (with a map that keeps refusing writes that was quadratic).
    fn sync_service_as_known(
        &mut self,
        service: &ServiceName,
        frontends: &[(Frontend, FrontendSpec)],
    ) -> Result<SyncStats, SyncError> {
        let mut checked = self.check(service, frontends);
        if matches!(
            checked,
            Err(SyncError::CapacityExceeded {
                map: "BACKEND_SLOTS",
                ..
            })
        ) && !self.slot_blocks.released.is_empty()
        {
            // Blocks released since the last write are free once it is done.
            self.flush().map_err(|source| SyncError::Map {
                service: service.clone(),
                source,
            })?;
            checked = self.check(service, frontends);
        }
        let (new_backends, new_backends6) = checked?;
        if self.backend_ids.available() < new_backends
            || self.backend6_ids.available() < new_backends6
        {
            // Ids released since the last write are free once it is done.
            self.flush().map_err(|source| SyncError::Map {
                service: service.clone(),
                source,
            })?;
        }
        Ok(self.apply(service, frontends))
    }

    /// Refuses what cannot be programmed whole; returns how many backends
    /// the service adds, IPv4 and IPv6.
    fn check(
        &self,
        service: &ServiceName,
        frontends: &[(Frontend, FrontendSpec)],
    ) -> Result<(usize, usize), SyncError> {
        let mut new_frontends = 0usize;
        let mut slot_delta: isize = 0;
        // Blocks the frontends that move need, in the order `apply` takes them.
        let mut new_blocks = Vec::new();
        let old_keys = self.owned.get(service).map_or(&[][..], Vec::as_slice);
        let mut new_backends: BTreeSet<BackendKey> = BTreeSet::new();
        let mut new_ips: BTreeSet<IpKey> = BTreeSet::new();
        for (frontend, spec) in frontends {
            if let Some(ip) = service_key(frontend).ip() {
                if !self.service_ips.contains_key(&ip) {
                    new_ips.insert(ip);
                }
            }
            if let Some(backend) = spec
                .backends
                .iter()
                .chain(&spec.draining)
                .find(|b| IpFamily::of(b.ip) != frontend.family())
            {
                return Err(SyncError::FamilyMismatch {
                    service: service.clone(),
                    frontend: *frontend,
                    backend: *backend,
                });
            }
            let count = spec.backends.len();
            if count > capacity::BACKENDS_PER_SERVICE as usize {
                return Err(SyncError::TooManyBackends {
                    service: service.clone(),
                    frontend: *frontend,
                    count,
                    max: capacity::BACKENDS_PER_SERVICE,
                });
            }
            let key = service_key(frontend);
            match self.frontends.get(&key) {
                Some(Programmed {
                    owner: Some(owner), ..
                }) if owner != service => {
                    return Err(SyncError::FrontendConflict {
                        service: service.clone(),
                        frontend: *frontend,
                        owner: owner.clone(),
                    });
                }
                Some(p) => {
                    slot_delta += count as isize - p.slots.len() as isize;
                    if slot_order(p.slots.len()) != slot_order(count) {
                        new_blocks.extend(slot_order(count));
                    }
                }
                None => {
                    new_frontends += 1;
                    slot_delta += count as isize;
                    new_blocks.extend(slot_order(count));
                }
            }
            new_backends.extend(
                backends_of(frontend, spec)
                    .into_iter()
                    .chain(draining_of(frontend, spec))
                    .filter(|b| !self.backends.contains_key(b)),
            );
        }
        let removed_slots: usize = old_keys
            .iter()
            .filter(|k| !frontends.iter().any(|(f, _)| service_key(f) == **k))
            .filter_map(|k| self.frontends.get(k))
            .map(|p| p.slots.len())
            .sum();
        let count_of = |family: IpFamily| {
            (
                self.service_ips.count(family)
                    + new_ips.iter().filter(|ip| ip.family() == family).count(),
                self.backends.count(family)
                    + new_backends.iter().filter(|b| b.family() == family).count(),
            )
        };
        let (ips4, backends4) = count_of(IpFamily::Ipv4);
        let (ips6, backends6) = count_of(IpFamily::Ipv6);
        let limits = [
            ("SERVICE_IPS", ips4, capacity::SERVICE_IPS),
            ("LB6_SERVICE_IPS", ips6, capacity::SERVICE_IPS),
            // Service ids and names are shared by both families: the
            // frontends of both together fit in each services map and in
            // `SERVICE_NAMES`.
            (
                "SERVICES",
                self.frontends.len() + new_frontends,
                capacity::SERVICES,
            ),
            (
                "BACKEND_SLOTS",
                (self.slot_count as isize + slot_delta) as usize - removed_slots,
                capacity::BACKEND_SLOTS,
            ),
            // Backend id 0 is never used: ids 1..capacity.
            ("BACKENDS", backends4, capacity::BACKENDS - 1),
            ("LB6_BACKENDS", backends6, capacity::LB6_BACKENDS - 1),
        ];
        for (map, needed, capacity) in limits {
            if needed > capacity as usize {
                return Err(SyncError::CapacityExceeded {
                    service: service.clone(),
                    map,
                    needed,
                    capacity,
                });
            }
        }
        if !self.slot_blocks.fits(&new_blocks) {
            return Err(SyncError::CapacityExceeded {
                service: service.clone(),
                map: "BACKEND_SLOTS",
                needed: new_blocks.iter().map(|o| 1usize << o).sum(),
                capacity: capacity::BACKEND_SLOTS,
            });
        }
        let new6 = new_backends
            .iter()
            .filter(|b| b.family() == IpFamily::Ipv6)
            .count();
        Ok((new_backends.len() - new6, new6))
    }

    fn apply(
        &mut self,
        service: &ServiceName,
        frontends: &[(Frontend, FrontendSpec)],
    ) -> SyncStats {
        let mut stats = SyncStats::default();
        let mut keys = BTreeSet::new();
        for (frontend, spec) in frontends {
            let key = service_key(frontend);
            keys.insert(key);
            if self.program_frontend(service, key, frontend, spec) {
                stats.frontends_changed += 1;
            }
        }
        let old = self.owned.remove(service).unwrap_or_default();
        for key in old.iter().filter(|k| !keys.contains(*k)) {
            self.unprogram_frontend(*key);
            info!("service {service} {}: removed", describe_key(key));
            stats.frontends_removed += 1;
        }
        if !keys.is_empty() {
            self.owned
                .insert(service.clone(), keys.into_iter().collect());
        }
        stats
    }

    /// Returns whether anything was written.
    fn program_frontend(
        &mut self,
        service: &ServiceName,
        key: FrontendKey,
        frontend: &Frontend,
        spec: &FrontendSpec,
    ) -> bool {
        let desired = backends_of(frontend, spec);
        let affinity = spec.affinity_timeout_s.unwrap_or(0);
        let flags = flags_of(frontend, spec);
        let existing = self.frontends.get(&key).cloned();
        let old_backends = existing
            .as_ref()
            .map(|p| self.slot_backends(&key, p))
            .unwrap_or_default();
        let old_set: BTreeSet<BackendKey> = old_backends.iter().copied().collect();
        let new_set: BTreeSet<BackendKey> = desired.iter().copied().collect();
        let draining = draining_of(frontend, spec);
        let old_draining = existing
            .as_ref()
            .map(|p| self.backends_by_id(key.family(), &p.draining))
            .unwrap_or_default();
        let label = match &spec.port_name {
            Some(port) if !port.is_empty() => format!("{service}:{port}"),
            _ => service.to_string(),
        };
        if let Some(p) = &existing {
            if p.owner.is_none() {
                // A frontend adopted from a previous agent: claim it.
                self.pending.set_service_name(p.value.service_id, &label);
                self.frontends.get_mut(&key).expect("present").owner = Some(service.clone());
            }
            let ranges = source_range_keys(p.value.service_id, spec);
            if old_set == new_set
                && old_draining == draining
                && p.value.affinity_timeout_s == affinity
                && p.value.flags == flags
                && p.source_ranges == ranges
            {
                return false;
            }
        }

        // 1. Backends first, so every slot written below points at one.
        let mut ids = Vec::with_capacity(desired.len());
        let layout = plan_slots(&old_backends, &desired);
        for backend in &layout {
            ids.push(self.acquire_backend(*backend));
        }
        // Draining backends keep the id they had in a slot (acquired before
        // the old references are released), so their flows keep it too.
        let mut draining_ids = Vec::with_capacity(draining.len());
        for backend in &draining {
            draining_ids.push(self.acquire_backend(*backend));
        }
        // 2. Slots, before the count that makes them visible: in place if
        // the block still fits, else all of them in a new block.
        let service_id = match &existing {
            Some(p) => p.value.service_id,
            None => self.service_ids.allocate(),
        };
        let old_slots = existing
            .as_ref()
            .map(|p| p.slots.clone())
            .unwrap_or_default();
        let old_base = existing.as_ref().map_or(0, |p| p.value.slot_base);
        let moved = slot_order(old_slots.len()) != slot_order(ids.len());
        let slot_base = match slot_order(ids.len()) {
            Some(order) if moved => self
                .slot_blocks
                .allocate(order)
                .expect("check() made sure the block fits"),
            _ => old_base,
        };
        for (slot, id) in ids.iter().enumerate() {
            if moved || old_slots.get(slot) != Some(id) {
                self.pending.set_slot(slot_base + slot as u32, *id);
            }
        }
        // 3. Source ranges before the flag that makes them apply; ranges
        // no longer listed after it (briefly too open, never too closed).
        let ranges = source_range_keys(service_id, spec);
        let old_ranges = existing
            .as_ref()
            .map(|p| p.source_ranges.clone())
            .unwrap_or_default();
        for key in ranges.difference(&old_ranges) {
            set_source_range(&mut self.pending, *key);
        }
        // 4. The service entry (and its IP in the pre-filter) with the count.
        let value = ServiceValue {
            service_id,
            backend_count: ids.len() as u32,
            flags,
            affinity_timeout_s: affinity,
            slot_base,
        };
        if existing.is_none() {
            self.pending.set_service_name(service_id, &label);
        }
        set_service(&mut self.pending, key, value);
        if let Some(ip) = key.ip().filter(|_| existing.is_none()) {
            let ports = self.service_ips.get(&ip).copied().unwrap_or(0) + 1;
            let node = self.is_node_addr(ip);
            set_service_ip(&mut self.pending, ip, service_ip_value(ports, node));
            self.service_ips.insert(ip, ports);
        }
        for key in old_ranges.difference(&ranges) {
            remove_source_range(&mut self.pending, *key);
        }
        // 5. Slots nothing counts any more (the old block, or past the new
        // count), then backends nobody uses any more.
        let stale = if moved { 0 } else { ids.len() };
        for slot in stale..old_slots.len() {
            self.pending.remove_slot(old_base + slot as u32);
        }
        if moved {
            if let Some(order) = slot_order(old_slots.len()) {
                self.slot_blocks.release(old_base, order);
            }
        }
        self.slot_count = self.slot_count + ids.len() - old_slots.len();
        for backend in old_backends.iter().chain(&old_draining) {
            self.release_backend(*backend);
        }
        self.frontends.insert(
            key,
            Programmed {
                owner: Some(service.clone()),
                value,
                slots: ids,
                draining: draining_ids,
                source_ranges: ranges,
            },
        );
        let empty = if spec.drop_without_local_endpoints {
            " (no endpoint on this node: traffic policy Local, connections are dropped)"
        } else if desired.is_empty() {
            " (connections are rejected)"
        } else {
            ""
        };
        let affinity = match spec.affinity_timeout_s {
            Some(t) => format!(", affinity ClientIP {t}s"),
            None => String::new(),
        };
        let draining = match draining.len() {
            0 => String::new(),
            n => format!(", {n} draining"),
        };
        // One line per frontend for a change; a full sync (10 000 services
        // at start) logs them at debug and sums them up once (`full_sync`).
        let level = if self.in_full_sync {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "service {service} {frontend}: {} endpoints{draining}{affinity}{empty}",
            desired.len()
        );
        debug!("service {service} {frontend}: service id {service_id}");
        true
    }

    /// Whether `ip` is one of the node's addresses.
    fn is_node_addr(&self, ip: IpKey) -> bool {
        self.node_addrs.contains(&ip)
    }

    fn unprogram_frontend(&mut self, key: FrontendKey) {
        let Some(p) = self.frontends.get(&key).cloned() else {
            return;
        };
        let mut backends = self.slot_backends(&key, &p);
        backends.extend(self.backends_by_id(key.family(), &p.draining));
        // The service entry goes first: from then on no new flow reads a slot.
        remove_service(&mut self.pending, key);
        for slot in 0..p.slots.len() {
            self.pending.remove_slot(p.value.slot_base + slot as u32);
        }
        if let Some(order) = slot_order(p.slots.len()) {
            self.slot_blocks.release(p.value.slot_base, order);
        }
        for range in &p.source_ranges {
            remove_source_range(&mut self.pending, *range);
        }
        if let Some(ip) = key.ip() {
            let node = self.is_node_addr(ip);
            match self.service_ips.get(&ip).copied().unwrap_or(1) {
                0 | 1 if node => {
                    set_service_ip(&mut self.pending, ip, service_ip_value(0, true));
                    self.service_ips.remove(&ip);
                }
                0 | 1 => {
                    remove_service_ip(&mut self.pending, ip);
                    self.service_ips.remove(&ip);
                }
                n => {
                    set_service_ip(&mut self.pending, ip, service_ip_value(n - 1, node));
                    self.service_ips.insert(ip, n - 1);
                }
            }
        }
        for backend in backends {
            self.release_backend(backend);
        }
        self.pending.remove_service_name(p.value.service_id);
        self.slot_count -= p.slots.len();
        self.service_ids.release(p.value.service_id);
        self.frontends.remove(&key);
    }

    fn acquire_backend(&mut self, backend: BackendKey) -> u32 {
        if let Some(r) = self.backends.get_mut(&backend) {
            r.refs += 1;
            return r.id;
        }
        let source_key = ReplySourceKey::of(&backend);
        let source = self.reply_sources.entry(source_key).or_insert(0);
        if *source == 0 {
            set_reply_source(&mut self.pending, source_key, reply_source_flags::PORT);
        }
        *source += 1;
        // The address's "no flows yet" bits stand for all its ports: set
        // with its first backend, unless conntrack holds flows from before
        // this engine's start, and never again while it has one (the
        // datapath may have cleared them since); a later backend that may
        // have carried flows clears them.
        let carried = match backend.family() {
            IpFamily::Ipv4 => self.flows_carried.0,
            IpFamily::Ipv6 => self.flows_carried.1,
        };
        let address_key = ReplySourceKey::address_of(&backend);
        let address = self.reply_sources.entry(address_key).or_insert(0);
        if carried {
            set_reply_source(
                &mut self.pending,
                address_key,
                reply_source_flags::MAY_HAVE_FLOWS,
            );
        } else if *address == 0 {
            set_reply_source(&mut self.pending, address_key, reply_source_flags::FRESH);
        }
        *address += 1;
        let id = match backend {
            BackendKey::V4(b) => {
                let id = self.backend_ids.allocate();
                self.pending.set_backend(id, b);
                id
            }
            BackendKey::V6(b) => {
                let id = self.backend6_ids.allocate();
                self.pending.set_backend6(id, b);
                id
            }
        };
        self.backends.insert(backend, BackendRef { id, refs: 1 });
        self.backend_by_id.insert(id, backend);
        id
    }

    fn release_backend(&mut self, backend: BackendKey) {
        let Some(r) = self.backends.get_mut(&backend) else {
            return;
        };
        r.refs -= 1;
        if r.refs == 0 {
            let id = r.id;
            self.backends.remove(&backend);
            self.backend_by_id.remove(backend.family(), id);
            for source in [
                ReplySourceKey::of(&backend),
                ReplySourceKey::address_of(&backend),
            ] {
                if let Some(n) = self.reply_sources.get_mut(&source) {
                    *n -= 1;
                    if *n == 0 {
                        self.reply_sources.remove(&source);
                        remove_reply_source(&mut self.pending, source);
                    }
                }
            }
            match backend {
                BackendKey::V4(_) => {
                    self.pending.remove_backend(id);
                    self.backend_ids.release(id);
                }
                BackendKey::V6(_) => {
                    self.pending.remove_backend6(id);
                    self.backend6_ids.release(id);
                }
            }
            self.removed.push(backend);
        }
    }

    /// Full sync: every service in `all` is programmed, everything else
    /// (services deleted while no agent ran, leftovers of an older agent) is
    /// removed. Errors of one service do not stop the others.
    ///
    /// `all` is read one service at a time, so a caller can work out each
    /// service's frontends as they are needed rather than hold the whole
    /// cluster's (at 10 000 services, 12 MiB at the agent's peak). Writes
    /// go out in one batch per map every [`FULL_SYNC_BATCH_SERVICES`]
    /// services and at the end.
    pub fn sync_all<S, F>(
        &mut self,
        all: impl IntoIterator<Item = (S, F)>,
    ) -> (SyncStats, Vec<SyncError>)
    where
        S: Borrow<ServiceName>,
        F: AsRef<[(Frontend, FrontendSpec)]>,
    {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        if self.diverged {
            if let Err(e) = self.reload() {
                errors.push(e);
                return (stats, errors);
            }
        }
        // What the maps hold for services not listed goes at the end
        // (nothing, from nothing).
        let mut stale: HashSet<ServiceName> = self.owned.keys().cloned().collect();
        for (n, (service, frontends)) in all.into_iter().enumerate() {
            let service = service.borrow();
            stale.remove(service);
            match self.sync_service_as_known(service, frontends.as_ref()) {
                Ok(s) => {
                    stats.frontends_changed += s.frontends_changed;
                    stats.frontends_removed += s.frontends_removed;
                }
                Err(e) => errors.push(e),
            }
            // Each service's writes are whole (as `sync_service` flushes
            // them), so a batch may end between two services.
            if (n + 1) % FULL_SYNC_BATCH_SERVICES == 0 {
                if let Err(source) = self.flush() {
                    // The maps are re-read and synced whole at the next
                    // full sync (`needs_resync`).
                    errors.push(SyncError::Write(source));
                    self.in_full_sync = false;
                    return (stats, errors);
                }
            }
        }
        for service in stale {
            match self.sync_service_as_known(&service, &[]) {
                Ok(s) => stats.frontends_removed += s.frontends_removed,
                Err(e) => errors.push(e),
            }
        }
        self.in_full_sync = false;
        let unclaimed: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(_, p)| p.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in unclaimed {
            self.unprogram_frontend(key);
            info!(
                "{}: removed (left by a previous agent, no longer a service)",
                describe_key(&key)
            );
            stats.frontends_removed += 1;
        }
        // Every service has claimed what it still drains: the rest of what
        // the maps held without a slot goes (their TCP flows are reset).
        for backend in std::mem::take(&mut self.adopted_draining) {
            self.release_backend(backend);
        }
        // One batch per map for the whole cluster.
        if let Err(source) = self.flush() {
            errors.push(SyncError::Write(source));
        } else {
            // Every backend of the cluster is in: those added from now on
            // are new to conntrack too.
            self.flows_carried = (false, false);
        }
        (stats, errors)
    }

    /// A write failed and the maps may differ from what this engine thinks
    /// they hold: the next sync re-reads them. The agent runs a full sync
    /// for that rather than wait for the next change of each service.
    ///
    /// Backends adopted without a slot after a re-read also wait for a
    /// full sync to tell which are still draining.
    pub fn needs_resync(&self) -> bool {
        self.diverged || !self.adopted_draining.is_empty()
    }

    /// Makes `addrs` the node's addresses, on which NodePorts are served
    /// (the `SERVICE_IPS` node bit); addresses no longer listed lose it.
    pub fn set_node_addresses(&mut self, addrs: &[Ipv4Addr]) -> Result<(), SyncError> {
        let wanted = addrs.iter().map(|a| IpKey::V4(ipv4_to_map(a.octets())));
        self.set_family_node_addresses(IpFamily::Ipv4, wanted.collect())
    }

    /// [`SyncEngine::set_node_addresses`] for the node's IPv6 addresses
    /// (`LB6_SERVICE_IPS`); the IPv4 ones stay as they are.
    pub fn set_node_addresses6(&mut self, addrs: &[Ipv6Addr]) -> Result<(), SyncError> {
        let wanted = addrs.iter().map(|a| IpKey::V6(a.octets()));
        self.set_family_node_addresses(IpFamily::Ipv6, wanted.collect())
    }

    fn set_family_node_addresses(
        &mut self,
        family: IpFamily,
        wanted: BTreeSet<IpKey>,
    ) -> Result<(), SyncError> {
        let of_family = |ip: &IpKey| matches!(ip, IpKey::V6(_)) == (family == IpFamily::Ipv6);
        let current: BTreeSet<IpKey> = self.node_addrs.iter().copied().filter(of_family).collect();
        for &addr in wanted.difference(&current) {
            let count = self.service_ips.get(&addr).copied().unwrap_or(0);
            set_service_ip(&mut self.pending, addr, service_ip_value(count, true));
        }
        for &addr in current.difference(&wanted) {
            match self.service_ips.get(&addr).copied() {
                Some(count) => {
                    set_service_ip(&mut self.pending, addr, service_ip_value(count, false))
                }
                None => remove_service_ip(&mut self.pending, addr),
            }
        }
        self.node_addrs.retain(|ip| !of_family(ip));
        self.node_addrs.extend(wanted);
        self.flush().map_err(SyncError::Write)
    }

    /// Services that own at least one frontend.
    pub fn service_count(&self) -> usize {
        self.owned.len()
    }

    /// Entries of each load-balancing map, as this engine wrote them.
    pub fn occupancy(&self) -> Occupancy {
        let ips6 = self.service_ips.count(IpFamily::Ipv6);
        let services6 = self
            .frontends
            .keys()
            .filter(|k| k.family() == IpFamily::Ipv6)
            .count();
        let backends6 = self.backends.count(IpFamily::Ipv6);
        Occupancy {
            service_ips: self.service_ips.len() - ips6,
            services: self.frontends.len() - services6,
            backend_slots: self.slot_count,
            backends: self.backends.len() - backends6,
            service_names: self.frontends.len(),
            conntrack: CtOccupancy::default(),
            sock_revnat: 0,
            service_ips6: ips6,
            services6,
            backends6,
        }
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }
}

fn describe_key(key: &FrontendKey) -> String {
    match key {
        FrontendKey::V4(key) => format!(
            "{}/{}",
            pinned::endpoint(key.addr, key.port),
            pinned::proto_name(key.proto)
        ),
        FrontendKey::V6(key) => format!(
            "{}/{}",
            std::net::SocketAddr::new(
                std::net::Ipv6Addr::from(key.addr).into(),
                u16::from_be(key.port)
            ),
            pinned::proto_name(key.proto)
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::{
        control::model::{BackendAddr, ObjectRef},
        node::lb_maps::MemLbMaps,
    };

    fn name(n: &str) -> ServiceName {
        ObjectRef {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    fn frontend(ip: [u8; 4], port: u16) -> Frontend {
        Frontend::cluster_ip(Ipv4Addr::from(ip), port, Protocol::Tcp)
    }

    fn spec(service: &str, backends: &[u8]) -> FrontendSpec {
        FrontendSpec {
            service: name(service),
            port_name: None,
            backends: backends
                .iter()
                .map(|last| BackendAddr {
                    ip: Ipv4Addr::new(10, 244, 1, *last).into(),
                    port: 8080,
                })
                .collect(),
            draining: Vec::new(),
            affinity_timeout_s: None,
            drop_without_local_endpoints: false,
            masquerade_remote: false,
            local_ips: Vec::new(),
            source_ranges: Vec::new(),
            source_ranges6: Vec::new(),
        }
    }

    /// The `SERVICES` key of an IPv4 frontend.
    fn key4(f: &Frontend) -> ServiceKey {
        match service_key(f) {
            FrontendKey::V4(k) => k,
            other => panic!("not IPv4: {other:?}"),
        }
    }

    fn engine() -> SyncEngine<MemLbMaps> {
        SyncEngine::adopt(MemLbMaps::default()).unwrap()
    }

    /// What the datapath would see for a frontend: its backends in slot order.
    fn programmed(maps: &MemLbMaps, f: &Frontend) -> Option<Vec<u8>> {
        let value = maps.state.services.get(&key4(f))?;
        Some(
            (0..value.backend_count)
                .map(|slot| {
                    let id = maps.state.slots[&(value.slot_base + slot)];
                    dataplane_common::ipv4_from_map(maps.state.backends[&id].addr)[3]
                })
                .collect(),
        )
    }

    #[test]
    fn service_is_programmed_with_all_its_backends() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11, 12]))])
            .unwrap();
        let mut got = programmed(e.maps(), &web).unwrap();
        got.sort();
        assert_eq!(got, vec![10, 11, 12]);
        assert_eq!(e.maps().state.service_ips[&key4(&web).addr], 1);
    }

    #[test]
    fn affinity_and_local_drop_reach_the_service_entry_and_changes_rewrite_it() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let mut desired = spec("web", &[]);
        desired.drop_without_local_endpoints = true;
        desired.affinity_timeout_s = Some(60);
        e.sync_service(&name("web"), &[(web, desired.clone())])
            .unwrap();
        let value = e.maps().state.services[&key4(&web)];
        assert_eq!(value.flags, service_flags::DROP_NO_LOCAL_ENDPOINTS);
        assert_eq!(value.affinity_timeout_s, 60);
        // Only the flag changes (e.g. the other nodes' endpoints went away):
        // the entry is still rewritten.
        desired.drop_without_local_endpoints = false;
        e.sync_service(&name("web"), &[(web, desired)]).unwrap();
        assert_eq!(e.maps().state.services[&key4(&web)].flags, 0);
    }

    #[test]
    fn unchanged_service_writes_nothing() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        let writes = e.maps().writes;
        let stats = e
            .sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        assert_eq!(e.maps().writes, writes);
        assert_eq!(stats, SyncStats::default());
    }

    /// `REPLY_SOURCES` as the datapath would see it.
    fn reply_sources(maps: &MemLbMaps) -> BTreeSet<ReplySource> {
        maps.state.reply_sources.keys().copied().collect()
    }

    /// `REPLY_SOURCES` of the backends in `BACKENDS`: each backend's, and
    /// its address's.
    fn sources_of_backends(maps: &MemLbMaps) -> BTreeSet<ReplySource> {
        maps.state
            .backends
            .values()
            .flat_map(|b| [ReplySource::of(b), ReplySource::address(b.addr)])
            .collect()
    }

    /// The `REPLY_SOURCES` value of pod 10.244.1.`last`'s address entry.
    fn address_value(maps: &MemLbMaps, last: u8) -> Option<u32> {
        let addr = dataplane_common::ipv4_to_map([10, 244, 1, last]);
        maps.state
            .reply_sources
            .get(&ReplySource::address(addr))
            .copied()
    }

    #[test]
    fn an_address_entry_stands_for_every_backend_at_the_address() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let admin = frontend([10, 96, 0, 11], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10]))])
            .unwrap();
        assert_eq!(address_value(e.maps(), 10), Some(reply_source_flags::FRESH));
        assert!(
            e.maps()
                .state
                .reply_sources
                .iter()
                .all(|(k, v)| *k == ReplySource::address(k.addr) || *v == reply_source_flags::PORT),
            "the bits are the address's only"
        );
        // The datapath made a flow to 10:8080 and cleared the bits.
        let addr = ReplySource::address(dataplane_common::ipv4_to_map([10, 244, 1, 10]));
        e.maps
            .state
            .reply_sources
            .insert(addr, reply_source_flags::MAY_HAVE_FLOWS);
        // A second port of the same pod: its own entry is fresh, the
        // address's is left as the datapath made it.
        let mut admin_spec = spec("admin", &[10]);
        admin_spec.backends[0].port = 9090;
        e.sync_service(&name("admin"), &[(admin, admin_spec.clone())])
            .unwrap();
        assert_eq!(
            address_value(e.maps(), 10),
            Some(reply_source_flags::MAY_HAVE_FLOWS),
            "a later port must not hide the first port's flows"
        );
        assert_eq!(reply_sources(e.maps()).len(), 3, "two ports, one address");
        // The address stays while any of its backends does.
        e.sync_service(&name("web"), &[]).unwrap();
        assert!(address_value(e.maps(), 10).is_some());
        e.sync_service(&name("admin"), &[]).unwrap();
        assert_eq!(address_value(e.maps(), 10), None);
        assert!(reply_sources(e.maps()).is_empty());

        // While flows from before the agent's start may exist, a backend
        // added at a fresh address clears the address's bits too.
        e.sync_service(&name("web"), &[(web, spec("web", &[10]))])
            .unwrap();
        e.set_flows_carried(true);
        e.sync_service(&name("admin"), &[(admin, admin_spec)])
            .unwrap();
        assert_eq!(
            address_value(e.maps(), 10),
            Some(reply_source_flags::MAY_HAVE_FLOWS)
        );
    }

    #[test]
    fn reply_sources_follow_the_backends_and_are_filled_when_adopting_maps_without_them() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let api = frontend([10, 96, 0, 11], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        // 11 serves both services: one reply source.
        e.sync_service(&name("api"), &[(api, spec("api", &[11, 12]))])
            .unwrap();
        // Three backends, each its port's entry and its address's.
        assert_eq!(reply_sources(e.maps()).len(), 6);
        assert_eq!(reply_sources(e.maps()), sources_of_backends(e.maps()));
        e.sync_service(&name("web"), &[(web, spec("web", &[10]))])
            .unwrap();
        assert_eq!(reply_sources(e.maps()).len(), 6, "11 still serves api");
        e.sync_service(&name("api"), &[]).unwrap();
        assert_eq!(reply_sources(e.maps()), sources_of_backends(e.maps()));
        assert_eq!(reply_sources(e.maps()).len(), 2, "only 10 is left");

        // An agent of layout 3 pinned no REPLY_SOURCES.
        let mut state = e.maps().state.clone();
        state.reply_sources.clear();
        let adopted = SyncEngine::adopt(MemLbMaps {
            state,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            reply_sources(adopted.maps()),
            sources_of_backends(adopted.maps())
        );
        assert!(!reply_sources(adopted.maps()).is_empty());
    }

    /// `LB6_REPLY_SOURCES` as the datapath would see it.
    fn reply_sources6(maps: &MemLbMaps) -> BTreeSet<ReplySource6> {
        maps.state.reply_sources6.keys().copied().collect()
    }

    /// `LB6_REPLY_SOURCES` of the backends in `LB6_BACKENDS`, as IPv4's.
    fn sources6_of_backends(maps: &MemLbMaps) -> BTreeSet<ReplySource6> {
        maps.state
            .backends6
            .values()
            .flat_map(|b| [ReplySource6::of(b), ReplySource6::address(b.addr)])
            .collect()
    }

    #[test]
    fn ipv6_reply_sources_follow_the_backends_and_are_filled_when_adopting_maps_without_them() {
        let mut e = engine();
        let v4 = frontend([10, 96, 0, 10], 80);
        let v6 = frontend6(0x10, 80);
        e.sync_service(
            &name("web"),
            &[(v6, spec6("web", &[10, 11])), (v4, spec("web", &[10, 11]))],
        )
        .unwrap();
        assert_eq!(reply_sources6(e.maps()).len(), 4);
        assert_eq!(reply_sources6(e.maps()), sources6_of_backends(e.maps()));
        assert_eq!(reply_sources(e.maps()).len(), 4, "IPv4's in their own map");
        e.sync_service(
            &name("web"),
            &[(v6, spec6("web", &[10])), (v4, spec("web", &[10, 11]))],
        )
        .unwrap();
        assert_eq!(reply_sources6(e.maps()), sources6_of_backends(e.maps()));
        assert_eq!(reply_sources6(e.maps()).len(), 2);
        assert_eq!(reply_sources(e.maps()).len(), 4);

        // An agent of layout 6 pinned no LB6_REPLY_SOURCES.
        let mut state = e.maps().state.clone();
        state.reply_sources6.clear();
        let adopted = SyncEngine::adopt(MemLbMaps {
            state,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            reply_sources6(adopted.maps()),
            sources6_of_backends(adopted.maps())
        );
        assert_eq!(reply_sources6(adopted.maps()).len(), 2);

        e.sync_service(&name("web"), &[]).unwrap();
        assert!(reply_sources6(e.maps()).is_empty());
        assert!(reply_sources(e.maps()).is_empty());
    }

    #[test]
    fn one_endpoint_change_rewrites_one_slot_and_keeps_the_others_in_place() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11, 12]))])
            .unwrap();
        let before = programmed(e.maps(), &web).unwrap();
        let writes = e.maps().writes;
        // 11 replaced by 13: new backend and its reply sources (port and
        // address), its slot, the count, old backend and its reply sources
        // gone.
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 12, 13]))])
            .unwrap();
        let after = programmed(e.maps(), &web).unwrap();
        assert_eq!(e.maps().writes - writes, 8);
        for (b, a) in before.iter().zip(&after) {
            if *b != 11 {
                assert_eq!(a, b, "surviving backends keep their slots");
            }
        }
        assert!(after.contains(&13) && !after.contains(&11));
        assert_eq!(e.maps().state.backends.len(), 3);
    }

    #[test]
    fn shrinking_service_deletes_trailing_slots_and_unused_backends() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11, 12, 13]))])
            .unwrap();
        e.sync_service(&name("web"), &[(web, spec("web", &[13]))])
            .unwrap();
        assert_eq!(programmed(e.maps(), &web).unwrap(), vec![13]);
        assert_eq!(e.maps().state.slots.len(), 1);
        assert_eq!(e.maps().state.backends.len(), 1);
    }

    #[test]
    fn service_without_endpoints_stays_programmed_with_zero_backends() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[]))])
            .unwrap();
        assert_eq!(programmed(e.maps(), &web).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn deleting_a_service_clears_every_map() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let web_udp = Frontend {
            proto: Protocol::Udp,
            ..web
        };
        e.sync_service(
            &name("web"),
            &[(web, spec("web", &[10])), (web_udp, spec("web", &[10]))],
        )
        .unwrap();
        assert_eq!(e.maps().state.service_ips[&key4(&web).addr], 2);
        e.sync_service(&name("web"), &[]).unwrap();
        assert_eq!(e.maps().state, LbSnapshot::default());
    }

    #[test]
    fn backends_shared_by_two_services_are_written_once_and_kept_while_used() {
        let mut e = engine();
        let a = frontend([10, 96, 0, 10], 80);
        let b = frontend([10, 96, 0, 11], 80);
        e.sync_service(&name("a"), &[(a, spec("a", &[10]))])
            .unwrap();
        e.sync_service(&name("b"), &[(b, spec("b", &[10]))])
            .unwrap();
        assert_eq!(e.maps().state.backends.len(), 1);
        e.sync_service(&name("a"), &[]).unwrap();
        assert_eq!(programmed(e.maps(), &b).unwrap(), vec![10]);
    }

    #[test]
    fn too_many_backends_is_refused_whole_and_names_the_service() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let huge = FrontendSpec {
            backends: (0..=capacity::BACKENDS_PER_SERVICE)
                .map(|i| BackendAddr {
                    ip: Ipv4Addr::from(0x0af4_0000 + i).into(),
                    port: 80,
                })
                .collect(),
            ..spec("web", &[])
        };
        let ok = frontend([10, 96, 0, 10], 443);
        let err = e
            .sync_service(&name("web"), &[(ok, spec("web", &[10])), (web, huge)])
            .unwrap_err();
        assert!(matches!(err, SyncError::TooManyBackends { .. }));
        assert!(err.to_string().contains("default/web"), "{err}");
        assert_eq!(
            e.maps().writes,
            0,
            "nothing of the refused service was written"
        );
    }

    #[test]
    fn service_ips_beyond_capacity_are_refused_before_any_write() {
        // A refused write would mark the engine diverged and make every
        // later service re-read all the maps: the 100k-service stall.
        let mut e = engine();
        e.service_ips
            .extend((0..capacity::SERVICE_IPS).map(|i| (IpKey::V4(0x0a60_0000 + i), 1)));
        let err = e
            .sync_service(
                &name("web"),
                &[(frontend([10, 97, 0, 1], 80), spec("web", &[10]))],
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::CapacityExceeded {
                    map: "SERVICE_IPS",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(e.maps().writes, 0);
        assert!(!e.diverged, "a refusal is not a divergence");
    }

    #[test]
    fn two_services_claiming_one_frontend_conflict() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("a"), &[(web, spec("a", &[10]))])
            .unwrap();
        let err = e
            .sync_service(&name("b"), &[(web, spec("b", &[11]))])
            .unwrap_err();
        assert!(err.to_string().contains("default/a"), "{err}");
        assert_eq!(programmed(e.maps(), &web).unwrap(), vec![10]);
    }

    fn frontend6(last: u16, port: u16) -> Frontend {
        Frontend::cluster_ip(
            std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, last),
            port,
            Protocol::Tcp,
        )
    }

    fn pod6(last: u8) -> BackendAddr {
        BackendAddr {
            ip: std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, last.into()).into(),
            port: 8080,
        }
    }

    fn spec6(service: &str, backends: &[u8]) -> FrontendSpec {
        FrontendSpec {
            backends: backends.iter().map(|b| pod6(*b)).collect(),
            ..spec(service, &[])
        }
    }

    /// An IPv6 frontend's backends in slot order (last byte of each).
    fn programmed6(maps: &MemLbMaps, f: &Frontend) -> Option<Vec<u8>> {
        let FrontendKey::V6(key) = service_key(f) else {
            panic!("not IPv6: {f}");
        };
        let value = maps.state.services6.get(&key)?;
        Some(
            (0..value.backend_count)
                .map(|slot| {
                    let id = maps.state.slots[&(value.slot_base + slot)];
                    maps.state.backends6[&id].addr[15]
                })
                .collect(),
        )
    }

    #[test]
    fn dual_stack_service_programs_each_family_in_its_own_maps() {
        let mut e = engine();
        let v4 = frontend([10, 96, 0, 10], 80);
        let v6 = frontend6(0x10, 80);
        e.sync_service(
            &name("web"),
            &[(v6, spec6("web", &[10, 11])), (v4, spec("web", &[10, 11]))],
        )
        .unwrap();
        assert_eq!(programmed(e.maps(), &v4).unwrap().len(), 2);
        let mut got = programmed6(e.maps(), &v6).unwrap();
        got.sort();
        assert_eq!(got, [10, 11]);
        let state = &e.maps().state;
        // IPv6 backend ids are a dense space of their own, from 1.
        assert_eq!(state.backends6.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(state.backends.keys().copied().collect::<Vec<_>>(), [1, 2]);
        let FrontendKey::V6(key6) = service_key(&v6) else {
            unreachable!()
        };
        assert_eq!(state.service_ips6[&key6.addr], 1);
        assert_eq!(state.service_ips.len(), 1);
        // Service ids and slot blocks are shared: distinct for the two.
        let v4_value = state.services[&key4(&v4)];
        let v6_value = state.services6[&key6];
        assert_ne!(v4_value.service_id, v6_value.service_id);
        assert_ne!(v4_value.slot_base, v6_value.slot_base);
        assert_eq!(state.names.len(), 2);
        let occupancy = e.occupancy();
        assert_eq!(
            (occupancy.services, occupancy.services6, occupancy.backends6),
            (1, 1, 2)
        );
        assert_eq!((occupancy.service_ips, occupancy.service_ips6), (1, 1));

        // Removing the service empties both families' maps.
        e.sync_service(&name("web"), &[]).unwrap();
        let state = &e.maps().state;
        assert!(state.services6.is_empty() && state.service_ips6.is_empty());
        assert!(state.backends6.is_empty() && state.slots.is_empty());
        assert!(state.services.is_empty() && state.names.is_empty());
    }

    #[test]
    fn ipv6_endpoint_change_rewrites_one_slot_and_drains_the_terminating_one() {
        let mut e = engine();
        let v6 = frontend6(0x10, 80);
        e.sync_service(&name("web"), &[(v6, spec6("web", &[10, 11]))])
            .unwrap();
        let before = programmed6(e.maps(), &v6).unwrap();
        let writes = e.maps().writes;
        let mut next = spec6("web", &[10, 12]);
        next.draining = vec![pod6(11)];
        e.sync_service(&name("web"), &[(v6, next)]).unwrap();
        let after = programmed6(e.maps(), &v6).unwrap();
        let kept = before.iter().position(|b| *b == 10).unwrap();
        assert_eq!(after[kept], 10, "the surviving backend keeps its slot");
        assert!(after.contains(&12) && !after.contains(&11));
        // The terminating endpoint stays in LB6_BACKENDS for its flows.
        let in_map: Vec<u8> = e
            .maps()
            .state
            .backends6
            .values()
            .map(|b| b.addr[15])
            .collect();
        assert!(in_map.contains(&11), "{in_map:?}");
        // One backend, its reply sources (port and address), one slot, the
        // service entry.
        assert_eq!(e.maps().writes - writes, 5);
        // The next sync without it lets it go.
        e.sync_service(&name("web"), &[(v6, spec6("web", &[10, 12]))])
            .unwrap();
        let in_map: Vec<u8> = e
            .maps()
            .state
            .backends6
            .values()
            .map(|b| b.addr[15])
            .collect();
        assert!(!in_map.contains(&11), "{in_map:?}");
        let removed: Vec<u8> = e
            .take_removed()
            .iter()
            .map(|b| match b {
                BackendKey::V6(b) => b.addr[15],
                BackendKey::V4(_) => panic!("no IPv4 backend here"),
            })
            .collect();
        assert_eq!(removed, [11], "sockets aimed at it are to be closed");
    }

    #[test]
    fn restarted_agent_adopts_ipv6_frontends_and_rewrites_nothing() {
        let mut first = engine();
        let v6 = frontend6(0x10, 80);
        let gone = frontend6(0x99, 80);
        first
            .sync_service(&name("web"), &[(v6, spec6("web", &[10, 11]))])
            .unwrap();
        first
            .sync_service(&name("gone"), &[(gone, spec6("gone", &[12]))])
            .unwrap();
        let maps = MemLbMaps {
            state: first.maps().state.clone(),
            ..Default::default()
        };
        let before = programmed6(&maps, &v6);
        let mut second = SyncEngine::adopt(maps).unwrap();
        let all = BTreeMap::from([(name("web"), vec![(v6, spec6("web", &[10, 11]))])]);
        let (stats, errors) = second.sync_all(&all);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(programmed6(second.maps(), &v6), before);
        assert_eq!(programmed6(second.maps(), &gone), None);
        assert_eq!(stats.frontends_changed, 0);
        assert_eq!(stats.frontends_removed, 1);
        assert_eq!(second.maps().state.backends6.len(), 2);
        assert_eq!(second.maps().state.service_ips6.len(), 1);
        // A new backend takes the id the removed one freed (dense ids).
        second
            .sync_service(&name("web"), &[(v6, spec6("web", &[10, 11, 13]))])
            .unwrap();
        assert_eq!(
            second
                .maps()
                .state
                .backends6
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn backend_of_the_other_family_is_refused() {
        let mut e = engine();
        let err = e
            .sync_service(&name("web"), &[(frontend6(0x10, 80), spec("web", &[10]))])
            .unwrap_err();
        assert!(matches!(err, SyncError::FamilyMismatch { .. }), "{err}");
        assert_eq!(e.maps().writes, 0);
    }

    #[test]
    fn ipv6_backends_beyond_capacity_are_refused_before_any_write() {
        let mut e = engine();
        for id in 1..capacity::LB6_BACKENDS {
            let backend = BackendKey::V6(Backend6 {
                addr: [
                    0xfd,
                    0x99,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    (id >> 8) as u8,
                    id as u8,
                ],
                port: 1,
                proto: 6,
                flags: 0,
            });
            e.backends.insert(backend, BackendRef { id, refs: 1 });
        }
        let err = e
            .sync_service(&name("web"), &[(frontend6(0x10, 80), spec6("web", &[10]))])
            .unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::CapacityExceeded {
                    map: "LB6_BACKENDS",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(e.maps().writes, 0);
        // IPv4 backends are not limited by it.
        e.sync_service(
            &name("api"),
            &[(frontend([10, 96, 0, 11], 80), spec("api", &[10]))],
        )
        .unwrap();
    }

    #[test]
    fn restarted_agent_adopts_maps_and_rewrites_nothing_unchanged() {
        let mut first = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let gone = frontend([10, 96, 0, 99], 80);
        first
            .sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        first
            .sync_service(&name("gone"), &[(gone, spec("gone", &[12]))])
            .unwrap();
        let maps = MemLbMaps {
            state: first.maps().state.clone(),
            ..Default::default()
        };
        let before = programmed(&maps, &web);

        let mut second = SyncEngine::adopt(maps).unwrap();
        let all = BTreeMap::from([(name("web"), vec![(web, spec("web", &[10, 11]))])]);
        let (stats, errors) = second.sync_all(&all);
        assert!(errors.is_empty());
        assert_eq!(programmed(second.maps(), &web), before, "web untouched");
        assert_eq!(
            programmed(second.maps(), &gone),
            None,
            "service deleted while down is removed"
        );
        assert_eq!(stats.frontends_changed, 0);
        assert_eq!(stats.frontends_removed, 1);
    }

    #[test]
    fn failed_write_is_reported_and_next_sync_repairs_from_the_maps() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10]))])
            .unwrap();
        e.maps.fail_next_write_to = Some(dataplane_common::map_names::SERVICES);
        let err = e
            .sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap_err();
        assert_eq!(err.cause(), "map_write");
        assert!(e.needs_resync());
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        let mut got = programmed(e.maps(), &web).unwrap();
        got.sort();
        assert_eq!(got, vec![10, 11]);
        // The backend written before the failure had no slot when the maps
        // were re-read: only a full sync can tell it is not draining.
        assert!(e.needs_resync());
        let all = BTreeMap::from([(name("web"), vec![(web, spec("web", &[10, 11]))])]);
        let (_, errors) = e.sync_all(&all);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!e.needs_resync());
        assert_eq!(e.maps().state.backends.len(), 2);
    }

    #[test]
    fn full_resync_after_a_failed_write_repairs_without_a_new_event() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let desired = BTreeMap::from([(name("web"), vec![(web, spec("web", &[10, 11]))])]);
        e.maps.fail_next_write_to = Some(dataplane_common::map_names::BACKEND_SLOTS);
        let (_, errors) = e.sync_all(&desired);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(e.needs_resync());
        // What the agent does at its next tick, with the same state.
        let (_, errors) = e.sync_all(&desired);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!e.needs_resync());
        let mut got = programmed(e.maps(), &web).unwrap();
        got.sort();
        assert_eq!(got, vec![10, 11]);
    }

    fn draining(mut spec: FrontendSpec, draining: &[u8]) -> FrontendSpec {
        spec.draining = draining
            .iter()
            .map(|last| BackendAddr {
                ip: Ipv4Addr::new(10, 244, 1, *last).into(),
                port: 8080,
            })
            .collect();
        spec
    }

    fn backend_id(maps: &MemLbMaps, last: u8) -> Option<u32> {
        maps.state
            .backends
            .iter()
            .find(|(_, b)| dataplane_common::ipv4_from_map(b.addr)[3] == last)
            .map(|(id, _)| *id)
    }

    #[test]
    fn terminating_endpoint_keeps_its_backend_id_but_loses_its_slot() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        let id = backend_id(e.maps(), 10).unwrap();
        e.sync_service(&name("web"), &[(web, draining(spec("web", &[11]), &[10]))])
            .unwrap();
        assert_eq!(programmed(e.maps(), &web).unwrap(), vec![11]);
        assert_eq!(
            backend_id(e.maps(), 10),
            Some(id),
            "established flows keep their backend"
        );
        // Unchanged draining set: nothing rewritten.
        let writes = e.maps().writes;
        e.sync_service(&name("web"), &[(web, draining(spec("web", &[11]), &[10]))])
            .unwrap();
        assert_eq!(e.maps().writes, writes);
    }

    #[test]
    fn endpoint_leaving_every_slice_removes_its_backend() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        e.sync_service(&name("web"), &[(web, draining(spec("web", &[11]), &[10]))])
            .unwrap();
        e.sync_service(&name("web"), &[(web, spec("web", &[11]))])
            .unwrap();
        assert_eq!(backend_id(e.maps(), 10), None);
        assert_eq!(e.maps().state.backends.len(), 1);
        // A deleted service takes its draining backends along.
        e.sync_service(&name("web"), &[(web, draining(spec("web", &[11]), &[10]))])
            .unwrap();
        e.sync_service(&name("web"), &[]).unwrap();
        assert_eq!(e.maps().state, LbSnapshot::default());
    }

    #[test]
    fn restarted_agent_keeps_draining_backends_still_listed_and_drops_the_rest() {
        let mut first = engine();
        let web = frontend([10, 96, 0, 10], 80);
        first
            .sync_service(
                &name("web"),
                &[(web, draining(spec("web", &[11]), &[10, 12]))],
            )
            .unwrap();
        let id = backend_id(first.maps(), 10).unwrap();
        let maps = MemLbMaps {
            state: first.maps().state.clone(),
            ..Default::default()
        };
        let mut second = SyncEngine::adopt(maps).unwrap();
        assert_eq!(second.maps().state.backends.len(), 3, "nothing reset yet");
        assert!(second.needs_resync(), "a full sync settles what drains");
        // 12 has left every slice while no agent ran.
        let all = BTreeMap::from([(
            name("web"),
            vec![(web, draining(spec("web", &[11]), &[10]))],
        )]);
        let (_, errors) = second.sync_all(&all);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(backend_id(second.maps(), 10), Some(id));
        assert_eq!(backend_id(second.maps(), 12), None);
        assert!(!second.needs_resync());
        second
            .sync_service(&name("web"), &[(web, spec("web", &[11]))])
            .unwrap();
        assert_eq!(second.maps().state.backends.len(), 1);
    }

    #[test]
    fn full_sync_writes_the_whole_cluster_in_one_batch() {
        let mut e = engine();
        let all: BTreeMap<_, _> = (0..50u8)
            .map(|n| {
                let svc = format!("svc-{n}");
                let spec = spec(&svc, &[10, 11, 100 + n]);
                (name(&svc), vec![(frontend([10, 96, 1, n], 80), spec)])
            })
            .collect();
        let (_, errors) = e.sync_all(&all);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(e.maps().batches, 1);
        assert_eq!(e.maps().state.services.len(), 50);
        assert_eq!(e.maps().state.backends.len(), 52, "shared backends once");
    }

    #[test]
    fn a_large_full_sync_is_written_in_batches_of_whole_services() {
        let mut e = engine();
        let count = 2 * FULL_SYNC_BATCH_SERVICES + 10;
        let ip = |n: usize| [10, 96, (n >> 8) as u8, n as u8];
        let all = (0..count).map(|n| {
            let svc = format!("svc-{n}");
            // A backend all of them share, and one of 200 others.
            let spec = spec(&svc, &[10, 20 + (n % 200) as u8]);
            (name(&svc), vec![(frontend(ip(n), 80), spec)])
        });
        let (stats, errors) = e.sync_all(all);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(stats.frontends_changed, count);
        assert_eq!(e.maps().batches, 3);
        assert_eq!(e.maps().state.services.len(), count);
        assert_eq!(e.maps().state.backends.len(), 201);
        for n in [0, FULL_SYNC_BATCH_SERVICES, count - 1] {
            let mut got = programmed(e.maps(), &frontend(ip(n), 80)).unwrap();
            got.sort();
            assert_eq!(got, vec![10, 20 + (n % 200) as u8], "service {n}");
        }
        // A second full sync without the first batch's services removes
        // them, and only them.
        let kept = (FULL_SYNC_BATCH_SERVICES..count).map(|n| {
            let svc = format!("svc-{n}");
            let spec = spec(&svc, &[10, 20 + (n % 200) as u8]);
            (name(&svc), vec![(frontend(ip(n), 80), spec)])
        });
        let (stats, errors) = e.sync_all(kept);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(stats.frontends_removed, FULL_SYNC_BATCH_SERVICES);
        assert_eq!(stats.frontends_changed, 0);
        assert_eq!(
            e.maps().state.services.len(),
            count - FULL_SYNC_BATCH_SERVICES
        );
        assert_eq!(programmed(e.maps(), &frontend(ip(0), 80)), None);
    }

    #[test]
    fn backend_id_freed_in_a_sync_is_not_reused_by_the_same_sync() {
        // Port 80 loses its backend while port 443 gains another in one
        // sync. Had 443's backend taken the id 80's just gave up, the batch
        // would rewrite that id before port 80's slot stops pointing at it,
        // and new connections to port 80 would reach 443's backend.
        let mut e = engine();
        let http = frontend([10, 96, 0, 10], 80);
        let https = frontend([10, 96, 0, 10], 443);
        e.sync_service(
            &name("web"),
            &[(http, spec("web", &[10])), (https, spec("web", &[]))],
        )
        .unwrap();
        let old = backend_id(e.maps(), 10).unwrap();
        e.sync_service(
            &name("web"),
            &[(http, spec("web", &[])), (https, spec("web", &[11]))],
        )
        .unwrap();
        assert_ne!(backend_id(e.maps(), 11), Some(old));
        assert_eq!(backend_id(e.maps(), 10), None);
        // Once written, the id is free for the next sync.
        e.sync_service(
            &name("web"),
            &[(http, spec("web", &[12])), (https, spec("web", &[11]))],
        )
        .unwrap();
        assert_eq!(backend_id(e.maps(), 12), Some(old), "ids stay dense");
    }

    #[test]
    fn slot_blocks_split_merge_and_reserve_as_buddies() {
        let mut b = SlotBlocks::new();
        let a = b.allocate(4).unwrap();
        let c = b.allocate(4).unwrap();
        assert_eq!((a, c), (0, 16), "buddies side by side");
        assert!(b.fits(&[4, 0, 19]));
        b.release(a, 4);
        assert_eq!(b.allocate(4), Some(32), "not reused before the writes");
        b.settle();
        assert_eq!(b.allocate(4), Some(0));
        // Everything released merges back into one block.
        for (base, order) in [(0, 4), (16, 4), (32, 4)] {
            b.release(base, order);
        }
        b.settle();
        assert!(b.fits(&[20]));
        // Adopting a previous agent's blocks.
        let mut b = SlotBlocks::new();
        assert!(b.reserve(48, 4));
        assert!(!b.reserve(48, 4), "taken");
        assert!(!b.reserve(56, 3), "inside a taken block");
        assert!(!b.reserve(8, 4), "misaligned");
        let mut handed_out: Vec<u32> = (0..4).map(|_| b.allocate(4).unwrap()).collect();
        handed_out.sort();
        assert_eq!(handed_out, vec![0, 16, 32, 64], "all but the adopted 48");
    }

    #[test]
    fn frontend_outgrowing_its_slot_block_moves_whole_and_frees_the_old_one() {
        let mut e = engine();
        let web = frontend([10, 96, 0, 10], 80);
        let api = frontend([10, 96, 0, 11], 80);
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11]))])
            .unwrap();
        e.sync_service(&name("api"), &[(api, spec("api", &[20, 21]))])
            .unwrap();
        let old_base = e.maps().state.services[&key4(&web)].slot_base;
        e.sync_service(&name("web"), &[(web, spec("web", &[10, 11, 12]))])
            .unwrap();
        let value = e.maps().state.services[&key4(&web)];
        assert_ne!(
            value.slot_base, old_base,
            "two slots' block cannot hold three"
        );
        let mut got = programmed(e.maps(), &web).unwrap();
        got.sort();
        assert_eq!(got, vec![10, 11, 12]);
        assert_eq!(programmed(e.maps(), &api).unwrap(), vec![20, 21]);
        assert_eq!(e.maps().state.slots.len(), 5, "the old block was cleared");
        // Survivors keep their slot number (affinity remembers it).
        assert_eq!(&programmed(e.maps(), &web).unwrap()[..2], &[10, 11]);
    }

    #[test]
    fn restarted_agent_adopts_slot_blocks_and_allocates_around_them() {
        let mut first = engine();
        let web = frontend([10, 96, 0, 10], 80);
        first
            .sync_service(&name("web"), &[(web, spec("web", &[10, 11, 12]))])
            .unwrap();
        let maps = MemLbMaps {
            state: first.maps().state.clone(),
            ..Default::default()
        };
        let mut second = SyncEngine::adopt(maps).unwrap();
        let api = frontend([10, 96, 0, 11], 80);
        second
            .sync_service(&name("api"), &[(api, spec("api", &[20, 21, 22, 23]))])
            .unwrap();
        let mut got = programmed(second.maps(), &web).unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![10, 11, 12],
            "web's block was not handed out again"
        );
        assert_eq!(
            programmed(second.maps(), &api).unwrap(),
            vec![20, 21, 22, 23]
        );
    }

    #[test]
    fn slot_plan_keeps_survivors_and_fills_holes() {
        let b = |n: u32| {
            BackendKey::V4(Backend {
                addr: n,
                port: 0,
                proto: 6,
                flags: 0,
            })
        };
        assert_eq!(
            plan_slots(&[b(1), b(2), b(3)], &[b(1), b(3), b(4)]),
            vec![b(1), b(4), b(3)]
        );
        assert_eq!(plan_slots(&[b(1), b(2), b(3)], &[b(3)]), vec![b(3)]);
        assert_eq!(plan_slots(&[], &[b(1), b(2)]), vec![b(1), b(2)]);
    }

    fn external_spec(service: &str, backends: &[u8]) -> FrontendSpec {
        FrontendSpec {
            masquerade_remote: true,
            local_ips: vec![Ipv4Addr::new(10, 244, 1, 10).into()],
            ..spec(service, backends)
        }
    }

    #[test]
    fn node_port_is_one_entry_at_address_zero_and_node_addresses_are_flagged() {
        let mut e = engine();
        let node_port = Frontend::node_port(30080, Protocol::Tcp);
        e.set_node_addresses(&[Ipv4Addr::new(192, 168, 100, 1)])
            .unwrap();
        e.sync_service(
            &name("web"),
            &[(node_port, external_spec("web", &[10, 11]))],
        )
        .unwrap();
        let key = key4(&node_port);
        assert_eq!((key.addr, key.scope), (0, service_scope::EXTERNAL));
        let value = e.maps().state.services[&key];
        assert_eq!(value.flags, service_flags::MASQUERADE_REMOTE);
        // Address 0 is not a service IP; the node's address is, flagged.
        let node = ipv4_to_map([192, 168, 100, 1]);
        assert_eq!(
            e.maps()
                .state
                .service_ips
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![node]
        );
        assert_eq!(
            e.maps().state.service_ips[&node],
            service_ip_flags::NODE_ADDRESS
        );
        // The local endpoint is flagged so it is reached without SNAT.
        let mut flags: Vec<(u8, u8)> = e
            .maps()
            .state
            .backends
            .values()
            .map(|b| (dataplane_common::ipv4_from_map(b.addr)[3], b.flags))
            .collect();
        flags.sort();
        assert_eq!(flags, vec![(10, backend_flags::LOCAL), (11, 0)]);
        // A node address leaving drops the bit; nothing else is there.
        e.set_node_addresses(&[]).unwrap();
        assert!(e.maps().state.service_ips.is_empty());
    }

    #[test]
    fn external_ip_on_a_node_address_keeps_both_count_and_node_bit() {
        let mut e = engine();
        e.set_node_addresses(&[Ipv4Addr::new(192, 168, 100, 1)])
            .unwrap();
        let ext = Frontend {
            scope: Scope::External,
            ..frontend([192, 168, 100, 1], 80)
        };
        e.sync_service(&name("web"), &[(ext, external_spec("web", &[10]))])
            .unwrap();
        let node = ipv4_to_map([192, 168, 100, 1]);
        assert_eq!(
            e.maps().state.service_ips[&node],
            1 | service_ip_flags::NODE_ADDRESS
        );
        e.sync_service(&name("web"), &[]).unwrap();
        assert_eq!(
            e.maps().state.service_ips[&node],
            service_ip_flags::NODE_ADDRESS
        );
        // A restarted engine reads both back.
        let state = e.maps().state.clone();
        let mut again = SyncEngine::adopt(MemLbMaps {
            state,
            ..Default::default()
        })
        .unwrap();
        again
            .sync_service(&name("web"), &[(ext, external_spec("web", &[10]))])
            .unwrap();
        assert_eq!(
            again.maps().state.service_ips[&node],
            1 | service_ip_flags::NODE_ADDRESS
        );
    }

    #[test]
    fn type_change_and_deletion_release_external_frontends_at_once() {
        let mut e = engine();
        let cluster = frontend([10, 96, 0, 10], 80);
        let node_port = Frontend::node_port(30080, Protocol::Tcp);
        let lb = Frontend {
            scope: Scope::External,
            ..frontend([198, 51, 100, 10], 80)
        };
        e.sync_service(
            &name("web"),
            &[
                (cluster, spec("web", &[10])),
                (lb, external_spec("web", &[10])),
                (node_port, external_spec("web", &[10])),
            ],
        )
        .unwrap();
        assert_eq!(e.maps().state.services.len(), 3);
        // LoadBalancer -> ClusterIP: the external frontends go in the same sync.
        let stats = e
            .sync_service(&name("web"), &[(cluster, spec("web", &[10]))])
            .unwrap();
        assert_eq!(stats.frontends_removed, 2);
        assert!(programmed(e.maps(), &node_port).is_none());
        assert!(programmed(e.maps(), &lb).is_none());
        assert!(!e
            .maps()
            .state
            .service_ips
            .contains_key(&ipv4_to_map([198, 51, 100, 10])));
        // The freed node port can be taken by another service at once.
        e.sync_service(
            &name("other"),
            &[(node_port, external_spec("other", &[11]))],
        )
        .unwrap();
        assert_eq!(programmed(e.maps(), &node_port), Some(vec![11]));
        // Deletion releases everything.
        e.sync_service(&name("other"), &[]).unwrap();
        e.sync_service(&name("web"), &[]).unwrap();
        assert!(e.maps().state.services.is_empty());
        assert!(e.maps().state.backends.is_empty());
        assert!(e.maps().state.service_ips.is_empty());
    }

    #[test]
    fn node_port_of_two_services_conflicts() {
        let mut e = engine();
        let node_port = Frontend::node_port(30080, Protocol::Tcp);
        e.sync_service(&name("a"), &[(node_port, external_spec("a", &[10]))])
            .unwrap();
        let err = e
            .sync_service(&name("b"), &[(node_port, external_spec("b", &[11]))])
            .unwrap_err();
        assert!(matches!(err, SyncError::FrontendConflict { .. }), "{err}");
        // Same number, other protocol: a frontend of its own.
        let udp = Frontend::node_port(30080, Protocol::Udp);
        e.sync_service(&name("b"), &[(udp, external_spec("b", &[11]))])
            .unwrap();
    }

    #[test]
    fn source_ranges_are_written_before_their_flag_and_removed_with_the_frontend() {
        let mut e = engine();
        let lb = Frontend {
            scope: Scope::External,
            ..frontend([198, 51, 100, 10], 80)
        };
        let mut desired = external_spec("web", &[10]);
        desired.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
        e.sync_service(&name("web"), &[(lb, desired.clone())])
            .unwrap();
        let value = e.maps().state.services[&key4(&lb)];
        assert_ne!(value.flags & service_flags::SOURCE_RANGES, 0);
        assert_eq!(
            e.maps().state.source_ranges,
            vec![SourceRangeKey {
                prefix_len: 56,
                service_id_be: value.service_id.to_be(),
                addr: ipv4_to_map([203, 0, 113, 0]),
            }]
        );
        // Changing only the ranges rewrites them.
        desired.source_ranges = vec!["192.0.2.0/25".parse().unwrap()];
        e.sync_service(&name("web"), &[(lb, desired)]).unwrap();
        assert_eq!(e.maps().state.source_ranges.len(), 1);
        assert_eq!(e.maps().state.source_ranges[0].prefix_len, 57);
        e.sync_service(&name("web"), &[]).unwrap();
        assert!(e.maps().state.source_ranges.is_empty());
    }

    #[test]
    fn ipv6_source_ranges_go_to_their_own_trie_and_leave_with_the_frontend() {
        let mut e = engine();
        let lb = Frontend {
            ip: "2001:db8:51:100::a".parse::<Ipv6Addr>().unwrap().into(),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::External,
        };
        let mut desired = external_spec("web", &[]);
        desired.backends = vec![pod6(10)];
        desired.local_ips = Vec::new();
        desired.source_ranges6 = vec!["2001:db8:113::/48".parse().unwrap()];
        e.sync_service(&name("web"), &[(lb, desired)]).unwrap();
        let FrontendKey::V6(key) = service_key(&lb) else {
            panic!("an IPv6 frontend")
        };
        let value = e.maps().state.services6[&key];
        assert_ne!(value.flags & service_flags::SOURCE_RANGES, 0);
        assert!(e.maps().state.source_ranges.is_empty());
        assert_eq!(
            e.maps().state.source_ranges6,
            vec![SourceRange6Key {
                prefix_len: 32 + 48,
                service_id_be: value.service_id.to_be(),
                addr: "2001:db8:113::".parse::<Ipv6Addr>().unwrap().octets(),
            }]
        );
        e.sync_service(&name("web"), &[]).unwrap();
        assert!(e.maps().state.source_ranges6.is_empty());
    }

    #[test]
    fn ipv6_node_addresses_carry_the_node_bit_beside_the_ipv4_ones() {
        let mut e = engine();
        let v6: Ipv6Addr = "fd00:192:168:100::1".parse().unwrap();
        e.set_node_addresses(&[Ipv4Addr::new(192, 168, 100, 1)])
            .unwrap();
        e.set_node_addresses6(&[v6]).unwrap();
        assert_eq!(
            e.maps().state.service_ips6.get(&v6.octets()),
            Some(&service_ip_flags::NODE_ADDRESS)
        );
        assert_eq!(e.maps().state.service_ips.len(), 1, "IPv4 kept");
        e.set_node_addresses6(&[]).unwrap();
        assert!(e.maps().state.service_ips6.is_empty());
        assert_eq!(e.maps().state.service_ips.len(), 1, "IPv4 still kept");
    }
}
