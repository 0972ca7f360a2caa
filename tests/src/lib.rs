//! Harness for the privileged integration tests: a two-node lab with agents
//! and backend servers, and clients that report what they saw.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use dataplane_lab::{
    agent::{self, Agent},
    manifests::{self, pod_endpoint_of, Exposure},
    netns::{self, in_netns},
    topology::{default_pods, unique_prefix},
    traffic::{self, Outcome},
    CrossNode, Lab, LabSpec, PodSpec, Topology,
};
use dataplane_testkit::apiserver::{self, ApiServer, Bind};

pub mod bulk;
pub mod multiport;

pub use dataplane_lab::traffic::Outcome as Seen;

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Where the API server double listens in each node's netns (API mode).
pub const API_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 6443);

pub use dataplane_lab::require_root;

/// A lab with agents on both nodes. Fields drop in order: agents stop before
/// the namespaces go.
pub struct Cluster {
    agents: Vec<Agent>,
    /// In API mode: the API server double the agents watch.
    api: Option<ApiServer>,
    pub lab: Lab,
    dir: tempfile::TempDir,
    /// The agent binary started from now on (an earlier release's for an
    /// upgrade test, until [`Cluster::upgrade_agents`]).
    agent_bin: PathBuf,
    /// More flags for every agent's `run`, restarts too (e.g. `--socket-lb
    /// false`, `--external-datapath tc`).
    agent_args: Vec<String>,
}

impl Cluster {
    /// Builds the lab, starts backend servers in every `web-*` pod, writes
    /// `manifests` (file name, content) for both nodes and starts the agents.
    pub fn start(topology: Topology, cross_node: CrossNode, initial: &[(&str, String)]) -> Self {
        Self::start_with_agent_args(topology, cross_node, initial, &[])
    }

    /// Like [`Cluster::start`], each agent run with `args` as well.
    pub fn start_with_agent_args(
        topology: Topology,
        cross_node: CrossNode,
        initial: &[(&str, String)],
        args: &[&str],
    ) -> Self {
        let mut cluster = Self::build(topology, cross_node);
        cluster.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
        for (file, content) in initial {
            cluster.write_manifest(file, content);
        }
        cluster.start_first_agents(true);
        cluster
    }

    /// Like [`Cluster::start`], with the agents watching an API server double
    /// (`--kubeconfig`) instead of manifests. It listens on [`API_ADDR`] in
    /// each node's netns, as a node reaches its API server; `init` fills it
    /// before the agents start.
    pub fn start_api(
        topology: Topology,
        cross_node: CrossNode,
        init: impl FnOnce(&ApiServer),
    ) -> Self {
        let mut cluster = Self::build(topology, cross_node);
        cluster.serve_api(init);
        cluster.start_first_agents(true);
        cluster
    }

    /// Like [`Cluster::start_api`] without waiting for the agents to be
    /// healthy (see [`Cluster::wait_healthy`]).
    pub fn launch_api(
        topology: Topology,
        cross_node: CrossNode,
        init: impl FnOnce(&ApiServer),
    ) -> Self {
        let mut cluster = Self::build(topology, cross_node);
        cluster.serve_api(init);
        cluster.start_first_agents(false);
        cluster
    }

    /// Waits until every running agent's /healthz says 200.
    pub fn wait_healthy(&mut self) {
        let mut failure = None;
        for agent in self.agents.iter_mut().filter(|a| a.pid().is_some()) {
            if let Err(e) = agent.wait_healthy(Duration::from_secs(30)) {
                failure = Some(e);
                break;
            }
        }
        if let Some(e) = failure {
            panic!("{e:#}");
        }
    }

    /// /healthz status of each node's agent (None: no answer).
    pub fn healthz(&self) -> [Option<u16>; 2] {
        [1u8, 2].map(|node| agent::healthz_status(&self.lab.node_ns(node)))
    }

    /// The API server double in both nodes' netns, kubeconfigs for the
    /// agents, filled by `init`.
    fn serve_api(&mut self, init: impl FnOnce(&ApiServer)) {
        let binds = [1u8, 2]
            .map(|node| Bind::in_netns(&self.lab.node_ns(node), API_ADDR))
            .to_vec();
        let api = ApiServer::start(binds).expect("starting the API server double");
        for node in [1u8, 2] {
            let base = self.node_dir(node);
            std::fs::create_dir_all(&base).expect("node dir");
            std::fs::write(base.join("kubeconfig"), apiserver::kubeconfig(API_ADDR))
                .expect("writing the kubeconfig");
        }
        init(&api);
        self.api = Some(api);
    }

    /// The lab with backend servers in every `web-*` pod, no agents yet.
    fn build(topology: Topology, cross_node: CrossNode) -> Self {
        Self::build_with(topology, cross_node, false)
    }

    /// Like [`Cluster::start`] on a dual-stack lab: pods and nodes have IPv6
    /// addresses too (see [`LabSpec::ipv6`]).
    pub fn start_dual(
        topology: Topology,
        cross_node: CrossNode,
        initial: &[(&str, String)],
    ) -> Self {
        let mut cluster = Self::build_with(topology, cross_node, true);
        for (file, content) in initial {
            cluster.write_manifest(file, content);
        }
        cluster.start_first_agents(true);
        cluster
    }

    /// Like [`Cluster::start_dual`], each agent run with `args` as well, and
    /// `prepare` changing the lab (routes, addresses) before they start.
    pub fn start_dual_with(
        topology: Topology,
        cross_node: CrossNode,
        initial: &[(&str, String)],
        args: &[&str],
        prepare: impl FnOnce(&Lab),
    ) -> Self {
        let mut cluster = Self::build_with(topology, cross_node, true);
        cluster.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
        prepare(&cluster.lab);
        for (file, content) in initial {
            cluster.write_manifest(file, content);
        }
        cluster.start_first_agents(true);
        cluster
    }

    /// Routes `prefix` (IPv6) from the router to the nodes' IPv6 addresses
    /// (ECMP over both), as [`dataplane_lab::topology::LB_CIDR`] is for IPv4:
    /// load-balancer IPs and externalIPs reach the nodes.
    pub fn route_to_nodes6(&self, prefix: &str) {
        let (node1, node2) = (
            dataplane_lab::topology::node_ip6(1).to_string(),
            dataplane_lab::topology::node_ip6(2).to_string(),
        );
        netns::ip(&[
            "-n",
            &self.lab.router_ns(),
            "-6",
            "route",
            "add",
            prefix,
            "nexthop",
            "via",
            &node1,
            "nexthop",
            "via",
            &node2,
        ])
        .unwrap_or_else(|e| panic!("routing {prefix} to the nodes: {e:#}"));
    }

    fn build_with(topology: Topology, cross_node: CrossNode, ipv6: bool) -> Self {
        let spec = LabSpec {
            prefix: unique_prefix(""),
            topology,
            cross_node,
            pods: default_pods(),
            ipv6,
            ipv4: true,
        };
        let lab = Lab::build(spec).expect("building the lab");
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = Self {
            agents: Vec::new(),
            api: None,
            lab,
            dir,
            agent_bin: agent::agent_bin(),
            agent_args: Vec::new(),
        };
        for pod in cluster.lab.spec.pods.clone() {
            if pod.name.starts_with("web") {
                cluster.serve(&pod.name);
            }
        }
        cluster
    }

    fn start_first_agents(&mut self, wait_healthy: bool) {
        for node in [1u8, 2] {
            let base = self.node_dir(node);
            std::fs::create_dir_all(base.join("manifests")).expect("manifests dir");
            // Mounted here, in the test's mount namespace, as a node's
            // /sys/fs/bpf is: what the agent pins outlives the agent (whose
            // own mounts die with its `ip netns exec` mount namespace).
            let bpffs = base.join("bpf");
            std::fs::create_dir_all(&bpffs).expect("bpffs dir");
            let path = bpffs.to_str().expect("utf-8 temp path");
            netns::run("mount", &["-t", "bpf", "bpf", path]).expect("mounting the node's bpffs");
            let agent = self.start_agent(node, wait_healthy);
            self.agents.push(agent);
        }
    }

    /// The API server double (API mode only).
    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("a cluster started with start_api")
    }

    pub fn api_mut(&mut self) -> &mut ApiServer {
        self.api.as_mut().expect("a cluster started with start_api")
    }

    /// What a node's datapath holds, read from its pinned maps with
    /// `dataplane-agent inspect services -o json`: "SERVICE FRONTEND" (e.g.
    /// `default/web:http 10.96.0.10:80/TCP`) -> sorted backends.
    pub fn programmed(&self, node: u8) -> BTreeMap<String, Vec<String>> {
        let out = std::process::Command::new(agent::agent_bin())
            .args(["inspect", "services", "-o", "json", "--bpffs"])
            .arg(self.node_dir(node).join("bpf"))
            .output()
            .expect("running dataplane-agent inspect");
        assert!(
            out.status.success(),
            "inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("inspect's JSON");
        rows.iter()
            .map(|row| {
                let mut backends: Vec<String> = row["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b.as_str().map(str::to_owned))
                    .collect();
                backends.sort();
                (
                    format!(
                        "{} {}",
                        row["service"].as_str().unwrap_or("?"),
                        row["frontend"].as_str().unwrap_or("?")
                    ),
                    backends,
                )
            })
            .collect()
    }

    /// Waits until both nodes' maps hold `expected` (see [`Cluster::programmed`]).
    pub fn eventually_programmed(&self, expected: &BTreeMap<String, Vec<String>>) {
        for node in [1u8, 2] {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let now = self.programmed(node);
                if &now == expected {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "node{node}'s maps hold\n{now:#?}\nexpected\n{expected:#?}\n{}",
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn start_agent(&self, node: u8, wait_healthy: bool) -> Agent {
        let base = self.node_dir(node);
        let kubeconfig = base.join("kubeconfig");
        let manifests = base.join("manifests");
        let source = match self.api {
            Some(_) => agent::Source::Kubeconfig(&kubeconfig),
            None => agent::Source::Manifests(&manifests),
        };
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        let mut agent = Agent::launch_bin(
            &self.agent_bin,
            &self.lab.node_ns(node),
            &format!("node{node}"),
            source,
            &base.join("bpf"),
            &base.join(format!("agent-{}.log", self.agents.len())),
            &args,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        if wait_healthy {
            agent
                .wait_healthy(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        agent
    }

    /// Like [`Cluster::start`] with the agents of another binary (an
    /// earlier release); [`Cluster::upgrade_agents`] replaces them.
    pub fn start_with_agent_bin(
        bin: PathBuf,
        topology: Topology,
        cross_node: CrossNode,
        initial: &[(&str, String)],
    ) -> Self {
        let mut cluster = Self::build(topology, cross_node);
        cluster.agent_bin = bin;
        for (file, content) in initial {
            cluster.write_manifest(file, content);
        }
        cluster.start_first_agents(true);
        cluster
    }

    /// Stops the agents and starts this build's in their place, on the maps
    /// and links they left; waits until they are healthy.
    pub fn upgrade_agents(&mut self) {
        for status in self.stop_agents() {
            assert!(status.is_some_and(|s| s.success()), "agent exit {status:?}");
        }
        self.agent_bin = agent::agent_bin();
        self.restart_agents();
    }

    /// Flags for the agents started from now on (e.g. by
    /// [`Cluster::restart_agents`]).
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Starts the agents again after [`Cluster::stop_agents`]; waits until
    /// they are healthy. Their logs follow the previous ones in `logs()`.
    pub fn restart_agents(&mut self) {
        for node in [1u8, 2] {
            let agent = self.start_agent(node, true);
            self.agents.push(agent);
        }
    }

    /// `dataplane-agent cleanup` for a node's bpffs; its output.
    pub fn cleanup(&self, node: u8) -> String {
        let out = std::process::Command::new(dataplane_lab::agent::agent_bin())
            .arg("cleanup")
            .arg("--bpffs")
            .arg(self.node_dir(node).join("bpf"))
            .output()
            .expect("running dataplane-agent cleanup");
        assert!(
            out.status.success(),
            "cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pinned tcx links of a node.
    pub fn pinned_links(&self, node: u8) -> Vec<String> {
        let dir = self.node_dir(node).join("bpf/links");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Where a node's agent pins its maps (mounted in the test's mount
    /// namespace, so tools run from the test see them).
    pub fn bpffs(&self, node: u8) -> PathBuf {
        self.node_dir(node).join("bpf")
    }

    fn node_dir(&self, node: u8) -> PathBuf {
        self.dir.path().join(format!("node{node}"))
    }

    /// Starts the backend servers of a pod (threads living in its netns),
    /// listening when this returns.
    pub fn serve(&self, pod: &str) {
        traffic::spawn_server(&self.lab.pod_ns(pod), pod).expect("starting backend");
    }

    /// Adds a pod after the agents started (a new veth appears on its node).
    pub fn add_pod(&mut self, pod: PodSpec) {
        self.lab.add_pod(&pod).expect("adding pod");
    }

    pub fn pod(&self, name: &str) -> PodSpec {
        self.lab.pod(name).clone()
    }

    /// Writes the same manifest into every node's directory, as the API would
    /// show the same objects to every node.
    pub fn write_manifest(&self, file: &str, content: &str) {
        for node in [1u8, 2] {
            manifests::write(&self.node_dir(node).join("manifests"), file, content)
                .expect("writing manifest");
        }
    }

    pub fn remove_manifest(&self, file: &str) {
        for node in [1u8, 2] {
            manifests::remove(&self.node_dir(node).join("manifests"), file)
                .expect("removing manifest");
        }
    }

    /// SIGTERM to every running agent; their exit statuses.
    pub fn stop_agents(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.agents
            .iter_mut()
            .filter_map(|a| a.pid().map(|_| a.stop()))
            .collect()
    }

    /// The log of the latest agent of `node`.
    pub fn agent_log(&self, node: u8) -> String {
        self.agents
            .iter()
            .rev()
            .find(|a| a.node_ns == self.lab.node_ns(node))
            .map(Agent::log_text)
            .unwrap_or_default()
    }

    /// Every agent's log, oldest first.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                format!(
                    "--- agent in {} ({}) ---\n{}",
                    a.node_ns,
                    a.log.display(),
                    a.log_text()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn tcp(&self, from_pod: &str, to: SocketAddr) -> Outcome {
        if pod_clients_are_processes() {
            return self.pod_process(from_pod, "tcp", to);
        }
        in_netns(&self.lab.pod_ns(from_pod), move || traffic::tcp_request(to))
            .expect("client thread")
    }

    pub fn udp(&self, from_pod: &str, to: SocketAddr) -> Outcome {
        if pod_clients_are_processes() {
            return self.pod_process(from_pod, "udp", to);
        }
        in_netns(&self.lab.pod_ns(from_pod), move || traffic::udp_request(to))
            .expect("client thread")
    }

    /// One request from a `sockclient` process of pod `pod`, in its node's
    /// cgroup (where the socket hooks are).
    fn pod_process(&self, pod: &str, mode: &str, to: SocketAddr) -> Outcome {
        let node = self.lab.pod(pod).node;
        let cmd = sockclient_command(
            &self.lab.pod_ns(pod),
            &self.lab.node_cgroup(node),
            &[mode, &to.to_string()],
        );
        sockclient_outcomes(cmd)
            .pop()
            .unwrap_or_else(|| Outcome::Other("sockclient said nothing".into()))
    }

    /// A TCP connection from the outside client, asking the backend who it
    /// saw.
    pub fn outside_tcp(&self, to: SocketAddr) -> Result<traffic::Seen, Outcome> {
        in_netns(&self.lab.outside_ns(), move || traffic::tcp_seen(to)).expect("client thread")
    }

    /// A UDP datagram from the outside client, asking the backend who it
    /// saw.
    pub fn outside_udp(&self, to: SocketAddr) -> Result<traffic::Seen, Outcome> {
        in_netns(&self.lab.outside_ns(), move || traffic::udp_seen(to)).expect("client thread")
    }

    /// Runs `f` in the outside client's netns.
    pub fn outside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.lab.outside_ns(), f).expect("thread outside")
    }

    /// An HTTP GET of `http://ADDR/` from the outside client: status and
    /// body, None without an answer.
    pub fn outside_http_get(&self, to: SocketAddr) -> Option<(u16, String)> {
        self.outside(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let status = text.split_whitespace().nth(1)?.parse().ok()?;
            let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
            Some((status, body))
        })
    }

    /// A counter of a node's datapath, read from its pinned maps with
    /// `dataplane-agent inspect counters -o json` (0 when absent).
    pub fn counter(&self, node: u8, name: &str) -> u64 {
        let out = std::process::Command::new(agent::agent_bin())
            .args(["inspect", "counters", "-o", "json", "--bpffs"])
            .arg(self.bpffs(node))
            .output()
            .expect("running dataplane-agent inspect counters");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        find_counter(&v, name).unwrap_or(0)
    }

    /// Runs `f` in a pod's netns (for long-lived connections).
    pub fn in_pod<T: Send + 'static>(
        &self,
        pod: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_netns(&self.lab.pod_ns(pod), f).expect("thread in pod")
    }

    /// Retries `check` until it returns true, for changes the agent applies
    /// asynchronously; panics with `what` and the agent logs otherwise.
    pub fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check() {
            if Instant::now() > deadline {
                panic!("timed out waiting for: {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Backends that answered `n` new TCP connections from `from_pod`.
    pub fn tcp_backends(
        &self,
        from_pod: &str,
        to: SocketAddr,
        n: usize,
    ) -> std::collections::BTreeSet<String> {
        (0..n)
            .filter_map(|_| self.tcp(from_pod, to).backend().map(str::to_owned))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && self.api.is_some() {
            eprintln!("agent logs of the failed test:\n{}", self.logs());
        }
        self.agents.clear();
        for node in [1u8, 2] {
            if let Some(path) = self.node_dir(node).join("bpf").to_str() {
                // Lazy: whatever still holds a pinned object lets go of it.
                let _ = netns::run("umount", &["-l", path]);
            }
        }
    }
}

/// `DATAPLANE_POD_CLIENTS=process`: [`Cluster::tcp`] and [`Cluster::udp`]
/// run each request as a `sockclient` process in the pod's netns and its
/// node's cgroup, so pod clients go through the socket hooks. By default
/// they are threads of the test, outside the node cgroups: the tc path.
pub fn pod_clients_are_processes() -> bool {
    std::env::var("DATAPLANE_POD_CLIENTS").is_ok_and(|v| v == "process")
}

/// The `sockclient` binary built with these tests (next to `deps/`).
pub fn sockclient_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>")
        .join("sockclient")
}

/// `ip netns exec NS sockclient ARGS`, started inside `cgroup`.
pub fn sockclient_command(
    ns: &str,
    cgroup: &std::path::Path,
    args: &[&str],
) -> std::process::Command {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(sockclient_bin())
        .args(args);
    dataplane_lab::cgroup::spawn_in_cgroup(&mut cmd, cgroup).expect("client in the node's cgroup");
    cmd
}

/// Runs a `sockclient` to the end; the outcome of each of its requests.
pub fn sockclient_outcomes(mut cmd: std::process::Command) -> Vec<Outcome> {
    let out = cmd.output().expect("running sockclient");
    assert!(
        out.status.success(),
        "sockclient: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(parse_outcome)
        .collect()
}

/// A `sockclient` holding one connection (TCP) or connected socket (UDP)
/// open, making one request per [`HeldClient::request`]; killed on drop.
pub struct HeldClient {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl HeldClient {
    /// `sockclient MODE TO` in netns `ns` and `cgroup` (`mode` one of the
    /// holding modes: `tcp-hold`, `udp-hold`).
    pub fn open(ns: &str, cgroup: &std::path::Path, mode: &str, to: SocketAddr) -> Self {
        use std::process::Stdio;
        let mut cmd = sockclient_command(ns, cgroup, &[mode, &to.to_string()]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting sockclient");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    pub fn request(&mut self) -> Outcome {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin).expect("asking sockclient");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("sockclient's answer");
        parse_outcome(line.trim())
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cilium's "connected UDP sockets pinned to deleted backends", once
/// backend pod `gone` has left the service: `held` (a connected UDP socket
/// that reached it) no longer does, as the agent closed it and said so, and
/// `fresh` sockets reach the remaining backends.
pub fn assert_socket_to_removed_backend_closed(
    c: &Cluster,
    held: &mut HeldClient,
    gone: &str,
    fresh: impl FnOnce() -> Vec<Outcome>,
) {
    // The removed pod still runs and would answer a socket left aimed at it.
    c.eventually(
        "the held socket no longer reaches the removed backend",
        || held.request().backend() != Some(gone),
    );
    let after = held.request();
    assert!(
        matches!(after, Outcome::Other(_) | Outcome::Refused),
        "the held socket: {after:?}"
    );
    let fresh = fresh();
    assert!(
        fresh.iter().all(|s| s.backend().is_some_and(|b| b != gone)),
        "{fresh:?}\n{}",
        c.logs()
    );
    assert!(
        c.agent_log(1)
            .contains("closed 1 connected UDP sockets aimed at removed backends"),
        "{}",
        c.logs()
    );
}

/// An outcome as `sockclient` prints it.
pub fn parse_outcome(line: &str) -> Outcome {
    let mut words = line.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("answered"), Some(backend), Some(from)) => Outcome::Answered {
            backend: backend.to_owned(),
            from: from
                .parse()
                .unwrap_or_else(|_| panic!("address in {line:?}")),
        },
        (Some("refused"), None, None) => Outcome::Refused,
        (Some("reset"), None, None) => Outcome::Reset,
        (Some("timeout"), None, None) => Outcome::Timeout,
        _ => Outcome::Other(line.to_owned()),
    }
}

/// The `packets` of counter `name` in `inspect counters -o json` output.
fn find_counter(v: &serde_json::Value, name: &str) -> Option<u64> {
    v.as_array()?
        .iter()
        .find(|row| row["counter"] == name)
        .and_then(|row| row["packets"].as_u64())
}

/// A pod of the default lab, by name (for writing manifests before start).
pub fn lab_pod(name: &str) -> PodSpec {
    default_pods()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

pub fn http(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 80))
}

pub fn dns(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 53))
}

/// The `web` service backed by the given pods.
pub fn web(cluster_backends: &[&PodSpec]) -> String {
    manifests::web_manifest("web", WEB_IP, cluster_backends)
}

/// The web service's IPv6 cluster IP in the dual-stack tests.
pub const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The dual-stack `web` service (`WEB_IP`, `WEB_IP6`) as a NodePort on
/// `node_ports` (http, dns), policy Cluster, backed by `backends`.
pub fn dual_stack_web_node_port(node_ports: [u16; 2], backends: &[&str]) -> String {
    let service = manifests::exposed(
        manifests::with_cluster_ips(
            manifests::web_service("web", WEB_IP),
            &[WEB_IP.into(), WEB_IP6.into()],
        ),
        &Exposure {
            type_: Some("NodePort"),
            node_ports: node_ports.to_vec(),
            ..Default::default()
        },
    );
    manifests::manifest_per_family(&service, |family| {
        backends
            .iter()
            .map(|p| pod_endpoint_of(&lab_pod(p), family))
            .collect()
    })
}

/// Upstream "should preserve source pod IP for traffic thru service
/// cluster IP", for either family: each of `backends`, reached by the
/// `client` pod at `http_to` (TCP) and `dns_to` (UDP), sees the client's
/// own address `client_ip`.
pub fn assert_endpoints_see_the_client(
    c: &Cluster,
    client_ip: IpAddr,
    backends: &[&str],
    http_to: SocketAddr,
    dns_to: SocketAddr,
) {
    let want: BTreeSet<(String, IpAddr)> = backends
        .iter()
        .map(|b| ((*b).to_owned(), client_ip))
        .collect();
    for (proto, udp) in [("TCP", false), ("UDP", true)] {
        c.eventually(
            &format!("every endpoint sees the client's IP over {proto}"),
            || {
                let seen: BTreeSet<(String, IpAddr)> = (0..30)
                    .filter_map(|_| {
                        c.in_pod("client", move || {
                            if udp {
                                traffic::udp_seen(dns_to)
                            } else {
                                traffic::tcp_seen(http_to)
                            }
                        })
                        .ok()
                    })
                    .map(|s| (s.backend, s.client.ip()))
                    .collect();
                assert!(
                    seen.iter().all(|(_, ip)| *ip == client_ip),
                    "source rewritten: {seen:?}"
                );
                seen == want
            },
        );
    }
}
