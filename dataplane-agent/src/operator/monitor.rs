//! `dataplane-agent monitor`: the journey of packets through the datapath,
//! live. Turns tracing on in the pinned `TRACE_CONFIG` for a filter, prints
//! each `TRACE_EVENTS` event in operator terms, and turns tracing off again
//! on exit. The running agent is not involved and nothing restarts.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use dataplane_common::{
    ipv4_to_map, map_names, port_from_map, trace_hook, Counter, TraceConfig, TraceEvent, TraceTuple,
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
    /// Only packets to or from this IP (client, backend or service).
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
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

fn tuple_text(t: &TraceTuple) -> String {
    let ip = pinned::ipv4;
    if t.src_port == 0 && t.dst_port == 0 {
        return format!("{} -> {}", ip(t.src_addr), ip(t.dst_addr));
    }
    format!(
        "{}:{} -> {}:{}",
        ip(t.src_addr),
        port_from_map(t.src_port),
        ip(t.dst_addr),
        port_from_map(t.dst_port)
    )
}

fn interface_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("if{ifindex}"))
}

/// One ring buffer record as the datapath wrote it.
pub fn read_record(bytes: &[u8]) -> Option<TraceEvent> {
    bytemuck::try_pod_read_unaligned(bytes.get(..size_of::<TraceEvent>())?).ok()
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

impl Event {
    /// `raw` in operator terms; `names` maps service ids to labels.
    pub fn new(raw: &TraceEvent, names: &HashMap<u32, String>) -> Self {
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
            before: tuple_text(&raw.before),
            after: tuple_text(&raw.after),
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

/// The cluster IP of service `namespace/name` (or `namespace/name:port`),
/// from the pinned maps.
fn service_ip(dir: &Path, service: &str) -> anyhow::Result<Ipv4Addr> {
    let snap = BpfLbMaps::from_pins(dir)?.snapshot()?;
    snap.services
        .iter()
        .find(|(_, value)| {
            snap.names
                .get(&value.service_id)
                .is_some_and(|label| label == service || label.split(':').next() == Some(service))
        })
        .map(|(key, _)| pinned::ipv4(key.addr))
        .with_context(|| format!("no service {service} in the maps under {}", dir.display()))
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
    let service_addr = options
        .service
        .as_deref()
        .map(|s| service_ip(dir, s))
        .transpose()?;
    let mut names = service_names(dir)?;
    let mut ring: RingBuf<MapData> = pinned::open(dir, map_names::TRACE_EVENTS)?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    // Old events from an earlier session are not this one's.
    while ring.next().is_some() {}
    let mut ring = readable_ring(ring).context("watching TRACE_EVENTS")?;
    let _switch = TraceSwitch::on(
        dir,
        TraceConfig {
            enabled: 1,
            addr_a: service_addr.map_or(0, |ip| ipv4_to_map(ip.octets())),
            addr_b: options.ip.map_or(0, |ip| ipv4_to_map(ip.octets())),
        },
    )?;
    let filter = match (&options.service, options.ip) {
        (Some(s), Some(ip)) => format!("service {s} and IP {ip}"),
        (Some(s), None) => format!("service {s}"),
        (None, Some(ip)) => format!("IP {ip}"),
        (None, None) => "every service packet".into(),
    };
    eprintln!("monitor: tracing {filter}; Ctrl-C stops and turns tracing off");

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
            if raw.service_id != 0 && !names.contains_key(&raw.service_id) {
                // A service created after we started: refresh the names.
                names = service_names(dir)?;
            }
            let event = Event::new(&raw, &names);
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
