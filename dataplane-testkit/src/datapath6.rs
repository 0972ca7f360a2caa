//! IPv6 frontends written straight into the pinned `LB6_*` maps and
//! `BACKEND_SLOTS`, for the datapath tests of the IPv6 programs (until the
//! sync engine writes them: then these go through it, as IPv4's do). Ids
//! and slot blocks come from ranges the sync engine's allocators do not
//! reach in a test.

use std::net::SocketAddrV6;

use aya::maps::{lpm_trie::Key as LpmKey, Array, HashMap as BpfHashMap, LpmTrie, Map, MapData};
use dataplane_common::{
    backend_flags, capacity, map_names, port_to_map, service_ip_flags, service_scope, Affinity6Key,
    AffinityEntry, Backend6, Ct6Entry, Ct6Key, Ipv6Bytes, Nat6Config, Nat6Entry, Nat6Key,
    NatConfig, ReplySource6, Service6Key, ServiceValue, IPPROTO_TCP,
};

use crate::datapath::{proto_number, Harness};
use dataplane_agent::control::model::Protocol;

/// First service id and slot of the IPv6 frontends tests write.
const SERVICE_ID_BASE: u32 = 900_000;
const SLOT_BASE: u32 = capacity::BACKEND_SLOTS - 65_536;
/// Slots each test frontend owns.
const SLOTS_PER_SERVICE: u32 = 64;

/// How a test IPv6 frontend is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frontend6Options {
    pub affinity_timeout_s: u32,
    /// Bits of `service_flags`.
    pub flags: u32,
}

fn open_pin(harness: &Harness, name: &str) -> MapData {
    MapData::from_pin(harness.bpffs().join(name))
        .unwrap_or_else(|e| panic!("opening the pinned {name} map: {e}"))
}

fn hash<K: aya::Pod, V: aya::Pod>(harness: &Harness, name: &str) -> BpfHashMap<MapData, K, V> {
    BpfHashMap::try_from(Map::HashMap(open_pin(harness, name)))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reply_source6_key(backend: SocketAddrV6) -> ReplySource6 {
    ReplySource6 {
        addr: backend.ip().octets(),
        port: port_to_map(backend.port()),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

fn lru<K: aya::Pod, V: aya::Pod>(harness: &Harness, name: &str) -> BpfHashMap<MapData, K, V> {
    BpfHashMap::try_from(Map::LruHashMap(open_pin(harness, name)))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn array<V: aya::Pod>(harness: &Harness, name: &str) -> Array<MapData, V> {
    Array::try_from(Map::Array(open_pin(harness, name))).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn ipv6_bytes(addr: &SocketAddrV6) -> Ipv6Bytes {
    addr.ip().octets()
}

/// Conntrack key of an IPv6 flow in the maps' byte order.
pub fn ct6_key(src: SocketAddrV6, dst: SocketAddrV6, proto: Protocol, direction: u8) -> Ct6Key {
    Ct6Key {
        src_addr: ipv6_bytes(&src),
        dst_addr: ipv6_bytes(&dst),
        src_port: port_to_map(src.port()),
        dst_port: port_to_map(dst.port()),
        proto: proto_number(proto),
        direction,
        _pad: [0; 2],
    }
}

/// `NAT6` key of an IPv6 tuple in the maps' byte order.
pub fn nat6_key(src: SocketAddrV6, dst: SocketAddrV6, proto: Protocol, direction: u8) -> Nat6Key {
    Nat6Key {
        src_addr: ipv6_bytes(&src),
        dst_addr: ipv6_bytes(&dst),
        src_port: port_to_map(src.port()),
        dst_port: port_to_map(dst.port()),
        proto: proto_number(proto),
        direction,
        _pad: [0; 2],
    }
}

/// A backend of an external IPv6 test frontend.
#[derive(Clone, Copy, Debug)]
pub struct Backend6Spec {
    pub addr: SocketAddrV6,
    /// Runs on this node (`backend_flags::LOCAL`).
    pub local: bool,
}

impl Harness {
    /// IPv6 external frontend number `index` (0.., shared with
    /// [`Harness::set_service6`]): a NodePort when `frontend`'s address is
    /// `::`, else a load-balancer IP or externalIP. Returns the service id.
    pub fn set_external6(
        &self,
        index: u32,
        frontend: SocketAddrV6,
        proto: Protocol,
        backends: &[Backend6Spec],
        first_backend_id: u32,
        options: Frontend6Options,
    ) -> u32 {
        let proto_number = proto_number(proto);
        let key = Service6Key {
            addr: ipv6_bytes(&frontend),
            port: port_to_map(frontend.port()),
            proto: proto_number,
            scope: service_scope::EXTERNAL,
        };
        let backends: Vec<Backend6> = backends
            .iter()
            .map(|b| Backend6 {
                addr: ipv6_bytes(&b.addr),
                port: port_to_map(b.addr.port()),
                proto: proto_number,
                flags: if b.local { backend_flags::LOCAL } else { 0 },
            })
            .collect();
        self.write_frontend6(index, key, &backends, first_backend_id, options)
    }

    /// Makes `addr` one of this node's addresses, on which IPv6 NodePorts
    /// are served.
    pub fn set_node_address6(&self, addr: std::net::Ipv6Addr) {
        let mut ips: BpfHashMap<MapData, Ipv6Bytes, u32> = hash(self, map_names::LB6_SERVICE_IPS);
        let value = ips.get(&addr.octets(), 0).unwrap_or(0);
        ips.insert(addr.octets(), value | service_ip_flags::NODE_ADDRESS, 0)
            .expect("writing LB6_SERVICE_IPS");
    }

    /// IPv6 SNAT address and the (shared) SNAT port range.
    pub fn set_snat6(&self, addr: std::net::Ipv6Addr, port_min: u16, port_max: u16) {
        let mut config: Array<MapData, NatConfig> = array(self, map_names::NAT_CONFIG);
        config
            .set(
                0,
                NatConfig {
                    snat_addr: 0,
                    port_min,
                    port_max,
                },
                0,
            )
            .expect("writing NAT_CONFIG");
        let mut config6: Array<MapData, Nat6Config> = array(self, map_names::NAT6_CONFIG);
        config6
            .set(
                0,
                Nat6Config {
                    snat_addr: addr.octets(),
                },
                0,
            )
            .expect("writing NAT6_CONFIG");
    }

    /// Admits IPv6 clients in `prefix/len` to service `service_id`'s
    /// frontends that have source ranges.
    pub fn add_source_range6(&self, service_id: u32, prefix: std::net::Ipv6Addr, len: u8) {
        let mut trie: LpmTrie<MapData, [u8; 20], u32> =
            LpmTrie::try_from(Map::LpmTrie(open_pin(self, map_names::SOURCE_RANGES6)))
                .expect("SOURCE_RANGES6 is an LPM trie");
        let mut data = [0u8; 20];
        data[..4].copy_from_slice(&service_id.to_be_bytes());
        data[4..].copy_from_slice(&prefix.octets());
        trie.insert(&LpmKey::new(32 + u32::from(len), data), 1, 0)
            .expect("writing SOURCE_RANGES6");
    }

    /// A copy of the `NAT6` entry at `key`.
    pub fn nat6_get(&self, key: &Nat6Key) -> Option<Nat6Entry> {
        let map: BpfHashMap<MapData, Nat6Key, Nat6Entry> = lru(self, map_names::NAT6);
        map.get(key, 0).ok()
    }

    /// The pinned `NAT6` map.
    pub fn nat6(&self) -> BpfHashMap<MapData, Nat6Key, Nat6Entry> {
        lru(self, map_names::NAT6)
    }

    /// Entries in `NAT6`.
    pub fn nat6_len(&self) -> usize {
        let map: BpfHashMap<MapData, Nat6Key, Nat6Entry> = lru(self, map_names::NAT6);
        map.keys().count()
    }

    /// IPv6 cluster-IP frontend number `index` (0..) at `frontend` with
    /// these backends (none: no endpoints), which get the `LB6_BACKENDS`
    /// ids `first_backend_id..`. Returns the service id.
    pub fn set_service6(
        &self,
        index: u32,
        frontend: SocketAddrV6,
        proto: Protocol,
        backends: &[SocketAddrV6],
        first_backend_id: u32,
        options: Frontend6Options,
    ) -> u32 {
        let proto = proto_number(proto);
        let key = Service6Key {
            addr: ipv6_bytes(&frontend),
            port: port_to_map(frontend.port()),
            proto,
            scope: service_scope::INTERNAL,
        };
        let backends: Vec<Backend6> = backends
            .iter()
            .map(|b| Backend6 {
                addr: ipv6_bytes(b),
                port: port_to_map(b.port()),
                proto,
                flags: 0,
            })
            .collect();
        self.write_frontend6(index, key, &backends, first_backend_id, options)
    }

    fn write_frontend6(
        &self,
        index: u32,
        key: Service6Key,
        backends: &[Backend6],
        first_backend_id: u32,
        options: Frontend6Options,
    ) -> u32 {
        let service_id = SERVICE_ID_BASE + index;
        let slot_base = SLOT_BASE + index * SLOTS_PER_SERVICE;
        let mut lb_backends: Array<MapData, Backend6> = array(self, map_names::LB6_BACKENDS);
        let mut slots: Array<MapData, u32> = array(self, map_names::BACKEND_SLOTS);
        // As the sync engine writes them with the backends.
        let mut sources: BpfHashMap<MapData, ReplySource6, u32> =
            hash(self, map_names::LB6_REPLY_SOURCES);
        for (i, backend) in backends.iter().enumerate() {
            for source in [
                ReplySource6::of(backend),
                ReplySource6::address(backend.addr),
            ] {
                if sources.get(&source, 0).is_err() {
                    sources
                        .insert(source, 1, 0)
                        .expect("writing LB6_REPLY_SOURCES");
                }
            }
            let id = first_backend_id + i as u32;
            lb_backends
                .set(id, *backend, 0)
                .expect("writing LB6_BACKENDS");
            slots
                .set(slot_base + i as u32, id, 0)
                .expect("writing BACKEND_SLOTS");
        }
        let mut services: BpfHashMap<MapData, Service6Key, ServiceValue> =
            hash(self, map_names::LB6_SERVICES);
        let value = ServiceValue {
            service_id,
            backend_count: backends.len() as u32,
            flags: options.flags,
            affinity_timeout_s: options.affinity_timeout_s,
            slot_base,
        };
        services
            .insert(key, value, 0)
            .expect("writing LB6_SERVICES");
        if key.addr != [0; 16] {
            let mut ips: BpfHashMap<MapData, Ipv6Bytes, u32> =
                hash(self, map_names::LB6_SERVICE_IPS);
            let count = ips.get(&key.addr, 0).unwrap_or(0);
            ips.insert(key.addr, count + 1, 0)
                .expect("writing LB6_SERVICE_IPS");
        }
        service_id
    }

    /// Removes IPv6 backend `id` (its slot stays; the datapath sees an
    /// unused id), as a backend deleted between two syncs.
    pub fn remove_backend6(&self, id: u32) {
        let mut lb_backends: Array<MapData, Backend6> = array(self, map_names::LB6_BACKENDS);
        lb_backends
            .set(id, Backend6::default(), 0)
            .expect("clearing LB6_BACKENDS");
    }

    /// `LB6_REPLY_SOURCES`' value for the TCP backend at `backend` (1: a
    /// backend, more: the pod interface learnt), if it has one.
    pub fn reply_source6(&self, backend: SocketAddrV6) -> Option<u32> {
        let map: BpfHashMap<MapData, ReplySource6, u32> = hash(self, map_names::LB6_REPLY_SOURCES);
        map.get(&reply_source6_key(backend), 0).ok()
    }

    /// `LB6_REPLY_SOURCES`' value for the address of `backend` as a whole
    /// (1 and the "no flows yet" bits), if it is a backend's.
    pub fn reply_address6(&self, backend: SocketAddrV6) -> Option<u32> {
        let map: BpfHashMap<MapData, ReplySource6, u32> = hash(self, map_names::LB6_REPLY_SOURCES);
        map.get(&ReplySource6::address(backend.ip().octets()), 0)
            .ok()
    }

    /// Writes `value` as `LB6_REPLY_SOURCES`' value of the address of
    /// `backend`, as the sync engine writes it.
    pub fn set_reply_address6(&self, backend: SocketAddrV6, value: u32) {
        let mut map: BpfHashMap<MapData, ReplySource6, u32> =
            hash(self, map_names::LB6_REPLY_SOURCES);
        map.insert(ReplySource6::address(backend.ip().octets()), value, 0)
            .expect("writing LB6_REPLY_SOURCES");
    }

    /// Removes the TCP backend at `backend` and its address from
    /// `LB6_REPLY_SOURCES`, as the sync engine does when the address's
    /// only backend leaves every service.
    pub fn remove_reply_source6(&self, backend: SocketAddrV6) {
        let mut map: BpfHashMap<MapData, ReplySource6, u32> =
            hash(self, map_names::LB6_REPLY_SOURCES);
        for key in [
            reply_source6_key(backend),
            ReplySource6::address(backend.ip().octets()),
        ] {
            map.remove(&key).expect("removing from LB6_REPLY_SOURCES");
        }
    }

    /// A copy of the IPv6 conntrack entry at `key`.
    pub fn ct6_get(&self, key: &Ct6Key) -> Option<Ct6Entry> {
        let map: BpfHashMap<MapData, Ct6Key, Ct6Entry> = lru(self, ct6_map_name(key));
        map.get(key, 0).ok()
    }

    /// Writes (or overwrites) the IPv6 conntrack entry at `key`.
    pub fn ct6_insert(&self, key: &Ct6Key, entry: &Ct6Entry) {
        let mut map: BpfHashMap<MapData, Ct6Key, Ct6Entry> = lru(self, ct6_map_name(key));
        map.insert(key, entry, 0)
            .expect("writing an IPv6 conntrack entry");
    }

    /// Removes the IPv6 conntrack entry at `key`, as LRU eviction would.
    pub fn ct6_remove(&self, key: &Ct6Key) {
        let mut map: BpfHashMap<MapData, Ct6Key, Ct6Entry> = lru(self, ct6_map_name(key));
        map.remove(key).expect("removing an IPv6 conntrack entry");
    }

    /// Entries in `CT6_TCP` and `CT6_OTHER`.
    pub fn ct6_len(&self) -> usize {
        [map_names::CT6_TCP, map_names::CT6_OTHER]
            .iter()
            .map(|name| {
                let map: BpfHashMap<MapData, Ct6Key, Ct6Entry> = lru(self, name);
                map.keys().count()
            })
            .sum()
    }

    /// The pinned `LB6_AFFINITY` map's entries.
    pub fn affinity6(&self) -> Vec<(Affinity6Key, AffinityEntry)> {
        let map: BpfHashMap<MapData, Affinity6Key, AffinityEntry> =
            lru(self, map_names::LB6_AFFINITY);
        map.iter()
            .map(|e| e.expect("reading LB6_AFFINITY"))
            .collect()
    }
}

/// The IPv6 conntrack map that holds `key`'s protocol.
fn ct6_map_name(key: &Ct6Key) -> &'static str {
    if key.proto == IPPROTO_TCP {
        map_names::CT6_TCP
    } else {
        map_names::CT6_OTHER
    }
}
