//! dataplane-agent: keeps the eBPF service dataplane of one node in sync with
//! the cluster's Services and EndpointSlices.

use std::{ffi::OsString, path::PathBuf};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use dataplane_agent::{
    kubeproxy_config::KubeProxyConfig,
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

/// Installed as `kube-proxy` (a link to this binary, see
/// deploy/Containerfile), the agent takes kube-proxy's command line as
/// `run`'s: `kube-proxy --config=... --hostname-override=...` in kube-proxy's
/// own DaemonSet starts it.
fn as_kube_proxy(mut args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as_kube_proxy = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|name| name == "kube-proxy");
    let subcommand_given = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        Cli::command().find_subcommand(a).is_some()
            || a.starts_with("-h")
            || a == "--help"
            || a == "--version"
    });
    if invoked_as_kube_proxy && !subcommand_given {
        args.insert(1, "run".into());
    }
    args
}

/// klog's `--v` as a log filter.
fn log_level(v: Option<u32>) -> &'static str {
    match v.unwrap_or(0) {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    }
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches_from(as_kube_proxy(std::env::args_os().collect()));
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The file is read before anything starts: a bad one stops the agent
    // with the field named, never half-configured.
    let mut notes = Vec::new();
    if let Command::Run(options) = &mut cli.command {
        if let Some(path) = options.config.clone() {
            let config = KubeProxyConfig::load(&path)
                .with_context(|| format!("--config {}", path.display()))?;
            let run_matches = matches
                .subcommand_matches("run")
                .context("the run subcommand's arguments")?;
            config.apply(options, run_matches);
            notes = config.notes();
        }
    }
    let level = match &cli.command {
        Command::Run(options) => log_level(options.v),
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    for note in notes {
        log::info!("{note}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Vec<String> {
        as_kube_proxy(argv.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn called_as_kube_proxy_it_runs_with_kube_proxys_flags() {
        assert_eq!(
            args(&["/usr/local/bin/kube-proxy", "--config=/c", "--v=2"]),
            ["/usr/local/bin/kube-proxy", "run", "--config=/c", "--v=2"]
        );
        assert_eq!(
            args(&["kube-proxy", "cleanup"]),
            ["kube-proxy", "cleanup"],
            "a subcommand is kept"
        );
        assert_eq!(
            args(&["dataplane-agent", "--config=/c"]),
            ["dataplane-agent", "--config=/c"],
            "under its own name it wants a subcommand"
        );
        let matches = Cli::command()
            .try_get_matches_from(args(&[
                "kube-proxy",
                "-v=4",
                "--config",
                "/c",
                "--hostname-override",
                "n",
            ]))
            .unwrap();
        let Command::Run(options) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(options.v, Some(4));
        assert_eq!(options.node_name.as_deref(), Some("n"));
        assert_eq!(log_level(options.v), "debug");
    }
}
