//! Per-packet cost of the uplink's XDP program (`xdp_from_outside`) under
//! BPF_PROG_TEST_RUN, on NodePort flows from outside SNATed to a remote
//! backend (policy Cluster): the path issue 12 puts on XDP.
//!
//! Method, as the pod rows' ([`crate::testrun`]): many distinct flows, one
//! run per packet (repeat = 1), the kernel-reported duration a sample, the
//! median reported; each measured run paired with a floor run just before
//! it. The floor here is `xdp_from_outside` itself on the same packet sent
//! to an address of the uplink that is no node address: the parse and one
//! `LB_SERVICE_IPS` (`LB6_SERVICE_IPS`) lookup, through the same XDP test
//! run, so both sides carry the same fixed cost.
//!
//! The fixed cost of an XDP test run has no empty program to show it: it
//! is estimated as the floor with repeat = 1 minus the floor with repeat =
//! [`REPEAT`] (the floor's packet is left unchanged, so repeat is valid for
//! it, and the kernel reads its timer once per call); the net ratios take
//! that estimate off both sides. The translating runs cannot use repeat.
//!
//! Runs on a thread moved into a network namespace of its own (the FIB a
//! test run consults is the calling thread's): an uplink holding the node's
//! address, a route to the backends' node and a default route towards the
//! clients, permanent neighbours. The packets "arrive" on that uplink, so
//! a next hop out of it is sent back out with XDP_TX, as on a real uplink.
//!
//! Established packets are measured twice: with the next hop cached in the
//! flow's NAT entry (what every packet after the first of each second
//! does), and with the cache cleared before the packet (a `bpf_fib_lookup`
//! per packet, as before the cache). Before either packet the bench writes
//! the flow's entry from userspace, unchanged or cleared, so both see the
//! same cache state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, ensure, Context as _};
use dataplane_agent::control::model::{Frontend, IpFamily, Protocol};
use dataplane_common::{ipv4_to_map, nat_dir, port_to_map, Counter, HopCache, NatKey, IPPROTO_TCP};
use dataplane_testkit::{
    datapath::Harness,
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
const XDP_TX: i32 = 3;
const SNAT_PORTS: (u16, u16) = (61_000, 65_000);

#[derive(Debug, Clone)]
pub struct XdpResult {
    pub family: IpFamily,
    pub services: usize,
    pub node_ports: usize,
    pub samples: usize,
    /// Medians, ns per packet.
    pub floor: u32,
    pub new_flow: u32,
    pub established: u32,
    /// Established, the next hop looked up (cache cleared before).
    pub looked_up: u32,
    pub floor_repeat: u32,
    /// Median paired ratios to the floor, gross and net of the estimated
    /// fixed cost (`floor - floor_repeat`).
    pub ratio: XdpRatios,
    pub net_ratio: XdpRatios,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct XdpRatios {
    pub new_flow: f64,
    pub established: f64,
    pub looked_up: f64,
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

/// The flow's NAT entry (ORIGINAL direction), rewritten from userspace:
/// unchanged, or with its cached next hop cleared.
fn rewrite_entry(
    dp: &Harness,
    family: IpFamily,
    client: SocketAddr,
    frontend: SocketAddr,
    clear_hop: bool,
) -> anyhow::Result<()> {
    match (client, frontend) {
        (SocketAddr::V4(c), SocketAddr::V4(f)) => {
            let key = NatKey {
                src_addr: ipv4_to_map(c.ip().octets()),
                dst_addr: ipv4_to_map(f.ip().octets()),
                src_port: port_to_map(c.port()),
                dst_port: port_to_map(f.port()),
                proto: IPPROTO_TCP,
                direction: nat_dir::ORIGINAL,
                _pad: [0; 2],
            };
            let mut nat = dp.nat();
            let mut entry = nat.get(&key, 0).context("the flow's NAT entry")?;
            if clear_hop {
                entry.hop = HopCache::default();
            }
            nat.insert(key, entry, 0)?;
        }
        (SocketAddr::V6(c), SocketAddr::V6(f)) => {
            let key = nat6_key(c, f, Protocol::Tcp, nat_dir::ORIGINAL);
            let mut nat = dp.nat6();
            let mut entry = nat.get(&key, 0).context("the flow's NAT6 entry")?;
            if clear_hop {
                entry.hop = HopCache::default();
            }
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

fn run_scale(family: IpFamily, services: usize, samples: usize) -> anyhow::Result<XdpResult> {
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
        frontends.push((frontend, spec));
        node_ports.push(port);
    }
    let (_, errors) = dp.engine.sync_all(&desired);
    if let Some(e) = errors.first() {
        bail!("programming {services} services: {e}");
    }
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
    let run = |packet: &[u8], repeat: u32| {
        dp.try_run_xdp_on(packet, ifindex, repeat)
            .context("BPF_PROG_TEST_RUN of xdp_from_outside")
    };
    let ns = |d: std::time::Duration| u32::try_from(d.as_nanos()).unwrap_or(u32::MAX);
    let mut floor_samples = Vec::with_capacity(samples * 3);
    // The floor on `packet` readdressed to `other_addr`, then `packet`.
    let mut paired = |client: SocketAddr, to: SocketAddr, flags: u8, pairs: &mut Vec<Pair>| {
        let floor_packet = tcp_packet(
            client,
            SocketAddr::new(other_addr(family), to.port()),
            flags,
        );
        let floor = run(&floor_packet, 1)?;
        ensure!(floor.verdict == 2, "floor verdict {}", floor.verdict);
        floor_samples.push(ns(floor.duration));
        let measured = run(&tcp_packet(client, to, flags), 1)?;
        pairs.push((ns(measured.duration), ns(floor.duration)));
        Ok(measured)
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
        ensure!(out.verdict == XDP_TX, "SYN verdict {}", out.verdict);
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
        ensure!(reply.verdict == XDP_TX, "reply verdict {}", reply.verdict);
        ensure!(
            flow_of(family, &reply.output) == (fl.frontend, fl.client),
            "reply not translated back to the client"
        );
        let ack = run(&tcp_packet(fl.client, fl.frontend, ACK), 1)?;
        ensure!(ack.verdict == XDP_TX, "ACK verdict {}", ack.verdict);
    }

    let mut rng = StdRng::seed_from_u64(0x0dd ^ services as u64);
    let mut order: Vec<usize> = (0..flows.len()).collect();
    let mut established = Vec::with_capacity(samples);
    let mut looked_up = Vec::with_capacity(samples);
    for (pairs, clear_hop) in [(&mut established, false), (&mut looked_up, true)] {
        order.shuffle(&mut rng);
        for &f in &order {
            let fl = &flows[f];
            rewrite_entry(&dp, family, fl.client, fl.frontend, clear_hop)?;
            let out = paired(fl.client, fl.frontend, ACK, pairs)?;
            ensure!(out.verdict == XDP_TX, "established verdict {}", out.verdict);
            ensure!(
                flow_of(family, &out.output) == (fl.snat, fl.backend),
                "established packet left its backend"
            );
        }
    }
    let floor_packet = tcp_packet(
        flows[0].client,
        SocketAddr::new(other_addr(family), flows[0].frontend.port()),
        ACK,
    );
    let floor_repeat = ns(run(&floor_packet, REPEAT)?.duration);
    let n = flows.len() as u64;
    for (counter, want) in [
        (Counter::NewFlow, n),
        (Counter::ReplyTranslated, n),
        (Counter::Established, 3 * n),
    ] {
        let got = dp.counter(counter);
        ensure!(got == want, "counter {counter:?}: {got}, expected {want}");
    }
    let floor = median(&mut floor_samples);
    let fixed = floor.saturating_sub(floor_repeat);
    let ratios = |fixed: u32| XdpRatios {
        new_flow: paired_ratio(&new_flow, fixed),
        established: paired_ratio(&established, fixed),
        looked_up: paired_ratio(&looked_up, fixed),
    };
    let med = |pairs: &[Pair]| median(&mut pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    Ok(XdpResult {
        family,
        services,
        node_ports: node_ports.len(),
        samples,
        floor,
        new_flow: med(&new_flow),
        established: med(&established),
        looked_up: med(&looked_up),
        floor_repeat,
        ratio: ratios(0),
        net_ratio: ratios(fixed),
    })
}

pub fn run(
    families: &[IpFamily],
    scales: &[usize],
    samples: usize,
) -> anyhow::Result<Vec<XdpResult>> {
    let mut results = Vec::new();
    for &family in families {
        for &services in scales {
            // A thread of its own in a namespace of its own per scale: the
            // namespace goes with the thread.
            let r = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("a network namespace")?;
                pin(Some(online_cpus() - 1));
                run_scale(family, services, samples)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the XDP bench thread panicked"))?
            .with_context(|| format!("{family} XDP test runs with {services} services"))?;
            eprintln!(
                "  XDP {family}, {services} services: floor {} ns, new flow {} ns ({:.2}x, net {:.2}x), established {} ns ({:.2}x, net {:.2}x), established with a FIB lookup {} ns ({:.2}x, net {:.2}x); floor with repeat={REPEAT}: {} ns",
                r.floor,
                r.new_flow, r.ratio.new_flow, r.net_ratio.new_flow,
                r.established, r.ratio.established, r.net_ratio.established,
                r.looked_up, r.ratio.looked_up, r.net_ratio.looked_up,
                r.floor_repeat
            );
            results.push(r);
        }
    }
    Ok(results)
}
