//! End to end through network namespaces: a node with a `cbr0` bridge and
//! two pods (client, server) on veth pairs; the project's own server in the
//! server pod and load generator in the client pod. Every system gets its
//! own topology, so no system inherits another's netfilter state.
//!
//! Method: at each scale every system is set up once, side by side, then
//! measured in interleaved rounds (direct, eBPF, iptables, nftables, then
//! again), so a slow spell of this shared 2-core machine hits every system
//! alike. Each ratio to direct is taken within a round; the report gives
//! the median and spread of those ratios over rounds.
//!
//! Load: `concurrency` threads each loop connect / one request / close for
//! a fixed time. The connect() call is the latency sample (SYN to SYN-ACK
//! through the translation). Connections are closed with RST (SO_LINGER 0)
//! so no TIME_WAIT state limits the rate of any case. Beside the rate, the
//! CPU time the kernel spent per connection: system and softirq time of the
//! whole node (/proc/stat) and of this process (client and server threads;
//! without IRQ time accounting the softirq work done on their behalf is in
//! their system time). It is what a node pays and far less noisy than the
//! rate.
//!
//! Families: each system is measured on an IPv4 and an IPv6 cluster (pods,
//! node and services of that one family; kube-proxy's ip6tables and
//! `ip6 kube-proxy` layouts for IPv6), all cases of a scale interleaved in
//! the same rounds; IPv6 ratios are to direct over IPv6.

use std::{
    any::Any,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Barrier,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use dataplane_agent::control::model::{BackendAddr, IpFamily};
use dataplane_lab::{
    agent::{agent_bin, Agent, Source},
    cgroup,
    netns::{self, in_netns, ip, spawn_in_netns, Netns},
};
use dataplane_testkit::datapath::Bpffs;

use crate::{
    kubeproxy_rules::{self, iptables_restore_of},
    scenario::{self, SERVICE_PORT, TARGET_PORT},
    stats::percentile,
};

/// The pods' subnet on the node's bridge: (gateway, prefix length); the
/// client is host .10 (::10), the server .11 (::11).
fn pod_subnet(family: IpFamily) -> (IpAddr, u8) {
    match family {
        IpFamily::Ipv4 => (Ipv4Addr::new(10, 244, 1, 1).into(), 24),
        IpFamily::Ipv6 => (Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1).into(), 64),
    }
}

fn pod_ip(family: IpFamily, host: u8) -> IpAddr {
    match family {
        IpFamily::Ipv4 => Ipv4Addr::new(10, 244, 1, host).into(),
        // ::10 and ::11, the IPv4 hosts' digits.
        IpFamily::Ipv6 => {
            let host = u16::from_str_radix(&host.to_string(), 16).expect("decimal digits");
            Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, host).into()
        }
    }
}

fn client_ip(family: IpFamily) -> IpAddr {
    pod_ip(family, 10)
}

fn server_ip(family: IpFamily) -> IpAddr {
    pod_ip(family, 11)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// Connecting to the backend pod IP: no service at all (the limit).
    Direct,
    /// This dataplane: the agent binary in the node; the client pod is
    /// outside the node's cgroup, so the tc programs translate.
    Ebpf,
    /// The same, `--direct-redirect true`: translated packets go straight
    /// to the backend instead of through the node's stack.
    EbpfRedirect,
    /// The same agent, the client pod's process in the node's cgroup: its
    /// sockets are translated at connect() (socket-level load balancing).
    SocketLb,
    /// As `SocketLb`, the client a host-network process of the node.
    SocketLbHost,
    /// Diagnostic, not in the default set: connecting to the backend pod
    /// IP as `Direct`, with the agent running (tc programs on the pod
    /// interfaces) and the client outside the node's cgroup: what the
    /// tc programs cost traffic they do not translate.
    DirectAgentTc,
    /// Diagnostic, not in the default set: as `DirectAgentTc`, the client's
    /// process in the node's cgroup (as `SocketLb`): the socket hooks run
    /// and translate nothing. `SocketLb` minus this is the translation.
    DirectAgent,
    /// kube-proxy's iptables layout, loaded with iptables-restore.
    Iptables,
    /// kube-proxy's nftables layout, loaded with nft -f.
    Nftables,
}

impl System {
    pub const ALL: [System; 7] = [
        System::Direct,
        System::Ebpf,
        System::EbpfRedirect,
        System::SocketLb,
        System::SocketLbHost,
        System::Iptables,
        System::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            System::Direct => "direct (no service)",
            System::Ebpf => "eBPF dataplane",
            System::EbpfRedirect => "eBPF dataplane, --direct-redirect true",
            System::SocketLb => "eBPF socket LB",
            System::SocketLbHost => "eBPF socket LB, host client",
            System::DirectAgentTc => "direct, agent running, client outside its cgroup",
            System::DirectAgent => "direct, agent running, client in its cgroup",
            System::Iptables => "kube-proxy iptables",
            System::Nftables => "kube-proxy nftables",
        }
    }
}

/// One system measured in one round.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub conns_per_s: f64,
    pub connect_p50_us: u32,
    pub connect_p99_us: u32,
    pub errors: u64,
    pub stream_gbit_s: f64,
    /// Node-wide system + irq + softirq time per connection, µs.
    pub node_cpu_us_per_conn: f64,
    /// This process's system time per connection, µs.
    pub process_sys_us_per_conn: f64,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub system: System,
    pub family: IpFamily,
    pub services: usize,
    /// In round order.
    pub rounds: Vec<Round>,
    /// Loading the rules or starting the agent, until traffic flows.
    pub setup: Duration,
}

impl CaseResult {
    /// Median over rounds of `f`.
    pub fn median(&self, f: impl Fn(&Round) -> f64) -> f64 {
        median_f64(self.rounds.iter().map(f).collect())
    }
}

/// Median of finite values (mean of the two middle ones for an even count);
/// NaN for none.
pub fn median_f64(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// CPU time counters at one instant, in seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuTimes {
    /// /proc/stat: system + irq + softirq over all CPUs.
    pub(crate) node_kernel: f64,
    /// getrusage(RUSAGE_SELF): system time of every thread of this process.
    pub(crate) process_sys: f64,
}

impl CpuTimes {
    pub(crate) fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        // cpu user nice system idle iowait irq softirq ...
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        anyhow::ensure!(f.len() >= 7, "short cpu line in /proc/stat: {line}");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // SAFETY: all-zero is a valid `rusage` (plain integers).
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one `rusage` through a valid pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        let sys = usage.ru_stime;
        Ok(Self {
            node_kernel: (f[2] + f[5] + f[6]) as f64 / hz,
            process_sys: sys.tv_sec as f64 + sys.tv_usec as f64 / 1e6,
        })
    }
}

struct Topology {
    // Pods first: dropped (deleted) before the node.
    client: Netns,
    server: Netns,
    node: Netns,
}

impl Topology {
    /// Node and pods with addresses of `family` only, on a bridge or
    /// routed (`pods`).
    fn build(family: IpFamily, pods: PodNetwork) -> anyhow::Result<Self> {
        let node = Netns::new("node")?;
        let client = Netns::new("cli")?;
        let server = Netns::new("srv")?;
        let v6 = family == IpFamily::Ipv6;
        for ns in [&node, &client, &server] {
            if v6 {
                // Usable at once: nothing else on these links could hold
                // an address, and a tentative one cannot be a source.
                ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
                ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            }
        }
        netns::forward_as_a_node(&node.name)?;
        if v6 {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        let pod_addrs = [
            (&client, "vethclient", client_ip(family)),
            (&server, "vethserver", server_ip(family)),
        ];
        if pods == PodNetwork::Routed {
            Self::route_pods(&node, family, &pod_addrs)?;
        } else {
            Self::bridge_pods(&node, family, &pod_addrs)?;
        }
        // Shared by both families' ports.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(Self {
            client,
            server,
            node,
        })
    }

    /// Calico's layout: /32 (/128) pods, each behind its own veth, with a
    /// link-local gateway the node answers for (IPv4: 169.254.1.1 by proxy
    /// ARP; IPv6: fe80::1 on each host veth, link-local being per link).
    fn route_pods(
        node: &Netns,
        family: IpFamily,
        pods: &[(&Netns, &str, IpAddr)],
    ) -> anyhow::Result<()> {
        let n = node.name.as_str();
        let (gateway, host_len) = match family {
            IpFamily::Ipv4 => ("169.254.1.1", 32),
            IpFamily::Ipv6 => ("fe80::1", 128),
        };
        if family == IpFamily::Ipv4 {
            ip(&["-n", n, "route", "add", "169.254.1.1/32", "dev", "lo"])?;
        }
        for &(pod, host_if, addr) in pods {
            let p = pod.name.as_str();
            ip(&[
                "-n", n, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", p,
            ])?;
            ip(&["-n", n, "link", "set", host_if, "up"])?;
            match family {
                IpFamily::Ipv4 => {
                    node.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?
                }
                IpFamily::Ipv6 => ip(&[
                    "-n",
                    n,
                    "addr",
                    "add",
                    "fe80::1/64",
                    "dev",
                    host_if,
                    "nodad",
                ])?,
            }
            let host_route = format!("{addr}/{host_len}");
            ip(&["-n", n, "route", "add", &host_route, "dev", host_if])?;
            ip(&["-n", p, "link", "set", "eth0", "up"])?;
            ip(&["-n", p, "addr", "add", &host_route, "dev", "eth0", "nodad"])?;
            if family == IpFamily::Ipv4 {
                ip(&[
                    "-n", p, "route", "add", gateway, "dev", "eth0", "scope", "link",
                ])?;
            }
            ip(&[
                "-n", p, "route", "add", "default", "via", gateway, "dev", "eth0",
            ])?;
        }
        Ok(())
    }

    /// The talk's layout: pods in one subnet on the node's bridge `cbr0`.
    fn bridge_pods(
        node: &Netns,
        family: IpFamily,
        pods: &[(&Netns, &str, IpAddr)],
    ) -> anyhow::Result<()> {
        let (gateway, prefix) = pod_subnet(family);
        let n = node.name.as_str();
        ip(&["-n", n, "link", "add", "cbr0", "type", "bridge"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{gateway}/{prefix}"),
            "dev",
            "cbr0",
            "nodad",
        ])?;
        ip(&["-n", n, "link", "set", "cbr0", "up"])?;
        for &(pod, host_if, addr) in pods {
            let p = pod.name.as_str();
            ip(&[
                "-n", n, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", p,
            ])?;
            ip(&["-n", n, "link", "set", host_if, "master", "cbr0", "up"])?;
            ip(&["-n", p, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{addr}/{prefix}"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&[
                "-n",
                p,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
        }
        Ok(())
    }
}

/// Threads accepting and answering on port 8080: one line in, "OK\n"
/// out; a request starting with 'S' is a stream, counted until EOF and
/// answered with the byte count.
pub(crate) struct Server {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// `buf` is the accepting thread's, reused: a fresh 256 KiB buffer per
/// connection cost ~9 µs of zeroing (in every system alike, diluting their
/// differences) and kept the caches the datapath's maps live in cold.
fn serve_one(mut s: TcpStream, buf: &mut [u8]) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(n) = s.read(buf) else { return };
    if n == 0 {
        return;
    }
    if buf[0] == b'S' {
        let mut total = n as u64;
        while let Ok(k) = s.read(buf) {
            if k == 0 {
                break;
            }
            total += k as u64;
        }
        let _ = s.write_all(&total.to_be_bytes());
        return;
    }
    let _ = s.write_all(b"OK\n");
}

impl Server {
    /// Listens on every address of `family` in `ns`.
    pub(crate) fn start(ns: &str, family: IpFamily, threads: usize) -> anyhow::Result<Self> {
        let any: IpAddr = match family {
            IpFamily::Ipv4 => Ipv4Addr::UNSPECIFIED.into(),
            IpFamily::Ipv6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        // A socket stays in the namespace it was created in: the accepting
        // threads need not join it.
        let listener = in_netns(ns, move || TcpListener::bind((any, TARGET_PORT)))?
            .context("binding the server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..threads {
            let l = listener.try_clone()?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((s, _)) = l.accept() {
                        serve_one(s, &mut buf);
                    }
                }
            }));
        }
        Ok(Self {
            listener,
            stop,
            threads: handles,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes every thread blocked in accept() with EINVAL.
        // SAFETY: shutdown(2) on a socket fd this value owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a properly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One connect / request / response / close cycle; the connect latency.
fn one_request(target: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
    let latency = started.elapsed();
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET\n").ok()?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 3 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n,
        }
    }
    set_linger_zero(&s);
    Some(latency)
}

pub(crate) struct LoadResult {
    pub(crate) conns: usize,
    pub(crate) conns_per_s: f64,
    pub(crate) p50_us: u32,
    pub(crate) p99_us: u32,
    pub(crate) errors: u64,
}

pub(crate) fn load(
    client_ns: &str,
    target: SocketAddr,
    length: Duration,
    concurrency: usize,
) -> anyhow::Result<LoadResult> {
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let barrier = barrier.clone();
        handles.push(spawn_in_netns(client_ns, move || {
            let mut latencies: Vec<u32> = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            barrier.wait();
            let deadline = Instant::now() + length;
            while Instant::now() < deadline {
                match one_request(target) {
                    Some(l) => latencies.push(l.as_micros().min(u128::from(u32::MAX)) as u32),
                    None => errors += 1,
                }
            }
            (latencies, errors)
        })?);
    }
    barrier.wait();
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(LoadResult {
        conns: all.len(),
        conns_per_s: all.len() as f64 / elapsed,
        p50_us: percentile(&mut all, 50.0),
        p99_us: percentile(&mut all, 99.0),
        errors,
    })
}

/// One TCP stream for `length`; Gbit/s as counted by the server.
pub(crate) fn stream(client_ns: &str, target: SocketAddr, length: Duration) -> anyhow::Result<f64> {
    in_netns(client_ns, move || -> anyhow::Result<f64> {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0x55u8; 128 * 1024];
        buf[0] = b'S';
        let started = Instant::now();
        while started.elapsed() < length {
            s.write_all(&buf)?;
            buf[0] = 0x55;
        }
        s.shutdown(Shutdown::Write)?;
        let mut total = [0u8; 8];
        s.read_exact(&mut total)?;
        let elapsed = started.elapsed().as_secs_f64();
        Ok(u64::from_be_bytes(total) as f64 * 8.0 / elapsed / 1e9)
    })?
}

/// Waits until a connection through `target` gets its answer.
pub(crate) fn wait_ready(client_ns: &str, target: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = in_netns(client_ns, move || one_request(target).is_some())?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no answer through {target} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This process, moved into a cgroup until dropped (then back where it was).
struct JoinedCgroup {
    previous: std::path::PathBuf,
}

impl JoinedCgroup {
    fn join(cgroup: &std::path::Path) -> anyhow::Result<Self> {
        // "0::/path" is the cgroup2 line of /proc/self/cgroup.
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup2 line in /proc/self/cgroup")?;
        let previous = std::path::Path::new(cgroup::LAB_CGROUP2).join(path.trim_start_matches('/'));
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining {}", cgroup.display()))?;
        Ok(Self { previous })
    }
}

impl Drop for JoinedCgroup {
    fn drop(&mut self) {
        let procs = self.previous.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            eprintln!("returning to {}: {e}", procs.display());
        }
    }
}

/// Programs `system` in the node; returns what must live while it runs.
fn setup(
    system: System,
    family: IpFamily,
    topo: &Topology,
    services: usize,
    endpoints: usize,
) -> anyhow::Result<(SocketAddr, Box<dyn Any>)> {
    let backend = BackendAddr {
        ip: server_ip(family),
        port: TARGET_PORT,
    };
    let svcs = scenario::services(family, services, endpoints, Some(backend));
    let last = svcs.last().context("no services")?;
    let service = SocketAddr::new(last.ip, SERVICE_PORT);
    let node = topo.node.name.as_str();
    // Pod-to-pod replies cross the bridge: kube-proxy needs br_netfilter
    // for them to be un-NATed (it is built in here), per family.
    let bridge_nf = match family {
        IpFamily::Ipv4 => "net.bridge.bridge-nf-call-iptables",
        IpFamily::Ipv6 => "net.bridge.bridge-nf-call-ip6tables",
    };
    match system {
        System::Direct => Ok((
            SocketAddr::new(server_ip(family), TARGET_PORT),
            Box::new(()),
        )),
        System::Ebpf
        | System::EbpfRedirect
        | System::SocketLb
        | System::SocketLbHost
        | System::DirectAgentTc
        | System::DirectAgent => {
            let bpffs = Bpffs::new()?;
            let work = tempfile::tempdir()?;
            let manifests = work.path().join("manifests");
            std::fs::create_dir_all(&manifests)?;
            std::fs::write(
                manifests.join("services.yaml"),
                scenario::manifests_yaml(&svcs),
            )?;
            // The family said outright (the node has no address of the
            // other one either).
            let families = match family {
                IpFamily::Ipv4 => "ipv4",
                IpFamily::Ipv6 => "ipv6",
            };
            let mut args = vec!["--ip-families", families];
            if system == System::EbpfRedirect {
                args.extend(["--direct-redirect", "true"]);
            };
            let mut agent = Agent::launch_bin(
                &agent_bin(),
                node,
                "bench-node",
                Source::Manifests(&manifests),
                bpffs.path(),
                &work.path().join("agent.log"),
                &args,
            )?;
            // As the outside part waits: 10 000 services x 10 endpoints
            // take the agent well over 30 s to parse and sync on a loaded
            // 2-core machine (1.8 s idle); the setup column shows how long.
            agent.wait_healthy(Duration::from_secs(120))?;
            let target = match system {
                System::DirectAgentTc | System::DirectAgent => {
                    SocketAddr::new(server_ip(family), TARGET_PORT)
                }
                _ => service,
            };
            // Drop order: the agent first, then its bpffs, then the files.
            Ok((target, Box::new((agent, bpffs, work))))
        }
        System::Iptables => {
            topo.node.sysctl(bridge_nf, "1")?;
            netns::run_in(
                node,
                &iptables_restore_of(family),
                &["--noflush"],
                Some(&kubeproxy_rules::iptables_full(&svcs)),
            )?;
            Ok((service, Box::new(())))
        }
        System::Nftables => {
            topo.node.sysctl(bridge_nf, "1")?;
            netns::run_in(
                node,
                "nft",
                &["-f", "-"],
                Some(&kubeproxy_rules::nft_full(&svcs)),
            )?;
            Ok((service, Box::new(())))
        }
    }
}

pub struct Options {
    pub scales: Vec<usize>,
    pub endpoints: usize,
    pub length: Duration,
    pub concurrency: usize,
    pub systems: Vec<System>,
    /// Every system is measured on each of these families.
    pub families: Vec<IpFamily>,
    /// Interleaved rounds over all systems at each scale.
    pub rounds: usize,
    pub pods: PodNetwork,
}

/// How the node connects its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodNetwork {
    /// Pods on a bridge (CNI's bridge plugin, kubenet).
    Bridge,
    /// /32 pods routed over their own veth with proxy ARP (Calico).
    Routed,
}

/// One system set up and ready for load.
struct Case {
    system: System,
    family: IpFamily,
    target: SocketAddr,
    setup: Duration,
    // Drop order: what the system needs (agent, rules) before the server
    // and the namespaces.
    _guard: Box<dyn Any>,
    _server: Server,
    topo: Topology,
}

fn set_up(system: System, family: IpFamily, services: usize, o: &Options) -> anyhow::Result<Case> {
    let topo = Topology::build(family, o.pods).context("building the namespaces")?;
    let server = Server::start(&topo.server.name, family, o.concurrency)?;
    let started = Instant::now();
    let (target, guard) = setup(system, family, &topo, services, o.endpoints)?;
    let client = client_ns(system, &topo);
    let setup = {
        // In the node's cgroup already while waiting: a host-network
        // client reaches the service only through the socket hooks.
        let _joined = join_for_load(system, &topo)?;
        wait_ready(&client, target)?;
        let setup = started.elapsed();
        // Warm-up: conntrack, caches, the server's threads.
        load(&client, target, Duration::from_millis(300), o.concurrency)?;
        setup
    };
    Ok(Case {
        system,
        family,
        target,
        setup,
        _guard: guard,
        _server: server,
        topo,
    })
}

/// The namespace the load generator runs in: the client pod's, or the
/// node's own for a host-network client.
fn client_ns(system: System, topo: &Topology) -> String {
    match system {
        System::SocketLbHost => topo.node.name.clone(),
        _ => topo.client.name.clone(),
    }
}

/// The load generator is this process's threads: for the socket hooks to
/// see them, the whole process joins the node's cgroup while it loads a
/// socket-LB case (and only then, the cases run side by side), and the
/// diagnostic `DirectAgent`.
fn join_for_load(system: System, topo: &Topology) -> anyhow::Result<Option<JoinedCgroup>> {
    match system {
        System::SocketLb | System::SocketLbHost | System::DirectAgent => Ok(Some(
            JoinedCgroup::join(&cgroup::node_cgroup(&topo.node.name))?,
        )),
        _ => Ok(None),
    }
}

fn measure(case: &Case, o: &Options) -> anyhow::Result<Round> {
    let client = client_ns(case.system, &case.topo);
    let _joined = join_for_load(case.system, &case.topo)?;
    measure_round(&client, case.target, o.length, o.concurrency)
}

/// One round from `client_ns` to `target`: connections under load with the
/// CPU they cost, then one stream.
pub(crate) fn measure_round(
    client_ns: &str,
    target: SocketAddr,
    length: Duration,
    concurrency: usize,
) -> anyhow::Result<Round> {
    let before = CpuTimes::now()?;
    let l = load(client_ns, target, length, concurrency)?;
    let after = CpuTimes::now()?;
    let gbit = stream(client_ns, target, length)?;
    let per_conn = |seconds: f64| seconds * 1e6 / l.conns.max(1) as f64;
    Ok(Round {
        conns_per_s: l.conns_per_s,
        connect_p50_us: l.p50_us,
        connect_p99_us: l.p99_us,
        errors: l.errors,
        stream_gbit_s: gbit,
        node_cpu_us_per_conn: per_conn(after.node_kernel - before.node_kernel),
        process_sys_us_per_conn: per_conn(after.process_sys - before.process_sys),
    })
}

pub fn run(o: &Options) -> anyhow::Result<Vec<CaseResult>> {
    let mut results = Vec::new();
    for &services in &o.scales {
        let mut cases = Vec::new();
        // A family that cannot be set up fails the part, naming the
        // family: an IPv6 row is never silently left out.
        for &family in &o.families {
            for &system in &o.systems {
                let case = set_up(system, family, services, o).with_context(|| {
                    format!("{} over {family} with {services} services", system.label())
                })?;
                eprintln!(
                    "  {services} services, {}, {family}: ready after {:?}",
                    system.label(),
                    case.setup
                );
                cases.push(case);
            }
        }
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); cases.len()];
        for round in 1..=o.rounds.max(1) {
            for (case, measured) in cases.iter().zip(&mut rounds) {
                let r = measure(case, o).with_context(|| {
                    format!(
                        "{} over {} with {services} services",
                        case.system.label(),
                        case.family
                    )
                })?;
                eprintln!(
                    "  {services} services, round {round}, {}, {}: {:.0} conn/s, {:.1} µs kernel CPU per conn (this process: {:.1} µs), connect p50 {} us p99 {} us, {} errors, stream {:.2} Gbit/s",
                    case.system.label(),
                    case.family,
                    r.conns_per_s,
                    r.node_cpu_us_per_conn,
                    r.process_sys_us_per_conn,
                    r.connect_p50_us,
                    r.connect_p99_us,
                    r.errors,
                    r.stream_gbit_s,
                );
                measured.push(r);
            }
        }
        for (case, rounds) in cases.iter().zip(rounds) {
            results.push(CaseResult {
                system: case.system,
                family: case.family,
                services,
                rounds,
                setup: case.setup,
            });
        }
    }
    Ok(results)
}

/// Per round, `f` of `case` over `f` of `reference` (same scale, same
/// round): (median, min, max).
pub fn ratio_spread(
    case: &CaseResult,
    reference: &CaseResult,
    f: impl Fn(&Round) -> f64,
) -> (f64, f64, f64) {
    rounds_ratio_spread(&case.rounds, &reference.rounds, f)
}

/// [`ratio_spread`] of two systems' rounds, paired in round order.
pub fn rounds_ratio_spread(
    case: &[Round],
    reference: &[Round],
    f: impl Fn(&Round) -> f64,
) -> (f64, f64, f64) {
    let ratios: Vec<f64> = case
        .iter()
        .zip(reference)
        .map(|(c, r)| f(c) / f(r))
        .filter(|x| x.is_finite())
        .collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median_f64(ratios), min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(conns_per_s: f64) -> Round {
        Round {
            conns_per_s,
            connect_p50_us: 0,
            connect_p99_us: 0,
            errors: 0,
            stream_gbit_s: 0.0,
            node_cpu_us_per_conn: 0.0,
            process_sys_us_per_conn: 0.0,
        }
    }

    fn case(system: System, rates: &[f64]) -> CaseResult {
        CaseResult {
            system,
            family: IpFamily::Ipv4,
            services: 10,
            rounds: rates.iter().copied().map(round).collect(),
            setup: Duration::ZERO,
        }
    }

    #[test]
    fn ratios_pair_each_round_with_the_same_round_of_the_reference() {
        // Round 2 was slow for both: paired, its ratio is as good as the
        // others'; a ratio of medians would not see that.
        let direct = case(System::Direct, &[1000.0, 500.0, 1000.0]);
        let ebpf = case(System::Ebpf, &[900.0, 450.0, 800.0]);
        let (median, min, max) = ratio_spread(&ebpf, &direct, |r| r.conns_per_s);
        assert!((median - 0.9).abs() < 1e-9, "{median}");
        assert!((min - 0.8).abs() < 1e-9 && (max - 0.9).abs() < 1e-9);
    }

    #[test]
    fn median_skips_non_finite_values_and_averages_the_middle_pair() {
        assert_eq!(median_f64(vec![3.0, f64::NAN, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(median_f64(vec![2.0, 1.0, 3.0]), 2.0);
        assert!(median_f64(vec![]).is_nan());
    }
}
