//! The datapath loaded through the agent's own code on a private bpffs (so
//! no two users share a pinned map), its maps programmed with the agent's
//! sync engine, its tc programs run under BPF_PROG_TEST_RUN. The datapath
//! tests and the bench's per-packet figures both run it through here.

use std::{
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{ProgramError, TestRun as _, TestRunOptions},
};
use dataplane_agent::{
    control::{
        model::{BackendAddr, Frontend, FrontendSpec, ObjectRef, Protocol},
        sync::SyncEngine,
    },
    node::{
        bpffs::ensure_bpffs,
        datapath::{Datapath, DatapathConfig, DatapathMaps},
        lb_maps::BpfLbMaps,
        pinned::{ConntrackMaps, CounterMap},
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
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// A bpffs mounted on a temporary directory, unmounted when dropped.
pub struct Bpffs {
    dir: TempDir,
}

/// Prefix of every test bpffs directory; the creating process's pid
/// follows it, so a later run can tell whose mount is left over.
const BPFFS_PREFIX: &str = "dataplane-bpffs-";

impl Bpffs {
    pub fn new() -> anyhow::Result<Self> {
        sweep_stale_bpffs(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{BPFFS_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating a directory for a bpffs")?;
        ensure_bpffs(dir.path()).context("mounting a bpffs")?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazy unmount: the maps go away with the last fd that holds them.
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

/// Unmounts and removes the bpffs directories of test processes that no
/// longer exist: a killed test run never reaches `Bpffs`'s `Drop`, and its
/// mounts would otherwise pile up under the temporary directory. Best
/// effort; a directory of a live process (another test binary running in
/// parallel) is left alone.
fn sweep_stale_bpffs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(BPFFS_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let _ = umount2(&entry.path(), MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(entry.path());
    }
}

/// What one program run returned.
#[derive(Debug)]
pub struct Run {
    pub verdict: i32,
    pub output: Vec<u8>,
    /// The kernel's measure of one run (the mean, with repeat > 1).
    pub duration: Duration,
}

pub struct Harness {
    pub datapath: Datapath,
    pub conntrack: ConntrackMaps,
    counters: CounterMap,
    /// SNAT address and ports of the external datapath.
    pub nat_config: aya::maps::Array<MapData, dataplane_common::NatConfig>,
    /// Programs the maps, as the agent does.
    pub engine: SyncEngine<BpfLbMaps>,
    // Last: unmounted after everything above closed its fds.
    bpffs: Bpffs,
}

impl Harness {
    /// A freshly loaded datapath; panics (with the reason) where it cannot
    /// be loaded, e.g. without root.
    #[expect(
        clippy::new_without_default,
        reason = "loading needs root and BPF and can fail; a Default that panics would hide that"
    )]
    pub fn new() -> Self {
        Self::load().unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn load() -> anyhow::Result<Self> {
        Self::load_on(Bpffs::new()?, &DatapathConfig::default())
    }

    /// The datapath loaded on `bpffs` as it is (e.g. holding maps of an
    /// earlier layout, made by the test), with `config`. A migration is
    /// left pending: fill the maps, then `datapath.commit_migration()`.
    pub fn load_on(bpffs: Bpffs, config: &DatapathConfig) -> anyhow::Result<Self> {
        let (
            datapath,
            DatapathMaps {
                lb,
                conntrack,
                conntrack6,
                counters,
                nat_config,
                ..
            },
        ) = Datapath::load_with(bpffs.path(), config)
            .context("loading the datapath (needs root, BPF, and `cargo xtask build`)")?;
        let mut engine = SyncEngine::adopt(lb).context("adopting the fresh maps")?;
        // As the agent does: flows left by an earlier load (an upgrade
        // test's) keep their backends' replies looked up.
        let (carried, carried6) = datapath.flows_carried(&conntrack, &conntrack6);
        engine.set_flows_carried(carried);
        engine.set_flows_carried6(carried6);
        Ok(Self {
            datapath,
            conntrack,
            counters,
            nat_config,
            engine,
            bpffs,
        })
    }

    /// Stops this datapath (programs unloaded, nothing attached) and keeps
    /// its pinned maps, for the next start (`load_on`).
    pub fn into_bpffs(self) -> Bpffs {
        let Self {
            datapath,
            conntrack,
            counters,
            nat_config,
            engine,
            bpffs,
        } = self;
        drop((engine, nat_config, counters, conntrack, datapath));
        bpffs
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
        let frontend = Frontend::cluster_ip(*frontend.ip(), frontend.port(), proto);
        self.set_frontend_with(name, frontend, backends, configure);
    }

    /// A full sync (as the agent's first after a start) to exactly these
    /// services, one frontend each: anything else the maps hold goes,
    /// backends adopted without a slot included.
    pub fn sync_all(&mut self, services: &[(&str, SocketAddrV4, Protocol, &[SocketAddrV4])]) {
        let all = services.iter().map(|(name, frontend, proto, backends)| {
            let (service, spec) = plain_spec(name, backends);
            let frontend = Frontend::cluster_ip(*frontend.ip(), frontend.port(), *proto);
            (service, vec![(frontend, spec)])
        });
        let (_, errors) = self.engine.sync_all(all);
        assert!(errors.is_empty(), "full sync: {errors:?}");
    }

    /// Programs one frontend of any scope (a NodePort is
    /// `Frontend::node_port`), its spec adjusted by `configure` (traffic
    /// policy, local endpoints, source ranges).
    pub fn set_frontend_with(
        &mut self,
        name: &str,
        frontend: Frontend,
        backends: &[SocketAddrV4],
        configure: impl FnOnce(&mut FrontendSpec),
    ) {
        let (service, mut spec) = plain_spec(name, backends);
        configure(&mut spec);
        self.engine
            .sync_service(&service, &[(frontend, spec)])
            .expect("syncing the frontend into the maps");
    }

    /// [`Harness::set_frontend_with`] of an IPv6 frontend, through the
    /// sync engine as the agent writes it.
    pub fn set_frontend6_with(
        &mut self,
        name: &str,
        frontend: Frontend,
        backends: &[SocketAddrV6],
        configure: impl FnOnce(&mut FrontendSpec),
    ) {
        let (service, mut spec) = plain_spec(name, &[]);
        spec.backends = backend_addrs(backends);
        configure(&mut spec);
        self.engine
            .sync_service(&service, &[(frontend, spec)])
            .expect("syncing the IPv6 frontend into the maps");
    }

    /// A full sync to exactly these IPv6 cluster-IP services (as
    /// [`Harness::sync_all`]).
    pub fn sync_all6(&mut self, services: &[(&str, SocketAddrV6, Protocol, &[SocketAddrV6])]) {
        let all = services.iter().map(|(name, frontend, proto, backends)| {
            let (service, mut spec) = plain_spec(name, &[]);
            spec.backends = backend_addrs(backends);
            let frontend = Frontend::cluster_ip(*frontend.ip(), frontend.port(), *proto);
            (service, vec![(frontend, spec)])
        });
        let (_, errors) = self.engine.sync_all(all);
        assert!(errors.is_empty(), "full sync: {errors:?}");
    }

    /// This node's IPv6 addresses, on which IPv6 NodePorts are served.
    pub fn set_node_addresses6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        self.engine
            .set_node_addresses6(addrs)
            .expect("writing the node's IPv6 addresses");
    }

    /// This node's addresses, on which NodePorts are served.
    pub fn set_node_addresses(&mut self, addrs: &[Ipv4Addr]) {
        self.engine
            .set_node_addresses(addrs)
            .expect("writing the node addresses");
    }

    /// SNAT address and port range of the external datapath.
    pub fn set_snat(&mut self, addr: Ipv4Addr, port_min: u16, port_max: u16) {
        let config = dataplane_common::NatConfig {
            snat_addr: ipv4_to_map(addr.octets()),
            port_min,
            port_max,
        };
        self.nat_config
            .set(0, config, 0)
            .expect("writing NAT_CONFIG");
    }

    /// The pinned `NAT` map.
    pub fn nat(&self) -> BpfHashMap<MapData, dataplane_common::NatKey, dataplane_common::NatEntry> {
        let pin = self.bpffs().join(map_names::NAT);
        let map = MapData::from_pin(&pin).expect("opening the pinned NAT map");
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("NAT is an LRU hash map")
    }

    /// Runs program `program` (`from_pod`, `to_pod`, ...) on `packet`; Err
    /// if the kernel refused the run.
    pub fn try_run(&self, program: &str, packet: &[u8]) -> Result<Run, ProgramError> {
        self.run_repeat(program, packet, 1)
    }

    /// Runs `program` `repeat` times on `packet` in one BPF_PROG_TEST_RUN.
    /// The kernel does not restore the packet between repetitions: from the
    /// second on, a translated packet is no longer the one given.
    pub fn run_repeat(
        &self,
        program: &str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        self.run_with_context(program, packet, repeat, None)
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
        self.run_with_context(program, packet, 1, Some(&skb))
            .unwrap_or_else(|e| panic!("test run of {program} failed: {e}"))
    }

    fn run_with_context(
        &self,
        program: &str,
        packet: &[u8],
        repeat: u32,
        skb: Option<&[u8]>,
    ) -> Result<Run, ProgramError> {
        let classifier = self
            .datapath
            .classifier(program)
            .unwrap_or_else(|e| panic!("program {program}: {e}"));
        // Room for a reply that is larger than the packet (ICMP quotes it).
        let mut output = vec![0u8; packet.len() + 256];
        let result = classifier.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut output),
            ctx_in: skb,
            repeat,
            ..Default::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value as i32,
            output,
            duration: result.duration,
        })
    }

    /// Runs `program` on `packet` as if it was on interface `ifindex` (of
    /// the test's network namespace).
    pub fn run_on(&self, program: &str, packet: &[u8], ifindex: u32) -> Run {
        self.try_run_on(program, packet, ifindex, 1)
            .unwrap_or_else(|e| panic!("test run of {program} on interface {ifindex} failed: {e}"))
    }

    /// [`Harness::run_on`] `repeat` times in one BPF_PROG_TEST_RUN (the
    /// packet is not restored between repetitions); Err if the kernel
    /// refused the run.
    pub fn try_run_on(
        &self,
        program: &str,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        // The test run's `struct __sk_buff` up to `ifindex`; every other
        // field it accepts stays 0.
        const IFINDEX_OFF: usize = 40;
        let mut skb = [0u8; IFINDEX_OFF + 4];
        skb[IFINDEX_OFF..].copy_from_slice(&ifindex.to_ne_bytes());
        self.run_with_context(program, packet, repeat, Some(&skb))
    }

    pub fn run(&self, program: &str, packet: &[u8]) -> Run {
        self.try_run(program, packet)
            .unwrap_or_else(|e| panic!("test run of {program} failed: {e}"))
    }

    /// Runs the uplink's XDP program on `packet`.
    pub fn run_xdp(&self, packet: &[u8]) -> Run {
        let xdp = self
            .datapath
            .xdp()
            .unwrap_or_else(|e| panic!("XDP program: {e}"));
        let mut output = vec![0u8; packet.len() + 256];
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut output),
                repeat: 1,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of the XDP program failed: {e}"));
        output.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value as i32,
            output,
            duration: result.duration,
        }
    }

    /// Runs the uplink's XDP program on `packet` as if it arrived on
    /// interface `ifindex` (of the test's network namespace), so that a
    /// next hop out of that interface is sent back out with XDP_TX.
    pub fn run_xdp_on(&self, packet: &[u8], ifindex: u32) -> Run {
        self.try_run_xdp_on(packet, ifindex, 1)
            .unwrap_or_else(|e| panic!("test run of the XDP program on {ifindex} failed: {e}"))
    }

    /// [`Harness::run_xdp_on`] `repeat` times in one BPF_PROG_TEST_RUN (the
    /// packet is not restored between repetitions); Err if the kernel
    /// refused the run.
    pub fn try_run_xdp_on(
        &self,
        packet: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        let xdp = self
            .datapath
            .xdp()
            .unwrap_or_else(|e| panic!("XDP program: {e}"));
        // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex; the test run wants data_end to be
        // the packet's length and the rest but the interface 0.
        let mut md = [0u32; 6];
        md[1] = packet.len() as u32;
        md[3] = ifindex;
        let md: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut output = vec![0u8; packet.len() + 256];
        let result = xdp.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut output),
            ctx_in: Some(&md),
            repeat,
            ..Default::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value as i32,
            output,
            duration: result.duration,
        })
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
    pub fn bpffs(&self) -> &Path {
        self.bpffs.path()
    }

    /// The pinned `AFFINITY` map, opened as an operator's tool would.
    pub fn affinity(&self) -> BpfHashMap<MapData, AffinityKey, AffinityEntry> {
        let pin = self.bpffs().join(map_names::AFFINITY);
        let map = MapData::from_pin(&pin).expect("opening the pinned AFFINITY map");
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("AFFINITY is an LRU hash map")
    }

    pub fn ct_get(&self, key: &CtKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok()
    }

    pub fn ct_len(&self) -> usize {
        let (tcp, other) = self.conntrack.lens();
        tcp + other
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

/// The model's addresses of `backends` (either family).
fn backend_addrs<A: Copy + Into<std::net::SocketAddr>>(backends: &[A]) -> Vec<BackendAddr> {
    backends
        .iter()
        .map(|&b| {
            let b: std::net::SocketAddr = b.into();
            BackendAddr {
                ip: b.ip(),
                port: b.port(),
            }
        })
        .collect()
}

/// Service `default/name` with these ready backends and nothing else set
/// (no affinity, cluster policies, no external options).
fn plain_spec(name: &str, backends: &[SocketAddrV4]) -> (ObjectRef, FrontendSpec) {
    let service = ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    };
    let spec = FrontendSpec {
        service: service.clone(),
        port_name: None,
        backends: backend_addrs(backends),
        draining: Vec::new(),
        affinity_timeout_s: None,
        drop_without_local_endpoints: false,
        masquerade_remote: false,
        local_ips: Vec::new(),
        source_ranges: Vec::new(),
        source_ranges6: Vec::new(),
    };
    (service, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_bpffs_dirs_of_dead_processes_only() {
        let tmp = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this pid cannot exist.
        let dead = tmp.path().join(format!("{BPFFS_PREFIX}4294967295-abc"));
        let live = tmp
            .path()
            .join(format!("{BPFFS_PREFIX}{}-abc", std::process::id()));
        let other = tmp.path().join("unrelated-4294967295");
        for dir in [&dead, &live, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        sweep_stale_bpffs(tmp.path());
        assert!(!dead.exists(), "a dead process's directory stays");
        assert!(live.exists(), "this process's directory was removed");
        assert!(other.exists(), "a directory that is not ours was removed");
    }
}
