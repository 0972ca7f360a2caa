//! The Kubernetes API source: Services and EndpointSlices through kube's
//! watcher (list, then watch; relist on 410 Gone or a dropped stream, with
//! the default backoff). It feeds the same model as the manifest source.
//!
//! A relist never clears anything: the model keeps the last known state
//! until the new list is complete, then gets the difference (objects deleted
//! while disconnected included). Traffic keeps flowing meanwhile.

use std::collections::BTreeSet;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};
use log::info;

use super::{SourceError, SourceUpdate, UpdateSender};
use crate::control::model::{parse_service, parse_slice, ClusterEvent, ModelError, ObjectRef};

/// A watch failed; kube's watcher retries it with backoff.
#[derive(Debug, thiserror::Error)]
#[error("watching {kind}s: {source} (retrying; the datapath keeps the last known state)")]
pub struct WatchError {
    kind: &'static str,
    #[source]
    source: watcher::Error,
}

/// One kind of object the source watches, and how it becomes events.
trait Watched:
    Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static
{
    const KIND: &'static str;
    /// Parsed and validated once, here, as it enters.
    fn apply(&self) -> Result<ClusterEvent, ModelError>;
    fn delete(key: ObjectRef) -> ClusterEvent;
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    fn apply(&self) -> Result<ClusterEvent, ModelError> {
        parse_service(self).map(ClusterEvent::ApplyService)
    }
    fn delete(key: ObjectRef) -> ClusterEvent {
        ClusterEvent::DeleteService(key)
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn apply(&self) -> Result<ClusterEvent, ModelError> {
        parse_slice(self).map(ClusterEvent::ApplySlice)
    }
    fn delete(key: ObjectRef) -> ClusterEvent {
        ClusterEvent::DeleteSlice(key)
    }
}

fn key_of<K: Watched>(obj: &K) -> ObjectRef {
    ObjectRef {
        namespace: obj.namespace().as_deref().unwrap_or("default").into(),
        name: obj.name_any().into(),
    }
}

/// Turns watcher events into model events, remembering which objects the
/// model holds so a relist can delete what vanished.
struct Tracker<K: Watched> {
    known: BTreeSet<ObjectRef>,
    relisting: Option<Vec<K>>,
    synced_once: bool,
}

impl<K: Watched> Tracker<K> {
    fn new() -> Self {
        Self {
            known: BTreeSet::new(),
            relisting: None,
            synced_once: false,
        }
    }

    /// Model events for one watcher event (objects the model refuses as
    /// errors). A completed (re)list sets `synced_once`.
    fn handle(&mut self, event: watcher::Event<K>) -> Handled {
        match event {
            watcher::Event::Apply(obj) => {
                self.known.insert(key_of(&obj));
                Handled::of([obj.apply()])
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj);
                self.known.remove(&key);
                Handled::of([Ok(K::delete(key))])
            }
            watcher::Event::Init => {
                self.relisting = Some(Vec::new());
                Handled::default()
            }
            watcher::Event::InitApply(obj) => {
                self.relisting.get_or_insert_with(Vec::new).push(obj);
                Handled::default()
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let now: BTreeSet<ObjectRef> = listed.iter().map(key_of).collect();
                let deleted = self.known.difference(&now).cloned().map(K::delete);
                let handled = Handled::of(deleted.map(Ok).chain(listed.iter().map(Watched::apply)));
                if self.synced_once {
                    info!("{}s relisted: {} objects", K::KIND, now.len());
                }
                self.known = now;
                self.synced_once = true;
                handled
            }
        }
    }
}

/// What one watcher event means for the model.
#[derive(Debug, Default)]
struct Handled {
    events: Vec<ClusterEvent>,
    /// Objects the model refuses (reported; the model keeps what it had).
    invalid: Vec<ModelError>,
}

impl Handled {
    fn of(results: impl IntoIterator<Item = Result<ClusterEvent, ModelError>>) -> Self {
        let mut handled = Self::default();
        for result in results {
            match result {
                Ok(event) => handled.events.push(event),
                Err(e) => handled.invalid.push(e),
            }
        }
        handled
    }
}

fn watch<K: Watched>(
    client: Client,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send {
    watcher(Api::<K>::all(client), watcher::Config::default()).default_backoff()
}

/// A watch refused with HTTP 410 Gone. kube's watcher relists on a 410
/// `ERROR` event inside a watch stream (what the API server sends), but when
/// the watch request itself is answered 410 it retries the same expired
/// version forever; a fresh watcher relists instead.
fn watch_start_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

/// Sends updates until the receiver goes away. The first update with
/// `initial_sync_done` comes once both kinds have been listed.
pub async fn run(client: Client, tx: UpdateSender) {
    let mut services = Tracker::<Service>::new();
    let mut slices = Tracker::<EndpointSlice>::new();
    let mut service_stream = std::pin::pin!(watch::<Service>(client.clone()));
    let mut slice_stream = std::pin::pin!(watch::<EndpointSlice>(client.clone()));
    let mut announced = false;
    loop {
        let (handled, error) = tokio::select! {
            Some(event) = service_stream.next() => match event {
                Ok(event) => (services.handle(event), None),
                Err(e) => {
                    if watch_start_gone(&e) {
                        service_stream.set(watch::<Service>(client.clone()));
                    }
                    (Handled::default(), Some(WatchError { kind: Service::KIND, source: e }))
                }
            },
            Some(event) = slice_stream.next() => match event {
                Ok(event) => (slices.handle(event), None),
                Err(e) => {
                    if watch_start_gone(&e) {
                        slice_stream.set(watch::<EndpointSlice>(client.clone()));
                    }
                    (Handled::default(), Some(WatchError { kind: EndpointSlice::KIND, source: e }))
                }
            },
            else => return,
        };
        // Reported once, by the receiver. The watcher retries with backoff.
        let initial_sync_done = services.synced_once && slices.synced_once;
        let mut errors: Vec<SourceError> = handled.invalid.into_iter().map(Into::into).collect();
        errors.extend(error.map(SourceError::from));
        if handled.events.is_empty() && (announced || !initial_sync_done) && errors.is_empty() {
            continue;
        }
        let update = SourceUpdate {
            events: handled.events,
            errors,
            initial_sync_done,
        };
        announced |= initial_sync_done;
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ..Default::default()
        });
        s
    }

    #[test]
    fn object_the_model_refuses_is_reported_not_applied() {
        let mut t = Tracker::<Service>::new();
        let mut v6 = svc("v6");
        v6.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.300".into());
        let handled = t.handle(watcher::Event::Apply(v6));
        assert!(handled.events.is_empty());
        assert_eq!(handled.invalid.len(), 1);
        assert!(
            handled.invalid[0].to_string().contains("default/v6"),
            "{}",
            handled.invalid[0]
        );
    }

    fn describe(events: &[ClusterEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                ClusterEvent::ApplyService(s) => format!("+{}", s.name.name),
                ClusterEvent::DeleteService(r) => format!("-{}", r.name),
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn relist_applies_the_difference_only_when_complete() {
        let mut t = Tracker::<Service>::new();
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(svc("a")),
            watcher::Event::InitApply(svc("b")),
        ] {
            assert!(
                t.handle(e).events.is_empty(),
                "nothing before the list is complete"
            );
        }
        let handled = t.handle(watcher::Event::InitDone);
        assert!(t.synced_once);
        assert_eq!(describe(&handled.events), vec!["+a", "+b"]);

        // Disconnected; b deleted and c created meanwhile; relist.
        assert!(t.handle(watcher::Event::Init).events.is_empty());
        assert!(t
            .handle(watcher::Event::InitApply(svc("a")))
            .events
            .is_empty());
        assert!(t
            .handle(watcher::Event::InitApply(svc("c")))
            .events
            .is_empty());
        let handled = t.handle(watcher::Event::InitDone);
        assert_eq!(describe(&handled.events), vec!["-b", "+a", "+c"]);
    }

    #[test]
    fn only_a_410_at_watch_start_restarts_the_watcher() {
        let status = |code| {
            kube::Error::Api(
                kube::core::Status::failure("too old resource version", "Expired")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(watch_start_gone(&watcher::Error::WatchStartFailed(status(
            410
        ))));
        assert!(!watch_start_gone(&watcher::Error::WatchStartFailed(
            status(503)
        )));
        assert!(!watch_start_gone(&watcher::Error::InitialListFailed(
            status(410)
        )));
    }

    #[test]
    fn watch_events_pass_through() {
        let mut t = Tracker::<Service>::new();
        assert_eq!(
            describe(&t.handle(watcher::Event::Apply(svc("a"))).events),
            vec!["+a"]
        );
        assert_eq!(
            describe(&t.handle(watcher::Event::Delete(svc("a"))).events),
            vec!["-a"]
        );
        assert!(t.known.is_empty());
    }
}
