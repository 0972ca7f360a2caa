//! Upgrades: an agent that finds the maps of an earlier layout (or of other
//! conntrack sizes) carries the flows over, and the flows' next packets are
//! translated as before. The earlier agent's maps are a fixture made by
//! syscall (bpftool) with that layout's shapes and filled as that agent
//! would have: one service, two backends, an established TCP flow and a
//! UDP flow to the second backend.
//!
//! Needs root, bpftool and a kernel with BPF (each test mounts its own
//! bpffs).

use std::{net::SocketAddrV4, path::Path, process::Command};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use dataplane_agent::{control::model::Protocol, node::datapath::DatapathConfig};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, ipv4_to_map, map_names, port_to_map, Backend, Counter, CtEntry,
    CtKey, ServiceKey, IPPROTO_TCP, IPPROTO_UDP, LAYOUT_VERSION,
};
use dataplane_testkit::{
    datapath::{addr, ct_key, Bpffs, Harness, TC_ACT_OK},
    packets::{endpoints, Tcp, Udp, ACK},
};

fn client() -> SocketAddrV4 {
    addr([10, 244, 1, 10], 40_000)
}
fn service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 80)
}
fn dns_service() -> SocketAddrV4 {
    addr([10, 96, 0, 10], 53)
}
fn first_backend() -> SocketAddrV4 {
    addr([10, 244, 2, 10], 8080)
}
/// The backend the earlier agent's flows went to.
fn flow_backend() -> SocketAddrV4 {
    addr([10, 244, 3, 10], 8080)
}
fn dns_backend() -> SocketAddrV4 {
    addr([10, 244, 3, 10], 53)
}

/// Name, bpftool type, key size, value size, capacity, flags of each map
/// of layout 2 (layout 1: the same maps without `LAYOUT`).
const LAYOUT_2: [(&str, &str, u32, u32, u32, u32); 11] = [
    ("SERVICE_IPS", "hash", 4, 4, 131_072, 1),
    ("SERVICES", "hash", 8, 16, 131_072, 1),
    ("BACKEND_SLOTS", "hash", 8, 4, 1_048_576, 1),
    ("BACKENDS", "hash", 4, 8, 262_144, 1),
    ("CONNTRACK", "lru_hash", 16, 48, 262_144, 0),
    ("COUNTERS", "percpu_array", 4, 8, 16, 0),
    ("SERVICE_NAMES", "hash", 4, 128, 131_072, 1),
    ("AFFINITY", "lru_hash", 8, 16, 131_072, 0),
    ("TRACE_CONFIG", "array", 4, 12, 1, 0),
    ("TRACE_EVENTS", "ringbuf", 0, 0, 262_144, 0),
    ("LAYOUT", "array", 4, 4, 1, 0),
];

fn bpftool_map(
    dir: &Path,
    (name, kind, key, value, entries, flags): (&str, &str, u32, u32, u32, u32),
) {
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(dir.join(name))
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .args(["flags", &flags.to_string()])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create {name}");
}

fn hash<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> BpfHashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join(name)).expect("a fixture map");
    BpfHashMap::try_from(Map::from_map_data(data).expect("a map")).expect("a hash map")
}

fn array<V: aya::Pod>(dir: &Path, name: &str) -> Array<MapData, V> {
    let data = MapData::from_pin(dir.join(name)).expect("a map");
    Array::try_from(Map::from_map_data(data).expect("a map")).expect("an array")
}

const SERVICE_ID: u32 = 1;
const FIRST_BACKEND_ID: u32 = 7;
const FLOW_BACKEND_ID: u32 = 8;

fn backend_value(b: SocketAddrV4, proto: u8) -> Backend {
    Backend {
        addr: ipv4_to_map(b.ip().octets()),
        port: port_to_map(b.port()),
        proto,
        flags: 0,
    }
}

/// Both conntrack entries of a flow from `client()` to `frontend` that an
/// earlier agent sent to `backend`.
fn flow(
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
    proto: u8,
    service_id: u32,
) -> [(CtKey, CtEntry); 2] {
    let now = dataplane_agent::node::pinned::monotonic_now_ns();
    let e = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        client_addr: ipv4_to_map(client().ip().octets()),
        service_addr: ipv4_to_map(frontend.ip().octets()),
        backend_addr: ipv4_to_map(backend.ip().octets()),
        client_port: port_to_map(client().port()),
        service_port: port_to_map(frontend.port()),
        backend_port: port_to_map(backend.port()),
        proto,
        backend_id: FLOW_BACKEND_ID + u32::from(proto == IPPROTO_UDP),
        state: ct_state::ESTABLISHED,
        flags: ct_flags::SEEN_REPLY,
        service_id,
        ..Default::default()
    };
    [(e.original_key(), e), (e.reply_key(), e)]
}

/// A conntrack entry as layout 1 stored it: `state` (0, 1, 2) right after
/// `proto`, then backend id, service id, flags.
fn layout_1_bytes(e: &CtEntry) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0..8].copy_from_slice(&e.created_ns.to_ne_bytes());
    b[8..16].copy_from_slice(&e.last_seen_ns.to_ne_bytes());
    b[16..20].copy_from_slice(&e.client_addr.to_ne_bytes());
    b[20..24].copy_from_slice(&e.service_addr.to_ne_bytes());
    b[24..28].copy_from_slice(&e.backend_addr.to_ne_bytes());
    b[28..30].copy_from_slice(&e.client_port.to_ne_bytes());
    b[30..32].copy_from_slice(&e.service_port.to_ne_bytes());
    b[32..34].copy_from_slice(&e.backend_port.to_ne_bytes());
    b[34] = e.proto;
    b[35] = 1; // established
    b[36..40].copy_from_slice(&e.backend_id.to_ne_bytes());
    b[40..44].copy_from_slice(&e.service_id.to_ne_bytes());
    b[44] = e.flags;
    b
}

/// The maps an agent of layout `version` (1 or 2) left pinned, with
/// `SERVICES` of `services_capacity` entries.
fn earlier_agent_maps(version: u32, services_capacity: u32) -> Bpffs {
    let bpffs = Bpffs::new().expect("a bpffs");
    let dir = bpffs.path();
    for mut map in LAYOUT_2 {
        if map.0 == map_names::LAYOUT && version < 2 {
            continue;
        }
        if map.0 == map_names::SERVICES {
            map.4 = services_capacity;
        }
        bpftool_map(dir, map);
    }
    if version >= 2 {
        let data = MapData::from_pin(dir.join(map_names::LAYOUT)).expect("LAYOUT");
        let mut layout: Array<MapData, u32> = Array::try_from(Map::Array(data)).expect("array");
        layout.set(0, version, 0).expect("stamping the fixture");
    }
    let svc_ip = ipv4_to_map(service().ip().octets());
    hash::<u32, u32>(dir, map_names::SERVICE_IPS)
        .insert(svc_ip, 2, 0)
        .expect("SERVICE_IPS");
    // Layout 2's `ServiceValue` (service id, backend count, flags, affinity
    // timeout) and `BackendSlotKey` (service id, slot).
    let mut services = hash::<ServiceKey, [u32; 4]>(dir, map_names::SERVICES);
    let mut slots = hash::<[u32; 2], u32>(dir, map_names::BACKEND_SLOTS);
    let mut backends = hash::<u32, Backend>(dir, map_names::BACKENDS);
    for (frontend, proto, service_id, ids) in [
        (
            service(),
            IPPROTO_TCP,
            SERVICE_ID,
            vec![FIRST_BACKEND_ID, FLOW_BACKEND_ID],
        ),
        (
            dns_service(),
            IPPROTO_UDP,
            SERVICE_ID + 1,
            vec![FLOW_BACKEND_ID + 1],
        ),
    ] {
        let key = ServiceKey {
            addr: svc_ip,
            port: port_to_map(frontend.port()),
            proto,
            _pad: 0,
        };
        let value = [service_id, ids.len() as u32, 0, 0];
        services.insert(key, value, 0).expect("SERVICES");
        for (slot, id) in ids.into_iter().enumerate() {
            slots
                .insert([service_id, slot as u32], id, 0)
                .expect("BACKEND_SLOTS");
        }
    }
    for (id, b, proto) in [
        (FIRST_BACKEND_ID, first_backend(), IPPROTO_TCP),
        (FLOW_BACKEND_ID, flow_backend(), IPPROTO_TCP),
        (FLOW_BACKEND_ID + 1, dns_backend(), IPPROTO_UDP),
    ] {
        backends
            .insert(id, backend_value(b, proto), 0)
            .expect("BACKENDS");
    }
    let mut conntrack = hash::<CtKey, [u8; 48]>(dir, map_names::CONNTRACK);
    let flows = flow(service(), flow_backend(), IPPROTO_TCP, SERVICE_ID)
        .into_iter()
        .chain(flow(
            dns_service(),
            dns_backend(),
            IPPROTO_UDP,
            SERVICE_ID + 1,
        ));
    for (key, entry) in flows {
        let bytes = if version < 2 {
            layout_1_bytes(&entry)
        } else {
            bytemuck::cast(entry)
        };
        conntrack.insert(key, bytes, 0).expect("CONNTRACK");
    }
    bpffs
}

/// The new agent's start on those maps: load, first full sync (the same
/// services and endpoints), programs switched, migration committed.
fn upgrade(bpffs: Bpffs, config: &DatapathConfig) -> Harness {
    let mut dp = Harness::load_on(bpffs, config).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(dp.datapath.is_migrating(), "the earlier maps are migrated");
    dp.set_service(
        "web",
        service(),
        Protocol::Tcp,
        &[first_backend(), flow_backend()],
    );
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    dp.datapath
        .commit_migration()
        .unwrap_or_else(|e| panic!("{e:#}"));
    dp
}

/// The flows of the fixture go on where they went: the TCP flow's next
/// segment and its reply, the UDP flow's next datagram, all as established
/// flows (no new backend choice).
fn assert_flows_continue(dp: &Harness) {
    let before = dp.counters();
    let ack = Tcp::new(client(), service(), ACK)
        .seq(1_000)
        .ack(2_000)
        .build();
    let run = dp.run_from_pod(&ack);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(
        endpoints(&run.output).1,
        flow_backend(),
        "the TCP flow keeps its backend"
    );
    let reply = Tcp::new(flow_backend(), client(), ACK)
        .seq(2_000)
        .ack(1_000)
        .build();
    let run = dp.run_to_pod(&reply);
    assert_eq!(
        endpoints(&run.output).0,
        service(),
        "the reply comes from the service"
    );
    let query = Udp::new(client(), dns_service()).payload(b"q").build();
    let run = dp.run_from_pod(&query);
    assert_eq!(
        endpoints(&run.output).1,
        dns_backend(),
        "the UDP flow keeps its backend"
    );

    let delta = |c: Counter| {
        let was = before.iter().find(|(x, _)| *x == c).map_or(0, |(_, v)| *v);
        dp.counter(c) - was
    };
    assert_eq!(delta(Counter::Established), 2, "both flows established");
    assert_eq!(delta(Counter::ReplyTranslated), 1);
    assert_eq!(delta(Counter::NewFlow), 0, "no flow started over");
    assert_eq!(delta(Counter::ResetBackendGone), 0, "no flow reset");
}

fn assert_layout_is_this_agents(dp: &Harness) {
    let dir = dp.bpffs();
    assert!(
        !dir.join(map_names::CONNTRACK).exists(),
        "CONNTRACK unpinned"
    );
    assert!(dir.join(map_names::CT_TCP).exists() && dir.join(map_names::CT_OTHER).exists());
    assert!(!dir.join("migrating").exists(), "nothing left staged");
    let data = MapData::from_pin(dir.join(map_names::LAYOUT)).expect("LAYOUT");
    let layout: Array<MapData, u32> = Array::try_from(Map::Array(data)).expect("array");
    assert_eq!(layout.get(&0, 0).expect("version"), LAYOUT_VERSION);
}

#[test]
fn flows_of_a_layout_2_agent_keep_their_backends_after_the_upgrade() {
    let bpffs = earlier_agent_maps(2, 131_072);

    let dp = upgrade(bpffs, &DatapathConfig::default());

    let tcp = dp
        .conntrack
        .tcp
        .get(
            &ct_key(client(), service(), Protocol::Tcp, ct_dir::ORIGINAL),
            0,
        )
        .expect("the TCP flow is in CT_TCP");
    assert_eq!(tcp.state, ct_state::ESTABLISHED);
    assert!(
        dp.conntrack
            .other
            .get(
                &ct_key(client(), dns_service(), Protocol::Udp, ct_dir::ORIGINAL),
                0
            )
            .is_ok(),
        "the UDP flow is in CT_OTHER"
    );
    assert_flows_continue(&dp);
    assert_layout_is_this_agents(&dp);
}

/// A load-balancing map of another shape (as a `ServiceKey` change makes)
/// is created anew and filled by the sync; the backend ids the flows name
/// are carried over, so the flows keep their backends.
#[test]
fn refilled_load_balancing_maps_keep_the_backend_ids_of_open_flows() {
    let bpffs = earlier_agent_maps(2, 65_536);

    let dp = upgrade(bpffs, &DatapathConfig::default());

    assert_flows_continue(&dp);
    assert_layout_is_this_agents(&dp);
}

/// Until the switch the previous programs keep running on the old maps:
/// what they do between the first copy and the switch (a FIN on a flow, a
/// new flow) is carried by the catch-up after it.
#[test]
fn flows_the_previous_programs_move_on_or_open_before_the_switch_are_carried() {
    let bpffs = earlier_agent_maps(2, 131_072);
    let mut dp =
        Harness::load_on(bpffs, &DatapathConfig::default()).unwrap_or_else(|e| panic!("{e:#}"));
    dp.set_service(
        "web",
        service(),
        Protocol::Tcp,
        &[first_backend(), flow_backend()],
    );
    dp.set_service("dns", dns_service(), Protocol::Udp, &[dns_backend()]);
    // The previous programs, after the first copy: the client sends a FIN,
    // and another client port opens a flow.
    let mut old = hash::<CtKey, [u8; 48]>(dp.bpffs(), map_names::CONNTRACK);
    let [(key, mut entry), _] = flow(service(), flow_backend(), IPPROTO_TCP, SERVICE_ID);
    entry.last_seen_ns += 1_000_000;
    entry.flags |= ct_flags::FIN_ORIGINAL;
    old.insert(key, bytemuck::cast::<CtEntry, [u8; 48]>(entry), 0)
        .expect("the FIN");
    let mut opened = entry;
    opened.client_port = port_to_map(40_001);
    opened.flags = ct_flags::SEEN_REPLY;
    for key in [opened.original_key(), opened.reply_key()] {
        old.insert(key, bytemuck::cast::<CtEntry, [u8; 48]>(opened), 0)
            .expect("the new flow");
    }

    dp.datapath
        .commit_migration()
        .unwrap_or_else(|e| panic!("{e:#}"));

    let carried = dp.conntrack.tcp.get(&key, 0).expect("the flow");
    assert_ne!(
        carried.flags & ct_flags::FIN_ORIGINAL,
        0,
        "the FIN is carried"
    );
    assert_eq!(carried.last_seen_ns, entry.last_seen_ns);
    assert!(
        dp.conntrack.tcp.get(&opened.reply_key(), 0).is_ok(),
        "the flow opened before the switch is carried, reply entry too"
    );
}

/// The first full sync after the upgrade no longer lists the flow's
/// backend: it is gone for good (the flow is reset), not brought back by
/// the catch-up copy after the switch.
#[test]
fn a_backend_the_first_sync_removed_stays_removed_after_the_switch() {
    let bpffs = earlier_agent_maps(2, 65_536);
    let mut dp =
        Harness::load_on(bpffs, &DatapathConfig::default()).unwrap_or_else(|e| panic!("{e:#}"));
    dp.sync_all(&[
        ("web", service(), Protocol::Tcp, &[first_backend()]),
        ("dns", dns_service(), Protocol::Udp, &[dns_backend()]),
    ]);

    dp.datapath
        .commit_migration()
        .unwrap_or_else(|e| panic!("{e:#}"));

    let backends = array::<Backend>(dp.bpffs(), map_names::BACKENDS);
    assert_eq!(
        backends.get(&FLOW_BACKEND_ID, 0).expect("BACKENDS entry"),
        Backend::default(),
        "the removed backend is not back in BACKENDS"
    );
    let ack = Tcp::new(client(), service(), ACK)
        .seq(1_000)
        .ack(2_000)
        .build();
    dp.run_from_pod(&ack);
    assert_eq!(
        dp.counter(Counter::ResetBackendGone),
        1,
        "its flow is reset"
    );
}

#[test]
fn flows_of_an_agent_before_layout_versions_keep_their_backends_after_the_upgrade() {
    let bpffs = earlier_agent_maps(1, 131_072);

    let dp = upgrade(bpffs, &DatapathConfig::default());

    assert_flows_continue(&dp);
    assert_layout_is_this_agents(&dp);
}

#[test]
fn a_restart_with_other_conntrack_sizes_carries_the_flows_into_maps_of_those_sizes() {
    let dp = upgrade(earlier_agent_maps(2, 131_072), &DatapathConfig::default());
    let config = DatapathConfig {
        ct_max_tcp: 4_096,
        ct_max_other: 1_024,
        ..DatapathConfig::default()
    };

    let dp = upgrade(dp.into_bpffs(), &config);

    let tcp = aya::maps::MapInfo::from_pin(dp.bpffs().join(map_names::CT_TCP)).expect("CT_TCP");
    let other =
        aya::maps::MapInfo::from_pin(dp.bpffs().join(map_names::CT_OTHER)).expect("CT_OTHER");
    assert_eq!((tcp.max_entries(), other.max_entries()), (4_096, 1_024));
    assert_flows_continue(&dp);
}

#[test]
fn a_newer_layout_is_refused_with_what_to_do() {
    let bpffs = earlier_agent_maps(LAYOUT_VERSION + 1, 131_072);

    let error = match Harness::load_on(bpffs, &DatapathConfig::default()) {
        Ok(_) => panic!("maps of a newer layout were adopted"),
        Err(e) => format!("{e:#}"),
    };

    assert!(
        error.contains("newer than this agent's") && error.contains("dataplane-agent cleanup"),
        "{error}"
    );
}
