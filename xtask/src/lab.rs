//! `cargo xtask lab up|down`: the talk's two-node cluster in network
//! namespaces, with one agent per node, left running to explore.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use dataplane_lab::{
    agent::Agent, manifests, topology::default_pods, CrossNode, Lab, LabSpec, Topology,
};
use nix::{
    mount::{umount2, MntFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::cargo::{build_release, workspace_root};

pub const PREFIX: &str = "dplab-";

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Build the lab (replacing a running one) and start the agents.
    Up(UpOptions),
    /// Stop the lab's processes and remove its namespaces.
    Down,
}

#[derive(clap::Args, Clone)]
pub struct UpOptions {
    /// How traffic crosses between the nodes.
    #[arg(long, value_enum, default_value = "direct")]
    pub overlay: Overlay,
    /// How pods attach to their node.
    #[arg(long, value_enum, default_value = "bridge")]
    pub topology: PodNetwork,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum Overlay {
    /// Direct routes between the nodes.
    Direct,
    /// A flannel-like VXLAN overlay.
    Vxlan,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum PodNetwork {
    /// cbr0 bridge per node (the talk's layout).
    Bridge,
    /// Routed /32 pods with proxy ARP (Calico's layout).
    Routed,
}

pub fn lab_dir() -> PathBuf {
    workspace_root().join("target/lab")
}

fn pid_file() -> PathBuf {
    lab_dir().join("pids")
}

pub fn run(options: Options) -> anyhow::Result<()> {
    match options.action {
        Action::Up(up_options) => up(&up_options),
        Action::Down => down(),
    }
}

/// Brings the lab up; returns it described for the user.
pub fn up(options: &UpOptions) -> anyhow::Result<()> {
    crate::setup::run()?;
    build_release()?;
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
    };
    let lab = Lab::build(spec).context("building the lab")?;
    std::fs::create_dir_all(lab_dir())?;
    let mut pids = Vec::new();

    let server = workspace_root().join("target/release/lab-server");
    for pod in lab.spec.pods.iter().filter(|p| p.name.starts_with("web")) {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.pod_ns(&pod.name)])
            .arg(&server)
            .arg(&pod.name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the server in {}", pod.name))?;
        pids.push(child.id());
    }

    let web: Vec<_> = lab
        .spec
        .pods
        .iter()
        .filter(|p| p.name.starts_with("web"))
        .collect();
    let sample = manifests::web_service("web", "10.96.0.10".parse()?, &web);
    for node in [1u8, 2] {
        let dir = lab_dir().join(format!("node{node}"));
        manifests::write(&dir.join("manifests"), "web.yaml", &sample)?;
        // Mounted here, in the host's mount namespace, so `inspect` from the
        // host sees the maps the agent pins inside `ip netns exec`.
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs)?;
        dataplane_lab::netns::run(
            "mount",
            &["-t", "bpf", "bpf", bpffs.to_str().context("path")?],
        )?;
        let agent = Agent::start(
            &lab.node_ns(node),
            &format!("node{node}"),
            &dir.join("manifests"),
            &bpffs,
            &dir.join("agent.log"),
        )?;
        pids.extend(agent.pid());
        agent.detach();
    }
    std::fs::write(
        pid_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    lab.keep();
    eprintln!("lab up: namespaces {PREFIX}node1, {PREFIX}node2, {PREFIX}client, {PREFIX}web-a, {PREFIX}web-b, {PREFIX}web-c");
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    if let Ok(pids) = std::fs::read_to_string(pid_file()) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::remove_file(pid_file())?;
    }
    for node in [1u8, 2] {
        let _ = umount2(
            &lab_dir().join(format!("node{node}/bpf")),
            MntFlags::MNT_DETACH,
        );
    }
    let removed = Lab::down_by_prefix(PREFIX)?;
    if removed > 0 {
        eprintln!("lab down: removed {removed} namespaces");
    }
    Ok(())
}
