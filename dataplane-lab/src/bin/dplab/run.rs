//! `dplab run` (`cargo xtask run`): the main job. Brings the lab up and shows requests
//! from a pod through the service IP, then leaves the lab to explore.

use std::{net::SocketAddr, process::Command};

use anyhow::Context as _;
use dataplane_lab::{
    cgroup,
    netns::in_netns,
    topology::{default_pods, node_ip, OUTSIDE_CLIENT_IP},
    traffic,
};

use crate::lab::{self, service_ips, UpOptions, LB_IP, NODE_PORTS, PREFIX};

pub fn run(options: UpOptions) -> anyhow::Result<()> {
    lab::up(&options)?;
    // The service's address of each family it has (its first for node1's
    // own requests below).
    let services: Vec<SocketAddr> = service_ips(options.ip_family)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 80))
        .collect();
    let service = services[0];
    // Without agents nothing translates the service IP: show the topology
    // itself, the client reaching each backend pod directly.
    let targets: Vec<(String, SocketAddr)> = if options.no_agent {
        default_pods()
            .into_iter()
            .filter(|p| p.name.starts_with("web"))
            .map(|p| {
                let to = SocketAddr::from((p.ip(), traffic::TCP_PORT));
                (format!("pod {} {to}", p.name), to)
            })
            .collect()
    } else {
        // Six requests, over each family in turn.
        (0..6)
            .map(|i| services[i % services.len()])
            .map(|to| (format!("service default/web {to}"), to))
            .collect()
    };
    println!("\nclient (10.244.1.10 on node1):");
    let mut failed = 0;
    for (i, (what, to)) in targets.into_iter().enumerate() {
        let seen = in_netns(&format!("{PREFIX}client"), move || traffic::tcp_request(to))?;
        match seen {
            traffic::Outcome::Answered { .. } => {
                println!("  request {} to {what}: {}", i + 1, outcome_text(&seen))
            }
            other => {
                failed += 1;
                println!("  request {} to {what}: {other:?}", i + 1)
            }
        }
    }
    // Host processes go through the socket hooks, IPv4 only so far.
    if !options.no_agent && service.is_ipv4() {
        println!("\nnode1 itself (a host-network process in node1's cgroup):");
        for i in 0..3 {
            let seen = host_request(service)?;
            if !seen.starts_with("answered") {
                failed += 1;
            }
            println!(
                "  request {} to service default/web {service}: {seen}",
                i + 1
            );
        }
    }
    // The outside requests go to IPv4 NodePorts and load-balancer IPs,
    // which an IPv6-only cluster's nodes do not have.
    if !options.no_agent && options.ip_family != lab::IpFamily::Ipv6 {
        failed += outside_requests();
    }
    let dir = lab::lab_dir();
    let dir = dir.display();
    let cgroup_dir = cgroup::node_cgroup(&format!("{PREFIX}node1"));
    let cgroup_dir = cgroup_dir.display();
    println!(
        "
The lab is running. Explore it:
  ip netns exec {PREFIX}client curl -s http://10.96.0.10/       # through the service
  ip netns exec {PREFIX}client curl -s 'http://[fd00:10:96::10]/'  # over IPv6 (--ip-family dual)
  ip netns exec {PREFIX}outside curl -s http://192.168.100.2:30080/   # a NodePort from outside
  ip netns exec {PREFIX}outside curl -s http://198.51.100.10/     # the load-balancer IP
  ip netns exec {PREFIX}node1 ip -br addr; ip netns exec {PREFIX}node1 ip route
  target/release/dataplane-agent inspect services  --bpffs {dir}/node1/bpf
  target/release/dataplane-agent inspect conntrack --bpffs {dir}/node1/bpf
  ip netns exec {PREFIX}node1 target/release/dataplane-agent inspect interfaces
  bpftool map dump pinned {dir}/node1/bpf/SERVICES
  edit {dir}/node1/manifests/web.yaml (and node2's), watch {dir}/node1/agent.log
  target/release/dataplane-agent inspect sock-revnat --bpffs {dir}/node1/bpf
  bpftool cgroup show {cgroup_dir}
Tear it down with: cargo xtask lab down"
    );
    if failed > 0 {
        anyhow::bail!("{failed} request(s) failed; agent logs in {dir}/node*/agent.log");
    }
    Ok(())
}

/// A request from a node1 process: started in node1's netns and cgroup, so
/// node1's socket hooks translate it (no tc program is on its way).
fn host_request(to: SocketAddr) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &format!("{PREFIX}node1")])
        .arg(std::env::current_exe().context("dplab's path")?)
        .arg("request")
        .arg(to.to_string());
    cgroup::spawn_in_cgroup(&mut cmd, &cgroup::node_cgroup(&format!("{PREFIX}node1")))?;
    let out = cmd.output().context("running a node1 process")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// An outcome as `run` prints it.
pub fn outcome_text(seen: &traffic::Outcome) -> String {
    match seen {
        traffic::Outcome::Answered { backend, from } => {
            format!("answered by {backend:<6} (reply from {from})")
        }
        other => format!("{other:?}"),
    }
}

/// Requests from the outside client to a NodePort on each node and to the
/// load-balancer IP, with the backend that answered and the client address
/// it saw (the client's own when the backend is on the node that took the
/// connection, that node's when it was SNATed to another). Returns how many
/// failed.
fn outside_requests() -> usize {
    let mut targets: Vec<(String, SocketAddr)> = Vec::new();
    for node in [1u8, 2] {
        for _ in 0..3 {
            targets.push((
                format!("NodePort on node{node}"),
                SocketAddr::from((node_ip(node), NODE_PORTS[0])),
            ));
        }
    }
    for _ in 0..3 {
        targets.push(("load-balancer IP".into(), SocketAddr::from((LB_IP, 80))));
    }
    println!("\noutside client ({OUTSIDE_CLIENT_IP}, behind the router):");
    let mut failed = 0;
    for (what, to) in targets {
        let seen = in_netns(&format!("{PREFIX}outside"), move || traffic::tcp_seen(to));
        match seen {
            Ok(Ok(seen)) => println!(
                "  {what} {to}: answered by {:<6} which saw the client as {} (reply from {})",
                seen.backend, seen.client, seen.from
            ),
            Ok(Err(outcome)) => {
                failed += 1;
                println!("  {what} {to}: {outcome:?}");
            }
            Err(e) => {
                failed += 1;
                println!("  {what} {to}: {e:#}");
            }
        }
    }
    failed
}
