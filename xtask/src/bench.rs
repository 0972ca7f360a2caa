//! `cargo xtask bench`: per-packet cost, end to end against kube-proxy's
//! rule layouts, and the control plane, in one run. Writes
//! `bench-results/latest.md` and `latest.png`. Benchmarks, not tests:
//! nothing is asserted.

use std::process::Command;

use crate::{
    cargo::{agent_binary, build_release, cargo, status, workspace_root},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Smaller run for development (1 and 1 000 services, 3 interleaved
    /// rounds of 1 s per system end to end).
    #[arg(long)]
    pub quick: bool,
    /// Further arguments for dataplane-bench (`--only testrun,e2e`,
    /// `--samples N`, `--seconds S`, `--rounds R`, `--ebpf-only`, ...; see
    /// `dataplane-bench --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub bench_args: Vec<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    setup::run()?;
    build_release()?;
    status(cargo(&["build", "--release", "-p", "dataplane-bench"]))?;
    let root = workspace_root();
    let mut bench = Command::new(root.join("target/release/dataplane-bench"));
    bench
        .current_dir(&root)
        .arg("--out")
        .arg(root.join("bench-results"))
        .args(options.quick.then_some("--quick"))
        .args(&options.bench_args)
        .env("DATAPLANE_AGENT_BIN", agent_binary());
    status(bench)
}
