//! `cargo xtask test`: the README's test command, and what CI runs.

use crate::{
    cargo::{agent_binary, build_release, cargo, status},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    setup::run()?;
    build_release()?;
    let mut cmd = cargo(&["test", "--workspace", "--exclude", "dataplane-ebpf"]);
    cmd.args(&options.cargo_args);
    // The integration tests start this binary in the lab's node namespaces.
    cmd.env("DATAPLANE_AGENT_BIN", agent_binary());
    status(cmd)
}
