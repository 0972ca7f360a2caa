//! The agent's Kubernetes API source (`--kubeconfig`) against an API server
//! double that speaks the real protocol (lists with resource versions,
//! watch streams, 410 Gone, dropped connections, outages): the maps and
//! real traffic after each sequence.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use dataplane_lab::{
    manifests::{endpoint, slice, web_service, State},
    CrossNode, PodSpec, Topology,
};
use dataplane_testkit::apiserver::{ApiServer, GoneAs, Outage};
use integration_tests::{dns, http, lab_pod, require_root, Cluster, Seen, WEB_IP};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn ep(pod: &PodSpec, state: State) -> k8s_openapi::api::discovery::v1::Endpoint {
    endpoint(pod.ip(), Some(&format!("node{}", pod.node)), state)
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

fn web_slice(
    name: &str,
    endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>,
) -> EndpointSlice {
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
    require_root();
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
    assert!(
        c.udp("client", dns(WEB_IP)).backend().is_some(),
        "{}",
        c.logs()
    );

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

    // All the agents asked for is what deploy/rbac.yaml grants: list and
    // watch of Services and EndpointSlices, cluster-wide.
    let asked: std::collections::BTreeSet<(String, String, &str)> = c
        .api()
        .requests()
        .iter()
        .map(|r| {
            let verb = if r.watch { "watch" } else { "list" };
            (r.method.clone(), r.path.clone(), verb)
        })
        .collect();
    let granted = [
        ("GET", "/api/v1/services", "list"),
        ("GET", "/api/v1/services", "watch"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices", "list"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices", "watch"),
    ]
    .map(|(m, p, v)| (m.to_owned(), p.to_owned(), v))
    .into();
    assert_eq!(asked, granted);
}

#[test]
fn slices_of_one_service_are_merged_and_an_address_in_two_counts_once() {
    require_root();
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    // Split: web-b is in both slices (as during a controller's rebalancing).
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a, &b])));
        api.apply(&web_slice("web-2", ready(&[&b, &cc])));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b, &cc]));
    c.eventually("all three answer", || {
        reached(&c, 24) == set(["web-a", "web-b", "web-c"])
    });

    // Merge into one slice.
    c.api().apply(&web_slice("web-1", ready(&[&a, &b, &cc])));
    c.api().delete::<EndpointSlice>("default", "web-2");
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b, &cc]));

    // Split again, differently: losing a slice loses only its endpoints.
    c.api().apply(&web_slice("web-1", ready(&[&a])));
    c.api().apply(&web_slice("web-2", ready(&[&cc])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &cc]));
    c.api().delete::<EndpointSlice>("default", "web-1");
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&cc]));
    c.eventually("only web-c answers", || reached(&c, 8) == set(["web-c"]));
}

/// Upstream: "should fallback to terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Cluster".
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster(
) {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        let mut cluster_web = web();
        cluster_web.spec.as_mut().unwrap().internal_traffic_policy = Some("Cluster".into());
        api.apply(&cluster_web);
        api.apply(&web_slice(
            "web-1",
            vec![ep(&a, State::Ready), ep(&b, State::Terminating)],
        ));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
    assert_eq!(reached(&c, 8), set(["web-a"]), "{}", c.logs());

    // web-a goes away (rolling update): the terminating web-b still serves.
    c.api().apply(&web_slice(
        "web-1",
        vec![ep(&a, State::NotReady), ep(&b, State::Terminating)],
    ));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b]));
    c.eventually("web-b answers", || reached(&c, 6) == set(["web-b"]));

    // A ready endpoint again: the terminating one stops getting new flows.
    c.api().apply(&web_slice(
        "web-1",
        vec![ep(&a, State::Ready), ep(&b, State::Terminating)],
    ));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
}

/// Upstream: "should implement service.kubernetes.io/service-proxy-name":
/// a service labelled for another proxy is left alone until the label goes
/// (headless and ExternalName services are left alone as well).
#[test]
fn should_implement_service_kubernetes_io_service_proxy_name() {
    require_root();
    let a = lab_pod("web-a");
    let proxied_elsewhere = || {
        let mut s = web_service("elsewhere", Ipv4Addr::new(10, 96, 0, 12));
        s.metadata.labels = Some(
            [(
                "service.kubernetes.io/service-proxy-name".to_owned(),
                "other-proxy".to_owned(),
            )]
            .into(),
        );
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        let mut headless = web_service("headless", WEB_IP);
        let spec = headless.spec.as_mut().unwrap();
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
        api.apply(&headless);
        api.apply(&slice("headless-1", "headless", ready(&[&a])));
        let mut external = web_service("external", WEB_IP);
        let spec = external.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("example.com".into());
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        api.apply(&external);
        api.apply(&proxied_elsewhere());
        api.apply(&slice("elsewhere-1", "elsewhere", ready(&[&a])));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
    let elsewhere = Ipv4Addr::new(10, 96, 0, 12);
    assert!(
        c.tcp("client", http(elsewhere)).backend().is_none(),
        "another proxy's service is not translated\n{}",
        c.logs()
    );

    // The label removed: ours now; put back: gone again.
    let mut ours = proxied_elsewhere();
    ours.metadata.labels = None;
    c.api().apply(&ours);
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&a]),
        expect_web("elsewhere", elsewhere, &[&a]),
    ]));
    c.eventually("the service answers once it is ours", || {
        c.tcp("client", http(elsewhere)).backend() == Some("web-a")
    });
    c.api().apply(&proxied_elsewhere());
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
}

#[test]
fn internal_traffic_policy_local_uses_each_nodes_own_endpoints() {
    require_root();
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    let local_web = || {
        let mut s = web();
        s.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&local_web());
        api.apply(&web_slice("web-1", ready(&[&a, &b, &cc])));
    });
    // Each node's maps hold only its own endpoints (--node-name).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.programmed(1) != expect_web("web", WEB_IP, &[&a])
        || c.programmed(2) != expect_web("web", WEB_IP, &[&b, &cc])
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node1 {:#?}\nnode2 {:#?}\n{}",
            c.programmed(1),
            c.programmed(2),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(reached(&c, 8), set(["web-a"]), "{}", c.logs());
    let from_node2 = c.tcp_backends("web-b", http(WEB_IP), 8);
    assert!(
        !from_node2.is_empty() && from_node2.iter().all(|p| p == "web-b" || p == "web-c"),
        "{from_node2:?}\n{}",
        c.logs()
    );

    // node1's endpoint goes: its clients are dropped, as kube-proxy drops them.
    c.api().apply(&web_slice("web-1", ready(&[&b, &cc])));
    c.eventually("node1 drops the service's traffic", || {
        c.tcp("client", http(WEB_IP)) == Seen::Timeout
    });
    assert!(
        c.tcp("web-b", http(WEB_IP)).backend().is_some(),
        "node2 still serves\n{}",
        c.logs()
    );
}

/// Waits until every agent (two watches each) is watching again.
fn all_watching(c: &Cluster) {
    c.api()
        .wait_for_watches(4, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
}

#[test]
fn dropped_watches_resume_from_the_last_version() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
    });
    all_watching(&c);
    let lists_before = lists(&c);
    c.api().drop_watches();
    // Changed while no watch is open: the resumed watch replays it.
    c.api().apply(&web_slice("web-1", ready(&[&a, &b])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b]));
    all_watching(&c);
    let lists_after = lists(&c);
    assert_eq!(
        lists_before,
        lists_after,
        "a dropped watch resumes without a relist\n{}",
        c.logs()
    );

    // Slices change, Services do not: the Service watches' versions fall
    // behind until a BOOKMARK brings them forward, and a resumed watch
    // starts from the bookmark's version.
    c.api().apply(&web_slice("web-1", ready(&[&b])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b]));
    let current = c.api().resource_version();
    let resumed_at_current = || {
        c.api()
            .requests()
            .iter()
            .rev()
            .filter(|r| r.watch && r.path == "/api/v1/services")
            .take(2)
            .all(|r| r.query.contains(&format!("resourceVersion={current}")))
    };
    c.eventually("Service watches resume from the bookmark's version", || {
        c.api().bookmark();
        std::thread::sleep(Duration::from_millis(200));
        c.api().drop_watches();
        all_watching(&c);
        resumed_at_current()
    });
}

#[test]
fn api_server_restart_keeps_traffic_and_a_410_relist_removes_what_was_deleted() {
    require_root();
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    let mut c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a, &b])));
        api.apply(&web_service("other", OTHER_IP));
        api.apply(&slice("other-1", "other", ready(&[&cc])));
    });
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&a, &b]),
        expect_web("other", OTHER_IP, &[&cc]),
    ]));
    all_watching(&c);

    // The API server goes away (connections cut, then refused).
    c.api_mut().stop();
    // Traffic keeps flowing through the last known state meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reached(&c, 12), set(["web-a", "web-b"]), "{}", c.logs());
    assert_eq!(
        c.tcp("client", http(OTHER_IP)).backend(),
        Some("web-c"),
        "{}",
        c.logs()
    );
    assert_eq!(
        c.programmed(1),
        merged([
            expect_web("web", WEB_IP, &[&a, &b]),
            expect_web("other", OTHER_IP, &[&cc]),
        ]),
        "nothing is cleared while the API server is away\n{}",
        c.logs()
    );

    // Meanwhile: `other` deleted, web's endpoints changed, history compacted
    // (the agents' versions are too old to resume from: 410 Gone).
    let api = c.api();
    api.delete::<EndpointSlice>("default", "other-1");
    api.delete::<Service>("default", "other");
    api.apply(&web_slice("web-1", ready(&[&b, &cc])));
    api.compact();
    c.api_mut()
        .resume()
        .expect("restarting the API server double");

    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b, &cc]));
    c.eventually("web-b and web-c answer after the relist", || {
        reached(&c, 12) == set(["web-b", "web-c"])
    });
    assert!(
        c.tcp("client", http(OTHER_IP)).backend().is_none(),
        "the service deleted while disconnected is gone\n{}",
        c.logs()
    );
    let relists = c
        .api()
        .requests()
        .iter()
        .filter(|r| !r.watch && r.status == 200)
        .count();
    assert!(
        relists >= 8,
        "2 initial lists and 2 relists per agent: {relists}"
    );
}

fn lists(c: &Cluster) -> usize {
    c.api().requests().iter().filter(|r| !r.watch).count()
}

#[test]
fn gone_on_an_open_watch_relists_and_reconciles() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        api.apply(&web_service("other", OTHER_IP));
    });
    all_watching(&c);
    c.api().delete::<Service>("default", "other");
    c.api().apply(&web_slice("web-1", ready(&[&b])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b]));

    // The watch cache drops every watcher with an ERROR 410 event: each
    // agent lists both kinds again, and keeps the datapath meanwhile.
    let before = lists(&c);
    c.api().expire_watches();
    c.eventually("every agent relisted both kinds", || {
        lists(&c) >= before + 4
    });
    all_watching(&c);
    assert_eq!(reached(&c, 6), set(["web-b"]), "{}", c.logs());
    c.api().apply(&web_service("other", OTHER_IP));
    c.api().apply(&slice("other-1", "other", ready(&[&a])));
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&b]),
        expect_web("other", OTHER_IP, &[&a]),
    ]));
    c.eventually("the service created after the relist answers", || {
        c.tcp("client", http(OTHER_IP)).backend() == Some("web-a")
    });
}

/// kube's watcher alone would retry the expired version forever here (it
/// relists only on a 410 inside the stream); the agent restarts it.
#[test]
fn gone_as_an_http_status_also_relists() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let mut c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        api.apply(&web_service("other", OTHER_IP));
    });
    all_watching(&c);
    c.api().set_gone_as(GoneAs::HttpStatus);
    c.api_mut().stop();
    c.api().delete::<Service>("default", "other");
    c.api().apply(&web_slice("web-1", ready(&[&b])));
    c.api().compact();
    c.api_mut()
        .resume()
        .expect("restarting the API server double");
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b]));
}

/// The most attempts a retrier may have made `after` the first of them, if
/// it waits at least `first_delay` before its first retry and twice as long
/// before each further one: 1 + the doublings that fit. Load on the machine
/// only delays retries, so this bound cannot fail by slowness.
fn most_attempts(after: Duration, first_delay: Duration) -> usize {
    let mut attempts = 1;
    let (mut waited, mut delay) = (Duration::ZERO, first_delay);
    while waited + delay <= after {
        waited += delay;
        delay *= 2;
        attempts += 1;
    }
    attempts
}

/// Checks that the attempts of `retriers` retriers (sorted times since the
/// outage began) never outrun a backoff from `first_delay` doubling, with
/// one attempt of slack each, and that they did retry.
#[track_caller]
fn assert_backs_off(what: &str, times: &[Duration], retriers: usize, first_delay: Duration) {
    for (i, at) in times.iter().enumerate() {
        let allowed = retriers * (most_attempts(*at, first_delay) + 1);
        assert!(
            i < allowed,
            "{what}: {} attempts by {at:?}, a backoff from {first_delay:?} doubling allows {allowed}; all: {times:?}",
            i + 1
        );
    }
    assert!(
        times.len() > retriers,
        "{what}: no retry after the first attempts: {times:?}"
    );
}

#[test]
fn reconnects_back_off_while_the_api_server_is_down() {
    require_root();
    // kube's policies (kube 5). The watcher's default backoff between
    // failed watches: 0.8 s doubling (jitter only lengthens it), up to 30 s.
    // The client's own retry of a request answered 503: 5 ms doubling
    // (jitter only lengthens it), 15 times.
    const WATCHER_FIRST_DELAY: Duration = Duration::from_millis(800);
    const CLIENT_503_FIRST_DELAY: Duration = Duration::from_millis(5);
    /// Services and EndpointSlices.
    const WATCHERS_PER_AGENT: usize = 2;
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
    });
    all_watching(&c);
    for outage in [Outage::CloseConnections, Outage::Unavailable] {
        let start = std::time::Instant::now();
        c.api().set_outage(Some(outage));
        // A window to watch the retries in; nothing here is timed.
        std::thread::sleep(Duration::from_secs(5));
        // Attempt times (since the outage began) per retrier: per agent
        // for connections (its two watchers' connections cannot be told
        // apart), per agent and request for 503s.
        let mut retriers: BTreeMap<(usize, String), Vec<Duration>> = BTreeMap::new();
        match outage {
            Outage::CloseConnections => {
                for r in c.api().connections().iter().filter(|r| r.at >= start) {
                    let times = retriers.entry((r.listener, "connections".into()));
                    times.or_default().push(r.at - start);
                }
            }
            Outage::Unavailable => {
                for r in c
                    .api()
                    .requests()
                    .iter()
                    .filter(|r| r.at >= start && r.status == 503)
                {
                    let key = (r.listener, format!("{} watch={}", r.path, r.watch));
                    retriers.entry(key).or_default().push(r.at - start);
                }
            }
        }
        if std::env::var_os("DUMP_REQUESTS").is_some() {
            eprintln!("{outage:?}: attempts at {retriers:#?}");
        }
        let (expected, per_key, first_delay) = match outage {
            Outage::CloseConnections => (2, WATCHERS_PER_AGENT, WATCHER_FIRST_DELAY),
            Outage::Unavailable => (2 * WATCHERS_PER_AGENT, 1, CLIENT_503_FIRST_DELAY),
        };
        assert_eq!(
            retriers.len(),
            expected,
            "{outage:?}: retriers {:?}\n{}",
            retriers.keys().collect::<Vec<_>>(),
            c.logs()
        );
        for ((listener, what), times) in &mut retriers {
            times.sort();
            assert_backs_off(
                &format!("{outage:?}, node {}, {what}", *listener + 1),
                times,
                per_key,
                first_delay,
            );
        }
        assert_eq!(reached(&c, 4), set(["web-a"]), "traffic during the outage");
        c.api().set_outage(None);
        all_watching(&c);
    }
    c.api().apply(&web_slice("web-1", ready(&[&b])));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&b]));
}

#[test]
fn backoff_bound_counts_the_doublings_that_fit() {
    let ms = Duration::from_millis;
    assert_eq!(most_attempts(ms(0), ms(800)), 1);
    assert_eq!(most_attempts(ms(799), ms(800)), 1);
    assert_eq!(most_attempts(ms(800), ms(800)), 2);
    // 0.8 + 1.6 = 2.4 s, then + 3.2 = 5.6 s.
    assert_eq!(most_attempts(ms(5_000), ms(800)), 3);
    assert_eq!(most_attempts(ms(5_600), ms(800)), 4);
    // 5 ms doubling: 5 * (2^9 - 1) = 2.555 s fits, 5 * (2^10 - 1) does not.
    assert_eq!(most_attempts(ms(5_000), ms(5)), 10);
}

/// Upstream: "should be able to switch session affinity for service with
/// type clusterIP": ClientIP affinity turned off, then on again, live.
#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() {
    require_root();
    let backends = [lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c")];
    let with_affinity = |on: bool| {
        let mut s = web();
        let spec = s.spec.as_mut().unwrap();
        spec.session_affinity = Some(if on { "ClientIP" } else { "None" }.into());
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&with_affinity(true));
        api.apply(&web_slice(
            "web-1",
            ready(&backends.iter().collect::<Vec<_>>()),
        ));
    });
    // Without affinity, 12 connections over 3 backends would all land on
    // one with probability 3^-11.
    let seen = reached(&c, 12);
    assert_eq!(seen.len(), 1, "client reached {seen:?}\n{}", c.logs());
    c.api().apply(&with_affinity(false));
    c.eventually("affinity off: connections spread again", || {
        reached(&c, 12).len() > 1
    });
    c.api().apply(&with_affinity(true));
    c.eventually("affinity on again: one endpoint", || {
        reached(&c, 12).len() == 1
    });
    // Held: not a lucky draw of the check above.
    let seen = reached(&c, 12);
    assert_eq!(seen.len(), 1, "client reached {seen:?}\n{}", c.logs());
}

/// Upstream: "should work after restarting kube-proxy": an open connection
/// and the services keep working across an agent restart, the new agents
/// catch up with what changed while none ran, and changes made after the
/// restart are applied.
#[test]
fn should_work_after_restarting_kube_proxy() {
    require_root();
    let (a, b, cc) = (lab_pod("web-a"), lab_pod("web-b"), lab_pod("web-c"));
    let mut c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a, &b])));
        api.apply(&web_service("other", OTHER_IP));
        api.apply(&slice("other-1", "other", ready(&[&cc])));
    });
    let (step_tx, step_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let client = dataplane_lab::netns::spawn_in_netns(&c.lab.pod_ns("client"), move || {
        let mut conn = dataplane_lab::traffic::TcpConn::open(http(WEB_IP)).expect("connect");
        for _ in 0..2 {
            seen_tx.send(conn.request()).unwrap();
            if step_rx.recv().is_err() {
                break;
            }
        }
    })
    .unwrap();
    let backend = seen_rx.recv().unwrap().backend().map(str::to_owned);
    assert!(backend.is_some(), "{}", c.logs());

    for status in c.stop_agents() {
        assert!(status.is_some_and(|s| s.success()), "agent exit {status:?}");
    }
    // While no agent runs: `other` deleted, web-c added to web.
    c.api().delete::<EndpointSlice>("default", "other-1");
    c.api().delete::<Service>("default", "other");
    c.api().apply(&web_slice("web-1", ready(&[&a, &b, &cc])));
    c.restart_agents();

    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b, &cc]));
    step_tx.send(()).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap().backend().map(str::to_owned),
        backend,
        "the connection opened before the restart\n{}",
        c.logs()
    );
    drop(step_tx);
    client.join().unwrap();
    assert!(
        c.tcp("client", http(OTHER_IP)).backend().is_none(),
        "the service deleted while no agent ran is gone\n{}",
        c.logs()
    );

    // Changes after the restart still apply.
    c.api().apply(&web_slice("web-1", ready(&[&cc])));
    c.api().apply(&web_service("other", OTHER_IP));
    c.api().apply(&slice("other-1", "other", ready(&[&a])));
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&cc]),
        expect_web("other", OTHER_IP, &[&a]),
    ]));
    c.eventually("only web-c answers web", || {
        reached(&c, 8) == set(["web-c"])
    });
    assert_eq!(
        c.tcp("client", http(OTHER_IP)).backend(),
        Some("web-a"),
        "a service created after the restart\n{}",
        c.logs()
    );
}

#[test]
fn agents_are_healthy_only_once_the_initial_lists_are_in_the_maps() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    // The API server answers 503 to everything while the agents start.
    let mut c = Cluster::launch_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a, &b])));
        api.set_outage(Some(Outage::Unavailable));
    });
    c.eventually("both agents tried to list", || {
        let asked: std::collections::BTreeSet<usize> =
            c.api().requests().iter().map(|r| r.listener).collect();
        asked.len() == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.healthz(), [Some(503), Some(503)], "{}", c.logs());
    for node in [1u8, 2] {
        assert_eq!(
            c.programmed(node),
            BTreeMap::new(),
            "nothing is written before the initial lists\n{}",
            c.logs()
        );
    }
    c.api().set_outage(None);
    c.wait_healthy();
    for node in [1u8, 2] {
        // Healthy means synced: no waiting here.
        assert_eq!(
            c.programmed(node),
            expect_web("web", WEB_IP, &[&a, &b]),
            "{}",
            c.logs()
        );
    }
    assert_eq!(reached(&c, 12), set(["web-a", "web-b"]), "{}", c.logs());
}

#[test]
fn a_rolling_update_burst_is_coalesced_into_a_few_map_writes() {
    require_root();
    let a = lab_pod("web-a");
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
    });
    all_watching(&c);
    // 100 versions of the slice, one pod replaced in each (addresses on
    // node2 that no pod has: only the maps are checked), in one burst.
    let pods: Vec<PodSpec> = (0..102u8)
        .map(|i| PodSpec::new(&format!("p{i}"), 2, 100 + i))
        .collect();
    let versions: Vec<EndpointSlice> = (0..100)
        .map(|i| web_slice("web-1", ready(&pods[i..i + 3].iter().collect::<Vec<_>>())))
        .collect();
    let frontend_writes = || {
        c.agent_log(1)
            .matches("service default/web 10.96.0.10:80/TCP:")
            .count()
    };
    let before = frontend_writes();
    c.api().apply_all(&versions);
    c.eventually_programmed(&expect_web(
        "web",
        WEB_IP,
        &pods[99..102].iter().collect::<Vec<_>>(),
    ));
    let writes = frontend_writes() - before;
    eprintln!("100 slice versions: the frontend was written {writes} times");
    assert!(
        (1..=25).contains(&writes),
        "{writes} writes of the frontend for a burst of 100 versions\n{}",
        c.logs()
    );
}

#[test]
fn objects_the_agent_cannot_represent_are_reported_and_the_rest_keeps_working() {
    require_root();
    let a = lab_pod("web-a");
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        // IPv6 is served, but not with families that contradict the
        // addresses (the API server would refuse this one).
        let mut mismatched = web_service("only-v6", WEB_IP);
        let spec = mismatched.spec.as_mut().unwrap();
        spec.cluster_ip = Some("fd00::10".into());
        spec.cluster_ips = Some(vec!["fd00::10".into()]);
        spec.ip_families = Some(vec!["IPv4".into()]);
        api.apply(&mismatched);
        let mut sctp = web_service("sctp", OTHER_IP);
        sctp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("SCTP".into());
        api.apply(&sctp);
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
    c.eventually("both unrepresentable services are named in the log", || {
        let log = c.agent_log(1);
        log.contains("default/only-v6") && log.contains("fd00::10") && log.contains("default/sctp")
    });
    assert_eq!(reached(&c, 4), set(["web-a"]), "{}", c.logs());
    // Later changes still apply.
    c.api()
        .apply(&web_service("other", Ipv4Addr::new(10, 96, 0, 12)));
    c.api().apply(&slice("other-1", "other", ready(&[&a])));
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&a]),
        expect_web("other", Ipv4Addr::new(10, 96, 0, 12), &[&a]),
    ]));
}

/// Upstream: "should implement service.kubernetes.io/headless": a service
/// with a cluster IP but labelled headless is not proxied; without the
/// label it is, and labelled again it is not.
#[test]
fn should_implement_service_kubernetes_io_headless() {
    require_root();
    let a = lab_pod("web-a");
    let labelled = |on: bool| {
        let mut s = web_service("other", OTHER_IP);
        s.metadata.labels =
            on.then(|| [("service.kubernetes.io/headless".to_owned(), String::new())].into());
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        api.apply(&labelled(true));
        api.apply(&slice("other-1", "other", ready(&[&a])));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
    assert!(
        c.tcp("client", http(OTHER_IP)).backend().is_none(),
        "a service labelled headless is not translated\n{}",
        c.logs()
    );
    c.api().apply(&labelled(false));
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&a]),
        expect_web("other", OTHER_IP, &[&a]),
    ]));
    c.eventually("the service answers without the label", || {
        c.tcp("client", http(OTHER_IP)).backend() == Some("web-a")
    });
    c.api().apply(&labelled(true));
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
}

/// Upstream: "should create endpoints for unready pods": for a service with
/// `publishNotReadyAddresses` the EndpointSlice controller publishes its
/// unready pods as ready (but not serving); they are served.
#[test]
fn should_create_endpoints_for_unready_pods() {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let published = |pod: &PodSpec| {
        let mut e = ep(pod, State::Ready);
        if let Some(conditions) = e.conditions.as_mut() {
            conditions.serving = Some(false);
        }
        e
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        let mut s = web();
        s.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
        api.apply(&s);
        api.apply(&web_slice("web-1", vec![published(&a), published(&b)]));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a, &b]));
    c.eventually("both unready pods answer", || {
        reached(&c, 16) == set(["web-a", "web-b"])
    });
    assert!(
        c.udp("client", dns(WEB_IP)).backend().is_some(),
        "{}",
        c.logs()
    );
}

/// Upstream: "should fallback to terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Local": node1's only endpoint
/// is terminating while node2 has a ready one; node1's clients stay on
/// their node's terminating endpoint, and once it stops serving they get
/// nothing (never the other node's).
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local(
) {
    require_root();
    let (a, b) = (lab_pod("web-a"), lab_pod("web-b"));
    let local_web = || {
        let mut s = web();
        s.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&local_web());
        api.apply(&web_slice(
            "web-1",
            vec![ep(&a, State::Ready), ep(&b, State::Ready)],
        ));
    });
    c.eventually("node1 serves its ready endpoint", || {
        reached(&c, 8) == set(["web-a"])
    });
    c.api().apply(&web_slice(
        "web-1",
        vec![ep(&a, State::Terminating), ep(&b, State::Ready)],
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while c.programmed(1) != expect_web("web", WEB_IP, &[&a])
        || c.programmed(2) != expect_web("web", WEB_IP, &[&b])
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node1 {:#?}\nnode2 {:#?}\n{}",
            c.programmed(1),
            c.programmed(2),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(reached(&c, 8), set(["web-a"]), "{}", c.logs());
    assert_eq!(c.tcp_backends("web-b", http(WEB_IP), 4), set(["web-b"]));

    // No longer serving: node1 has nothing left; dropped as kube-proxy does.
    c.api().apply(&web_slice(
        "web-1",
        vec![ep(&a, State::NotReady), ep(&b, State::Ready)],
    ));
    c.eventually("node1 drops the service's traffic", || {
        c.tcp("client", http(WEB_IP)) == Seen::Timeout
    });
}

/// Upstream: "should be able to change the type from ExternalName to
/// ClusterIP": an ExternalName service is not proxied; changed to ClusterIP
/// (the API server allocates its IP) it is served.
#[test]
fn should_be_able_to_change_the_type_from_externalname_to_clusterip() {
    require_root();
    let a = lab_pod("web-a");
    let external_name = || {
        let mut s = web_service("other", OTHER_IP);
        let spec = s.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("example.com".into());
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        s
    };
    let c = Cluster::start_api(Topology::Bridge, CrossNode::Direct, |api: &ApiServer| {
        api.apply(&web());
        api.apply(&web_slice("web-1", ready(&[&a])));
        api.apply(&external_name());
        api.apply(&slice("other-1", "other", ready(&[&a])));
    });
    c.eventually_programmed(&expect_web("web", WEB_IP, &[&a]));
    assert!(c.tcp("client", http(OTHER_IP)).backend().is_none());
    c.api().apply(&web_service("other", OTHER_IP));
    c.eventually_programmed(&merged([
        expect_web("web", WEB_IP, &[&a]),
        expect_web("other", OTHER_IP, &[&a]),
    ]));
    c.eventually("the ClusterIP answers", || {
        c.tcp("client", http(OTHER_IP)).backend() == Some("web-a")
    });
    assert_eq!(c.udp("client", dns(OTHER_IP)).backend(), Some("web-a"));
}
