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
    node::datapath::{BENCH_FLOOR, FROM_POD, TO_POD},
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
    pub flows: usize,
    pub samples: usize,
    pub sync_time: Duration,
    /// Medians, ns per packet.
    pub floor: u32,
    pub non_service: u32,
    /// `to_pod` on a packet between pods (not from a backend).
    pub into_pod: u32,
    pub new_flow: u32,
    pub established: u32,
    pub reply: u32,
    /// Context only: the floor on one packet with repeat = REPEAT (warm
    /// caches, one timer read per REPEAT runs), ns per run. The translating
    /// paths cannot be measured so: the kernel does not restore the packet
    /// between repetitions, so from the second run on a DNATed packet is
    /// no longer addressed to the service.
    pub floor_repeat: u32,
}

const REPEAT: u32 = 10_000;

fn tcp_packet(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Tcp::new(s, d, flags).build(),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => Tcp6::new(s, d, flags).build(),
        _ => unreachable!("a flow of two families: {src} -> {dst}"),
    }
}

/// (source, destination) of a TCP frame of `family`.
fn flow_of(family: IpFamily, frame: &[u8]) -> (SocketAddr, SocketAddr) {
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
            Prog::Floor => BENCH_FLOOR,
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

    /// The floor on `packet`, then `which` on it; returns the latter.
    fn paired(&mut self, which: Prog, packet: &[u8], floor: bool) -> anyhow::Result<(u32, i32)> {
        if floor {
            let (ns, _) = self.run(Prog::Floor, packet)?;
            self.floor_samples.push(ns);
        }
        self.run(which, packet)
    }
}

#[derive(Clone, Copy)]
enum Prog {
    Floor,
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
        floor_samples: Vec::with_capacity(samples * 4),
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
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || {
            format!("non-service verdict {verdict}")
        })?;
        non_service.push(ns);
    }

    // The same packets on their way into the destination pod: no backend
    // sent them, nothing to translate.
    let mut into_pod = Vec::with_capacity(samples);
    for i in 0..samples {
        let pkt = tcp_packet(client_of(family, i), pod_of(family, i), ACK);
        let (ns, verdict) = p.paired(Prog::ToPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || {
            format!("into-pod verdict {verdict}")
        })?;
        into_pod.push(ns);
    }

    // First packet of a new flow: every flow's SYN, flows spread over all
    // services, so conntrack ends up holding every flow.
    let mut new_flow = Vec::with_capacity(flows_n);
    let mut flows = Vec::with_capacity(flows_n);
    for f in 0..flows_n {
        let client = client_of(family, f);
        let service = SocketAddr::new(scenario::service_ip(family, f % services), SERVICE_PORT);
        let pkt = tcp_packet(client, service, SYN);
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, f < samples)?;
        expect(verdict == TC_ACT_OK, || format!("SYN verdict {verdict}"))?;
        let (_, backend) = flow_of(family, &p.out);
        expect(backend.ip() != service.ip(), || "SYN was not DNATed".into())?;
        new_flow.push(ns);
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
        let (ns, verdict) = p.paired(Prog::ToPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || format!("reply verdict {verdict}"))?;
        expect(flow_of(family, &p.out).0 == fl.service, || {
            "reply not translated to the service".into()
        })?;
        reply.push(ns);
    }

    // Established: the client's next packet of a flow that has seen a reply.
    picked.shuffle(&mut rng);
    let mut established = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(fl.client, fl.service, ACK);
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || {
            format!("established verdict {verdict}")
        })?;
        expect(flow_of(family, &p.out).1 == fl.backend, || {
            "established packet left its backend".into()
        })?;
        established.push(ns);
    }

    let floor = median(&mut p.floor_samples);
    let fl = &flows[picked[0]];
    let pkt = tcp_packet(fl.client, fl.service, ACK);
    let (floor_repeat, _) = p.run_repeat(Prog::Floor, &pkt, REPEAT)?;
    drop(p);
    // The runs took the paths they are named after.
    let want = [
        (Counter::NewFlow, flows_n as u64),
        (Counter::ReplyTranslated, picked.len() as u64),
        (Counter::Established, picked.len() as u64),
    ];
    for (counter, n) in want {
        let got = loaded.counter(counter);
        expect(got == n, || {
            format!("counter {counter:?}: {got}, expected {n}")
        })?;
    }
    Ok(ScaleResult {
        family,
        services,
        flows: flows_n,
        samples,
        sync_time,
        floor,
        non_service: median(&mut non_service),
        into_pod: median(&mut into_pod),
        new_flow: median(&mut new_flow),
        established: median(&mut established),
        reply: median(&mut reply),
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
        let r = run_scale(family, services, endpoints, samples)
            .with_context(|| format!("{family} test runs with {services} services"));
        match r {
            Ok(r) => {
                eprintln!(
                    "  {family}, {services} services ({} flows, synced in {:?}): floor {} ns, non-service {} ns, into a pod {} ns, new flow {} ns, established {} ns, reply {} ns; floor with repeat={REPEAT}: {} ns",
                    r.flows, r.sync_time, r.floor, r.non_service, r.into_pod, r.new_flow, r.established, r.reply
                    , r.floor_repeat
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
