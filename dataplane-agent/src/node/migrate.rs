//! Meeting the maps an earlier agent pinned: which are adopted, created,
//! refilled or converted, and carrying flows into the new maps.
//!
//! Pinned maps outlive the agent, so an agent meets maps of an older layout
//! (an upgrade) or of other sizes (`--conntrack-max-*` changed). Each of
//! this release's maps gets a [`Carry`] from [`plan`]: by its role (load
//! balancing, backend ids, flows, other state), whether it is pinned with
//! this release's shape, and whether its meaning changed since the pinned
//! layout ([`CHANGED_IN`]). Maps not adopted are loaded pinned under a
//! staging directory while the previous programs keep running on the old
//! ones; [`commit`] moves them in place once the programs switched. A
//! layout change only needs a row in [`CHANGED_IN`] (and a role for a new
//! map, or a [`RETIRED`] entry for a map that went away).

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, MapInfo};
use dataplane_common::{
    ct_state, map_names, AffinityEntry, AffinityKey, Backend, CtEntry, CtKey, MapLayout, Nat6Entry,
    Nat6Key, NatEntry, NatKey, IPPROTO_TCP, LAYOUT_VERSION,
};
use log::info;

/// Directory under the bpffs directory where maps not adopted are pinned
/// until the programs switched to them.
pub const STAGING_DIR: &str = "migrating";

/// What becomes of one of this release's maps at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Pinned with this release's shape and meaning: used as it is.
    Adopt,
    /// Created empty: nothing pinned to carry, or nothing worth carrying
    /// (counters, trace settings).
    Create,
    /// A load-balancing map of another layout: created empty and filled by
    /// the sync engine's first full sync, before the programs switch.
    Refill,
    /// Created empty and filled with the pinned entries converted one by
    /// one: conntrack, session affinity, and the backend ids conntrack
    /// entries name.
    Convert,
}

/// What a map is to the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Written by the sync engine from the model: refilled when changed.
    Lb,
    /// `BACKENDS`: refilled like the other load-balancing maps, but its ids
    /// are what conntrack entries point at, so its entries are carried over.
    BackendIds,
    /// Live flows and clients: converted entry by entry.
    Flows,
    /// Counters, trace settings, lifetimes, the layout stamp: created anew
    /// when changed.
    State,
}

fn role(name: &str) -> Role {
    match name {
        map_names::SERVICE_IPS
        | map_names::SERVICES
        | map_names::BACKEND_SLOTS
        | map_names::SERVICE_NAMES
        | map_names::SOURCE_RANGES
        | map_names::SOURCE_RANGES6
        | map_names::LB6_SERVICE_IPS
        | map_names::LB6_SERVICES
        // New in layout 4: created, and filled by the sync engine from the
        // backends it adopts.
        | map_names::REPLY_SOURCES
        // New in layout 7, likewise.
        | map_names::LB6_REPLY_SOURCES => Role::Lb,
        map_names::BACKENDS | map_names::LB6_BACKENDS => Role::BackendIds,
        map_names::CT_TCP
        | map_names::CT_OTHER
        | map_names::AFFINITY
        | map_names::CT6_TCP
        | map_names::CT6_OTHER
        | map_names::LB6_AFFINITY
        // SNATed external flows; their entries grew the cached next hop in
        // layout 7 (converted with nothing cached).
        | map_names::NAT
        | map_names::NAT6 => Role::Flows,
        _ => Role::State,
    }
}

/// The maps whose type or meaning changed in each layout version: a map
/// listed under version `v` is not adopted from a layout before `v`, even
/// where its sizes match.
const CHANGED_IN: &[(u32, &[&str])] = &[
    // BTF-defined maps; `CtEntry`'s state and flags moved into one word.
    (2, &map_names::ALL),
    // `CONNTRACK` split into `CT_TCP` and `CT_OTHER`; `CT_LIFETIMES` and
    // `FRAGMENTS` new; two more counters.
    (
        3,
        &[
            map_names::CT_TCP,
            map_names::CT_OTHER,
            map_names::CT_LIFETIMES,
            map_names::FRAGMENTS,
            map_names::COUNTERS,
            // Socket-level load balancing: affinity keyed by network
            // namespace too, trace events carry the socket's netns cookie
            // and cgroup; `SOCK_REVNAT` is new.
            map_names::AFFINITY,
            map_names::TRACE_EVENTS,
            map_names::SOCK_REVNAT,
            // `BACKENDS` and `BACKEND_SLOTS` became arrays (same sizes for
            // `BACKENDS`), `ServiceValue` gained `slot_base`.
            map_names::BACKENDS,
            map_names::BACKEND_SLOTS,
            map_names::SERVICES,
            // North-south: `ServiceKey` gained its scope (NodePorts keyed by
            // address 0), `SERVICE_IPS` values the node-address bit,
            // `Backend` the `LOCAL` flag; `NAT`, `NAT_CONFIG` and
            // `SOURCE_RANGES` are new (created).
            map_names::SERVICE_IPS,
        ],
    ),
    // IPv6: the `LB6_*` and `CT6_*` maps are new (created); one more
    // counter; `REPLY_SOURCES` is new (created, filled from the backends).
    (
        4,
        &[
            map_names::COUNTERS,
            map_names::REPLY_SOURCES,
            map_names::LB6_SERVICE_IPS,
            map_names::LB6_SERVICES,
            map_names::LB6_BACKENDS,
            map_names::LB6_AFFINITY,
            map_names::LB6_SOCK_REVNAT,
            map_names::CT6_TCP,
            map_names::CT6_OTHER,
            map_names::CT6_FRAGMENTS,
        ],
    ),
    // North-south on IPv6: `NAT6`, `NAT6_CONFIG` and `SOURCE_RANGES6` are
    // new (created).
    (
        5,
        &[
            map_names::NAT6,
            map_names::NAT6_CONFIG,
            map_names::SOURCE_RANGES6,
        ],
    ),
    // IPv6 trace events: `TRACE6_SCRATCH` is new (created).
    (6, &[map_names::TRACE6_SCRATCH]),
    // `REPLY_SOURCES` values gained the "no flows yet" bits: refilled with
    // the load-balancing maps, the agent's first sync writing its backends
    // without them while conntrack holds carried flows. The IPv6 trace
    // filter in the datapath: `TraceConfig` gained the IPv6 addresses,
    // `TRACE6_SCRATCH` holds a `Trace6Scratch`. IPv6 reply pre-filter and
    // direct delivery: `LB6_REPLY_SOURCES` is new (created, filled from
    // the backends). `NatEntry` and `Nat6Entry` keep each direction's next
    // hop.
    (
        7,
        &[
            map_names::REPLY_SOURCES,
            map_names::TRACE_CONFIG,
            map_names::TRACE6_SCRATCH,
            map_names::LB6_REPLY_SOURCES,
            map_names::NAT,
            map_names::NAT6,
        ],
    ),
    // The reply sources gained an entry per backend address (and twice the
    // capacity): refilled from the backends, as in layout 7.
    (8, &[map_names::REPLY_SOURCES, map_names::LB6_REPLY_SOURCES]),
];

/// Maps of earlier layouts this one no longer has: unpinned at [`commit`].
pub const RETIRED: &[&str] = &[map_names::CONNTRACK];

/// Size of a conntrack entry in layouts 1 to 3 (their `CtEntry`s differ in
/// field order only).
const CT_ENTRY_SIZE: usize = 48;
const _: () = assert!(core::mem::size_of::<CtEntry>() == CT_ENTRY_SIZE);

/// `NatEntry` and `Nat6Entry` before layout 7: this layout's fields up to
/// `state` (`NAT_KEPT`, `NAT6_KEPT` bytes), then padding where the cached
/// next hop now follows.
const NAT_ENTRY_SIZE_6: usize = 48;
const NAT6_ENTRY_SIZE_6: usize = 96;
const NAT_KEPT: usize = 42;
const NAT6_KEPT: usize = 90;
const _: () = assert!(core::mem::offset_of!(NatEntry, _pad) == NAT_KEPT);
const _: () = assert!(core::mem::offset_of!(Nat6Entry, _pad) == NAT6_KEPT);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the maps pinned under {0} have layout version {found}, newer than this agent's {expected}; \
         run the newer agent, or remove them with `dataplane-agent cleanup --bpffs {0}` \
         (this resets connections through services)",
        .dir.display()
    )]
    Newer {
        dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "pinned map {} cannot be migrated: {what} is {found}, layout {version} has {expected}; \
         remove the maps with `dataplane-agent cleanup` (this resets connections through services)",
        .path.display()
    )]
    Unconvertible {
        path: PathBuf,
        version: u32,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("reading pinned map {}", .path.display())]
    Read {
        path: PathBuf,
        /// Boxed, as aya's error is large.
        #[source]
        source: Box<MapError>,
    },
    #[error("carrying {} into {}", .from.display(), .to.display())]
    Convert {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("{what} {}", .path.display())]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read_err(path: &Path) -> impl FnOnce(MapError) -> MigrateError {
    let path = path.to_path_buf();
    move |source| MigrateError::Read {
        path,
        source: Box::new(source),
    }
}

fn fs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MigrateError {
    let path = path.to_path_buf();
    move |source| MigrateError::Fs { what, path, source }
}

/// What to do with every map at this start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Layout version of the maps pinned there; `None` when nothing is.
    pub found: Option<u32>,
    /// Each of this release's maps, in `map_names::ALL` order.
    pub maps: Vec<(&'static str, Carry)>,
    /// Maps pinned where the new one goes but not adopted: the new one is
    /// pinned under [`STAGING_DIR`] until [`commit`].
    pub staged: Vec<&'static str>,
}

impl Plan {
    pub fn carry(&self, name: &str) -> Carry {
        self.maps
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(Carry::Create, |(_, c)| *c)
    }

    pub fn is_staged(&self, name: &str) -> bool {
        self.staged.contains(&name)
    }

    /// Whether the programs must switch before the layout is this
    /// release's: an older version, or maps staged (new sizes).
    pub fn is_migration(&self) -> bool {
        self.found.is_some_and(|v| v != LAYOUT_VERSION) || !self.staged.is_empty()
    }

    /// Where the new map `name` is pinned until [`commit`].
    pub fn pin_path(&self, bpffs: &Path, name: &str) -> PathBuf {
        if self.is_staged(name) {
            bpffs.join(STAGING_DIR).join(name)
        } else {
            bpffs.join(name)
        }
    }
}

fn changed_since(version: u32, name: &str) -> bool {
    CHANGED_IN
        .iter()
        .any(|(v, maps)| *v > version && maps.contains(&name))
}

/// The layout version of the maps pinned under `bpffs`: `None` when no map
/// is, 1 when there is no `LAYOUT` map (the release before versions).
pub fn pinned_version(bpffs: &Path) -> Result<Option<u32>, MigrateError> {
    let any_pinned = map_names::ALL
        .iter()
        .chain(RETIRED)
        .any(|name| bpffs.join(name).exists());
    if !any_pinned {
        return Ok(None);
    }
    let path = bpffs.join(map_names::LAYOUT);
    if !path.exists() {
        return Ok(Some(1));
    }
    let map = MapData::from_pin(&path).map_err(read_err(&path))?;
    let layout: aya::maps::Array<MapData, u32> =
        aya::maps::Array::try_from(Map::Array(map)).map_err(read_err(&path))?;
    let version = layout.get(&0, 0).map_err(read_err(&path))?;
    // 0: created by an agent of this release that stopped before stamping.
    Ok(Some(if version == 0 {
        LAYOUT_VERSION
    } else {
        version
    }))
}

/// Key size, value size, capacity of a pinned map, if it is pinned.
fn pinned_shape(path: &Path) -> Result<Option<(u32, u32, u32)>, MigrateError> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).map_err(read_err(path))?;
    Ok(Some((
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    )))
}

/// Decides what becomes of each map in `expected` (this release's layouts,
/// with the conntrack capacities configured for this start) given what is
/// pinned under `bpffs`. Refuses what cannot be migrated: a newer layout, a
/// conntrack map of a shape no layout had.
pub fn plan(bpffs: &Path, expected: &[MapLayout]) -> Result<Plan, MigrateError> {
    let Some(found) = pinned_version(bpffs)? else {
        return Ok(Plan {
            found: None,
            maps: expected.iter().map(|l| (l.name, Carry::Create)).collect(),
            staged: Vec::new(),
        });
    };
    if found > LAYOUT_VERSION {
        return Err(MigrateError::Newer {
            dir: bpffs.to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    let mut shapes = Vec::new();
    for layout in expected {
        let shape = pinned_shape(&bpffs.join(layout.name))?;
        let same = shape == Some((layout.key_size, layout.value_size, layout.max_entries))
            && !changed_since(found, layout.name);
        shapes.push((layout, shape, same));
    }
    // The load-balancing maps are one snapshot for the sync engine: adopted
    // together or refilled together.
    let lb_adopted = shapes
        .iter()
        .filter(|(l, _, _)| matches!(role(l.name), Role::Lb | Role::BackendIds))
        .all(|(_, shape, same)| shape.is_none() || *same);
    let mut maps = Vec::new();
    let mut staged = Vec::new();
    for (layout, shape, same) in shapes {
        let pinned = shape.is_some();
        let kv_same = shape.is_some_and(|(k, v, _)| (k, v) == (layout.key_size, layout.value_size));
        let kept = if pinned { Carry::Adopt } else { Carry::Create };
        let carry = match role(layout.name) {
            _ if layout.name == map_names::LAYOUT && pinned => Carry::Adopt,
            Role::Lb if lb_adopted => kept,
            Role::Lb => Carry::Refill,
            Role::BackendIds if lb_adopted => kept,
            Role::BackendIds if kv_same => Carry::Convert,
            Role::BackendIds => Carry::Refill,
            Role::Flows if same => Carry::Adopt,
            Role::Flows if flow_source(bpffs, found, layout)?.is_some() => Carry::Convert,
            Role::Flows => Carry::Create,
            Role::State if same => Carry::Adopt,
            Role::State => Carry::Create,
        };
        if pinned && carry != Carry::Adopt {
            staged.push(layout.name);
        }
        maps.push((layout.name, carry));
    }
    Ok(Plan {
        found: Some(found),
        maps,
        staged,
    })
}

/// How the entries of a flow map of an older layout are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowSource {
    /// Same key and value types: copied.
    Copy,
    /// A conntrack map of layout 1 or 2, its entries in that layout's
    /// `CtEntry`, TCP and the rest in one map.
    Conntrack { version: u32 },
}

/// The pinned map that `layout`'s flows come from, and how to read it.
fn flow_source(
    bpffs: &Path,
    found: u32,
    layout: &MapLayout,
) -> Result<Option<(PathBuf, FlowSource)>, MigrateError> {
    let is_ct = matches!(layout.name, map_names::CT_TCP | map_names::CT_OTHER);
    if is_ct && found < 3 {
        let path = bpffs.join(map_names::CONNTRACK);
        let Some((key, value, _)) = pinned_shape(&path)? else {
            return Ok(None);
        };
        for (what, found_size, expected) in [
            ("key size", key, layout.key_size),
            ("value size", value, CT_ENTRY_SIZE as u32),
        ] {
            if found_size != expected {
                return Err(MigrateError::Unconvertible {
                    path,
                    version: found,
                    what,
                    found: found_size,
                    expected,
                });
            }
        }
        return Ok(Some((path, FlowSource::Conntrack { version: found })));
    }
    let path = bpffs.join(layout.name);
    let Some((key, value, _)) = pinned_shape(&path)? else {
        return Ok(None);
    };
    // Layouts before 3 keyed affinity by client address only (8 bytes);
    // no layout had another shape for the other flow maps.
    let key_size = if layout.name == map_names::AFFINITY && found < 3 {
        8
    } else {
        layout.key_size
    };
    let value_size = match layout.name {
        map_names::NAT if found < 7 => NAT_ENTRY_SIZE_6 as u32,
        map_names::NAT6 if found < 7 => NAT6_ENTRY_SIZE_6 as u32,
        _ => layout.value_size,
    };
    for (what, found_size, expected) in [
        ("key size", key, key_size),
        ("value size", value, value_size),
    ] {
        if found_size != expected {
            return Err(MigrateError::Unconvertible {
                path,
                version: found,
                what,
                found: found_size,
                expected,
            });
        }
    }
    Ok(Some((path, FlowSource::Copy)))
}

/// A conntrack entry of layout `version` as this release's `CtEntry`.
fn ct_entry_from(version: u32, bytes: &[u8; CT_ENTRY_SIZE]) -> CtEntry {
    if version >= 2 {
        return bytemuck::pod_read_unaligned(bytes);
    }
    // Layout 1: `state` after `proto` (values 0, 1, 2), then `backend_id`,
    // `service_id`, `flags`.
    let u16_at = |o: usize| u16::from_ne_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
    let state = match bytes[35] {
        0 => ct_state::OPENING,
        1 => ct_state::ESTABLISHED,
        _ => ct_state::CLOSING,
    };
    CtEntry {
        created_ns: u64_at(0),
        last_seen_ns: u64_at(8),
        client_addr: u32_at(16),
        service_addr: u32_at(20),
        backend_addr: u32_at(24),
        client_port: u16_at(28),
        service_port: u16_at(30),
        backend_port: u16_at(32),
        proto: bytes[34],
        _pad0: 0,
        backend_id: u32_at(36),
        state,
        flags: bytes[44],
        _pad: [0; 2],
        service_id: u32_at(40),
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    path: &Path,
) -> Result<BpfHashMap<MapData, K, V>, MigrateError> {
    let data = MapData::from_pin(path).map_err(read_err(path))?;
    let map = Map::from_map_data(data).map_err(read_err(path))?;
    BpfHashMap::try_from(map).map_err(read_err(path))
}

fn open_array<V: aya::Pod>(path: &Path) -> Result<Array<MapData, V>, MigrateError> {
    let data = MapData::from_pin(path).map_err(read_err(path))?;
    let map = Map::from_map_data(data).map_err(read_err(path))?;
    Array::try_from(map).map_err(read_err(path))
}

/// Carries the backend ids conntrack entries point at into the new
/// `BACKENDS`, an array indexed by id since layout 3 (a hash before); the
/// number written.
fn copy_backends(from: &Path, to: &Path, found: u32) -> Result<usize, MigrateError> {
    let backends: Vec<(u32, Backend)> = if found < 3 {
        let source: BpfHashMap<MapData, u32, Backend> = open_hash(from)?;
        source.iter().filter_map(Result::ok).collect()
    } else {
        let source: Array<MapData, Backend> = open_array(from)?;
        source
            .iter()
            .enumerate()
            .filter_map(|(id, b)| Some((u32::try_from(id).ok()?, b.ok()?)))
            // An all-zero entry is an unused id.
            .filter(|(_, b)| *b != Backend::default())
            .collect()
    };
    let mut target: Array<MapData, Backend> = open_array(to)?;
    let mut written = 0;
    for (id, backend) in backends {
        target
            .set(id, backend, 0)
            .map_err(|source| MigrateError::Convert {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                source: Box::new(source),
            })?;
        written += 1;
    }
    Ok(written)
}

/// Whether a pass copies everything (the first, into empty maps) or
/// catches up after the switch: flows the previous programs created since
/// the first pass are added, and entries they moved on since (a later
/// packet, a FIN) are updated where the new programs have not seen the flow
/// since; the new programs' own entries win.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    First,
    CatchUp,
}

/// `bpf_map_update_elem`'s "only if absent".
const BPF_NOEXIST: u64 = 1;

impl Pass {
    fn flags(self) -> u64 {
        match self {
            Pass::First => 0,
            Pass::CatchUp => BPF_NOEXIST,
        }
    }
}

/// Copies the entries of `from` into `to`, converted by `convert` (`None`:
/// not carried); the number written. In the catch-up pass an entry already
/// in `to` is replaced by `newer(current, converted)` where that gives one.
fn copy_entries<K: aya::Pod, V: aya::Pod, L: aya::Pod, W: aya::Pod>(
    from: &Path,
    to: &Path,
    pass: Pass,
    convert: impl Fn(&K, &V) -> Option<(L, W)>,
    newer: impl Fn(&W, &W) -> Option<W>,
) -> Result<usize, MigrateError> {
    let source: BpfHashMap<MapData, K, V> = open_hash(from)?;
    let mut target: BpfHashMap<MapData, L, W> = open_hash(to)?;
    let carry_err = |source| MigrateError::Convert {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source: Box::new(source),
    };
    let mut written = 0;
    for entry in source.iter() {
        // An entry evicted or expired during the walk is simply not carried.
        let Ok((key, value)) = entry else { continue };
        let Some((key, converted)) = convert(&key, &value) else {
            continue;
        };
        match target.insert(key, converted, pass.flags()) {
            Ok(()) => written += 1,
            Err(MapError::SyscallError(e))
                if pass == Pass::CatchUp && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                let Ok(current) = target.get(&key, 0) else {
                    continue;
                };
                if let Some(merged) = newer(&current, &converted) {
                    target.insert(key, merged, 0).map_err(carry_err)?;
                    written += 1;
                }
            }
            Err(source) => return Err(carry_err(source)),
        }
    }
    Ok(written)
}

/// A `NAT` entry of a layout before 7: nothing cached.
fn nat_entry_from_6(bytes: &[u8; NAT_ENTRY_SIZE_6]) -> NatEntry {
    let mut widened = [0u8; core::mem::size_of::<NatEntry>()];
    widened[..NAT_KEPT].copy_from_slice(&bytes[..NAT_KEPT]);
    bytemuck::pod_read_unaligned(&widened)
}

/// A `NAT6` entry of a layout before 7: nothing cached.
fn nat6_entry_from_6(bytes: &[u8; NAT6_ENTRY_SIZE_6]) -> Nat6Entry {
    let mut widened = [0u8; core::mem::size_of::<Nat6Entry>()];
    widened[..NAT6_KEPT].copy_from_slice(&bytes[..NAT6_KEPT]);
    bytemuck::pod_read_unaligned(&widened)
}

/// A NAT entry the previous programs refreshed after the new map's copy
/// was made (see [`newer_flow`]): the old one, with the furthest state.
fn newer_nat(current: &NatEntry, old: &NatEntry) -> Option<NatEntry> {
    (old.last_seen_ns > current.last_seen_ns).then_some(NatEntry {
        state: old.state.max(current.state),
        ..*old
    })
}

/// [`newer_nat`] for `NAT6`.
fn newer_nat6(current: &Nat6Entry, old: &Nat6Entry) -> Option<Nat6Entry> {
    (old.last_seen_ns > current.last_seen_ns).then_some(Nat6Entry {
        state: old.state.max(current.state),
        ..*old
    })
}

/// An affinity entry the previous programs refreshed after the new map's
/// copy was made.
fn newer_affinity(current: &AffinityEntry, old: &AffinityEntry) -> Option<AffinityEntry> {
    (old.last_used_ns > current.last_used_ns).then_some(*old)
}

/// A conntrack entry the previous programs refreshed after the one in the
/// new map was copied (so the new programs have not seen the flow since:
/// they started after the old ones stopped): the old entry, keeping any bit
/// the new one has.
fn newer_flow(current: &CtEntry, old: &CtEntry) -> Option<CtEntry> {
    (old.last_seen_ns > current.last_seen_ns).then_some(CtEntry {
        state: old.state | current.state,
        flags: old.flags | current.flags,
        ..*old
    })
}

/// Fills every map the plan converts from its source, still pinned in
/// place. Run once after loading and once more after the programs switched
/// ([`Pass::CatchUp`]).
pub fn convert(
    plan: &Plan,
    bpffs: &Path,
    expected: &[MapLayout],
    pass: Pass,
) -> Result<(), MigrateError> {
    let Some(found) = plan.found else {
        return Ok(());
    };
    for layout in expected {
        if plan.carry(layout.name) != Carry::Convert {
            continue;
        }
        let to = plan.pin_path(bpffs, layout.name);
        let written = match layout.name {
            // Only the agent writes BACKENDS, and the sync engine has made
            // the new one current: a catch-up would bring back backends it
            // removed.
            map_names::BACKENDS if pass == Pass::CatchUp => 0,
            map_names::BACKENDS => copy_backends(&bpffs.join(layout.name), &to, found)?,
            // Layouts before 3 key a client by its address only (8 bytes);
            // 3 adds the socket hooks' network namespace cookie.
            map_names::AFFINITY if found < 3 => {
                copy_entries::<[u32; 2], AffinityEntry, AffinityKey, AffinityEntry>(
                    &bpffs.join(layout.name),
                    &to,
                    pass,
                    |&[service_id, client_addr], a| {
                        let key = AffinityKey {
                            service_id,
                            client_addr,
                            client_netns: 0,
                        };
                        Some((key, *a))
                    },
                    newer_affinity,
                )?
            }
            map_names::AFFINITY => {
                copy_entries::<AffinityKey, AffinityEntry, AffinityKey, AffinityEntry>(
                    &bpffs.join(layout.name),
                    &to,
                    pass,
                    |k, a| Some((*k, *a)),
                    newer_affinity,
                )?
            }
            name @ (map_names::CT_TCP | map_names::CT_OTHER) => {
                let Some((from, source)) = flow_source(bpffs, found, layout)? else {
                    continue;
                };
                let tcp = name == map_names::CT_TCP;
                let version = match source {
                    FlowSource::Conntrack { version } => version,
                    FlowSource::Copy => LAYOUT_VERSION,
                };
                copy_entries::<CtKey, [u8; CT_ENTRY_SIZE], CtKey, CtEntry>(
                    &from,
                    &to,
                    pass,
                    |k, v| {
                        ((k.proto == IPPROTO_TCP) == tcp).then(|| (*k, ct_entry_from(version, v)))
                    },
                    newer_flow,
                )?
            }
            map_names::NAT if found < 7 => {
                copy_entries::<NatKey, [u8; NAT_ENTRY_SIZE_6], NatKey, NatEntry>(
                    &bpffs.join(layout.name),
                    &to,
                    pass,
                    |k, v| Some((*k, nat_entry_from_6(v))),
                    newer_nat,
                )?
            }
            map_names::NAT => copy_entries::<NatKey, NatEntry, NatKey, NatEntry>(
                &bpffs.join(layout.name),
                &to,
                pass,
                |k, v| Some((*k, *v)),
                newer_nat,
            )?,
            map_names::NAT6 if found < 7 => {
                copy_entries::<Nat6Key, [u8; NAT6_ENTRY_SIZE_6], Nat6Key, Nat6Entry>(
                    &bpffs.join(layout.name),
                    &to,
                    pass,
                    |k, v| Some((*k, nat6_entry_from_6(v))),
                    newer_nat6,
                )?
            }
            map_names::NAT6 => copy_entries::<Nat6Key, Nat6Entry, Nat6Key, Nat6Entry>(
                &bpffs.join(layout.name),
                &to,
                pass,
                |k, v| Some((*k, *v)),
                newer_nat6,
            )?,
            _ => 0,
        };
        info!(
            "migration from layout {found}: {written} entries carried into {} ({pass:?} pass)",
            layout.name
        );
    }
    Ok(())
}

/// After the programs switched: the staged maps take the place of the old
/// ones (a rename in the bpffs, so the path never points at nothing), maps
/// this layout no longer has are unpinned, the staging directory removed.
pub fn commit(plan: &Plan, bpffs: &Path) -> Result<(), MigrateError> {
    let staging = bpffs.join(STAGING_DIR);
    for name in &plan.staged {
        let (from, to) = (staging.join(name), bpffs.join(name));
        std::fs::rename(&from, &to).map_err(fs_err("moving the new map in place at", &to))?;
    }
    for name in RETIRED {
        let path = bpffs.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(
                "unpinned {}, which this layout no longer has",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("unpinning", &path)(e)),
        }
    }
    remove_staging(bpffs)
}

/// Removes the staging directory and anything an interrupted start left
/// in it.
pub fn remove_staging(bpffs: &Path) -> Result<(), MigrateError> {
    let staging = bpffs.join(STAGING_DIR);
    if !staging.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(&staging).map_err(fs_err("reading", &staging))? {
        let path = entry.map_err(fs_err("reading", &staging))?.path();
        std::fs::remove_file(&path).map_err(fs_err("removing", &path))?;
    }
    std::fs::remove_dir(&staging).map_err(fs_err("removing", &staging))
}

#[cfg(test)]
mod tests {
    use dataplane_common::ct_flags;

    use super::*;

    #[test]
    fn layout_1_conntrack_entry_keeps_its_translation_and_state() {
        let mut bytes = [0u8; CT_ENTRY_SIZE];
        bytes[8..16].copy_from_slice(&77u64.to_ne_bytes());
        bytes[16..20].copy_from_slice(&[10, 0, 0, 1]);
        bytes[20..24].copy_from_slice(&[10, 96, 0, 10]);
        bytes[24..28].copy_from_slice(&[10, 0, 0, 2]);
        bytes[28..30].copy_from_slice(&40000u16.to_be_bytes());
        bytes[32..34].copy_from_slice(&8080u16.to_be_bytes());
        bytes[34] = IPPROTO_TCP;
        bytes[35] = 2; // CLOSING in layout 1
        bytes[36..40].copy_from_slice(&5u32.to_ne_bytes());
        bytes[40..44].copy_from_slice(&9u32.to_ne_bytes());
        bytes[44] = ct_flags::SEEN_REPLY;

        let e = ct_entry_from(1, &bytes);

        assert_eq!(e.last_seen_ns, 77);
        assert_eq!(e.client_addr.to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(e.backend_addr.to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(u16::from_be(e.client_port), 40000);
        assert_eq!(u16::from_be(e.backend_port), 8080);
        assert_eq!((e.backend_id, e.service_id), (5, 9));
        assert_eq!(
            (e.state, e.flags),
            (ct_state::CLOSING, ct_flags::SEEN_REPLY)
        );
    }

    #[test]
    fn layout_2_conntrack_entry_is_this_layouts() {
        let e = CtEntry {
            backend_id: 3,
            state: ct_state::ESTABLISHED,
            ..Default::default()
        };
        let bytes: [u8; CT_ENTRY_SIZE] = bytemuck::cast(e);
        assert_eq!(ct_entry_from(2, &bytes), e);
    }

    #[test]
    fn catch_up_takes_a_flow_the_old_programs_moved_on_and_keeps_new_bits() {
        let copied = CtEntry {
            last_seen_ns: 10,
            state: ct_state::OPENING,
            flags: ct_flags::SEEN_REPLY,
            ..Default::default()
        };
        let old = CtEntry {
            last_seen_ns: 20,
            state: ct_state::ESTABLISHED,
            flags: ct_flags::FIN_ORIGINAL,
            ..copied
        };
        let merged = newer_flow(&copied, &old).expect("the old entry is newer");
        assert_eq!(merged.last_seen_ns, 20);
        assert_eq!(merged.state, ct_state::ESTABLISHED);
        assert_eq!(merged.flags, ct_flags::SEEN_REPLY | ct_flags::FIN_ORIGINAL);
        // Seen by the new programs since: theirs stays.
        let touched = CtEntry {
            last_seen_ns: 30,
            ..copied
        };
        assert_eq!(newer_flow(&touched, &old), None);
    }

    #[test]
    fn layout_6_nat_entries_keep_their_translation_with_nothing_cached() {
        let e = NatEntry {
            last_seen_ns: 7,
            client_addr: 1,
            frontend_addr: 2,
            backend_addr: 3,
            nat_addr: 4,
            client_port: 10,
            frontend_port: 20,
            backend_port: 30,
            nat_port: 40,
            backend_id: 5,
            service_id: 6,
            proto: IPPROTO_TCP,
            state: ct_state::ESTABLISHED,
            ..Default::default()
        };
        let bytes = bytemuck::bytes_of(&e);
        let mut old = [0u8; NAT_ENTRY_SIZE_6];
        old[..NAT_KEPT].copy_from_slice(&bytes[..NAT_KEPT]);
        // Layout 6's padding, whatever it held, is not taken for a hop.
        old[NAT_KEPT..].fill(0xff);
        assert_eq!(nat_entry_from_6(&old), e);

        let e6 = Nat6Entry {
            last_seen_ns: 7,
            client_addr: [1; 16],
            frontend_addr: [2; 16],
            backend_addr: [3; 16],
            nat_addr: [4; 16],
            nat_port: 40,
            backend_id: 5,
            proto: IPPROTO_TCP,
            state: ct_state::CLOSING,
            ..Default::default()
        };
        let bytes = bytemuck::bytes_of(&e6);
        let mut old = [0u8; NAT6_ENTRY_SIZE_6];
        old[..NAT6_KEPT].copy_from_slice(&bytes[..NAT6_KEPT]);
        old[NAT6_KEPT..].fill(0xff);
        assert_eq!(nat6_entry_from_6(&old), e6);
    }

    #[test]
    fn only_maps_changed_after_the_pinned_layout_are_not_adopted() {
        assert!(changed_since(1, map_names::SERVICES));
        assert!(!changed_since(2, map_names::SERVICE_NAMES));
        assert!(changed_since(2, map_names::CT_TCP));
        assert!(!changed_since(LAYOUT_VERSION, map_names::CT_TCP));
    }
}
