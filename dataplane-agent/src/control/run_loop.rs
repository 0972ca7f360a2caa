//! The control loop: the one owner of the model, the sync engine and health.
//! Updates from the sources arrive on one channel; the loop applies them to
//! the model and has the engine bring the maps up to date, each touched
//! service once per batch. It decides between full and incremental syncs
//! and resyncs in full after a failed map write.
//!
//! It reports what it did through [`Report`] (the metrics implement it), so
//! nothing here knows about HTTP or Prometheus.
//!
//! Network programming latency: an EndpointSlice carries when its change
//! was made (`endpoints.kubernetes.io/last-change-trigger-time`, set by the
//! EndpointSlice controller). The loop keeps that time with the service
//! the slice belongs to until a sync of that service has reached the maps,
//! then reports the time elapsed since the trigger: the watch, the channel,
//! the model and the map writes, all included. Changes made before the
//! agent started are not reported (a restart would report the age of every
//! slice); a slice's trigger time is reported once, also across relists.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use log::{error, info, warn};

use crate::{
    control::{
        health::Health,
        model::{ClusterEvent, ClusterState, Frontend, FrontendSpec, ObjectRef, ServiceName},
        source::SourceUpdate,
        sync::{Occupancy, SyncEngine, SyncError},
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
    /// An EndpointSlice change is in the maps, `latency` after its trigger
    /// time (network programming latency).
    fn network_programmed(&self, latency: Duration) {
        let _ = latency;
    }
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
    /// Trigger times before this are not reported.
    started: SystemTime,
    /// Trigger times of changes not yet in the maps, by service.
    triggers: BTreeMap<ServiceName, Vec<SystemTime>>,
    /// The last trigger time taken from each slice.
    slice_triggers: BTreeMap<ObjectRef, SystemTime>,
    /// (Service, EndpointSlice) events taken in since the last sync.
    unsynced: (u64, u64),
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
            started: SystemTime::now(),
            triggers: BTreeMap::new(),
            slice_triggers: BTreeMap::new(),
            unsynced: (0, 0),
        }
    }

    /// Serves NodePorts on `addrs` from now on (the node's addresses changed).
    pub fn set_node_addresses(&mut self, addrs: &[std::net::Ipv4Addr]) -> Result<(), SyncError> {
        self.engine.set_node_addresses(addrs)
    }

    pub fn set_node_addresses6(&mut self, addrs: &[std::net::Ipv6Addr]) -> Result<(), SyncError> {
        self.engine.set_node_addresses6(addrs)
    }

    /// Takes in one update of a source's initial state, without touching the
    /// maps: nothing is written until the source has listed everything, so
    /// a restart never removes a live service. True once the initial state
    /// is complete; then call [`ControlLoop::full_sync`].
    pub fn initial(&mut self, update: SourceUpdate) -> bool {
        self.report_errors(&update);
        self.take_in(&update);
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
            self.take_in(&update);
            for event in update.events {
                touched.extend(self.state.apply(event));
            }
        }
        let mut programmed = Vec::new();
        for service in touched {
            let frontends = self.frontends_of(&service);
            match self.engine.sync_service(&service, &frontends) {
                Ok(_) => programmed.push(service),
                Err(e) => {
                    error!("{e}");
                    self.report.error(e.cause());
                }
            }
        }
        self.record(SyncKind::Incremental, started);
        self.report_programmed(programmed.iter());
        self.health.synced();
    }

    /// Makes this node proxy only `families` (by default both); call it
    /// before the first sync.
    pub fn set_ip_families(&mut self, families: crate::control::model::IpFamilies) {
        self.state.set_ip_families(families);
    }

    /// Backends that left the datapath since the last call (see
    /// [`SyncEngine::take_removed`]).
    pub fn take_removed_backends(&mut self) -> Vec<crate::control::sync::BackendKey> {
        self.engine.take_removed()
    }

    /// Every service in the model, written to the maps; what the maps hold
    /// and the model does not is removed.
    pub fn full_sync(&mut self) {
        let started = Instant::now();
        // Each service's frontends are worked out as the engine takes them,
        // never the whole cluster's at once (the agent's peak memory).
        let state = &self.state;
        let node_name = self.node_name.as_deref();
        let mut services = 0usize;
        let all = state.service_names().filter_map(|service| {
            let frontends = state.frontends(service, node_name).unwrap_or_default();
            services += usize::from(!frontends.is_empty());
            (!frontends.is_empty()).then_some((service, frontends))
        });
        let (stats, errors) = self.engine.sync_all(all);
        for e in &errors {
            error!("{e}");
            self.report.error(e.cause());
        }
        self.record(SyncKind::Full, started);
        if !errors.iter().any(|e| matches!(e, SyncError::Snapshot(_))) {
            let failed: BTreeSet<&ServiceName> =
                errors.iter().filter_map(|e| e.service()).collect();
            let programmed: Vec<ServiceName> = self
                .triggers
                .keys()
                .filter(|s| !failed.contains(s))
                .cloned()
                .collect();
            self.report_programmed(programmed.iter());
        }
        info!(
            "full sync: {} services, {} frontends, {} backends programmed ({} changed, {} removed) in {:?}",
            services,
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

    /// Counts an update's events and keeps the trigger times its slices
    /// carry, before the model takes the events.
    fn take_in(&mut self, update: &SourceUpdate) {
        let (services, endpoints) = update.change_counts();
        self.unsynced.0 += services;
        self.unsynced.1 += endpoints;
        for event in &update.events {
            match event {
                ClusterEvent::ApplySlice(slice) => {
                    let (Some(at), Some(owner)) = (slice.trigger_time, &slice.owner) else {
                        continue;
                    };
                    if at < self.started || self.slice_triggers.get(&slice.key) == Some(&at) {
                        continue;
                    }
                    self.slice_triggers.insert(slice.key.clone(), at);
                    self.triggers.entry(owner.clone()).or_default().push(at);
                }
                ClusterEvent::DeleteSlice(key) => {
                    self.slice_triggers.remove(key);
                }
                ClusterEvent::ApplyService(_) | ClusterEvent::DeleteService(_) => {}
            }
        }
    }

    /// These services' changes are in the maps: everything taken in so far
    /// is applied, and their trigger times are reported.
    fn report_programmed<'a>(&mut self, services: impl Iterator<Item = &'a ServiceName>) {
        let (s, e) = std::mem::take(&mut self.unsynced);
        self.health.changes_applied(s, e);
        let now = SystemTime::now();
        for service in services {
            for at in self.triggers.remove(service).unwrap_or_default() {
                // A trigger time ahead of this node's clock (skew) is 0.
                self.report
                    .network_programmed(now.duration_since(at).unwrap_or_default());
            }
        }
    }

    fn report_errors(&self, update: &SourceUpdate) {
        for e in &update.errors {
            error!("{e}");
            self.report.error(e.cause());
        }
    }

    /// The `healthCheckNodePort`s this node answers, with their counts.
    pub fn health_checks(&self) -> Vec<crate::control::model::HealthCheck> {
        self.state.health_checks(self.node_name.as_deref())
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

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::{
        control::{
            model::{parse_service, ClusterEvent, ModelError},
            source::SourceError,
        },
        node::lb_maps::MemLbMaps,
    };

    #[derive(Default)]
    struct Recorded {
        syncs: RefCell<Vec<(SyncKind, EngineTotals)>>,
        errors: RefCell<Vec<&'static str>>,
        latencies: RefCell<Vec<Duration>>,
    }

    impl Report for Rc<Recorded> {
        fn synced(&self, kind: SyncKind, _: Duration, totals: EngineTotals) {
            self.syncs.borrow_mut().push((kind, totals));
        }
        fn error(&self, cause: &'static str) {
            self.errors.borrow_mut().push(cause);
        }
        fn network_programmed(&self, latency: Duration) {
            self.latencies.borrow_mut().push(latency);
        }
    }

    /// An EndpointSlice of service `a` whose change was triggered at `at`.
    fn slice_of_a(name: &str, ip: &str, at: Option<SystemTime>) -> ClusterEvent {
        let mut slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "a"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip]}]
            }))
            .unwrap();
        if let Some(at) = at {
            let stamp = k8s_openapi::jiff::Timestamp::try_from(at).unwrap();
            slice.metadata.annotations = Some(
                [(
                    crate::control::model::LAST_CHANGE_TRIGGER_TIME.to_string(),
                    stamp.to_string(),
                )]
                .into(),
            );
        }
        ClusterEvent::ApplySlice(crate::control::model::parse_slice(&slice).unwrap())
    }

    fn parse(name: &str, ip: &str) -> Result<ClusterEvent, ModelError> {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap();
        parse_service(&svc).map(ClusterEvent::ApplyService)
    }

    fn update(events: Vec<ClusterEvent>, initial_sync_done: bool) -> SourceUpdate {
        SourceUpdate {
            events,
            errors: Vec::new(),
            initial_sync_done,
        }
    }

    fn control(maps: MemLbMaps) -> (ControlLoop<MemLbMaps, Rc<Recorded>>, Rc<Recorded>) {
        let recorded = Rc::new(Recorded::default());
        let engine = SyncEngine::adopt(maps).unwrap();
        let control = ControlLoop::new(engine, None, Health::default(), recorded.clone());
        (control, recorded)
    }

    #[test]
    fn nothing_is_written_until_the_initial_state_is_complete() {
        let (mut control, recorded) = control(MemLbMaps::default());
        let first = update(vec![parse("a", "10.96.0.1").unwrap()], false);
        assert!(!control.initial(first));
        assert_eq!(control.engine.maps().writes, 0);
        assert!(control.initial(update(vec![parse("b", "10.96.0.2").unwrap()], true)));
        assert_eq!(control.engine.maps().writes, 0);
        control.full_sync();
        let syncs = recorded.syncs.borrow();
        assert_eq!(syncs.len(), 1);
        assert_eq!(syncs[0].0, SyncKind::Full);
        assert_eq!(syncs[0].1.frontends, 2);
    }

    #[test]
    fn a_batch_is_applied_and_each_source_error_reported_once() {
        let (mut control, recorded) = control(MemLbMaps::default());
        control.initial(update(Vec::new(), true));
        control.full_sync();
        let refused = parse("bad", "10.96.0.300").unwrap_err();
        let mut with_error = update(vec![parse("a", "10.96.0.1").unwrap()], true);
        with_error.errors.push(SourceError::Invalid(refused));
        let deleted = update(
            vec![ClusterEvent::DeleteService(
                crate::control::model::ObjectRef {
                    namespace: "default".into(),
                    name: "a".into(),
                },
            )],
            true,
        );
        let added = update(vec![parse("b", "10.96.0.2").unwrap()], true);
        control.apply([with_error, deleted, added]);
        assert_eq!(*recorded.errors.borrow(), vec!["invalid_object"]);
        let syncs = recorded.syncs.borrow();
        let (kind, totals) = syncs.last().unwrap();
        assert_eq!(*kind, SyncKind::Incremental);
        assert_eq!(totals.services, 1, "a came and went in one batch");
    }

    #[test]
    fn tick_resyncs_in_full_after_a_failed_write_only() {
        let maps = MemLbMaps {
            fail_next_write_to: Some(dataplane_common::map_names::BACKEND_SLOTS),
            ..MemLbMaps::default()
        };
        let (mut control, recorded) = control(maps);
        control.tick();
        assert!(recorded.syncs.borrow().is_empty(), "nothing failed yet");
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "a-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.10"]}]
        }))
        .unwrap();
        let slice = crate::control::model::parse_slice(&slice).unwrap();
        control.initial(update(
            vec![
                parse("a", "10.96.0.1").unwrap(),
                ClusterEvent::ApplySlice(slice),
            ],
            true,
        ));
        control.full_sync();
        assert_eq!(*recorded.errors.borrow(), vec!["map_write"]);
        control.tick();
        let kinds: Vec<SyncKind> = recorded.syncs.borrow().iter().map(|s| s.0).collect();
        assert_eq!(kinds, vec![SyncKind::Full, SyncKind::Full]);
        control.tick();
        assert_eq!(
            recorded.syncs.borrow().len(),
            2,
            "repaired: no further resync"
        );
    }

    #[test]
    fn network_programming_latency_runs_from_the_trigger_time_to_the_maps() {
        let (mut control, recorded) = control(MemLbMaps::default());
        let now = SystemTime::now();
        control.started = now - Duration::from_secs(60);
        control.initial(update(
            vec![
                parse("a", "10.96.0.1").unwrap(),
                // Changed before the agent started: not reported.
                slice_of_a("a-0", "10.244.1.9", Some(now - Duration::from_secs(600))),
                slice_of_a("a-1", "10.244.1.10", Some(now - Duration::from_secs(30))),
            ],
            true,
        ));
        assert!(
            recorded.latencies.borrow().is_empty(),
            "not in the maps yet"
        );
        control.full_sync();
        let latencies = recorded.latencies.take();
        assert_eq!(latencies.len(), 1, "{latencies:?}");
        assert!(
            latencies[0] >= Duration::from_secs(30) && latencies[0] < Duration::from_secs(31),
            "{latencies:?}"
        );

        let changed = now - Duration::from_millis(2500);
        control.apply([update(
            vec![slice_of_a("a-1", "10.244.1.11", Some(changed))],
            true,
        )]);
        // The same slice again (a relist) with the same trigger time, and
        // one without any: nothing more to report.
        control.apply([update(
            vec![
                slice_of_a("a-1", "10.244.1.11", Some(changed)),
                slice_of_a("a-2", "10.244.1.12", None),
            ],
            true,
        )]);
        let latencies = recorded.latencies.take();
        assert_eq!(latencies.len(), 1, "{latencies:?}");
        assert!(
            latencies[0] >= Duration::from_millis(2500)
                && latencies[0] < Duration::from_millis(3500),
            "{latencies:?}"
        );
    }

    #[test]
    fn a_change_whose_map_write_failed_is_reported_once_the_resync_lands() {
        let maps = MemLbMaps {
            fail_next_write_to: Some(dataplane_common::map_names::BACKEND_SLOTS),
            ..MemLbMaps::default()
        };
        let (mut control, recorded) = control(maps);
        control.started = SystemTime::now() - Duration::from_secs(60);
        control.initial(update(vec![parse("a", "10.96.0.1").unwrap()], true));
        control.full_sync();
        control.apply([update(
            vec![slice_of_a(
                "a-1",
                "10.244.1.10",
                Some(SystemTime::now() - Duration::from_secs(5)),
            )],
            true,
        )]);
        assert_eq!(*recorded.errors.borrow(), vec!["map_write"]);
        assert!(recorded.latencies.borrow().is_empty(), "not in the maps");
        control.tick();
        assert_eq!(recorded.latencies.borrow().len(), 1);
    }

    #[test]
    fn changes_pending_until_synced() {
        let (mut control, _) = control(MemLbMaps::default());
        let health = control.health.clone();
        let first = update(
            vec![
                parse("a", "10.96.0.1").unwrap(),
                slice_of_a("a-1", "10.244.1.10", None),
            ],
            true,
        );
        let (s, e) = first.change_counts();
        health.changes_queued(s, e);
        control.initial(first);
        let counts = health.changes();
        assert_eq!((counts.service_pending, counts.endpoint_pending), (1, 1));
        control.full_sync();
        let counts = health.changes();
        assert_eq!((counts.service_pending, counts.endpoint_pending), (0, 0));
        assert_eq!((counts.service_total, counts.endpoint_total), (1, 1));
        assert!(counts.last_queued.is_some());
    }
}
