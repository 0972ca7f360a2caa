//! Conntrack sizes and lifetimes, as flags (kube-proxy's names where it has
//! one). `run --config` (a `KubeProxyConfiguration`) fills the same struct;
//! flags given on the command line win.

use std::time::Duration;

use dataplane_common::CtLifetimes;

use crate::node::datapath::DatapathConfig;

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

    /// The lifetimes the datapath, the sweep and `inspect` use. TCP's
    /// opening lifetime has no flag (kube-proxy leaves nf_conntrack's).
    pub fn lifetimes(&self) -> CtLifetimes {
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        CtLifetimes {
            tcp_established_s: secs(self.conntrack_tcp_timeout_established),
            tcp_closing_s: secs(self.conntrack_tcp_timeout_close_wait),
            udp_s: secs(self.conntrack_udp_timeout),
            udp_stream_s: secs(self.conntrack_udp_timeout_stream),
            ..CtLifetimes::default()
        }
    }

    /// Sizes and lifetimes for loading the datapath on a node with `cpus`
    /// CPUs.
    pub fn datapath_config(&self, cpus: u32) -> DatapathConfig {
        DatapathConfig {
            ct_max_tcp: self.max_tcp(cpus),
            ct_max_other: self.max_other(cpus),
            ct_lifetimes: self.lifetimes(),
            ..DatapathConfig::default()
        }
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

    #[test]
    fn lifetimes_follow_the_timeout_flags() {
        let options = Cli::parse_from([
            "t",
            "--conntrack-udp-timeout",
            "5s",
            "--conntrack-udp-timeout-stream",
            "2m",
            "--conntrack-tcp-timeout-established",
            "1h",
        ])
        .conntrack;
        let l = options.lifetimes();
        assert_eq!(
            (
                l.udp_s,
                l.udp_stream_s,
                l.tcp_established_s,
                l.tcp_closing_s
            ),
            (5, 120, 3600, 10)
        );
        let config = options.datapath_config(4);
        assert_eq!((config.ct_max_tcp, config.ct_max_other), (131_072, 65_536));
    }
}
