//! Conntrack sizes and lifetimes, as flags (kube-proxy's names where it has
//! one). `run --config` (a `KubeProxyConfiguration`) fills the same struct;
//! flags given on the command line win.

use std::time::Duration;

/// Conntrack options of `dataplane-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConntrackOptions {
    /// Entries of the TCP conntrack map. Default: the larger of
    /// `--conntrack-max-per-core` × CPUs and `--conntrack-min`, as
    /// kube-proxy sizes nf_conntrack.
    #[arg(long)]
    pub conntrack_max_tcp: Option<u32>,
    /// Entries of the conntrack map for UDP and everything else. Default:
    /// half the TCP map, so a burst of DNS flows cannot evict TCP flows.
    #[arg(long)]
    pub conntrack_max_other: Option<u32>,
    /// TCP entries per CPU when `--conntrack-max-tcp` is not given.
    #[arg(long, default_value_t = 32_768)]
    pub conntrack_max_per_core: u32,
    /// Fewest TCP entries when `--conntrack-max-tcp` is not given.
    #[arg(long, default_value_t = 131_072)]
    pub conntrack_min: u32,
    /// Idle lifetime of an established TCP flow.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Lifetime of a TCP flow after its first FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Idle lifetime of a UDP flow that has seen one direction only.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub conntrack_udp_timeout: Duration,
    /// Idle lifetime of a UDP flow that has seen replies (a stream).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
}

impl ConntrackOptions {
    /// Size of the TCP conntrack map on a node with `cpus` CPUs.
    pub fn max_tcp(&self, cpus: u32) -> u32 {
        self.conntrack_max_tcp.unwrap_or_else(|| {
            self.conntrack_max_per_core
                .saturating_mul(cpus)
                .max(self.conntrack_min)
        })
    }

    /// Size of the conntrack map for UDP and other protocols.
    pub fn max_other(&self, cpus: u32) -> u32 {
        self.conntrack_max_other
            .unwrap_or_else(|| (self.max_tcp(cpus) / 2).max(1))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        conntrack: ConntrackOptions,
    }

    #[test]
    fn sizes_follow_kube_proxy_rule_unless_given() {
        let defaults = Cli::parse_from(["t"]).conntrack;
        assert_eq!(defaults.max_tcp(2), 131_072);
        assert_eq!(defaults.max_tcp(8), 262_144);
        assert_eq!(defaults.max_other(8), 131_072);
        let given = Cli::parse_from([
            "t",
            "--conntrack-max-tcp",
            "1000",
            "--conntrack-max-other",
            "10",
        ])
        .conntrack;
        assert_eq!((given.max_tcp(64), given.max_other(64)), (1000, 10));
    }
}
