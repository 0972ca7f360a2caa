//! `dataplane-agent monitor`: the journey of packets through the datapath,
//! live. Turns tracing on in the pinned `TRACE_CONFIG` for a filter, prints
//! each `TRACE_EVENTS` event in operator terms, and turns tracing off again
//! on exit. The running agent is not involved and nothing restarts.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use dataplane_common::{
    ipv4_from_map, ipv4_to_map, map_names, port_from_map, trace_hook, Counter, ServiceLabel,
    TraceConfig, TraceEvent, TraceTuple,
};
use serde::Serialize;

use crate::inspect::{self, open, proto_name, Format};

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
}

fn tuple_text(t: &TraceTuple) -> String {
    let ip = |a| Ipv4Addr::from(ipv4_from_map(a));
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

/// Decodes one ring buffer record; `names` maps service ids to labels.
pub fn decode(bytes: &[u8], names: &HashMap<u32, String>) -> Option<Event> {
    let raw: TraceEvent =
        bytemuck::try_pod_read_unaligned(bytes.get(..size_of::<TraceEvent>())?).ok()?;
    Some(Event {
        ts_ns: raw.ts_ns,
        hook: match raw.hook {
            trace_hook::FROM_POD => "from-pod",
            trace_hook::TO_POD => "to-pod",
            _ => "?",
        },
        ifindex: raw.ifindex,
        interface: interface_name(raw.ifindex),
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
    })
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<8} {:<12} {:<4} {:<45} {:<22}",
            self.hook, self.interface, self.proto, self.before, self.decision
        )?;
        if self.after != self.before {
            write!(f, " => {}", self.after)?;
        }
        if let Some(service) = &self.service {
            write!(f, "  [{service}]")?;
        }
        Ok(())
    }
}

/// Service id -> `namespace/name:port`, from `SERVICE_NAMES`.
fn service_names(dir: &Path) -> anyhow::Result<HashMap<u32, String>> {
    let map: aya::maps::HashMap<MapData, u32, ServiceLabel> =
        open(dir, map_names::SERVICE_NAMES)?.try_into()?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(id, label)| (id, label.as_str().to_owned()))
        .collect())
}

/// The cluster IP of service `namespace/name`, from the pinned maps.
fn service_ip(dir: &Path, service: &str) -> anyhow::Result<Ipv4Addr> {
    let rows = inspect::services(dir)?;
    let row = rows
        .iter()
        .find(|r| r.service == service || r.service.split(':').next() == Some(service))
        .with_context(|| format!("no service {service} in the maps under {}", dir.display()))?;
    let ip = row
        .frontend
        .split(':')
        .next()
        .and_then(|ip| ip.parse().ok())
        .with_context(|| format!("unreadable frontend {}", row.frontend))?;
    Ok(ip)
}

/// Tracing stays on only while this lives.
struct TraceSwitch {
    config: Array<MapData, TraceConfig>,
}

impl TraceSwitch {
    fn on(dir: &Path, filter: TraceConfig) -> anyhow::Result<Self> {
        let mut config: Array<MapData, TraceConfig> =
            open(dir, map_names::TRACE_CONFIG)?.try_into()?;
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

pub fn run(options: Options) -> anyhow::Result<()> {
    let dir = options.bpffs.as_path();
    let service_addr = options
        .service
        .as_deref()
        .map(|s| service_ip(dir, s))
        .transpose()?;
    let mut names = service_names(dir)?;
    let mut events: RingBuf<MapData> = open(dir, map_names::TRACE_EVENTS)?.try_into()?;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook_like::SIGINT, signal_hook_like::SIGTERM] {
        signal_hook_like::flag(signal, stop.clone())?;
    }
    // Old events from an earlier session are not this one's.
    while events.next().is_some() {}
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
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        while let Some(record) = events.next() {
            idle = false;
            let mut event = decode(&record, &names);
            if let Some(e) = &event {
                if e.service
                    .as_deref()
                    .is_some_and(|s| s.starts_with("service id "))
                {
                    // A service created after we started: refresh the names.
                    names = service_names(dir)?;
                    event = decode(&record, &names);
                }
            }
            let Some(event) = event else { continue };
            match options.output {
                Format::Table => println!("{event}"),
                Format::Json => println!("{}", serde_json::to_string(&event)?),
            }
            seen += 1;
            if options.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// SIGINT/SIGTERM set a flag, so the loop ends and tracing is turned off.
mod signal_hook_like {
    use std::sync::{atomic::AtomicBool, Arc, OnceLock};

    use nix::sys::signal::{self, SigHandler, Signal};

    pub use nix::sys::signal::Signal::{SIGINT, SIGTERM};

    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

    extern "C" fn handler(_: i32) {
        if let Some(flag) = STOP.get() {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn flag(sig: Signal, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let _ = STOP.set(stop);
        // SAFETY: the handler only does an atomic store, which is
        // async-signal-safe.
        unsafe { signal::signal(sig, SigHandler::Handler(handler)) }?;
        Ok(())
    }
}
