//! kube-proxy's configuration file: `dataplane-agent run --config FILE`
//! reads the `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`
//! that kubeadm and most distributions keep in the `kube-proxy` ConfigMap,
//! so the agent can take kube-proxy's place in its DaemonSet.
//!
//! Reading is all or nothing: a file that is not YAML or JSON, names
//! another apiVersion or kind, or holds a value out of range is one error
//! naming the field, and the agent does not start. Fields kube-proxy knows
//! but that have no meaning for this dataplane (its own backends, sync
//! periods, profiling) are accepted and named once in the log. Fields
//! kube-proxy does not know are named in the log too and otherwise ignored,
//! as kube-proxy's lenient decoding does.
//!
//! [`KubeProxyConfig::apply`] puts every field that has a meaning here onto
//! [`run::Options`]; flags given on the command line (or through their
//! environment variable) win over the file, as with kube-proxy.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{parser::ValueSource, ArgMatches};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    control::model::{Ipv4Prefix, Ipv6Prefix},
    run::Options,
};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's default ports, added to a bind address given without one.
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// Pod interfaces when neither `--pod-ifaces` nor
/// `detectLocal.interfaceNamePrefix` names them: bridge CNIs (flannel,
/// kubenet) and Calico.
pub const DEFAULT_POD_IFACES: &[&str] = &["veth*", "cali*"];

/// What is wrong with a configuration file. Each names the file and, where
/// there is one, the field (its path in the document, as `conntrack.min`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a YAML or JSON document")]
    Syntax {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    /// A value of the wrong type or out of range.
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// The file as kube-proxy's v1alpha1 types spell it. Every field may be
/// absent or null (kubeadm writes `null` and `""` for "default").
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<BTreeMap<String, bool>>,
    client_connection: Option<ClientConnection>,
    hostname_override: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocalDoc>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    conntrack: Option<ConntrackDoc>,
    logging: Option<Logging>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ClientConnection {
    kubeconfig: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DetectLocalDoc {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ConntrackDoc {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Logging {
    format: Option<String>,
    verbosity: Option<i64>,
}

/// Top-level fields of kube-proxy's v1alpha1 type that have no meaning
/// here; named in the log when the file sets them.
const NOT_APPLICABLE: &[&str] = &[
    "mode",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "oomScoreAdj",
    "configSyncPeriod",
    "portRange",
    "windowsRunAsService",
    "syncPeriod",
    "minSyncPeriod",
];

/// Top-level fields read above.
const APPLIED: &[&str] = &[
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "conntrack",
    "logging",
];

/// An IP network, as `nodePortAddresses` and `clusterCIDR` list them;
/// host bits are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Self> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let prefix_len: u8 = len.parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > bits {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Some(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One entry of `nodePortAddresses` (and of `--nodeport-addresses`). As in
/// kube-proxy, each family is filtered by its own networks only: a family
/// none of them is of keeps its default addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// Node addresses in this IPv4 network.
    Cidr(Ipv4Prefix),
    /// Node addresses in this IPv6 network.
    Cidr6(Ipv6Prefix),
    /// `primary`: the node's primary address of each family (kube-proxy ≥
    /// 1.29); alone, never with networks.
    Primary,
}

impl std::str::FromStr for NodePortAddress {
    type Err = ();

    /// `primary`, or a CIDR of either family (a bare address is not one).
    fn from_str(text: &str) -> Result<Self, ()> {
        let text = text.trim();
        if text == "primary" {
            Ok(Self::Primary)
        } else if !text.contains('/') {
            Err(())
        } else if text.contains(':') {
            text.parse().map(Self::Cidr6)
        } else {
            text.parse().map(Self::Cidr)
        }
    }
}

impl fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cidr(p) => p.fmt(f),
            Self::Cidr6(p) => p.fmt(f),
            Self::Primary => f.write_str("primary"),
        }
    }
}

/// kube-proxy's rule for a list of [`NodePortAddress`]: `primary` stands
/// alone.
pub fn check_node_port_addresses(list: &[NodePortAddress]) -> Result<(), &'static str> {
    if list.contains(&NodePortAddress::Primary) && list.len() > 1 {
        return Err("\"primary\" cannot be combined with CIDRs");
    }
    Ok(())
}

/// How kube-proxy tells pod traffic from other traffic (`detectLocalMode`).
/// The programs sit on pod interfaces, so every packet they see is from a
/// pod; only the interface prefix carries over, as the pod interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DetectLocal {
    #[default]
    ClusterCidr,
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}

/// Conntrack settings from the file; `None` where it leaves ours as they
/// are (absent, null, or kube-proxy's `0`, "do not touch").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackConfig {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// A validated `KubeProxyConfiguration`: what has a meaning here, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeProxyConfig {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<IpAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub node_port_addresses: Vec<NodePortAddress>,
    pub cluster_cidrs: Vec<Cidr>,
    pub detect_local: DetectLocal,
    pub conntrack: ConntrackConfig,
    /// klog verbosity (`logging.verbosity`).
    pub verbosity: Option<u32>,
    pub feature_gates: BTreeMap<String, bool>,
    /// Fields set in the file that have no meaning here.
    pub not_applicable: Vec<String>,
    /// Fields kube-proxy's v1alpha1 type does not have.
    pub unknown: Vec<String>,
}

impl KubeProxyConfig {
    /// Reads and validates `path` (YAML or JSON).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text`; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // JSON is YAML (flow style), so one parser reads both, with lines.
        let value: Value = serde_norway::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        Reader { path }.read(value)
    }

    /// Puts every field with a meaning here onto `options`, except where
    /// `matches` (the `run` subcommand's) says the flag was given.
    pub fn apply(&self, options: &mut Options, matches: &ArgMatches) {
        self.apply_unless(options, |id| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        });
    }

    fn apply_unless(&self, options: &mut Options, given: impl Fn(&str) -> bool) {
        fn set<T: Clone>(target: &mut T, value: Option<&T>, flag_given: bool) {
            if let (Some(v), false) = (value, flag_given) {
                *target = v.clone();
            }
        }
        // The manifest source replaces the API server altogether.
        if options.manifests.is_none() && !given("kubeconfig") {
            if let Some(path) = &self.kubeconfig {
                options.kubeconfig = Some(path.clone());
            }
        }
        if let (Some(name), false) = (&self.hostname_override, given("node_name")) {
            options.node_name = Some(name.clone());
        }
        set(
            &mut options.healthz_bind_address,
            self.healthz_bind_address.as_ref(),
            given("healthz_bind_address"),
        );
        // Left empty, kube-proxy serves its metrics on loopback only; the
        // file keeps meaning that here (our own default is all addresses).
        let metrics = self
            .metrics_bind_address
            .unwrap_or(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), METRICS_PORT));
        set(
            &mut options.metrics_bind_address,
            Some(&metrics),
            given("metrics_bind_address"),
        );
        if options.pod_ifaces.is_empty() {
            options.pod_ifaces = match &self.detect_local {
                DetectLocal::InterfaceNamePrefix(prefix) => vec![format!("{prefix}*")],
                _ => DEFAULT_POD_IFACES.iter().map(|s| s.to_string()).collect(),
            };
        }
        let c = &self.conntrack;
        let ct = &mut options.conntrack;
        // kube-proxy sizes only when maxPerCore is non-zero; min alone
        // changes nothing there, nor here.
        if c.max_per_core.is_some() {
            set(
                &mut ct.conntrack_max_per_core,
                c.max_per_core.as_ref(),
                given("conntrack_max_per_core"),
            );
            set(
                &mut ct.conntrack_min,
                c.min.as_ref(),
                given("conntrack_min"),
            );
        }
        set(
            &mut ct.conntrack_tcp_timeout_established,
            c.tcp_established_timeout.as_ref(),
            given("conntrack_tcp_timeout_established"),
        );
        set(
            &mut ct.conntrack_tcp_timeout_close_wait,
            c.tcp_close_wait_timeout.as_ref(),
            given("conntrack_tcp_timeout_close_wait"),
        );
        set(
            &mut ct.conntrack_udp_timeout,
            c.udp_timeout.as_ref(),
            given("conntrack_udp_timeout"),
        );
        set(
            &mut ct.conntrack_udp_timeout_stream,
            c.udp_stream_timeout.as_ref(),
            given("conntrack_udp_timeout_stream"),
        );
        // The one place `nodePortAddresses` goes onto the options.
        if !given("nodeport_addresses") && options.nodeport_addresses.is_empty() {
            options
                .nodeport_addresses
                .clone_from(&self.node_port_addresses);
        }
        if !given("v") && options.v.is_none() {
            options.v = self.verbosity;
        }
    }

    /// What to log once, after the logger is up: fields accepted without
    /// effect and fields kube-proxy would not know.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.not_applicable.is_empty() {
            notes.push(format!(
                "KubeProxyConfiguration: not applicable to the eBPF dataplane, ignored: {}",
                self.not_applicable.join(", ")
            ));
        }
        if !self.unknown.is_empty() {
            notes.push(format!(
                "KubeProxyConfiguration: unknown fields, ignored: {}",
                self.unknown.join(", ")
            ));
        }
        if !self.feature_gates.is_empty() {
            let gates: Vec<String> = self
                .feature_gates
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            notes.push(format!(
                "KubeProxyConfiguration: featureGates {} change nothing here: the dataplane implements the GA service semantics",
                gates.join(",")
            ));
        }
        if matches!(self.bind_address, Some(IpAddr::V6(_))) {
            notes.push(
                "KubeProxyConfiguration: bindAddress is IPv6, but only IPv4 services are proxied"
                    .into(),
            );
        }
        notes
    }
}

/// The effective settings in kube-proxy's field names, as kube-proxy's
/// `/configz` shows its own: what the file and the flags amount to.
pub fn configz(options: &Options) -> Value {
    let ct = &options.conntrack;
    json!({
        "kubeproxy.config.k8s.io": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "clientConnection": {
                "kubeconfig": options.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            },
            "hostnameOverride": options.node_name.clone().unwrap_or_default(),
            "healthzBindAddress": options.healthz_bind_address.to_string(),
            "metricsBindAddress": options.metrics_bind_address.to_string(),
            "conntrack": {
                "maxPerCore": ct.conntrack_max_per_core,
                "min": ct.conntrack_min,
                "tcpEstablishedTimeout": go_duration(ct.conntrack_tcp_timeout_established),
                "tcpCloseWaitTimeout": go_duration(ct.conntrack_tcp_timeout_close_wait),
                "udpTimeout": go_duration(ct.conntrack_udp_timeout),
                "udpStreamTimeout": go_duration(ct.conntrack_udp_timeout_stream),
            },
            "nodePortAddresses": options
                .nodeport_addresses
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            "logging": {"verbosity": options.v.unwrap_or(0)},
        }
    })
}

/// `Duration` as Go prints one (`1h0m0s`, `30s`, `1.5s`).
fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let frac = d.subsec_nanos();
    let seconds = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{:09}", frac);
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

/// Parses a Go duration (`24h0m0s`, `1h30m`, `300ms`, `0s`); `None` if it
/// is not one or is negative.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn invalid(&self, field: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn read(&self, value: Value) -> Result<KubeProxyConfig, ConfigError> {
        let Some(top) = value.as_object() else {
            return Err(self.invalid("(document)", "expected a KubeProxyConfiguration object"));
        };
        let mut config = KubeProxyConfig::default();
        for (key, v) in top {
            let set = is_set(v);
            if NOT_APPLICABLE.contains(&key.as_str()) {
                if set {
                    config.not_applicable.push(key.clone());
                }
            } else if !APPLIED.contains(&key.as_str()) {
                config.unknown.push(key.clone());
            }
        }
        let doc: Document = serde_path_to_error::deserialize(value).map_err(|e| {
            // serde's message is the whole problem ("invalid type: ...");
            // the path is what serde_path_to_error adds.
            self.invalid(&e.path().to_string(), e.into_inner().to_string())
        })?;

        match doc.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(self.invalid(
                    "apiVersion",
                    format!("{other:?} is not supported (expected {API_VERSION})"),
                ))
            }
            None => {
                return Err(self.invalid("apiVersion", format!("missing (expected {API_VERSION})")))
            }
        }
        match doc.kind.as_deref() {
            Some(KIND) => {}
            Some(other) => {
                return Err(self.invalid(
                    "kind",
                    format!("{other:?} is not supported (expected {KIND})"),
                ))
            }
            None => return Err(self.invalid("kind", format!("missing (expected {KIND})"))),
        }

        config.feature_gates = doc.feature_gates.unwrap_or_default();
        config.kubeconfig =
            non_empty(doc.client_connection.and_then(|c| c.kubeconfig)).map(PathBuf::from);
        config.hostname_override = non_empty(doc.hostname_override).map(|h| h.trim().to_owned());
        config.bind_address = non_empty(doc.bind_address)
            .map(|a| {
                a.parse()
                    .map_err(|_| self.invalid("bindAddress", format!("{a:?} is not an IP address")))
            })
            .transpose()?;
        config.healthz_bind_address =
            self.bind_address("healthzBindAddress", doc.healthz_bind_address, HEALTHZ_PORT)?;
        config.metrics_bind_address =
            self.bind_address("metricsBindAddress", doc.metrics_bind_address, METRICS_PORT)?;
        for (i, entry) in doc.node_port_addresses.into_iter().flatten().enumerate() {
            let invalid = || {
                self.invalid(
                    &format!("nodePortAddresses[{i}]"),
                    format!("{entry:?} is neither a CIDR nor \"primary\""),
                )
            };
            let address = entry.parse().map_err(|()| invalid())?;
            config.node_port_addresses.push(address);
        }
        check_node_port_addresses(&config.node_port_addresses)
            .map_err(|why| self.invalid("nodePortAddresses", why))?;
        for cidr in non_empty(doc.cluster_cidr)
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let parsed = Cidr::parse(cidr)
                .ok_or_else(|| self.invalid("clusterCIDR", format!("{cidr:?} is not a CIDR")))?;
            config.cluster_cidrs.push(parsed);
        }
        let detect = doc.detect_local.unwrap_or_default();
        config.detect_local = match non_empty(doc.detect_local_mode).as_deref() {
            None | Some("ClusterCIDR") => DetectLocal::ClusterCidr,
            Some("NodeCIDR") => DetectLocal::NodeCidr,
            Some("BridgeInterface") => DetectLocal::BridgeInterface(
                non_empty(detect.bridge_interface).ok_or_else(|| {
                    self.invalid(
                        "detectLocal.bridgeInterface",
                        "required with detectLocalMode: BridgeInterface",
                    )
                })?,
            ),
            Some("InterfaceNamePrefix") => DetectLocal::InterfaceNamePrefix(
                non_empty(detect.interface_name_prefix).ok_or_else(|| {
                    self.invalid(
                        "detectLocal.interfaceNamePrefix",
                        "required with detectLocalMode: InterfaceNamePrefix",
                    )
                })?,
            ),
            Some(other) => {
                return Err(self.invalid(
                    "detectLocalMode",
                    format!(
                        "{other:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
                    ),
                ))
            }
        };
        if let Some(c) = doc.conntrack {
            if c.tcp_be_liberal == Some(true) {
                // A netfilter setting; the eBPF conntrack has no window
                // tracking to loosen.
                config.not_applicable.push("conntrack.tcpBeLiberal".into());
            }
            config.conntrack = self.conntrack(c)?;
        }
        if let Some(logging) = doc.logging {
            if let Some(v) = logging.verbosity {
                let v = u32::try_from(v)
                    .map_err(|_| self.invalid("logging.verbosity", format!("{v} is negative")))?;
                config.verbosity = Some(v);
            }
            if non_empty(logging.format).is_some_and(|f| f != "text") {
                config.not_applicable.push("logging.format".into());
            }
        }
        Ok(config)
    }

    /// `IP:port`, or an IP alone (kube-proxy adds its default port).
    fn bind_address(
        &self,
        field: &str,
        value: Option<String>,
        default_port: u16,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(text) = non_empty(value) else {
            return Ok(None);
        };
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Some(addr));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Some(SocketAddr::new(ip, default_port)));
        }
        Err(self.invalid(field, format!("{text:?} is not IP:port")))
    }

    fn conntrack(&self, c: ConntrackDoc) -> Result<ConntrackConfig, ConfigError> {
        let count = |field: &str, v: Option<i64>| -> Result<Option<u32>, ConfigError> {
            match v {
                None => Ok(None),
                Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                    self.invalid(field, format!("{n} is out of range 0-{}", u32::MAX))
                }),
            }
        };
        let duration = |field: &str, v: Option<String>| -> Result<Option<Duration>, ConfigError> {
            let Some(text) = non_empty(v) else {
                return Ok(None);
            };
            let d = parse_go_duration(&text).ok_or_else(|| {
                self.invalid(
                    field,
                    format!("{text:?} is not a duration of 0 or more (as 24h0m0s, 30s)"),
                )
            })?;
            // kube-proxy's 0: leave the system's setting as it is.
            Ok((!d.is_zero()).then_some(d))
        };
        let max_per_core = count("conntrack.maxPerCore", c.max_per_core)?;
        Ok(ConntrackConfig {
            // maxPerCore 0: kube-proxy leaves the table size alone.
            max_per_core: max_per_core.filter(|n| *n != 0),
            min: count("conntrack.min", c.min)?,
            tcp_established_timeout: duration(
                "conntrack.tcpEstablishedTimeout",
                c.tcp_established_timeout,
            )?,
            tcp_close_wait_timeout: duration(
                "conntrack.tcpCloseWaitTimeout",
                c.tcp_close_wait_timeout,
            )?,
            udp_timeout: duration("conntrack.udpTimeout", c.udp_timeout)?,
            udp_stream_timeout: duration("conntrack.udpStreamTimeout", c.udp_stream_timeout)?,
        })
    }
}

/// Whether a value says more than kube-proxy's defaults (kubeadm writes
/// every field, with `null`, `""`, `0`, `0s` or `false` for "default").
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !(s.is_empty() || s == "0s" || s == "0"),
        Value::Array(a) => a.iter().any(is_set),
        Value::Object(o) => o.values().any(is_set),
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;

    const KUBEADM: &str = include_str!("../testdata/kubeadm-kube-proxy.yaml");

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Run(Options),
    }

    /// `run` with `args` on the command line and `text` as `--config`.
    fn options_with(text: &str, args: &[&str]) -> Options {
        let mut argv = vec!["dataplane-agent", "run", "--config", "kube-proxy.conf"];
        argv.extend(args);
        let matches = Cli::command().try_get_matches_from(&argv).unwrap();
        let Command::Run(mut options) = Cli::from_arg_matches(&matches).unwrap().command;
        let config = KubeProxyConfig::parse(Path::new("kube-proxy.conf"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        config.apply(&mut options, matches.subcommand_matches("run").unwrap());
        options
    }

    fn error(text: &str) -> String {
        KubeProxyConfig::parse(Path::new("kube-proxy.conf"), text)
            .map(|c| panic!("accepted: {c:?}"))
            .unwrap_err()
            .to_string()
    }

    fn minimal(extra: &str) -> String {
        format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{extra}")
    }

    #[test]
    fn kubeadm_file_configures_addresses_source_and_conntrack() {
        let options = options_with(KUBEADM, &[]);
        assert_eq!(
            options.healthz_bind_address,
            "127.0.0.1:10356".parse().unwrap()
        );
        assert_eq!(
            options.metrics_bind_address,
            "127.0.0.1:10349".parse().unwrap()
        );
        assert_eq!(
            options.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(options.pod_ifaces, DEFAULT_POD_IFACES);
        let ct = &options.conntrack;
        assert_eq!((ct.conntrack_max_per_core, ct.conntrack_min), (1024, 4096));
        assert_eq!(ct.max_tcp(8), 8192);
        assert_eq!(
            ct.conntrack_tcp_timeout_established,
            Duration::from_secs(24 * 3600)
        );
        assert_eq!(
            ct.conntrack_tcp_timeout_close_wait,
            Duration::from_secs(3600)
        );
        assert_eq!(ct.conntrack_udp_timeout, Duration::from_secs(45));
        // udpStreamTimeout: 0s leaves ours.
        assert_eq!(ct.conntrack_udp_timeout_stream, Duration::from_secs(120));
    }

    #[test]
    fn kubeadm_file_names_what_does_not_apply_once() {
        let config = KubeProxyConfig::parse(Path::new("k"), KUBEADM).unwrap();
        assert_eq!(
            config.not_applicable,
            ["iptables", "ipvs", "mode", "oomScoreAdj"]
        );
        assert!(config.unknown.is_empty(), "{:?}", config.unknown);
        assert_eq!(
            config.node_port_addresses,
            [NodePortAddress::Cidr("192.168.0.0/16".parse().unwrap())]
        );
        assert_eq!(config.cluster_cidrs[0].to_string(), "10.244.0.0/16");
        let notes = config.notes().join("\n");
        assert_eq!(notes.matches("iptables").count(), 1, "{notes}");
    }

    #[test]
    fn node_port_addresses_of_both_families_reach_the_options() {
        let options = options_with(
            &minimal("nodePortAddresses: [192.168.0.0/16, \"fd00:192:168:100::/64\"]\n"),
            &[],
        );
        assert_eq!(
            options.nodeport_addresses,
            [
                NodePortAddress::Cidr("192.168.0.0/16".parse().unwrap()),
                NodePortAddress::Cidr6("fd00:192:168:100::/64".parse().unwrap()),
            ]
        );
        assert_eq!(
            configz(&options)["kubeproxy.config.k8s.io"]["nodePortAddresses"],
            json!(["192.168.0.0/16", "fd00:192:168:100::/64"])
        );
        let primary = options_with(&minimal("nodePortAddresses: [primary]\n"), &[]);
        assert_eq!(primary.nodeport_addresses, [NodePortAddress::Primary]);
        let flag = options_with(
            &minimal("nodePortAddresses: [10.0.0.0/8]\n"),
            &["--nodeport-addresses", "2001:db8::/32"],
        );
        assert_eq!(
            flag.nodeport_addresses,
            [NodePortAddress::Cidr6("2001:db8::/32".parse().unwrap())]
        );
        assert!(
            error(&minimal("nodePortAddresses: [primary, \"fd00::/8\"]\n"))
                .contains("\"primary\" cannot be combined with CIDRs")
        );
    }

    #[test]
    fn flags_given_on_the_command_line_win_over_the_file() {
        let options = options_with(
            KUBEADM,
            &[
                "--metrics-bind-address",
                "0.0.0.0:9999",
                "--conntrack-min",
                "10",
                "--hostname-override",
                "node-3",
                "--pod-ifaces",
                "lxc*",
            ],
        );
        assert_eq!(
            options.metrics_bind_address,
            "0.0.0.0:9999".parse().unwrap()
        );
        assert_eq!(
            options.healthz_bind_address,
            "127.0.0.1:10356".parse().unwrap(),
            "the file still sets what no flag gave"
        );
        assert_eq!(options.conntrack.conntrack_min, 10);
        assert_eq!(options.conntrack.conntrack_max_per_core, 1024);
        assert_eq!(options.node_name.as_deref(), Some("node-3"));
        assert_eq!(options.pod_ifaces, ["lxc*"]);
    }

    #[test]
    fn the_manifest_source_wins_over_the_files_kubeconfig() {
        let options = options_with(KUBEADM, &["--manifests", "/etc/dataplane"]);
        assert!(options.kubeconfig.is_none());
    }

    #[test]
    fn zero_and_null_leave_ours_as_kube_proxy_leaves_the_kernels() {
        let options = options_with(
            &minimal(
                "conntrack:\n  maxPerCore: 0\n  min: 5\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: null\n",
            ),
            &[],
        );
        let ct = &options.conntrack;
        assert_eq!(
            (ct.conntrack_max_per_core, ct.conntrack_min),
            (32_768, 131_072)
        );
        assert_eq!(
            ct.conntrack_tcp_timeout_established,
            Duration::from_secs(6 * 3600)
        );
        assert_eq!(ct.conntrack_tcp_timeout_close_wait, Duration::from_secs(10));
    }

    #[test]
    fn empty_metrics_address_keeps_kube_proxys_loopback_default() {
        let options = options_with(&minimal("metricsBindAddress: \"\"\n"), &[]);
        assert_eq!(
            options.metrics_bind_address,
            "127.0.0.1:10249".parse().unwrap()
        );
        let options = options_with(&minimal(""), &["--metrics-bind-address", "0.0.0.0:10249"]);
        assert_eq!(
            options.metrics_bind_address,
            "0.0.0.0:10249".parse().unwrap()
        );
    }

    #[test]
    fn interface_name_prefix_names_the_pod_interfaces() {
        let options = options_with(
            &minimal(
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: cali\n",
            ),
            &[],
        );
        assert_eq!(options.pod_ifaces, ["cali*"]);
    }

    #[test]
    fn json_is_read_too_and_a_bare_ip_gets_kube_proxys_port() {
        let text = format!(
            r#"{{"apiVersion": "{API_VERSION}", "kind": "{KIND}", "healthzBindAddress": "10.0.0.1", "logging": {{"verbosity": 4}}}}"#
        );
        let options = options_with(&text, &[]);
        assert_eq!(
            options.healthz_bind_address,
            "10.0.0.1:10256".parse().unwrap()
        );
        assert_eq!(options.v, Some(4));
    }

    #[test]
    fn unknown_fields_are_named_not_refused() {
        let config =
            KubeProxyConfig::parse(Path::new("k"), &minimal("someFutureField: 1\n")).unwrap();
        assert_eq!(config.unknown, ["someFutureField"]);
    }

    #[test]
    fn bad_files_are_one_error_naming_the_field() {
        for (text, expected) in [
            (
                "apiVersion: kubeproxy.config.k8s.io/v1beta9\nkind: KubeProxyConfiguration\n"
                    .to_string(),
                "kube-proxy.conf: apiVersion: \"kubeproxy.config.k8s.io/v1beta9\" is not supported",
            ),
            (
                format!("apiVersion: {API_VERSION}\nkind: KubeletConfiguration\n"),
                "kube-proxy.conf: kind: \"KubeletConfiguration\" is not supported",
            ),
            (
                format!("kind: {KIND}\n"),
                "kube-proxy.conf: apiVersion: missing",
            ),
            (
                minimal("conntrack:\n  maxPerCore: -1\n"),
                "kube-proxy.conf: conntrack.maxPerCore: -1 is out of range",
            ),
            (
                minimal("conntrack:\n  min: many\n"),
                "kube-proxy.conf: conntrack.min: invalid type: string \"many\"",
            ),
            (
                minimal("conntrack:\n  udpTimeout: -5s\n"),
                "kube-proxy.conf: conntrack.udpTimeout: \"-5s\" is not a duration",
            ),
            (
                minimal("metricsBindAddress: localhost:10249\n"),
                "kube-proxy.conf: metricsBindAddress: \"localhost:10249\" is not IP:port",
            ),
            (
                minimal("nodePortAddresses: [10.0.0.0/8, 300.0.0.0/8]\n"),
                "kube-proxy.conf: nodePortAddresses[1]: \"300.0.0.0/8\" is neither a CIDR",
            ),
            (
                minimal("clusterCIDR: 10.244.0.0/16,fd00::/129\n"),
                "kube-proxy.conf: clusterCIDR: \"fd00::/129\" is not a CIDR",
            ),
            (
                minimal("detectLocalMode: Magic\n"),
                "kube-proxy.conf: detectLocalMode: \"Magic\" is not one of",
            ),
            (
                minimal("detectLocalMode: InterfaceNamePrefix\n"),
                "kube-proxy.conf: detectLocal.interfaceNamePrefix: required",
            ),
            (
                minimal("featureGates:\n  Foo: sure\n"),
                "kube-proxy.conf: featureGates.Foo: invalid type",
            ),
            (
                minimal("logging:\n  verbosity: -2\n"),
                "kube-proxy.conf: logging.verbosity: -2 is negative",
            ),
            (
                "apiVersion: [unclosed\n".to_string(),
                "kube-proxy.conf: not a YAML or JSON document",
            ),
            (
                "- a list\n".to_string(),
                "kube-proxy.conf: (document): expected a KubeProxyConfiguration",
            ),
        ] {
            let e = error(&text);
            assert!(
                e.starts_with(expected),
                "{text:?}: got {e:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn go_durations_parse_and_print_as_go_does() {
        for (text, secs) in [
            ("24h0m0s", 86_400.0),
            ("1h30m", 5_400.0),
            ("300ms", 0.3),
            ("1.5s", 1.5),
            ("0s", 0.0),
            ("0", 0.0),
        ] {
            assert_eq!(
                parse_go_duration(text),
                Some(Duration::from_secs_f64(secs)),
                "{text}"
            );
        }
        for bad in ["", "5", "-1s", "1d", "s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
        assert_eq!(go_duration(Duration::from_secs(86_400)), "24h0m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn configz_shows_the_effective_settings_in_kube_proxy_names() {
        let options = options_with(KUBEADM, &["--hostname-override", "node-3"]);
        let z = &configz(&options)["kubeproxy.config.k8s.io"];
        assert_eq!(z["kind"], KIND);
        assert_eq!(z["hostnameOverride"], "node-3");
        assert_eq!(z["metricsBindAddress"], "127.0.0.1:10349");
        assert_eq!(z["conntrack"]["maxPerCore"], 1024);
        assert_eq!(z["conntrack"]["tcpEstablishedTimeout"], "24h0m0s");
    }
}
