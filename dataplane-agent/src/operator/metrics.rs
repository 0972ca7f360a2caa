//! Prometheus metrics, served on `--metrics-bind-address` (kube-proxy's
//! port 10249) at `GET /metrics`, with `GET /configz` (the effective
//! configuration in kube-proxy's field names) beside them, as kube-proxy
//! serves both.
//!
//! Sync metrics are recorded by the control loop as it works; map occupancy and
//! the datapath's per-CPU counters are read when scraped, so a scrape shows
//! the maps as they are, not as of the last sync.
//!
//! Beside ours (`dataplane_*`), kube-proxy's own (`kubeproxy_*`) with the
//! names, types, labels and buckets of kube-proxy 1.34
//! (`pkg/proxy/metrics/metrics.go` and the Kubernetes metrics reference),
//! so kube-proxy's dashboards, alerts and the network programming latency
//! SLI keep working (the tests below hold the list). `ip_family` is always
//! `IPv4`, the one family this dataplane serves. Not served: kube-proxy's
//! iptables, nftables and conntrack-reconciler metrics, and
//! `proxy_healthz_total`, `proxy_livez_total`,
//! `sync_proxy_rules_no_local_endpoints_total`.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use dataplane_common::Counter as DatapathCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::{
    control::{
        health::Health,
        run_loop::{EngineTotals, Report, SyncKind},
        sync::{CtOccupancy, Occupancy},
    },
    node::pinned::{counter_total, CounterMap},
    operator::http::{self, ServeError},
};

type Labels = Vec<(&'static str, &'static str)>;

/// kube-proxy's sync histograms: 1 ms doubling to ~16 s (15 buckets).
fn kube_proxy_sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's network programming latency buckets: 0 (kube-proxy's
/// bucket merge starts with a zero bucket), 0.25 s and 0.5 s, every second
/// to 59 s, every 5 s to 115 s, every 30 s to 5 min.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0, 0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

fn ipv4() -> Labels {
    vec![("ip_family", "IPv4")]
}

/// kube-proxy's metrics the control loop records.
#[derive(Clone)]
struct KubeProxyMetrics {
    sync: Family<Labels, Histogram>,
    sync_full: Family<Labels, Histogram>,
    sync_partial: Family<Labels, Histogram>,
    last_sync: Family<Labels, Gauge<f64, AtomicU64>>,
    network_programming: Family<Labels, Histogram>,
}

impl KubeProxyMetrics {
    fn register(registry: &mut Registry) -> Self {
        let sync_histogram = || {
            Family::<Labels, Histogram>::new_with_constructor(
                (|| Histogram::new(kube_proxy_sync_buckets())) as fn() -> Histogram,
            )
        };
        let m = Self {
            sync: sync_histogram(),
            sync_full: sync_histogram(),
            sync_partial: sync_histogram(),
            last_sync: Family::default(),
            network_programming: Family::new_with_constructor(
                (|| Histogram::new(network_programming_buckets())) as fn() -> Histogram,
            ),
        };
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to bring the maps up to date, full and incremental syncs together",
            m.sync.clone(),
        );
        registry.register(
            "sync_full_proxy_rules_duration_seconds",
            "Time of full syncs (every service)",
            m.sync_full.clone(),
        );
        registry.register(
            "sync_partial_proxy_rules_duration_seconds",
            "Time of incremental syncs (the services a change touched)",
            m.sync_partial.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last sync that reached the maps",
            m.last_sync.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its change being in the maps",
            m.network_programming.clone(),
        );
        m
    }
}

/// Handles the control loop records into (through [`Report`]). Cheap to
/// clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    sync_duration: Family<Labels, Histogram>,
    last_sync: Gauge<f64, AtomicU64>,
    sync_errors: Family<Labels, Counter>,
    services: Gauge,
    frontends: Gauge,
    endpoints: Gauge,
    kube_proxy: KubeProxyMetrics,
    live: Arc<LiveState>,
}

/// Read at scrape time.
#[derive(Default)]
struct LiveState {
    occupancy: Mutex<Occupancy>,
    counters: Mutex<Option<CounterMap>>,
    /// The queue between sources and maps (kube-proxy's change counts).
    health: Mutex<Option<Health>>,
    /// Served at `/configz`.
    configz: Mutex<Option<serde_json::Value>>,
}

impl std::fmt::Debug for LiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveState")
            .field("occupancy", &*lock(&self.occupancy))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `counters` is the datapath's COUNTERS map (None in tests without BPF).
    pub fn new(counters: Option<CounterMap>) -> Self {
        let mut root = Registry::default();
        let live = Arc::new(LiveState {
            occupancy: Mutex::default(),
            counters: Mutex::new(counters),
            health: Mutex::default(),
            configz: Mutex::default(),
        });
        let kube_proxy = {
            let registry = root.sub_registry_with_prefix("kubeproxy");
            registry.register_collector(Box::new(KubeProxyQueueCollector(live.clone())));
            KubeProxyMetrics::register(registry)
        };
        let registry = root.sub_registry_with_prefix("dataplane");
        let sync_duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~13 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "sync_duration_seconds",
            "Time to turn the cluster state into map writes, by kind (full: every service; incremental: the services a change touched)",
            sync_duration.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last sync that reached the maps",
            last_sync.clone(),
        );
        let sync_errors = Family::<Labels, Counter>::default();
        registry.register(
            "sync_errors",
            "Problems met while syncing, by cause (invalid_object, source, too_many_backends, frontend_conflict, capacity, map_write)",
            sync_errors.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services_programmed",
            "Services with at least one frontend in the maps",
            services.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends_programmed",
            "Service IP:port/protocol entries in the maps",
            frontends.clone(),
        );
        let endpoints = Gauge::default();
        registry.register(
            "endpoints_programmed",
            "Distinct endpoints (pod IP:port) in the maps",
            endpoints.clone(),
        );
        registry.register_collector(Box::new(LiveCollector(live.clone())));
        Self {
            registry: Arc::new(root),
            sync_duration,
            last_sync,
            sync_errors,
            services,
            frontends,
            endpoints,
            kube_proxy,
            live,
        }
    }

    pub fn sync_done(&self, kind: &'static str, took: Duration) {
        self.sync_duration
            .get_or_create(&vec![("kind", kind)])
            .observe(took.as_secs_f64());
        let now = unix_seconds(SystemTime::now());
        self.last_sync.set(now);
        let kp = &self.kube_proxy;
        kp.sync.get_or_create(&ipv4()).observe(took.as_secs_f64());
        let by_kind = if kind == SyncKind::Full.as_str() {
            &kp.sync_full
        } else {
            &kp.sync_partial
        };
        by_kind.get_or_create(&ipv4()).observe(took.as_secs_f64());
        kp.last_sync.get_or_create(&ipv4()).set(now);
    }

    /// Network programming latency of one change (kube-proxy's SLI).
    pub fn network_programmed(&self, latency: Duration) {
        self.kube_proxy
            .network_programming
            .get_or_create(&ipv4())
            .observe(latency.as_secs_f64());
    }

    /// Reads the changes queued between the sources and the maps from
    /// `health` at each scrape.
    pub fn follow_changes(&self, health: Health) {
        *lock(&self.live.health) = Some(health);
    }

    /// What `/configz` serves.
    pub fn set_configz(&self, configz: serde_json::Value) {
        *lock(&self.live.configz) = Some(configz);
    }

    pub fn sync_error(&self, cause: &'static str) {
        self.sync_errors
            .get_or_create(&vec![("cause", cause)])
            .inc();
    }

    pub fn programmed(&self, services: usize, frontends: usize, endpoints: usize) {
        self.services.set(services as i64);
        self.frontends.set(frontends as i64);
        self.endpoints.set(endpoints as i64);
    }

    /// Map occupancy as the sync engine knows it; the conntrack count is
    /// kept from the last [`Metrics::conntrack_entries`].
    pub fn occupancy(&self, occupancy: Occupancy) {
        let mut current = lock(&self.live.occupancy);
        let (conntrack, sock_revnat) = (current.conntrack, current.sock_revnat);
        *current = Occupancy {
            conntrack,
            sock_revnat,
            ..occupancy
        };
    }

    pub fn conntrack_entries(&self, conntrack: CtOccupancy) {
        lock(&self.live.occupancy).conntrack = conntrack;
    }

    /// Entries of the socket-level reverse map (LRU), counted by the agent
    /// with each conntrack sweep.
    pub fn sock_revnat_entries(&self, entries: usize) {
        lock(&self.live.occupancy).sock_revnat = entries;
    }

    /// The registry in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Report for Metrics {
    fn synced(&self, kind: SyncKind, took: Duration, totals: EngineTotals) {
        self.sync_done(kind.as_str(), took);
        self.programmed(totals.services, totals.frontends, totals.backends);
        self.occupancy(totals.occupancy);
    }

    fn error(&self, cause: &'static str) {
        self.sync_error(cause);
    }

    fn network_programmed(&self, latency: Duration) {
        Metrics::network_programmed(self, latency);
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// kube-proxy's change counts and last queued time, read from [`Health`]
/// on each scrape (a loop that stopped applying shows as growing pending
/// counts).
#[derive(Debug)]
struct KubeProxyQueueCollector(Arc<LiveState>);

impl Collector for KubeProxyQueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(health) = lock(&self.0.health).clone() else {
            return Ok(());
        };
        let changes = health.changes();
        if let Some(at) = changes.last_queued {
            let gauge = ConstGauge::new(unix_seconds(at));
            let mut family = encoder.encode_descriptor(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "Unix time a source last sent a change for the maps",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(family.encode_family(&ipv4())?)?;
        }
        for (name, help, value) in [
            (
                "sync_proxy_rules_endpoint_changes_pending",
                "EndpointSlice changes received and not yet in the maps",
                changes.endpoint_pending,
            ),
            (
                "sync_proxy_rules_service_changes_pending",
                "Service changes received and not yet in the maps",
                changes.service_pending,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        for (name, help, value) in [
            (
                "sync_proxy_rules_endpoint_changes",
                "EndpointSlice changes received",
                changes.endpoint_total,
            ),
            (
                "sync_proxy_rules_service_changes",
                "Service changes received",
                changes.service_total,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Map occupancy and datapath counters, read on each scrape.
#[derive(Debug)]
struct LiveCollector(Arc<LiveState>);

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let occupancy = *lock(&self.0.occupancy);
        let entries = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "map_entries",
            "Entries in each pinned map",
            None,
            entries.metric_type(),
        )?;
        for (map, used, _) in occupancy.rows() {
            let labels: Labels = vec![("map", map)];
            ConstGauge::new(used as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_capacity",
            "Capacity of each pinned map",
            None,
            entries.metric_type(),
        )?;
        for (map, _, cap) in occupancy.rows() {
            let labels: Labels = vec![("map", map)];
            ConstGauge::new(i64::from(cap)).encode(family.encode_family(&labels)?)?;
        }

        let counters = lock(&self.0.counters);
        let Some(map) = counters.as_ref() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "datapath_packets",
            "Packets by what the datapath did with them, every drop and reject reason included (summed over CPUs)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for counter in DatapathCounter::ALL {
            let Ok(total) = counter_total(map, counter) else {
                continue;
            };
            let labels: Labels = vec![("event", counter.name())];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

async fn serve_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn serve_configz(State(metrics): State<Metrics>) -> impl IntoResponse {
    match lock(&metrics.live.configz).clone() {
        Some(configz) => (StatusCode::OK, axum::Json(configz)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(), ServeError> {
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/configz", get(serve_configz))
        .with_state(metrics);
    http::serve("metrics", addr, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        let m = Metrics::new(None);
        m.sync_done("full", Duration::from_millis(3));
        m.sync_done("incremental", Duration::from_micros(40));
        m.sync_error("capacity");
        m.sync_error("capacity");
        m.programmed(2, 3, 7);
        m.occupancy(Occupancy {
            service_ips: 2,
            services: 3,
            backend_slots: 9,
            backends: 7,
            service_names: 3,
            // Ignored: the sweep owns these figures.
            conntrack: CtOccupancy {
                tcp: 999,
                ..CtOccupancy::default()
            },
            sock_revnat: 999,
            services6: 1,
            ..Occupancy::default()
        });
        m.conntrack_entries(CtOccupancy {
            tcp: 4,
            other: 6,
            tcp6: 2,
            other6: 0,
            tcp_capacity: 1000,
            other_capacity: 500,
        });
        m.sock_revnat_entries(5);
        let text = m.encode();
        for line in [
            "dataplane_sync_duration_seconds_count{kind=\"full\"} 1",
            "dataplane_sync_duration_seconds_count{kind=\"incremental\"} 1",
            "dataplane_sync_errors_total{cause=\"capacity\"} 2",
            "dataplane_services_programmed 2",
            "dataplane_frontends_programmed 3",
            "dataplane_endpoints_programmed 7",
            "dataplane_map_entries{map=\"BACKEND_SLOTS\"} 9",
            "dataplane_map_entries{map=\"CT_TCP\"} 4",
            "dataplane_map_capacity{map=\"CT_TCP\"} 1000",
            "dataplane_map_entries{map=\"CT_OTHER\"} 6",
            "dataplane_map_capacity{map=\"CT_OTHER\"} 500",
            "dataplane_map_entries{map=\"SOCK_REVNAT\"} 5",
            "dataplane_map_entries{map=\"LB6_SERVICES\"} 1",
            "dataplane_map_entries{map=\"CT6_TCP\"} 2",
            "dataplane_map_capacity{map=\"CT6_TCP\"} 1000",
            "dataplane_map_capacity{map=\"SOCK_REVNAT\"} 131072",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        let last = text
            .lines()
            .find(|l| l.starts_with("dataplane_last_sync_timestamp_seconds "))
            .expect("last sync timestamp");
        let value: f64 = last.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(value > 1.7e9, "a Unix time: {last}");
    }

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let m = Metrics::new(None);
        m.programmed(1, 1, 2);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(serve(addr, m));
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            for _ in 0..50 {
                if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).unwrap();
                    return out;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("metrics server did not come up on {addr}");
        })
        .await
        .unwrap();
        server.abort();
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        assert!(body.contains("application/openmetrics-text"), "{body}");
        assert!(body.contains("dataplane_endpoints_programmed 2"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
    }

    /// kube-proxy 1.34's metrics this agent serves, as the Kubernetes
    /// metrics reference lists them: name, type, labels.
    const KUBE_PROXY_1_34: &[(&str, &str, &[&str])] = &[
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
            &[],
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
            &[],
        ),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
            &[],
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
            &[],
        ),
    ];

    /// Every metric, label and bucket kube-proxy's exposition would show.
    fn recorded_kube_proxy_metrics() -> String {
        let m = Metrics::new(None);
        let health = Health::default();
        health.changes_queued(1, 2);
        m.follow_changes(health);
        m.sync_done("full", Duration::from_millis(3));
        m.sync_done("incremental", Duration::from_micros(40));
        m.network_programmed(Duration::from_millis(2500));
        m.encode()
    }

    /// (name, type, label names) of the `kubeproxy_*` families in `text`.
    fn families(text: &str) -> Vec<(String, String, Vec<String>)> {
        let mut out = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE kubeproxy_") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').unwrap();
            let name = format!("kubeproxy_{name}");
            // OpenMetrics names a counter's family without `_total`.
            let series = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.clone()
            };
            let mut labels: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (head, _) = l.split_once(' ')?;
                    let (metric, labels) = head.split_once('{').unwrap_or((head, "}"));
                    let base = metric
                        .strip_suffix("_bucket")
                        .or_else(|| metric.strip_suffix("_count"))
                        .or_else(|| metric.strip_suffix("_sum"))
                        .filter(|_| kind == "histogram")
                        .unwrap_or(metric);
                    (base == series).then(|| labels.trim_end_matches('}').to_owned())
                })
                .flat_map(|labels| {
                    labels
                        .split(',')
                        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
                        .collect::<Vec<_>>()
                })
                .filter(|l| l != "le")
                .collect();
            labels.sort();
            labels.dedup();
            out.push((series, kind.to_owned(), labels));
        }
        out.sort();
        out
    }

    #[test]
    fn kube_proxy_metric_names_types_and_labels_are_kube_proxys() {
        let text = recorded_kube_proxy_metrics();
        let expected: Vec<(String, String, Vec<String>)> = KUBE_PROXY_1_34
            .iter()
            .map(|(n, t, l)| {
                (
                    n.to_string(),
                    t.to_string(),
                    l.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(families(&text), expected, "{text}");
        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }

    /// The `le` bounds of `histogram`'s buckets in `text`.
    fn bucket_bounds(text: &str, histogram: &str) -> Vec<f64> {
        let prefix = format!("{histogram}_bucket{{");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                le.parse().ok()
            })
            .filter(|b: &f64| b.is_finite())
            .collect()
    }

    #[test]
    fn kube_proxy_histograms_have_kube_proxys_buckets() {
        let text = recorded_kube_proxy_metrics();
        // MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
        // LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7)), with the
        // zero bucket MergeBuckets starts from.
        let mut programming = vec![0.0, 0.25, 0.5];
        programming.extend((1..=59).map(f64::from));
        programming.extend([
            60., 65., 70., 75., 80., 85., 90., 95., 100., 105., 110., 115.,
        ]);
        programming.extend([120., 150., 180., 210., 240., 270., 300.]);
        assert_eq!(
            bucket_bounds(&text, "kubeproxy_network_programming_duration_seconds"),
            programming
        );
        // ExponentialBuckets(0.001, 2, 15).
        let sync: Vec<f64> = (0..15).map(|i| 0.001 * 2f64.powi(i)).collect();
        for histogram in [
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        ] {
            assert_eq!(bucket_bounds(&text, histogram), sync, "{histogram}");
        }
    }

    #[test]
    fn a_change_programmed_2_5_s_after_its_trigger_lands_in_the_3_s_bucket() {
        let text = recorded_kube_proxy_metrics();
        for (le, count) in [("2.0", 0), ("3.0", 1), ("+Inf", 1)] {
            let line = format!(
                "kubeproxy_network_programming_duration_seconds_bucket{{le=\"{le}\",ip_family=\"IPv4\"}} {count}"
            );
            assert!(text.contains(&line), "missing `{line}` in:\n{text}");
        }
    }

    #[tokio::test]
    async fn configz_is_served_beside_the_metrics() {
        let m = Metrics::new(None);
        m.set_configz(
            serde_json::json!({"kubeproxy.config.k8s.io": {"kind": "KubeProxyConfiguration"}}),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(serve(addr, m));
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            for _ in 0..50 {
                if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                    s.write_all(b"GET /configz HTTP/1.0\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).unwrap();
                    return out;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("metrics server did not come up on {addr}");
        })
        .await
        .unwrap();
        server.abort();
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        assert!(
            body.contains(r#"{"kubeproxy.config.k8s.io":{"kind":"KubeProxyConfiguration"}}"#),
            "{body}"
        );
    }
}
