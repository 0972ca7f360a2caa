//! Control plane: programming a large cluster from nothing and one endpoint
//! change at that scale, through the agent's sync engine into the real maps,
//! against the same state written as kube-proxy would (iptables-restore,
//! `nft -f`); and the real agent binary's peak memory at that scale.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use dataplane_agent::control::{
    model::{ClusterEvent, ClusterState, IpFamily},
    source::manifests::ManifestSource,
};
use dataplane_lab::{
    agent::Agent,
    netns::{self, Netns},
};
use dataplane_testkit::datapath::{Bpffs, Harness};

use crate::{
    kubeproxy_rules::{self, iptables_restore},
    scenario::{self, Svc},
    stats::median,
};

#[derive(Debug, Clone)]
pub struct ControlPlaneResult {
    pub services: usize,
    pub endpoints: usize,
    /// Median of [`FULL_RUNS`] runs, each into freshly loaded maps.
    pub ebpf_full: Duration,
    pub ebpf_full_min: Duration,
    pub ebpf_full_max: Duration,
    /// One endpoint change: event into the model, frontends, map writes.
    pub ebpf_change_median: Duration,
    pub ebpf_change_max: Duration,
    pub changes: usize,
    pub iptables_full: Option<Duration>,
    pub iptables_change: Option<Duration>,
    pub nft_full: Option<Duration>,
    pub nft_change: Option<Duration>,
    /// Agent binary: start until /healthz answers 200.
    pub agent_ready: Option<Duration>,
    pub agent_vm_hwm_kib: Option<u64>,
    pub notes: Vec<String>,
}

const CHANGES: usize = 21;
/// Full syncs from nothing, each into a fresh datapath: one figure moves by
/// a third from run to run on these shared machines.
pub const FULL_RUNS: usize = 5;
const RULE_CHANGES: usize = 5;

fn write_manifests(dir: &Path, svcs: &[Svc]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("services.yaml"), scenario::manifests_yaml(svcs))
        .context("writing manifests")
}

/// The EndpointSlice event a changed service's manifest produces, read by
/// the agent's own manifest source.
fn slice_event(svc: &Svc) -> anyhow::Result<ClusterEvent> {
    let dir = tempfile::tempdir()?;
    write_manifests(dir.path(), std::slice::from_ref(svc))?;
    let (events, errors) = ManifestSource::new(dir.path().to_owned()).rescan();
    anyhow::ensure!(errors.is_empty(), "changed manifest refused: {errors:?}");
    events
        .into_iter()
        .find(|e| matches!(e, ClusterEvent::ApplySlice(_)))
        .context("no EndpointSlice in the changed manifest")
}

fn ebpf(svcs: &[Svc], result: &mut ControlPlaneResult) -> anyhow::Result<()> {
    let desired = scenario::desired(svcs);
    let mut fulls = Vec::new();
    let mut loaded = None;
    for _ in 0..FULL_RUNS {
        // The previous datapath (and its maps) goes before the next loads.
        drop(loaded.take());
        let mut fresh = Harness::load()?;
        let started = Instant::now();
        let (_, errors) = fresh.engine.sync_all(&desired);
        fulls.push(started.elapsed());
        anyhow::ensure!(errors.is_empty(), "sync_all: {}", errors[0]);
        anyhow::ensure!(fresh.engine.frontend_count() == svcs.len());
        loaded = Some(fresh);
    }
    let mut loaded = loaded.context("no full sync ran")?;
    result.ebpf_full = median(&mut fulls.clone());
    result.ebpf_full_min = fulls.iter().copied().min().unwrap_or_default();
    result.ebpf_full_max = fulls.iter().copied().max().unwrap_or_default();
    eprintln!(
        "  ebpf: {} services x {} endpoints programmed in {:?} (median of {FULL_RUNS}: {fulls:?})",
        svcs.len(),
        result.endpoints,
        result.ebpf_full
    );

    // The model as the agent holds it, read from the same manifests.
    let dir = tempfile::tempdir()?;
    write_manifests(dir.path(), svcs)?;
    let (events, errors) = ManifestSource::new(dir.path().to_owned()).rescan();
    anyhow::ensure!(errors.is_empty(), "manifests refused: {:?}", errors.first());
    let mut state = ClusterState::default();
    for e in events {
        state.apply(e);
    }

    let mut times = Vec::new();
    for k in 0..CHANGES {
        let which = (k * 7_919 + svcs.len() / 2) % svcs.len();
        let changed = scenario::with_one_endpoint_changed(svcs, which, k as u32 + 1);
        let event = slice_event(&changed[which])?;
        let started = Instant::now();
        for service in state.apply(event) {
            let frontends = state
                .frontends(&service, None)
                .context("changed service vanished")?;
            loaded.engine.sync_service(&service, &frontends)?;
        }
        times.push(started.elapsed());
    }
    result.changes = times.len();
    result.ebpf_change_median = median(&mut times.clone());
    result.ebpf_change_max = times.iter().copied().max().unwrap_or_default();
    Ok(())
}

fn iptables(svcs: &[Svc], result: &mut ControlPlaneResult) -> anyhow::Result<()> {
    let ns = Netns::new("ipt")?;
    let text = kubeproxy_rules::iptables_full(svcs);
    let full = netns::run_in(&ns.name, iptables_restore(), &["--noflush"], Some(&text))?;
    result.iptables_full = Some(full);
    eprintln!(
        "  iptables-restore: full sync ({} lines) in {full:?}",
        text.lines().count()
    );
    let mut current = svcs.to_vec();
    let mut times = Vec::new();
    for k in 0..RULE_CHANGES {
        let which = (k * 7_919 + svcs.len() / 2) % svcs.len();
        let changed = scenario::with_one_endpoint_changed(&current, which, 1_000 + k as u32);
        let text = kubeproxy_rules::iptables_partial(&current, &changed, which);
        times.push(netns::run_in(
            &ns.name,
            iptables_restore(),
            &["--noflush"],
            Some(&text),
        )?);
        current = changed;
    }
    result.iptables_change = Some(median(&mut times));
    Ok(())
}

fn nft(svcs: &[Svc], result: &mut ControlPlaneResult) -> anyhow::Result<()> {
    let ns = Netns::new("nft")?;
    let text = kubeproxy_rules::nft_full(svcs);
    let full = netns::run_in(&ns.name, "nft", &["-f", "-"], Some(&text))?;
    result.nft_full = Some(full);
    eprintln!(
        "  nft: full sync ({} lines) in {full:?}",
        text.lines().count()
    );
    let mut current = svcs.to_vec();
    let mut times = Vec::new();
    for k in 0..RULE_CHANGES {
        let which = (k * 7_919 + svcs.len() / 2) % svcs.len();
        let changed = scenario::with_one_endpoint_changed(&current, which, 2_000 + k as u32);
        let text = kubeproxy_rules::nft_partial(&current, &changed, which);
        times.push(netns::run_in(&ns.name, "nft", &["-f", "-"], Some(&text))?);
        current = changed;
    }
    result.nft_change = Some(median(&mut times));
    Ok(())
}

/// kB of VmHWM (peak resident set) of a process.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn agent_memory(svcs: &[Svc], result: &mut ControlPlaneResult) -> anyhow::Result<()> {
    let ns = Netns::new("mem")?;
    let bpffs = Bpffs::new()?;
    let work = tempfile::tempdir()?;
    let manifests = work.path().join("manifests");
    write_manifests(&manifests, svcs)?;
    let started = Instant::now();
    let mut agent = Agent::start(
        &ns.name,
        "bench-node",
        &manifests,
        bpffs.path(),
        &work.path().join("agent.log"),
    )?;
    result.agent_ready = Some(started.elapsed());
    // Let the post-sync work (interface watch, first GC tick) settle.
    std::thread::sleep(Duration::from_millis(500));
    result.agent_vm_hwm_kib = agent.pid().and_then(vm_hwm_kib);
    eprintln!(
        "  agent: healthy after {:?}, VmHWM {:?} KiB",
        result.agent_ready.unwrap_or_default(),
        result.agent_vm_hwm_kib
    );
    agent.stop();
    Ok(())
}

pub fn run(
    services: usize,
    endpoints: usize,
    kube_proxy: bool,
) -> anyhow::Result<ControlPlaneResult> {
    let svcs = scenario::services(IpFamily::Ipv4, services, endpoints, None);
    let mut result = ControlPlaneResult {
        services,
        endpoints,
        ebpf_full: Duration::ZERO,
        ebpf_full_min: Duration::ZERO,
        ebpf_full_max: Duration::ZERO,
        ebpf_change_median: Duration::ZERO,
        ebpf_change_max: Duration::ZERO,
        changes: 0,
        iptables_full: None,
        iptables_change: None,
        nft_full: None,
        nft_change: None,
        agent_ready: None,
        agent_vm_hwm_kib: None,
        notes: Vec::new(),
    };
    ebpf(&svcs, &mut result).context("eBPF control plane")?;
    if kube_proxy {
        if let Err(e) = iptables(&svcs, &mut result) {
            eprintln!("  iptables: {e:#}");
            result.notes.push(format!("iptables-restore failed: {e:#}"));
        }
        if let Err(e) = nft(&svcs, &mut result) {
            eprintln!("  nft: {e:#}");
            result.notes.push(format!("nft failed: {e:#}"));
        }
    } else {
        result
            .notes
            .push("kube-proxy's rules not loaded (--ebpf-only)".to_owned());
    }
    if let Err(e) = agent_memory(&svcs, &mut result) {
        eprintln!("  agent: {e:#}");
        result
            .notes
            .push(format!("agent memory not measured: {e:#}"));
    }
    Ok(result)
}
