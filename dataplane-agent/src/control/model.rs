//! The one internal model of services and endpoints. Every source (manifest
//! files, the Kubernetes API) hands its k8s-openapi objects to
//! [`parse_service`] and [`parse_slice`], which validate them once and keep
//! only what the translation needs; the model then turns a Service and its
//! EndpointSlices into frontends and backends with kube-proxy's semantics.
//!
//! Both address families live in this one model: a frontend or backend
//! address is an [`IpAddr`], a dual-stack Service has one cluster IP and
//! one set of EndpointSlices per family, and each family's frontends are
//! joined to that family's slices only.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceSpec},
        discovery::v1::{EndpointConditions, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips them).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label (any value) are headless to service proxies,
/// whatever their cluster IP: kube-proxy's informers select them out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// When the change an EndpointSlice carries was made (a pod became ready,
/// a service changed), set by the EndpointSlice controller: where network
/// programming latency starts.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// An object's namespace and name. Shared, not copied: the model, the sync
/// engine and the sources each key their maps by it, and at 10 000
/// services separate copies were 6 MiB of the agent's peak.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type ServiceName = ObjectRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An IP address family (`ipFamilies`, an EndpointSlice's `addressType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::Ipv4,
            IpAddr::V6(_) => IpFamily::Ipv6,
        }
    }

    /// As the API spells it (`ipFamilies`, `addressType`).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "IPv4",
            IpFamily::Ipv6 => "IPv6",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "IPv4" => Some(IpFamily::Ipv4),
            "IPv6" => Some(IpFamily::Ipv6),
            _ => None,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The families this node proxies: those it has an address of (and the
/// operator did not exclude). The others' frontends are skipped, as
/// kube-proxy runs no proxier for a family the node lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl IpFamilies {
    pub const BOTH: Self = Self {
        ipv4: true,
        ipv6: true,
    };

    pub fn contains(self, family: IpFamily) -> bool {
        match family {
            IpFamily::Ipv4 => self.ipv4,
            IpFamily::Ipv6 => self.ipv6,
        }
    }
}

impl Default for IpFamilies {
    fn default() -> Self {
        Self::BOTH
    }
}

/// Who reaches a frontend: pods only (a cluster IP), or also the outside
/// through the node's uplink (NodePort, load-balancer IP, externalIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Internal,
    External,
}

/// A service IP, port and protocol: what clients connect to. A NodePort is
/// an external frontend on the unspecified address: any of the node's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl Frontend {
    pub fn cluster_ip(ip: impl Into<IpAddr>, port: u16, proto: Protocol) -> Self {
        Self {
            ip: ip.into(),
            port,
            proto,
            scope: Scope::Internal,
        }
    }

    pub fn node_port(port: u16, proto: Protocol) -> Self {
        Self {
            ip: Ipv4Addr::UNSPECIFIED.into(),
            port,
            proto,
            scope: Scope::External,
        }
    }

    /// A NodePort on the node's IPv6 addresses.
    pub fn node_port6(port: u16, proto: Protocol) -> Self {
        Self {
            ip: std::net::Ipv6Addr::UNSPECIFIED.into(),
            ..Self::node_port(port, proto)
        }
    }

    pub fn is_node_port(&self) -> bool {
        self.scope == Scope::External && self.ip.is_unspecified()
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.ip)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `[addr]:port` for IPv6, as `SocketAddr` prints it.
        let endpoint = std::net::SocketAddr::new(self.ip, self.port);
        match self.scope {
            Scope::Internal => write!(f, "{endpoint}/{}", self.proto),
            Scope::External if self.ip.is_unspecified() => {
                write!(f, "nodePort {}/{}", self.port, self.proto)
            }
            Scope::External => write!(f, "{endpoint}/{} (external)", self.proto),
        }
    }
}

/// An IPv4 prefix of `loadBalancerSourceRanges`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Ipv4Prefix {
    type Err = ();

    /// `a.b.c.d/len`, host bits cleared; a bare address is a /32.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| ())?),
            None => (s.trim(), 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| ())?;
        if len > 32 {
            return Err(());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }
}

impl Ipv4Prefix {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

/// An IPv6 prefix of `loadBalancerSourceRanges`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Prefix {
    pub addr: std::net::Ipv6Addr,
    pub len: u8,
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Ipv6Prefix {
    type Err = ();

    /// `addr/len`, host bits cleared; a bare address is a /128.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| ())?),
            None => (s.trim(), 128),
        };
        let addr: std::net::Ipv6Addr = addr.parse().map_err(|_| ())?;
        if len > 128 {
            return Err(());
        }
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        Ok(Self {
            addr: std::net::Ipv6Addr::from(u128::from(addr) & mask),
            len,
        })
    }
}

impl Ipv6Prefix {
    pub fn contains(&self, ip: std::net::Ipv6Addr) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        u128::from(ip) & mask == u128::from(self.addr)
    }
}

/// A pod IP and target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

/// What one frontend should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceName,
    pub port_name: Option<String>,
    /// Sorted and deduplicated.
    pub backends: Vec<BackendAddr>,
    /// Endpoints still listed by a slice of the service but not chosen
    /// (terminating, not ready, or on another node): established flows to
    /// them keep draining, new ones never pick them, as with kube-proxy.
    /// Sorted, deduplicated, disjoint from `backends`.
    pub draining: Vec<BackendAddr>,
    /// `Some(t)` with `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local` (or, for an external frontend,
    /// `externalTrafficPolicy: Local`) and this node has none of the
    /// service's endpoints while other nodes do: kube-proxy drops such
    /// connections instead of rejecting them.
    pub drop_without_local_endpoints: bool,
    /// External frontend with `externalTrafficPolicy: Cluster`: backends on
    /// other nodes see this node's address as the client.
    pub masquerade_remote: bool,
    /// Addresses of `backends` and `draining` that run on this node.
    /// Sorted.
    pub local_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of a load-balancer IP frontend: only
    /// these clients are served. Empty (and `source_ranges6` empty):
    /// everyone. Sorted.
    pub source_ranges: Vec<Ipv4Prefix>,
    /// The IPv6 prefixes of `loadBalancerSourceRanges`. Sorted.
    pub source_ranges6: Vec<Ipv6Prefix>,
}

/// A Service as the model keeps it: validated, and only what the
/// translation reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    pub name: ServiceName,
    /// `None` for a service kube-proxy skips (headless, ExternalName,
    /// another proxy's).
    pub proxied: Option<ProxiedService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxiedService {
    /// `spec.clusterIPs` (or `spec.clusterIP`): at most one per family,
    /// the primary first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortEntry>,
    /// `Some(t)` with `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub local_only: bool,
    /// `spec.externalIPs`: served on the service ports, whether or not the
    /// address is on a node. Sorted.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of a LoadBalancer service. Sorted.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (IPv4), applied to the load-balancer
    /// IPs.
    pub source_ranges: Vec<Ipv4Prefix>,
    /// The IPv6 ones, applied to the IPv6 load-balancer IPs.
    pub source_ranges6: Vec<Ipv6Prefix>,
    /// `externalTrafficPolicy: Local`: external frontends use this node's
    /// endpoints only and keep the client's address.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer service with
    /// `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePortEntry {
    /// `None` for an unnamed port (an empty name included).
    pub name: Option<String>,
    pub port: u16,
    pub proto: Protocol,
    /// The pods' port when `targetPort` is a number, or the port itself
    /// without one; `None` for a named target port, which each slice
    /// resolves.
    pub numeric_target: Option<u16>,
    /// `nodePort` of a NodePort or LoadBalancer service (none with
    /// `allocateLoadBalancerNodePorts: false` unless one was set anyway).
    pub node_port: Option<u16>,
}

/// An EndpointSlice as the model keeps it: validated, and only what the
/// translation reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SliceEntry {
    pub key: ObjectRef,
    /// The service named by its `kubernetes.io/service-name` label.
    pub owner: Option<ServiceName>,
    /// Its `addressType`; `None` for FQDN slices, which are legal but name
    /// no address to proxy to and keep no ports or endpoints here.
    pub family: Option<IpFamily>,
    pub ports: Vec<SlicePortEntry>,
    pub endpoints: Vec<EndpointEntry>,
    /// Its [`LAST_CHANGE_TRIGGER_TIME`] annotation, if set and valid.
    pub trigger_time: Option<SystemTime>,
    /// Every endpoint's addresses, in endpoint order, and the distinct node
    /// names: one allocation each per slice rather than two per endpoint
    /// (at 10 000 services of 10 endpoints, most of the model's memory).
    addresses: Vec<IpAddr>,
    nodes: Vec<String>,
}

impl SliceEntry {
    pub fn addresses(&self, endpoint: &EndpointEntry) -> &[IpAddr] {
        let first = endpoint.first as usize;
        self.addresses
            .get(first..first + endpoint.count as usize)
            .unwrap_or_default()
    }

    pub fn node_name(&self, endpoint: &EndpointEntry) -> Option<&str> {
        self.nodes.get(endpoint.node? as usize).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlicePortEntry {
    pub name: Option<String>,
    pub port: Option<u16>,
    pub proto: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointEntry {
    /// Its addresses: [`SliceEntry::addresses`].
    first: u32,
    count: u32,
    /// Its node: [`SliceEntry::node_name`].
    node: Option<u32>,
    /// Absent `ready` means ready (the API's own default).
    pub ready: bool,
    /// Terminating but still serving: used only when nothing is ready.
    pub serving_terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClusterEvent {
    ApplyService(ServiceEntry),
    DeleteService(ObjectRef),
    ApplySlice(SliceEntry),
    DeleteSlice(ObjectRef),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {object}: missing {field}")]
    MissingField {
        kind: &'static str,
        object: ObjectRef,
        field: &'static str,
    },
    #[error("{kind} {object}: invalid IP address {value:?} in {field}")]
    InvalidIp {
        kind: &'static str,
        object: ObjectRef,
        field: &'static str,
        value: String,
    },
    #[error("{kind} {object}: {field} {value} out of range 1-65535")]
    PortOutOfRange {
        kind: &'static str,
        object: ObjectRef,
        field: &'static str,
        value: i64,
    },
    #[error("{kind} {object}: protocol {value:?} is not supported (TCP and UDP are)")]
    UnsupportedProtocol {
        kind: &'static str,
        object: ObjectRef,
        value: String,
    },
    #[error("service {object}: {reason}")]
    IpFamilies { object: ObjectRef, reason: String },
    #[error("service {object}: port {port}/{proto} is listed twice in spec.ports")]
    DuplicatePort {
        object: ObjectRef,
        port: u16,
        proto: Protocol,
    },
    #[error("service {object}: sessionAffinityConfig.clientIP.timeoutSeconds {value} out of range 1-86400")]
    AffinityTimeoutOutOfRange { object: ObjectRef, value: i32 },
    #[error("service {object}: invalid CIDR {value:?} in spec.loadBalancerSourceRanges")]
    InvalidSourceRange { object: ObjectRef, value: String },
}

const SERVICE: &str = "service";
const SLICE: &str = "endpointslice";

fn protocol(
    kind: &'static str,
    object: &ObjectRef,
    value: Option<&str>,
) -> Result<Protocol, ModelError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(ModelError::UnsupportedProtocol {
            kind,
            object: object.clone(),
            value: other.into(),
        }),
    }
}

fn port(
    kind: &'static str,
    object: &ObjectRef,
    field: &'static str,
    value: i32,
) -> Result<u16, ModelError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ModelError::PortOutOfRange {
            kind,
            object: object.clone(),
            field,
            value: value.into(),
        })
}

fn non_empty(name: Option<&String>) -> Option<String> {
    name.filter(|n| !n.is_empty()).cloned()
}

fn is_skipped(svc: &Service) -> bool {
    let spec = svc.spec.as_ref();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or("");
    spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName")
        || cluster_ip.is_empty()
        || cluster_ip == "None"
        || svc.metadata.labels.as_ref().is_some_and(|l| {
            l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)
        })
}

/// Parses a Service into what the model keeps, checking everything the
/// translation relies on, so that a bad object is refused whole before it
/// reaches the model.
pub fn parse_service(svc: &Service) -> Result<ServiceEntry, ModelError> {
    let object = ObjectRef::of(&svc.metadata);
    if svc.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(ModelError::MissingField {
            kind: SERVICE,
            object,
            field: "metadata.name",
        });
    }
    let spec = svc.spec.as_ref().ok_or_else(|| ModelError::MissingField {
        kind: SERVICE,
        object: object.clone(),
        field: "spec",
    })?;
    if is_skipped(svc) {
        return Ok(ServiceEntry {
            name: object,
            proxied: None,
        });
    }
    let cluster_ips = cluster_ips(&object, spec)?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let load_balancer = service_type == "LoadBalancer";
    let has_node_ports = load_balancer || service_type == "NodePort";
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let number = port(SERVICE, &object, "spec.ports[].port", p.port)?;
        let proto = protocol(SERVICE, &object, p.protocol.as_deref())?;
        let numeric_target = match &p.target_port {
            Some(IntOrString::Int(target)) => {
                Some(port(SERVICE, &object, "spec.ports[].targetPort", *target)?)
            }
            Some(IntOrString::String(_)) => None,
            None => Some(number),
        };
        // Two entries would map to the same frontend (the API server refuses
        // this too; hand-written manifests are not checked by it).
        if !seen.insert((number, proto)) {
            return Err(ModelError::DuplicatePort {
                object,
                port: number,
                proto,
            });
        }
        // With `allocateLoadBalancerNodePorts: false` the API server
        // allocates none, but one given explicitly is still served, as
        // kube-proxy serves whatever nodePort the spec holds.
        let node_port = match p.node_port {
            Some(n) if has_node_ports => Some(port(SERVICE, &object, "spec.ports[].nodePort", n)?),
            _ => None,
        };
        ports.push(ServicePortEntry {
            name: non_empty(p.name.as_ref()),
            port: number,
            proto,
            numeric_target,
            node_port,
        });
    }
    let affinity_timeout_s = affinity_timeout(&object, spec)?;
    let ipv4s = |list: Option<&Vec<String>>, field| -> Result<Vec<IpAddr>, ModelError> {
        let mut out = BTreeSet::new();
        for value in list.into_iter().flatten() {
            match value.parse::<std::net::IpAddr>() {
                // Each family's frontends take the addresses of theirs.
                Ok(ip) => {
                    out.insert(ip);
                }
                Err(_) => {
                    return Err(ModelError::InvalidIp {
                        kind: SERVICE,
                        object: object.clone(),
                        field,
                        value: value.clone(),
                    })
                }
            }
        }
        Ok(out.into_iter().collect())
    };
    let external_ips = ipv4s(spec.external_ips.as_ref(), "spec.externalIPs")?;
    let ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    let load_balancer_ips = if load_balancer {
        ipv4s(Some(&ingress), "status.loadBalancer.ingress[].ip")?
    } else {
        Vec::new()
    };
    let mut source_ranges = BTreeSet::new();
    let mut source_ranges6 = BTreeSet::new();
    if load_balancer {
        for value in spec.load_balancer_source_ranges.iter().flatten() {
            if value.contains(':') {
                let prefix =
                    value
                        .parse::<Ipv6Prefix>()
                        .map_err(|()| ModelError::InvalidSourceRange {
                            object: object.clone(),
                            value: value.clone(),
                        })?;
                source_ranges6.insert(prefix);
                continue;
            }
            let prefix =
                value
                    .parse::<Ipv4Prefix>()
                    .map_err(|()| ModelError::InvalidSourceRange {
                        object: object.clone(),
                        value: value.clone(),
                    })?;
            source_ranges.insert(prefix);
        }
    }
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if load_balancer && external_local => {
            Some(port(SERVICE, &object, "spec.healthCheckNodePort", n)?)
        }
        _ => None,
    };
    Ok(ServiceEntry {
        name: object,
        proxied: Some(ProxiedService {
            cluster_ips,
            ports,
            affinity_timeout_s,
            local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_ips,
            load_balancer_ips,
            source_ranges: source_ranges.into_iter().collect(),
            source_ranges6: source_ranges6.into_iter().collect(),
            external_local,
            health_check_node_port,
        }),
    })
}

/// The ClientIP affinity timeout, kube-proxy's default when not given.
fn affinity_timeout(object: &ObjectRef, spec: &ServiceSpec) -> Result<Option<u32>, ModelError> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
        Some(value) => u32::try_from(value)
            .ok()
            .filter(|t| (1..=86_400).contains(t))
            .map(Some)
            .ok_or_else(|| ModelError::AffinityTimeoutOutOfRange {
                object: object.clone(),
                value,
            }),
    }
}

/// The cluster IPs of a service that is not skipped: `clusterIPs` (the
/// primary first, which is `clusterIP`), checked against `ipFamilies` and
/// `ipFamilyPolicy` as the API server checks them (hand-written manifests
/// never went through it).
fn cluster_ips(object: &ObjectRef, spec: &ServiceSpec) -> Result<Vec<IpAddr>, ModelError> {
    let invalid = |field, value: &str| ModelError::InvalidIp {
        kind: SERVICE,
        object: object.clone(),
        field,
        value: value.into(),
    };
    let families_err = |reason: String| ModelError::IpFamilies {
        object: object.clone(),
        reason,
    };
    let primary = spec.cluster_ip.as_deref().unwrap_or("");
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
        _ => vec![primary],
    };
    let mut ips = Vec::new();
    for value in &listed {
        let ip: IpAddr = value
            .parse()
            .map_err(|_| invalid("spec.clusterIPs", value))?;
        if ips
            .iter()
            .any(|i: &IpAddr| IpFamily::of(*i) == IpFamily::of(ip))
        {
            return Err(families_err(format!(
                "spec.clusterIPs lists two {} addresses",
                IpFamily::of(ip)
            )));
        }
        ips.push(ip);
    }
    if !primary.is_empty() && primary.parse::<IpAddr>().ok() != ips.first().copied() {
        return Err(families_err(format!(
            "spec.clusterIP {primary} is not the first of spec.clusterIPs"
        )));
    }
    if let Some(families) = spec.ip_families.as_deref().filter(|f| !f.is_empty()) {
        let parsed: Vec<IpFamily> = families
            .iter()
            .map(|f| {
                IpFamily::parse(f)
                    .ok_or_else(|| families_err(format!("unknown family {f:?} in spec.ipFamilies")))
            })
            .collect::<Result<_, _>>()?;
        let of_ips: Vec<IpFamily> = ips.iter().map(|ip| IpFamily::of(*ip)).collect();
        if parsed != of_ips {
            return Err(families_err(format!(
                "spec.ipFamilies {families:?} do not match spec.clusterIPs {listed:?}"
            )));
        }
    }
    match (spec.ip_family_policy.as_deref(), ips.len()) {
        (Some("SingleStack"), n) if n > 1 => Err(families_err(
            "ipFamilyPolicy SingleStack with two cluster IPs".into(),
        )),
        (Some("RequireDualStack"), 1) => Err(families_err(
            "ipFamilyPolicy RequireDualStack with one cluster IP".into(),
        )),
        (None | Some("SingleStack" | "PreferDualStack" | "RequireDualStack"), _) => Ok(ips),
        (Some(other), _) => Err(families_err(format!("unknown ipFamilyPolicy {other:?}"))),
    }
}

/// Parses an EndpointSlice into what the model keeps, checking everything
/// the translation relies on.
pub fn parse_slice(slice: &EndpointSlice) -> Result<SliceEntry, ModelError> {
    let object = ObjectRef::of(&slice.metadata);
    if slice.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(ModelError::MissingField {
            kind: SLICE,
            object,
            field: "metadata.name",
        });
    }
    // k8s-openapi reads a missing required string as "".
    if slice.address_type.is_empty() {
        return Err(ModelError::MissingField {
            kind: SLICE,
            object,
            field: "addressType",
        });
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let number = p
            .port
            .map(|n| port(SLICE, &object, "ports[].port", n))
            .transpose()?;
        ports.push(SlicePortEntry {
            name: non_empty(p.name.as_ref()),
            port: number,
            proto: protocol(SLICE, &object, p.protocol.as_deref())?,
        });
    }
    let family = IpFamily::parse(&slice.address_type);
    let mut endpoints = Vec::new();
    let mut addresses = Vec::new();
    let mut nodes: Vec<String> = Vec::new();
    if let Some(family) = family {
        for e in &slice.endpoints {
            let first = addresses.len() as u32;
            for address in &e.addresses {
                // An address of the other family would be joined to the
                // wrong frontends.
                let ip = address
                    .parse::<IpAddr>()
                    .ok()
                    .filter(|ip| IpFamily::of(*ip) == family)
                    .ok_or_else(|| ModelError::InvalidIp {
                        kind: SLICE,
                        object: object.clone(),
                        field: "endpoints[].addresses",
                        value: address.clone(),
                    })?;
                addresses.push(ip);
            }
            let condition = |pick: fn(&EndpointConditions) -> Option<bool>| {
                e.conditions.as_ref().and_then(pick)
            };
            let node =
                e.node_name
                    .as_ref()
                    .map(|name| match nodes.iter().position(|n| n == name) {
                        Some(i) => i as u32,
                        None => {
                            nodes.push(name.clone());
                            nodes.len() as u32 - 1
                        }
                    });
            endpoints.push(EndpointEntry {
                first,
                count: addresses.len() as u32 - first,
                node,
                ready: condition(|c| c.ready).unwrap_or(true),
                serving_terminating: condition(|c| c.serving) == Some(true)
                    && condition(|c| c.terminating) == Some(true),
            });
        }
    } else {
        ports.clear();
    }
    let owner = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(|name| ObjectRef {
            namespace: object.namespace.clone(),
            name: name.as_str().into(),
        });
    let trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
        .and_then(|text| match text.parse::<k8s_openapi::jiff::Timestamp>() {
            Ok(t) => Some(SystemTime::from(t)),
            Err(e) => {
                // Only a measurement is lost; the endpoints still count.
                log::warn!("{SLICE} {object}: ignoring {LAST_CHANGE_TRIGGER_TIME} {text:?}: {e}");
                None
            }
        });
    addresses.shrink_to_fit();
    endpoints.shrink_to_fit();
    Ok(SliceEntry {
        key: object,
        owner,
        family,
        ports,
        endpoints,
        trigger_time,
        addresses,
        nodes,
    })
}

/// Services and EndpointSlices as the sources last reported them.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// The families this node proxies.
    families: IpFamilies,
    services: BTreeMap<ServiceName, ServiceEntry>,
    slices: BTreeMap<ObjectRef, SliceEntry>,
    /// Each service's slices, sorted: a `Vec` rather than a `BTreeSet`,
    /// whose smallest node holds eleven keys (10 000 services of one slice
    /// each: 5 MiB for one key in each).
    slices_by_service: BTreeMap<ServiceName, Vec<ObjectRef>>,
}

impl ClusterState {
    /// Makes this node proxy only `families` (by default both).
    pub fn set_ip_families(&mut self, families: IpFamilies) {
        self.families = families;
    }

    pub fn ip_families(&self) -> IpFamilies {
        self.families
    }

    /// Applies one event; returns the services whose frontends may have changed.
    pub fn apply(&mut self, event: ClusterEvent) -> Vec<ServiceName> {
        match event {
            ClusterEvent::ApplyService(svc) => {
                let name = svc.name.clone();
                self.services.insert(name.clone(), svc);
                vec![name]
            }
            ClusterEvent::DeleteService(name) => {
                self.services.remove(&name);
                vec![name]
            }
            ClusterEvent::ApplySlice(slice) => {
                let key = slice.key.clone();
                let mut touched = self.remove_slice(&key);
                if let Some(owner) = &slice.owner {
                    let keys = self.slices_by_service.entry(owner.clone()).or_default();
                    if let Err(at) = keys.binary_search(&key) {
                        keys.insert(at, key.clone());
                    }
                    touched.push(owner.clone());
                }
                self.slices.insert(key, slice);
                touched.sort();
                touched.dedup();
                touched
            }
            ClusterEvent::DeleteSlice(key) => self.remove_slice(&key),
        }
    }

    fn remove_slice(&mut self, key: &ObjectRef) -> Vec<ServiceName> {
        let Some(old) = self.slices.remove(key) else {
            return Vec::new();
        };
        let Some(owner) = old.owner else {
            return Vec::new();
        };
        if let Some(set) = self.slices_by_service.get_mut(&owner) {
            if let Ok(at) = set.binary_search(key) {
                set.remove(at);
            }
            if set.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
        vec![owner]
    }

    pub fn service_names(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.keys()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The frontends of one service; `None` if it is unknown or skipped the
    /// way kube-proxy skips it (headless, ExternalName, other proxy).
    pub fn frontends(
        &self,
        name: &ServiceName,
        node_name: Option<&str>,
    ) -> Option<Vec<(Frontend, FrontendSpec)>> {
        let Some(svc) = &self.services.get(name)?.proxied else {
            log::debug!("service {name}: skipped (headless, ExternalName or another proxy's)");
            return None;
        };
        let mut frontends = Vec::new();
        for &cluster_ip in &svc.cluster_ips {
            let family = IpFamily::of(cluster_ip);
            if !self.families.contains(family) {
                log::debug!("service {name}: {family} cluster IP {cluster_ip} skipped (this node does not proxy {family})");
                continue;
            }
            self.family_frontends(name, svc, cluster_ip, node_name, &mut frontends);
        }
        // Pushing one at a time leaves room for four: at 10 000 services
        // held at once for a full sync, 7 MiB of nothing.
        frontends.shrink_to_fit();
        Some(frontends)
    }

    /// The frontends of one family of a service: its cluster IP joined to
    /// that family's slices, and its external ones (NodePorts, the
    /// family's load-balancer IPs and externalIPs).
    fn family_frontends(
        &self,
        name: &ServiceName,
        svc: &ProxiedService,
        cluster_ip: IpAddr,
        node_name: Option<&str>,
        frontends: &mut Vec<(Frontend, FrontendSpec)>,
    ) {
        let family = IpFamily::of(cluster_ip);
        let slices: Vec<&SliceEntry> = self
            .slices_by_service
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| s.family == Some(family))
            .collect();
        let local_ips: Vec<IpAddr> = match node_name {
            Some(node) => slices
                .iter()
                .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
                .filter(|(s, e)| s.node_name(e) == Some(node))
                .flat_map(|(s, e)| s.addresses(e).iter().copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        let spec_for = |sp: &ServicePortEntry, local: bool| {
            let only_node = local.then_some(node_name).flatten();
            let backends = backends_for(sp, &slices, only_node);
            let draining = listed_for(sp, &slices)
                .into_iter()
                .filter(|b| backends.binary_search(b).is_err())
                .collect();
            let drop_without_local_endpoints = only_node.is_some()
                && backends.is_empty()
                && !backends_for(sp, &slices, None).is_empty();
            FrontendSpec {
                service: name.clone(),
                port_name: sp.name.clone(),
                backends,
                draining,
                affinity_timeout_s: svc.affinity_timeout_s,
                drop_without_local_endpoints,
                masquerade_remote: false,
                local_ips: local_ips.clone(),
                source_ranges: Vec::new(),
                source_ranges6: Vec::new(),
            }
        };
        for sp in &svc.ports {
            frontends.push((
                Frontend::cluster_ip(cluster_ip, sp.port, sp.proto),
                spec_for(sp, svc.local_only),
            ));
            let external = FrontendSpec {
                masquerade_remote: !svc.external_local,
                ..spec_for(sp, svc.external_local)
            };
            let on = |ip: IpAddr| Frontend {
                ip,
                port: sp.port,
                proto: sp.proto,
                scope: Scope::External,
            };
            let of_family = |ip: &&IpAddr| IpFamily::of(**ip) == family;
            for &ip in svc.external_ips.iter().filter(of_family) {
                frontends.push((on(ip), external.clone()));
            }
            for &ip in svc.load_balancer_ips.iter().filter(of_family) {
                let spec = FrontendSpec {
                    source_ranges: svc.source_ranges.clone(),
                    source_ranges6: svc.source_ranges6.clone(),
                    ..external.clone()
                };
                frontends.push((on(ip), spec));
            }
            if let Some(node_port) = sp.node_port {
                let frontend = match family {
                    IpFamily::Ipv4 => Frontend::node_port(node_port, sp.proto),
                    IpFamily::Ipv6 => Frontend::node_port6(node_port, sp.proto),
                };
                frontends.push((frontend, external));
            }
        }
    }

    /// The health-check node ports this node serves: kube-proxy's
    /// `healthCheckNodePort` of each LoadBalancer service with
    /// `externalTrafficPolicy: Local`, with its ready endpoints on this node.
    ///
    /// kube-proxy answers the check once per family (each family's proxier
    /// listens on its family's node addresses and counts its family's
    /// EndpointSlices). One listener answers here for both: the count is
    /// that of the family with more local endpoints among those this node
    /// proxies. That is the number kube-proxy gives on either family when
    /// both families' slices list the same pods (the EndpointSlice
    /// controller writes them from the same pods), and the IPv6 count of an
    /// IPv6-only service. A dual-stack pod counts once, not once per family.
    pub fn health_checks(&self, node_name: Option<&str>) -> Vec<HealthCheck> {
        let mut out = Vec::new();
        for (name, entry) in &self.services {
            let Some(svc) = &entry.proxied else { continue };
            let Some(port) = svc.health_check_node_port else {
                continue;
            };
            let (mut local4, mut local6) = (BTreeSet::new(), BTreeSet::new());
            for slice in self
                .slices_by_service
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k))
            {
                let local = match slice.family.filter(|f| self.families.contains(*f)) {
                    Some(IpFamily::Ipv4) => &mut local4,
                    Some(IpFamily::Ipv6) => &mut local6,
                    None => continue,
                };
                for e in &slice.endpoints {
                    // kube-proxy counts ready local endpoints only: a node
                    // whose endpoints are all terminating fails the check,
                    // so load balancers drain it.
                    if e.ready && node_name.is_some() && slice.node_name(e) == node_name {
                        local.extend(slice.addresses(e).iter().copied());
                    }
                }
            }
            out.push(HealthCheck {
                port,
                service: name.clone(),
                local_endpoints: local4.len().max(local6.len()),
            });
        }
        out
    }
}

/// One `healthCheckNodePort` and what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub service: ServiceName,
    pub local_endpoints: usize,
}

/// The slice port serving a service port: by name (as the EndpointSlice
/// controller writes them), else by the service's numeric targetPort.
fn slice_port(sp: &ServicePortEntry, slice: &SliceEntry) -> Option<u16> {
    let numbered = || {
        slice
            .ports
            .iter()
            .filter(|p| p.proto == sp.proto && p.port.is_some())
    };
    let chosen = numbered()
        .find(|p| p.name == sp.name)
        .or_else(|| numbered().find(|p| p.port == sp.numeric_target))
        .and_then(|p| p.port);
    // Hand-written slices often list no port (or one without a number):
    // the service's numeric targetPort is then the only sensible one. A
    // slice that does list numbered ports but none for this service port
    // serves other ports only.
    let fallback = if slice.ports.iter().all(|p| p.port.is_none()) {
        sp.numeric_target
    } else {
        None
    };
    chosen.or(fallback)
}

fn backends_for(
    sp: &ServicePortEntry,
    slices: &[&SliceEntry],
    only_node: Option<&str>,
) -> Vec<BackendAddr> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice_port(sp, slice) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if only_node.is_some_and(|node| slice.node_name(endpoint) != Some(node)) {
                continue;
            }
            let target = if endpoint.ready {
                &mut ready
            } else if endpoint.serving_terminating {
                &mut terminating
            } else {
                continue;
            };
            target.extend(
                slice
                    .addresses(endpoint)
                    .iter()
                    .map(|&ip| BackendAddr { ip, port }),
            );
        }
    }
    // Graceful termination: terminating-but-serving endpoints only when no
    // endpoint is ready.
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

/// Every endpoint a slice lists for a service port, whatever its
/// conditions or node.
fn listed_for(sp: &ServicePortEntry, slices: &[&SliceEntry]) -> BTreeSet<BackendAddr> {
    let mut listed = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice_port(sp, slice) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            listed.extend(
                slice
                    .addresses(endpoint)
                    .iter()
                    .map(|&ip| BackendAddr { ip, port }),
            );
        }
    }
    listed
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(extra: serde_json::Value) -> Service {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn slice(name: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports
        }))
        .unwrap()
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
                for (k, v) in e {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, e) => *b = e,
        }
    }

    fn ep(ip: &str, cond: serde_json::Value) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": cond, "nodeName": if ip.starts_with("10.244.1.") { "node1" } else { "node2" }})
    }

    fn web() -> ServiceName {
        ObjectRef {
            namespace: "default".into(),
            name: "web".into(),
        }
    }

    fn backends(state: &ClusterState, node: Option<&str>) -> Vec<String> {
        let f = state.frontends(&web(), node).unwrap();
        f[0].1.backends.iter().map(ToString::to_string).collect()
    }

    fn state(svc: Service, slices: Vec<EndpointSlice>) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(ClusterEvent::ApplyService(parse_service(&svc).unwrap()));
        for sl in slices {
            s.apply(ClusterEvent::ApplySlice(parse_slice(&sl).unwrap()));
        }
        s
    }

    #[test]
    fn slice_keeps_its_trigger_time_and_ignores_a_bad_one() {
        let mut with = slice("web-1", json!([]), json!([]));
        with.metadata.annotations = Some(
            [(
                LAST_CHANGE_TRIGGER_TIME.to_string(),
                "2026-11-30T08:00:01.5Z".to_string(),
            )]
            .into(),
        );
        let parsed = parse_slice(&with).unwrap();
        let at = parsed
            .trigger_time
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(at.as_millis(), 1_796_025_601_500);
        with.metadata.annotations = Some(
            [(
                LAST_CHANGE_TRIGGER_TIME.to_string(),
                "yesterday".to_string(),
            )]
            .into(),
        );
        assert_eq!(parse_slice(&with).unwrap().trigger_time, None);
        assert_eq!(
            parse_slice(&slice("web-1", json!([]), json!([])))
                .unwrap()
                .trigger_time,
            None
        );
    }

    #[test]
    fn service_with_two_slices_merges_and_dedups_backends() {
        let ports = json!([{"name": "http", "port": 8080}]);
        let s = state(
            service(json!({})),
            vec![
                slice(
                    "web-a",
                    json!([
                        ep("10.244.1.10", json!({})),
                        ep("10.244.2.10", json!({"ready": true}))
                    ]),
                    ports.clone(),
                ),
                slice(
                    "web-b",
                    json!([ep("10.244.2.10", json!({"ready": true}))]),
                    ports,
                ),
            ],
        );
        assert_eq!(
            backends(&s, None),
            vec!["10.244.1.10:8080", "10.244.2.10:8080"]
        );
    }

    #[test]
    fn named_target_port_resolves_per_slice() {
        let s = state(
            service(
                json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}),
            ),
            vec![
                slice(
                    "a",
                    json!([ep("10.244.1.10", json!({}))]),
                    json!([{"name": "http", "port": 8080}]),
                ),
                slice(
                    "b",
                    json!([ep("10.244.2.10", json!({}))]),
                    json!([{"name": "http", "port": 9090}]),
                ),
            ],
        );
        assert_eq!(
            backends(&s, None),
            vec!["10.244.1.10:8080", "10.244.2.10:9090"]
        );
    }

    #[test]
    fn not_ready_endpoints_are_excluded() {
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([
                    ep("10.244.1.10", json!({"ready": false})),
                    ep("10.244.1.11", json!({"ready": true}))
                ]),
                json!([{"name": "http", "port": 8080}]),
            )],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.11:8080"]);
    }

    #[test]
    fn terminating_and_not_ready_endpoints_still_listed_are_draining() {
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([
                    ep(
                        "10.244.1.10",
                        json!({"ready": false, "serving": true, "terminating": true})
                    ),
                    ep("10.244.1.11", json!({})),
                    ep("10.244.1.12", json!({"ready": false}))
                ]),
                json!([{"name": "http", "port": 8080}]),
            )],
        );
        let f = s.frontends(&web(), None).unwrap();
        let draining: Vec<String> = f[0].1.draining.iter().map(ToString::to_string).collect();
        assert_eq!(backends(&s, None), vec!["10.244.1.11:8080"]);
        assert_eq!(draining, vec!["10.244.1.10:8080", "10.244.1.12:8080"]);
    }

    #[test]
    fn terminating_endpoints_used_only_when_none_ready() {
        let terminating = json!({"ready": false, "serving": true, "terminating": true});
        let ports = json!([{"name": "http", "port": 8080}]);
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([
                    ep("10.244.1.10", terminating.clone()),
                    ep("10.244.1.11", json!({}))
                ]),
                ports.clone(),
            )],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.11:8080"]);
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([
                    ep("10.244.1.10", terminating),
                    ep(
                        "10.244.1.11",
                        json!({"ready": false, "serving": false, "terminating": true})
                    )
                ]),
                ports,
            )],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.10:8080"]);
    }

    #[test]
    fn headless_external_name_and_proxy_name_services_are_skipped() {
        for extra in [
            json!({"spec": {"clusterIP": "None"}}),
            json!({"spec": {"type": "ExternalName", "externalName": "example.org", "clusterIP": ""}}),
            json!({"metadata": {"labels": {SERVICE_PROXY_NAME_LABEL: "other"}}}),
            json!({"metadata": {"labels": {HEADLESS_LABEL: ""}}}),
        ] {
            let s = state(service(extra.clone()), vec![]);
            assert_eq!(s.frontends(&web(), None), None, "{extra}");
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_node() {
        let s = state(
            service(json!({"spec": {"internalTrafficPolicy": "Local"}})),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({})), ep("10.244.2.10", json!({}))]),
                json!([{"name": "http", "port": 8080}]),
            )],
        );
        assert_eq!(backends(&s, Some("node1")), vec!["10.244.1.10:8080"]);
        assert_eq!(backends(&s, Some("node3")), Vec::<String>::new());
        let drops = |node| {
            s.frontends(&web(), Some(node)).unwrap()[0]
                .1
                .drop_without_local_endpoints
        };
        assert!(!drops("node1"), "a local endpoint exists");
        assert!(
            drops("node3"),
            "endpoints only elsewhere: dropped like kube-proxy"
        );
    }

    #[test]
    fn local_policy_without_any_endpoint_rejects_rather_than_drops() {
        let s = state(
            service(json!({"spec": {"internalTrafficPolicy": "Local"}})),
            vec![],
        );
        let f = s.frontends(&web(), Some("node1")).unwrap();
        assert!(f[0].1.backends.is_empty());
        assert!(!f[0].1.drop_without_local_endpoints);
    }

    fn slice6(name: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        let mut s = slice(name, endpoints, ports);
        s.address_type = "IPv6".into();
        s
    }

    fn ep6(ip: &str, node: &str) -> serde_json::Value {
        json!({"addresses": [ip], "nodeName": node})
    }

    fn dual_stack() -> Service {
        service(json!({"spec": {
            "clusterIP": "fd00:10:96::10",
            "clusterIPs": ["fd00:10:96::10", "10.96.0.20"],
            "ipFamilies": ["IPv6", "IPv4"],
            "ipFamilyPolicy": "RequireDualStack"
        }}))
    }

    fn described(f: &[(Frontend, FrontendSpec)]) -> Vec<String> {
        f.iter()
            .map(|(fe, spec)| {
                let b: Vec<String> = spec.backends.iter().map(ToString::to_string).collect();
                format!("{fe} -> {}", b.join(","))
            })
            .collect()
    }

    #[test]
    fn dual_stack_service_joins_each_cluster_ip_to_its_family_slices() {
        let ports = json!([{"name": "http", "port": 8080}]);
        let s = state(
            dual_stack(),
            vec![
                slice(
                    "web-v4",
                    json!([ep("10.244.1.10", json!({}))]),
                    ports.clone(),
                ),
                slice6(
                    "web-v6",
                    json!([
                        ep6("fd00:10:244:1::10", "node1"),
                        ep6("fd00:10:244:2::10", "node2")
                    ]),
                    ports,
                ),
            ],
        );
        let f = s.frontends(&web(), Some("node1")).unwrap();
        assert_eq!(
            described(&f),
            [
                "[fd00:10:96::10]:80/TCP -> [fd00:10:244:1::10]:8080,[fd00:10:244:2::10]:8080",
                "10.96.0.20:80/TCP -> 10.244.1.10:8080"
            ]
        );
        let local: Vec<String> = f[0].1.local_ips.iter().map(ToString::to_string).collect();
        assert_eq!(local, ["fd00:10:244:1::10"]);
    }

    #[test]
    fn ipv6_only_service_is_served_on_ipv6() {
        let s = state(
            service(json!({"spec": {"clusterIP": "fd00:10:96::10", "ipFamilies": ["IPv6"]}})),
            vec![slice6(
                "v6",
                json!([ep6("fd00:10:244:1::10", "node1")]),
                json!([]),
            )],
        );
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(
            described(&f),
            ["[fd00:10:96::10]:80/TCP -> [fd00:10:244:1::10]:8080"]
        );
    }

    #[test]
    fn family_the_node_does_not_proxy_is_skipped() {
        let mut s = state(
            dual_stack(),
            vec![
                slice("web-v4", json!([ep("10.244.1.10", json!({}))]), json!([])),
                slice6(
                    "web-v6",
                    json!([ep6("fd00:10:244:1::10", "node1")]),
                    json!([]),
                ),
            ],
        );
        s.set_ip_families(IpFamilies {
            ipv4: true,
            ipv6: false,
        });
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(described(&f), ["10.96.0.20:80/TCP -> 10.244.1.10:8080"]);
        s.set_ip_families(IpFamilies {
            ipv4: false,
            ipv6: true,
        });
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(
            described(&f),
            ["[fd00:10:96::10]:80/TCP -> [fd00:10:244:1::10]:8080"]
        );
    }

    #[test]
    fn ipv6_service_has_an_ipv6_node_port_and_its_family_of_external_addresses() {
        let s = state(
            service(json!({
                "spec": {
                    "type": "LoadBalancer",
                    "clusterIP": "fd00:10:96::10",
                    "externalIPs": ["2001:db8::20", "198.51.100.20"],
                    "loadBalancerSourceRanges": ["2001:db8:113::/48", "203.0.113.0/24"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "2001:db8::10"}, {"ip": "198.51.100.10"}]}}
            })),
            vec![],
        );
        let f = s.frontends(&web(), None).unwrap();
        let ips: Vec<(String, bool)> = f
            .iter()
            .map(|(fe, _)| (fe.ip.to_string(), fe.scope == Scope::External))
            .collect();
        assert_eq!(
            ips,
            [
                ("fd00:10:96::10".to_string(), false),
                ("2001:db8::20".to_string(), true),
                ("2001:db8::10".to_string(), true),
                ("::".to_string(), true),
            ],
            "the IPv6 addresses only, and the NodePort on the node's IPv6 addresses"
        );
        let (_, lb) = &f[2];
        assert_eq!(lb.source_ranges6.len(), 1);
        assert_eq!(lb.source_ranges6[0].to_string(), "2001:db8:113::/48");
        assert!(lb.masquerade_remote);
    }

    #[test]
    fn ip_families_and_policy_are_checked_against_cluster_ips() {
        let refused = |spec: serde_json::Value| {
            let err = parse_service(&service(json!({ "spec": spec }))).unwrap_err();
            assert!(matches!(err, ModelError::IpFamilies { .. }), "{err}");
            err.to_string()
        };
        refused(json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "10.96.0.11"]}));
        refused(json!({"clusterIP": "10.96.0.10", "clusterIPs": ["fd00::10", "10.96.0.10"]}));
        refused(json!({"clusterIP": "10.96.0.10", "ipFamilies": ["IPv6"]}));
        refused(json!({"clusterIP": "10.96.0.10", "ipFamilyPolicy": "RequireDualStack"}));
        let msg = refused(json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
            "ipFamilyPolicy": "SingleStack"
        }));
        assert_eq!(
            msg,
            "service default/web: ipFamilyPolicy SingleStack with two cluster IPs"
        );
        // PreferDualStack with one family is what a single-stack cluster
        // gives it.
        let ok = parse_service(&service(
            json!({"spec": {"clusterIP": "10.96.0.10", "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4"]}}),
        ))
        .unwrap();
        assert_eq!(
            ok.proxied.unwrap().cluster_ips,
            [IpAddr::from([10, 96, 0, 10])]
        );
    }

    #[test]
    fn slice_address_of_the_other_family_is_refused() {
        let err = parse_slice(&slice6(
            "v6",
            json!([ep6("10.244.1.10", "node1")]),
            json!([]),
        ))
        .unwrap_err();
        assert!(matches!(err, ModelError::InvalidIp { .. }), "{err}");
        let err =
            parse_slice(&slice("v4", json!([ep("fd00::1", json!({}))]), json!([]))).unwrap_err();
        assert!(matches!(err, ModelError::InvalidIp { .. }), "{err}");
    }

    #[test]
    fn client_ip_affinity_defaults_to_10800s() {
        let s = state(
            service(json!({"spec": {"sessionAffinity": "ClientIP"}})),
            vec![],
        );
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(f[0].1.affinity_timeout_s, Some(10_800));
        let s = state(
            service(
                json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}),
            ),
            vec![],
        );
        assert_eq!(
            s.frontends(&web(), None).unwrap()[0].1.affinity_timeout_s,
            Some(60)
        );
    }

    #[test]
    fn unnamed_single_port_slice_matches_unnamed_service_port() {
        let s = state(
            service(
                json!({"spec": {"ports": [{"port": 53, "protocol": "UDP", "targetPort": 5353}]}}),
            ),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({}))]),
                json!([{"port": 5353, "protocol": "UDP"}]),
            )],
        );
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(f[0].0.to_string(), "10.96.0.10:53/UDP");
        assert_eq!(backends(&s, None), vec!["10.244.1.10:5353"]);
    }

    #[test]
    fn moving_a_slice_to_another_service_touches_both() {
        let mut s = state(service(json!({})), vec![slice("a", json!([]), json!([]))]);
        let mut moved = slice("a", json!([]), json!([]));
        moved.metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), "api".to_string())].into());
        let touched = s.apply(ClusterEvent::ApplySlice(parse_slice(&moved).unwrap()));
        assert_eq!(touched.len(), 2);
    }

    #[test]
    fn invalid_objects_are_rejected_with_their_name() {
        let err =
            parse_service(&service(json!({"spec": {"clusterIP": "10.96.0.300"}}))).unwrap_err();
        assert!(
            err.to_string().contains("default/web") && err.to_string().contains("10.96.0.300"),
            "{err}"
        );
        let err =
            parse_service(&service(json!({"spec": {"ports": [{"port": 70000}]}}))).unwrap_err();
        assert!(matches!(err, ModelError::PortOutOfRange { .. }), "{err}");
        let err = parse_service(&service(
            json!({"spec": {"ports": [{"port": 80, "protocol": "SCTP"}]}}),
        ))
        .unwrap_err();
        assert!(
            matches!(err, ModelError::UnsupportedProtocol { .. }),
            "{err}"
        );
        let err =
            parse_slice(&slice("a", json!([ep("10.244.1.x", json!({}))]), json!([]))).unwrap_err();
        assert!(err.to_string().contains("10.244.1.x"), "{err}");
        let err = parse_service(&service(
            json!({"spec": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}}),
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service default/web: port 80/TCP is listed twice in spec.ports"
        );
        let err = parse_service(&service(
            json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}}),
        ))
        .unwrap_err();
        assert!(
            matches!(err, ModelError::AffinityTimeoutOutOfRange { .. }),
            "{err}"
        );
        let mut no_family = slice("a", json!([]), json!([]));
        no_family.address_type = String::new();
        let err = parse_slice(&no_family).unwrap_err();
        assert!(err.to_string().contains("addressType"), "{err}");
    }

    #[test]
    fn port_out_of_range_rejected() {
        let err = parse_service(&service(
            json!({"spec": {"ports": [{"port": 80, "targetPort": 70000}]}}),
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "service default/web: spec.ports[].targetPort 70000 out of range 1-65535"
        );
        let err = parse_slice(&slice("a", json!([]), json!([{"port": 0}]))).unwrap_err();
        assert!(matches!(err, ModelError::PortOutOfRange { .. }), "{err}");
    }

    #[test]
    fn slice_without_ports_falls_back_to_target_port_or_port() {
        let s = state(
            service(json!({})),
            vec![slice("a", json!([ep("10.244.1.10", json!({}))]), json!([]))],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.10:8080"]);
        let mut svc = service(json!({}));
        if let Some(p) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            p[0].target_port = None;
        }
        let s = state(
            svc,
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({}))]),
                json!([{"name": "http"}]),
            )],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.10:80"]);
    }

    #[test]
    fn numeric_target_port_matches_a_differently_named_slice_port() {
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({}))]),
                json!([{"name": "metrics", "port": 9100}, {"name": "web", "port": 8080}]),
            )],
        );
        assert_eq!(backends(&s, None), vec!["10.244.1.10:8080"]);
    }

    #[test]
    fn slice_port_of_another_protocol_does_not_match() {
        let s = state(
            service(json!({})),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({}))]),
                json!([{"name": "http", "port": 8080, "protocol": "UDP"}]),
            )],
        );
        assert_eq!(backends(&s, None), Vec::<String>::new());
    }

    #[test]
    fn multi_port_service_has_one_frontend_per_port() {
        let s = state(
            service(json!({"spec": {"ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353}
            ]}})),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", json!({}))]),
                json!([
                    {"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}
                ]),
            )],
        );
        let f = s.frontends(&web(), None).unwrap();
        let got: Vec<String> = f
            .iter()
            .map(|(fe, spec)| format!("{fe} {} {:?}", spec.backends[0], spec.port_name.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                "10.96.0.10:53/UDP 10.244.1.10:5353 Some(\"dns\")",
                "10.96.0.10:53/TCP 10.244.1.10:5354 Some(\"dns-tcp\")"
            ]
        );
    }

    #[test]
    fn service_without_endpoints_keeps_its_frontends() {
        let s = state(service(json!({})), vec![]);
        let f = s.frontends(&web(), None).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.to_string(), "10.96.0.10:80/TCP");
        assert!(f[0].1.backends.is_empty());
        assert_eq!(f[0].1.affinity_timeout_s, None);
    }

    #[test]
    fn ipv6_slices_and_other_namespaces_do_not_contribute() {
        let mut v6 = slice("v6", json!([{"addresses": ["fd00::1"]}]), json!([]));
        v6.address_type = "IPv6".into();
        let mut elsewhere = slice("x", json!([ep("10.244.1.99", json!({}))]), json!([]));
        elsewhere.metadata.namespace = Some("prod".into());
        let s = state(service(json!({})), vec![v6, elsewhere]);
        assert_eq!(backends(&s, None), Vec::<String>::new());
    }

    #[test]
    fn local_policy_falls_back_to_terminating_local_endpoints_only() {
        let terminating = json!({"ready": false, "serving": true, "terminating": true});
        let s = state(
            service(json!({"spec": {"internalTrafficPolicy": "Local"}})),
            vec![slice(
                "a",
                json!([ep("10.244.1.10", terminating), ep("10.244.2.10", json!({}))]),
                json!([{"name": "http", "port": 8080}]),
            )],
        );
        assert_eq!(backends(&s, Some("node1")), vec!["10.244.1.10:8080"]);
    }

    #[test]
    fn deletes_report_the_affected_service_and_remove_it() {
        let mut s = state(
            service(json!({})),
            vec![slice("a", json!([ep("10.244.1.10", json!({}))]), json!([]))],
        );
        let slice_ref = ObjectRef {
            namespace: "default".into(),
            name: "a".into(),
        };
        assert_eq!(
            s.apply(ClusterEvent::DeleteSlice(slice_ref.clone())),
            vec![web()]
        );
        assert_eq!(backends(&s, None), Vec::<String>::new());
        assert_eq!(s.apply(ClusterEvent::DeleteSlice(slice_ref)), vec![]);
        assert_eq!(s.apply(ClusterEvent::DeleteService(web())), vec![web()]);
        assert_eq!(s.frontends(&web(), None), None);
        assert_eq!(s.service_names().count(), 0);
    }

    fn external(state: &ClusterState, node: Option<&str>) -> Vec<(String, FrontendSpec)> {
        state
            .frontends(&web(), node)
            .unwrap()
            .into_iter()
            .filter(|(f, _)| f.scope == Scope::External)
            .map(|(f, spec)| (f.to_string(), spec))
            .collect()
    }

    fn two_nodes() -> Vec<EndpointSlice> {
        vec![slice(
            "a",
            json!([ep("10.244.1.10", json!({})), ep("10.244.2.10", json!({}))]),
            json!([{"name": "http", "port": 8080}]),
        )]
    }

    #[test]
    fn node_port_service_has_a_node_port_frontend_that_masquerades() {
        let s = state(
            service(
                json!({"spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
            ),
            two_nodes(),
        );
        let ext = external(&s, Some("node1"));
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert_eq!(ext[0].0, "nodePort 30080/TCP");
        let spec = &ext[0].1;
        assert!(spec.masquerade_remote);
        assert_eq!(spec.backends.len(), 2, "policy Cluster: every endpoint");
        assert_eq!(spec.local_ips, vec![IpAddr::from([10, 244, 1, 10])]);
        // The cluster IP stays as it was.
        let all = s.frontends(&web(), Some("node1")).unwrap();
        assert_eq!(all[0].0.to_string(), "10.96.0.10:80/TCP");
    }

    #[test]
    fn cluster_ip_service_ignores_a_node_port_left_in_its_spec() {
        let s = state(
            service(
                json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30080}]}}),
            ),
            two_nodes(),
        );
        assert!(external(&s, None).is_empty());
    }

    #[test]
    fn load_balancer_serves_ingress_ips_external_ips_and_node_ports_with_source_ranges() {
        let s = state(
            service(json!({
                "spec": {"type": "LoadBalancer", "externalIPs": ["192.0.2.7", "2001:db8::1"],
                         "loadBalancerSourceRanges": ["203.0.113.0/24", "198.51.100.9"],
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}, {"hostname": "lb.example"}]}}
            })),
            two_nodes(),
        );
        let ext = external(&s, Some("node1"));
        let names: Vec<&str> = ext.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "192.0.2.7:80/TCP (external)",
                "198.51.100.10:80/TCP (external)",
                "nodePort 30080/TCP"
            ]
        );
        // Source ranges apply to the load-balancer IP only.
        assert!(ext[0].1.source_ranges.is_empty());
        let ranges: Vec<String> = ext[1]
            .1
            .source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(ranges, ["198.51.100.9/32", "203.0.113.0/24"]);
        assert!(ext[2].1.source_ranges.is_empty());
    }

    #[test]
    fn load_balancer_without_allocated_node_ports_has_none() {
        let s = state(
            service(
                json!({"spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false}}),
            ),
            two_nodes(),
        );
        assert!(external(&s, None).is_empty());
    }

    #[test]
    fn external_traffic_policy_local_uses_local_endpoints_and_keeps_the_client_address() {
        let svc = |ready2: bool| {
            let mut s = state(
                service(
                    json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
                ),
                vec![],
            );
            s.apply(ClusterEvent::ApplySlice(
                parse_slice(&slice(
                    "a",
                    json!([
                        ep("10.244.1.10", json!({})),
                        ep(
                            "10.244.2.10",
                            json!({"ready": ready2, "serving": true, "terminating": !ready2})
                        )
                    ]),
                    json!([{"name": "http", "port": 8080}]),
                ))
                .unwrap(),
            ));
            s
        };
        let s = svc(true);
        let ext = external(&s, Some("node1"));
        let spec = &ext[0].1;
        assert!(!spec.masquerade_remote);
        let local: Vec<String> = spec.backends.iter().map(ToString::to_string).collect();
        assert_eq!(local, ["10.244.1.10:8080"]);
        // The ClusterIP frontend still reaches both nodes' endpoints.
        assert_eq!(backends(&s, Some("node1")).len(), 2);
        let on_node3 = external(&s, Some("node3"));
        assert!(on_node3[0].1.backends.is_empty());
        assert!(on_node3[0].1.drop_without_local_endpoints);
        // Health checks count ready local endpoints only.
        let check = |s: &ClusterState, node| s.health_checks(Some(node))[0].local_endpoints;
        assert_eq!(check(&s, "node1"), 1);
        assert_eq!(check(&s, "node2"), 1);
        assert_eq!(check(&s, "node3"), 0);
        let s = svc(false);
        assert_eq!(check(&s, "node2"), 0, "only terminating: 503");
        assert_eq!(s.health_checks(Some("node2"))[0].port, 32000);
    }

    #[test]
    fn health_check_counts_local_endpoints_of_either_family_once() {
        let lb = |families: serde_json::Value| {
            let mut spec = json!({"spec": {
                "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}});
            merge(&mut spec, families);
            service(spec)
        };
        let ports = json!([{"name": "http", "port": 8080}]);
        let v6_slice = slice6(
            "web-v6",
            json!([
                ep6("fd00:10:244:1::10", "node1"),
                ep6("fd00:10:244:1::11", "node1"),
                ep6("fd00:10:244:2::10", "node2")
            ]),
            ports.clone(),
        );
        let check = |s: &ClusterState, node| s.health_checks(Some(node))[0].local_endpoints;

        // IPv6-only: its endpoints are the service's, not zero.
        let v6_only = state(
            lb(json!({"spec": {"clusterIP": "fd00:10:96::10", "ipFamilies": ["IPv6"]}})),
            vec![v6_slice.clone()],
        );
        assert_eq!(check(&v6_only, "node1"), 2);
        assert_eq!(check(&v6_only, "node2"), 1);
        assert_eq!(check(&v6_only, "node3"), 0);

        // Dual-stack, one slice set per family from the same pods: each pod
        // counts once, as kube-proxy's per-family answers each count it.
        let dual = |families| {
            let mut s = ClusterState::default();
            s.set_ip_families(families);
            s.apply(ClusterEvent::ApplyService(
                parse_service(&lb(json!({"spec": {
                    "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:10:96::10"],
                    "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}})))
                .unwrap(),
            ));
            for sl in [
                slice(
                    "web-v4",
                    json!([
                        ep("10.244.1.10", json!({})),
                        ep("10.244.1.11", json!({})),
                        ep("10.244.2.10", json!({}))
                    ]),
                    ports.clone(),
                ),
                v6_slice.clone(),
            ] {
                s.apply(ClusterEvent::ApplySlice(parse_slice(&sl).unwrap()));
            }
            s
        };
        let both = dual(IpFamilies::BOTH);
        assert_eq!(check(&both, "node1"), 2);
        assert_eq!(check(&both, "node2"), 1);
        // A family this node does not proxy counts nothing: on a node
        // without IPv6, only the (now not ready) IPv4 endpoints count.
        let mut v4_only_node = dual(IpFamilies {
            ipv4: true,
            ipv6: false,
        });
        v4_only_node.apply(ClusterEvent::ApplySlice(
            parse_slice(&slice(
                "web-v4",
                json!([ep("10.244.2.10", json!({"ready": false}))]),
                ports,
            ))
            .unwrap(),
        ));
        assert_eq!(check(&v4_only_node, "node2"), 0);
        assert_eq!(check(&v4_only_node, "node1"), 0);
    }

    #[test]
    fn type_change_back_to_cluster_ip_drops_external_frontends() {
        let mut s = state(
            service(
                json!({"spec": {"type": "NodePort", "externalIPs": ["192.0.2.7"], "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
            ),
            two_nodes(),
        );
        assert_eq!(external(&s, None).len(), 2);
        s.apply(ClusterEvent::ApplyService(
            parse_service(&service(json!({"spec": {"type": "ClusterIP"}}))).unwrap(),
        ));
        assert!(external(&s, None).is_empty());
        // ExternalName: nothing at all.
        s.apply(ClusterEvent::ApplyService(
            parse_service(&service(
                json!({"spec": {"type": "ExternalName", "externalName": "x.example"}}),
            ))
            .unwrap(),
        ));
        assert_eq!(s.frontends(&web(), None), None);
    }

    #[test]
    fn invalid_source_range_is_refused() {
        let err = parse_service(&service(
            json!({"spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/33"]}}),
        ))
        .unwrap_err();
        assert!(
            matches!(err, ModelError::InvalidSourceRange { .. }),
            "{err}"
        );
    }

    #[test]
    fn prefixes_parse_clear_host_bits_and_match() {
        let p: Ipv4Prefix = "203.0.113.77/24".parse().unwrap();
        assert_eq!(p.to_string(), "203.0.113.0/24");
        assert!(p.contains(Ipv4Addr::new(203, 0, 113, 1)));
        assert!(!p.contains(Ipv4Addr::new(203, 0, 114, 1)));
        let all: Ipv4Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
