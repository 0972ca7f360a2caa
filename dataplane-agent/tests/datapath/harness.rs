// Shared by several test binaries, each using a part of it.
#![allow(dead_code)]

//! A freshly loaded datapath per test: its own bpffs (so no two tests share a
//! pinned map), the maps filled through the agent's sync engine, and the tc
//! programs run under BPF_PROG_TEST_RUN.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use dataplane_agent::{
    control::{
        model::{BackendAddr, Frontend, FrontendSpec, ObjectRef, Protocol},
        sync::SyncEngine,
    },
    node::{
        bpffs::ensure_bpffs,
        datapath::{Datapath, DatapathMaps},
        lb_maps::BpfLbMaps,
        pinned::{ConntrackMap, CounterMap},
    },
};
use dataplane_common::{
    ipv4_to_map, map_names, port_to_map, AffinityEntry, AffinityKey, Counter, CtEntry, CtKey,
    IPPROTO_TCP, IPPROTO_UDP,
};
use nix::mount::{umount2, MntFlags};
use tempfile::TempDir;

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// A bpffs mounted on a temporary directory, unmounted when dropped.
struct BpffsGuard {
    dir: TempDir,
}

impl Drop for BpffsGuard {
    fn drop(&mut self) {
        // Lazy unmount: the maps go away with the last fd that holds them.
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

/// What one program run returned.
#[derive(Debug)]
pub struct Run {
    pub verdict: i32,
    pub output: Vec<u8>,
}

pub struct Harness {
    datapath: Datapath,
    pub conntrack: ConntrackMap,
    counters: CounterMap,
    engine: SyncEngine<BpfLbMaps>,
    // Last: unmounted after everything above closed its fds.
    _bpffs: BpffsGuard,
}

impl Harness {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("datapath-test-")
            .tempdir()
            .expect("temporary directory");
        ensure_bpffs(dir.path()).expect("mounting a bpffs for the test");
        let guard = BpffsGuard { dir };
        let (
            datapath,
            DatapathMaps {
                lb,
                conntrack,
                counters,
            },
        ) = Datapath::load(guard.dir.path()).expect("loading the datapath (root and BPF needed)");
        let engine = SyncEngine::adopt(lb).expect("adopting the fresh maps");
        Self {
            datapath,
            conntrack,
            counters,
            engine,
            _bpffs: guard,
        }
    }

    /// Makes service `name` hold exactly one frontend with these backends
    /// (none: a service without endpoints).
    pub fn set_service(
        &mut self,
        name: &str,
        frontend: SocketAddrV4,
        proto: Protocol,
        backends: &[SocketAddrV4],
    ) {
        self.set_service_with(name, frontend, proto, backends, |_| {});
    }

    /// [`Harness::set_service`] with the spec adjusted by `configure`
    /// (session affinity, traffic policy).
    pub fn set_service_with(
        &mut self,
        name: &str,
        frontend: SocketAddrV4,
        proto: Protocol,
        backends: &[SocketAddrV4],
        configure: impl FnOnce(&mut FrontendSpec),
    ) {
        let service = ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        };
        let spec = FrontendSpec {
            service: service.clone(),
            port_name: None,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    ip: *b.ip(),
                    port: b.port(),
                })
                .collect(),
            affinity_timeout_s: None,
            drop_without_local_endpoints: false,
        };
        let mut spec = spec;
        configure(&mut spec);
        let frontend = Frontend {
            ip: *frontend.ip(),
            port: frontend.port(),
            proto,
        };
        self.engine
            .sync_service(&service, &[(frontend, spec)])
            .expect("syncing the service into the maps");
    }

    /// Runs `from_pod` or `to_pod` on `packet`; Err if the kernel refused the run.
    pub fn try_run(
        &self,
        program: &str,
        packet: &[u8],
    ) -> Result<Run, aya::programs::ProgramError> {
        self.try_run_with_context(program, packet, None)
    }

    /// Runs `program` on `packet` as a GSO super-packet (BIG TCP) of
    /// `gso_segs` segments of `gso_size` bytes.
    pub fn run_gso(&self, program: &str, packet: &[u8], gso_size: u32, gso_segs: u32) -> Run {
        // The test run's `struct __sk_buff` up to `gso_size`; every other
        // field it accepts stays 0.
        const GSO_SEGS_OFF: usize = 164;
        const GSO_SIZE_OFF: usize = 176;
        let mut skb = [0u8; GSO_SIZE_OFF + 4];
        skb[GSO_SEGS_OFF..GSO_SEGS_OFF + 4].copy_from_slice(&gso_segs.to_ne_bytes());
        skb[GSO_SIZE_OFF..].copy_from_slice(&gso_size.to_ne_bytes());
        self.try_run_with_context(program, packet, Some(&skb))
            .unwrap_or_else(|e| panic!("test run of {program} failed: {e}"))
    }

    fn try_run_with_context(
        &self,
        program: &str,
        packet: &[u8],
        skb: Option<&[u8]>,
    ) -> Result<Run, aya::programs::ProgramError> {
        let classifier = self
            .datapath
            .classifier(program)
            .expect("program is loaded");
        // Room for a reply that is larger than the packet (ICMP quotes it).
        let mut output = vec![0u8; packet.len() + 256];
        let result = classifier.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut output),
            ctx_in: skb,
            ..Default::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value as i32,
            output,
        })
    }

    pub fn run(&self, program: &str, packet: &[u8]) -> Run {
        self.try_run(program, packet)
            .unwrap_or_else(|e| panic!("test run of {program} failed: {e}"))
    }

    pub fn run_from_pod(&self, packet: &[u8]) -> Run {
        self.run("from_pod", packet)
    }

    pub fn run_to_pod(&self, packet: &[u8]) -> Run {
        self.run("to_pod", packet)
    }

    /// Sum of a counter over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        let values = self
            .counters
            .get(&(counter as u32), 0)
            .expect("reading COUNTERS");
        values.iter().sum()
    }

    /// All counters, to compare before and after a run.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (*c, self.counter(*c)))
            .collect()
    }

    /// The bpffs directory the maps are pinned in (for `inspect`).
    pub fn bpffs(&self) -> &std::path::Path {
        self._bpffs.dir.path()
    }

    /// The pinned `AFFINITY` map, opened as an operator's tool would.
    pub fn affinity(&self) -> BpfHashMap<MapData, AffinityKey, AffinityEntry> {
        let pin = self._bpffs.dir.path().join(map_names::AFFINITY);
        let map = MapData::from_pin(&pin).expect("opening the pinned AFFINITY map");
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("AFFINITY is an LRU hash map")
    }

    pub fn ct_get(&self, key: &CtKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok()
    }

    pub fn ct_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }
}

/// Conntrack key in the maps' byte order.
pub fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: Protocol, direction: u8) -> CtKey {
    CtKey {
        src_addr: ipv4_to_map(src.ip().octets()),
        dst_addr: ipv4_to_map(dst.ip().octets()),
        src_port: port_to_map(src.port()),
        dst_port: port_to_map(dst.port()),
        proto: proto_number(proto),
        direction,
        _pad: [0; 2],
    }
}

pub fn proto_number(proto: Protocol) -> u8 {
    match proto {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

pub fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}
