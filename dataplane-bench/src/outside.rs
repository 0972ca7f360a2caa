//! End to end from outside the cluster: the lab's outside client behind its
//! router connects to a NodePort on node 1 whose one backend is a pod on
//! node 2 (policy Cluster: node 1 DNATs, SNATs to its own address and sends
//! the packet back out of its uplink). Every system gets its own lab.
//!
//! Systems: the agent's uplink program in XDP (as `auto` picks it on the
//! veth uplink: generic), XDP asked native, and tc; kube-proxy's iptables
//! and nftables NodePort layouts; and the limit, the client connecting to
//! the backend pod's address with node 1 as its router both ways (no
//! translation, the same hops). Measured as the pod-client case
//! (`crate::e2e`): interleaved rounds, ratios paired per round.
//!
//! The wire: native XDP_TX on node 1's veth uplink reaches the router only
//! if the router's end of the pair runs an XDP program (on this kernel a
//! GRO-enabled peer is not enough: the frames are counted as sent and never
//! arrive). Every lab therefore gets an XDP program that passes everything
//! on the router's ends of both nodes' uplinks, so every system crosses the
//! same wire.
//!
//! SNAT ports: node 1's ephemeral ports are 60000-65535 on every system, the
//! agent's SNAT range 1024-59999 (kube-proxy's MASQUERADE takes 1024-65535).
//! With the default range (61000-65535) a closed flow holds its port for the
//! 10 s closing lifetime, so a connection loop faster than ~450/s runs out.
//!
//! Families: every system is measured over IPv4 and over IPv6 (an
//! IPv6-only pod network; the outside client, the router and the NodePort
//! on node 1's IPv6 address; kube-proxy's ip6tables and `ip6` nftables
//! layouts), all cases of a scale interleaved in the same rounds, each
//! family's ratios to routed over that family.

use std::{
    any::Any,
    net::{IpAddr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use dataplane_agent::control::model::{BackendAddr, IpFamily};
use dataplane_lab::{
    agent::{agent_bin, Agent, Source},
    netns::{self, ip, sysctl},
    topology::{
        node_ip, node_ip6, pod_cidr6, unique_prefix, OUTSIDE_CLIENT_IP, OUTSIDE_CLIENT_IP6,
    },
    CrossNode, Lab, LabSpec, PodSpec, Topology,
};
use dataplane_testkit::datapath::Bpffs;

use crate::{
    e2e::{load, measure_round, median_f64, rounds_ratio_spread, wait_ready, Round, Server},
    kubeproxy_rules::{self, iptables_restore_of},
    scenario::{self, TARGET_PORT},
};

/// The backend pod, on node 2.
const BACKEND: &str = "srv";
const BACKEND_HOST: u8 = 10;
/// The node the client connects to.
const ENTRY_NODE: u8 = 1;
const SNAT_PORTS: &str = "1024-59999";
const NODE_EPHEMERAL_PORTS: &str = "60000 65535";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutsideSystem {
    /// To the backend pod's address, node 1 routing (no service).
    Routed,
    /// The agent, `--external-datapath xdp` (`--xdp-mode auto`).
    Xdp,
    /// The agent, `--xdp-mode native`.
    XdpNative,
    /// The agent, `--external-datapath tc`.
    Tc,
    Iptables,
    Nftables,
}

impl OutsideSystem {
    pub const ALL: [OutsideSystem; 6] = [
        OutsideSystem::Routed,
        OutsideSystem::Xdp,
        OutsideSystem::XdpNative,
        OutsideSystem::Tc,
        OutsideSystem::Iptables,
        OutsideSystem::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            OutsideSystem::Routed => "routed to the pod (no service)",
            OutsideSystem::Xdp => "eBPF XDP (auto)",
            OutsideSystem::XdpNative => "eBPF XDP native",
            OutsideSystem::Tc => "eBPF tc",
            OutsideSystem::Iptables => "kube-proxy iptables",
            OutsideSystem::Nftables => "kube-proxy nftables",
        }
    }
}

/// The lab's addresses a case uses, in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// Node 1's address on the nodes' network: the NodePort's.
    entry_node: IpAddr,
    /// The outside client's address.
    client: IpAddr,
    /// Node 2's pod CIDR, where the backend pod lives.
    backend_pods: String,
}

impl Plan {
    fn of(family: IpFamily) -> Self {
        match family {
            IpFamily::Ipv4 => Self {
                entry_node: node_ip(ENTRY_NODE).into(),
                client: OUTSIDE_CLIENT_IP.into(),
                backend_pods: "10.244.2.0/24".into(),
            },
            IpFamily::Ipv6 => Self {
                entry_node: node_ip6(ENTRY_NODE).into(),
                client: OUTSIDE_CLIENT_IP6.into(),
                backend_pods: pod_cidr6(2),
            },
        }
    }

    /// The routed reference's routes, as (node, `ip route add` arguments;
    /// node 0 is the router): the pod network through node 1 both ways (the
    /// NodePort systems' replies cross node 1 too, to its SNAT address).
    fn routed_reference_routes(&self) -> [(u8, Vec<String>); 2] {
        let host = if self.client.is_ipv4() { 32 } else { 128 };
        let via = self.entry_node.to_string();
        [
            (
                0,
                vec![self.backend_pods.clone(), "via".into(), via.clone()],
            ),
            (
                2,
                vec![format!("{}/{host}", self.client), "via".into(), via],
            ),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct OutsideResult {
    pub system: OutsideSystem,
    pub family: IpFamily,
    pub services: usize,
    pub rounds: Vec<Round>,
    pub setup: Duration,
    /// What the agent's log says about the uplink's XDP mode.
    pub note: String,
}

impl OutsideResult {
    pub fn median(&self, f: impl Fn(&Round) -> f64) -> f64 {
        median_f64(self.rounds.iter().map(f).collect())
    }

    /// (median, min, max) over rounds of `f` of this over `f` of `reference`.
    pub fn ratio(&self, reference: &OutsideResult, f: impl Fn(&Round) -> f64) -> (f64, f64, f64) {
        rounds_ratio_spread(&self.rounds, &reference.rounds, f)
    }
}

pub struct Options {
    pub scales: Vec<usize>,
    pub endpoints: usize,
    pub length: Duration,
    pub concurrency: usize,
    pub systems: Vec<OutsideSystem>,
    /// Every system is measured on each of these families.
    pub families: Vec<IpFamily>,
    pub rounds: usize,
}

/// One system set up and ready for load.
struct Case {
    system: OutsideSystem,
    family: IpFamily,
    target: SocketAddr,
    setup: Duration,
    note: String,
    // Drop order: agent or rules, the server, the wire's programs, then
    // the namespaces.
    _guard: Box<dyn Any>,
    _server: Server,
    _wire: Vec<OwnedFd>,
    lab: Lab,
}

/// `bpf(2)` with `attr`; the returned fd owned.
fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a properly sized, initialized `bpf_attr` prefix for
    // `cmd` (the kernel zero-checks the rest up to the size given).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches an XDP program returning XDP_PASS (two instructions, loaded
/// with `bpf(2)`: no object file) to `iface` of `ns` in native mode; it stays
/// attached while the returned link lives.
fn xdp_pass_on(ns: &str, iface: &str) -> anyhow::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    // r0 = XDP_PASS (2); exit.
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let iface = std::ffi::CString::new(iface)?;
    netns::in_netns(ns, move || -> anyhow::Result<OwnedFd> {
        use std::os::fd::AsRawFd as _;
        let prog = bpf_fd(
            BPF_PROG_LOAD,
            &ProgLoad {
                prog_type: BPF_PROG_TYPE_XDP,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 0,
                log_size: 0,
                log_buf: 0,
                kern_version: 0,
                prog_flags: 0,
            },
        )
        .context("loading an XDP_PASS program")?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {iface:?}");
        bpf_fd(
            BPF_LINK_CREATE,
            &LinkCreate {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags: XDP_FLAGS_DRV_MODE,
            },
        )
        .with_context(|| format!("attaching XDP_PASS to {iface:?}"))
    })?
}

fn build_lab(family: IpFamily) -> anyhow::Result<Lab> {
    let lab = Lab::build(LabSpec {
        prefix: unique_prefix("bo"),
        topology: Topology::Bridge,
        cross_node: CrossNode::Direct,
        pods: vec![PodSpec::new(BACKEND, 2, BACKEND_HOST)],
        ipv6: family == IpFamily::Ipv6,
        ipv4: family == IpFamily::Ipv4,
    })?;
    for (node, route) in Plan::of(family).routed_reference_routes() {
        let ns = if node == 0 {
            lab.router_ns()
        } else {
            lab.node_ns(node)
        };
        let mut args = vec!["-n", &ns, "route", "add"];
        args.extend(route.iter().map(String::as_str));
        ip(&args)?;
    }
    // Both families' ports (net.ipv4 holds the IPv6 ones too).
    sysctl(
        &lab.node_ns(ENTRY_NODE),
        "net.ipv4.ip_local_port_range",
        NODE_EPHEMERAL_PORTS,
    )?;
    let outside = lab.outside_ns();
    sysctl(&outside, "net.ipv4.ip_local_port_range", "1024 65535")?;
    sysctl(&outside, "net.ipv4.tcp_tw_reuse", "1")?;
    Ok(lab)
}

/// Programs `system` on node 1; the target address and what must live
/// while it runs.
fn setup(
    system: OutsideSystem,
    family: IpFamily,
    lab: &Lab,
    services: usize,
    endpoints: usize,
) -> anyhow::Result<(SocketAddr, Box<dyn Any>, String)> {
    let pod = lab.pod(BACKEND);
    let pod_ip: IpAddr = match family {
        IpFamily::Ipv4 => pod.ip().into(),
        IpFamily::Ipv6 => pod.ipv6().into(),
    };
    let backend = BackendAddr {
        ip: pod_ip,
        port: TARGET_PORT,
    };
    let svcs = scenario::with_node_ports(scenario::services(
        family,
        services,
        endpoints,
        Some(backend),
    ));
    let node_port = svcs
        .last()
        .and_then(|s| s.node_port)
        .context("no services")?;
    let node_addr = Plan::of(family).entry_node;
    let node_port_target = SocketAddr::new(node_addr, node_port);
    let entry = lab.node_ns(ENTRY_NODE);
    let agent_args: &[&str] = match system {
        OutsideSystem::Routed => {
            return Ok((
                SocketAddr::new(pod_ip, TARGET_PORT),
                Box::new(()),
                String::new(),
            ))
        }
        OutsideSystem::Iptables => {
            netns::run_in(
                &entry,
                &iptables_restore_of(family),
                &["--noflush"],
                Some(&kubeproxy_rules::iptables_full(&svcs)),
            )?;
            return Ok((node_port_target, Box::new(()), String::new()));
        }
        OutsideSystem::Nftables => {
            let rules =
                kubeproxy_rules::nft_full(&svcs) + &kubeproxy_rules::nft_nodeport_ips(&[node_addr]);
            netns::run_in(&entry, "nft", &["-f", "-"], Some(&rules))?;
            return Ok((node_port_target, Box::new(()), String::new()));
        }
        OutsideSystem::Xdp => &["--external-datapath", "xdp", "--xdp-mode", "auto"],
        OutsideSystem::XdpNative => &["--external-datapath", "xdp", "--xdp-mode", "native"],
        OutsideSystem::Tc => &["--external-datapath", "tc"],
    };
    let bpffs = Bpffs::new()?;
    let work = tempfile::tempdir()?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("services.yaml"),
        scenario::manifests_yaml(&svcs),
    )?;
    // The family said outright: node 1's uplink holds an IPv4 address in
    // the IPv6 lab too (the nodes' network is dual-stack).
    let families = match family {
        IpFamily::Ipv4 => "ipv4",
        IpFamily::Ipv6 => "ipv6",
    };
    let mut args = vec![
        "--uplink-ifaces",
        "eth0",
        "--snat-port-range",
        SNAT_PORTS,
        "--ip-families",
        families,
    ];
    args.extend_from_slice(agent_args);
    let mut agent = Agent::launch_bin(
        &agent_bin(),
        &entry,
        "bench-node1",
        Source::Manifests(&manifests),
        bpffs.path(),
        &work.path().join("agent.log"),
        &args,
    )?;
    agent.wait_healthy(Duration::from_secs(120))?;
    // The agent's own words on the uplink's XDP mode, without the log prefix.
    let note = agent
        .log_text()
        .lines()
        .find_map(|l| {
            l.split_once("XDP attached")
                .map(|(_, mode)| mode.trim_start_matches(", ").to_owned())
        })
        .unwrap_or_else(|| "tc".into());
    // Drop order: the agent first, then its bpffs, then the files.
    Ok((node_port_target, Box::new((agent, bpffs, work)), note))
}

fn set_up(
    system: OutsideSystem,
    family: IpFamily,
    services: usize,
    o: &Options,
) -> anyhow::Result<Case> {
    let lab = build_lab(family).context("building the lab")?;
    let wire = ["node1", "node2"]
        .iter()
        .map(|port| xdp_pass_on(&lab.router_ns(), port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let server = Server::start(&lab.pod_ns(BACKEND), family, o.concurrency)?;
    let started = Instant::now();
    let (target, guard, note) = setup(system, family, &lab, services, o.endpoints)?;
    let client = lab.outside_ns();
    wait_ready(&client, target)?;
    let setup = started.elapsed();
    load(&client, target, Duration::from_millis(300), o.concurrency)?;
    Ok(Case {
        system,
        family,
        target,
        setup,
        note,
        _guard: guard,
        _server: server,
        _wire: wire,
        lab,
    })
}

fn measure(case: &Case, o: &Options) -> anyhow::Result<Round> {
    measure_round(&case.lab.outside_ns(), case.target, o.length, o.concurrency)
}

/// Whether `system` may be left out when it cannot be set up: native XDP
/// is the driver's to refuse. Any other system, of either family, that
/// cannot be set up fails the part.
fn may_be_refused(system: OutsideSystem) -> bool {
    system == OutsideSystem::XdpNative
}

pub fn run(o: &Options) -> anyhow::Result<Vec<OutsideResult>> {
    let mut results = Vec::new();
    for &services in &o.scales {
        let mut cases = Vec::new();
        for &family in &o.families {
            for &system in &o.systems {
                let what = format!(
                    "outside, {} over {family} with {services} services",
                    system.label()
                );
                match set_up(system, family, services, o) {
                    Ok(case) => {
                        eprintln!("  {what}: ready after {:?} {}", case.setup, case.note);
                        cases.push(case);
                    }
                    Err(e) if may_be_refused(system) => {
                        eprintln!("  {what}: not measured: {e:#}");
                    }
                    Err(e) => return Err(e.context(format!("setting up {what}"))),
                }
            }
        }
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); cases.len()];
        for round in 1..=o.rounds.max(1) {
            for (case, measured) in cases.iter().zip(&mut rounds) {
                let r = measure(case, o).with_context(|| {
                    format!(
                        "outside, {} over {} with {services} services",
                        case.system.label(),
                        case.family
                    )
                })?;
                eprintln!(
                    "  outside, {services} services, round {round}, {}, {}: {:.0} conn/s, {:.1} µs kernel CPU per conn (this process: {:.1} µs), connect p50 {} us p99 {} us, {} errors, stream {:.2} Gbit/s",
                    case.system.label(),
                    case.family,
                    r.conns_per_s,
                    r.node_cpu_us_per_conn,
                    r.process_sys_us_per_conn,
                    r.connect_p50_us,
                    r.connect_p99_us,
                    r.errors,
                    r.stream_gbit_s,
                );
                measured.push(r);
            }
        }
        for (case, rounds) in cases.iter().zip(rounds) {
            results.push(OutsideResult {
                system: case.system,
                family: case.family,
                services,
                rounds,
                setup: case.setup,
                note: case.note.clone(),
            });
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_plan_uses_the_labs_ipv6_addresses_only() {
        let plan = Plan::of(IpFamily::Ipv6);
        assert_eq!(plan.entry_node, IpAddr::from(node_ip6(ENTRY_NODE)));
        assert_eq!(plan.client, IpAddr::from(OUTSIDE_CLIENT_IP6));
        let routes = plan.routed_reference_routes();
        assert_eq!(
            routes[0],
            (
                0,
                vec![
                    "fd00:10:244:2::/64".to_owned(),
                    "via".into(),
                    "fd00:192:168:100::1".into()
                ]
            )
        );
        assert_eq!(
            routes[1],
            (
                2,
                vec![
                    "2001:db8:113::10/128".to_owned(),
                    "via".into(),
                    "fd00:192:168:100::1".into()
                ]
            )
        );
    }

    #[test]
    fn the_ipv4_plan_routes_the_pods_and_the_client_through_node_1() {
        let routes = Plan::of(IpFamily::Ipv4).routed_reference_routes();
        assert_eq!(routes[0].1.join(" "), "10.244.2.0/24 via 192.168.100.1");
        assert_eq!(routes[1].1.join(" "), "203.0.113.10/32 via 192.168.100.1");
    }
}
