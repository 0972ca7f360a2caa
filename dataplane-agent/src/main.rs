//! dataplane-agent: keeps the eBPF service dataplane of one node in sync with
//! the cluster's Services and EndpointSlices.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use dataplane_agent::{
    node::datapath,
    operator::{inspect, monitor},
    run,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "eBPF service dataplane agent (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the datapath on this node and keep it in sync.
    Run(Box<run::Options>),
    /// Show what the datapath holds, read from the pinned maps.
    Inspect(inspect::Options),
    /// Follow packets through the datapath live: each decision (new flow,
    /// established, reply translated, reject or drop reason) with the tuples
    /// before and after translation. Tracing is on only while it runs.
    Monitor(monitor::Options),
    /// Detach the programs from every pod interface and remove the pinned
    /// maps (conntrack included): what `kube-proxy --cleanup` is to its
    /// rules. Run it after stopping the agent for good.
    Cleanup {
        /// Where the agent pinned its maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        bpffs: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(options) => run::run(*options),
        Command::Inspect(options) => inspect::run(options),
        Command::Monitor(options) => monitor::run(options),
        Command::Cleanup { bpffs } => {
            let removed = datapath::cleanup(&bpffs)?;
            println!(
                "removed {} pinned links and maps under {}",
                removed.len(),
                bpffs.display()
            );
            Ok(())
        }
    }
}
