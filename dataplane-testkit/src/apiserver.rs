//! A Kubernetes API server test double that speaks the real protocol over
//! TCP: plain HTTP/1.1, JSON lists with a `resourceVersion` in their
//! metadata, and `?watch=true` streams of newline-delimited watch events
//! (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR). Agents reach it through an
//! ordinary kubeconfig ([`kubeconfig`]), so their kube client, watcher and
//! backoff run unmodified.
//!
//! The test drives it: objects (any k8s-openapi type) are applied and
//! deleted, every change gets the next resource version and is kept as a
//! watch event; history can be compacted so that resumed watches get
//! 410 Gone (in the stream, as the real API server sends it, or as an HTTP
//! status); open watches can be dropped; outages refuse, close or answer
//! 503; the server can be stopped and started again on the same addresses.
//! Every request and connection is recorded, for counting reconnects.
//!
//! Not modelled: authentication, label and field selectors, writes through
//! the API (the test writes directly), list pages as consistent snapshots
//! (a `continue` page is read from the current state; the watch from the
//! list's version replays whatever changed meanwhile).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{Method, StatusCode, Uri},
    response::Response,
    Router,
};
use k8s_openapi::{ListableResource, Resource};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use dataplane_lab::netns::in_netns;

/// How a watch that resumes from a compacted resource version is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneAs {
    /// HTTP 200, then one `ERROR` event carrying a 410 `Status` (what the
    /// real API server does: the watch cache answers with an error watcher).
    WatchEvent,
    /// HTTP 410 with a `Status` body (what a list with an expired version
    /// gets; some proxies answer watches this way too).
    HttpStatus,
}

/// How the server fails while it is "down" but still bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Connections are accepted and closed at once, before any HTTP
    /// (counted in [`ApiServer::connections`]).
    CloseConnections,
    /// Every request gets HTTP 503 with a `Status` body.
    Unavailable,
}

/// One HTTP request the server received.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub at: Instant,
    /// Index of the listener (in the order given to [`ApiServer::start`]).
    pub listener: usize,
    pub method: String,
    pub path: String,
    pub query: String,
    pub watch: bool,
    pub status: u16,
}

/// One TCP connection the server accepted (also those an outage closed).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRecord {
    pub at: Instant,
    pub listener: usize,
}

/// Where a listener is bound: an address, in a network namespace or in the
/// test's own.
#[derive(Debug, Clone)]
pub struct Bind {
    pub netns: Option<String>,
    pub addr: SocketAddr,
}

impl Bind {
    pub fn local(addr: SocketAddr) -> Self {
        Self { netns: None, addr }
    }

    pub fn in_netns(netns: &str, addr: SocketAddr) -> Self {
        Self {
            netns: Some(netns.to_owned()),
            addr,
        }
    }
}

/// A collection the server serves, e.g. `/api/v1/services`.
#[derive(Debug, Clone)]
struct Collection {
    kind: &'static str,
    list_kind: &'static str,
    api_version: &'static str,
}

struct StoredEvent {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// Everything the server knows, behind one lock.
struct Store {
    rv: u64,
    collections: BTreeMap<String, Collection>,
    /// collection path -> (namespace, name) -> object (with its version).
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// Every change, in version order.
    events: Vec<StoredEvent>,
    /// Watches resuming from a version below this one get 410 Gone.
    compacted: u64,
    gone_as: GoneAs,
    outage: Option<Outage>,
    /// Bumped to end the open watches in a given way.
    drop_epoch: u64,
    expire_epoch: u64,
    bookmark_epoch: u64,
    open_watches: usize,
    requests: Vec<RequestRecord>,
    connections: Vec<ConnectionRecord>,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change; open watches wake up and look.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

fn collection_path<K: Resource>() -> String {
    if K::GROUP.is_empty() {
        format!("/api/{}/{}", K::VERSION, K::URL_PATH_SEGMENT)
    } else {
        format!("/apis/{}/{}/{}", K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
    }
}

fn collection_of<K: ListableResource>() -> (String, Collection) {
    (
        collection_path::<K>(),
        Collection {
            kind: K::KIND,
            list_kind: K::LIST_KIND,
            api_version: K::API_VERSION,
        },
    )
}

/// A kubeconfig for `http://ADDR` without authentication.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: apiserver-double
  cluster:
    server: http://{addr}
users:
- name: anonymous
  user: {{}}
contexts:
- name: apiserver-double
  context:
    cluster: apiserver-double
    user: anonymous
current-context: apiserver-double
"
    )
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// The API server double. Stops (closing every connection) when dropped.
pub struct ApiServer {
    shared: Arc<Shared>,
    binds: Vec<Bind>,
    running: Option<Running>,
}

impl ApiServer {
    /// Starts listening on `binds` (port 0 picks one; later restarts reuse
    /// it). Serves Services and EndpointSlices, initially none.
    pub fn start(binds: Vec<Bind>) -> anyhow::Result<Self> {
        use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
        let collections = [collection_of::<Service>(), collection_of::<EndpointSlice>()]
            .into_iter()
            .collect();
        let store = Store {
            // Versions start above 0: "0" means "any version" to the API.
            rv: 1,
            collections,
            objects: BTreeMap::new(),
            events: Vec::new(),
            compacted: 0,
            gone_as: GoneAs::WatchEvent,
            outage: None,
            drop_epoch: 0,
            expire_epoch: 0,
            bookmark_epoch: 0,
            open_watches: 0,
            requests: Vec::new(),
            connections: Vec::new(),
        };
        let mut server = Self {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                changed: watch::Sender::new(0),
            }),
            binds,
            running: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// One listener on 127.0.0.1 in the caller's network namespace.
    pub fn start_local() -> anyhow::Result<Self> {
        Self::start(vec![Bind::local(SocketAddr::from(([127, 0, 0, 1], 0)))])
    }

    /// The bound addresses, in the order given to [`ApiServer::start`].
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.binds.iter().map(|b| b.addr).collect()
    }

    /// Also serve the list and watch endpoints of `K`.
    pub fn serve_kind<K: ListableResource>(&self) {
        let (path, collection) = collection_of::<K>();
        self.shared.lock().collections.insert(path, collection);
    }

    /// Stops listening and closes every connection (open watches end
    /// without a terminating chunk, as when an API server dies). Objects
    /// and history are kept for [`ApiServer::resume`].
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
            let _ = running.thread.join();
        }
        self.shared.lock().open_watches = 0;
    }

    /// Listens again on the same addresses after [`ApiServer::stop`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let mut listeners = Vec::new();
        for bind in &mut self.binds {
            let addr = bind.addr;
            let listener = match &bind.netns {
                Some(ns) => in_netns(ns, move || std::net::TcpListener::bind(addr))?,
                None => std::net::TcpListener::bind(addr),
            }
            .with_context(|| format!("binding the API server double to {addr}"))?;
            listener.set_nonblocking(true)?;
            bind.addr = listener.local_addr()?;
            listeners.push(listener);
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver-double".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut servers = Vec::new();
                    for (index, listener) in listeners.into_iter().enumerate() {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                                return;
                            }
                        };
                        let app = Router::new()
                            .fallback(handle)
                            .with_state((shared.clone(), index));
                        let listener = CountingListener {
                            inner: listener,
                            index,
                            shared: shared.clone(),
                        };
                        servers.push(tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        }));
                    }
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                });
                // Dropping the runtime drops every connection task: sockets
                // close mid-stream, as when the process dies.
                drop(runtime);
            })
            .context("starting the API server double's thread")?;
        ready_rx
            .recv()
            .context("the API server double's thread died")??;
        self.running = Some(Running {
            stop: stop_tx,
            thread,
        });
        Ok(())
    }

    /// Creates or replaces an object (ADDED or MODIFIED event); returns its
    /// new resource version.
    pub fn apply<K: ListableResource + serde::Serialize>(&self, object: &K) -> u64 {
        self.apply_all(std::slice::from_ref(object))
    }

    /// Applies several objects with one wake-up of the watches; returns the
    /// last resource version.
    pub fn apply_all<K: ListableResource + serde::Serialize>(&self, objects: &[K]) -> u64 {
        let (path, collection) = collection_of::<K>();
        let rv = {
            let mut store = self.shared.lock();
            store.collections.insert(path.clone(), collection);
            for object in objects {
                let value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
                store.put(&path, value);
            }
            store.rv
        };
        self.shared.notify();
        rv
    }

    /// Deletes an object (DELETED event); false if there was none.
    pub fn delete<K: ListableResource>(&self, namespace: &str, name: &str) -> bool {
        let path = collection_path::<K>();
        let deleted = self.shared.lock().remove(&path, namespace, name);
        if deleted {
            self.shared.notify();
        }
        deleted
    }

    /// The stored object, as served.
    pub fn get<K: Resource + serde::de::DeserializeOwned>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<K> {
        let store = self.shared.lock();
        let value = store
            .objects
            .get(&collection_path::<K>())?
            .get(&(namespace.to_owned(), name.to_owned()))?
            .clone();
        serde_json::from_value(value).ok()
    }

    /// The current resource version (of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history: a watch resuming from any older version gets
    /// 410 Gone and must list again. Open watches are not disturbed.
    pub fn compact(&self) {
        // The events stay for the watches already open (they may not have
        // sent them yet); only new watches from older versions are refused.
        let mut store = self.shared.lock();
        store.compacted = store.rv;
    }

    /// Compacts, and ends every open watch with an `ERROR` event carrying a
    /// 410 `Status` (as the watch cache does to a watcher that fell behind).
    pub fn expire_watches(&self) {
        self.compact();
        self.shared.lock().expire_epoch += 1;
        self.shared.notify();
    }

    /// Aborts every open watch connection mid-stream.
    pub fn drop_watches(&self) {
        self.shared.lock().drop_epoch += 1;
        self.shared.notify();
    }

    /// Sends a BOOKMARK with the current version on every open watch that
    /// asked for bookmarks.
    pub fn bookmark(&self) {
        self.shared.lock().bookmark_epoch += 1;
        self.shared.notify();
    }

    pub fn set_gone_as(&self, gone_as: GoneAs) {
        self.shared.lock().gone_as = gone_as;
    }

    /// Starts (`Some`) or ends (`None`) an outage. Starting one also drops
    /// the open watches.
    pub fn set_outage(&self, outage: Option<Outage>) {
        {
            let mut store = self.shared.lock();
            store.outage = outage;
            if outage.is_some() {
                store.drop_epoch += 1;
            }
        }
        self.shared.notify();
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.shared.lock().connections.clone()
    }

    /// Waits until `n` watches are open (agents caught up and watching).
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.open_watches() < n {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} of {n} watches open after {timeout:?}",
                    self.open_watches()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn meta_str(value: &Value, field: &str) -> String {
    value["metadata"][field].as_str().unwrap_or("").to_owned()
}

impl Store {
    fn put(&mut self, path: &str, mut value: Value) {
        self.rv += 1;
        let rv = self.rv;
        let namespace = match meta_str(&value, "namespace") {
            ns if ns.is_empty() => "default".to_owned(),
            ns => ns,
        };
        let name = meta_str(&value, "name");
        let meta = &mut value["metadata"];
        meta["namespace"] = json!(namespace);
        meta["resourceVersion"] = json!(rv.to_string());
        let objects = self.objects.entry(path.to_owned()).or_default();
        let key = (namespace.clone(), name.clone());
        let uid = objects
            .get(&key)
            .map(|old| meta_str(old, "uid"))
            .unwrap_or_else(|| format!("uid-{rv}"));
        value["metadata"]["uid"] = json!(uid);
        let event = if objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        objects.insert(key, value.clone());
        self.events.push(StoredEvent {
            rv,
            collection: path.to_owned(),
            namespace,
            kind: event,
            object: value,
        });
    }

    fn remove(&mut self, path: &str, namespace: &str, name: &str) -> bool {
        let Some(mut value) = self
            .objects
            .get_mut(path)
            .and_then(|o| o.remove(&(namespace.to_owned(), name.to_owned())))
        else {
            return false;
        };
        self.rv += 1;
        value["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.events.push(StoredEvent {
            rv: self.rv,
            collection: path.to_owned(),
            namespace: namespace.to_owned(),
            kind: "DELETED",
            object: value,
        });
        true
    }
}

/// Accepts connections, records them, and closes them during an outage.
struct CountingListener {
    inner: tokio::net::TcpListener,
    index: usize,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for CountingListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    // EMFILE and friends: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let close = {
                let mut store = self.shared.lock();
                store.connections.push(ConnectionRecord {
                    at: Instant::now(),
                    listener: self.index,
                });
                store.outage == Some(Outage::CloseConnections)
            };
            if !close {
                return (io, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("static response parts")
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

/// `?a=b&c=d` (values the clients we serve never percent-encode).
fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

/// `/api/v1/namespaces/NS/services` -> (`/api/v1/services`, Some(NS)).
fn split_namespace(path: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if let Some(i) = parts.iter().position(|p| *p == "namespaces") {
        if i + 2 < parts.len() {
            let mut rest = parts[..i].to_vec();
            rest.extend_from_slice(&parts[i + 2..]);
            return (rest.join("/"), Some(parts[i + 1].to_owned()));
        }
    }
    (parts.join("/"), None)
}

async fn handle(
    State((shared, listener)): State<(Arc<Shared>, usize)>,
    method: Method,
    uri: Uri,
) -> Response {
    let query = uri.query().unwrap_or("").to_owned();
    let params = query_params(&query);
    let watch = params.get("watch").is_some_and(|v| v == "true" || v == "1");
    let response = answer(&shared, &method, uri.path(), &params, watch);
    shared.lock().requests.push(RequestRecord {
        at: Instant::now(),
        listener,
        method: method.to_string(),
        path: uri.path().to_owned(),
        query,
        watch,
        status: response.status().as_u16(),
    });
    response
}

fn answer(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    params: &BTreeMap<String, String>,
    watch: bool,
) -> Response {
    let store = shared.lock();
    if store.outage == Some(Outage::Unavailable) {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    if method != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "this API server double only lists and watches",
        );
    }
    let (collection_path, namespace) = split_namespace(path);
    let Some(collection) = store.collections.get(&collection_path).cloned() else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    if watch {
        drop(store);
        watch_response(shared, collection_path, namespace, params)
    } else {
        list_response(&store, &collection_path, &collection, namespace, params)
    }
}

fn list_response(
    store: &Store,
    path: &str,
    collection: &Collection,
    namespace: Option<String>,
    params: &BTreeMap<String, String>,
) -> Response {
    // A continue token is "VERSION-OFFSET" of the first page's list.
    let (rv, offset) = params
        .get("continue")
        .and_then(|c| c.split_once('-'))
        .and_then(|(rv, off)| Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?)))
        .unwrap_or((store.rv, 0));
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let items: Vec<&Value> = store
        .objects
        .get(path)
        .into_iter()
        .flat_map(|o| o.iter())
        .filter(|((ns, _), _)| namespace.as_ref().is_none_or(|want| want == ns))
        .map(|(_, v)| v)
        .collect();
    let page: Vec<&Value> = items.iter().skip(offset).take(limit).copied().collect();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if offset + page.len() < items.len() {
        metadata["continue"] = json!(format!("{rv}-{}", offset + page.len()));
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": collection.list_kind,
            "apiVersion": collection.api_version,
            "metadata": metadata,
            "items": page,
        }),
    )
}

/// Where one watch stream is: the last version it has sent and the
/// control epochs it has seen.
struct WatchCursor {
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
    collection: String,
    namespace: Option<String>,
    rv: u64,
    bookmarks: bool,
    kind: &'static str,
    api_version: &'static str,
    drop_epoch: u64,
    expire_epoch: u64,
    bookmark_epoch: u64,
    deadline: tokio::time::Instant,
    /// Lines to send before following the history (initial ADDED events
    /// for a watch without a version, or a 410 ERROR).
    pending: Vec<u8>,
    finished: bool,
    counted: bool,
}

impl Drop for WatchCursor {
    fn drop(&mut self) {
        if self.counted {
            let mut store = self.shared.lock();
            store.open_watches = store.open_watches.saturating_sub(1);
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Vec<u8> {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    line.into_bytes()
}

fn gone_message(from: u64, oldest: u64) -> String {
    format!("too old resource version: {from} ({oldest})")
}

fn watch_response(
    shared: &Arc<Shared>,
    collection_path: String,
    namespace: Option<String>,
    params: &BTreeMap<String, String>,
) -> Response {
    // Subscribed before looking, so no change between the two is missed.
    let changed = shared.changed.subscribe();
    let mut store = shared.lock();
    let collection = store.collections[&collection_path].clone();
    let from = params
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| v.parse::<u64>());
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let mut cursor = WatchCursor {
        shared: shared.clone(),
        changed,
        collection: collection_path,
        namespace,
        rv: store.rv,
        bookmarks: params
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true"),
        kind: collection.kind,
        api_version: collection.api_version,
        drop_epoch: store.drop_epoch,
        expire_epoch: store.expire_epoch,
        bookmark_epoch: store.bookmark_epoch,
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        pending: Vec::new(),
        finished: false,
        counted: false,
    };
    match from {
        Some(Err(_)) => {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "resourceVersion is not a number",
            )
        }
        Some(Ok(from)) if from < store.compacted => match store.gone_as {
            GoneAs::HttpStatus => {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    &gone_message(from, store.compacted),
                )
            }
            GoneAs::WatchEvent => {
                cursor.pending = event_line(
                    "ERROR",
                    &status_body(410, "Expired", &gone_message(from, store.compacted)),
                );
                cursor.finished = true;
            }
        },
        Some(Ok(from)) => cursor.rv = from,
        None => {
            // No version: the current state as ADDED events, then changes.
            for (key, object) in store.objects.get(&cursor.collection).into_iter().flatten() {
                if cursor.namespace.as_ref().is_none_or(|ns| *ns == key.0) {
                    cursor.pending.extend(event_line("ADDED", object));
                }
            }
        }
    }
    if !cursor.finished {
        store.open_watches += 1;
        cursor.counted = true;
    }
    drop(store);
    let stream = futures::stream::unfold(cursor, |mut cursor| async move {
        let chunk = next_chunk(&mut cursor).await?;
        Some((chunk, cursor))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts")
}

/// The next piece of a watch stream: `None` ends it cleanly, `Err` aborts
/// the connection.
async fn next_chunk(cursor: &mut WatchCursor) -> Option<Result<Bytes, std::io::Error>> {
    loop {
        if !cursor.pending.is_empty() {
            return Some(Ok(Bytes::from(std::mem::take(&mut cursor.pending))));
        }
        if cursor.finished {
            return None;
        }
        cursor.changed.borrow_and_update();
        {
            let store = cursor.shared.lock();
            if store.drop_epoch != cursor.drop_epoch {
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "watch dropped by the test",
                )));
            }
            if store.expire_epoch != cursor.expire_epoch {
                cursor.finished = true;
                return Some(Ok(Bytes::from(event_line(
                    "ERROR",
                    &status_body(410, "Expired", &gone_message(cursor.rv, store.compacted)),
                ))));
            }
            let start = store.events.partition_point(|e| e.rv <= cursor.rv);
            for event in &store.events[start..] {
                if event.collection == cursor.collection
                    && cursor
                        .namespace
                        .as_ref()
                        .is_none_or(|ns| *ns == event.namespace)
                {
                    cursor.pending.extend(event_line(event.kind, &event.object));
                }
            }
            cursor.rv = cursor.rv.max(store.rv);
            if store.bookmark_epoch != cursor.bookmark_epoch {
                cursor.bookmark_epoch = store.bookmark_epoch;
                if cursor.bookmarks {
                    cursor.pending.extend(event_line(
                        "BOOKMARK",
                        &json!({
                            "kind": cursor.kind,
                            "apiVersion": cursor.api_version,
                            "metadata": { "resourceVersion": cursor.rv.to_string() },
                        }),
                    ));
                }
            }
        }
        if !cursor.pending.is_empty() {
            continue;
        }
        tokio::select! {
            changed = cursor.changed.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep_until(cursor.deadline) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use dataplane_lab::manifests::{slice, web_service, SERVICE_NAME_LABEL};

    use super::*;

    /// A raw HTTP/1.1 GET; returns the status and a reader at the body
    /// (chunked framing left in, lines of JSON are still recognisable).
    fn get(addr: SocketAddr, target: &str) -> (u16, BufReader<std::net::TcpStream>) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
        }
        (code, r)
    }

    fn body_json(addr: SocketAddr, target: &str) -> (u16, Value) {
        let (code, mut r) = get(addr, target);
        let mut body = String::new();
        r.read_to_string(&mut body).unwrap();
        (code, serde_json::from_str(&body).unwrap())
    }

    /// The next JSON watch event on a chunked stream (skips chunk sizes).
    fn next_event(r: &mut BufReader<std::net::TcpStream>) -> Option<Value> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.trim_start().starts_with('{') {
                return serde_json::from_str(line.trim()).ok();
            }
        }
    }

    fn web(ip: [u8; 4]) -> Service {
        web_service("web", ip.into())
    }

    #[test]
    fn lists_carry_a_resource_version_and_objects_their_own() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        let rv = api.apply(&web([10, 96, 0, 10]));
        let (code, list) = body_json(addr, "/api/v1/services");
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["metadata"]["resourceVersion"], rv.to_string());
        assert_eq!(list["items"][0]["metadata"]["name"], "web");
        assert_eq!(
            list["items"][0]["metadata"]["resourceVersion"],
            rv.to_string()
        );
        let (code, list) = body_json(addr, "/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "EndpointSliceList");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
        let (code, status) = body_json(addr, "/api/v1/pods");
        assert_eq!((code, status["code"].clone()), (404, json!(404)));
    }

    #[test]
    fn lists_page_with_limit_and_continue() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        for i in 0..5u8 {
            api.apply(&web_service(&format!("s{i}"), [10, 96, 0, i].into()));
        }
        let mut names = Vec::new();
        let mut target = "/api/v1/services?limit=2".to_owned();
        let mut versions = std::collections::BTreeSet::new();
        loop {
            let (_, list) = body_json(addr, &target);
            versions.insert(list["metadata"]["resourceVersion"].to_string());
            for item in list["items"].as_array().unwrap() {
                names.push(item["metadata"]["name"].as_str().unwrap().to_owned());
            }
            match list["metadata"]["continue"].as_str() {
                Some(c) => target = format!("/api/v1/services?limit=2&continue={c}"),
                None => break,
            }
        }
        assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
        assert_eq!(
            versions.len(),
            1,
            "every page carries the first page's version"
        );
    }

    #[test]
    fn watch_streams_changes_after_the_version_and_bookmarks_on_request() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        let rv = api.apply(&web([10, 96, 0, 10]));
        let (code, mut stream) = get(
            addr,
            &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
        );
        assert_eq!(code, 200);
        api.wait_for_watches(1, Duration::from_secs(5)).unwrap();
        api.apply(&web([10, 96, 0, 11]));
        api.apply(&slice("web-1", "web", vec![]));
        api.delete::<Service>("default", "web");
        api.bookmark();
        let e = next_event(&mut stream).unwrap();
        assert_eq!(e["type"], "MODIFIED");
        assert_eq!(e["object"]["spec"]["clusterIP"], "10.96.0.11");
        assert_eq!(e["object"]["kind"], "Service");
        let e = next_event(&mut stream).unwrap();
        assert_eq!(e["type"], "DELETED", "the slice is not on this stream");
        assert_eq!(
            e["object"]["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
        let e = next_event(&mut stream).unwrap();
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(
            e["object"]["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
    }

    #[test]
    fn watch_resumed_from_a_compacted_version_is_gone() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        let old = api.apply(&web([10, 96, 0, 10]));
        api.apply(&web([10, 96, 0, 11]));
        api.compact();
        let target = format!("/api/v1/services?watch=true&resourceVersion={old}");
        let (code, mut stream) = get(addr, &target);
        assert_eq!(
            code, 200,
            "the real API server answers 200 and an ERROR event"
        );
        let e = next_event(&mut stream).unwrap();
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["object"]["code"], 410);
        assert!(next_event(&mut stream).is_none(), "and ends the stream");

        api.set_gone_as(GoneAs::HttpStatus);
        let (code, status) = body_json(addr, &target);
        assert_eq!((code, status["reason"].clone()), (410, json!("Expired")));

        // From the current version the watch is fine.
        let now = api.resource_version();
        let (code, _) = get(
            addr,
            &format!("/api/v1/services?watch=true&resourceVersion={now}"),
        );
        assert_eq!(code, 200);
    }

    #[test]
    fn open_watches_can_be_expired_dropped_and_outlive_nothing_on_stop() {
        let mut api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        let rv = api.resource_version();
        let target =
            format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv}");
        let (_, mut expired) = get(addr, &target);
        api.wait_for_watches(1, Duration::from_secs(5)).unwrap();
        api.expire_watches();
        let e = next_event(&mut expired).unwrap();
        assert_eq!(
            (e["type"].clone(), e["object"]["code"].clone()),
            (json!("ERROR"), json!(410))
        );

        let rv = api.resource_version();
        let target =
            format!("/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={rv}");
        let (_, mut dropped) = get(addr, &target);
        api.wait_for_watches(1, Duration::from_secs(5)).unwrap();
        api.drop_watches();
        assert!(next_event(&mut dropped).is_none());

        let (_, mut stopped) = get(addr, &target);
        api.wait_for_watches(1, Duration::from_secs(5)).unwrap();
        api.stop();
        assert!(next_event(&mut stopped).is_none());
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "refused while stopped"
        );
        api.resume().unwrap();
        let (code, _) = body_json(addr, "/api/v1/services");
        assert_eq!(code, 200, "the same address after a restart");
    }

    #[test]
    fn outages_close_connections_or_answer_503_and_are_counted() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        api.set_outage(Some(Outage::Unavailable));
        let (code, status) = body_json(addr, "/api/v1/services");
        assert_eq!((code, status["code"].clone()), (503, json!(503)));
        api.set_outage(Some(Outage::CloseConnections));
        let before = api.connections().len();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let _ = s.write_all(b"GET /api/v1/services HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty(), "closed without an answer");
        assert_eq!(api.connections().len(), before + 1);
        api.set_outage(None);
        assert_eq!(body_json(addr, "/api/v1/services").0, 200);
        let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 200]);
    }

    #[test]
    fn watch_without_a_version_starts_with_the_current_objects() {
        let api = ApiServer::start_local().unwrap();
        let addr = api.addrs()[0];
        api.apply(&slice("web-1", "web", vec![]));
        let (_, mut stream) = get(addr, "/apis/discovery.k8s.io/v1/endpointslices?watch=true");
        let e = next_event(&mut stream).unwrap();
        assert_eq!(e["type"], "ADDED");
        assert_eq!(e["object"]["metadata"]["name"], "web-1");
        let got: EndpointSlice = api.get("default", "web-1").unwrap();
        assert_eq!(got.metadata.labels.unwrap()[SERVICE_NAME_LABEL], "web");
    }

    #[test]
    fn kube_reads_the_served_objects() {
        // The typed objects survive the round trip through the server.
        let api = ApiServer::start_local().unwrap();
        let mut svc = web([10, 96, 0, 10]);
        svc.metadata.namespace = Some("other".into());
        api.apply(&svc);
        let (_, list) = body_json(api.addrs()[0], "/api/v1/namespaces/other/services");
        let back: Service = serde_json::from_value(list["items"][0].clone()).unwrap();
        assert_eq!(back.spec, svc.spec);
        let (_, list) = body_json(api.addrs()[0], "/api/v1/namespaces/default/services");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
    }
}
