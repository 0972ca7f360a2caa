//! Per-packet cost under BPF_PROG_TEST_RUN.
//!
//! Method (the same for every figure): many distinct packets, each run once
//! (repeat = 1), the kernel-reported `duration` of that one run taken as a
//! sample, the median over samples reported. Every measured run is paired
//! with a run of `bench_floor` (parse + one hash lookup) on the same packet
//! just before it, so the floor sees the same machine, caches and map sizes.
//! The thread is pinned to one CPU while measuring.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use dataplane_agent::node::datapath::{BENCH_FLOOR, FROM_POD, TO_POD};
use dataplane_common::Counter;

use crate::{
    bpf::Loaded,
    scenario::{self, SERVICE_PORT},
    stats::{median, Rng},
};

const TC_ACT_OK: u32 = 0;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub services: usize,
    pub flows: usize,
    pub samples: usize,
    pub sync_time: Duration,
    /// Medians, ns per packet.
    pub floor: u32,
    pub non_service: u32,
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

/// Ethernet + IPv4 + TCP, 54 bytes, valid IPv4 header checksum (the L4
/// checksum is left 0: the programs update it incrementally either way).
fn tcp_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> [u8; 54] {
    let mut p = [0u8; 54];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !((folded & 0xffff) + (folded >> 16)) as u16;
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1_000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    p
}

fn dst_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

fn src_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

struct Programs<'a> {
    floor: &'a SchedClassifier,
    from_pod: &'a SchedClassifier,
    to_pod: &'a SchedClassifier,
    out: Vec<u8>,
    floor_samples: Vec<u32>,
}

impl Programs<'_> {
    /// One run with repeat = 1: (kernel duration ns, verdict); the output
    /// frame is left in `self.out`.
    fn run(&mut self, which: Prog, packet: &[u8]) -> anyhow::Result<(u32, u32)> {
        self.run_repeat(which, packet, 1)
    }

    fn run_repeat(
        &mut self,
        which: Prog,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(u32, u32)> {
        let prog = match which {
            Prog::Floor => self.floor,
            Prog::FromPod => self.from_pod,
            Prog::ToPod => self.to_pod,
        };
        self.out.resize(256, 0);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut self.out),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        self.out.truncate(r.data_size_out as usize);
        Ok((
            u32::try_from(r.duration.as_nanos()).unwrap_or(u32::MAX),
            r.return_value,
        ))
    }

    /// The floor on `packet`, then `which` on it; returns the latter.
    fn paired(&mut self, which: Prog, packet: &[u8], floor: bool) -> anyhow::Result<(u32, u32)> {
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
    client: (Ipv4Addr, u16),
    service: (Ipv4Addr, u16),
    backend: (Ipv4Addr, u16),
}

fn client_of(f: usize) -> (Ipv4Addr, u16) {
    let base = u32::from(Ipv4Addr::new(10, 244, 1, 10));
    (
        Ipv4Addr::from(base + (f / 50_000) as u32),
        10_000 + (f % 50_000) as u16,
    )
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if !cond {
        bail!("{}", what());
    }
    Ok(())
}

pub fn run_scale(services: usize, endpoints: usize, samples: usize) -> anyhow::Result<ScaleResult> {
    let mut loaded = Loaded::new()?;
    let svcs = scenario::services(services, endpoints, None);
    let started = Instant::now();
    let (_, errors) = loaded.engine.sync_all(&scenario::desired(&svcs));
    let sync_time = started.elapsed();
    if let Some(e) = errors.first() {
        bail!("programming {services} services: {e}");
    }
    let flows_n = services.max(samples);
    let mut p = Programs {
        floor: loaded.datapath.classifier(BENCH_FLOOR)?,
        from_pod: loaded.datapath.classifier(FROM_POD)?,
        to_pod: loaded.datapath.classifier(TO_POD)?,
        out: Vec::with_capacity(256),
        floor_samples: Vec::with_capacity(samples * 4),
    };
    let mut rng = Rng::new(0x5eed ^ services as u64);

    // Warm-up: code, maps and the test-run path itself.
    let warm = tcp_packet(
        Ipv4Addr::new(10, 244, 1, 10),
        1,
        Ipv4Addr::new(10, 244, 2, 1),
        80,
        ACK,
    );
    for _ in 0..2_000 {
        p.run(Prog::Floor, &warm)?;
        p.run(Prog::FromPod, &warm)?;
    }

    // Non-service: a pod-to-pod packet, distinct destinations.
    let mut non_service = Vec::with_capacity(samples);
    let pod_base = u32::from(Ipv4Addr::new(10, 244, 2, 1));
    for i in 0..samples {
        let (ip, port) = client_of(i);
        let pkt = tcp_packet(
            ip,
            port,
            Ipv4Addr::from(pod_base + (i % 60_000) as u32),
            8080,
            ACK,
        );
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || {
            format!("non-service verdict {verdict}")
        })?;
        non_service.push(ns);
    }

    // First packet of a new flow: every flow's SYN, flows spread over all
    // services, so conntrack ends up holding every flow.
    let mut new_flow = Vec::with_capacity(flows_n);
    let mut flows = Vec::with_capacity(flows_n);
    for f in 0..flows_n {
        let client = client_of(f);
        let service = (scenario::service_ip(f % services), SERVICE_PORT);
        let pkt = tcp_packet(client.0, client.1, service.0, service.1, SYN);
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, f < samples)?;
        expect(verdict == TC_ACT_OK, || format!("SYN verdict {verdict}"))?;
        let backend = dst_of(&p.out);
        expect(backend.0 != service.0, || "SYN was not DNATed".into())?;
        new_flow.push(ns);
        flows.push(Flow {
            client,
            service,
            backend,
        });
    }

    let mut order: Vec<usize> = (0..flows_n).collect();
    rng.shuffle(&mut order);
    let mut picked = order[..samples.min(flows_n)].to_vec();

    // Reply translation: the backend's SYN-ACK on its way to the client.
    let mut reply = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(
            fl.backend.0,
            fl.backend.1,
            fl.client.0,
            fl.client.1,
            SYN | ACK,
        );
        let (ns, verdict) = p.paired(Prog::ToPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || format!("reply verdict {verdict}"))?;
        expect(src_of(&p.out) == fl.service, || {
            "reply not translated to the service".into()
        })?;
        reply.push(ns);
    }

    // Established: the client's next packet of a flow that has seen a reply.
    rng.shuffle(&mut picked);
    let mut established = Vec::with_capacity(samples);
    for &f in &picked {
        let fl = &flows[f];
        let pkt = tcp_packet(fl.client.0, fl.client.1, fl.service.0, fl.service.1, ACK);
        let (ns, verdict) = p.paired(Prog::FromPod, &pkt, true)?;
        expect(verdict == TC_ACT_OK, || {
            format!("established verdict {verdict}")
        })?;
        expect(dst_of(&p.out) == fl.backend, || {
            "established packet left its backend".into()
        })?;
        established.push(ns);
    }

    let floor = median(&mut p.floor_samples);
    let fl = &flows[picked[0]];
    let pkt = tcp_packet(fl.client.0, fl.client.1, fl.service.0, fl.service.1, ACK);
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
        services,
        flows: flows_n,
        samples,
        sync_time,
        floor,
        non_service: median(&mut non_service),
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

pub fn run(scales: &[usize], endpoints: usize, samples: usize) -> anyhow::Result<Vec<ScaleResult>> {
    let cpu = online_cpus() - 1;
    pin(Some(cpu));
    let mut results = Vec::new();
    for &services in scales {
        let r = run_scale(services, endpoints, samples)
            .with_context(|| format!("test runs with {services} services"));
        match r {
            Ok(r) => {
                eprintln!(
                    "  {services} services ({} flows, synced in {:?}): floor {} ns, non-service {} ns, new flow {} ns, established {} ns, reply {} ns; floor with repeat={REPEAT}: {} ns",
                    r.flows, r.sync_time, r.floor, r.non_service, r.new_flow, r.established, r.reply
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
