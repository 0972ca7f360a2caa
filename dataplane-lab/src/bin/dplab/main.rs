//! `dplab`: the two-node lab's commands. `cargo xtask lab up|down|walkthrough`
//! and `cargo xtask run` build the agent and `lab-server`, then run these, so
//! that xtask itself does not depend on this crate (and k8s-openapi).

mod lab;
mod run;
mod up_options;
mod walkthrough;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The eBPF service dataplane's two-node lab in network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab (replacing a running one) and start the agents
    /// (DATAPLANE_AGENT_BIN, or target/release/dataplane-agent).
    Up(lab::UpOptions),
    /// Stop the lab's processes and remove its namespaces.
    Down,
    /// With the lab up: follow one request from pod `client` (node1) to a
    /// service backed by pod `web-c` (node2) and back, hop by hop, as
    /// `dataplane-agent monitor` reports it.
    Walkthrough,
    /// Bring the lab up and show requests through a service IP.
    Run(lab::UpOptions),
    /// One TCP request to ADDR, its outcome on stdout: what `run` starts
    /// as a node (host-network) process.
    #[command(hide = true)]
    Request { addr: std::net::SocketAddr },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(options) => lab::up(&options),
        Command::Down => lab::down(),
        Command::Walkthrough => walkthrough::run(),
        Command::Run(options) => run::run(options),
        Command::Request { addr } => {
            println!(
                "{}",
                run::outcome_text(&dataplane_lab::traffic::tcp_request(addr))
            );
            Ok(())
        }
    }
}
