//! `dataplane-agent inspect`: reads the pinned maps directly (no running
//! agent needed) and prints them in operator terms.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    maps::MapError,
    programs::{SchedClassifier, TcAttachType},
};
use dataplane_common::{
    ct_dir, ct_flags, ct_state, map_names, nat_dir, Backend, Counter, Ct6Entry, CtEntry,
    CtLifetimes, Service6Key, ServiceKey, ServiceValue, IPPROTO_UDP,
};
use serde::Serialize;

use crate::node::{
    lb_maps::{BpfLbMaps, LbMapError, LbMaps as _, LbSnapshot},
    pinned::{
        self, counter_total, endpoint, endpoint6, monotonic_now_ns, proto_name, Conntrack6Maps,
        ConntrackMaps, CounterMap, CtLifetimesMap, MapOpenError, Nat6Map, NatMap, ServiceNamesMap,
        SockRevNat6Map, SockRevNatMap,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Open(#[from] MapOpenError),
    #[error(transparent)]
    LbMaps(#[from] LbMapError),
    #[error("reading {what}")]
    Read {
        what: String,
        /// Boxed, as aya's error is large.
        #[source]
        source: Box<MapError>,
    },
    #[error("listing /sys/class/net")]
    Interfaces(#[source] std::io::Error),
}

fn read_err(what: impl Into<String>) -> impl FnOnce(MapError) -> InspectError {
    let what = what.into();
    move |source| InspectError::Read {
        what,
        source: Box::new(source),
    }
}

#[derive(Debug, clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub what: What,
    /// Where the agent pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane", global = true)]
    pub bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Services with their frontends and backends.
    Services,
    /// Backends (pod IP:port) and the services using them.
    Backends,
    /// Tracked flows: original and translated tuples, state, age, expiry.
    Conntrack {
        /// Only flows of this service (namespace/name).
        #[arg(long)]
        service: Option<String>,
        /// Only flows from this client IP (IPv4 or IPv6).
        #[arg(long)]
        client: Option<IpAddr>,
        /// Only flows to this backend IP.
        #[arg(long)]
        backend: Option<IpAddr>,
    },
    /// Datapath counters: flows, translations, and every drop/reject reason.
    Counters,
    /// Which interfaces have the programs attached (tcx).
    Interfaces,
    /// Sockets the socket hooks translated, of both families: socket
    /// cookie, backend, and the service address recvmsg()/getpeername()
    /// show instead.
    SockRevnat,
    /// SNAT of external flows to remote backends (the `NAT` map): client ->
    /// frontend as the client sent it, node address and SNAT port ->
    /// backend as the backend sees it, state, expiry.
    Nat,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub frontend: String,
    pub backends: Vec<String>,
    pub affinity_timeout_s: Option<u32>,
}

/// Services as the datapath sees them, sorted by name then frontend.
pub fn services(dir: &Path) -> Result<Vec<ServiceRow>, InspectError> {
    let snap = BpfLbMaps::from_pins(dir)?.snapshot()?;
    let mut rows: Vec<ServiceRow> = snap
        .services
        .iter()
        .map(|(key, value)| service_row(&snap, key, value))
        .chain(
            snap.services6
                .iter()
                .map(|(key, value)| service6_row(&snap, key, value)),
        )
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    Ok(rows)
}

fn service_row(snap: &LbSnapshot, key: &ServiceKey, value: &ServiceValue) -> ServiceRow {
    let backends = (0..value.backend_count)
        .map(|slot| {
            match snap
                .slots
                .get(&(value.slot_base + slot))
                .and_then(|id| snap.backends.get(id))
            {
                Some(b) => endpoint(b.addr, b.port).to_string(),
                None => format!("<slot {slot} missing>"),
            }
        })
        .collect();
    ServiceRow {
        service: snap
            .names
            .get(&value.service_id)
            .cloned()
            .unwrap_or_else(|| format!("<id {}>", value.service_id)),
        frontend: match (key.scope, key.addr) {
            (dataplane_common::service_scope::EXTERNAL, 0) => format!(
                "nodePort {}/{}",
                dataplane_common::port_from_map(key.port),
                proto_name(key.proto)
            ),
            (dataplane_common::service_scope::EXTERNAL, _) => format!(
                "{}/{} (external)",
                endpoint(key.addr, key.port),
                proto_name(key.proto)
            ),
            _ => format!("{}/{}", endpoint(key.addr, key.port), proto_name(key.proto)),
        },
        backends,
        affinity_timeout_s: (value.affinity_timeout_s > 0).then_some(value.affinity_timeout_s),
    }
}

/// An IPv6 frontend: its slots hold `LB6_BACKENDS` ids.
fn service6_row(snap: &LbSnapshot, key: &Service6Key, value: &ServiceValue) -> ServiceRow {
    let backends = (0..value.backend_count)
        .map(|slot| {
            match snap
                .slots
                .get(&(value.slot_base + slot))
                .and_then(|id| snap.backends6.get(id))
            {
                Some(b) => endpoint6(b.addr, b.port).to_string(),
                None => format!("<slot {slot} missing>"),
            }
        })
        .collect();
    let external = key.scope == dataplane_common::service_scope::EXTERNAL;
    ServiceRow {
        service: snap
            .names
            .get(&value.service_id)
            .cloned()
            .unwrap_or_else(|| format!("<id {}>", value.service_id)),
        frontend: format!(
            "{}/{}{}",
            endpoint6(key.addr, key.port),
            proto_name(key.proto),
            if external { " (external)" } else { "" }
        ),
        backends,
        affinity_timeout_s: (value.affinity_timeout_s > 0).then_some(value.affinity_timeout_s),
    }
}

impl std::fmt::Display for ServiceRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> ", self.service, self.frontend)?;
        if self.backends.is_empty() {
            write!(f, "(no endpoints: connections rejected)")?;
        } else {
            write!(f, "{}", self.backends.join(", "))?;
        }
        if let Some(t) = self.affinity_timeout_s {
            write!(f, " (affinity ClientIP {t}s)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub backend: String,
    pub services: Vec<String>,
}

pub fn backends(dir: &Path) -> Result<Vec<BackendRow>, InspectError> {
    let snap = BpfLbMaps::from_pins(dir)?.snapshot()?;
    // Users by (IPv6?, backend id): each family has its own ids.
    let mut users: BTreeMap<(bool, u32), Vec<String>> = BTreeMap::new();
    let rows = snap
        .services
        .iter()
        .map(|(key, value)| (false, service_row(&snap, key, value), value))
        .chain(
            snap.services6
                .iter()
                .map(|(key, value)| (true, service6_row(&snap, key, value), value)),
        );
    for (v6, row, value) in rows {
        for slot in 0..value.backend_count {
            if let Some(id) = snap.slots.get(&(value.slot_base + slot)) {
                users
                    .entry((v6, *id))
                    .or_default()
                    .push(format!("{} {}", row.service, row.frontend));
            }
        }
    }
    let v4 = snap.backends.iter().map(|(id, b): (&u32, &Backend)| {
        let backend = format!("{}/{}", endpoint(b.addr, b.port), proto_name(b.proto));
        (false, *id, backend)
    });
    let v6 = snap.backends6.iter().map(|(id, b)| {
        let backend = format!("{}/{}", endpoint6(b.addr, b.port), proto_name(b.proto));
        (true, *id, backend)
    });
    Ok(v4
        .chain(v6)
        .map(|(v6, id, backend)| BackendRow {
            id,
            backend,
            services: users.remove(&(v6, id)).unwrap_or_default(),
        })
        .collect())
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub service: String,
    pub proto: &'static str,
    pub original: String,
    pub translated: String,
    pub state: &'static str,
    pub hairpin: bool,
    pub age_s: u64,
    pub expires_in_s: u64,
}

/// One tracked flow of either family, as `inspect conntrack` shows it.
struct FlowView {
    client: SocketAddr,
    service: SocketAddr,
    backend: SocketAddr,
    proto: u8,
    state: u8,
    flags: u8,
    service_id: u32,
    created_ns: u64,
    last_seen_ns: u64,
    lifetime_ns: u64,
}

impl FlowView {
    fn of(ct: &CtEntry, lifetimes: &CtLifetimes) -> Self {
        Self {
            client: endpoint(ct.client_addr, ct.client_port).into(),
            service: endpoint(ct.service_addr, ct.service_port).into(),
            backend: endpoint(ct.backend_addr, ct.backend_port).into(),
            proto: ct.proto,
            state: ct.state,
            flags: ct.flags,
            service_id: ct.service_id,
            created_ns: ct.created_ns,
            last_seen_ns: ct.last_seen_ns,
            lifetime_ns: ct.lifetime_ns(lifetimes),
        }
    }

    fn of6(ct: &Ct6Entry, lifetimes: &CtLifetimes) -> Self {
        Self {
            client: endpoint6(ct.client_addr, ct.client_port).into(),
            service: endpoint6(ct.service_addr, ct.service_port).into(),
            backend: endpoint6(ct.backend_addr, ct.backend_port).into(),
            proto: ct.proto,
            state: ct.state,
            flags: ct.flags,
            service_id: ct.service_id,
            created_ns: ct.created_ns,
            last_seen_ns: ct.last_seen_ns,
            lifetime_ns: ct.lifetime_ns(lifetimes),
        }
    }
}

pub fn conntrack(
    dir: &Path,
    service: Option<&str>,
    client: Option<IpAddr>,
    backend: Option<IpAddr>,
) -> Result<Vec<FlowRow>, InspectError> {
    let names: ServiceNamesMap = pinned::open(dir, map_names::SERVICE_NAMES)?;
    let table = ConntrackMaps::open(dir)?;
    let table6 = Conntrack6Maps::open(dir)?;
    let lifetimes_map: CtLifetimesMap = pinned::open(dir, map_names::CT_LIFETIMES)?;
    let lifetimes =
        pinned::ct_lifetimes(&lifetimes_map).map_err(read_err(map_names::CT_LIFETIMES))?;
    let now = monotonic_now_ns();
    let mut flows = Vec::new();
    for entry in table.iter() {
        let (key, ct) = entry.map_err(read_err("CT_TCP and CT_OTHER"))?;
        if key.direction == ct_dir::ORIGINAL && !ct.is_expired(now, &lifetimes) {
            flows.push(FlowView::of(&ct, &lifetimes));
        }
    }
    for entry in table6.iter() {
        let (key, ct) = entry.map_err(read_err("CT6_TCP and CT6_OTHER"))?;
        if key.direction == ct_dir::ORIGINAL && !ct.is_expired(now, &lifetimes) {
            flows.push(FlowView::of6(&ct, &lifetimes));
        }
    }
    let mut rows = Vec::new();
    for ct in flows {
        let label = names
            .get(&ct.service_id, 0)
            .map(|l| l.as_str().to_owned())
            .unwrap_or_default();
        let service_name = label.split(':').next().unwrap_or_default();
        if service.is_some_and(|s| s != service_name)
            || client.is_some_and(|c| c != ct.client.ip())
            || backend.is_some_and(|b| b != ct.backend.ip())
        {
            continue;
        }
        let hairpin = ct.flags & ct_flags::HAIRPIN != 0;
        let translated_src = if hairpin {
            ct.service.ip()
        } else {
            ct.client.ip()
        };
        rows.push(FlowRow {
            service: label,
            proto: proto_name(ct.proto),
            original: format!("{} -> {}", ct.client, ct.service),
            translated: format!(
                "{} -> {}",
                SocketAddr::new(translated_src, ct.client.port()),
                ct.backend
            ),
            state: state_name(ct.proto, ct.state),
            hairpin,
            age_s: now.saturating_sub(ct.created_ns) / 1_000_000_000,
            expires_in_s: (ct.last_seen_ns + ct.lifetime_ns).saturating_sub(now) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| (&a.service, &a.original).cmp(&(&b.service, &b.original)));
    Ok(rows)
}

/// A flow's state in conntrack(8)'s words.
fn state_name(proto: u8, state: u8) -> &'static str {
    match (proto, state) {
        (IPPROTO_UDP, ct_state::ESTABLISHED) => "REPLIED",
        (IPPROTO_UDP, _) => "UNREPLIED",
        (_, ct_state::ESTABLISHED) => "ESTABLISHED",
        (_, ct_state::CLOSING) => "CLOSING",
        _ => "SYN_SENT",
    }
}

#[derive(Debug, Serialize)]
pub struct CounterRow {
    pub counter: &'static str,
    pub packets: u64,
}

pub fn counters(dir: &Path) -> Result<Vec<CounterRow>, InspectError> {
    let map: CounterMap = pinned::open(dir, map_names::COUNTERS)?;
    Counter::ALL
        .iter()
        .map(|c| {
            Ok(CounterRow {
                counter: c.name(),
                packets: counter_total(&map, *c)
                    .map_err(read_err(format!("counter {}", c.name())))?,
            })
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct SockRevNatRow {
    pub cookie: u64,
    pub backend: String,
    pub service: String,
    pub frontend: String,
}

/// The socket-level reverse maps (`SOCK_REVNAT`, `LB6_SOCK_REVNAT`),
/// sorted by socket cookie.
pub fn sock_revnat(dir: &Path) -> Result<Vec<SockRevNatRow>, InspectError> {
    let names: ServiceNamesMap = pinned::open(dir, map_names::SERVICE_NAMES)?;
    let map: SockRevNatMap = pinned::open(dir, map_names::SOCK_REVNAT)?;
    let map6: SockRevNat6Map = pinned::open(dir, map_names::LB6_SOCK_REVNAT)?;
    let row = |cookie, backend: SocketAddr, service_id, frontend: SocketAddr| SockRevNatRow {
        cookie,
        backend: backend.to_string(),
        service: names
            .get(&service_id, 0)
            .map(|l| l.as_str().to_owned())
            .unwrap_or_else(|_| format!("<id {service_id}>")),
        frontend: frontend.to_string(),
    };
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.map_err(read_err(map_names::SOCK_REVNAT))?;
        rows.push(row(
            key.cookie,
            endpoint(key.backend_addr, key.backend_port).into(),
            value.service_id,
            endpoint(value.service_addr, value.service_port).into(),
        ));
    }
    for entry in map6.iter() {
        let (key, value) = entry.map_err(read_err(map_names::LB6_SOCK_REVNAT))?;
        rows.push(row(
            key.cookie,
            endpoint6(key.backend_addr, key.backend_port).into(),
            value.service_id,
            endpoint6(value.service_addr, value.service_port).into(),
        ));
    }
    rows.sort_by(|a, b| (a.cookie, &a.backend).cmp(&(b.cookie, &b.backend)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct NatRow {
    pub service: String,
    pub proto: &'static str,
    pub original: String,
    pub translated: String,
    pub state: &'static str,
    pub expires_in_s: u64,
}

/// Live SNAT flows of the `NAT` and `NAT6` maps, one row per flow (its
/// ORIGINAL entry),
/// sorted by service then original tuple.
pub fn nat(dir: &Path) -> Result<Vec<NatRow>, InspectError> {
    let names: ServiceNamesMap = pinned::open(dir, map_names::SERVICE_NAMES)?;
    let map: NatMap = pinned::open(dir, map_names::NAT)?;
    let lifetimes_map: CtLifetimesMap = pinned::open(dir, map_names::CT_LIFETIMES)?;
    let lifetimes =
        pinned::ct_lifetimes(&lifetimes_map).map_err(read_err(map_names::CT_LIFETIMES))?;
    let now = monotonic_now_ns();
    // One row of either family: the flow's four endpoints (client,
    // frontend, SNAT address, backend) and when it expires.
    let row = |service_id: u32,
               proto: u8,
               state: u8,
               [client, frontend, nat, backend]: [SocketAddr; 4],
               expires_at_ns: u64| NatRow {
        service: names
            .get(&service_id, 0)
            .map(|l| l.as_str().to_owned())
            .unwrap_or_default(),
        proto: proto_name(proto),
        original: format!("{client} -> {frontend}"),
        translated: format!("{nat} -> {backend}"),
        state: state_name(proto, state),
        expires_in_s: expires_at_ns.saturating_sub(now) / 1_000_000_000,
    };
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, e) = entry.map_err(read_err(map_names::NAT))?;
        if key.direction != nat_dir::ORIGINAL || e.is_expired(now, &lifetimes) {
            continue;
        }
        let endpoints = [
            (e.client_addr, e.client_port),
            (e.frontend_addr, e.frontend_port),
            (e.nat_addr, e.nat_port),
            (e.backend_addr, e.backend_port),
        ]
        .map(|(addr, port)| endpoint(addr, port).into());
        let expires_at = e.last_seen_ns + e.lifetime_ns(&lifetimes);
        rows.push(row(e.service_id, e.proto, e.state, endpoints, expires_at));
    }
    // `NAT6`: pinned by agents of layout 5 on.
    if dir.join(map_names::NAT6).exists() {
        let map6: Nat6Map = pinned::open(dir, map_names::NAT6)?;
        for entry in map6.iter() {
            let (key, e) = entry.map_err(read_err(map_names::NAT6))?;
            if key.direction != nat_dir::ORIGINAL || e.is_expired(now, &lifetimes) {
                continue;
            }
            let endpoints = [
                (e.client_addr, e.client_port),
                (e.frontend_addr, e.frontend_port),
                (e.nat_addr, e.nat_port),
                (e.backend_addr, e.backend_port),
            ]
            .map(|(addr, port)| endpoint6(addr, port).into());
            let expires_at = e.last_seen_ns + e.lifetime_ns(&lifetimes);
            rows.push(row(e.service_id, e.proto, e.state, endpoints, expires_at));
        }
    }
    rows.sort_by(|a, b| (&a.service, &a.original).cmp(&(&b.service, &b.original)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct InterfaceRow {
    pub interface: String,
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

/// tcx attachments of every interface in this network namespace.
pub fn interfaces() -> Result<Vec<InterfaceRow>, InspectError> {
    let mut rows = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(InspectError::Interfaces)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let programs = |attach| -> Vec<String> {
            SchedClassifier::query_tcx(&name, attach)
                .map(|(_, infos)| {
                    infos
                        .iter()
                        .map(|i| format!("{} (id {})", i.name_as_str().unwrap_or("?"), i.id()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (ingress, egress) = (
            programs(TcAttachType::Ingress),
            programs(TcAttachType::Egress),
        );
        if !ingress.is_empty() || !egress.is_empty() {
            rows.push(InterfaceRow {
                interface: name,
                ingress,
                egress,
            });
        }
    }
    Ok(rows)
}

fn print<T: Serialize>(
    rows: &[T],
    format: Format,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Format::Table => {
            for row in rows {
                println!("{}", line(row));
            }
        }
    }
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let dir = options.bpffs.as_path();
    let format = options.output;
    match options.what {
        What::Services => print(&services(dir)?, format, ToString::to_string),
        What::Backends => print(&backends(dir)?, format, |r| {
            format!(
                "{:>6} {} <- {}",
                r.id,
                r.backend,
                if r.services.is_empty() {
                    "(unused)".into()
                } else {
                    r.services.join(", ")
                }
            )
        }),
        What::Conntrack {
            service,
            client,
            backend,
        } => print(
            &conntrack(dir, service.as_deref(), client, backend)?,
            format,
            |r| {
                format!(
                    "{} {} {} => {} {}{} age {}s expires in {}s",
                    r.service,
                    r.proto,
                    r.original,
                    r.translated,
                    r.state,
                    if r.hairpin { " hairpin" } else { "" },
                    r.age_s,
                    r.expires_in_s
                )
            },
        ),
        What::Counters => print(&counters(dir)?, format, |r| {
            format!("{:<22} {}", r.counter, r.packets)
        }),
        What::SockRevnat => print(&sock_revnat(dir)?, format, |r| {
            format!(
                "socket {:<10} {} shown as {} [{}]",
                r.cookie, r.backend, r.frontend, r.service
            )
        }),
        What::Nat => print(&nat(dir)?, format, |r| {
            format!(
                "{} {} {} => {} {} expires in {}s",
                r.service, r.proto, r.original, r.translated, r.state, r.expires_in_s
            )
        }),
        What::Interfaces => print(&interfaces()?, format, |r| {
            format!(
                "{:<16} ingress: {:<24} egress: {}",
                r.interface,
                r.ingress.join(", "),
                r.egress.join(", ")
            )
        }),
    }
}
