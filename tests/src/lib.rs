//! Harness for the privileged integration tests: a two-node lab with agents
//! and backend servers, and clients that report what they saw.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use dataplane_lab::{
    agent::Agent,
    manifests,
    netns::in_netns,
    topology::{default_pods, unique_prefix},
    traffic::{self, Outcome},
    CrossNode, Lab, LabSpec, PodSpec, Topology,
};

pub use dataplane_lab::traffic::Outcome as Seen;

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

pub use dataplane_lab::privileged;

/// A lab with agents on both nodes. Fields drop in order: agents stop before
/// the namespaces go.
pub struct Cluster {
    agents: Vec<Agent>,
    pub lab: Lab,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Builds the lab, starts backend servers in every `web-*` pod, writes
    /// `manifests` (file name, content) for both nodes and starts the agents.
    pub fn start(topology: Topology, cross_node: CrossNode, initial: &[(&str, String)]) -> Self {
        let spec = LabSpec {
            prefix: unique_prefix(""),
            topology,
            cross_node,
            pods: default_pods(),
        };
        let lab = Lab::build(spec).expect("building the lab");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = Self {
            agents: Vec::new(),
            lab,
            dir,
        };
        for pod in cluster.lab.spec.pods.clone() {
            if pod.name.starts_with("web") {
                cluster.serve(&pod.name);
            }
        }
        for (file, content) in initial {
            cluster.write_manifest(file, content);
        }
        for node in [1u8, 2] {
            let base = cluster.node_dir(node);
            std::fs::create_dir_all(base.join("manifests")).expect("manifests dir");
            let agent = Agent::start(
                &cluster.lab.node_ns(node),
                &format!("node{node}"),
                &base.join("manifests"),
                &base.join("bpf"),
                &base.join("agent.log"),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
            cluster.agents.push(agent);
        }
        cluster
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

    /// SIGTERM to every agent; their exit statuses.
    pub fn stop_agents(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.agents.iter_mut().map(Agent::stop).collect()
    }

    pub fn agent_log(&self, node: u8) -> String {
        self.agents[usize::from(node - 1)].log_text()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- node1 agent ---\n{}\n--- node2 agent ---\n{}",
            self.agent_log(1),
            self.agent_log(2)
        )
    }

    pub fn tcp(&self, from_pod: &str, to: SocketAddr) -> Outcome {
        in_netns(&self.lab.pod_ns(from_pod), move || traffic::tcp_request(to))
            .expect("client thread")
    }

    pub fn udp(&self, from_pod: &str, to: SocketAddr) -> Outcome {
        in_netns(&self.lab.pod_ns(from_pod), move || traffic::udp_request(to))
            .expect("client thread")
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
    manifests::web_service("web", WEB_IP, cluster_backends)
}
