//! `dataplane-agent monitor`: the journey of packets through the datapath,
//! live. Turns tracing on in the pinned `TRACE_CONFIG` for a filter, prints
//! each `TRACE_EVENTS` event in operator terms, and turns tracing off again
//! on exit. The running agent is not involved and nothing restarts.
//!
//! Both families: the datapath filters the events of each by address
//! itself (`TRACE_CONFIG` holds the addresses of both), and a filter of one
//! family turns the other's events off.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use dataplane_common::{
    ipv4_to_map, map_names, port_from_map, trace_families, trace_hook, Counter, Trace6Tuple,
    TraceConfig, TraceEvent, TraceEvent6, TraceTuple,
};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    node::{
        lb_maps::{BpfLbMaps, LbMaps as _},
        pinned::{self, proto_name, ServiceNamesMap},
    },
    operator::inspect::Format,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only packets of this service (namespace/name): to or from its IP.
    #[arg(long)]
    pub service: Option<String>,
    /// Only packets to or from this IP (client, backend or service), IPv4
    /// or IPv6.
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// Where the agent pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    pub bpffs: PathBuf,
    /// Output format: one line per event, or one JSON object per line.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Format,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    pub count: Option<usize>,
}

/// One event, in operator terms.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the decision.
    pub ts_ns: u64,
    pub hook: &'static str,
    pub ifindex: u32,
    pub interface: String,
    pub proto: &'static str,
    /// The counter this decision counts under (`new_flow`,
    /// `reject_no_endpoints`, ...).
    pub decision: &'static str,
    pub service: Option<String>,
    pub backend_id: u32,
    pub before: String,
    pub after: String,
    /// Socket hooks: the socket's network namespace cookie and the cgroup
    /// id of the process (absent for packets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// `src -> dst` in the addresses' usual text forms (`10.0.0.1:80`,
/// `[2001:db8::1]:80`), without ports when the event has none.
fn tuple_text(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16) -> String {
    if src_port == 0 && dst_port == 0 {
        return format!("{src} -> {dst}");
    }
    let src = SocketAddr::new(src, port_from_map(src_port));
    let dst = SocketAddr::new(dst, port_from_map(dst_port));
    format!("{src} -> {dst}")
}

fn tuple4_text(t: &TraceTuple) -> String {
    let ip = |addr| IpAddr::V4(pinned::ipv4(addr));
    tuple_text(ip(t.src_addr), ip(t.dst_addr), t.src_port, t.dst_port)
}

fn tuple6_text(t: &Trace6Tuple) -> String {
    let ip = |addr| IpAddr::V6(Ipv6Addr::from(addr));
    tuple_text(ip(t.src_addr), ip(t.dst_addr), t.src_port, t.dst_port)
}

fn interface_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("if{ifindex}"))
}

/// One ring buffer record as the datapath wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    V4(TraceEvent),
    V6(TraceEvent6),
}

/// Reads a record, telling the families apart by the byte the IPv6 record
/// has its `family` in (0 in an IPv4 record).
pub fn read_record(bytes: &[u8]) -> Option<Record> {
    let family = *bytes.get(std::mem::offset_of!(TraceEvent6, family))?;
    if family == TraceEvent6::FAMILY {
        let raw = bytes.get(..size_of::<TraceEvent6>())?;
        return bytemuck::try_pod_read_unaligned(raw).ok().map(Record::V6);
    }
    let raw = bytes.get(..size_of::<TraceEvent>())?;
    bytemuck::try_pod_read_unaligned(raw).ok().map(Record::V4)
}

impl Record {
    fn service_id(&self) -> u32 {
        match self {
            Record::V4(raw) => raw.service_id,
            Record::V6(raw) => raw.service_id,
        }
    }
}

/// The hooks' names in the `hook` column, by `trace_hook` number.
const HOOK_NAMES: [(u8, &str); 8] = [
    (trace_hook::FROM_POD, "from-pod"),
    (trace_hook::TO_POD, "to-pod"),
    (trace_hook::SOCK_CONNECT, "connect"),
    (trace_hook::SOCK_SENDMSG, "sendmsg"),
    (trace_hook::SOCK_RECVMSG, "recvmsg"),
    (trace_hook::SOCK_GETPEERNAME, "getpeername"),
    (trace_hook::FROM_OUTSIDE, "from-outside"),
    (trace_hook::TO_OUTSIDE, "to-outside"),
];

fn hook_name(hook: u8) -> &'static str {
    HOOK_NAMES
        .iter()
        .find(|(number, _)| *number == hook)
        .map_or("?", |(_, name)| name)
}

/// The cgroup socket hooks; the others see packets on an interface.
fn is_socket_hook(hook: u8) -> bool {
    (trace_hook::SOCK_CONNECT..=trace_hook::SOCK_GETPEERNAME).contains(&hook)
}

/// Column widths of the table: the longest hook and decision names, so
/// every row's columns start where the others' do.
const HOOK_WIDTH: usize = {
    let mut width = 0;
    let mut i = 0;
    while i < HOOK_NAMES.len() {
        if HOOK_NAMES[i].1.len() > width {
            width = HOOK_NAMES[i].1.len();
        }
        i += 1;
    }
    width
};
const DECISION_WIDTH: usize = {
    let mut width = 0;
    let mut i = 0;
    while i < Counter::ALL.len() {
        if Counter::ALL[i].name().len() > width {
            width = Counter::ALL[i].name().len();
        }
        i += 1;
    }
    width
};
/// An interface name has at most IFNAMSIZ - 1 bytes.
const INTERFACE_WIDTH: usize = 15;
/// `255.255.255.255:65535 -> 255.255.255.255:65535`
const TUPLE_WIDTH: usize = 45;

/// The fields both families' records have.
struct Header {
    ts_ns: u64,
    ifindex: u32,
    hook: u8,
    proto: u8,
    decision: u8,
    service_id: u32,
    backend_id: u32,
    netns_cookie: u64,
    cgroup_id: u64,
}

/// The [`Header`] of a record of either family (their fields are named
/// alike).
macro_rules! header_of {
    ($r:expr) => {
        Header {
            ts_ns: $r.ts_ns,
            ifindex: $r.ifindex,
            hook: $r.hook,
            proto: $r.proto,
            decision: $r.decision,
            service_id: $r.service_id,
            backend_id: $r.backend_id,
            netns_cookie: $r.netns_cookie,
            cgroup_id: $r.cgroup_id,
        }
    };
}

impl Event {
    /// An IPv4 record in operator terms; `names` maps service ids to labels.
    pub fn new(raw: &TraceEvent, names: &HashMap<u32, String>) -> Self {
        Self::of(&Record::V4(*raw), names)
    }

    /// A record of either family in operator terms.
    pub fn of(record: &Record, names: &HashMap<u32, String>) -> Self {
        let (raw, before, after) = match record {
            Record::V4(r) => (header_of!(r), tuple4_text(&r.before), tuple4_text(&r.after)),
            Record::V6(r) => (header_of!(r), tuple6_text(&r.before), tuple6_text(&r.after)),
        };
        let socket_hook = is_socket_hook(raw.hook);
        Self {
            ts_ns: raw.ts_ns,
            hook: hook_name(raw.hook),
            ifindex: raw.ifindex,
            interface: if socket_hook {
                "socket".into()
            } else {
                interface_name(raw.ifindex)
            },
            proto: proto_name(raw.proto),
            decision: Counter::from_index(u32::from(raw.decision)).map_or("?", Counter::name),
            service: (raw.service_id != 0).then(|| {
                names
                    .get(&raw.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("service id {}", raw.service_id))
            }),
            backend_id: raw.backend_id,
            before,
            after,
            netns_cookie: socket_hook.then_some(raw.netns_cookie),
            cgroup_id: socket_hook.then_some(raw.cgroup_id),
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<HOOK_WIDTH$} {:<INTERFACE_WIDTH$} {:<4} {:<TUPLE_WIDTH$} {:<DECISION_WIDTH$}",
            self.hook, self.interface, self.proto, self.before, self.decision
        )?;
        if self.after != self.before {
            write!(f, " => {}", self.after)?;
        }
        if let Some(service) = &self.service {
            write!(f, "  [{service}]")?;
        }
        if let (Some(netns), Some(cgroup)) = (self.netns_cookie, self.cgroup_id) {
            write!(f, "  netns {netns} cgroup {cgroup}")?;
        }
        Ok(())
    }
}

/// Service id -> `namespace/name:port`, from `SERVICE_NAMES`.
fn service_names(dir: &Path) -> anyhow::Result<HashMap<u32, String>> {
    let map: ServiceNamesMap = pinned::open(dir, map_names::SERVICE_NAMES)?;
    Ok(pinned::service_names(&map))
}

/// The cluster IPs of service `namespace/name` (or `namespace/name:port`)
/// from the pinned maps: its IPv4 one, its IPv6 one, or both.
fn service_ips(dir: &Path, service: &str) -> anyhow::Result<ServiceIps> {
    let snap = BpfLbMaps::from_pins(dir)?.snapshot()?;
    let named = |value: &dataplane_common::ServiceValue| {
        snap.names
            .get(&value.service_id)
            .is_some_and(|label| label == service || label.split(':').next() == Some(service))
    };
    let ips = ServiceIps {
        v4: snap
            .services
            .iter()
            .find(|(_, value)| named(value))
            .map(|(key, _)| pinned::ipv4(key.addr)),
        v6: snap
            .services6
            .iter()
            .find(|(_, value)| named(value))
            .map(|(key, _)| Ipv6Addr::from(key.addr)),
    };
    if ips.v4.is_none() && ips.v6.is_none() {
        anyhow::bail!("no service {service} in the maps under {}", dir.display());
    }
    Ok(ips)
}

/// A service's addresses, one per family it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Which events the monitor shows, as the datapath filters them: the
/// families, and the addresses of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub config: TraceConfig,
}

impl Filter {
    /// Packets of `service` (when given) and of `ip` (when given). Fails
    /// when no packet can match: the service has no address of `ip`'s
    /// family.
    pub fn new(service: Option<ServiceIps>, ip: Option<IpAddr>) -> anyhow::Result<Self> {
        let v4 = service.is_none_or(|s| s.v4.is_some()) && !matches!(ip, Some(IpAddr::V6(_)));
        let v6 = service.is_none_or(|s| s.v6.is_some()) && !matches!(ip, Some(IpAddr::V4(_)));
        if !v4 && !v6 {
            anyhow::bail!("the service has no address of the family of {ip:?}: nothing to trace");
        }
        let ip4 = |ip: Option<Ipv4Addr>| ip.map_or(0, |ip| ipv4_to_map(ip.octets()));
        // `::` is no filter in the datapath, as 0.0.0.0 is.
        let ip6 = |ip: Option<Ipv6Addr>| ip.map_or([0; 16], |ip| ip.octets());
        let ip_v4 = match ip {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        };
        let ip_v6 = match ip {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        };
        let mut families = 0;
        if v4 {
            families |= trace_families::IPV4;
        }
        if v6 {
            families |= trace_families::IPV6;
        }
        Ok(Self {
            config: TraceConfig {
                enabled: families,
                addr_a: ip4(service.and_then(|s| s.v4)),
                addr_b: ip4(ip_v4),
                addr6_a: ip6(service.and_then(|s| s.v6)),
                addr6_b: ip6(ip_v6),
            },
        })
    }
}

/// Tracing stays on only while this lives.
struct TraceSwitch {
    config: Array<MapData, TraceConfig>,
}

impl TraceSwitch {
    fn on(dir: &Path, filter: TraceConfig) -> anyhow::Result<Self> {
        let mut config: Array<MapData, TraceConfig> = pinned::open(dir, map_names::TRACE_CONFIG)?;
        config
            .set(0, filter, 0)
            .context("turning tracing on in TRACE_CONFIG")?;
        Ok(Self { config })
    }
}

impl Drop for TraceSwitch {
    fn drop(&mut self) {
        if let Err(e) = self.config.set(0, TraceConfig::default(), 0) {
            eprintln!("monitor: turning tracing off failed: {e}");
        }
    }
}

/// `TRACE_EVENTS` registered with tokio: readable when records wait.
fn readable_ring(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map's file descriptor (`MapData`
    // holds an `OwnedFd`) and returns that same descriptor for as long as it
    // lives; the `AsyncFd` owns the ring buffer, so the descriptor stays
    // open for as long as it is registered.
    Ok(unsafe { AsyncFd::register(ring) }?)
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(follow(options))
}

/// Prints events until interrupted (SIGINT, SIGTERM) or `--count` events;
/// tracing is off again when it returns, whichever way.
async fn follow(options: Options) -> anyhow::Result<()> {
    let dir = options.bpffs.as_path();
    let service_ips = options
        .service
        .as_deref()
        .map(|s| service_ips(dir, s))
        .transpose()?;
    let filter = Filter::new(service_ips, options.ip)?;
    let mut names = service_names(dir)?;
    let mut ring: RingBuf<MapData> = pinned::open(dir, map_names::TRACE_EVENTS)?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    // Old events from an earlier session are not this one's.
    while ring.next().is_some() {}
    let mut ring = readable_ring(ring).context("watching TRACE_EVENTS")?;
    let _switch = TraceSwitch::on(dir, filter.config)?;
    let described = match (&options.service, options.ip) {
        (Some(s), Some(ip)) => format!("service {s} and IP {ip}"),
        (Some(s), None) => format!("service {s}"),
        (None, Some(ip)) => format!("IP {ip}"),
        (None, None) => "every service packet".into(),
    };
    eprintln!("monitor: tracing {described}; Ctrl-C stops and turns tracing off");

    let mut seen = 0usize;
    loop {
        let mut ready = tokio::select! {
            ready = ring.readable_mut() => ready.context("waiting for TRACE_EVENTS")?,
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        };
        let events = ready.get_inner_mut();
        while let Some(record) = events.next() {
            let Some(raw) = read_record(&record) else {
                continue;
            };
            drop(record);
            let service_id = raw.service_id();
            if service_id != 0 && !names.contains_key(&service_id) {
                // A service created after we started: refresh the names.
                names = service_names(dir)?;
            }
            let event = Event::of(&raw, &names);
            match options.output {
                Format::Table => println!("{event}"),
                Format::Json => println!("{}", serde_json::to_string(&event)?),
            }
            seen += 1;
            if options.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::port_to_map;

    use super::*;

    /// One event of every hook, each with the shortest and the longest
    /// decision name, and widest addresses.
    fn rows() -> Vec<String> {
        let tuple = |src: [u8; 4], dst: [u8; 4]| TraceTuple {
            src_addr: ipv4_to_map(src),
            dst_addr: ipv4_to_map(dst),
            src_port: port_to_map(65535),
            dst_port: port_to_map(53),
        };
        let decisions = [
            Counter::ALL.iter().min_by_key(|c| c.name().len()).unwrap(),
            Counter::ALL.iter().max_by_key(|c| c.name().len()).unwrap(),
        ];
        let mut rows = Vec::new();
        for (hook, _) in HOOK_NAMES {
            for decision in decisions {
                let raw = TraceEvent {
                    hook,
                    // The loopback interface: a name in every namespace.
                    ifindex: if is_socket_hook(hook) { 0 } else { 1 },
                    proto: dataplane_common::IPPROTO_UDP,
                    decision: *decision as u8,
                    service_id: 7,
                    before: tuple([255, 255, 255, 255], [10, 96, 0, 10]),
                    after: tuple([255, 255, 255, 255], [10, 244, 1, 2]),
                    netns_cookie: 4096,
                    cgroup_id: 12,
                    ..TraceEvent::default()
                };
                rows.push(Event::new(&raw, &HashMap::new()).to_string());
            }
        }
        rows
    }

    #[test]
    fn every_hooks_rows_have_their_columns_where_the_others_have_them() {
        let rows = rows();
        // The before tuple, the decision and the after tuple start at the
        // same column in every row, getpeername's and from-outside's too.
        for marker in ["255.255.255.255:65535 -> 10.96", " => 255.255"] {
            let columns: Vec<_> = rows.iter().map(|row| row.find(marker)).collect();
            assert!(
                columns.iter().all(|c| c.is_some() && *c == columns[0]),
                "{marker:?} at {columns:?} in\n{}",
                rows.join("\n")
            );
        }
        let decision_column = rows
            .iter()
            .map(|row| {
                let decision = Counter::ALL
                    .iter()
                    .map(|c| c.name())
                    .filter(|name| row.contains(&format!(" {name} ")))
                    .max_by_key(|name| name.len())
                    .expect("a decision in the row");
                row.find(&format!(" {decision} ")).unwrap()
            })
            .collect::<Vec<_>>();
        assert!(
            decision_column.iter().all(|c| *c == decision_column[0]),
            "decisions at {decision_column:?} in\n{}",
            rows.join("\n")
        );
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// A connect() of an IPv6 socket to a service, as `sock6` writes it.
    fn connect6() -> TraceEvent6 {
        TraceEvent6 {
            hook: trace_hook::SOCK_CONNECT,
            proto: dataplane_common::IPPROTO_TCP,
            decision: Counter::SockConnectTranslated as u8,
            family: TraceEvent6::FAMILY,
            service_id: 7,
            backend_id: 3,
            netns_cookie: 4096,
            cgroup_id: 12,
            before: Trace6Tuple {
                dst_addr: v6("2001:db8::1").octets(),
                dst_port: port_to_map(80),
                ..Trace6Tuple::default()
            },
            after: Trace6Tuple {
                dst_addr: v6("fd00:10:244:1::10").octets(),
                dst_port: port_to_map(8080),
                ..Trace6Tuple::default()
            },
            ..TraceEvent6::default()
        }
    }

    #[test]
    fn ipv6_records_are_told_from_ipv4_ones_and_print_bracketed_addresses() {
        let raw6 = connect6();
        let record = read_record(bytemuck::bytes_of(&raw6)).expect("a record");
        assert_eq!(record, Record::V6(raw6));
        let names = HashMap::from([(7, "default/web:http".to_owned())]);
        let event = Event::of(&record, &names);
        assert_eq!(event.before, "[::]:0 -> [2001:db8::1]:80");
        assert_eq!(event.after, "[::]:0 -> [fd00:10:244:1::10]:8080");
        assert_eq!(event.hook, "connect");
        assert_eq!(event.decision, "sock_connect_translated");
        assert_eq!(event.service.as_deref(), Some("default/web:http"));
        assert_eq!(event.netns_cookie, Some(4096));
        let row = event.to_string();
        assert!(
            row.contains("[::]:0 -> [2001:db8::1]:80")
                && row.contains(" => [::]:0 -> [fd00:10:244:1::10]:8080"),
            "{row}"
        );

        // An IPv4 record still reads as one, with or without trailing bytes.
        let raw4 = TraceEvent {
            hook: trace_hook::FROM_POD,
            before: TraceTuple {
                src_addr: ipv4_to_map([10, 244, 1, 10]),
                dst_addr: ipv4_to_map([10, 96, 0, 10]),
                ..TraceTuple::default()
            },
            ..TraceEvent::default()
        };
        let mut bytes = bytemuck::bytes_of(&raw4).to_vec();
        assert_eq!(read_record(&bytes), Some(Record::V4(raw4)));
        bytes.extend([0; 8]);
        assert_eq!(read_record(&bytes), Some(Record::V4(raw4)));
        let event = Event::of(&Record::V4(raw4), &HashMap::new());
        assert_eq!(event.before, "10.244.1.10 -> 10.96.0.10");
        // A truncated IPv6 record is no record.
        assert_eq!(read_record(&bytemuck::bytes_of(&raw6)[..100]), None);
    }

    #[test]
    fn filters_of_either_family_reach_the_datapath() {
        let dual = ServiceIps {
            v4: Some(Ipv4Addr::new(10, 96, 0, 10)),
            v6: Some(v6("2001:db8::1")),
        };
        // Everything: both families, no address.
        let all = Filter::new(None, None).unwrap().config;
        assert_eq!(all.enabled, trace_families::IPV4 | trace_families::IPV6);
        assert_eq!((all.addr_a, all.addr_b), (0, 0));
        assert_eq!((all.addr6_a, all.addr6_b), ([0; 16], [0; 16]));

        // A dual-stack service: its address of each family.
        let service = Filter::new(Some(dual), None).unwrap().config;
        assert_eq!(service.enabled, trace_families::IPV4 | trace_families::IPV6);
        assert_eq!(service.addr_a, ipv4_to_map([10, 96, 0, 10]));
        assert_eq!(service.addr6_a, v6("2001:db8::1").octets());
        assert_eq!((service.addr_b, service.addr6_b), (0, [0; 16]));

        // An IPv6 client or backend: IPv4 off, the service's IPv6 address
        // and the one given.
        let backend = Filter::new(Some(dual), Some(v6("fd00:10:244:1::10").into()))
            .unwrap()
            .config;
        assert_eq!(backend.enabled, trace_families::IPV6);
        assert_eq!(backend.addr6_a, v6("2001:db8::1").octets());
        assert_eq!(backend.addr6_b, v6("fd00:10:244:1::10").octets());
        let other = Filter::new(None, Some(v6("fd00:10:244:9::9").into()))
            .unwrap()
            .config;
        assert_eq!(other.enabled, trace_families::IPV6);
        assert_eq!(
            (other.addr6_a, other.addr6_b),
            ([0; 16], v6("fd00:10:244:9::9").octets())
        );

        // An IPv4 address: IPv6 off.
        let client = Filter::new(Some(dual), Some(Ipv4Addr::new(10, 244, 1, 10).into()))
            .unwrap()
            .config;
        assert_eq!(client.enabled, trace_families::IPV4);
        assert_eq!(client.addr_b, ipv4_to_map([10, 244, 1, 10]));

        // An IPv6-only service and an IPv4 address: nothing can match.
        let v6_only = ServiceIps {
            v4: None,
            v6: Some(v6("2001:db8::1")),
        };
        assert!(Filter::new(Some(v6_only), Some(Ipv4Addr::new(10, 0, 0, 1).into())).is_err());
        assert_eq!(
            Filter::new(Some(v6_only), None).unwrap().config.enabled,
            trace_families::IPV6
        );
    }

    #[test]
    fn only_socket_hooks_show_a_socket_and_its_namespace() {
        for (hook, name) in HOOK_NAMES {
            let raw = TraceEvent {
                hook,
                ifindex: 1,
                netns_cookie: 4096,
                cgroup_id: 12,
                ..TraceEvent::default()
            };
            let event = Event::new(&raw, &HashMap::new());
            let socket = name == "connect"
                || name == "sendmsg"
                || name == "recvmsg"
                || name == "getpeername";
            assert_eq!(event.interface == "socket", socket, "{name}: {event}");
            assert_eq!(event.netns_cookie.is_some(), socket, "{name}: {event}");
        }
    }
}
