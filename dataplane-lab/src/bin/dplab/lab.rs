//! `dplab up|down` (`cargo xtask lab up|down`): the talk's two-node cluster
//! in network namespaces, with one agent per node, left running to explore.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use dataplane_lab::{
    agent::Agent, manifests, netns, topology::default_pods, traffic, CrossNode, Lab, LabSpec,
    Topology,
};
use nix::mount::{umount2, MntFlags};

/// The workspace root, whose target/ holds the lab's files and binaries.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("dataplane-lab lives in the workspace")
}

fn lab_server_binary() -> PathBuf {
    workspace_root().join("target/release/lab-server")
}

pub use crate::up_options::{IpFamily, Overlay, PodNetwork, UpOptions};

/// The web service's IPv4 and IPv6 cluster IPs.
pub const SERVICE_IP: [u8; 4] = [10, 96, 0, 10];
pub const SERVICE_IP6: &str = "fd00:10:96::10";

/// The web service's cluster IPs for `family`, the primary first.
pub fn service_ips(family: IpFamily) -> Vec<std::net::IpAddr> {
    let v4 = std::net::IpAddr::from(SERVICE_IP);
    let v6: std::net::IpAddr = SERVICE_IP6.parse().expect("an IPv6 address");
    match family {
        IpFamily::Ipv4 => vec![v4],
        IpFamily::Dual => vec![v4, v6],
        IpFamily::Ipv6 => vec![v6],
    }
}

/// Fixed prefix of the lab's namespaces (tests use unique ones).
pub const PREFIX: &str = "dplab-";

/// Manifests, agent logs, pinned maps and pids of the running lab.
pub fn lab_dir() -> PathBuf {
    workspace_root().join("target/lab")
}

fn pid_file() -> PathBuf {
    lab_dir().join("pids")
}

fn node_dir(node: u8) -> PathBuf {
    lab_dir().join(format!("node{node}"))
}

/// Brings the lab up, replacing a running one.
pub fn up(options: &UpOptions) -> anyhow::Result<()> {
    // The agent (dataplane_lab::agent::agent_bin) and lab-server are built
    // by xtask beforehand.
    down()?;
    let spec = LabSpec {
        prefix: PREFIX.into(),
        topology: match options.topology {
            PodNetwork::Bridge => Topology::Bridge,
            PodNetwork::Routed => Topology::Routed,
        },
        cross_node: match options.overlay {
            Overlay::Direct => CrossNode::Direct,
            Overlay::Vxlan => CrossNode::Vxlan,
        },
        pods: default_pods(),
        ipv6: options.ip_family != IpFamily::Ipv4,
        ipv4: options.ip_family != IpFamily::Ipv6,
    };
    // Until `keep`, an error drops the lab: its processes and namespaces go.
    let lab = Lab::build(spec).context("building the lab")?;
    std::fs::create_dir_all(lab_dir())?;
    let mut pids = Vec::new();

    let web: Vec<_> = lab
        .spec
        .pods
        .iter()
        .filter(|p| p.name.starts_with("web"))
        .collect();
    for pod in &web {
        pids.push(start_server(&lab.pod_ns(&pod.name), &pod.name)?);
    }
    for pod in &web {
        traffic::wait_listening(&lab.pod_ns(&pod.name), Duration::from_secs(10))?;
    }

    // The web service is a LoadBalancer: its cluster IP for the pods,
    // NodePorts on both nodes and a load-balancer IP the router sends to
    // the nodes, for the outside client.
    // With IPv6 it has a cluster IP (and an EndpointSlice) per family; the
    // external frontends are served on IPv4, so an IPv6-only cluster's web
    // service is a ClusterIP one.
    let web_service = manifests::web_service("web", SERVICE_IP.into());
    let web_service = if options.ip_family == IpFamily::Ipv6 {
        web_service
    } else {
        manifests::exposed(web_service, &lab_exposure())
    };
    let service = manifests::with_cluster_ips(web_service, &service_ips(options.ip_family));
    let sample = manifests::manifest_per_family(&service, |family| {
        web.iter()
            .map(|p| manifests::pod_endpoint_of(p, family))
            .collect()
    });
    for node in [1u8, 2] {
        let dir = node_dir(node);
        // Every node's agent sees the same objects, as from the API server.
        manifests::write(&dir.join("manifests"), "web.yaml", &sample)?;
        if options.no_agent {
            continue;
        }
        // Mounted here, in the host's mount namespace, so `inspect` from the
        // host sees the maps the agent pins inside `ip netns exec`.
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs)?;
        netns::run("mount", &["-t", "bpf", "bpf", path_str(&bpffs)?])?;
        let agent = Agent::start_detached(
            &lab.node_ns(node),
            &format!("node{node}"),
            &dir.join("manifests"),
            &bpffs,
            &dir.join("agent.log"),
            &agent_args(),
        )?;
        pids.extend(agent.pid());
        agent.detach();
    }
    std::fs::write(
        pid_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    lab.keep();
    eprintln!(
        "lab up: nodes {PREFIX}node1 {PREFIX}node2, pods {PREFIX}client {PREFIX}web-a \
         {PREFIX}web-b {PREFIX}web-c{}; files in {}",
        if options.no_agent { " (no agents)" } else { "" },
        lab_dir().display()
    );
    Ok(())
}

/// The lab agents' flags beyond the node's own. No `--ip-families`: each
/// agent proxies the families its node has addresses of (an IPv6-only
/// cluster's nodes have no IPv4 address).
pub fn agent_args() -> Vec<&'static str> {
    // The nodes' uplinks are veths: generic XDP (native XDP_TX on a veth
    // needs NAPI on its peer, the router's bridge port).
    vec!["--xdp-mode", "generic"]
}

/// NodePorts of the lab's web service (http, dns).
pub const NODE_PORTS: [u16; 2] = [30080, 30053];
/// The lab's load-balancer IP (routed to both nodes by the router).
pub const LB_IP: [u8; 4] = [198, 51, 100, 10];

fn lab_exposure() -> manifests::Exposure {
    manifests::Exposure {
        type_: Some("LoadBalancer"),
        node_ports: NODE_PORTS.to_vec(),
        load_balancer_ips: vec![LB_IP.into()],
        ..Default::default()
    }
}

/// A backend server in `ns`, in a process group of its own so that it
/// outlives dplab; output goes to target/lab/NAME.log.
fn start_server(ns: &str, name: &str) -> anyhow::Result<u32> {
    let log = std::fs::File::create(lab_dir().join(format!("{name}.log")))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(lab_server_binary())
        .arg(name)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the server in {ns}"))?;
    Ok(child.id())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Stops the lab's processes (those in its namespaces, and any left in the
/// pid file), unmounts its bpffs and removes its namespaces.
pub fn down() -> anyhow::Result<()> {
    let removed = Lab::down_by_prefix(PREFIX)?;
    if let Ok(pids) = std::fs::read_to_string(pid_file()) {
        // Normally already gone with their namespaces; only ours, by pid.
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if is_lab_process(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        std::fs::remove_file(pid_file())?;
    }
    for node in [1u8, 2] {
        // Not mounted after `--no-agent` or a second `down`: nothing to do.
        let _ = umount2(&node_dir(node).join("bpf"), MntFlags::MNT_DETACH);
    }
    if removed > 0 {
        eprintln!("lab down: removed {removed} namespaces");
    }
    Ok(())
}

/// Whether `pid` still runs one of the lab's binaries (pids get reused).
fn is_lab_process(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n == "dataplane-agent" || n == "lab-server")
    })
}
