//! The load-balancing maps as the sync engine sees them: a small trait so the
//! engine runs the same against the pinned BPF maps and against an in-memory
//! double in unit tests.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData, MapError,
};
use dataplane_common::{
    map_names, Backend, BackendSlotKey, ServiceKey, ServiceLabel, ServiceValue, SourceRangeKey,
};

use crate::node::pinned::{self, MapOpenError};

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
    pub slots: BTreeMap<(u32, u32), u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub names: BTreeMap<u32, String>,
    pub source_ranges: Vec<SourceRangeKey>,
}

pub trait LbMaps {
    fn set_service_ip(&mut self, addr: u32, port_count: u32) -> Result<(), LbMapError>;
    fn remove_service_ip(&mut self, addr: u32) -> Result<(), LbMapError>;
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), LbMapError>;
    fn remove_service(&mut self, key: ServiceKey) -> Result<(), LbMapError>;
    fn set_slot(&mut self, key: BackendSlotKey, backend_id: u32) -> Result<(), LbMapError>;
    fn remove_slot(&mut self, key: BackendSlotKey) -> Result<(), LbMapError>;
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), LbMapError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), LbMapError>;
    fn set_service_name(&mut self, service_id: u32, label: &str) -> Result<(), LbMapError>;
    fn remove_service_name(&mut self, service_id: u32) -> Result<(), LbMapError>;
    fn set_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError>;
    fn remove_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError>;
    fn snapshot(&self) -> Result<LbSnapshot, LbMapError>;
}

/// The pinned BPF maps.
pub struct BpfLbMaps {
    service_ips: HashMap<MapData, u32, u32>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    names: HashMap<MapData, u32, ServiceLabel>,
    source_ranges: LpmTrie<MapData, [u32; 2], u32>,
}

/// The trie's key: the prefix length, then the data it covers (service id
/// and address, both network order).
fn lpm_key(key: &SourceRangeKey) -> LpmKey<[u32; 2]> {
    LpmKey::new(key.prefix_len, [key.service_id_be, key.addr])
}

impl BpfLbMaps {
    /// The maps a running (or stopped) agent pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapOpenError> {
        Ok(Self {
            service_ips: pinned::open(dir, map_names::SERVICE_IPS)?,
            services: pinned::open(dir, map_names::SERVICES)?,
            slots: pinned::open(dir, map_names::BACKEND_SLOTS)?,
            backends: pinned::open(dir, map_names::BACKENDS)?,
            names: pinned::open(dir, map_names::SERVICE_NAMES)?,
            source_ranges: pinned::open(dir, map_names::SOURCE_RANGES)?,
        })
    }

    /// The maps of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapOpenError> {
        Ok(Self {
            service_ips: pinned::take(ebpf, map_names::SERVICE_IPS)?,
            services: pinned::take(ebpf, map_names::SERVICES)?,
            slots: pinned::take(ebpf, map_names::BACKEND_SLOTS)?,
            backends: pinned::take(ebpf, map_names::BACKENDS)?,
            names: pinned::take(ebpf, map_names::SERVICE_NAMES)?,
            source_ranges: pinned::take(ebpf, map_names::SOURCE_RANGES)?,
        })
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> LbMapError {
    move |source| LbMapError {
        map,
        op,
        source: Box::new(source),
    }
}

/// Deleting what is already gone is success: the desired state holds.
fn removed(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl LbMaps for BpfLbMaps {
    fn set_service_ip(&mut self, addr: u32, port_count: u32) -> Result<(), LbMapError> {
        self.service_ips
            .insert(addr, port_count, 0)
            .map_err(err(map_names::SERVICE_IPS, "insert"))
    }
    fn remove_service_ip(&mut self, addr: u32) -> Result<(), LbMapError> {
        removed(self.service_ips.remove(&addr)).map_err(err(map_names::SERVICE_IPS, "delete"))
    }
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), LbMapError> {
        self.services
            .insert(key, value, 0)
            .map_err(err(map_names::SERVICES, "insert"))
    }
    fn remove_service(&mut self, key: ServiceKey) -> Result<(), LbMapError> {
        removed(self.services.remove(&key)).map_err(err(map_names::SERVICES, "delete"))
    }
    fn set_slot(&mut self, key: BackendSlotKey, backend_id: u32) -> Result<(), LbMapError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(err(map_names::BACKEND_SLOTS, "insert"))
    }
    fn remove_slot(&mut self, key: BackendSlotKey) -> Result<(), LbMapError> {
        removed(self.slots.remove(&key)).map_err(err(map_names::BACKEND_SLOTS, "delete"))
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), LbMapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(err(map_names::BACKENDS, "insert"))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), LbMapError> {
        removed(self.backends.remove(&id)).map_err(err(map_names::BACKENDS, "delete"))
    }
    fn set_service_name(&mut self, service_id: u32, label: &str) -> Result<(), LbMapError> {
        self.names
            .insert(service_id, ServiceLabel::new(label), 0)
            .map_err(err(map_names::SERVICE_NAMES, "insert"))
    }
    fn remove_service_name(&mut self, service_id: u32) -> Result<(), LbMapError> {
        removed(self.names.remove(&service_id)).map_err(err(map_names::SERVICE_NAMES, "delete"))
    }
    fn set_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError> {
        self.source_ranges
            .insert(&lpm_key(&key), 1, 0)
            .map_err(err(map_names::SOURCE_RANGES, "insert"))
    }
    fn remove_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError> {
        removed(self.source_ranges.remove(&lpm_key(&key)))
            .map_err(err(map_names::SOURCE_RANGES, "delete"))
    }
    fn snapshot(&self) -> Result<LbSnapshot, LbMapError> {
        let mut snap = LbSnapshot::default();
        for key in self.source_ranges.keys() {
            let key = key.map_err(err(map_names::SOURCE_RANGES, "iterate"))?;
            let [service_id_be, addr] = key.data();
            snap.source_ranges.push(SourceRangeKey {
                prefix_len: key.prefix_len(),
                service_id_be,
                addr,
            });
        }
        for entry in self.names.iter() {
            let (k, v) = entry.map_err(err(map_names::SERVICE_NAMES, "iterate"))?;
            snap.names.insert(k, v.as_str().to_owned());
        }
        for entry in self.service_ips.iter() {
            let (k, v) = entry.map_err(err(map_names::SERVICE_IPS, "iterate"))?;
            snap.service_ips.insert(k, v);
        }
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(err(map_names::SERVICES, "iterate"))?;
            snap.services.insert(k, v);
        }
        for entry in self.slots.iter() {
            let (k, v) = entry.map_err(err(map_names::BACKEND_SLOTS, "iterate"))?;
            snap.slots.insert((k.service_id, k.slot), v);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.map_err(err(map_names::BACKENDS, "iterate"))?;
            snap.backends.insert(k, v);
        }
        Ok(snap)
    }
}

/// In-memory maps that count every write, for unit tests of the engine.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct MemLbMaps {
    pub state: LbSnapshot,
    pub writes: usize,
    /// Fails the next write to this map, once.
    pub fail_next_write_to: Option<&'static str>,
}

#[cfg(test)]
impl MemLbMaps {
    fn write(&mut self, map: &'static str) -> Result<(), LbMapError> {
        if self.fail_next_write_to == Some(map) {
            self.fail_next_write_to = None;
            return Err(LbMapError {
                map,
                op: "insert",
                source: Box::new(MapError::KeyNotFound),
            });
        }
        self.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
impl LbMaps for MemLbMaps {
    fn set_service_ip(&mut self, addr: u32, port_count: u32) -> Result<(), LbMapError> {
        self.write(map_names::SERVICE_IPS)?;
        self.state.service_ips.insert(addr, port_count);
        Ok(())
    }
    fn remove_service_ip(&mut self, addr: u32) -> Result<(), LbMapError> {
        self.write(map_names::SERVICE_IPS)?;
        self.state.service_ips.remove(&addr);
        Ok(())
    }
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), LbMapError> {
        self.write(map_names::SERVICES)?;
        self.state.services.insert(key, value);
        Ok(())
    }
    fn remove_service(&mut self, key: ServiceKey) -> Result<(), LbMapError> {
        self.write(map_names::SERVICES)?;
        self.state.services.remove(&key);
        Ok(())
    }
    fn set_slot(&mut self, key: BackendSlotKey, backend_id: u32) -> Result<(), LbMapError> {
        self.write(map_names::BACKEND_SLOTS)?;
        self.state
            .slots
            .insert((key.service_id, key.slot), backend_id);
        Ok(())
    }
    fn remove_slot(&mut self, key: BackendSlotKey) -> Result<(), LbMapError> {
        self.write(map_names::BACKEND_SLOTS)?;
        self.state.slots.remove(&(key.service_id, key.slot));
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), LbMapError> {
        self.write(map_names::BACKENDS)?;
        self.state.backends.insert(id, backend);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), LbMapError> {
        self.write(map_names::BACKENDS)?;
        self.state.backends.remove(&id);
        Ok(())
    }
    fn set_service_name(&mut self, service_id: u32, label: &str) -> Result<(), LbMapError> {
        self.write(map_names::SERVICE_NAMES)?;
        self.state.names.insert(service_id, label.to_owned());
        Ok(())
    }
    fn remove_service_name(&mut self, service_id: u32) -> Result<(), LbMapError> {
        self.write(map_names::SERVICE_NAMES)?;
        self.state.names.remove(&service_id);
        Ok(())
    }
    fn set_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError> {
        self.write(map_names::SOURCE_RANGES)?;
        if !self.state.source_ranges.contains(&key) {
            self.state.source_ranges.push(key);
        }
        Ok(())
    }
    fn remove_source_range(&mut self, key: SourceRangeKey) -> Result<(), LbMapError> {
        self.write(map_names::SOURCE_RANGES)?;
        self.state.source_ranges.retain(|k| *k != key);
        Ok(())
    }
    fn snapshot(&self) -> Result<LbSnapshot, LbMapError> {
        Ok(self.state.clone())
    }
}
