//! `cargo xtask test`: the README's test command, and what CI runs.

use crate::{
    cargo::{agent_binary, build_release, cargo, status},
    previous_release, setup,
};

/// Tests run at once per test binary by default: each integration test
/// starts a lab with two agents, so a small machine stays responsive.
const MAX_TEST_THREADS: usize = 4;

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test`, e.g. a test name filter and
    /// `-- --nocapture`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    setup::run()?;
    build_release()?;
    let mut cmd = cargo(&["test", "--workspace", "--exclude", "dataplane-ebpf"]);
    cmd.args(&options.cargo_args);
    // The integration tests start this binary in the lab's node namespaces.
    cmd.env("DATAPLANE_AGENT_BIN", agent_binary());
    // The upgrade test starts the previous release's agent first; a
    // binary named by the caller wins over the one built from git.
    if std::env::var_os("DATAPLANE_PREVIOUS_AGENT_BIN").is_none() {
        cmd.env(
            "DATAPLANE_PREVIOUS_AGENT_BIN",
            previous_release::agent_binary()?,
        );
    }
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        cmd.env(
            "RUST_TEST_THREADS",
            cores.clamp(1, MAX_TEST_THREADS).to_string(),
        );
    }
    status(cmd)
}
