//! Kubernetes manifests in a directory: the embedded source for dev VMs and
//! the lab. Files are standard `v1` Service and `discovery.k8s.io/v1`
//! EndpointSlice manifests (YAML, multi-document, `List`, or JSON).
//!
//! A bad file or object never disturbs the rest: it is reported, and what it
//! held before keeps its last good version.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{SourceUpdate, UpdateSender};
use crate::control::model::{parse_service, parse_slice, ClusterEvent, ModelError, ObjectRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

type ObjectKey = (Kind, ObjectRef);

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid YAML: {source} (the objects of this file keep their last good version)", file.display())]
    Yaml {
        file: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{}: {object}: {reason}", file.display())]
    Object {
        file: PathBuf,
        object: String,
        /// Boxed: the model's errors are large and rare.
        #[source]
        reason: Box<ObjectError>,
    },
    #[error("{kind} {object} is defined in both {} and {}; using the first", first.display(), second.display())]
    Duplicate {
        kind: Kind,
        object: ObjectRef,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("watching {}: {source}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Why one document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("not a Kubernetes object (expected a mapping)")]
    NotAMapping,
    #[error("missing apiVersion or kind")]
    MissingKind,
    #[error(transparent)]
    Decode(#[from] serde_json::Error),
    #[error(transparent)]
    Invalid(#[from] ModelError),
    #[error("defined again in the same file; using the first")]
    DefinedAgain,
}

/// Each object's apply event: what the model keeps of it (parsed and
/// validated once), which is also what change detection compares. No
/// `Value` trees or k8s-openapi objects are kept: those take many times the
/// memory (10 000 services and their slices: hundreds of MiB).
type Objects = BTreeMap<ObjectKey, ClusterEvent>;

/// A hash of each object's event: enough to tell a changed object from an
/// unchanged one. Between rescans only these are kept; the objects
/// themselves live once, in the model.
type Hashes = BTreeMap<ObjectKey, u64>;

/// What the directory held at the last rescan, per file.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Hashes>,
    /// What the model was last told of each object.
    reported: Hashes,
}

fn event_hash(event: &ClusterEvent) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // Fixed keys: the same event hashes the same on every rescan.
    let mut hasher = std::hash::DefaultHasher::new();
    event.hash(&mut hasher);
    hasher.finish()
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json") && path.is_file()
}

/// Human name of a document for error messages.
fn describe(doc: &Value, index: usize) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let meta = doc.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    match name {
        Some(name) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} (document {}, unnamed)", index + 1),
    }
}

/// Which of our kinds a document is: `Ok(None)` for kinds this source does
/// not use, `Err` when it is not a Kubernetes object at all (a typo such as
/// `kindd:` must not vanish silently).
fn classify(doc: &Value) -> Result<Option<Kind>, ObjectError> {
    if !doc.is_object() {
        return Err(ObjectError::NotAMapping);
    }
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version.is_empty() || kind.is_empty() {
        return Err(ObjectError::MissingKind);
    }
    Ok(match (api_version, kind) {
        ("v1", "Service") => Some(Kind::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
        _ => {
            log::debug!("ignoring {kind} ({api_version})");
            None
        }
    })
}

/// The key of a document read from its raw metadata, so that an object that
/// fails to deserialize can still keep its last good version.
fn raw_key(kind: Kind, doc: &Value) -> Option<ObjectKey> {
    let meta = doc.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some((
        kind,
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        },
    ))
}

/// Deserializes one document and parses it into what the model keeps, or
/// says why not.
fn parse_object(kind: Kind, doc: &Value) -> Result<(ObjectKey, ClusterEvent), ObjectError> {
    Ok(match kind {
        Kind::Service => {
            let svc = parse_service(&Service::deserialize(doc)?)?;
            ((kind, svc.name.clone()), ClusterEvent::ApplyService(svc))
        }
        Kind::EndpointSlice => {
            let slice = parse_slice(&EndpointSlice::deserialize(doc)?)?;
            ((kind, slice.key.clone()), ClusterEvent::ApplySlice(slice))
        }
    })
}

/// Calls `each` with every object document of a file, `List`s flattened,
/// one at a time so a large file is never held whole as `Value`s.
fn for_each_document(
    text: &str,
    mut each: impl FnMut(usize, &Value),
) -> Result<(), serde_norway::Error> {
    let mut index = 0;
    for de in serde_norway::Deserializer::from_str(text) {
        let doc = Value::deserialize(de)?;
        match doc.get("kind").and_then(Value::as_str) {
            Some("List") => {
                for item in doc
                    .get("items")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    each(index, item);
                    index += 1;
                }
            }
            _ if doc.is_null() => {}
            _ => {
                each(index, &doc);
                index += 1;
            }
        }
    }
    Ok(())
}

impl ManifestSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            reported: BTreeMap::new(),
        }
    }

    /// Re-reads the directory. Returns the events that bring the model from
    /// what this source reported before to what the directory holds now, and
    /// one error per bad file or object.
    pub fn rescan(&mut self) -> (Vec<ClusterEvent>, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_manifest(p))
                .collect(),
            Err(source) => {
                // Keep serving what we have: the directory may be remounted.
                errors.push(ManifestError::Read {
                    file: self.dir.clone(),
                    source,
                });
                return (Vec::new(), errors);
            }
        };
        paths.sort();

        // Per file the hashes of its objects; the objects themselves only
        // of the files read this time, until they are reported.
        let mut files = BTreeMap::new();
        let mut fresh: BTreeMap<PathBuf, Objects> = BTreeMap::new();
        for path in paths {
            let previous = self.files.get(&path);
            let hashes = match std::fs::read_to_string(&path) {
                Err(source) => {
                    errors.push(ManifestError::Read {
                        file: path.clone(),
                        source,
                    });
                    previous.cloned().unwrap_or_default()
                }
                Ok(text) => match Self::read_objects(&path, &text, previous) {
                    Err(source) => {
                        errors.push(ManifestError::Yaml {
                            file: path.clone(),
                            source,
                        });
                        previous.cloned().unwrap_or_default()
                    }
                    Ok((objects, mut kept, object_errors)) => {
                        errors.extend(object_errors);
                        for (key, event) in &objects {
                            kept.insert(key.clone(), event_hash(event));
                        }
                        fresh.insert(path.clone(), objects);
                        kept
                    }
                },
            };
            files.insert(path, hashes);
        }

        // First file (in path order) wins for objects defined twice.
        let mut current: BTreeMap<&ObjectKey, (&PathBuf, u64)> = BTreeMap::new();
        for (path, objects) in &files {
            for (key, value) in objects {
                if let Some((first, _)) = current.get(key) {
                    errors.push(ManifestError::Duplicate {
                        kind: key.0,
                        object: key.1.clone(),
                        first: (*first).clone(),
                        second: path.clone(),
                    });
                } else {
                    current.insert(key, (path, *value));
                }
            }
        }

        let mut events = Vec::new();
        let mut reported = BTreeMap::new();
        for (key, (path, hash)) in &current {
            let before = self.reported.get(*key);
            if before != Some(hash) {
                // Moved out, not copied: the model keeps the one copy.
                match fresh
                    .get_mut(*path)
                    .and_then(|objects| objects.remove(*key))
                {
                    Some(event) => events.push(event),
                    // A version kept from a file (or object) unreadable
                    // this time and not what the model has: nothing to
                    // send until it reads again.
                    None => {
                        if let Some(before) = before {
                            reported.insert((*key).clone(), *before);
                        }
                        continue;
                    }
                }
            }
            reported.insert((*key).clone(), *hash);
        }
        for key in self.reported.keys().filter(|k| !current.contains_key(k)) {
            events.push(match key.0 {
                Kind::Service => ClusterEvent::DeleteService(key.1.clone()),
                Kind::EndpointSlice => ClusterEvent::DeleteSlice(key.1.clone()),
            });
        }
        drop(current);
        self.reported = reported;
        self.files = files;
        (events, errors)
    }

    /// The objects of one file and the problems of single objects; a YAML
    /// error makes the whole file unreadable (the caller keeps its last
    /// good version).
    fn read_objects(
        path: &Path,
        text: &str,
        previous: Option<&Hashes>,
    ) -> Result<(Objects, Hashes, Vec<ManifestError>), serde_norway::Error> {
        let mut objects = BTreeMap::new();
        let mut kept = BTreeMap::new();
        let mut errors = Vec::new();
        for_each_document(text, |index, doc| {
            let mut error = |reason: ObjectError| {
                errors.push(ManifestError::Object {
                    file: path.to_owned(),
                    object: describe(doc, index),
                    reason: Box::new(reason),
                });
            };
            let kind = match classify(doc) {
                Ok(Some(kind)) => kind,
                Ok(None) => return,
                Err(reason) => return error(reason),
            };
            match parse_object(kind, doc) {
                Ok((key, value)) => match objects.entry(key) {
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(value);
                    }
                    std::collections::btree_map::Entry::Occupied(_) => {
                        error(ObjectError::DefinedAgain)
                    }
                },
                Err(reason) => {
                    error(reason);
                    // Keep the last good version of this very object (same
                    // kind: a Service and its slice often share a name).
                    let last_good =
                        raw_key(kind, doc).and_then(|key| Some((*previous?.get(&key)?, key)));
                    if let Some((hash, key)) = last_good {
                        kept.entry(key).or_insert(hash);
                    }
                }
            }
        })?;
        // A kept version never shadows an object read this time.
        kept.retain(|key, _| !objects.contains_key(key));
        Ok((objects, kept, errors))
    }
}

/// Feeds `tx` with the directory's content, then with every change, until
/// the receiver goes away. Each error is reported once while it persists.
pub async fn run(dir: PathBuf, tx: UpdateSender) -> Result<(), ManifestError> {
    // Watch before the first read so no change slips in between.
    let (_watcher, mut changes) = watch_dir(&dir)?;
    let mut source = ManifestSource::new(dir);
    let mut reported = std::collections::BTreeSet::new();
    let mut first = true;
    loop {
        let (events, errors) = source.rescan();
        let mut current = std::collections::BTreeSet::new();
        let mut new_errors = Vec::new();
        for error in errors {
            let text = error.to_string();
            if !reported.contains(&text) && !current.contains(&text) {
                new_errors.push(error.into());
            }
            current.insert(text);
        }
        reported = current;
        let update = SourceUpdate {
            events,
            errors: new_errors,
            initial_sync_done: true,
        };
        if (first || !update.events.is_empty() || !update.errors.is_empty())
            && tx.send(update).await.is_err()
        {
            return Ok(());
        }
        first = false;
        if changes.recv().await.is_none() {
            return Ok(());
        }
    }
}

/// Watches `dir`; yields `()` once per settled burst of changes (editors and
/// `kubectl`-style tools write several events per save). Must be called
/// inside a tokio runtime (the debouncer is a task); keep the watcher alive
/// as long as changes are wanted.
pub fn watch_dir(
    dir: &Path,
) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), ManifestError> {
    let watch_err = |source| ManifestError::Watch {
        dir: dir.to_owned(),
        source,
    };
    let (raw_tx, mut raw_rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads show up as access events: reacting to them would
        // rescan forever.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            // A full channel already means "something changed".
            let _ = raw_tx.try_send(());
        }
    })
    .map_err(watch_err)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(watch_err)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            tokio::time::sleep(Duration::from_millis(150)).await;
            while raw_rx.try_recv().is_ok() {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.1.10]}]
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    fn api(ip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{clusterIP: {ip}, ports: [{{port: 443}}]}}\n")
    }

    fn names(events: &[ClusterEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                ClusterEvent::ApplyService(s) => format!("+svc {}", s.name),
                ClusterEvent::ApplySlice(s) => format!("+slice {}", s.key),
                ClusterEvent::DeleteService(r) => format!("-svc {r}"),
                ClusterEvent::DeleteSlice(r) => format!("-slice {r}"),
            })
            .collect()
    }

    #[test]
    fn multi_document_and_list_manifests_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let list = format!(
            "{{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [{}]}}",
            serde_json::to_string(&serde_norway::from_str::<Value>(&api("10.96.0.11")).unwrap())
                .unwrap()
        );
        std::fs::write(dir.path().join("api.json"), list).unwrap();
        std::fs::write(dir.path().join(".web.yaml.swp"), "garbage: [").unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            names(&events),
            vec![
                "+svc default/api",
                "+svc default/web",
                "+slice default/web-1"
            ]
        );
    }

    #[test]
    fn unchanged_rescan_emits_no_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        let (events, errors) = source.rescan();
        assert!(events.is_empty() && errors.is_empty());
    }

    #[test]
    fn changed_object_alone_is_reapplied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::write(
            dir.path().join("web.yaml"),
            WEB.replace("10.244.1.10", "10.244.1.11"),
        )
        .unwrap();
        let (events, _) = source.rescan();
        assert_eq!(names(&events), vec!["+slice default/web-1"]);
    }

    #[test]
    fn deleted_file_deletes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        let (events, _) = source.rescan();
        assert_eq!(
            names(&events),
            vec!["-svc default/web", "-slice default/web-1"]
        );
    }

    #[test]
    fn broken_yaml_file_keeps_previous_objects_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::write(
            dir.path().join("web.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
        )
        .unwrap();
        let (events, errors) = source.rescan();
        assert!(
            events.is_empty(),
            "nothing is deleted: {:?}",
            names(&events)
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("web.yaml"), "{}", errors[0]);
    }

    #[test]
    fn invalid_ip_is_rejected_naming_file_and_object() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.yaml"), api("10.96.0.999")).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "{:?}", names(&events));
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.contains("api.yaml")
                && msg.contains("Service default/api")
                && msg.contains("10.96.0.999"),
            "{msg}"
        );
    }

    #[test]
    fn port_out_of_range_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("api.yaml"),
            api("10.96.0.11").replace("443", "70000"),
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "{:?}", names(&events));
        let msg = errors[0].to_string();
        assert!(
            msg.contains("api.yaml") && msg.contains("default/api") && msg.contains("70000"),
            "{msg}"
        );
    }

    #[test]
    fn other_objects_in_same_file_still_apply() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}---\n{}---\n{}",
            api("10.96.0.999"),
            WEB,
            api("10.96.0.11").replace("name: api", "name: api2")
        );
        std::fs::write(dir.path().join("all.yaml"), text).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert_eq!(
            names(&events),
            vec![
                "+svc default/api2",
                "+svc default/web",
                "+slice default/web-1"
            ]
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn unknown_protocol_and_missing_field_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            api("10.96.0.11").replace("port: 443", "port: 443, protocol: SCTP"),
        )
        .unwrap();
        // An EndpointSlice without its required addressType.
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\nendpoints: []\n",
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "{:?}", names(&events));
        let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].contains("a.yaml") && msgs[0].contains("SCTP"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("b.yaml")
                && msgs[1].contains("EndpointSlice default/s")
                && msgs[1].contains("addressType"),
            "{msgs:?}"
        );
    }

    #[test]
    fn broken_slice_named_like_its_service_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let both = WEB.replace("name: web-1", "name: web");
        std::fs::write(dir.path().join("web.yaml"), &both).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::write(
            dir.path().join("web.yaml"),
            both.replace("10.244.1.10", "10.244.1.x"),
        )
        .unwrap();
        let (events, errors) = source.rescan();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains("EndpointSlice default/web"),
            "{}",
            errors[0]
        );
        assert!(events.is_empty(), "{:?}", names(&events));
    }

    #[test]
    fn yaml_error_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.yaml"),
            format!("{WEB}---\nkind: Service\nmetadata: {{name: x\n"),
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "a broken file applies nothing");
        let msg = errors[0].to_string();
        assert!(msg.contains("web.yaml") && msg.contains("line"), "{msg}");
    }

    #[test]
    fn unnamed_or_kindless_documents_are_reported_by_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x.yaml"),
            "apiVersion: v1\nkind: Service\nspec: {clusterIP: 10.96.0.1}\n---\nkindd: Service\n---\n---\njust a string\n",
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "{:?}", names(&events));
        let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs[0].contains("Service (document 1, unnamed)"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("document 2") && msgs[1].contains("kind"),
            "{msgs:?}"
        );
        assert!(msgs[2].contains("document 3"), "{msgs:?}");
    }

    #[test]
    fn object_defined_twice_in_one_file_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{}---\n{}", api("10.96.0.11"), api("10.96.0.12")),
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let ClusterEvent::ApplyService(svc) = &events[0] else {
            panic!("{:?}", names(&events));
        };
        let ip = svc.proxied.as_ref().map(|s| s.cluster_ips[0]);
        assert_eq!(ip, Some(std::net::Ipv4Addr::new(10, 96, 0, 11).into()));
    }

    #[test]
    fn namespace_defaults_to_default_and_is_kept_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!(
                "{}---\n{}",
                api("10.96.0.11"),
                api("10.96.0.12").replace("{name: api}", "{name: api, namespace: prod}")
            ),
        )
        .unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(names(&events), vec!["+svc default/api", "+svc prod/api"]);
    }

    #[test]
    fn files_with_other_extensions_and_dotfiles_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml~"), WEB).unwrap();
        std::fs::write(dir.path().join("web.txt"), WEB).unwrap();
        std::fs::write(dir.path().join(".web.yaml"), WEB).unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert!(events.is_empty() && errors.is_empty());
    }

    #[test]
    fn fixing_a_broken_object_applies_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.yaml"), api("10.96.0.999")).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::write(dir.path().join("api.yaml"), api("10.96.0.11")).unwrap();
        let (events, errors) = source.rescan();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(names(&events), vec!["+svc default/api"]);
    }

    #[test]
    fn invalid_edit_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.yaml"), api("10.96.0.11")).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        source.rescan();
        std::fs::write(
            dir.path().join("api.yaml"),
            api("10.96.0.11").replace("443", "70000"),
        )
        .unwrap();
        let (events, errors) = source.rescan();
        assert!(events.is_empty(), "{:?}", names(&events));
        assert!(errors[0].to_string().contains("70000"), "{}", errors[0]);
    }

    #[test]
    fn object_defined_twice_is_reported_and_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), api("10.96.0.11")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), api("10.96.0.12")).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert_eq!(events.len(), 1, "{:?}", names(&events));
        let ClusterEvent::ApplyService(svc) = &events[0] else {
            panic!("{:?}", names(&events));
        };
        let ip = svc.proxied.as_ref().map(|s| s.cluster_ips[0]);
        assert_eq!(
            ip,
            Some(std::net::Ipv4Addr::new(10, 96, 0, 11).into()),
            "a.yaml, read first, must win over b.yaml"
        );
        let msg = errors[0].to_string();
        assert!(msg.contains("a.yaml") && msg.contains("b.yaml"), "{msg}");
    }

    #[tokio::test]
    async fn watcher_reports_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (_watcher, mut changes) = watch_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        let changed = tokio::time::timeout(Duration::from_secs(10), changes.recv()).await;
        assert_eq!(changed.unwrap(), Some(()));
    }
}
