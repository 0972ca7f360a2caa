//! Prometheus metrics, served on `--metrics-bind-address` (kube-proxy's
//! port 10249) at `GET /metrics`.
//!
//! Sync metrics are recorded by the control loop as it works; map occupancy and
//! the datapath's per-CPU counters are read when scraped, so a scrape shows
//! the maps as they are, not as of the last sync.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
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
        run_loop::{EngineTotals, Report, SyncKind},
        sync::Occupancy,
    },
    node::pinned::{counter_total, CounterMap},
    operator::http::{self, ServeError},
};

type Labels = Vec<(&'static str, &'static str)>;

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
    live: Arc<LiveState>,
}

/// Read at scrape time.
#[derive(Default)]
struct LiveState {
    occupancy: Mutex<Occupancy>,
    counters: Mutex<Option<CounterMap>>,
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
        let mut registry = Registry::with_prefix("dataplane");
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
        let live = Arc::new(LiveState {
            occupancy: Mutex::default(),
            counters: Mutex::new(counters),
        });
        registry.register_collector(Box::new(LiveCollector(live.clone())));
        Self {
            registry: Arc::new(registry),
            sync_duration,
            last_sync,
            sync_errors,
            services,
            frontends,
            endpoints,
            live,
        }
    }

    pub fn sync_done(&self, kind: &'static str, took: Duration) {
        self.sync_duration
            .get_or_create(&vec![("kind", kind)])
            .observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
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

    pub fn conntrack_entries(&self, entries: usize) {
        lock(&self.live.occupancy).conntrack = entries;
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

pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(), ServeError> {
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
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
            conntrack: 999, // ignored: the sweep owns this figure
            sock_revnat: 999,
        });
        m.conntrack_entries(4);
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
            "dataplane_map_entries{map=\"CONNTRACK\"} 4",
            "dataplane_map_capacity{map=\"CONNTRACK\"} 262144",
            "dataplane_map_entries{map=\"SOCK_REVNAT\"} 5",
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
}
