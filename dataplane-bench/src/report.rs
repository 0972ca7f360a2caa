//! The markdown table (with the targets beside the figures) and the PNG plot.

use std::{fmt::Write as _, path::Path, time::Duration};

use dataplane_agent::control::model::IpFamily;
use plotters::prelude::*;

use crate::{
    control_plane::ControlPlaneResult,
    e2e::{ratio_spread, CaseResult, System},
    outside::{OutsideResult, OutsideSystem},
    testrun::{Ratios, ScaleResult},
    xdprun::{Uplink, UplinkResult},
};

pub struct Report {
    pub quick: bool,
    pub testrun: Vec<ScaleResult>,
    /// The uplink's XDP program, per packet.
    pub uplink: Vec<UplinkResult>,
    pub e2e: Vec<CaseResult>,
    pub e2e_seconds: f64,
    pub concurrency: usize,
    /// How the end-to-end node connects its pods.
    pub e2e_pods: crate::e2e::PodNetwork,
    pub outside: Vec<OutsideResult>,
    pub outside_seconds: f64,
    pub control: Option<ControlPlaneResult>,
    pub failures: Vec<String>,
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**MISSED**"
    }
}

/// The families in `rows`, IPv4 first, each once.
fn families(rows: impl Iterator<Item = IpFamily>) -> Vec<IpFamily> {
    let mut v: Vec<IpFamily> = rows.collect();
    v.sort();
    v.dedup();
    v
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".into(), ms)
}

impl Report {
    pub fn new(quick: bool) -> Self {
        Self {
            quick,
            testrun: Vec::new(),
            uplink: Vec::new(),
            e2e: Vec::new(),
            e2e_seconds: 0.0,
            concurrency: 0,
            e2e_pods: crate::e2e::PodNetwork::Bridge,
            outside: Vec::new(),
            outside_seconds: 0.0,
            control: None,
            failures: Vec::new(),
        }
    }

    pub fn fail(&mut self, part: &str, e: anyhow::Error) {
        eprintln!("  {part} FAILED: {e:#}");
        self.failures.push(format!("{part}: {e:#}"));
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# Dataplane benchmarks{}\n",
            if self.quick { " (--quick)" } else { "" }
        );
        let _ = writeln!(
            o,
            "{} · kernel {} · {} CPUs · kube-proxy iptables mode loaded with `{}` ({})\n",
            command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            command_line("uname", &["-r"]),
            crate::testrun::online_cpus(),
            crate::kubeproxy_rules::iptables_restore(),
            command_line(crate::kubeproxy_rules::iptables_restore(), &["--version"]),
        );
        let _ = writeln!(
            o,
            "Benchmarks, not tests: nothing here is asserted. Every comparison is measured in this one run.\n"
        );
        for f in &self.failures {
            let _ = writeln!(o, "> **FAILED** {f}\n");
        }
        self.testrun_md(&mut o);
        self.uplink_md(&mut o);
        self.e2e_md(&mut o);
        self.outside_md(&mut o);
        self.control_md(&mut o);
        o
    }

    fn uplink_md(&self, o: &mut String) {
        let Some(first) = self.uplink.first() else {
            return;
        };
        let _ = writeln!(
            o,
            "### Uplink programs (`xdp_from_outside`; tc `from_outside`, `--external-datapath tc`), NodePort to a remote backend (SNAT)\n\n\
             {} flows from outside per figure, each packet run once (repeat = 1) on the uplink of a namespace of its \
             own (routes and permanent neighbours: the translated packets leave with XDP_TX, or a tc redirect), each \
             program on a setup of its own. Each run is paired with a floor run just before it: the same program on \
             the same packet sent to an uplink address that is no node address (the parse and one service-IP lookup, \
             through the same test run). There is no empty program to compare with: the fixed cost of a test run is \
             estimated as floor (repeat = 1) minus floor (repeat = 10 000, last column), and the net ratio takes it \
             off both sides. Established: a later client packet of a flow the backend answered, the flows in \
             shuffled order, the flow's NAT entry rewritten from userspace just before (its next hop stamped fresh: \
             cached; or cleared: a `bpf_fib_lookup` per packet, the cost without the cache). Reply: the backend's \
             packet to the flow's SNAT port, its REPLY entry rewritten the same way (hop cached). tc rows also show \
             `to_outside` (uplink egress) on a backend's reply to a client whose address it saw (a second NodePort \
             per service that keeps the client's address, tracked in conntrack as with policy Local), paired with \
             the same ingress floor.\n",
            first.samples
        );
        let _ = writeln!(
            o,
            "| program | family | services (NodePorts) | floor | new flow (SYN) | established, hop cached | established, FIB lookup | reply, hop cached | `to_outside`, local backend's reply | floor, repeat = 10 000 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.uplink {
            let cell =
                |ns: u32, ratio: f64, net: f64| format!("{ns} ns ({ratio:.2}x, net {net:.2}x)");
            let (g, n) = (&r.ratio, &r.net_ratio);
            let program = match r.uplink {
                Uplink::Xdp => "XDP",
                Uplink::Tc => "tc",
            };
            let _ = writeln!(
                o,
                "| {program} | {} | {} ({}) | {} ns | {} | {} | {} | {} | {} | {} ns |",
                r.family,
                r.services,
                r.node_ports,
                r.floor,
                cell(r.new_flow, g.new_flow, n.new_flow),
                cell(r.established, g.established, n.established),
                cell(r.looked_up, g.looked_up, n.looked_up),
                cell(r.reply, g.reply, n.reply),
                r.to_outside
                    .map_or_else(|| "–".to_owned(), |ns| cell(ns, g.to_outside, n.to_outside)),
                r.floor_repeat
            );
        }
        o.push('\n');
    }

    fn testrun_md(&self, o: &mut String) {
        let Some(first) = self.testrun.first() else {
            return;
        };
        let _ = writeln!(
            o,
            "## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n\n\
             Median of the kernel-reported duration of single runs (repeat = 1) over {} distinct packets per figure \
             (new flow: one SYN per flow). Each run is paired with a `bench_empty` run (returns at once) and a \
             `bench_floor` run (parse + one hash lookup) on the same packet just before it; a ratio is the median over \
             those pairs of (path / floor). Every figure includes the fixed cost of one test run (timer reads, \
             softirq guard, context setup), which `bench_empty` shows; the net ratio takes that median off both sides \
             of each pair: what the programs themselves cost. The last column, the floor with repeat = 10 000 on one \
             packet (warm, one timer read per 10 000 runs), is context: the translating paths cannot use repeat, as \
             the kernel does not restore the packet between repetitions. IPv6 rows: the same flows over IPv6 services \
             (their own maps), each paired with `bench_floor` on the IPv6 packet (the IPv6 parse and one \
             `LB6_SERVICE_IPS` lookup). The backend columns: a backend's packet to a client, before any flow of the tc path exists (a \
             connection socket LB translated at connect(), or one dialled to the pod IP), through `from_pod` as it \
             leaves the backend and `to_pod` as it goes into the client; both leave it byte for byte. Reply \
             translation is each flow's SYN-ACK; a reply of an established flow is the backend's second data \
             segment after the handshake (the first, not measured, finds the flow established and stamps its \
             reply entry, so later replies within a second skip the flow's original entry), the flows shuffled. \
             \"Floor + flow lookup\": `bench_floor_flow`, the floor plus one conntrack lookup of the packet's own \
             flow, on the established packets in a pass of their own (shuffled again, after the same empty and \
             floor runs): the least an established packet costs in any design that keeps its flows in a BPF hash \
             map, as cold as the translating path finds them; the established cell's second ratio is to it \
             (medians; context, not a target). \"Floor + flow inserts\": `bench_floor_insert`, the floor plus the \
             two conntrack inserts (an entry per direction, `BPF_NOEXIST`) every tracked flow makes, on SYNs of \
             flows of its own after every other pass: the least a new flow costs in such a design; the new-flow \
             cell's second ratio is to it.\n",
            first.samples
        );
        let _ = writeln!(
            o,
            "| family | services | flows in conntrack | empty program | floor | non-service | into a pod, not a reply | backend's packet without a flow, out of it (`from_pod`) | the same into its client (`to_pod`) | new flow | floor + flow inserts | established | floor + flow lookup | reply translation (SYN-ACK) | reply of an established flow | floor, repeat = 10 000 (context) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut narrowed = Vec::new();
        for r in &self.testrun {
            let cell =
                |ns: u32, ratio: f64, net: f64| format!("{ns} ns ({ratio:.2}x, net {net:.2}x)");
            let services = if r.endpoints == first.endpoints {
                r.services.to_string()
            } else {
                narrowed.push(r.services);
                format!("{} ({} endpoints each)", r.services, r.endpoints)
            };
            let (g, n) = (&r.ratio, &r.net_ratio);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} ns | {} ns | {} | {} | {} | {} | {}; {:.2}x, net {:.2}x floor + flow inserts | {} ns | {}; {:.2}x, net {:.2}x floor + flow lookup | {} ns | {} | {} | {} ns |",
                r.family,
                services,
                r.flows,
                r.empty,
                r.floor,
                cell(r.non_service, g.non_service, n.non_service),
                cell(r.into_pod, g.into_pod, n.into_pod),
                cell(r.backend_out, g.backend_out, n.backend_out),
                cell(r.backend_in, g.backend_in, n.backend_in),
                cell(r.new_flow, g.new_flow, n.new_flow),
                r.new_flow_to_floor_insert.0,
                r.new_flow_to_floor_insert.1,
                r.floor_insert,
                cell(r.established, g.established, n.established),
                r.established_to_floor_flow.0,
                r.established_to_floor_flow.1,
                r.floor_flow,
                cell(r.reply, g.reply, n.reply),
                cell(
                    r.reply_established,
                    g.reply_established,
                    n.reply_established
                ),
                r.floor_repeat
            );
        }
        narrowed.dedup();
        for services in narrowed {
            let _ = writeln!(
                o,
                "\n{services} services with {} endpoints each do not fit `BACKEND_SLOTS` ({} slots; each \
                 frontend takes a block of the next power of two): that row has fewer. The agent refuses such a \
                 cluster the same way (`map BACKEND_SLOTS would hold ... more than its capacity`).",
                first.endpoints,
                dataplane_common::capacity::BACKEND_SLOTS
            );
        }
        let _ = writeln!(
            o,
            "\n| target | measured (test run included) | net of the empty program | verdict (net) |\n|---|---|---|---|"
        );
        for family in families(self.testrun.iter().map(|r| r.family)) {
            self.testrun_targets(o, family);
        }
        o.push('\n');
    }

    /// The per-packet targets, over `family`'s rows, each to its own
    /// family's floor. Judged on the net ratios: the test run's fixed cost
    /// is in both sides of the gross ones and flatters them.
    fn testrun_targets(&self, o: &mut String, family: IpFamily) {
        let rows = || self.testrun.iter().filter(|r| r.family == family);
        let judged = verdict;
        let worst = |f: fn(&Ratios) -> f64, net: bool| {
            rows()
                .map(|r| f(if net { &r.net_ratio } else { &r.ratio }))
                .fold(0.0, f64::max)
        };
        for (name, f, target) in [
            (
                "established",
                (|r: &Ratios| r.established) as fn(&Ratios) -> f64,
                1.5,
            ),
            ("new flow", |r: &Ratios| r.new_flow, 3.0),
        ] {
            let (gross, net) = (worst(f, false), worst(f, true));
            let _ = writeln!(
                o,
                "| {family}: {name} ≤ {target}x floor | worst {gross:.2}x | worst {net:.2}x | {} |",
                judged(net <= target)
            );
        }
        // What the targets ask of any design that tracks flows in BPF hash
        // maps: its unavoidable part alone, at its cheapest row.
        let best = |f: fn(&ScaleResult) -> (f64, f64)| {
            rows()
                .map(f)
                .fold((f64::MAX, f64::MAX), |a, b| (a.0.min(b.0), a.1.min(b.1)))
        };
        for (name, (gross, net)) in [
            (
                "the floor plus the flow's conntrack lookup alone (the least of \"established\")",
                best(|r| r.floor_flow_ratio),
            ),
            (
                "the floor plus the flow's two conntrack inserts alone (the least of \"new flow\")",
                best(|r| r.floor_insert_ratio),
            ),
        ] {
            if gross < f64::MAX {
                let _ = writeln!(
                    o,
                    "| {family}, reference: {name} | best {gross:.2}x | best {net:.2}x | context |"
                );
            }
        }
        let one = rows().find(|r| r.services == 1);
        let big = rows().find(|r| r.services == 100_000);
        match (one, big) {
            (Some(a), Some(b)) => {
                let growth = |f: fn(&ScaleResult) -> u32| {
                    (f64::from(f(b)) / f64::from(f(a).max(1)) - 1.0) * 100.0
                };
                for (name, g) in [
                    ("non-service", growth(|r| r.non_service)),
                    ("new flow", growth(|r| r.new_flow)),
                    ("established", growth(|r| r.established)),
                    ("reply", growth(|r| r.reply)),
                    ("floor (reference)", growth(|r| r.floor)),
                ] {
                    let _ = writeln!(
                        o,
                        "| {family}: growth 1 → 100 000 services ≤ 10%: {name} | {g:+.1}% | | {} |",
                        if name.starts_with("floor") {
                            ""
                        } else {
                            verdict(g <= 10.0)
                        }
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    o,
                    "| {family}: growth 1 → 100 000 services ≤ 10% | not measured in this run | | |"
                );
            }
        }
    }

    fn e2e_md(&self, o: &mut String) {
        if self.e2e.is_empty() {
            return;
        }
        let rounds = self.e2e.iter().map(|r| r.rounds.len()).max().unwrap_or(0);
        let _ = writeln!(
            o,
            "## 2. End to end (network namespaces)\n\n\
             Client pod → node ({}) → server pod, one set of namespaces per system. At each scale all \
             systems are set up side by side and measured in {rounds} interleaved rounds (each system once, then \
             again). Per round and system: {} concurrent loops of connect / one request / close (RST) for \
             {:.0} s (latency is the connect() call), then one TCP stream for {:.0} s. Traffic goes to the LAST service \
             installed. Ratios to direct (the server pod IP, no service) are taken within each round; the table gives \
             their median and, in brackets, their range over the rounds. Kernel CPU per connection: system + irq + \
             softirq time of the whole node (/proc/stat; other load on the machine adds to it) and system time of the \
             bench process alone (client and server threads; this kernel has no IRQ time accounting, so the softirq \
             work done in their context is in it), per connection made. Rates and latencies are medians over rounds. \
             IPv6 rows: the same on an IPv6-only set of namespaces (pods, node and services IPv6 only; kube-proxy's \
             layouts loaded with ip6tables and as an `ip6` nftables table), set up beside the IPv4 ones and measured \
             in the same interleaved rounds; their ratios are to direct over IPv6 in the same round.\n",
            match self.e2e_pods {
                crate::e2e::PodNetwork::Bridge => "pods on the bridge `cbr0`",
                crate::e2e::PodNetwork::Routed => "routed /32 pods with proxy ARP",
            },
            self.concurrency,
            self.e2e_seconds,
            self.e2e_seconds
        );
        let _ = writeln!(
            o,
            "| family | services | system | conn/s | vs direct | kernel CPU µs/conn, node | this process | vs direct (process) | connect p50 | connect p99 | stream | vs direct | errors | setup |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.e2e {
            let direct = self.e2e.iter().find(|d| {
                d.services == r.services && d.family == r.family && d.system == System::Direct
            });
            let nan = (f64::NAN, f64::NAN, f64::NAN);
            let (conns, cpu, stream) = direct.map_or((nan, nan, nan), |d| {
                (
                    ratio_spread(r, d, |x| x.conns_per_s),
                    ratio_spread(r, d, |x| x.process_sys_us_per_conn),
                    ratio_spread(r, d, |x| x.stream_gbit_s),
                )
            });
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0} | {} | {:.1} | {:.1} | {} | {:.0} µs | {:.0} µs | {:.2} Gbit/s | {} | {} | {} |",
                r.family,
                r.services,
                r.system.label(),
                r.median(|x| x.conns_per_s),
                fmt_spread(conns),
                r.median(|x| x.node_cpu_us_per_conn),
                r.median(|x| x.process_sys_us_per_conn),
                fmt_spread(cpu),
                r.median(|x| f64::from(x.connect_p50_us)),
                r.median(|x| f64::from(x.connect_p99_us)),
                r.median(|x| x.stream_gbit_s),
                fmt_spread(stream),
                r.rounds.iter().map(|x| x.errors).sum::<u64>(),
                ms(r.setup)
            );
        }
        let _ = writeln!(o, "\n| target | measured | |\n|---|---|---|");
        for family in families(self.e2e.iter().map(|r| r.family)) {
            self.e2e_targets(o, family);
        }
        o.push('\n');
    }

    fn e2e_targets(&self, o: &mut String, family: IpFamily) {
        let at = |s: System| {
            self.e2e
                .iter()
                .filter(|r| r.system == s && r.family == family)
                .max_by_key(|r| r.services)
        };
        let Some(d) = at(System::Direct) else {
            return;
        };
        if let Some(e) = at(System::Ebpf) {
            let (ratio, lo, hi) = ratio_spread(e, d, |x| x.conns_per_s);
            let _ = writeln!(
                o,
                "| {family}: eBPF with {} services within 10% of direct (conn/s, median of rounds) | {ratio:.2}x [{lo:.2}–{hi:.2}] | {} |",
                e.services,
                if e.services == 10_000 { verdict(ratio >= 0.9) } else { "(not at 10 000)" }
            );
        }
        for s in [System::SocketLb, System::SocketLbHost] {
            if let Some(k) = at(s) {
                let (ratio, lo, hi) = ratio_spread(k, d, |x| x.conns_per_s);
                let _ = writeln!(
                    o,
                    "| {family}: {} with {} services at least 1.0x direct (conn/s, median of rounds) | {ratio:.2}x [{lo:.2}–{hi:.2}] | {} |",
                    s.label(),
                    k.services,
                    if k.services == 10_000 {
                        verdict(ratio >= 1.0)
                    } else {
                        "(not at 10 000)"
                    }
                );
            }
        }
        for (s, reference) in [(System::Iptables, "~0.4x"), (System::Nftables, "~0.8x")] {
            if let Some(k) = at(s) {
                let (ratio, lo, hi) = ratio_spread(k, d, |x| x.conns_per_s);
                let _ = writeln!(
                    o,
                    "| {family}: reference: {} at 10 000 services {} of direct | {ratio:.2}x [{lo:.2}–{hi:.2}] at {} | |",
                    s.label(),
                    reference,
                    k.services
                );
            }
        }
    }

    fn outside_md(&self, o: &mut String) {
        if self.outside.is_empty() {
            return;
        }
        let rounds = self
            .outside
            .iter()
            .map(|r| r.rounds.len())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            o,
            "## 2b. From outside the cluster (NodePort to a remote backend)\n\n\
             The lab's outside client → router → node 1's uplink (`eth0`, a veth) → NodePort → SNAT to node 1 → back out \
             of the uplink → node 2 → backend pod; replies return through node 1. One lab per system, set up side by \
             side and measured in {rounds} interleaved rounds, as section 2: {} concurrent connect / request / close (RST) \
             loops for {:.0} s, then one TCP stream for {:.0} s, to the LAST service (its nodePort is the last of \
             kube-proxy's NodePort rules; the last 2 768 services have nodePorts, the range's size). The reference, \
             \"routed\", connects to the backend pod's address with node 1 as the router both ways: the same hops \
             without any translation. Ratios are paired per round: median [range]. The agent's SNAT range is \
             1024-59999 (node 1's ephemeral ports 60000-65535). The router's ends of both uplinks run an XDP program \
             that passes everything, in every system's lab (native XDP_TX on a veth needs one on the peer). IPv6 \
             rows: the same over an IPv6-only pod network, the client connecting to node 1's IPv6 address \
             (kube-proxy's layouts loaded with ip6tables and as an `ip6` nftables table), set up beside the IPv4 ones \
             and measured in the same interleaved rounds; their ratios are to routed over IPv6 in the same round. \
             \"this process\": system time of the bench process (client and server threads) per connection, the \
             figure least disturbed by other load on the machine.\n",
            self.concurrency, self.outside_seconds, self.outside_seconds
        );
        let _ = writeln!(
            o,
            "| family | services | system | conn/s | vs routed | vs nftables | kernel CPU µs/conn, node | this process | vs routed (process) | connect p50 | stream | vs routed | errors | setup |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let find = |family: IpFamily, services: usize, s: OutsideSystem| {
            self.outside
                .iter()
                .find(|r| r.family == family && r.services == services && r.system == s)
        };
        let nan = (f64::NAN, f64::NAN, f64::NAN);
        for r in &self.outside {
            let vs = |reference: OutsideSystem, f: fn(&crate::e2e::Round) -> f64| {
                find(r.family, r.services, reference).map_or(nan, |d| r.ratio(d, f))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.1} | {} | {:.0} µs | {:.2} Gbit/s | {} | {} | {} |",
                r.family,
                r.services,
                r.system.label(),
                r.median(|x| x.conns_per_s),
                fmt_spread(vs(OutsideSystem::Routed, |x| x.conns_per_s)),
                fmt_spread(vs(OutsideSystem::Nftables, |x| x.conns_per_s)),
                r.median(|x| x.node_cpu_us_per_conn),
                r.median(|x| x.process_sys_us_per_conn),
                fmt_spread(vs(OutsideSystem::Routed, |x| x.process_sys_us_per_conn)),
                r.median(|x| f64::from(x.connect_p50_us)),
                r.median(|x| x.stream_gbit_s),
                fmt_spread(vs(OutsideSystem::Routed, |x| x.stream_gbit_s)),
                r.rounds.iter().map(|x| x.errors).sum::<u64>(),
                ms(r.setup)
            );
        }
        let notes: Vec<String> = self
            .outside
            .iter()
            .filter(|r| !r.note.is_empty())
            .map(|r| {
                format!(
                    "- {} ({}, {} services): {}",
                    r.system.label(),
                    r.family,
                    r.services,
                    r.note
                )
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(
                o,
                "\nWhat the agent attached to the uplink (its log):\n{}",
                notes.join("\n")
            );
        }
        let _ = writeln!(o, "\n| target | measured | |\n|---|---|---|");
        let mut scales: Vec<(IpFamily, usize)> = self
            .outside
            .iter()
            .map(|r| (r.family, r.services))
            .collect();
        scales.sort_unstable();
        scales.dedup();
        for (family, services) in scales {
            for system in [OutsideSystem::Xdp, OutsideSystem::XdpNative] {
                let Some(x) = find(family, services, system) else {
                    continue;
                };
                if let Some(n) = find(family, services, OutsideSystem::Nftables) {
                    let (m, lo, hi) = x.ratio(n, |r| r.conns_per_s);
                    let _ = writeln!(
                        o,
                        "| {family}: {} ≥ 1.5x kube-proxy nftables, {services} services (conn/s) | {m:.2}x [{lo:.2}–{hi:.2}] | {} |",
                        system.label(),
                        verdict(m >= 1.5)
                    );
                }
                if let Some(n) = find(family, services, OutsideSystem::Nftables) {
                    // The steadier figure on a shared machine: what a
                    // connection costs the bench's client and server.
                    let (m, lo, hi) = x.ratio(n, |r| r.process_sys_us_per_conn);
                    let _ = writeln!(
                        o,
                        "| {family}: context: {} kernel CPU per connection (this process) vs kube-proxy nftables, {services} services | {m:.2}x [{lo:.2}–{hi:.2}] | |",
                        system.label()
                    );
                }
                if let Some(d) = find(family, services, OutsideSystem::Routed) {
                    let (m, lo, hi) = x.ratio(d, |r| r.conns_per_s);
                    let _ = writeln!(
                        o,
                        "| {family}: {} within 10% of routed, {services} services (conn/s) | {m:.2}x [{lo:.2}–{hi:.2}] | {} |",
                        system.label(),
                        verdict(m >= 0.9)
                    );
                }
            }
        }
        o.push('\n');
    }

    fn control_md(&self, o: &mut String) {
        let Some(c) = &self.control else { return };
        let n = format!("{} services x {} endpoints", c.services, c.endpoints);
        let at_scale = c.services >= 10_000;
        let _ = writeln!(
            o,
            "## 3. Control plane ({n})\n\n\
             eBPF: `SyncEngine::sync_all` into the real maps; one endpoint change = the EndpointSlice event into the \
             agent's model, its frontends, `sync_service` (median and max of {} changes). kube-proxy: wall time of \
             `iptables-restore --noflush` / `nft -f` of what it writes (full sync from nothing; for a change, its \
             partial sync: filter table and KUBE-SERVICES whole plus the service's chains / the service's chains), \
             median of 5.\n",
            c.changes
        );
        let _ = writeln!(
            o,
            "| what | eBPF dataplane | kube-proxy iptables | kube-proxy nftables | target | |\n|---|---:|---:|---:|---|---|"
        );
        let full_met = c.ebpf_full < Duration::from_millis(300);
        let _ = writeln!(
            o,
            "| program {n} from nothing (eBPF: median of {} into fresh maps, range {}–{}) | {} | {} | {} | < 0.3 s at 10 000 x 10 | {} |",
            crate::control_plane::FULL_RUNS,
            ms(c.ebpf_full_min),
            ms(c.ebpf_full_max),
            ms(c.ebpf_full),
            opt_ms(c.iptables_full),
            opt_ms(c.nft_full),
            if at_scale {
                verdict(full_met)
            } else {
                "(smaller scale)"
            }
        );
        let change_met = c.ebpf_change_max < Duration::from_millis(5);
        let _ = writeln!(
            o,
            "| one endpoint change until in the maps/rules | {:.2} ms (max {:.2} ms) | {} | {} | < 5 ms | {} |",
            c.ebpf_change_median.as_secs_f64() * 1e3,
            c.ebpf_change_max.as_secs_f64() * 1e3,
            opt_ms(c.iptables_change),
            opt_ms(c.nft_change),
            verdict(change_met)
        );
        match c.agent_vm_hwm_kib {
            Some(kib) => {
                let mib = kib as f64 / 1024.0;
                let _ = writeln!(
                    o,
                    "| agent peak memory (VmHWM), healthy after {} | {mib:.1} MiB | | | < 64 MiB | {} |",
                    opt_ms(c.agent_ready),
                    if at_scale { verdict(mib < 64.0) } else { "(smaller scale)" }
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "| agent peak memory (VmHWM) | not measured | | | < 64 MiB | |"
                );
            }
        }
        for note in &c.notes {
            let _ = writeln!(o, "\n> {note}");
        }
        o.push('\n');
    }
}

const COLORS: [RGBColor; 7] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers DejaVu Sans for text; without it the plot has bars only (the
/// labels are in the markdown).
fn font() -> bool {
    let Ok(bytes) = std::fs::read(FONT_FILE) else {
        return false;
    };
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

struct Panel<'a> {
    title: String,
    series: &'a [&'a str],
    /// (group label, one value per series).
    groups: Vec<(String, Vec<f64>)>,
    unit: &'a str,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area, p: &Panel, text: bool) -> anyhow::Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let (left, right, top, bottom) = (60, 20, 50, 40);
    let max = p
        .groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let plot_h = (h - top - bottom) as f64;
    let group_w = (w - left - right) / p.groups.len().max(1) as i32;
    let bar_w = (group_w - 20) / p.series.len().max(1) as i32;
    let base = h - bottom;
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing: {e:?}");
    area.draw(&PathElement::new(
        vec![(left, base), (w - right, base)],
        BLACK,
    ))
    .map_err(err)?;
    for (g, (label, values)) in p.groups.iter().enumerate() {
        let x0 = left + g as i32 * group_w + 10;
        for (s, v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let bh = (v / max * plot_h) as i32;
            let x = x0 + s as i32 * bar_w;
            area.draw(&Rectangle::new(
                [(x, base - bh), (x + bar_w - 2, base)],
                COLORS[s % COLORS.len()].filled(),
            ))
            .map_err(err)?;
            if text {
                let v_label = if *v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                };
                area.draw(&Text::new(v_label, (x, base - bh - 14), ("sans-serif", 11)))
                    .map_err(err)?;
            }
        }
        if text {
            area.draw(&Text::new(
                label.clone(),
                (x0, base + 8),
                ("sans-serif", 14),
            ))
            .map_err(err)?;
        }
    }
    if text {
        area.draw(&Text::new(
            format!("{} ({})", p.title, p.unit),
            (left, 8),
            ("sans-serif", 18),
        ))
        .map_err(err)?;
        let mut x = left;
        for (s, name) in p.series.iter().enumerate() {
            area.draw(&Rectangle::new(
                [(x, 32), (x + 12, 44)],
                COLORS[s % COLORS.len()].filled(),
            ))
            .map_err(err)?;
            area.draw(&Text::new(
                name.to_string(),
                (x + 16, 31),
                ("sans-serif", 13),
            ))
            .map_err(err)?;
            x += 30 + 8 * name.len() as i32;
        }
    }
    Ok(())
}

/// Per-packet cost by scale, and end-to-end connection rate and stream
/// throughput by scale, as grouped bars.
pub fn plot(rep: &Report, path: &Path) -> anyhow::Result<()> {
    let text = font();
    let mut panels = Vec::new();
    const PATHS: &[&str] = &["floor", "non-service", "new flow", "established", "reply"];
    const SYSTEMS: &[&str] = &[
        "direct",
        "eBPF",
        "socket LB",
        "socket LB host",
        "iptables",
        "nftables",
    ];
    if !rep.testrun.is_empty() {
        panels.push(Panel {
            title: "BPF_PROG_TEST_RUN median per packet, by services installed".into(),
            series: PATHS,
            groups: rep
                .testrun
                .iter()
                .map(|r| {
                    (
                        format!("{} {} services", r.family, r.services),
                        [r.floor, r.non_service, r.new_flow, r.established, r.reply]
                            .iter()
                            .map(|v| f64::from(*v))
                            .collect(),
                    )
                })
                .collect(),
            unit: "ns",
        });
    }
    let mut scales: Vec<(IpFamily, usize)> =
        rep.e2e.iter().map(|r| (r.family, r.services)).collect();
    scales.sort_unstable();
    scales.dedup();
    let by = |f: fn(&CaseResult) -> f64| -> Vec<(String, Vec<f64>)> {
        scales
            .iter()
            .map(|&(family, n)| {
                let values = System::ALL
                    .iter()
                    .map(|s| {
                        rep.e2e
                            .iter()
                            .find(|r| r.services == n && r.family == family && r.system == *s)
                            .map_or(f64::NAN, f)
                    })
                    .collect();
                (format!("{family} {n} services"), values)
            })
            .collect()
    };
    if !rep.e2e.is_empty() {
        panels.push(Panel {
            title: "New connections per second to a service".into(),
            series: SYSTEMS,
            groups: by(|r| r.median(|x| x.conns_per_s)),
            unit: "conn/s",
        });
        panels.push(Panel {
            title: "One TCP stream through the service".into(),
            series: SYSTEMS,
            groups: by(|r| r.median(|x| x.stream_gbit_s)),
            unit: "Gbit/s",
        });
        panels.push(Panel {
            title: "Kernel CPU time per connection (bench process, system)".into(),
            series: SYSTEMS,
            groups: by(|r| r.median(|x| x.process_sys_us_per_conn)),
            unit: "µs",
        });
    }
    let (w, panel_h) = (1000u32, 320u32);
    let h = panel_h * panels.len().max(1) as u32;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("drawing: {e:?}"))?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (area, panel) in areas.iter().zip(&panels) {
            draw_panel(area, panel, text)?;
        }
        root.present()
            .map_err(|e| anyhow::anyhow!("drawing: {e:?}"))?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&buf)?;
    Ok(())
}

/// A ratio to a reference with its spread over rounds, or "–" when the
/// reference was not measured (left out by `--systems`).
fn fmt_spread((median, lo, hi): (f64, f64, f64)) -> String {
    if median.is_finite() {
        format!("{median:.2}x [{lo:.2}–{hi:.2}]")
    } else {
        "–".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_spread;

    #[test]
    fn a_ratio_without_its_reference_prints_a_dash_not_nan() {
        assert_eq!(fmt_spread((0.874, 0.7, 1.05)), "0.87x [0.70–1.05]");
        assert_eq!(fmt_spread((f64::NAN, f64::NAN, f64::NAN)), "–");
    }
}
