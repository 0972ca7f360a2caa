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
    netns::{self, in_netns},
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
            // Mounted here, in the test's mount namespace, as a node's
            // /sys/fs/bpf is: what the agent pins outlives the agent (whose
            // own mounts die with its `ip netns exec` mount namespace).
            let bpffs = base.join("bpf");
            std::fs::create_dir_all(&bpffs).expect("bpffs dir");
            let path = bpffs.to_str().expect("utf-8 temp path");
            netns::run("mount", &["-t", "bpf", "bpf", path]).expect("mounting the node's bpffs");
            let agent = cluster.start_agent(node);
            cluster.agents.push(agent);
        }
        cluster
    }

    fn start_agent(&self, node: u8) -> Agent {
        let base = self.node_dir(node);
        Agent::start(
            &self.lab.node_ns(node),
            &format!("node{node}"),
            &base.join("manifests"),
            &base.join("bpf"),
            &base.join(format!("agent-{}.log", self.agents.len())),
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts the agents again after [`Cluster::stop_agents`]; waits until
    /// they are healthy. Their logs follow the previous ones in `logs()`.
    pub fn restart_agents(&mut self) {
        for node in [1u8, 2] {
            let agent = self.start_agent(node);
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for node in [1u8, 2] {
            if let Some(path) = self.node_dir(node).join("bpf").to_str() {
                // Lazy: whatever still holds a pinned object lets go of it.
                let _ = netns::run("umount", &["-l", path]);
            }
        }
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
