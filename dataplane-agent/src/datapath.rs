//! Loading the tc programs and attaching them to pod interfaces.

use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{tc, tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use dataplane_common::{map_names, CtEntry, CtKey};
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

/// The maps userspace works with, taken out of the loaded object.
pub struct DatapathMaps {
    pub lb: BpfLbMaps,
    pub conntrack: ConntrackMap,
    pub counters: CounterMap,
}

struct Attachment {
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

pub struct Datapath {
    ebpf: Ebpf,
    attached: HashMap<u32, (String, Attachment)>,
}

impl Datapath {
    /// Loads the programs, creating the maps pinned under `bpffs` or reusing
    /// the ones a previous agent pinned there.
    pub fn load(bpffs: &Path) -> anyhow::Result<(Self, DatapathMaps)> {
        anyhow::ensure!(
            !EBPF_OBJECT.is_empty(),
            "this agent was built with AYA_BUILD_SKIP and carries no eBPF programs; build it with `cargo xtask build`"
        );
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs)
            .load(EBPF_OBJECT)
            .with_context(|| {
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
        let lb = BpfLbMaps::from_ebpf(&mut ebpf)?;
        let conntrack: ConntrackMap = ebpf
            .take_map(map_names::CONNTRACK)
            .context("map CONNTRACK missing from the eBPF object")?
            .try_into()?;
        let counters: CounterMap = ebpf
            .take_map(map_names::COUNTERS)
            .context("map COUNTERS missing from the eBPF object")?
            .try_into()?;
        Ok((
            Self {
                ebpf,
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

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    /// Attaches `from_pod` on ingress and `to_pod` on egress of a pod's
    /// host-side interface: tcx links where the kernel has them (6.6+),
    /// clsact filters otherwise.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
        if self.attached.contains_key(&ifindex) {
            return Ok(());
        }
        if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
            // Already present is fine: another tool may share the qdisc.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                warn!("adding clsact qdisc on {ifname}: {e} (continuing, it may already exist)");
            }
        }
        let from_pod = self
            .program(FROM_POD)?
            .attach(ifname, TcAttachType::Ingress)
            .with_context(|| format!("attaching {FROM_POD} to {ifname} ingress"))?;
        let to_pod = match self.program(TO_POD)?.attach(ifname, TcAttachType::Egress) {
            Ok(link) => link,
            Err(e) => {
                let _ = self.program(FROM_POD)?.detach(from_pod);
                return Err(e).with_context(|| format!("attaching {TO_POD} to {ifname} egress"));
            }
        };
        self.attached.insert(
            ifindex,
            (ifname.to_owned(), Attachment { from_pod, to_pod }),
        );
        info!("attached to pod interface {ifname} (ifindex {ifindex})");
        Ok(())
    }

    /// Forgets an interface that went away; the kernel already dropped its
    /// programs with it, so errors from detaching are expected and ignored.
    pub fn detach(&mut self, ifindex: u32) {
        if let Some((ifname, attachment)) = self.attached.remove(&ifindex) {
            if let Ok(p) = self.program(FROM_POD) {
                let _ = p.detach(attachment.from_pod);
            }
            if let Ok(p) = self.program(TO_POD) {
                let _ = p.detach(attachment.to_pod);
            }
            info!("detached from pod interface {ifname} (ifindex {ifindex})");
        }
    }

    pub fn detach_all(&mut self) {
        let all: Vec<u32> = self.attached.keys().copied().collect();
        for ifindex in all {
            self.detach(ifindex);
        }
    }
}
