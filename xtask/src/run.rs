//! `cargo xtask run`: the main job. Brings the lab up and shows requests
//! from a pod through the service IP, then leaves the lab to explore.

use std::net::SocketAddr;

use dataplane_lab::{netns::in_netns, traffic};

use crate::lab::{self, UpOptions, PREFIX};

pub fn run(options: UpOptions) -> anyhow::Result<()> {
    lab::up(&options)?;
    let service = SocketAddr::from(([10, 96, 0, 10], 80));
    println!("\nclient (10.244.1.10 on node1) -> service default/web {service}:");
    for i in 1..=6 {
        let seen = in_netns(&format!("{PREFIX}client"), move || {
            traffic::tcp_request(service)
        })?;
        match seen {
            traffic::Outcome::Answered { backend, from } => {
                println!("  request {i}: answered by {backend:<6} (reply from {from})")
            }
            other => println!("  request {i}: {other:?}"),
        }
    }
    let lab_dir = lab::lab_dir();
    println!(
        "
The lab is running. Explore it:
  ip netns exec {PREFIX}client curl -s http://10.96.0.10/     # through the service
  target/release/dataplane-agent inspect services --bpffs {dir}/node1/bpf
  target/release/dataplane-agent inspect conntrack --bpffs {dir}/node1/bpf
  ip netns exec {PREFIX}node1 target/release/dataplane-agent inspect interfaces
  bpftool map dump pinned {dir}/node1/bpf/SERVICES
  edit {dir}/node1/manifests/web.yaml (and node2's) and watch {dir}/node1/agent.log
Tear it down with: cargo xtask lab down",
        dir = lab_dir.display()
    );
    Ok(())
}
