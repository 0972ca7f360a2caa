//! `dplab walkthrough` (`cargo xtask lab walkthrough`): the talk's journey of one packet, from
//! pod A on node1 to pod C on node2 through a service and back, printed hop
//! by hop with what `dataplane-agent monitor` reported at each hook.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use dataplane_lab::{
    agent::agent_bin, manifests, netns::in_netns, topology::default_pods, traffic,
};
use serde_json::Value;

use crate::lab::{lab_dir, PREFIX};

/// A service backed only by web-c, on the other node than the client.
const JOURNEY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT_IP: &str = "10.244.1.10";

struct Monitor {
    node: u8,
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Monitor {
    fn start(node: u8) -> anyhow::Result<Self> {
        // In the node's network namespace, so interface indexes name its
        // interfaces; the lab's bpffs is mounted in the host's mount
        // namespace, which `ip netns exec` inherits.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &format!("{PREFIX}node{node}")])
            .arg(agent_bin())
            .arg("monitor")
            .arg("--bpffs")
            .arg(lab_dir().join(format!("node{node}/bpf")))
            .args(["--ip", CLIENT_IP, "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dataplane-agent monitor")?;
        let mut ready = String::new();
        BufReader::new(child.stderr.take().context("monitor stderr")?).read_line(&mut ready)?;
        if !ready.contains("tracing") {
            bail!("monitor on node{node} did not start: {ready}");
        }
        let stdout = child.stdout.take().context("monitor stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self {
            node,
            child,
            events,
        })
    }

    /// Stops the monitor (it turns tracing off) and returns its events.
    fn finish(mut self) -> Vec<(u8, Value)> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        self.events.try_iter().map(|e| (self.node, e)).collect()
    }
}

fn explain(decision: &str, hook: &str) -> &'static str {
    match (decision, hook) {
        ("new_flow", _) => "service IP:port found; a backend chosen; conntrack entry created; DNAT to the backend. From here the kernel routes it as plain pod-to-pod traffic.",
        ("affinity_hit", _) => "as new_flow, with the backend the client's ClientIP affinity remembers.",
        ("established", _) => "conntrack hit: the same backend as the flow's first packet; DNAT.",
        ("reply_translated", "to-pod") => "the backend's answer, matched by its reply tuple in conntrack: the source becomes the service IP:port again, so the client sees the address it dialled.",
        ("reply_translated", _) => "hairpin reply translated on the way out of the pod.",
        ("reject_no_endpoints", _) => "no endpoints: refused at once (TCP RST or ICMP port unreachable).",
        _ => "",
    }
}

pub fn run() -> anyhow::Result<()> {
    if !dataplane_lab::netns::list()
        .iter()
        .any(|n| n == &format!("{PREFIX}node1"))
    {
        bail!("the lab is not up: run `cargo xtask lab up` first");
    }
    let web_c = default_pods()
        .into_iter()
        .find(|p| p.name == "web-c")
        .context("pod web-c")?;
    let manifest = manifests::web_manifest("journey", JOURNEY_IP, &[&web_c]);
    for node in [1u8, 2] {
        manifests::write(
            &lab_dir().join(format!("node{node}/manifests")),
            "journey.yaml",
            &manifest,
        )?;
    }
    let service = SocketAddr::from((JOURNEY_IP, 80));
    let client_ns = format!("{PREFIX}client");
    // The agents pick the new service up from their manifest directories.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = in_netns(&client_ns, move || traffic::tcp_request(service))?;
        if seen.backend() == Some("web-c") {
            break;
        }
        if Instant::now() > deadline {
            bail!("service default/journey {service} not answering from web-c: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    let monitors = [Monitor::start(1)?, Monitor::start(2)?];
    let seen = in_netns(&client_ns, move || traffic::tcp_request(service))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut events: Vec<(u8, Value)> = monitors.into_iter().flat_map(Monitor::finish).collect();
    events.sort_by_key(|(_, e)| e["ts_ns"].as_u64().unwrap_or(0));

    println!(
        "\nOne request from pod `client` ({CLIENT_IP}, node1) to service default/journey {service},\n\
         backed by pod `web-c` ({}, node2). Answered: {seen:?}\n",
        web_c.ip()
    );
    println!(
        "  1. client -> its eth0 -> veth pair -> `vethclient` on node1 (the pod's default route)."
    );
    let mut step = 2;
    let mut last_hook = String::new();
    let mut explained = std::collections::BTreeSet::new();
    for (node, e) in &events {
        let decision = e["decision"].as_str().unwrap_or("?");
        let hook = e["hook"].as_str().unwrap_or("?");
        if hook == "to-pod"
            && last_hook != "to-pod"
            && !explained.contains(&("reply_translated".to_owned(), "to-pod".to_owned()))
        {
            println!(
                "  {step}. web-c answers; node2 routes the reply back (direct route or VXLAN) to node1, \
                 whose cbr0 bridge hands it to `vethclient`:"
            );
            step += 1;
        }
        println!(
            "  {step}. node{node} {hook} on {}: {} {}  {decision}  -> {}",
            e["interface"].as_str().unwrap_or("?"),
            e["proto"].as_str().unwrap_or("?"),
            e["before"].as_str().unwrap_or("?"),
            e["after"].as_str().unwrap_or("?"),
        );
        if explained.insert((decision.to_owned(), hook.to_owned())) {
            println!("       {}", explain(decision, hook));
        }
        if decision == "new_flow" {
            println!(
                "       The packet, now to {}, crosses cbr0 -> node1's eth0 -> node2 -> cbr0 -> `vethweb-c` -> web-c.\n       \
                 node2's datapath has nothing to do for it: no event there.",
                web_c.ip()
            );
        }
        last_hook = hook.to_owned();
        step += 1;
    }
    if events.is_empty() {
        println!("  (monitor reported no events: is the agent from this tree running in the lab?)");
    }
    println!(
        "\nLive: `ip netns exec {PREFIX}node1 {} monitor --bpffs {} --service default/journey`",
        agent_bin().display(),
        lab_dir().join("node1/bpf").display()
    );
    Ok(())
}
