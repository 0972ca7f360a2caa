//! Sources of Services and EndpointSlices. Each produces `ClusterEvent`s for
//! the one model in `crate::model`, delivered as `SourceUpdate`s.

pub mod kube;
pub mod manifests;

use crate::model::ClusterEvent;

/// A batch of changes from a source.
#[derive(Debug, Default)]
pub struct SourceUpdate {
    pub events: Vec<ClusterEvent>,
    /// Problems to report (bad objects, lost watches); each names what was wrong.
    pub errors: Vec<String>,
    /// The source has delivered its complete initial state.
    pub initial_sync_done: bool,
}
