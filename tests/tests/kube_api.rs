//! The agent's Kubernetes API source (`--kubeconfig`) against an API server
//! double that speaks the real protocol (lists with resource versions,
//! watch streams, 410 Gone, dropped connections, outages): the maps and
//! real traffic after each sequence.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use dataplane_lab::apiserver::{
    objects::{endpoint, slice, web_service, State},
    ApiServer, GoneAs, Outage,
};
use dataplane_lab::{CrossNode, PodSpec, Topology};
use integration_tests::{dns, http, lab_pod, privileged, Cluster, Seen, WEB_IP};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn ep(pod: &PodSpec, state: State) -> k8s_openapi::api::discovery::v1::Endpoint {
    endpoint(pod.ip(), &format!("node{}", pod.node), state)
}

fn ready(pods: &[&PodSpec]) -> Vec<k8s_openapi::api::discovery::v1::Endpoint> {
    pods.iter().map(|p| ep(p, State::Ready)).collect()
}

/// What the maps hold for a `web_service` named `name` on `ip` with these
/// backend pods (both ports).
fn expect_web(name: &str, ip: Ipv4Addr, pods: &[&PodSpec]) -> BTreeMap<String, Vec<String>> {
    let backends = |port: u16| {
        let mut b: Vec<String> = pods.iter().map(|p| format!("{}:{port}", p.ip())).collect();
        b.sort();
        b.dedup();
        b
    };
    [
        (format!("default/{name}:http {ip}:80/TCP"), backends(8080)),
        (format!("default/{name}:dns {ip}:53/UDP"), backends(5353)),
    ]
    .into_iter()
    .collect()
}

fn merged(
    parts: impl IntoIterator<Item = BTreeMap<String, Vec<String>>>,
) -> BTreeMap<String, Vec<String>> {
    parts.into_iter().flatten().collect()
}

fn web() -> Service {
    web_service("web", WEB_IP)
}

fn web_slice(name: &str, endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>) -> EndpointSlice {
    slice(name, "web", endpoints)
}

/// The backends `n` new TCP connections from the client reached.
fn reached(c: &Cluster, n: usize) -> std::collections::BTreeSet<String> {
    c.tcp_backends("client", http(WEB_IP), n)
}

fn set<const N: usize>(names: [&str; N]) -> std::collections::BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

#[test]
fn initial_list_is_synced_then_endpoint_churn_follows_the_watch() {
    if !privileged() {
        return;
    }
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a, &b])));
    });
    // Healthy (Cluster::start_api waited for it) means the initial lists
    // are in the maps.
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b]));
    c.eventually("web-a and web-b answer", || {
        reached(&c, 12) == set(["web-a", "web-b"])
    });
    assert!(c.udp("client", dns(WEB_IP)).backend().is_some(), "{}", c.logs());

    // Churn: web-c added, web-a gone.
    c.api().apply(&web_slice("web-1", ready(&[&b, &cc])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b, &cc]));
    c.eventually("only web-b and web-c answer", || {
        reached(&c, 12) == set(["web-b", "web-c"])
    });

    // web-b fails its readiness probe: excluded.
    c.api().apply(&web_slice(
        "web-1",
        vec![ep(&b, State::NotReady), ep(&cc, State::Ready)],
    ));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&cc]));

    // A second service, then the slice goes: no endpoints, refused.
    c.api().apply(&web_service("other", OTHER_IP));
    c.api().apply(&slice("other-1", "other", ready(&[&a])));
    c.api().delete::<EndpointSlice>("default", "web-1");
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[]),
        expect_web("other", OTHER_IP, &[&a]),
    ]));
    assert_eq!(c.tcp("client", http(WEB_IP)), Seen::Refused, "{}", c.logs());
    assert_eq!(
        c.tcp("client", http(OTHER_IP)).backend(),
        Some("web-a"),
        "{}",
        c.logs()
    );

    // The service goes: nothing left of it.
    c.api().delete::<Service>("default", "web");
    c.eventually_programmed(&expect_web("other", OTHER_IP, &[&a]));
}
