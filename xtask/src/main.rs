//! Project tasks: `cargo xtask <command>`.

mod bench;
mod cargo;
mod lab;
mod lint;
mod previous_release;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and try the eBPF service dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (Debian packages, bpf-linker, toolchain link). Idempotent.
    Setup,
    /// Build target/release/dataplane-agent with the eBPF programs embedded.
    Build,
    /// Unit tests, datapath tests (BPF_PROG_TEST_RUN) and netns integration tests. Needs root.
    Test(test::Options),
    /// Benchmarks against kube-proxy's iptables and nftables layouts; writes bench-results/. Needs root.
    Bench(bench::Options),
    /// Bring the two-node lab up or down.
    Lab(lab::Options),
    /// Build, bring the lab up and show requests through a service IP.
    Run(lab::UpOptions),
    /// cargo fmt --check and clippy -D warnings.
    Lint,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build => {
            setup::run()?;
            cargo::build_release()
        }
        Command::Test(options) => test::run(options),
        Command::Bench(options) => bench::run(options),
        Command::Lab(options) => lab::run(options),
        Command::Run(options) => run::run(options),
        Command::Lint => lint::run(),
    }
}
