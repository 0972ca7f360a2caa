//! Whether the maps keep up with the sources, as `/healthz` reports it:
//! unhealthy until the first full sync has reached the maps, then unhealthy
//! only while a change from a source has waited longer than the timeout.
//! Sources mark a change queued as they send it; the control loop marks the
//! maps synced once it applied everything it received.
//!
//! The same marks count the changes between sources and maps (queued,
//! applied, pending), for kube-proxy's `sync_proxy_rules_*_changes_*`
//! metrics, read when scraped, so a loop that stopped shows.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

#[derive(Debug, Default)]
struct HealthState {
    /// Last time the maps were brought up to date.
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet applied arrived.
    oldest_pending: Option<SystemTime>,
    changes: ChangeCounts,
}

/// Changes (object events) the sources sent, by kind of object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    /// Service events sent and not yet in the maps.
    pub service_pending: u64,
    /// EndpointSlice events sent and not yet in the maps.
    pub endpoint_pending: u64,
    pub service_total: u64,
    pub endpoint_total: u64,
    /// When a source last sent a change.
    pub last_queued: Option<SystemTime>,
}

#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
    timeout: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

/// kube-proxy's: twice its default 30 s sync period.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            state: Arc::default(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change left a source and waits to be applied.
    pub fn queued(&self) {
        self.queued_at(SystemTime::now());
    }

    pub(crate) fn queued_at(&self, now: SystemTime) {
        self.lock().oldest_pending.get_or_insert(now);
    }

    /// A source sent `services` Service and `endpoints` EndpointSlice
    /// events (counted; [`Health::queued`] marks the wait).
    pub fn changes_queued(&self, services: u64, endpoints: u64) {
        let mut state = self.lock();
        let c = &mut state.changes;
        c.service_pending += services;
        c.endpoint_pending += endpoints;
        c.service_total += services;
        c.endpoint_total += endpoints;
        // An update with only errors (a lost watch) asks for no sync.
        if services + endpoints > 0 {
            c.last_queued = Some(SystemTime::now());
        }
    }

    /// That many of the queued events are now in the maps.
    pub fn changes_applied(&self, services: u64, endpoints: u64) {
        let mut state = self.lock();
        let c = &mut state.changes;
        c.service_pending = c.service_pending.saturating_sub(services);
        c.endpoint_pending = c.endpoint_pending.saturating_sub(endpoints);
    }

    pub fn changes(&self) -> ChangeCounts {
        self.lock().changes
    }

    /// Every change received so far is in the maps.
    pub fn synced(&self) {
        self.synced_at(SystemTime::now());
    }

    pub(crate) fn synced_at(&self, now: SystemTime) {
        let mut state = self.lock();
        state.last_updated = Some(now);
        state.oldest_pending = None;
    }

    /// Healthy, and the last update, as of `now`.
    pub(crate) fn status_at(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let state = self.lock();
        let late = state
            .oldest_pending
            .is_some_and(|queued| now.duration_since(queued).unwrap_or_default() > self.timeout);
        (state.last_updated.is_some() && !late, state.last_updated)
    }
}
