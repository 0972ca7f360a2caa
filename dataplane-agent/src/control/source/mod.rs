//! Sources of Services and EndpointSlices. Each produces `ClusterEvent`s for
//! the one model in `control::model`, delivered as `SourceUpdate`s on the
//! one channel the control loop reads.

pub mod kube;
pub mod manifests;

use tokio::sync::mpsc;

use crate::control::{
    health::Health,
    model::{ClusterEvent, ModelError},
};

/// What a source found wrong. Logged and counted from this one value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    #[error(transparent)]
    Watch(#[from] kube::WatchError),
    /// An object from the API the model refuses.
    #[error(transparent)]
    Invalid(#[from] ModelError),
}

impl SourceError {
    /// Short cause label, for metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            SourceError::Invalid(_) => "invalid_object",
            SourceError::Manifest(_) | SourceError::Watch(_) => "source",
        }
    }
}

/// A batch of changes from a source.
#[derive(Debug, Default)]
pub struct SourceUpdate {
    pub events: Vec<ClusterEvent>,
    /// Problems to report (bad objects, lost watches).
    pub errors: Vec<SourceError>,
    /// The source has delivered its complete initial state.
    pub initial_sync_done: bool,
}

impl SourceUpdate {
    /// Service and EndpointSlice events in this update.
    pub fn change_counts(&self) -> (u64, u64) {
        let services = self
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    ClusterEvent::ApplyService(_) | ClusterEvent::DeleteService(_)
                )
            })
            .count() as u64;
        (services, self.events.len() as u64 - services)
    }
}

/// The control loop is gone: nothing reads the updates any more.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the control loop stopped reading source updates")]
pub struct Closed;

/// The sending end of the one channel the sources feed. Each update is
/// marked pending for `/healthz` as it is sent, so a control loop that stops
/// applying changes shows up as unhealthy.
#[derive(Debug, Clone)]
pub struct UpdateSender {
    tx: mpsc::Sender<SourceUpdate>,
    health: Health,
}

impl UpdateSender {
    pub async fn send(&self, update: SourceUpdate) -> Result<(), Closed> {
        self.health.queued();
        let (services, endpoints) = update.change_counts();
        self.health.changes_queued(services, endpoints);
        self.tx.send(update).await.map_err(|_| Closed)
    }
}

/// The channel from the sources to the control loop.
pub fn channel(health: Health) -> (UpdateSender, mpsc::Receiver<SourceUpdate>) {
    let (tx, rx) = mpsc::channel(256);
    (UpdateSender { tx, health }, rx)
}
