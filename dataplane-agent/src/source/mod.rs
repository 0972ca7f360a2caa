//! Sources of Services and EndpointSlices. Each produces `ClusterEvent`s for
//! the one model in `crate::model`.

pub mod manifests;
