//! The control loop: the one owner of the model, the sync engine and health.
//! Updates from the sources arrive on one channel; the loop applies them to
//! the model and has the engine bring the maps up to date, each touched
//! service once per batch. It decides between full and incremental syncs
//! and resyncs in full after a failed map write.
//!
//! It reports what it did through [`Report`] (the metrics implement it), so
//! nothing here knows about HTTP or Prometheus.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use log::{error, info, warn};

use crate::{
    control::{
        health::Health,
        model::{ClusterState, Frontend, FrontendSpec, ServiceName},
        source::SourceUpdate,
        sync::{Occupancy, SyncEngine},
    },
    node::lb_maps::LbMaps,
};

/// Which kind of sync reached the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Every service.
    Full,
    /// The services a change touched.
    Incremental,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Incremental => "incremental",
        }
    }
}

/// What the engine holds after a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineTotals {
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    pub occupancy: Occupancy,
}

/// Where the loop reports its work (the metrics, or nothing in tests).
pub trait Report {
    fn synced(&self, kind: SyncKind, took: Duration, totals: EngineTotals);
    /// A problem met, by short cause (`source`, `invalid_object`,
    /// `capacity`, ...); the loop has logged it from the same value.
    fn error(&self, cause: &'static str);
}

impl Report for () {
    fn synced(&self, _: SyncKind, _: Duration, _: EngineTotals) {}
    fn error(&self, _: &'static str) {}
}

pub struct ControlLoop<M: LbMaps, R: Report> {
    state: ClusterState,
    engine: SyncEngine<M>,
    node_name: Option<String>,
    health: Health,
    report: R,
}

impl<M: LbMaps, R: Report> ControlLoop<M, R> {
    pub fn new(
        engine: SyncEngine<M>,
        node_name: Option<String>,
        health: Health,
        report: R,
    ) -> Self {
        Self {
            state: ClusterState::default(),
            engine,
            node_name,
            health,
            report,
        }
    }

    /// Takes in one update of a source's initial state, without touching the
    /// maps: nothing is written until the source has listed everything, so
    /// a restart never removes a live service. True once the initial state
    /// is complete; then call [`ControlLoop::full_sync`].
    pub fn initial(&mut self, update: SourceUpdate) -> bool {
        self.report_errors(&update);
        for event in update.events {
            self.state.apply(event);
        }
        update.initial_sync_done
    }

    /// Applies a batch of updates (a burst, such as a rolling update, is
    /// coalesced) and syncs each touched service once.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = SourceUpdate>) {
        let started = Instant::now();
        let mut touched = BTreeSet::new();
        for update in updates {
            self.report_errors(&update);
            for event in update.events {
                touched.extend(self.state.apply(event));
            }
        }
        for service in touched {
            let frontends = self.frontends_of(&service);
            if let Err(e) = self.engine.sync_service(&service, &frontends) {
                error!("{e}");
                self.report.error(e.cause());
            }
        }
        self.record(SyncKind::Incremental, started);
        self.health.synced();
    }

    /// Every service in the model, written to the maps; what the maps hold
    /// and the model does not is removed.
    pub fn full_sync(&mut self) {
        let started = Instant::now();
        let mut all = BTreeMap::new();
        for service in self.state.service_names() {
            let frontends = self.frontends_of(&service);
            if !frontends.is_empty() {
                all.insert(service, frontends);
            }
        }
        let (stats, errors) = self.engine.sync_all(&all);
        for e in &errors {
            error!("{e}");
            self.report.error(e.cause());
        }
        self.record(SyncKind::Full, started);
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

    /// The periodic check: after a failed map write, the maps may not hold
    /// what the engine believes; resync them in full from the model.
    pub fn tick(&mut self) {
        if self.engine.needs_resync() {
            warn!("a map write failed earlier: full resync from the cluster state");
            self.full_sync();
        }
    }

    /// Every change received so far is in the maps (and the pods have the
    /// programs): healthy from now on.
    pub fn mark_synced(&self) {
        self.health.synced();
    }

    fn report_errors(&self, update: &SourceUpdate) {
        for e in &update.errors {
            error!("{e}");
            self.report.error(e.cause());
        }
    }

    /// Nothing for a service the model does not hold or does not proxy.
    fn frontends_of(&self, service: &ServiceName) -> Vec<(Frontend, FrontendSpec)> {
        self.state
            .frontends(service, self.node_name.as_deref())
            .unwrap_or_default()
    }

    fn record(&self, kind: SyncKind, started: Instant) {
        self.report.synced(
            kind,
            started.elapsed(),
            EngineTotals {
                services: self.engine.service_count(),
                frontends: self.engine.frontend_count(),
                backends: self.engine.backend_count(),
                occupancy: self.engine.occupancy(),
            },
        );
    }
}
