//! Loading the tc programs and attaching them to pod interfaces.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, MapError},
    pin::PinError,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc,
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};
use dataplane_common::{
    capacity, map_layouts, map_names, CtLifetimes, MapLayout, Nat6Config, NatConfig, LAYOUT_VERSION,
};
use log::{info, warn};

use crate::node::{
    lb_maps::BpfLbMaps,
    migrate::{self, Carry, MigrateError, Pass, Plan},
    pinned::{
        self, Conntrack6Maps, ConntrackMaps, CounterMap, MapOpenError, Nat6Map, NatMap,
        SockRevNatMap,
    },
    socket_lb::{self, SocketLbError, SOCK_LINKS_DIR},
    verify::load_uninterrupted,
};

/// The object built by build.rs from `dataplane-ebpf`, embedded so the agent
/// is a single file.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

pub const FROM_POD: &str = "from_pod";
pub const TO_POD: &str = "to_pod";
/// Uplink ingress (tc): traffic from outside to external frontends.
pub const FROM_OUTSIDE: &str = "from_outside";
/// Uplink egress (tc): local backends' replies to outside clients.
pub const TO_OUTSIDE: &str = "to_outside";
/// Uplink ingress (XDP), in front of `from_outside`.
pub const XDP_FROM_OUTSIDE: &str = "xdp_from_outside";

/// How the XDP program runs on an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver, before an skb exists.
    Native,
    /// In the stack (any interface), after the skb is built.
    Generic,
    /// A previous agent's pinned link, its program replaced in place (the
    /// mode it was attached with is kept).
    Adopted,
}
/// The programs' load-time switch of `DatapathConfig::direct_redirect`.
const DIRECT_REDIRECT: &str = "DIRECT_REDIRECT";
/// The programs' load-time switch of [`DatapathClock::Coarse`].
const COARSE_CLOCK: &str = "COARSE_CLOCK";
/// Benchmark reference program (parse + one lookup); loaded, never attached.
pub const BENCH_FLOOR: &str = "bench_floor";
/// Benchmark reference program: the floor plus one conntrack lookup of the
/// packet's own flow. Loaded, never attached.
pub const BENCH_FLOOR_FLOW: &str = "bench_floor_flow";
/// Benchmark reference program: the floor plus the two conntrack inserts
/// of a new flow. Loaded, never attached.
pub const BENCH_FLOOR_INSERT: &str = "bench_floor_insert";
/// Benchmark reference program that does nothing: the fixed cost of a test
/// run. Loaded, never attached.
pub const BENCH_EMPTY: &str = "bench_empty";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this agent was built with AYA_BUILD_SKIP and carries no eBPF programs; build it with `cargo xtask build`")]
    NoPrograms,
    #[error("loading the eBPF object with maps pinned under {}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: String },
    #[error("program {name}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("verifying program {name}")]
    Verify {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Map(#[from] MapOpenError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("writing the map layout version")]
    StampLayout {
        #[source]
        source: MapError,
    },
    #[error("writing the conntrack lifetimes")]
    Lifetimes {
        #[source]
        source: MapError,
    },
    #[error("attaching {hook}")]
    Attach {
        hook: String,
        #[source]
        source: ProgramError,
    },
    #[error("{hook}: expected a BPF link (tcx or XDP)")]
    NotTcx {
        hook: String,
        #[source]
        source: LinkError,
    },
    #[error("{hook}: pinning the link at {}", path.display())]
    PinLink {
        hook: String,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error(transparent)]
    SocketLb(#[from] SocketLbError),
    #[error("{what} {}", path.display())]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn fs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Fs { what, path, source }
}

/// The maps userspace works with, taken out of the loaded object.
pub struct DatapathMaps {
    pub lb: BpfLbMaps,
    pub conntrack: ConntrackMaps,
    pub conntrack6: Conntrack6Maps,
    pub counters: CounterMap,
    pub sock_revnat: SockRevNatMap,
    pub nat_config: Array<MapData, NatConfig>,
    /// SNAT entries of external flows, for the sweep.
    pub nat: NatMap,
    /// This node's IPv6 SNAT address.
    pub nat6_config: Array<MapData, Nat6Config>,
    /// SNAT entries of external IPv6 flows, for the sweep.
    pub nat6: Nat6Map,
}

/// What the datapath is loaded with: conntrack sizes and lifetimes
/// (`ConntrackOptions`), and how translated packets are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathConfig {
    pub ct_max_tcp: u32,
    pub ct_max_other: u32,
    pub ct_lifetimes: CtLifetimes,
    /// A pod's packet DNATed to a backend goes straight to it (FIB lookup
    /// and redirect, into a local pod's namespace with
    /// `bpf_redirect_peer`) instead of through the host's stack
    /// (`--direct-redirect`); off where the kernel lacks the helpers.
    pub direct_redirect: bool,
    /// Timestamps from `bpf_ktime_get_coarse_ns` where the kernel has it
    /// (5.11 and later), else from `bpf_ktime_get_ns`.
    pub coarse_clock: bool,
}

impl Default for DatapathConfig {
    /// The object's sizes, kube-proxy's lifetimes, delivery by the stack
    /// (what a test run, whose FIB is the host's, can check).
    fn default() -> Self {
        Self {
            ct_max_tcp: capacity::CT_TCP,
            ct_max_other: capacity::CT_OTHER,
            ct_lifetimes: CtLifetimes::default(),
            direct_redirect: false,
            coarse_clock: true,
        }
    }
}

/// The clock the programs read for conntrack, NAT, affinity and trace
/// times. Both are CLOCK_MONOTONIC, so the agent compares either with its
/// own `clock_gettime(CLOCK_MONOTONIC)`; the coarse one is the time of the
/// last tick, up to a jiffy (1-10 ms) behind, so flows look that much older
/// at most: nothing next to the lifetimes' seconds and the one-second
/// refresh of `last_seen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathClock {
    /// `bpf_ktime_get_ns`.
    Precise,
    /// `bpf_ktime_get_coarse_ns`: about half the cost of a read.
    Coarse,
}

impl std::fmt::Display for DatapathClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Precise => "bpf_ktime_get_ns",
            Self::Coarse => "bpf_ktime_get_coarse_ns",
        })
    }
}

/// Program types of the object whose programs read the clock (tc, the
/// uplink's XDP, the socket hooks' affinity): one constant serves them
/// all, so the coarse clock needs every one of them to have the helper.
const CLOCK_READERS: [aya::programs::ProgramType; 3] = [
    aya::programs::ProgramType::SchedClassifier,
    aya::programs::ProgramType::Xdp,
    aya::programs::ProgramType::CgroupSockAddr,
];

/// The clock for a load that `wants_coarse`, given `has_coarse`, the probe
/// of one program type for `bpf_ktime_get_coarse_ns`; with the reason when
/// the precise clock is taken although the coarse one was wanted.
fn choose_clock<E: std::fmt::Display>(
    wants_coarse: bool,
    mut has_coarse: impl FnMut(aya::programs::ProgramType) -> Result<bool, E>,
) -> (DatapathClock, Option<String>) {
    if !wants_coarse {
        return (DatapathClock::Precise, None);
    }
    for program_type in CLOCK_READERS {
        let why = match has_coarse(program_type) {
            Ok(true) => continue,
            Ok(false) => format!("this kernel has no bpf_ktime_get_coarse_ns for {program_type:?} programs (before 5.11)"),
            Err(e) => format!("probing for bpf_ktime_get_coarse_ns in {program_type:?} programs failed ({e})"),
        };
        return (DatapathClock::Precise, Some(why));
    }
    (DatapathClock::Coarse, None)
}

/// [`choose_clock`] with the kernel's answers; logs which clock it is.
fn probe_clock(wants_coarse: bool) -> DatapathClock {
    let (clock, why) = choose_clock(wants_coarse, |program_type| {
        aya::sys::is_helper_supported(
            program_type,
            aya::sys::BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        )
    });
    match why {
        Some(why) => info!("datapath clock: {clock} ({why})"),
        None => info!("datapath clock: {clock}"),
    }
    clock
}

/// Whether the kernel has `bpf_redirect_peer` for tc programs (5.10 and
/// later), probed as libbpf does; logs once why not.
fn redirect_peer_supported() -> bool {
    use aya::{programs::ProgramType, sys::BpfHelper};
    match aya::sys::is_helper_supported(
        ProgramType::SchedClassifier,
        BpfHelper::BPF_FUNC_redirect_peer,
    ) {
        Ok(true) => true,
        Ok(false) => {
            warn!("this kernel has no bpf_redirect_peer (before 5.10): --direct-redirect is off, the stack delivers");
            false
        }
        Err(e) => {
            warn!("probing for bpf_redirect_peer failed ({e}): --direct-redirect is off, the stack delivers");
            false
        }
    }
}

impl DatapathConfig {
    /// Every map's layout as this start creates it.
    pub fn layouts(&self) -> Vec<MapLayout> {
        map_layouts::ALL
            .iter()
            .map(|l| match l.name {
                // Each family's conntrack maps get the same sizes.
                map_names::CT_TCP | map_names::CT6_TCP => MapLayout {
                    max_entries: self.ct_max_tcp,
                    ..*l
                },
                map_names::CT_OTHER | map_names::CT6_OTHER => MapLayout {
                    max_entries: self.ct_max_other,
                    ..*l
                },
                _ => *l,
            })
            .collect()
    }
}

/// How one direction's program is attached to an interface.
enum Link {
    /// A tcx link pinned at this path: it outlives the agent, so traffic
    /// keeps flowing through a restart and the next agent takes it over.
    Pinned(PathBuf),
    /// A clsact filter (kernels before 6.6): detached when the agent exits.
    Owned(SchedClassifierLinkId),
}

struct Attachment {
    ifname: String,
    from_pod: Link,
    to_pod: Link,
}

pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    /// Where tcx links are pinned: `<bpffs>/links/<ifindex>-<hook>`.
    links_dir: PathBuf,
    /// Where the socket hook links are pinned: `<bpffs>/sock-links/<hook>`.
    sock_links_dir: PathBuf,
    attached: HashMap<u32, Attachment>,
    /// A migration from maps pinned by an earlier agent, finished by
    /// [`Datapath::commit_migration`] once the programs switched.
    pending: Option<(Plan, Vec<MapLayout>)>,
    /// Uplink interfaces and their programs, by ifindex.
    uplinks: HashMap<u32, Attachment>,
    /// Pinned XDP links of the uplinks.
    xdp_pins: Vec<PathBuf>,
    clock: DatapathClock,
    /// Layout version of the maps found pinned at load (`None`: none were).
    found_layout: Option<u32>,
}

impl Datapath {
    /// [`Datapath::load_with`] the object's sizes and default lifetimes.
    pub fn load(bpffs: &Path) -> Result<(Self, DatapathMaps), DatapathError> {
        Self::load_with(bpffs, &DatapathConfig::default())
    }

    /// Loads the programs, creating the maps pinned under `bpffs` or
    /// reusing the ones a previous agent pinned there. Maps of an older
    /// layout or other sizes are migrated (`migrate`): the new ones are
    /// loaded beside them, flows converted into them, and
    /// [`Datapath::commit_migration`] puts them in place after the
    /// programs switched.
    pub fn load_with(
        bpffs: &Path,
        config: &DatapathConfig,
    ) -> Result<(Self, DatapathMaps), DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoPrograms);
        }
        let layouts = config.layouts();
        let plan = migrate::plan(bpffs, &layouts)?;
        // Anything an interrupted start left staged is started over.
        migrate::remove_staging(bpffs)?;
        if !plan.staged.is_empty() {
            let staging = bpffs.join(migrate::STAGING_DIR);
            std::fs::create_dir_all(&staging).map_err(fs_err("creating", &staging))?;
        }
        if plan.is_migration() {
            info!(
                "maps under {} have layout {:?}, this agent {LAYOUT_VERSION}: migrating {:?}",
                bpffs.display(),
                plan.found,
                plan.maps
                    .iter()
                    .filter(|(_, c)| *c != Carry::Adopt)
                    .collect::<Vec<_>>()
            );
        }
        let mut loader = EbpfLoader::new();
        // BTF-defined maps carry no pinning request: every one is pinned here.
        for name in map_names::ALL {
            loader.map_pin_path(name, plan.pin_path(bpffs, name));
        }
        loader.map_max_entries(map_names::CT_TCP, config.ct_max_tcp);
        loader.map_max_entries(map_names::CT_OTHER, config.ct_max_other);
        loader.map_max_entries(map_names::CT6_TCP, config.ct_max_tcp);
        loader.map_max_entries(map_names::CT6_OTHER, config.ct_max_other);
        let direct_redirect = u8::from(config.direct_redirect && redirect_peer_supported());
        loader.override_global(DIRECT_REDIRECT, &direct_redirect, true);
        let clock = probe_clock(config.coarse_clock);
        let coarse_clock = u8::from(clock == DatapathClock::Coarse);
        loader.override_global(COARSE_CLOCK, &coarse_clock, true);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                dir: bpffs.to_owned(),
                source: Box::new(source),
            })?;
        for name in [
            FROM_POD,
            TO_POD,
            FROM_OUTSIDE,
            TO_OUTSIDE,
            BENCH_FLOOR,
            BENCH_FLOOR_FLOW,
            BENCH_FLOOR_INSERT,
            BENCH_EMPTY,
        ] {
            let program = program_mut(&mut ebpf, name)?;
            load_uninterrupted(|| program.load())
                .map_err(|source| DatapathError::Verify { name, source })?;
        }
        let xdp = xdp_mut(&mut ebpf)?;
        load_uninterrupted(|| xdp.load()).map_err(|source| DatapathError::Verify {
            name: XDP_FROM_OUTSIDE,
            source,
        })?;
        set_lifetimes(&mut ebpf, &config.ct_lifetimes)?;
        let found_layout = plan.found;
        let pending = if plan.is_migration() {
            migrate::convert(&plan, bpffs, &layouts, Pass::First)?;
            Some((plan, layouts))
        } else {
            stamp_layout(&mut ebpf)?;
            None
        };
        let lb = BpfLbMaps::from_ebpf(&mut ebpf)?;
        let conntrack = ConntrackMaps::take(&mut ebpf)?;
        let conntrack6 = Conntrack6Maps::take(&mut ebpf)?;
        let counters: CounterMap = pinned::take(&mut ebpf, map_names::COUNTERS)?;
        let sock_revnat: SockRevNatMap = pinned::take(&mut ebpf, map_names::SOCK_REVNAT)?;
        let nat_config = pinned::take(&mut ebpf, map_names::NAT_CONFIG)?;
        let nat: NatMap = pinned::take(&mut ebpf, map_names::NAT)?;
        let nat6_config = pinned::take(&mut ebpf, map_names::NAT6_CONFIG)?;
        let nat6: Nat6Map = pinned::take(&mut ebpf, map_names::NAT6)?;
        let links_dir = bpffs.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(fs_err("creating", &links_dir))?;
        Ok((
            Self {
                ebpf,
                bpffs: bpffs.to_owned(),
                links_dir,
                sock_links_dir: bpffs.join(SOCK_LINKS_DIR),
                attached: HashMap::new(),
                pending,
                uplinks: HashMap::new(),
                xdp_pins: Vec::new(),
                clock,
                found_layout,
            },
            DatapathMaps {
                lb,
                conntrack,
                conntrack6,
                counters,
                sock_revnat,
                nat_config,
                nat,
                nat6_config,
                nat6,
            },
        ))
    }

    /// The clock the programs' timestamps come from.
    pub fn clock(&self) -> DatapathClock {
        self.clock
    }

    /// Whether conntrack may hold flows to backends the first full sync
    /// adds, per family (IPv4, IPv6), so their replies stay looked up
    /// (`SyncEngine::set_flows_carried`, `set_flows_carried6`): flows kept
    /// from before (a restart, an upgrade; one key read tells), or flows
    /// an earlier agent's programs may still make until this agent's
    /// replace them on every interface (pinned links, clsact filters). On
    /// IPv4 those of a migration's earlier layout, carried over at the
    /// commit; on IPv6 any earlier agent's: the release before the IPv6
    /// "no flows yet" bits has this same layout, so nothing tells it from
    /// this one, and its flows' replies would pass untranslated.
    pub fn flows_carried(
        &self,
        conntrack: &ConntrackMaps,
        conntrack6: &Conntrack6Maps,
    ) -> (bool, bool) {
        (
            conntrack.iter().next().is_some() || self.is_migrating(),
            conntrack6.iter().next().is_some() || self.found_layout.is_some(),
        )
    }

    /// Whether maps of an earlier agent wait for [`Datapath::commit_migration`].
    pub fn is_migrating(&self) -> bool {
        self.pending.is_some()
    }

    /// Finishes a migration once the sync engine filled the new maps and
    /// the programs switched on every interface (`attach`): flows the
    /// previous programs created since the first conversion are carried
    /// over, the new maps are pinned in place of the old ones, the maps
    /// this layout dropped are unpinned and the layout version stamped.
    pub fn commit_migration(&mut self) -> Result<(), DatapathError> {
        let Some((plan, layouts)) = self.pending.take() else {
            return Ok(());
        };
        migrate::convert(&plan, &self.bpffs, &layouts, Pass::CatchUp)?;
        migrate::commit(&plan, &self.bpffs)?;
        stamp_layout(&mut self.ebpf)?;
        info!(
            "maps under {} migrated from layout {:?} to {LAYOUT_VERSION}",
            self.bpffs.display(),
            plan.found
        );
        Ok(())
    }

    /// A loaded program, e.g. to run it under BPF_PROG_TEST_RUN.
    pub fn classifier(&self, name: &str) -> Result<&SchedClassifier, DatapathError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or_else(|| DatapathError::MissingProgram { name: name.into() })?;
        program.try_into().map_err(|source| DatapathError::Program {
            name: name.into(),
            source,
        })
    }

    /// Socket-level load balancing on: attaches the socket hooks at
    /// `cgroup_root`, but for those `refused` (a test switch; see
    /// `socket_lb::attach`).
    pub fn attach_socket_lb(
        &mut self,
        cgroup_root: &Path,
        refused: &[String],
    ) -> Result<(), SocketLbError> {
        socket_lb::attach(&mut self.ebpf, cgroup_root, &self.sock_links_dir, refused)
    }

    /// Socket-level load balancing off: removes hooks a previous agent
    /// attached.
    pub fn detach_socket_lb(&mut self) {
        socket_lb::detach_if_pinned(&self.sock_links_dir);
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        program_mut(&mut self.ebpf, name)
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    /// Attaches `from_pod` on ingress and `to_pod` on egress of a pod's
    /// host-side interface: pinned tcx links where the kernel has them
    /// (6.6+), clsact filters otherwise. Links a previous agent pinned for
    /// this interface are replaced after the new ones are in place, so no
    /// packet goes untranslated in between.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        if self.attached.contains_key(&ifindex) {
            return Ok(());
        }
        let tcx = KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            // Already present is fine: another tool may share the qdisc.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                warn!("adding clsact qdisc on {ifname}: {e} (continuing, it may already exist)");
            }
        }
        let from_pod = self.attach_one(FROM_POD, ifindex, ifname, TcAttachType::Ingress, tcx)?;
        let to_pod = match self.attach_one(TO_POD, ifindex, ifname, TcAttachType::Egress, tcx) {
            Ok(link) => link,
            Err(e) => {
                self.release(FROM_POD, from_pod);
                return Err(e);
            }
        };
        self.attached.insert(
            ifindex,
            Attachment {
                ifname: ifname.to_owned(),
                from_pod,
                to_pod,
            },
        );
        info!("attached to pod interface {ifname} (ifindex {ifindex})");
        Ok(())
    }

    /// Attaches the external datapath to an uplink: `from_outside` on tc
    /// ingress and `to_outside` on tc egress, pinned like the pod links
    /// (`<ifindex>-uplink-ingress`), so NodePort connections survive an
    /// agent restart.
    pub fn attach_uplink(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        if self.uplinks.contains_key(&ifindex) {
            return Ok(());
        }
        let tcx = KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                warn!("adding clsact qdisc on {ifname}: {e} (continuing, it may already exist)");
            }
        }
        let from = self.attach_one_at(
            FROM_OUTSIDE,
            ifindex,
            ifname,
            TcAttachType::Ingress,
            tcx,
            "uplink-",
        )?;
        let to = match self.attach_one_at(
            TO_OUTSIDE,
            ifindex,
            ifname,
            TcAttachType::Egress,
            tcx,
            "uplink-",
        ) {
            Ok(link) => link,
            Err(e) => {
                self.release(FROM_OUTSIDE, from);
                return Err(e);
            }
        };
        self.uplinks.insert(
            ifindex,
            Attachment {
                ifname: ifname.to_owned(),
                from_pod: from,
                to_pod: to,
            },
        );
        info!("attached the external datapath to uplink {ifname} (ifindex {ifindex}): tc ingress and egress");
        Ok(())
    }

    pub fn uplink_count(&self) -> usize {
        self.uplinks.len()
    }

    /// The uplinks attached now: (ifindex, name).
    pub fn uplinks(&self) -> Vec<(u32, String)> {
        self.uplinks
            .iter()
            .map(|(&ifindex, a)| (ifindex, a.ifname.clone()))
            .collect()
    }

    /// Records an attached uplink's new name: the programs stay attached to
    /// the interface (links and pins go by ifindex).
    pub fn rename_uplink(&mut self, ifindex: u32, ifname: &str) {
        if let Some(attachment) = self.uplinks.get_mut(&ifindex) {
            info!(
                "uplink {} (ifindex {ifindex}) renamed {ifname}: the external datapath stays attached",
                attachment.ifname
            );
            ifname.clone_into(&mut attachment.ifname);
        }
    }

    /// Takes the external datapath (tc and XDP) off an uplink: one that
    /// went away (the kernel dropped its programs, only the pins remain) or
    /// that no longer is an uplink (unpinning detaches them).
    pub fn detach_uplink(&mut self, ifindex: u32) {
        let Some(attachment) = self.uplinks.remove(&ifindex) else {
            return;
        };
        self.release(FROM_OUTSIDE, attachment.from_pod);
        self.release(TO_OUTSIDE, attachment.to_pod);
        let xdp = self.links_dir.join(format!("{ifindex}-uplink-xdp"));
        if let Some(i) = self.xdp_pins.iter().position(|p| *p == xdp) {
            self.xdp_pins.swap_remove(i);
            let _ = std::fs::remove_file(&xdp);
        }
        info!(
            "detached the external datapath from uplink {} (ifindex {ifindex})",
            attachment.ifname
        );
    }

    /// The loaded XDP program, e.g. to run it under BPF_PROG_TEST_RUN.
    pub fn xdp(&self) -> Result<&Xdp, DatapathError> {
        let program =
            self.ebpf
                .program(XDP_FROM_OUTSIDE)
                .ok_or_else(|| DatapathError::MissingProgram {
                    name: XDP_FROM_OUTSIDE.into(),
                })?;
        program.try_into().map_err(|source| DatapathError::Program {
            name: XDP_FROM_OUTSIDE.into(),
            source,
        })
    }

    /// Puts `xdp_from_outside` in front of an uplink's tc programs (see
    /// [`Datapath::attach_uplink`]): native where the driver supports it,
    /// generic otherwise. The link is pinned (`<ifindex>-uplink-xdp`); a
    /// previous agent's pinned link keeps its place and gets this agent's
    /// program, so the interface never runs without one.
    pub fn attach_uplink_xdp(
        &mut self,
        ifindex: u32,
        ifname: &str,
        modes: &[XdpAttachMode],
    ) -> Result<XdpAttachMode, DatapathError> {
        let pin = self.links_dir.join(format!("{ifindex}-uplink-xdp"));
        let hook = format!("{XDP_FROM_OUTSIDE} on {ifname}");
        let attach_err = |hook: &str| {
            let hook = hook.to_owned();
            move |source| DatapathError::Attach { hook, source }
        };
        let prog = xdp_mut(&mut self.ebpf)?;
        let (id, mode) = if pin.exists() {
            let link = PinnedLink::from_pin(&pin).map_err(|source| DatapathError::NotTcx {
                hook: hook.clone(),
                source,
            })?;
            let link =
                XdpLink::try_from(FdLink::from(link)).map_err(|source| DatapathError::NotTcx {
                    hook: hook.clone(),
                    source,
                })?;
            let id = prog.attach_to_link(link).map_err(attach_err(&hook))?;
            (id, XdpAttachMode::Adopted)
        } else {
            let mut attached = None;
            let mut last_err = None;
            for &mode in modes {
                let flags = match mode {
                    XdpAttachMode::Native => XdpMode::Driver,
                    XdpAttachMode::Generic => XdpMode::Skb,
                    XdpAttachMode::Adopted => continue,
                };
                match prog.attach_to_if_index(ifindex, flags) {
                    Ok(id) => {
                        attached = Some((id, mode));
                        break;
                    }
                    Err(e) => {
                        info!("{hook}: {mode:?} XDP unavailable ({e})");
                        last_err = Some(e);
                    }
                }
            }
            match (attached, last_err) {
                (Some(attached), _) => attached,
                (None, Some(e)) => return Err(attach_err(&hook)(e)),
                (None, None) => {
                    return Err(DatapathError::MissingProgram {
                        name: format!("{XDP_FROM_OUTSIDE} (no XDP mode to try)"),
                    })
                }
            }
        };
        let link = prog.take_link(id).map_err(attach_err(&hook))?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::NotTcx {
            hook: hook.clone(),
            source,
        })?;
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("removing", &pin)(e)),
        }
        link.pin(&pin).map_err(|source| DatapathError::PinLink {
            hook: hook.clone(),
            path: pin.clone(),
            source,
        })?;
        self.xdp_pins.push(pin);
        info!("{hook}: XDP attached, mode {mode:?}");
        Ok(mode)
    }

    fn pin_path(&self, ifindex: u32, attach_type: TcAttachType) -> PathBuf {
        self.pin_path_at(ifindex, attach_type, "")
    }

    fn pin_path_at(&self, ifindex: u32, attach_type: TcAttachType, prefix: &str) -> PathBuf {
        let hook = match attach_type {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        self.links_dir.join(format!("{ifindex}-{prefix}{hook}"))
    }

    fn attach_one(
        &mut self,
        program: &str,
        ifindex: u32,
        ifname: &str,
        attach_type: TcAttachType,
        tcx: bool,
    ) -> Result<Link, DatapathError> {
        self.attach_one_at(program, ifindex, ifname, attach_type, tcx, "")
    }

    fn attach_one_at(
        &mut self,
        program: &str,
        ifindex: u32,
        ifname: &str,
        attach_type: TcAttachType,
        tcx: bool,
        pin_prefix: &str,
    ) -> Result<Link, DatapathError> {
        let hook = format!("{program} on {ifname} {attach_type:?}");
        let pin = self.pin_path_at(ifindex, attach_type, pin_prefix);
        if tcx {
            if let Some(link) = self.replace_pinned(program, &pin, &hook)? {
                return Ok(link);
            }
        }
        let prog = self.program(program)?;
        let id = match prog.attach(ifname, attach_type) {
            Ok(id) => id,
            Err(source) => return Err(DatapathError::Attach { hook, source }),
        };
        if !tcx {
            return Ok(Link::Owned(id));
        }
        let link = match prog.take_link(id) {
            Ok(link) => link,
            Err(source) => return Err(DatapathError::Attach { hook, source }),
        };
        let link = match FdLink::try_from(link) {
            Ok(link) => link,
            Err(source) => return Err(DatapathError::NotTcx { hook, source }),
        };
        // A previous agent's link that could not be updated (a stale one of
        // a deleted interface that had this ifindex): unpinning it detaches
        // it, now that ours runs.
        match std::fs::remove_file(&pin) {
            Ok(()) => info!("{hook}: replaced the link a previous agent pinned"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("removing", &pin)(e)),
        }
        // On failure the link is dropped, which detaches it.
        if let Err(source) = link.pin(&pin) {
            return Err(DatapathError::PinLink {
                hook,
                path: pin,
                source,
            });
        }
        Ok(Link::Pinned(pin))
    }

    /// Switches the tcx link a previous agent pinned at `pin` to our
    /// program in one step (BPF_LINK_UPDATE): every packet sees either the
    /// old program or the new one, never none and never both. `None` when
    /// there is no such link or it cannot be updated (its interface is
    /// gone): the caller attaches anew.
    fn replace_pinned(
        &mut self,
        program: &str,
        pin: &Path,
        hook: &str,
    ) -> Result<Option<Link>, DatapathError> {
        let Ok(pinned) = PinnedLink::from_pin(pin) else {
            return Ok(None);
        };
        let Ok(link) = SchedClassifierLink::try_from(FdLink::from(pinned)) else {
            return Ok(None);
        };
        let prog = self.program(program)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link; our handle on it is not needed.
                drop(prog.take_link(id));
                info!("{hook}: switched the link a previous agent pinned to this agent's program");
                Ok(Some(Link::Pinned(pin.to_owned())))
            }
            Err(e) => {
                warn!("{hook}: updating the pinned link failed ({e}); attaching anew");
                Ok(None)
            }
        }
    }

    fn release(&mut self, program: &str, link: Link) {
        match link {
            Link::Pinned(pin) => {
                let _ = std::fs::remove_file(pin);
            }
            Link::Owned(id) => {
                if let Ok(p) = self.program(program) {
                    let _ = p.detach(id);
                }
            }
        }
    }

    /// Forgets an interface that went away; the kernel already dropped its
    /// programs with it, only the pins remain to be removed.
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(attachment) = self.attached.remove(&ifindex) {
            self.release(FROM_POD, attachment.from_pod);
            self.release(TO_POD, attachment.to_pod);
            info!(
                "detached from pod interface {} (ifindex {ifindex})",
                attachment.ifname
            );
        }
    }

    /// Removes pinned links no interface of ours holds any more (interfaces
    /// deleted, or no longer matching the filter, while no agent ran). Call
    /// after the interfaces present at start were attached.
    pub fn remove_stale_links(&mut self) {
        let ours: Vec<PathBuf> = self
            .attached
            .keys()
            .flat_map(|&i| {
                [
                    self.pin_path(i, TcAttachType::Ingress),
                    self.pin_path(i, TcAttachType::Egress),
                ]
            })
            .chain(self.uplinks.keys().flat_map(|&i| {
                [
                    self.pin_path_at(i, TcAttachType::Ingress, "uplink-"),
                    self.pin_path_at(i, TcAttachType::Egress, "uplink-"),
                ]
            }))
            .chain(self.xdp_pins.iter().cloned())
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if !ours.contains(&path) {
                match std::fs::remove_file(&path) {
                    Ok(()) => info!("removed stale pinned link {}", path.display()),
                    Err(e) => warn!("removing stale pinned link {}: {e}", path.display()),
                }
            }
        }
    }
}

fn xdp_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    let program =
        ebpf.program_mut(XDP_FROM_OUTSIDE)
            .ok_or_else(|| DatapathError::MissingProgram {
                name: XDP_FROM_OUTSIDE.into(),
            })?;
    program.try_into().map_err(|source| DatapathError::Program {
        name: XDP_FROM_OUTSIDE.into(),
        source,
    })
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram { name: name.into() })?;
    program.try_into().map_err(|source| DatapathError::Program {
        name: name.into(),
        source,
    })
}

/// Writes the configured conntrack lifetimes where the datapath, the sweep
/// and `inspect` read them.
fn set_lifetimes(ebpf: &mut Ebpf, lifetimes: &CtLifetimes) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut(map_names::CT_LIFETIMES)
        .ok_or(DatapathError::Map(MapOpenError::Missing {
            name: map_names::CT_LIFETIMES,
        }))?;
    let err = |source| DatapathError::Lifetimes { source };
    let mut array: Array<&mut MapData, CtLifetimes> = Array::try_from(map).map_err(err)?;
    array.set(0, *lifetimes, 0).map_err(err)
}

/// Records this agent's layout version in the freshly loaded (or adopted)
/// `LAYOUT` map.
fn stamp_layout(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let stamp_err = |source| DatapathError::StampLayout { source };
    let map = ebpf
        .map_mut(map_names::LAYOUT)
        .ok_or(DatapathError::Map(MapOpenError::Missing {
            name: map_names::LAYOUT,
        }))?;
    let mut layout: Array<&mut MapData, u32> = Array::try_from(map).map_err(stamp_err)?;
    layout.set(0, LAYOUT_VERSION, 0).map_err(stamp_err)
}

/// Subdirectory of the bpffs directory holding the pinned tcx links.
pub const LINKS_DIR: &str = "links";

/// `dataplane-agent cleanup`: detaches every program this datapath pinned
/// under `bpffs` and removes its maps (conntrack included), as
/// `kube-proxy --cleanup` removes its rules. Returns what was removed.
pub fn cleanup(bpffs: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    let links = bpffs.join(LINKS_DIR);
    if links.is_dir() {
        for entry in std::fs::read_dir(&links).map_err(fs_err("reading", &links))? {
            let path = entry.map_err(fs_err("reading", &links))?.path();
            std::fs::remove_file(&path).map_err(fs_err("removing", &path))?;
            removed.push(path);
        }
        std::fs::remove_dir(&links).map_err(fs_err("removing", &links))?;
    }
    removed.extend(socket_lb::detach_pinned(&bpffs.join(SOCK_LINKS_DIR))?);
    let staging = bpffs.join(migrate::STAGING_DIR);
    let names = map_names::ALL.iter().chain(migrate::RETIRED);
    let paths = names
        .clone()
        .map(|name| bpffs.join(name))
        .chain(names.map(|name| staging.join(name)));
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("removing", &path)(e)),
        }
    }
    let _ = std::fs::remove_dir(&staging);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use aya::programs::ProgramType;

    use super::*;

    #[test]
    fn coarse_clock_is_taken_when_every_program_type_has_it() {
        let mut probed = Vec::new();
        let (clock, why) = choose_clock(true, |t| {
            probed.push(t);
            Ok::<_, String>(true)
        });
        assert_eq!((clock, why), (DatapathClock::Coarse, None));
        assert_eq!(probed, CLOCK_READERS, "every clock reader probed");
    }

    #[test]
    fn precise_clock_when_one_program_type_lacks_the_coarse_helper() {
        let (clock, why) = choose_clock(true, |t| Ok::<_, String>(t != ProgramType::Xdp));
        assert_eq!(clock, DatapathClock::Precise);
        let why = why.expect("a reason for the log");
        assert!(why.contains("Xdp") && why.contains("5.11"), "{why}");
    }

    #[test]
    fn precise_clock_when_the_probe_fails() {
        let (clock, why) = choose_clock(true, |_| Err("EPERM"));
        assert_eq!(clock, DatapathClock::Precise);
        assert!(why.expect("a reason").contains("EPERM"));
    }

    #[test]
    fn precise_clock_when_coarse_is_not_wanted_without_probing() {
        let (clock, why) = choose_clock(false, |_| -> Result<bool, String> {
            panic!("probed although the coarse clock is not wanted")
        });
        assert_eq!((clock, why), (DatapathClock::Precise, None));
    }
}
