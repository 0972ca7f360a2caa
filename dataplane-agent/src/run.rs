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
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    bpffs::ensure_bpffs,
    conntrack,
    datapath::Datapath,
    healthz::{self, Health},
    interfaces::{self, LinkEvent, PodInterfaceFilter},
    lb_maps::LbMaps,
    metrics::{self, Metrics},
    model::{ClusterEvent, ClusterState, Frontend, FrontendSpec, ServiceName},
    source::{self, SourceUpdate},
    sync::SyncEngine,
};

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
    /// /healthz says 503 when a change has waited this long without
    /// reaching the maps (kube-proxy's healthz timeout).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub healthz_timeout: Duration,
    /// Address of the Prometheus /metrics endpoint (kube-proxy's port by
    /// default).
    #[arg(long, default_value = "0.0.0.0:10249")]
    pub metrics_bind_address: SocketAddr,
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
    metrics: Metrics,
}

impl<M: LbMaps> Syncer<M> {
    fn frontends_of(&self, service: &ServiceName) -> Option<Vec<(Frontend, FrontendSpec)>> {
        match self.state.frontends(service, self.node_name.as_deref()) {
            Ok(frontends) => Some(frontends.unwrap_or_default()),
            Err(e) => {
                error!("{e}");
                self.metrics.sync_error("invalid_object");
                None
            }
        }
    }

    fn record(&self, kind: &'static str, started: Instant) {
        self.metrics.sync_done(kind, started.elapsed());
        self.metrics.programmed(
            self.engine.service_count(),
            self.engine.frontend_count(),
            self.engine.backend_count(),
        );
        self.metrics.occupancy(self.engine.occupancy());
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
            self.metrics.sync_error(e.cause());
        }
        self.record("full", started);
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

    /// Applies a batch of events and syncs each touched service once.
    fn apply(&mut self, events: Vec<ClusterEvent>) {
        let started = Instant::now();
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
                self.metrics.sync_error(e.cause());
            }
        }
        self.record("incremental", started);
    }
}

/// Starts the configured source; its updates arrive on the returned channel.
async fn start_source(
    options: &Options,
    health: Health,
) -> anyhow::Result<mpsc::Receiver<SourceUpdate>> {
    let (tx, mut from_source) = mpsc::channel::<SourceUpdate>(256);
    let (to_loop, rx) = mpsc::channel(256);
    // Marks each update as pending for /healthz the moment it arrives, so a
    // run loop that stops applying changes shows up as unhealthy.
    tokio::spawn(async move {
        while let Some(update) = from_source.recv().await {
            health.queued();
            if to_loop.send(update).await.is_err() {
                break;
            }
        }
    });
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
    Ok(rx)
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
    let metrics = Metrics::new(Some(maps.counters));
    let mut syncer = Syncer {
        state: ClusterState::default(),
        engine,
        node_name: options.node_name.clone(),
        metrics: metrics.clone(),
    };

    let health = Health::new(options.healthz_timeout);
    let mut healthz_server =
        tokio::spawn(healthz::serve(options.healthz_bind_address, health.clone()));
    let mut metrics_server = tokio::spawn(metrics::serve(
        options.metrics_bind_address,
        metrics.clone(),
    ));
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // The initial state first, whole: nothing is written until the source
    // has listed everything, so a restart never removes a live service.
    let mut updates = start_source(&options, health.clone()).await?;
    loop {
        let update = tokio::select! {
            update = updates.recv() => update.context("the source stopped before its first sync")?,
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        };
        for e in &update.errors {
            error!("{e}");
            metrics.sync_error("source");
        }
        for event in update.events {
            syncer.state.apply(event);
        }
        if update.initial_sync_done {
            break;
        }
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
    datapath.remove_stale_links();
    health.synced();
    let mut gc = tokio::time::interval(CONNTRACK_GC_INTERVAL);
    info!("agent ready: maps pinned under {}", options.bpffs.display());

    let result = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: exiting"); break Ok(()) }
            _ = sigint.recv() => { info!("SIGINT: exiting"); break Ok(()) }
            update = updates.recv() => {
                let Some(first) = update else { break Err(anyhow::anyhow!("the source stopped")) };
                // Coalesce a burst (a rolling update) into one sync per service.
                let mut events = Vec::new();
                let mut next = Some(first);
                while let Some(update) = next {
                    for e in &update.errors {
                        error!("{e}");
                        metrics.sync_error("source");
                    }
                    events.extend(update.events);
                    next = updates.try_recv().ok();
                }
                syncer.apply(events);
                health.synced();
            }
            link = links.recv() => match link {
                Some(link) => handle_link(&mut datapath, link),
                None => break Err(anyhow::anyhow!("netlink link notifications stopped")),
            },
            _ = gc.tick() => {
                if syncer.engine.needs_resync() {
                    warn!("a map write failed earlier: full resync from the cluster state");
                    syncer.full_sync();
                }
                let sweep = conntrack::sweep(&mut conntrack_map);
                if sweep.removed > 0 {
                    log::debug!("conntrack: removed {} expired entries", sweep.removed);
                }
                metrics.conntrack_entries(sweep.remaining);
            }
            served = &mut healthz_server => {
                break match served {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("the healthz server stopped")),
                }
            }
            served = &mut metrics_server => {
                break match served {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("the metrics server stopped")),
                }
            }
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
    result
}
