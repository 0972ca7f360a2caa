//! The load-balancing maps as the sync engine sees them: writes collected in
//! an [`LbWrites`] and applied together, behind a small trait so the engine
//! runs the same against the pinned BPF maps and against an in-memory double
//! in unit tests.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, MapError,
    },
    sys::SyscallError,
};
use dataplane_common::{
    map_names, Backend, Backend6, Ipv6Bytes, ReplySource, ReplySource6, Service6Key, ServiceKey,
    ServiceLabel, ServiceValue, SourceRange6Key, SourceRangeKey,
};

use crate::node::{
    map_batch,
    pinned::{self, MapOpenError},
};

/// A write to one of the load-balancing maps failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} in map {map} failed")]
pub struct LbMapError {
    pub map: &'static str,
    pub op: &'static str,
    /// Boxed: aya's error is large and every sync result carries this type.
    #[source]
    pub source: Box<MapError>,
}

/// Everything the load-balancing maps hold, read back at start-up so that a
/// restarted agent adopts what its predecessor programmed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LbSnapshot {
    pub service_ips: BTreeMap<u32, u32>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Slot index -> backend id, slots holding one only.
    pub slots: BTreeMap<u32, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub names: BTreeMap<u32, String>,
    pub source_ranges: Vec<SourceRangeKey>,
    /// `SOURCE_RANGES6`.
    pub source_ranges6: Vec<SourceRange6Key>,
    /// `REPLY_SOURCES`, derived from the backends.
    pub reply_sources: BTreeMap<ReplySource, u32>,
    /// `LB6_REPLY_SOURCES`, likewise.
    pub reply_sources6: BTreeMap<ReplySource6, u32>,
    /// `LB6_SERVICE_IPS`, `LB6_SERVICES`, `LB6_BACKENDS` (ids of their own;
    /// slots and service ids shared with IPv4).
    pub service_ips6: BTreeMap<Ipv6Bytes, u32>,
    pub services6: BTreeMap<Service6Key, ServiceValue>,
    pub backends6: BTreeMap<u32, Backend6>,
}

/// Pending writes of one map, in the order they were made: `Some` sets the
/// key, `None` deletes it.
#[derive(Debug)]
pub struct MapWrites<K, V>(Vec<(K, Option<V>)>);

impl<K, V> Default for MapWrites<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Copy + Ord, V: Copy> MapWrites<K, V> {
    fn push(&mut self, key: K, value: Option<V>) {
        self.0.push((key, value));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The last write of each key: (keys and values to set, keys to delete).
    pub fn settled(&self) -> (Vec<K>, Vec<V>, Vec<K>) {
        let mut last: Vec<&(K, Option<V>)> = self.0.iter().collect();
        // Stable: of equal keys the later write stays later.
        last.sort_by_key(|(k, _)| *k);
        let (mut set_keys, mut set_values, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (key, value)) in last.iter().enumerate() {
            if last.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            match value {
                Some(v) => {
                    set_keys.push(*key);
                    set_values.push(*v);
                }
                None => deletes.push(*key),
            }
        }
        (set_keys, set_values, deletes)
    }
}

/// Writes to the load-balancing maps, collected while the engine works out a
/// sync and then applied at once (one batch per map and kind). Only the last
/// write of each key is applied, in this order, which never shows the
/// datapath a slot without its backend or a count without its slots:
///
/// 1. sets: reply sources, backends, slots, service names, source ranges,
///    services, service IPs (a range is in place before the service flag
///    that enables it; a backend's replies are translated before any flow
///    can reach it);
/// 2. deletes: services, service IPs, slots, backends, reply sources,
///    service names, source ranges (removed after the flag).
///
/// Each IPv6 map is written with its IPv4 counterpart.
///
/// The engine does not reuse a backend or service id released in the same
/// batch, so no set of an id is applied before the delete of its old use.
#[derive(Debug, Default)]
pub struct LbWrites {
    pub service_ips: MapWrites<u32, u32>,
    pub services: MapWrites<ServiceKey, ServiceValue>,
    pub slots: MapWrites<u32, u32>,
    pub backends: MapWrites<u32, Backend>,
    pub names: MapWrites<u32, ServiceLabel>,
    pub source_ranges: MapWrites<SourceRangeKey, ()>,
    pub source_ranges6: MapWrites<SourceRange6Key, ()>,
    pub reply_sources: MapWrites<ReplySource, u32>,
    pub reply_sources6: MapWrites<ReplySource6, u32>,
    pub service_ips6: MapWrites<Ipv6Bytes, u32>,
    pub services6: MapWrites<Service6Key, ServiceValue>,
    pub backends6: MapWrites<u32, Backend6>,
}

impl LbWrites {
    pub fn set_service_ip6(&mut self, addr: Ipv6Bytes, port_count: u32) {
        self.service_ips6.push(addr, Some(port_count));
    }
    pub fn remove_service_ip6(&mut self, addr: Ipv6Bytes) {
        self.service_ips6.push(addr, None);
    }
    pub fn set_service6(&mut self, key: Service6Key, value: ServiceValue) {
        self.services6.push(key, Some(value));
    }
    pub fn remove_service6(&mut self, key: Service6Key) {
        self.services6.push(key, None);
    }
    pub fn set_backend6(&mut self, id: u32, backend: Backend6) {
        self.backends6.push(id, Some(backend));
    }
    pub fn remove_backend6(&mut self, id: u32) {
        self.backends6.push(id, None);
    }
    pub fn set_service_ip(&mut self, addr: u32, port_count: u32) {
        self.service_ips.push(addr, Some(port_count));
    }
    pub fn remove_service_ip(&mut self, addr: u32) {
        self.service_ips.push(addr, None);
    }
    pub fn set_service(&mut self, key: ServiceKey, value: ServiceValue) {
        self.services.push(key, Some(value));
    }
    pub fn remove_service(&mut self, key: ServiceKey) {
        self.services.push(key, None);
    }
    pub fn set_slot(&mut self, index: u32, backend_id: u32) {
        self.slots.push(index, Some(backend_id));
    }
    pub fn remove_slot(&mut self, index: u32) {
        self.slots.push(index, None);
    }
    pub fn set_backend(&mut self, id: u32, backend: Backend) {
        self.backends.push(id, Some(backend));
    }
    pub fn remove_backend(&mut self, id: u32) {
        self.backends.push(id, None);
    }
    pub fn set_service_name(&mut self, service_id: u32, label: &str) {
        self.names.push(service_id, Some(ServiceLabel::new(label)));
    }
    pub fn remove_service_name(&mut self, service_id: u32) {
        self.names.push(service_id, None);
    }
    pub fn set_source_range(&mut self, key: SourceRangeKey) {
        self.source_ranges.push(key, Some(()));
    }
    pub fn remove_source_range(&mut self, key: SourceRangeKey) {
        self.source_ranges.push(key, None);
    }
    pub fn set_source_range6(&mut self, key: SourceRange6Key) {
        self.source_ranges6.push(key, Some(()));
    }
    pub fn remove_source_range6(&mut self, key: SourceRange6Key) {
        self.source_ranges6.push(key, None);
    }
    /// `value`: a `reply_source_flags` value (`FRESH` or `MAY_HAVE_FLOWS`).
    pub fn set_reply_source(&mut self, key: ReplySource, value: u32) {
        self.reply_sources.push(key, Some(value));
    }
    pub fn remove_reply_source(&mut self, key: ReplySource) {
        self.reply_sources.push(key, None);
    }
    /// As [`LbWrites::set_reply_source`]: the same value format.
    pub fn set_reply_source6(&mut self, key: ReplySource6, value: u32) {
        self.reply_sources6.push(key, Some(value));
    }
    pub fn remove_reply_source6(&mut self, key: ReplySource6) {
        self.reply_sources6.push(key, None);
    }

    pub fn is_empty(&self) -> bool {
        self.service_ips.is_empty()
            && self.services.is_empty()
            && self.slots.is_empty()
            && self.backends.is_empty()
            && self.names.is_empty()
            && self.source_ranges.is_empty()
            && self.source_ranges6.is_empty()
            && self.reply_sources.is_empty()
            && self.reply_sources6.is_empty()
            && self.service_ips6.is_empty()
            && self.services6.is_empty()
            && self.backends6.is_empty()
    }
}

pub trait LbMaps {
    /// Applies `writes` in the order [`LbWrites`] describes. On an error
    /// the writes before it stay applied.
    fn write(&mut self, writes: &LbWrites) -> Result<(), LbMapError>;
    fn snapshot(&self) -> Result<LbSnapshot, LbMapError>;
}

/// The pinned BPF maps, by file descriptor: every write and read goes
/// through [`map_batch`], a batch per call. Opening still goes through
/// aya's typed maps, which check each map's type and key and value sizes.
pub struct BpfLbMaps {
    service_ips: OwnedFd,
    services: OwnedFd,
    slots: OwnedFd,
    backends: OwnedFd,
    names: OwnedFd,
    reply_sources: OwnedFd,
    reply_sources6: OwnedFd,
    service_ips6: OwnedFd,
    services6: OwnedFd,
    backends6: OwnedFd,
    /// An LPM trie has no batch operations: written key by key.
    source_ranges: LpmTrie<MapData, [u32; 2], u32>,
    /// `SOURCE_RANGES6`, likewise.
    source_ranges6: LpmTrie<MapData, [u8; 20], u32>,
    /// The maps as aya opened them, kept open while these are used.
    /// Programs loaded after the maps left the object (the socket hooks)
    /// were relocated against aya's descriptor numbers: closing those
    /// would let a number name another map by the time they load.
    _opened: Vec<Box<dyn std::any::Any + Send>>,
}

/// The trie's key: the prefix length, then the data it covers (service id
/// and address, both network order).
fn lpm_key(key: &SourceRangeKey) -> LpmKey<[u32; 2]> {
    LpmKey::new(key.prefix_len, [key.service_id_be, key.addr])
}

/// The IPv6 trie's key: the prefix length, then the service id and the
/// address.
fn lpm_key6(key: &SourceRange6Key) -> LpmKey<[u8; 20]> {
    let mut data = [0u8; 20];
    data[..4].copy_from_slice(&key.service_id_be.to_ne_bytes());
    data[4..].copy_from_slice(&key.addr);
    LpmKey::new(key.prefix_len, data)
}

/// A second descriptor of `map`, once aya has checked it is a `T` (type,
/// key and value sizes); aya's own is kept in `opened`.
fn checked_fd<T>(
    name: &'static str,
    map: Map,
    opened: &mut Vec<Box<dyn std::any::Any + Send>>,
) -> Result<OwnedFd, MapOpenError>
where
    T: TryFrom<Map, Error = MapError> + Send + 'static,
{
    let type_err = |source| MapOpenError::Type {
        name,
        source: Box::new(source),
    };
    let fd = match &map {
        Map::HashMap(data) | Map::Array(data) => data.fd().as_fd().try_clone_to_owned(),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither a hash nor an array map",
        )),
    }
    .map_err(|e| type_err(MapError::IoError(e)))?;
    opened.push(Box::new(T::try_from(map).map_err(type_err)?));
    Ok(fd)
}

type ServiceIpsMap = HashMap<MapData, u32, u32>;
type ServicesMap = HashMap<MapData, ServiceKey, ServiceValue>;
type SlotsMap = Array<MapData, u32>;
type BackendsMap = Array<MapData, Backend>;
type NamesMap = HashMap<MapData, u32, ServiceLabel>;
type ReplySourcesMap = HashMap<MapData, ReplySource, u32>;
type ReplySources6Map = HashMap<MapData, ReplySource6, u32>;
type ServiceIps6Map = HashMap<MapData, Ipv6Bytes, u32>;
type Services6Map = HashMap<MapData, Service6Key, ServiceValue>;
type Backends6Map = Array<MapData, Backend6>;

impl BpfLbMaps {
    /// The maps a running (or stopped) agent pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapOpenError> {
        let open = |name| pinned::open_map(dir, name);
        let mut opened = Vec::new();
        Ok(Self {
            service_ips: checked_fd::<ServiceIpsMap>(
                map_names::SERVICE_IPS,
                open(map_names::SERVICE_IPS)?,
                &mut opened,
            )?,
            services: checked_fd::<ServicesMap>(
                map_names::SERVICES,
                open(map_names::SERVICES)?,
                &mut opened,
            )?,
            slots: checked_fd::<SlotsMap>(
                map_names::BACKEND_SLOTS,
                open(map_names::BACKEND_SLOTS)?,
                &mut opened,
            )?,
            backends: checked_fd::<BackendsMap>(
                map_names::BACKENDS,
                open(map_names::BACKENDS)?,
                &mut opened,
            )?,
            names: checked_fd::<NamesMap>(
                map_names::SERVICE_NAMES,
                open(map_names::SERVICE_NAMES)?,
                &mut opened,
            )?,
            reply_sources: checked_fd::<ReplySourcesMap>(
                map_names::REPLY_SOURCES,
                open(map_names::REPLY_SOURCES)?,
                &mut opened,
            )?,
            reply_sources6: checked_fd::<ReplySources6Map>(
                map_names::LB6_REPLY_SOURCES,
                open(map_names::LB6_REPLY_SOURCES)?,
                &mut opened,
            )?,
            service_ips6: checked_fd::<ServiceIps6Map>(
                map_names::LB6_SERVICE_IPS,
                open(map_names::LB6_SERVICE_IPS)?,
                &mut opened,
            )?,
            services6: checked_fd::<Services6Map>(
                map_names::LB6_SERVICES,
                open(map_names::LB6_SERVICES)?,
                &mut opened,
            )?,
            backends6: checked_fd::<Backends6Map>(
                map_names::LB6_BACKENDS,
                open(map_names::LB6_BACKENDS)?,
                &mut opened,
            )?,
            source_ranges: pinned::open(dir, map_names::SOURCE_RANGES)?,
            source_ranges6: pinned::open(dir, map_names::SOURCE_RANGES6)?,
            _opened: opened,
        })
    }

    /// The maps of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapOpenError> {
        let mut take = |name| ebpf.take_map(name).ok_or(MapOpenError::Missing { name });
        let mut opened = Vec::new();
        Ok(Self {
            service_ips: checked_fd::<ServiceIpsMap>(
                map_names::SERVICE_IPS,
                take(map_names::SERVICE_IPS)?,
                &mut opened,
            )?,
            services: checked_fd::<ServicesMap>(
                map_names::SERVICES,
                take(map_names::SERVICES)?,
                &mut opened,
            )?,
            slots: checked_fd::<SlotsMap>(
                map_names::BACKEND_SLOTS,
                take(map_names::BACKEND_SLOTS)?,
                &mut opened,
            )?,
            backends: checked_fd::<BackendsMap>(
                map_names::BACKENDS,
                take(map_names::BACKENDS)?,
                &mut opened,
            )?,
            names: checked_fd::<NamesMap>(
                map_names::SERVICE_NAMES,
                take(map_names::SERVICE_NAMES)?,
                &mut opened,
            )?,
            reply_sources: checked_fd::<ReplySourcesMap>(
                map_names::REPLY_SOURCES,
                take(map_names::REPLY_SOURCES)?,
                &mut opened,
            )?,
            reply_sources6: checked_fd::<ReplySources6Map>(
                map_names::LB6_REPLY_SOURCES,
                take(map_names::LB6_REPLY_SOURCES)?,
                &mut opened,
            )?,
            service_ips6: checked_fd::<ServiceIps6Map>(
                map_names::LB6_SERVICE_IPS,
                take(map_names::LB6_SERVICE_IPS)?,
                &mut opened,
            )?,
            services6: checked_fd::<Services6Map>(
                map_names::LB6_SERVICES,
                take(map_names::LB6_SERVICES)?,
                &mut opened,
            )?,
            backends6: checked_fd::<Backends6Map>(
                map_names::LB6_BACKENDS,
                take(map_names::LB6_BACKENDS)?,
                &mut opened,
            )?,
            source_ranges: pinned::take(ebpf, map_names::SOURCE_RANGES)?,
            source_ranges6: pinned::take(ebpf, map_names::SOURCE_RANGES6)?,
            _opened: opened,
        })
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(std::io::Error) -> LbMapError {
    move |io_error| LbMapError {
        map,
        op,
        source: Box::new(MapError::SyscallError(SyscallError { call: op, io_error })),
    }
}

fn lpm_err(op: &'static str) -> impl FnOnce(MapError) -> LbMapError {
    move |source| LbMapError {
        map: map_names::SOURCE_RANGES,
        op,
        source: Box::new(source),
    }
}

/// Sets what `writes` sets in the hash map `fd`.
fn hash_sets<K: aya::Pod + Ord, V: aya::Pod>(
    fd: &OwnedFd,
    map: &'static str,
    writes: &MapWrites<K, V>,
) -> Result<Vec<K>, LbMapError> {
    let (keys, values, deletes) = writes.settled();
    map_batch::update(fd.as_fd(), &keys, &values).map_err(err(map, "BPF_MAP_UPDATE_BATCH"))?;
    Ok(deletes)
}

fn hash_deletes<K: aya::Pod>(
    fd: &OwnedFd,
    map: &'static str,
    keys: &[K],
) -> Result<(), LbMapError> {
    map_batch::delete(fd.as_fd(), keys).map_err(err(map, "BPF_MAP_DELETE_BATCH"))
}

impl LbMaps for BpfLbMaps {
    fn write(&mut self, w: &LbWrites) -> Result<(), LbMapError> {
        let source_deletes = hash_sets(
            &self.reply_sources,
            map_names::REPLY_SOURCES,
            &w.reply_sources,
        )?;
        let source6_deletes = hash_sets(
            &self.reply_sources6,
            map_names::LB6_REPLY_SOURCES,
            &w.reply_sources6,
        )?;
        // BACKENDS and BACKEND_SLOTS are arrays: deleting is writing the
        // all-zero value, which the datapath treats as absent.
        let (ids, backends, gone) = w.backends.settled();
        map_batch::update(self.backends.as_fd(), &ids, &backends)
            .map_err(err(map_names::BACKENDS, "BPF_MAP_UPDATE_BATCH"))?;
        let (ids6, backends6, gone6) = w.backends6.settled();
        map_batch::update(self.backends6.as_fd(), &ids6, &backends6)
            .map_err(err(map_names::LB6_BACKENDS, "BPF_MAP_UPDATE_BATCH"))?;
        let (slots, slot_ids, slots_gone) = w.slots.settled();
        map_batch::update(self.slots.as_fd(), &slots, &slot_ids)
            .map_err(err(map_names::BACKEND_SLOTS, "BPF_MAP_UPDATE_BATCH"))?;
        let name_deletes = hash_sets(&self.names, map_names::SERVICE_NAMES, &w.names)?;
        let (ranges, _, ranges_gone) = w.source_ranges.settled();
        for key in &ranges {
            self.source_ranges
                .insert(&lpm_key(key), 1, 0)
                .map_err(lpm_err("insert"))?;
        }
        let (ranges6, _, ranges6_gone) = w.source_ranges6.settled();
        for key in &ranges6 {
            self.source_ranges6
                .insert(&lpm_key6(key), 1, 0)
                .map_err(lpm_err("insert"))?;
        }
        let service_deletes = hash_sets(&self.services, map_names::SERVICES, &w.services)?;
        let service6_deletes = hash_sets(&self.services6, map_names::LB6_SERVICES, &w.services6)?;
        let ip_deletes = hash_sets(&self.service_ips, map_names::SERVICE_IPS, &w.service_ips)?;
        let ip6_deletes = hash_sets(
            &self.service_ips6,
            map_names::LB6_SERVICE_IPS,
            &w.service_ips6,
        )?;

        hash_deletes(&self.services, map_names::SERVICES, &service_deletes)?;
        hash_deletes(&self.services6, map_names::LB6_SERVICES, &service6_deletes)?;
        hash_deletes(&self.service_ips, map_names::SERVICE_IPS, &ip_deletes)?;
        hash_deletes(&self.service_ips6, map_names::LB6_SERVICE_IPS, &ip6_deletes)?;
        map_batch::update(
            self.slots.as_fd(),
            &slots_gone,
            &vec![0u32; slots_gone.len()],
        )
        .map_err(err(map_names::BACKEND_SLOTS, "BPF_MAP_UPDATE_BATCH"))?;
        let zeros = vec![Backend::default(); gone.len()];
        map_batch::update(self.backends.as_fd(), &gone, &zeros)
            .map_err(err(map_names::BACKENDS, "BPF_MAP_UPDATE_BATCH"))?;
        hash_deletes(
            &self.reply_sources,
            map_names::REPLY_SOURCES,
            &source_deletes,
        )?;
        let zeros6 = vec![Backend6::default(); gone6.len()];
        map_batch::update(self.backends6.as_fd(), &gone6, &zeros6)
            .map_err(err(map_names::LB6_BACKENDS, "BPF_MAP_UPDATE_BATCH"))?;
        hash_deletes(
            &self.reply_sources6,
            map_names::LB6_REPLY_SOURCES,
            &source6_deletes,
        )?;
        hash_deletes(&self.names, map_names::SERVICE_NAMES, &name_deletes)?;
        for key in &ranges_gone {
            match self.source_ranges.remove(&lpm_key(key)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(lpm_err("delete")(e)),
            }
        }
        for key in &ranges6_gone {
            match self.source_ranges6.remove(&lpm_key6(key)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(lpm_err("delete")(e)),
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<LbSnapshot, LbMapError> {
        let read = |map| err(map, "BPF_MAP_LOOKUP_BATCH");
        let mut snap = LbSnapshot::default();
        for key in self.source_ranges.keys() {
            let key = key.map_err(lpm_err("iterate"))?;
            let [service_id_be, addr] = key.data();
            snap.source_ranges.push(SourceRangeKey {
                prefix_len: key.prefix_len(),
                service_id_be,
                addr,
            });
        }
        for key in self.source_ranges6.keys() {
            let key = key.map_err(lpm_err("iterate"))?;
            let data = key.data();
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&data[4..]);
            snap.source_ranges6.push(SourceRange6Key {
                prefix_len: key.prefix_len(),
                service_id_be: u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
                addr,
            });
        }
        for (k, v) in map_batch::lookup_all::<u32, ServiceLabel>(self.names.as_fd())
            .map_err(read(map_names::SERVICE_NAMES))?
        {
            snap.names.insert(k, v.as_str().to_owned());
        }
        snap.service_ips = map_batch::lookup_all(self.service_ips.as_fd())
            .map_err(read(map_names::SERVICE_IPS))?
            .into_iter()
            .collect();
        snap.services = map_batch::lookup_all(self.services.as_fd())
            .map_err(read(map_names::SERVICES))?
            .into_iter()
            .collect();
        snap.slots = map_batch::lookup_all::<u32, u32>(self.slots.as_fd())
            .map_err(read(map_names::BACKEND_SLOTS))?
            .into_iter()
            .filter(|(_, id)| *id != 0)
            .collect();
        snap.backends = map_batch::lookup_all::<u32, Backend>(self.backends.as_fd())
            .map_err(read(map_names::BACKENDS))?
            .into_iter()
            .filter(|(_, b)| *b != Backend::default())
            .collect();
        snap.reply_sources = map_batch::lookup_all(self.reply_sources.as_fd())
            .map_err(read(map_names::REPLY_SOURCES))?
            .into_iter()
            .collect();
        snap.reply_sources6 = map_batch::lookup_all(self.reply_sources6.as_fd())
            .map_err(read(map_names::LB6_REPLY_SOURCES))?
            .into_iter()
            .collect();
        snap.service_ips6 = map_batch::lookup_all(self.service_ips6.as_fd())
            .map_err(read(map_names::LB6_SERVICE_IPS))?
            .into_iter()
            .collect();
        snap.services6 = map_batch::lookup_all(self.services6.as_fd())
            .map_err(read(map_names::LB6_SERVICES))?
            .into_iter()
            .collect();
        snap.backends6 = map_batch::lookup_all::<u32, Backend6>(self.backends6.as_fd())
            .map_err(read(map_names::LB6_BACKENDS))?
            .into_iter()
            .filter(|(_, b)| *b != Backend6::default())
            .collect();
        Ok(snap)
    }
}

/// In-memory maps that count every write, for unit tests of the engine.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemLbMaps {
    pub state: LbSnapshot,
    /// Entries written.
    pub writes: usize,
    /// Calls of `LbMaps::write`.
    pub batches: usize,
    /// Fails the next batch of writes to this map, once.
    pub fail_next_write_to: Option<&'static str>,
}

#[cfg(test)]
impl MemLbMaps {
    fn check(&mut self, map: &'static str, entries: usize) -> Result<(), LbMapError> {
        if entries > 0 && self.fail_next_write_to == Some(map) {
            self.fail_next_write_to = None;
            return Err(LbMapError {
                map,
                op: "insert",
                source: Box::new(MapError::KeyNotFound),
            });
        }
        self.writes += entries;
        Ok(())
    }

    fn sets<K: Copy + Ord, V: Copy, SK: Ord, SV>(
        &mut self,
        map: &'static str,
        writes: &MapWrites<K, V>,
        state: impl Fn(&mut LbSnapshot) -> &mut BTreeMap<SK, SV>,
        convert: impl Fn(K, V) -> (SK, SV),
    ) -> Result<Vec<K>, LbMapError> {
        let (keys, values, deletes) = writes.settled();
        self.check(map, keys.len())?;
        for (k, v) in keys.into_iter().zip(values) {
            let (k, v) = convert(k, v);
            state(&mut self.state).insert(k, v);
        }
        Ok(deletes)
    }

    fn deletes<K: Copy, SK: Ord, SV>(
        &mut self,
        map: &'static str,
        keys: &[K],
        state: impl Fn(&mut LbSnapshot) -> &mut BTreeMap<SK, SV>,
        convert: impl Fn(K) -> SK,
    ) -> Result<(), LbMapError> {
        self.check(map, keys.len())?;
        for k in keys {
            state(&mut self.state).remove(&convert(*k));
        }
        Ok(())
    }
}

#[cfg(test)]
impl LbMaps for MemLbMaps {
    fn write(&mut self, w: &LbWrites) -> Result<(), LbMapError> {
        self.batches += 1;
        fn same<K, V>(k: K, v: V) -> (K, V) {
            (k, v)
        }
        let sources = self.sets(
            map_names::REPLY_SOURCES,
            &w.reply_sources,
            |s| &mut s.reply_sources,
            same,
        )?;
        let sources6 = self.sets(
            map_names::LB6_REPLY_SOURCES,
            &w.reply_sources6,
            |s| &mut s.reply_sources6,
            same,
        )?;
        let backends = self.sets(map_names::BACKENDS, &w.backends, |s| &mut s.backends, same)?;
        let backends6 = self.sets(
            map_names::LB6_BACKENDS,
            &w.backends6,
            |s| &mut s.backends6,
            same,
        )?;
        let slots = self.sets(map_names::BACKEND_SLOTS, &w.slots, |s| &mut s.slots, same)?;
        let names = self.sets(
            map_names::SERVICE_NAMES,
            &w.names,
            |s| &mut s.names,
            |k, v: ServiceLabel| (k, v.as_str().to_owned()),
        )?;
        let (ranges, _, ranges_gone) = w.source_ranges.settled();
        self.check(map_names::SOURCE_RANGES, ranges.len())?;
        for key in ranges {
            if !self.state.source_ranges.contains(&key) {
                self.state.source_ranges.push(key);
            }
        }
        let services = self.sets(map_names::SERVICES, &w.services, |s| &mut s.services, same)?;
        let services6 = self.sets(
            map_names::LB6_SERVICES,
            &w.services6,
            |s| &mut s.services6,
            same,
        )?;
        let ips = self.sets(
            map_names::SERVICE_IPS,
            &w.service_ips,
            |s| &mut s.service_ips,
            same,
        )?;
        let ips6 = self.sets(
            map_names::LB6_SERVICE_IPS,
            &w.service_ips6,
            |s| &mut s.service_ips6,
            same,
        )?;
        self.deletes(map_names::SERVICES, &services, |s| &mut s.services, |k| k)?;
        self.deletes(
            map_names::LB6_SERVICES,
            &services6,
            |s| &mut s.services6,
            |k| k,
        )?;
        self.deletes(map_names::SERVICE_IPS, &ips, |s| &mut s.service_ips, |k| k)?;
        self.deletes(
            map_names::LB6_SERVICE_IPS,
            &ips6,
            |s| &mut s.service_ips6,
            |k| k,
        )?;
        self.deletes(map_names::BACKEND_SLOTS, &slots, |s| &mut s.slots, |k| k)?;
        self.deletes(map_names::BACKENDS, &backends, |s| &mut s.backends, |k| k)?;
        self.deletes(
            map_names::REPLY_SOURCES,
            &sources,
            |s| &mut s.reply_sources,
            |k| k,
        )?;
        self.deletes(
            map_names::LB6_BACKENDS,
            &backends6,
            |s| &mut s.backends6,
            |k| k,
        )?;
        self.deletes(
            map_names::LB6_REPLY_SOURCES,
            &sources6,
            |s| &mut s.reply_sources6,
            |k| k,
        )?;
        self.deletes(map_names::SERVICE_NAMES, &names, |s| &mut s.names, |k| k)?;
        self.check(map_names::SOURCE_RANGES, ranges_gone.len())?;
        self.state
            .source_ranges
            .retain(|k| !ranges_gone.contains(k));
        let (ranges6, _, ranges6_gone) = w.source_ranges6.settled();
        self.check(
            map_names::SOURCE_RANGES6,
            ranges6.len() + ranges6_gone.len(),
        )?;
        for key in ranges6 {
            if !self.state.source_ranges6.contains(&key) {
                self.state.source_ranges6.push(key);
            }
        }
        self.state
            .source_ranges6
            .retain(|k| !ranges6_gone.contains(k));
        Ok(())
    }

    fn snapshot(&self) -> Result<LbSnapshot, LbMapError> {
        Ok(self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_write_of_each_key_is_applied() {
        let mut w = MapWrites::<u32, u32>::default();
        w.push(1, Some(10));
        w.push(2, Some(20));
        w.push(1, None);
        w.push(3, None);
        w.push(3, Some(30));
        w.push(2, Some(21));
        assert_eq!(w.settled(), (vec![2, 3], vec![21, 30], vec![1]));
    }

    #[test]
    fn slots_are_set_before_the_service_that_counts_them_and_deleted_after() {
        // A frontend shrinking from two backends to one, and a second one
        // removed, in one batch.
        let mut maps = MemLbMaps::default();
        let key = ServiceKey {
            addr: 1,
            port: 80,
            proto: 6,
            scope: 0,
        };
        let backend = Backend {
            addr: 7,
            port: 8080,
            proto: 6,
            flags: 0,
        };
        let mut w = LbWrites::default();
        w.set_backend(1, backend);
        w.set_slot(0, 1);
        w.set_slot(1, 1);
        w.set_service(
            key,
            ServiceValue {
                service_id: 1,
                backend_count: 2,
                ..Default::default()
            },
        );
        maps.write(&w).unwrap();
        // The slot deleted in the same batch as the count drops: a failure
        // on BACKEND_SLOTS leaves the lower count already written.
        let mut w = LbWrites::default();
        w.set_service(
            key,
            ServiceValue {
                service_id: 1,
                backend_count: 1,
                ..Default::default()
            },
        );
        w.remove_slot(1);
        maps.fail_next_write_to = Some(map_names::BACKEND_SLOTS);
        assert!(maps.write(&w).is_err());
        assert_eq!(maps.state.services[&key].backend_count, 1);
        assert_eq!(maps.state.slots.len(), 2, "the slot outlives the count");
        maps.write(&w).unwrap();
        assert_eq!(maps.state.slots.len(), 1);
    }
}
