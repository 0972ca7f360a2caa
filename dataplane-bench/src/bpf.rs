//! A datapath loaded through the agent's own code on a private bpffs, its
//! maps programmed with the agent's sync engine.

use anyhow::Context as _;
use dataplane_agent::{
    control::sync::SyncEngine,
    node::{
        bpffs::ensure_bpffs,
        datapath::{Datapath, DatapathMaps},
        lb_maps::BpfLbMaps,
        pinned::{ConntrackMap, CounterMap},
    },
};
use nix::mount::{umount2, MntFlags};
use tempfile::TempDir;

/// A bpffs mounted on a temporary directory, unmounted on drop.
pub struct Bpffs {
    pub dir: TempDir,
}

impl Bpffs {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dataplane-bench-bpffs-")
            .tempdir()?;
        ensure_bpffs(dir.path())?;
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazy: the maps go away with the last fd holding them.
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

pub struct Loaded {
    pub datapath: Datapath,
    pub _conntrack: ConntrackMap,
    pub counters: CounterMap,
    pub engine: SyncEngine<BpfLbMaps>,
    // Last: unmounted after every fd above is closed.
    _bpffs: Bpffs,
}

impl Loaded {
    pub fn new() -> anyhow::Result<Self> {
        let bpffs = Bpffs::new()?;
        let (
            datapath,
            DatapathMaps {
                lb,
                conntrack,
                counters,
            },
        ) = Datapath::load(bpffs.dir.path())
            .context("loading the datapath (needs root, BPF, and `cargo xtask build`)")?;
        let engine = SyncEngine::adopt(lb).context("adopting the fresh maps")?;
        Ok(Self {
            datapath,
            _conntrack: conntrack,
            counters,
            engine,
            _bpffs: bpffs,
        })
    }

    /// Sum over CPUs of one counter.
    pub fn counter(&self, counter: dataplane_common::Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}
