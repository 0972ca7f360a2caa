//! `dataplane-agent run`: the options, the kubeconfig, the servers and the
//! signals, around the three rooms: load the datapath (`node`), start the
//! source and the control loop (`control`), serve `/healthz` and `/metrics`
//! (`operator`), attach to pod interfaces, and follow changes until
//! SIGTERM.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use dataplane_common::{Nat6Config, NatConfig, IPPROTO_UDP};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    control::{
        health::Health,
        model::{IpFamilies, IpFamily},
        run_loop::{ControlLoop, Report},
        source::{self, SourceUpdate, UpdateSender},
        sync::{BackendKey, CtOccupancy, SyncEngine},
    },
    kubeproxy_config::{self, NodePortAddress},
    node::{
        bpffs::ensure_bpffs,
        ct_gc, ct_gc6,
        ct_options::ConntrackOptions,
        datapath::{Datapath, DatapathConfig, XdpAttachMode},
        interfaces::{self, LinkEvent, PodInterfaceFilter},
        lb_maps::{BpfLbMaps, LbMaps},
        pinned, sock_destroy, socket_lb, uplink,
    },
    operator::{health_check, healthz, metrics, metrics::Metrics},
};

/// What runs on the uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalDatapath {
    /// XDP on ingress (native, else generic) in front of the tc programs,
    /// which finish what XDP leaves to them.
    Xdp,
    /// A tc program on ingress and egress.
    Tc,
    /// No external datapath: NodePorts, load-balancer IPs and externalIPs
    /// are served to pods only.
    None,
}

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Directory of Kubernetes manifests (Services, EndpointSlices), watched.
    /// Without it the agent watches the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; default: in-cluster service account,
    /// then the usual kubeconfig locations.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Glob patterns of the host-side pod interfaces, comma separated.
    /// With `--config` and without this flag: `veth*` for
    /// `detectLocal.interfaceNamePrefix: veth`, else `veth*,cali*`.
    #[arg(
        long,
        env = "DATAPLANE_POD_IFACES",
        value_delimiter = ',',
        required_unless_present = "config"
    )]
    pub pod_ifaces: Vec<String>,
    /// Where the maps are pinned (a bpffs is mounted there if needed).
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    pub bpffs: PathBuf,
    /// This node's name, for internalTrafficPolicy: Local.
    #[arg(long, env = "NODE_NAME", visible_alias = "hostname-override")]
    pub node_name: Option<String>,
    /// Address of the /healthz endpoint (kube-proxy's port by default).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// /healthz says 503 when a change has waited this long without
    /// reaching the maps (kube-proxy's healthz timeout).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub healthz_timeout: Duration,
    /// Address of the Prometheus /metrics endpoint (kube-proxy's port by
    /// default).
    #[arg(long, default_value = "0.0.0.0:10249")]
    pub metrics_bind_address: SocketAddr,
    #[command(flatten)]
    pub conntrack: ConntrackOptions,
    /// Deliver a pod's service packet straight to its backend once
    /// translated: into a pod of this node with `bpf_redirect_peer`, to
    /// another node by FIB lookup and redirect, skipping the host's routing
    /// and netfilter. Off by default: a CNI or host firewall enforcing
    /// NetworkPolicy in the node's FORWARD chains (Calico's iptables mode,
    /// kube-router) would no longer see pod-to-service packets; turn it on
    /// where nothing relies on them. Off (or a kernel before 5.10): the
    /// stack delivers it.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub direct_redirect: bool,
    /// kube-proxy's configuration file (a `KubeProxyConfiguration`, YAML or
    /// JSON): every field with a meaning here is applied; flags given on
    /// the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Log verbosity as kube-proxy's `--v` (klog): 0-1 info, 2-4 debug,
    /// 5 and up trace. `RUST_LOG` wins.
    #[arg(long = "v", short = 'v')]
    pub v: Option<u32>,
    /// Socket-level load balancing: translate service connections at
    /// connect()/sendmsg() for every process under --cgroup-root (pods and
    /// host-network processes); the tc programs serve the rest.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub socket_lb: bool,
    /// The cgroup v2 directory whose processes get socket-level load
    /// balancing. Default: the root of the cgroup2 hierarchy as mounted
    /// here, or one mounted under --run-dir when none is visible.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Test switch, hidden: socket hooks (kernel names, e.g. `connect4`,
    /// `sock_release`) refused as a kernel without them refuses to load
    /// them, so tests reach the fallbacks on a kernel that has them.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub test_refuse_socket_hooks: Vec<String>,
    /// The agent's runtime directory (a cgroup2 mount if it needs one).
    #[arg(long, default_value = "/run/dataplane")]
    pub run_dir: PathBuf,
    /// Interfaces traffic from outside arrives on (NodePort, LoadBalancer,
    /// externalIPs), comma separated. Default: those holding the node's
    /// default routes.
    #[arg(long, value_delimiter = ',')]
    pub uplink_ifaces: Vec<String>,
    /// Node addresses NodePorts are served on, as CIDRs of either family,
    /// or `primary` (kube-proxy's flag): each family is filtered by its own
    /// CIDRs, and a family without any keeps the default, the uplinks'
    /// addresses; `primary` is each family's first uplink address (the
    /// SNAT address).
    #[arg(long, value_delimiter = ',', value_parser = parse_node_port_address)]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Address families to proxy, comma separated (`ipv4`, `ipv6`).
    /// Default: those the node has an address of (other than loopback and
    /// link-local; IPv4 when it has none yet); a Service's frontends of
    /// another family are skipped.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub ip_families: Vec<IpFamilyOption>,
    /// The program on the uplinks.
    #[arg(long, value_enum, default_value = "xdp")]
    pub external_datapath: ExternalDatapath,
    /// XDP mode on the uplinks: `auto` is native (in the driver) where it
    /// can be attached, else generic, and generic on virtual interfaces
    /// (veth); or one of them only.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeOption,
    /// Ports external connections to remote backends are SNATed to; must
    /// lie outside net.ipv4.ip_local_port_range (they are also reserved
    /// there).
    #[arg(long, default_value = "61000-65535")]
    pub snat_port_range: String,
}

/// `--ip-families`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpFamilyOption {
    Ipv4,
    Ipv6,
}

/// The families this node proxies: `--ip-families`, else those it has an
/// address of (IPv4 when it has none). Each one left out is reported here,
/// once.
fn ip_families(options: &Options) -> anyhow::Result<IpFamilies> {
    let families = if options.ip_families.is_empty() {
        let (ipv4, ipv6) = uplink::address_families()?;
        // A node without any address yet (its uplink configured later)
        // is IPv4, kube-proxy's primary family when it knows no node IP.
        IpFamilies {
            ipv4: ipv4 || !ipv6,
            ipv6,
        }
    } else {
        IpFamilies {
            ipv4: options.ip_families.contains(&IpFamilyOption::Ipv4),
            ipv6: options.ip_families.contains(&IpFamilyOption::Ipv6),
        }
    };
    for family in [IpFamily::Ipv4, IpFamily::Ipv6] {
        if !families.contains(family) {
            let why = if options.ip_families.is_empty() {
                "the node has no address of it"
            } else {
                "not in --ip-families"
            };
            warn!("{family}: not proxied ({why}); Services' {family} frontends are skipped");
        }
    }
    Ok(families)
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeOption {
    /// Native, else generic.
    Auto,
    Native,
    /// Generic XDP (in the stack), e.g. on veth uplinks whose peer cannot
    /// take native XDP_TX frames.
    Generic,
}

/// The uplinks present, the node addresses NodePorts are served on, and the
/// SNAT addresses (the first uplink's first address of each family).
struct ExternalSetup {
    uplinks: Vec<uplink::Uplink>,
    /// Uplinks named by `--uplink-ifaces` that do not exist yet.
    missing: Vec<String>,
    node_addrs: Vec<Ipv4Addr>,
    snat_addr: Option<Ipv4Addr>,
    node_addrs6: Vec<Ipv6Addr>,
    snat_addr6: Option<Ipv6Addr>,
}

fn external_setup(options: &Options) -> anyhow::Result<ExternalSetup> {
    let names = uplink_names(options)?;
    let (uplinks, missing) = uplink::present(&names);
    let (node_addrs, snat_addr) = node_addresses(options, &names, &uplink::addresses()?);
    let (node_addrs6, snat_addr6) = node_addresses(options, &names, &uplink::addresses6()?);
    Ok(ExternalSetup {
        uplinks,
        missing,
        node_addrs,
        snat_addr,
        node_addrs6,
        snat_addr6,
    })
}

fn uplink_names(options: &Options) -> anyhow::Result<Vec<String>> {
    Ok(if options.uplink_ifaces.is_empty() {
        uplink::default_route_interfaces()?
    } else {
        options.uplink_ifaces.clone()
    })
}

/// The node's addresses of one family NodePorts are served on and its
/// SNAT address of that family, from `addrs` ([`uplink::addresses`] or
/// [`uplink::addresses6`]).
fn node_addresses<A: Copy + Ord + Into<IpAddr>>(
    options: &Options,
    uplinks: &[String],
    addrs: &[(String, A)],
) -> (Vec<A>, Option<A>) {
    (
        served_node_addresses(&options.nodeport_addresses, addrs, uplinks),
        primary_address(addrs, uplinks),
    )
}

/// The node's primary address of one family: the first address of the
/// first uplink holding one (`addrs`, interface and address, are all of
/// that family). SNAT uses it, and `--nodeport-addresses primary`.
fn primary_address<A: Copy>(addrs: &[(String, A)], uplinks: &[String]) -> Option<A> {
    uplinks
        .iter()
        .find_map(|u| addrs.iter().find(|(name, _)| name == u))
        .map(|(_, ip)| *ip)
}

/// The addresses of `addrs` (one family's, with the interface holding
/// each) NodePorts are served on, sorted, as kube-proxy's proxier of that
/// family picks them from `--nodeport-addresses`: the addresses in its
/// CIDRs of that family, on any interface; without CIDRs of that family
/// (none given, or only of the other family) the default, the uplinks'
/// addresses (kube-proxy's default is every address; NodePorts here are
/// for traffic from outside); with `primary`, the primary address.
fn served_node_addresses<A: Copy + Ord + Into<IpAddr>>(
    selection: &[NodePortAddress],
    addrs: &[(String, A)],
    uplinks: &[String],
) -> Vec<A> {
    if selection.contains(&NodePortAddress::Primary) {
        return primary_address(addrs, uplinks).into_iter().collect();
    }
    let in_selection = |ip: IpAddr| -> Option<bool> {
        let mut of_family = false;
        for entry in selection {
            match (entry, ip) {
                (NodePortAddress::Cidr(p), IpAddr::V4(v4)) => {
                    of_family = true;
                    if p.contains(v4) {
                        return Some(true);
                    }
                }
                (NodePortAddress::Cidr6(p), IpAddr::V6(v6)) => {
                    of_family = true;
                    if p.contains(v6) {
                        return Some(true);
                    }
                }
                _ => {}
            }
        }
        // None: no CIDR of this family given.
        of_family.then_some(false)
    };
    let mut served: Vec<A> = addrs
        .iter()
        .filter(|(name, ip)| in_selection((*ip).into()).unwrap_or_else(|| uplinks.contains(name)))
        .map(|(_, ip)| *ip)
        .collect();
    served.sort();
    served.dedup();
    served
}

/// The SNAT configuration as written to `NAT_CONFIG` and `NAT6_CONFIG`.
struct SnatState {
    /// Whether the port range could be kept from the node's sockets (else
    /// no SNAT address is configured: such connections are refused).
    reserved: bool,
    port_min: u16,
    port_max: u16,
    addr: Option<Ipv4Addr>,
    addr6: Option<Ipv6Addr>,
}

impl SnatState {
    fn write6(
        &self,
        map: &mut aya::maps::Array<aya::maps::MapData, Nat6Config>,
    ) -> anyhow::Result<()> {
        let config = Nat6Config {
            snat_addr: self.addr6.map_or([0; 16], |a| a.octets()),
        };
        map.set(0, config, 0)
            .context("writing the IPv6 SNAT configuration")
    }

    fn write(
        &self,
        map: &mut aya::maps::Array<aya::maps::MapData, NatConfig>,
    ) -> anyhow::Result<()> {
        let config = NatConfig {
            snat_addr: self
                .addr
                .map_or(0, |a| dataplane_common::ipv4_to_map(a.octets())),
            port_min: self.port_min,
            port_max: self.port_max,
        };
        map.set(0, config, 0)
            .context("writing the SNAT configuration")
    }
}

/// The next notice of `rx`; never, without one.
async fn next_notice(rx: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Attaches the external datapath to the uplinks in `wanted` that lack it,
/// and takes it off those no longer in it (gone, or no longer holding a
/// default route, or no longer named by `--uplink-ifaces`). An uplink
/// still wanted under a new name (`ip link set eth0 name wan0`: the same
/// ifindex) keeps its programs: its traffic never passes unserved. Every
/// uplink is tried; the first failure is returned.
fn follow_uplinks(
    options: &Options,
    datapath: &mut Datapath,
    wanted: &[uplink::Uplink],
) -> anyhow::Result<()> {
    for (ifindex, name) in datapath.uplinks() {
        match wanted.iter().find(|u| u.ifindex == ifindex) {
            Some(u) if u.name != name => datapath.rename_uplink(ifindex, &u.name),
            Some(_) => {}
            None => datapath.detach_uplink(ifindex),
        }
    }
    let attached = datapath.uplinks();
    let mut first_err = None;
    for u in wanted {
        if attached.iter().any(|(ifindex, _)| *ifindex == u.ifindex) {
            continue;
        }
        if let Err(e) = attach_uplink(options, datapath, u) {
            warn!("{e:#}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The external datapath on one uplink: tc, and XDP in front of it unless
/// `--external-datapath tc`.
fn attach_uplink(
    options: &Options,
    datapath: &mut Datapath,
    u: &uplink::Uplink,
) -> anyhow::Result<()> {
    datapath
        .attach_uplink(u.ifindex, &u.name)
        .with_context(|| format!("attaching to uplink {}", u.name))?;
    if options.external_datapath == ExternalDatapath::Xdp {
        let modes: &[XdpAttachMode] = match options.xdp_mode {
            // A virtual interface (veth: kind, netns labs) takes native XDP
            // but drops its XDP_TX frames unless the peer runs NAPI:
            // generic there.
            XdpModeOption::Auto if uplink::is_virtual(&u.name) => &[XdpAttachMode::Generic],
            XdpModeOption::Auto => &[XdpAttachMode::Native, XdpAttachMode::Generic],
            XdpModeOption::Native => &[XdpAttachMode::Native],
            XdpModeOption::Generic => &[XdpAttachMode::Generic],
        };
        if let Err(e) = datapath.attach_uplink_xdp(u.ifindex, &u.name, modes) {
            // Not half attached: the next notice tries again.
            datapath.detach_uplink(u.ifindex);
            return Err(e).with_context(|| format!("attaching XDP to uplink {}", u.name));
        }
    }
    Ok(())
}

/// What the agent follows of the node's network for the external datapath.
struct NodeNetwork {
    snat: SnatState,
    node_addrs: Vec<Ipv4Addr>,
    node_addrs6: Vec<Ipv6Addr>,
    /// Uplinks named by `--uplink-ifaces` not present, as last logged.
    missing: Vec<String>,
}

/// A link, route or address was added, changed or removed: the uplinks
/// follow the named interfaces (or those holding the default routes),
/// NodePorts the node's addresses, SNAT the first uplink's first address
/// of each family.
fn follow_node_network(
    options: &Options,
    control: &mut ControlLoop<BpfLbMaps, Metrics>,
    datapath: &mut Datapath,
    state: &mut NodeNetwork,
    nat_config: &mut aya::maps::Array<aya::maps::MapData, NatConfig>,
    nat6_config: &mut aya::maps::Array<aya::maps::MapData, Nat6Config>,
) -> anyhow::Result<()> {
    let uplinks = uplink_names(options)?;
    let (present, missing) = uplink::present(&uplinks);
    if missing != state.missing {
        if !missing.is_empty() {
            info!("uplinks {missing:?} not present: attached when they appear");
        }
        state.missing = missing;
    }
    // Failures are logged there; the next notice tries again.
    let _ = follow_uplinks(options, datapath, &present);
    let (node_addrs, snat_addr) = node_addresses(options, &uplinks, &uplink::addresses()?);
    let (node_addrs6, snat_addr6) = node_addresses(options, &uplinks, &uplink::addresses6()?);
    let snat = &mut state.snat;
    let snat_addr = snat_addr.filter(|_| snat.reserved);
    let snat_addr6 = snat_addr6.filter(|_| snat.reserved);
    if node_addrs == state.node_addrs
        && node_addrs6 == state.node_addrs6
        && snat_addr == snat.addr
        && snat_addr6 == snat.addr6
    {
        return Ok(());
    }
    control
        .set_node_addresses(&node_addrs)
        .context("writing the node addresses")?;
    control
        .set_node_addresses6(&node_addrs6)
        .context("writing the node's IPv6 addresses")?;
    if snat_addr != snat.addr {
        snat.addr = snat_addr;
        snat.write(nat_config)?;
    }
    if snat_addr6 != snat.addr6 {
        snat.addr6 = snat_addr6;
        snat.write6(nat6_config)?;
    }
    info!(
        "node addresses changed: NodePorts on {node_addrs:?} {node_addrs6:?}, SNAT to {} and {}",
        describe(snat.addr),
        describe(snat.addr6),
    );
    state.node_addrs = node_addrs;
    state.node_addrs6 = node_addrs6;
    Ok(())
}

/// A SNAT address for the log.
fn describe(addr: Option<impl std::fmt::Display>) -> String {
    addr.map_or("nothing (no address)".to_string(), |a| a.to_string())
}

/// `--nodeport-addresses` entries.
fn parse_node_port_address(text: &str) -> Result<NodePortAddress, String> {
    text.parse()
        .map_err(|()| format!("{text:?} is neither a CIDR nor \"primary\""))
}

fn parse_port_range(range: &str) -> anyhow::Result<(u16, u16)> {
    let (min, max) = range
        .split_once('-')
        .context("--snat-port-range is MIN-MAX")?;
    let (min, max): (u16, u16) = (
        min.trim().parse().context("--snat-port-range MIN")?,
        max.trim().parse().context("--snat-port-range MAX")?,
    );
    anyhow::ensure!(
        min > 0 && min <= max,
        "--snat-port-range {range}: empty range"
    );
    Ok((min, max))
}

const CONNTRACK_GC_INTERVAL: Duration = Duration::from_secs(10);

pub fn run(options: Options) -> anyhow::Result<()> {
    tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(options))
}

/// One malloc arena: the agent's threads mostly wait, and with an arena per
/// thread what a manifest parse frees in one is not reused for the model
/// another builds (10 000 services: 8 MiB more at the peak). A fixed mmap
/// threshold: a full sync's large, short-lived batches go back to the system
/// when freed instead of growing the heap (2 MiB more). glibc only.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before the
    // runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Starts the configured source, feeding `tx`.
async fn start_source(options: &Options, tx: UpdateSender) -> anyhow::Result<()> {
    if let Some(dir) = options.manifests.clone() {
        info!("source: manifests in {}", dir.display());
        tokio::spawn(async move {
            if let Err(e) = source::manifests::run(dir, tx).await {
                error!("{e}");
            }
        });
    } else {
        let config = match &options.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .with_context(|| format!("using kubeconfig {}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .context("finding the API server (in-cluster or kubeconfig)")?,
        };
        info!("source: Kubernetes API at {}", config.cluster_url);
        let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
        tokio::spawn(source::kube::run(client, tx));
    }
    Ok(())
}

fn handle_link(datapath: &mut Datapath, link: LinkEvent) {
    match link {
        LinkEvent::Present { ifindex, name } => {
            if !datapath.is_attached(ifindex) {
                if let Err(e) = datapath.attach(ifindex, &name) {
                    warn!("{:#}", anyhow::Error::from(e));
                }
            }
        }
        LinkEvent::Gone { ifindex } => datapath.detach(ifindex),
        LinkEvent::InitialListDone => {}
    }
}

async fn run_async(options: Options) -> anyhow::Result<()> {
    kubeproxy_config::check_node_port_addresses(&options.nodeport_addresses)
        .map_err(|why| anyhow::anyhow!("--nodeport-addresses: {why}"))?;
    let filter = PodInterfaceFilter::new(&options.pod_ifaces)?;
    ensure_bpffs(&options.bpffs)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let config = DatapathConfig {
        direct_redirect: options.direct_redirect,
        ..options.conntrack.datapath_config(cpus)
    };
    let (mut datapath, maps) = Datapath::load_with(&options.bpffs, &config)?;
    let mut conntrack_maps = maps.conntrack;
    let mut conntrack6_maps = maps.conntrack6;
    let sock_revnat = maps.sock_revnat;
    let mut nat = maps.nat;
    let ct_capacity = CtOccupancy {
        tcp_capacity: config.ct_max_tcp,
        other_capacity: config.ct_max_other,
        ..CtOccupancy::default()
    };
    let mut nat_config = maps.nat_config;
    let mut nat6_config = maps.nat6_config;
    let mut nat6 = maps.nat6;
    let mut engine = SyncEngine::adopt(maps.lb).context("adopting the pinned maps")?;
    // Flows carried over, or still made by an earlier agent's programs:
    // their backends' replies stay looked up.
    let (carried, carried6) = datapath.flows_carried(&conntrack_maps, &conntrack6_maps);
    engine.set_flows_carried(carried);
    engine.set_flows_carried6(carried6);
    // Subscribed before the uplinks and addresses are read: no change in
    // between is missed.
    let mut network_changes = if options.external_datapath == ExternalDatapath::None {
        None
    } else {
        Some(uplink::watch_node_network()?)
    };
    let external = if options.external_datapath == ExternalDatapath::None {
        None
    } else {
        Some(external_setup(&options)?)
    };
    let mut network = None;
    if let Some(ext) = &external {
        let (port_min, port_max) = parse_port_range(&options.snat_port_range)?;
        let reserved = match uplink::reserve_snat_ports(port_min, port_max) {
            Ok(()) => true,
            Err(e) => {
                error!(
                    "{:#}: external connections to remote backends are refused",
                    anyhow::Error::from(e)
                );
                false
            }
        };
        let snat_addr = ext.snat_addr.filter(|_| reserved);
        let snat_addr6 = ext.snat_addr6.filter(|_| reserved);
        let state = SnatState {
            reserved,
            port_min,
            port_max,
            addr: snat_addr,
            addr6: snat_addr6,
        };
        state.write(&mut nat_config)?;
        state.write6(&mut nat6_config)?;
        engine
            .set_node_addresses(&ext.node_addrs)
            .context("writing the node addresses")?;
        engine
            .set_node_addresses6(&ext.node_addrs6)
            .context("writing the node's IPv6 addresses")?;
        info!(
            "external traffic: uplinks {:?}, NodePorts on {:?} {:?}, SNAT to {} and {} ports {port_min}-{port_max}",
            ext.uplinks.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ext.node_addrs,
            ext.node_addrs6,
            describe(snat_addr),
            describe(snat_addr6),
        );
        if !ext.missing.is_empty() {
            info!(
                "uplinks {:?} not present: attached when they appear",
                ext.missing
            );
        }
        network = Some(NodeNetwork {
            snat: state,
            node_addrs: ext.node_addrs.clone(),
            node_addrs6: ext.node_addrs6.clone(),
            missing: ext.missing.clone(),
        });
    }
    let metrics = Metrics::new(Some(maps.counters));
    let health = Health::new(options.healthz_timeout);
    metrics.follow_changes(health.clone());
    metrics.set_configz(kubeproxy_config::configz(&options));
    let mut control = ControlLoop::new(
        engine,
        options.node_name.clone(),
        health.clone(),
        metrics.clone(),
    );
    let families = ip_families(&options)?;
    control.set_ip_families(families);

    let mut healthz_server =
        tokio::spawn(healthz::serve(options.healthz_bind_address, health.clone()));
    let mut metrics_server = tokio::spawn(metrics::serve(
        options.metrics_bind_address,
        metrics.clone(),
    ));
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let (tx, mut updates) = source::channel(health);
    start_source(&options, tx).await?;
    loop {
        let update = tokio::select! {
            update = updates.recv() => update.context("the source stopped before its first sync")?,
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        };
        if control.initial(update) {
            break;
        }
    }
    control.full_sync();
    let (health_checks_tx, health_checks_rx) = watch::channel(control.health_checks());
    let health_check_server =
        // On both families when IPv6 is proxied, as kube-proxy's
        // listener on the unspecified address answers both.
        tokio::spawn(health_check::run(
            Ipv4Addr::UNSPECIFIED,
            families.ipv6.then_some(Ipv6Addr::UNSPECIFIED),
            health_checks_rx,
        ));

    // Interfaces after the first sync: a pod never sees the programs with
    // empty maps. Healthy only once the pods present now have them.
    let mut links = interfaces::watch(filter)?;
    while let Some(link) = links.recv().await {
        if link == LinkEvent::InitialListDone {
            break;
        }
        handle_link(&mut datapath, link);
    }
    if let Some(ext) = &external {
        follow_uplinks(&options, &mut datapath, &ext.uplinks)?;
    }
    let socket_lb_root = start_socket_lb(&options, &mut datapath);
    // The programs (tc and socket hooks) run on the new maps everywhere
    // now: those of an earlier layout (or other sizes) are replaced.
    datapath.commit_migration()?;
    datapath.remove_stale_links();
    // Backends removed before the hooks were attached concern no socket.
    control.take_removed_backends();
    control.mark_synced();
    let mut gc = tokio::time::interval(CONNTRACK_GC_INTERVAL);
    info!("agent ready: maps pinned under {}", options.bpffs.display());

    let result = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: exiting"); break Ok(()) }
            _ = sigint.recv() => { info!("SIGINT: exiting"); break Ok(()) }
            update = updates.recv() => {
                let Some(first) = update else { break Err(anyhow::anyhow!("the source stopped")) };
                control.apply(burst(first, &mut updates));
                close_sockets_to_removed(&mut control, socket_lb_root.as_deref());
                health_checks_tx.send_if_modified(|checks| {
                    let now = control.health_checks();
                    let changed = *checks != now;
                    *checks = now;
                    changed
                });
            }
            Some(()) = next_notice(&mut network_changes) => {
                if let Some(state) = &mut network {
                    if let Err(e) = follow_node_network(&options, &mut control, &mut datapath, state, &mut nat_config, &mut nat6_config) {
                        warn!("following the node's network: {e:#}");
                    }
                }
            }
            link = links.recv() => match link {
                Some(link) => handle_link(&mut datapath, link),
                None => break Err(anyhow::anyhow!("netlink link notifications stopped")),
            },
            _ = gc.tick() => {
                control.tick();
                let sweep = ct_gc::sweep(&mut conntrack_maps, &config.ct_lifetimes);
                if sweep.removed > 0 {
                    log::debug!("conntrack: removed {} expired entries", sweep.removed);
                }
                let (nat_removed, _) = ct_gc::sweep_nat(&mut nat, &config.ct_lifetimes);
                if nat_removed > 0 {
                    log::debug!("NAT: removed {nat_removed} expired entries");
                }
                let (nat6_removed, _) = ct_gc::sweep_nat6(&mut nat6, &config.ct_lifetimes);
                if nat6_removed > 0 {
                    log::debug!("NAT6: removed {nat6_removed} expired entries");
                }
                let sweep6 = ct_gc6::sweep6(&mut conntrack6_maps, &config.ct_lifetimes);
                if sweep6.removed > 0 {
                    log::debug!("conntrack: removed {} expired IPv6 entries", sweep6.removed);
                }
                metrics.conntrack_entries(CtOccupancy {
                    tcp: sweep.remaining_tcp,
                    other: sweep.remaining_other,
                    tcp6: sweep6.remaining_tcp,
                    other6: sweep6.remaining_other,
                    ..ct_capacity
                });
                metrics.sock_revnat_entries(sock_revnat.keys().count());
            }
            served = &mut healthz_server => break server_stopped("healthz", served),
            served = &mut metrics_server => break server_stopped("metrics", served),
        }
    };
    // The programs stay attached (pinned links) and the maps pinned: traffic
    // keeps flowing on the last state until the next agent takes over, as
    // kube-proxy's rules outlive kube-proxy. `dataplane-agent cleanup`
    // removes everything.
    info!(
        "programs left attached on {} pod interfaces; `dataplane-agent cleanup --bpffs {}` removes them",
        datapath.attached_count(),
        options.bpffs.display()
    );
    drop(datapath);
    healthz_server.abort();
    metrics_server.abort();
    health_check_server.abort();
    result
}

/// Attaches the socket hooks if asked to. A kernel without them, or a
/// cgroup that cannot be used, is reported once: the tc path still serves
/// pods, host-network clients go without services.
/// Returns the cgroup the hooks are attached to.
fn start_socket_lb(options: &Options, datapath: &mut Datapath) -> Option<PathBuf> {
    if !options.socket_lb {
        info!("socket-level load balancing off (--socket-lb false): the tc path serves pods only");
        datapath.detach_socket_lb();
        return None;
    }
    let attached = socket_lb::resolve_cgroup_root(options.cgroup_root.as_deref(), &options.run_dir)
        .and_then(|root| {
            datapath
                .attach_socket_lb(&root, &options.test_refuse_socket_hooks)
                .map(|()| root)
        });
    match attached {
        Ok(root) => Some(root),
        Err(e) => {
            warn!(
                "socket-level load balancing unavailable, the tc path serves pods only: {:#}",
                anyhow::Error::from(e)
            );
            None
        }
    }
}

/// Connected UDP sockets the hooks aimed at backends that are now gone are
/// closed (see `node::sock_destroy`). TCP needs nothing: the backend's
/// RST or the application's timeout ends those connections.
fn close_sockets_to_removed<M: LbMaps, R: Report>(
    control: &mut ControlLoop<M, R>,
    cgroup_root: Option<&Path>,
) {
    let gone: Vec<SocketAddr> = control
        .take_removed_backends()
        .into_iter()
        .filter_map(|b| match b {
            BackendKey::V4(b) => {
                (b.proto == IPPROTO_UDP).then(|| pinned::endpoint(b.addr, b.port).into())
            }
            BackendKey::V6(b) => {
                (b.proto == IPPROTO_UDP).then(|| pinned::endpoint6(b.addr, b.port).into())
            }
        })
        .collect();
    if let (Some(root), false) = (cgroup_root, gone.is_empty()) {
        // Not waited for: the thread logs what it closed.
        drop(sock_destroy::destroy_udp_sockets_to(gone, root.to_owned()));
    }
}

/// `first` and whatever else is already waiting: a burst (a rolling
/// update) is applied as one batch, one sync per service.
fn burst(first: SourceUpdate, updates: &mut mpsc::Receiver<SourceUpdate>) -> Vec<SourceUpdate> {
    let mut batch = vec![first];
    while let Ok(update) = updates.try_recv() {
        batch.push(update);
    }
    batch
}

fn server_stopped<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    served: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match served {
        Ok(Err(e)) => Err(e.into()),
        _ => Err(anyhow::anyhow!("the {what} server stopped")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(entries: &[&str]) -> Vec<NodePortAddress> {
        entries.iter().map(|e| e.parse().unwrap()).collect()
    }

    /// eth0: 192.168.100.1, 10.0.0.1, fd00:192:168:100::1 and 2001:db8::1;
    /// eth1 (not an uplink): 172.16.0.1 and fd00:172::1.
    /// (interface, address) pairs of one family.
    type Addresses = Vec<(String, IpAddr)>;

    fn node() -> (Addresses, Addresses, Vec<String>) {
        let at = |dev: &str, ip: &str| (dev.to_owned(), ip.parse::<IpAddr>().unwrap());
        let v4 = vec![
            at("lo", "127.0.0.1"),
            at("eth0", "192.168.100.1"),
            at("eth0", "10.0.0.1"),
            at("eth1", "172.16.0.1"),
        ];
        let v6 = vec![
            at("eth0", "fd00:192:168:100::1"),
            at("eth0", "2001:db8::1"),
            at("eth1", "fd00:172::1"),
        ];
        (v4, v6, vec!["eth0".to_owned()])
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn node_ports_default_to_the_uplinks_addresses_of_each_family() {
        let (v4, v6, uplinks) = node();
        assert_eq!(
            served_node_addresses(&[], &v4, &uplinks),
            ips(&["10.0.0.1", "192.168.100.1"])
        );
        assert_eq!(
            served_node_addresses(&[], &v6, &uplinks),
            ips(&["2001:db8::1", "fd00:192:168:100::1"])
        );
    }

    #[test]
    fn ipv6_cidrs_select_the_ipv6_addresses_inside_them_on_any_interface() {
        let (_, v6, uplinks) = node();
        let only = selection(&["fd00::/16"]);
        assert_eq!(
            served_node_addresses(&only, &v6, &uplinks),
            ips(&["fd00:172::1", "fd00:192:168:100::1"])
        );
    }

    #[test]
    fn each_family_is_filtered_by_its_own_cidrs_only() {
        let (v4, v6, uplinks) = node();
        // IPv4 CIDRs only: IPv6 keeps its default, and the other way round.
        let v4_only = selection(&["192.168.100.0/24"]);
        assert_eq!(
            served_node_addresses(&v4_only, &v4, &uplinks),
            ips(&["192.168.100.1"])
        );
        assert_eq!(
            served_node_addresses(&v4_only, &v6, &uplinks),
            ips(&["2001:db8::1", "fd00:192:168:100::1"])
        );
        let v6_only = selection(&["2001:db8::/32"]);
        assert_eq!(
            served_node_addresses(&v6_only, &v4, &uplinks),
            ips(&["10.0.0.1", "192.168.100.1"])
        );
        let both = selection(&["172.16.0.0/12", "2001:db8::/32"]);
        assert_eq!(
            served_node_addresses(&both, &v4, &uplinks),
            ips(&["172.16.0.1"])
        );
        assert_eq!(
            served_node_addresses(&both, &v6, &uplinks),
            ips(&["2001:db8::1"])
        );
    }

    #[test]
    fn cidrs_holding_no_node_address_of_their_family_serve_none_of_it() {
        let (_, v6, uplinks) = node();
        let elsewhere = selection(&["2001:db8:ffff::/48"]);
        assert!(served_node_addresses(&elsewhere, &v6, &uplinks).is_empty());
    }

    #[test]
    fn primary_is_the_first_uplink_address_of_each_family() {
        let (v4, v6, uplinks) = node();
        let primary = selection(&["primary"]);
        assert_eq!(
            served_node_addresses(&primary, &v4, &uplinks),
            ips(&["192.168.100.1"])
        );
        assert_eq!(
            served_node_addresses(&primary, &v6, &uplinks),
            ips(&["fd00:192:168:100::1"])
        );
    }

    #[test]
    fn the_primary_address_is_of_the_first_uplink_holding_one_of_the_family() {
        let (_, v6, _) = node();
        // The first uplink has no IPv6 address: the next one's counts.
        let uplinks = ["ipv4only".to_owned(), "eth1".to_owned()];
        assert_eq!(
            primary_address(&v6, &uplinks),
            Some("fd00:172::1".parse().unwrap())
        );
    }

    #[test]
    fn addresses_of_the_family_type_are_selected_as_their_ip_addr_forms() {
        // As `uplink::addresses` gives them: Ipv4Addr, not IpAddr.
        let (v4, _, uplinks) = node();
        let typed: Vec<(String, Ipv4Addr)> = v4
            .iter()
            .filter_map(|(dev, ip)| match ip {
                IpAddr::V4(v4) => Some((dev.clone(), *v4)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let only = selection(&["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(
            served_node_addresses(&only, &typed, &uplinks),
            [Ipv4Addr::new(10, 0, 0, 1)]
        );
        assert_eq!(
            served_node_addresses(&[], &typed, &uplinks),
            [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(192, 168, 100, 1)]
        );
    }

    #[test]
    fn node_port_address_flags_take_cidrs_of_either_family_or_primary_alone() {
        assert_eq!(
            parse_node_port_address("2001:db8::7/64")
                .unwrap()
                .to_string(),
            "2001:db8::/64"
        );
        assert_eq!(
            parse_node_port_address("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_node_port_address("primary"),
            Ok(NodePortAddress::Primary)
        );
        for bad in ["2001:db8::1", "fd00::/129", "10.0.0.0/33", "primary4"] {
            assert!(parse_node_port_address(bad).is_err(), "{bad}");
        }
        assert!(
            kubeproxy_config::check_node_port_addresses(&selection(&["primary", "fd00::/8"]))
                .is_err()
        );
    }
}
