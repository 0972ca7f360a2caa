//! The agent in kube-proxy's place: started as `kube-proxy` with the
//! command line of kube-proxy's DaemonSet and kubeadm's
//! `KubeProxyConfiguration`, it takes its settings from the file, watches
//! the API server the file's kubeconfig names, and serves kube-proxy's
//! metrics, network programming latency included.
//!
//! Each test makes its own network namespace with an API server double in
//! it, and its own bpffs.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use dataplane_lab::{
    agent::agent_bin,
    manifests::{endpoint, slice, web_service, State},
    netns::{self, in_netns, Netns},
    require_root,
};
use dataplane_testkit::apiserver::{self, ApiServer, Bind};
use integration_tests::WEB_IP;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const FIXTURE: &str = include_str!("../../dataplane-agent/testdata/kubeadm-kube-proxy.yaml");
/// Where the fixture moves healthz and metrics (off kube-proxy's ports).
const HEALTHZ: &str = "127.0.0.1:10356";
const METRICS: &str = "127.0.0.1:10349";
const API: &str = "127.0.0.1:6443";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// One node: a netns with the API server double, a bpffs, and the agent
/// started as kube-proxy. Fields drop in order: the agent stops first.
struct Node {
    agent: Option<Child>,
    log: PathBuf,
    bpffs: PathBuf,
    api: ApiServer,
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    /// The namespace and the API server double (filled by `init`), the
    /// fixture as the ConfigMap's `config.conf`, its kubeconfig path
    /// pointing at the double. The agent is not started yet.
    fn new(init: impl FnOnce(&ApiServer)) -> Self {
        let ns = Netns::new("kp").expect("creating a netns");
        let addr: SocketAddr = API.parse().unwrap();
        let api = ApiServer::start(vec![Bind::in_netns(&ns.name, addr)])
            .expect("starting the API server double");
        init(&api);
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig.conf");
        std::fs::write(&kubeconfig, apiserver::kubeconfig(addr)).expect("writing kubeconfig");
        let config = FIXTURE.replace(
            "/var/lib/kube-proxy/kubeconfig.conf",
            kubeconfig.to_str().expect("utf-8 temp path"),
        );
        assert_ne!(
            config, FIXTURE,
            "the fixture names kubeadm's kubeconfig path"
        );
        std::fs::write(dir.path().join("config.conf"), config).expect("writing config.conf");
        let bpffs = dir.path().join("bpf");
        std::fs::create_dir_all(&bpffs).expect("bpffs dir");
        netns::run("mount", &["-t", "bpf", "bpf", bpffs.to_str().unwrap()])
            .expect("mounting a bpffs");
        Self {
            agent: None,
            log: dir.path().join("agent.log"),
            bpffs,
            api,
            ns,
            dir,
        }
    }

    /// Starts the agent as kube-proxy's DaemonSet starts kube-proxy (plus
    /// where to pin), and waits until the file's healthz address says 200.
    fn start_as_kube_proxy(&mut self) {
        let kube_proxy = self.dir.path().join("kube-proxy");
        std::os::unix::fs::symlink(agent_bin(), &kube_proxy).expect("linking kube-proxy");
        let config = self.dir.path().join("config.conf");
        let log = std::fs::File::create(&self.log).expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(&kube_proxy)
            .arg(format!("--config={}", config.display()))
            .args(["--hostname-override=node-1", "--v=2", "--bpffs"])
            .arg(&self.bpffs)
            .env_remove("RUST_LOG")
            .env_remove("NODE_NAME")
            .env_remove("DATAPLANE_POD_IFACES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while status(&self.ns.name, HEALTHZ, "/healthz") != Some(200) {
            if let Some(exit) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent exited ({exit}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no healthy agent on {HEALTHZ}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        body(&self.ns.name, METRICS, "/metrics")
            .unwrap_or_else(|| panic!("no /metrics on {METRICS}:\n{}", self.log()))
    }

    /// `dataplane-agent inspect services -o json`: "SERVICE FRONTEND
    /// BACKENDS" for each frontend held.
    fn frontends(&self) -> Vec<String> {
        let out = Command::new(agent_bin())
            .args(["inspect", "services", "-o", "json", "--bpffs"])
            .arg(&self.bpffs)
            .output()
            .expect("running inspect");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut frontends: Vec<String> = rows
            .iter()
            .map(|r| {
                let mut backends: Vec<&str> = r["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b.as_str())
                    .collect();
                backends.sort();
                format!(
                    "{} {} {}",
                    r["service"].as_str().unwrap_or("?"),
                    r["frontend"].as_str().unwrap_or("?"),
                    backends.join(",")
                )
            })
            .collect();
        frontends.sort();
        frontends
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
        if let Some(mut child) = self.agent.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(path) = self.bpffs.to_str() {
            let _ = netns::run("umount", &["-l", path]);
        }
    }
}

/// The whole HTTP/1.0 response to `GET path` on `addr` inside `ns`.
fn get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    in_netns(ns, move || -> Option<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .ok()
    .flatten()
}

fn status(ns: &str, addr: &str, path: &str) -> Option<u16> {
    get(ns, addr, path)?.split_whitespace().nth(1)?.parse().ok()
}

fn body(ns: &str, addr: &str, path: &str) -> Option<String> {
    get(ns, addr, path)?
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
}

/// The value of the sample `series` (exact text before the value).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn web_slice(name: &str, ip: [u8; 4], trigger: Option<SystemTime>) -> EndpointSlice {
    let mut s = slice(
        name,
        "web",
        vec![endpoint(IpAddr::from(ip), Some("node-1"), State::Ready)],
    );
    if let Some(at) = trigger {
        let stamp = k8s_openapi::jiff::Timestamp::try_from(at).expect("a time after 1970");
        s.metadata.annotations = Some([(TRIGGER_TIME.to_string(), stamp.to_string())].into());
    }
    s
}

#[test]
fn kubeadm_config_file_configures_the_agent_started_as_kube_proxy() {
    require_root();
    let mut node = Node::new(|api| {
        api.apply(&web_service("web", WEB_IP));
        api.apply(&web_slice("web-1", [10, 244, 1, 10], None));
    });
    node.start_as_kube_proxy();

    // The source is the API server of the file's kubeconfig.
    assert_eq!(
        node.frontends(),
        [
            format!("default/web:dns {WEB_IP}:53/UDP 10.244.1.10:5353"),
            format!("default/web:http {WEB_IP}:80/TCP 10.244.1.10:8080"),
        ],
        "{}",
        node.log()
    );
    // healthz and metrics where the file put them, not on our defaults.
    for default in ["127.0.0.1:10256", "127.0.0.1:10249"] {
        assert_eq!(
            status(&node.ns.name, default, "/healthz"),
            None,
            "{default}"
        );
    }
    let metrics = node.metrics();
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "dataplane_services_programmed") == Some(1.0),
        "{metrics}"
    );

    // /configz: the conntrack sizes and timeouts of the file, the node
    // name of the command line (it wins over the file's empty one).
    let configz: serde_json::Value =
        serde_json::from_str(&body(&node.ns.name, METRICS, "/configz").expect("/configz"))
            .expect("/configz is JSON");
    let effective = &configz["kubeproxy.config.k8s.io"];
    assert_eq!(effective["hostnameOverride"], "node-1", "{configz}");
    assert_eq!(effective["healthzBindAddress"], HEALTHZ);
    assert_eq!(effective["conntrack"]["maxPerCore"], 1024);
    assert_eq!(effective["conntrack"]["min"], 4096);
    assert_eq!(effective["conntrack"]["tcpEstablishedTimeout"], "24h0m0s");
    assert_eq!(effective["conntrack"]["tcpCloseWaitTimeout"], "1h0m0s");
    assert_eq!(effective["conntrack"]["udpTimeout"], "45s");
    assert_eq!(effective["logging"]["verbosity"], 2);

    // kube-proxy's own backends are named once as not applicable.
    let log = node.log();
    let notes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not applicable"))
        .collect();
    assert_eq!(notes.len(), 1, "{log}");
    assert!(
        notes[0].ends_with("ignored: iptables, ipvs, mode, oomScoreAdj"),
        "{log}"
    );
}

#[test]
fn network_programming_latency_runs_from_the_slices_trigger_time() {
    require_root();
    let mut node = Node::new(|api| {
        api.apply(&web_service("web", WEB_IP));
        api.apply(&web_slice("web-1", [10, 244, 1, 10], None));
    });
    node.start_as_kube_proxy();
    let metrics = node.metrics();
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}"
        ),
        None,
        "nothing with a trigger time yet: {metrics}"
    );

    // A pod became ready 2.2 s ago (after the agent started, which is
    // where kube-proxy starts counting too); the EndpointSlice controller
    // says so in the annotation.
    std::thread::sleep(Duration::from_millis(2200));
    let triggered = SystemTime::now() - Duration::from_millis(2200);
    node.api
        .apply(&web_slice("web-2", [10, 244, 1, 11], Some(triggered)));

    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = node.metrics();
        let count = sample(
            &metrics,
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}",
        );
        if count == Some(1.0) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "not observed: {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // 2.2 s and the time to reach the maps (well under 0.8 s): the 3 s
    // bucket, not the 2 s one.
    for (le, count) in [("2.0", 0.0), ("3.0", 1.0)] {
        let series = format!(
            "kubeproxy_network_programming_duration_seconds_bucket{{le=\"{le}\",ip_family=\"IPv4\"}}"
        );
        assert_eq!(
            sample(&metrics, &series),
            Some(count),
            "{series}\n{metrics}"
        );
    }
    let observed = sample(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv4\"}",
    )
    .unwrap();
    assert!((2.2..3.0).contains(&observed), "{observed}");
    assert_eq!(
        node.frontends(),
        [
            format!("default/web:dns {WEB_IP}:53/UDP 10.244.1.10:5353,10.244.1.11:5353"),
            format!("default/web:http {WEB_IP}:80/TCP 10.244.1.10:8080,10.244.1.11:8080"),
        ],
        "the change is in the maps"
    );
    assert_eq!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        ),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total"
        )
        .is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
}
