//! Per-packet cost of the uplink's programs under BPF_PROG_TEST_RUN, on
//! NodePort flows from outside SNATed to a remote backend (policy
//! Cluster): the XDP program (`xdp_from_outside`, the default) and the tc
//! one (`from_outside`, `--external-datapath tc`), each on a setup of its
//! own built the same way.
//!
//! Method, as the pod rows' ([`crate::testrun`]): many distinct flows, one
//! run per packet (repeat = 1), the kernel-reported duration a sample, the
//! median reported; each measured run paired with a floor run just before
//! it. The floor here is the measured program itself on the same packet
//! sent to an address of the uplink that is no node address: the parse and
//! one `LB_SERVICE_IPS` (`LB6_SERVICE_IPS`) lookup, through the same test
//! run, so both sides carry the same fixed cost.
//!
//! The fixed cost of a test run has no empty program of the same kind to
//! show it: it is estimated as the floor with repeat = 1 minus the floor
//! with repeat = [`REPEAT`] (the floor's packet is left unchanged, so
//! repeat is valid for it, and the kernel reads its timer once per call);
//! the net ratios take that estimate off both sides. The translating runs
//! cannot use repeat.
//!
//! Runs on a thread moved into a network namespace of its own (the FIB a
//! test run consults is the calling thread's): an uplink holding the node's
//! address, a route to the backends' node and a default route towards the
//! clients, permanent neighbours. The packets "arrive" on that uplink, so
//! a next hop out of it is sent back out (XDP_TX, or a tc redirect), as
//! on a real uplink.
//!
//! Established packets (client -> NodePort) are measured twice: with the
//! next hop cached in the flow's NAT entry (what every packet after the
//! first of each second does), and with the cache cleared before the
//! packet (a `bpf_fib_lookup` per packet, as before the cache). Before
//! either packet the bench writes the flow's entry from userspace, its
//! hop stamped fresh or cleared, so both see the same cache state (a hop
//! cached by the setup's packets would be over a second old, and looked
//! up again, for the flows measured last). Replies (backend -> the flow's
//! SNAT port) are measured the same way, their REPLY entry rewritten with
//! its hop stamped fresh.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, ensure, Context as _};
use dataplane_agent::{
    control::model::{Frontend, IpFamily, Protocol},
    node::datapath::{FROM_OUTSIDE, TO_OUTSIDE, XDP_FROM_OUTSIDE},
};
use dataplane_common::{ipv4_to_map, nat_dir, port_to_map, Counter, HopCache, NatKey, IPPROTO_TCP};
use dataplane_testkit::{
    datapath::{Harness, Run, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_TX},
    datapath6::nat6_key,
    netns::link,
    packets::{ACK, SYN},
};
use rand::{rngs::StdRng, seq::SliceRandom as _, SeedableRng as _};

use crate::{
    scenario,
    stats::median,
    testrun::{flow_of, online_cpus, paired_ratio, pin, tcp_packet},
};

/// Repetitions of the floor run that estimates the fixed cost.
const REPEAT: u32 = 10_000;
const SNAT_PORTS: (u16, u16) = (61_000, 65_000);
/// Each service's second NodePort is its NodePort less this, a frontend
/// that keeps the client's address (conntrack, as with policy Local): its
/// flows' replies leave through `to_outside` (tc rows only).
const LOCAL_PORT_OFFSET: u16 = 10_000;

/// The uplink program a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Uplink {
    /// `xdp_from_outside` (the default).
    Xdp,
    /// `from_outside` on tc ingress (`--external-datapath tc`).
    Tc,
}

impl Uplink {
    pub const ALL: [Uplink; 2] = [Uplink::Xdp, Uplink::Tc];

    pub fn program(self) -> &'static str {
        match self {
            Uplink::Xdp => XDP_FROM_OUTSIDE,
            Uplink::Tc => FROM_OUTSIDE,
        }
    }

    /// The verdict of a packet left to the stack.
    fn passed(self) -> i32 {
        match self {
            Uplink::Xdp => XDP_PASS,
            Uplink::Tc => TC_ACT_OK,
        }
    }

    /// The verdict of a translated packet sent back out of the uplink.
    fn sent(self) -> i32 {
        match self {
            Uplink::Xdp => XDP_TX,
            Uplink::Tc => TC_ACT_REDIRECT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UplinkResult {
    pub uplink: Uplink,
    pub family: IpFamily,
    pub services: usize,
    /// NodePorts the flows go to (every service's, unless `spread`).
    pub node_ports: usize,
    pub samples: usize,
    /// Medians, ns per packet.
    pub floor: u32,
    pub new_flow: u32,
    pub established: u32,
    /// Established, the next hop looked up (cache cleared before).
    pub looked_up: u32,
    /// The backend's packet to the SNAT port, its hop cached.
    pub reply: u32,
    /// tc only: `to_outside` on a backend's reply to a client whose
    /// address it saw (a flow tracked in conntrack).
    pub to_outside: Option<u32>,
    pub floor_repeat: u32,
    /// Median paired ratios to the floor, gross and net of the estimated
    /// fixed cost (`floor - floor_repeat`).
    pub ratio: UplinkRatios,
    pub net_ratio: UplinkRatios,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct UplinkRatios {
    pub new_flow: f64,
    pub established: f64,
    pub looked_up: f64,
    pub reply: f64,
    pub to_outside: f64,
}

type Pair = (u32, u32);

fn node_addr(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::Ipv4 => Ipv4Addr::new(192, 168, 100, 1).into(),
        IpFamily::Ipv6 => Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 1).into(),
    }
}

/// An address on the uplink's subnet that is no node address: the floor's.
fn other_addr(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::Ipv4 => Ipv4Addr::new(192, 168, 100, 77).into(),
        IpFamily::Ipv6 => Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 0x77).into(),
    }
}

fn outside_client(family: IpFamily, f: usize) -> SocketAddr {
    let offset = (f / 50_000) as u32;
    let ip: IpAddr = match family {
        IpFamily::Ipv4 => Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + offset).into(),
        IpFamily::Ipv6 => Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xcafe, 0, 0, 0, 0, 1)) + u128::from(offset),
        )
        .into(),
    };
    SocketAddr::new(ip, 10_000 + (f % 50_000) as u16)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    ensure!(status.success(), "ip {args:?} failed");
    Ok(())
}

/// The uplink `uplink0` (a veth, its peer beside it) of a node at
/// 192.168.100.1 / fd00:192:168:100::1; the backends' node at .2 / ::2
/// (routes to 10.0.0.0/8 and fd00:10::/32, where the scenario's pods are),
/// the router at .254 / ::fe; forwarding on. Returns the uplink's ifindex.
fn routed_uplink() -> anyhow::Result<u32> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
    ])?;
    ip(&["link", "set", "uplink0", "up"])?;
    ip(&["link", "set", "uplink1", "up"])?;
    ip(&["addr", "add", "192.168.100.1/24", "dev", "uplink0"])?;
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:192:168:100::1/64",
        "dev",
        "uplink0",
        "nodad",
    ])?;
    ip(&["route", "add", "10.0.0.0/8", "via", "192.168.100.2"])?;
    ip(&["route", "add", "default", "via", "192.168.100.254"])?;
    ip(&[
        "-6",
        "route",
        "add",
        "fd00:10::/32",
        "via",
        "fd00:192:168:100::2",
    ])?;
    ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:192:168:100::fe",
    ])?;
    for (neighbour, mac) in [
        ("192.168.100.2", "02:00:00:00:00:02"),
        ("192.168.100.254", "02:00:00:00:00:fe"),
        ("fd00:192:168:100::2", "02:00:00:00:00:02"),
        ("fd00:192:168:100::fe", "02:00:00:00:00:fe"),
    ] {
        ip(&[
            "neigh",
            "add",
            neighbour,
            "lladdr",
            mac,
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ])?;
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("IPv4 forwarding")?;
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").context("IPv6 forwarding")?;
    let (ifindex, _) = link("uplink0");
    Ok(ifindex)
}

/// A [`HopCache::stamp`] the programs take as fresh for the next half
/// second or more: `CLOCK_MONOTONIC` (their clock, or its coarse variant,
/// which lags it by a tick) a little in the past, so that it is never
/// ahead of the programs' own.
fn fresh_stamp() -> anyhow::Result<u32> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("reading CLOCK_MONOTONIC")?;
    let ns = u64::try_from(now.tv_sec())? * 1_000_000_000 + u64::try_from(now.tv_nsec())?;
    Ok(HopCache::stamp(ns.saturating_sub(50_000_000)))
}

/// How [`rewrite_entry`] leaves the entry's cached next hop.
#[derive(Clone, Copy)]
enum Hop {
    /// Stamped fresh (it must be cached already).
    Fresh,
    /// Cleared: the packet looks it up.
    Cleared,
}

/// The NAT entry of `direction` at `key` (src, dst of that direction's
/// packets), rewritten from userspace with its next hop as `hop` says.
fn rewrite_entry(
    dp: &Harness,
    family: IpFamily,
    (src, dst): (SocketAddr, SocketAddr),
    direction: u8,
    hop: Hop,
) -> anyhow::Result<()> {
    let apply = |cache: &mut HopCache| -> anyhow::Result<()> {
        match hop {
            Hop::Fresh => {
                ensure!(cache.ifindex != 0, "no next hop cached for {src} -> {dst}");
                cache.checked = fresh_stamp()?;
            }
            Hop::Cleared => *cache = HopCache::default(),
        }
        Ok(())
    };
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            let key = NatKey {
                src_addr: ipv4_to_map(s.ip().octets()),
                dst_addr: ipv4_to_map(d.ip().octets()),
                src_port: port_to_map(s.port()),
                dst_port: port_to_map(d.port()),
                proto: IPPROTO_TCP,
                direction,
                _pad: [0; 2],
            };
            let mut nat = dp.nat();
            let mut entry = nat.get(&key, 0).context("the flow's NAT entry")?;
            apply(&mut entry.hop)?;
            nat.insert(key, entry, 0)?;
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            let key = nat6_key(s, d, Protocol::Tcp, direction);
            let mut nat = dp.nat6();
            let mut entry = nat.get(&key, 0).context("the flow's NAT6 entry")?;
            apply(&mut entry.hop)?;
            nat.insert(key, entry, 0)?;
        }
        _ => bail!("a {family} flow of two families"),
    }
    Ok(())
}

struct Flow {
    client: SocketAddr,
    frontend: SocketAddr,
    backend: SocketAddr,
    snat: SocketAddr,
}

impl Flow {
    /// That `out`, the uplink program's run on the backend's packet of
    /// this flow, was sent on back to the client, from the frontend.
    fn ensure_reply(&self, family: IpFamily, uplink: Uplink, out: &Run) -> anyhow::Result<()> {
        ensure!(
            out.verdict == uplink.sent(),
            "reply verdict {}",
            out.verdict
        );
        ensure!(
            flow_of(family, &out.output) == (self.frontend, self.client),
            "reply not translated back to the client"
        );
        Ok(())
    }
}

fn run_scale(
    uplink: Uplink,
    family: IpFamily,
    services: usize,
    samples: usize,
    spread: Option<usize>,
) -> anyhow::Result<UplinkResult> {
    let ifindex = routed_uplink()?;
    let mut dp = Harness::load()?;
    let svcs = scenario::with_node_ports(scenario::services(family, services, 10, None));
    let mut desired = scenario::desired(&svcs);
    let mut node_ports = Vec::new();
    for svc in &svcs {
        let Some(port) = svc.node_port else { continue };
        let frontends = desired.get_mut(&svc.name).expect("every service desired");
        let mut spec = frontends[0].1.clone();
        spec.masquerade_remote = true;
        let frontend = match family {
            IpFamily::Ipv4 => Frontend::node_port(port, Protocol::Tcp),
            IpFamily::Ipv6 => Frontend::node_port6(port, Protocol::Tcp),
        };
        frontends.push((frontend, spec.clone()));
        spec.masquerade_remote = false;
        let local = match family {
            IpFamily::Ipv4 => Frontend::node_port(port - LOCAL_PORT_OFFSET, Protocol::Tcp),
            IpFamily::Ipv6 => Frontend::node_port6(port - LOCAL_PORT_OFFSET, Protocol::Tcp),
        };
        frontends.push((local, spec));
        node_ports.push(port);
    }
    let (_, errors) = dp.engine.sync_all(&desired);
    if let Some(e) = errors.first() {
        bail!("programming {services} services: {e}");
    }
    // The flows' NodePorts: all, or the first `spread`.
    node_ports.truncate(spread.unwrap_or(usize::MAX).max(1));
    let node = node_addr(family);
    match node {
        IpAddr::V4(a) => {
            dp.engine.set_node_addresses(&[a])?;
            dp.set_snat(a, SNAT_PORTS.0, SNAT_PORTS.1);
        }
        IpAddr::V6(a) => {
            dp.engine.set_node_addresses6(&[a])?;
            dp.set_snat6(a, SNAT_PORTS.0, SNAT_PORTS.1);
        }
    }
    // The uplink's ingress program, or (`egress`) tc's `to_outside`.
    let run_on = |packet: &[u8], repeat: u32, egress: bool| {
        let (program, run) = match (uplink, egress) {
            (_, true) => (
                TO_OUTSIDE,
                dp.try_run_on(TO_OUTSIDE, packet, ifindex, repeat),
            ),
            (Uplink::Xdp, false) => (XDP_FROM_OUTSIDE, dp.try_run_xdp_on(packet, ifindex, repeat)),
            (Uplink::Tc, false) => (
                FROM_OUTSIDE,
                dp.try_run_on(FROM_OUTSIDE, packet, ifindex, repeat),
            ),
        };
        run.with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))
    };
    let run = |packet: &[u8], repeat: u32| run_on(packet, repeat, false);
    let ns = |d: std::time::Duration| u32::try_from(d.as_nanos()).unwrap_or(u32::MAX);
    let mut floor_samples = Vec::with_capacity(samples * 5);
    // The floor (the ingress program) on `packet` readdressed to
    // `other_addr`, then `packet` (on egress: through `to_outside`).
    let mut paired_on =
        |from: SocketAddr, to: SocketAddr, flags: u8, pairs: &mut Vec<Pair>, egress: bool| {
            let floor_packet =
                tcp_packet(from, SocketAddr::new(other_addr(family), to.port()), flags);
            let floor = run(&floor_packet, 1)?;
            ensure!(
                floor.verdict == uplink.passed(),
                "floor verdict {}",
                floor.verdict
            );
            floor_samples.push(ns(floor.duration));
            let measured = run_on(&tcp_packet(from, to, flags), 1, egress)?;
            pairs.push((ns(measured.duration), ns(floor.duration)));
            Ok(measured)
        };
    let mut paired = |from: SocketAddr, to: SocketAddr, flags: u8, pairs: &mut Vec<Pair>| {
        paired_on(from, to, flags, pairs, false)
    };

    // Warm-up: code, maps and the test-run path.
    let warm = tcp_packet(
        outside_client(family, 0),
        SocketAddr::new(other_addr(family), 80),
        ACK,
    );
    for _ in 0..2_000 {
        run(&warm, 1)?;
    }

    let mut new_flow = Vec::with_capacity(samples);
    let mut flows = Vec::with_capacity(samples);
    for f in 0..samples {
        let client = outside_client(family, f);
        let frontend = SocketAddr::new(node, node_ports[f % node_ports.len()]);
        let out = paired(client, frontend, SYN, &mut new_flow)?;
        ensure!(out.verdict == uplink.sent(), "SYN verdict {}", out.verdict);
        let (snat, backend) = flow_of(family, &out.output);
        ensure!(snat.ip() == node, "SYN not SNATed to the node: {snat}");
        flows.push(Flow {
            client,
            frontend,
            backend,
            snat,
        });
    }
    // The backend's answer and the client's ACK (establishing the flow,
    // caching both directions' next hops), not measured.
    for fl in &flows {
        let reply = run(&tcp_packet(fl.backend, fl.snat, SYN | ACK), 1)?;
        fl.ensure_reply(family, uplink, &reply)?;
        let ack = run(&tcp_packet(fl.client, fl.frontend, ACK), 1)?;
        ensure!(ack.verdict == uplink.sent(), "ACK verdict {}", ack.verdict);
    }

    let mut rng = StdRng::seed_from_u64(0x0dd ^ services as u64);
    let mut order: Vec<usize> = (0..flows.len()).collect();
    let mut established = Vec::with_capacity(samples);
    let mut looked_up = Vec::with_capacity(samples);
    for (pairs, hop) in [
        (&mut established, Hop::Fresh),
        (&mut looked_up, Hop::Cleared),
    ] {
        order.shuffle(&mut rng);
        for &f in &order {
            let fl = &flows[f];
            let tuple = (fl.client, fl.frontend);
            rewrite_entry(&dp, family, tuple, nat_dir::ORIGINAL, hop)?;
            let out = paired(fl.client, fl.frontend, ACK, pairs)?;
            ensure!(
                out.verdict == uplink.sent(),
                "established verdict {}",
                out.verdict
            );
            ensure!(
                flow_of(family, &out.output) == (fl.snat, fl.backend),
                "established packet left its backend"
            );
        }
    }
    let mut reply = Vec::with_capacity(samples);
    order.shuffle(&mut rng);
    for &f in &order {
        let fl = &flows[f];
        let tuple = (fl.backend, fl.snat);
        rewrite_entry(&dp, family, tuple, nat_dir::REPLY, Hop::Fresh)?;
        let out = paired(fl.backend, fl.snat, ACK, &mut reply)?;
        fl.ensure_reply(family, uplink, &out)?;
    }
    // tc: flows to the frontends that keep the client's address (new,
    // not measured), then their backends' replies through `to_outside`.
    let mut to_outside = Vec::new();
    if uplink == Uplink::Tc {
        let mut local = Vec::with_capacity(samples);
        for f in 0..samples {
            let client = outside_client(family, samples + f);
            let port = node_ports[f % node_ports.len()] - LOCAL_PORT_OFFSET;
            let frontend = SocketAddr::new(node, port);
            let out = run(&tcp_packet(client, frontend, SYN), 1)?;
            ensure!(
                out.verdict == TC_ACT_OK,
                "local SYN verdict {}",
                out.verdict
            );
            let (seen, backend) = flow_of(family, &out.output);
            ensure!(seen == client, "local SYN not from its client: {seen}");
            local.push((client, frontend, backend));
        }
        local.shuffle(&mut rng);
        for &(client, frontend, backend) in &local {
            let out = paired_on(backend, client, SYN | ACK, &mut to_outside, true)?;
            ensure!(
                out.verdict == TC_ACT_OK,
                "to_outside verdict {}",
                out.verdict
            );
            ensure!(
                flow_of(family, &out.output) == (frontend, client),
                "local backend's reply not from the frontend"
            );
        }
    }
    let floor_packet = tcp_packet(
        flows[0].client,
        SocketAddr::new(other_addr(family), flows[0].frontend.port()),
        ACK,
    );
    let floor_repeat = ns(run(&floor_packet, REPEAT)?.duration);
    let (n, local) = (flows.len() as u64, to_outside.len() as u64);
    for (counter, want) in [
        (Counter::NewFlow, n + local),
        (Counter::ReplyTranslated, 2 * n + local),
        (Counter::Established, 3 * n),
    ] {
        let got = dp.counter(counter);
        ensure!(got == want, "counter {counter:?}: {got}, expected {want}");
    }
    let floor = median(&mut floor_samples);
    let fixed = floor.saturating_sub(floor_repeat);
    let ratios = |fixed: u32| UplinkRatios {
        new_flow: paired_ratio(&new_flow, fixed),
        established: paired_ratio(&established, fixed),
        looked_up: paired_ratio(&looked_up, fixed),
        reply: paired_ratio(&reply, fixed),
        to_outside: paired_ratio(&to_outside, fixed),
    };
    let med = |pairs: &[Pair]| median(&mut pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    Ok(UplinkResult {
        uplink,
        family,
        services,
        node_ports: node_ports.len(),
        samples,
        floor,
        new_flow: med(&new_flow),
        established: med(&established),
        looked_up: med(&looked_up),
        reply: med(&reply),
        to_outside: (!to_outside.is_empty()).then(|| med(&to_outside)),
        floor_repeat,
        ratio: ratios(0),
        net_ratio: ratios(fixed),
    })
}

/// Every row: per family and scale, each of `uplinks` on a setup (and
/// network namespace) of its own, one after the other. `spread`: the flows
/// go to the first so many NodePorts only (default: all of them), to tell
/// the map sizes' part in the cost from the working set's.
pub fn run(
    uplinks: &[Uplink],
    families: &[IpFamily],
    scales: &[usize],
    samples: usize,
    spread: Option<usize>,
) -> anyhow::Result<Vec<UplinkResult>> {
    let mut results = Vec::new();
    for &family in families {
        for &services in scales {
            for &uplink in uplinks {
                // A thread of its own in a namespace of its own per row: the
                // namespace goes with the thread.
                let r = std::thread::spawn(move || {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("a network namespace")?;
                    pin(Some(online_cpus() - 1));
                    run_scale(uplink, family, services, samples, spread)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the uplink bench thread panicked"))?
                .with_context(|| {
                    format!(
                        "{family} {} test runs with {services} services",
                        uplink.program()
                    )
                })?;
                eprintln!(
                    "  {} {family}, {services} services: floor {} ns, new flow {} ns ({:.2}x, net {:.2}x), established {} ns ({:.2}x, net {:.2}x), established with a FIB lookup {} ns ({:.2}x, net {:.2}x), reply {} ns ({:.2}x, net {:.2}x); floor with repeat={REPEAT}: {} ns",
                    uplink.program(),
                    r.floor,
                    r.new_flow, r.ratio.new_flow, r.net_ratio.new_flow,
                    r.established, r.ratio.established, r.net_ratio.established,
                    r.looked_up, r.ratio.looked_up, r.net_ratio.looked_up,
                    r.reply, r.ratio.reply, r.net_ratio.reply,
                    r.floor_repeat
                );
                if let Some(ns) = r.to_outside {
                    eprintln!(
                        "    to_outside, a local backend's reply: {ns} ns ({:.2}x, net {:.2}x)",
                        r.ratio.to_outside, r.net_ratio.to_outside
                    );
                }
                results.push(r);
            }
        }
    }
    Ok(results)
}
