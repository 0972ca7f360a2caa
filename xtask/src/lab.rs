//! `cargo xtask lab up|down|walkthrough`: builds what the lab runs, then
//! hands over to `dplab` (dataplane-lab's binary), which keeps xtask free of
//! the lab's dependencies.

use crate::{
    cargo::{build_lab_server, build_release, dplab, status},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Build the lab (replacing a running one) and start the agents. With
    /// DATAPLANE_AGENT_BIN set, that agent is used instead of building one.
    Up(UpOptions),
    /// Stop the lab's processes and remove its namespaces.
    Down,
    /// With the lab up: follow one request from pod `client` (node1) to a
    /// service backed by pod `web-c` (node2) and back, hop by hop, as
    /// `dataplane-agent monitor` reports it.
    Walkthrough,
}

#[path = "../../dataplane-lab/src/bin/dplab/up_options.rs"]
mod up_options;
pub use up_options::UpOptions;

impl UpOptions {
    /// The same options as `dplab` arguments.
    pub fn args(&self) -> Vec<String> {
        let name = |v: Option<clap::builder::PossibleValue>| {
            v.expect("no skipped variants").get_name().to_owned()
        };
        let mut args = vec![
            "--overlay".into(),
            name(clap::ValueEnum::to_possible_value(&self.overlay)),
            "--topology".into(),
            name(clap::ValueEnum::to_possible_value(&self.topology)),
            "--ip-family".into(),
            name(clap::ValueEnum::to_possible_value(&self.ip_family)),
        ];
        if self.no_agent {
            args.push("--no-agent".into());
        }
        args
    }

    /// Installs and builds what the lab runs: `lab-server`, and the agent
    /// unless there is none or a prebuilt one (DATAPLANE_AGENT_BIN).
    pub fn prepare(&self) -> anyhow::Result<()> {
        setup::run()?;
        if self.no_agent || std::env::var_os("DATAPLANE_AGENT_BIN").is_some() {
            build_lab_server()
        } else {
            build_release()
        }
    }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    match options.action {
        Action::Up(up_options) => {
            up_options.prepare()?;
            status(dplab("up", &up_options.args()))
        }
        Action::Down => status(dplab("down", &[])),
        Action::Walkthrough => status(dplab("walkthrough", &[])),
    }
}
