//! Whether the maps keep up with the sources, as `/healthz` reports it:
//! unhealthy until the first full sync has reached the maps, then unhealthy
//! only while a change from a source has waited longer than the timeout.
//! Sources mark a change queued as they send it; the control loop marks the
//! maps synced once it applied everything it received.

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
