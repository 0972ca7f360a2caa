//! `dataplane-bench`: per-packet cost (BPF_PROG_TEST_RUN), end to end
//! through network namespaces against kube-proxy's iptables and nftables
//! layouts, and the control plane. Prints a markdown table and writes it,
//! with a PNG plot, to `--out`. Benchmarks, not tests: no timing is asserted;
//! targets are printed beside the figures and missed ones said so plainly.
//!
//! Needs root, a kernel with BPF, iproute2, iptables and nftables, and the
//! release agent binary (`cargo xtask build`).

mod control_plane;
mod e2e;
mod kubeproxy_rules;
mod outside;
mod report;
mod scenario;
mod stats;
mod testrun;
mod xdprun;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use dataplane_agent::{control::model::IpFamily, run::IpFamilyOption};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the eBPF service dataplane against kube-proxy")]
struct Cli {
    /// Where latest.md and latest.png are written.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Smaller run for development: 1 and 1 000 services, 1 s per e2e case
    /// and round, 1 000 services in the control-plane part.
    #[arg(long)]
    quick: bool,
    /// Parts to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Distinct packets per BPF_PROG_TEST_RUN figure.
    #[arg(long)]
    samples: Option<usize>,
    /// Seconds per end-to-end case and round (connection loop, then stream).
    #[arg(long)]
    seconds: Option<f64>,
    /// Interleaved end-to-end rounds over all systems at each scale.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Services of the control-plane part (default: 1 000 with --quick,
    /// else 10 000).
    #[arg(long)]
    control_plane_services: Option<usize>,
    /// Control-plane part: this dataplane only, without loading kube-proxy's
    /// rules for comparison (minutes at 10 000 services).
    #[arg(long)]
    ebpf_only: bool,
    /// Concurrent connection loops of the load generator.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// iptables-restore binary for kube-proxy's iptables mode (e.g.
    /// iptables-nft-restore); default: legacy, as the nf_tables one takes
    /// over 10 minutes to load 10 000 x 10 services here.
    #[arg(long, default_value = "iptables-legacy-restore")]
    iptables_restore: String,
    /// Print kube-proxy's iptables-restore input for N services and exit.
    #[arg(long, hide = true)]
    dump_iptables: Option<usize>,
    /// End-to-end cases: only these systems (default: all but the
    /// diagnostic `direct-agent-tc` and `direct-agent`).
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Vec<e2e::System>,
    /// End-to-end cases: how the node connects its pods.
    #[arg(long, value_enum, default_value = "bridge")]
    pod_network: e2e::PodNetwork,
    /// End-to-end cases: only these numbers of services (default: 10,
    /// 1 000 and 10 000; 10 and 1 000 with --quick).
    #[arg(long, value_delimiter = ',')]
    e2e_scales: Vec<usize>,
    /// Outside-client cases: only these systems (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    outside_systems: Vec<outside::OutsideSystem>,
    /// Outside-client cases: only these numbers of services (default: 10
    /// and 10 000; 10 with --quick).
    #[arg(long, value_delimiter = ',')]
    outside_scales: Vec<usize>,
    /// Endpoints per service everywhere.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Address families of the per-packet, end-to-end and outside-client
    /// parts (default: both): each is a single-family cluster of its own,
    /// kube-proxy's layouts written with iptables/ip6tables and `ip`/`ip6`
    /// tables.
    #[arg(long, value_enum, value_delimiter = ',')]
    families: Vec<IpFamilyOption>,
    /// Per-packet rows of the uplink: only these programs (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    uplinks: Vec<xdprun::Uplink>,
    /// Per-packet rows of the uplink: flows to the first N NodePorts only
    /// (default: every service's), the map sizes unchanged.
    #[arg(long)]
    uplink_node_ports: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Per packet, BPF_PROG_TEST_RUN: the pod programs, and the uplink's.
    Testrun,
    /// The uplink programs' rows of `testrun` alone.
    Uplink,
    E2e,
    /// End to end from outside the cluster through a NodePort.
    Outside,
    ControlPlane,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("dataplane-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Ok(false) when a part failed (the report says which).
fn run(cli: Cli) -> anyhow::Result<bool> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench needs root (BPF, network namespaces, iptables)"
    );
    if let Some(n) = cli.dump_iptables {
        print!(
            "{}",
            kubeproxy_rules::iptables_full(&scenario::services(
                IpFamily::Ipv4,
                n,
                cli.endpoints,
                None
            ))
        );
        return Ok(true);
    }
    kubeproxy_rules::set_iptables_restore(&cli.iptables_restore);
    let wants = |p: Part| cli.only.is_empty() || cli.only.contains(&p);
    let families: Vec<IpFamily> = if cli.families.is_empty() {
        vec![IpFamily::Ipv4, IpFamily::Ipv6]
    } else {
        cli.families
            .iter()
            .map(|f| match f {
                IpFamilyOption::Ipv4 => IpFamily::Ipv4,
                IpFamilyOption::Ipv6 => IpFamily::Ipv6,
            })
            .collect()
    };
    let quick = cli.quick;
    let mut rep = report::Report::new(quick);

    if wants(Part::Testrun) {
        let scales: &[usize] = if quick {
            &[1, 1_000]
        } else {
            &[1, 1_000, 10_000, 100_000]
        };
        let samples = cli.samples.unwrap_or(if quick { 5_000 } else { 20_000 });
        eprintln!("[1/3] per-packet cost (BPF_PROG_TEST_RUN), {samples} samples per figure");
        match testrun::run(&families, scales, cli.endpoints, samples) {
            Ok(r) => rep.testrun = r,
            Err(e) => rep.fail("per-packet cost", e),
        }
    }
    if wants(Part::Testrun) || wants(Part::Uplink) {
        let samples = cli.samples.unwrap_or(if quick { 5_000 } else { 20_000 });
        let scales: &[usize] = if quick { &[10, 1_000] } else { &[10, 10_000] };
        let uplinks: &[xdprun::Uplink] = if cli.uplinks.is_empty() {
            &xdprun::Uplink::ALL
        } else {
            &cli.uplinks
        };
        eprintln!("[1/3] per-packet cost of the uplink's programs, {samples} flows per figure");
        match xdprun::run(uplinks, &families, scales, samples, cli.uplink_node_ports) {
            Ok(r) => rep.uplink = r,
            Err(e) => rep.fail("per-packet cost of the uplink programs", e),
        }
    }
    if wants(Part::E2e) {
        let o = e2e::Options {
            scales: if !cli.e2e_scales.is_empty() {
                cli.e2e_scales.clone()
            } else if quick {
                vec![10, 1_000]
            } else {
                vec![10, 1_000, 10_000]
            },
            systems: if cli.systems.is_empty() {
                e2e::System::ALL.to_vec()
            } else {
                cli.systems.clone()
            },
            families: families.clone(),
            endpoints: cli.endpoints,
            length: Duration::from_secs_f64(cli.seconds.unwrap_or(if quick { 1.0 } else { 5.0 })),
            concurrency: cli.concurrency,
            rounds: cli.rounds,
            pods: cli.pod_network,
        };
        rep.e2e_seconds = o.length.as_secs_f64();
        rep.concurrency = o.concurrency;
        rep.e2e_pods = o.pods;
        eprintln!(
            "[2/3] end to end through network namespaces, {} interleaved rounds, {:?} per case and round",
            o.rounds, o.length
        );
        match e2e::run(&o) {
            Ok(r) => rep.e2e = r,
            Err(e) => rep.fail("end to end", e),
        }
    }
    if wants(Part::Outside) {
        let o = outside::Options {
            scales: if !cli.outside_scales.is_empty() {
                cli.outside_scales.clone()
            } else if quick {
                vec![10]
            } else {
                vec![10, 10_000]
            },
            systems: if cli.outside_systems.is_empty() {
                outside::OutsideSystem::ALL.to_vec()
            } else {
                cli.outside_systems.clone()
            },
            families: families.clone(),
            endpoints: cli.endpoints,
            length: Duration::from_secs_f64(cli.seconds.unwrap_or(if quick { 1.0 } else { 5.0 })),
            concurrency: cli.concurrency,
            rounds: cli.rounds,
        };
        rep.outside_seconds = o.length.as_secs_f64();
        rep.concurrency = o.concurrency;
        eprintln!(
            "[outside] from outside through a NodePort to a remote backend, {} interleaved rounds, {:?} per case and round",
            o.rounds, o.length
        );
        match outside::run(&o) {
            Ok(r) => rep.outside = r,
            Err(e) => rep.fail("from outside", e),
        }
    }
    if wants(Part::ControlPlane) {
        let services = cli
            .control_plane_services
            .unwrap_or(if quick { 1_000 } else { 10_000 });
        eprintln!(
            "[3/3] control plane, {services} services x {} endpoints",
            cli.endpoints
        );
        match control_plane::run(services, cli.endpoints, !cli.ebpf_only) {
            Ok(r) => rep.control = Some(r),
            Err(e) => rep.fail("control plane", e),
        }
    }

    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let md = rep.markdown();
    println!("{md}");
    let md_path = cli.out.join("latest.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let png_path = cli.out.join("latest.png");
    report::plot(&rep, &png_path).with_context(|| format!("writing {}", png_path.display()))?;
    eprintln!("wrote {} and {}", md_path.display(), png_path.display());
    Ok(rep.failures.is_empty())
}
