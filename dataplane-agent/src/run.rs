//! `dataplane-agent run`: load, sync, attach, and follow changes until
//! SIGTERM.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    bpffs::ensure_bpffs,
    conntrack,
    datapath::Datapath,
    healthz::{self, Health},
    interfaces::{self, LinkEvent, PodInterfaceFilter},
    lb_maps::LbMaps,
    model::{ClusterEvent, ClusterState, ServiceName},
    source::manifests::{watch_dir, ManifestError, ManifestSource},
    sync::SyncEngine,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Directory of Kubernetes manifests (Services, EndpointSlices), watched.
    #[arg(long)]
    pub manifests: PathBuf,
    /// Glob patterns of the host-side pod interfaces, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub pod_ifaces: Vec<String>,
    /// Where the maps are pinned (a bpffs is mounted there if needed).
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    pub bpffs: PathBuf,
    /// This node's name, for internalTrafficPolicy: Local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Address of the /healthz endpoint (kube-proxy's port by default).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
}

const CONNTRACK_GC_INTERVAL: Duration = Duration::from_secs(10);

pub fn run(options: Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(options))
}

/// The state that turns source events into map writes.
struct Syncer<M: LbMaps> {
    state: ClusterState,
    engine: SyncEngine<M>,
    node_name: Option<String>,
}

impl<M: LbMaps> Syncer<M> {
    fn frontends_of(
        &self,
        service: &ServiceName,
    ) -> Option<Vec<(crate::model::Frontend, crate::model::FrontendSpec)>> {
        match self.state.frontends(service, self.node_name.as_deref()) {
            Ok(frontends) => Some(frontends.unwrap_or_default()),
            Err(e) => {
                error!("{e}");
                None
            }
        }
    }

    fn full_sync(&mut self) {
        let started = Instant::now();
        let mut all = BTreeMap::new();
        for service in self.state.service_names() {
            if let Some(frontends) = self.frontends_of(&service) {
                if !frontends.is_empty() {
                    all.insert(service, frontends);
                }
            }
        }
        let (stats, errors) = self.engine.sync_all(&all);
        for e in &errors {
            error!("{e}");
        }
        info!(
            "full sync: {} services, {} frontends, {} backends programmed ({} changed, {} removed) in {:?}",
            all.len(),
            self.engine.frontend_count(),
            self.engine.backend_count(),
            stats.frontends_changed,
            stats.frontends_removed,
            started.elapsed()
        );
    }

    fn apply(&mut self, events: Vec<ClusterEvent>) {
        let mut touched = BTreeSet::new();
        for event in events {
            touched.extend(self.state.apply(event));
        }
        for service in touched {
            let Some(frontends) = self.frontends_of(&service) else {
                continue;
            };
            if let Err(e) = self.engine.sync_service(&service, &frontends) {
                error!("{e}");
            }
        }
    }
}

/// Logs each manifest error once while it persists, not at every rescan.
fn report_new_errors(reported: &mut BTreeSet<String>, errors: &[ManifestError]) {
    let current: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
    for e in current.difference(reported) {
        error!("{e}");
    }
    *reported = current;
}

fn handle_link(datapath: &mut Datapath, link: LinkEvent) {
    match link {
        LinkEvent::Present { ifindex, name } => {
            if !datapath.is_attached(ifindex) {
                if let Err(e) = datapath.attach(ifindex, &name) {
                    warn!("{e:#}");
                }
            }
        }
        LinkEvent::Gone { ifindex } => datapath.detach(ifindex),
        LinkEvent::InitialListDone => {}
    }
}

async fn run_async(options: Options) -> anyhow::Result<()> {
    let filter = PodInterfaceFilter::new(&options.pod_ifaces)?;
    ensure_bpffs(&options.bpffs)?;
    let (mut datapath, maps) = Datapath::load(&options.bpffs)?;
    let mut conntrack_map = maps.conntrack;
    let engine = SyncEngine::adopt(maps.lb).context("adopting the pinned maps")?;
    let mut syncer = Syncer {
        state: ClusterState::default(),
        engine,
        node_name: options.node_name.clone(),
    };

    let health = Health::default();
    let mut healthz_server =
        tokio::spawn(healthz::serve(options.healthz_bind_address, health.clone()));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // Watch before the first read so no change slips in between.
    let (_watcher, mut manifest_changes) = watch_dir(&options.manifests)
        .with_context(|| format!("watching manifests in {}", options.manifests.display()))?;
    let mut source = ManifestSource::new(options.manifests.clone());
    let (events, errors) = source.rescan();
    let mut reported = BTreeSet::new();
    report_new_errors(&mut reported, &errors);
    for event in events {
        syncer.state.apply(event);
    }
    syncer.full_sync();

    // Interfaces after the first sync: a pod never sees the programs with
    // empty maps. Healthy only once the pods present now have them.
    let mut links = interfaces::watch(filter)?;
    while let Some(link) = links.recv().await {
        if link == LinkEvent::InitialListDone {
            break;
        }
        handle_link(&mut datapath, link);
    }
    health.synced();
    let mut gc = tokio::time::interval(CONNTRACK_GC_INTERVAL);
    info!(
        "agent ready: manifests {}, maps pinned under {}",
        options.manifests.display(),
        options.bpffs.display()
    );

    let result = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching and exiting"); break Ok(()) }
            _ = sigint.recv() => { info!("SIGINT: detaching and exiting"); break Ok(()) }
            changed = manifest_changes.recv() => {
                if changed.is_none() { break Err(anyhow::anyhow!("the manifest watcher stopped")) }
                let (events, errors) = source.rescan();
                report_new_errors(&mut reported, &errors);
                syncer.apply(events);
                health.synced();
            }
            link = links.recv() => match link {
                Some(link) => handle_link(&mut datapath, link),
                None => break Err(anyhow::anyhow!("netlink link notifications stopped")),
            },
            _ = gc.tick() => {
                let removed = conntrack::sweep(&mut conntrack_map);
                if removed > 0 {
                    log::debug!("conntrack: removed {removed} expired entries");
                }
            }
            served = &mut healthz_server => {
                break match served {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("the healthz server stopped")),
                }
            }
        }
    };
    datapath.detach_all();
    healthz_server.abort();
    result
}
