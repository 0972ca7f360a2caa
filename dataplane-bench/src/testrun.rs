//! Per-packet cost under BPF_PROG_TEST_RUN.
//!
//! Method (the same for every figure): many distinct packets, each run once
//! (repeat = 1), the kernel-reported `duration` of that one run taken as a
//! sample, the median over samples reported. Every measured run is paired
//! with a run of `bench_floor` (parse + one hash lookup) on the same packet
//! just before it, so the floor sees the same machine, caches and map sizes.
//! The thread is pinned to one CPU while measuring.
//!
//! IPv6 rows: the same flows over an IPv6-only set of services, through the
//! IPv6 paths of the same programs; `bench_floor` takes the IPv6 parse and
//! one `LB6_SERVICE_IPS` lookup for them, so each family's ratio is to its
//! own floor.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use dataplane_agent::{
    control::model::IpFamily,
    node::datapath::{
        BENCH_EMPTY, BENCH_FLOOR, BENCH_FLOOR_FLOW, BENCH_FLOOR_INSERT, FROM_POD, TO_POD,
    },
};
use dataplane_common::Counter;
use dataplane_testkit::{
    datapath::{Harness, TC_ACT_OK},
    packets::{self, Tcp, ACK, SYN},
    packets6::{endpoints6, Tcp6},
};
use rand::{rngs::StdRng, seq::SliceRandom as _, SeedableRng as _};

use crate::{
    scenario::{self, SERVICE_PORT},
    stats::median,
};

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub family: IpFamily,
    pub services: usize,
    /// Endpoints per service: fewer than asked where the asked number does
    /// not fit the maps (see [`fitting_endpoints`]).
    pub endpoints: usize,
    pub flows: usize,
    pub samples: usize,
    pub sync_time: Duration,
    /// Medians, ns per packet.
    pub floor: u32,
    pub non_service: u32,
    /// `to_pod` on a packet between pods (not from a backend).
    pub into_pod: u32,
    /// A backend's packet of no flow of this node (a socket-translated or
    /// direct connection): `from_pod` as it leaves the backend, `to_pod`
    /// as it goes into its client. Both leave it as it is.
    pub backend_out: u32,
    pub backend_in: u32,
    pub new_flow: u32,
    pub established: u32,
    /// `bench_floor_flow` (the floor plus one conntrack lookup of the
    /// packet's own flow) on the established packets, in a pass of its own
    /// after theirs: the least an established packet costs with per-flow
    /// state in a BPF hash map. Median, ns.
    pub floor_flow: u32,
    /// established / floor_flow (medians), gross and net of `empty`.
    pub established_to_floor_flow: (f64, f64),
    /// `bench_floor_insert` (the floor plus the two conntrack inserts of
    /// a new flow) on SYNs of flows of its own, after every other pass:
    /// the least a new flow costs with its flows in a BPF LRU hash map.
    /// Median, ns.
    pub floor_insert: u32,
    /// new_flow / floor_insert (medians), gross and net of `empty`.
    pub new_flow_to_floor_insert: (f64, f64),
    /// The two reference programs to the floor (median over their paired
    /// runs), gross and net: what any design tracking flows in BPF hash
    /// maps pays at least, in the targets' own unit.
    pub floor_flow_ratio: (f64, f64),
    pub floor_insert_ratio: (f64, f64),
    pub reply: u32,
    /// A later reply of an established flow (after one reply that found
    /// the flow established), as most of a flow's replies are.
    pub reply_established: u32,
    /// `bench_empty` (returns at once) with repeat = 1: the fixed cost of
    /// one test run, inside every other figure. Median, ns.
    pub empty: u32,
    /// Median over the paired samples of (path / its floor run).
    pub ratio: Ratios,
    /// The same with the median `empty` taken off both sides of each pair:
    /// the programs' own cost, without the test run's.
    pub net_ratio: Ratios,
    /// Context only: the floor on one packet with repeat = REPEAT (warm
    /// caches, one timer read per REPEAT runs), ns per run. The translating
    /// paths cannot be measured so: the kernel does not restore the packet
    /// between repetitions, so from the second run on a DNATed packet is
    /// no longer addressed to the service.
    pub floor_repeat: u32,
}

const REPEAT: u32 = 10_000;

/// Per-path ratios to the floor, each the median over paired samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ratios {
    pub non_service: f64,
    pub into_pod: f64,
    pub backend_out: f64,
    pub backend_in: f64,
    pub new_flow: f64,
    pub established: f64,
    pub reply: f64,
    pub reply_established: f64,
}

/// (path ns, floor ns) of one packet, the floor run just before.
type Pair = (u32, u32);

/// Median over `pairs` of path / floor, with `fixed` taken off both.
pub(crate) fn paired_ratio(pairs: &[Pair], fixed: u32) -> f64 {
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|&(path, floor)| {
            let net = |ns: u32| f64::from(ns.saturating_sub(fixed).max(1));
            net(path) / net(floor)
        })
        .collect();
    if ratios.is_empty() {
        return 0.0;
    }
    ratios.sort_unstable_by(f64::total_cmp);
    ratios[(ratios.len() - 1) / 2 + usize::from(ratios.len().is_multiple_of(2))]
}

fn ratios(pairs: [&[Pair]; 8], fixed: u32) -> Ratios {
    let [non_service, into_pod, backend_out, backend_in, new_flow, established, reply, reply_established] =
        pairs.map(|p| paired_ratio(p, fixed));
    Ratios {
        non_service,
        into_pod,
        backend_out,
        backend_in,
        new_flow,
        established,
        reply,
        reply_established,
    }
}

pub(crate) fn tcp_packet(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Tcp::new(s, d, flags).build(),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => Tcp6::new(s, d, flags).build(),
        _ => unreachable!("a flow of two families: {src} -> {dst}"),
    }
}

/// (source, destination) of a TCP frame of `family`.
pub(crate) fn flow_of(family: IpFamily, frame: &[u8]) -> (SocketAddr, SocketAddr) {
    match family {
        IpFamily::Ipv4 => {
            let (s, d) = packets::endpoints(frame);
            (s.into(), d.into())
        }
        IpFamily::Ipv6 => {
            let (s, d) = endpoints6(frame);
            (s.into(), d.into())
        }
    }
}

/// `v4` + `offset` or `v6` + `offset`, as `family` says.
fn address(family: IpFamily, v4: Ipv4Addr, v6: Ipv6Addr, offset: u32) -> IpAddr {
    match family {
        IpFamily::Ipv4 => Ipv4Addr::from(u32::from(v4) + offset).into(),
        IpFamily::Ipv6 => Ipv6Addr::from(u128::from(v6) + u128::from(offset)).into(),
    }
}

struct Programs<'a> {
    datapath: &'a Harness,
    floor_samples: Vec<u32>,
    empty_samples: Vec<u32>,
    /// The output frame of the last run.
    out: Vec<u8>,
}

impl Programs<'_> {
    /// One run with repeat = 1: (kernel duration ns, verdict); the output
    /// frame is left in `self.out`.
    fn run(&mut self, which: Prog, packet: &[u8]) -> anyhow::Result<(u32, i32)> {
        self.run_repeat(which, packet, 1)
    }

    fn run_repeat(
        &mut self,
        which: Prog,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(u32, i32)> {
        let program = match which {
            Prog::Empty => BENCH_EMPTY,
            Prog::Floor => BENCH_FLOOR,
            Prog::FloorFlow => BENCH_FLOOR_FLOW,
            Prog::FloorInsert => BENCH_FLOOR_INSERT,
            Prog::FromPod => FROM_POD,
            Prog::ToPod => TO_POD,
        };
        let run = self
            .datapath
            .run_repeat(program, packet, repeat)
            .context("BPF_PROG_TEST_RUN")?;
        self.out = run.output;
        Ok((
            u32::try_from(run.duration.as_nanos()).unwrap_or(u32::MAX),
            run.verdict,
        ))
    }

    /// The empty program and the floor on `packet`, then `which` on it;
    /// returns the latter, and adds (it, floor) to `pairs`.
    fn paired(
        &mut self,
        which: Prog,
        packet: &[u8],
        pairs: Option<&mut Vec<Pair>>,
    ) -> anyhow::Result<(u32, i32)> {
        let Some(pairs) = pairs else {
            return self.run(which, packet);
        };
        let (empty, _) = self.run(Prog::Empty, packet)?;
        self.empty_samples.push(empty);
        let (floor, _) = self.run(Prog::Floor, packet)?;
        self.floor_samples.push(floor);
        let (ns, verdict) = self.run(which, packet)?;
        pairs.push((ns, floor));
        Ok((ns, verdict))
    }
}

#[derive(Clone, Copy)]
enum Prog {
    Empty,
    Floor,
    FloorFlow,
    FloorInsert,
    FromPod,
    ToPod,
}

struct Flow {
    client: SocketAddr,
    service: SocketAddr,
    backend: SocketAddr,
}

fn client_of(family: IpFamily, f: usize) -> SocketAddr {
    let ip = address(
        family,
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10),
        (f / 50_000) as u32,
    );
    SocketAddr::new(ip, 10_000 + (f % 50_000) as u16)
}

/// A pod on another node, not a service: pod-to-pod traffic.
fn pod_of(family: IpFamily, i: usize) -> SocketAddr {
    let ip = address(
        family,
        Ipv4Addr::new(10, 244, 2, 1),
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 1),
        (i % 60_000) as u32,
    );
    SocketAddr::new(ip, 8080)
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if !cond {
        bail!("{}", what());
    }
    Ok(())
}

pub fn run_scale(
    family: IpFamily,
    services: usize,
    endpoints: usize,
    samples: usize,
) -> anyhow::Result<ScaleResult> {
    let mut loaded = Harness::load()?;
    let svcs = scenario::services(family, services, endpoints, None);
    let started = Instant::now();
    let (_, errors) = loaded.engine.sync_all(&scenario::desired(&svcs));
    let sync_time = started.elapsed();
    if let Some(e) = errors.first() {
        bail!("programming {services} services: {e}");
    }
    let flows_n = services.max(samples);
    let mut p = Programs {
        datapath: &loaded,
        floor_samples: Vec::with_capacity(samples * 5),
        empty_samples: Vec::with_capacity(samples * 5),
        out: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(0x5eed ^ services as u64);

    // Warm-up: code, maps and the test-run path itself.
    let warm = tcp_packet(client_of(family, 0), pod_of(family, 0), ACK);
    for _ in 0..2_000 {
        p.run(Prog::Floor, &warm)?;
        p.run(Prog::FromPod, &warm)?;
    }

    // Non-service: a pod-to-pod packet, distinct destinations.
    let mut non_service = Vec::with_capacity(samples);
    for i in 0..samples {
        let pkt = tcp_packet(client_of(family, i), pod_of(family, i), ACK);
        let (_, verdict) = p.paired(Prog::FromPod, &pkt, Some(&mut non_service))?;
        expect(verdict == TC_ACT_OK, || {
            format!("non-service verdict {verdict}")
        })?;
    }

    // The same packets on their way into the destination pod: no backend
    // sent them, nothing to translate.
    let mut into_pod = Vec::with_capacity(samples);
    for i in 0..samples {
        let pkt = tcp_packet(client_of(family, i), pod_of(family, i), ACK);
        let (_, verdict) = p.paired(Prog::ToPod, &pkt, Some(&mut into_pod))?;
        expect(verdict == TC_ACT_OK, || {
            format!("into-pod verdict {verdict}")
        })?;
    }

    // A backend's packets of connections this node's programs did not
    // translate (socket LB translated them at connect(), or the client
    // dialled the pod IP), before any flow of the tc path exists (as with
    // socket LB on): to a client, left byte for byte by both programs.
    let (mut backend_out, mut backend_in) = (Vec::new(), Vec::new());
    let all_backends: Vec<SocketAddr> = svcs
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| SocketAddr::new(b.ip, b.port)))
        .collect();
    for i in 0..samples {
        let backend = all_backends[i % all_backends.len()];
        let pkt = tcp_packet(backend, client_of(family, i), ACK);
        for (prog, pairs) in [
            (Prog::FromPod, &mut backend_out),
            (Prog::ToPod, &mut backend_in),
        ] {
            let (_, verdict) = p.paired(prog, &pkt, Some(pairs))?;
            expect(verdict == TC_ACT_OK && p.out == pkt, || {
                format!("backend packet without a flow: verdict {verdict}, or changed")
            })?;
        }
    }

    // First packet of a new flow: every flow's SYN, flows spread over all
    // services, so conntrack ends up holding every flow.
    let mut new_flow = Vec::with_capacity(flows_n);
    let mut flows = Vec::with_capacity(flows_n);
    for f in 0..flows_n {
        let client = client_of(family, f);
        let service = SocketAddr::new(scenario::service_ip(family, f % services), SERVICE_PORT);
        let pkt = tcp_packet(client, service, SYN);
        let pairs = (f < samples).then_some(&mut new_flow);
        let (_, verdict) = p.paired(Prog::FromPod, &pkt, pairs)?;
        expect(verdict == TC_ACT_OK, || format!("SYN verdict {verdict}"))?;
        let (_, backend) = flow_of(family, &p.out);
        expect(backend.ip() != service.ip(), || "SYN was not DNATed".into())?;
        flows.push(Flow {
            client,
            service,
            backend,
        });
    }

    let mut order: Vec<usize> = (0..flows_n).collect();
    order.shuffle(&mut rng);
    let mut picked = order[..samples.min(flows_n)].to_vec();

    // Reply translation: the backend's SYN-ACK on its way to the client.
    let mut reply = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(fl.backend, fl.client, SYN | ACK);
        let (_, verdict) = p.paired(Prog::ToPod, &pkt, Some(&mut reply))?;
        expect(verdict == TC_ACT_OK, || format!("reply verdict {verdict}"))?;
        expect(flow_of(family, &p.out).0 == fl.service, || {
            "reply not translated to the service".into()
        })?;
    }

    // The client's ACK that completes each handshake (it moves the flow to
    // established, a write made once per flow), not measured: the figure
    // is of the packets after it, the flow's every other packet.
    for &f in &picked {
        let fl = &flows[f];
        let (_, verdict) = p.run(Prog::FromPod, &tcp_packet(fl.client, fl.service, ACK))?;
        expect(verdict == TC_ACT_OK, || {
            format!("handshake ACK verdict {verdict}")
        })?;
    }

    // Established: a later packet of a flow whose handshake is complete,
    // the flows in another order (each packet's flow cold in the cache, as
    // with many flows at once).
    picked.shuffle(&mut rng);
    let mut established = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(fl.client, fl.service, ACK);
        let (_, verdict) = p.paired(Prog::FromPod, &pkt, Some(&mut established))?;
        expect(verdict == TC_ACT_OK, || {
            format!("established verdict {verdict}")
        })?;
        expect(flow_of(family, &p.out).1 == fl.backend, || {
            "established packet left its backend".into()
        })?;
    }

    // The same packets through the floor plus one lookup of their own
    // conntrack entry, the flows in another order, each after the same
    // empty and floor runs: the part of "established" any design with
    // per-flow state in a hash map pays. A pass of its own: paired before
    // the established runs, its lookup would warm theirs.
    picked.shuffle(&mut rng);
    let mut floor_flow = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(fl.client, fl.service, ACK);
        let (_, verdict) = p.paired(Prog::FloorFlow, &pkt, Some(&mut floor_flow))?;
        expect(verdict == TC_ACT_OK, || {
            format!("flow floor verdict {verdict}: the flow's entry was not found")
        })?;
    }

    // A later reply of each of those flows: the backend's data after the
    // handshake. One reply first, not measured, finds the flow established
    // (and stamps its reply entry: `ct4_reply_accept`); the measured one
    // follows, the flows shuffled again: what a busy flow's replies cost.
    let data_reply = |fl: &Flow| tcp_packet(fl.backend, fl.client, ACK);
    for &f in &picked {
        let (_, verdict) = p.run(Prog::ToPod, &data_reply(&flows[f]))?;
        expect(verdict == TC_ACT_OK, || {
            format!("first data reply verdict {verdict}")
        })?;
    }
    picked.shuffle(&mut rng);
    let mut reply_established = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let (_, verdict) = p.paired(Prog::ToPod, &data_reply(fl), Some(&mut reply_established))?;
        expect(verdict == TC_ACT_OK, || {
            format!("established reply verdict {verdict}")
        })?;
        expect(flow_of(family, &p.out).0 == fl.service, || {
            "established reply not translated to the service".into()
        })?;
    }

    // The floor plus a new flow's two conntrack inserts, on SYNs of flows
    // no other pass made (clients past the measured ones), last: its
    // entries, which hold nothing, are met by no later run.
    let mut floor_insert = Vec::with_capacity(samples);
    for i in 0..samples {
        let client = client_of(family, flows_n + i);
        let service = SocketAddr::new(scenario::service_ip(family, i % services), SERVICE_PORT);
        let pkt = tcp_packet(client, service, SYN);
        let (_, verdict) = p.paired(Prog::FloorInsert, &pkt, Some(&mut floor_insert))?;
        expect(verdict == TC_ACT_OK, || {
            format!("insert floor verdict {verdict}: an entry was there or the map refused it")
        })?;
    }

    let empty = median(&mut p.empty_samples);
    let floor = median(&mut p.floor_samples);
    let fl = &flows[picked[0]];
    let pkt = tcp_packet(fl.client, fl.service, ACK);
    let (floor_repeat, _) = p.run_repeat(Prog::Floor, &pkt, REPEAT)?;
    drop(p);
    // The runs took the paths they are named after.
    let want = [
        (Counter::NewFlow, flows_n as u64),
        (Counter::ReplyTranslated, 3 * picked.len() as u64),
        (Counter::Established, 2 * picked.len() as u64),
    ];
    for (counter, n) in want {
        let got = loaded.counter(counter);
        expect(got == n, || {
            format!("counter {counter:?}: {got}, expected {n}")
        })?;
    }
    let pairs = [
        &non_service[..],
        &into_pod,
        &backend_out,
        &backend_in,
        &new_flow,
        &established,
        &reply,
        &reply_established,
    ];
    let ratio = ratios(pairs, 0);
    let net_ratio = ratios(pairs, empty);
    let ns = |pairs: &[Pair]| median(&mut pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let (established_ns, floor_flow_ns) = (ns(&established), ns(&floor_flow));
    let over_floor_flow = |fixed: u32| paired_ratio(&[(established_ns, floor_flow_ns)], fixed);
    let (new_flow_ns, floor_insert_ns) = (ns(&new_flow), ns(&floor_insert));
    let over_floor_insert = |fixed: u32| paired_ratio(&[(new_flow_ns, floor_insert_ns)], fixed);
    Ok(ScaleResult {
        family,
        services,
        endpoints,
        flows: flows_n,
        samples,
        sync_time,
        floor,
        non_service: ns(&non_service),
        into_pod: ns(&into_pod),
        backend_out: ns(&backend_out),
        backend_in: ns(&backend_in),
        new_flow: new_flow_ns,
        established: established_ns,
        floor_flow: floor_flow_ns,
        established_to_floor_flow: (over_floor_flow(0), over_floor_flow(empty)),
        floor_insert: floor_insert_ns,
        new_flow_to_floor_insert: (over_floor_insert(0), over_floor_insert(empty)),
        floor_flow_ratio: (
            paired_ratio(&floor_flow, 0),
            paired_ratio(&floor_flow, empty),
        ),
        floor_insert_ratio: (
            paired_ratio(&floor_insert, 0),
            paired_ratio(&floor_insert, empty),
        ),
        reply: ns(&reply),
        reply_established: ns(&reply_established),
        empty,
        ratio,
        net_ratio,
        floor_repeat,
    })
}

/// Pins the calling thread to `cpu`, or back to every CPU with `None`.
pub fn pin(cpu: Option<usize>) {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    let n = online_cpus();
    match cpu {
        Some(c) => {
            let _ = set.set(c.min(n - 1));
        }
        None => {
            for c in 0..n {
                let _ = set.set(c);
            }
        }
    }
    let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// CPUs online (not just those this thread may run on).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The most endpoints per service, up to `endpoints`, with which
/// `services` services fit `BACKEND_SLOTS`: the agent gives each frontend a
/// block of slots of the next power of two (10 endpoints take 16), so
/// 100 000 services of 10 endpoints would need 1 638 400 slots, over the
/// map's 1 048 576. A limit of the agent's layout, not of the bench: an
/// operator with that many service ports of over 8 endpoints meets it too.
pub fn fitting_endpoints(services: usize, endpoints: usize) -> usize {
    let capacity = dataplane_common::capacity::BACKEND_SLOTS as usize;
    let mut fit = endpoints;
    while fit > 1 && services * fit.next_power_of_two() > capacity {
        fit = fit.next_power_of_two() / 2;
    }
    fit
}

pub fn run(
    families: &[IpFamily],
    scales: &[usize],
    endpoints: usize,
    samples: usize,
) -> anyhow::Result<Vec<ScaleResult>> {
    let cpu = online_cpus() - 1;
    pin(Some(cpu));
    let mut results = Vec::new();
    for (&family, &services) in families
        .iter()
        .flat_map(|f| scales.iter().map(move |s| (f, s)))
    {
        let fit = fitting_endpoints(services, endpoints);
        if fit < endpoints {
            eprintln!(
                "  {family}, {services} services: {endpoints} endpoints each would not fit BACKEND_SLOTS; {fit} each"
            );
        }
        let r = run_scale(family, services, fit, samples)
            .with_context(|| format!("{family} test runs with {services} services"));
        match r {
            Ok(r) => {
                eprintln!(
                    "  {family}, {services} services ({} flows, synced in {:?}): empty {} ns, floor {} ns, non-service {} ns, into a pod {} ns, backend packet without a flow out {} ns / in {} ns, new flow {} ns ({:.2}x, net {:.2}x; {:.2}x, net {:.2}x the floor with the flow's inserts, {} ns), established {} ns ({:.2}x, net {:.2}x; {:.2}x, net {:.2}x the floor with a flow lookup, {} ns), reply {} ns ({:.2}x, net {:.2}x), reply of an established flow {} ns ({:.2}x, net {:.2}x); floor with repeat={REPEAT}: {} ns",
                    r.flows, r.sync_time, r.empty, r.floor, r.non_service, r.into_pod,
                    r.backend_out, r.backend_in,
                    r.new_flow, r.ratio.new_flow, r.net_ratio.new_flow,
                    r.new_flow_to_floor_insert.0, r.new_flow_to_floor_insert.1, r.floor_insert,
                    r.established, r.ratio.established, r.net_ratio.established,
                    r.established_to_floor_flow.0, r.established_to_floor_flow.1, r.floor_flow,
                    r.reply, r.ratio.reply, r.net_ratio.reply,
                    r.reply_established, r.ratio.reply_established, r.net_ratio.reply_established,
                    r.floor_repeat
                );
                results.push(r);
            }
            Err(e) => {
                pin(None);
                return Err(e);
            }
        }
    }
    pin(None);
    Ok(results)
}
