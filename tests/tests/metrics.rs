//! The agent's Prometheus metrics, scraped inside a lab node while real
//! traffic goes through a service.

use dataplane_lab::{agent::metrics_text, CrossNode, Topology};
use integration_tests::{http, lab_pod, require_root, web, Cluster, WEB_IP};

/// The value of the sample `name{labels}` (exact text before the value).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn metrics_show_what_is_programmed_and_what_the_datapath_did() {
    require_root();
    let backends = [lab_pod("web-a"), lab_pod("web-b")];
    let c = Cluster::start(
        Topology::Bridge,
        CrossNode::Direct,
        &[("web.yaml", web(&backends.iter().collect::<Vec<_>>()))],
    );
    for _ in 0..3 {
        assert!(
            c.tcp("client", http(WEB_IP)).backend().is_some(),
            "{}",
            c.logs()
        );
    }
    let node1 = c.lab.node_ns(1);
    let text = metrics_text(&node1).unwrap_or_else(|| panic!("no /metrics\n{}", c.logs()));

    // One service, two frontends (http/TCP and dns/UDP), two endpoints
    // (each pod serves both ports: four distinct pod IP:port pairs).
    assert_eq!(
        sample(&text, "dataplane_services_programmed"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dataplane_frontends_programmed"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dataplane_endpoints_programmed"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dataplane_map_entries{map=\"SERVICES\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dataplane_map_capacity{map=\"SERVICES\"}"),
        Some(131_072.0),
        "{text}"
    );
    // Both conntrack maps, sized at load as kube-proxy sizes nf_conntrack
    // (--conntrack-max-per-core x CPUs, at least --conntrack-min; the other
    // map half that).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let tcp = (32_768.0 * cpus).max(131_072.0);
    assert_eq!(
        sample(&text, "dataplane_map_capacity{map=\"CT_TCP\"}"),
        Some(tcp),
        "{text}"
    );
    assert_eq!(
        sample(&text, "dataplane_map_capacity{map=\"CT_OTHER\"}"),
        Some(tcp / 2.0),
        "{text}"
    );
    assert!(
        sample(&text, "dataplane_map_entries{map=\"CT_OTHER\"}").is_some(),
        "{text}"
    );
    // The client is on node1: its three connections were new flows there.
    assert_eq!(
        sample(
            &text,
            "dataplane_datapath_packets_total{event=\"new_flow\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "dataplane_datapath_packets_total{event=\"reply_translated\"}"
        )
        .is_some_and(|v| v >= 3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "dataplane_sync_duration_seconds_count{kind=\"full\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "dataplane_last_sync_timestamp_seconds").is_some_and(|t| t > 1.7e9),
        "{text}"
    );
}
