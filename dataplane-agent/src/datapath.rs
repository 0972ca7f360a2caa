//! Loading the tc programs and attaching them to pod interfaces.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, MapInfo, PerCpuArray},
    programs::{links::FdLink, tc, tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use dataplane_common::{map_layouts, map_names, Counter, CtEntry, CtKey, LAYOUT_VERSION};
use log::{info, warn};

use crate::lb_maps::BpfLbMaps;

/// The object built by build.rs from `dataplane-ebpf`, embedded so the agent
/// is a single file.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

pub const FROM_POD: &str = "from_pod";
pub const TO_POD: &str = "to_pod";
/// Benchmark reference program (parse + one lookup); loaded, never attached.
pub const BENCH_FLOOR: &str = "bench_floor";

pub type ConntrackMap = BpfHashMap<MapData, CtKey, CtEntry>;
pub type CounterMap = PerCpuArray<MapData, u64>;

/// A datapath counter summed over CPUs (`inspect counters`, `/metrics`).
pub fn counter_total(map: &CounterMap, counter: Counter) -> Result<u64, aya::maps::MapError> {
    Ok(map.get(&(counter as u32), 0)?.iter().sum())
}

/// The maps userspace works with, taken out of the loaded object.
pub struct DatapathMaps {
    pub lb: BpfLbMaps,
    pub conntrack: ConntrackMap,
    pub counters: CounterMap,
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
    /// Where tcx links are pinned: `<bpffs>/links/<ifindex>-<hook>`.
    links_dir: PathBuf,
    attached: HashMap<u32, Attachment>,
}

impl Datapath {
    /// Loads the programs, creating the maps pinned under `bpffs` or reusing
    /// the ones a previous agent pinned there.
    pub fn load(bpffs: &Path) -> anyhow::Result<(Self, DatapathMaps)> {
        anyhow::ensure!(
            !EBPF_OBJECT.is_empty(),
            "this agent was built with AYA_BUILD_SKIP and carries no eBPF programs; build it with `cargo xtask build`"
        );
        check_pinned_layout(bpffs)?;
        let mut loader = EbpfLoader::new();
        // BTF-defined maps carry no pinning request: every one is pinned here.
        for name in map_names::ALL {
            loader.map_pin_path(name, bpffs.join(name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the eBPF object with maps pinned under {}",
                bpffs.display()
            )
        })?;
        for name in [FROM_POD, TO_POD, BENCH_FLOOR] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        stamp_layout(&mut ebpf)?;
        let lb = BpfLbMaps::from_ebpf(&mut ebpf)?;
        let conntrack: ConntrackMap = ebpf
            .take_map(map_names::CONNTRACK)
            .context("map CONNTRACK missing from the eBPF object")?
            .try_into()?;
        let counters: CounterMap = ebpf
            .take_map(map_names::COUNTERS)
            .context("map COUNTERS missing from the eBPF object")?
            .try_into()?;
        let links_dir = bpffs.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        Ok((
            Self {
                ebpf,
                links_dir,
                attached: HashMap::new(),
            },
            DatapathMaps {
                lb,
                conntrack,
                counters,
            },
        ))
    }

    /// A loaded program, e.g. to run it under BPF_PROG_TEST_RUN.
    pub fn classifier(&self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    fn program(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
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
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
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

    fn pin_path(&self, ifindex: u32, attach_type: TcAttachType) -> PathBuf {
        let hook = match attach_type {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        self.links_dir.join(format!("{ifindex}-{hook}"))
    }

    fn attach_one(
        &mut self,
        program: &str,
        ifindex: u32,
        ifname: &str,
        attach_type: TcAttachType,
        tcx: bool,
    ) -> anyhow::Result<Link> {
        let hook = format!("{program} on {ifname} {attach_type:?}");
        let prog = self.program(program)?;
        let id = prog
            .attach(ifname, attach_type)
            .with_context(|| format!("attaching {hook}"))?;
        if !tcx {
            return Ok(Link::Owned(id));
        }
        let link = FdLink::try_from(prog.take_link(id)?)
            .with_context(|| format!("{hook}: expected a tcx link"))?;
        let pin = self.pin_path(ifindex, attach_type);
        // A previous agent's link (or a stale one of a deleted interface that
        // had this ifindex): unpinning it detaches it, now that ours runs.
        match std::fs::remove_file(&pin) {
            Ok(()) => info!("{hook}: replaced the link a previous agent pinned"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
        }
        // On failure the link is dropped, which detaches it.
        link.pin(&pin)
            .with_context(|| format!("{hook}: pinning the link at {}", pin.display()))?;
        Ok(Link::Pinned(pin))
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

/// Why maps pinned by an earlier agent cannot be adopted. aya reuses a
/// pinned map of any shape without a word, so this is checked first.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the maps pinned under {0} come from a release before map layout versions (no LAYOUT map); \
         remove them with `dataplane-agent cleanup --bpffs {0}` (this resets connections through services)",
        .dir.display()
    )]
    Unversioned { dir: PathBuf },
    #[error(
        "the maps pinned under {0} have layout version {found}, this agent uses {expected}; \
         remove them with `dataplane-agent cleanup --bpffs {0}` (this resets connections through services)",
        .dir.display()
    )]
    Version {
        dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("pinned map {}: {what} is {found}, this agent's layout has {expected}", .path.display())]
    Shape {
        path: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("reading pinned map {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: MapError,
    },
}

/// Checks the maps pinned under `bpffs`, if any, against this agent's
/// layout: the version stored in `LAYOUT` (0: created but not yet stamped),
/// then every map's key size, value size and capacity.
pub fn check_pinned_layout(bpffs: &Path) -> Result<(), LayoutError> {
    let pinned: Vec<_> = map_layouts::ALL
        .iter()
        .map(|layout| (layout, bpffs.join(layout.name)))
        .filter(|(_, path)| path.exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let dir = bpffs.to_path_buf();
    let layout_path = bpffs.join(map_names::LAYOUT);
    if !layout_path.exists() {
        return Err(LayoutError::Unversioned { dir });
    }
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayoutError::Read { path, source }
    };
    let map = MapData::from_pin(&layout_path).map_err(read(&layout_path))?;
    let version: Array<MapData, u32> =
        Array::try_from(Map::Array(map)).map_err(read(&layout_path))?;
    let found = version.get(&0, 0).map_err(read(&layout_path))?;
    if found != 0 && found != LAYOUT_VERSION {
        return Err(LayoutError::Version {
            dir,
            found,
            expected: LAYOUT_VERSION,
        });
    }
    for (layout, path) in pinned {
        let info = MapInfo::from_pin(&path).map_err(read(&path))?;
        for (what, found, expected) in [
            ("key size", info.key_size(), layout.key_size),
            ("value size", info.value_size(), layout.value_size),
            ("max entries", info.max_entries(), layout.max_entries),
        ] {
            if found != expected {
                return Err(LayoutError::Shape {
                    path,
                    what,
                    found,
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// Records this agent's layout version in the freshly loaded (or adopted)
/// `LAYOUT` map.
fn stamp_layout(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(map_names::LAYOUT)
        .context("map LAYOUT missing from the eBPF object")?;
    let mut layout: Array<&mut MapData, u32> = Array::try_from(map)?;
    layout
        .set(0, LAYOUT_VERSION, 0)
        .context("writing the map layout version")
}

/// Subdirectory of the bpffs directory holding the pinned tcx links.
pub const LINKS_DIR: &str = "links";

/// `dataplane-agent cleanup`: detaches every program this datapath pinned
/// under `bpffs` and removes its maps (conntrack included), as
/// `kube-proxy --cleanup` removes its rules. Returns what was removed.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = bpffs.join(LINKS_DIR);
    if links.is_dir() {
        for entry in
            std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))?
        {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in map_names::ALL {
        let path = bpffs.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(removed)
}
