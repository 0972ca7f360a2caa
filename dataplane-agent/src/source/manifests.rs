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

use crate::model::{validate_service, validate_slice, ClusterEvent, ObjectRef};

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
        reason: String,
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

/// What the directory held at the last rescan, per file.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, BTreeMap<ObjectKey, Value>>,
    reported: BTreeMap<ObjectKey, Value>,
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
        .unwrap_or("default");
    match name {
        Some(name) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} (document {}, unnamed)", index + 1),
    }
}

/// Parses one document into a key and its canonical JSON, or says why not.
/// `Ok(None)` for kinds this source does not use.
fn parse_object(doc: &Value) -> Result<Option<(ObjectKey, Value)>, String> {
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    match (api_version, kind) {
        ("v1", "Service") => {
            let svc: Service = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            validate_service(&svc).map_err(|e| e.to_string())?;
            let key = (Kind::Service, ObjectRef::of(&svc.metadata));
            Ok(Some((
                key,
                serde_json::to_value(&svc).map_err(|e| e.to_string())?,
            )))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice =
                serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            validate_slice(&slice).map_err(|e| e.to_string())?;
            let key = (Kind::EndpointSlice, ObjectRef::of(&slice.metadata));
            Ok(Some((
                key,
                serde_json::to_value(&slice).map_err(|e| e.to_string())?,
            )))
        }
        _ => {
            log::debug!("ignoring {kind} ({api_version})");
            Ok(None)
        }
    }
}

/// Every object document of a file, `List`s flattened.
fn documents(text: &str) -> Result<Vec<Value>, serde_norway::Error> {
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let doc = Value::deserialize(de)?;
        match doc.get("kind").and_then(Value::as_str) {
            Some("List") => docs.extend(
                doc.get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            ),
            _ if doc.is_null() => {}
            _ => docs.push(doc),
        }
    }
    Ok(docs)
}

fn event(key: &ObjectKey, value: &Value) -> Option<ClusterEvent> {
    // Values were produced by serializing the same types: they deserialize.
    match key.0 {
        Kind::Service => serde_json::from_value(value.clone())
            .ok()
            .map(|s| ClusterEvent::ApplyService(Box::new(s))),
        Kind::EndpointSlice => serde_json::from_value(value.clone())
            .ok()
            .map(|s| ClusterEvent::ApplySlice(Box::new(s))),
    }
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

        let mut files = BTreeMap::new();
        for path in paths {
            let previous = self.files.get(&path);
            let objects = match std::fs::read_to_string(&path) {
                Err(source) => {
                    errors.push(ManifestError::Read {
                        file: path.clone(),
                        source,
                    });
                    previous.cloned().unwrap_or_default()
                }
                Ok(text) => match documents(&text) {
                    Err(source) => {
                        errors.push(ManifestError::Yaml {
                            file: path.clone(),
                            source,
                        });
                        previous.cloned().unwrap_or_default()
                    }
                    Ok(docs) => self.read_objects(&path, &docs, previous, &mut errors),
                },
            };
            files.insert(path, objects);
        }

        // First file (in path order) wins for objects defined twice.
        let mut current: BTreeMap<ObjectKey, (PathBuf, Value)> = BTreeMap::new();
        for (path, objects) in &files {
            for (key, value) in objects {
                if let Some((first, _)) = current.get(key) {
                    errors.push(ManifestError::Duplicate {
                        kind: key.0,
                        object: key.1.clone(),
                        first: first.clone(),
                        second: path.clone(),
                    });
                } else {
                    current.insert(key.clone(), (path.clone(), value.clone()));
                }
            }
        }

        let mut events = Vec::new();
        for (key, (_, value)) in &current {
            if self.reported.get(key) != Some(value) {
                events.extend(event(key, value));
            }
        }
        for key in self.reported.keys().filter(|k| !current.contains_key(*k)) {
            events.push(match key.0 {
                Kind::Service => ClusterEvent::DeleteService(key.1.clone()),
                Kind::EndpointSlice => ClusterEvent::DeleteSlice(key.1.clone()),
            });
        }
        self.reported = current.into_iter().map(|(k, (_, v))| (k, v)).collect();
        self.files = files;
        (events, errors)
    }

    fn read_objects(
        &self,
        path: &Path,
        docs: &[Value],
        previous: Option<&BTreeMap<ObjectKey, Value>>,
        errors: &mut Vec<ManifestError>,
    ) -> BTreeMap<ObjectKey, Value> {
        let mut objects = BTreeMap::new();
        for (index, doc) in docs.iter().enumerate() {
            match parse_object(doc) {
                Ok(Some((key, value))) => {
                    objects.insert(key, value);
                }
                Ok(None) => {}
                Err(reason) => {
                    errors.push(ManifestError::Object {
                        file: path.to_owned(),
                        object: describe(doc, index),
                        reason,
                    });
                    // Keep the last good version of an object we can still name.
                    let name = doc
                        .get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(Value::as_str);
                    if let Some(previous) = previous {
                        let kept = previous.iter().find(|((_, r), _)| {
                            Some(r.name.as_str()) == name
                                && doc
                                    .get("metadata")
                                    .and_then(|m| m.get("namespace"))
                                    .and_then(Value::as_str)
                                    .unwrap_or("default")
                                    == r.namespace
                        });
                        if let Some((key, value)) = kept {
                            objects.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
        }
        objects
    }
}

/// Watches `dir`; yields `()` once per settled burst of changes (editors and
/// `kubectl`-style tools write several events per save).
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
                ClusterEvent::ApplyService(s) => format!("+svc {}", ObjectRef::of(&s.metadata)),
                ClusterEvent::ApplySlice(s) => format!("+slice {}", ObjectRef::of(&s.metadata)),
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
    fn invalid_ip_is_rejected_naming_file_and_object_and_others_still_apply() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}---\n{}", api("10.96.0.999"), WEB);
        std::fs::write(dir.path().join("all.yaml"), text).unwrap();
        let mut source = ManifestSource::new(dir.path().into());
        let (events, errors) = source.rescan();
        assert_eq!(
            names(&events),
            vec!["+svc default/web", "+slice default/web-1"]
        );
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.contains("all.yaml")
                && msg.contains("Service default/api")
                && msg.contains("10.96.0.999"),
            "{msg}"
        );
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
        assert_eq!(events.len(), 1);
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
