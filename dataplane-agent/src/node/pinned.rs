//! The one reader of the datapath's maps: opening them, pinned under a
//! bpffs directory or fresh out of the loaded object, and decoding what they
//! hold (addresses, protocols, service labels, counters, timestamps).
//! `inspect`, `monitor`, the metrics, the conntrack GC and the sync engine's
//! adoption of a previous agent's maps all go through here.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use dataplane_common::{
    ipv4_from_map, map_names, port_from_map, Counter, Ct6Entry, Ct6Key, CtEntry, CtKey,
    CtLifetimes, ServiceLabel, SockRevNatEntry, SockRevNatKey, IPPROTO_TCP, IPPROTO_UDP,
};
use nix::time::{clock_gettime, ClockId};

pub type ConntrackMap = BpfHashMap<MapData, CtKey, CtEntry>;
pub type CtLifetimesMap = Array<MapData, CtLifetimes>;

/// The two conntrack maps, TCP and the rest, used as one table: every key
/// goes to the map of its protocol, as in the datapath.
pub struct ConntrackMaps {
    pub tcp: ConntrackMap,
    pub other: ConntrackMap,
}

impl ConntrackMaps {
    /// The maps pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapOpenError> {
        Ok(Self {
            tcp: open(dir, map_names::CT_TCP)?,
            other: open(dir, map_names::CT_OTHER)?,
        })
    }

    /// The maps of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapOpenError> {
        Ok(Self {
            tcp: take(ebpf, map_names::CT_TCP)?,
            other: take(ebpf, map_names::CT_OTHER)?,
        })
    }

    pub fn map(&self, proto: u8) -> &ConntrackMap {
        if proto == IPPROTO_TCP {
            &self.tcp
        } else {
            &self.other
        }
    }

    pub fn map_mut(&mut self, proto: u8) -> &mut ConntrackMap {
        if proto == IPPROTO_TCP {
            &mut self.tcp
        } else {
            &mut self.other
        }
    }

    pub fn get(&self, key: &CtKey, flags: u64) -> Result<CtEntry, MapError> {
        self.map(key.proto).get(key, flags)
    }

    pub fn insert(&mut self, key: CtKey, entry: CtEntry, flags: u64) -> Result<(), MapError> {
        self.map_mut(key.proto).insert(key, entry, flags)
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<(), MapError> {
        self.map_mut(key.proto).remove(key)
    }

    /// Every entry of both maps, TCP first.
    pub fn iter(&self) -> impl Iterator<Item = Result<(CtKey, CtEntry), MapError>> + '_ {
        self.tcp.iter().chain(self.other.iter())
    }

    /// Entries in each map: (TCP, other).
    pub fn lens(&self) -> (usize, usize) {
        let count = |m: &ConntrackMap| m.keys().filter(Result::is_ok).count();
        (count(&self.tcp), count(&self.other))
    }
}

pub type Conntrack6Map = BpfHashMap<MapData, Ct6Key, Ct6Entry>;

/// The IPv6 conntrack maps (`CT6_TCP`, `CT6_OTHER`), one table as
/// [`ConntrackMaps`] is.
pub struct Conntrack6Maps {
    pub tcp: Conntrack6Map,
    pub other: Conntrack6Map,
}

impl Conntrack6Maps {
    /// The maps pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapOpenError> {
        Ok(Self {
            tcp: open(dir, map_names::CT6_TCP)?,
            other: open(dir, map_names::CT6_OTHER)?,
        })
    }

    /// The maps of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapOpenError> {
        Ok(Self {
            tcp: take(ebpf, map_names::CT6_TCP)?,
            other: take(ebpf, map_names::CT6_OTHER)?,
        })
    }

    pub fn map(&self, proto: u8) -> &Conntrack6Map {
        if proto == IPPROTO_TCP {
            &self.tcp
        } else {
            &self.other
        }
    }

    pub fn map_mut(&mut self, proto: u8) -> &mut Conntrack6Map {
        if proto == IPPROTO_TCP {
            &mut self.tcp
        } else {
            &mut self.other
        }
    }

    /// Every entry of both maps, TCP first.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Ct6Key, Ct6Entry), MapError>> + '_ {
        self.tcp.iter().chain(self.other.iter())
    }
}

/// The lifetimes in a `CT_LIFETIMES` map (the agent writes them at start).
pub fn ct_lifetimes(map: &CtLifetimesMap) -> Result<CtLifetimes, MapError> {
    map.get(&0, 0)
}
pub type CounterMap = PerCpuArray<MapData, u64>;
pub type ServiceNamesMap = BpfHashMap<MapData, u32, ServiceLabel>;
pub type SockRevNatMap = BpfHashMap<MapData, SockRevNatKey, SockRevNatEntry>;
/// `LB6_SOCK_REVNAT`: [`SockRevNatMap`] of IPv6 sockets.
pub type SockRevNat6Map =
    BpfHashMap<MapData, dataplane_common::SockRevNat6Key, dataplane_common::SockRevNat6Entry>;
/// `NAT`: the SNAT entries of external flows.
pub type NatMap = BpfHashMap<MapData, dataplane_common::NatKey, dataplane_common::NatEntry>;
pub type Nat6Map = BpfHashMap<MapData, dataplane_common::Nat6Key, dataplane_common::Nat6Entry>;

#[derive(Debug, thiserror::Error)]
pub enum MapOpenError {
    #[error("opening pinned map {} (is the agent's --bpffs {}?)", path.display(), dir.display())]
    Pin {
        path: PathBuf,
        dir: PathBuf,
        /// Boxed, as aya's error is large.
        #[source]
        source: Box<MapError>,
    },
    #[error("map {name} missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name} is not of the type this agent expects")]
    Type {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// Map `name` pinned under `dir`, as the type `T` (`HashMap`, `Array`, ...).
pub fn open<T>(dir: &Path, name: &'static str) -> Result<T, MapOpenError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(open_map(dir, name)?).map_err(|source| MapOpenError::Type {
        name,
        source: Box::new(source),
    })
}

/// Map `name` pinned under `dir`, of whatever type it is.
pub fn open_map(dir: &Path, name: &'static str) -> Result<Map, MapOpenError> {
    let path = dir.join(name);
    let pin_err = |source| MapOpenError::Pin {
        path: path.clone(),
        dir: dir.to_owned(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(pin_err)?;
    Map::from_map_data(data).map_err(pin_err)
}

/// Map `name` taken out of a loaded object, as the type `T`.
pub fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, MapOpenError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapOpenError::Missing { name })?;
    T::try_from(map).map_err(|source| MapOpenError::Type {
        name,
        source: Box::new(source),
    })
}

const IPPROTO_ICMP: u8 = 1;

/// The name of an IP protocol number as the maps and traces hold it.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        // Traced ICMP errors (`monitor`); the maps hold TCP and UDP only.
        IPPROTO_ICMP => "ICMP",
        _ => "?",
    }
}

/// An address and port in the maps' byte order.
pub fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ipv4(addr), port_from_map(port))
}

/// An IPv6 address and a port in the maps' byte order, as `[addr]:port`.
pub fn endpoint6(addr: [u8; 16], port: u16) -> std::net::SocketAddrV6 {
    std::net::SocketAddrV6::new(addr.into(), port_from_map(port), 0, 0)
}

/// An address in the maps' byte order.
pub fn ipv4(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(ipv4_from_map(addr))
}

/// A datapath counter summed over CPUs.
pub fn counter_total(map: &CounterMap, counter: Counter) -> Result<u64, MapError> {
    Ok(map.get(&(counter as u32), 0)?.iter().sum())
}

/// Service id -> `namespace/name:port`, as `SERVICE_NAMES` holds them.
pub fn service_names(map: &ServiceNamesMap) -> HashMap<u32, String> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(id, label)| (id, label.as_str().to_owned()))
        .collect()
}

/// Now on the clock of conntrack and trace times (CLOCK_MONOTONIC; on the
/// coarse datapath clock those lag it by up to a jiffy).
pub fn monotonic_now_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
